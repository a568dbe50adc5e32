/**
 * Durability across daemon restarts, with real clients (src/testing/daemon-fixture.ts).
 *
 * 1. Writes that a client flushed — qemu-io (which flushes when it exits), nbdsh with an explicit flush, a
 *    FUA write, a trim then flush — read back byte for byte after SIGTERM (exit status 0) and a restart.
 * 2. SIGTERM while a client is connected and idle: the daemon still exits 0, promptly.
 * 3. After `kill -9` the run files (lock, daemon.json, sockets) are stale: the CLI says no daemon runs, a
 *    new daemon on the same home takes them over, `vdisk list` works, and every flushed write is there.
 * 4. The catalog survives too: created, resized and deleted disks stay so.
 * The tests run in order and share one home.
 */
import { after, before, test } from "node:test";
import * as assert from "node:assert/strict";
import * as fs from "node:fs";
import * as path from "node:path";
import {
  type DaemonFixture,
  type RunResult,
  describeRun,
  requireTool,
  run,
  PatternModel,
  spawnTool,
  startDaemon,
} from "../../src/testing/daemon-fixture";

const KiB = 1024;
const MiB = 1024 * KiB;
const diskBytes = 64 * MiB;

let daemon: DaemonFixture;

before(async () => {
  for (const tool of ["qemu-io", "qemu-img", "nbdsh"]) requireTool(tool);
  daemon = await startDaemon({ name: "vdisk-restart" });
});

after(() => {
  daemon?.cleanup();
});

function ok(cmd: string, args: string[]): RunResult {
  const result = run(cmd, args);
  assert.equal(result.status, 0, `${describeRun(cmd, args, result)}\ndaemon log:\n${daemon.log()}`);
  return result;
}

function vdiskOk(args: string[]): RunResult {
  const result = daemon.vdisk(args);
  assert.equal(result.status, 0, describeRun("vdisk", args, result));
  return result;
}

function qemuIo(uri: string, commands: string[]): void {
  const args = ["-f", "raw", ...commands.flatMap((command) => ["-c", command]), uri];
  const result = ok("qemu-io", args);
  assert.doesNotMatch(result.stdout + result.stderr, /failed/i, describeRun("qemu-io", args, result));
}

function nbdsh(uri: string, script: string): string {
  return ok("nbdsh", ["-u", uri, "-c", script]).stdout;
}

/** What each disk must hold; checked in full (every byte) before and after every restart. */
const models = new Map<string, PatternModel>();

function model(name: string): PatternModel {
  const found = models.get(name);
  if (found === undefined) throw new Error(`no model for ${name}`);
  return found;
}

function createDisk(name: string, bytes = diskBytes): void {
  vdiskOk(["create", name, "--size", String(bytes)]);
  models.set(name, new PatternModel(bytes));
}

/** qemu-io writes (`write -P pattern offset length`, `write -z offset length`) recorded in the model. */
function qemuIoWrite(uri: string, name: string, writes: Array<[number, number, number]>): void {
  qemuIo(
    uri,
    writes.map(([pattern, offset, length]) =>
      pattern === 0
        ? `write -z ${offset} ${length}`
        : `write -P 0x${pattern.toString(16)} ${offset} ${length}`,
    ),
  );
  for (const [pattern, offset, length] of writes) model(name).fill(offset, length, pattern);
}

function verifyAll(): void {
  for (const [name, expected] of models) {
    const commands = expected.readCommands();
    qemuIo(daemon.tcpUri(name), commands);
    qemuIo(daemon.unixUri(name), commands);
  }
}

test("SIGTERM then restart: every flushed write reads back", async () => {
  createDisk("r1");
  createDisk("r2");

  // qemu-io flushes before it exits.
  qemuIoWrite(daemon.tcpUri("r1"), "r1", [
    [0x11, 0, MiB],
    [0x12, 1000, 3000],
    [0x13, 63 * MiB, MiB],
  ]);
  qemuIoWrite(daemon.unixUri("r2"), "r2", [
    [0x21, 5 * MiB, 3 * MiB],
    [0, 6 * MiB, 4 * KiB],
  ]);

  // nbdsh: plain writes then an explicit flush; a FUA write; a trim then flush.
  nbdsh(
    daemon.tcpUri("r1"),
    `
h.pwrite(b"\\x14" * (256 * 1024), 10 * 1024 * 1024)
h.pwrite(b"\\x15" * 777, 12 * 1024 * 1024 + 5)
h.flush()
h.pwrite(b"\\x16" * 4096, 14 * 1024 * 1024, nbd.CMD_FLAG_FUA)
h.trim(64 * 1024, 512 * 1024)
h.flush()
`,
  );
  const r1 = model("r1");
  r1.fill(10 * MiB, 256 * KiB, 0x14);
  r1.fill(12 * MiB + 5, 777, 0x15);
  r1.fill(14 * MiB, 4 * KiB, 0x16);
  r1.fill(512 * KiB, 64 * KiB, 0);
  // Before the restart the model already holds (so a failure after it means data was lost).
  verifyAll();

  const before = daemon.pid;
  await daemon.stop(); // asserts exit status 0
  for (const name of ["daemon.json", "lock", "nbd.sock", "api.sock"]) {
    assert.ok(!fs.existsSync(path.join(daemon.home, "run", name)), `run/${name} removed by a clean stop`);
  }
  await daemon.start();
  assert.notEqual(daemon.pid, before);
  verifyAll();
});

test("SIGTERM with an idle client connected: exit status 0, promptly", async () => {
  // nbdsh connects and then sits idle far longer than the test waits.
  const idle = spawnTool("nbdsh", ["-u", daemon.tcpUri("r1"), "-c", "import time\ntime.sleep(60)"], {
    timeoutMs: 90_000,
  });
  const deadline = Date.now() + 10_000;
  for (;;) {
    const info = daemon.vdiskJson<{ connections: number }>(["info", "r1"]);
    if (info.connections === 1) break;
    assert.ok(Date.now() < deadline, "the idle client never showed up in vdisk info");
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  const started = Date.now();
  await daemon.stop();
  const stopMs = Date.now() - started;
  assert.ok(stopMs < 5_000, `stopping took ${stopMs} ms with an idle client`);
  idle.kill();
  await idle.done;
  await daemon.start();
  verifyAll();
});

test("kill -9, restart on the same home: stale lock and socket taken over, flushed data still there", async () => {
  nbdsh(
    daemon.unixUri("r2"),
    `
h.pwrite(b"\\x22" * (1024 * 1024), 20 * 1024 * 1024)
h.pwrite(b"\\x23" * 3000, 30 * 1024 * 1024 + 1000)
h.flush()
`,
  );
  model("r2").fill(20 * MiB, MiB, 0x22);
  model("r2").fill(30 * MiB + 1000, 3000, 0x23);
  qemuIoWrite(daemon.tcpUri("r2"), "r2", [[0x24, 40 * MiB, 64 * KiB]]);
  verifyAll();

  const killed = daemon.pid;
  await daemon.kill9();
  const runDir = path.join(daemon.home, "run");
  assert.ok(fs.existsSync(path.join(runDir, "lock")), "kill -9 leaves the lock behind");
  assert.ok(fs.existsSync(path.join(runDir, "nbd.sock")), "kill -9 leaves the NBD socket behind");
  const down = daemon.vdisk(["list"]);
  assert.equal(down.status, 1, describeRun("vdisk list", [], down));
  assert.match(down.stderr, /no vdisk daemon is running/);

  await daemon.start();
  assert.notEqual(daemon.pid, killed);
  assert.equal(fs.readFileSync(path.join(runDir, "lock"), "utf8").trim(), String(daemon.pid));
  const disks = daemon.vdiskJson<{ disks: Array<{ name: string; size: number }> }>(["list"]).disks;
  assert.deepEqual(disks.map((disk) => [disk.name, disk.size]).sort(), [
    ["default", 8 * 1024 * MiB],
    ["r1", diskBytes],
    ["r2", diskBytes],
  ]);
  assert.match(vdiskOk(["list"]).stdout, /^r2\s+64 MiB\s+/m);
  verifyAll(); // over TCP and over the re-created Unix socket at the same path
});

test("created, resized and deleted disks stay so across a restart", async () => {
  createDisk("grow");
  qemuIoWrite(daemon.tcpUri("grow"), "grow", [[0x31, 63 * MiB, MiB]]);
  vdiskOk(["resize", "grow", "--size", "128M"]);
  const grown = new PatternModel(128 * MiB);
  grown.fill(63 * MiB, MiB, 0x31);
  models.set("grow", grown);
  qemuIoWrite(daemon.tcpUri("grow"), "grow", [[0x32, 127 * MiB, MiB]]);
  vdiskOk(["create", "gone", "--size", "64M"]);
  vdiskOk(["delete", "gone"]);
  await daemon.restart();
  assert.equal(daemon.vdiskJson<{ size: number }>(["info", "grow"]).size, 128 * MiB);
  const missing = daemon.vdisk(["info", "gone"]);
  assert.equal(missing.status, 1);
  assert.match(missing.stderr, /no disk named gone/);
  const info = JSON.parse(ok("qemu-img", ["info", "--output=json", daemon.tcpUri("grow")]).stdout) as {
    "virtual-size": number;
  };
  assert.equal(info["virtual-size"], 128 * MiB);
  verifyAll();
});
