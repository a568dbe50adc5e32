/**
 * DiskHeat: per-extent heat of one disk, and its decayed workload profile.
 *
 * The disk is cut into extents of `heatExtentBytesFor(size)` bytes: 1 MiB (limits.heatExtentBytesMin),
 * doubled until the disk has at most limits.heatExtentsMax (65,536) extents — 1 MiB up to 64 GiB,
 * 2 MiB up to 128 GiB, …, 64 GiB extents for the 4 PiB maximum. A read or write adds 1 to the heat of
 * every extent it touches (an access count, not bytes: the fast class pays off per I/O — a 4 KiB random
 * read gains as much from it as a 1 MiB one — so a byte weight would rank an extent read once in one large
 * request above one hammered by small random reads, the opposite of what placement wants). Heat decays
 * exponentially with a half-life H (limits.heatHalfLifeSecondsDefault, 60 s):
 *
 *     heat_e(now) = Σ over accesses a of e: 2^(−(now − t_a) / H)
 *
 * Stored as forward decay (Cormode et al., "Forward decay", ICDE 2009), which is the lazy
 * value-and-timestamp scheme with the timestamp factored out: each access adds w(t) = 2^((t − epoch) / H)
 * to `scaled[e]`, and heat_e(now) = scaled[e] · 2^(−(now − epoch) / H). So a request costs at most one
 * `pow` however many extents it touches, no per-extent timestamp is needed (8 bytes per extent, not 16),
 * and extents rank by `scaled` without any `pow`. Accesses are timestamped to the millisecond
 * (HEAT_TICK_MS): w is computed once per tick and reused by every request of that tick, which makes an
 * access look up to 1 ms older than it is (heat low by at most a factor 2^(−1 ms / H), 1.2e−5 at 60 s). Before w could overflow the epoch moves to now and every
 * value is multiplied by 2^(−age/H) (`renormalize`, once per RENORMALIZE_HALF_LIVES half-lives, i.e.
 * every ~4 h at 60 s: one pass over the extents).
 *
 * The profile is the same decay over eight counters: reads and writes, each sequential or random, small
 * (≤ limits.profileSmallBytesMax) or large. Memory: 8 bytes per extent (≤ 512 KiB per disk) plus 64 B.
 *
 * Invariants: extentBytes is a power of two ≥ heatExtentBytesMin; extentCount ≤ heatExtentsMax and
 * extentCount · extentBytes ≥ the largest size seen; every scaled value is finite and ≥ 0.
 */
import { assert } from "../errors";
import { heatExtentBytesMin, heatExtentsMax } from "../limits";
import type { ExtentHeatStats, ProfileStats } from "./types";

/** Half-lives between renormalisations: w stays below 2^256, far from the float limit 2^1024. */
export const RENORMALIZE_HALF_LIVES = 256;
/** Accesses are timestamped to this grid (milliseconds): one `pow` per tick at most. */
export const HEAT_TICK_MS = 1;

/** Profile classes: op (read 0, write 4) + sequential (0) / random (2) + small (0) / large (1). */
export const PROFILE_READ = 0;
export const PROFILE_WRITE = 4;
export const PROFILE_RANDOM = 2;
export const PROFILE_LARGE = 1;
const PROFILE_CLASSES = 8;

/** The heat extent size for a disk of `sizeBytes` (see the module note). */
export function heatExtentBytesFor(sizeBytes: number): number {
  let extentBytes = heatExtentBytesMin;
  while (Math.ceil(sizeBytes / extentBytes) > heatExtentsMax) extentBytes *= 2;
  return extentBytes;
}

/** What other daemon code (placement policies) reads about a disk's heat; times are the monitor's clock. */
export interface DiskHeatView {
  readonly extentBytes: number;
  readonly extentCount: number;
  readonly halfLifeSeconds: number;
  /** The `count` hottest extents with heat > 0, hottest first (ties: lower offset first). */
  hottest(count: number): ExtentHeatStats[];
  /** Sum of the heat of the extents overlapping [offset, offset + length). */
  rangeHeat(offset: number, length: number): number;
  /** Sum of the heat of every extent. */
  total(): number;
  /** The decayed workload profile. */
  profile(): ProfileStats;
  /** Reads and writes recorded so far: unchanged means nothing happened to the heat but decay. */
  readonly recorded: number;
}

export class DiskHeat {
  /** Calls of `record`. */
  recorded = 0;
  extentBytes: number;
  extentCount: number;
  /** 1 / extentBytes, exact (a power of two): extent = floor(offset · it). */
  private extentsPerByte: number;
  private scaled: Float64Array;
  private totalScaled = 0;
  private readonly profileScaled = new Float64Array(PROFILE_CLASSES);
  private epochMs: number;
  private readonly halfLifeMs: number;
  /** The tick whose weight is cached (-Infinity: none). */
  private tick = -Infinity;
  private tickWeight = 0;

  constructor(
    sizeBytes: number,
    readonly halfLifeSeconds: number,
    nowMs: number,
  ) {
    assert(halfLifeSeconds > 0 && Number.isFinite(halfLifeSeconds), "heat half-life > 0");
    this.halfLifeMs = halfLifeSeconds * 1000;
    this.extentBytes = heatExtentBytesFor(sizeBytes);
    this.extentsPerByte = 1 / this.extentBytes;
    this.extentCount = Math.max(1, Math.ceil(sizeBytes / this.extentBytes));
    this.scaled = new Float64Array(this.extentCount);
    this.epochMs = nowMs;
  }

  /** Bytes the extents cover. */
  get coverageBytes(): number {
    return this.extentCount * this.extentBytes;
  }

  get memoryBytes(): number {
    return this.scaled.byteLength + this.profileScaled.byteLength;
  }

  /** The weight of an event at `nowMs`: that of its tick, cached (renormalising when it grows too large). */
  private weight(nowMs: number): number {
    const tick = Math.floor(nowMs / HEAT_TICK_MS) * HEAT_TICK_MS;
    if (tick === this.tick) return this.tickWeight;
    if (tick - this.epochMs > RENORMALIZE_HALF_LIVES * this.halfLifeMs) this.renormalize(tick);
    this.tick = tick;
    return (this.tickWeight = Math.pow(2, (tick - this.epochMs) / this.halfLifeMs));
  }

  /** The factor turning scaled values into heat at `nowMs`. */
  private decay(nowMs: number): number {
    return Math.pow(2, (this.epochMs - nowMs) / this.halfLifeMs);
  }

  private renormalize(nowMs: number): void {
    const factor = this.decay(nowMs);
    const scaled = this.scaled;
    let total = 0;
    for (let i = 0; i < scaled.length; i++) {
      const value = (scaled[i] as number) * factor;
      scaled[i] = value;
      total += value;
    }
    this.totalScaled = total;
    for (let i = 0; i < PROFILE_CLASSES; i++)
      this.profileScaled[i] = (this.profileScaled[i] as number) * factor;
    this.epochMs = nowMs;
    this.tick = -Infinity;
  }

  /**
   * A read or write of [offset, offset + length) at `nowMs`, of profile class `profileClass`. The part
   * beyond the covered bytes is ignored (call `grow` first when the disk got larger).
   */
  record(offset: number, length: number, profileClass: number, nowMs: number): void {
    this.recorded++;
    const w = this.weight(nowMs);
    this.profileScaled[profileClass] = (this.profileScaled[profileClass] as number) + w;
    if (length <= 0) return;
    const first = Math.floor(offset * this.extentsPerByte);
    let last = Math.floor((offset + length - 1) * this.extentsPerByte);
    if (last >= this.extentCount) last = this.extentCount - 1;
    if (first > last) return;
    const scaled = this.scaled;
    for (let i = first; i <= last; i++) scaled[i] = (scaled[i] as number) + w;
    this.totalScaled += w * (last - first + 1);
  }

  /** Cover a disk of `sizeBytes` (it grew): coarser extents if needed, the heat carried over. */
  grow(sizeBytes: number): void {
    if (sizeBytes <= this.coverageBytes) return;
    const extentBytes = heatExtentBytesFor(sizeBytes);
    const extentCount = Math.ceil(sizeBytes / extentBytes);
    assert(extentBytes >= this.extentBytes && extentCount <= heatExtentsMax, "heat map grows coarser");
    const ratio = extentBytes / this.extentBytes;
    const scaled = new Float64Array(extentCount);
    for (let i = 0; i < this.scaled.length; i++) {
      const target = Math.floor(i / ratio);
      scaled[target] = (scaled[target] as number) + (this.scaled[i] as number);
    }
    this.scaled = scaled;
    this.extentBytes = extentBytes;
    this.extentsPerByte = 1 / extentBytes;
    this.extentCount = extentCount;
  }

  heatOf(extent: number, nowMs: number): number {
    assert(extent >= 0 && extent < this.extentCount, `extent ${extent} out of range`);
    return (this.scaled[extent] as number) * this.decay(nowMs);
  }

  total(nowMs: number): number {
    return this.totalScaled * this.decay(nowMs);
  }

  rangeHeat(offset: number, length: number, nowMs: number): number {
    if (length <= 0) return 0;
    const first = Math.max(0, Math.floor(offset / this.extentBytes));
    const last = Math.min(this.extentCount - 1, Math.floor((offset + length - 1) / this.extentBytes));
    let sum = 0;
    for (let i = first; i <= last; i++) sum += this.scaled[i] as number;
    return sum * this.decay(nowMs);
  }

  /** The `count` hottest extents with heat > 0 (a min-heap over the scaled values: O(n log count)). */
  hottest(count: number, nowMs: number): ExtentHeatStats[] {
    const size = Math.max(0, Math.min(Math.floor(count), this.extentCount));
    if (size === 0) return [];
    const heapValue = new Float64Array(size);
    const heapIndex = new Int32Array(size);
    let filled = 0;
    // "a is cooler than b": smaller value, or equal value and higher offset (lower offsets win ties).
    const cooler = (i: number, j: number): boolean =>
      (heapValue[i] as number) < (heapValue[j] as number) ||
      ((heapValue[i] as number) === (heapValue[j] as number) &&
        (heapIndex[i] as number) > (heapIndex[j] as number));
    const swap = (i: number, j: number): void => {
      const value = heapValue[i] as number;
      heapValue[i] = heapValue[j] as number;
      heapValue[j] = value;
      const index = heapIndex[i] as number;
      heapIndex[i] = heapIndex[j] as number;
      heapIndex[j] = index;
    };
    const siftDown = (start: number): void => {
      let i = start;
      for (;;) {
        const left = 2 * i + 1;
        const right = left + 1;
        let coolest = i;
        if (left < filled && cooler(left, coolest)) coolest = left;
        if (right < filled && cooler(right, coolest)) coolest = right;
        if (coolest === i) return;
        swap(i, coolest);
        i = coolest;
      }
    };
    const scaled = this.scaled;
    for (let extent = 0; extent < scaled.length; extent++) {
      const value = scaled[extent] as number;
      if (!(value > 0)) continue;
      if (filled < size) {
        heapValue[filled] = value;
        heapIndex[filled] = extent;
        let i = filled++;
        while (i > 0) {
          const parent = (i - 1) >> 1;
          if (!cooler(i, parent)) break;
          swap(i, parent);
          i = parent;
        }
      } else if (value > (heapValue[0] as number)) {
        // Equal values keep the lower offset already in the heap (extents are visited in order).
        heapValue[0] = value;
        heapIndex[0] = extent;
        siftDown(0);
      }
    }
    const decay = this.decay(nowMs);
    const result: ExtentHeatStats[] = [];
    for (let i = 0; i < filled; i++) {
      const heat = (heapValue[i] as number) * decay;
      if (heat > 0) result.push({ offset: (heapIndex[i] as number) * this.extentBytes, heat });
    }
    return result.sort((a, b) => b.heat - a.heat || a.offset - b.offset);
  }

  profile(nowMs: number): ProfileStats {
    const p = this.profileScaled;
    let sum = 0;
    for (let i = 0; i < PROFILE_CLASSES; i++) sum += p[i] as number;
    const decayedCount = sum * this.decay(nowMs);
    const fraction = (value: number): number => (sum > 0 ? value / sum : 0);
    const readFraction = fraction((p[0] as number) + (p[1] as number) + (p[2] as number) + (p[3] as number));
    const randomSmall = PROFILE_RANDOM;
    const sequentialLarge = PROFILE_LARGE;
    const randomSmallFraction = fraction(
      (p[PROFILE_READ + randomSmall] as number) + (p[PROFILE_WRITE + randomSmall] as number),
    );
    const sequentialLargeFraction = fraction(
      (p[PROFILE_READ + sequentialLarge] as number) + (p[PROFILE_WRITE + sequentialLarge] as number),
    );
    let kind: ProfileStats["kind"] = "mixed";
    if (decayedCount < 1) kind = "idle";
    else if (randomSmallFraction > 0.5) kind = "random-small";
    else if (sequentialLargeFraction > 0.5) kind = "sequential-large";
    return {
      halfLifeSeconds: this.halfLifeSeconds,
      requestsPerSecond: (decayedCount * Math.LN2) / this.halfLifeSeconds,
      readFraction,
      randomSmallFraction,
      sequentialLargeFraction,
      kind,
    };
  }
}
