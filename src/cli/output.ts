/**
 * Human output of the CLI: aligned tables, key/value blocks, sizes through formatSize, the job progress
 * bar (cli-progress, on a TTY only) and the one-line error format:
 *
 *   vdisk: error: <message>
 *     hint: <hint>
 *
 * `--json` output never comes through here: it is the API's body, printed as received.
 */
import { SingleBar } from "cli-progress";
import { VdiskError } from "../errors";
import type { DiskInfo } from "../daemon/registry";
import type { JobView } from "../daemon/jobs";
import { formatRate, formatSize } from "../util/size";

export function table(headers: string[], rows: string[][]): string {
  const widths = headers.map((header, column) =>
    Math.max(header.length, ...rows.map((row) => row[column].length)),
  );
  const line = (cells: string[]): string =>
    cells
      .map((cell, column) => (column === cells.length - 1 ? cell : cell.padEnd(widths[column])))
      .join("  ")
      .trimEnd();
  return [line(headers), ...rows.map(line)].join("\n");
}

export function keyValues(pairs: [string, string][]): string {
  const width = Math.max(...pairs.map(([key]) => key.length)) + 1;
  return pairs.map(([key, value]) => `${`${key}:`.padEnd(width)}  ${value}`).join("\n");
}

export function diskTable(disks: DiskInfo[]): string {
  if (disks.length === 0) return "no disks (make one with: vdisk create NAME --size 20G)";
  const rows = disks.map((disk) => [
    disk.name,
    formatSize(disk.size),
    formatSize(disk.allocatedBytes),
    disk.format,
    disk.readOnly ? "ro" : "rw",
    String(disk.connections),
  ]);
  return table(["NAME", "SIZE", "ALLOCATED", "FORMAT", "MODE", "CONNECTIONS"], rows);
}

export function diskDetails(disk: DiskInfo): string {
  return keyValues([
    ["name", disk.name],
    ["size", `${formatSize(disk.size)} (${disk.size} bytes)`],
    ["allocated", `${formatSize(disk.allocatedBytes)} (${disk.allocatedBytes} bytes)`],
    ["format", disk.format],
    ["pool", disk.pool],
    ["file", disk.file],
    ["created", disk.created],
    ["read-only", disk.readOnly ? "yes" : "no"],
    ["connections", String(disk.connections)],
  ]);
}

export function formatSeconds(seconds: number): string {
  if (seconds < 60) return `${seconds.toFixed(seconds < 10 ? 1 : 0)} s`;
  const minutes = Math.floor(seconds / 60);
  if (minutes < 60) return `${minutes} min ${Math.round(seconds % 60)} s`;
  return `${Math.floor(minutes / 60)} h ${minutes % 60} min`;
}

export function jobSummary(job: JobView, source: string, target: string): string {
  const seconds = job.finishedAt ? (Date.parse(job.finishedAt) - Date.parse(job.startedAt)) / 1000 : 0;
  const verb = job.kind === "import" ? "imported" : "exported";
  return (
    `${verb} ${source} into ${target}: ${formatSize(job.bytesTotal)} in ${formatSeconds(seconds)} ` +
    `(${formatRate(job.rateBytesPerSecond)}), ${formatSize(job.bytesWritten)} of data written`
  );
}

/** A progress bar for a job on stderr; a no-op object when stderr is not a terminal. */
export interface Progress {
  update(job: JobView): void;
  stop(): void;
}

export function jobProgress(enabled: boolean, label: string): Progress {
  if (!enabled) return { update: () => undefined, stop: () => undefined };
  const bar = new SingleBar({
    format: `${label} [{bar}] {percentage}% | {done} / {all} | {rate} | ETA {eta_formatted}`,
    stream: process.stderr,
    hideCursor: true,
    barsize: 30,
    etaBuffer: 20,
  });
  let started = false;
  const payload = (job: JobView): object => ({
    done: formatSize(job.bytesDone),
    all: formatSize(job.bytesTotal),
    rate: formatRate(job.rateBytesPerSecond),
  });
  return {
    update: (job) => {
      if (!started) bar.start(job.bytesTotal, job.bytesDone, payload(job));
      else bar.update(job.bytesDone, payload(job));
      started = true;
    },
    stop: () => {
      if (started) bar.stop();
    },
  };
}

/** The error lines on stderr; returns the exit status (1). */
export function printError(err: unknown): number {
  const message = err instanceof Error ? err.message : String(err);
  process.stderr.write(`vdisk: error: ${message}\n`);
  const hint = err instanceof VdiskError ? err.hint : undefined;
  if (hint !== undefined) process.stderr.write(`  hint: ${hint}\n`);
  if (!(err instanceof VdiskError) && err instanceof Error && process.env.VDISK_DEBUG) {
    process.stderr.write(`${err.stack ?? ""}\n`);
  }
  return 1;
}
