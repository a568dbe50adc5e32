/**
 * Typed access to the native addon (src/native/vdisk_native.cc and socket_writer.cc, built by `node-gyp`
 * into build/Release/vdisk_native.node): fallocate, lseek with SEEK_DATA/SEEK_HOLE, posix_fadvise, a
 * synchronous preadv2(RWF_NOWAIT) for the page-cache-hit fast path, positional write batches, and the
 * NBD connections' reply writer (SocketWriter).
 *
 * The addon is loaded on first use, not at import, so modules that never touch a file (the memory
 * device) work without it; the NBD server then falls back to Node's socket writes. It is looked up from the project root, which is two levels
 * above this file when run from src/native/ and three levels above when compiled to dist/src/native/.
 *
 * Errors passed to the callbacks are shaped like Node's fs errors: `code` is the errno name
 * ("ENXIO", "EOPNOTSUPP"), `errno` the negated errno, `syscall` the call. Bad arguments (negative or
 * unsafe offsets, a range outside the buffer) throw synchronously: they are bugs, not I/O errors.
 */
import * as fs from "node:fs";
import * as path from "node:path";

import { VdiskError } from "../errors";

export interface NativeError extends Error {
  code: string;
  errno: number;
  syscall: string;
}

export type NativeDone = (err: NativeError | null) => void;
export type NativeSeekDone = (err: NativeError | null, offset?: number) => void;

/**
 * One connection's reply writer (src/native/socket_writer.cc has the contract): the buffers given to
 * `send` must stay alive and unchanged until `completed()` counts them or `stopped()` is true.
 */
export interface NativeSocketWriter {
  /** Queue buffers[0..count); without `handoff` and with nothing queued, written at once as far as the
   * socket takes. Returns how many buffers have been written in full so far. */
  send(buffers: Buffer[], count: number, handoff: boolean): number;
  /** Buffers written in full since the writer was made (also re-arms the progress callback). */
  completed(): number;
  /** The errno name that stopped writing ("EPIPE"), or null. */
  error(): string | null;
  /** Drop what is queued, stop the thread, close the duplicated descriptor. */
  close(): void;
  /** True once no thread can read a buffer given to `send` any more. */
  stopped(): boolean;
}

export interface NativeAddon {
  /** fallocate(2) on the thread pool. `length` must be > 0. */
  fallocate(fd: number, mode: number, offset: number, length: number, done: NativeDone): void;
  /** lseek(2) with SEEK_DATA or SEEK_HOLE on the thread pool; ENXIO means "no data at or after offset". */
  seek(fd: number, offset: number, whence: number, done: NativeSeekDone): void;
  /** posix_fadvise(2) on the thread pool; `length` 0 means "to the end of the file". */
  fadvise(fd: number, offset: number, length: number, advice: number, done: NativeDone): void;
  /**
   * Synchronous preadv2(2) with RWF_NOWAIT into `buffer[bufferOffset, bufferOffset + length)`.
   * Returns the bytes read (0 at end of file; fewer than asked when only part is cached), or -1 when the
   * kernel would have to wait for the disk (EAGAIN). Throws a NativeError on any other failure.
   */
  preadNoWait(fd: number, buffer: Buffer, bufferOffset: number, length: number, position: number): number;
  /**
   * Positional writes of every buffer at its position, in order, in one thread-pool hop. The callback
   * gets null, or the error and the index of the write that failed (earlier ones were written).
   */
  pwriteBatch(
    fd: number,
    buffers: Buffer[],
    positions: number[],
    callback: (err: NativeError | null, failedIndex: number | null) => void,
  ): void;

  /** A writer over a dup() of socket descriptor `fd`; `progress` runs on the JS thread after the writer
   * thread completes buffers, fails, or stops (calls are coalesced). */
  SocketWriter: new (fd: number, progress: () => void) => NativeSocketWriter;

  readonly FALLOC_FL_KEEP_SIZE: number;
  readonly FALLOC_FL_PUNCH_HOLE: number;
  readonly FALLOC_FL_ZERO_RANGE: number;
  readonly SEEK_DATA: number;
  readonly SEEK_HOLE: number;
  readonly POSIX_FADV_NORMAL: number;
  readonly POSIX_FADV_SEQUENTIAL: number;
  readonly POSIX_FADV_RANDOM: number;
  readonly POSIX_FADV_WILLNEED: number;
  readonly POSIX_FADV_DONTNEED: number;
}

const addonRelativePath = path.join("build", "Release", "vdisk_native.node");

/** Where the addon may live: the project root seen from src/native/ and from dist/src/native/. */
export function addonCandidatePaths(): string[] {
  return [
    path.resolve(__dirname, "..", "..", addonRelativePath),
    path.resolve(__dirname, "..", "..", "..", addonRelativePath),
  ];
}

let loaded: NativeAddon | null = null;

/** The addon, loaded once. Throws VdiskError INTERNAL with a hint when it has not been built. */
export function loadNative(): NativeAddon {
  if (loaded !== null) return loaded;
  const candidates = addonCandidatePaths();
  const found = candidates.find((candidate) => fs.existsSync(candidate));
  if (found === undefined) {
    throw new VdiskError("INTERNAL", `native addon not built: none of ${candidates.join(", ")} exists`, {
      hint: "run `npm install` or `npm run build` (node-gyp rebuild) in the vdisk directory",
    });
  }
  let addon: NativeAddon;
  try {
    const module = { exports: {} };
    process.dlopen(module, found);
    addon = module.exports as NativeAddon;
  } catch (err) {
    throw new VdiskError("INTERNAL", `native addon ${found} failed to load: ${(err as Error).message}`, {
      cause: err,
      hint: "rebuild it for this Node.js: `npm run build` (node-gyp rebuild)",
    });
  }
  for (const name of [
    "fallocate",
    "seek",
    "fadvise",
    "preadNoWait",
    "pwriteBatch",
    "SocketWriter",
  ] as const) {
    if (typeof addon[name] !== "function") {
      throw new VdiskError("INTERNAL", `native addon ${found} lacks ${name}(): stale build`, {
        hint: "run `npm run build` (node-gyp rebuild)",
      });
    }
  }
  loaded = addon;
  return addon;
}
