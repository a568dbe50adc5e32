/**
 * Bucket lookups for the monitor's histograms, and percentiles read back from per-bucket counts.
 *
 * Every lookup is O(1) and allocation-free (they run for every request): the bounds are powers of two, so
 * the bucket of a value is the bit length of (value − 1), one `Math.clz32`. The bounds themselves are in
 * types.ts (requestSizeBucketsBytes, interArrivalBucketsSeconds, queueDepthBuckets), where readers of the
 * JSON find them; the assertions below tie the two together.
 *
 * Percentiles: the rank q·N is located in the cumulative counts and interpolated linearly inside its
 * bucket, as Prometheus' histogram_quantile does. The estimate and the true value lie in the same bucket,
 * so the error is at most that bucket's width (docs/monitor.md states it for each histogram); a rank in
 * the last (unbounded) bucket is reported as its lower bound.
 */
import { assert } from "../errors";
import { interArrivalBucketsSeconds, queueDepthBuckets, requestSizeBucketsBytes } from "./types";

/** log2 of the first size bound (512 B). */
const SIZE_SHIFT = 9;
export const sizeBucketCount = requestSizeBucketsBytes.length + 1;
export const interArrivalBucketCount = interArrivalBucketsSeconds.length + 1;
export const queueDepthBucketCount = queueDepthBuckets.length + 1;

assert(
  requestSizeBucketsBytes.every((bound, i) => bound === 2 ** (SIZE_SHIFT + i)),
  "size bounds are 2^9 .. 2^25",
);
assert(
  interArrivalBucketsSeconds.every((bound, i) => bound === 2 ** i / 1e6),
  "inter-arrival bounds are 2^k µs",
);
/** The last inter-arrival bound in µs. */
const IA_LAST_BOUND_MICROS = 2 ** (interArrivalBucketsSeconds.length - 1);
assert(
  queueDepthBuckets.every((bound, i) => bound === 2 ** i),
  "queue depth bounds are 2^k",
);

/** Smallest k with 2^k ≥ n, for an integer 1 ≤ n ≤ 2^32. */
function bitLength(n: number): number {
  return n <= 1 ? 0 : 32 - Math.clz32(n - 1);
}

/** The request-size bucket of a length in bytes (the last one: over 32 MiB). */
export function sizeBucketOf(bytes: number): number {
  if (bytes <= 512) return 0;
  if (bytes > 2 ** 32) return sizeBucketCount - 1;
  const bucket = bitLength(bytes) - SIZE_SHIFT;
  return bucket < sizeBucketCount ? bucket : sizeBucketCount - 1;
}

/** The inter-arrival bucket of an interval in milliseconds (the last one: over ~16.8 s). */
export function interArrivalBucketOf(intervalMs: number): number {
  const micros = intervalMs * 1000;
  if (micros <= 1) return 0;
  if (micros > IA_LAST_BOUND_MICROS) return interArrivalBucketCount - 1;
  return bitLength(Math.ceil(micros));
}

/** The queue-depth bucket of a depth ≥ 1 (the last one: deeper than 1024). */
export function queueDepthBucketOf(depth: number): number {
  const bucket = bitLength(depth);
  return bucket < queueDepthBucketCount ? bucket : queueDepthBucketCount - 1;
}

/**
 * The q-quantile (0 < q ≤ 1) of per-bucket counts with upper bounds `bounds` (one count more than
 * bounds: the last bucket is unbounded), interpolated linearly inside the bucket; null when empty.
 */
export function quantileOf(buckets: ArrayLike<number>, bounds: readonly number[], q: number): number | null {
  assert(q > 0 && q <= 1, `quantile ${q} out of (0, 1]`);
  assert(buckets.length === bounds.length + 1, "one bucket more than bounds");
  let total = 0;
  for (let i = 0; i < buckets.length; i++) total += buckets[i] as number;
  if (total <= 0) return null;
  const rank = q * total;
  let before = 0;
  for (let i = 0; i < buckets.length; i++) {
    const count = buckets[i] as number;
    if (count > 0 && before + count >= rank) {
      const lower = i === 0 ? 0 : (bounds[i - 1] as number);
      if (i === bounds.length) return lower; // the unbounded bucket: its lower bound is all we know
      const upper = bounds[i] as number;
      return lower + ((upper - lower) * (rank - before)) / count;
    }
    before += count;
  }
  return bounds[bounds.length - 1] as number; // rounding: rank a hair above the total
}
