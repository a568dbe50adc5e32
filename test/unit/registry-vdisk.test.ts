/**
 * The registry's vdisk families on real image files in a temporary home, without an NBD server: one image
 * per family shared by its disks, snapshot exports DISK@SNAP with their dirty-bitmap contexts, clone,
 * rollback, snapshot delete refused while exported, disk delete keeping what other disks build on, removal
 * of the image file with the last disk, and orphan heads (a clone cut short by a crash) removed at load.
 */
import { after, test } from "node:test";
import * as assert from "node:assert/strict";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import { VdiskError, type ErrorCode } from "../../src/errors";
import { MiB } from "../../src/limits";
import type { ExportHandle } from "../../src/protocol/nbd/exports";
import { readAsync, writeAsync } from "../../src/devices/promises";
import type { Extent } from "../../src/devices/block-device";
import { loadCatalog, saveCatalog } from "../../src/daemon/catalog";
import { homePaths, prepareHome } from "../../src/daemon/home";
import { DiskRegistry } from "../../src/daemon/registry";

const tempHomes: string[] = [];
after(() => {
  for (const home of tempHomes) fs.rmSync(home, { recursive: true, force: true });
});

function tempHome(): string {
  const home = fs.mkdtempSync(path.join(os.tmpdir(), "vdisk-registry-"));
  tempHomes.push(home);
  prepareHome(homePaths(home));
  return home;
}

function isError(code: ErrorCode, pattern?: RegExp): (err: unknown) => boolean {
  return (err: unknown) => {
    assert.ok(err instanceof VdiskError, `expected VdiskError, got ${String(err)}`);
    assert.equal(err.code, code, err.message);
    if (pattern) assert.match(err.message, pattern);
    return true;
  };
}

function filled(byte: number, length = 64 * 1024): Buffer {
  return Buffer.alloc(length, byte);
}

async function readByte(handle: ExportHandle, offset: number): Promise<number> {
  const buf = Buffer.alloc(4096);
  await readAsync(handle.device, buf, offset);
  return buf[0] as number;
}

function status(handle: ExportHandle, context: string, length: number): Promise<Extent[]> {
  return new Promise((resolve, reject) => {
    assert.ok(handle.contextStatus, "the handle answers meta contexts");
    handle.contextStatus(context, 0, length, (err, extents) => (err ? reject(err) : resolve(extents ?? [])));
  });
}

test("vdisk family: snapshots export read-only with dirty bitmaps; clone shares the image file", async () => {
  const home = tempHome();
  const registry = await DiskRegistry.open(home);
  const web = await registry.create("web", 16 * MiB);
  assert.deepEqual([web.format, web.file], ["vdisk", "pools/default/web.vdisk"]);
  const disk = registry.open("web") as ExportHandle;
  await writeAsync(disk.device, filled(1), 0);
  const snapshot = await registry.snapshotCreate("web", "s1");
  assert.equal(snapshot.name, "web@s1");
  await writeAsync(disk.device, filled(2), 0);
  await writeAsync(disk.device, filled(3), 8 * MiB);
  await assert.rejects(registry.snapshotCreate("web", "s1"), isError("SNAPSHOT_EXISTS"));
  await assert.rejects(registry.snapshotCreate("web", "a b"), isError("BAD_NAME", /snapshot name/));

  assert.deepEqual(registry.list().sort(), ["web", "web@s1"]);
  const summary = registry.lookup("web@s1");
  assert.deepEqual([summary?.readOnly, summary?.size, summary?.metaContexts], [true, 16 * MiB, []]);
  assert.deepEqual(registry.lookup("web")?.metaContexts, ["qemu:dirty-bitmap:s1"]);
  const old = registry.open("web@s1") as ExportHandle;
  assert.equal(await readByte(old, 0), 1);
  assert.equal(await readByte(disk, 0), 2);
  assert.deepEqual(await status(disk, "qemu:dirty-bitmap:s1", 16 * MiB), [
    { length: 64 * 1024, flags: 1 },
    { length: 8 * MiB - 64 * 1024, flags: 0 },
    { length: 64 * 1024, flags: 1 },
    { length: 8 * MiB - 64 * 1024, flags: 0 },
  ]);

  // Snapshot delete is refused while exported.
  await assert.rejects(registry.snapshotDelete("web", "s1"), isError("DISK_BUSY", /exported/));
  old.release();

  const clone = await registry.clone("web", "s1", "web2");
  assert.equal(clone.file, "pools/default/web.vdisk", "the clone lives in the same image file");
  assert.deepEqual(registry.lookup("web2")?.metaContexts, ["qemu:dirty-bitmap:web@s1"]);
  await assert.rejects(registry.clone("web", "s1", "web"), isError("DISK_EXISTS"));
  await assert.rejects(registry.clone("web", "nope", "x"), isError("UNKNOWN_SNAPSHOT"));

  // Rollback is refused while the disk has a client.
  await assert.rejects(registry.rollback("web", "s1"), isError("DISK_BUSY", /client connection/));
  disk.release();
  await registry.rollback("web", "s1");
  const again = registry.open("web") as ExportHandle;
  assert.equal(await readByte(again, 0), 1);
  assert.equal(await readByte(again, 8 * MiB), 0);
  again.release();

  // Deleting web keeps web@s1, which web2 is built on.
  const deleted = await registry.delete("web");
  assert.deepEqual(deleted.snapshotsKept, [{ name: "web@s1", neededBy: ["web2"] }]);
  assert.equal(deleted.imageRemoved, false);
  assert.ok(registry.lookup("web@s1"), "the kept snapshot is still exported");
  assert.equal((await registry.check("web2")).ok, true);
  await registry.closeAll();

  // Reload: the family reopens from the catalog.
  const reloaded = await DiskRegistry.open(home);
  const tree = await reloaded.tree("web2");
  assert.deepEqual(
    tree.roots.map((root) => [root.name, root.children.map((child) => child.name)]),
    [["web@s1", ["web2"]]],
  );
  const last = await reloaded.delete("web2");
  assert.deepEqual([last.snapshotsDeleted, last.imageRemoved], [["web@s1"], true]);
  assert.ok(!fs.existsSync(path.join(home, "pools/default/web.vdisk")));
  await reloaded.closeAll();
});

test("a head the catalog does not list (a clone cut short) is removed at load", async () => {
  const home = tempHome();
  const logs: string[] = [];
  const registry = await DiskRegistry.open(home);
  await registry.create("base", 4 * MiB);
  await registry.snapshotCreate("base", "s");
  await registry.clone("base", "s", "orphan");
  await registry.closeAll();
  const catalog = loadCatalog(home);
  saveCatalog(home, { ...catalog, disks: catalog.disks.filter((disk) => disk.name !== "orphan") });

  const reloaded = await DiskRegistry.open(home, { log: (message) => logs.push(message) });
  assert.deepEqual(reloaded.names(), ["base"]);
  assert.ok(
    logs.some((line) => /removing disk orphan/.test(line)),
    logs.join("\n"),
  );
  assert.equal((await reloaded.tree("base")).disks.length, 1);
  // The name is free again.
  await reloaded.clone("base", "s", "orphan");
  assert.equal((await reloaded.check("base")).ok, true);
  await reloaded.closeAll();
});

test("raw disks refuse snapshot commands with WRONG_FORMAT", async () => {
  const home = tempHome();
  const registry = await DiskRegistry.open(home);
  await registry.create("plain", 4 * MiB, { format: "raw" });
  await assert.rejects(registry.snapshotCreate("plain", "s"), isError("WRONG_FORMAT"));
  await assert.rejects(registry.tree("plain"), isError("WRONG_FORMAT"));
  assert.equal(registry.lookup("plain")?.metaContexts, undefined);
  assert.deepEqual(await registry.delete("plain"), { deleted: "plain" });
  await registry.closeAll();
});
