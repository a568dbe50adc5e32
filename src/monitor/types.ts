/**
 * The shape of the daemon's live statistics, shared by the API (`GET /v1/stats`), `vdisk top`, the
 * dashboard's event stream and the Prometheus exporter. Counters are totals since the daemon started;
 * readers compute rates from two snapshots (`timeMs` tells them how far apart). The workload figures
 * (`activity`, `heat`, `profile`; docs/monitor.md) come from the same recorder; heat and profile decay
 * with time instead of adding up.
 */

import type { EngineStats } from "../engine/request-engine";
import type { IndexCacheStats } from "../image/index-cache";

/** Request kinds counted separately. */
export const opKinds = ["read", "write", "zero", "trim", "flush", "cache", "blockStatus"] as const;
export type OpKind = (typeof opKinds)[number];

/** Upper bounds (seconds) of the latency histogram buckets; the last bucket is +Inf. */
export const latencyBucketsSeconds = [
  0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
  0.5, 1,
] as const;

/**
 * Upper bounds (bytes) of the request-size histogram: powers of two from 512 B to 32 MiB; the last bucket
 * counts larger requests. Bucket i counts sizes ≤ bound i and > bound i-1.
 */
export const requestSizeBucketsBytes = Array.from({ length: 17 }, (_, i) => 512 * 2 ** i);

/** Upper bounds (seconds) of the inter-arrival histogram: 1 µs · 2^k up to ~16.8 s, then +Inf. */
export const interArrivalBucketsSeconds = Array.from({ length: 25 }, (_, i) => 2 ** i / 1e6);

/** Upper bounds of the queue-depth histogram (requests in flight at arrival, the arriving one included). */
export const queueDepthBuckets = Array.from({ length: 11 }, (_, i) => 2 ** i);

/** Latency percentiles interpolated inside the histogram's buckets (docs/monitor.md: error bound). */
export interface LatencyPercentiles {
  p50: number | null;
  p90: number | null;
  p99: number | null;
  p999: number | null;
}

export interface OpCounters {
  ops: number;
  bytes: number;
  errors: number;
  /**
   * Sum of latencies in seconds, and counts per latencyBucketsSeconds bucket (+ one for +Inf). Buckets are
   * not cumulative: bucket i counts latencies ≤ bound i and > bound i-1. A request's latency runs from its
   * dispatch to its reply being queued; `ops` and the histogram include failed requests, `bytes` only
   * successful ones (read/write: payload; zero/trim/cache/blockStatus: the range's length; flush: 0).
   */
  latencySecondsSum: number;
  latencyBuckets: number[];
  /** From `latencyBuckets` (null without requests); always set by the daemon. */
  latencyPercentilesSeconds?: LatencyPercentiles;
}

/** Reads and writes counted apart. */
export interface ReadWrite {
  read: number;
  write: number;
}

/**
 * What the requests looked like, counted at arrival (when the request is dispatched, failed ones too).
 * Sizes and the sequential/random split cover reads and writes only. A request is sequential when it
 * starts exactly where the same client's previous request (of any kind with a range: all but flush)
 * ended; a client's first request is random. Inter-arrival times and queue depths are per client in
 * ClientStats; in DiskStats they are the disk's: time between successive requests of any of its clients,
 * and all of its clients' requests in flight.
 */
export interface ActivityStats {
  /** Counts per requestSizeBucketsBytes bucket (+ one for larger), and the sum of the sizes. */
  sizeBuckets: { read: number[]; write: number[] };
  sizeBytesSum: ReadWrite;
  sequential: ReadWrite;
  random: ReadWrite;
  /** Of those, the ones up to limits.profileSmallBytesMax (64 KiB). */
  sequentialSmall: ReadWrite;
  randomSmall: ReadWrite;
  interArrival: {
    /** Intervals measured (requests − 1). */
    count: number;
    meanSeconds: number | null;
    secondsSum: number;
    /** Counts per interArrivalBucketsSeconds bucket (+ one for longer). */
    buckets: number[];
  };
  queueDepth: {
    /** Requests that arrived (each saw a depth ≥ 1: itself). */
    count: number;
    mean: number | null;
    sum: number;
    max: number;
    /** Counts per queueDepthBuckets bucket (+ one for deeper). */
    buckets: number[];
  };
}

/** One extent of a disk's heat map. */
export interface ExtentHeatStats {
  /** Byte offset of the extent in the disk. */
  offset: number;
  /** Decayed access count: every read or write adds 1 to each extent it touches. */
  heat: number;
}

export interface HeatStats {
  extentBytes: number;
  extents: number;
  halfLifeSeconds: number;
  /** Sum of the heat of all extents. */
  total: number;
  /** Hottest extents first (only extents with heat). */
  top: ExtentHeatStats[];
}

/**
 * The disk's recent workload: reads and writes weighted by 2^(−age / half-life), so the figures cover
 * roughly the last few half-lives. `kind` is the class holding more than half of the weight.
 */
export interface ProfileStats {
  halfLifeSeconds: number;
  /** Estimated from the decayed request count (sum × ln 2 / half-life); reads and writes only. */
  requestsPerSecond: number;
  readFraction: number;
  /** Random requests of at most profileSmallBytesMax. */
  randomSmallFraction: number;
  /** Sequential requests larger than profileSmallBytesMax. */
  sequentialLargeFraction: number;
  kind: "idle" | "random-small" | "sequential-large" | "mixed";
}

export interface ClientStats {
  /** Connection id, unique for the daemon's life. */
  id: number;
  /** Export the client is attached to (DISK or DISK@SNAP), without its tag. */
  export: string;
  /** The client tag of an export name DISK/TAG or DISK@SNAP/TAG; null without one. */
  tag: string | null;
  /** Where it came from: "unix" or "tcp HOST:PORT". */
  peer: string;
  connectedMs: number;
  inflight: number;
  ops: Record<OpKind, OpCounters>;
  /** Always set by the daemon while the monitor is on. */
  activity?: ActivityStats;
}

/** The request engine's counters for one disk (src/engine/request-engine.ts): its stats without settings. */
export type EngineCounters = Omit<EngineStats, "settings" | "sorting">;

export interface DiskStats {
  name: string;
  format: string;
  /** The pool the disk's file lives in (always set by the daemon). */
  pool?: string;
  sizeBytes: number;
  allocatedBytes: number;
  snapshots: number;
  /** Totals over every client this disk (and its snapshot exports) ever had, including gone ones. */
  ops: Record<OpKind, OpCounters>;
  errorsByCode: Record<string, number>;
  inflight: number;
  clients: ClientStats[];
  /** The disk's request engine (always set by the daemon). */
  engine?: EngineCounters;
  /** Whether the daemon records requests (`vdisk serve --monitor on|off`); always set by the daemon. */
  monitorEnabled?: boolean;
  /** Workload figures: set by the daemon while the monitor is on (null: no client yet). */
  activity?: ActivityStats | null;
  heat?: HeatStats | null;
  profile?: ProfileStats | null;
}

/** The monitor itself (`vdisk serve --monitor on|off`). */
export interface MonitorStats {
  enabled: boolean;
  heatHalfLifeSeconds: number;
  /** Typed arrays held by the recorder (per connection and per disk). */
  memoryBytes: number;
}

/** A pool: the file system holding its directory (statfs). */
export interface PoolStats {
  name: string;
  capacityBytes: number;
  usedBytes: number;
  /** Free bytes an unprivileged user may still allocate. */
  availableBytes: number;
}

/** One open vdisk image file (a family of disks) and its engine counters. */
export interface ImageEngineStats {
  /** Relative to the home, e.g. pools/default/web.vdisk. */
  file: string;
  disks: string[];
  commits: number;
  regroups: number;
  fileBytes: number;
  dataBytes: number;
  indexBytes: number;
  freeBytes: number;
}

export interface StatsSnapshot {
  timeMs: number;
  uptimeSeconds: number;
  disks: DiskStats[];
  server: {
    connections: number;
    connectionsTotal: number;
    protocolErrors: number;
    /** Connections refused at the connection limit or during shutdown (always set by the daemon). */
    connectionsRefused?: number;
  };
  process: {
    residentBytes: number;
    heapUsedBytes: number;
    /** Mean event-loop delay beyond the timer's resolution over the last second (perf_hooks). */
    eventLoopLagSeconds: number;
    /** The largest delay in that second (always set by the daemon). */
    eventLoopLagMaxSeconds?: number;
  };
  /**
   * Pools and images (always set by the daemon; optional so that other producers stay valid). Their
   * space figures, like DiskStats.allocatedBytes, are cached: at most 1 s old in GET /v1/stats and
   * /metrics, up to 5 s in the dashboard's stream.
   */
  pools?: PoolStats[];
  images?: ImageEngineStats[];
  /** The index-node cache shared by the open images (always set by the daemon). */
  indexCache?: IndexCacheCounters;
  /** The request monitor (always set by the daemon). */
  monitor?: MonitorStats;
  /** Tiering (src/tier/, docs/tiering.md): cached like the space figures (always set by the daemon). */
  tier?: TierStats;
}

/** Each pool's devices and migrations; each disk of a pool with several devices, its bytes per class. */
export interface TierStats {
  pools: TierPoolStats[];
  disks: Array<{ name: string; pool: string; priority: string; classes: Record<string, number> }>;
}

export interface TierPoolStats {
  name: string;
  policy: string;
  devices: Array<{
    id: number;
    class: string;
    capacity: number | null;
    usedBytes: number;
    /** Emulated devices only: requests waiting in the device's priority queue now, and in all. */
    queue: { queued: number; requests: number } | null;
  }>;
  moving: { running: boolean; queued: number };
  migratedBytes: number;
  passes: number;
}

/** The daemon's index-node cache (src/image/index-cache.ts); limitBytes is null when unlimited (JSON). */
export type IndexCacheCounters = Omit<IndexCacheStats, "limitBytes"> & { limitBytes: number | null };
