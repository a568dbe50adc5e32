/**
 * The vdisk image's on-disk structures: superblocks, index nodes and the layer table.
 * (docs/image-format.md draws the same thing for people.)
 *
 * The image file is an array of 4 KiB blocks. Blocks 0 and 1 are the two superblock slots; every other
 * block is free, an index node, part of a data extent, or part of the layer table. Nothing that a
 * committed superblock reaches is ever overwritten: index nodes and the layer table are copy-on-write,
 * and a commit ends by writing the other superblock slot (sequence + 1) after an fdatasync. After a crash
 * the slot with the highest valid sequence wins; everything it reaches was made durable before it.
 *
 * Index node (4096 bytes) — SNPdisk's sparse tree node with 64-bit units:
 *   512 units × 8 bytes. Unit byte 0 = type (bits 7..6) | device (bits 5..0: which device of the pool
 *   holds a DATA extent, 0 = the image file itself); byte 1 = header lane; bytes 2..7 = 48-bit block
 *   address on that device (big-endian). In memory the two are one number, the *image address*
 *   device × DEVICE_REGION_BLOCKS + block: the devices' blocks are consecutive regions of one address space,
 *   so reference counts, free space and the index all speak one kind of address (`deviceOfBlock`).
 *   Index nodes, superblocks and the layer table always live on device 0.
 *   Types: EMPTY (nothing written: reads zeros, reported as a hole), NODE (child index node at address),
 *   DATA (extent at address covering the unit's whole span), ZERO (reads zeros, not a hole).
 *   The header lives in the lane bytes of units 0..15:
 *     [0..1] magic 0x564e "VN"  [2] level  [3] format version  [4..7] CRC-32 of the node with these four
 *     bytes zeroed  [8..13] the node's own block address (catches misdirected writes)  [14..15] zero.
 *   A unit at level L spans 512^L blocks: 4 KiB, 2 MiB, 1 GiB, 512 GiB, 256 TiB. A node at level L holds
 *   units of level L. Five levels cover 128 PiB; 64 TiB needs a root at level 3 (4 nodes deep).
 *
 * Superblock (4096 bytes): magic "VDISKIMG", version, block size, fan-out, sequence, layer table address,
 * length and CRC, file blocks, CRC-32 of the superblock.
 *
 * Layer table: UTF-8 JSON (small: one entry per snapshot or head), CRC in the superblock. Each layer's
 * root is a unit one level above its root node's level, so a whole tree may collapse into one unit.
 *
 * Every length and address read from disk is untrusted and checked (QEMU's habit): a bad magic, CRC,
 * level, self address or out-of-file address is a CORRUPT error naming the block.
 */
import { crc32 } from "node:zlib";
import { VdiskError, assert } from "../errors";

export const BLOCK_BYTES = 4096;
export const BLOCK_SHIFT = 12;
export const FANOUT = 512;
export const FANOUT_SHIFT = 9;
export const LEVEL_MAX = 4;
export const SUPERBLOCK_SLOTS = 2;
/** First block that may hold nodes, data or the layer table. */
export const FIRST_ALLOCATABLE_BLOCK = SUPERBLOCK_SLOTS;
/** Largest address a unit can hold (48 bits of blocks). */
export const ADDRESS_MAX = 2 ** 48 - 1;
/** Devices a unit can name (6 bits). */
export const DEVICES_MAX = 64;
/**
 * Blocks of one device's region in the image address space (64 TiB per device): device d's block b is image
 * address d × DEVICE_REGION_BLOCKS + b. 64 regions fill the 2^40 blocks whose byte offsets stay safe
 * integers (extent-map.ts imageBlocksMax).
 */
export const DEVICE_REGION_BLOCKS = 2 ** 34;

/** The device (0 = the image file) whose region holds image address `block`. */
export function deviceOfBlock(block: number): number {
  return Math.floor(block / DEVICE_REGION_BLOCKS);
}

/**
 * Where the image's devices end, in image addresses: ends[d] is the first address past device d's file
 * (d × DEVICE_REGION_BLOCKS when it is empty). Its length is the number of devices the image may use.
 */
export type DeviceEnds = readonly number[];

/** Whether [address, address + blocks) is data inside one device's file (device 0: past the superblocks). */
export function dataExtentInside(ends: DeviceEnds, address: number, blocks: number): boolean {
  const device = deviceOfBlock(address);
  if (device >= ends.length) return false;
  const first = device === 0 ? FIRST_ALLOCATABLE_BLOCK : device * DEVICE_REGION_BLOCKS;
  return address >= first && address + blocks <= (ends[device] as number);
}
export const FORMAT_VERSION = 1;
/** Largest layer table accepted when reading (untrusted length). */
export const LAYER_TABLE_BYTES_MAX = 64 * 1024 * 1024;

export const UnitType = { EMPTY: 0, NODE: 1, DATA: 2, ZERO: 3 } as const;
export type UnitTypeValue = (typeof UnitType)[keyof typeof UnitType];

const NODE_MAGIC = 0x564e;
const SUPER_MAGIC = Buffer.from("VDISKIMG", "ascii");

/** Blocks spanned by one unit at `level`. */
export function unitSpanBlocks(level: number): number {
  const span = unitSpanBlocksByLevel[level];
  assert(span !== undefined, `no unit span for level ${level}`);
  return span;
}
/** unitSpanBlocks as a table: it is on every lookup's path, and `2 **` with a variable exponent is a pow call. */
const unitSpanBlocksByLevel: readonly number[] = Array.from({ length: LEVEL_MAX + 3 }, (_, level) =>
  Math.pow(2, FANOUT_SHIFT * level),
);

/** Smallest root node level whose node covers `blocks` blocks. */
export function rootLevelFor(blocks: number): number {
  let level = 0;
  while (unitSpanBlocks(level + 1) < blocks) level++;
  assert(level <= LEVEL_MAX, `disk of ${blocks} blocks needs more than ${LEVEL_MAX + 1} levels`);
  return level;
}

/** The decoded content of an index node. */
export interface NodeContent {
  level: number;
  types: Uint8Array; // FANOUT entries of UnitType
  addresses: Float64Array; // FANOUT block addresses (0 for EMPTY/ZERO)
}

/** A node as read from disk, with the CRC-32 its header carries. */
export interface DecodedNode extends NodeContent {
  crc: number;
}

/**
 * The two arrays of a node's content in one ArrayBuffer (addresses first, for alignment): one backing
 * store instead of two, which is what an index cache counts (index-cache.ts, `leafPayloadBytes`).
 */
export function allocateNodeArrays(): { types: Uint8Array; addresses: Float64Array } {
  const buffer = new ArrayBuffer(FANOUT * 9);
  return {
    addresses: new Float64Array(buffer, 0, FANOUT),
    types: new Uint8Array(buffer, FANOUT * 8, FANOUT),
  };
}

/** Encode `content` as the node at block `selfAddress` into `out`; returns the node's CRC-32. */
export function encodeNode(content: NodeContent, selfAddress: number, out: Buffer): number {
  assert(out.length === BLOCK_BYTES, "node buffer is one block");
  assert(selfAddress >= FIRST_ALLOCATABLE_BLOCK && selfAddress <= ADDRESS_MAX, "node address in range");
  for (let i = 0; i < FANOUT; i++) {
    const at = i * 8;
    const type = content.types[i] as number;
    const address = type === UnitType.NODE || type === UnitType.DATA ? (content.addresses[i] as number) : 0;
    const device = deviceOfBlock(address);
    assert(address >= 0 && device < DEVICES_MAX, "unit address in range");
    assert(type === UnitType.DATA || device === 0, "index nodes live on device 0");
    const local = address - device * DEVICE_REGION_BLOCKS;
    out[at] = (type << 6) | device;
    out[at + 1] = 0;
    out.writeUInt16BE(Math.floor(local / 2 ** 32), at + 2);
    out.writeUInt32BE(local >>> 0, at + 4);
  }
  // Header lanes: byte 1 of units 0..15.
  const header = Buffer.alloc(16);
  header.writeUInt16BE(NODE_MAGIC, 0);
  header[2] = content.level;
  header[3] = FORMAT_VERSION;
  header.writeUInt16BE(Math.floor(selfAddress / 2 ** 32), 8);
  header.writeUInt32BE(selfAddress >>> 0, 10);
  for (let i = 0; i < 16; i++) out[i * 8 + 1] = header[i] as number;
  const crc = crc32(out);
  for (let i = 0; i < 4; i++) out[(4 + i) * 8 + 1] = (crc >>> (24 - 8 * i)) & 0xff;
  return crc;
}

export function decodeNode(buf: Buffer, expectedAddress: number, ends: DeviceEnds): DecodedNode {
  const where = `index node at block ${expectedAddress}`;
  const lane = (i: number): number => buf[i * 8 + 1] as number;
  const magic = (lane(0) << 8) | lane(1);
  if (magic !== NODE_MAGIC) throw corrupt(`${where}: bad magic 0x${magic.toString(16)}`);
  const storedCrc = ((lane(4) << 24) | (lane(5) << 16) | (lane(6) << 8) | lane(7)) >>> 0;
  const copy = Buffer.from(buf);
  for (let i = 4; i < 8; i++) copy[i * 8 + 1] = 0;
  const actualCrc = crc32(copy);
  if (actualCrc !== storedCrc) {
    throw corrupt(`${where}: checksum mismatch (stored ${hex(storedCrc)}, computed ${hex(actualCrc)})`);
  }
  const level = lane(2);
  if (level > LEVEL_MAX) throw corrupt(`${where}: level ${level} above ${LEVEL_MAX}`);
  if (lane(3) !== FORMAT_VERSION) throw corrupt(`${where}: unknown node version ${lane(3)}`);
  const self =
    ((lane(8) << 8) | lane(9)) * 2 ** 32 +
    (((lane(10) << 24) | (lane(11) << 16) | (lane(12) << 8) | lane(13)) >>> 0);
  if (self !== expectedAddress)
    throw corrupt(`${where}: node says it lives at block ${self} (misdirected write)`);
  for (let i = 14; i < FANOUT; i++)
    if (lane(i) !== 0) throw corrupt(`${where}: reserved byte set in unit ${i}`);
  const { types, addresses } = allocateNodeArrays();
  for (let i = 0; i < FANOUT; i++) {
    const at = i * 8;
    const type = (buf[at] as number) >> 6;
    const device = (buf[at] as number) & 0x3f;
    const local = buf.readUInt16BE(at + 2) * 2 ** 32 + buf.readUInt32BE(at + 4);
    if (device !== 0 && (type !== UnitType.DATA || device >= ends.length)) {
      throw corrupt(`${where}: unit ${i} names device ${device}, which the image does not have`);
    }
    if (local >= DEVICE_REGION_BLOCKS) throw corrupt(`${where}: unit ${i} block ${local} past its device`);
    const address = device * DEVICE_REGION_BLOCKS + local;
    if (type === UnitType.NODE) {
      if (level === 0) throw corrupt(`${where}: leaf node has a child pointer in unit ${i}`);
      if (address < FIRST_ALLOCATABLE_BLOCK || address >= (ends[0] as number)) {
        throw corrupt(`${where}: unit ${i} points to block ${address}, outside the file (${ends[0]} blocks)`);
      }
    } else if (type === UnitType.DATA) {
      if (!dataExtentInside(ends, address, unitSpanBlocks(level))) {
        throw corrupt(`${where}: unit ${i} data extent at block ${address} runs outside its device's file`);
      }
    } else if (address !== 0) {
      throw corrupt(`${where}: unit ${i} of type ${type} carries an address`);
    }
    types[i] = type;
    addresses[i] = address;
  }
  return { level, types, addresses, crc: storedCrc };
}

export interface Superblock {
  sequence: number;
  layerTableAddress: number;
  layerTableBytes: number;
  layerTableCrc: number;
  fileBlocks: number;
}

export function encodeSuperblock(sb: Superblock): Buffer {
  const out = Buffer.alloc(BLOCK_BYTES);
  SUPER_MAGIC.copy(out, 0);
  out.writeUInt32BE(FORMAT_VERSION, 8);
  out.writeUInt32BE(BLOCK_BYTES, 12);
  out.writeUInt32BE(FANOUT, 16);
  writeU64(out, sb.sequence, 24);
  writeU64(out, sb.layerTableAddress, 32);
  out.writeUInt32BE(sb.layerTableBytes, 40);
  out.writeUInt32BE(sb.layerTableCrc, 44);
  writeU64(out, sb.fileBlocks, 48);
  out.writeUInt32BE(crc32(out), 4092);
  return out;
}

/** Decode one superblock slot; null if the slot is not a valid superblock (never written, torn, ...). */
export function decodeSuperblock(buf: Buffer): Superblock | null {
  if (buf.length !== BLOCK_BYTES || !buf.subarray(0, 8).equals(SUPER_MAGIC)) return null;
  const stored = buf.readUInt32BE(4092);
  const copy = Buffer.from(buf);
  copy.writeUInt32BE(0, 4092);
  if (crc32(copy) !== stored) return null;
  if (buf.readUInt32BE(8) !== FORMAT_VERSION) {
    throw corrupt(`superblock: format version ${buf.readUInt32BE(8)} is not supported`);
  }
  if (buf.readUInt32BE(12) !== BLOCK_BYTES || buf.readUInt32BE(16) !== FANOUT) {
    throw corrupt("superblock: block size or fan-out differ from this build's");
  }
  const sb: Superblock = {
    sequence: readU64(buf, 24),
    layerTableAddress: readU64(buf, 32),
    layerTableBytes: buf.readUInt32BE(40),
    layerTableCrc: buf.readUInt32BE(44),
    fileBlocks: readU64(buf, 48),
  };
  if (sb.layerTableBytes > LAYER_TABLE_BYTES_MAX) throw corrupt("superblock: layer table too large");
  return sb;
}

/** A tree root as stored in the layer table: a unit one level above the root node. */
export interface RootRecord {
  type: UnitTypeValue;
  address: number;
  /** Level of the root node (the root unit spans unitSpanBlocks(level + 1) blocks). */
  level: number;
}

export interface LayerRecord {
  id: number;
  /** Snapshots: the snapshot's name; heads: the disk's name. */
  name: string;
  kind: "head" | "snapshot";
  /** The disk a snapshot was taken of (heads: their own name). */
  disk: string;
  parent: number | null;
  sizeBytes: number;
  createdMs: number;
  root: RootRecord;
}

export interface LayerTable {
  version: number;
  nextLayerId: number;
  layers: LayerRecord[];
}

export function encodeLayerTable(table: LayerTable): Buffer {
  return Buffer.from(JSON.stringify(table), "utf8");
}

export function decodeLayerTable(buf: Buffer, expectedCrc: number): LayerTable {
  if (crc32(buf) !== expectedCrc) throw corrupt("layer table: checksum mismatch");
  let table: LayerTable;
  try {
    table = JSON.parse(buf.toString("utf8")) as LayerTable;
  } catch (err) {
    throw corrupt(`layer table: not valid JSON (${(err as Error).message})`);
  }
  if (
    table.version !== FORMAT_VERSION ||
    !Array.isArray(table.layers) ||
    !Number.isInteger(table.nextLayerId)
  ) {
    throw corrupt("layer table: malformed header");
  }
  const ids = new Set<number>();
  for (const layer of table.layers) {
    const ok =
      Number.isInteger(layer.id) &&
      layer.id < table.nextLayerId &&
      typeof layer.name === "string" &&
      typeof layer.disk === "string" &&
      (layer.kind === "head" || layer.kind === "snapshot") &&
      (layer.parent === null || Number.isInteger(layer.parent)) &&
      Number.isSafeInteger(layer.sizeBytes) &&
      layer.sizeBytes > 0 &&
      layer.root !== null &&
      typeof layer.root === "object" &&
      [0, 1, 2, 3].includes(layer.root.type) &&
      Number.isSafeInteger(layer.root.address) &&
      Number.isInteger(layer.root.level) &&
      layer.root.level >= 0 &&
      layer.root.level <= LEVEL_MAX;
    if (!ok) throw corrupt(`layer table: malformed layer ${JSON.stringify(layer).slice(0, 200)}`);
    if (ids.has(layer.id)) throw corrupt(`layer table: duplicate layer id ${layer.id}`);
    ids.add(layer.id);
  }
  for (const layer of table.layers) {
    if (layer.parent !== null && !ids.has(layer.parent)) {
      throw corrupt(`layer table: layer ${layer.id} has a missing parent ${layer.parent}`);
    }
  }
  return table;
}

export function layerTableCrc(buf: Buffer): number {
  return crc32(buf);
}

function corrupt(message: string): VdiskError {
  return new VdiskError("CORRUPT", message, { hint: "run `vdisk check` on the disk for a full report" });
}

function hex(value: number): string {
  return `0x${value.toString(16).padStart(8, "0")}`;
}

function writeU64(buf: Buffer, value: number, offset: number): void {
  buf.writeUInt32BE(Math.floor(value / 2 ** 32), offset);
  buf.writeUInt32BE(value >>> 0, offset + 4);
}

function readU64(buf: Buffer, offset: number): number {
  const high = buf.readUInt32BE(offset);
  if (high >= 2 ** 21) throw corrupt(`64-bit field at byte ${offset} is beyond 2^53`);
  return high * 2 ** 32 + buf.readUInt32BE(offset + 4);
}
