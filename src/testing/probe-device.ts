/**
 * ProbeDevice: a BlockDevice filter for testing the layer above a device (the request engine). It
 * records every request the layer issues, counts requests in flight and their high-water mark, and flags
 * an ordering bug the moment it happens: two requests in flight at once whose ranges overlap where at
 * least one of them mutates (write, zero, trim; resize overlaps everything). It can also delay and
 * reorder completions, fail requests, pose as a rotational disk, and offer `readNoWait`.
 *
 * Timing: a request is forwarded to the inner device only after its delay — `delayMs[verb]` milliseconds
 * (setTimeout), or 0..`delayTurnsMax` event-loop turns drawn from `prng` — so concurrent requests really
 * take effect in a scrambled order, as on a device with a deep queue. Its callback runs when the inner
 * device's does. Without either option requests are forwarded inside the call.
 *
 * readNoWait (`noWait: true`; misses need `prng`): answers from a dense mirror of the inner device's bytes,
 * updated as mutations are forwarded (the inner device must apply them inside the call, as MemoryDevice
 * does); it declines at random (`noWaitMissRate`, half the time by default), like a page-cache probe
 * that misses.
 */
import { assert, VdiskError, type ErrorCode } from "../errors";
import { MiB } from "../limits";
import type {
  BlockDevice,
  Capabilities,
  DeviceUsage,
  Done,
  ExtentsDone,
  ReadDone,
} from "../devices/block-device";
import type { Prng } from "./prng";

/** The mirror behind readNoWait is dense: probe devices with it are small. */
export const probeMirrorBytesMax = 64 * MiB;

export type ProbeVerb = "read" | "write" | "zero" | "trim" | "flush" | "cache" | "blockStatus" | "resize";

export interface ProbeOptions {
  /** Delay before forwarding, per verb, in milliseconds (setTimeout). */
  delayMs?: Partial<Record<ProbeVerb, number>>;
  /** Random delays of 0..delayTurnsMax loop turns (default 3) and readNoWait misses come from here. */
  prng?: Prng;
  delayTurnsMax?: number;
  /** Override the inner device's `rotational` capability. */
  rotational?: boolean;
  /** Offer readNoWait from a mirror (see the module comment). */
  noWait?: boolean;
  /** Probability that readNoWait declines (a cache miss); default 0.5, drawn from `prng`. */
  noWaitMissRate?: number;
}

export interface ProbeCall {
  verb: ProbeVerb;
  offset: number;
  length: number;
  /** write/trim: FUA; zero: whether ZeroFlags.FUA is set. */
  fua: boolean;
  /** zero: the flags as given. */
  flags: number;
  /** Event numbers (one counter for issues and completions): when it was issued, when it completed. */
  issuedAt: number;
  completedAt: number;
  error: VdiskError | null;
}

interface Pending {
  call: ProbeCall;
  end: number;
  mutating: boolean;
}

type AnyCallback = (err: VdiskError | null, result?: unknown) => void;

export class ProbeDevice implements BlockDevice {
  readonly kind = "probe";
  readonly capabilities: Capabilities;
  readonly calls: ProbeCall[] = [];
  /** Ordering bugs seen: descriptions of overlapping conflicting requests in flight together. */
  readonly violations: string[] = [];
  inflight = 0;
  inflightMax = 0;
  /** readNoWait calls answered. */
  noWaitHits = 0;

  private readonly active = new Set<Pending>();
  private readonly injected = new Map<ProbeVerb, VdiskError[]>();
  private mirror: Buffer | null = null;
  private events = 0;

  constructor(
    readonly inner: BlockDevice,
    private readonly options: ProbeOptions = {},
  ) {
    this.capabilities = {
      ...inner.capabilities,
      rotational: options.rotational ?? inner.capabilities.rotational,
    };
    if (options.noWait === true) {
      const missRate = options.noWaitMissRate ?? 0.5;
      assert(missRate >= 0 && missRate <= 1, "noWaitMissRate in [0, 1]");
      assert(missRate === 0 || options.prng !== undefined, "readNoWait misses are drawn from the prng");
      assert(inner.size <= probeMirrorBytesMax, "mirror within bounds");
      this.mirror = Buffer.alloc(inner.size);
    }
  }

  get size(): number {
    return this.inner.size;
  }

  /** Calls of one verb, in issue order. */
  callsOf(verb: ProbeVerb): ProbeCall[] {
    return this.calls.filter((call) => call.verb === verb);
  }

  /** Fail the next request of `verb` (after its delay, without forwarding it). */
  failNext(verb: ProbeVerb, error: VdiskError | ErrorCode = "IO_ERROR"): void {
    const failure = typeof error === "string" ? new VdiskError(error, `injected ${verb} failure`) : error;
    const queue = this.injected.get(verb) ?? [];
    queue.push(failure);
    this.injected.set(verb, queue);
  }

  read(buf: Buffer, offset: number, done: ReadDone): void {
    this.start("read", offset, buf.length, false, 0, done as AnyCallback, (finish) =>
      this.inner.read(buf, offset, finish),
    );
  }

  readNoWait(buf: Buffer, offset: number): boolean {
    if (this.mirror === null) return false;
    const missRate = this.options.noWaitMissRate ?? 0.5;
    if (missRate > 0 && (this.options.prng as Prng).bool(missRate)) return false;
    this.mirror.copy(buf, 0, offset, offset + buf.length);
    this.noWaitHits++;
    return true;
  }

  write(buf: Buffer, offset: number, fua: boolean, done: Done): void {
    this.start("write", offset, buf.length, fua, 0, done as AnyCallback, (finish) => {
      if (this.mirror !== null) buf.copy(this.mirror, offset);
      this.inner.write(buf, offset, fua, finish);
    });
  }

  zero(offset: number, length: number, flags: number, done: Done): void {
    this.start("zero", offset, length, (flags & 1) !== 0, flags, done as AnyCallback, (finish) => {
      this.mirror?.fill(0, offset, offset + length);
      this.inner.zero(offset, length, flags, finish);
    });
  }

  trim(offset: number, length: number, fua: boolean, done: Done): void {
    this.start("trim", offset, length, fua, 0, done as AnyCallback, (finish) => {
      this.mirror?.fill(0, offset, offset + length);
      this.inner.trim(offset, length, fua, finish);
    });
  }

  flush(done: Done): void {
    this.start("flush", 0, 0, false, 0, done as AnyCallback, (finish) => this.inner.flush(finish));
  }

  cache(offset: number, length: number, done: Done): void {
    this.start("cache", offset, length, false, 0, done as AnyCallback, (finish) =>
      this.inner.cache(offset, length, finish),
    );
  }

  blockStatus(offset: number, length: number, done: ExtentsDone): void {
    this.start("blockStatus", offset, length, false, 0, done as AnyCallback, (finish) =>
      this.inner.blockStatus(offset, length, finish),
    );
  }

  resize(size: number, done: Done): void {
    this.start("resize", 0, size, false, 0, done as AnyCallback, (finish) => {
      if (this.mirror !== null) {
        const resized = Buffer.alloc(size);
        this.mirror.copy(resized, 0, 0, Math.min(size, this.mirror.length));
        this.mirror = resized;
      }
      this.inner.resize(size, finish);
    });
  }

  usage(done: (err: VdiskError | null, usage?: DeviceUsage) => void): void {
    this.inner.usage(done);
  }

  close(done: Done): void {
    assert(this.active.size === 0, "close with requests in flight");
    this.inner.close(done);
  }

  private start(
    verb: ProbeVerb,
    offset: number,
    length: number,
    fua: boolean,
    flags: number,
    done: AnyCallback,
    forward: (finish: AnyCallback) => void,
  ): void {
    const call: ProbeCall = {
      verb,
      offset,
      length,
      fua,
      flags,
      issuedAt: ++this.events,
      completedAt: 0,
      error: null,
    };
    this.calls.push(call);
    const mutating = verb === "write" || verb === "zero" || verb === "trim" || verb === "resize";
    const ranged = verb !== "flush";
    const end = verb === "resize" ? Infinity : offset + length;
    const pending: Pending = { call, end, mutating };
    if (ranged) {
      const start = verb === "resize" ? 0 : offset;
      for (const other of this.active) {
        if (other.call.verb === "flush") continue;
        const otherStart = other.call.verb === "resize" ? 0 : other.call.offset;
        if ((mutating || other.mutating) && otherStart < end && start < other.end) {
          this.violations.push(
            `${verb} ${start}+${length} issued while ${other.call.verb} ${otherStart}+${other.call.length} ` +
              `was in flight`,
          );
        }
      }
    }
    this.active.add(pending);
    this.inflight++;
    if (this.inflight > this.inflightMax) this.inflightMax = this.inflight;

    const finish: AnyCallback = (err, result) => {
      assert(this.active.delete(pending), "a device request completes once");
      this.inflight--;
      call.completedAt = ++this.events;
      call.error = err;
      done(err, result);
    };
    const go = (): void => {
      const failure = this.injected.get(verb)?.shift();
      if (failure !== undefined) {
        setImmediate(finish, failure);
        return;
      }
      forward(finish);
    };
    const delayMs = this.options.delayMs?.[verb];
    if (delayMs !== undefined) {
      setTimeout(go, delayMs);
    } else if (this.options.prng !== undefined) {
      this.afterTurns(this.options.prng.int((this.options.delayTurnsMax ?? 3) + 1), go);
    } else {
      go();
    }
  }

  private afterTurns(turns: number, run: () => void): void {
    if (turns === 0) setImmediate(run);
    else setImmediate(() => this.afterTurns(turns - 1, run));
  }
}
