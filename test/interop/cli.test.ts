/**
 * The real `bin/vdisk` against a daemon this test starts itself on ephemeral ports (`--listen 127.0.0.1:0
 * --http 127.0.0.1:0`). Every management command runs with --json and with human output, through the API
 * and the devices only (no NBD I/O needed): create, list, info, resize, delete, import, export, status; the
 * error messages (unknown disk, bad size, daemon not running, home locked); import then export is
 * byte-identical and both the disk and the exported file stay sparse. At the end SIGTERM must give exit
 * status 0 and remove the run files.
 */
import { after, before, test } from "node:test";
import * as assert from "node:assert/strict";
import { type ChildProcess, spawn, spawnSync } from "node:child_process";
import { createHash, randomBytes } from "node:crypto";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";

const root = path.resolve(__dirname, "..", "..", "..");
const bin = path.join(root, "bin", "vdisk");
const work = fs.mkdtempSync(path.join(os.tmpdir(), "vdisk-cli-"));
const home = path.join(work, "home");
const MiB = 1024 * 1024;

interface Run {
  status: number | null;
  stdout: string;
  stderr: string;
}

function vdisk(args: string[], options: { home?: string | null; env?: NodeJS.ProcessEnv } = {}): Run {
  const homeArgs = options.home === null ? [] : ["--home", options.home ?? home];
  const result = spawnSync(process.execPath, [bin, ...args, ...homeArgs], {
    cwd: work,
    env: { ...process.env, VDISK_HOME: "", ...options.env },
    encoding: "utf8",
    timeout: 60_000,
  });
  return { status: result.status, stdout: result.stdout, stderr: result.stderr };
}

function ok(args: string[]): Run {
  const run = vdisk(args);
  assert.equal(run.status, 0, `vdisk ${args.join(" ")} failed:\n${run.stderr}`);
  return run;
}

function json<T>(args: string[]): T {
  return JSON.parse(ok([...args, "--json"]).stdout) as T;
}

function fails(args: string[], message: RegExp, hint?: RegExp): Run {
  const run = vdisk(args);
  assert.equal(
    run.status,
    1,
    `vdisk ${args.join(" ")} should fail with status 1:\n${run.stdout}${run.stderr}`,
  );
  const lines = run.stderr.trimEnd().split("\n");
  assert.match(lines[0], /^vdisk: error: /);
  assert.match(lines[0], message);
  if (hint) assert.match(lines[1] ?? "", new RegExp(`^  hint: .*${hint.source}`));
  return run;
}

function sha256(file: string): string {
  return createHash("sha256").update(fs.readFileSync(file)).digest("hex");
}

interface DiskInfo {
  name: string;
  size: number;
  allocatedBytes: number;
  format: string;
  file: string;
  connections: number;
  readOnly: boolean;
}

interface Job {
  id: number;
  kind: string;
  state: string;
  bytesDone: number;
  bytesTotal: number;
  bytesWritten: number;
  error: unknown;
}

interface DaemonFile {
  pid: number;
  nbd: { tcp: { host: string; port: number }; unix: string };
  http: { tcp: { host: string; port: number }; unix: string };
}

let daemon: ChildProcess;
let daemonOut = "";
let daemonErr = "";
let daemonExit: Promise<number | null>;
let daemonFile: DaemonFile;

async function waitFor<T>(what: string, probe: () => T | null, timeoutMs = 15_000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    const value = probe();
    if (value !== null) return value;
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  throw new Error(
    `timed out waiting for ${what}\ndaemon stdout:\n${daemonOut}\ndaemon stderr:\n${daemonErr}`,
  );
}

function readDaemonFile(): DaemonFile | null {
  try {
    return JSON.parse(fs.readFileSync(path.join(home, "run", "daemon.json"), "utf8")) as DaemonFile;
  } catch {
    return null;
  }
}

before(async () => {
  daemon = spawn(
    process.execPath,
    [bin, "serve", "--home", home, "--listen", "127.0.0.1:0", "--http", "127.0.0.1:0"],
    {
      cwd: work,
      stdio: ["ignore", "pipe", "pipe"],
    },
  );
  daemon.stdout?.on("data", (chunk: Buffer) => (daemonOut += chunk.toString()));
  daemon.stderr?.on("data", (chunk: Buffer) => (daemonErr += chunk.toString()));
  daemonExit = new Promise((resolve) => daemon.on("exit", (code) => resolve(code)));
  daemonFile = await waitFor("run/daemon.json", readDaemonFile);
  await waitFor("the banner", () => (daemonOut.includes("API") ? true : null));
});

after(() => {
  if (daemon.exitCode === null && daemon.signalCode === null) daemon.kill("SIGKILL");
  fs.rmSync(work, { recursive: true, force: true });
});

test("serve prints how to reach it and writes run/daemon.json with the bound ports", () => {
  assert.equal(daemonFile.pid, daemon.pid);
  assert.ok(daemonFile.nbd.tcp.port > 0 && daemonFile.http.tcp.port > 0);
  assert.match(
    daemonOut,
    new RegExp(`vdisk: serving 1 disk from ${home.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")}`),
  );
  assert.ok(
    daemonOut.includes(`qemu-img info nbd://127.0.0.1:${daemonFile.nbd.tcp.port}/default`),
    daemonOut,
  );
  assert.ok(
    daemonOut.includes(`"nbd+unix:///default?socket=${path.join(home, "run", "nbd.sock")}"`),
    daemonOut,
  );
  assert.ok(daemonOut.includes(`http://127.0.0.1:${daemonFile.http.tcp.port}/v1/status`), daemonOut);
});

test("the first start made a thin 8 GiB disk named default", () => {
  const { disks } = json<{ disks: DiskInfo[] }>(["list"]);
  assert.equal(disks.length, 1);
  assert.equal(disks[0].name, "default");
  assert.equal(disks[0].size, 8 * 1024 * MiB);
  assert.equal(disks[0].format, "vdisk");
  assert.equal(disks[0].file, "pools/default/default.vdisk", "paths are relative to the home");
  assert.ok(disks[0].allocatedBytes < MiB, "thin");
  const table = ok(["list"]).stdout.split("\n");
  assert.match(table[0], /^NAME\s+SIZE\s+ALLOCATED/);
  assert.match(table[1], /^default\s+8 GiB\s+/);
});

test("status answers with the daemon's pid and addresses; $VDISK_HOME finds the home", () => {
  const status = json<{ pid: number; disks: number; nbd: { tcp: string } }>(["status"]);
  assert.equal(status.pid, daemon.pid);
  assert.equal(status.nbd.tcp, `127.0.0.1:${daemonFile.nbd.tcp.port}`);
  const viaEnv = vdisk(["status"], { home: null, env: { VDISK_HOME: home } });
  assert.equal(viaEnv.status, 0, viaEnv.stderr);
  assert.match(viaEnv.stdout, new RegExp(`pid ${daemon.pid}`));
});

test("create, info, resize (grow, refused shrink, --shrink), delete", () => {
  const created = json<DiskInfo>(["create", "web", "--size", "20M"]);
  assert.equal(created.size, 20 * MiB);
  assert.match(ok(["create", "db", "--size", "1.5G"]).stdout, /created disk db: 1\.5 GiB/);
  assert.match(ok(["list"]).stdout, /^web\s+20 MiB\s+0 B\s+vdisk\s+rw\s+0$/m);
  const info = ok(["info", "web"]).stdout;
  assert.match(info, /^size:\s+20 MiB \(20971520 bytes\)$/m);
  assert.match(info, /^file:\s+pools\/default\/web\.vdisk$/m);
  assert.equal(json<DiskInfo>(["info", "web"]).connections, 0);

  assert.equal(json<DiskInfo>(["resize", "web", "--size", "30M"]).size, 30 * MiB);
  fails(["resize", "web", "--size", "10M"], /smaller than disk web/, /--shrink/);
  assert.match(ok(["resize", "web", "--size", "10M", "--shrink"]).stdout, /disk web is now 10 MiB/);

  fails(["create", "web", "--size", "1G"], /already exists/, /another name/);
  assert.deepEqual(json<{ deleted: string }>(["delete", "db"]), {
    deleted: "db",
    snapshotsDeleted: [],
    snapshotsKept: [],
    imageRemoved: true,
  });
  assert.match(ok(["delete", "web"]).stdout, /deleted disk web/);
  assert.deepEqual(
    json<{ disks: DiskInfo[] }>(["list"]).disks.map((disk) => disk.name),
    ["default"],
  );
  assert.ok(!fs.existsSync(path.join(home, "pools", "default", "web.vdisk")));
});

test("errors say what was wrong and what to do", () => {
  fails(
    ["info", "nope"],
    /^vdisk: error: no disk named nope \(vdisk list shows the disks\)$/,
    /vdisk create nope/,
  );
  fails(["delete", "nope"], /no disk named nope/);
  fails(["resize", "nope", "--size", "1G"], /no disk named nope/);
  fails(["create", "x", "--size", "12Q"], /"12Q" is not a size/, /20G/);
  fails(["create", "x", "--size", "1000"], /multiple of 512/, /1024/);
  fails(["create", "x", "--size", "0"], /too small/);
  fails(["create", "a@b", "--size", "1G"], /reserved/);
  const other = path.join(work, "no-daemon-here");
  const run = vdisk(["list"], { home: other });
  assert.equal(run.status, 1);
  assert.equal(
    run.stderr,
    `vdisk: error: no vdisk daemon is running for home ${other}\n  hint: start it with: vdisk serve --home ${other}\n`,
  );
  const usage = vdisk(["create", "x"]);
  assert.equal(usage.status, 2, "usage errors exit 2");
  assert.match(usage.stderr, /--size/);
  assert.equal(vdisk(["frobnicate"]).status, 2);
});

test("a second daemon on the same home is refused", () => {
  const run = vdisk(["serve", "--listen", "127.0.0.1:0", "--http", "none"]);
  assert.equal(run.status, 1);
  assert.match(run.stderr, new RegExp(`in use by a running vdisk daemon \\(pid ${daemon.pid}\\)`));
  assert.match(run.stderr, /^ {2}hint: /m);
  assert.equal(readDaemonFile()?.pid, daemon.pid, "the running daemon's files are untouched");
});

/** 8 MiB image: 1 MiB of random data, 4 MiB of nothing, 300 KiB of random data, then a hole to the end. */
function makeImage(file: string): void {
  const fd = fs.openSync(file, "w");
  fs.writeSync(fd, randomBytes(MiB), 0, MiB, 0);
  fs.writeSync(fd, randomBytes(300 * 1024), 0, 300 * 1024, 5 * MiB);
  fs.ftruncateSync(fd, 8 * MiB);
  fs.closeSync(fd);
}

test("import then export is byte-identical, and both stay sparse", () => {
  const source = path.join(work, "source.img");
  const target = path.join(work, "exported.img");
  makeImage(source);
  const job = json<Job>(["import", source, "img"]);
  assert.equal(job.state, "done");
  assert.equal(job.kind, "import");
  assert.equal(job.bytesDone, 8 * MiB);
  assert.ok(job.bytesWritten <= 3 * MiB, `zero chunks skipped, wrote ${job.bytesWritten}`);
  const disk = json<DiskInfo>(["info", "img"]);
  assert.equal(disk.size, 8 * MiB);
  assert.ok(disk.allocatedBytes < 4 * MiB, `the disk is thin: ${disk.allocatedBytes} allocated`);

  const exported = ok(["export", "img", target]).stdout;
  assert.match(exported, /^exported disk img into .*exported\.img: 8 MiB in /m);
  assert.equal(sha256(target), sha256(source));
  const stat = fs.statSync(target);
  assert.equal(stat.size, 8 * MiB);
  assert.ok(stat.blocks * 512 < 4 * MiB, `the export is sparse: ${stat.blocks * 512} bytes allocated`);

  fails(["export", "img", target], /already exists/, /remove it or choose another/);
  assert.equal(sha256(target), sha256(source), "an existing file is never overwritten");
  fails(["import", path.join(work, "missing.img"), "other"], /cannot open missing\.img/);
  fails(["import", source, "img"], /already exists/);
});

test("import of an image whose size is not a multiple of 512 rounds the disk up", () => {
  const source = path.join(work, "odd.img");
  fs.writeFileSync(source, randomBytes(1000));
  const run = ok(["import", source, "odd"]);
  assert.match(run.stdout, /^imported .*odd\.img into disk odd: /m);
  assert.equal(json<DiskInfo>(["info", "odd"]).size, 1024);
  const target = path.join(work, "odd-out.img");
  const job = json<Job>(["export", "odd", target]);
  assert.equal(job.state, "done");
  const back = fs.readFileSync(target);
  assert.equal(back.length, 1024);
  assert.deepEqual(back.subarray(0, 1000), fs.readFileSync(source));
  assert.ok(back.subarray(1000).every((byte) => byte === 0));
  ok(["delete", "odd"]);
});

test("SIGTERM: exit status 0 and the run files are removed", async () => {
  daemon.kill("SIGTERM");
  const code = await daemonExit;
  assert.equal(code, 0, `daemon stderr:\n${daemonErr}`);
  const run = path.join(home, "run");
  for (const name of ["daemon.json", "lock", "api.sock", "nbd.sock"]) {
    assert.ok(!fs.existsSync(path.join(run, name)), `run/${name} removed`);
  }
  assert.ok(fs.existsSync(path.join(home, "pools", "default", "img.vdisk")), "disks survive");
  const after = vdisk(["list"]);
  assert.equal(after.status, 1);
  assert.match(after.stderr, /no vdisk daemon is running/);
});
