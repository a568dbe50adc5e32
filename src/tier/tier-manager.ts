/**
 * TierManager: where each pool's data goes and what moves, decided by the pool's policy (pools.ts).
 *
 * Two halves:
 * - Placement of writes (`PoolPlacement`, the image's ImagePlacement): asked on every write that
 *   allocates, so it only reads precomputed tables (devices by class, capacities, each disk's pins,
 *   priority and last write). Pins first: a write into a pinned range goes to a device of the pinned
 *   class, and data of the range elsewhere is rewritten there (strict). Then the policy:
 *     static   new data next to its left neighbour, else on device 0; nothing moves
 *     heat     the same for writes (a realtime disk's new data goes to the fast class while it has room);
 *              the background pass moves the hottest extents to the fast class
 *     profile  a small (≤ profileSmallBytesMax) random write goes to the fast class, a large or sequential
 *              one to the slow class, and data of the range elsewhere follows it (strict); a realtime
 *              disk's writes go to the fast class while it has room
 *   Capacity: a device with a capacity takes an allocation only while the blocks the pool's images use on
 *   it stay within it (Image.usedBlocks, summed); otherwise the image falls back to device 0.
 * - Migration passes (`run`, and every `passIntervalMs` for pools that need them, unless the last pass
 *   moved nothing and no request, mapping change or setting came since): for heat, every disk's
 *   hottest extents (the monitor's heat, src/monitor/heat.ts) ranked by priority (realtime first), then
 *   heat, are taken until the fast class's capacity (× fastFillFraction) is spent; data on the fast class
 *   outside that set is demoted as far as the promotions need room, coldest first, then the set is
 *   promoted. For profile the same, except that a disk whose decayed profile is sequential-large has all
 *   its fast-class data demoted and nothing promoted (never a realtime disk). Pins are
 *   enforced by every pass, and a pinned range is never moved by a policy. Each move is one heat extent
 *   through Image.migrate (copy to new blocks, switch the index entry, free the old blocks once the next
 *   commit is durable: crash-safe), one at a time, paced to the pool's migrateBytesPerSecond.
 * - Removing a device (`evacuate`, for `vdisk pool remove-device`): the device is marked draining (no
 *   class lists it, its capacity counts as 0, so neither writes nor passes place data there), every
 *   head's data on it is migrated to its class's other devices or device 0, and every image commits so
 *   the old blocks are freed; what snapshots share cannot move and is reported by layer.
 * Priority also orders dispatch: every file on an emulated device goes through that device's queue
 * (src/devices/physical-device.ts) with the highest priority among its image's disks.
 *
 * Invariants: at most one pass per pool at a time; a move never spans a heat extent; pinned ranges are
 * only moved towards their pin.
 */
import { VdiskError, assert } from "../errors";
import type { BlockDevice } from "../devices/block-device";
import { parseLatencyModel } from "../devices/latency-device";
import {
  type DeviceHandle,
  PhysicalDevice,
  type PhysicalDeviceStats,
  type Priority,
} from "../devices/physical-device";
import { BLOCK_BYTES, deviceOfBlock } from "../image/format";
import type { Image, ImagePlacement, Layer } from "../image/image";
import { migrateBlocksMax, placementStrict } from "../image/image";
import type { TieredBacking } from "../image/tiered-backing";
import type { DiskRecord } from "../daemon/catalog";
import type { DiskHeatView } from "../monitor/heat";
import type { ProfileStats } from "../monitor/types";
import { profileSmallBytesMax } from "../limits";
import type { DiskPin, DiskPriority, PoolDevice, PoolRecord } from "./pools";

/** Time between background passes of a pool whose policy or pins move data. */
export const passIntervalMs = 10_000;
/** Share of the fast class's capacity the heat policy fills (the rest takes new writes). */
export const fastFillFraction = 0.9;
/** Hottest extents considered per disk per pass. */
export const heatCandidatesMax = 65_536;
/** Rounds of moving and committing `evacuate` makes before it reports what is left. */
const evacuateRoundsMax = 4;
/** Modelled size of an emulated device without a capacity (hdd seek distances are fractions of it). */
export const emulatedModelBytesDefault = 1024 ** 4;

export interface TierImage {
  pool: string;
  file: string;
  image: Image;
  backing: TieredBacking;
  disks: Array<{ record: DiskRecord }>;
}

/** What the monitor offers placement (daemon.ts wires StatsRecorder in). */
export interface HeatSource {
  heat(disk: string): DiskHeatView | null;
  profile(disk: string): ProfileStats | null;
}

export interface TierManagerOptions {
  pools(): PoolRecord[];
  images(): TierImage[];
  log: (message: string) => void;
}

export interface PassResult {
  pool: string;
  policy: string;
  promotions: number;
  demotions: number;
  pinMoves: number;
  bytesMoved: number;
  skippedBytes: number;
  ms: number;
}

export interface DeviceStatus {
  id: number;
  class: string;
  path: string;
  capacity: number | null;
  usedBytes: number;
  emulate: string | null;
  queue: PhysicalDeviceStats | null;
}

export interface DiskTierStatus {
  name: string;
  pool: string;
  priority: DiskPriority;
  pins: DiskPin[];
  /** Data bytes of the disk's view on each device of its pool. */
  devices: Array<{ id: number; class: string; bytes: number }>;
  /** The same, summed by class. */
  classes: Record<string, number>;
}

export interface PoolTierStatus {
  name: string;
  policy: string;
  fastClass: string;
  migrateBytesPerSecond: number;
  devices: DeviceStatus[];
  moving: { running: boolean; queued: number; current: string | null };
  migratedBytes: number;
  /** Passes finished since the daemon started. */
  passes: number;
  /** Background passes skipped: the last one moved nothing and nothing happened since. */
  idleSkips: number;
  lastPass: (PassResult & { at: string }) | null;
}

export interface TierStatus {
  pools: PoolTierStatus[];
  disks: DiskTierStatus[];
}

/** What `evacuate` did, and what it could not move. */
export interface Evacuation {
  bytesMoved: number;
  /** Blocks still in use on the device, in bytes (0: it can be removed). */
  remainingBytes: number;
  /** The layers whose view still maps data there (`DISK` or `DISK@SNAP`), when some is left. */
  holders: Array<{ layer: string; bytes: number }>;
}

interface DiskState {
  pool: string;
  pins: DiskPin[];
  priority: DiskPriority;
  /** Block after the disk's last write (profile policy: sequential detection). */
  lastEnd: number;
}

interface PoolState {
  record: PoolRecord;
  placement: PoolPlacement;
  /** Device ids by class. */
  byClass: Map<string, number[]>;
  /** Capacity in blocks by device id (Infinity: none; 0 while draining). */
  capacityBlocks: number[];
  /** Devices being emptied for removal (`evacuate`): no class lists them and nothing is placed there. */
  draining: Set<number>;
  images: Image[];
  running: Promise<PassResult> | null;
  queued: number;
  current: string | null;
  migratedBytes: number;
  passes: number;
  lastPass: (PassResult & { at: string }) | null;
  /** `signature` when the last pass started, and background passes skipped because it had not changed. */
  lastSignature: string | null;
  idleSkips: number;
  /** Incremented by every `refresh` (a change of pools, disks or settings). */
  generation: number;
  timer: NodeJS.Timeout | null;
}

const priorityRank: Record<DiskPriority, number> = { realtime: 0, normal: 1, background: 2 };

/** The ImagePlacement every image of one pool shares. */
export class PoolPlacement implements ImagePlacement {
  constructor(
    private readonly manager: TierManager,
    readonly pool: string,
  ) {}

  writeDevice(disk: string, block: number, blocks: number): number {
    return this.manager.writeDevice(this.pool, disk, block, blocks);
  }

  hasRoom(device: number, blocks: number): boolean {
    return this.manager.hasRoom(this.pool, device, blocks);
  }
}

export class TierManager {
  private readonly states = new Map<string, PoolState>();
  private readonly disks = new Map<string, DiskState>();
  /** Emulated devices, by "pool/id": one modelled head or channel set shared by all files on it. */
  private readonly physical = new Map<string, PhysicalDevice>();
  /** Device handles of each image file, whose priority follows the image's disks. */
  private readonly handles = new Map<string, DeviceHandle[]>();
  private heatSource: HeatSource | null = null;
  private closed = false;

  constructor(private readonly options: TierManagerOptions) {}

  /** The monitor, once the daemon has one (placement by heat and profile needs it). */
  setHeatSource(source: HeatSource | null): void {
    this.heatSource = source;
  }

  /** The ImagePlacement for images of `pool`. */
  placement(pool: string): PoolPlacement {
    return this.state(pool).placement;
  }

  /**
   * `file` (an image's file on device `device` of `pool`) as the image should use it: behind the device's
   * shared emulation and priority queue when it is emulated, else as it is.
   */
  deviceHandle(pool: string, device: PoolDevice, file: BlockDevice): BlockDevice {
    if (device.emulate === undefined) return file;
    const key = `${pool}/${device.id}`;
    let physical = this.physical.get(key);
    if (!physical) {
      physical = new PhysicalDevice({
        model: parseLatencyModel(device.emulate),
        clock: "real",
        modelBytes: device.capacity ?? emulatedModelBytesDefault,
      });
      this.physical.set(key, physical);
    }
    return physical.attach(file);
  }

  /** Record an image's device handles (after opening it) so its priority can follow its disks. */
  trackHandles(file: string, devices: ReadonlyArray<BlockDevice | undefined>): void {
    const handles = devices.filter(
      (device): device is DeviceHandle => device !== undefined && "priority" in device,
    );
    if (handles.length > 0) this.handles.set(file, handles);
    else this.handles.delete(file);
  }

  forgetHandles(file: string): void {
    this.handles.delete(file);
  }

  /**
   * Rebuild the tables placement reads (pools, capacities, disks' pins and priorities, images per pool)
   * and the dispatch priorities. The registry calls it after every change of pools, disks or settings.
   */
  refresh(): void {
    const pools = this.options.pools();
    const images = this.options.images();
    for (const record of pools) {
      const state = this.state(record.name);
      state.record = record;
      state.generation++;
      state.byClass = new Map();
      state.capacityBlocks = [];
      for (const device of record.devices) {
        if (state.draining.has(device.id)) {
          state.capacityBlocks[device.id] = 0;
          continue;
        }
        const list = state.byClass.get(device.class) ?? [];
        list.push(device.id);
        state.byClass.set(device.class, list);
        state.capacityBlocks[device.id] =
          device.capacity === undefined ? Infinity : Math.floor(device.capacity / BLOCK_BYTES);
      }
      state.images = images.filter((image) => image.pool === record.name).map((image) => image.image);
      this.schedule(state);
    }
    const seen = new Set<string>();
    for (const image of images) {
      let best: DiskPriority = "background";
      for (const { record } of image.disks) {
        seen.add(record.name);
        const previous = this.disks.get(record.name);
        const priority = record.priority ?? "normal";
        if (priorityRank[priority] < priorityRank[best]) best = priority;
        this.disks.set(record.name, {
          pool: record.pool,
          pins: record.pins ?? [],
          priority,
          lastEnd: previous?.lastEnd ?? -1,
        });
      }
      for (const handle of this.handles.get(image.file) ?? []) handle.priority = best as Priority;
    }
    for (const name of [...this.disks.keys()]) if (!seen.has(name)) this.disks.delete(name);
  }

  private state(pool: string): PoolState {
    let state = this.states.get(pool);
    if (!state) {
      const record = this.options.pools().find((candidate) => candidate.name === pool);
      if (!record) {
        throw new VdiskError("NOT_FOUND", `no pool named ${pool}`, {
          hint: "vdisk pool list shows the pools; vdisk pool create NAME makes one",
        });
      }
      state = {
        record,
        placement: new PoolPlacement(this, pool),
        byClass: new Map(),
        capacityBlocks: [],
        draining: new Set(),
        images: [],
        running: null,
        queued: 0,
        current: null,
        migratedBytes: 0,
        passes: 0,
        lastPass: null,
        lastSignature: null,
        idleSkips: 0,
        generation: 0,
        timer: null,
      };
      this.states.set(pool, state);
    }
    return state;
  }

  // ---- Placement of writes (hot path: no allocation) ------------------------------------------------

  writeDevice(pool: string, disk: string, block: number, blocks: number): number {
    const state = this.states.get(pool);
    const diskState = this.disks.get(disk);
    if (state === undefined || diskState === undefined) return -1;
    const sequential = block === diskState.lastEnd;
    diskState.lastEnd = block + blocks;
    const pins = diskState.pins;
    for (let i = 0; i < pins.length; i++) {
      const pin = pins[i] as DiskPin;
      if (pinOverlaps(pin, block, block + blocks)) {
        const device = this.deviceWithRoom(state, pin.class, blocks);
        if (device >= 0) return device + placementStrict;
      }
    }
    const fastClass = state.record.fastClass;
    switch (state.record.policy) {
      case "profile": {
        if (diskState.priority === "realtime") {
          const device = this.deviceWithRoom(state, fastClass, blocks);
          if (device >= 0) return device;
        }
        const small = blocks * BLOCK_BYTES <= profileSmallBytesMax;
        const device =
          small && !sequential
            ? this.deviceWithRoom(state, fastClass, blocks)
            : this.slowDevice(state, blocks);
        return device >= 0 ? device + placementStrict : -1;
      }
      case "heat":
      case "static":
        return diskState.priority === "realtime" ? this.deviceWithRoom(state, fastClass, blocks) : -1;
    }
  }

  hasRoom(pool: string, device: number, blocks: number): boolean {
    const state = this.states.get(pool);
    if (state === undefined) return true;
    const capacity = state.capacityBlocks[device];
    if (capacity === undefined || capacity === Infinity) return true;
    return usedBlocks(state, device) + blocks <= capacity;
  }

  /** A device of `cls` with room for `blocks`, or -1. */
  private deviceWithRoom(state: PoolState, cls: string, blocks: number): number {
    const devices = state.byClass.get(cls);
    if (devices === undefined) return -1;
    for (let i = 0; i < devices.length; i++) {
      const device = devices[i] as number;
      if (this.hasRoom(state.record.name, device, blocks)) return device;
    }
    return -1;
  }

  /** A device outside the fast class with room (device 0 first), or -1. */
  private slowDevice(state: PoolState, blocks: number): number {
    for (const device of state.record.devices) {
      // A draining device has capacity 0, so hasRoom keeps it out too.
      if (device.class !== state.record.fastClass && this.hasRoom(state.record.name, device.id, blocks))
        return device.id;
    }
    return -1;
  }

  // ---- Migration passes ----------------------------------------------------------------------------

  private schedule(state: PoolState): void {
    const moves =
      state.record.devices.length > 1 &&
      (state.record.policy !== "static" ||
        [...this.disks.values()].some((disk) => disk.pool === state.record.name && disk.pins.length > 0));
    if (moves && state.timer === null && !this.closed) {
      state.timer = setInterval(() => {
        if (state.running !== null) return;
        // A pass that moved nothing, with no request, mapping change or setting since it started, would
        // find the same and move nothing again — but it would map every disk (reading back evicted
        // index leaves): skip it.
        const last = state.lastPass;
        if (
          last !== null &&
          last.promotions + last.demotions + last.pinMoves === 0 &&
          state.lastSignature === this.signature(state)
        ) {
          state.idleSkips++;
          return;
        }
        this.run(state.record.name).catch(() => undefined);
      }, passIntervalMs);
      state.timer.unref();
    } else if (!moves && state.timer !== null) {
      clearInterval(state.timer);
      state.timer = null;
    }
  }

  /** One placement pass of `pool` now (or the running one), resolved once its moves are done. */
  run(pool: string): Promise<PassResult> {
    const state = this.state(pool);
    if (state.running) return state.running;
    const running = this.pass(state).finally(() => {
      state.running = null;
      state.current = null;
      state.queued = 0;
    });
    state.running = running;
    return running;
  }

  /**
   * What a pass of `state` depends on besides time: settings, the images' mappings, the disks' requests,
   * the blocks in use on each device (frees and punches make room).
   */
  private signature(state: PoolState): string {
    let changes = 0;
    let recorded = 0;
    let used = 0;
    for (const image of state.images) changes += image.mappingChanges;
    for (const device of state.record.devices) used += usedBlocks(state, device.id);
    for (const [name, disk] of this.disks) {
      if (disk.pool === state.record.name) recorded += this.heatSource?.heat(name)?.recorded ?? 0;
    }
    return `${state.generation}/${changes}/${recorded}/${used}`;
  }

  private async pass(state: PoolState): Promise<PassResult> {
    const started = Date.now();
    state.lastSignature = this.signature(state);
    const record = state.record;
    const result: PassResult = {
      pool: record.name,
      policy: record.policy,
      promotions: 0,
      demotions: 0,
      pinMoves: 0,
      bytesMoved: 0,
      skippedBytes: 0,
      ms: 0,
    };
    if (record.devices.length === 1) return this.finishPass(state, result, started);
    const images = this.options.images().filter((image) => image.pool === record.name);
    const fast = new Set(state.byClass.get(record.fastClass) ?? []);
    const heads: Array<{ image: Image; layer: Layer; disk: DiskState; name: string }> = [];
    for (const entry of images) {
      for (const { record: diskRecord } of entry.disks) {
        const layer = entry.image.head(diskRecord.name);
        const disk = this.disks.get(diskRecord.name);
        if (layer && disk) heads.push({ image: entry.image, layer, disk, name: diskRecord.name });
      }
    }
    type Move = {
      image: Image;
      layer: Layer;
      start: number;
      end: number;
      /** The target device, or -1: a device of `targetClass` with room when the move runs. */
      device: number;
      targetClass: string | null;
      kind: "promotions" | "demotions" | "pinMoves";
    };
    const moves: Move[] = [];
    const pinnedClass = (disk: DiskState, block: number, end: number): string | null => {
      for (const pin of disk.pins) if (pinOverlaps(pin, block, end)) return pin.class;
      return null;
    };
    // Where each head's data is, by heat extent: extent → devices holding some of it.
    const extentBlocks = new Map<string, number>();
    const onDevices = new Map<string, Map<number, Set<number>>>();
    for (const head of heads) {
      const blocksPer = Math.max(1, this.extentBytes(head.name) / BLOCK_BYTES);
      extentBlocks.set(head.name, blocksPer);
      const map = new Map<number, Set<number>>();
      await head.image.scanData(head.layer, (run) => {
        const device = deviceOfBlock(run.address);
        for (let e = Math.floor(run.block / blocksPer); e * blocksPer < run.block + run.count; e++) {
          let set = map.get(e);
          if (!set) map.set(e, (set = new Set()));
          set.add(device);
        }
      });
      onDevices.set(head.name, map);
    }
    // 1. Pins: every extent of a pinned range onto a device of its class. Pinned data on the fast class
    //    comes out of the heat budget.
    let pinnedFastBlocks = 0;
    for (const head of heads) {
      if (head.disk.pins.length === 0) continue;
      const blocksPer = extentBlocks.get(head.name) as number;
      for (const [extent, devices] of onDevices.get(head.name) as Map<number, Set<number>>) {
        const start = extent * blocksPer;
        const end = Math.min(head.layer.blocks, start + blocksPer);
        const cls = pinnedClass(head.disk, start, end);
        if (cls === null) continue;
        if (cls === record.fastClass) pinnedFastBlocks += end - start;
        const targets = state.byClass.get(cls) ?? [];
        if ([...devices].every((device) => targets.includes(device))) continue;
        moves.push({ ...head, start, end, device: -1, targetClass: cls, kind: "pinMoves" });
      }
    }
    // 2. The policy's hot set.
    if (record.policy !== "static" && fast.size > 0 && this.heatSource !== null) {
      let budget = 0;
      for (const id of fast) budget += state.capacityBlocks[id] ?? Infinity;
      budget = budget === Infinity ? Infinity : Math.floor(budget * fastFillFraction) - pinnedFastBlocks;
      const candidates: Array<{ head: (typeof heads)[number]; extent: number; heat: number }> = [];
      const demoteAll = new Set<string>();
      for (const head of heads) {
        if (record.policy === "profile" && head.disk.priority !== "realtime") {
          // A disk whose recent workload is mostly large and sequential belongs on the slow class.
          if (this.heatSource.profile(head.name)?.kind === "sequential-large") {
            demoteAll.add(head.name);
            continue;
          }
        }
        const view = this.heatSource.heat(head.name);
        if (view === null) continue;
        const blocksPer = view.extentBytes / BLOCK_BYTES;
        const located = onDevices.get(head.name) as Map<number, Set<number>>;
        for (const hot of view.hottest(heatCandidatesMax)) {
          const extent = Math.floor(hot.offset / view.extentBytes);
          if (!located.has(extent)) continue; // nothing written there: nothing to place
          if (pinnedClass(head.disk, extent * blocksPer, (extent + 1) * blocksPer) !== null) continue;
          candidates.push({ head, extent, heat: hot.heat });
        }
      }
      candidates.sort(
        (a, b) => priorityRank[a.head.disk.priority] - priorityRank[b.head.disk.priority] || b.heat - a.heat,
      );
      const chosen = new Set<string>();
      let spent = 0;
      for (const candidate of candidates) {
        const blocksPer = extentBlocks.get(candidate.head.name) as number;
        if (spent + blocksPer > budget) break;
        spent += blocksPer;
        chosen.add(`${candidate.head.name}:${candidate.extent}`);
      }
      let needBlocks = 0;
      for (const move of moves)
        if (move.targetClass === record.fastClass) needBlocks += move.end - move.start;
      for (const candidate of candidates) {
        const { head, extent } = candidate;
        if (!chosen.has(`${head.name}:${extent}`)) continue;
        const devices = (onDevices.get(head.name) as Map<number, Set<number>>).get(extent) as Set<number>;
        if ([...devices].every((device) => fast.has(device))) continue;
        const blocksPer = extentBlocks.get(head.name) as number;
        const start = extent * blocksPer;
        const end = Math.min(head.layer.blocks, start + blocksPer);
        needBlocks += end - start;
        moves.push({ ...head, start, end, device: -1, targetClass: record.fastClass, kind: "promotions" });
      }
      // Demote only what the promotions and pins need room for (beyond what is free), coldest first — and
      // everything on the fast class of a disk the profile policy does not want there. Demoting all data
      // outside the chosen set would churn: data placed by writes would be moved back at every pass.
      // A fast device over its capacity (lowered by `pool set-device`) gives back the excess as well.
      let freeBlocks = 0;
      let overBlocks = 0;
      for (const id of fast) {
        const capacity = state.capacityBlocks[id] ?? Infinity;
        const used = usedBlocks(state, id);
        freeBlocks += Math.max(0, capacity - used);
        overBlocks += Math.max(0, used - capacity);
      }
      let demoteBlocks = Math.max(0, needBlocks - freeBlocks) + overBlocks;
      const demotable: Array<{ head: (typeof heads)[number]; start: number; end: number; heat: number }> = [];
      for (const head of heads) {
        const blocksPer = extentBlocks.get(head.name) as number;
        const view = this.heatSource.heat(head.name);
        for (const [extent, devices] of onDevices.get(head.name) as Map<number, Set<number>>) {
          if (![...devices].some((device) => fast.has(device))) continue;
          const start = extent * blocksPer;
          const end = Math.min(head.layer.blocks, start + blocksPer);
          if (pinnedClass(head.disk, start, end) !== null) continue;
          const mandatory = demoteAll.has(head.name);
          if (!mandatory && chosen.has(`${head.name}:${extent}`)) continue;
          const heat = mandatory
            ? -1
            : (view?.rangeHeat(start * BLOCK_BYTES, (end - start) * BLOCK_BYTES) ?? 0);
          demotable.push({ head, start, end, heat });
        }
      }
      demotable.sort((a, b) => a.heat - b.heat);
      for (const { head, start, end, heat } of demotable) {
        if (heat >= 0 && demoteBlocks <= 0) break;
        const target = this.slowDevice(state, end - start);
        if (target < 0) continue;
        moves.push({ ...head, start, end, device: target, targetClass: null, kind: "demotions" });
        demoteBlocks -= end - start;
      }
    }
    // 3. Run them one at a time, paced: demotions first (they make room), then pins, then promotions.
    const order = { demotions: 0, pinMoves: 1, promotions: 2 };
    moves.sort((a, b) => order[a.kind] - order[b.kind]);
    state.queued = moves.length;
    const demoted = new Set<Image>();
    const release = async (): Promise<void> => {
      for (const image of demoted) await releaseFreed(image);
      demoted.clear();
    };
    for (const move of moves) {
      if (this.closed) break;
      if (move.kind !== "demotions" && demoted.size > 0) await release();
      const device =
        move.device >= 0
          ? move.device
          : this.deviceWithRoom(state, move.targetClass as string, move.end - move.start);
      state.queued--;
      if (device < 0) {
        result.skippedBytes += (move.end - move.start) * BLOCK_BYTES;
        continue;
      }
      state.current = `${move.layer.name} ${move.start * BLOCK_BYTES}+${(move.end - move.start) * BLOCK_BYTES} → device ${device}`;
      let moved;
      try {
        moved = await move.image.migrate(move.layer, move.start, move.end, device);
      } catch (err) {
        this.options.log(`tier: moving ${state.current} failed: ${String(err)}`);
        continue;
      }
      const bytes = moved.movedBlocks * BLOCK_BYTES;
      result.bytesMoved += bytes;
      result.skippedBytes += moved.skippedBlocks * BLOCK_BYTES;
      state.migratedBytes += bytes;
      if (bytes > 0) result[move.kind]++;
      if (bytes > 0 && move.kind === "demotions") demoted.add(move.image);
      if (bytes > 0) await sleep((bytes / record.migrateBytesPerSecond) * 1000);
    }
    // A pass of demotions only (a lowered capacity, a disk gone sequential) leaves the room it made free.
    if (!this.closed) await release();
    return this.finishPass(state, result, started);
  }

  private finishPass(state: PoolState, result: PassResult, started: number): PassResult {
    result.ms = Date.now() - started;
    state.passes++;
    state.lastPass = { ...result, at: new Date().toISOString() };
    return result;
  }

  private extentBytes(disk: string): number {
    return this.heatSource?.heat(disk)?.extentBytes ?? 1024 * 1024;
  }

  // ---- Removing a device ----------------------------------------------------------------------------

  /**
   * Empty device `device` of `pool` for its removal: from now on nothing is placed there, and the data of
   * every disk on it is moved (Image.migrate, paced like a pass) to another device of its class with
   * room, else to device 0; then every image of the pool commits, so the old blocks are freed. Data that
   * snapshots share cannot move (it would be duplicated): what is left is reported, by layer, and the
   * device stays draining until `undrain` or `forgetDevice`.
   */
  async evacuate(pool: string, device: number): Promise<Evacuation> {
    const state = this.state(pool);
    const cls = state.record.devices.find((candidate) => candidate.id === device)?.class;
    assert(device >= 1 && cls !== undefined, "an added device of the pool");
    state.draining.add(device);
    this.refresh();
    const result: Evacuation = { bytesMoved: 0, remainingBytes: 0, holders: [] };
    for (let round = 0; round < evacuateRoundsMax && !this.closed; round++) {
      let moved = 0;
      const images = this.options.images().filter((image) => image.pool === pool);
      for (const entry of images) {
        for (const { record } of entry.disks) {
          const layer = entry.image.head(record.name);
          if (!layer) continue;
          const runs: Array<{ block: number; count: number }> = [];
          await entry.image.scanData(layer, (run) => {
            if (deviceOfBlock(run.address) === device) runs.push({ block: run.block, count: run.count });
          });
          for (const run of runs) {
            for (
              let start = run.block;
              start < run.block + run.count && !this.closed;
              start += migrateBlocksMax
            ) {
              const end = Math.min(run.block + run.count, start + migrateBlocksMax);
              const target = Math.max(0, this.deviceWithRoom(state, cls, end - start));
              state.current = `${layer.name} ${start * BLOCK_BYTES}+${(end - start) * BLOCK_BYTES} → device ${target} (removing device ${device})`;
              const bytes = (await entry.image.migrate(layer, start, end, target)).movedBlocks * BLOCK_BYTES;
              moved += bytes;
              state.migratedBytes += bytes;
              if (bytes > 0) await sleep((bytes / state.record.migrateBytesPerSecond) * 1000);
            }
          }
        }
        await releaseFreed(entry.image);
      }
      state.current = null;
      result.bytesMoved += moved;
      let remaining = 0;
      for (const entry of images) remaining += entry.image.usedBlocks(device);
      result.remainingBytes = remaining * BLOCK_BYTES;
      if (remaining === 0) return result;
      // Nothing moved: what is left is shared with snapshots, or freed blocks an older request still
      // reads (released after the next commit). One more round tells them apart.
      if (moved === 0 && round > 0) break;
    }
    for (const entry of this.options.images().filter((image) => image.pool === pool)) {
      for (const layer of entry.image.layers.values()) {
        const bytes = (await entry.image.layerDeviceBytes(layer))[device] ?? 0;
        if (bytes > 0) {
          const name = layer.kind === "snapshot" ? `${layer.disk}@${layer.name}` : layer.disk;
          result.holders.push({ layer: name, bytes });
        }
      }
    }
    return result;
  }

  /** Place data on a draining device again (its removal was refused). */
  undrain(pool: string, device: number): void {
    this.state(pool).draining.delete(device);
    this.refresh();
  }

  /** Device `device` left `pool` (after `evacuate`): forget its draining mark and its emulation. */
  forgetDevice(pool: string, device: number): void {
    this.state(pool).draining.delete(device);
    this.physical.delete(`${pool}/${device}`);
    this.refresh();
  }

  // ---- Status --------------------------------------------------------------------------------------

  /**
   * Pools, and each disk's bytes per device (mapping a disk's whole view): of every disk (`all`, or only
   * `disk` when given), of the disks of pools with several devices (`tiered`), or of none.
   */
  async status(disk?: string, disks: "all" | "tiered" | "none" = "all"): Promise<TierStatus> {
    const images = this.options.images();
    const pools: PoolTierStatus[] = [];
    for (const record of this.options.pools()) {
      const state = this.state(record.name);
      pools.push({
        name: record.name,
        policy: record.policy,
        fastClass: record.fastClass,
        migrateBytesPerSecond: record.migrateBytesPerSecond,
        devices: record.devices.map((device) => ({
          id: device.id,
          class: device.class,
          path: device.path,
          capacity: device.capacity ?? null,
          usedBytes: usedBlocks(state, device.id) * BLOCK_BYTES,
          emulate: device.emulate ?? null,
          queue: this.physical.get(`${record.name}/${device.id}`)?.stats() ?? null,
        })),
        moving: { running: state.running !== null, queued: state.queued, current: state.current },
        migratedBytes: state.migratedBytes,
        passes: state.passes,
        idleSkips: state.idleSkips,
        lastPass: state.lastPass,
      });
    }
    const found: DiskTierStatus[] = [];
    for (const entry of disks === "none" ? [] : images) {
      const record = this.options.pools().find((pool) => pool.name === entry.pool);
      if (disks === "tiered" && (record?.devices.length ?? 1) < 2) continue;
      for (const { record: diskRecord } of entry.disks) {
        if (disk !== undefined && diskRecord.name !== disk) continue;
        const layer = entry.image.head(diskRecord.name);
        if (!layer) continue;
        const bytes = await entry.image.layerDeviceBytes(layer);
        const devices = (record?.devices ?? []).map((device) => ({
          id: device.id,
          class: device.class,
          bytes: bytes[device.id] ?? 0,
        }));
        const classes: Record<string, number> = {};
        for (const device of devices) classes[device.class] = (classes[device.class] ?? 0) + device.bytes;
        found.push({
          name: diskRecord.name,
          pool: entry.pool,
          priority: diskRecord.priority ?? "normal",
          pins: diskRecord.pins ?? [],
          devices,
          classes,
        });
      }
    }
    if (disk !== undefined && found.length === 0) {
      throw new VdiskError("NOT_FOUND", `no vdisk-format disk named ${disk}`, {
        hint: "vdisk list shows the disks; tiering applies to vdisk-format disks",
      });
    }
    found.sort((a, b) => a.name.localeCompare(b.name));
    return { pools, disks: found };
  }

  /** Stop the background passes (the daemon is stopping); a running pass stops after its current move. */
  async close(): Promise<void> {
    this.closed = true;
    for (const state of this.states.values()) {
      if (state.timer !== null) clearInterval(state.timer);
      state.timer = null;
      await state.running?.catch(() => undefined);
    }
  }
}

/** Blocks the pool's images use on `device`, summed (Image.usedBlocks). */
function usedBlocks(state: PoolState, device: number): number {
  let used = 0;
  for (let i = 0; i < state.images.length; i++) used += (state.images[i] as Image).usedBlocks(device);
  return used;
}

/**
 * Make the blocks `image` freed by moves free again: they are released once a commit that no longer
 * reaches them is durable (the second commit), then punched (settle).
 */
async function releaseFreed(image: Image): Promise<void> {
  await image.commit();
  await image.commit();
  await image.settle();
}

/** Whether `pin` covers any of blocks [start, end). */
function pinOverlaps(pin: DiskPin, start: number, end: number): boolean {
  return start < (pin.end === null ? Infinity : pin.end / BLOCK_BYTES) && end > pin.start / BLOCK_BYTES;
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
