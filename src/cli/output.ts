/**
 * Human output of the CLI: aligned tables, key/value blocks, sizes through formatSize, the job progress
 * bar (cli-progress, on a TTY only) and the one-line error format:
 *
 *   vdisk: error: <message>
 *     hint: <hint>
 *
 * `--json` output never comes through here: it is the API's body, printed as received.
 */
import type { DiskPin } from "../tier/pools";
import type { ApiResult, CommonOptions } from "./client";
import { SingleBar } from "cli-progress";
import { VdiskError } from "../errors";
import type {
  CheckReport,
  DeleteResult,
  DiskInfo,
  DiskTree,
  LayerUsage,
  SnapshotInfo,
  TreeNode,
} from "../daemon/registry";
import type { JobView } from "../daemon/jobs";
import type { EngineStats } from "../engine/request-engine";
import { profileSmallBytesMax } from "../limits";
import { quantileOf } from "../monitor/histograms";
import {
  type ActivityStats,
  type DiskStats,
  type OpCounters,
  type OpKind,
  type ProfileStats,
  type StatsSnapshot,
  latencyBucketsSeconds,
  opKinds,
  requestSizeBucketsBytes,
} from "../monitor/types";
import { formatRate, formatSize } from "../util/size";
import { formatLatency } from "./top";

/** Print `text` with exactly one trailing newline. */
export function print(text: string): void {
  process.stdout.write(text.endsWith("\n") ? text : `${text}\n`);
}

/** --json: the API's body as received; otherwise the human rendering. */
export function output<T>(options: CommonOptions, result: ApiResult<T>, human: (data: T) => string): void {
  print(options.json ? result.text : human(result.data));
}

export function table(headers: string[], rows: string[][]): string {
  const widths = headers.map((header, column) =>
    Math.max(header.length, ...rows.map((row) => row[column].length)),
  );
  const line = (cells: string[]): string =>
    cells
      .map((cell, column) => (column === cells.length - 1 ? cell : cell.padEnd(widths[column])))
      .join("  ")
      .trimEnd();
  return [line(headers), ...rows.map(line)].join("\n");
}

export function keyValues(pairs: [string, string][]): string {
  const width = Math.max(...pairs.map(([key]) => key.length)) + 1;
  return pairs.map(([key, value]) => `${`${key}:`.padEnd(width)}  ${value}`).join("\n");
}

export function diskTable(disks: DiskInfo[]): string {
  if (disks.length === 0) return "no disks (make one with: vdisk create NAME --size 20G)";
  const rows = disks.map((disk) => [
    disk.name,
    formatSize(disk.size),
    formatSize(disk.allocatedBytes),
    disk.format,
    disk.readOnly ? "ro" : "rw",
    String(disk.connections),
  ]);
  return table(["NAME", "SIZE", "ALLOCATED", "FORMAT", "MODE", "CONNECTIONS"], rows);
}

export function diskDetails(disk: DiskInfo): string {
  const pairs: [string, string][] = [
    ["name", disk.name],
    ["size", `${formatSize(disk.size)} (${disk.size} bytes)`],
    ["allocated", `${formatSize(disk.allocatedBytes)} (${disk.allocatedBytes} bytes)`],
    ["format", disk.format],
    ["pool", disk.pool],
    ["file", disk.file],
    ["created", disk.created],
    ["read-only", disk.readOnly ? "yes" : "no"],
    ["connections", String(disk.connections)],
  ];
  if (disk.engine) pairs.push(...engineLines(disk.engine));
  if (disk.emulate) pairs.push(["emulate", disk.emulate]);
  pairs.push(["priority", disk.priority ?? "normal"]);
  if (disk.pins) pairs.push(["pins", pinsText(disk.pins)]);
  const image = disk.image;
  if (!image) return keyValues(pairs);
  pairs.push(
    [
      "image",
      `${formatSize(image.fileBytes)} file: ${formatSize(image.dataBytes)} data, ${formatSize(image.indexBytes)} index, ${formatSize(image.freeBytes)} free`,
    ],
    ["family", image.disks.join(", ")],
    ["snapshots", String(image.snapshots)],
  );
  return `${keyValues(pairs)}\n\nspace per layer (the disk, then the snapshots it is built on):\n${layerTable(image.layers)}`;
}

/** Pins as `vdisk set --pin` takes them: ssd, ssd:0-4G. */
export function pinsText(pins: readonly DiskPin[]): string {
  if (pins.length === 0) return "none";
  return pins
    .map((pin) =>
      pin.start === 0 && pin.end === null
        ? pin.class
        : `${pin.class}:${formatSize(pin.start)}-${pin.end === null ? "end" : formatSize(pin.end)}`,
    )
    .join(", ");
}

/** The request engine's settings (as `vdisk set` takes them) and its counters. */
export function engineLines(engine: EngineStats): [string, string][] {
  const settings = engine.settings;
  const sort = settings.sort === "auto" ? `auto (${engine.sorting ? "on" : "off"})` : settings.sort;
  return [
    [
      "engine",
      `merge ${settings.merge ? "on" : "off"}, max request ${formatSize(settings.maxRequestBytes)}, ` +
        `queue depth ${settings.queueDepth}, sort ${sort}`,
    ],
    [
      "engine requests",
      `${engine.submitted} submitted, ${engine.dispatched} dispatched, ${engine.merged} merged, ` +
        `${engine.split} split, ${engine.fastPathReads} cache-hit reads; now ${engine.queued} queued, ` +
        `${engine.inflight} in flight (most queued ${engine.queuedMax})`,
    ],
  ];
}

function plural(count: number, word: string, words = `${word}s`): string {
  return `${count} ${count === 1 ? word : words}`;
}

/** "2025-06-01T12:34:56.789Z" → "2025-06-01 12:34:56" (UTC). */
export function shortTime(iso: string): string {
  return iso.slice(0, 19).replace("T", " ");
}

function layerTable(layers: LayerUsage[]): string {
  const rows = layers.map((layer) => [
    layer.name,
    layer.kind === "head" ? "disk" : "snapshot",
    formatSize(layer.size),
    formatSize(layer.mappedBytes),
    formatSize(layer.exclusiveBytes),
    formatSize(layer.indexBytes),
    shortTime(layer.created),
  ]);
  return table(["LAYER", "KIND", "SIZE", "MAPPED", "EXCLUSIVE", "INDEX", "CREATED"], rows)
    .split("\n")
    .map((line) => `  ${line}`)
    .join("\n");
}

export function snapshotTable(disk: string, snapshots: SnapshotInfo[]): string {
  if (snapshots.length === 0)
    return `disk ${disk} has no snapshots (take one: vdisk snapshot create ${disk} NAME)`;
  const rows = snapshots.map((snapshot) => [
    snapshot.name,
    shortTime(snapshot.created),
    formatSize(snapshot.size),
    formatSize(snapshot.mappedBytes),
    formatSize(snapshot.exclusiveBytes),
    snapshot.parent ?? "-",
    String(snapshot.connections),
  ]);
  return table(["SNAPSHOT", "CREATED", "SIZE", "MAPPED", "EXCLUSIVE", "PARENT", "CONNECTIONS"], rows);
}

/** The layer tree as text: one row per layer, the tree drawn in the first column. */
export function treeText(tree: DiskTree): string {
  const rows: string[][] = [];
  const walk = (node: TreeNode, prefix: string, childPrefix: string): void => {
    const kind = node.kind === "head" ? (node.current ? "disk *" : "disk") : "snapshot";
    rows.push([
      `${prefix}${node.name}`,
      kind,
      formatSize(node.size),
      formatSize(node.mappedBytes),
      formatSize(node.exclusiveBytes),
      shortTime(node.created),
      String(node.connections),
    ]);
    node.children.forEach((child, index) => {
      const last = index === node.children.length - 1;
      walk(child, `${childPrefix}${last ? "└─ " : "├─ "}`, `${childPrefix}${last ? "   " : "│  "}`);
    });
  };
  for (const root of tree.roots) walk(root, "", "");
  const summary =
    `image ${tree.file}: ${plural(tree.disks.length, "disk")} (${tree.disks.join(", ")}), ` +
    `${plural(tree.snapshots, "snapshot")}, ${formatSize(tree.dataBytes)} data, ${formatSize(tree.indexBytes)} index`;
  const body = table(["LAYER", "KIND", "SIZE", "MAPPED", "EXCLUSIVE", "CREATED", "CONNECTIONS"], rows);
  return `${summary}\n${body}\n(* = disk ${tree.disk}; EXCLUSIVE = what deleting the layer alone would free)`;
}

export function checkText(report: CheckReport): string {
  const what = `disk ${report.disk} (${report.format}, ${report.file})`;
  if (report.ok) {
    const scope =
      report.format === "vdisk"
        ? `${plural(report.layers, "layer")}, ${plural(report.indexNodes, "index node")}, ${formatSize(report.dataBytes)} of data; disks checked with it: ${report.disks.join(", ")}`
        : `${formatSize(report.dataBytes)} allocated`;
    return `${what}: clean (${scope})`;
  }
  const count = report.problems.length;
  return [
    `${what}: ${count} problem${count === 1 ? "" : "s"}`,
    ...report.problems.map((p) => `  - ${p}`),
  ].join("\n");
}

export function deleteText(result: DeleteResult): string {
  const lines = [`deleted disk ${result.deleted}`];
  if (result.snapshotsDeleted && result.snapshotsDeleted.length > 0) {
    lines[0] += ` and its snapshots ${result.snapshotsDeleted.join(", ")}`;
  }
  for (const kept of result.snapshotsKept ?? []) {
    lines.push(
      `kept snapshot ${kept.name}: ${kept.neededBy.join(", ")} ${kept.neededBy.length === 1 ? "is" : "are"} built on it`,
    );
  }
  if (result.imageRemoved) lines.push("the image file went with it (it was the last disk of its family)");
  return lines.join("\n");
}

export function formatSeconds(seconds: number): string {
  if (seconds < 60) return `${seconds.toFixed(seconds < 10 ? 1 : 0)} s`;
  const minutes = Math.floor(seconds / 60);
  if (minutes < 60) return `${minutes} min ${Math.round(seconds % 60)} s`;
  return `${Math.floor(minutes / 60)} h ${minutes % 60} min`;
}

export function jobSummary(job: JobView, source: string, target: string): string {
  const seconds = job.finishedAt ? (Date.parse(job.finishedAt) - Date.parse(job.startedAt)) / 1000 : 0;
  const verb = job.kind === "import" ? "imported" : "exported";
  return (
    `${verb} ${source} into ${target}: ${formatSize(job.bytesTotal)} in ${formatSeconds(seconds)} ` +
    `(${formatRate(job.rateBytesPerSecond)}), ${formatSize(job.bytesWritten)} of data written`
  );
}

/** A progress bar for a job on stderr; a no-op object when stderr is not a terminal. */
export interface Progress {
  update(job: JobView): void;
  stop(): void;
}

export function jobProgress(enabled: boolean, label: string): Progress {
  if (!enabled) return { update: () => undefined, stop: () => undefined };
  const bar = new SingleBar({
    format: `${label} [{bar}] {percentage}% | {done} / {all} | {rate} | ETA {eta_formatted}`,
    stream: process.stderr,
    hideCursor: true,
    barsize: 30,
    etaBuffer: 20,
  });
  let started = false;
  const payload = (job: JobView): object => ({
    done: formatSize(job.bytesDone),
    all: formatSize(job.bytesTotal),
    rate: formatRate(job.rateBytesPerSecond),
  });
  return {
    update: (job) => {
      if (!started) bar.start(job.bytesTotal, job.bytesDone, payload(job));
      else bar.update(job.bytesDone, payload(job));
      started = true;
    },
    stop: () => {
      if (started) bar.stop();
    },
  };
}

/** The error lines on stderr; returns the exit status (1). */
export function printError(err: unknown): number {
  const message = err instanceof Error ? err.message : String(err);
  process.stderr.write(`vdisk: error: ${message}\n`);
  const hint = err instanceof VdiskError ? err.hint : undefined;
  if (hint !== undefined) process.stderr.write(`  hint: ${hint}\n`);
  if (!(err instanceof VdiskError) && err instanceof Error && process.env.VDISK_DEBUG) {
    process.stderr.write(`${err.stack ?? ""}\n`);
  }
  return 1;
}

// ---- vdisk stats ---------------------------------------------------------------------------------------

function averageLatency(counters: OpCounters): string {
  return counters.ops === 0 ? "-" : formatLatency(counters.latencySecondsSum / counters.ops);
}

function totalOps(disk: DiskStats): number {
  return opKinds.reduce((sum, kind) => sum + disk.ops[kind].ops, 0);
}

function totalErrors(disk: DiskStats): number {
  return Object.values(disk.errorsByCode).reduce((sum, count) => sum + count, 0);
}

function indexCacheText(stats: StatsSnapshot): string {
  const cache = stats.indexCache;
  if (!cache) return "";
  const lookups = cache.hits + cache.misses;
  const hitRate = lookups === 0 ? "-" : `${((cache.hits / lookups) * 100).toFixed(1)}%`;
  const limit = cache.limitBytes === null ? "unlimited" : formatSize(cache.limitBytes);
  return (
    `\nindex cache: ${formatSize(cache.residentBytes)} of ${limit} (${plural(cache.residentNodes, "leaf", "leaves")}), ` +
    `hit rate ${hitRate} (${cache.hits} hits, ${cache.misses} misses), ${cache.evictions} evictions`
  );
}

/** A half-life: "60 s", "0.5 s". */
function halfLifeText(seconds: number): string {
  return `${Number(seconds.toPrecision(3))} s`;
}

const monitorOffText = "off: nothing is recorded (vdisk serve --monitor on)";

function monitorText(stats: StatsSnapshot): string {
  const monitor = stats.monitor;
  if (!monitor) return "";
  if (!monitor.enabled) return `\nmonitor: ${monitorOffText}`;
  return (
    `\nmonitor: on, heat half-life ${halfLifeText(monitor.heatHalfLifeSeconds)}, ` +
    `${formatSize(monitor.memoryBytes)} of counters and heat maps`
  );
}

function percent(part: number, whole: number): string {
  return whole > 0 ? `${Math.round((part / whole) * 100)}%` : "-";
}

/** Sequential share of a client's or disk's reads and writes. */
function sequentialShare(activity: ActivityStats | null | undefined): string {
  if (!activity) return "-";
  const sequential = activity.sequential.read + activity.sequential.write;
  return percent(sequential, sequential + activity.random.read + activity.random.write);
}

function meanQueueDepth(activity: ActivityStats | null | undefined): string {
  const mean = activity?.queueDepth.mean ?? null;
  return mean === null ? "-" : mean.toFixed(mean < 10 ? 1 : 0);
}

/** p99 of every op's latency together. */
function p99Text(ops: Record<OpKind, OpCounters>): string {
  const merged = new Array<number>(latencyBucketsSeconds.length + 1).fill(0);
  for (const kind of opKinds) {
    ops[kind].latencyBuckets.forEach((count, index) => (merged[index] = (merged[index] ?? 0) + count));
  }
  return formatLatency(quantileOf(merged, latencyBucketsSeconds, 0.99));
}

/** `vdisk stats`: the daemon in one line, then one row per disk. */
export function statsText(stats: StatsSnapshot): string {
  const lagMs = (stats.process.eventLoopLagSeconds * 1000).toFixed(2);
  const head =
    `daemon: up ${formatSeconds(stats.uptimeSeconds)}, ${plural(stats.server.connections, "NBD connection")} ` +
    `(${stats.server.connectionsTotal} since start), ${plural(stats.server.protocolErrors, "protocol error")}, ` +
    `RSS ${formatSize(stats.process.residentBytes)}, heap ${formatSize(stats.process.heapUsedBytes)}, event-loop lag ${lagMs} ms` +
    indexCacheText(stats) +
    monitorText(stats);
  if (stats.disks.length === 0) return `${head}\nno disks (make one with: vdisk create NAME --size 20G)`;
  const rows = stats.disks.map((disk) => [
    disk.name,
    disk.format,
    formatSize(disk.sizeBytes),
    formatSize(disk.allocatedBytes),
    String(disk.snapshots),
    String(disk.clients.length),
    String(disk.inflight),
    String(totalOps(disk)),
    formatSize(disk.ops.read.bytes),
    formatSize(disk.ops.write.bytes),
    String(totalErrors(disk)),
    sequentialShare(disk.activity),
    meanQueueDepth(disk.activity),
    p99Text(disk.ops),
  ]);
  const headers = ["DISK", "FORMAT", "SIZE", "ALLOCATED", "SNAPSHOTS", "CLIENTS", "INFLIGHT", "REQUESTS"];
  return (
    `${head}\n${table([...headers, "READ", "WRITTEN", "ERRORS", "SEQ", "QD", "P99"], rows)}\n` +
    "(totals since the daemon started; SEQ: sequential share of reads and writes, QD: mean queue depth " +
    "at arrival; vdisk top shows rates)"
  );
}

/** A request size bound, short: 512, 4K, 1M, >32M. */
function sizeLabel(bucket: number): string {
  const bound = requestSizeBucketsBytes[bucket];
  const text = (bytes: number): string =>
    bytes >= 1024 * 1024 ? `${bytes / (1024 * 1024)}M` : bytes >= 1024 ? `${bytes / 1024}K` : String(bytes);
  return bound === undefined ? `>${text(requestSizeBucketsBytes[bucket - 1] as number)}` : text(bound);
}

/** A size histogram in one line: the non-empty buckets as "≤BOUND:COUNT". */
function sizesText(buckets: readonly number[]): string {
  const parts = buckets.flatMap((count, bucket) => (count > 0 ? [`${sizeLabel(bucket)}:${count}`] : []));
  return parts.length === 0 ? "-" : parts.join(" ");
}

function profileText(profile: ProfileStats): string {
  if (profile.kind === "idle") return `idle (under one request per ${halfLifeText(profile.halfLifeSeconds)})`;
  const small = formatSize(profileSmallBytesMax);
  return (
    `${profile.kind}: ${profile.requestsPerSecond.toFixed(profile.requestsPerSecond < 10 ? 1 : 0)} req/s, ` +
    `${percent(profile.randomSmallFraction, 1)} random ≤ ${small}, ` +
    `${percent(profile.sequentialLargeFraction, 1)} sequential > ${small}, ${percent(profile.readFraction, 1)} reads ` +
    `(reads and writes, half-life ${halfLifeText(profile.halfLifeSeconds)})`
  );
}

function activityPairs(disk: DiskStats): [string, string][] {
  if (disk.monitorEnabled === false) return [["monitor", monitorOffText]];
  const pairs: [string, string][] = [];
  if (disk.profile) pairs.push(["profile", profileText(disk.profile)]);
  const activity = disk.activity;
  if (activity && activity.queueDepth.count > 0) {
    pairs.push([
      "queue depth",
      `mean ${meanQueueDepth(activity)}, max ${activity.queueDepth.max} (at arrival, all clients)`,
    ]);
  }
  if (activity && activity.interArrival.meanSeconds !== null) {
    pairs.push(["inter-arrival", `mean ${formatLatency(activity.interArrival.meanSeconds)} (any client)`]);
  }
  return pairs;
}

/** Per op with requests: percentiles, and for reads and writes the pattern and sizes. */
function opDetailsTable(disk: DiskStats): string | null {
  const rows = opKinds.flatMap((kind) => {
    const counters = disk.ops[kind];
    if (counters.ops === 0) return [];
    const p = counters.latencyPercentilesSeconds;
    const rw = kind === "read" || kind === "write" ? kind : null;
    const activity = disk.activity;
    return [
      [
        kind,
        formatLatency(p?.p50 ?? null),
        formatLatency(p?.p90 ?? null),
        formatLatency(p?.p99 ?? null),
        formatLatency(p?.p999 ?? null),
        rw && activity ? String(activity.sequential[rw]) : "-",
        rw && activity ? String(activity.random[rw]) : "-",
        rw && activity ? sizesText(activity.sizeBuckets[rw]) : "-",
      ],
    ];
  });
  if (rows.length === 0) return null;
  return table(["OP", "P50", "P90", "P99", "P99.9", "SEQUENTIAL", "RANDOM", "SIZES (≤ bound:count)"], rows);
}

function heatText(disk: DiskStats): string | null {
  const heat = disk.heat;
  if (!heat) return null;
  const title =
    `hottest extents (${formatSize(heat.extentBytes)} each, ${heat.extents} in all; heat = accesses ` +
    `halved every ${halfLifeText(heat.halfLifeSeconds)}, total ${heat.total.toFixed(1)})`;
  if (heat.top.length === 0) return `${title}: none`;
  const rows = heat.top.map((extent) => [
    formatSize(extent.offset),
    String(extent.offset),
    extent.heat.toFixed(1),
    percent(extent.heat, heat.total),
  ]);
  return `${title}\n${table(["OFFSET", "BYTES", "HEAT", "SHARE"], rows)}`;
}

/** `vdisk stats DISK`: the disk's counters per op, its workload, its hottest extents and its clients. */
export function diskStatsText(disk: DiskStats): string {
  const pairs: [string, string][] = [
    [
      "disk",
      `${disk.name} (${disk.format}, ${formatSize(disk.sizeBytes)}, ${formatSize(disk.allocatedBytes)} allocated)`,
    ],
    ["snapshots", String(disk.snapshots)],
    ["in flight", String(disk.inflight)],
    [
      "errors",
      totalErrors(disk) === 0
        ? "none"
        : Object.entries(disk.errorsByCode)
            .map(([code, count]) => `${code} ${count}`)
            .join(", "),
    ],
    ...activityPairs(disk),
  ];
  const opRows = opKinds.map((kind) => {
    const counters = disk.ops[kind];
    return [
      kind,
      String(counters.ops),
      formatSize(counters.bytes),
      String(counters.errors),
      averageLatency(counters),
    ];
  });
  const ops = table(["OP", "REQUESTS", "BYTES", "ERRORS", "AVG LATENCY"], opRows);
  const clients =
    disk.clients.length === 0
      ? "no clients connected"
      : table(
          ["CLIENT", "EXPORT", "TAG", "PEER", "CONNECTED", "INFLIGHT", "REQUESTS", "SEQ", "QD", "P99"],
          disk.clients.map((client) => [
            `#${client.id}`,
            client.export,
            client.tag ?? "-",
            client.peer,
            shortTime(new Date(client.connectedMs).toISOString()),
            String(client.inflight),
            String(opKinds.reduce((sum, kind) => sum + client.ops[kind].ops, 0)),
            sequentialShare(client.activity),
            meanQueueDepth(client.activity),
            p99Text(client.ops),
          ]),
        );
  const sections = [keyValues(pairs), ops, opDetailsTable(disk), heatText(disk), clients];
  return sections.filter((section): section is string => section !== null).join("\n\n");
}
