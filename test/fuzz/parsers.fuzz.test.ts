/**
 * Fuzz tests of the two NBD wire parsers: random bytes and valid streams cut at random points.
 *
 * Properties:
 * - on any input, a parser either returns messages, asks for more bytes (null), or throws a
 *   VdiskError with code PROTOCOL — nothing else, and it never loops forever;
 * - a valid stream parses to the same messages however it is split into chunks;
 * - an oversized option or write payload is skipped in constant memory and reported, and parsing
 *   resumes correctly right after it.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import fc from "fast-check";
import { ByteQueue } from "../../src/protocol/nbd/byte-queue";
import {
  HandshakeParser,
  RequestParser,
  type HandshakeMessage,
  type NbdRequest,
} from "../../src/protocol/nbd/parsers";
import { Cmd, IHAVEOPT_HI, IHAVEOPT_LO, REQUEST_MAGIC } from "../../src/protocol/nbd/constants";
import { VdiskError } from "../../src/errors";

const OPTION_MAX = 256;
const PAYLOAD_MAX = 512;

function split(bytes: Buffer, cuts: number[]): Buffer[] {
  const points = [...new Set(cuts.map((c) => c % (bytes.length + 1)))].sort((a, b) => a - b);
  const chunks: Buffer[] = [];
  let last = 0;
  for (const p of points) {
    chunks.push(bytes.subarray(last, p));
    last = p;
  }
  chunks.push(bytes.subarray(last));
  return chunks;
}

/** Pull messages into `out` until the parser needs more bytes (errors propagate after partial output). */
function drain<T>(next: () => T | null, out: T[]): void {
  for (let i = 0; i < 100_000; i++) {
    const message = next();
    if (message === null) return;
    out.push(message);
  }
  throw new Error("parser did not stop producing messages");
}

function runHandshake(chunks: Buffer[]): { messages: HandshakeMessage[]; error: VdiskError | null } {
  const parser = new HandshakeParser(OPTION_MAX);
  const queue = new ByteQueue();
  const messages: HandshakeMessage[] = [];
  try {
    for (const chunk of chunks) {
      queue.push(chunk);
      drain(() => parser.next(queue), messages);
    }
  } catch (err) {
    if (err instanceof VdiskError && err.code === "PROTOCOL") return { messages, error: err };
    throw err;
  }
  return { messages, error: null };
}

function runRequests(chunks: Buffer[]): { requests: NbdRequest[]; error: VdiskError | null } {
  const parser = new RequestParser(PAYLOAD_MAX);
  const queue = new ByteQueue();
  const requests: NbdRequest[] = [];
  try {
    for (const chunk of chunks) {
      queue.push(chunk);
      drain(() => parser.next(queue), requests);
    }
  } catch (err) {
    if (err instanceof VdiskError && err.code === "PROTOCOL") return { requests, error: err };
    throw err;
  }
  return { requests, error: null };
}

const option = fc.record({
  option: fc.integer({ min: 0, max: 0xffffffff }),
  data: fc.uint8Array({ maxLength: OPTION_MAX + 64 }),
});

function encodeOptions(flags: number, options: Array<{ option: number; data: Uint8Array }>): Buffer {
  const parts: Buffer[] = [];
  const head = Buffer.alloc(4);
  head.writeUInt32BE(flags >>> 0, 0);
  parts.push(head);
  for (const o of options) {
    const header = Buffer.alloc(16);
    header.writeUInt32BE(IHAVEOPT_HI, 0);
    header.writeUInt32BE(IHAVEOPT_LO, 4);
    header.writeUInt32BE(o.option, 8);
    header.writeUInt32BE(o.data.length, 12);
    parts.push(header, Buffer.from(o.data));
  }
  return Buffer.concat(parts);
}

const request = fc.record({
  flags: fc.integer({ min: 0, max: 0xffff }),
  type: fc.constantFrom(Cmd.READ, Cmd.WRITE, Cmd.FLUSH, Cmd.TRIM, Cmd.WRITE_ZEROES, Cmd.BLOCK_STATUS, 99),
  cookie: fc.integer({ min: 0, max: 0xffffffff }),
  offset: fc.integer({ min: 0, max: Number.MAX_SAFE_INTEGER }),
  payload: fc.uint8Array({ maxLength: PAYLOAD_MAX + 100 }),
  length: fc.integer({ min: 0, max: 0xffffffff }),
});

function encodeRequests(
  requests: Array<{
    flags: number;
    type: number;
    cookie: number;
    offset: number;
    payload: Uint8Array;
    length: number;
  }>,
): Buffer {
  const parts: Buffer[] = [];
  for (const r of requests) {
    const header = Buffer.alloc(28);
    header.writeUInt32BE(REQUEST_MAGIC, 0);
    header.writeUInt16BE(r.flags, 4);
    header.writeUInt16BE(r.type, 6);
    header.writeUInt32BE(r.cookie, 8);
    header.writeUInt32BE(~r.cookie >>> 0, 12);
    header.writeUInt32BE(Math.floor(r.offset / 2 ** 32), 16);
    header.writeUInt32BE(r.offset >>> 0, 20);
    const length = r.type === Cmd.WRITE ? r.payload.length : r.length;
    header.writeUInt32BE(length, 24);
    parts.push(header);
    if (r.type === Cmd.WRITE) parts.push(Buffer.from(r.payload));
  }
  return Buffer.concat(parts);
}

test("handshake parser: random bytes only ever yield messages, null, or PROTOCOL errors", () => {
  fc.assert(
    fc.property(fc.uint8Array({ maxLength: 2048 }), fc.array(fc.nat(), { maxLength: 20 }), (bytes, cuts) => {
      runHandshake(split(Buffer.from(bytes), cuts));
    }),
    { numRuns: 2000 },
  );
});

test("handshake parser: a valid option stream parses the same however it is split", () => {
  fc.assert(
    fc.property(
      fc.integer({ min: 0, max: 3 }),
      fc.array(option, { maxLength: 8 }),
      fc.array(fc.nat(), { maxLength: 30 }),
      (flags, options, cuts) => {
        const bytes = encodeOptions(flags, options);
        const whole = runHandshake([bytes]);
        const pieces = runHandshake(split(bytes, cuts));
        assert.equal(whole.error, null);
        assert.deepEqual(pieces.messages, whole.messages);
        assert.equal(whole.messages.length, options.length + 1);
        options.forEach((o, i) => {
          const message = whole.messages[i + 1] as HandshakeMessage;
          if (o.data.length > OPTION_MAX) {
            assert.deepEqual(message, { kind: "tooBig", option: o.option, length: o.data.length });
          } else {
            assert.equal(message.kind, "option");
            if (message.kind === "option") assert.deepEqual([...message.data], [...o.data]);
          }
        });
      },
    ),
    { numRuns: 1000 },
  );
});

test("handshake parser: a bad option magic is a protocol error", () => {
  const bytes = encodeOptions(1, [{ option: 7, data: new Uint8Array(4) }]);
  bytes[5] ^= 0xff; // corrupt IHAVEOPT
  const result = runHandshake([bytes]);
  assert.equal(result.error?.code, "PROTOCOL");
});

test("request parser: random bytes only ever yield requests, null, or PROTOCOL errors", () => {
  fc.assert(
    fc.property(fc.uint8Array({ maxLength: 4096 }), fc.array(fc.nat(), { maxLength: 20 }), (bytes, cuts) => {
      runRequests(split(Buffer.from(bytes), cuts));
    }),
    { numRuns: 2000 },
  );
});

test("request parser: a valid request stream parses the same however it is split", () => {
  fc.assert(
    fc.property(
      fc.array(request, { maxLength: 10 }),
      fc.array(fc.nat(), { maxLength: 40 }),
      (requests, cuts) => {
        const bytes = encodeRequests(requests);
        const whole = runRequests([bytes]);
        const pieces = runRequests(split(bytes, cuts));
        assert.equal(whole.error, null);
        assert.equal(whole.requests.length, requests.length);
        // Where the payload lives (a view of a chunk, or a pooled buffer) depends on the split.
        const normalise = (r: NbdRequest) => ({
          ...r,
          payload: r.payload ? [...r.payload] : null,
          pooled: null,
        });
        assert.deepEqual(pieces.requests.map(normalise), whole.requests.map(normalise));
        requests.forEach((r, i) => {
          const parsed = whole.requests[i] as NbdRequest;
          assert.equal(parsed.type, r.type);
          assert.equal(parsed.cookieHi, r.cookie);
          assert.equal(parsed.cookieLo, ~r.cookie >>> 0);
          if (r.offset < 2 ** 53) assert.equal(parsed.offset, r.offset);
          if (r.type === Cmd.WRITE) {
            if (r.payload.length > PAYLOAD_MAX) {
              assert.equal(parsed.error, "TOO_LARGE");
              assert.equal(parsed.payload, null);
            } else if (r.payload.length > 0) {
              assert.deepEqual([...(parsed.payload as Buffer)], [...r.payload]);
            }
          }
        });
      },
    ),
    { numRuns: 1000 },
  );
});

test("request parser: a bad magic after valid requests stops with a protocol error", () => {
  const good = encodeRequests([
    { flags: 0, type: Cmd.READ, cookie: 1, offset: 0, payload: new Uint8Array(), length: 512 },
  ]);
  const bad = Buffer.from(good);
  bad.writeUInt32BE(0xdeadbeef, 0);
  const result = runRequests([Buffer.concat([good, bad])]);
  assert.equal(result.requests.length, 1);
  assert.equal(result.error?.code, "PROTOCOL");
});

test("byte queue: take/skip/ensure agree with a flat buffer model", () => {
  fc.assert(
    fc.property(
      fc.array(fc.uint8Array({ minLength: 0, maxLength: 64 }), { maxLength: 20 }),
      fc.array(fc.tuple(fc.constantFrom("take", "skip", "ensure"), fc.nat({ max: 100 })), { maxLength: 40 }),
      (chunks, operations) => {
        const queue = new ByteQueue();
        let model = Buffer.alloc(0);
        for (const chunk of chunks) {
          queue.push(Buffer.from(chunk));
          model = Buffer.concat([model, Buffer.from(chunk)]);
        }
        for (const [kind, n] of operations) {
          assert.equal(queue.length, model.length);
          if (kind === "ensure") {
            const ok = queue.ensure(n);
            assert.equal(ok, n <= model.length);
            if (ok)
              assert.deepEqual(
                queue.head.subarray(queue.headOffset, queue.headOffset + n),
                model.subarray(0, n),
              );
          } else if (n <= model.length) {
            if (kind === "take") assert.deepEqual(queue.take(n), model.subarray(0, n));
            else queue.skip(n);
            model = model.subarray(n);
          }
        }
      },
    ),
    { numRuns: 1000 },
  );
});
