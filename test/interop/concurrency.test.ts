/**
 * Many clients at once against one real daemon (src/testing/daemon-fixture.ts):
 * 1. four qemu-io processes write disjoint regions of one disk in parallel (with several aio writes in
 *    flight each), while two more write to two other disks; then every byte of every disk is verified;
 * 2. the CLI (create, list, info, status, resize grow — also of the disk being written — delete) runs while
 *    fio writes with verify=crc32c: every command succeeds and fio's verify passes;
 * 3. sockets sending garbage (random bytes before the handshake, after the client flags, a truncated
 *    option, a hang-up mid-payload) are closed by the daemon, while qemu-io on another connection
 *    writes and reads patterns unaffected; the daemon counts the protocol errors and keeps serving.
 */
import { after, before, test } from "node:test";
import * as assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import * as fs from "node:fs";
import * as net from "node:net";
import {
  type DaemonFixture,
  type RunResult,
  PatternModel,
  describeRun,
  requireTool,
  run,
  spawnTool,
  startDaemon,
} from "../../src/testing/daemon-fixture";

const KiB = 1024;
const MiB = 1024 * KiB;
const diskBytes = 64 * MiB;

let daemon: DaemonFixture;

before(async () => {
  for (const tool of ["qemu-io", "qemu-img", "fio"]) requireTool(tool);
  daemon = await startDaemon({ name: "vdisk-concurrency" });
});

after(() => {
  daemon?.cleanup();
});

function vdiskOk(args: string[]): RunResult {
  const result = daemon.vdisk(args);
  assert.equal(result.status, 0, `${describeRun("vdisk", args, result)}\ndaemon log:\n${daemon.log()}`);
  return result;
}

function assertRunOk(what: string, args: readonly string[], result: RunResult): void {
  assert.equal(result.status, 0, `${describeRun(what, args, result)}\ndaemon log:\n${daemon.log()}`);
  assert.doesNotMatch(result.stdout + result.stderr, /failed/i, describeRun(what, args, result));
}

function qemuIoArgs(uri: string, commands: string[]): string[] {
  return ["-f", "raw", ...commands.flatMap((command) => ["-c", command]), uri];
}

function qemuIo(uri: string, commands: string[]): void {
  const args = qemuIoArgs(uri, commands);
  assertRunOk("qemu-io", args, run("qemu-io", args));
}

/** Starts qemu-io asynchronously. */
function qemuIoAsync(uri: string, commands: string[]): Promise<void> {
  const args = qemuIoArgs(uri, commands);
  const started = spawnTool("qemu-io", args);
  return started.done.then((result) => assertRunOk("qemu-io", args, result));
}

test("parallel qemu-io clients on one disk and on different disks, then every byte verified", async () => {
  const models = new Map<string, PatternModel>();
  for (const name of ["shared", "solo-a", "solo-b"]) {
    vdiskOk(["create", name, "--size", String(diskBytes)]);
    models.set(name, new PatternModel(diskBytes));
  }
  const region = 16 * MiB;
  const clients: Promise<void>[] = [];
  // Four writers on "shared", each in its own 16 MiB region, alternating TCP and Unix socket, each with
  // 16 asynchronous 256 KiB writes in flight plus unaligned ones, then aio_flush.
  for (let writer = 0; writer < 4; writer++) {
    const base = writer * region;
    const commands: string[] = [];
    const shared = models.get("shared") as PatternModel;
    for (let i = 0; i < 16; i++) {
      const pattern = 0x10 * (writer + 1) + i;
      const offset = base + i * 512 * KiB;
      commands.push(`aio_write -P 0x${pattern.toString(16)} ${offset} 256K`);
      shared.fill(offset, 256 * KiB, pattern);
    }
    commands.push("aio_flush");
    const odd = base + 9 * MiB + 333;
    commands.push(`write -P 0x${(0xa0 + writer).toString(16)} ${odd} 70000`);
    shared.fill(odd, 70000, 0xa0 + writer);
    const uri = writer % 2 === 0 ? daemon.tcpUri("shared") : daemon.unixUri("shared");
    clients.push(qemuIoAsync(uri, commands));
  }
  // Meanwhile two other disks get their own writers.
  for (const [name, pattern] of [
    ["solo-a", 0x5a],
    ["solo-b", 0x5b],
  ] as const) {
    clients.push(
      qemuIoAsync(daemon.tcpUri(name), [
        `write -P 0x${pattern.toString(16)} 0 8M`,
        `write -z 1M 4K`,
        `write -P 0x${pattern.toString(16)} 60M 4M`,
      ]),
    );
    const solo = models.get(name) as PatternModel;
    solo.fill(0, 8 * MiB, pattern);
    solo.fill(MiB, 4 * KiB, 0);
    solo.fill(60 * MiB, 4 * MiB, pattern);
  }
  await Promise.all(clients);

  // Verify each disk (and each region of the shared disk) in parallel too.
  const verifiers: Promise<void>[] = [];
  for (const [name, model] of models) {
    verifiers.push(qemuIoAsync(daemon.tcpUri(name), model.readCommands()));
  }
  await Promise.all(verifiers);
});

test("CLI commands while fio writes and verifies: all succeed", async () => {
  vdiskOk(["create", "busy", "--size", String(diskBytes)]);
  const fioOutput = daemon.file("fio-busy.json");
  const fioArgs = [
    "--name=busy",
    "--ioengine=nbd",
    `--uri=${daemon.tcpUri("busy")}`,
    "--rw=randwrite",
    "--bs=4k",
    "--iodepth=32",
    "--size=32M",
    "--rate=16m", // about 2 s of writing: long enough to overlap the CLI commands below
    "--verify=crc32c",
    "--verify_state_save=0", // no local-*-verify.state files
    "--do_verify=1",
    "--output-format=json",
    `--output=${fioOutput}`,
  ];
  const fio = spawnTool("fio", fioArgs, { timeoutMs: 60_000, cwd: daemon.work });
  let fioFinished = false;
  void fio.done.then(() => (fioFinished = true));

  // Wait until fio is writing (its engine first opens a short connection just to learn the size, so a
  // connection alone is not enough: wait for allocated bytes), then run the CLI against the busy daemon.
  const deadline = Date.now() + 10_000;
  for (;;) {
    const disk = await daemon.api<{ connections: number; allocatedBytes: number }>("disks/busy");
    if (disk.connections === 1 && disk.allocatedBytes > 0) break;
    assert.ok(Date.now() < deadline, "fio never started writing");
    assert.ok(!fioFinished, "fio exited before writing");
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
  const created = daemon.vdiskJson<{ name: string; size: number }>(["create", "side", "--size", "256M"]);
  assert.deepEqual([created.name, created.size], ["side", 256 * MiB]);
  const names = daemon.vdiskJson<{ disks: Array<{ name: string }> }>(["list"]).disks.map((d) => d.name);
  assert.ok(names.includes("busy") && names.includes("side"), names.join(","));
  assert.equal(daemon.vdiskJson<{ connections: number }>(["info", "busy"]).connections, 1);
  assert.equal(daemon.vdiskJson<{ size: number }>(["resize", "side", "--size", "512M"]).size, 512 * MiB);
  // Growing the disk fio is writing to: fio keeps going, its verify still passes.
  assert.equal(daemon.vdiskJson<{ size: number }>(["resize", "busy", "--size", "128M"]).size, 128 * MiB);
  const status = daemon.vdiskJson<{ connections: number; server: { requests: number } }>(["status"]);
  assert.ok(status.connections >= 1, JSON.stringify(status));
  assert.ok(status.server.requests > 0);
  assert.equal(daemon.vdiskJson<{ deleted: string }>(["delete", "side"]).deleted, "side");
  assert.equal(fioFinished, false, "fio was still writing while every CLI command ran");

  const result = await fio.done;
  const report = fs.existsSync(fioOutput) ? fs.readFileSync(fioOutput, "utf8") : "";
  assert.equal(result.status, 0, `${describeRun("fio", fioArgs, result)}\n${report}\n${daemon.log()}`);
  const jobs = (JSON.parse(report) as { jobs: Array<{ error: number; write: { io_bytes: number } }> }).jobs;
  assert.equal(jobs[0]?.error, 0);
  assert.equal(jobs[0]?.write.io_bytes, 32 * MiB);

  const info = JSON.parse(run("qemu-img", ["info", "--output=json", daemon.tcpUri("busy")]).stdout) as {
    "virtual-size": number;
  };
  assert.equal(info["virtual-size"], 128 * MiB, "a new connection sees the grown size");
  qemuIo(daemon.tcpUri("busy"), ["read -P 0 64M 64M", "write -P 0x7e 127M 1M", "read -P 0x7e 127M 1M"]);
});

/** Connects to the NBD TCP port, sends `chunks` with short pauses, and resolves when the daemon hangs up. */
function badClient(chunks: Buffer[], options: { destroyAfter?: boolean } = {}): Promise<string> {
  return new Promise((resolve, reject) => {
    const socket = net.connect(daemon.port, "127.0.0.1");
    let received = 0;
    const timer = setTimeout(() => {
      socket.destroy();
      reject(new Error(`the daemon did not close a garbage connection (received ${received} bytes)`));
    }, 10_000);
    socket.on("data", (chunk: Buffer) => (received += chunk.length));
    socket.on("error", () => undefined); // ECONNRESET when the daemon closes while we write
    socket.on("close", () => {
      clearTimeout(timer);
      resolve(`closed after receiving ${received} bytes`);
    });
    socket.on("connect", () => {
      let index = 0;
      const sendNext = (): void => {
        if (socket.destroyed) return;
        if (index < chunks.length) {
          socket.write(chunks[index++] as Buffer);
          setTimeout(sendNext, 5);
        } else if (options.destroyAfter) {
          socket.destroy();
        }
      };
      sendNext();
    });
  });
}

test("garbage-sending sockets are closed while qemu-io on another connection is unaffected", async () => {
  vdiskOk(["create", "steady", "--size", String(diskBytes)]);
  const before = daemon.vdiskJson<{ server: { protocolErrors: number } }>(["status"]).server;

  const model = new PatternModel(diskBytes);
  const writes: string[] = [];
  for (let i = 0; i < 32; i++) {
    const offset = i * 2 * MiB + i * 111;
    writes.push(`write -P 0x${(0x40 + i).toString(16)} ${offset} 300000`);
    model.fill(offset, 300000, 0x40 + i);
  }
  const clientFlags = Buffer.from([0, 0, 0, 3]); // FIXED_NEWSTYLE | NO_ZEROES
  const option = (code: number, length: number): Buffer => {
    const header = Buffer.alloc(16);
    header.write("IHAVEOPT", 0, "latin1");
    header.writeUInt32BE(code, 8);
    header.writeUInt32BE(length, 12);
    return header;
  };
  const bad = [
    // Random bytes at once: the client flags are nonsense.
    badClient([randomBytes(64 * KiB)]),
    // Valid flags, then random bytes where the option header should be (bad magic).
    badClient([clientFlags, randomBytes(4096), randomBytes(4096)]),
    // Valid flags, an option with a bad magic after a plausible header.
    badClient([clientFlags, Buffer.from("IHAVEOPX"), randomBytes(1024)]),
    // Valid flags, a GO option announcing 100 bytes, 10 sent, then the client hangs up.
    badClient([clientFlags, option(7, 100), randomBytes(10)], { destroyAfter: true }),
  ];
  const steady = qemuIoAsync(daemon.tcpUri("steady"), writes);
  const outcomes = await Promise.all(bad);
  assert.equal(outcomes.length, 4);
  await steady;
  qemuIo(daemon.unixUri("steady"), model.readCommands());

  const afterStatus = daemon.vdiskJson<{ server: { protocolErrors: number } }>(["status"]).server;
  assert.ok(
    afterStatus.protocolErrors >= before.protocolErrors + 3,
    `protocol errors counted: ${before.protocolErrors} → ${afterStatus.protocolErrors}`,
  );
  // Every connection is gone (the last qemu-io may still be hanging up: poll briefly).
  const deadline = Date.now() + 5_000;
  for (;;) {
    const open = daemon.vdiskJson<{ server: { connections: number } }>(["status"]).server.connections;
    if (open === 0) break;
    assert.ok(Date.now() < deadline, `${open} connections still open`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
});

test("delete is refused while a client is connected, --force disconnects it; shrink under a client", async () => {
  vdiskOk(["create", "doomed", "--size", String(diskBytes)]);
  vdiskOk(["create", "shrinking", "--size", String(diskBytes)]);
  // Each nbdsh client writes, then waits for a file to appear before trying again.
  const go = daemon.file("go");
  const waitForGo = `
import os, time, json
def wait():
    deadline = time.time() + 30
    while not os.path.exists(${JSON.stringify(go)}):
        assert time.time() < deadline
        time.sleep(0.02)
def attempt(fn):
    try:
        r = fn()
        return "ok" if r is None else r
    except nbd.Error as e:
        return e.errno
`;
  const doomed = spawnTool("nbdsh", [
    "-u",
    daemon.tcpUri("doomed"),
    "-c",
    `${waitForGo}
h.pwrite(b"d" * 4096, 0)
wait()
print(json.dumps(attempt(lambda: len(h.pread(4096, 0)))))
`,
  ]);
  const shrinking = spawnTool("nbdsh", [
    "-u",
    daemon.tcpUri("shrinking"),
    "-c",
    `${waitForGo}
h.set_strict_mode(0)
h.pwrite(b"s" * 4096, 40 * 1024 * 1024)
h.pwrite(b"t" * 4096, 0)
wait()
print(json.dumps([attempt(lambda: h.pread(4096, 40 * 1024 * 1024) and None),
                  attempt(lambda: h.pwrite(b"u" * 4096, 40 * 1024 * 1024)),
                  attempt(lambda: h.pread(4096, 0) == b"t" * 4096),
                  attempt(lambda: h.pread(4096, 32 * 1024 * 1024 - 4096) == bytes(4096)),
                  attempt(lambda: h.flush())]))
`,
  ]);
  const deadline = Date.now() + 10_000;
  for (;;) {
    const [a, b] = await Promise.all([
      daemon.api<{ connections: number }>("disks/doomed"),
      daemon.api<{ connections: number }>("disks/shrinking"),
    ]);
    if (a.connections === 1 && b.connections === 1) break;
    assert.ok(Date.now() < deadline, "the nbdsh clients never connected");
    await new Promise((resolve) => setTimeout(resolve, 20));
  }

  const refused = daemon.vdisk(["delete", "doomed"]);
  assert.equal(refused.status, 1, describeRun("vdisk delete", [], refused));
  assert.match(refused.stderr, /disk doomed has 1 client connection/);
  assert.match(refused.stderr, /--force/);
  assert.match(vdiskOk(["delete", "doomed", "--force"]).stdout, /deleted disk doomed/);
  assert.match(vdiskOk(["resize", "shrinking", "--size", "32M", "--shrink"]).stdout, /now 32 MiB/);
  fs.writeFileSync(go, "");

  const [doomedResult, shrinkingResult] = await Promise.all([doomed.done, shrinking.done]);
  assert.equal(doomedResult.status, 0, describeRun("nbdsh doomed", [], doomedResult));
  assert.equal(JSON.parse(doomedResult.stdout.trim()), "ENOTCONN", "the forced delete cut the client");
  assert.equal(shrinkingResult.status, 0, describeRun("nbdsh shrinking", [], shrinkingResult));
  // Past the new end: read EINVAL, write ENOSPC; before it, the data and the connection are fine.
  assert.deepEqual(JSON.parse(shrinkingResult.stdout.trim()), ["EINVAL", "ENOSPC", true, true, "ok"]);

  const gone = run("qemu-img", ["info", daemon.tcpUri("doomed")]);
  assert.notEqual(gone.status, 0);
  assert.match(gone.stderr, /no export named "doomed"/);
  qemuIo(daemon.unixUri("shrinking"), ["read -P 0x74 0 4K", "read -P 0 4K 32764K"]);
});
