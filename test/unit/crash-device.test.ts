/**
 * The simulated disk (CrashDevice), its reference model (ModelDisk) and the seeded Prng.
 *
 * Every randomized check runs over many seeds and names its seed in the failure message, so any failure is
 * reproduced by running that one seed. The last suite is the one that matters most: whatever a random
 * workload (concurrent, with FUA, flushes, resizes) and a crash leave on the medium, the model accepts it.
 */
import { describe, it } from "node:test";
import * as assert from "node:assert/strict";

import { ExtentFlags, ZeroFlags } from "../../src/devices/block-device";
import {
  blockStatusAsync,
  closeAsync,
  flushAsync,
  readAsync,
  resizeAsync,
  trimAsync,
  usageAsync,
  writeAsync,
  zeroAsync,
} from "../../src/devices/promises";
import { VdiskError } from "../../src/errors";
import { KiB } from "../../src/limits";
import { CrashDevice } from "../../src/testing/crash-device";
import { ModelDisk } from "../../src/testing/model-disk";
import { Prng, nonZeroPattern } from "../../src/testing/prng";

const sector = 512;

const pattern = nonZeroPattern;

function device(
  size: number,
  seed: number,
  options: { reorder?: boolean; errorRate?: number } = {},
): CrashDevice {
  return new CrashDevice(size, { prng: new Prng(seed), ...options });
}

async function readBytes(disk: CrashDevice, offset: number, length: number): Promise<Buffer> {
  const buf = Buffer.alloc(length, 0xee);
  await readAsync(disk, buf, offset);
  return buf;
}

/** Settle a callback verb: resolve with its error (or null), failing if it calls back twice or synchronously. */
function settle(
  name: string,
  call: (done: (err: VdiskError | null) => void) => void,
): Promise<VdiskError | null> {
  return new Promise((resolve, reject) => {
    let calls = 0;
    let returned = false;
    call((err) => {
      calls++;
      if (!returned) reject(new Error(`${name}: callback ran synchronously`));
      else if (calls > 1) reject(new Error(`${name}: callback ran twice`));
      else
        setImmediate(() => (calls === 1 ? resolve(err) : reject(new Error(`${name}: callback ran twice`))));
    });
    returned = true;
  });
}

/** Run `body` for seeds 0..count-1 in turn; a failure that does not name its seed is re-thrown naming it. */
async function forSeeds(count: number, body: (seed: number) => Promise<void> | void): Promise<void> {
  for (let seed = 0; seed < count; seed++) {
    try {
      await body(seed);
    } catch (err) {
      const message = err instanceof Error ? err.message : String(err);
      if (message.includes(`seed ${seed}`)) throw err;
      throw new Error(`seed ${seed}: ${message}`, { cause: err });
    }
  }
}

function isCrashError(err: unknown): boolean {
  return err instanceof VdiskError && err.code === "IO_ERROR" && err.message === "device crashed";
}

describe("Prng", () => {
  it("is deterministic from its seed, numeric or string, and different across seeds", () => {
    const a = new Prng(42);
    const b = new Prng(42);
    const sequenceA = Array.from({ length: 100 }, () => a.uint32());
    const sequenceB = Array.from({ length: 100 }, () => b.uint32());
    assert.deepEqual(sequenceA, sequenceB);
    assert.notDeepEqual(
      sequenceA,
      Array.from({ length: 100 }, () => new Prng(43).uint32()),
    );
    assert.deepEqual(new Prng("crash").bytes(37), new Prng("crash").bytes(37));
    assert.notDeepEqual(new Prng("crash").bytes(37), new Prng("crush").bytes(37));
  });

  it("stays within its bounds and covers them", () => {
    const prng = new Prng(7);
    const seen = new Set<number>();
    let trues = 0;
    for (let index = 0; index < 10_000; index++) {
      const value = prng.next();
      assert.ok(value >= 0 && value < 1);
      const small = prng.int(6);
      assert.ok(Number.isInteger(small) && small >= 0 && small < 6);
      seen.add(small);
      const ranged = prng.range(-3, 3);
      assert.ok(ranged >= -3 && ranged <= 3);
      if (prng.bool(0.25)) trues++;
    }
    assert.equal(seen.size, 6);
    assert.ok(trues > 2000 && trues < 3000, `bool(0.25) came true ${trues} times in 10000`);
    assert.equal(prng.bytes(13).length, 13);
    assert.ok(["a", "b", "c"].includes(prng.pick(["a", "b", "c"])));
    assert.deepEqual(prng.shuffle([1, 2, 3, 4, 5]).sort(), [1, 2, 3, 4, 5]);
  });
});

describe("CrashDevice: the BlockDevice contract", () => {
  it("reads back writes, aligned and unaligned, and reads zeros elsewhere", async () => {
    const disk = device(256 * KiB, 1);
    const aligned = pattern(16 * KiB, 1);
    await writeAsync(disk, aligned, 32 * KiB);
    assert.deepEqual(await readBytes(disk, 32 * KiB, 16 * KiB), aligned);
    const unaligned = pattern(5001, 2);
    await writeAsync(disk, unaligned, 4095);
    assert.deepEqual(await readBytes(disk, 4095, 5001), unaligned);
    const around = await readBytes(disk, 4000, 5200);
    assert.ok(around.subarray(0, 95).every((byte) => byte === 0));
    assert.deepEqual(around.subarray(95, 95 + 5001), unaligned);
    await writeAsync(disk, Buffer.from([0x5a]), 256 * KiB - 1, true);
    assert.deepEqual(await readBytes(disk, 256 * KiB - 2, 2), Buffer.from([0, 0x5a]));
    disk.checkInvariants();
    await closeAsync(disk);
  });

  it("zero and trim read as zeros and leave their surroundings alone; FAST zero is refused", async () => {
    const size = 64 * KiB;
    const disk = device(size, 2);
    const model = pattern(size, 3);
    await writeAsync(disk, model, 0);
    await zeroAsync(disk, 1000, 3000, ZeroFlags.NONE);
    model.fill(0, 1000, 4000);
    await zeroAsync(disk, 8 * KiB, 8 * KiB, ZeroFlags.MAY_TRIM | ZeroFlags.FUA);
    model.fill(0, 8 * KiB, 16 * KiB);
    await trimAsync(disk, 20 * KiB + 3, 5000, true);
    model.fill(0, 20 * KiB + 3, 20 * KiB + 5003);
    await trimAsync(disk, size - 7, 7);
    model.fill(0, size - 7);
    assert.deepEqual(await readBytes(disk, 0, size), model);
    await assert.rejects(
      zeroAsync(disk, 0, 4096, ZeroFlags.FAST),
      (err) => err instanceof VdiskError && err.code === "NOT_SUPPORTED",
    );
    assert.deepEqual(await readBytes(disk, 0, size), model, "a refused FAST zero changes nothing");
    disk.checkInvariants();
  });

  it("reports capabilities, one DATA extent, usage, and resizes with zeros past the old end", async () => {
    const disk = device(64 * KiB, 3);
    assert.equal(disk.kind, "crash");
    const { capabilities } = disk;
    assert.ok(capabilities.flush && capabilities.fua && capabilities.multiConn && capabilities.trim);
    assert.ok(capabilities.zero && capabilities.cache && !capabilities.fastZero && !capabilities.extents);
    assert.deepEqual(await blockStatusAsync(disk, 1000, 4000), [{ length: 4000, flags: ExtentFlags.DATA }]);
    assert.equal((await usageAsync(disk)).allocatedBytes, 64 * KiB);

    const tail = pattern(8 * KiB, 4);
    await writeAsync(disk, tail, 56 * KiB);
    await resizeAsync(disk, 60 * KiB + 100);
    assert.equal(disk.size, 60 * KiB + 100);
    await resizeAsync(disk, 128 * KiB);
    assert.equal(disk.size, 128 * KiB);
    const after = await readBytes(disk, 56 * KiB, 72 * KiB);
    assert.deepEqual(after.subarray(0, 4 * KiB + 100), tail.subarray(0, 4 * KiB + 100));
    assert.ok(
      after.subarray(4 * KiB + 100).every((byte) => byte === 0),
      "zeros past the old end",
    );
    disk.checkInvariants();
    // The unflushed tail write was clipped by the shrink: after a crash nothing reappears past it.
    disk.crash({ land: 1 });
    const survived = disk.snapshotDurable();
    assert.equal(survived.length, 128 * KiB);
    assert.ok(survived.subarray(60 * KiB + 100).every((byte) => byte === 0));
  });

  it("calls back exactly once, never synchronously, for every verb, with reordering on", async () => {
    await forSeeds(20, async (seed) => {
      const disk = device(64 * KiB, seed);
      const pending: Promise<VdiskError | null>[] = [
        settle("write", (done) => disk.write(pattern(4096, 11), 0, false, done)),
        settle("write fua", (done) => disk.write(pattern(100, 12), 5000, true, done)),
        settle("read", (done) => disk.read(Buffer.alloc(8192), 0, done)),
        settle("zero", (done) => disk.zero(0, 100, ZeroFlags.NONE, done)),
        settle("trim", (done) => disk.trim(4096, 4096, true, done)),
        settle("flush", (done) => disk.flush(done)),
        settle("cache", (done) => disk.cache(0, 4096, done)),
        settle("blockStatus", (done) => disk.blockStatus(0, 64 * KiB, done)),
        settle("usage", (done) => disk.usage(done)),
        settle("resize", (done) => disk.resize(128 * KiB, done)),
      ];
      for (const err of await Promise.all(pending)) assert.equal(err, null, `seed ${seed}`);
      // A crash with requests in flight: each still calls back exactly once, with the crash error.
      const interrupted = [
        settle("write", (done) => disk.write(pattern(4096, 13), 0, false, done)),
        settle("flush", (done) => disk.flush(done)),
        settle("read", (done) => disk.read(Buffer.alloc(512), 0, done)),
      ];
      disk.crash();
      const refused = settle("write after crash", (done) => disk.write(pattern(512, 1), 0, false, done));
      for (const err of await Promise.all([...interrupted, refused])) {
        assert.ok(isCrashError(err), `seed ${seed}: ${String(err)}`);
      }
      assert.ok(isCrashError(await settle("usage", (done) => disk.usage(done))));
      assert.equal(await settle("close", (done) => disk.close(done)), null, "a crashed device can be closed");
    });
  });

  it("completes concurrent requests in a scrambled order unless reorder is off", async () => {
    const orders = new Set<string>();
    await forSeeds(20, async (seed) => {
      for (const reorder of [true, false]) {
        const disk = device(64 * KiB, seed, { reorder });
        const order: number[] = [];
        await Promise.all(
          Array.from({ length: 8 }, (_, index) =>
            writeAsync(disk, pattern(512, index), index * 512).then(() => order.push(index)),
          ),
        );
        if (reorder) orders.add(order.join(","));
        else assert.deepEqual(order, [0, 1, 2, 3, 4, 5, 6, 7], `seed ${seed}: in order without reorder`);
      }
    });
    assert.ok(orders.size > 5, `only ${orders.size} distinct completion orders over 20 seeds`);
  });
});

describe("CrashDevice: durability and crashes", () => {
  it("flushed writes always survive a crash", async () => {
    await forSeeds(200, async (seed) => {
      const disk = device(64 * KiB, seed);
      const flushed = pattern(8 * KiB, seed);
      await writeAsync(disk, flushed, 4 * KiB + 100);
      await flushAsync(disk);
      assert.equal(disk.pendingOperations, 0, `seed ${seed}`);
      await writeAsync(disk, pattern(4 * KiB, seed + 1000), 32 * KiB); // unflushed, elsewhere
      disk.crash({ tear: seed % 2 === 0 ? "any" : "last" });
      const survived = disk.snapshotDurable().subarray(4 * KiB + 100, 12 * KiB + 100);
      assert.deepEqual(survived, flushed, `seed ${seed}: flushed data lost`);
    });
  });

  it("unflushed writes survive on some seeds and are lost on others", async () => {
    let survived = 0;
    let lost = 0;
    await forSeeds(200, async (seed) => {
      const disk = device(16 * KiB, seed);
      const data = pattern(1024, seed);
      await writeAsync(disk, data, 2048);
      assert.equal(disk.pendingOperations, 1, `seed ${seed}`);
      const report = disk.crash({ tear: "none" });
      assert.equal(report.pendingOperations, 1, `seed ${seed}`);
      const medium = disk.snapshotDurable().subarray(2048, 3072);
      if (medium.equals(data)) survived++;
      else if (medium.every((byte) => byte === 0)) lost++;
      else assert.fail(`seed ${seed}: an untorn write landed in part`);
      assert.equal(report.landedOperations + report.lostOperations, 1, `seed ${seed}`);
    });
    assert.ok(survived > 40 && lost > 40, `survived ${survived}, lost ${lost} of 200`);
  });

  it("the same seed gives the same crash outcome", async () => {
    const outcome = async (seed: number): Promise<Buffer> => {
      const disk = device(32 * KiB, seed);
      await Promise.all(
        Array.from({ length: 16 }, (_, index) => writeAsync(disk, pattern(1536, index), index * 1024)),
      );
      disk.crash();
      return disk.snapshotDurable();
    };
    await forSeeds(20, async (seed) =>
      assert.deepEqual(await outcome(seed), await outcome(seed), `seed ${seed}`),
    );
  });

  it("a torn write leaves a sector-granular mix of old and new", async () => {
    let mixes = 0;
    await forSeeds(100, async (seed) => {
      const disk = device(16 * KiB, seed);
      const old = pattern(8 * sector, seed);
      await writeAsync(disk, old, 1024);
      await flushAsync(disk);
      const fresh = pattern(8 * sector, seed + 500);
      await writeAsync(disk, fresh, 1024);
      const report = disk.crash({ tear: "last" });
      assert.equal(report.tornOperations, 1, `seed ${seed}: the last operation is torn`);
      const medium = disk.snapshotDurable();
      const kinds = new Set<string>();
      for (let index = 0; index < 8; index++) {
        const got = medium.subarray(1024 + index * sector, 1024 + (index + 1) * sector);
        const expectedOld = old.subarray(index * sector, (index + 1) * sector);
        const expectedNew = fresh.subarray(index * sector, (index + 1) * sector);
        if (got.equals(expectedOld)) kinds.add("old");
        else if (got.equals(expectedNew)) kinds.add("new");
        else assert.fail(`seed ${seed}: sector ${index} is torn inside`);
      }
      assert.equal(kinds.size, 2, `seed ${seed}: a torn write is a strict mix`);
      mixes++;
    });
    assert.equal(mixes, 100);
  });

  it("a partial-sector write persists its whole sector as it stood after the write", async () => {
    await forSeeds(50, async (seed) => {
      const disk = device(4 * KiB, seed);
      await writeAsync(disk, pattern(100, 1), 0); // unflushed: bytes 0..99 of sector 0
      await writeAsync(disk, pattern(100, 2), 300); // unflushed: bytes 300..399 of sector 0
      disk.crash({ tear: "none" });
      const medium = disk.snapshotDurable().subarray(0, sector);
      const options = [Buffer.alloc(sector), Buffer.alloc(sector), Buffer.alloc(sector)];
      pattern(100, 1).copy(options[1], 0);
      pattern(100, 1).copy(options[2], 0);
      pattern(100, 2).copy(options[2], 300);
      assert.ok(
        options.some((option) => option.equals(medium)),
        `seed ${seed}: sector 0 is not one of the states it passed through`,
      );
    });
  });

  it("crashAfter(n) cuts the power as the n-th write/zero/trim/flush is submitted", async () => {
    let landed = 0;
    let lost = 0;
    await forSeeds(100, async (seed) => {
      const disk = device(16 * KiB, seed);
      disk.crashAfter(4);
      await writeAsync(disk, pattern(512, 1), 0);
      await readBytes(disk, 0, 512); // reads do not count
      await flushAsync(disk);
      await zeroAsync(disk, 512, 512, ZeroFlags.NONE);
      assert.equal(disk.crashed, false, `seed ${seed}: not yet`);
      const last = pattern(1024, seed);
      const fourth = settle("write", (done) => disk.write(last, 4096, false, done));
      assert.equal(disk.crashed, true, `seed ${seed}: the 4th submission crashes at once`);
      assert.ok(isCrashError(await fourth), `seed ${seed}: the interrupted request fails`);
      assert.equal(disk.writes, 3, `seed ${seed}: write, zero, write`);
      assert.equal(disk.flushes, 1, `seed ${seed}`);
      const medium = disk.snapshotDurable();
      assert.deepEqual(medium.subarray(0, 512), pattern(512, 1), `seed ${seed}: flushed before the crash`);
      const tail = medium.subarray(4096, 5120);
      if (tail.equals(last)) landed++;
      else if (tail.every((byte) => byte === 0)) lost++;
    });
    assert.ok(landed > 10 && lost > 10, `the interrupted write landed ${landed}, was lost ${lost} of 100`);

    // A flush counts as well; it then makes nothing durable.
    const disk = device(16 * KiB, 1);
    disk.crashAfter(2, { land: 0 });
    await writeAsync(disk, pattern(512, 1), 0);
    assert.ok(isCrashError(await settle("flush", (done) => disk.flush(done))));
    assert.ok(disk.snapshotDurable().every((byte) => byte === 0));
  });

  it("reopen() returns a new device over what survived; the crashed one refuses I/O", async () => {
    const disk = device(32 * KiB, 9);
    const flushed = pattern(4 * KiB, 1);
    await writeAsync(disk, flushed, 0);
    await flushAsync(disk);
    await writeAsync(disk, pattern(4 * KiB, 2), 8 * KiB);
    await writeAsync(disk, pattern(4 * KiB, 3), 0);
    disk.crash({ land: 0 });
    await assert.rejects(readAsync(disk, Buffer.alloc(512), 0), isCrashError);
    await assert.rejects(writeAsync(disk, Buffer.alloc(512), 0), isCrashError);
    await assert.rejects(flushAsync(disk), isCrashError);

    const again = disk.reopen();
    assert.notEqual(again, disk);
    assert.equal(again.size, 32 * KiB);
    assert.equal(again.prng, disk.prng);
    const expected = Buffer.alloc(32 * KiB);
    flushed.copy(expected, 0);
    assert.deepEqual(await readBytes(again, 0, 32 * KiB), expected);
    await writeAsync(again, pattern(512, 4), 512);
    await closeAsync(again);
    const third = again.reopen(); // close made everything durable
    pattern(512, 4).copy(expected, 512);
    assert.deepEqual(await readBytes(third, 0, 32 * KiB), expected);
  });

  it("FUA makes its own write durable and nothing else; it supersedes older cached copies", async () => {
    const disk = device(16 * KiB, 5);
    await writeAsync(disk, pattern(1024, 1), 0); // not durable
    await writeAsync(disk, pattern(1024, 2), 4096, true); // durable
    await zeroAsync(disk, 0, 512, ZeroFlags.FUA); // durable zeros over part of the first write
    await writeAsync(disk, pattern(512, 3), 8192); // cached, then superseded by a FUA write
    await writeAsync(disk, pattern(512, 4), 8192, true);
    assert.equal(disk.pendingOperations, 1, "only the tail of the first write is pending");
    disk.crash({ land: 1, tear: "none" });
    const medium = disk.snapshotDurable();
    assert.ok(medium.subarray(0, 512).every((byte) => byte === 0));
    assert.deepEqual(medium.subarray(512, 1024), pattern(1024, 1).subarray(512), "landed (land: 1)");
    assert.deepEqual(medium.subarray(4096, 5120), pattern(1024, 2));
    assert.deepEqual(medium.subarray(8192, 8704), pattern(512, 4), "an older copy never overwrites FUA data");

    const strict = device(16 * KiB, 6);
    await writeAsync(strict, pattern(1024, 1), 0);
    await writeAsync(strict, pattern(1024, 2), 4096, true);
    strict.crash({ land: 0 });
    const strictMedium = strict.snapshotDurable();
    assert.ok(
      strictMedium.subarray(0, 1024).every((byte) => byte === 0),
      "FUA does not flush other writes",
    );
    assert.deepEqual(strictMedium.subarray(4096, 5120), pattern(1024, 2));
  });

  it("a flush covers only the writes completed before it was called", async () => {
    const disk = device(16 * KiB, 1, { reorder: false });
    await writeAsync(disk, pattern(512, 1), 0);
    // Submitted before the flush, but still in flight when the flush is called.
    const inflight = writeAsync(disk, pattern(512, 2), 1024);
    await flushAsync(disk);
    await inflight;
    assert.equal(disk.pendingOperations, 1);
    disk.crash({ land: 0 });
    const medium = disk.snapshotDurable();
    assert.deepEqual(medium.subarray(0, 512), pattern(512, 1));
    assert.ok(medium.subarray(1024, 1536).every((byte) => byte === 0));
  });

  it("injects errors: failNext and errorRate, without executing the failed request", async () => {
    const disk = device(16 * KiB, 2);
    disk.failNext("write");
    disk.failNext("read", "CORRUPT");
    disk.failNext("flush");
    await assert.rejects(
      writeAsync(disk, pattern(512, 1), 0),
      (err) => err instanceof VdiskError && err.code === "IO_ERROR",
    );
    assert.equal(disk.pendingOperations, 0, "a failed write is not pending");
    await assert.rejects(
      readAsync(disk, Buffer.alloc(512), 0),
      (err) => err instanceof VdiskError && err.code === "CORRUPT",
    );
    assert.ok(
      (await readBytes(disk, 0, 512)).every((byte) => byte === 0),
      "the failed write did nothing",
    );
    await writeAsync(disk, pattern(512, 2), 0);
    await assert.rejects(flushAsync(disk));
    assert.equal(disk.pendingOperations, 1, "a failed flush makes nothing durable");
    await flushAsync(disk);
    assert.equal(disk.pendingOperations, 0);

    await forSeeds(5, async (seed) => {
      const flaky = device(16 * KiB, seed, { errorRate: 0.3 });
      let failures = 0;
      for (let index = 0; index < 200; index++) {
        const err = await settle("read", (done) => flaky.read(Buffer.alloc(512), 0, done));
        if (err !== null) {
          assert.equal(err.code, "IO_ERROR", `seed ${seed}`);
          failures++;
        }
      }
      assert.ok(failures > 30 && failures < 90, `seed ${seed}: ${failures} of 200 reads failed at rate 0.3`);
    });
  });
});

describe("ModelDisk", () => {
  it("tracks current and flushed images and the values a sector may hold", () => {
    const model = new ModelDisk(4 * KiB);
    model.write(pattern(100, 1), 0);
    model.write(pattern(100, 2), 300);
    assert.equal(model.possibleSectorValues(0).length, 3);
    assert.ok(model.flushedImage().every((byte) => byte === 0));
    const mark = model.mark();
    model.write(pattern(512, 3), 1024);
    model.flushTo(mark);
    assert.deepEqual(model.unflushedSectors, [2]);
    assert.deepEqual(model.flushedImage().subarray(300, 400), pattern(100, 2));
    model.zero(1024, 512, true);
    assert.deepEqual(model.unflushedSectors, []);
    assert.deepEqual(model.read(0, 4 * KiB), model.flushedImage());
  });

  it("rejects an impossible state with a precise message", () => {
    const model = new ModelDisk(4 * KiB);
    model.write(pattern(1024, 1), 0);
    model.flush();
    model.write(pattern(512, 2), 512); // sector 1 may be flushed or new

    assert.equal(model.checkAfterCrash(model.flushedImage()), null);
    assert.equal(model.checkAfterCrash(model.image()), null);

    const outside = model.image();
    outside[2000] ^= 0xff;
    const outsideMessage = model.checkAfterCrash(outside);
    assert.ok(
      outsideMessage?.includes("byte 2000 (sector 3, not written since the last flush)"),
      outsideMessage ?? "",
    );

    const tornInside = model.image(); // first half new, second half flushed: no single write did that
    model.flushedImage().copy(tornInside, 768, 768, 1024);
    const tornMessage = model.checkAfterCrash(tornInside);
    assert.ok(
      tornMessage?.startsWith("sector 1 (bytes 512..1023) holds none of its 2 legal values"),
      tornMessage ?? "",
    );
    assert.ok(tornMessage?.includes("flushed (first differs at byte 512"), tornMessage ?? "");
    assert.ok(tornMessage?.includes("write #2 (first differs at byte 768"), tornMessage ?? "");

    assert.match(model.checkAfterCrash(Buffer.alloc(100)) ?? "", /^size: got 100 bytes, expected 4096/);
  });

  it("accepts every state a CrashDevice leaves after a random workload and crash (500 seeds)", async () => {
    await forSeeds(500, crashWorkload);
  });
});

/**
 * One seeded run: a random workload of concurrent writes, zeros, trims (some FUA), flushes and resizes on a
 * CrashDevice, mirrored in a ModelDisk as requests complete; power is cut at a random point (by crash() or
 * crashAfter), and the medium must be a legal post-crash state. Two rounds: crash, reopen, go on.
 */
async function crashWorkload(seed: number): Promise<void> {
  const prng = new Prng(seed);
  const sizeInitial = prng.range(4, 48) * sector;
  let disk = new CrashDevice(sizeInitial, { prng: prng.fork(), reorder: prng.bool(0.8) });
  const model = new ModelDisk(sizeInitial);
  for (let round = 0; round < 2; round++) {
    const steps = prng.range(1, 30);
    const crashStep = prng.int(steps + 1);
    if (prng.bool(0.3)) disk.crashAfter(prng.range(1, steps));
    const inflight = new Set<Promise<void>>();
    const track = (promise: Promise<void>): void => {
      inflight.add(promise);
      void promise.then(() => inflight.delete(promise));
    };
    for (let step = 0; step < steps && !disk.crashed; step++) {
      if (step === crashStep) {
        disk.crash();
        break;
      }
      const size = disk.size;
      const offset = prng.int(size);
      const length = prng.range(1, Math.min(size - offset, 3 * sector));
      const fua = prng.bool(0.15);
      const choice = prng.int(100);
      if (choice < 50) {
        const data = prng.bytes(length);
        track(
          mutate(
            (done) => disk.write(data, offset, fua, done),
            (completed) => model.write(data, offset, fua && completed),
          ),
        );
      } else if (choice < 62) {
        const flags = (fua ? ZeroFlags.FUA : 0) | (prng.bool() ? ZeroFlags.MAY_TRIM : 0);
        track(
          mutate(
            (done) => disk.zero(offset, length, flags, done),
            (completed) => model.zero(offset, length, fua && completed),
          ),
        );
      } else if (choice < 70) {
        track(
          mutate(
            (done) => disk.trim(offset, length, fua, done),
            (completed) => model.trim(offset, length, fua && completed),
          ),
        );
      } else if (choice < 90) {
        const mark = model.mark();
        track(
          new Promise<void>((resolve) =>
            disk.flush((err) => {
              if (err === null) model.flushTo(mark);
              else assert.ok(isCrashError(err), `seed ${seed}: flush failed: ${err.message}`);
              resolve();
            }),
          ),
        );
      } else if (choice < 95 && inflight.size === 0) {
        const newSize = prng.range(1, 48) * sector + (prng.bool(0.2) ? prng.int(sector) : 0);
        await resizeAsync(disk, newSize);
        model.resize(newSize);
      }
      if (prng.bool(0.5)) await Promise.all(inflight);
      if (!disk.crashed && prng.bool(0.2)) disk.checkInvariants();
    }
    if (!disk.crashed) disk.crash();
    await Promise.all(inflight);
    const survived = disk.snapshotDurable();
    const problem = model.checkAfterCrash(survived);
    assert.equal(problem, null, `seed ${seed}, round ${round}: ${problem}`);
    disk = disk.reopen();
    model.recover(survived);
  }

  /**
   * Submit a mutation; apply it to the model when it completes, also when the crash interrupted it — then
   * as not durable even if it was FUA: it may or may not be on the medium.
   */
  function mutate(
    submit: (done: (err: VdiskError | null) => void) => void,
    apply: (completed: boolean) => void,
  ): Promise<void> {
    return new Promise((resolve) => {
      let calls = 0;
      submit((err) => {
        calls++;
        assert.equal(calls, 1, `seed ${seed}: one callback per request`);
        if (err !== null) assert.ok(isCrashError(err), `seed ${seed}: unexpected ${err.message}`);
        apply(err === null);
        resolve();
      });
    });
  }
}
