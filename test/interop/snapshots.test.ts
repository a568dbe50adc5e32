/**
 * Snapshots, clones, rollback, dirty bitmaps, check and qcow2 import/export of vdisk disks, against one real
 * daemon (src/testing/daemon-fixture.ts) with real clients: qemu-io writes and checks byte patterns, qemu-img
 * compares every snapshot with a raw copy exported when it was taken, fio verifies while snapshots are
 * taken, nbdinfo reads `qemu:dirty-bitmap:SNAP`, nbdsh holds connections open to test the busy refusals.
 *
 * The tests run in order and share the daemon: the last ones (check, restart) go over every disk and
 * snapshot the earlier ones left behind. Disks are small (64 MiB) and sparse.
 */
import { after, before, test } from "node:test";
import * as assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import * as fs from "node:fs";
import * as path from "node:path";
import {
  type DaemonFixture,
  PatternModel,
  type RunResult,
  type StartedTool,
  describeRun,
  requireTool,
  run,
  spawnTool,
  startDaemon,
} from "../../src/testing/daemon-fixture";
import type {
  CheckReport,
  DeleteResult,
  DiskInfo,
  DiskTree,
  SnapshotInfo,
  TreeNode,
} from "../../src/daemon/registry";

const KiB = 1024;
const MiB = 1024 * KiB;
const diskBytes = 64 * MiB;

let daemon: DaemonFixture;

before(async () => {
  for (const tool of ["qemu-img", "qemu-io", "nbdinfo", "nbdsh", "fio"]) requireTool(tool);
  daemon = await startDaemon({ name: "vdisk-snapshots" });
});

after(() => {
  daemon?.cleanup();
});

// -----------------------------------------------------------------------------------------------
// Helpers

function ok(cmd: string, args: string[], timeoutMs?: number): RunResult {
  const result = run(cmd, args, { timeoutMs });
  assert.equal(result.status, 0, `${describeRun(cmd, args, result)}\ndaemon log:\n${daemon.log()}`);
  return result;
}

function vdisk(args: string[]): RunResult {
  const result = daemon.vdisk(args);
  assert.equal(result.status, 0, `${describeRun("vdisk", args, result)}\ndaemon log:\n${daemon.log()}`);
  return result;
}

function json<T>(args: string[]): T {
  return daemon.vdiskJson<T>(args);
}

/** The CLI must fail with status 1, this message and (when given) this hint. */
function fails(args: string[], message: RegExp, hint?: RegExp): string {
  const result = daemon.vdisk(args);
  assert.equal(result.status, 1, describeRun("vdisk", args, result));
  assert.match(result.stderr, /^vdisk: error: /);
  assert.match(result.stderr, message);
  if (hint) assert.match(result.stderr, new RegExp(`\\n {2}hint: .*${hint.source}`));
  return result.stderr;
}

function uri(name: string): string {
  return daemon.unixUri(encodeURIComponent(name));
}

/** qemu-io commands in one process; every command must succeed (a pattern mismatch fails the run). */
function qemuIo(name: string, commands: string[], readOnly = false): void {
  const args = [...(readOnly ? ["-r"] : []), "-f", "raw", ...commands.flatMap((c) => ["-c", c]), uri(name)];
  const result = ok("qemu-io", args);
  assert.doesNotMatch(
    result.stdout + result.stderr,
    /failed|mismatch/i,
    describeRun("qemu-io", args, result),
  );
}

function apiRequest(
  method: string,
  apiPath: string,
  body?: object,
): Promise<{ status: number; data: unknown }> {
  return daemon.apiRequest(method, apiPath, body);
}

function api<T>(apiPath: string): Promise<T> {
  return daemon.apiGet<T>(apiPath);
}

function apiPost<T>(apiPath: string, body: object): Promise<T> {
  return daemon.apiPost<T>(apiPath, body);
}

/** Writes recorded in a model; `model(n)` replays the first n of them. */
class History {
  readonly fills: Array<[number, number, number]> = [];

  write(name: string, fills: Array<[number, number, number]>): void {
    qemuIo(
      name,
      fills.map(([offset, length, pattern]) => `write -P 0x${pattern.toString(16)} ${offset} ${length}`),
    );
    this.fills.push(...fills);
  }

  model(count = this.fills.length): PatternModel {
    const model = new PatternModel(diskBytes);
    for (const [offset, length, pattern] of this.fills.slice(0, count)) model.fill(offset, length, pattern);
    return model;
  }
}

/** Every byte of `name` as the model says (read-only client). */
function verify(name: string, model: PatternModel): void {
  qemuIo(name, model.readCommands(), true);
}

function compare(a: string, b: string): void {
  ok("qemu-img", ["compare", "-f", "raw", "-F", "raw", a, b]);
}

/** A raw copy of a disk or snapshot, through `vdisk export`. */
function exportRaw(name: string, file: string): string {
  const target = daemon.file(file);
  vdisk(["export", name, target]);
  return target;
}

const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

/** Connections the daemon counts on a disk or a snapshot DISK@SNAP. */
async function connections(name: string): Promise<number> {
  const at = name.indexOf("@");
  if (at < 0) return (await api<DiskInfo>(`disks/${name}`)).connections;
  const list = await api<{ snapshots: SnapshotInfo[] }>(`disks/${name.slice(0, at)}/snapshots`);
  return list.snapshots.find((snapshot) => snapshot.name === name)?.connections ?? 0;
}

/**
 * An nbdsh client that connects to `name` and keeps reading until the connection fails (then it exits
 * non-zero); resolves once the daemon counts it.
 */
async function holdOpen(name: string): Promise<StartedTool> {
  const script = "import time\nwhile True:\n    h.pread(512, 0)\n    time.sleep(0.05)\n";
  const client = spawnTool("nbdsh", ["-u", uri(name), "-c", script], { timeoutMs: 60_000 });
  const deadline = Date.now() + 10_000;
  while ((await connections(name)) === 0) {
    assert.ok(Date.now() < deadline, `nbdsh never connected to ${name}`);
    await sleep(20);
  }
  return client;
}

interface Job {
  state: string;
  format: string;
  bytesDone: number;
  bytesTotal: number;
}

// -----------------------------------------------------------------------------------------------
// Snapshots keep their data

test("each snapshot reads as the disk did when it was taken; qemu-img compare with raw copies", () => {
  const created = json<DiskInfo>(["create", "snap", "--size", "64M"]);
  assert.equal(created.format, "vdisk", "vdisk is the default format");
  assert.equal(created.file, "pools/default/snap.vdisk");
  const history = new History();
  const stages: Array<Array<[number, number, number]>> = [
    [
      [0, MiB, 0x11],
      [8 * MiB + 100, 5000, 0x12], // unaligned
      [63 * MiB, MiB, 0x13], // the last MiB
    ],
    [
      [512 * KiB, MiB, 0x21], // overlaps stage 0
      [8 * MiB, 4 * KiB, 0x22],
      [30 * MiB, 3 * MiB, 0x23],
    ],
    [
      [0, 64 * KiB, 0x31],
      [31 * MiB + 7, 1000, 0x32],
    ],
    [[40 * MiB, 2 * MiB, 0x41]],
  ];
  const copies: string[] = [];
  const counts: number[] = [];
  for (const [index, fills] of stages.entries()) {
    history.write("snap", fills);
    copies.push(exportRaw("snap", `snap-s${index}.raw`));
    counts.push(history.fills.length);
    const snapshot = json<SnapshotInfo>(["snapshot", "create", "snap", `s${index}`]);
    assert.equal(snapshot.name, `snap@s${index}`);
  }
  // The disk moves on after the last snapshot.
  history.write("snap", [[0, 2 * MiB, 0x51]]);
  verify("snap", history.model());
  for (const [index, copy] of copies.entries()) {
    compare(copy, uri(`snap@s${index}`));
    verify(`snap@s${index}`, history.model(counts[index]));
  }
  // The first snapshot still holds the first pattern where the disk now holds the newest.
  qemuIo("snap@s0", ["read -P 0x11 0 1M"], true);
  qemuIo("snap@s1", ["read -P 0x11 0 512k", "read -P 0x21 512k 1M"], true);
  qemuIo("snap", ["read -P 0x51 0 2M"], true);
  // Snapshots are read-only exports.
  const write = run("qemu-io", ["-f", "raw", "-c", "write -P 0x99 0 4k", uri("snap@s0")]);
  assert.ok(
    write.status !== 0 || /failed|read-only|denied/i.test(write.stdout + write.stderr),
    describeRun("qemu-io", ["write", "snap@s0"], write),
  );
  verify("snap@s0", history.model(counts[0]));
  // NBD_OPT_LIST names the snapshots too.
  const list = ok("nbdinfo", ["--list", "--json", daemon.unixUri("")]).stdout;
  const names = (JSON.parse(list) as { exports: Array<{ "export-name": string }> }).exports.map(
    (entry) => entry["export-name"],
  );
  for (let index = 0; index < stages.length; index++) assert.ok(names.includes(`snap@s${index}`), list);
});

// -----------------------------------------------------------------------------------------------
// Dirty bitmaps

interface MapEntry {
  offset: number;
  length: number;
  type: number;
}

function dirtyRanges(name: string, bitmap: string): Array<[number, number]> {
  const result = ok("nbdinfo", ["--json", `--map=qemu:dirty-bitmap:${bitmap}`, uri(name)]);
  return (JSON.parse(result.stdout) as MapEntry[])
    .filter((entry) => (entry.type & 1) !== 0)
    .map((entry) => [entry.offset, entry.length]);
}

test("nbdinfo --map=qemu:dirty-bitmap:SNAP reports exactly the regions written since SNAP", () => {
  vdisk(["create", "dirty", "--size", "64M"]);
  qemuIo("dirty", ["write -P 0x1 0 4M"]);
  vdisk(["snapshot", "create", "dirty", "base"]);
  qemuIo("dirty", [
    "write -P 0x2 4M 64k",
    "write -P 0x3 10M 2M",
    "write -P 0x4 20971530 100", // unaligned: its 4 KiB block is dirty
    "write -P 0x5 1M 4k", // over data the snapshot holds
  ]);
  const sinceBase: Array<[number, number]> = [
    [1 * MiB, 4 * KiB],
    [4 * MiB, 64 * KiB],
    [10 * MiB, 2 * MiB],
    [20 * MiB, 4 * KiB],
  ];
  assert.deepEqual(dirtyRanges("dirty", "base"), sinceBase);
  vdisk(["snapshot", "create", "dirty", "second"]);
  assert.deepEqual(dirtyRanges("dirty", "second"), [], "nothing written since the newest snapshot");
  qemuIo("dirty", ["write -P 0x6 30M 8k"]);
  assert.deepEqual(dirtyRanges("dirty", "second"), [[30 * MiB, 8 * KiB]]);
  assert.deepEqual(dirtyRanges("dirty", "base"), [...sinceBase, [30 * MiB, 8 * KiB]]);
  // The snapshot export offers the bitmaps of its own ancestry: what changed between base and second.
  assert.deepEqual(dirtyRanges("dirty@second", "base"), sinceBase);
  const info = JSON.parse(ok("nbdinfo", ["--json", uri("dirty")]).stdout) as {
    exports: Array<{ contexts: string[] }>;
  };
  assert.deepEqual(info.exports[0]?.contexts.filter((name) => name.startsWith("qemu:")).sort(), [
    "qemu:dirty-bitmap:base",
    "qemu:dirty-bitmap:second",
  ]);
  // A clone names the snapshots of its origin DISK@SNAP.
  vdisk(["clone", "dirty@second", "dirtyclone"]);
  qemuIo("dirtyclone", ["write -P 0x7 40M 4k"]);
  assert.deepEqual(dirtyRanges("dirtyclone", "dirty@second"), [[40 * MiB, 4 * KiB]]);
  assert.deepEqual(dirtyRanges("dirtyclone", "dirty@base"), [...sinceBase, [40 * MiB, 4 * KiB]]);
});

// -----------------------------------------------------------------------------------------------
// Clone, rollback, delete in the middle of a chain

test("clone, rollback and deleting a snapshot mid-chain leave every other layer's data unchanged", async () => {
  vdisk(["create", "chain", "--size", "64M"]);
  qemuIo("chain", ["write -P 0x61 0 2M"]);
  vdisk(["snapshot", "create", "chain", "s1"]);
  qemuIo("chain", ["write -P 0x62 1M 2M"]);
  vdisk(["snapshot", "create", "chain", "s2"]);
  qemuIo("chain", ["write -P 0x63 2M 2M", "write -P 0x64 50M 1M"]);
  vdisk(["snapshot", "create", "chain@s3"]);
  qemuIo("chain", ["write -P 0x65 3M 4M"]);
  const clone = json<DiskInfo>(["clone", "chain@s2", "chainclone"]);
  assert.deepEqual(
    [clone.name, clone.format, clone.file],
    ["chainclone", "vdisk", "pools/default/chain.vdisk"],
  );
  qemuIo("chainclone", ["write -P 0x66 0 512k"]);
  const references = new Map<string, string>();
  for (const name of ["chain@s1", "chain@s2", "chain@s3", "chain", "chainclone"]) {
    references.set(name, exportRaw(name, `ref-${name.replace("@", "-")}.raw`));
  }
  const same = (names: string[]): void => {
    for (const name of names) compare(references.get(name) as string, uri(name));
  };

  // Delete s2, which has both a child snapshot (s3) and a clone.
  const deleted = json<{ deleted: string; freedBytes: number }>(["snapshot", "delete", "chain", "s2"]);
  assert.equal(deleted.deleted, "chain@s2");
  same(["chain@s1", "chain@s3", "chain", "chainclone"]);
  fails(["export", "chain@s2", daemon.file("gone.raw")], /no snapshot named s2/);
  const tree = json<DiskTree>(["tree", "chain"]);
  const s1 = tree.roots.find((node) => node.name === "chain@s1") as TreeNode;
  assert.ok(s1, JSON.stringify(tree));
  assert.deepEqual(s1.children.map((node) => node.name).sort(), ["chain@s3", "chainclone"]);

  // Rollback is refused while a client uses the disk; --force disconnects it.
  const client = await holdOpen("chain");
  fails(["rollback", "chain@s1"], /disk chain has 1 client connection/, /--force/);
  same(["chain"]);
  const rolled = json<DiskInfo>(["rollback", "chain@s1", "--force"]);
  assert.equal(rolled.name, "chain");
  assert.notEqual((await client.done).status, 0, "the client was disconnected");
  assert.equal(await connections("chain"), 0);
  compare(references.get("chain@s1") as string, uri("chain"));
  same(["chain@s1", "chain@s3", "chainclone"]);
  // Writing after the rollback changes the disk only.
  qemuIo("chain", ["write -P 0x67 0 1M"]);
  same(["chain@s1", "chain@s3", "chainclone"]);
  qemuIo("chain", ["read -P 0x67 0 1M", "read -P 0x61 1M 1M", "read -P 0 2M 1M"], true);

  // Snapshot delete is refused while the snapshot is exported to a client; --force disconnects it.
  const reader = await holdOpen("chain@s3");
  fails(["snapshot", "delete", "chain", "s3"], /snapshot chain@s3 is exported to 1 client/, /--force/);
  vdisk(["snapshot", "delete", "chain@s3", "--force"]);
  assert.notEqual((await reader.done).status, 0, "the reader was disconnected");
  same(["chain@s1", "chainclone"]);

  // Deleting the disk keeps the snapshot the clone is built on.
  const gone = json<DeleteResult>(["delete", "chain"]);
  assert.deepEqual(gone.snapshotsKept, [{ name: "chain@s1", neededBy: ["chainclone"] }]);
  assert.equal(gone.imageRemoved, false);
  same(["chain@s1", "chainclone"]);
  assert.ok(fs.existsSync(path.join(daemon.home, "pools", "default", "chain.vdisk")));
});

// -----------------------------------------------------------------------------------------------
// Snapshots while fio writes

test("snapshots taken while fio writes: fio's verify passes and every snapshot is readable", async () => {
  vdisk(["create", "fio", "--size", "64M"]);
  const output = daemon.file("fio-snap.json");
  const args = [
    "--name=snap",
    "--ioengine=nbd",
    `--uri=${daemon.tcpUri("fio")}`,
    "--rw=randwrite",
    "--bs=4k",
    "--iodepth=32",
    "--size=32M",
    "--rate=16m", // about 2 s of writing, long enough for the snapshots below
    "--verify=crc32c",
    "--verify_state_save=0",
    "--do_verify=1",
    "--output-format=json",
    `--output=${output}`,
  ];
  const fio = spawnTool("fio", args, { timeoutMs: 60_000, cwd: daemon.work });
  let finished = false;
  void fio.done.then(() => (finished = true));
  const deadline = Date.now() + 10_000;
  while ((await api<DiskInfo>("disks/fio")).allocatedBytes === 0) {
    assert.ok(Date.now() < deadline && !finished, "fio never started writing");
    await sleep(20);
  }
  const taken: string[] = [];
  for (let index = 0; index < 4 && !finished; index++) {
    await apiPost("disks/fio/snapshots", { name: `live${index}` });
    taken.push(`fio@live${index}`);
    await sleep(300);
  }
  assert.ok(taken.length >= 2, "snapshots were taken while fio wrote");
  const result = await fio.done;
  const report = fs.existsSync(output) ? fs.readFileSync(output, "utf8") : "";
  assert.equal(result.status, 0, `${describeRun("fio", args, result)}\n${report}\n${daemon.log()}`);
  const jobs = (JSON.parse(report) as { jobs: Array<{ error: number; read: { io_bytes: number } }> }).jobs;
  assert.equal(jobs[0]?.error, 0);
  assert.equal(jobs[0]?.read.io_bytes, 32 * MiB, "fio verified every block it wrote");
  for (const name of taken) qemuIo(name, ["read 0 64M"], true);
  // Snapshots only grow in what they map, and the disk holds the most.
  const mapped = json<{ snapshots: SnapshotInfo[] }>(["snapshot", "list", "fio"]).snapshots.map(
    (snapshot) => snapshot.mappedBytes,
  );
  assert.deepEqual(
    [...mapped].sort((a, b) => a - b),
    mapped,
  );
  vdisk(["snapshot", "create", "fio", "done"]);
  compare(uri("fio@done"), uri("fio"));
});

// -----------------------------------------------------------------------------------------------
// A deep chain

test("a chain of depth 32: data written at the bottom reads from the top", async () => {
  vdisk(["create", "deep", "--size", "64M"]);
  qemuIo("deep", ["write -P 0x40 0 1M", "write -P 0x3f 60M 4M"]);
  const depth = 32;
  const reads: string[] = ["read -P 0x40 0 1M", "read -P 0x3f 60M 4M"];
  for (let level = 0; level < depth; level++) {
    await apiPost("disks/deep/snapshots", { name: `d${level}` });
    const offset = 2 * MiB + level * 64 * KiB;
    qemuIo("deep", [`write -P 0x${(level + 1).toString(16)} ${offset} 4k`]);
    reads.push(`read -P 0x${(level + 1).toString(16)} ${offset} 4k`);
  }
  // The head sees every layer's write and the bottom data; so does a reader that keeps them all open.
  qemuIo("deep", reads, true);
  // A snapshot in the middle sees exactly what was written below it.
  qemuIo("deep@d16", [...reads.slice(0, 2 + 16), "read -P 0 3M 64k"], true);
  const info = json<DiskInfo>(["info", "deep"]);
  assert.equal(info.image?.layers.length, depth + 1, "the head and its 32 ancestors");
  assert.equal(info.image?.layers[0]?.name, "deep");
  assert.equal(info.image?.layers[depth]?.name, "deep@d0");
  assert.equal(info.image?.snapshots, depth);
  // fio's verify through the top of the chain.
  const args = [
    "--name=deep",
    "--ioengine=nbd",
    `--uri=${daemon.tcpUri("deep")}`,
    "--rw=randwrite",
    "--bs=4k",
    "--iodepth=16",
    "--offset=8M",
    "--size=8M",
    "--verify=crc32c",
    "--verify_state_save=0",
    "--do_verify=1",
  ];
  const fio = run("fio", args, { cwd: daemon.work });
  assert.equal(fio.status, 0, describeRun("fio", args, fio));
  qemuIo("deep", reads.slice(0, 2), true);
});

// -----------------------------------------------------------------------------------------------
// qcow2

test("qcow2 import and export round trip through qemu-img and the daemon", () => {
  const source = daemon.file("source.raw");
  const fd = fs.openSync(source, "w");
  fs.writeSync(fd, randomBytes(MiB), 0, MiB, 0);
  fs.writeSync(fd, randomBytes(300 * KiB), 0, 300 * KiB, 20 * MiB);
  fs.ftruncateSync(fd, 48 * MiB);
  fs.closeSync(fd);
  const qcow2 = daemon.file("source.qcow2");
  ok("qemu-img", ["convert", "-f", "raw", "-O", "qcow2", source, qcow2]);

  const job = json<Job>(["import", qcow2, "q"]);
  assert.deepEqual([job.state, job.format], ["done", "qcow2"], "auto-detected as qcow2");
  const disk = json<DiskInfo>(["info", "q"]);
  assert.deepEqual([disk.size, disk.format], [48 * MiB, "vdisk"]);
  ok("qemu-img", ["compare", "-f", "qcow2", "-F", "raw", qcow2, uri("q")]);

  vdisk(["snapshot", "create", "q", "orig"]);
  qemuIo("q", ["write -P 0x77 0 1M"]);
  const out = daemon.file("q-orig.qcow2");
  const exported = json<Job>(["export", "q@orig", out, "--format", "qcow2"]);
  assert.deepEqual([exported.state, exported.format], ["done", "qcow2"]);
  const info = JSON.parse(ok("qemu-img", ["info", "--output=json", out]).stdout) as {
    format: string;
    "virtual-size": number;
  };
  assert.deepEqual([info.format, info["virtual-size"]], ["qcow2", 48 * MiB]);
  ok("qemu-img", ["compare", "-f", "qcow2", "-F", "raw", out, source]);
  const head = daemon.file("q-head.qcow2");
  assert.match(vdisk(["export", "q", head, "--format", "qcow2"]).stdout, /^exported disk q into /m);
  ok("qemu-img", ["compare", "-f", "qcow2", "-F", "raw", head, uri("q")]);

  fails(["export", "q", head, "--format", "qcow2"], /already exists/);
  fails(["import", source, "q2", "--format", "qcow2"], /qemu-img cannot read source\.raw/, /--format auto/);
  assert.equal(daemon.vdisk(["info", "q2"]).status, 1, "a failed import leaves no disk");
  // Raw still imports as before (auto-detected as raw), into a vdisk disk.
  const raw = json<Job>(["import", source, "fromraw"]);
  assert.equal(raw.format, "raw");
  compare(source, uri("fromraw"));
});

// -----------------------------------------------------------------------------------------------
// JSON shapes and errors

test("tree, snapshot list and info --json shapes; text output", () => {
  vdisk(["create", "shape", "--size", "64M"]);
  qemuIo("shape", ["write -P 0x1 0 1M"]);
  vdisk(["snapshot", "create", "shape", "a"]);
  qemuIo("shape", ["write -P 0x2 0 512k"]);
  vdisk(["snapshot", "create", "shape", "b"]);
  const before = json<{ snapshots: SnapshotInfo[] }>(["snapshot", "list", "shape"]).snapshots;
  assert.equal(before[0]?.exclusiveBytes, 512 * KiB, "the half the newer layers overwrote is a's alone");
  vdisk(["clone", "shape@a", "shapeclone"]);

  const list = json<{ disk: string; snapshots: SnapshotInfo[] }>(["snapshot", "list", "shape"]);
  assert.equal(list.disk, "shape");
  assert.deepEqual(
    list.snapshots.map((s) => [s.name, s.disk, s.snapshot, s.parent, s.size, s.dependents]),
    [
      ["shape@a", "shape", "a", null, 64 * MiB, ["shape", "shapeclone"]],
      ["shape@b", "shape", "b", "shape@a", 64 * MiB, ["shape"]],
    ],
  );
  const a = list.snapshots[0] as SnapshotInfo;
  assert.equal(a.mappedBytes, MiB);
  assert.equal(a.exclusiveBytes, 0, "the clone shares all of a");
  assert.ok(Number.isFinite(Date.parse(a.created)));
  assert.equal(a.connections, 0);

  const tree = json<DiskTree>(["tree", "shape"]);
  assert.deepEqual(
    [tree.disk, tree.file, tree.disks, tree.snapshots],
    ["shape", "pools/default/shape.vdisk", ["shape", "shapeclone"], 2],
  );
  const shapeOf = (node: TreeNode): unknown => ({
    name: node.name,
    kind: node.kind,
    current: node.current,
    children: node.children.map(shapeOf),
  });
  assert.deepEqual(tree.roots.map(shapeOf), [
    {
      name: "shape@a",
      kind: "snapshot",
      current: false,
      children: [
        {
          name: "shape@b",
          kind: "snapshot",
          current: false,
          children: [{ name: "shape", kind: "head", current: true, children: [] }],
        },
        { name: "shapeclone", kind: "head", current: false, children: [] },
      ],
    },
  ]);
  const root = tree.roots[0] as TreeNode;
  for (const key of ["mappedBytes", "exclusiveBytes", "indexBytes", "size", "connections"] as const) {
    assert.equal(typeof root[key], "number", key);
  }
  const text = vdisk(["tree", "shape"]).stdout;
  assert.match(text, /^image pools\/default\/shape\.vdisk: 2 disks \(shape, shapeclone\), 2 snapshots/);
  assert.match(text, /^shape@a\s+snapshot\s+64 MiB\s+1 MiB\s+0 B/m);
  assert.match(text, /^├─ shape@b\s+snapshot/m);
  assert.match(text, /^│ {2}└─ shape\s+disk \*/m);
  assert.match(text, /^└─ shapeclone\s+disk\s/m);

  const info = json<DiskInfo>(["info", "shape"]);
  assert.equal(info.format, "vdisk");
  assert.equal(info.allocatedBytes, MiB);
  assert.deepEqual(
    info.image?.layers.map((layer) => [layer.name, layer.kind, layer.mappedBytes]),
    [
      ["shape", "head", MiB],
      ["shape@b", "snapshot", MiB],
      ["shape@a", "snapshot", MiB],
    ],
  );
  assert.deepEqual(info.image?.disks, ["shape", "shapeclone"]);
  assert.ok((info.image?.indexBytes ?? 0) > 0 && (info.image?.dataBytes ?? 0) >= 1.5 * MiB);
  const infoText = vdisk(["info", "shape"]).stdout;
  assert.match(infoText, /^format:\s+vdisk$/m);
  assert.match(infoText, /^ {2}shape@a\s+snapshot\s+64 MiB\s+1 MiB\s+0 B/m);
  assert.match(vdisk(["snapshot", "list", "shape"]).stdout, /^SNAPSHOT\s+CREATED\s+SIZE\s+MAPPED/);
  assert.match(
    vdisk(["check", "shape"]).stdout,
    /^disk shape \(vdisk, pools\/default\/shape\.vdisk\): clean/,
  );

  // Raw disks still exist on request, and say what they cannot do.
  const raw = json<DiskInfo>(["create", "plain", "--size", "64M", "--format", "raw"]);
  assert.deepEqual([raw.format, raw.file], ["raw", "pools/default/plain.raw"]);
  fails(["snapshot", "create", "plain", "x"], /plain is a raw disk/, /vdisk import/);
  fails(["tree", "plain"], /raw disk/);
  const check = json<CheckReport>(["check", "plain"]);
  assert.deepEqual([check.ok, check.format, check.problems], [true, "raw", []]);
  assert.deepEqual(json<DeleteResult>(["delete", "plain"]), { deleted: "plain" });
});

test("errors: unknown snapshot, duplicate names, clone onto a disk, busy refusals", async () => {
  vdisk(["create", "err", "--size", "64M"]);
  vdisk(["create", "taken", "--size", "1M"]);
  vdisk(["snapshot", "create", "err", "one"]);
  fails(
    ["snapshot", "delete", "err", "nope"],
    /disk err has no snapshot named nope/,
    /vdisk snapshot list err/,
  );
  fails(["clone", "err@nope", "x"], /no snapshot named nope/);
  fails(["rollback", "err@nope"], /no snapshot named nope/);
  fails(["snapshot", "list", "ghost"], /no disk named ghost/);
  fails(["clone", "ghost@one", "x"], /no disk named ghost/);
  fails(["snapshot", "create", "err", "one"], /disk err already has a snapshot named one/, /another name/);
  fails(["clone", "err@one", "taken"], /a disk named taken already exists/, /another name/);
  fails(["clone", "err", "x"], /does not name a snapshot/, /DISK@SNAPSHOT/);
  fails(["snapshot", "create", "err", "bad name"], /not a valid snapshot name/);
  fails(["snapshot", "create", "err", "a@b"], /reserved/);
  const usage = daemon.vdisk(["export", "err", daemon.file("e.raw"), "--format", "vmdk"]);
  assert.equal(usage.status, 2, "a usage error");
  assert.match(usage.stderr, /--format takes raw, qcow2/);

  // API errors carry codes.
  const duplicate = await apiRequest("POST", "disks/err/snapshots", { name: "one" });
  assert.equal(duplicate.status, 409);
  assert.equal((duplicate.data as { error: { code: string } }).error.code, "SNAPSHOT_EXISTS");
  const unknown = await apiRequest("DELETE", "disks/err/snapshots/nope");
  assert.equal(unknown.status, 404);
  assert.equal((unknown.data as { error: { code: string } }).error.code, "UNKNOWN_SNAPSHOT");

  // Deleting a disk whose snapshot is exported is refused; --force disconnects the snapshot's client.
  const reader = await holdOpen("err@one");
  fails(["delete", "err"], /snapshot err@one, which goes with disk err, is exported to 1 client/, /--force/);
  const deleted = json<DeleteResult>(["delete", "err", "--force"]);
  assert.deepEqual(deleted, {
    deleted: "err",
    snapshotsDeleted: ["err@one"],
    snapshotsKept: [],
    imageRemoved: true,
  });
  assert.notEqual((await reader.done).status, 0);
  assert.ok(!fs.existsSync(path.join(daemon.home, "pools", "default", "err.vdisk")), "the image file went");

  vdisk(["delete", "taken"]);
});

// -----------------------------------------------------------------------------------------------
// Check and restart

test("vdisk check is clean everywhere, and after a restart every disk and snapshot reads the same", async () => {
  const disks = json<{ disks: DiskInfo[] }>(["list"]).disks;
  const exports: string[] = [];
  for (const disk of disks) {
    const report = json<CheckReport>(["check", disk.name]);
    assert.ok(report.ok, `${disk.name}: ${report.problems.join("\n")}`);
    exports.push(disk.name);
    if (disk.format !== "vdisk") continue;
    const snapshots = json<{ snapshots: SnapshotInfo[] }>(["snapshot", "list", disk.name]).snapshots;
    // Every snapshot, but only every 4th of the deep chain (they are checked layer by layer above).
    exports.push(...snapshots.filter((s, i) => s.disk !== "deep" || i % 4 === 0).map((s) => s.name));
  }
  exports.push("chain@s1"); // kept after its disk was deleted
  const copies = new Map<string, string>();
  for (const name of exports) {
    if (name === "default") continue;
    const file = daemon.file(`before-${name.replace("@", "-")}.raw`);
    ok("qemu-img", ["convert", "-f", "raw", "-O", "raw", uri(name), file]);
    copies.set(name, file);
  }
  await daemon.restart();
  for (const [name, file] of copies) compare(file, uri(name));
  for (const disk of disks) assert.ok(json<CheckReport>(["check", disk.name]).ok, disk.name);
  // Deleting the last disk of a family takes the image file and the kept snapshots.
  const last = json<DeleteResult>(["delete", "chainclone"]);
  assert.deepEqual([last.snapshotsDeleted, last.imageRemoved], [["chain@s1"], true]);
  assert.ok(!fs.existsSync(path.join(daemon.home, "pools", "default", "chain.vdisk")));
});
