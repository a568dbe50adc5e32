/**
 * An ExportProvider over a fixed map of name → device, for tests and benchmarks that run the NBD server
 * in-process without the daemon's catalog. The first export is also the default ("") export.
 */
import type { BlockDevice } from "../devices/block-device";
import type { ExportHandle, ExportProvider, ExportSummary } from "../protocol/nbd/exports";

export interface StaticExport {
  device: BlockDevice;
  readOnly?: boolean;
  description?: string;
}

export class StaticExports implements ExportProvider {
  readonly openHandles = new Map<string, number>();

  constructor(private readonly exports: Map<string, StaticExport>) {}

  private resolve(name: string): string | null {
    if (name === "") return this.exports.keys().next().value ?? null;
    return this.exports.has(name) ? name : null;
  }

  list(): string[] {
    return [...this.exports.keys()];
  }

  lookup(name: string): ExportSummary | null {
    const resolved = this.resolve(name);
    if (resolved === null) return null;
    const entry = this.exports.get(resolved) as StaticExport;
    return {
      name: resolved,
      description: entry.description ?? `test export ${resolved}`,
      size: entry.device.size,
      readOnly: entry.readOnly ?? false,
      capabilities: entry.device.capabilities,
    };
  }

  open(name: string): ExportHandle | null {
    const resolved = this.resolve(name);
    if (resolved === null) return null;
    const entry = this.exports.get(resolved) as StaticExport;
    this.openHandles.set(resolved, (this.openHandles.get(resolved) ?? 0) + 1);
    let released = false;
    return {
      name: resolved,
      description: entry.description ?? `test export ${resolved}`,
      device: entry.device,
      readOnly: entry.readOnly ?? false,
      release: () => {
        if (released) return;
        released = true;
        this.openHandles.set(resolved, (this.openHandles.get(resolved) ?? 1) - 1);
      },
    };
  }
}
