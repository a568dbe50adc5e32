/**
 * DiskRegistry: the daemon's set of disks, each an open BlockDevice, and the NBD server's ExportProvider.
 *
 * Every disk of the catalog is opened at start (so `lookup`/`open`, which the NBD handshake calls
 * synchronously, never wait). Each disk counts the export handles open on it (one per NBD connection in
 * transmission) and the pins held by jobs (import/export); delete refuses a disk with handles unless forced
 * (then the server is asked to disconnect them and we wait for their release) and always refuses a pinned
 * disk. Mutations (create, delete, resize) run one at a time, so catalog rewrites never interleave.
 *
 * Order of effects, chosen so a crash leaves nothing unaccounted for but at most an orphan file:
 * create = file, then catalog; delete = catalog, then file; resize = device, then catalog (on load the
 * device's size wins over the catalog's).
 */
import * as fs from "node:fs";
import * as path from "node:path";
import { VdiskError, fromSystemError } from "../errors";
import { defaultDiskName, drainTimeoutMs } from "../limits";
import type { BlockDevice } from "../devices/block-device";
import { closeAsync, flushAsync, resizeAsync, usageAsync } from "../devices/promises";
import { FileDevice } from "../devices/file-device";
import type { ExportHandle, ExportProvider, ExportSummary } from "../protocol/nbd/exports";
import { checkDiskSize, formatSize } from "../util/size";
import { type Catalog, type DiskRecord, loadCatalog, saveCatalog, validateDiskName } from "./catalog";
import { defaultPoolName } from "./home";

/** Opens (or, with `create`, creates as a sparse file of that size) a disk's backing device. */
export type DeviceOpener = (
  file: string,
  options: { readOnly: boolean; create?: number },
) => Promise<BlockDevice>;

/** What delete --force needs from the NBD server. */
export interface ExportDisconnector {
  disconnectExport(exportName: string): void;
}

/** A disk as `vdisk info` and the API show it. Paths are relative to the home. */
export interface DiskInfo {
  name: string;
  size: number;
  allocatedBytes: number;
  format: string;
  pool: string;
  file: string;
  created: string;
  readOnly: boolean;
  connections: number;
}

interface OpenDisk {
  record: DiskRecord;
  device: BlockDevice;
  handles: number;
  /** Job id → what the job does, for DISK_BUSY messages. */
  pins: Map<number, string>;
  deleting: boolean;
  onIdle: (() => void)[];
}

export interface RegistryOptions {
  openDevice?: DeviceOpener;
  log?: (message: string) => void;
}

const openFileDevice: DeviceOpener = (file, options) => FileDevice.open(file, options);

export class DiskRegistry implements ExportProvider {
  private readonly disks = new Map<string, OpenDisk>();
  private mutations: Promise<unknown> = Promise.resolve();
  private disconnector: ExportDisconnector | null = null;

  private constructor(
    readonly home: string,
    private readonly openDevice: DeviceOpener,
  ) {}

  /** Load the catalog of `home` and open every disk in it. */
  static async open(home: string, options: RegistryOptions = {}): Promise<DiskRegistry> {
    const registry = new DiskRegistry(home, options.openDevice ?? openFileDevice);
    const catalog = loadCatalog(home);
    try {
      for (const record of catalog.disks) await registry.openRecord(record, options.log);
    } catch (err) {
      await registry.closeAll();
      throw err;
    }
    return registry;
  }

  private async openRecord(record: DiskRecord, log?: (message: string) => void): Promise<void> {
    const file = path.join(this.home, record.file);
    if (!fs.existsSync(file)) {
      throw new VdiskError("CORRUPT", `disk "${record.name}": its file ${record.file} is missing`, {
        hint: `restore ${file}, or remove the disk's entry from ${path.join(this.home, "catalog.json")}`,
      });
    }
    const device = await this.openDevice(file, { readOnly: record.readOnly });
    if (device.size !== record.size) {
      log?.(
        `disk "${record.name}": catalog says ${record.size} bytes, file has ${device.size}; using the file's`,
      );
      record.size = device.size;
    }
    this.disks.set(record.name, { record, device, handles: 0, pins: new Map(), deleting: false, onIdle: [] });
  }

  /** The NBD server, for delete --force. */
  setDisconnector(disconnector: ExportDisconnector): void {
    this.disconnector = disconnector;
  }

  // ---- ExportProvider ----------------------------------------------------------------------------------

  list(): string[] {
    return this.names();
  }

  lookup(name: string): ExportSummary | null {
    const disk = this.live(name === "" ? defaultDiskName : name);
    if (!disk) return null;
    return {
      name: disk.record.name,
      description: describe(disk),
      size: disk.device.size,
      readOnly: readOnly(disk),
      capabilities: disk.device.capabilities,
    };
  }

  open(name: string): ExportHandle | null {
    const disk = this.live(name === "" ? defaultDiskName : name);
    if (!disk) return null;
    disk.handles += 1;
    let released = false;
    return {
      name: disk.record.name,
      description: describe(disk),
      device: disk.device,
      readOnly: readOnly(disk),
      release: () => {
        if (released) return;
        released = true;
        this.releaseHandle(disk);
      },
    };
  }

  private releaseHandle(disk: OpenDisk): void {
    disk.handles -= 1;
    if (disk.handles > 0) return;
    for (const resolve of disk.onIdle.splice(0)) resolve();
  }

  // ---- Queries -----------------------------------------------------------------------------------------

  names(): string[] {
    return [...this.disks.values()].filter((disk) => !disk.deleting).map((disk) => disk.record.name);
  }

  get size(): number {
    return this.names().length;
  }

  /** Open connections over all disks. */
  connections(): number {
    let total = 0;
    for (const disk of this.disks.values()) total += disk.handles;
    return total;
  }

  /** The device of a disk (for jobs); UNKNOWN_DISK if there is none. */
  device(name: string): BlockDevice {
    return this.get(name).device;
  }

  async info(name: string): Promise<DiskInfo> {
    return infoOf(this.get(name));
  }

  async listInfo(): Promise<DiskInfo[]> {
    const disks = [...this.disks.values()].filter((disk) => !disk.deleting);
    return Promise.all(disks.map(infoOf));
  }

  private live(name: string): OpenDisk | null {
    const disk = this.disks.get(name);
    return disk && !disk.deleting ? disk : null;
  }

  private get(name: string): OpenDisk {
    const disk = this.live(name);
    if (!disk) {
      throw new VdiskError("UNKNOWN_DISK", `no disk named ${name} (vdisk list shows the disks)`, {
        hint: `to make one: vdisk create ${name} --size SIZE`,
      });
    }
    return disk;
  }

  // ---- Pins (jobs) ---------------------------------------------------------------------------------------

  /** Keep a disk from being deleted or resized while job `jobId` works on it. */
  pin(name: string, jobId: number, what: string): void {
    this.get(name).pins.set(jobId, what);
  }

  unpin(name: string, jobId: number): void {
    this.disks.get(name)?.pins.delete(jobId);
  }

  private refusePinned(disk: OpenDisk, action: string): void {
    const first = disk.pins.entries().next();
    if (first.done) return;
    const [jobId, what] = first.value;
    throw new VdiskError(
      "DISK_BUSY",
      `cannot ${action} disk ${disk.record.name}: job ${jobId} (${what}) uses it`,
      {
        hint: `wait for the job to finish (vdisk status, or GET /v1/jobs/${jobId})`,
      },
    );
  }

  // ---- Mutations -----------------------------------------------------------------------------------------

  private exclusive<T>(work: () => Promise<T>): Promise<T> {
    const result = this.mutations.then(work, work);
    this.mutations = result.catch(() => undefined);
    return result;
  }

  /** Create a thin raw disk. With `pinFor`, the new disk is pinned for that job before anyone can delete it. */
  async create(name: string, size: number, pinFor?: { jobId: number; what: string }): Promise<DiskInfo> {
    validateDiskName(name);
    checkDiskSize(size);
    return this.exclusive(async () => {
      const disk = await this.createDisk(name, size);
      if (pinFor) disk.pins.set(pinFor.jobId, pinFor.what);
      return infoOf(disk);
    });
  }

  private async createDisk(name: string, size: number): Promise<OpenDisk> {
    if (this.disks.has(name)) {
      throw new VdiskError("DISK_EXISTS", `a disk named ${name} already exists`, {
        hint: "choose another name, or delete the old disk first (vdisk delete NAME)",
      });
    }
    const relative = path.posix.join("pools", defaultPoolName, `${name}.raw`);
    const file = path.join(this.home, relative);
    if (fs.existsSync(file)) {
      throw new VdiskError("DISK_EXISTS", `the file ${relative} exists but belongs to no disk`, {
        hint: `move ${file} away (it may hold a disk deleted during a crash), then create the disk again`,
      });
    }
    const device = await this.openDevice(file, { readOnly: false, create: size });
    const record: DiskRecord = {
      name,
      size: device.size,
      format: "raw",
      pool: defaultPoolName,
      file: relative,
      created: new Date().toISOString(),
      readOnly: false,
    };
    const disk: OpenDisk = { record, device, handles: 0, pins: new Map(), deleting: false, onIdle: [] };
    this.disks.set(name, disk);
    try {
      this.save();
    } catch (err) {
      this.disks.delete(name);
      await closeAsync(device).catch(() => undefined);
      fs.rmSync(file, { force: true });
      throw err;
    }
    return disk;
  }

  /** Delete a disk and its file. Connected clients: DISK_BUSY, unless `force` disconnects them. */
  delete(name: string, force = false): Promise<void> {
    return this.exclusive(async () => {
      const disk = this.get(name);
      this.refusePinned(disk, "delete");
      if (disk.handles > 0 && !force) {
        throw new VdiskError("DISK_BUSY", `disk ${name} has ${disk.handles} client connection(s)`, {
          hint: `disconnect its clients first, or disconnect them and delete with: vdisk delete ${name} --force`,
        });
      }
      disk.deleting = true;
      try {
        await this.disconnectAll(disk);
        this.save();
      } catch (err) {
        disk.deleting = false;
        throw err;
      }
      this.disks.delete(name);
      await closeAsync(disk.device).catch(() => undefined);
      fs.rmSync(path.join(this.home, disk.record.file), { force: true });
    });
  }

  private async disconnectAll(disk: OpenDisk): Promise<void> {
    if (disk.handles === 0) return;
    // Wait first: the server may release the handles synchronously inside disconnectExport.
    const idle = new Promise<void>((resolve) => disk.onIdle.push(resolve));
    this.disconnector?.disconnectExport(disk.record.name);
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<"timeout">(
      (resolve) => (timer = setTimeout(() => resolve("timeout"), drainTimeoutMs)),
    );
    const outcome = await Promise.race([idle, timeout]);
    clearTimeout(timer);
    if (outcome === "timeout") {
      throw new VdiskError(
        "DISK_BUSY",
        `the clients of disk ${disk.record.name} did not disconnect in time`,
        {
          hint: "try again; if it persists, stop the clients (or the daemon) first",
        },
      );
    }
  }

  /** Change a disk's size; shrinking needs `shrink` (the tail is discarded). Connected clients see it too. */
  async resize(name: string, size: number, shrink = false): Promise<DiskInfo> {
    checkDiskSize(size);
    return this.exclusive(async () => {
      const disk = this.get(name);
      this.refusePinned(disk, "resize");
      if (readOnly(disk)) {
        throw new VdiskError("READ_ONLY", `disk ${name} is read-only`, {
          hint: "read-only disks cannot be resized",
        });
      }
      const current = disk.device.size;
      if (size < current && !shrink) {
        throw new VdiskError(
          "BAD_SIZE",
          `${formatSize(size)} is smaller than disk ${name} (${formatSize(current)})`,
          {
            hint: `shrinking discards the data past ${formatSize(size)}; to do it anyway add --shrink (API: "shrink": true)`,
          },
        );
      }
      if (size !== current) {
        await resizeAsync(disk.device, size);
        disk.record.size = disk.device.size;
        this.save();
      }
      return infoOf(disk);
    });
  }

  private save(): void {
    const catalog: Catalog = {
      version: 1,
      disks: [...this.disks.values()].filter((disk) => !disk.deleting).map((disk) => disk.record),
    };
    saveCatalog(this.home, catalog);
  }

  /** Flush and close every device (daemon shutdown). Errors are reported, not thrown, so all get closed. */
  async closeAll(log?: (message: string) => void): Promise<void> {
    await this.mutations;
    for (const disk of this.disks.values()) {
      try {
        await flushAsync(disk.device);
        await closeAsync(disk.device);
      } catch (err) {
        log?.(`disk ${disk.record.name}: ${fromSystemError(err, "close failed").message}`);
      }
    }
    this.disks.clear();
  }
}

function readOnly(disk: OpenDisk): boolean {
  return disk.record.readOnly || disk.device.capabilities.readOnly;
}

function describe(disk: OpenDisk): string {
  const mode = readOnly(disk) ? ", read-only" : "";
  return `vdisk ${disk.record.format} disk ${disk.record.name}, ${formatSize(disk.device.size)}${mode}`;
}

async function infoOf(disk: OpenDisk): Promise<DiskInfo> {
  const usage = await usageAsync(disk.device);
  return {
    name: disk.record.name,
    size: disk.device.size,
    allocatedBytes: usage.allocatedBytes,
    format: disk.record.format,
    pool: disk.record.pool,
    file: disk.record.file,
    created: disk.record.created,
    readOnly: readOnly(disk),
    connections: disk.handles,
  };
}
