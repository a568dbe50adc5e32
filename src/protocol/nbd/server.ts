/**
 * NBD server — placeholder with the public API; the implementation is being written.
 */
import type { ExportProvider } from "./exports";

export interface NbdServerOptions {
  exports: ExportProvider;
  /** Largest READ/WRITE payload accepted (default limits.requestBytesMaxDefault). */
  requestBytesMax?: number;
  connectionsMax?: number;
  inflightPerConnectionMax?: number;
  handshakeTimeoutMs?: number;
  log?: (message: string) => void;
}

export interface NbdServerStats {
  connections: number;
  requests: number;
  errors: number;
}

export class NbdServer {
  constructor(readonly options: NbdServerOptions) {}
  /** Listen on TCP; port 0 picks a free port. Resolves to the bound address. */
  listenTcp(_host: string, _port: number): Promise<{ host: string; port: number }> {
    throw new Error("not yet");
  }
  /** Listen on a Unix socket path (an existing stale socket file is replaced). */
  listenUnix(_path: string): Promise<void> {
    throw new Error("not yet");
  }
  /** Connections in the transmission phase on this export. */
  connectionsFor(_exportName: string): number {
    return 0;
  }
  /** Close every connection using this export (after `vdisk delete --force`). */
  disconnectExport(_exportName: string): void {}
  stats(): NbdServerStats {
    return { connections: 0, requests: 0, errors: 0 };
  }
  /** Stop accepting, let in-flight requests finish (up to timeoutMs), then close every connection. */
  shutdown(_timeoutMs: number): Promise<void> {
    return Promise.resolve();
  }
}
