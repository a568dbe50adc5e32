/**
 * Real clients against the NBD server's extra meta contexts: an in-process server on a Unix socket whose
 * export offers a fake `qemu:dirty-bitmap:snap1` (StaticExport.metaContexts) beside base:allocation.
 * nbdinfo lists and maps the contexts, nbdsh (libnbd) lists them with each query form and reads two
 * contexts in one BLOCK_STATUS, and qemu-img maps the bitmap the way incremental backup tools read it.
 *
 * Tools run asynchronously (spawnTool): the server lives in this process, so a synchronous spawn would
 * block the event loop it answers on. A missing tool fails the test with an install hint.
 */
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import type { Extent } from "../../src/devices/block-device";
import { MemoryDevice } from "../../src/devices/memory-device";
import { NbdServer } from "../../src/protocol/nbd/server";
import { type RunResult, describeRun, requireTool, spawnTool } from "../../src/testing/daemon-fixture";
import { StaticExports } from "../../src/testing/static-exports";

const KiB = 1024;
const MiB = 1024 * KiB;
const SIZE = 4 * MiB;
const DATA_BYTES = 128 * KiB;
const BITMAP = "qemu:dirty-bitmap:snap1";
/** snap1: 64 KiB clean, 1 MiB dirty, the rest clean. */
const DIRTY_START = 64 * KiB;
const DIRTY_BYTES = MiB;

let dir: string;
let socketPath: string;
let server: NbdServer;
let uri: string;

/** The fake bitmap answers from `offset` to the end of the disk, on a later turn, with 1 = dirty. */
function snap1Status(offset: number, _length: number, done: (err: null, extents: Extent[]) => void): void {
  const ranges: Array<[number, number, number]> = [
    [0, DIRTY_START, 0],
    [DIRTY_START, DIRTY_START + DIRTY_BYTES, 1],
    [DIRTY_START + DIRTY_BYTES, SIZE, 0],
  ];
  const extents: Extent[] = [];
  for (const [start, end, flags] of ranges) {
    const from = Math.max(start, offset);
    if (end > from) extents.push({ length: end - from, flags });
  }
  setImmediate(() => done(null, extents));
}

before(async () => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), "vdisk-meta-interop-"));
  socketPath = path.join(dir, "nbd.sock");
  uri = `nbd+unix:///disk?socket=${socketPath}`;
  const disk = new MemoryDevice(SIZE);
  server = new NbdServer({
    exports: new StaticExports(
      new Map([["disk", { device: disk, metaContexts: { [BITMAP]: snap1Status } }]]),
    ),
    handshakeTimeoutMs: 10_000,
  });
  await server.listenUnix(socketPath);
  await new Promise<void>((resolve, reject) =>
    disk.write(Buffer.alloc(DATA_BYTES, 0xab), 0, false, (err) => (err ? reject(err) : resolve())),
  );
});

after(async () => {
  await server.shutdown(1000);
  fs.rmSync(dir, { recursive: true, force: true });
});

/** Runs a tool (which must be installed) without blocking this process's event loop. */
async function runTool(cmd: string, args: string[]): Promise<RunResult> {
  requireTool(cmd);
  return spawnTool(cmd, args, { timeoutMs: 30_000 }).done;
}

async function ok(cmd: string, args: string[]): Promise<string> {
  const result = await runTool(cmd, args);
  assert.equal(result.status, 0, describeRun(cmd, args, result));
  return result.stdout;
}

test("nbdinfo --map=qemu:dirty-bitmap:snap1 shows the dirty extents", async () => {
  const text = await ok("nbdinfo", [`--map=${BITMAP}`, uri]);
  const rows = text
    .trim()
    .split("\n")
    .map((line) => line.trim().split(/\s+/));
  assert.deepEqual(rows, [
    ["0", String(DIRTY_START), "0", "clean"],
    [String(DIRTY_START), String(DIRTY_BYTES), "1", "dirty"],
    [String(DIRTY_START + DIRTY_BYTES), String(SIZE - DIRTY_START - DIRTY_BYTES), "0", "clean"],
  ]);
  const json = JSON.parse(await ok("nbdinfo", ["--json", `--map=${BITMAP}`, uri])) as unknown;
  assert.deepEqual(json, [
    { offset: 0, length: DIRTY_START, type: 0, description: "clean" },
    { offset: DIRTY_START, length: DIRTY_BYTES, type: 1, description: "dirty" },
    {
      offset: DIRTY_START + DIRTY_BYTES,
      length: SIZE - DIRTY_START - DIRTY_BYTES,
      type: 0,
      description: "clean",
    },
  ]);
  // base:allocation is unaffected by the extra context.
  const allocation = await ok("nbdinfo", ["--map", uri]);
  assert.deepEqual(
    allocation
      .trim()
      .split("\n")
      .map((line) => line.trim().split(/\s+/)),
    [
      ["0", String(DATA_BYTES), "0", "data"],
      [String(DATA_BYTES), String(SIZE - DATA_BYTES), "3", "hole,zero"],
    ],
  );
});

test("nbdinfo --map of a bitmap the export does not have fails", async () => {
  const args = ["--map=qemu:dirty-bitmap:nope", uri];
  const result = await runTool("nbdinfo", args);
  assert.notEqual(result.status, 0, describeRun("nbdinfo", args, result));
  assert.match(result.stderr, /qemu:dirty-bitmap:nope/);
});

test("nbdinfo --list --json and --json list the export's contexts", async () => {
  interface Listing {
    structured: boolean;
    exports: Array<{ "export-name": string; contexts: string[] }>;
  }
  const listed = JSON.parse(
    await ok("nbdinfo", ["--list", "--json", `nbd+unix://?socket=${socketPath}`]),
  ) as Listing;
  assert.equal(listed.structured, true);
  assert.deepEqual(
    listed.exports.map((entry) => [entry["export-name"], entry.contexts]),
    [["disk", ["base:allocation", BITMAP]]],
  );
  const one = JSON.parse(await ok("nbdinfo", ["--json", uri])) as Listing;
  assert.deepEqual(one.exports[0]?.contexts, ["base:allocation", BITMAP]);
});

test("nbdsh (libnbd): LIST with each query form, then two contexts in one BLOCK_STATUS", async () => {
  const script = `
import json
h.set_opt_mode(True)
h.connect_uri(${JSON.stringify(uri)})
out = {}
for queries in [[], ["base:"], ["qemu:"], ["qemu:dirty-bitmap:"], [${JSON.stringify(BITMAP)}], ["x-none:"]]:
    h.clear_meta_contexts()
    for query in queries:
        h.add_meta_context(query)
    names = []
    h.opt_list_meta_context(lambda name: names.append(name) or 0)
    out[",".join(queries)] = names
h.clear_meta_contexts()
h.add_meta_context("base:allocation")
h.add_meta_context(${JSON.stringify(BITMAP)})
h.opt_go()
status = {}
def extents(context, offset, entries, err):
    status[context] = list(entries)
    return 0
h.block_status(${SIZE}, 0, extents)
out["status"] = status
print(json.dumps(out))
`;
  const stdout = await ok("nbdsh", ["-c", script]);
  const lines = stdout.trim().split("\n");
  assert.deepEqual(JSON.parse(lines[lines.length - 1] as string), {
    "": ["base:allocation", BITMAP],
    "base:": ["base:allocation"],
    "qemu:": [BITMAP],
    "qemu:dirty-bitmap:": [BITMAP],
    [BITMAP]: [BITMAP],
    "x-none:": [],
    status: {
      "base:allocation": [DATA_BYTES, 0, SIZE - DATA_BYTES, 3],
      [BITMAP]: [DIRTY_START, 0, DIRTY_BYTES, 1, SIZE - DIRTY_START - DIRTY_BYTES, 0],
    },
  });
});

test("qemu-img map with x-dirty-bitmap reports dirty areas as data:false (inverted)", async () => {
  const args = [
    "map",
    "--output=json",
    "--image-opts",
    `driver=nbd,server.type=unix,server.path=${socketPath},export=disk,x-dirty-bitmap=${BITMAP}`,
  ];
  const map = JSON.parse(await ok("qemu-img", args)) as unknown;
  // What qemu-img 7.2 prints: x-dirty-bitmap makes the bitmap stand in for base:allocation, so a dirty
  // extent (flag 1 = NBD_STATE_HOLE's bit) comes out as not present and not data, a clean one as data.
  const clean = (start: number, length: number): object => ({
    start,
    length,
    depth: 0,
    present: true,
    zero: false,
    data: true,
    offset: start,
  });
  assert.deepEqual(map, [
    clean(0, DIRTY_START),
    { start: DIRTY_START, length: DIRTY_BYTES, depth: 0, present: false, zero: false, data: false },
    clean(DIRTY_START + DIRTY_BYTES, SIZE - DIRTY_START - DIRTY_BYTES),
  ]);
});
