/**
 * StatsRecorder: per-request accounting of the NBD server, cheap enough to leave on.
 *
 * The server asks `recorder.monitor` for a RequestMonitor for every connection that enters transmission
 * (NbdServerOptions.monitor). Each connection's monitor owns one preallocated Float64Array holding, for
 * each op kind (types.ts `opKinds`), a row of STRIDE numbers:
 *
 *     [ops, bytes, errors, latencySecondsSum, bucket 0 .. bucket 15, bucket +Inf]
 *
 * `end()` adds to one row: a table lookup for the op, a linear scan of 16 bucket bounds, five additions —
 * no allocation (a failed request also bumps a Map entry keyed by its error code; errors are rare and the
 * keys are interned strings). The clock is `performance.now()`.
 *
 * Nothing is summed per disk on the hot path. A disk's totals are the totals of its closed connections
 * (folded into a per-disk row when a connection closes, so they survive disconnects) plus the rows of its
 * live connections, added up when someone samples (`activity()`). Exports DISK@SNAP count under DISK; the
 * client keeps its export name. Totals of a deleted disk are kept: a disk created again under the same
 * name continues them, so Prometheus counters never go backwards.
 *
 * In-flight counts are not pushed either: a sample reads each live connection's `inflight()`.
 *
 * Latency histogram buckets are per bucket (not cumulative): bucket i counts requests that took at most
 * latencyBucketsSeconds[i] and more than the bound before it; the last counts everything slower.
 */
import { performance } from "node:perf_hooks";
import { type ErrorCode, assert } from "../errors";
import type { ConnectionInfo, MonitorFactory, RequestMonitor } from "../protocol/nbd/connection";
import { Cmd } from "../protocol/nbd/constants";
import { type ClientStats, type OpCounters, type OpKind, latencyBucketsSeconds, opKinds } from "./types";

/** Row layout of the counter arrays. */
const OPS = 0;
const BYTES = 1;
const ERRORS = 2;
const LATENCY_SUM = 3;
const BUCKET0 = 4;
export const latencyBucketCount = latencyBucketsSeconds.length + 1;
const STRIDE = BUCKET0 + latencyBucketCount;
const ROW_VALUES = opKinds.length * STRIDE;

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
}

interface Totals {
  rows: Float64Array;
  errorsByCode: Map<string, number>;
}

function newTotals(): Totals {
  return { rows: new Float64Array(ROW_VALUES), errorsByCode: new Map() };
}

class ConnectionMonitor implements RequestMonitor {
  readonly rows = new Float64Array(ROW_VALUES);
  readonly errorsByCode = new Map<string, number>();
  readonly disk: string;
  readonly connectedMs: number;

  constructor(
    readonly info: ConnectionInfo,
    private readonly clock: () => number,
    private readonly onClose: (connection: ConnectionMonitor) => void,
    nowMs: number,
  ) {
    this.disk = diskOfExport(info.exportName);
    this.connectedMs = nowMs;
  }

  begin(): number {
    return this.clock();
  }

  end(command: number, bytes: number, error: ErrorCode | null, start: number): void {
    const latencyMs = this.clock() - start;
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
}

export class StatsRecorder {
  private readonly live = new Map<number, ConnectionMonitor>();
  /** Totals of closed connections, by disk. */
  private readonly closed = new Map<string, Totals>();
  private readonly clock: () => number;
  private readonly wallClock: () => number;

  /** For NbdServerOptions.monitor. */
  readonly monitor: MonitorFactory = (info) => {
    assert(!this.live.has(info.id), `connection ${info.id} monitored twice`);
    const connection = new ConnectionMonitor(info, this.clock, this.forget, this.wallClock());
    this.live.set(info.id, connection);
    return connection;
  };

  constructor(options: RecorderOptions = {}) {
    this.clock = options.clock ?? (() => performance.now());
    this.wallClock = options.wallClock ?? Date.now;
  }

  private readonly forget = (connection: ConnectionMonitor): void => {
    if (this.live.get(connection.info.id) !== connection) return;
    this.live.delete(connection.info.id);
    let totals = this.closed.get(connection.disk);
    if (!totals) this.closed.set(connection.disk, (totals = newTotals()));
    addRows(totals.rows, connection.rows);
    addCodes(totals.errorsByCode, connection.errorsByCode);
  };

  /** Live connections being recorded. */
  get connections(): number {
    return this.live.size;
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
      const sum = entry(connection.disk);
      const inflight = connection.info.inflight();
      addRows(sum.rows, connection.rows);
      addCodes(sum.errorsByCode, connection.errorsByCode);
      sum.inflight += inflight;
      sum.clients.push({
        id: connection.info.id,
        export: connection.info.exportName,
        peer: connection.info.peer,
        connectedMs: connection.connectedMs,
        inflight,
        ops: opCounters(connection.rows),
      });
    }
    const result = new Map<string, DiskActivity>();
    for (const [disk, sum] of sums) {
      sum.clients.sort((a, b) => a.id - b.id);
      result.set(disk, {
        ops: opCounters(sum.rows),
        errorsByCode: Object.fromEntries([...sum.errorsByCode].sort(([a], [b]) => a.localeCompare(b))),
        inflight: sum.inflight,
        clients: sum.clients,
      });
    }
    return result;
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

function opCounters(rows: Float64Array): Record<OpKind, OpCounters> {
  const result = {} as Record<OpKind, OpCounters>;
  opKinds.forEach((kind, op) => {
    const row = op * STRIDE;
    result[kind] = {
      ops: rows[row + OPS] as number,
      bytes: rows[row + BYTES] as number,
      errors: rows[row + ERRORS] as number,
      latencySecondsSum: rows[row + LATENCY_SUM] as number,
      latencyBuckets: Array.from(rows.subarray(row + BUCKET0, row + STRIDE)),
    };
  });
  return result;
}
