/**
 * MemoryDevice: a sparse disk in memory, for tests and scratch disks.
 *
 * Data structure: a Map from page index to a 4 KiB Buffer. A page exists only once non-zero data has
 * been written to it. Writing all-zero bytes, `zero` and `trim` delete the pages they cover entirely and
 * zero the covered part of the others, so unallocated = reads as zeros = reported as HOLE|ZERO.
 *
 * Invariants (asserted where cheap):
 * - every key k in `pages` satisfies 0 <= k * pageBytes < size (no page lies wholly past the end);
 * - the bytes of the last page past `size` are zero (shrinking zeroes them, so growing reads zeros);
 * - callbacks run on process.nextTick, never inside the call.
 *
 * Every write is "durable" at once, so flush and FUA are no-ops and one flush covers all handles
 * (multiConn). Requests are validated at the protocol edge; here out-of-range or read-only writes are bugs
 * and fail an assertion.
 */
import { assert } from "../errors";
import { diskBytesMax } from "../limits";
import {
  type BlockDevice,
  type Capabilities,
  type Done,
  type DeviceUsage,
  type Extent,
  type ExtentsDone,
  ExtentFlags,
  fullCapabilities,
  type ReadDone,
  ZeroFlags,
} from "./block-device";
import type { VdiskError } from "../errors";

/** Allocation unit of the page map. */
export const memoryPageBytes = 4096;
/** Extents returned by one blockStatus call; the caller asks again for the rest. */
export const memoryBlockStatusExtentsMax = 1024;

const zeroPage = Buffer.alloc(memoryPageBytes);

function isZero(buf: Buffer, start: number, end: number): boolean {
  let position = start;
  while (position < end) {
    const chunkEnd = Math.min(end, position + memoryPageBytes);
    if (!buf.subarray(position, chunkEnd).equals(zeroPage.subarray(0, chunkEnd - position))) return false;
    position = chunkEnd;
  }
  return true;
}

export interface MemoryDeviceOptions {
  readOnly?: boolean;
}

export class MemoryDevice implements BlockDevice {
  readonly kind = "memory";
  readonly capabilities: Capabilities;
  private sizeBytes: number;
  private readonly pages = new Map<number, Buffer>();
  private closed = false;

  constructor(size: number, options: MemoryDeviceOptions = {}) {
    assert(
      Number.isSafeInteger(size) && size >= 0 && size <= diskBytesMax,
      "memory device size out of range",
    );
    this.sizeBytes = size;
    this.capabilities = fullCapabilities(options.readOnly === true);
  }

  get size(): number {
    return this.sizeBytes;
  }

  /** Pages currently allocated (for tests). */
  get allocatedPages(): number {
    return this.pages.size;
  }

  read(buf: Buffer, offset: number, done: ReadDone): void {
    this.assertRange(offset, buf.length);
    process.nextTick(done, null, this.copyOut(buf, offset));
  }

  /** Memory is always "cached": the synchronous fast path always answers. */
  readNoWait(buf: Buffer, offset: number): boolean {
    this.assertRange(offset, buf.length);
    this.copyOut(buf, offset);
    return true;
  }

  /** Copy [offset, offset + buf.length) into `buf`; returns the holes (never-written pages), as `read` reports them. */
  private copyOut(buf: Buffer, offset: number): number[] {
    let holes: number[] | null = null;
    let position = offset;
    const end = offset + buf.length;
    while (position < end) {
      const index = Math.floor(position / memoryPageBytes);
      const pageStart = index * memoryPageBytes;
      const inPage = position - pageStart;
      const chunkEnd = Math.min(end, pageStart + memoryPageBytes);
      const target = position - offset;
      const page = this.pages.get(index);
      if (page === undefined) {
        buf.fill(0, target, target + chunkEnd - position);
        holes ??= [];
        const count = holes.length;
        if (count > 0 && holes[count - 2] + holes[count - 1] === target) {
          holes[count - 1] += chunkEnd - position;
        } else {
          holes.push(target, chunkEnd - position);
        }
      } else {
        page.copy(buf, target, inPage, inPage + chunkEnd - position);
      }
      position = chunkEnd;
    }
    return holes ?? [];
  }

  write(buf: Buffer, offset: number, _fua: boolean, done: Done): void {
    this.assertWritable();
    this.assertRange(offset, buf.length);
    let position = offset;
    const end = offset + buf.length;
    while (position < end) {
      const index = Math.floor(position / memoryPageBytes);
      const pageStart = index * memoryPageBytes;
      const chunkEnd = Math.min(end, pageStart + memoryPageBytes);
      const source = position - offset;
      if (isZero(buf, source, source + chunkEnd - position)) {
        this.zeroInPage(index, position, chunkEnd);
      } else {
        let page = this.pages.get(index);
        if (page === undefined) {
          page = Buffer.alloc(memoryPageBytes);
          this.pages.set(index, page);
        }
        buf.copy(page, position - pageStart, source, source + chunkEnd - position);
      }
      position = chunkEnd;
    }
    process.nextTick(done, null);
  }

  zero(offset: number, length: number, flags: number, done: Done): void {
    assert((flags & ~(ZeroFlags.FUA | ZeroFlags.MAY_TRIM | ZeroFlags.FAST)) === 0, "unknown zero flags");
    this.assertWritable();
    this.assertRange(offset, length);
    this.zeroRange(offset, offset + length);
    process.nextTick(done, null);
  }

  trim(offset: number, length: number, _fua: boolean, done: Done): void {
    this.assertWritable();
    this.assertRange(offset, length);
    this.zeroRange(offset, offset + length);
    process.nextTick(done, null);
  }

  flush(done: Done): void {
    assert(!this.closed, "verb after close");
    process.nextTick(done, null);
  }

  cache(offset: number, length: number, done: Done): void {
    this.assertRange(offset, length);
    process.nextTick(done, null);
  }

  blockStatus(offset: number, length: number, done: ExtentsDone): void {
    this.assertRange(offset, length);
    const extents: Extent[] = [];
    const end = offset + length;
    let position = offset;
    while (position < end && extents.length < memoryBlockStatusExtentsMax) {
      const index = Math.floor(position / memoryPageBytes);
      const chunkEnd = Math.min(end, (index + 1) * memoryPageBytes);
      const flags = this.pages.has(index) ? ExtentFlags.DATA : ExtentFlags.HOLE | ExtentFlags.ZERO;
      const last = extents[extents.length - 1];
      if (last !== undefined && last.flags === flags) {
        last.length += chunkEnd - position;
      } else {
        extents.push({ length: chunkEnd - position, flags });
      }
      position = chunkEnd;
    }
    assert(position > offset && position <= end, "extents cover a non-empty prefix of the request");
    process.nextTick(done, null, extents);
  }

  resize(size: number, done: Done): void {
    assert(
      Number.isSafeInteger(size) && size >= 0 && size <= diskBytesMax,
      "memory device size out of range",
    );
    this.assertWritable();
    if (size < this.sizeBytes) {
      for (const index of this.pages.keys()) {
        if (index * memoryPageBytes >= size) this.pages.delete(index);
      }
      const tailIndex = Math.floor(size / memoryPageBytes);
      if (size % memoryPageBytes !== 0) this.zeroInPage(tailIndex, size, (tailIndex + 1) * memoryPageBytes);
    }
    this.sizeBytes = size;
    process.nextTick(done, null);
  }

  usage(done: (err: VdiskError | null, usage?: DeviceUsage) => void): void {
    assert(!this.closed, "verb after close");
    process.nextTick(done, null, { allocatedBytes: this.pages.size * memoryPageBytes });
  }

  close(done: Done): void {
    assert(!this.closed, "closed twice");
    this.closed = true;
    this.pages.clear();
    process.nextTick(done, null);
  }

  /** Make [start, end) read as zeros: drop whole pages, zero partial ones. */
  private zeroRange(start: number, end: number): void {
    let position = start;
    while (position < end) {
      const index = Math.floor(position / memoryPageBytes);
      const chunkEnd = Math.min(end, (index + 1) * memoryPageBytes);
      this.zeroInPage(index, position, chunkEnd);
      position = chunkEnd;
    }
  }

  /** Zero [start, end) within page `index`; drop the page if nothing non-zero is left in it. */
  private zeroInPage(index: number, start: number, end: number): void {
    const page = this.pages.get(index);
    if (page === undefined) return;
    const pageStart = index * memoryPageBytes;
    assert(start >= pageStart && end <= pageStart + memoryPageBytes && start < end, "range within one page");
    page.fill(0, start - pageStart, end - pageStart);
    if (page.equals(zeroPage)) this.pages.delete(index);
  }

  private assertRange(offset: number, length: number): void {
    assert(!this.closed, "verb after close");
    assert(Number.isSafeInteger(offset) && offset >= 0, "offset is a non-negative integer");
    assert(Number.isSafeInteger(length) && length > 0, "length is a positive integer");
    assert(offset + length <= this.sizeBytes, "request within the device");
  }

  private assertWritable(): void {
    assert(!this.capabilities.readOnly, "write to a read-only device");
  }
}
