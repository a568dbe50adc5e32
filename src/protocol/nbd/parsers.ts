/**
 * The two NBD wire parsers as explicit state machines over a ByteQueue, with byte budgets.
 *
 * They never touch a socket: the connection pushes received chunks into the queue and pulls parsed
 * messages out, so the fuzz tests drive them with arbitrary bytes split at arbitrary points.
 *
 * HandshakeParser (fixed newstyle, after the server's greeting):
 *   CLIENT_FLAGS (4 bytes) → OPTION_HEADER (16) → OPTION_DATA (len ≤ optionBytesMax) | OPTION_SKIP (len)
 *   An option larger than the budget is skipped in constant memory and reported as `tooBig`, so the
 *   connection can answer NBD_REP_ERR_TOO_BIG and go on. A wrong IHAVEOPT magic is a protocol violation.
 *
 * RequestParser (transmission):
 *   HEADER (28) → PAYLOAD (WRITE: length bytes) | DISCARD (WRITE over the payload budget)
 *   A WRITE over the budget has its payload read and dropped without buffering, then is reported with
 *   `error: "TOO_LARGE"` so the connection replies with an error and carries on. A wrong request magic
 *   cannot be resynchronised: it is a protocol violation and the connection is closed.
 *
 * Both throw VdiskError("PROTOCOL") on violations and return null when they need more bytes.
 */
import { VdiskError, assert } from "../../errors";
import { ByteQueue } from "./byte-queue";
import { writePayloadPool } from "./buffer-pool";
import {
  Cmd,
  IHAVEOPT_HI,
  IHAVEOPT_LO,
  OptionHeaderBytes,
  REQUEST_MAGIC,
  RequestHeaderBytes,
} from "./constants";

export type HandshakeMessage =
  | { kind: "clientFlags"; flags: number }
  | { kind: "option"; option: number; data: Buffer }
  | { kind: "tooBig"; option: number; length: number };

const enum HsState {
  CLIENT_FLAGS,
  OPTION_HEADER,
  OPTION_DATA,
  OPTION_SKIP,
}

export class HandshakeParser {
  private state = HsState.CLIENT_FLAGS;
  private option = 0;
  private remaining = 0;
  private optionLength = 0;

  constructor(private readonly optionBytesMax: number) {}

  /** Next complete message, or null if more bytes are needed. */
  next(q: ByteQueue): HandshakeMessage | null {
    for (;;) {
      switch (this.state) {
        case HsState.CLIENT_FLAGS: {
          if (!q.ensure(4)) return null;
          const flags = q.head.readUInt32BE(q.headOffset);
          q.skip(4);
          this.state = HsState.OPTION_HEADER;
          return { kind: "clientFlags", flags };
        }
        case HsState.OPTION_HEADER: {
          if (!q.ensure(OptionHeaderBytes)) return null;
          const b = q.head;
          const o = q.headOffset;
          if (b.readUInt32BE(o) !== IHAVEOPT_HI || b.readUInt32BE(o + 4) !== IHAVEOPT_LO) {
            throw new VdiskError("PROTOCOL", "bad option magic (expected IHAVEOPT)");
          }
          this.option = b.readUInt32BE(o + 8);
          this.optionLength = b.readUInt32BE(o + 12);
          this.remaining = this.optionLength;
          q.skip(OptionHeaderBytes);
          this.state = this.optionLength > this.optionBytesMax ? HsState.OPTION_SKIP : HsState.OPTION_DATA;
          continue;
        }
        case HsState.OPTION_DATA: {
          if (q.length < this.remaining) return null;
          const data = Buffer.from(q.take(this.remaining)); // own copy: options are rare and small
          this.state = HsState.OPTION_HEADER;
          return { kind: "option", option: this.option, data };
        }
        case HsState.OPTION_SKIP: {
          const n = Math.min(this.remaining, q.length);
          q.skip(n);
          this.remaining -= n;
          if (this.remaining > 0) return null;
          this.state = HsState.OPTION_HEADER;
          return { kind: "tooBig", option: this.option, length: this.optionLength };
        }
      }
    }
  }
}

export interface NbdRequest {
  flags: number;
  type: number;
  /** The 64-bit cookie, kept as two halves to avoid BigInt on the hot path. */
  cookieHi: number;
  cookieLo: number;
  /** Offset as a JS number; values ≥ 2^53 lose precision but are always out of range. */
  offset: number;
  length: number;
  /** WRITE payload: a view of `pooled` (or, for an empty write, nothing). */
  payload: Buffer | null;
  /** The pooled buffer `payload` is a view of (writePayloadPool), to release once the write is done. */
  pooled: Buffer | null;
  /** Set when the request was consumed but must be refused (its payload already discarded). */
  error: "TOO_LARGE" | null;
  /** The connection's monitor clock when the request was dispatched (0 when nothing monitors it). */
  startMs: number;
}

const enum RqState {
  HEADER,
  PAYLOAD,
  DISCARD,
}

export class RequestParser {
  private state = RqState.HEADER;
  private pending: NbdRequest | null = null;
  private remaining = 0;
  private payloadBuffer: Buffer | null = null;
  private payloadFilled = 0;

  constructor(private readonly payloadBytesMax: number) {}

  /** Next complete request, or null if more bytes are needed. */
  next(q: ByteQueue): NbdRequest | null {
    for (;;) {
      switch (this.state) {
        case RqState.HEADER: {
          if (!q.ensure(RequestHeaderBytes)) return null;
          const b = q.head;
          const o = q.headOffset;
          if (b.readUInt32BE(o) !== REQUEST_MAGIC) {
            throw new VdiskError("PROTOCOL", `bad request magic 0x${b.readUInt32BE(o).toString(16)}`);
          }
          const request: NbdRequest = {
            flags: b.readUInt16BE(o + 4),
            type: b.readUInt16BE(o + 6),
            cookieHi: b.readUInt32BE(o + 8),
            cookieLo: b.readUInt32BE(o + 12),
            offset: b.readUInt32BE(o + 16) * 0x1_0000_0000 + b.readUInt32BE(o + 20),
            length: b.readUInt32BE(o + 24),
            payload: null,
            pooled: null,
            error: null,
            startMs: 0,
          };
          q.skip(RequestHeaderBytes);
          if (request.type !== Cmd.WRITE || request.length === 0) return request;
          if (request.length > this.payloadBytesMax) {
            request.error = "TOO_LARGE";
            this.pending = request;
            this.remaining = request.length;
            this.state = RqState.DISCARD;
            continue;
          }
          // Always gathered into a buffer of its own: the chunks may be the connection's receive
          // buffer, which the next socket read overwrites while the device is still writing.
          this.pending = request;
          request.pooled = writePayloadPool.acquire(request.length);
          this.payloadBuffer = request.pooled.subarray(0, request.length);
          this.payloadFilled = 0;
          this.state = RqState.PAYLOAD;
          continue;
        }
        case RqState.PAYLOAD: {
          const buffer = this.payloadBuffer as Buffer;
          this.payloadFilled += q.drainInto(buffer, this.payloadFilled, buffer.length - this.payloadFilled);
          if (this.payloadFilled < buffer.length) return null;
          const request = this.pending as NbdRequest;
          request.payload = buffer;
          this.pending = null;
          this.payloadBuffer = null;
          this.state = RqState.HEADER;
          return request;
        }
        case RqState.DISCARD: {
          const n = Math.min(this.remaining, q.length);
          q.skip(n);
          this.remaining -= n;
          if (this.remaining > 0) return null;
          const request = this.pending as NbdRequest;
          this.pending = null;
          this.state = RqState.HEADER;
          return request;
        }
      }
    }
  }

  /**
   * The rest of the payload being gathered, when at least `min` bytes of it are still to come and
   * nothing is buffered ahead of them: the socket may receive straight into it (see `payloadReceived`).
   */
  payloadTarget(q: ByteQueue, min: number): Buffer | null {
    if (this.state !== RqState.PAYLOAD || q.length > 0) return null;
    const buffer = this.payloadBuffer as Buffer;
    if (buffer.length - this.payloadFilled < min) return null;
    return buffer.subarray(this.payloadFilled);
  }

  /** `n` bytes were received straight into the buffer `payloadTarget` returned. */
  payloadReceived(n: number): void {
    assert(this.state === RqState.PAYLOAD, "direct payload bytes while gathering a payload");
    const buffer = this.payloadBuffer as Buffer;
    assert(n > 0 && this.payloadFilled + n <= buffer.length, "direct payload bytes within the payload");
    this.payloadFilled += n;
  }

  /** True while a request's payload is partly received (a disconnect now loses a write mid-payload). */
  get midRequest(): boolean {
    return this.state !== RqState.HEADER;
  }
}
