/**
 * The one interface every layer of vdisk speaks: the NBD verbs, callback style.
 *
 * A `BlockDevice` is a byte-addressed disk of `size` bytes. Front ends (the NBD server, later vhost-user)
 * validate requests once at the edge — range, read-only, payload size — and devices assert instead of
 * re-checking. Filters wrap a device and call through to the next one, as nbdkit's filters do.
 *
 * Callbacks, not promises, on the I/O verbs: the hot path runs one callback per request with no promise
 * machinery (see ../../shared/ANCHORS.md: callbacks beat promises 1.5× on this machine). `promises.ts`
 * wraps them for management code where speed does not matter.
 *
 * Contract for every implementation (the conformance suite in test/unit/devices.test.ts checks it):
 * - `read` fills exactly `buf.length` bytes at `offset`; unwritten, trimmed and zeroed ranges read as zeros.
 *   It may report `holes`: ranges of the buffer, relative to its start, that are known to read as zeros
 *   because nothing is allocated there, so the NBD server can send them as hole chunks. `null` = unknown.
 * - `write` with `fua` completes only once the data is durable; without it, once it would be read back.
 * - `flush` makes every write that completed before `flush` was called durable, whichever handle or
 *   connection issued it (this is what lets the server advertise CAN_MULTI_CONN).
 * - `zero` makes the range read as zeros; with ZeroFlags.MAY_TRIM it may deallocate; with ZeroFlags.FAST it
 *   must fail with NOT_SUPPORTED rather than be slower than writing zeros.
 * - `trim` is advisory: the range may read as before or as zeros afterwards (we always make it zeros).
 * - `blockStatus` describes consecutive extents starting at `offset`; their total may be shorter than
 *   `length` (never zero) and must not run past the end of the device.
 * - every callback is called exactly once, never synchronously inside the call (Zalgo-free).
 * - `readNoWait`, where offered, is the one synchronous verb: it answers from a cache or declines.
 */
import type { VdiskError } from "../errors";

/** Bits of an extent's flags: the NBD `base:allocation` context's values. */
export const ExtentFlags = {
  DATA: 0,
  HOLE: 1,
  ZERO: 2,
} as const;

export interface Extent {
  length: number;
  flags: number;
}

/** Flags of `zero`. */
export const ZeroFlags = {
  NONE: 0,
  FUA: 1,
  /** The caller allows deallocation (NBD: NO_HOLE not set). */
  MAY_TRIM: 2,
  /** The caller wants failure rather than a slow zero (NBD_CMD_FLAG_FAST_ZERO). */
  FAST: 4,
} as const;

export interface Capabilities {
  readOnly: boolean;
  /** Writes are cached and need flush for durability (advertise SEND_FLUSH). */
  flush: boolean;
  fua: boolean;
  trim: boolean;
  zero: boolean;
  /** `zero` with ZeroFlags.FAST can succeed (it is never slower than writing zeros). */
  fastZero: boolean;
  /** One flush covers writes completed through every handle of this device. */
  multiConn: boolean;
  cache: boolean;
  rotational: boolean;
  /** `blockStatus` reports real holes/zeros rather than "all data". */
  extents: boolean;
}

/**
 * The capabilities of a device that does everything itself: flush, FUA, trim, zero and fast zero when
 * writable, one flush for all connections, cache, real extents, not rotational. A fresh object each call
 * (a device may turn a capability off later, e.g. fast zero when the file system lacks fallocate modes).
 */
export function fullCapabilities(readOnly: boolean): Capabilities {
  const writable = !readOnly;
  return {
    readOnly,
    flush: true,
    fua: writable,
    trim: writable,
    zero: writable,
    fastZero: writable,
    multiConn: true,
    cache: true,
    rotational: false,
    extents: true,
  };
}

export type Done = (err: VdiskError | null) => void;
/** `holes`: flat pairs [start, length, start, length, ...] relative to the read buffer, or null. */
export type ReadDone = (err: VdiskError | null, holes?: number[] | null) => void;
export type ExtentsDone = (err: VdiskError | null, extents?: Extent[]) => void;

export interface DeviceUsage {
  /** Bytes of backing storage allocated to this device's data. */
  allocatedBytes: number;
}

export interface BlockDevice {
  /** Current size in bytes; may change through `resize`. */
  readonly size: number;
  readonly capabilities: Capabilities;
  /** A short kind name for `vdisk info` ("raw", "memory", ...). */
  readonly kind: string;

  read(buf: Buffer, offset: number, done: ReadDone): void;
  /**
   * Optional fast path: fill `buf` from a cache without ever waiting for I/O (preadv2 RWF_NOWAIT on the
   * page cache). Returns true only if all of `buf` was filled; false means "use `read`" — the caller then
   * reads the whole range again asynchronously. Never blocks, never throws.
   */
  readNoWait?(buf: Buffer, offset: number): boolean;
  write(buf: Buffer, offset: number, fua: boolean, done: Done): void;
  zero(offset: number, length: number, flags: number, done: Done): void;
  trim(offset: number, length: number, fua: boolean, done: Done): void;
  flush(done: Done): void;
  cache(offset: number, length: number, done: Done): void;
  blockStatus(offset: number, length: number, done: ExtentsDone): void;

  /** Change the size. Growing reads back zeros; shrinking discards the tail. */
  resize(size: number, done: Done): void;
  usage(done: (err: VdiskError | null, usage?: DeviceUsage) => void): void;
  /** Flush and release. No verb may be called after close. */
  close(done: Done): void;
}
