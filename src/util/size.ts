/**
 * Sizes as people write them and as vdisk prints them.
 *
 * Units are binary, always: K = KiB = 1024 bytes, as in qemu-img and `truncate`. A size is a decimal number
 * with an optional unit letter (K, M, G, T, P, case-insensitive) and an optional "B" or "iB" after it, with
 * optional blanks between; a bare number is bytes. Fractions are allowed when they come out as whole bytes
 * ("1.5G"). Every rejection is a VdiskError BAD_SIZE that says what was wrong and what to write instead.
 * Disk sizes additionally must be multiples of 512 within limits.diskBytesMin..diskBytesMax.
 */
import { VdiskError } from "../errors";
import { diskBytesAlignment, diskBytesMax, diskBytesMin } from "../limits";

const unitShifts: Record<string, number> = { "": 0, k: 10, m: 20, g: 30, t: 40, p: 50 };
const sizePattern = /^(\d+(?:\.\d+)?|\.\d+)\s*([kmgtp]?)(i?b)?$/i;
const sizeHint =
  "write bytes or a number with a unit K, M, G, T or P (binary: 1K = 1024), e.g. 20G, 512M, 1.5T";

/** Parse "20G", "20GiB", "512m", "4096", "1.5G" into bytes. */
export function parseSize(input: string | number): number {
  if (typeof input === "number") return checkBytes(input, String(input));
  const text = input.trim();
  if (text === "") throw new VdiskError("BAD_SIZE", "the size is empty", { hint: sizeHint });
  if (text.startsWith("-")) {
    throw new VdiskError("BAD_SIZE", `"${text}" is negative; sizes cannot be`, { hint: sizeHint });
  }
  const match = sizePattern.exec(text);
  if (!match) throw new VdiskError("BAD_SIZE", `"${text}" is not a size`, { hint: sizeHint });
  const [, digits, unit, suffix] = match;
  if (unit === "" && suffix !== undefined && suffix.toLowerCase() === "ib") {
    throw new VdiskError("BAD_SIZE", `"${text}" has "iB" without a unit letter`, { hint: sizeHint });
  }
  const shift = unitShifts[unit.toLowerCase()];
  return checkBytes(Number(digits) * 2 ** shift, text);
}

function checkBytes(bytes: number, text: string): number {
  if (!Number.isFinite(bytes) || bytes < 0) {
    throw new VdiskError("BAD_SIZE", `"${text}" is not a size`, { hint: sizeHint });
  }
  if (bytes > Number.MAX_SAFE_INTEGER) {
    throw new VdiskError("BAD_SIZE", `"${text}" is too large to be a size`, {
      hint: `the largest disk is ${formatSize(diskBytesMax)}`,
    });
  }
  if (!Number.isInteger(bytes)) {
    throw new VdiskError("BAD_SIZE", `"${text}" is not a whole number of bytes (${bytes})`, {
      hint: `write a whole number of bytes, e.g. ${Math.ceil(bytes)}`,
    });
  }
  return bytes;
}

/** Check that a byte count is a valid disk size: aligned to 512 and within the limits. */
export function checkDiskSize(bytes: number): number {
  if (bytes < diskBytesMin) {
    throw new VdiskError("BAD_SIZE", `a disk of ${formatSize(bytes)} is too small`, {
      hint: `disks are at least ${formatSize(diskBytesMin)}`,
    });
  }
  if (bytes > diskBytesMax) {
    throw new VdiskError("BAD_SIZE", `a disk of ${formatSize(bytes)} is too large`, {
      hint: `disks are at most ${formatSize(diskBytesMax)}`,
    });
  }
  if (bytes % diskBytesAlignment !== 0) {
    const up = roundUpToAlignment(bytes);
    throw new VdiskError(
      "BAD_SIZE",
      `a disk size must be a multiple of ${diskBytesAlignment} bytes, not ${bytes}`,
      {
        hint: `use ${up} (${formatSize(up)}) instead`,
      },
    );
  }
  return bytes;
}

/** parseSize, then checkDiskSize. */
export function parseDiskSize(input: string | number): number {
  return checkDiskSize(parseSize(input));
}

export function roundUpToAlignment(bytes: number): number {
  return Math.ceil(bytes / diskBytesAlignment) * diskBytesAlignment;
}

const unitNames = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];

/** 8589934592 → "8 GiB"; 1610612736 → "1.5 GiB"; 1000 → "1000 B". At most two decimals. */
export function formatSize(bytes: number): string {
  let unitIndex = 0;
  while (unitIndex < unitNames.length - 1 && Math.abs(bytes) >= 2 ** (10 * (unitIndex + 1))) unitIndex += 1;
  const value = bytes / 2 ** (10 * unitIndex);
  const text = unitIndex === 0 ? String(value) : value.toFixed(2).replace(/\.?0+$/, "");
  return `${text} ${unitNames[unitIndex]}`;
}

/** Bytes per second, e.g. "512 MiB/s". */
export function formatRate(bytesPerSecond: number): string {
  return `${formatSize(Math.round(bytesPerSecond))}/s`;
}
