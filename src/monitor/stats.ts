/**
 * DaemonStats: assembles the StatsSnapshot (types.ts) from the registry (disks, images, pools), the
 * StatsRecorder (requests), the NBD server (connections) and the process (memory, event-loop lag).
 *
 * Two speeds. Request counters, connections and disk sizes are read at every `snapshot()`: they cost a pass
 * over the live connections. Space figures — allocated bytes per disk (a vdisk disk walks its index),
 * image statistics (every index node), pool statfs and tiering (each device's use; each disk of a pool with
 * several devices mapped by device) — are cached: `fresh()` (the API, /metrics) waits
 * for a refresh when the cache is older than `usageRefreshMs`; `snapshot()` (the dashboard's event stream,
 * every second) answers at once from the cache and starts a refresh in the background when it is older
 * than `usageBackgroundRefreshMs`. Nothing runs while nobody asks, except the event-loop delay histogram (perf_hooks,
 * one timer per `lagResolutionMs`) and a one-second timer that reads and resets it.
 *
 * Workload figures (docs/monitor.md): each disk's activity, profile and its `heatTop` hottest extents
 * (limits.heatTopDefault unless asked; a pass over the disk's extents, ≤ 65,536 numbers). With the monitor
 * off (`vdisk serve --monitor off`) they are null, `monitorEnabled` false and the counters stay at 0.
 */
import * as fs from "node:fs";
import { type IntervalHistogram, monitorEventLoopDelay } from "node:perf_hooks";
import type { MonitorDisk } from "../daemon/registry";
import type { NbdServerStats } from "../protocol/nbd/server";
import { heatTopDefault, heatTopMax } from "../limits";
import { emptyOpCounters, type StatsRecorder } from "./recorder";
import type { EngineStats } from "../engine/request-engine";
import type { IndexCacheStats } from "../image/index-cache";
import type { TierStatus } from "../tier/tier-manager";
import type {
  DiskStats,
  EngineCounters,
  ImageEngineStats,
  PoolStats,
  StatsSnapshot,
  TierStats,
} from "./types";

/** Oldest space figures `fresh()` accepts. */
export const usageRefreshMs = 1000;
/** Age at which `snapshot()` refreshes the space figures in the background. */
export const usageBackgroundRefreshMs = 5000;
const lagResolutionMs = 10;
const lagWindowMs = 1000;

export interface StatsSources {
  registry: {
    monitorDisks(): MonitorDisk[];
    allocatedBytes(): Promise<Map<string, number>>;
    monitorImages(): ImageEngineStats[];
    pools(): Array<{ name: string; dir: string }>;
    /** Tiering status (absent in tests without pools). */
    tier?: { status(disk: undefined, disks: "tiered"): Promise<TierStatus> };
  };
  recorder: StatsRecorder;
  server: { stats(): NbdServerStats };
  /** The daemon's index-node cache (absent in tests that do not have one). */
  indexCache?: { stats(): IndexCacheStats };
  log?: (message: string) => void;
}

interface Usage {
  atMs: number;
  allocated: Map<string, number>;
  images: ImageEngineStats[];
  pools: PoolStats[];
  tier: TierStats | undefined;
}

function engineCounters(stats: EngineStats): EngineCounters {
  const { settings: _settings, sorting: _sorting, ...counters } = stats;
  return counters;
}

/** Event-loop delay over the last window, from perf_hooks.monitorEventLoopDelay. */
class EventLoopLag {
  private readonly histogram: IntervalHistogram;
  private readonly timer: NodeJS.Timeout;
  meanSeconds = 0;
  maxSeconds = 0;

  constructor() {
    this.histogram = monitorEventLoopDelay({ resolution: lagResolutionMs });
    this.histogram.enable();
    this.timer = setInterval(() => this.sample(), lagWindowMs);
    this.timer.unref();
  }

  /** The histogram records whole timer intervals: the lag is what exceeds the resolution. */
  private sample(): void {
    const resolutionNs = lagResolutionMs * 1e6;
    const { mean, max } = this.histogram;
    this.meanSeconds = Number.isFinite(mean) ? Math.max(0, mean - resolutionNs) / 1e9 : 0;
    this.maxSeconds = Number.isFinite(max) && max > 0 ? Math.max(0, max - resolutionNs) / 1e9 : 0;
    this.histogram.reset();
  }

  close(): void {
    clearInterval(this.timer);
    this.histogram.disable();
  }
}

export class DaemonStats {
  private usage: Usage = { atMs: 0, allocated: new Map(), images: [], pools: [], tier: undefined };
  private refreshing: Promise<void> | null = null;
  private readonly lag = new EventLoopLag();

  constructor(
    private readonly sources: StatsSources,
    private readonly startedMs = Date.now(),
  ) {}

  /** The snapshot now, space figures from the cache (an old cache is refreshed in the background). */
  snapshot(): StatsSnapshot {
    if (Date.now() - this.usage.atMs >= usageBackgroundRefreshMs) void this.refresh();
    return this.build(heatTopDefault);
  }

  /** The snapshot with space figures at most usageRefreshMs old, with `heatTop` hottest extents per disk. */
  async fresh(heatTop: number = heatTopDefault): Promise<StatsSnapshot> {
    if (Date.now() - this.usage.atMs >= usageRefreshMs) await this.refresh();
    return this.build(heatTop);
  }

  close(): void {
    this.lag.close();
  }

  private refresh(): Promise<void> {
    this.refreshing ??= this.measureUsage()
      .then(
        (usage) => {
          this.usage = usage;
        },
        (err: unknown) => this.sources.log?.(`stats: measuring space failed: ${String(err)}`),
      )
      .finally(() => {
        this.refreshing = null;
      });
    return this.refreshing;
  }

  private async measureUsage(): Promise<Usage> {
    const { registry } = this.sources;
    const allocated = await registry.allocatedBytes();
    const images = registry.monitorImages();
    const pools = await Promise.all(registry.pools().map((pool) => poolStats(pool.name, pool.dir)));
    const tier = registry.tier ? tierStats(await registry.tier.status(undefined, "tiered")) : undefined;
    return { atMs: Date.now(), allocated, images, pools, tier };
  }

  private build(heatTop: number): StatsSnapshot {
    const { registry, recorder, server } = this.sources;
    const top = Math.max(0, Math.min(heatTopMax, Math.floor(heatTop)));
    const activity = recorder.activity();
    const monitorDisks = registry.monitorDisks();
    recorder.retainHeat(new Set(monitorDisks.map((disk) => disk.name)));
    const enabled = recorder.enabled;
    const disks: DiskStats[] = monitorDisks.map((disk) => {
      const active = activity.get(disk.name);
      return {
        name: disk.name,
        format: disk.format,
        pool: disk.pool,
        sizeBytes: disk.sizeBytes,
        allocatedBytes: this.usage.allocated.get(disk.name) ?? 0,
        snapshots: disk.snapshots,
        ops: active?.ops ?? emptyOpCounters(),
        errorsByCode: active?.errorsByCode ?? {},
        inflight: active?.inflight ?? 0,
        clients: active?.clients ?? [],
        engine: engineCounters(disk.engine),
        monitorEnabled: enabled,
        activity: active?.activity ?? null,
        heat: enabled ? recorder.heatStats(disk.name, top) : null,
        profile: enabled ? recorder.profile(disk.name) : null,
      };
    });
    const serverStats = server.stats();
    const memory = process.memoryUsage();
    const nowMs = Date.now();
    return {
      timeMs: nowMs,
      uptimeSeconds: (nowMs - this.startedMs) / 1000,
      disks,
      server: {
        connections: serverStats.connections,
        connectionsTotal: serverStats.connectionsTotal,
        protocolErrors: serverStats.protocolErrors,
        connectionsRefused: serverStats.connectionsRefused,
      },
      process: {
        residentBytes: memory.rss,
        heapUsedBytes: memory.heapUsed,
        eventLoopLagSeconds: this.lag.meanSeconds,
        eventLoopLagMaxSeconds: this.lag.maxSeconds,
      },
      pools: this.usage.pools,
      images: this.usage.images,
      ...(this.sources.indexCache ? { indexCache: this.sources.indexCache.stats() } : {}),
      ...(this.usage.tier ? { tier: this.usage.tier } : {}),
      monitor: {
        enabled,
        heatHalfLifeSeconds: recorder.heatHalfLifeSeconds,
        memoryBytes: recorder.memoryBytes(),
      },
    };
  }
}

/** The figures of a TierStatus that the stats and /metrics carry. */
function tierStats(status: TierStatus): TierStats {
  return {
    pools: status.pools.map((pool) => ({
      name: pool.name,
      policy: pool.policy,
      devices: pool.devices.map((device) => ({
        id: device.id,
        class: device.class,
        capacity: device.capacity,
        usedBytes: device.usedBytes,
        queue: device.queue ? { queued: device.queue.queued, requests: device.queue.requests } : null,
      })),
      moving: { running: pool.moving.running, queued: pool.moving.queued },
      migratedBytes: pool.migratedBytes,
      passes: pool.passes,
    })),
    disks: status.disks.map((disk) => ({
      name: disk.name,
      pool: disk.pool,
      priority: disk.priority,
      classes: disk.classes,
    })),
  };
}

async function poolStats(name: string, dir: string): Promise<PoolStats> {
  try {
    const stats = await fs.promises.statfs(dir);
    return {
      name,
      capacityBytes: stats.blocks * stats.bsize,
      usedBytes: (stats.blocks - stats.bfree) * stats.bsize,
      availableBytes: stats.bavail * stats.bsize,
    };
  } catch {
    return { name, capacityBytes: 0, usedBytes: 0, availableBytes: 0 };
  }
}
