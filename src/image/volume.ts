/**
 * ImageVolume: one layer of a vdisk image seen as a BlockDevice — a head (read-write, a disk) or a
 * snapshot (read-only, exported as DISK@SNAP). The NBD server and every other front end only see this.
 *
 * Reads map the byte range through the layer's tree (one walk, whatever the snapshot depth) and issue
 * one positional read per mapped run; unmapped and zeroed runs are filled with zeros and reported as
 * holes. Writes, zeroes and trims take a range lock on the blocks they touch (overlapping writers are
 * serialised, so a read-modify-write of a partial block cannot lose a neighbour's bytes), then:
 * - a run whose data and index path are referenced only by this layer is written in place;
 * - any other run gets newly allocated blocks (next to its left neighbour's data when free, so
 *   sequential writes stay contiguous and collapse), is written there, and its mapping switched after;
 * - zero and trim change only the index (ZERO or EMPTY units), which is why FAST_ZERO is honoured.
 * Unaligned edges are read, patched and written as whole 4 KiB blocks.
 *
 * Invariant: the image's write gate counts every mutating request from start to completion, so a
 * snapshot never captures half a write.
 */
import { VdiskError, assert, fromSystemError } from "../errors";
import {
  type BlockDevice,
  type Capabilities,
  type DeviceUsage,
  type Done,
  type Extent,
  type ExtentsDone,
  ExtentFlags,
  fullCapabilities,
  type ReadDone,
  ZeroFlags,
} from "../devices/block-device";
import { BLOCK_BYTES, UnitType, type UnitTypeValue } from "./format";
import { type Image, type Layer } from "./image";

/** Extents returned by one blockStatus call. */
export const volumeBlockStatusExtentsMax = 1024;

export class ImageVolume implements BlockDevice {
  readonly kind = "vdisk";
  readonly capabilities: Capabilities;
  private closed = false;

  constructor(
    readonly image: Image,
    readonly layer: Layer,
  ) {
    this.capabilities = fullCapabilities(layer.kind === "snapshot" || image.readOnly);
  }

  get size(): number {
    return this.layer.sizeBytes;
  }

  // ---------------------------------------------------------------------------------------------
  // Reads

  read(buf: Buffer, offset: number, done: ReadDone): void {
    this.assertRange(offset, buf.length);
    const image = this.image;
    const epoch = image.ioBegin();
    const end = offset + buf.length;
    const holes: number[] = [];
    let pending = 1;
    let failure: VdiskError | null = null;
    const finish = (err: VdiskError | null): void => {
      if (err && !failure) failure = err;
      if (--pending > 0) return;
      image.ioEnd(epoch);
      done(failure, failure ? null : holes);
    };
    image.map(this.layer, Math.floor(offset / BLOCK_BYTES), Math.ceil(end / BLOCK_BYTES), (run) => {
      const runStart = Math.max(offset, run.block * BLOCK_BYTES);
      const runEnd = Math.min(end, (run.block + run.count) * BLOCK_BYTES);
      const at = runStart - offset;
      const length = runEnd - runStart;
      if (run.type === UnitType.DATA) {
        pending++;
        image.backing.read(
          buf.subarray(at, at + length),
          run.address * BLOCK_BYTES + (runStart - run.block * BLOCK_BYTES),
          finish,
        );
      } else {
        buf.fill(0, at, at + length);
        const last = holes.length - 2;
        if (last >= 0 && (holes[last] as number) + (holes[last + 1] as number) === at) {
          holes[last + 1] = (holes[last + 1] as number) + length;
        } else {
          holes.push(at, length);
        }
      }
    });
    process.nextTick(finish, null);
  }

  /** Cache-hit fast path: only for requests that map to one data run (or to nothing at all). */
  readNoWait(buf: Buffer, offset: number): boolean {
    this.assertRange(offset, buf.length);
    const backing = this.image.backing;
    if (!backing.readNoWait) return false;
    let single: { type: UnitTypeValue; physical: number } | null = null;
    let runs = 0;
    const end = offset + buf.length;
    this.image.map(this.layer, Math.floor(offset / BLOCK_BYTES), Math.ceil(end / BLOCK_BYTES), (run) => {
      runs++;
      single = {
        type: run.type,
        physical:
          run.address * BLOCK_BYTES + (Math.max(offset, run.block * BLOCK_BYTES) - run.block * BLOCK_BYTES),
      };
    });
    if (runs !== 1 || single === null) return false;
    const only = single as { type: UnitTypeValue; physical: number };
    if (only.type !== UnitType.DATA) {
      buf.fill(0);
      return true;
    }
    return backing.readNoWait(buf, only.physical);
  }

  // ---------------------------------------------------------------------------------------------
  // Writes

  write(buf: Buffer, offset: number, fua: boolean, done: Done): void {
    this.assertWritable();
    this.assertRange(offset, buf.length);
    this.mutate(offset, buf.length, fua, done, (firstBlock, blocks, release) => {
      if (offset % BLOCK_BYTES === 0 && buf.length % BLOCK_BYTES === 0) {
        return this.writeBlocks(firstBlock, buf, release);
      }
      this.patch(firstBlock, blocks, offset, buf, release);
    });
  }

  zero(offset: number, length: number, flags: number, done: Done): void {
    this.assertWritable();
    this.assertRange(offset, length);
    const type = flags & ZeroFlags.MAY_TRIM ? UnitType.EMPTY : UnitType.ZERO;
    this.unmap(offset, length, type, (flags & ZeroFlags.FUA) !== 0, done);
  }

  trim(offset: number, length: number, fua: boolean, done: Done): void {
    this.assertWritable();
    this.assertRange(offset, length);
    this.unmap(offset, length, UnitType.EMPTY, fua, done);
  }

  /** Zero or trim: whole blocks by index change only, partial edge blocks by read-modify-write. */
  private unmap(offset: number, length: number, type: UnitTypeValue, fua: boolean, done: Done): void {
    this.mutate(offset, length, fua, done, (_firstBlock, _blocks, release) => {
      const end = offset + length;
      const wholeStart = Math.ceil(offset / BLOCK_BYTES);
      const wholeEnd = Math.floor(end / BLOCK_BYTES);
      if (wholeStart < wholeEnd) this.image.apply(this.layer, wholeStart, wholeEnd, type, 0);
      const edges: Array<[number, number]> = [];
      if (offset % BLOCK_BYTES !== 0 || wholeStart >= wholeEnd) {
        const block = Math.floor(offset / BLOCK_BYTES);
        edges.push([Math.max(offset, block * BLOCK_BYTES), Math.min(end, (block + 1) * BLOCK_BYTES)]);
      }
      if (
        end % BLOCK_BYTES !== 0 &&
        Math.floor((end - 1) / BLOCK_BYTES) !== Math.floor(offset / BLOCK_BYTES)
      ) {
        const block = Math.floor((end - 1) / BLOCK_BYTES);
        edges.push([block * BLOCK_BYTES, end]);
      }
      if (edges.length === 0) return release(null);
      let pending = edges.length;
      let failure: VdiskError | null = null;
      for (const [from, to] of edges) {
        const block = Math.floor(from / BLOCK_BYTES);
        this.patch(block, 1, from, Buffer.alloc(to - from), (err) => {
          if (err && !failure) failure = err;
          if (--pending === 0) release(failure);
        });
      }
    });
  }

  /**
   * Common frame of every mutation: pass the write gate, lock the blocks, run `body`, then unlock,
   * leave the gate and honour FUA with a commit.
   */
  private mutate(
    offset: number,
    length: number,
    fua: boolean,
    done: Done,
    body: (firstBlock: number, blocks: number, release: Done) => void,
  ): void {
    const firstBlock = Math.floor(offset / BLOCK_BYTES);
    const endBlock = Math.ceil((offset + length) / BLOCK_BYTES);
    this.image.beginWrite(() => {
      this.image.locksFor(this.layer).acquire(firstBlock, endBlock, (lock) => {
        let finished = false;
        const release: Done = (err) => {
          assert(!finished, "mutation released twice");
          finished = true;
          // Complete before unlocking: overlapping requests then complete in the order they take
          // effect (a FUA write keeps its blocks locked until it is durable).
          const complete = (result: VdiskError | null): void => {
            done(result);
            this.image.locksFor(this.layer).release(lock);
            this.image.endWrite();
          };
          if (err || !fua) return complete(err);
          this.image.commit().then(
            () => complete(null),
            (commitErr: unknown) => complete(fromSystemError(commitErr, "commit")),
          );
        };
        try {
          body(firstBlock, endBlock - firstBlock, release);
        } catch (err) {
          release(fromSystemError(err, "write"));
        }
      });
    });
  }

  /** Read blocks [block, block+blocks), overlay `data` at byte `offset`, write the blocks back. */
  private patch(block: number, blocks: number, offset: number, data: Buffer, done: Done): void {
    const whole = Buffer.alloc(blocks * BLOCK_BYTES);
    const startByte = block * BLOCK_BYTES;
    // Only the first and last blocks need their old contents; the middle is overwritten entirely.
    const needs: Array<[number, number]> = [];
    if (offset > startByte) needs.push([0, BLOCK_BYTES]);
    const tail = (offset + data.length) % BLOCK_BYTES;
    if (tail !== 0 && (blocks > 1 || needs.length === 0))
      needs.push([(blocks - 1) * BLOCK_BYTES, blocks * BLOCK_BYTES]);
    let pending = needs.length + 1;
    let failure: VdiskError | null = null;
    const step = (err: VdiskError | null): void => {
      if (err && !failure) failure = err;
      if (--pending > 0) return;
      if (failure) return done(failure);
      data.copy(whole, offset - startByte);
      this.writeBlocks(block, whole, done);
    };
    for (const [from, to] of needs) {
      const readEnd = Math.min(to, this.layer.sizeBytes - startByte);
      if (readEnd <= from) {
        pending--;
        continue;
      }
      this.read(whole.subarray(from, readEnd), startByte + from, (err) => step(err));
    }
    process.nextTick(step, null);
  }

  /** Write whole blocks starting at `firstBlock`: in place where exclusive, else to new blocks. */
  private writeBlocks(firstBlock: number, data: Buffer, done: Done): void {
    assert(data.length % BLOCK_BYTES === 0 && data.length > 0, "whole blocks");
    const image = this.image;
    const layer = this.layer;
    const endBlock = firstBlock + data.length / BLOCK_BYTES;
    const epoch = image.ioBegin();
    let pending = 1;
    let failure: VdiskError | null = null;
    const finish = (err: VdiskError | null): void => {
      if (err && !failure) failure = err;
      if (--pending > 0) return;
      image.ioEnd(epoch);
      done(failure);
    };
    const slice = (block: number, count: number): Buffer =>
      data.subarray((block - firstBlock) * BLOCK_BYTES, (block - firstBlock + count) * BLOCK_BYTES);

    const fresh: Array<{ block: number; count: number }> = [];
    image.map(layer, firstBlock, endBlock, (run) => {
      if (
        run.type === UnitType.DATA &&
        run.pathExclusive &&
        image.dataRefs.maxCount(run.address, run.count) === 1
      ) {
        pending++;
        image.backing.write(slice(run.block, run.count), run.address * BLOCK_BYTES, false, finish);
      } else {
        const last = fresh[fresh.length - 1];
        if (last && last.block + last.count === run.block) last.count += run.count;
        else fresh.push({ block: run.block, count: run.count });
      }
    });
    if (fresh.length > 0) {
      // Allocate next to the left neighbour's data so sequential writes stay contiguous.
      const segments: Array<{ block: number; count: number; physical: number }> = [];
      for (const range of fresh) {
        let block = range.block;
        let remaining = range.count;
        let hint = this.neighbourHint(block);
        while (remaining > 0) {
          const [physical, count] = image.allocateData(remaining, hint);
          segments.push({ block, count, physical });
          block += count;
          remaining -= count;
          hint = physical + count;
        }
      }
      pending++;
      image.ensureFileCovers((err) => {
        if (err) {
          for (const segment of segments) image.unallocateData(segment.physical, segment.count);
          return finish(err);
        }
        for (const segment of segments) {
          pending++;
          image.backing.write(
            slice(segment.block, segment.count),
            segment.physical * BLOCK_BYTES,
            false,
            (writeErr) => {
              if (writeErr) image.unallocateData(segment.physical, segment.count);
              else
                image.apply(
                  layer,
                  segment.block,
                  segment.block + segment.count,
                  UnitType.DATA,
                  segment.physical,
                );
              finish(writeErr);
            },
          );
        }
        finish(null);
      });
    }
    finish(null);
  }

  private neighbourHint(block: number): number | undefined {
    if (block === 0) return undefined;
    let hint: number | undefined;
    this.image.map(this.layer, block - 1, block, (run) => {
      if (run.type === UnitType.DATA) hint = run.address + 1;
    });
    return hint;
  }

  // ---------------------------------------------------------------------------------------------
  // The rest of the verbs

  flush(done: Done): void {
    this.image.commit().then(
      () => done(null),
      (err: unknown) => done(fromSystemError(err, "commit")),
    );
  }

  cache(offset: number, length: number, done: Done): void {
    this.assertRange(offset, length);
    const backing = this.image.backing;
    let pending = 1;
    const finish = (): void => {
      if (--pending === 0) done(null);
    };
    const end = offset + length;
    this.image.map(this.layer, Math.floor(offset / BLOCK_BYTES), Math.ceil(end / BLOCK_BYTES), (run) => {
      if (run.type !== UnitType.DATA) return;
      pending++;
      backing.cache(run.address * BLOCK_BYTES, run.count * BLOCK_BYTES, () => finish());
    });
    process.nextTick(finish);
  }

  blockStatus(offset: number, length: number, done: ExtentsDone): void {
    this.assertRange(offset, length);
    const extents: Extent[] = [];
    const end = offset + length;
    this.image.map(this.layer, Math.floor(offset / BLOCK_BYTES), Math.ceil(end / BLOCK_BYTES), (run) => {
      if (extents.length >= volumeBlockStatusExtentsMax) return;
      const from = Math.max(offset, run.block * BLOCK_BYTES);
      const to = Math.min(end, (run.block + run.count) * BLOCK_BYTES);
      const flags =
        run.type === UnitType.EMPTY
          ? ExtentFlags.HOLE | ExtentFlags.ZERO
          : run.type === UnitType.ZERO
            ? ExtentFlags.ZERO
            : ExtentFlags.DATA;
      const last = extents[extents.length - 1];
      if (last && last.flags === flags) last.length += to - from;
      else extents.push({ length: to - from, flags });
    });
    process.nextTick(done, null, extents);
  }

  /** Blocks written since `snapshot` (an ancestor or any other layer), as extents: DATA = changed. */
  changedSince(snapshot: Layer, offset: number, length: number, done: ExtentsDone): void {
    this.assertRange(offset, length);
    const extents: Extent[] = [];
    const end = offset + length;
    const blocks = Math.min(this.layer.blocks, snapshot.blocks);
    const firstBlock = Math.floor(offset / BLOCK_BYTES);
    const endBlock = Math.ceil(end / BLOCK_BYTES);
    const push = (from: number, to: number, changed: boolean): void => {
      if (to <= from || extents.length >= volumeBlockStatusExtentsMax) return;
      const flags = changed ? 1 : 0;
      const last = extents[extents.length - 1];
      if (last && last.flags === flags) last.length += to - from;
      else extents.push({ length: to - from, flags });
    };
    if (firstBlock < Math.min(endBlock, blocks)) {
      this.image.changedRuns(
        this.layer,
        snapshot,
        firstBlock,
        Math.min(endBlock, blocks),
        (block, count, changed) =>
          push(Math.max(offset, block * BLOCK_BYTES), Math.min(end, (block + count) * BLOCK_BYTES), changed),
      );
    }
    // Beyond the snapshot's end everything is new.
    push(Math.max(offset, blocks * BLOCK_BYTES), end, true);
    process.nextTick(done, null, extents);
  }

  resize(size: number, done: Done): void {
    this.assertWritable();
    const oldSize = this.layer.sizeBytes;
    const grow = (): void => {
      this.image.resizeHead(this.layer.name, size).then(
        () => done(null),
        (err: unknown) => done(fromSystemError(err, "resize")),
      );
    };
    // A partial last block may hold bytes past the old end: zero them before they become visible.
    const tailEnd = Math.min(size, Math.ceil(oldSize / BLOCK_BYTES) * BLOCK_BYTES);
    if (size > oldSize && oldSize % BLOCK_BYTES !== 0 && tailEnd > oldSize) {
      const block = Math.floor(oldSize / BLOCK_BYTES);
      this.mutate(
        oldSize,
        tailEnd - oldSize,
        false,
        (err) => (err ? done(err) : grow()),
        (_first, _blocks, release) => this.patch(block, 1, oldSize, Buffer.alloc(tailEnd - oldSize), release),
      );
      return;
    }
    grow();
  }

  usage(done: (err: VdiskError | null, usage?: DeviceUsage) => void): void {
    const stats = this.image.layerStats(this.layer);
    process.nextTick(done, null, { allocatedBytes: stats.mappedBytes });
  }

  close(done: Done): void {
    if (this.closed) return process.nextTick(done, null);
    this.closed = true;
    if (this.capabilities.readOnly) return process.nextTick(done, null);
    this.flush(done);
  }

  private assertRange(offset: number, length: number): void {
    assert(!this.closed, "volume used after close");
    assert(offset >= 0 && length > 0 && offset + length <= this.layer.sizeBytes, "request inside the volume");
  }

  private assertWritable(): void {
    if (this.capabilities.readOnly) throw new VdiskError("READ_ONLY", "snapshot volumes are read-only");
  }
}
