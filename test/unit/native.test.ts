/**
 * The native addon's calls, directly, on real files under os.tmpdir(): fallocate modes, SEEK_DATA /
 * SEEK_HOLE (and ENXIO past the last data), posix_fadvise, and preadv2(RWF_NOWAIT) with the page cache
 * warm (data) and cold (-1). Errors must carry `code`, `errno` and `syscall` like Node's fs errors.
 */
import { after, before, describe, it } from "node:test";
import * as assert from "node:assert/strict";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";

import { addonCandidatePaths, loadNative, type NativeAddon, type NativeError } from "../../src/native/native";

const KiB = 1024;
let tmpDir = "";
let native: NativeAddon;

before(() => {
  tmpDir = fs.mkdtempSync(path.join(os.tmpdir(), "vdisk-native-"));
  native = loadNative();
});
after(() => {
  fs.rmSync(tmpDir, { recursive: true, force: true });
});

function fallocate(fd: number, mode: number, offset: number, length: number): Promise<void> {
  return new Promise((resolve, reject) =>
    native.fallocate(fd, mode, offset, length, (err) => (err ? reject(err) : resolve())),
  );
}

function seek(fd: number, offset: number, whence: number): Promise<number> {
  return new Promise((resolve, reject) =>
    native.seek(fd, offset, whence, (err, result) => (err ? reject(err) : resolve(result as number))),
  );
}

function fadvise(fd: number, offset: number, length: number, advice: number): Promise<void> {
  return new Promise((resolve, reject) =>
    native.fadvise(fd, offset, length, advice, (err) => (err ? reject(err) : resolve())),
  );
}

function errnoError(code: string, syscall: string): (err: unknown) => boolean {
  return (err) => {
    const e = err as NativeError;
    assert.ok(e instanceof Error, "an Error");
    assert.equal(e.code, code);
    assert.equal(e.syscall, syscall);
    assert.ok(Number.isInteger(e.errno) && e.errno < 0, "errno is the negated errno, as in Node");
    assert.match(e.message, new RegExp(`^${code}: `));
    return true;
  };
}

/** A file of `size` bytes whose first `dataBytes` bytes are 0xab, the rest a hole. */
function makeFile(name: string, size: number, dataBytes: number): { file: string; fd: number } {
  const file = path.join(tmpDir, name);
  const fd = fs.openSync(file, "w+");
  fs.writeSync(fd, Buffer.alloc(dataBytes, 0xab), 0, dataBytes, 0);
  fs.ftruncateSync(fd, size);
  return { file, fd };
}

describe("native addon", () => {
  it("is found from the source tree and exports its constants", () => {
    assert.ok(addonCandidatePaths().some((candidate) => fs.existsSync(candidate)));
    assert.equal(native.SEEK_DATA, 3);
    assert.equal(native.SEEK_HOLE, 4);
    assert.equal(native.FALLOC_FL_KEEP_SIZE, 1);
    assert.equal(native.FALLOC_FL_PUNCH_HOLE, 2);
    assert.equal(native.FALLOC_FL_ZERO_RANGE, 0x10);
    assert.equal(native.POSIX_FADV_WILLNEED, 3);
    assert.equal(loadNative(), native, "loaded once");
  });

  it("punches a hole that SEEK_HOLE and SEEK_DATA then find", async () => {
    const { fd } = makeFile("punch.img", 256 * KiB, 256 * KiB);
    try {
      assert.equal(await seek(fd, 0, native.SEEK_HOLE), 256 * KiB, "no hole before the end of the file");
      await fallocate(fd, native.FALLOC_FL_PUNCH_HOLE | native.FALLOC_FL_KEEP_SIZE, 64 * KiB, 64 * KiB);
      assert.equal(fs.fstatSync(fd).size, 256 * KiB, "KEEP_SIZE keeps the size");
      assert.equal(await seek(fd, 0, native.SEEK_HOLE), 64 * KiB);
      assert.equal(await seek(fd, 64 * KiB, native.SEEK_DATA), 128 * KiB);
      assert.equal(
        await seek(fd, 70 * KiB, native.SEEK_HOLE),
        70 * KiB,
        "inside a hole, SEEK_HOLE stays put",
      );
      const buf = Buffer.alloc(64 * KiB, 1);
      fs.readSync(fd, buf, 0, buf.length, 64 * KiB);
      assert.ok(
        buf.every((byte) => byte === 0),
        "the hole reads as zeros",
      );
    } finally {
      fs.closeSync(fd);
    }
  });

  it("zeroes a range with ZERO_RANGE", async () => {
    const { fd } = makeFile("zero-range.img", 64 * KiB, 64 * KiB);
    try {
      await fallocate(fd, native.FALLOC_FL_ZERO_RANGE | native.FALLOC_FL_KEEP_SIZE, 1000, 10000).catch(
        (err: NativeError) => assert.equal(err.code, "EOPNOTSUPP", "only unsupported is acceptable"),
      );
      const buf = Buffer.alloc(64 * KiB);
      fs.readSync(fd, buf, 0, buf.length, 0);
      if (buf[1000] === 0) {
        assert.ok(buf.subarray(1000, 11000).every((byte) => byte === 0));
        assert.equal(buf[999], 0xab);
        assert.equal(buf[11000], 0xab);
      }
    } finally {
      fs.closeSync(fd);
    }
  });

  it("reports ENXIO when there is no data at or after the offset", async () => {
    const { fd } = makeFile("enxio.img", 1024 * KiB, 64 * KiB);
    try {
      assert.equal(await seek(fd, 0, native.SEEK_DATA), 0);
      await assert.rejects(seek(fd, 128 * KiB, native.SEEK_DATA), errnoError("ENXIO", "lseek"));
      await assert.rejects(seek(fd, 2048 * KiB, native.SEEK_HOLE), errnoError("ENXIO", "lseek"));
    } finally {
      fs.closeSync(fd);
    }
  });

  it("passes errors back with code, errno and syscall", async () => {
    const { fd } = makeFile("errors.img", 64 * KiB, 4 * KiB);
    try {
      // PUNCH_HOLE without KEEP_SIZE is refused by the kernel with EOPNOTSUPP.
      await assert.rejects(
        fallocate(fd, native.FALLOC_FL_PUNCH_HOLE, 0, 4096),
        errnoError("EOPNOTSUPP", "fallocate"),
      );
    } finally {
      fs.closeSync(fd);
    }
    await assert.rejects(fallocate(fd, 0, 0, 4096), errnoError("EBADF", "fallocate"));
    await assert.rejects(seek(fd, 0, native.SEEK_DATA), errnoError("EBADF", "lseek"));
    await assert.rejects(fadvise(fd, 0, 0, native.POSIX_FADV_WILLNEED), errnoError("EBADF", "posix_fadvise"));
  });

  it("rejects bad arguments synchronously", () => {
    const noop = (): void => undefined;
    assert.throws(() => native.fallocate(0, 0, -1, 4096, noop), RangeError);
    assert.throws(() => native.fallocate(0, 0, 0, 0, noop), RangeError);
    assert.throws(() => native.fallocate(0, 0, 0.5, 4096, noop), RangeError);
    assert.throws(() => native.seek(0, 2 ** 53, native.SEEK_DATA, noop), RangeError);
    assert.throws(() => native.seek(0, 0, 0 /* SEEK_SET */, noop), RangeError);
    assert.throws(() => native.fadvise(0, 0, 0, 3, "x" as unknown as () => void), TypeError);
    assert.throws(() => native.preadNoWait(0, Buffer.alloc(10), 5, 6, 0), RangeError);
    assert.throws(() => native.preadNoWait(0, "x" as unknown as Buffer, 0, 1, 0), TypeError);
  });

  it("pwriteBatch writes every buffer at its position in one call, and reports the failing index", async () => {
    const file = path.join(tmpDir, "batch.img");
    fs.writeFileSync(file, Buffer.alloc(64 * 1024));
    const fd = fs.openSync(file, "r+");
    try {
      const buffers = [Buffer.alloc(4096, 1), Buffer.alloc(100, 2), Buffer.alloc(4096, 3)];
      const positions = [0, 5000, 4096 * 3];
      await new Promise<void>((resolve, reject) =>
        native.pwriteBatch(fd, buffers, positions, (err) => (err ? reject(err) : resolve())),
      );
      const content = fs.readFileSync(file);
      assert.ok(content.subarray(0, 4096).every((b) => b === 1));
      assert.ok(content.subarray(5000, 5100).every((b) => b === 2));
      assert.ok(content.subarray(4096 * 3, 4096 * 4).every((b) => b === 3));
      assert.ok(
        content.subarray(4096, 5000).every((b) => b === 0),
        "nothing else written",
      );
      assert.throws(() => native.pwriteBatch(fd, [], [], () => {}), RangeError);
      assert.throws(() => native.pwriteBatch(fd, [Buffer.alloc(1)], [-1], () => {}), RangeError);
    } finally {
      fs.closeSync(fd);
    }
    const readOnly = fs.openSync(file, "r");
    try {
      const failure = await new Promise<[NativeError | null, number | null]>((resolve) =>
        native.pwriteBatch(readOnly, [Buffer.alloc(10)], [0], (err, index) => resolve([err, index])),
      );
      assert.equal(failure[0]?.code, "EBADF");
      assert.equal(failure[1], 0);
    } finally {
      fs.closeSync(readOnly);
    }
  });

  it("fadvise WILLNEED succeeds", async () => {
    const { fd } = makeFile("fadvise.img", 64 * KiB, 64 * KiB);
    try {
      await fadvise(fd, 0, 64 * KiB, native.POSIX_FADV_WILLNEED);
      await fadvise(fd, 0, 0, native.POSIX_FADV_WILLNEED);
    } finally {
      fs.closeSync(fd);
    }
  });

  it("preadNoWait reads cached data, and returns -1 once the page cache is dropped", async () => {
    const file = path.join(tmpDir, "nowait.img");
    const data = Buffer.alloc(256 * KiB);
    for (let i = 0; i < data.length; i++) data[i] = (i * 7 + 3) & 0xff;
    fs.writeFileSync(file, data); // just written: in the page cache
    const fd = fs.openSync(file, "r");
    try {
      const buf = Buffer.alloc(64 * KiB + 10, 0xee);
      assert.equal(native.preadNoWait(fd, buf, 10, 64 * KiB, 4096), 64 * KiB);
      assert.deepEqual(buf.subarray(10), data.subarray(4096, 4096 + 64 * KiB));
      assert.ok(
        buf.subarray(0, 10).every((byte) => byte === 0xee),
        "bytes before bufferOffset untouched",
      );

      assert.equal(native.preadNoWait(fd, buf, 0, 1000, 256 * KiB - 100), 100, "short read at end of file");
      assert.deepEqual(buf.subarray(0, 100), data.subarray(256 * KiB - 100));
      assert.equal(native.preadNoWait(fd, buf, 0, 1000, 256 * KiB), 0, "end of file");

      // Clean pages are dropped by DONTNEED; reading them would now block on the disk, so NOWAIT says
      // EAGAIN (-1). DONTNEED is best effort (pages still in per-CPU LRU batches stay, and a miss starts
      // readahead), so each attempt waits a little and reads a page no earlier attempt touched; as a last
      // resort (root only) the whole page cache's clean pages are dropped.
      const big = path.join(tmpDir, "nowait-big.img");
      fs.writeFileSync(big, Buffer.alloc(8 * 1024 * KiB, 0x42));
      const bigFd = fs.openSync(big, "r");
      try {
        fs.fdatasyncSync(bigFd);
        const results: number[] = [];
        for (let attempt = 0; attempt < 24 && !results.includes(-1); attempt++) {
          if (attempt === 16) {
            try {
              fs.writeFileSync("/proc/sys/vm/drop_caches", "1");
            } catch {
              // not root: keep trying with DONTNEED
            }
          }
          await new Promise((resolve) => setTimeout(resolve, 20));
          await fadvise(bigFd, 0, 0, native.POSIX_FADV_DONTNEED);
          results.push(native.preadNoWait(bigFd, buf, 0, 4096, (attempt * 320 + 64) * KiB));
        }
        assert.ok(results.includes(-1), `EAGAIN becomes -1 (got ${results.join(", ")})`);
        assert.ok(results.every((result) => result === -1 || result === 4096));
      } finally {
        fs.closeSync(bigFd);
      }
    } finally {
      fs.closeSync(fd);
    }
    assert.throws(
      () => native.preadNoWait(fd, Buffer.alloc(10), 0, 10, 0),
      (err: unknown) => errnoError("EBADF", "preadv2")(err),
    );
  });
});
