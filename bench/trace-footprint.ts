/**
 * What a trace touches once it is mapped onto a disk — offline, with the replayer's own code: the same
 * summary (`traceSummary`, honouring the record limit), the same mapping plan (`planMapping`, with the
 * block sizes the vdisk daemon advertises) and the same per-record mapping (`mapRequest`). So the figures
 * are exactly the addresses `vdisk replay --limit L` sends to a disk of that size.
 *
 * For each trace: the distinct 4 KiB blocks touched (a record touches every 4 KiB block its mapped range
 * overlaps), accesses per block (one record on a block is one access to it), and how concentrated the
 * accesses are — the share of block accesses that fall on the hottest 20 % (HOT_SHARE) of the touched
 * bytes when placement works
 *   - at 4 KiB granularity: the hottest blocks, as many as 20 % of the touched blocks;
 *   - at 1 MiB granularity: whole 1 MiB extents, the extents with the most block accesses first, as many as
 *     fit in the same byte budget (20 % of the touched bytes; an extent of a prefilled disk is all data, so
 *     moving it costs 1 MiB of the fast class however little of it the trace touches).
 * Ties are broken by address (deterministic). These are upper bounds on the share of accesses any
 * placement with a fast class of that size can serve from it on one pass over the trace, when it knows the
 * future exactly (here: a warm-up pass over the same records).
 *
 * Also the share of records whose every block lies in the hot 4 KiB set: a request split over two devices
 * completes when its slower part does, so only these are served at fast-device speed.
 */
import { mapRequest, planMapping, type MappedRequest, type MappingCounters } from "../src/replay/mapping";
import { RecordBatch, TraceReader, traceSummary, type TraceFormat } from "../src/replay/traces";
import { blockBytesMin, requestBytesMaxDefault } from "../src/limits";

export const FOOTPRINT_BLOCK_BYTES = 4096;
export const FOOTPRINT_EXTENT_BYTES = 1024 * 1024;
/** The fast class's size as a share of the touched bytes. */
export const HOT_SHARE = 0.2;

export interface TraceFootprint {
  trace: string;
  format: TraceFormat;
  diskBytes: number;
  /** Records replayed (the limit applied), and of them reads and writes. */
  records: number;
  reads: number;
  writes: number;
  /** Sum over records of the 4 KiB blocks each touches. */
  blockAccesses: number;
  /** Distinct 4 KiB blocks touched, and their bytes. */
  blocks: number;
  touchedBytes: number;
  /** Distinct 1 MiB extents touched. */
  extents: number;
  accessesPerBlockMean: number;
  accessesPerBlockMax: number;
  /** Touched blocks accessed exactly once, twice, three times or more. */
  blocksAccessedOnce: number;
  blocksAccessedTwice: number;
  blocksAccessedThriceOrMore: number;
  /** The fast-class budget: HOT_SHARE of touchedBytes. */
  hotBudgetBytes: number;
  /** Share of block accesses on the hottest HOT_SHARE of the touched bytes, at 4 KiB granularity. */
  hotShare4k: number;
  /** Share of records whose every block is in that hot 4 KiB set. */
  hotRecordShare4k: number;
  /** The same at 1 MiB granularity: extents that fit in the budget, and their share of block accesses. */
  hotExtents1m: number;
  hotShare1m: number;
  /** What the mapping changed (as `vdisk replay` reports it). */
  mapping: MappingCounters & { strideBytes: number; devices: number };
}

/** The share of `counts` (sorted descending) held by the first `take` entries. */
function topShare(sortedCounts: number[], take: number, total: number): number {
  let sum = 0;
  for (let index = 0; index < Math.min(take, sortedCounts.length); index++)
    sum += sortedCounts[index] as number;
  return total === 0 ? 0 : sum / total;
}

/** Keys of `counts` sorted hottest first, ties by address. */
function hottest(counts: Map<number, number>): number[] {
  return [...counts.keys()].sort((a, b) => (counts.get(b) as number) - (counts.get(a) as number) || a - b);
}

/**
 * The footprint of the first `limit` records (null: all) of `trace` mapped onto a disk of `diskBytes`, as
 * the vdisk daemon serves it (its advertised minimum block size and maximum request).
 */
export async function traceFootprint(
  trace: string,
  diskBytes: number,
  limit: number | null,
): Promise<TraceFootprint> {
  const summary = await traceSummary(trace, { limit });
  const plan = planMapping(summary, diskBytes, { blockBytesMin, requestBytesMax: requestBytesMaxDefault });
  const counters: MappingCounters = { wrapped: 0, clipped: 0, zeroLength: 0 };
  const mapped: MappedRequest = { offsetBytes: 0, lengthBytes: 0 };
  const blockCounts = new Map<number, number>();
  /** Per record, its first and last block (to test whether it lies in the hot set afterwards). */
  const recordFirst: number[] = [];
  const recordLast: number[] = [];
  let blockAccesses = 0;
  const reader = await TraceReader.open(trace, { format: summary.format, limit });
  const batch = new RecordBatch();
  try {
    while ((await reader.read(batch)) > 0) {
      for (let index = 0; index < batch.length; index++) {
        mapRequest(
          plan,
          batch.device[index] as number,
          batch.offsetBytes[index] as number,
          batch.lengthBytes[index] as number,
          counters,
          mapped,
        );
        const first = Math.floor(mapped.offsetBytes / FOOTPRINT_BLOCK_BYTES);
        const last = Math.floor((mapped.offsetBytes + mapped.lengthBytes - 1) / FOOTPRINT_BLOCK_BYTES);
        for (let block = first; block <= last; block++) {
          blockCounts.set(block, (blockCounts.get(block) ?? 0) + 1);
        }
        blockAccesses += last - first + 1;
        recordFirst.push(first);
        recordLast.push(last);
      }
    }
  } finally {
    await reader.close();
  }
  if (recordFirst.length !== summary.records)
    throw new Error(`${trace}: records read differ from its summary`);

  const blocks = blockCounts.size;
  const touchedBytes = blocks * FOOTPRINT_BLOCK_BYTES;
  const hotBudgetBytes = Math.floor(touchedBytes * HOT_SHARE);

  const blocksHot = hottest(blockCounts);
  const hotBlockCount = Math.floor(hotBudgetBytes / FOOTPRINT_BLOCK_BYTES);
  const hotSet = new Set(blocksHot.slice(0, hotBlockCount));
  const countsSorted = blocksHot.map((block) => blockCounts.get(block) as number);
  let hotRecords = 0;
  for (let record = 0; record < recordFirst.length; record++) {
    let inside = true;
    for (let block = recordFirst[record] as number; block <= (recordLast[record] as number); block++) {
      if (!hotSet.has(block)) {
        inside = false;
        break;
      }
    }
    if (inside) hotRecords++;
  }

  const blocksPerExtent = FOOTPRINT_EXTENT_BYTES / FOOTPRINT_BLOCK_BYTES;
  const extentCounts = new Map<number, number>();
  for (const [block, count] of blockCounts) {
    const extent = Math.floor(block / blocksPerExtent);
    extentCounts.set(extent, (extentCounts.get(extent) ?? 0) + count);
  }
  const hotExtents1m = Math.floor(hotBudgetBytes / FOOTPRINT_EXTENT_BYTES);
  const extentsSorted = hottest(extentCounts).map((extent) => extentCounts.get(extent) as number);

  let once = 0;
  let twice = 0;
  let more = 0;
  let max = 0;
  for (const count of blockCounts.values()) {
    if (count === 1) once++;
    else if (count === 2) twice++;
    else more++;
    if (count > max) max = count;
  }
  return {
    trace,
    format: summary.format,
    diskBytes,
    records: summary.records,
    reads: summary.reads,
    writes: summary.writes,
    blockAccesses,
    blocks,
    touchedBytes,
    extents: extentCounts.size,
    accessesPerBlockMean: blocks === 0 ? 0 : blockAccesses / blocks,
    accessesPerBlockMax: max,
    blocksAccessedOnce: once,
    blocksAccessedTwice: twice,
    blocksAccessedThriceOrMore: more,
    hotBudgetBytes,
    hotShare4k: topShare(countsSorted, hotBlockCount, blockAccesses),
    hotRecordShare4k: recordFirst.length === 0 ? 0 : hotRecords / recordFirst.length,
    hotExtents1m,
    hotShare1m: topShare(extentsSorted, hotExtents1m, blockAccesses),
    mapping: { ...counters, strideBytes: plan.strideBytes, devices: summary.devices.length },
  };
}
