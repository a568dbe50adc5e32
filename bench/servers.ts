/**
 * The servers `npm run bench` compares, and the harness that measures one of them once: start it on an
 * empty disk in a directory of its own, fill it with the master image through itself, build a snapshot
 * chain on top if it is a chain server, run every row once, stop it and delete its files (which also
 * drops their page cache, so only one server's copy of the image is ever cached next to the master).
 *
 * Exported for other scripts that reuse the harness (a knob study runs vdisk servers with different
 * BenchContext.vdiskArgs / vdiskSet through measureServer()).
 */
import { spawn, type ChildProcess } from "node:child_process";
import * as fs from "node:fs";
import * as http from "node:http";
import * as path from "node:path";
import {
  type Measurement,
  type Row,
  RssSampler,
  VDISK_BIN,
  fio,
  readRss,
  run,
  runAsync,
  stopChild,
  waitForSocket,
} from "./common";

/** Depth of the snapshot chain over the data: vdisk-chain and qemu-nbd-qcow2-chain. */
export const VDISK_CHAIN_DEPTH = 64;
export const QCOW2_CHAIN_DEPTH = 32;

export interface BenchContext {
  /** The run's scratch directory; each server gets a subdirectory, logs go to scratch/logs/. */
  scratch: string;
  /** The pseudo-random raw image every server is filled with (sizeBytes long). */
  master: string;
  sizeBytes: number;
  /** Extra arguments for `vdisk serve` (BENCH_VDISK_ARGS). */
  vdiskArgs: string[];
  /** If not empty, `vdisk set --home H DISK <vdiskSet>` runs after every vdisk disk is created. */
  vdiskSet: string[];
}

/** A server serving the disk under test. */
export interface Running {
  uri: string;
  /** The server process (for its resident size). */
  pid: number | undefined;
  /** The daemon, for vdisk servers (its API and CLI). */
  vdisk?: VdiskDaemon;
  stop(): Promise<void>;
}

export interface Server {
  id: string;
  label: string;
  /** vdisk servers are compared with the best of the peers on each row. */
  kind: "vdisk" | "peer";
  /** Measured only when named in BENCH_SERVERS (variants kept to justify a design choice). */
  optional?: boolean;
  /** Serves an EMPTY disk of ctx.sizeBytes, backed by files under `dir`. */
  start(ctx: BenchContext, dir: string): Promise<Running>;
  /** After the harness filled the disk through `running`: turn it into what is measured (chains). */
  afterFill?(ctx: BenchContext, dir: string, running: Running): Promise<Running>;
}

// ---------------------------------------------------------------------------------------------------
// Building blocks.

/** Fills a served disk with the master image over NBD (so the server's page cache is filled by writes). */
export async function fillOverNbd(master: string, uri: string): Promise<void> {
  await runAsync("qemu-img", ["convert", "-n", "-f", "raw", "-O", "raw", "-W", master, uri]);
}

/** Spawns a server that listens on a Unix socket; returns once the socket exists (kills it otherwise). */
export async function spawnServer(command: string, args: string[], socket: string): Promise<Running> {
  const child = spawn(command, args, { stdio: "ignore" });
  try {
    await waitForSocket(socket, child, command);
  } catch (err) {
    await stopChild(child);
    throw err;
  }
  return { uri: `nbd+unix:///?socket=${socket}`, pid: child.pid, stop: () => stopChild(child) };
}

export function startQemuNbd(
  file: string,
  format: "raw" | "qcow2",
  aio: "threads" | "io_uring",
  socket: string,
): Promise<Running> {
  // fio's nbd engine connects twice: -t (persistent) and -e (shared) are needed.
  return spawnServer(
    "qemu-nbd",
    ["-f", format, "-t", "-e", "8", "--cache=writeback", `--aio=${aio}`, "-k", socket, file],
    socket,
  );
}

export function emptyRaw(file: string, sizeBytes: number): string {
  fs.closeSync(fs.openSync(file, "w"));
  fs.truncateSync(file, sizeBytes);
  return file;
}

/** An empty qcow2 image of sizeBytes, filled with the master through qemu-nbd (then stopped). */
export async function fillQcow2Base(ctx: BenchContext, file: string, socket: string): Promise<void> {
  run("qemu-img", ["create", "-q", "-f", "qcow2", file, String(ctx.sizeBytes)]);
  const server = await startQemuNbd(file, "qcow2", "threads", socket);
  try {
    await fillOverNbd(ctx.master, server.uri);
  } finally {
    await server.stop();
  }
}

/**
 * Stacks qcow2 overlays number first..last on `top` (files overlay-N.qcow2 in `dir`), calling `eachLayer`
 * on each new one (to write into it); returns the new top.
 */
export function addQcow2Overlays(
  top: string,
  dir: string,
  first: number,
  last: number,
  eachLayer?: (file: string, layer: number) => void,
): string {
  for (let layer = first; layer <= last; layer++) {
    const next = path.join(dir, `overlay-${layer}.qcow2`);
    run("qemu-img", ["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", top, next]);
    eachLayer?.(next, layer);
    top = next;
  }
  return top;
}

/** A call to the vdisk management API over its Unix socket. */
export function vdiskApi(
  socket: string,
  method: string,
  route: string,
  body?: unknown,
): Promise<{ status: number; json: unknown }> {
  return new Promise((resolve, reject) => {
    const payload = body === undefined ? undefined : Buffer.from(JSON.stringify(body));
    const request = http.request(
      {
        socketPath: socket,
        agent: false, // a kept-alive socket may have been closed by the server while qemu-img ran
        method,
        path: route,
        headers: payload ? { "content-type": "application/json", "content-length": payload.length } : {},
      },
      (response) => {
        const chunks: Buffer[] = [];
        response.on("data", (chunk: Buffer) => chunks.push(chunk));
        response.on("end", () => {
          const text = Buffer.concat(chunks).toString("utf8");
          const status = response.statusCode ?? 0;
          let json: unknown = null;
          try {
            json = JSON.parse(text);
          } catch {
            json = text;
          }
          if (status >= 400) reject(new Error(`${method} ${route}: ${status} ${text}`));
          else resolve({ status, json });
        });
      },
    );
    request.on("error", (err) => reject(new Error(`${method} ${route}: ${err.message}`)));
    if (payload) request.write(payload);
    request.end();
  });
}

export interface VdiskDaemon {
  home: string;
  child: ChildProcess;
  pid: number | undefined;
  /** The NBD URI of a disk (or DISK@SNAP export). */
  diskUri(disk: string): string;
  /** Runs `vdisk <command> --home H <args>` (throws with its stderr if it fails). */
  cli(command: string[], args: string[]): string;
  api(method: string, route: string, body?: unknown): Promise<{ status: number; json: unknown }>;
  /** `vdisk create`, then `vdisk set` with `setArgs` if any (BENCH_VDISK_SET; fails loudly). */
  createDisk(name: string, sizeBytes: number, format: "raw" | "vdisk", setArgs: string[]): void;
  stop(): Promise<void>;
}

/** `vdisk serve` on a fresh home, NBD on a Unix socket only, no TCP listeners; stderr to `log`. */
export async function startVdiskDaemon(
  home: string,
  socket: string,
  log: string,
  extraArgs: string[],
): Promise<VdiskDaemon> {
  const child = spawn(
    process.execPath,
    [
      VDISK_BIN,
      "serve",
      "--home",
      home,
      "--listen",
      "none",
      "--http",
      "none",
      "--socket",
      socket,
      ...extraArgs,
    ],
    { stdio: ["ignore", "ignore", fs.openSync(log, "a")] },
  );
  try {
    await waitForSocket(path.join(home, "run", "daemon.json"), child, `vdisk serve (log: ${log})`);
  } catch (err) {
    await stopChild(child);
    throw err;
  }
  const apiSocket = path.join(home, "run", "api.sock");
  const cli = (command: string[], args: string[]): string =>
    run(process.execPath, [VDISK_BIN, ...command, "--home", home, ...args]);
  return {
    home,
    child,
    pid: child.pid,
    diskUri: (disk) => `nbd+unix:///${disk}?socket=${socket}`,
    cli,
    api: (method, route, body) => vdiskApi(apiSocket, method, route, body),
    createDisk(name, sizeBytes, format, setArgs) {
      cli(["create"], [name, "--size", String(sizeBytes), "--format", format]);
      if (setArgs.length > 0) cli(["set"], [name, ...setArgs]);
    },
    stop: () => stopChild(child),
  };
}

/** `count` snapshots of `disk` named PREFIX1..PREFIXcount; the disk stays the writable head. */
export async function vdiskSnapshots(
  daemon: VdiskDaemon,
  disk: string,
  count: number,
  prefix: string,
): Promise<void> {
  for (let i = 1; i <= count; i++) {
    await daemon.api("POST", `/v1/disks/${disk}/snapshots`, { name: `${prefix}${i}` });
  }
}

// ---------------------------------------------------------------------------------------------------
// The servers.

/**
 * vdisk serving disk "bench"; with `snapshots`, that many are taken after the fill (data at the bottom).
 * `serveArgs` go to this server's `vdisk serve` before BENCH_VDISK_ARGS.
 */
export function vdiskServer(
  id: string,
  label: string,
  format: "raw" | "vdisk",
  snapshots = 0,
  serveArgs: string[] = [],
): Server {
  return {
    id,
    label,
    kind: "vdisk",
    optional: serveArgs.length > 0,
    async start(ctx, dir) {
      const log = path.join(ctx.scratch, "logs", `${path.basename(dir)}.log`);
      const daemon = await startVdiskDaemon(path.join(dir, "home"), path.join(dir, "nbd.sock"), log, [
        ...serveArgs,
        ...ctx.vdiskArgs,
      ]);
      try {
        daemon.createDisk("bench", ctx.sizeBytes, format, ctx.vdiskSet);
      } catch (err) {
        await daemon.stop();
        throw err;
      }
      return { uri: daemon.diskUri("bench"), pid: daemon.pid, stop: daemon.stop, vdisk: daemon };
    },
    afterFill:
      snapshots > 0
        ? async (_ctx, _dir, running) => {
            await vdiskSnapshots(running.vdisk as VdiskDaemon, "bench", snapshots, "s");
            return running;
          }
        : undefined,
  };
}

export function qemuNbdRawServer(id: string, label: string, aio: "threads" | "io_uring"): Server {
  return {
    id,
    label,
    kind: "peer",
    start: (ctx, dir) =>
      startQemuNbd(
        emptyRaw(path.join(dir, "disk.raw"), ctx.sizeBytes),
        "raw",
        aio,
        path.join(dir, "nbd.sock"),
      ),
  };
}

/**
 * qemu-nbd on a qcow2 image. With `overlays`, the filled image becomes the base of that many empty
 * overlays (qemu-img create -b) and the top one is served, with the same flags.
 */
export function qcow2Server(id: string, label: string, overlays = 0): Server {
  return {
    id,
    label,
    kind: "peer",
    start(ctx, dir) {
      const base = path.join(dir, "base.qcow2");
      run("qemu-img", ["create", "-q", "-f", "qcow2", base, String(ctx.sizeBytes)]);
      return startQemuNbd(base, "qcow2", "threads", path.join(dir, "nbd.sock"));
    },
    afterFill:
      overlays > 0
        ? async (_ctx, dir, running) => {
            await running.stop();
            const top = addQcow2Overlays(path.join(dir, "base.qcow2"), dir, 1, overlays);
            fs.rmSync(path.join(dir, "nbd.sock"), { force: true });
            return startQemuNbd(top, "qcow2", "threads", path.join(dir, "nbd.sock"));
          }
        : undefined,
  };
}

export function nbdkitFileServer(id: string, label: string): Server {
  return {
    id,
    label,
    kind: "peer",
    start(ctx, dir) {
      const image = emptyRaw(path.join(dir, "disk.raw"), ctx.sizeBytes);
      const socket = path.join(dir, "nbd.sock");
      return spawnServer("nbdkit", ["--foreground", "--unix", socket, "file", `file=${image}`], socket);
    },
  };
}

export const SERVERS: Server[] = [
  vdiskServer("vdisk", "vdisk raw", "raw"),
  vdiskServer("vdisk-image", "vdisk image", "vdisk"),
  vdiskServer("vdisk-chain", `vdisk image, ${VDISK_CHAIN_DEPTH}-deep chain`, "vdisk", VDISK_CHAIN_DEPTH),
  qemuNbdRawServer("qemu-nbd", "qemu-nbd raw (threads)", "threads"),
  qemuNbdRawServer("qemu-nbd-uring", "qemu-nbd raw io_uring", "io_uring"),
  qcow2Server("qemu-nbd-qcow2", "qemu-nbd qcow2"),
  qcow2Server("qemu-nbd-qcow2-chain", `qemu-nbd qcow2, ${QCOW2_CHAIN_DEPTH}-deep chain`, QCOW2_CHAIN_DEPTH),
  nbdkitFileServer("nbdkit", "nbdkit file"),
  // Opt-in (BENCH_SERVERS=...): the image with every reply written by the event loop through Node's
  // socket writes, as before the reply writer (docs/nbd-server.md, "Reply writer").
  vdiskServer("vdisk-image-loop-replies", "vdisk image, --reply-thread off", "vdisk", 0, [
    "--reply-thread",
    "off",
  ]),
];

// ---------------------------------------------------------------------------------------------------
// The harness.

/** One server measured once: every row once, plus what it cost to prepare and its memory. */
export interface ServerPass {
  rows: Record<string, Measurement>;
  /** Start, fill through the server, chain building. */
  prepareSeconds: number;
  /** syncfs after preparing, so no server's rows run during the writeback of its own fill. */
  syncSeconds: number;
  /** The server process's VmRSS, sampled every 500 ms during the fio runs: the largest sample. */
  rssMaxBytes: number;
  /** Its VmHWM just before it was stopped: the peak over its whole life, fill included. */
  rssPeakBytes: number;
}

export interface MeasureOptions {
  seconds: number;
  ramp: number;
  /** Names the server's directory and log: `<id>-<tag>` (e.g. the pass number). */
  tag: string;
  onRow?: (row: Row, measurement: Measurement) => void;
}

export async function measureServer(
  server: Server,
  ctx: BenchContext,
  rows: Row[],
  options: MeasureOptions,
): Promise<ServerPass> {
  const dir = path.join(ctx.scratch, `${server.id}-${options.tag}`);
  fs.mkdirSync(dir, { recursive: true });
  fs.mkdirSync(path.join(ctx.scratch, "logs"), { recursive: true });
  const started = process.hrtime.bigint();
  const seconds = (since: bigint): number => Number(process.hrtime.bigint() - since) / 1e9;
  const launched: Running[] = []; // everything started; stopping a stopped one is a no-op
  try {
    let running = await server.start(ctx, dir);
    launched.push(running);
    await fillOverNbd(ctx.master, running.uri);
    if (server.afterFill) {
      running = await server.afterFill(ctx, dir, running);
      launched.push(running);
    }
    const prepareSeconds = seconds(started);
    const syncStarted = process.hrtime.bigint();
    await runAsync("sync", ["-f", dir]);
    const syncSeconds = seconds(syncStarted);

    const sampler = running.pid ? new RssSampler(running.pid, 500) : undefined;
    sampler?.start();
    const results: Record<string, Measurement> = {};
    try {
      for (const row of rows) {
        const measurement = await fio(
          running.uri,
          row,
          options.seconds,
          options.ramp,
          path.join(dir, "fio.json"),
        );
        results[row.id] = measurement;
        options.onRow?.(row, measurement);
      }
    } finally {
      sampler?.stop();
    }
    const peak = running.pid ? readRss(running.pid) : null;
    return {
      rows: results,
      prepareSeconds,
      syncSeconds,
      rssMaxBytes: sampler?.maxBytes ?? 0,
      rssPeakBytes: peak?.peakBytes ?? 0,
    };
  } finally {
    for (const running of launched.reverse()) await running.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  }
}
