/**
 * Durability through the request engine: seeded runs of random concurrent writes (some FUA), zeroes,
 * trims and flushes, in bursts, through RequestEngine(CrashDevice) with random settings, then a power cut.
 *
 * The harness mirrors every mutation in a ModelDisk when its callback runs (a failed one too, as non-FUA:
 * it may have landed; one the device refused after the crash never ran, but its callback comes after
 * those of the requests in flight at the crash, so mirroring it only adds legal values no sector holds). A flush covers every mutation submitted before it: when it completes, each of
 * them must have completed, and the model flushes through the last of them (anything whose callback ran
 * earlier had executed on the device before the engine called device.flush, so it is covered too).
 *
 * Two endings, chosen per seed:
 * - exact: a last burst and a flush; the moment the flush completes the power is cut with nothing landing
 *   that was not durable. The medium must hold exactly what was written.
 * - random: a crash armed at a random device request (or after the workload), in flight requests landing
 *   or not, torn or not. Every sector must hold its flushed content or one written since (ModelDisk).
 *
 * A failure names its seed; VDISK_CRASH_SEED=<seed> replays one run, VDISK_CRASH_RUNS sets how many
 * (default 150).
 */
import { test } from "node:test";
import assert from "node:assert/strict";

import { ZeroFlags } from "../../src/devices/block-device";
import { closeAsync } from "../../src/devices/promises";
import { RequestEngine } from "../../src/engine/request-engine";
import type { VdiskError } from "../../src/errors";
import { KiB } from "../../src/limits";
import { CrashDevice } from "../../src/testing/crash-device";
import { ModelDisk } from "../../src/testing/model-disk";
import { Prng } from "../../src/testing/prng";

const diskBytes = 64 * KiB;

function pattern(length: number, prng: Prng): Buffer {
  const buf = prng.bytes(length);
  for (let index = 0; index < length; index++) buf[index] |= 1; // never zero: "not written" stays visible
  return buf;
}

async function runSeed(seed: number): Promise<{ flushes: number; merged: number }> {
  const prng = new Prng(seed);
  const device = new CrashDevice(diskBytes, { prng: prng.fork(), reorder: true });
  const engine = new RequestEngine(device, {
    merge: prng.bool(0.7),
    maxRequestBytes: prng.pick([4 * KiB, 8 * KiB, 16 * KiB, 64 * KiB]),
    queueDepth: prng.range(1, 8),
    sort: prng.pick(["on", "off"] as const),
  });
  const model = new ModelDisk(diskBytes);
  const exact = prng.bool();
  if (!exact && prng.bool(0.7)) device.crashAfter(1 + prng.int(40));

  const pending: Promise<void>[] = [];
  const failures: string[] = [];
  /** Mutations submitted and not completed, by id. */
  const outstanding = new Set<number>();
  /** The model's operation number of each completed mutation. */
  const operationOf = new Map<number, number>();
  let nextId = 1;
  let flushes = 0;

  const mutate = (
    name: string,
    apply: (fua: boolean) => void,
    fua: boolean,
    call: (done: (err: VdiskError | null) => void) => void,
  ): void => {
    const id = nextId++;
    outstanding.add(id);
    pending.push(
      new Promise<void>((resolve) =>
        call((err) => {
          if (err !== null && !device.crashed)
            failures.push(`${name} failed before any crash: ${err.message}`);
          outstanding.delete(id);
          apply(fua && err === null); // a failed request may still have landed, but not durably
          operationOf.set(id, model.operations);
          resolve();
        }),
      ),
    );
  };

  const flush = (): Promise<void> => {
    const before = [...outstanding];
    const mark = model.mark();
    const done = new Promise<void>((resolve) =>
      engine.flush((err) => {
        if (err === null) {
          const unfinished = before.filter((id) => outstanding.has(id));
          if (unfinished.length > 0)
            failures.push(`flush completed before earlier mutations ${unfinished.join(", ")}`);
          let through = mark;
          for (const id of before) through = Math.max(through, operationOf.get(id) ?? 0);
          model.flushTo(through);
          flushes++;
        } else if (!device.crashed) {
          failures.push(`flush failed before any crash: ${err.message}`);
        }
        resolve();
      }),
    );
    pending.push(done);
    return done;
  };

  const randomRange = (): [number, number] => {
    const aligned = prng.bool(0.6);
    const offset = aligned ? prng.int(diskBytes / (4 * KiB)) * 4 * KiB : prng.int(diskBytes);
    const length = aligned ? prng.range(1, 4) * 4 * KiB : prng.range(1, 12 * KiB);
    return [offset, Math.min(length, diskBytes - offset)];
  };

  const submitRandom = (): void => {
    const dice = prng.int(10);
    const [offset, length] = randomRange();
    const fua = prng.bool(0.2);
    if (dice < 6) {
      const data = pattern(length, prng);
      mutate(
        `write ${offset}+${length}`,
        (durable) => model.write(data, offset, durable),
        fua,
        (done) => engine.write(data, offset, fua, done),
      );
    } else if (dice === 6) {
      const flags = (fua ? ZeroFlags.FUA : 0) | (prng.bool() ? ZeroFlags.MAY_TRIM : 0);
      mutate(
        `zero ${offset}+${length}`,
        (durable) => model.zero(offset, length, durable),
        fua,
        (done) => engine.zero(offset, length, flags, done),
      );
    } else if (dice === 7) {
      mutate(
        `trim ${offset}+${length}`,
        (durable) => model.trim(offset, length, durable),
        fua,
        (done) => engine.trim(offset, length, fua, done),
      );
    } else {
      void flush();
    }
  };

  const rounds = prng.range(1, 12);
  for (let round = 0; round < rounds; round++) {
    const burst = prng.range(1, 8);
    for (let index = 0; index < burst; index++) submitRandom();
    const turns = prng.int(4);
    for (let turn = 0; turn < turns; turn++) await new Promise((resolve) => setImmediate(resolve));
    if (prng.bool(0.2)) await Promise.all(pending);
  }

  if (exact) {
    const burst = prng.range(1, 8);
    for (let index = 0; index < burst; index++) submitRandom();
    await flush();
    assert.deepEqual(failures, [], `seed ${seed}`);
    assert.equal(outstanding.size, 0, `seed ${seed}: every mutation before the flush completed`);
    device.crash({ land: 0 });
    const durable = device.snapshotDurable();
    assert.ok(
      durable.equals(model.image()),
      `seed ${seed}: the medium holds everything written before the flush`,
    );
    await Promise.all(pending);
  } else {
    if (!device.crashed) {
      if (prng.bool()) await Promise.all(pending); // crash idle, or with requests queued and in flight
      if (!device.crashed) device.crash();
    }
    await Promise.all(pending); // requests dispatched after the crash fail and settle too
    assert.deepEqual(failures, [], `seed ${seed}`);
    const problem = model.checkAfterCrash(device.snapshotDurable());
    assert.equal(problem, null, `seed ${seed}: ${problem}`);
  }
  const stats = engine.stats();
  assert.equal(stats.queued + stats.inflight, 0, `seed ${seed}: drained`);
  await closeAsync(engine);
  return { flushes, merged: stats.merged };
}

test("flushes through the request engine survive power loss (seeded)", async () => {
  const only = process.env.VDISK_CRASH_SEED;
  const seeds =
    only !== undefined
      ? [Number(only)]
      : Array.from({ length: Number(process.env.VDISK_CRASH_RUNS ?? 150) }, (_, index) => index + 1);
  let flushes = 0;
  let merged = 0;
  for (const seed of seeds) {
    const result = await runSeed(seed);
    flushes += result.flushes;
    merged += result.merged;
  }
  if (seeds.length >= 50) {
    assert.ok(flushes > seeds.length / 2, `flushes completed: ${flushes}`);
    assert.ok(merged > 0, "some writes were merged");
  }
});
