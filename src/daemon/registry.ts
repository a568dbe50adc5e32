/**
 * DiskRegistry: the daemon's set of disks, each an open BlockDevice, and the NBD server's ExportProvider.
 *
 * Two formats. A raw disk is a sparse file opened as a FileDevice. A vdisk disk is a head of a vdisk image
 * (src/image): one image file holds a whole family — a disk, its snapshots and the disks cloned from them —
 * so the registry opens each image file once (`OpenImage`, shared by every disk of the family, kept open
 * while any of them exists) and serves each head through its own ImageVolume. Snapshots are exported
 * read-only as `DISK@SNAP`; a vdisk export also offers a `qemu:dirty-bitmap:SNAP` meta context for every
 * snapshot in its ancestry (snapshots of other disks as `OTHER@SNAP`), answered by ImageVolume.changedSince.
 *
 * Pools (src/tier/pools.ts, docs/tiering.md): a disk lives in a pool; a vdisk image is opened over a
 * TieredBacking of its pool's devices — the image file (device 0) and its file on every other device,
 * each behind the device's emulation when it has one — and gets the pool's placement. Adding a device
 * opens its file for every open image of the pool first, then records it in the catalog, then attaches.
 *
 * Every disk of the catalog is opened at start (so `lookup`/`open`, which the NBD handshake calls
 * synchronously, never wait). Each disk and each exported snapshot counts the export handles open on it
 * (one per NBD connection in transmission) and the pins held by jobs (import/export); delete, rollback and
 * snapshot delete refuse a target with handles unless forced (then the server is asked to disconnect them
 * and we wait for their release) and always refuse a pinned one. Mutations (create, delete, resize,
 * snapshot, clone, rollback) run one at a time, so catalog rewrites never interleave.
 *
 * Order of effects, chosen so a crash leaves nothing unaccounted for but at most an orphan:
 * create = file, then catalog; clone = image head, then catalog; delete = catalog, then head/snapshots,
 * then file; resize = device, then catalog (on load the device's size wins over the catalog's). A head of
 * an image that no catalog entry names is such an orphan (a clone or delete cut short): it is removed at
 * load, with a log line.
 */
import * as fs from "node:fs";
import * as path from "node:path";
import { VdiskError, assert, fromSystemError } from "../errors";
import { defaultDiskName, drainTimeoutMs } from "../limits";
import type { BlockDevice, ExtentsDone } from "../devices/block-device";
import { closeAsync, flushAsync, resizeAsync, usageAsync } from "../devices/promises";
import { FileDevice } from "../devices/file-device";
import { LatencyDevice, parseLatencyModel } from "../devices/latency-device";
import { IndexCache } from "../image/index-cache";
import type { ImageEngineStats } from "../monitor/types";
import {
  type EngineSettings,
  type EngineStats,
  RequestEngine,
  checkEngineSettings,
  defaultEngineSettings,
} from "../engine/request-engine";
import { Image, type ImagePlacement, type Layer } from "../image/image";
import { ImageVolume } from "../image/volume";
import type { ExportHandle, ExportProvider, ExportSummary } from "../protocol/nbd/exports";
import { checkDiskSize, formatSize } from "../util/size";
import {
  type Catalog,
  type DiskFormat,
  type DiskRecord,
  loadCatalog,
  saveCatalog,
  snapshotName,
  validateDiskName,
} from "./catalog";
import { defaultPoolName } from "./home";
import { TieredBacking } from "../image/tiered-backing";
import {
  type DiskPin,
  type DiskPriority,
  type PoolDevice,
  type PoolRecord,
  type PoolPolicy,
  defaultPool,
  checkPins,
  validateClass,
  validateMigrateRate,
  validatePolicy,
  validatePoolName,
  validatePriority,
} from "../tier/pools";
import { TierManager, type TierImage, type PoolTierStatus } from "../tier/tier-manager";
import { BLOCK_BYTES, DEVICES_MAX } from "../image/format";

/** A pool as `vdisk pool list` shows it. */
export interface PoolInfo extends PoolTierStatus {
  disks: string[];
}

/** Opens (or, with `create`, creates as a sparse file of that size) a disk's backing device. */
export type DeviceOpener = (
  file: string,
  options: { readOnly: boolean; create?: number },
) => Promise<BlockDevice>;

/** What delete --force needs from the NBD server. */
export interface ExportDisconnector {
  disconnectExport(exportName: string): void;
}

/** The meta context prefix of QEMU's dirty bitmaps. */
export const dirtyBitmapPrefix = "qemu:dirty-bitmap:";
/** A new image file starts with its two superblock slots. */
const imageFileBytesInitial = 8192;
/** Candidate image file names tried for one new family (NAME.vdisk, NAME.2.vdisk, ...). */
const imageFileCandidatesMax = 1000;

/** One layer's space, as `vdisk info` and `vdisk tree` show it. */
export interface LayerUsage {
  /** The export name: DISK for a head, DISK@SNAP for a snapshot. */
  name: string;
  kind: "head" | "snapshot";
  size: number;
  created: string;
  /** Bytes of data this layer's view maps (shared or not). */
  mappedBytes: number;
  /** Bytes only this layer references: what deleting it would free. */
  exclusiveBytes: number;
  indexBytes: number;
  exclusiveIndexBytes: number;
}

/** The image behind a vdisk disk. */
export interface ImageInfo {
  file: string;
  fileBytes: number;
  dataBytes: number;
  indexBytes: number;
  freeBytes: number;
  /** Disks (heads) in the image, this one included. */
  disks: string[];
  /** Snapshots of this disk. */
  snapshots: number;
  /** The disk's head, then its ancestors, nearest first. */
  layers: LayerUsage[];
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
  /** vdisk disks, in `info` only. */
  image?: ImageInfo;
  /** The request engine's settings and counters, in `info` only. */
  engine?: EngineStats;
  /** The latency model the device is wrapped in (`vdisk set --emulate`), in `info` only. */
  emulate?: string;
  /** `vdisk set --priority`, when not normal. */
  priority?: DiskPriority;
  /** `vdisk set --pin`, when pinned. */
  pins?: DiskPin[];
}

export interface SnapshotInfo {
  /** DISK@SNAP, also its NBD export name. */
  name: string;
  disk: string;
  snapshot: string;
  size: number;
  created: string;
  /** The export name of the layer it was taken on top of, or null. */
  parent: string | null;
  mappedBytes: number;
  exclusiveBytes: number;
  indexBytes: number;
  connections: number;
  /** Disks whose head descends from this snapshot. */
  dependents: string[];
}

export interface TreeNode extends LayerUsage {
  disk: string;
  snapshot: string | null;
  connections: number;
  /** Whether this is the head of the disk the tree was asked for. */
  current: boolean;
  children: TreeNode[];
}

export interface DiskTree {
  disk: string;
  file: string;
  fileBytes: number;
  dataBytes: number;
  indexBytes: number;
  disks: string[];
  snapshots: number;
  roots: TreeNode[];
}

export interface CheckReport {
  disk: string;
  format: DiskFormat;
  file: string;
  ok: boolean;
  problems: string[];
  /** vdisk: every disk of the image was checked with it. */
  disks: string[];
  layers: number;
  indexNodes: number;
  dataBytes: number;
}

/** A disk as the monitor sees it (registry.monitorDisks). */
export interface MonitorDisk {
  name: string;
  format: DiskFormat;
  pool: string;
  sizeBytes: number;
  /** Snapshots of this disk (0 for raw disks). */
  snapshots: number;
  engine: EngineStats;
}

/** An open vdisk image as the monitor sees it (registry.monitorImages): the stats snapshot's shape. */
export type MonitorImage = ImageEngineStats;

export interface DeleteResult {
  deleted: string;
  /** vdisk only: snapshots deleted with the disk, and those kept because other disks descend from them. */
  snapshotsDeleted?: string[];
  snapshotsKept?: Array<{ name: string; neededBy: string[] }>;
  /** vdisk only: whether the image file went too (the last disk of its family). */
  imageRemoved?: boolean;
}

/** Who uses a disk or a snapshot: NBD handles, job pins, and those waiting for the handles to go. */
interface Users {
  handles: number;
  /** Job id → what the job does, for DISK_BUSY messages. */
  pins: Map<number, string>;
  onIdle: (() => void)[];
}

interface OpenImage {
  /** Relative to the home. */
  file: string;
  /** The pool the image's disks are in. */
  pool: string;
  /** The image's devices: device 0 is the image file, the others its files on the pool's devices. */
  backing: TieredBacking;
  image: Image;
  /** Catalog disks (heads) of this image. */
  disks: Set<string>;
  /** Users of snapshots, by layer id; an entry lives while a snapshot is exported or pinned. */
  snapshots: Map<number, Users>;
}

interface OpenDisk extends Users {
  record: DiskRecord;
  /** The disk's own device: the raw file, or the image head's volume. Management code only. */
  device: BlockDevice;
  /** The request engine over `device`: what NBD clients and jobs use. Closing it closes `device`. */
  engine: RequestEngine;
  image: OpenImage | null;
  deleting: boolean;
}

interface FoundSnapshot {
  image: OpenImage;
  layer: Layer;
  /** DISK@SNAP */
  name: string;
}

export interface RegistryOptions {
  openDevice?: DeviceOpener;
  /** The memory budget shared by the index leaves of every open image (default: never evict). */
  indexCache?: IndexCache;
  log?: (message: string) => void;
}

const openFileDevice: DeviceOpener = (file, options) => FileDevice.open(file, options);

function newUsers(): Users {
  return { handles: 0, pins: new Map(), onIdle: [] };
}

export class DiskRegistry implements ExportProvider {
  private readonly disks = new Map<string, OpenDisk>();
  /** Open vdisk images by relative file. */
  private readonly images = new Map<string, OpenImage>();
  /** Pool devices being emptied by poolRemoveDevice ("pool/id"). */
  private readonly removingDevices = new Set<string>();
  private mutations: Promise<unknown> = Promise.resolve();
  private disconnector: ExportDisconnector | null = null;
  /** Pools by name; the default pool is always there. */
  private readonly poolRecords = new Map<string, PoolRecord>();
  /** Whether the catalog lists pools (once any pool was created or changed); else they are implicit. */
  private poolsListed = false;
  /** Placement and migration across each pool's devices (src/tier/). */
  readonly tier: TierManager;

  private constructor(
    readonly home: string,
    private readonly openDevice: DeviceOpener,
    private readonly log: (message: string) => void,
    readonly indexCache: IndexCache,
  ) {
    this.poolRecords.set(defaultPoolName, defaultPool(defaultPoolName));
    this.tier = new TierManager({
      pools: () => [...this.poolRecords.values()],
      images: () => this.tierImages(),
      log,
    });
  }

  /** The open images with their disks, for the tier manager. */
  private tierImages(): TierImage[] {
    return [...this.images.values()].map((open) => ({
      pool: open.pool,
      file: open.file,
      image: open.image,
      backing: open.backing,
      disks: [...open.disks]
        .map((name) => this.disks.get(name))
        .filter((disk): disk is OpenDisk => disk !== undefined && !disk.deleting)
        .map((disk) => ({ record: disk.record })),
    }));
  }

  /** Load the catalog of `home` and open every disk in it. */
  static async open(home: string, options: RegistryOptions = {}): Promise<DiskRegistry> {
    const registry = new DiskRegistry(
      home,
      options.openDevice ?? openFileDevice,
      options.log ?? (() => undefined),
      options.indexCache ?? new IndexCache(Infinity),
    );
    const catalog = loadCatalog(home);
    if (catalog.pools !== undefined) {
      registry.poolsListed = true;
      for (const pool of catalog.pools) registry.poolRecords.set(pool.name, pool);
    }
    try {
      for (const record of catalog.disks) await registry.openRecord(record);
      for (const image of registry.images.values()) await registry.removeOrphanHeads(image);
      registry.tier.refresh();
    } catch (err) {
      await registry.closeAll();
      throw err;
    }
    return registry;
  }

  private async openRecord(record: DiskRecord): Promise<void> {
    const file = path.join(this.home, record.file);
    if (!fs.existsSync(file)) {
      throw new VdiskError("CORRUPT", `disk "${record.name}": its file ${record.file} is missing`, {
        hint: `restore ${file}, or remove the disk's entry from ${path.join(this.home, "catalog.json")}`,
      });
    }
    let device: BlockDevice;
    let image: OpenImage | null = null;
    if (record.format === "vdisk") {
      image = await this.openImage(record.file, record.pool);
      const head = image.image.head(record.name);
      if (!head) {
        throw new VdiskError("CORRUPT", `disk "${record.name}": the image ${record.file} has no such disk`, {
          hint: `restore ${file}, or remove the disk's entry from ${path.join(this.home, "catalog.json")}`,
        });
      }
      image.disks.add(record.name);
      device = new ImageVolume(image.image, head);
    } else {
      device = await this.openDevice(file, { readOnly: record.readOnly });
    }
    if (device.size !== record.size) {
      this.log(
        `disk "${record.name}": catalog says ${record.size} bytes, file has ${device.size}; using the file's`,
      );
      record.size = device.size;
    }
    this.addDisk(record, device, image);
  }

  private async openImage(file: string, pool: string): Promise<OpenImage> {
    const open = this.images.get(file);
    if (open) return open;
    const backing = await this.openBacking(file, pool, null);
    let image: Image;
    try {
      image = await Image.open(backing, { indexCache: this.indexCache });
      image.placement = this.placementFor(pool);
    } catch (err) {
      await closeAsync(backing).catch(() => undefined);
      const error = fromSystemError(err, `cannot open the image ${file}`);
      throw new VdiskError(error.code, `image ${file}: ${error.message}`, {
        cause: err,
        hint: error.hint ?? `restore ${file} from a backup`,
      });
    }
    const opened: OpenImage = { file, pool, backing, image, disks: new Set(), snapshots: new Map() };
    this.images.set(file, opened);
    this.tier.trackHandles(file, backing.devices);
    return opened;
  }

  /**
   * The devices of image `file` of `pool`: the image file (created with `create` bytes when not null),
   * then its file on every other device of the pool (created empty when missing), each behind the device's
   * emulation when it has one.
   */
  private async openBacking(file: string, poolName: string, create: number | null): Promise<TieredBacking> {
    const pool = this.poolRecord(poolName);
    const opened: Array<BlockDevice | undefined> = [];
    try {
      const primary = await this.openDevice(
        path.join(this.home, file),
        create === null ? { readOnly: false } : { readOnly: false, create },
      );
      opened[0] = this.tier.deviceHandle(pool.name, pool.devices[0] as PoolDevice, primary);
      for (const device of pool.devices) {
        if (device.id === 0) continue;
        opened[device.id] = this.tier.deviceHandle(pool.name, device, await this.openTierFile(device, file));
      }
    } catch (err) {
      for (const device of opened) if (device) await closeAsync(device).catch(() => undefined);
      throw err;
    }
    return new TieredBacking(opened);
  }

  /** Image `file`'s data file on pool device `device` (same base name), created empty if missing. */
  private async openTierFile(device: PoolDevice, file: string): Promise<BlockDevice> {
    const tierFile = this.tierFilePath(device, file);
    fs.mkdirSync(path.dirname(tierFile), { recursive: true });
    return fs.existsSync(tierFile)
      ? this.openDevice(tierFile, { readOnly: false })
      : this.openDevice(tierFile, { readOnly: false, create: 0 });
  }

  private tierFilePath(device: PoolDevice, file: string): string {
    return path.join(path.resolve(this.home, device.path), path.basename(file));
  }

  /** Remove image `file`'s data files on the devices of its pool other than device 0. */
  private removeTierFiles(poolName: string, file: string): void {
    const pool = this.poolRecords.get(poolName);
    for (const device of pool?.devices ?? []) {
      if (device.id !== 0) fs.rmSync(this.tierFilePath(device, file), { force: true });
    }
  }

  /**
   * The placement an image of `pool` consults on writes: none while the pool has one device (nothing to
   * decide, and nothing to ask on the write path); `poolAddDevice` sets it on the pool's open images.
   */
  private placementFor(pool: string): ImagePlacement | null {
    return this.poolRecord(pool).devices.length > 1 ? this.tier.placement(pool) : null;
  }

  private poolRecord(name: string): PoolRecord {
    const pool = this.poolRecords.get(name);
    if (!pool) {
      throw new VdiskError("NOT_FOUND", `no pool named ${name}`, {
        hint: "vdisk pool list shows the pools; vdisk pool create NAME makes one",
      });
    }
    return pool;
  }

  /** Heads no catalog entry names are left by a clone or delete cut short by a crash. */
  private async removeOrphanHeads(image: OpenImage): Promise<void> {
    for (const layer of [...image.image.layers.values()]) {
      if (layer.kind !== "head" || image.disks.has(layer.name)) continue;
      this.log(`image ${image.file}: removing disk ${layer.name}, which the catalog does not list`);
      await image.image.deleteLayer(layer);
    }
  }

  /** The NBD server, for delete --force. */
  setDisconnector(disconnector: ExportDisconnector): void {
    this.disconnector = disconnector;
  }

  // ---- ExportProvider ----------------------------------------------------------------------------------

  list(): string[] {
    const names = this.names();
    for (const image of this.images.values()) {
      for (const layer of image.image.layers.values()) {
        if (layer.kind === "snapshot") names.push(snapshotName(layer.disk, layer.name));
      }
    }
    return names;
  }

  lookup(name: string): ExportSummary | null {
    const exportName = name === "" ? defaultDiskName : name;
    if (exportName.includes("@")) {
      const found = this.findSnapshot(exportName);
      if (!found) return null;
      const volume = new ImageVolume(found.image.image, found.layer);
      return {
        name: found.name,
        description: describeSnapshot(found),
        size: volume.size,
        readOnly: true,
        capabilities: volume.capabilities,
        metaContexts: dirtyBitmaps(found.image.image, found.layer, found.layer.disk),
      };
    }
    const disk = this.live(exportName);
    if (!disk) return null;
    return {
      name: disk.record.name,
      description: describe(disk),
      size: disk.device.size,
      readOnly: readOnly(disk),
      capabilities: disk.device.capabilities,
      ...(disk.image && disk.device instanceof ImageVolume
        ? { metaContexts: dirtyBitmaps(disk.image.image, disk.device.layer, disk.record.name) }
        : {}),
    };
  }

  open(name: string): ExportHandle | null {
    const exportName = name === "" ? defaultDiskName : name;
    if (exportName.includes("@")) return this.openSnapshot(exportName);
    const disk = this.live(exportName);
    if (!disk) return null;
    disk.handles += 1;
    let released = false;
    const device = disk.device;
    const image = disk.image;
    return {
      name: disk.record.name,
      description: describe(disk),
      device: disk.engine,
      readOnly: readOnly(disk),
      ...(image && device instanceof ImageVolume
        ? {
            contextStatus: (context: string, offset: number, length: number, done: ExtentsDone) =>
              contextStatus(image.image, device, disk.record.name, context, offset, length, done),
          }
        : {}),
      release: () => {
        if (released) return;
        released = true;
        releaseHandle(disk);
      },
    };
  }

  private openSnapshot(exportName: string): ExportHandle | null {
    const found = this.findSnapshot(exportName);
    if (!found) return null;
    const users = this.snapshotUsers(found, true);
    users.handles += 1;
    const volume = new ImageVolume(found.image.image, found.layer);
    const engine = new RequestEngine(volume, this.settingsOf(found.layer.disk));
    let released = false;
    return {
      name: found.name,
      description: describeSnapshot(found),
      device: engine,
      readOnly: true,
      contextStatus: (context, offset, length, done) =>
        contextStatus(found.image.image, volume, found.layer.disk, context, offset, length, done),
      release: () => {
        if (released) return;
        released = true;
        engine.close(() => undefined);
        releaseHandle(users);
        this.dropIdle(found.image, found.layer.id);
      },
    };
  }

  // ---- Queries -----------------------------------------------------------------------------------------

  names(): string[] {
    return [...this.disks.values()].filter((disk) => !disk.deleting).map((disk) => disk.record.name);
  }

  get size(): number {
    return this.names().length;
  }

  /** Open connections over all disks and snapshots. */
  connections(): number {
    let total = 0;
    for (const disk of this.disks.values()) total += disk.handles;
    for (const image of this.images.values()) {
      for (const users of image.snapshots.values()) total += users.handles;
    }
    return total;
  }

  /** The device of a disk or of a snapshot DISK@SNAP (for jobs); UNKNOWN_DISK/UNKNOWN_SNAPSHOT if none. */
  device(name: string): BlockDevice {
    if (name.includes("@")) {
      const found = this.requireSnapshotByName(name);
      return new ImageVolume(found.image.image, found.layer);
    }
    return this.get(name).engine;
  }

  async info(name: string): Promise<DiskInfo> {
    return infoOf(this.get(name), true);
  }

  async listInfo(): Promise<DiskInfo[]> {
    const disks = [...this.disks.values()].filter((disk) => !disk.deleting);
    return Promise.all(disks.map((disk) => infoOf(disk, false)));
  }

  /** The snapshots taken of `disk`, oldest first. */
  async snapshots(disk: string): Promise<{ disk: string; snapshots: SnapshotInfo[] }> {
    const open = this.requireVdisk(this.get(disk), "have snapshots");
    const image = open.image.image;
    const layers = [...image.layers.values()]
      .filter((layer) => layer.kind === "snapshot" && layer.disk === disk)
      .sort((a, b) => a.id - b.id);
    const snapshots: SnapshotInfo[] = [];
    for (const layer of layers) snapshots.push(await this.snapshotInfo(open.image, layer));
    return { disk, snapshots };
  }

  /** The whole layer tree of the image that holds `disk`. */
  async tree(disk: string): Promise<DiskTree> {
    const open = this.requireVdisk(this.get(disk), "have a snapshot tree");
    const image = open.image.image;
    // Space figures first (they may read evicted index leaves), then the tree from one set of layers.
    const usages = new Map<number, LayerUsage>();
    for (const layer of [...image.layers.values()]) usages.set(layer.id, await layerUsage(image, layer));
    const node = (layer: Layer): TreeNode => ({
      ...(usages.get(layer.id) as LayerUsage),
      disk: layer.disk,
      snapshot: layer.kind === "snapshot" ? layer.name : null,
      connections: this.layerConnections(open.image, layer),
      current: layer.kind === "head" && layer.name === disk,
      children: image
        .children(layer.id)
        .sort((a, b) => a.id - b.id)
        .map(node),
    });
    const roots = [...image.layers.values()]
      .filter((layer) => layer.parent === null)
      .sort((a, b) => a.id - b.id)
      .map(node);
    const stats = image.stats();
    return {
      disk,
      file: open.image.file,
      fileBytes: stats.fileBytes,
      dataBytes: stats.dataBytes,
      indexBytes: stats.indexBytes,
      disks: [...open.image.disks].sort(),
      snapshots: [...image.layers.values()].filter((layer) => layer.kind === "snapshot").length,
      roots,
    };
  }

  /** Verify a disk: a vdisk image's every superblock, layer table and index node; a raw file's size. */
  async check(name: string): Promise<CheckReport> {
    const disk = this.get(name);
    if (disk.image) {
      const result = await disk.image.image.verify();
      return {
        disk: name,
        format: "vdisk",
        file: disk.record.file,
        ok: result.problems.length === 0,
        problems: result.problems,
        disks: [...disk.image.disks].sort(),
        layers: result.layers,
        indexNodes: result.nodes,
        dataBytes: result.dataBytes,
      };
    }
    const problems: string[] = [];
    const file = path.join(this.home, disk.record.file);
    try {
      const stat = await fs.promises.stat(file);
      if (!stat.isFile()) problems.push(`${disk.record.file} is not a regular file`);
      else if (stat.size !== disk.device.size) {
        problems.push(`${disk.record.file} is ${stat.size} bytes long, the disk is ${disk.device.size}`);
      }
    } catch (err) {
      problems.push(`${disk.record.file}: ${(err as NodeJS.ErrnoException).code ?? String(err)}`);
    }
    if (disk.record.size !== disk.device.size) {
      problems.push(`the catalog says ${disk.record.size} bytes, the device has ${disk.device.size}`);
    }
    const usage = await usageAsync(disk.device);
    return {
      disk: name,
      format: "raw",
      file: disk.record.file,
      ok: problems.length === 0,
      problems,
      disks: [name],
      layers: 1,
      indexNodes: 0,
      dataBytes: usage.allocatedBytes,
    };
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

  private requireVdisk(disk: OpenDisk, what: string): OpenDisk & { image: OpenImage } {
    if (!disk.image) {
      const name = disk.record.name;
      throw new VdiskError("WRONG_FORMAT", `disk ${name} is a raw disk; only vdisk disks ${what}`, {
        hint: `copy it into a vdisk disk first: vdisk export ${name} ${name}.img && vdisk import ${name}.img ${name}-v`,
      });
    }
    return disk as OpenDisk & { image: OpenImage };
  }

  /**
   * A snapshot DISK@SNAP: of the live disk DISK, or else a snapshot kept after DISK was deleted (because
   * other disks descend from it).
   */
  private findSnapshot(exportName: string): FoundSnapshot | null {
    const at = exportName.indexOf("@");
    const diskName = exportName.slice(0, at);
    const snap = exportName.slice(at + 1);
    const disk = this.live(diskName);
    const candidates = disk ? (disk.image ? [disk.image] : []) : [...this.images.values()];
    for (const image of candidates) {
      const layer = image.image.snapshot(diskName, snap);
      if (layer) return { image, layer, name: snapshotName(diskName, snap) };
    }
    return null;
  }

  private requireSnapshot(diskName: string, snap: string): FoundSnapshot {
    validateDiskName(snap, "snapshot");
    const disk = this.live(diskName);
    if (disk) this.requireVdisk(disk, "have snapshots");
    const found = this.findSnapshot(snapshotName(diskName, snap));
    if (found) return found;
    if (!disk) this.get(diskName); // throws UNKNOWN_DISK
    throw new VdiskError("UNKNOWN_SNAPSHOT", `disk ${diskName} has no snapshot named ${snap}`, {
      hint: `vdisk snapshot list ${diskName} shows its snapshots; to take one: vdisk snapshot create ${diskName} ${snap}`,
    });
  }

  private requireSnapshotByName(name: string): FoundSnapshot {
    const at = name.indexOf("@");
    return this.requireSnapshot(validateDiskName(name.slice(0, at)), name.slice(at + 1));
  }

  private snapshotUsers(found: { image: OpenImage; layer: Layer }, create: boolean): Users {
    let users = found.image.snapshots.get(found.layer.id);
    if (!users) {
      users = newUsers();
      if (create) found.image.snapshots.set(found.layer.id, users);
    }
    return users;
  }

  private dropIdle(image: OpenImage, layerId: number): void {
    const users = image.snapshots.get(layerId);
    if (users && users.handles === 0 && users.pins.size === 0 && users.onIdle.length === 0) {
      image.snapshots.delete(layerId);
    }
  }

  private layerConnections(image: OpenImage, layer: Layer): number {
    if (layer.kind === "head") return this.disks.get(layer.name)?.handles ?? 0;
    return image.snapshots.get(layer.id)?.handles ?? 0;
  }

  private async snapshotInfo(image: OpenImage, layer: Layer): Promise<SnapshotInfo> {
    const usage = await layerUsage(image.image, layer);
    const parent = layer.parent === null ? null : image.image.layers.get(layer.parent);
    const dependents = [...image.image.layers.values()]
      .filter((other) => other.kind === "head" && image.image.ancestors(other).includes(layer))
      .map((head) => head.name)
      .sort();
    return {
      name: usage.name,
      disk: layer.disk,
      snapshot: layer.name,
      size: usage.size,
      created: usage.created,
      parent: parent ? layerName(parent) : null,
      mappedBytes: usage.mappedBytes,
      exclusiveBytes: usage.exclusiveBytes,
      indexBytes: usage.indexBytes,
      connections: this.layerConnections(image, layer),
      dependents,
    };
  }

  // ---- Monitor -------------------------------------------------------------------------------------------

  /** Cheap facts about every live disk, by name: no I/O, no index walk (one pass over the layers). */
  monitorDisks(): MonitorDisk[] {
    const snapshots = new Map<string, number>();
    for (const image of this.images.values()) {
      for (const layer of image.image.layers.values()) {
        if (layer.kind === "snapshot") snapshots.set(layer.disk, (snapshots.get(layer.disk) ?? 0) + 1);
      }
    }
    return [...this.disks.values()]
      .filter((disk) => !disk.deleting)
      .map((disk) => ({
        name: disk.record.name,
        format: disk.record.format,
        pool: disk.record.pool,
        sizeBytes: disk.device.size,
        snapshots: disk.image ? (snapshots.get(disk.record.name) ?? 0) : 0,
        engine: disk.engine.stats(),
      }))
      .sort((a, b) => a.name.localeCompare(b.name));
  }

  /** Allocated bytes of every live disk. A vdisk disk walks its index: call it sparingly. */
  async allocatedBytes(): Promise<Map<string, number>> {
    const result = new Map<string, number>();
    for (const disk of [...this.disks.values()]) {
      if (disk.deleting) continue;
      try {
        result.set(disk.record.name, (await usageAsync(disk.device)).allocatedBytes);
      } catch {
        // closed under us (deleted meanwhile): leave it out
      }
    }
    return result;
  }

  /** Every open image with its engine counters and space. Walks every index: call it sparingly. */
  monitorImages(): MonitorImage[] {
    return [...this.images.values()]
      .map((open) => {
        const stats = open.image.stats();
        return {
          file: open.file,
          disks: [...open.disks].sort(),
          commits: open.image.commits,
          regroups: open.image.regroups,
          fileBytes: stats.fileBytes,
          dataBytes: stats.dataBytes,
          indexBytes: stats.indexBytes,
          freeBytes: stats.freeBytes,
        };
      })
      .sort((a, b) => a.file.localeCompare(b.file));
  }

  /** The pools disks live in, with their directories (device 0). */
  pools(): Array<{ name: string; dir: string }> {
    const names = new Set([
      ...this.poolRecords.keys(),
      ...[...this.disks.values()].map((disk) => disk.record.pool),
    ]);
    return [...names].sort().map((name) => ({ name, dir: path.join(this.home, "pools", name) }));
  }

  // ---- Pools of devices (src/tier/pools.ts) -----------------------------------------------------------

  /** Every pool with its devices, their use, and the pool's disks. */
  async poolList(): Promise<PoolInfo[]> {
    const status = await this.tier.status(undefined, "none");
    return status.pools.map((pool) => ({
      ...pool,
      disks: [...this.disks.values()]
        .filter((disk) => disk.record.pool === pool.name && !disk.deleting)
        .map((disk) => disk.record.name)
        .sort(),
    }));
  }

  private async poolInfo(name: string): Promise<PoolInfo> {
    const found = (await this.poolList()).find((pool) => pool.name === name);
    assert(found, "the pool exists");
    return found;
  }

  /** A new pool whose device 0 is `pools/NAME/` in the home, of class `cls`, maybe emulated. */
  poolCreate(name: string, options: { class?: string; emulate?: string } = {}): Promise<PoolInfo> {
    validatePoolName(name);
    const cls = validateClass(options.class ?? "default");
    const emulate = options.emulate === undefined ? undefined : checkEmulate(options.emulate);
    return this.exclusive(async () => {
      if (this.poolRecords.has(name)) {
        throw new VdiskError("DISK_EXISTS", `a pool named ${name} already exists`, {
          hint: "choose another name; vdisk pool list shows the pools",
        });
      }
      const pool = defaultPool(name);
      (pool.devices[0] as PoolDevice).class = cls;
      if (emulate !== undefined && emulate !== "none") (pool.devices[0] as PoolDevice).emulate = emulate;
      fs.mkdirSync(path.join(this.home, "pools", name), { recursive: true });
      this.poolRecords.set(name, pool);
      this.savePools(() => this.poolRecords.delete(name));
      return this.poolInfo(name);
    });
  }

  /**
   * Add directory `dir` (absolute, created if missing) to `pool` as a device of class `cls`. Every open
   * image of the pool starts using it at once (its file there is created empty).
   */
  poolAddDevice(
    poolName: string,
    dir: string,
    options: { class: string; capacity?: number; emulate?: string },
  ): Promise<PoolInfo> {
    const cls = validateClass(options.class);
    const emulate = options.emulate === undefined ? undefined : checkEmulate(options.emulate);
    if (options.capacity !== undefined && (!Number.isSafeInteger(options.capacity) || options.capacity < 0)) {
      throw new VdiskError("INVALID_ARGUMENT", "the capacity must be a size in bytes", {
        hint: "e.g. --capacity 20G",
      });
    }
    if (!path.isAbsolute(dir)) {
      throw new VdiskError("INVALID_ARGUMENT", `the device path ${dir} is not absolute`, {
        hint: "give the directory as an absolute path (the CLI resolves relative ones)",
      });
    }
    return this.exclusive(async () => {
      const pool = this.poolRecord(poolName);
      const resolved = path.resolve(dir);
      for (const other of this.poolRecords.values()) {
        for (const device of other.devices) {
          const used = path.resolve(this.home, device.path);
          if (
            used === resolved ||
            resolved.startsWith(used + path.sep) ||
            used.startsWith(resolved + path.sep)
          ) {
            throw new VdiskError("DISK_EXISTS", `${dir} overlaps device ${device.id} of pool ${other.name}`, {
              hint: "give each device its own directory",
            });
          }
        }
      }
      let id = 1;
      while (pool.devices.some((device) => device.id === id)) id++;
      if (id >= DEVICES_MAX) {
        throw new VdiskError("LIMIT", `pool ${poolName} already has ${DEVICES_MAX} devices`);
      }
      if (fs.existsSync(resolved) && !fs.statSync(resolved).isDirectory()) {
        throw new VdiskError("INVALID_ARGUMENT", `${dir} is not a directory`, {
          hint: "a pool device is a directory (on a block device, make a file system and mount it first)",
        });
      }
      try {
        fs.mkdirSync(resolved, { recursive: true });
        fs.accessSync(resolved, fs.constants.W_OK);
      } catch (err) {
        throw fromSystemError(err, `using ${dir} as a device`);
      }
      const device: PoolDevice = { id, class: cls, path: resolved };
      if (options.capacity !== undefined) device.capacity = options.capacity;
      if (emulate !== undefined && emulate !== "none") device.emulate = emulate;
      // Open the device's file of every image of the pool first, so a failure changes nothing.
      const added: Array<{ open: OpenImage; file: BlockDevice }> = [];
      try {
        for (const open of this.images.values()) {
          if (open.pool !== poolName) continue;
          const file = this.tier.deviceHandle(poolName, device, await this.openTierFile(device, open.file));
          added.push({ open, file });
        }
      } catch (err) {
        for (const { file } of added) await closeAsync(file).catch(() => undefined);
        throw err;
      }
      pool.devices.push(device);
      try {
        this.savePools(() => pool.devices.pop());
      } catch (err) {
        for (const { file } of added) await closeAsync(file).catch(() => undefined);
        throw err;
      }
      for (const { open, file } of added) {
        open.image.attachDevice(id, file);
        open.image.placement = this.placementFor(poolName);
        this.tier.trackHandles(open.file, open.backing.devices);
      }
      this.tier.refresh();
      return this.poolInfo(poolName);
    });
  }

  /** Pool `poolName` and its device `id` (NOT_FOUND for either). */
  private poolDevice(poolName: string, id: number): [PoolRecord, PoolDevice] {
    const pool = this.poolRecord(poolName);
    const device = pool.devices.find((candidate) => candidate.id === id);
    if (!device) {
      throw new VdiskError("NOT_FOUND", `pool ${poolName} has no device ${id}`, {
        hint: `vdisk pool list shows the devices of ${poolName} and their ids`,
      });
    }
    return [pool, device];
  }

  /**
   * Change device `id` of `pool`: its class, or its capacity (null: no limit). Placement uses the new
   * values for the next write; a pass moves data off a fast-class device that is over its capacity.
   * Device 0 holds the image files and takes what no other device has room for: it has no capacity.
   */
  poolSetDevice(
    poolName: string,
    id: number,
    changes: { class?: string; capacity?: number | null },
  ): Promise<PoolInfo> {
    const cls = changes.class === undefined ? undefined : validateClass(changes.class);
    const capacity = changes.capacity;
    if (capacity !== undefined && capacity !== null && (!Number.isSafeInteger(capacity) || capacity < 0)) {
      throw new VdiskError("INVALID_ARGUMENT", "the capacity must be a size in bytes", {
        hint: "e.g. --capacity 20G, or --capacity none for no limit",
      });
    }
    if (cls === undefined && capacity === undefined) {
      throw new VdiskError("INVALID_ARGUMENT", "nothing to change", {
        hint: "give --class CLASS and/or --capacity SIZE|none",
      });
    }
    return this.exclusive(async () => {
      const [, device] = this.poolDevice(poolName, id);
      if (id === 0 && capacity !== undefined && capacity !== null) {
        throw new VdiskError("INVALID_ARGUMENT", "device 0 cannot have a capacity", {
          hint: "device 0 holds the image files and takes what no other device has room for",
        });
      }
      const previous = { ...device };
      if (cls !== undefined) device.class = cls;
      if (capacity === null) delete device.capacity;
      else if (capacity !== undefined) device.capacity = capacity;
      this.savePools(() => {
        for (const key of Object.keys(device)) delete (device as unknown as Record<string, unknown>)[key];
        Object.assign(device, previous);
      });
      this.tier.refresh();
      return this.poolInfo(poolName);
    });
  }

  /**
   * Remove device `id` (≥ 1) of `pool`, live: nothing is placed there any more, every disk's data on it
   * is moved to the pool's other devices (TierManager.evacuate: same class with room, else device 0, paced
   * by the pool's migration rate), and once no block is left the device leaves the pool and its files are
   * deleted. Refused when snapshots share data on it (that data cannot move); then nothing changes but
   * where the movable data is.
   */
  async poolRemoveDevice(poolName: string, id: number): Promise<PoolInfo & { movedBytes: number }> {
    const [pool, device] = this.poolDevice(poolName, id);
    if (id === 0) {
      throw new VdiskError("INVALID_ARGUMENT", "device 0 cannot be removed", {
        hint: "device 0 is the pool's own directory in the home: it holds the image files",
      });
    }
    const key = `${poolName}/${id}`;
    if (this.removingDevices.has(key)) {
      throw new VdiskError("DISK_BUSY", `device ${id} of pool ${poolName} is already being removed`, {
        hint: "wait for the running remove-device to finish (vdisk tier status shows what is moving)",
      });
    }
    this.removingDevices.add(key);
    let removed = false;
    try {
      const evacuation = await this.tier.evacuate(poolName, id);
      return await this.exclusive(async () => {
        const images = [...this.images.values()].filter((open) => open.pool === poolName);
        let remaining = 0;
        for (const open of images) remaining += open.image.usedBlocks(id) * BLOCK_BYTES;
        if (remaining > 0) {
          const holders = evacuation.holders.map((h) => `${h.layer} (${formatSize(h.bytes)})`).join(", ");
          throw new VdiskError(
            "DISK_BUSY",
            `device ${id} of pool ${poolName} still holds ${formatSize(remaining)} that cannot move` +
              (holders === "" ? "" : `: data of ${holders}`),
            {
              hint:
                "data a snapshot shares stays where it was written: delete those snapshots " +
                "(vdisk snapshot delete DISK SNAP), then run remove-device again",
            },
          );
        }
        const index = pool.devices.indexOf(device);
        pool.devices.splice(index, 1);
        this.savePools(() => pool.devices.splice(index, 0, device));
        removed = true;
        for (const open of images) {
          const file = open.image.detachDevice(id);
          open.image.placement = this.placementFor(poolName);
          this.tier.trackHandles(open.file, open.backing.devices);
          await closeAsync(file).catch((err: unknown) =>
            this.log(`closing ${open.file} on ${device.path}: ${String(err)}`),
          );
          fs.rmSync(this.tierFilePath(device, open.file), { force: true });
        }
        this.tier.forgetDevice(poolName, id);
        return { ...(await this.poolInfo(poolName)), movedBytes: evacuation.bytesMoved };
      });
    } finally {
      if (!removed) this.tier.undrain(poolName, id);
      this.removingDevices.delete(key);
    }
  }

  /** Change a pool's policy, fast class or migration rate. */
  poolSet(
    poolName: string,
    changes: { policy?: string; fastClass?: string; migrateBytesPerSecond?: number },
  ): Promise<PoolInfo> {
    const policy: PoolPolicy | undefined =
      changes.policy === undefined ? undefined : validatePolicy(changes.policy);
    const fastClass = changes.fastClass === undefined ? undefined : validateClass(changes.fastClass);
    const rate =
      changes.migrateBytesPerSecond === undefined
        ? undefined
        : validateMigrateRate(changes.migrateBytesPerSecond);
    return this.exclusive(async () => {
      const pool = this.poolRecord(poolName);
      const previous = { ...pool };
      if (policy !== undefined) pool.policy = policy;
      if (fastClass !== undefined) pool.fastClass = fastClass;
      if (rate !== undefined) pool.migrateBytesPerSecond = rate;
      this.savePools(() => Object.assign(pool, previous));
      this.tier.refresh();
      return this.poolInfo(poolName);
    });
  }

  /** Save with pools listed; on failure run `undo` and rethrow. */
  private savePools(undo: () => void): void {
    const listed = this.poolsListed;
    this.poolsListed = true;
    try {
      this.save();
    } catch (err) {
      this.poolsListed = listed;
      undo();
      throw err;
    }
  }

  // ---- Pins (jobs) ---------------------------------------------------------------------------------------

  /** Keep a disk or snapshot (DISK@SNAP) from being deleted, resized or rolled back while a job uses it. */
  pin(name: string, jobId: number, what: string): void {
    if (name.includes("@")) {
      this.snapshotUsers(this.requireSnapshotByName(name), true).pins.set(jobId, what);
      return;
    }
    this.get(name).pins.set(jobId, what);
  }

  unpin(name: string, jobId: number): void {
    if (name.includes("@")) {
      const found = this.findSnapshot(name);
      if (!found) return;
      found.image.snapshots.get(found.layer.id)?.pins.delete(jobId);
      this.dropIdle(found.image, found.layer.id);
      return;
    }
    this.disks.get(name)?.pins.delete(jobId);
  }

  private refusePinned(users: Users, name: string, action: string): void {
    const first = users.pins.entries().next();
    if (first.done) return;
    const [jobId, what] = first.value;
    throw new VdiskError("DISK_BUSY", `cannot ${action} ${name}: job ${jobId} (${what}) uses it`, {
      hint: `wait for the job to finish (vdisk status, or GET /v1/jobs/${jobId})`,
    });
  }

  // ---- Mutations -----------------------------------------------------------------------------------------

  private exclusive<T>(work: () => Promise<T>): Promise<T> {
    const result = this.mutations.then(work, work);
    this.mutations = result.catch(() => undefined);
    return result;
  }

  /**
   * Create a thin disk, vdisk by default. With `pinFor`, the new disk is pinned for that job before anyone
   * can delete it.
   */
  async create(
    name: string,
    size: number,
    options: { format?: DiskFormat; pool?: string; pinFor?: { jobId: number; what: string } } = {},
  ): Promise<DiskInfo> {
    validateDiskName(name);
    checkDiskSize(size);
    const format = options.format ?? "vdisk";
    const pool = options.pool ?? defaultPoolName;
    return this.exclusive(async () => {
      this.poolRecord(pool);
      if (format === "raw" && this.poolRecord(pool).devices.length > 1) {
        throw new VdiskError(
          "INVALID_ARGUMENT",
          `pool ${pool} has several devices; raw disks cannot be tiered`,
          {
            hint: "create a vdisk-format disk (the default) in a tiered pool, or a raw disk in a pool of one device",
          },
        );
      }
      const disk =
        format === "vdisk"
          ? await this.createVdisk(name, size, pool)
          : await this.createRaw(name, size, pool);
      if (options.pinFor) disk.pins.set(options.pinFor.jobId, options.pinFor.what);
      return infoOf(disk, false);
    });
  }

  private refuseExisting(name: string): void {
    if (this.disks.has(name)) {
      throw new VdiskError("DISK_EXISTS", `a disk named ${name} already exists`, {
        hint: "choose another name, or delete the old disk first (vdisk delete NAME)",
      });
    }
  }

  private orphanFile(relative: string): VdiskError {
    return new VdiskError("DISK_EXISTS", `the file ${relative} exists but belongs to no disk`, {
      hint: `move ${path.join(this.home, relative)} away (it may hold a disk deleted during a crash), then create the disk again`,
    });
  }

  private async createRaw(name: string, size: number, pool: string): Promise<OpenDisk> {
    this.refuseExisting(name);
    const relative = path.posix.join("pools", pool, `${name}.raw`);
    const file = path.join(this.home, relative);
    if (fs.existsSync(file)) throw this.orphanFile(relative);
    fs.mkdirSync(path.dirname(file), { recursive: true });
    const device = await this.openDevice(file, { readOnly: false, create: size });
    const disk = this.addDisk(newRecord(name, device.size, "raw", relative, pool), device, null);
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

  /**
   * Serve an existing raw image in place, without copying it: the pool gets a symbolic link
   * `pools/default/NAME.raw` to the file (so the catalog still only names paths inside the home), and
   * deleting the disk later removes the link, never the user's file. One file may back one disk only.
   */
  async attach(file: string, name: string, readOnly: boolean): Promise<DiskInfo> {
    validateDiskName(name);
    if (!path.isAbsolute(file)) {
      throw new VdiskError("BAD_REQUEST", `the file to attach must be an absolute path, not ${file}`);
    }
    return this.exclusive(async () => {
      this.refuseExisting(name);
      let target: string;
      let stat: fs.Stats;
      try {
        target = fs.realpathSync(file);
        stat = fs.statSync(target);
      } catch (err) {
        throw new VdiskError(
          "NOT_FOUND",
          `cannot attach ${path.basename(file)}: ${(err as NodeJS.ErrnoException).code}`,
          {
            hint: "give the path of an existing raw image file",
          },
        );
      }
      if (!stat.isFile()) {
        throw new VdiskError("BAD_REQUEST", `${path.basename(file)} is not a regular file`, {
          hint: "attach serves raw image files; use vdisk import for other formats",
        });
      }
      checkDiskSize(stat.size);
      for (const disk of this.disks.values()) {
        if (disk.record.format !== "raw") continue;
        let other: string;
        try {
          other = fs.realpathSync(path.join(this.home, disk.record.file));
        } catch {
          continue;
        }
        if (other === target) {
          throw new VdiskError(
            "DISK_BUSY",
            `${path.basename(file)} is already served as disk ${disk.record.name}`,
            {
              hint: "two disks on one file would corrupt it; use the existing disk",
            },
          );
        }
      }
      const relative = path.posix.join("pools", defaultPoolName, `${name}.raw`);
      const link = path.join(this.home, relative);
      if (fs.existsSync(link)) throw this.orphanFile(relative);
      fs.mkdirSync(path.dirname(link), { recursive: true });
      fs.symlinkSync(target, link);
      let device: BlockDevice;
      try {
        device = await this.openDevice(link, { readOnly });
      } catch (err) {
        fs.rmSync(link, { force: true });
        throw err;
      }
      const record = { ...newRecord(name, device.size, "raw", relative, defaultPoolName), readOnly };
      const disk = this.addDisk(record, device, null);
      try {
        this.save();
      } catch (err) {
        this.disks.delete(name);
        await closeAsync(device).catch(() => undefined);
        fs.rmSync(link, { force: true });
        throw err;
      }
      return infoOf(disk, false);
    });
  }

  /** A new image file for a new family: NAME.vdisk, or NAME.2.vdisk, ... when an older family has it. */
  private newImageFile(name: string, pool: string): string {
    const used = new Set([...this.disks.values()].map((disk) => disk.record.file));
    for (let n = 1; n <= imageFileCandidatesMax; n++) {
      const relative = path.posix.join("pools", pool, n === 1 ? `${name}.vdisk` : `${name}.${n}.vdisk`);
      if (used.has(relative)) continue;
      if (fs.existsSync(path.join(this.home, relative))) throw this.orphanFile(relative);
      return relative;
    }
    throw new VdiskError("LIMIT", `too many image files named after ${name}`, {
      hint: "choose another name",
    });
  }

  private async createVdisk(name: string, size: number, pool: string): Promise<OpenDisk> {
    this.refuseExisting(name);
    const relative = this.newImageFile(name, pool);
    const file = path.join(this.home, relative);
    fs.mkdirSync(path.dirname(file), { recursive: true });
    const backing = await this.openBacking(relative, pool, imageFileBytesInitial);
    let image: Image;
    try {
      image = await Image.create(backing, { name, sizeBytes: size }, { indexCache: this.indexCache });
      image.placement = this.placementFor(pool);
    } catch (err) {
      await closeAsync(backing).catch(() => undefined);
      fs.rmSync(file, { force: true });
      this.removeTierFiles(pool, relative);
      throw fromSystemError(err, `cannot create the image ${relative}`);
    }
    const open: OpenImage = {
      file: relative,
      pool,
      backing,
      image,
      disks: new Set([name]),
      snapshots: new Map(),
    };
    const head = image.head(name);
    assert(head, "a new image has its head");
    this.images.set(relative, open);
    this.tier.trackHandles(relative, backing.devices);
    const volume = new ImageVolume(image, head);
    const disk = this.addDisk(newRecord(name, volume.size, "vdisk", relative, pool), volume, open);
    try {
      this.save();
    } catch (err) {
      this.disks.delete(name);
      this.images.delete(relative);
      await closeImage(open).catch(() => undefined);
      fs.rmSync(file, { force: true });
      this.removeTierFiles(pool, relative);
      throw err;
    }
    return disk;
  }

  private addDisk(record: DiskRecord, device: BlockDevice, image: OpenImage | null): OpenDisk {
    const engine = new RequestEngine(
      emulated(device, record.emulate),
      checkEngineSettings(record.engine ?? {}),
    );
    const disk: OpenDisk = { record, device, engine, image, deleting: false, ...newUsers() };
    this.disks.set(record.name, disk);
    return disk;
  }

  /**
   * Delete a disk. Connected clients: DISK_BUSY, unless `force` disconnects them. A vdisk disk takes with
   * it its snapshots that no other disk descends from (and snapshots of disks deleted earlier that nothing
   * needs any more); the last disk of an image takes the image file.
   */
  delete(name: string, force = false): Promise<DeleteResult> {
    return this.exclusive(async () => {
      const disk = this.get(name);
      this.refusePinned(disk, `disk ${name}`, "delete");
      if (disk.handles > 0 && !force) {
        throw new VdiskError("DISK_BUSY", `disk ${name} has ${disk.handles} client connection(s)`, {
          hint: `disconnect its clients first, or disconnect them and delete with: vdisk delete ${name} --force`,
        });
      }
      const plan = disk.image ? this.deletePlan(disk.image, name) : null;
      for (const found of plan?.doomed ?? []) {
        const users = this.snapshotUsers(found, false);
        this.refusePinned(users, found.name, "delete");
        if (users.handles > 0 && !force) {
          throw new VdiskError(
            "DISK_BUSY",
            `snapshot ${found.name}, which goes with disk ${name}, is exported to ${users.handles} client(s)`,
            {
              hint: `disconnect them first, or disconnect them and delete with: vdisk delete ${name} --force`,
            },
          );
        }
      }
      disk.deleting = true;
      try {
        await this.disconnectAll(disk, name);
        for (const found of plan?.doomed ?? []) {
          await this.disconnectAll(this.snapshotUsers(found, false), found.name);
        }
        this.save();
      } catch (err) {
        disk.deleting = false;
        throw err;
      }
      this.disks.delete(name);
      await closeAsync(disk.engine).catch(() => undefined);
      if (!disk.image || !plan) {
        fs.rmSync(path.join(this.home, disk.record.file), { force: true });
        return { deleted: name };
      }
      const open = disk.image;
      open.disks.delete(name);
      if (open.disks.size === 0) {
        this.images.delete(open.file);
        this.tier.forgetHandles(open.file);
        this.tier.refresh();
        await closeImage(open).catch((err: unknown) => this.log(`closing ${open.file}: ${String(err)}`));
        fs.rmSync(path.join(this.home, open.file), { force: true });
        this.removeTierFiles(open.pool, open.file);
      } else {
        const head = open.image.head(name);
        if (head) await open.image.deleteLayer(head);
        for (const found of plan.doomed) {
          await open.image.deleteLayer(found.layer);
          open.snapshots.delete(found.layer.id);
        }
      }
      return {
        deleted: name,
        snapshotsDeleted: plan.doomed.map((found) => found.name),
        snapshotsKept: plan.kept,
        imageRemoved: open.disks.size === 0,
      };
    });
  }

  /**
   * What goes with disk `name`: its snapshots and those of already deleted disks, except the ones another
   * disk's head descends from (they are kept, with the disks that need them).
   */
  private deletePlan(
    open: OpenImage,
    name: string,
  ): { doomed: FoundSnapshot[]; kept: Array<{ name: string; neededBy: string[] }> } {
    const image = open.image;
    const neededBy = new Map<Layer, string[]>();
    for (const layer of image.layers.values()) {
      if (layer.kind !== "head" || layer.name === name) continue;
      for (const ancestor of image.ancestors(layer)) {
        neededBy.set(ancestor, [...(neededBy.get(ancestor) ?? []), layer.name]);
      }
    }
    const doomed: FoundSnapshot[] = [];
    const kept: Array<{ name: string; neededBy: string[] }> = [];
    for (const layer of [...image.layers.values()].sort((a, b) => a.id - b.id)) {
      if (layer.kind !== "snapshot") continue;
      const ownerGone = layer.disk === name || !open.disks.has(layer.disk);
      if (!ownerGone) continue;
      const needers = neededBy.get(layer);
      const full = snapshotName(layer.disk, layer.name);
      if (needers) {
        if (layer.disk === name) kept.push({ name: full, neededBy: needers.sort() });
      } else {
        doomed.push({ image: open, layer, name: full });
      }
    }
    return { doomed, kept };
  }

  private async disconnectAll(users: Users, exportName: string): Promise<void> {
    if (users.handles === 0) return;
    // Wait first: the server may release the handles synchronously inside disconnectExport.
    const idle = new Promise<void>((resolve) => users.onIdle.push(resolve));
    this.disconnector?.disconnectExport(exportName);
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<"timeout">(
      (resolve) => (timer = setTimeout(() => resolve("timeout"), drainTimeoutMs)),
    );
    const outcome = await Promise.race([idle, timeout]);
    clearTimeout(timer);
    if (outcome === "timeout") {
      throw new VdiskError("DISK_BUSY", `the clients of ${exportName} did not disconnect in time`, {
        hint: "try again; if it persists, stop the clients (or the daemon) first",
      });
    }
  }

  /** Change a disk's size; shrinking needs `shrink` (the tail is discarded). Connected clients see it too. */
  async resize(name: string, size: number, shrink = false): Promise<DiskInfo> {
    checkDiskSize(size);
    return this.exclusive(async () => {
      const disk = this.get(name);
      this.refusePinned(disk, `disk ${name}`, "resize");
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
        await resizeAsync(disk.engine, size);
        disk.record.size = disk.device.size;
        this.save();
      }
      return infoOf(disk, false);
    });
  }

  // ---- Request-engine settings ----------------------------------------------------------------------------

  /** The engine settings of disk `name` (defaults for a disk that no longer exists). */
  private settingsOf(name: string): EngineSettings {
    const disk = this.disks.get(name);
    return disk ? disk.engine.settings : { ...defaultEngineSettings };
  }

  /**
   * Change disk `name`'s request-engine settings (`vdisk set`), live: requests dispatched from now on use
   * them. Only the settings that differ from the defaults are kept in the catalog.
   */
  configure(name: string, input: unknown): Promise<DiskInfo> {
    return this.exclusive(async () => {
      const disk = this.get(name);
      if (input === null || typeof input !== "object" || Array.isArray(input)) {
        throw new VdiskError("INVALID_ARGUMENT", "the settings must be a JSON object", {
          hint: 'e.g. {"queueDepth": 32, "merge": false, "emulate": "hdd"}',
        });
      }
      const {
        emulate: emulateInput,
        priority: priorityInput,
        pins: pinsInput,
        ...engineInput
      } = input as Record<string, unknown>;
      const settings = checkEngineSettings(engineInput, disk.engine.settings);
      const priority = priorityInput === undefined ? disk.record.priority : validatePriority(priorityInput);
      let pins = disk.record.pins;
      if (pinsInput !== undefined) {
        try {
          pins = checkPins(pinsInput);
        } catch (err) {
          throw new VdiskError("INVALID_ARGUMENT", `pins: ${(err as Error).message}`, {
            hint: 'e.g. {"pins": [{"class": "ssd", "start": 0, "end": null}]}',
          });
        }
        const classes = new Set(this.poolRecord(disk.record.pool).devices.map((device) => device.class));
        for (const pin of pins) {
          if (!classes.has(pin.class)) {
            throw new VdiskError(
              "INVALID_ARGUMENT",
              `pool ${disk.record.pool} has no device of class ${pin.class}`,
              {
                hint: "vdisk pool list shows each pool's devices and classes",
              },
            );
          }
        }
      }
      const emulate = emulateInput === undefined ? disk.record.emulate : checkEmulate(emulateInput);
      const emulateChanged = (emulate ?? "none") !== (disk.record.emulate ?? "none");
      if (emulateChanged) {
        this.refusePinned(disk, `disk ${name}`, "change the device emulation of");
        if (disk.handles > 0) {
          throw new VdiskError("DISK_BUSY", `disk ${name} has ${disk.handles} client connection(s)`, {
            hint: "the device emulation changes only while no client is connected; disconnect them first",
          });
        }
      }
      const previous = disk.record.engine;
      const previousEmulate = disk.record.emulate;
      const previousPriority = disk.record.priority;
      const previousPins = disk.record.pins;
      if (priority === undefined || priority === "normal") delete disk.record.priority;
      else disk.record.priority = priority;
      if (pins === undefined || pins.length === 0) delete disk.record.pins;
      else disk.record.pins = pins;
      if (emulate === undefined || emulate === "none") delete disk.record.emulate;
      else disk.record.emulate = emulate;
      const differing: Partial<EngineSettings> = {};
      for (const key of Object.keys(defaultEngineSettings) as Array<keyof EngineSettings>) {
        if (settings[key] !== defaultEngineSettings[key]) Object.assign(differing, { [key]: settings[key] });
      }
      if (Object.keys(differing).length > 0) disk.record.engine = differing;
      else delete disk.record.engine;
      try {
        this.save();
      } catch (err) {
        if (previous) disk.record.engine = previous;
        else delete disk.record.engine;
        if (previousEmulate) disk.record.emulate = previousEmulate;
        else delete disk.record.emulate;
        if (previousPriority) disk.record.priority = previousPriority;
        else delete disk.record.priority;
        if (previousPins) disk.record.pins = previousPins;
        else delete disk.record.pins;
        throw err;
      }
      if (emulateChanged) {
        // No client is connected; a flush drains what jobs or past clients left queued. The old engine and
        // filter hold nothing else, so they are dropped without closing the disk's device.
        await flushAsync(disk.engine);
        disk.engine = new RequestEngine(emulated(disk.device, disk.record.emulate), settings);
      } else {
        disk.engine.configure(settings);
      }
      this.tier.refresh();
      return infoOf(disk, true);
    });
  }

  // ---- Snapshots, clones, rollback -------------------------------------------------------------------------

  /** Freeze disk `name` as snapshot `snap` (O(1), while clients keep writing). */
  async snapshotCreate(name: string, snap: string): Promise<SnapshotInfo> {
    validateDiskName(snap, "snapshot");
    return this.exclusive(async () => {
      const disk = this.requireVdisk(this.get(name), "have snapshots");
      const image = disk.image.image;
      if (image.snapshot(name, snap)) {
        throw new VdiskError("SNAPSHOT_EXISTS", `disk ${name} already has a snapshot named ${snap}`, {
          hint: `choose another name, or delete the old one first: vdisk snapshot delete ${name} ${snap}`,
        });
      }
      const layer = await image.createSnapshot(name, snap);
      return this.snapshotInfo(disk.image, layer);
    });
  }

  /** Delete snapshot DISK@SNAP; refused while it is exported to a client unless `force` disconnects them. */
  snapshotDelete(
    name: string,
    snap: string,
    force = false,
  ): Promise<{ deleted: string; freedBytes: number }> {
    return this.exclusive(async () => {
      const found = this.requireSnapshot(name, snap);
      const users = this.snapshotUsers(found, false);
      this.refusePinned(users, `snapshot ${found.name}`, "delete");
      if (users.handles > 0 && !force) {
        throw new VdiskError(
          "DISK_BUSY",
          `snapshot ${found.name} is exported to ${users.handles} client connection(s)`,
          {
            hint: `disconnect them first, or disconnect them and delete with: vdisk snapshot delete ${name} ${snap} --force`,
          },
        );
      }
      await this.disconnectAll(users, found.name);
      const freedBytes = (await found.image.image.layerStatsAsync(found.layer)).exclusiveBytes;
      await found.image.image.deleteLayer(found.layer);
      found.image.snapshots.delete(found.layer.id);
      return { deleted: found.name, freedBytes };
    });
  }

  /** A new disk `target` whose head starts on snapshot DISK@SNAP (in the same image file). */
  async clone(name: string, snap: string, target: string): Promise<DiskInfo> {
    validateDiskName(target);
    return this.exclusive(async () => {
      const found = this.requireSnapshot(name, snap);
      this.refuseExisting(target);
      const image = found.image.image;
      if ([...image.layers.values()].some((layer) => layer.disk === target)) {
        throw new VdiskError(
          "DISK_EXISTS",
          `the image of ${found.name} still holds snapshots of an earlier disk named ${target}`,
          { hint: `choose another name (vdisk tree ${name} shows the names in use)` },
        );
      }
      const head = await image.clone(found.layer, target);
      const volume = new ImageVolume(image, head);
      const disk = this.addDisk(
        newRecord(target, volume.size, "vdisk", found.image.file, found.image.pool),
        volume,
        found.image,
      );
      found.image.disks.add(target);
      try {
        this.save();
      } catch (err) {
        this.disks.delete(target);
        found.image.disks.delete(target);
        await image.deleteLayer(head).catch(() => undefined);
        throw err;
      }
      return infoOf(disk, false);
    });
  }

  /**
   * Throw away disk DISK's changes and restart it on snapshot DISK@SNAP. Refused while the disk has clients
   * (a rollback under a live VM corrupts it) unless `force`, which disconnects them first.
   */
  rollback(name: string, snap: string, force = false): Promise<DiskInfo> {
    return this.exclusive(async () => {
      const disk = this.requireVdisk(this.get(name), "can be rolled back");
      this.refusePinned(disk, `disk ${name}`, "roll back");
      const found = this.requireSnapshot(name, snap);
      if (disk.handles > 0 && !force) {
        throw new VdiskError(
          "DISK_BUSY",
          `disk ${name} has ${disk.handles} client connection(s); rolling back under them would corrupt what they see`,
          {
            hint: `stop its clients (shut the VM down) first, or disconnect them and roll back with: vdisk rollback ${found.name} --force`,
          },
        );
      }
      await this.disconnectAll(disk, name);
      await flushAsync(disk.engine); // a flush waits for every write queued before it
      await disk.image.image.rollback(name, found.layer);
      if (disk.record.size !== disk.device.size) {
        disk.record.size = disk.device.size;
        this.save();
      }
      return infoOf(disk, false);
    });
  }

  private save(): void {
    const catalog: Catalog = {
      version: 1,
      disks: [...this.disks.values()].filter((disk) => !disk.deleting).map((disk) => disk.record),
    };
    if (this.poolsListed) catalog.pools = [...this.poolRecords.values()];
    saveCatalog(this.home, catalog);
    this.tier.refresh();
  }

  /** Flush and close every device (daemon shutdown). Errors are reported, not thrown, so all get closed. */
  async closeAll(log?: (message: string) => void): Promise<void> {
    await this.mutations;
    await this.tier.close();
    const report = log ?? this.log;
    for (const disk of this.disks.values()) {
      try {
        await flushAsync(disk.engine);
        await closeAsync(disk.engine);
      } catch (err) {
        report(`disk ${disk.record.name}: ${fromSystemError(err, "close failed").message}`);
      }
    }
    this.disks.clear();
    for (const image of this.images.values()) {
      try {
        await closeImage(image);
      } catch (err) {
        report(`image ${image.file}: ${fromSystemError(err, "close failed").message}`);
      }
    }
    this.images.clear();
  }
}

function releaseHandle(users: Users): void {
  users.handles -= 1;
  if (users.handles > 0) return;
  for (const resolve of users.onIdle.splice(0)) resolve();
}

async function closeImage(open: OpenImage): Promise<void> {
  try {
    await open.image.close();
  } finally {
    await flushAsync(open.backing).catch(() => undefined);
    await closeAsync(open.backing);
  }
}

function newRecord(name: string, size: number, format: DiskFormat, file: string, pool: string): DiskRecord {
  return {
    name,
    size,
    format,
    pool,
    file,
    created: new Date().toISOString(),
    readOnly: false,
  };
}

/** DISK for a head, DISK@SNAP for a snapshot. */
function layerName(layer: Layer): string {
  return layer.kind === "head" ? layer.name : snapshotName(layer.disk, layer.name);
}

/** The name of `layer`'s dirty bitmap as seen from an export of disk `disk`. */
function bitmapName(layer: Layer, disk: string): string {
  return layer.disk === disk ? layer.name : snapshotName(layer.disk, layer.name);
}

/** qemu:dirty-bitmap:SNAP for every snapshot in the ancestry of `layer`, nearest first. */
function dirtyBitmaps(image: Image, layer: Layer, disk: string): string[] {
  return image
    .ancestors(layer)
    .filter((ancestor) => ancestor.kind === "snapshot")
    .map((ancestor) => dirtyBitmapPrefix + bitmapName(ancestor, disk));
}

/** Block status of a dirty bitmap: flag 1 = written since that snapshot. Resolved at each request. */
function contextStatus(
  image: Image,
  volume: ImageVolume,
  disk: string,
  context: string,
  offset: number,
  length: number,
  done: ExtentsDone,
): void {
  const reference = context.startsWith(dirtyBitmapPrefix) ? context.slice(dirtyBitmapPrefix.length) : null;
  const snapshot =
    reference === null
      ? undefined
      : image.ancestors(volume.layer).find((layer) => bitmapName(layer, disk) === reference);
  if (!snapshot) {
    const error = new VdiskError(
      "INVALID_ARGUMENT",
      `meta context ${context}: no such snapshot in the ancestry of ${layerName(volume.layer)} any more`,
    );
    process.nextTick(done, error);
    return;
  }
  volume.changedSince(snapshot, offset, length, done);
}

async function layerUsage(image: Image, layer: Layer): Promise<LayerUsage> {
  const stats = await image.layerStatsAsync(layer);
  return {
    name: layerName(layer),
    kind: layer.kind,
    size: layer.sizeBytes,
    created: new Date(layer.createdMs).toISOString(),
    mappedBytes: stats.mappedBytes,
    exclusiveBytes: stats.exclusiveBytes,
    indexBytes: stats.indexBytes,
    exclusiveIndexBytes: stats.exclusiveIndexBytes,
  };
}

/** `device`, wrapped in a LatencyDevice when the disk has a latency model (`vdisk set --emulate`). */
function emulated(device: BlockDevice, emulate: string | undefined): BlockDevice {
  if (emulate === undefined || emulate === "none") return device;
  return new LatencyDevice(device, { model: parseLatencyModel(emulate), clock: "real" });
}

function checkEmulate(value: unknown): string {
  if (typeof value !== "string") {
    throw new VdiskError("INVALID_ARGUMENT", "emulate must be a latency model such as hdd, ssd or none", {
      hint: "see docs/devices.md, Latency-emulating device",
    });
  }
  parseLatencyModel(value);
  return value.trim();
}

function readOnly(disk: OpenDisk): boolean {
  return disk.record.readOnly || disk.device.capabilities.readOnly;
}

function describe(disk: OpenDisk): string {
  const mode = readOnly(disk) ? ", read-only" : "";
  const kind = disk.record.format === "vdisk" ? "vdisk disk" : `vdisk ${disk.record.format} disk`;
  return `${kind} ${disk.record.name}, ${formatSize(disk.device.size)}${mode}`;
}

function describeSnapshot(found: FoundSnapshot): string {
  return `vdisk snapshot ${found.name}, ${formatSize(found.layer.sizeBytes)}, read-only`;
}

async function infoOf(disk: OpenDisk, detailed: boolean): Promise<DiskInfo> {
  const usage = await usageAsync(disk.device);
  const info: DiskInfo = {
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
  if (detailed) info.engine = disk.engine.stats();
  if (detailed && disk.record.emulate) info.emulate = disk.record.emulate;
  if (disk.record.priority) info.priority = disk.record.priority;
  if (disk.record.pins) info.pins = disk.record.pins;
  if (detailed && disk.image && disk.device instanceof ImageVolume) {
    const image = disk.image.image;
    const head = disk.device.layer;
    const stats = image.stats();
    info.image = {
      file: disk.image.file,
      fileBytes: stats.fileBytes,
      dataBytes: stats.dataBytes,
      indexBytes: stats.indexBytes,
      freeBytes: stats.freeBytes,
      disks: [...disk.image.disks].sort(),
      snapshots: [...image.layers.values()].filter(
        (layer) => layer.kind === "snapshot" && layer.disk === disk.record.name,
      ).length,
      layers: await Promise.all([head, ...image.ancestors(head)].map((layer) => layerUsage(image, layer))),
    };
  }
  return info;
}
