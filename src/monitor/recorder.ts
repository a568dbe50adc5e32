/**
 * StatsRecorder: per-request accounting of the NBD server, cheap enough to leave on.
 *
 * The server asks `recorder.monitor` for a RequestMonitor for every connection that enters transmission
 * (NbdServerOptions.monitor). The connection calls `begin(command, offset, length)` when it dispatches a
 * request and `end(...)` once when its reply is queued. Two kinds of figures:
 *
 * Op rows (at `end`): each connection's monitor owns one preallocated Float64Array holding, for each op
 * kind (types.ts `opKinds`), a row of STRIDE numbers:
 *
 *     [ops, bytes, errors, latencySecondsSum, bucket 0 .. bucket 15, bucket +Inf]
 *
 * `end()` adds to one row: a table lookup for the op, a linear scan of 16 bucket bounds, five additions
 * (a failed request also bumps a Map entry keyed by its error code; errors are rare and the keys are
 * interned strings). Nothing is summed per disk here: a disk's rows are the rows of its closed
 * connections (folded in when a connection closes, so they survive disconnects) plus those of its live
 * connections, added up when someone samples (`activity()`).
 *
 * Activity (at `begin`, see types.ts ActivityStats): another preallocated Float64Array per connection and
 * one per disk (DiskState, kept for the daemon's life, so its totals survive disconnects too), laid out as
 *
 *     [read sizes ×18, write sizes ×18, read size sum, write size sum, pattern ×8,
 *      inter-arrival buckets ×26, inter-arrival sum (s), intervals, queue-depth buckets ×12, depth sum,
 *      arrivals, depth max]
 *
 * where pattern is indexed by the profile class of heat.ts (read/write × sequential/random × small/large).
 * The client's array gets its own inter-arrival times and depths; the disk's gets the disk's (time since
 * the previous request of any of its clients; all of its clients' requests in flight), and the same
 * sizes and patterns as its clients. Every bucket lookup is one Math.clz32 (histograms.ts); a read or
 * write also adds to the disk's DiskHeat (one Math.pow, one add per extent touched). No allocation.
 *
 * Queue depth is counted by the monitor itself: begun and not yet ended requests, the arriving one
 * included (the connection calls begin/end exactly once per request; DISC has neither). In-flight counts
 * shown in the stats are still read from the connections when sampling.
 *
 * Exports DISK@SNAP count under DISK; the client keeps its export name (without the tag) and its tag.
 * Totals of a deleted disk are kept: a disk created again under the same name continues them, so
 * Prometheus counters never go backwards; its heat map is dropped (`retainHeat`).
 *
 * Latency histogram buckets are per bucket (not cumulative): bucket i counts requests that took at most
 * latencyBucketsSeconds[i] and more than the bound before it; the last counts everything slower.
 *
 * Memory: per connection (7 × 21 + 89) × 8 B ≈ 1.9 KiB; per disk 89 × 8 B plus its heat map (≤ 512 KiB,
 * heat.ts). `memoryBytes()` reports the sum.
 */
import { performance } from "node:perf_hooks";
import { type ErrorCode, assert } from "../errors";
import { heatHalfLifeSecondsDefault, profileSmallBytesMax } from "../limits";
import type { ConnectionInfo, MonitorFactory, RequestMonitor } from "../protocol/nbd/connection";
import { Cmd } from "../protocol/nbd/constants";
import { DiskHeat, type DiskHeatView, PROFILE_LARGE, PROFILE_RANDOM, PROFILE_WRITE } from "./heat";
import {
  interArrivalBucketCount,
  interArrivalBucketOf,
  quantileOf,
  queueDepthBucketCount,
  queueDepthBucketOf,
  sizeBucketCount,
  sizeBucketOf,
} from "./histograms";
import {
  type ActivityStats,
  type ClientStats,
  type HeatStats,
  type LatencyPercentiles,
  type OpCounters,
  type OpKind,
  type ProfileStats,
  latencyBucketsSeconds,
  opKinds,
} from "./types";

/** Row layout of the counter arrays. */
const OPS = 0;
const BYTES = 1;
const ERRORS = 2;
const LATENCY_SUM = 3;
const BUCKET0 = 4;
export const latencyBucketCount = latencyBucketsSeconds.length + 1;
const STRIDE = BUCKET0 + latencyBucketCount;
const ROW_VALUES = opKinds.length * STRIDE;

/** Layout of the activity arrays (see the module note). */
const SIZE_READ = 0;
const SIZE_WRITE = SIZE_READ + sizeBucketCount;
const SIZE_SUM = SIZE_WRITE + sizeBucketCount; // + 0 read, + 1 write
const PATTERN = SIZE_SUM + 2; // + profile class
const IA_BUCKET0 = PATTERN + 8;
const IA_SUM = IA_BUCKET0 + interArrivalBucketCount;
const IA_COUNT = IA_SUM + 1;
const QD_BUCKET0 = IA_COUNT + 1;
const QD_SUM = QD_BUCKET0 + queueDepthBucketCount;
const QD_COUNT = QD_SUM + 1;
const QD_MAX = QD_COUNT + 1;
export const ACTIVITY_VALUES = QD_MAX + 1;

const bucketBoundsMs = Float64Array.from(latencyBucketsSeconds, (seconds) => seconds * 1000);

/** Op kind index (into opKinds) of each NBD command; -1 for commands that are not counted (DISC). */
const opOfCommand = new Int8Array(8).fill(-1);
opOfCommand[Cmd.READ] = opKinds.indexOf("read");
opOfCommand[Cmd.WRITE] = opKinds.indexOf("write");
opOfCommand[Cmd.WRITE_ZEROES] = opKinds.indexOf("zero");
opOfCommand[Cmd.TRIM] = opKinds.indexOf("trim");
opOfCommand[Cmd.FLUSH] = opKinds.indexOf("flush");
opOfCommand[Cmd.CACHE] = opKinds.indexOf("cache");
opOfCommand[Cmd.BLOCK_STATUS] = opKinds.indexOf("blockStatus");
assert(
  opOfCommand.every((op, command) => op >= 0 || command === Cmd.DISC),
  "every command has an op kind",
);

/** 1 for the commands whose offset and length are a range of the disk (all but FLUSH and DISC). */
const hasRange = new Uint8Array(8);
for (const command of [Cmd.READ, Cmd.WRITE, Cmd.WRITE_ZEROES, Cmd.TRIM, Cmd.CACHE, Cmd.BLOCK_STATUS]) {
  hasRange[command] = 1;
}

/** The bucket a latency falls in (the last one is +Inf). */
export function latencyBucketOf(latencyMs: number): number {
  const bounds = bucketBoundsMs;
  for (let i = 0; i < bounds.length; i++) if (latencyMs <= (bounds[i] as number)) return i;
  return bounds.length;
}

/** The disk an export counts under: DISK for DISK and for DISK@SNAP. */
export function diskOfExport(exportName: string): string {
  const at = exportName.indexOf("@");
  return at < 0 ? exportName : exportName.slice(0, at);
}

/** What a sample tells about one disk. */
export interface DiskActivity {
  ops: Record<OpKind, OpCounters>;
  errorsByCode: Record<string, number>;
  inflight: number;
  clients: ClientStats[];
  activity: ActivityStats;
}

interface Totals {
  rows: Float64Array;
  errorsByCode: Map<string, number>;
}

function newTotals(): Totals {
  return { rows: new Float64Array(ROW_VALUES), errorsByCode: new Map() };
}

/** What the recorder keeps per disk for the daemon's life (its heat map until the disk goes away). */
class DiskState {
  readonly activity = new Float64Array(ACTIVITY_VALUES);
  heat: DiskHeat | null = null;
  /** Requests of all its clients begun and not ended. */
  outstanding = 0;
  lastArrivalMs = -1;
  /** Live connections. */
  connections = 0;
}

/** Adds one arrival's inter-arrival time (if any) and queue depth to an activity array. */
function recordArrival(values: Float64Array, intervalMs: number, depth: number): void {
  if (intervalMs >= 0) {
    values[IA_BUCKET0 + interArrivalBucketOf(intervalMs)] += 1;
    values[IA_SUM] += intervalMs / 1000;
    values[IA_COUNT] += 1;
  }
  values[QD_BUCKET0 + queueDepthBucketOf(depth)] += 1;
  values[QD_SUM] += depth;
  values[QD_COUNT] += 1;
  if (depth > (values[QD_MAX] as number)) values[QD_MAX] = depth;
}

class ConnectionMonitor implements RequestMonitor {
  readonly rows = new Float64Array(ROW_VALUES);
  readonly activity = new Float64Array(ACTIVITY_VALUES);
  readonly errorsByCode = new Map<string, number>();
  readonly diskName: string;
  readonly connectedMs: number;
  /** Requests begun and not ended. */
  outstanding = 0;
  /** Where the previous request with a range ended; -1 before the first. */
  private position = -1;
  private lastArrivalMs = -1;

  constructor(
    readonly info: ConnectionInfo,
    readonly disk: DiskState,
    private readonly clock: () => number,
    private readonly onClose: (connection: ConnectionMonitor) => void,
    nowMs: number,
  ) {
    this.diskName = diskOfExport(info.exportName);
    this.connectedMs = nowMs;
  }

  begin(command: number, offset: number, length: number): number {
    const now = this.clock();
    const disk = this.disk;
    const client = this.activity;
    const shared = disk.activity;
    recordArrival(client, this.lastArrivalMs < 0 ? -1 : now - this.lastArrivalMs, ++this.outstanding);
    recordArrival(shared, disk.lastArrivalMs < 0 ? -1 : now - disk.lastArrivalMs, ++disk.outstanding);
    this.lastArrivalMs = now;
    disk.lastArrivalMs = now;
    if (command === Cmd.READ || command === Cmd.WRITE) {
      const write = command === Cmd.WRITE ? 1 : 0;
      const profileClass =
        write * PROFILE_WRITE +
        (offset === this.position ? 0 : PROFILE_RANDOM) +
        (length > profileSmallBytesMax ? PROFILE_LARGE : 0);
      const size = (write === 1 ? SIZE_WRITE : SIZE_READ) + sizeBucketOf(length);
      client[size] += 1;
      shared[size] += 1;
      client[SIZE_SUM + write] += length;
      shared[SIZE_SUM + write] += length;
      client[PATTERN + profileClass] += 1;
      shared[PATTERN + profileClass] += 1;
      const heat = disk.heat as DiskHeat;
      if (offset + length > heat.coverageBytes) heat.grow(this.info.sizeBytes());
      heat.record(offset, length, profileClass, now);
    }
    if (command < hasRange.length && hasRange[command] === 1) this.position = offset + length;
    return now;
  }

  end(command: number, bytes: number, error: ErrorCode | null, start: number): void {
    const latencyMs = this.clock() - start;
    this.outstanding--;
    this.disk.outstanding--;
    if (error !== null) this.errorsByCode.set(error, (this.errorsByCode.get(error) ?? 0) + 1);
    const op = command < opOfCommand.length ? (opOfCommand[command] as number) : -1;
    if (op < 0) return; // an unknown command: counted by its error code only
    const rows = this.rows;
    const row = op * STRIDE;
    rows[row + OPS] += 1;
    rows[row + BYTES] += bytes;
    if (error !== null) rows[row + ERRORS] += 1;
    rows[row + LATENCY_SUM] += latencyMs / 1000;
    rows[row + BUCKET0 + latencyBucketOf(latencyMs)] += 1;
  }

  close(): void {
    this.onClose(this);
  }
}

export interface RecorderOptions {
  /** Milliseconds, any origin (default performance.now). Injected by tests. */
  clock?: () => number;
  /** Wall clock for `connectedMs` (default Date.now). */
  wallClock?: () => number;
  /** Half-life of extent heat and of the profile (default limits.heatHalfLifeSecondsDefault). */
  heatHalfLifeSeconds?: number;
  /** False: the daemon records nothing (`vdisk serve --monitor off`); the factory must not be used. */
  enabled?: boolean;
}

export class StatsRecorder {
  private readonly live = new Map<number, ConnectionMonitor>();
  /** Totals of closed connections, by disk. */
  private readonly closed = new Map<string, Totals>();
  private readonly disks = new Map<string, DiskState>();
  private readonly clock: () => number;
  private readonly wallClock: () => number;
  readonly heatHalfLifeSeconds: number;
  readonly enabled: boolean;

  /** For NbdServerOptions.monitor. */
  readonly monitor: MonitorFactory = (info) => {
    assert(this.enabled, "the monitor is off: the server must not be given the factory");
    assert(!this.live.has(info.id), `connection ${info.id} monitored twice`);
    const now = this.clock();
    const diskName = diskOfExport(info.exportName);
    let disk = this.disks.get(diskName);
    if (!disk) this.disks.set(diskName, (disk = new DiskState()));
    const sizeBytes = info.sizeBytes();
    if (disk.heat === null) disk.heat = new DiskHeat(sizeBytes, this.heatHalfLifeSeconds, now);
    else disk.heat.grow(sizeBytes);
    disk.connections += 1;
    const connection = new ConnectionMonitor(info, disk, this.clock, this.forget, this.wallClock());
    this.live.set(info.id, connection);
    return connection;
  };

  constructor(options: RecorderOptions = {}) {
    this.clock = options.clock ?? (() => performance.now());
    this.wallClock = options.wallClock ?? Date.now;
    this.heatHalfLifeSeconds = options.heatHalfLifeSeconds ?? heatHalfLifeSecondsDefault;
    this.enabled = options.enabled ?? true;
  }

  private readonly forget = (connection: ConnectionMonitor): void => {
    if (this.live.get(connection.info.id) !== connection) return;
    this.live.delete(connection.info.id);
    const disk = connection.disk;
    disk.outstanding -= connection.outstanding; // requests that will never be answered
    disk.connections -= 1;
    assert(disk.outstanding >= 0 && disk.connections >= 0, "disk counts stay non-negative");
    let totals = this.closed.get(connection.diskName);
    if (!totals) this.closed.set(connection.diskName, (totals = newTotals()));
    addRows(totals.rows, connection.rows);
    addCodes(totals.errorsByCode, connection.errorsByCode);
  };

  /** Live connections being recorded. */
  get connections(): number {
    return this.live.size;
  }

  /** Bytes of typed arrays held (connections, closed totals, disks and their heat maps). */
  memoryBytes(): number {
    let bytes = 0;
    for (const connection of this.live.values())
      bytes += connection.rows.byteLength + connection.activity.byteLength;
    for (const totals of this.closed.values()) bytes += totals.rows.byteLength;
    for (const disk of this.disks.values()) bytes += disk.activity.byteLength + (disk.heat?.memoryBytes ?? 0);
    return bytes;
  }

  /** Every disk that has had a client, with its totals, in-flight requests and live clients. */
  activity(): Map<string, DiskActivity> {
    const sums = new Map<string, Totals & { inflight: number; clients: ClientStats[] }>();
    const entry = (disk: string): Totals & { inflight: number; clients: ClientStats[] } => {
      let found = sums.get(disk);
      if (!found) {
        const closed = this.closed.get(disk);
        found = {
          rows: closed ? Float64Array.from(closed.rows) : new Float64Array(ROW_VALUES),
          errorsByCode: new Map(closed?.errorsByCode ?? []),
          inflight: 0,
          clients: [],
        };
        sums.set(disk, found);
      }
      return found;
    };
    for (const disk of this.closed.keys()) entry(disk);
    for (const connection of this.live.values()) {
      const sum = entry(connection.diskName);
      const inflight = connection.info.inflight();
      addRows(sum.rows, connection.rows);
      addCodes(sum.errorsByCode, connection.errorsByCode);
      sum.inflight += inflight;
      sum.clients.push({
        id: connection.info.id,
        export: connection.info.exportName,
        tag: connection.info.tag,
        peer: connection.info.peer,
        connectedMs: connection.connectedMs,
        inflight,
        ops: opCounters(connection.rows),
        activity: activityStats(connection.activity),
      });
    }
    const result = new Map<string, DiskActivity>();
    for (const [disk, sum] of sums) {
      sum.clients.sort((a, b) => a.id - b.id);
      const state = this.disks.get(disk);
      result.set(disk, {
        ops: opCounters(sum.rows),
        errorsByCode: Object.fromEntries([...sum.errorsByCode].sort(([a], [b]) => a.localeCompare(b))),
        inflight: sum.inflight,
        clients: sum.clients,
        activity: activityStats(state ? state.activity : new Float64Array(ACTIVITY_VALUES)),
      });
    }
    return result;
  }

  // ---- For placement and the stats: heat and profile ---------------------------------------------------

  /** A disk's heat map and profile, read on the recorder's clock; null if it never had a client. */
  heat(disk: string): DiskHeatView | null {
    const heat = this.disks.get(disk)?.heat ?? null;
    if (heat === null) return null;
    const clock = this.clock;
    return {
      get extentBytes() {
        return heat.extentBytes;
      },
      get extentCount() {
        return heat.extentCount;
      },
      get recorded() {
        return heat.recorded;
      },
      halfLifeSeconds: heat.halfLifeSeconds,
      hottest: (count) => heat.hottest(count, clock()),
      rangeHeat: (offset, length) => heat.rangeHeat(offset, length, clock()),
      total: () => heat.total(clock()),
      profile: () => heat.profile(clock()),
    };
  }

  /** The heat figures of the stats: the `top` hottest extents. */
  heatStats(disk: string, top: number): HeatStats | null {
    const heat = this.disks.get(disk)?.heat ?? null;
    if (heat === null) return null;
    const now = this.clock();
    return {
      extentBytes: heat.extentBytes,
      extents: heat.extentCount,
      halfLifeSeconds: heat.halfLifeSeconds,
      total: heat.total(now),
      top: heat.hottest(top, now),
    };
  }

  profile(disk: string): ProfileStats | null {
    const heat = this.disks.get(disk)?.heat ?? null;
    return heat === null ? null : heat.profile(this.clock());
  }

  /** Drops the heat maps of disks that are not in `names` and have no client (deleted disks). */
  retainHeat(names: ReadonlySet<string>): void {
    for (const [name, disk] of this.disks) {
      if (disk.heat !== null && disk.connections === 0 && !names.has(name)) disk.heat = null;
    }
  }
}

function addRows(target: Float64Array, source: Float64Array): void {
  for (let i = 0; i < target.length; i++) target[i] = (target[i] as number) + (source[i] as number);
}

function addCodes(target: Map<string, number>, source: Map<string, number>): void {
  for (const [code, count] of source) target.set(code, (target.get(code) ?? 0) + count);
}

/** Zeroed counters for every op kind (disks without clients yet). */
export function emptyOpCounters(): Record<OpKind, OpCounters> {
  return opCounters(new Float64Array(ROW_VALUES));
}

/** Zeroed activity (disks without clients yet). */
export function emptyActivity(): ActivityStats {
  return activityStats(new Float64Array(ACTIVITY_VALUES));
}

/** p50, p90, p99 and p99.9 of a per-bucket latency histogram (seconds; null when empty). */
export function latencyPercentiles(buckets: ArrayLike<number>): LatencyPercentiles {
  return {
    p50: quantileOf(buckets, latencyBucketsSeconds, 0.5),
    p90: quantileOf(buckets, latencyBucketsSeconds, 0.9),
    p99: quantileOf(buckets, latencyBucketsSeconds, 0.99),
    p999: quantileOf(buckets, latencyBucketsSeconds, 0.999),
  };
}

function opCounters(rows: Float64Array): Record<OpKind, OpCounters> {
  const result = {} as Record<OpKind, OpCounters>;
  opKinds.forEach((kind, op) => {
    const row = op * STRIDE;
    const latencyBuckets = Array.from(rows.subarray(row + BUCKET0, row + STRIDE));
    result[kind] = {
      ops: rows[row + OPS] as number,
      bytes: rows[row + BYTES] as number,
      errors: rows[row + ERRORS] as number,
      latencySecondsSum: rows[row + LATENCY_SUM] as number,
      latencyBuckets,
      latencyPercentilesSeconds: latencyPercentiles(latencyBuckets),
    };
  });
  return result;
}

function activityStats(values: Float64Array): ActivityStats {
  const at = (index: number): number => values[index] as number;
  const pattern = (write: number, random: number, large: number): number =>
    at(PATTERN + write * PROFILE_WRITE + random * PROFILE_RANDOM + large * PROFILE_LARGE);
  const both = (f: (write: number) => number): { read: number; write: number } => ({
    read: f(0),
    write: f(1),
  });
  const intervals = at(IA_COUNT);
  const arrivals = at(QD_COUNT);
  return {
    sizeBuckets: {
      read: Array.from(values.subarray(SIZE_READ, SIZE_READ + sizeBucketCount)),
      write: Array.from(values.subarray(SIZE_WRITE, SIZE_WRITE + sizeBucketCount)),
    },
    sizeBytesSum: both((write) => at(SIZE_SUM + write)),
    sequential: both((write) => pattern(write, 0, 0) + pattern(write, 0, 1)),
    random: both((write) => pattern(write, 1, 0) + pattern(write, 1, 1)),
    sequentialSmall: both((write) => pattern(write, 0, 0)),
    randomSmall: both((write) => pattern(write, 1, 0)),
    interArrival: {
      count: intervals,
      meanSeconds: intervals > 0 ? at(IA_SUM) / intervals : null,
      secondsSum: at(IA_SUM),
      buckets: Array.from(values.subarray(IA_BUCKET0, IA_BUCKET0 + interArrivalBucketCount)),
    },
    queueDepth: {
      count: arrivals,
      mean: arrivals > 0 ? at(QD_SUM) / arrivals : null,
      sum: at(QD_SUM),
      max: at(QD_MAX),
      buckets: Array.from(values.subarray(QD_BUCKET0, QD_BUCKET0 + queueDepthBucketCount)),
    },
  };
}
