/**
 * ReplyBufferPool: size classes, reuse after release, the bound on idle buffers, no pooling of large
 * payloads. (That a buffer is never reused while the socket still holds it is covered end to end by the
 * interop tests that verify every byte read at depth: fio verify, qemu-io -P, nbdcopy checksums.)
 */
import { test } from "node:test";
import * as assert from "node:assert/strict";

import {
  ReplyBufferPool,
  pooledBytesPerClassMax,
  pooledPayloadBytesMax,
  replyPrefixBytesMax,
} from "../../src/protocol/nbd/buffer-pool";

test("a released buffer is handed out again for a payload of its class", () => {
  const pool = new ReplyBufferPool();
  const first = pool.acquire(4096, 4096 + 28);
  assert.equal(first.length, 4096 + replyPrefixBytesMax);
  pool.release(first);
  assert.equal(pool.acquire(3000, 3000 + 16), first, "4 KiB class serves smaller payloads too");
  const big = pool.acquire(5000, 5000 + 28);
  assert.equal(big.length, 8192 + replyPrefixBytesMax, "5000 bytes round up to the 8 KiB class");
  assert.notEqual(big, first);
});

test("payloads above the pooled maximum are plain allocations and are not kept", () => {
  const pool = new ReplyBufferPool();
  const huge = pool.acquire(pooledPayloadBytesMax + 1, pooledPayloadBytesMax + 1 + 28);
  assert.equal(huge.length, pooledPayloadBytesMax + 1 + 28);
  pool.release(huge);
  assert.ok(pool.idle().every((count) => count === 0));
});

test("each class keeps a bounded number of idle buffers", () => {
  const pool = new ReplyBufferPool();
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
