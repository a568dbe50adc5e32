/**
 * The reply writer end to end (src/protocol/nbd/reply-writer.ts): the daemon serves the same bytes with
 * every setting of `vdisk serve --reply-thread` — the default (large replies from the connection's
 * thread), 0 (every reply from the thread) and off (Node's socket writes) — to nbdcopy (several
 * connections, many requests in flight) and to fio's verify at depth; a client that hangs up while the
 * thread is writing it megabytes costs only its own connection; a bad value is refused with a clear error.
 */
import { after, test } from "node:test";
import * as assert from "node:assert/strict";
import { createHash, randomBytes } from "node:crypto";
import * as fs from "node:fs";

import {
  type DaemonFixture,
  describeRun,
  requireTool,
  run,
  startDaemon,
} from "../../src/testing/daemon-fixture";
import { RawNbdClient } from "../../src/testing/raw-nbd-client";
import { Cmd } from "../../src/protocol/nbd/constants";

const MiB = 1024 * 1024;
const diskBytes = 32 * MiB;

const daemons: DaemonFixture[] = [];
after(() => {
  for (const daemon of daemons) daemon.cleanup();
});

function sha256(file: string): string {
  return createHash("sha256").update(fs.readFileSync(file)).digest("hex");
}

function ok(daemon: DaemonFixture, cmd: string, args: string[]): void {
  // In the daemon's scratch directory: fio leaves its verify state file where it runs.
  const result = run(cmd, args, { timeoutMs: 120_000, cwd: daemon.work });
  assert.equal(result.status, 0, `${describeRun(cmd, args, result)}\ndaemon log:\n${daemon.log()}`);
}

for (const setting of [null, "0", "off"]) {
  const label = setting === null ? "default (32K)" : setting;
  test(`--reply-thread ${label}: nbdcopy round trip and fio verify at depth return every byte`, async () => {
    for (const tool of ["nbdcopy", "fio"]) requireTool(tool);
    const daemon = await startDaemon({
      name: "vdisk-reply-writer",
      serveArgs: setting === null ? [] : ["--reply-thread", setting],
    });
    daemons.push(daemon);
    assert.equal(daemon.vdisk(["create", "d", "--size", String(diskBytes)]).status, 0);
    const source = daemon.file("source.bin");
    fs.writeFileSync(source, randomBytes(diskBytes));
    ok(daemon, "nbdcopy", ["--flush", source, daemon.unixUri("d")]);
    const back = daemon.file("back.bin");
    // nbdcopy reads with several connections and many requests in flight each (256 KiB by default).
    ok(daemon, "nbdcopy", [daemon.unixUri("d"), back]);
    assert.equal(sha256(back), sha256(source), "the copy read back equals what was written");
    // 64 KiB and 4 KiB reads mixed with writes, every block checked.
    ok(daemon, "fio", [
      "--name=verify",
      "--ioengine=nbd",
      `--uri=${daemon.unixUri("d")}`,
      "--rw=randwrite",
      "--bsrange=4k-64k",
      "--iodepth=16",
      `--size=${diskBytes}`,
      "--verify=crc32c",
      "--verify_fatal=1",
      "--do_verify=1",
    ]);
    assert.ok(daemon.running, "the daemon is still up");
  });
}

test("a client that hangs up while its thread writes megabytes of replies: the daemon serves on", async () => {
  const daemon = await startDaemon({ name: "vdisk-reply-writer-hangup", serveArgs: ["--reply-thread", "0"] });
  daemons.push(daemon);
  assert.equal(daemon.vdisk(["create", "d", "--size", String(diskBytes)]).status, 0);
  for (let round = 0; round < 3; round++) {
    const client = await RawNbdClient.connect(daemon.socketPath);
    await client.handshake();
    await client.go("d", false); // simple replies: every read carries its full megabyte, holes too
    // 32 reads of 1 MiB, never read back: far more than the socket holds, so the thread waits for room.
    for (let i = 0; i < 32; i++) client.sendRequest(Cmd.READ, i + 1, i * MiB, MiB);
    await new Promise((resolve) => setTimeout(resolve, 100));
    client.close();
  }
  // Another client is served, and the daemon forgot the dead connections.
  const info = run("nbdinfo", ["--size", daemon.unixUri("d")]);
  assert.equal(info.status, 0, describeRun("nbdinfo", ["--size"], info));
  assert.equal(info.stdout.trim(), String(diskBytes));
  const deadline = Date.now() + 5000;
  for (;;) {
    const { data } = await daemon.apiRequest("GET", "disks/d");
    if ((data as { connections: number }).connections === 0) break;
    assert.ok(Date.now() < deadline, `connections still open: ${JSON.stringify(data)}`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  assert.ok(daemon.running);
});

test("vdisk serve --reply-thread with a bad value says what is wrong and what to give", async () => {
  const daemon = await startDaemon({ name: "vdisk-reply-writer-bad" });
  daemons.push(daemon);
  for (const [value, message] of [
    ["1T", /--reply-thread 1T is larger than any reply can be/],
    ["fast", /--reply-thread takes a size or off, not "fast"/],
  ] as const) {
    const result = daemon.vdisk(["serve", "--reply-thread", value, "--listen", "none", "--http", "none"]);
    assert.equal(result.status, 1, `${value}: ${result.stdout}${result.stderr}`);
    assert.match(result.stderr, message);
    assert.match(result.stderr, /hint: .*32K/);
  }
});
