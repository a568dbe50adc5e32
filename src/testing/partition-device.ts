/**
 * PartitionDevice: a fixed-size window [base, base + size) of another BlockDevice, for tests that need
 * several devices sharing one medium — above all the crash harness, where one CrashDevice split into
 * partitions makes a power cut hit every device of a tiered image at the same instant.
 *
 * The partition's size never changes: `resize` to at most the size succeeds and changes nothing (the
 * image grows its files before writing to them; here they are already large enough), beyond it fails
 * with NO_SPACE. Everything else forwards with the offset shifted; flush and close go to the inner device
 * (close only closes the inner device when `ownsInner`).
 */
import { VdiskError, assert } from "../errors";
import type {
  BlockDevice,
  Capabilities,
  DeviceUsage,
  Done,
  Extent,
  ExtentsDone,
  ReadDone,
} from "../devices/block-device";

export class PartitionDevice implements BlockDevice {
  readonly kind = "partition";

  constructor(
    private readonly inner: BlockDevice,
    private readonly base: number,
    readonly size: number,
    private readonly ownsInner = false,
  ) {
    assert(base >= 0 && size > 0 && base + size <= inner.size, "partition inside its device");
  }

  get capabilities(): Capabilities {
    return this.inner.capabilities;
  }

  private check(offset: number, length: number): void {
    assert(offset >= 0 && offset + length <= this.size, `partition access ${offset}+${length} past its end`);
  }

  read(buf: Buffer, offset: number, done: ReadDone): void {
    this.check(offset, buf.length);
    this.inner.read(buf, this.base + offset, done);
  }

  write(buf: Buffer, offset: number, fua: boolean, done: Done): void {
    this.check(offset, buf.length);
    this.inner.write(buf, this.base + offset, fua, done);
  }

  zero(offset: number, length: number, flags: number, done: Done): void {
    this.check(offset, length);
    this.inner.zero(this.base + offset, length, flags, done);
  }

  trim(offset: number, length: number, fua: boolean, done: Done): void {
    this.check(offset, length);
    this.inner.trim(this.base + offset, length, fua, done);
  }

  flush(done: Done): void {
    this.inner.flush(done);
  }

  cache(offset: number, length: number, done: Done): void {
    this.check(offset, length);
    this.inner.cache(this.base + offset, length, done);
  }

  blockStatus(offset: number, length: number, done: ExtentsDone): void {
    this.check(offset, length);
    this.inner.blockStatus(this.base + offset, length, (err, extents) => {
      if (err || !extents) return done(err);
      const clipped: Extent[] = [];
      let left = length;
      for (const extent of extents) {
        if (left <= 0) break;
        clipped.push({ length: Math.min(extent.length, left), flags: extent.flags });
        left -= extent.length;
      }
      done(null, clipped);
    });
  }

  resize(size: number, done: Done): void {
    setImmediate(() =>
      done(size <= this.size ? null : new VdiskError("NO_SPACE", `partition of ${this.size} bytes is full`)),
    );
  }

  usage(done: (err: VdiskError | null, usage?: DeviceUsage) => void): void {
    setImmediate(() => done(null, { allocatedBytes: this.size }));
  }

  close(done: Done): void {
    if (this.ownsInner) this.inner.close(done);
    else setImmediate(() => done(null));
  }
}
