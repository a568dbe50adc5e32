/**
 * An ExportProvider over a fixed map of name → device, for tests and benchmarks that run the NBD server
 * in-process without the daemon's catalog. The first export is also the default ("") export.
 *
 * An export may offer extra NBD meta contexts (e.g. a fake `qemu:dirty-bitmap:NAME`) as a map of context
 * name → block status function; `lookup` lists their names and the handle's `contextStatus` calls them.
 */
import type { BlockDevice, ExtentsDone } from "../devices/block-device";
import { VdiskError } from "../errors";
import type { ExportHandle, ExportProvider, ExportSummary } from "../protocol/nbd/exports";

export interface StaticExport {
  device: BlockDevice;
  readOnly?: boolean;
  description?: string;
  /** Meta contexts besides base:allocation, by name; each answers block status in its own flag values. */
  metaContexts?: Record<string, ContextStatus>;
}

export type ContextStatus = (offset: number, length: number, done: ExtentsDone) => void;

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
      metaContexts: Object.keys(entry.metaContexts ?? {}),
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
      contextStatus: (context, offset, length, done) => {
        const contexts = entry.metaContexts ?? {};
        const status = Object.hasOwn(contexts, context) ? contexts[context] : undefined;
        if (status === undefined) {
          done(new VdiskError("INVALID_ARGUMENT", `export ${resolved} has no meta context ${context}`));
          return;
        }
        status(offset, length, done);
      },
      release: () => {
        if (released) return;
        released = true;
        this.openHandles.set(resolved, (this.openHandles.get(resolved) ?? 1) - 1);
      },
    };
  }
}
