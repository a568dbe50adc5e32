/**
 * Promise wrappers over the callback verbs of BlockDevice, for management code (import/export jobs,
 * tests) where clarity matters more than the last microsecond. The hot path never goes through here.
 */
import type { BlockDevice, DeviceUsage, Extent } from "./block-device";

export function readAsync(dev: BlockDevice, buf: Buffer, offset: number): Promise<number[] | null> {
  return new Promise((resolve, reject) =>
    dev.read(buf, offset, (err, holes) => (err ? reject(err) : resolve(holes ?? null))),
  );
}

export function writeAsync(dev: BlockDevice, buf: Buffer, offset: number, fua = false): Promise<void> {
  return new Promise((resolve, reject) =>
    dev.write(buf, offset, fua, (err) => (err ? reject(err) : resolve())),
  );
}

export function zeroAsync(dev: BlockDevice, offset: number, length: number, flags: number): Promise<void> {
  return new Promise((resolve, reject) =>
    dev.zero(offset, length, flags, (err) => (err ? reject(err) : resolve())),
  );
}

export function trimAsync(dev: BlockDevice, offset: number, length: number, fua = false): Promise<void> {
  return new Promise((resolve, reject) =>
    dev.trim(offset, length, fua, (err) => (err ? reject(err) : resolve())),
  );
}

export function flushAsync(dev: BlockDevice): Promise<void> {
  return new Promise((resolve, reject) => dev.flush((err) => (err ? reject(err) : resolve())));
}

export function cacheAsync(dev: BlockDevice, offset: number, length: number): Promise<void> {
  return new Promise((resolve, reject) =>
    dev.cache(offset, length, (err) => (err ? reject(err) : resolve())),
  );
}

export function blockStatusAsync(dev: BlockDevice, offset: number, length: number): Promise<Extent[]> {
  return new Promise((resolve, reject) =>
    dev.blockStatus(offset, length, (err, extents) => (err ? reject(err) : resolve(extents ?? []))),
  );
}

export function resizeAsync(dev: BlockDevice, size: number): Promise<void> {
  return new Promise((resolve, reject) => dev.resize(size, (err) => (err ? reject(err) : resolve())));
}

export function usageAsync(dev: BlockDevice): Promise<DeviceUsage> {
  return new Promise((resolve, reject) =>
    dev.usage((err, usage) => (err || !usage ? reject(err) : resolve(usage))),
  );
}

export function closeAsync(dev: BlockDevice): Promise<void> {
  return new Promise((resolve, reject) => dev.close((err) => (err ? reject(err) : resolve())));
}
