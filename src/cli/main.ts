/**
 * The `vdisk` command (commander). `serve` runs the daemon in this process; every other command talks to
 * the running daemon of the home through the API (client.ts), so the CLI holds no state of its own.
 *
 * Every command takes `--home DIR` (else $VDISK_HOME, else ./vdisk-home) and `--json` (print the API's JSON
 * body exactly). Exit status: 0 success, 1 a VdiskError (printed as `vdisk: error:` + `  hint:`) or a
 * `check` that found problems, 2 a usage error found by commander.
 *
 * `top` (top.ts) is the live view; `stats` prints the same counters once (GET /v1/stats).
 *
 * Snapshots are named DISK@SNAP wherever one name is expected (clone, rollback, export, NBD export names);
 * `snapshot create|delete` take DISK SNAP (or DISK@SNAP).
 */
import { spawnSync } from "node:child_process";
import * as path from "node:path";
import { Command, CommanderError, InvalidArgumentError } from "commander";
import { VdiskError } from "../errors";
import { blockBytesPreferred, requestBytesMaxCeiling } from "../limits";
import { runDaemon, vdiskVersion, type DaemonOptions } from "../daemon/daemon";
import { parseSnapshotName } from "../daemon/catalog";
import type { CheckReport, DeleteResult, DiskInfo, DiskTree, SnapshotInfo } from "../daemon/registry";
import type { JobView } from "../daemon/jobs";
import type { DiskStats, StatsSnapshot } from "../monitor/types";
import { formatSize, parseDiskSize, parseSize } from "../util/size";
import { type ApiClient, type ApiResult, type CommonOptions, clientFor } from "./client";
import {
  checkText,
  deleteText,
  diskDetails,
  diskStatsText,
  diskTable,
  engineLines,
  pinsText,
  jobProgress,
  jobSummary,
  keyValues,
  output,
  print,
  printError,
  snapshotTable,
  statsText,
  treeText,
} from "./output";
import { runTop } from "./top";
import { registerReplay } from "./replay";
import { registerPools } from "./pool";
import { parsePins } from "../tier/pools";

const jobPollMs = 200;

function diskPath(name: string): string {
  return `/v1/disks/${encodeURIComponent(name)}`;
}

function snapshotPath(disk: string, snapshot: string): string {
  return `${diskPath(disk)}/snapshots/${encodeURIComponent(snapshot)}`;
}

/** `DISK SNAP` or `DISK@SNAP` → both parts. */
function snapshotTarget(disk: string, snapshot: string | undefined): { disk: string; snapshot: string } {
  if (snapshot === undefined) return parseSnapshotName(disk);
  return { disk, snapshot };
}

function choice(option: string, choices: readonly string[]): (value: string) => string {
  return (value) => {
    if (!choices.includes(value)) {
      throw new InvalidArgumentError(`${option} takes ${choices.join(", ")}, not "${value}"`);
    }
    return value;
  };
}

function positiveInteger(option: string): (value: string) => number {
  return (value) => {
    const number = Number(value);
    if (!/^\d+$/.test(value) || !Number.isSafeInteger(number) || number < 1) {
      throw new InvalidArgumentError(`${option} takes a whole number of at least 1, not "${value}"`);
    }
    return number;
  };
}

function nonNegativeInteger(option: string): (value: string) => number {
  return (value) => {
    const number = Number(value);
    if (!/^\d+$/.test(value) || !Number.isSafeInteger(number)) {
      throw new InvalidArgumentError(`${option} takes a whole number (0 or more), not "${value}"`);
    }
    return number;
  };
}

function requestBytes(text: string): number {
  const bytes = parseSize(text);
  if (bytes < blockBytesPreferred || bytes > requestBytesMaxCeiling) {
    throw new VdiskError(
      "BAD_SIZE",
      `--max-request ${text} is outside ${formatSize(blockBytesPreferred)}..${formatSize(requestBytesMaxCeiling)}`,
      {
        hint: "the default is 32M; give a size from 4K to 256M",
      },
    );
  }
  return bytes;
}

/** `--reply-thread`: a size, or "off" (null: Node's own socket writes). */
function replyThreadBytes(text: string): number | null {
  if (text === "off") return null;
  let bytes: number;
  try {
    bytes = parseSize(text);
  } catch {
    throw new VdiskError("BAD_SIZE", `--reply-thread takes a size or off, not "${text}"`, {
      hint: "the default is 32K; e.g. --reply-thread 64K, 0 (every reply) or off",
    });
  }
  if (bytes > requestBytesMaxCeiling) {
    throw new VdiskError("BAD_SIZE", `--reply-thread ${text} is larger than any reply can be`, {
      hint: "the default is 32K; give a size up to 256M, 0 (every reply), or off",
    });
  }
  return bytes;
}

// ---- Commands ------------------------------------------------------------------------------------------

interface ServeOptions extends CommonOptions {
  listen?: string;
  socket?: string;
  http?: string;
  allowRemoteApi?: boolean;
  apiToken?: string;
  maxRequest?: string;
  maxConnections?: number;
  maxInflight?: number;
  pollUs?: number;
  replyThread?: string;
  indexCache?: string;
  monitor?: string;
}

async function serve(options: ServeOptions): Promise<void> {
  const daemonOptions: DaemonOptions = {
    home: options.home,
    listen: options.listen,
    socket: options.socket,
    http: options.http,
    allowRemoteApi: options.allowRemoteApi === true,
    apiToken: options.apiToken,
    requestBytesMax: options.maxRequest === undefined ? undefined : requestBytes(options.maxRequest),
    connectionsMax: options.maxConnections,
    inflightPerConnectionMax: options.maxInflight,
    pollUs: options.pollUs,
    replyThreadBytes: options.replyThread === undefined ? undefined : replyThreadBytes(options.replyThread),
    indexCacheBytes: options.indexCache === undefined ? undefined : parseSize(options.indexCache),
    monitor: options.monitor !== "off",
  };
  try {
    await runDaemon(daemonOptions, options.json ? "json" : "text");
  } catch (err) {
    process.exit(printError(err));
  }
}

async function create(
  name: string,
  options: CommonOptions & { size: string; format: string; pool: string },
): Promise<void> {
  const size = parseDiskSize(options.size);
  const result = await clientFor(options).post<DiskInfo>("/v1/disks", {
    name,
    size,
    format: options.format,
    pool: options.pool,
  });
  output(
    options,
    result,
    (disk) => `created disk ${disk.name}: ${formatSize(disk.size)}, thin ${disk.format} (${disk.file})`,
  );
}

async function attach(
  file: string,
  name: string,
  options: CommonOptions & { readOnly?: boolean },
): Promise<void> {
  const result = await clientFor(options).post<DiskInfo>("/v1/attach", {
    file: path.resolve(file),
    name,
    readOnly: options.readOnly === true,
  });
  output(
    options,
    result,
    (disk) =>
      `attached ${file} as disk ${disk.name}: ${formatSize(disk.size)}, raw${disk.readOnly ? ", read-only" : ""}, served in place`,
  );
}

async function list(options: CommonOptions): Promise<void> {
  const result = await clientFor(options).get<{ disks: DiskInfo[] }>("/v1/disks");
  output(options, result, (data) => diskTable(data.disks));
}

async function info(name: string, options: CommonOptions): Promise<void> {
  output(options, await clientFor(options).get<DiskInfo>(diskPath(name)), diskDetails);
}

async function resize(
  name: string,
  options: CommonOptions & { size: string; shrink?: boolean },
): Promise<void> {
  const size = parseDiskSize(options.size);
  const body = { size, shrink: options.shrink === true };
  const result = await clientFor(options).post<DiskInfo>(`${diskPath(name)}/resize`, body);
  output(options, result, (disk) => `disk ${disk.name} is now ${formatSize(disk.size)}`);
}

async function set(
  name: string,
  options: CommonOptions & {
    merge?: string;
    maxRequest?: string;
    queueDepth?: number;
    sort?: string;
    emulate?: string;
    priority?: string;
    pin?: string[];
  },
): Promise<void> {
  const body: Record<string, unknown> = {};
  if (options.priority !== undefined) body.priority = options.priority;
  if (options.pin !== undefined) body.pins = parsePins(options.pin, parseSize);
  if (options.merge !== undefined) body.merge = options.merge === "on";
  if (options.maxRequest !== undefined) body.maxRequestBytes = parseSize(options.maxRequest);
  if (options.queueDepth !== undefined) body.queueDepth = options.queueDepth;
  if (options.sort !== undefined) body.sort = options.sort;
  if (options.emulate !== undefined) body.emulate = options.emulate;
  if (Object.keys(body).length === 0) {
    throw new VdiskError("INVALID_ARGUMENT", "nothing to set", {
      hint: `name a setting, e.g. vdisk set ${name} --queue-depth 32 (vdisk set --help lists them)`,
    });
  }
  const result = await clientFor(options).post<DiskInfo>(`${diskPath(name)}/settings`, body);
  output(options, result, (disk) =>
    keyValues([
      ["disk", disk.name],
      ...(disk.engine ? engineLines(disk.engine) : []),
      ["emulate", disk.emulate ?? "none"],
      ["priority", disk.priority ?? "normal"],
      ["pins", pinsText(disk.pins ?? [])],
    ]),
  );
}

function collectPins(value: string, previous: string[] | undefined): string[] {
  return [...(previous ?? []), value];
}

async function remove(name: string, options: CommonOptions & { force?: boolean }): Promise<void> {
  const query = options.force ? "?force=1" : "";
  const result = await clientFor(options).delete<DeleteResult>(`${diskPath(name)}${query}`);
  output(options, result, deleteText);
}

async function importImage(
  file: string,
  name: string,
  options: CommonOptions & { format: string },
): Promise<void> {
  const client = clientFor(options);
  const body = { file: path.resolve(file), name, format: options.format };
  const started = await client.post<JobView>("/v1/import", body);
  await followJob(client, started.data, options, file, `disk ${name}`);
}

async function exportImage(
  name: string,
  file: string,
  options: CommonOptions & { format: string },
): Promise<void> {
  const client = clientFor(options);
  const body = { name, file: path.resolve(file), format: options.format };
  const started = await client.post<JobView>("/v1/export", body);
  const what = name.includes("@") ? `snapshot ${name}` : `disk ${name}`;
  await followJob(client, started.data, options, what, file);
}

async function snapshotCreate(disk: string, snap: string | undefined, options: CommonOptions): Promise<void> {
  const target = snapshotTarget(disk, snap);
  const result = await clientFor(options).post<SnapshotInfo>(`${diskPath(target.disk)}/snapshots`, {
    name: target.snapshot,
  });
  output(
    options,
    result,
    (snapshot) => `created snapshot ${snapshot.name} (read-only; NBD export name ${snapshot.name})`,
  );
}

async function snapshotList(disk: string, options: CommonOptions): Promise<void> {
  const result = await clientFor(options).get<{ disk: string; snapshots: SnapshotInfo[] }>(
    `${diskPath(disk)}/snapshots`,
  );
  output(options, result, (data) => snapshotTable(data.disk, data.snapshots));
}

async function snapshotDelete(
  disk: string,
  snap: string | undefined,
  options: CommonOptions & { force?: boolean },
): Promise<void> {
  const target = snapshotTarget(disk, snap);
  const query = options.force ? "?force=1" : "";
  const result = await clientFor(options).delete<{ deleted: string; freedBytes: number }>(
    `${snapshotPath(target.disk, target.snapshot)}${query}`,
  );
  output(
    options,
    result,
    (data) => `deleted snapshot ${data.deleted} (freed ${formatSize(data.freedBytes)})`,
  );
}

async function clone(source: string, name: string, options: CommonOptions): Promise<void> {
  const target = parseSnapshotName(source);
  const result = await clientFor(options).post<DiskInfo>(
    `${snapshotPath(target.disk, target.snapshot)}/clone`,
    { name },
  );
  output(
    options,
    result,
    (disk) => `created disk ${disk.name}: a clone of ${source}, ${formatSize(disk.size)}`,
  );
}

async function rollback(source: string, options: CommonOptions & { force?: boolean }): Promise<void> {
  const target = parseSnapshotName(source);
  const result = await clientFor(options).post<DiskInfo>(
    `${snapshotPath(target.disk, target.snapshot)}/rollback`,
    { force: options.force === true },
  );
  output(options, result, (disk) => `disk ${disk.name} rolled back to ${source} (${formatSize(disk.size)})`);
}

async function tree(disk: string, options: CommonOptions): Promise<void> {
  output(options, await clientFor(options).get<DiskTree>(`${diskPath(disk)}/tree`), treeText);
}

async function check(disk: string, options: CommonOptions): Promise<void> {
  const result = await clientFor(options).post<CheckReport>(`${diskPath(disk)}/check`, {});
  output(options, result, checkText);
  if (!result.data.ok) {
    const count = result.data.problems.length;
    throw new VdiskError(
      "CORRUPT",
      `the check of disk ${disk} found ${count} problem${count === 1 ? "" : "s"}`,
      {
        hint: "keep the image file as it is (make a copy) and restore the disk from a backup or an export",
      },
    );
  }
}

const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

/** Poll a job to its end, with a progress bar on a terminal; print the outcome; fail if the job failed. */
async function followJob(
  client: ApiClient,
  job: JobView,
  options: CommonOptions,
  source: string,
  target: string,
): Promise<void> {
  const progress = jobProgress(!options.json && process.stderr.isTTY === true, job.kind);
  let result: ApiResult<JobView> = { status: 200, text: JSON.stringify(job, null, 2), data: job };
  try {
    while (result.data.state === "running") {
      progress.update(result.data);
      await sleep(jobPollMs);
      result = await client.get<JobView>(`/v1/jobs/${job.id}`);
    }
    progress.update(result.data);
  } finally {
    progress.stop();
  }
  const final = result.data;
  if (options.json) print(result.text);
  if (final.state === "failed") {
    const error = final.error;
    throw new VdiskError(error?.code ?? "INTERNAL", error?.message ?? `${final.kind} failed`, {
      hint: error?.hint ?? undefined,
    });
  }
  if (!options.json) print(jobSummary(final, source, target));
}

interface StatusView {
  version: string;
  pid: number;
  home: string;
  uptimeSeconds: number;
  disks: number;
  connections: number;
  jobsRunning: number;
  nbd: { tcp: string | null; unix: string | null };
  http: { tcp: string | null; unix: string };
  server: { connections: number; requests: number; errors: number };
}

async function status(options: CommonOptions): Promise<void> {
  const result = await clientFor(options).get<StatusView>("/v1/status");
  output(options, result, (data) =>
    keyValues([
      ["daemon", `vdisk ${data.version}, pid ${data.pid}, up ${data.uptimeSeconds} s`],
      ["home", data.home],
      ["disks", String(data.disks)],
      ["connections", String(data.connections)],
      ["jobs running", String(data.jobsRunning)],
      ["NBD TCP", data.nbd.tcp ? `nbd://${data.nbd.tcp}/NAME` : "off"],
      ["NBD socket", data.nbd.unix ? `nbd+unix:///NAME?socket=${data.nbd.unix}` : "off"],
      ["API", data.http.tcp ? `http://${data.http.tcp}/v1/status` : "socket only"],
      ["API socket", data.http.unix],
      [
        "NBD server",
        `${data.server.connections} connections, ${data.server.requests} requests, ${data.server.errors} errors`,
      ],
    ]),
  );
}

async function stats(disk: string | undefined, options: CommonOptions): Promise<void> {
  const client = clientFor(options);
  if (disk === undefined) {
    output(options, await client.get<StatsSnapshot>("/v1/stats"), statsText);
    return;
  }
  output(options, await client.get<DiskStats>(`${diskPath(disk)}/stats`), diskStatsText);
}

function positiveSeconds(option: string): (value: string) => number {
  return (value) => {
    const seconds = Number(value);
    if (!Number.isFinite(seconds) || seconds < 0.1 || seconds > 3600) {
      throw new InvalidArgumentError(`${option} takes seconds from 0.1 to 3600, not "${value}"`);
    }
    return seconds;
  };
}

async function top(options: CommonOptions & { once?: boolean; interval: number }): Promise<void> {
  await runTop(clientFor(options), {
    intervalSeconds: options.interval,
    once: options.once === true,
    json: options.json === true,
  });
}

// ---- Program -------------------------------------------------------------------------------------------

type Action = (...args: never[]) => Promise<void>;
/** What command modules (replay.ts, pool.ts) are handed to register their commands like main's. */
export type CommandFactory = (program: Command, spec: string, description: string) => Command;
export type Handled = <A extends Action>(action: A) => (...args: Parameters<A>) => Promise<void>;

/** Run an action; a thrown error is printed and sets exit status 1. */
function handled<A extends Action>(action: A): (...args: Parameters<A>) => Promise<void> {
  return async (...args) => {
    try {
      await action(...args);
    } catch (err) {
      process.exitCode = printError(err);
    }
  };
}

function command(program: Command, spec: string, description: string): Command {
  return program
    .command(spec)
    .description(description)
    .option("--home <dir>", "the vdisk home (default: $VDISK_HOME, else ./vdisk-home)")
    .option("--json", "print the API's JSON instead of text");
}

export function buildProgram(): Command {
  const program = new Command("vdisk")
    .description("thin virtual disks for VMs, served over NBD")
    .version(vdiskVersion())
    .exitOverride()
    .showHelpAfterError("(vdisk --help lists the commands)");
  command(program, "serve", "run the daemon: serve the home's disks over NBD and the management API")
    .option("--listen <host:port>", "NBD TCP address, or none", "127.0.0.1:10809")
    .option("--socket <path>", "NBD Unix socket, or none (default: HOME/run/nbd.sock)")
    .option("--http <host:port>", "API TCP address, or none", "127.0.0.1:10810")
    .option("--allow-remote-api", "allow --http on a non-loopback address (changes then need the API token)")
    .option("--api-token <token>", "token for API changes over TCP (default: HOME/api-token, if present)")
    .option("--max-request <size>", "largest NBD read/write payload (default 32M)")
    .option("--max-connections <n>", "simultaneous NBD connections", positiveInteger("--max-connections"))
    .option("--max-inflight <n>", "NBD requests in flight per connection", positiveInteger("--max-inflight"))
    .option(
      "--poll-us <n>",
      "keep polling this many µs after input before sleeping (QD1 latency; 0 = off, default 50)",
      nonNegativeInteger("--poll-us"),
    )
    .option(
      "--reply-thread <size>",
      "NBD replies of at least this size, on Unix sockets, are written by the connection's thread " +
        "(default 32K; off = none)",
    )
    .option(
      "--index-cache <size>",
      "memory for the index leaves of vdisk images (default 64M; 0 = keep none)",
    )
    .option(
      "--monitor <on|off>",
      "record every request for vdisk stats/top, /metrics and placement (off: to measure its cost)",
      choice("--monitor", ["on", "off"]),
      "on",
    )
    .action(serve);
  command(program, "create <name>", "create a thin disk")
    .requiredOption("--size <size>", "disk size, e.g. 20G, 512M, 1.5T (binary units)")
    .option(
      "--format <format>",
      "vdisk (snapshots, clones) or raw (a plain sparse file)",
      choice("--format", ["vdisk", "raw"]),
      "vdisk",
    )
    .option("--pool <pool>", "the pool to create it in (vdisk pool list)", "default")
    .action(handled(create));
  command(program, "list", "list the disks").action(handled(list));
  command(program, "info <name>", "show one disk").action(handled(info));
  command(program, "resize <name>", "grow (or with --shrink, shrink) a disk, even while it is in use")
    .requiredOption("--size <size>", "the new size, e.g. 40G")
    .option("--shrink", "allow making the disk smaller (the data past the new end is lost)")
    .action(handled(resize));
  command(program, "set <name>", "change a disk's request-engine settings, live (vdisk info shows them)")
    .option("--merge <on|off>", "merge adjacent queued requests", choice("--merge", ["on", "off"]))
    .option("--max-request <size>", "largest request sent to the device (merges stop, larger ones split)")
    .option("--queue-depth <n>", "requests in flight to the device at once", positiveInteger("--queue-depth"))
    .option(
      "--sort <mode>",
      "order queued requests by address: auto (when the device is rotational), on, off",
      choice("--sort", ["auto", "on", "off"]),
    )
    .option(
      "--emulate <model>",
      "make the device answer like a modelled disk: hdd, ssd, none, or e.g. hdd:rpm=5400 (no clients connected)",
    )
    .option(
      "--priority <priority>",
      "realtime (fast-class space and device queues first), normal or background",
      choice("--priority", ["realtime", "normal", "background"]),
    )
    .option(
      "--pin <pin>",
      "keep data on a device class: CLASS (whole disk), CLASS:START-END (e.g. ssd:0-4G; repeat), or none",
      collectPins,
    )
    .action(handled(set));
  command(program, "delete <name>", "delete a disk, its data and the snapshots no other disk needs")
    .option("--force", "disconnect the disk's NBD clients first")
    .action(handled(remove));
  command(program, "attach <file> <name>", "serve an existing raw image file in place, without copying it")
    .option("--read-only", "serve it read-only")
    .action(handled(attach));
  command(program, "import <file> <name>", "copy an image file (raw, qcow2) into a new thin disk")
    .option(
      "--format <format>",
      "the file's format: auto, raw or qcow2 (qcow2 needs qemu-img)",
      choice("--format", ["auto", "raw", "qcow2"]),
      "auto",
    )
    .action(handled(importImage));
  command(program, "export <name> <file>", "copy a disk or a snapshot (DISK@SNAP) into a new image file")
    .option(
      "--format <format>",
      "raw (sparse) or qcow2 (needs qemu-img)",
      choice("--format", ["raw", "qcow2"]),
      "raw",
    )
    .action(handled(exportImage));
  const snapshot = program
    .command("snapshot")
    .description("create, list and delete snapshots of a vdisk disk");
  command(snapshot, "create <disk> [snapshot]", "freeze the disk's current content as DISK@SNAPSHOT").action(
    handled(snapshotCreate),
  );
  command(snapshot, "list <disk>", "list the snapshots of a disk").action(handled(snapshotList));
  command(snapshot, "delete <disk> [snapshot]", "delete a snapshot (the disk and its clones keep their data)")
    .option("--force", "disconnect the snapshot's NBD clients first")
    .action(handled(snapshotDelete));
  command(program, "clone <disk@snapshot> <newdisk>", "make a new disk that starts as a snapshot").action(
    handled(clone),
  );
  command(program, "rollback <disk@snapshot>", "throw away a disk's changes since one of its snapshots")
    .option("--force", "disconnect the disk's NBD clients first (refused while it has any otherwise)")
    .action(handled(rollback));
  command(program, "tree <disk>", "show the snapshot tree of the disk's image").action(handled(tree));
  command(program, "check <disk>", "verify a disk's image (every index node and checksum)").action(
    handled(check),
  );
  command(program, "status", "show the daemon's addresses and counters").action(handled(status));
  command(
    program,
    "stats [disk]",
    "show request counters, clients and space, of every disk or of one",
  ).action(handled(stats));
  command(program, "top", "live view of disks and clients: IOPS, MB/s, latency, queue depth")
    .option("--once", "print one frame (two samples --interval apart) and exit; with --json, as JSON")
    .option("--interval <seconds>", "seconds between samples", positiveSeconds("--interval"), 1)
    .action(handled(top));
  registerReplay(program, command, handled);
  registerPools(program, command, handled);
  program
    .command("bench")
    .description("run the benchmark: fio against vdisk, qemu-nbd and nbdkit side by side (npm run bench)")
    .option("--size <size>", "image size (BENCH_SIZE, default 4G)")
    .option("--seconds <n>", "seconds per fio run (BENCH_SECONDS, default 10)", positiveInteger("--seconds"))
    .option(
      "--runs <n>",
      "passes; each figure is the median (BENCH_RUNS, default 3)",
      positiveInteger("--runs"),
    )
    .option("--servers <ids>", "comma-separated server ids (BENCH_SERVERS, default all)")
    .option("--rows <ids>", "comma-separated row ids (BENCH_ROWS, default all)")
    .option("--sections <list>", "servers,image (BENCH_SECTIONS)")
    .action(bench);
  return program;
}

/** `vdisk bench`: the benchmark script (bench/run.ts) with the options turned into its environment. */
function bench(options: {
  size?: string;
  seconds?: number;
  runs?: number;
  servers?: string;
  rows?: string;
  sections?: string;
}): void {
  const script = path.resolve(__dirname, "..", "..", "bench", "run.js");
  const env: NodeJS.ProcessEnv = { ...process.env };
  if (options.size !== undefined) env.BENCH_SIZE = String(parseSize(options.size));
  if (options.seconds !== undefined) env.BENCH_SECONDS = String(options.seconds);
  if (options.runs !== undefined) env.BENCH_RUNS = String(options.runs);
  if (options.servers !== undefined) env.BENCH_SERVERS = options.servers;
  if (options.rows !== undefined) env.BENCH_ROWS = options.rows;
  if (options.sections !== undefined) env.BENCH_SECTIONS = options.sections;
  const result = spawnSync(process.execPath, [script], { stdio: "inherit", env });
  process.exitCode = result.status ?? 1;
}

/** Entry point: `bin/vdisk` calls main(process.argv). */
export async function main(argv: string[]): Promise<void> {
  try {
    await buildProgram().parseAsync(argv);
  } catch (err) {
    if (err instanceof CommanderError) {
      process.exitCode = err.exitCode === 0 ? 0 : 2;
      return;
    }
    process.exitCode = printError(err);
  }
}
