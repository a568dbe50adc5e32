/**
 * LatencyDevice: the model arithmetic (hddServiceUs, ssd channels and link), the simulated clock (exact
 * makespans, arrival from completions or from a driven clock), the real clock (never early, sub-ms
 * accuracy, loose wall-time bounds for robustness on a loaded 2-core box), pass-through of data, holes and
 * errors, and parseLatencyModel. The BlockDevice contract itself is checked by the shared conformance suite
 * in devices.test.ts, which runs against LatencyDevice over a MemoryDevice (ssd real clock, hdd simulated).
 */
import { describe, it } from "node:test";
import * as assert from "node:assert/strict";
import { performance } from "node:perf_hooks";

import {
  hddModelDefaults,
  hddServiceUs,
  LatencyDevice,
  type LatencyDeviceOptions,
  type LatencyModel,
  parseLatencyModel,
} from "../../src/devices/latency-device";
import { MemoryDevice } from "../../src/devices/memory-device";
import {
  blockStatusAsync,
  closeAsync,
  flushAsync,
  readAsync,
  resizeAsync,
  trimAsync,
  usageAsync,
  writeAsync,
} from "../../src/devices/promises";
import { VdiskError } from "../../src/errors";
import { GiB, KiB, MiB } from "../../src/limits";
import { CrashDevice } from "../../src/testing/crash-device";
import { Prng } from "../../src/testing/prng";

const hdd: LatencyModel = { kind: "hdd" };
const rotationUs = 30_000_000 / hddModelDefaults.rpm; // half a revolution at 7200 rpm: 4166.7 µs
const overheadUs = hddModelDefaults.commandOverheadUs;
const bytesPerUs = hddModelDefaults.transferMBps;

function device(size: number, options: LatencyDeviceOptions): LatencyDevice {
  return new LatencyDevice(new MemoryDevice(size), options);
}

function simulated(size: number, model: LatencyModel): LatencyDevice {
  return device(size, { model, clock: "simulated" });
}

/** Submit every read at once; resolve when all have called back. */
async function readAll(dev: LatencyDevice, offsets: number[], length: number): Promise<void> {
  await Promise.all(offsets.map((offset) => readAsync(dev, Buffer.alloc(length), offset)));
}

function isInvalid(err: unknown): boolean {
  return err instanceof VdiskError && err.code === "INVALID_ARGUMENT";
}

function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[sorted.length >> 1];
}

describe("hddServiceUs", () => {
  const size = 1 * GiB;

  it("a sequential continuation pays no seek and no rotation: overhead + transfer", () => {
    assert.equal(hddServiceUs(hdd, 64 * KiB, 64 * KiB, 4 * KiB, size), overheadUs + (4 * KiB) / bytesPerUs);
    assert.equal(hddServiceUs(hdd, 0, 0, 1 * MiB, size), overheadUs + MiB / bytesPerUs);
  });

  it("transfer time scales with length", () => {
    const head = 100 * MiB;
    const small = hddServiceUs(hdd, head, 10 * MiB, 64 * KiB, size);
    const large = hddServiceUs(hdd, head, 10 * MiB, 1 * MiB, size);
    assert.ok(Math.abs(large - small - (MiB - 64 * KiB) / bytesPerUs) < 1e-6);
  });

  it("a seek costs at least settle + half a revolution, more the farther it goes, full stroke at most", () => {
    const head = size - 4 * KiB; // backward seeks, so no forward-skip shortcut applies
    let previous = 0;
    for (const target of [size - 8 * KiB, size - 1 * MiB, size - 64 * MiB, size / 2, 64 * MiB, 0]) {
      const positioningUs =
        hddServiceUs(hdd, head, target, 4 * KiB, size) - overheadUs - (4 * KiB) / bytesPerUs;
      assert.ok(positioningUs >= hddModelDefaults.seekMinMs * 1000 + rotationUs - 1e-6, `to ${target}`);
      assert.ok(positioningUs > previous, `seek to ${target} costs more than a nearer one`);
      previous = positioningUs;
    }
    // Full stroke: seekMaxMs (2 × seekAvgMs) + half a revolution.
    assert.ok(Math.abs(previous - (2 * hddModelDefaults.seekAvgMs * 1000 + rotationUs)) < 2 * 1000 * 0.01);
  });

  it("the seek curve averages seekAvgMs over random positions", () => {
    const prng = new Prng(7);
    const count = 20_000;
    let totalUs = 0;
    for (let index = 0; index < count; index++) {
      const head = prng.int(size / 4096) * 4096;
      const offset = prng.int(size / 4096) * 4096;
      totalUs += hddServiceUs(hdd, head, offset, 4096, size) - overheadUs - 4096 / bytesPerUs;
    }
    const seekAvgUs = totalUs / count - rotationUs;
    assert.ok(Math.abs(seekAvgUs - 8500) < 8500 * 0.03, `average seek ${seekAvgUs.toFixed(0)} µs`);
    // The same fit for other parameters.
    const slow: LatencyModel = { kind: "hdd", rpm: 5400, seekMinMs: 2, seekAvgMs: 12, seekMaxMs: 25 };
    let slowUs = 0;
    for (let index = 0; index < count; index++) {
      const head = prng.int(size / 4096) * 4096;
      const offset = prng.int(size / 4096) * 4096;
      slowUs += hddServiceUs(slow, head, offset, 4096, size) - overheadUs - 4096 / bytesPerUs;
    }
    const slowSeekUs = slowUs / count - 30_000_000 / 5400;
    assert.ok(Math.abs(slowSeekUs - 12_000) < 12_000 * 0.03, `average seek ${slowSeekUs.toFixed(0)} µs`);
  });

  it("a short forward gap rotates past the head; the same gap backwards is a seek", () => {
    const head = 100 * MiB;
    const forward = hddServiceUs(hdd, head, head + 8 * KiB, 4 * KiB, size);
    assert.ok(Math.abs(forward - (overheadUs + (8 * KiB + 4 * KiB) / bytesPerUs)) < 1e-6);
    const backward = hddServiceUs(hdd, head, head - 8 * KiB, 4 * KiB, size);
    assert.ok(backward > overheadUs + 1000 + rotationUs);
    // A forward gap longer than a seek is worth: the seek wins.
    const far = hddServiceUs(hdd, 0, size / 2, 4 * KiB, size);
    assert.ok(far < overheadUs + size / 2 / bytesPerUs);
    assert.ok(far > overheadUs + 1000 + rotationUs);
  });

  it("rotational latency follows rpm", () => {
    const at7200 = hddServiceUs(hdd, 0, 512 * MiB, 4096, size);
    const at5400 = hddServiceUs({ kind: "hdd", rpm: 5400 }, 0, 512 * MiB, 4096, size);
    assert.ok(Math.abs(at5400 - at7200 - (30_000_000 / 5400 - 30_000_000 / 7200)) < 1e-6);
  });
});

describe("LatencyDevice, simulated clock", () => {
  it("ssd: N channels serve N requests in one latency, the N+1st waits for a channel (exact)", async () => {
    // 512-byte reads over a 512 MB/s link: 1 µs of transfer each, serialized on the link.
    const model: LatencyModel = { kind: "ssd", readLatencyUs: 80, bandwidthMBps: 512, channels: 4 };
    const four = simulated(1 * MiB, model);
    await readAll(four, [0, 4096, 8192, 12288], 512);
    assert.equal(four.simulatedNowUs(), 80 + 4);
    const five = simulated(1 * MiB, model);
    await readAll(five, [0, 4096, 8192, 12288, 16384], 512);
    // The first channel frees at 81; the fifth read starts there: 81 + 80 + 1.
    assert.equal(five.simulatedNowUs(), 162);
    assert.equal(five.stats().queuedMax, 5);
    assert.equal(five.stats().busyUs, 5 * 81);
    await closeAsync(four);
    await closeAsync(five);
  });

  it("ssd: bandwidth limits large transfers; a fast write overtakes a slow read on another channel", async () => {
    const dev = simulated(16 * MiB, {
      kind: "ssd",
      readLatencyUs: 80,
      writeLatencyUs: 20,
      bandwidthMBps: 1000,
    });
    await readAll(dev, [0, 4 * MiB], 4 * MiB); // 4194.304 µs of link each
    assert.ok(Math.abs(dev.simulatedNowUs() - (80 + 2 * 4194.304)) < 1e-6);

    const order: string[] = [];
    const other = simulated(1 * MiB, { kind: "ssd", bandwidthMBps: 1_000_000 });
    await Promise.all([
      readAsync(other, Buffer.alloc(512), 0).then(() => order.push("read")),
      writeAsync(other, Buffer.alloc(512, 1), 4096).then(() => order.push("write")),
    ]);
    assert.deepEqual(order, ["write", "read"], "delivered in modelled completion order");
    await closeAsync(dev);
    await closeAsync(other);
  });

  it("hdd: 100 random 4K reads cost at least 100 rotations; sorted, far less", async () => {
    const size = 1 * GiB;
    const prng = new Prng(42);
    const offsets = Array.from({ length: 100 }, () => prng.int(size / 4096) * 4096);
    const random = simulated(size, hdd);
    await readAll(random, offsets, 4096);
    const randomUs = random.simulatedNowUs();
    assert.ok(randomUs >= 100 * rotationUs, `random ${randomUs} µs`);
    assert.ok(random.stats().seeks >= 99);

    const sorted = simulated(size, hdd);
    await readAll(
      sorted,
      [...offsets].sort((a, b) => a - b),
      4096,
    );
    const sortedUs = sorted.simulatedNowUs();
    assert.ok(sortedUs < 0.6 * randomUs, `sorted ${sortedUs} µs vs random ${randomUs} µs`);
    assert.ok(sorted.stats().seekDistanceBytes < random.stats().seekDistanceBytes / 10);
    await closeAsync(random);
    await closeAsync(sorted);
  });

  it("hdd: sequential reads cost overhead + transfer each, exactly; queued or one at a time alike", async () => {
    const perRequestUs = overheadUs + 4096 / bytesPerUs;
    const queued = simulated(1 * MiB, hdd);
    await readAll(
      queued,
      Array.from({ length: 100 }, (_, index) => index * 4096),
      4096,
    );
    assert.ok(Math.abs(queued.simulatedNowUs() - 100 * perRequestUs) < 1e-6);
    assert.equal(queued.stats().sequentialRequests, 100);
    assert.equal(queued.stats().seeks, 0);

    // One at a time: each arrives when the previous one completes, so the makespan is the same.
    const oneByOne = simulated(1 * MiB, hdd);
    for (let index = 0; index < 100; index++) await readAsync(oneByOne, Buffer.alloc(4096), index * 4096);
    assert.ok(Math.abs(oneByOne.simulatedNowUs() - 100 * perRequestUs) < 1e-6);

    // flush costs the command overhead, in the head's queue; trim does not move the head.
    await flushAsync(oneByOne);
    await trimAsync(oneByOne, 0, 4096);
    await readAsync(oneByOne, Buffer.alloc(4096), 100 * 4096);
    assert.ok(Math.abs(oneByOne.simulatedNowUs() - (101 * perRequestUs + 2 * overheadUs)) < 1e-6);
    assert.equal(oneByOne.stats().sequentialRequests, 101);
    await closeAsync(queued);
    await closeAsync(oneByOne);
  });

  it("fixed: requests submitted together overlap; submitted from callbacks, they follow each other", async () => {
    const together = simulated(1 * MiB, { kind: "fixed", latencyUs: 500 });
    await readAll(
      together,
      Array.from({ length: 10 }, (_, index) => index * 4096),
      4096,
    );
    assert.equal(together.simulatedNowUs(), 500);
    const chained = simulated(1 * MiB, { kind: "fixed", latencyUs: 500 });
    for (let index = 0; index < 10; index++) await readAsync(chained, Buffer.alloc(4096), index * 4096);
    assert.equal(chained.simulatedNowUs(), 5000);
    assert.equal(chained.stats().requests, 10);
    await closeAsync(together);
    await closeAsync(chained);
  });

  it("a driven simClock sets arrival times: idle gaps are kept, a busy head queues", async () => {
    const clock = {
      timeUs: 0,
      nowUs(): number {
        return this.timeUs;
      },
    };
    const dev = new LatencyDevice(new MemoryDevice(1 * MiB), {
      model: hdd,
      clock: "simulated",
      simClock: clock,
    });
    const serviceUs = overheadUs + 4096 / bytesPerUs;
    await readAsync(dev, Buffer.alloc(4096), 0);
    assert.ok(Math.abs(dev.simulatedNowUs() - serviceUs) < 1e-9);
    clock.timeUs = 50_000;
    await readAsync(dev, Buffer.alloc(4096), 4096);
    assert.ok(Math.abs(dev.simulatedNowUs() - (50_000 + serviceUs)) < 1e-9, "idle until the arrival");
    await readAll(dev, [8192, 12288], 4096); // both arrive at 50 000: the second waits for the head
    assert.ok(Math.abs(dev.simulatedNowUs() - (50_000 + 3 * serviceUs)) < 1e-6);
    await closeAsync(dev);
  });

  it("metadata verbs are free and not counted", async () => {
    const dev = simulated(1 * MiB, hdd);
    await blockStatusAsync(dev, 0, 1 * MiB);
    await usageAsync(dev);
    await resizeAsync(dev, 2 * MiB);
    assert.equal(dev.stats().requests, 0);
    assert.equal(dev.simulatedNowUs(), 0);
    assert.equal(dev.size, 2 * MiB);
    await closeAsync(dev);
  });
});

describe("LatencyDevice, real clock", () => {
  /**
   * Per-request error (callback time − submit time − latency) over `count` requests one at a time. The
   * machine is shared and may be loaded, so the accuracy check allows five attempts: a scheduler built on
   * plain timers (≥ 1 ms steps) fails them all, a run preempted by other processes only some.
   */
  async function errorsUs(latencyUs: number, count: number): Promise<number[]> {
    const dev = device(1 * MiB, { model: { kind: "fixed", latencyUs } });
    const errors: number[] = [];
    for (let index = 0; index < count; index++) {
      const started = performance.now();
      await readAsync(dev, Buffer.alloc(4096), 0);
      errors.push((performance.now() - started) * 1000 - latencyUs);
    }
    await closeAsync(dev);
    return errors;
  }

  it("200 µs requests: never early, median error under 0.3 ms", async (t) => {
    const medians: number[] = [];
    for (let attempt = 0; attempt < 5 && !medians.some((value) => value < 300); attempt++) {
      const errors = await errorsUs(200, 100);
      const mean = errors.reduce((sum, error) => sum + error, 0) / errors.length;
      t.diagnostic(`error µs: median ${median(errors).toFixed(1)}, mean ${mean.toFixed(1)}`);
      assert.ok(Math.min(...errors) >= 0, "no request completes before its modelled time");
      medians.push(median(errors));
    }
    assert.ok(
      medians.some((value) => value < 300),
      `median errors ${medians.map((value) => value.toFixed(0))} µs`,
    );
  });

  it("5 ms requests (timer, then polling): never early, median error under 1.5 ms", async (t) => {
    const medians: number[] = [];
    for (let attempt = 0; attempt < 5 && !medians.some((value) => value < 1500); attempt++) {
      const errors = await errorsUs(5000, 10);
      t.diagnostic(`error µs: median ${median(errors).toFixed(1)}`);
      assert.ok(Math.min(...errors) >= 0, "no request completes before its modelled time");
      medians.push(median(errors));
    }
    assert.ok(
      medians.some((value) => value < 1500),
      `median errors ${medians.map((value) => value.toFixed(0))} µs`,
    );
  });

  it("hdd: a handful of random reads take about the modelled time", async (t) => {
    const size = 1 * GiB;
    const prng = new Prng(3);
    const offsets = Array.from({ length: 6 }, () => prng.int(size / 4096) * 4096);
    let head = 0;
    let modelledUs = 0;
    for (const offset of offsets) {
      modelledUs += hddServiceUs(hdd, head, offset, 4096, size);
      head = offset + 4096;
    }
    const dev = device(size, { model: hdd });
    const started = performance.now();
    await readAll(dev, offsets, 4096);
    const wallUs = (performance.now() - started) * 1000;
    t.diagnostic(`modelled ${modelledUs.toFixed(0)} µs, took ${wallUs.toFixed(0)} µs`);
    assert.ok(wallUs >= modelledUs, "one head: the requests follow each other");
    assert.ok(wallUs < modelledUs + 50_000, "and do not take much longer");
    assert.equal(dev.stats().seeks, 6);
    await closeAsync(dev);
  });

  it("ssd: the fifth of five requests on four channels completes a latency after the others", async () => {
    const dev = device(1 * MiB, {
      model: { kind: "ssd", readLatencyUs: 2000, bandwidthMBps: 1e6, channels: 4 },
    });
    const started = performance.now();
    const finished: number[] = [];
    const order: number[] = [];
    await Promise.all(
      [0, 1, 2, 3, 4].map((index) =>
        readAsync(dev, Buffer.alloc(512), index * 4096).then(() => {
          finished[index] = (performance.now() - started) * 1000;
          order.push(index);
        }),
      ),
    );
    assert.equal(order[4], 4, "the fifth completes last");
    for (let index = 0; index < 4; index++) assert.ok(finished[index] >= 2000);
    assert.ok(finished[4] >= 4000);
    await closeAsync(dev);
  });

  it("metadata verbs are not delayed", async () => {
    const dev = device(1 * MiB, { model: { kind: "fixed", latencyUs: 1_000_000 } });
    const started = performance.now();
    await blockStatusAsync(dev, 0, 1 * MiB);
    await usageAsync(dev);
    assert.ok(performance.now() - started < 500);
    assert.equal(dev.readNoWait(Buffer.alloc(10), 0), false);
    await closeAsync(dev);
  });

  it("close waits for outstanding requests, then closes the inner device", async () => {
    const inner = new MemoryDevice(1 * MiB);
    const dev = new LatencyDevice(inner, { model: { kind: "fixed", latencyUs: 20_000 } });
    const events: string[] = [];
    const started = performance.now();
    await new Promise<void>((resolve, reject) => {
      dev.write(Buffer.alloc(4096, 1), 0, false, (err) => {
        events.push(err === null ? "write" : "write failed");
      });
      dev.close((err) => {
        events.push("close");
        if (err !== null) reject(err);
        else resolve();
      });
    });
    assert.deepEqual(events, ["write", "close"]);
    assert.ok(performance.now() - started >= 20);
    assert.throws(() => inner.read(Buffer.alloc(1), 0, () => undefined), /after close/);
    assert.throws(() => dev.read(Buffer.alloc(1), 0, () => undefined), /after close/);
  });
});

describe("LatencyDevice data path", () => {
  it("reads return the inner device's bytes and holes; kind and capabilities follow the model", async () => {
    for (const clock of ["real", "simulated"] as const) {
      const dev = device(1 * MiB, { model: { kind: "ssd" }, clock });
      const data = Buffer.alloc(8192, 0x5a);
      await writeAsync(dev, data, 4096);
      const buf = Buffer.alloc(16 * KiB, 0xee);
      const holes = await readAsync(dev, buf, 0);
      assert.deepEqual(buf.subarray(4096, 12288), data);
      assert.deepEqual(holes, [0, 4096, 12288, 4096], "holes pass through");
      assert.equal(dev.kind, "memory+ssd");
      assert.equal(dev.capabilities.rotational, false);
      await closeAsync(dev);
    }
    const disk = device(1 * MiB, { model: hdd, clock: "simulated" });
    assert.equal(disk.kind, "memory+hdd");
    assert.deepEqual(disk.capabilities, { ...new MemoryDevice(1).capabilities, rotational: true });
    await closeAsync(disk);
  });

  it("inner errors reach the caller, after the modelled time", async () => {
    const inner = new CrashDevice(64 * KiB, { prng: new Prng(1), reorder: false });
    const dev = new LatencyDevice(inner, { model: { kind: "fixed", latencyUs: 2000 } });
    inner.failNext("read");
    const started = performance.now();
    await assert.rejects(
      readAsync(dev, Buffer.alloc(512), 0),
      (err) => err instanceof VdiskError && err.code === "IO_ERROR",
    );
    assert.ok(performance.now() - started >= 2);
    await readAsync(dev, Buffer.alloc(512), 0);
    await closeAsync(dev);
  });

  it("refuses bad options", () => {
    const inner = new MemoryDevice(4096);
    assert.throws(() => new LatencyDevice(inner, { model: { kind: "ssd", channels: 0 } }), isInvalid);
    assert.throws(() => new LatencyDevice(inner, { model: { kind: "ssd", channels: 1.5 } }), isInvalid);
    assert.throws(() => new LatencyDevice(inner, { model: { kind: "fixed", latencyUs: -1 } }), isInvalid);
    assert.throws(
      () =>
        new LatencyDevice(inner, { model: { kind: "fixed", latencyUs: 1 }, simClock: { nowUs: () => 0 } }),
      isInvalid,
    );
    assert.throws(
      () => new LatencyDevice(inner, { model: { kind: "tape" } as unknown as LatencyModel }),
      isInvalid,
    );
    for (const key of ["constructor", "toString", "speed"]) {
      const model = { kind: "ssd", [key]: 1 } as unknown as LatencyModel;
      assert.throws(() => new LatencyDevice(inner, { model }), isInvalid, key);
    }
  });
});

describe("parseLatencyModel", () => {
  it("accepts the kinds, their keys and defaults", () => {
    assert.deepEqual(parseLatencyModel("hdd"), { kind: "hdd" });
    assert.deepEqual(parseLatencyModel("ssd"), { kind: "ssd" });
    assert.deepEqual(parseLatencyModel("none"), { kind: "fixed", latencyUs: 0 });
    assert.deepEqual(parseLatencyModel("hdd:rpm=5400,seekAvgMs=12"), {
      kind: "hdd",
      rpm: 5400,
      seekAvgMs: 12,
    });
    assert.deepEqual(parseLatencyModel("ssd:channels=8"), { kind: "ssd", channels: 8 });
    assert.deepEqual(parseLatencyModel("fixed:latencyUs=500"), { kind: "fixed", latencyUs: 500 });
    assert.deepEqual(parseLatencyModel(" ssd : readLatencyUs = 90.5 , bandwidthMBps=5e2 "), {
      kind: "ssd",
      readLatencyUs: 90.5,
      bandwidthMBps: 500,
    });
    assert.equal(device(4096, { model: parseLatencyModel("hdd:commandOverheadUs=0") }).kind, "memory+hdd");
  });

  it("refuses bad input with INVALID_ARGUMENT, naming the allowed keys", () => {
    const refused: [string, RegExp][] = [
      ["", /unknown latency model/],
      ["tape", /kinds: hdd, ssd, fixed, none/],
      [
        "hdd:foo=1",
        /unknown key "foo"; hdd keys: rpm, seekMinMs, seekAvgMs, seekMaxMs, transferMBps, commandOverheadUs/,
      ],
      ["ssd:rpm=7200", /ssd keys: readLatencyUs, writeLatencyUs, bandwidthMBps, channels/],
      ["hdd:rpm", /expected key=value/],
      ["hdd:", /expected key=value/],
      ["hdd:rpm=", /must be a non-negative number/],
      ["hdd:rpm=-5", /must be a non-negative number/],
      ["hdd:rpm=fast", /must be a non-negative number/],
      ["hdd:rpm=5400,rpm=7200", /given twice/],
      ["hdd:rpm=0", /rpm must be a number in/],
      ["ssd:channels=2.5", /channels must be an integer/],
      ["ssd:channels=0", /channels must be an integer/],
      ["fixed", /needs latencyUs/],
      ["fixed:latencyUs=1e12", /latencyUs must be a number in/],
      ["none:latencyUs=5", /takes no parameters/],
      ["hdd:seekMinMs=5,seekAvgMs=6,seekMaxMs=30", /monotone seek curve/],
      ["hdd:seekMinMs=1,seekAvgMs=16,seekMaxMs=17", /monotone seek curve/],
      ["hdd:seekMinMs=9,seekAvgMs=8", /monotone seek curve/],
    ];
    for (const [text, message] of refused) {
      assert.throws(
        () => parseLatencyModel(text),
        (err) => isInvalid(err) && message.test((err as Error).message),
        `"${text}" is refused with ${message}`,
      );
    }
  });
});
