/**
 * The request monitor against a real daemon (src/testing/daemon-fixture.ts) and real clients reaching it
 * with a client tag in the export name (docs/monitor.md):
 *
 * - qemu-io as `DISK/vm1` writes 16 × 64 KiB at consecutive offsets inside one extent: exactly 16 writes,
 *   15 sequential and 1 random (the first), all in the 64 KiB size bucket, the heat on that extent alone;
 * - nbdsh as `DISK/db-2` writes 8 × 4 KiB sequentially, then reads 4 KiB at 32 scattered offsets, and
 *   stays connected while the stats are read: its row carries the tag and exact counts, `vdisk stats
 *   DISK` shows it, Prometheus has the pattern counters and the new histograms; the totals survive its
 *   disconnect;
 * - an invalid tag is refused like an unknown export, NBD_OPT_LIST shows plain names;
 * - a daemon started with `--monitor off` records nothing and says so.
 *
 * Every tool is required: a missing one fails the test.
 */
import { after, before, test } from "node:test";
import * as assert from "node:assert/strict";
import * as fs from "node:fs";
import * as http from "node:http";
import {
  type DaemonFixture,
  describeRun,
  requireTool,
  run,
  spawnTool,
  startDaemon,
} from "../../src/testing/daemon-fixture";
import type { DiskStats, StatsSnapshot } from "../../src/monitor/types";

const KiB = 1024;
const MiB = 1024 * KiB;
const diskBytes = 32 * MiB;

let daemon: DaemonFixture;
let off: DaemonFixture | null = null;

before(async () => {
  for (const tool of ["qemu-io", "nbdsh", "nbdinfo"]) requireTool(tool);
  daemon = await startDaemon({ name: "vdisk-monitor" });
  for (const name of ["seq", "rnd"]) {
    const result = daemon.vdisk(["create", name, "--size", String(diskBytes)]);
    assert.equal(result.status, 0, describeRun("vdisk create", [name], result));
  }
});

after(() => {
  daemon?.cleanup();
  off?.cleanup();
});

function metrics(port: number): Promise<string> {
  return new Promise((resolve, reject) => {
    const req = http.get({ host: "127.0.0.1", port, path: "/metrics", agent: false }, (res) => {
      const chunks: Buffer[] = [];
      res.on("data", (chunk: Buffer) => chunks.push(chunk));
      res.on("end", () => resolve(Buffer.concat(chunks).toString("utf8")));
      res.on("error", reject);
    });
    req.on("error", reject);
  });
}

test("qemu-io as DISK/vm1: exact sequential writes, sizes, heat on the written extent", async () => {
  const base = 8 * MiB;
  const commands = Array.from({ length: 16 }, (_, i) => [
    "-c",
    `write -P 7 ${base + i * 64 * KiB} 64k`,
  ]).flat();
  const uri = daemon.unixUri("seq/vm1");
  const result = run("qemu-io", ["-f", "raw", ...commands, uri]);
  assert.equal(result.status, 0, describeRun("qemu-io", [uri], result));

  const disk = await daemon.apiGet<DiskStats>("disks/seq/stats");
  assert.equal(disk.monitorEnabled, true);
  assert.equal(disk.ops.write.ops, 16);
  assert.equal(disk.ops.read.ops, 0);
  const activity = disk.activity;
  assert.ok(activity);
  assert.deepEqual(activity.sequential, { read: 0, write: 15 });
  assert.deepEqual(activity.random, { read: 0, write: 1 });
  assert.equal(activity.sizeBuckets.write[7], 16, "64 KiB bucket");
  assert.equal(activity.sizeBytesSum.write, 16 * 64 * KiB);
  assert.ok((activity.queueDepth.max ?? 0) >= 1);
  const heat = disk.heat;
  assert.ok(heat);
  assert.equal(heat.extentBytes, MiB);
  assert.equal(heat.extents, 32);
  assert.equal(heat.halfLifeSeconds, 60);
  assert.deepEqual(
    heat.top.map((extent) => extent.offset),
    [base],
    "all the heat on the written extent",
  );
  const top = heat.top[0]?.heat ?? 0;
  assert.ok(top > 15 && top <= 16, `16 accesses, barely decayed: ${top}`);
  assert.ok(Math.abs(heat.total - top) < 1e-9);
  assert.equal(disk.profile?.kind, "mixed", "64 KiB is small, but sequential: neither class");
  assert.ok((disk.profile?.readFraction ?? 1) === 0);
  assert.equal(disk.clients.length, 0, "qemu-io has gone; the totals stay");
  assert.ok(disk.ops.write.latencyPercentilesSeconds?.p50 !== null);
});

test("nbdsh as DISK/db-2: the tag in the stats, exact sequential/random counts, text and metrics", async () => {
  const ready = daemon.file("ready");
  const go = daemon.file("go");
  const offsets = Array.from({ length: 32 }, (_, i) => ((i * 7) % 16) * MiB + 8192);
  const script = `
import os, time
for i in range(8):
    h.pwrite(b"w" * 4096, i * 4096)
for offset in ${JSON.stringify(offsets)}:
    h.pread(4096, offset)
open(${JSON.stringify(ready)}, "w").close()
deadline = time.time() + 60
while not os.path.exists(${JSON.stringify(go)}):
    assert time.time() < deadline
    time.sleep(0.02)
`;
  const client = spawnTool("nbdsh", ["-u", daemon.unixUri("rnd/db-2"), "-c", script]);
  try {
    const deadline = Date.now() + 30_000;
    while (!fs.existsSync(ready)) {
      assert.ok(Date.now() < deadline, "nbdsh never got through its requests");
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
    const disk = await daemon.apiGet<DiskStats>("disks/rnd/stats?top=4");
    assert.equal(disk.clients.length, 1);
    const row = disk.clients[0];
    assert.ok(row);
    assert.equal(row.export, "rnd");
    assert.equal(row.tag, "db-2");
    assert.equal(row.ops.write.ops, 8);
    assert.equal(row.ops.read.ops, 32);
    assert.deepEqual(row.activity?.sequential, { read: 0, write: 7 });
    assert.deepEqual(row.activity?.random, { read: 32, write: 1 });
    assert.equal(row.activity?.sizeBuckets.read[3], 32, "4 KiB reads");
    assert.equal(row.activity?.interArrival.count, 39);
    assert.equal(disk.profile?.kind, "random-small");
    assert.ok(Math.abs((disk.profile?.randomSmallFraction ?? 0) - 33 / 40) < 0.01);
    // 32 reads over 16 extents (2 each) plus 8 writes in extent 0; decayed by at most a few seconds.
    const heat = disk.heat;
    assert.ok(heat);
    const decayedMin = 2 ** (-10 / 60);
    assert.equal(heat.top.length, 4, "?top=4");
    assert.equal(heat.top[0]?.offset, 0);
    const hottest = heat.top[0]?.heat ?? 0;
    assert.ok(hottest > 10 * decayedMin && hottest <= 10, JSON.stringify(heat.top));
    assert.ok(heat.total > 40 * decayedMin && heat.total <= 40, `total ${heat.total}`);
    for (const extent of heat.top.slice(1)) {
      assert.ok(Math.abs(extent.heat / hottest - 0.2) < 0.01, "the others have 2 accesses each");
    }

    const all = await daemon.apiGet<StatsSnapshot>("stats");
    assert.equal(all.monitor?.enabled, true);
    assert.ok((all.monitor?.memoryBytes ?? 0) > 0);
    assert.equal(all.disks.find((candidate) => candidate.name === "rnd")?.clients[0]?.tag, "db-2");

    const text = daemon.vdisk(["stats", "rnd"]);
    assert.equal(text.status, 0, text.stderr);
    assert.match(text.stdout, /^profile:\s+random-small: /m);
    assert.match(text.stdout, /^OP\s+P50\s+P90\s+P99\s+P99\.9\s+SEQUENTIAL\s+RANDOM\s+SIZES/m);
    assert.match(text.stdout, /^read\s+\S+\s+\S+\s+\S+\s+\S+\s+0\s+32\s+4K:32$/m);
    assert.match(text.stdout, /^write\s+\S+\s+\S+\s+\S+\s+\S+\s+7\s+1\s+4K:8$/m);
    assert.match(text.stdout, /^hottest extents \(1 MiB each, 32 in all/m);
    assert.match(text.stdout, /^0 B\s+0\s+\d+\.\d\s+25%$/m);
    assert.match(text.stdout, /^CLIENT\s+EXPORT\s+TAG\s+PEER/m);
    assert.match(text.stdout, /^#\d+\s+rnd\s+db-2\s+unix\s/m);
    const summary = daemon.vdisk(["stats"]);
    assert.match(summary.stdout, /^monitor: on, heat half-life 60 s/m);
    assert.match(summary.stdout, /^rnd\s+vdisk\s+32 MiB.*\s18%\s+1\.0\s+\S+$/m);

    const scrape = await metrics(daemon.httpPort);
    assert.match(scrape, /^vdisk_request_pattern_total\{disk="rnd",op="read",pattern="random"\} 32$/m);
    assert.match(scrape, /^vdisk_request_pattern_total\{disk="rnd",op="write",pattern="sequential"\} 7$/m);
    assert.match(scrape, /^vdisk_request_size_bytes_bucket\{disk="rnd",op="read",le="4096"\} 32$/m);
    assert.match(scrape, /^vdisk_request_queue_depth_count\{disk="rnd"\} 40$/m);
    assert.match(scrape, /^vdisk_request_interarrival_seconds_count\{disk="rnd"\} 39$/m);
    assert.match(scrape, /^vdisk_client_info\{[^}]*tag="db-2"[^}]*\} 1$/m);
    assert.match(scrape, /^vdisk_monitor_enabled 1$/m);
  } finally {
    fs.writeFileSync(go, "");
  }
  const result = await client.done;
  assert.equal(result.status, 0, describeRun("nbdsh", [], result));
  const after = await daemon.apiGet<DiskStats>("disks/rnd/stats");
  assert.equal(after.clients.length, 0);
  assert.deepEqual(after.activity?.random, { read: 32, write: 1 }, "totals survive the disconnect");
});

test("an invalid tag is refused like an unknown export; NBD_OPT_LIST lists plain names", () => {
  const bad = run("nbdinfo", [daemon.unixUri("seq/bad%20tag")]);
  assert.notEqual(bad.status, 0, describeRun("nbdinfo", [], bad));
  assert.match(bad.stderr, /server replied with error to opt_go request/, bad.stderr);
  const qemu = run("qemu-io", ["-f", "raw", "-c", "read 0 4k", daemon.unixUri("seq/")]);
  assert.notEqual(qemu.status, 0, describeRun("qemu-io", [], qemu));
  assert.match(
    qemu.stderr,
    /export name "seq\/": "" is not a valid client tag/,
    "qemu shows the server's reason",
  );
  const list = run("nbdinfo", ["--list", "--json", daemon.unixUri("")]);
  assert.equal(list.status, 0, describeRun("nbdinfo --list", [], list));
  const names = (JSON.parse(list.stdout) as { exports: Array<{ "export-name": string }> }).exports.map(
    (entry) => entry["export-name"],
  );
  assert.deepEqual(names.sort(), ["default", "rnd", "seq"]);
});

test("vdisk serve --monitor off: nothing is recorded, and the stats say so", async () => {
  off = await startDaemon({ name: "vdisk-monitor-off", serveArgs: ["--monitor", "off"] });
  const created = off.vdisk(["create", "quiet", "--size", String(diskBytes)]);
  assert.equal(created.status, 0, describeRun("vdisk create", [], created));
  const uri = off.unixUri("quiet/vm1");
  const result = run("qemu-io", ["-f", "raw", "-c", "write 0 64k", "-c", "read 0 64k", uri]);
  assert.equal(result.status, 0, describeRun("qemu-io", [uri], result));
  const disk = await off.apiGet<DiskStats>("disks/quiet/stats");
  assert.equal(disk.monitorEnabled, false);
  assert.equal(disk.ops.write.ops, 0);
  assert.equal(disk.heat, null);
  assert.equal(disk.profile, null);
  const all = await off.apiGet<StatsSnapshot>("stats");
  assert.equal(all.monitor?.enabled, false);
  assert.equal(all.monitor?.memoryBytes, 0);
  assert.match(off.vdisk(["stats"]).stdout, /^monitor: off: nothing is recorded/m);
  assert.match(off.vdisk(["stats", "quiet"]).stdout, /^monitor:\s+off: nothing is recorded/m);
  assert.match(await metrics(off.httpPort), /^vdisk_monitor_enabled 0$/m);
});
