/**
 * `vdisk replay TRACE... --disk NAME...`: replay real block-I/O traces against disks, one trace per VM, all
 * at once (src/replay/replayer.ts), and print a row per VM plus a total (or, with --json, the full report).
 *
 * Where the disks are: by default the daemon of the home — its API says where its NBD server listens
 * (GET /v1/status: the Unix socket if it has one, else TCP) and checks that each disk exists
 * (GET /v1/disks/NAME, so an unknown disk gets the daemon's own message and hint). With `--uri` the
 * replayer goes straight to that NBD server (any server: qemu-nbd, nbdkit, a remote vdisk) and the API is
 * not used; `--disk` then replaces the URI's export name.
 *
 * Pairing: `--disk` (and `--uri`) is given once for all traces or once per trace, in order. With
 * `--client-tag TAG` the export name is `DISK/TAG`, so the daemon can tell the VMs apart (the server must
 * accept such names).
 *
 * Registered on the program by main.ts through `registerReplay(program, command, handled)`, which hands
 * over main's own `command()` (adds --home and --json) and `handled()` (prints errors, exit status 1).
 */
import * as fs from "node:fs";
import { type Command, InvalidArgumentError } from "commander";
import { VdiskError } from "../errors";
import { resolveHome } from "../daemon/home";
import type { DiskInfo } from "../daemon/registry";
import { clientInflightMaxCeiling, parseNbdUri, type NbdTarget } from "../protocol/nbd/client";
import {
  connectionsMax,
  queueDepthDefault,
  runReplay,
  speedMax,
  type ReplayReport,
  type ReplayVm,
} from "../replay/replayer";
import { traceFormats, type TraceFormat } from "../replay/traces";
import { formatSize } from "../util/size";
import { ApiClient } from "./client";
import type { CommandFactory, Handled } from "./main";
import { table } from "./output";
import { formatIops, formatLatency, formatMBps } from "./top";

interface ReplayCommandOptions {
  home?: string;
  json?: boolean;
  disk?: string[];
  uri?: string[];
  format: TraceFormat | "auto";
  speed: number;
  untimed?: boolean;
  queueDepth: number;
  connections: number;
  limit?: number;
  clientTag?: string;
  seed: number;
}

interface StatusView {
  nbd: { tcp: string | null; unix: string | null };
}

function collect(value: string, previous: string[] | undefined): string[] {
  return [...(previous ?? []), value];
}

function integerWithin(option: string, min: number, max: number): (value: string) => number {
  return (value) => {
    const number = Number(value);
    if (!/^\d+$/.test(value) || !Number.isSafeInteger(number) || number < min || number > max) {
      throw new InvalidArgumentError(`${option} takes a whole number from ${min} to ${max}, not "${value}"`);
    }
    return number;
  };
}

function speedValue(value: string): number {
  const speed = Number(value);
  if (!/^\d*\.?\d+$/.test(value) || !Number.isFinite(speed) || speed <= 0 || speed > speedMax) {
    throw new InvalidArgumentError(`--speed takes a number above 0 (2 = twice as fast), not "${value}"`);
  }
  return speed;
}

function formatChoice(value: string): TraceFormat | "auto" {
  const choices = ["auto", ...traceFormats];
  if (!choices.includes(value)) {
    throw new InvalidArgumentError(`--format takes ${choices.join(", ")}, not "${value}"`);
  }
  return value as TraceFormat | "auto";
}

function tagValue(value: string): string {
  if (!/^[A-Za-z0-9._-]{1,64}$/.test(value)) {
    throw new InvalidArgumentError(
      `--client-tag takes 1 to 64 letters, digits, '.', '_' or '-', not "${value}"`,
    );
  }
  return value;
}

/** `list` given once or once per trace → one entry per trace. */
function perTrace(option: string, list: string[], traces: string[]): string[] {
  if (list.length === 1) return traces.map(() => list[0] as string);
  if (list.length === traces.length) return list;
  throw new VdiskError("INVALID_ARGUMENT", `${list.length} ${option} options for ${traces.length} traces`, {
    hint: `give ${option} once (the same for every trace) or once per trace, in the order of the traces`,
  });
}

function checkTraces(traces: string[]): void {
  for (const trace of traces) {
    try {
      fs.accessSync(trace, fs.constants.R_OK);
      if (!fs.statSync(trace).isFile()) throw Object.assign(new Error("not a file"), { code: "EISDIR" });
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      throw new VdiskError(
        code === "ENOENT" ? "NOT_FOUND" : "IO_ERROR",
        code === "ENOENT"
          ? `trace ${trace} does not exist`
          : `cannot read trace ${trace}: ${(err as Error).message}`,
        { hint: "give the path of a readable trace file (spc, disksim or msr format)" },
      );
    }
  }
}

/** The targets when the daemon of the home is used: its NBD address, and each disk checked. */
async function daemonTargets(options: ReplayCommandOptions, disks: string[]): Promise<NbdTarget[]> {
  const client = new ApiClient(resolveHome(options.home));
  const status = (await client.get<StatusView>("/v1/status")).data;
  let base: NbdTarget;
  if (status.nbd.unix !== null) base = { endpoint: { kind: "unix", path: status.nbd.unix }, exportName: "" };
  else if (status.nbd.tcp !== null) base = parseNbdUri(`nbd://${status.nbd.tcp}/`);
  else {
    throw new VdiskError("INVALID_ARGUMENT", "the daemon serves NBD on neither a socket nor TCP", {
      hint: "restart it with --socket or --listen, or give the NBD server with --uri",
    });
  }
  const checked = new Set<string>();
  for (const disk of disks) {
    if (checked.has(disk)) continue;
    checked.add(disk);
    await client.get<DiskInfo>(`/v1/disks/${encodeURIComponent(disk)}`);
  }
  return disks.map((disk) => ({ endpoint: base.endpoint, exportName: disk }));
}

async function replayCommand(traces: string[], options: ReplayCommandOptions): Promise<void> {
  checkTraces(traces);
  const diskOptions = options.disk ?? [];
  const uriOptions = options.uri ?? [];
  let targets: NbdTarget[];
  let disks: string[];
  if (uriOptions.length > 0) {
    const uris = perTrace("--uri", uriOptions, traces).map((uri) => parseNbdUri(uri));
    disks =
      diskOptions.length > 0 ? perTrace("--disk", diskOptions, traces) : uris.map((uri) => uri.exportName);
    targets = uris.map((uri, index) => ({ endpoint: uri.endpoint, exportName: disks[index] as string }));
  } else {
    if (diskOptions.length === 0) {
      throw new VdiskError("INVALID_ARGUMENT", "no disk to replay against", {
        hint: "name it with --disk NAME (once for all traces, or once per trace); vdisk list shows the disks",
      });
    }
    disks = perTrace("--disk", diskOptions, traces);
    targets = await daemonTargets(options, disks);
  }
  const tag = options.clientTag;
  const vms: ReplayVm[] = traces.map((trace, index) => {
    const target = targets[index] as NbdTarget;
    const exportName = tag === undefined ? target.exportName : `${target.exportName}/${tag}`;
    return {
      name: `vm${index + 1}`,
      trace,
      format: options.format,
      target: { endpoint: target.endpoint, exportName },
      disk: disks[index] as string,
    };
  });
  const report = await runReplay(vms, {
    timed: options.untimed !== true,
    speed: options.speed,
    queueDepth: options.queueDepth,
    connections: options.connections,
    limit: options.limit ?? null,
    seed: options.seed,
  });
  process.stdout.write(options.json ? `${JSON.stringify(report, null, 2)}\n` : `${replayText(report)}\n`);
  if (report.total.errors > 0) {
    const first = report.vms.find((vm) => vm.firstError !== null)?.firstError;
    throw new VdiskError(
      "IO_ERROR",
      `${report.total.errors} replayed requests failed; the first: ${first?.message}`,
      {
        hint: "the figures above include the failed requests; vdisk stats DISK shows the errors by code",
      },
    );
  }
}

function seconds(value: number): string {
  return value >= 100
    ? `${value.toFixed(0)}s`
    : value >= 10
      ? `${value.toFixed(1)}s`
      : `${value.toFixed(3)}s`;
}

/** The human report: the run's settings, a row per VM and a total. */
export function replayText(report: ReplayReport): string {
  const mode =
    report.mode === "timed" ? `timed at speed ${report.speed ?? 1}` : "untimed (as fast as possible)";
  const lines = [
    `replayed ${report.vms.length} trace${report.vms.length === 1 ? "" : "s"}, ${mode}, queue depth ${report.queueDepth}` +
      `${report.connections > 1 ? `, ${report.connections} connections per VM` : ""}` +
      `${report.limit !== null ? `, first ${report.limit} records` : ""}`,
  ];
  const latency = (us: number): string => formatLatency(us / 1e6);
  type Figures = Pick<
    ReplayReport["total"],
    "records" | "reads" | "writes" | "elapsedSeconds" | "iops" | "mbPerSecond" | "latency"
  >;
  const row = (labels: [string, string, string], r: Figures, delayed: number, wrapped: number): string[] => [
    ...labels,
    String(r.records),
    String(r.reads),
    String(r.writes),
    seconds(r.elapsedSeconds),
    formatIops(r.iops),
    formatMBps(r.mbPerSecond * 1e6),
    latency(r.latency.meanUs),
    latency(r.latency.p50Us),
    latency(r.latency.p90Us),
    latency(r.latency.p99Us),
    latency(r.latency.p999Us),
    latency(r.latency.maxUs),
    String(delayed),
    String(wrapped),
  ];
  const rows = report.vms.map((vm) => row([vm.vm, vm.disk, vm.format], vm, vm.delayed, vm.mapping.wrapped));
  const total = report.total;
  if (report.vms.length > 1) rows.push(row(["total", "", ""], total, total.delayed, total.wrapped));
  const headers = [
    "VM",
    "DISK",
    "FORMAT",
    "RECORDS",
    "READS",
    "WRITES",
    "TIME",
    "IOPS",
    "MB/S",
    "MEAN",
    "P50",
    "P90",
    "P99",
    "P99.9",
    "MAX",
    "DELAYED",
    "WRAPPED",
  ];
  lines.push(table(headers, rows));
  for (const vm of report.vms) {
    const notes: string[] = [];
    if (vm.mapping.clipped > 0)
      notes.push(`${vm.mapping.clipped} clipped to the disk's end or the server's maximum`);
    if (vm.mapping.zeroLength > 0)
      notes.push(`${vm.mapping.zeroLength} zero-length records sent as 512 bytes`);
    if (vm.errors > 0) notes.push(`${vm.errors} failed`);
    const late = report.mode === "timed" ? `, issued late by ${latency(vm.issueLateMeanUs)} on average` : "";
    lines.push(
      `${vm.vm}: ${vm.trace} on ${vm.uri} (${formatSize(vm.mapping.diskBytes)}, ${vm.mapping.devices} trace ` +
        `device${vm.mapping.devices === 1 ? "" : "s"}), trace span ${seconds(vm.traceSpanSeconds)}${late}` +
        `${notes.length > 0 ? `; ${notes.join(", ")}` : ""}`,
    );
  }
  return lines.join("\n");
}

/** Add `vdisk replay` to the program (main.ts calls this with its own helpers). */
export function registerReplay(program: Command, command: CommandFactory, handled: Handled): void {
  command(
    program,
    "replay <trace...>",
    "replay block-I/O traces (spc, disksim, msr) against disks, one trace per VM",
  )
    .option("--disk <name>", "disk to replay on: once for all traces or once per trace (repeat it)", collect)
    .option(
      "--uri <uri>",
      "NBD server instead of the home's daemon: nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH (repeatable like --disk)",
      collect,
    )
    .option("--format <format>", "trace format: auto, spc, disksim or msr", formatChoice, "auto")
    .option("--speed <x>", "timed replay: divide trace time by this (2 = twice as fast)", speedValue, 1)
    .option("--untimed", "ignore trace times: replay as fast as possible with --queue-depth in flight")
    .option(
      "--queue-depth <n>",
      "requests in flight per VM",
      integerWithin("--queue-depth", 1, clientInflightMaxCeiling),
      queueDepthDefault,
    )
    .option(
      "--connections <n>",
      "NBD connections per VM",
      integerWithin("--connections", 1, connectionsMax),
      1,
    )
    .option(
      "--limit <n>",
      "replay only the first N records of each trace",
      integerWithin("--limit", 1, Number.MAX_SAFE_INTEGER),
    )
    .option("--client-tag <tag>", "connect to export DISK/TAG so the daemon can tell the VMs apart", tagValue)
    .option("--seed <n>", "seed of the written data", integerWithin("--seed", 0, 0xffff_ffff), 1)
    .action(handled(replayCommand));
}
