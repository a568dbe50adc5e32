/**
 * PhysicalDevice: one physical device of a storage pool (a directory on one real disk) shared by several
 * files — one sparse file per image family that keeps data on that device — and, when the device is
 * emulated, one modelled disk under all of them: one hdd head, or one set of ssd channels and their host
 * link. Each file gets a `DeviceHandle` (`attach`), a BlockDevice whose requests share the device's
 * timeline and wait in one priority queue in front of it. See docs/devices.md, "Physical devices shared by
 * several files, and priority".
 *
 * model = null (a real device): a handle passes every verb straight to its file; no queue, no model, no
 * callback wrapping. Only the per-priority request counters are kept.
 *
 * Emulated (model given): the DeviceTimeline of latency-device.ts, shared. A handle calls its file when the
 * request is dispatched into the model, so the file sees requests in dispatch order; errors and data are the
 * file's, delivered at the modelled completion.
 * - Positions: attached file number i (0, 1, 2, ... in attach order) maps its offset o to the modelled
 *   position (i · slotBytes + o) mod modelBytes, slotBytes = modelBytes / 16 rounded down to 4 KiB. An
 *   approximation: each file lives in its own region of the platter (from file 16 on, regions wrap around
 *   onto earlier files'), while real file systems scatter and interleave files. The file itself gets the
 *   real offset o; a request running past the end of the model is costed as if the device went on.
 * - Queue: at most `inflightMax` requests are in the model at once (default: hdd 1, ssd its channels,
 *   fixed unlimited). Others wait in three FIFOs, one per priority. A request leaves the model at its
 *   modelled completion, even if its file is still working (a real fdatasync under an emulated disk must
 *   not hold the modelled head); it is called back once both are done. When a request leaves the model, the
 *   next dispatched is the oldest of the highest priority present (realtime > normal > background), except
 *   that once the oldest waiting request has waited more than `priorityAgingMs` it goes first, whatever its
 *   priority (aged requests leave in age order, so none starves). The freed slot is refilled before the
 *   completed request is called back, so a request submitted from a callback queues behind those waiting.
 *   A dispatched request arrives in the model at max(its submission, the freed request's modelled
 *   completion): on the real clock, scheduler lateness does not accumulate along a backlog.
 * - Verbs: read, write, zero, trim, flush, cache go through the queue and the model (costs as in
 *   LatencyDevice); flush is an ordinary command (it covers writes completed before it because each handle
 *   has one file and passes the flush to it). blockStatus, usage and resize go straight to the file.
 *   readNoWait declines (nothing bypasses the model). Since a queued request reaches its file later, the
 *   handle asserts the file's preconditions (range, read-only, zero flags) when the request is submitted;
 *   shrinking a file (resize) under its own queued requests is the caller's bug, caught at dispatch.
 * - Wait times (stats) are in the timeline's clock: real µs, or simulated µs.
 *
 * Invariants: every callback exactly once, never synchronously (the file's callbacks are async; deliveries
 * come from timers or immediates); requests queued > 0 only while inflightMax are in the model; requests
 * outstanding on one device (queued + in model) <= latencyOutstandingMax; files attached <=
 * physicalHandlesMax; a handle's close waits for its outstanding requests, then closes its file; no verb on
 * a handle after its close.
 */
import { assert, VdiskError } from "../errors";
import {
  type BlockDevice,
  type Capabilities,
  type DeviceUsage,
  type Done,
  type ExtentsDone,
  type ReadDone,
  ZeroFlags,
} from "./block-device";
import {
  Cost,
  DeviceTimeline,
  type LatencyModel,
  latencyOutstandingMax,
  type LatencyStats,
  ModelRequest,
  type ResolvedLatencyModel,
} from "./latency-device";

// ---------------------------------------------------------------------------------------------------------
// Priorities and limits

export type Priority = "realtime" | "normal" | "background";
/** Highest first: the dispatch order. */
export const priorities: readonly Priority[] = Object.freeze(["realtime", "normal", "background"]);

/** A request that has waited longer than this is dispatched before any younger one, whatever its priority. */
export const priorityAgingMs = 500;
/** Files attached to one physical device, at most. */
export const physicalHandlesMax = 4096;
/** Regions of the modelled device: file i starts at region i mod this. */
export const physicalRegionCount = 16;
/** Regions are whole multiples of this. */
export const physicalRegionAlignBytes = 4096;
/** The smallest modelled device: one aligned region per file slot. */
export const physicalModelBytesMin = physicalRegionCount * physicalRegionAlignBytes;
/** The largest modelled device (1 PiB; positions stay exact integers far below 2^53). */
export const physicalModelBytesMax = 2 ** 50;

assert(priorities.length === 3, "three priorities");
assert(physicalModelBytesMin <= physicalModelBytesMax, "model size bounds ordered");
assert(physicalModelBytesMax * 2 < Number.MAX_SAFE_INTEGER, "region start + file offset stays exact");
assert(physicalHandlesMax <= latencyOutstandingMax, "handles bounded by requests");

const priorityAgingUs = priorityAgingMs * 1000;

function invalid(message: string): VdiskError {
  return new VdiskError("INVALID_ARGUMENT", message);
}

/** The rank of a priority: 0 realtime, 1 normal, 2 background. INVALID_ARGUMENT on anything else. */
function rankOf(priority: Priority): number {
  const rank = priorities.indexOf(priority);
  if (rank < 0) throw invalid(`unknown priority "${String(priority)}"; priorities: ${priorities.join(", ")}`);
  return rank;
}

// ---------------------------------------------------------------------------------------------------------
// Public types

export interface PhysicalDeviceOptions {
  /** null: no emulation (a real device): handles pass every verb straight through, no queue, zero overhead. */
  model: LatencyModel | null;
  /** "real" (default) or "simulated" (see LatencyDevice); ignored when model is null. */
  clock?: "real" | "simulated";
  /**
   * Bytes of the modelled device (hdd seek distances are fractions of this), in
   * [physicalModelBytesMin, physicalModelBytesMax]. Ignored when model is null.
   */
  modelBytes: number;
  /**
   * Requests in the model at once; further ones wait in the priority queue. Default by model: hdd 1,
   * ssd = channels, fixed = unlimited (no queue). In [1, latencyOutstandingMax]; refused when model is null.
   */
  inflightMax?: number;
}

export interface PriorityStats {
  /** Requests submitted at this priority (every verb but blockStatus, usage, resize, readNoWait). */
  requests: number;
  /** Sum and maximum of the time requests waited in the queue before entering the model (µs). */
  waitUsTotal: number;
  waitUsMax: number;
}

export interface PhysicalDeviceStats {
  /** Files attached. */
  handles: number;
  /** Requests submitted through all handles (the sum over priorities). */
  requests: number;
  /** Requests in the model now. */
  inflight: number;
  /** Requests waiting in the priority queue now, and at most. */
  queued: number;
  queuedMax: number;
  /** Requests dispatched ahead of a higher priority because they had waited over priorityAgingMs. */
  agedDispatches: number;
  byPriority: Record<Priority, PriorityStats>;
  /** The shared model's statistics; null when model is null. */
  latency: LatencyStats | null;
}

/** One file on a physical device, as a BlockDevice. */
export interface DeviceHandle extends BlockDevice {
  /** Settable at any time; applies to requests submitted afterwards (INVALID_ARGUMENT on a bad value). */
  priority: Priority;
  /** Attach order on its device: 0, 1, 2, ... (fixes its region of the modelled device). */
  readonly fileIndex: number;
}

// ---------------------------------------------------------------------------------------------------------
// The queue

const enum Verb {
  Read,
  Write,
  Zero,
  Trim,
  Flush,
  Cache,
}

/** One request of a handle: waits in the queue, then is the timeline's request. */
class PhysicalRequest extends ModelRequest {
  /** Submission order on the device: the age order for FIFO and aging. */
  order = 0;
  /** When it was submitted (timeline clock, µs). */
  submittedUs = 0;

  constructor(
    readonly handle: ModelledHandle,
    readonly verb: Verb,
    readonly buf: Buffer | null,
    readonly offset: number,
    readonly length: number,
    /** Zero: its flags; write and trim: 1 for FUA, else 0. */
    readonly flags: number,
    readonly rank: number,
    readonly done: ReadDone,
  ) {
    super();
  }

  override due(): void {
    this.handle.dispatcher.slotFreed(this);
  }

  completed(): void {
    this.handle.dispatcher.completed(this);
  }
}

/** A FIFO of requests: an array with a moving head, compacted once the consumed half dominates. */
class RequestFifo {
  private items: (PhysicalRequest | undefined)[] = [];
  private head = 0;

  get length(): number {
    return this.items.length - this.head;
  }

  peek(): PhysicalRequest | undefined {
    return this.items[this.head];
  }

  push(request: PhysicalRequest): void {
    this.items.push(request);
  }

  shift(): PhysicalRequest {
    const request = this.items[this.head];
    assert(request !== undefined, "shift from an empty queue");
    this.items[this.head] = undefined;
    this.head++;
    if (this.head === this.items.length) {
      this.items = [];
      this.head = 0;
    } else if (this.head >= 1024 && this.head * 2 >= this.items.length) {
      this.items.splice(0, this.head);
      this.head = 0;
    }
    return request;
  }
}

/** The device's shared state: the timeline (null for a real device), the queue and the counters. */
class Dispatcher {
  readonly timeline: DeviceTimeline | null;
  readonly modelBytes: number;
  readonly slotBytes: number;
  readonly inflightMax: number;
  handles = 0;
  private inflight = 0;
  private queued = 0;
  private queuedMax = 0;
  private agedDispatches = 0;
  private nextOrder = 0;
  private readonly queues: RequestFifo[] = priorities.map(() => new RequestFifo());
  private readonly byRank: PriorityStats[] = priorities.map(() => ({
    requests: 0,
    waitUsTotal: 0,
    waitUsMax: 0,
  }));

  constructor(options: PhysicalDeviceOptions) {
    if (options === null || typeof options !== "object")
      throw invalid("physical device options are an object");
    const clock = options.clock ?? "real";
    if (clock !== "real" && clock !== "simulated") throw invalid(`unknown clock "${String(clock)}"`);
    if (options.model === null) {
      if (options.inflightMax !== undefined) throw invalid("inflightMax needs a latency model");
      this.timeline = null;
      this.modelBytes = 0;
      this.slotBytes = 0;
      this.inflightMax = 0;
      return;
    }
    const modelBytes = options.modelBytes;
    if (
      !Number.isSafeInteger(modelBytes) ||
      modelBytes < physicalModelBytesMin ||
      modelBytes > physicalModelBytesMax
    ) {
      throw invalid(
        `modelBytes must be an integer in [${physicalModelBytesMin}, ${physicalModelBytesMax}], ` +
          `got ${String(modelBytes)}`,
      );
    }
    this.timeline = new DeviceTimeline(options.model, clock, null);
    const model: ResolvedLatencyModel = this.timeline.model;
    this.modelBytes = modelBytes;
    this.slotBytes =
      Math.floor(modelBytes / physicalRegionCount / physicalRegionAlignBytes) * physicalRegionAlignBytes;
    const inflightMax =
      options.inflightMax ??
      (model.kind === "hdd" ? 1 : model.kind === "ssd" ? model.channels : latencyOutstandingMax);
    if (!Number.isSafeInteger(inflightMax) || inflightMax < 1 || inflightMax > latencyOutstandingMax) {
      throw invalid(
        `inflightMax must be an integer in [1, ${latencyOutstandingMax}], got ${String(inflightMax)}`,
      );
    }
    this.inflightMax = inflightMax;
    assert(this.slotBytes > 0 && this.slotBytes * physicalRegionCount <= modelBytes, "regions fit");
  }

  /** A pass-through request (model null): counted, nothing else. */
  countPassThrough(rank: number): void {
    this.byRank[rank].requests++;
  }

  /** Where file `fileIndex`'s offset 0 lies in the model: (fileIndex · slotBytes) mod modelBytes, exactly. */
  regionStartBytes(fileIndex: number): number {
    assert(this.timeline !== null, "regions exist only on a modelled device");
    assert(Number.isSafeInteger(fileIndex) && fileIndex >= 0, "file index");
    return Number((BigInt(fileIndex) * BigInt(this.slotBytes)) % BigInt(this.modelBytes));
  }

  /** The modelled position of a file offset, given the file's region start. */
  modelPosition(regionStartBytes: number, offsetBytes: number): number {
    const position = regionStartBytes + offsetBytes;
    assert(Number.isSafeInteger(position) && offsetBytes >= 0, "positions are exact integers");
    return position % this.modelBytes;
  }

  submit(request: PhysicalRequest): void {
    const timeline = this.timeline;
    assert(timeline !== null, "a modelled request on a device without a model");
    assert(this.inflight + this.queued < latencyOutstandingMax, "too many outstanding requests");
    if (this.inflight < this.inflightMax) {
      assert(this.queued === 0, "requests wait only while the model is full");
      this.dispatch(request, undefined); // may throw (the file's assertions) and leave no trace
    } else {
      request.submittedUs = timeline.clockUs();
      this.queues[request.rank].push(request);
      this.queued++;
      if (this.queued > this.queuedMax) this.queuedMax = this.queued;
    }
    request.order = this.nextOrder++;
    this.byRank[request.rank].requests++;
  }

  /**
   * Called by a request at its modelled completion: the modelled device is done with it, so its slot is
   * refilled now, even if its file has not answered yet — the file's own time (page cache, a real
   * fdatasync under an emulated device) is not the modelled device's, and must not hold the head.
   */
  slotFreed(request: PhysicalRequest): void {
    assert(this.inflight > 0, "in-flight count");
    this.inflight--;
    // Bounded by inflightMax: one slot was freed, so this runs at most once.
    while (this.queued > 0 && this.inflight < this.inflightMax) {
      const next = this.takeNext(request.dueUs);
      this.dispatch(next, Math.max(next.submittedUs, request.dueUs));
    }
  }

  /** Called by a request once it is both due and answered by its file: call back. */
  completed(request: PhysicalRequest): void {
    request.handle.requestFinished();
    request.done(request.err, request.holes);
  }

  /** The next request to dispatch at `nowUs`: the oldest once it has aged, else the oldest of the highest priority. */
  private takeNext(nowUs: number): PhysicalRequest {
    let oldest: PhysicalRequest | undefined;
    let highestRank = -1;
    for (let rank = 0; rank < this.queues.length; rank++) {
      const head = this.queues[rank].peek();
      if (head === undefined) continue;
      if (highestRank < 0) highestRank = rank;
      if (oldest === undefined || head.order < oldest.order) oldest = head;
    }
    assert(oldest !== undefined && highestRank >= 0, "a request is waiting");
    let rank = highestRank;
    if (nowUs - oldest.submittedUs > priorityAgingUs && oldest.rank !== highestRank) {
      rank = oldest.rank;
      this.agedDispatches++;
    }
    this.queued--;
    return this.queues[rank].shift();
  }

  /** Call the file and enter the model; `arrivalUs` undefined = now (the request never waited). */
  private dispatch(request: PhysicalRequest, arrivalUs: number | undefined): void {
    const timeline = this.timeline;
    assert(timeline !== null, "dispatch without a model");
    const inner = request.handle.inner;
    let cost: Cost;
    let lengthBytes = request.length;
    switch (request.verb) {
      case Verb.Read: {
        const buf = request.buf;
        assert(buf !== null, "a read has a buffer");
        inner.read(buf, request.offset, request.onInner);
        cost = Cost.Read;
        break;
      }
      case Verb.Write: {
        const buf = request.buf;
        assert(buf !== null, "a write has a buffer");
        inner.write(buf, request.offset, request.flags !== 0, request.onInner);
        cost = Cost.Write;
        break;
      }
      case Verb.Zero:
        inner.zero(request.offset, request.length, request.flags, request.onInner);
        // hdd writes the zeros; ssd deallocates (a command), as in LatencyDevice.
        cost = timeline.model.kind === "hdd" ? Cost.Write : Cost.Command;
        break;
      case Verb.Trim:
        inner.trim(request.offset, request.length, request.flags !== 0, request.onInner);
        cost = Cost.Command;
        lengthBytes = 0;
        break;
      case Verb.Flush:
        inner.flush(request.onInner);
        cost = Cost.Command;
        lengthBytes = 0;
        break;
      case Verb.Cache:
        inner.cache(request.offset, request.length, request.onInner);
        cost = Cost.Read;
        break;
      default:
        throw new Error(`invariant violated: unknown verb ${String(request.verb)}`);
    }
    this.inflight++;
    assert(this.inflight <= this.inflightMax, "in-flight requests bounded by inflightMax");
    const position = this.modelPosition(request.handle.regionStartBytes, request.offset);
    const arrivedUs = timeline.submit(request, cost, position, lengthBytes, this.modelBytes, arrivalUs);
    if (arrivalUs === undefined) {
      request.submittedUs = arrivedUs;
      return;
    }
    const waitUs = arrivedUs - request.submittedUs;
    assert(waitUs >= 0, "a request enters the model after its submission");
    const stats = this.byRank[request.rank];
    stats.waitUsTotal += waitUs;
    if (waitUs > stats.waitUsMax) stats.waitUsMax = waitUs;
  }

  stats(): PhysicalDeviceStats {
    const byPriority = {} as Record<Priority, PriorityStats>;
    let requests = 0;
    for (let rank = 0; rank < priorities.length; rank++) {
      byPriority[priorities[rank]] = { ...this.byRank[rank] };
      requests += this.byRank[rank].requests;
    }
    return {
      handles: this.handles,
      requests,
      inflight: this.inflight,
      queued: this.queued,
      queuedMax: this.queuedMax,
      agedDispatches: this.agedDispatches,
      byPriority,
      latency: this.timeline === null ? null : this.timeline.stats(),
    };
  }
}

// ---------------------------------------------------------------------------------------------------------
// Handles

/** A file on an emulated device: every data verb goes through the queue and the shared model. */
class ModelledHandle implements DeviceHandle {
  readonly kind: string;
  /** (fileIndex · slotBytes) mod modelBytes: where this file's offset 0 lies in the model. */
  readonly regionStartBytes: number;
  /** The file's, fixed for its lifetime (read on every write, so not through a capabilities getter). */
  private readonly readOnly: boolean;
  private rank: number;
  private outstanding = 0;
  private closed = false;
  private closeDone: Done | null = null;

  constructor(
    readonly dispatcher: Dispatcher,
    readonly inner: BlockDevice,
    readonly fileIndex: number,
    priority: Priority,
  ) {
    const timeline = dispatcher.timeline;
    assert(timeline !== null, "a modelled handle needs a model");
    this.kind = `${inner.kind}+${timeline.model.kind}`;
    this.regionStartBytes = dispatcher.regionStartBytes(fileIndex);
    this.readOnly = inner.capabilities.readOnly;
    this.rank = rankOf(priority);
  }

  get priority(): Priority {
    return priorities[this.rank];
  }

  set priority(priority: Priority) {
    this.rank = rankOf(priority);
  }

  get size(): number {
    return this.inner.size;
  }

  /** The file's capabilities; rotational as the model says (fixed: the file's). */
  get capabilities(): Capabilities {
    const capabilities = { ...this.inner.capabilities };
    const timeline = this.dispatcher.timeline;
    assert(timeline !== null, "a modelled handle needs a model");
    if (timeline.model.kind !== "fixed") capabilities.rotational = timeline.model.kind === "hdd";
    return capabilities;
  }

  read(buf: Buffer, offset: number, done: ReadDone): void {
    this.submit(Verb.Read, buf, offset, buf.length, 0, done);
  }

  /** No path past the model: always declines. */
  readNoWait(_buf: Buffer, _offset: number): boolean {
    assert(!this.closed, "verb after close");
    return false;
  }

  write(buf: Buffer, offset: number, fua: boolean, done: Done): void {
    this.submit(Verb.Write, buf, offset, buf.length, fua ? 1 : 0, done);
  }

  zero(offset: number, length: number, flags: number, done: Done): void {
    this.submit(Verb.Zero, null, offset, length, flags, done);
  }

  trim(offset: number, length: number, fua: boolean, done: Done): void {
    this.submit(Verb.Trim, null, offset, length, fua ? 1 : 0, done);
  }

  flush(done: Done): void {
    this.submit(Verb.Flush, null, 0, 0, 0, done);
  }

  cache(offset: number, length: number, done: Done): void {
    this.submit(Verb.Cache, null, offset, length, 0, done);
  }

  blockStatus(offset: number, length: number, done: ExtentsDone): void {
    assert(!this.closed, "verb after close");
    this.inner.blockStatus(offset, length, done);
  }

  resize(size: number, done: Done): void {
    assert(!this.closed, "verb after close");
    this.inner.resize(size, done);
  }

  usage(done: (err: VdiskError | null, usage?: DeviceUsage) => void): void {
    assert(!this.closed, "verb after close");
    this.inner.usage(done);
  }

  /** Waits for this handle's outstanding requests (queued or in the model), then closes the file. */
  close(done: Done): void {
    assert(!this.closed, "closed twice");
    this.closed = true;
    this.closeDone = done;
    if (this.outstanding === 0) this.closeInner();
  }

  /** Called by the dispatcher when one of this handle's requests completes, before its callback. */
  requestFinished(): void {
    assert(this.outstanding > 0, "outstanding count");
    this.outstanding--;
    if (this.closeDone !== null && this.outstanding === 0) this.closeInner();
  }

  private closeInner(): void {
    const done = this.closeDone;
    assert(done !== null, "close pending");
    this.closeDone = null;
    this.inner.close(done);
  }

  private submit(
    verb: Verb,
    buf: Buffer | null,
    offset: number,
    length: number,
    flags: number,
    done: ReadDone,
  ): void {
    // The file is called only at dispatch, maybe from a timer: assert its preconditions here, so a bad
    // request throws at the caller, as a device's own assertions do.
    assert(!this.closed, "verb after close");
    if (verb !== Verb.Flush) {
      assert(Number.isSafeInteger(offset) && offset >= 0, "offset is a non-negative integer");
      assert(Number.isSafeInteger(length) && length > 0, "length is a positive integer");
      assert(offset + length <= this.inner.size, "request within the file");
    }
    if (verb === Verb.Write || verb === Verb.Zero || verb === Verb.Trim) {
      assert(!this.readOnly, "write to a read-only file");
    }
    if (verb === Verb.Zero) {
      assert((flags & ~(ZeroFlags.FUA | ZeroFlags.MAY_TRIM | ZeroFlags.FAST)) === 0, "unknown zero flags");
    }
    this.dispatcher.submit(new PhysicalRequest(this, verb, buf, offset, length, flags, this.rank, done));
    this.outstanding++; // after: a request the file refused at once (it threw) is not outstanding
  }
}

/** A file on a real device: every verb goes straight to it; only the request count is kept. */
class PassThroughHandle implements DeviceHandle {
  readonly kind: string;
  private rank: number;

  constructor(
    private readonly dispatcher: Dispatcher,
    private readonly inner: BlockDevice,
    readonly fileIndex: number,
    priority: Priority,
  ) {
    this.kind = inner.kind;
    this.rank = rankOf(priority);
  }

  get priority(): Priority {
    return priorities[this.rank];
  }

  set priority(priority: Priority) {
    this.rank = rankOf(priority);
  }

  get size(): number {
    return this.inner.size;
  }

  get capabilities(): Capabilities {
    return this.inner.capabilities;
  }

  read(buf: Buffer, offset: number, done: ReadDone): void {
    this.inner.read(buf, offset, done);
    this.dispatcher.countPassThrough(this.rank);
  }

  readNoWait(buf: Buffer, offset: number): boolean {
    return this.inner.readNoWait !== undefined && this.inner.readNoWait(buf, offset);
  }

  write(buf: Buffer, offset: number, fua: boolean, done: Done): void {
    this.inner.write(buf, offset, fua, done);
    this.dispatcher.countPassThrough(this.rank);
  }

  zero(offset: number, length: number, flags: number, done: Done): void {
    this.inner.zero(offset, length, flags, done);
    this.dispatcher.countPassThrough(this.rank);
  }

  trim(offset: number, length: number, fua: boolean, done: Done): void {
    this.inner.trim(offset, length, fua, done);
    this.dispatcher.countPassThrough(this.rank);
  }

  flush(done: Done): void {
    this.inner.flush(done);
    this.dispatcher.countPassThrough(this.rank);
  }

  cache(offset: number, length: number, done: Done): void {
    this.inner.cache(offset, length, done);
    this.dispatcher.countPassThrough(this.rank);
  }

  blockStatus(offset: number, length: number, done: ExtentsDone): void {
    this.inner.blockStatus(offset, length, done);
  }

  resize(size: number, done: Done): void {
    this.inner.resize(size, done);
  }

  usage(done: (err: VdiskError | null, usage?: DeviceUsage) => void): void {
    this.inner.usage(done);
  }

  close(done: Done): void {
    this.inner.close(done);
  }
}

// ---------------------------------------------------------------------------------------------------------
// The device

export class PhysicalDevice {
  /** The resolved model (defaults filled in), or null for a real device. */
  readonly model: ResolvedLatencyModel | null;
  readonly clock: "real" | "simulated";
  /** Bytes of the modelled device, and of each file's region in it (0 when model is null). */
  readonly modelBytes: number;
  readonly slotBytes: number;
  /** Requests in the model at once (0 when model is null: no queue). */
  readonly inflightMax: number;
  private readonly dispatcher: Dispatcher;

  constructor(options: PhysicalDeviceOptions) {
    this.dispatcher = new Dispatcher(options);
    const timeline = this.dispatcher.timeline;
    this.model = timeline === null ? null : timeline.model;
    this.clock = timeline === null ? (options.clock ?? "real") : timeline.clock;
    this.modelBytes = this.dispatcher.modelBytes;
    this.slotBytes = this.dispatcher.slotBytes;
    this.inflightMax = this.dispatcher.inflightMax;
  }

  /** A BlockDevice over `inner` (one file on this device) whose requests share this device's timeline and queue. */
  attach(inner: BlockDevice, priority: Priority = "normal"): DeviceHandle {
    const dispatcher = this.dispatcher;
    if (dispatcher.handles >= physicalHandlesMax) {
      throw new VdiskError("LIMIT", `a physical device holds at most ${physicalHandlesMax} files`);
    }
    rankOf(priority); // INVALID_ARGUMENT before the file number is taken
    const fileIndex = dispatcher.handles++;
    return dispatcher.timeline === null
      ? new PassThroughHandle(dispatcher, inner, fileIndex, priority)
      : new ModelledHandle(dispatcher, inner, fileIndex, priority);
  }

  /**
   * The modelled position of offset `offsetBytes` of the file attached `fileIndex`-th:
   * (fileIndex · slotBytes + offsetBytes) mod modelBytes. Model only.
   */
  modelPosition(fileIndex: number, offsetBytes: number): number {
    const dispatcher = this.dispatcher;
    return dispatcher.modelPosition(dispatcher.regionStartBytes(fileIndex), offsetBytes);
  }

  stats(): PhysicalDeviceStats {
    return this.dispatcher.stats();
  }
}
