/**
 * `npm run bench` (also `node dist/bench/run.js` from any directory): the same fio workloads (fio's nbd
 * engine, over a Unix socket) against vdisk and its peers in one run, side by side, with ratios.
 * Performance claims come from here, never from tests. See ../shared/ANCHORS.md for measuring pitfalls.
 *
 * Servers (servers.ts). Each starts on an empty disk in a directory of its own and is filled with one
 * pseudo-random raw image through itself, over NBD (qemu-img convert), so every server's page cache is
 * filled by its own writes — how the page cache was filled changes 4 KiB write speed several-fold:
 *   vdisk                 vdisk raw: `vdisk serve`, a raw disk
 *   vdisk-image           vdisk image: the same with a vdisk-format (copy-on-write) disk
 *   vdisk-chain           vdisk image, 64-deep chain: the image filled, then 64 snapshots taken; the disk
 *                         stays the writable head, so every read finds its data at the bottom of the chain
 *   qemu-nbd              qemu-nbd -f raw -t -e 8 --cache=writeback --aio=threads
 *   qemu-nbd-uring        the same with --aio=io_uring
 *   qemu-nbd-qcow2        qemu-nbd on a qcow2 image (the peer of the vdisk image)
 *   qemu-nbd-qcow2-chain  a qcow2 base filled through qemu-nbd, 32 empty overlays on it
 *                         (qemu-img create -b), the top served like qemu-nbd-qcow2
 *   nbdkit                nbdkit file plugin
 * Rows: 4 KiB random read QD1 and QD32, 4 KiB random write QD32, 64 KiB sequential read QD8, 1 MiB
 * sequential write QD8, each BENCH_SECONDS after BENCH_RAMP seconds of warm-up.
 *
 * Interleaved passes, against drift (the machine's speed wanders over a long run, so servers measured
 * one after another are not comparable): BENCH_RUNS passes; in each pass every server in turn is started,
 * filled, synced (syncfs, so no server runs its rows during the writeback of its own fill), measured on
 * every row once and stopped, and its files deleted (which drops their page cache: only the master and
 * one server's copy are ever cached). Odd passes go through the servers in reverse order. Each figure is
 * the median over the passes.
 *
 * Printed: a table of figures (median, ± half the spread across passes, QD1 latency, the server
 * process's largest VmRSS sampled every 500 ms during its fio runs), then a table of ratios: each vdisk
 * server ÷ the best peer on the row (named), and the pairs vdisk raw ÷ qemu-nbd (threads), vdisk image ÷
 * qemu-nbd qcow2, vdisk chain ÷ qemu-nbd qcow2 chain; then "daemon RSS max" of each vdisk server.
 * Higher is better on every row, so a ratio above 1 means vdisk is faster.
 *
 * Environment:
 *   BENCH_SIZE       image size (default 4G; one server copy exists at a time, plus the master)
 *   BENCH_SECONDS    seconds per fio run (10)          BENCH_RAMP   fio warm-up seconds (2)
 *   BENCH_RUNS       passes (3); figures are medians over the passes
 *   BENCH_SERVERS    comma list of server ids (default: all above but the opt-in variants, such as
 *                    vdisk-image-loop-replies: the image with `--reply-thread off`)
 *   BENCH_ROWS       comma list of row ids (randread-4k-qd1, randread-4k-qd32, randwrite-4k-qd32,
 *                    read-64k-qd8, write-1m-qd8)
 *   BENCH_SECTIONS   "servers,image" (default); image = reads at the bottom of snapshot chains of several
 *                    depths, snapshot create/delete times, index size (image.ts), not interleaved
 *   BENCH_VDISK_ARGS extra arguments appended to `vdisk serve` (e.g. "--index-cache 16M")
 *   BENCH_VDISK_SET  if set, `vdisk set --home H DISK <these arguments>` runs after each vdisk disk is
 *                    created (e.g. "--merge off --queue-depth 8"); the bench fails if it fails
 *   BENCH_DIR        where the scratch directory is made (default: the OS temp dir)
 *   BENCH_KEEP=1     keep the scratch directory (daemon logs in logs/) for a post-mortem
 * Noise: on a machine whose kernel runs DAMON with a pageout scheme (common/damonPageout, recorded in the
 * JSON), cold page cache is paged out behind the benchmark's back, so page-cache rows sometimes read from
 * the disk; a warning is printed and the spread column shows it.
 * Results: the tables on stdout, and JSON in bench/results/<timestamp>.json: the machine's description,
 * the settings, per server and row every pass's figure, the median, latencies (mean and p99), RSS, the
 * order of each pass, the best peer and the ratios per row.
 */
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import { parseSize } from "../src/util/size";
import { printImageResults, runImageBench, type ImageBenchResults } from "./image";
import {
  type Row,
  RESULTS_DIR,
  ROWS,
  describeMachine,
  env,
  envArgs,
  format,
  formatMiB,
  gitCommit,
  makeMaster,
  median,
  printTable,
} from "./common";
import { type BenchContext, type Server, type ServerPass, SERVERS, measureServer } from "./servers";

/** The one-to-one comparisons printed next to the best-peer ratios. */
const PAIRS = [
  { vdisk: "vdisk", peer: "qemu-nbd", header: "raw ÷ qemu-nbd" },
  { vdisk: "vdisk-image", peer: "qemu-nbd-qcow2", header: "image ÷ qcow2" },
  { vdisk: "vdisk-chain", peer: "qemu-nbd-qcow2-chain", header: "chain ÷ qcow2 chain" },
];
const SHORT: Record<string, string> = { vdisk: "raw", "vdisk-image": "image", "vdisk-chain": "chain" };

interface RowResult {
  /** One figure per pass, in pass order (IOPS, or GB/s). */
  passes: number[];
  median: number;
  /** Half the range across passes, in % of the median. */
  spreadPercent: number;
  latencyUsMean: number;
  latencyUsP99: number;
  latencyUsMeanPasses: number[];
  latencyUsP99Passes: number[];
}

interface ServerResult {
  id: string;
  label: string;
  kind: Server["kind"];
  rows: Record<string, RowResult>;
  /** Largest VmRSS sample during the fio runs, over all passes, and per pass. */
  rssMaxBytes: number;
  rssMaxBytesPasses: number[];
  /** VmHWM before stopping (peak over the server's life, its fill included), largest over passes. */
  rssPeakBytes: number;
  prepareSecondsPasses: number[];
  syncSecondsPasses: number[];
}

interface RowComparison {
  bestPeer: string | null;
  bestPeerValue: number | null;
  /** vdisk server id → its figure ÷ the best peer's. */
  vsBestPeer: Record<string, number>;
  /** "vdisk/peer" → ratio, for the PAIRS measured. */
  pairs: Record<string, number>;
}

function pick<T extends { id: string; optional?: boolean }>(
  all: T[],
  filter: string[] | undefined,
  what: string,
): T[] {
  if (!filter) return all.filter((item) => item.optional !== true);
  const unknown = filter.filter((id) => !all.some((item) => item.id === id));
  if (unknown.length > 0) {
    throw new Error(
      `unknown ${what} ${unknown.join(", ")} (known: ${all.map((item) => item.id).join(", ")})`,
    );
  }
  return all.filter((item) => filter.includes(item.id));
}

function summarize(server: Server, passes: ServerPass[], rows: Row[]): ServerResult {
  const result: ServerResult = {
    id: server.id,
    label: server.label,
    kind: server.kind,
    rows: {},
    rssMaxBytes: Math.max(0, ...passes.map((p) => p.rssMaxBytes)),
    rssMaxBytesPasses: passes.map((p) => p.rssMaxBytes),
    rssPeakBytes: Math.max(0, ...passes.map((p) => p.rssPeakBytes)),
    prepareSecondsPasses: passes.map((p) => p.prepareSeconds),
    syncSecondsPasses: passes.map((p) => p.syncSeconds),
  };
  for (const row of rows) {
    const measured = passes.map((p) => p.rows[row.id]).filter((m) => m !== undefined);
    if (measured.length === 0) continue;
    const values = measured.map((m) => m.value);
    const mid = median(values);
    result.rows[row.id] = {
      passes: values,
      median: mid,
      spreadPercent: mid > 0 ? (50 * (Math.max(...values) - Math.min(...values))) / mid : 0,
      latencyUsMean: median(measured.map((m) => m.latencyUsMean)),
      latencyUsP99: median(measured.map((m) => m.latencyUsP99)),
      latencyUsMeanPasses: measured.map((m) => m.latencyUsMean),
      latencyUsP99Passes: measured.map((m) => m.latencyUsP99),
    };
  }
  return result;
}

function compare(results: Record<string, ServerResult>, servers: Server[], row: Row): RowComparison {
  const figure = (id: string): number | undefined => results[id]?.rows[row.id]?.median;
  let bestPeer: string | null = null;
  for (const server of servers) {
    if (server.kind !== "peer") continue;
    const value = figure(server.id);
    if (value !== undefined && (bestPeer === null || value > (figure(bestPeer) as number)))
      bestPeer = server.id;
  }
  const bestPeerValue = bestPeer === null ? null : (figure(bestPeer) as number);
  const vsBestPeer: Record<string, number> = {};
  for (const server of servers) {
    const value = figure(server.id);
    if (server.kind === "vdisk" && value !== undefined && bestPeerValue)
      vsBestPeer[server.id] = value / bestPeerValue;
  }
  const pairs: Record<string, number> = {};
  for (const pair of PAIRS) {
    const a = figure(pair.vdisk);
    const b = figure(pair.peer);
    if (a !== undefined && b) pairs[`${pair.vdisk}/${pair.peer}`] = a / b;
  }
  return { bestPeer, bestPeerValue, vsBestPeer, pairs };
}

function printFigures(
  results: Record<string, ServerResult>,
  servers: Server[],
  rows: Row[],
  runs: number,
): void {
  console.log(
    `\nFigures (median of ${runs} interleaved pass${runs === 1 ? "" : "es"}` +
      `${runs > 1 ? ", ± half the spread across passes" : ""}; QD1 with mean latency;` +
      " RSS max: the server process's largest VmRSS, sampled every 500 ms during its fio runs):",
  );
  const lines = [["server", ...rows.map((row) => row.label), "RSS max"]];
  for (const server of servers) {
    const result = results[server.id];
    const cells = [server.label];
    for (const row of rows) {
      const r = result?.rows[row.id];
      if (!r) {
        cells.push("-");
        continue;
      }
      let cell = format(r.median, row.unit);
      if (row.iodepth === 1) cell += ` (${r.latencyUsMean.toFixed(0)} µs)`;
      if (runs > 1) cell += ` ±${r.spreadPercent.toFixed(0)}%`;
      cells.push(cell);
    }
    cells.push(result?.rssMaxBytes ? formatMiB(result.rssMaxBytes) : "-");
    lines.push(cells);
  }
  printTable(lines);
}

function printRatios(
  comparisons: Record<string, RowComparison>,
  results: Record<string, ServerResult>,
  servers: Server[],
  rows: Row[],
): void {
  const vdisks = servers.filter((s) => s.kind === "vdisk");
  const pairs = PAIRS.filter((pair) => results[pair.vdisk] && results[pair.peer]);
  if (vdisks.length === 0 || (servers.length === vdisks.length && pairs.length === 0)) return;
  const label = (id: string): string => servers.find((s) => s.id === id)?.label ?? id;
  console.log("\nRatios (every row: higher is better, so > 1 means vdisk is faster):");
  const lines = [
    [
      "row",
      "best peer",
      ...vdisks.map((s) => `${SHORT[s.id] ?? s.id} ÷ best`),
      ...pairs.map((p) => p.header),
    ],
  ];
  const ratio = (value: number | undefined): string => (value === undefined ? "-" : `${value.toFixed(2)}×`);
  for (const row of rows) {
    const c = comparisons[row.id] as RowComparison;
    lines.push([
      row.label,
      c.bestPeer === null ? "-" : `${label(c.bestPeer)} ${format(c.bestPeerValue as number, row.unit)}`,
      ...vdisks.map((s) => ratio(c.vsBestPeer[s.id])),
      ...pairs.map((p) => ratio(c.pairs[`${p.vdisk}/${p.peer}`])),
    ]);
  }
  printTable(lines);
  const legend = vdisks.map((s) => `${SHORT[s.id] ?? s.id} = ${s.label}`);
  for (const pair of pairs) legend.push(`${pair.header.split(" ÷ ")[1]} = ${label(pair.peer)}`);
  console.log(`  ${legend.join("; ")}`);
}

async function main(): Promise<void> {
  const size = parseSize(env("BENCH_SIZE", "4G"));
  const seconds = Number(env("BENCH_SECONDS", "10"));
  const ramp = Number(env("BENCH_RAMP", "2"));
  const runs = Number(env("BENCH_RUNS", "3"));
  if (!(runs >= 1 && Number.isInteger(runs))) throw new Error(`BENCH_RUNS must be a positive integer`);
  const sections = env("BENCH_SECTIONS", "servers,image").split(",");
  const servers = sections.includes("servers")
    ? pick(SERVERS, process.env.BENCH_SERVERS?.split(","), "server")
    : [];
  const rows = pick(ROWS, process.env.BENCH_ROWS?.split(","), "row");
  const vdiskArgs = envArgs("BENCH_VDISK_ARGS");
  const vdiskSet = envArgs("BENCH_VDISK_SET");
  const scratch = fs.mkdtempSync(path.join(process.env.BENCH_DIR ?? os.tmpdir(), "vdisk-bench-"));
  const ctx: BenchContext = {
    scratch,
    master: path.join(scratch, "master.raw"),
    sizeBytes: size,
    vdiskArgs,
    vdiskSet,
  };
  if (servers.length > 0) {
    // Rough: each fio run costs ~0.65 s beyond its seconds; a fill ~5 s per GiB (2 cores, shared).
    const fioMinutes = (runs * servers.length * rows.length * (seconds + ramp + 0.65)) / 60;
    const fillMinutes = (runs * servers.length * 5 * (size / 1024 ** 3)) / 60;
    console.log(
      `vdisk bench: ${servers.length} servers × ${rows.length} rows × ${runs} interleaved passes of ${seconds}s` +
        ` (+${ramp}s ramp), image ${size} bytes; expect about ${(fioMinutes + fillMinutes).toFixed(0)} min` +
        `${sections.includes("image") ? " plus the image section" : ""}`,
    );
  }
  if (vdiskArgs.length > 0) console.log(`vdisk serve ... ${vdiskArgs.join(" ")}`);
  if (vdiskSet.length > 0) console.log(`vdisk set --home H DISK ${vdiskSet.join(" ")}`);
  const machine = describeMachine();
  if (machine.damonPageout === true) {
    console.log(
      "warning: the kernel's DAMON pages out cold memory here (a kdamond with a pageout scheme): page-cache " +
        "rows may read from the disk at random moments; expect a wide spread between passes",
    );
  }
  const started = new Date();
  makeMaster(ctx.master, size);

  const passes: Record<string, ServerPass[]> = Object.fromEntries(servers.map((s) => [s.id, []]));
  const passOrder: string[][] = [];
  let imageResults: ImageBenchResults | null = null;
  try {
    for (let pass = 0; pass < (servers.length > 0 ? runs : 0); pass++) {
      const order = pass % 2 === 0 ? servers : [...servers].reverse();
      passOrder.push(order.map((s) => s.id));
      console.log(`pass ${pass + 1}/${runs}`);
      for (const server of order) {
        process.stdout.write(`  ${server.label}: `);
        const result = await measureServer(server, ctx, rows, {
          seconds,
          ramp,
          tag: `p${pass + 1}`,
          onRow: (row, m) => process.stdout.write(`${row.id}=${format(m.value, row.unit)} `),
        });
        (passes[server.id] as ServerPass[]).push(result);
        const rss = result.rssMaxBytes ? `, RSS max ${formatMiB(result.rssMaxBytes)}` : "";
        process.stdout.write(`(prepared in ${result.prepareSeconds.toFixed(1)} s${rss})\n`);
      }
    }
    if (sections.includes("image")) {
      console.log("image section: snapshot chains, snapshot timings, index size");
      imageResults = await runImageBench(ctx, { seconds, ramp, runs });
    }
  } finally {
    if (process.env.BENCH_KEEP) console.log(`scratch kept: ${scratch}`);
    else fs.rmSync(scratch, { recursive: true, force: true });
  }

  const results: Record<string, ServerResult> = {};
  for (const server of servers)
    results[server.id] = summarize(server, passes[server.id] as ServerPass[], rows);
  const comparisons: Record<string, RowComparison> = {};
  for (const row of rows) comparisons[row.id] = compare(results, servers, row);

  if (servers.length > 0) {
    printFigures(results, servers, rows, runs);
    printRatios(comparisons, results, servers, rows);
    const daemons = servers.filter((s) => s.kind === "vdisk");
    if (daemons.length > 0) {
      const figures = daemons.map((s) => `${s.label} ${formatMiB(results[s.id]?.rssMaxBytes ?? 0)}`);
      console.log(`\ndaemon RSS max: ${figures.join(", ")} (target: < 256 MiB plus configured caches)`);
    }
  }
  if (imageResults) printImageResults(imageResults);

  const out = {
    date: started.toISOString(),
    wallSeconds: (Date.now() - started.getTime()) / 1000,
    machine,
    settings: {
      sizeBytes: size,
      seconds,
      ramp,
      runs,
      interleaved: true,
      sections,
      vdiskArgs,
      vdiskSet,
      vdiskCommit: gitCommit(),
    },
    servers: servers.map((s) => ({ id: s.id, label: s.label, kind: s.kind })),
    rows,
    passOrder,
    results,
    comparisons,
    image: imageResults,
  };
  const file = path.join(RESULTS_DIR, `${out.date.replace(/[:.]/g, "-")}.json`);
  fs.mkdirSync(path.dirname(file), { recursive: true });
  fs.writeFileSync(file, JSON.stringify(out, null, 2) + "\n");
  const underCwd = file.startsWith(process.cwd() + path.sep);
  console.log(`\nresults: ${underCwd ? path.relative(process.cwd(), file) : file}`);
}

main().catch((err) => {
  console.error(`\nbench failed: ${err instanceof Error ? err.message : String(err)}`);
  process.exit(1);
});
