/**
 * ReplyWriter over the native SocketWriter, on a real Unix socket: every byte arrives, whole and in push
 * order, whether the event loop or the writer thread wrote it; a client that stops reading makes the
 * thread wait, not drop; pooled buffers come back exactly once, and only after they were written or the
 * thread has stopped; a client that hangs up is reported, not crashed on. (The NBD server uses it for every
 * connection by default, so the interop suites cover it end to end too.)
 */
import { test } from "node:test";
import * as assert from "node:assert/strict";
import * as fs from "node:fs";
import * as net from "node:net";
import * as os from "node:os";
import * as path from "node:path";

import { loadNative } from "../../src/native/native";
import { ReplyWriter } from "../../src/protocol/nbd/reply-writer";

interface Pair {
  server: net.Socket;
  client: net.Socket;
  close(): void;
}

/** A connected Unix socket pair; the client is paused (nothing is read until the test resumes it). */
async function socketPair(): Promise<Pair> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "vdisk-reply-writer-"));
  const socketPath = path.join(dir, "s.sock");
  const listener = net.createServer({ pauseOnConnect: true });
  await new Promise<void>((resolve) => listener.listen(socketPath, resolve));
  const accepted = new Promise<net.Socket>((resolve) => listener.once("connection", resolve));
  const client = net.connect(socketPath);
  client.pause();
  await new Promise<void>((resolve) => client.once("connect", () => resolve()));
  const server = await accepted;
  return {
    server,
    client,
    close() {
      client.destroy();
      server.destroy();
      listener.close();
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
}

/** Runs `body` on a fresh socket pair, closed afterwards whatever happens. */
async function withPair(body: (pair: Pair) => Promise<void>): Promise<void> {
  const pair = await socketPair();
  try {
    await body(pair);
  } finally {
    pair.close();
  }
}

interface Harness {
  writer: ReplyWriter;
  released: Buffer[];
  errors: string[];
  /** Resolves once `check` holds after a progress callback (or at once). */
  until(check: () => boolean, what: string): Promise<void>;
}

function harness(socket: net.Socket, threadBytes: number): Harness {
  const native = loadNative();
  const fd = (socket as unknown as { _handle: { fd: number } })._handle.fd;
  const released: Buffer[] = [];
  const errors: string[] = [];
  let wake: (() => void) | null = null;
  const made: { writer: ReplyWriter | null } = { writer: null };
  const progress = (): void => {
    const error = (made.writer as ReplyWriter).progress();
    if (error !== null) errors.push(error);
    wake?.();
  };
  const writer = new ReplyWriter(new native.SocketWriter(fd, progress), threadBytes, (buffer) =>
    released.push(buffer),
  );
  made.writer = writer;
  const until = async (check: () => boolean, what: string): Promise<void> => {
    const deadline = Date.now() + 10_000;
    while (!check()) {
      assert.ok(Date.now() < deadline, `timed out waiting for ${what}`);
      await new Promise<void>((resolve) => {
        wake = resolve;
        setTimeout(resolve, 20);
      });
      wake = null;
    }
  };
  return { writer, released, errors, until };
}

/** `length` bytes of a pattern unique to `seed`. */
function pattern(length: number, seed: number): Buffer {
  const buffer = Buffer.allocUnsafe(length);
  for (let i = 0; i < length; i++) buffer[i] = (i * 7 + seed * 31) & 0xff;
  return buffer;
}

/** Reads exactly `length` bytes from the (paused) client. */
async function readExactly(client: net.Socket, length: number): Promise<Buffer> {
  const chunks: Buffer[] = [];
  let got = 0;
  await new Promise<void>((resolve, reject) => {
    const onData = (chunk: Buffer): void => {
      chunks.push(chunk);
      got += chunk.length;
      if (got >= length) {
        client.off("data", onData);
        client.pause();
        resolve();
      }
    };
    client.on("data", onData);
    client.once("error", reject);
    client.resume();
  });
  const all = Buffer.concat(chunks);
  assert.equal(all.length, length, "no bytes beyond what was pushed");
  return all;
}

test("replies arrive whole and in push order, from the event loop and from the writer thread", async () => {
  await withPair(async (pair) => {
    const { writer, released, until } = harness(pair.server, 32 * 1024);
    const sizes = [16, 4096, 65_552, 16, 1 << 20, 300, 32 * 1024, 12, 200_000, 0, 7];
    const buffers = sizes.map((size, index) => pattern(size, index + 1));
    // Every other buffer is "pooled": it must come back once, after it was written.
    buffers.forEach((buffer, index) => writer.push(buffer, index % 2 === 0 ? buffer : null));
    const expected = Buffer.concat(buffers);
    const received = await readExactly(pair.client, expected.length);
    assert.ok(received.equals(expected), "the bytes on the socket are the pushed buffers, in order");
    await until(() => writer.idle, "the writer to count everything written");
    assert.equal(writer.queuedBytes, 0);
    const pooled = buffers.filter((_, index) => index % 2 === 0);
    assert.deepEqual(released, pooled, "each pooled buffer released once, in push order");
    writer.close();
  });
});

test("a client that stops reading: the thread waits for room, nothing is lost or released early", async () => {
  await withPair(async (pair) => {
    const { writer, released, until } = harness(pair.server, 32 * 1024);
    const buffers = Array.from({ length: 64 }, (_, index) => pattern(128 * 1024, index));
    for (const buffer of buffers) writer.push(buffer, buffer);
    const total = 64 * 128 * 1024;
    // 8 MiB cannot fit in a Unix socket's buffers: the rest waits in the writer.
    await new Promise((resolve) => setTimeout(resolve, 100));
    assert.ok(writer.queuedBytes > 0, "some replies wait for the client");
    assert.ok(released.length < buffers.length, "buffers still queued are not released");
    const received = await readExactly(pair.client, total);
    assert.ok(received.equals(Buffer.concat(buffers)));
    await until(() => released.length === buffers.length, "every buffer released");
    assert.deepEqual(released, buffers);
    assert.equal(writer.queuedBytes, 0);
    writer.close();
  });
});

test("close while the thread waits: buffers come back once it stopped, and the client sees the end", async () => {
  await withPair(async (pair) => {
    const { writer, released, until } = harness(pair.server, 0);
    const buffers = Array.from({ length: 32 }, (_, index) => pattern(256 * 1024, index));
    for (const buffer of buffers) writer.push(buffer, buffer);
    await new Promise((resolve) => setTimeout(resolve, 50));
    assert.ok(writer.queuedBytes > 0, "the thread is waiting for room");
    writer.close();
    // A reply pushed after close (the last piece of a reply whose earlier pieces were queued) is not
    // written, and its pooled buffer comes back with the rest, once the thread has stopped.
    const late = pattern(4096, 99);
    writer.push(late, late);
    pair.server.destroy(); // what the connection does next
    await until(() => released.length === buffers.length + 1, "the queued buffers to come back");
    assert.equal(new Set(released).size, buffers.length + 1, "each buffer released exactly once");
    assert.ok(released.includes(late));
    // The writer's own descriptor is closed too: the client reads to the end instead of hanging.
    const ended = new Promise<void>((resolve) => pair.client.once("end", resolve));
    pair.client.on("data", () => {});
    pair.client.resume();
    await ended;
  });
});

test("a client that hangs up: the write error is reported and later pushes are dropped", async () => {
  await withPair(async (pair) => {
    const { writer, errors, released, until } = harness(pair.server, 32 * 1024);
    pair.client.destroy();
    await new Promise((resolve) => setTimeout(resolve, 20));
    for (let i = 0; i < 8; i++) {
      const buffer = pattern(64 * 1024, i);
      writer.push(buffer, buffer);
    }
    await until(() => errors.length > 0, "the write error");
    assert.ok(["EPIPE", "ECONNRESET"].includes(errors[0] as string), `error ${errors[0]}`);
    writer.close();
    await until(() => released.length === 8, "the buffers to come back after close");
  });
});
