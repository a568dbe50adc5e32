/**
 * Pools of devices and placement policies against a real daemon (src/testing/daemon-fixture.ts), with
 * seeded synthetic workloads sent over NBD and outcomes asserted on the device files themselves:
 *
 * - heat: a hot set of extents, read far more than the rest, ends up in the ssd device's file after a pass
 *   (`vdisk tier run`), and a new hot set moves there by itself within a bounded time (the background
 *   pass); every byte reads back as written (qemu-io); once nothing moves and nothing happens, background
 *   passes are skipped;
 * - pins: a disk pinned to hdd never has a byte on the ssd however hot it is; one pinned to ssd is moved
 *   there whole;
 * - profile: small random writes land on the ssd, large sequential ones on the hdd;
 * - priority: on an emulated hdd shared by two disks, a realtime disk's reads submitted behind a backlog
 *   of a background disk's reads complete before most of that backlog; with both at normal priority they
 *   wait their turn (the control that shows the test can fail);
 * - set-device: a capacity lowered below what a fast device holds is given back by the next pass, and a
 *   class change shows at once in where each disk's bytes are;
 * - remove-device: refused, naming the snapshot, while a snapshot shares data on the device; once it is
 *   gone, the device's data moves to device 0 while a client rewrites it, and the device leaves the pool;
 * - pools survive a restart; bad pool commands fail with a clear error and change nothing;
 * - the tiering families of GET /metrics carry the same figures as `vdisk tier status`.
 */
import { after, before, test } from "node:test";
import * as assert from "node:assert/strict";
import * as fs from "node:fs";
import {
  type DaemonFixture,
  describeRun,
  requireTool,
  run,
  startDaemon,
} from "../../src/testing/daemon-fixture";
import { NbdClient, parseNbdUri } from "../../src/protocol/nbd/client";
import { Prng } from "../../src/testing/prng";
import type { PoolInfo } from "../../src/daemon/registry";
import type { PassResult, TierStatus } from "../../src/tier/tier-manager";
import { passIntervalMs } from "../../src/tier/tier-manager";

const KiB = 1024;
const MiB = 1024 * KiB;

let daemon: DaemonFixture;

before(async () => {
  requireTool("qemu-io");
  daemon = await startDaemon({ name: "vdisk-tiering" });
});

after(() => daemon?.cleanup());

function ok(args: string[]): string {
  const result = daemon.vdisk(args);
  assert.equal(result.status, 0, describeRun("vdisk", args, result));
  return result.stdout;
}

async function client(exportName: string): Promise<NbdClient> {
  return NbdClient.connect(parseNbdUri(daemon.unixUri(exportName)));
}

/** Extent e (1 MiB) of a disk written with byte e + 1, so its blocks can be found in the device files. */
async function fillExtents(disk: string, extents: number): Promise<void> {
  const nbd = await client(disk);
  try {
    for (let e = 0; e < extents; e++) await nbd.writeAsync(e * MiB, Buffer.alloc(MiB, e + 1));
    await nbd.flushAsync();
  } finally {
    await nbd.close();
  }
}

/** Random 4 KiB reads: `hot` of them inside the hot extents, `cold` anywhere in the first `extents`. */
async function readWorkload(
  disk: string,
  prng: Prng,
  hotSet: number[],
  hot: number,
  cold: number,
  extents: number,
): Promise<void> {
  const nbd = await client(disk);
  try {
    const offsets: number[] = [];
    for (let i = 0; i < hot; i++) offsets.push(prng.pick(hotSet) * MiB + prng.int(256) * 4 * KiB);
    for (let i = 0; i < cold; i++) offsets.push(prng.int(extents * 256) * 4 * KiB);
    await Promise.all(offsets.map((offset) => nbd.readAsync(offset, 4 * KiB)));
  } finally {
    await nbd.close();
  }
}

/** Which extents' patterns (byte e + 1 in a whole 4 KiB block) a device file holds. */
function extentsIn(file: string, extents: number): Set<number> {
  const found = new Set<number>();
  const data = fs.readFileSync(file);
  for (let at = 0; at + 4096 <= data.length; at += 4096) {
    const value = data[at] as number;
    if (value === 0 || value > extents) continue;
    let uniform = true;
    for (let i = at + 1; i < at + 4096 && uniform; i++) uniform = data[i] === value;
    if (uniform) found.add(value - 1);
  }
  return found;
}

/** Every extent e of `disk` holds byte `base + e` (base 1: as fillExtents wrote it). */
function verifyExtents(disk: string, extents: number, base = 1): void {
  const commands = Array.from({ length: extents }, (_, e) => [
    "-c",
    `read -P ${base + e} ${e * MiB} 1M`,
  ]).flat();
  const result = run("qemu-io", ["-r", "-f", "raw", ...commands, daemon.unixUri(disk)]);
  assert.equal(result.status, 0, describeRun("qemu-io", [disk], result));
  assert.doesNotMatch(result.stdout, /Pattern verification failed/, "every extent reads back as written");
}

/** The value of one sample of GET /metrics (`name{labels}` exactly as exported), or undefined. */
async function metric(series: string): Promise<number | undefined> {
  const response = await fetch(`http://127.0.0.1:${daemon.httpPort}/metrics`);
  assert.equal(response.status, 200);
  for (const line of (await response.text()).split("\n")) {
    if (line.startsWith(`${series} `)) return Number(line.slice(series.length + 1));
  }
  return undefined;
}

test("heat: the hot set moves to the ssd, by a pass and then by itself; nothing is lost", async () => {
  const ssdDir = daemon.file("ssd");
  ok(["pool", "create", "hy", "--class", "hdd"]);
  ok(["pool", "add-device", "hy", ssdDir, "--class", "ssd", "--capacity", "8M"]);
  ok(["pool", "set", "hy", "--policy", "heat"]);
  ok(["create", "web", "--size", "64M", "--pool", "hy"]);
  const extents = 48;
  await fillExtents("web", extents);
  const ssdFile = `${ssdDir}/web.vdisk`;
  assert.equal(extentsIn(ssdFile, extents).size, 0, "new data of a normal disk starts on device 0");

  const prng = new Prng(5);
  const hotSet = [5, 17, 33, 40];
  await readWorkload("web", prng, hotSet, 400, 60, extents);
  const pass = daemon.vdiskJson<PassResult>(["tier", "run", "hy"]);
  assert.ok(pass.promotions >= hotSet.length, `promoted ${pass.promotions}`);
  const onSsd = extentsIn(ssdFile, extents);
  for (const extent of hotSet) assert.ok(onSsd.has(extent), `hot extent ${extent} is on the ssd`);
  const status = daemon.vdiskJson<TierStatus>(["tier", "status", "web"]);
  const web = status.disks.find((disk) => disk.name === "web");
  assert.ok(web);
  assert.ok((web.classes.ssd ?? 0) <= 8 * MiB, "within the ssd's capacity");
  assert.equal((web.classes.ssd ?? 0) + (web.classes.hdd ?? 0), extents * MiB, "every byte is somewhere");
  const pools = daemon.vdiskJson<{ pools: PoolInfo[] }>(["pool", "list"]).pools;
  const hy = pools.find((pool) => pool.name === "hy");
  assert.ok(hy && hy.devices.length === 2 && (hy.devices[1]?.usedBytes ?? 0) > 0);
  // The same figures in Prometheus' families (refreshed at most once a second).
  await new Promise((resolve) => setTimeout(resolve, 1100));
  const onSsdBytes = await metric('vdisk_tier_disk_bytes{disk="web",pool="hy",class="ssd"}');
  const onHddBytes = await metric('vdisk_tier_disk_bytes{disk="web",pool="hy",class="hdd"}');
  assert.equal(onSsdBytes, web.classes.ssd, "per-class bytes in /metrics match tier status");
  assert.equal((onSsdBytes ?? 0) + (onHddBytes ?? 0), extents * MiB);
  assert.equal(await metric('vdisk_tier_device_capacity_bytes{pool="hy",device="1",class="ssd"}'), 8 * MiB);
  assert.equal(
    await metric('vdisk_tier_device_used_bytes{pool="hy",device="1",class="ssd"}'),
    hy.devices[1]?.usedBytes,
  );
  assert.ok(((await metric('vdisk_tier_passes_total{pool="hy"}')) ?? 0) >= 1, "the pass is counted");
  const migrated = (await metric('vdisk_tier_migrated_bytes_total{pool="hy"}')) ?? 0;
  assert.ok(migrated >= hotSet.length * MiB, `migrated ${migrated} bytes`);
  assert.equal(await metric('vdisk_tier_pool_info{pool="hy",policy="heat"}'), 1);

  // A new hot set, and no manual pass: the background pass moves it within two intervals.
  const newHot = [10, 20];
  await readWorkload("web", prng, newHot, 800, 0, extents);
  const deadline = Date.now() + 2 * passIntervalMs + 5000;
  let moved = false;
  while (!moved && Date.now() < deadline) {
    await new Promise((resolve) => setTimeout(resolve, 500));
    const now = extentsIn(ssdFile, extents);
    moved = newHot.every((extent) => now.has(extent));
  }
  assert.ok(moved, `the new hot set reached the ssd within ${2 * passIntervalMs + 5000} ms`);
  verifyExtents("web", extents);
  const check = ok(["check", "web"]);
  assert.match(check, /clean/);

  // Idle: once a pass moved nothing and no request came since, background passes are skipped (a pass
  // maps every disk of the pool).
  const hyStatus = (): TierStatus["pools"][number] => {
    const found = daemon.vdiskJson<TierStatus>(["tier", "status"]).pools.find((pool) => pool.name === "hy");
    assert.ok(found);
    return found;
  };
  const idleDeadline = Date.now() + 4 * passIntervalMs + 5000;
  const skippedMoreThan = async (skips: number): Promise<TierStatus["pools"][number]> => {
    for (;;) {
      const status = hyStatus();
      if (status.idleSkips > skips) return status;
      assert.ok(
        Date.now() < idleDeadline,
        `background passes were skipped when idle (${JSON.stringify(status)})`,
      );
      await new Promise((resolve) => setTimeout(resolve, 500));
    }
  };
  const firstSkip = await skippedMoreThan(0);
  const current = await skippedMoreThan(firstSkip.idleSkips);
  assert.equal(current.passes, firstSkip.passes, "no pass ran between two idle skips");
  assert.equal((current.lastPass?.promotions ?? 0) + (current.lastPass?.demotions ?? 0), 0);
});

test("pins: a disk pinned to hdd never moves; one pinned to ssd moves there whole", async () => {
  ok(["create", "db", "--size", "16M", "--pool", "hy"]);
  ok(["create", "logs", "--size", "16M", "--pool", "hy"]);
  ok(["set", "db", "--pin", "hdd"]);
  await fillExtents("db", 8);
  await fillExtents("logs", 2);
  await readWorkload("db", new Prng(9), [1, 2], 2000, 0, 8);
  ok(["set", "logs", "--pin", "ssd"]);
  for (let i = 0; i < 2; i++) daemon.vdiskJson<PassResult>(["tier", "run", "hy"]);
  const status = daemon.vdiskJson<TierStatus>(["tier", "status"]);
  const db = status.disks.find((disk) => disk.name === "db");
  const logs = status.disks.find((disk) => disk.name === "logs");
  assert.equal(db?.classes.ssd, 0, "the hdd-pinned disk has nothing on the ssd");
  assert.equal(db?.classes.hdd, 8 * MiB);
  assert.equal(logs?.classes.ssd, 2 * MiB, "the ssd-pinned disk is wholly on the ssd");
  assert.deepEqual(db?.pins, [{ class: "hdd", start: 0, end: null }]);
  verifyExtents("db", 8);
  verifyExtents("logs", 2);
  // A pin to a class the pool lacks is refused, and changes nothing.
  const bad = daemon.vdisk(["set", "db", "--pin", "nvme"]);
  assert.notEqual(bad.status, 0);
  assert.match(bad.stderr, /no device of class nvme/);
  assert.deepEqual(daemon.vdiskJson<TierStatus>(["tier", "status", "db"]).disks[0]?.pins, db?.pins);
});

test("profile: small random writes land on the ssd, large sequential ones on the hdd", async () => {
  ok(["pool", "create", "pp", "--class", "hdd"]);
  ok(["pool", "add-device", "pp", daemon.file("ssd2"), "--class", "ssd"]);
  ok(["pool", "set", "pp", "--policy", "profile"]);
  ok(["create", "mix", "--size", "64M", "--pool", "pp"]);
  const nbd = await client("mix");
  for (let i = 0; i < 4; i++) await nbd.writeAsync(i * MiB, Buffer.alloc(MiB, 0x11));
  const prng = new Prng(3);
  const randomOffsets = new Set<number>();
  while (randomOffsets.size < 32) randomOffsets.add(16 * MiB + prng.int(3072) * 16 * KiB);
  for (const offset of randomOffsets) await nbd.writeAsync(offset, Buffer.alloc(4 * KiB, 0x22));
  await nbd.flushAsync();
  await nbd.close();
  const mix = daemon.vdiskJson<TierStatus>(["tier", "status", "mix"]).disks[0];
  assert.equal(mix?.classes.ssd, 32 * 4 * KiB, "the 32 random 4 KiB writes");
  assert.equal(mix?.classes.hdd, 4 * MiB, "the four sequential 1 MiB writes");
  // A pass promotes a random-small disk's hot extents (here all: the ssd has no capacity limit)...
  daemon.vdiskJson<PassResult>(["tier", "run", "pp"]);
  assert.equal(
    daemon.vdiskJson<TierStatus>(["tier", "status", "mix"]).disks[0]?.classes.ssd,
    4 * MiB + 32 * 4 * KiB,
  );
  // ... and once the disk's workload turns large and sequential, moves its fast-class data down.
  const stream = await client("mix");
  for (let i = 0; i < 200; i++) await stream.readAsync((i % 4) * MiB, MiB);
  await stream.close();
  const pass = daemon.vdiskJson<PassResult>(["tier", "run", "pp"]);
  assert.ok(pass.demotions >= 1, `demoted ${pass.demotions} extents`);
  const after = daemon.vdiskJson<TierStatus>(["tier", "status", "mix"]).disks[0];
  assert.equal(after?.classes.ssd, 0, "a sequential-large disk keeps nothing on the ssd");
  assert.equal(after?.classes.hdd, 4 * MiB + 32 * 4 * KiB);
});

test("priority: a realtime disk's requests pass a background backlog on a shared emulated hdd", async () => {
  ok(["pool", "create", "slow", "--class", "hdd", "--emulate", "hdd"]);
  for (const name of ["bg", "rt"]) {
    ok(["create", name, "--size", "64M", "--pool", "slow"]);
    const nbd = await client(name);
    await nbd.writeAsync(0, Buffer.alloc(8 * MiB, 0x33));
    await nbd.flushAsync();
    await nbd.close();
  }
  ok(["set", "bg", "--priority", "background"]);

  /** Order of completion of 48 background reads issued first and 4 realtime-disk reads issued after. */
  const race = async (): Promise<number> => {
    const bg = await client("bg");
    const rt = await client("rt");
    const prng = new Prng(11);
    const order: string[] = [];
    const reads: Array<Promise<void>> = [];
    for (let i = 0; i < 48; i++) {
      reads.push(bg.readAsync(prng.int(2048) * 4 * KiB, 4 * KiB).then(() => void order.push("bg")));
    }
    await new Promise((resolve) => setTimeout(resolve, 20)); // the backlog is queued at the device
    for (let i = 0; i < 4; i++) {
      reads.push(rt.readAsync(prng.int(2048) * 4 * KiB, 4 * KiB).then(() => void order.push("rt")));
    }
    await Promise.all(reads);
    await bg.close();
    await rt.close();
    // Background reads completed before the last realtime one.
    return order.lastIndexOf("rt") - 3;
  };
  ok(["set", "rt", "--priority", "realtime"]);
  const passed = await race();
  assert.ok(passed <= 16, `realtime reads finished after only ${passed} of 48 background reads`);
  ok(["set", "rt", "--priority", "normal"]);
  ok(["set", "bg", "--priority", "normal"]);
  const waited = await race();
  assert.ok(waited >= 32, `without priority they wait their turn (${waited} background reads first)`);
});

test("set-device: a lowered capacity is given back by the next pass; a class change applies live", async () => {
  const hy = (): PoolInfo => {
    const found = daemon
      .vdiskJson<{ pools: PoolInfo[] }>(["pool", "list"])
      .pools.find((p) => p.name === "hy");
    assert.ok(found);
    return found;
  };
  const ssdBytes = (): number => hy().devices[1]?.usedBytes ?? 0;
  assert.ok(ssdBytes() > 2 * MiB, `the ssd holds ${ssdBytes()} bytes before`);
  ok(["pool", "set-device", "hy", "1", "--capacity", "2M"]);
  assert.equal(hy().devices[1]?.capacity, 2 * MiB);
  // A background pass may be running with the old capacity: `tier run` then answers that one.
  let demotions = 0;
  for (let i = 0; i < 3 && ssdBytes() > 2 * MiB; i++) {
    demotions += daemon.vdiskJson<PassResult>(["tier", "run", "hy"]).demotions;
  }
  assert.ok(ssdBytes() <= 2 * MiB, `the ssd holds ${ssdBytes()} bytes, within its new capacity`);
  assert.ok(demotions > 0, "the excess was demoted");
  verifyExtents("web", 48);

  ok(["pool", "set-device", "hy", "1", "--class", "nvme", "--capacity", "none"]);
  assert.equal(hy().devices[1]?.class, "nvme");
  assert.equal(hy().devices[1]?.capacity, null);
  const disks = daemon.vdiskJson<TierStatus>(["tier", "status"]).disks.filter((d) => d.pool === "hy");
  const onNvme = disks.reduce((sum, d) => sum + (d.classes.nvme ?? 0), 0);
  assert.equal(onNvme, ssdBytes(), "the device's bytes count under its new class");
  assert.ok(onNvme > 0 && disks.every((d) => d.classes.ssd === undefined), "and none under the old one");
  ok(["pool", "set-device", "hy", "1", "--class", "ssd", "--capacity", "8M"]);
  assert.equal(hy().devices[1]?.class, "ssd");
});

test("remove-device: refused while a snapshot shares data there; then its data moves off while written", async () => {
  const ssdDir = daemon.file("rm-ssd");
  ok(["pool", "create", "rm", "--class", "hdd"]);
  ok(["pool", "add-device", "rm", ssdDir, "--class", "ssd"]);
  ok(["pool", "set", "rm", "--migrate-rate", "8M"]);
  ok(["create", "a", "--size", "16M", "--pool", "rm"]);
  ok(["set", "a", "--pin", "ssd"]);
  const extents = 16;
  await fillExtents("a", extents);
  const ssdFile = `${ssdDir}/a.vdisk`;
  assert.equal(extentsIn(ssdFile, extents).size, extents, "the pinned disk's data is on the ssd");

  // A snapshot shares every block; rewriting half gives the head data of its own there.
  ok(["snapshot", "create", "a", "s1"]);
  await fillExtents("a", extents / 2);
  const refused = daemon.vdisk(["pool", "remove-device", "rm", "1"]);
  assert.notEqual(refused.status, 0, "refused while a@s1 shares data on the device");
  assert.match(refused.stderr, /still holds .*a@s1/);
  assert.match(refused.stderr, /delete those snapshots/);
  const still = daemon.vdiskJson<{ pools: PoolInfo[] }>(["pool", "list"]).pools.find((p) => p.name === "rm");
  assert.equal(still?.devices.length, 2, "the device stays in the pool");
  assert.ok(fs.existsSync(ssdFile));
  verifyExtents("a", extents);
  verifyExtents("a@s1", extents);

  ok(["snapshot", "delete", "a", "s1"]);
  // Remove it while a client rewrites every extent with new bytes; nothing may be lost.
  const nbd = await client("a");
  let removal: Promise<{ status: number; data: unknown }> | null = null;
  try {
    removal = daemon.apiRequest("DELETE", "pools/rm/devices/1");
    for (let round = 0; round < 3; round++) {
      for (let e = 0; e < extents; e++) await nbd.writeAsync(e * MiB, Buffer.alloc(MiB, 100 + e));
    }
    await nbd.flushAsync();
  } finally {
    await nbd.close();
  }
  const reply = await removal;
  assert.equal(reply.status, 200, JSON.stringify(reply.data));
  const after = reply.data as PoolInfo & { movedBytes: number };
  assert.deepEqual(
    after.devices.map((d) => d.id),
    [0],
  );
  assert.ok(after.movedBytes > 0, `moved ${after.movedBytes} bytes`);
  assert.ok(!fs.existsSync(ssdFile), "the image's file on the removed device is deleted");
  verifyExtents("a", extents, 100);
  assert.match(ok(["check", "a"]), /clean/);
  const status = daemon.vdiskJson<TierStatus>(["tier", "status", "a"]);
  assert.deepEqual(status.disks[0]?.classes, { hdd: extents * MiB }, "all of it on device 0");
  // Writes keep working; a device added again (reusing id 1) starts empty and is used.
  ok(["pool", "add-device", "rm", ssdDir, "--class", "ssd"]);
  await fillExtents("a", 2);
  assert.equal(extentsIn(ssdFile, extents).size, 2, "pinned writes go to the new ssd device");
  verifyExtents("a", 2);
});

test("pools survive a restart; bad pool commands say what is wrong and change nothing", async () => {
  await daemon.restart();
  const pools = daemon.vdiskJson<{ pools: PoolInfo[] }>(["pool", "list"]).pools;
  assert.deepEqual(
    pools.map((pool) => [pool.name, pool.policy, pool.devices.map((device) => device.class)]),
    [
      ["default", "static", ["default"]],
      ["hy", "heat", ["hdd", "ssd"]],
      ["pp", "profile", ["hdd", "ssd"]],
      ["slow", "static", ["hdd"]],
      ["rm", "static", ["hdd", "ssd"]],
    ],
  );
  verifyExtents("web", 48);
  const cases: Array<[string[], RegExp]> = [
    [["pool", "create", "hy"], /already exists/],
    [["pool", "create", "bad/name"], /not a valid pool name/],
    [["pool", "add-device", "nope", daemon.file("x"), "--class", "ssd"], /no pool named nope/],
    [["pool", "add-device", "hy", daemon.file("ssd"), "--class", "ssd"], /overlaps device/],
    [["pool", "add-device", "hy", daemon.file("y"), "--class", "SSD!"], /not a valid device class/],
    [["pool", "set", "hy", "--policy", "fastest"], /unknown placement policy/],
    [["pool", "set-device", "hy", "7", "--class", "ssd"], /pool hy has no device 7/],
    [["pool", "set-device", "hy", "0", "--capacity", "1G"], /device 0 cannot have a capacity/],
    [["pool", "set-device", "hy", "1"], /nothing to change/],
    [["pool", "set-device", "hy", "one", "--class", "ssd"], /is not a device id/],
    [["pool", "set-device", "hy", "1", "--capacity", "lots"], /size|capacity/],
    [["pool", "remove-device", "hy", "0"], /device 0 cannot be removed/],
    [["pool", "remove-device", "hy", "9"], /pool hy has no device 9/],
    [["pool", "remove-device", "nope", "1"], /no pool named nope/],
    [["pool", "add-device", "hy", "/dev/null", "--class", "ssd"], /is not a directory/],
    [["create", "z", "--size", "1M", "--pool", "nope"], /no pool named nope/],
    [["tier", "run", "nope"], /no pool named nope/],
    [["tier", "status", "nope"], /no vdisk-format disk named nope/],
    [["set", "web", "--priority", "urgent"], /realtime, normal, background|Allowed choices/],
  ];
  for (const [args, message] of cases) {
    const result = daemon.vdisk(args);
    assert.notEqual(result.status, 0, `${args.join(" ")} fails`);
    assert.match(result.stderr, message, args.join(" "));
  }
  const again = daemon.vdiskJson<{ pools: PoolInfo[] }>(["pool", "list"]).pools;
  assert.deepEqual(
    again.map((pool) => pool.devices.length),
    pools.map((pool) => pool.devices.length),
  );
});
