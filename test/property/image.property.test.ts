/**
 * Model-based property tests of the vdisk image engine: random sequences of write / zero / trim /
 * snapshot / clone / rollback / delete / resize / flush / verify / reopen against plain Buffers, one per
 * layer.
 *
 * After every step: every head and every snapshot reads exactly its model (snapshots never change),
 * block status never calls a range ZERO that the model says holds data, the changed blocks of a layer
 * since any other (dirty bitmaps) include every block where their models differ, and the engine's
 * reference counts equal a recount from the roots (checkConsistency). Reopening from the backing file
 * must give the same answers, and `verify()` must find nothing.
 *
 * The same model test runs again with an index cache of a few leaves or none at all, so every step
 * also runs while leaves are evicted and read back (and evicted leaves are released in the background).
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import fc from "fast-check";
import { MemoryDevice } from "../../src/devices/memory-device";
import { ZeroFlags, ExtentFlags } from "../../src/devices/block-device";
import type { Extent } from "../../src/devices/block-device";
import {
  blockStatusAsync,
  flushAsync,
  readAsync,
  resizeAsync,
  trimAsync,
  usageAsync,
  writeAsync,
  zeroAsync,
} from "../../src/devices/promises";
import { Image, type Layer } from "../../src/image/image";
import { IndexCache, leafPayloadBytes } from "../../src/image/index-cache";
import { ImageVolume } from "../../src/image/volume";

const KiB = 1024;
const BACKING_BYTES = 256 * 1024 * 1024;

type Op =
  | { kind: "write"; head: number; offset: number; length: number; fill: number; aligned: boolean }
  | { kind: "zero"; head: number; offset: number; length: number; mayTrim: boolean; aligned: boolean }
  | { kind: "trim"; head: number; offset: number; length: number; aligned: boolean }
  | { kind: "burst"; head: number; writes: Array<{ offset: number; length: number; fill: number }> }
  | { kind: "snapshot"; head: number }
  | { kind: "clone"; snap: number }
  | { kind: "rollback"; head: number; snap: number }
  | { kind: "deleteSnapshot"; snap: number }
  | { kind: "deleteHead"; head: number }
  | { kind: "resize"; head: number; size: number }
  | { kind: "flush"; head: number }
  | { kind: "verify" }
  | { kind: "reopen" };

const position = fc.nat({ max: 4 * 1024 * 1024 });
// Mostly short; sometimes long enough to cover whole 2 MiB leaves (replaced, or released, whole).
const length = fc.oneof(
  { weight: 4, arbitrary: fc.integer({ min: 1, max: 600 * KiB }) },
  { weight: 1, arbitrary: fc.integer({ min: 1, max: 4 * 1024 * KiB }) },
);
const opArbitrary: fc.Arbitrary<Op> = fc.oneof(
  {
    weight: 6,
    arbitrary: fc.record({
      kind: fc.constant("write" as const),
      head: fc.nat(),
      offset: position,
      length,
      fill: fc.integer({ min: 1, max: 255 }),
      aligned: fc.boolean(),
    }),
  },
  {
    weight: 2,
    arbitrary: fc.record({
      kind: fc.constant("zero" as const),
      head: fc.nat(),
      offset: position,
      length,
      mayTrim: fc.boolean(),
      aligned: fc.boolean(),
    }),
  },
  {
    weight: 2,
    arbitrary: fc.record({
      kind: fc.constant("trim" as const),
      head: fc.nat(),
      offset: position,
      length,
      aligned: fc.boolean(),
    }),
  },
  {
    weight: 2,
    arbitrary: fc.record({
      kind: fc.constant("burst" as const),
      head: fc.nat(),
      writes: fc.array(
        fc.record({
          offset: position,
          length: fc.integer({ min: 1, max: 64 * KiB }),
          fill: fc.integer({ min: 1, max: 255 }),
        }),
        { minLength: 2, maxLength: 12 },
      ),
    }),
  },
  { weight: 2, arbitrary: fc.record({ kind: fc.constant("snapshot" as const), head: fc.nat() }) },
  { weight: 1, arbitrary: fc.record({ kind: fc.constant("clone" as const), snap: fc.nat() }) },
  {
    weight: 1,
    arbitrary: fc.record({ kind: fc.constant("rollback" as const), head: fc.nat(), snap: fc.nat() }),
  },
  { weight: 1, arbitrary: fc.record({ kind: fc.constant("deleteSnapshot" as const), snap: fc.nat() }) },
  { weight: 1, arbitrary: fc.record({ kind: fc.constant("deleteHead" as const), head: fc.nat() }) },
  {
    weight: 1,
    arbitrary: fc.record({
      kind: fc.constant("resize" as const),
      head: fc.nat(),
      size: fc.integer({ min: 1, max: 10 * 1024 }).map((k) => k * 512),
    }),
  },
  { weight: 1, arbitrary: fc.record({ kind: fc.constant("flush" as const), head: fc.nat() }) },
  { weight: 1, arbitrary: fc.record({ kind: fc.constant("verify" as const) }) },
  { weight: 1, arbitrary: fc.record({ kind: fc.constant("reopen" as const) }) },
);

class Harness {
  image!: Image;
  readonly backing = new MemoryDevice(BACKING_BYTES);
  /** Model content per layer id. */
  readonly model = new Map<number, Buffer>();
  private nextDisk = 1;
  private nextSnap = 1;

  /** `indexCache`: shared by every image this harness opens (undefined: each gets one that never evicts). */
  constructor(readonly indexCache?: IndexCache) {}

  async init(size: number): Promise<void> {
    this.image = await Image.create(
      this.backing,
      { name: "disk0", sizeBytes: size },
      { indexCache: this.indexCache },
    );
    this.model.set(this.image.head("disk0")!.id, Buffer.alloc(size));
  }

  /** Background releases of evicted leaves by the images closed so far. */
  evictedReleases = 0;

  async reopen(): Promise<void> {
    await this.image.close();
    this.evictedReleases += this.image.evictedReleases;
    this.image = await Image.open(this.backing, { indexCache: this.indexCache });
  }

  heads(): Layer[] {
    return [...this.image.layers.values()].filter((l) => l.kind === "head").sort((a, b) => a.id - b.id);
  }

  snapshots(): Layer[] {
    return [...this.image.layers.values()].filter((l) => l.kind === "snapshot").sort((a, b) => a.id - b.id);
  }

  volume(layer: Layer): ImageVolume {
    return new ImageVolume(this.image, layer);
  }

  clip(layer: Layer, offset: number, len: number, aligned: boolean): [number, number] | null {
    let start = offset % layer.sizeBytes;
    let end = Math.min(layer.sizeBytes, start + len);
    if (aligned) {
      start = Math.floor(start / 4096) * 4096;
      end = Math.min(layer.sizeBytes, Math.ceil(end / 4096) * 4096);
    }
    return end > start ? [start, end] : null;
  }

  async apply(op: Op): Promise<void> {
    const heads = this.heads();
    const snaps = this.snapshots();
    switch (op.kind) {
      case "write": {
        const head = heads[op.head % heads.length]!;
        const range = this.clip(head, op.offset, op.length, op.aligned);
        if (!range) return;
        const data = pattern(range[1] - range[0], op.fill);
        await writeAsync(this.volume(head), data, range[0]);
        data.copy(this.model.get(head.id)!, range[0]);
        return;
      }
      case "zero":
      case "trim": {
        const head = heads[op.head % heads.length]!;
        const range = this.clip(head, op.offset, op.length, op.aligned);
        if (!range) return;
        if (op.kind === "zero")
          await zeroAsync(
            this.volume(head),
            range[0],
            range[1] - range[0],
            op.mayTrim ? ZeroFlags.MAY_TRIM : 0,
          );
        else await trimAsync(this.volume(head), range[0], range[1] - range[0]);
        this.model.get(head.id)!.fill(0, range[0], range[1]);
        return;
      }
      case "burst": {
        // Submitted together; overlapping writes are serialised in submission order by the range locks.
        const head = heads[op.head % heads.length]!;
        const volume = this.volume(head);
        const pending: Array<Promise<void>> = [];
        for (const w of op.writes) {
          const range = this.clip(head, w.offset, w.length, false);
          if (!range) continue;
          const data = pattern(range[1] - range[0], w.fill);
          pending.push(writeAsync(volume, data, range[0]));
          data.copy(this.model.get(head.id)!, range[0]);
        }
        await Promise.all(pending);
        return;
      }
      case "snapshot": {
        const head = heads[op.head % heads.length]!;
        const snap = await this.image.createSnapshot(head.name, `s${this.nextSnap++}`);
        this.model.set(snap.id, Buffer.from(this.model.get(head.id)!));
        return;
      }
      case "clone": {
        if (snaps.length === 0) return;
        const snap = snaps[op.snap % snaps.length]!;
        const head = await this.image.clone(snap, `disk${this.nextDisk++}`);
        this.model.set(head.id, Buffer.from(this.model.get(snap.id)!));
        return;
      }
      case "rollback": {
        if (snaps.length === 0) return;
        const head = heads[op.head % heads.length]!;
        const snap = snaps[op.snap % snaps.length]!;
        await this.image.rollback(head.name, snap);
        this.model.set(head.id, Buffer.from(this.model.get(snap.id)!));
        return;
      }
      case "deleteSnapshot": {
        if (snaps.length === 0) return;
        const snap = snaps[op.snap % snaps.length]!;
        await this.image.deleteLayer(snap);
        this.model.delete(snap.id);
        return;
      }
      case "deleteHead": {
        if (heads.length < 2) return;
        const head = heads[op.head % heads.length]!;
        await this.image.deleteLayer(head);
        this.model.delete(head.id);
        return;
      }
      case "resize": {
        const head = heads[op.head % heads.length]!;
        await resizeAsync(this.volume(head), op.size);
        const old = this.model.get(head.id)!;
        const resized = Buffer.alloc(op.size);
        old.copy(resized, 0, 0, Math.min(old.length, op.size));
        this.model.set(head.id, resized);
        return;
      }
      case "flush": {
        await flushAsync(this.volume(heads[op.head % heads.length]!));
        return;
      }
      case "verify": {
        assert.deepEqual((await this.image.verify()).problems, [], "verify");
        return;
      }
      case "reopen": {
        await this.reopen();
        return;
      }
    }
  }

  async check(where: string): Promise<void> {
    assert.deepEqual(await this.image.checkConsistency(), [], `${where}: consistency`);
    assert.deepEqual(
      [...this.model.keys()].sort((a, b) => a - b),
      [...this.image.layers.keys()].sort((a, b) => a - b),
      `${where}: layer set`,
    );
    for (const layer of this.image.layers.values()) {
      const expected = this.model.get(layer.id)!;
      assert.equal(layer.sizeBytes, expected.length, `${where}: size of layer ${layer.id}`);
      const volume = this.volume(layer);
      // The synchronous fast path, over the whole layer (many runs) and an unaligned middle: when it
      // answers (it may decline, e.g. for an evicted leaf), it answers exactly what the model holds.
      const fast = Buffer.alloc(expected.length, 0xa5); // not zeros: zero runs must be filled
      if (volume.readNoWait(fast, 0))
        assert.ok(fast.equals(expected), `${where}: readNoWait of layer ${layer.id}`);
      if (expected.length > 2 * 4096) {
        const middle = Buffer.alloc(expected.length - 4096 - 1000, 0x5a);
        if (volume.readNoWait(middle, 1000)) {
          assert.ok(
            middle.equals(expected.subarray(1000, 1000 + middle.length)),
            `${where}: readNoWait middle`,
          );
        }
      }
      const actual = Buffer.alloc(expected.length);
      await readAsync(volume, actual, 0);
      if (!actual.equals(expected)) {
        let at = 0;
        while (actual[at] === expected[at]) at++;
        assert.fail(
          `${where}: layer ${layer.id} (${layer.kind} ${layer.name}) differs at byte ${at}: ${actual[at]} != ${expected[at]}`,
        );
      }
      let offset = 0;
      for (const extent of await blockStatusAsync(volume, 0, expected.length)) {
        if (extent.flags & ExtentFlags.ZERO) {
          const slice = expected.subarray(offset, offset + extent.length);
          assert.ok(
            slice.every((b) => b === 0),
            `${where}: layer ${layer.id} reports zeros at ${offset}+${extent.length} over data`,
          );
        }
        offset += extent.length;
      }
      assert.equal(offset, expected.length, `${where}: block status covers layer ${layer.id}`);
    }
    // Changed blocks since any other layer (what a dirty bitmap reports): every block whose content
    // differs between the two models must be reported as changed.
    const layers = [...this.image.layers.values()];
    for (const layer of layers) {
      for (const other of layers) {
        if (other === layer) continue;
        const mine = this.model.get(layer.id)!;
        const theirs = this.model.get(other.id)!;
        const extents = await changedSinceAsync(this.volume(layer), other, 0, layer.sizeBytes);
        let offset = 0;
        for (const extent of extents) {
          if (extent.flags === 0) {
            const end = Math.min(offset + extent.length, theirs.length);
            if (end > offset && !mine.subarray(offset, end).equals(theirs.subarray(offset, end))) {
              assert.fail(
                `${where}: layer ${layer.id} reports ${offset}+${extent.length} unchanged since layer ${other.id}, but it differs`,
              );
            }
          }
          offset += extent.length;
        }
        assert.equal(offset, layer.sizeBytes, `${where}: changed blocks cover layer ${layer.id}`);
      }
    }
  }
}

function changedSinceAsync(
  volume: ImageVolume,
  since: Layer,
  offset: number,
  length: number,
): Promise<Extent[]> {
  return new Promise((resolve, reject) =>
    volume.changedSince(since, offset, length, (err, extents) =>
      err ? reject(err) : resolve(extents ?? []),
    ),
  );
}

function pattern(len: number, fill: number): Buffer {
  const out = Buffer.alloc(len);
  for (let i = 0; i < len; i++) out[i] = (fill + i * 7 + (i >> 12)) & 0xff || 1;
  return out;
}

const propertyRuns = Number(process.env.VDISK_PROPERTY_RUNS ?? 120);
/** What the tiny-cache runs did in total: proof that they evicted and read leaves back. */
const cacheTotals = { evictions: 0, loads: 0, misses: 0, evictedReleases: 0 };

/** One model run: `cacheLeaves` undefined = no cache limit; else a cache of that many leaves. */
async function modelRun(size: number, ops: Op[], cacheLeaves: number | undefined): Promise<void> {
  const cache = cacheLeaves === undefined ? undefined : new IndexCache(cacheLeaves * leafPayloadBytes);
  const harness = new Harness(cache);
  await harness.init(size);
  for (const [index, op] of ops.entries()) {
    await harness.apply(op);
    await harness.check(`after op ${index} ${JSON.stringify(op).slice(0, 120)}`);
  }
  await harness.reopen();
  await harness.check("after final reopen");
  const verified = await harness.image.verify();
  assert.deepEqual(verified.problems, []);
  if (cache === undefined) return;
  // Statistics that read evicted leaves agree with the same figures computed all in memory.
  const evictedStats = new Map<number, unknown>();
  for (const layer of harness.image.layers.values()) {
    evictedStats.set(layer.id, await harness.image.layerStatsAsync(layer));
  }
  const usage = await usageAsync(harness.volume(harness.heads()[0]!));
  cache.setLimit(Infinity);
  for (const layer of harness.image.layers.values()) {
    await readAsync(harness.volume(layer), Buffer.alloc(layer.sizeBytes), 0);
    assert.deepEqual(
      harness.image.layerStats(layer),
      evictedStats.get(layer.id),
      `stats of layer ${layer.id}`,
    );
  }
  assert.equal(usage.allocatedBytes, harness.image.layerStats(harness.heads()[0]!).mappedBytes);
  cacheTotals.evictedReleases += harness.evictedReleases + harness.image.evictedReleases;
  await harness.image.close();
  const stats = cache.stats();
  cacheTotals.evictions += stats.evictions;
  cacheTotals.loads += stats.loads;
  cacheTotals.misses += stats.misses;
  assert.equal(cache.stats().residentNodes, 0, "a closed image leaves nothing in a shared cache");
  assert.equal(cache.stats().residentBytes, 0);
}

test("image engine matches a plain model under random operations", { timeout: 600_000 }, async () => {
  await fc.assert(
    fc.asyncProperty(
      fc.integer({ min: 1, max: 8 * 1024 }).map((k) => k * 512),
      fc.array(opArbitrary, { minLength: 1, maxLength: 30 }),
      (size, ops) => modelRun(size, ops, undefined),
    ),
    { numRuns: propertyRuns },
  );
});

test(
  "image engine matches the model with a tiny index cache (leaves evicted and read back)",
  { timeout: 600_000 },
  async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.integer({ min: 1, max: 8 * 1024 }).map((k) => k * 512),
        // Longer sequences: eviction matters once snapshots, commits and deletions have piled up.
        fc.array(opArbitrary, { minLength: 10, maxLength: 40 }),
        fc.constantFrom(0, 1, 2),
        (size, ops, cacheLeaves) => modelRun(size, ops, cacheLeaves),
      ),
      { numRuns: Math.max(1, Math.ceil(propertyRuns / 2)) },
    );
    if (propertyRuns < 20) return; // too few runs to be sure every path was taken
    assert.ok(cacheTotals.evictedReleases > 0, `evicted leaves released ${JSON.stringify(cacheTotals)}`);
    assert.ok(
      cacheTotals.evictions > 0 && cacheTotals.loads > 0,
      `leaves evicted and read back ${JSON.stringify(cacheTotals)}`,
    );
    assert.ok(cacheTotals.misses >= cacheTotals.loads, "every load was asked for by a missed lookup");
  },
);

test("sequential writes collapse into one unit per span; the index stays tiny", async () => {
  const backing = new MemoryDevice(BACKING_BYTES);
  const image = await Image.create(backing, { name: "seq", sizeBytes: 64 * 1024 * 1024 });
  const volume = new ImageVolume(image, image.head("seq")!);
  const chunk = Buffer.alloc(1024 * 1024, 0x5a);
  for (let offset = 0; offset < 64 * 1024 * 1024; offset += chunk.length)
    await writeAsync(volume, chunk, offset);
  await image.commit();
  const stats = image.layerStats(image.head("seq")!);
  assert.equal(stats.mappedBytes, 64 * 1024 * 1024);
  assert.ok(
    stats.indexBytes <= 4096,
    `index of a sequentially written disk is one node at most (${stats.indexBytes})`,
  );
  // One mapped run: reads of the whole disk are one request.
  let runs = 0;
  image.map(image.head("seq")!, 0, 16384, () => runs++);
  assert.equal(runs, 1);
});

test("lookups do not depend on chain depth: a read walks one tree", async () => {
  const backing = new MemoryDevice(BACKING_BYTES);
  const image = await Image.create(backing, { name: "deep", sizeBytes: 8 * 1024 * 1024 });
  const head = image.head("deep")!;
  const volume = new ImageVolume(image, head);
  await writeAsync(volume, Buffer.alloc(4096, 0x11), 0);
  for (let i = 0; i < 64; i++) {
    await image.createSnapshot("deep", `d${i}`);
    await writeAsync(volume, Buffer.alloc(4096, i + 1), 4096 * (1 + (i % 100)));
  }
  assert.equal(image.ancestors(head).length, 64);
  const buf = Buffer.alloc(4096);
  await readAsync(volume, buf, 0);
  assert.ok(
    buf.every((b) => b === 0x11),
    "the bottom layer's data reads through 64 snapshots",
  );
  // The root-to-leaf path has the same number of nodes at depth 64 as at depth 0.
  let visited = 0;
  image.map(head, 0, 1, () => visited++);
  assert.equal(visited, 1);
});

test("randomly written full leaves are copied into contiguous extents and collapse", async () => {
  const backing = new MemoryDevice(BACKING_BYTES);
  const size = 8 * 1024 * 1024;
  const image = await Image.create(backing, { name: "rnd", sizeBytes: size });
  const head = image.head("rnd")!;
  const volume = new ImageVolume(image, head);
  const blocks = size / 4096;
  const order = Array.from({ length: blocks }, (_, i) => i);
  let seed = 7;
  for (let i = blocks - 1; i > 0; i--) {
    seed = (seed * 1103515245 + 12345) >>> 0;
    const j = seed % (i + 1);
    [order[i], order[j]] = [order[j]!, order[i]!];
  }
  const model = Buffer.alloc(size);
  for (let i = 0; i < blocks; i += 16) {
    await Promise.all(
      order.slice(i, i + 16).map((block) => {
        const data = pattern(4096, (block % 250) + 1);
        data.copy(model, block * 4096);
        return writeAsync(volume, data, block * 4096);
      }),
    );
  }
  await image.settle();
  assert.ok(image.regroups >= 4, `leaves regrouped (${image.regroups})`);
  assert.deepEqual(await image.checkConsistency(), []);
  const stats = image.layerStats(head);
  assert.ok(stats.indexBytes <= 4096, `index collapsed to at most the root (${stats.indexBytes} bytes)`);
  const actual = Buffer.alloc(size);
  await readAsync(volume, actual, 0);
  assert.ok(actual.equals(model), "content unchanged by regrouping");
  await image.close();
  const reopened = await Image.open(backing);
  const again = Buffer.alloc(size);
  await readAsync(new ImageVolume(reopened, reopened.head("rnd")!), again, 0);
  assert.ok(again.equals(model));
  assert.deepEqual((await reopened.verify()).problems, []);
});
