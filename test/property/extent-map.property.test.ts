/**
 * Model-based property tests of the extent map against plain per-block arrays (small universes).
 *
 * RefcountMap: random addRef / decRef (only of blocks the model has referenced) / maxCount / minCount /
 * countAt / clear; after every step the invariants hold, the stored intervals are exactly the coalesced
 * model, every query agrees with the model, and decRef returns exactly the blocks that went to zero.
 *
 * FreeSpace: random allocate / allocateUpTo (with and without hints) / free (of used blocks) / markUsed
 * (of free blocks) / setEnd / trimEnd / isFree; after every step the invariants hold and the free ranges,
 * freeBlocks and endBlock equal the model. Allocations never overlap used blocks, are never below the
 * first allocatable block, and follow the policy: a free hint is taken, the file grows only when no free
 * run is long enough, and growth reuses a free range touching the end. fromUsed builds the complement of
 * shuffled, touching used ranges. fast-check prints the seed and the shrunk sequence of any failure.
 */
import { describe, it } from "node:test";
import * as assert from "node:assert/strict";
import fc from "fast-check";

import {
  allocateUpToRunBlocksMin,
  FreeSpace,
  RefcountMap,
  type BlockRange,
} from "../../src/image/extent-map";

/** Maximal runs of blocks where `predicate` holds, as [start, length]. */
function runsOf(size: number, predicate: (block: number) => boolean): BlockRange[] {
  const runs: BlockRange[] = [];
  for (let block = 0; block < size; block++) {
    if (!predicate(block)) continue;
    const last = runs[runs.length - 1];
    if (last !== undefined && last[0] + last[1] === block) last[1]++;
    else runs.push([block, 1]);
  }
  return runs;
}

// ---------------------------------------------------------------------------------------------------------
// RefcountMap

const refUniverseBlocks = 2048;

type RefOp =
  | { kind: "addRef"; start: number; length: number }
  | { kind: "decRef"; start: number; length: number }
  | { kind: "query"; start: number; length: number }
  | { kind: "clear" };

const refRange = (universe: number) =>
  fc
    .tuple(fc.integer({ min: 0, max: universe - 1 }), fc.integer({ min: 1, max: 96 }))
    .map(([start, length]) => ({ start, length: Math.min(length, universe - start) }));

function refOpArbitrary(universe: number): fc.Arbitrary<RefOp> {
  return fc.oneof(
    { weight: 5, arbitrary: refRange(universe).map((r) => ({ kind: "addRef" as const, ...r })) },
    { weight: 4, arbitrary: refRange(universe).map((r) => ({ kind: "decRef" as const, ...r })) },
    { weight: 3, arbitrary: refRange(universe).map((r) => ({ kind: "query" as const, ...r })) },
    { weight: 1, arbitrary: fc.constant({ kind: "clear" as const }) },
  );
}

function checkRefcounts(map: RefcountMap, model: number[]): void {
  map.checkInvariants();
  const expected: Array<[number, number, number]> = [];
  for (let block = 0; block < model.length; block++) {
    const count = model[block]!;
    if (count === 0) continue;
    const last = expected[expected.length - 1];
    if (last !== undefined && last[1] === block && last[2] === count) last[1]++;
    else expected.push([block, block + 1, count]);
  }
  assert.deepEqual([...map.entries()], expected);
  assert.equal(map.intervalCount, expected.length);
  assert.equal(map.referencedBlocks, model.filter((count) => count > 0).length);
}

function runRefcountOps(universe: number, ops: RefOp[]): void {
  const map = new RefcountMap();
  const model = new Array<number>(universe).fill(0);
  for (const op of ops) {
    switch (op.kind) {
      case "addRef":
        map.addRef(op.start, op.length);
        for (let b = op.start; b < op.start + op.length; b++) model[b]!++;
        break;
      case "decRef": {
        // Decrement the first referenced run at or after start (wrapping), clipped to op.length.
        let first = -1;
        for (let i = 0; i < universe; i++) {
          const block = (op.start + i) % universe;
          if (model[block]! > 0) {
            first = block;
            break;
          }
        }
        if (first < 0) break;
        let end = first;
        while (end < universe && end - first < op.length && model[end]! > 0) end++;
        const zeroed = map.decRef(first, end - first);
        for (let b = first; b < end; b++) model[b]!--;
        const expectedZeroed = runsOf(universe, (b) => b >= first && b < end && model[b] === 0);
        assert.deepEqual(zeroed, expectedZeroed);
        break;
      }
      case "query": {
        const counts = model.slice(op.start, op.start + op.length);
        assert.equal(map.maxCount(op.start, op.length), Math.max(...counts));
        assert.equal(map.minCount(op.start, op.length), Math.min(...counts));
        assert.equal(map.countAt(op.start), model[op.start]);
        break;
      }
      case "clear":
        map.clear();
        model.fill(0);
        break;
    }
    checkRefcounts(map, model);
  }
}

describe("RefcountMap against a per-block model", () => {
  it("random addRef / decRef / queries", () => {
    fc.assert(
      fc.property(fc.array(refOpArbitrary(refUniverseBlocks), { maxLength: 80 }), (ops) =>
        runRefcountOps(refUniverseBlocks, ops),
      ),
      { numRuns: 200 },
    );
  });

  it("a tiny universe (many overlaps and merges)", () => {
    fc.assert(
      fc.property(fc.array(refOpArbitrary(24), { maxLength: 120 }), (ops) => runRefcountOps(24, ops)),
      { numRuns: 300 },
    );
  });
});

// ---------------------------------------------------------------------------------------------------------
// FreeSpace

type Block = "used" | "free";

type SpaceOp =
  | { kind: "allocate"; length: number; hint: number | undefined }
  | { kind: "allocateUpTo"; maxLength: number; hint: number | undefined }
  | { kind: "free"; at: number; length: number }
  | { kind: "markUsed"; at: number; length: number }
  | { kind: "setEnd"; growth: number }
  | { kind: "trimEnd" }
  | { kind: "isFree"; at: number; length: number };

const spaceUniverseBlocks = 1024;
const hintArbitrary = fc.option(fc.integer({ min: 0, max: spaceUniverseBlocks }), { nil: undefined });
const spaceOpArbitrary: fc.Arbitrary<SpaceOp> = fc.oneof(
  {
    weight: 5,
    arbitrary: fc.record({
      kind: fc.constant("allocate" as const),
      length: fc.integer({ min: 1, max: 48 }),
      hint: hintArbitrary,
    }),
  },
  {
    weight: 2,
    arbitrary: fc.record({
      kind: fc.constant("allocateUpTo" as const),
      maxLength: fc.oneof(fc.integer({ min: 1, max: 32 }), fc.integer({ min: 200, max: 300 })),
      hint: hintArbitrary,
    }),
  },
  {
    weight: 5,
    arbitrary: fc.record({
      kind: fc.constant("free" as const),
      at: fc.nat(spaceUniverseBlocks),
      length: fc.integer({ min: 1, max: 64 }),
    }),
  },
  {
    weight: 2,
    arbitrary: fc.record({
      kind: fc.constant("markUsed" as const),
      at: fc.nat(spaceUniverseBlocks),
      length: fc.integer({ min: 1, max: 16 }),
    }),
  },
  { weight: 1, arbitrary: fc.record({ kind: fc.constant("setEnd" as const), growth: fc.nat(64) }) },
  { weight: 1, arbitrary: fc.constant({ kind: "trimEnd" as const }) },
  {
    weight: 2,
    arbitrary: fc.record({
      kind: fc.constant("isFree" as const),
      at: fc.nat(spaceUniverseBlocks),
      length: fc.integer({ min: 1, max: 32 }),
    }),
  },
);

/** The model: one state per block of [0, end); blocks below `first` are used (header). */
class SpaceModel {
  blocks: Block[];
  constructor(
    readonly first: number,
    end: number,
  ) {
    this.blocks = Array.from({ length: end }, (_, b) => (b < first ? "used" : "free"));
  }
  get end(): number {
    return this.blocks.length;
  }
  isFree(at: number, length: number): boolean {
    if (at + length > this.end) return false;
    for (let b = at; b < at + length; b++) if (this.blocks[b] !== "free") return false;
    return true;
  }
  /** Free blocks from `at` on (0 if `at` is used or past the end). */
  freeRunFrom(at: number): number {
    let b = at;
    while (b < this.end && this.blocks[b] === "free") b++;
    return b - at;
  }
  freeRuns(): BlockRange[] {
    return runsOf(this.end, (b) => this.blocks[b] === "free");
  }
  longestFreeRun(): number {
    return Math.max(0, ...this.freeRuns().map(([, length]) => length));
  }
  /** Start of the free range touching the end, or the end. */
  tailStart(): number {
    let b = this.end;
    while (b > this.first && this.blocks[b - 1] === "free") b--;
    return b;
  }
  /** Mark [at, at + length) used, growing the file as needed; every block must be free or new. */
  take(at: number, length: number): void {
    assert.ok(at >= this.first, `allocation ${at} below the first block ${this.first}`);
    for (let b = at; b < at + length; b++) {
      if (b < this.end) assert.equal(this.blocks[b], "free", `block ${b} allocated while used`);
    }
    while (this.blocks.length < at + length) this.blocks.push("free");
    for (let b = at; b < at + length; b++) this.blocks[b] = "used";
  }
  /** The first run of blocks in `state` at or after `at` (wrapping), clipped to `length`. */
  findRun(state: Block, at: number, length: number): BlockRange | undefined {
    for (let i = 0; i < this.end; i++) {
      const start = (at + i) % this.end;
      if (start < this.first || this.blocks[start] !== state) continue;
      let end = start;
      while (end < this.end && end - start < length && this.blocks[end] === state) end++;
      return [start, end - start];
    }
    return undefined;
  }
}

function checkSpace(space: FreeSpace, model: SpaceModel): void {
  space.checkInvariants();
  assert.equal(space.endBlock, model.end);
  assert.deepEqual([...space.ranges()], model.freeRuns());
  assert.equal(space.freeBlocks, model.blocks.filter((state) => state === "free").length);
}

/** Where an allocation that found no usable hint and no free run may land: the tail reuse or the end. */
function checkGrowth(model: SpaceModel, start: number): void {
  assert.equal(start, model.tailStart(), "growth starts at the free tail or the old end");
}

function runSpaceOps(first: number, end: number, ops: SpaceOp[]): void {
  const space = new FreeSpace(first, end);
  const model = new SpaceModel(first, end);
  checkSpace(space, model);
  for (const op of ops) {
    switch (op.kind) {
      case "allocate": {
        const hintFree =
          op.hint !== undefined &&
          op.hint >= first &&
          op.hint < model.end &&
          model.isFree(op.hint, op.length);
        const fits = model.longestFreeRun() >= op.length;
        const start = space.allocate(op.length, op.hint);
        if (hintFree) assert.equal(start, op.hint, "a free hint is taken");
        else if (fits) assert.ok(start + op.length <= model.end, "a free run exists: the file must not grow");
        else checkGrowth(model, start);
        model.take(start, op.length);
        break;
      }
      case "allocateUpTo": {
        const hintRun = op.hint !== undefined && op.hint >= first ? model.freeRunFrom(op.hint) : 0;
        const runMin = Math.min(op.maxLength, allocateUpToRunBlocksMin);
        const fits = model.longestFreeRun() >= runMin;
        const [start, length] = space.allocateUpTo(op.maxLength, op.hint);
        assert.ok(length >= 1 && length <= op.maxLength);
        if (hintRun > 0) {
          assert.deepEqual([start, length], [op.hint, Math.min(hintRun, op.maxLength)]);
        } else if (fits) {
          assert.ok(
            start === first || model.blocks[start - 1] === "used",
            "takes a free range from its start",
          );
          assert.equal(length, Math.min(op.maxLength, model.freeRunFrom(start)));
          assert.ok(length >= runMin);
        } else {
          assert.equal(length, op.maxLength);
          checkGrowth(model, start);
        }
        model.take(start, length);
        break;
      }
      case "free": {
        const run = model.findRun("used", op.at % Math.max(model.end, 1), op.length);
        if (run === undefined) break;
        space.free(run[0], run[1]);
        for (let b = run[0]; b < run[0] + run[1]; b++) model.blocks[b] = "free";
        break;
      }
      case "markUsed": {
        const run = model.findRun("free", op.at % Math.max(model.end, 1), op.length);
        if (run === undefined) break;
        space.markUsed(run[0], run[1]);
        model.take(run[0], run[1]);
        break;
      }
      case "setEnd":
        space.setEnd(model.end + op.growth);
        for (let i = 0; i < op.growth; i++) model.blocks.push("free");
        break;
      case "trimEnd": {
        const newEnd = model.tailStart();
        assert.equal(space.trimEnd(), newEnd);
        model.blocks.length = newEnd;
        break;
      }
      case "isFree":
        assert.equal(space.isFree(op.at, op.length), op.at >= first && model.isFree(op.at, op.length));
        break;
    }
    checkSpace(space, model);
  }
}

describe("FreeSpace against a per-block model", () => {
  it("random allocate / allocateUpTo / free / markUsed / setEnd / trimEnd / isFree", () => {
    fc.assert(
      fc.property(
        fc.integer({ min: 0, max: 16 }),
        fc.integer({ min: 0, max: 512 }),
        fc.array(spaceOpArbitrary, { maxLength: 80 }),
        (first, extra, ops) => runSpaceOps(first, first + extra, ops),
      ),
      { numRuns: 250 },
    );
  });

  it("fromUsed is the complement of shuffled, touching used ranges", () => {
    fc.assert(
      fc.property(
        fc.integer({ min: 0, max: 16 }),
        fc.array(fc.tuple(fc.nat(40), fc.integer({ min: 1, max: 40 })), { maxLength: 40 }),
        fc.nat(64),
        fc.infiniteStream(fc.nat()),
        (first, pieces, tail, shuffle) => {
          // Lay the pieces out as [gap, used] pairs from block 0; gaps of 0 make used ranges touch.
          const used: BlockRange[] = [];
          let position = 0;
          for (const [gap, length] of pieces) {
            used.push([position + gap, length]);
            position += gap + length;
          }
          const end = Math.max(position, first) + tail;
          const order = used.map((range, i) => ({ range, key: shuffle.next().value as number, i }));
          order.sort((a, b) => a.key - b.key || a.i - b.i);
          const space = FreeSpace.fromUsed(
            first,
            end,
            order.map(({ range }) => range),
          );
          space.checkInvariants();
          const isUsed = (b: number): boolean => b < first || used.some(([s, l]) => b >= s && b < s + l);
          assert.deepEqual(
            [...space.ranges()],
            runsOf(end, (b) => !isUsed(b)),
          );
          assert.equal(space.endBlock, end);
        },
      ),
      { numRuns: 300 },
    );
  });

  it("fromUsed asserts overlapping used ranges", () => {
    fc.assert(
      fc.property(
        fc.nat(100),
        fc.integer({ min: 2, max: 50 }),
        fc.integer({ min: 1, max: 50 }),
        (start, length, later) => {
          const overlapping: BlockRange = [start + Math.min(later, length - 1), 3];
          assert.throws(
            () => FreeSpace.fromUsed(0, 200, [overlapping, [start, length]]),
            /invariant violated/,
          );
        },
      ),
    );
  });
});
