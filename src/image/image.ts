/**
 * The vdisk image: one file holding a tree of layers (snapshots and heads) that share a copy-on-write
 * sparse index. This module owns the in-memory index, the space bookkeeping and the commit protocol;
 * `volume.ts` turns a layer into a BlockDevice. docs/image-format.md explains the design.
 *
 * Index. Each layer has a full-view sparse tree (format.ts: 4 KiB nodes of 512 64-bit units; a unit is
 * EMPTY, ZERO, DATA covering its whole span, or a child NODE). Trees share subtrees: a snapshot or a clone
 * starts as another reference to the same root node. A lookup walks one tree from its root, whatever
 * the chain depth — the dm-thin answer to qcow2's backing chains. A node referenced more than once is
 * copied before it is changed (copy-on-write, top-down), so a frozen layer never changes.
 *
 * Memory. Every live node has an IndexNode object (its identity is what parents and layers share, and it
 * carries the reference count), but only upper levels (one node per 512 leaves) always hold their
 * content. A clean leaf that is on disk may lose its content to the image's IndexCache (index-cache.ts)
 * and become a shell; `isResident` / `ensureResident` (volume.ts calls them before every `map` and
 * `apply`) read missing leaves back — one 4 KiB read each, checked like at open, loads of the same leaf
 * shared — and then continue synchronously, so the tree is still only read and changed synchronously.
 * Leaves a request waited for are pinned until its synchronous step has run; eviction happens only
 * after loads, after commits and at open. Dirty leaves are never evicted: once they pass half the cache
 * limit, a commit is started to make them clean. A leaf that dies while evicted (its last reference
 * dropped by a trim, a rollback, a deletion) is released in the background: its block is read once more
 * to drop its data's references (`releaseQueue`). Whole-tree reports read evicted leaves without
 * caching them (`layerStatsAsync`, `checkConsistency`, `verify`).
 *
 * Space. Reference counts live in memory and are rebuilt at open by walking every layer (shared nodes
 * once): `node.refs` counts the slots pointing at a node, `dataRefs` counts, per block of the file, the
 * units covering it. A write goes in place only when every node on its path and its data blocks are
 * referenced once, and none of them lost a reference since the last durable commit (the committed tree
 * may still reach them through it: `sharedEpoch`, `pinned`); otherwise it goes to newly allocated blocks and the mapping is switched when the data
 * is written. When a node fills with DATA units that are contiguous, it collapses into one unit of its
 * parent (SNPdisk's regrouping): a sequentially written region costs one unit and reads as one request.
 *
 * Commit (flush, snapshot, clone, rollback, delete, resize). Dirty nodes are written to fresh blocks,
 * then the layer table, fdatasync, then the other superblock slot, fdatasync. A committed block is never
 * overwritten while a committed superblock reaches it; blocks freed since are released only after the
 * commit that stops referencing them is durable and no I/O that began before the free is still in
 * flight (`epoch` bookkeeping), then punched out of the file so the image stays thin — coalesced, one
 * punch at a time in the background, and allocatable again only once punched.
 *
 * Concurrency: everything here runs on the event loop; the tree changes only synchronously. Structural
 * operations close a write gate, wait for in-flight writes, change the layers, commit, and reopen it.
 */
import { VdiskError, assert, fromSystemError } from "../errors";
import type { BlockDevice } from "../devices/block-device";
import { flushAsync, readAsync, resizeAsync, trimAsync, writeAsync } from "../devices/promises";
import { FreeSpace, RefcountMap } from "./extent-map";
import { type CacheEntry, IndexCache, leafPayloadBytes } from "./index-cache";
import { RangeLocks } from "./range-locks";
import { TieredBacking } from "./tiered-backing";
import {
  BLOCK_BYTES,
  BLOCK_SHIFT,
  DEVICE_REGION_BLOCKS,
  type DeviceEnds,
  FANOUT,
  FIRST_ALLOCATABLE_BLOCK,
  dataExtentInside,
  deviceOfBlock,
  type LayerRecord,
  type LayerTable,
  type DecodedNode,
  UnitType,
  type UnitTypeValue,
  allocateNodeArrays,
  decodeLayerTable,
  decodeNode,
  decodeSuperblock,
  encodeLayerTable,
  encodeNode,
  encodeSuperblock,
  layerTableCrc,
  rootLevelFor,
  unitSpanBlocks,
} from "./format";

/** Commit on a timer when something is dirty, so a crash loses at most this much unflushed work. */
export const autoCommitMs = 5_000;
/** Dirty nodes written per write call during a commit. */
const commitWriteBlocksMax = 256;
/** Full leaves waiting for a regrouping copy; more are skipped (they stay correct, just not compact). */
const regroupQueueMax = 1024;
/** Parallel reads when loading the index at open, and when reading evicted leaves in bulk. */
const loadParallelism = 32;
/** Dirty leaves an image may hold before a commit is started early, when the cache limit is lower. */
const dirtyLeavesCommitMin = 64;
/** Blocks one `migrate` call may cover (its range stays locked while it copies): 64 MiB. */
export const migrateBlocksMax = 16_384;
/** Rounds of loading a request waits for before giving up (each needs the tree to change under it). */
const residentAttemptsMax = 64;

/** What a request needs resident over its blocks (`isResident`, `ensureResident`). */
export const Need = {
  /** Every leaf the range reaches: `map`, and everything that reads the mapping. */
  LOOKUP: 0,
  /** Only leaves the range covers in part: `apply` replaces whole ones without reading them. */
  UPDATE: 1,
} as const;
export type NeedValue = (typeof Need)[keyof typeof Need];

/** The `children` of every leaf: leaves have no child nodes (frozen: setting one is a bug). */
const noChildren = Object.freeze([]) as unknown as Array<IndexNode | undefined>;

export class IndexNode implements CacheEntry {
  /** The content; null while the node is evicted (only clean leaves on disk are; index-cache.ts). */
  types: Uint8Array | null = null;
  addresses: Float64Array | null = null;
  /** Child nodes of NODE units; every leaf shares `noChildren`. */
  readonly children: Array<IndexNode | undefined>;
  refs = 0;
  /**
   * The epoch in which the node last lost a reference and kept others (-1: never). Until the commit of
   * that epoch is durable, the committed tree still reaches the node through the dropped reference, so
   * the node is not exclusive even at `refs` 1 (`Image.nodeExclusive`).
   */
  sharedEpoch = -1;
  /** Where the node is on disk; -1 while it was never written. */
  diskAddress = -1;
  dirty = true;
  /** CRC-32 (as int32) of the node as last written or read: a leaf read back must carry the same. */
  crc = 0;
  lruPrev: CacheEntry | null = null;
  lruNext: CacheEntry | null = null;

  /** A node with empty content, or (`resident` false) a shell whose content is still to be read. */
  constructor(
    readonly level: number,
    resident = true,
  ) {
    this.children = level === 0 ? noChildren : new Array<IndexNode | undefined>(FANOUT);
    if (resident) {
      const arrays = allocateNodeArrays();
      this.types = arrays.types;
      this.addresses = arrays.addresses;
    }
  }

  dropPayload(): void {
    this.types = null;
    this.addresses = null;
  }
}

function typesOf(node: IndexNode): Uint8Array {
  const types = node.types;
  if (types === null) notResident(node);
  return types;
}

function addressesOf(node: IndexNode): Float64Array {
  const addresses = node.addresses;
  if (addresses === null) notResident(node);
  return addresses;
}

function notResident(node: IndexNode): never {
  throw new Error(
    `invariant violated: index node at block ${node.diskAddress} (level ${node.level}) used while evicted`,
  );
}

/** One slot's content: a unit of a node, or a layer's root. */
interface Slot {
  type: UnitTypeValue;
  address: number;
  node: IndexNode | undefined;
}

export class Layer {
  constructor(
    readonly id: number,
    public name: string,
    public kind: "head" | "snapshot",
    public disk: string,
    public parent: number | null,
    public sizeBytes: number,
    readonly createdMs: number,
    /** The root slot: a unit at level rootLevel + 1. */
    public root: Slot,
    public rootLevel: number,
  ) {}

  get blocks(): number {
    return Math.ceil(this.sizeBytes / BLOCK_BYTES);
  }
}

/** A mapped run of blocks, as the read and write paths see it. */
export interface Run {
  block: number;
  count: number;
  type: UnitTypeValue;
  /** Physical block of `block` for DATA runs. */
  address: number;
  /** Every node on the path is referenced once (data exclusivity is checked separately). */
  pathExclusive: boolean;
}

interface PendingFree {
  start: number;
  length: number;
  epoch: number;
}

export interface LayerStats {
  id: number;
  name: string;
  kind: "head" | "snapshot";
  disk: string;
  parent: number | null;
  sizeBytes: number;
  createdMs: number;
  /** Bytes of data this layer's view maps (shared or not). */
  mappedBytes: number;
  /** Bytes of data only this layer references: what deleting it would free. */
  exclusiveBytes: number;
  /** Index nodes reachable from this layer, and those only it references. */
  indexBytes: number;
  exclusiveIndexBytes: number;
}

export interface ImageStats {
  fileBytes: number;
  dataBytes: number;
  indexBytes: number;
  freeBytes: number;
  layers: number;
  commits: number;
  sequence: number;
}

/**
 * Where a pool wants an image's data (src/tier/placement.ts); absent for an image with one device. The
 * image asks on every write that allocates, so answers must be cheap and allocate nothing.
 */
export interface ImagePlacement {
  /**
   * The device for the data of a write of `blocks` blocks at `block` of the head `disk`, or -1 for no
   * preference (the left neighbour's device, else device 0). With `placementStrict` added, data of the
   * range that lies on another device is rewritten on this one instead of being overwritten in place.
   */
  writeDevice(disk: string, block: number, blocks: number): number;
  /** Whether `blocks` more blocks may be allocated on `device` within the pool's capacity for it. */
  hasRoom(device: number, blocks: number): boolean;
}

/** Added to ImagePlacement.writeDevice's answer: move data of the range that is elsewhere. */
export const placementStrict = 64;

/** What a migration did (Image.migrate). */
export interface MigrationResult {
  /** Blocks copied to the target device and remapped. */
  movedBlocks: number;
  /** Blocks of the range left where they are: shared with another layer, or no room on the target. */
  skippedBlocks: number;
}

export class Image {
  readonly layers = new Map<number, Layer>();
  dataRefs = new RefcountMap();
  /** Free space per device (index = device; device 0 is the image file); see format.ts "image address". */
  spaces: Array<FreeSpace | undefined>;
  /** The router over the image's devices, when it has more than one; null: `backing` is the image file. */
  readonly tiered: TieredBacking | null;
  /** Where writes go and how much fits, for an image in a pool with several devices. */
  placement: ImagePlacement | null = null;
  /** Blocks copied to another device by `migrate`. */
  migratedBlocks = 0;
  /** Calls of `apply` (every change of a head's mapping): unchanged means no layer's data moved. */
  mappingChanges = 0;
  private sequence = 0;
  private nextLayerId = 1;
  private layerTableAddress = -1;
  private layerTableBlocks = 0;
  private layersDirty = false;
  private nodesDirty = false;
  private pendingFrees: PendingFree[] = [];
  /**
   * Data blocks that lost a reference since the last durable commit, counted once per loss: the committed
   * tree may still reach them through it, so they are not overwritten in place even when `dataRefs` says
   * one reference is left (another disk's durable mapping would see the new data after a power cut).
   * `pinList` stamps each with its epoch; the commit of that epoch releases it.
   */
  readonly pinned = new RefcountMap();
  private pinList: PendingFree[] = [];
  /** Incremented at the start of each commit; frees and I/O are stamped with it. */
  private epoch = 1;
  private committedEpoch = 0;
  private readonly inflightByEpoch = new Map<number, number>();
  private commitRunning: Promise<void> | null = null;
  private commitWanted: Promise<void> | null = null;
  private commitTimer: NodeJS.Timeout | null = null;
  private growing: Promise<void> | null = null;
  private applyingLayer: Layer | null = null;
  private readonly regroupQueue: Array<{ layerId: number; start: number }> = [];
  private regroupRunning: Promise<void> | null = null;
  private closing = false;
  /** Leaves copied into contiguous extents so far. */
  regroups = 0;
  /** Leaves that died while evicted and were read back in the background to release their data. */
  evictedReleases = 0;
  private closed = false;
  commits = 0;

  // Write gate for structural operations.
  private inflightWrites = 0;
  private gateClosed = false;
  private readonly gateWaiters: Array<() => void> = [];
  private readonly drainWaiters: Array<() => void> = [];
  private structuralQueue: Promise<unknown> = Promise.resolve();
  /** Range locks per layer, shared by every volume of that layer. */
  private readonly rangeLocks = new Map<number, RangeLocks>();

  // Index residency (index-cache.ts).
  /** Leaf loads in progress, shared by every request that waits for the same leaf. */
  private readonly loading = new Map<IndexNode, Promise<void>>();
  /** Resident leaves marked dirty (never evictable); past a threshold a commit starts early. */
  private dirtyLeaves = 0;
  /** Resident leaves found by the last residency walk (added to the cache's hits when it succeeds). */
  private walkHits = 0;
  /** Evicted leaves whose last reference was dropped: their data references are dropped in background. */
  private readonly releaseQueue: IndexNode[] = [];
  private releaseRunning: Promise<void> | null = null;
  /** Released leaves that could not be read back: their data stays allocated until the image reopens. */
  private readonly releaseFailures: string[] = [];
  /** A commit is about to start because dirty leaves passed half the cache limit. */
  private pressureCommit = false;

  private constructor(
    readonly backing: BlockDevice,
    readonly readOnly: boolean,
    fileBlocks: number,
    /** Holds the content of this image's leaves within its budget; may be shared with other images. */
    readonly indexCache: IndexCache,
  ) {
    this.tiered = backing instanceof TieredBacking ? backing : null;
    this.spaces = [
      new FreeSpace(
        FIRST_ALLOCATABLE_BLOCK,
        Math.max(fileBlocks, FIRST_ALLOCATABLE_BLOCK),
        DEVICE_REGION_BLOCKS,
      ),
    ];
    const devices = this.tiered?.devices ?? [];
    for (let d = 1; d < devices.length; d++)
      if (devices[d] !== undefined) this.spaces[d] = this.freshSpace(d);
  }

  /** All of device d's file as free space (d ≥ 1: data only), growable to the end of its region. */
  private freshSpace(device: number): FreeSpace {
    const first = device * DEVICE_REGION_BLOCKS;
    return new FreeSpace(first, first + this.deviceBlocks(device), first + DEVICE_REGION_BLOCKS);
  }

  /** Start using device `device` (its file `file`, empty or holding this image's data): a pool gained it. */
  attachDevice(device: number, file: BlockDevice): void {
    assert(this.tiered !== null, "only an image over a TieredBacking gains devices");
    assert(device >= 1 && this.spaces[device] === undefined, `device ${device} is new`);
    this.tiered.attach(device, file);
    this.spaces[device] = this.freshSpace(device);
  }

  /**
   * Stop using device `device` (d ≥ 1): its pool is losing it. Nothing may be allocated there any more —
   * no data, and no freed block still waiting for a commit or a punch (both count in `usedBlocks`) — which
   * the caller ensures by moving the data off, keeping new allocations away (ImagePlacement.hasRoom) and
   * committing. Returns the device's file, for the caller to close.
   */
  detachDevice(device: number): BlockDevice {
    assert(this.tiered !== null && device >= 1, "only an added device is detached");
    assert(this.spaces[device] !== undefined, `device ${device} is attached`);
    assert(this.usedBlocks(device) === 0, `device ${device} holds no blocks`);
    this.spaces[device] = undefined;
    return this.tiered.detach(device);
  }

  /** Free space of device 0: index nodes, the layer table and untiered data. */
  get space(): FreeSpace {
    return this.spaces[0] as FreeSpace;
  }

  /** Free space of the device holding image address `block`. */
  private spaceOf(block: number): FreeSpace {
    const space = this.spaces[deviceOfBlock(block)];
    assert(space !== undefined, `block ${block} is on a device the image does not have`);
    return space;
  }

  /** Whole blocks in device d's file. */
  private deviceBlocks(device: number): number {
    return Math.floor(this.deviceBytes(device) / BLOCK_BYTES);
  }

  /** Bytes in device d's file. */
  private deviceBytes(device: number): number {
    return device === 0 ? this.backing.size : (this.tiered?.deviceSize(device) ?? 0);
  }

  /** Bytes device d's file must have to hold every block allocated on it. */
  private deviceBytesNeeded(device: number, space: FreeSpace): number {
    return (space.endBlock - device * DEVICE_REGION_BLOCKS) * BLOCK_BYTES;
  }

  /** Where each device's file ends, in image addresses (format.ts DeviceEnds). */
  deviceEnds(): DeviceEnds {
    const ends: number[] = [];
    const count = this.tiered?.devices.length ?? 1;
    for (let d = 0; d < count; d++) ends.push(d * DEVICE_REGION_BLOCKS + this.deviceBlocks(d));
    return ends;
  }

  /** Blocks in use on `device` (data, and on device 0 index nodes and the layer table too). */
  usedBlocks(device: number): number {
    const space = this.spaces[device];
    if (space === undefined) return 0;
    return space.endBlock - space.firstAllocatableBlock - space.freeBlocks;
  }

  /**
   * Visit every DATA run of `layer`'s view, 1 GiB of the view at a time (reading evicted leaves as a
   * lookup would); the view may change between chunks. For reports and the tier manager, not hot paths.
   */
  async scanData(layer: Layer, visit: (run: Run) => void): Promise<void> {
    const chunk = FANOUT * FANOUT;
    for (let start = 0; start < layer.blocks; start += chunk) {
      const end = Math.min(layer.blocks, start + chunk);
      await new Promise<void>((resolve, reject) =>
        this.ensureResident(layer, start, end, Need.LOOKUP, (err) => {
          if (err) return reject(err);
          if (this.layers.get(layer.id) === layer && end <= layer.blocks) {
            this.map(layer, start, end, (run) => {
              if (run.type === UnitType.DATA) visit(run);
            });
          }
          resolve();
        }),
      );
    }
  }

  /** Bytes of data `layer`'s view maps on each device (index = device). */
  async layerDeviceBytes(layer: Layer): Promise<number[]> {
    const bytes: number[] = new Array<number>(this.spaces.length).fill(0);
    await this.scanData(layer, (run) => {
      const device = deviceOfBlock(run.address);
      bytes[device] = (bytes[device] ?? 0) + run.count * BLOCK_BYTES;
    });
    return bytes;
  }

  // ---------------------------------------------------------------------------------------------
  // Create and open

  /**
   * Format `backing` as a new image with one empty head of `sizeBytes`. Without `indexCache` the image
   * gets its own cache that never evicts.
   */
  static async create(
    backing: BlockDevice,
    head: { name: string; sizeBytes: number },
    options: { indexCache?: IndexCache } = {},
  ): Promise<Image> {
    if (backing.size < FIRST_ALLOCATABLE_BLOCK * BLOCK_BYTES) {
      await resizeAsync(backing, FIRST_ALLOCATABLE_BLOCK * BLOCK_BYTES);
    }
    await writeAsync(backing, Buffer.alloc(FIRST_ALLOCATABLE_BLOCK * BLOCK_BYTES), 0);
    const image = new Image(
      backing,
      false,
      Math.floor(backing.size / BLOCK_BYTES),
      options.indexCache ?? new IndexCache(Infinity),
    );
    image.addLayer(
      head.name,
      "head",
      head.name,
      null,
      head.sizeBytes,
      emptySlot(),
      rootLevelFor(blocksOf(head.sizeBytes)),
    );
    await image.commit();
    return image;
  }

  /**
   * Open the image on `backing`. Every index node is read once to rebuild the reference counts; leaves
   * beyond the cache's limit are evicted again as the load goes, so memory stays within it.
   */
  static async open(
    backing: BlockDevice,
    options: { readOnly?: boolean; indexCache?: IndexCache } = {},
  ): Promise<Image> {
    const fileBlocks = Math.floor(backing.size / BLOCK_BYTES);
    if (fileBlocks < FIRST_ALLOCATABLE_BLOCK)
      throw new VdiskError("CORRUPT", "not a vdisk image: file too short");
    const slots = Buffer.alloc(FIRST_ALLOCATABLE_BLOCK * BLOCK_BYTES);
    await readAsync(backing, slots, 0);
    const candidates = [0, 1]
      .map((slot) => decodeSuperblock(slots.subarray(slot * BLOCK_BYTES, (slot + 1) * BLOCK_BYTES)))
      .filter((sb) => sb !== null);
    if (candidates.length === 0) {
      throw new VdiskError("CORRUPT", "not a vdisk image: no valid superblock", {
        hint: "the file is not a vdisk image, or both superblocks are damaged",
      });
    }
    const sb = candidates.reduce((a, b) => (b.sequence > a.sequence ? b : a));
    const tableBlocks = Math.ceil(sb.layerTableBytes / BLOCK_BYTES);
    if (sb.layerTableAddress < FIRST_ALLOCATABLE_BLOCK || sb.layerTableAddress + tableBlocks > fileBlocks) {
      throw new VdiskError(
        "CORRUPT",
        `superblock: layer table at block ${sb.layerTableAddress} is outside the file`,
      );
    }
    const tableBuffer = Buffer.alloc(tableBlocks * BLOCK_BYTES);
    await readAsync(backing, tableBuffer, sb.layerTableAddress * BLOCK_BYTES);
    const table = decodeLayerTable(tableBuffer.subarray(0, sb.layerTableBytes), sb.layerTableCrc);

    const image = new Image(
      backing,
      options.readOnly ?? false,
      fileBlocks,
      options.indexCache ?? new IndexCache(Infinity),
    );
    image.sequence = sb.sequence;
    image.nextLayerId = table.nextLayerId;
    image.layerTableAddress = sb.layerTableAddress;
    image.layerTableBlocks = tableBlocks;
    await image.loadLayers(table, image.deviceEnds());
    image.nodesDirty = false;
    image.layersDirty = false;
    return image;
  }

  private async loadLayers(table: LayerTable, ends: DeviceEnds): Promise<void> {
    const nodes = new Map<number, IndexNode>();
    try {
      await this.loadNodes(table, ends, nodes);
    } catch (err) {
      // The image is not opened: give its leaves' budget back to a shared cache.
      for (const node of nodes.values()) {
        if (node.level === 0 && node.types !== null) this.forgetLeaf(node);
      }
      throw err;
    }
  }

  private async loadNodes(table: LayerTable, ends: DeviceEnds, nodes: Map<number, IndexNode>): Promise<void> {
    // Breadth-first, level by level, with bounded parallel reads.
    type Pending = { address: number; level: number; attach: (node: IndexNode) => void };
    let frontier: Pending[] = [];
    for (const record of table.layers) {
      const slot: Slot = { type: record.root.type, address: record.root.address, node: undefined };
      const layer = new Layer(
        record.id,
        record.name,
        record.kind,
        record.disk,
        record.parent,
        record.sizeBytes,
        record.createdMs,
        slot,
        record.root.level,
      );
      if (rootLevelFor(layer.blocks) > layer.rootLevel) {
        throw new VdiskError("CORRUPT", `layer table: layer ${record.id} root level too low for its size`);
      }
      this.layers.set(layer.id, layer);
      if (slot.type === UnitType.NODE) {
        frontier.push({
          address: slot.address,
          level: record.root.level,
          attach: (node) => (slot.node = node),
        });
      } else if (slot.type === UnitType.DATA) {
        this.checkDataRange(
          slot.address,
          unitSpanBlocks(record.root.level + 1),
          ends,
          `layer ${record.id} root`,
        );
        this.dataRefs.addRef(slot.address, unitSpanBlocks(record.root.level + 1));
      }
    }
    while (frontier.length > 0) {
      const next: Pending[] = [];
      for (let i = 0; i < frontier.length; i += loadParallelism) {
        const batch = frontier.slice(i, i + loadParallelism);
        await settleAll(
          batch.map(async (pending) => {
            const existing = nodes.get(pending.address);
            if (existing) {
              if (existing.level !== pending.level) {
                throw new VdiskError(
                  "CORRUPT",
                  `index node at block ${pending.address} is reached at two levels`,
                );
              }
              existing.refs++;
              pending.attach(existing);
              return;
            }
            const buffer = Buffer.alloc(BLOCK_BYTES);
            // Reserve before awaiting so a concurrent reference in the same batch finds it.
            const placeholder = new IndexNode(pending.level, false);
            nodes.set(pending.address, placeholder);
            await readAsync(this.backing, buffer, pending.address * BLOCK_BYTES);
            const content = decodeNode(buffer, pending.address, ends);
            if (content.level !== pending.level) {
              throw new VdiskError(
                "CORRUPT",
                `index node at block ${pending.address} has level ${content.level}, expected ${pending.level}`,
              );
            }
            placeholder.types = content.types;
            placeholder.addresses = content.addresses;
            placeholder.crc = content.crc | 0;
            placeholder.diskAddress = pending.address;
            placeholder.dirty = false;
            placeholder.refs++;
            pending.attach(placeholder);
            if (content.level === 0) {
              // Clean and on disk: evictable as soon as its units are counted (below, synchronously).
              this.indexCache.admit();
              this.indexCache.link(placeholder);
            }
            const span = unitSpanBlocks(content.level);
            for (let u = 0; u < FANOUT; u++) {
              const type = content.types[u];
              if (type === UnitType.NODE) {
                next.push({
                  address: content.addresses[u] as number,
                  level: content.level - 1,
                  attach: (child) => (placeholder.children[u] = child),
                });
              } else if (type === UnitType.DATA) {
                this.dataRefs.addRef(content.addresses[u] as number, span);
              }
            }
          }),
        );
        this.indexCache.evict();
      }
      frontier = next;
    }
    // Nodes and data must not overlap, and nothing may overlap the layer table.
    const used: Array<[number, number]> = [];
    for (const address of nodes.keys()) {
      if (this.dataRefs.countAt(address) > 0) {
        throw new VdiskError("CORRUPT", `block ${address} is both an index node and data`);
      }
      used.push([address, 1]);
    }
    for (const [start, end] of this.dataRefs.entries()) used.push([start, end - start]);
    if (this.layerTableAddress >= 0) {
      if (this.dataRefs.maxCount(this.layerTableAddress, this.layerTableBlocks) > 0) {
        throw new VdiskError("CORRUPT", "the layer table overlaps data");
      }
      used.push([this.layerTableAddress, this.layerTableBlocks]);
    }
    try {
      // Each device's used ranges into its own free space (an extent never spans two devices).
      const usedByDevice: Array<Array<[number, number]>> = this.spaces.map(() => []);
      for (const range of used) {
        const device = deviceOfBlock(range[0]);
        const list = usedByDevice[device];
        if (list === undefined || this.spaces[device] === undefined) {
          throw new VdiskError("CORRUPT", `block ${range[0]} is on device ${device}, which the image lacks`);
        }
        list.push(range);
      }
      for (let d = 0; d < this.spaces.length; d++) {
        const current = this.spaces[d];
        if (current === undefined) continue;
        const first = d === 0 ? FIRST_ALLOCATABLE_BLOCK : d * DEVICE_REGION_BLOCKS;
        this.spaces[d] = FreeSpace.fromUsed(
          first,
          Math.max(ends[d] as number, first),
          usedByDevice[d] as Array<[number, number]>,
          d * DEVICE_REGION_BLOCKS + DEVICE_REGION_BLOCKS,
        );
      }
    } catch (err) {
      if (err instanceof VdiskError) throw err;
      throw new VdiskError("CORRUPT", `overlapping allocations in the image: ${(err as Error).message}`, {
        cause: err,
      });
    }
  }

  private checkDataRange(address: number, blocks: number, ends: DeviceEnds, what: string): void {
    if (!dataExtentInside(ends, address, blocks)) {
      throw new VdiskError(
        "CORRUPT",
        `${what}: data extent at block ${address} runs outside its device's file`,
      );
    }
  }

  // ---------------------------------------------------------------------------------------------
  // Layers

  private addLayer(
    name: string,
    kind: "head" | "snapshot",
    disk: string,
    parent: number | null,
    sizeBytes: number,
    root: Slot,
    rootLevel: number,
  ): Layer {
    const layer = new Layer(
      this.nextLayerId++,
      name,
      kind,
      disk,
      parent,
      sizeBytes,
      Date.now(),
      root,
      rootLevel,
    );
    this.layers.set(layer.id, layer);
    this.layersDirty = true;
    return layer;
  }

  head(disk: string): Layer | undefined {
    for (const layer of this.layers.values()) if (layer.kind === "head" && layer.name === disk) return layer;
    return undefined;
  }

  snapshot(disk: string, name: string): Layer | undefined {
    for (const layer of this.layers.values()) {
      if (layer.kind === "snapshot" && layer.disk === disk && layer.name === name) return layer;
    }
    return undefined;
  }

  children(layerId: number): Layer[] {
    return [...this.layers.values()].filter((layer) => layer.parent === layerId);
  }

  /** The chain of ancestors of a layer, nearest first. */
  ancestors(layer: Layer): Layer[] {
    const chain: Layer[] = [];
    let parent = layer.parent;
    while (parent !== null) {
      const next = this.layers.get(parent);
      assert(next, `layer ${layer.id} has a missing ancestor ${parent}`);
      chain.push(next);
      parent = next.parent;
      assert(chain.length <= this.layers.size, "cycle in the layer tree");
    }
    return chain;
  }

  /** A new head for a new disk (an empty image's first head is made by create). */
  private shareRoot(layer: Layer): Slot {
    const root = { ...layer.root };
    this.retainSlot(root, layer.rootLevel + 1);
    return root;
  }

  /**
   * Freeze `disk`'s head as snapshot `name`: the snapshot takes the head's place in the tree (same root,
   * shared) and the head continues as its child. O(1) in the disk's size: one root reference.
   */
  async createSnapshot(disk: string, name: string): Promise<Layer> {
    return this.structural(async () => {
      const head = this.requireHead(disk);
      if (this.snapshot(disk, name)) {
        throw new VdiskError("DISK_EXISTS", `disk ${disk} already has a snapshot named ${name}`);
      }
      const snapshot = this.addLayer(
        name,
        "snapshot",
        disk,
        head.parent,
        head.sizeBytes,
        this.shareRoot(head),
        head.rootLevel,
      );
      head.parent = snapshot.id;
      await this.commit();
      return snapshot;
    });
  }

  /** A new disk whose head starts on `snapshot` (a clone costs one empty head). */
  async clone(snapshot: Layer, disk: string): Promise<Layer> {
    return this.structural(async () => {
      assert(snapshot.kind === "snapshot", "clone of a snapshot");
      const taken = [...this.layers.values()].some((layer) => layer.disk === disk);
      if (taken) {
        throw new VdiskError("DISK_EXISTS", `the image already has a disk or snapshots named ${disk}`, {
          hint: "choose another name for the clone",
        });
      }
      const head = this.addLayer(
        disk,
        "head",
        disk,
        snapshot.id,
        snapshot.sizeBytes,
        this.shareRoot(snapshot),
        snapshot.rootLevel,
      );
      await this.commit();
      return head;
    });
  }

  /** Throw away the head's changes and start it again on `snapshot`. */
  async rollback(disk: string, snapshot: Layer): Promise<void> {
    await this.structural(async () => {
      const head = this.requireHead(disk);
      assert(snapshot.kind === "snapshot", "rollback to a snapshot");
      const shared = this.shareRoot(snapshot);
      this.releaseSlot(head.root, head.rootLevel + 1);
      head.root = shared;
      head.rootLevel = snapshot.rootLevel;
      head.sizeBytes = snapshot.sizeBytes;
      head.parent = snapshot.id;
      this.layersDirty = true;
      await this.commit();
    });
  }

  /**
   * Delete a snapshot or a head anywhere in the tree. Its children are re-parented to its parent;
   * their trees are complete views, so nothing is copied. What only this layer referenced is released:
   * the cost follows the layer's own nodes and data, not the disk's size.
   */
  async deleteLayer(layer: Layer): Promise<void> {
    await this.structural(async () => {
      assert(this.layers.get(layer.id) === layer, "layer belongs to this image");
      for (const child of this.children(layer.id)) child.parent = layer.parent;
      this.releaseSlot(layer.root, layer.rootLevel + 1);
      layer.root = emptySlot();
      this.layers.delete(layer.id);
      this.layersDirty = true;
      await this.commit();
    });
  }

  async renameHead(disk: string, newName: string): Promise<void> {
    await this.structural(async () => {
      const head = this.requireHead(disk);
      head.name = newName;
      head.disk = newName;
      this.layersDirty = true;
      await this.commit();
    });
  }

  /** Change a head's size. Growing adds root levels as needed; shrinking unmaps the tail. */
  async resizeHead(disk: string, sizeBytes: number): Promise<void> {
    await this.structural(async () => {
      const head = this.requireHead(disk);
      const oldBlocks = head.blocks;
      const newBlocks = blocksOf(sizeBytes);
      if (newBlocks < oldBlocks) {
        await new Promise<void>((resolve, reject) =>
          this.ensureResident(head, newBlocks, oldBlocks, Need.UPDATE, (err) => {
            if (err) return reject(err);
            this.apply(head, newBlocks, oldBlocks, UnitType.EMPTY, 0);
            resolve();
          }),
        );
      }
      while (unitSpanBlocks(head.rootLevel + 1) < newBlocks) {
        const node = new IndexNode(head.rootLevel + 1);
        this.setUnit(node, 0, head.root);
        node.refs = 1;
        head.root = { type: UnitType.NODE, address: 0, node };
        head.rootLevel++;
        this.nodesDirty = true;
      }
      head.sizeBytes = sizeBytes;
      this.layersDirty = true;
      await this.commit();
    });
  }

  private requireHead(disk: string): Layer {
    const head = this.head(disk);
    if (!head) throw new VdiskError("UNKNOWN_DISK", `no disk named ${disk} in this image`);
    return head;
  }

  /** Run `operation` with writes drained and the gate closed; operations run one at a time. */
  private structural<T>(operation: () => Promise<T>): Promise<T> {
    this.assertWritable();
    return this.exclusive(operation);
  }

  /** Run `operation` with writes drained and the gate closed, after queued structural operations. */
  private exclusive<T>(operation: () => Promise<T>): Promise<T> {
    const run = this.structuralQueue.then(async () => {
      await this.closeGate();
      try {
        return await operation();
      } finally {
        this.openGate();
      }
    });
    this.structuralQueue = run.catch(() => undefined);
    return run;
  }

  locksFor(layer: Layer): RangeLocks {
    let locks = this.rangeLocks.get(layer.id);
    if (!locks) {
      locks = new RangeLocks();
      this.rangeLocks.set(layer.id, locks);
    }
    return locks;
  }

  // ---------------------------------------------------------------------------------------------
  // Write gate

  /** Called by volumes before a write; `proceed` runs once writes are allowed. */
  beginWrite(proceed: () => void): void {
    if (this.gateClosed) {
      this.gateWaiters.push(() => this.beginWrite(proceed));
      return;
    }
    this.inflightWrites++;
    proceed();
  }

  endWrite(): void {
    assert(this.inflightWrites > 0, "endWrite without beginWrite");
    this.inflightWrites--;
    if (this.inflightWrites === 0) for (const waiter of this.drainWaiters.splice(0)) waiter();
  }

  private async closeGate(): Promise<void> {
    this.gateClosed = true;
    if (this.inflightWrites > 0) await new Promise<void>((resolve) => this.drainWaiters.push(resolve));
  }

  private openGate(): void {
    this.gateClosed = false;
    for (const waiter of this.gateWaiters.splice(0)) waiter();
  }

  // ---------------------------------------------------------------------------------------------
  // I/O epochs: freed blocks are not reused while I/O that began before the free is in flight.

  ioBegin(): number {
    const epoch = this.epoch;
    this.inflightByEpoch.set(epoch, (this.inflightByEpoch.get(epoch) ?? 0) + 1);
    return epoch;
  }

  ioEnd(epoch: number): void {
    const count = this.inflightByEpoch.get(epoch);
    assert(count !== undefined && count > 0, "ioEnd without ioBegin");
    if (count === 1) {
      this.inflightByEpoch.delete(epoch);
      if (this.pendingFrees.length > 0) this.releaseFrees();
    } else {
      this.inflightByEpoch.set(epoch, count - 1);
    }
  }

  private oldestInflightEpoch(): number {
    let oldest = Infinity;
    for (const epoch of this.inflightByEpoch.keys()) if (epoch < oldest) oldest = epoch;
    return oldest;
  }

  private freeLater(start: number, length: number): void {
    this.pendingFrees.push({ start, length, epoch: this.epoch });
  }

  /** Release pending frees that no committed metadata and no in-flight I/O can reach any more. */
  private releaseFrees(): void {
    const oldest = this.oldestInflightEpoch();
    const keep: PendingFree[] = [];
    const release: PendingFree[] = [];
    for (const entry of this.pendingFrees) {
      if (entry.epoch <= this.committedEpoch - 1 && entry.epoch < oldest) release.push(entry);
      else keep.push(entry);
    }
    if (release.length === 0) return;
    this.pendingFrees = keep;
    // Punch the blocks out so the file stays thin; they become allocatable only once punched, so a
    // later write to them cannot be overtaken by the punch. Adjacent ranges are punched together, and one
    // punch at a time: thousands of scattered 4 KiB frees (a rewrite after a snapshot) queued at once
    // filled libuv's thread pool and the inode lock ahead of the clients' I/O (the benchmark's 1 MiB
    // writes on a 64-deep chain ran at 0.05 GB/s).
    release.sort((a, b) => a.start - b.start);
    for (const entry of release) {
      const last = this.punchQueue[this.punchQueue.length - 1];
      if (
        last !== undefined &&
        last.start + last.length === entry.start &&
        deviceOfBlock(last.start) === deviceOfBlock(entry.start)
      )
        last.length += entry.length;
      else this.punchQueue.push({ start: entry.start, length: entry.length, epoch: entry.epoch });
    }
    if (this.punching === null) {
      this.punching = this.runPunches().finally(() => {
        this.punching = null;
      });
    }
  }

  /** Ranges released and waiting to be punched (then freed), in order; one punch in flight at a time. */
  private readonly punchQueue: PendingFree[] = [];
  private punching: Promise<void> | null = null;

  private async runPunches(): Promise<void> {
    while (this.punchQueue.length > 0) {
      const entry = this.punchQueue.shift() as PendingFree;
      await trimAsync(this.backing, entry.start * BLOCK_BYTES, entry.length * BLOCK_BYTES).catch(
        () => undefined, // the blocks are free either way; they just stay allocated in the file
      );
      this.spaceOf(entry.start).free(entry.start, entry.length);
    }
  }

  // ---------------------------------------------------------------------------------------------
  // Reference counting

  private retainSlot(slot: Slot, level: number): void {
    if (slot.type === UnitType.NODE) {
      assert(slot.node, "NODE slot has its node loaded");
      slot.node.refs++;
    } else if (slot.type === UnitType.DATA) {
      this.dataRefs.addRef(slot.address, unitSpanBlocks(level));
    }
  }

  private releaseSlot(slot: Slot, level: number): void {
    if (slot.type === UnitType.NODE) {
      assert(slot.node, "NODE slot has its node loaded");
      this.releaseNode(slot.node);
    } else if (slot.type === UnitType.DATA) {
      this.dropDataRef(slot.address, unitSpanBlocks(level));
    }
  }

  /** One reference to data blocks is gone: free what nothing references, pin the rest until committed. */
  private dropDataRef(start: number, length: number): void {
    const zeroed = this.dataRefs.decRef(start, length);
    let covered = 0;
    for (const [freeStart, freeLength] of zeroed) {
      this.freeLater(freeStart, freeLength);
      covered += freeLength;
    }
    if (covered < length) {
      this.pinned.addRef(start, length);
      this.pinList.push({ start, length, epoch: this.epoch });
    }
  }

  /** Release the pins of data references dropped in epochs the commit that just ended covers. */
  private releasePins(commitEpoch: number): void {
    if (this.pinList.length === 0) return;
    const keep: PendingFree[] = [];
    for (const entry of this.pinList) {
      if (entry.epoch <= commitEpoch) this.pinned.decRef(entry.start, entry.length);
      else keep.push(entry);
    }
    this.pinList = keep;
  }

  /**
   * Whether `length` data blocks from `start`, reached through an exclusive path, may be overwritten in
   * place: referenced once in memory, and no reference to them dropped since the last durable commit.
   */
  writableInPlace(start: number, length: number): boolean {
    return this.dataRefs.maxCount(start, length) === 1 && this.pinned.maxCount(start, length) === 0;
  }

  /** A node is exclusive: one reference in memory, and none dropped since the last durable commit. */
  private nodeExclusive(node: IndexNode): boolean {
    return node.refs === 1 && node.sharedEpoch < this.committedEpoch;
  }

  private releaseNode(node: IndexNode): void {
    assert(node.refs > 0, "node released more often than retained");
    node.refs--;
    if (node.refs > 0) {
      node.sharedEpoch = this.epoch;
      return;
    }
    if (node.types === null) {
      // An evicted leaf: what it references is known only on disk. Its block stays allocated until
      // the background release has read it and dropped its data's references.
      this.releaseLater(node);
      return;
    }
    const types = node.types;
    const addresses = addressesOf(node);
    for (let i = 0; i < FANOUT; i++) {
      const type = types[i] as UnitTypeValue;
      if (type === UnitType.NODE || type === UnitType.DATA) {
        this.releaseSlot({ type, address: addresses[i] as number, node: node.children[i] }, node.level);
      }
    }
    if (node.level === 0) this.forgetLeaf(node);
    if (node.diskAddress >= 0) this.freeLater(node.diskAddress, 1);
    node.diskAddress = -1;
  }

  /** The node itself is dropped but its units live on elsewhere (collapse): free only its block. */
  private dropNodeShell(node: IndexNode): void {
    assert(node.refs === 1, "only an exclusive node collapses");
    node.refs = 0;
    if (node.level === 0) this.forgetLeaf(node);
    if (node.diskAddress >= 0) this.freeLater(node.diskAddress, 1);
    node.diskAddress = -1;
  }

  /** A new, empty, dirty node (leaves are counted by the cache from now on). */
  private newNode(level: number): IndexNode {
    const node = new IndexNode(level);
    if (level === 0) {
      this.indexCache.admit();
      this.dirtyLeaves++;
    }
    return node;
  }

  /** A resident leaf dies (or its image closes): its content leaves the cache's budget. */
  private forgetLeaf(node: IndexNode): void {
    assert(node.level === 0 && node.types !== null, "forget a resident leaf");
    if (node.dirty) this.dirtyLeaves--;
    this.indexCache.discard(node);
    node.dropPayload();
  }

  /** An exclusive, dirty version of `node` for a writer (copy-on-write when it is shared). */
  private own(node: IndexNode): IndexNode {
    const types = typesOf(node);
    const addresses = addressesOf(node);
    if (node.refs === 1) {
      if (!node.dirty) {
        node.dirty = true;
        if (node.level === 0) {
          this.dirtyLeaves++;
          this.indexCache.unlink(node);
        }
      }
      return node;
    }
    const copy = this.newNode(node.level);
    const copyTypes = typesOf(copy);
    const copyAddresses = addressesOf(copy);
    copyTypes.set(types);
    copyAddresses.set(addresses);
    const span = unitSpanBlocks(node.level);
    for (let i = 0; i < FANOUT; i++) {
      const type = copyTypes[i];
      if (type === UnitType.NODE) {
        const child = node.children[i] as IndexNode;
        copy.children[i] = child;
        child.refs++;
      } else if (type === UnitType.DATA) {
        this.dataRefs.addRef(copyAddresses[i] as number, span);
      }
    }
    node.refs--;
    node.sharedEpoch = this.epoch;
    copy.refs = 1;
    return copy;
  }

  private setUnit(node: IndexNode, index: number, slot: Slot): void {
    typesOf(node)[index] = slot.type;
    addressesOf(node)[index] = slot.type === UnitType.DATA ? slot.address : 0;
    if (node.level > 0) node.children[index] = slot.type === UnitType.NODE ? slot.node : undefined;
  }

  // ---------------------------------------------------------------------------------------------
  // Residency: evicted leaves are read back before the synchronous lookups and updates that need them

  /**
   * Whether every leaf `need` requires over blocks [start, end) of `layer` is in memory. The resident ones
   * are touched (LRU) and, when all are, counted as hits. Allocates nothing: every request passes here.
   */
  isResident(layer: Layer, start: number, end: number, need: NeedValue): boolean {
    if (layer.root.type !== UnitType.NODE) return true;
    this.walkHits = 0;
    if (!this.residentUnder(layer.root.node as IndexNode, 0, start, end, need, null)) return false;
    this.indexCache.recordHits(this.walkHits);
    return true;
  }

  /**
   * Run `proceed` once every leaf `need` requires over blocks [start, end) of `layer` is in memory: at
   * once (synchronously) when they are, the common case; else after reading the missing ones, with all
   * of them pinned while `proceed` runs synchronously. A leaf that cannot be read, or fails its checks,
   * gives `proceed` the error instead. A cold lookup costs one read per missing leaf: upper levels are
   * always resident.
   */
  ensureResident(
    layer: Layer,
    start: number,
    end: number,
    need: NeedValue,
    proceed: (err: VdiskError | null) => void,
  ): void {
    if (this.isResident(layer, start, end, need)) return proceed(null);
    this.loadResident((out) => this.residentSlot(layer.root, start, end, need, out), proceed, 1);
  }

  /** `isResident` for `changedRuns(layer, other, start, end)`: only leaves the two trees do not share. */
  isDiffResident(layer: Layer, other: Layer, start: number, end: number): boolean {
    this.walkHits = 0;
    if (!this.diffResident(layer, other, start, end, null)) return false;
    this.indexCache.recordHits(this.walkHits);
    return true;
  }

  /** `ensureResident` for `changedRuns(layer, other, start, end)`. */
  ensureDiffResident(
    layer: Layer,
    other: Layer,
    start: number,
    end: number,
    proceed: (err: VdiskError | null) => void,
  ): void {
    if (this.isDiffResident(layer, other, start, end)) return proceed(null);
    this.loadResident((out) => this.diffResident(layer, other, start, end, out), proceed, 1);
  }

  /**
   * The slow path: `collect` lists every leaf needed (resident or not) and says whether all are
   * resident. They are pinned, the missing ones read, and `proceed` runs once a fresh walk finds them all
   * resident — the tree may have changed while we waited (a write elsewhere in the range, a rollback).
   */
  private loadResident(
    collect: (out: IndexNode[] | null) => boolean,
    proceed: (err: VdiskError | null) => void,
    attempt: number,
  ): void {
    const needed: IndexNode[] = [];
    this.walkHits = 0;
    collect(needed);
    const missing = needed.filter((node) => node.types === null);
    this.indexCache.recordHits(this.walkHits);
    this.indexCache.recordMisses(missing.length);
    for (const node of needed) this.indexCache.pin(node);
    const unpin = (): void => {
      for (const node of needed) this.indexCache.unpin(node);
    };
    settleAll(missing.map((node) => this.loadLeaf(node))).then(
      () => {
        if (!collect(null)) {
          unpin();
          if (attempt >= residentAttemptsMax) {
            return proceed(
              new VdiskError("IO_ERROR", `the index changed under ${attempt} rounds of loading`, {
                hint: "retry the request",
              }),
            );
          }
          return this.loadResident(collect, proceed, attempt + 1);
        }
        try {
          proceed(null);
        } finally {
          unpin();
          this.indexCache.evict();
        }
      },
      (err: unknown) => {
        unpin();
        this.indexCache.evict();
        proceed(fromSystemError(err, "reading an index node"));
      },
    );
  }

  private residentSlot(
    slot: Slot,
    start: number,
    end: number,
    need: NeedValue,
    out: IndexNode[] | null,
  ): boolean {
    return (
      slot.type !== UnitType.NODE || this.residentUnder(slot.node as IndexNode, 0, start, end, need, out)
    );
  }

  /**
   * The residency walk of the subtree under `node`, which maps blocks from `nodeStart`, for blocks
   * [start, end). Resident leaves are touched and counted in `walkHits`. With `out`, every leaf needed is
   * collected and the walk goes on past missing ones; without, it stops at the first.
   */
  private residentUnder(
    node: IndexNode,
    nodeStart: number,
    start: number,
    end: number,
    need: NeedValue,
    out: IndexNode[] | null,
  ): boolean {
    const span = unitSpanBlocks(node.level + 1);
    // An update replaces a subtree it covers whole without reading it.
    if (need === Need.UPDATE && start <= nodeStart && nodeStart + span <= end) return true;
    if (node.level === 0) return this.residentLeaf(node, out);
    const types = typesOf(node);
    const childSpan = span / FANOUT;
    const lo = Math.max(start, nodeStart);
    const hi = Math.min(end, nodeStart + span);
    const first = Math.floor((lo - nodeStart) / childSpan);
    const last = Math.ceil((hi - nodeStart) / childSpan);
    let all = true;
    for (let i = first; i < last; i++) {
      if (types[i] !== UnitType.NODE) continue;
      if (!this.residentUnder(node.children[i] as IndexNode, nodeStart + i * childSpan, lo, hi, need, out)) {
        all = false;
        if (out === null) return false;
      }
    }
    return all;
  }

  private residentLeaf(leaf: IndexNode, out: IndexNode[] | null): boolean {
    if (out !== null) out.push(leaf);
    if (leaf.types === null) return false;
    this.indexCache.touch(leaf);
    this.walkHits++;
    return true;
  }

  private diffResident(
    layer: Layer,
    other: Layer,
    start: number,
    end: number,
    out: IndexNode[] | null,
  ): boolean {
    const level = Math.max(layer.rootLevel, other.rootLevel) + 1;
    return this.diffSlotsResident(
      this.lift(layer, level),
      this.lift(other, level),
      level,
      0,
      start,
      end,
      out,
    );
  }

  /** The residency walk of `diffSlots`: the nodes it would descend into, skipping shared subtrees. */
  private diffSlotsResident(
    a: Slot,
    b: Slot,
    level: number,
    slotStart: number,
    start: number,
    end: number,
    out: IndexNode[] | null,
  ): boolean {
    if (a.type === b.type && a.address === b.address && a.node === b.node) return true;
    if (a.type !== UnitType.NODE && b.type !== UnitType.NODE) return true;
    if (level === 1) {
      // The nodes are leaves; their units are compared, so both sides are read.
      let all = true;
      if (a.type === UnitType.NODE && !this.residentLeaf(a.node as IndexNode, out)) all = false;
      if ((all || out !== null) && b.type === UnitType.NODE && !this.residentLeaf(b.node as IndexNode, out))
        all = false;
      return all;
    }
    const span = unitSpanBlocks(level);
    const lo = Math.max(start, slotStart);
    const hi = Math.min(end, slotStart + span);
    const childSpan = span / FANOUT;
    const first = Math.floor((lo - slotStart) / childSpan);
    const last = Math.ceil((hi - slotStart) / childSpan);
    let all = true;
    for (let i = first; i < last; i++) {
      const childStart = slotStart + i * childSpan;
      if (
        !this.diffSlotsResident(
          childSlot(a, i, childSpan),
          childSlot(b, i, childSpan),
          level - 1,
          childStart,
          lo,
          hi,
          out,
        )
      ) {
        all = false;
        if (out === null) return false;
      }
    }
    return all;
  }

  /** Read an evicted leaf back into the cache; concurrent loads of one leaf share one read. */
  private loadLeaf(node: IndexNode): Promise<void> {
    const pending = this.loading.get(node);
    if (pending !== undefined) return pending;
    this.indexCache.recordLoad();
    const load = this.readLeaf(node)
      .then((content) => {
        // A leaf that died while it was read (released in the background) or of a closed image is
        // not cached; one loaded meanwhile by someone else keeps its content.
        if (node.types !== null || node.refs === 0 || this.closed) return;
        node.types = content.types;
        node.addresses = content.addresses;
        this.indexCache.admit();
        this.indexCache.link(node);
      })
      .finally(() => this.loading.delete(node));
    this.loading.set(node, load);
    return load;
  }

  /**
   * The content of an evicted leaf, read from its block and checked like at open (magic, CRC, level,
   * self address, addresses inside the file) and against the CRC it was written with, so a node that is
   * valid but not this one (a misplaced or stale block) is not taken for it.
   */
  private async readLeaf(node: IndexNode): Promise<DecodedNode> {
    const address = node.diskAddress;
    assert(node.level === 0 && address >= FIRST_ALLOCATABLE_BLOCK, "an evicted leaf is on disk");
    const buffer = Buffer.allocUnsafe(BLOCK_BYTES);
    // Counted as I/O in flight: should the leaf die meanwhile, its block is not reused under the read.
    const epoch = this.ioBegin();
    try {
      await readAsync(this.backing, buffer, address * BLOCK_BYTES);
    } finally {
      this.ioEnd(epoch);
    }
    const content = decodeNode(buffer, address, this.deviceEnds());
    const hint = "run `vdisk check` on the disk for a full report";
    if (content.level !== 0) {
      throw new VdiskError(
        "CORRUPT",
        `index node at block ${address}: level ${content.level}, expected a leaf`,
        {
          hint,
        },
      );
    }
    if ((content.crc | 0) !== node.crc) {
      throw new VdiskError(
        "CORRUPT",
        `index node at block ${address}: not the leaf written there (checksum ${hex32(content.crc)}, expected ${hex32(node.crc)})`,
        { hint },
      );
    }
    return content;
  }

  /** An evicted leaf lost its last reference: drop its data's references once it is read back. */
  private releaseLater(node: IndexNode): void {
    assert(node.level === 0 && node.diskAddress >= 0, "only leaves on disk are evicted");
    this.releaseQueue.push(node);
    if (this.releaseRunning === null) {
      this.releaseRunning = this.runReleases().finally(() => {
        this.releaseRunning = null;
      });
    }
  }

  private async runReleases(): Promise<void> {
    while (this.releaseQueue.length > 0) {
      const batch = this.releaseQueue.splice(0, loadParallelism);
      await settleAll(batch.map((node) => this.releaseEvicted(node)));
    }
  }

  private async releaseEvicted(node: IndexNode): Promise<void> {
    assert(node.refs === 0, "a queued leaf stays released");
    let types: Uint8Array;
    let addresses: Float64Array;
    try {
      ({ types, addresses } = await this.readLeaf(node));
    } catch (err) {
      this.releaseFailures.push(
        `released index leaf at block ${node.diskAddress} could not be read back (${(err as Error).message}): ` +
          "the data it referenced stays allocated until the image is reopened",
      );
      return;
    }
    for (let i = 0; i < FANOUT; i++) {
      if (types[i] === UnitType.DATA) this.dropDataRef(addresses[i] as number, 1);
    }
    this.freeLater(node.diskAddress, 1);
    node.diskAddress = -1;
    this.evictedReleases++;
  }

  /** Resolves once every queued release of an evicted leaf is done. */
  private async drainReleases(): Promise<void> {
    while (this.releaseRunning !== null) await this.releaseRunning;
  }

  // ---------------------------------------------------------------------------------------------
  // Mapping: lookups and updates

  /** Visit the runs mapping blocks [start, end) of `layer` in order. */
  map(layer: Layer, start: number, end: number, visit: (run: Run) => void): void {
    assert(
      start >= 0 && start < end && end <= unitSpanBlocks(layer.rootLevel + 1),
      "map range inside the root",
    );
    let pending: Run | null = null;
    const emit = (run: Run): void => {
      if (
        pending !== null &&
        pending.type === run.type &&
        pending.block + pending.count === run.block &&
        pending.pathExclusive === run.pathExclusive &&
        (run.type !== UnitType.DATA || pending.address + pending.count === run.address)
      ) {
        pending.count += run.count;
        return;
      }
      if (pending !== null) visit(pending);
      pending = run;
    };
    this.mapSlot(layer.root, layer.rootLevel + 1, 0, start, end, true, emit);
    if (pending !== null) visit(pending);
  }

  private mapSlot(
    slot: Slot,
    level: number,
    slotStart: number,
    start: number,
    end: number,
    exclusive: boolean,
    emit: (run: Run) => void,
  ): void {
    const span = unitSpanBlocks(level);
    const lo = Math.max(start, slotStart);
    const hi = Math.min(end, slotStart + span);
    if (slot.type !== UnitType.NODE) {
      const address = slot.type === UnitType.DATA ? slot.address + (lo - slotStart) : 0;
      emit({ block: lo, count: hi - lo, type: slot.type, address, pathExclusive: exclusive });
      return;
    }
    const node = slot.node as IndexNode;
    const types = typesOf(node);
    const addresses = addressesOf(node);
    const childExclusive = exclusive && this.nodeExclusive(node);
    const childSpan = span / FANOUT;
    const first = Math.floor((lo - slotStart) / childSpan);
    const last = Math.ceil((hi - slotStart) / childSpan);
    for (let i = first; i < last; i++) {
      const childStart = slotStart + i * childSpan;
      const type = types[i] as UnitTypeValue;
      if (type === UnitType.NODE) {
        this.mapSlot(
          { type, address: 0, node: node.children[i] },
          level - 1,
          childStart,
          lo,
          hi,
          childExclusive,
          emit,
        );
      } else {
        const runLo = Math.max(lo, childStart);
        const runHi = Math.min(hi, childStart + childSpan);
        const address = type === UnitType.DATA ? (addresses[i] as number) + (runLo - childStart) : 0;
        emit({ block: runLo, count: runHi - runLo, type, address, pathExclusive: childExclusive });
      }
    }
  }

  /**
   * Make blocks [start, end) of `layer` map to `type`; for DATA, block `start` maps to `address` and
   * the rest follow contiguously. References: the new extent gains one reference per block; whatever
   * was mapped there loses one (and is freed when unreferenced).
   */
  apply(layer: Layer, start: number, end: number, type: UnitTypeValue, address: number): void {
    this.assertWritable();
    this.mappingChanges++;
    assert(
      start >= 0 && start < end && end <= unitSpanBlocks(layer.rootLevel + 1),
      "apply range inside the root",
    );
    this.applyingLayer = layer;
    try {
      layer.root = this.applySlot(layer.root, layer.rootLevel + 1, 0, start, end, type, address);
    } finally {
      this.applyingLayer = null;
    }
    this.layersDirty = true;
    this.nodesDirty = true;
    this.scheduleAutoCommit();
    if (
      this.dirtyLeaves > dirtyLeavesCommitMin &&
      this.dirtyLeaves * leafPayloadBytes > this.indexCache.limitBytes / 2 &&
      !this.pressureCommit
    ) {
      // Dirty leaves cannot be evicted: a commit makes them clean. Started after this request's
      // synchronous step, with errors handled like the auto-commit timer's.
      this.pressureCommit = true;
      process.nextTick(() => {
        this.pressureCommit = false;
        if (!this.closed) this.commit().catch(() => undefined);
      });
    }
    if (this.regroupQueue.length > 0 && this.regroupRunning === null) {
      this.regroupRunning = this.runRegroups().finally(() => {
        this.regroupRunning = null;
      });
    }
  }

  /** Copy randomly written full leaves into contiguous extents, one at a time, in the background. */
  private async runRegroups(): Promise<void> {
    await new Promise((resolve) => setImmediate(resolve));
    while (this.regroupQueue.length > 0 && !this.closing) {
      const { layerId, start } = this.regroupQueue.shift() as { layerId: number; start: number };
      const layer = this.layers.get(layerId);
      if (layer && layer.kind === "head") await this.regroupLeaf(layer, start);
    }
  }

  private regroupLeaf(layer: Layer, start: number): Promise<void> {
    const end = start + FANOUT;
    return new Promise((resolve) => {
      this.beginWrite(() => {
        this.locksFor(layer).acquire(start, end, (lock) => {
          const finish = (): void => {
            this.locksFor(layer).release(lock);
            this.endWrite();
            resolve();
          };
          const gone = (): boolean =>
            this.closing || this.layers.get(layer.id) !== layer || end > layer.blocks;
          if (gone()) return finish();
          this.ensureResident(layer, start, end, Need.LOOKUP, (loadErr) => {
            if (loadErr || gone()) return finish();
            this.copyLeaf(layer, start, finish);
          });
        });
      });
    });
  }

  /**
   * Move the data of blocks [start, end) of the head `layer` that lies on other devices onto `device`:
   * copy it to newly allocated blocks there, sync nothing yet, and switch the mapping; the old blocks are
   * freed like any overwritten data (released only once the commit that stops reaching them is durable),
   * so a crash at any point leaves the old or the new copy mapped, never neither. Only data this head alone
   * references moves — moving shared data would duplicate it — and only while the pool has room on the
   * device. The range is locked while it moves: foreground writes to it wait, so callers move small ranges
   * (the tier engine moves one heat extent, 1 MiB, at a time).
   */
  migrate(layer: Layer, start: number, end: number, device: number): Promise<MigrationResult> {
    this.assertWritable();
    assert(layer.kind === "head", "only heads are migrated");
    assert(start >= 0 && start < end && end - start <= migrateBlocksMax, "migration range");
    const result: MigrationResult = { movedBlocks: 0, skippedBlocks: 0 };
    if (this.spaces[device] === undefined) return Promise.resolve(result);
    return new Promise((resolve, reject) => {
      this.beginWrite(() => {
        this.locksFor(layer).acquire(start, end, (lock) => {
          const finish = (err: VdiskError | null): void => {
            this.locksFor(layer).release(lock);
            this.endWrite();
            if (err) reject(err);
            else resolve(result);
          };
          const gone = (): boolean =>
            this.closing || this.layers.get(layer.id) !== layer || end > layer.blocks;
          if (gone()) return finish(null);
          this.ensureResident(layer, start, end, Need.LOOKUP, (loadErr) => {
            if (loadErr || gone()) return finish(loadErr);
            this.moveRuns(layer, start, end, device, result, finish);
          });
        });
      });
    });
  }

  /** The body of migrate, with the range locked and its mapping resident. */
  private moveRuns(
    layer: Layer,
    start: number,
    end: number,
    device: number,
    result: MigrationResult,
    finish: (err: VdiskError | null) => void,
  ): void {
    const segments: Array<{ block: number; count: number; from: number; to: number }> = [];
    const space = this.spaces[device] as FreeSpace;
    let hint: number | undefined;
    this.map(layer, start, end, (run) => {
      if (run.type !== UnitType.DATA || deviceOfBlock(run.address) === device) return;
      if (!run.pathExclusive || this.dataRefs.maxCount(run.address, run.count) !== 1) {
        result.skippedBlocks += run.count;
        return;
      }
      let offset = 0;
      while (offset < run.count) {
        const want = run.count - offset;
        if (this.placement !== null && !this.placement.hasRoom(device, want)) {
          result.skippedBlocks += want;
          return;
        }
        const [to, count] = space.allocateUpTo(want, hint);
        segments.push({ block: run.block + offset, count, from: run.address + offset, to });
        hint = to + count;
        offset += count;
      }
    });
    if (segments.length === 0) return finish(null);
    const epoch = this.ioBegin();
    const failed = (err: VdiskError): void => {
      for (const segment of segments) this.unallocateData(segment.to, segment.count);
      this.ioEnd(epoch);
      finish(err);
    };
    this.ensureFileCovers((coverErr) => {
      if (coverErr) return failed(coverErr);
      Promise.all(
        segments.map(async (segment) => {
          const buffer = Buffer.allocUnsafe(segment.count * BLOCK_BYTES);
          await readAsync(this.backing, buffer, segment.from * BLOCK_BYTES);
          await writeAsync(this.backing, buffer, segment.to * BLOCK_BYTES);
        }),
      ).then(
        () => {
          this.ensureResident(layer, start, end, Need.UPDATE, (loadErr) => {
            if (loadErr) return failed(loadErr);
            for (const segment of segments) {
              this.apply(layer, segment.block, segment.block + segment.count, UnitType.DATA, segment.to);
              result.movedBlocks += segment.count;
            }
            this.migratedBlocks += result.movedBlocks;
            this.ioEnd(epoch);
            finish(null);
          });
        },
        (err: unknown) => failed(fromSystemError(err, "migrating data")),
      );
    });
  }

  /** The body of regroupLeaf, with the leaf's blocks locked and its mapping resident. */
  private copyLeaf(layer: Layer, start: number, finish: () => void): void {
    const end = start + FANOUT;
    const runs: Run[] = [];
    this.map(layer, start, end, (run) => runs.push(run));
    const eligible =
      runs.length > 1 &&
      runs.every(
        (run) =>
          run.type === UnitType.DATA &&
          run.pathExclusive &&
          this.dataRefs.maxCount(run.address, run.count) === 1 &&
          // On one device: a leaf split between devices by placement stays split (copying it to one
          // device would undo a migration).
          deviceOfBlock(run.address) === deviceOfBlock((runs[0] as Run).address),
      );
    if (!eligible) return finish();
    const device = deviceOfBlock((runs[0] as Run).address);
    if (this.placement !== null && !this.placement.hasRoom(device, FANOUT)) return finish();
    const address = (this.spaces[device] as FreeSpace).allocate(FANOUT);
    const buffer = Buffer.allocUnsafe(FANOUT * BLOCK_BYTES);
    const epoch = this.ioBegin();
    const failed = (): void => {
      this.unallocateData(address, FANOUT);
      this.ioEnd(epoch);
      finish();
    };
    this.ensureFileCovers((err) => {
      if (err) return failed();
      Promise.all(
        runs.map((run) =>
          readAsync(
            this.backing,
            buffer.subarray((run.block - start) * BLOCK_BYTES, (run.block - start + run.count) * BLOCK_BYTES),
            run.address * BLOCK_BYTES,
          ),
        ),
      )
        .then(() => writeAsync(this.backing, buffer, address * BLOCK_BYTES))
        .then(
          () => {
            // The leaf is replaced whole: nothing needs to be resident, but ask like every update.
            this.ensureResident(layer, start, end, Need.UPDATE, (loadErr) => {
              if (loadErr) return failed();
              this.regroups++;
              this.apply(layer, start, end, UnitType.DATA, address);
              this.ioEnd(epoch);
              finish();
            });
          },
          () => failed(),
        );
    });
  }

  private applySlot(
    slot: Slot,
    level: number,
    slotStart: number,
    start: number,
    end: number,
    type: UnitTypeValue,
    address: number,
  ): Slot {
    const span = unitSpanBlocks(level);
    const lo = Math.max(start, slotStart);
    const hi = Math.min(end, slotStart + span);
    if (lo === slotStart && hi === slotStart + span) {
      const replacement: Slot = {
        type,
        address: type === UnitType.DATA ? address + (slotStart - start) : 0,
        node: undefined,
      };
      this.retainSlot(replacement, level);
      this.releaseSlot(slot, level);
      return replacement;
    }
    assert(level > 0, "a single block is always replaced whole");
    const node = slot.type === UnitType.NODE ? this.own(slot.node as IndexNode) : this.split(slot, level);
    const childSpan = span / FANOUT;
    const first = Math.floor((lo - slotStart) / childSpan);
    const last = Math.ceil((hi - slotStart) / childSpan);
    const loAddress = type === UnitType.DATA ? address + (lo - start) : 0;
    const types = typesOf(node);
    const addresses = addressesOf(node);
    for (let i = first; i < last; i++) {
      const child: Slot = {
        type: types[i] as UnitTypeValue,
        address: addresses[i] as number,
        node: node.children[i],
      };
      this.setUnit(
        node,
        i,
        this.applySlot(child, level - 1, slotStart + i * childSpan, lo, hi, type, loAddress),
      );
    }
    return this.collapse(node, level - 1, slotStart);
  }

  /** A new node at `level - 1` that maps exactly what `slot` mapped (references move to its units). */
  private split(slot: Slot, level: number): IndexNode {
    const node = this.newNode(level - 1);
    node.refs = 1;
    if (slot.type === UnitType.EMPTY) return node;
    typesOf(node).fill(slot.type);
    if (slot.type === UnitType.DATA) {
      const addresses = addressesOf(node);
      const childSpan = unitSpanBlocks(level - 1);
      for (let i = 0; i < FANOUT; i++) addresses[i] = slot.address + i * childSpan;
    }
    return node;
  }

  /**
   * SNPdisk's regrouping: a node whose units are uniform becomes one unit of its parent. A leaf full of
   * DATA units that are not contiguous is queued for a background copy that makes them contiguous.
   */
  private collapse(node: IndexNode, nodeLevel: number, slotStart: number): Slot {
    const types = typesOf(node);
    const addresses = addressesOf(node);
    const first = types[0] as UnitTypeValue;
    if (first === UnitType.NODE) return { type: UnitType.NODE, address: 0, node };
    const childSpan = unitSpanBlocks(nodeLevel);
    const base = addresses[0] as number;
    let contiguous = true;
    for (let i = 1; i < FANOUT; i++) {
      if (types[i] !== first) return { type: UnitType.NODE, address: 0, node };
      if (first === UnitType.DATA && addresses[i] !== base + i * childSpan) contiguous = false;
    }
    if (!contiguous) {
      if (nodeLevel === 0 && this.applyingLayer !== null && this.regroupQueue.length < regroupQueueMax) {
        this.regroupQueue.push({ layerId: this.applyingLayer.id, start: slotStart });
      }
      return { type: UnitType.NODE, address: 0, node };
    }
    if (node.refs !== 1) return { type: UnitType.NODE, address: 0, node };
    // Per-block data references are unchanged: 512 units over consecutive pieces = one unit over all.
    this.dropNodeShell(node);
    return { type: first, address: first === UnitType.DATA ? base : 0, node: undefined };
  }

  /** Blocks [start, end) of `layer` whose mapping differs from `other`'s (written since, for backups). */
  changedRuns(
    layer: Layer,
    other: Layer,
    start: number,
    end: number,
    visit: (block: number, count: number, changed: boolean) => void,
  ): void {
    const level = Math.max(layer.rootLevel, other.rootLevel) + 1;
    let pending: { block: number; count: number; changed: boolean } | null = null;
    const emit = (block: number, count: number, changed: boolean): void => {
      if (pending && pending.changed === changed && pending.block + pending.count === block) {
        pending.count += count;
        return;
      }
      if (pending) visit(pending.block, pending.count, pending.changed);
      pending = { block, count, changed };
    };
    this.diffSlots(this.lift(layer, level), this.lift(other, level), level, 0, start, end, emit);
    if (pending) {
      const last = pending as { block: number; count: number; changed: boolean };
      visit(last.block, last.count, last.changed);
    }
  }

  private diffSlots(
    a: Slot,
    b: Slot,
    level: number,
    slotStart: number,
    start: number,
    end: number,
    emit: (block: number, count: number, changed: boolean) => void,
  ): void {
    const span = unitSpanBlocks(level);
    const lo = Math.max(start, slotStart);
    const hi = Math.min(end, slotStart + span);
    if (a.type === b.type && a.address === b.address && a.node === b.node) return emit(lo, hi - lo, false);
    if (a.type !== UnitType.NODE && b.type !== UnitType.NODE) {
      // Same content if both read zeros; otherwise different.
      const zeros = (s: Slot): boolean => s.type === UnitType.EMPTY || s.type === UnitType.ZERO;
      return emit(lo, hi - lo, !(zeros(a) && zeros(b)));
    }
    const childSpan = span / FANOUT;
    const first = Math.floor((lo - slotStart) / childSpan);
    const last = Math.ceil((hi - slotStart) / childSpan);
    for (let i = first; i < last; i++) {
      this.diffSlots(
        childSlot(a, i, childSpan),
        childSlot(b, i, childSpan),
        level - 1,
        slotStart + i * childSpan,
        lo,
        hi,
        emit,
      );
    }
  }

  /** A layer's root seen as a slot at `level` (above its own when the other tree is taller). */
  private lift(layer: Layer, level: number): Slot {
    let slot = layer.root;
    for (let lv = layer.rootLevel + 1; lv < level; lv++) {
      const node = new IndexNode(lv);
      this.setUnit(node, 0, slot);
      slot = { type: UnitType.NODE, address: 0, node };
    }
    return slot;
  }

  // ---------------------------------------------------------------------------------------------
  // Allocation

  /**
   * Allocate up to `blocks` contiguous blocks for new data on `device` (-1: the hint's device, else 0),
   * near `hint` when it is on that device. A device the pool has no room on falls back to device 0.
   */
  allocateData(blocks: number, hint: number | undefined, device = -1): [number, number] {
    this.assertWritable();
    let target = device >= 0 ? device : hint !== undefined ? deviceOfBlock(hint) : 0;
    if (
      target !== 0 &&
      (this.spaces[target] === undefined ||
        (this.placement !== null && !this.placement.hasRoom(target, blocks)))
    )
      target = 0;
    const space = this.spaces[target] as FreeSpace;
    const usableHint = hint !== undefined && deviceOfBlock(hint) === target ? hint : undefined;
    const [start, length] = space.allocateUpTo(blocks, usableHint);
    assert(length >= 1 && length <= blocks, "allocation within the request");
    return [start, length];
  }

  /** Give back blocks allocated for data that never got mapped (a failed or superseded write). */
  unallocateData(start: number, length: number): void {
    this.freeLater(start, length);
  }

  /** Make sure the backing file covers every allocated block before data is written there. */
  ensureFileCovers(callback: (err: VdiskError | null) => void): void {
    if (this.growing === null && this.covered()) return callback(null);
    // One resize at a time (two ftruncates finishing out of order could shrink the file).
    const previous = this.growing ?? Promise.resolve();
    const next = previous.then(async () => {
      for (let d = 0; d < this.spaces.length; d++) {
        const space = this.spaces[d];
        if (space === undefined) continue;
        const needed = this.deviceBytesNeeded(d, space);
        const size = this.deviceBytes(d);
        if (size >= needed) continue;
        // Grow in steps so a sequential writer does not truncate on every request.
        const target = Math.max(needed, Math.min(size * 2, size + 1024 * 1024 * 1024));
        if (d === 0) await resizeAsync(this.backing, target);
        else {
          const tiered = this.tiered as TieredBacking;
          await new Promise<void>((resolve, reject) =>
            tiered.resizeDevice(d, target, (err) => (err ? reject(err) : resolve())),
          );
        }
      }
    });
    this.growing = next;
    next.then(
      () => {
        if (this.growing === next) this.growing = null;
        callback(null);
      },
      (err: unknown) => {
        if (this.growing === next) this.growing = null;
        callback(
          err instanceof VdiskError ? err : new VdiskError("IO_ERROR", `growing the image: ${String(err)}`),
        );
      },
    );
  }

  /** Whether every device's file covers every block allocated on it. */
  private covered(): boolean {
    for (let d = 0; d < this.spaces.length; d++) {
      const space = this.spaces[d];
      if (space !== undefined && this.deviceBytes(d) < this.deviceBytesNeeded(d, space)) return false;
    }
    return true;
  }

  // ---------------------------------------------------------------------------------------------
  // Commit

  /** Make everything completed so far durable. Concurrent callers share commits. */
  commit(): Promise<void> {
    if (this.readOnly) return flushAsync(this.backing);
    if (this.commitRunning === null) {
      this.commitRunning = this.runCommit().finally(() => {
        this.commitRunning = null;
      });
      return this.commitRunning;
    }
    // A commit is running; it may have serialized before our caller's writes: queue one more.
    if (this.commitWanted === null) {
      this.commitWanted = this.commitRunning
        .catch(() => undefined)
        .then(() => {
          this.commitWanted = null;
          return this.commit();
        });
    }
    return this.commitWanted;
  }

  private async runCommit(): Promise<void> {
    if (this.commitTimer) {
      clearTimeout(this.commitTimer);
      this.commitTimer = null;
    }
    const commitEpoch = this.epoch;
    this.epoch++;
    if (!this.nodesDirty && !this.layersDirty) {
      await flushAsync(this.backing);
      this.finishCommit(commitEpoch);
      return;
    }
    // 1. Collect dirty nodes, children before parents; give each a fresh block.
    const dirty: IndexNode[] = [];
    const seen = new Set<IndexNode>();
    const collect = (node: IndexNode): void => {
      if (!node.dirty || seen.has(node)) return;
      seen.add(node);
      if (node.level > 0) {
        const types = typesOf(node);
        for (let i = 0; i < FANOUT; i++)
          if (types[i] === UnitType.NODE) collect(node.children[i] as IndexNode);
      }
      dirty.push(node);
    };
    for (const layer of this.layers.values())
      if (layer.root.type === UnitType.NODE) collect(layer.root.node as IndexNode);
    const writes: Array<{ address: number; buffer: Buffer }> = [];
    let index = 0;
    while (index < dirty.length) {
      const [start, length] = this.space.allocateUpTo(Math.min(dirty.length - index, commitWriteBlocksMax));
      const buffer = Buffer.alloc(length * BLOCK_BYTES);
      for (let j = 0; j < length; j++) {
        const node = dirty[index + j] as IndexNode;
        if (node.diskAddress >= 0) this.freeLater(node.diskAddress, 1);
        node.diskAddress = start + j;
      }
      index += length;
      writes.push({ address: start, buffer });
    }
    // Encode after every node has its address (parents record their children's new addresses).
    index = 0;
    for (const write of writes) {
      const count = write.buffer.length / BLOCK_BYTES;
      for (let j = 0; j < count; j++) {
        const node = dirty[index + j] as IndexNode;
        const types = typesOf(node);
        const addresses = addressesOf(node);
        if (node.level > 0) {
          for (let u = 0; u < FANOUT; u++) {
            if (types[u] === UnitType.NODE) addresses[u] = (node.children[u] as IndexNode).diskAddress;
          }
        }
        const crc = encodeNode(
          { level: node.level, types, addresses },
          node.diskAddress,
          write.buffer.subarray(j * BLOCK_BYTES, (j + 1) * BLOCK_BYTES),
        );
        node.crc = crc | 0;
        node.dirty = false;
        if (node.level === 0) this.dirtyLeaves--;
      }
      index += count;
    }
    // 2. The layer table, also copy-on-write.
    const table = encodeLayerTable(this.layerTable());
    const tableBlocks = Math.ceil(table.length / BLOCK_BYTES);
    const tableAddress = this.space.allocate(tableBlocks);
    const tableBuffer = Buffer.alloc(tableBlocks * BLOCK_BYTES);
    table.copy(tableBuffer);
    if (this.layerTableAddress >= 0) this.freeLater(this.layerTableAddress, this.layerTableBlocks);
    this.layerTableAddress = tableAddress;
    this.layerTableBlocks = tableBlocks;
    this.nodesDirty = false;
    this.layersDirty = false;
    // 3. Write, sync, then the superblock, sync.
    await new Promise<void>((resolve, reject) =>
      this.ensureFileCovers((err) => (err ? reject(err) : resolve())),
    );
    await Promise.all([
      ...writes.map((write) => writeAsync(this.backing, write.buffer, write.address * BLOCK_BYTES)),
      writeAsync(this.backing, tableBuffer, tableAddress * BLOCK_BYTES),
    ]);
    // The leaves just written can be read back now: they may be evicted (unless changed meanwhile).
    for (const node of dirty) {
      if (node.level === 0 && !node.dirty && node.refs > 0 && node.types !== null && node.lruNext === null)
        this.indexCache.link(node);
    }
    if (!this.closing) this.indexCache.evict();
    await flushAsync(this.backing);
    const sequence = this.sequence + 1;
    const superblock = encodeSuperblock({
      sequence,
      layerTableAddress: tableAddress,
      layerTableBytes: table.length,
      layerTableCrc: layerTableCrc(table),
      fileBlocks: Math.floor(this.backing.size / BLOCK_BYTES),
    });
    await writeAsync(this.backing, superblock, (sequence % 2) * BLOCK_BYTES);
    await flushAsync(this.backing);
    this.sequence = sequence;
    this.finishCommit(commitEpoch);
  }

  private finishCommit(commitEpoch: number): void {
    this.committedEpoch = Math.max(this.committedEpoch, commitEpoch + 1);
    this.releasePins(commitEpoch);
    this.commits++;
    this.releaseFrees();
  }

  private layerTable(): LayerTable {
    const layers: LayerRecord[] = [...this.layers.values()].map((layer) => ({
      id: layer.id,
      name: layer.name,
      kind: layer.kind,
      disk: layer.disk,
      parent: layer.parent,
      sizeBytes: layer.sizeBytes,
      createdMs: layer.createdMs,
      root: {
        type: layer.root.type,
        address:
          layer.root.type === UnitType.NODE ? (layer.root.node as IndexNode).diskAddress : layer.root.address,
        level: layer.rootLevel,
      },
    }));
    return { version: 1, nextLayerId: this.nextLayerId, layers };
  }

  private scheduleAutoCommit(): void {
    if (this.commitTimer !== null || this.closed) return;
    this.commitTimer = setTimeout(() => {
      this.commitTimer = null;
      this.commit().catch(() => undefined);
    }, autoCommitMs);
    this.commitTimer.unref();
  }

  /** Resolves once no background regrouping is running (tests, benchmarks). */
  async settle(): Promise<void> {
    while (this.regroupRunning || this.punching) {
      if (this.regroupRunning) await this.regroupRunning;
      if (this.punching) await this.punching;
    }
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closing = true;
    if (this.regroupRunning) await this.regroupRunning;
    if (!this.readOnly) await this.commit();
    await this.drainReleases();
    while (this.punching) await this.punching;
    await Promise.allSettled([...this.loading.values()]);
    this.closed = true;
    if (this.commitTimer) clearTimeout(this.commitTimer);
    this.commitTimer = null;
    // A shared cache no longer counts this image's leaves.
    for (const node of this.reachableNodes()) {
      if (node.level === 0 && node.types !== null) this.forgetLeaf(node);
    }
  }

  /** Every node reachable from a layer root, each once (leaves too: their parents are resident). */
  private reachableNodes(): Set<IndexNode> {
    const nodes = new Set<IndexNode>();
    const collect = (node: IndexNode): void => {
      if (nodes.has(node)) return;
      nodes.add(node);
      if (node.level === 0) return;
      const types = typesOf(node);
      for (let i = 0; i < FANOUT; i++) if (types[i] === UnitType.NODE) collect(node.children[i] as IndexNode);
    };
    for (const layer of this.layers.values())
      if (layer.root.type === UnitType.NODE) collect(layer.root.node as IndexNode);
    return nodes;
  }

  private assertWritable(): void {
    if (this.readOnly) throw new VdiskError("READ_ONLY", "image opened read-only");
    assert(!this.closed, "image used after close");
  }

  // ---------------------------------------------------------------------------------------------
  // Consistency

  /**
   * Recount every reference from the layer roots and compare with the live counts; check that free
   * space and used space are disjoint and that nodes and data do not overlap. Returns the problems
   * found, each precise enough to act on (empty = consistent). Used by `vdisk check` and the tests.
   * Writes wait while it runs (the recount must see one state); evicted leaves are read, not cached.
   */
  checkConsistency(): Promise<string[]> {
    return this.exclusive(() => this.checkConsistencyNow());
  }

  private async checkConsistencyNow(): Promise<string[]> {
    await this.drainReleases();
    const problems: string[] = [...this.releaseFailures];
    const nodeRefs = new Map<IndexNode, number>();
    const data = new RefcountMap();
    const evicted: Array<{ node: IndexNode; where: string }> = [];
    let dirtyLeaves = 0;
    const visit = (slot: Slot, level: number, where: string): void => {
      if (slot.type === UnitType.DATA) {
        data.addRef(slot.address, unitSpanBlocks(level));
        return;
      }
      if (slot.type !== UnitType.NODE) return;
      const node = slot.node;
      if (!node) {
        problems.push(`${where}: child node not loaded`);
        return;
      }
      if (node.level !== level - 1)
        problems.push(`${where}: node level ${node.level}, expected ${level - 1}`);
      const seen = nodeRefs.get(node);
      nodeRefs.set(node, (seen ?? 0) + 1);
      if (seen !== undefined) return;
      if (node.level === 0 && node.dirty) dirtyLeaves++;
      const types = node.types;
      const addresses = node.addresses;
      if (types === null || addresses === null) {
        if (node.level > 0) problems.push(`${where}: an upper index node was evicted`);
        else if (node.dirty || node.diskAddress < 0) problems.push(`${where}: an unwritten leaf was evicted`);
        else evicted.push({ node, where });
        return;
      }
      for (let i = 0; i < FANOUT; i++) {
        const type = types[i] as UnitTypeValue;
        if (type === UnitType.NODE || type === UnitType.DATA) {
          visit(
            { type, address: addresses[i] as number, node: node.children[i] },
            node.level,
            `${where}/${i}`,
          );
        } else if (node.level > 0 && node.children[i] !== undefined) {
          problems.push(`${where}/${i}: ${type === UnitType.EMPTY ? "empty" : "zero"} unit keeps a child`);
        }
      }
    };
    for (const layer of this.layers.values()) {
      visit(
        layer.root,
        layer.rootLevel + 1,
        `layer ${layer.id} (${layer.kind} ${layer.disk}${layer.kind === "snapshot" ? "@" + layer.name : ""})`,
      );
      if (layer.parent !== null && !this.layers.has(layer.parent))
        problems.push(`layer ${layer.id}: missing parent ${layer.parent}`);
      if (unitSpanBlocks(layer.rootLevel + 1) < layer.blocks)
        problems.push(`layer ${layer.id}: root too low for its size`);
    }
    // Evicted leaves count from their blocks (read, checked, not cached); writes wait, so they stay put.
    for (let i = 0; i < evicted.length; i += loadParallelism) {
      await Promise.all(
        evicted.slice(i, i + loadParallelism).map(async ({ node, where }) => {
          try {
            const { types, addresses } = await this.readLeaf(node);
            for (let u = 0; u < FANOUT; u++)
              if (types[u] === UnitType.DATA) data.addRef(addresses[u] as number, 1);
          } catch (err) {
            problems.push(`${where}: ${(err as Error).message}`);
          }
        }),
      );
    }
    for (const [node, count] of nodeRefs) {
      if (node.refs !== count)
        problems.push(`node at block ${node.diskAddress}: ${node.refs} references counted, ${count} found`);
      if (!node.dirty && node.diskAddress < 0) problems.push("a clean node has no disk address");
      if (node.level === 0 && node.dirty && node.lruNext !== null)
        problems.push(`dirty leaf at block ${node.diskAddress} may be evicted`);
      if (
        node.level === 0 &&
        !node.dirty &&
        node.types !== null &&
        node.lruNext === null &&
        this.commitRunning === null
      ) {
        problems.push(`clean leaf at block ${node.diskAddress} is not evictable`);
      }
    }
    if (dirtyLeaves !== this.dirtyLeaves)
      problems.push(`${this.dirtyLeaves} dirty leaves counted, ${dirtyLeaves} found`);
    const live = [...this.dataRefs.entries()];
    const recount = [...data.entries()];
    if (JSON.stringify(live) !== JSON.stringify(recount)) {
      const first = live.find((entry, i) => JSON.stringify(entry) !== JSON.stringify(recount[i]));
      problems.push(
        `data reference counts differ from a recount (first difference near ${JSON.stringify(first ?? recount[live.length])})`,
      );
    }
    for (const space of this.spaces) {
      for (const [start, length] of space?.ranges() ?? []) {
        if (this.dataRefs.maxCount(start, length) > 0)
          problems.push(`free blocks ${start}+${length} hold referenced data`);
      }
    }
    for (const node of nodeRefs.keys()) {
      if (node.diskAddress >= 0 && deviceOfBlock(node.diskAddress) !== 0) {
        problems.push(`index node at block ${node.diskAddress} is not on device 0`);
      } else if (node.diskAddress >= 0 && this.space.isFree(node.diskAddress, 1)) {
        problems.push(`index node at block ${node.diskAddress} is marked free`);
      }
      if (node.diskAddress >= 0 && this.dataRefs.countAt(node.diskAddress) > 0) {
        problems.push(`block ${node.diskAddress} is both an index node and data`);
      }
    }
    return problems;
  }

  /**
   * Commit, then read back everything the new superblock reaches — both superblock slots, the layer
   * table, every index node — and verify magic, checksums, levels and self addresses against what is in
   * memory (an evicted leaf: against the checksum it was written with). Returns the problems found
   * (empty = clean), together with checkConsistency()'s. Writes wait while it runs.
   */
  verify(): Promise<{ problems: string[]; nodes: number; layers: number; dataBytes: number }> {
    return this.exclusive(() => this.verifyNow());
  }

  private async verifyNow(): Promise<{
    problems: string[];
    nodes: number;
    layers: number;
    dataBytes: number;
  }> {
    const problems = await this.checkConsistencyNow();
    if (!this.readOnly) {
      // Force a superblock write, so both slots are valid afterwards (one may be torn by a crash).
      this.layersDirty = true;
      await this.commit();
    }
    const slots = Buffer.alloc(FIRST_ALLOCATABLE_BLOCK * BLOCK_BYTES);
    await readAsync(this.backing, slots, 0);
    const valid = [0, 1].map((slot) => {
      try {
        const sb = decodeSuperblock(slots.subarray(slot * BLOCK_BYTES, (slot + 1) * BLOCK_BYTES));
        if (sb === null && !this.readOnly && this.sequence >= 2) {
          problems.push(`superblock slot ${slot} is not a valid superblock (damaged or torn)`);
        }
        return sb;
      } catch (err) {
        problems.push(`superblock slot ${slot}: ${(err as Error).message}`);
        return null;
      }
    });
    const newest = valid.filter((sb) => sb !== null).sort((a, b) => b.sequence - a.sequence)[0];
    if (!newest) problems.push("no valid superblock");
    else if (newest.sequence !== this.sequence) {
      problems.push(`newest superblock has sequence ${newest.sequence}, expected ${this.sequence}`);
    } else {
      try {
        const table = Buffer.alloc(Math.ceil(newest.layerTableBytes / BLOCK_BYTES) * BLOCK_BYTES);
        await readAsync(this.backing, table, newest.layerTableAddress * BLOCK_BYTES);
        const decoded = decodeLayerTable(table.subarray(0, newest.layerTableBytes), newest.layerTableCrc);
        if (decoded.layers.length !== this.layers.size) {
          problems.push(
            `layer table on disk has ${decoded.layers.length} layers, ${this.layers.size} in memory`,
          );
        }
      } catch (err) {
        problems.push(`layer table: ${(err as Error).message}`);
      }
    }
    const nodes = this.reachableNodes();
    const list = [...nodes].filter((node) => !node.dirty);
    for (let i = 0; i < list.length; i += loadParallelism) {
      await Promise.all(
        list.slice(i, i + loadParallelism).map(async (node) => {
          const buffer = Buffer.alloc(BLOCK_BYTES);
          await readAsync(this.backing, buffer, node.diskAddress * BLOCK_BYTES);
          try {
            const content = decodeNode(buffer, node.diskAddress, this.deviceEnds());
            const types = node.types;
            const addresses = node.addresses;
            if (types === null || addresses === null) {
              if ((content.crc | 0) !== node.crc || content.level !== node.level)
                problems.push(`index node at block ${node.diskAddress}: evicted leaf differs on disk`);
              return;
            }
            for (let u = 0; u < FANOUT; u++) {
              const expected =
                types[u] === UnitType.NODE ? (node.children[u] as IndexNode).diskAddress : addresses[u];
              if (content.types[u] !== types[u] || content.addresses[u] !== expected) {
                problems.push(
                  `index node at block ${node.diskAddress}: unit ${u} on disk differs from memory`,
                );
                break;
              }
            }
          } catch (err) {
            problems.push((err as Error).message);
          }
        }),
      );
    }
    return {
      problems,
      nodes: nodes.size,
      layers: this.layers.size,
      dataBytes: this.dataRefs.referencedBlocks * BLOCK_BYTES,
    };
  }

  // ---------------------------------------------------------------------------------------------
  // Statistics

  stats(): ImageStats {
    const nodes = this.reachableNodes().size;
    return {
      fileBytes: this.backing.size,
      dataBytes: this.dataRefs.referencedBlocks * BLOCK_BYTES,
      indexBytes: nodes * BLOCK_BYTES,
      freeBytes: this.spaces.reduce((sum, space) => sum + (space?.freeBlocks ?? 0), 0) * BLOCK_BYTES,
      layers: this.layers.size,
      commits: this.commits,
      sequence: this.sequence,
    };
  }

  /**
   * The layer's space figures, from memory. Every leaf it reaches must be resident — always the case
   * with a cache that never evicts (the default); otherwise use layerStatsAsync, which reads the others.
   */
  layerStats(layer: Layer): LayerStats {
    const counts = this.layerCounts(layer, null);
    return this.layerStatsOf(layer, counts);
  }

  /** layerStats that reads evicted leaves from disk (without caching them: a scan evicts nothing). */
  async layerStatsAsync(layer: Layer): Promise<LayerStats> {
    const evicted: Array<{ node: IndexNode; exclusive: boolean }> = [];
    const counts = this.layerCounts(layer, evicted);
    for (let i = 0; i < evicted.length; i += loadParallelism) {
      await settleAll(
        evicted.slice(i, i + loadParallelism).map(async ({ node, exclusive }) => {
          if (node.refs === 0) return; // released meanwhile
          const content = node.types === null ? await this.readLeaf(node) : null;
          const types = content ? content.types : typesOf(node);
          const addresses = content ? content.addresses : addressesOf(node);
          const exclusiveLeaf = exclusive && node.refs === 1;
          for (let u = 0; u < FANOUT; u++) {
            if (types[u] !== UnitType.DATA) continue;
            counts.mapped++;
            if (exclusiveLeaf && this.dataRefs.maxCount(addresses[u] as number, 1) === 1) counts.exclusive++;
          }
        }),
      );
    }
    return this.layerStatsOf(layer, counts);
  }

  /**
   * Walk a layer's tree counting mapped and exclusive blocks and index nodes. An evicted leaf's node
   * counts; its units are left to the caller through `evicted` (with whether its path is exclusive).
   */
  private layerCounts(
    layer: Layer,
    evicted: Array<{ node: IndexNode; exclusive: boolean }> | null,
  ): { mapped: number; exclusive: number; nodes: number; exclusiveNodes: number } {
    const counts = { mapped: 0, exclusive: 0, nodes: 0, exclusiveNodes: 0 };
    const seen = new Set<IndexNode>();
    const walk = (slot: Slot, level: number, exclusivePath: boolean): void => {
      if (slot.type === UnitType.DATA) {
        const span = unitSpanBlocks(level);
        counts.mapped += span;
        if (exclusivePath && this.dataRefs.maxCount(slot.address, span) === 1) counts.exclusive += span;
        return;
      }
      if (slot.type !== UnitType.NODE) return;
      const node = slot.node as IndexNode;
      const nodeExclusive = exclusivePath && node.refs === 1;
      if (!seen.has(node)) {
        seen.add(node);
        counts.nodes++;
        if (nodeExclusive) counts.exclusiveNodes++;
      }
      if (node.types === null) {
        if (evicted === null) {
          throw new VdiskError(
            "INTERNAL",
            `layer ${layer.id}: statistics need index leaves that are evicted; use layerStatsAsync`,
          );
        }
        evicted.push({ node, exclusive: nodeExclusive });
        return;
      }
      const types = node.types;
      const addresses = addressesOf(node);
      for (let i = 0; i < FANOUT; i++) {
        const type = types[i] as UnitTypeValue;
        if (type === UnitType.NODE || type === UnitType.DATA) {
          walk({ type, address: addresses[i] as number, node: node.children[i] }, level - 1, nodeExclusive);
        }
      }
    };
    walk(layer.root, layer.rootLevel + 1, true);
    return counts;
  }

  private layerStatsOf(
    layer: Layer,
    counts: { mapped: number; exclusive: number; nodes: number; exclusiveNodes: number },
  ): LayerStats {
    return {
      id: layer.id,
      name: layer.name,
      kind: layer.kind,
      disk: layer.disk,
      parent: layer.parent,
      sizeBytes: layer.sizeBytes,
      createdMs: layer.createdMs,
      mappedBytes: Math.min(counts.mapped, layer.blocks) * BLOCK_BYTES,
      exclusiveBytes: counts.exclusive * BLOCK_BYTES,
      indexBytes: counts.nodes * BLOCK_BYTES,
      exclusiveIndexBytes: counts.exclusiveNodes * BLOCK_BYTES,
    };
  }

  /** Physical offset in bytes of a block address. */
  static byteOffset(block: number): number {
    return block * BLOCK_BYTES;
  }
}

/** Unit `i` of `slot` seen as a slot one level down (a non-NODE slot maps the same to every unit). */
function childSlot(slot: Slot, i: number, childSpan: number): Slot {
  if (slot.type === UnitType.NODE) {
    const node = slot.node as IndexNode;
    return {
      type: typesOf(node)[i] as UnitTypeValue,
      address: addressesOf(node)[i] as number,
      node: node.children[i],
    };
  }
  return {
    type: slot.type,
    address: slot.type === UnitType.DATA ? slot.address + i * childSpan : 0,
    node: undefined,
  };
}

/** Wait for every promise, then reject with the first failure (no load is left running unseen). */
async function settleAll(promises: Array<Promise<unknown>>): Promise<void> {
  const results = await Promise.allSettled(promises);
  for (const result of results) if (result.status === "rejected") throw result.reason;
}

function hex32(value: number): string {
  return `0x${(value >>> 0).toString(16).padStart(8, "0")}`;
}

function emptySlot(): Slot {
  return { type: UnitType.EMPTY, address: 0, node: undefined };
}

function blocksOf(sizeBytes: number): number {
  return Math.ceil(sizeBytes / BLOCK_BYTES);
}

export { BLOCK_BYTES, BLOCK_SHIFT };
