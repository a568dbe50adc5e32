/**
 * `vdisk attach FILE NAME`: an existing raw image is served in place — reads see its bytes, writes land
 * in it, deleting the disk leaves the file — and the mistakes are refused with clear errors.
 */
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import * as fs from "node:fs";
import { type DaemonFixture, requireTool, run, startDaemon } from "../../src/testing/daemon-fixture";

let daemon: DaemonFixture;

before(async () => {
  requireTool("qemu-io");
  requireTool("qemu-img");
  daemon = await startDaemon({ name: "vdisk-attach" });
});

after(() => daemon?.cleanup());

function qemuIo(
  uri: string,
  commands: string[],
  readOnly = false,
): { status: number | null; output: string } {
  const args = ["-f", "raw", ...(readOnly ? ["-r"] : []), ...commands.flatMap((c) => ["-c", c]), uri];
  const result = run("qemu-io", args);
  return { status: result.status, output: result.stdout + result.stderr };
}

test("an existing raw image is served in place and survives the disk's deletion", () => {
  const file = daemon.file("existing.raw");
  assert.equal(run("qemu-img", ["create", "-q", "-f", "raw", file, "32M"]).status, 0);
  assert.equal(qemuIo(file, ["write -P 0x3c 1M 64K"]).status, 0);

  const attached = daemon.vdisk(["attach", file, "legacy", "--json"]);
  assert.equal(attached.status, 0, attached.stderr);
  const info = JSON.parse(attached.stdout) as { name: string; size: number; format: string; file: string };
  assert.equal(info.name, "legacy");
  assert.equal(info.size, 32 * 1024 * 1024);
  assert.equal(info.format, "raw");
  assert.doesNotMatch(info.file, /^\//, "the API names no path outside the home");

  // Reads see the file's bytes; writes land in the file itself.
  const uri = daemon.unixUri("legacy");
  assert.equal(qemuIo(uri, ["read -P 0x3c 1M 64K", "write -P 0x5d 8M 4K"]).status, 0);
  assert.equal(qemuIo(file, ["read -P 0x5d 8M 4K"], true).status, 0, "the write reached the original file");

  // The same file cannot back a second disk; a missing file and a relative path are refused.
  const twice = daemon.vdisk(["attach", file, "again"]);
  assert.notEqual(twice.status, 0);
  assert.match(twice.stderr, /already served as disk legacy/);
  const missing = daemon.vdisk(["attach", daemon.file("nope.raw"), "nope"]);
  assert.notEqual(missing.status, 0);
  assert.match(missing.stderr, /cannot attach nope\.raw/);

  // Deleting the disk removes the link, never the user's file.
  const deleted = daemon.vdisk(["delete", "legacy"]);
  assert.equal(deleted.status, 0, deleted.stderr);
  assert.ok(fs.existsSync(file), "the attached file is still there");
  assert.equal(qemuIo(file, ["read -P 0x3c 1M 64K", "read -P 0x5d 8M 4K"], true).status, 0);
});

test("--read-only attaches refuse writes", () => {
  const file = daemon.file("golden.raw");
  assert.equal(run("qemu-img", ["create", "-q", "-f", "raw", file, "16M"]).status, 0);
  const attached = daemon.vdisk(["attach", file, "golden", "--read-only"]);
  assert.equal(attached.status, 0, attached.stderr);
  const uri = daemon.unixUri("golden");
  assert.equal(qemuIo(uri, ["read -P 0 0 64K"], true).status, 0);
  const write = qemuIo(uri, ["write -P 1 0 4K"]);
  assert.match(write.output, /(Operation not permitted|Permission denied|read-only)/i);
  assert.equal(qemuIo(file, ["read -P 0 0 4K"], true).status, 0, "nothing was written");
});
