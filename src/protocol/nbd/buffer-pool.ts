/**
 * ReplyBufferPool: reusable buffers for read replies, so that the hot path does not allocate (and the
 * garbage collector does not later sweep) one ArrayBuffer per read.
 *
 * Why: every 4 KiB read needs a reply buffer (header + data) that lives until the socket has written it.
 * Allocated fresh, each is a new off-heap ArrayBuffer: perf on 4 KiB random reads at QD32 showed ~12 % of
 * the daemon's CPU in malloc/free and V8's major-GC marking and sweeping driven by that external memory.
 * A pooled buffer goes back to its class once the socket's write callback for its last byte has run (the
 * kernel has copied it), or at once when it was never sent (an error reply).
 *
 * Classes are powers of two from 4 KiB to `pooledPayloadBytesMax` of payload, plus room for the reply's
 * header. Each class keeps at most `pooledBytesPerClassMax` bytes of idle buffers; larger reads and a full
 * class fall back to plain allocation. A buffer is in exactly one place: the pool, or a request.
 */
import { assert } from "../../errors";

/** Largest read payload served from the pool. */
export const pooledPayloadBytesMax = 128 * 1024;
/** Idle bytes kept per size class. */
export const pooledBytesPerClassMax = 4 * 1024 * 1024;
/** Room in front of the payload for a reply header (structured OFFSET_DATA: 20 + 8 bytes). */
export const replyPrefixBytesMax = 32;

const classPayloadBytesMin = 4096;

function classIndex(payloadBytes: number): number {
  let index = 0;
  let size = classPayloadBytesMin;
  while (size < payloadBytes) {
    size *= 2;
    index++;
  }
  return index;
}

export class ReplyBufferPool {
  private readonly classes: Buffer[][] = [];
  private readonly capacity: number[] = [];

  constructor() {
    for (let size = classPayloadBytesMin; size <= pooledPayloadBytesMax; size *= 2) {
      this.classes.push([]);
      this.capacity.push(Math.max(8, Math.floor(pooledBytesPerClassMax / size)));
    }
  }

  /**
   * A buffer of at least `bytes` bytes for a reply of `payloadBytes` payload (bytes ≤ payloadBytes +
   * replyPrefixBytesMax). Callers use `subarray(0, bytes)`; the whole buffer goes back with `release`.
   */
  acquire(payloadBytes: number, bytes: number): Buffer {
    assert(bytes <= payloadBytes + replyPrefixBytesMax, "reply prefix within the reserved room");
    if (payloadBytes > pooledPayloadBytesMax) return Buffer.allocUnsafe(bytes);
    const index = classIndex(payloadBytes);
    const free = this.classes[index] as Buffer[];
    const buffer = free.pop();
    if (buffer !== undefined) return buffer;
    // allocUnsafeSlow: a buffer of its own, never a slice of Node's shared pool (which it would pin).
    return Buffer.allocUnsafeSlow((classPayloadBytesMin << index) + replyPrefixBytesMax);
  }

  /** Give back a buffer from `acquire` (others are ignored: they were plain allocations). */
  release(buffer: Buffer): void {
    const payloadBytes = buffer.length - replyPrefixBytesMax;
    if (payloadBytes < classPayloadBytesMin || payloadBytes > pooledPayloadBytesMax) return;
    const index = classIndex(payloadBytes);
    if (classPayloadBytesMin << index !== payloadBytes) return;
    const free = this.classes[index] as Buffer[];
    if (free.length < (this.capacity[index] as number)) free.push(buffer);
  }

  /** Idle buffers per class (tests). */
  idle(): number[] {
    return this.classes.map((free) => free.length);
  }
}

/** One pool for the process: every connection's read replies. */
export const replyBufferPool = new ReplyBufferPool();
