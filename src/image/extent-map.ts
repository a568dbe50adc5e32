/**
 * Space bookkeeping of the copy-on-write image file: who references which block, and which blocks are free.
 *
 * Every quantity here is in BLOCKS, the 4 KiB allocation unit of the image file, held as a JS integer.
 * A block number times `imageBlockBytes` must stay a safe integer, so the image is limited to
 * `imageBlocksMax` blocks (4 PiB); growing past it is a user-facing NO_SPACE error, everything else that
 * goes wrong in here is a bug and fails an `assert`.
 *
 * RefcountMap — per-block reference counts as disjoint, coalesced intervals kept in a B+ tree:
 *
 *     start → { end, count }      [start, end) has `count` ≥ 1 references; absent blocks have 0
 *
 *     blocks:  0 1 2 3 4 5 6 7 8 9
 *     counts:  . 1 1 2 2 2 1 . . 1      →  {1→[3,1]} {3→[6,2]} {6→[7,1]} {9→[10,1]}
 *
 *   Invariants: intervals are non-empty and disjoint; two intervals that touch (a.end == b.start) never have
 *   the same count (they would be one interval); `referencedBlocks` is the sum of the interval lengths.
 *   An update of [start, end) reads the k intervals it touches (plus the neighbour on each side, for
 *   merging), computes their replacement and only then writes it back, so it costs O((k + 1) · log n) and a
 *   failed assertion leaves the map unchanged. The hot-path queries `maxCount` / `minCount` ("is this range
 *   exclusively ours, so it can be overwritten in place?") are O(log n + k) and allocate nothing per interval.
 *
 * FreeSpace — the free blocks of [firstAllocatableBlock, endBlock) as coalesced ranges, in two B+ trees:
 *
 *     byStart:  start → end               address order: next-fit search, coalescing, isFree
 *     bySize:   [length, start] → -       size order: "is there any run ≥ L?" in O(log n), best-fit fallback
 *
 *   Invariants: ranges are non-empty, inside [firstAllocatableBlock, endBlock), and never touch (touching
 *   ranges are one range); both trees hold exactly the same ranges; `freeBlocks` is the sum of the lengths.
 *   Allocation policy (`allocate`): the hinted range if it is entirely free (keeps sequential writes
 *   contiguous); else next-fit: the first range at or after a rotating cursor that is long enough, wrapping
 *   once — scanning at most `nextFitRangesScannedMax` ranges, after which the smallest long-enough range is
 *   taken from the size tree (a bounded loop instead of an O(n) walk on a fragmented image); else the file
 *   grows, reusing a free range that touches the end. Double frees and frees outside the file are asserted.
 */
import BTree from "sorted-btree";

import { assert, VdiskError } from "../errors";

/** Bytes in one block of the image file. */
export const imageBlockBytes = 4096;
/** The image file may grow to this many blocks: block × imageBlockBytes stays a safe integer (4 PiB). */
export const imageBlocksMax = 2 ** 40;
/** Next-fit: free ranges examined from the cursor before falling back to the size tree. */
export const nextFitRangesScannedMax = 64;
/** allocateUpTo: a free run shorter than this (and shorter than the request) is skipped (1 MiB). */
export const allocateUpToRunBlocksMin = 256;

assert(Number.isSafeInteger(imageBlocksMax * imageBlockBytes), "image byte offsets must be safe integers");
assert(Number.isSafeInteger(2 * imageBlocksMax), "start + length of any range must be a safe integer");
assert(nextFitRangesScannedMax >= 1, "next-fit scans at least one range");
assert(allocateUpToRunBlocksMin >= 1, "allocateUpTo run minimum is positive");

/** [start, length] of a run of blocks. */
export type BlockRange = [start: number, length: number];

function assertRange(start: number, length: number, what: string): void {
  assert(Number.isSafeInteger(start) && start >= 0, `${what}: start ${start} is not a block number`);
  assert(Number.isSafeInteger(length) && length >= 1, `${what}: length ${length} is not a positive count`);
  assert(start + length <= imageBlocksMax, `${what}: [${start}, +${length}) beyond ${imageBlocksMax} blocks`);
}

interface Interval {
  end: number;
  count: number;
}

/** Per-block reference counts as coalesced intervals. See the module note. */
export class RefcountMap {
  private readonly tree = new BTree<number, Interval>();
  private referenced = 0;
  // Scratch space of applyDelta and the queries (synchronous, never shared across calls): fewer
  // allocations on the hot path. `touched` and `replacement` hold flat [start, end, count] triples.
  private readonly pairScratch: [number, Interval] = [0, { end: 0, count: 0 }];
  private readonly entryScratch: Array<number | Interval> = [];
  private readonly touched: number[] = [];
  private readonly replacement: number[] = [];
  private zeroed: BlockRange[] | undefined = undefined;
  private referencedChange = 0;

  /** Total blocks with a count ≥ 1. */
  get referencedBlocks(): number {
    return this.referenced;
  }

  /** Number of stored intervals (a measure of fragmentation). */
  get intervalCount(): number {
    return this.tree.size;
  }

  /** +1 on every block of [start, start + length). */
  addRef(start: number, length: number): void {
    assertRange(start, length, "addRef");
    this.applyDelta(start, start + length, 1, undefined);
  }

  /**
   * −1 on every block of [start, start + length); every block must be referenced. Returns the sub-ranges
   * whose count reached 0, merged and ascending.
   */
  decRef(start: number, length: number): BlockRange[] {
    assertRange(start, length, "decRef");
    const zeroed: BlockRange[] = [];
    this.applyDelta(start, start + length, -1, zeroed);
    return zeroed;
  }

  /** Largest count over the range; 0 when no block of it is referenced. O(log n + k). */
  maxCount(start: number, length: number): number {
    assertRange(start, length, "maxCount");
    const end = start + length;
    // Fast path, one descent: no interval starts inside (start, end), so at most one overlaps.
    const last = this.tree.getPairOrNextLower(end - 1, this.pairScratch);
    if (last === undefined) return 0;
    if (last[0] <= start) return last[1].end > start ? last[1].count : 0;
    let max = last[1].count;
    const before = this.tree.getPairOrNextLower(start, this.pairScratch);
    if (before !== undefined && before[1].end > start && before[1].count > max) max = before[1].count;
    this.tree.forRange(start, end, false, (_key, interval) => {
      if (interval.count > max) max = interval.count;
    });
    return max;
  }

  /** Smallest count over the range; 0 when any block of it is unreferenced. O(log n + k). */
  minCount(start: number, length: number): number {
    assertRange(start, length, "minCount");
    const end = start + length;
    const covering = this.tree.getPairOrNextLower(start, this.pairScratch);
    if (covering === undefined || covering[1].end <= start) return 0;
    let min = covering[1].count;
    let covered = covering[1].end;
    if (covered >= end) return min;
    for (const [key, interval] of this.tree.entries(covered, this.entryScratch)) {
      if (key !== covered) return 0; // a gap of unreferenced blocks
      if (interval.count < min) min = interval.count;
      covered = interval.end;
      if (covered >= end) return min;
    }
    return 0;
  }

  /** The count of one block. */
  countAt(block: number): number {
    assertRange(block, 1, "countAt");
    const covering = this.tree.getPairOrNextLower(block, this.pairScratch);
    return covering !== undefined && covering[1].end > block ? covering[1].count : 0;
  }

  /** The intervals ascending, as [start, end, count]. */
  *entries(): IterableIterator<[start: number, end: number, count: number]> {
    for (const [start, interval] of this.tree.entries()) yield [start, interval.end, interval.count];
  }

  clear(): void {
    this.tree.clear();
    this.referenced = 0;
  }

  /** Check every invariant of the module note; O(n). For tests and debug builds. */
  checkInvariants(): void {
    let total = 0;
    let previous: [number, Interval] | undefined;
    for (const [start, interval] of this.tree.entries()) {
      assert(Number.isSafeInteger(start) && start >= 0, `refcount: bad start ${start}`);
      assert(
        Number.isSafeInteger(interval.end) && interval.end > start,
        `refcount: empty interval at ${start}`,
      );
      assert(
        Number.isSafeInteger(interval.count) && interval.count >= 1,
        `refcount: count ${interval.count}`,
      );
      if (previous !== undefined) {
        assert(previous[1].end <= start, `refcount: intervals overlap at ${start}`);
        assert(
          previous[1].end < start || previous[1].count !== interval.count,
          `refcount: touching intervals with equal count at ${start}`,
        );
      }
      total += interval.end - start;
      previous = [start, interval];
    }
    assert(total === this.referenced, `refcount: referencedBlocks ${this.referenced} != ${total}`);
  }

  /**
   * Add `delta` to every block of [start, end). Reads the intervals overlapping or touching the range,
   * builds their coalesced replacement (asserting before anything is changed), then swaps it in: keys that
   * survive are overwritten, the others deleted.
   */
  private applyDelta(start: number, end: number, delta: 1 | -1, zeroed: BlockRange[] | undefined): void {
    const touched = this.touched;
    const replacement = this.replacement;
    touched.length = 0;
    replacement.length = 0;
    this.zeroed = zeroed;
    this.referencedChange = 0;

    const last = this.tree.getPairOrNextLower(end, this.pairScratch);
    if (last === undefined || last[0] < start) {
      // Fast path, one descent: no interval starts in [start, end]; only `last` can overlap or touch.
      if (last !== undefined && last[1].end >= start) touched.push(last[0], last[1].end, last[1].count);
    } else {
      const before = this.tree.nextLowerPair(start, this.pairScratch);
      if (before !== undefined && before[1].end >= start)
        touched.push(before[0], before[1].end, before[1].count);
      this.tree.forRange(start, end, true, (key, interval) => {
        touched.push(key, interval.end, interval.count);
      });
    }

    let position = start; // blocks of [start, end) below this have been emitted
    for (let i = 0; i < touched.length; i += 3) {
      const from = touched[i]!;
      const to = touched[i + 1]!;
      const count = touched[i + 2]!;
      this.emit(from, Math.min(to, start), count); // part before the range (only the left neighbour has one)
      this.emitGap(position, Math.min(from, end), delta);
      const overlapFrom = Math.max(from, start);
      const overlapTo = Math.min(to, end);
      if (overlapFrom < overlapTo) {
        this.emit(overlapFrom, overlapTo, count + delta);
        position = overlapTo;
      }
      position = Math.max(position, Math.min(from, end));
      this.emit(Math.max(from, end), to, count); // part after the range
    }
    this.emitGap(position, end, delta);

    // Both lists ascend: walk them together to delete the keys that do not survive.
    let r = 0;
    for (let i = 0; i < touched.length; i += 3) {
      const key = touched[i]!;
      while (r < replacement.length && replacement[r]! < key) r += 3;
      if (r >= replacement.length || replacement[r] !== key) this.tree.delete(key);
    }
    for (let i = 0; i < replacement.length; i += 3) {
      this.tree.set(replacement[i]!, { end: replacement[i + 1]!, count: replacement[i + 2]! });
    }
    this.referenced += this.referencedChange;
    this.zeroed = undefined;
  }

  /** Append [from, to) with `count` to the replacement, merging with the previous piece; 0 is recorded. */
  private emit(from: number, to: number, count: number): void {
    if (from >= to) return;
    if (count === 0) {
      this.referencedChange -= to - from;
      const zeroed = this.zeroed;
      if (zeroed !== undefined) {
        const last = zeroed[zeroed.length - 1];
        if (last !== undefined && last[0] + last[1] === from) last[1] += to - from;
        else zeroed.push([from, to - from]);
      }
      return;
    }
    const replacement = this.replacement;
    const n = replacement.length;
    if (n > 0 && replacement[n - 2] === from && replacement[n - 1] === count) replacement[n - 2] = to;
    else replacement.push(from, to, count);
  }

  /** Unreferenced blocks [from, to) inside the updated range: only addRef may meet them. */
  private emitGap(from: number, to: number, delta: 1 | -1): void {
    if (from >= to) return;
    assert(delta > 0, `decRef: blocks [${from}, ${to}) are not referenced`);
    this.referencedChange += to - from;
    this.emit(from, to, delta);
  }
}

/** Free block ranges of the image file. See the module note. */
export class FreeSpace {
  readonly firstAllocatableBlock: number;
  /** The file may not grow past this block (its device's region end: format.ts DEVICE_REGION_BLOCKS). */
  readonly limitBlock: number;
  private end: number;
  private freeTotal = 0;
  private cursor: number;
  private readonly byStart = new BTree<number, number>();
  private readonly bySize = new BTree<[number, number], undefined>(
    undefined,
    (a, b) => a[0] - b[0] || a[1] - b[1],
  );

  /** All of [firstAllocatableBlock, endBlock) starts free; the file may grow up to `limitBlock`. */
  constructor(firstAllocatableBlock: number, endBlock: number, limitBlock = imageBlocksMax) {
    assert(
      Number.isSafeInteger(firstAllocatableBlock) && firstAllocatableBlock >= 0,
      `free space: bad first block ${firstAllocatableBlock}`,
    );
    assert(
      Number.isSafeInteger(endBlock) && endBlock >= firstAllocatableBlock && endBlock <= imageBlocksMax,
      `free space: bad end ${endBlock}`,
    );
    assert(
      Number.isSafeInteger(limitBlock) && limitBlock >= endBlock && limitBlock <= imageBlocksMax,
      `free space: bad limit ${limitBlock}`,
    );
    this.firstAllocatableBlock = firstAllocatableBlock;
    this.limitBlock = limitBlock;
    this.end = endBlock;
    this.cursor = firstAllocatableBlock;
    if (endBlock > firstAllocatableBlock) this.insertRange(firstAllocatableBlock, endBlock);
  }

  /** The free set of [first, end) minus `usedRanges` (any order; may touch, must not overlap; parts below
   *  `first`, such as the header, are ignored; nothing may reach past `end`). */
  static fromUsed(
    first: number,
    end: number,
    usedRanges: Iterable<BlockRange>,
    limit = imageBlocksMax,
  ): FreeSpace {
    assert(Number.isSafeInteger(end) && end >= first && end <= limit, `free space: bad end ${end}`);
    const space = new FreeSpace(first, first, limit); // empty; the complement is inserted below
    space.end = end;
    const used: BlockRange[] = [];
    for (const [start, length] of usedRanges) {
      assertRange(start, length, "fromUsed");
      assert(start + length <= end, `fromUsed: [${start}, +${length}) reaches past the end ${end}`);
      used.push([start, length]);
    }
    used.sort((a, b) => a[0] - b[0]);
    let position = first; // everything below is used or before first
    let previousEnd = 0;
    for (const [start, length] of used) {
      assert(start >= previousEnd, `fromUsed: used ranges overlap at block ${start}`);
      previousEnd = start + length;
      if (start > position) space.insertRange(position, start);
      position = Math.max(position, previousEnd);
    }
    if (end > position) space.insertRange(position, end);
    return space;
  }

  /** The current end of the image file, in blocks. */
  get endBlock(): number {
    return this.end;
  }

  /** Total free blocks. */
  get freeBlocks(): number {
    return this.freeTotal;
  }

  /** Number of free ranges (a measure of fragmentation). */
  get rangeCount(): number {
    return this.byStart.size;
  }

  /**
   * A contiguous run of `length` free blocks; returns its start. Policy in the module note; grows the file
   * when no free run is long enough (NO_SPACE past `imageBlocksMax`).
   */
  allocate(length: number, hint?: number): number {
    assertRange(this.firstAllocatableBlock, length, "allocate");
    if (hint !== undefined && this.hintIsUsable(hint) && this.isFree(hint, length)) {
      this.carve(hint, length);
      return hint;
    }
    const found = this.findRun(length);
    if (found !== undefined) {
      this.carve(found, length);
      return found;
    }
    return this.extend(length);
  }

  /**
   * Up to `maxLength` contiguous free blocks, for large writes that may be split: the free run starting at
   * `hint` (however short), else the first free run of at least min(maxLength, allocateUpToRunBlocksMin)
   * blocks (next-fit), else the file grows by what is missing for `maxLength`. Returns [start, length].
   */
  allocateUpTo(maxLength: number, hint?: number): BlockRange {
    assertRange(this.firstAllocatableBlock, maxLength, "allocateUpTo");
    if (hint !== undefined && this.hintIsUsable(hint)) {
      const covering = this.byStart.getPairOrNextLower(hint);
      if (covering !== undefined && covering[1] > hint) {
        const length = Math.min(maxLength, covering[1] - hint);
        this.carve(hint, length);
        return [hint, length];
      }
    }
    const found = this.findRun(Math.min(maxLength, allocateUpToRunBlocksMin));
    if (found !== undefined) {
      const length = Math.min(maxLength, this.byStart.get(found)! - found);
      this.carve(found, length);
      return [found, length];
    }
    return [this.extend(maxLength), maxLength];
  }

  /** Return [start, start + length) to the free set; it must be inside the file and fully in use. */
  free(start: number, length: number): void {
    assertRange(start, length, "free");
    const end = start + length;
    assert(
      start >= this.firstAllocatableBlock && end <= this.end,
      `free: [${start}, ${end}) outside the file`,
    );
    const before = this.byStart.nextLowerPair(end);
    assert(before === undefined || before[1] <= start, `free: double free in [${start}, ${end})`);
    this.insertRange(start, end);
  }

  /** Take [start, start + length) out of the free set (rebuilding at open); it must be entirely free. */
  markUsed(start: number, length: number): void {
    assertRange(start, length, "markUsed");
    assert(this.isFree(start, length), `markUsed: [${start}, +${length}) is not entirely free`);
    this.carve(start, length);
  }

  /** Whether every block of [start, start + length) is free (blocks at or past the end are not). */
  isFree(start: number, length: number): boolean {
    assertRange(start, length, "isFree");
    const covering = this.byStart.getPairOrNextLower(start);
    return covering !== undefined && covering[1] >= start + length;
  }

  /** Grow the file to `newEnd` blocks; the new tail is free. Shrinking goes through `trimEnd`. */
  setEnd(newEnd: number): void {
    assert(Number.isSafeInteger(newEnd) && newEnd >= this.end, `setEnd: ${newEnd} below the end ${this.end}`);
    this.assertCanGrowTo(newEnd);
    if (newEnd === this.end) return;
    const oldEnd = this.end;
    this.end = newEnd;
    this.insertRange(oldEnd, newEnd);
  }

  /** If the last free range touches the end, cut the file back to its start. Returns the (new) end. */
  trimEnd(): number {
    const last = this.byStart.nextLowerPair(undefined);
    if (last !== undefined && last[1] === this.end) {
      this.removeRange(last[0], last[1]);
      this.end = last[0];
    }
    return this.end;
  }

  /** The free ranges ascending, as [start, length]. */
  *ranges(): IterableIterator<BlockRange> {
    for (const [start, end] of this.byStart.entries()) yield [start, end - start];
  }

  /** Check every invariant of the module note; O(n). For tests and debug builds. */
  checkInvariants(): void {
    assert(
      this.end >= this.firstAllocatableBlock && this.end <= this.limitBlock,
      `free space: end ${this.end}`,
    );
    let total = 0;
    let previousEnd = -1;
    for (const [start, end] of this.byStart.entries()) {
      assert(start >= this.firstAllocatableBlock, `free space: range ${start} below the first block`);
      assert(end > start, `free space: empty range at ${start}`);
      assert(end <= this.end, `free space: range [${start}, ${end}) past the end ${this.end}`);
      assert(start > previousEnd, `free space: ranges overlap or touch at ${start}`);
      assert(
        this.bySize.has([end - start, start]),
        `free space: [${start}, ${end}) missing from the size tree`,
      );
      total += end - start;
      previousEnd = end;
    }
    assert(this.bySize.size === this.byStart.size, "free space: size tree and start tree differ");
    assert(total === this.freeTotal, `free space: freeBlocks ${this.freeTotal} != ${total}`);
  }

  private hintIsUsable(hint: number): boolean {
    assert(Number.isSafeInteger(hint) && hint >= 0, `allocation hint ${hint} is not a block number`);
    return hint >= this.firstAllocatableBlock && hint < this.end;
  }

  /** Start of a free range of at least `length` blocks, or undefined. Moves nothing. */
  private findRun(length: number): number | undefined {
    const longest = this.bySize.maxKey();
    if (longest === undefined || longest[0] < length) return undefined;
    let scanned = 0;
    for (const [start, end] of this.byStart.entries(this.cursor)) {
      if (end - start >= length) return start;
      if (++scanned >= nextFitRangesScannedMax) return this.bestFit(length);
    }
    for (const [start, end] of this.byStart.entries()) {
      if (start >= this.cursor) break;
      if (end - start >= length) return start;
      if (++scanned >= nextFitRangesScannedMax) return this.bestFit(length);
    }
    assert(false, `free space: the size tree promised a run of ${length} blocks that next-fit missed`);
  }

  /** The smallest free range of at least `length` blocks (lowest start among equals). */
  private bestFit(length: number): number {
    const pair = this.bySize.getPairOrNextHigher([length, -1]);
    assert(pair !== undefined, `free space: no run of ${length} blocks in the size tree`);
    return pair[0][1];
  }

  /** Allocate at the end of the file, reusing a free range that touches it. Returns the start. */
  private extend(length: number): number {
    const last = this.byStart.nextLowerPair(undefined);
    const start = last !== undefined && last[1] === this.end ? last[0] : this.end;
    this.assertCanGrowTo(start + length);
    if (start < this.end) {
      assert(start + length > this.end, `extend: the free tail at ${start} already holds ${length} blocks`);
      this.removeRange(start, this.end);
    }
    this.end = start + length;
    this.cursor = start + length;
    return start;
  }

  private assertCanGrowTo(newEnd: number): void {
    if (newEnd > this.limitBlock) {
      throw new VdiskError(
        "NO_SPACE",
        `the image file would grow to ${newEnd - this.firstAllocatableBlock} blocks, beyond its limit`,
      );
    }
  }

  /** Remove [start, start + length) from the free range that contains it; moves the next-fit cursor. */
  private carve(start: number, length: number): void {
    const end = start + length;
    const covering = this.byStart.getPairOrNextLower(start);
    assert(covering !== undefined && covering[1] >= end, `allocation of [${start}, ${end}) is not free`);
    const [rangeStart, rangeEnd] = covering;
    this.removeRange(rangeStart, rangeEnd);
    if (rangeStart < start) this.addRangeRaw(rangeStart, start);
    if (end < rangeEnd) this.addRangeRaw(end, rangeEnd);
    this.cursor = end;
  }

  /** Add [start, end), known not to overlap, merging with the neighbours it touches. */
  private insertRange(start: number, end: number): void {
    let mergedStart = start;
    let mergedEnd = end;
    const before = this.byStart.nextLowerPair(start);
    if (before !== undefined && before[1] === start) {
      mergedStart = before[0];
      this.removeRange(before[0], before[1]);
    }
    const after = this.byStart.get(end);
    if (after !== undefined) {
      mergedEnd = after;
      this.removeRange(end, after);
    }
    this.addRangeRaw(mergedStart, mergedEnd);
  }

  private addRangeRaw(start: number, end: number): void {
    assert(start < end, `free space: empty range at ${start}`);
    this.byStart.set(start, end);
    this.bySize.set([end - start, start], undefined);
    this.freeTotal += end - start;
  }

  private removeRange(start: number, end: number): void {
    const removed = this.byStart.delete(start) && this.bySize.delete([end - start, start]);
    assert(removed, `free space: range [${start}, ${end}) not found`);
    this.freeTotal -= end - start;
  }
}
