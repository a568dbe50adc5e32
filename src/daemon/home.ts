/**
 * The vdisk home: one directory that holds everything of one daemon.
 *
 *   vdisk.json         home format version ({"format":"vdisk-home","version":1})
 *   catalog.json       the disks (see catalog.ts), replaced atomically
 *   api-token          optional: the token mutating API calls over TCP must carry (mode 0600)
 *   pools/default/     the default pool: disk files live here
 *   run/lock           pid of the daemon that owns this home (created with O_EXCL; stale pids are detected)
 *   run/nbd.sock       NBD Unix socket          run/api.sock   API Unix socket
 *   run/daemon.json    where the running daemon listens; written once listening, removed on clean exit
 *
 * Resolution: `--home DIR`, else $VDISK_HOME, else ./vdisk-home. The run directory is private (0700) so
 * only the owner can reach the API socket. Only one daemon runs per home: the lock file holds its pid.
 */
import * as fs from "node:fs";
import * as path from "node:path";
import { VdiskError, fromSystemError } from "../errors";

export const homeFormat = "vdisk-home";
export const homeVersion = 1;
export const defaultPoolName = "default";
/** Unix socket paths are limited to 108 bytes (sun_path) including the terminating NUL. */
export const socketPathBytesMax = 107;

export interface HomePaths {
  root: string;
  versionFile: string;
  catalogFile: string;
  apiTokenFile: string;
  poolsDir: string;
  defaultPoolDir: string;
  runDir: string;
  lockFile: string;
  nbdSocket: string;
  apiSocket: string;
  daemonFile: string;
}

/** What run/daemon.json holds. */
export interface DaemonInfo {
  pid: number;
  version: string;
  startedAt: string;
  nbd: { tcp: { host: string; port: number } | null; unix: string | null };
  http: { tcp: { host: string; port: number } | null; unix: string };
}

export function resolveHome(
  option?: string,
  env: NodeJS.ProcessEnv = process.env,
  cwd = process.cwd(),
): string {
  const chosen =
    option ?? (env.VDISK_HOME !== undefined && env.VDISK_HOME !== "" ? env.VDISK_HOME : "vdisk-home");
  return path.resolve(cwd, chosen);
}

export function homePaths(root: string): HomePaths {
  const runDir = path.join(root, "run");
  const poolsDir = path.join(root, "pools");
  return {
    root,
    versionFile: path.join(root, "vdisk.json"),
    catalogFile: path.join(root, "catalog.json"),
    apiTokenFile: path.join(root, "api-token"),
    poolsDir,
    defaultPoolDir: path.join(poolsDir, defaultPoolName),
    runDir,
    lockFile: path.join(runDir, "lock"),
    nbdSocket: path.join(runDir, "nbd.sock"),
    apiSocket: path.join(runDir, "api.sock"),
    daemonFile: path.join(runDir, "daemon.json"),
  };
}

/** Create the home's directories and version file if missing; check the version if present. */
export function prepareHome(paths: HomePaths): { created: boolean } {
  try {
    fs.mkdirSync(paths.root, { recursive: true });
    fs.mkdirSync(paths.defaultPoolDir, { recursive: true });
    fs.mkdirSync(paths.runDir, { recursive: true, mode: 0o700 });
    fs.chmodSync(paths.runDir, 0o700);
  } catch (err) {
    throw fromSystemError(err, `cannot create the vdisk home ${paths.root}`);
  }
  if (!fs.existsSync(paths.versionFile)) {
    writeFileAtomic(
      paths.versionFile,
      JSON.stringify({ format: homeFormat, version: homeVersion }, null, 2) + "\n",
    );
    return { created: true };
  }
  checkHomeVersion(paths);
  return { created: false };
}

function checkHomeVersion(paths: HomePaths): void {
  let parsed: unknown;
  try {
    parsed = JSON.parse(fs.readFileSync(paths.versionFile, "utf8"));
  } catch (err) {
    throw new VdiskError("CORRUPT", `${paths.versionFile} is not readable JSON`, {
      cause: err,
      hint: `restore it, or write {"format":"${homeFormat}","version":${homeVersion}} into it`,
    });
  }
  const record = parsed as { format?: unknown; version?: unknown } | null;
  if (record === null || typeof record !== "object" || record.format !== homeFormat) {
    throw new VdiskError(
      "CORRUPT",
      `${paths.root} is not a vdisk home (${paths.versionFile} says otherwise)`,
      {
        hint: "choose another directory with --home",
      },
    );
  }
  if (record.version !== homeVersion) {
    throw new VdiskError("CORRUPT", `home ${paths.root} has format version ${String(record.version)}`, {
      hint: `this vdisk understands version ${homeVersion}; use the vdisk release that made this home`,
    });
  }
}

/** Write a file so that a crash leaves either the old or the new content: temp, fsync, rename, fsync dir. */
export function writeFileAtomic(file: string, content: string, mode = 0o644): void {
  const temp = `${file}.tmp-${process.pid}`;
  try {
    const fd = fs.openSync(temp, "w", mode);
    try {
      fs.writeFileSync(fd, content);
      fs.fsyncSync(fd);
    } finally {
      fs.closeSync(fd);
    }
    fs.renameSync(temp, file);
    fsyncDirectory(path.dirname(file));
  } catch (err) {
    fs.rmSync(temp, { force: true });
    throw fromSystemError(err, `cannot write ${file}`);
  }
}

export function fsyncDirectory(dir: string): void {
  const fd = fs.openSync(dir, "r");
  try {
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

/** True if a process with this pid exists (EPERM: it exists but belongs to someone else). */
export function processAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === "EPERM";
  }
}

/**
 * Take the home's lock: create run/lock exclusively with our pid. A lock whose pid is gone is stale and is
 * replaced (once). A live pid means another daemon owns the home: HOME_LOCKED.
 */
export function acquireLock(paths: HomePaths): void {
  for (let attempt = 0; attempt < 2; attempt += 1) {
    try {
      fs.writeFileSync(paths.lockFile, `${process.pid}\n`, { flag: "wx", mode: 0o600 });
      return;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== "EEXIST")
        throw fromSystemError(err, "cannot lock the home");
    }
    const owner = readLockPid(paths);
    if (owner !== null && owner !== process.pid && processAlive(owner)) {
      throw new VdiskError(
        "HOME_LOCKED",
        `home ${paths.root} is in use by a running vdisk daemon (pid ${owner})`,
        {
          hint: `stop it first (kill ${owner}), or serve another home with --home DIR`,
        },
      );
    }
    fs.rmSync(paths.lockFile, { force: true });
  }
  throw new VdiskError("HOME_LOCKED", `cannot take the lock ${paths.lockFile}`, {
    hint: "another vdisk daemon is starting on this home at the same time; try again",
  });
}

function readLockPid(paths: HomePaths): number | null {
  try {
    const pid = Number.parseInt(fs.readFileSync(paths.lockFile, "utf8").trim(), 10);
    return Number.isSafeInteger(pid) && pid > 0 ? pid : null;
  } catch {
    return null;
  }
}

/** Remove the lock if it is ours. */
export function releaseLock(paths: HomePaths): void {
  if (readLockPid(paths) === process.pid) fs.rmSync(paths.lockFile, { force: true });
}

export function writeDaemonInfo(paths: HomePaths, info: DaemonInfo): void {
  writeFileAtomic(paths.daemonFile, JSON.stringify(info, null, 2) + "\n", 0o600);
}

/** run/daemon.json, or null if absent or unreadable (a daemon that is starting or gone). */
export function readDaemonInfo(paths: HomePaths): DaemonInfo | null {
  try {
    const parsed = JSON.parse(fs.readFileSync(paths.daemonFile, "utf8")) as DaemonInfo;
    return typeof parsed === "object" && parsed !== null && typeof parsed.pid === "number" ? parsed : null;
  } catch {
    return null;
  }
}

/** Remove everything under run/ that this daemon made (daemon.json, sockets, then the lock). */
export function removeRunFiles(paths: HomePaths, sockets: string[]): void {
  fs.rmSync(paths.daemonFile, { force: true });
  for (const socket of sockets) fs.rmSync(socket, { force: true });
  releaseLock(paths);
}

/** Unix socket paths are short; say so before bind() fails with a cryptic EINVAL. */
export function checkSocketPath(socketPath: string, what: string): void {
  if (Buffer.byteLength(socketPath) > socketPathBytesMax) {
    throw new VdiskError(
      "INVALID_ARGUMENT",
      `the ${what} path ${socketPath} is longer than ${socketPathBytesMax} bytes`,
      {
        hint: "use a home with a shorter path (--home), or give the NBD socket elsewhere with --socket PATH",
      },
    );
  }
}
