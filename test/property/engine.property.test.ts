/**
 * Model-based property test of the request engine: random bursts of overlapping reads (some through
 * readNoWait), writes (with and without FUA), zeroes, trims, block status queries, flushes and live
 * configure() calls, several per synchronous span with random waits between bursts, against
 * RequestEngine(ProbeDevice(MemoryDevice)) with random settings. The probe forwards each request after a
 * random number of loop turns, so device requests take effect in a scrambled order, and it flags any two
 * conflicting requests in flight together.
 *
 * The model is a plain Buffer that applies every operation at submission. The engine's ordering guarantee
 * (a request never overtakes an earlier overlapping one where either mutates) means every read must
 * return the model's bytes as of its submission, every ZERO extent must be zeros then, and the disk must
 * end equal to the model. Also checked: callbacks run exactly once, never synchronously, without error;
 * the device never sees more than queueDepth requests at once nor a read/write over maxRequestBytes; the
 * engine's counters add up. Across all runs merges, splits, overlap waits and fast-path reads must occur,
 * so the property cannot pass vacuously. Runs: VDISK_PROPERTY_RUNS (default 100).
 */
import { describe, it } from "node:test";
import * as assert from "node:assert/strict";
import fc from "fast-check";

import { type Extent, ExtentFlags, ZeroFlags } from "../../src/devices/block-device";
import { MemoryDevice } from "../../src/devices/memory-device";
import { closeAsync, readAsync } from "../../src/devices/promises";
import { type EngineSettings, RequestEngine, type SortMode } from "../../src/engine/request-engine";
import type { VdiskError } from "../../src/errors";
import { KiB } from "../../src/limits";
import { ProbeDevice } from "../../src/testing/probe-device";
import { Prng } from "../../src/testing/prng";

const diskBytes = 128 * KiB;
const page = 4 * KiB;
const runs = Number(process.env.VDISK_PROPERTY_RUNS ?? 100);

interface Range {
  at: number;
  len: number;
  aligned: boolean;
}
type Op =
  | ({ kind: "write"; seed: number; fua: boolean } & Range)
  | ({ kind: "zero"; flags: number } & Range)
  | ({ kind: "trim"; fua: boolean } & Range)
  | ({ kind: "read"; noWait: boolean } & Range)
  | ({ kind: "status" } & Range)
  | { kind: "flush" }
  | { kind: "configure"; settings: EngineSettings }
  /** `count` adjacent requests of `bytes` each from `at`, back to back (a sequential stream). */
  | { kind: "stream"; verb: "read" | "write"; at: number; bytes: number; count: number; seed: number };
type Gap = "none" | "microtask" | "immediate" | "turns" | "drain";

const settingsArbitrary: fc.Arbitrary<EngineSettings> = fc.record({
  merge: fc.boolean(),
  maxRequestBytes: fc.constantFrom(4 * KiB, 8 * KiB, 16 * KiB, 32 * KiB, 64 * KiB),
  queueDepth: fc.integer({ min: 1, max: 8 }),
  sort: fc.constantFrom<SortMode>("on", "off", "auto"),
});

// Ranges crowd into a small disk so that they overlap and touch often: page-aligned starts half the time.
const range = {
  at: fc.oneof(
    fc.integer({ min: 0, max: diskBytes / page - 1 }).map((index) => index * page),
    fc.nat({ max: diskBytes - 1 }),
  ),
  len: fc.oneof(
    { weight: 3, arbitrary: fc.integer({ min: 1, max: 4 }).map((pages) => pages * page) },
    { weight: 1, arbitrary: fc.integer({ min: 1, max: 3 * page }) },
    { weight: 1, arbitrary: fc.integer({ min: 1, max: 80 * KiB }) },
  ),
  aligned: fc.boolean(),
};

const opArbitrary: fc.Arbitrary<Op> = fc.oneof(
  {
    weight: 5,
    arbitrary: fc.record({
      kind: fc.constant("write" as const),
      ...range,
      seed: fc.nat(),
      fua: fc.boolean(),
    }),
  },
  {
    weight: 1,
    arbitrary: fc.record({
      kind: fc.constant("zero" as const),
      ...range,
      flags: fc.constantFrom(
        ZeroFlags.NONE,
        ZeroFlags.MAY_TRIM,
        ZeroFlags.FUA,
        ZeroFlags.FUA | ZeroFlags.MAY_TRIM,
      ),
    }),
  },
  { weight: 1, arbitrary: fc.record({ kind: fc.constant("trim" as const), ...range, fua: fc.boolean() }) },
  { weight: 5, arbitrary: fc.record({ kind: fc.constant("read" as const), ...range, noWait: fc.boolean() }) },
  { weight: 1, arbitrary: fc.record({ kind: fc.constant("status" as const), ...range }) },
  { weight: 1, arbitrary: fc.constant({ kind: "flush" as const }) },
  {
    weight: 1,
    arbitrary: fc.record({ kind: fc.constant("configure" as const), settings: settingsArbitrary }),
  },
  {
    weight: 2,
    arbitrary: fc.record({
      kind: fc.constant("stream" as const),
      verb: fc.constantFrom<"read" | "write">("read", "write"),
      at: range.at,
      bytes: fc.constantFrom(512, page, 2 * page, 3000),
      count: fc.integer({ min: 2, max: 8 }),
      seed: fc.nat(),
    }),
  },
);

const scenarioArbitrary = fc.record({
  settings: settingsArbitrary,
  rotational: fc.boolean(),
  delayTurnsMax: fc.integer({ min: 0, max: 3 }),
  seed: fc.nat(),
  bursts: fc.array(
    fc.record({
      ops: fc.array(opArbitrary, { minLength: 1, maxLength: 8 }),
      gap: fc.constantFrom<Gap>("none", "microtask", "immediate", "turns", "drain"),
    }),
    { minLength: 1, maxLength: 10 },
  ),
});
type Scenario = typeof scenarioArbitrary extends fc.Arbitrary<infer T> ? T : never;

/** Place a generated range inside the disk: [offset, offset + length), length >= 1. */
function place({ at, len, aligned }: Range): [number, number] {
  let offset = at % diskBytes;
  let length = len;
  if (aligned) {
    offset -= offset % 512;
    length = Math.max(512, length - (length % 512));
  }
  return [offset, Math.max(1, Math.min(length, diskBytes - offset))];
}

function content(length: number, seed: number): Buffer {
  const buf = Buffer.alloc(length);
  let x = (seed | 1) >>> 0;
  for (let index = 0; index < length; index++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    buf[index] = x & 0xff;
  }
  return buf;
}

function isZero(buf: Buffer): boolean {
  return buf.every((byte) => byte === 0);
}

/** Totals over all runs, to show the property exercised what it claims to. */
const totals = { merged: 0, split: 0, waitedForOverlap: 0, fastPathReads: 0, sortedRuns: 0 };

async function gap(kind: Gap, pending: Promise<void>[]): Promise<void> {
  switch (kind) {
    case "none":
      return;
    case "microtask":
      await Promise.resolve();
      return;
    case "immediate":
      await new Promise((resolve) => setImmediate(resolve));
      return;
    case "turns":
      for (let turn = 0; turn < 4; turn++) await new Promise((resolve) => setImmediate(resolve));
      return;
    case "drain":
      await Promise.all(pending);
      return;
  }
}

async function run(scenario: Scenario): Promise<void> {
  const memory = new MemoryDevice(diskBytes);
  const probe = new ProbeDevice(memory, {
    prng: new Prng(scenario.seed),
    delayTurnsMax: scenario.delayTurnsMax,
    rotational: scenario.rotational,
    noWait: true,
  });
  const engine = new RequestEngine(probe, scenario.settings);
  const model = Buffer.alloc(diskBytes);
  const pending: Promise<void>[] = [];
  const failures: string[] = [];
  let maxBytesUsed = scenario.settings.maxRequestBytes;
  let depthUsed = scenario.settings.queueDepth;
  let serial = 0;

  /** A callback for one request: checks it runs once, not synchronously, without error; then `check`. */
  const track = (
    name: string,
    check: (result: unknown) => void,
  ): { callback: (err: VdiskError | null, result?: unknown) => void; submitted: () => void } => {
    const label = `#${++serial} ${name}`;
    let calls = 0;
    let returned = false;
    let resolve = (): void => undefined;
    pending.push(new Promise<void>((settle) => (resolve = settle)));
    return {
      callback: (err, result) => {
        calls++;
        if (!returned) failures.push(`${label}: callback ran synchronously`);
        if (calls > 1) {
          failures.push(`${label}: callback ran ${calls} times`);
          return;
        }
        if (err !== null) failures.push(`${label}: failed: ${err.message}`);
        else {
          try {
            check(result);
          } catch (error) {
            failures.push(`${label}: ${(error as Error).message}`);
          }
        }
        resolve();
      },
      submitted: () => {
        returned = true;
      },
    };
  };

  const submit = (op: Op): void => {
    switch (op.kind) {
      case "write": {
        const [offset, length] = place(op);
        const data = content(length, op.seed);
        data.copy(model, offset);
        const { callback, submitted } = track(
          `write ${offset}+${length}${op.fua ? " fua" : ""}`,
          () => undefined,
        );
        engine.write(data, offset, op.fua, callback);
        submitted();
        return;
      }
      case "zero":
      case "trim": {
        const [offset, length] = place(op);
        model.fill(0, offset, offset + length);
        const { callback, submitted } = track(`${op.kind} ${offset}+${length}`, () => undefined);
        if (op.kind === "zero") engine.zero(offset, length, op.flags, callback);
        else engine.trim(offset, length, op.fua, callback);
        submitted();
        return;
      }
      case "read": {
        const [offset, length] = place(op);
        const expected = Buffer.from(model.subarray(offset, offset + length));
        const buf = Buffer.alloc(length, 0xee);
        if (op.noWait && engine.readNoWait(buf, offset)) {
          if (!buf.equals(expected))
            failures.push(`#${++serial} readNoWait ${offset}+${length}: stale bytes`);
          return;
        }
        const { callback, submitted } = track(`read ${offset}+${length}`, (result) => {
          assert.ok(buf.equals(expected), "bytes differ from the model at submission");
          const holes = result as number[] | null | undefined;
          if (holes === null || holes === undefined) return;
          assert.equal(holes.length % 2, 0, "holes come in pairs");
          for (let index = 0; index < holes.length; index += 2) {
            const [start, size] = [holes[index], holes[index + 1]];
            assert.ok(
              start >= 0 && size > 0 && start + size <= length,
              `hole ${start}+${size} inside the buffer`,
            );
            if (index > 0) assert.ok(start > holes[index - 2] + holes[index - 1], "holes ascending, apart");
            assert.ok(isZero(expected.subarray(start, start + size)), `hole ${start}+${size} is zeros`);
          }
        });
        engine.read(buf, offset, callback);
        submitted();
        return;
      }
      case "status": {
        const [offset, length] = place(op);
        const expected = Buffer.from(model.subarray(offset, offset + length));
        const { callback, submitted } = track(`blockStatus ${offset}+${length}`, (result) => {
          const extents = result as Extent[];
          assert.ok(extents.length > 0, "at least one extent");
          let position = 0;
          for (const extent of extents) {
            assert.ok(extent.length > 0, "extents are not empty");
            if (extent.flags & ExtentFlags.ZERO) {
              assert.ok(
                isZero(expected.subarray(position, position + extent.length)),
                `ZERO extent at ${position}`,
              );
            }
            position += extent.length;
          }
          assert.ok(position <= length, "extents within the request");
        });
        engine.blockStatus(offset, length, callback);
        submitted();
        return;
      }
      case "flush": {
        const { callback, submitted } = track("flush", () => undefined);
        engine.flush(callback);
        submitted();
        return;
      }
      case "stream":
        for (let index = 0; index < op.count; index++) {
          const at = op.at + index * op.bytes;
          if (at >= diskBytes) break;
          const len = op.bytes;
          if (op.verb === "write")
            submit({ kind: "write", at, len, aligned: false, seed: op.seed + index, fua: false });
          else submit({ kind: "read", at, len, aligned: false, noWait: false });
        }
        return;
      case "configure":
        engine.configure(op.settings);
        maxBytesUsed = Math.max(maxBytesUsed, op.settings.maxRequestBytes);
        depthUsed = Math.max(depthUsed, op.settings.queueDepth);
        return;
    }
  };

  for (const burst of scenario.bursts) {
    for (const op of burst.ops) submit(op);
    await gap(burst.gap, pending);
  }
  await Promise.all(pending);
  for (let turn = 0; turn < 3; turn++) await new Promise((resolve) => setImmediate(resolve)); // late repeats
  assert.deepEqual(failures, []);

  const stats = engine.stats();
  assert.equal(stats.queued, 0);
  assert.equal(stats.inflight, 0);
  assert.equal(stats.dispatched, stats.submitted + stats.split - stats.merged, "dispatch accounting");
  assert.equal(stats.dispatched, probe.calls.length, "every dispatch reached the device");
  assert.deepEqual(probe.violations, [], "conflicting requests were in flight together");
  assert.ok(probe.inflightMax <= depthUsed, `${probe.inflightMax} in flight, queue depth ${depthUsed}`);
  for (const call of probe.calls) {
    if (call.verb === "read" || call.verb === "write") {
      assert.ok(call.length <= maxBytesUsed, `${call.verb} of ${call.length} bytes over ${maxBytesUsed}`);
    }
  }
  totals.merged += stats.merged;
  totals.split += stats.split;
  totals.waitedForOverlap += stats.waitedForOverlap;
  totals.fastPathReads += stats.fastPathReads;
  if (stats.sorting) totals.sortedRuns++;

  const whole = Buffer.alloc(diskBytes, 0xee);
  await readAsync(engine, whole, 0);
  assert.ok(whole.equals(model), "the disk read through the engine equals the model");
  const direct = Buffer.alloc(diskBytes, 0xee);
  await readAsync(memory, direct, 0);
  assert.ok(direct.equals(model), "the device equals the model");
  await closeAsync(engine);
}

describe("RequestEngine model-based property", () => {
  it("keeps submission order for conflicting requests under random bursts, settings and completion order", async () => {
    await fc.assert(fc.asyncProperty(scenarioArbitrary, run), { numRuns: runs, includeErrorInReport: true });
    if (runs >= 50) {
      // Not vacuous: the runs merged, split, waited on overlaps, sorted and used the fast path.
      assert.ok(totals.merged > 0, "some requests were merged");
      assert.ok(totals.split > 0, "some requests were split");
      assert.ok(totals.waitedForOverlap > 0, "some requests waited for an overlapping one");
      assert.ok(totals.fastPathReads > 0, "some reads took the fast path");
      assert.ok(totals.sortedRuns > 0, "some runs sorted");
    }
  });
});
