/**
 * Replays block-I/O traces against NBD exports: one trace per VM, all VMs at once, one NBD connection per
 * VM (or `connections` of them, used round-robin), and a report per VM.
 *
 * Set-up, before the clock starts: each trace is summarised (one streaming pass: counts, devices, largest
 * offset — see traces.ts), each VM connects, its address mapping is planned from the summary, the export's
 * size and the server's block sizes (mapping.ts), and its first batch of records is parsed. Then every VM
 * starts at the same instant `startMs`.
 *
 * Timing model.
 *   timed (default): open loop. Record i is due at startMs + timeNs(i) / speed and is never issued before
 *     that. One timer per VM, armed for the next due record (setTimeout, 1 ms granularity): when it
 *     fires, every record due by then is issued at once, so a request leaves at most ~1 ms late on an
 *     idle machine (the report gives the mean and maximum lateness). At most `queueDepth` requests are in
 *     flight per VM: a record that is due while the queue is full waits for a completion and is counted
 *     as `delayed` (its lateness shows the cost).
 *   untimed: closed loop, as fast as possible with `queueDepth` requests in flight; trace times are
 *     ignored.
 * Records are issued in file order in both modes.
 *
 * Measurements (performance.now(), sub-microsecond): a request's latency runs from just before it is
 * handed to the NBD client to its reply's callback; execution time from the VM's first issue (timed: the
 * first record's due time, a few microseconds earlier, so that a timed run never looks shorter than its
 * trace span / speed) to its last completion; IOPS = records / execution time; MB/s uses 10^6 bytes (the report also gives byte counts).
 * Latencies go into log-bucketed histograms (histogram.ts, ±0.4 %).
 *
 * Cost per request: no allocation besides the client's own write of the header and a Buffer view of the
 * write pool. Writes carry deterministic pseudo-random bytes: a pool of `writePoolBytes` (+ the largest
 * write) filled once from a seeded xorshift generator; write number k uses the view at a pseudo-random,
 * 512-aligned start derived from k. Reads go to no buffer (the client drops their data).
 *
 * Failures: a request error is counted (`errors`, `firstError`) and the replay goes on; a lost connection
 * or a protocol violation stops the whole replay with that error.
 */
import { performance } from "node:perf_hooks";
import { VdiskError, assert } from "../errors";
import { NbdClient, clientInflightMaxCeiling, formatNbdUri, type NbdTarget } from "../protocol/nbd/client";
import { Histogram } from "./histogram";
import {
  mapRequest,
  planMapping,
  type MappedRequest,
  type MappingCounters,
  type MappingPlan,
} from "./mapping";
import {
  RecordBatch,
  TraceReader,
  traceSummary,
  type RecordCounts,
  type TraceFormat,
  type TraceSummary,
} from "./traces";

// Limits of the replayer (src/limits.ts), under the names this module has always exported.
import {
  replayConnectionsMax as connectionsMax,
  replayQueueDepthDefault as queueDepthDefault,
  replaySpeedMax as speedMax,
  replayWritePoolBytes as writePoolBytes,
} from "../limits";
export { connectionsMax, queueDepthDefault, speedMax, writePoolBytes };

export interface ReplayVm {
  /** Label in the report, e.g. "vm1". */
  name: string;
  trace: string;
  format: TraceFormat | "auto";
  target: NbdTarget;
  /** The disk's name, for the report. */
  disk: string;
}

export interface ReplayOptions {
  timed: boolean;
  /** Timed mode: trace time is divided by this. */
  speed: number;
  /** Requests in flight per VM. */
  queueDepth: number;
  /** NBD connections per VM. */
  connections: number;
  /** Replay only the first N records of each trace. */
  limit: number | null;
  /** Seed of the write data. */
  seed: number;
}

export interface LatencyReport {
  count: number;
  meanUs: number;
  minUs: number;
  p50Us: number;
  p90Us: number;
  p99Us: number;
  p999Us: number;
  maxUs: number;
}

export interface VmReport extends RecordCounts {
  vm: string;
  disk: string;
  uri: string;
  trace: string;
  format: TraceFormat;
  errors: number;
  firstError: { code: string; message: string } | null;
  /** First issue to last completion. */
  elapsedSeconds: number;
  /** The replayed records' trace time span (largest minus smallest time). */
  traceSpanSeconds: number;
  iops: number;
  mbPerSecond: number;
  latency: LatencyReport;
  readLatency: LatencyReport;
  writeLatency: LatencyReport;
  /** Timed mode: records that were due while `queueDepth` requests were in flight. */
  delayed: number;
  /** Timed mode: how late requests left, relative to their due time. */
  issueLateMeanUs: number;
  issueLateMaxUs: number;
  mapping: {
    diskBytes: number;
    devices: number;
    strideBytes: number;
    wrapped: number;
    clipped: number;
    zeroLength: number;
  };
}

export interface ReplayReport {
  mode: "timed" | "untimed";
  speed: number | null;
  queueDepth: number;
  connections: number;
  limit: number | null;
  vms: VmReport[];
  total: RecordCounts & {
    vms: number;
    errors: number;
    /** Earliest first issue to latest last completion over all VMs. */
    elapsedSeconds: number;
    iops: number;
    mbPerSecond: number;
    latency: LatencyReport;
    delayed: number;
    wrapped: number;
  };
}

function checkOptions(vms: readonly ReplayVm[], options: ReplayOptions): void {
  assert(vms.length >= 1, "at least one VM");
  assert(
    Number.isSafeInteger(options.queueDepth) &&
      options.queueDepth >= 1 &&
      options.queueDepth <= clientInflightMaxCeiling,
    "queue depth within 1..clientInflightMaxCeiling",
  );
  assert(
    Number.isSafeInteger(options.connections) &&
      options.connections >= 1 &&
      options.connections <= connectionsMax,
    "connections within 1..connectionsMax",
  );
  assert(Number.isFinite(options.speed) && options.speed > 0 && options.speed <= speedMax, "speed > 0");
  assert(options.limit === null || (Number.isSafeInteger(options.limit) && options.limit >= 1), "limit ≥ 1");
}

/** xorshift32 bytes: the same seed always gives the same pool. */
function fillPseudoRandom(buffer: Buffer, seed: number): void {
  let state = seed >>> 0 || 0x9e3779b9;
  let index = 0;
  for (; index + 4 <= buffer.length; index += 4) {
    state ^= state << 13;
    state >>>= 0;
    state ^= state >>> 17;
    state ^= state << 5;
    state >>>= 0;
    buffer.writeUInt32LE(state, index);
  }
  for (; index < buffer.length; index++) buffer[index] = index & 0xff;
}

function latencyReport(histogram: Histogram): LatencyReport {
  const us = (ns: number): number => Math.round(ns) / 1000;
  if (histogram.count === 0) {
    return { count: 0, meanUs: 0, minUs: 0, p50Us: 0, p90Us: 0, p99Us: 0, p999Us: 0, maxUs: 0 };
  }
  return {
    count: histogram.count,
    meanUs: us(histogram.mean),
    minUs: us(histogram.min),
    p50Us: us(histogram.percentile(50)),
    p90Us: us(histogram.percentile(90)),
    p99Us: us(histogram.percentile(99)),
    p999Us: us(histogram.percentile(99.9)),
    maxUs: us(histogram.max),
  };
}

/** One VM's replay: its trace reader, connections, in-flight slots and measurements. */
class VmRun {
  readonly histogram = new Histogram();
  readonly readHistogram = new Histogram();
  readonly writeHistogram = new Histogram();
  readonly counters: MappingCounters = { wrapped: 0, clipped: 0, zeroLength: 0 };
  issued = 0;
  completed = 0;
  reads = 0;
  writes = 0;
  readBytes = 0;
  writeBytes = 0;
  errors = 0;
  firstError: VdiskError | null = null;
  delayed = 0;
  lateSumMs = 0;
  lateMaxMs = 0;
  firstIssueMs = -1;
  lastCompleteMs = -1;

  private current = new RecordBatch();
  private spare = new RecordBatch();
  private index = 0;
  /** Records parsed into `spare`, or null while it is being filled. */
  private spareCount: number | null = null;
  private waitingForBatch = false;
  private readingDone = false;
  private headDelayed = false;
  private inflight = 0;
  private readonly freeSlots: Int32Array;
  private freeCount: number;
  private readonly slotIssueMs: Float64Array;
  private readonly slotWrite: Uint8Array;
  private nextClient = 0;
  private timer: NodeJS.Timeout | null = null;
  private startMs = 0;
  private readonly msPerTraceNs: number;
  private readonly mapped: MappedRequest = { offsetBytes: 0, lengthBytes: 0 };
  private readonly pool: Buffer;
  private readonly poolStarts: number;
  private finished = false;
  private resolve: () => void = () => undefined;
  private reject: (err: unknown) => void = () => undefined;

  constructor(
    readonly vm: ReplayVm,
    readonly summary: TraceSummary,
    readonly clients: NbdClient[],
    readonly plan: MappingPlan,
    private readonly reader: TraceReader,
    private readonly options: ReplayOptions,
    seed: number,
  ) {
    const depth = options.queueDepth;
    this.freeSlots = new Int32Array(depth);
    for (let slot = 0; slot < depth; slot++) this.freeSlots[slot] = depth - 1 - slot;
    this.freeCount = depth;
    this.slotIssueMs = new Float64Array(depth);
    this.slotWrite = new Uint8Array(depth);
    this.msPerTraceNs = 1 / (1e6 * options.speed);
    const block = plan.blockBytesMin;
    const writeLargest = Math.ceil(Math.max(summary.maxWriteBytes, plan.alignmentBytes) / block) * block;
    const writeBytesMax = Math.min(plan.requestBytesMax, plan.diskBytes, writeLargest);
    this.poolStarts = writePoolBytes / 512;
    this.pool = Buffer.allocUnsafeSlow(summary.writes > 0 ? writePoolBytes + writeBytesMax : 0);
    fillPseudoRandom(this.pool, seed);
  }

  /** Parse the first batch (before the clock starts). */
  async prepare(): Promise<void> {
    await this.reader.read(this.current);
    this.prefetch();
  }

  /** Start at `startMs`; resolves when every record has completed. */
  run(startMs: number): Promise<void> {
    this.startMs = startMs;
    const done = new Promise<void>((resolve, reject) => {
      this.resolve = resolve;
      this.reject = reject;
    });
    this.pump();
    return done;
  }

  /** Stop (another VM failed); pending callbacks are ignored. */
  stop(): void {
    this.finished = true;
    if (this.timer !== null) clearTimeout(this.timer);
    this.timer = null;
  }

  private prefetch(): void {
    this.spareCount = null;
    this.reader.read(this.spare).then(
      (count) => {
        this.spareCount = count;
        if (this.waitingForBatch) {
          this.waitingForBatch = false;
          this.pump();
        }
      },
      (err: unknown) => this.fail(err),
    );
  }

  /** Move to the next batch; false when none is ready (a prefetch will pump) or the trace has ended. */
  private advance(): boolean {
    if (this.spareCount === null) {
      this.waitingForBatch = true;
      return false;
    }
    if (this.spareCount === 0) {
      this.readingDone = true;
      return false;
    }
    const used = this.current;
    this.current = this.spare;
    this.spare = used;
    this.index = 0;
    this.prefetch();
    return true;
  }

  private readonly onTimer = (): void => {
    this.timer = null;
    this.pump();
  };

  /** Issue every record that may go now. */
  private pump(): void {
    if (this.finished) return;
    const timed = this.options.timed;
    const depth = this.options.queueDepth;
    for (;;) {
      if (this.index >= this.current.length) {
        if (!this.advance()) break;
        continue;
      }
      if (timed) {
        const dueMs = this.startMs + (this.current.timeNs[this.index] as number) * this.msPerTraceNs;
        const now = performance.now();
        if (dueMs > now) {
          if (this.timer === null) this.timer = setTimeout(this.onTimer, Math.ceil(dueMs - now));
          return;
        }
        if (this.inflight >= depth) {
          if (!this.headDelayed) {
            this.headDelayed = true;
            this.delayed++;
          }
          return;
        }
        const lateMs = now - dueMs;
        this.lateSumMs += lateMs;
        if (lateMs > this.lateMaxMs) this.lateMaxMs = lateMs;
        this.headDelayed = false;
        if (this.firstIssueMs < 0) this.firstIssueMs = dueMs;
      } else if (this.inflight >= depth) {
        return;
      }
      this.issue(this.index++);
    }
    if (this.readingDone && this.inflight === 0) this.finish();
  }

  private issue(index: number): void {
    const batch = this.current;
    const write = batch.write[index] === 1;
    mapRequest(
      this.plan,
      batch.device[index] as number,
      batch.offsetBytes[index] as number,
      batch.lengthBytes[index] as number,
      this.counters,
      this.mapped,
    );
    const offset = this.mapped.offsetBytes;
    const length = this.mapped.lengthBytes;
    assert(this.freeCount > 0, "a free slot below the queue depth");
    const slot = this.freeSlots[--this.freeCount] as number;
    this.inflight++;
    this.slotWrite[slot] = write ? 1 : 0;
    const client = this.clients[this.nextClient] as NbdClient;
    this.nextClient = this.nextClient + 1 === this.clients.length ? 0 : this.nextClient + 1;
    const now = performance.now();
    if (this.firstIssueMs < 0) this.firstIssueMs = now; // untimed; timed runs start at the first due time
    this.slotIssueMs[slot] = now;
    this.issued++;
    if (write) {
      this.writes++;
      this.writeBytes += length;
      const start = (Math.imul(this.writes, 0x9e3779b1) >>> 0) % this.poolStarts;
      const data = this.pool.subarray(start * 512, start * 512 + length);
      assert(data.length === length, "the write pool holds the largest write");
      client.write(offset, data, this.onComplete, slot);
    } else {
      this.reads++;
      this.readBytes += length;
      client.read(offset, length, null, this.onComplete, slot);
    }
  }

  private readonly onComplete = (error: VdiskError | null, slot: number): void => {
    if (this.finished) return;
    const now = performance.now();
    this.lastCompleteMs = now;
    const latencyNs = (now - (this.slotIssueMs[slot] as number)) * 1e6;
    this.histogram.record(latencyNs);
    if (this.slotWrite[slot] === 1) this.writeHistogram.record(latencyNs);
    else this.readHistogram.record(latencyNs);
    this.freeSlots[this.freeCount++] = slot;
    this.inflight--;
    this.completed++;
    if (error !== null) {
      for (const client of this.clients) {
        if (client.failure !== null) {
          this.fail(client.failure);
          return;
        }
      }
      this.errors++;
      this.firstError ??= error;
    }
    this.pump();
  };

  private finish(): void {
    if (this.finished) return;
    this.finished = true;
    assert(this.issued === this.summary.records, "every summarised record was replayed");
    assert(this.completed === this.issued, "every issued request completed");
    this.resolve();
  }

  private fail(err: unknown): void {
    if (this.finished) return;
    this.stop();
    this.reject(err);
  }

  report(): VmReport {
    const elapsedSeconds = this.firstIssueMs < 0 ? 0 : (this.lastCompleteMs - this.firstIssueMs) / 1000;
    const rate = (value: number): number => (elapsedSeconds > 0 ? value / elapsedSeconds : 0);
    const late = this.options.timed && this.issued > 0;
    return {
      vm: this.vm.name,
      disk: this.vm.disk,
      uri: formatNbdUri(this.vm.target),
      trace: this.vm.trace,
      format: this.summary.format,
      records: this.issued,
      reads: this.reads,
      writes: this.writes,
      readBytes: this.readBytes,
      writeBytes: this.writeBytes,
      errors: this.errors,
      firstError:
        this.firstError === null ? null : { code: this.firstError.code, message: this.firstError.message },
      elapsedSeconds,
      traceSpanSeconds: this.summary.spanNs / 1e9,
      iops: rate(this.issued),
      mbPerSecond: rate(this.readBytes + this.writeBytes) / 1e6,
      latency: latencyReport(this.histogram),
      readLatency: latencyReport(this.readHistogram),
      writeLatency: latencyReport(this.writeHistogram),
      delayed: this.delayed,
      issueLateMeanUs: late ? Math.round((this.lateSumMs / this.issued) * 1e6) / 1000 : 0,
      issueLateMaxUs: late ? Math.round(this.lateMaxMs * 1e6) / 1000 : 0,
      mapping: {
        diskBytes: this.plan.diskBytes,
        devices: this.summary.devices.length,
        strideBytes: this.plan.strideBytes,
        wrapped: this.counters.wrapped,
        clipped: this.counters.clipped,
        zeroLength: this.counters.zeroLength,
      },
    };
  }
}

/** Replay every VM's trace at once; resolves with the report. */
export async function runReplay(vms: readonly ReplayVm[], options: ReplayOptions): Promise<ReplayReport> {
  checkOptions(vms, options);
  const summaries: TraceSummary[] = [];
  for (const vm of vms) {
    const summary = await traceSummary(vm.trace, { format: vm.format, limit: options.limit });
    if (summary.records === 0) {
      throw new VdiskError("INVALID_ARGUMENT", `trace ${vm.trace} has no records`, {
        hint: "give a trace with at least one request line",
      });
    }
    summaries.push(summary);
  }

  const clients: NbdClient[] = [];
  const readers: TraceReader[] = [];
  const runs: VmRun[] = [];
  try {
    for (const [position, vm] of vms.entries()) {
      const summary = summaries[position] as TraceSummary;
      const own: NbdClient[] = [];
      for (let connection = 0; connection < options.connections; connection++) {
        const client = await NbdClient.connect(vm.target, { inflightMax: options.queueDepth });
        clients.push(client);
        own.push(client);
      }
      const first = own[0] as NbdClient;
      if (summary.writes > 0 && first.readOnly) {
        throw new VdiskError(
          "READ_ONLY",
          `trace ${vm.trace} has ${summary.writes} writes but export "${vm.target.exportName}" is read-only`,
          { hint: "replay it against a writable disk (a snapshot DISK@SNAP is read-only)" },
        );
      }
      const plan = planMapping(summary, first.size, {
        blockBytesMin: first.blockSizes.minimum,
        requestBytesMax: first.blockSizes.maximum,
      });
      const reader = await TraceReader.open(vm.trace, { format: summary.format, limit: options.limit });
      readers.push(reader);
      const run = new VmRun(vm, summary, own, plan, reader, options, options.seed + position);
      await run.prepare();
      runs.push(run);
    }
    const startMs = performance.now();
    try {
      await Promise.all(runs.map((run) => run.run(startMs)));
    } catch (err) {
      for (const run of runs) run.stop();
      throw err;
    }
    await Promise.all(clients.map((client) => client.close()));
  } finally {
    // After a clean close every client has failed ("closed"); after an error the rest are dropped here.
    for (const client of clients) if (client.failure === null) client.destroy();
    await Promise.all(readers.map((reader) => reader.close()));
  }
  return buildReport(runs, options);
}

function buildReport(runs: readonly VmRun[], options: ReplayOptions): ReplayReport {
  const vms = runs.map((run) => run.report());
  const merged = new Histogram();
  for (const run of runs) merged.merge(run.histogram);
  const sum = (pick: (vm: VmReport) => number): number => vms.reduce((total, vm) => total + pick(vm), 0);
  const starts = runs.map((run) => run.firstIssueMs).filter((ms) => ms >= 0);
  const ends = runs.map((run) => run.lastCompleteMs).filter((ms) => ms >= 0);
  const elapsedSeconds = starts.length === 0 ? 0 : (Math.max(...ends) - Math.min(...starts)) / 1000;
  const records = sum((vm) => vm.records);
  const bytes = sum((vm) => vm.readBytes + vm.writeBytes);
  return {
    mode: options.timed ? "timed" : "untimed",
    speed: options.timed ? options.speed : null,
    queueDepth: options.queueDepth,
    connections: options.connections,
    limit: options.limit,
    vms,
    total: {
      vms: vms.length,
      records,
      reads: sum((vm) => vm.reads),
      writes: sum((vm) => vm.writes),
      readBytes: sum((vm) => vm.readBytes),
      writeBytes: sum((vm) => vm.writeBytes),
      errors: sum((vm) => vm.errors),
      elapsedSeconds,
      iops: elapsedSeconds > 0 ? records / elapsedSeconds : 0,
      mbPerSecond: elapsedSeconds > 0 ? bytes / elapsedSeconds / 1e6 : 0,
      latency: latencyReport(merged),
      delayed: sum((vm) => vm.delayed),
      wrapped: sum((vm) => vm.mapping.wrapped),
    },
  };
}
