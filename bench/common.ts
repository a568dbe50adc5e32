/**
 * Helpers shared by the benchmark sections: starting and stopping servers, running fio (nbd engine)
 * and reading its JSON, medians and formatting, and a description of the machine for the results file.
 */
import { spawnSync, type ChildProcess } from "node:child_process";
import * as fs from "node:fs";
import * as os from "node:os";

export interface Row {
  id: string;
  label: string;
  rw: string;
  bs: string;
  iodepth: number;
  unit: "IOPS" | "GB/s";
}

export function env(name: string, fallback: string): string {
  return process.env[name] ?? fallback;
}

export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

export async function waitForSocket(socket: string, child: ChildProcess, what: string): Promise<void> {
  for (let i = 0; i < 300; i++) {
    if (fs.existsSync(socket)) return;
    if (child.exitCode !== null) throw new Error(`${what} exited with ${child.exitCode}`);
    await sleep(100);
  }
  throw new Error(`${what} did not create ${socket}`);
}

export function stopChild(child: ChildProcess): Promise<void> {
  return new Promise((resolve) => {
    if (child.exitCode !== null || child.signalCode !== null) return resolve();
    const timer = setTimeout(() => child.kill("SIGKILL"), 15_000);
    child.once("exit", () => {
      clearTimeout(timer);
      resolve();
    });
    child.kill("SIGTERM");
  });
}

export function run(command: string, args: string[]): string {
  const result = spawnSync(command, args, { encoding: "utf8", maxBuffer: 64 * 1024 * 1024 });
  if (result.status !== 0) {
    throw new Error(`${command} ${args.join(" ")} failed (${result.status}): ${result.stderr}`);
  }
  return result.stdout;
}

export interface Measurement {
  value: number;
  latencyUsMean: number;
}

export function fio(uri: string, row: Row, seconds: number, ramp: number, output: string): Measurement {
  run("fio", [
    "--name=bench",
    "--ioengine=nbd",
    `--uri=${uri}`,
    `--rw=${row.rw}`,
    `--bs=${row.bs}`,
    `--iodepth=${row.iodepth}`,
    "--time_based",
    `--runtime=${seconds}`,
    `--ramp_time=${ramp}`,
    "--norandommap",
    "--randrepeat=0",
    "--output-format=json",
    `--output=${output}`,
  ]);
  const report = JSON.parse(fs.readFileSync(output, "utf8"));
  const job = report.jobs[0];
  const side = row.rw.includes("write") ? job.write : job.read;
  const value = row.unit === "IOPS" ? side.iops : side.bw_bytes / 1e9;
  return { value, latencyUsMean: side.lat_ns.mean / 1000 };
}

export function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.floor(sorted.length / 2)] as number;
}

export function format(value: number, unit: Row["unit"]): string {
  return unit === "IOPS" ? `${(value / 1000).toFixed(1)}k` : `${value.toFixed(2)} GB/s`;
}

export function describeMachine(): Record<string, unknown> {
  const version = (command: string, args: string[]): string => {
    const result = spawnSync(command, args, { encoding: "utf8" });
    return (result.stdout || result.stderr || "").split("\n")[0]?.trim() ?? "";
  };
  return {
    cpus: os.cpus().length,
    cpuModel: os.cpus()[0]?.model,
    memoryBytes: os.totalmem(),
    kernel: os.release(),
    node: process.version,
    fio: version("fio", ["--version"]),
    qemuNbd: version("qemu-nbd", ["--version"]),
    nbdkit: version("nbdkit", ["--version"]),
  };
}
