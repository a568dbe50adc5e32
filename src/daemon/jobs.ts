/**
 * Jobs: long operations (import of a raw image into a new disk, export of a disk into a raw image) that run
 * in the background while the API answers at once with a job the CLI polls.
 *
 * Both copy in limits.copyChunkBytes chunks with limits.copyChunksInflight workers pulling the next chunk,
 * and both keep the result thin: an all-zero chunk is never written (a new disk and a freshly truncated
 * file already read as zeros there). Export asks the device's blockStatus first and reads only the extents
 * that hold data. Everything goes through the device verbs, so a disk can be imported into or exported
 * while clients use it, and a resize or delete waits for the job (the job pins its disk).
 *
 * Images in other formats (qcow2, and whatever else qemu-img reads) go through qemu-img (qemu-img.ts) and the
 * daemon's own NBD server: import creates a disk of the image's virtual size, then runs
 * `qemu-img convert -n -O raw FILE nbd+unix:///NAME?socket=...`; export runs
 * `qemu-img convert -O qcow2 nbd+unix:///NAME?socket=... FILE`. Imports detect the format (--format auto):
 * the qcow2 magic, else qemu-img info, else (no qemu-img) raw. A snapshot DISK@SNAP exports like a disk.
 *
 * A failed import deletes the disk it created; a failed export removes the file it created. Finished jobs
 * are kept (at most jobsKeptMax of them) so the CLI can read the outcome.
 */
import * as fs from "node:fs";
import * as path from "node:path";
import { VdiskError, fromSystemError, type ErrorCode } from "../errors";
import { copyChunkBytes, copyChunksInflight } from "../limits";
import { ExtentFlags, type BlockDevice } from "../devices/block-device";
import { blockStatusAsync, flushAsync, readAsync, usageAsync, writeAsync } from "../devices/promises";
import { checkDiskSize, formatSize, roundUpToAlignment } from "../util/size";
import { validateDiskName } from "./catalog";
import { qcow2Magic, qemuImgConvert, qemuImgInfo, type Conversion } from "./qemu-img";
import type { DiskRegistry } from "./registry";

export const importFormats = ["auto", "raw", "qcow2"] as const;
export type ImportFormat = (typeof importFormats)[number];
export const exportFormats = ["raw", "qcow2"] as const;
export type ExportFormat = (typeof exportFormats)[number];

/** Where the daemon's NBD server listens, for qemu-img to reach it. */
export interface NbdEndpoint {
  unix: string | null;
  tcp: { host: string; port: number } | null;
}

export type JobKind = "import" | "export";
export type JobState = "running" | "done" | "failed";

/** A job as the API shows it. `file` is the base name only: no paths outside the home in responses. */
export interface JobView {
  id: number;
  kind: JobKind;
  state: JobState;
  disk: string;
  file: string;
  /** The image file's format: raw, qcow2 (or another format qemu-img read). */
  format: string;
  bytesDone: number;
  bytesTotal: number;
  /** Bytes actually written (data); the rest were holes or zeros that were skipped. */
  bytesWritten: number;
  rateBytesPerSecond: number;
  startedAt: string;
  finishedAt: string | null;
  error: { code: ErrorCode; message: string; hint: string | null } | null;
}

interface Job {
  view: JobView;
  startedMs: number;
  cancelled: boolean;
  done: Promise<void>;
  /** Stops an external helper (qemu-img) at shutdown. */
  stop: (() => void) | null;
}

export const jobsKeptMax = 64;
/** blockStatus is asked about at most this much at a time (NBD lengths are 32-bit). */
const statusBytesMax = 1 << 30;
const zeroChunk = Buffer.alloc(copyChunkBytes);

export class JobManager {
  private readonly jobs = new Map<number, Job>();
  private nextId = 1;
  private nbd: NbdEndpoint = { unix: null, tcp: null };

  constructor(private readonly registry: DiskRegistry) {}

  /** Tell the jobs where the NBD server listens (qemu-img conversions connect to it). */
  setNbdEndpoint(endpoint: NbdEndpoint): void {
    this.nbd = endpoint;
  }

  private nbdUri(exportName: string): string {
    const name = encodeURIComponent(exportName);
    if (this.nbd.unix !== null) return `nbd+unix:///${name}?socket=${this.nbd.unix}`;
    const tcp = this.nbd.tcp;
    if (tcp !== null) {
      const host = tcp.host.includes(":") ? `[${tcp.host}]` : tcp.host;
      return `nbd://${host === "0.0.0.0" ? "127.0.0.1" : host === "[::]" ? "[::1]" : host}:${tcp.port}/${name}`;
    }
    throw new VdiskError("NOT_SUPPORTED", "qemu-img conversions need the daemon's NBD server, which is off", {
      hint: "start the daemon without --socket none (or without --listen none)",
    });
  }

  get(id: number): JobView {
    const job = this.jobs.get(id);
    if (!job) throw new VdiskError("NOT_FOUND", `no job ${id}`, { hint: "GET /v1/jobs lists the jobs" });
    return this.snapshot(job);
  }

  list(): JobView[] {
    return [...this.jobs.values()].map((job) => this.snapshot(job));
  }

  running(): number {
    return [...this.jobs.values()].filter((job) => job.view.state === "running").length;
  }

  private snapshot(job: Job): JobView {
    const elapsedSeconds = Math.max((Date.now() - job.startedMs) / 1000, 0.001);
    const rate =
      job.view.state === "running"
        ? Math.round(job.view.bytesDone / elapsedSeconds)
        : job.view.rateBytesPerSecond;
    return { ...job.view, rateBytesPerSecond: rate, error: job.view.error ? { ...job.view.error } : null };
  }

  /**
   * Import the image `file` (absolute path) into a new thin vdisk disk `name`. Raw images are copied by the
   * daemon; others (qcow2, ...) by qemu-img through the daemon's NBD server.
   */
  async startImport(file: string, name: string, format: ImportFormat = "auto"): Promise<JobView> {
    validateDiskName(name);
    checkFormat(format, importFormats, "import");
    const source = await openSource(file);
    let detected: string;
    try {
      detected = await detectFormat(source.handle, file, format);
    } catch (err) {
      await source.handle.close();
      throw err;
    }
    if (detected !== "raw") {
      await source.handle.close();
      return this.startQemuImport(file, name, detected);
    }
    const id = this.nextId++;
    try {
      const diskBytes = checkDiskSize(roundUpToAlignment(Math.max(source.bytes, 1)));
      await this.registry.create(name, diskBytes, { pinFor: { jobId: id, what: "import" } });
    } catch (err) {
      await source.handle.close();
      throw err;
    }
    const device = this.registry.device(name);
    const job = this.add(id, "import", name, file, "raw", source.bytes);
    const release = async (): Promise<void> => {
      this.registry.unpin(name, id);
      await source.handle.close();
    };
    const undo = async (): Promise<void> => {
      await this.registry.delete(name, true).catch(() => undefined);
    };
    job.done = this.run(job, () => importCopy(job, source.handle, device), release, undo);
    return this.snapshot(job);
  }

  private async startQemuImport(file: string, name: string, format: string): Promise<JobView> {
    const info = await qemuImgInfo(file, format);
    const target = this.nbdUri(name);
    const id = this.nextId++;
    const diskBytes = checkDiskSize(roundUpToAlignment(Math.max(info.virtualSize, 1)));
    await this.registry.create(name, diskBytes, { pinFor: { jobId: id, what: "import" } });
    const job = this.add(id, "import", name, file, format, diskBytes);
    const release = async (): Promise<void> => this.registry.unpin(name, id);
    const undo = async (): Promise<void> => {
      await this.registry.delete(name, true).catch(() => undefined);
    };
    const work = async (): Promise<void> => {
      await this.convert(job, ["-n", "-f", format, "-O", "raw", file, target]);
      const device = this.registry.device(name);
      await flushAsync(device);
      job.view.bytesWritten = (await usageAsync(device)).allocatedBytes;
    };
    job.done = this.run(job, work, release, undo);
    return this.snapshot(job);
  }

  /** Export disk or snapshot `name` into a new file `file` (absolute path; it must not exist). */
  async startExport(name: string, file: string, format: ExportFormat = "raw"): Promise<JobView> {
    checkFormat(format, exportFormats, "export");
    const device = this.registry.device(name);
    if (format === "qcow2") return this.startQemuExport(name, file, device.size);
    const target = await createTarget(file, device.size);
    const id = this.nextId++;
    this.registry.pin(name, id, "export");
    const job = this.add(id, "export", name, file, "raw", device.size);
    const release = async (): Promise<void> => {
      this.registry.unpin(name, id);
      await target.close();
    };
    const undo = (): Promise<void> => fs.promises.rm(file, { force: true });
    job.done = this.run(job, () => exportCopy(job, device, target), release, undo);
    return this.snapshot(job);
  }

  private async startQemuExport(name: string, file: string, bytes: number): Promise<JobView> {
    const source = this.nbdUri(name);
    // Reserve the name (export never overwrites a file); qemu-img then writes the image into it.
    await (await createTarget(file, 0)).close();
    const id = this.nextId++;
    try {
      this.registry.pin(name, id, "export");
    } catch (err) {
      await fs.promises.rm(file, { force: true });
      throw err;
    }
    const job = this.add(id, "export", name, file, "qcow2", bytes);
    const release = async (): Promise<void> => this.registry.unpin(name, id);
    const undo = (): Promise<void> => fs.promises.rm(file, { force: true });
    const work = async (): Promise<void> => {
      await this.convert(job, ["-f", "raw", "-O", "qcow2", source, file]);
      job.view.bytesWritten = (await fs.promises.stat(file)).blocks * 512;
    };
    job.done = this.run(job, work, release, undo);
    return this.snapshot(job);
  }

  /** Run qemu-img convert for `job`, with its progress, stoppable at shutdown. */
  private async convert(job: Job, args: string[]): Promise<void> {
    checkCancelled(job);
    const conversion: Conversion = qemuImgConvert(args, (fraction) => {
      job.view.bytesDone = Math.round(fraction * job.view.bytesTotal);
    });
    job.stop = conversion.kill;
    try {
      await conversion.done;
    } finally {
      job.stop = null;
    }
    job.view.bytesDone = job.view.bytesTotal;
  }

  private add(
    id: number,
    kind: JobKind,
    disk: string,
    file: string,
    format: string,
    bytesTotal: number,
  ): Job {
    const view: JobView = {
      id,
      kind,
      state: "running",
      disk,
      file: path.basename(file),
      format,
      bytesDone: 0,
      bytesTotal,
      bytesWritten: 0,
      rateBytesPerSecond: 0,
      startedAt: new Date().toISOString(),
      finishedAt: null,
      error: null,
    };
    const job: Job = { view, startedMs: Date.now(), cancelled: false, done: Promise.resolve(), stop: null };
    this.jobs.set(id, job);
    this.prune();
    return job;
  }

  /** Do the work; always release (unpin, close files); on failure also undo. Never rejects. */
  private async run(
    job: Job,
    work: () => Promise<void>,
    release: () => Promise<void>,
    undo: () => Promise<void>,
  ): Promise<void> {
    let failure: unknown = null;
    try {
      await work();
    } catch (err) {
      failure = err;
    }
    await release().catch((err: unknown) => (failure ??= err));
    if (failure !== null) await undo().catch(() => undefined);
    this.finish(job, failure);
  }

  private finish(job: Job, err: unknown): void {
    const elapsedSeconds = Math.max((Date.now() - job.startedMs) / 1000, 0.001);
    job.view.rateBytesPerSecond = Math.round(job.view.bytesDone / elapsedSeconds);
    job.view.finishedAt = new Date().toISOString();
    job.view.state = err === null ? "done" : "failed";
    if (err !== null) {
      const error = err instanceof VdiskError ? err : fromSystemError(err, `${job.view.kind} failed`);
      job.view.error = { code: error.code, message: error.message, hint: error.hint ?? null };
    }
  }

  private prune(): void {
    for (const [id, job] of this.jobs) {
      if (this.jobs.size <= jobsKeptMax) return;
      if (job.view.state !== "running") this.jobs.delete(id);
    }
  }

  /** Daemon shutdown: stop every running job and wait for it to undo itself. */
  async cancelAll(): Promise<void> {
    const running = [...this.jobs.values()].filter((job) => job.view.state === "running");
    for (const job of running) {
      job.cancelled = true;
      job.stop?.();
    }
    await Promise.all(running.map((job) => job.done));
  }
}

// ---- Source and target files ---------------------------------------------------------------------------

function checkFormat(format: string, allowed: readonly string[], what: string): void {
  if (!allowed.includes(format)) {
    throw new VdiskError("BAD_REQUEST", `${what} does not know the format "${format}"`, {
      hint: `${what} takes --format ${allowed.join("|")}`,
    });
  }
}

/**
 * The format of an image to import: as asked, else the qcow2 magic, else what qemu-img info detects, else
 * (qemu-img missing) raw.
 */
async function detectFormat(
  handle: fs.promises.FileHandle,
  file: string,
  format: ImportFormat,
): Promise<string> {
  if (format !== "auto") return format;
  const head = Buffer.alloc(qcow2Magic.length);
  const { bytesRead } = await handle.read(head, 0, head.length, 0);
  if (bytesRead === head.length && head.equals(qcow2Magic)) return "qcow2";
  try {
    return (await qemuImgInfo(file)).format;
  } catch (err) {
    if (err instanceof VdiskError && err.code === "TOOL_MISSING") return "raw";
    throw err;
  }
}

function systemReason(err: unknown): string {
  return (err as NodeJS.ErrnoException).code ?? (err as Error).message;
}

function requireAbsolute(file: string): void {
  if (typeof file !== "string" || !path.isAbsolute(file)) {
    throw new VdiskError("BAD_REQUEST", "the file must be given as an absolute path", {
      hint: "the daemon does not share your current directory; the vdisk CLI makes paths absolute for you",
    });
  }
}

async function openSource(file: string): Promise<{ handle: fs.promises.FileHandle; bytes: number }> {
  requireAbsolute(file);
  const name = path.basename(file);
  let handle: fs.promises.FileHandle;
  try {
    handle = await fs.promises.open(file, "r");
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code === "ENOENT" ? "NOT_FOUND" : "BAD_REQUEST";
    throw new VdiskError(code, `cannot open ${name} to import it (${systemReason(err)})`, {
      hint: "give the path of a disk image the daemon's user can read",
    });
  }
  const stat = await handle.stat();
  if (!stat.isFile() || stat.size === 0) {
    await handle.close();
    throw new VdiskError("BAD_REQUEST", `${name} is ${stat.isFile() ? "empty" : "not a regular file"}`, {
      hint: "import takes a disk image file: raw, qcow2, or another format qemu-img reads",
    });
  }
  return { handle, bytes: stat.size };
}

async function createTarget(file: string, bytes: number): Promise<fs.promises.FileHandle> {
  requireAbsolute(file);
  const name = path.basename(file);
  let handle: fs.promises.FileHandle;
  try {
    handle = await fs.promises.open(file, "wx", 0o644);
  } catch (err) {
    const exists = (err as NodeJS.ErrnoException).code === "EEXIST";
    throw new VdiskError(
      "BAD_REQUEST",
      `cannot create ${name} (${exists ? "it already exists" : systemReason(err)})`,
      {
        hint: exists
          ? "export never overwrites a file: remove it or choose another file name"
          : "give a new file in a directory the daemon's user can write",
      },
    );
  }
  try {
    await handle.truncate(bytes);
  } catch (err) {
    await handle.close();
    await fs.promises.rm(file, { force: true });
    throw fromSystemError(err, `cannot make ${name} ${formatSize(bytes)} long`);
  }
  return handle;
}

// ---- Copy loops ----------------------------------------------------------------------------------------

function isZero(buf: Buffer): boolean {
  return buf.equals(zeroChunk.subarray(0, buf.length));
}

function checkCancelled(job: Job): void {
  if (job.cancelled) {
    throw new VdiskError(
      "SHUTTING_DOWN",
      `the ${job.view.kind} was stopped because the daemon is shutting down`,
      {
        hint: "run it again once the daemon is back",
      },
    );
  }
}

/** Run `count` workers until each one's `step` returns false; the first failure stops them all. */
async function runWorkers(count: number, step: (buf: Buffer) => Promise<boolean>): Promise<void> {
  let failure: { error: unknown } | null = null;
  const worker = async (): Promise<void> => {
    const buf = Buffer.allocUnsafe(copyChunkBytes);
    try {
      while (failure === null && (await step(buf)));
    } catch (err) {
      failure ??= { error: err };
    }
  };
  // Every worker has stopped before we return or throw: nothing touches the device or file afterwards.
  await Promise.all(Array.from({ length: count }, worker));
  if (failure !== null) throw (failure as { error: unknown }).error;
}

async function readFully(handle: fs.promises.FileHandle, buf: Buffer, position: number): Promise<void> {
  let filled = 0;
  while (filled < buf.length) {
    const { bytesRead } = await handle.read(buf, filled, buf.length - filled, position + filled);
    if (bytesRead === 0) throw new VdiskError("IO_ERROR", "the image file became shorter during the import");
    filled += bytesRead;
  }
}

async function importCopy(job: Job, source: fs.promises.FileHandle, device: BlockDevice): Promise<void> {
  const total = job.view.bytesTotal;
  let next = 0;
  await runWorkers(copyChunksInflight, async (buf) => {
    checkCancelled(job);
    if (next >= total) return false;
    const offset = next;
    const chunk = buf.subarray(0, Math.min(copyChunkBytes, total - offset));
    next += chunk.length;
    await readFully(source, chunk, offset).catch((err: unknown) => {
      throw err instanceof VdiskError ? err : fromSystemError(err, `cannot read ${job.view.file}`);
    });
    if (!isZero(chunk)) {
      await writeAsync(device, chunk, offset);
      job.view.bytesWritten += chunk.length;
    }
    job.view.bytesDone += chunk.length;
    return true;
  });
  await flushAsync(device);
}

/** Ranges of the disk that hold data, in chunks of at most copyChunkBytes; holes count as done. */
async function* dataChunks(
  job: Job,
  device: BlockDevice,
): AsyncGenerator<{ offset: number; length: number }> {
  const total = job.view.bytesTotal;
  let offset = 0;
  while (offset < total) {
    const extents = await blockStatusAsync(device, offset, Math.min(total - offset, statusBytesMax));
    if (extents.length === 0) throw new VdiskError("IO_ERROR", "the device reported no extents");
    for (const extent of extents) {
      const length = Math.min(extent.length, total - offset);
      if ((extent.flags & (ExtentFlags.HOLE | ExtentFlags.ZERO)) !== 0) {
        job.view.bytesDone += length;
      } else {
        for (let at = 0; at < length; at += copyChunkBytes) {
          yield { offset: offset + at, length: Math.min(copyChunkBytes, length - at) };
        }
      }
      offset += length;
      if (offset >= total) break;
    }
  }
}

async function writeFully(handle: fs.promises.FileHandle, buf: Buffer, position: number): Promise<void> {
  let written = 0;
  while (written < buf.length) {
    const { bytesWritten } = await handle.write(buf, written, buf.length - written, position + written);
    written += bytesWritten;
  }
}

async function exportCopy(job: Job, device: BlockDevice, target: fs.promises.FileHandle): Promise<void> {
  const chunks = dataChunks(job, device);
  await runWorkers(copyChunksInflight, async (buf) => {
    checkCancelled(job);
    const next = await chunks.next();
    if (next.done) return false;
    const chunk = buf.subarray(0, next.value.length);
    await readAsync(device, chunk, next.value.offset);
    if (!isZero(chunk)) {
      await writeFully(target, chunk, next.value.offset).catch((err: unknown) => {
        throw fromSystemError(err, `cannot write ${job.view.file}`);
      });
      job.view.bytesWritten += chunk.length;
    }
    job.view.bytesDone += chunk.length;
    return true;
  });
  await target.sync();
}
