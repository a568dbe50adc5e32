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
 * Index residency: the tree is walked synchronously, so each verb first makes sure the index leaves it
 * needs are in memory (`image.isResident`, a walk that allocates nothing, true in the common case) and
 * otherwise waits for `image.ensureResident` to read them back. A write asks twice: before it maps its
 * blocks, and again before it switches the mapping once the data is written (the leaves may have been
 * evicted while the data was in flight). Verbs over long ranges (block status, cache, changed blocks)
 * go window by window, so what one request holds pinned stays bounded.
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
import { BLOCK_BYTES, FANOUT, UnitType, type UnitTypeValue, deviceOfBlock } from "./format";
import { type Image, type Layer, Need, type NeedValue, type Run, placementStrict } from "./image";

/**
 * Writes at least this large that would land partly in place and partly in new blocks go wholly to new
 * contiguous blocks instead (see writeMapped): one device write and one extent instead of a patchwork.
 */
export const relocateWriteBytesMin = 64 * 1024;
/** Extents returned by one blockStatus call. */
export const volumeBlockStatusExtentsMax = 1024;
/** Blocks a long-range verb maps at a time: at most 64 leaves (and their pins) per window (128 MiB). */
export const residentWindowBlocks = 64 * FANOUT;

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
    const first = Math.floor(offset / BLOCK_BYTES);
    const end = Math.ceil((offset + buf.length) / BLOCK_BYTES);
    if (this.image.isResident(this.layer, first, end, Need.LOOKUP)) return this.readMapped(buf, offset, done);
    this.image.ensureResident(this.layer, first, end, Need.LOOKUP, (err) => {
      if (err) return done(err, null);
      this.readMapped(buf, offset, done);
    });
  }

  /** The read, once the leaves it maps through are resident. */
  private readMapped(buf: Buffer, offset: number, done: ReadDone): void {
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
    if (!this.image.backing.readNoWait) return false;
    const end = offset + buf.length;
    const firstBlock = Math.floor(offset / BLOCK_BYTES);
    const endBlock = Math.ceil(end / BLOCK_BYTES);
    // Declines when a leaf is evicted: the read that follows loads it (misses are counted there).
    if (!this.image.isResident(this.layer, firstBlock, endBlock, Need.LOOKUP)) return false;
    // Every run is answered from the page cache or the read declines as a whole (the caller then reads
    // the whole range again); zero and unmapped runs are zeros. A fragmented range (data written after a
    // snapshot lands in fresh blocks) thus stays on the fast path instead of one thread-pool hop per run.
    this.noWaitBuf = buf;
    this.noWaitOffset = offset;
    this.noWaitFilled = true;
    this.image.map(this.layer, firstBlock, endBlock, this.noWaitVisit);
    this.noWaitBuf = null;
    return this.noWaitFilled;
  }

  /** readNoWait's state, kept on the volume so the hot path allocates no closure per request. */
  private noWaitBuf: Buffer | null = null;
  private noWaitOffset = 0;
  private noWaitFilled = true;
  private readonly noWaitVisit = (run: Run): void => {
    if (!this.noWaitFilled) return;
    const buf = this.noWaitBuf as Buffer;
    const offset = this.noWaitOffset;
    const runStart = Math.max(offset, run.block * BLOCK_BYTES);
    const runEnd = Math.min(offset + buf.length, (run.block + run.count) * BLOCK_BYTES);
    const whole = runStart === offset && runEnd === offset + buf.length;
    const target = whole ? buf : buf.subarray(runStart - offset, runEnd - offset);
    if (run.type !== UnitType.DATA) {
      target.fill(0);
      return;
    }
    const physical = run.address * BLOCK_BYTES + (runStart - run.block * BLOCK_BYTES);
    const backing = this.image.backing as Required<Pick<BlockDevice, "readNoWait">>;
    if (!backing.readNoWait(target, physical)) this.noWaitFilled = false;
  };

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
      if (wholeStart >= wholeEnd) return this.patchEdges(offset, length, release);
      // Only leaves the range covers in part are read back: whole ones are replaced (and, if evicted
      // and no longer referenced, released in the background).
      this.whenResident(wholeStart, wholeEnd, Need.UPDATE, release, () => {
        this.image.apply(this.layer, wholeStart, wholeEnd, type, 0);
        this.patchEdges(offset, length, release);
      });
    });
  }

  /** The partial blocks at the edges of a zero or trim: read-modify-write with zeros. */
  private patchEdges(offset: number, length: number, release: Done): void {
    const end = offset + length;
    const wholeStart = Math.ceil(offset / BLOCK_BYTES);
    const wholeEnd = Math.floor(end / BLOCK_BYTES);
    const edges: Array<[number, number]> = [];
    if (offset % BLOCK_BYTES !== 0 || wholeStart >= wholeEnd) {
      const block = Math.floor(offset / BLOCK_BYTES);
      edges.push([Math.max(offset, block * BLOCK_BYTES), Math.min(end, (block + 1) * BLOCK_BYTES)]);
    }
    if (end % BLOCK_BYTES !== 0 && Math.floor((end - 1) / BLOCK_BYTES) !== Math.floor(offset / BLOCK_BYTES)) {
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
  }

  /**
   * Run `body` once the leaves `need` requires over blocks [start, end) are resident (at once when
   * they are); a load error, or an exception from `body`, goes to `fail` — as mutate's body errors do.
   */
  private whenResident(start: number, end: number, need: NeedValue, fail: Done, body: () => void): void {
    this.image.ensureResident(this.layer, start, end, need, (err) => {
      if (err) return fail(err);
      try {
        body();
      } catch (thrown) {
        fail(fromSystemError(thrown, "index update"));
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
    // The left neighbour's mapping is the allocation hint: its leaf is needed too.
    const lookupStart = Math.max(0, firstBlock - 1);
    const endBlock = firstBlock + data.length / BLOCK_BYTES;
    if (this.image.isResident(this.layer, lookupStart, endBlock, Need.LOOKUP))
      return this.writeMapped(firstBlock, data, done);
    this.whenResident(lookupStart, endBlock, Need.LOOKUP, done, () =>
      this.writeMapped(firstBlock, data, done),
    );
  }

  /** The write, once the leaves it maps through are resident. */
  private writeMapped(firstBlock: number, data: Buffer, done: Done): void {
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

    // Where the pool wants this write's new data (-1: next to the left neighbour), and whether data of
    // the range on another device moves there rather than being overwritten in place.
    let device = -1;
    let strict = false;
    if (image.placement !== null) {
      const choice = image.placement.writeDevice(layer.disk, firstBlock, endBlock - firstBlock);
      if (choice >= 0) {
        strict = choice >= placementStrict;
        device = choice % placementStrict;
      }
    }
    const writeInPlace = (block: number, count: number, address: number): void => {
      pending++;
      image.backing.write(slice(block, count), address * BLOCK_BYTES, false, finish);
    };
    const fresh: Array<{ block: number; count: number }> = [];
    // Only a write large enough to be relocated whole holds its in-place runs back until the map is
    // known; a smaller one writes them as they are found.
    const inPlace: Array<{ block: number; count: number; address: number }> | null =
      data.length >= relocateWriteBytesMin ? [] : null;
    image.map(layer, firstBlock, endBlock, (run) => {
      if (
        run.type === UnitType.DATA &&
        run.pathExclusive &&
        image.writableInPlace(run.address, run.count) &&
        (!strict || deviceOfBlock(run.address) === device)
      ) {
        if (inPlace === null) writeInPlace(run.block, run.count, run.address);
        else inPlace.push({ block: run.block, count: run.count, address: run.address });
      } else {
        const last = fresh[fresh.length - 1];
        if (last && last.block + last.count === run.block) last.count += run.count;
        else fresh.push({ block: run.block, count: run.count });
      }
    });
    if (inPlace !== null && inPlace.length > 0 && fresh.length > 0) {
      // A large write over a patchwork of exclusive and shared blocks (a head rewritten after a
      // snapshot): write it whole to new contiguous space rather than as one small write per run. The
      // exclusive blocks it replaces are freed by the mapping switch; the range stays one extent.
      fresh.length = 0;
      fresh.push({ block: firstBlock, count: endBlock - firstBlock });
    } else if (inPlace !== null) {
      for (const run of inPlace) writeInPlace(run.block, run.count, run.address);
    }
    if (fresh.length > 0) {
      // Allocate next to the left neighbour's data so sequential writes stay contiguous.
      const segments: Array<{ block: number; count: number; physical: number }> = [];
      for (const range of fresh) {
        let block = range.block;
        let remaining = range.count;
        let hint = this.neighbourHint(block);
        while (remaining > 0) {
          const [physical, count] = image.allocateData(remaining, hint, device);
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
              if (writeErr) {
                image.unallocateData(segment.physical, segment.count);
                return finish(writeErr);
              }
              // The leaves may have been evicted while the data was written: ask again.
              const segmentEnd = segment.block + segment.count;
              image.ensureResident(layer, segment.block, segmentEnd, Need.UPDATE, (loadErr) => {
                if (loadErr) {
                  image.unallocateData(segment.physical, segment.count);
                  return finish(loadErr);
                }
                image.apply(layer, segment.block, segmentEnd, UnitType.DATA, segment.physical);
                finish(null);
              });
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
    this.windows(
      Math.floor(offset / BLOCK_BYTES),
      Math.ceil(end / BLOCK_BYTES),
      null,
      (from, to) => {
        this.image.map(this.layer, from, to, (run) => {
          if (run.type !== UnitType.DATA) return;
          pending++;
          backing.cache(run.address * BLOCK_BYTES, run.count * BLOCK_BYTES, () => finish());
        });
        return true;
      },
      // A hint: an index that cannot be read is reported by the reads that need it.
      () => process.nextTick(finish),
    );
  }

  blockStatus(offset: number, length: number, done: ExtentsDone): void {
    this.assertRange(offset, length);
    const extents: Extent[] = [];
    const end = offset + length;
    const visit = (run: Run): void => {
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
    };
    this.windows(
      Math.floor(offset / BLOCK_BYTES),
      Math.ceil(end / BLOCK_BYTES),
      null,
      (from, to) => {
        this.image.map(this.layer, from, to, visit);
        return extents.length < volumeBlockStatusExtentsMax;
      },
      (err) => (err ? process.nextTick(done, err) : process.nextTick(done, null, extents)),
    );
  }

  /**
   * Visit blocks [start, end) window by window (`residentWindowBlocks`), each once its leaves are
   * resident — this layer's, or (with `other`) those `changedRuns` against `other` reads. `visit` runs
   * synchronously per window and returns false to stop early; `done` runs after the last window (at
   * once when nothing had to be loaded) or with the first load error.
   */
  private windows(
    start: number,
    end: number,
    other: Layer | null,
    visit: (from: number, to: number) => boolean,
    done: (err: VdiskError | null) => void,
  ): void {
    const image = this.image;
    let block = start;
    while (block < end) {
      const from = block;
      const to = Math.min(end, from + residentWindowBlocks);
      const resident =
        other === null
          ? image.isResident(this.layer, from, to, Need.LOOKUP)
          : image.isDiffResident(this.layer, other, from, to);
      if (!resident) {
        const proceed = (err: VdiskError | null): void => {
          if (err) return done(err);
          if (!visit(from, to)) return done(null);
          this.windows(to, end, other, visit, done);
        };
        if (other === null) image.ensureResident(this.layer, from, to, Need.LOOKUP, proceed);
        else image.ensureDiffResident(this.layer, other, from, to, proceed);
        return;
      }
      if (!visit(from, to)) return done(null);
      block = to;
    }
    done(null);
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
    const finish = (err: VdiskError | null): void => {
      if (err) return process.nextTick(done, err);
      // Beyond the snapshot's end everything is new.
      push(Math.max(offset, blocks * BLOCK_BYTES), end, true);
      process.nextTick(done, null, extents);
    };
    if (firstBlock >= Math.min(endBlock, blocks)) return finish(null);
    this.windows(
      firstBlock,
      Math.min(endBlock, blocks),
      snapshot,
      (from, to) => {
        this.image.changedRuns(this.layer, snapshot, from, to, (block, count, changed) =>
          push(Math.max(offset, block * BLOCK_BYTES), Math.min(end, (block + count) * BLOCK_BYTES), changed),
        );
        return extents.length < volumeBlockStatusExtentsMax;
      },
      finish,
    );
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
    this.image.layerStatsAsync(this.layer).then(
      (stats) => done(null, { allocatedBytes: stats.mappedBytes }),
      (err: unknown) => done(fromSystemError(err, "usage")),
    );
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
