/**
 * The daemon: one process per home that serves the home's disks over NBD and the management API.
 *
 * Start: resolve and prepare the home → decide who may use the API (a non-loopback --http needs
 * --allow-remote-api and a token; api-token.ts) → take its lock → open the registry (the first start of a
 * new home creates the thin 8 GiB disk `default`) → NBD on TCP and on the Unix socket, every connection
 * monitored by the StatsRecorder (unless --monitor off) → API on run/api.sock and TCP (with /v1/stats, /metrics and the
 * dashboard) → write run/daemon.json (only now can clients find us). Any failure undoes what was done and
 * throws a VdiskError with a hint (port in use, home locked, ...).
 *
 * Stop (SIGINT/SIGTERM): stop the API, let the NBD server drain in-flight requests (limits.drainTimeoutMs),
 * stop running jobs, flush and close every device, remove the run files, exit 0. A second signal exits at
 * once (status 130) without draining.
 */
import * as fs from "node:fs";
import * as path from "node:path";
import { VdiskError } from "../errors";
import * as limits from "../limits";
import { MetricsExporter } from "../monitor/prometheus";
import { StatsRecorder } from "../monitor/recorder";
import { DaemonStats } from "../monitor/stats";
import { IndexCache } from "../image/index-cache";
import { NbdServer } from "../protocol/nbd/server";
import { type ApiContext, type ApiServer, listenError, startApi } from "./api";
import { resolveApiAccess } from "./api-token";
import { createDashboardHandler } from "./dashboard";
import {
  type DaemonInfo,
  type HomePaths,
  acquireLock,
  checkSocketPath,
  homePaths,
  prepareHome,
  removeRunFiles,
  resolveHome,
  writeDaemonInfo,
} from "./home";
import { JobManager } from "./jobs";
import { DiskRegistry } from "./registry";

export const nbdListenDefault = "127.0.0.1:10809";
export const httpListenDefault = "127.0.0.1:10810";

export interface DaemonOptions {
  home?: string;
  /** NBD TCP address, "HOST:PORT" (port 0 = any free port) or "none". */
  listen?: string;
  /** NBD Unix socket path or "none"; default <home>/run/nbd.sock. */
  socket?: string;
  /** API TCP address or "none". The API's Unix socket <home>/run/api.sock is always served. */
  http?: string;
  /** Allow a non-loopback `http` address (a token is then required; see api-token.ts). */
  allowRemoteApi?: boolean;
  /** The token mutating API calls over TCP need; default: the content of <home>/api-token, if any. */
  apiToken?: string;
  requestBytesMax?: number;
  connectionsMax?: number;
  inflightPerConnectionMax?: number;
  /** Memory for the index leaves of open vdisk images (image/index-cache.ts). */
  indexCacheBytes?: number;
  /** Adaptive polling window after NBD input, µs (protocol/nbd/poller.ts); 0 = off. */
  pollUs?: number;
  /** Replies of at least this many bytes are written by each connection's writer thread; null = none. */
  replyThreadBytes?: number | null;
  handshakeTimeoutMs?: number;
  /** Record every request (default true; `vdisk serve --monitor off` measures what it costs). */
  monitor?: boolean;
  log?: (message: string) => void;
}

export interface Address {
  host: string;
  port: number;
}

export interface Daemon {
  paths: HomePaths;
  info: DaemonInfo;
  registry: DiskRegistry;
  /**
   * The request monitor: per-disk heat and profile for placement (`recorder.heat(disk)`, heat.ts
   * DiskHeatView; null while the disk has had no client or when `recorder.enabled` is false).
   */
  recorder: StatsRecorder;
  /** Whether mutating API calls over TCP need a token. */
  apiTokenRequired: boolean;
  /** Drain, flush, close, remove run files. Idempotent. */
  stop(): Promise<void>;
}

let cachedVersion: string | null = null;

/** The version in package.json. */
export function vdiskVersion(): string {
  if (cachedVersion !== null) return cachedVersion;
  try {
    const file = path.join(__dirname, "..", "..", "..", "package.json");
    cachedVersion = String(
      (JSON.parse(fs.readFileSync(file, "utf8")) as { version?: unknown }).version ?? "unknown",
    );
  } catch {
    cachedVersion = "unknown";
  }
  return cachedVersion;
}

/** "127.0.0.1:10809", "[::1]:10809", "localhost:0" → address; "none" → null. */
export function parseAddress(text: string, option: string): Address | null {
  if (text === "none") return null;
  const match = /^(?:\[([^\]]+)\]|([^:[\]]+)):(\d{1,5})$/.exec(text.trim());
  const port = match ? Number(match[3]) : NaN;
  if (!match || port > 65535) {
    throw new VdiskError("INVALID_ARGUMENT", `${option} ${text} is not HOST:PORT`, {
      hint: `write e.g. ${option} 127.0.0.1:10809, ${option} [::1]:10809 (port 0 = any free port), or ${option} none`,
    });
  }
  return { host: match[1] ?? match[2], port };
}

export function formatAddress(address: Address): string {
  return address.host.includes(":") ? `[${address.host}]:${address.port}` : `${address.host}:${address.port}`;
}

interface Started {
  stats?: DaemonStats;
  registry?: DiskRegistry;
  server?: NbdServer;
  jobs?: JobManager;
  api?: ApiServer;
  nbdSocket?: string;
}

/** Start a daemon; resolves once everything listens and run/daemon.json is written. */
export async function startDaemon(options: DaemonOptions = {}): Promise<Daemon> {
  const log = options.log ?? ((message: string) => process.stderr.write(`vdisk: ${message}\n`));
  const nbdTcp = parseAddress(options.listen ?? nbdListenDefault, "--listen");
  const httpTcp = parseAddress(options.http ?? httpListenDefault, "--http");
  const paths = homePaths(resolveHome(options.home));
  const nbdSocket = options.socket === "none" ? null : path.resolve(options.socket ?? paths.nbdSocket);
  checkSocketPath(paths.apiSocket, "API socket");
  if (nbdSocket !== null) checkSocketPath(nbdSocket, "NBD socket");

  const { created } = prepareHome(paths);
  const access = resolveApiAccess(paths, httpTcp, options);
  acquireLock(paths);
  fs.rmSync(paths.daemonFile, { force: true });
  for (const notice of access.notices) log(notice);
  const started: Started = {};
  try {
    const plan: Plan = { created, nbdTcp, httpTcp, nbdSocket, apiToken: access.token, log };
    return await startParts(options, paths, plan, started);
  } catch (err) {
    await stopParts(paths, started, 0, log);
    throw err;
  }
}

interface Plan {
  created: boolean;
  nbdTcp: Address | null;
  httpTcp: Address | null;
  nbdSocket: string | null;
  apiToken: string | null;
  log: (message: string) => void;
}

async function startParts(
  options: DaemonOptions,
  paths: HomePaths,
  plan: Plan,
  started: Started,
): Promise<Daemon> {
  const startedAt = new Date();
  const indexCache = new IndexCache(options.indexCacheBytes ?? limits.indexCacheBytesDefault);
  const registry = (started.registry = await DiskRegistry.open(paths.root, { log: plan.log, indexCache }));
  if (plan.created && registry.size === 0) {
    await registry.create(limits.defaultDiskName, limits.defaultDiskBytes);
  }
  const recorder = new StatsRecorder({ enabled: options.monitor ?? true });
  if (recorder.enabled) registry.tier.setHeatSource(recorder);
  const server = (started.server = new NbdServer({
    exports: registry,
    ...(recorder.enabled ? { monitor: recorder.monitor } : {}),
    requestBytesMax: options.requestBytesMax ?? limits.requestBytesMaxDefault,
    connectionsMax: options.connectionsMax ?? limits.connectionsMaxDefault,
    inflightPerConnectionMax: options.inflightPerConnectionMax ?? limits.inflightPerConnectionMaxDefault,
    handshakeTimeoutMs: options.handshakeTimeoutMs ?? limits.handshakeTimeoutMsDefault,
    pollUs: options.pollUs,
    replyThreadBytes: options.replyThreadBytes,
    log: plan.log,
  }));
  registry.setDisconnector(server);
  const jobs = (started.jobs = new JobManager(registry));
  const nbdBound = await listenNbd(server, plan, started);
  jobs.setNbdEndpoint({ unix: plan.nbdSocket, tcp: nbdBound });
  const info: DaemonInfo = {
    pid: process.pid,
    version: vdiskVersion(),
    startedAt: startedAt.toISOString(),
    nbd: { tcp: nbdBound, unix: plan.nbdSocket },
    http: { tcp: null, unix: paths.apiSocket },
  };
  const tokenRequired = plan.apiToken !== null;
  const status = (): object => statusView(paths, info, registry, server, jobs, startedAt, tokenRequired);
  const stats = (started.stats = new DaemonStats(
    { registry, recorder, server, indexCache, log: plan.log },
    startedAt.getTime(),
  ));
  const exporter = new MetricsExporter(() => stats.fresh(), info.version);
  const ctx: ApiContext = {
    registry,
    jobs,
    status,
    stats: () => stats.snapshot(),
    freshStats: (heatTop?: number) => stats.fresh(heatTop),
    metrics: async () => ({ contentType: exporter.contentType, text: await exporter.text() }),
    apiToken: plan.apiToken,
    log: plan.log,
  };
  ctx.dashboard = createDashboardHandler(ctx);
  const api = (started.api = await startApi(ctx, paths.apiSocket, plan.httpTcp));
  info.http.tcp = api.tcp;
  writeDaemonInfo(paths, info);
  let stopping: Promise<void> | null = null;
  const stop = (): Promise<void> => (stopping ??= stopParts(paths, started, limits.drainTimeoutMs, plan.log));
  return { paths, info, registry, recorder, apiTokenRequired: tokenRequired, stop };
}

async function listenNbd(server: NbdServer, plan: Plan, started: Started): Promise<Address | null> {
  let bound: Address | null = null;
  if (plan.nbdTcp) {
    const address = plan.nbdTcp;
    bound = await server.listenTcp(address.host, address.port).catch((err: unknown) => {
      throw listenError(err, formatAddress(address), "--listen HOST:PORT (or --listen none)");
    });
  }
  if (plan.nbdSocket !== null) {
    const socketPath = plan.nbdSocket;
    await server.listenUnix(socketPath).catch((err: unknown) => {
      throw listenError(err, socketPath, "--socket PATH (or --socket none)");
    });
    started.nbdSocket = socketPath;
  }
  return bound;
}

async function stopParts(
  paths: HomePaths,
  started: Started,
  drainMs: number,
  log: (m: string) => void,
): Promise<void> {
  await started.api?.close().catch((err: unknown) => log(`closing the API: ${String(err)}`));
  await started.server
    ?.shutdown(drainMs)
    .catch((err: unknown) => log(`stopping the NBD server: ${String(err)}`));
  await started.jobs?.cancelAll();
  await started.registry?.closeAll(log);
  started.stats?.close();
  removeRunFiles(paths, [paths.apiSocket, ...(started.nbdSocket ? [started.nbdSocket] : [])]);
}

function statusView(
  paths: HomePaths,
  info: DaemonInfo,
  registry: DiskRegistry,
  server: NbdServer,
  jobs: JobManager,
  startedAt: Date,
  tokenRequired: boolean,
): object {
  return {
    version: info.version,
    pid: info.pid,
    home: paths.root,
    startedAt: info.startedAt,
    uptimeSeconds: Math.round((Date.now() - startedAt.getTime()) / 1000),
    disks: registry.size,
    connections: registry.connections(),
    jobsRunning: jobs.running(),
    nbd: {
      tcp: info.nbd.tcp ? formatAddress(info.nbd.tcp) : null,
      unix: info.nbd.unix,
    },
    http: {
      tcp: info.http.tcp ? formatAddress(info.http.tcp) : null,
      unix: info.http.unix,
      tokenRequired,
    },
    server: server.stats(),
  };
}

/** The lines `vdisk serve` prints: how to reach the daemon. */
export function banner(daemon: Daemon): string[] {
  const names = daemon.registry.names();
  const count = names.length;
  const lines = [`vdisk: serving ${count} disk${count === 1 ? "" : "s"} from ${daemon.paths.root}`];
  const name = names.includes(limits.defaultDiskName) ? limits.defaultDiskName : names[0];
  if (name === undefined) lines.push("  no disks yet: vdisk create NAME --size 20G");
  const { tcp, unix } = daemon.info.nbd;
  if (name !== undefined && tcp) lines.push(`  qemu-img info nbd://${formatAddress(tcp)}/${name}`);
  if (name !== undefined && unix) lines.push(`  qemu-img info "nbd+unix:///${name}?socket=${unix}"`);
  if (daemon.info.http.tcp) {
    const base = `http://${formatAddress(daemon.info.http.tcp)}`;
    lines.push(`  API: ${base}/v1/status   metrics: ${base}/metrics   live view: vdisk top`);
    if (daemon.apiTokenRequired)
      lines.push("  API token required for changes over TCP (Authorization: Bearer TOKEN)");
  }
  lines.push(`  API socket: ${daemon.info.http.unix}`);
  return lines;
}

/** `vdisk serve`: start, print how to reach it (text, or run/daemon.json's content), stop on SIGINT/SIGTERM. */
export async function runDaemon(
  options: DaemonOptions = {},
  announce: "text" | "json" = "text",
): Promise<Daemon> {
  const daemon = await startDaemon(options);
  const announcement = announce === "json" ? JSON.stringify(daemon.info, null, 2) : banner(daemon).join("\n");
  process.stdout.write(announcement + "\n");
  const disks = daemon.registry.size;
  if (disks > 0 && daemon.info.nbd.tcp === null && daemon.info.nbd.unix === null) {
    process.stderr.write("vdisk: warning: NBD is disabled (--listen none --socket none)\n");
  }
  let signals = 0;
  const onSignal = (signal: NodeJS.Signals): void => {
    signals += 1;
    if (signals > 1) {
      process.stderr.write(`vdisk: ${signal} again: exiting without draining\n`);
      removeRunFiles(daemon.paths, [
        daemon.paths.apiSocket,
        ...(daemon.info.nbd.unix ? [daemon.info.nbd.unix] : []),
      ]);
      process.exit(130);
    }
    process.stderr.write(`vdisk: ${signal}: draining requests and closing disks (again to quit at once)\n`);
    daemon.stop().then(
      () => process.exit(0),
      (err: unknown) => {
        process.stderr.write(`vdisk: error while stopping: ${String(err)}\n`);
        process.exit(1);
      },
    );
  };
  process.on("SIGINT", onSignal);
  process.on("SIGTERM", onSignal);
  return daemon;
}
