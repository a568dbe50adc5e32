/**
 * BufferPool: reusable buffers for read replies and write payloads, so that the hot path does not
 * allocate (and the garbage collector does not later mark and sweep) one off-heap ArrayBuffer per request.
 *
 * Why: every read needs a reply buffer (header + data) that lives until the socket has written it, and
 * every write whose payload spans socket chunks needs a buffer to gather it in, which lives until the
 * device has written it. Allocated fresh, each is a new off-heap ArrayBuffer whose external memory drives
 * V8's major GCs: perf on 4 KiB random reads at QD32 showed ~12 % of the daemon's CPU in malloc/free and
 * GC marking and sweeping; on 1 MiB sequential writes at QD8, ~20 % in concurrent marking and sweeping.
 *
 * A reply buffer goes back once the socket's write callback for its last byte has run (the kernel has
 * copied it), or at once when it was never sent (an error reply); a write payload goes back when the
 * device's callback for the write has run (every consumer — the request engine's splits and merges, the
 * image volume's segments — calls back only after its last use of the buffer).
 *
 * Classes are powers of two from `payloadBytesMin` to `payloadBytesMax` of payload, plus `prefixBytes`
 * of room for a reply header. All classes share one budget of `idleBytesMax` idle bytes: a released
 * buffer that does not fit makes room by dropping idle buffers of other classes, largest first, so the
 * class the workload uses now gets the whole budget and one it used before does not keep it. Only when
 * the rest are its own class's is the released buffer dropped. (The bound was per class before: at
 * 4 MiB per class, 1 MiB writes at QD8 released more buffers than their class kept and reallocated
 * them, and the external memory set off 7–12 major GCs a second; with one budget, 1–2 in 5 s.)
 * Larger payloads fall back to plain allocation. A pooled buffer is in exactly one place: the pool, or
 * one request.
 */
import { assert } from "../../errors";
import { KiB, MiB } from "../../limits";

export interface BufferPoolLimits {
  /** Smallest class, in payload bytes (a power of two). */
  payloadBytesMin: number;
  /** Largest payload served from the pool (a power of two); larger ones are plain allocations. */
  payloadBytesMax: number;
  /** Idle bytes kept across all classes (at least one buffer of the largest class must fit). */
  idleBytesMax: number;
  /** Room in front of the payload (a reply header); 0 for write payloads. */
  prefixBytes: number;
}

/** Room in front of a read reply's payload for its header (structured OFFSET_DATA: 20 + 8 bytes). */
export const replyPrefixBytesMax = 32;

/** Read replies: 4 KiB … 128 KiB (larger reads are rare and dominated by the copy itself). */
export const replyPoolLimits: BufferPoolLimits = {
  payloadBytesMin: 4 * KiB,
  payloadBytesMax: 128 * KiB,
  idleBytesMax: 16 * MiB,
  prefixBytes: replyPrefixBytesMax,
};

/** Write payloads gathered from several socket chunks: 4 KiB … 4 MiB. */
export const writePoolLimits: BufferPoolLimits = {
  payloadBytesMin: 4 * KiB,
  payloadBytesMax: 4 * MiB,
  idleBytesMax: 32 * MiB,
  prefixBytes: 0,
};

function isPowerOfTwo(n: number): boolean {
  return Number.isSafeInteger(n) && n > 0 && (n & (n - 1)) === 0;
}

export class BufferPool {
  private readonly classes: Buffer[][] = [];
  /** Bytes held by idle buffers, all classes; at most `limits.idleBytesMax`. */
  private idleBytes = 0;

  constructor(readonly limits: BufferPoolLimits) {
    assert(
      isPowerOfTwo(limits.payloadBytesMin) &&
        isPowerOfTwo(limits.payloadBytesMax) &&
        limits.payloadBytesMin <= limits.payloadBytesMax,
      "pool classes are powers of two, smallest first",
    );
    assert(limits.prefixBytes >= 0, "the prefix is not negative");
    assert(
      limits.idleBytesMax >= limits.payloadBytesMax + limits.prefixBytes,
      "the idle budget holds a buffer of the largest class",
    );
    for (let size = limits.payloadBytesMin; size <= limits.payloadBytesMax; size *= 2) this.classes.push([]);
  }

  /**
   * A buffer of at least `bytes` bytes for `payloadBytes` of payload (bytes ≤ payloadBytes + prefixBytes).
   * Callers use `subarray(0, bytes)`; the whole buffer goes back with `release`.
   */
  acquire(payloadBytes: number, bytes: number = payloadBytes): Buffer {
    assert(bytes <= payloadBytes + this.limits.prefixBytes, "prefix within the reserved room");
    if (payloadBytes > this.limits.payloadBytesMax) return Buffer.allocUnsafe(bytes);
    const index = this.classIndex(payloadBytes);
    const free = this.classes[index] as Buffer[];
    const buffer = free.pop();
    if (buffer !== undefined) {
      this.idleBytes -= buffer.length;
      return buffer;
    }
    // allocUnsafeSlow: a buffer of its own, never a slice of Node's shared pool (which it would pin).
    return Buffer.allocUnsafeSlow((this.limits.payloadBytesMin << index) + this.limits.prefixBytes);
  }

  /** Give back a buffer from `acquire` (others are ignored: they were plain allocations). */
  release(buffer: Buffer): void {
    const payloadBytes = buffer.length - this.limits.prefixBytes;
    if (payloadBytes < this.limits.payloadBytesMin || payloadBytes > this.limits.payloadBytesMax) return;
    const index = this.classIndex(payloadBytes);
    if (this.limits.payloadBytesMin << index !== payloadBytes) return;
    // Make room from the other classes, largest first; a class never evicts its own idle buffers.
    for (let other = this.classes.length - 1; other >= 0; other--) {
      if (this.idleBytes + buffer.length <= this.limits.idleBytesMax) break;
      if (other === index) continue;
      const free = this.classes[other] as Buffer[];
      while (free.length > 0 && this.idleBytes + buffer.length > this.limits.idleBytesMax) {
        this.idleBytes -= (free.pop() as Buffer).length;
      }
    }
    if (this.idleBytes + buffer.length > this.limits.idleBytesMax) return;
    (this.classes[index] as Buffer[]).push(buffer);
    this.idleBytes += buffer.length;
  }

  /** Idle buffers per class (tests). */
  idle(): number[] {
    return this.classes.map((free) => free.length);
  }

  /** Bytes held by idle buffers (tests). */
  idleBytesNow(): number {
    return this.idleBytes;
  }

  private classIndex(payloadBytes: number): number {
    let index = 0;
    let size = this.limits.payloadBytesMin;
    while (size < payloadBytes) {
      size *= 2;
      index++;
    }
    return index;
  }
}

/** One pool for the process: every connection's read replies. */
export const replyBufferPool = new BufferPool(replyPoolLimits);
/** One pool for the process: every connection's gathered write payloads. */
export const writePayloadPool = new BufferPool(writePoolLimits);
