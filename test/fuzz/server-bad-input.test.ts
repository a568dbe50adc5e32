/**
 * Hostile and broken clients against a live in-process NBD server. Each case checks two things: the bad
 * client gets the protocol's error reply or its own connection closed, and a well-behaved client on
 * another connection still reads back exactly the data it wrote before.
 */
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import * as net from "node:net";
import { randomBytes } from "node:crypto";
import fc from "fast-check";
import { MemoryDevice } from "../../src/devices/memory-device";
import { NbdServer } from "../../src/protocol/nbd/server";
import { StaticExports } from "../../src/testing/static-exports";
import { RawNbdClient, replyError, encodeMetaQuery } from "../../src/testing/raw-nbd-client";
import { Cmd, CmdFlag, Opt, Rep, TransmissionFlag, ReplyType } from "../../src/protocol/nbd/constants";
import { NbdErrno } from "../../src/errors";

const SIZE = 4 * 1024 * 1024;
const PAYLOAD_MAX = 64 * 1024;
let dir: string;
let socketPath: string;
let server: NbdServer;
const reference = randomBytes(128 * 1024);

before(async () => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), "vdisk-bad-input-"));
  socketPath = path.join(dir, "nbd.sock");
  server = new NbdServer({
    exports: new StaticExports(
      new Map([
        ["disk", { device: new MemoryDevice(SIZE) }],
        ["ro", { device: new MemoryDevice(SIZE), readOnly: true }],
      ]),
    ),
    requestBytesMax: PAYLOAD_MAX,
    handshakeTimeoutMs: 2000,
  });
  await server.listenUnix(socketPath);
  // A well-behaved client writes reference data that every test checks afterwards.
  const client = await RawNbdClient.connect(socketPath);
  await client.handshake();
  await client.go("disk");
  for (let offset = 0; offset < reference.length; offset += PAYLOAD_MAX) {
    const reply = await client.request(
      Cmd.WRITE,
      offset,
      PAYLOAD_MAX,
      0,
      reference.subarray(offset, offset + PAYLOAD_MAX),
    );
    assert.equal(replyError(reply), 0);
  }
  client.close();
});

after(async () => {
  await server.shutdown(1000);
  fs.rmSync(dir, { recursive: true, force: true });
});

/** A fresh good client reads the reference data back intact. */
async function assertServerHealthy(): Promise<void> {
  const client = await RawNbdClient.connect(socketPath);
  await client.handshake();
  await client.go("disk");
  for (let offset = 0; offset < reference.length; offset += PAYLOAD_MAX) {
    const reply = await client.request(Cmd.READ, offset, PAYLOAD_MAX);
    assert.equal(reply.kind, "structured");
    if (reply.kind === "structured") {
      const data = Buffer.concat(
        reply.chunks.filter((c) => c.type === ReplyType.OFFSET_DATA).map((c) => c.data.subarray(8)),
      );
      assert.ok(data.equals(reference.subarray(offset, offset + PAYLOAD_MAX)), "reference data intact");
    }
  }
  client.close();
}

async function transmissionClient(name = "disk", structured = true): Promise<RawNbdClient> {
  const client = await RawNbdClient.connect(socketPath);
  await client.handshake();
  await client.go(name, structured);
  return client;
}

test("garbage instead of a handshake closes only that connection", async () => {
  const client = await RawNbdClient.connect(socketPath);
  await client.read(18);
  client.write(randomBytes(300));
  assert.equal(await client.waitClosed(), true);
  await assertServerHealthy();
});

test("a client that never finishes the handshake is timed out", async () => {
  const client = await RawNbdClient.connect(socketPath);
  await client.handshake();
  assert.equal(await client.waitClosed(4000), true);
});

test("unknown options get ERR_UNSUP and the handshake goes on", async () => {
  const client = await RawNbdClient.connect(socketPath);
  await client.handshake();
  client.sendOption(250, Buffer.from("hello"));
  const reply = await client.readOptionReply();
  assert.equal(reply.type, Rep.ERR_UNSUP);
  client.sendOption(Opt.STARTTLS);
  assert.equal((await client.readOptionReply()).type, Rep.ERR_POLICY);
  client.sendOption(Opt.LIST, Buffer.from("x"));
  assert.equal((await client.readOptionReply()).type, Rep.ERR_INVALID);
  const { size } = await client.go("disk");
  assert.equal(size, SIZE);
  client.close();
});

test("an oversized option is skipped and refused with ERR_TOO_BIG", async () => {
  const client = await RawNbdClient.connect(socketPath);
  await client.handshake();
  client.sendOption(Opt.GO, Buffer.alloc(200 * 1024));
  assert.equal((await client.readOptionReply()).type, Rep.ERR_TOO_BIG);
  await client.go("disk");
  client.close();
});

test("malformed GO and META_CONTEXT options get ERR_INVALID; unknown exports ERR_UNKNOWN", async () => {
  const client = await RawNbdClient.connect(socketPath);
  await client.handshake();
  const lying = Buffer.alloc(10);
  lying.writeUInt32BE(1000, 0); // name length beyond the data
  client.sendOption(Opt.GO, lying);
  assert.equal((await client.readOptionReply()).type, Rep.ERR_INVALID);
  client.sendOption(Opt.SET_META_CONTEXT, encodeMetaQuery("disk", ["base:allocation"]));
  assert.equal(
    (await client.readOptionReply()).type,
    Rep.ERR_INVALID,
    "meta context needs structured replies",
  );
  client.sendOption(Opt.STRUCTURED_REPLY);
  assert.equal((await client.readOptionReply()).type, Rep.ACK);
  client.sendOption(Opt.SET_META_CONTEXT, encodeMetaQuery("disk", ["base:allocation"]).subarray(0, 12));
  assert.equal((await client.readOptionReply()).type, Rep.ERR_INVALID);
  client.sendOption(Opt.LIST_META_CONTEXT, encodeMetaQuery("nope", []));
  assert.equal((await client.readOptionReply()).type, Rep.ERR_UNKNOWN);
  const name = Buffer.from("nope");
  const info = Buffer.alloc(6 + name.length);
  info.writeUInt32BE(name.length, 0);
  name.copy(info, 4);
  client.sendOption(Opt.INFO, info);
  assert.equal((await client.readOptionReply()).type, Rep.ERR_UNKNOWN);
  await client.go("disk", false);
  client.close();
});

test("NBD_OPT_EXPORT_NAME with an unknown export closes the connection", async () => {
  const client = await RawNbdClient.connect(socketPath);
  await client.handshake();
  client.sendOption(Opt.EXPORT_NAME, Buffer.from("no-such-disk"));
  assert.equal(await client.waitClosed(), true);
  await assertServerHealthy();
});

test("oversized write: payload discarded, EINVAL, connection goes on", async () => {
  const client = await transmissionClient();
  const big = Buffer.alloc(PAYLOAD_MAX * 2, 0xee);
  const reply = await client.request(Cmd.WRITE, 0, big.length, 0, big);
  assert.equal(replyError(reply), NbdErrno.EINVAL);
  const read = await client.request(Cmd.READ, 0, 4096);
  assert.equal(replyError(read), 0);
  await assertServerHealthy(); // the oversized write did not land
  client.close();
});

test("out-of-range requests: EINVAL for reads/trims, ENOSPC for writes; read-only: EPERM", async () => {
  const client = await transmissionClient();
  assert.equal(replyError(await client.request(Cmd.READ, SIZE - 512, 1024)), NbdErrno.EINVAL);
  assert.equal(replyError(await client.request(Cmd.READ, 2 ** 60, 512)), NbdErrno.EINVAL);
  assert.equal(replyError(await client.request(Cmd.TRIM, SIZE, 512)), NbdErrno.EINVAL);
  assert.equal(
    replyError(await client.request(Cmd.WRITE, SIZE - 100, 200, 0, Buffer.alloc(200))),
    NbdErrno.ENOSPC,
  );
  assert.equal(replyError(await client.request(Cmd.WRITE_ZEROES, SIZE, 4096)), NbdErrno.ENOSPC);
  assert.equal(replyError(await client.request(Cmd.READ, 0, PAYLOAD_MAX + 1)), NbdErrno.EINVAL);
  client.close();
  const ro = await transmissionClient("ro");
  assert.equal(replyError(await ro.request(Cmd.WRITE, 0, 512, 0, Buffer.alloc(512))), NbdErrno.EPERM);
  assert.equal(replyError(await ro.request(Cmd.TRIM, 0, 512)), NbdErrno.EPERM);
  assert.equal(replyError(await ro.request(Cmd.READ, 0, 512)), 0);
  ro.close();
  await assertServerHealthy();
});

test("unknown commands and block status without a meta context get EINVAL", async () => {
  const client = await transmissionClient();
  assert.equal(replyError(await client.request(42, 0, 512)), NbdErrno.EINVAL);
  assert.equal(replyError(await client.request(Cmd.BLOCK_STATUS, 0, 512)), NbdErrno.EINVAL);
  const simple = await transmissionClient("disk", false);
  assert.equal(replyError(await simple.request(Cmd.READ, 0, 512, CmdFlag.DF)), NbdErrno.EINVAL);
  const reply = await simple.request(Cmd.READ, 0, 512);
  assert.equal(reply.kind, "simple");
  assert.ok(reply.kind === "simple" && reply.data.equals(reference.subarray(0, 512)));
  simple.close();
  client.close();
});

test("disconnect mid-payload loses that write only", async () => {
  const client = await transmissionClient();
  client.sendRequest(Cmd.WRITE, 1, 0, 8192, 0, Buffer.alloc(1000, 0x11));
  await new Promise((r) => setTimeout(r, 50));
  client.close();
  await assertServerHealthy();
});

test("truncated header then garbage in transmission closes only that connection", async () => {
  const client = await transmissionClient();
  client.write(Buffer.from([0x25, 0x60, 0x95])); // start of a request magic
  await new Promise((r) => setTimeout(r, 20));
  client.write(randomBytes(100));
  assert.equal(await client.waitClosed(), true);
  await assertServerHealthy();
});

test("FAST_ZERO, NO_HOLE, FUA and zero-length requests are honoured", async () => {
  const client = await transmissionClient();
  const { flags } = await (async () => {
    const c = await RawNbdClient.connect(socketPath);
    await c.handshake();
    const result = await c.go("disk");
    c.close();
    return result;
  })();
  assert.ok(flags & TransmissionFlag.SEND_FAST_ZERO);
  assert.ok(flags & TransmissionFlag.CAN_MULTI_CONN);
  const offset = SIZE - 65536;
  assert.equal(
    replyError(await client.request(Cmd.WRITE, offset, 4096, CmdFlag.FUA, Buffer.alloc(4096, 9))),
    0,
  );
  assert.equal(
    replyError(await client.request(Cmd.WRITE_ZEROES, offset, 4096, CmdFlag.FAST_ZERO | CmdFlag.NO_HOLE)),
    0,
  );
  const read = await client.request(Cmd.READ, offset, 4096, CmdFlag.DF);
  assert.equal(read.kind, "structured");
  if (read.kind === "structured") {
    assert.equal(read.chunks.length, 1, "DF: one chunk");
    assert.ok(read.chunks[0]!.data.subarray(8).equals(Buffer.alloc(4096)));
  }
  assert.equal(replyError(await client.request(Cmd.WRITE, offset, 0, 0, Buffer.alloc(0))), 0);
  assert.equal(replyError(await client.request(Cmd.FLUSH, 0, 0)), 0);
  client.close();
});

test("random request streams after a valid handshake never hurt other clients", async () => {
  await fc.assert(
    fc.asyncProperty(fc.uint8Array({ minLength: 1, maxLength: 600 }), async (bytes) => {
      const client = await transmissionClient();
      client.write(Buffer.from(bytes));
      await new Promise((r) => setTimeout(r, 5));
      client.close();
    }),
    { numRuns: 60 },
  );
  await assertServerHealthy();
  // The server is still accepting after all that.
  const socket = net.createConnection({ path: socketPath });
  await new Promise<void>((resolve, reject) => {
    socket.once("data", () => resolve());
    socket.once("error", reject);
  });
  socket.destroy();
});

test("closed connections are forgotten: the server's connection count returns to zero", async () => {
  const clients = await Promise.all([transmissionClient(), transmissionClient(), transmissionClient("ro")]);
  assert.ok(server.stats().connections >= 3);
  // One leaves with NBD_CMD_DISC, one drops the socket, one aborts during the handshake.
  clients[0]!.sendRequest(Cmd.DISC, 1, 0, 0);
  assert.equal(await clients[0]!.waitClosed(), true);
  clients[1]!.close();
  clients[2]!.close();
  const aborting = await RawNbdClient.connect(socketPath);
  await aborting.handshake();
  aborting.sendOption(Opt.ABORT);
  assert.equal((await aborting.readOptionReply()).type, Rep.ACK);
  assert.equal(await aborting.waitClosed(), true);
  const deadline = Date.now() + 3000;
  while (server.stats().connections > 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10));
  assert.equal(server.stats().connections, 0);
});
