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
 *
 * Unlike the main table, the chain points are measured one after another (median of `runs` runs each),
 * not interleaved: compare them with each other (the × depth 1 ratios), not with the main table.
 * The main table has the 64-deep vdisk chain and the 32-deep qcow2 chain with empty layers.
 */
import { spawn } from "node:child_process";
import * as fs from "node:fs";
import * as path from "node:path";
import { MemoryDevice } from "../src/devices/memory-device";
import { writeAsync } from "../src/devices/promises";
import { Image } from "../src/image/image";
import { ImageVolume } from "../src/image/volume";
import { Prng } from "../src/testing/prng";
import { type Row, ROWS, fio, format, median, run } from "./common";
import {
  type BenchContext,
  addQcow2Overlays,
  fillOverNbd,
  fillQcow2Base,
  startQemuNbd,
  startVdiskDaemon,
} from "./servers";

const GiB = 1024 ** 3;
const MiB = 1024 ** 2;

export interface ImageBenchSettings {
  seconds: number;
  ramp: number;
  runs: number;
}

export type ImageBenchResults = Record<string, unknown>;

const READ_ROWS: Row[] = ROWS.filter((row) => row.id === "randread-4k-qd1" || row.id === "randread-4k-qd32");

async function timed(action: () => Promise<unknown>): Promise<number> {
  const start = process.hrtime.bigint();
  await action();
  return Number(process.hrtime.bigint() - start) / 1e6;
}

async function measure(uri: string, dir: string, settings: ImageBenchSettings, row: Row): Promise<number> {
  const values: number[] = [];
  for (let i = 0; i < settings.runs; i++) {
    values.push((await fio(uri, row, settings.seconds, settings.ramp, path.join(dir, "fio.json"))).value);
  }
  return median(values);
}

async function measureReads(uri: string, dir: string, settings: ImageBenchSettings) {
  const figures: Record<string, number> = {};
  for (const row of READ_ROWS) figures[row.id] = await measure(uri, dir, settings, row);
  return figures;
}

/** Write 1 MiB of layer-specific data at a pseudo-random offset (qemu-io, over NBD or on a qcow2). */
function layerWrite(target: string, format: "raw" | "qcow2", layer: number, sizeBytes: number): void {
  const offset = (((layer * 2654435761) >>> 0) % Math.floor(sizeBytes / MiB)) * MiB;
  run("qemu-io", ["-f", format, "-c", `write -P ${layer % 250} ${offset} 1M`, target]);
}

export async function runImageBench(
  ctx: BenchContext,
  settings: ImageBenchSettings,
): Promise<ImageBenchResults> {
  const results: ImageBenchResults = {};
  const dir = path.join(ctx.scratch, "image");
  fs.mkdirSync(path.join(ctx.scratch, "logs"), { recursive: true });
  fs.mkdirSync(dir, { recursive: true });
  const daemon = await startVdiskDaemon(
    path.join(dir, "home"),
    path.join(dir, "nbd.sock"),
    path.join(ctx.scratch, "logs", "image-daemon.log"),
    ctx.vdiskArgs,
  );
  try {
    const size = ctx.sizeBytes;
    daemon.createDisk("chain", size, "vdisk", ctx.vdiskSet);
    const uri = daemon.diskUri("chain");
    await fillOverNbd(ctx.master, uri);

    // Chains: vdisk at depth 1, 64, 256.
    const chain: Record<string, Record<string, number>> = {};
    let depth = 0;
    for (const target of [1, 64, 256]) {
      while (depth < target) {
        depth++;
        await daemon.api("POST", "/v1/disks/chain/snapshots", { name: `c${depth}` });
        layerWrite(uri, "raw", depth, size);
      }
      chain[`vdisk depth ${target}`] = await measureReads(uri, dir, settings);
      process.stdout.write(
        `vdisk chain depth ${target}: ${JSON.stringify(chain[`vdisk depth ${target}`])}\n`,
      );
    }
    // qcow2 chains at depth 1 and 64: a base filled through qemu-nbd, then overlays.
    let top = path.join(dir, "base.qcow2");
    await fillQcow2Base(ctx, top, path.join(dir, "qcow2.sock"));
    let qdepth = 0;
    for (const target of [1, 64]) {
      top = addQcow2Overlays(top, dir, qdepth + 1, target, (file, layer) =>
        layerWrite(file, "qcow2", layer, size),
      );
      qdepth = target;
      const server = await startQemuNbd(top, "qcow2", "threads", path.join(dir, "qcow2.sock"));
      try {
        chain[`qcow2 depth ${target}`] = await measureReads(server.uri, dir, settings);
        process.stdout.write(
          `qcow2 chain depth ${target}: ${JSON.stringify(chain[`qcow2 depth ${target}`])}\n`,
        );
      } finally {
        await server.stop();
      }
    }
    for (const file of fs.readdirSync(dir).filter((name) => name.endsWith(".qcow2")))
      fs.rmSync(path.join(dir, file), { force: true });
    results.chain = chain;

    // Snapshot create: idle, then under a fio random-write load on the same disk.
    const idle: number[] = [];
    for (let i = 0; i < 20; i++) {
      idle.push(await timed(() => daemon.api("POST", "/v1/disks/chain/snapshots", { name: `idle${i}` })));
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
      loaded.push(await timed(() => daemon.api("POST", "/v1/disks/chain/snapshots", { name: `load${i}` })));
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
    daemon.createDisk("del", 2 * GiB, "vdisk", ctx.vdiskSet);
    const delUri = daemon.diskUri("del");
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
    await daemon.api("POST", "/v1/disks/del/snapshots", { name: "holds1g" });
    fill(0x22); // the head now owns its own copy; holds1g alone references the first GiB
    await daemon.api("POST", "/v1/disks/del/snapshots", { name: "after" });
    results.snapshotDeleteMs = {
      holding1GiB: await timed(() => daemon.api("DELETE", "/v1/disks/del/snapshots/holds1g")),
    };
  } finally {
    await daemon.stop();
    fs.rmSync(dir, { recursive: true, force: true });
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
