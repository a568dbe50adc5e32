/**
 * Block-I/O trace files: streaming parsers for three text formats, format detection, and a cheap summary.
 *
 *   spc      SPC / UMass:        ASU,LBA,size_bytes,opcode,timestamp_s     LBA in 512-byte sectors; opcode
 *                                r|w (any case); timestamp in seconds (a decimal); fields past the fifth
 *                                are ignored (the SPC spec allows optional ones)
 *   disksim  DiskSim/MQSim ASCII: arrival_ns device lba_sector size_sectors type   whitespace separated,
 *                                type 1 = read, 0 = write; exactly five fields; times are whole
 *                                nanoseconds (MQSim's convention)
 *   msr      MSR Cambridge CSV:  FILETIME,host,disk,Read|Write,offset_bytes,size_bytes,response_time
 *                                FILETIME in 100 ns units; exactly seven fields; a first line starting
 *                                with "Timestamp," (a header some copies carry) is skipped
 *
 * Every format: blank lines and lines starting with '#' are skipped, a trailing CR is ignored, the last
 * line needs no newline. A record is {timeNs, device, offsetBytes, lengthBytes, op}, `timeNs` relative to
 * the trace's first record (records are kept in file order; a later record with an earlier time gets a
 * negative `timeNs`). Integer timestamps are parsed in two halves so that FILETIME values (~1.3e17, beyond
 * 2^53) give exact differences. Anything else on a line is an error naming the file, the line number and
 * what was wrong — never silently skipped.
 *
 * Streaming: `TraceReader` reads the file in `traceChunkBytes` pieces and fills a caller-owned
 * `RecordBatch` (struct of typed arrays, `traceBatchRecords` records) per call, so a multi-GB trace costs
 * one chunk plus two batches of memory and no object per record. `traceRecords` (an async generator of
 * plain objects) and `traceSummary` are built on it.
 *
 * Detection (`--format auto`): the first data line decides — seven comma fields with Read/Write fourth is
 * msr, five or more comma fields with r/w fourth is spc, five whitespace-separated integers is disksim.
 */
import * as fs from "node:fs";
import { VdiskError, assert } from "../errors";
import { traceBatchRecords, traceChunkBytes, traceDevicesMax, traceLineBytesMax } from "../limits";

export const traceFormats = ["spc", "disksim", "msr"] as const;
export type TraceFormat = (typeof traceFormats)[number];

// Limits (src/limits.ts): chunk size, batch size, line length, devices tracked.
export { traceBatchRecords, traceChunkBytes, traceDevicesMax, traceLineBytesMax };
/** Data lines examined by format detection. */
const detectLinesMax = 1;

assert(traceLineBytesMax <= traceChunkBytes, "a whole line fits in one chunk");

const SECTOR_BYTES = 512;

export interface TraceRecord {
  /** Nanoseconds since the trace's first record. */
  timeNs: number;
  /** ASU (spc), device (disksim) or disk number (msr). */
  device: number;
  offsetBytes: number;
  lengthBytes: number;
  op: "read" | "write";
}

/** A batch of records as parallel typed arrays; `length` are valid. */
export class RecordBatch {
  readonly timeNs: Float64Array;
  readonly device: Float64Array;
  readonly offsetBytes: Float64Array;
  readonly lengthBytes: Float64Array;
  /** 1 = write, 0 = read. */
  readonly write: Uint8Array;
  length = 0;

  constructor(readonly capacity = traceBatchRecords) {
    assert(capacity >= 1, "a batch holds at least one record");
    this.timeNs = new Float64Array(capacity);
    this.device = new Float64Array(capacity);
    this.offsetBytes = new Float64Array(capacity);
    this.lengthBytes = new Float64Array(capacity);
    this.write = new Uint8Array(capacity);
  }

  record(index: number): TraceRecord {
    assert(index >= 0 && index < this.length, "record index within the batch");
    return {
      timeNs: this.timeNs[index] as number,
      device: this.device[index] as number,
      offsetBytes: this.offsetBytes[index] as number,
      lengthBytes: this.lengthBytes[index] as number,
      op: this.write[index] === 1 ? "write" : "read",
    };
  }
}

export interface TraceOptions {
  /** The format, or "auto" / undefined to detect it. */
  format?: TraceFormat | "auto";
  /** Stop after this many records (null / undefined: all). */
  limit?: number | null;
}

// ---- Field parsing -------------------------------------------------------------------------------------

/** A plain decimal integer (digits only) as a number; -1 if not one or beyond 2^53. */
export function parseUnsigned(text: string): number {
  const length = text.length;
  if (length === 0 || length > 16) return -1;
  let value = 0;
  for (let index = 0; index < length; index++) {
    const digit = text.charCodeAt(index) - 48;
    if (digit < 0 || digit > 9) return -1;
    value = value * 10 + digit;
  }
  return value <= Number.MAX_SAFE_INTEGER ? value : -1;
}

const DECIMAL = /^(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$/;
const DIGITS = /^\d+$/;

/**
 * A non-negative integer timestamp of up to 24 digits, as two exact halves: value = high × 1e9 + low.
 * False when the text is not digits only or is longer.
 */
function splitTimestamp(text: string, into: { high: number; low: number }): boolean {
  if (text.length === 0 || text.length > 24 || !DIGITS.test(text)) return false;
  const cut = Math.max(0, text.length - 9);
  into.high = cut === 0 ? 0 : Number(text.slice(0, cut));
  into.low = Number(text.slice(cut));
  return true;
}

/** Shared state of one file's parse: the first record's time, the line being parsed. */
interface ParseState {
  file: string;
  line: number;
  text: string;
  /** First record's time: in ns (spc) or as integer halves (disksim, msr); null before it. */
  baseNs: number | null;
  baseHigh: number;
  baseLow: number;
  half: { high: number; low: number };
  /** msr: a header line may come first. */
  firstDataLine: boolean;
}

function lineError(state: ParseState, what: string): VdiskError {
  const shown = state.text.length > 120 ? `${state.text.slice(0, 120)}...` : state.text;
  return new VdiskError("INVALID_ARGUMENT", `${state.file}, line ${state.line}: ${what} (line: "${shown}")`, {
    hint: "fix or delete that line; if the format was guessed wrong, name it with --format spc|disksim|msr",
  });
}

/** Relative time from integer halves, in units of `unitNs`. */
function relativeFromHalves(state: ParseState, unitNs: number): number {
  const half = state.half;
  if (state.baseNs === null) {
    state.baseNs = 0;
    state.baseHigh = half.high;
    state.baseLow = half.low;
  }
  return ((half.high - state.baseHigh) * 1e9 + (half.low - state.baseLow)) * unitNs;
}

function checkRange(state: ParseState, offsetBytes: number, lengthBytes: number): void {
  if (!Number.isSafeInteger(offsetBytes) || !Number.isSafeInteger(offsetBytes + lengthBytes)) {
    throw lineError(state, "the offset is beyond 2^53 bytes");
  }
  if (lengthBytes > 0xffff_ffff) throw lineError(state, "the size is beyond 4 GiB");
}

type LineParser = (state: ParseState, batch: RecordBatch, index: number) => boolean;

/** spc: ASU,LBA,size_bytes,opcode,timestamp_s[,...]. Returns false for a line that is not a record. */
const parseSpcLine: LineParser = (state, batch, index) => {
  const fields = state.text.split(",");
  if (fields.length < 5) throw lineError(state, `expected 5 comma-separated fields, found ${fields.length}`);
  const asu = parseUnsigned((fields[0] as string).trim());
  if (asu < 0) throw lineError(state, "the ASU (field 1) is not a whole number");
  const lba = parseUnsigned((fields[1] as string).trim());
  if (lba < 0) throw lineError(state, "the LBA (field 2) is not a whole number");
  const size = parseUnsigned((fields[2] as string).trim());
  if (size < 0) throw lineError(state, "the size (field 3) is not a whole number of bytes");
  const opcode = (fields[3] as string).trim();
  let write: number;
  if (opcode === "r" || opcode === "R") write = 0;
  else if (opcode === "w" || opcode === "W") write = 1;
  else throw lineError(state, `the opcode (field 4) is "${opcode}", not r or w`);
  const stamp = (fields[4] as string).trim();
  const seconds = DECIMAL.test(stamp) ? Number(stamp) : NaN;
  if (!Number.isFinite(seconds)) throw lineError(state, "the timestamp (field 5) is not a number of seconds");
  const ns = Math.round(seconds * 1e9);
  if (state.baseNs === null) state.baseNs = ns;
  const offsetBytes = lba * SECTOR_BYTES;
  checkRange(state, offsetBytes, size);
  batch.timeNs[index] = ns - state.baseNs;
  batch.device[index] = asu;
  batch.offsetBytes[index] = offsetBytes;
  batch.lengthBytes[index] = size;
  batch.write[index] = write;
  return true;
};

const WHITESPACE = /\s+/;

/** disksim: arrival_ns device lba_sector size_sectors type. */
const parseDisksimLine: LineParser = (state, batch, index) => {
  const fields = state.text.trim().split(WHITESPACE);
  if (fields.length !== 5) {
    throw lineError(state, `expected 5 whitespace-separated fields, found ${fields.length}`);
  }
  if (!splitTimestamp(fields[0] as string, state.half)) {
    throw lineError(state, "the arrival time (field 1) is not a whole number of nanoseconds");
  }
  const device = parseUnsigned(fields[1] as string);
  if (device < 0) throw lineError(state, "the device (field 2) is not a whole number");
  const lba = parseUnsigned(fields[2] as string);
  if (lba < 0) throw lineError(state, "the LBA (field 3) is not a whole number of sectors");
  const sectors = parseUnsigned(fields[3] as string);
  if (sectors < 0) throw lineError(state, "the size (field 4) is not a whole number of sectors");
  const type = fields[4] as string;
  if (type !== "0" && type !== "1")
    throw lineError(state, `the type (field 5) is "${type}", not 1 (read) or 0 (write)`);
  const offsetBytes = lba * SECTOR_BYTES;
  const lengthBytes = sectors * SECTOR_BYTES;
  checkRange(state, offsetBytes, lengthBytes);
  batch.timeNs[index] = relativeFromHalves(state, 1);
  batch.device[index] = device;
  batch.offsetBytes[index] = offsetBytes;
  batch.lengthBytes[index] = lengthBytes;
  batch.write[index] = type === "0" ? 1 : 0;
  return true;
};

/** msr: FILETIME,host,disk,Read|Write,offset_bytes,size_bytes,response_time. */
const parseMsrLine: LineParser = (state, batch, index) => {
  const first = state.firstDataLine;
  state.firstDataLine = false;
  if (first && /^timestamp,/i.test(state.text)) return false; // a header line
  const fields = state.text.split(",");
  if (fields.length !== 7)
    throw lineError(state, `expected 7 comma-separated fields, found ${fields.length}`);
  if (!splitTimestamp((fields[0] as string).trim(), state.half)) {
    throw lineError(state, "the timestamp (field 1) is not a whole number of 100 ns units");
  }
  const disk = parseUnsigned((fields[2] as string).trim());
  if (disk < 0) throw lineError(state, "the disk number (field 3) is not a whole number");
  const type = (fields[3] as string).trim();
  let write: number;
  if (type === "Read" || type === "read" || type === "READ") write = 0;
  else if (type === "Write" || type === "write" || type === "WRITE") write = 1;
  else throw lineError(state, `the type (field 4) is "${type}", not Read or Write`);
  const offsetBytes = parseUnsigned((fields[4] as string).trim());
  if (offsetBytes < 0) throw lineError(state, "the offset (field 5) is not a whole number of bytes");
  const lengthBytes = parseUnsigned((fields[5] as string).trim());
  if (lengthBytes < 0) throw lineError(state, "the size (field 6) is not a whole number of bytes");
  checkRange(state, offsetBytes, lengthBytes);
  batch.timeNs[index] = relativeFromHalves(state, 100);
  batch.device[index] = disk;
  batch.offsetBytes[index] = offsetBytes;
  batch.lengthBytes[index] = lengthBytes;
  batch.write[index] = write;
  return true;
};

const lineParsers: Record<TraceFormat, LineParser> = {
  spc: parseSpcLine,
  disksim: parseDisksimLine,
  msr: parseMsrLine,
};

/** True for lines that carry no record: blank, or a comment. */
function isSkipped(line: string): boolean {
  for (let index = 0; index < line.length; index++) {
    const code = line.charCodeAt(index);
    if (code === 32 || code === 9 || code === 13) continue;
    return code === 35; // '#'
  }
  return true;
}

/** The format of a trace from its first data line(s), or null when none fits. */
export function detectFormat(lines: readonly string[]): TraceFormat | null {
  const data = lines.filter((line) => !isSkipped(line)).slice(0, detectLinesMax);
  if (data.length === 0) return null;
  let found: TraceFormat | null = null;
  for (const raw of data) {
    const line = raw.trim();
    let format: TraceFormat | null = null;
    if (line.includes(",")) {
      const fields = line.split(",").map((field) => field.trim());
      const fourth = fields[3] ?? "";
      if (fields.length === 7 && /^(read|write)$/i.test(fourth)) format = "msr";
      else if (fields.length === 7 && /^timestamp$/i.test(fields[0] ?? "")) format = "msr";
      else if (fields.length >= 5 && /^[rw]$/i.test(fourth)) format = "spc";
    } else {
      const fields = line.split(WHITESPACE);
      if (fields.length === 5 && fields.every((field) => DIGITS.test(field))) format = "disksim";
    }
    if (format === null || (found !== null && found !== format)) return null;
    found = format;
  }
  return found;
}

// ---- Reading -------------------------------------------------------------------------------------------

/** Reads one trace file record by record, in batches. Close it when done (also after an error). */
export class TraceReader {
  private lines: string[] = [];
  private lineIndex = 0;
  /** Text after the last newline of the data read so far. */
  private carry = "";
  private eof = false;
  private records = 0;
  private closed = false;
  private readonly state: ParseState;
  private readonly parse: LineParser;

  private constructor(
    readonly file: string,
    readonly format: TraceFormat,
    private readonly handle: fs.promises.FileHandle,
    private readonly limit: number | null,
    private readonly chunk: Buffer,
    first: { lines: string[]; carry: string; eof: boolean },
  ) {
    this.lines = first.lines;
    this.carry = first.carry;
    this.eof = first.eof;
    this.parse = lineParsers[format];
    this.state = {
      file,
      line: 0,
      text: "",
      baseNs: null,
      baseHigh: 0,
      baseLow: 0,
      half: { high: 0, low: 0 },
      firstDataLine: true,
    };
  }

  /** Open `file`, detecting its format unless one is given. */
  static async open(file: string, options: TraceOptions = {}): Promise<TraceReader> {
    const limit = options.limit ?? null;
    assert(limit === null || (Number.isSafeInteger(limit) && limit >= 1), "limit is a positive integer");
    let handle: fs.promises.FileHandle;
    try {
      handle = await fs.promises.open(file, "r");
    } catch (err) {
      throw traceFileError(file, err);
    }
    try {
      const chunk = Buffer.allocUnsafe(traceChunkBytes);
      const first = await readChunk(handle, chunk, file, "", 0);
      let format: TraceFormat;
      if (options.format === undefined || options.format === "auto") {
        const detected = detectFormat([...first.lines, first.carry]);
        if (detected === null) {
          throw new VdiskError("INVALID_ARGUMENT", `cannot tell the format of trace ${file}`, {
            hint:
              "its first data line is none of spc (ASU,LBA,size,r|w,seconds), disksim (ns device lba " +
              "sectors 1|0) or msr (FILETIME,host,disk,Read|Write,offset,size,time); name it with --format",
          });
        }
        format = detected;
      } else {
        assert((traceFormats as readonly string[]).includes(options.format), "known trace format");
        format = options.format;
      }
      return new TraceReader(file, format, handle, limit, chunk, first);
    } catch (err) {
      await handle.close();
      throw err;
    }
  }

  /** Records delivered so far. */
  get recordsRead(): number {
    return this.records;
  }

  /**
   * Fill `batch` (from index 0) with the next records; returns how many (also in `batch.length`).
   * 0 means the end of the trace (or of the limit).
   */
  async read(batch: RecordBatch): Promise<number> {
    assert(!this.closed, "read from an open trace reader");
    batch.length = 0;
    let wanted = batch.capacity;
    if (this.limit !== null) wanted = Math.min(wanted, this.limit - this.records);
    const state = this.state;
    while (batch.length < wanted) {
      if (this.lineIndex >= this.lines.length) {
        if (!(await this.refill())) break;
        continue;
      }
      const text = this.lines[this.lineIndex++] as string;
      state.line++;
      if (isSkipped(text)) continue;
      state.text = text.charCodeAt(text.length - 1) === 13 ? text.slice(0, -1) : text;
      if (this.parse(state, batch, batch.length)) batch.length++;
    }
    this.records += batch.length;
    return batch.length;
  }

  /** Load the next lines; false at the end of the file. */
  private async refill(): Promise<boolean> {
    this.lines = [];
    this.lineIndex = 0;
    if (this.eof) {
      if (this.carry === "") return false;
      this.lines = [this.carry]; // the last line, without a newline
      this.carry = "";
      return true;
    }
    const next = await readChunk(this.handle, this.chunk, this.file, this.carry, this.state.line);
    this.lines = next.lines;
    this.carry = next.carry;
    this.eof = next.eof;
    return true;
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.handle.close();
  }
}

function traceFileError(file: string, err: unknown): VdiskError {
  const code = (err as NodeJS.ErrnoException | undefined)?.code;
  const reason = (err as Error | undefined)?.message ?? String(err);
  if (code === "ENOENT") {
    return new VdiskError("NOT_FOUND", `trace ${file} does not exist`, {
      cause: err,
      hint: "check the path",
    });
  }
  return new VdiskError("IO_ERROR", `cannot read trace ${file}: ${reason}`, {
    cause: err,
    hint: "check that the file is readable",
  });
}

/** Read the next chunk and split it into whole lines plus the unfinished rest. */
async function readChunk(
  handle: fs.promises.FileHandle,
  chunk: Buffer,
  file: string,
  carry: string,
  linesBefore: number,
): Promise<{ lines: string[]; carry: string; eof: boolean }> {
  let bytes: number;
  try {
    bytes = (await handle.read(chunk, 0, chunk.length, null)).bytesRead;
  } catch (err) {
    throw traceFileError(file, err);
  }
  if (bytes === 0) return { lines: [], carry, eof: true };
  // Traces are ASCII; latin1 never splits a character across chunks.
  const lines = (carry + chunk.toString("latin1", 0, bytes)).split("\n");
  const rest = lines.pop() as string;
  if (rest.length > traceLineBytesMax) {
    throw new VdiskError(
      "INVALID_ARGUMENT",
      `${file}, line ${linesBefore + lines.length + 1}: longer than ${traceLineBytesMax} bytes; not a trace`,
      { hint: "give a text trace in the spc, disksim or msr format" },
    );
  }
  return { lines, carry: rest, eof: false };
}

/** Every record of a trace as plain objects (convenient; the replayer uses TraceReader directly). */
export async function* traceRecords(file: string, options: TraceOptions = {}): AsyncGenerator<TraceRecord> {
  const reader = await TraceReader.open(file, options);
  const batch = new RecordBatch();
  try {
    while ((await reader.read(batch)) > 0) {
      for (let index = 0; index < batch.length; index++) yield batch.record(index);
    }
  } finally {
    await reader.close();
  }
}

/** What a run of records holds: counted by a trace's summary and by a replay's report alike. */
export interface RecordCounts {
  records: number;
  reads: number;
  writes: number;
  readBytes: number;
  writeBytes: number;
}

export interface TraceSummary extends RecordCounts {
  file: string;
  format: TraceFormat;
  /** Largest timeNs minus smallest (0 for one record). */
  spanNs: number;
  maxOffsetBytes: number;
  /** Largest offset + length. */
  maxEndBytes: number;
  maxReadBytes: number;
  maxWriteBytes: number;
  /** Distinct device/ASU numbers, ascending. */
  devices: number[];
}

/** One pass over a trace (or its first `limit` records) counting what the replayer needs to know. */
export async function traceSummary(file: string, options: TraceOptions = {}): Promise<TraceSummary> {
  const reader = await TraceReader.open(file, options);
  const batch = new RecordBatch();
  const devices = new Set<number>();
  const summary: TraceSummary = {
    file,
    format: reader.format,
    records: 0,
    reads: 0,
    writes: 0,
    readBytes: 0,
    writeBytes: 0,
    spanNs: 0,
    maxOffsetBytes: 0,
    maxEndBytes: 0,
    maxReadBytes: 0,
    maxWriteBytes: 0,
    devices: [],
  };
  let timeMin = Infinity;
  let timeMax = -Infinity;
  let lastDevice = -1;
  try {
    while ((await reader.read(batch)) > 0) {
      for (let index = 0; index < batch.length; index++) {
        const time = batch.timeNs[index] as number;
        const offset = batch.offsetBytes[index] as number;
        const length = batch.lengthBytes[index] as number;
        const device = batch.device[index] as number;
        if (time < timeMin) timeMin = time;
        if (time > timeMax) timeMax = time;
        if (offset > summary.maxOffsetBytes) summary.maxOffsetBytes = offset;
        if (offset + length > summary.maxEndBytes) summary.maxEndBytes = offset + length;
        if (batch.write[index] === 1) {
          summary.writes++;
          summary.writeBytes += length;
          if (length > summary.maxWriteBytes) summary.maxWriteBytes = length;
        } else {
          summary.reads++;
          summary.readBytes += length;
          if (length > summary.maxReadBytes) summary.maxReadBytes = length;
        }
        if (device !== lastDevice) {
          lastDevice = device;
          devices.add(device);
          if (devices.size > traceDevicesMax) {
            throw new VdiskError("LIMIT", `trace ${file} names more than ${traceDevicesMax} devices`, {
              hint: "split the trace per device, or replay fewer records with --limit",
            });
          }
        }
      }
      summary.records += batch.length;
    }
  } finally {
    await reader.close();
  }
  summary.spanNs = summary.records === 0 ? 0 : timeMax - timeMin;
  summary.devices = [...devices].sort((a, b) => a - b);
  return summary;
}
