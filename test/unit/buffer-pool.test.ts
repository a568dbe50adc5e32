/**
 * BufferPool (read replies and write payloads): size classes, reuse after release, one budget for idle
 * buffers shared by the classes, no pooling of large payloads; the parser gathers a write payload
 * spanning chunks in a pooled buffer. (That a buffer is never reused while the socket still holds it is covered end to end by the
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

test("idle buffers share one budget: a class keeps what fits of it and drops the rest", () => {
  const pool = new BufferPool(replyPoolLimits);
  const size = 64 * 1024;
  const bytes = size + replyPrefixBytesMax;
  const fits = Math.floor(replyPoolLimits.idleBytesMax / bytes);
  const buffers = Array.from({ length: fits + 10 }, () => pool.acquire(size, size + 28));
  assert.equal(new Set(buffers).size, fits + 10, "distinct buffers while all are in use");
  for (const buffer of buffers) pool.release(buffer);
  const idle = pool.idle();
  assert.equal(idle[4], fits, "the 64 KiB class keeps what fits in the budget");
  assert.equal(
    idle.reduce((sum, n) => sum + n, 0),
    fits,
    "only that class holds buffers",
  );
  assert.equal(pool.idleBytesNow(), fits * bytes);
  assert.ok(pool.idleBytesNow() <= replyPoolLimits.idleBytesMax);
});

test("write payloads: classes up to 4 MiB without a prefix; a deep queue of 1 MiB writes reuses every buffer", () => {
  const pool = new BufferPool(writePoolLimits);
  const mib = 1024 * 1024;
  const three = Array.from({ length: 3 }, () => pool.acquire(3 * mib));
  for (const buffer of three) assert.equal(buffer.length, 4 * mib, "3 MiB rounds up to the 4 MiB class");
  // 16 writes of 1 MiB in flight at once (QD8 plus the ones still being received and replied to): all
  // come back, and the next 16 get the same buffers, with no new allocation to churn the GC.
  const first = Array.from({ length: 16 }, () => pool.acquire(mib));
  for (const buffer of first) assert.equal(buffer.length, mib);
  for (const buffer of first) pool.release(buffer);
  const second = Array.from({ length: 16 }, () => pool.acquire(1000 * 1000));
  assert.deepEqual(new Set(second), new Set(first), "every 1 MiB buffer reused");
  for (const buffer of second) pool.release(buffer);
  for (const buffer of three) pool.release(buffer);
  assert.equal(pool.idle()[8], 16, "the 1 MiB class keeps 16");
  assert.equal(pool.idle()[10], 3, "the 4 MiB class keeps 3 (16 + 12 MiB ≤ 32 MiB)");
});

test("a released buffer makes room by dropping idle buffers of other classes, largest first", () => {
  const pool = new BufferPool(writePoolLimits);
  const mib = 1024 * 1024;
  const budget = writePoolLimits.idleBytesMax;
  // Fill the budget with idle 4 MiB and 2 MiB buffers, as an earlier workload would leave it.
  const large = Array.from({ length: budget / (8 * mib) }, () => pool.acquire(4 * mib));
  const middle = Array.from({ length: budget / (4 * mib) }, () => pool.acquire(2 * mib));
  for (const buffer of [...large, ...middle]) pool.release(buffer);
  assert.equal(pool.idleBytesNow(), budget, "the budget is full");
  // Now 1 MiB writes: each release past the budget drops a 4 MiB buffer before any 2 MiB one.
  const small = Array.from({ length: 8 }, () => pool.acquire(mib));
  for (const buffer of small) pool.release(buffer);
  const idle = pool.idle();
  assert.equal(idle[8], 8, "all 1 MiB buffers kept");
  assert.equal(idle[10], large.length - 2, "two 4 MiB buffers dropped to make 8 MiB of room");
  assert.equal(idle[9], middle.length, "no 2 MiB buffer dropped");
  assert.equal(pool.idleBytesNow(), budget);
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
