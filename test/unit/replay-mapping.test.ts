/**
 * The replayer's arithmetic: the address mapping (src/replay/mapping.ts: device folding by rank, wrap
 * modulo the disk, 512-byte alignment, zero lengths, clipping to the disk's end and the server's maximum)
 * and the latency histogram (src/replay/histogram.ts: buckets, nearest-rank percentiles within ±0.4 %,
 * merge), checked against values worked out by hand and against a sorted array.
 */
import { test } from "node:test";
import * as assert from "node:assert/strict";
import { BUCKETS, Histogram, bucketOf, bucketRange } from "../../src/replay/histogram";
import { mapRequest, planMapping, type MappedRequest, type MappingCounters } from "../../src/replay/mapping";

const MiB = 1024 * 1024;

function mapper(
  devices: number[],
  maxEndBytes: number,
  diskBytes: number,
  blockBytesMin = 1,
  requestBytesMax = 32 * MiB,
) {
  const plan = planMapping({ file: "t", devices, maxEndBytes }, diskBytes, {
    blockBytesMin,
    requestBytesMax,
  });
  const counters: MappingCounters = { wrapped: 0, clipped: 0, zeroLength: 0 };
  const out: MappedRequest = { offsetBytes: 0, lengthBytes: 0 };
  return {
    plan,
    counters,
    map(device: number, offset: number, length: number): [number, number] {
      mapRequest(plan, device, offset, length, counters, out);
      return [out.offsetBytes, out.lengthBytes];
    },
  };
}

test("one device on a large enough disk keeps its addresses", () => {
  const m = mapper([1], 5 * MiB, 64 * MiB);
  assert.equal(m.plan.strideBytes, 5 * MiB);
  assert.deepEqual(m.map(1, 4096, 8192), [4096, 8192]);
  assert.deepEqual(m.map(1, 5 * MiB - 4096, 4096), [5 * MiB - 4096, 4096]);
  assert.deepEqual(m.counters, { wrapped: 0, clipped: 0, zeroLength: 0 });
});

test("devices are folded by rank, one stride (max end rounded up to 1 MiB) apart", () => {
  const m = mapper([3, 7, 20], 2 * MiB + 1, 64 * MiB);
  assert.equal(m.plan.strideBytes, 3 * MiB);
  assert.deepEqual(m.map(3, 0, 512), [0, 512]);
  assert.deepEqual(m.map(7, 0, 512), [3 * MiB, 512]);
  assert.deepEqual(m.map(20, 1024, 512), [6 * MiB + 1024, 512]);
});

test("addresses beyond the disk wrap modulo its size, aligned down to 512 bytes", () => {
  const m = mapper([0, 1], 10 * MiB, 4 * MiB);
  assert.equal(m.plan.strideBytes, 10 * MiB);
  // rank 1: 10 MiB + 1000 → mod 4 MiB = 2 MiB + 1000 → aligned 2 MiB + 512
  assert.deepEqual(m.map(1, 1000, 4096), [2 * MiB + 512, 4096]);
  // rank 0, inside: not wrapped but aligned
  assert.deepEqual(m.map(0, 1000, 4096), [512, 4096]);
  assert.equal(m.counters.wrapped, 1);
});

test("zero lengths become 512 bytes; requests are clipped at the disk's end and the server's maximum", () => {
  const m = mapper([0], 4 * MiB, 4 * MiB, 1, MiB);
  assert.deepEqual(m.map(0, 4096, 0), [4096, 512]);
  assert.equal(m.counters.zeroLength, 1);
  assert.deepEqual(m.map(0, 4 * MiB - 1024, 8192), [4 * MiB - 1024, 1024]);
  assert.deepEqual(m.map(0, 0, 2 * MiB), [0, MiB]);
  assert.equal(m.counters.clipped, 2);
});

test("a server's minimum block size aligns offsets and rounds lengths up", () => {
  const m = mapper([0], 64 * MiB, 64 * MiB, 4096);
  assert.equal(m.plan.alignmentBytes, 4096);
  assert.deepEqual(m.map(0, 5000, 100), [4096, 4096]);
  assert.deepEqual(m.map(0, 8192, 0), [8192, 4096]);
});

test("the mapping is deterministic and always inside the disk", () => {
  const m = mapper([0, 1, 2, 3], 1000 * MiB + 7, 3 * MiB + 512);
  let seed = 12345;
  for (let index = 0; index < 10_000; index++) {
    seed = (Math.imul(seed, 1103515245) + 12345) >>> 0;
    const device = seed % 4;
    const offset = (seed % 2000) * 512 * 1000 + (seed % 511);
    const length = (seed >>> 8) % (2 * MiB);
    const [mappedOffset, mappedLength] = m.map(device, offset, length);
    assert.equal(mappedOffset % 512, 0);
    assert.ok(mappedLength > 0 && mappedOffset + mappedLength <= 3 * MiB + 512);
    assert.deepEqual(m.map(device, offset, length), [mappedOffset, mappedLength]);
  }
});

test("histogram buckets: exact below 128, then 128 per power of two", () => {
  for (let value = 0; value < 128; value++) assert.deepEqual(bucketRange(bucketOf(value)), [value, value]);
  assert.deepEqual(bucketRange(bucketOf(128)), [128, 128]);
  assert.deepEqual(bucketRange(bucketOf(256)), [256, 257]);
  assert.deepEqual(bucketRange(bucketOf(1_000_000)), [999_424, 1_003_519]);
  assert.equal(bucketOf(Number.MAX_SAFE_INTEGER), BUCKETS - 1);
  let previous = -1;
  for (const value of [0, 1, 127, 128, 255, 256, 1e3, 1e6, 2 ** 32 - 1, 2 ** 32, 2 ** 40 + 12345, 2 ** 52]) {
    const bucket = bucketOf(value);
    const [low, high] = bucketRange(bucket);
    assert.ok(low <= value && value <= high, `${value} in [${low}, ${high}]`);
    assert.ok((high - low) / low <= 1 / 128 || low < 128, "relative width ≤ 1/128");
    assert.ok(bucket > previous, "buckets grow with values");
    previous = bucket;
  }
});

test("histogram percentiles are the nearest rank, within 0.4 %", () => {
  const histogram = new Histogram();
  const values: number[] = [];
  let seed = 7;
  for (let index = 0; index < 50_000; index++) {
    seed = (Math.imul(seed, 1664525) + 1013904223) >>> 0;
    const value = 1000 + (seed % 5_000_000) * (index % 7 === 0 ? 20 : 1);
    values.push(value);
    histogram.record(value);
  }
  values.sort((a, b) => a - b);
  assert.equal(histogram.count, values.length);
  assert.equal(histogram.min, values[0]);
  assert.equal(histogram.max, values[values.length - 1]);
  assert.ok(Math.abs(histogram.mean - values.reduce((sum, value) => sum + value, 0) / values.length) < 1e-3);
  for (const p of [1, 50, 90, 99, 99.9, 100]) {
    const exact = values[Math.max(1, Math.ceil((p / 100) * values.length)) - 1] as number;
    const estimate = histogram.percentile(p);
    assert.ok(Math.abs(estimate - exact) / exact <= 0.004, `p${p}: ${estimate} vs ${exact}`);
  }
  assert.equal(histogram.percentile(100), values[values.length - 1]);
});

test("histogram: small sets, merge, empty", () => {
  const a = new Histogram();
  for (const value of [1, 2, 3, 4]) a.record(value);
  assert.equal(a.percentile(50), 2);
  assert.equal(a.percentile(75), 3);
  assert.equal(a.percentile(100), 4);
  assert.equal(a.percentile(0), 1);
  const b = new Histogram();
  b.record(100);
  b.record(-5); // counts as 0
  a.merge(b);
  assert.equal(a.count, 6);
  assert.equal(a.min, 0);
  assert.equal(a.max, 100);
  assert.equal(a.sum, 110);
  const empty = new Histogram();
  assert.equal(empty.percentile(99), 0);
  assert.equal(empty.mean, 0);
});
