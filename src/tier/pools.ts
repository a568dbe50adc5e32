/**
 * Pools of devices: what a pool is, how it is written in the catalog, and the checks on it.
 *
 * A pool is a set of devices, each a directory on some storage (a mounted SSD, an HDD, a RAID set...) with
 * a class — `ssd`, `hdd`, or any name — and optionally a capacity the pool may place on it. Device 0 is
 * the pool's own directory inside the home (`pools/NAME/`): it holds every image file (superblocks, index,
 * layer table, and any data not placed elsewhere) and raw disks. Devices 1..63 hold data only: each image
 * of the pool keeps one sparse file per device it has data on, named like the image file. Which device
 * an extent is on is written in the index unit that maps it (src/image/format.ts), so the image index is
 * the content mapping table.
 *
 *   {"name":"fast","policy":"heat","fastClass":"ssd","migrateBytesPerSecond":67108864,
 *    "devices":[{"id":0,"class":"hdd","path":"pools/fast","emulate":"hdd"},
 *               {"id":1,"class":"ssd","path":"/mnt/nvme/vdisk","capacity":21474836480}]}
 *
 * A device may be emulated (`emulate`: a latency model of src/devices/latency-device.ts), for tests and
 * benchmarks on machines without such disks: every file of the pool on it shares one modelled head or set
 * of channels (src/devices/physical-device.ts).
 *
 * Policies (src/tier/placement.ts): static (data stays where it is written: next to its neighbour, else on
 * device 0), heat (the hottest extents on the fast class, within its capacity), profile (small random
 * writes to the fast class, large sequential ones to the others). Per disk: a pin (the disk or a byte range
 * of it stays on one class) and a priority (realtime, normal, background).
 */
import * as path from "node:path";
import { VdiskError } from "../errors";
import { parseLatencyModel } from "../devices/latency-device";
import { DEVICES_MAX } from "../image/format";

export const poolPolicies = ["static", "heat", "profile"] as const;
export type PoolPolicy = (typeof poolPolicies)[number];
export const diskPriorities = ["realtime", "normal", "background"] as const;
export type DiskPriority = (typeof diskPriorities)[number];

/** Default migration rate: 64 MiB/s, a fraction of an HDD's sequential rate. */
export const migrateBytesPerSecondDefault = 64 * 1024 * 1024;
/** Migration rate bounds: 1 MiB/s .. 16 GiB/s. */
export const migrateBytesPerSecondMin = 1024 * 1024;
export const migrateBytesPerSecondMax = 16 * 1024 * 1024 * 1024;
export const fastClassDefault = "ssd";
export const defaultDeviceClass = "default";

export interface PoolDevice {
  /** 1..63 for added devices; 0 is the pool's own directory. Stable: the index names devices by it. */
  id: number;
  class: string;
  /** A directory: relative to the home (device 0) or absolute. */
  path: string;
  /** Bytes the pool may place on it; absent = no limit. */
  capacity?: number;
  /** A latency model the device is emulated with. */
  emulate?: string;
}

export interface PoolRecord {
  name: string;
  policy: PoolPolicy;
  /** The class the heat and profile policies fill first. */
  fastClass: string;
  migrateBytesPerSecond: number;
  devices: PoolDevice[];
}

/** A pin: the disk's data in [start, end) (bytes; end null = to the end of the disk) stays on `class`. */
export interface DiskPin {
  class: string;
  start: number;
  end: number | null;
}

const classPattern = /^[a-z][a-z0-9_-]{0,31}$/;
const poolNamePattern = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;

export function validatePoolName(name: unknown): string {
  if (typeof name !== "string" || !poolNamePattern.test(name)) {
    throw new VdiskError("BAD_NAME", `"${String(name)}" is not a valid pool name`, {
      hint: "use letters, digits, '.', '_' and '-', starting with a letter or digit, at most 64 bytes",
    });
  }
  return name;
}

export function validateClass(name: unknown): string {
  if (typeof name !== "string" || !classPattern.test(name)) {
    throw new VdiskError("INVALID_ARGUMENT", `"${String(name)}" is not a valid device class`, {
      hint: "a class is a lower-case name such as ssd, hdd or nvme (letters, digits, '_', '-'; at most 32)",
    });
  }
  return name;
}

export function validatePolicy(policy: unknown): PoolPolicy {
  if (!(poolPolicies as readonly unknown[]).includes(policy)) {
    throw new VdiskError("INVALID_ARGUMENT", `unknown placement policy "${String(policy)}"`, {
      hint: `use one of ${poolPolicies.join(", ")}`,
    });
  }
  return policy as PoolPolicy;
}

export function validatePriority(priority: unknown): DiskPriority {
  if (!(diskPriorities as readonly unknown[]).includes(priority)) {
    throw new VdiskError("INVALID_ARGUMENT", `unknown priority "${String(priority)}"`, {
      hint: `use one of ${diskPriorities.join(", ")}`,
    });
  }
  return priority as DiskPriority;
}

export function validateMigrateRate(rate: unknown): number {
  if (
    typeof rate !== "number" ||
    !Number.isSafeInteger(rate) ||
    rate < migrateBytesPerSecondMin ||
    rate > migrateBytesPerSecondMax
  ) {
    throw new VdiskError("INVALID_ARGUMENT", `migration rate ${String(rate)} is out of range`, {
      hint: "give bytes per second between 1M and 16G, e.g. --migrate-rate 64M",
    });
  }
  return rate;
}

/** The pool every home has: its directory, class "default", static placement. */
export function defaultPool(name: string): PoolRecord {
  return {
    name,
    policy: "static",
    fastClass: fastClassDefault,
    migrateBytesPerSecond: migrateBytesPerSecondDefault,
    devices: [{ id: 0, class: defaultDeviceClass, path: path.posix.join("pools", name) }],
  };
}

/** Check an untrusted pool record (the catalog's); throws with the reason. */
export function checkPoolRecord(entry: unknown): PoolRecord {
  if (entry === null || typeof entry !== "object") throw new Error("not an object");
  const pool = entry as Record<string, unknown>;
  const name = validatePoolName(pool.name);
  const policy = validatePolicy(pool.policy);
  const fastClass = validateClass(pool.fastClass);
  const migrateBytesPerSecond = validateMigrateRate(pool.migrateBytesPerSecond);
  if (!Array.isArray(pool.devices) || pool.devices.length === 0 || pool.devices.length > DEVICES_MAX) {
    throw new Error(`pool "${name}": devices must be a list of 1..${DEVICES_MAX}`);
  }
  const ids = new Set<number>();
  const devices = pool.devices.map((raw: unknown): PoolDevice => {
    if (raw === null || typeof raw !== "object") throw new Error(`pool "${name}": a device is not an object`);
    const device = raw as Record<string, unknown>;
    const id = device.id;
    if (typeof id !== "number" || !Number.isInteger(id) || id < 0 || id >= DEVICES_MAX || ids.has(id)) {
      throw new Error(`pool "${name}": bad or repeated device id ${String(id)}`);
    }
    ids.add(id);
    if (typeof device.path !== "string" || device.path === "") {
      throw new Error(`pool "${name}": device ${id} has no path`);
    }
    const checked: PoolDevice = { id, class: validateClass(device.class), path: device.path };
    if (device.capacity !== undefined) {
      if (
        typeof device.capacity !== "number" ||
        !Number.isSafeInteger(device.capacity) ||
        device.capacity < 0
      )
        throw new Error(`pool "${name}": device ${id} has a bad capacity`);
      checked.capacity = device.capacity;
    }
    if (device.emulate !== undefined) {
      if (typeof device.emulate !== "string") throw new Error(`pool "${name}": device ${id} emulate`);
      parseLatencyModel(device.emulate);
      checked.emulate = device.emulate;
    }
    return checked;
  });
  if (!ids.has(0)) throw new Error(`pool "${name}": device 0 (the pool's directory) is missing`);
  devices.sort((a, b) => a.id - b.id);
  return { name, policy, fastClass, migrateBytesPerSecond, devices };
}

/** Check untrusted pins. */
export function checkPins(raw: unknown): DiskPin[] {
  if (!Array.isArray(raw)) throw new Error("pins must be a list");
  return raw.map((entry: unknown): DiskPin => {
    const pin = entry as Record<string, unknown> | null;
    if (pin === null || typeof pin !== "object") throw new Error("a pin is not an object");
    const start = pin.start;
    const end = pin.end;
    if (typeof start !== "number" || !Number.isSafeInteger(start) || start < 0) throw new Error("pin start");
    if (end !== null && (typeof end !== "number" || !Number.isSafeInteger(end) || end <= start))
      throw new Error("pin end");
    return { class: validateClass(pin.class), start, end };
  });
}

/**
 * Parse `--pin` arguments: "CLASS" (the whole disk), "CLASS:START-END" (a byte range, sizes like 1G),
 * or "none" (no pins). `parseSize` is passed in (src/util/size.ts) to keep this module free of the CLI.
 */
export function parsePins(specs: readonly string[], parseSize: (text: string) => number): DiskPin[] {
  if (specs.length === 1 && specs[0] === "none") return [];
  return specs.map((spec) => {
    const colon = spec.indexOf(":");
    if (colon < 0) return { class: validateClass(spec), start: 0, end: null };
    const cls = validateClass(spec.slice(0, colon));
    const range = spec.slice(colon + 1);
    const dash = range.indexOf("-");
    const start = dash < 0 ? NaN : parseSize(range.slice(0, dash));
    const end = dash < 0 ? NaN : parseSize(range.slice(dash + 1));
    if (!(end > start)) {
      throw new VdiskError("INVALID_ARGUMENT", `pin "${spec}" has no valid range`, {
        hint: "pin a range as CLASS:START-END, e.g. ssd:0-4G; or a whole disk as CLASS; or none",
      });
    }
    return { class: cls, start, end };
  });
}
