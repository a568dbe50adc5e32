/**
 * Real NBD clients against one real daemon (src/testing/daemon-fixture.ts): qemu-img, qemu-io, nbdinfo,
 * nbdcopy, nbdsh (python libnbd) and fio's nbd engine, over TCP (`nbd://127.0.0.1:PORT/NAME`) and the
 * Unix socket (`nbd+unix:///NAME?socket=PATH`). Each test works on its own small sparse disk, so the tests
 * do not depend on each other's order. A missing client fails the test (CI installs them).
 *
 * Values are checked exactly: advertised capabilities and block sizes, data/hole extents after writes and
 * trims (4 KiB aligned, so the raw file's allocation is exact on ext4/xfs/tmpfs), byte patterns after
 * unaligned writes, the errno of out-of-range requests (EINVAL for reads/trims, ENOSPC for writes, per the
 * NBD spec), the chunks of structured replies, checksums of copies, and fio's verify results.
 */
import { after, before, test } from "node:test";
import * as assert from "node:assert/strict";
import { createHash, randomBytes } from "node:crypto";
import * as fs from "node:fs";
import {
  type DaemonFixture,
  type RunResult,
  describeRun,
  requireTool,
  run,
  spawnTool,
  startDaemon,
} from "../../src/testing/daemon-fixture";

const KiB = 1024;
const MiB = 1024 * KiB;
const diskBytes = 64 * MiB;

let daemon: DaemonFixture;

before(async () => {
  for (const tool of ["qemu-img", "qemu-io", "nbdinfo", "nbdcopy", "nbdsh", "fio"]) requireTool(tool);
  daemon = await startDaemon({ name: "vdisk-nbd-clients" });
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

function createDisk(name: string, bytes = diskBytes): void {
  const result = daemon.vdisk(["create", name, "--size", String(bytes)]);
  assert.equal(result.status, 0, describeRun("vdisk create", [name], result));
}

/** Both ways to reach a disk. */
function uris(name: string): Array<{ kind: string; uri: string }> {
  return [
    { kind: "tcp", uri: daemon.tcpUri(name) },
    { kind: "unix", uri: daemon.unixUri(name) },
  ];
}

/** qemu-io commands in one process; every command must succeed (pattern mismatches fail the run). */
function qemuIo(uri: string, commands: string[]): RunResult {
  const args = ["-f", "raw", ...commands.flatMap((command) => ["-c", command]), uri];
  const result = ok("qemu-io", args);
  assert.doesNotMatch(result.stdout + result.stderr, /failed/i, describeRun("qemu-io", args, result));
  return result;
}

/** qemu-io expected to fail; returns its output. */
function qemuIoFails(uri: string, commands: string[]): string {
  const args = ["-f", "raw", ...commands.flatMap((command) => ["-c", command]), uri];
  const result = run("qemu-io", args);
  assert.notEqual(result.status, 0, `should fail: ${describeRun("qemu-io", args, result)}`);
  return result.stdout + result.stderr;
}

/**
 * Runs a python script under nbdsh connected to `uri` with base:allocation requested; the script's last
 * line of output must be JSON, which is returned. `h` is the connected handle, `nbd` the module.
 */
function nbdsh<T>(uri: string, script: string): T {
  const args = ["--base-allocation", "-u", uri, "-c", `import json\n${script}`];
  const result = ok("nbdsh", args);
  const lines = result.stdout.trim().split("\n");
  return JSON.parse(lines[lines.length - 1] as string) as T;
}

interface QemuMapEntry {
  start: number;
  length: number;
  zero: boolean;
  data: boolean;
}

/** qemu-img map --output=json, reduced to start/length/zero/data. */
function qemuMap(uri: string): QemuMapEntry[] {
  const result = ok("qemu-img", ["map", "--output=json", "-f", "raw", uri]);
  return (JSON.parse(result.stdout) as QemuMapEntry[]).map(({ start, length, zero, data }) => ({
    start,
    length,
    zero,
    data,
  }));
}

/** Builds the expected map of a disk from its data ranges (sorted, disjoint); the rest is hole+zero. */
function expectedMap(size: number, dataRanges: Array<[number, number]>): QemuMapEntry[] {
  const entries: QemuMapEntry[] = [];
  let position = 0;
  for (const [start, length] of dataRanges) {
    if (start > position)
      entries.push({ start: position, length: start - position, zero: true, data: false });
    entries.push({ start, length, zero: false, data: true });
    position = start + length;
  }
  if (position < size) entries.push({ start: position, length: size - position, zero: true, data: false });
  return entries;
}

function sha256File(file: string): string {
  return createHash("sha256").update(fs.readFileSync(file)).digest("hex");
}

/** A sparse raw image: `segments` of random data at the given offsets, holes elsewhere. */
function makeImage(file: string, size: number, segments: Array<[number, number]>): void {
  const fd = fs.openSync(file, "w");
  try {
    for (const [offset, length] of segments) fs.writeSync(fd, randomBytes(length), 0, length, offset);
    fs.ftruncateSync(fd, size);
  } finally {
    fs.closeSync(fd);
  }
}

// -----------------------------------------------------------------------------------------------
// nbdinfo

test("nbdinfo --json: exactly the capabilities and block sizes vdisk advertises", () => {
  createDisk("caps");
  for (const { kind, uri } of uris("caps")) {
    const info = JSON.parse(ok("nbdinfo", ["--json", uri]).stdout) as {
      protocol: string;
      structured: boolean;
      exports: Array<Record<string, unknown>>;
    };
    assert.equal(info.protocol, "newstyle-fixed", kind);
    assert.equal(info.structured, true, kind);
    assert.equal(info.exports.length, 1, kind);
    const disk = info.exports[0] as Record<string, unknown>;
    assert.equal(disk["export-name"], "caps");
    assert.equal(disk["export-size"], diskBytes);
    assert.deepEqual(disk.contexts, ["base:allocation"]);
    const expected: Record<string, unknown> = {
      is_rotational: false,
      is_read_only: false,
      can_cache: true,
      can_df: true,
      can_fast_zero: true,
      can_flush: true,
      can_fua: true,
      can_multi_conn: true,
      can_trim: true,
      can_zero: true,
      block_size_minimum: 1,
      block_size_preferred: 4096,
      block_size_maximum: 33554432,
    };
    for (const [key, value] of Object.entries(expected)) assert.equal(disk[key], value, `${kind}: ${key}`);
  }
});

test("nbdinfo --list shows every disk with its size", () => {
  createDisk("list-a", 64 * MiB);
  createDisk("list-b", 128 * MiB);
  const result = ok("nbdinfo", ["--list", "--json", `nbd://127.0.0.1:${daemon.port}`]);
  const listed = (
    JSON.parse(result.stdout) as { exports: Array<{ "export-name": string; "export-size": number }> }
  ).exports;
  const names = daemon.vdiskJson<{ disks: Array<{ name: string }> }>(["list"]).disks.map((d) => d.name);
  assert.deepEqual(listed.map((e) => e["export-name"]).sort(), [...names].sort());
  assert.ok(names.includes("default") && names.includes("list-a") && names.includes("list-b"));
  const sizes = new Map(listed.map((e) => [e["export-name"], e["export-size"]]));
  assert.equal(sizes.get("list-a"), 64 * MiB);
  assert.equal(sizes.get("list-b"), 128 * MiB);
  assert.equal(sizes.get("default"), 8 * 1024 * MiB);
  // The text form over the Unix socket names them too.
  const text = ok("nbdinfo", ["--list", `nbd+unix://?socket=${daemon.socketPath}`]).stdout;
  for (const name of names) assert.match(text, new RegExp(`^export="${name}":$`, "m"));
});

test("nbdinfo --map: data where 1 MiB was written at 4 MiB, hole+zero elsewhere; then trimmed", () => {
  createDisk("nbdmap");
  const uri = daemon.tcpUri("nbdmap");
  qemuIo(uri, ["write -P 0x33 4M 1M"]);
  type MapEntry = { offset: number; length: number; type: number; description: string };
  const map = (target: string): MapEntry[] =>
    JSON.parse(ok("nbdinfo", ["--map", "--json", target]).stdout) as MapEntry[];
  const expected = [
    { offset: 0, length: 4 * MiB, type: 3, description: "hole,zero" },
    { offset: 4 * MiB, length: MiB, type: 0, description: "data" },
    { offset: 5 * MiB, length: diskBytes - 5 * MiB, type: 3, description: "hole,zero" },
  ];
  assert.deepEqual(map(uri), expected);
  assert.deepEqual(map(daemon.unixUri("nbdmap")), expected);
  // The text form says the same.
  const text = ok("nbdinfo", ["--map", uri]).stdout.trim().split("\n");
  assert.equal(text.length, 3);
  assert.match(text[1] as string, /^\s*4194304\s+1048576\s+0\s+data$/);
  // Trim the middle 256 KiB: the map splits around a new hole.
  qemuIo(uri, ["discard 4352K 256K"]);
  assert.deepEqual(map(uri), [
    { offset: 0, length: 4 * MiB, type: 3, description: "hole,zero" },
    { offset: 4 * MiB, length: 256 * KiB, type: 0, description: "data" },
    { offset: 4 * MiB + 256 * KiB, length: 256 * KiB, type: 3, description: "hole,zero" },
    { offset: 4 * MiB + 512 * KiB, length: 512 * KiB, type: 0, description: "data" },
    { offset: 5 * MiB, length: diskBytes - 5 * MiB, type: 3, description: "hole,zero" },
  ]);
});

// -----------------------------------------------------------------------------------------------
// qemu-img

test("qemu-img info over TCP and the Unix socket reports the disk's size", () => {
  createDisk("qinfo", 128 * MiB);
  for (const { kind, uri } of uris("qinfo")) {
    const info = JSON.parse(ok("qemu-img", ["info", "--output=json", uri]).stdout) as {
      "virtual-size": number;
      format: string;
    };
    assert.equal(info["virtual-size"], 128 * MiB, kind);
    assert.equal(info.format, "raw", kind);
  }
  const unknown = run("qemu-img", ["info", daemon.tcpUri("no-such-disk")]);
  assert.notEqual(unknown.status, 0, "an unknown export is refused");
});

test("qemu-img convert file → disk (-n) and disk → file, compare and map, over both URIs", () => {
  const segments: Array<[number, number]> = [
    [0, MiB],
    [9 * MiB, 300 * KiB],
    [40 * MiB + 4 * KiB, 64 * KiB],
  ];
  const source = daemon.file("convert-source.img");
  makeImage(source, diskBytes, segments); // every segment is 4 KiB aligned: the map is exact

  for (const kind of ["tcp", "unix"] as const) {
    const name = `convert-${kind}`;
    createDisk(name);
    const uri = kind === "tcp" ? daemon.tcpUri(name) : daemon.unixUri(name);
    // Old data the convert must zero out (qemu-img convert -n does not assume a zero target).
    qemuIo(uri, ["write -P 0x77 20M 1M"]);
    ok("qemu-img", ["convert", "-n", "-f", "raw", "-O", "raw", source, uri]);
    ok("qemu-img", ["compare", "-f", "raw", "-F", "raw", source, uri]);
    assert.deepEqual(qemuMap(uri), expectedMap(diskBytes, segments), `${kind}: map after convert`);

    const back = daemon.file(`convert-back-${kind}.img`);
    ok("qemu-img", ["convert", "-f", "raw", "-O", "raw", uri, back]);
    assert.equal(sha256File(back), sha256File(source), `${kind}: disk → file is byte-identical`);
    assert.ok(fs.statSync(back).blocks * 512 < 8 * MiB, `${kind}: qemu-img kept the holes`);

    // compare notices a one-byte difference (exit status 1) and says where.
    qemuIo(uri, ["write -P 0x01 9M 1"]);
    const differ = run("qemu-img", ["compare", "-f", "raw", "-F", "raw", source, uri]);
    assert.equal(differ.status, 1, describeRun("qemu-img compare", [], differ));
    assert.match(differ.stdout, /Content mismatch at offset 9437184!/);
  }
});

test("qemu-img map after writes, zeroes and trims, over both URIs", () => {
  createDisk("qmap");
  const tcp = daemon.tcpUri("qmap");
  qemuIo(tcp, ["write -P 0x11 0 64K", "write -P 0x22 1M 1M", "write -P 0x33 8M 4K", "write -P 0x44 63M 1M"]);
  const written = expectedMap(diskBytes, [
    [0, 64 * KiB],
    [MiB, MiB],
    [8 * MiB, 4 * KiB],
    [63 * MiB, MiB],
  ]);
  for (const { kind, uri } of uris("qmap")) assert.deepEqual(qemuMap(uri), written, kind);

  // discard (TRIM) and write -z -u (WRITE_ZEROES that may unmap) both leave holes.
  qemuIo(tcp, ["discard 1M 512K", "write -z -u 8M 4K", "discard 63M 1M"]);
  const trimmed = expectedMap(diskBytes, [
    [0, 64 * KiB],
    [MiB + 512 * KiB, 512 * KiB],
  ]);
  for (const { kind, uri } of uris("qmap")) assert.deepEqual(qemuMap(uri), trimmed, kind);
  qemuIo(tcp, ["read -P 0 1M 512K", "read -P 0x22 1536K 512K", "read -P 0 8M 4K", "read -P 0 63M 1M"]);
});

// -----------------------------------------------------------------------------------------------
// qemu-io

test("qemu-io: patterns at unaligned offsets and across 4 KiB boundaries read back exactly", () => {
  createDisk("qio");
  for (const { kind, uri } of uris("qio")) {
    const base = kind === "tcp" ? 0 : 32 * MiB;
    const at = (offset: number): number => base + offset;
    qemuIo(uri, [
      `write -P 0x5a ${at(1000)} 3000`, // inside one 4 KiB block, unaligned both ends
      `write -P 0xa5 ${at(4096 - 7)} 14`, // straddles a 4 KiB boundary by a few bytes
      `write -P 0x3c ${at(3 * 4096 - 100)} ${3 * 4096 + 200}`, // spans 4 boundaries
      `write -P 0x77 ${at(65536 + 1)} 1`, // a single byte
    ]);
    qemuIo(uri, [
      `read -P 0 ${at(0)} 1000`,
      `read -P 0x5a ${at(1000)} 3000`,
      `read -P 0 ${at(4000)} ${4096 - 7 - 4000}`,
      `read -P 0xa5 ${at(4096 - 7)} 14`,
      `read -P 0 ${at(4096 + 7)} ${3 * 4096 - 100 - 4096 - 7}`,
      `read -P 0x3c ${at(3 * 4096 - 100)} ${3 * 4096 + 200}`,
      `read -P 0 ${at(6 * 4096 + 100)} ${65536 - 6 * 4096 - 100}`,
      `read -P 0 ${at(65536)} 1`,
      `read -P 0x77 ${at(65536 + 1)} 1`,
      `read -P 0 ${at(65536 + 2)} 1000`,
    ]);
    // Overwrite part of a pattern unaligned, then read the seam.
    qemuIo(uri, [`write -P 0x99 ${at(2500)} 100`]);
    qemuIo(uri, [
      `read -P 0x5a ${at(1000)} 1500`,
      `read -P 0x99 ${at(2500)} 100`,
      `read -P 0x5a ${at(2600)} 1400`,
    ]);
    // A wrong expectation is caught (the check is real).
    const mismatch = qemuIoFails(uri, [`read -P 0x5b ${at(1000)} 3000`]);
    assert.match(mismatch, /Pattern verification failed at offset/, kind);
  }
});

test("qemu-io: write -z and discard read back zeros, aligned and unaligned", () => {
  createDisk("qzero");
  const uri = daemon.tcpUri("qzero");
  qemuIo(uri, ["write -P 0xee 0 2M"]);
  qemuIo(uri, [
    "write -z 4096 8192", // WRITE_ZEROES, NO_HOLE (qemu-io does not allow unmap without -u)
    "write -z -u 64K 64K", // WRITE_ZEROES allowing a hole
    "write -z 140000 5000", // unaligned zero
    "discard 512K 128K", // TRIM aligned
    "discard 1000001 3333", // TRIM unaligned: trimmed bytes read back as zeros here
  ]);
  qemuIo(uri, [
    "read -P 0xee 0 4096",
    "read -P 0 4096 8192",
    "read -P 0xee 12288 53248",
    "read -P 0 64K 64K",
    "read -P 0xee 128K 8928",
    "read -P 0 140000 5000",
    "read -P 0xee 145000 379288",
    "read -P 0 512K 128K",
    "read -P 0xee 640K 344641",
    "read -P 0 1000001 3333",
    "read -P 0xee 1003334 1093818",
  ]);
});

test("qemu-io: requests past the end fail with an error and the daemon keeps serving", () => {
  createDisk("qrange");
  for (const { kind, uri } of uris("qrange")) {
    for (const command of [
      `read 0 ${diskBytes + 512}`,
      `read ${diskBytes} 512`,
      `write -P 1 ${diskBytes - 4} 8`,
      `write -z ${diskBytes - 512} 1024`,
      `discard ${diskBytes} 4096`,
    ]) {
      const output = qemuIoFails(uri, [command]);
      assert.match(output, /(read|write|discard) failed: /, `${kind}: ${command}`);
    }
    // The last bytes are still reachable, the disk unchanged, the daemon alive.
    qemuIo(uri, [`write -P 0x42 ${diskBytes - 512} 512`, `read -P 0x42 ${diskBytes - 512} 512`]);
  }
});

test("nbdsh without client-side checks: out-of-range requests get EINVAL / ENOSPC from the server", () => {
  createDisk("srange");
  const result = nbdsh<Record<string, string>>(
    daemon.tcpUri("srange"),
    `
h.set_strict_mode(0)
size = h.get_size()
out = {}
def attempt(name, fn):
    try:
        fn()
        out[name] = "ok"
    except nbd.Error as e:
        out[name] = e.errno  # the errno name, e.g. "EINVAL"
attempt("read", lambda: h.pread(512, size))
attempt("read_straddle", lambda: h.pread(1024, size - 512))
attempt("write", lambda: h.pwrite(b"x" * 512, size))
attempt("write_straddle", lambda: h.pwrite(b"x" * 1024, size - 512))
attempt("zero", lambda: h.zero(4096, size))
attempt("trim", lambda: h.trim(4096, size))
attempt("cache", lambda: h.cache(4096, size))
attempt("block_status", lambda: h.block_status(4096, size, lambda *a: 0))
attempt("read_too_big", lambda: h.pread(64 * 1024 * 1024, 0))
attempt("read_last", lambda: h.pread(512, size - 512))
out["still_serving"] = h.pread(4, 0) == bytes(4)
print(json.dumps(out))
`,
  );
  assert.deepEqual(result, {
    read: "EINVAL",
    read_straddle: "EINVAL",
    write: "ENOSPC",
    write_straddle: "ENOSPC",
    zero: "ENOSPC",
    trim: "EINVAL",
    cache: "EINVAL",
    block_status: "EINVAL",
    read_too_big: "EINVAL",
    read_last: "ok",
    still_serving: true,
  });
  // The straddling write changed nothing before the end.
  qemuIo(daemon.tcpUri("srange"), [`read -P 0 ${diskBytes - 512} 512`]);
});

// -----------------------------------------------------------------------------------------------
// nbdsh: FUA, trim, zero, block status, cache, flush, structured replies

test("nbdsh: FUA write, trim, zero (NO_HOLE, FAST_ZERO), block status, cache, flush", () => {
  createDisk("sh");
  type Extents = number[];
  const result = nbdsh<{
    caps: Record<string, boolean>;
    structured: boolean;
    contexts: boolean;
    size: number;
    block_max: number;
    fua_read_ok: boolean;
    after_write: Extents;
    after_trim: Extents;
    trim_zero: boolean;
    trim_rest: boolean;
    zero_no_hole: boolean;
    zero_fast: boolean;
    after_fast: Extents;
    zero_fast_no_hole: string;
    req_one: Extents;
    cached: boolean;
    flushed: boolean;
    contexts_seen: string[];
  }>(
    daemon.tcpUri("sh"),
    `
MiB = 1024 * 1024
out = {}
out["caps"] = {
    "fua": h.can_fua(), "trim": h.can_trim(), "zero": h.can_zero(), "fast_zero": h.can_fast_zero(),
    "cache": h.can_cache(), "df": h.can_df(), "flush": h.can_flush(), "multi_conn": h.can_multi_conn(),
    "read_only": h.is_read_only(), "rotational": h.is_rotational(),
}
out["structured"] = h.get_structured_replies_negotiated()
out["contexts"] = h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
out["size"] = h.get_size()
out["block_max"] = h.get_block_size(nbd.SIZE_MAXIMUM)
seen = set()
def status(count, offset, flags=0):
    got = []
    def cb(meta, off, entries, err):
        seen.add(meta)
        assert off == offset
        got.extend(entries)
        return 0
    h.block_status(count, offset, cb, flags)
    return got

data = bytes(range(256)) * 256  # 64 KiB
h.pwrite(data, MiB, nbd.CMD_FLAG_FUA)
out["fua_read_ok"] = h.pread(len(data), MiB) == data
out["after_write"] = status(4 * MiB, 0)

h.trim(16 * 1024, MiB + 16 * 1024)
out["after_trim"] = status(4 * MiB, 0)
out["trim_zero"] = h.pread(16 * 1024, MiB + 16 * 1024) == bytes(16 * 1024)
out["trim_rest"] = h.pread(16 * 1024, MiB) == data[:16 * 1024] and h.pread(32 * 1024, MiB + 32 * 1024) == data[32 * 1024:]

h.pwrite(b"\\xab" * (1 * MiB), 2 * MiB)
h.zero(256 * 1024, 2 * MiB, nbd.CMD_FLAG_NO_HOLE)
out["zero_no_hole"] = h.pread(256 * 1024, 2 * MiB) == bytes(256 * 1024) and h.pread(4, 2 * MiB + 256 * 1024) == b"\\xab" * 4
h.zero(256 * 1024, 2 * MiB + 512 * 1024, nbd.CMD_FLAG_FAST_ZERO)
out["zero_fast"] = h.pread(256 * 1024, 2 * MiB + 512 * 1024) == bytes(256 * 1024)
out["after_fast"] = status(1 * MiB, 2 * MiB + 512 * 1024)
try:
    h.zero(4096, 3 * MiB, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE)
    out["zero_fast_no_hole"] = "ok" if h.pread(4096, 3 * MiB) == bytes(4096) else "not zero"
except nbd.Error as e:
    out["zero_fast_no_hole"] = e.errno

out["req_one"] = status(4 * MiB, 0, nbd.CMD_FLAG_REQ_ONE)
h.cache(2 * MiB, 0)
out["cached"] = True
h.flush()
out["flushed"] = True
out["contexts_seen"] = sorted(seen)
print(json.dumps(out))
`,
  );
  assert.deepEqual(result.caps, {
    fua: true,
    trim: true,
    zero: true,
    fast_zero: true,
    cache: true,
    df: true,
    flush: true,
    multi_conn: true,
    read_only: false,
    rotational: false,
  });
  assert.equal(result.structured, true);
  assert.equal(result.contexts, true);
  assert.equal(result.size, diskBytes);
  assert.equal(result.block_max, 32 * MiB);
  assert.equal(result.fua_read_ok, true);
  // Extents as [length, flags, ...]: 0 = data, 3 = hole|zero.
  assert.deepEqual(result.after_write, [MiB, 3, 64 * KiB, 0, 3 * MiB - 64 * KiB, 3]);
  assert.deepEqual(result.after_trim, [MiB, 3, 16 * KiB, 0, 16 * KiB, 3, 32 * KiB, 0, 3 * MiB - 64 * KiB, 3]);
  assert.equal(result.trim_zero, true);
  assert.equal(result.trim_rest, true);
  assert.equal(result.zero_no_hole, true);
  assert.equal(result.zero_fast, true, "FAST_ZERO is advertised, so it must succeed and zero");
  // FAST_ZERO without NO_HOLE may punch: the range is hole|zero, the rest of the written MiB is data.
  assert.deepEqual(result.after_fast, [256 * KiB, 3, 256 * KiB, 0, 512 * KiB, 3]);
  // With NO_HOLE too, the spec allows ENOTSUP (cannot be fast) or success; anything else is a bug.
  assert.ok(["ok", "ENOTSUP", "EOPNOTSUPP"].includes(result.zero_fast_no_hole), result.zero_fast_no_hole);
  assert.deepEqual(result.req_one, [MiB, 3], "REQ_ONE: exactly one extent");
  assert.equal(result.cached, true);
  assert.equal(result.flushed, true);
  assert.deepEqual(result.contexts_seen, ["base:allocation"]);
});

test("nbdsh: structured reads — chunks cover the request exactly, DF gives one chunk", () => {
  createDisk("sread");
  const result = nbdsh<{
    negotiated: boolean;
    reads: Array<{
      offset: number;
      count: number;
      chunks: Array<[number, number, number]>;
      equal: boolean;
    }>;
    df: Array<[number, number, number]>;
    df_equal: boolean;
    constants: number[];
  }>(
    daemon.tcpUri("sread"),
    `
MiB = 1024 * 1024
out = {"negotiated": h.get_structured_replies_negotiated(), "reads": []}
pattern = bytes((i * 7 + 3) % 251 for i in range(300000))
h.pwrite(pattern, MiB + 123)
h.trim(64 * 1024, 4 * MiB)
expected = bytearray(8 * MiB)
expected[MiB + 123:MiB + 123 + len(pattern)] = pattern
def structured(count, offset, flags=0):
    chunks = []
    def cb(buf, off, status, err):
        if status == nbd.READ_HOLE:
            assert buf == bytes(len(buf))
        chunks.append([off, len(buf), status])
        return 0
    buf = h.pread_structured(count, offset, cb, flags)
    return buf, chunks
for offset, count in [(MiB + 123, len(pattern)), (MiB - 5000, 20000), (4 * MiB - 100, 300), (0, 4 * MiB + 128 * 1024), (7 * MiB, 1)]:
    buf, chunks = structured(count, offset)
    out["reads"].append({"offset": offset, "count": count, "chunks": chunks, "equal": buf == bytes(expected[offset:offset + count])})
buf, chunks = structured(2 * MiB, 0, nbd.CMD_FLAG_DF)
out["df"] = chunks
out["df_equal"] = buf == bytes(expected[0:2 * MiB])
out["constants"] = [nbd.READ_DATA, nbd.READ_HOLE]
print(json.dumps(out))
`,
  );
  assert.equal(result.negotiated, true);
  const [readData, readHole] = result.constants as [number, number];
  for (const read of result.reads) {
    assert.equal(read.equal, true, `content of read ${read.count}@${read.offset}`);
    assert.ok(read.chunks.length >= 1);
    // Sorted by offset, the chunks tile [offset, offset+count) with no gap and no overlap.
    const sorted = [...read.chunks].sort((a, b) => a[0] - b[0]);
    let position = read.offset;
    for (const [offset, length, status] of sorted) {
      assert.equal(offset, position, `chunk at ${offset} in read ${read.count}@${read.offset}`);
      assert.ok(length > 0);
      assert.ok(status === readData || status === readHole, `chunk status ${status}`);
      position += length;
    }
    assert.equal(position, read.offset + read.count);
  }
  assert.equal(result.df.length, 1, `DF: exactly one chunk, got ${JSON.stringify(result.df)}`);
  assert.deepEqual(result.df[0]?.slice(0, 2), [0, 2 * MiB]);
  assert.equal(result.df_equal, true);
});

test("nbdsh without structured replies: simple replies for data and errors", () => {
  createDisk("simple");
  const result = run("nbdsh", [
    "-c",
    `
import json
h.set_request_structured_replies(False)
h.connect_uri(${JSON.stringify(daemon.tcpUri("simple"))})
out = {"structured": h.get_structured_replies_negotiated(), "df": h.can_df()}
h.set_strict_mode(0)
data = bytes((i * 13) % 256 for i in range(5000))
h.pwrite(data, 100)
out["read"] = h.pread(5000, 100) == data
out["read_zero"] = h.pread(4096, 8192) == bytes(4096)
def attempt(name, fn):
    try:
        fn()
        out[name] = "ok"
    except nbd.Error as e:
        out[name] = e.errno
size = h.get_size()
attempt("read_past_end", lambda: h.pread(4096, size - 1024))
attempt("write_past_end", lambda: h.pwrite(b"x" * 4096, size - 1024))
attempt("read_too_big", lambda: h.pread(33 * 1024 * 1024, 0))
attempt("read_df", lambda: h.pread(10, 0, nbd.CMD_FLAG_DF))
out["still_in_sync"] = h.pread(5000, 100) == data
print(json.dumps(out))
`,
  ]);
  assert.equal(result.status, 0, describeRun("nbdsh", [], result));
  assert.deepEqual(JSON.parse(result.stdout.trim().split("\n").pop() as string), {
    structured: false,
    df: false,
    read: true,
    read_zero: true,
    read_past_end: "EINVAL",
    write_past_end: "ENOSPC",
    read_too_big: "EINVAL",
    read_df: "EINVAL", // DF is only defined with structured replies
    still_in_sync: true, // an error reply to a read carries no payload: the stream stays in step
  });
});

test("nbdsh option mode: LIST, INFO with description, LIST_META_CONTEXT, unknown export, GO", () => {
  createDisk("opts");
  const result = run("nbdsh", [
    "-c",
    `
import json
out = {}
h.set_opt_mode(True)
h.set_full_info(True)
h.connect_uri(${JSON.stringify(daemon.tcpUri("opts"))})
names = []
h.opt_list(lambda name, description: names.append(name) or 0)
out["listed"] = sorted(names)
h.opt_info()
out["info"] = [h.get_size(), h.get_canonical_export_name(), h.get_export_description(),
               h.get_block_size(nbd.SIZE_MINIMUM), h.get_block_size(nbd.SIZE_PREFERRED),
               h.get_block_size(nbd.SIZE_MAXIMUM), h.is_read_only(), h.can_multi_conn()]
contexts = []
count = h.opt_list_meta_context(lambda name: contexts.append(name) or 0)
out["contexts"] = [count, contexts]
h.add_meta_context("qemu:dirty-bitmap:nothing")
other = []
out["unknown_context"] = [h.opt_list_meta_context(lambda name: other.append(name) or 0), other]
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.set_export_name("no-such-disk")
try:
    h.opt_info()
    out["unknown_export"] = "ok"
except nbd.Error as e:
    out["unknown_export"] = e.errno
h.set_export_name("opts")
h.opt_go()
out["go"] = [h.get_size(), h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION),
             h.can_meta_context("qemu:dirty-bitmap:nothing")]
out["read"] = h.pread(10, 0) == bytes(10)
print(json.dumps(out))
`,
  ]);
  assert.equal(result.status, 0, describeRun("nbdsh", [], result));
  const out = JSON.parse(result.stdout.trim().split("\n").pop() as string) as Record<string, unknown>;
  const names = daemon.vdiskJson<{ disks: Array<{ name: string }> }>(["list"]).disks.map((d) => d.name);
  assert.deepEqual(out.listed, [...names].sort());
  assert.deepEqual(out.info, [diskBytes, "opts", "vdisk disk opts, 64 MiB", 1, 4096, 32 * MiB, false, true]);
  assert.deepEqual(out.contexts, [1, ["base:allocation"]]);
  assert.deepEqual(out.unknown_context, [0, []]);
  assert.equal(out.unknown_export, "ENOENT", "NBD_REP_ERR_UNKNOWN");
  assert.deepEqual(out.go, [diskBytes, true, false]);
  assert.equal(out.read, true);
});

// -----------------------------------------------------------------------------------------------
// nbdcopy

test("nbdcopy: 64 MiB random file → disk → file, checksums equal; disk → disk too", () => {
  createDisk("copy-a");
  createDisk("copy-b");
  const source = daemon.file("copy-source.img");
  fs.writeFileSync(source, randomBytes(diskBytes));
  const sourceSum = sha256File(source);

  ok("nbdcopy", ["--flush", source, daemon.tcpUri("copy-a")], 120_000);
  const back = daemon.file("copy-back.img");
  ok("nbdcopy", [daemon.unixUri("copy-a"), back], 120_000);
  assert.equal(fs.statSync(back).size, diskBytes);
  assert.equal(sha256File(back), sourceSum, "file → disk → file is byte-identical");

  ok("nbdcopy", ["--flush", daemon.tcpUri("copy-a"), daemon.unixUri("copy-b")], 120_000);
  const again = daemon.file("copy-again.img");
  ok("nbdcopy", [daemon.tcpUri("copy-b"), again], 120_000);
  assert.equal(sha256File(again), sourceSum, "disk → disk is byte-identical");
  ok("qemu-img", ["compare", "-f", "raw", "-F", "raw", daemon.tcpUri("copy-a"), daemon.tcpUri("copy-b")]);
  for (const file of [source, back, again]) fs.rmSync(file);
});

// -----------------------------------------------------------------------------------------------
// fio

interface FioJob {
  jobname: string;
  error: number;
  read: { io_bytes: number };
  write: { io_bytes: number };
}

test("fio nbd engine: verify=crc32c at iodepth 32 over two connections (disjoint halves)", async () => {
  createDisk("fio");
  const half = diskBytes / 2;
  const common = [
    "--name=vdisk",
    "--ioengine=nbd",
    `--uri=${daemon.tcpUri("fio")}`,
    "--rw=randwrite",
    "--bs=4k",
    "--iodepth=32",
    "--numjobs=2", // two jobs, each with its own NBD connection ...
    `--size=${half}`,
    `--offset_increment=${half}`, // ... job 1 writes the second half
    "--verify=crc32c",
    "--verify_state_save=0", // no local-*-verify.state files
    "--randseed=1234",
    "--output-format=json",
  ];
  /** Runs fio, polling the API meanwhile for the most connections the disk had at once. */
  const runFio = async (extra: string[], output: string): Promise<{ jobs: FioJob[]; peak: number }> => {
    const args = [...common, ...extra, `--output=${output}`];
    const fio = spawnTool("fio", args, { timeoutMs: 60_000, cwd: daemon.work });
    let finished = false;
    const result = fio.done.finally(() => (finished = true));
    let peak = 0;
    while (!finished) {
      const disk = await daemon.api<{ connections: number }>("disks/fio");
      peak = Math.max(peak, disk.connections);
      await new Promise((resolve) => setTimeout(resolve, 10));
    }
    const outcome = await result;
    const report = fs.existsSync(output) ? fs.readFileSync(output, "utf8") : "";
    assert.equal(
      outcome.status,
      0,
      `${describeRun("fio", args, outcome)}\n${report}\ndaemon log:\n${daemon.log()}`,
    );
    assert.doesNotMatch(outcome.stdout + outcome.stderr, /verify|bad magic|crc32c/i);
    return { jobs: (JSON.parse(report) as { jobs: FioJob[] }).jobs, peak };
  };

  // Random writes, then fio reads everything back and checks every block's crc32c.
  const written = await runFio(["--do_verify=1"], daemon.file("fio-write.json"));
  assert.equal(written.jobs.length, 2);
  assert.equal(written.peak, 2, "two NBD connections to the disk at once");
  for (const job of written.jobs) {
    assert.equal(job.error, 0);
    assert.equal(job.write.io_bytes, half);
    assert.equal(job.read.io_bytes, half, "the verify pass read every written block");
  }
  // A second run, on fresh connections, only verifies what the first one wrote.
  const verified = await runFio(["--verify_only"], daemon.file("fio-verify.json"));
  for (const job of verified.jobs) {
    assert.equal(job.error, 0);
    assert.equal(job.read.io_bytes, half);
  }
});

// -----------------------------------------------------------------------------------------------
// vdisk export

test("vdisk export of a disk written over NBD equals the disk (qemu-img compare) and stays sparse", () => {
  createDisk("exp");
  const uri = daemon.tcpUri("exp");
  qemuIo(uri, ["write -P 0x61 0 1M", "write -P 0x62 10000 5000", "write -P 0x63 30M 2M", "discard 512K 4K"]);
  const target = daemon.file("exp.raw");
  const result = daemon.vdisk(["export", "exp", target]);
  assert.equal(result.status, 0, describeRun("vdisk export", [], result));
  ok("qemu-img", ["compare", "-f", "raw", "-F", "raw", target, uri]);
  ok("qemu-img", ["compare", "-f", "raw", "-F", "raw", target, daemon.unixUri("exp")]);
  assert.equal(fs.statSync(target).size, diskBytes);
  assert.ok(fs.statSync(target).blocks * 512 <= 4 * MiB, "holes stay holes in the export");
  qemuIo(uri, ["read -P 0x63 30M 2M"]);
});
