/**
 * A real `vdisk serve` for interop tests, plus the helpers those tests need to drive real clients.
 *
 * `startDaemon()` spawns `node bin/vdisk serve --home <tmp>/home --listen 127.0.0.1:0 --http 127.0.0.1:0`
 * and waits until run/daemon.json names the new process (a stale daemon.json left by `kill -9` is ignored
 * because its pid differs). The daemon's stdout and stderr go to a log file, not a pipe: tests spend most
 * of their time blocked in spawnSync, and a daemon writing to a full pipe would stall. The log is appended
 * to every failure message this module raises.
 *
 * Clean-up is by PID only: every process the fixture starts (the daemon, and clients started with
 * `spawnTool`) is remembered, `cleanup()` SIGKILLs the ones still alive and removes the temporary
 * directory; a process 'exit' hook does the same as a last resort, so a failing test never leaves a daemon
 * behind. Call `cleanup()` from the test file's `after`.
 *
 * Tools: `requireTool(name)` throws (the test FAILS, it is not skipped) when a client is missing — CI
 * installs them with scripts/install-test-deps.sh, and a test that silently skips proves nothing.
 * `run(cmd, args)` is spawnSync with a timeout; `spawnTool` is its asynchronous twin for tests that run
 * clients in parallel.
 */
import assert from "node:assert/strict";
import { type ChildProcess, spawn, spawnSync } from "node:child_process";
import * as fs from "node:fs";
import * as http from "node:http";
import * as os from "node:os";
import * as path from "node:path";

/** The repository root: this file compiles to dist/src/testing/daemon-fixture.js. */
export const repositoryRoot = path.resolve(__dirname, "..", "..", "..");
const vdiskBin = path.join(repositoryRoot, "bin", "vdisk");

export const runTimeoutMsDefault = 60_000;
const daemonStartTimeoutMs = 20_000;
const daemonStopTimeoutMs = 20_000;
const pollIntervalMs = 25;

export interface RunResult {
  status: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

export interface RunOptions {
  timeoutMs?: number;
  input?: string | Buffer;
  env?: NodeJS.ProcessEnv;
  cwd?: string;
}

// -----------------------------------------------------------------------------------------------
// Tools

const toolPaths = new Map<string, string>();

/** Absolute path of an executable on PATH, or null. */
export function findTool(name: string): string | null {
  const cached = toolPaths.get(name);
  if (cached !== undefined) return cached;
  for (const directory of (process.env.PATH ?? "").split(path.delimiter)) {
    if (directory === "") continue;
    const candidate = path.join(directory, name);
    try {
      fs.accessSync(candidate, fs.constants.X_OK);
      if (!fs.statSync(candidate).isFile()) continue;
    } catch {
      continue;
    }
    toolPaths.set(name, candidate);
    return candidate;
  }
  return null;
}

/** Throws — failing the calling test — when `name` is not installed. */
export function requireTool(name: string): string {
  const found = findTool(name);
  if (found === null) {
    throw new Error(
      `${name} is not installed (not found on PATH); install it: bash scripts/install-test-deps.sh`,
    );
  }
  return found;
}

/**
 * Environment for a tool. nbdsh is a shell script running `python3 -m nbd`, and the nbd module is built
 * for the Python installed beside it (/usr/bin/python3 on Debian); a python3 earlier on PATH (pyenv,
 * a virtualenv) would not find it. So the tool's own directory goes first on PATH.
 */
function toolEnv(cmd: string, extra: NodeJS.ProcessEnv | undefined): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = { ...process.env, ...extra };
  if (cmd === "nbdsh") {
    const found = findTool(cmd);
    const directory = found === null ? null : path.dirname(fs.realpathSync(found));
    if (directory !== null) env.PATH = `${directory}${path.delimiter}${env.PATH ?? ""}`;
  }
  return env;
}

/** Runs a command to completion (bounded by a timeout; on timeout it is killed and status is null). */
export function run(cmd: string, args: readonly string[], options: RunOptions = {}): RunResult {
  const result = spawnSync(cmd, args, {
    encoding: "utf8",
    timeout: options.timeoutMs ?? runTimeoutMsDefault,
    killSignal: "SIGKILL",
    maxBuffer: 256 * 1024 * 1024,
    input: options.input,
    cwd: options.cwd,
    env: toolEnv(cmd, options.env),
  });
  if (result.error && (result.error as NodeJS.ErrnoException).code !== "ETIMEDOUT") throw result.error;
  return {
    status: result.status,
    signal: result.signal,
    stdout: result.stdout ?? "",
    stderr: result.stderr ?? "",
  };
}

/** Describes a finished run for assertion messages. */
export function describeRun(cmd: string, args: readonly string[], result: RunResult): string {
  const how = result.signal !== null ? `killed by ${result.signal}` : `exit status ${result.status}`;
  return `${cmd} ${args.join(" ")}: ${how}\nstdout:\n${result.stdout}\nstderr:\n${result.stderr}`;
}

/** Processes started by this module that may still be alive, by PID. */
const livePids = new Set<number>();

function forget(pid: number | undefined): void {
  if (pid !== undefined) livePids.delete(pid);
}

function killPid(pid: number): void {
  try {
    process.kill(pid, "SIGKILL");
  } catch {
    // already gone
  }
}

process.on("exit", () => {
  for (const pid of livePids) killPid(pid);
});

/** Kills every process this module started that is still running. */
export function killAllStarted(): void {
  for (const pid of livePids) killPid(pid);
  livePids.clear();
}

/** A client started asynchronously; `done` resolves when it exits (it never rejects). */
export interface StartedTool {
  pid: number;
  done: Promise<RunResult>;
  kill(): void;
}

/** Starts a command without waiting; it is killed after the timeout, and by `killAllStarted`. */
export function spawnTool(cmd: string, args: readonly string[], options: RunOptions = {}): StartedTool {
  const child = spawn(cmd, args, {
    cwd: options.cwd,
    env: toolEnv(cmd, options.env),
    stdio: [options.input === undefined ? "ignore" : "pipe", "pipe", "pipe"],
  });
  if (child.pid === undefined) throw new Error(`cannot start ${cmd}`);
  const pid = child.pid;
  livePids.add(pid);
  let stdout = "";
  let stderr = "";
  child.stdout?.on("data", (chunk: Buffer) => (stdout += chunk.toString()));
  child.stderr?.on("data", (chunk: Buffer) => (stderr += chunk.toString()));
  if (options.input !== undefined) child.stdin?.end(options.input);
  const timer = setTimeout(() => killPid(pid), options.timeoutMs ?? runTimeoutMsDefault);
  const done = new Promise<RunResult>((resolve) => {
    child.on("close", (status, signal) => {
      clearTimeout(timer);
      forget(pid);
      resolve({ status, signal, stdout, stderr });
    });
  });
  return { pid, done, kill: () => killPid(pid) };
}

// -----------------------------------------------------------------------------------------------
// The daemon

interface DaemonFile {
  pid: number;
  nbd: { tcp: { host: string; port: number } | null; unix: string | null };
  http: { tcp: { host: string; port: number } | null; unix: string };
}

export interface StartDaemonOptions {
  /** Prefix of the temporary directory's name. */
  name?: string;
  /** Extra arguments for `vdisk serve`. */
  serveArgs?: string[];
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

export class DaemonFixture {
  /** Temporary directory holding the home, the daemon's log and any scratch files of the test. */
  readonly work: string;
  readonly home: string;
  readonly logFile: string;
  private child: ChildProcess | null = null;
  private exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }> | null = null;
  private info: DaemonFile | null = null;
  private readonly serveArgs: string[];

  constructor(options: StartDaemonOptions = {}) {
    this.work = fs.mkdtempSync(path.join(os.tmpdir(), `${options.name ?? "vdisk-interop"}-`));
    this.home = path.join(this.work, "home");
    this.logFile = path.join(this.work, "daemon.log");
    this.serveArgs = options.serveArgs ?? [];
  }

  /** PID of the running daemon. */
  get pid(): number {
    return this.daemonFile().pid;
  }

  get port(): number {
    const tcp = this.daemonFile().nbd.tcp;
    if (tcp === null) throw new Error("the daemon has no NBD TCP listener");
    return tcp.port;
  }

  get socketPath(): string {
    const unix = this.daemonFile().nbd.unix;
    if (unix === null) throw new Error("the daemon has no NBD Unix socket");
    return unix;
  }

  /** The API's TCP port (the daemon's --http listener). */
  get httpPort(): number {
    const tcp = this.daemonFile().http.tcp;
    if (tcp === null) throw new Error("the daemon has no HTTP listener");
    return tcp.port;
  }

  get running(): boolean {
    return this.child !== null && this.child.exitCode === null && this.child.signalCode === null;
  }

  tcpUri(name: string): string {
    return `nbd://127.0.0.1:${this.port}/${name}`;
  }

  unixUri(name: string): string {
    return `nbd+unix:///${name}?socket=${this.socketPath}`;
  }

  /** A path inside the fixture's temporary directory. */
  file(name: string): string {
    return path.join(this.work, name);
  }

  /** The last `lines` lines the daemon printed (for assertion messages). */
  log(lines = 40): string {
    let text: string;
    try {
      text = fs.readFileSync(this.logFile, "utf8");
    } catch {
      return "";
    }
    const all = text.trimEnd().split("\n");
    const tail = all.slice(-lines).join("\n");
    return all.length > lines ? `[... ${all.length - lines} earlier lines]\n${tail}` : tail;
  }

  /** Runs the CLI against this daemon's home, synchronously. */
  vdisk(args: readonly string[], options: RunOptions = {}): RunResult {
    return run(process.execPath, [vdiskBin, ...args, "--home", this.home], {
      cwd: this.work,
      ...options,
      env: { VDISK_HOME: "", ...options.env },
    });
  }

  /** Runs the CLI with --json, asserting success, and parses the answer. */
  vdiskJson<T>(args: readonly string[]): T {
    const result = this.vdisk([...args, "--json"]);
    if (result.status !== 0) {
      throw new Error(describeRun("vdisk", [...args, "--json"], result));
    }
    return JSON.parse(result.stdout) as T;
  }

  /** GET /v1/PATH on the daemon's HTTP API (fast enough to poll while a client runs). */
  /**
   * Any API request on the home's Unix socket, on a fresh connection each time: tests block their event
   * loop in spawnSync for seconds, so a kept-alive connection could be one the daemon already closed.
   */
  apiRequest(method: string, apiPath: string, body?: object): Promise<{ status: number; data: unknown }> {
    const payload = body === undefined ? undefined : JSON.stringify(body);
    return new Promise((resolve, reject) => {
      const headers: http.OutgoingHttpHeaders = payload
        ? { "content-type": "application/json", "content-length": Buffer.byteLength(payload) }
        : {};
      const socketPath = path.join(this.home, "run", "api.sock");
      const req = http.request(
        { socketPath, method, path: `/v1/${apiPath}`, headers, agent: false },
        (res) => {
          const chunks: Buffer[] = [];
          res.on("data", (chunk: Buffer) => chunks.push(chunk));
          res.on("end", () =>
            resolve({
              status: res.statusCode ?? 0,
              data: JSON.parse(Buffer.concat(chunks).toString("utf8")),
            }),
          );
          res.on("error", reject);
        },
      );
      req.on("error", reject);
      req.end(payload);
    });
  }

  /** GET on the Unix socket; the reply must be 200. */
  async apiGet<T>(apiPath: string): Promise<T> {
    const reply = await this.apiRequest("GET", apiPath);
    assert.equal(reply.status, 200, `GET /v1/${apiPath}: ${JSON.stringify(reply.data)}`);
    return reply.data as T;
  }

  /** POST on the Unix socket; the reply must be a success. */
  async apiPost<T>(apiPath: string, body: object): Promise<T> {
    const reply = await this.apiRequest("POST", apiPath, body);
    assert.ok(reply.status < 300, `POST /v1/${apiPath}: ${reply.status} ${JSON.stringify(reply.data)}`);
    return reply.data as T;
  }

  async api<T>(apiPath: string): Promise<T> {
    // A fresh TCP connection each time (agent: false): a kept-alive connection the daemon closed meanwhile
    // fails with "other side closed" when the machine is loaded.
    const { status, text } = await new Promise<{ status: number; text: string }>((resolve, reject) => {
      const req = http.get(
        { host: "127.0.0.1", port: this.httpPort, path: `/v1/${apiPath}`, agent: false },
        (res) => {
          const chunks: Buffer[] = [];
          res.on("data", (chunk: Buffer) => chunks.push(chunk));
          res.on("end", () =>
            resolve({ status: res.statusCode ?? 0, text: Buffer.concat(chunks).toString("utf8") }),
          );
          res.on("error", reject);
        },
      );
      req.on("error", reject);
    });
    if (status !== 200) throw new Error(`GET /v1/${apiPath}: HTTP ${status}: ${text}`);
    return JSON.parse(text) as T;
  }

  async start(): Promise<void> {
    if (this.running) throw new Error("the daemon is already running");
    const log = fs.openSync(this.logFile, "a");
    let child: ChildProcess;
    try {
      child = spawn(
        process.execPath,
        [
          vdiskBin,
          "serve",
          "--home",
          this.home,
          "--listen",
          "127.0.0.1:0",
          "--http",
          "127.0.0.1:0",
          ...this.serveArgs,
        ],
        { cwd: this.work, stdio: ["ignore", log, log], env: { ...process.env, VDISK_HOME: "" } },
      );
    } finally {
      fs.closeSync(log);
    }
    if (child.pid === undefined) throw new Error("cannot start the daemon");
    const pid = child.pid;
    livePids.add(pid);
    this.child = child;
    this.info = null;
    this.exited = new Promise((resolve) => {
      child.on("exit", (code, signal) => {
        forget(pid);
        if (this.child === child) this.info = null; // no addresses while no daemon runs
        resolve({ code, signal });
      });
    });
    const deadline = Date.now() + daemonStartTimeoutMs;
    while (Date.now() < deadline) {
      if (!this.running) {
        throw new Error(`the daemon exited during start-up\n${this.log()}`);
      }
      const file = this.readDaemonFile();
      if (file !== null && file.pid === pid) {
        this.info = file;
        return;
      }
      await sleep(pollIntervalMs);
    }
    throw new Error(`timed out waiting for run/daemon.json of pid ${pid}\n${this.log()}`);
  }

  /** SIGTERM, wait for the exit, and require exit status 0 (a clean drain and flush). */
  async stop(): Promise<void> {
    const child = this.requireChild();
    child.kill("SIGTERM");
    const exit = await this.waitExit();
    if (exit.code !== 0) {
      throw new Error(
        `the daemon exited with ${exit.signal ?? `status ${exit.code}`} after SIGTERM\n${this.log()}`,
      );
    }
  }

  /** SIGKILL: no drain, no flush, the run files stay behind. */
  async kill9(): Promise<void> {
    const child = this.requireChild();
    child.kill("SIGKILL");
    const exit = await this.waitExit();
    if (exit.signal !== "SIGKILL") throw new Error(`expected death by SIGKILL, got ${JSON.stringify(exit)}`);
  }

  /** Stop with SIGTERM when running, then start again on the same home (the ports change). */
  async restart(): Promise<void> {
    if (this.running) await this.stop();
    await this.start();
  }

  /** Kill every process still alive (by PID) and remove the temporary directory. */
  cleanup(): void {
    if (this.child?.pid !== undefined && this.running) killPid(this.child.pid);
    killAllStarted();
    fs.rmSync(this.work, { recursive: true, force: true });
  }

  private requireChild(): ChildProcess {
    if (this.child === null || !this.running) throw new Error("the daemon is not running");
    return this.child;
  }

  private async waitExit(): Promise<{ code: number | null; signal: NodeJS.Signals | null }> {
    const exited = this.exited as Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(
        () => reject(new Error(`the daemon did not exit within ${daemonStopTimeoutMs} ms\n${this.log()}`)),
        daemonStopTimeoutMs,
      );
    });
    try {
      return await Promise.race([exited, timeout]);
    } finally {
      clearTimeout(timer);
    }
  }

  private daemonFile(): DaemonFile {
    if (this.info === null) throw new Error("the daemon is not running");
    return this.info;
  }

  private readDaemonFile(): DaemonFile | null {
    try {
      return JSON.parse(fs.readFileSync(path.join(this.home, "run", "daemon.json"), "utf8")) as DaemonFile;
    } catch {
      return null;
    }
  }
}

/** Creates a temporary home and starts a daemon on it. */
export async function startDaemon(options: StartDaemonOptions = {}): Promise<DaemonFixture> {
  const fixture = new DaemonFixture(options);
  try {
    await fixture.start();
  } catch (err) {
    fixture.cleanup();
    throw err;
  }
  return fixture;
}

// -----------------------------------------------------------------------------------------------
// Expected contents

/**
 * What a disk should hold, byte for byte, for tests that write fill patterns (`qemu-io write -P`) and
 * zeros. `readCommands()` turns it into qemu-io `read -P` commands covering the whole disk (one per run
 * of equal bytes), so every byte is checked, including the zeros between writes.
 */
export class PatternModel {
  private readonly bytes: Buffer;

  constructor(readonly size: number) {
    this.bytes = Buffer.alloc(size);
  }

  /** Record `write -P pattern offset length` (or a zero/trim with pattern 0). */
  fill(offset: number, length: number, pattern: number): void {
    if (offset < 0 || length < 0 || offset + length > this.size) {
      throw new Error(`model: ${length}@${offset} is outside the disk (${this.size} bytes)`);
    }
    this.bytes.fill(pattern, offset, offset + length);
  }

  /** qemu-io commands reading back the whole disk, each with its expected pattern. */
  readCommands(): string[] {
    const commands: string[] = [];
    let start = 0;
    while (start < this.size) {
      const pattern = this.bytes[start] as number;
      let end = start + 1;
      while (end < this.size && this.bytes[end] === pattern) end++;
      commands.push(`read -P 0x${pattern.toString(16)} ${start} ${end - start}`);
      start = end;
    }
    return commands;
  }
}
