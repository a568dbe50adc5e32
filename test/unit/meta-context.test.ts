/**
 * NBD meta contexts beyond base:allocation, on the wire: an in-process server over a Unix socket whose
 * exports offer fake `qemu:dirty-bitmap:*` contexts (StaticExport.metaContexts), driven by RawNbdClient.
 *
 * Covers LIST_META_CONTEXT query forms, SET_META_CONTEXT ids and limits, BLOCK_STATUS with several
 * contexts (one chunk each, DONE only on the last, REQ_ONE), failing contexts (one error chunk), the
 * selection being tied to the export it was made for, and that one request in flight is counted once.
 */
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import type { Extent } from "../../src/devices/block-device";
import { MemoryDevice } from "../../src/devices/memory-device";
import { NbdErrno, VdiskError } from "../../src/errors";
import * as limits from "../../src/limits";
import { Cmd, CmdFlag, Opt, Rep, ReplyFlag, ReplyType } from "../../src/protocol/nbd/constants";
import { NbdServer } from "../../src/protocol/nbd/server";
import {
  RawNbdClient,
  encodeMetaQuery,
  replyError,
  type OptionReply,
  type Reply,
} from "../../src/testing/raw-nbd-client";
import { type ContextStatus, StaticExports } from "../../src/testing/static-exports";

const KiB = 1024;
const MiB = 1024 * KiB;
const SIZE = 4 * MiB;
const SNAP1 = "qemu:dirty-bitmap:snap1";
const SNAP2 = "qemu:dirty-bitmap:snap2";
const INFLIGHT_MAX = 8;

let dir: string;
let socketPath: string;
let server: NbdServer;

/**
 * A fake dirty bitmap: `dirty` are sorted, disjoint [start, length] ranges. It answers from `offset` to
 * the end of the disk (more than asked, so the server's clamping is exercised), with flag 1 = dirty.
 * `async` answers on a later turn; otherwise the callback runs inside the call.
 */
function bitmap(dirty: Array<[number, number]>, async: boolean): ContextStatus {
  return (offset, _length, done) => {
    const extents: Extent[] = [];
    let position = 0;
    const push = (end: number, flags: number): void => {
      const start = Math.max(position, offset);
      if (end > start) extents.push({ length: end - start, flags });
      position = end;
    };
    for (const [start, length] of dirty) {
      push(start, 0);
      push(start + length, 1);
    }
    push(SIZE, 0);
    if (async) setImmediate(() => done(null, extents));
    else done(null, extents);
  };
}

const snap1Dirty: Array<[number, number]> = [[64 * KiB, MiB]];
const snap2Dirty: Array<[number, number]> = [
  [0, 4 * KiB],
  [2 * MiB, 8 * KiB],
];

before(async () => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), "vdisk-meta-context-"));
  socketPath = path.join(dir, "nbd.sock");
  const disk = new MemoryDevice(SIZE);
  const many: Record<string, ContextStatus> = {};
  for (let i = 0; i < limits.metaContextsMax + 4; i++) many[`qemu:dirty-bitmap:b${i}`] = bitmap([], false);
  server = new NbdServer({
    exports: new StaticExports(
      new Map([
        [
          "disk",
          {
            device: disk,
            metaContexts: {
              [SNAP1]: bitmap(snap1Dirty, true),
              [SNAP2]: bitmap(snap2Dirty, false),
              "x-test:failing": (_offset, _length, done) =>
                setImmediate(() => done(new VdiskError("IO_ERROR", "bitmap unreadable"))),
              "x-test:empty": (_offset, _length, done) => done(null, []),
            },
          },
        ],
        [
          "other",
          { device: new MemoryDevice(SIZE), metaContexts: { "qemu:dirty-bitmap:other1": bitmap([], false) } },
        ],
        ["many", { device: new MemoryDevice(SIZE), metaContexts: many }],
      ]),
    ),
    inflightPerConnectionMax: INFLIGHT_MAX,
    handshakeTimeoutMs: 5000,
  });
  await server.listenUnix(socketPath);
  // base:allocation of "disk": 128 KiB of data at the start, the rest a hole.
  await new Promise<void>((resolve, reject) =>
    disk.write(Buffer.alloc(128 * KiB, 0xab), 0, false, (err) => (err ? reject(err) : resolve())),
  );
});

after(async () => {
  await server.shutdown(1000);
  fs.rmSync(dir, { recursive: true, force: true });
});

// -----------------------------------------------------------------------------------------------
// Helpers

/** Connected, handshaken, structured replies negotiated; still in the option phase. */
async function optionClient(): Promise<RawNbdClient> {
  const client = await RawNbdClient.connect(socketPath);
  await client.handshake();
  client.sendOption(Opt.STRUCTURED_REPLY);
  assert.equal((await client.readOptionReply()).type, Rep.ACK);
  return client;
}

interface ContextReply {
  id: number;
  name: string;
}

/** Sends LIST or SET_META_CONTEXT; returns the META_CONTEXT replies and the final reply type. */
async function metaOption(
  client: RawNbdClient,
  option: number,
  exportName: string,
  queries: string[],
): Promise<{ contexts: ContextReply[]; final: OptionReply }> {
  client.sendOption(option, encodeMetaQuery(exportName, queries));
  const replies = await client.readOptionReplies();
  const final = replies[replies.length - 1] as OptionReply;
  const contexts = replies
    .filter((reply) => reply.type === Rep.META_CONTEXT)
    .map((reply) => ({ id: reply.data.readUInt32BE(0), name: reply.data.toString("utf8", 4) }));
  for (const reply of replies) assert.equal(reply.option, option);
  return { contexts, final };
}

async function listNames(exportName: string, queries: string[]): Promise<string[]> {
  const client = await optionClient();
  const { contexts, final } = await metaOption(client, Opt.LIST_META_CONTEXT, exportName, queries);
  client.close();
  assert.equal(final.type, Rep.ACK);
  for (const context of contexts) assert.equal(context.id, 0, "LIST replies carry id 0");
  return contexts.map((context) => context.name);
}

/** A client in transmission on `exportName` with `queries` selected; returns the selected contexts. */
async function selectAndGo(
  exportName: string,
  queries: string[],
): Promise<{ client: RawNbdClient; contexts: ContextReply[] }> {
  const client = await optionClient();
  const { contexts, final } = await metaOption(client, Opt.SET_META_CONTEXT, exportName, queries);
  assert.equal(final.type, Rep.ACK);
  await client.go(exportName, false);
  return { client, contexts };
}

interface StatusChunk {
  flags: number;
  id: number;
  extents: Array<[number, number]>;
}

function statusChunks(reply: Reply): StatusChunk[] {
  assert.equal(reply.kind, "structured");
  if (reply.kind !== "structured") return [];
  return reply.chunks.map((chunk) => {
    assert.equal(chunk.type, ReplyType.BLOCK_STATUS);
    assert.equal((chunk.data.length - 4) % 8, 0);
    const extents: Array<[number, number]> = [];
    for (let i = 4; i < chunk.data.length; i += 8) {
      extents.push([chunk.data.readUInt32BE(i), chunk.data.readUInt32BE(i + 4)]);
    }
    return { flags: chunk.flags, id: chunk.data.readUInt32BE(0), extents };
  });
}

/** Chunks by context name (via the ids from SET), checking DONE is set on the last chunk only. */
function chunksByName(reply: Reply, contexts: ContextReply[]): Map<string, Array<[number, number]>> {
  const chunks = statusChunks(reply);
  assert.equal(chunks.length, contexts.length, "one chunk per selected context");
  chunks.forEach((chunk, index) => {
    assert.equal(chunk.flags & ReplyFlag.DONE, index === chunks.length - 1 ? ReplyFlag.DONE : 0);
  });
  const byName = new Map<string, Array<[number, number]>>();
  for (const chunk of chunks) {
    const context = contexts.find((c) => c.id === chunk.id);
    assert.ok(context, `chunk for unknown context id ${chunk.id}`);
    assert.ok(!byName.has(context.name), "one chunk per context");
    byName.set(context.name, chunk.extents);
  }
  return byName;
}

// -----------------------------------------------------------------------------------------------
// Handshake

test("LIST_META_CONTEXT: no query lists base:allocation and every offered context", async () => {
  assert.deepEqual(await listNames("disk", []), [
    "base:allocation",
    SNAP1,
    SNAP2,
    "x-test:failing",
    "x-test:empty",
  ]);
  assert.deepEqual(await listNames("other", []), ["base:allocation", "qemu:dirty-bitmap:other1"]);
  assert.deepEqual(await listNames("", []), await listNames("disk", []), "'' is the default export");
});

test("LIST_META_CONTEXT: namespace wildcards, exact names, unknown names", async () => {
  assert.deepEqual(await listNames("disk", ["base:"]), ["base:allocation"]);
  assert.deepEqual(await listNames("disk", ["base:allocation"]), ["base:allocation"]);
  assert.deepEqual(await listNames("disk", ["qemu:"]), [SNAP1, SNAP2]);
  assert.deepEqual(await listNames("disk", ["qemu:dirty-bitmap:"]), [SNAP1, SNAP2]);
  assert.deepEqual(await listNames("disk", [SNAP2]), [SNAP2]);
  assert.deepEqual(await listNames("disk", [SNAP2, "base:", SNAP2]), ["base:allocation", SNAP2]);
  assert.deepEqual(await listNames("disk", ["qemu:dirty-bitmap:nope"]), []);
  assert.deepEqual(await listNames("disk", ["unknown:thing", "nocolon"]), []);
  assert.deepEqual(await listNames("other", [SNAP1]), [], "contexts are per export");
  assert.equal((await listNames("many", ["qemu:dirty-bitmap:"])).length, limits.metaContextsMax + 4);
});

test("SET_META_CONTEXT: each exact name selected once, with unique ids; wildcards select nothing", async () => {
  const client = await optionClient();
  const first = await metaOption(client, Opt.SET_META_CONTEXT, "disk", [
    "base:allocation",
    SNAP1,
    "qemu:",
    "base:",
    "unknown:x",
    SNAP1,
    "qemu:dirty-bitmap:nope",
  ]);
  assert.equal(first.final.type, Rep.ACK);
  assert.deepEqual(
    first.contexts.map((c) => c.name),
    ["base:allocation", SNAP1],
  );
  assert.deepEqual(
    first.contexts.map((c) => c.id),
    [1, 2],
  );
  // A second SET replaces the selection; ids stay unique on the connection.
  const second = await metaOption(client, Opt.SET_META_CONTEXT, "disk", [SNAP2, "base:allocation"]);
  assert.equal(second.final.type, Rep.ACK);
  assert.deepEqual(
    second.contexts.map((c) => c.name),
    [SNAP2, "base:allocation"],
  );
  const ids = [...first.contexts, ...second.contexts].map((c) => c.id);
  assert.equal(new Set(ids).size, ids.length);
  assert.ok(ids.every((id) => id > 0));
  const none = await metaOption(client, Opt.SET_META_CONTEXT, "disk", ["qemu:", "base:"]);
  assert.deepEqual(none.contexts, []);
  assert.equal(none.final.type, Rep.ACK);
  await client.go("disk", false);
  const reply = await client.request(Cmd.BLOCK_STATUS, 0, 4096);
  assert.equal(replyError(reply), NbdErrno.EINVAL, "the last SET selected nothing");
  client.close();
});

test("SET_META_CONTEXT: more than metaContextsMax contexts is ERR_TOO_BIG and clears the selection", async () => {
  const names = Array.from({ length: limits.metaContextsMax + 1 }, (_, i) => `qemu:dirty-bitmap:b${i}`);
  const client = await optionClient();
  const ok = await metaOption(client, Opt.SET_META_CONTEXT, "many", names.slice(0, limits.metaContextsMax));
  assert.equal(ok.final.type, Rep.ACK);
  assert.equal(ok.contexts.length, limits.metaContextsMax);
  const tooMany = await metaOption(client, Opt.SET_META_CONTEXT, "many", names);
  assert.equal(tooMany.final.type, Rep.ERR_TOO_BIG);
  assert.deepEqual(tooMany.contexts, []);
  await client.go("many", false);
  assert.equal(replyError(await client.request(Cmd.BLOCK_STATUS, 0, 4096)), NbdErrno.EINVAL);
  client.close();

  // Exactly the maximum works end to end: metaContextsMax chunks.
  const full = await selectAndGo("many", names.slice(0, limits.metaContextsMax));
  const byName = chunksByName(await full.client.request(Cmd.BLOCK_STATUS, 0, MiB), full.contexts);
  assert.equal(byName.size, limits.metaContextsMax);
  for (const extents of byName.values()) assert.deepEqual(extents, [[MiB, 0]]);
  full.client.close();
});

test("contexts selected for one export do not carry over to GO on another", async () => {
  const client = await optionClient();
  const set = await metaOption(client, Opt.SET_META_CONTEXT, "other", [
    "base:allocation",
    "qemu:dirty-bitmap:other1",
  ]);
  assert.equal(set.contexts.length, 2);
  await client.go("disk", false);
  assert.equal(replyError(await client.request(Cmd.BLOCK_STATUS, 0, 4096)), NbdErrno.EINVAL);
  client.close();
});

// -----------------------------------------------------------------------------------------------
// Transmission

test("BLOCK_STATUS with two contexts: two chunks with their ids and extents, DONE on the last", async () => {
  const { client, contexts } = await selectAndGo("disk", ["base:allocation", SNAP1]);
  assert.equal(contexts.length, 2);

  const whole = chunksByName(await client.request(Cmd.BLOCK_STATUS, 0, SIZE), contexts);
  assert.deepEqual(whole.get("base:allocation"), [
    [128 * KiB, 0],
    [SIZE - 128 * KiB, 3],
  ]);
  assert.deepEqual(whole.get(SNAP1), [
    [64 * KiB, 0],
    [MiB, 1],
    [SIZE - 64 * KiB - MiB, 0],
  ]);

  // A window inside: extents start at the offset and never go past the requested length.
  const window = chunksByName(await client.request(Cmd.BLOCK_STATUS, 96 * KiB, 64 * KiB), contexts);
  assert.deepEqual(window.get("base:allocation"), [
    [32 * KiB, 0],
    [32 * KiB, 3],
  ]);
  assert.deepEqual(window.get(SNAP1), [[64 * KiB, 1]]);
  client.close();
});

test("BLOCK_STATUS with REQ_ONE: one extent per chunk, within the request", async () => {
  const { client, contexts } = await selectAndGo("disk", [SNAP2, SNAP1, "base:allocation"]);
  const atZero = chunksByName(
    await client.request(Cmd.BLOCK_STATUS, 0, 256 * KiB, CmdFlag.REQ_ONE),
    contexts,
  );
  assert.deepEqual(atZero.get("base:allocation"), [[128 * KiB, 0]]);
  assert.deepEqual(atZero.get(SNAP1), [[64 * KiB, 0]]);
  assert.deepEqual(atZero.get(SNAP2), [[4 * KiB, 1]]);
  const small = chunksByName(await client.request(Cmd.BLOCK_STATUS, 3 * MiB, 512, CmdFlag.REQ_ONE), contexts);
  assert.deepEqual(small.get("base:allocation"), [[512, 3]]);
  assert.deepEqual(small.get(SNAP1), [[512, 0]]);
  assert.deepEqual(small.get(SNAP2), [[512, 0]]);
  client.close();
});

test("BLOCK_STATUS: a failing or empty context gives one error chunk; the connection goes on", async () => {
  for (const [bad, errno] of [
    ["x-test:failing", NbdErrno.EIO],
    ["x-test:empty", NbdErrno.EIO],
  ] as const) {
    const { client, contexts } = await selectAndGo("disk", ["base:allocation", bad, SNAP1]);
    assert.equal(contexts.length, 3);
    const reply = await client.request(Cmd.BLOCK_STATUS, 0, 4096);
    assert.equal(reply.kind, "structured");
    if (reply.kind === "structured") {
      assert.equal(reply.chunks.length, 1, "only the error chunk");
      assert.equal(reply.chunks[0]?.type, ReplyType.ERROR);
      assert.equal(reply.chunks[0]?.flags, ReplyFlag.DONE);
    }
    assert.equal(replyError(reply), errno);
    assert.equal(replyError(await client.request(Cmd.READ, 0, 4096)), 0);
    client.close();
  }
});

test("BLOCK_STATUS: validation (beyond the end, zero length) still answers EINVAL", async () => {
  const { client } = await selectAndGo("disk", ["base:allocation", SNAP1]);
  assert.equal(replyError(await client.request(Cmd.BLOCK_STATUS, SIZE - 512, 1024)), NbdErrno.EINVAL);
  assert.equal(replyError(await client.request(Cmd.BLOCK_STATUS, 0, 0)), NbdErrno.EINVAL);
  client.close();
});

test("many pipelined multi-context BLOCK_STATUS requests: each counts once in flight, all answered", async () => {
  const { client, contexts } = await selectAndGo("disk", ["base:allocation", SNAP1, SNAP2, "x-test:failing"]);
  const count = INFLIGHT_MAX * 8;
  for (let cookie = 1; cookie <= count; cookie++) {
    client.sendRequest(Cmd.BLOCK_STATUS, cookie, (cookie % 16) * 4 * KiB, 64 * KiB);
  }
  const seen = new Set<number>();
  for (let i = 0; i < count; i++) {
    const reply = await client.readReply();
    assert.equal(replyError(reply), NbdErrno.EIO);
    seen.add(reply.cookie);
  }
  assert.equal(seen.size, count);
  client.close();

  // Without the failing context, the same load succeeds and the connection stays usable afterwards.
  const good = await selectAndGo("disk", ["base:allocation", SNAP1, SNAP2]);
  for (let cookie = 1; cookie <= count; cookie++)
    good.client.sendRequest(Cmd.BLOCK_STATUS, cookie, 0, 64 * KiB);
  for (let i = 0; i < count; i++) {
    const byName = chunksByName(await good.client.readReply(), good.contexts);
    assert.deepEqual(byName.get(SNAP1), [[64 * KiB, 0]]);
  }
  assert.equal(replyError(await good.client.request(Cmd.READ, 0, 4096)), 0);
  good.client.close();
  assert.equal(contexts.length, 4);
});
