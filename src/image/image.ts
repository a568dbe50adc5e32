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
 * Space. Reference counts live in memory and are rebuilt at open by walking every layer (shared nodes
 * once): `node.refs` counts the slots pointing at a node, `dataRefs` counts, per block of the file, the
 * units covering it. A write goes in place only when every node on its path and its data blocks are
 * referenced once; otherwise it goes to newly allocated blocks and the mapping is switched when the data
 * is written. When a node fills with DATA units that are contiguous, it collapses into one unit of its
 * parent (SNPdisk's regrouping): a sequentially written region costs one unit and reads as one request.
 *
 * Commit (flush, snapshot, clone, rollback, delete, resize). Dirty nodes are written to fresh blocks,
 * then the layer table, fdatasync, then the other superblock slot, fdatasync. A committed block is never
 * overwritten while a committed superblock reaches it; blocks freed since are released only after the
 * commit that stops referencing them is durable and no I/O that began before the free is still in
 * flight (`epoch` bookkeeping), then punched out of the file so the image stays thin.
 *
 * Concurrency: everything here runs on the event loop; the tree changes only synchronously. Structural
 * operations close a write gate, wait for in-flight writes, change the layers, commit, and reopen it.
 */
import { VdiskError, assert } from "../errors";
import type { BlockDevice } from "../devices/block-device";
import { flushAsync, readAsync, resizeAsync, trimAsync, writeAsync } from "../devices/promises";
import { FreeSpace, RefcountMap } from "./extent-map";
import { RangeLocks } from "./range-locks";
import {
  BLOCK_BYTES,
  BLOCK_SHIFT,
  FANOUT,
  FIRST_ALLOCATABLE_BLOCK,
  type LayerRecord,
  type LayerTable,
  UnitType,
  type UnitTypeValue,
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
/** Parallel reads when loading the index at open. */
const loadParallelism = 32;

export class IndexNode {
  readonly types: Uint8Array;
  readonly addresses: Float64Array;
  readonly children: Array<IndexNode | undefined>;
  refs = 0;
  /** Where the node is on disk; -1 while it was never written. */
  diskAddress = -1;
  dirty = true;

  constructor(
    readonly level: number,
    types?: Uint8Array,
    addresses?: Float64Array,
    children?: Array<IndexNode | undefined>,
  ) {
    this.types = types ?? new Uint8Array(FANOUT);
    this.addresses = addresses ?? new Float64Array(FANOUT);
    this.children = children ?? new Array<IndexNode | undefined>(FANOUT);
  }
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

export class Image {
  readonly layers = new Map<number, Layer>();
  dataRefs = new RefcountMap();
  space: FreeSpace;
  private sequence = 0;
  private nextLayerId = 1;
  private layerTableAddress = -1;
  private layerTableBlocks = 0;
  private layersDirty = false;
  private nodesDirty = false;
  private pendingFrees: PendingFree[] = [];
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

  private constructor(
    readonly backing: BlockDevice,
    readonly readOnly: boolean,
    fileBlocks: number,
  ) {
    this.space = new FreeSpace(FIRST_ALLOCATABLE_BLOCK, Math.max(fileBlocks, FIRST_ALLOCATABLE_BLOCK));
  }

  // ---------------------------------------------------------------------------------------------
  // Create and open

  /** Format `backing` as a new image with one empty head of `sizeBytes`. */
  static async create(backing: BlockDevice, head: { name: string; sizeBytes: number }): Promise<Image> {
    if (backing.size < FIRST_ALLOCATABLE_BLOCK * BLOCK_BYTES) {
      await resizeAsync(backing, FIRST_ALLOCATABLE_BLOCK * BLOCK_BYTES);
    }
    await writeAsync(backing, Buffer.alloc(FIRST_ALLOCATABLE_BLOCK * BLOCK_BYTES), 0);
    const image = new Image(backing, false, Math.floor(backing.size / BLOCK_BYTES));
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

  static async open(backing: BlockDevice, options: { readOnly?: boolean } = {}): Promise<Image> {
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

    const image = new Image(backing, options.readOnly ?? false, fileBlocks);
    image.sequence = sb.sequence;
    image.nextLayerId = table.nextLayerId;
    image.layerTableAddress = sb.layerTableAddress;
    image.layerTableBlocks = tableBlocks;
    await image.loadLayers(table, fileBlocks);
    image.nodesDirty = false;
    image.layersDirty = false;
    return image;
  }

  private async loadLayers(table: LayerTable, fileBlocks: number): Promise<void> {
    const nodes = new Map<number, IndexNode>();
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
          fileBlocks,
          `layer ${record.id} root`,
        );
        this.dataRefs.addRef(slot.address, unitSpanBlocks(record.root.level + 1));
      }
    }
    while (frontier.length > 0) {
      const next: Pending[] = [];
      for (let i = 0; i < frontier.length; i += loadParallelism) {
        const batch = frontier.slice(i, i + loadParallelism);
        await Promise.all(
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
            const placeholder = new IndexNode(pending.level);
            nodes.set(pending.address, placeholder);
            await readAsync(this.backing, buffer, pending.address * BLOCK_BYTES);
            const content = decodeNode(buffer, pending.address, fileBlocks);
            if (content.level !== pending.level) {
              throw new VdiskError(
                "CORRUPT",
                `index node at block ${pending.address} has level ${content.level}, expected ${pending.level}`,
              );
            }
            placeholder.types.set(content.types);
            placeholder.addresses.set(content.addresses);
            placeholder.diskAddress = pending.address;
            placeholder.dirty = false;
            placeholder.refs++;
            pending.attach(placeholder);
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
      this.space = FreeSpace.fromUsed(
        FIRST_ALLOCATABLE_BLOCK,
        Math.max(fileBlocks, FIRST_ALLOCATABLE_BLOCK),
        used,
      );
    } catch (err) {
      throw new VdiskError("CORRUPT", `overlapping allocations in the image: ${(err as Error).message}`, {
        cause: err,
      });
    }
  }

  private checkDataRange(address: number, blocks: number, fileBlocks: number, what: string): void {
    if (address < FIRST_ALLOCATABLE_BLOCK || address + blocks > fileBlocks) {
      throw new VdiskError("CORRUPT", `${what}: data extent at block ${address} runs outside the file`);
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
      if (newBlocks < oldBlocks) this.apply(head, newBlocks, oldBlocks, UnitType.EMPTY, 0);
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
    for (const entry of release) {
      // Punch the blocks out so the file stays thin; they become allocatable only once punched,
      // so a later write to them cannot be overtaken by the punch.
      trimAsync(this.backing, entry.start * BLOCK_BYTES, entry.length * BLOCK_BYTES).then(
        () => this.space.free(entry.start, entry.length),
        () => this.space.free(entry.start, entry.length),
      );
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
      for (const [start, length] of this.dataRefs.decRef(slot.address, unitSpanBlocks(level))) {
        this.freeLater(start, length);
      }
    }
  }

  private releaseNode(node: IndexNode): void {
    assert(node.refs > 0, "node released more often than retained");
    node.refs--;
    if (node.refs > 0) return;
    for (let i = 0; i < FANOUT; i++) {
      const type = node.types[i] as UnitTypeValue;
      if (type === UnitType.NODE || type === UnitType.DATA) {
        this.releaseSlot({ type, address: node.addresses[i] as number, node: node.children[i] }, node.level);
      }
    }
    if (node.diskAddress >= 0) this.freeLater(node.diskAddress, 1);
    node.diskAddress = -1;
  }

  /** The node itself is dropped but its units live on elsewhere (collapse): free only its block. */
  private dropNodeShell(node: IndexNode): void {
    assert(node.refs === 1, "only an exclusive node collapses");
    node.refs = 0;
    if (node.diskAddress >= 0) this.freeLater(node.diskAddress, 1);
    node.diskAddress = -1;
  }

  /** An exclusive, dirty version of `node` for a writer (copy-on-write when it is shared). */
  private own(node: IndexNode): IndexNode {
    if (node.refs === 1) {
      node.dirty = true;
      return node;
    }
    const copy = new IndexNode(node.level, node.types.slice(), node.addresses.slice(), node.children.slice());
    for (let i = 0; i < FANOUT; i++) {
      const type = copy.types[i];
      if (type === UnitType.NODE) (copy.children[i] as IndexNode).refs++;
      else if (type === UnitType.DATA)
        this.dataRefs.addRef(copy.addresses[i] as number, unitSpanBlocks(node.level));
    }
    node.refs--;
    copy.refs = 1;
    return copy;
  }

  private setUnit(node: IndexNode, index: number, slot: Slot): void {
    node.types[index] = slot.type;
    node.addresses[index] = slot.type === UnitType.DATA ? slot.address : 0;
    node.children[index] = slot.type === UnitType.NODE ? slot.node : undefined;
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
    const childExclusive = exclusive && node.refs === 1;
    const childSpan = span / FANOUT;
    const first = Math.floor((lo - slotStart) / childSpan);
    const last = Math.ceil((hi - slotStart) / childSpan);
    for (let i = first; i < last; i++) {
      const childStart = slotStart + i * childSpan;
      const type = node.types[i] as UnitTypeValue;
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
        const address = type === UnitType.DATA ? (node.addresses[i] as number) + (runLo - childStart) : 0;
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
          if (this.closing || this.layers.get(layer.id) !== layer || end > layer.blocks) return finish();
          const runs: Run[] = [];
          this.map(layer, start, end, (run) => runs.push(run));
          const eligible =
            runs.length > 1 &&
            runs.every(
              (run) =>
                run.type === UnitType.DATA &&
                run.pathExclusive &&
                this.dataRefs.maxCount(run.address, run.count) === 1,
            );
          if (!eligible) return finish();
          const address = this.space.allocate(FANOUT);
          const buffer = Buffer.allocUnsafe(FANOUT * BLOCK_BYTES);
          const epoch = this.ioBegin();
          this.ensureFileCovers((err) => {
            if (err) {
              this.unallocateData(address, FANOUT);
              this.ioEnd(epoch);
              return finish();
            }
            Promise.all(
              runs.map((run) =>
                readAsync(
                  this.backing,
                  buffer.subarray(
                    (run.block - start) * BLOCK_BYTES,
                    (run.block - start + run.count) * BLOCK_BYTES,
                  ),
                  run.address * BLOCK_BYTES,
                ),
              ),
            )
              .then(() => writeAsync(this.backing, buffer, address * BLOCK_BYTES))
              .then(
                () => {
                  this.regroups++;
                  this.apply(layer, start, end, UnitType.DATA, address);
                },
                () => this.unallocateData(address, FANOUT),
              )
              .finally(() => {
                this.ioEnd(epoch);
                finish();
              });
          });
        });
      });
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
    for (let i = first; i < last; i++) {
      const child: Slot = {
        type: node.types[i] as UnitTypeValue,
        address: node.addresses[i] as number,
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
    const node = new IndexNode(level - 1);
    node.refs = 1;
    if (slot.type === UnitType.EMPTY) return node;
    node.types.fill(slot.type);
    if (slot.type === UnitType.DATA) {
      const childSpan = unitSpanBlocks(level - 1);
      for (let i = 0; i < FANOUT; i++) node.addresses[i] = slot.address + i * childSpan;
    }
    return node;
  }

  /**
   * SNPdisk's regrouping: a node whose units are uniform becomes one unit of its parent. A leaf full of
   * DATA units that are not contiguous is queued for a background copy that makes them contiguous.
   */
  private collapse(node: IndexNode, nodeLevel: number, slotStart: number): Slot {
    const first = node.types[0] as UnitTypeValue;
    if (first === UnitType.NODE) return { type: UnitType.NODE, address: 0, node };
    const childSpan = unitSpanBlocks(nodeLevel);
    const base = node.addresses[0] as number;
    let contiguous = true;
    for (let i = 1; i < FANOUT; i++) {
      if (node.types[i] !== first) return { type: UnitType.NODE, address: 0, node };
      if (first === UnitType.DATA && node.addresses[i] !== base + i * childSpan) contiguous = false;
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
    const lift = (l: Layer): Slot => {
      let slot = l.root;
      for (let lv = l.rootLevel + 1; lv < level; lv++) {
        const node = new IndexNode(lv);
        this.setUnit(node, 0, slot);
        slot = { type: UnitType.NODE, address: 0, node };
      }
      return slot;
    };
    let pending: { block: number; count: number; changed: boolean } | null = null;
    const emit = (block: number, count: number, changed: boolean): void => {
      if (pending && pending.changed === changed && pending.block + pending.count === block) {
        pending.count += count;
        return;
      }
      if (pending) visit(pending.block, pending.count, pending.changed);
      pending = { block, count, changed };
    };
    this.diffSlots(lift(layer), lift(other), level, 0, start, end, emit);
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
    const childOf = (s: Slot, i: number): Slot => {
      if (s.type === UnitType.NODE) {
        const node = s.node as IndexNode;
        return {
          type: node.types[i] as UnitTypeValue,
          address: node.addresses[i] as number,
          node: node.children[i],
        };
      }
      return {
        type: s.type,
        address: s.type === UnitType.DATA ? s.address + i * childSpan : 0,
        node: undefined,
      };
    };
    const first = Math.floor((lo - slotStart) / childSpan);
    const last = Math.ceil((hi - slotStart) / childSpan);
    for (let i = first; i < last; i++) {
      this.diffSlots(childOf(a, i), childOf(b, i), level - 1, slotStart + i * childSpan, lo, hi, emit);
    }
  }

  // ---------------------------------------------------------------------------------------------
  // Allocation

  /** Allocate up to `blocks` contiguous blocks for new data, near `hint` when possible. */
  allocateData(blocks: number, hint: number | undefined): [number, number] {
    this.assertWritable();
    const [start, length] = this.space.allocateUpTo(blocks, hint);
    assert(length >= 1 && length <= blocks, "allocation within the request");
    return [start, length];
  }

  /** Give back blocks allocated for data that never got mapped (a failed or superseded write). */
  unallocateData(start: number, length: number): void {
    this.freeLater(start, length);
  }

  /** Make sure the backing file covers every allocated block before data is written there. */
  ensureFileCovers(callback: (err: VdiskError | null) => void): void {
    if (this.growing === null && this.backing.size >= this.space.endBlock * BLOCK_BYTES)
      return callback(null);
    // One resize at a time (two ftruncates finishing out of order could shrink the file).
    const previous = this.growing ?? Promise.resolve();
    const next = previous.then(async () => {
      const needed = this.space.endBlock * BLOCK_BYTES;
      if (this.backing.size >= needed) return;
      // Grow in steps so a sequential writer does not truncate on every request.
      const target = Math.max(
        needed,
        Math.min(this.backing.size * 2, this.backing.size + 1024 * 1024 * 1024),
      );
      await resizeAsync(this.backing, target);
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
      for (let i = 0; i < FANOUT; i++)
        if (node.types[i] === UnitType.NODE) collect(node.children[i] as IndexNode);
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
        for (let u = 0; u < FANOUT; u++) {
          if (node.types[u] === UnitType.NODE)
            node.addresses[u] = (node.children[u] as IndexNode).diskAddress;
        }
        encodeNode(node, node.diskAddress, write.buffer.subarray(j * BLOCK_BYTES, (j + 1) * BLOCK_BYTES));
        node.dirty = false;
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
    while (this.regroupRunning) await this.regroupRunning;
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closing = true;
    if (this.regroupRunning) await this.regroupRunning;
    if (!this.readOnly) await this.commit();
    this.closed = true;
    if (this.commitTimer) clearTimeout(this.commitTimer);
    this.commitTimer = null;
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
   */
  checkConsistency(): string[] {
    const problems: string[] = [];
    const nodeRefs = new Map<IndexNode, number>();
    const data = new RefcountMap();
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
      for (let i = 0; i < FANOUT; i++) {
        const type = node.types[i] as UnitTypeValue;
        if (type === UnitType.NODE || type === UnitType.DATA) {
          visit(
            { type, address: node.addresses[i] as number, node: node.children[i] },
            node.level,
            `${where}/${i}`,
          );
        } else if (node.children[i] !== undefined) {
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
    for (const [node, count] of nodeRefs) {
      if (node.refs !== count)
        problems.push(`node at block ${node.diskAddress}: ${node.refs} references counted, ${count} found`);
      if (!node.dirty && node.diskAddress < 0) problems.push("a clean node has no disk address");
    }
    const live = [...this.dataRefs.entries()];
    const recount = [...data.entries()];
    if (JSON.stringify(live) !== JSON.stringify(recount)) {
      const first = live.find((entry, i) => JSON.stringify(entry) !== JSON.stringify(recount[i]));
      problems.push(
        `data reference counts differ from a recount (first difference near ${JSON.stringify(first ?? recount[live.length])})`,
      );
    }
    for (const [start, length] of this.space.ranges()) {
      if (this.dataRefs.maxCount(start, length) > 0)
        problems.push(`free blocks ${start}+${length} hold referenced data`);
    }
    for (const node of nodeRefs.keys()) {
      if (node.diskAddress >= 0 && this.space.isFree(node.diskAddress, 1)) {
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
   * memory. Returns the problems found (empty = clean), together with checkConsistency()'s.
   */
  async verify(): Promise<{ problems: string[]; nodes: number; layers: number; dataBytes: number }> {
    const problems = this.checkConsistency();
    if (!this.readOnly) {
      // Force a superblock write, so both slots are valid afterwards (one may be torn by a crash).
      this.layersDirty = true;
      await this.commit();
    }
    const fileBlocks = Math.floor(this.backing.size / BLOCK_BYTES);
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
    const nodes = new Set<IndexNode>();
    const collect = (node: IndexNode): void => {
      if (nodes.has(node)) return;
      nodes.add(node);
      for (let i = 0; i < FANOUT; i++)
        if (node.types[i] === UnitType.NODE) collect(node.children[i] as IndexNode);
    };
    for (const layer of this.layers.values())
      if (layer.root.type === UnitType.NODE) collect(layer.root.node as IndexNode);
    const list = [...nodes].filter((node) => !node.dirty);
    for (let i = 0; i < list.length; i += loadParallelism) {
      await Promise.all(
        list.slice(i, i + loadParallelism).map(async (node) => {
          const buffer = Buffer.alloc(BLOCK_BYTES);
          await readAsync(this.backing, buffer, node.diskAddress * BLOCK_BYTES);
          try {
            const content = decodeNode(buffer, node.diskAddress, fileBlocks);
            for (let u = 0; u < FANOUT; u++) {
              const expected =
                node.types[u] === UnitType.NODE
                  ? (node.children[u] as IndexNode).diskAddress
                  : node.addresses[u];
              if (content.types[u] !== node.types[u] || content.addresses[u] !== expected) {
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
    let nodes = 0;
    const seen = new Set<IndexNode>();
    const count = (node: IndexNode): void => {
      if (seen.has(node)) return;
      seen.add(node);
      nodes++;
      for (let i = 0; i < FANOUT; i++)
        if (node.types[i] === UnitType.NODE) count(node.children[i] as IndexNode);
    };
    for (const layer of this.layers.values())
      if (layer.root.type === UnitType.NODE) count(layer.root.node as IndexNode);
    return {
      fileBytes: this.backing.size,
      dataBytes: this.dataRefs.referencedBlocks * BLOCK_BYTES,
      indexBytes: nodes * BLOCK_BYTES,
      freeBytes: this.space.freeBlocks * BLOCK_BYTES,
      layers: this.layers.size,
      commits: this.commits,
      sequence: this.sequence,
    };
  }

  layerStats(layer: Layer): LayerStats {
    let mapped = 0;
    let exclusive = 0;
    let nodes = 0;
    let exclusiveNodes = 0;
    const seen = new Set<IndexNode>();
    const walk = (slot: Slot, level: number, exclusivePath: boolean): void => {
      if (slot.type === UnitType.DATA) {
        const span = unitSpanBlocks(level);
        mapped += span;
        if (exclusivePath && this.dataRefs.maxCount(slot.address, span) === 1) exclusive += span;
        return;
      }
      if (slot.type !== UnitType.NODE) return;
      const node = slot.node as IndexNode;
      const nodeExclusive = exclusivePath && node.refs === 1;
      if (!seen.has(node)) {
        seen.add(node);
        nodes++;
        if (nodeExclusive) exclusiveNodes++;
      }
      for (let i = 0; i < FANOUT; i++) {
        const type = node.types[i] as UnitTypeValue;
        if (type === UnitType.NODE || type === UnitType.DATA) {
          walk(
            { type, address: node.addresses[i] as number, node: node.children[i] },
            level - 1,
            nodeExclusive,
          );
        }
      }
    };
    walk(layer.root, layer.rootLevel + 1, true);
    return {
      id: layer.id,
      name: layer.name,
      kind: layer.kind,
      disk: layer.disk,
      parent: layer.parent,
      sizeBytes: layer.sizeBytes,
      createdMs: layer.createdMs,
      mappedBytes: Math.min(mapped, layer.blocks) * BLOCK_BYTES,
      exclusiveBytes: exclusive * BLOCK_BYTES,
      indexBytes: nodes * BLOCK_BYTES,
      exclusiveIndexBytes: exclusiveNodes * BLOCK_BYTES,
    };
  }

  /** Physical offset in bytes of a block address. */
  static byteOffset(block: number): number {
    return block * BLOCK_BYTES;
  }
}

function emptySlot(): Slot {
  return { type: UnitType.EMPTY, address: 0, node: undefined };
}

function blocksOf(sizeBytes: number): number {
  return Math.ceil(sizeBytes / BLOCK_BYTES);
}

export { BLOCK_BYTES, BLOCK_SHIFT };
