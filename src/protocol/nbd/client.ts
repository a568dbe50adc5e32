/**
 * A minimal NBD client: fixed newstyle handshake with NBD_OPT_GO, then READ, WRITE, FLUSH and DISC with
 * simple replies, pipelined. It is the replayer's way to a disk and the future "remote NBD device".
 *
 * Handshake (doc/proto.md): greeting (NBDMAGIC, IHAVEOPT, handshake flags; FIXED_NEWSTYLE required) →
 * client flags → NBD_OPT_GO(name, [NBD_INFO_BLOCK_SIZE]) → NBD_REP_INFO* → NBD_REP_ACK. Asking for the
 * block sizes promises to honour them: requests are checked against the minimum (alignment) and maximum
 * (payload) before they are sent. An error reply ends the handshake with a VdiskError carrying the
 * server's message (NBD_REP_ERR_UNKNOWN → NOT_FOUND, and so on, see `optionError`). Structured replies
 * are not requested, so the server must answer every request with a simple reply.
 *
 * Transmission: a request gets a slot (at most `inflightMax`, preallocated, each with its 28-byte header
 * buffer); its cookie is (slot generation << 32 | slot index), so a reply is matched in O(1) and a reply
 * for a slot that is free, or was reused since, is caught. Requests beyond `inflightMax` wait in a FIFO
 * (bounded by `queuedMax`). Requests sent in one event-loop turn leave in one writev (cork / nextTick
 * uncork). The reply parser is a two-state machine (HEADER 16 bytes → DATA for a successful READ) over a
 * ByteQueue; READ data is copied straight into the caller's buffer, or dropped when none is given.
 *
 * Every reply is validated: magic (a structured reply is a protocol violation here), known cookie, and
 * the error value, mapped to a VdiskError code (`errorFromNbd`). A violation or a lost connection fails
 * every pending request and the client for good (`failure`); a request error fails only that request.
 * ESHUTDOWN makes the client stop sending and disconnect once idle, as the spec requires.
 *
 * Hot path: `read`/`write`/`flush` take a callback `(error, tag)` and a number `tag` handed back, so
 * callers need no closure per request; the callback always runs asynchronously. `*Async` wrappers return
 * promises for tests and tools. A WRITE's buffer must stay unchanged until its callback.
 *
 * Addresses: `nbd://HOST[:PORT]/EXPORT` (TCP, port 10809 by default) and
 * `nbd+unix:///EXPORT?socket=PATH` (`parseNbdUri`); the export is the URI path without its first '/',
 * percent-decoded.
 */
import * as net from "node:net";
import { ErrorCodes, NbdErrno, VdiskError, assert, codeOfNbdErrno } from "../../errors";
import {
  clientConnectTimeoutMsDefault,
  clientInflightMaxCeiling,
  clientInflightMaxDefault,
  clientQueuedMax,
  nameBytesMax,
  optionBytesMax,
  requestBytesMaxDefault,
} from "../../limits";
import { ByteQueue } from "./byte-queue";
import {
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
  REQUEST_MAGIC,
  Rep,
  RequestHeaderBytes,
  SIMPLE_REPLY_MAGIC,
  STRUCTURED_REPLY_MAGIC,
  SimpleReplyHeaderBytes,
  TransmissionFlag,
  commandName,
} from "./constants";

export const nbdPortDefault = 10809;
// Limits (src/limits.ts): in-flight default and ceiling, waiting requests, connect timeout.
export { clientConnectTimeoutMsDefault, clientInflightMaxCeiling, clientInflightMaxDefault, clientQueuedMax };
/** Time the server gets to close the connection after NBD_CMD_DISC. */
const disconnectTimeoutMs = 5_000;
/** The oldstyle greeting's second magic ("cliserv_magic"). */
const CLISERV_MAGIC_HI = 0x00004202;
const CLISERV_MAGIC_LO = 0x81861253;
const OPTION_REPLY_HEADER_BYTES = 20;
const GREETING_BYTES = 18;

export type NbdEndpoint = { kind: "unix"; path: string } | { kind: "tcp"; host: string; port: number };

export interface NbdTarget {
  endpoint: NbdEndpoint;
  exportName: string;
}

/** Called once per request; `tag` is what the caller passed. */
export type NbdCallback = (error: VdiskError | null, tag: number) => void;

export interface NbdClientOptions {
  inflightMax?: number;
  connectTimeoutMs?: number;
}

export interface BlockSizes {
  minimum: number;
  preferred: number;
  maximum: number;
}

// ---- URIs ----------------------------------------------------------------------------------------------

function uriError(uri: string, what: string): VdiskError {
  return new VdiskError("INVALID_ARGUMENT", `bad NBD URI "${uri}": ${what}`, {
    hint: "write nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH",
  });
}

function decode(uri: string, text: string): string {
  try {
    return decodeURIComponent(text);
  } catch {
    throw uriError(uri, `"${text}" is not valid percent-encoding`);
  }
}

/** Parse `nbd://HOST[:PORT]/EXPORT` or `nbd+unix:///EXPORT?socket=PATH`. */
export function parseNbdUri(uri: string): NbdTarget {
  const match = /^([a-z+]+):\/\/([^/?#]*)(\/[^?#]*)?(\?[^#]*)?$/i.exec(uri);
  if (match === null) throw uriError(uri, "not a URI");
  const scheme = (match[1] as string).toLowerCase();
  const authority = match[2] as string;
  const exportName = decode(uri, (match[3] ?? "/").slice(1));
  if (Buffer.byteLength(exportName) > nameBytesMax) throw uriError(uri, "the export name is too long");
  const query = new Map<string, string>();
  for (const part of (match[4] ?? "").slice(1).split("&")) {
    if (part === "") continue;
    const equals = part.indexOf("=");
    const key = decode(uri, equals < 0 ? part : part.slice(0, equals));
    query.set(key, decode(uri, equals < 0 ? "" : part.slice(equals + 1)));
  }
  if (scheme === "nbd+unix") {
    if (authority !== "")
      throw uriError(uri, "a Unix socket URI has no host (nbd+unix:///EXPORT?socket=PATH)");
    const socket = query.get("socket");
    if (socket === undefined || socket === "") throw uriError(uri, "the socket=PATH parameter is missing");
    return { endpoint: { kind: "unix", path: socket }, exportName };
  }
  if (scheme === "nbds" || scheme === "nbds+unix") throw uriError(uri, "TLS (nbds) is not supported");
  if (scheme !== "nbd" && scheme !== "nbd+tcp") throw uriError(uri, `unknown scheme "${scheme}"`);
  const hostPort = /^(\[[0-9a-fA-F:.]+\]|[^:[\]]+)(?::(\d+))?$/.exec(authority);
  if (hostPort === null) throw uriError(uri, "the host is missing or malformed");
  const host = (hostPort[1] as string).replace(/^\[(.*)\]$/, "$1");
  const port = hostPort[2] === undefined ? nbdPortDefault : Number(hostPort[2]);
  if (!Number.isInteger(port) || port < 1 || port > 65535) throw uriError(uri, "the port is not 1..65535");
  return { endpoint: { kind: "tcp", host, port }, exportName };
}

export function formatNbdUri(target: NbdTarget): string {
  const name = encodeURIComponent(target.exportName).replace(/%2F/g, "/").replace(/%40/g, "@");
  const endpoint = target.endpoint;
  if (endpoint.kind === "unix") return `nbd+unix:///${name}?socket=${endpoint.path}`;
  const host = endpoint.host.includes(":") ? `[${endpoint.host}]` : endpoint.host;
  return `nbd://${host}:${endpoint.port}/${name}`;
}

function describeEndpoint(endpoint: NbdEndpoint): string {
  return endpoint.kind === "unix" ? `socket ${endpoint.path}` : `${endpoint.host}:${endpoint.port}`;
}

// ---- Errors --------------------------------------------------------------------------------------------

const errnoNames: Record<number, string> = {};
for (const [name, value] of Object.entries(NbdErrno)) errnoNames[value] = name;

/** The VdiskError code for an NBD error value (errors.ts keeps the table). */
export { codeOfNbdErrno };

function errorFromNbd(errno: number, type: number, offset: number, length: number): VdiskError {
  const name = errnoNames[errno] ?? `unknown error ${errno}`;
  const code = codeOfNbdErrno(errno);
  assert(code in ErrorCodes, "mapped to a known code");
  return new VdiskError(
    code,
    `the server failed NBD ${commandName(type)} of ${length} bytes at offset ${offset}: ${name} (${errno})`,
  );
}

function optionError(type: number, message: string, exportName: string, where: string): VdiskError {
  const said = message === "" ? "" : `: ${message}`;
  switch (type) {
    case Rep.ERR_UNKNOWN:
      return new VdiskError("NOT_FOUND", `${where} has no export named "${exportName}"${said}`, {
        hint: "check the export (disk) name; vdisk list shows a vdisk daemon's disks",
      });
    case Rep.ERR_UNSUP:
      return new VdiskError("NOT_SUPPORTED", `${where} does not support NBD_OPT_GO${said}`, {
        hint: "the server is too old for this client (it needs the fixed newstyle handshake with GO)",
      });
    case Rep.ERR_TLS_REQD:
      return new VdiskError("NOT_SUPPORTED", `${where} requires TLS${said}`, {
        hint: "this client does not speak TLS; use a server or export without it",
      });
    case Rep.ERR_POLICY:
      return new VdiskError("UNAUTHORIZED", `${where} refused export "${exportName}" by policy${said}`);
    case Rep.ERR_SHUTDOWN:
      return new VdiskError("SHUTTING_DOWN", `${where} is shutting down${said}`, { hint: "try again later" });
    case Rep.ERR_TOO_BIG:
      return new VdiskError("TOO_LARGE", `${where} found the request too big${said}`);
    case Rep.ERR_INVALID:
      return new VdiskError("INVALID_ARGUMENT", `${where} refused the request as invalid${said}`);
    default:
      return new VdiskError(
        "IO_ERROR",
        `${where} refused export "${exportName}" (reply 0x${type.toString(16)})${said}`,
      );
  }
}

function protocolError(where: string, what: string): VdiskError {
  return new VdiskError("PROTOCOL", `${where} broke the NBD protocol: ${what}`, {
    hint: "is this an NBD server? (the connection was closed)",
  });
}

// ---- The client ----------------------------------------------------------------------------------------

interface Slot {
  busy: boolean;
  generation: number;
  type: number;
  offset: number;
  length: number;
  target: Buffer | null;
  done: NbdCallback | null;
  tag: number;
  readonly header: Buffer;
}

interface Waiting {
  type: number;
  offset: number;
  length: number;
  buffer: Buffer | null;
  flags: number;
  done: NbdCallback;
  tag: number;
}

const enum ReplyState {
  HEADER,
  DATA,
}

export class NbdClient {
  private readonly queue = new ByteQueue();
  private readonly slots: Slot[] = [];
  private readonly free: number[] = [];
  private readonly waiting: Waiting[] = [];
  private waitingHead = 0;
  private inflightCount = 0;
  private corked = false;
  private state = ReplyState.HEADER;
  private replyIndex = -1;
  private replyFilled = 0;
  private failed: VdiskError | null = null;
  private disconnecting = false;
  private serverShuttingDown = false;
  private readonly idleWaiters: Array<() => void> = [];
  private readonly closedPromise: Promise<void>;
  private readonly where: string;
  private readonly uncork = (): void => {
    this.corked = false;
    if (!this.socket.destroyed) this.socket.uncork();
  };

  private constructor(
    private readonly socket: net.Socket,
    readonly target: NbdTarget,
    /** Export size in bytes. */
    readonly size: number,
    readonly transmissionFlags: number,
    readonly blockSizes: BlockSizes,
    readonly inflightMax: number,
    leftover: ByteQueue,
  ) {
    this.where = `NBD server ${describeEndpoint(target.endpoint)}`;
    for (let index = 0; index < inflightMax; index++) {
      this.slots.push({
        busy: false,
        generation: 0,
        type: 0,
        offset: 0,
        length: 0,
        target: null,
        done: null,
        tag: 0,
        header: Buffer.alloc(RequestHeaderBytes),
      });
      this.free.push(inflightMax - 1 - index);
    }
    while (leftover.length > 0) this.queue.push(Buffer.from(leftover.take(leftover.length)));
    this.closedPromise = new Promise((resolve) => socket.once("close", () => resolve()));
    socket.on("data", (chunk: Buffer) => this.onData(chunk));
    socket.on("error", (err) =>
      this.fail(new VdiskError("IO_ERROR", `${this.where}: ${err.message}`, { cause: err })),
    );
    socket.on("close", () => {
      if (!this.disconnecting || this.inflightCount > 0) {
        this.fail(
          new VdiskError("IO_ERROR", `${this.where} closed the connection`, {
            hint: "was the server stopped, or the export deleted?",
          }),
        );
      }
      this.failed ??= new VdiskError("IO_ERROR", "the NBD connection is closed");
    });
    if (this.queue.length > 0) this.parse();
  }

  /** Connect, handshake, and enter transmission. */
  static async connect(target: NbdTarget, options: NbdClientOptions = {}): Promise<NbdClient> {
    const inflightMax = options.inflightMax ?? clientInflightMaxDefault;
    assert(
      Number.isSafeInteger(inflightMax) && inflightMax >= 1 && inflightMax <= clientInflightMaxCeiling,
      "inflightMax within 1..clientInflightMaxCeiling",
    );
    const timeoutMs = options.connectTimeoutMs ?? clientConnectTimeoutMsDefault;
    const where = `NBD server ${describeEndpoint(target.endpoint)}`;
    const socket = await openSocket(target.endpoint, where, timeoutMs);
    const reader = new HandshakeReader(socket, where);
    const timer = setTimeout(
      () =>
        reader.abort(new VdiskError("IO_ERROR", `${where} did not finish the handshake in ${timeoutMs} ms`)),
      timeoutMs,
    );
    const progress = { negotiating: false };
    try {
      const result = await handshake(socket, reader, target.exportName, where, progress);
      reader.detach();
      return new NbdClient(
        socket,
        target,
        result.size,
        result.flags,
        result.blockSizes,
        inflightMax,
        reader.queue,
      );
    } catch (err) {
      reader.detach();
      socket.on("error", () => undefined); // the error is already being reported
      if (progress.negotiating && err instanceof VdiskError && err.code !== "PROTOCOL" && !socket.destroyed) {
        // The server answered properly but said no: leave politely with NBD_OPT_ABORT (a soft disconnect).
        socket.end(abortMessage());
        setTimeout(() => socket.destroy(), disconnectTimeoutMs).unref();
      } else {
        socket.destroy();
      }
      throw err;
    } finally {
      clearTimeout(timer);
    }
  }

  get readOnly(): boolean {
    return (this.transmissionFlags & TransmissionFlag.READ_ONLY) !== 0;
  }

  get canFlush(): boolean {
    return (this.transmissionFlags & TransmissionFlag.SEND_FLUSH) !== 0;
  }

  get canFua(): boolean {
    return (this.transmissionFlags & TransmissionFlag.SEND_FUA) !== 0;
  }

  /** Requests sent and not answered. */
  get inflight(): number {
    return this.inflightCount;
  }

  /** Requests waiting for a free slot. */
  get queued(): number {
    return this.waiting.length - this.waitingHead;
  }

  /** Why the client stopped working (connection lost, protocol violation, closed), or null. */
  get failure(): VdiskError | null {
    return this.failed;
  }

  /** Read `length` bytes at `offset` into `target` (from its start), or drop them when `target` is null. */
  read(offset: number, length: number, target: Buffer | null, done: NbdCallback, tag = 0): void {
    assert(target === null || target.length >= length, "the read target holds the data");
    this.submit(Cmd.READ, offset, length, target, 0, done, tag);
  }

  /** Write `data` at `offset`; with `fua`, the server persists it before replying. */
  write(offset: number, data: Buffer, done: NbdCallback, tag = 0, fua = false): void {
    this.submit(Cmd.WRITE, offset, data.length, data, fua ? CmdFlag.FUA : 0, done, tag);
  }

  flush(done: NbdCallback, tag = 0): void {
    this.submit(Cmd.FLUSH, 0, 0, null, 0, done, tag);
  }

  readAsync(offset: number, length: number): Promise<Buffer> {
    const target = Buffer.alloc(length);
    return new Promise((resolve, reject) =>
      this.read(offset, length, target, (err) => (err ? reject(err) : resolve(target))),
    );
  }

  writeAsync(offset: number, data: Buffer, fua = false): Promise<void> {
    return new Promise((resolve, reject) =>
      this.write(offset, data, (err) => (err ? reject(err) : resolve()), 0, fua),
    );
  }

  flushAsync(): Promise<void> {
    return new Promise((resolve, reject) => this.flush((err) => (err ? reject(err) : resolve())));
  }

  /**
   * Soft disconnect: wait for every request to be answered, send NBD_CMD_DISC, and resolve when the
   * server has closed the connection (after `disconnectTimeoutMs` the socket is destroyed).
   */
  async close(): Promise<void> {
    if (this.failed === null && !this.disconnecting) {
      await this.idle();
      if (this.failed === null && !this.disconnecting) this.sendDisconnect();
    }
    const timer = setTimeout(() => this.socket.destroy(), disconnectTimeoutMs);
    try {
      await this.closedPromise;
    } finally {
      clearTimeout(timer);
    }
  }

  /** Hard disconnect: fail everything pending and drop the connection. */
  destroy(): void {
    this.fail(new VdiskError("IO_ERROR", "the NBD client was destroyed"));
  }

  // ---- Sending -----------------------------------------------------------------------------------------

  private submit(
    type: number,
    offset: number,
    length: number,
    buffer: Buffer | null,
    flags: number,
    done: NbdCallback,
    tag: number,
  ): void {
    const refused = this.check(type, offset, length, flags);
    if (refused !== null) {
      process.nextTick(done, refused, tag);
      return;
    }
    if (this.free.length === 0 || this.waitingHead < this.waiting.length) {
      if (this.queued >= clientQueuedMax) {
        const limit = new VdiskError("LIMIT", `more than ${clientQueuedMax} NBD requests are waiting`);
        process.nextTick(done, limit, tag);
        return;
      }
      this.waiting.push({ type, offset, length, buffer, flags, done, tag });
      return;
    }
    this.send(type, offset, length, buffer, flags, done, tag);
  }

  /** A reason to refuse a request without sending it, or null. */
  private check(type: number, offset: number, length: number, flags: number): VdiskError | null {
    if (this.failed !== null) return this.failed;
    if (this.disconnecting || this.serverShuttingDown) {
      return new VdiskError("SHUTTING_DOWN", `the connection to ${this.where} is being closed`);
    }
    if (type === Cmd.FLUSH) {
      return this.canFlush ? null : new VdiskError("NOT_SUPPORTED", `${this.where} does not support flush`);
    }
    const what = `${commandName(type)} of ${length} bytes at offset ${offset}`;
    if (!Number.isSafeInteger(offset) || offset < 0 || !Number.isSafeInteger(length) || length < 0) {
      return new VdiskError("INVALID_ARGUMENT", `${what}: offset and length must be whole numbers`);
    }
    if (length === 0) return new VdiskError("INVALID_ARGUMENT", `${what}: zero-length requests are not sent`);
    if (offset + length > this.size) {
      return new VdiskError(
        type === Cmd.WRITE ? "WRITE_OUT_OF_RANGE" : "OUT_OF_RANGE",
        `${what} goes past the end of the export (${this.size} bytes)`,
      );
    }
    if (length > this.blockSizes.maximum) {
      return new VdiskError(
        "TOO_LARGE",
        `${what} is over the server's maximum of ${this.blockSizes.maximum}`,
      );
    }
    const minimum = this.blockSizes.minimum;
    if (offset % minimum !== 0 || (length % minimum !== 0 && offset + length !== this.size)) {
      return new VdiskError(
        "INVALID_ARGUMENT",
        `${what} is not aligned to the server's ${minimum}-byte blocks`,
      );
    }
    if (type === Cmd.WRITE && this.readOnly) {
      return new VdiskError("READ_ONLY", `${what}: export "${this.target.exportName}" is read-only`);
    }
    if ((flags & CmdFlag.FUA) !== 0 && !this.canFua) {
      return new VdiskError("NOT_SUPPORTED", `${this.where} does not support FUA`);
    }
    return null;
  }

  private send(
    type: number,
    offset: number,
    length: number,
    buffer: Buffer | null,
    flags: number,
    done: NbdCallback,
    tag: number,
  ): void {
    const index = this.free.pop() as number;
    const slot = this.slots[index] as Slot;
    assert(!slot.busy, "a free slot is not busy");
    slot.busy = true;
    slot.generation = (slot.generation + 1) >>> 0;
    slot.type = type;
    slot.offset = offset;
    slot.length = length;
    slot.target = type === Cmd.READ ? buffer : null;
    slot.done = done;
    slot.tag = tag;
    this.inflightCount++;
    const header = slot.header;
    header.writeUInt32BE(REQUEST_MAGIC, 0);
    header.writeUInt16BE(flags, 4);
    header.writeUInt16BE(type, 6);
    header.writeUInt32BE(slot.generation, 8);
    header.writeUInt32BE(index, 12);
    header.writeUInt32BE(Math.floor(offset / 0x1_0000_0000), 16);
    header.writeUInt32BE(offset >>> 0, 20);
    header.writeUInt32BE(length, 24);
    this.cork();
    this.socket.write(header);
    if (type === Cmd.WRITE && length > 0) this.socket.write((buffer as Buffer).subarray(0, length));
  }

  private cork(): void {
    if (this.corked) return;
    this.corked = true;
    this.socket.cork();
    process.nextTick(this.uncork);
  }

  private sendDisconnect(): void {
    this.disconnecting = true;
    const header = Buffer.alloc(RequestHeaderBytes);
    header.writeUInt32BE(REQUEST_MAGIC, 0);
    header.writeUInt16BE(Cmd.DISC, 6);
    this.socket.end(header);
  }

  /** Resolves when nothing is in flight or waiting (or the client failed). */
  private idle(): Promise<void> {
    if (this.inflightCount === 0 && this.queued === 0) return Promise.resolve();
    return new Promise((resolve) => this.idleWaiters.push(resolve));
  }

  // ---- Receiving ---------------------------------------------------------------------------------------

  private onData(chunk: Buffer): void {
    if (this.failed !== null) return;
    this.queue.push(chunk);
    this.parse();
  }

  private parse(): void {
    const queue = this.queue;
    while (this.failed === null) {
      if (this.state === ReplyState.HEADER) {
        if (!queue.ensure(SimpleReplyHeaderBytes)) return;
        const bytes = queue.head;
        const at = queue.headOffset;
        const magic = bytes.readUInt32BE(at);
        if (magic !== SIMPLE_REPLY_MAGIC) {
          const what =
            magic === STRUCTURED_REPLY_MAGIC
              ? "a structured reply, which was not negotiated"
              : `bad reply magic 0x${magic.toString(16)}`;
          this.fail(protocolError(this.where, what));
          return;
        }
        const errno = bytes.readUInt32BE(at + 4);
        const generation = bytes.readUInt32BE(at + 8);
        const index = bytes.readUInt32BE(at + 12);
        queue.skip(SimpleReplyHeaderBytes);
        const slot = this.slots[index];
        if (slot === undefined || !slot.busy || slot.generation !== generation) {
          this.fail(
            protocolError(this.where, `a reply for unknown cookie 0x${generation.toString(16)}:${index}`),
          );
          return;
        }
        if (errno !== 0) {
          if (errno === NbdErrno.ESHUTDOWN) this.serverShuttingDown = true;
          this.complete(index, errorFromNbd(errno, slot.type, slot.offset, slot.length));
          continue;
        }
        if (slot.type === Cmd.READ && slot.length > 0) {
          this.state = ReplyState.DATA;
          this.replyIndex = index;
          this.replyFilled = 0;
          continue;
        }
        this.complete(index, null);
        continue;
      }
      const slot = this.slots[this.replyIndex] as Slot;
      const wanted = slot.length - this.replyFilled;
      let got: number;
      if (slot.target !== null) {
        got = queue.drainInto(slot.target, this.replyFilled, wanted);
      } else {
        got = Math.min(wanted, queue.length);
        queue.skip(got);
      }
      this.replyFilled += got;
      if (this.replyFilled < slot.length) return;
      this.state = ReplyState.HEADER;
      const index = this.replyIndex;
      this.replyIndex = -1;
      this.complete(index, null);
    }
  }

  private complete(index: number, error: VdiskError | null): void {
    const slot = this.slots[index] as Slot;
    const done = slot.done as NbdCallback;
    const tag = slot.tag;
    slot.busy = false;
    slot.done = null;
    slot.target = null;
    this.free.push(index);
    this.inflightCount--;
    this.startWaiting();
    done(error, tag);
    this.checkIdle();
  }

  private startWaiting(): void {
    while (this.free.length > 0 && this.waitingHead < this.waiting.length) {
      const next = this.waiting[this.waitingHead++] as Waiting;
      const refused = this.check(next.type, next.offset, next.length, next.flags);
      if (refused !== null) process.nextTick(next.done, refused, next.tag);
      else this.send(next.type, next.offset, next.length, next.buffer, next.flags, next.done, next.tag);
    }
    if (this.waitingHead === this.waiting.length) {
      this.waiting.length = 0;
      this.waitingHead = 0;
    }
  }

  private checkIdle(): void {
    if (this.inflightCount !== 0 || this.queued !== 0) return;
    for (const resolve of this.idleWaiters.splice(0)) resolve();
    if (this.serverShuttingDown && !this.disconnecting && this.failed === null) this.sendDisconnect();
  }

  /** The client is done for: fail every pending request with `error` and drop the connection. */
  private fail(error: VdiskError): void {
    if (this.failed !== null) return;
    this.failed = error;
    this.socket.destroy();
    for (let index = 0; index < this.slots.length; index++) {
      const slot = this.slots[index] as Slot;
      if (!slot.busy) continue;
      const done = slot.done as NbdCallback;
      slot.busy = false;
      slot.done = null;
      this.inflightCount--;
      process.nextTick(done, error, slot.tag);
    }
    for (let index = this.waitingHead; index < this.waiting.length; index++) {
      const next = this.waiting[index] as Waiting;
      process.nextTick(next.done, error, next.tag);
    }
    this.waiting.length = 0;
    this.waitingHead = 0;
    for (const resolve of this.idleWaiters.splice(0)) resolve();
  }
}

// ---- Handshake -----------------------------------------------------------------------------------------

function openSocket(endpoint: NbdEndpoint, where: string, timeoutMs: number): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    const socket =
      endpoint.kind === "unix"
        ? net.createConnection({ path: endpoint.path })
        : net.createConnection({ host: endpoint.host, port: endpoint.port });
    const timer = setTimeout(() => {
      socket.destroy();
      reject(new VdiskError("IO_ERROR", `cannot connect to ${where}: no answer in ${timeoutMs} ms`));
    }, timeoutMs);
    socket.once("connect", () => {
      clearTimeout(timer);
      socket.removeAllListeners("error");
      if (endpoint.kind === "tcp") socket.setNoDelay(true);
      resolve(socket);
    });
    socket.once("error", (err: NodeJS.ErrnoException) => {
      clearTimeout(timer);
      const absent = err.code === "ENOENT" || err.code === "ECONNREFUSED";
      reject(
        new VdiskError("IO_ERROR", `cannot connect to ${where}: ${err.message}`, {
          cause: err,
          hint: absent
            ? "is the server running? (for vdisk: vdisk serve; vdisk status shows its addresses)"
            : undefined,
        }),
      );
    });
  });
}

/** Reads the handshake's byte stream: `need(n)` resolves once n bytes are buffered. */
class HandshakeReader {
  readonly queue = new ByteQueue();
  private waiter: { bytes: number; resolve: () => void; reject: (err: VdiskError) => void } | null = null;
  private error: VdiskError | null = null;
  private readonly onData = (chunk: Buffer): void => {
    this.queue.push(Buffer.from(chunk));
    this.wake();
  };
  private readonly onEnd = (): void =>
    this.abort(
      new VdiskError("IO_ERROR", `${this.where} closed the connection during the handshake`, {
        hint: "the server may not speak fixed newstyle NBD, or refused this client",
      }),
    );
  private readonly onError = (err: Error): void =>
    this.abort(new VdiskError("IO_ERROR", `${this.where}: ${err.message}`, { cause: err }));

  constructor(
    private readonly socket: net.Socket,
    private readonly where: string,
  ) {
    socket.on("data", this.onData);
    socket.on("close", this.onEnd);
    socket.on("error", this.onError);
  }

  need(bytes: number): Promise<void> {
    if (this.error !== null) return Promise.reject(this.error);
    if (this.queue.length >= bytes) return Promise.resolve();
    return new Promise((resolve, reject) => {
      this.waiter = { bytes, resolve, reject };
    });
  }

  abort(error: VdiskError): void {
    if (this.error !== null) return;
    this.error = error;
    this.socket.destroy();
    const waiter = this.waiter;
    this.waiter = null;
    waiter?.reject(error);
  }

  /** Stop listening (the client takes the socket over, with whatever is left in `queue`). */
  detach(): void {
    this.socket.off("data", this.onData);
    this.socket.off("close", this.onEnd);
    this.socket.off("error", this.onError);
  }

  private wake(): void {
    const waiter = this.waiter;
    if (waiter !== null && this.queue.length >= waiter.bytes) {
      this.waiter = null;
      waiter.resolve();
    }
  }
}

function abortMessage(): Buffer {
  const message = Buffer.alloc(16);
  message.writeUInt32BE(IHAVEOPT_HI, 0);
  message.writeUInt32BE(IHAVEOPT_LO, 4);
  message.writeUInt32BE(Opt.ABORT, 8);
  return message;
}

async function handshake(
  socket: net.Socket,
  reader: HandshakeReader,
  exportName: string,
  where: string,
  progress: { negotiating: boolean },
): Promise<{ size: number; flags: number; blockSizes: BlockSizes }> {
  const queue = reader.queue;
  await reader.need(GREETING_BYTES);
  const greeting = queue.take(GREETING_BYTES);
  if (greeting.readUInt32BE(0) !== NBDMAGIC_HI || greeting.readUInt32BE(4) !== NBDMAGIC_LO) {
    throw protocolError(where, "the greeting does not start with NBDMAGIC");
  }
  const second = [greeting.readUInt32BE(8), greeting.readUInt32BE(12)];
  if (second[0] === CLISERV_MAGIC_HI && second[1] === CLISERV_MAGIC_LO) {
    throw new VdiskError("NOT_SUPPORTED", `${where} uses the oldstyle handshake`, {
      hint: "this client needs fixed newstyle negotiation (any current nbd-server, qemu-nbd or nbdkit)",
    });
  }
  if (second[0] !== IHAVEOPT_HI || second[1] !== IHAVEOPT_LO) {
    throw protocolError(where, "the greeting's second magic is not IHAVEOPT");
  }
  const serverFlags = greeting.readUInt16BE(16);
  if ((serverFlags & HandshakeFlag.FIXED_NEWSTYLE) === 0) {
    throw new VdiskError("NOT_SUPPORTED", `${where} does not offer fixed newstyle negotiation`, {
      hint: "this client needs NBD_OPT_GO, which only fixed newstyle servers understand",
    });
  }
  let clientFlags = ClientFlag.FIXED_NEWSTYLE;
  if ((serverFlags & HandshakeFlag.NO_ZEROES) !== 0) clientFlags |= ClientFlag.NO_ZEROES;

  // Client flags and NBD_OPT_GO in one write: name, then one information request (block sizes).
  const name = Buffer.from(exportName, "utf8");
  assert(name.length <= nameBytesMax, "export name within the protocol's limit");
  const message = Buffer.alloc(4 + 16 + 4 + name.length + 2 + 2);
  message.writeUInt32BE(clientFlags, 0);
  message.writeUInt32BE(IHAVEOPT_HI, 4);
  message.writeUInt32BE(IHAVEOPT_LO, 8);
  message.writeUInt32BE(Opt.GO, 12);
  message.writeUInt32BE(4 + name.length + 2 + 2, 16);
  message.writeUInt32BE(name.length, 20);
  name.copy(message, 24);
  message.writeUInt16BE(1, 24 + name.length);
  message.writeUInt16BE(Info.BLOCK_SIZE, 26 + name.length);
  socket.write(message);
  progress.negotiating = true;

  let size = -1;
  let flags = 0;
  const blockSizes: BlockSizes = { minimum: 1, preferred: 4096, maximum: requestBytesMaxDefault };
  for (;;) {
    await reader.need(OPTION_REPLY_HEADER_BYTES);
    const header = queue.take(OPTION_REPLY_HEADER_BYTES);
    if (
      header.readUInt32BE(0) !== OPTION_REPLY_MAGIC_HI ||
      header.readUInt32BE(4) !== OPTION_REPLY_MAGIC_LO
    ) {
      throw protocolError(where, "bad option reply magic");
    }
    const option = header.readUInt32BE(8);
    const type = header.readUInt32BE(12);
    const length = header.readUInt32BE(16);
    if (option !== Opt.GO) throw protocolError(where, `a reply to option ${option}, not to NBD_OPT_GO`);
    if (length > optionBytesMax) throw protocolError(where, `an option reply of ${length} bytes`);
    await reader.need(length);
    const data = Buffer.from(queue.take(length));
    if (type >= 2 ** 31) throw optionError(type, data.toString("utf8"), exportName, where);
    if (type === Rep.ACK) break;
    if (type !== Rep.INFO) throw protocolError(where, `reply type ${type} to NBD_OPT_GO`);
    if (length < 2) throw protocolError(where, "an NBD_REP_INFO without its type");
    const info = data.readUInt16BE(0);
    if (info === Info.EXPORT) {
      if (length !== 12) throw protocolError(where, `NBD_INFO_EXPORT of ${length} bytes, not 12`);
      const high = data.readUInt32BE(2);
      const low = data.readUInt32BE(6);
      size = high * 0x1_0000_0000 + low;
      if (!Number.isSafeInteger(size)) {
        throw new VdiskError("TOO_LARGE", `${where}: export "${exportName}" is larger than 2^53 bytes`);
      }
      flags = data.readUInt16BE(10);
      if ((flags & TransmissionFlag.HAS_FLAGS) === 0)
        throw protocolError(where, "transmission flags lack HAS_FLAGS");
    } else if (info === Info.BLOCK_SIZE) {
      if (length !== 14) throw protocolError(where, `NBD_INFO_BLOCK_SIZE of ${length} bytes, not 14`);
      const minimum = data.readUInt32BE(2);
      const preferred = data.readUInt32BE(6);
      const maximum = data.readUInt32BE(10);
      const powerOfTwo = (value: number): boolean => value >= 1 && (value & (value - 1)) === 0;
      if (!powerOfTwo(minimum) || minimum > 65536 || !powerOfTwo(preferred) || maximum < minimum) {
        throw protocolError(where, `block sizes ${minimum}/${preferred}/${maximum} are not valid`);
      }
      blockSizes.minimum = minimum;
      blockSizes.preferred = preferred;
      // 0xffffffff means "no limit"; the spec's 32 MiB is the safe payload without an agreement.
      blockSizes.maximum = Math.min(maximum, 0xffff_ffff);
    }
    // NBD_INFO_NAME, NBD_INFO_DESCRIPTION and unknown information types are ignored.
  }
  if (size < 0) throw protocolError(where, "NBD_OPT_GO succeeded without NBD_INFO_EXPORT");
  return { size, flags, blockSizes };
}
