/**
 * The NBD client (src/protocol/nbd/client.ts) without a real server: URI parsing, the NBD error → code
 * table, and a scripted fake server on a Unix socket that completes the handshake and then misbehaves —
 * a bad reply magic, a structured reply that was never negotiated, a reply to an unknown cookie, replies
 * out of order, a READ's data split into one-byte pieces, an option error with a message, an oldstyle
 * greeting, a hang-up with requests in flight. Every violation must fail all pending requests with
 * PROTOCOL (or IO_ERROR for a hang-up) and leave the client unusable; well-formed replies in any order
 * must complete the right requests.
 */
import { after, test } from "node:test";
import * as assert from "node:assert/strict";
import * as fs from "node:fs";
import * as net from "node:net";
import * as os from "node:os";
import * as path from "node:path";
import { VdiskError } from "../../src/errors";
import { expectCode } from "../../src/testing/expect-code";
import {
  IHAVEOPT_HI,
  IHAVEOPT_LO,
  Info,
  NBDMAGIC_HI,
  NBDMAGIC_LO,
  OPTION_REPLY_MAGIC_HI,
  OPTION_REPLY_MAGIC_LO,
  Opt,
  Rep,
  SIMPLE_REPLY_MAGIC,
  STRUCTURED_REPLY_MAGIC,
  TransmissionFlag,
} from "../../src/protocol/nbd/constants";
import { NbdClient, codeOfNbdErrno, formatNbdUri, parseNbdUri } from "../../src/protocol/nbd/client";

const work = fs.mkdtempSync(path.join(os.tmpdir(), "vdisk-nbd-client-"));
let socketCounter = 0;

after(() => fs.rmSync(work, { recursive: true, force: true }));

test("NBD URIs: TCP, Unix socket, defaults, percent-encoding, IPv6", () => {
  assert.deepEqual(parseNbdUri("nbd://127.0.0.1:10900/web"), {
    endpoint: { kind: "tcp", host: "127.0.0.1", port: 10900 },
    exportName: "web",
  });
  assert.deepEqual(parseNbdUri("nbd://example.org"), {
    endpoint: { kind: "tcp", host: "example.org", port: 10809 },
    exportName: "",
  });
  assert.deepEqual(parseNbdUri("nbd://[::1]:99/a%20b/c"), {
    endpoint: { kind: "tcp", host: "::1", port: 99 },
    exportName: "a b/c",
  });
  assert.deepEqual(parseNbdUri("nbd+unix:///web@snap?socket=/tmp/x%2By/nbd.sock"), {
    endpoint: { kind: "unix", path: "/tmp/x+y/nbd.sock" },
    exportName: "web@snap",
  });
  assert.deepEqual(parseNbdUri("nbd+unix:///?socket=/s"), {
    endpoint: { kind: "unix", path: "/s" },
    exportName: "",
  });
  for (const uri of ["nbd://h:1/x", "nbd+unix:///web?socket=/run/nbd.sock", "nbd://[::1]:5/d@s"]) {
    assert.equal(formatNbdUri(parseNbdUri(uri)), uri);
  }
  const bad: Array<[string, RegExp]> = [
    ["web", /not a URI/],
    ["http://h/x", /unknown scheme "http"/],
    ["nbds://h/x", /TLS/],
    ["nbd+unix:///x", /socket=PATH parameter is missing/],
    ["nbd+unix://host/x?socket=/s", /has no host/],
    ["nbd://h:0/x", /port/],
    ["nbd://h:70000/x", /port/],
    ["nbd:///x", /host is missing/],
    ["nbd://h/%zz", /percent-encoding/],
  ];
  for (const [uri, message] of bad) {
    assert.throws(
      () => parseNbdUri(uri),
      (err: unknown) =>
        err instanceof VdiskError && err.code === "INVALID_ARGUMENT" && message.test(err.message),
      uri,
    );
  }
});

test("NBD error values map to the codes that produce them", () => {
  assert.equal(codeOfNbdErrno(1), "READ_ONLY");
  assert.equal(codeOfNbdErrno(5), "IO_ERROR");
  assert.equal(codeOfNbdErrno(12), "NO_MEMORY");
  assert.equal(codeOfNbdErrno(22), "INVALID_ARGUMENT");
  assert.equal(codeOfNbdErrno(28), "NO_SPACE");
  assert.equal(codeOfNbdErrno(75), "OVERFLOW");
  assert.equal(codeOfNbdErrno(95), "NOT_SUPPORTED");
  assert.equal(codeOfNbdErrno(108), "SHUTTING_DOWN");
  assert.equal(codeOfNbdErrno(4242), "IO_ERROR");
});

// ---- A scripted server ---------------------------------------------------------------------------------

interface FakeRequest {
  type: number;
  cookie: Buffer;
  offset: number;
  length: number;
  payload: Buffer;
}

interface FakeOptions {
  greeting?: Buffer;
  /** Answer to NBD_OPT_GO: default INFO(export) + ACK. */
  go?: (socket: net.Socket) => void;
  size?: number;
  flags?: number;
  /** Called per request, with every request received so far. */
  onRequest?: (socket: net.Socket, request: FakeRequest, all: FakeRequest[]) => void;
}

function u32(value: number): Buffer {
  const buffer = Buffer.alloc(4);
  buffer.writeUInt32BE(value >>> 0, 0);
  return buffer;
}

function optionReply(option: number, type: number, data = Buffer.alloc(0)): Buffer {
  return Buffer.concat([
    u32(OPTION_REPLY_MAGIC_HI),
    u32(OPTION_REPLY_MAGIC_LO),
    u32(option),
    u32(type),
    u32(data.length),
    data,
  ]);
}

function exportInfo(size: number, flags: number): Buffer {
  const data = Buffer.alloc(12);
  data.writeUInt16BE(Info.EXPORT, 0);
  data.writeUInt32BE(Math.floor(size / 2 ** 32), 2);
  data.writeUInt32BE(size >>> 0, 6);
  data.writeUInt16BE(flags, 10);
  return optionReply(Opt.GO, Rep.INFO, data);
}

function simpleReply(cookie: Buffer, error = 0, data = Buffer.alloc(0)): Buffer {
  return Buffer.concat([u32(SIMPLE_REPLY_MAGIC), u32(error), cookie, data]);
}

async function fakeServer(options: FakeOptions): Promise<{ uri: string; close: () => void }> {
  const socketPath = path.join(work, `fake-${++socketCounter}.sock`);
  const sockets: net.Socket[] = [];
  const server = net.createServer((socket) => {
    sockets.push(socket);
    socket.on("error", () => undefined);
    const greeting =
      options.greeting ??
      Buffer.concat([
        u32(NBDMAGIC_HI),
        u32(NBDMAGIC_LO),
        u32(IHAVEOPT_HI),
        u32(IHAVEOPT_LO),
        Buffer.from([0, 3]),
      ]);
    socket.write(greeting);
    let buffered = Buffer.alloc(0);
    let phase: "flags" | "options" | "transmission" = "flags";
    const requests: FakeRequest[] = [];
    socket.on("data", (chunk: Buffer) => {
      buffered = Buffer.concat([buffered, chunk]);
      for (;;) {
        if (phase === "flags") {
          if (buffered.length < 4) return;
          buffered = buffered.subarray(4);
          phase = "options";
        } else if (phase === "options") {
          if (buffered.length < 16) return;
          const length = buffered.readUInt32BE(12);
          if (buffered.length < 16 + length) return;
          const option = buffered.readUInt32BE(8);
          buffered = buffered.subarray(16 + length);
          if (option === Opt.ABORT) {
            socket.end(optionReply(Opt.ABORT, Rep.ACK));
            return;
          }
          assert.equal(option, Opt.GO);
          if (options.go) options.go(socket);
          else {
            const flags = options.flags ?? TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_FLUSH;
            socket.write(
              Buffer.concat([exportInfo(options.size ?? 1024 * 1024, flags), optionReply(Opt.GO, Rep.ACK)]),
            );
            phase = "transmission";
          }
        } else {
          if (buffered.length < 28) return;
          const type = buffered.readUInt16BE(6);
          const length = buffered.readUInt32BE(24);
          const payloadLength = type === 1 ? length : 0;
          if (buffered.length < 28 + payloadLength) return;
          const request: FakeRequest = {
            type,
            cookie: Buffer.from(buffered.subarray(8, 16)),
            offset: buffered.readUInt32BE(16) * 2 ** 32 + buffered.readUInt32BE(20),
            length,
            payload: Buffer.from(buffered.subarray(28, 28 + payloadLength)),
          };
          buffered = buffered.subarray(28 + payloadLength);
          if (type === 2) {
            socket.end();
            return;
          }
          requests.push(request);
          options.onRequest?.(socket, request, requests);
        }
      }
    });
  });
  await new Promise<void>((resolve) => server.listen(socketPath, resolve));
  return {
    uri: `nbd+unix:///fake?socket=${socketPath}`,
    close: () => {
      for (const socket of sockets) socket.destroy();
      server.close();
    },
  };
}

test("replies in any order complete the right requests; READ data may arrive byte by byte", async () => {
  const server = await fakeServer({
    onRequest: (socket, _request, all) => {
      if (all.length < 3) return;
      // Answer the three requests in reverse order; the READ's data one byte per write.
      const [read, write, flush] = all as [FakeRequest, FakeRequest, FakeRequest];
      socket.write(simpleReply(flush.cookie));
      socket.write(simpleReply(write.cookie));
      const data = Buffer.alloc(read.length, 0xab);
      const reply = simpleReply(read.cookie, 0, data);
      for (let index = 0; index < reply.length; index++) socket.write(reply.subarray(index, index + 1));
    },
  });
  const client = await NbdClient.connect(parseNbdUri(server.uri));
  try {
    assert.equal(client.size, 1024 * 1024);
    assert.equal(client.canFlush, true);
    assert.equal(client.readOnly, false);
    const order: string[] = [];
    const read = client.readAsync(4096, 100).then((data) => {
      order.push("read");
      return data;
    });
    const write = client.writeAsync(0, Buffer.alloc(512, 1)).then(() => order.push("write"));
    const flush = client.flushAsync().then(() => order.push("flush"));
    const [data] = await Promise.all([read, write, flush]);
    assert.deepEqual(order, ["flush", "write", "read"]);
    assert.ok(data.equals(Buffer.alloc(100, 0xab)));
  } finally {
    client.destroy();
    server.close();
  }
});

test("server errors fail only their request; ESHUTDOWN makes the client disconnect", async () => {
  const server = await fakeServer({
    onRequest: (socket, request) => {
      if (request.offset === 0) socket.write(simpleReply(request.cookie, 28));
      else if (request.offset === 512)
        socket.write(simpleReply(request.cookie, 0, Buffer.alloc(request.length)));
      else socket.write(simpleReply(request.cookie, 108));
    },
  });
  const client = await NbdClient.connect(parseNbdUri(server.uri));
  try {
    await expectCode(
      client.writeAsync(0, Buffer.alloc(512)),
      "NO_SPACE",
      /WRITE of 512 bytes at offset 0: ENOSPC \(28\)/,
    );
    assert.equal((await client.readAsync(512, 512)).length, 512);
    await expectCode(client.readAsync(1024, 512), "SHUTTING_DOWN", /ESHUTDOWN/);
    await expectCode(client.readAsync(512, 512), "SHUTTING_DOWN", /being closed/);
    await client.close(); // the client already sent NBD_CMD_DISC; the server hung up
    assert.ok(client.failure !== null);
  } finally {
    client.destroy();
    server.close();
  }
});

const violations: Array<{ name: string; reply: (request: FakeRequest) => Buffer; message: RegExp }> = [
  {
    name: "a bad reply magic",
    reply: (request) => Buffer.concat([u32(0x12345678), u32(0), request.cookie]),
    message: /bad reply magic 0x12345678/,
  },
  {
    name: "a structured reply that was not negotiated",
    reply: (request) => Buffer.concat([u32(STRUCTURED_REPLY_MAGIC), u32(0), request.cookie, u32(0)]),
    message: /structured reply, which was not negotiated/,
  },
  {
    name: "an unknown cookie",
    reply: (request) => simpleReply(Buffer.concat([request.cookie.subarray(0, 4), u32(999)])),
    message: /unknown cookie/,
  },
  {
    name: "a stale cookie generation",
    reply: (request) =>
      simpleReply(Buffer.concat([u32(request.cookie.readUInt32BE(0) + 1), request.cookie.subarray(4)])),
    message: /unknown cookie/,
  },
];

for (const violation of violations) {
  test(`a reply with ${violation.name} fails every pending request with PROTOCOL`, async () => {
    const server = await fakeServer({
      onRequest: (socket, request, all) => {
        if (all.length === 2) socket.write(violation.reply(request));
      },
    });
    const client = await NbdClient.connect(parseNbdUri(server.uri));
    try {
      const first = client.readAsync(0, 512);
      const second = client.readAsync(512, 512);
      await expectCode(first, "PROTOCOL", violation.message);
      await expectCode(second, "PROTOCOL", violation.message);
      await expectCode(client.readAsync(0, 512), "PROTOCOL");
      assert.equal(client.failure?.code, "PROTOCOL");
    } finally {
      client.destroy();
      server.close();
    }
  });
}

test("a hang-up with requests in flight fails them with IO_ERROR", async () => {
  const server = await fakeServer({ onRequest: (socket) => socket.destroy() });
  const client = await NbdClient.connect(parseNbdUri(server.uri));
  try {
    await expectCode(client.readAsync(0, 512), "IO_ERROR", /closed the connection|ECONNRESET/);
  } finally {
    client.destroy();
    server.close();
  }
});

test("handshake: option errors carry the server's message; oldstyle and garbage are refused", async () => {
  const unknown = await fakeServer({
    go: (socket) =>
      socket.write(optionReply(Opt.GO, Rep.ERR_UNKNOWN, Buffer.from("nothing called fake here"))),
  });
  await expectCode(
    NbdClient.connect(parseNbdUri(unknown.uri)),
    "NOT_FOUND",
    /no export named "fake": nothing called fake here/,
  );
  unknown.close();

  const policy = await fakeServer({ go: (socket) => socket.write(optionReply(Opt.GO, Rep.ERR_POLICY)) });
  await expectCode(NbdClient.connect(parseNbdUri(policy.uri)), "UNAUTHORIZED", /by policy/);
  policy.close();

  const oldstyle = await fakeServer({
    greeting: Buffer.concat([
      u32(NBDMAGIC_HI),
      u32(NBDMAGIC_LO),
      u32(0x00004202),
      u32(0x81861253),
      Buffer.alloc(136),
    ]),
  });
  await expectCode(NbdClient.connect(parseNbdUri(oldstyle.uri)), "NOT_SUPPORTED", /oldstyle/);
  oldstyle.close();

  const garbage = await fakeServer({ greeting: Buffer.from("SSH-2.0-OpenSSH_9.6\r\n") });
  await expectCode(NbdClient.connect(parseNbdUri(garbage.uri)), "PROTOCOL", /NBDMAGIC/);
  garbage.close();

  const noExport = await fakeServer({ go: (socket) => socket.write(optionReply(Opt.GO, Rep.ACK)) });
  await expectCode(NbdClient.connect(parseNbdUri(noExport.uri)), "PROTOCOL", /without NBD_INFO_EXPORT/);
  noExport.close();

  await expectCode(
    NbdClient.connect(parseNbdUri(`nbd+unix:///x?socket=${path.join(work, "nobody.sock")}`)),
    "IO_ERROR",
    /cannot connect/,
  );
});

test("requests the server could not accept are refused before they are sent", async () => {
  let received = 0;
  const server = await fakeServer({
    size: 8192,
    flags: TransmissionFlag.HAS_FLAGS | TransmissionFlag.READ_ONLY,
    onRequest: (socket, request) => {
      received++;
      socket.write(simpleReply(request.cookie, 0, Buffer.alloc(request.length)));
    },
  });
  const client = await NbdClient.connect(parseNbdUri(server.uri), { inflightMax: 2 });
  try {
    assert.equal(client.readOnly, true);
    await expectCode(client.readAsync(8192 - 512, 1024), "OUT_OF_RANGE", /past the end/);
    await expectCode(client.writeAsync(0, Buffer.alloc(512)), "READ_ONLY", /read-only/);
    await expectCode(client.flushAsync(), "NOT_SUPPORTED", /flush/);
    await expectCode(client.readAsync(0, 0), "INVALID_ARGUMENT", /zero-length/);
    assert.equal(received, 0);
    // Five reads through two slots: three wait their turn.
    const reads = await Promise.all([0, 1, 2, 3, 4].map((index) => client.readAsync(index * 1024, 1024)));
    assert.equal(reads.length, 5);
    assert.equal(received, 5);
    await client.close();
  } finally {
    client.destroy();
    server.close();
  }
});
