/**
 * CrashDevice: a simulated disk with a volatile write cache that can lose power, for proving the crash
 * safety of vdisk's storage code (after TigerBeetle's simulated storage: deterministic, seeded).
 *
 * State:
 * - `durable`: the medium, a dense Buffer of `size` bytes — what survives a power cut;
 * - `volatile`: what reads see — the medium with every not-yet-durable operation applied;
 * - `log`: the operations that completed but are not durable yet, in the order they executed. An entry
 *   holds, for each 512-byte sector (`sectorBytes`) the operation touched, the sector's whole content just
 *   after it ran, because a disk persists whole sectors: a partial-sector write reaches the medium as a
 *   read-modify-write of the cached sector. An all-zero aligned run is stored as `null`, not as bytes;
 * - `inflight`: requests submitted whose callback has not run yet, in submission order.
 *
 * Invariant (checkInvariants): volatile == durable with the runs of `log` applied in order.
 *
 * Timing: each request executes atomically on the volatile view just before its callback, on a
 * setImmediate after 0–2 extra event-loop turns drawn from the prng (`reorder: false`: no extra turns, so
 * requests complete in submission order). Concurrent requests thus complete and take effect in a
 * scrambled order, as on a real queue. A write reads its buffer when it executes, not when submitted, so
 * a caller that reuses a buffer before the callback is caught.
 *
 * Durability:
 * - `flush` makes durable every operation that executed (completed) before `flush` was called — the
 *   prefix of the log as it stood then — and nothing submitted after. It takes effect when it completes.
 * - a FUA write/zero/trim makes its own sectors durable when it completes, and nothing else; earlier log
 *   entries lose those sectors (a cache never lets an older copy of a sector overwrite a newer one).
 * - `resize` changes both views at once, synchronously (like an ftruncate the file system journals);
 *   bytes past the old end read as zeros; log entries are clipped to a smaller size.
 *
 * Power loss (`crash`): requests still in flight execute now (in submission order, FUA ignored), so they
 * too are pending; each pending operation then independently lands on the medium or is lost, in log
 * order; with `tear` one (or every) operation lands only on a random subset of its sectors. The volatile
 * view is discarded, every in-flight callback gets IO_ERROR "device crashed" (in submission order; one
 * failed by injection keeps its error), as does every later request. `reopen()` returns a new CrashDevice over the surviving medium.
 * A harness that mirrors requests in a model (ModelDisk) applies a request when its callback runs,
 * including requests that fail because of the crash (they may have landed) — but not requests submitted
 * when `crashed` was already true, nor requests failed by injection (those never execute).
 *
 * Fault injection: `failNext(verb, error)` and `errorRate` fail requests with IO_ERROR (or the given
 * error) without executing them. `crashAfter(n)` cuts power as the n-th next write/zero/trim/flush is
 * submitted; that request is then in flight and may or may not land.
 *
 * Capabilities: flush, fua, trim, zero, cache, multiConn; no fastZero (ZeroFlags.FAST fails with
 * NOT_SUPPORTED), no extents (blockStatus reports one DATA extent). Reads report holes as unknown (null).
 */
import { assert, type ErrorCode, VdiskError } from "../errors";
import { MiB } from "../limits";
import {
  type BlockDevice,
  type Capabilities,
  type DeviceUsage,
  type Done,
  ExtentFlags,
  type ExtentsDone,
  type ReadDone,
  ZeroFlags,
} from "../devices/block-device";
import type { Prng } from "./prng";

/** The medium is dense: two Buffers of the device's size. Test disks are small. */
export const crashDeviceBytesMax = 256 * MiB;
/** Extra event-loop turns before a request completes, at most (reorder mode). */
export const crashDeviceDelayTurnsMax = 2;

export type CrashDeviceVerb =
  "read" | "write" | "zero" | "trim" | "flush" | "cache" | "blockStatus" | "resize";

export interface CrashDeviceOptions {
  /** All randomness (delays, injected errors, crash outcomes) comes from here. */
  prng: Prng;
  /** Unit of atomicity on the medium; 512 by default. */
  sectorBytes?: number;
  /** Scramble completion order among concurrent requests (default true). */
  reorder?: boolean;
  /** Probability that a read/write/zero/trim/flush fails with an injected IO_ERROR (default 0). */
  errorRate?: number;
  /** Initial content of the medium (copied); its length is the size. */
  image?: Buffer;
}

export interface CrashMode {
  /** Probability that each pending operation (or, with tear "any", each of its sectors) lands. Default 0.5. */
  land?: number;
  /**
   * "none": operations land whole or not at all; "last": the last pending operation lands on a random
   * strict subset of its sectors (when it has two or more); "any": every sector of every pending operation
   * lands independently. Default: "last" with probability 1/4, else "none" (always "none" when `land` is
   * 0 or 1).
   */
  tear?: "none" | "last" | "any";
}

export interface CrashReport {
  /** Operations not durable at the instant of the crash (completed but unflushed, and in flight). */
  pendingOperations: number;
  landedOperations: number;
  lostOperations: number;
  /** Operations that reached the medium only in part (some of their sectors, not all). */
  tornOperations: number;
}

/** Whole sectors [offset, offset + length) (the last one clipped at the end); `data` null = zeros. */
interface SectorRun {
  offset: number;
  length: number;
  data: Buffer | null;
}

interface LoggedOperation {
  /** Execution number: the log is ordered by it. */
  executed: number;
  runs: SectorRun[];
}

interface Mutation {
  offset: number;
  length: number;
  /** null: zeros. */
  data: Buffer | null;
  fua: boolean;
}

interface Request {
  id: number;
  verb: CrashDeviceVerb;
  mutation: Mutation | null;
  failure: VdiskError | null;
  settled: boolean;
  /** Executes the request on the volatile view; runs at most once, right before `finish(null)`. */
  run: () => void;
  /** Calls the caller's callback. */
  finish: (err: VdiskError | null) => void;
}

const crashMessage = "device crashed";

export class CrashDevice implements BlockDevice {
  readonly kind = "crash";
  readonly capabilities: Capabilities = {
    readOnly: false,
    flush: true,
    fua: true,
    trim: true,
    zero: true,
    fastZero: false,
    multiConn: true,
    cache: true,
    rotational: false,
    extents: false,
  };
  readonly sectorBytes: number;
  readonly prng: Prng;
  readonly reorder: boolean;
  readonly errorRate: number;

  /** write/zero/trim requests accepted (including ones that then failed); not those refused after a crash. */
  writes = 0;
  /** flush requests accepted. */
  flushes = 0;

  private durable: Buffer;
  private volatile: Buffer;
  private log: LoggedOperation[] = [];
  private readonly inflight = new Map<number, Request>();
  private readonly injected = new Map<CrashDeviceVerb, VdiskError[]>();
  private nextRequestId = 1;
  /** Mutations executed so far; numbers the log's entries. */
  private executions = 0;
  private crashArmedCountdown = 0;
  private crashArmedMode: CrashMode = {};
  private crashedFlag = false;
  private closed = false;

  constructor(size: number, options: CrashDeviceOptions) {
    assert(
      Number.isSafeInteger(size) && size >= 0 && size <= crashDeviceBytesMax,
      "crash device size out of range",
    );
    const sectorBytes = options.sectorBytes ?? 512;
    assert(
      Number.isSafeInteger(sectorBytes) && sectorBytes >= 1 && (sectorBytes & (sectorBytes - 1)) === 0,
      "sectorBytes is a power of two",
    );
    const errorRate = options.errorRate ?? 0;
    assert(errorRate >= 0 && errorRate <= 1, "errorRate in [0, 1]");
    this.sectorBytes = sectorBytes;
    this.prng = options.prng;
    this.reorder = options.reorder ?? true;
    this.errorRate = errorRate;
    if (options.image !== undefined) {
      assert(options.image.length === size, "image length equals size");
      this.durable = Buffer.from(options.image);
    } else {
      this.durable = Buffer.alloc(size);
    }
    this.volatile = Buffer.from(this.durable);
  }

  /** A device whose medium starts as a copy of `image`. */
  static fromImage(image: Buffer, options: Omit<CrashDeviceOptions, "image">): CrashDevice {
    return new CrashDevice(image.length, { ...options, image });
  }

  get size(): number {
    return this.durable.length; // both views always have the same size
  }

  get crashed(): boolean {
    return this.crashedFlag;
  }

  /** Operations not yet durable: completed but unflushed, plus mutations in flight. */
  get pendingOperations(): number {
    let inflightMutations = 0;
    for (const request of this.inflight.values()) {
      if (request.mutation !== null && request.failure === null) inflightMutations++;
    }
    return this.log.length + inflightMutations;
  }

  /** Requests submitted whose callback has not run. */
  get inflightRequests(): number {
    return this.inflight.size;
  }

  // ---- BlockDevice verbs ----

  read(buf: Buffer, offset: number, done: ReadDone): void {
    this.assertRange(offset, buf.length);
    this.submit(
      "read",
      null,
      () => this.readVolatile(buf, offset),
      (err) => done(err, null),
    );
  }

  write(buf: Buffer, offset: number, fua: boolean, done: Done): void {
    this.assertRange(offset, buf.length);
    this.submit("write", { offset, length: buf.length, data: buf, fua }, null, done);
  }

  zero(offset: number, length: number, flags: number, done: Done): void {
    assert((flags & ~(ZeroFlags.FUA | ZeroFlags.MAY_TRIM | ZeroFlags.FAST)) === 0, "unknown zero flags");
    this.assertRange(offset, length);
    const fua = (flags & ZeroFlags.FUA) !== 0;
    const failure =
      (flags & ZeroFlags.FAST) !== 0
        ? new VdiskError("NOT_SUPPORTED", "crash device: zero is not fast (it writes zeros)")
        : null;
    this.submit("zero", { offset, length, data: null, fua }, null, done, failure);
  }

  trim(offset: number, length: number, fua: boolean, done: Done): void {
    this.assertRange(offset, length);
    this.submit("trim", { offset, length, data: null, fua }, null, done);
  }

  flush(done: Done): void {
    this.assertOpen();
    // Covers what executed (completed) before this call, and nothing that executes after it.
    const throughExecuted = this.executions;
    this.submit("flush", null, () => this.makeDurableThrough(throughExecuted), done);
  }

  cache(offset: number, length: number, done: Done): void {
    this.assertRange(offset, length);
    this.submit("cache", null, () => undefined, done);
  }

  blockStatus(offset: number, length: number, done: ExtentsDone): void {
    this.assertRange(offset, length);
    this.submit(
      "blockStatus",
      null,
      () => undefined,
      (err) =>
        err !== null
          ? done(err)
          : done(null, [
              { length: Math.min(length, Math.max(1, this.size - offset)), flags: ExtentFlags.DATA },
            ]),
    );
  }

  resize(size: number, done: Done): void {
    this.assertOpen();
    assert(
      Number.isSafeInteger(size) && size >= 0 && size <= crashDeviceBytesMax,
      "crash device size out of range",
    );
    if (this.crashedFlag) {
      this.refuse(done);
      return;
    }
    const failure = this.takeInjected("resize");
    if (failure === null) this.resizeNow(size);
    this.later(() => done(failure));
  }

  usage(done: (err: VdiskError | null, usage?: DeviceUsage) => void): void {
    this.assertOpen();
    if (this.crashedFlag) {
      this.refuse(done);
      return;
    }
    const allocatedBytes = this.size;
    this.later(() => done(null, { allocatedBytes }));
  }

  /** Makes everything durable and releases the device. After a crash it just releases it. */
  close(done: Done): void {
    this.assertOpen();
    assert(this.inflight.size === 0, "close with requests in flight");
    this.closed = true;
    if (!this.crashedFlag) this.makeDurableThrough(Number.MAX_SAFE_INTEGER);
    this.later(() => done(null));
  }

  // ---- Simulation controls ----

  /** Cut the power now. See the module comment; returns what happened to the pending operations. */
  crash(mode: CrashMode = {}): CrashReport {
    this.assertOpen();
    assert(!this.crashedFlag, "crash of a crashed device");
    const land = mode.land ?? 0.5;
    assert(land >= 0 && land <= 1, "land probability in [0, 1]");
    const certain = land === 0 || land === 1; // "all lost" / "all landed" stay exactly that by default
    const tear = mode.tear ?? (!certain && this.prng.bool(0.25) ? "last" : "none");
    this.crashedFlag = true;
    this.crashArmedCountdown = 0;

    // Requests in flight: mutations execute now (they were on their way to the cache), then all fail.
    const interrupted = [...this.inflight.values()];
    this.inflight.clear();
    for (const request of interrupted) {
      assert(!request.settled, "an in-flight request is unsettled");
      request.settled = true;
      if (request.mutation !== null && request.failure === null) {
        this.executeMutation({ ...request.mutation, fua: false });
      }
    }

    const report: CrashReport = {
      pendingOperations: this.log.length,
      landedOperations: 0,
      lostOperations: 0,
      tornOperations: 0,
    };
    this.log.forEach((operation, index) => {
      let outcome: "landed" | "lost" | "torn";
      if (tear === "any") {
        outcome = this.landSectors(operation, () => this.prng.bool(land));
      } else if (tear === "last" && index === this.log.length - 1) {
        outcome = this.landTorn(operation);
      } else if (this.prng.bool(land)) {
        for (const run of operation.runs) this.applyRun(this.durable, run);
        outcome = "landed";
      } else {
        outcome = "lost";
      }
      if (outcome === "landed") report.landedOperations++;
      else if (outcome === "lost") report.lostOperations++;
      else report.tornOperations++;
    });
    this.log = [];
    this.volatile = Buffer.alloc(0);

    if (interrupted.length > 0) {
      this.later(() => {
        // An injected failure stands: such a request never executes, crash or not.
        for (const request of interrupted) request.finish(request.failure ?? this.crashError());
      });
    }
    return report;
  }

  /**
   * Arm a crash for the `count`-th write/zero/trim/flush submitted from now on (1 = the next one). The
   * crash happens inside that call, after the request was accepted: it is in flight, so it may land.
   */
  crashAfter(count: number, mode: CrashMode = {}): void {
    this.assertOpen();
    assert(!this.crashedFlag, "crashAfter on a crashed device");
    assert(Number.isSafeInteger(count) && count >= 1, "crashAfter count is a positive integer");
    this.crashArmedCountdown = count;
    this.crashArmedMode = mode;
  }

  /** Fail the next request of `verb` (once per call; calls queue up) without executing it. */
  failNext(verb: CrashDeviceVerb, error: VdiskError | ErrorCode = "IO_ERROR"): void {
    const failure = typeof error === "string" ? new VdiskError(error, `injected ${verb} failure`) : error;
    const queue = this.injected.get(verb) ?? [];
    queue.push(failure);
    this.injected.set(verb, queue);
  }

  /** A new device over what survived on the medium (after a crash or a close): same size, prng, options. */
  reopen(): CrashDevice {
    assert(this.crashedFlag || this.closed, "reopen needs a crashed or closed device");
    return new CrashDevice(this.durable.length, {
      prng: this.prng,
      sectorBytes: this.sectorBytes,
      reorder: this.reorder,
      errorRate: this.errorRate,
      image: this.durable,
    });
  }

  /** A copy of the medium: what a crash with nothing landing would leave. */
  snapshotDurable(): Buffer {
    return Buffer.from(this.durable);
  }

  /** A copy of what reads currently see. */
  snapshotVolatile(): Buffer {
    assert(!this.crashedFlag, "a crashed device has no volatile view");
    return Buffer.from(this.volatile);
  }

  /** Assert the module invariant (volatile == durable + log); O(size), for tests. */
  checkInvariants(): void {
    if (this.crashedFlag) {
      assert(this.log.length === 0 && this.inflight.size === 0, "nothing pending after a crash");
      return;
    }
    assert(this.volatile.length === this.durable.length, "durable and volatile sizes agree");
    const replayed = Buffer.from(this.durable);
    for (const operation of this.log) {
      for (const run of operation.runs) {
        assert(run.offset % this.sectorBytes === 0, "runs start on a sector boundary");
        assert(run.length > 0 && run.offset + run.length <= this.size, "runs lie within the device");
        this.applyRun(replayed, run);
      }
    }
    assert(replayed.equals(this.volatile), "volatile view equals the medium plus the pending log");
  }

  // ---- Internals ----

  /** Accept a request: count it, maybe inject a failure, schedule its completion, maybe crash. */
  private submit(
    verb: CrashDeviceVerb,
    mutation: Mutation | null,
    run: (() => void) | null,
    finish: (err: VdiskError | null) => void,
    failure: VdiskError | null = null,
  ): void {
    if (this.crashedFlag) {
      this.refuse(finish);
      return;
    }
    if (mutation !== null) this.writes++;
    if (verb === "flush") this.flushes++;
    const request: Request = {
      id: this.nextRequestId++,
      verb,
      mutation,
      failure: failure ?? this.takeInjected(verb),
      settled: false,
      run: run ?? (() => undefined),
      finish,
    };
    if (mutation !== null) {
      request.run = () => this.executeMutation(mutation);
    }
    this.inflight.set(request.id, request);
    const turns = this.reorder ? this.prng.int(crashDeviceDelayTurnsMax + 1) : 0;
    this.afterTurns(turns, () => this.complete(request));

    if (this.crashArmedCountdown > 0 && (mutation !== null || verb === "flush")) {
      this.crashArmedCountdown--;
      if (this.crashArmedCountdown === 0) this.crash(this.crashArmedMode);
    }
  }

  private complete(request: Request): void {
    if (request.settled) return; // settled by a crash meanwhile
    request.settled = true;
    assert(!this.crashedFlag, "no completion after a crash");
    const deleted = this.inflight.delete(request.id);
    assert(deleted, "a completing request was in flight");
    if (request.failure !== null) {
      request.finish(request.failure);
      return;
    }
    request.run();
    request.finish(null);
  }

  /** Apply a write/zero/trim to the volatile view and log (or, with FUA, persist) its sectors. */
  private executeMutation(mutation: Mutation): void {
    const start = mutation.offset;
    const end = Math.min(mutation.offset + mutation.length, this.size); // a resize may have shrunk us
    if (start >= end) return;
    const executed = ++this.executions;
    if (mutation.data === null) {
      this.volatile.fill(0, start, end);
    } else {
      assert(mutation.data.length === mutation.length, "write buffer unchanged in length while in flight");
      mutation.data.copy(this.volatile, start, 0, end - start);
    }

    const sector = this.sectorBytes;
    const alignedStart = Math.floor(start / sector) * sector;
    const alignedEnd = Math.min(Math.ceil(end / sector) * sector, this.size);
    const runs: SectorRun[] = [];
    const pushCopy = (from: number, to: number): void => {
      if (from < to)
        runs.push({ offset: from, length: to - from, data: Buffer.from(this.volatile.subarray(from, to)) });
    };
    if (mutation.data === null) {
      const innerStart = Math.ceil(start / sector) * sector;
      const innerEnd = end === this.size ? end : Math.floor(end / sector) * sector;
      if (innerStart < innerEnd) {
        pushCopy(alignedStart, innerStart);
        runs.push({ offset: innerStart, length: innerEnd - innerStart, data: null });
        pushCopy(innerEnd, alignedEnd);
      } else {
        pushCopy(alignedStart, alignedEnd);
      }
    } else {
      pushCopy(alignedStart, alignedEnd);
    }

    if (mutation.fua) {
      for (const run of runs) this.applyRun(this.durable, run);
      this.cutFromLog(alignedStart, alignedEnd);
    } else {
      this.log.push({ executed, runs });
    }
  }

  /** Remove [start, end) from every logged run: a newer durable copy of those sectors exists. */
  private cutFromLog(start: number, end: number): void {
    const kept: LoggedOperation[] = [];
    for (const operation of this.log) {
      const runs: SectorRun[] = [];
      for (const run of operation.runs) {
        const runEnd = run.offset + run.length;
        if (runEnd <= start || run.offset >= end) {
          runs.push(run);
          continue;
        }
        if (run.offset < start) runs.push(sliceRun(run, run.offset, start));
        if (runEnd > end) runs.push(sliceRun(run, end, runEnd));
      }
      if (runs.length > 0) kept.push({ executed: operation.executed, runs });
    }
    this.log = kept;
  }

  /** Persist the log's prefix of operations that executed no later than execution number `throughExecuted`. */
  private makeDurableThrough(throughExecuted: number): void {
    let count = 0;
    while (count < this.log.length && this.log[count].executed <= throughExecuted) {
      for (const run of this.log[count].runs) this.applyRun(this.durable, run);
      count++;
    }
    this.log.splice(0, count);
  }

  private landTorn(operation: LoggedOperation): "landed" | "lost" | "torn" {
    const sectors = this.countSectors(operation);
    const mask: boolean[] = [];
    for (let index = 0; index < sectors; index++) mask.push(this.prng.bool());
    if (sectors >= 2 && mask.every((bit) => bit === mask[0])) {
      const flip = this.prng.int(sectors);
      mask[flip] = !mask[flip];
    }
    let next = 0;
    return this.landSectors(operation, () => mask[next++]);
  }

  /** Land each sector of `operation` for which `lands()` says so; report the overall outcome. */
  private landSectors(operation: LoggedOperation, lands: () => boolean): "landed" | "lost" | "torn" {
    let landed = 0;
    let lost = 0;
    for (const run of operation.runs) {
      for (let from = run.offset; from < run.offset + run.length;) {
        const to = Math.min(
          run.offset + run.length,
          (Math.floor(from / this.sectorBytes) + 1) * this.sectorBytes,
        );
        if (lands()) {
          this.applyRun(this.durable, sliceRun(run, from, to));
          landed++;
        } else {
          lost++;
        }
        from = to;
      }
    }
    return lost === 0 ? "landed" : landed === 0 ? "lost" : "torn";
  }

  private countSectors(operation: LoggedOperation): number {
    let count = 0;
    for (const run of operation.runs) {
      const first = Math.floor(run.offset / this.sectorBytes);
      const last = Math.floor((run.offset + run.length - 1) / this.sectorBytes);
      count += last - first + 1;
    }
    return count;
  }

  private applyRun(target: Buffer, run: SectorRun): void {
    const end = Math.min(run.offset + run.length, target.length);
    if (run.offset >= end) return;
    if (run.data === null) target.fill(0, run.offset, end);
    else run.data.copy(target, run.offset, 0, end - run.offset);
  }

  private readVolatile(buf: Buffer, offset: number): void {
    const end = Math.min(offset + buf.length, this.size); // a resize may have shrunk us
    const copied = offset < end ? this.volatile.copy(buf, 0, offset, end) : 0;
    buf.fill(0, copied);
  }

  private resizeNow(size: number): void {
    const shrinking = size < this.size;
    const resized = (source: Buffer): Buffer => {
      const target = Buffer.alloc(size);
      source.copy(target, 0, 0, Math.min(size, source.length));
      return target;
    };
    this.volatile = resized(this.volatile);
    this.durable = resized(this.durable);
    if (!shrinking) return;
    const kept: LoggedOperation[] = [];
    for (const operation of this.log) {
      const runs = operation.runs
        .filter((run) => run.offset < size)
        .map((run) => (run.offset + run.length <= size ? run : sliceRun(run, run.offset, size)));
      if (runs.length > 0) kept.push({ executed: operation.executed, runs });
    }
    this.log = kept;
  }

  private takeInjected(verb: CrashDeviceVerb): VdiskError | null {
    const queue = this.injected.get(verb);
    if (queue !== undefined && queue.length > 0) return queue.shift() ?? null;
    const random =
      verb === "read" || verb === "write" || verb === "zero" || verb === "trim" || verb === "flush";
    if (random && this.errorRate > 0 && this.prng.bool(this.errorRate)) {
      return new VdiskError("IO_ERROR", `injected ${verb} failure (errorRate ${this.errorRate})`);
    }
    return null;
  }

  private crashError(): VdiskError {
    return new VdiskError("IO_ERROR", crashMessage);
  }

  private refuse(done: (err: VdiskError | null) => void): void {
    this.later(() => done(this.crashError()));
  }

  private later(run: () => void): void {
    setImmediate(run);
  }

  private afterTurns(turns: number, run: () => void): void {
    if (turns === 0) setImmediate(run);
    else setImmediate(() => this.afterTurns(turns - 1, run));
  }

  private assertOpen(): void {
    assert(!this.closed, "verb after close");
  }

  private assertRange(offset: number, length: number): void {
    this.assertOpen();
    assert(Number.isSafeInteger(offset) && offset >= 0, "offset is a non-negative integer");
    assert(Number.isSafeInteger(length) && length > 0, "length is a positive integer");
    assert(this.crashedFlag || offset + length <= this.size, "request within the device");
  }
}

function sliceRun(run: SectorRun, from: number, to: number): SectorRun {
  assert(from >= run.offset && to <= run.offset + run.length && from < to, "slice within the run");
  return {
    offset: from,
    length: to - from,
    data: run.data === null ? null : run.data.subarray(from - run.offset, to - run.offset),
  };
}
