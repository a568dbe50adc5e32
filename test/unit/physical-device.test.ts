/**
 * PhysicalDevice: several files on one modelled device. Data through handles (real offsets to the files),
 * one hdd head shared by two files (exact makespans on the simulated clock), priority dispatch and aging
 * (exact dispatch orders), queue limits by model, pass-through for a real device (model null), callbacks
 * exactly once and never synchronous, close, option checks, and one small real-clock run. The BlockDevice
 * contract itself is checked by the conformance suite in devices.test.ts, which runs against a handle.
 */
import { describe, it } from "node:test";
import * as assert from "node:assert/strict";
import { performance } from "node:perf_hooks";

import type { BlockDevice } from "../../src/devices/block-device";
import { type HddLatencyModel, hddServiceUs, type LatencyModel } from "../../src/devices/latency-device";
import { MemoryDevice } from "../../src/devices/memory-device";
import {
  type DeviceHandle,
  PhysicalDevice,
  type PhysicalDeviceOptions,
  priorityAgingMs,
  priorities,
} from "../../src/devices/physical-device";
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
import { GiB, KiB, MiB } from "../../src/limits";
import { CrashDevice } from "../../src/testing/crash-device";
import { Prng } from "../../src/testing/prng";

const hdd: HddLatencyModel = { kind: "hdd" };
/** An hdd whose flush costs exactly 100 ms (flush = command overhead, no head movement). */
const slowCommands: LatencyModel = { kind: "hdd", commandOverheadUs: 100_000 };

function simulated(model: LatencyModel, modelBytes = 1 * GiB, extra: Partial<PhysicalDeviceOptions> = {}) {
  return new PhysicalDevice({ model, clock: "simulated", modelBytes, ...extra });
}

function isInvalid(err: unknown): boolean {
  return err instanceof VdiskError && err.code === "INVALID_ARGUMENT";
}

/** Submit `count` flushes on `handle`, recording `name` + index in `order` as each completes. */
function flushes(handle: DeviceHandle, name: string, count: number, order: string[]): Promise<void>[] {
  return Array.from({ length: count }, (_, index) =>
    flushAsync(handle).then(() => {
      order.push(`${name}${index}`);
    }),
  );
}

describe("PhysicalDevice, data path", () => {
  it("each handle reads and writes its own file at the real offsets; holes, kind and capabilities", async () => {
    const device = simulated(hdd);
    const innerA = new MemoryDevice(1 * MiB);
    const innerB = new MemoryDevice(1 * MiB);
    const a = device.attach(innerA);
    const b = device.attach(innerB, "background");
    assert.equal(a.fileIndex, 0);
    assert.equal(b.fileIndex, 1);
    assert.equal(a.priority, "normal");
    assert.equal(b.priority, "background");
    assert.equal(device.slotBytes, GiB / 16);
    assert.equal(device.modelPosition(1, 4096), GiB / 16 + 4096);
    assert.equal(device.modelPosition(17, 4096), (17 * (GiB / 16) + 4096) % GiB);

    const dataA = Buffer.alloc(8192, 0xa1);
    const dataB = Buffer.alloc(8192, 0xb2);
    await Promise.all([writeAsync(a, dataA, 4096), writeAsync(b, dataB, 4096)]);
    const buf = Buffer.alloc(16 * KiB, 0xee);
    const holes = await readAsync(a, buf, 0);
    assert.deepEqual(buf.subarray(4096, 12288), dataA);
    assert.deepEqual(holes, [0, 4096, 12288, 4096], "holes pass through");
    assert.deepEqual(await readAsync(b, buf, 0), [0, 4096, 12288, 4096]);
    assert.deepEqual(buf.subarray(4096, 12288), dataB);
    // The files themselves hold the data at the same (real) offsets.
    const direct = Buffer.alloc(8192);
    await readAsync(innerB, direct, 4096);
    assert.deepEqual(direct, dataB);

    await zeroAsync(a, 4096, 4096, 0);
    await trimAsync(b, 8192, 4096);
    await cacheAsync(a, 0, 8192);
    await flushAsync(b);
    await readAsync(a, buf, 0);
    assert.ok(buf.subarray(0, 8192).every((byte) => byte === 0));
    assert.deepEqual(buf.subarray(8192, 12288), Buffer.alloc(4096, 0xa1));
    await readAsync(b, buf, 0);
    assert.ok(buf.subarray(8192, 12288).every((byte) => byte === 0));

    assert.equal(a.kind, "memory+hdd");
    assert.equal(a.size, 1 * MiB);
    assert.deepEqual(a.capabilities, { ...innerA.capabilities, rotational: true });
    assert.equal(a.readNoWait?.(Buffer.alloc(16), 0), false, "nothing bypasses the model");
    const ssd = simulated({ kind: "ssd" }).attach(new MemoryDevice(4096));
    assert.equal(ssd.kind, "memory+ssd");
    assert.equal(ssd.capabilities.rotational, false);

    // Metadata verbs bypass the model and the queue.
    const requests = device.stats().requests;
    await blockStatusAsync(a, 0, 1 * MiB);
    await usageAsync(b);
    await resizeAsync(b, 2 * MiB);
    assert.equal(b.size, 2 * MiB);
    assert.equal(device.stats().requests, requests);
    assert.equal(device.stats().latency?.requests, requests);
    await Promise.all([closeAsync(a), closeAsync(b), closeAsync(ssd)]);
  });

  it("inner errors reach the caller at the modelled time", async () => {
    const device = simulated({ kind: "fixed", latencyUs: 700 });
    const inner = new CrashDevice(64 * KiB, { prng: new Prng(1), reorder: false });
    const handle = device.attach(inner);
    inner.failNext("read");
    await assert.rejects(
      readAsync(handle, Buffer.alloc(512), 0),
      (err) => err instanceof VdiskError && err.code === "IO_ERROR",
    );
    assert.equal(device.stats().latency?.simulatedNowUs, 700);
    await readAsync(handle, Buffer.alloc(512), 0);
    await closeAsync(handle);
  });
});

describe("PhysicalDevice, shared timeline (simulated clock)", () => {
  it("two files on one hdd share one head: interleaved random reads take the sum, not the max", async () => {
    const modelBytes = 1 * GiB;
    const fileBytes = 64 * MiB;
    const count = 20;
    const prng = new Prng(11);
    const offsetsA = Array.from({ length: count }, () => prng.int(fileBytes / 4096) * 4096);
    const offsetsB = Array.from({ length: count }, () => prng.int(fileBytes / 4096) * 4096);

    /** Interleaved A0 B0 A1 B1 ... on one device (or only one file's reads); returns the makespan. */
    async function run(files: ("A" | "B")[]): Promise<{ makespanUs: number; expectedUs: number }> {
      const device = simulated(hdd, modelBytes);
      const handles = {
        A: device.attach(new MemoryDevice(fileBytes)),
        B: device.attach(new MemoryDevice(fileBytes)),
      };
      const offsets = { A: offsetsA, B: offsetsB };
      const submitted: Promise<unknown>[] = [];
      let head = 0;
      let expectedUs = 0;
      for (let index = 0; index < count; index++) {
        for (const file of files) {
          const offset = offsets[file][index];
          submitted.push(readAsync(handles[file], Buffer.alloc(4096), offset));
          // One head, FIFO at one priority: each read starts where the previous one left the head.
          const position = device.modelPosition(handles[file].fileIndex, offset);
          expectedUs += hddServiceUs(hdd, head, position, 4096, modelBytes);
          head = position + 4096;
        }
      }
      await Promise.all(submitted);
      const stats = device.stats();
      assert.equal(stats.queuedMax, files.length * count - 1, "one in the model, the rest queued");
      // The model holds one request at a time; the timeline counts one more while a request that is due
      // waits for its callback (its successor enters the model at its due time).
      assert.ok((stats.latency?.queuedMax ?? 0) <= 2, `timeline held ${stats.latency?.queuedMax}`);
      await Promise.all([closeAsync(handles.A), closeAsync(handles.B)]);
      return { makespanUs: stats.latency?.simulatedNowUs ?? NaN, expectedUs };
    }

    const shared = await run(["A", "B"]);
    assert.ok(
      Math.abs(shared.makespanUs - shared.expectedUs) < 1e-6,
      `${shared.makespanUs} vs ${shared.expectedUs}`,
    );
    const alone = await run(["A"]);
    const other = await run(["B"]);
    assert.ok(Math.abs(alone.makespanUs - alone.expectedUs) < 1e-6);
    const sumUs = alone.makespanUs + other.makespanUs;
    assert.ok(shared.makespanUs > 0.9 * sumUs, `shared ${shared.makespanUs} µs vs sum ${sumUs} µs`);
    assert.ok(shared.makespanUs > 1.5 * Math.max(alone.makespanUs, other.makespanUs));
  });

  it("priority: a realtime request submitted behind a background backlog is dispatched next", async () => {
    const device = simulated(hdd);
    const background = device.attach(new MemoryDevice(64 * MiB), "background");
    const normal = device.attach(new MemoryDevice(64 * MiB));
    const realtime = device.attach(new MemoryDevice(64 * MiB), "realtime");
    const order: string[] = [];
    const read = (handle: DeviceHandle, name: string, offset: number): Promise<void> =>
      readAsync(handle, Buffer.alloc(4096), offset).then(() => {
        order.push(name);
      });
    const prng = new Prng(5);
    const submitted: Promise<void>[] = [];
    for (let index = 0; index < 8; index++)
      submitted.push(read(background, `bg${index}`, prng.int(16384) * 4096));
    submitted.push(read(normal, "normal", 0));
    submitted.push(read(realtime, "rt", 0));
    background.priority = "realtime"; // applies to what it submits from now on
    submitted.push(read(background, "bg-promoted", 0));
    assert.equal(device.stats().queued, 10);
    await Promise.all(submitted);
    assert.deepEqual(order, [
      "bg0",
      "rt",
      "bg-promoted",
      "normal",
      "bg1",
      "bg2",
      "bg3",
      "bg4",
      "bg5",
      "bg6",
      "bg7",
    ]);

    const stats = device.stats();
    assert.equal(stats.requests, 11);
    assert.equal(stats.byPriority.background.requests, 8);
    assert.equal(stats.byPriority.realtime.requests, 2);
    assert.equal(stats.byPriority.normal.requests, 1);
    assert.equal(stats.agedDispatches, 0);
    assert.equal(stats.queued, 0);
    assert.ok(stats.byPriority.background.waitUsMax > stats.byPriority.realtime.waitUsMax);
    assert.ok(stats.byPriority.realtime.waitUsMax > 0);
    assert.ok(stats.byPriority.background.waitUsTotal >= stats.byPriority.background.waitUsMax);
    // The background backlog waited for everything before it: its last read for the whole makespan but one read.
    assert.ok(stats.byPriority.background.waitUsMax < (stats.latency?.simulatedNowUs ?? 0));
    await Promise.all([closeAsync(background), closeAsync(normal), closeAsync(realtime)]);
  });

  it("aging: a background request waiting over priorityAgingMs goes before younger realtime ones", async () => {
    assert.equal(priorityAgingMs, 500);
    const device = simulated(slowCommands);
    const realtime = device.attach(new MemoryDevice(4096), "realtime");
    const background = device.attach(new MemoryDevice(4096), "background");
    const order: string[] = [];
    // rt0 enters the model at 0; bg0 and then rt1.. wait. Each flush takes exactly 100 ms. At 500 ms bg0
    // has waited exactly 500 ms (not more): rt5 goes; at 600 ms it has waited more: bg0 goes, before rt6.
    const submitted = flushes(realtime, "rt", 1, order);
    submitted.push(...flushes(background, "bg", 1, order));
    submitted.push(
      ...Array.from({ length: 10 }, (_, index) =>
        flushAsync(realtime).then(() => {
          order.push(`rt${index + 1}`);
        }),
      ),
    );
    await Promise.all(submitted);
    assert.deepEqual(order, [
      "rt0",
      "rt1",
      "rt2",
      "rt3",
      "rt4",
      "rt5",
      "bg0",
      "rt6",
      "rt7",
      "rt8",
      "rt9",
      "rt10",
    ]);
    const stats = device.stats();
    assert.equal(stats.agedDispatches, 1);
    assert.equal(stats.byPriority.background.waitUsMax, 600_000);
    assert.equal(stats.latency?.simulatedNowUs, 12 * 100_000);
    await Promise.all([closeAsync(realtime), closeAsync(background)]);
  });

  it("aged requests leave in age order, so a steady realtime stream cannot starve a background one", async () => {
    const device = simulated(slowCommands);
    const realtime = device.attach(new MemoryDevice(4096), "realtime");
    const background = device.attach(new MemoryDevice(4096), "background");
    const order: string[] = [];
    let stop = false;
    // Two realtime clients, each resubmitting from its completions, keep a realtime request waiting at all
    // times (bounded: 50 each, so a dispatcher that starves the background fails rather than hangs).
    const stream = async (name: string): Promise<void> => {
      for (let index = 0; !stop && index < 50; index++) {
        await flushAsync(realtime);
        order.push(`${name}${index}`);
      }
    };
    const clients = [stream("a"), stream("b")];
    const bg = flushes(background, "bg", 3, order);
    await Promise.all(bg);
    stop = true;
    await Promise.all(clients);
    // Waiting since 0: bg0 ages past 500 ms and goes at 600 ms, bg1 and bg2 (older than every waiting
    // realtime request) follow at 700 and 800 ms.
    assert.deepEqual(order.slice(0, 9), ["a0", "b0", "a1", "b1", "a2", "b2", "bg0", "bg1", "bg2"]);
    assert.equal(device.stats().byPriority.background.waitUsMax, 800_000);
    assert.equal(device.stats().agedDispatches, 3);
    await Promise.all([closeAsync(realtime), closeAsync(background)]);
  });

  it("queue depth by model: hdd 1, ssd its channels, fixed unlimited; inflightMax overrides", async () => {
    assert.equal(simulated(hdd).inflightMax, 1);
    assert.equal(simulated({ kind: "ssd" }).inflightMax, 8);
    assert.equal(simulated({ kind: "ssd", channels: 3 }).inflightMax, 3);
    assert.equal(simulated(hdd, GiB, { inflightMax: 4 }).inflightMax, 4);

    // ssd, 2 channels: two background reads enter at once, the realtime one overtakes the other two.
    const model: LatencyModel = { kind: "ssd", channels: 2, readLatencyUs: 100, bandwidthMBps: 1e6 };
    const ssd = simulated(model);
    const background = ssd.attach(new MemoryDevice(1 * MiB), "background");
    const realtime = ssd.attach(new MemoryDevice(1 * MiB), "realtime");
    const order: string[] = [];
    const read = (handle: DeviceHandle, name: string): Promise<void> =>
      readAsync(handle, Buffer.alloc(512), 0).then(() => {
        order.push(name);
      });
    await Promise.all([
      read(background, "bg0"),
      read(background, "bg1"),
      read(background, "bg2"),
      read(background, "bg3"),
      read(realtime, "rt"),
    ]);
    assert.deepEqual(order.slice(0, 3).sort(), ["bg0", "bg1", "rt"].sort());
    assert.equal(order.indexOf("rt") < order.indexOf("bg2"), true);
    assert.equal(ssd.stats().queuedMax, 3);
    assert.ok((ssd.stats().latency?.queuedMax ?? 0) <= 3, "2 channels, plus one due and not yet called back");

    const fixed = simulated({ kind: "fixed", latencyUs: 500 });
    const handle = fixed.attach(new MemoryDevice(1 * MiB));
    await Promise.all(
      Array.from({ length: 50 }, (_, index) => readAsync(handle, Buffer.alloc(512), index * 4096)),
    );
    assert.equal(fixed.stats().queuedMax, 0, "no queue");
    assert.equal(fixed.stats().latency?.simulatedNowUs, 500, "all overlap");
    await Promise.all([closeAsync(background), closeAsync(realtime), closeAsync(handle)]);
  });
});

describe("PhysicalDevice without a model (a real device)", () => {
  it("passes every verb straight through, readNoWait too, and only counts requests", async () => {
    const device = new PhysicalDevice({ model: null, modelBytes: 0 });
    assert.equal(device.model, null);
    assert.equal(device.inflightMax, 0);
    const inner = new MemoryDevice(1 * MiB);
    const handle = device.attach(inner, "realtime");
    assert.equal(handle.kind, "memory");
    assert.deepEqual(handle.capabilities, inner.capabilities);
    const data = Buffer.alloc(4096, 0x77);
    await writeAsync(handle, data, 8192);
    const buf = Buffer.alloc(4096);
    assert.equal(handle.readNoWait?.(buf, 8192), true, "the file's fast path answers");
    assert.deepEqual(buf, data);
    assert.deepEqual(await readAsync(handle, Buffer.alloc(8192), 4096), [0, 4096]);
    await flushAsync(handle);
    handle.priority = "background";
    await trimAsync(handle, 8192, 4096);
    const stats = device.stats();
    assert.equal(stats.latency, null);
    assert.equal(stats.byPriority.realtime.requests, 3);
    assert.equal(stats.byPriority.background.requests, 1);
    assert.equal(stats.queuedMax, 0);
    await closeAsync(handle);
    assert.throws(() => inner.read(Buffer.alloc(1), 0, () => undefined), /after close/);
  });
});

describe("PhysicalDevice callbacks and close", () => {
  /** Every data verb once; checks each callback comes exactly once and never inside the call. */
  async function checkCallbacks(handle: BlockDevice): Promise<void> {
    const calls: ((done: (err: VdiskError | null) => void) => void)[] = [
      (done) => handle.read(Buffer.alloc(4096), 0, done),
      (done) => handle.write(Buffer.alloc(4096, 1), 4096, true, done),
      (done) => handle.zero(0, 4096, 0, done),
      (done) => handle.trim(0, 4096, false, done),
      (done) => handle.flush(done),
      (done) => handle.cache(0, 4096, done),
      (done) => handle.blockStatus(0, 4096, done),
      (done) => handle.usage(done),
      (done) => handle.resize(handle.size, done),
    ];
    await Promise.all(
      calls.map(
        (call, index) =>
          new Promise<void>((resolve, reject) => {
            let returned = false;
            let called = 0;
            call((err) => {
              called++;
              if (!returned) reject(new Error(`verb ${index} called back synchronously`));
              if (err !== null) reject(err);
              // A second call would come later: check after the loop has turned a few times.
              setTimeout(() => (called === 1 ? resolve() : reject(new Error(`verb ${index} twice`))), 5);
            });
            returned = true;
          }),
      ),
    );
  }

  it("every callback exactly once, never synchronously: every model, both clocks, no model", async () => {
    const options: PhysicalDeviceOptions[] = [
      { model: hdd, clock: "simulated", modelBytes: GiB },
      { model: { kind: "ssd", channels: 2 }, clock: "simulated", modelBytes: GiB },
      { model: { kind: "fixed", latencyUs: 0 }, clock: "real", modelBytes: GiB },
      {
        model: { kind: "ssd", readLatencyUs: 50, writeLatencyUs: 50 },
        clock: "real",
        modelBytes: GiB,
        inflightMax: 1,
      },
      { model: null, modelBytes: 0 },
    ];
    for (const option of options) {
      const device = new PhysicalDevice(option);
      const handles = [
        device.attach(new MemoryDevice(1 * MiB)),
        device.attach(new MemoryDevice(1 * MiB), "realtime"),
      ];
      await Promise.all(handles.map(checkCallbacks));
      await Promise.all(handles.map(closeAsync));
    }
  });

  it("close waits for the handle's queued and in-model requests, then closes its file", async () => {
    const device = simulated(slowCommands);
    const innerA = new MemoryDevice(4096);
    const a = device.attach(innerA);
    const b = device.attach(new MemoryDevice(4096));
    const events: string[] = [];
    const submitted = [...flushes(a, "a", 2, events), ...flushes(b, "b", 1, events)];
    const closed = closeAsync(a).then(() => events.push("close a"));
    assert.throws(() => a.read(Buffer.alloc(1), 0, () => undefined), /after close/);
    await Promise.all([...submitted, closed]);
    assert.deepEqual(events, ["a0", "a1", "close a", "b0"]);
    assert.throws(() => innerA.read(Buffer.alloc(1), 0, () => undefined), /after close/);
    await readAsync(b, Buffer.alloc(1), 0);
    await closeAsync(b);
  });
});

describe("PhysicalDevice preconditions", () => {
  it("a bad request throws at the caller even when it would wait in the queue, and is not outstanding", async () => {
    const device = simulated(slowCommands);
    const handle = device.attach(new MemoryDevice(64 * KiB));
    const readOnly = device.attach(new MemoryDevice(64 * KiB, { readOnly: true }));
    const pending = flushAsync(handle); // occupies the model: what follows would be queued
    assert.throws(() => handle.read(Buffer.alloc(2), 64 * KiB - 1, () => undefined), /invariant violated/);
    assert.throws(() => handle.read(Buffer.alloc(0), 0, () => undefined), /invariant violated/);
    assert.throws(() => handle.write(Buffer.alloc(1), -1, false, () => undefined), /invariant violated/);
    assert.throws(() => handle.zero(0, 1, 64, () => undefined), /invariant violated/);
    assert.throws(() => readOnly.write(Buffer.alloc(1), 0, false, () => undefined), /read-only/);
    assert.throws(() => readOnly.trim(0, 1, false, () => undefined), /read-only/);
    assert.equal(device.stats().queued, 0);
    assert.equal(device.stats().requests, 1);
    await pending;
    await closeAsync(handle); // nothing left outstanding: close completes
    await closeAsync(readOnly);
  });
});

describe("PhysicalDevice options", () => {
  it("refuses bad options and priorities with INVALID_ARGUMENT", () => {
    const bad: PhysicalDeviceOptions[] = [
      { model: hdd, modelBytes: 4096 },
      { model: hdd, modelBytes: 1.5 * MiB + 0.5 },
      { model: hdd, modelBytes: 2 ** 60 },
      { model: hdd, modelBytes: GiB, inflightMax: 0 },
      { model: hdd, modelBytes: GiB, inflightMax: 2.5 },
      { model: null, modelBytes: 0, inflightMax: 1 },
      { model: { kind: "ssd", channels: 0 }, modelBytes: GiB },
      { model: hdd, modelBytes: GiB, clock: "wall" as "real" },
    ];
    for (const options of bad)
      assert.throws(() => new PhysicalDevice(options), isInvalid, JSON.stringify(options));
    const device = simulated(hdd);
    assert.throws(() => device.attach(new MemoryDevice(4096), "urgent" as "realtime"), isInvalid);
    const handle = device.attach(new MemoryDevice(4096));
    assert.equal(handle.fileIndex, 0, "a refused attach takes no file number");
    assert.throws(() => {
      handle.priority = "idle" as "background";
    }, isInvalid);
    assert.equal(handle.priority, "normal");
    assert.deepEqual(priorities, ["realtime", "normal", "background"]);
  });
});

describe("PhysicalDevice, real clock", () => {
  it("a realtime flush overtakes queued background flushes; nothing completes before its modelled time", async () => {
    const overheadUs = 3000;
    const device = new PhysicalDevice({
      model: { kind: "hdd", commandOverheadUs: overheadUs },
      modelBytes: GiB,
    });
    const background = device.attach(new MemoryDevice(4096), "background");
    const realtime = device.attach(new MemoryDevice(4096), "realtime");
    const order: string[] = [];
    const finishedMs: number[] = [];
    const started = performance.now();
    const submitted = flushes(background, "bg", 4, order);
    submitted.push(...flushes(realtime, "rt", 1, order));
    for (const request of submitted) void request.then(() => finishedMs.push(performance.now() - started));
    await Promise.all(submitted);
    assert.deepEqual(order, ["bg0", "rt0", "bg1", "bg2", "bg3"]);
    finishedMs.forEach((ms, index) => assert.ok(ms * 1000 >= (index + 1) * overheadUs, `${index}: ${ms} ms`));
    const stats = device.stats();
    assert.ok(stats.byPriority.realtime.waitUsMax >= overheadUs * 0.9, "waited for the one in the model");
    assert.ok(stats.byPriority.background.waitUsMax >= overheadUs * 3 * 0.9);
    await Promise.all([closeAsync(background), closeAsync(realtime)]);
  });

  it("a file slower than the model (a real fdatasync) does not hold the modelled head", async () => {
    const device = new PhysicalDevice({ model: { kind: "hdd", commandOverheadUs: 1000 }, modelBytes: GiB });
    const slowFile = new MemoryDevice(4096);
    const flush = slowFile.flush.bind(slowFile);
    slowFile.flush = (done) => setTimeout(() => flush(done), 300);
    const slow = device.attach(slowFile);
    const other = device.attach(new MemoryDevice(1 * MiB));
    const started = performance.now();
    let flushedMs = 0;
    const flushed = flushAsync(slow).then(() => (flushedMs = performance.now() - started));
    await readAsync(other, Buffer.alloc(4096), 0);
    const readMs = performance.now() - started;
    await flushed;
    // Node's timers count from the loop's cached clock (whole milliseconds), so a 300 ms timeout may end
    // up to 1 ms early on performance.now()'s clock (seen in CI: 299.99 ms).
    assert.ok(flushedMs >= 299, `the flush waits for its file (${flushedMs} ms)`);
    assert.ok(readMs < 200, `the read behind it only waited for the modelled flush (${readMs} ms)`);
    await Promise.all([closeAsync(slow), closeAsync(other)]);
  });
});
