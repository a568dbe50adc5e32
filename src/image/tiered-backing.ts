/**
 * TieredBacking: the image's devices as one BlockDevice, so the image and its volumes address every
 * device with one kind of number (format.ts, "image address").
 *
 * Device d's file is the byte range [d × regionBytes, (d + 1) × regionBytes) of this device, regionBytes =
 * DEVICE_REGION_BLOCKS × BLOCK_BYTES (64 TiB). Device 0 is the image file itself (superblocks, index
 * nodes, layer table and data); devices 1..63 hold only data extents, one sparse file per image on each
 * device of its pool (registry.ts opens them). A request never spans two regions: the image allocates
 * every extent inside one device, and the assertion below holds it to that.
 *
 * - read, readNoWait, write, zero, trim, cache, blockStatus: routed to the device of `offset`.
 * - flush: every device, in parallel (a commit's fdatasync must cover data on every device before the
 *   superblock is written).
 * - size and resize: device 0 (the image file); the other devices grow through `resizeDevice`.
 * - close: every device.
 *
 * With a single device the image uses that device directly; this router is only for pools with several.
 */
import { VdiskError, assert } from "../errors";
import type {
  BlockDevice,
  Capabilities,
  DeviceUsage,
  Done,
  ExtentsDone,
  ReadDone,
} from "../devices/block-device";
import { BLOCK_BYTES, DEVICES_MAX, DEVICE_REGION_BLOCKS } from "./format";

/** Bytes of one device's region of the image address space. */
export const regionBytes = DEVICE_REGION_BLOCKS * BLOCK_BYTES;

export class TieredBacking implements BlockDevice {
  readonly kind: string;

  private readonly list: Array<BlockDevice | undefined>;

  /** `devices[d]` is device d's file; holes (undefined) are devices this image may not use. */
  constructor(devices: ReadonlyArray<BlockDevice | undefined>) {
    assert(devices.length >= 1 && devices.length <= DEVICES_MAX, "1..64 devices");
    assert(devices[0] !== undefined, "device 0 is the image file");
    this.list = [...devices];
    this.kind = (devices[0] as BlockDevice).kind;
  }

  /** Device d's file, by device (holes: devices the image does not have). */
  get devices(): ReadonlyArray<BlockDevice | undefined> {
    return this.list;
  }

  /** Add device `index` (a pool gained a device while the image is open). */
  attach(index: number, device: BlockDevice): void {
    assert(index >= 1 && index < DEVICES_MAX && this.list[index] === undefined, `device ${index} is new`);
    this.list[index] = device;
  }

  /** Remove device `index` (its pool lost it; the image holds nothing there) and return it to close. */
  detach(index: number): BlockDevice {
    const device = this.list[index];
    assert(index >= 1 && device !== undefined, `device ${index} is attached`);
    this.list[index] = undefined;
    return device;
  }

  private get primary(): BlockDevice {
    return this.list[0] as BlockDevice;
  }

  get size(): number {
    return this.primary.size;
  }

  get capabilities(): Capabilities {
    return this.primary.capabilities;
  }

  /** The device holding [offset, offset + length) and the offset inside it. */
  private route(offset: number, length: number): [BlockDevice, number] {
    const index = Math.floor(offset / regionBytes);
    const local = offset - index * regionBytes;
    assert(local + length <= regionBytes, `request at ${offset}+${length} spans two devices`);
    const device = this.list[index];
    assert(device !== undefined, `no device ${index} for image offset ${offset}`);
    return [device, local];
  }

  read(buf: Buffer, offset: number, done: ReadDone): void {
    const [device, local] = this.route(offset, buf.length);
    device.read(buf, local, done);
  }

  readNoWait(buf: Buffer, offset: number): boolean {
    const [device, local] = this.route(offset, buf.length);
    return device.readNoWait !== undefined && device.readNoWait(buf, local);
  }

  write(buf: Buffer, offset: number, fua: boolean, done: Done): void {
    const [device, local] = this.route(offset, buf.length);
    device.write(buf, local, fua, done);
  }

  zero(offset: number, length: number, flags: number, done: Done): void {
    const [device, local] = this.route(offset, length);
    device.zero(local, length, flags, done);
  }

  trim(offset: number, length: number, fua: boolean, done: Done): void {
    const [device, local] = this.route(offset, length);
    device.trim(local, length, fua, done);
  }

  cache(offset: number, length: number, done: Done): void {
    const [device, local] = this.route(offset, length);
    device.cache(local, length, done);
  }

  blockStatus(offset: number, length: number, done: ExtentsDone): void {
    const [device, local] = this.route(offset, length);
    device.blockStatus(local, length, done);
  }

  flush(done: Done): void {
    this.each((device, callback) => device.flush(callback), done);
  }

  resize(size: number, done: Done): void {
    this.primary.resize(size, done);
  }

  /** Device d's file size in bytes (0 when the image has no such device). */
  deviceSize(index: number): number {
    return this.devices[index]?.size ?? 0;
  }

  resizeDevice(index: number, size: number, done: Done): void {
    const device = this.devices[index];
    assert(device !== undefined, `no device ${index}`);
    device.resize(size, done);
  }

  usage(done: (err: VdiskError | null, usage?: DeviceUsage) => void): void {
    let allocatedBytes = 0;
    this.each(
      (device, callback) =>
        device.usage((err, usage) => {
          if (usage) allocatedBytes += usage.allocatedBytes;
          callback(err);
        }),
      (err) => (err ? done(err) : done(null, { allocatedBytes })),
    );
  }

  close(done: Done): void {
    this.each((device, callback) => device.close(callback), done);
  }

  /** Run `verb` on every device in parallel; `done` once all called back, with the first error. */
  private each(verb: (device: BlockDevice, callback: Done) => void, done: Done): void {
    let pending = 1;
    let failure: VdiskError | null = null;
    const callback = (err: VdiskError | null): void => {
      if (err && !failure) failure = err;
      if (--pending === 0) done(failure);
    };
    for (const device of this.devices) {
      if (device === undefined) continue;
      pending++;
      verb(device, callback);
    }
    process.nextTick(callback, null);
  }
}
