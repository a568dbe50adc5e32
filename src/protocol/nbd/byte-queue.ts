/**
 * A queue of received socket chunks that the parsers read from without copying in the common case.
 *
 * Chunks are kept as they arrived; `ensure(n)` makes the first n unread bytes contiguous (it only copies
 * when a structure straddles chunks), after which they are at `head[headOffset ...]`. `take(n)` returns
 * exactly n bytes — a view into the chunk when they lie in one, a fresh copy otherwise — and `skip(n)`
 * drops bytes without keeping them (used to discard oversized payloads in constant memory).
 *
 * Invariant: `length` is the sum of unread bytes over all chunks; chunks[0] has unread bytes when
 * length > 0.
 */
import { assert } from "../../errors";

const EMPTY = Buffer.alloc(0);

export class ByteQueue {
  private chunks: Buffer[] = [];
  /** The first chunk and the read position in it. Valid after ensure(). */
  head: Buffer = EMPTY;
  headOffset = 0;
  length = 0;

  push(chunk: Buffer): void {
    if (chunk.length === 0) return;
    if (this.length === 0) {
      this.chunks.length = 0;
      this.chunks.push(chunk);
      this.head = chunk;
      this.headOffset = 0;
    } else {
      this.chunks.push(chunk);
    }
    this.length += chunk.length;
  }

  /** True when at least n bytes are buffered; they are then contiguous at head[headOffset]. */
  ensure(n: number): boolean {
    if (this.length < n) return false;
    if (this.head.length - this.headOffset >= n) return true;
    // Coalesce just enough chunks into one buffer.
    const merged = Buffer.allocUnsafe(Math.max(n, 0));
    let copied = 0;
    while (copied < n) {
      const chunk = this.chunks[0];
      assert(chunk !== undefined, "byte queue underflow while coalescing");
      const start = chunk === this.head ? this.headOffset : 0;
      const available = chunk.length - start;
      const want = n - copied;
      if (available <= want) {
        chunk.copy(merged, copied, start, chunk.length);
        copied += available;
        this.chunks.shift();
      } else {
        chunk.copy(merged, copied, start, start + want);
        copied += want;
        this.chunks[0] = chunk.subarray(start + want);
      }
      this.head = this.chunks[0] ?? EMPTY;
      this.headOffset = 0;
    }
    this.chunks.unshift(merged);
    this.head = merged;
    this.headOffset = 0;
    return true;
  }

  /** Drop n bytes (n <= length). */
  skip(n: number): void {
    assert(n <= this.length, "skip beyond buffered bytes");
    this.length -= n;
    while (n > 0) {
      const available = this.head.length - this.headOffset;
      if (n < available) {
        this.headOffset += n;
        return;
      }
      n -= available;
      this.chunks.shift();
      this.head = this.chunks[0] ?? EMPTY;
      this.headOffset = 0;
    }
    if (this.head.length === this.headOffset && this.chunks.length > 0) {
      this.chunks.shift();
      this.head = this.chunks[0] ?? EMPTY;
      this.headOffset = 0;
    }
  }

  /** Remove and return exactly n bytes (n <= length). A view when possible, else a copy. */
  take(n: number): Buffer {
    assert(n <= this.length, "take beyond buffered bytes");
    if (n === 0) return EMPTY;
    const available = this.head.length - this.headOffset;
    if (n <= available) {
      const view = this.head.subarray(this.headOffset, this.headOffset + n);
      this.skip(n);
      return view;
    }
    const out = Buffer.allocUnsafe(n);
    let copied = 0;
    while (copied < n) {
      const chunkAvailable = this.head.length - this.headOffset;
      const want = Math.min(chunkAvailable, n - copied);
      this.head.copy(out, copied, this.headOffset, this.headOffset + want);
      copied += want;
      this.skip(want);
    }
    return out;
  }

  /** Copy up to `max` buffered bytes into target at targetOffset, consuming them. Returns bytes copied. */
  drainInto(target: Buffer, targetOffset: number, max: number): number {
    let copied = 0;
    while (copied < max && this.length > 0) {
      const available = this.head.length - this.headOffset;
      const want = Math.min(available, max - copied);
      this.head.copy(target, targetOffset + copied, this.headOffset, this.headOffset + want);
      copied += want;
      this.skip(want);
    }
    return copied;
  }

  /**
   * Copy the unread bytes of every chunk that is a view of `memory` into a buffer of their own: the
   * owner of `memory` is about to reuse it (the connection's receive buffer, before the next read).
   */
  detach(memory: ArrayBufferLike): void {
    for (let index = 0; index < this.chunks.length; index++) {
      const chunk = this.chunks[index] as Buffer;
      if (chunk.buffer !== memory) continue;
      const start = index === 0 ? this.headOffset : 0;
      const copy = Buffer.allocUnsafe(chunk.length - start);
      chunk.copy(copy, 0, start);
      this.chunks[index] = copy;
      if (index === 0) {
        this.head = copy;
        this.headOffset = 0;
      }
    }
  }

  clear(): void {
    this.chunks.length = 0;
    this.head = EMPTY;
    this.headOffset = 0;
    this.length = 0;
  }
}
