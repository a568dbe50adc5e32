/**
 * The management API: HTTP/JSON with node:http, on the home's Unix socket (always) and on a TCP address
 * (127.0.0.1:10810 by default; none to disable). The CLI is its main client; `--json` prints its bodies.
 *
 *   GET    /v1/status                 daemon, addresses, connections, NBD server stats
 *   GET    /v1/disks                  {"disks":[disk...]}
 *   POST   /v1/disks                  {"name","size","format"?} → 201 disk  (size: bytes or "20G"; vdisk|raw)
 *   GET    /v1/disks/NAME             disk (vdisk disks: with "image", space per layer)
 *   POST   /v1/disks/NAME/resize      {"size","shrink"?} → disk
 *   DELETE /v1/disks/NAME[?force=1]   {"deleted":"NAME", vdisk: "snapshotsDeleted","snapshotsKept","imageRemoved"}
 *   GET    /v1/disks/NAME/snapshots   {"disk","snapshots":[snapshot...]}
 *   POST   /v1/disks/NAME/snapshots   {"name"} → 201 snapshot
 *   DELETE /v1/disks/NAME/snapshots/SNAP[?force=1]          {"deleted":"NAME@SNAP","freedBytes"}
 *   POST   /v1/disks/NAME/snapshots/SNAP/clone    {"name"} → 201 disk
 *   POST   /v1/disks/NAME/snapshots/SNAP/rollback {"force"?} (or ?force=1) → disk
 *   GET    /v1/disks/NAME/tree        the image's layer tree, nested
 *   POST   /v1/disks/NAME/check       {"ok","problems":[...],...} (200 even when problems are found)
 *   POST   /v1/attach                 {"file","name","readOnly"?} → 201 disk (an existing raw file, served in place)
 *   POST   /v1/import                 {"file","name","format"?} → 202 job   (file: absolute path; auto|raw|qcow2)
 *   POST   /v1/export                 {"name","file","format"?} → 202 job   (name: DISK or DISK@SNAP; raw|qcow2)
 *   GET    /v1/jobs                   {"jobs":[job...]}
 *   GET    /v1/jobs/ID                job
 *   GET    /v1/stats                  StatsSnapshot (src/monitor/types.ts): disks, clients, counters, process
 *   GET    /v1/disks/NAME/stats[?top=N]  one disk's DiskStats, with its N hottest extents (default 16)
 *   GET    /metrics                   Prometheus text format (docs/metrics.md)
 *   GET    /v1/pools                  {"pools":[pool...]} devices, classes, capacity, use, disks
 *   POST   /v1/pools                  {"name","class"?,"emulate"?} → 201 pool
 *   POST   /v1/pools/NAME/devices     {"path","class","capacity"?,"emulate"?} → 201 pool
 *   POST   /v1/pools/NAME/devices/ID  {"class"?,"capacity"? (bytes, or null: no limit)} → pool
 *   DELETE /v1/pools/NAME/devices/ID  move its data to the other devices, then remove it → pool + movedBytes
 *   POST   /v1/pools/NAME/settings    {"policy"?,"fastClass"?,"migrateBytesPerSecond"?} → pool
 *   GET    /v1/tier[?disk=NAME]       TierStatus (src/tier/tier-manager.ts): pools, devices, moves, disks
 *   POST   /v1/pools/NAME/tier/run    one placement pass now; its PassResult once its moves are done
 *   (POST /v1/disks with "pool"; settings take "priority" and "pins" too)
 * Errors: {"error":{"code","message","hint"}} with the code's HTTP status (errors.ts).
 *
 * Hardening: request bodies are capped (apiBodyBytesMax); requests from other web pages (an Origin header
 * that is not this listener's own `http://HOST`, which only the daemon's dashboard sends) or with a Host
 * that is not an IP address or localhost (DNS rebinding) are refused, and bodies must be JSON, so a web
 * page cannot drive the daemon into reading or writing files. Responses name disk files relative
 * to the home and job files by base name only.
 *
 * Trust: the Unix socket lives in the owner-only run directory and is trusted. Over TCP, when an API token
 * is configured (`ctx.apiToken`), every mutating call (POST, PUT, PATCH, DELETE) needs
 * `Authorization: Bearer TOKEN` (401 otherwise) — this is checked before anything else, the dashboard
 * hook included — and every string of a TCP response is scrubbed of absolute paths outside the home
 * (they become their base names; see `scrubPaths`).
 *
 * The web dashboard plugs in through `ctx.dashboard`: it sees each request first (after the token check)
 * and returns true when it answered it.
 */
import * as crypto from "node:crypto";
import * as http from "node:http";
import * as net from "node:net";
import * as fs from "node:fs";
import * as path from "node:path";
import { VdiskError, type ErrorCode } from "../errors";
import { KiB, heatTopMax } from "../limits";
import type { StatsSnapshot } from "../monitor/types";
import { parseDiskSize, parseSize } from "../util/size";
import { diskFormats, type DiskFormat } from "./catalog";
import { type ExportFormat, type ImportFormat, type JobManager, exportFormats, importFormats } from "./jobs";
import type { DiskRegistry } from "./registry";

export const apiBodyBytesMax = 64 * KiB;

export interface ApiContext {
  registry: DiskRegistry;
  jobs: JobManager;
  status(): object;
  /** The live statistics now (space figures may be up to a second old); for the dashboard's stream. */
  stats(): StatsSnapshot;
  /** The live statistics with fresh space figures (GET /v1/stats), `heatTop` hottest extents per disk. */
  freshStats(heatTop?: number): Promise<StatsSnapshot>;
  /** One Prometheus scrape (GET /metrics). */
  metrics(): Promise<{ contentType: string; text: string }>;
  /** The web dashboard: returns true when it answered the request. */
  dashboard?: (req: http.IncomingMessage, res: http.ServerResponse) => boolean;
  /** Mutating calls over TCP need `Authorization: Bearer <apiToken>`; null or absent = no token. */
  apiToken?: string | null;
  log?: (message: string) => void;
}

interface Reply {
  status: number;
  /** A JSON body, or, with `text`, ignored. */
  body: unknown;
  /** A non-JSON body (GET /metrics) and its content type. */
  text?: string;
  contentType?: string;
}

type Body = Record<string, unknown>;
type Handler = (params: string[], body: Body, query: URLSearchParams) => Promise<Reply>;

interface Route {
  method: string;
  pattern: RegExp;
  handler: Handler;
}

const ok = (body: unknown, status = 200): Reply => ({ status, body });

function routes(ctx: ApiContext): Route[] {
  const { registry, jobs } = ctx;
  return [
    { method: "GET", pattern: /^\/v1\/status$/, handler: async () => ok(ctx.status()) },
    {
      method: "GET",
      pattern: /^\/v1\/disks$/,
      handler: async () => ok({ disks: await registry.listInfo() }),
    },
    {
      method: "POST",
      pattern: /^\/v1\/disks$/,
      handler: async (_p, body) => {
        const format = choiceField<DiskFormat>(body, "format", diskFormats, "vdisk");
        const pool = optionalString(body, "pool");
        return ok(
          await registry.create(field(body, "name"), sizeField(body), {
            format,
            ...(pool === undefined ? {} : { pool }),
          }),
          201,
        );
      },
    },
    {
      method: "GET",
      pattern: /^\/v1\/disks\/([^/]+)$/,
      handler: async ([name]) => ok(await registry.info(name)),
    },
    {
      method: "DELETE",
      pattern: /^\/v1\/disks\/([^/]+)$/,
      handler: async ([name], _b, query) => ok(await registry.delete(name, flag(query.get("force")))),
    },
    {
      method: "POST",
      pattern: /^\/v1\/disks\/([^/]+)\/resize$/,
      handler: async ([name], body) =>
        ok(await registry.resize(name, sizeField(body), booleanField(body, "shrink"))),
    },
    {
      method: "POST",
      pattern: /^\/v1\/disks\/([^/]+)\/settings$/,
      handler: async ([name], body) => ok(await registry.configure(name, body)),
    },
    {
      method: "GET",
      pattern: /^\/v1\/disks\/([^/]+)\/snapshots$/,
      handler: async ([name]) => ok(await registry.snapshots(name)),
    },
    {
      method: "POST",
      pattern: /^\/v1\/disks\/([^/]+)\/snapshots$/,
      handler: async ([name], body) => ok(await registry.snapshotCreate(name, field(body, "name")), 201),
    },
    {
      method: "DELETE",
      pattern: /^\/v1\/disks\/([^/]+)\/snapshots\/([^/]+)$/,
      handler: async ([name, snap], _b, query) =>
        ok(await registry.snapshotDelete(name, snap, flag(query.get("force")))),
    },
    {
      method: "POST",
      pattern: /^\/v1\/disks\/([^/]+)\/snapshots\/([^/]+)\/clone$/,
      handler: async ([name, snap], body) => ok(await registry.clone(name, snap, field(body, "name")), 201),
    },
    {
      method: "POST",
      pattern: /^\/v1\/disks\/([^/]+)\/snapshots\/([^/]+)\/rollback$/,
      handler: async ([name, snap], body, query) =>
        ok(await registry.rollback(name, snap, booleanField(body, "force") || flag(query.get("force")))),
    },
    {
      method: "GET",
      pattern: /^\/v1\/disks\/([^/]+)\/tree$/,
      handler: async ([name]) => ok(await registry.tree(name)),
    },
    {
      method: "POST",
      pattern: /^\/v1\/disks\/([^/]+)\/check$/,
      handler: async ([name]) => ok(await registry.check(name)),
    },
    {
      method: "POST",
      pattern: /^\/v1\/attach$/,
      handler: async (_p, body) =>
        ok(
          await registry.attach(field(body, "file"), field(body, "name"), booleanField(body, "readOnly")),
          201,
        ),
    },
    {
      method: "POST",
      pattern: /^\/v1\/import$/,
      handler: async (_p, body) => {
        const format = choiceField<ImportFormat>(body, "format", importFormats, "auto");
        return ok(await jobs.startImport(field(body, "file"), field(body, "name"), format), 202);
      },
    },
    {
      method: "POST",
      pattern: /^\/v1\/export$/,
      handler: async (_p, body) => {
        const format = choiceField<ExportFormat>(body, "format", exportFormats, "raw");
        return ok(await jobs.startExport(field(body, "name"), field(body, "file"), format), 202);
      },
    },
    {
      method: "GET",
      pattern: /^\/v1\/pools$/,
      handler: async () => ok({ pools: await registry.poolList() }),
    },
    {
      method: "POST",
      pattern: /^\/v1\/pools$/,
      handler: async (_p, body) => {
        const cls = optionalString(body, "class");
        const emulate = optionalString(body, "emulate");
        return ok(
          await registry.poolCreate(field(body, "name"), {
            ...(cls === undefined ? {} : { class: cls }),
            ...(emulate === undefined ? {} : { emulate }),
          }),
          201,
        );
      },
    },
    {
      method: "POST",
      pattern: /^\/v1\/pools\/([^/]+)\/devices$/,
      handler: async ([pool], body) => {
        const emulate = optionalString(body, "emulate");
        const capacity = body.capacity === undefined ? undefined : parseSizeValue(body.capacity, "capacity");
        return ok(
          await registry.poolAddDevice(pool, field(body, "path"), {
            class: field(body, "class"),
            ...(capacity === undefined ? {} : { capacity }),
            ...(emulate === undefined ? {} : { emulate }),
          }),
          201,
        );
      },
    },
    {
      method: "DELETE",
      pattern: /^\/v1\/pools\/([^/]+)\/devices\/([^/]+)$/,
      handler: async ([pool, id]) => ok(await registry.poolRemoveDevice(pool, deviceId(id))),
    },
    {
      method: "POST",
      pattern: /^\/v1\/pools\/([^/]+)\/devices\/([^/]+)$/,
      handler: async ([pool, id], body) => {
        const device = deviceId(id);
        const cls = optionalString(body, "class");
        const capacity =
          body.capacity === undefined || body.capacity === null
            ? body.capacity
            : parseSizeValue(body.capacity, "capacity");
        return ok(
          await registry.poolSetDevice(pool, device, {
            ...(cls === undefined ? {} : { class: cls }),
            ...(capacity === undefined ? {} : { capacity }),
          }),
        );
      },
    },
    {
      method: "POST",
      pattern: /^\/v1\/pools\/([^/]+)\/settings$/,
      handler: async ([pool], body) => {
        const policy = optionalString(body, "policy");
        const fastClass = optionalString(body, "fastClass");
        const rate =
          body.migrateBytesPerSecond === undefined
            ? undefined
            : parseSizeValue(body.migrateBytesPerSecond, "migrateBytesPerSecond");
        return ok(
          await registry.poolSet(pool, {
            ...(policy === undefined ? {} : { policy }),
            ...(fastClass === undefined ? {} : { fastClass }),
            ...(rate === undefined ? {} : { migrateBytesPerSecond: rate }),
          }),
        );
      },
    },
    {
      method: "GET",
      pattern: /^\/v1\/tier$/,
      handler: async (_p, _b, query) => ok(await registry.tier.status(query.get("disk") ?? undefined)),
    },
    {
      method: "POST",
      pattern: /^\/v1\/pools\/([^/]+)\/tier\/run$/,
      handler: async ([pool]) => ok(await registry.tier.run(pool)), // NOT_FOUND for an unknown pool
    },
    { method: "GET", pattern: /^\/v1\/jobs$/, handler: async () => ok({ jobs: jobs.list() }) },
    { method: "GET", pattern: /^\/v1\/jobs\/(\d+)$/, handler: async ([id]) => ok(jobs.get(Number(id))) },
    { method: "GET", pattern: /^\/v1\/stats$/, handler: async () => ok(await ctx.freshStats()) },
    {
      method: "GET",
      pattern: /^\/v1\/disks\/([^/]+)\/stats$/,
      handler: async ([name], _b, query) => {
        const top = heatTopOf(query.get("top"));
        const disk = (await ctx.freshStats(top)).disks.find((candidate) => candidate.name === name);
        if (!disk) {
          throw new VdiskError("UNKNOWN_DISK", `no disk named ${name} (vdisk list shows the disks)`, {
            hint: `to make one: vdisk create ${name} --size SIZE`,
          });
        }
        return ok(disk);
      },
    },
    {
      method: "GET",
      pattern: /^\/metrics$/,
      handler: async () => {
        const scrape = await ctx.metrics();
        return { status: 200, body: null, text: scrape.text, contentType: scrape.contentType };
      },
    },
  ];
}

// ---- Body fields ---------------------------------------------------------------------------------------

/** A pool device id from a route. */
function deviceId(text: string): number {
  if (!/^[0-9]{1,2}$/.test(text)) {
    throw new VdiskError("INVALID_ARGUMENT", `"${text}" is not a device id`, {
      hint: "device ids are the numbers vdisk pool list shows (0, 1, 2, ...)",
    });
  }
  return Number(text);
}

function field(body: Body, name: string): string {
  const value = body[name];
  if (typeof value !== "string" || value === "") {
    throw new VdiskError("BAD_REQUEST", `the request needs a "${name}" string`, {
      hint: `send {"${name}": "..."}`,
    });
  }
  return value;
}

function sizeField(body: Body): number {
  const value = body.size;
  if (typeof value !== "string" && typeof value !== "number") {
    throw new VdiskError("BAD_SIZE", 'the request needs a "size"', {
      hint: 'send bytes or a size such as "20G"',
    });
  }
  return parseDiskSize(value);
}

function optionalString(body: Body, name: string): string | undefined {
  const value = body[name];
  if (value === undefined) return undefined;
  if (typeof value !== "string" || value === "") {
    throw new VdiskError("BAD_REQUEST", `"${name}" must be a non-empty string`, {
      hint: `send {"${name}": "..."} or leave it out`,
    });
  }
  return value;
}

/** A byte count given as a number or a size string ("20G"). */
function parseSizeValue(value: unknown, name: string): number {
  if (typeof value === "number" && Number.isSafeInteger(value) && value >= 0) return value;
  if (typeof value === "string") return parseSize(value);
  throw new VdiskError("BAD_REQUEST", `"${name}" must be bytes or a size such as "20G"`, {
    hint: `send {"${name}": "20G"}`,
  });
}

function booleanField(body: Body, name: string): boolean {
  const value = body[name];
  if (value === undefined) return false;
  if (typeof value !== "boolean") {
    throw new VdiskError("BAD_REQUEST", `"${name}" must be true or false`, {
      hint: `send {"${name}": true}`,
    });
  }
  return value;
}

function choiceField<T extends string>(body: Body, name: string, choices: readonly T[], fallback: T): T {
  const value = body[name];
  if (value === undefined) return fallback;
  if (typeof value !== "string" || !(choices as readonly string[]).includes(value)) {
    throw new VdiskError("BAD_REQUEST", `"${name}" must be one of ${choices.join(", ")}`, {
      hint: `send {"${name}": "${fallback}"}`,
    });
  }
  return value as T;
}

function flag(value: string | null): boolean {
  return value === "1" || value === "true" || value === "";
}

/** Hottest extents GET /v1/disks/NAME/stats lists without ?top. */
export const diskStatsHeatTopDefault = 16;

/** `?top=N` of GET /v1/disks/NAME/stats: 0 to heatTopMax. */
function heatTopOf(value: string | null): number {
  if (value === null) return diskStatsHeatTopDefault;
  const top = /^\d{1,7}$/.test(value) ? Number(value) : NaN;
  if (!(top <= heatTopMax)) {
    throw new VdiskError("BAD_REQUEST", `top=${value} is not a number of extents from 0 to ${heatTopMax}`);
  }
  return top;
}

// ---- Request plumbing ----------------------------------------------------------------------------------

function readBody(req: http.IncomingMessage): Promise<string> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    let bytes = 0;
    req.on("data", (chunk: Buffer) => {
      bytes += chunk.length;
      if (bytes > apiBodyBytesMax) {
        // Stop keeping it; discard the rest so the 413 reply can be sent, then the socket is closed.
        req.removeAllListeners("data");
        req.resume();
        reject(
          new VdiskError("TOO_LARGE", `the request body is larger than ${apiBodyBytesMax} bytes`, {
            hint: "API requests are small JSON objects",
          }),
        );
        return;
      }
      chunks.push(chunk);
    });
    req.on("end", () => resolve(Buffer.concat(chunks).toString("utf8")));
    req.on("error", reject);
  });
}

async function parseBody(req: http.IncomingMessage): Promise<Body> {
  const text = await readBody(req);
  if (text.trim() === "") return {};
  const type = req.headers["content-type"] ?? "";
  if (!/^application\/json\b/i.test(type)) {
    throw new VdiskError("BAD_REQUEST", "the request body must be JSON", {
      hint: "send it with Content-Type: application/json",
    });
  }
  let parsed: unknown;
  try {
    parsed = JSON.parse(text);
  } catch {
    throw new VdiskError("BAD_REQUEST", "the request body is not valid JSON", {
      hint: 'send e.g. {"name":"web"}',
    });
  }
  if (parsed === null || typeof parsed !== "object" || Array.isArray(parsed)) {
    throw new VdiskError("BAD_REQUEST", "the request body must be a JSON object", {
      hint: 'send e.g. {"name":"web"}',
    });
  }
  return parsed as Body;
}

/**
 * Refuse other web pages (an Origin that is not `http://HOST` of this very request: only the daemon's own
 * dashboard may call from a browser) and foreign host names (DNS rebinding).
 */
function checkCaller(req: http.IncomingMessage): void {
  const origin = req.headers.origin;
  if (origin !== undefined && (req.headers.host === undefined || origin !== `http://${req.headers.host}`)) {
    throw new VdiskError("BAD_REQUEST", "requests from web pages are not accepted", {
      hint: "use the vdisk CLI, the daemon's own dashboard, or a client that sends no Origin header",
    });
  }
  const host = req.headers.host;
  if (host === undefined) return;
  const hostname = host.replace(/:\d+$/, "").replace(/^\[(.*)\]$/, "$1");
  if (hostname !== "localhost" && net.isIP(hostname) === 0) {
    throw new VdiskError("BAD_REQUEST", `requests for host ${hostname} are not accepted`, {
      hint: "address the API by IP (e.g. http://127.0.0.1:10810) or through run/api.sock",
    });
  }
}

function decodeParams(match: RegExpExecArray): string[] {
  try {
    return match.slice(1).map((part) => decodeURIComponent(part));
  } catch {
    throw new VdiskError("BAD_REQUEST", "the request path is not valid", {
      hint: "percent-encode names correctly",
    });
  }
}

// ---- Trust: token and path scrubbing ---------------------------------------------------------------------

const mutatingMethods = new Set(["POST", "PUT", "PATCH", "DELETE"]);

/** Whether the request carries `Authorization: Bearer <token>` (compared in constant time). */
export function bearerMatches(req: http.IncomingMessage, token: string): boolean {
  const header = req.headers.authorization;
  const match = typeof header === "string" ? /^Bearer\s+(\S+)\s*$/i.exec(header) : null;
  if (!match) return false;
  const digest = (text: string): Buffer => crypto.createHash("sha256").update(text, "utf8").digest();
  return crypto.timingSafeEqual(digest(match[1] as string), digest(token));
}

function unauthorized(req: http.IncomingMessage): Reply {
  const sent = req.headers.authorization !== undefined;
  return errorReply(
    new VdiskError(
      "UNAUTHORIZED",
      sent
        ? "the API token sent is not the daemon's"
        : `${req.method ?? "this"} calls over TCP need the API token`,
      {
        hint: "send Authorization: Bearer TOKEN, with the token given to vdisk serve --api-token or kept in HOME/api-token on the daemon's machine",
      },
    ),
  );
}

/** Absolute paths in free text: after a start, a space, a quote, a bracket or `=`; up to a delimiter. */
const absolutePathPattern = /(^|[\s'"(=[])(\/[^\s'"()[\]{},;:]*)/g;

/**
 * `text` with every absolute path outside `home` replaced by its base name (API routes such as /v1/jobs
 * and /metrics are left alone).
 */
export function scrubPaths(text: string, home: string): string {
  if (!text.includes("/")) return text;
  return text.replace(absolutePathPattern, (whole, before: string, found: string) => {
    if (found === "/v1" || found.startsWith("/v1/") || found === "/metrics") return whole;
    const normal = path.posix.normalize(found);
    if (normal === home || normal.startsWith(`${home}/`)) return whole;
    return `${before}${path.posix.basename(normal) || "/"}`;
  });
}

function errorReply(err: unknown, log?: (message: string) => void): Reply {
  const error =
    err instanceof VdiskError
      ? err
      : new VdiskError("INTERNAL", `internal error: ${(err as Error)?.message ?? String(err)}`, {
          cause: err,
          hint: "this is a bug in vdisk; the daemon's log has details",
        });
  if (!(err instanceof VdiskError)) log?.(`API: ${(err as Error)?.stack ?? String(err)}`);
  const code: ErrorCode = error.code;
  return {
    status: error.httpStatus,
    body: { error: { code, message: error.message, hint: error.hint ?? null } },
  };
}

/**
 * The request listener. `trusted`: the owner-only Unix socket (no token, no scrubbing); otherwise TCP.
 */
export function createApiHandler(ctx: ApiContext, options: { trusted: boolean }): http.RequestListener {
  const table = routes(ctx);
  const scrubHome = options.trusted ? null : path.posix.normalize(ctx.registry.home);
  return (req, res) => {
    const token = ctx.apiToken ?? null;
    if (
      !options.trusted &&
      token !== null &&
      mutatingMethods.has(req.method ?? "") &&
      !bearerMatches(req, token)
    ) {
      req.resume(); // discard any body
      send(req, res, unauthorized(req), scrubHome);
      return;
    }
    if (ctx.dashboard?.(req, res)) return;
    void answer(table, req, ctx.log).then((reply) => send(req, res, reply, scrubHome));
  };
}

async function answer(
  table: Route[],
  req: http.IncomingMessage,
  log?: (message: string) => void,
): Promise<Reply> {
  try {
    checkCaller(req);
    const url = new URL(req.url ?? "/", "http://localhost");
    const method = req.method ?? "GET";
    for (const route of table) {
      const match = route.pattern.exec(url.pathname);
      if (!match || route.method !== method) continue;
      const body = method === "POST" ? await parseBody(req) : {};
      return await route.handler(decodeParams(match), body, url.searchParams);
    }
    throw new VdiskError("NOT_FOUND", `no API route ${method} ${url.pathname}`, {
      hint: "the routes are under /v1: status, disks, disks/NAME, disks/NAME/{resize,settings,snapshots,tree,check}, import, export, jobs",
    });
  } catch (err) {
    return errorReply(err, log);
  }
}

/** Send a reply; with `scrubHome`, every string loses its absolute paths outside that home. */
function send(
  req: http.IncomingMessage,
  res: http.ServerResponse,
  reply: Reply,
  scrubHome: string | null,
): void {
  const scrub = (value: string): string => (scrubHome === null ? value : scrubPaths(value, scrubHome));
  const text =
    reply.text !== undefined
      ? scrub(reply.text)
      : JSON.stringify(
          reply.body,
          (_key, value: unknown) => (typeof value === "string" ? scrub(value) : value),
          2,
        ) + "\n";
  const tooLarge = reply.status === 413;
  res.writeHead(reply.status, {
    "content-type": reply.contentType ?? "application/json; charset=utf-8",
    "content-length": Buffer.byteLength(text),
    "cache-control": "no-store",
    ...(tooLarge ? { connection: "close" } : {}),
  });
  res.end(text);
  if (tooLarge) res.on("finish", () => req.socket.destroy());
}

// ---- Listeners -----------------------------------------------------------------------------------------

export interface ApiServer {
  tcp: { host: string; port: number } | null;
  unix: string;
  close(): Promise<void>;
}

function listen(
  server: http.Server,
  target: { path: string } | { host: string; port: number },
): Promise<void> {
  return new Promise((resolve, reject) => {
    const onError = (err: Error): void => reject(err);
    server.once("error", onError);
    server.listen(target, () => {
      server.off("error", onError);
      resolve();
    });
  });
}

function closeServer(server: http.Server): Promise<void> {
  return new Promise((resolve) => {
    server.close(() => resolve());
    server.closeAllConnections();
  });
}

/** Serve the API on `unixPath` (a stale socket file is replaced) and, unless null, on TCP. */
export async function startApi(
  ctx: ApiContext,
  unixPath: string,
  tcp: { host: string; port: number } | null,
): Promise<ApiServer> {
  const servers: http.Server[] = [];
  const closeAll = async (): Promise<void> => {
    await Promise.all(servers.map(closeServer));
    fs.rmSync(unixPath, { force: true });
  };
  try {
    fs.rmSync(unixPath, { force: true });
    const unixServer = http.createServer(createApiHandler(ctx, { trusted: true }));
    servers.push(unixServer);
    await listen(unixServer, { path: unixPath });
    let bound: { host: string; port: number } | null = null;
    if (tcp) {
      const tcpServer = http.createServer(createApiHandler(ctx, { trusted: false }));
      servers.push(tcpServer);
      await listen(tcpServer, tcp).catch((err: unknown) => {
        throw listenError(err, `${tcp.host}:${tcp.port}`, "--http HOST:PORT (or --http none)");
      });
      const address = tcpServer.address() as net.AddressInfo;
      bound = { host: tcp.host, port: address.port };
    }
    return { tcp: bound, unix: unixPath, close: closeAll };
  } catch (err) {
    await closeAll();
    throw err;
  }
}

/** EADDRINUSE and friends, said plainly. */
export function listenError(err: unknown, address: string, option: string): VdiskError {
  if (err instanceof VdiskError) return err;
  const code = (err as NodeJS.ErrnoException).code;
  const reason =
    code === "EADDRINUSE"
      ? "the address is already in use"
      : code === "EADDRNOTAVAIL"
        ? "no interface has that address"
        : code === "EACCES"
          ? "permission denied"
          : ((err as Error).message ?? String(err));
  return new VdiskError("INVALID_ARGUMENT", `cannot listen on ${address}: ${reason}`, {
    cause: err,
    hint: `is another vdisk or server running there? choose another address with ${option}`,
  });
}
