/**
 * `npm run knobs` (also `node dist/bench/knobs.js` from any directory): the request engine's knobs, one at
 * a time, on emulated devices — the study Zhang made of Xen's blktap2/tapdisk2 ("Impacts on the I/O
 * performance of the virtual disk in Xen", 2012: request aggregation, a 44 KiB maximum request size, the
 * ring's queue length, request sorting, the metadata cache's miss rate), redone on vdisk's engine
 * (docs/engine.md) over vdisk's latency models (docs/devices.md, "Latency-emulating device").
 *
 * Studies (KNOBS_STUDIES; each prints a table: knob value → IOPS, MB/s, mean and p99 latency, and the
 * deltas of the disk's engine counters over the fio run):
 *   merge        merging on/off: sequential 4 KiB writes and reads at QD32 on the emulated hdd and, for
 *                contrast, on a raw disk served from the page cache
 *   max-request  maxRequestBytes 44K .. 4M on the emulated hdd: 64 KiB sequential writes at QD32 (up to
 *                2 MiB in flight to merge) and 4 MiB sequential reads at QD2 (split below 4M)
 *   queue-depth  engine queueDepth 1 .. 128, 4 KiB random reads at client QD128: on the emulated ssd (8
 *                channels), and on the emulated hdd with sorting on
 *   sort         sorting off/on on the emulated hdd, engine queueDepth 1 (the engine holds the queue),
 *                4 KiB random reads at client QD 1, 8, 32, 128; and queueDepth 64 with sorting on
 *   index-cache  `vdisk serve --index-cache SIZE` (0, 256K, 1M, 4M, full; and the daemon's default) on a
 *                2 GiB vdisk-format disk filled with 64Ki random 4 KiB writes (~1000 index leaves): 4 KiB
 *                random reads at QD32, the daemon restarted for every point; IOPS and the cache's hit rate
 *                (from an `indexCache` {hits, misses} object in the API's disk, stats or status JSON, "-"
 *                when the daemon reports none). Fails at once if `vdisk serve` has no --index-cache.
 *
 * Setup: one daemon (`vdisk serve --listen none --http none --socket S`, a scratch home of its own) with
 * sparse raw 4 GiB disks "hdd" (`vdisk set --emulate hdd`), "ssd" (`--emulate ssd`) and "page" (no
 * emulation), each created when a study first needs it; nothing is filled (the emulated devices delay
 * reads of holes like any read). Every point sets all four engine settings with `vdisk set` (live; the
 * defaults except what the study varies), then runs fio's nbd engine over the Unix socket: KNOBS_RAMP s
 * of warm-up, KNOBS_SECONDS s measured. Sequential workloads cover the first 1 GiB of the disk, random
 * ones all of it. The engine counters are read from the API (GET /v1/disks/NAME) before and after each fio
 * run; their deltas include the warm-up.
 *
 * Environment:
 *   KNOBS_STUDIES  comma list of study ids (default: all, in the order above); an id may be followed by
 *                  ":" and the points to run, separated by "/" — "max-request:44K/1M,queue-depth:1/8/128"
 *   KNOBS_SECONDS  seconds per fio run (8)         KNOBS_RAMP   fio warm-up seconds (2)
 *   KNOBS_RUNS     passes (1); figures are medians over the passes; odd passes run the points in reverse
 *                  (the whole study takes ~13 min per pass on 2 cores: keep 1 to stay under 20 min)
 *   KNOBS_DOCS     "0": do not write docs/engine-knobs.md and docs/charts/knobs-*.svg (trial runs)
 *   KNOBS_DIR      where the scratch directory is made (default: the OS temp dir)
 *   KNOBS_KEEP=1   keep the scratch directory (daemon logs in it) for a post-mortem
 * Results: the tables on stdout; JSON in bench/results/knobs-<timestamp>.json (machine, settings, every
 * point's passes and medians); docs/engine-knobs.md (generated) with one chart per study in
 * docs/charts/knobs-<study>.svg (bench/svg.ts).
 */
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import {
  type HddLatencyModel,
  type ResolvedSsdModel,
  hddServiceUs,
  parseLatencyModel,
  resolveHddModel,
  resolveLatencyModel,
} from "../src/devices/latency-device";
import { defaultEngineSettings } from "../src/engine/request-engine";
import type { StatsSnapshot } from "../src/monitor/types";
import { formatSize, parseSize } from "../src/util/size";
import {
  type FioResult,
  RESULTS_DIR,
  ROOT,
  VDISK_BIN,
  describeMachine,
  env,
  fioJob,
  gitCommit,
  median,
  printTable,
  run,
} from "./common";
import { type VdiskDaemon, startVdiskDaemon } from "./servers";
import { type ChartPanel, svgChart } from "./svg";

const GiB = 1024 ** 3;
const DISK_BYTES = 4 * GiB;
const IMAGE_BYTES = 2 * GiB;
/** The index-cache study's fill: random 4 KiB writes over the whole image (64Ki of them). */
const IMAGE_FILL_BYTES = 256 * 1024 ** 2;
/** The region of the sequential workloads (fio --size): rewrites stay within 1 GiB of page cache. */
const SEQUENTIAL_REGION_BYTES = 1 * GiB;
/** "full" index cache: far above the ~5 MiB a 2 GiB image's leaves take. */
const FULL_INDEX_CACHE = "1G";

// ---------------------------------------------------------------------------------------------------
// What is measured.

interface Settings {
  merge: "on" | "off";
  maxRequestBytes: number;
  queueDepth: number;
  sort: "auto" | "on" | "off";
}

const DEFAULTS: Settings = {
  merge: defaultEngineSettings.merge ? "on" : "off",
  maxRequestBytes: defaultEngineSettings.maxRequestBytes,
  queueDepth: defaultEngineSettings.queueDepth,
  sort: defaultEngineSettings.sort,
};

interface Workload {
  rw: "read" | "write" | "randread" | "randwrite";
  bs: string;
  iodepth: number;
}

type DiskId = "hdd" | "ssd" | "page" | "image";

const DISKS: Record<DiskId, { label: string; emulate?: string }> = {
  hdd: { label: "emulated hdd", emulate: "hdd" },
  ssd: { label: "emulated ssd", emulate: "ssd" },
  page: { label: "page cache" },
  image: { label: "vdisk image" },
};

interface Series {
  id: string;
  label: string;
  /** The label in a chart with the series as categories. */
  short?: string;
  disk: DiskId;
  workload: Workload;
  settings?: Partial<Settings>;
}

interface Knob {
  /** What KNOBS_STUDIES names it by, and what tables print. */
  id: string;
  /** Its place on a log2 axis. */
  value: number;
  settings?: Partial<Settings>;
  /** Replaces the series' client queue depth. */
  iodepth?: number;
  /** index-cache only: `vdisk serve --index-cache` (null: the daemon's default, no option). */
  indexCache?: string | null;
}

interface Study {
  id: string;
  title: string;
  /** The column header of the knob. */
  knob: string;
  series: Series[];
  knobs: Knob[];
  /** Markdown: workload, device, what to expect. */
  about(): string;
  charts(result: StudyResult): ChartPanel[];
}

/** One measured point: fio's figures and the daemon's counters over the run (Counters, as deltas). */
interface Figures extends Counters {
  iops: number;
  mbps: number;
  latencyUsMean: number;
  latencyUsP99: number;
}

interface PointResult {
  series: string;
  knob: string;
  settings: Settings | null;
  serveArgs: string[];
  workload: Workload;
  passes: Figures[];
  median: Figures;
}

interface StudyResult {
  id: string;
  title: string;
  knob: string;
  series: { id: string; label: string; short?: string; disk: string }[];
  knobs: string[];
  points: PointResult[];
  /** Facts measured on the way (the index-cache study's index size), printed and in the docs. */
  notes: string[];
}

const size = (bytes: number): string =>
  formatSize(bytes)
    .replace(/ (\w)iB$/, "$1")
    .replace(/ B$/, "");
const sizeKnob = (bytes: number): Knob => ({
  id: size(bytes),
  value: bytes,
  settings: { maxRequestBytes: bytes },
});
const depths = [1, 2, 4, 8, 16, 32, 64, 128];
const seqWrite4k: Workload = { rw: "write", bs: "4k", iodepth: 32 };
const seqRead4k: Workload = { rw: "read", bs: "4k", iodepth: 32 };
const randRead4k = (iodepth: number): Workload => ({ rw: "randread", bs: "4k", iodepth });

/** The default models of `--emulate hdd` and `--emulate ssd`, every parameter filled in. */
const hdd = resolveHddModel(parseLatencyModel("hdd") as HddLatencyModel);
const ssd = resolveLatencyModel(parseLatencyModel("ssd")) as ResolvedSsdModel;
/** Modelled hdd service times: a sequential request of `bytes`; a random 4 KiB read on average. */
const hddSequentialUs = (bytes: number): number => hddServiceUs(hdd, 0, 0, bytes, DISK_BYTES);
const hddRandomUs = (): number =>
  hdd.commandOverheadUs + hdd.seekAvgMs * 1000 + 30e6 / hdd.rpm + 4096 / hdd.transferMBps;

const STUDIES: Study[] = [
  {
    id: "merge",
    title: "Merging on/off",
    knob: "merge",
    series: [
      {
        id: "hdd-write",
        label: "hdd 4K seq write QD32",
        short: "write, qd 64",
        disk: "hdd",
        workload: seqWrite4k,
      },
      {
        id: "hdd-read",
        label: "hdd 4K seq read QD32",
        short: "read, qd 64",
        disk: "hdd",
        workload: seqRead4k,
      },
      {
        id: "hdd-write-qd1",
        label: "hdd 4K seq write QD32, queue depth 1",
        short: "write, qd 1",
        disk: "hdd",
        workload: seqWrite4k,
        settings: { queueDepth: 1 },
      },
      {
        id: "hdd-read-qd1",
        label: "hdd 4K seq read QD32, queue depth 1",
        short: "read, qd 1",
        disk: "hdd",
        workload: seqRead4k,
        settings: { queueDepth: 1 },
      },
      {
        id: "page-write",
        label: "page cache 4K seq write QD32",
        short: "write",
        disk: "page",
        workload: seqWrite4k,
      },
      {
        id: "page-read",
        label: "page cache 4K seq read QD32",
        short: "read",
        disk: "page",
        workload: seqRead4k,
      },
    ],
    knobs: [
      { id: "on", value: 1, settings: { merge: "on" } },
      { id: "off", value: 0, settings: { merge: "off" } },
    ],
    about: () =>
      `Sequential 4 KiB writes, then reads, at client QD32 on the emulated hdd — with the engine's default ` +
      `queue depth (${DEFAULTS.queueDepth}) and with queue depth 1 — and on a raw disk in the page cache. ` +
      `With a device queue deeper than the client's, the engine dispatches each request as soon as it ` +
      `arrives and merges only the requests that arrive together (one socket read); with queue depth 1 the ` +
      `requests wait in the engine while the device works, and merge there. At queue depth ` +
      `${DEFAULTS.queueDepth} how much merges depends on how the client's requests happen to bunch up, so ` +
      `it varies from run to run (the disp/sub column shows it). On the hdd model an unmerged sequential 4 KiB ` +
      `request costs ${hddSequentialUs(4096).toFixed(0)} µs (command overhead + transfer: at most ` +
      `${(1e6 / hddSequentialUs(4096) / 1000).toFixed(1)}k IOPS); merged, the overhead is paid once per ` +
      `device request, so 32 merged requests take ${(hddSequentialUs(32 * 4096) / 32).toFixed(0)} µs each — ` +
      `the model's ceiling for the gain is ${(hddSequentialUs(4096) / (hddSequentialUs(32 * 4096) / 32)).toFixed(1)}×; ` +
      `the per-request cost of the NBD round trip and of the daemon comes on top on both sides. ` +
      `In the page cache a request costs no device time, so merging only trades syscalls for copies ` +
      `(and reads may be answered by the page-cache fast path, which bypasses the engine).`,
    charts: (result) => [
      barsByKnob(
        result,
        "emulated hdd",
        ["hdd-write", "hdd-read", "hdd-write-qd1", "hdd-read-qd1"],
        "mbps",
        "4K sequential, client QD32; engine queue depth",
      ),
      barsByKnob(result, "page cache", ["page-write", "page-read"], "mbps", "4K sequential, client QD32"),
    ],
  },
  {
    id: "max-request",
    title: "Maximum request size",
    knob: "max request",
    series: [
      {
        id: "write-64k-qd1",
        label: "hdd 64K seq write QD32, queue depth 1",
        disk: "hdd",
        workload: { rw: "write", bs: "64k", iodepth: 32 },
        settings: { queueDepth: 1 },
      },
      {
        id: "write-64k",
        label: "hdd 64K seq write QD32",
        disk: "hdd",
        workload: { rw: "write", bs: "64k", iodepth: 32 },
      },
      {
        id: "read-4m",
        label: "hdd 4M seq read QD2",
        disk: "hdd",
        workload: { rw: "read", bs: "4m", iodepth: 2 },
      },
    ],
    knobs: [44, 88, 128, 256, 512, 1024, 2048, 4096].map((k) => sizeKnob(k * 1024)),
    about: () =>
      `maxRequestBytes from 44K (blktap2's ring: 11 segments of 4 KiB) to 4M, merging on, on the emulated ` +
      `hdd: 64 KiB sequential writes at QD32 with engine queue depth 1 (the other 31 writes, ~2 MiB, wait ` +
      `in the engine while the device works and are merged up to the maximum; below 64K every write is ` +
      `split), the same with the default queue depth ${DEFAULTS.queueDepth} (every write goes to the device ` +
      `as it arrives: little to merge), and 4 MiB sequential reads at QD2 (each split into pieces of the ` +
      `maximum, default queue depth). Each device ` +
      `request pays the ${hdd.commandOverheadUs} µs command overhead: a 44 KiB ` +
      `request moves ${(45056 / hddSequentialUs(45056)).toFixed(0)} MB/s, 1 MiB ` +
      `${((1 << 20) / hddSequentialUs(1 << 20)).toFixed(0)} MB/s, 4 MiB ` +
      `${((4 << 20) / hddSequentialUs(4 << 20)).toFixed(0)} MB/s — the seed's point: a small maximum ` +
      `request size caps aggregation.`,
    charts: (result) => [
      lines(
        result,
        "emulated hdd",
        ["write-64k-qd1", "write-64k", "read-4m"],
        "mbps",
        "maximum request size",
      ),
    ],
  },
  {
    id: "queue-depth",
    title: "Engine queue depth",
    knob: "queue depth",
    series: [
      { id: "ssd", label: "ssd 4K rand read QD128", disk: "ssd", workload: randRead4k(128) },
      {
        id: "hdd-sorted",
        label: "hdd 4K rand read QD128, sort on",
        disk: "hdd",
        workload: randRead4k(128),
        settings: { sort: "on" },
      },
    ],
    knobs: depths.map((d) => ({ id: String(d), value: d, settings: { queueDepth: d } })),
    about: () =>
      `Engine queueDepth 1 … 128 (device requests in flight) with 4 KiB random reads at client QD128. ` +
      `On the emulated ssd (${ssd.channels} channels, ${ssd.readLatencyUs} µs a read) throughput should ` +
      `rise with the depth up to the channel count (${(ssd.channels * 1e3) / ssd.readLatencyUs}k ` +
      `IOPS at the model's limit, if the CPU keeps up). On the emulated hdd with sorting on, a shallow device ` +
      `queue leaves the waiting requests to the engine, which sorts them (C-LOOK); a deep one hands the ` +
      `device, which serves in arrival order, unsorted requests: a random 4 KiB read costs ` +
      `${(hddRandomUs() / 1000).toFixed(1)} ms on average unsorted (${(1e6 / hddRandomUs()).toFixed(0)} IOPS).`,
    charts: (result) => [
      lines(result, "emulated ssd", ["ssd"], "iops", "engine queue depth"),
      lines(result, "emulated hdd, sort on", ["hdd-sorted"], "iops", "engine queue depth"),
    ],
  },
  {
    id: "sort",
    title: "Sorting on/off",
    knob: "client QD",
    series: [
      {
        id: "off-qd1",
        label: "hdd 4K rand read, sort off, queue depth 1",
        disk: "hdd",
        workload: randRead4k(1),
        settings: { sort: "off", queueDepth: 1 },
      },
      {
        id: "on-qd1",
        label: "hdd 4K rand read, sort on, queue depth 1",
        disk: "hdd",
        workload: randRead4k(1),
        settings: { sort: "on", queueDepth: 1 },
      },
      {
        id: "on-qd64",
        label: "hdd 4K rand read, sort on, queue depth 64",
        disk: "hdd",
        workload: randRead4k(1),
        settings: { sort: "on", queueDepth: 64 },
      },
    ],
    knobs: [1, 8, 32, 128].map((d) => ({ id: String(d), value: d, iodepth: d })),
    about: () =>
      `4 KiB random reads over the whole emulated hdd at client QD 1, 8, 32 and 128. With engine queueDepth 1 ` +
      `the engine holds every waiting request and, with sorting on, dispatches them in C-LOOK order, which ` +
      `shortens the seeks (rotation stays: the model always waits half a revolution, ` +
      `${(30000 / hdd.rpm).toFixed(2)} ms). At QD1 there is nothing to sort: ` +
      `${(1e6 / hddRandomUs()).toFixed(0)} IOPS either way. With queueDepth 64 the engine only holds what ` +
      `exceeds 64 requests, and the device serves the rest in arrival order.`,
    charts: (result) => [
      lines(
        result,
        "emulated hdd, 4K random reads",
        result.series.map((s) => s.id),
        "iops",
        "client queue depth",
      ),
    ],
  },
  {
    id: "index-cache",
    title: "Index-cache size",
    knob: "index cache",
    series: [
      { id: "image", label: "vdisk image 4K rand read QD32", disk: "image", workload: randRead4k(32) },
    ],
    knobs: [
      { id: "0", value: 0, indexCache: "0" },
      { id: "256K", value: 256 * 1024, indexCache: "256K" },
      { id: "1M", value: 1 << 20, indexCache: "1M" },
      { id: "4M", value: 4 << 20, indexCache: "4M" },
      { id: "full", value: parseSize(FULL_INDEX_CACHE), indexCache: FULL_INDEX_CACHE },
      { id: "default", value: -1, indexCache: null },
    ],
    about: () =>
      `A 2 GiB vdisk-format disk (no emulation: its file is in the page cache) filled with ` +
      `${IMAGE_FILL_BYTES / 4096} random 4 KiB writes over the whole disk, so that nearly all of its ~1024 ` +
      `index leaves (one per 2 MiB) exist; then 4 KiB random reads at QD32 with the daemon restarted for ` +
      `each point as \`vdisk serve --index-cache SIZE\` ("full" = ${FULL_INDEX_CACHE}, above the whole ` +
      `index; "default" = no option). A miss reads the leaf back from the image file (one 4 KiB read and ` +
      `its checksum), so this measures the CPU and syscall cost of misses, not disk seeks. The hit rate ` +
      `is over the fio run, warm-up included (the cache starts cold after each restart).`,
    charts: (result) => {
      const panels = [barsBySeries(result, "4K random reads QD32", "iops", "IOPS")];
      if (result.points.some((p) => p.median.cacheHits !== null)) {
        panels.push(barsBySeries(result, "index-cache hit rate", "hitRate", "hit rate (%)"));
      }
      return panels;
    },
  },
];

// ---------------------------------------------------------------------------------------------------
// Charts.

type Metric = "iops" | "mbps" | "hitRate";
const METRIC_TITLE: Record<Metric, string> = { iops: "IOPS", mbps: "MB/s", hitRate: "hit rate (%)" };

function metric(figures: Figures, which: Metric): number | null {
  if (which !== "hitRate") return figures[which];
  const rate = hitRate(figures);
  return rate === null ? null : rate * 100;
}

function point(result: StudyResult, series: string, knob: string): PointResult | undefined {
  return result.points.find((p) => p.series === series && p.knob === knob);
}

/** x = the knob (log2), one line per series. */
function lines(
  result: StudyResult,
  title: string,
  seriesIds: string[],
  which: Metric,
  xTitle: string,
): ChartPanel {
  const study = STUDIES.find((s) => s.id === result.id) as Study;
  const knobs = study.knobs.filter((k) => result.knobs.includes(k.id));
  return {
    title,
    xTitle,
    yTitle: METRIC_TITLE[which],
    x: "log2",
    xs: knobs.map((k) => ({ value: k.value, label: k.id })),
    series: result.series
      .filter((s) => seriesIds.includes(s.id))
      .map((s) => ({
        label: s.label,
        values: knobs.map((k) => {
          const p = point(result, s.id, k.id);
          return p ? metric(p.median, which) : null;
        }),
      })),
  };
}

/** x = the series (categories), one bar per knob value. */
function barsByKnob(
  result: StudyResult,
  title: string,
  seriesIds: string[],
  which: Metric,
  xTitle: string,
): ChartPanel {
  const series = result.series.filter((s) => seriesIds.includes(s.id));
  return {
    title,
    xTitle,
    yTitle: METRIC_TITLE[which],
    x: "category",
    xs: series.map((s, i) => ({ value: i, label: s.short ?? s.label })),
    series: result.knobs.map((knob) => ({
      label: `${result.knob} ${knob}`,
      values: series.map((s) => {
        const p = point(result, s.id, knob);
        return p ? metric(p.median, which) : null;
      }),
    })),
  };
}

/** x = the knob (categories), one bar per series. */
function barsBySeries(result: StudyResult, title: string, which: Metric, yTitle: string): ChartPanel {
  return {
    title,
    xTitle: result.knob,
    yTitle,
    x: "category",
    xs: result.knobs.map((knob, i) => ({ value: i, label: knob })),
    series: result.series.map((s) => ({
      label: s.label,
      values: result.knobs.map((knob) => {
        const p = point(result, s.id, knob);
        return p ? metric(p.median, which) : null;
      }),
    })),
  };
}

// ---------------------------------------------------------------------------------------------------
// Measuring.

interface Context {
  scratch: string;
  seconds: number;
  ramp: number;
  runs: number;
}

function settingsArgs(s: Settings): string[] {
  return [
    "--merge",
    s.merge,
    "--max-request",
    String(s.maxRequestBytes),
    "--queue-depth",
    String(s.queueDepth),
    "--sort",
    s.sort,
  ];
}

function fioArgs(workload: Workload, ctx: Context): string[] {
  const args = [`--rw=${workload.rw}`, `--bs=${workload.bs}`, `--iodepth=${workload.iodepth}`];
  if (workload.rw === "read" || workload.rw === "write") args.push(`--size=${SEQUENTIAL_REGION_BYTES}`);
  else args.push("--norandommap", "--randrepeat=0");
  return [...args, "--time_based", `--runtime=${ctx.seconds}`, `--ramp_time=${ctx.ramp}`];
}

interface Counters {
  submitted: number;
  dispatched: number;
  merged: number;
  split: number;
  fastPathReads: number;
  cacheHits: number | null;
  cacheMisses: number | null;
}

/** The disk's engine counters, and with `withCache` the index cache's (GET /v1/stats, if reported). */
async function counters(daemon: VdiskDaemon, disk: string, withCache: boolean): Promise<Counters> {
  const info = (await daemon.api("GET", `/v1/disks/${disk}`)).json as { engine?: Record<string, number> };
  const engine = info.engine ?? {};
  const number = (key: string): number => (typeof engine[key] === "number" ? engine[key] : 0);
  const cache = withCache
    ? (((await daemon.api("GET", "/v1/stats")).json as StatsSnapshot).indexCache ?? null)
    : null;
  return {
    submitted: number("submitted"),
    dispatched: number("dispatched"),
    merged: number("merged"),
    split: number("split"),
    fastPathReads: number("fastPathReads"),
    cacheHits: cache?.hits ?? null,
    cacheMisses: cache?.misses ?? null,
  };
}

async function measure(
  daemon: VdiskDaemon,
  disk: string,
  workload: Workload,
  ctx: Context,
  withCache = false,
): Promise<Figures> {
  const before = await counters(daemon, disk, withCache);
  const fio: FioResult = await fioJob(
    daemon.diskUri(disk),
    fioArgs(workload, ctx),
    path.join(ctx.scratch, "fio.json"),
  );
  const after = await counters(daemon, disk, withCache);
  const delta = (key: keyof Counters): number | null => {
    const a = after[key];
    const b = before[key];
    return a === null || b === null ? null : a - b;
  };
  return {
    iops: fio.iops,
    mbps: fio.bytesPerSecond / 1e6,
    latencyUsMean: fio.latencyUsMean,
    latencyUsP99: fio.latencyUsP99,
    submitted: delta("submitted") as number,
    dispatched: delta("dispatched") as number,
    merged: delta("merged") as number,
    split: delta("split") as number,
    fastPathReads: delta("fastPathReads") as number,
    cacheHits: delta("cacheHits"),
    cacheMisses: delta("cacheMisses"),
  };
}

function medianFigures(passes: Figures[]): Figures {
  const pick = (key: keyof Figures): number => median(passes.map((p) => p[key] as number));
  const pickNullable = (key: "cacheHits" | "cacheMisses"): number | null =>
    passes.some((p) => p[key] === null) ? null : pick(key);
  return {
    iops: pick("iops"),
    mbps: pick("mbps"),
    latencyUsMean: pick("latencyUsMean"),
    latencyUsP99: pick("latencyUsP99"),
    submitted: pick("submitted"),
    dispatched: pick("dispatched"),
    merged: pick("merged"),
    split: pick("split"),
    fastPathReads: pick("fastPathReads"),
    cacheHits: pickNullable("cacheHits"),
    cacheMisses: pickNullable("cacheMisses"),
  };
}

function hitRate(f: Figures): number | null {
  if (f.cacheHits === null || f.cacheMisses === null || f.cacheHits + f.cacheMisses === 0) return null;
  return f.cacheHits / (f.cacheHits + f.cacheMisses);
}

interface Plan {
  study: Study;
  knobs: Knob[];
}

/** Runs one study's points, `ctx.runs` passes; `measurePoint` measures one point once. */
async function runStudy(
  plan: Plan,
  ctx: Context,
  measurePoint: (series: Series, knob: Knob, settings: Settings | null) => Promise<Figures>,
): Promise<StudyResult> {
  const { study, knobs } = plan;
  const settingsOf = (series: Series, knob: Knob): Settings | null =>
    study.id === "index-cache" ? null : { ...DEFAULTS, ...series.settings, ...knob.settings };
  const order = study.series.flatMap((series) => knobs.map((knob) => ({ series, knob })));
  const passes = new Map<string, Figures[]>();
  for (let pass = 0; pass < ctx.runs; pass++) {
    if (ctx.runs > 1) console.log(`  pass ${pass + 1}/${ctx.runs}`);
    for (const { series, knob } of pass % 2 === 0 ? order : [...order].reverse()) {
      process.stdout.write(`  ${series.label}, ${study.knob} ${knob.id}: `);
      const figures = await measurePoint(series, knob, settingsOf(series, knob));
      const key = `${series.id}\n${knob.id}`;
      passes.set(key, [...(passes.get(key) ?? []), figures]);
      const rate = hitRate(figures);
      console.log(
        `${formatIops(figures.iops)} IOPS, ${figures.mbps.toFixed(1)} MB/s, ${formatLatency(figures.latencyUsMean)}` +
          (rate === null ? "" : `, hit rate ${(rate * 100).toFixed(1)}%`),
      );
    }
  }
  return {
    id: study.id,
    title: study.title,
    knob: study.knob,
    series: study.series.map((s) => ({
      id: s.id,
      label: s.label,
      short: s.short,
      disk: DISKS[s.disk].label,
    })),
    knobs: knobs.map((k) => k.id),
    points: order.map(({ series, knob }) => {
      const figures = passes.get(`${series.id}\n${knob.id}`) as Figures[];
      return {
        series: series.id,
        knob: knob.id,
        settings: settingsOf(series, knob),
        serveArgs: knob.indexCache ? ["--index-cache", knob.indexCache] : [],
        workload: { ...series.workload, iodepth: knob.iodepth ?? series.workload.iodepth },
        passes: figures,
        median: medianFigures(figures),
      };
    }),
    notes: [],
  };
}

/** Studies 1–4: one daemon, disks made on first use, settings changed live between points. */
async function runEngineStudies(plans: Plan[], ctx: Context): Promise<StudyResult[]> {
  const home = path.join(ctx.scratch, "home");
  const daemon = await startVdiskDaemon(
    home,
    path.join(ctx.scratch, "nbd.sock"),
    path.join(ctx.scratch, "daemon.log"),
    [],
  );
  const results: StudyResult[] = [];
  try {
    const created = new Set<DiskId>();
    for (const plan of plans) {
      console.log(`\n${plan.study.title} (${plan.study.id})`);
      const result = await runStudy(plan, ctx, async (series, knob, settings) => {
        if (!created.has(series.disk)) {
          daemon.createDisk(series.disk, DISK_BYTES, "raw", []);
          const emulate = DISKS[series.disk].emulate;
          if (emulate) daemon.cli(["set"], [series.disk, "--emulate", emulate]);
          created.add(series.disk);
        }
        daemon.cli(["set"], [series.disk, ...settingsArgs(settings as Settings)]);
        const workload = { ...series.workload, iodepth: knob.iodepth ?? series.workload.iodepth };
        return measure(daemon, series.disk, workload, ctx);
      });
      printStudy(result);
      results.push(result);
    }
  } finally {
    await daemon.stop();
  }
  return results;
}

/** Study 5: fill a vdisk image once, then restart the daemon with each --index-cache. */
async function runIndexCacheStudy(plan: Plan, ctx: Context): Promise<StudyResult> {
  console.log(`\n${plan.study.title} (${plan.study.id})`);
  const home = path.join(ctx.scratch, "index-home");
  const socket = path.join(ctx.scratch, "index-nbd.sock");
  const log = path.join(ctx.scratch, "index-daemon.log");
  const disk = "image";
  const fillStarted = Date.now();
  let daemon = await startVdiskDaemon(home, socket, log, []);
  let indexBytes: unknown;
  try {
    daemon.createDisk(disk, IMAGE_BYTES, "vdisk", []);
    // Random 4 KiB writes without repeats (fio's random map) until IMAGE_FILL_BYTES are written.
    const fill = [
      "--rw=randwrite",
      "--bs=4k",
      "--iodepth=32",
      "--randrepeat=0",
      `--io_size=${IMAGE_FILL_BYTES}`,
    ];
    await fioJob(daemon.diskUri(disk), fill, path.join(ctx.scratch, "fio.json"));
    const info = (await daemon.api("GET", `/v1/disks/${disk}`)).json as { image?: { indexBytes?: unknown } };
    indexBytes = info.image?.indexBytes;
  } finally {
    await daemon.stop();
  }
  const seconds = ((Date.now() - fillStarted) / 1000).toFixed(1);
  const note =
    `Filled with ${IMAGE_FILL_BYTES / 4096} random 4 KiB writes in ${seconds} s; index ` +
    (typeof indexBytes === "number"
      ? `${indexBytes} bytes on disk (${indexBytes / 4096} nodes of 4 KiB).`
      : "size not reported.");
  console.log(`  ${note}`);
  const result = await runStudy(plan, ctx, async (series, knob) => {
    daemon = await startVdiskDaemon(
      home,
      socket,
      log,
      knob.indexCache ? ["--index-cache", knob.indexCache] : [],
    );
    try {
      return await measure(daemon, disk, series.workload, ctx, true);
    } finally {
      await daemon.stop();
    }
  });
  result.notes.push(note);
  return result;
}

// ---------------------------------------------------------------------------------------------------
// Output.

function formatIops(v: number): string {
  return v >= 1000 ? `${(v / 1000).toFixed(1)}k` : v.toFixed(0);
}

function formatLatency(us: number): string {
  if (us >= 1e6) return `${(us / 1e6).toFixed(2)} s`;
  if (us >= 1000) return `${(us / 1000).toFixed(us >= 1e5 ? 0 : 1)} ms`;
  return `${us.toFixed(0)} µs`;
}

function formatCount(n: number): string {
  return n >= 10_000 ? `${(n / 1000).toFixed(0)}k` : String(Math.round(n));
}

/** The table of a study: a header line, then one line per point. */
function studyTable(result: StudyResult): string[][] {
  const withCache = result.id === "index-cache";
  const header = [
    "workload",
    result.knob,
    "IOPS",
    "MB/s",
    "lat mean",
    "lat p99",
    "submitted",
    "dispatched",
    "disp/sub",
    "merged",
    "split",
    "fast-path",
  ];
  if (withCache) header.push("cache hits", "misses", "hit rate");
  const lines = [header];
  for (const p of result.points) {
    const f = p.median;
    const label = result.series.find((s) => s.id === p.series)?.label ?? p.series;
    const line = [
      label,
      p.knob,
      formatIops(f.iops),
      f.mbps.toFixed(1),
      formatLatency(f.latencyUsMean),
      formatLatency(f.latencyUsP99),
      formatCount(f.submitted),
      formatCount(f.dispatched),
      f.submitted > 0 ? (f.dispatched / f.submitted).toFixed(2) : "-",
      formatCount(f.merged),
      formatCount(f.split),
      formatCount(f.fastPathReads),
    ];
    if (withCache) {
      const rate = hitRate(f);
      line.push(
        f.cacheHits === null ? "-" : formatCount(f.cacheHits),
        f.cacheMisses === null ? "-" : formatCount(f.cacheMisses),
        rate === null ? "-" : `${(rate * 100).toFixed(1)}%`,
      );
    }
    lines.push(line);
  }
  return lines;
}

function printStudy(result: StudyResult): void {
  console.log(`\n${result.title}:`);
  printTable(studyTable(result));
  for (const note of result.notes) console.log(note);
}

function markdownTable(lines: string[][]): string {
  const [header, ...rows] = lines as [string[], ...string[][]];
  const align = header.map((_, i) => (i < 2 ? "---" : "---:"));
  return [header, align, ...rows].map((cells) => `| ${cells.join(" | ")} |`).join("\n");
}

function writeDocs(
  results: StudyResult[],
  meta: { date: string; commit: string | null; machine: Record<string, unknown>; ctx: Context },
): string[] {
  const docs = path.join(ROOT, "docs");
  const charts = path.join(docs, "charts");
  fs.mkdirSync(charts, { recursive: true });
  const written: string[] = [];
  const { machine, ctx } = meta;
  const load = (machine.loadAverageAtStart as number[]).map((l) => l.toFixed(1)).join(", ");
  const model = (m: object): string =>
    Object.entries(m)
      .filter(([key]) => key !== "kind")
      .map(([key, value]) => `${key}=${value}`)
      .join(", ");
  const parts = [
    "# Request-engine knob study",
    "",
    `_Generated by \`npm run knobs\` (bench/knobs.ts) on ${meta.date}; edit the script, not this file._`,
    "",
    "The request engine ([engine.md](engine.md)) merges, splits, bounds and sorts the requests of every " +
      "disk. These tables vary one of its knobs at a time on vdisk's emulated devices " +
      '([devices.md](devices.md), "Latency-emulating device"), after the study of Xen\'s blktap2/tapdisk2 ' +
      "that motivated it (Q. Zhang, *Impacts on the I/O performance of the virtual disk in Xen*, UBC 2012: " +
      "request aggregation, a 44 KiB maximum request size, the ring's length, request sorting, the " +
      "metadata cache's miss rate).",
    "",
    "## Setup",
    "",
    `- Machine: ${machine.cpus} × ${machine.cpuModel}, Linux ${machine.kernel}, Node ${machine.node}, ` +
      `${machine.fio}; load average at start ${load}. Commit ${meta.commit ?? "unknown"}.`,
    `- One daemon (\`vdisk serve --listen none --http none --socket S\`, a scratch home); sparse raw ` +
      `${DISK_BYTES / GiB} GiB disks, nothing filled (the emulated devices delay reads of holes like any ` +
      `read). fio's nbd engine over the Unix socket: ${ctx.ramp} s warm-up, ${ctx.seconds} s measured, ` +
      (ctx.runs === 1 ? "1 pass" : `${ctx.runs} passes (figures are medians)`) +
      `. Sequential workloads cover the first ${SEQUENTIAL_REGION_BYTES / GiB} GiB, random ones the whole disk.`,
    "- Every point sets all four engine settings live with `vdisk set` (the defaults: merge " +
      `${DEFAULTS.merge}, max request ${size(DEFAULTS.maxRequestBytes)}, queue depth ${DEFAULTS.queueDepth}, ` +
      `sort ${DEFAULTS.sort}; except what the study varies).`,
    `- emulated hdd (\`--emulate hdd\`): ${model(hdd)} — ${(hddRandomUs() / 1000).toFixed(1)} ms a random ` +
      `4 KiB read, ${hddSequentialUs(4096).toFixed(0)} µs a sequential one; one head, serves in arrival order.`,
    `- emulated ssd (\`--emulate ssd\`): ${model(ssd)}.`,
    "- page cache: a raw disk without emulation (its file in the page cache).",
    "- Columns: fio's IOPS, MB/s (10^6 bytes/s), mean total latency and 99th percentile completion latency; " +
      "the deltas of the disk's engine counters over the fio run, warm-up included: requests submitted, " +
      "device requests dispatched, their ratio, requests merged into another, extra pieces from splitting, " +
      "reads answered by the page-cache fast path (not submitted).",
    "",
    "The emulated devices run on a real clock in the daemon's process, on a machine whose two cores also " +
      "run fio (and possibly other work): the CPU cost per request caps small-request throughput well " +
      "below what the models allow, and short runs are noisy.",
  ];
  for (const [i, result] of results.entries()) {
    const study = STUDIES.find((s) => s.id === result.id) as Study;
    const chart = `charts/knobs-${result.id}.svg`;
    fs.writeFileSync(path.join(docs, chart), svgChart(result.title, study.charts(result)));
    written.push(path.join(docs, chart));
    parts.push("", `## ${i + 1}. ${result.title}`, "", study.about(), "");
    if (result.notes.length > 0) parts.push(result.notes.join(" "), "");
    parts.push(`![${result.title}](${chart})`, "");
    parts.push(markdownTable(studyTable(result)));
  }
  const file = path.join(docs, "engine-knobs.md");
  fs.writeFileSync(file, parts.join("\n") + "\n");
  written.unshift(file);
  return written;
}

// ---------------------------------------------------------------------------------------------------
// Main.

/** KNOBS_STUDIES: "id[:knob/knob...],..." → the studies and points to run, in the canonical order. */
function plans(spec: string | undefined): Plan[] {
  const wanted = new Map<string, string[] | null>();
  for (const item of (spec ?? STUDIES.map((s) => s.id).join(",")).split(",").filter(Boolean)) {
    const [id, knobs] = item.split(":") as [string, string | undefined];
    const study = STUDIES.find((s) => s.id === id);
    if (!study) throw new Error(`unknown study ${id} (known: ${STUDIES.map((s) => s.id).join(", ")})`);
    const ids = knobs ? knobs.split("/") : null;
    const unknown = (ids ?? []).filter((k) => !study.knobs.some((knob) => knob.id === k));
    if (unknown.length > 0) {
      throw new Error(
        `study ${id} has no point ${unknown.join(", ")} (its points: ${study.knobs.map((k) => k.id).join(", ")})`,
      );
    }
    wanted.set(id, ids);
  }
  return STUDIES.filter((s) => wanted.has(s.id)).map((study) => {
    const ids = wanted.get(study.id);
    return { study, knobs: ids ? study.knobs.filter((k) => ids.includes(k.id)) : study.knobs };
  });
}

/** Fails at once (before anything runs) if a point needs `vdisk serve --index-cache` and it is unknown. */
function checkIndexCacheOption(plan: Plan | undefined): void {
  if (!plan?.knobs.some((k) => k.indexCache)) return;
  const help = run(process.execPath, [VDISK_BIN, "serve", "--help"]);
  if (!help.includes("--index-cache")) {
    throw new Error(
      "the index-cache study needs `vdisk serve --index-cache SIZE`, which this vdisk does not have " +
        `(${VDISK_BIN} serve --help does not list it). Build a tree that has it, or leave the study out: ` +
        `KNOBS_STUDIES=${STUDIES.filter((s) => s.id !== "index-cache")
          .map((s) => s.id)
          .join(",")} ` +
        "(or index-cache:default, the daemon's default cache only)",
    );
  }
}

async function main(): Promise<void> {
  const ctx: Context = {
    scratch: "",
    seconds: Number(env("KNOBS_SECONDS", "8")),
    ramp: Number(env("KNOBS_RAMP", "2")),
    runs: Number(env("KNOBS_RUNS", "1")),
  };
  if (!(ctx.runs >= 1 && Number.isInteger(ctx.runs)))
    throw new Error("KNOBS_RUNS must be a positive integer");
  if (!(ctx.seconds > 0 && ctx.ramp >= 0)) throw new Error("KNOBS_SECONDS must be > 0, KNOBS_RAMP >= 0");
  const all = plans(process.env.KNOBS_STUDIES);
  const indexPlan = all.find((p) => p.study.id === "index-cache");
  const enginePlans = all.filter((p) => p !== indexPlan);
  checkIndexCacheOption(indexPlan);

  const points = all.reduce((n, p) => n + p.study.series.length * p.knobs.length, 0);
  // Per point: fio's start and stop and a `vdisk set` (~1.5 s on 2 shared cores); the index-cache study
  // also fills its image (~15 s) and restarts the daemon per point (~1.5 s).
  const minutes =
    (ctx.runs * points * (ctx.seconds + ctx.ramp + 1.5) +
      (indexPlan ? 15 + ctx.runs * indexPlan.knobs.length * 1.5 : 0)) /
    60;
  console.log(
    `vdisk knob study: ${all.map((p) => `${p.study.id} (${p.study.series.length * p.knobs.length})`).join(", ")}` +
      ` = ${points} points × ${ctx.runs} pass${ctx.runs === 1 ? "" : "es"} of ${ctx.seconds} s (+${ctx.ramp} s` +
      ` warm-up); expect about ${minutes.toFixed(0)} min`,
  );
  const machine = describeMachine();
  const started = new Date();
  ctx.scratch = fs.mkdtempSync(path.join(process.env.KNOBS_DIR ?? os.tmpdir(), "vdisk-knobs-"));
  const results: StudyResult[] = [];
  try {
    if (enginePlans.length > 0) results.push(...(await runEngineStudies(enginePlans, ctx)));
    if (indexPlan) {
      const result = await runIndexCacheStudy(indexPlan, ctx);
      printStudy(result);
      results.push(result);
    }
  } finally {
    if (process.env.KNOBS_KEEP) console.log(`scratch kept: ${ctx.scratch}`);
    else fs.rmSync(ctx.scratch, { recursive: true, force: true });
  }

  const commit = gitCommit();
  const out = {
    date: started.toISOString(),
    wallSeconds: (Date.now() - started.getTime()) / 1000,
    machine,
    settings: {
      seconds: ctx.seconds,
      ramp: ctx.ramp,
      runs: ctx.runs,
      studies: all.map((p) => ({ id: p.study.id, points: p.knobs.map((k) => k.id) })),
      diskBytes: DISK_BYTES,
      imageBytes: IMAGE_BYTES,
      imageFillBytes: IMAGE_FILL_BYTES,
      sequentialRegionBytes: SEQUENTIAL_REGION_BYTES,
      engineDefaults: DEFAULTS,
      models: { hdd, ssd },
      vdiskCommit: commit,
    },
    studies: results,
  };
  const file = path.join(RESULTS_DIR, `knobs-${out.date.replace(/[:.]/g, "-")}.json`);
  fs.mkdirSync(path.dirname(file), { recursive: true });
  fs.writeFileSync(file, JSON.stringify(out, null, 2) + "\n");
  const shown = (f: string): string =>
    f.startsWith(process.cwd() + path.sep) ? path.relative(process.cwd(), f) : f;
  console.log(`\nresults: ${shown(file)} (${(out.wallSeconds / 60).toFixed(1)} min)`);
  if (env("KNOBS_DOCS", "1") !== "0") {
    const written = writeDocs(results, { date: out.date, commit, machine, ctx });
    console.log(`docs: ${written.map(shown).join(", ")}`);
  }
}

main().catch((err) => {
  console.error(`\nknob study failed: ${err instanceof Error ? err.message : String(err)}`);
  process.exit(1);
});
