/**
 * The NBD client (src/protocol/nbd/client.ts) against three real servers: the vdisk daemon (Unix socket
 * and TCP), qemu-nbd (`-f raw -k SOCKET -t -x disk FILE`) and nbdkit (`--foreground --unix SOCKET memory`,
 * and with its error filter). Each round trip writes 48 pieces of random data (pipelined through 16 slots,
 * so requests also wait for slots), flushes, reads them back pipelined and byte for byte, reads across
 * pieces and holes, and reads into no buffer with tags. Then a second connection (or, for qemu-nbd, the
 * image file itself) must see the same bytes.
 *
 * Errors from real servers: an unknown export (NOT_FOUND, with the server's message), a request past the
 * end of a vdisk disk shrunk under the client (the daemon answers EINVAL and ENOSPC: INVALID_ARGUMENT and
 * NO_SPACE, and the connection goes on), nbdkit's error filter failing every write with ENOSPC and every
 * read with ESHUTDOWN (after which the client disconnects, as the spec requires), and a read-only
 * snapshot export (writes refused by the client). A missing tool fails the test.
 */
import { after, before, test } from "node:test";
import * as assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import * as fs from "node:fs";
import { expectCode } from "../../src/testing/expect-code";
import { NbdClient, parseNbdUri, type NbdTarget } from "../../src/protocol/nbd/client";
import {
  type DaemonFixture,
  type StartedTool,
  describeRun,
  requireTool,
  spawnTool,
  startDaemon,
} from "../../src/testing/daemon-fixture";

const KiB = 1024;
const MiB = 1024 * KiB;
const pieceStrideBytes = 128 * KiB;
const pieces = 48;

let daemon: DaemonFixture;

before(async () => {
  requireTool("qemu-nbd");
  requireTool("nbdkit");
  daemon = await startDaemon({ name: "vdisk-nbd-client" });
});

after(() => daemon?.cleanup());

function createDisk(name: string, size: string): void {
  const result = daemon.vdisk(["create", name, "--size", size]);
  assert.equal(result.status, 0, describeRun("vdisk create", [name], result));
}

const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

/** Start a server tool and wait for its Unix socket to accept connections. */
async function startServer(cmd: string, args: string[], socket: string): Promise<StartedTool> {
  const tool = spawnTool(cmd, args);
  const state: { exited: string | null } = { exited: null };
  void tool.done.then((result) => (state.exited = describeRun(cmd, args, result)));
  for (let waited = 0; waited < 15_000; waited += 25) {
    if (state.exited !== null) throw new Error(`${cmd} exited early:\n${state.exited}`);
    if (fs.existsSync(socket)) return tool;
    await sleep(25);
  }
  tool.kill();
  throw new Error(`${cmd} did not create ${socket} within 15 s`);
}

interface Piece {
  offset: number;
  data: Buffer;
}

function makePieces(): Piece[] {
  const list: Piece[] = [];
  for (let index = 0; index < pieces; index++) {
    const length = 512 * (1 + ((index * 37) % 128)); // 512 B .. 64 KiB
    list.push({ offset: index * pieceStrideBytes + (index % 4) * 512, data: randomBytes(length) });
  }
  return list;
}

/** What the first `bytes` of the disk hold after `list` was written on zeros. */
function expectedImage(list: Piece[], bytes: number): Buffer {
  const image = Buffer.alloc(bytes);
  for (const piece of list) if (piece.offset < bytes) piece.data.copy(image, piece.offset);
  return image;
}

/** Write, flush, read back, read across, read into nothing; returns what was written. */
async function roundTrip(client: NbdClient): Promise<Piece[]> {
  assert.ok(client.size >= pieces * pieceStrideBytes, `export of ${client.size} bytes is large enough`);
  const list = makePieces();
  await Promise.all(list.map((piece) => client.writeAsync(piece.offset, piece.data)));
  if (client.canFlush) await client.flushAsync();
  const back = await Promise.all(list.map((piece) => client.readAsync(piece.offset, piece.data.length)));
  for (const [index, piece] of list.entries()) {
    assert.ok((back[index] as Buffer).equals(piece.data), `piece ${index} reads back as written`);
  }
  const span = 3 * pieceStrideBytes + 4096;
  assert.ok(
    (await client.readAsync(0, span)).equals(expectedImage(list, span)),
    "a read across pieces and holes",
  );
  // Callbacks with tags, data dropped; then a read after them must still be in step.
  const tags = await new Promise<number[]>((resolve, reject) => {
    const seen: number[] = [];
    for (let tag = 0; tag < 20; tag++) {
      const piece = list[tag] as Piece;
      client.read(
        piece.offset,
        piece.data.length,
        null,
        (err, got) => {
          if (err) return reject(err);
          seen.push(got);
          if (seen.length === 20) resolve(seen);
        },
        tag,
      );
    }
  });
  assert.deepEqual(
    [...tags].sort((a, b) => a - b),
    Array.from({ length: 20 }, (_, tag) => tag),
  );
  const last = list[pieces - 1] as Piece;
  assert.ok((await client.readAsync(last.offset, last.data.length)).equals(last.data));
  assert.equal(client.inflight, 0);
  assert.equal(client.queued, 0);
  return list;
}

async function connect(target: NbdTarget | string): Promise<NbdClient> {
  return NbdClient.connect(typeof target === "string" ? parseNbdUri(target) : target, { inflightMax: 16 });
}

test("vdisk daemon over its Unix socket and over TCP: data round trips, seen by a second connection", async () => {
  createDisk("rt", "16M");
  for (const uri of [daemon.unixUri("rt"), daemon.tcpUri("rt")]) {
    const client = await connect(uri);
    let list: Piece[];
    try {
      assert.equal(client.size, 16 * MiB);
      assert.equal(client.readOnly, false);
      assert.ok(client.canFlush);
      assert.equal(client.blockSizes.minimum, 1);
      assert.equal(client.blockSizes.maximum, 32 * MiB);
      list = await roundTrip(client);
    } finally {
      await client.close();
    }
    assert.ok(client.failure !== null, "a closed client refuses requests");
    await expectCode(client.readAsync(0, 512), "IO_ERROR");
    const second = await connect(uri);
    try {
      for (const piece of list) {
        assert.ok(
          (await second.readAsync(piece.offset, piece.data.length)).equals(piece.data),
          `${uri} persisted`,
        );
      }
    } finally {
      await second.close();
    }
  }
});

test("vdisk daemon: unknown export, a disk shrunk under the client, a read-only snapshot", async () => {
  await expectCode(connect(daemon.unixUri("no-such-disk")), "NOT_FOUND", /no export named "no-such-disk"/);

  createDisk("shrink", "8M");
  const client = await connect(daemon.unixUri("shrink"));
  try {
    await client.writeAsync(7 * MiB, Buffer.alloc(4096, 7));
    const resized = daemon.vdisk(["resize", "shrink", "--size", "4M", "--shrink"]);
    assert.equal(resized.status, 0, describeRun("vdisk resize", [], resized));
    // The client still believes 8 MiB; the daemon refuses what now lies past its end.
    await expectCode(
      client.readAsync(6 * MiB, 4096),
      "INVALID_ARGUMENT",
      /READ of 4096 bytes at offset 6291456: EINVAL \(22\)/,
    );
    await expectCode(client.writeAsync(6 * MiB, Buffer.alloc(4096)), "NO_SPACE", /ENOSPC \(28\)/);
    // ... and the connection goes on.
    await client.writeAsync(MiB, Buffer.alloc(512, 9));
    assert.ok((await client.readAsync(MiB, 512)).equals(Buffer.alloc(512, 9)));
  } finally {
    await client.close();
  }

  createDisk("snapped", "4M");
  const writer = await connect(daemon.unixUri("snapped"));
  await writer.writeAsync(0, Buffer.alloc(4096, 0x5a));
  await writer.close();
  const snap = daemon.vdisk(["snapshot", "create", "snapped", "s1"]);
  assert.equal(snap.status, 0, describeRun("vdisk snapshot create", [], snap));
  const reader = await connect(daemon.unixUri("snapped@s1"));
  try {
    assert.equal(reader.readOnly, true);
    assert.ok((await reader.readAsync(0, 4096)).equals(Buffer.alloc(4096, 0x5a)));
    await expectCode(reader.writeAsync(0, Buffer.alloc(512)), "READ_ONLY", /read-only/);
  } finally {
    await reader.close();
  }
});

test("qemu-nbd: data round trips and lands in the image file; unknown export refused", async () => {
  const image = daemon.file("qemu.raw");
  fs.writeFileSync(image, "");
  fs.truncateSync(image, 16 * MiB);
  const socket = daemon.file("qemu.sock");
  const server = await startServer(
    "qemu-nbd",
    ["-f", "raw", "-k", socket, "-t", "-x", "disk", image],
    socket,
  );
  try {
    const uri = `nbd+unix:///disk?socket=${socket}`;
    const client = await connect(uri);
    let list: Piece[];
    try {
      assert.equal(client.size, 16 * MiB);
      list = await roundTrip(client);
    } finally {
      await client.close();
    }
    const file = fs.readFileSync(image);
    for (const piece of list) {
      assert.ok(
        file.subarray(piece.offset, piece.offset + piece.data.length).equals(piece.data),
        "in the file",
      );
    }
    await expectCode(connect(`nbd+unix:///other?socket=${socket}`), "NOT_FOUND", /no export named "other"/);
    // The server is still fine after the refused handshake.
    const again = await connect(uri);
    const first = list[0] as Piece;
    assert.ok((await again.readAsync(first.offset, 512)).equals(first.data.subarray(0, 512)));
    await again.close();
  } finally {
    server.kill();
    await server.done;
  }
});

test("nbdkit memory plugin: data round trips, shared by a second connection", async () => {
  const socket = daemon.file("nbdkit.sock");
  const server = await startServer("nbdkit", ["--foreground", "--unix", socket, "memory", "64M"], socket);
  try {
    const uri = `nbd+unix:///anything?socket=${socket}`;
    const client = await connect(uri);
    let list: Piece[];
    try {
      assert.equal(client.size, 64 * MiB);
      list = await roundTrip(client);
    } finally {
      await client.close();
    }
    const second = await connect(uri);
    try {
      for (const piece of list)
        assert.ok((await second.readAsync(piece.offset, piece.data.length)).equals(piece.data));
    } finally {
      await second.close();
    }
  } finally {
    server.kill();
    await server.done;
  }
});

test("nbdkit error filter: ENOSPC on writes fails only them; ESHUTDOWN on reads makes the client leave", async () => {
  const socket = daemon.file("nbdkit-error.sock");
  const args = [
    "--foreground",
    "--unix",
    socket,
    "--filter=error",
    "memory",
    "16M",
    "error-pwrite=ENOSPC",
    "error-pwrite-rate=100%",
    "error-pread=ESHUTDOWN",
    "error-pread-rate=100%",
  ];
  const server = await startServer("nbdkit", args, socket);
  try {
    const client = await connect(`nbd+unix:///?socket=${socket}`);
    try {
      await expectCode(
        client.writeAsync(0, Buffer.alloc(4096, 1)),
        "NO_SPACE",
        /WRITE of 4096 bytes at offset 0: ENOSPC/,
      );
      await expectCode(client.writeAsync(8192, Buffer.alloc(512, 1)), "NO_SPACE");
      if (client.canFlush) await client.flushAsync(); // not failed by the filter: the connection is fine
      await expectCode(client.readAsync(0, 4096), "SHUTTING_DOWN", /ESHUTDOWN \(108\)/);
      await expectCode(client.readAsync(0, 512), "SHUTTING_DOWN", /being closed/);
    } finally {
      await client.close();
    }
    assert.ok(client.failure !== null);
  } finally {
    server.kill();
    await server.done;
  }
});

test("a server that is not there: a clear IO_ERROR with a hint", async () => {
  const err = await expectCode(
    connect(`nbd+unix:///x?socket=${daemon.file("absent.sock")}`),
    "IO_ERROR",
    /cannot connect/,
  );
  assert.match(err.hint ?? "", /is the server running/);
  await expectCode(connect("nbd://127.0.0.1:1/x"), "IO_ERROR", /cannot connect to NBD server 127\.0\.0\.1:1/);
});
