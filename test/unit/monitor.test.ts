/**
 * The monitor's pieces without a daemon: the StatsRecorder fed by a fake clock and by a real in-process
 * NBD server (exact counts per op, bytes, errors by code, latency buckets, totals that survive
 * disconnects, DISK@SNAP under DISK), `vdisk top`'s arithmetic and layout (rates, quantiles, 80×24), the
 * Prometheus exporter's text, and the API's trust helpers (loopback, path scrubbing).
 */
import { after, before, test } from "node:test";
import * as assert from "node:assert/strict";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import { MemoryDevice } from "../../src/devices/memory-device";
import { NbdErrno } from "../../src/errors";
import { Cmd } from "../../src/protocol/nbd/constants";
import type { ConnectionInfo } from "../../src/protocol/nbd/connection";
import { NbdServer } from "../../src/protocol/nbd/server";
import { RawNbdClient, type Reply } from "../../src/testing/raw-nbd-client";
import { StaticExports } from "../../src/testing/static-exports";
import { StatsRecorder, diskOfExport, emptyOpCounters, latencyBucketOf } from "../../src/monitor/recorder";
import { MetricsExporter } from "../../src/monitor/prometheus";
import { latencyBucketsSeconds, opKinds, type DiskStats, type StatsSnapshot } from "../../src/monitor/types";
import {
  computeRows,
  ellipsize,
  formatLatency,
  quantileSeconds,
  renderFrame,
  sortKeys,
} from "../../src/cli/top";
import { scrubPaths } from "../../src/daemon/api";
import { isLoopback } from "../../src/daemon/api-token";

const KiB = 1024;

function info(id: number, exportName: string, inflight = 0): ConnectionInfo {
  return { id, exportName, tag: null, peer: "unix", inflight: () => inflight, sizeBytes: () => 1 << 30 };
}

// -----------------------------------------------------------------------------------------------
// The recorder

test("latency buckets: bounds are inclusive, past the last bound is +Inf", () => {
  assert.equal(latencyBucketOf(0), 0);
  assert.equal(latencyBucketOf(0.01), 0, "10 µs is the first bound");
  assert.equal(latencyBucketOf(0.0101), 1);
  assert.equal(latencyBucketOf(1), 6, "1 ms");
  assert.equal(latencyBucketOf(1000), latencyBucketsSeconds.length - 1, "1 s");
  assert.equal(latencyBucketOf(1000.5), latencyBucketsSeconds.length, "+Inf");
  assert.equal(diskOfExport("web@before"), "web");
  assert.equal(diskOfExport("web"), "web");
});

test("recorder: ops, bytes, errors, latency per op; DISK@SNAP under DISK; totals survive close", () => {
  let now = 1000;
  const recorder = new StatsRecorder({ clock: () => now, wallClock: () => 42 });
  const first = recorder.monitor(info(1, "web", 3));
  const second = recorder.monitor(info(2, "web@snap"));
  const other = recorder.monitor(info(3, "db"));

  let start = first.begin(Cmd.WRITE, 0, 4096);
  now += 0.2; // 200 µs
  first.end(Cmd.WRITE, 4096, null, start);
  start = first.begin(Cmd.READ, 1 << 30, 4096);
  now += 2; // 2 ms
  first.end(Cmd.READ, 0, "OUT_OF_RANGE", start);
  start = second.begin(Cmd.READ, 0, 65536);
  now += 0.005;
  second.end(Cmd.READ, 65536, null, start);
  start = second.begin(99, 0, 0);
  second.end(99, 0, "UNKNOWN_COMMAND", start); // counted by code only
  other.end(Cmd.FLUSH, 0, null, other.begin(Cmd.FLUSH, 0, 0));

  let web = recorder.activity().get("web");
  assert.ok(web);
  assert.equal(web.ops.write.ops, 1);
  assert.equal(web.ops.write.bytes, 4096);
  assert.equal(web.ops.read.ops, 2, "a failed read is a request too");
  assert.equal(web.ops.read.errors, 1);
  assert.equal(web.ops.read.bytes, 65536, "only successful bytes");
  assert.deepEqual(web.errorsByCode, { OUT_OF_RANGE: 1, UNKNOWN_COMMAND: 1 });
  assert.equal(web.inflight, 3);
  assert.deepEqual(
    web.clients.map((client) => [client.id, client.export, client.connectedMs]),
    [
      [1, "web", 42],
      [2, "web@snap", 42],
    ],
  );
  const writeBuckets = web.ops.write.latencyBuckets;
  assert.equal(writeBuckets.length, latencyBucketsSeconds.length + 1);
  assert.equal(writeBuckets[4], 1, "200 µs lands in (100 µs, 250 µs]");
  assert.equal(web.ops.read.latencyBuckets[7], 1, "2 ms lands in (1 ms, 2.5 ms]");
  assert.ok(Math.abs(web.ops.write.latencySecondsSum - 0.0002) < 1e-9);
  assert.equal(recorder.activity().get("db")?.ops.flush.ops, 1);

  first.close();
  second.close();
  assert.equal(recorder.connections, 1);
  web = recorder.activity().get("web");
  assert.ok(web);
  assert.equal(web.clients.length, 0);
  assert.equal(web.inflight, 0);
  assert.equal(web.ops.read.ops, 2, "totals survive disconnects");
  assert.equal(web.ops.write.bytes, 4096);
  assert.deepEqual(web.errorsByCode, { OUT_OF_RANGE: 1, UNKNOWN_COMMAND: 1 });
  first.close(); // twice: no double counting
  assert.equal(recorder.activity().get("web")?.ops.write.ops, 1);
});

// -----------------------------------------------------------------------------------------------
// The recorder behind a real server

let dir: string;
let socketPath: string;
let server: NbdServer;
const recorder = new StatsRecorder();

before(async () => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), "vdisk-monitor-"));
  socketPath = path.join(dir, "nbd.sock");
  const exports = new StaticExports(
    new Map([
      ["mem", { device: new MemoryDevice(1024 * KiB) }],
      ["ro", { device: new MemoryDevice(64 * KiB), readOnly: true }],
    ]),
  );
  server = new NbdServer({ exports, monitor: recorder.monitor });
  await server.listenUnix(socketPath);
});

after(async () => {
  await server?.shutdown(1000);
  fs.rmSync(dir, { recursive: true, force: true });
});

function errorOf(reply: Reply): number {
  if (reply.kind === "simple") return reply.error;
  const last = reply.chunks[reply.chunks.length - 1];
  return last && last.type >= 2 ** 15 ? last.data.readUInt32BE(0) : 0;
}

test("server + recorder: every reply counted once, by op, with the error codes of the wire errors", async () => {
  const client = await RawNbdClient.connect(socketPath);
  await client.handshake();
  await client.go("mem", false);
  const data = Buffer.alloc(4 * KiB, 7);
  assert.equal(errorOf(await client.request(Cmd.WRITE, 0, data.length, 0, data)), 0);
  assert.equal(errorOf(await client.request(Cmd.WRITE, 8 * KiB, data.length, 0, data)), 0);
  assert.equal(errorOf(await client.request(Cmd.READ, 0, 8 * KiB)), 0);
  assert.equal(errorOf(await client.request(Cmd.READ, 1024 * KiB - 512, 4 * KiB)), NbdErrno.EINVAL);
  assert.equal(
    errorOf(await client.request(Cmd.WRITE, 1024 * KiB, 512, 0, Buffer.alloc(512))),
    NbdErrno.ENOSPC,
  );
  assert.equal(errorOf(await client.request(Cmd.TRIM, 0, 4 * KiB)), 0);
  assert.equal(errorOf(await client.request(Cmd.WRITE_ZEROES, 16 * KiB, 32 * KiB)), 0);
  assert.equal(errorOf(await client.request(Cmd.FLUSH, 0, 0)), 0);
  assert.equal(errorOf(await client.request(Cmd.CACHE, 0, 64 * KiB)), 0);
  assert.equal(errorOf(await client.request(42, 0, 0)), NbdErrno.EINVAL);

  const mem = recorder.activity().get("mem");
  assert.ok(mem);
  assert.equal(mem.clients.length, 1);
  assert.equal(mem.clients[0]?.peer, "unix");
  assert.equal(mem.clients[0]?.export, "mem");
  const counts = Object.fromEntries(
    opKinds.map((op) => [op, [mem.ops[op].ops, mem.ops[op].bytes, mem.ops[op].errors]]),
  );
  assert.deepEqual(counts, {
    read: [2, 8 * KiB, 1],
    write: [3, 8 * KiB, 1],
    zero: [1, 32 * KiB, 0],
    trim: [1, 4 * KiB, 0],
    flush: [1, 0, 0],
    cache: [1, 64 * KiB, 0],
    blockStatus: [0, 0, 0],
  });
  assert.deepEqual(mem.errorsByCode, { OUT_OF_RANGE: 1, UNKNOWN_COMMAND: 1, WRITE_OUT_OF_RANGE: 1 });
  for (const op of opKinds) {
    const total: number = mem.ops[op].latencyBuckets.reduce((sum, count) => sum + count, 0);
    assert.equal(total, mem.ops[op].ops, `histogram of ${op} counts every request`);
  }

  // A read-only export: the refused write is a READ_ONLY error.
  const readOnly = await RawNbdClient.connect(socketPath);
  await readOnly.handshake();
  await readOnly.go("ro");
  assert.equal(errorOf(await readOnly.request(Cmd.WRITE, 0, 512, 0, Buffer.alloc(512))), NbdErrno.EPERM);
  assert.deepEqual(recorder.activity().get("ro")?.errorsByCode, { READ_ONLY: 1 });

  client.close();
  readOnly.close();
  await client.waitClosed();
  for (let i = 0; i < 100 && recorder.connections > 0; i++) await new Promise((r) => setTimeout(r, 10));
  const left = recorder.activity().get("mem");
  assert.equal(left?.clients.length, 0);
  assert.equal(left?.ops.write.ops, 3, "kept after the client left");
});

// -----------------------------------------------------------------------------------------------
// vdisk top

function diskStats(
  name: string,
  reads: number,
  writes: number,
  latencyBucket: number,
  inflight = 0,
): DiskStats {
  const ops = emptyOpCounters();
  ops.read.ops = reads;
  ops.read.bytes = reads * 4096;
  ops.read.latencyBuckets[latencyBucket] = reads;
  ops.write.ops = writes;
  ops.write.bytes = writes * 65536;
  ops.write.latencyBuckets[latencyBucket] = (ops.write.latencyBuckets[latencyBucket] ?? 0) + writes;
  return {
    name,
    format: "vdisk",
    sizeBytes: 1 << 30,
    allocatedBytes: 0,
    snapshots: 0,
    ops,
    errorsByCode: {},
    inflight,
    clients: [],
  };
}

function snapshot(timeMs: number, disks: DiskStats[]): StatsSnapshot {
  return {
    timeMs,
    uptimeSeconds: timeMs / 1000,
    disks,
    server: { connections: 0, connectionsTotal: 0, protocolErrors: 0 },
    process: { residentBytes: 0, heapUsedBytes: 0, eventLoopLagSeconds: 0 },
  };
}

test("top: rates from two samples, busiest first, quantiles inside the right bucket", () => {
  const earlier = snapshot(10_000, [diskStats("a", 100, 0, 3), diskStats("b", 0, 0, 3)]);
  const busy = diskStats("b", 1000, 600, 6, 5);
  busy.ops.read.latencySecondsSum = 2;
  busy.ops.write.latencySecondsSum = 1;
  const later = snapshot(12_000, [diskStats("a", 300, 0, 3), busy, diskStats("c", 10, 0, 0)]);
  const rows = computeRows(earlier, later);
  assert.deepEqual(
    rows.map((row) => row.disk),
    ["b", "a", "c"],
  );
  const [b, a, c] = rows as [(typeof rows)[0], (typeof rows)[0], (typeof rows)[0]];
  assert.equal(b.readIops, 500);
  assert.equal(b.writeIops, 300);
  assert.equal(b.totalIops, 800);
  assert.equal(b.writeBytesPerSecond, 300 * 65536);
  assert.equal(b.inflight, 5, "in flight at the second sample");
  assert.equal(b.queueDepth, 1.5, "3 s of latency in a 2 s interval: 1.5 requests in flight on average");
  assert.equal(b.fastShare, null);
  assert.equal(a.readIops, 100, "(300 - 100) / 2 s");
  assert.equal(c.readIops, 5, "a new disk counts from zero");
  assert.deepEqual(a.totals, {
    ops: 300,
    readOps: 300,
    writeOps: 0,
    readBytes: 300 * 4096,
    writeBytes: 0,
    errors: 0,
  });
  // Bucket 6 is (500 µs, 1 ms]: the median of 1600 requests all in it is at its middle.
  assert.ok(Math.abs((b.p50Seconds as number) - 0.00075) < 1e-12);
  assert.ok((b.p99Seconds as number) > 0.0009 && (b.p99Seconds as number) <= 0.001);
  assert.equal(quantileSeconds([0, 0], 0.5), null);
  assert.deepEqual(
    computeRows(earlier, later, "name").map((row) => row.disk),
    ["a", "b", "c"],
  );
  assert.deepEqual(
    computeRows(earlier, later, "iops", true).map((row) => row.disk),
    ["c", "a", "b"],
  );
});

test("top: a frame fits 80×24 whatever the rows, names ellipsized", () => {
  const disks = Array.from({ length: 60 }, (_, i) =>
    diskStats(`disk-with-a-rather-long-name-${i}`, i * 10, i, 5),
  );
  const later = snapshot(2000, disks);
  const rows = computeRows(snapshot(1000, []), later);
  for (const sort of sortKeys) {
    const lines = renderFrame(rows, later, { width: 80, height: 24, sort, reverse: false });
    assert.equal(lines.length, 24);
    for (const line of lines) assert.ok(line.length < 80, `"${line}" is ${line.length} columns`);
    assert.match(lines[lines.length - 1] as string, /\+39 more rows/);
    assert.match(lines[1] as string, /^NAME.*R-IOPS.*W-IOPS.*R-MB\/s.*W-MB\/s.*P50.*P99.*QD.*FAST/);
  }
  assert.equal(ellipsize("abcdef", 4), "abc…");
  assert.equal(formatLatency(0.000123), "123us");
  assert.equal(formatLatency(0.0123), "12.3ms");
  assert.equal(formatLatency(null), "-");
});

// -----------------------------------------------------------------------------------------------
// Prometheus text

test("exporter: families typed and documented, histogram cumulative with +Inf = count", async () => {
  const disk = diskStats("web", 10, 4, 2);
  disk.ops.read.latencySecondsSum = 0.5;
  disk.errorsByCode = { OUT_OF_RANGE: 2 };
  const stats = snapshot(1000, [disk]);
  const exporter = new MetricsExporter(async () => stats, "1.2.3");
  const text = await exporter.text();
  assert.match(text, /^# TYPE vdisk_requests_total counter$/m);
  assert.match(text, /^vdisk_requests_total\{disk="web",op="read"\} 10$/m);
  assert.match(text, /^vdisk_requests_total\{disk="web",op="block_status"\} 0$/m);
  assert.match(text, /^vdisk_request_errors_total\{disk="web",code="OUT_OF_RANGE"\} 2$/m);
  assert.match(text, /^# TYPE vdisk_request_duration_seconds histogram$/m);
  assert.match(text, /^vdisk_request_duration_seconds_bucket\{disk="web",op="read",le="0\.00001"\} 0$/m);
  assert.match(text, /^vdisk_request_duration_seconds_bucket\{disk="web",op="read",le="0\.00005"\} 10$/m);
  assert.match(text, /^vdisk_request_duration_seconds_bucket\{disk="web",op="read",le="\+Inf"\} 10$/m);
  assert.match(text, /^vdisk_request_duration_seconds_sum\{disk="web",op="read"\} 0\.5$/m);
  assert.match(text, /^vdisk_request_duration_seconds_count\{disk="web",op="write"\} 4$/m);
  assert.doesNotMatch(text, /op="flush",le=/, "no histogram series for ops without requests");
  assert.match(text, /^vdisk_build_info\{version="1\.2\.3"\} 1$/m);
  assert.match(text, /^# TYPE process_resident_memory_bytes gauge$/m);
  assert.match(text, /^# TYPE nodejs_eventloop_lag_seconds gauge$/m);
});

// -----------------------------------------------------------------------------------------------
// Trust helpers

test("loopback addresses, and path scrubbing of API text", () => {
  for (const host of ["127.0.0.1", "127.9.8.7", "::1", "localhost", "::ffff:127.0.0.1"])
    assert.ok(isLoopback(host), host);
  for (const host of ["0.0.0.0", "::", "10.0.0.1", "192.168.1.2", "example.com", "::ffff:10.0.0.1"])
    assert.ok(!isLoopback(host), host);
  const home = "/srv/vdisk";
  assert.equal(
    scrubPaths("cannot open '/home/bob/secret/x.raw': ENOENT", home),
    "cannot open 'x.raw': ENOENT",
  );
  assert.equal(
    scrubPaths("restore /srv/vdisk/pools/default/a.vdisk", home),
    "restore /srv/vdisk/pools/default/a.vdisk",
  );
  assert.equal(scrubPaths("/srv/vdisk/../etc/passwd", home), "passwd");
  assert.equal(scrubPaths("socket=/run/vdisk/nbd.sock", home), "socket=nbd.sock");
  assert.equal(
    scrubPaths("GET /v1/jobs/3 or http://127.0.0.1:10810/v1/status", home),
    "GET /v1/jobs/3 or http://127.0.0.1:10810/v1/status",
  );
  assert.equal(scrubPaths("read/write 4 MiB/s", home), "read/write 4 MiB/s");
});
