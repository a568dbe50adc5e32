/**
 * The catalog: the list of disks of one home, in `<home>/catalog.json`.
 *
 *   {"version":1,"disks":[{"name":"default","size":8589934592,"format":"vdisk","pool":"default",
 *                          "file":"pools/default/default.vdisk","created":"2025-…Z","readOnly":false}]}
 *
 * Formats: "raw" (the file is the disk, byte for byte) and "vdisk" (the file is a vdisk image, see
 * src/image; the disk is the image's head of the same name). One vdisk image holds a whole family — a disk,
 * its snapshots and the disks cloned from them — so several vdisk records may name the same file; a raw
 * file belongs to exactly one disk.
 *
 * It is the only record of which disks exist. It is rewritten whole and atomically (temp file, fsync,
 * rename, fsync of the directory), so a crash leaves the old or the new catalog, never a mix. Its content is
 * untrusted on load: every field is checked, and a file path must stay inside the home.
 *
 * Disk names: [A-Za-z0-9][A-Za-z0-9._-]*, at most limits.diskNameBytesMax bytes; '@' is reserved for
 * DISK@SNAPSHOT names. Snapshot names follow the same rules.
 */
import * as fs from "node:fs";
import * as path from "node:path";
import { VdiskError } from "../errors";
import { diskNameBytesMax } from "../limits";
import { checkDiskSize } from "../util/size";
import { type EngineSettings, checkEngineSettings } from "../engine/request-engine";
import { parseLatencyModel } from "../devices/latency-device";
import { writeFileAtomic } from "./home";
import {
  type DiskPin,
  type DiskPriority,
  type PoolRecord,
  checkPins,
  checkPoolRecord,
  validatePriority,
} from "../tier/pools";

export const catalogVersion = 1;

export type DiskFormat = "raw" | "vdisk";
export const diskFormats: readonly DiskFormat[] = ["raw", "vdisk"];

export interface DiskRecord {
  name: string;
  /** Bytes; the device's size is the truth when both disagree after a crash during resize. */
  size: number;
  format: DiskFormat;
  pool: string;
  /** Relative to the home, e.g. "pools/default/web.raw" or, shared by a family, "pools/default/web.vdisk". */
  file: string;
  /** ISO 8601. */
  created: string;
  readOnly: boolean;
  /** Request-engine settings that differ from the defaults (`vdisk set`); absent = all defaults. */
  engine?: Partial<EngineSettings>;
  /**
   * A latency model the disk's device is wrapped in (`vdisk set --emulate`, src/devices/latency-device.ts):
   * "hdd", "ssd:channels=4", ... For benchmarks and tests on machines without such disks; absent = none.
   */
  emulate?: string;
  /** `vdisk set --priority`; absent = normal. */
  priority?: DiskPriority;
  /** `vdisk set --pin`: ranges of the disk that stay on one device class (src/tier/pools.ts). */
  pins?: DiskPin[];
}

export interface Catalog {
  version: number;
  disks: DiskRecord[];
  /** Pools other than an implicit default (`vdisk pool create`); the default pool is listed once changed. */
  pools?: PoolRecord[];
}

const namePattern = /^[A-Za-z0-9][A-Za-z0-9._-]*$/;
const nameHint = `use letters, digits, '.', '_' and '-', starting with a letter or digit, at most ${diskNameBytesMax} bytes`;

/** Throw BAD_NAME unless `name` is a valid disk name (or, with what = "snapshot", snapshot name). */
export function validateDiskName(name: unknown, what: "disk" | "snapshot" = "disk"): string {
  if (typeof name !== "string" || name === "") {
    throw new VdiskError("BAD_NAME", `a ${what} name is required`, { hint: nameHint });
  }
  if (name.includes("@")) {
    throw new VdiskError("BAD_NAME", `"${name}" contains '@', which is reserved for DISK@SNAPSHOT names`, {
      hint: nameHint,
    });
  }
  if (Buffer.byteLength(name) > diskNameBytesMax) {
    throw new VdiskError("BAD_NAME", `the ${what} name is longer than ${diskNameBytesMax} bytes`, {
      hint: nameHint,
    });
  }
  if (!namePattern.test(name)) {
    throw new VdiskError("BAD_NAME", `"${name}" is not a valid ${what} name`, { hint: nameHint });
  }
  return name;
}

/** A snapshot's full name, as NBD exports and the CLI spell it. */
export function snapshotName(disk: string, snapshot: string): string {
  return `${disk}@${snapshot}`;
}

/** "DISK@SNAP" → both parts, validated; BAD_NAME (with the form in the hint) otherwise. */
export function parseSnapshotName(text: string): { disk: string; snapshot: string } {
  const at = text.indexOf("@");
  if (at < 0) {
    throw new VdiskError("BAD_NAME", `"${text}" does not name a snapshot`, {
      hint: "name a snapshot as DISK@SNAPSHOT, e.g. web@before-upgrade (vdisk snapshot list DISK shows them)",
    });
  }
  const disk = validateDiskName(text.slice(0, at));
  const snapshot = validateDiskName(text.slice(at + 1), "snapshot");
  return { disk, snapshot };
}

export function emptyCatalog(): Catalog {
  return { version: catalogVersion, disks: [] };
}

/** Load `<home>/catalog.json`; a missing file is an empty catalog. */
export function loadCatalog(home: string): Catalog {
  const file = path.join(home, "catalog.json");
  let text: string;
  try {
    text = fs.readFileSync(file, "utf8");
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ENOENT") return emptyCatalog();
    throw new VdiskError("IO_ERROR", `cannot read ${file}`, { cause: err });
  }
  let parsed: unknown;
  try {
    parsed = JSON.parse(text);
  } catch (err) {
    throw corrupt(file, "it is not valid JSON", err);
  }
  return checkCatalog(parsed, file, home);
}

function corrupt(file: string, why: string, cause?: unknown): VdiskError {
  return new VdiskError("CORRUPT", `the catalog ${file} is damaged: ${why}`, {
    cause,
    hint: "restore it from a backup, or fix the entry by hand (the disk files are in pools/)",
  });
}

function checkCatalog(parsed: unknown, file: string, home: string): Catalog {
  const record = parsed as { version?: unknown; disks?: unknown; pools?: unknown } | null;
  if (record === null || typeof record !== "object") throw corrupt(file, "it is not an object");
  if (record.version !== catalogVersion) throw corrupt(file, `unknown version ${String(record.version)}`);
  if (!Array.isArray(record.disks)) throw corrupt(file, '"disks" is not a list');
  const seen = new Set<string>();
  const files = new Map<string, DiskFormat>();
  const disks = record.disks.map((entry: unknown, index: number) => {
    const disk = checkRecord(entry, file, home, index);
    if (seen.has(disk.name)) throw corrupt(file, `disk "${disk.name}" is listed twice`);
    seen.add(disk.name);
    // Only the disks of one vdisk image share a file.
    const key = path.posix.normalize(disk.file);
    const owner = files.get(key);
    if (owner !== undefined && (owner === "raw" || disk.format === "raw")) {
      throw corrupt(file, `disk "${disk.name}": its file ${disk.file} belongs to another disk`);
    }
    files.set(key, disk.format);
    return disk;
  });
  let pools: PoolRecord[] | undefined;
  if (record.pools !== undefined) {
    if (!Array.isArray(record.pools)) throw corrupt(file, '"pools" is not a list');
    const names = new Set<string>();
    pools = record.pools.map((entry: unknown, index: number) => {
      let pool: PoolRecord;
      try {
        pool = checkPoolRecord(entry);
      } catch (err) {
        throw corrupt(file, `pool #${index + 1}: ${(err as Error).message}`, err);
      }
      if (names.has(pool.name)) throw corrupt(file, `pool "${pool.name}" is listed twice`);
      names.add(pool.name);
      return pool;
    });
  }
  return pools === undefined ? { version: catalogVersion, disks } : { version: catalogVersion, disks, pools };
}

function checkRecord(entry: unknown, file: string, home: string, index: number): DiskRecord {
  const where = `disk #${index + 1}`;
  if (entry === null || typeof entry !== "object") throw corrupt(file, `${where} is not an object`);
  const disk = entry as Record<string, unknown>;
  try {
    validateDiskName(disk.name);
    if (typeof disk.size !== "number") throw new Error("size is not a number");
    checkDiskSize(disk.size);
  } catch (err) {
    throw corrupt(file, `${where}: ${(err as Error).message}`, err);
  }
  if (disk.format !== "raw" && disk.format !== "vdisk") {
    throw corrupt(file, `${where}: unknown format ${String(disk.format)}`);
  }
  if (
    typeof disk.pool !== "string" ||
    typeof disk.created !== "string" ||
    typeof disk.readOnly !== "boolean"
  ) {
    throw corrupt(file, `${where}: pool, created or readOnly missing`);
  }
  if (typeof disk.file !== "string" || !isInside(home, disk.file)) {
    throw corrupt(file, `${where}: its file must be a path inside the home`);
  }
  const record: DiskRecord = {
    name: disk.name as string,
    size: disk.size,
    format: disk.format,
    pool: disk.pool,
    file: disk.file,
    created: disk.created,
    readOnly: disk.readOnly,
  };
  if (disk.engine !== undefined) {
    try {
      checkEngineSettings(disk.engine);
    } catch (err) {
      throw corrupt(file, `${where}: engine settings: ${(err as Error).message}`, err);
    }
    record.engine = { ...(disk.engine as Partial<EngineSettings>) };
  }
  if (disk.emulate !== undefined) {
    try {
      if (typeof disk.emulate !== "string") throw new Error("not a string");
      parseLatencyModel(disk.emulate);
    } catch (err) {
      throw corrupt(file, `${where}: emulate: ${(err as Error).message}`, err);
    }
    record.emulate = disk.emulate;
  }
  try {
    if (disk.priority !== undefined) record.priority = validatePriority(disk.priority);
    if (disk.pins !== undefined) record.pins = checkPins(disk.pins);
  } catch (err) {
    throw corrupt(file, `${where}: ${(err as Error).message}`, err);
  }
  return record;
}

/** True if `relative` is a relative path that resolves strictly inside `home`. */
export function isInside(home: string, relative: string): boolean {
  if (relative === "" || path.isAbsolute(relative)) return false;
  const full = path.resolve(home, relative);
  return full.startsWith(path.resolve(home) + path.sep);
}

/** Replace `<home>/catalog.json` atomically. */
export function saveCatalog(home: string, catalog: Catalog): void {
  const content =
    catalog.pools === undefined
      ? { version: catalogVersion, disks: catalog.disks }
      : { version: catalogVersion, disks: catalog.disks, pools: catalog.pools };
  const text = JSON.stringify(content, null, 2) + "\n";
  writeFileAtomic(path.join(home, "catalog.json"), text);
}
