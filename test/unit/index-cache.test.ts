/**
 * The index-node cache of vdisk images (src/image/index-cache.ts): its limit holds (with the documented
 * slack for dirty leaves), a cold lookup costs exactly one backing read per missing leaf, the counters
 * move as documented, upper levels stay resident, shrinking the limit evicts, a damaged evicted leaf is
 * a CORRUPT error when it is read back, and evicted leaves that die are released in the background.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { VdiskError } from "../../src/errors";
import type { BlockDevice, Done, ExtentsDone, ReadDone } from "../../src/devices/block-device";
import { MemoryDevice } from "../../src/devices/memory-device";
import { flushAsync, readAsync, trimAsync, usageAsync, writeAsync } from "../../src/devices/promises";
import { BLOCK_BYTES, FANOUT, allocateNodeArrays, encodeNode, UnitType } from "../../src/image/format";
import { Image, type IndexNode, type Layer } from "../../src/image/image";
import { IndexCache, leafPayloadBytes } from "../../src/image/index-cache";
import { ImageVolume } from "../../src/image/volume";

const MiB = 1024 * 1024;
const LEAF_SPAN_BYTES = FANOUT * BLOCK_BYTES; // 2 MiB of disk per leaf
/**
 * Dirty leaves an image may hold over a small limit: 64 before it starts a commit early (image.ts,
 * dirtyLeavesCommitMin), plus those dirtied by writes completing while that commit runs.
 */
const DIRTY_SLACK_LEAVES = 64 + 8;

/** A MemoryDevice that counts reads by block, and can offer a page-cache style readNoWait. */
class CountingDevice implements BlockDevice {
  readonly inner: MemoryDevice;
  readonly readsByBlock = new Map<number, number>();
  reads = 0;

  constructor(size: number) {
    this.inner = new MemoryDevice(size);
  }
  get size(): number {
    return this.inner.size;
  }
  get capabilities() {
    return this.inner.capabilities;
  }
  get kind(): string {
    return "counting";
  }
  readsOf(block: number): number {
    return this.readsByBlock.get(block) ?? 0;
  }
  read(buf: Buffer, offset: number, done: ReadDone): void {
    this.reads++;
    const block = offset / BLOCK_BYTES;
    this.readsByBlock.set(block, this.readsOf(block) + 1);
    this.inner.read(buf, offset, done);
  }
  readNoWait(buf: Buffer, offset: number): boolean {
    // Everything is "in the page cache": MemoryDevice.read fills `buf` before it returns.
    this.inner.read(buf, offset, () => undefined);
    return true;
  }
  write(buf: Buffer, offset: number, fua: boolean, done: Done): void {
    this.inner.write(buf, offset, fua, done);
  }
  zero(offset: number, length: number, flags: number, done: Done): void {
    this.inner.zero(offset, length, flags, done);
  }
  trim(offset: number, length: number, fua: boolean, done: Done): void {
    this.inner.trim(offset, length, fua, done);
  }
  flush(done: Done): void {
    this.inner.flush(done);
  }
  cache(offset: number, length: number, done: Done): void {
    this.inner.cache(offset, length, done);
  }
  blockStatus(offset: number, length: number, done: ExtentsDone): void {
    this.inner.blockStatus(offset, length, done);
  }
  resize(size: number, done: Done): void {
    this.inner.resize(size, done);
  }
  usage(done: Parameters<BlockDevice["usage"]>[0]): void {
    this.inner.usage(done);
  }
  close(done: Done): void {
    this.inner.close(done);
  }
}

/** The leaves under a layer's root, in block order (the root is an upper node in these tests). */
function leavesOf(layer: Layer): IndexNode[] {
  const leaves: IndexNode[] = [];
  const walk = (node: IndexNode): void => {
    if (node.level === 0) {
      leaves.push(node);
      return;
    }
    assert.ok(node.types !== null, `upper node at level ${node.level} is resident`);
    for (let i = 0; i < FANOUT; i++) if (node.types[i] === UnitType.NODE) walk(node.children[i]!);
  };
  assert.equal(layer.root.type, UnitType.NODE);
  walk(layer.root.node!);
  return leaves;
}

function upperNodesOf(layer: Layer): IndexNode[] {
  const nodes: IndexNode[] = [];
  const walk = (node: IndexNode): void => {
    if (node.level === 0) return;
    nodes.push(node);
    for (let i = 0; i < FANOUT; i++) if (node.types![i] === UnitType.NODE) walk(node.children[i]!);
  };
  walk(layer.root.node!);
  return nodes;
}

/** One 4 KiB write in each of `leaves` leaves (at a different place in each, so none collapses). */
async function scatter(volume: ImageVolume, leaves: number, fill = 0x5a): Promise<void> {
  for (let leaf = 0; leaf < leaves; leaf++) {
    const offset = leaf * LEAF_SPAN_BYTES + (leaf % 7) * BLOCK_BYTES;
    await writeAsync(volume, Buffer.alloc(BLOCK_BYTES, (fill + leaf) & 0xff || 1), offset);
  }
}

async function setup(options: { limitLeaves: number; sizeBytes?: number }) {
  const device = new CountingDevice(512 * MiB);
  const cache = new IndexCache(options.limitLeaves * leafPayloadBytes);
  const image = await Image.create(
    device,
    { name: "d", sizeBytes: options.sizeBytes ?? 256 * MiB },
    { indexCache: cache },
  );
  const head = image.head("d")!;
  return { device, cache, image, head, volume: new ImageVolume(image, head) };
}

test("a small cache stays within its limit while a region spanning many leaves is written", async () => {
  const limitLeaves = 4;
  const { cache, image, head, volume } = await setup({ limitLeaves });
  const limit = limitLeaves * leafPayloadBytes;
  let peak = 0;
  for (let leaf = 0; leaf < 120; leaf++) {
    await writeAsync(volume, Buffer.alloc(BLOCK_BYTES, 7), leaf * LEAF_SPAN_BYTES + (leaf % 5) * BLOCK_BYTES);
    peak = Math.max(peak, cache.stats().residentBytes);
  }
  // Dirty leaves cannot be evicted; past 64 of them (and half the limit) a commit makes them clean.
  assert.ok(peak <= limit + DIRTY_SLACK_LEAVES * leafPayloadBytes, `peak ${peak} within limit + dirty slack`);
  assert.ok(image.commits >= 2, `dirty pressure started commits (${image.commits})`);
  await flushAsync(volume);
  const stats = cache.stats();
  assert.ok(stats.residentBytes <= limit, `after a commit everything clean fits: ${JSON.stringify(stats)}`);
  assert.ok(stats.evictions >= 120 - limitLeaves, `evictions ${stats.evictions}`);
  assert.equal(stats.residentNodes * leafPayloadBytes, stats.residentBytes);
  assert.ok(stats.evictableNodes <= stats.residentNodes);
  assert.equal(leavesOf(head).length, 120);
  assert.ok(leavesOf(head).filter((leaf) => leaf.types !== null).length <= limitLeaves);
  // Upper levels are all resident (leavesOf asserts it on the way down).
  assert.deepEqual(await image.checkConsistency(), []);
  await image.close();
  assert.equal(cache.stats().residentBytes, 0, "close gives the budget back");
});

test("a read of an evicted region costs one backing read per missing leaf; counters follow", async () => {
  const { device, cache, image, head, volume } = await setup({ limitLeaves: 1 });
  await scatter(volume, 8);
  await flushAsync(volume); // clean: all but one leaf evicted
  const leaves = leavesOf(head);
  assert.equal(leaves.length, 8);
  assert.ok(leaves.filter((leaf) => leaf.types !== null).length <= 1);
  cache.setLimit(0);
  assert.ok(
    leaves.every((leaf) => leaf.types === null),
    "every leaf evicted at limit 0",
  );
  cache.setLimit(3 * leafPayloadBytes);

  const before = cache.stats();
  const leafReads = (): number => leaves.reduce((sum, leaf) => sum + device.readsOf(leaf.diskAddress), 0);
  const buf = Buffer.alloc(BLOCK_BYTES);
  // Leaf 2, cold: one read of its node (and one of the data).
  const readsBefore = device.reads;
  await readAsync(volume, buf, 2 * LEAF_SPAN_BYTES + 2 * BLOCK_BYTES);
  assert.equal(buf[0], 0x5a + 2);
  assert.equal(leafReads(), 1);
  assert.equal(device.readsOf(leaves[2]!.diskAddress), 1);
  assert.equal(device.reads - readsBefore, 2, "one index read and one data read");
  let stats = cache.stats();
  assert.equal(stats.misses - before.misses, 1);
  assert.equal(stats.loads - before.loads, 1);
  assert.equal(stats.hits - before.hits, 0);
  // Warm now: no index read, one hit.
  await readAsync(volume, buf, 2 * LEAF_SPAN_BYTES);
  assert.equal(leafReads(), 1);
  assert.equal(cache.stats().hits - stats.hits, 1);
  stats = cache.stats();
  // A read across leaves 2..4 (2 resident, 3 and 4 not): two index reads, two misses, one hit.
  const wide = Buffer.alloc(3 * LEAF_SPAN_BYTES);
  await readAsync(volume, wide, 2 * LEAF_SPAN_BYTES);
  assert.equal(wide[(3 - 2) * LEAF_SPAN_BYTES + 3 * BLOCK_BYTES], 0x5a + 3);
  assert.equal(leafReads(), 3);
  assert.equal(device.readsOf(leaves[3]!.diskAddress), 1);
  assert.equal(device.readsOf(leaves[4]!.diskAddress), 1);
  assert.equal(cache.stats().misses - stats.misses, 2);
  assert.equal(cache.stats().loads - stats.loads, 2);
  assert.equal(cache.stats().hits - stats.hits, 1);
  // Concurrent cold reads of one leaf share one load; each lookup is a miss.
  stats = cache.stats();
  await Promise.all([
    readAsync(volume, Buffer.alloc(BLOCK_BYTES), 6 * LEAF_SPAN_BYTES),
    readAsync(volume, Buffer.alloc(BLOCK_BYTES), 6 * LEAF_SPAN_BYTES + BLOCK_BYTES),
    readAsync(volume, Buffer.alloc(BLOCK_BYTES), 6 * LEAF_SPAN_BYTES + 2 * BLOCK_BYTES),
  ]);
  assert.equal(device.readsOf(leaves[6]!.diskAddress), 1, "one read for three lookups");
  assert.equal(cache.stats().loads - stats.loads, 1);
  assert.equal(cache.stats().misses - stats.misses, 3);
  // The limit holds after the loads (no request holds pins any more).
  assert.ok(cache.stats().residentBytes <= 3 * leafPayloadBytes);
  assert.ok(
    upperNodesOf(head).every((node) => node.types !== null),
    "upper levels stay resident",
  );
  await image.close();
});

test("readNoWait declines for an evicted leaf without loading it, and answers once it is resident", async () => {
  const { device, cache, image, head, volume } = await setup({ limitLeaves: 2 });
  await scatter(volume, 4);
  await flushAsync(volume);
  cache.setLimit(0);
  cache.setLimit(2 * leafPayloadBytes);
  const leaf = leavesOf(head)[1]!;
  const buf = Buffer.alloc(BLOCK_BYTES);
  const loads = cache.stats().loads;
  assert.equal(volume.readNoWait(buf, LEAF_SPAN_BYTES + BLOCK_BYTES), false);
  assert.equal(cache.stats().loads, loads, "declining loads nothing");
  assert.equal(device.readsOf(leaf.diskAddress), 0);
  await readAsync(volume, buf, LEAF_SPAN_BYTES);
  assert.equal(volume.readNoWait(buf, LEAF_SPAN_BYTES + BLOCK_BYTES), true);
  assert.equal(buf[0], 0x5a + 1);
  await image.close();
});

test("upper levels stay resident; open evicts down to the limit as it loads", async () => {
  const device = new CountingDevice(512 * MiB);
  // 4 GiB disk: root at level 2, level-1 nodes under it, leaves under those.
  const writer = await Image.create(device, { name: "big", sizeBytes: 4096 * MiB });
  const volume = new ImageVolume(writer, writer.head("big")!);
  for (let leaf = 0; leaf < 40; leaf++) {
    // Spread over several level-1 nodes (each covers 1 GiB = 512 leaves).
    const offset = ((leaf * 53) % 2048) * LEAF_SPAN_BYTES + (leaf % 3) * BLOCK_BYTES;
    await writeAsync(volume, Buffer.alloc(BLOCK_BYTES, leaf + 1), offset);
  }
  await writer.close();
  const cache = new IndexCache(5 * leafPayloadBytes);
  const image = await Image.open(device, { indexCache: cache });
  const head = image.head("big")!;
  assert.equal(head.rootLevel, 2);
  const uppers = upperNodesOf(head);
  assert.ok(uppers.length >= 3, `root and level-1 nodes (${uppers.length})`);
  assert.ok(uppers.every((node) => node.types !== null));
  const leaves = leavesOf(head);
  assert.equal(leaves.length, 40);
  assert.ok(cache.stats().residentBytes <= 5 * leafPayloadBytes, JSON.stringify(cache.stats()));
  assert.equal(leaves.filter((leaf) => leaf.types !== null).length, cache.stats().residentNodes);
  // Every byte still reads right through evicted leaves.
  for (let leaf = 0; leaf < 40; leaf++) {
    const offset = ((leaf * 53) % 2048) * LEAF_SPAN_BYTES + (leaf % 3) * BLOCK_BYTES;
    const buf = Buffer.alloc(BLOCK_BYTES);
    await readAsync(new ImageVolume(image, head), buf, offset);
    assert.equal(buf[0], leaf + 1);
  }
  assert.ok(
    uppers.every((node) => node.types !== null),
    "still resident after the loads",
  );
  assert.deepEqual((await image.verify()).problems, []);
  await image.close();
});

test("setLimit: shrinking evicts at once, least recently used first", async () => {
  const { cache, image, head, volume } = await setup({ limitLeaves: 1000 });
  await scatter(volume, 10);
  await flushAsync(volume);
  assert.equal(cache.stats().residentNodes, 10);
  assert.equal(cache.stats().evictableNodes, 10);
  // Touch leaves 7 and 3 (most recent last): they are the ones kept.
  await readAsync(volume, Buffer.alloc(BLOCK_BYTES), 7 * LEAF_SPAN_BYTES);
  await readAsync(volume, Buffer.alloc(BLOCK_BYTES), 3 * LEAF_SPAN_BYTES);
  cache.setLimit(2 * leafPayloadBytes);
  const stats = cache.stats();
  assert.equal(stats.residentNodes, 2);
  assert.equal(stats.evictions, 8);
  assert.deepEqual(
    leavesOf(head)
      .map((leaf, index) => (leaf.types !== null ? index : -1))
      .filter((index) => index >= 0),
    [3, 7],
  );
  assert.throws(() => cache.setLimit(-1), /not a size/);
  await image.close();
});

test("dirty leaves are never evicted; they become evictable once committed", async () => {
  const { cache, image, head, volume } = await setup({ limitLeaves: 0 });
  await scatter(volume, 5);
  assert.equal(cache.stats().residentNodes, 5, "dirty: resident whatever the limit");
  assert.equal(cache.stats().evictableNodes, 0);
  await flushAsync(volume);
  assert.equal(cache.stats().residentNodes, 0);
  assert.ok(leavesOf(head).every((leaf) => leaf.types === null && !leaf.dirty));
  await image.close();
});

test("a damaged evicted leaf is a CORRUPT error when read back, never garbage", async () => {
  const { device, cache, image, head, volume } = await setup({ limitLeaves: 0 });
  await scatter(volume, 3);
  await flushAsync(volume);
  const [first, second] = leavesOf(head) as [IndexNode, IndexNode];
  assert.equal(first.types, null);
  // Flip one byte of the first leaf on disk.
  const block = Buffer.alloc(BLOCK_BYTES);
  await readAsync(device.inner, block, first.diskAddress * BLOCK_BYTES);
  block[100]! ^= 0x40;
  await writeAsync(device.inner, block, first.diskAddress * BLOCK_BYTES);
  const corrupt = (pattern: RegExp) => (err: unknown) => {
    assert.ok(err instanceof VdiskError, String(err));
    assert.equal(err.code, "CORRUPT");
    assert.match(err.message, pattern);
    return true;
  };
  await assert.rejects(
    readAsync(volume, Buffer.alloc(BLOCK_BYTES), 0),
    corrupt(new RegExp(`index node at block ${first.diskAddress}: checksum mismatch`)),
  );
  // A valid node, but not the one written there (a stale or misplaced block): the CRC it was written
  // with tells them apart.
  const { types, addresses } = allocateNodeArrays();
  const impostor = Buffer.alloc(BLOCK_BYTES);
  encodeNode({ level: 0, types, addresses }, second.diskAddress, impostor);
  await writeAsync(device.inner, impostor, second.diskAddress * BLOCK_BYTES);
  await assert.rejects(
    readAsync(volume, Buffer.alloc(BLOCK_BYTES), LEAF_SPAN_BYTES),
    corrupt(/not the leaf written there/),
  );
  // Writes into the damaged region fail the same way and change nothing.
  await assert.rejects(writeAsync(volume, Buffer.alloc(BLOCK_BYTES, 1), 0), corrupt(/checksum mismatch/));
  assert.equal(cache.stats().residentNodes, 0);
  // The third leaf is fine.
  const buf = Buffer.alloc(BLOCK_BYTES);
  await readAsync(volume, buf, 2 * LEAF_SPAN_BYTES + 2 * BLOCK_BYTES);
  assert.equal(buf[0], 0x5a + 2);
  const problems = await image.checkConsistency();
  assert.ok(
    problems.some((problem) => problem.includes("checksum mismatch")),
    problems.join("\n"),
  );
  assert.ok(
    problems.some((problem) => problem.includes("not the leaf written there")),
    problems.join("\n"),
  );
});

test("evicted leaves that lose their last reference are released in the background", async () => {
  const { cache, image, head, volume } = await setup({ limitLeaves: 0 });
  await scatter(volume, 6);
  await flushAsync(volume);
  const dataBefore = image.stats().dataBytes;
  assert.equal(dataBefore, 6 * BLOCK_BYTES);
  // Trim leaves 1..4 whole: they are replaced without being read, then released in the background.
  const leaves = leavesOf(head);
  const loads = cache.stats().loads;
  await trimAsync(volume, LEAF_SPAN_BYTES, 4 * LEAF_SPAN_BYTES);
  assert.equal(cache.stats().loads, loads, "a whole-leaf trim reads no leaf into the cache");
  assert.deepEqual(await image.checkConsistency(), []); // waits for the background releases
  assert.equal(image.evictedReleases, 4);
  assert.ok(leaves.slice(1, 5).every((leaf) => leaf.refs === 0 && leaf.diskAddress === -1));
  assert.equal(image.stats().dataBytes, 2 * BLOCK_BYTES);
  // Statistics: the synchronous form refuses evicted leaves, the asynchronous one reads them.
  assert.throws(
    () => image.layerStats(head),
    (err: unknown) => err instanceof VdiskError && err.code === "INTERNAL",
  );
  const stats = await image.layerStatsAsync(head);
  assert.equal(stats.mappedBytes, 2 * BLOCK_BYTES);
  assert.equal(stats.exclusiveBytes, 2 * BLOCK_BYTES);
  assert.equal((await usageAsync(volume)).allocatedBytes, 2 * BLOCK_BYTES);
  assert.equal(cache.stats().loads, loads, "statistics read leaves without caching them");
  // Deleting a snapshot whose leaves are evicted releases them too.
  const snapshot = await image.createSnapshot("d", "s");
  await scatter(volume, 6, 0x33); // the head copies every leaf; the snapshot alone keeps the old ones
  await flushAsync(volume);
  await image.deleteLayer(snapshot);
  assert.deepEqual(await image.checkConsistency(), []);
  assert.equal(image.evictedReleases, 4 + 2);
  assert.equal(image.stats().dataBytes, 6 * BLOCK_BYTES);
  await image.close();
});

test("one cache shared by two images counts both, and forgets an image when it closes", async () => {
  const cache = new IndexCache(Infinity);
  const first = await Image.create(
    new MemoryDevice(64 * MiB),
    { name: "a", sizeBytes: 64 * MiB },
    { indexCache: cache },
  );
  const second = await Image.create(
    new MemoryDevice(64 * MiB),
    { name: "b", sizeBytes: 64 * MiB },
    { indexCache: cache },
  );
  assert.equal(first.indexCache, cache);
  await scatter(new ImageVolume(first, first.head("a")!), 3);
  await scatter(new ImageVolume(second, second.head("b")!), 5);
  assert.equal(cache.stats().residentNodes, 8);
  await first.close();
  assert.equal(cache.stats().residentNodes, 5);
  // Shrinking the shared limit evicts the other image's clean leaves.
  await flushAsync(new ImageVolume(second, second.head("b")!));
  cache.setLimit(leafPayloadBytes);
  assert.equal(cache.stats().residentNodes, 1);
  await second.close();
  assert.equal(cache.stats().residentNodes, 0);
  assert.equal(cache.stats().residentBytes, 0);
});
