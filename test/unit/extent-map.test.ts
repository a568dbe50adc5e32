/**
 * Extent map: worked examples of RefcountMap (coalescing, blocks reaching zero, the range queries) and of
 * FreeSpace (each step of the allocation policy, double-free and overlap assertions, growth and trimming,
 * the NO_SPACE limit), plus a generous performance guard on the hot path (1-block addRef + maxCount).
 */
import { test } from "node:test";
import * as assert from "node:assert/strict";

import { VdiskError } from "../../src/errors";
import {
  allocateUpToRunBlocksMin,
  FreeSpace,
  imageBlocksMax,
  nextFitRangesScannedMax,
  RefcountMap,
} from "../../src/image/extent-map";

const invariant = /invariant violated/;

function intervals(map: RefcountMap): Array<[number, number, number]> {
  return [...map.entries()];
}

test("refcount: addRef coalesces equal neighbours and splits on different counts", () => {
  const map = new RefcountMap();
  map.addRef(10, 5);
  map.addRef(15, 5);
  assert.deepEqual(intervals(map), [[10, 20, 1]]);
  map.addRef(12, 3);
  assert.deepEqual(intervals(map), [
    [10, 12, 1],
    [12, 15, 2],
    [15, 20, 1],
  ]);
  map.addRef(5, 20); // covers gaps on both sides
  assert.deepEqual(intervals(map), [
    [5, 10, 1],
    [10, 12, 2],
    [12, 15, 3],
    [15, 20, 2],
    [20, 25, 1],
  ]);
  assert.equal(map.referencedBlocks, 20);
  assert.equal(map.intervalCount, 5);
  map.checkInvariants();
});

test("refcount: decRef returns merged zeroed ranges and re-coalesces", () => {
  const map = new RefcountMap();
  map.addRef(0, 10);
  map.addRef(3, 2);
  assert.deepEqual(map.decRef(0, 10), [
    [0, 3],
    [5, 5],
  ]);
  assert.deepEqual(intervals(map), [[3, 5, 1]]);
  assert.equal(map.referencedBlocks, 2);
  assert.deepEqual(map.decRef(3, 2), [[3, 2]]);
  assert.equal(map.intervalCount, 0);
  assert.equal(map.referencedBlocks, 0);

  map.addRef(0, 4);
  map.addRef(0, 2);
  assert.deepEqual(map.decRef(0, 2), []); // back to a single interval of count 1
  assert.deepEqual(intervals(map), [[0, 4, 1]]);
  map.checkInvariants();
});

test("refcount: decRef of an unreferenced block asserts and leaves the map unchanged", () => {
  const map = new RefcountMap();
  map.addRef(0, 4);
  map.addRef(6, 4);
  assert.throws(() => map.decRef(2, 6), invariant);
  assert.deepEqual(intervals(map), [
    [0, 4, 1],
    [6, 10, 1],
  ]);
  assert.equal(map.referencedBlocks, 8);
  assert.throws(() => map.addRef(-1, 1), invariant);
  assert.throws(() => map.addRef(0, 0), invariant);
  assert.throws(() => map.addRef(1.5, 1), invariant);
});

test("refcount: maxCount, minCount, countAt", () => {
  const map = new RefcountMap();
  map.addRef(10, 10);
  map.addRef(14, 2);
  assert.equal(map.maxCount(0, 10), 0);
  assert.equal(map.minCount(0, 10), 0);
  assert.equal(map.maxCount(0, 11), 1);
  assert.equal(map.minCount(0, 11), 0);
  assert.equal(map.maxCount(10, 10), 2);
  assert.equal(map.minCount(10, 10), 1);
  assert.equal(map.minCount(14, 2), 2);
  assert.equal(map.maxCount(15, 1), 2);
  assert.equal(map.minCount(19, 2), 0);
  assert.equal(map.countAt(9), 0);
  assert.equal(map.countAt(14), 2);
  assert.equal(map.countAt(19), 1);
  assert.equal(map.countAt(20), 0);
  map.addRef(25, 5);
  assert.equal(map.minCount(10, 20), 0, "gap between 20 and 25");
  map.clear();
  assert.equal(map.referencedBlocks, 0);
  assert.equal(map.maxCount(0, 100), 0);
});

test("free space: a hint that is free is used", () => {
  const space = new FreeSpace(4, 100);
  assert.equal(space.allocate(10, 50), 50);
  assert.equal(space.allocate(10, 60), 60, "sequential writes stay contiguous");
  assert.equal(space.allocate(10, 55), 70, "hint not free: next-fit from the cursor");
  assert.equal(space.allocate(1, 2), 80, "a hint below the first block is never used");
  space.checkInvariants();
});

test("free space: next-fit from the cursor, wrapping once, then growth", () => {
  const space = new FreeSpace(0, 0);
  for (let i = 0; i < 10; i++) assert.equal(space.allocate(10), i * 10);
  assert.equal(space.endBlock, 100);
  space.free(10, 10);
  space.free(50, 10);
  space.free(70, 5);
  // The cursor is at 100: nothing after it, wrap to the first fit.
  assert.equal(space.allocate(5), 10);
  assert.equal(space.allocate(5), 15, "the cursor moved to 15");
  assert.equal(space.allocate(8), 50);
  assert.equal(space.allocate(5), 70, "next-fit: 58..60 is too short");
  assert.equal(space.allocate(2), 58);
  assert.equal(space.freeBlocks, 0);
  assert.equal(space.allocate(3), 100, "nothing free: the file grows");
  assert.equal(space.endBlock, 103);
  space.checkInvariants();
});

test("free space: growth reuses a free range touching the end", () => {
  const space = new FreeSpace(0, 100);
  space.markUsed(0, 95);
  assert.equal(space.allocate(8), 95);
  assert.equal(space.endBlock, 103);
  assert.equal(space.freeBlocks, 0);
  space.checkInvariants();
});

test("free space: a long list of short ranges falls back to best fit", () => {
  const space = new FreeSpace(0, 0);
  const count = nextFitRangesScannedMax * 2;
  for (let i = 0; i < count; i++) space.allocate(2);
  space.allocate(20);
  space.allocate(10);
  space.allocate(2);
  for (let i = 0; i < count; i++) space.free(i * 2, 1); // 1-block holes
  const big = count * 2;
  space.free(big, 20);
  space.free(big + 20, 10); // coalesces: one 30-block hole
  space.free(big + 30, 1); // and with this one, touching: 31 blocks
  assert.equal(space.rangeCount, count + 1);
  assert.equal(space.allocate(8, 0), big, "reached through the size tree");
  space.checkInvariants();
});

test("free space: allocateUpTo", () => {
  const space = new FreeSpace(0, 2000);
  space.markUsed(0, 2000);
  space.free(100, 10);
  space.free(300, 300);
  space.free(1000, 100);
  assert.deepEqual(space.allocateUpTo(50, 105), [105, 5], "the run at the hint, however short");
  assert.deepEqual(space.allocateUpTo(1000, 0), [300, 300], "first run of at least the minimum");
  assert.deepEqual(space.allocateUpTo(50), [1000, 50], "a short request takes any run that fits it");
  assert.deepEqual(space.allocateUpTo(allocateUpToRunBlocksMin * 4), [2000, allocateUpToRunBlocksMin * 4]);
  assert.equal(space.endBlock, 2000 + allocateUpToRunBlocksMin * 4);
  space.checkInvariants();
});

test("free space: free coalesces and asserts double frees and out-of-file ranges", () => {
  const space = new FreeSpace(8, 64);
  space.markUsed(8, 56);
  space.free(10, 2);
  space.free(14, 2);
  space.free(12, 2);
  assert.deepEqual([...space.ranges()], [[10, 6]]);
  assert.throws(() => space.free(15, 2), invariant, "overlaps the end of a free range");
  assert.throws(() => space.free(8, 3), invariant, "overlaps the start of a free range");
  assert.throws(() => space.free(4, 2), invariant, "below the first allocatable block");
  assert.throws(() => space.free(60, 8), invariant, "past the end");
  assert.throws(() => space.markUsed(9, 2), invariant, "not entirely free");
  assert.deepEqual([...space.ranges()], [[10, 6]]);
  assert.equal(space.isFree(10, 6), true);
  assert.equal(space.isFree(10, 7), false);
  assert.equal(space.isFree(60, 4), false);
  assert.throws(() => space.allocate(0), invariant);
  space.checkInvariants();
});

test("free space: setEnd grows with a free tail, trimEnd cuts it", () => {
  const space = new FreeSpace(2, 10);
  space.markUsed(2, 8);
  space.setEnd(20);
  assert.deepEqual([...space.ranges()], [[10, 10]]);
  space.free(6, 4);
  assert.deepEqual([...space.ranges()], [[6, 14]]);
  assert.equal(space.trimEnd(), 6);
  assert.equal(space.endBlock, 6);
  assert.equal(space.freeBlocks, 0);
  assert.equal(space.trimEnd(), 6, "nothing to trim");
  assert.throws(() => space.setEnd(5), invariant, "setEnd only grows");
  space.checkInvariants();
});

test("free space: fromUsed builds the complement, asserts overlaps", () => {
  const space = FreeSpace.fromUsed(4, 40, [
    [20, 5],
    [0, 6], // the header, partly below the first allocatable block
    [25, 3], // touches the previous one
    [39, 1],
  ]);
  assert.deepEqual(
    [...space.ranges()],
    [
      [6, 14],
      [28, 11],
    ],
  );
  assert.equal(space.freeBlocks, 25);
  space.checkInvariants();
  assert.throws(
    () =>
      FreeSpace.fromUsed(0, 40, [
        [10, 5],
        [14, 2],
      ]),
    invariant,
  );
  assert.throws(() => FreeSpace.fromUsed(0, 40, [[38, 4]]), invariant, "past the end");
  assert.equal(FreeSpace.fromUsed(0, 0, []).freeBlocks, 0);
});

test("free space: growing past the image limit is NO_SPACE", () => {
  const space = new FreeSpace(0, imageBlocksMax - 4);
  space.markUsed(0, imageBlocksMax - 4);
  assert.throws(
    () => space.allocate(8),
    (err: unknown) => err instanceof VdiskError && err.code === "NO_SPACE",
  );
  assert.equal(space.endBlock, imageBlocksMax - 4, "unchanged");
  assert.equal(space.allocate(4), imageBlocksMax - 4);
  space.checkInvariants();
});

test("performance guard: 300k random 1-block addRef + maxCount", () => {
  const map = new RefcountMap();
  let seed = 12345;
  const random = (): number => {
    // xorshift32: deterministic, no dependency.
    seed ^= seed << 13;
    seed ^= seed >>> 17;
    seed ^= seed << 5;
    return (seed >>> 0) / 2 ** 32;
  };
  const operations = 300_000;
  const universeBlocks = 1 << 20;
  const startedMs = performance.now();
  let exclusive = 0;
  for (let i = 0; i < operations; i++) {
    const block = Math.floor(random() * universeBlocks);
    if (map.maxCount(block, 1) <= 1) exclusive++;
    map.addRef(block, 1);
  }
  const elapsedMs = performance.now() - startedMs;
  console.log(
    `300k addRef + maxCount: ${elapsedMs.toFixed(0)} ms, ${map.intervalCount} intervals, ${exclusive} exclusive`,
  );
  map.checkInvariants();
  assert.ok(elapsedMs < 3000, `took ${elapsedMs} ms`);
});
