/**
 * Metrics against a real daemon (src/testing/daemon-fixture.ts) driven by real clients: fio's nbd engine
 * with an exact request count (`--number_ios`), nbdsh for requests past the end. The Prometheus text of
 * `GET /metrics` is parsed and checked for well-formed names and types, and its counters must move by
 * exactly what the clients did (requests, bytes, histogram counts, errors by code). `vdisk top --once
 * --json` is compared with `GET /v1/stats` taken around it, `vdisk stats` is checked in both forms, and
 * the full-screen `vdisk top` runs under `script` (a pseudo-terminal): it must draw, change its sort on
 * `s` and quit on `q`, restoring the terminal.
 */
import { after, before, test } from "node:test";
import * as assert from "node:assert/strict";
import { type ChildProcess, spawn } from "node:child_process";
import * as fs from "node:fs";
import * as path from "node:path";
import {
  type DaemonFixture,
  describeRun,
  repositoryRoot,
  requireTool,
  run,
  spawnTool,
  startDaemon,
} from "../../src/testing/daemon-fixture";
import type { TopJson } from "../../src/cli/top";
import { opKinds, type DiskStats, type StatsSnapshot } from "../../src/monitor/types";

const KiB = 1024;
const MiB = 1024 * KiB;
const diskBytes = 64 * MiB;

let daemon: DaemonFixture;
const children: ChildProcess[] = [];

before(async () => {
  for (const tool of ["fio", "nbdsh", "script"]) requireTool(tool);
  daemon = await startDaemon({ name: "vdisk-metrics" });
  for (const name of ["mw", "mload"]) {
    const result = daemon.vdisk(["create", name, "--size", String(diskBytes)]);
    assert.equal(result.status, 0, describeRun("vdisk create", [name], result));
  }
});

after(() => {
  for (const child of children) if (child.exitCode === null && child.pid) process.kill(child.pid, "SIGKILL");
  daemon?.cleanup();
});

// -----------------------------------------------------------------------------------------------
// The Prometheus text format

interface Sample {
  name: string;
  labels: Record<string, string>;
  value: number;
}

interface Scrape {
  text: string;
  types: Map<string, string>;
  helps: Map<string, string>;
  samples: Sample[];
}

const metricNamePattern = /^[a-zA-Z_:][a-zA-Z0-9_:]*$/;
const labelNamePattern = /^[a-zA-Z_][a-zA-Z0-9_]*$/;

/** Parses text format 0.0.4 strictly: every line is a HELP, a TYPE or a sample of a declared family. */
function parseMetrics(text: string): Scrape {
  const types = new Map<string, string>();
  const helps = new Map<string, string>();
  const samples: Sample[] = [];
  for (const line of text.split("\n")) {
    if (line === "") continue;
    const comment = /^# (HELP|TYPE) (\S+) (.*)$/.exec(line);
    if (comment) {
      const [, kind, name, rest] = comment as unknown as [string, string, string, string];
      assert.match(name, metricNamePattern, line);
      if (kind === "TYPE") {
        assert.ok(["counter", "gauge", "histogram", "summary", "untyped"].includes(rest), line);
        assert.ok(!types.has(name), `${name} typed twice`);
        types.set(name, rest);
      } else {
        assert.ok(rest.length > 0, `${name} has an empty HELP`);
        helps.set(name, rest);
      }
      continue;
    }
    const sample = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$/.exec(line);
    assert.ok(sample, `not a sample line: ${line}`);
    const [, name, labelText, valueText] = sample as unknown as [string, string, string | undefined, string];
    const labels: Record<string, string> = {};
    if (labelText !== undefined && labelText !== "") {
      const labelPattern = /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(,|$)/g;
      let consumed = 0;
      for (const match of labelText.matchAll(labelPattern)) {
        assert.equal(match.index, consumed, `labels of ${line}`);
        assert.match(match[1] as string, labelNamePattern);
        labels[match[1] as string] = (match[2] as string).replace(/\\(.)/g, "$1");
        consumed += (match[0] as string).length;
      }
      assert.equal(consumed, labelText.length, `labels of ${line}`);
    }
    const value = valueText === "+Inf" ? Infinity : valueText === "-Inf" ? -Infinity : Number(valueText);
    assert.ok(!Number.isNaN(value) || valueText === "Nan", `value of ${line}`);
    const family = types.has(name) ? name : name.replace(/_(bucket|sum|count)$/, "");
    assert.ok(types.has(family), `sample ${name} has no TYPE line`);
    assert.ok(helps.has(family), `sample ${name} has no HELP line`);
    samples.push({ name, labels, value });
  }
  return { text, types, helps, samples };
}

async function scrape(): Promise<Scrape> {
  const response = await fetch(`http://127.0.0.1:${daemon.httpPort}/metrics`);
  assert.equal(response.status, 200);
  assert.match(response.headers.get("content-type") ?? "", /^text\/plain; version=0\.0\.4/);
  return parseMetrics(await response.text());
}

/** The value of one sample (0 when the series does not exist yet: counters start at 0). */
function valueOf(scraped: Scrape, name: string, labels: Record<string, string>): number {
  const keys = Object.keys(labels);
  const found = scraped.samples.filter(
    (sample) =>
      sample.name === name &&
      keys.every((key) => sample.labels[key] === labels[key]) &&
      Object.keys(sample.labels).length === keys.length,
  );
  assert.ok(found.length <= 1, `${name} ${JSON.stringify(labels)} is not one series`);
  return found[0]?.value ?? 0;
}

function delta(before: Scrape, later: Scrape, name: string, labels: Record<string, string>): number {
  return valueOf(later, name, labels) - valueOf(before, name, labels);
}

// -----------------------------------------------------------------------------------------------
// fio

interface FioDirection {
  io_bytes: number;
  total_ios: number;
}

function fio(name: string, args: string[]): { read: FioDirection; write: FioDirection } {
  const output = daemon.file(`fio-${name}.json`);
  const all = [
    `--name=${name}`,
    "--ioengine=nbd",
    `--uri=${daemon.tcpUri("mw")}`,
    `--size=${diskBytes}`,
    "--randseed=42",
    "--output-format=json",
    `--output=${output}`,
    ...args,
  ];
  const result = run("fio", all, { cwd: daemon.work, timeoutMs: 120_000 });
  const report = fs.existsSync(output) ? fs.readFileSync(output, "utf8") : "";
  assert.equal(result.status, 0, `${describeRun("fio", all, result)}\n${report}\n${daemon.log()}`);
  const jobs = (
    JSON.parse(report) as { jobs: Array<{ error: number; read: FioDirection; write: FioDirection }> }
  ).jobs;
  assert.equal(jobs.length, 1);
  assert.equal(jobs[0]?.error, 0);
  return jobs[0] as { read: FioDirection; write: FioDirection };
}

test("fio: requests, bytes and histogram counts move by exactly what fio did", async () => {
  const disk = "mw";
  const start = await scrape();
  const writes = fio("writes", ["--rw=randwrite", "--bs=4k", "--iodepth=8", "--number_ios=500"]);
  assert.equal(writes.write.total_ios, 500, "fio did 500 writes");
  const afterWrites = await scrape();
  const write = { disk, op: "write" };
  assert.equal(delta(start, afterWrites, "vdisk_requests_total", write), 500);
  assert.equal(delta(start, afterWrites, "vdisk_request_bytes_total", write), 500 * 4 * KiB);
  assert.equal(delta(start, afterWrites, "vdisk_request_duration_seconds_count", write), 500);
  assert.equal(
    delta(start, afterWrites, "vdisk_request_duration_seconds_bucket", { ...write, le: "+Inf" }),
    500,
  );
  assert.ok(delta(start, afterWrites, "vdisk_request_duration_seconds_sum", write) > 0);
  assert.equal(delta(start, afterWrites, "vdisk_requests_total", { disk, op: "read" }), 0);

  const reads = fio("reads", ["--rw=randread", "--bs=64k", "--iodepth=4", "--number_ios=200"]);
  assert.equal(reads.read.total_ios, 200, "fio did 200 reads");
  const afterReads = await scrape();
  const read = { disk, op: "read" };
  assert.equal(delta(afterWrites, afterReads, "vdisk_requests_total", read), 200);
  assert.equal(delta(afterWrites, afterReads, "vdisk_request_bytes_total", read), 200 * 64 * KiB);
  assert.equal(delta(afterWrites, afterReads, "vdisk_request_duration_seconds_count", read), 200);
  assert.equal(delta(afterWrites, afterReads, "vdisk_requests_total", write), 0);
  assert.equal(delta(afterWrites, afterReads, "vdisk_request_bytes_total", write), 0);

  // No errors, no clients left, and the server counted the connections.
  for (const code of ["OUT_OF_RANGE", "WRITE_OUT_OF_RANGE", "IO_ERROR"]) {
    assert.equal(valueOf(afterReads, "vdisk_request_errors_total", { disk, code }), 0);
  }
  assert.equal(valueOf(afterReads, "vdisk_connections", { disk }), 0);
  assert.equal(valueOf(afterReads, "vdisk_inflight_requests", { disk }), 0);
  assert.ok(delta(start, afterReads, "vdisk_nbd_connections_total", {}) >= 2);
  assert.equal(valueOf(afterReads, "vdisk_disk_size_bytes", { disk }), diskBytes);
  // Space figures may be up to a second old (they walk the index); after that they show fio's writes.
  await new Promise((resolve) => setTimeout(resolve, 1100));
  assert.ok(valueOf(await scrape(), "vdisk_disk_allocated_bytes", { disk }) >= 500 * 4 * KiB);

  // The API's JSON says the same.
  const stats = await daemon.api<StatsSnapshot>("stats");
  const mw = stats.disks.find((candidate) => candidate.name === disk) as DiskStats;
  assert.equal(mw.ops.write.ops, valueOf(afterReads, "vdisk_requests_total", write));
  assert.equal(mw.ops.read.bytes, valueOf(afterReads, "vdisk_request_bytes_total", read));
});

test("nbdsh: requests past the end count as errors by code, and as requests without bytes", async () => {
  const before = await scrape();
  const result = run("nbdsh", [
    "-u",
    daemon.tcpUri("mw"),
    "-c",
    `
import json
h.set_strict_mode(0)
size = h.get_size()
out = {}
for name, fn in [("read", lambda: h.pread(4096, size - 1024)), ("write", lambda: h.pwrite(b"x" * 4096, size - 1024))]:
    try:
        fn()
        out[name] = "ok"
    except nbd.Error as e:
        out[name] = e.errno
print(json.dumps(out))
`,
  ]);
  assert.equal(result.status, 0, describeRun("nbdsh", [], result));
  assert.deepEqual(JSON.parse(result.stdout.trim().split("\n").pop() as string), {
    read: "EINVAL",
    write: "ENOSPC",
  });
  const later = await scrape();
  const disk = "mw";
  assert.equal(delta(before, later, "vdisk_request_errors_total", { disk, code: "OUT_OF_RANGE" }), 1);
  assert.equal(delta(before, later, "vdisk_request_errors_total", { disk, code: "WRITE_OUT_OF_RANGE" }), 1);
  assert.equal(delta(before, later, "vdisk_requests_total", { disk, op: "read" }), 1);
  assert.equal(delta(before, later, "vdisk_requests_total", { disk, op: "write" }), 1);
  assert.equal(delta(before, later, "vdisk_request_bytes_total", { disk, op: "read" }), 0);
  const stats = await daemon.api<StatsSnapshot>("stats");
  const mw = stats.disks.find((candidate) => candidate.name === disk) as DiskStats;
  assert.ok((mw.errorsByCode.OUT_OF_RANGE ?? 0) >= 1);
  assert.ok(mw.ops.read.errors >= 1);
});

test("metric names, types and units follow the Prometheus conventions, and docs/metrics.md lists them all", async () => {
  const scraped = await scrape();
  const documented = new Set(
    [
      ...fs
        .readFileSync(path.join(repositoryRoot, "docs", "metrics.md"), "utf8")
        .matchAll(/^\| `(vdisk_[a-z_]+)` \| (\w+) \|/gm),
    ].map((match) => `${match[1]} ${match[2]}`),
  );
  const vdiskFamilies = [...scraped.types].filter(([name]) => name.startsWith("vdisk_"));
  assert.ok(vdiskFamilies.length >= 25, `only ${vdiskFamilies.length} vdisk families`);
  for (const [name, type] of vdiskFamilies) {
    assert.ok(documented.has(`${name} ${type}`), `${name} (${type}) is not in docs/metrics.md`);
    if (type === "counter") assert.match(name, /_total$/, `counter ${name} ends in _total`);
    else assert.doesNotMatch(name, /_total$/, `${type} ${name} does not end in _total`);
    if (/_bytes$|_seconds$/.test(name)) assert.notEqual(type, "counter");
  }
  assert.equal(documented.size, vdiskFamilies.length, "every documented metric is exported");
  for (const name of [
    "process_resident_memory_bytes",
    "nodejs_heap_size_used_bytes",
    "nodejs_eventloop_lag_seconds",
  ]) {
    assert.ok(scraped.types.has(name), `default metric ${name}`);
  }
  // Histograms: buckets ascending and cumulative, +Inf equal to _count.
  for (const [family, type] of scraped.types) {
    if (type !== "histogram") continue;
    const series = new Map<string, Sample[]>();
    for (const sample of scraped.samples.filter((s) => s.name === `${family}_bucket`)) {
      const { le, ...rest } = sample.labels;
      assert.ok(le !== undefined, `${family}_bucket without le`);
      const key = JSON.stringify(rest);
      series.set(key, [...(series.get(key) ?? []), sample]);
    }
    assert.ok(series.size > 0, `${family} has series (fio ran)`);
    for (const [key, buckets] of series) {
      const bounds = buckets.map((bucket) =>
        bucket.labels.le === "+Inf" ? Infinity : Number(bucket.labels.le),
      );
      assert.deepEqual(
        bounds,
        [...bounds].sort((a, b) => a - b),
        `${family}${key} le ascending`,
      );
      assert.equal(bounds[bounds.length - 1], Infinity);
      for (let i = 1; i < buckets.length; i++) {
        assert.ok(
          (buckets[i] as Sample).value >= (buckets[i - 1] as Sample).value,
          `${family}${key} cumulative`,
        );
      }
      const labels = JSON.parse(key) as Record<string, string>;
      assert.equal(
        (buckets[buckets.length - 1] as Sample).value,
        valueOf(scraped, `${family}_count`, labels),
      );
    }
  }
  // Every op of every disk has a requests series.
  for (const disk of ["default", "mw", "mload"]) {
    for (const op of ["read", "write", "zero", "trim", "flush", "cache", "block_status"]) {
      assert.ok(
        scraped.samples.some(
          (s) => s.name === "vdisk_requests_total" && s.labels.disk === disk && s.labels.op === op,
        ),
        `vdisk_requests_total{disk="${disk}",op="${op}"}`,
      );
    }
  }
});

function totalOps(disk: { ops: DiskStats["ops"] }): number {
  return opKinds.reduce((sum, kind) => sum + disk.ops[kind].ops, 0);
}

test("vdisk top --once --json matches GET /v1/stats taken around it (under a fio load)", async () => {
  const load = spawnTool(
    "fio",
    [
      "--name=load",
      "--ioengine=nbd",
      `--uri=${daemon.tcpUri("mload")}`,
      `--size=${diskBytes}`,
      "--rw=randrw",
      "--bs=4k",
      "--iodepth=4",
      "--time_based",
      "--runtime=20",
      "--thread", // one process: killing it stops the load
    ],
    { cwd: daemon.work, timeoutMs: 60_000 },
  );
  try {
    for (let i = 0; i < 200; i++) {
      const disk = await daemon.api<DiskStats>("disks/mload/stats");
      if (disk.clients.length > 0 && totalOps(disk) > 0) break;
      await new Promise((resolve) => setTimeout(resolve, 25));
    }
    const earlier = await daemon.api<StatsSnapshot>("stats");
    const result = daemon.vdisk(["top", "--once", "--json", "--interval", "1"]);
    assert.equal(result.status, 0, describeRun("vdisk top", [], result));
    const top = JSON.parse(result.stdout) as TopJson;
    const later = await daemon.api<StatsSnapshot>("stats");

    assert.ok(top.intervalSeconds >= 0.9 && top.intervalSeconds < 5, `interval ${top.intervalSeconds}`);
    assert.equal(top.timeMs, top.stats.timeMs);
    const names = (stats: StatsSnapshot): string[] => stats.disks.map((disk) => disk.name).sort();
    const diskRows = top.rows.filter((row) => row.kind === "disk");
    assert.deepEqual(diskRows.map((row) => row.disk).sort(), names(later));
    assert.deepEqual(names(top.stats), names(earlier));
    for (const row of diskRows) {
      const before = earlier.disks.find((disk) => disk.name === row.disk) as DiskStats;
      const after = later.disks.find((disk) => disk.name === row.disk) as DiskStats;
      const inTop = top.stats.disks.find((disk) => disk.name === row.disk) as DiskStats;
      assert.equal(row.totals.ops, totalOps(inTop), `${row.disk}: row totals are the snapshot's`);
      assert.ok(
        totalOps(before) <= row.totals.ops && row.totals.ops <= totalOps(after),
        `${row.disk} totals in order`,
      );
      assert.ok(
        before.ops.read.bytes <= row.totals.readBytes && row.totals.readBytes <= after.ops.read.bytes,
      );
      assert.ok(
        before.ops.write.bytes <= row.totals.writeBytes && row.totals.writeBytes <= after.ops.write.bytes,
      );
      assert.equal(row.fastShare, null);
    }
    // Busiest first: the loaded disk leads, with its client under it.
    const first = top.rows[0];
    assert.equal(first?.disk, "mload");
    assert.ok((first?.readIops ?? 0) > 0 && (first?.writeIops ?? 0) > 0, JSON.stringify(first));
    assert.ok(first?.p50Seconds !== null && first?.p99Seconds !== null);
    assert.ok((first?.p50Seconds as number) <= (first?.p99Seconds as number));
    const client = top.rows[1];
    assert.equal(client?.kind, "client");
    assert.equal(client?.disk, "mload");
    assert.equal(client?.export, "mload");
    assert.match(client?.peer ?? "", /^tcp 127\.0\.0\.1:\d+$/);
    // The human frame too.
    const frame = daemon.vdisk(["top", "--once", "--interval", "0.3"]);
    assert.equal(frame.status, 0, describeRun("vdisk top --once", [], frame));
    const lines = frame.stdout.trimEnd().split("\n");
    assert.match(lines[1] as string, /^NAME\s+R-IOPS\s+W-IOPS\s+R-MB\/s\s+W-MB\/s\s+P50\s+P99\s+QD\s+FAST$/);
    assert.match(lines[2] as string, /^mload\s/);
    for (const line of lines) assert.ok(line.length < 80, `"${line}" fits 80 columns`);
  } finally {
    load.kill();
    await load.done;
  }
});

test("vdisk stats [DISK] [--json]", () => {
  const stats = daemon.vdiskJson<StatsSnapshot>(["stats"]);
  const listed = daemon.vdiskJson<{ disks: Array<{ name: string; size: number }> }>(["list"]).disks;
  assert.deepEqual(
    stats.disks.map((disk) => [disk.name, disk.sizeBytes]),
    listed.map((disk) => [disk.name, disk.size]).sort(([a], [b]) => String(a).localeCompare(String(b))),
  );
  assert.ok(stats.process.residentBytes > 0 && stats.process.heapUsedBytes > 0);
  assert.ok(stats.process.eventLoopLagSeconds >= 0);
  assert.ok(stats.server.connectionsTotal >= 3);
  assert.equal(stats.pools?.[0]?.name, "default");
  assert.ok((stats.pools?.[0]?.capacityBytes ?? 0) > 0);
  const image = (stats.images ?? []).find((candidate) => candidate.file === "pools/default/mw.vdisk");
  assert.deepEqual(image?.disks, ["mw"]);
  assert.ok((image?.dataBytes ?? 0) > 0, "fio's writes are in the image");

  const mw = daemon.vdiskJson<DiskStats>(["stats", "mw"]);
  assert.equal(mw.name, "mw");
  assert.ok(mw.ops.write.ops >= 501);
  assert.equal(mw.errorsByCode.OUT_OF_RANGE, 1);

  const text = daemon.vdisk(["stats"]);
  assert.equal(text.status, 0, text.stderr);
  assert.match(text.stdout, /^daemon: up /);
  assert.match(text.stdout, /^DISK\s+FORMAT\s+SIZE\s+ALLOCATED/m);
  assert.match(text.stdout, /^mw\s+vdisk\s+64 MiB/m);
  const one = daemon.vdisk(["stats", "mw"]);
  assert.equal(one.status, 0, one.stderr);
  assert.match(one.stdout, /^OP\s+REQUESTS\s+BYTES\s+ERRORS\s+AVG LATENCY$/m);
  assert.match(one.stdout, /OUT_OF_RANGE 1/);
  const missing = daemon.vdisk(["stats", "nope"]);
  assert.equal(missing.status, 1);
  assert.match(missing.stderr, /no disk named nope/);
});

test("vdisk top in a terminal: alternate screen, draws, s changes the sort, q quits and restores", async () => {
  const command = [
    process.execPath,
    path.join(repositoryRoot, "bin", "vdisk"),
    "top",
    "--home",
    daemon.home,
    "--interval",
    "0.3",
  ]
    .map((part) => `'${part.replace(/'/g, "'\\''")}'`)
    .join(" ");
  const child = spawn("script", ["-qfec", command, "/dev/null"], {
    cwd: daemon.work,
    stdio: ["pipe", "pipe", "pipe"],
    env: { ...process.env, TERM: "xterm", VDISK_HOME: "" },
  });
  children.push(child);
  let output = "";
  child.stdout?.on("data", (chunk: Buffer) => (output += chunk.toString("utf8")));
  child.stderr?.on("data", (chunk: Buffer) => (output += chunk.toString("utf8")));
  const exited = new Promise<number | null>((resolve) => child.on("close", (code) => resolve(code)));
  const waitFor = async (what: string, check: () => boolean): Promise<void> => {
    for (let i = 0; i < 200 && !check(); i++) await new Promise((resolve) => setTimeout(resolve, 25));
    assert.ok(check(), `${what}; output so far: ${JSON.stringify(output)}`);
  };
  await waitFor("the first frame with rates", () => /sort total IOPS/.test(output) && /\r\nmw /.test(output));
  assert.ok(output.includes("\x1b[?1049h\x1b[?25l"), "alternate screen, cursor hidden");
  child.stdin?.write("s");
  await waitFor("the sort moves to R-IOPS", () => /sort R-IOPS/.test(output));
  child.stdin?.write("q");
  const code = await Promise.race([
    exited,
    new Promise<"timeout">((resolve) => setTimeout(() => resolve("timeout"), 10_000)),
  ]);
  assert.equal(code, 0, `vdisk top quits on q with status 0; output: ${JSON.stringify(output)}`);
  assert.ok(output.includes("\x1b[?25h\x1b[?1049l"), "cursor shown, main screen restored");
  const frames = output.split("\x1b[H");
  const ansiEscapes = new RegExp(`${String.fromCharCode(27)}\\[[0-9;?]*[A-Za-z]`, "g");
  for (const line of (frames[frames.length - 1] ?? "").split("\r\n")) {
    const visible = line.replace(ansiEscapes, "").replace(/\r/g, "");
    assert.ok(visible.length < 80, `"${visible}" fits 80 columns`);
  }
});
