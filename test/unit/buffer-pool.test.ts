/**
 * BufferPool (read replies and write payloads): size classes, reuse after release, the bound on idle
 * buffers, no pooling of large payloads; the parser gathers a write payload spanning chunks in a pooled
 * buffer. (That a buffer is never reused while the socket still holds it is covered end to end by the
 * interop tests that verify every byte read at depth: fio verify, qemu-io -P, nbdcopy checksums.)
 */
import { test } from "node:test";
import * as assert from "node:assert/strict";

import {
  BufferPool,
  replyPoolLimits,
  replyPrefixBytesMax,
  writePayloadPool,
  writePoolLimits,
} from "../../src/protocol/nbd/buffer-pool";
import { ByteQueue } from "../../src/protocol/nbd/byte-queue";
import { RequestParser } from "../../src/protocol/nbd/parsers";
import { Cmd, REQUEST_MAGIC } from "../../src/protocol/nbd/constants";

const pooledBytesPerClassMax = replyPoolLimits.idleBytesPerClass;
const pooledPayloadBytesMax = replyPoolLimits.payloadBytesMax;

test("a released buffer is handed out again for a payload of its class", () => {
  const pool = new BufferPool(replyPoolLimits);
  const first = pool.acquire(4096, 4096 + 28);
  assert.equal(first.length, 4096 + replyPrefixBytesMax);
  pool.release(first);
  assert.equal(pool.acquire(3000, 3000 + 16), first, "4 KiB class serves smaller payloads too");
  const big = pool.acquire(5000, 5000 + 28);
  assert.equal(big.length, 8192 + replyPrefixBytesMax, "5000 bytes round up to the 8 KiB class");
  assert.notEqual(big, first);
});

test("payloads above the pooled maximum are plain allocations and are not kept", () => {
  const pool = new BufferPool(replyPoolLimits);
  const huge = pool.acquire(pooledPayloadBytesMax + 1, pooledPayloadBytesMax + 1 + 28);
  assert.equal(huge.length, pooledPayloadBytesMax + 1 + 28);
  pool.release(huge);
  assert.ok(pool.idle().every((count) => count === 0));
});

test("each class keeps a bounded number of idle buffers", () => {
  const pool = new BufferPool(replyPoolLimits);
  const size = 64 * 1024;
  const count = Math.floor(pooledBytesPerClassMax / size) + 10;
  const buffers = Array.from({ length: count }, () => pool.acquire(size, size + 28));
  assert.equal(new Set(buffers).size, count, "distinct buffers while all are in use");
  for (const buffer of buffers) pool.release(buffer);
  const idle = pool.idle();
  assert.equal(idle[4], Math.floor(pooledBytesPerClassMax / size), "64 KiB class capped");
  assert.equal(
    idle.reduce((sum, n) => sum + n, 0),
    idle[4],
    "only that class holds buffers",
  );
});

test("write payloads: classes up to 4 MiB without a prefix, at least two idle buffers per class", () => {
  const pool = new BufferPool(writePoolLimits);
  const mib = pool.acquire(1024 * 1024);
  assert.equal(mib.length, 1024 * 1024);
  const four = Array.from({ length: 3 }, () => pool.acquire(3 * 1024 * 1024));
  for (const buffer of four) assert.equal(buffer.length, 4 * 1024 * 1024);
  for (const buffer of four) pool.release(buffer);
  pool.release(mib);
  const idle = pool.idle();
  assert.equal(idle[idle.length - 1], 2, "the 4 MiB class keeps two (its 4 MiB budget rounds up to two)");
  assert.equal(idle[8], 1, "the 1 MiB class keeps the one released");
  assert.equal(pool.acquire(1000 * 1000), mib, "reused for a smaller payload of the same class");
});

test("the request parser gathers a write payload that spans chunks in a pooled buffer", () => {
  const length = 256 * 1024;
  const header = Buffer.alloc(28);
  header.writeUInt32BE(REQUEST_MAGIC, 0);
  header.writeUInt16BE(Cmd.WRITE, 6);
  header.writeUInt32BE(7, 12);
  header.writeUInt32BE(length, 24);
  const payload = Buffer.alloc(length);
  for (let i = 0; i < length; i++) payload[i] = (i * 31) & 0xff;
  const queue = new ByteQueue();
  const parser = new RequestParser(32 * 1024 * 1024);
  queue.push(header);
  // Chunks of 64 KiB, as a socket delivers them.
  let request = null;
  for (let offset = 0; offset < length; offset += 64 * 1024) {
    assert.equal(request, null, "no request before its payload is complete");
    queue.push(payload.subarray(offset, offset + 64 * 1024));
    request = parser.next(queue);
  }
  assert.ok(request !== null && request.payload !== null && request.pooled !== null);
  assert.ok(request.payload.equals(payload), "payload gathered intact");
  assert.equal(request.pooled.length, length, "a 256 KiB class buffer");
  assert.equal(request.payload.buffer, request.pooled.buffer, "the payload is a view of the pooled buffer");
  writePayloadPool.release(request.pooled);
  assert.equal(writePayloadPool.acquire(length), request.pooled, "released, then handed out again");
});
