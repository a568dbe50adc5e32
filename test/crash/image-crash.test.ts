/**
 * Crash harness for the vdisk image: thousands of seeded runs, each a random workload (concurrent
 * writes, zeroes, trims, flushes, snapshots, clones, rollbacks, snapshot deletions) on a CrashDevice that
 * loses power after a random number of operations — in the middle of a write, a commit, a snapshot or a
 * deletion — forgetting or tearing whatever was not yet flushed. Then the image is reopened and checked:
 *
 * - it opens, and its reference counts, free space and on-disk checksums are consistent (verify());
 * - every head holds, sector by sector, what was flushed or one of the writes made since (ModelDisk);
 * - every snapshot whose creation completed reads bit-identical to the moment it was taken, and
 *   exists unless its deletion had started; a snapshot whose creation was cut short either does not
 *   exist or is exact too.
 *
 * Every third seed (seed % 3 == 1) runs the image over two devices (a TieredBacking over two partitions
 * of one CrashDevice, so one power cut hits both): writes go to a randomly chosen device, strictly or
 * not, and migrations of random ranges to a random device run concurrently with the writes.
 *
 * Every even seed runs with an index cache of 0, 1 or 2 leaves (before and after the power cut) and a disk
 * of up to 3 MiB (two leaves under an upper node), so leaves are evicted, read back and released in the
 * background throughout; odd seeds keep every node in memory and disks of up to 1 MiB.
 *
 * A failure prints the seed; `VDISK_CRASH_SEED=<seed>` replays just that run, `VDISK_CRASH_RUNS` sets
 * how many run (default 1500).
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { CrashDevice } from "../../src/testing/crash-device";
import { ModelDisk } from "../../src/testing/model-disk";
import { Prng } from "../../src/testing/prng";
import { type BlockDevice, ZeroFlags } from "../../src/devices/block-device";
import { PartitionDevice } from "../../src/testing/partition-device";
import { TieredBacking } from "../../src/image/tiered-backing";
import { flushAsync, readAsync, trimAsync, writeAsync, zeroAsync } from "../../src/devices/promises";
import { Image, type Layer, placementStrict } from "../../src/image/image";
import { IndexCache, leafPayloadBytes } from "../../src/image/index-cache";
import { ImageVolume } from "../../src/image/volume";

const BACKING_BYTES = 24 * 1024 * 1024;
const debug = process.env.VDISK_CRASH_DEBUG ? (...args: unknown[]) => console.log(...args) : () => {};
const SECTOR = 512;

interface SnapshotModel {
  disk: string;
  name: string;
  data: Buffer;
  /** Creation returned: it must exist (unless a deletion started). */
  certain: boolean;
  deleting: boolean;
}

interface HeadModel {
  disk: string;
  model: ModelDisk;
  /** A rollback was cut short: the head may be the old state or the snapshot's. */
  alternative: ModelDisk | null;
}

/** The index cache limit of a seed's images, in leaves; undefined: no limit. */
function cacheLeavesOf(seed: number): number | undefined {
  return seed % 2 === 0 ? (seed / 2) % 3 : undefined;
}

async function runSeed(seed: number): Promise<void> {
  const prng = new Prng(seed);
  const cacheLeaves = cacheLeavesOf(seed);
  const newCache = (): IndexCache | undefined =>
    cacheLeaves === undefined ? undefined : new IndexCache(cacheLeaves * leafPayloadBytes);
  // Up to 1 MiB (3 MiB with a cache), odd sizes included.
  const size = (1 + prng.int(cacheLeaves === undefined ? 2048 : 6144)) * SECTOR;
  const tiered = seed % 3 === 1;
  const device = new CrashDevice(tiered ? 2 * BACKING_BYTES : BACKING_BYTES, {
    prng: prng.fork(),
    reorder: true,
  });
  const backingOf = (medium: CrashDevice): BlockDevice =>
    tiered
      ? new TieredBacking([
          new PartitionDevice(medium, 0, BACKING_BYTES),
          new PartitionDevice(medium, BACKING_BYTES, BACKING_BYTES),
        ])
      : medium;
  const placementPrng = prng.fork();
  const image = await Image.create(
    backingOf(device),
    { name: "d0", sizeBytes: size },
    { indexCache: newCache() },
  );
  if (tiered) {
    image.placement = {
      writeDevice: () => placementPrng.int(2) + (placementPrng.bool() ? placementStrict : 0),
      hasRoom: () => true,
    };
  }
  const heads = new Map<string, HeadModel>([
    ["d0", { disk: "d0", model: new ModelDisk(size), alternative: null }],
  ]);
  const snapshots: SnapshotModel[] = [];
  let nextDisk = 1;
  let nextSnap = 1;
  device.crashAfter(1 + prng.int(120));

  const volumeOf = (disk: string): ImageVolume => new ImageVolume(image, image.head(disk) as Layer);
  const markAll = (): Map<string, number> => new Map([...heads].map(([disk, h]) => [disk, h.model.mark()]));
  const flushAll = (marks: Map<string, number>): void => {
    for (const [disk, mark] of marks) heads.get(disk)?.model.flushTo(mark);
  };
  const range = (disk: string): [number, number] => {
    const total = heads.get(disk)!.model.size;
    const aligned = prng.bool(0.6);
    let start = prng.int(total);
    let end = Math.min(total, start + 1 + prng.int(aligned ? 256 * 1024 : 20_000));
    if (aligned) {
      start = Math.floor(start / 4096) * 4096;
      end = Math.min(total, Math.ceil(end / 4096) * 4096);
    }
    return [start, end];
  };

  try {
    for (let step = 0; step < 60 && !device.crashed; step++) {
      const disks = [...heads.keys()];
      const disk = prng.pick(disks);
      const choice = prng.int(100);
      if (choice < 40) {
        // A burst of concurrent writes/zeroes/trims to one head. Each is applied to the model when
        // its callback runs — also when it fails because the power went (it may have landed).
        const volume = volumeOf(disk);
        const model = heads.get(disk)!.model;
        const burst: Array<Promise<void>> = [];
        for (let i = 0, n = 1 + prng.int(6); i < n; i++) {
          const [start, end] = range(disk);
          const kind = prng.int(10);
          const fua = prng.bool(0.1);
          debug(
            `step ${step}: ${kind < 7 ? "write" : kind < 9 ? "zero" : "trim"} ${disk} ${start}..${end} fua=${fua}`,
          );
          if (kind < 7) {
            const data = prng.bytes(end - start);
            burst.push(
              writeAsync(volume, data, start, fua).then(
                () => model.write(data, start, fua),
                (err) => {
                  if (device.crashed) model.write(data, start, false);
                  else throw err;
                },
              ),
            );
          } else {
            const operation =
              kind < 9
                ? zeroAsync(volume, start, end - start, prng.bool() ? ZeroFlags.MAY_TRIM : 0)
                : trimAsync(volume, start, end - start);
            burst.push(
              operation.then(
                () => model.zero(start, end - start, false),
                (err) => {
                  if (device.crashed) model.zero(start, end - start, false);
                  else throw err;
                },
              ),
            );
          }
        }
        if (tiered && prng.bool(0.4)) {
          const layer = image.head(disk) as Layer;
          const start = prng.int(layer.blocks);
          const end = Math.min(layer.blocks, start + 1 + prng.int(600));
          const target = prng.int(2);
          debug(`step ${step}: migrate ${disk} blocks ${start}..${end} to device ${target}`);
          burst.push(
            image.migrate(layer, start, end, target).then(
              () => undefined,
              (err) => {
                if (!device.crashed) throw err;
              },
            ),
          );
        }
        await Promise.all(burst);
      } else if (choice < 60) {
        const marks = markAll();
        debug(`step ${step}: flush ${disk}`);
        await flushAsync(volumeOf(disk));
        flushAll(marks);
      } else if (choice < 75) {
        const name = `s${nextSnap++}`;
        const snapshot: SnapshotModel = {
          disk,
          name,
          data: heads.get(disk)!.model.read(0, heads.get(disk)!.model.size),
          certain: false,
          deleting: false,
        };
        snapshots.push(snapshot);
        debug(`step ${step}: snapshot ${disk}@${name}`);
        const marks = markAll();
        await image.createSnapshot(disk, name);
        snapshot.certain = true;
        flushAll(marks);
      } else if (choice < 83) {
        const candidates = snapshots.filter((s) => s.certain && !s.deleting);
        if (candidates.length === 0) continue;
        const source = prng.pick(candidates);
        const name = `d${nextDisk++}`;
        const marks = markAll();
        const pending: HeadModel = {
          disk: name,
          model: new ModelDisk(source.data.length, { image: source.data }),
          alternative: null,
        };
        debug(`step ${step}: clone ${source.disk}@${source.name} -> ${name}`);
        await image.clone(image.snapshot(source.disk, source.name)!, name);
        heads.set(name, pending);
        flushAll(marks);
      } else if (choice < 90) {
        const candidates = snapshots.filter((s) => s.certain && !s.deleting);
        if (candidates.length === 0) continue;
        const target = prng.pick(candidates);
        const head = heads.get(disk)!;
        const marks = markAll();
        head.alternative = new ModelDisk(target.data.length, { image: target.data });
        debug(`step ${step}: rollback ${disk} to ${target.disk}@${target.name}`);
        await image.rollback(disk, image.snapshot(target.disk, target.name)!);
        head.model = head.alternative;
        head.alternative = null;
        marks.delete(disk); // its new model starts flushed
        flushAll(marks);
      } else {
        const candidates = snapshots.filter((s) => s.certain && !s.deleting);
        if (candidates.length === 0) continue;
        const victim = prng.pick(candidates);
        victim.deleting = true;
        const marks = markAll();
        debug(`step ${step}: delete ${victim.disk}@${victim.name}`);
        await image.deleteLayer(image.snapshot(victim.disk, victim.name)!);
        flushAll(marks);
      }
    }
  } catch (err) {
    if (!device.crashed) throw err;
  }
  debug(`crashed: ${device.crashed}`);
  if (!device.crashed) device.crash();

  // Power is back. (The debug dumps map whole trees: they need every leaf in memory.)
  if (process.env.VDISK_CRASH_DEBUG && cacheLeaves === undefined) {
    for (const [disk] of heads)
      image.map(image.head(disk)!, 0, Math.ceil(image.head(disk)!.sizeBytes / 4096), (r) =>
        debug("before", disk, JSON.stringify(r)),
      );
  }
  const reopened = await Image.open(backingOf(device.reopen()), { indexCache: newCache() });
  if (process.env.VDISK_CRASH_DEBUG && cacheLeaves === undefined) {
    for (const [disk] of heads)
      if (reopened.head(disk))
        reopened.map(reopened.head(disk)!, 0, Math.ceil(reopened.head(disk)!.sizeBytes / 4096), (r) =>
          debug("after", disk, JSON.stringify(r)),
        );
  }
  const { problems } = await reopened.verify();
  assert.deepEqual(problems, [], "image consistent after the crash");
  for (const [disk, head] of heads) {
    const layer = reopened.head(disk);
    if (!layer) {
      // Only a clone whose creation was cut short may be missing; clones are added to `heads` after.
      assert.fail(`disk ${disk} is missing after the crash`);
    }
    const actual = Buffer.alloc(layer.sizeBytes);
    await readAsync(new ImageVolume(reopened, layer), actual, 0);
    const verdict =
      actual.length === head.model.size
        ? head.model.checkAfterCrash(actual)
        : `size ${actual.length} != ${head.model.size}`;
    if (verdict !== null) {
      const alternative =
        head.alternative && actual.length === head.alternative.size
          ? head.alternative.checkAfterCrash(actual)
          : "no alternative";
      assert.equal(alternative, null, `head ${disk}: ${verdict}`);
    }
  }
  for (const snapshot of snapshots) {
    const layer = reopened.snapshot(snapshot.disk, snapshot.name);
    if (!layer) {
      assert.ok(!snapshot.certain || snapshot.deleting, `snapshot ${snapshot.disk}@${snapshot.name} lost`);
      continue;
    }
    const actual = Buffer.alloc(layer.sizeBytes);
    await readAsync(new ImageVolume(reopened, layer), actual, 0);
    assert.ok(actual.equals(snapshot.data), `snapshot ${snapshot.disk}@${snapshot.name} changed`);
  }
  await reopened.close();
}

test("image survives power loss at random points", { timeout: 900_000 }, async () => {
  const only = process.env.VDISK_CRASH_SEED;
  const seeds =
    only !== undefined
      ? [Number(only)]
      : Array.from({ length: Number(process.env.VDISK_CRASH_RUNS ?? 1500) }, (_, i) => i + 1);
  let crashedMidway = 0;
  for (const seed of seeds) {
    try {
      await runSeed(seed);
    } catch (err) {
      const cache = cacheLeavesOf(seed);
      assert.fail(
        `crash seed ${seed}${cache === undefined ? "" : ` (index cache of ${cache} leaves)`} failed ` +
          `(replay: VDISK_CRASH_SEED=${seed}): ${(err as Error).stack ?? err}`,
      );
    }
    crashedMidway++;
  }
  assert.equal(crashedMidway, seeds.length);
});

/**
 * The case seed 221 found once punches were deferred: two disks share data in the durable tree; one
 * drops its reference in memory only — by rewriting the range (to new blocks: its leaf is still shared,
 * or already its own copy), or by trimming the whole leaf that maps it — then the other writes the same
 * range. In memory the data (or the leaf) now has one
 * reference, but the durable tree still gives it to the first disk, so the second write must not go in
 * place: after a power cut that keeps every unflushed write, the first disk must read what it had
 * flushed or what it did, never the other disk's data.
 */
test("data another disk's durable mapping reaches is not overwritten in place", async () => {
  const leafBytes = 512 * 4096;
  for (const drop of ["rewrite", "rewrite own leaf", "trim"] as const) {
    for (const evict of [false, true]) {
      const label = `${drop}, evict ${evict}`;
      const device = new CrashDevice(BACKING_BYTES, { prng: new Prng(7), reorder: false });
      const cache = (): IndexCache | undefined => (evict ? new IndexCache(0) : undefined);
      const image = await Image.create(
        device,
        { name: "d0", sizeBytes: 2 * leafBytes },
        { indexCache: cache() },
      );
      const volume = (disk: string): ImageVolume => new ImageVolume(image, image.head(disk) as Layer);
      const flushed = Buffer.alloc(16 * 1024, 0xaa);
      const rewritten = Buffer.alloc(16 * 1024, drop === "trim" ? 0 : 0xbb);
      const other = Buffer.alloc(16 * 1024, 0xcc);
      await writeAsync(volume("d0"), flushed, 0);
      await flushAsync(volume("d0"));
      await image.createSnapshot("d0", "s");
      await image.clone(image.snapshot("d0", "s")!, "d1");
      await image.deleteLayer(image.snapshot("d0", "s")!);
      if (drop === "rewrite own leaf") {
        // d0 copies the shared leaf (writing elsewhere in it) and commits: both leaves map the data.
        await writeAsync(volume("d0"), Buffer.alloc(4096, 0xdd), 64 * 1024);
        await flushAsync(volume("d0"));
      }
      if (drop === "trim") await trimAsync(volume("d0"), 0, leafBytes);
      else await writeAsync(volume("d0"), rewritten, 0);
      await writeAsync(volume("d1"), other, 0);
      device.crash({ land: 1, tear: "none" });
      const reopened = await Image.open(device.reopen(), { indexCache: cache() });
      const d0 = Buffer.alloc(16 * 1024);
      await readAsync(new ImageVolume(reopened, reopened.head("d0") as Layer), d0, 0);
      assert.ok(d0.equals(flushed) || d0.equals(rewritten), `d0 reads 0x${d0[0]?.toString(16)} (${label})`);
      const d1 = Buffer.alloc(16 * 1024);
      await readAsync(new ImageVolume(reopened, reopened.head("d1") as Layer), d1, 0);
      assert.ok(d1.equals(flushed) || d1.equals(other), `d1 reads 0x${d1[0]?.toString(16)} (${label})`);
      await reopened.close();
    }
  }
});
