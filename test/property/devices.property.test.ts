/**
 * Model-based property test of the BlockDevice backings: random sequences of write / zero / trim / read /
 * blockStatus / resize / flush on small disks (≤ 256 KiB), run against a plain Buffer model.
 *
 * Checked after every step: reads equal the model; `holes` reported by a read are zeros in the model;
 * blockStatus extents are non-empty, stay inside the request and the device, and every extent flagged ZERO
 * is zeros in the model. At the end the whole disk equals the model. fast-check prints the seed and the
 * shrunk sequence of any failure.
 */
import { after, before, describe, it } from "node:test";
import * as assert from "node:assert/strict";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import fc from "fast-check";

import { type BlockDevice, ExtentFlags, ZeroFlags } from "../../src/devices/block-device";
import { FileDevice } from "../../src/devices/file-device";
import { MemoryDevice } from "../../src/devices/memory-device";
import {
  blockStatusAsync,
  closeAsync,
  flushAsync,
  readAsync,
  resizeAsync,
  trimAsync,
  writeAsync,
  zeroAsync,
} from "../../src/devices/promises";

const sectorBytes = 512;
const sectorsMax = 512; // 256 KiB
const pageBytes = 4096;

type Content = "random" | "zeros" | "sparse";
type Op =
  | { kind: "write"; at: number; len: number; aligned: boolean; content: Content; seed: number; fua: boolean }
  | { kind: "zero"; at: number; len: number; aligned: boolean; flags: number }
  | { kind: "trim"; at: number; len: number; aligned: boolean; fua: boolean }
  | { kind: "read"; at: number; len: number; aligned: boolean }
  | { kind: "status"; at: number; len: number; aligned: boolean }
  | { kind: "resize"; sectors: number }
  | { kind: "flush" };

const range = { at: fc.nat(), len: fc.integer({ min: 1, max: 70_000 }), aligned: fc.boolean() };
const opArbitrary: fc.Arbitrary<Op> = fc.oneof(
  {
    weight: 4,
    arbitrary: fc.record({
      kind: fc.constant("write" as const),
      ...range,
      content: fc.constantFrom<Content>("random", "random", "zeros", "sparse"),
      seed: fc.nat(),
      fua: fc.boolean(),
    }),
  },
  {
    weight: 2,
    arbitrary: fc.record({
      kind: fc.constant("zero" as const),
      ...range,
      flags: fc.constantFrom(
        ZeroFlags.NONE,
        ZeroFlags.MAY_TRIM,
        ZeroFlags.FUA,
        ZeroFlags.FAST | ZeroFlags.MAY_TRIM,
        ZeroFlags.FAST,
      ),
    }),
  },
  { weight: 2, arbitrary: fc.record({ kind: fc.constant("trim" as const), ...range, fua: fc.boolean() }) },
  { weight: 3, arbitrary: fc.record({ kind: fc.constant("read" as const), ...range }) },
  { weight: 2, arbitrary: fc.record({ kind: fc.constant("status" as const), ...range }) },
  {
    weight: 1,
    arbitrary: fc.record({
      kind: fc.constant("resize" as const),
      sectors: fc.integer({ min: 1, max: sectorsMax }),
    }),
  },
  { weight: 1, arbitrary: fc.constant({ kind: "flush" as const }) },
);

const scenarioArbitrary = fc.record({
  sectors: fc.integer({ min: 1, max: sectorsMax }),
  ops: fc.array(opArbitrary, { minLength: 1, maxLength: 30 }),
});

/** Place a generated range inside a disk of `size` bytes: [offset, offset + length), length ≥ 1. */
function place(size: number, at: number, len: number, aligned: boolean): [number, number] {
  let offset = at % size;
  if (aligned) offset -= offset % pageBytes;
  const length = Math.min(aligned && len > pageBytes ? len - (len % pageBytes) : len, size - offset);
  return [offset, Math.max(1, length)];
}

function content(kind: Content, length: number, seed: number): Buffer {
  const buf = Buffer.alloc(length);
  if (kind === "zeros") return buf;
  let x = (seed | 1) >>> 0;
  for (let i = 0; i < length; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    if (kind === "random" || x % 97 === 0) buf[i] = x & 0xff;
  }
  return buf;
}

function isZero(buf: Buffer): boolean {
  return buf.every((byte) => byte === 0);
}

async function checkRead(device: BlockDevice, model: Buffer, offset: number, length: number): Promise<void> {
  const buf = Buffer.alloc(length, 0xee);
  const holes = await readAsync(device, buf, offset);
  assert.deepEqual(buf, model.subarray(offset, offset + length), `read ${offset}+${length}`);
  if (holes !== null) {
    assert.equal(holes.length % 2, 0);
    for (let i = 0; i < holes.length; i += 2) {
      assert.ok(holes[i] >= 0 && holes[i + 1] > 0 && holes[i] + holes[i + 1] <= length, "hole in the buffer");
      assert.ok(isZero(model.subarray(offset + holes[i], offset + holes[i] + holes[i + 1])), "hole is zeros");
    }
  }
}

async function checkStatus(
  device: BlockDevice,
  model: Buffer,
  offset: number,
  length: number,
): Promise<void> {
  const extents = await blockStatusAsync(device, offset, length);
  assert.ok(extents.length > 0);
  let position = offset;
  for (const extent of extents) {
    assert.ok(extent.length > 0);
    if (extent.flags & ExtentFlags.ZERO) {
      assert.ok(isZero(model.subarray(position, position + extent.length)), `ZERO extent at ${position}`);
    }
    position += extent.length;
  }
  assert.ok(position <= offset + length && position <= device.size, "extents within request and device");
}

async function run(device: BlockDevice, initialSize: number, ops: Op[]): Promise<void> {
  let model = Buffer.alloc(initialSize);
  try {
    for (const op of ops) {
      const size = model.length;
      switch (op.kind) {
        case "write": {
          const [offset, length] = place(size, op.at, op.len, op.aligned);
          const data = content(op.content, length, op.seed);
          await writeAsync(device, data, offset, op.fua);
          data.copy(model, offset);
          break;
        }
        case "zero": {
          const [offset, length] = place(size, op.at, op.len, op.aligned);
          try {
            await zeroAsync(device, offset, length, op.flags);
            model.fill(0, offset, offset + length);
          } catch (err) {
            // Only a FAST zero on a device without fast zeroing may fail, and it must change nothing.
            assert.ok(
              op.flags & ZeroFlags.FAST && !device.capabilities.fastZero,
              `zero failed: ${String(err)}`,
            );
            assert.equal((err as { code?: string }).code, "NOT_SUPPORTED");
          }
          break;
        }
        case "trim": {
          const [offset, length] = place(size, op.at, op.len, op.aligned);
          await trimAsync(device, offset, length, op.fua);
          model.fill(0, offset, offset + length); // our devices always make trimmed ranges zeros
          break;
        }
        case "read": {
          const [offset, length] = place(size, op.at, op.len, op.aligned);
          await checkRead(device, model, offset, length);
          break;
        }
        case "status": {
          const [offset, length] = place(size, op.at, op.len, op.aligned);
          await checkStatus(device, model, offset, length);
          break;
        }
        case "resize": {
          const newSize = op.sectors * sectorBytes;
          await resizeAsync(device, newSize);
          const resized = Buffer.alloc(newSize);
          model.copy(resized, 0, 0, Math.min(newSize, size));
          model = resized;
          assert.equal(device.size, newSize);
          break;
        }
        case "flush":
          await flushAsync(device);
          break;
      }
    }
    assert.equal(device.size, model.length);
    await checkRead(device, model, 0, model.length);
    await checkStatus(device, model, 0, model.length);
  } finally {
    await closeAsync(device);
  }
}

describe("BlockDevice model-based property", () => {
  let tmpDir = "";
  let fileCounter = 0;
  before(() => {
    tmpDir = fs.mkdtempSync(path.join(os.tmpdir(), "vdisk-property-"));
  });
  after(() => {
    fs.rmSync(tmpDir, { recursive: true, force: true });
  });

  it("MemoryDevice behaves like a Buffer", async () => {
    await fc.assert(
      fc.asyncProperty(scenarioArbitrary, async ({ sectors, ops }) => {
        const size = sectors * sectorBytes;
        await run(new MemoryDevice(size), size, ops);
      }),
      { numRuns: 500 },
    );
  });

  it("FileDevice behaves like a Buffer", async () => {
    await fc.assert(
      fc.asyncProperty(scenarioArbitrary, async ({ sectors, ops }) => {
        const size = sectors * sectorBytes;
        const file = path.join(tmpDir, `disk-${fileCounter++}.img`);
        try {
          await run(await FileDevice.open(file, { create: size }), size, ops);
        } finally {
          fs.rmSync(file, { force: true });
        }
      }),
      { numRuns: 300 },
    );
  });
});
