/**
 * A deliberately small NBD client for tests that need to see the wire: send hand-made (also malformed)
 * options and requests, and read back exact replies. Real-client interop is tested with qemu-io,
 * nbdsh and friends; this exists for what they refuse to send.
 *
 * Usage: connect → handshake (newstyle flags) → option(...) / go(...) → request(...) / readReply(...).
 * All reads are explicit and have a timeout so a test never hangs on a server that stays silent.
 */
import * as net from "node:net";
import {
  Cmd,
  IHAVEOPT_HI,
  IHAVEOPT_LO,
  Opt,
  REQUEST_MAGIC,
  Rep,
  SIMPLE_REPLY_MAGIC,
  STRUCTURED_REPLY_MAGIC,
} from "../protocol/nbd/constants";

export interface OptionReply {
  option: number;
  type: number;
  data: Buffer;
}

export interface Chunk {
  flags: number;
  type: number;
  cookie: number;
  data: Buffer;
}

export type Reply =
  | { kind: "simple"; error: number; cookie: number; data: Buffer }
  | { kind: "structured"; chunks: Chunk[]; cookie: number };

export class RawNbdClient {
  private buffered = Buffer.alloc(0);
  private waiter: (() => void) | null = null;
  private ended = false;

  private constructor(readonly socket: net.Socket) {
    socket.on("data", (chunk: Buffer) => {
      this.buffered = Buffer.concat([this.buffered, chunk]);
      this.waiter?.();
    });
    socket.on("close", () => {
      this.ended = true;
      this.waiter?.();
    });
    socket.on("error", () => {
      this.ended = true;
      this.waiter?.();
    });
  }

  static connect(path: string): Promise<RawNbdClient> {
    return new Promise((resolve, reject) => {
      const socket = net.createConnection({ path }, () => resolve(new RawNbdClient(socket)));
      socket.once("error", reject);
    });
  }

  get closed(): boolean {
    return this.ended;
  }

  /** Read exactly n bytes; rejects if the connection ends first or after timeoutMs. */
  async read(n: number, timeoutMs = 5000): Promise<Buffer> {
    const deadline = Date.now() + timeoutMs;
    while (this.buffered.length < n) {
      if (this.ended) throw new Error(`connection closed while waiting for ${n} bytes`);
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`timed out waiting for ${n} bytes`);
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, left);
        this.waiter = () => {
          clearTimeout(timer);
          resolve();
        };
      });
      this.waiter = null;
    }
    const out = this.buffered.subarray(0, n);
    this.buffered = this.buffered.subarray(n);
    return Buffer.from(out);
  }

  /** Resolves true once the server has closed the connection (within timeoutMs). */
  async waitClosed(timeoutMs = 5000): Promise<boolean> {
    const deadline = Date.now() + timeoutMs;
    while (!this.ended && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10));
    return this.ended;
  }

  write(bytes: Buffer): void {
    this.socket.write(bytes);
  }

  /** Read the server greeting and send client flags. */
  async handshake(clientFlags = 3): Promise<number> {
    const greeting = await this.read(18);
    const flags = greeting.readUInt16BE(16);
    const reply = Buffer.alloc(4);
    reply.writeUInt32BE(clientFlags, 0);
    this.write(reply);
    return flags;
  }

  sendOption(option: number, data: Buffer = Buffer.alloc(0), lengthOverride?: number): void {
    const header = Buffer.alloc(16);
    header.writeUInt32BE(IHAVEOPT_HI, 0);
    header.writeUInt32BE(IHAVEOPT_LO, 4);
    header.writeUInt32BE(option, 8);
    header.writeUInt32BE(lengthOverride ?? data.length, 12);
    this.write(Buffer.concat([header, data]));
  }

  async readOptionReply(): Promise<OptionReply> {
    const header = await this.read(20);
    const length = header.readUInt32BE(16);
    return { option: header.readUInt32BE(8), type: header.readUInt32BE(12), data: await this.read(length) };
  }

  /** Read option replies until ACK or an error reply; returns them all. */
  async readOptionReplies(): Promise<OptionReply[]> {
    const replies: OptionReply[] = [];
    for (;;) {
      const reply = await this.readOptionReply();
      replies.push(reply);
      if (reply.type === Rep.ACK || reply.type >= 2 ** 31) return replies;
    }
  }

  /** NBD_OPT_STRUCTURED_REPLY then NBD_OPT_GO on `name`; resolves with the export size and flags. */
  async go(
    name: string,
    structured = true,
    metaContexts: string[] = [],
  ): Promise<{ size: number; flags: number }> {
    if (structured) {
      this.sendOption(Opt.STRUCTURED_REPLY);
      const reply = await this.readOptionReply();
      if (reply.type !== Rep.ACK) throw new Error(`structured reply refused: ${reply.type}`);
    }
    if (metaContexts.length > 0) {
      this.sendOption(Opt.SET_META_CONTEXT, encodeMetaQuery(name, metaContexts));
      await this.readOptionReplies();
    }
    const nameBytes = Buffer.from(name, "utf8");
    const data = Buffer.alloc(4 + nameBytes.length + 2);
    data.writeUInt32BE(nameBytes.length, 0);
    nameBytes.copy(data, 4);
    this.sendOption(Opt.GO, data);
    let size = -1;
    let flags = -1;
    for (const reply of await this.readOptionReplies()) {
      if (reply.type >= 2 ** 31) throw new Error(`GO refused: ${reply.type} ${reply.data.toString()}`);
      if (reply.type === Rep.INFO && reply.data.readUInt16BE(0) === 0) {
        size = reply.data.readUInt32BE(2) * 2 ** 32 + reply.data.readUInt32BE(6);
        flags = reply.data.readUInt16BE(10);
      }
    }
    return { size, flags };
  }

  sendRequest(
    type: number,
    cookie: number,
    offset: number,
    length: number,
    flags = 0,
    payload?: Buffer,
  ): void {
    const header = Buffer.alloc(28);
    header.writeUInt32BE(REQUEST_MAGIC, 0);
    header.writeUInt16BE(flags, 4);
    header.writeUInt16BE(type, 6);
    header.writeUInt32BE(0, 8);
    header.writeUInt32BE(cookie, 12);
    header.writeUInt32BE(Math.floor(offset / 2 ** 32), 16);
    header.writeUInt32BE(offset >>> 0, 20);
    header.writeUInt32BE(length, 24);
    this.write(payload ? Buffer.concat([header, payload]) : header);
  }

  /** Read one whole reply. `readLength` is needed to read a simple reply's data for a successful READ. */
  async readReply(readLength = 0): Promise<Reply> {
    const magic = (await this.read(4)).readUInt32BE(0);
    if (magic === SIMPLE_REPLY_MAGIC) {
      const rest = await this.read(12);
      const error = rest.readUInt32BE(0);
      const cookie = rest.readUInt32BE(8);
      const data = error === 0 && readLength > 0 ? await this.read(readLength) : Buffer.alloc(0);
      return { kind: "simple", error, cookie, data };
    }
    if (magic !== STRUCTURED_REPLY_MAGIC) throw new Error(`bad reply magic 0x${magic.toString(16)}`);
    const chunks: Chunk[] = [];
    let first = true;
    for (;;) {
      if (!first) {
        const again = (await this.read(4)).readUInt32BE(0);
        if (again !== STRUCTURED_REPLY_MAGIC) throw new Error("expected another structured chunk");
      }
      first = false;
      const header = await this.read(16);
      const chunk: Chunk = {
        flags: header.readUInt16BE(0),
        type: header.readUInt16BE(2),
        cookie: header.readUInt32BE(8),
        data: await this.read(header.readUInt32BE(12)),
      };
      chunks.push(chunk);
      if (chunk.flags & 1) return { kind: "structured", chunks, cookie: chunk.cookie };
    }
  }

  async request(type: number, offset: number, length: number, flags = 0, payload?: Buffer): Promise<Reply> {
    this.sendRequest(type, 7, offset, length, flags, payload);
    return this.readReply(type === Cmd.READ ? length : 0);
  }

  close(): void {
    this.socket.destroy();
  }
}

export function encodeMetaQuery(name: string, queries: string[]): Buffer {
  const parts: Buffer[] = [];
  const nameBytes = Buffer.from(name, "utf8");
  const head = Buffer.alloc(4);
  head.writeUInt32BE(nameBytes.length, 0);
  parts.push(head, nameBytes);
  const count = Buffer.alloc(4);
  count.writeUInt32BE(queries.length, 0);
  parts.push(count);
  for (const query of queries) {
    const bytes = Buffer.from(query, "utf8");
    const length = Buffer.alloc(4);
    length.writeUInt32BE(bytes.length, 0);
    parts.push(length, bytes);
  }
  return Buffer.concat(parts);
}

/** The error code of a reply: simple error field, or the first structured error chunk's errno; 0 if none. */
export function replyError(reply: Reply): number {
  if (reply.kind === "simple") return reply.error;
  for (const chunk of reply.chunks) if (chunk.type >= 2 ** 15) return chunk.data.readUInt32BE(0);
  return 0;
}
