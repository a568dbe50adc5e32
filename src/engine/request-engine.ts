/**
 * RequestEngine: the per-disk request queue between the front ends (NBD connections, many per disk) and
 * the disk's volume, in the manner of a block layer's request queue and of Xen's tapdisk2 (request
 * aggregation, a maximum request size, requests sorted by address). It is itself a BlockDevice, so a front
 * end cannot tell it from the device it wraps.
 *
 * What it does with each request (docs/engine.md has the user's view):
 * - plugging: requests submitted during one synchronous span (the NBD server parses a socket chunk and
 *   submits its requests back to back) collect in the queue and are dispatched together from one
 *   microtask, so they can be merged and sorted without waiting a loop turn. With merge and sort both off
 *   a request that can go at once goes at once, inside the submitting call (a plain call-through).
 * - merging: queued reads with reads, writes with writes, adjacent or overlapping, same flush epoch, up to
 *   `maxRequestBytes` in all, become one device request through a pooled buffer. A later-submitted write
 *   wins where merged writes overlap; a merged write is FUA if any part asked for FUA.
 * - splitting: a read or write longer than `maxRequestBytes` goes to the device in pieces of at most that,
 *   cut at 4 KiB-aligned device offsets (in flight side by side, within the queue depth); its callback
 *   runs once, after the last piece, with the first error. Zero, trim, cache and block status carry no
 *   payload and pass through whole.
 * - queue depth: at most `queueDepth` device requests in flight; the rest wait in the queue.
 * - sorting: with sort on, ready requests go to the device in C-LOOK order (ascending from the end of the
 *   last dispatched request, then wrapping to the lowest address); a ready flush goes first, and a
 *   request passed over for `engineElevatorBypassMax` dispatches goes next regardless, so nothing starves.
 *
 * Ordering (the dependency rule): a request B depends on every earlier-submitted request A still queued
 * or in flight whose byte range overlaps B's where A or B mutates (write, zero, trim; resize overlaps
 * everything). B is dispatched only once all of them completed — or, for writes, in the same merged
 * device write as all of them. Two reads never depend on each other. A flush depends on every mutating
 * request submitted before it (overlap or not) and calls device.flush once they completed; later requests
 * do not depend on the flush but never merge with requests before it (a new epoch starts).
 *
 * Data structures, all bounded by the requests outstanding (the front ends bound those):
 * - `mutations` / `readers`: intrusive lists of the queued and in-flight ranged requests, in submission
 *   order. A new read scans only `mutations`, so with nothing mutating outstanding its overlap check is
 *   one comparison; a new write scans both.
 * - edges: each request keeps `dependents` (requests waiting for it) and `blockers` (how many it waits
 *   for). Completion decrements its dependents; one reaching zero becomes ready.
 * - ready queue: an intrusive FIFO list (the order requests became ready), plus, when merging or sorting,
 *   an array sorted by (offset, seq) for finding merge neighbours and the elevator's next request. The
 *   array is sorted lazily once per dispatch pass and compacted at the end of each pass.
 * - request objects come from a free list and carry one completion closure made when the object was
 *   created, so the hot path allocates nothing per request.
 *
 * Invariants (asserted): inflight <= queueDepth when dispatching; a completing request is in flight; a
 * request is in exactly one of waiting / ready / in flight / free; after a pass the sorted array holds
 * exactly the ready requests; callbacks run only from device callbacks, never inside a submitting call.
 */
import { assert, VdiskError } from "../errors";
import { KiB, MiB } from "../limits";
import type {
  BlockDevice,
  Capabilities,
  DeviceUsage,
  Done,
  Extent,
  ExtentsDone,
  ReadDone,
} from "../devices/block-device";

export type SortMode = "auto" | "on" | "off";

export interface EngineSettings {
  /** Merge adjacent/overlapping queued requests (reads with reads, writes with writes). */
  merge: boolean;
  /** Largest request sent to the device: merges stop here, larger reads/writes are split. */
  maxRequestBytes: number;
  /** Requests in flight to the device at once. */
  queueDepth: number;
  /** Order queued requests by address (C-LOOK); "auto" = on iff the device is rotational. */
  sort: SortMode;
}

/** maxRequestBytes bounds and alignment. */
export const engineRequestBytesMin = 4 * KiB;
export const engineRequestBytesMax = 32 * MiB;
export const engineRequestBytesAlignment = 512;
/** queueDepth bounds. */
export const engineQueueDepthMin = 1;
export const engineQueueDepthMax = 1024;
/**
 * Pieces of a split request end on multiples of this (absolute device offsets), so no sector or page is
 * written by two pieces: two device writes to one sector could tear it inside on a power cut, which a
 * single write never does. Divides engineRequestBytesMin, so a piece is never empty.
 */
export const engineSplitAlignmentBytes = 4 * KiB;
/** Entries of the sorted ready queue looked at on each side of a merge leader. */
export const engineMergeScanMax = 64;
/** Dispatches the elevator may pass a ready request over before it goes next regardless. */
export const engineElevatorBypassMax = 256;
/** Bytes of merge buffers kept for reuse (power-of-two classes from 4 KiB to engineRequestBytesMax). */
export const engineBufferPoolBytesMax = 16 * MiB;
/** Idle request objects kept for reuse. */
export const engineFreeRequestsMax = 4096;

/**
 * Defaults. maxRequestBytes is the NBD server's default payload maximum, so by default nothing a client
 * sends is split: splitting a large write into pieces that reach the image in parallel would let other
 * writes' allocations land between them, and a vdisk image then has to copy the leaf to regroup it (seen
 * in the benchmark's fill: a 4 GiB image written in 2 MiB requests split at 1 MiB left a quarter of its
 * leaves scattered). Merging still stops at it. Lower it per disk for devices that want smaller requests.
 */
export const defaultEngineSettings: Readonly<EngineSettings> = Object.freeze({
  merge: true,
  maxRequestBytes: 32 * MiB,
  queueDepth: 64,
  sort: "auto" as SortMode,
});

assert(engineRequestBytesMin % engineRequestBytesAlignment === 0, "request minimum aligned");
assert(engineRequestBytesMax % engineRequestBytesAlignment === 0, "request maximum aligned");
assert(
  defaultEngineSettings.maxRequestBytes >= engineRequestBytesMin &&
    defaultEngineSettings.maxRequestBytes <= engineRequestBytesMax,
  "default request maximum within bounds",
);
assert(
  defaultEngineSettings.queueDepth >= engineQueueDepthMin &&
    defaultEngineSettings.queueDepth <= engineQueueDepthMax,
  "default queue depth within bounds",
);
assert(engineBufferPoolBytesMax >= engineRequestBytesMin, "the buffer pool holds at least one buffer");
assert(engineRequestBytesMin % engineSplitAlignmentBytes === 0, "a split piece spans at least one boundary");

const settingNames = "merge, maxRequestBytes, queueDepth, sort";

function describeValue(value: unknown): string {
  if (typeof value === "string") return JSON.stringify(value.length > 40 ? `${value.slice(0, 40)}…` : value);
  if (typeof value === "number" || typeof value === "boolean" || value === null) return String(value);
  if (Array.isArray(value)) return "an array";
  return `a value of type ${typeof value}`;
}

function invalidSetting(message: string): VdiskError {
  return new VdiskError("INVALID_ARGUMENT", message, {
    hint: `engine settings: ${settingNames} (see docs/engine.md)`,
  });
}

/**
 * Validate a partial settings object from the API, the CLI or the catalog and return it merged over
 * `base`. Unknown keys, wrong types and out-of-range values fail with INVALID_ARGUMENT naming the setting
 * and its allowed values. A key whose value is `undefined` counts as absent.
 */
export function checkEngineSettings(
  input: unknown,
  base: EngineSettings = defaultEngineSettings,
): EngineSettings {
  if (typeof input !== "object" || input === null || Array.isArray(input)) {
    throw invalidSetting(
      `engine settings must be an object with some of ${settingNames}; got ${describeValue(input)}`,
    );
  }
  const result: EngineSettings = {
    merge: base.merge,
    maxRequestBytes: base.maxRequestBytes,
    queueDepth: base.queueDepth,
    sort: base.sort,
  };
  for (const [key, value] of Object.entries(input as Record<string, unknown>)) {
    if (value === undefined) continue;
    switch (key) {
      case "merge":
        if (typeof value !== "boolean") {
          throw invalidSetting(`engine setting merge must be true or false; got ${describeValue(value)}`);
        }
        result.merge = value;
        break;
      case "maxRequestBytes":
        if (
          typeof value !== "number" ||
          !Number.isSafeInteger(value) ||
          value < engineRequestBytesMin ||
          value > engineRequestBytesMax ||
          value % engineRequestBytesAlignment !== 0
        ) {
          throw invalidSetting(
            `engine setting maxRequestBytes must be a whole number of bytes from ${engineRequestBytesMin} ` +
              `to ${engineRequestBytesMax} (4 KiB to 32 MiB), a multiple of ${engineRequestBytesAlignment}; ` +
              `got ${describeValue(value)}`,
          );
        }
        result.maxRequestBytes = value;
        break;
      case "queueDepth":
        if (
          typeof value !== "number" ||
          !Number.isSafeInteger(value) ||
          value < engineQueueDepthMin ||
          value > engineQueueDepthMax
        ) {
          throw invalidSetting(
            `engine setting queueDepth must be a whole number from ${engineQueueDepthMin} to ` +
              `${engineQueueDepthMax}; got ${describeValue(value)}`,
          );
        }
        result.queueDepth = value;
        break;
      case "sort":
        if (value !== "auto" && value !== "on" && value !== "off") {
          throw invalidSetting(
            `engine setting sort must be "auto", "on" or "off"; got ${describeValue(value)}`,
          );
        }
        result.sort = value;
        break;
      default:
        throw invalidSetting(
          `unknown engine setting ${JSON.stringify(key)}; known settings: ${settingNames}`,
        );
    }
  }
  return result;
}

export interface EngineStats {
  settings: EngineSettings;
  /** The effective sort (sort "auto" resolved against the device). */
  sorting: boolean;
  /** Requests accepted (every verb, flush and resize included; usage and close are not requests). */
  submitted: number;
  /** Requests issued to the device (a merged group counts once, each piece of a split request once). */
  dispatched: number;
  /** Requests absorbed into another device request by merging. */
  merged: number;
  /** Extra device requests created by splitting (pieces - 1 per split request). */
  split: number;
  /** Reads answered by readNoWait pass-through. */
  fastPathReads: number;
  /** Requests waiting now (for an overlapping request, a flush's writes, or a free slot). */
  queued: number;
  /** Device requests in flight now. */
  inflight: number;
  /** High-water mark of `queued`. */
  queuedMax: number;
  /** Requests that had to wait for an overlapping earlier request. */
  waitedForOverlap: number;
}

// ---- Requests ----

const verbRead = 0;
const verbCache = 1;
const verbStatus = 2;
const verbWrite = 3;
const verbZero = 4;
const verbTrim = 5;
const verbResize = 6;
const verbFlush = 7;
/** Verbs up to here only look at the data; from verbWrite through verbResize they change it. */
const verbReaderLast = verbStatus;

const stateFree = 0;
const stateWaiting = 1;
const stateReady = 2;
const stateInflight = 3;

/** A request from a front end, or a piece of a split one (its `parent` is then set). */
const roleFront = 0;
const rolePiece = 1;

const flagFua = 1;

type AnyDone = (err: VdiskError | null, result?: number[] | Extent[] | null) => void;
type DeviceDone = (
  request: EngineRequest,
  err: VdiskError | null,
  result?: number[] | Extent[] | null,
) => void;

class EngineRequest {
  role = roleFront;
  verb = verbRead;
  state = stateFree;
  /** Submission number: orders requests at equal offsets and conflicting requests. */
  seq = 0;
  /** Flush epoch at submission: requests of different epochs never merge. */
  epoch = 0;
  offset = 0;
  /** offset + length; Infinity for resize (it overlaps everything). */
  end = 0;
  buf: Buffer | null = null;
  /** write/trim: flagFua; zero: ZeroFlags. */
  flags = 0;
  /** resize: the new size. */
  resizeBytes = 0;
  callback: AnyDone | null = null;

  /** Earlier requests this one still waits for. */
  blockers = 0;
  /** Later requests waiting for this one. */
  readonly dependents: EngineRequest[] = [];
  prevActive: EngineRequest | null = null;
  nextActive: EngineRequest | null = null;
  prevReady: EngineRequest | null = null;
  nextReady: EngineRequest | null = null;
  /** Dispatch count when this became ready (elevator anti-starvation). */
  readyTick = 0;

  /** Merge: next member of the group this request leads or belongs to. */
  groupNext: EngineRequest | null = null;
  groupStart = 0;
  groupEnd = 0;
  /** Merge leader: the device buffer (a view of `mergedBacking`, which goes back to the pool). */
  mergedBuf: Buffer | null = null;
  mergedBacking: Buffer | null = null;
  /** Merge building: the group that last counted this request's blockers, and how many it holds. */
  markGroup = 0;
  markCount = 0;

  /** Split: next byte to issue, pieces in flight, first error, holes gathered so far. */
  cursor = 0;
  piecesPending = 0;
  error: VdiskError | null = null;
  splitHoles: number[] | null = null;
  splitHolesUnknown = false;
  /** Piece: the request it is part of. */
  parent: EngineRequest | null = null;

  /** The device callback, made once per object. */
  readonly onDevice: (err: VdiskError | null, result?: number[] | Extent[] | null) => void;

  constructor(deviceDone: DeviceDone) {
    this.onDevice = (err, result) => deviceDone(this, err, result);
  }
}

/** Intrusive list over prevActive/nextActive: the queued and in-flight requests of one kind. */
class ActiveList {
  head: EngineRequest | null = null;
  tail: EngineRequest | null = null;
  count = 0;

  push(request: EngineRequest): void {
    request.prevActive = this.tail;
    request.nextActive = null;
    if (this.tail === null) this.head = request;
    else this.tail.nextActive = request;
    this.tail = request;
    this.count++;
  }

  remove(request: EngineRequest): void {
    const { prevActive, nextActive } = request;
    if (prevActive === null) this.head = nextActive;
    else prevActive.nextActive = nextActive;
    if (nextActive === null) this.tail = prevActive;
    else nextActive.prevActive = prevActive;
    request.prevActive = null;
    request.nextActive = null;
    this.count--;
    assert(this.count >= 0, "active list count non-negative");
  }
}

/** Intrusive FIFO over prevReady/nextReady: the ready requests in the order they became ready. */
class ReadyList {
  head: EngineRequest | null = null;
  tail: EngineRequest | null = null;
  count = 0;

  push(request: EngineRequest): void {
    request.prevReady = this.tail;
    request.nextReady = null;
    if (this.tail === null) this.head = request;
    else this.tail.nextReady = request;
    this.tail = request;
    this.count++;
  }

  remove(request: EngineRequest): void {
    const { prevReady, nextReady } = request;
    if (prevReady === null) this.head = nextReady;
    else prevReady.nextReady = nextReady;
    if (nextReady === null) this.tail = prevReady;
    else nextReady.prevReady = prevReady;
    request.prevReady = null;
    request.nextReady = null;
    this.count--;
    assert(this.count >= 0, "ready list count non-negative");
  }
}

function compareRequests(a: EngineRequest, b: EngineRequest): number {
  return a.offset - b.offset || a.seq - b.seq;
}

/** Holes of a merged read (relative to the merged buffer) as seen by a member at `start`, `length` long. */
function translateHoles(holes: number[] | null | undefined, start: number, length: number): number[] | null {
  if (holes === null || holes === undefined) return null;
  const end = start + length;
  const result: number[] = [];
  for (let index = 0; index < holes.length; index += 2) {
    const holeStart = holes[index];
    const holeEnd = holeStart + holes[index + 1];
    const from = holeStart > start ? holeStart : start;
    const to = holeEnd < end ? holeEnd : end;
    if (from < to) result.push(from - start, to - from);
  }
  return result;
}

/** Sort flat [start, length, ...] pairs by start and join touching ones. */
function sortHoles(holes: number[]): number[] {
  const order: number[] = [];
  for (let index = 0; index < holes.length; index += 2) order.push(index);
  order.sort((a, b) => holes[a] - holes[b]);
  const result: number[] = [];
  for (const index of order) {
    const count = result.length;
    if (count > 0 && result[count - 2] + result[count - 1] === holes[index]) {
      result[count - 1] += holes[index + 1];
    } else {
      result.push(holes[index], holes[index + 1]);
    }
  }
  return result;
}

/** Merge buffers by power-of-two class (4 KiB up): `take` returns a whole class buffer; callers use a view. */
class BufferPool {
  private readonly classes: Buffer[][] = [];
  private pooledBytes = 0;

  take(length: number): Buffer {
    const shift = BufferPool.classOf(length);
    const backing = this.classes[shift]?.pop();
    if (backing !== undefined) {
      this.pooledBytes -= backing.length;
      return backing;
    }
    return Buffer.allocUnsafe(2 ** shift);
  }

  give(backing: Buffer): void {
    if (this.pooledBytes + backing.length > engineBufferPoolBytesMax) return;
    const shift = BufferPool.classOf(backing.length);
    assert(2 ** shift === backing.length, "pooled buffers have a class size");
    (this.classes[shift] ??= []).push(backing);
    this.pooledBytes += backing.length;
  }

  private static classOf(length: number): number {
    assert(length > 0 && length <= engineRequestBytesMax, "merge buffer within the request maximum");
    return Math.max(12, Math.ceil(Math.log2(length)));
  }
}

// ---- The engine ----

export class RequestEngine implements BlockDevice {
  readonly device: BlockDevice;

  private current: EngineSettings;
  private sorting: boolean;
  /** Whether the ready requests are also kept in `readySorted` (merge or sort on). */
  private indexed: boolean;

  private readonly mutations = new ActiveList();
  private readonly readers = new ActiveList();
  private readonly ready = new ReadyList();
  private readySorted: EngineRequest[] = [];
  private readySortedDirty = false;
  /** Split requests with pieces still to issue, oldest first. */
  private readonly splitting: EngineRequest[] = [];
  private waitingCount = 0;
  /** Flushes in the ready queue: the elevator takes them first (their writes are done; no need to wait). */
  private readyFlushes = 0;
  private inflightCount = 0;
  /** Front-end requests (and usage calls) not completed yet: close waits for zero. */
  private outstanding = 0;

  private seqCounter = 0;
  private epoch = 0;
  private groupSerial = 0;
  /** End of the last ranged request dispatched: where the elevator continues. */
  private headPosition = 0;
  private dispatchTick = 0;
  private dispatchScheduled = false;
  private closeDone: Done | null = null;
  private closed = false;

  private readonly free: EngineRequest[] = [];
  private readonly pool = new BufferPool();
  private readonly deviceDoneBound: DeviceDone = (request, err, result) =>
    this.deviceDone(request, err, result);
  private readonly runDispatchBound = (): void => this.runDispatch();

  private submittedCount = 0;
  private dispatchedCount = 0;
  private mergedCount = 0;
  private splitCount = 0;
  private fastPathCount = 0;
  private queuedMaxCount = 0;
  private waitedCount = 0;

  constructor(device: BlockDevice, settings: Partial<EngineSettings> = {}) {
    this.device = device;
    this.current = checkEngineSettings(settings, defaultEngineSettings);
    this.sorting = this.effectiveSorting(this.current);
    this.indexed = this.current.merge || this.sorting;
  }

  get size(): number {
    return this.device.size;
  }

  get capabilities(): Capabilities {
    return this.device.capabilities;
  }

  get kind(): string {
    return this.device.kind;
  }

  get settings(): EngineSettings {
    return { ...this.current };
  }

  /** Change the settings while requests flow; they apply to requests dispatched from now on. */
  configure(settings: EngineSettings): void {
    const next = checkEngineSettings(settings, this.current);
    const sorting = this.effectiveSorting(next);
    const indexed = next.merge || sorting;
    if (indexed && !this.indexed) {
      this.readySorted = [];
      for (let request = this.ready.head; request !== null; request = request.nextReady) {
        this.readySorted.push(request);
      }
      this.readySortedDirty = true;
    } else if (!indexed && this.indexed) {
      this.readySorted = [];
      this.readySortedDirty = false;
    }
    this.current = next;
    this.sorting = sorting;
    this.indexed = indexed;
    if (this.ready.count > 0 || this.splitting.length > 0) this.scheduleDispatch();
  }

  stats(): EngineStats {
    return {
      settings: { ...this.current },
      sorting: this.sorting,
      submitted: this.submittedCount,
      dispatched: this.dispatchedCount,
      merged: this.mergedCount,
      split: this.splitCount,
      fastPathReads: this.fastPathCount,
      queued: this.waitingCount + this.ready.count,
      inflight: this.inflightCount,
      queuedMax: this.queuedMaxCount,
      waitedForOverlap: this.waitedCount,
    };
  }

  // ---- BlockDevice verbs ----

  read(buf: Buffer, offset: number, done: ReadDone): void {
    const request = this.take(verbRead, offset, offset + buf.length, 0, done as AnyDone);
    request.buf = buf;
    this.submit(request);
  }

  /**
   * Pass-through to the device's cache probe when no queued or in-flight mutating request overlaps the
   * range (otherwise the read could see bytes from before a write submitted ahead of it).
   */
  readNoWait(buf: Buffer, offset: number): boolean {
    const device = this.device;
    if (device.readNoWait === undefined) return false;
    if (this.mutations.count !== 0) {
      const end = offset + buf.length;
      for (let other = this.mutations.head; other !== null; other = other.nextActive) {
        if (other.offset < end && offset < other.end) return false;
      }
    }
    if (!device.readNoWait(buf, offset)) return false;
    this.fastPathCount++;
    return true;
  }

  write(buf: Buffer, offset: number, fua: boolean, done: Done): void {
    const request = this.take(verbWrite, offset, offset + buf.length, fua ? flagFua : 0, done as AnyDone);
    request.buf = buf;
    this.submit(request);
  }

  zero(offset: number, length: number, flags: number, done: Done): void {
    this.submit(this.take(verbZero, offset, offset + length, flags, done as AnyDone));
  }

  trim(offset: number, length: number, fua: boolean, done: Done): void {
    this.submit(this.take(verbTrim, offset, offset + length, fua ? flagFua : 0, done as AnyDone));
  }

  cache(offset: number, length: number, done: Done): void {
    this.submit(this.take(verbCache, offset, offset + length, 0, done as AnyDone));
  }

  blockStatus(offset: number, length: number, done: ExtentsDone): void {
    this.submit(this.take(verbStatus, offset, offset + length, 0, done as AnyDone));
  }

  flush(done: Done): void {
    this.assertOpen();
    const request = this.take(verbFlush, 0, 0, 0, done as AnyDone);
    this.epoch++; // later requests never merge with earlier ones
    this.submittedCount++;
    this.outstanding++;
    let blockers = 0;
    for (let other = this.mutations.head; other !== null; other = other.nextActive) {
      other.dependents.push(request);
      blockers++;
    }
    this.admit(request, blockers, false);
  }

  /** A full barrier: waits for every earlier request, and every later one waits for it. */
  resize(size: number, done: Done): void {
    const request = this.take(verbResize, 0, Infinity, 0, done as AnyDone);
    request.resizeBytes = size;
    this.epoch++;
    this.submit(request);
  }

  usage(done: (err: VdiskError | null, usage?: DeviceUsage) => void): void {
    this.assertOpen();
    this.outstanding++;
    this.device.usage((err, usage) => {
      this.outstanding--;
      done(err, usage);
      this.afterCompletion();
    });
  }

  /** Wait for every queued and in-flight request, then close the device. */
  close(done: Done): void {
    this.assertOpen();
    this.closeDone = done;
    if (this.outstanding === 0) this.closeDevice();
  }

  // ---- Submission ----

  private take(verb: number, offset: number, end: number, flags: number, callback: AnyDone): EngineRequest {
    const request = this.free.pop() ?? new EngineRequest(this.deviceDoneBound);
    assert(request.state === stateFree, "a request object from the free list is free");
    request.role = roleFront;
    request.verb = verb;
    request.offset = offset;
    request.end = end;
    request.flags = flags;
    request.callback = callback;
    request.seq = ++this.seqCounter;
    request.epoch = this.epoch;
    return request;
  }

  private submit(request: EngineRequest): void {
    this.assertOpen();
    assert(request.end > request.offset, "a request covers at least one byte");
    this.submittedCount++;
    this.outstanding++;
    let blockers = 0;
    if (this.mutations.count !== 0) blockers = this.addBlockers(this.mutations.head, request, blockers);
    if (request.verb > verbReaderLast) {
      if (this.readers.count !== 0) blockers = this.addBlockers(this.readers.head, request, blockers);
      this.mutations.push(request);
    } else {
      this.readers.push(request);
    }
    this.admit(request, blockers, true);
  }

  /** Make `request` a dependent of every overlapping request from `first` on; returns the new count. */
  private addBlockers(first: EngineRequest | null, request: EngineRequest, count: number): number {
    const { offset, end } = request;
    for (let other = first; other !== null; other = other.nextActive) {
      if (other.offset < end && offset < other.end) {
        other.dependents.push(request);
        count++;
      }
    }
    return count;
  }

  private admit(request: EngineRequest, blockers: number, overlap: boolean): void {
    if (blockers === 0) {
      this.makeReady(request);
      return;
    }
    request.blockers = blockers;
    request.state = stateWaiting;
    this.waitingCount++;
    if (overlap) this.waitedCount++;
    this.noteQueued();
  }

  private makeReady(request: EngineRequest): void {
    if (
      !this.indexed &&
      this.ready.count === 0 &&
      this.splitting.length === 0 &&
      this.inflightCount < this.current.queueDepth
    ) {
      this.issue(request); // merge and sort off, nothing ahead of it: a plain call-through
      return;
    }
    request.state = stateReady;
    request.readyTick = this.dispatchTick;
    if (request.verb === verbFlush) this.readyFlushes++;
    this.ready.push(request);
    if (this.indexed) {
      this.readySorted.push(request);
      this.readySortedDirty = true;
    }
    this.noteQueued();
    if (this.inflightCount < this.current.queueDepth) this.scheduleDispatch();
  }

  private noteQueued(): void {
    const queued = this.waitingCount + this.ready.count;
    if (queued > this.queuedMaxCount) this.queuedMaxCount = queued;
  }

  private scheduleDispatch(): void {
    if (this.dispatchScheduled) return;
    this.dispatchScheduled = true;
    queueMicrotask(this.runDispatchBound);
  }

  // ---- Dispatch ----

  /** One dispatch pass: continue split requests, then leaders (with their merge groups) while slots last. */
  private runDispatch(): void {
    this.dispatchScheduled = false;
    const depth = this.current.queueDepth;
    while (this.splitting.length > 0 && this.inflightCount < depth) {
      const parent = this.splitting[0];
      this.issuePieces(parent);
      if (parent.cursor < parent.end) break;
      this.splitting.shift();
    }
    if (this.ready.count === 0 || this.inflightCount >= depth) return;
    if (this.indexed && this.readySortedDirty) {
      this.readySorted.sort(compareRequests);
      this.readySortedDirty = false;
    }
    while (this.ready.count > 0 && this.inflightCount < depth && this.splitting.length === 0) {
      let leader: EngineRequest;
      let index = -1;
      if (this.sorting) {
        index = this.elevatorPick();
        leader = this.readySorted[index];
      } else {
        leader = this.ready.head as EngineRequest;
      }
      this.unready(leader);
      if (
        this.current.merge &&
        (leader.verb === verbRead || leader.verb === verbWrite) &&
        leader.end - leader.offset < this.current.maxRequestBytes
      ) {
        if (index < 0) index = this.findSorted(leader);
        this.gather(leader, index);
      }
      if (leader.groupNext !== null) this.issueGroup(leader);
      else this.issue(leader);
      this.dispatchTick++;
    }
    if (this.indexed && this.readySorted.length !== this.ready.count) {
      let kept = 0;
      for (const request of this.readySorted) {
        if (request.state === stateReady) this.readySorted[kept++] = request;
      }
      this.readySorted.length = kept;
    }
    assert(!this.indexed || this.readySorted.length === this.ready.count, "sorted index = ready requests");
    assert(this.readyFlushes >= 0 && this.readyFlushes <= this.ready.count, "ready flushes counted");
  }

  /** Take `request` out of the ready queue (its sorted-array entry goes stale until the pass ends). */
  private unready(request: EngineRequest): void {
    assert(request.state === stateReady, "dispatching a ready request");
    this.ready.remove(request);
    if (request.verb === verbFlush) this.readyFlushes--;
    request.state = stateInflight;
  }

  /**
   * C-LOOK: the first ready request at or after the head position, else the lowest. A ready flush goes
   * first, and the oldest ready request once it has been passed over engineElevatorBypassMax times.
   */
  private elevatorPick(): number {
    const sorted = this.readySorted;
    const oldest = this.ready.head as EngineRequest;
    if (this.readyFlushes > 0) {
      for (let request = this.ready.head; request !== null; request = request.nextReady) {
        if (request.verb === verbFlush) return this.findSorted(request);
      }
    }
    if (this.dispatchTick - oldest.readyTick > engineElevatorBypassMax) return this.findSorted(oldest);
    let low = 0;
    let high = sorted.length;
    while (low < high) {
      const middle = (low + high) >>> 1;
      if (sorted[middle].offset < this.headPosition) low = middle + 1;
      else high = middle;
    }
    for (let index = low; index < sorted.length; index++) {
      if (sorted[index].state === stateReady) return index;
    }
    for (let index = 0; index < low; index++) {
      if (sorted[index].state === stateReady) return index;
    }
    assert(false, "a ready request is in the sorted index");
  }

  /** Index of `request` in the sorted array (binary search on (offset, seq)). */
  private findSorted(request: EngineRequest): number {
    const sorted = this.readySorted;
    let low = 0;
    let high = sorted.length;
    while (low < high) {
      const middle = (low + high) >>> 1;
      if (compareRequests(sorted[middle], request) < 0) low = middle + 1;
      else high = middle;
    }
    assert(sorted[low] === request, "request found in the sorted index");
    return low;
  }

  /**
   * Build the merge group led by `leader` (at `index` in the sorted array): ready neighbours of the same
   * verb and epoch that touch the group's range, then (writes only) waiting writes whose every blocker is
   * already in the group — those join after their blockers, so the group order puts later data last.
   */
  private gather(leader: EngineRequest, index: number): void {
    const maxBytes = this.current.maxRequestBytes;
    const { verb, epoch } = leader;
    const sorted = this.readySorted;
    let start = leader.offset;
    let end = leader.end;
    let tail = leader;
    let members = 1;
    for (let at = index + 1, steps = 0; at < sorted.length && steps < engineMergeScanMax; at++, steps++) {
      const other = sorted[at];
      if (other.offset > end) break;
      if (other.state !== stateReady || other.verb !== verb || other.epoch !== epoch) continue;
      const newEnd = other.end > end ? other.end : end;
      if (newEnd - start > maxBytes) continue;
      this.unready(other);
      tail.groupNext = other;
      tail = other;
      end = newEnd;
      members++;
    }
    for (let at = index - 1, steps = 0; at >= 0 && steps < engineMergeScanMax; at--, steps++) {
      const other = sorted[at];
      if (other.state !== stateReady || other.verb !== verb || other.epoch !== epoch) continue;
      if (other.end < start) break;
      const newStart = other.offset < start ? other.offset : start;
      const newEnd = other.end > end ? other.end : end; // a longer request may start before the leader
      if (newEnd - newStart > maxBytes) continue;
      this.unready(other);
      tail.groupNext = other;
      tail = other;
      start = newStart;
      end = newEnd;
      members++;
    }
    if (verb === verbWrite) {
      const mark = ++this.groupSerial;
      for (let member: EngineRequest | null = leader; member !== null; member = member.groupNext) {
        const dependents = member.dependents;
        for (let at = 0; at < dependents.length; at++) {
          const other = dependents[at];
          if (other.markGroup !== mark) {
            other.markGroup = mark;
            other.markCount = 0;
          }
          other.markCount++;
          if (
            other.markCount !== other.blockers ||
            other.state !== stateWaiting ||
            other.verb !== verbWrite ||
            other.epoch !== epoch
          ) {
            continue;
          }
          // It overlaps `member`, so the group's range stays contiguous.
          const newStart = other.offset < start ? other.offset : start;
          const newEnd = other.end > end ? other.end : end;
          if (newEnd - newStart > maxBytes) continue;
          other.state = stateInflight;
          this.waitingCount--;
          tail.groupNext = other;
          tail = other;
          start = newStart;
          end = newEnd;
          members++;
        }
      }
    }
    leader.groupStart = start;
    leader.groupEnd = end;
    this.mergedCount += members - 1;
  }

  /** Issue a single request (or start splitting it). */
  private issue(request: EngineRequest): void {
    request.state = stateInflight;
    const length = request.end - request.offset;
    if ((request.verb === verbRead || request.verb === verbWrite) && length > this.current.maxRequestBytes) {
      request.cursor = request.offset;
      this.issuePieces(request);
      if (request.cursor < request.end) this.splitting.push(request);
      return;
    }
    this.countIssue();
    const device = this.device;
    switch (request.verb) {
      case verbRead:
        this.headPosition = request.end;
        device.read(request.buf as Buffer, request.offset, request.onDevice);
        return;
      case verbWrite:
        this.headPosition = request.end;
        device.write(request.buf as Buffer, request.offset, request.flags !== 0, request.onDevice);
        return;
      case verbZero:
        this.headPosition = request.end;
        device.zero(request.offset, length, request.flags, request.onDevice);
        return;
      case verbTrim:
        this.headPosition = request.end;
        device.trim(request.offset, length, request.flags !== 0, request.onDevice);
        return;
      case verbCache:
        device.cache(request.offset, length, request.onDevice);
        return;
      case verbStatus:
        device.blockStatus(request.offset, length, request.onDevice);
        return;
      case verbFlush:
        device.flush(request.onDevice);
        return;
      case verbResize:
        device.resize(request.resizeBytes, request.onDevice);
        return;
    }
    assert(false, `unknown engine verb ${request.verb}`);
  }

  /** Issue pieces of a split read/write while slots last. */
  private issuePieces(parent: EngineRequest): void {
    const maxBytes = this.current.maxRequestBytes;
    const buf = parent.buf as Buffer;
    const fua = parent.flags !== 0;
    while (parent.cursor < parent.end && this.inflightCount < this.current.queueDepth) {
      const start = parent.cursor;
      const boundary = start + maxBytes - ((start + maxBytes) % engineSplitAlignmentBytes);
      const end = Math.min(parent.end, boundary);
      assert(end > start && end - start <= maxBytes, "a piece is non-empty and within the maximum");
      if (start !== parent.offset) this.splitCount++;
      parent.cursor = end;
      parent.piecesPending++;
      const piece = this.free.pop() ?? new EngineRequest(this.deviceDoneBound);
      assert(piece.state === stateFree, "a request object from the free list is free");
      piece.role = rolePiece;
      piece.parent = parent;
      piece.verb = parent.verb;
      piece.offset = start;
      piece.end = end;
      piece.state = stateInflight;
      this.countIssue();
      this.headPosition = end;
      const slice = buf.subarray(start - parent.offset, end - parent.offset);
      if (parent.verb === verbRead) this.device.read(slice, start, piece.onDevice);
      else this.device.write(slice, start, fua, piece.onDevice);
    }
  }

  /** Issue a merge group as one device request through a pooled buffer. */
  private issueGroup(leader: EngineRequest): void {
    const start = leader.groupStart;
    const length = leader.groupEnd - start;
    assert(length > 0 && length <= this.current.maxRequestBytes, "merged request within the maximum");
    const backing = this.pool.take(length);
    const buf = backing.length === length ? backing : backing.subarray(0, length);
    leader.mergedBacking = backing;
    leader.mergedBuf = buf;
    this.countIssue();
    this.headPosition = leader.groupEnd;
    if (leader.verb === verbRead) {
      this.device.read(buf, start, leader.onDevice);
      return;
    }
    let fua = false;
    let covered = 0;
    for (let member: EngineRequest | null = leader; member !== null; member = member.groupNext) {
      (member.buf as Buffer).copy(buf, member.offset - start);
      if (member.flags !== 0) fua = true;
      covered += member.end - member.offset;
    }
    assert(covered >= length, "merged write members cover the merged range");
    this.device.write(buf, start, fua, leader.onDevice);
  }

  private countIssue(): void {
    this.inflightCount++;
    this.dispatchedCount++;
    assert(this.inflightCount <= this.current.queueDepth, "in flight within the queue depth");
  }

  // ---- Completion ----

  private deviceDone(
    request: EngineRequest,
    err: VdiskError | null,
    result?: number[] | Extent[] | null,
  ): void {
    assert(request.state === stateInflight, "a device callback for a request in flight (called once)");
    this.inflightCount--;
    if (request.role === rolePiece) this.pieceDone(request, err, result as number[] | null | undefined);
    else if (request.groupNext !== null) this.groupDone(request, err, result as number[] | null | undefined);
    else {
      this.retire(request);
      this.release(request);
      const callback = request.callback as AnyDone;
      this.recycle(request);
      callback(err, result);
    }
    this.afterCompletion();
  }

  private pieceDone(piece: EngineRequest, err: VdiskError | null, holes: number[] | null | undefined): void {
    const parent = piece.parent as EngineRequest;
    const pieceStart = piece.offset - parent.offset;
    this.recycle(piece);
    if (err !== null) {
      parent.error ??= err;
    } else if (parent.verb === verbRead) {
      if (holes === null || holes === undefined) {
        parent.splitHolesUnknown = true;
      } else if (holes.length > 0) {
        const gathered = (parent.splitHoles ??= []);
        for (let index = 0; index < holes.length; index += 2) {
          gathered.push(holes[index] + pieceStart, holes[index + 1]);
        }
      }
    }
    parent.piecesPending--;
    if (parent.piecesPending > 0 || parent.cursor < parent.end) return;
    this.retire(parent);
    this.release(parent);
    const callback = parent.callback as AnyDone;
    const error = parent.error;
    let result: number[] | null | undefined;
    if (parent.verb === verbRead && error === null) {
      if (parent.splitHoles !== null) result = sortHoles(parent.splitHoles);
      else result = parent.splitHolesUnknown ? null : [];
    }
    this.recycle(parent);
    callback(error, result);
  }

  private groupDone(leader: EngineRequest, err: VdiskError | null, holes: number[] | null | undefined): void {
    const start = leader.groupStart;
    const buf = leader.mergedBuf as Buffer;
    const isRead = leader.verb === verbRead;
    if (isRead && err === null) {
      for (let member: EngineRequest | null = leader; member !== null; member = member.groupNext) {
        buf.copy(member.buf as Buffer, 0, member.offset - start, member.end - start);
      }
    }
    this.pool.give(leader.mergedBacking as Buffer);
    for (let member: EngineRequest | null = leader; member !== null; member = member.groupNext) {
      assert(member.state === stateInflight, "merged members are in flight");
      this.retire(member);
    }
    for (let member: EngineRequest | null = leader; member !== null; member = member.groupNext) {
      this.release(member);
    }
    let member: EngineRequest | null = leader;
    while (member !== null) {
      const next: EngineRequest | null = member.groupNext;
      const callback = member.callback as AnyDone;
      const memberHoles =
        isRead && err === null
          ? translateHoles(holes, member.offset - start, member.end - member.offset)
          : undefined;
      this.recycle(member);
      callback(err, memberHoles);
      member = next;
    }
  }

  /** A front-end request is done: out of the active lists. */
  private retire(request: EngineRequest): void {
    if (request.verb <= verbReaderLast) this.readers.remove(request);
    else if (request.verb !== verbFlush) this.mutations.remove(request);
    this.outstanding--;
    assert(this.outstanding >= 0, "outstanding count non-negative");
  }

  /** Its dependents wait for one request less; those left waiting for none become ready. */
  private release(request: EngineRequest): void {
    const dependents = request.dependents;
    for (let index = 0; index < dependents.length; index++) {
      const other = dependents[index];
      other.blockers--;
      assert(other.blockers >= 0, "blocker count non-negative");
      if (other.blockers === 0 && other.state === stateWaiting) {
        this.waitingCount--;
        this.makeReady(other);
      }
    }
    dependents.length = 0;
  }

  private recycle(request: EngineRequest): void {
    assert(request.dependents.length === 0, "a recycled request has no dependents left");
    request.state = stateFree;
    request.buf = null;
    request.callback = null;
    request.blockers = 0;
    request.groupNext = null;
    request.mergedBuf = null;
    request.mergedBacking = null;
    request.parent = null;
    request.error = null;
    request.splitHoles = null;
    request.splitHolesUnknown = false;
    request.piecesPending = 0;
    if (this.free.length < engineFreeRequestsMax) this.free.push(request);
  }

  private afterCompletion(): void {
    if ((this.ready.count > 0 || this.splitting.length > 0) && this.inflightCount < this.current.queueDepth) {
      this.scheduleDispatch();
    }
    if (this.closeDone !== null && this.outstanding === 0) this.closeDevice();
  }

  private closeDevice(): void {
    const done = this.closeDone as Done;
    this.closeDone = null;
    this.closed = true;
    assert(this.inflightCount === 0 && this.waitingCount === 0 && this.ready.count === 0, "drained");
    this.device.close(done);
  }

  private assertOpen(): void {
    assert(!this.closed && this.closeDone === null, "verb after close");
  }

  private effectiveSorting(settings: EngineSettings): boolean {
    return settings.sort === "on" || (settings.sort === "auto" && this.device.capabilities.rotational);
  }
}
