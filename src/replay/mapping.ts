/**
 * Where a trace record lands on the disk it is replayed against: a pure, deterministic function of the
 * trace's summary, the disk's size and the server's block-size constraints.
 *
 *   1. Fold devices: the trace's distinct device/ASU numbers, sorted, get ranks 0, 1, 2, ...; device of
 *      rank r owns the range starting at r × stride, where stride = the largest offset+length of the
 *      replayed records rounded up to 1 MiB. A single-device trace keeps its addresses.
 *   2. Wrap: address = (r × stride + offset) mod diskBytes, aligned down to `alignmentBytes` (512, or the
 *      server's minimum block size when larger). A record whose folded address was ≥ diskBytes is counted
 *      as `wrapped`.
 *   3. Length: 0 becomes one alignment unit (`zeroLength`); a length is rounded up to the server's
 *      minimum block size; then it is clipped to the server's maximum payload and to the disk's end
 *      (`clipped`). The result is never 0 and never crosses the end of the disk.
 *
 * Ranks, not device numbers, keep the layout dense (MSR's disk 1 starts at 0, not at one stride).
 */
import { VdiskError, assert } from "../errors";
import type { TraceSummary } from "./traces";

export const strideAlignmentBytes = 1024 * 1024;
const SECTOR_BYTES = 512;

export interface MappingPlan {
  diskBytes: number;
  strideBytes: number;
  alignmentBytes: number;
  /** Server's minimum block size (lengths are rounded up to it). */
  blockBytesMin: number;
  requestBytesMax: number;
  /** device number → rank */
  ranks: Map<number, number>;
}

export interface MappingCounters {
  wrapped: number;
  clipped: number;
  zeroLength: number;
}

/** The result of mapping one record; reused by the caller (no allocation per record). */
export interface MappedRequest {
  offsetBytes: number;
  lengthBytes: number;
}

export function planMapping(
  summary: Pick<TraceSummary, "file" | "devices" | "maxEndBytes">,
  diskBytes: number,
  server: { blockBytesMin: number; requestBytesMax: number },
): MappingPlan {
  assert(Number.isSafeInteger(diskBytes) && diskBytes > 0, "disk size is a positive integer");
  assert(server.blockBytesMin >= 1 && server.requestBytesMax >= server.blockBytesMin, "sane block sizes");
  const alignmentBytes = Math.max(SECTOR_BYTES, server.blockBytesMin);
  if (diskBytes < alignmentBytes) {
    throw new VdiskError(
      "BAD_SIZE",
      `the disk has ${diskBytes} bytes, less than one ${alignmentBytes}-byte block`,
      {
        hint: "replay against a larger disk",
      },
    );
  }
  const strideBytes = Math.max(
    strideAlignmentBytes,
    Math.ceil(summary.maxEndBytes / strideAlignmentBytes) * strideAlignmentBytes,
  );
  const ranks = new Map<number, number>();
  summary.devices.forEach((device, rank) => ranks.set(device, rank));
  if (!Number.isSafeInteger(strideBytes * Math.max(1, summary.devices.length))) {
    throw new VdiskError("INVALID_ARGUMENT", `trace ${summary.file}: its devices do not fit in 2^53 bytes`, {
      hint: "replay fewer records with --limit, or split the trace per device",
    });
  }
  return {
    diskBytes,
    strideBytes,
    alignmentBytes,
    blockBytesMin: server.blockBytesMin,
    requestBytesMax: Math.floor(server.requestBytesMax / server.blockBytesMin) * server.blockBytesMin,
    ranks,
  };
}

/** Map one record into `out`, counting what was changed. */
export function mapRequest(
  plan: MappingPlan,
  device: number,
  offsetBytes: number,
  lengthBytes: number,
  counters: MappingCounters,
  out: MappedRequest,
): void {
  const rank = plan.ranks.get(device);
  assert(rank !== undefined, "every replayed device was seen by the summary");
  const folded = rank * plan.strideBytes + offsetBytes;
  let offset = folded;
  if (folded >= plan.diskBytes) {
    offset = folded % plan.diskBytes;
    counters.wrapped++;
  }
  offset -= offset % plan.alignmentBytes;
  let length = lengthBytes;
  if (length === 0) {
    length = plan.alignmentBytes;
    counters.zeroLength++;
  }
  const remainder = length % plan.blockBytesMin;
  if (remainder !== 0) length += plan.blockBytesMin - remainder;
  const room = Math.min(plan.requestBytesMax, plan.diskBytes - offset);
  if (length > room) {
    length = room;
    counters.clipped++;
  }
  assert(length > 0 && offset + length <= plan.diskBytes, "a mapped request lies inside the disk");
  out.offsetBytes = offset;
  out.lengthBytes = length;
}
