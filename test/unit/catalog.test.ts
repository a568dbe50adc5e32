/**
 * The catalog and the registry above it: name validation, atomic save and reload, damaged catalogs refused
 * with CORRUPT, the home lock, and the registry's create/resize/delete rules (DISK_BUSY, --force, --shrink)
 * on in-memory devices, so no native addon or NBD server is needed.
 */
import { after, test } from "node:test";
import * as assert from "node:assert/strict";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import { spawnSync } from "node:child_process";
import { VdiskError, type ErrorCode } from "../../src/errors";
import { GiB, MiB, diskNameBytesMax } from "../../src/limits";
import { MemoryDevice } from "../../src/devices/memory-device";
import {
  type Catalog,
  type DiskRecord,
  loadCatalog,
  saveCatalog,
  validateDiskName,
} from "../../src/daemon/catalog";
import { acquireLock, homePaths, prepareHome, releaseLock } from "../../src/daemon/home";
import { type PoolRecord, defaultPool, parsePins } from "../../src/tier/pools";
import { parseSize } from "../../src/util/size";
import { type DeviceOpener, DiskRegistry } from "../../src/daemon/registry";

const tempHomes: string[] = [];
after(() => {
  for (const home of tempHomes) fs.rmSync(home, { recursive: true, force: true });
});

function tempHome(): string {
  const home = fs.mkdtempSync(path.join(os.tmpdir(), "vdisk-catalog-"));
  tempHomes.push(home);
  return home;
}

function isError(code: ErrorCode, pattern?: RegExp): (err: unknown) => boolean {
  return (err: unknown) => {
    assert.ok(err instanceof VdiskError, `expected VdiskError, got ${String(err)}`);
    assert.equal(err.code, code);
    if (pattern) assert.match(err.message, pattern);
    return true;
  };
}

function record(name: string, size = GiB): DiskRecord {
  return {
    name,
    size,
    format: "raw",
    pool: "default",
    file: `pools/default/${name}.raw`,
    created: new Date(0).toISOString(),
    readOnly: false,
  };
}

test("disk names: letters, digits, . _ -, starting alphanumeric, bounded, no '@'", () => {
  for (const name of ["default", "web-01", "a", "Vm_2.disk", "0", "x".repeat(diskNameBytesMax)]) {
    assert.equal(validateDiskName(name), name);
  }
  const bad = [
    "",
    ".hidden",
    "-x",
    "_x",
    "a/b",
    "..",
    "a b",
    "é",
    "a@snap",
    "x".repeat(diskNameBytesMax + 1),
  ];
  for (const name of bad) assert.throws(() => validateDiskName(name), isError("BAD_NAME"), name);
  assert.throws(() => validateDiskName("db@monday"), isError("BAD_NAME", /reserved/));
  assert.throws(() => validateDiskName(42), isError("BAD_NAME"));
});

test("a missing catalog is empty; save then load gives the same disks", () => {
  const home = tempHome();
  assert.deepEqual(loadCatalog(home).disks, []);
  const catalog: Catalog = { version: 1, disks: [record("default", 8 * GiB), record("web", 20 * GiB)] };
  saveCatalog(home, catalog);
  assert.deepEqual(loadCatalog(home), catalog);
});

test("saving replaces the catalog by rename and leaves no temporary file", () => {
  const home = tempHome();
  saveCatalog(home, { version: 1, disks: [record("a")] });
  const before = fs.statSync(path.join(home, "catalog.json")).ino;
  saveCatalog(home, { version: 1, disks: [record("a"), record("b")] });
  const after = fs.statSync(path.join(home, "catalog.json")).ino;
  assert.notEqual(before, after, "a new inode: the file was renamed into place, not rewritten");
  assert.deepEqual(fs.readdirSync(home), ["catalog.json"]);
  assert.deepEqual(
    loadCatalog(home).disks.map((disk) => disk.name),
    ["a", "b"],
  );
});

function pool(name: string): PoolRecord {
  return defaultPool(name);
}

test("pools and tiering settings round-trip through the catalog", () => {
  const home = tempHome();
  const tiered = pool("tiered");
  tiered.policy = "heat";
  tiered.devices.push({ id: 3, class: "ssd", path: "/mnt/nvme", capacity: 20 * GiB, emulate: "ssd" });
  const disk: DiskRecord = {
    ...record("db"),
    pool: "tiered",
    priority: "realtime",
    pins: [{ class: "ssd", start: 0, end: 4 * GiB }],
  };
  const catalog: Catalog = { version: 1, disks: [disk], pools: [pool("default"), tiered] };
  saveCatalog(home, catalog);
  assert.deepEqual(loadCatalog(home), catalog);
  // A catalog written before pools existed loads without them.
  saveCatalog(home, { version: 1, disks: [record("a")] });
  assert.equal(loadCatalog(home).pools, undefined);
});

test("--pin arguments: a class, ranges, none; bad ones say the form", () => {
  assert.deepEqual(parsePins(["ssd"], parseSize), [{ class: "ssd", start: 0, end: null }]);
  assert.deepEqual(parsePins(["ssd:0-4G", "hdd:4G-8G"], parseSize), [
    { class: "ssd", start: 0, end: 4 * GiB },
    { class: "hdd", start: 4 * GiB, end: 8 * GiB },
  ]);
  assert.deepEqual(parsePins(["none"], parseSize), []);
  assert.throws(() => parsePins(["ssd:4G-1G"], parseSize), isError("INVALID_ARGUMENT", /no valid range/));
  assert.throws(() => parsePins(["SSD"], parseSize), isError("INVALID_ARGUMENT", /not a valid device class/));
});

test("a damaged catalog is refused with CORRUPT and a hint", () => {
  const home = tempHome();
  const file = path.join(home, "catalog.json");
  const cases: [string, RegExp][] = [
    ["{not json", /not valid JSON/],
    ["[]", /version/],
    [JSON.stringify({ version: 2, disks: [] }), /version 2/],
    [JSON.stringify({ version: 1, disks: {} }), /not a list/],
    [JSON.stringify({ version: 1, disks: [record("a"), record("a")] }), /twice/],
    [JSON.stringify({ version: 1, disks: [{ ...record("a"), size: 1000 }] }), /multiple of 512/],
    [JSON.stringify({ version: 1, disks: [{ ...record("a"), name: "a@b" }] }), /reserved/],
    [
      JSON.stringify({ version: 1, disks: [{ ...record("a"), file: "../../etc/passwd" }] }),
      /inside the home/,
    ],
    [JSON.stringify({ version: 1, disks: [{ ...record("a"), file: "/etc/passwd" }] }), /inside the home/],
    [JSON.stringify({ version: 1, disks: [{ ...record("a"), format: "qcow2" }] }), /unknown format/],
    [
      JSON.stringify({ version: 1, disks: [record("a"), { ...record("b"), file: "pools/default/a.raw" }] }),
      /belongs to another disk/,
    ],
    [JSON.stringify({ version: 1, disks: [{ ...record("a"), readOnly: "no" }] }), /readOnly/],
    [JSON.stringify({ version: 1, disks: [{ ...record("a"), priority: "urgent" }] }), /unknown priority/],
    [
      JSON.stringify({ version: 1, disks: [{ ...record("a"), pins: [{ class: "ssd", start: -1 }] }] }),
      /pin start/,
    ],
    [JSON.stringify({ version: 1, disks: [], pools: {} }), /"pools" is not a list/],
    [
      JSON.stringify({ version: 1, disks: [], pools: [{ ...pool("p"), policy: "fast" }] }),
      /unknown placement/,
    ],
    [JSON.stringify({ version: 1, disks: [], pools: [pool("p"), pool("p")] }), /listed twice/],
    [
      JSON.stringify({
        version: 1,
        disks: [],
        pools: [{ ...pool("p"), devices: [{ id: 1, class: "ssd", path: "/x" }] }],
      }),
      /device 0/,
    ],
    [
      JSON.stringify({
        version: 1,
        disks: [],
        pools: [{ ...pool("p"), devices: [...pool("p").devices, { id: 0, class: "ssd", path: "/x" }] }],
      }),
      /repeated device id 0/,
    ],
    [
      JSON.stringify({
        version: 1,
        disks: [],
        pools: [{ ...pool("p"), devices: [{ id: 0, class: "hdd", path: "pools/p", emulate: "tape" }] }],
      }),
      /pool #1/,
    ],
  ];
  for (const [text, pattern] of cases) {
    fs.writeFileSync(file, text);
    assert.throws(() => loadCatalog(home), isError("CORRUPT", pattern), text);
    assert.throws(
      () => loadCatalog(home),
      (err: unknown) => err instanceof VdiskError && err.hint !== undefined,
    );
  }
});

test("prepareHome creates the layout once and checks the version after", () => {
  const paths = homePaths(path.join(tempHome(), "home"));
  assert.deepEqual(prepareHome(paths), { created: true });
  assert.ok(fs.statSync(paths.defaultPoolDir).isDirectory());
  assert.equal(fs.statSync(paths.runDir).mode & 0o777, 0o700);
  assert.deepEqual(prepareHome(paths), { created: false });
  fs.writeFileSync(paths.versionFile, JSON.stringify({ format: "vdisk-home", version: 99 }));
  assert.throws(() => prepareHome(paths), isError("CORRUPT", /version 99/));
});

test("the home lock: a live owner refuses, a dead owner's lock is taken over", () => {
  const paths = homePaths(tempHome());
  prepareHome(paths);
  acquireLock(paths);
  assert.equal(fs.readFileSync(paths.lockFile, "utf8").trim(), String(process.pid));
  releaseLock(paths);
  assert.ok(!fs.existsSync(paths.lockFile));

  fs.writeFileSync(paths.lockFile, `${process.ppid}\n`); // a live process that is not us
  assert.throws(() => acquireLock(paths), isError("HOME_LOCKED", new RegExp(`pid ${process.ppid}`)));

  const dead = spawnSync(process.execPath, [
    "-e",
    "process.stdout.write(String(process.pid))",
  ]).stdout.toString();
  fs.writeFileSync(paths.lockFile, `${dead}\n`);
  acquireLock(paths);
  assert.equal(fs.readFileSync(paths.lockFile, "utf8").trim(), String(process.pid));
  releaseLock(paths);
});

/** Memory devices behind the registry; a marker file stands in for the disk file. */
function memoryOpener(): DeviceOpener {
  const sizes = new Map<string, number>();
  return async (file, options) => {
    if (options.create !== undefined) {
      fs.writeFileSync(file, "", { flag: "wx" });
      sizes.set(file, options.create);
    }
    return new MemoryDevice(sizes.get(file) ?? 0, { readOnly: options.readOnly });
  };
}

async function memoryRegistry(): Promise<{ registry: DiskRegistry; home: string; opener: DeviceOpener }> {
  const home = tempHome();
  prepareHome(homePaths(home));
  const opener = memoryOpener();
  return { registry: await DiskRegistry.open(home, { openDevice: opener }), home, opener };
}

test("registry: create, list, export lookup, persist and reload", async () => {
  const { registry, home, opener } = await memoryRegistry();
  const web = await registry.create("web", 20 * MiB, { format: "raw" });
  assert.equal(web.size, 20 * MiB);
  assert.equal(web.file, "pools/default/web.raw");
  assert.equal(web.format, "raw");
  await registry.create("default", 8 * MiB, { format: "raw" });
  await assert.rejects(registry.create("web", MiB), isError("DISK_EXISTS"));
  await assert.rejects(registry.create("bad name", MiB), isError("BAD_NAME"));
  await assert.rejects(registry.create("odd", 1000), isError("BAD_SIZE"));
  assert.deepEqual(registry.list().sort(), ["default", "web"]);
  assert.equal(registry.lookup("")?.name, "default", 'export "" is the default disk');
  assert.equal(registry.lookup("web")?.size, 20 * MiB);
  assert.equal(registry.lookup("nope"), null);
  assert.equal(registry.open("nope"), null);
  await assert.rejects(registry.info("nope"), isError("UNKNOWN_DISK", /no disk named nope/));
  await registry.closeAll();

  const reloaded = await DiskRegistry.open(home, { openDevice: opener });
  assert.deepEqual(reloaded.list().sort(), ["default", "web"]);
  assert.equal((await reloaded.info("web")).size, 20 * MiB);
  await reloaded.closeAll();
});

test("registry: resize grows anytime, shrinks only when asked, and clients see the new size", async () => {
  const { registry } = await memoryRegistry();
  await registry.create("d", 4 * MiB);
  const handle = registry.open("d");
  assert.ok(handle);
  assert.equal((await registry.resize("d", 8 * MiB)).size, 8 * MiB);
  assert.equal(handle.device.size, 8 * MiB, "the connected client's device grew");
  await assert.rejects(registry.resize("d", 2 * MiB), isError("BAD_SIZE", /smaller/));
  assert.equal((await registry.resize("d", 2 * MiB, true)).size, 2 * MiB);
  assert.equal(handle.device.size, 2 * MiB);
  handle.release();
  await registry.closeAll();
});

test("registry: delete refuses a disk in use unless forced; force disconnects the clients", async () => {
  const { registry, home } = await memoryRegistry();
  await registry.create("busy", MiB);
  const handles = [registry.open("busy"), registry.open("busy")];
  assert.equal((await registry.info("busy")).connections, 2);
  await assert.rejects(registry.delete("busy"), (err: unknown) => {
    assert.ok(err instanceof VdiskError && err.code === "DISK_BUSY");
    assert.match(err.hint ?? "", /--force/);
    return true;
  });
  const disconnected: string[] = [];
  registry.setDisconnector({
    disconnectExport: (name) => {
      disconnected.push(name);
      for (const handle of handles) handle?.release();
    },
  });
  await registry.delete("busy", true);
  assert.deepEqual(disconnected, ["busy"]);
  assert.deepEqual(registry.list(), []);
  assert.ok(!fs.existsSync(path.join(home, "pools/default/busy.vdisk")), "the image file is gone");
  assert.deepEqual(loadCatalog(home).disks, []);
  await registry.closeAll();
});

test("registry: a disk pinned by a job cannot be deleted or resized", async () => {
  const { registry } = await memoryRegistry();
  await registry.create("job", MiB);
  registry.pin("job", 7, "export");
  await assert.rejects(registry.delete("job", true), isError("DISK_BUSY", /job 7/));
  await assert.rejects(registry.resize("job", 2 * MiB), isError("DISK_BUSY", /job 7/));
  registry.unpin("job", 7);
  await registry.delete("job");
  await registry.closeAll();
});
