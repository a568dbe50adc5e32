/**
 * LatencyDevice: a filter that makes an inner BlockDevice answer as slowly as a modelled HDD or SSD would
 * (nbdkit's delay filter, with device models instead of one fixed sleep). For tests and benchmarks of the
 * request engine (sorting, merging, request size, queue depth) and of tiering on machines without such
 * disks. See docs/devices.md, "Latency-emulating device", for the models, their defaults and sources.
 *
 * Data path: every verb calls through to the inner device at once, so the bytes, holes and errors are the
 * inner device's; only the completion is held back. A request completes at
 * max(inner completion, modelled completion). The model's timeline ignores how long the inner device took
 * (the inner device is assumed fast: memory or page cache).
 *
 * Timeline: the modelled completion is fixed when the request arrives (the device never reorders):
 * - hdd: one head. start = max(arrival, head free); completion = start + hddServiceUs(...); the head then
 *   rests at the end of the request. Requests are serviced one at a time, in arrival order.
 * - ssd: `channels` flash channels and one host link (`LinkCalendar`). A read takes the channel that frees
 *   first: start = max(arrival, channel free); its data is ready at start + readLatencyUs and then crosses
 *   the link (bytes / bandwidthMBps) in the link's first free slot from then on. A write's data crosses the
 *   link first (first free slot from arrival), then the channel that frees first programs it for
 *   writeLatencyUs. The channel is busy until the request completes. Commands without data (zero, trim,
 *   flush) take writeLatencyUs on a channel.
 * - fixed: completion = arrival + latencyUs, unlimited parallelism (nbdkit's delay filter).
 * blockStatus, usage and resize are metadata: no delay. readNoWait always declines (no path past the model).
 *
 * Clocks (all times are µs):
 * - "real": arrival = performance.now(); completions are delivered by one process-wide scheduler
 *   (`RealTimeScheduler`): a min-heap of due times, one setTimeout for the earliest when it is more than
 *   `realClockPollWindowUs + realClockTimerGranularityUs` away (waking `realClockPollWindowUs` early, since
 *   a Node timer may fire up to ~1 ms early and is often ~0.1–1 ms late), then setImmediate polling while
 *   something is due within the window. It never fires early; it spins only while a request is due soon.
 *   Arrival times never go backwards: arrival = max(clock, previous arrival).
 * - "simulated": nothing sleeps. arrival = options.simClock.nowUs() if given (a trace replayer drives it),
 *   else the device's virtual clock: the modelled completion of the last request delivered. Completions are
 *   delivered one per setImmediate in modelled-completion order, so a request submitted from a completion
 *   callback (or a nextTick/promise chain started there) arrives at that completion's time — an exact
 *   discrete-event simulation for callers that react within the same macrotask.
 *
 * Invariants: callbacks run exactly once, never synchronously (inner callbacks are async, deliveries come
 * from timers/immediates); outstanding requests <= latencyOutstandingMax; close waits for outstanding
 * requests, then closes the inner device; no verb after close.
 *
 * Structure: the timeline (head or channels and link, clock, deliveries) is `DeviceTimeline`; LatencyDevice
 * is one timeline over one inner device, its model positions being the inner offsets. PhysicalDevice
 * (physical-device.ts) shares one timeline among several files, with a position in the model separate from
 * the offset in each file, and a priority queue in front of it.
 */
import { performance } from "node:perf_hooks";

import { assert, VdiskError } from "../errors";
import type { BlockDevice, Capabilities, DeviceUsage, Done, ExtentsDone, ReadDone } from "./block-device";

// ---------------------------------------------------------------------------------------------------------
// Models

export interface HddLatencyModel {
  kind: "hdd";
  /** Spindle speed; the average rotational latency is half a revolution. */
  rpm?: number;
  /** Shortest seek (track to track, mostly settle time). */
  seekMinMs?: number;
  /** Average seek over uniformly random pairs of positions. */
  seekAvgMs?: number;
  /** Full-stroke seek; defaults to 2 × seekAvgMs. */
  seekMaxMs?: number;
  /** Media transfer rate (MB = 10^6 bytes). */
  transferMBps?: number;
  /** Fixed cost of every command (controller, bus). */
  commandOverheadUs?: number;
}

export interface SsdLatencyModel {
  kind: "ssd";
  readLatencyUs?: number;
  writeLatencyUs?: number;
  /** Host link bandwidth shared by all channels (MB = 10^6 bytes). */
  bandwidthMBps?: number;
  /** Requests served concurrently. */
  channels?: number;
}

export interface FixedLatencyModel {
  kind: "fixed";
  latencyUs: number;
}

export type LatencyModel = HddLatencyModel | SsdLatencyModel | FixedLatencyModel;
export type ResolvedHddModel = Required<HddLatencyModel>;
export type ResolvedSsdModel = Required<SsdLatencyModel>;
export type ResolvedLatencyModel = ResolvedHddModel | ResolvedSsdModel | FixedLatencyModel;

/**
 * A 7200 rpm 3.5" SATA disk (Seagate Barracuda 7200.14 class datasheets: average read seek 8.5 ms,
 * track-to-track ~1 ms, sustained 210 MB/s outer to ~100 MB/s inner zones, so ~150 MB/s in the middle).
 * seekMaxMs defaults to 2 × seekAvgMs (17 ms). The command overhead (~0.1 ms) is an assumption for a modern
 * SATA drive; Ruemmler & Wilkes (1994) measured 0.3–2 ms on the drives of their time.
 */
export const hddModelDefaults = {
  rpm: 7200,
  seekMinMs: 1,
  seekAvgMs: 8.5,
  transferMBps: 150,
  commandOverheadUs: 100,
} as const;

/**
 * A mid-range PCIe 3.0 NVMe TLC SSD: ~80 µs for a 4 KiB read at queue depth 1, ~20 µs for a write absorbed
 * by its cache, ~3000 MB/s, 8 channels (so ~100K random reads/s at queue depth >= 8; real drives reach more
 * through dies and planes — raise `channels` to model them).
 */
export const ssdModelDefaults = {
  readLatencyUs: 80,
  writeLatencyUs: 20,
  bandwidthMBps: 3000,
  channels: 8,
} as const;

/** Any latency parameter, at most (one minute: larger values are unit mistakes). */
export const latencyUsMax = 60_000_000;
export const ssdChannelsMax = 256;
/** Requests outstanding at one device, at most (NBD allows 128 per connection × 256 connections). */
export const latencyOutstandingMax = 1 << 20;
/** Real clock: the last stretch before a due time is awaited by setImmediate polling, not by a timer. */
export const realClockPollWindowUs = 1500;
/** Real clock: a timer is armed only for waits longer than the window plus this (timers have ms steps). */
export const realClockTimerGranularityUs = 1000;

interface KeySpec {
  min: number;
  max: number;
  integer?: boolean;
}

const hddKeys: Record<Exclude<keyof HddLatencyModel, "kind">, KeySpec> = {
  rpm: { min: 100, max: 100_000 },
  seekMinMs: { min: 0, max: 10_000 },
  seekAvgMs: { min: 0, max: 10_000 },
  seekMaxMs: { min: 0, max: 10_000 },
  transferMBps: { min: 0.001, max: 1_000_000 },
  commandOverheadUs: { min: 0, max: latencyUsMax },
};
const ssdKeys: Record<Exclude<keyof SsdLatencyModel, "kind">, KeySpec> = {
  readLatencyUs: { min: 0, max: latencyUsMax },
  writeLatencyUs: { min: 0, max: latencyUsMax },
  bandwidthMBps: { min: 0.001, max: 1_000_000 },
  channels: { min: 1, max: ssdChannelsMax, integer: true },
};
const fixedKeys: Record<Exclude<keyof FixedLatencyModel, "kind">, KeySpec> = {
  latencyUs: { min: 0, max: latencyUsMax },
};
const keysByKind: Record<LatencyModel["kind"], Record<string, KeySpec>> = {
  hdd: hddKeys,
  ssd: ssdKeys,
  fixed: fixedKeys,
};

function invalid(message: string): VdiskError {
  return new VdiskError("INVALID_ARGUMENT", message, {
    hint: "latency models: hdd[:key=value,...], ssd[:key=value,...], fixed:latencyUs=N, none",
  });
}

function allowedKeys(kind: LatencyModel["kind"]): string {
  return Object.keys(keysByKind[kind]).join(", ");
}

/** Check every parameter's type and range; unknown keys are refused. */
function checkParameters(model: LatencyModel): void {
  const specs = keysByKind[model.kind];
  if (specs === undefined) throw invalid(`unknown latency model kind "${String(model.kind)}"`);
  for (const [key, value] of Object.entries(model)) {
    if (key === "kind" || value === undefined) continue;
    const spec = Object.hasOwn(specs, key) ? specs[key] : undefined;
    if (spec === undefined) {
      throw invalid(`unknown parameter "${key}" for ${model.kind}; allowed: ${allowedKeys(model.kind)}`);
    }
    if (typeof value !== "number" || !Number.isFinite(value)) {
      throw invalid(`${model.kind} parameter ${key} must be a number, got ${String(value)}`);
    }
    if (value < spec.min || value > spec.max || (spec.integer === true && !Number.isInteger(value))) {
      const what = spec.integer === true ? "an integer" : "a number";
      throw invalid(
        `${model.kind} parameter ${key} must be ${what} in [${spec.min}, ${spec.max}], got ${value}`,
      );
    }
  }
}

/** The hdd model with every default filled in, checked (INVALID_ARGUMENT on a bad model). */
export function resolveHddModel(model: HddLatencyModel): ResolvedHddModel {
  checkParameters(model);
  const seekAvgMs = model.seekAvgMs ?? hddModelDefaults.seekAvgMs;
  const resolved: ResolvedHddModel = {
    kind: "hdd",
    rpm: model.rpm ?? hddModelDefaults.rpm,
    seekMinMs: model.seekMinMs ?? hddModelDefaults.seekMinMs,
    seekAvgMs,
    seekMaxMs: model.seekMaxMs ?? 2 * seekAvgMs,
    transferMBps: model.transferMBps ?? hddModelDefaults.transferMBps,
    commandOverheadUs: model.commandOverheadUs ?? hddModelDefaults.commandOverheadUs,
  };
  const { seekMinMs: min, seekAvgMs: avg, seekMaxMs: max } = resolved;
  // The seek curve min + a·√x + b·x (see hddGeometry) is monotone and meets all three values only when
  // avg lies between min + (max − min)/3 and min + 11/15·(max − min).
  const low = min + (max - min) / 3;
  const high = min + ((max - min) * 11) / 15;
  if (!(min <= avg && avg <= max) || avg < low - 1e-9 || avg > high + 1e-9) {
    throw invalid(
      `hdd seek times min ${min} ms, avg ${avg} ms, max ${max} ms do not fit a monotone seek curve: ` +
        `seekAvgMs must lie in [${low.toFixed(3)}, ${high.toFixed(3)}] for these seekMinMs and seekMaxMs`,
    );
  }
  return resolved;
}

/** Any model with its defaults filled in, checked (INVALID_ARGUMENT on a bad model). */
export function resolveLatencyModel(model: LatencyModel): ResolvedLatencyModel {
  if (model === null || typeof model !== "object") throw invalid("a latency model is an object with a kind");
  switch (model.kind) {
    case "hdd":
      return resolveHddModel(model);
    case "ssd":
      checkParameters(model);
      return {
        kind: "ssd",
        readLatencyUs: model.readLatencyUs ?? ssdModelDefaults.readLatencyUs,
        writeLatencyUs: model.writeLatencyUs ?? ssdModelDefaults.writeLatencyUs,
        bandwidthMBps: model.bandwidthMBps ?? ssdModelDefaults.bandwidthMBps,
        channels: model.channels ?? ssdModelDefaults.channels,
      };
    case "fixed":
      checkParameters(model);
      if (model.latencyUs === undefined) throw invalid("fixed latency model needs latencyUs");
      return { kind: "fixed", latencyUs: model.latencyUs };
    default:
      throw invalid(`unknown latency model kind "${String((model as { kind: unknown }).kind)}"`);
  }
}

const numberPattern = /^[0-9]+(\.[0-9]+)?([eE][+-]?[0-9]+)?$/;

/**
 * Parse "hdd", "ssd", "none" (= fixed:latencyUs=0), "kind:key=value,key=value" ("hdd:rpm=5400,seekAvgMs=12",
 * "ssd:channels=8", "fixed:latencyUs=500"). Bad input → VdiskError INVALID_ARGUMENT naming the allowed keys.
 * Returns only the keys given; the device fills in the defaults.
 */
export function parseLatencyModel(text: string): LatencyModel {
  const trimmed = text.trim();
  const colon = trimmed.indexOf(":");
  const kind = (colon < 0 ? trimmed : trimmed.slice(0, colon)).trim();
  const parameters = colon < 0 ? "" : trimmed.slice(colon + 1);
  if (kind === "none") {
    if (colon >= 0) throw invalid(`latency model "none" takes no parameters (got "${text}")`);
    return { kind: "fixed", latencyUs: 0 };
  }
  if (kind !== "hdd" && kind !== "ssd" && kind !== "fixed") {
    throw invalid(`unknown latency model "${kind}" in "${text}"; kinds: hdd, ssd, fixed, none`);
  }
  const model: Record<string, number | string> = { kind };
  if (colon >= 0) {
    for (const pair of parameters.split(",")) {
      const equals = pair.indexOf("=");
      const key = (equals < 0 ? pair : pair.slice(0, equals)).trim();
      const value = equals < 0 ? "" : pair.slice(equals + 1).trim();
      if (key === "" || equals < 0) {
        throw invalid(
          `latency model "${text}": expected key=value, got "${pair}"; ${kind} keys: ${allowedKeys(kind)}`,
        );
      }
      if (!Object.hasOwn(keysByKind[kind], key)) {
        throw invalid(`latency model "${text}": unknown key "${key}"; ${kind} keys: ${allowedKeys(kind)}`);
      }
      if (Object.hasOwn(model, key)) throw invalid(`latency model "${text}": key "${key}" given twice`);
      if (!numberPattern.test(value)) {
        throw invalid(`latency model "${text}": ${key} must be a non-negative number, got "${value}"`);
      }
      model[key] = Number(value);
    }
  }
  const parsed = model as unknown as LatencyModel;
  resolveLatencyModel(parsed); // range checks, the seek-curve fit, fixed's required latencyUs
  return parsed;
}

// ---------------------------------------------------------------------------------------------------------
// The hdd model

/** The hdd model in the units the arithmetic wants, derived once. */
interface HddGeometry {
  overheadUs: number;
  /** Average rotational latency: half a revolution. */
  rotationUs: number;
  seekMinUs: number;
  /** Coefficients of seek(x) = seekMinUs + sqrtUs·√x + linearUs·x, x = distance / device size in (0, 1]. */
  sqrtUs: number;
  linearUs: number;
  /** transferMBps: MB/s = bytes/µs. */
  bytesPerUs: number;
}

/**
 * Seek curve: short seeks are dominated by acceleration (∝ √distance), long ones by coasting (∝ distance)
 * (Ruemmler & Wilkes, "An introduction to disk drive modeling", 1994). With x = distance / size uniform-pair
 * averages E[√x] = 8/15 and E[x] = 1/3, requiring seek(1) = max and E[seek] = avg gives
 * sqrtUs = 5·(avg − min − (max − min)/3) and linearUs = max − min − sqrtUs.
 */
function hddGeometry(model: ResolvedHddModel): HddGeometry {
  const minUs = model.seekMinMs * 1000;
  const avgUs = model.seekAvgMs * 1000;
  const maxUs = model.seekMaxMs * 1000;
  const sqrtUs = Math.max(0, 5 * (avgUs - minUs - (maxUs - minUs) / 3));
  return {
    overheadUs: model.commandOverheadUs,
    rotationUs: 30_000_000 / model.rpm,
    seekMinUs: minUs,
    sqrtUs,
    linearUs: maxUs - minUs - sqrtUs,
    bytesPerUs: model.transferMBps,
  };
}

const enum Positioning {
  Sequential,
  /** A short forward gap: the head waits for it to pass under it rather than seek. */
  Skip,
  Seek,
}

interface PositionResult {
  us: number;
  how: Positioning;
}

/** Time to bring the head from `headBytes` to the start of a request at `offsetBytes`. */
function hddPosition(
  geometry: HddGeometry,
  headBytes: number,
  offsetBytes: number,
  deviceBytes: number,
  out: PositionResult,
): void {
  if (offsetBytes === headBytes) {
    out.us = 0;
    out.how = Positioning.Sequential;
    return;
  }
  assert(deviceBytes > 0, "a request on an empty device");
  const distance = Math.abs(offsetBytes - headBytes);
  const x = Math.min(1, distance / deviceBytes);
  const seekUs =
    geometry.seekMinUs + geometry.sqrtUs * Math.sqrt(x) + geometry.linearUs * x + geometry.rotationUs;
  const skipUs = offsetBytes > headBytes ? distance / geometry.bytesPerUs : Infinity;
  if (skipUs < seekUs) {
    out.us = skipUs;
    out.how = Positioning.Skip;
  } else {
    out.us = seekUs;
    out.how = Positioning.Seek;
  }
}

/**
 * Service time in µs of one data request (read, write, zero, cache) on an hdd whose head rests at
 * `headBytes`: command overhead + positioning + lengthBytes / transferMBps. Positioning is 0 for a
 * sequential continuation (offset = head); else the cheaper of a seek (the seek curve + half a revolution)
 * and, for a forward gap, letting the gap rotate past (gap / transferMBps).
 */
export function hddServiceUs(
  model: HddLatencyModel,
  headBytes: number,
  offsetBytes: number,
  lengthBytes: number,
  deviceBytes: number,
): number {
  const geometry = hddGeometry(resolveHddModel(model));
  const position: PositionResult = { us: 0, how: Positioning.Sequential };
  hddPosition(geometry, headBytes, offsetBytes, deviceBytes, position);
  return geometry.overheadUs + position.us + lengthBytes / geometry.bytesPerUs;
}

// ---------------------------------------------------------------------------------------------------------
// Time-ordered heap and the real-time scheduler

interface Timed {
  dueUs: number;
  /** Tie-break: equal due times fire in arrival order. */
  seq: number;
}

/** A binary min-heap by (dueUs, seq). */
class TimeHeap<T extends Timed> {
  private readonly items: T[] = [];

  peek(): T | undefined {
    return this.items[0];
  }

  push(item: T): void {
    const items = this.items;
    let index = items.length;
    items.push(item);
    while (index > 0) {
      const parent = (index - 1) >> 1;
      if (!before(item, items[parent])) break;
      items[index] = items[parent];
      index = parent;
    }
    items[index] = item;
  }

  pop(): T | undefined {
    const items = this.items;
    const first = items[0];
    const last = items.pop();
    if (first === undefined || last === undefined || items.length === 0) return first;
    let index = 0;
    const count = items.length;
    for (;;) {
      const left = 2 * index + 1;
      if (left >= count) break;
      const right = left + 1;
      const child = right < count && before(items[right], items[left]) ? right : left;
      if (!before(items[child], last)) break;
      items[index] = items[child];
      index = child;
    }
    items[index] = last;
    return first;
  }
}

function before(a: Timed, b: Timed): boolean {
  return a.dueUs < b.dueUs || (a.dueUs === b.dueUs && a.seq < b.seq);
}

function nowUs(): number {
  return performance.now() * 1000;
}

interface DueEntry extends Timed {
  fireDue(): void;
}

/**
 * Fires entries at their due time (performance.now() µs), never early. One per process: all real-clock
 * LatencyDevices share its timer and polling.
 */
class RealTimeScheduler {
  private readonly heap = new TimeHeap<DueEntry>();
  private nextSeq = 0;
  private timer: NodeJS.Timeout | null = null;
  private timerWakeUs = Infinity;
  private immediate: NodeJS.Immediate | null = null;

  add(entry: DueEntry): void {
    entry.seq = this.nextSeq++;
    this.heap.push(entry);
    this.arm();
  }

  private arm(): void {
    if (this.immediate !== null) return; // the coming poll re-arms
    const first = this.heap.peek();
    if (first === undefined) {
      this.cancelTimer();
      return;
    }
    const now = nowUs();
    const waitUs = first.dueUs - now;
    if (waitUs < realClockPollWindowUs + realClockTimerGranularityUs) {
      this.cancelTimer();
      this.immediate = setImmediate(this.poll);
      return;
    }
    const timerMs = Math.floor((waitUs - realClockPollWindowUs) / 1000);
    const wakeUs = now + timerMs * 1000;
    if (this.timer !== null && this.timerWakeUs <= wakeUs) return; // wakes early enough already
    this.cancelTimer();
    this.timerWakeUs = wakeUs;
    this.timer = setTimeout(this.onTimer, timerMs);
  }

  private cancelTimer(): void {
    if (this.timer === null) return;
    clearTimeout(this.timer);
    this.timer = null;
    this.timerWakeUs = Infinity;
  }

  private readonly onTimer = (): void => {
    this.timer = null;
    this.timerWakeUs = Infinity;
    this.runDue();
  };

  private readonly poll = (): void => {
    this.immediate = null;
    this.runDue();
  };

  /** Fire what is due; entries added meanwhile wait for the next turn (bounded work per turn). */
  private runDue(): void {
    const seqLimit = this.nextSeq;
    let now = nowUs();
    try {
      for (;;) {
        const first = this.heap.peek();
        if (first === undefined || first.seq >= seqLimit) break;
        if (first.dueUs > now) {
          now = nowUs();
          if (first.dueUs > now) break;
        }
        this.heap.pop();
        first.fireDue();
      }
    } finally {
      this.arm();
    }
  }
}

let realTimeScheduler: RealTimeScheduler | null = null;

/**
 * The ssd's host link: its reserved busy intervals [start, end), sorted and disjoint. A transfer takes the
 * first gap long enough at or after the time its data is ready, so a write arriving after a read can cross
 * the link while the read's flash access is still running. Intervals that end before the latest arrival
 * are forgotten (nothing can be placed before an arrival), so the list holds at most one interval per
 * outstanding transfer, fewer where back-to-back transfers merge.
 */
class LinkCalendar {
  private readonly starts: number[] = [];
  private readonly ends: number[] = [];

  /** Drop the intervals that end at or before `beforeUs`. */
  forget(beforeUs: number): void {
    let count = 0;
    while (count < this.ends.length && this.ends[count] <= beforeUs) count++;
    if (count === 0) return;
    this.starts.splice(0, count);
    this.ends.splice(0, count);
  }

  /** Reserve `durationUs` in the first free slot at or after `readyUs`; returns its start. */
  reserve(readyUs: number, durationUs: number): number {
    if (durationUs === 0) return readyUs;
    const starts = this.starts;
    const ends = this.ends;
    let startUs = readyUs;
    let index = 0;
    while (index < starts.length) {
      if (ends[index] <= startUs) {
        index++;
      } else if (starts[index] >= startUs + durationUs) {
        break; // fits in the gap before interval `index`
      } else {
        startUs = ends[index];
        index++;
      }
    }
    const endUs = startUs + durationUs;
    if (index > 0 && ends[index - 1] === startUs) {
      ends[index - 1] = endUs; // extends the interval it follows
    } else {
      starts.splice(index, 0, startUs);
      ends.splice(index, 0, endUs);
      index++;
    }
    if (index < starts.length && starts[index] === endUs) {
      ends[index - 1] = ends[index]; // and closes the gap to the next one
      starts.splice(index, 1);
      ends.splice(index, 1);
    }
    assert(starts.length <= latencyOutstandingMax, "link intervals bounded by outstanding requests");
    return startUs;
  }
}

// ---------------------------------------------------------------------------------------------------------
// The timeline: one modelled device's head or channels and link, its clock and its deliveries

export interface LatencyStats {
  /** Requests that went through the model (everything but blockStatus, usage, resize). */
  requests: number;
  /** Sum of modelled service times (µs); on an ssd, summed over channels. */
  busyUs: number;
  /** hdd: requests that paid a seek and rotational latency. */
  seeks: number;
  /** hdd: total distance of those seeks. */
  seekDistanceBytes: number;
  /** hdd: requests that started where the previous one ended. */
  sequentialRequests: number;
  /** Most requests outstanding (submitted, not yet called back) at once. */
  queuedMax: number;
  /** Latest modelled completion: the makespan (real clock: µs since the device was created). */
  simulatedNowUs: number;
}

/** What a verb costs, before queueing. */
export const enum Cost {
  Read,
  Write,
  /** A command with no data transfer and no head movement (hdd trim and flush; ssd zero, trim, flush). */
  Command,
}

/**
 * One request in a timeline: answered by its inner device (`onInner`, passed as the inner verb's callback)
 * and due at its modelled completion. `completed()` runs once both have happened. A subclass holds the
 * caller's callback; one object per request serves the inner call, the scheduler and the caller.
 */
export abstract class ModelRequest implements DueEntry {
  dueUs = 0;
  seq = 0;
  innerDone = false;
  timeDue = false;
  err: VdiskError | null = null;
  holes: number[] | null | undefined = undefined;
  /** Set by DeviceTimeline.submit. */
  timeline: DeviceTimeline | null = null;

  readonly onInner = (err: VdiskError | null, holes?: number[] | null): void => {
    assert(!this.innerDone, "inner device called back twice");
    this.innerDone = true;
    this.err = err;
    this.holes = holes;
    const timeline = this.timeline;
    assert(timeline !== null, "inner device answered a request before it entered the timeline");
    timeline.innerCompleted(this);
  };

  fireDue(): void {
    assert(!this.timeDue, "due twice");
    this.timeDue = true;
    const timeline = this.timeline;
    assert(timeline !== null, "a request fell due before it entered the timeline");
    this.due();
    if (this.innerDone) timeline.finish(this);
  }

  /** The modelled completion has come (the device is done with it), whether or not the inner answered. */
  due(): void {}

  /** Both answered and due: call back. Runs exactly once, from a timer, an immediate or a callback. */
  abstract completed(): void;
}

/**
 * The modelled device: the hdd head or the ssd channels and link, the clock, and the delivery of
 * completions (the real-time scheduler or the simulated queue). A LatencyDevice owns one for its single
 * inner device; a PhysicalDevice (physical-device.ts) shares one among several files, passing each request's
 * position in the model separately from its offset in the file. The timeline never reorders: a request's
 * modelled completion is fixed by `submit`.
 */
export class DeviceTimeline {
  readonly model: ResolvedLatencyModel;
  readonly clock: "real" | "simulated";
  private readonly simClock: { nowUs(): number } | null;
  private readonly geometry: HddGeometry | null;
  private readonly position: PositionResult = { us: 0, how: Positioning.Sequential };
  /** Real clock: performance.now() µs at creation, the origin of simulatedNowUs. Simulated: 0. */
  private readonly originUs: number;

  // Timeline (µs, in the clock's coordinates).
  private headBytes = 0;
  private headFreeUs: number;
  private readonly channelFreeUs: Float64Array;
  private readonly link = new LinkCalendar();
  private latestArrivalUs: number;
  private latestCompletionUs: number;
  /** Simulated clock: the modelled completion of the last request delivered. */
  private virtualNowUs = 0;

  // Simulated delivery: requests in the model by modelled completion.
  private readonly simQueue = new TimeHeap<ModelRequest>();
  private nextSeq = 0;
  private deliveryScheduled = false;

  /** Requests submitted and not yet completed. */
  private inModel = 0;
  private readonly counters: LatencyStats = {
    requests: 0,
    busyUs: 0,
    seeks: 0,
    seekDistanceBytes: 0,
    sequentialRequests: 0,
    queuedMax: 0,
    simulatedNowUs: 0,
  };

  constructor(model: LatencyModel, clock: "real" | "simulated", simClock: { nowUs(): number } | null) {
    this.model = resolveLatencyModel(model);
    if (clock !== "real" && clock !== "simulated") throw invalid(`unknown clock "${String(clock)}"`);
    if (simClock !== null && clock !== "simulated") throw invalid("simClock is for the simulated clock only");
    this.clock = clock;
    this.simClock = simClock;
    this.geometry = this.model.kind === "hdd" ? hddGeometry(this.model) : null;
    this.channelFreeUs = new Float64Array(this.model.kind === "ssd" ? this.model.channels : 0);
    this.originUs = clock === "real" ? nowUs() : 0;
    this.headFreeUs = this.originUs;
    this.latestArrivalUs = this.originUs;
    this.channelFreeUs.fill(this.originUs);
    this.latestCompletionUs = this.originUs;
  }

  stats(): LatencyStats {
    return { ...this.counters, simulatedNowUs: this.simulatedNowUs() };
  }

  /** The latest modelled completion (µs): the makespan once every request has completed. */
  simulatedNowUs(): number {
    return this.latestCompletionUs - this.originUs;
  }

  /** Requests submitted and not yet completed. */
  get requestsInModel(): number {
    return this.inModel;
  }

  /** The clock now (µs, the timeline's coordinates), not clamped to earlier arrivals. */
  clockUs(): number {
    if (this.clock === "real") return nowUs();
    if (this.simClock === null) return this.virtualNowUs;
    const timeUs = this.simClock.nowUs();
    assert(Number.isFinite(timeUs) && timeUs >= 0, "simClock.nowUs() is a finite non-negative number");
    return timeUs;
  }

  /**
   * Fix the request's modelled completion and queue its delivery. Call it after handing `request.onInner`
   * to the inner verb (so a refused verb never enters the model). `offsetBytes` is the position in the
   * model, `deviceBytes` the modelled device's size (hdd seek distances are fractions of it). `arrivalUs`
   * defaults to the clock now; either way it is clamped to the previous arrival. Returns the arrival used.
   */
  submit(
    request: ModelRequest,
    cost: Cost,
    offsetBytes: number,
    lengthBytes: number,
    deviceBytes: number,
    arrivalUs: number = this.clockUs(),
  ): number {
    assert(request.timeline === null, "a request enters a timeline once");
    assert(this.inModel < latencyOutstandingMax, "too many requests in the model");
    request.timeline = this;
    if (arrivalUs > this.latestArrivalUs) this.latestArrivalUs = arrivalUs;
    const startUs = this.latestArrivalUs;
    const model = this.model;
    let completionUs: number;
    let serviceUs: number;
    if (model.kind === "hdd") {
      const geometry = this.geometry;
      assert(geometry !== null, "hdd geometry");
      serviceUs = geometry.overheadUs;
      if (cost !== Cost.Command) {
        const position = this.position;
        hddPosition(geometry, this.headBytes, offsetBytes, deviceBytes, position);
        if (position.how === Positioning.Sequential) {
          this.counters.sequentialRequests++;
        } else if (position.how === Positioning.Seek) {
          this.counters.seeks++;
          this.counters.seekDistanceBytes += Math.abs(offsetBytes - this.headBytes);
        }
        serviceUs += position.us + lengthBytes / geometry.bytesPerUs;
        this.headBytes = offsetBytes + lengthBytes;
      }
      completionUs = Math.max(startUs, this.headFreeUs) + serviceUs;
      this.headFreeUs = completionUs;
    } else if (model.kind === "ssd") {
      const channels = this.channelFreeUs;
      let channel = 0;
      for (let index = 1; index < channels.length; index++) {
        if (channels[index] < channels[channel]) channel = index;
      }
      const latencyUs = cost === Cost.Read ? model.readLatencyUs : model.writeLatencyUs;
      const transferUs = cost === Cost.Command ? 0 : lengthBytes / model.bandwidthMBps;
      this.link.forget(startUs); // no transfer can start before this arrival
      if (cost === Cost.Read) {
        const readyUs = Math.max(startUs, channels[channel]) + latencyUs;
        completionUs = this.link.reserve(readyUs, transferUs) + transferUs;
      } else {
        const transferredUs = this.link.reserve(startUs, transferUs) + transferUs;
        completionUs = Math.max(transferredUs, channels[channel]) + latencyUs;
      }
      channels[channel] = completionUs;
      serviceUs = latencyUs + transferUs;
    } else {
      serviceUs = model.latencyUs;
      completionUs = startUs + serviceUs;
    }
    this.counters.requests++;
    this.counters.busyUs += serviceUs;
    this.inModel++;
    if (this.inModel > this.counters.queuedMax) this.counters.queuedMax = this.inModel;
    if (completionUs > this.latestCompletionUs) this.latestCompletionUs = completionUs;
    request.dueUs = completionUs;
    if (this.clock === "real") {
      realTimeScheduler ??= new RealTimeScheduler();
      realTimeScheduler.add(request);
    } else {
      request.seq = this.nextSeq++;
      this.simQueue.push(request);
      this.deliverSoon();
    }
    return startUs;
  }

  /** Called by ModelRequest when the inner device has answered. */
  innerCompleted(request: ModelRequest): void {
    if (this.clock === "real") {
      if (request.timeDue) this.finish(request);
    } else {
      this.deliverSoon();
    }
  }

  /** Called once a request is both answered by the inner device and due. */
  finish(request: ModelRequest): void {
    assert(request.innerDone && request.timeDue, "finish before the request is answered and due");
    assert(this.inModel > 0, "requests in the model");
    this.inModel--;
    request.completed();
  }

  /** Simulated clock: deliver the earliest modelled completion on the next turn, once its data is there. */
  private deliverSoon(): void {
    if (this.deliveryScheduled) return;
    const first = this.simQueue.peek();
    if (first === undefined || !first.innerDone) return;
    this.deliveryScheduled = true;
    setImmediate(this.deliverNext);
  }

  private readonly deliverNext = (): void => {
    this.deliveryScheduled = false;
    const first = this.simQueue.peek();
    // A request submitted since may complete earlier and still wait for its inner device.
    if (first === undefined || !first.innerDone) return;
    this.simQueue.pop();
    if (first.dueUs > this.virtualNowUs) this.virtualNowUs = first.dueUs;
    first.timeDue = true;
    first.due();
    try {
      this.finish(first);
    } finally {
      this.deliverSoon();
    }
  };
}

// ---------------------------------------------------------------------------------------------------------
// The device

export interface LatencyDeviceOptions {
  model: LatencyModel;
  /** "real" (default): completions wait in real time. "simulated": a virtual clock, no sleeping. */
  clock?: "real" | "simulated";
  /** Simulated clock only: arrival times come from here (µs) instead of the device's virtual clock. */
  simClock?: { nowUs(): number };
}

class PendingRequest extends ModelRequest {
  constructor(
    private readonly device: LatencyDevice,
    readonly done: ReadDone,
  ) {
    super();
  }

  completed(): void {
    this.device.finish(this);
  }
}

export class LatencyDevice implements BlockDevice {
  readonly kind: string;
  readonly model: ResolvedLatencyModel;
  readonly clock: "real" | "simulated";
  private readonly inner: BlockDevice;
  private readonly timeline: DeviceTimeline;

  private outstanding = 0;
  private closed = false;
  private closeDone: Done | null = null;

  constructor(inner: BlockDevice, options: LatencyDeviceOptions) {
    this.timeline = new DeviceTimeline(options.model, options.clock ?? "real", options.simClock ?? null);
    this.model = this.timeline.model;
    this.clock = this.timeline.clock;
    this.inner = inner;
    this.kind = `${inner.kind}+${this.model.kind}`;
  }

  get size(): number {
    return this.inner.size;
  }

  /** The inner device's capabilities; rotational as the model says (fixed: the inner device's). */
  get capabilities(): Capabilities {
    const capabilities = { ...this.inner.capabilities };
    if (this.model.kind !== "fixed") capabilities.rotational = this.model.kind === "hdd";
    return capabilities;
  }

  stats(): LatencyStats {
    return this.timeline.stats();
  }

  /** The latest modelled completion (µs): the makespan once every request has completed. */
  simulatedNowUs(): number {
    return this.timeline.simulatedNowUs();
  }

  read(buf: Buffer, offset: number, done: ReadDone): void {
    const pending = this.begin(done);
    this.inner.read(buf, offset, pending.onInner);
    this.schedule(pending, Cost.Read, offset, buf.length);
  }

  /** No fast path past the model: always declines. */
  readNoWait(_buf: Buffer, _offset: number): boolean {
    assert(!this.closed, "verb after close");
    return false;
  }

  write(buf: Buffer, offset: number, fua: boolean, done: Done): void {
    const pending = this.begin(done);
    this.inner.write(buf, offset, fua, pending.onInner);
    this.schedule(pending, Cost.Write, offset, buf.length);
  }

  /** hdd: writes the zeros (a write of `length`); ssd: a command (deallocation), no transfer. */
  zero(offset: number, length: number, flags: number, done: Done): void {
    const pending = this.begin(done);
    this.inner.zero(offset, length, flags, pending.onInner);
    this.schedule(pending, this.model.kind === "hdd" ? Cost.Write : Cost.Command, offset, length);
  }

  /** A command: hdd ignores trim (no head movement), ssd deallocates. */
  trim(offset: number, length: number, fua: boolean, done: Done): void {
    const pending = this.begin(done);
    this.inner.trim(offset, length, fua, pending.onInner);
    this.schedule(pending, Cost.Command, offset, 0);
  }

  /** A command: hdd commandOverheadUs in the head's queue, ssd writeLatencyUs on a channel. */
  flush(done: Done): void {
    const pending = this.begin(done);
    this.inner.flush(pending.onInner);
    this.schedule(pending, Cost.Command, 0, 0);
  }

  /** Prefetch: costs what reading the range costs. */
  cache(offset: number, length: number, done: Done): void {
    const pending = this.begin(done);
    this.inner.cache(offset, length, pending.onInner);
    this.schedule(pending, Cost.Read, offset, length);
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

  /** Waits for outstanding requests, then closes the inner device. */
  close(done: Done): void {
    assert(!this.closed, "closed twice");
    this.closed = true;
    this.closeDone = done;
    if (this.outstanding === 0) this.closeInner();
  }

  private closeInner(): void {
    const done = this.closeDone;
    assert(done !== null, "close pending");
    this.closeDone = null;
    this.inner.close(done);
  }

  /** Called by PendingRequest once it is both answered by the inner device and due: call back. */
  finish(pending: PendingRequest): void {
    assert(this.outstanding > 0, "outstanding count");
    this.outstanding--;
    if (this.closeDone !== null && this.outstanding === 0) this.closeInner();
    pending.done(pending.err, pending.holes);
  }

  private begin(done: ReadDone): PendingRequest {
    assert(!this.closed, "verb after close");
    assert(this.outstanding < latencyOutstandingMax, "too many outstanding requests");
    return new PendingRequest(this, done);
  }

  /** Fix the request's modelled completion (after the inner call accepted it) and queue its delivery. */
  private schedule(pending: PendingRequest, cost: Cost, offset: number, length: number): void {
    this.outstanding++;
    this.timeline.submit(pending, cost, offset, length, this.inner.size);
  }
}
