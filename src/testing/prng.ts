/**
 * Prng: a small seeded pseudo-random generator for deterministic simulation (crash tests, fault injection,
 * random workloads). Everything random in a simulation comes from one of these, so a failing run is
 * reproduced from its seed alone; tests print the seed in every failure message.
 *
 * Algorithm: xoshiro128** (Blackman & Vigna), 128 bits of state in four uint32 words, period 2^128 - 1.
 * The state is filled from the seed with splitmix32, so nearby seeds (0, 1, 2, ...) give unrelated streams
 * and the state is never all zero. A string seed is first hashed to 32 bits (FNV-1a).
 *
 * Not for cryptography. Deterministic across platforms: only 32-bit integer arithmetic (Math.imul, >>>).
 */
import { assert } from "../errors";

const twoPow32 = 2 ** 32;

/** FNV-1a over the UTF-16 code units of `text`: a 32-bit seed from a string. */
function hashString(text: string): number {
  let hash = 0x811c9dc5;
  for (let index = 0; index < text.length; index++) {
    hash ^= text.charCodeAt(index);
    hash = Math.imul(hash, 0x01000193);
  }
  return hash >>> 0;
}

export class Prng {
  /** The 32-bit seed this generator started from (a string seed is shown hashed). */
  readonly seed: number;
  private s0: number;
  private s1: number;
  private s2: number;
  private s3: number;

  constructor(seed: number | string) {
    if (typeof seed === "string") {
      this.seed = hashString(seed);
    } else {
      assert(Number.isInteger(seed), "prng seed is an integer");
      this.seed = seed >>> 0;
    }
    // splitmix32: four outputs fill the state.
    let x = this.seed;
    const splitmix = (): number => {
      x = (x + 0x9e3779b9) >>> 0;
      let z = x;
      z = Math.imul(z ^ (z >>> 16), 0x85ebca6b);
      z = Math.imul(z ^ (z >>> 13), 0xc2b2ae35);
      return (z ^ (z >>> 16)) >>> 0;
    };
    this.s0 = splitmix();
    this.s1 = splitmix();
    this.s2 = splitmix();
    this.s3 = splitmix();
    assert((this.s0 | this.s1 | this.s2 | this.s3) !== 0, "xoshiro state is never all zero");
  }

  /** The next 32 random bits as an unsigned integer in [0, 2^32). */
  uint32(): number {
    const result = Math.imul(rotl(Math.imul(this.s1, 5), 7), 9) >>> 0;
    const t = this.s1 << 9;
    this.s2 ^= this.s0;
    this.s3 ^= this.s1;
    this.s1 ^= this.s2;
    this.s0 ^= this.s3;
    this.s2 ^= t;
    this.s3 = rotl(this.s3, 11);
    return result;
  }

  /** A float in [0, 1) with 32 bits of randomness. */
  next(): number {
    return this.uint32() / twoPow32;
  }

  /** An integer in [0, maxExclusive), unbiased (rejection sampling). */
  int(maxExclusive: number): number {
    assert(
      Number.isInteger(maxExclusive) && maxExclusive >= 1 && maxExclusive <= twoPow32,
      "prng int bound is an integer in [1, 2^32]",
    );
    const limit = twoPow32 - (twoPow32 % maxExclusive);
    for (;;) {
      const value = this.uint32();
      if (value < limit) return value % maxExclusive;
    }
  }

  /** An integer in [min, maxInclusive]. */
  range(min: number, maxInclusive: number): number {
    assert(Number.isInteger(min) && Number.isInteger(maxInclusive) && min <= maxInclusive, "prng range");
    return min + this.int(maxInclusive - min + 1);
  }

  /** True with probability `probability` (default one half). */
  bool(probability = 0.5): boolean {
    assert(probability >= 0 && probability <= 1, "probability in [0, 1]");
    return this.next() < probability;
  }

  /** One element of a non-empty array, uniformly. */
  pick<T>(items: readonly T[]): T {
    assert(items.length > 0, "pick from a non-empty array");
    return items[this.int(items.length)];
  }

  /** Shuffle `items` in place (Fisher–Yates) and return it. */
  shuffle<T>(items: T[]): T[] {
    for (let index = items.length - 1; index > 0; index--) {
      const other = this.int(index + 1);
      const item = items[index];
      items[index] = items[other];
      items[other] = item;
    }
    return items;
  }

  /** `count` random bytes. */
  bytes(count: number): Buffer {
    assert(Number.isSafeInteger(count) && count >= 0, "byte count is a non-negative integer");
    const buf = Buffer.allocUnsafe(count);
    let index = 0;
    while (index + 4 <= count) {
      buf.writeUInt32LE(this.uint32(), index);
      index += 4;
    }
    if (index < count) {
      let word = this.uint32();
      while (index < count) {
        buf[index++] = word & 0xff;
        word >>>= 8;
      }
    }
    return buf;
  }

  /** An independent generator seeded from this one: lets a component draw without shifting the caller's stream. */
  fork(): Prng {
    return new Prng(this.uint32());
  }
}

function rotl(value: number, shift: number): number {
  return (value << shift) | (value >>> (32 - shift));
}

/**
 * Bytes that are never zero and differ per seed (a small LCG), so that "not written" is always visible
 * in a comparison. Cheap and deterministic; for test data, not randomness.
 */
export function nonZeroPattern(length: number, seed: number): Buffer {
  const buf = Buffer.alloc(length);
  let x = (seed * 2654435761 + 1) >>> 0;
  for (let index = 0; index < length; index++) {
    x = (Math.imul(x, 1103515245) + 12345) >>> 0;
    buf[index] = (x >>> 16) | 1;
  }
  return buf;
}
