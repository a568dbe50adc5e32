/**
 * qemu-img as a helper for formats vdisk does not parse itself (qcow2, and whatever else qemu-img reads).
 *
 * Import and export of such images go through the product: the daemon runs
 * `qemu-img convert -n -O raw FILE nbd+unix:///NAME?socket=...` (or the reverse) against its own NBD server,
 * so the data takes the same path as a VM's. This module only runs qemu-img: `info` to learn an image's
 * format and virtual size, `convert` with progress (-p), and says plainly when qemu-img is not installed.
 * Every run is bounded: `info` by a timeout, `convert` by the job (which kills it on shutdown).
 */
import { type ChildProcess, execFile, spawn } from "node:child_process";
import * as path from "node:path";
import { VdiskError } from "../errors";

export const qemuImg = "qemu-img";
const infoTimeoutMs = 30_000;
/** Keep at most this much of qemu-img's stderr for error messages. */
const stderrBytesMax = 8 * 1024;
/** The first bytes of every qcow2 image: "QFI\xfb". */
export const qcow2Magic = Buffer.from([0x51, 0x46, 0x49, 0xfb]);

export function toolMissing(what: string): VdiskError {
  return new VdiskError("TOOL_MISSING", `qemu-img is not installed; it is needed to ${what}`, {
    hint: "install it (Debian/Ubuntu: apt install qemu-utils; Fedora: dnf install qemu-img), or use raw images",
  });
}

function isMissing(err: unknown): boolean {
  return (err as NodeJS.ErrnoException | null)?.code === "ENOENT";
}

/** The last meaningful line of qemu-img's stderr, without the "qemu-img: " prefix. */
function reason(stderr: string): string {
  const lines = stderr
    .split("\n")
    .map((line) => line.trim())
    .filter((line) => line !== "");
  return (lines[lines.length - 1] ?? "no error message").replace(/^qemu-img: /, "");
}

export interface ImageFileInfo {
  format: string;
  virtualSize: number;
}

/** `qemu-img info --output=json [-f format] FILE`. */
export function qemuImgInfo(file: string, format?: string): Promise<ImageFileInfo> {
  const args = ["info", "--output=json", ...(format ? ["-f", format] : []), file];
  return new Promise((resolve, reject) => {
    execFile(
      qemuImg,
      args,
      { timeout: infoTimeoutMs, maxBuffer: 16 * 1024 * 1024 },
      (err, stdout, stderr) => {
        if (err && isMissing(err)) return reject(toolMissing(`read ${path.basename(file)}`));
        if (err) {
          return reject(
            new VdiskError("BAD_REQUEST", `qemu-img cannot read ${path.basename(file)}: ${reason(stderr)}`, {
              hint: format
                ? `is it really a ${format} image? --format auto lets qemu-img detect the format`
                : "give an image file qemu-img can open (qemu-img info FILE)",
            }),
          );
        }
        try {
          const parsed = JSON.parse(stdout) as { format?: unknown; "virtual-size"?: unknown };
          if (typeof parsed.format !== "string" || typeof parsed["virtual-size"] !== "number") {
            throw new Error("format or virtual-size missing");
          }
          resolve({ format: parsed.format, virtualSize: parsed["virtual-size"] });
        } catch (parseErr) {
          reject(
            new VdiskError("INTERNAL", `qemu-img info answered something unexpected: ${String(parseErr)}`, {
              hint: "check the qemu-img version (qemu-img --version)",
            }),
          );
        }
      },
    );
  });
}

/** A running qemu-img convert. `done` rejects with a VdiskError when it fails or is killed. */
export interface Conversion {
  done: Promise<void>;
  kill(): void;
}

/** `qemu-img convert -p ARGS`; `onProgress` receives the fraction done (0..1). */
export function qemuImgConvert(args: string[], onProgress: (fraction: number) => void): Conversion {
  let child: ChildProcess;
  let killed = false;
  const done = new Promise<void>((resolve, reject) => {
    child = spawn(qemuImg, ["convert", "-p", ...args], { stdio: ["ignore", "pipe", "pipe"] });
    let stderr = "";
    child.stdout?.on("data", (chunk: Buffer) => {
      const matches = [...chunk.toString("latin1").matchAll(/\((\d+(?:\.\d+)?)\/100%\)/g)];
      const last = matches[matches.length - 1];
      if (last) onProgress(Math.min(1, Number(last[1]) / 100));
    });
    child.stderr?.on("data", (chunk: Buffer) => {
      stderr = (stderr + chunk.toString("utf8")).slice(-stderrBytesMax);
    });
    child.on("error", (err) => {
      reject(isMissing(err) ? toolMissing("convert this image") : err);
    });
    child.on("close", (code, signal) => {
      if (code === 0) return resolve();
      if (killed) {
        return reject(
          new VdiskError(
            "SHUTTING_DOWN",
            "qemu-img convert was stopped because the daemon is shutting down",
            {
              hint: "run it again once the daemon is back",
            },
          ),
        );
      }
      reject(
        new VdiskError(
          "IO_ERROR",
          `qemu-img convert failed (${signal ?? `exit status ${code}`}): ${reason(stderr)}`,
          { hint: "the daemon's log and qemu-img's message above say more" },
        ),
      );
    });
  });
  return {
    done,
    kill: () => {
      killed = true;
      if (child && child.exitCode === null && child.signalCode === null) child.kill("SIGTERM");
    },
  };
}
