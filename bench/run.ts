/**
 * `npm run bench`: the same fio workloads (fio's nbd engine, over a Unix socket) against vdisk and its
 * peers in one run, side by side, with ratios. Performance claims come from here, never from tests.
 *
 * Servers (each starts on an empty disk and is filled with one pseudo-random raw image through itself,
 * over NBD, so every server's page cache is filled by its own writes — see ../shared/ANCHORS.md for why
 * how the page cache was filled matters so much to 4 KiB writes):
 *   vdisk raw            `vdisk serve`, a raw disk filled over NBD by qemu-img convert
 *   vdisk image          the same with a vdisk-format (copy-on-write) disk
 *   qemu-nbd raw         qemu-nbd -f raw -t -e 8 --cache=writeback --aio=threads
 *   qemu-nbd io_uring    same with --aio=io_uring
 *   qemu-nbd qcow2       qemu-nbd on a qcow2 copy (the peer of the vdisk image)
 *   nbdkit file          nbdkit file plugin
 * Rows: 4 KiB random read QD1 and QD32, 4 KiB random write QD32, 64 KiB sequential read QD8,
 * 1 MiB sequential write QD8. Each figure is the median of BENCH_RUNS runs.
 *
 * Environment: BENCH_SIZE (default 4G), BENCH_SECONDS (10), BENCH_RAMP (2), BENCH_RUNS (3),
 * BENCH_SERVERS (comma list of ids to run), BENCH_ROWS (comma list of row ids), BENCH_DIR (scratch dir),
 * BENCH_SECTIONS ("servers,image" by default; image = snapshot chains, snapshot timings, index size — see
 * image.ts), BENCH_KEEP=1 keeps the scratch dir (daemon logs) for a post-mortem.
 * Results: a table on stdout and JSON in bench/results/<timestamp>.json with the machine's description.
 */
import { spawn } from "node:child_process";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import { parseSize } from "../src/util/size";
import { printImageResults, runImageBench, type ImageBenchResults } from "./image";
import { type Row, describeMachine, env, fio, format, median, run, stopChild, waitForSocket } from "./common";

const root = path.resolve(__dirname, "..", "..");
const vdiskBin = path.join(root, "bin", "vdisk");

const ROWS: Row[] = [
  { id: "randread-4k-qd1", label: "4K rand read QD1", rw: "randread", bs: "4k", iodepth: 1, unit: "IOPS" },
  { id: "randread-4k-qd32", label: "4K rand read QD32", rw: "randread", bs: "4k", iodepth: 32, unit: "IOPS" },
  {
    id: "randwrite-4k-qd32",
    label: "4K rand write QD32",
    rw: "randwrite",
    bs: "4k",
    iodepth: 32,
    unit: "IOPS",
  },
  { id: "read-64k-qd8", label: "64K seq read QD8", rw: "read", bs: "64k", iodepth: 8, unit: "GB/s" },
  { id: "write-1m-qd8", label: "1M seq write QD8", rw: "write", bs: "1m", iodepth: 8, unit: "GB/s" },
];

/**
 * A server under test. `start` serves an EMPTY disk of `sizeBytes` (backed by a file under `scratch`);
 * the harness then fills it with the master image through that very server (qemu-img convert over NBD),
 * so every server's page cache is filled the same way, by its own writes.
 */
interface Server {
  id: string;
  label: string;
  start(
    sizeBytes: number,
    socket: string,
    scratch: string,
  ): Promise<{ uri: string; stop: () => Promise<void> }>;
}

function emptyRaw(scratch: string, id: string, sizeBytes: number): string {
  const file = path.join(scratch, `${id}.raw`);
  fs.closeSync(fs.openSync(file, "w"));
  fs.truncateSync(file, sizeBytes);
  return file;
}

function qemuNbd(id: string, label: string, aio: string): Server {
  return {
    id,
    label,
    async start(sizeBytes, socket, scratch) {
      const image = emptyRaw(scratch, id, sizeBytes);
      const child = spawn(
        "qemu-nbd",
        ["-f", "raw", "-t", "-e", "8", "--cache=writeback", `--aio=${aio}`, "-k", socket, image],
        { stdio: "ignore" },
      );
      await waitForSocket(socket, child, "qemu-nbd");
      return {
        uri: `nbd+unix:///?socket=${socket}`,
        stop: async () => {
          await stopChild(child);
          fs.rmSync(image, { force: true });
        },
      };
    },
  };
}

function vdiskServer(id: string, label: string, format: "raw" | "vdisk"): Server {
  return {
    id,
    label,
    async start(sizeBytes, socket, scratch) {
      const home = path.join(scratch, `${id}-home`);
      const child = spawn(
        process.execPath,
        [vdiskBin, "serve", "--home", home, "--listen", "none", "--http", "none", "--socket", socket],
        { stdio: ["ignore", "ignore", fs.openSync(path.join(scratch, `${id}.log`), "a")] },
      );
      await waitForSocket(path.join(home, "run", "daemon.json"), child, "vdisk serve");
      run(process.execPath, [
        vdiskBin,
        "create",
        "--home",
        home,
        "bench",
        "--size",
        String(sizeBytes),
        "--format",
        format,
      ]);
      const uri = `nbd+unix:///bench?socket=${socket}`;
      return {
        uri,
        stop: async () => {
          await stopChild(child);
          fs.rmSync(home, { recursive: true, force: true });
        },
      };
    },
  };
}

const SERVERS: Server[] = [
  vdiskServer("vdisk", "vdisk raw", "raw"),
  vdiskServer("vdisk-image", "vdisk image", "vdisk"),
  qemuNbd("qemu-nbd", "qemu-nbd raw (threads)", "threads"),
  qemuNbd("qemu-nbd-uring", "qemu-nbd raw io_uring", "io_uring"),
  {
    id: "qemu-nbd-qcow2",
    label: "qemu-nbd qcow2",
    async start(sizeBytes, socket, scratch) {
      const qcow2 = path.join(scratch, "bench.qcow2");
      run("qemu-img", ["create", "-q", "-f", "qcow2", qcow2, String(sizeBytes)]);
      const child = spawn(
        "qemu-nbd",
        ["-f", "qcow2", "-t", "-e", "8", "--cache=writeback", "--aio=threads", "-k", socket, qcow2],
        { stdio: "ignore" },
      );
      await waitForSocket(socket, child, "qemu-nbd");
      return {
        uri: `nbd+unix:///?socket=${socket}`,
        stop: async () => {
          await stopChild(child);
          fs.rmSync(qcow2, { force: true });
        },
      };
    },
  },
  {
    id: "nbdkit",
    label: "nbdkit file",
    async start(sizeBytes, socket, scratch) {
      const image = emptyRaw(scratch, "nbdkit", sizeBytes);
      const child = spawn("nbdkit", ["--foreground", "--unix", socket, "file", `file=${image}`], {
        stdio: "ignore",
      });
      await waitForSocket(socket, child, "nbdkit");
      return {
        uri: `nbd+unix:///?socket=${socket}`,
        stop: async () => {
          await stopChild(child);
          fs.rmSync(image, { force: true });
        },
      };
    },
  },
];

async function main(): Promise<void> {
  const size = parseSize(env("BENCH_SIZE", "4G"));
  const seconds = Number(env("BENCH_SECONDS", "10"));
  const ramp = Number(env("BENCH_RAMP", "2"));
  const runs = Number(env("BENCH_RUNS", "3"));
  const serverFilter = process.env.BENCH_SERVERS?.split(",");
  const rowFilter = process.env.BENCH_ROWS?.split(",");
  const sections = env("BENCH_SECTIONS", "servers,image").split(",");
  const servers = SERVERS.filter(
    (s) => sections.includes("servers") && (!serverFilter || serverFilter.includes(s.id)),
  );
  let imageResults: ImageBenchResults | null = null;
  const rows = ROWS.filter((r) => !rowFilter || rowFilter.includes(r.id));
  const scratch = fs.mkdtempSync(path.join(process.env.BENCH_DIR ?? os.tmpdir(), "vdisk-bench-"));
  console.log(
    `vdisk bench: ${servers.length} servers × ${rows.length} rows × ${runs} runs of ${seconds}s, image ${size} bytes`,
  );

  const master = path.join(scratch, "master.raw");
  run("fio", [
    "--name=fill",
    `--filename=${master}`,
    "--rw=write",
    "--bs=1m",
    `--size=${size}`,
    "--output=/dev/null",
  ]);

  const results: Record<
    string,
    Record<string, { median: number; runs: number[]; latencyUsMean: number }>
  > = {};
  try {
    for (const server of servers) {
      const socket = path.join(scratch, `${server.id}.sock`);
      process.stdout.write(`${server.label}: starting... `);
      const { uri, stop } = await server.start(size, socket, scratch);
      // Fill it through the server itself: every server's page cache is then filled by its own writes.
      run("qemu-img", ["convert", "-n", "-f", "raw", "-O", "raw", "-W", master, uri]);
      results[server.id] = {};
      try {
        for (const row of rows) {
          const values: number[] = [];
          const latencies: number[] = [];
          for (let i = 0; i < runs; i++) {
            const m = fio(uri, row, seconds, ramp, path.join(scratch, "fio.json"));
            values.push(m.value);
            latencies.push(m.latencyUsMean);
          }
          (results[server.id] as Record<string, unknown>)[row.id] = {
            median: median(values),
            runs: values,
            latencyUsMean: median(latencies),
          };
          process.stdout.write(`${row.id}=${format(median(values), row.unit)} `);
        }
      } finally {
        await stop();
      }
      process.stdout.write("\n");
    }
    if (sections.includes("image")) {
      console.log("image section: snapshot chains, snapshot timings, index size");
      imageResults = await runImageBench({ scratch, master, sizeBytes: size, seconds, ramp, runs, vdiskBin });
    }
  } finally {
    if (process.env.BENCH_KEEP) console.log(`scratch kept: ${scratch}`);
    else fs.rmSync(scratch, { recursive: true, force: true });
  }

  // Table: each server's figure, then vdisk / qemu-nbd and vdisk / best peer.
  const header = [
    "row",
    ...servers.map((s) => s.label),
    "vdisk/qemu-nbd",
    "vdisk/best peer",
    "image/qcow2",
    "image/best peer",
  ];
  const lines = [header];
  for (const row of rows) {
    const cells = [row.label];
    for (const server of servers) {
      const r = results[server.id]?.[row.id];
      cells.push(r ? format(r.median, row.unit) : "-");
    }
    const figure = (id: string): number | undefined => results[id]?.[row.id]?.median;
    const peers = servers.filter((s) => !s.id.startsWith("vdisk")).map((s) => figure(s.id) ?? 0);
    const best = Math.max(0, ...peers);
    const ratio = (a: number | undefined, b: number | undefined): string =>
      a && b ? `${(a / b).toFixed(2)}×` : "-";
    cells.push(ratio(figure("vdisk"), figure("qemu-nbd")));
    cells.push(ratio(figure("vdisk"), best));
    cells.push(ratio(figure("vdisk-image"), figure("qemu-nbd-qcow2")));
    cells.push(ratio(figure("vdisk-image"), best));
    lines.push(cells);
  }
  const widths = header.map((_, i) => Math.max(...lines.map((l) => (l[i] ?? "").length)));
  console.log();
  for (const line of lines) console.log(line.map((cell, i) => cell.padEnd(widths[i] as number)).join("  "));

  if (imageResults) printImageResults(imageResults);

  const out = {
    date: new Date().toISOString(),
    machine: describeMachine(),
    settings: { sizeBytes: size, seconds, ramp, runs },
    servers: servers.map((s) => ({ id: s.id, label: s.label })),
    rows,
    results,
    image: imageResults,
  };
  const file = path.join(root, "bench", "results", `${out.date.replace(/[:.]/g, "-")}.json`);
  fs.mkdirSync(path.dirname(file), { recursive: true });
  fs.writeFileSync(file, JSON.stringify(out, null, 2) + "\n");
  console.log(`\nresults: ${path.relative(process.cwd(), file)}`);
}

main().catch((err) => {
  console.error(`bench failed: ${err instanceof Error ? err.message : String(err)}`);
  process.exit(1);
});
