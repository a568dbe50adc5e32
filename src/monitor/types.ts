/**
 * The shape of the daemon's live statistics, shared by the API (`GET /v1/stats`), `vdisk top`, the
 * dashboard's event stream and the Prometheus exporter. Counters are totals since the daemon started;
 * readers compute rates from two snapshots (`timeMs` tells them how far apart).
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
}

export interface ClientStats {
  /** Connection id, unique for the daemon's life. */
  id: number;
  /** Export the client is attached to (DISK or DISK@SNAP). */
  export: string;
  /** Where it came from: "unix" or "tcp HOST:PORT". */
  peer: string;
  connectedMs: number;
  inflight: number;
  ops: Record<OpKind, OpCounters>;
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
}

/** The daemon's index-node cache (src/image/index-cache.ts); limitBytes is null when unlimited (JSON). */
export type IndexCacheCounters = Omit<IndexCacheStats, "limitBytes"> & { limitBytes: number | null };
