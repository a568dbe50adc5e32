/**
 * The request engine through the real daemon and real clients: `vdisk set` / `vdisk info` (settings live,
 * validated, kept in the catalog across a restart), merging and splitting seen in the engine's counters
 * while nbdsh and qemu-io write through NBD (and the data read back intact), and `--emulate hdd` making a
 * disk answer like a rotational disk without changing its bytes.
 */
import { after, before, test } from "node:test";
import * as assert from "node:assert/strict";

import * as path from "node:path";

import {
  type DaemonFixture,
  describeRun,
  repositoryRoot,
  requireTool,
  run,
  startDaemon,
} from "../../src/testing/daemon-fixture";

interface EngineView {
  settings: { merge: boolean; maxRequestBytes: number; queueDepth: number; sort: string };
  sorting: boolean;
  submitted: number;
  dispatched: number;
  merged: number;
  split: number;
}
interface InfoView {
  name: string;
  engine?: EngineView;
  emulate?: string;
}

let daemon: DaemonFixture;

before(async () => {
  for (const tool of ["nbdsh", "qemu-io"]) requireTool(tool);
  daemon = await startDaemon({ name: "vdisk-engine" });
  for (const [name, format] of [
    ["img", "vdisk"],
    ["raw", "raw"],
  ]) {
    const created = daemon.vdisk(["create", name, "--size", "64M", "--format", format]);
    assert.equal(created.status, 0, created.stderr);
  }
});

after(async () => {
  if (daemon?.running) await daemon.stop();
  daemon?.cleanup();
});

function info(name: string): InfoView {
  return daemon.vdiskJson<InfoView>(["info", name]);
}

function engine(name: string): EngineView {
  const view = info(name).engine;
  assert.ok(view, `vdisk info ${name} shows the engine`);
  return view;
}

function ok(cmd: string, args: string[]): string {
  const result = run(cmd, args);
  assert.equal(result.status, 0, describeRun(cmd, args, result));
  return result.stdout;
}

test("vdisk info shows the engine's default settings", () => {
  const view = engine("img");
  assert.deepEqual(view.settings, {
    merge: true,
    maxRequestBytes: 32 * 1024 * 1024,
    queueDepth: 64,
    sort: "auto",
  });
  assert.equal(view.sorting, false, "a file on this machine is not rotational: auto means off");
  const text = daemon.vdisk(["info", "img"]);
  assert.equal(text.status, 0, text.stderr);
  assert.match(text.stdout, /engine: +merge on, max request 32 MiB, queue depth 64, sort auto \(off\)/);
});

test("vdisk set refuses bad settings with a message saying what is allowed, and changes nothing", () => {
  for (const [args, message] of [
    [["--queue-depth", "0"], /--queue-depth takes a whole number of at least 1/],
    [["--queue-depth", "5000"], /queue ?depth/i],
    [["--max-request", "1000"], /max(imum)? ?request/i],
    [["--merge", "maybe"], /--merge/],
    [["--sort", "sideways"], /--sort/],
    [["--emulate", "floppy"], /unknown latency model "floppy"/],
    [[], /nothing to set/],
  ] as Array<[string[], RegExp]>) {
    const result = daemon.vdisk(["set", "img", ...args]);
    // 1: refused by the daemon; 2: refused by the argument parser before asking it.
    assert.ok(
      result.status === 1 || result.status === 2,
      `vdisk set img ${args.join(" ")} must fail:\n${result.stdout}`,
    );
    assert.match(result.stderr, message);
  }
  const unknown = daemon.vdisk(["set", "nosuch", "--queue-depth", "4"]);
  assert.equal(unknown.status, 1);
  assert.match(unknown.stderr, /no disk named nosuch/);
  assert.deepEqual(engine("img").settings.queueDepth, 64);
});

test("adjacent writes queued together are merged, and read back intact", () => {
  const set = daemon.vdiskJson<InfoView>(["set", "img", "--queue-depth", "1", "--max-request", "256K"]);
  assert.equal(set.engine?.settings.queueDepth, 1);
  const before = engine("img");
  // 64 adjacent 4 KiB writes issued at once (libnbd pipelines them on one connection): with one request
  // in flight at the device, the rest queue up and merge into requests of at most 256 KiB.
  const script = [
    "bufs = [bytes([i % 251 + 1]) * 4096 for i in range(64)]",
    "cookies = [h.aio_pwrite(bufs[i], 1048576 + i * 4096) for i in range(64)]",
    "while h.aio_in_flight() > 0: h.poll(-1)",
    "h.flush()",
    "data = h.pread(64 * 4096, 1048576)",
    "assert data == b''.join(bufs), 'read back what was written'",
    "print('ok')",
  ].join("\n");
  assert.equal(ok("nbdsh", ["-u", daemon.unixUri("img"), "-c", script]).trim(), "ok");
  const after = engine("img");
  const submitted = after.submitted - before.submitted;
  const dispatched = after.dispatched - before.dispatched;
  // The read may be answered from the page cache (counted as a fast-path read, not submitted).
  assert.ok(submitted >= 65, `the engine saw the 64 writes and the flush (${submitted})`);
  assert.ok(after.merged - before.merged > 0, "some writes were merged");
  assert.ok(
    dispatched < submitted,
    `fewer device requests (${dispatched}) than client requests (${submitted})`,
  );
});

test("a request larger than the maximum request size is split, and its data is intact", () => {
  daemon.vdiskJson(["set", "img", "--max-request", "64K", "--queue-depth", "8"]);
  const before = engine("img");
  const uri = daemon.unixUri("img");
  ok("qemu-io", ["-f", "raw", "-c", "write -P 0x5a 4M 1M", uri]);
  const after = engine("img");
  assert.ok(
    after.split - before.split >= 15,
    `a 1 MiB write in 64 KiB pieces: ${after.split - before.split}`,
  );
  ok("qemu-io", ["-f", "raw", "-c", "read -P 0x5a 4M 1M", uri]);
});

test("settings are kept in the catalog across a restart; back to defaults removes them", async () => {
  daemon.vdiskJson(["set", "img", "--merge", "off", "--sort", "on"]);
  await daemon.restart();
  const view = engine("img");
  assert.deepEqual(view.settings, { merge: false, maxRequestBytes: 64 * 1024, queueDepth: 8, sort: "on" });
  assert.equal(view.sorting, true);
  ok("qemu-io", ["-f", "raw", "-c", "read -P 0x5a 4M 1M", daemon.unixUri("img")]);
  daemon.vdiskJson([
    "set",
    "img",
    "--merge",
    "on",
    "--sort",
    "auto",
    "--max-request",
    "32M",
    "--queue-depth",
    "64",
  ]);
  assert.deepEqual(engine("img").settings, {
    merge: true,
    maxRequestBytes: 32 * 1024 * 1024,
    queueDepth: 64,
    sort: "auto",
  });
});

test("--emulate hdd makes a disk slow like a rotational disk, keeps its bytes, and needs no clients", async () => {
  const uri = daemon.unixUri("raw");
  ok("qemu-io", ["-f", "raw", "-c", "write -P 0x33 0 64k", "-c", "write -P 0x44 60M 64k", uri]);
  const set = daemon.vdiskJson<InfoView>(["set", "raw", "--emulate", "hdd"]);
  assert.equal(set.emulate, "hdd");
  assert.equal(engine("raw").sorting, true, "an emulated hdd is rotational: sort auto turns on");
  // Alternating between the two ends of the disk: every read seeks across the platter.
  const started = process.hrtime.bigint();
  ok("qemu-io", [
    "-f",
    "raw",
    "-c",
    "read -P 0x33 0 4k",
    "-c",
    "read -P 0x44 60M 4k",
    "-c",
    "read -P 0x33 8k 4k",
    "-c",
    "read -P 0x44 61440k 4k",
    uri,
  ]);
  const elapsedMs = Number(process.hrtime.bigint() - started) / 1e6;
  assert.ok(elapsedMs >= 4 * 5, `four long seeks take at least 20 ms (took ${elapsedMs.toFixed(1)} ms)`);
  // Changing the emulation while a client is connected is refused.
  const holder = run("nbdsh", ["-u", uri, "-c", "import subprocess, sys\n" + busyCheck()], {
    timeoutMs: 60_000,
  });
  assert.equal(holder.status, 0, describeRun("nbdsh", ["..."], holder));
  assert.match(holder.stdout, /DISK_BUSY|client connection/);
  const cleared = daemon.vdiskJson<InfoView>(["set", "raw", "--emulate", "none"]);
  assert.equal(cleared.emulate, undefined);
  assert.equal(engine("raw").sorting, false);
  ok("qemu-io", ["-f", "raw", "-c", "read -P 0x44 60M 64k", uri]);
});

/** Python run inside nbdsh (so a connection is open): tries `vdisk set --emulate ssd` and prints stderr. */
function busyCheck(): string {
  const args = [
    process.execPath,
    path.join(repositoryRoot, "bin", "vdisk"),
    "set",
    "raw",
    "--emulate",
    "ssd",
  ];
  args.push("--home", daemon.home);
  return [
    `r = subprocess.run(${JSON.stringify(args)}, capture_output=True, text=True, env={"VDISK_HOME": ""})`,
    "print(r.returncode, r.stderr)",
    "sys.exit(0 if r.returncode == 1 else 3)",
  ].join("\n");
}
