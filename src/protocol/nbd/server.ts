/**
 * The NBD server: listeners (TCP and Unix sockets), the set of live connections, and shutdown.
 *
 * It knows nothing about disks beyond the ExportProvider it is given. Limits are explicit: a connection
 * over `connectionsMax` is closed at once; each connection takes at most `inflightPerConnectionMax`
 * requests at a time and payloads up to `requestBytesMax`.
 *
 * Shutdown (SIGINT/SIGTERM in the daemon): stop accepting, tell every connection to refuse new requests
 * with ESHUTDOWN and finish those in flight, then close; connections still busy after the timeout are
 * cut. The daemon flushes the devices afterwards.
 */
import * as fs from "node:fs";
import * as net from "node:net";
import { VdiskError } from "../../errors";
import * as limits from "../../limits";
import { Connection, type MonitorFactory, type ServerCounters } from "./connection";
import type { ExportProvider } from "./exports";
import { Poller, pollWindowUsDefault, pollWindowUsMax } from "./poller";

export interface NbdServerOptions {
  exports: ExportProvider;
  /** Largest READ/WRITE payload accepted (default limits.requestBytesMaxDefault). */
  requestBytesMax?: number;
  connectionsMax?: number;
  inflightPerConnectionMax?: number;
  handshakeTimeoutMs?: number;
  log?: (message: string) => void;
  /**
   * Per-request accounting: called once per connection as it enters transmission (see connection.ts).
   * Absent = no accounting and no cost.
   */
  monitor?: MonitorFactory;
  /** Adaptive polling window after input, µs (poller.ts); 0 = off. Default pollWindowUsDefault. */
  pollUs?: number;
  /**
   * Replies of at least this many bytes are written by each connection's writer thread, smaller ones by
   * the event loop, both through the native reply writer (reply-writer.ts); null = Node's socket writes.
   * Default limits.replyThreadBytesDefault.
   */
  replyThreadBytes?: number | null;
}

export interface NbdServerStats extends ServerCounters {
  connections: number;
  connectionsTotal: number;
  connectionsRefused: number;
}

export class NbdServer {
  private readonly listeners: net.Server[] = [];
  private readonly connections = new Set<Connection>();
  private readonly counters: ServerCounters = {
    requests: 0,
    errors: 0,
    bytesRead: 0,
    bytesWritten: 0,
    protocolErrors: 0,
  };
  private nextId = 1;
  private connectionsRefused = 0;
  private closing = false;
  readonly requestBytesMax: number;
  readonly connectionsMax: number;
  readonly inflightPerConnectionMax: number;
  private readonly handshakeTimeoutMs: number;
  private readonly log: (message: string) => void;
  private readonly poller: Poller | null;
  private readonly replyThreadBytes: number | null;

  constructor(private readonly options: NbdServerOptions) {
    this.requestBytesMax = options.requestBytesMax ?? limits.requestBytesMaxDefault;
    this.connectionsMax = options.connectionsMax ?? limits.connectionsMaxDefault;
    this.inflightPerConnectionMax =
      options.inflightPerConnectionMax ?? limits.inflightPerConnectionMaxDefault;
    this.handshakeTimeoutMs = options.handshakeTimeoutMs ?? limits.handshakeTimeoutMsDefault;
    this.log = options.log ?? (() => {});
    const pollUs = options.pollUs ?? pollWindowUsDefault;
    const check = (ok: boolean, message: string): void => {
      if (!ok) throw new VdiskError("LIMIT", message);
    };
    check(
      Number.isInteger(this.requestBytesMax) &&
        this.requestBytesMax >= limits.blockBytesPreferred &&
        this.requestBytesMax <= limits.requestBytesMaxCeiling,
      `maximum request size must be between ${limits.blockBytesPreferred} and ${limits.requestBytesMaxCeiling} bytes`,
    );
    check(Number.isInteger(this.connectionsMax) && this.connectionsMax >= 1, "connections limit must be ≥ 1");
    check(
      Number.isInteger(this.inflightPerConnectionMax) && this.inflightPerConnectionMax >= 1,
      "in-flight limit must be ≥ 1",
    );
    check(
      Number.isInteger(pollUs) && pollUs >= 0 && pollUs <= pollWindowUsMax,
      `the polling window must be between 0 and ${pollWindowUsMax} µs`,
    );
    this.poller = pollUs === 0 ? null : new Poller(pollUs);
    this.replyThreadBytes =
      options.replyThreadBytes === undefined ? limits.replyThreadBytesDefault : options.replyThreadBytes;
    check(
      this.replyThreadBytes === null ||
        (Number.isSafeInteger(this.replyThreadBytes) && this.replyThreadBytes >= 0),
      "the reply thread threshold must be a size of 0 or more bytes",
    );
  }

  /** Listen on TCP; port 0 picks a free port. Resolves to the bound address. */
  listenTcp(host: string, port: number): Promise<{ host: string; port: number }> {
    const server = this.makeListener(true);
    return new Promise((resolve, reject) => {
      server.once("error", (err) => reject(listenError(err, `${host}:${port}`)));
      server.listen({ host, port }, () => {
        const address = server.address() as net.AddressInfo;
        resolve({ host: address.address, port: address.port });
      });
    });
  }

  /** Listen on a Unix socket path (a stale socket file left by a dead daemon is replaced). */
  listenUnix(path: string): Promise<void> {
    try {
      if (fs.statSync(path).isSocket()) fs.unlinkSync(path);
    } catch {
      // not there: fine
    }
    const server = this.makeListener(false);
    return new Promise((resolve, reject) => {
      server.once("error", (err) => reject(listenError(err, path)));
      server.listen({ path }, () => resolve());
    });
  }

  private makeListener(tcp: boolean): net.Server {
    const server = net.createServer({ noDelay: tcp, pauseOnConnect: true }, (socket) => this.accept(socket));
    server.on("error", (err) => this.log(`listener error: ${err.message}`));
    this.listeners.push(server);
    return server;
  }

  private accept(socket: net.Socket): void {
    if (this.closing || this.connections.size >= this.connectionsMax) {
      this.connectionsRefused++;
      this.log(
        `refusing connection: ${this.closing ? "shutting down" : `limit of ${this.connectionsMax} reached`}`,
      );
      socket.destroy();
      return;
    }
    const connection = new Connection(
      this.nextId++,
      socket,
      {
        exports: this.options.exports,
        requestBytesMax: this.requestBytesMax,
        inflightMax: this.inflightPerConnectionMax,
        handshakeTimeoutMs: this.handshakeTimeoutMs,
        log: this.log,
        monitor: this.options.monitor ?? null,
        poller: this.poller,
        replyThreadBytes: this.replyThreadBytes,
      },
      this.counters,
      (closed) => this.connections.delete(closed),
    );
    this.connections.add(connection);
  }

  /** Connections in the transmission phase on this export. */
  connectionsFor(exportName: string): number {
    let count = 0;
    for (const connection of this.connections) if (connection.exportName === exportName) count++;
    return count;
  }

  /** Close every connection using this export (after `vdisk delete --force`). */
  disconnectExport(exportName: string): void {
    for (const connection of [...this.connections]) {
      if (connection.exportName === exportName) connection.close(`export "${exportName}" removed`);
    }
  }

  stats(): NbdServerStats {
    return {
      ...this.counters,
      connections: this.connections.size,
      connectionsTotal: this.nextId - 1,
      connectionsRefused: this.connectionsRefused,
    };
  }

  /** Stop accepting, let in-flight requests finish (up to timeoutMs), then close every connection. */
  async shutdown(timeoutMs: number): Promise<void> {
    this.closing = true;
    const closed = this.listeners.map(
      (listener) => new Promise<void>((resolve) => listener.close(() => resolve())),
    );
    const drained = [...this.connections].map(
      (connection) => new Promise<void>((resolve) => connection.shutdown(resolve)),
    );
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<void>((resolve) => {
      timer = setTimeout(resolve, timeoutMs);
    });
    await Promise.race([Promise.all(drained), timeout]);
    clearTimeout(timer);
    for (const connection of [...this.connections]) connection.close("shutdown timeout");
    await Promise.all(closed);
  }
}

function listenError(err: NodeJS.ErrnoException, where: string): VdiskError {
  if (err.code === "EADDRINUSE") {
    return new VdiskError("BAD_REQUEST", `${where} is already in use`, {
      cause: err,
      hint: "another vdisk or NBD server is listening there; stop it or choose another address with --listen",
    });
  }
  return new VdiskError("IO_ERROR", `cannot listen on ${where}: ${err.message}`, { cause: err });
}
