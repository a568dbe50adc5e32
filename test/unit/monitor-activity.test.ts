/**
 * The monitor's workload figures without a daemon (docs/monitor.md): bucket lookups against the bounds,
 * percentile interpolation and its error bound, extent heat and its decay on an injected clock, the
 * workload profile, client tags, and — with fast-check — the whole recorder against a naive model fed
 * the same random sequence of requests, completions and reconnections (sizes, sequential/random,
 * inter-arrival times, queue depths, heat per extent, profile), then a real in-process server reached
 * with a tagged export name.
 */
import { after, before, test } from "node:test";
import * as assert from "node:assert/strict";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import fc from "fast-check";
import { MemoryDevice } from "../../src/devices/memory-device";
import { heatExtentsMax } from "../../src/limits";
import { Cmd, Opt, Rep } from "../../src/protocol/nbd/constants";
import type { ConnectionInfo, RequestMonitor } from "../../src/protocol/nbd/connection";
import { splitClientTag } from "../../src/protocol/nbd/client-tag";
import { NbdServer } from "../../src/protocol/nbd/server";
import { RawNbdClient } from "../../src/testing/raw-nbd-client";
import { StaticExports } from "../../src/testing/static-exports";
import { DiskHeat, HEAT_TICK_MS, heatExtentBytesFor, RENORMALIZE_HALF_LIVES } from "../../src/monitor/heat";
import {
  interArrivalBucketOf,
  quantileOf,
  queueDepthBucketOf,
  sizeBucketOf,
} from "../../src/monitor/histograms";
import { StatsRecorder, latencyPercentiles } from "../../src/monitor/recorder";
import {
  type ActivityStats,
  interArrivalBucketsSeconds,
  latencyBucketsSeconds,
  queueDepthBuckets,
  requestSizeBucketsBytes,
} from "../../src/monitor/types";

const KiB = 1024;
const MiB = 1024 * KiB;
const GiB = 1024 * MiB;

/** The bucket of `value` by a linear scan of `bounds` (the model's way). */
function naiveBucket(bounds: readonly number[], value: number): number {
  const index = bounds.findIndex((bound) => value <= bound);
  return index < 0 ? bounds.length : index;
}

function close(actual: number, expected: number, what: string, relative = 1e-9): void {
  const scale = Math.max(Math.abs(actual), Math.abs(expected));
  assert.ok(Math.abs(actual - expected) <= relative * scale + 1e-300, `${what}: ${actual} ≠ ${expected}`);
}

// -----------------------------------------------------------------------------------------------
// Buckets and percentiles

test("bucket lookups agree with the bounds (inclusive upper bounds, the last bucket unbounded)", () => {
  assert.equal(sizeBucketOf(0), 0);
  assert.equal(sizeBucketOf(512), 0);
  assert.equal(sizeBucketOf(513), 1);
  assert.equal(sizeBucketOf(4 * KiB), 3);
  assert.equal(sizeBucketOf(32 * MiB), 16);
  assert.equal(sizeBucketOf(32 * MiB + 1), 17);
  assert.equal(sizeBucketOf(2 ** 32 - 1), 17);
  assert.equal(queueDepthBucketOf(1), 0);
  assert.equal(queueDepthBucketOf(3), 2);
  assert.equal(queueDepthBucketOf(1024), 10);
  assert.equal(queueDepthBucketOf(1025), 11);
  assert.equal(interArrivalBucketOf(0), 0);
  assert.equal(interArrivalBucketOf(0.001), 0, "1 µs");
  assert.equal(interArrivalBucketOf(0.0011), 1);
  assert.equal(interArrivalBucketOf(16777.216), 24, "2^24 µs");
  assert.equal(interArrivalBucketOf(16777.217), 25);
  fc.assert(
    fc.property(fc.integer({ min: 0, max: 2 ** 32 - 1 }), (bytes) => {
      assert.equal(sizeBucketOf(bytes), naiveBucket(requestSizeBucketsBytes, bytes));
    }),
  );
  fc.assert(
    fc.property(fc.integer({ min: 1, max: 5000 }), (depth) => {
      assert.equal(queueDepthBucketOf(depth), naiveBucket(queueDepthBuckets, depth));
    }),
  );
  // Intervals in whole 1/1024 ms steps are exact in binary, so the comparison has no rounding.
  const boundsMicros = interArrivalBucketsSeconds.map((bound) => Math.round(bound * 1e6));
  fc.assert(
    fc.property(fc.integer({ min: 0, max: 2 ** 26 }), (steps) => {
      const ms = steps / 1024;
      assert.equal(interArrivalBucketOf(ms), naiveBucket(boundsMicros, ms * 1000));
    }),
  );
});

test("percentiles: linear inside the bucket; the truth lies in the same bucket (the error bound)", () => {
  const buckets = new Array<number>(latencyBucketsSeconds.length + 1).fill(0);
  buckets[6] = 100; // (500 µs, 1 ms]
  const p = latencyPercentiles(buckets);
  close(p.p50 as number, 0.00075, "p50 at the bucket's middle");
  close(p.p90 as number, 0.0005 + 0.0005 * 0.9, "p90");
  close(p.p999 as number, 0.0005 + 0.0005 * 0.999, "p99.9");
  assert.deepEqual(latencyPercentiles(buckets.map(() => 0)), { p50: null, p90: null, p99: null, p999: null });
  const slow = buckets.map(() => 0);
  slow[slow.length - 1] = 3;
  assert.equal(latencyPercentiles(slow).p50, 1, "past the last bound: its lower bound");
  assert.equal(quantileOf([0, 4, 0], [1, 2], 0.25), 1.25);

  fc.assert(
    fc.property(
      fc.array(fc.double({ min: 0, max: 2, noNaN: true }), { minLength: 1, maxLength: 300 }),
      fc.constantFrom(0.5, 0.9, 0.99, 0.999),
      (latencies, q) => {
        const histogram = new Array<number>(latencyBucketsSeconds.length + 1).fill(0);
        for (const seconds of latencies) {
          const bucket = naiveBucket(latencyBucketsSeconds, seconds);
          histogram[bucket] = (histogram[bucket] as number) + 1;
        }
        const estimate = quantileOf(histogram, latencyBucketsSeconds, q) as number;
        const sorted = [...latencies].sort((a, b) => a - b);
        const truth = sorted[Math.max(0, Math.ceil(q * sorted.length) - 1)] as number;
        const bucket = naiveBucket(latencyBucketsSeconds, truth);
        const lower = bucket === 0 ? 0 : (latencyBucketsSeconds[bucket - 1] as number);
        const upper = latencyBucketsSeconds[bucket] ?? lower;
        assert.ok(
          estimate >= lower - 1e-12 && estimate <= upper + 1e-12,
          `q=${q}: estimate ${estimate} outside the truth's bucket [${lower}, ${upper}] (truth ${truth})`,
        );
      },
    ),
  );
});

// -----------------------------------------------------------------------------------------------
// Heat

test("heat extents: 1 MiB up to 64 GiB, then doubled so that a disk has at most 65,536", () => {
  assert.equal(heatExtentBytesFor(512), MiB);
  assert.equal(heatExtentBytesFor(64 * GiB), MiB);
  assert.equal(heatExtentBytesFor(64 * GiB + 512), 2 * MiB);
  assert.equal(heatExtentBytesFor(1024 * GiB), 16 * MiB);
  assert.equal(heatExtentBytesFor(2 ** 52), 64 * GiB);
  for (const size of [512, 3 * MiB + 512, 64 * GiB + 512, 3 * 1024 * GiB, 2 ** 52]) {
    assert.ok(Math.ceil(size / heatExtentBytesFor(size)) <= heatExtentsMax);
  }
});

test("heat decays with the half-life (injected clock), renormalises without losing it, grows coarser", () => {
  const heat = new DiskHeat(8 * MiB, 60, 1000);
  heat.record(0, 4096, 0, 1000);
  heat.record(MiB - 512, 1024, 0, 1000); // touches extents 0 and 1
  close(heat.heatOf(0, 1000), 2, "two accesses");
  close(heat.heatOf(0, 61_000), 1, "halved after 60 s");
  close(heat.heatOf(1, 121_000), 0.25, "quartered after 120 s");
  close(heat.total(61_000), 1.5, "total");
  close(heat.rangeHeat(0, 2 * MiB, 61_000), 1.5, "range over both extents");
  close(heat.rangeHeat(MiB, 1, 61_000), 0.5, "a byte of extent 1");
  assert.equal(heat.rangeHeat(4 * MiB, MiB, 61_000), 0);
  assert.deepEqual(
    heat.hottest(5, 1000).map((extent) => [extent.offset, extent.heat]),
    [
      [0, 2],
      [MiB, 1],
    ],
  );
  heat.record(7 * MiB, 2 * MiB, 0, 1000); // past the end: clamped to the last extent
  close(heat.heatOf(7, 1000), 1, "clamped");

  // Past RENORMALIZE_HALF_LIVES half-lives the epoch moves; heat is the same function of time.
  const short = new DiskHeat(4 * MiB, 1, 0);
  short.record(0, 1, 0, 0);
  const later = (RENORMALIZE_HALF_LIVES + 10) * 1000;
  short.record(MiB, 1, 0, later);
  close(short.heatOf(0, later), 2 ** -(RENORMALIZE_HALF_LIVES + 10), "old heat after renormalising");
  close(short.heatOf(1, later + 1000), 0.5, "new heat");
  close(short.total(later), 1 + 2 ** -(RENORMALIZE_HALF_LIVES + 10), "total after renormalising");

  // A disk that grows past 64 GiB gets 2 MiB extents; heat is carried over.
  const big = new DiskHeat(64 * GiB, 60, 0);
  assert.equal(big.extentCount, heatExtentsMax);
  big.record(64 * GiB - MiB, MiB, 0, 0);
  big.record(3 * MiB, 1, 0, 0);
  big.grow(80 * GiB);
  assert.equal(big.extentBytes, 2 * MiB);
  assert.equal(big.extentCount, 40 * KiB);
  close(big.heatOf(32 * KiB - 1, 0), 1, "last old extent in the coarser one");
  close(big.heatOf(1, 0), 1, "3 MiB lies in the second 2 MiB extent");
  close(big.total(0), 2, "total kept");
});

test("heat: accesses are timestamped to the millisecond (one pow per tick)", () => {
  assert.equal(HEAT_TICK_MS, 1);
  const heat = new DiskHeat(4 * MiB, 1, 0);
  heat.record(0, 1, 0, 10.9); // counts as at 10 ms
  heat.record(MiB, 1, 0, 10); // the same weight
  close(heat.heatOf(0, 1010), 0.5, "at 10 ms");
  close(heat.heatOf(0, 1010), heat.heatOf(1, 1010), "same tick, same heat");
  heat.record(2 * MiB, 1, 0, 11);
  close(heat.heatOf(2, 1011), 0.5, "the next tick");
});

test("profile: random small vs large sequential, and the request rate from the decayed count", () => {
  const heat = new DiskHeat(GiB, 10, 0);
  // 100 random 4 KiB reads per second for 100 s (10 half-lives): the rate estimate converges.
  for (let i = 0; i < 10_000; i++) heat.record((i * 7919 * 4096) % GiB, 4096, 2, i * 10);
  const random = heat.profile(100_000);
  assert.equal(random.kind, "random-small");
  assert.equal(random.randomSmallFraction, 1);
  assert.equal(random.readFraction, 1);
  close(random.requestsPerSecond, 100, "rate", 0.01);
  // Then sequential 1 MiB writes at the same rate for 100 s: the profile follows.
  for (let i = 0; i < 10_000; i++) heat.record(i * MiB, MiB, 4 + 1, 100_000 + i * 10);
  const sequential = heat.profile(200_000);
  assert.equal(sequential.kind, "sequential-large");
  assert.ok(sequential.sequentialLargeFraction > 0.99);
  assert.ok(sequential.readFraction < 0.01);
  assert.equal(heat.profile(2_000_000).kind, "idle", "after a long silence");
  assert.equal(new DiskHeat(GiB, 10, 0).profile(0).kind, "idle");
});

// -----------------------------------------------------------------------------------------------
// Client tags

test("client tags: NAME/TAG split at the first '/', invalid tags refused with a reason", () => {
  assert.deepEqual(splitClientTag("web"), { ok: true, exportName: "web", tag: null });
  assert.deepEqual(splitClientTag("web/vm1"), { ok: true, exportName: "web", tag: "vm1" });
  assert.deepEqual(splitClientTag("web@mon/b.k_-9"), { ok: true, exportName: "web@mon", tag: "b.k_-9" });
  assert.deepEqual(splitClientTag("/vm1"), { ok: true, exportName: "", tag: "vm1" });
  assert.deepEqual(splitClientTag(`w/${"t".repeat(64)}`), { ok: true, exportName: "w", tag: "t".repeat(64) });
  for (const bad of ["web/", "web/a b", "web/a/b", "web/é", `w/${"t".repeat(65)}`]) {
    const result = splitClientTag(bad);
    assert.equal(result.ok, false, bad);
    if (!result.ok) assert.match(result.message, /is not a valid client tag/);
  }
});

// -----------------------------------------------------------------------------------------------
// The recorder against a naive model

const halfLifeSeconds = 0.5;
const disks: Record<string, number> = { a: 8 * MiB, b: 3 * MiB + 512 };
const exportNames = ["a", "a@s1", "b"];
const commands = [
  Cmd.READ,
  Cmd.WRITE,
  Cmd.WRITE_ZEROES,
  Cmd.TRIM,
  Cmd.FLUSH,
  Cmd.CACHE,
  Cmd.BLOCK_STATUS,
  99,
];
const lengths = [0, 512, 4 * KiB, 64 * KiB, 64 * KiB + 1, MiB, 3 * MiB, 32 * MiB + 1];

interface ModelActivity {
  sizes: number[][];
  sizeSums: number[];
  pattern: number[];
  interArrival: number[];
  interArrivalSum: number;
  interArrivalCount: number;
  depths: number[];
  depthSum: number;
  depthCount: number;
  depthMax: number;
}

function modelActivity(): ModelActivity {
  return {
    sizes: [new Array(18).fill(0), new Array(18).fill(0)],
    sizeSums: [0, 0],
    pattern: new Array(8).fill(0),
    interArrival: new Array(26).fill(0),
    interArrivalSum: 0,
    interArrivalCount: 0,
    depths: new Array(12).fill(0),
    depthSum: 0,
    depthCount: 0,
    depthMax: 0,
  };
}

const boundsMicros = interArrivalBucketsSeconds.map((bound) => Math.round(bound * 1e6));

function arrive(model: ModelActivity, intervalMs: number | null, depth: number): void {
  if (intervalMs !== null) {
    model.interArrival[naiveBucket(boundsMicros, intervalMs * 1000)] += 1;
    model.interArrivalSum += intervalMs / 1000;
    model.interArrivalCount += 1;
  }
  model.depths[naiveBucket(queueDepthBuckets, depth)] += 1;
  model.depthSum += depth;
  model.depthCount += 1;
  model.depthMax = Math.max(model.depthMax, depth);
}

/** Value-and-timestamp decay, the textbook way. */
class DecayModel {
  private readonly values = new Map<number, { value: number; atMs: number }>();
  add(key: number, nowMs: number): void {
    const entry = this.values.get(key);
    const value = entry ? entry.value * 2 ** (-(nowMs - entry.atMs) / (halfLifeSeconds * 1000)) : 0;
    this.values.set(key, { value: value + 1, atMs: nowMs });
  }
  get(key: number, nowMs: number): number {
    const entry = this.values.get(key);
    return entry ? entry.value * 2 ** (-(nowMs - entry.atMs) / (halfLifeSeconds * 1000)) : 0;
  }
  keys(): number[] {
    return [...this.values.keys()];
  }
}

function compareActivity(actual: ActivityStats, model: ModelActivity, what: string): void {
  assert.deepEqual(actual.sizeBuckets.read, model.sizes[0], `${what} read sizes`);
  assert.deepEqual(actual.sizeBuckets.write, model.sizes[1], `${what} write sizes`);
  assert.deepEqual(
    [actual.sizeBytesSum.read, actual.sizeBytesSum.write],
    model.sizeSums,
    `${what} size sums`,
  );
  const p = model.pattern;
  const sum = (...indexes: number[]): number =>
    indexes.reduce((total, index) => total + (p[index] as number), 0);
  assert.deepEqual(actual.sequential, { read: sum(0, 1), write: sum(4, 5) }, `${what} sequential`);
  assert.deepEqual(actual.random, { read: sum(2, 3), write: sum(6, 7) }, `${what} random`);
  assert.deepEqual(actual.sequentialSmall, { read: sum(0), write: sum(4) }, `${what} sequential small`);
  assert.deepEqual(actual.randomSmall, { read: sum(2), write: sum(6) }, `${what} random small`);
  assert.deepEqual(actual.interArrival.buckets, model.interArrival, `${what} inter-arrival buckets`);
  assert.equal(actual.interArrival.count, model.interArrivalCount, `${what} intervals`);
  close(actual.interArrival.secondsSum, model.interArrivalSum, `${what} inter-arrival sum`);
  assert.deepEqual(actual.queueDepth.buckets, model.depths, `${what} depth buckets`);
  assert.equal(actual.queueDepth.count, model.depthCount, `${what} arrivals`);
  assert.equal(actual.queueDepth.sum, model.depthSum, `${what} depth sum`);
  assert.equal(actual.queueDepth.max, model.depthMax, `${what} depth max`);
}

type Step =
  | {
      kind: "begin";
      client: number;
      command: number;
      sequential: boolean;
      offset: number;
      length: number;
      steps: number;
    }
  | { kind: "end"; client: number; which: number; steps: number }
  | { kind: "reconnect"; client: number; exportIndex: number };

const stepArbitrary: fc.Arbitrary<Step> = fc.oneof(
  {
    weight: 6,
    arbitrary: fc.record({
      kind: fc.constant("begin" as const),
      client: fc.nat(2),
      command: fc.constantFrom(...commands),
      sequential: fc.boolean(),
      offset: fc.nat(10 * MiB),
      length: fc.oneof(fc.constantFrom(...lengths), fc.integer({ min: 1, max: 5 * MiB })),
      // Whole 1/1024 ms steps (exact in binary); now and then a jump of minutes (decay, renormalising).
      steps: fc.oneof(
        { weight: 8, arbitrary: fc.nat(4096) },
        { weight: 1, arbitrary: fc.integer({ min: 0, max: 200_000 * 1024 }) },
      ),
    }),
  },
  {
    weight: 4,
    arbitrary: fc.record({
      kind: fc.constant("end" as const),
      client: fc.nat(2),
      which: fc.nat(),
      steps: fc.nat(4096),
    }),
  },
  {
    weight: 1,
    arbitrary: fc.record({
      kind: fc.constant("reconnect" as const),
      client: fc.nat(2),
      exportIndex: fc.nat(exportNames.length - 1),
    }),
  },
);

test("recorder = naive model: sizes, sequential/random, inter-arrival, queue depth, heat, profile", () => {
  fc.assert(
    fc.property(fc.array(stepArbitrary, { maxLength: 150 }), fc.nat(2), (steps, firstExport) => {
      let now = 5000;
      let nextId = 1;
      const recorder = new StatsRecorder({ clock: () => now, heatHalfLifeSeconds: halfLifeSeconds });
      interface Client {
        id: number;
        disk: string;
        monitor: RequestMonitor;
        outstanding: Array<{ command: number; start: number }>;
        position: number;
        lastArrivalMs: number | null;
        model: ModelActivity;
      }
      interface Disk {
        model: ModelActivity;
        outstanding: number;
        lastArrivalMs: number | null;
        heat: DecayModel;
        profile: DecayModel;
      }
      const diskModels = new Map<string, Disk>();
      const connect = (exportName: string): Client => {
        const disk = exportName.split("@")[0] as string;
        if (!diskModels.has(disk)) {
          diskModels.set(disk, {
            model: modelActivity(),
            outstanding: 0,
            lastArrivalMs: null,
            heat: new DecayModel(),
            profile: new DecayModel(),
          });
        }
        const info: ConnectionInfo = {
          id: nextId,
          exportName,
          tag: `t${nextId}`,
          peer: "unix",
          inflight: () => 0,
          sizeBytes: () => disks[disk] as number,
        };
        nextId++;
        return {
          id: info.id,
          disk,
          monitor: recorder.monitor(info),
          outstanding: [],
          position: -1,
          lastArrivalMs: null,
          model: modelActivity(),
        };
      };
      const clients = [0, 1, 2].map((i) => connect(exportNames[(firstExport + i) % 3] as string));

      for (const step of steps) {
        const client = clients[step.client] as Client;
        const disk = diskModels.get(client.disk) as Disk;
        if (step.kind === "reconnect") {
          client.monitor.close();
          disk.outstanding -= client.outstanding.length;
          clients[step.client] = connect(exportNames[step.exportIndex] as string);
          continue;
        }
        now += step.steps / 1024;
        if (step.kind === "end") {
          if (client.outstanding.length === 0) continue;
          const [request] = client.outstanding.splice(step.which % client.outstanding.length, 1);
          client.monitor.end(request?.command as number, 0, null, request?.start as number);
          disk.outstanding -= 1;
          continue;
        }
        const offset = step.sequential && client.position >= 0 ? client.position : step.offset;
        const start = client.monitor.begin(step.command, offset, step.length);
        assert.equal(start, now);
        client.outstanding.push({ command: step.command, start });
        arrive(
          client.model,
          client.lastArrivalMs === null ? null : now - client.lastArrivalMs,
          client.outstanding.length,
        );
        disk.outstanding += 1;
        arrive(disk.model, disk.lastArrivalMs === null ? null : now - disk.lastArrivalMs, disk.outstanding);
        client.lastArrivalMs = now;
        disk.lastArrivalMs = now;
        if (step.command === Cmd.READ || step.command === Cmd.WRITE) {
          const write = step.command === Cmd.WRITE ? 1 : 0;
          const profileClass =
            write * 4 + (offset === client.position ? 0 : 2) + (step.length > 64 * KiB ? 1 : 0);
          for (const model of [client.model, disk.model]) {
            (model.sizes[write] as number[])[naiveBucket(requestSizeBucketsBytes, step.length)] += 1;
            model.sizeSums[write] = (model.sizeSums[write] as number) + step.length;
            model.pattern[profileClass] = (model.pattern[profileClass] as number) + 1;
          }
          const tick = Math.floor(now); // accesses are timestamped to the millisecond (HEAT_TICK_MS)
          disk.profile.add(profileClass, tick);
          const extents = Math.ceil((disks[client.disk] as number) / MiB);
          if (step.length > 0) {
            const first = Math.floor(offset / MiB);
            const last = Math.min(extents - 1, Math.floor((offset + step.length - 1) / MiB));
            for (let extent = first; extent <= last; extent++) disk.heat.add(extent, tick);
          }
        }
        const ranged: number[] = [
          Cmd.READ,
          Cmd.WRITE,
          Cmd.WRITE_ZEROES,
          Cmd.TRIM,
          Cmd.CACHE,
          Cmd.BLOCK_STATUS,
        ];
        if (ranged.includes(step.command)) {
          client.position = offset + step.length;
        }
      }

      const activity = recorder.activity();
      for (const [name, disk] of diskModels) {
        const actual = activity.get(name);
        assert.ok(actual, `disk ${name}`);
        compareActivity(actual.activity, disk.model, `disk ${name}`);
        const live = clients.filter((client) => client.disk === name);
        assert.deepEqual(
          actual.clients.map((client) => [client.id, client.tag]),
          live
            .map((client) => [client.id, `t${client.id}`])
            .sort((x, y) => (x[0] as number) - (y[0] as number)),
        );
        for (const client of live) {
          const stats = actual.clients.find((candidate) => candidate.id === client.id);
          compareActivity(stats?.activity as ActivityStats, client.model, `client ${client.id}`);
        }

        const view = recorder.heat(name);
        assert.ok(view);
        assert.equal(view.extentBytes, MiB);
        const extents = Math.ceil((disks[name] as number) / MiB);
        assert.equal(view.extentCount, extents);
        let total = 0;
        for (let extent = 0; extent < extents; extent++) {
          const expected = disk.heat.get(extent, now);
          total += expected;
          close(view.rangeHeat(extent * MiB, 1), expected, `${name} extent ${extent}`);
        }
        close(view.total(), total, `${name} total heat`);
        const hottest = view.hottest(3);
        const expectedTop = disk.heat
          .keys()
          .map((extent) => disk.heat.get(extent, now))
          .filter((heat) => heat > 0)
          .sort((x, y) => y - x)
          .slice(0, 3);
        assert.equal(hottest.length, expectedTop.length, `${name} hottest count`);
        hottest.forEach((extent, index) => {
          close(extent.heat, expectedTop[index] as number, `${name} hottest #${index}`);
          close(
            extent.heat,
            disk.heat.get(extent.offset / MiB, now),
            `${name} hottest #${index} is its extent`,
          );
        });
        const weights = [0, 1, 2, 3, 4, 5, 6, 7].map((profileClass) => disk.profile.get(profileClass, now));
        const weight = weights.reduce((sum, value) => sum + value, 0);
        const profile = view.profile();
        close(profile.requestsPerSecond, (weight * Math.LN2) / halfLifeSeconds, `${name} rate`);
        if (weight > 0) {
          close(
            profile.randomSmallFraction,
            ((weights[2] as number) + (weights[6] as number)) / weight,
            "rs",
          );
          close(
            profile.sequentialLargeFraction,
            ((weights[1] as number) + (weights[5] as number)) / weight,
            "sl",
          );
          close(
            profile.readFraction,
            weights.slice(0, 4).reduce((sum, value) => sum + value, 0) / weight,
            "r",
          );
        }
      }
    }),
    { numRuns: 150 },
  );
});

test("recorder: memory is stated, a disk's heat map goes with the disk, off means no factory", () => {
  let now = 0;
  const recorder = new StatsRecorder({ clock: () => now });
  const info: ConnectionInfo = {
    id: 1,
    exportName: "web",
    tag: null,
    peer: "unix",
    inflight: () => 0,
    sizeBytes: () => 64 * GiB,
  };
  const monitor = recorder.monitor(info);
  assert.equal(recorder.memoryBytes(), (7 * 21 + 89) * 8 + 89 * 8 + 64 * KiB * 8 + 64);
  monitor.end(Cmd.READ, 4096, null, monitor.begin(Cmd.READ, 5 * MiB, 4096));
  now += 1000;
  assert.deepEqual(recorder.heatStats("web", 4)?.top, [{ offset: 5 * MiB, heat: 2 ** (-1 / 60) }]);
  recorder.retainHeat(new Set());
  assert.notEqual(recorder.heat("web"), null, "kept while a client is connected");
  monitor.close();
  recorder.retainHeat(new Set(["web"]));
  assert.notEqual(recorder.heat("web"), null, "kept while the disk exists");
  recorder.retainHeat(new Set());
  assert.equal(recorder.heat("web"), null, "dropped with the disk");
  assert.equal(recorder.activity().get("web")?.activity.sizeBuckets.read[3], 1, "its totals stay");
  const off = new StatsRecorder({ enabled: false });
  assert.throws(() => off.monitor({ ...info, id: 2 }), /monitor is off/);
});

// -----------------------------------------------------------------------------------------------
// A real server reached as NAME/TAG

let dir: string;
let socketPath: string;
let server: NbdServer;
const recorder = new StatsRecorder();

before(async () => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), "vdisk-monitor-activity-"));
  socketPath = path.join(dir, "nbd.sock");
  const exports = new StaticExports(new Map([["mem", { device: new MemoryDevice(4 * MiB) }]]));
  server = new NbdServer({ exports, monitor: recorder.monitor });
  await server.listenUnix(socketPath);
});

after(async () => {
  await server?.shutdown(1000);
  fs.rmSync(dir, { recursive: true, force: true });
});

test("server: NAME/TAG is served as NAME and accounted with its tag; bad tags are refused", async () => {
  const tagged = await RawNbdClient.connect(socketPath);
  await tagged.handshake();
  const { size } = await tagged.go("mem/vm-1.a", true, ["base:allocation"]);
  assert.equal(size, 4 * MiB);
  const data = Buffer.alloc(64 * KiB, 1);
  for (let i = 0; i < 4; i++) await tagged.request(Cmd.WRITE, i * 64 * KiB, data.length, 0, data);
  await tagged.request(Cmd.READ, 3 * MiB, 4 * KiB);
  await tagged.request(Cmd.FLUSH, 0, 0);
  await tagged.request(Cmd.READ, 3 * MiB + 4 * KiB, 4 * KiB); // where the previous ranged request ended

  const plain = await RawNbdClient.connect(socketPath);
  await plain.handshake();
  await plain.go("mem");
  await plain.request(Cmd.READ, 0, 512);

  const mem = recorder.activity().get("mem");
  assert.ok(mem);
  assert.deepEqual(
    mem.clients.map((client) => [client.export, client.tag]),
    [
      ["mem", "vm-1.a"],
      ["mem", null],
    ],
  );
  const activity = mem.clients[0]?.activity as ActivityStats;
  assert.deepEqual(activity.sequential, { read: 1, write: 3 });
  assert.deepEqual(activity.random, { read: 1, write: 1 });
  assert.equal(activity.sizeBuckets.write[7], 4, "64 KiB writes");
  assert.equal(activity.queueDepth.max, 1);
  assert.equal(mem.activity.queueDepth.count, 8, "the disk saw both clients' requests");
  const hottest = recorder.heat("mem")?.hottest(2) ?? [];
  assert.deepEqual(
    hottest.map((extent) => extent.offset),
    [0, 3 * MiB],
  );

  for (const bad of ["mem/", "mem/a b", "mem/x/y"]) {
    const client = await RawNbdClient.connect(socketPath);
    await client.handshake();
    await assert.rejects(client.go(bad, false), /GO refused: 2147483654 .*not a valid client tag/);
    client.close();
  }
  // NBD_OPT_LIST still lists plain names.
  const lister = await RawNbdClient.connect(socketPath);
  await lister.handshake();
  lister.sendOption(Opt.LIST);
  const replies = await lister.readOptionReplies();
  assert.deepEqual(
    replies.filter((reply) => reply.type === Rep.SERVER).map((reply) => reply.data.subarray(4).toString()),
    ["mem"],
  );
  for (const client of [tagged, plain, lister]) client.close();
});
