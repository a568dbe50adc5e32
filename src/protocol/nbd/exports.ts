/**
 * What the NBD server needs from whoever owns the disks: a list of export names and a way to open one.
 * The server knows nothing about formats, pools or catalogs (as QEMU's nbd/server.c knows nothing of
 * qcow2): the daemon's disk registry implements this interface.
 *
 * `open` returns a handle that the connection keeps while it is in the transmission phase and releases
 * when it ends, so the registry can tell which disks are in use.
 *
 * Export names never contain '/': the connection splits a client tag off `NAME/TAG` (client-tag.ts)
 * before it asks the provider, which only ever sees NAME.
 */
import type { BlockDevice, Capabilities, ExtentsDone } from "../../devices/block-device";

export interface ExportHandle {
  readonly name: string;
  readonly description: string;
  readonly device: BlockDevice;
  readonly readOnly: boolean;
  /**
   * Block status for an extra meta context offered by `ExportSummary.metaContexts` (for instance
   * `qemu:dirty-bitmap:SNAP`). Extents use the context's own flag values (dirty bitmaps: 1 = dirty).
   */
  contextStatus?(context: string, offset: number, length: number, done: ExtentsDone): void;
  /** Called once when the connection that opened it closes. */
  release(): void;
}

/** What NBD_OPT_INFO/GO and LIST_META_CONTEXT need to know before an export is opened. */
export interface ExportSummary {
  name: string;
  description: string;
  size: number;
  readOnly: boolean;
  capabilities: Capabilities;
  /** Meta contexts this export offers besides base:allocation (e.g. qemu:dirty-bitmap:NAME). */
  metaContexts?: string[];
}

export interface ExportProvider {
  /** Export names for NBD_OPT_LIST. */
  list(): string[];
  /** Resolve an export name ("" means the default export); null if there is no such export. */
  lookup(name: string): ExportSummary | null;
  /** Open an export for transmission; null if it does not exist (any more). */
  open(name: string): ExportHandle | null;
}
