/**
 * A latency histogram in the manner of HdrHistogram: log-linear buckets with a fixed relative precision,
 * constant memory, O(1) recording without allocation, exact count, sum, minimum and maximum.
 *
 * Values are whole nanoseconds (negative values count as 0, fractions are rounded). Values below
 * `SUB_BUCKETS` (128) have a bucket each; above, every power of two [2^k, 2^(k+1)) is split into 128 equal
 * buckets, so a bucket is at most 1/128 of its values wide: a percentile is reported as the middle of its
 * bucket, within ±0.4 % of the true value, and clamped to the exact [min, max]; the first and last ranks
 * are the exact minimum and maximum. Values up to 2^53 (104 days)
 * fit in `BUCKETS` counters; larger ones are an invariant violation.
 *
 * Percentile p of n values is the smallest recorded value v such that at least ceil(p/100 × n) values are
 * ≤ v (the "nearest rank" definition): p50 of {1, 2, 3, 4} is 2, p100 is the maximum.
 */
import { assert } from "../errors";

const SUB_BITS = 7;
const SUB_BUCKETS = 1 << SUB_BITS; // 128
/** 2^53 has 54 bits: exponents 0..45 above the linear range, 128 buckets each. */
const EXPONENTS = 53 - SUB_BITS;
export const BUCKETS = SUB_BUCKETS + EXPONENTS * SUB_BUCKETS;
const VALUE_MAX = Number.MAX_SAFE_INTEGER;

/** Bits needed for a non-negative safe integer (0 for 0). */
function bitLength(value: number): number {
  if (value < 0x1_0000_0000) return 32 - Math.clz32(value);
  return 64 - Math.clz32(Math.floor(value / 0x1_0000_0000));
}

/** The bucket of a non-negative safe integer. */
export function bucketOf(value: number): number {
  if (value < SUB_BUCKETS) return value;
  const shift = bitLength(value) - 1 - SUB_BITS; // ≥ 0: value / 2^shift is in [128, 256)
  const mantissa = Math.floor(value / 2 ** shift);
  return SUB_BUCKETS + shift * SUB_BUCKETS + (mantissa - SUB_BUCKETS);
}

/** The smallest and largest value of a bucket. */
export function bucketRange(bucket: number): [number, number] {
  if (bucket < SUB_BUCKETS) return [bucket, bucket];
  const shift = Math.floor((bucket - SUB_BUCKETS) / SUB_BUCKETS);
  const mantissa = SUB_BUCKETS + ((bucket - SUB_BUCKETS) % SUB_BUCKETS);
  const low = mantissa * 2 ** shift;
  return [low, low + 2 ** shift - 1];
}

export class Histogram {
  private readonly counts = new Float64Array(BUCKETS);
  count = 0;
  sum = 0;
  min = Infinity;
  max = -Infinity;

  /** Record one value in nanoseconds. */
  record(valueNs: number): void {
    const value = valueNs <= 0 ? 0 : Math.round(valueNs);
    assert(value <= VALUE_MAX, "histogram value beyond 2^53");
    this.counts[bucketOf(value)]++;
    this.count++;
    this.sum += value;
    if (value < this.min) this.min = value;
    if (value > this.max) this.max = value;
  }

  /** Add every value of `other` to this histogram. */
  merge(other: Histogram): void {
    for (let bucket = 0; bucket < BUCKETS; bucket++) this.counts[bucket] += other.counts[bucket] as number;
    this.count += other.count;
    this.sum += other.sum;
    if (other.min < this.min) this.min = other.min;
    if (other.max > this.max) this.max = other.max;
  }

  get mean(): number {
    return this.count === 0 ? 0 : this.sum / this.count;
  }

  /** Percentile p in [0, 100] by nearest rank (see the file comment); 0 when empty. */
  percentile(p: number): number {
    assert(p >= 0 && p <= 100, "percentile within 0..100");
    if (this.count === 0) return 0;
    const rank = Math.max(1, Math.ceil((p / 100) * this.count));
    if (rank === 1) return this.min; // the extremes are known exactly
    if (rank === this.count) return this.max;
    let seen = 0;
    for (let bucket = 0; bucket < BUCKETS; bucket++) {
      seen += this.counts[bucket] as number;
      if (seen >= rank) {
        const [low, high] = bucketRange(bucket);
        const middle = low + Math.floor((high - low) / 2);
        return Math.min(this.max, Math.max(this.min, middle));
      }
    }
    throw new Error("invariant violated: histogram counts add up to its count");
  }
}
