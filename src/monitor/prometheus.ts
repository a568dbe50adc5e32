/**
 * The Prometheus exporter behind `GET /metrics` (text format 0.0.4), built on prom-client.
 *
 * One dedicated prom-client Registry per daemon holds prom-client's default metrics (process memory and
 * CPU, heap, GC, event-loop lag: `process_*`, `nodejs_*`) and vdisk's own families. The vdisk families
 * are custom metric objects: each renders its samples from the StatsSnapshot taken for the scrape in
 * progress, so the NBD hot path never touches prom-client — it only bumps the recorder's arrays.
 * Scrapes are serialised (each one takes its own snapshot, then renders it).
 *
 * Every family is documented in docs/metrics.md; keep the two in step.
 */
import { type Metric, Registry, collectDefaultMetrics } from "prom-client";
import {
  type EngineCounters,
  type IndexCacheCounters,
  interArrivalBucketsSeconds,
  latencyBucketsSeconds,
  opKinds,
  type OpKind,
  queueDepthBuckets,
  requestSizeBucketsBytes,
  type StatsSnapshot,
  type TierPoolStats,
} from "./types";

type MetricType = "counter" | "gauge" | "histogram";
type Labels = Record<string, string>;

interface Sample {
  /** Defaults to the family's name; histograms use NAME_bucket, NAME_sum, NAME_count. */
  metricName?: string;
  labels: Labels;
  value: number;
}

interface Family {
  name: string;
  help: string;
  type: MetricType;
  samples(stats: StatsSnapshot): Sample[];
}

/** Op kinds as Prometheus label values (snake_case). */
export const opLabels: Record<OpKind, string> = {
  read: "read",
  write: "write",
  zero: "zero",
  trim: "trim",
  flush: "flush",
  cache: "cache",
  blockStatus: "block_status",
};

function engineFamilies(): Family[] {
  const engine = (name: string, help: string, type: MetricType, field: keyof EngineCounters): Family =>
    perDisk(name, help, type, (disk) => disk.engine?.[field] ?? 0);
  return [
    engine(
      "vdisk_engine_submitted_total",
      "Requests the disk's request engine accepted from front ends.",
      "counter",
      "submitted",
    ),
    engine(
      "vdisk_engine_dispatched_total",
      "Requests the engine sent to the device (after merging and splitting).",
      "counter",
      "dispatched",
    ),
    engine(
      "vdisk_engine_merged_total",
      "Requests absorbed into a neighbour by merging.",
      "counter",
      "merged",
    ),
    engine(
      "vdisk_engine_split_total",
      "Extra device requests made by splitting large ones.",
      "counter",
      "split",
    ),
    engine(
      "vdisk_engine_fast_path_reads_total",
      "Reads answered from the page cache on the event loop, without queueing.",
      "counter",
      "fastPathReads",
    ),
    engine(
      "vdisk_engine_overlap_waits_total",
      "Requests held back behind an overlapping earlier request.",
      "counter",
      "waitedForOverlap",
    ),
    engine("vdisk_engine_queued_requests", "Requests waiting in the engine's queue.", "gauge", "queued"),
    engine("vdisk_engine_inflight_requests", "Requests at the device.", "gauge", "inflight"),
  ];
}

function perDisk(
  name: string,
  help: string,
  type: MetricType,
  value: (disk: StatsSnapshot["disks"][number]) => number,
): Family {
  return {
    name,
    help,
    type,
    samples: (stats) => stats.disks.map((disk) => ({ labels: { disk: disk.name }, value: value(disk) })),
  };
}

function perOp(name: string, help: string, field: "ops" | "bytes"): Family {
  return {
    name,
    help,
    type: "counter",
    samples: (stats) =>
      stats.disks.flatMap((disk) =>
        opKinds.map((op) => ({ labels: { disk: disk.name, op: opLabels[op] }, value: disk.ops[op][field] })),
      ),
  };
}

function perClientOp(name: string, help: string, field: "ops" | "bytes"): Family {
  return {
    name,
    help,
    type: "counter",
    samples: (stats) =>
      stats.disks.flatMap((disk) =>
        disk.clients.flatMap((client) =>
          opKinds.map((op) => ({
            labels: { disk: disk.name, export: client.export, client: String(client.id), op: opLabels[op] },
            value: client.ops[op][field],
          })),
        ),
      ),
  };
}

function latencyHistogram(): Family {
  const name = "vdisk_request_duration_seconds";
  return {
    name,
    help: "Time from a request's dispatch to its reply, by disk and op (ops that had requests).",
    type: "histogram",
    samples: (stats) => {
      const samples: Sample[] = [];
      for (const disk of stats.disks) {
        for (const op of opKinds) {
          const counters = disk.ops[op];
          if (counters.ops === 0) continue;
          const labels = { disk: disk.name, op: opLabels[op] };
          let cumulative = 0;
          counters.latencyBuckets.forEach((count, index) => {
            cumulative += count;
            const bound = latencyBucketsSeconds[index];
            const le = bound === undefined ? "+Inf" : String(bound);
            samples.push({ metricName: `${name}_bucket`, labels: { ...labels, le }, value: cumulative });
          });
          samples.push({ metricName: `${name}_sum`, labels, value: counters.latencySecondsSum });
          samples.push({ metricName: `${name}_count`, labels, value: counters.ops });
        }
      }
      return samples;
    },
  };
}

/** Histogram samples (_bucket cumulative, _sum, _count) from per-bucket counts; none when empty. */
function histogramSamples(
  name: string,
  labels: Labels,
  bounds: readonly number[],
  buckets: readonly number[],
  sum: number,
): Sample[] {
  const count = buckets.reduce((total, value) => total + value, 0);
  if (count === 0) return [];
  const samples: Sample[] = [];
  let cumulative = 0;
  buckets.forEach((value, index) => {
    cumulative += value;
    const bound = bounds[index];
    const le = bound === undefined ? "+Inf" : String(bound);
    samples.push({ metricName: `${name}_bucket`, labels: { ...labels, le }, value: cumulative });
  });
  samples.push({ metricName: `${name}_sum`, labels, value: sum });
  samples.push({ metricName: `${name}_count`, labels, value: count });
  return samples;
}

/** The monitor's workload families (docs/monitor.md): sizes, patterns, arrivals, depth, heat, profile. */
function workloadFamilies(): Family[] {
  const readWrite = ["read", "write"] as const;
  const sizes = "vdisk_request_size_bytes";
  const arrivals = "vdisk_request_interarrival_seconds";
  const depth = "vdisk_request_queue_depth";
  return [
    {
      name: sizes,
      help: "Sizes of reads and writes as they arrive (failed ones too), by disk and op.",
      type: "histogram",
      samples: (stats) =>
        stats.disks.flatMap((disk) => {
          const activity = disk.activity;
          if (!activity) return [];
          return readWrite.flatMap((op) =>
            histogramSamples(
              sizes,
              { disk: disk.name, op },
              requestSizeBucketsBytes,
              activity.sizeBuckets[op],
              activity.sizeBytesSum[op],
            ),
          );
        }),
    },
    {
      name: "vdisk_request_pattern_total",
      help: "Reads and writes that started where the client's previous request ended (sequential) or not (random).",
      type: "counter",
      samples: (stats) =>
        stats.disks.flatMap((disk) => {
          const activity = disk.activity;
          if (!activity) return [];
          return readWrite.flatMap((op) => [
            { labels: { disk: disk.name, op, pattern: "sequential" }, value: activity.sequential[op] },
            { labels: { disk: disk.name, op, pattern: "random" }, value: activity.random[op] },
          ]);
        }),
    },
    {
      name: arrivals,
      help: "Time between successive requests to the disk (any of its clients).",
      type: "histogram",
      samples: (stats) =>
        stats.disks.flatMap((disk) =>
          disk.activity
            ? histogramSamples(
                arrivals,
                { disk: disk.name },
                interArrivalBucketsSeconds,
                disk.activity.interArrival.buckets,
                disk.activity.interArrival.secondsSum,
              )
            : [],
        ),
    },
    {
      name: depth,
      help: "Requests of the disk in flight when a request arrives, the arriving one included.",
      type: "histogram",
      samples: (stats) =>
        stats.disks.flatMap((disk) =>
          disk.activity
            ? histogramSamples(
                depth,
                { disk: disk.name },
                queueDepthBuckets,
                disk.activity.queueDepth.buckets,
                disk.activity.queueDepth.sum,
              )
            : [],
        ),
    },
    {
      name: "vdisk_disk_heat",
      help: "Sum of the disk's extent heat: accesses to its extents, each halved every half-life.",
      type: "gauge",
      samples: (stats) =>
        stats.disks.flatMap((disk) =>
          disk.heat ? [{ labels: { disk: disk.name }, value: disk.heat.total }] : [],
        ),
    },
    {
      name: "vdisk_disk_random_small_ratio",
      help: "Share of the disk's recent reads and writes that were random and small (decayed, 0 to 1).",
      type: "gauge",
      samples: (stats) =>
        stats.disks.flatMap((disk) =>
          disk.profile ? [{ labels: { disk: disk.name }, value: disk.profile.randomSmallFraction }] : [],
        ),
    },
    {
      name: "vdisk_disk_sequential_large_ratio",
      help: "Share of the disk's recent reads and writes that were sequential and large (decayed, 0 to 1).",
      type: "gauge",
      samples: (stats) =>
        stats.disks.flatMap((disk) =>
          disk.profile ? [{ labels: { disk: disk.name }, value: disk.profile.sequentialLargeFraction }] : [],
        ),
    },
    {
      name: "vdisk_monitor_enabled",
      help: "1 when the daemon records requests, 0 with vdisk serve --monitor off.",
      type: "gauge",
      samples: (stats) => (stats.monitor ? [{ labels: {}, value: stats.monitor.enabled ? 1 : 0 }] : []),
    },
    {
      name: "vdisk_monitor_memory_bytes",
      help: "Memory of the monitor's counters and heat maps.",
      type: "gauge",
      samples: (stats) => (stats.monitor ? [{ labels: {}, value: stats.monitor.memoryBytes }] : []),
    },
  ];
}

/** vdisk's metric families, in the order they are exposed. */
export function vdiskFamilies(version: string): Family[] {
  return [
    {
      name: "vdisk_build_info",
      help: "Always 1; the vdisk version as a label.",
      type: "gauge",
      samples: () => [{ labels: { version }, value: 1 }],
    },
    perOp("vdisk_requests_total", "NBD requests answered, failed ones included, by disk and op.", "ops"),
    perOp(
      "vdisk_request_bytes_total",
      "Bytes of successful requests by disk and op (read/write: payload; zero/trim/cache/block_status: range).",
      "bytes",
    ),
    {
      name: "vdisk_request_errors_total",
      help: "NBD requests answered with an error, by disk and vdisk error code.",
      type: "counter",
      samples: (stats) =>
        stats.disks.flatMap((disk) =>
          Object.entries(disk.errorsByCode).map(([code, count]) => ({
            labels: { disk: disk.name, code },
            value: count,
          })),
        ),
    },
    latencyHistogram(),
    ...workloadFamilies(),
    perDisk(
      "vdisk_inflight_requests",
      "Requests dispatched and not yet answered, by disk.",
      "gauge",
      (d) => d.inflight,
    ),
    perDisk(
      "vdisk_connections",
      "NBD clients connected to the disk or its snapshots.",
      "gauge",
      (d) => d.clients.length,
    ),
    perDisk("vdisk_disk_size_bytes", "Virtual size of the disk.", "gauge", (d) => d.sizeBytes),
    perDisk(
      "vdisk_disk_allocated_bytes",
      "Bytes of storage the disk's data maps.",
      "gauge",
      (d) => d.allocatedBytes,
    ),
    perDisk("vdisk_snapshots", "Snapshots of the disk.", "gauge", (d) => d.snapshots),
    ...engineFamilies(),
    {
      name: "vdisk_disk_info",
      help: "Always 1; the disk's format and pool as labels.",
      type: "gauge",
      samples: (stats) =>
        stats.disks.map((disk) => ({
          labels: { disk: disk.name, format: disk.format, pool: disk.pool ?? "" },
          value: 1,
        })),
    },
    perClientOp("vdisk_client_requests_total", "Requests of a connected client, by op.", "ops"),
    perClientOp(
      "vdisk_client_request_bytes_total",
      "Bytes of a connected client's successful requests, by op.",
      "bytes",
    ),
    {
      name: "vdisk_client_inflight_requests",
      help: "Requests of a connected client not yet answered.",
      type: "gauge",
      samples: (stats) =>
        stats.disks.flatMap((disk) =>
          disk.clients.map((client) => ({
            labels: { disk: disk.name, export: client.export, client: String(client.id) },
            value: client.inflight,
          })),
        ),
    },
    {
      name: "vdisk_client_info",
      help: "Always 1 per connected client; where it comes from and its tag (or empty) as labels.",
      type: "gauge",
      samples: (stats) =>
        stats.disks.flatMap((disk) =>
          disk.clients.map((client) => ({
            labels: {
              disk: disk.name,
              export: client.export,
              client: String(client.id),
              peer: client.peer,
              tag: client.tag ?? "",
            },
            value: 1,
          })),
        ),
    },
    ...poolFamilies(),
    ...imageFamilies(),
    ...tierFamilies(),
    ...indexCacheFamilies(),
    {
      name: "vdisk_nbd_connections",
      help: "Open NBD connections (handshake included).",
      type: "gauge",
      samples: (stats) => [{ labels: {}, value: stats.server.connections }],
    },
    {
      name: "vdisk_nbd_connections_total",
      help: "NBD connections accepted since the daemon started.",
      type: "counter",
      samples: (stats) => [{ labels: {}, value: stats.server.connectionsTotal }],
    },
    {
      name: "vdisk_nbd_connections_refused_total",
      help: "NBD connections refused (connection limit, shutdown).",
      type: "counter",
      samples: (stats) => [{ labels: {}, value: stats.server.connectionsRefused ?? 0 }],
    },
    {
      name: "vdisk_nbd_protocol_errors_total",
      help: "NBD connections closed for a protocol violation.",
      type: "counter",
      samples: (stats) => [{ labels: {}, value: stats.server.protocolErrors }],
    },
  ];
}

function poolFamilies(): Family[] {
  const pool = (
    name: string,
    help: string,
    field: "capacityBytes" | "usedBytes" | "availableBytes",
  ): Family => ({
    name,
    help,
    type: "gauge",
    samples: (stats) => (stats.pools ?? []).map((p) => ({ labels: { pool: p.name }, value: p[field] })),
  });
  return [
    pool("vdisk_pool_capacity_bytes", "Size of the file system holding the pool.", "capacityBytes"),
    pool(
      "vdisk_pool_used_bytes",
      "Bytes used on the file system holding the pool (by anything).",
      "usedBytes",
    ),
    pool(
      "vdisk_pool_available_bytes",
      "Bytes still available to the daemon on the pool's file system.",
      "availableBytes",
    ),
  ];
}

function indexCacheFamilies(): Family[] {
  type Field = Exclude<keyof IndexCacheCounters, "limitBytes">;
  const cache = (name: string, help: string, type: MetricType, field: Field): Family => ({
    name,
    help,
    type,
    samples: (stats) => (stats.indexCache ? [{ labels: {}, value: stats.indexCache[field] }] : []),
  });
  return [
    cache(
      "vdisk_index_cache_hits_total",
      "Index leaf lookups that found the leaf in memory.",
      "counter",
      "hits",
    ),
    cache(
      "vdisk_index_cache_misses_total",
      "Index leaf lookups that had to read the leaf.",
      "counter",
      "misses",
    ),
    cache(
      "vdisk_index_cache_loads_total",
      "Index leaves read back from the image files.",
      "counter",
      "loads",
    ),
    cache(
      "vdisk_index_cache_evictions_total",
      "Index leaves dropped from memory to stay within the limit.",
      "counter",
      "evictions",
    ),
    cache(
      "vdisk_index_cache_resident_bytes",
      "Memory held by resident index leaves.",
      "gauge",
      "residentBytes",
    ),
    {
      name: "vdisk_index_cache_limit_bytes",
      help: "The index cache's limit (vdisk serve --index-cache); absent when unlimited.",
      type: "gauge",
      samples: (stats) => {
        const limit = stats.indexCache?.limitBytes;
        return typeof limit === "number" && Number.isFinite(limit) ? [{ labels: {}, value: limit }] : [];
      },
    },
  ];
}

function imageFamilies(): Family[] {
  type Field = "commits" | "regroups" | "fileBytes" | "dataBytes" | "indexBytes" | "freeBytes";
  const image = (name: string, help: string, type: MetricType, field: Field): Family => ({
    name,
    help,
    type,
    samples: (stats) => (stats.images ?? []).map((i) => ({ labels: { image: i.file }, value: i[field] })),
  });
  return [
    image(
      "vdisk_image_commits_total",
      "Commits (durable metadata updates) of the image.",
      "counter",
      "commits",
    ),
    image(
      "vdisk_image_regroups_total",
      "Leaves the background regrouping rewrote contiguously.",
      "counter",
      "regroups",
    ),
    image("vdisk_image_file_bytes", "Size of the image file.", "gauge", "fileBytes"),
    image("vdisk_image_data_bytes", "Data bytes referenced by the image's layers.", "gauge", "dataBytes"),
    image("vdisk_image_index_bytes", "Bytes of index nodes of the image.", "gauge", "indexBytes"),
    image("vdisk_image_free_bytes", "Free bytes inside the image file, reusable.", "gauge", "freeBytes"),
  ];
}

function tierFamilies(): Family[] {
  type Device = TierPoolStats["devices"][number];
  const device = (
    name: string,
    help: string,
    type: MetricType,
    value: (device: Device) => number | null,
  ): Family => ({
    name,
    help,
    type,
    samples: (stats) =>
      (stats.tier?.pools ?? []).flatMap((pool) =>
        pool.devices.flatMap((d) => {
          const v = value(d);
          return v === null
            ? []
            : [{ labels: { pool: pool.name, device: String(d.id), class: d.class }, value: v }];
        }),
      ),
  });
  const pool = (
    name: string,
    help: string,
    type: MetricType,
    value: (pool: TierPoolStats) => number,
  ): Family => ({
    name,
    help,
    type,
    samples: (stats) => (stats.tier?.pools ?? []).map((p) => ({ labels: { pool: p.name }, value: value(p) })),
  });
  return [
    {
      name: "vdisk_tier_pool_info",
      help: "Always 1 per pool; its placement policy as a label.",
      type: "gauge",
      samples: (stats) =>
        (stats.tier?.pools ?? []).map((p) => ({ labels: { pool: p.name, policy: p.policy }, value: 1 })),
    },
    device(
      "vdisk_tier_device_capacity_bytes",
      "Bytes the pool may place on the device (absent: no limit).",
      "gauge",
      (d) => d.capacity,
    ),
    device(
      "vdisk_tier_device_used_bytes",
      "Data blocks the pool's images keep on the device, in bytes.",
      "gauge",
      (d) => d.usedBytes,
    ),
    device(
      "vdisk_tier_device_requests_total",
      "Requests submitted to an emulated device's queue (emulated devices only).",
      "counter",
      (d) => d.queue?.requests ?? null,
    ),
    device(
      "vdisk_tier_device_queued_requests",
      "Requests waiting in an emulated device's priority queue (emulated devices only).",
      "gauge",
      (d) => d.queue?.queued ?? null,
    ),
    pool(
      "vdisk_tier_migrated_bytes_total",
      "Bytes moved between the pool's devices by placement passes and device removals.",
      "counter",
      (p) => p.migratedBytes,
    ),
    pool("vdisk_tier_passes_total", "Placement passes the pool finished.", "counter", (p) => p.passes),
    pool(
      "vdisk_tier_migrations_queued",
      "Moves the running pass still has to make (0 when no pass runs).",
      "gauge",
      (p) => p.moving.queued,
    ),
    {
      name: "vdisk_tier_disk_bytes",
      help: "Data of a disk's view on each class of its pool (disks of pools with several devices).",
      type: "gauge",
      samples: (stats) =>
        (stats.tier?.disks ?? []).flatMap((disk) =>
          Object.entries(disk.classes).map(([cls, bytes]) => ({
            labels: { disk: disk.name, pool: disk.pool, class: cls },
            value: bytes,
          })),
        ),
    },
  ];
}

export class MetricsExporter {
  readonly contentType = Registry.PROMETHEUS_CONTENT_TYPE;
  private readonly registry = new Registry();
  private current: StatsSnapshot | null = null;
  private queue: Promise<unknown> = Promise.resolve();

  constructor(
    private readonly source: () => Promise<StatsSnapshot>,
    version: string,
  ) {
    collectDefaultMetrics({ register: this.registry });
    for (const family of vdiskFamilies(version)) this.registry.registerMetric(this.metricOf(family));
  }

  private metricOf(family: Family): Metric {
    const metric = {
      name: family.name,
      help: family.help,
      type: family.type,
      aggregator: "sum",
      get: async () => {
        const stats = this.current;
        return {
          name: family.name,
          help: family.help,
          type: family.type,
          aggregator: "sum",
          values: stats === null ? [] : family.samples(stats),
        };
      },
      reset: () => undefined,
    };
    return metric as unknown as Metric;
  }

  /** One scrape: a fresh snapshot, then every family rendered from it. */
  text(): Promise<string> {
    const scrape = this.queue.then(async () => {
      this.current = await this.source();
      try {
        return await this.registry.metrics();
      } finally {
        this.current = null;
      }
    });
    this.queue = scrape.catch(() => undefined);
    return scrape;
  }
}
