/**
 * FileDevice: a disk backed by one raw, sparse image file (the "raw" kind), like nbdkit's file plugin.
 *
 * One file descriptor per disk, shared by every connection. All I/O is positional (pread/pwrite through
 * fs.read/fs.write), so the shared file position only moves for SEEK_DATA/SEEK_HOLE and nothing depends
 * on it. Because there is one fd, one fdatasync makes every completed write durable, whichever connection
 * issued it: that is what makes multiConn true.
 *
 * Verbs and the calls behind them:
 * - read/write: fs.read/fs.write, looping on short transfers; reads past the end of a shorter file are
 *   zeros. `holes` is always null (an lseek per read would cost more than it saves). FUA = fdatasync after.
 *   The hot path allocates one closure per request and no promises.
 * - zero: MAY_TRIM → PUNCH_HOLE; otherwise ZERO_RANGE, falling back to PUNCH_HOLE, then to writing zeros
 *   from a shared zero buffer. With ZeroFlags.FAST the last step is refused with NOT_SUPPORTED instead.
 *   A mode the file system rejects with EOPNOTSUPP is remembered and not tried again.
 * - trim: PUNCH_HOLE|KEEP_SIZE; where unsupported, it zeroes instead (trimmed ranges always read as zeros).
 * - cache: posix_fadvise(WILLNEED). blockStatus: SEEK_DATA/SEEK_HOLE, at most `fileBlockStatusExtentsMax`
 *   extents per call. resize: ftruncate. usage: fstat blocks * 512. close: fdatasync, then close.
 *
 * Requests are validated at the protocol edge; here a bad range or a write to a read-only device is a bug
 * and fails an assertion. Invariant: the file's length equals `size` (ftruncate at create and resize).
 */
import * as fs from "node:fs";
import { promisify } from "node:util";

import { assert, fromSystemError, VdiskError } from "../errors";
import { diskBytesMax, MiB } from "../limits";
import { loadNative, type NativeAddon, type NativeError } from "../native/native";
import {
  type BlockDevice,
  type Capabilities,
  type DeviceUsage,
  type Done,
  type Extent,
  type ExtentsDone,
  ExtentFlags,
  fullCapabilities,
  type ReadDone,
  ZeroFlags,
} from "./block-device";

/** Extents returned by one blockStatus call; the caller asks again for the rest. */
export const fileBlockStatusExtentsMax = 1024;
/** Writes up to this size are batched into one thread-pool hop (larger ones are copy-bound). */
export const fileWriteBatchBytesMax = 64 * 1024;
/** Writes per batch. */
export const fileWriteBatchCountMax = 64;
/** Size of the shared buffer of zeros written when the file system cannot zero a range itself. */
export const fileZeroBufferBytes = 1 * MiB;

let zeroBuffer: Buffer | null = null;
function sharedZeroBuffer(): Buffer {
  zeroBuffer ??= Buffer.alloc(fileZeroBufferBytes);
  return zeroBuffer;
}

const openAsync = promisify(fs.open);
const closeAsync = promisify(fs.close);
const fstatAsync = promisify(fs.fstat);
const ftruncateAsync = promisify(fs.ftruncate);
const unlinkAsync = promisify(fs.unlink);

interface WriteBatch {
  buffers: Buffer[];
  positions: number[];
  dones: Done[];
  fua: boolean[];
}

export interface FileDeviceOptions {
  readOnly?: boolean;
  /** Create a new file of this many bytes; fails with DISK_EXISTS if the file exists. */
  create?: number;
}

function isNotSupported(err: NativeError): boolean {
  return err.code === "EOPNOTSUPP" || err.code === "ENOTSUP" || err.code === "ENOSYS";
}

export class FileDevice implements BlockDevice {
  readonly kind = "raw";
  readonly capabilities: Capabilities;
  readonly path: string;
  private fd: number;
  private sizeBytes: number;
  private pendingBatch: WriteBatch | null = null;
  private readonly native: NativeAddon;
  /** Cleared once the file system answers EOPNOTSUPP to that fallocate mode. */
  private canPunchHole = true;
  private canZeroRange = true;

  private constructor(path: string, fd: number, size: number, readOnly: boolean, native: NativeAddon) {
    this.path = path;
    this.fd = fd;
    this.sizeBytes = size;
    this.native = native;
    this.capabilities = fullCapabilities(readOnly);
  }

  /** Open (or with `create`, create) a raw image file. */
  static async open(path: string, options: FileDeviceOptions = {}): Promise<FileDevice> {
    const native = loadNative();
    const readOnly = options.readOnly === true;
    const create = options.create;
    assert(create === undefined || !readOnly, "create a read-only file");
    assert(
      create === undefined || (Number.isSafeInteger(create) && create >= 0 && create <= diskBytesMax),
      "create size out of range",
    );
    let fd: number;
    try {
      fd = await openAsync(path, create !== undefined ? "wx+" : readOnly ? "r" : "r+");
    } catch (err) {
      throw openError(err, path);
    }
    try {
      const stat = await fstatAsync(fd);
      if (!stat.isFile()) throw new VdiskError("INVALID_ARGUMENT", `${path}: not a regular file`);
      if (create !== undefined) await ftruncateAsync(fd, create);
      const size = create ?? stat.size;
      if (size > diskBytesMax) throw new VdiskError("BAD_SIZE", `${path}: ${size} bytes is over the maximum`);
      return new FileDevice(path, fd, size, readOnly, native);
    } catch (err) {
      await closeAsync(fd).catch(() => undefined);
      if (create !== undefined) await unlinkAsync(path).catch(() => undefined);
      throw fromSystemError(err, `open ${path}`);
    }
  }

  get size(): number {
    return this.sizeBytes;
  }

  read(buf: Buffer, offset: number, done: ReadDone): void {
    this.assertRange(offset, buf.length);
    const fd = this.fd;
    const length = buf.length;
    let filled = 0;
    const onRead = (err: NodeJS.ErrnoException | null, bytesRead: number): void => {
      if (err !== null) {
        done(fromSystemError(err, `read ${this.path}`));
        return;
      }
      if (bytesRead === 0) {
        // End of a file shorter than the device: the rest reads as zeros.
        buf.fill(0, filled);
        done(null, null);
        return;
      }
      filled += bytesRead;
      assert(filled <= length, "read no more than asked");
      if (filled < length) {
        fs.read(fd, buf, filled, length - filled, offset + filled, onRead);
      } else {
        done(null, null);
      }
    };
    fs.read(fd, buf, 0, length, offset, onRead);
  }

  /**
   * Page-cache hit fast path: preadv2(RWF_NOWAIT) on the event loop. The kernel returns EAGAIN instead of
   * waiting for the disk (and starts readahead), so this never blocks; a miss, a short read (partly
   * cached, or end of a shorter file) or an error declines and the caller falls back to `read`.
   */
  readNoWait(buf: Buffer, offset: number): boolean {
    this.assertRange(offset, buf.length);
    try {
      return this.native.preadNoWait(this.fd, buf, 0, buf.length, offset) === buf.length;
    } catch {
      return false; // the asynchronous read reports the error properly
    }
  }

  write(buf: Buffer, offset: number, fua: boolean, done: Done): void {
    this.assertWritable();
    this.assertRange(offset, buf.length);
    if (buf.length <= fileWriteBatchBytesMax) return this.batchWrite(buf, offset, fua, done);
    const fd = this.fd;
    const length = buf.length;
    let written = 0;
    let syncing = false;
    // One callback serves the write loop and the FUA fdatasync that may follow it.
    const onWrite = (err: NodeJS.ErrnoException | null, bytesWritten?: number): void => {
      if (err !== null) {
        done(fromSystemError(err, `${syncing ? "fdatasync" : "write"} ${this.path}`));
        return;
      }
      if (syncing) {
        done(null);
        return;
      }
      written += bytesWritten ?? 0;
      assert(written <= length && bytesWritten !== 0, "write makes progress");
      if (written < length) {
        fs.write(fd, buf, written, length - written, offset + written, onWrite);
      } else if (fua) {
        syncing = true;
        fs.fdatasync(fd, onWrite);
      } else {
        done(null);
      }
    };
    fs.write(fd, buf, 0, length, offset, onWrite);
  }

  /**
   * Small writes submitted in the same event-loop turn go to the thread pool together, in one
   * pwriteBatch call: for 4 KiB writes the hand-off costs more than the copy (bench: 4K random write
   * QD32). Order within a batch is submission order. FUA writes complete after one fdatasync.
   */
  private batchWrite(buf: Buffer, offset: number, fua: boolean, done: Done): void {
    let batch = this.pendingBatch;
    if (batch === null || batch.buffers.length >= fileWriteBatchCountMax) {
      batch = { buffers: [], positions: [], dones: [], fua: [] };
      this.pendingBatch = batch;
      process.nextTick(this.submitBatch, batch);
    }
    batch.buffers.push(buf);
    batch.positions.push(offset);
    batch.dones.push(done);
    batch.fua.push(fua);
  }

  private readonly submitBatch = (batch: WriteBatch): void => {
    if (this.pendingBatch === batch) this.pendingBatch = null;
    this.native.pwriteBatch(this.fd, batch.buffers, batch.positions, (err, failedIndex) => {
      if (err !== null) {
        const failure = fromSystemError(err, `write ${this.path}`);
        const failed = failedIndex ?? 0;
        // Writes before the failed one landed; it and the ones after it did not.
        batch.dones.forEach((done, i) => done(i < failed ? null : failure));
        return;
      }
      if (!batch.fua.includes(true)) {
        for (const done of batch.dones) done(null);
        return;
      }
      batch.dones.forEach((done, i) => {
        if (!batch.fua[i]) done(null);
      });
      fs.fdatasync(this.fd, (syncErr) => {
        const result = syncErr ? fromSystemError(syncErr, `fdatasync ${this.path}`) : null;
        batch.dones.forEach((done, i) => {
          if (batch.fua[i]) done(result);
        });
      });
    });
  };

  zero(offset: number, length: number, flags: number, done: Done): void {
    assert((flags & ~(ZeroFlags.FUA | ZeroFlags.MAY_TRIM | ZeroFlags.FAST)) === 0, "unknown zero flags");
    this.assertWritable();
    this.assertRange(offset, length);
    const fast = (flags & ZeroFlags.FAST) !== 0;
    const finish = this.finisher((flags & ZeroFlags.FUA) !== 0, done);
    const viaWrites = (): void => {
      if (!this.canPunchHole && !this.canZeroRange) this.capabilities.fastZero = false;
      if (fast) {
        finish(new VdiskError("NOT_SUPPORTED", `${this.path}: the file system cannot zero ranges quickly`));
      } else {
        this.writeZeros(offset, length, finish);
      }
    };
    const viaPunch = (next: () => void): void => this.punchHole(offset, length, finish, next);
    const viaZeroRange = (next: () => void): void => this.zeroRange(offset, length, finish, next);
    if ((flags & ZeroFlags.MAY_TRIM) !== 0) {
      viaPunch(() => viaZeroRange(viaWrites));
    } else {
      viaZeroRange(() => viaPunch(viaWrites));
    }
  }

  trim(offset: number, length: number, fua: boolean, done: Done): void {
    this.zero(offset, length, ZeroFlags.MAY_TRIM | (fua ? ZeroFlags.FUA : 0), done);
  }

  flush(done: Done): void {
    assert(this.fd >= 0, "verb after close");
    fs.fdatasync(this.fd, (err) =>
      done(err === null ? null : fromSystemError(err, `fdatasync ${this.path}`)),
    );
  }

  cache(offset: number, length: number, done: Done): void {
    this.assertRange(offset, length);
    this.native.fadvise(this.fd, offset, length, this.native.POSIX_FADV_WILLNEED, (err) =>
      done(err === null ? null : fromSystemError(err, `posix_fadvise ${this.path}`)),
    );
  }

  blockStatus(offset: number, length: number, done: ExtentsDone): void {
    this.assertRange(offset, length);
    const native = this.native;
    const fd = this.fd;
    const end = offset + length;
    const extents: Extent[] = [];
    let position = offset;
    const push = (extentEnd: number, flags: number): void => {
      assert(extentEnd > position && extentEnd <= end, "extent within the request");
      extents.push({ length: extentEnd - position, flags });
      position = extentEnd;
    };
    const finished = (): boolean => position >= end || extents.length >= fileBlockStatusExtentsMax;
    const complete = (): void => {
      assert(extents.length > 0 && position > offset && position <= end, "extents cover a prefix");
      done(null, extents);
    };
    const fail = (err: NativeError, what: string): void => done(fromSystemError(err, `${what} ${this.path}`));
    const onHole = (err: NativeError | null, hole?: number): void => {
      // Data starts at `position`; it runs to the next hole (the end of the file at the latest).
      if (err !== null && err.code !== "ENXIO") return fail(err, "lseek(SEEK_HOLE)");
      push(
        err !== null || hole === undefined ? end : Math.min(Math.max(hole, position + 1), end),
        ExtentFlags.DATA,
      );
      if (finished()) return complete();
      native.seek(fd, position, native.SEEK_DATA, onData);
    };
    const onData = (err: NativeError | null, data?: number): void => {
      if (err !== null) {
        if (err.code !== "ENXIO") return fail(err, "lseek(SEEK_DATA)");
        // No data at or after `position`: a hole to the end.
        push(end, ExtentFlags.HOLE | ExtentFlags.ZERO);
        return complete();
      }
      assert(data !== undefined && data >= position, "SEEK_DATA moves forward");
      if (data > position) push(Math.min(data, end), ExtentFlags.HOLE | ExtentFlags.ZERO);
      if (finished()) return complete();
      native.seek(fd, position, native.SEEK_HOLE, onHole);
    };
    native.seek(fd, position, native.SEEK_DATA, onData);
  }

  resize(size: number, done: Done): void {
    assert(Number.isSafeInteger(size) && size >= 0 && size <= diskBytesMax, "size out of range");
    this.assertWritable();
    fs.ftruncate(this.fd, size, (err) => {
      if (err !== null) {
        done(fromSystemError(err, `ftruncate ${this.path}`));
        return;
      }
      this.sizeBytes = size;
      done(null);
    });
  }

  usage(done: (err: VdiskError | null, usage?: DeviceUsage) => void): void {
    assert(this.fd >= 0, "verb after close");
    fs.fstat(this.fd, (err, stat) => {
      if (err !== null) done(fromSystemError(err, `fstat ${this.path}`));
      else done(null, { allocatedBytes: stat.blocks * 512 });
    });
  }

  close(done: Done): void {
    assert(this.fd >= 0, "closed twice");
    const fd = this.fd;
    this.fd = -1;
    const closeFd = (syncErr: NodeJS.ErrnoException | null): void => {
      fs.close(fd, (closeErr) => {
        const err = syncErr ?? closeErr;
        done(err === null ? null : fromSystemError(err, `close ${this.path}`));
      });
    };
    if (this.capabilities.readOnly) closeFd(null);
    else fs.fdatasync(fd, closeFd);
  }

  /** `done` wrapped to fdatasync first when `fua` is set and the operation succeeded. */
  private finisher(fua: boolean, done: Done): Done {
    if (!fua) return done;
    return (err) => {
      if (err !== null) done(err);
      else this.flush(done);
    };
  }

  /** PUNCH_HOLE|KEEP_SIZE; calls `unsupported` instead when the file system cannot. */
  private punchHole(offset: number, length: number, done: Done, unsupported: () => void): void {
    if (!this.canPunchHole) return unsupported();
    const mode = this.native.FALLOC_FL_PUNCH_HOLE | this.native.FALLOC_FL_KEEP_SIZE;
    this.native.fallocate(this.fd, mode, offset, length, (err) => {
      if (err === null) return done(null);
      if (!isNotSupported(err)) return done(fromSystemError(err, `fallocate(PUNCH_HOLE) ${this.path}`));
      this.canPunchHole = false;
      unsupported();
    });
  }

  /** ZERO_RANGE|KEEP_SIZE; calls `unsupported` instead when the file system cannot. */
  private zeroRange(offset: number, length: number, done: Done, unsupported: () => void): void {
    if (!this.canZeroRange) return unsupported();
    const mode = this.native.FALLOC_FL_ZERO_RANGE | this.native.FALLOC_FL_KEEP_SIZE;
    this.native.fallocate(this.fd, mode, offset, length, (err) => {
      if (err === null) return done(null);
      if (!isNotSupported(err)) return done(fromSystemError(err, `fallocate(ZERO_RANGE) ${this.path}`));
      this.canZeroRange = false;
      unsupported();
    });
  }

  /** The slow path: write zeros from the shared buffer, one chunk at a time. */
  private writeZeros(offset: number, length: number, done: Done): void {
    const zeros = sharedZeroBuffer();
    const end = offset + length;
    let position = offset;
    const onWrite = (err: NodeJS.ErrnoException | null, bytesWritten: number): void => {
      if (err !== null) return done(fromSystemError(err, `write ${this.path}`));
      assert(bytesWritten > 0, "write makes progress");
      position += bytesWritten;
      if (position < end) writeNext();
      else done(null);
    };
    const writeNext = (): void => {
      fs.write(this.fd, zeros, 0, Math.min(zeros.length, end - position), position, onWrite);
    };
    writeNext();
  }

  private assertRange(offset: number, length: number): void {
    assert(this.fd >= 0, "verb after close");
    assert(Number.isSafeInteger(offset) && offset >= 0, "offset is a non-negative integer");
    assert(Number.isSafeInteger(length) && length > 0, "length is a positive integer");
    assert(offset + length <= this.sizeBytes, "request within the device");
  }

  private assertWritable(): void {
    assert(!this.capabilities.readOnly, "write to a read-only device");
  }
}

function openError(err: unknown, path: string): VdiskError {
  const code = (err as NodeJS.ErrnoException | undefined)?.code;
  if (code === "EEXIST") return new VdiskError("DISK_EXISTS", `${path} already exists`, { cause: err });
  if (code === "ENOENT") return new VdiskError("NOT_FOUND", `${path} does not exist`, { cause: err });
  return fromSystemError(err, `open ${path}`);
}
