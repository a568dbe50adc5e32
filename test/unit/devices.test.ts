/**
 * The BlockDevice conformance suite (see src/devices/block-device.ts for the contract), run against every
 * backing: MemoryDevice, FileDevice on a real sparse file under os.tmpdir(), LatencyDevice over a
 * MemoryDevice (an ssd on the real clock, an hdd on the simulated clock), and a PhysicalDevice handle over a
 * MemoryDevice (an hdd on the simulated clock, and no model). No mocks.
 *
 * Each backing supplies a factory that opens a fresh device of a given size, and one that reopens it
 * read-only. Checks that depend on the backing's allocation unit (whole 4 KiB blocks become holes) use
 * 64 KiB-aligned ranges, which every file system here deallocates.
 */
import { after, before, describe, it } from "node:test";
import * as assert from "node:assert/strict";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";

import { type BlockDevice, type Extent, ExtentFlags, ZeroFlags } from "../../src/devices/block-device";
import { FileDevice } from "../../src/devices/file-device";
import { LatencyDevice, type LatencyDeviceOptions } from "../../src/devices/latency-device";
import { MemoryDevice } from "../../src/devices/memory-device";
import { PhysicalDevice, type PhysicalDeviceOptions } from "../../src/devices/physical-device";
import {
  blockStatusAsync,
  cacheAsync,
  closeAsync,
  flushAsync,
  readAsync,
  resizeAsync,
  trimAsync,
  usageAsync,
  writeAsync,
  zeroAsync,
} from "../../src/devices/promises";
import { VdiskError } from "../../src/errors";
import { KiB, MiB } from "../../src/limits";

interface Backing {
  name: string;
  /** A fresh writable device of `size` bytes. */
  create(size: number): Promise<BlockDevice>;
  /** The device just created by `create`, closed and reopened read-only (or a fresh read-only one). */
  reopenReadOnly(device: BlockDevice): Promise<BlockDevice>;
}

let tmpDir = "";
let fileCounter = 0;

before(() => {
  tmpDir = fs.mkdtempSync(path.join(os.tmpdir(), "vdisk-devices-"));
});
after(() => {
  fs.rmSync(tmpDir, { recursive: true, force: true });
});

const backings: Backing[] = [
  {
    name: "MemoryDevice",
    create: async (size) => new MemoryDevice(size),
    reopenReadOnly: async (device) => {
      await closeAsync(device);
      return new MemoryDevice(device.size, { readOnly: true });
    },
  },
  {
    name: "FileDevice",
    create: (size) => FileDevice.open(path.join(tmpDir, `disk-${fileCounter++}.img`), { create: size }),
    reopenReadOnly: async (device) => {
      await closeAsync(device);
      return FileDevice.open((device as FileDevice).path, { readOnly: true });
    },
  },
  latencyBacking("LatencyDevice(MemoryDevice, ssd, real clock)", { model: { kind: "ssd" } }),
  latencyBacking("LatencyDevice(MemoryDevice, hdd, simulated clock)", {
    model: { kind: "hdd" },
    clock: "simulated",
  }),
  physicalBacking("PhysicalDevice handle (MemoryDevice, second file on an hdd, simulated clock)", {
    model: { kind: "hdd" },
    clock: "simulated",
    modelBytes: 1024 * MiB,
  }),
  physicalBacking("PhysicalDevice handle (MemoryDevice, no model)", { model: null, modelBytes: 0 }),
];

/** A LatencyDevice over a MemoryDevice: the delay must not change what the device does. */
function latencyBacking(name: string, options: LatencyDeviceOptions): Backing {
  return {
    name,
    create: async (size) => new LatencyDevice(new MemoryDevice(size), options),
    reopenReadOnly: async (device) => {
      await closeAsync(device);
      return new LatencyDevice(new MemoryDevice(device.size, { readOnly: true }), options);
    },
  };
}

/**
 * The second file attached to a PhysicalDevice over a MemoryDevice (the first holds a region of the model
 * and stays idle): sharing a device and its queue must not change what the file does.
 */
function physicalBacking(name: string, options: PhysicalDeviceOptions): Backing {
  const open = (inner: MemoryDevice): BlockDevice => {
    const device = new PhysicalDevice(options);
    device.attach(new MemoryDevice(4096), "background");
    return device.attach(inner, "realtime");
  };
  return {
    name,
    create: async (size) => open(new MemoryDevice(size)),
    reopenReadOnly: async (device) => {
      await closeAsync(device);
      return open(new MemoryDevice(device.size, { readOnly: true }));
    },
  };
}

function pattern(length: number, seed: number): Buffer {
  const buf = Buffer.alloc(length);
  let x = seed * 2654435761 + 1;
  for (let i = 0; i < length; i++) {
    x = (x * 1103515245 + 12345) >>> 0;
    buf[i] = (x >>> 16) | 1; // never zero, so a zero byte always means "not written"
  }
  return buf;
}

async function readBytes(device: BlockDevice, offset: number, length: number): Promise<Buffer> {
  const buf = Buffer.alloc(length, 0xee); // garbage, so a read that leaves bytes alone is caught
  await readAsync(device, buf, offset);
  return buf;
}

function isZero(buf: Buffer): boolean {
  return buf.every((byte) => byte === 0);
}

/** Checks the blockStatus contract and returns the extents with their absolute offsets. */
async function checkedStatus(
  device: BlockDevice,
  offset: number,
  length: number,
): Promise<{ offset: number; length: number; flags: number }[]> {
  const extents: Extent[] = await blockStatusAsync(device, offset, length);
  assert.ok(extents.length > 0, "at least one extent");
  let position = offset;
  const result = [];
  for (const extent of extents) {
    assert.ok(Number.isSafeInteger(extent.length) && extent.length > 0, "extent length positive");
    assert.equal(extent.flags & ~(ExtentFlags.HOLE | ExtentFlags.ZERO), 0, "known flags only");
    result.push({ offset: position, length: extent.length, flags: extent.flags });
    position += extent.length;
  }
  assert.ok(position <= offset + length, "extents stay within the request");
  assert.ok(position <= device.size, "extents never run past the end");
  for (const extent of result) {
    if (extent.flags & ExtentFlags.ZERO) {
      assert.ok(isZero(await readBytes(device, extent.offset, extent.length)), "ZERO extent reads as zeros");
    }
  }
  return result;
}

/** The flags of the byte at `at`, asking blockStatus from there. */
async function flagsAt(device: BlockDevice, at: number, length: number): Promise<number> {
  const [first] = await checkedStatus(device, at, length);
  return first.flags;
}

for (const backing of backings) {
  describe(`BlockDevice conformance: ${backing.name}`, () => {
    it("reports its size and a sane capability set", async () => {
      const device = await backing.create(1 * MiB);
      try {
        assert.equal(device.size, 1 * MiB);
        assert.equal(device.capabilities.readOnly, false);
        assert.ok(device.capabilities.flush && device.capabilities.fua && device.capabilities.multiConn);
        assert.ok(device.capabilities.trim && device.capabilities.zero && device.capabilities.extents);
        assert.equal(typeof device.kind, "string");
      } finally {
        await closeAsync(device);
      }
    });

    it("reads zeros where nothing was written", async () => {
      const device = await backing.create(256 * KiB);
      try {
        assert.ok(isZero(await readBytes(device, 0, 256 * KiB)));
        assert.ok(isZero(await readBytes(device, 12345, 777)));
      } finally {
        await closeAsync(device);
      }
    });

    it("reads back what was written, aligned and unaligned", async () => {
      const device = await backing.create(1 * MiB);
      try {
        const aligned = pattern(64 * KiB, 1);
        await writeAsync(device, aligned, 128 * KiB);
        assert.deepEqual(await readBytes(device, 128 * KiB, 64 * KiB), aligned);

        const unaligned = pattern(5001, 2);
        await writeAsync(device, unaligned, 4095);
        assert.deepEqual(await readBytes(device, 4095, 5001), unaligned);
        // Partial and straddling reads.
        assert.deepEqual(await readBytes(device, 4100, 33), unaligned.subarray(5, 38));
        const around = await readBytes(device, 4000, 5200);
        assert.ok(isZero(around.subarray(0, 95)));
        assert.deepEqual(around.subarray(95, 95 + 5001), unaligned);
        assert.ok(isZero(around.subarray(95 + 5001)));

        // Overwrite the middle of the earlier write.
        const patch = pattern(100, 3);
        await writeAsync(device, patch, 128 * KiB + 1000, true);
        const expected = Buffer.from(aligned);
        patch.copy(expected, 1000);
        assert.deepEqual(await readBytes(device, 128 * KiB, 64 * KiB), expected);

        // The last byte of the device.
        await writeAsync(device, Buffer.from([0x5a]), 1 * MiB - 1);
        assert.deepEqual(await readBytes(device, 1 * MiB - 2, 2), Buffer.from([0, 0x5a]));
        await flushAsync(device);
        await cacheAsync(device, 0, 1 * MiB);
      } finally {
        await closeAsync(device);
      }
    });

    it("zero and trim make ranges read as zeros and leave their surroundings alone", async () => {
      const size = 512 * KiB;
      const device = await backing.create(size);
      try {
        const data = pattern(size, 4);
        await writeAsync(device, data, 0);
        const model = Buffer.from(data);
        const ops: [string, number, number, number][] = [
          ["zero", 1000, 3000, ZeroFlags.NONE],
          ["zero", 64 * KiB, 64 * KiB, ZeroFlags.MAY_TRIM],
          ["zero", 200 * KiB + 7, 10 * KiB, ZeroFlags.FUA],
          ["zero", 300 * KiB - 1, 2, ZeroFlags.MAY_TRIM | ZeroFlags.FUA],
          ["trim", 384 * KiB, 64 * KiB, 0],
          ["trim", 450 * KiB + 3, 5000, 1],
        ];
        for (const [verb, offset, length, flags] of ops) {
          if (verb === "zero") await zeroAsync(device, offset, length, flags);
          else await trimAsync(device, offset, length, flags === 1);
          model.fill(0, offset, offset + length);
          assert.ok(
            isZero(await readBytes(device, offset, length)),
            `${verb} ${offset}+${length} reads zeros`,
          );
        }
        assert.deepEqual(await readBytes(device, 0, size), model);
      } finally {
        await closeAsync(device);
      }
    });

    it("blockStatus: holes when fresh, data after a write, holes again after trim", async () => {
      const size = 1 * MiB;
      const device = await backing.create(size);
      try {
        const fresh = await checkedStatus(device, 0, size);
        for (const extent of fresh) assert.equal(extent.flags, ExtentFlags.HOLE | ExtentFlags.ZERO);

        await writeAsync(device, pattern(64 * KiB, 5), 256 * KiB);
        assert.equal(await flagsAt(device, 256 * KiB, 64 * KiB), ExtentFlags.DATA);
        assert.equal(await flagsAt(device, 300 * KiB, 4 * KiB), ExtentFlags.DATA);
        assert.equal(await flagsAt(device, 0, 64 * KiB), ExtentFlags.HOLE | ExtentFlags.ZERO);
        assert.equal(await flagsAt(device, 512 * KiB, 64 * KiB), ExtentFlags.HOLE | ExtentFlags.ZERO);

        // Walk the whole device: the written range must be covered by DATA extents.
        let position = 0;
        let dataBytes = 0;
        while (position < size) {
          const extents = await checkedStatus(device, position, size - position);
          for (const extent of extents) {
            const overlapStart = Math.max(extent.offset, 256 * KiB);
            const overlapEnd = Math.min(extent.offset + extent.length, 320 * KiB);
            if (overlapEnd > overlapStart) {
              assert.equal(extent.flags, ExtentFlags.DATA, "written range reported as data");
              dataBytes += overlapEnd - overlapStart;
            }
            position = extent.offset + extent.length;
          }
        }
        assert.equal(dataBytes, 64 * KiB);

        await trimAsync(device, 256 * KiB, 64 * KiB);
        assert.equal((await flagsAt(device, 256 * KiB, 64 * KiB)) & ExtentFlags.ZERO, ExtentFlags.ZERO);
        await writeAsync(device, pattern(64 * KiB, 6), 256 * KiB);
        await zeroAsync(device, 256 * KiB, 64 * KiB, ZeroFlags.MAY_TRIM);
        assert.equal((await flagsAt(device, 256 * KiB, 64 * KiB)) & ExtentFlags.ZERO, ExtentFlags.ZERO);
      } finally {
        await closeAsync(device);
      }
    });

    it("blockStatus extents never run past the end, on odd sizes too", async () => {
      const size = 256 * KiB + 512;
      const device = await backing.create(size);
      try {
        await writeAsync(device, pattern(1000, 7), size - 1000);
        for (const [offset, length] of [
          [size - 1, 1],
          [size - 512, 512],
          [size - 5000, 5000],
          [0, size],
          [100, size - 100],
        ]) {
          const extents = await checkedStatus(device, offset, length);
          const last = extents[extents.length - 1];
          assert.ok(last.offset + last.length <= size);
        }
        assert.equal(await flagsAt(device, size - 1, 1), ExtentFlags.DATA);
      } finally {
        await closeAsync(device);
      }
    });

    it("blockStatus returns a bounded number of extents; walking on covers the whole device", async () => {
      const size = 8 * MiB;
      const device = await backing.create(size);
      try {
        const stride = 8 * KiB; // data, hole, data, hole, ...: 2 extents per stride, 2048 in all
        for (let offset = 0; offset < size; offset += stride)
          await writeAsync(device, pattern(512, offset), offset);
        const first = await checkedStatus(device, 0, size);
        assert.ok(first.length <= 1024, `${first.length} extents in one call`);
        let position = 0;
        let calls = 0;
        let dataBytes = 0;
        while (position < size) {
          const extents = await blockStatusAsync(device, position, size - position);
          calls++;
          for (const extent of extents) {
            if (extent.flags === ExtentFlags.DATA) dataBytes += extent.length;
            else assert.ok(position % stride >= 4 * KiB, "holes only where nothing was written");
            position += extent.length;
          }
        }
        assert.equal(position, size);
        assert.ok(calls >= 2, "the answer was split");
        assert.ok(dataBytes >= (size / stride) * 512);
      } finally {
        await closeAsync(device);
      }
    });

    it("FAST zero succeeds where the device claims fastZero, and fails NOT_SUPPORTED otherwise", async () => {
      const device = await backing.create(256 * KiB);
      try {
        await writeAsync(device, pattern(256 * KiB, 8), 0);
        for (const flags of [ZeroFlags.FAST, ZeroFlags.FAST | ZeroFlags.MAY_TRIM]) {
          const attempt = zeroAsync(device, 64 * KiB, 64 * KiB, flags);
          if (device.capabilities.fastZero) {
            await attempt;
            assert.ok(isZero(await readBytes(device, 64 * KiB, 64 * KiB)));
          } else {
            await assert.rejects(attempt, (err) => err instanceof VdiskError && err.code === "NOT_SUPPORTED");
          }
        }
        // The data around the zeroed range is untouched.
        assert.deepEqual(await readBytes(device, 0, 64 * KiB), pattern(256 * KiB, 8).subarray(0, 64 * KiB));
      } finally {
        await closeAsync(device);
      }
    });

    it("resize: growing reads zeros past the old end, shrinking discards the tail", async () => {
      const device = await backing.create(256 * KiB);
      try {
        const tail = pattern(8 * KiB, 9);
        await writeAsync(device, tail, 248 * KiB);
        await resizeAsync(device, 250 * KiB + 512); // cut through the written range, mid-page
        assert.equal(device.size, 250 * KiB + 512);
        assert.deepEqual(await readBytes(device, 248 * KiB, 2 * KiB + 512), tail.subarray(0, 2 * KiB + 512));

        await resizeAsync(device, 512 * KiB);
        assert.equal(device.size, 512 * KiB);
        assert.deepEqual(await readBytes(device, 248 * KiB, 2 * KiB + 512), tail.subarray(0, 2 * KiB + 512));
        assert.ok(isZero(await readBytes(device, 250 * KiB + 512, 512 * KiB - (250 * KiB + 512))));
        await checkedStatus(device, 0, 512 * KiB);
        await writeAsync(device, tail, 504 * KiB);
        assert.deepEqual(await readBytes(device, 504 * KiB, 8 * KiB), tail);

        await resizeAsync(device, 128 * KiB);
        assert.equal(device.size, 128 * KiB);
        const extents = await checkedStatus(device, 0, 128 * KiB);
        assert.ok(extents.every((extent) => extent.offset + extent.length <= 128 * KiB));
      } finally {
        await closeAsync(device);
      }
    });

    it("usage grows with writes and shrinks with trim", async () => {
      const device = await backing.create(4 * MiB);
      try {
        const before = (await usageAsync(device)).allocatedBytes;
        await writeAsync(device, pattern(1 * MiB, 10), 1 * MiB);
        const written = (await usageAsync(device)).allocatedBytes;
        assert.ok(written >= before + 1 * MiB, `usage ${before} -> ${written}`);
        await trimAsync(device, 1 * MiB, 1 * MiB);
        const trimmed = (await usageAsync(device)).allocatedBytes;
        assert.ok(trimmed < written, `usage after trim ${trimmed} < ${written}`);
      } finally {
        await closeAsync(device);
      }
    });

    it("never calls back synchronously, and calls back exactly once", async () => {
      const device = await backing.create(256 * KiB);
      const verbs: [string, (done: (err: unknown) => void) => void][] = [
        ["write", (done) => device.write(pattern(4096, 11), 0, false, done)],
        ["write fua", (done) => device.write(pattern(100, 12), 5000, true, done)],
        ["read", (done) => device.read(Buffer.alloc(8192), 0, done)],
        ["read hole", (done) => device.read(Buffer.alloc(100), 200 * KiB, done)],
        ["zero", (done) => device.zero(0, 100, ZeroFlags.NONE, done)],
        ["zero fast", (done) => device.zero(0, 4096, ZeroFlags.FAST | ZeroFlags.MAY_TRIM, () => done(null))],
        ["trim", (done) => device.trim(4096, 4096, true, done)],
        ["flush", (done) => device.flush(done)],
        ["cache", (done) => device.cache(0, 4096, done)],
        ["blockStatus", (done) => device.blockStatus(0, 256 * KiB, done)],
        ["usage", (done) => device.usage(done)],
        ["resize", (done) => device.resize(128 * KiB, done)],
        ["close", (done) => device.close(done)],
      ];
      for (const [name, call] of verbs) {
        let calls = 0;
        let returned = false;
        await new Promise<void>((resolve, reject) => {
          call((err) => {
            calls++;
            if (!returned) reject(new Error(`${name}: callback ran synchronously`));
            else if (err) reject(err as Error);
            else setImmediate(resolve); // leave time for a second (wrong) call
          });
          returned = true;
        });
        assert.equal(calls, 1, `${name}: exactly one callback`);
      }
    });

    it("a read-only device reads, reports readOnly, and refuses writes", async () => {
      const writable = await backing.create(64 * KiB);
      await writeAsync(writable, pattern(4096, 13), 0);
      const device = await backing.reopenReadOnly(writable);
      try {
        assert.equal(device.capabilities.readOnly, true);
        assert.equal(device.size, 64 * KiB);
        assert.equal(device.capabilities.trim || device.capabilities.zero || device.capabilities.fua, false);
        await readBytes(device, 0, 4096);
        await checkedStatus(device, 0, 64 * KiB);
        // The protocol edge refuses writes to read-only exports; reaching the device is a bug.
        assert.throws(() => device.write(Buffer.alloc(1), 0, false, () => undefined), /invariant violated/);
        assert.throws(() => device.zero(0, 1, 0, () => undefined), /invariant violated/);
        assert.throws(() => device.trim(0, 1, false, () => undefined), /invariant violated/);
        assert.throws(() => device.resize(4096, () => undefined), /invariant violated/);
      } finally {
        await closeAsync(device);
      }
    });

    it("asserts on out-of-range requests", async () => {
      const device = await backing.create(64 * KiB);
      try {
        assert.throws(
          () => device.read(Buffer.alloc(2), 64 * KiB - 1, () => undefined),
          /invariant violated/,
        );
        assert.throws(() => device.read(Buffer.alloc(0), 0, () => undefined), /invariant violated/);
        assert.throws(() => device.write(Buffer.alloc(1), -1, false, () => undefined), /invariant violated/);
        assert.throws(() => device.blockStatus(0, 64 * KiB + 1, () => undefined), /invariant violated/);
        assert.throws(() => device.zero(64 * KiB, 1, 0, () => undefined), /invariant violated/);
      } finally {
        await closeAsync(device);
      }
    });
  });
}

describe("MemoryDevice specifics", () => {
  it("reports merged holes on read and frees pages on all-zero writes", async () => {
    const device = new MemoryDevice(64 * KiB);
    await writeAsync(device, pattern(4096, 14), 8192);
    const buf = Buffer.alloc(32 * KiB);
    assert.deepEqual(await readAsync(device, buf, 0), [0, 8192, 12288, 32 * KiB - 12288]);
    assert.deepEqual(await readAsync(device, Buffer.alloc(100), 8192), []);
    assert.equal(device.allocatedPages, 1);
    await writeAsync(device, Buffer.alloc(4096), 8192);
    assert.equal(device.allocatedPages, 0);
    await writeAsync(device, pattern(10, 15), 100);
    await zeroAsync(device, 100, 10, ZeroFlags.NONE);
    assert.equal(device.allocatedPages, 0, "a page zeroed piecewise is freed");
    await closeAsync(device);
  });
});

describe("FileDevice specifics", () => {
  it("open: create refuses an existing file, missing files are NOT_FOUND, the size is the file's", async () => {
    const file = path.join(tmpDir, "specific.img");
    const device = await FileDevice.open(file, { create: 96 * KiB });
    await closeAsync(device);
    await assert.rejects(FileDevice.open(file, { create: 4096 }), { code: "DISK_EXISTS" });
    await assert.rejects(FileDevice.open(path.join(tmpDir, "missing.img")), { code: "NOT_FOUND" });
    await assert.rejects(FileDevice.open(tmpDir), (err) => err instanceof VdiskError);
    fs.truncateSync(file, 100 * KiB);
    const reopened = await FileDevice.open(file);
    assert.equal(reopened.size, 100 * KiB);
    assert.equal(reopened.kind, "raw");
    assert.equal(await readAsync(reopened, Buffer.alloc(10), 0), null, "FileDevice does not report holes");
    await closeAsync(reopened);
  });

  it("readNoWait answers page-cache hits synchronously and declines what it cannot fill", async () => {
    const file = path.join(tmpDir, "nowait.img");
    const device = await FileDevice.open(file, { create: 64 * KiB });
    try {
      const data = pattern(16 * KiB, 23);
      await writeAsync(device, data, 4096); // written through the page cache: it is cached now
      const hit = Buffer.alloc(8192);
      assert.equal(device.readNoWait(hit, 8192), true);
      assert.deepEqual(hit, data.subarray(4096, 4096 + 8192));
      fs.truncateSync(file, 10_000); // a short file: the tail is not in any cache, so it must decline
      assert.equal(device.readNoWait(Buffer.alloc(8192), 8192), false);
      assert.throws(() => device.readNoWait(Buffer.alloc(8192), 64 * KiB - 4096), /invariant/);
    } finally {
      await closeAsync(device);
    }
  });

  it("reads zeros past the end of a file that is shorter than the device", async () => {
    const file = path.join(tmpDir, "shorter.img");
    const device = await FileDevice.open(file, { create: 64 * KiB });
    try {
      await writeAsync(device, pattern(64 * KiB, 17), 0);
      fs.truncateSync(file, 10_000); // behind the device's back
      const buf = await readBytes(device, 8192, 16 * KiB);
      assert.deepEqual(buf.subarray(0, 10_000 - 8192), pattern(64 * KiB, 17).subarray(8192, 10_000));
      assert.ok(isZero(buf.subarray(10_000 - 8192)));
      await checkedStatus(device, 0, 64 * KiB);
    } finally {
      await closeAsync(device);
    }
  });

  it("zeroes through the fallocate fallbacks on tmpfs (/dev/shm) when it is there", async (t) => {
    if (!fs.existsSync("/dev/shm")) {
      t.skip("no /dev/shm");
      return;
    }
    const dir = fs.mkdtempSync("/dev/shm/vdisk-devices-");
    try {
      const device = await FileDevice.open(path.join(dir, "disk.img"), { create: 256 * KiB });
      await writeAsync(device, pattern(256 * KiB, 16), 0);
      // tmpfs has PUNCH_HOLE but not ZERO_RANGE: a NO_HOLE zero falls back to punching.
      await zeroAsync(device, 10 * KiB, 100 * KiB, ZeroFlags.NONE);
      await zeroAsync(device, 150 * KiB, 10 * KiB, ZeroFlags.FAST);
      const expected = pattern(256 * KiB, 16);
      expected.fill(0, 10 * KiB, 110 * KiB);
      expected.fill(0, 150 * KiB, 160 * KiB);
      assert.deepEqual(await readBytes(device, 0, 256 * KiB), expected);
      await checkedStatus(device, 0, 256 * KiB);
      await closeAsync(device);
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});
