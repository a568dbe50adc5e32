/**
 * Helpers shared by the benchmark scripts (run.ts, image.ts, knobs.ts): the workload rows, running
 * commands and fio (nbd engine) and reading its JSON, sampling a process's resident size, medians and
 * formatting, and a description of the machine for the results file.
 * Paths are taken from __dirname (dist/bench/ once compiled), so the scripts run from any directory.
 */
import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";

/** The repository root (this file runs as dist/bench/common.js). */
export const ROOT = path.resolve(__dirname, "..", "..");
export const VDISK_BIN = path.join(ROOT, "bin", "vdisk");
/** Where results files are kept: the source tree's bench/results/, not dist/. */
export const RESULTS_DIR = path.join(ROOT, "bench", "results");

export interface Row {
  id: string;
  label: string;
  rw: string;
  bs: string;
  iodepth: number;
  unit: "IOPS" | "GB/s";
}

/** The workloads of the main table, in the order every server runs them. */
export const ROWS: Row[] = [
  { id: "randread-4k-qd1", label: "4K rand read QD1", rw: "randread", bs: "4k", iodepth: 1, unit: "IOPS" },
  { id: "randread-4k-qd32", label: "4K rand read QD32", rw: "randread", bs: "4k", iodepth: 32, unit: "IOPS" },
  {
    id: "randwrite-4k-qd32",
    label: "4K rand write QD32",
    rw: "randwrite",
    bs: "4k",
    iodepth: 32,
    unit: "IOPS",
  },
  { id: "read-64k-qd8", label: "64K seq read QD8", rw: "read", bs: "64k", iodepth: 8, unit: "GB/s" },
  { id: "write-1m-qd8", label: "1M seq write QD8", rw: "write", bs: "1m", iodepth: 8, unit: "GB/s" },
];

export function env(name: string, fallback: string): string {
  return process.env[name] ?? fallback;
}

/** A whitespace-separated list of arguments from the environment ("" or unset: none). */
export function envArgs(name: string): string[] {
  const value = process.env[name]?.trim();
  return value ? value.split(/\s+/) : [];
}

export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

export async function waitForSocket(socket: string, child: ChildProcess, what: string): Promise<void> {
  for (let i = 0; i < 300; i++) {
    if (fs.existsSync(socket)) return;
    if (child.exitCode !== null) throw new Error(`${what} exited with ${child.exitCode}`);
    await sleep(100);
  }
  throw new Error(`${what} did not create ${socket}`);
}

export function stopChild(child: ChildProcess): Promise<void> {
  return new Promise((resolve) => {
    if (child.exitCode !== null || child.signalCode !== null) return resolve();
    const timer = setTimeout(() => child.kill("SIGKILL"), 15_000);
    child.once("exit", () => {
      clearTimeout(timer);
      resolve();
    });
    child.kill("SIGTERM");
  });
}

/** Runs a command to completion, synchronously; throws with its stderr if it fails. */
export function run(command: string, args: string[]): string {
  const result = spawnSync(command, args, { encoding: "utf8", maxBuffer: 64 * 1024 * 1024 });
  if (result.status !== 0) {
    const why = result.error ? result.error.message : (result.status ?? result.signal);
    throw new Error(`${command} ${args.join(" ")} failed (${why}): ${result.stderr}`);
  }
  return result.stdout;
}

/** Same as run(), without blocking the event loop (timers such as the RSS sampler keep running). */
export function runAsync(command: string, args: string[]): Promise<string> {
  return new Promise((resolve, reject) => {
    const child = spawn(command, args, { stdio: ["ignore", "pipe", "pipe"] });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    child.stdout.on("data", (chunk: Buffer) => out.push(chunk));
    child.stderr.on("data", (chunk: Buffer) => err.push(chunk));
    child.on("error", (error) => reject(new Error(`${command} ${args.join(" ")} failed: ${error.message}`)));
    child.on("close", (code, signal) => {
      if (code === 0) return resolve(Buffer.concat(out).toString("utf8"));
      const stderr = Buffer.concat(err).toString("utf8");
      reject(new Error(`${command} ${args.join(" ")} failed (${code ?? signal}): ${stderr}`));
    });
  });
}

export interface Measurement {
  /** IOPS, or GB/s (10^9 bytes per second) for the GB/s rows. */
  value: number;
  latencyUsMean: number;
  latencyUsP99: number;
}

/** One fio run of `row` against an NBD URI (fio's nbd engine), `ramp` s warm-up then `seconds` s. */
export async function fio(
  uri: string,
  row: Row,
  seconds: number,
  ramp: number,
  output: string,
): Promise<Measurement> {
  const result = await fioJob(
    uri,
    [
      `--rw=${row.rw}`,
      `--bs=${row.bs}`,
      `--iodepth=${row.iodepth}`,
      "--time_based",
      `--runtime=${seconds}`,
      `--ramp_time=${ramp}`,
      "--norandommap",
      "--randrepeat=0",
    ],
    output,
  );
  const value = row.unit === "IOPS" ? result.iops : result.bytesPerSecond / 1e9;
  return { value, latencyUsMean: result.latencyUsMean, latencyUsP99: result.latencyUsP99 };
}

export interface FioResult {
  iops: number;
  bytesPerSecond: number;
  /** Mean total latency (submission to completion) and the 99th percentile of completion latency. */
  latencyUsMean: number;
  latencyUsP99: number;
}

/**
 * One fio job (nbd engine) against an NBD URI with `options` (--rw, --bs, --iodepth, ...), its JSON report
 * written to `output`: the figures of its read side, or of its write side if it wrote more bytes.
 */
export async function fioJob(uri: string, options: string[], output: string): Promise<FioResult> {
  await runAsync("fio", [
    "--name=bench",
    "--ioengine=nbd",
    `--uri=${uri}`,
    ...options,
    "--output-format=json",
    `--output=${output}`,
  ]);
  const report = JSON.parse(fs.readFileSync(output, "utf8"));
  const job = report.jobs[0];
  const side = job.write.io_bytes > job.read.io_bytes ? job.write : job.read;
  return {
    iops: side.iops,
    bytesPerSecond: side.bw_bytes,
    latencyUsMean: side.lat_ns.mean / 1000,
    latencyUsP99: (side.clat_ns?.percentile?.["99.000000"] ?? 0) / 1000,
  };
}

/** Resident size and its peak (VmRSS, VmHWM) of a live process, in bytes; null once it is gone. */
export function readRss(pid: number): { rssBytes: number; peakBytes: number } | null {
  let status: string;
  try {
    status = fs.readFileSync(`/proc/${pid}/status`, "utf8");
  } catch {
    return null;
  }
  const field = (name: string): number => {
    const match = new RegExp(`^${name}:\\s+(\\d+) kB`, "m").exec(status);
    return match ? Number(match[1]) * 1024 : 0;
  };
  return { rssBytes: field("VmRSS"), peakBytes: field("VmHWM") };
}

/** Samples a process's VmRSS every `intervalMs` between start() and stop(); keeps the largest. */
export class RssSampler {
  maxBytes = 0;
  samples = 0;
  private timer: NodeJS.Timeout | undefined;

  constructor(
    private readonly pid: number,
    private readonly intervalMs = 500,
  ) {}

  start(): void {
    this.sample();
    this.timer = setInterval(() => this.sample(), this.intervalMs);
  }

  stop(): number {
    if (this.timer) clearInterval(this.timer);
    this.timer = undefined;
    this.sample();
    return this.maxBytes;
  }

  private sample(): void {
    const rss = readRss(this.pid);
    if (!rss) return;
    this.samples++;
    this.maxBytes = Math.max(this.maxBytes, rss.rssBytes);
  }
}

/** The median; for an even count, the mean of the two middle values. */
export function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = Math.floor(sorted.length / 2);
  if (sorted.length % 2 === 1) return sorted[mid] as number;
  return ((sorted[mid - 1] as number) + (sorted[mid] as number)) / 2;
}

export function format(value: number, unit: Row["unit"]): string {
  return unit === "IOPS" ? `${(value / 1000).toFixed(1)}k` : `${value.toFixed(2)} GB/s`;
}

export function formatMiB(bytes: number): string {
  return `${(bytes / 1024 ** 2).toFixed(0)} MiB`;
}

/** Prints rows of cells as left-aligned columns two spaces apart. */
export function printTable(lines: string[][]): void {
  const columns = Math.max(...lines.map((line) => line.length));
  const widths = Array.from({ length: columns }, (_, i) =>
    Math.max(...lines.map((line) => (line[i] ?? "").length)),
  );
  for (const line of lines) {
    console.log(
      line
        .map((cell, i) => cell.padEnd(widths[i] as number))
        .join("  ")
        .trimEnd(),
    );
  }
}

/** Writes the pseudo-random raw master image every server is filled from. */
export function makeMaster(file: string, sizeBytes: number): void {
  run("fio", [
    "--name=fill",
    `--filename=${file}`,
    "--rw=write",
    "--bs=1m",
    `--size=${sizeBytes}`,
    "--output=/dev/null",
  ]);
}

export function describeMachine(): Record<string, unknown> {
  const version = (command: string, args: string[]): string => {
    const result = spawnSync(command, args, { encoding: "utf8" });
    return (result.stdout || result.stderr || "").split("\n")[0]?.trim() ?? "";
  };
  return {
    cpus: os.cpus().length,
    cpuModel: os.cpus()[0]?.model,
    memoryBytes: os.totalmem(),
    kernel: os.release(),
    node: process.version,
    fio: version("fio", ["--version"]),
    qemuNbd: version("qemu-nbd", ["--version"]),
    qemuImg: version("qemu-img", ["--version"]),
    nbdkit: version("nbdkit", ["--version"]),
    loadAverageAtStart: os.loadavg(),
    damonPageout: damonPageout(),
  };
}

/**
 * Whether the kernel's DAMON reclaims cold memory here (a kdamond running a `pageout` scheme). It pages
 * out the page cache of an image that a 4 KiB random reader touches too rarely, so rows meant to run from
 * the page cache read from the disk instead, at random moments: figures then vary by several times
 * between passes. run.ts prints a warning; the JSON keeps the fact.
 */
export function damonPageout(): boolean {
  const root = "/sys/kernel/mm/damon/admin/kdamonds";
  try {
    for (const kdamond of fs.readdirSync(root)) {
      if (!/^\d+$/.test(kdamond)) continue;
      const state = fs.readFileSync(path.join(root, kdamond, "state"), "utf8").trim();
      if (state !== "on") continue;
      const contexts = path.join(root, kdamond, "contexts");
      for (const context of fs.readdirSync(contexts).filter((name) => /^\d+$/.test(name))) {
        const schemes = path.join(contexts, context, "schemes");
        for (const scheme of fs.readdirSync(schemes).filter((name) => /^\d+$/.test(name))) {
          if (fs.readFileSync(path.join(schemes, scheme, "action"), "utf8").trim() === "pageout") return true;
        }
      }
    }
  } catch {
    // no DAMON sysfs interface, or not readable: nothing reclaims behind our back that we can see
  }
  return false;
}

/** The commit of the tree being measured (with "+dirty" if it has changes), or null outside git. */
export function gitCommit(): string | null {
  try {
    const commit = run("git", ["-C", ROOT, "rev-parse", "HEAD"]).trim();
    const dirty = run("git", ["-C", ROOT, "status", "--porcelain", "--untracked-files=no"]).trim() !== "";
    return dirty ? `${commit}+dirty` : commit;
  } catch {
    return null;
  }
}
