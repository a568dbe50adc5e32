/**
 * `vdisk replay` (src/cli/replay.ts, src/replay/replayer.ts) end to end: the real bin/vdisk against a real
 * daemon (src/testing/daemon-fixture.ts), each on its own fresh disk so that the daemon's counters
 * (GET /v1/disks/NAME/stats) must show exactly the reads, writes and bytes the replay reports.
 *
 *   - each real trace of test/fixtures/traces, untimed, the first 3000 records (msr-wdev_1 has 1055);
 *     the read and write counts were computed with awk (`head -n 3000 FILE | awk '{if($5==1)r++; else w++}'`
 *     for the MQSim files; the MSR file is all writes), independently of the parser;
 *   - the three traces at once, one disk each (three VMs), then the text output with its total row;
 *   - timed replay of a small synthetic SPC trace at --speed 2 takes at least half its span, and a burst
 *     at queue depth 1 counts every waiting record as delayed;
 *   - --uri instead of the home, the --json report's shape, and the error messages (unknown disk, missing
 *     trace, disk/trace count mismatch, unknown format).
 */
import { after, before, test } from "node:test";
import * as assert from "node:assert/strict";
import * as fs from "node:fs";
import * as path from "node:path";
import type { DiskStats } from "../../src/monitor/types";
import type { ReplayReport, VmReport } from "../../src/replay/replayer";
import {
  type DaemonFixture,
  type RunResult,
  describeRun,
  startDaemon,
} from "../../src/testing/daemon-fixture";

const fixtures = path.resolve(__dirname, "..", "..", "..", "test", "fixtures", "traces");
const tpcc = path.join(fixtures, "mqsim-tpcc-small.trace");
const wsrch = path.join(fixtures, "mqsim-wsrch-small.trace");
const msr = path.join(fixtures, "msr-wdev_1.csv");

let daemon: DaemonFixture;

before(async () => {
  daemon = await startDaemon({ name: "vdisk-replay" });
});

after(() => daemon?.cleanup());

function createDisk(name: string, size = "256M"): void {
  const result = daemon.vdisk(["create", name, "--size", size]);
  assert.equal(result.status, 0, describeRun("vdisk create", [name], result));
}

function replay(args: string[]): RunResult {
  return daemon.vdisk(["replay", ...args], { timeoutMs: 50_000 });
}

function replayJson(args: string[]): ReplayReport {
  const result = replay([...args, "--json"]);
  assert.equal(
    result.status,
    0,
    `${describeRun("vdisk replay", args, result)}\ndaemon log:\n${daemon.log()}`,
  );
  return JSON.parse(result.stdout) as ReplayReport;
}

function fails(args: string[], message: RegExp, hint?: RegExp): void {
  const result = replay(args);
  assert.equal(result.status, 1, `should fail: ${describeRun("vdisk replay", args, result)}`);
  const lines = result.stderr.trimEnd().split("\n");
  assert.match(lines[0] ?? "", /^vdisk: error: /);
  assert.match(lines[0] ?? "", message);
  if (hint) assert.match(lines[1] ?? "", new RegExp(`^  hint: .*${hint.source}`));
}

/** The daemon's counters for the disk must be exactly what the VM replayed. */
async function assertStatsMatch(vm: VmReport): Promise<void> {
  const stats = await daemon.apiGet<DiskStats>(`disks/${vm.disk}/stats`);
  assert.equal(stats.ops.read.ops, vm.reads, `${vm.disk}: reads`);
  assert.equal(stats.ops.write.ops, vm.writes, `${vm.disk}: writes`);
  assert.equal(stats.ops.read.bytes, vm.readBytes, `${vm.disk}: bytes read`);
  assert.equal(stats.ops.write.bytes, vm.writeBytes, `${vm.disk}: bytes written`);
  assert.equal(stats.ops.read.errors + stats.ops.write.errors, 0, `${vm.disk}: no errors`);
  assert.equal(stats.ops.flush.ops + stats.ops.trim.ops + stats.ops.zero.ops, 0, `${vm.disk}: nothing else`);
}

interface Expected {
  trace: string;
  disk: string;
  format: string;
  records: number;
  reads: number;
  writes: number;
  readBytes: number;
  writeBytes: number;
}

// From awk over the first 3000 lines (see the file comment).
const singles: Expected[] = [
  {
    trace: tpcc,
    disk: "tpcc",
    format: "disksim",
    records: 3000,
    reads: 1858,
    writes: 1142,
    readBytes: 15_540_224,
    writeBytes: 10_257_920,
  },
  {
    trace: wsrch,
    disk: "wsrch",
    format: "disksim",
    records: 3000,
    reads: 2998,
    writes: 2,
    readBytes: 45_608_960,
    writeBytes: 16_384,
  },
  {
    trace: msr,
    disk: "msr",
    format: "msr",
    records: 1055,
    reads: 0,
    writes: 1055,
    readBytes: 0,
    writeBytes: 5_537_792,
  },
];

for (const expected of singles) {
  test(`${path.basename(expected.trace)}: untimed replay, the daemon counts exactly the replayed requests`, async () => {
    createDisk(expected.disk);
    const report = replayJson([expected.trace, "--disk", expected.disk, "--untimed", "--limit", "3000"]);
    assert.equal(report.mode, "untimed");
    assert.equal(report.vms.length, 1);
    const vm = report.vms[0] as VmReport;
    assert.equal(vm.format, expected.format);
    assert.equal(vm.records, expected.records);
    assert.equal(vm.reads, expected.reads);
    assert.equal(vm.writes, expected.writes);
    assert.equal(vm.errors, 0);
    assert.equal(vm.latency.count, expected.records);
    if (vm.mapping.clipped === 0) {
      assert.equal(vm.readBytes, expected.readBytes);
      assert.equal(vm.writeBytes, expected.writeBytes);
    }
    assert.equal(vm.mapping.diskBytes, 256 * 1024 * 1024);
    await assertStatsMatch(vm);
  });
}

test("three traces at once on three disks: one VM each, exact counts per disk, text with a total", async () => {
  for (const name of ["vm-a", "vm-b", "vm-c"]) createDisk(name, "128M");
  const args = [
    tpcc,
    wsrch,
    msr,
    "--disk",
    "vm-a",
    "--disk",
    "vm-b",
    "--disk",
    "vm-c",
    "--untimed",
    "--limit",
    "2000",
  ];
  const report = replayJson([...args, "--queue-depth", "16", "--connections", "2"]);
  assert.deepEqual(
    report.vms.map((vm) => [vm.vm, vm.disk, vm.records, vm.reads, vm.writes]),
    [
      ["vm1", "vm-a", 2000, 1229, 771],
      ["vm2", "vm-b", 2000, 1998, 2],
      ["vm3", "vm-c", 1055, 0, 1055],
    ],
  );
  assert.equal(report.total.records, 5055);
  assert.equal(report.total.vms, 3);
  assert.equal(report.connections, 2);
  assert.equal(report.queueDepth, 16);
  for (const vm of report.vms) await assertStatsMatch(vm);
  const slowest = Math.max(...report.vms.map((vm) => vm.elapsedSeconds));
  assert.ok(report.total.elapsedSeconds >= slowest - 1e-9, "the total spans every VM");

  // The same in text: a header, a row per VM and a total.
  for (const name of ["vm-d", "vm-e", "vm-f"]) createDisk(name, "128M");
  const text = replay([
    tpcc,
    wsrch,
    msr,
    "--disk",
    "vm-d",
    "--disk",
    "vm-e",
    "--disk",
    "vm-f",
    "--untimed",
    "--limit",
    "500",
  ]);
  assert.equal(text.status, 0, describeRun("vdisk replay", [], text));
  const lines = text.stdout.trimEnd().split("\n");
  assert.match(
    lines[0] ?? "",
    /^replayed 3 traces, untimed \(as fast as possible\), queue depth 64, first 500 records$/,
  );
  assert.match(
    lines[1] ?? "",
    /^VM\s+DISK\s+FORMAT\s+RECORDS\s+READS\s+WRITES\s+TIME\s+IOPS\s+MB\/S\s+MEAN\s+P50\s+P90\s+P99\s+P99\.9\s+MAX\s+DELAYED\s+WRAPPED$/,
  );
  assert.match(lines[2] ?? "", /^vm1\s+vm-d\s+disksim\s+500\s+/);
  assert.match(lines[4] ?? "", /^vm3\s+vm-f\s+msr\s+500\s+0\s+500\s+/);
  assert.match(lines[5] ?? "", /^total\s+1500\s+/);
  assert.match(text.stdout, /vm1: .*mqsim-tpcc-small\.trace on nbd\+unix:\/\/\/vm-d\?socket=/);
});

test("one disk for several traces, reached with --uri instead of the home", async () => {
  createDisk("shared", "64M");
  const result = daemon.vdisk([
    "replay",
    tpcc,
    msr,
    "--uri",
    daemon.unixUri("shared"),
    "--untimed",
    "--limit",
    "300",
    "--json",
  ]);
  assert.equal(result.status, 0, describeRun("vdisk replay --uri", [], result));
  const report = JSON.parse(result.stdout) as ReplayReport;
  assert.deepEqual(
    report.vms.map((vm) => [vm.disk, vm.records]),
    [
      ["shared", 300],
      ["shared", 300],
    ],
  );
  const stats = await daemon.apiGet<DiskStats>("disks/shared/stats");
  assert.equal(stats.ops.read.ops + stats.ops.write.ops, 600);
  assert.equal(stats.ops.read.ops, report.total.reads);
  assert.equal(stats.ops.write.ops, report.total.writes);
});

test("timed: at --speed 2 a trace takes at least half its span; a burst at queue depth 1 is delayed", () => {
  createDisk("timed", "64M");
  // 41 requests, one every 15 ms: a span of 0.6 s.
  const lines: string[] = [];
  for (let index = 0; index <= 40; index++) {
    lines.push(
      `${index % 2},${index * 64},4096,${index % 3 === 0 ? "w" : "r"},${(index * 0.015).toFixed(3)}`,
    );
  }
  const trace = daemon.file("paced.spc");
  fs.writeFileSync(trace, `${lines.join("\n")}\n`);
  const report = replayJson([trace, "--disk", "timed", "--speed", "2"]);
  assert.equal(report.mode, "timed");
  assert.equal(report.speed, 2);
  const vm = report.vms[0] as VmReport;
  assert.equal(vm.format, "spc");
  assert.equal(vm.records, 41);
  assert.equal(vm.traceSpanSeconds, 0.6);
  assert.ok(vm.elapsedSeconds >= 0.3, `took ${vm.elapsedSeconds} s, at least 0.3 s`);
  assert.ok(vm.elapsedSeconds < 2.5, `took ${vm.elapsedSeconds} s: far too slow for 0.3 s of trace`);
  assert.equal(vm.delayed, 0);
  assert.ok(vm.issueLateMaxUs >= 0 && vm.issueLateMeanUs <= vm.issueLateMaxUs);

  // Twenty requests due at once, one at a time: the nineteen that wait are delayed.
  const burst = daemon.file("burst.spc");
  fs.writeFileSync(burst, Array.from({ length: 20 }, (_, index) => `0,${index * 8},4096,r,0`).join("\n"));
  const burstReport = replayJson([burst, "--disk", "timed", "--queue-depth", "1"]);
  assert.equal((burstReport.vms[0] as VmReport).delayed, 19);
  assert.equal(burstReport.queueDepth, 1);
});

test("--json: the full report's shape", () => {
  createDisk("shape", "64M");
  const report = replayJson([msr, "--disk", "shape", "--untimed", "--limit", "100", "--format", "msr"]);
  assert.deepEqual(Object.keys(report).sort(), [
    "connections",
    "limit",
    "mode",
    "queueDepth",
    "speed",
    "total",
    "vms",
  ]);
  assert.equal(report.limit, 100);
  assert.equal(report.speed, null);
  const vm = report.vms[0] as VmReport;
  assert.deepEqual(Object.keys(vm).sort(), [
    "delayed",
    "disk",
    "elapsedSeconds",
    "errors",
    "firstError",
    "format",
    "iops",
    "issueLateMaxUs",
    "issueLateMeanUs",
    "latency",
    "mapping",
    "mbPerSecond",
    "readBytes",
    "readLatency",
    "reads",
    "records",
    "trace",
    "traceSpanSeconds",
    "uri",
    "vm",
    "writeBytes",
    "writeLatency",
    "writes",
  ]);
  assert.deepEqual(Object.keys(vm.latency).sort(), [
    "count",
    "maxUs",
    "meanUs",
    "minUs",
    "p50Us",
    "p90Us",
    "p999Us",
    "p99Us",
  ]);
  assert.deepEqual(Object.keys(vm.mapping).sort(), [
    "clipped",
    "devices",
    "diskBytes",
    "strideBytes",
    "wrapped",
    "zeroLength",
  ]);
  assert.equal(vm.records, 100);
  assert.equal(vm.writeLatency.count, 100);
  assert.equal(vm.readLatency.count, 0);
  const latency = vm.latency;
  assert.ok(latency.minUs > 0 && latency.minUs <= latency.p50Us && latency.p50Us <= latency.p90Us);
  assert.ok(
    latency.p90Us <= latency.p99Us && latency.p99Us <= latency.p999Us && latency.p999Us <= latency.maxUs,
  );
  assert.ok(vm.iops > 0 && vm.mbPerSecond > 0 && vm.elapsedSeconds > 0);
  assert.equal(vm.mapping.devices, 1);
  assert.equal(vm.mapping.diskBytes, 64 * 1024 * 1024);
  // wdev_1 writes up to 50 GiB into a 64 MiB disk: most records wrap.
  assert.ok(vm.mapping.wrapped > 0);
  assert.equal(report.total.records, 100);
  assert.equal(report.total.wrapped, vm.mapping.wrapped);
});

test("errors say what was wrong and what to do", () => {
  createDisk("err", "16M");
  fails([tpcc, "--disk", "no-such-disk", "--untimed"], /no-such-disk/);
  fails(
    [daemon.file("missing.trace"), "--disk", "err"],
    /trace .*missing\.trace does not exist/,
    /readable trace file/,
  );
  fails(
    [tpcc, wsrch, msr, "--disk", "err", "--disk", "err"],
    /2 --disk options for 3 traces/,
    /once per trace/,
  );
  fails([tpcc], /no disk to replay against/, /--disk NAME/);
  const prose = daemon.file("prose.txt");
  fs.writeFileSync(prose, "not a trace\n");
  fails([prose, "--disk", "err"], /cannot tell the format of trace/, /--format/);
  fails([tpcc, "--disk", "err", "--format", "spc"], /line 1: expected 5 comma-separated fields/, /--format/);
  const usage = replay([tpcc, "--disk", "err", "--speed", "0"]);
  assert.equal(usage.status, 2, describeRun("vdisk replay --speed 0", [], usage));
  assert.match(usage.stderr, /--speed takes a number above 0/);
});
