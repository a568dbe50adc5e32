/**
 * A real power cut for the vdisk image, as far as a process can have one: `kill -9` of the daemon in the
 * middle of a fio write workload, then a restart on the same home.
 *
 * Phase 1 writes the first half of a vdisk-format disk with fio (crc32c verify headers) and ends with a
 * flush; a snapshot is taken; phase 2 writes the other half and, a moment in, the daemon is killed.
 * After the restart: fio's verify pass over the first half succeeds on the disk and on the snapshot
 * (read-only export DISK@SNAP), `vdisk check` is clean, and the disk takes new writes.
 */
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import * as fs from "node:fs";
import {
  type DaemonFixture,
  describeRun,
  requireTool,
  spawnTool,
  startDaemon,
} from "../../src/testing/daemon-fixture";

const MiB = 1024 * 1024;
const diskBytes = 128 * MiB;
const half = diskBytes / 2;
let daemon: DaemonFixture;

before(async () => {
  requireTool("fio");
  daemon = await startDaemon({ name: "vdisk-kill9" });
});

after(() => daemon?.cleanup());

function fioArgs(uri: string, extra: string[], output: string, offset: number): string[] {
  return [
    "--name=kill9",
    "--ioengine=nbd",
    `--uri=${uri}`,
    "--rw=randwrite",
    "--bs=4k",
    "--iodepth=32",
    `--offset=${offset}`,
    `--size=${half}`,
    "--verify=crc32c",
    "--verify_state_save=0",
    "--randseed=4321",
    "--output-format=json",
    `--output=${output}`,
    ...extra,
  ];
}

async function fio(args: string[]): Promise<void> {
  const run = spawnTool("fio", args, { timeoutMs: 120_000, cwd: daemon.work });
  const result = await run.done;
  assert.equal(result.status, 0, `${describeRun("fio", args, result)}\ndaemon log:\n${daemon.log()}`);
}

test(
  "kill -9 under a fio write workload loses no flushed write and leaves the image clean",
  { timeout: 240_000 },
  async () => {
    const created = daemon.vdisk(["create", "k9", "--size", String(diskBytes), "--format", "vdisk"]);
    assert.equal(created.status, 0, created.stderr);

    // Phase 1: the first half, flushed at the end (fio's end_fsync sends NBD_CMD_FLUSH).
    await fio(fioArgs(daemon.unixUri("k9"), ["--do_verify=0", "--end_fsync=1"], daemon.file("p1.json"), 0));
    const snap = daemon.vdisk(["snapshot", "create", "k9", "before"]);
    assert.equal(snap.status, 0, snap.stderr);

    // Phase 2: the second half, cut short by kill -9.
    const phase2 = spawnTool(
      "fio",
      fioArgs(
        daemon.unixUri("k9"),
        ["--time_based", "--runtime=60", "--do_verify=0"],
        daemon.file("p2.json"),
        half,
      ),
      { timeoutMs: 120_000, cwd: daemon.work },
    );
    await new Promise((resolve) => setTimeout(resolve, 1500));
    await daemon.kill9();
    await phase2.done; // fio fails once its server is gone; that is expected
    await daemon.restart();

    // Everything flushed in phase 1 reads back, on the disk and on the snapshot.
    await fio(fioArgs(daemon.unixUri("k9"), ["--verify_only"], daemon.file("v1.json"), 0));
    await fio(fioArgs(daemon.unixUri("k9@before"), ["--verify_only"], daemon.file("v2.json"), 0));
    const report = JSON.parse(fs.readFileSync(daemon.file("v1.json"), "utf8")) as {
      jobs: Array<{ error: number; read: { io_bytes: number } }>;
    };
    assert.equal(report.jobs[0]?.error, 0);
    assert.equal(report.jobs[0]?.read.io_bytes, half, "the verify pass read the whole first half");

    const check = daemon.vdisk(["check", "k9", "--json"]);
    assert.equal(check.status, 0, `vdisk check: ${check.stdout}${check.stderr}`);

    // The disk still takes writes and flushes after the crash.
    await fio(
      fioArgs(daemon.unixUri("k9"), ["--do_verify=1", "--end_fsync=1"], daemon.file("p3.json"), half),
    );
  },
);
