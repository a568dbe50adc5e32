/**
 * ModelDisk: the plain reference model of a disk for property and crash tests — the bytes a correct disk
 * holds, and which states it may be in after a power cut.
 *
 * State:
 * - `current`: every byte as reads should see it now;
 * - `flushed`: every byte as of the last flush (what is certainly durable);
 * - `unflushed`: for each sector (`sectorBytes`, 512 by default) written since it was last made durable,
 *   the sector's whole content just after each such write, oldest first, tagged with the write's number.
 *
 * The crash rule (checkAfterCrash), at sector granularity: after power loss, each sector holds either its
 * flushed content or its content just after one of the writes to it since — any of them, independently
 * of every other sector. So writes may be lost, reordered against each other, or torn at sector
 * boundaries; a sector is never torn inside, and never holds a mix that no single write produced. This is
 * what CrashDevice produces (it persists whole sectors as they stood after each write).
 *
 * The model is sequential: apply each operation when it takes effect on the device (for CrashDevice:
 * when its callback runs, also when it fails with "device crashed"). A device flush covers what completed
 * before it was called: take `mark()` when submitting the flush and `flushTo(mark)` when it completes;
 * in a sequential workload `flush()` does both. A FUA write makes its own sectors durable.
 * Resize changes both images at once; bytes past the old end read as zeros.
 */
import { assert } from "../errors";

interface SectorValue {
  /** Number of the write that produced it (1-based, see `operations`). */
  operation: number;
  /** The whole sector, `sectorBytes` long; bytes past the disk's end are zero. */
  data: Buffer;
}

export interface ModelDiskOptions {
  sectorBytes?: number;
  /** Initial content, both current and flushed (copied); its length is the size. */
  image?: Buffer;
}

/** Bytes shown in a mismatch message. */
const excerptBytes = 16;

export class ModelDisk {
  readonly sectorBytes: number;
  private current: Buffer;
  private flushed: Buffer;
  private readonly unflushed = new Map<number, SectorValue[]>();
  private operationCount = 0;

  constructor(size: number, options: ModelDiskOptions = {}) {
    assert(Number.isSafeInteger(size) && size >= 0, "model size is a non-negative integer");
    const sectorBytes = options.sectorBytes ?? 512;
    assert(Number.isSafeInteger(sectorBytes) && sectorBytes >= 1, "sectorBytes is a positive integer");
    this.sectorBytes = sectorBytes;
    if (options.image !== undefined) {
      assert(options.image.length === size, "image length equals size");
      this.current = Buffer.from(options.image);
    } else {
      this.current = Buffer.alloc(size);
    }
    this.flushed = Buffer.from(this.current);
  }

  get size(): number {
    return this.current.length;
  }

  /** Writes (write/zero/trim) applied so far: a mark for `flushTo`. */
  get operations(): number {
    return this.operationCount;
  }

  /** Sectors that may hold something other than their flushed content after a crash, ascending. */
  get unflushedSectors(): number[] {
    return [...this.unflushed.keys()].sort((a, b) => a - b);
  }

  read(offset: number, length: number): Buffer {
    this.assertRange(offset, length);
    return Buffer.from(this.current.subarray(offset, offset + length));
  }

  write(data: Buffer, offset: number, fua = false): void {
    this.assertRange(offset, data.length);
    data.copy(this.current, offset);
    this.record(offset, data.length, fua);
  }

  zero(offset: number, length: number, fua = false): void {
    this.assertRange(offset, length);
    this.current.fill(0, offset, offset + length);
    this.record(offset, length, fua);
  }

  /** Trim is modelled as zero: vdisk's devices always make trimmed ranges read as zeros. */
  trim(offset: number, length: number, fua = false): void {
    this.zero(offset, length, fua);
  }

  resize(size: number): void {
    assert(Number.isSafeInteger(size) && size >= 0, "model size is a non-negative integer");
    const resized = (source: Buffer): Buffer => {
      const target = Buffer.alloc(size);
      source.copy(target, 0, 0, Math.min(size, source.length));
      return target;
    };
    this.current = resized(this.current);
    this.flushed = resized(this.flushed);
    const lastSector = Math.ceil(size / this.sectorBytes); // first sector wholly past the end
    const inLast = size % this.sectorBytes;
    for (const [sector, values] of this.unflushed) {
      if (sector >= lastSector) this.unflushed.delete(sector);
      else if (sector === lastSector - 1 && inLast !== 0) {
        for (const value of values) value.data.fill(0, inLast);
      }
    }
  }

  /** Everything applied so far is durable. */
  flush(): void {
    this.flushTo(this.operationCount);
  }

  /** A point to flush to later: the writes applied before it. */
  mark(): number {
    return this.operationCount;
  }

  /** The writes numbered up to `mark` (those applied before `mark()` returned it) are durable. */
  flushTo(mark: number): void {
    assert(Number.isSafeInteger(mark) && mark >= 0 && mark <= this.operationCount, "mark was issued");
    for (const [sector, values] of this.unflushed) {
      let durable = -1;
      while (durable + 1 < values.length && values[durable + 1].operation <= mark) durable++;
      if (durable < 0) continue;
      this.setFlushedSector(sector, values[durable].data);
      if (durable === values.length - 1) this.unflushed.delete(sector);
      else this.unflushed.set(sector, values.slice(durable + 1));
    }
  }

  /** A copy of the current bytes. */
  image(): Buffer {
    return Buffer.from(this.current);
  }

  /** A copy of the bytes as of the last flush (plus FUA writes). */
  flushedImage(): Buffer {
    return Buffer.from(this.flushed);
  }

  /** Every content sector `sector` may hold after a crash: the flushed one first, then newer ones. */
  possibleSectorValues(sector: number): Buffer[] {
    const [start, end] = this.sectorRange(sector);
    const options = [Buffer.from(this.flushed.subarray(start, end))];
    for (const value of this.unflushed.get(sector) ?? [])
      options.push(Buffer.from(value.data.subarray(0, end - start)));
    return options;
  }

  /**
   * null if `actual` is a state the disk may be in after a crash now (see the module comment), else a
   * message naming the first bad sector and byte, what it held, and every legal option.
   */
  checkAfterCrash(actual: Buffer): string | null {
    if (actual.length !== this.size) return `size: got ${actual.length} bytes, expected ${this.size}`;
    let position = 0;
    for (const sector of [...this.unflushedSectors, Math.ceil(this.size / this.sectorBytes)]) {
      // Sectors before `sector` were not written since the flush: they must hold their flushed bytes.
      const [gapEnd] = this.sectorRange(sector);
      if (position < gapEnd) {
        const gapActual = actual.subarray(position, gapEnd);
        const gapFlushed = this.flushed.subarray(position, gapEnd);
        if (!gapActual.equals(gapFlushed)) {
          const at = position + firstDifference(gapActual, gapFlushed);
          const bad = Math.floor(at / this.sectorBytes);
          return (
            `byte ${at} (sector ${bad}, not written since the last flush): got 0x${hexByte(actual[at])}, ` +
            `expected 0x${hexByte(this.flushed[at])}; got ${excerpt(actual, at)}, flushed ${excerpt(this.flushed, at)}`
          );
        }
      }
      if (sector * this.sectorBytes >= this.size) break;
      const [start, end] = this.sectorRange(sector);
      const got = actual.subarray(start, end);
      const options = this.possibleSectorValues(sector);
      if (!options.some((option) => option.equals(got))) {
        const values = this.unflushed.get(sector) ?? [];
        const described = options.map((option, index) => {
          const at = start + firstDifference(got, option);
          const name = index === 0 ? "flushed" : `write #${values[index - 1].operation}`;
          return `${name} (first differs at byte ${at}: expected 0x${hexByte(option[at - start])}, ${excerpt(option, at - start)})`;
        });
        return (
          `sector ${sector} (bytes ${start}..${end - 1}) holds none of its ${options.length} legal values: ` +
          `got ${excerpt(got, 0)}; options: ${described.join("; ")}`
        );
      }
      position = end;
    }
    return null;
  }

  /** Adopt a post-crash state (checked by the caller) as both current and flushed: the disk restarted. */
  recover(actual: Buffer): void {
    assert(actual.length === this.size, "recovered image has the model's size");
    this.current = Buffer.from(actual);
    this.flushed = Buffer.from(actual);
    this.unflushed.clear();
  }

  // ---- Internals ----

  /** Note a write of [offset, offset + length) just applied to `current`. */
  private record(offset: number, length: number, fua: boolean): void {
    const operation = ++this.operationCount;
    const first = Math.floor(offset / this.sectorBytes);
    const last = Math.floor((offset + length - 1) / this.sectorBytes);
    for (let sector = first; sector <= last; sector++) {
      const [start, end] = this.sectorRange(sector);
      if (fua) {
        this.current.copy(this.flushed, start, start, end);
        this.unflushed.delete(sector);
        continue;
      }
      const data = Buffer.alloc(this.sectorBytes);
      this.current.copy(data, 0, start, end);
      const values = this.unflushed.get(sector);
      if (values === undefined) this.unflushed.set(sector, [{ operation, data }]);
      else values.push({ operation, data });
    }
  }

  private setFlushedSector(sector: number, data: Buffer): void {
    const [start, end] = this.sectorRange(sector);
    data.copy(this.flushed, start, 0, end - start);
  }

  /** Byte range of `sector`, clipped at the end of the disk. */
  private sectorRange(sector: number): [number, number] {
    const start = Math.min(sector * this.sectorBytes, this.size);
    return [start, Math.min(start + this.sectorBytes, this.size)];
  }

  private assertRange(offset: number, length: number): void {
    assert(Number.isSafeInteger(offset) && offset >= 0, "offset is a non-negative integer");
    assert(Number.isSafeInteger(length) && length > 0, "length is a positive integer");
    assert(offset + length <= this.size, "request within the model disk");
  }
}

/** Index of the first byte where `a` and `b` differ (they are known to differ or differ in length). */
function firstDifference(a: Buffer, b: Buffer): number {
  const length = Math.min(a.length, b.length);
  for (let index = 0; index < length; index++) if (a[index] !== b[index]) return index;
  return length;
}

function hexByte(value: number | undefined): string {
  return value === undefined ? "--" : value.toString(16).padStart(2, "0");
}

function excerpt(buf: Buffer, at: number): string {
  const from = Math.max(0, at);
  return `[${buf.subarray(from, from + excerptBytes).toString("hex")}${from + excerptBytes < buf.length ? "…" : ""}]`;
}
