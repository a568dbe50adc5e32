/**
 * `npm run tiering` (also `node dist/bench/tiering.js` from any directory): the tiering evaluation of
 * issue 5 — the WebSearch-like and TPC-C traces (MQSim's samples, test/fixtures/traces/) replayed by 1 to 4
 * VMs at once on emulated devices (docs/devices.md), in three storage configurations:
 *
 *   all-hdd   a pool whose device 0 is `--class hdd --emulate hdd`
 *   all-ssd   a pool whose device 0 is `--class ssd --emulate ssd`
 *   hybrid    device 0 hdd, plus an ssd device (`pool add-device --class ssd --emulate ssd`) whose capacity
 *             is 20 % of the bytes the N VMs' traces touch (counted offline, bench/trace-footprint.ts),
 *             policy profile (TIER_HYBRID_POLICY): one warm-up replay of the same records (so the monitor's heat learns them),
 *             one `vdisk tier run POOL` (a placement pass; moves done when it returns), then the measured
 *             replay
 *
 * Every point is a fresh daemon (`vdisk serve --listen none --http none --socket S`, a scratch home of its
 * own) with N disks of TIER_DISK_SIZE (vdisk format, one per VM), each PREFILLED completely with
 * sequential 1 MiB writes of pseudo-random data through vdisk's NBD client — an unwritten block of a thin
 * disk reads as zeros without touching the device, so unfilled disks would make every read free. The
 * measured replay is ONE `vdisk replay TRACE×N --disk vm1..vmN --untimed --queue-depth Q --limit L --json`:
 * every VM replays the same trace on its own disk, all at once; the execution time is the report's total
 * elapsed time (first issue to last completion over all VMs), normalised per trace to all-SSD with 1 VM.
 *
 * Realtime study (pool mode only): a hybrid pool (fast class 20 % of what the four disks touch) with disks
 * rt, bg1, bg2, bg3, prefilled, warmed up by one replay of all four at once, one tier pass; then with
 * `vdisk set rt --priority realtime` and the others `--priority background`: rt alone, then all four at
 * once — rt's p99 together ÷ alone, against the 1.5× target; then the same with all four `normal`.
 *
 * Offline, before anything runs: the footprint of each trace after mapping (trace-footprint.ts) — distinct
 * 4 KiB blocks, accesses per block, and the share of accesses that the hottest 20 % of the touched bytes
 * receive at 4 KiB and at 1 MiB granularity: an upper bound on what a 20 % fast class can serve.
 *
 * TIER_MODE=per-disk (fallback while the pool commands do not exist): plain disks (`vdisk create NAME
 * --size S`), prefilled, then `vdisk set NAME --emulate hdd|ssd` — every disk has its own modelled device
 * (so N VMs do not share a head). "hybrid" then runs as all-hdd with the warm-up replay and no tier pass
 * (there is no fast class): it exercises the pipeline, it does not measure tiering. No realtime study.
 *
 * Environment:
 *   TIER_MODE       pool (default) or per-disk
 *   TIER_STUDIES    comma list: matrix, realtime (default: both; per-disk mode: matrix)
 *   TIER_TRACES     comma list of wsrch, tpcc (default: both)
 *   TIER_CONFIGS    comma list of all-hdd, all-ssd, hybrid (default: all three)
 *   TIER_VMS        comma list of VM counts (default 1,2,3,4)
 *   TIER_LIMIT      records replayed per VM (1000)       TIER_QD   requests in flight per VM (4)
 *   TIER_DISK_SIZE  size of each VM's disk (512M; the traces wrap onto it, see docs/replay.md)
 *   TIER_FAST_OF    what the hybrid's 20 % is of: touched (default; the bytes the N disks' replayed records
 *                  touch, per trace-footprint.ts) or disk (the N disks' whole prefilled size)
 *   TIER_HYBRID_POLICY  the hybrid pools' policy: profile (default: small random writes go to the fast
 *                  class, and random-small disks' hottest extents are promoted) or heat (promotion only)
 *   TIER_MIGRATE_RATE  if set, `vdisk pool set POOL --migrate-rate RATE` on hybrid pools (bytes/s, e.g. 256M)
 *   TIER_RT_TRACE   the trace of the realtime study (tpcc)
 *   TIER_DOCS       "0": do not write docs/tiering-eval.md and docs/charts/tiering-*.svg (trial runs)
 *   TIER_DIR        where the scratch directory is made (default: the OS temp dir)
 *   TIER_KEEP=1     keep the scratch directory (daemon logs, homes) for a post-mortem
 * Results: tables on stdout; JSON in bench/results/tiering-<timestamp>.json; docs/tiering-eval.md
 * (generated) with docs/charts/tiering-<trace>.svg (and tiering-realtime.svg) drawn by bench/svg.ts.
 */
import { randomFillSync } from "node:crypto";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import {
  type HddLatencyModel,
  type ResolvedSsdModel,
  parseLatencyModel,
  resolveHddModel,
  resolveLatencyModel,
} from "../src/devices/latency-device";
import { NbdClient, parseNbdUri } from "../src/protocol/nbd/client";
import type { ReplayReport } from "../src/replay/replayer";
import { formatSize, parseSize } from "../src/util/size";
import type { PassResult } from "../src/tier/tier-manager";
import {
  RESULTS_DIR,
  ROOT,
  VDISK_BIN,
  describeMachine,
  env,
  gitCommit,
  printTable,
  run,
  runAsync,
} from "./common";
import { type VdiskDaemon, startVdiskDaemon } from "./servers";
import { type ChartPanel, svgChart } from "./svg";
import { HOT_SHARE, type TraceFootprint, traceFootprint } from "./trace-footprint";

const MiB = 1024 ** 2;
const PREFILL_CHUNK_BYTES = 1 * MiB;
const PREFILL_DEPTH = 4;
/** The paper's and the targets. */
const TARGET_HYBRID_OVER_SSD = 1.25;
const TARGET_HDD_OVER_HYBRID = 5;
const TARGET_RT_P99_RATIO = 1.5;
const POOL = "tier";

const TRACES = {
  wsrch: { label: "WebSearch-like", file: "mqsim-wsrch-small.trace" },
  tpcc: { label: "TPC-C (OLTP)", file: "mqsim-tpcc-small.trace" },
} as const;
type TraceId = keyof typeof TRACES;

const CONFIGS = {
  "all-hdd": "all-HDD",
  "all-ssd": "all-SSD",
  hybrid: `hybrid (${HOT_SHARE * 100} % SSD)`,
} as const;
type ConfigId = keyof typeof CONFIGS;

/** The default models of `--emulate hdd` and `--emulate ssd`, every parameter filled in. */
const hdd = resolveHddModel(parseLatencyModel("hdd") as HddLatencyModel);
const ssd = resolveLatencyModel(parseLatencyModel("ssd")) as ResolvedSsdModel;

interface Context {
  mode: "pool" | "per-disk";
  scratch: string;
  limit: number;
  queueDepth: number;
  diskBytes: number;
  vmCounts: number[];
  traces: TraceId[];
  configs: ConfigId[];
  migrateRate: string | null;
  /** The hybrid pools' placement policy (TIER_HYBRID_POLICY). */
  hybridPolicy: "heat" | "profile";
  /** The fast class is HOT_SHARE of the touched bytes or of the disks' whole size. */
  fastOf: "touched" | "disk";
  rtTrace: TraceId;
  /** The footprint of each trace's replayed records on one disk. */
  footprints: Partial<Record<TraceId, TraceFootprint>>;
}

// ---------------------------------------------------------------------------------------------------
// Results.

interface VmFigures {
  vm: string;
  disk: string;
  elapsedSeconds: number;
  iops: number;
  latencyUsMean: number;
  latencyUsP99: number;
}

interface ReplayFigures {
  elapsedSeconds: number;
  iops: number;
  latencyUsMean: number;
  latencyUsP99: number;
  errors: number;
  vms: VmFigures[];
}

interface MatrixPoint {
  trace: TraceId;
  config: ConfigId;
  vms: number;
  /** Hybrid: the fast class's capacity (HOT_SHARE of N × the trace's touched bytes); else null. */
  fastBytes: number | null;
  prefillSeconds: number;
  warmup: ReplayFigures | null;
  /** Hybrid in pool mode: `vdisk tier run --json` and `vdisk tier status --json` as printed. */
  tierRun: unknown;
  tierRunSeconds: number | null;
  tierStatus: unknown;
  measured: ReplayFigures;
  /** measured.elapsedSeconds ÷ the same trace's all-SSD 1-VM elapsedSeconds (null if not measured). */
  normalized: number | null;
}

/**
 * The realtime study's fast-class sizing: `touched` = the matrix's hybrid (a share of what the four disks
 * touch; rt's data mostly stays on the hdd, so only dispatch priority helps it); `rt-fits` = room for rt's
 * whole disk, with rt set realtime before the prefill, so placement gives it the fast class first.
 */
type RealtimeSetup = "touched" | "rt-fits";

interface RealtimeRun {
  setup: RealtimeSetup;
  fastBytes: number;
  priorities: "realtime/background" | "normal";
  aloneP99Us: number;
  togetherP99Us: number;
  ratio: number;
  alone: ReplayFigures;
  together: ReplayFigures;
}

interface RealtimeResult {
  trace: TraceId;
  fastBytes: number;
  prefillSeconds: number;
  warmup: ReplayFigures;
  tierRun: unknown;
  tierStatus: unknown;
  runs: RealtimeRun[];
}

function figures(report: ReplayReport): ReplayFigures {
  return {
    elapsedSeconds: report.total.elapsedSeconds,
    iops: report.total.iops,
    latencyUsMean: report.total.latency.meanUs,
    latencyUsP99: report.total.latency.p99Us,
    errors: report.total.errors,
    vms: report.vms.map((vm) => ({
      vm: vm.vm,
      disk: vm.disk,
      elapsedSeconds: vm.elapsedSeconds,
      iops: vm.iops,
      latencyUsMean: vm.latency.meanUs,
      latencyUsP99: vm.latency.p99Us,
    })),
  };
}

// ---------------------------------------------------------------------------------------------------
// Building blocks.

function traceFile(trace: TraceId): string {
  return path.join(ROOT, "test", "fixtures", "traces", TRACES[trace].file);
}

function fastBytesFor(ctx: Context, trace: TraceId, disks: number): number {
  const perDisk =
    ctx.fastOf === "disk" ? ctx.diskBytes : (ctx.footprints[trace] as TraceFootprint).touchedBytes;
  return Math.ceil((perDisk * disks * HOT_SHARE) / 4096) * 4096;
}

/** What the fast class's size is a share of, in words. */
function fastBasis(ctx: Context): string {
  return ctx.fastOf === "disk"
    ? `${HOT_SHARE * 100} % of the N disks' whole (prefilled) size`
    : `${HOT_SHARE * 100} % of the bytes the N disks' replayed records touch`;
}

/** Writes the whole disk with sequential 1 MiB writes of pseudo-random data, then flushes. */
async function prefill(daemon: VdiskDaemon, disk: string, diskBytes: number): Promise<void> {
  const client = await NbdClient.connect(parseNbdUri(daemon.diskUri(disk)), { inflightMax: PREFILL_DEPTH });
  try {
    if (client.size !== diskBytes) throw new Error(`disk ${disk} has ${client.size} bytes, not ${diskBytes}`);
    let next = 0;
    const worker = async (seed: number): Promise<void> => {
      const buffer = randomFillSync(Buffer.alloc(PREFILL_CHUNK_BYTES));
      for (let written = 0; next < diskBytes; written++) {
        const offset = next;
        next += PREFILL_CHUNK_BYTES;
        // Every chunk differs (a stamp of its offset): no two blocks of the disk hold the same data.
        buffer.writeDoubleLE(offset, 0);
        buffer.writeUInt32LE(seed * 1_000_003 + written, 8);
        await client.writeAsync(
          offset,
          buffer.subarray(0, Math.min(PREFILL_CHUNK_BYTES, diskBytes - offset)),
        );
      }
    };
    await Promise.all(Array.from({ length: PREFILL_DEPTH }, (_, seed) => worker(seed)));
    await client.flushAsync();
  } finally {
    await client.close();
  }
}

/** One `vdisk replay` of `trace` by every disk at once, untimed; its JSON report. */
async function replay(
  ctx: Context,
  daemon: VdiskDaemon,
  traces: TraceId[],
  disks: string[],
): Promise<ReplayReport> {
  const out = await runAsync(process.execPath, [
    VDISK_BIN,
    "replay",
    ...traces.map(traceFile),
    ...disks.flatMap((disk) => ["--disk", disk]),
    "--home",
    daemon.home,
    "--untimed",
    "--queue-depth",
    String(ctx.queueDepth),
    "--limit",
    String(ctx.limit),
    "--json",
  ]);
  const report = JSON.parse(out) as ReplayReport;
  if (report.vms.length !== disks.length) throw new Error(`replay reported ${report.vms.length} VMs`);
  return report;
}

/** `vdisk <command...> --json` parsed (text if it is not JSON). */
function cliJson(daemon: VdiskDaemon, command: string[], args: string[]): unknown {
  const out = daemon.cli(command, [...args, "--json"]);
  try {
    return JSON.parse(out);
  } catch {
    return out.trim();
  }
}

/**
 * Sets up the storage of one configuration on a fresh daemon and creates `disks` (not yet filled):
 * a pool and disks in it, or plain disks (per-disk mode; emulation is switched on after the fill).
 */
function createStorage(
  ctx: Context,
  daemon: VdiskDaemon,
  dir: string,
  config: ConfigId,
  disks: string[],
  fastBytes: number | null,
): void {
  if (ctx.mode === "per-disk") {
    for (const disk of disks) daemon.cli(["create"], [disk, "--size", String(ctx.diskBytes)]);
    return;
  }
  const slow = config === "all-ssd" ? "ssd" : "hdd";
  daemon.cli(["pool", "create"], [POOL, "--class", slow, "--emulate", slow]);
  if (config === "hybrid") {
    const fast = path.join(dir, "fast");
    fs.mkdirSync(fast, { recursive: true });
    daemon.cli(
      ["pool", "add-device"],
      [POOL, fast, "--class", "ssd", "--capacity", String(fastBytes), "--emulate", "ssd"],
    );
    const rate = ctx.migrateRate === null ? [] : ["--migrate-rate", ctx.migrateRate];
    daemon.cli(["pool", "set"], [POOL, "--policy", ctx.hybridPolicy, ...rate]);
  }
  for (const disk of disks) daemon.cli(["create"], [disk, "--size", String(ctx.diskBytes), "--pool", POOL]);
}

/** Fills every disk (one after the other: sequential on a shared head); per-disk mode then emulates. */
async function fillDisks(
  ctx: Context,
  daemon: VdiskDaemon,
  config: ConfigId,
  disks: string[],
): Promise<number> {
  const started = performance.now();
  for (const disk of disks) await prefill(daemon, disk, ctx.diskBytes);
  const seconds = (performance.now() - started) / 1000;
  if (ctx.mode === "per-disk") {
    for (const disk of disks) daemon.cli(["set"], [disk, "--emulate", config === "all-ssd" ? "ssd" : "hdd"]);
  }
  return seconds;
}

/** Runs `body` on a fresh daemon in `name`'s directory of the scratch; stops it and deletes the files. */
async function withDaemon<T>(
  ctx: Context,
  name: string,
  body: (daemon: VdiskDaemon, dir: string) => Promise<T>,
): Promise<T> {
  const dir = path.join(ctx.scratch, name);
  fs.mkdirSync(dir, { recursive: true });
  const log = path.join(ctx.scratch, "logs", `${name}.log`);
  const daemon = await startVdiskDaemon(path.join(dir, "home"), path.join(dir, "nbd.sock"), log, []);
  try {
    return await body(daemon, dir);
  } finally {
    await daemon.stop();
    if (!process.env.TIER_KEEP) fs.rmSync(dir, { recursive: true, force: true });
  }
}

function step(what: string): void {
  process.stdout.write(` ${what}`);
}

/** Times a tier pass; pool mode only. */
function tierPass(daemon: VdiskDaemon): { run: unknown; seconds: number; status: unknown } {
  const started = performance.now();
  const result = cliJson(daemon, ["tier", "run"], [POOL]);
  const seconds = (performance.now() - started) / 1000;
  return { run: result, seconds, status: cliJson(daemon, ["tier", "status"], []) };
}

// ---------------------------------------------------------------------------------------------------
// The matrix: trace × configuration × VM count.

async function runPoint(ctx: Context, trace: TraceId, config: ConfigId, vms: number): Promise<MatrixPoint> {
  const disks = Array.from({ length: vms }, (_, i) => `vm${i + 1}`);
  const traces = disks.map(() => trace);
  const fastBytes = config === "hybrid" && ctx.mode === "pool" ? fastBytesFor(ctx, trace, vms) : null;
  return withDaemon(ctx, `${trace}-${config}-${vms}`, async (daemon, dir) => {
    createStorage(ctx, daemon, dir, config, disks, fastBytes);
    step("prefill");
    const prefillSeconds = await fillDisks(ctx, daemon, config, disks);
    step(`${prefillSeconds.toFixed(1)}s`);
    let warmup: ReplayFigures | null = null;
    let tier: ReturnType<typeof tierPass> | null = null;
    if (config === "hybrid") {
      step("warm-up");
      warmup = figures(await replay(ctx, daemon, traces, disks));
      step(`${warmup.elapsedSeconds.toFixed(1)}s`);
      if (ctx.mode === "pool") {
        step("tier run");
        tier = tierPass(daemon);
        step(`${tier.seconds.toFixed(1)}s`);
      }
    }
    step("replay");
    const measured = figures(await replay(ctx, daemon, traces, disks));
    step(`${measured.elapsedSeconds.toFixed(2)}s\n`);
    return {
      trace,
      config,
      vms,
      fastBytes,
      prefillSeconds,
      warmup,
      tierRun: tier?.run ?? null,
      tierRunSeconds: tier?.seconds ?? null,
      tierStatus: tier?.status ?? null,
      measured,
      normalized: null,
    };
  });
}

function normalize(points: MatrixPoint[]): void {
  for (const point of points) {
    const base = points.find((p) => p.trace === point.trace && p.config === "all-ssd" && p.vms === 1);
    point.normalized = base ? point.measured.elapsedSeconds / base.measured.elapsedSeconds : null;
  }
}

async function runMatrix(ctx: Context): Promise<MatrixPoint[]> {
  const points: MatrixPoint[] = [];
  const total = ctx.traces.length * ctx.configs.length * ctx.vmCounts.length;
  // all-SSD first: the normalisation's base is measured before anything else loads the page cache.
  const order: ConfigId[] = (["all-ssd", "hybrid", "all-hdd"] as const).filter((c) =>
    ctx.configs.includes(c),
  );
  for (const trace of ctx.traces) {
    for (const config of order) {
      for (const vms of ctx.vmCounts) {
        process.stdout.write(
          `[${points.length + 1}/${total}] ${trace} ${config} ${vms} VM${vms === 1 ? "" : "s"}:`,
        );
        points.push(await runPoint(ctx, trace, config, vms));
      }
    }
  }
  normalize(points);
  return points;
}

// ---------------------------------------------------------------------------------------------------
// The realtime study.

async function runRealtime(ctx: Context): Promise<RealtimeResult> {
  const touched = await runRealtimeSetup(ctx, "touched");
  const fits = await runRealtimeSetup(ctx, "rt-fits");
  return { ...touched, runs: [...touched.runs, ...fits.runs] };
}

async function runRealtimeSetup(ctx: Context, setup: RealtimeSetup): Promise<RealtimeResult> {
  const trace = ctx.rtTrace;
  const disks = ["rt", "bg1", "bg2", "bg3"];
  const traces = disks.map(() => trace);
  const fastBytes = setup === "touched" ? fastBytesFor(ctx, trace, disks.length) : ctx.diskBytes + 16 * MiB;
  return withDaemon(ctx, `realtime-${trace}-${setup}`, async (daemon, dir) => {
    process.stdout.write(`realtime study (${trace}, hybrid, fast class ${mib(fastBytes)}):`);
    createStorage(ctx, daemon, dir, "hybrid", disks, fastBytes);
    if (setup === "rt-fits") {
      // Placement: a realtime disk's new data goes to the fast class while it has room.
      daemon.cli(["set"], ["rt", "--priority", "realtime"]);
      for (const disk of disks.slice(1)) daemon.cli(["set"], [disk, "--priority", "background"]);
    }
    step("prefill");
    const prefillSeconds = await fillDisks(ctx, daemon, "hybrid", disks);
    step(`${prefillSeconds.toFixed(1)}s warm-up`);
    const warmup = figures(await replay(ctx, daemon, traces, disks));
    step(`${warmup.elapsedSeconds.toFixed(1)}s tier run`);
    const tier = tierPass(daemon);
    step(`${tier.seconds.toFixed(1)}s\n`);
    const runs: RealtimeRun[] = [];
    for (const priorities of ["realtime/background", "normal"] as const) {
      for (const disk of disks) {
        const priority = priorities === "normal" ? "normal" : disk === "rt" ? "realtime" : "background";
        daemon.cli(["set"], [disk, "--priority", priority]);
      }
      process.stdout.write(`  ${priorities}: rt alone`);
      const alone = figures(await replay(ctx, daemon, [trace], ["rt"]));
      step(`p99 ${formatUs(alone.latencyUsP99)}; rt + 3 background`);
      const together = figures(await replay(ctx, daemon, traces, disks));
      const rt = together.vms[0] as VmFigures;
      step(`p99 ${formatUs(rt.latencyUsP99)}\n`);
      runs.push({
        setup,
        fastBytes,
        priorities,
        aloneP99Us: alone.latencyUsP99,
        togetherP99Us: rt.latencyUsP99,
        ratio: rt.latencyUsP99 / alone.latencyUsP99,
        alone,
        together,
      });
    }
    return {
      trace,
      fastBytes,
      prefillSeconds,
      warmup,
      tierRun: tier.run,
      tierStatus: tier.status,
      runs,
    };
  });
}

// ---------------------------------------------------------------------------------------------------
// Tables and documents.

function formatUs(us: number): string {
  if (us >= 1e6) return `${(us / 1e6).toFixed(2)} s`;
  if (us >= 1000) return `${(us / 1000).toFixed(us >= 1e5 ? 0 : 1)} ms`;
  return `${us.toFixed(0)} µs`;
}

const percent = (share: number): string => `${(share * 100).toFixed(1)} %`;
const ratio = (value: number | null): string => (value === null ? "-" : `${value.toFixed(2)}×`);
const mib = (bytes: number): string => `${(bytes / MiB).toFixed(1)} MiB`;

function footprintTable(ctx: Context, full: Partial<Record<TraceId, TraceFootprint>>): string[][] {
  const lines = [
    [
      "trace",
      "records",
      "reads",
      "writes",
      "4K blocks",
      "touched",
      "1M extents",
      "acc/block",
      "max",
      "blocks 1×",
      "2×",
      "≥3×",
      "20 % budget",
      "hot share 4K",
      "records in hot 4K",
      "1M extents in budget",
      "hot share 1M",
    ],
  ];
  const row = (label: string, f: TraceFootprint): string[] => [
    label,
    String(f.records),
    String(f.reads),
    String(f.writes),
    String(f.blocks),
    mib(f.touchedBytes),
    String(f.extents),
    f.accessesPerBlockMean.toFixed(3),
    String(f.accessesPerBlockMax),
    String(f.blocksAccessedOnce),
    String(f.blocksAccessedTwice),
    String(f.blocksAccessedThriceOrMore),
    mib(f.hotBudgetBytes),
    percent(f.hotShare4k),
    percent(f.hotRecordShare4k),
    String(f.hotExtents1m),
    percent(f.hotShare1m),
  ];
  for (const trace of ctx.traces) {
    lines.push(row(`${trace}, first ${ctx.limit}`, ctx.footprints[trace] as TraceFootprint));
    const whole = full[trace];
    if (whole) lines.push(row(`${trace}, whole trace`, whole));
  }
  return lines;
}

function point(
  points: MatrixPoint[],
  trace: TraceId,
  config: ConfigId,
  vms: number,
): MatrixPoint | undefined {
  return points.find((p) => p.trace === trace && p.config === config && p.vms === vms);
}

/** Per trace and configuration: normalised time (and seconds) per VM count. */
function matrixTable(ctx: Context, points: MatrixPoint[]): string[][] {
  const lines = [["trace", "configuration", ...ctx.vmCounts.map((n) => `${n} VM${n === 1 ? "" : "s"}`)]];
  for (const trace of ctx.traces) {
    for (const config of ctx.configs) {
      const cells = ctx.vmCounts.map((n) => {
        const p = point(points, trace, config, n);
        if (!p) return "-";
        const seconds = `${p.measured.elapsedSeconds.toFixed(2)} s`;
        return p.normalized === null ? seconds : `${p.normalized.toFixed(2)} (${seconds})`;
      });
      lines.push([trace, configLabel(ctx, config), ...cells]);
    }
  }
  return lines;
}

function configLabel(ctx: Context, config: ConfigId): string {
  return ctx.mode === "per-disk" && config === "hybrid" ? "hybrid* (hdd, no fast class)" : CONFIGS[config];
}

interface Ratios {
  trace: TraceId;
  vms: number;
  hybridOverSsd: number | null;
  hddOverHybrid: number | null;
}

function ratios(ctx: Context, points: MatrixPoint[]): Ratios[] {
  const out: Ratios[] = [];
  for (const trace of ctx.traces) {
    for (const vms of ctx.vmCounts) {
      const time = (config: ConfigId): number | null =>
        point(points, trace, config, vms)?.measured.elapsedSeconds ?? null;
      const [h, s, d] = [time("hybrid"), time("all-ssd"), time("all-hdd")];
      out.push({
        trace,
        vms,
        hybridOverSsd: h !== null && s !== null ? h / s : null,
        hddOverHybrid: h !== null && d !== null ? d / h : null,
      });
    }
  }
  return out;
}

function ratioTable(ctx: Context, rows: Ratios[]): string[][] {
  const verdict = (ok: boolean): string =>
    ctx.mode === "per-disk" ? "n/a (per-disk)" : ok ? "met" : "not met";
  return [
    [
      "trace",
      "VMs",
      "hybrid ÷ all-SSD",
      `target ≤ ${TARGET_HYBRID_OVER_SSD}`,
      "all-HDD ÷ hybrid",
      `target ≥ ${TARGET_HDD_OVER_HYBRID}`,
    ],
    ...rows.map((r) => [
      r.trace,
      String(r.vms),
      ratio(r.hybridOverSsd),
      r.hybridOverSsd === null ? "-" : verdict(r.hybridOverSsd <= TARGET_HYBRID_OVER_SSD),
      ratio(r.hddOverHybrid),
      r.hddOverHybrid === null ? "-" : verdict(r.hddOverHybrid >= TARGET_HDD_OVER_HYBRID),
    ]),
  ];
}

/** Per point: each VM's p99 latency. */
function p99Table(ctx: Context, points: MatrixPoint[]): string[][] {
  const vmsMax = Math.max(...ctx.vmCounts);
  const lines = [
    ["trace", "configuration", "VMs", ...Array.from({ length: vmsMax }, (_, i) => `vm${i + 1} p99`)],
  ];
  for (const p of points) {
    lines.push([
      p.trace,
      configLabel(ctx, p.config),
      String(p.vms),
      ...Array.from({ length: vmsMax }, (_, i) => {
        const vm = p.measured.vms[i];
        return vm ? formatUs(vm.latencyUsP99) : "";
      }),
    ]);
  }
  return lines;
}

function realtimeTable(result: RealtimeResult): string[][] {
  return [
    [
      "priorities, fast class",
      "rt alone p99",
      "rt + 3 others p99",
      "ratio",
      `target ≤ ${TARGET_RT_P99_RATIO}`,
      "rt alone time",
      "together time",
    ],
    ...result.runs.map((r) => [
      `${r.priorities}, fast ${mib(r.fastBytes)}${r.setup === "rt-fits" ? " (rt fits)" : ""}`,
      formatUs(r.aloneP99Us),
      formatUs(r.togetherP99Us),
      ratio(r.ratio),
      r.priorities === "normal" ? "(contrast)" : r.ratio <= TARGET_RT_P99_RATIO ? "met" : "not met",
      `${r.alone.elapsedSeconds.toFixed(2)} s`,
      `${r.together.elapsedSeconds.toFixed(2)} s`,
    ]),
  ];
}

/** The targets, stated plainly; null entries were not measured. */
function targetVerdicts(ctx: Context, rows: Ratios[], realtime: RealtimeResult | null): string[] {
  const lines: string[] = [];
  if (ctx.mode === "per-disk") {
    lines.push(
      "- Per-disk fallback mode: there is no fast class, so the hybrid targets are not evaluated by this run.",
    );
  } else {
    for (const trace of ctx.traces) {
      const mine = rows.filter((r) => r.trace === trace);
      const over = mine.map((r) => r.hybridOverSsd).filter((v): v is number => v !== null);
      const under = mine.map((r) => r.hddOverHybrid).filter((v): v is number => v !== null);
      if (over.length > 0) {
        const worst = Math.max(...over);
        lines.push(
          `- ${TRACES[trace].label}: hybrid within ${TARGET_HYBRID_OVER_SSD}× of all-SSD at every VM count — ` +
            `**${worst <= TARGET_HYBRID_OVER_SSD ? "met" : "not met"}** (worst ${ratio(worst)}).`,
        );
      }
      if (under.length > 0) {
        const worst = Math.min(...under);
        lines.push(
          `- ${TRACES[trace].label}: hybrid at least ${TARGET_HDD_OVER_HYBRID}× faster than all-HDD at every VM ` +
            `count — **${worst >= TARGET_HDD_OVER_HYBRID ? "met" : "not met"}** (worst ${ratio(worst)}).`,
        );
      }
    }
  }
  for (const rt of realtime?.runs.filter((r) => r.priorities === "realtime/background") ?? []) {
    lines.push(
      `- Realtime VM's p99 within ${TARGET_RT_P99_RATIO}× of running alone with three background VMs beside ` +
        `it, fast class ${mib(rt.fastBytes)}${rt.setup === "rt-fits" ? " (room for rt's disk)" : ""} — ` +
        `**${rt.ratio <= TARGET_RT_P99_RATIO ? "met" : "not met"}** (${ratio(rt.ratio)}).`,
    );
  }
  return lines;
}

function markdownTable(lines: string[][], textColumns = 2): string {
  const [header, ...rows] = lines as [string[], ...string[][]];
  const align = header.map((_, i) => (i < textColumns ? "---" : "---:"));
  return [header, align, ...rows].map((cells) => `| ${cells.join(" | ")} |`).join("\n");
}

function matrixCharts(ctx: Context, points: MatrixPoint[], trace: TraceId): ChartPanel[] {
  const xs = ctx.vmCounts.map((n) => ({ value: n, label: `${n} VM${n === 1 ? "" : "s"}` }));
  const rows = ratios(ctx, points).filter((r) => r.trace === trace);
  return [
    {
      title: `${TRACES[trace].label}: execution time`,
      xTitle: "VMs replaying at once",
      yTitle: "normalized time (all-SSD, 1 VM = 1)",
      x: "category",
      xs,
      series: ctx.configs.map((config) => ({
        label: configLabel(ctx, config),
        values: ctx.vmCounts.map((n) => point(points, trace, config, n)?.normalized ?? null),
      })),
    },
    {
      title: `${TRACES[trace].label}: against the targets`,
      xTitle: "VMs replaying at once",
      yTitle: "ratio of execution times",
      x: "category",
      xs,
      series: [
        { label: "hybrid ÷ all-SSD", values: rows.map((r) => r.hybridOverSsd) },
        {
          label: `target: hybrid ÷ all-SSD ≤ ${TARGET_HYBRID_OVER_SSD}`,
          values: rows.map(() => TARGET_HYBRID_OVER_SSD),
        },
        { label: "all-HDD ÷ hybrid", values: rows.map((r) => r.hddOverHybrid) },
        {
          label: `target: all-HDD ÷ hybrid ≥ ${TARGET_HDD_OVER_HYBRID}`,
          values: rows.map(() => TARGET_HDD_OVER_HYBRID),
        },
      ],
    },
  ];
}

function realtimeChart(result: RealtimeResult): ChartPanel[] {
  return [
    {
      title: `rt VM's p99 latency (${TRACES[result.trace].label})`,
      xTitle: "priorities",
      yTitle: "p99 latency (ms)",
      x: "category",
      xs: result.runs.map((r, i) => ({
        value: i + 1,
        label: `${r.priorities === "normal" ? "normal" : "rt/bg"} ${r.setup === "rt-fits" ? "rt fits" : "20 %"}`,
      })),
      series: [
        { label: "rt alone", values: result.runs.map((r) => r.aloneP99Us / 1000) },
        { label: "rt + 3 other VMs", values: result.runs.map((r) => r.togetherP99Us / 1000) },
        {
          label: `${TARGET_RT_P99_RATIO}× alone (target)`,
          values: result.runs.map((r) => (r.aloneP99Us * TARGET_RT_P99_RATIO) / 1000),
        },
      ],
    },
  ];
}

function writeDocs(
  ctx: Context,
  results: {
    points: MatrixPoint[];
    realtime: RealtimeResult | null;
    full: Partial<Record<TraceId, TraceFootprint>>;
  },
  meta: { date: string; commit: string | null; machine: Record<string, unknown> },
): string[] {
  const docs = path.join(ROOT, "docs");
  const charts = path.join(docs, "charts");
  fs.mkdirSync(charts, { recursive: true });
  const written: string[] = [];
  const { points, realtime, full } = results;
  const { machine } = meta;
  const load = (machine.loadAverageAtStart as number[]).map((l) => l.toFixed(1)).join(", ");
  const model = (m: object): string =>
    Object.entries(m)
      .filter(([key]) => key !== "kind")
      .map(([key, value]) => `${key}=${value}`)
      .join(", ");
  const rows = ratios(ctx, points);
  const parts = [
    "# Tiering evaluation: traces on all-HDD, all-SSD and hybrid pools",
    "",
    `_Generated by \`npm run tiering\` (bench/tiering.ts) on ${meta.date}; edit the script, not this file._`,
    "",
    "The WebSearch-like and TPC-C traces of MQSim (`test/fixtures/traces/`) replayed by 1 to 4 VMs at once " +
      "([replay.md](replay.md)) on emulated devices ([devices.md](devices.md)), in three configurations: " +
      "all-HDD, all-SSD, and a hybrid pool whose fast (SSD) class holds 20 % of the data the traces touch. " +
      "In the study that motivated this issue, a 50 %/50 % hybrid was 1.7–2.2× slower than all-SSD on WebSearch and 1.3× on " +
      `OLTP; the target here is the 20 % hybrid within ${TARGET_HYBRID_OVER_SSD}× of all-SSD on both traces, ` +
      `and at least ${TARGET_HDD_OVER_HYBRID}× faster than all-HDD.`,
    "",
    "## Targets",
    "",
    ...targetVerdicts(ctx, rows, realtime),
    "",
    "## Setup",
    "",
    `- Machine: ${machine.cpus} × ${machine.cpuModel}, Linux ${machine.kernel}, Node ${machine.node}; load ` +
      `average at start ${load}. Commit ${meta.commit ?? "unknown"}.`,
    ctx.mode === "pool"
      ? "- Storage: one pool per point. all-HDD: device 0 `--class hdd --emulate hdd`; all-SSD: device 0 " +
        "`--class ssd --emulate ssd`; hybrid: device 0 hdd plus `pool add-device --class ssd --emulate ssd " +
        `--capacity C\` with C = ${fastBasis(ctx)} (below), \`pool set --policy ${ctx.hybridPolicy}\`` +
        (ctx.migrateRate === null ? "" : ` --migrate-rate ${ctx.migrateRate}`) +
        ". A pool device's model is shared by all the pool's disks on it (one head, one set of channels)."
      : "- **Per-disk fallback mode** (`TIER_MODE=per-disk`): plain disks with `vdisk set --emulate hdd|ssd`, " +
        "each with its own modelled device (the VMs share no head); `hybrid*` is all-HDD with the warm-up " +
        "replay and no fast class. These figures validate the pipeline; they do not evaluate tiering.",
    `- emulated hdd: ${model(hdd)}.`,
    `- emulated ssd: ${model(ssd)}.`,
    `- Every point: a fresh daemon; N disks of ${formatSize(ctx.diskBytes)} (vdisk format), each prefilled ` +
      "completely with sequential 1 MiB writes of pseudo-random data over NBD (an unwritten block of a thin " +
      "disk reads as zeros without touching the device). Hybrid: one warm-up replay of the same records, " +
      "then `vdisk tier run` (one placement pass from the heat the monitor recorded), then the measured replay.",
    `- Measured: one \`vdisk replay --untimed --queue-depth ${ctx.queueDepth} --limit ${ctx.limit}\` with N ` +
      "VMs, each replaying the same trace on its own disk, all at once. Execution time is the report's total " +
      "(first issue to last completion over all VMs); normalized per trace to all-SSD with 1 VM = 1.0.",
    "- The emulated devices run on a real clock inside the daemon, on a 2-core machine shared with the " +
      "replayer: on the SSD the CPU cost per request, not the model, bounds the rate, so all-SSD times (the " +
      "normalisation base) are an upper bound on what the modelled SSD needs.",
    "",
    "## What the traces touch",
    "",
    `Counted offline by \`traceFootprint\` (bench/trace-footprint.ts): the replayer's own mapping ` +
      `(src/replay/mapping.ts) onto a ${formatSize(ctx.diskBytes)} disk, at 4 KiB granularity; one disk ` +
      '(N VMs touch N times as much, on N disks). "hot share" is the share of block accesses that fall on ' +
      "the hottest 20 % of the touched bytes — at 4 KiB, or moving whole 1 MiB extents within the same byte " +
      "budget: an upper bound on what any placement with a 20 % fast class can serve from it on one pass, " +
      'even knowing the trace in advance. "records in hot 4K": records whose every block is in that set ' +
      "(a request split across devices waits for its slower part).",
    "",
    markdownTable(footprintTable(ctx, full), 1),
    "",
  ];
  if (points.length > 0) {
    parts.push(
      "## Normalized execution time",
      "",
      "all-SSD with 1 VM = 1.00 per trace; seconds in parentheses.",
      "",
      markdownTable(matrixTable(ctx, points)),
      "",
    );
    for (const trace of ctx.traces) {
      const chart = `charts/tiering-${trace}.svg`;
      fs.writeFileSync(
        path.join(docs, chart),
        svgChart(`${TRACES[trace].label} trace`, matrixCharts(ctx, points, trace)),
      );
      written.push(path.join(docs, chart));
      parts.push(`![${TRACES[trace].label}](${chart})`, "");
    }
    parts.push("## Ratios", "", markdownTable(ratioTable(ctx, rows), 1), "", "## p99 latency per VM", "");
    parts.push(markdownTable(p99Table(ctx, points), 2), "");
    const hybrid = points.filter((p) => p.config === "hybrid" && p.fastBytes !== null);
    if (hybrid.length > 0) {
      parts.push(
        "## Hybrid: fast class and tier pass",
        "",
        markdownTable(
          [
            ["trace", "VMs", "fast class", "warm-up time", "tier run", "tier run output"],
            ...hybrid.map((p) => [
              p.trace,
              String(p.vms),
              mib(p.fastBytes as number),
              `${(p.warmup?.elapsedSeconds ?? 0).toFixed(2)} s`,
              `${(p.tierRunSeconds ?? 0).toFixed(1)} s`,
              `\`${JSON.stringify(summarizeTierRun(p.tierRun))}\``,
            ]),
          ],
          2,
        ),
        "",
      );
    }
  }
  if (realtime) {
    const chart = "charts/tiering-realtime.svg";
    fs.writeFileSync(path.join(docs, chart), svgChart("Realtime priority", realtimeChart(realtime)));
    written.push(path.join(docs, chart));
    parts.push(
      "## Realtime priority",
      "",
      `Two hybrid pools. The first has the matrix's fast class (${mib(realtime.fastBytes)}: ` +
        `${fastBasis(ctx)}, N = 4), so rt's data stays mostly on the hdd and only dispatch priority can help ` +
        "it. The second has room on the fast class for rt's whole disk, and rt is set realtime (the others " +
        "background) before the prefill, so placement gives it the fast class first. In each: disks rt, " +
        "bg1, bg2, bg3, prefilled, one warm-up replay of all four at once, one tier pass. Then rt replays " +
        `${TRACES[realtime.trace].label} alone, and again with bg1–bg3 replaying the same trace beside it ` +
        "(one `vdisk replay`, same settings as above): first with `vdisk set rt --priority realtime` and the " +
        "others `--priority background`, then all four `normal` for contrast. The ratio is rt's p99 " +
        "together ÷ alone.",
      "",
      `![Realtime priority](${chart})`,
      "",
      markdownTable(realtimeTable(realtime), 1),
      "",
    );
  }
  const file = path.join(docs, "tiering-eval.md");
  fs.writeFileSync(file, parts.join("\n"));
  written.unshift(file);
  return written;
}

/** The counts of a `tier run --json` answer (its documented fields), or the answer itself. */
function summarizeTierRun(result: unknown): unknown {
  if (result === null || typeof result !== "object") return result;
  const pass = result as Partial<PassResult>;
  return {
    promotions: pass.promotions,
    demotions: pass.demotions,
    bytesMoved: pass.bytesMoved,
    ms: pass.ms,
  };
}

// ---------------------------------------------------------------------------------------------------
// Main.

function list<T extends string>(
  name: string,
  value: string | undefined,
  known: readonly T[],
  fallback: readonly T[],
): T[] {
  if (value === undefined || value.trim() === "") return [...fallback];
  const items = value.split(",").map((item) => item.trim());
  const unknown = items.filter((item) => !(known as readonly string[]).includes(item));
  if (unknown.length > 0)
    throw new Error(`${name}: unknown ${unknown.join(", ")} (known: ${known.join(", ")})`);
  return known.filter((item) => items.includes(item));
}

/** Fails at once if pool mode is asked for and this vdisk has no `pool` command. */
function checkPoolCommands(): void {
  const help = run(process.execPath, [VDISK_BIN, "--help"]);
  if (!/^\s+pool\b/m.test(help) || !/^\s+tier\b/m.test(help)) {
    throw new Error(
      "pool mode needs `vdisk pool ...` and `vdisk tier ...`, which this vdisk does not have " +
        `(${VDISK_BIN} --help does not list them). Build a tree that has them, or validate the pipeline ` +
        "with TIER_MODE=per-disk",
    );
  }
}

/** A rough duration: the hdd model's random-read time per request, the prefill at its sequential rate. */
function estimateMinutes(ctx: Context, studies: string[]): number {
  const hddRequestS =
    (hdd.commandOverheadUs + hdd.seekAvgMs * 1000 + 30e6 / hdd.rpm + 12288 / hdd.transferMBps) / 1e6;
  const prefillS = (disks: number, config: ConfigId): number =>
    (disks * ctx.diskBytes) / (config === "all-ssd" ? 400e6 : hdd.transferMBps * 1e6) + 1;
  /** Replay of `disks` VMs on hdd: shared head in pool mode, one head each per disk. */
  const hddReplayS = (disks: number): number => (ctx.mode === "pool" ? disks : 1) * ctx.limit * hddRequestS;
  let seconds = 0;
  if (studies.includes("matrix")) {
    for (const _trace of ctx.traces) {
      for (const config of ctx.configs) {
        for (const vms of ctx.vmCounts) {
          seconds += 3 + prefillS(vms, config);
          if (config === "all-hdd") seconds += hddReplayS(vms);
          if (config === "all-ssd") seconds += (vms * ctx.limit) / 3000;
          if (config === "hybrid") seconds += hddReplayS(vms) * (ctx.mode === "pool" ? 1.8 : 2);
        }
      }
    }
  }
  if (studies.includes("realtime"))
    seconds += 3 + prefillS(4, "hybrid") + hddReplayS(4) * 3 + hddReplayS(1) * 2;
  return seconds / 60;
}

async function main(): Promise<void> {
  const mode = env("TIER_MODE", "pool");
  if (mode !== "pool" && mode !== "per-disk") throw new Error(`TIER_MODE is pool or per-disk, not ${mode}`);
  const traceIds = Object.keys(TRACES) as TraceId[];
  const ctx: Context = {
    mode,
    scratch: "",
    limit: Number(env("TIER_LIMIT", "1000")),
    queueDepth: Number(env("TIER_QD", "4")),
    diskBytes: parseSize(env("TIER_DISK_SIZE", "512M")),
    vmCounts: env("TIER_VMS", "1,2,3,4")
      .split(",")
      .map((n) => Number(n.trim())),
    traces: list("TIER_TRACES", process.env.TIER_TRACES, traceIds, traceIds),
    configs: list(
      "TIER_CONFIGS",
      process.env.TIER_CONFIGS,
      Object.keys(CONFIGS) as ConfigId[],
      Object.keys(CONFIGS) as ConfigId[],
    ),
    migrateRate: process.env.TIER_MIGRATE_RATE?.trim() || null,
    hybridPolicy: env("TIER_HYBRID_POLICY", "profile") === "heat" ? "heat" : "profile",
    fastOf: list("TIER_FAST_OF", process.env.TIER_FAST_OF, ["touched", "disk"], ["touched"])[0] as
      "touched" | "disk",
    rtTrace: list("TIER_RT_TRACE", process.env.TIER_RT_TRACE, traceIds, ["tpcc"])[0] as TraceId,
    footprints: {},
  };
  if (!(Number.isSafeInteger(ctx.limit) && ctx.limit >= 1))
    throw new Error("TIER_LIMIT must be a positive integer");
  if (!(Number.isSafeInteger(ctx.queueDepth) && ctx.queueDepth >= 1))
    throw new Error("TIER_QD must be a positive integer");
  if (!ctx.vmCounts.every((n) => Number.isSafeInteger(n) && n >= 1 && n <= 16))
    throw new Error("TIER_VMS: counts 1..16");
  if (ctx.diskBytes % PREFILL_CHUNK_BYTES !== 0)
    throw new Error("TIER_DISK_SIZE must be a whole number of MiB");
  const studies = list(
    "TIER_STUDIES",
    process.env.TIER_STUDIES,
    ["matrix", "realtime"],
    mode === "pool" ? ["matrix", "realtime"] : ["matrix"],
  );
  if (mode === "per-disk" && studies.includes("realtime")) {
    throw new Error(
      "the realtime study needs pool mode (priorities act on a shared device); TIER_STUDIES=matrix",
    );
  }

  // Offline analysis first: the fast class is sized from it.
  const full: Partial<Record<TraceId, TraceFootprint>> = {};
  const analysed = [...new Set([...ctx.traces, ...(studies.includes("realtime") ? [ctx.rtTrace] : [])])];
  for (const trace of analysed) {
    ctx.footprints[trace] = await traceFootprint(traceFile(trace), ctx.diskBytes, ctx.limit);
    full[trace] = await traceFootprint(traceFile(trace), ctx.diskBytes, null);
  }
  console.log(
    `What the traces touch on one ${formatSize(ctx.diskBytes)} disk (4 KiB blocks; hot = hottest ${HOT_SHARE * 100} % of touched bytes):`,
  );
  printTable(footprintTable({ ...ctx, traces: analysed }, full));

  const points = studies.includes("matrix")
    ? ctx.traces.length * ctx.configs.length * ctx.vmCounts.length
    : 0;
  console.log(
    `\nvdisk tiering evaluation, ${mode} mode: ${studies.join(" + ")}; ${points} matrix points ` +
      `(${ctx.traces.join(", ")} × ${ctx.configs.join(", ")} × ${ctx.vmCounts.join(",")} VMs), ` +
      `${ctx.limit} records per VM at queue depth ${ctx.queueDepth}, ${formatSize(ctx.diskBytes)} disks; ` +
      `expect about ${estimateMinutes(ctx, studies).toFixed(0)} min (the hdd model's random-read time)`,
  );
  if (mode === "pool") checkPoolCommands();
  const machine = describeMachine();
  const started = new Date();
  ctx.scratch = fs.mkdtempSync(path.join(process.env.TIER_DIR ?? os.tmpdir(), "vdisk-tiering-"));
  fs.mkdirSync(path.join(ctx.scratch, "logs"));
  let matrix: MatrixPoint[] = [];
  let realtime: RealtimeResult | null = null;
  try {
    if (studies.includes("matrix")) {
      matrix = await runMatrix(ctx);
      console.log("\nNormalized execution time (all-SSD 1 VM = 1.00; seconds):");
      printTable(matrixTable(ctx, matrix));
      console.log("");
      printTable(ratioTable(ctx, ratios(ctx, matrix)));
      console.log("\np99 latency per VM:");
      printTable(p99Table(ctx, matrix));
    }
    if (studies.includes("realtime")) {
      realtime = await runRealtime(ctx);
      console.log("\nRealtime priority:");
      printTable(realtimeTable(realtime));
    }
  } finally {
    if (process.env.TIER_KEEP) console.log(`scratch kept: ${ctx.scratch}`);
    else fs.rmSync(ctx.scratch, { recursive: true, force: true });
  }
  const rows = ratios(ctx, matrix);
  console.log("");
  for (const line of targetVerdicts(ctx, rows, realtime)) console.log(line.replace(/\*\*/g, ""));

  const commit = gitCommit();
  const out = {
    date: started.toISOString(),
    wallSeconds: (Date.now() - started.getTime()) / 1000,
    machine,
    settings: {
      mode,
      studies,
      traces: ctx.traces.map((trace) => ({ id: trace, file: TRACES[trace].file })),
      configs: ctx.configs,
      vmCounts: ctx.vmCounts,
      limit: ctx.limit,
      queueDepth: ctx.queueDepth,
      diskBytes: ctx.diskBytes,
      hotShare: HOT_SHARE,
      fastOf: ctx.fastOf,
      migrateRate: ctx.migrateRate,
      hybridPolicy: ctx.hybridPolicy,
      rtTrace: ctx.rtTrace,
      models: { hdd, ssd },
      targets: {
        hybridOverSsd: TARGET_HYBRID_OVER_SSD,
        hddOverHybrid: TARGET_HDD_OVER_HYBRID,
        realtimeP99Ratio: TARGET_RT_P99_RATIO,
      },
      vdiskCommit: commit,
    },
    footprints: ctx.footprints,
    footprintsWholeTrace: full,
    matrix,
    ratios: rows,
    realtime,
  };
  const file = path.join(RESULTS_DIR, `tiering-${out.date.replace(/[:.]/g, "-")}.json`);
  fs.mkdirSync(path.dirname(file), { recursive: true });
  fs.writeFileSync(file, JSON.stringify(out, null, 2) + "\n");
  const shown = (f: string): string =>
    f.startsWith(process.cwd() + path.sep) ? path.relative(process.cwd(), f) : f;
  console.log(`\nresults: ${shown(file)} (${(out.wallSeconds / 60).toFixed(1)} min)`);
  if (env("TIER_DOCS", "1") !== "0") {
    const written = writeDocs(ctx, { points: matrix, realtime, full }, { date: out.date, commit, machine });
    console.log(`docs: ${written.map(shown).join(", ")}`);
  }
}

main().catch((err) => {
  console.error(`\ntiering evaluation failed: ${err instanceof Error ? err.message : String(err)}`);
  process.exit(1);
});
