/**
 * Every limit of vdisk in one place, with the relationships between them asserted at load time.
 * Units are carried last in the names. Each limit is a default: the daemon's configuration may lower or
 * raise the ones marked configurable, within the bounds asserted here.
 */
import { assert } from "./errors";

export const KiB = 1024;
export const MiB = 1024 * KiB;
export const GiB = 1024 * MiB;
export const TiB = 1024 * GiB;

/** NBD: the largest READ/WRITE payload we accept (configurable). The spec asks servers to take 2^25. */
export const requestBytesMaxDefault = 32 * MiB;
/** NBD: absolute ceiling for the configurable payload maximum. */
export const requestBytesMaxCeiling = 256 * MiB;
/** NBD: block sizes advertised in NBD_INFO_BLOCK_SIZE. Any alignment works; 4 KiB is preferred. */
export const blockBytesMin = 1;
export const blockBytesPreferred = 4 * KiB;

/** NBD: requests in flight per connection before we stop reading the socket (configurable). */
export const inflightPerConnectionMaxDefault = 128;
/**
 * Image index: memory for resident index leaves, shared by every open image (configurable,
 * `vdisk serve --index-cache`). 64 MiB holds ~13k leaves: the maps of ~26 GiB written in scattered 4 KiB
 * blocks, or of any amount written sequentially (collapsed ranges need no leaf).
 */
export const indexCacheBytesDefault = 64 * MiB;

/** NBD: simultaneous client connections (configurable). */
export const connectionsMaxDefault = 256;
/**
 * NBD: on a Unix socket, replies of at least this many bytes are written by the connection's writer
 * thread, smaller ones (and over TCP all) by the event loop (protocol/nbd/reply-writer.ts; configurable,
 * `vdisk serve --reply-thread`). 32 KiB: a 64 KiB read's socket copy then overlaps the next pread, while 4 KiB replies, for which a
 * thread hand-off costs more than the copy, stay on the loop (docs/nbd-server.md, "Reply writer").
 */
export const replyThreadBytesDefault = 32 * KiB;
/** NBD: bytes of reply data queued on one socket before we stop reading new requests. */
export const socketQueuedBytesMax = 64 * MiB;

/** NBD handshake: option payload we buffer; larger options are skipped and refused with TOO_BIG. */
export const optionBytesMax = 64 * KiB;
/** NBD handshake: options per connection before the server gives up on the client. */
export const optionsPerHandshakeMax = 4096;
/** NBD handshake: time a client may take to reach transmission (configurable). */
export const handshakeTimeoutMsDefault = 30_000;
/** NBD strings (export names, meta context names) are limited to 4096 bytes by the spec. */
export const nameBytesMax = 4096;
/** NBD block status: extents in one reply chunk. */
export const blockStatusExtentsMax = 32 * KiB;
/** NBD meta contexts selectable per connection. */
export const metaContextsMax = 16;

/** Disks: names are short, printable, path-safe. */
export const diskNameBytesMax = 128;
/** Disks: size bounds. Sizes are multiples of 512 bytes. */
export const diskBytesMin = 512;
export const diskBytesMax = 2 ** 52; // 4 PiB, well inside Number.MAX_SAFE_INTEGER
export const diskBytesAlignment = 512;
/** The disk created on the first start of `vdisk serve`. */
export const defaultDiskName = "default";
export const defaultDiskBytes = 8 * GiB;

/** Jobs (import/export): copy unit and copies in flight. */
export const copyChunkBytes = 1 * MiB;
export const copyChunksInflight = 4;

/** Daemon shutdown: time to drain in-flight requests before connections are cut. */
export const drainTimeoutMs = 10_000;

/** NBD client tags (export name DISK/TAG, docs/monitor.md): 1 to this many of [A-Za-z0-9._-]. */
export const clientTagBytesMax = 64;
/** Monitor: extents of the heat map are at least this large (and a power of two)... */
export const heatExtentBytesMin = 1 * MiB;
/** ...and coarser when needed, so that a disk has at most this many extents (8 bytes each: 512 KiB). */
export const heatExtentsMax = 64 * KiB;
/** Monitor: half-life of extent heat and of the decayed workload profile. */
export const heatHalfLifeSecondsDefault = 60;
/** Monitor: hottest extents listed in the stats (GET /v1/stats; GET /v1/disks/NAME/stats takes ?top=N). */
export const heatTopDefault = 8;
export const heatTopMax = 1024;
/** Monitor: the workload profile calls a read or write "small" up to this size, "large" above it. */
export const profileSmallBytesMax = 64 * KiB;

/** Replay: bytes read from a trace file at a time. */
export const traceChunkBytes = 1 * MiB;
/** Replay: records parsed per batch. */
export const traceBatchRecords = 4096;
/** Replay: a longer line is not a trace line; reading stops with an error instead of buffering it. */
export const traceLineBytesMax = 64 * KiB;
/** Replay: distinct device/ASU numbers a trace summary tracks (each gets its own address range). */
export const traceDevicesMax = 64 * KiB;
/** Replay: requests in flight per VM unless --queue-depth says otherwise. */
export const replayQueueDepthDefault = 64;
/** Replay: NBD connections per VM at most (--connections). */
export const replayConnectionsMax = 64;
/** Replay: the fastest --speed accepted. */
export const replaySpeedMax = 1e6;
/** Replay: bytes of pseudo-random data that writes are cut from (plus the largest write). */
export const replayWritePoolBytes = 1 * MiB;

/** NBD client: requests in flight per connection unless the caller says otherwise. */
export const clientInflightMaxDefault = 64;
/** NBD client: ceiling for its in-flight limit (cookies carry the slot index; memory is one slot each). */
export const clientInflightMaxCeiling = 64 * KiB;
/** NBD client: requests waiting for a slot before new ones are refused with LIMIT. */
export const clientQueuedMax = 1_000_000;
/** NBD client: how long connecting and the handshake may take. */
export const clientConnectTimeoutMsDefault = 30_000;

assert(requestBytesMaxDefault >= blockBytesPreferred, "request max below preferred block size");
assert(requestBytesMaxDefault <= requestBytesMaxCeiling, "request max above ceiling");
assert(requestBytesMaxCeiling < 2 ** 32, "NBD lengths are 32-bit");
assert(diskBytesMax <= Number.MAX_SAFE_INTEGER, "disk offsets must be exact in a JS number");
assert(defaultDiskBytes % diskBytesAlignment === 0, "default disk size aligned");
assert(copyChunkBytes <= requestBytesMaxDefault, "copy chunk within request max");
assert(clientTagBytesMax + 1 + diskNameBytesMax * 2 < nameBytesMax, "DISK@SNAP/TAG fits an NBD name");
assert(Number.isInteger(Math.log2(heatExtentBytesMin)), "heat extents are powers of two");
assert(Number.isInteger(Math.log2(heatExtentsMax)), "heat extent count bound is a power of two");
assert(diskBytesMax / heatExtentsMax <= 2 ** 40, "heat extents of the largest disk stay exact");
assert(heatTopDefault <= heatTopMax && heatTopMax <= heatExtentsMax, "heat top bounds");
assert(replayQueueDepthDefault <= clientInflightMaxCeiling, "replay queue depth within the client's ceiling");
assert(clientInflightMaxDefault <= clientInflightMaxCeiling, "client in-flight default within its ceiling");
assert(traceLineBytesMax <= traceChunkBytes, "a trace line fits one chunk");
