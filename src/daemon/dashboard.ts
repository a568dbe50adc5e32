/**
 * The web dashboard's server side: static files and the live event stream, on the API's HTTP listener.
 *
 *   GET /                       the single-page app (src/dashboard/index.html)
 *   GET /dashboard/FILE         its other files (app.js, style.css), from src/dashboard/
 *   GET /assets/uplot.*         the uPlot chart library, from node_modules/uplot/dist
 *   GET /v1/events              Server-Sent Events: `meta` once, then every second `stats` (StatsSnapshot)
 *                               and, when they change, `jobs` ({"jobs":[job...]}); `: keep-alive` comments
 *
 * The API hook calls the handler before its own routes; it answers (and returns true) for those paths
 * only, so everything else falls through to the API. The app's files are not compiled: they are served
 * from the source folder, which ships in the package, found from the package root whether this module
 * runs from src/ or from dist/src/. Only files that exist in that folder, with a known extension and a
 * plain name (no `..`, no `/`), are served; nothing is fetched from the network, at run time or ever.
 *
 * The event stream has one timer for all its clients (started with the first, stopped with the last): each
 * tick takes one StatsSnapshot, serialises it once and writes it to every client. A client whose socket
 * does not keep up misses ticks (the counters are totals, so a missed tick loses nothing but resolution)
 * and is dropped when more than sseBufferedBytesMax is queued. At most sseClientsMax clients at a time.
 *
 * Callers are checked like the API checks them: the Host must be an IP address or localhost (no DNS
 * rebinding) and an Origin, when a browser sends one, must be the page's own.
 */
import { createHash } from "node:crypto";
import * as fs from "node:fs";
import type * as http from "node:http";
import * as net from "node:net";
import * as path from "node:path";
import { VdiskError } from "../errors";
import { MiB } from "../limits";
import { latencyBucketsSeconds, opKinds, type StatsSnapshot } from "../monitor/types";
import type { JobView } from "./jobs";

/** Simultaneous event-stream clients (a browser tab each). */
export const sseClientsMax = 32;
/** Time between two `stats` events. */
export const sseIntervalMs = 1000;
/** Ticks between two keep-alive comments. */
export const sseKeepAliveTicks = 15;
/** Bytes queued on one event-stream socket before that client is dropped. */
export const sseBufferedBytesMax = 1 * MiB;
/** EventSource reconnection delay the stream asks for. */
export const sseRetryMs = 2000;
/** The app's static files are small; anything larger in the folder is not served. */
const staticFileBytesMax = 4 * MiB;
const staticNameBytesMax = 128;

/** What the dashboard needs from the daemon (the API context provides it). */
export interface DashboardContext {
  stats(): StatsSnapshot;
  jobs: { list(): JobView[] };
  log?: (message: string) => void;
}

/** `(req, res) => boolean`: true when the request was the dashboard's and has been answered. */
export interface DashboardHandler {
  (req: http.IncomingMessage, res: http.ServerResponse): boolean;
  /** Event-stream clients connected now. */
  readonly eventClients: number;
  /** End every event stream and stop the timer (the listener's close does this too, by closing sockets). */
  close(): void;
}

const contentTypes: Record<string, string> = {
  ".html": "text/html; charset=utf-8",
  ".js": "text/javascript; charset=utf-8",
  ".css": "text/css; charset=utf-8",
  ".svg": "image/svg+xml",
  ".png": "image/png",
  ".json": "application/json; charset=utf-8",
};

/** Sent with every dashboard response. The page loads nothing from elsewhere and is never framed. */
const securityHeaders: Record<string, string> = {
  "x-content-type-options": "nosniff",
  "x-frame-options": "DENY",
  "referrer-policy": "no-referrer",
  "content-security-policy":
    "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; connect-src 'self'; " +
    "frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
};

// ---- Files ---------------------------------------------------------------------------------------------

/** The package root: the nearest ancestor of this module with package.json and src/dashboard/index.html. */
export function dashboardAssetsDirectory(start = __dirname): string | null {
  let directory = start;
  for (let depth = 0; depth < 6; depth++) {
    const assets = path.join(directory, "src", "dashboard");
    if (
      fs.existsSync(path.join(directory, "package.json")) &&
      fs.existsSync(path.join(assets, "index.html"))
    ) {
      return assets;
    }
    const parent = path.dirname(directory);
    if (parent === directory) break;
    directory = parent;
  }
  return null;
}

/** uPlot's files, by the name they are served under. */
function uplotFiles(): Map<string, string> {
  const files = new Map<string, string>();
  for (const [served, inPackage] of [
    ["uplot.iife.min.js", "uPlot.iife.min.js"],
    ["uplot.min.css", "uPlot.min.css"],
  ]) {
    try {
      files.set(served, require.resolve(`uplot/dist/${inPackage}`));
    } catch {
      // Not installed: answered with a 404 and a hint.
    }
  }
  return files;
}

interface CachedFile {
  mtimeMs: number;
  size: number;
  body: Buffer;
  etag: string;
}

class StaticFiles {
  private readonly cache = new Map<string, CachedFile>();

  /** The file's bytes and ETag, re-read when it changed on disk; null when it is missing or too large. */
  read(file: string): CachedFile | null {
    let stat: fs.Stats;
    try {
      stat = fs.statSync(file);
    } catch {
      return null;
    }
    if (!stat.isFile() || stat.size > staticFileBytesMax) return null;
    const cached = this.cache.get(file);
    if (cached && cached.mtimeMs === stat.mtimeMs && cached.size === stat.size) return cached;
    const body = fs.readFileSync(file);
    const etag = `"${createHash("sha256").update(body).digest("base64url").slice(0, 27)}"`;
    const entry = { mtimeMs: stat.mtimeMs, size: stat.size, body, etag };
    this.cache.set(file, entry);
    return entry;
  }
}

// ---- Requests ------------------------------------------------------------------------------------------

function sendError(res: http.ServerResponse, error: VdiskError, head = false): void {
  const text = JSON.stringify(
    { error: { code: error.code, message: error.message, hint: error.hint ?? null } },
    null,
    2,
  );
  const body = text + "\n";
  res.writeHead(error.httpStatus, {
    ...securityHeaders,
    "content-type": "application/json; charset=utf-8",
    "content-length": Buffer.byteLength(body),
    "cache-control": "no-store",
  });
  res.end(head ? undefined : body);
}

/**
 * Whether a request with an Origin header comes from a page of this very listener (`Origin: http://HOST`
 * with HOST the request's Host), which is what a browser sends for the dashboard's own POST and DELETE
 * calls. Requests without Origin (the CLI, curl) are not browser requests and count as such too.
 */
export function sameOriginOrNone(req: http.IncomingMessage): boolean {
  const origin = req.headers.origin;
  if (origin === undefined) return true;
  const host = req.headers.host;
  return host !== undefined && origin === `http://${host}`;
}

/** Host must be an IP or localhost; an Origin must be this page's own (http://HOST). */
function checkCaller(req: http.IncomingMessage): void {
  const host = req.headers.host;
  if (host !== undefined) {
    const hostname = host.replace(/:\d+$/, "").replace(/^\[(.*)\]$/, "$1");
    if (hostname !== "localhost" && net.isIP(hostname) === 0) {
      throw new VdiskError("BAD_REQUEST", `requests for host ${hostname} are not accepted`, {
        hint: "open the dashboard by IP address, e.g. http://127.0.0.1:10810/",
      });
    }
  }
  if (!sameOriginOrNone(req)) {
    throw new VdiskError("BAD_REQUEST", "requests from other web pages are not accepted", {
      hint: "open the dashboard itself, e.g. http://127.0.0.1:10810/",
    });
  }
}

/** A plain file name: letters, digits, dot, dash, underscore; not hidden, no traversal. */
function plainName(name: string): boolean {
  return (
    name.length > 0 &&
    name.length <= staticNameBytesMax &&
    /^[A-Za-z0-9][A-Za-z0-9._-]*$/.test(name) &&
    !name.includes("..")
  );
}

function notFound(what: string, hint: string): VdiskError {
  return new VdiskError("NOT_FOUND", `no dashboard file ${what}`, { hint });
}

export function createDashboardHandler(ctx: DashboardContext): DashboardHandler {
  const assets = dashboardAssetsDirectory();
  const uplot = uplotFiles();
  const files = new StaticFiles();
  const events = new EventStream(ctx);

  const serveFile = (
    req: http.IncomingMessage,
    res: http.ServerResponse,
    file: string | null,
    what: string,
  ): void => {
    const found = file === null ? null : files.read(file);
    const type = file === null ? undefined : contentTypes[path.extname(file)];
    if (found === null || type === undefined) {
      throw notFound(
        what,
        assets === null
          ? "the dashboard's files (src/dashboard/) are missing from this installation; reinstall vdisk"
          : "the dashboard is at /",
      );
    }
    const headers = {
      ...securityHeaders,
      "content-type": type,
      "cache-control": "no-cache",
      etag: found.etag,
    };
    if (req.headers["if-none-match"] === found.etag) {
      res.writeHead(304, headers);
      res.end();
      return;
    }
    res.writeHead(200, { ...headers, "content-length": found.body.length });
    res.end(req.method === "HEAD" ? undefined : found.body);
  };

  const inAssets = (name: string): string | null => {
    if (assets === null || !plainName(name) || contentTypes[path.extname(name)] === undefined) return null;
    const file = path.join(assets, name);
    // The name has no separators, so this holds; asserted all the same before anything is read.
    if (path.dirname(file) !== assets) return null;
    return file;
  };

  const handler = (req: http.IncomingMessage, res: http.ServerResponse): boolean => {
    const rawPath = (req.url ?? "/").split("?")[0] as string;
    const claimed =
      rawPath === "/" ||
      rawPath === "/index.html" ||
      rawPath === "/dashboard" ||
      rawPath.startsWith("/dashboard/") ||
      rawPath.startsWith("/assets/") ||
      rawPath === "/v1/events";
    if (!claimed) return false;
    const method = req.method ?? "GET";
    const head = method === "HEAD";
    try {
      checkCaller(req);
      let pathname: string;
      try {
        pathname = decodeURIComponent(rawPath);
      } catch {
        throw new VdiskError("BAD_REQUEST", "the request path is not valid", {
          hint: "the dashboard is at /",
        });
      }
      if (pathname.includes("..") || pathname.includes("\\") || pathname.includes("\0")) {
        throw new VdiskError("BAD_REQUEST", `the path ${JSON.stringify(pathname)} is not allowed`, {
          hint: "the dashboard's files are named plainly under /dashboard/",
        });
      }
      if (method !== "GET" && !head) {
        throw new VdiskError("BAD_REQUEST", `${method} ${pathname}: the dashboard only answers GET`, {
          hint: "the API's routes are under /v1",
        });
      }
      if (pathname === "/v1/events") {
        if (head)
          throw new VdiskError("BAD_REQUEST", "the event stream answers GET only", {
            hint: "GET /v1/events",
          });
        events.add(req, res);
        return true;
      }
      if (pathname.startsWith("/assets/")) {
        const name = pathname.slice("/assets/".length);
        serveFile(req, res, uplot.get(name) ?? null, pathname);
        return true;
      }
      const name =
        pathname === "/" ||
        pathname === "/index.html" ||
        pathname === "/dashboard" ||
        pathname === "/dashboard/"
          ? "index.html"
          : pathname.slice("/dashboard/".length);
      serveFile(req, res, inAssets(name), pathname);
    } catch (err) {
      const error =
        err instanceof VdiskError
          ? err
          : new VdiskError("INTERNAL", `internal error: ${(err as Error)?.message ?? String(err)}`, {
              cause: err,
            });
      if (!(err instanceof VdiskError)) ctx.log?.(`dashboard: ${(err as Error)?.stack ?? String(err)}`);
      if (res.headersSent) res.destroy();
      else sendError(res, error, head);
    }
    return true;
  };

  return Object.defineProperties(handler, {
    eventClients: { get: () => events.size },
    close: { value: () => events.close() },
  }) as DashboardHandler;
}

// ---- Event stream --------------------------------------------------------------------------------------

interface EventClient {
  res: http.ServerResponse;
}

class EventStream {
  private readonly clients = new Set<EventClient>();
  private timer: NodeJS.Timeout | null = null;
  private ticks = 0;
  /** The last `jobs` event sent, to send only changes. */
  private jobsFrame = "";
  private statsFailed = false;

  constructor(private readonly ctx: DashboardContext) {}

  get size(): number {
    return this.clients.size;
  }

  add(req: http.IncomingMessage, res: http.ServerResponse): void {
    if (this.clients.size >= sseClientsMax) {
      throw new VdiskError("LIMIT", `the dashboard already has ${sseClientsMax} live connections`, {
        hint: "close other dashboard tabs",
      });
    }
    const client: EventClient = { res };
    req.socket.setNoDelay(true);
    res.writeHead(200, {
      ...securityHeaders,
      "content-type": "text/event-stream; charset=utf-8",
      "cache-control": "no-store",
      connection: "keep-alive",
      "x-accel-buffering": "no",
    });
    this.clients.add(client);
    const remove = (): void => {
      if (!this.clients.delete(client)) return;
      if (this.clients.size === 0) this.stop();
    };
    // The response's 'close' (not the request's, which may fire once the request has been read) marks the
    // end of the connection.
    res.on("close", remove);
    res.on("error", remove);
    const meta = {
      intervalMs: sseIntervalMs,
      opKinds,
      latencyBucketsSeconds,
    };
    const jobs = this.jobsEvent();
    this.write(client, `retry: ${sseRetryMs}\n\n` + frame("meta", meta) + jobs + this.statsEvent());
    if (this.timer === null) {
      this.jobsFrame = jobs;
      this.timer = setInterval(() => this.tick(), sseIntervalMs);
      this.timer.unref();
    }
  }

  close(): void {
    this.stop();
    for (const client of this.clients) client.res.end();
    this.clients.clear();
  }

  private stop(): void {
    if (this.timer !== null) clearInterval(this.timer);
    this.timer = null;
  }

  private tick(): void {
    this.ticks += 1;
    let text = this.statsEvent();
    const jobs = this.jobsEvent();
    if (jobs !== this.jobsFrame) {
      this.jobsFrame = jobs;
      text = jobs + text;
    }
    if (this.ticks % sseKeepAliveTicks === 0) text = ": keep-alive\n\n" + text;
    for (const client of this.clients) this.write(client, text);
  }

  private statsEvent(): string {
    try {
      const text = frame("stats", this.ctx.stats());
      this.statsFailed = false;
      return text;
    } catch (err) {
      // Logged once per failure streak; the stream stays open and the next tick tries again.
      if (!this.statsFailed)
        this.ctx.log?.(`dashboard: stats failed: ${(err as Error)?.stack ?? String(err)}`);
      this.statsFailed = true;
      return "";
    }
  }

  private jobsEvent(): string {
    try {
      return frame("jobs", { jobs: this.ctx.jobs.list() });
    } catch (err) {
      this.ctx.log?.(`dashboard: jobs failed: ${(err as Error)?.message ?? String(err)}`);
      return "";
    }
  }

  private write(client: EventClient, text: string): void {
    const res = client.res;
    if (text === "" || res.destroyed || res.writableEnded) return;
    if (res.writableLength > sseBufferedBytesMax) {
      this.ctx.log?.("dashboard: dropping an event-stream client that does not keep up");
      res.destroy();
      return;
    }
    // A client still draining the last tick skips this one: the counters are totals, nothing is lost.
    if (res.writableNeedDrain) return;
    res.write(text);
  }
}

/** One SSE event. JSON.stringify never emits a raw newline, so `data` is one line. */
function frame(event: string, data: unknown): string {
  return `event: ${event}\ndata: ${JSON.stringify(data)}\n\n`;
}
