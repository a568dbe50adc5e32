/**
 * The image section of `npm run bench`: what the copy-on-write format costs and where it beats qcow2.
 *
 * - Random 4 KiB reads (fio, nbd engine, QD1 and QD32) of data at the bottom of a snapshot chain of
 *   depth 1, 64 and 256, served by vdisk, next to qemu-nbd on a qcow2 backing chain of depth 1 and 64.
 *   Every layer of both chains gets 1 MiB of its own writes, so no layer is empty.
 * - Snapshot create time (API round trip, median and worst of 20) on a fully written disk, idle and
 *   while fio writes to it; snapshot delete time for a snapshot that alone holds 1 GiB.
 * - Index bytes for a 64 GiB disk written sequentially and for 1 GiB of random 4 KiB writes (each block
 *   once, on a 1 GiB disk and spread over an 8 GiB disk), measured in-process on an in-memory backing
 *   (written zeros cost no memory there; the index is the same as on a file).
 */
import { spawn } from "node:child_process";
import * as fs from "node:fs";
import * as http from "node:http";
import * as path from "node:path";
import { MemoryDevice } from "../src/devices/memory-device";
import { writeAsync } from "../src/devices/promises";
import { Image } from "../src/image/image";
import { ImageVolume } from "../src/image/volume";
import { Prng } from "../src/testing/prng";
import { type Row, fio, format, median, run, stopChild, waitForSocket } from "./common";

const GiB = 1024 ** 3;
const MiB = 1024 ** 2;

export interface ImageBenchSettings {
  scratch: string;
  master: string;
  sizeBytes: number;
  seconds: number;
  ramp: number;
  runs: number;
  vdiskBin: string;
}

export type ImageBenchResults = Record<string, unknown>;

const READ_ROWS: Row[] = [
  { id: "randread-4k-qd1", label: "4K rand read QD1", rw: "randread", bs: "4k", iodepth: 1, unit: "IOPS" },
  { id: "randread-4k-qd32", label: "4K rand read QD32", rw: "randread", bs: "4k", iodepth: 32, unit: "IOPS" },
];

function api(
  socket: string,
  method: string,
  route: string,
  body?: unknown,
): Promise<{ status: number; json: unknown }> {
  return new Promise((resolve, reject) => {
    const payload = body === undefined ? undefined : Buffer.from(JSON.stringify(body));
    const request = http.request(
      {
        socketPath: socket,
        agent: false, // a kept-alive socket may have been closed by the server while qemu-img ran
        method,
        path: route,
        headers: payload ? { "content-type": "application/json", "content-length": payload.length } : {},
      },
      (response) => {
        const chunks: Buffer[] = [];
        response.on("data", (chunk: Buffer) => chunks.push(chunk));
        response.on("end", () => {
          const text = Buffer.concat(chunks).toString("utf8");
          const status = response.statusCode ?? 0;
          let json: unknown = null;
          try {
            json = JSON.parse(text);
          } catch {
            json = text;
          }
          if (status >= 400) reject(new Error(`${method} ${route}: ${status} ${text}`));
          else resolve({ status, json });
        });
      },
    );
    request.on("error", (err) => reject(new Error(`${method} ${route}: ${err.message}`)));
    if (payload) request.write(payload);
    request.end();
  });
}

async function timed(action: () => Promise<unknown>): Promise<number> {
  const start = process.hrtime.bigint();
  await action();
  return Number(process.hrtime.bigint() - start) / 1e6;
}

function measure(uri: string, settings: ImageBenchSettings, row: Row): number {
  const values: number[] = [];
  for (let i = 0; i < settings.runs; i++) {
    values.push(
      fio(uri, row, settings.seconds, settings.ramp, path.join(settings.scratch, "fio.json")).value,
    );
  }
  return median(values);
}

/** Write 1 MiB of layer-specific data at a pseudo-random offset (qemu-io, over NBD or on a qcow2). */
function layerWrite(target: string, format: "raw" | "qcow2", layer: number, sizeBytes: number): void {
  const offset = (((layer * 2654435761) >>> 0) % Math.floor(sizeBytes / MiB)) * MiB;
  run("qemu-io", ["-f", format, "-c", `write -P ${layer % 250} ${offset} 1M`, target]);
}

export async function runImageBench(settings: ImageBenchSettings): Promise<ImageBenchResults> {
  const results: ImageBenchResults = {};
  const home = path.join(settings.scratch, "image-home");
  const nbdSocket = path.join(settings.scratch, "image.sock");
  const child = spawn(
    process.execPath,
    [settings.vdiskBin, "serve", "--home", home, "--listen", "none", "--http", "none", "--socket", nbdSocket],
    { stdio: ["ignore", "ignore", fs.openSync(path.join(settings.scratch, "image-daemon.log"), "a")] },
  );
  const apiSocket = path.join(home, "run", "api.sock");
  try {
    await waitForSocket(path.join(home, "run", "daemon.json"), child, "vdisk serve");
    const size = settings.sizeBytes;
    await api(apiSocket, "POST", "/v1/disks", { name: "chain", size, format: "vdisk" });
    const uri = `nbd+unix:///chain?socket=${nbdSocket}`;
    run("qemu-img", ["convert", "-n", "-f", "raw", "-O", "raw", "-W", settings.master, uri]);

    // Chains: vdisk at depth 1, 64, 256.
    const chain: Record<string, Record<string, number>> = {};
    let depth = 0;
    for (const target of [1, 64, 256]) {
      while (depth < target) {
        depth++;
        await api(apiSocket, "POST", "/v1/disks/chain/snapshots", { name: `c${depth}` });
        layerWrite(uri, "raw", depth, size);
      }
      chain[`vdisk depth ${target}`] = Object.fromEntries(
        READ_ROWS.map((row) => [row.id, measure(uri, settings, row)]),
      );
      process.stdout.write(
        `vdisk chain depth ${target}: ${JSON.stringify(chain[`vdisk depth ${target}`])}\n`,
      );
    }
    // qcow2 chains at depth 1 and 64.
    const base = path.join(settings.scratch, "chain-0.qcow2");
    run("qemu-img", ["convert", "-f", "raw", "-O", "qcow2", settings.master, base]);
    let top = base;
    let qdepth = 0;
    for (const target of [1, 64]) {
      while (qdepth < target) {
        qdepth++;
        const next = path.join(settings.scratch, `chain-${qdepth}.qcow2`);
        run("qemu-img", ["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", top, next]);
        layerWrite(next, "qcow2", qdepth, size);
        top = next;
      }
      const socket = path.join(settings.scratch, "qcow2.sock");
      const server = spawn(
        "qemu-nbd",
        ["-f", "qcow2", "-t", "-e", "8", "--cache=writeback", "-k", socket, top],
        {
          stdio: "ignore",
        },
      );
      try {
        await waitForSocket(socket, server, "qemu-nbd");
        const qemuUri = `nbd+unix:///?socket=${socket}`;
        chain[`qcow2 depth ${target}`] = Object.fromEntries(
          READ_ROWS.map((row) => [row.id, measure(qemuUri, settings, row)]),
        );
        process.stdout.write(
          `qcow2 chain depth ${target}: ${JSON.stringify(chain[`qcow2 depth ${target}`])}\n`,
        );
      } finally {
        await stopChild(server);
      }
    }
    for (let i = 0; i <= qdepth; i++)
      fs.rmSync(path.join(settings.scratch, `chain-${i}.qcow2`), { force: true });
    results.chain = chain;

    // Snapshot create: idle, then under a fio random-write load on the same disk.
    const idle: number[] = [];
    for (let i = 0; i < 20; i++) {
      idle.push(await timed(() => api(apiSocket, "POST", "/v1/disks/chain/snapshots", { name: `idle${i}` })));
    }
    const loaded: number[] = [];
    const load = spawn(
      "fio",
      [
        "--name=load",
        "--ioengine=nbd",
        `--uri=${uri}`,
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=16",
        "--time_based",
        "--runtime=60",
        "--output=/dev/null",
      ],
      { stdio: "ignore" },
    );
    await new Promise((resolve) => setTimeout(resolve, 2000));
    for (let i = 0; i < 20; i++) {
      loaded.push(
        await timed(() => api(apiSocket, "POST", "/v1/disks/chain/snapshots", { name: `load${i}` })),
      );
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
    load.kill("SIGTERM");
    await new Promise((resolve) => load.once("exit", resolve));
    results.snapshotCreateMs = {
      idleMedian: median(idle),
      idleMax: Math.max(...idle),
      underWriteLoadMedian: median(loaded),
      underWriteLoadMax: Math.max(...loaded),
    };

    // Snapshot delete of a snapshot that alone holds 1 GiB.
    await api(apiSocket, "POST", "/v1/disks", { name: "del", size: 2 * GiB, format: "vdisk" });
    const delUri = `nbd+unix:///del?socket=${nbdSocket}`;
    const fill = (pattern: number): void =>
      void run("fio", [
        "--name=fill",
        "--ioengine=nbd",
        `--uri=${delUri}`,
        "--rw=write",
        "--bs=1m",
        "--iodepth=8",
        "--size=1g",
        `--buffer_pattern=${pattern}`,
        "--output=/dev/null",
      ]);
    fill(0x11);
    await api(apiSocket, "POST", "/v1/disks/del/snapshots", { name: "holds1g" });
    fill(0x22); // the head now owns its own copy; holds1g alone references the first GiB
    await api(apiSocket, "POST", "/v1/disks/del/snapshots", { name: "after" });
    results.snapshotDeleteMs = {
      holding1GiB: await timed(() => api(apiSocket, "DELETE", "/v1/disks/del/snapshots/holds1g")),
    };
  } finally {
    await stopChild(child);
    fs.rmSync(home, { recursive: true, force: true });
  }

  results.indexBytes = await indexBytes();
  return results;
}

/** Index size after typical write patterns, in-process. */
export async function indexBytes(): Promise<
  Record<string, { dataBytes: number; indexBytes: number; percent: number }>
> {
  const out: Record<string, { dataBytes: number; indexBytes: number; percent: number }> = {};
  const zeros = Buffer.alloc(MiB);
  {
    const image = await Image.create(new MemoryDevice(80 * GiB), { name: "seq", sizeBytes: 64 * GiB });
    const volume = new ImageVolume(image, image.head("seq")!);
    for (let offset = 0; offset < 64 * GiB; offset += MiB) await writeAsync(volume, zeros, offset);
    await image.commit();
    const stats = image.layerStats(image.head("seq")!);
    out["64 GiB sequential"] = {
      dataBytes: stats.mappedBytes,
      indexBytes: stats.indexBytes,
      percent: (100 * stats.indexBytes) / stats.mappedBytes,
    };
  }
  for (const [label, diskBytes] of [
    ["1 GiB random 4K on a 1 GiB disk", GiB],
    ["1 GiB random 4K over an 8 GiB disk", 8 * GiB],
  ] as const) {
    const image = await Image.create(new MemoryDevice(24 * GiB), { name: "rnd", sizeBytes: diskBytes });
    const volume = new ImageVolume(image, image.head("rnd")!);
    const blocks = diskBytes / 4096;
    const prng = new Prng(42);
    // A random permutation of the disk's blocks, taking the first GiB's worth.
    const order = new Uint32Array(blocks);
    for (let i = 0; i < blocks; i++) order[i] = i;
    for (let i = blocks - 1; i > 0; i--) {
      const j = prng.int(i + 1);
      const t = order[i] as number;
      order[i] = order[j] as number;
      order[j] = t;
    }
    const block = zeros.subarray(0, 4096);
    const writes = GiB / 4096;
    for (let i = 0; i < writes; i += 64) {
      const batch: Array<Promise<void>> = [];
      for (let k = i; k < Math.min(writes, i + 64); k++)
        batch.push(writeAsync(volume, block, (order[k] as number) * 4096));
      await Promise.all(batch);
    }
    await image.settle(); // let the background regrouping copy full leaves into contiguous extents
    await image.commit();
    const stats = image.layerStats(image.head("rnd")!);
    out[label] = {
      dataBytes: stats.mappedBytes,
      indexBytes: stats.indexBytes,
      percent: (100 * stats.indexBytes) / stats.mappedBytes,
    };
  }
  return out;
}

export function printImageResults(results: ImageBenchResults): void {
  const chain = results.chain as Record<string, Record<string, number>> | undefined;
  if (chain) {
    console.log("\nReads at the bottom of a snapshot chain (fio nbd engine, 4 KiB random):");
    const base = chain["vdisk depth 1"];
    const qbase = chain["qcow2 depth 1"];
    for (const [label, figures] of Object.entries(chain)) {
      const reference = label.startsWith("vdisk") ? base : qbase;
      const cells = READ_ROWS.map((row) => {
        const value = figures[row.id] as number;
        const ratio = reference?.[row.id]
          ? ` (${(value / (reference[row.id] as number)).toFixed(2)}× depth 1)`
          : "";
        return `${row.label} ${format(value, row.unit)}${ratio}`;
      });
      console.log(`  ${label.padEnd(16)} ${cells.join("   ")}`);
    }
  }
  if (results.snapshotCreateMs)
    console.log(`Snapshot create (ms): ${JSON.stringify(results.snapshotCreateMs)}`);
  if (results.snapshotDeleteMs)
    console.log(`Snapshot delete (ms): ${JSON.stringify(results.snapshotDeleteMs)}`);
  const index = results.indexBytes as
    Record<string, { dataBytes: number; indexBytes: number; percent: number }> | undefined;
  if (index) {
    console.log("Index bytes:");
    for (const [label, figures] of Object.entries(index)) {
      console.log(
        `  ${label.padEnd(36)} ${figures.indexBytes} bytes for ${figures.dataBytes} bytes of data (${figures.percent.toFixed(4)} %)`,
      );
    }
  }
}
