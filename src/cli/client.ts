/**
 * The CLI's way to the daemon: HTTP/JSON over `<home>/run/api.sock`, or, when that socket does not answer,
 * the TCP address the daemon wrote into `<home>/run/daemon.json`. Nothing answering means no daemon runs for
 * this home: DAEMON_NOT_RUNNING with the command that starts one.
 *
 * Every request carries `Authorization: Bearer TOKEN` when a token is known: $VDISK_API_TOKEN, else the
 * content of `<home>/api-token` (the daemon needs it for changes over TCP; the socket ignores it).
 *
 * An API error body {"error":{code,message,hint}} becomes the same VdiskError on this side, so the CLI prints
 * the daemon's message and hint unchanged. Successful bodies are returned both parsed and as the exact text
 * (for --json).
 */
import * as http from "node:http";
import { ErrorCodes, VdiskError, type ErrorCode } from "../errors";
import { readTokenFile } from "../daemon/api-token";
import { homePaths, readDaemonInfo, resolveHome, type HomePaths } from "../daemon/home";

/** The options every command takes. */
export interface CommonOptions {
  home?: string;
  json?: boolean;
}

/** The API client of the home a command names (--home, else $VDISK_HOME, else ./vdisk-home). */
export function clientFor(options: CommonOptions): ApiClient {
  return new ApiClient(resolveHome(options.home));
}

export interface ApiResult<T> {
  status: number;
  text: string;
  data: T;
}

type Target = { socketPath: string } | { host: string; port: number };

/** Connection failures that mean "nobody listens here". */
const absentCodes = new Set([
  "ENOENT",
  "ECONNREFUSED",
  "ENOTSOCK",
  "ECONNRESET",
  "EHOSTUNREACH",
  "EADDRNOTAVAIL",
]);

export class ApiClient {
  private readonly paths: HomePaths;
  private target: Target | null = null;
  private readonly token: string | null;

  constructor(readonly home: string) {
    this.paths = homePaths(home);
    const fromEnv = process.env.VDISK_API_TOKEN;
    this.token = fromEnv !== undefined && fromEnv !== "" ? fromEnv : readTokenFile(this.paths);
  }

  get<T>(path: string): Promise<ApiResult<T>> {
    return this.request<T>("GET", path);
  }

  post<T>(path: string, body: object): Promise<ApiResult<T>> {
    return this.request<T>("POST", path, body);
  }

  delete<T>(path: string): Promise<ApiResult<T>> {
    return this.request<T>("DELETE", path);
  }

  async request<T>(method: string, path: string, body?: object): Promise<ApiResult<T>> {
    const payload = body === undefined ? undefined : JSON.stringify(body);
    for (const target of this.targets()) {
      try {
        const result = await send(target, method, path, payload, this.token);
        this.target = target;
        return decode<T>(result);
      } catch (err) {
        if (!isAbsent(err)) throw err;
      }
    }
    throw this.notRunning();
  }

  private targets(): Target[] {
    if (this.target) return [this.target];
    const targets: Target[] = [{ socketPath: this.paths.apiSocket }];
    const tcp = readDaemonInfo(this.paths)?.http.tcp;
    if (tcp) targets.push({ host: tcp.host, port: tcp.port });
    return targets;
  }

  private notRunning(): VdiskError {
    const home = this.home.includes(" ") ? `"${this.home}"` : this.home;
    return new VdiskError("DAEMON_NOT_RUNNING", `no vdisk daemon is running for home ${this.home}`, {
      hint: `start it with: vdisk serve --home ${home}`,
    });
  }
}

function isAbsent(err: unknown): boolean {
  const code = (err as NodeJS.ErrnoException | undefined)?.code;
  return !(err instanceof VdiskError) && code !== undefined && absentCodes.has(code);
}

function send(
  target: Target,
  method: string,
  path: string,
  payload: string | undefined,
  token: string | null,
): Promise<{ status: number; text: string }> {
  return new Promise((resolve, reject) => {
    const headers: http.OutgoingHttpHeaders = { accept: "application/json" };
    if (token !== null && token !== "") headers.authorization = `Bearer ${token}`;
    if (payload !== undefined) {
      headers["content-type"] = "application/json";
      headers["content-length"] = Buffer.byteLength(payload);
    }
    const req = http.request({ ...target, method, path, headers, agent: false }, (res) => {
      const chunks: Buffer[] = [];
      res.on("data", (chunk: Buffer) => chunks.push(chunk));
      res.on("end", () =>
        resolve({ status: res.statusCode ?? 0, text: Buffer.concat(chunks).toString("utf8") }),
      );
      res.on("error", reject);
    });
    req.on("error", reject);
    req.end(payload);
  });
}

function decode<T>(result: { status: number; text: string }): ApiResult<T> {
  let data: unknown;
  try {
    data = JSON.parse(result.text);
  } catch {
    throw new VdiskError("INTERNAL", `the daemon answered ${result.status} with a body that is not JSON`, {
      hint: "is something other than vdisk listening on the API address?",
    });
  }
  if (result.status >= 400) throw errorFromBody(data, result.status);
  return { status: result.status, text: result.text, data: data as T };
}

function errorFromBody(data: unknown, status: number): VdiskError {
  const error = (data as { error?: { code?: unknown; message?: unknown; hint?: unknown } } | null)?.error;
  const known = typeof error?.code === "string" && error.code in ErrorCodes;
  const code = (known ? error?.code : "INTERNAL") as ErrorCode;
  const message = typeof error?.message === "string" ? error.message : `the daemon answered HTTP ${status}`;
  const hint = typeof error?.hint === "string" ? error.hint : undefined;
  return new VdiskError(code, message, hint === undefined ? undefined : { hint });
}
