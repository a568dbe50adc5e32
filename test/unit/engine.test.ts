/**
 * The request engine (src/engine/request-engine.ts) over a ProbeDevice that records what reaches the
 * device, wrapped around a MemoryDevice. Each check looks at both sides: what the callers got and what
 * the device was asked to do (how many requests, their sizes, order, flags, and how many at once).
 *
 * Requests "in one span" are submitted back to back without awaiting, as the NBD server does with the
 * requests of one socket chunk. Every callback is checked to run exactly once and never synchronously.
 */
import { describe, it } from "node:test";
import * as assert from "node:assert/strict";

import { type Extent, ExtentFlags, ZeroFlags } from "../../src/devices/block-device";
import { MemoryDevice } from "../../src/devices/memory-device";
import { readAsync, writeAsync } from "../../src/devices/promises";
import {
  checkEngineSettings,
  defaultEngineSettings,
  type EngineSettings,
  RequestEngine,
} from "../../src/engine/request-engine";
import { VdiskError } from "../../src/errors";
import { KiB, MiB } from "../../src/limits";
import { ProbeDevice, type ProbeOptions } from "../../src/testing/probe-device";
import { nonZeroPattern } from "../../src/testing/prng";

const page = 4 * KiB;

interface Outcome {
  err: VdiskError | null;
  result: unknown;
  /** Order in which callbacks ran, across all requests of a test. */
  order: number;
}

let completions = 0;

/** Submit one request; resolves with its outcome, rejects if its callback is synchronous or repeated. */
function settle(name: string, call: (done: (err: VdiskError | null, result?: unknown) => void) => void) {
  return new Promise<Outcome>((resolve, reject) => {
    let calls = 0;
    let returned = false;
    call((err, result) => {
      calls++;
      if (!returned) reject(new Error(`${name}: callback ran synchronously`));
      else if (calls > 1) reject(new Error(`${name}: callback ran twice`));
      else {
        const order = ++completions;
        setImmediate(() =>
          calls === 1 ? resolve({ err, result, order }) : reject(new Error(`${name}: callback ran twice`)),
        );
      }
    });
    returned = true;
  });
}

function read(engine: RequestEngine, buf: Buffer, offset: number): Promise<Outcome> {
  return settle(`read ${offset}+${buf.length}`, (done) => engine.read(buf, offset, done));
}
function write(engine: RequestEngine, buf: Buffer, offset: number, fua = false): Promise<Outcome> {
  return settle(`write ${offset}+${buf.length}`, (done) => engine.write(buf, offset, fua, done));
}
function zero(engine: RequestEngine, offset: number, length: number, flags = 0): Promise<Outcome> {
  return settle(`zero ${offset}+${length}`, (done) => engine.zero(offset, length, flags, done));
}
function flush(engine: RequestEngine): Promise<Outcome> {
  return settle("flush", (done) => engine.flush(done));
}
function close(engine: RequestEngine): Promise<Outcome> {
  return settle("close", (done) => engine.close(done));
}

/** Bytes never zero, distinct per seed. */
const pattern = nonZeroPattern;

function setup(
  settings: Partial<EngineSettings> = {},
  probeOptions: ProbeOptions = {},
  size = 4 * MiB,
): { probe: ProbeDevice; engine: RequestEngine } {
  const probe = new ProbeDevice(new MemoryDevice(size), probeOptions);
  return { probe, engine: new RequestEngine(probe, settings) };
}

async function readBack(engine: RequestEngine, offset: number, length: number): Promise<Buffer> {
  const buf = Buffer.alloc(length, 0xee);
  await readAsync(engine, buf, offset);
  return buf;
}

/** After everything completed: one device request per front-end request, less merges, plus pieces. */
function assertDrained(engine: RequestEngine, probe: ProbeDevice): void {
  const stats = engine.stats();
  assert.equal(stats.queued, 0);
  assert.equal(stats.inflight, 0);
  assert.equal(stats.dispatched, stats.submitted + stats.split - stats.merged, "dispatch accounting");
  assert.equal(stats.dispatched, probe.calls.length, "every dispatch reached the device");
  assert.deepEqual(probe.violations, [], "no conflicting requests in flight together");
}

describe("RequestEngine: merging", () => {
  it("turns 16 adjacent 4K writes of one span into one device write (16 with merge off)", async () => {
    for (const merge of [true, false]) {
      const { probe, engine } = setup({ merge, sort: "off" });
      const data = pattern(16 * page, 1);
      const order = [15, 3, 8, 0, 12, 7, 1, 14, 5, 10, 2, 9, 13, 4, 11, 6];
      const outcomes = await Promise.all(
        order.map((index) => write(engine, data.subarray(index * page, (index + 1) * page), index * page)),
      );
      assert.ok(outcomes.every((outcome) => outcome.err === null));
      const writes = probe.callsOf("write");
      if (merge) {
        assert.equal(writes.length, 1);
        assert.deepEqual([writes[0].offset, writes[0].length], [0, 16 * page]);
        assert.equal(engine.stats().merged, 15);
      } else {
        assert.equal(writes.length, 16);
        assert.equal(engine.stats().merged, 0);
      }
      assert.deepEqual(await readBack(engine, 0, 16 * page), data);
      assertDrained(engine, probe);
      assert.equal(engine.stats().submitted, 17);
    }
  });

  it("serves merged reads from one device read, each caller its slice and its own holes", async () => {
    const { probe, engine } = setup({ sort: "off" });
    const data = pattern(2 * page, 2);
    await writeAsync(engine, data.subarray(0, page), page); // page 1
    await writeAsync(engine, data.subarray(page), 3 * page); // page 3
    const buffers = Array.from({ length: 6 }, () => Buffer.alloc(page, 0xee));
    const odd = Buffer.alloc(page, 0xee); // straddles pages 1 and 2, overlapping two other reads
    const outcomes = await Promise.all([
      ...buffers.map((buf, index) => read(engine, buf, index * page)),
      read(engine, odd, page + page / 2),
    ]);
    const reads = probe.callsOf("read");
    assert.equal(reads.length, 1, "one device read");
    assert.deepEqual([reads[0].offset, reads[0].length], [0, 6 * page]);
    assert.equal(engine.stats().merged, 6);
    const expected = Buffer.alloc(6 * page);
    data.copy(expected, page, 0, page);
    data.copy(expected, 3 * page, page);
    buffers.forEach((buf, index) =>
      assert.deepEqual(buf, expected.subarray(index * page, (index + 1) * page)),
    );
    assert.deepEqual(odd, expected.subarray(page + page / 2, 2 * page + page / 2));
    // MemoryDevice reports unwritten pages as holes; each caller sees them in its own coordinates.
    assert.deepEqual(
      outcomes.map((outcome) => outcome.result),
      [[0, page], [], [0, page], [], [0, page], [0, page], [page / 2, page / 2]],
    );
    assertDrained(engine, probe);
  });

  it("merges overlapping writes with the later one winning, but never across a conflicting read", async () => {
    const { probe, engine } = setup({ sort: "off" });
    const first = pattern(2 * page, 3);
    const second = pattern(2 * page, 4);
    await Promise.all([write(engine, first, 0), write(engine, second, page)]);
    assert.equal(probe.callsOf("write").length, 1);
    assert.deepEqual(await readBack(engine, 0, 3 * page), Buffer.concat([first.subarray(0, page), second]));

    // write A, read, write B on the same bytes: the read must see A, so B cannot join A's device write.
    const a = pattern(page, 5);
    const b = pattern(page, 6);
    const seen = Buffer.alloc(page);
    const before = probe.callsOf("write").length;
    await Promise.all([write(engine, a, 8 * page), read(engine, seen, 8 * page), write(engine, b, 8 * page)]);
    assert.deepEqual(seen, a);
    assert.equal(probe.callsOf("write").length - before, 2);
    assert.deepEqual(await readBack(engine, 8 * page, page), b);
    assertDrained(engine, probe);
  });

  it("propagates FUA through merges and splits", async () => {
    const { probe, engine } = setup({ sort: "off", maxRequestBytes: 16 * KiB });
    await Promise.all([
      write(engine, pattern(page, 1), 0),
      write(engine, pattern(page, 2), page, true),
      write(engine, pattern(page, 3), 2 * page),
    ]);
    await Promise.all([write(engine, pattern(page, 4), 8 * page), write(engine, pattern(page, 5), 9 * page)]);
    await write(engine, pattern(64 * KiB, 6), 32 * page, true);
    const writes = probe.callsOf("write");
    assert.deepEqual(
      writes.map((call) => [call.offset / page, call.length / page, call.fua]),
      [
        [0, 3, true],
        [8, 2, false],
        [32, 4, true],
        [36, 4, true],
        [40, 4, true],
        [44, 4, true],
      ],
    );
    assertDrained(engine, probe);
  });

  it("gives every merged caller the device's error", async () => {
    const { probe, engine } = setup({ sort: "off" });
    probe.failNext("write", "NO_SPACE");
    const outcomes = await Promise.all(
      [0, 1, 2, 3].map((index) => write(engine, pattern(page, index), index * page)),
    );
    assert.equal(probe.callsOf("write").length, 1);
    for (const outcome of outcomes) {
      assert.ok(outcome.err instanceof VdiskError);
      assert.equal(outcome.err.code, "NO_SPACE");
    }
    probe.failNext("read");
    const reads = await Promise.all([0, 1].map((index) => read(engine, Buffer.alloc(page), index * page)));
    assert.deepEqual(
      reads.map((outcome) => outcome.err?.code),
      ["IO_ERROR", "IO_ERROR"],
    );
    assertDrained(engine, probe);
  });
});

describe("RequestEngine: request size", () => {
  it("caps merges at maxRequestBytes and splits larger requests into pieces, one callback each", async () => {
    const { probe, engine } = setup({ sort: "off", maxRequestBytes: 16 * KiB });
    const data = pattern(16 * page, 7);
    await Promise.all(
      Array.from({ length: 16 }, (_, index) =>
        write(engine, data.subarray(index * page, (index + 1) * page), index * page),
      ),
    );
    assert.deepEqual(
      probe.callsOf("write").map((call) => call.length),
      [16 * KiB, 16 * KiB, 16 * KiB, 16 * KiB],
    );

    const big = pattern(100 * KiB, 8);
    const before = probe.calls.length;
    const outcome = await write(engine, big, 256 * KiB);
    assert.equal(outcome.err, null);
    const pieces = probe.calls.slice(before);
    assert.deepEqual(
      pieces.map((call) => [call.verb, call.offset - 256 * KiB, call.length]),
      [0, 16, 32, 48, 64, 80, 96].map((at) => ["write", at * KiB, at === 96 ? 4 * KiB : 16 * KiB]),
    );
    assert.equal(engine.stats().split, 6);

    // An unaligned request is cut at 4 KiB-aligned device offsets: no sector is written by two pieces.
    const unaligned = pattern(40 * KiB, 9);
    const mark = probe.calls.length;
    await write(engine, unaligned, 512 * KiB + 1000);
    assert.deepEqual(
      probe.calls.slice(mark).map((call) => [call.offset - 512 * KiB, call.length]),
      [
        [1000, 16 * KiB - 1000],
        [16 * KiB, 16 * KiB],
        [32 * KiB, 8 * KiB + 1000],
      ],
    );
    assert.deepEqual(await readBack(engine, 512 * KiB + 1000, 40 * KiB), unaligned);

    // A split read: pieces land in the caller's buffer; holes come back sorted, in caller coordinates.
    const target = Buffer.alloc(160 * KiB, 0xee);
    const readOutcome = await read(engine, target, 224 * KiB); // 32 KiB of holes, 100 KiB data, 28 KiB holes
    assert.equal(readOutcome.err, null);
    assert.deepEqual(target, Buffer.concat([Buffer.alloc(32 * KiB), big, Buffer.alloc(28 * KiB)]));
    assert.deepEqual(readOutcome.result, [0, 32 * KiB, 132 * KiB, 28 * KiB]);
    assert.ok(probe.callsOf("read").every((call) => call.length <= 16 * KiB));
    assertDrained(engine, probe);
  });

  it("passes zero and trim through whole, however large", async () => {
    const { probe, engine } = setup({ maxRequestBytes: 16 * KiB });
    await write(engine, pattern(MiB, 9), 0);
    await zero(engine, 0, MiB, ZeroFlags.MAY_TRIM);
    await settle("trim", (done) => engine.trim(MiB, MiB, false, done));
    assert.deepEqual(
      probe.calls.filter((call) => call.verb !== "write").map((call) => [call.verb, call.length]),
      [
        ["zero", MiB],
        ["trim", MiB],
      ],
    );
    assert.deepEqual(await readBack(engine, 0, MiB), Buffer.alloc(MiB));
    assertDrained(engine, probe);
  });
});

describe("RequestEngine: queue depth and sorting", () => {
  it("never has more than queueDepth requests at the device", async () => {
    const { probe, engine } = setup({ queueDepth: 3 }, { delayMs: { read: 5 } });
    const outcomes = Array.from(
      { length: 20 },
      (_, index) => read(engine, Buffer.alloc(page), index * 2 * page), // not adjacent: no merging
    );
    await Promise.resolve(); // the span's dispatch microtask has run, no device request completed yet
    assert.equal(engine.stats().inflight, 3);
    assert.equal(engine.stats().queued, 17);
    await Promise.all(outcomes);
    assert.equal(probe.inflightMax, 3);
    assert.equal(probe.callsOf("read").length, 20);
    assert.equal(engine.stats().queuedMax, 20);
    assertDrained(engine, probe);
  });

  it("issues a span's requests in C-LOOK address order on a rotational device (sort auto)", async () => {
    const { probe, engine } = setup({ merge: false }, { rotational: true });
    assert.equal(engine.stats().sorting, true);
    const block = 64 * KiB;
    await Promise.all([9, 3, 7, 1, 5].map((index) => write(engine, pattern(page, index), index * block)));
    assert.deepEqual(
      probe.callsOf("write").map((call) => call.offset / block),
      [1, 3, 5, 7, 9],
    );
    // The head is now past block 9: block 10 comes next, then the sweep wraps to the lowest.
    await Promise.all([2, 10, 4].map((index) => write(engine, pattern(page, index), index * block)));
    assert.deepEqual(
      probe.callsOf("write").map((call) => call.offset / block),
      [1, 3, 5, 7, 9, 10, 2, 4],
    );
    assertDrained(engine, probe);

    const plain = setup({ merge: false }); // not rotational: auto means off, submission order
    assert.equal(plain.engine.stats().sorting, false);
    await Promise.all([9, 3, 7].map((index) => write(plain.engine, pattern(page, index), index * block)));
    assert.deepEqual(
      plain.probe.callsOf("write").map((call) => call.offset / block),
      [9, 3, 7],
    );
  });
});

describe("RequestEngine: ordering", () => {
  it("makes a read wait for a slow overlapping write submitted before it", async () => {
    const { probe, engine } = setup({}, { delayMs: { write: 30 } });
    const data = pattern(2 * page, 10);
    const seen = Buffer.alloc(page);
    const pending = [write(engine, data, 0), read(engine, seen, page / 2)];
    await Promise.resolve(); // the span was dispatched: the write is at the device now
    assert.deepEqual([engine.stats().inflight, engine.stats().queued], [1, 1]);
    const late = Buffer.alloc(page);
    pending.push(read(engine, late, page)); // submitted after dispatch, while the write is in flight
    const [written, first, second] = await Promise.all(pending);
    assert.equal(written.err, null);
    assert.deepEqual(seen, data.subarray(page / 2, page / 2 + page));
    assert.deepEqual(late, data.subarray(page));
    assert.ok(written.order < first.order && written.order < second.order);
    const [writeCall] = probe.callsOf("write");
    for (const readCall of probe.callsOf("read")) assert.ok(readCall.issuedAt > writeCall.completedAt);
    assert.equal(engine.stats().waitedForOverlap, 2);
    assertDrained(engine, probe);
  });

  it("makes a write wait for a slow overlapping read, and overlapping writes keep their order", async () => {
    const { probe, engine } = setup({ merge: false }, { delayMs: { read: 20, write: 10 } });
    const old = pattern(page, 11);
    await writeAsync(engine, old, 0);
    const seen = Buffer.alloc(page);
    const newer = pattern(page, 12);
    const newest = pattern(page, 13);
    await Promise.all([
      read(engine, seen, 0),
      write(engine, newer, 0),
      write(engine, newest.subarray(0, page / 2), 0),
    ]);
    assert.deepEqual(seen, old);
    assert.deepEqual(
      await readBack(engine, 0, page),
      Buffer.concat([newest.subarray(0, page / 2), newer.subarray(page / 2)]),
    );
    assertDrained(engine, probe);
  });

  it("lets reads of different bytes pass a slow write", async () => {
    const { probe, engine } = setup({}, { delayMs: { write: 100 } });
    const slow = write(engine, pattern(page, 14), 0);
    const fast = await read(engine, Buffer.alloc(page), 8 * page);
    assert.equal(engine.stats().inflight, 1, "the write is still in flight when the read completes");
    const done = await slow;
    assert.ok(fast.order < done.order);
    assertDrained(engine, probe);
  });

  it("orders block status after an overlapping write", async () => {
    const { probe, engine } = setup();
    const [, status] = await Promise.all([
      write(engine, pattern(page, 15), page),
      settle("blockStatus", (done) => engine.blockStatus(0, 3 * page, done)),
    ]);
    assert.deepEqual(status.result as Extent[], [
      { length: page, flags: ExtentFlags.HOLE | ExtentFlags.ZERO },
      { length: page, flags: ExtentFlags.DATA },
      { length: page, flags: ExtentFlags.HOLE | ExtentFlags.ZERO },
    ]);
    assertDrained(engine, probe);
  });

  it("completes a flush only after every earlier write, without holding later ones back", async () => {
    const { probe, engine } = setup({ sort: "off" }, { delayMs: { write: 20 } });
    const before = [0, 1, 2].map((index) => write(engine, pattern(page, index), index * page));
    const flushed = flush(engine);
    const after = write(engine, pattern(page, 3), 3 * page); // adjacent, but after the flush: not merged
    const outcomes = await Promise.all([...before, flushed, after]);
    const flushOutcome = outcomes[3];
    assert.equal(flushOutcome.err, null);
    for (const outcome of outcomes.slice(0, 3)) assert.ok(outcome.order < flushOutcome.order);
    const writes = probe.callsOf("write");
    assert.deepEqual(
      writes.map((call) => [call.offset / page, call.length / page]),
      [
        [0, 3],
        [3, 1],
      ],
    );
    const [flushCall] = probe.callsOf("flush");
    assert.ok(flushCall.issuedAt > writes[0].completedAt, "device flush after the earlier writes completed");
    assert.ok(writes[1].issuedAt < flushCall.issuedAt, "the later write did not wait for the flush");
    assertDrained(engine, probe);
  });

  it("treats resize as a barrier and close waits for everything queued", async () => {
    const { probe, engine } = setup({}, { delayMs: { write: 15 } }, MiB);
    const data = pattern(page, 16);
    const written = write(engine, data, MiB - page);
    const resized = settle("resize", (done) => engine.resize(2 * MiB, done));
    const tail = Buffer.alloc(page, 0xee);
    const readTail = read(engine, tail, MiB - page);
    const outcomes = await Promise.all([written, resized, readTail]);
    assert.ok(outcomes[0].order < outcomes[1].order && outcomes[1].order < outcomes[2].order);
    assert.equal(engine.size, 2 * MiB);
    assert.deepEqual(tail, data);

    const last = write(engine, pattern(page, 17), 0);
    const closed = close(engine);
    const [lastOutcome, closeOutcome] = await Promise.all([last, closed]);
    assert.equal(closeOutcome.err, null);
    assert.ok(lastOutcome.order < closeOutcome.order);
    assert.deepEqual(probe.violations, []);
    assert.throws(() => engine.flush(() => undefined), /verb after close/);
  });
});

describe("RequestEngine: readNoWait", () => {
  it("passes through to the device unless an overlapping write is queued or in flight", async () => {
    const { probe, engine } = setup({}, { noWait: true, noWaitMissRate: 0, delayMs: { write: 20 } });
    const old = pattern(page, 18);
    await writeAsync(engine, old, 0);
    const buf = Buffer.alloc(page);
    assert.equal(engine.readNoWait(buf, 0), true);
    assert.deepEqual(buf, old);

    const newer = pattern(page, 19);
    const pending = write(engine, newer, 0);
    assert.equal(
      engine.readNoWait(Buffer.alloc(page), page / 2),
      false,
      "declines while the write is queued",
    );
    assert.equal(engine.readNoWait(Buffer.alloc(page), 4 * page), true, "other bytes still pass");
    await Promise.resolve(); // dispatched, not completed
    assert.equal(engine.stats().inflight, 1);
    assert.equal(engine.readNoWait(Buffer.alloc(page), 0), false, "declines while the write is in flight");
    await pending;
    assert.equal(engine.readNoWait(buf, 0), true);
    assert.deepEqual(buf, newer);
    assert.equal(engine.stats().fastPathReads, 3);
    assert.equal(probe.noWaitHits, 3);

    // A device without readNoWait: the engine always declines.
    const withoutFastPath = new MemoryDevice(MiB);
    Object.defineProperty(withoutFastPath, "readNoWait", { value: undefined });
    const bare = new RequestEngine(withoutFastPath);
    assert.equal(bare.readNoWait(Buffer.alloc(page), 0), false);
  });
});

describe("RequestEngine: settings", () => {
  it("applies configure() to requests dispatched afterwards, also while requests wait", async () => {
    const { probe, engine } = setup({ merge: false, queueDepth: 1, sort: "off" }, { delayMs: { read: 5 } });
    const reads = Array.from({ length: 12 }, (_, index) => read(engine, Buffer.alloc(page), index * page));
    await Promise.resolve();
    assert.deepEqual([engine.stats().inflight, engine.stats().queued], [1, 11]);
    engine.configure({ ...engine.settings, merge: true, queueDepth: 4 });
    await Promise.all(reads);
    // One read was at the device alone; the 11 waiting ones were merged into one at the next dispatch.
    assert.deepEqual(
      probe.callsOf("read").map((call) => call.length / page),
      [1, 11],
    );
    assert.equal(engine.settings.queueDepth, 4);

    engine.configure({ ...engine.settings, merge: false });
    const reads2 = Array.from({ length: 8 }, (_, index) =>
      read(engine, Buffer.alloc(page), index * 2 * page),
    );
    await Promise.all(reads2);
    assert.equal(probe.inflightMax, 4);
    assert.equal(probe.callsOf("read").length, 10);
    assert.throws(
      () => engine.configure({ ...engine.settings, queueDepth: 0 }),
      (err: unknown) => err instanceof VdiskError && err.code === "INVALID_ARGUMENT",
    );
    assert.equal(engine.settings.queueDepth, 4, "a rejected configure changes nothing");
    assertDrained(engine, probe);
  });

  it("checkEngineSettings fills defaults and rejects bad input, saying what is allowed", () => {
    assert.deepEqual(checkEngineSettings({}), defaultEngineSettings);
    assert.deepEqual(defaultEngineSettings, {
      merge: true,
      maxRequestBytes: 32 * MiB,
      queueDepth: 64,
      sort: "auto",
    });
    const base: EngineSettings = { merge: false, maxRequestBytes: 64 * KiB, queueDepth: 8, sort: "on" };
    assert.deepEqual(checkEngineSettings({ queueDepth: 16, merge: undefined }, base), {
      ...base,
      queueDepth: 16,
    });
    assert.deepEqual(checkEngineSettings({ maxRequestBytes: 32 * MiB, sort: "off" }), {
      ...defaultEngineSettings,
      maxRequestBytes: 32 * MiB,
      sort: "off",
    });
    const rejects: [unknown, RegExp][] = [
      [null, /must be an object/],
      [[1], /must be an object.*an array/],
      ["merge", /must be an object/],
      [{ mrege: true }, /unknown engine setting "mrege"; known settings: merge, maxRequestBytes/],
      [{ merge: "yes" }, /merge must be true or false; got "yes"/],
      [{ maxRequestBytes: 1000 }, /maxRequestBytes .* from 4096 to 33554432 .* multiple of 512; got 1000/],
      [{ maxRequestBytes: 4097 }, /multiple of 512; got 4097/],
      [{ maxRequestBytes: 64 * MiB }, /maxRequestBytes.*got 67108864/],
      [{ maxRequestBytes: "1M" }, /maxRequestBytes.*got "1M"/],
      [{ queueDepth: 0 }, /queueDepth must be a whole number from 1 to 1024; got 0/],
      [{ queueDepth: 1025 }, /from 1 to 1024; got 1025/],
      [{ queueDepth: 2.5 }, /from 1 to 1024; got 2.5/],
      [{ sort: "fast" }, /sort must be "auto", "on" or "off"; got "fast"/],
      [{ sort: true }, /sort must be .*; got true/],
    ];
    for (const [input, message] of rejects) {
      assert.throws(
        () => checkEngineSettings(input),
        (err: unknown) =>
          err instanceof VdiskError && err.code === "INVALID_ARGUMENT" && message.test(err.message),
        `input ${JSON.stringify(input)}`,
      );
    }
    assert.throws(() => new RequestEngine(new MemoryDevice(MiB), { queueDepth: -1 }), /queueDepth/);
  });
});
