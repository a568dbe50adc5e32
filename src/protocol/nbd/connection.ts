/**
 * One NBD client connection: fixed newstyle handshake, then the transmission phase.
 *
 * The connection owns a ByteQueue fed by the socket and pulls messages from the two parsers. During
 * transmission every request is validated here, once (range, read-only, payload size, flags) — the
 * devices below only assert — and dispatched to the export's BlockDevice with a callback; replies go out
 * in completion order (out-of-order is allowed by the protocol). In transmission they go through the
 * native reply writer (reply-writer.ts): on a Unix socket, replies of at least `replyThreadBytes` are
 * written by the connection's writer thread; smaller ones, and over TCP all, are gathered per loop turn
 * and written by the event loop (the thread finishing what a full socket did not take). Before
 * that (handshake), on a socket without a descriptor, or with `replyThreadBytes` null, the socket writes
 * them, corked per loop turn so that all replies that complete in one turn leave in one writev.
 *
 * Flow control, all bounded: at most `inflightMax` requests are dispatched; beyond that, and while more
 * than `socketQueuedBytesMax` of replies wait for the socket (in the reply writer, or the socket's own
 * queue), the socket is paused and the parser is not pulled. A WRITE over the payload maximum is read and
 * discarded, then refused with EINVAL.
 *
 * Receiving: the socket reads into memory the connection owns (Node's `onread`), not into a fresh
 * ArrayBuffer per read, whose off-heap churn drove V8's major GCs at gigabytes per second. While a WRITE
 * payload with at least `DIRECT_RECEIVE_BYTES_MIN` still to come is being gathered, the kernel copies
 * straight into the payload's pooled buffer; otherwise into the connection's receive buffer, which is
 * parsed at once, the unparsed rest copied out (`ByteQueue.detach`) before the next read reuses it.
 * Node offers `onread` only to sockets it creates, so an accepted socket's handle is moved to a new
 * Socket (`adoptSocket`); a socket without a handle (a test's stream) is read with 'data' events.
 *
 * Bad input never reaches other clients: a protocol violation (bad magic, a lying length, an unknown
 * export with NBD_OPT_EXPORT_NAME, too many options) closes only this connection.
 *
 * Meta contexts: `base:allocation` (answered by the device) plus whatever the export offers in
 * `ExportSummary.metaContexts` (answered by `ExportHandle.contextStatus`), e.g. `qemu:dirty-bitmap:NAME`.
 * SET_META_CONTEXT selects up to `limits.metaContextsMax` of them, each with an id unique on this
 * connection; the selection is tied to the export name it was made for. A BLOCK_STATUS request asks all
 * selected contexts at once and counts as one request in flight; its reply is one chunk per context (DONE
 * on the last), or one error chunk if any context failed.
 *
 * Monitoring (optional, `ConnectionConfig.monitor`): once in transmission the connection asks the factory
 * for a RequestMonitor, stamps each request with `begin(command, offset, length)` when it is dispatched
 * and calls `end()` exactly once when its reply is queued (success or error; DISC has neither). In-flight
 * counts are not pushed: the monitor reads `ConnectionInfo.inflight()` when it samples. Without a monitor
 * the cost is one null check per request.
 *
 * Client tags: an export name `NAME/TAG` opens NAME and tells the monitor the client's tag (client-tag.ts);
 * everywhere an export name is taken (EXPORT_NAME, INFO, GO, LIST/SET_META_CONTEXT) the tag is split off
 * first, and an invalid one is refused as an unknown export is.
 */
import { Socket as NetSocket, type Socket, type SocketConstructorOpts } from "node:net";
import type { BlockDevice, Capabilities, Extent } from "../../devices/block-device";
import type { Poller } from "./poller";
import { replyBufferPool, writePayloadPool } from "./buffer-pool";
import { ReplyWriter } from "./reply-writer";
import { loadNative, type NativeSocketWriter } from "../../native/native";
import { ZeroFlags } from "../../devices/block-device";
import { VdiskError, assert, nbdErrnoOf, type ErrorCode, type NbdErrnoValue, NbdErrno } from "../../errors";
import * as limits from "../../limits";
import { ByteQueue } from "./byte-queue";
import {
  BASE_ALLOCATION,
  ClientFlag,
  Cmd,
  CmdFlag,
  HandshakeFlag,
  IHAVEOPT_HI,
  IHAVEOPT_LO,
  Info,
  NBDMAGIC_HI,
  NBDMAGIC_LO,
  OPTION_REPLY_MAGIC_HI,
  OPTION_REPLY_MAGIC_LO,
  Opt,
  ReplyFlag,
  ReplyType,
  Rep,
  SIMPLE_REPLY_MAGIC,
  STRUCTURED_REPLY_MAGIC,
  SimpleReplyHeaderBytes,
  StructuredReplyHeaderBytes,
  TransmissionFlag,
  commandName,
  optionName,
} from "./constants";
import { splitClientTag } from "./client-tag";
import type { ExportHandle, ExportProvider } from "./exports";
import { HandshakeParser, RequestParser, type NbdRequest } from "./parsers";

export interface ConnectionConfig {
  exports: ExportProvider;
  requestBytesMax: number;
  inflightMax: number;
  handshakeTimeoutMs: number;
  log: (message: string) => void;
  /** Per-request accounting (see the file comment); null = none. */
  monitor: MonitorFactory | null;
  /** Keeps the loop polling briefly after input (see poller.ts); null = never. */
  poller: Poller | null;
  /**
   * Transmission replies go through the native reply writer (reply-writer.ts), and on a Unix socket those
   * of at least this many bytes are written by its thread; null = Node's stream writes, corked per turn.
   */
  replyThreadBytes: number | null;
}

/** What a connection tells its monitor when it enters transmission. */
export interface ConnectionInfo {
  /** Unique for the server's life. */
  id: number;
  /** The canonical export name: DISK or DISK@SNAP. */
  exportName: string;
  /** The client tag of the requested name NAME/TAG (client-tag.ts); null without one. */
  tag: string | null;
  /** "unix" or "tcp HOST:PORT". */
  peer: string;
  /** Requests in flight now; monitors read it when they sample. */
  inflight(): number;
  /** The export's size now (it may grow while connected); not for every request. */
  sizeBytes(): number;
}

/** One connection's request accounting. Called for every request: implementations must not allocate. */
export interface RequestMonitor {
  /**
   * A request is dispatched: `command` (Cmd.*, never DISC), its offset and length as the client sent them
   * (not yet validated). Returns a timestamp on the monitor's clock, handed back to `end`.
   */
  begin(command: number, offset: number, length: number): number;
  /**
   * A request's reply was queued. `command` is the NBD command (Cmd.*), `bytes` its length on success and 0
   * on error, `error` the VdiskError code or null, `start` what `begin()` returned at dispatch.
   */
  end(command: number, bytes: number, error: ErrorCode | null, start: number): void;
  /** The connection is gone (called once). */
  close(): void;
}

/** Gives each connection, as it enters transmission, its RequestMonitor. */
export type MonitorFactory = (connection: ConnectionInfo) => RequestMonitor;

/** Counters shared by all connections of a server. */
export interface ServerCounters {
  requests: number;
  errors: number;
  bytesRead: number;
  bytesWritten: number;
  protocolErrors: number;
}

const enum Phase {
  HANDSHAKE,
  TRANSMISSION,
  CLOSED,
}

/** A meta context chosen by NBD_OPT_SET_META_CONTEXT; ids are unique per connection, opaque to clients. */
interface SelectedContext {
  id: number;
  name: string;
}

/** Extents of one context for one BLOCK_STATUS request, as sent: lengths and flags, pairwise. */
interface ContextExtents {
  lengths: number[];
  flags: number[];
}

/** Prefix of a structured OFFSET_DATA chunk: header + 64-bit offset. */
const DATA_CHUNK_PREFIX_BYTES = StructuredReplyHeaderBytes + 8;
const READ_FLAGS_KNOWN = CmdFlag.FUA | CmdFlag.DF;
/**
 * Largest read tried on the synchronous cache-hit path. Bigger copies would hold the event loop for
 * long and gain little: their cost is the copy, which the thread pool runs beside the loop.
 */
const READ_NO_WAIT_BYTES_MAX = 256 * 1024;
const FAST_ZERO_NOT_SUPPORTED = new VdiskError("NOT_SUPPORTED", "fast zero not supported here");
/** The connection's receive buffer: one socket read at most. */
export const RECEIVE_BUFFER_BYTES = 64 * 1024;
/** A payload with at least this much still to come is received straight into its own buffer. */
export const DIRECT_RECEIVE_BYTES_MIN = 16 * 1024;

/**
 * A Socket over `accepted`'s handle that reads into the buffers `nextBuffer` gives and reports each read
 * to `received` (which must be done with the bytes when it returns). `accepted` is paused (the server's
 * `pauseOnConnect`) and is dropped without closing the descriptor. Null when `accepted` has no handle.
 */
function adoptSocket(
  accepted: Socket,
  nextBuffer: () => Buffer,
  received: (bytes: number, buffer: Uint8Array) => void,
): Socket | null {
  const holder = accepted as unknown as { _handle: unknown };
  const handle = holder._handle;
  if (handle === null || handle === undefined) return null;
  holder._handle = null;
  accepted.destroy();
  return new NetSocket({
    handle,
    readable: true,
    writable: true,
    onread: {
      buffer: nextBuffer,
      callback: (bytes: number, buffer: Uint8Array) => {
        received(bytes, buffer);
        return true;
      },
    },
  } as SocketConstructorOpts);
}

export class Connection {
  private readonly queue = new ByteQueue();
  private phase = Phase.HANDSHAKE;
  private readonly handshake: HandshakeParser;
  private requests: RequestParser | null = null;
  private noZeroes = false;
  private structured = false;
  /** Contexts chosen by the last SET_META_CONTEXT, for `metaExportName`; empty = none. */
  private metaSelected: SelectedContext[] = [];
  private metaExportName: string | null = null;
  private metaContextIdNext = 1;
  private optionCount = 0;
  private handshakeTimer: NodeJS.Timeout | null = null;

  private handle: ExportHandle | null = null;
  private device: BlockDevice | null = null;
  private monitor: RequestMonitor | null = null;
  /** The client tag of the name given at EXPORT_NAME/GO (NAME/TAG), for the monitor. */
  private clientTag: string | null = null;
  private transmissionFlags = 0;

  private inflight = 0;
  private paused = false;
  private corked = false;
  private draining = false; // DISC received or server shutting down: no new requests are dispatched
  private shuttingDown = false;
  /** The server has been told this connection is gone (exactly once). */
  private forgotten = false;
  private readonly onDrainedCallbacks: Array<() => void> = [];
  private readonly uncork = (): void => {
    this.corked = false;
    if (!this.socket.destroyed) this.socket.uncork();
  };

  private readonly socket: Socket;
  /** The native reply writer, once in transmission (see `send`); null = the socket's own writes. */
  private writer: ReplyWriter | null = null;
  /** False once the native writer is running or cannot be used for this connection. */
  private writerWanted: boolean;
  /** Where socket reads land unless a payload is received directly (see the module note). */
  private readonly receiveBuffer = Buffer.allocUnsafeSlow(RECEIVE_BUFFER_BYTES);
  /** The payload slice handed to the socket for its next read, or null (the receive buffer). */
  private directTarget: Buffer | null = null;

  constructor(
    readonly id: number,
    accepted: Socket,
    private readonly config: ConnectionConfig,
    private readonly counters: ServerCounters,
    private readonly onClose: (connection: Connection) => void,
  ) {
    this.handshake = new HandshakeParser(limits.optionBytesMax);
    this.writerWanted = config.replyThreadBytes !== null;
    const adopted = adoptSocket(
      accepted,
      () => this.nextReceiveBuffer(),
      (bytes, buffer) => this.onReceived(bytes, buffer),
    );
    const socket = (this.socket = adopted ?? accepted);
    if (adopted === null) {
      socket.on("data", (chunk: Buffer) => this.onData(chunk));
      socket.resume();
    }
    socket.on("error", (err: NodeJS.ErrnoException) =>
      this.closeOnSocketError(err.code, `socket error: ${err.message}`),
    );
    socket.on("close", () => this.close(null));
    socket.on("drain", () => this.maybeResume());
    this.handshakeTimer = setTimeout(
      () => this.close(`handshake not finished within ${config.handshakeTimeoutMs} ms`),
      config.handshakeTimeoutMs,
    );
    this.handshakeTimer.unref();
    this.sendGreeting();
  }

  /** Export name once in transmission, else null. */
  get exportName(): string | null {
    return this.handle?.name ?? null;
  }

  get inflightCount(): number {
    return this.inflight;
  }

  // ---------------------------------------------------------------------------------------------
  // Input

  private onData(chunk: Buffer): void {
    if (this.phase === Phase.CLOSED) return;
    this.queue.push(chunk);
    this.config.poller?.kick();
    this.pump();
  }

  /** The buffer the socket's next read goes into: the rest of a large payload, or the receive buffer. */
  private nextReceiveBuffer(): Buffer {
    const parser = this.requests;
    this.directTarget =
      parser !== null && this.phase === Phase.TRANSMISSION
        ? parser.payloadTarget(this.queue, DIRECT_RECEIVE_BYTES_MIN)
        : null;
    return this.directTarget ?? this.receiveBuffer;
  }

  /** A socket read of `bytes` into `buffer` (one nextReceiveBuffer gave); they are consumed or copied. */
  private onReceived(bytes: number, buffer: Uint8Array): void {
    if (this.phase === Phase.CLOSED) return;
    if (this.directTarget !== null && buffer === this.directTarget) {
      this.directTarget = null;
      (this.requests as RequestParser).payloadReceived(bytes);
    } else {
      assert(buffer === this.receiveBuffer, "a socket read lands in the receive buffer or a payload");
      this.queue.push(this.receiveBuffer.subarray(0, bytes));
    }
    this.config.poller?.kick();
    this.pump();
    // The next read reuses the receive buffer: keep what the parsers have not consumed.
    this.queue.detach(this.receiveBuffer.buffer);
  }

  private pump(): void {
    try {
      if (this.phase === Phase.HANDSHAKE) this.pumpHandshake();
      if (this.phase === Phase.TRANSMISSION) this.pumpRequests();
    } catch (err) {
      if (err instanceof VdiskError && err.code === "PROTOCOL") {
        this.counters.protocolErrors++;
        this.close(`protocol violation: ${err.message}`);
        return;
      }
      throw err;
    }
  }

  private pumpHandshake(): void {
    while (this.phase === Phase.HANDSHAKE) {
      const message = this.handshake.next(this.queue);
      if (message === null) return;
      if (message.kind === "clientFlags") {
        const known = ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES;
        if ((message.flags & ~known) !== 0 || (message.flags & ClientFlag.FIXED_NEWSTYLE) === 0) {
          throw new VdiskError("PROTOCOL", `unsupported client flags 0x${message.flags.toString(16)}`);
        }
        this.noZeroes = (message.flags & ClientFlag.NO_ZEROES) !== 0;
        continue;
      }
      if (++this.optionCount > limits.optionsPerHandshakeMax) {
        throw new VdiskError("PROTOCOL", "too many options");
      }
      if (message.kind === "tooBig") {
        if (message.option === Opt.EXPORT_NAME) throw new VdiskError("PROTOCOL", "export name too long");
        this.optionError(
          message.option,
          Rep.ERR_TOO_BIG,
          `option data of ${message.length} bytes is too big`,
        );
        continue;
      }
      this.handleOption(message.option, message.data);
    }
  }

  private pumpRequests(): void {
    const parser = this.requests as RequestParser;
    while (!this.draining && this.inflight < this.config.inflightMax) {
      if (this.repliesQueuedBytes() > limits.socketQueuedBytesMax) break;
      const request = parser.next(this.queue);
      if (request === null) break;
      this.dispatch(request);
    }
    const mustPause =
      this.inflight >= this.config.inflightMax || this.repliesQueuedBytes() > limits.socketQueuedBytesMax;
    if (mustPause && !this.paused) {
      this.paused = true;
      this.socket.pause();
    }
  }

  /** Reply bytes waiting for the socket. */
  private repliesQueuedBytes(): number {
    return this.writer !== null ? this.writer.queuedBytes : this.socket.writableLength;
  }

  private maybeResume(): void {
    if (this.phase !== Phase.TRANSMISSION) return;
    if (this.paused && this.inflight < this.config.inflightMax) {
      if (this.repliesQueuedBytes() > limits.socketQueuedBytesMax) return;
      this.paused = false;
      this.socket.resume();
    }
    if (this.queue.length > 0 && !this.draining) this.pump();
  }

  // ---------------------------------------------------------------------------------------------
  // Handshake

  private sendGreeting(): void {
    const greeting = Buffer.allocUnsafe(18);
    greeting.writeUInt32BE(NBDMAGIC_HI, 0);
    greeting.writeUInt32BE(NBDMAGIC_LO, 4);
    greeting.writeUInt32BE(IHAVEOPT_HI, 8);
    greeting.writeUInt32BE(IHAVEOPT_LO, 12);
    greeting.writeUInt16BE(HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES, 16);
    this.socket.write(greeting);
  }

  private optionReply(option: number, type: number, data?: Buffer): void {
    const header = Buffer.allocUnsafe(20);
    header.writeUInt32BE(OPTION_REPLY_MAGIC_HI, 0);
    header.writeUInt32BE(OPTION_REPLY_MAGIC_LO, 4);
    header.writeUInt32BE(option, 8);
    header.writeUInt32BE(type, 12);
    header.writeUInt32BE(data ? data.length : 0, 16);
    this.socket.write(data ? Buffer.concat([header, data]) : header);
  }

  private optionError(option: number, type: number, message: string): void {
    this.optionReply(option, type, Buffer.from(message, "utf8"));
  }

  private handleOption(option: number, data: Buffer): void {
    switch (option) {
      case Opt.EXPORT_NAME:
        return this.optExportName(data);
      case Opt.ABORT:
        this.optionReply(option, Rep.ACK);
        this.phase = Phase.CLOSED;
        this.socket.end();
        return;
      case Opt.LIST:
        return this.optList(data);
      case Opt.STARTTLS:
        return this.optionError(option, Rep.ERR_POLICY, "TLS is not configured on this server");
      case Opt.INFO:
      case Opt.GO:
        return this.optInfoGo(option, data);
      case Opt.STRUCTURED_REPLY:
        if (data.length !== 0) return this.optionError(option, Rep.ERR_INVALID, "option takes no data");
        this.structured = true;
        return this.optionReply(option, Rep.ACK);
      case Opt.LIST_META_CONTEXT:
      case Opt.SET_META_CONTEXT:
        return this.optMetaContext(option, data);
      default:
        return this.optionError(option, Rep.ERR_UNSUP, `option ${optionName(option)} is not supported`);
    }
  }

  private optExportName(data: Buffer): void {
    const requested = data.toString("utf8");
    const tagged = splitClientTag(requested);
    if (!tagged.ok) {
      // NBD_OPT_EXPORT_NAME has no error reply: the only answer is to disconnect.
      this.close(`${tagged.message}, requested with NBD_OPT_EXPORT_NAME`);
      return;
    }
    const name = tagged.exportName;
    const handle = this.config.exports.open(name);
    if (handle === null) {
      // NBD_OPT_EXPORT_NAME has no error reply: the only answer is to disconnect.
      this.close(`unknown export "${name}" requested with NBD_OPT_EXPORT_NAME`);
      return;
    }
    this.clientTag = tagged.tag;
    this.enterTransmission(handle);
    const reply = Buffer.alloc(this.noZeroes ? 10 : 134);
    writeUInt64(reply, handle.device.size, 0);
    reply.writeUInt16BE(this.transmissionFlags, 8);
    this.socket.write(reply);
  }

  private optList(data: Buffer): void {
    if (data.length !== 0) return this.optionError(Opt.LIST, Rep.ERR_INVALID, "NBD_OPT_LIST takes no data");
    for (const name of this.config.exports.list()) {
      const nameBytes = Buffer.from(name, "utf8");
      const payload = Buffer.allocUnsafe(4 + nameBytes.length);
      payload.writeUInt32BE(nameBytes.length, 0);
      nameBytes.copy(payload, 4);
      this.optionReply(Opt.LIST, Rep.SERVER, payload);
    }
    this.optionReply(Opt.LIST, Rep.ACK);
  }

  private optInfoGo(option: number, data: Buffer): void {
    if (data.length < 6) return this.optionError(option, Rep.ERR_INVALID, "option data too short");
    const nameLength = data.readUInt32BE(0);
    if (nameLength > data.length - 6)
      return this.optionError(option, Rep.ERR_INVALID, "name length too long");
    const requestedName = data.toString("utf8", 4, 4 + nameLength);
    const infoCount = data.readUInt16BE(4 + nameLength);
    if (data.length !== 6 + nameLength + 2 * infoCount) {
      return this.optionError(option, Rep.ERR_INVALID, "information request count does not match length");
    }
    const requested = new Set<number>();
    for (let i = 0; i < infoCount; i++) requested.add(data.readUInt16BE(6 + nameLength + 2 * i));

    const tagged = splitClientTag(requestedName);
    if (!tagged.ok) return this.optionError(option, Rep.ERR_UNKNOWN, tagged.message);
    const name = tagged.exportName;
    const found = this.config.exports.lookup(name);
    if (found === null) return this.optionError(option, Rep.ERR_UNKNOWN, `no export named "${name}"`);
    const flags = this.computeTransmissionFlags(found.readOnly, found.capabilities);

    const exportInfo = Buffer.allocUnsafe(12);
    exportInfo.writeUInt16BE(Info.EXPORT, 0);
    writeUInt64(exportInfo, found.size, 2);
    exportInfo.writeUInt16BE(flags, 10);
    this.optionReply(option, Rep.INFO, exportInfo);
    if (requested.has(Info.NAME)) {
      this.optionReply(option, Rep.INFO, Buffer.concat([u16(Info.NAME), Buffer.from(found.name, "utf8")]));
    }
    if (requested.has(Info.DESCRIPTION)) {
      const description = Buffer.from(found.description, "utf8");
      this.optionReply(option, Rep.INFO, Buffer.concat([u16(Info.DESCRIPTION), description]));
    }
    const blockSize = Buffer.allocUnsafe(14);
    blockSize.writeUInt16BE(Info.BLOCK_SIZE, 0);
    blockSize.writeUInt32BE(limits.blockBytesMin, 2);
    blockSize.writeUInt32BE(limits.blockBytesPreferred, 6);
    blockSize.writeUInt32BE(this.config.requestBytesMax, 10);
    this.optionReply(option, Rep.INFO, blockSize);

    if (option === Opt.INFO) return this.optionReply(option, Rep.ACK);
    const handle = this.config.exports.open(name);
    if (handle === null) return this.optionError(option, Rep.ERR_UNKNOWN, `export "${name}" went away`);
    if (this.metaExportName !== handle.name) this.metaSelected = [];
    this.optionReply(option, Rep.ACK);
    this.clientTag = tagged.tag;
    this.enterTransmission(handle);
  }

  /** Parse LIST/SET_META_CONTEXT data; null if malformed. */
  private parseMetaQuery(data: Buffer): { exportName: string; queries: string[] } | null {
    if (data.length < 8) return null;
    const nameLength = data.readUInt32BE(0);
    if (nameLength > data.length - 8 || nameLength > limits.nameBytesMax) return null;
    const exportName = data.toString("utf8", 4, 4 + nameLength);
    let position = 4 + nameLength;
    const count = data.readUInt32BE(position);
    position += 4;
    const queries: string[] = [];
    for (let i = 0; i < count; i++) {
      if (position + 4 > data.length) return null;
      const length = data.readUInt32BE(position);
      position += 4;
      if (length > data.length - position || length > limits.nameBytesMax) return null;
      queries.push(data.toString("utf8", position, position + length));
      position += length;
    }
    if (position !== data.length) return null;
    return { exportName, queries };
  }

  private optMetaContext(option: number, data: Buffer): void {
    const isSet = option === Opt.SET_META_CONTEXT;
    if (isSet) this.metaSelected = []; // SET replaces the selection even when it fails
    if (!this.structured) {
      return this.optionError(option, Rep.ERR_INVALID, "negotiate NBD_OPT_STRUCTURED_REPLY first");
    }
    const parsed = this.parseMetaQuery(data);
    if (parsed === null) return this.optionError(option, Rep.ERR_INVALID, "malformed meta context request");
    if (parsed.queries.length > limits.metaContextsMax * 16) {
      return this.optionError(option, Rep.ERR_TOO_BIG, "too many queries");
    }
    const tagged = splitClientTag(parsed.exportName);
    if (!tagged.ok) return this.optionError(option, Rep.ERR_UNKNOWN, tagged.message);
    const found = this.config.exports.lookup(tagged.exportName);
    if (found === null)
      return this.optionError(option, Rep.ERR_UNKNOWN, `no export named "${tagged.exportName}"`);
    const offered = [...new Set([BASE_ALLOCATION, ...(found.metaContexts ?? [])])];

    if (!isSet) {
      for (const name of offered) {
        if (parsed.queries.length === 0 || parsed.queries.some((query) => listQueryMatches(query, name))) {
          this.optionReply(option, Rep.META_CONTEXT, metaContextPayload(0, name));
        }
      }
      return this.optionReply(option, Rep.ACK);
    }

    // SET: only exact names select (wildcards and unknown names are ignored), each context once.
    const names: string[] = [];
    for (const query of parsed.queries) {
      if (offered.includes(query) && !names.includes(query)) names.push(query);
    }
    if (names.length > limits.metaContextsMax) {
      return this.optionError(
        option,
        Rep.ERR_TOO_BIG,
        `${names.length} meta contexts requested; at most ${limits.metaContextsMax} can be selected`,
      );
    }
    const selected = names.map((name) => ({ id: this.metaContextIdNext++, name }));
    // Bounded: at most optionsPerHandshakeMax SETs of at most metaContextsMax contexts each.
    assert(this.metaContextIdNext <= 1 + limits.optionsPerHandshakeMax * limits.metaContextsMax);
    for (const context of selected) {
      this.optionReply(option, Rep.META_CONTEXT, metaContextPayload(context.id, context.name));
    }
    this.metaSelected = selected;
    this.metaExportName = found.name;
    this.optionReply(option, Rep.ACK);
  }

  private computeTransmissionFlags(readOnly: boolean, caps: Capabilities): number {
    let flags = TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_FLUSH;
    if (readOnly || caps.readOnly) {
      flags |= TransmissionFlag.READ_ONLY;
    } else {
      flags |= TransmissionFlag.SEND_FUA;
      if (caps.trim) flags |= TransmissionFlag.SEND_TRIM;
      if (caps.zero) flags |= TransmissionFlag.SEND_WRITE_ZEROES;
      if (caps.fastZero) flags |= TransmissionFlag.SEND_FAST_ZERO;
    }
    if (caps.cache) flags |= TransmissionFlag.SEND_CACHE;
    if (caps.multiConn) flags |= TransmissionFlag.CAN_MULTI_CONN;
    if (caps.rotational) flags |= TransmissionFlag.ROTATIONAL;
    if (this.structured) flags |= TransmissionFlag.SEND_DF;
    return flags;
  }

  private enterTransmission(handle: ExportHandle): void {
    this.handle = handle;
    this.device = handle.device;
    this.transmissionFlags = this.computeTransmissionFlags(handle.readOnly, handle.device.capabilities);
    if (this.metaExportName !== handle.name) this.metaSelected = [];
    this.requests = new RequestParser(this.config.requestBytesMax);
    this.phase = Phase.TRANSMISSION;
    if (this.handshakeTimer) clearTimeout(this.handshakeTimer);
    this.handshakeTimer = null;
    this.config.log(`connection ${this.id}: export "${handle.name}" (structured=${this.structured})`);
    if (this.config.monitor !== null) {
      const address = this.socket.remoteAddress;
      const peer =
        address === undefined
          ? "unix"
          : `tcp ${address.includes(":") ? `[${address}]` : address}:${this.socket.remotePort ?? 0}`;
      const device = handle.device;
      this.monitor = this.config.monitor({
        id: this.id,
        exportName: handle.name,
        tag: this.clientTag,
        peer,
        inflight: () => this.inflight,
        sizeBytes: () => device.size,
      });
    }
  }

  /** Tell the monitor (if any) that `request` got its reply. */
  private recordReply(request: NbdRequest, err: VdiskError | null): void {
    const monitor = this.monitor;
    if (monitor === null) return;
    if (err === null) monitor.end(request.type, request.length, null, request.startMs);
    else monitor.end(request.type, 0, err.code, request.startMs);
  }

  // ---------------------------------------------------------------------------------------------
  // Transmission

  private dispatch(request: NbdRequest): void {
    this.counters.requests++;
    if (this.monitor !== null && request.type !== Cmd.DISC) {
      request.startMs = this.monitor.begin(request.type, request.offset, request.length);
    }
    if (this.shuttingDown)
      return this.replyError(request, new VdiskError("SHUTTING_DOWN", "server shutting down"));
    const device = this.device as BlockDevice;
    const readOnly = (this.transmissionFlags & TransmissionFlag.READ_ONLY) !== 0;
    const end = request.offset + request.length;
    const size = device.size;
    const fua = (request.flags & CmdFlag.FUA) !== 0;

    switch (request.type) {
      case Cmd.READ: {
        if ((request.flags & CmdFlag.DF) !== 0 && !this.structured) {
          return this.replyError(request, invalid("DF flag without structured replies"));
        }
        if ((request.flags & ~READ_FLAGS_KNOWN) !== 0)
          return this.replyError(request, invalid("unknown read flags"));
        if (request.length > this.config.requestBytesMax) {
          return this.replyError(
            request,
            new VdiskError("TOO_LARGE", "read larger than the maximum payload"),
          );
        }
        if (end > size) return this.replyError(request, outOfRange("read", request, size));
        if (request.length === 0) return this.replyReadEmpty(request);
        return this.doRead(device, request);
      }
      case Cmd.WRITE: {
        if (request.error === "TOO_LARGE") {
          return this.replyError(
            request,
            new VdiskError("TOO_LARGE", "write larger than the maximum payload"),
          );
        }
        if (readOnly || end > size) {
          if (request.pooled !== null) writePayloadPool.release(request.pooled); // never written
          if (readOnly) return this.replyError(request, new VdiskError("READ_ONLY", "export is read-only"));
          return this.replyError(request, writeOutOfRange("write", request, size));
        }
        if (request.length === 0) return this.replySimple(request, 0);
        this.inflight++;
        this.counters.bytesWritten += request.length;
        device.write(request.payload as Buffer, request.offset, fua, (err) => {
          // The device is done with the payload (its callback runs after the last use).
          if (request.pooled !== null) writePayloadPool.release(request.pooled);
          this.complete(request, err);
        });
        return;
      }
      case Cmd.FLUSH:
        this.inflight++;
        device.flush((err) => this.complete(request, err));
        return;
      case Cmd.TRIM: {
        if (readOnly) return this.replyError(request, new VdiskError("READ_ONLY", "export is read-only"));
        if (end > size) return this.replyError(request, outOfRange("trim", request, size));
        if (request.length === 0) return this.replySimple(request, 0);
        this.inflight++;
        device.trim(request.offset, request.length, fua, (err) => this.complete(request, err));
        return;
      }
      case Cmd.WRITE_ZEROES: {
        if (readOnly) return this.replyError(request, new VdiskError("READ_ONLY", "export is read-only"));
        if (end > size) return this.replyError(request, writeOutOfRange("write zeroes", request, size));
        const fast = (request.flags & CmdFlag.FAST_ZERO) !== 0;
        if (fast && (this.transmissionFlags & TransmissionFlag.SEND_FAST_ZERO) === 0) {
          return this.replyError(request, FAST_ZERO_NOT_SUPPORTED);
        }
        if (request.length === 0) return this.replySimple(request, 0);
        let flags = fua ? ZeroFlags.FUA : 0;
        if ((request.flags & CmdFlag.NO_HOLE) === 0) flags |= ZeroFlags.MAY_TRIM;
        if (fast) flags |= ZeroFlags.FAST;
        this.inflight++;
        device.zero(request.offset, request.length, flags, (err) => this.complete(request, err));
        return;
      }
      case Cmd.CACHE: {
        if (end > size) return this.replyError(request, outOfRange("cache", request, size));
        if (request.length === 0) return this.replySimple(request, 0);
        this.inflight++;
        device.cache(request.offset, request.length, (err) => this.complete(request, err));
        return;
      }
      case Cmd.BLOCK_STATUS: {
        if (!this.structured || this.metaSelected.length === 0) {
          return this.replyError(request, invalid("block status without a selected meta context"));
        }
        if (request.length === 0) return this.replyError(request, invalid("block status of zero length"));
        if (end > size) return this.replyError(request, outOfRange("block status", request, size));
        return this.doBlockStatus(device, request);
      }
      case Cmd.DISC:
        this.draining = true;
        this.config.log(`connection ${this.id}: client disconnect`);
        this.afterCompletion();
        return;
      default:
        return this.replyError(
          request,
          new VdiskError("UNKNOWN_COMMAND", `unknown command ${commandName(request.type)}`),
        );
    }
  }

  private doRead(device: BlockDevice, request: NbdRequest): void {
    const prefix = this.structured ? DATA_CHUNK_PREFIX_BYTES : SimpleReplyHeaderBytes;
    const pooled = replyBufferPool.acquire(request.length, prefix + request.length);
    const reply =
      pooled.length === prefix + request.length ? pooled : pooled.subarray(0, prefix + request.length);
    const data = reply.subarray(prefix);
    this.counters.bytesRead += request.length;
    // Cache hit: answer now, without a thread-pool round trip (see docs/nbd-server.md, "Hot path").
    if (request.length <= READ_NO_WAIT_BYTES_MAX && device.readNoWait?.(data, request.offset)) {
      this.finishRead(request, reply, data, null, pooled);
      return;
    }
    this.inflight++;
    device.read(data, request.offset, (err, holes) => {
      this.inflight--;
      if (this.phase === Phase.CLOSED) return;
      if (err) {
        this.replyError(request, err);
        replyBufferPool.release(pooled); // never sent
      } else {
        this.finishRead(request, reply, data, holes ?? null, pooled);
      }
      this.afterCompletion();
    });
  }

  /** `pooled` (the buffer under `reply`) goes back to the pool once the socket has written the reply. */
  private finishRead(
    request: NbdRequest,
    reply: Buffer,
    data: Buffer,
    holes: number[] | null,
    pooled: Buffer,
  ): void {
    this.recordReply(request, null);
    if (this.structured && holes && holes.length > 0 && (request.flags & CmdFlag.DF) === 0) {
      this.replySparseRead(request, data, holes, pooled);
      return;
    }
    if (this.structured) {
      writeStructuredHeader(reply, request, ReplyFlag.DONE, ReplyType.OFFSET_DATA, 8 + request.length);
      writeUInt64(reply, request.offset, StructuredReplyHeaderBytes);
    } else {
      writeSimpleHeader(reply, request, 0);
    }
    this.send(reply, pooled);
  }

  /**
   * Asks every selected context in parallel; one request in flight however many contexts. The reply goes
   * out once all have answered (never from inside dispatch, so a synchronous answer cannot re-enter the
   * request loop).
   */
  private doBlockStatus(device: BlockDevice, request: NbdRequest): void {
    const handle = this.handle as ExportHandle;
    const contexts = this.metaSelected;
    const results: Array<ContextExtents | VdiskError | null> = contexts.map(() => null);
    let pending = contexts.length;
    let dispatching = true;
    const finish = (): void => {
      this.inflight--;
      if (this.phase !== Phase.CLOSED) this.replyBlockStatus(request, contexts, results);
      this.afterCompletion();
    };
    this.inflight++;
    contexts.forEach((context, index) => {
      const done = (err: VdiskError | null, extents?: Extent[]): void => {
        assert(results[index] === null, `meta context ${context.name} answered twice`);
        results[index] = err ?? this.clampExtents(request, context.name, extents);
        if (--pending > 0) return;
        if (dispatching) process.nextTick(finish);
        else finish();
      };
      if (context.name === BASE_ALLOCATION) {
        device.blockStatus(request.offset, request.length, done);
      } else if (handle.contextStatus) {
        handle.contextStatus(context.name, request.offset, request.length, done);
      } else {
        done(new VdiskError("INTERNAL", `export does not serve meta context ${context.name}`));
      }
    });
    dispatching = false;
  }

  /**
   * A context's extents as they go on the wire: within the request's length, at most one with REQ_ONE
   * (else at most blockStatusExtentsMax), neighbours with equal flags merged. None is an error.
   */
  private clampExtents(
    request: NbdRequest,
    context: string,
    extents: Extent[] | undefined,
  ): ContextExtents | VdiskError {
    const reqOne = (request.flags & CmdFlag.REQ_ONE) !== 0;
    const countMax = reqOne ? 1 : limits.blockStatusExtentsMax;
    const flagsMask = context === BASE_ALLOCATION ? 3 : 0xffff_ffff;
    const lengths: number[] = [];
    const flags: number[] = [];
    let total = 0;
    for (const extent of extents ?? []) {
      if (total >= request.length) break;
      if (!(extent.length > 0) || !Number.isInteger(extent.length)) break;
      const length = Math.min(extent.length, request.length - total);
      const extentFlags = (extent.flags & flagsMask) >>> 0;
      // Merge neighbours with equal flags (devices may split extents at internal boundaries).
      const last = lengths.length - 1;
      if (last >= 0 && flags[last] === extentFlags) lengths[last] += length;
      else if (lengths.length < countMax) {
        lengths.push(length);
        flags.push(extentFlags);
      } else break;
      total += length;
    }
    if (lengths.length === 0)
      return new VdiskError("IO_ERROR", `meta context ${context} returned no extents`);
    return { lengths, flags };
  }

  private complete(request: NbdRequest, err: VdiskError | null): void {
    this.inflight--;
    if (this.phase !== Phase.CLOSED) {
      if (err) this.replyError(request, err);
      else this.replySimple(request, 0);
    }
    this.afterCompletion();
  }

  private afterCompletion(): void {
    if (this.phase === Phase.CLOSED) return;
    if (this.draining && this.inflight === 0) {
      // Let corked replies out, then end the connection.
      if (this.corked) this.uncork();
      if (this.writer !== null) {
        // The native writer's progress callback comes back here once everything is on the socket.
        if (!this.writer.idle) {
          this.writer.flush();
          if (!this.writer.idle) return;
        }
        this.writer.close();
      }
      const callbacks = this.onDrainedCallbacks.splice(0);
      this.phase = Phase.CLOSED;
      this.socket.end();
      this.releaseHandle();
      for (const callback of callbacks) callback();
      return;
    }
    if (this.paused || this.queue.length > 0) this.maybeResume();
  }

  // ---------------------------------------------------------------------------------------------
  // Replies

  /** Queue `buffer` on the socket; `release` (a pooled reply buffer) returns to the pool once written. */
  private send(buffer: Buffer, release: Buffer | null = null): void {
    if (this.writerWanted) this.startWriter();
    if (this.writer !== null) return this.writer.push(buffer, release);
    if (!this.corked) {
      this.corked = true;
      this.socket.cork();
      setImmediate(this.uncork);
    }
    if (release === null) {
      this.socket.write(buffer);
    } else {
      this.releases.push(release);
      this.socket.write(buffer, this.releaseWritten);
    }
  }

  /**
   * Switch this connection's replies to the native writer: only in transmission, only on a socket with a
   * descriptor, and only once the socket has nothing of its own queued (or corked), so that no reply
   * can overtake an earlier one.
   */
  private startWriter(): void {
    if (this.phase !== Phase.TRANSMISSION || this.corked || this.socket.writableLength > 0) return;
    this.writerWanted = false;
    const fd = (this.socket as unknown as { _handle?: { fd?: unknown } })._handle?.fd;
    if (typeof fd !== "number" || fd < 0) return;
    // Without the addon, or when the descriptor cannot be duplicated (EMFILE), the socket's own writes
    // serve this connection: slower for large reads, never wrong.
    let socketWriter: NativeSocketWriter;
    try {
      socketWriter = new (loadNative().SocketWriter)(fd, () => this.onWriterProgress());
    } catch (err) {
      this.config.log(`connection ${this.id}: replies without the writer thread: ${(err as Error).message}`);
      return;
    }
    // Over TCP the thread only finishes writes the socket could not take at once: handing replies to it
    // there measured slower (docs/nbd-server.md, "Reply writer"), most likely because its sends and the
    // event loop's reads of one TCP socket take turns on the socket's lock.
    const unix = this.socket.remoteAddress === undefined;
    const threadBytes = unix ? (this.config.replyThreadBytes as number) : Infinity;
    this.writer = new ReplyWriter(socketWriter, threadBytes, (buffer) => replyBufferPool.release(buffer));
  }

  private onWriterProgress(): void {
    const writer = this.writer;
    if (writer === null) return;
    const error = writer.progress();
    if (this.phase === Phase.CLOSED) return;
    if (error !== null) return this.closeOnSocketError(error, `socket write failed: ${error}`);
    this.afterCompletion();
  }

  /** The socket failed with errno name `code`: close, logging `reason` unless the client just hung up. */
  private closeOnSocketError(code: string | undefined, reason: string): void {
    // A client that hangs up early (EPIPE, ECONNRESET) is routine; anything else is worth a line.
    const routine = code === "EPIPE" || code === "ECONNRESET";
    this.close(routine ? null : reason);
  }

  /** Pooled buffers waiting for their write callbacks, in write order (callbacks run in that order). */
  private readonly releases: Buffer[] = [];
  private readonly releaseWritten = (): void => {
    const buffer = this.releases.shift();
    assert(buffer !== undefined, "a write callback for every pooled reply");
    replyBufferPool.release(buffer);
  };

  private replySimple(request: NbdRequest, errno: number): void {
    if (errno === 0) this.recordReply(request, null); // errors were recorded by replyError
    const reply = Buffer.allocUnsafe(SimpleReplyHeaderBytes);
    writeSimpleHeader(reply, request, errno);
    this.send(reply);
  }

  private replyReadEmpty(request: NbdRequest): void {
    if (!this.structured) return this.replySimple(request, 0);
    this.recordReply(request, null);
    const reply = Buffer.allocUnsafe(StructuredReplyHeaderBytes);
    writeStructuredHeader(reply, request, ReplyFlag.DONE, ReplyType.NONE, 0);
    this.send(reply);
  }

  private replyError(request: NbdRequest, err: VdiskError): void {
    this.counters.errors++;
    this.recordReply(request, err);
    let errno: NbdErrnoValue = nbdErrnoOf(err);
    // ENOTSUP is only allowed on the wire for FAST_ZERO requests (nbdkit does the same).
    if (
      errno === NbdErrno.ENOTSUP &&
      !(request.type === Cmd.WRITE_ZEROES && request.flags & CmdFlag.FAST_ZERO)
    ) {
      errno = NbdErrno.EINVAL;
    }
    if (!this.structured) return this.replySimple(request, errno);
    const message = Buffer.from(err.message.slice(0, 200), "utf8");
    const reply = Buffer.allocUnsafe(StructuredReplyHeaderBytes + 6 + message.length);
    writeStructuredHeader(reply, request, ReplyFlag.DONE, ReplyType.ERROR, 6 + message.length);
    reply.writeUInt32BE(errno, StructuredReplyHeaderBytes);
    reply.writeUInt16BE(message.length, StructuredReplyHeaderBytes + 4);
    message.copy(reply, StructuredReplyHeaderBytes + 6);
    this.send(reply);
  }

  /** A read with known holes: OFFSET_DATA chunks for data, OFFSET_HOLE chunks for holes; DONE on the last. */
  private replySparseRead(request: NbdRequest, data: Buffer, holes: number[], pooled: Buffer): void {
    const chunks: Array<{ start: number; length: number; hole: boolean }> = [];
    let position = 0;
    for (let i = 0; i < holes.length; i += 2) {
      const start = holes[i] as number;
      const length = holes[i + 1] as number;
      if (length <= 0 || start < position || start + length > data.length) continue; // defensive: skip junk
      if (start > position) chunks.push({ start: position, length: start - position, hole: false });
      chunks.push({ start, length, hole: true });
      position = start + length;
    }
    if (position < data.length) chunks.push({ start: position, length: data.length - position, hole: false });
    chunks.forEach((chunk, index) => {
      const last = index === chunks.length - 1;
      const flags = last ? ReplyFlag.DONE : 0;
      // The last write carries the pool release: write callbacks run in order, so by then every slice
      // of `data` sent before it has been written too.
      const release = last ? pooled : null;
      if (chunk.hole) {
        const header = Buffer.allocUnsafe(StructuredReplyHeaderBytes + 12);
        writeStructuredHeader(header, request, flags, ReplyType.OFFSET_HOLE, 12);
        writeUInt64(header, request.offset + chunk.start, StructuredReplyHeaderBytes);
        header.writeUInt32BE(chunk.length, StructuredReplyHeaderBytes + 8);
        this.send(header, release);
      } else {
        const header = Buffer.allocUnsafe(DATA_CHUNK_PREFIX_BYTES);
        writeStructuredHeader(header, request, flags, ReplyType.OFFSET_DATA, 8 + chunk.length);
        writeUInt64(header, request.offset + chunk.start, StructuredReplyHeaderBytes);
        this.send(header);
        this.send(data.subarray(chunk.start, chunk.start + chunk.length), release);
      }
    });
  }

  /** One BLOCK_STATUS chunk per context, DONE on the last; or one error chunk if any context failed. */
  private replyBlockStatus(
    request: NbdRequest,
    contexts: SelectedContext[],
    results: Array<ContextExtents | VdiskError | null>,
  ): void {
    for (const result of results) {
      assert(result !== null, "every meta context answered");
      if (result instanceof VdiskError) return this.replyError(request, result);
    }
    this.recordReply(request, null);
    contexts.forEach((context, index) => {
      const { lengths, flags } = results[index] as ContextExtents;
      const payloadBytes = 4 + 8 * lengths.length;
      const reply = Buffer.allocUnsafe(StructuredReplyHeaderBytes + payloadBytes);
      const chunkFlags = index === contexts.length - 1 ? ReplyFlag.DONE : 0;
      writeStructuredHeader(reply, request, chunkFlags, ReplyType.BLOCK_STATUS, payloadBytes);
      reply.writeUInt32BE(context.id, StructuredReplyHeaderBytes);
      for (let i = 0; i < lengths.length; i++) {
        reply.writeUInt32BE(lengths[i] as number, StructuredReplyHeaderBytes + 4 + 8 * i);
        reply.writeUInt32BE(flags[i] as number, StructuredReplyHeaderBytes + 8 + 8 * i);
      }
      this.send(reply);
    });
  }

  // ---------------------------------------------------------------------------------------------
  // Life cycle

  /**
   * Server shutdown: refuse new requests with ESHUTDOWN, let in-flight ones finish, then end.
   * Calls `done` once this connection is closed.
   */
  shutdown(done: () => void): void {
    if (this.phase !== Phase.TRANSMISSION) {
      this.close("server shutting down");
      done();
      return;
    }
    this.shuttingDown = true;
    this.draining = true;
    this.onDrainedCallbacks.push(done);
    this.afterCompletion();
  }

  /** Hard close. `reason` is logged when not null and the connection was still open. */
  close(reason: string | null): void {
    if (reason !== null && !this.forgotten) this.config.log(`connection ${this.id}: closing: ${reason}`);
    if (this.handshakeTimer) clearTimeout(this.handshakeTimer);
    this.handshakeTimer = null;
    this.phase = Phase.CLOSED;
    this.writerWanted = false;
    this.writer?.close();
    if (!this.socket.destroyed) this.socket.destroy();
    this.queue.clear();
    this.releaseHandle();
    if (this.monitor !== null) {
      const monitor = this.monitor;
      this.monitor = null;
      monitor.close();
    }
    for (const callback of this.onDrainedCallbacks.splice(0)) callback();
    if (!this.forgotten) {
      this.forgotten = true;
      this.onClose(this);
    }
  }

  private releaseHandle(): void {
    if (this.handle) {
      const handle = this.handle;
      this.handle = null;
      handle.release();
    }
  }
}

// -----------------------------------------------------------------------------------------------
// Encoding helpers

function writeUInt64(buffer: Buffer, value: number, offset: number): void {
  buffer.writeUInt32BE(Math.floor(value / 0x1_0000_0000), offset);
  buffer.writeUInt32BE(value >>> 0, offset + 4);
}

function u16(value: number): Buffer {
  const buffer = Buffer.allocUnsafe(2);
  buffer.writeUInt16BE(value, 0);
  return buffer;
}

function writeSimpleHeader(buffer: Buffer, request: NbdRequest, errno: number): void {
  buffer.writeUInt32BE(SIMPLE_REPLY_MAGIC, 0);
  buffer.writeUInt32BE(errno, 4);
  buffer.writeUInt32BE(request.cookieHi, 8);
  buffer.writeUInt32BE(request.cookieLo, 12);
}

function writeStructuredHeader(
  buffer: Buffer,
  request: NbdRequest,
  flags: number,
  type: number,
  length: number,
): void {
  buffer.writeUInt32BE(STRUCTURED_REPLY_MAGIC, 0);
  buffer.writeUInt16BE(flags, 4);
  buffer.writeUInt16BE(type, 6);
  buffer.writeUInt32BE(request.cookieHi, 8);
  buffer.writeUInt32BE(request.cookieLo, 12);
  buffer.writeUInt32BE(length, 16);
}

/**
 * LIST_META_CONTEXT matching: a query ending in a colon (`base:`, `qemu:`, `qemu:dirty-bitmap:`) is a
 * wildcard for every context it prefixes; any other query matches only the context of that exact name.
 * Queries of unknown namespaces thus match nothing, as the spec requires.
 */
function listQueryMatches(query: string, name: string): boolean {
  if (query.endsWith(":")) return name.startsWith(query);
  return query === name;
}

function metaContextPayload(id: number, name: string): Buffer {
  const nameBytes = Buffer.from(name, "utf8");
  const payload = Buffer.allocUnsafe(4 + nameBytes.length);
  payload.writeUInt32BE(id, 0);
  nameBytes.copy(payload, 4);
  return payload;
}

function invalid(message: string): VdiskError {
  return new VdiskError("INVALID_ARGUMENT", message);
}

function outOfRange(what: string, request: NbdRequest, size: number): VdiskError {
  return new VdiskError(
    "OUT_OF_RANGE",
    `${what} of ${request.length} bytes at ${request.offset} is beyond the end of the export (${size} bytes)`,
  );
}

function writeOutOfRange(what: string, request: NbdRequest, size: number): VdiskError {
  return new VdiskError(
    "WRITE_OUT_OF_RANGE",
    `${what} of ${request.length} bytes at ${request.offset} is beyond the end of the export (${size} bytes)`,
  );
}
