/**
 * `vdisk top`: a live view of the daemon's disks and their clients, refreshed every interval (1 s).
 *
 * Every interval it takes a StatsSnapshot (GET /v1/stats) and turns the difference with the previous one
 * into rates (`computeRows`): read/write IOPS and MB/s, p50/p99 latency estimated from the latency
 * histogram's bucket deltas (linear inside a bucket, as Prometheus' histogram_quantile does), the queue
 * depth and the share of data on the fast class ("-" until tiering exists). The queue depth is the average
 * number of requests in flight over the interval — the latency seconds the interval's requests spent,
 * divided by its length (Little's law) — because the daemon answers a sample between requests, when the
 * instantaneous count is mostly 0; rows also carry that instantaneous count (`inflight`). One
 * row per disk, its clients under it; rows sorted by the chosen column, busiest (total IOPS) first.
 *
 * The screen is drawn with plain ANSI escapes (works over SSH, no curses): alternate screen, cursor
 * hidden, one frame per interval that fits the terminal (80×24 and up: rows that do not fit are counted
 * in the footer, names are ellipsized). Keys: `s` next sort column, `r` reverse, `q` or Ctrl-C quit. The
 * terminal is restored on every way out (q, Ctrl-C, SIGINT/SIGTERM/SIGHUP, an exception).
 *
 * `--once` takes two samples `--interval` apart and prints one frame; with `--json` it prints
 * `{timeMs, intervalSeconds, rows, stats}` where `stats` is the second snapshot.
 */
import { VdiskError } from "../errors";
import {
  latencyBucketsSeconds,
  opKinds,
  type OpCounters,
  type OpKind,
  type StatsSnapshot,
} from "../monitor/types";
import type { ApiClient } from "./client";

/** One line of `vdisk top`: a disk, or one client of the disk above it. */
export interface TopRow {
  kind: "disk" | "client";
  disk: string;
  /** Clients: connection id, export (DISK or DISK@SNAP), tag (or null) and peer ("unix", "tcp HOST:PORT"). */
  client: number | null;
  export: string | null;
  tag: string | null;
  peer: string | null;
  readIops: number;
  /** Writes, write-zeroes and trims per second. */
  writeIops: number;
  /** Every request kind per second (flush, cache and block status too). */
  totalIops: number;
  readBytesPerSecond: number;
  writeBytesPerSecond: number;
  /** Estimated from the interval's latency histogram; null without requests in the interval. */
  p50Seconds: number | null;
  p99Seconds: number | null;
  /** Average requests in flight over the interval (latency seconds spent / interval seconds). */
  queueDepth: number;
  /** Requests in flight at the second sample. */
  inflight: number;
  /** Share of the disk's data on the fast device class; null until tiering exists. */
  fastShare: number | null;
  /** Totals since the daemon started (disks) or the client connected (clients), at the second sample. */
  totals: {
    ops: number;
    readOps: number;
    writeOps: number;
    readBytes: number;
    writeBytes: number;
    errors: number;
  };
}

export interface TopJson {
  timeMs: number;
  intervalSeconds: number;
  rows: TopRow[];
  stats: StatsSnapshot;
}

const writeKinds: OpKind[] = ["write", "zero", "trim"];

type Ops = Record<OpKind, OpCounters>;

function sumOps(ops: Ops, kinds: readonly OpKind[], field: "ops" | "bytes" | "errors"): number {
  let total = 0;
  for (const kind of kinds) total += ops[kind][field];
  return total;
}

/** Histogram bucket counts over every op kind. */
function mergedBuckets(ops: Ops): number[] {
  const merged = new Array<number>(latencyBucketsSeconds.length + 1).fill(0);
  for (const kind of opKinds) {
    ops[kind].latencyBuckets.forEach((count, index) => (merged[index] = (merged[index] ?? 0) + count));
  }
  return merged;
}

/** The q-quantile of a (per-bucket) latency histogram, or null when it is empty. */
export function quantileSeconds(buckets: readonly number[], q: number): number | null {
  const total = buckets.reduce((sum, count) => sum + count, 0);
  if (total <= 0) return null;
  const rank = q * total;
  let before = 0;
  for (let index = 0; index < buckets.length; index++) {
    const count = buckets[index] as number;
    if (count > 0 && before + count >= rank) {
      const upper = latencyBucketsSeconds[index];
      const lower = index === 0 ? 0 : (latencyBucketsSeconds[index - 1] as number);
      if (upper === undefined) return lower; // the +Inf bucket: its lower bound is all we know
      return lower + ((upper - lower) * (rank - before)) / count;
    }
    before += count;
  }
  return latencyBucketsSeconds[latencyBucketsSeconds.length - 1] as number;
}

function rowOf(
  kind: "disk" | "client",
  disk: string,
  later: Ops,
  earlier: Ops | null,
  seconds: number,
  inflight: number,
): Omit<TopRow, "client" | "export" | "tag" | "peer"> {
  const delta = (kinds: readonly OpKind[], field: "ops" | "bytes"): number =>
    Math.max(0, sumOps(later, kinds, field) - (earlier ? sumOps(earlier, kinds, field) : 0));
  const laterBuckets = mergedBuckets(later);
  const earlierBuckets = earlier ? mergedBuckets(earlier) : null;
  const buckets = laterBuckets.map((count, index) => Math.max(0, count - (earlierBuckets?.[index] ?? 0)));
  const latencySeconds = (ops: Ops): number =>
    opKinds.reduce((sum, kind) => sum + ops[kind].latencySecondsSum, 0);
  const busySeconds = Math.max(0, latencySeconds(later) - (earlier ? latencySeconds(earlier) : 0));
  return {
    kind,
    disk,
    readIops: delta(["read"], "ops") / seconds,
    writeIops: delta(writeKinds, "ops") / seconds,
    totalIops: delta(opKinds, "ops") / seconds,
    readBytesPerSecond: delta(["read"], "bytes") / seconds,
    writeBytesPerSecond: delta(["write"], "bytes") / seconds,
    p50Seconds: quantileSeconds(buckets, 0.5),
    p99Seconds: quantileSeconds(buckets, 0.99),
    queueDepth: busySeconds / seconds,
    inflight,
    fastShare: null,
    totals: {
      ops: sumOps(later, opKinds, "ops"),
      readOps: later.read.ops,
      writeOps: sumOps(later, writeKinds, "ops"),
      readBytes: later.read.bytes,
      writeBytes: later.write.bytes,
      errors: sumOps(later, opKinds, "errors"),
    },
  };
}

export const sortKeys = ["iops", "read", "write", "readMB", "writeMB", "p99", "qd", "name"] as const;
export type SortKey = (typeof sortKeys)[number];
const sortTitles: Record<SortKey, string> = {
  iops: "total IOPS",
  read: "R-IOPS",
  write: "W-IOPS",
  readMB: "R-MB/s",
  writeMB: "W-MB/s",
  p99: "P99",
  qd: "QD",
  name: "NAME",
};

function sortValue(row: TopRow, key: SortKey): number | string {
  switch (key) {
    case "iops":
      return row.totalIops;
    case "read":
      return row.readIops;
    case "write":
      return row.writeIops;
    case "readMB":
      return row.readBytesPerSecond;
    case "writeMB":
      return row.writeBytesPerSecond;
    case "p99":
      return row.p99Seconds ?? -1;
    case "qd":
      return row.queueDepth;
    case "name":
      return row.kind === "disk" ? row.disk : (row.client ?? 0);
  }
}

/** Busiest first (names: A→Z); `reverse` flips it; ties by name / client id. */
function compareRows(key: SortKey, reverse: boolean): (a: TopRow, b: TopRow) => number {
  return (a, b) => {
    const x = sortValue(a, key);
    const y = sortValue(b, key);
    let order: number;
    if (typeof x === "string" && typeof y === "string") order = x.localeCompare(y);
    else if (typeof x === "number" && typeof y === "number") order = key === "name" ? x - y : y - x;
    else order = 0;
    if (reverse) order = -order;
    if (order !== 0) return order;
    return a.disk.localeCompare(b.disk) || (a.client ?? 0) - (b.client ?? 0);
  };
}

/**
 * The rows between two snapshots: one per disk of `later`, each followed by its clients, sorted by `key`.
 * Disks and clients absent from `earlier` count from zero; a daemon restarted in between (uptime went
 * down) makes `earlier` count as empty.
 */
export function computeRows(
  earlier: StatsSnapshot,
  later: StatsSnapshot,
  key: SortKey = "iops",
  reverse = false,
): TopRow[] {
  const seconds = Math.max((later.timeMs - earlier.timeMs) / 1000, 0.001);
  const restarted = later.uptimeSeconds < earlier.uptimeSeconds;
  const earlierDisks = new Map(restarted ? [] : earlier.disks.map((disk) => [disk.name, disk]));
  const compare = compareRows(key, reverse);
  const groups = later.disks.map((disk) => {
    const before = earlierDisks.get(disk.name);
    const row: TopRow = {
      ...rowOf("disk", disk.name, disk.ops, before?.ops ?? null, seconds, disk.inflight),
      client: null,
      export: null,
      tag: null,
      peer: null,
    };
    const earlierClients = new Map((before?.clients ?? []).map((client) => [client.id, client]));
    const clients = disk.clients
      .map((client): TopRow => ({
        ...rowOf(
          "client",
          disk.name,
          client.ops,
          earlierClients.get(client.id)?.ops ?? null,
          seconds,
          client.inflight,
        ),
        client: client.id,
        export: client.export,
        tag: client.tag ?? null,
        peer: client.peer,
      }))
      .sort(compare);
    return { row, clients };
  });
  groups.sort((a, b) => compare(a.row, b.row));
  return groups.flatMap((group) => [group.row, ...group.clients]);
}

// ---- Rendering -----------------------------------------------------------------------------------------

export function formatIops(value: number): string {
  if (value < 9999.5) return String(Math.round(value));
  if (value < 999_950) return `${(value / 1000).toFixed(1)}k`;
  return `${(value / 1e6).toFixed(1)}M`;
}

export function formatMBps(bytesPerSecond: number): string {
  const mb = bytesPerSecond / 1e6;
  if (mb < 999.95) return mb.toFixed(1);
  return String(Math.round(mb));
}

export function formatLatency(seconds: number | null): string {
  if (seconds === null) return "-";
  const micros = seconds * 1e6;
  if (micros < 999.5) return `${Math.round(micros)}us`;
  const millis = seconds * 1e3;
  if (millis < 9.995) return `${millis.toFixed(2)}ms`;
  if (millis < 99.95) return `${millis.toFixed(1)}ms`;
  if (millis < 999.5) return `${Math.round(millis)}ms`;
  return `${seconds.toFixed(2)}s`;
}

export function formatQueueDepth(depth: number): string {
  if (depth >= 0.05 && depth < 0.95) return depth.toFixed(1).replace(/^0/, "");
  return String(Math.round(depth));
}

/** `text` cut to `width` columns, with an ellipsis when cut. */
export function ellipsize(text: string, width: number): string {
  if (text.length <= width) return text;
  if (width <= 1) return text.slice(0, width);
  return `${text.slice(0, width - 1)}…`;
}

interface Column {
  title: string;
  width: number;
  key: SortKey | null;
  cell(row: TopRow): string;
}

const nameWidthMin = 12;
const columns: Column[] = [
  { title: "R-IOPS", width: 7, key: "read", cell: (row) => formatIops(row.readIops) },
  { title: "W-IOPS", width: 7, key: "write", cell: (row) => formatIops(row.writeIops) },
  { title: "R-MB/s", width: 7, key: "readMB", cell: (row) => formatMBps(row.readBytesPerSecond) },
  { title: "W-MB/s", width: 7, key: "writeMB", cell: (row) => formatMBps(row.writeBytesPerSecond) },
  { title: "P50", width: 7, key: null, cell: (row) => formatLatency(row.p50Seconds) },
  { title: "P99", width: 7, key: "p99", cell: (row) => formatLatency(row.p99Seconds) },
  { title: "QD", width: 4, key: "qd", cell: (row) => formatQueueDepth(row.queueDepth) },
  {
    title: "FAST",
    width: 5,
    key: null,
    cell: (row) => (row.fastShare === null ? "-" : `${Math.round(row.fastShare * 100)}%`),
  },
];

function rowName(row: TopRow): string {
  if (row.kind === "disk") return row.disk;
  const snapshot =
    row.export !== null && row.export !== row.disk ? ` ${row.export.slice(row.disk.length)}` : "";
  const peer = (row.peer ?? "").replace(/^tcp /, "");
  const tag = row.tag !== null ? ` ${row.tag}` : "";
  return `  #${row.client}${tag}${snapshot} ${peer}`;
}

export interface FrameOptions {
  /** Terminal size; lines are kept shorter than `width` (no wrap in the last column). */
  width: number;
  /** Lines available; null = as many as needed (--once). */
  height: number | null;
  sort: SortKey;
  reverse: boolean;
  /** A problem to show in place of the rows' footer (the daemon went away, ...). */
  problem?: string | null;
}

/** One screen: a title, the column header, the rows that fit, a footer with the keys. */
export function renderFrame(rows: TopRow[], stats: StatsSnapshot | null, options: FrameOptions): string[] {
  const width = Math.max(options.width - 1, 40);
  const fixed = columns.reduce((sum, column) => sum + column.width + 1, 0);
  const nameWidth = Math.max(nameWidthMin, width - fixed);
  const line = (name: string, cells: string[]): string =>
    ellipsize(
      `${ellipsize(name, nameWidth).padEnd(nameWidth)}${cells.map((cell, i) => ` ${cell.padStart((columns[i] as Column).width)}`).join("")}`,
      width,
    );

  const disks = rows.filter((row) => row.kind === "disk");
  const clients = rows.length - disks.length;
  const sum = (pick: (row: TopRow) => number): number => disks.reduce((total, row) => total + pick(row), 0);
  const time = stats ? new Date(stats.timeMs).toTimeString().slice(0, 8) : "--:--:--";
  const arrow = options.reverse ? "^" : "v";
  const title =
    `vdisk top ${time}  ${disks.length} disk${disks.length === 1 ? "" : "s"}, ${clients} client${clients === 1 ? "" : "s"}` +
    `  IOPS r ${formatIops(sum((r) => r.readIops))} w ${formatIops(sum((r) => r.writeIops))}` +
    `  sort ${sortTitles[options.sort]} ${arrow}`;
  const header = line(
    options.sort === "name" ? `NAME ${arrow}` : "NAME",
    columns.map((column) => (column.key === options.sort ? `${column.title}${arrow}` : column.title)),
  );
  const body = rows.map((row) =>
    line(
      rowName(row),
      columns.map((column) => column.cell(row)),
    ),
  );
  const available = options.height === null ? body.length : Math.max(options.height - 3, 0);
  const shown = body.slice(0, available);
  const hidden = body.length - shown.length;
  let footer = "s: sort  r: reverse  q: quit";
  if (hidden > 0) footer = `(+${hidden} more rows)  ${footer}`;
  if (rows.length === 0 && !options.problem) footer = `${stats ? "no disks" : "sampling…"}  ${footer}`;
  if (options.problem) footer = `${options.problem}  ${footer}`;
  return [ellipsize(title, width), header, ...shown, ellipsize(footer, width)];
}

// ---- The command ---------------------------------------------------------------------------------------

export interface TopOptions {
  intervalSeconds: number;
  once: boolean;
  json: boolean;
}

const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

async function sample(client: ApiClient): Promise<StatsSnapshot> {
  return (await client.get<StatsSnapshot>("/v1/stats")).data;
}

/** `--once`: two samples, one frame (or JSON) on stdout. */
async function topOnce(client: ApiClient, options: TopOptions): Promise<void> {
  const first = await sample(client);
  await sleep(options.intervalSeconds * 1000);
  const second = await sample(client);
  const rows = computeRows(first, second);
  if (options.json) {
    const json: TopJson = {
      timeMs: second.timeMs,
      intervalSeconds: (second.timeMs - first.timeMs) / 1000,
      rows,
      stats: second,
    };
    process.stdout.write(`${JSON.stringify(json, null, 2)}\n`);
    return;
  }
  const width = process.stdout.isTTY ? process.stdout.columns : 80;
  const lines = renderFrame(rows, second, { width, height: null, sort: "iops", reverse: false });
  process.stdout.write(`${lines.join("\n")}\n`);
}

const ENTER = "\x1b[?1049h\x1b[?25l";
const LEAVE = "\x1b[?25h\x1b[?1049l";
const HOME = "\x1b[H";
const CLEAR_LINE = "\x1b[K";
const CLEAR_BELOW = "\x1b[J";

/** The live view, until q / Ctrl-C / a signal. */
async function topLive(client: ApiClient, options: TopOptions): Promise<void> {
  const out = process.stdout;
  const input = process.stdin;
  if (!out.isTTY) {
    throw new VdiskError("INVALID_ARGUMENT", "vdisk top needs a terminal", {
      hint: "for scripts use: vdisk top --once (add --json for JSON)",
    });
  }
  let sortIndex = 0;
  let reverse = false;
  /** The last two samples; rows are their difference. */
  let previous: StatsSnapshot | null = null;
  let latest: StatsSnapshot | null = null;
  let rows: TopRow[] = [];
  let problem: string | null = null;
  let finished = false;
  let timer: NodeJS.Timeout | null = null;
  let resolveDone: () => void = () => undefined;
  const done = new Promise<void>((resolve) => (resolveDone = resolve));
  const signals: NodeJS.Signals[] = ["SIGINT", "SIGTERM", "SIGHUP"];

  const resort = (): void => {
    if (previous && latest) rows = computeRows(previous, latest, sortKeys[sortIndex] as SortKey, reverse);
  };
  const draw = (): void => {
    if (finished) return;
    const lines = renderFrame(rows, previous ? latest : null, {
      width: out.columns || 80,
      height: out.rows || 24,
      sort: sortKeys[sortIndex] as SortKey,
      reverse,
      problem,
    });
    out.write(`${HOME}${lines.map((text) => `${text}${CLEAR_LINE}`).join("\r\n")}${CLEAR_BELOW}`);
  };
  const onKey = (chunk: Buffer): void => {
    for (const key of chunk.toString("utf8")) {
      if (key === "q" || key === "Q" || key === "\x03") return restore();
      if (key === "s" || key === "S") sortIndex = (sortIndex + 1) % sortKeys.length;
      else if (key === "r" || key === "R") reverse = !reverse;
      else continue;
      resort();
      draw();
    }
  };
  const restore = (): void => {
    if (finished) return;
    finished = true;
    if (timer) clearTimeout(timer);
    input.off("data", onKey);
    if (input.isTTY) input.setRawMode(false);
    input.pause();
    out.off("resize", draw);
    out.write(LEAVE);
    for (const signal of signals) process.off(signal, restore);
    process.off("exit", restore);
    resolveDone();
  };

  out.write(ENTER);
  process.on("exit", restore);
  for (const signal of signals) process.on(signal, restore);
  out.on("resize", draw);
  if (input.isTTY) input.setRawMode(true);
  input.on("data", onKey);
  input.resume();
  draw();

  const tick = async (): Promise<void> => {
    try {
      const current = await sample(client);
      previous = latest;
      latest = current;
      problem = null;
      resort();
    } catch (err) {
      problem = err instanceof Error ? err.message : String(err);
    }
    draw();
    if (!finished) timer = setTimeout(() => void tick(), options.intervalSeconds * 1000);
  };
  try {
    void tick();
    await done;
  } finally {
    restore();
  }
}

export async function runTop(client: ApiClient, options: TopOptions): Promise<void> {
  if (options.once) return topOnce(client, options);
  if (options.json) {
    throw new VdiskError("INVALID_ARGUMENT", "--json needs --once", {
      hint: "vdisk top --once --json prints one sample as JSON",
    });
  }
  return topLive(client, options);
}
