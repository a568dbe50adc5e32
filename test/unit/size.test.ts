/**
 * Sizes: parsing of what people type (binary units, optional B/iB, fractions that come out whole) and the
 * checks on disk sizes (multiples of 512 within the limits); every rejection is BAD_SIZE with a hint.
 */
import { test } from "node:test";
import * as assert from "node:assert/strict";
import { VdiskError } from "../../src/errors";
import { diskBytesMax, GiB, KiB, MiB, TiB } from "../../src/limits";
import { checkDiskSize, formatRate, formatSize, parseDiskSize, parseSize } from "../../src/util/size";

function assertBadSize(input: string | number, pattern: RegExp): void {
  assert.throws(
    () => parseDiskSize(input),
    (err: unknown) => {
      assert.ok(err instanceof VdiskError, "a VdiskError");
      assert.equal(err.code, "BAD_SIZE");
      assert.match(err.message, pattern);
      assert.ok(err.hint !== undefined && err.hint.length > 0, "has a hint");
      return true;
    },
  );
}

test("plain numbers are bytes", () => {
  assert.equal(parseSize("4096"), 4096);
  assert.equal(parseSize("0"), 0);
  assert.equal(parseSize(" 512 "), 512);
  assert.equal(parseSize("512B"), 512);
  assert.equal(parseSize(1024), 1024);
});

test("units are binary, case-insensitive, with optional B or iB", () => {
  for (const text of ["20G", "20g", "20GB", "20GiB", "20gib", "20 GiB", "20 g"])
    assert.equal(parseSize(text), 20 * GiB, text);
  assert.equal(parseSize("512M"), 512 * MiB);
  assert.equal(parseSize("1T"), TiB);
  assert.equal(parseSize("4k"), 4 * KiB);
  assert.equal(parseSize("1P"), 1024 * TiB);
});

test("fractions are fine when they come out as whole bytes", () => {
  assert.equal(parseSize("1.5G"), 1.5 * GiB);
  assert.equal(parseSize("0.5K"), 512);
  assert.equal(parseSize(".5M"), 512 * KiB);
  assert.throws(() => parseSize("1.1K"), /not a whole number of bytes/);
});

test("garbage is refused with a hint", () => {
  for (const text of ["", "  ", "G", "20X", "twenty", "20GG", "1e9", "0x10", "20iB", "1,5G", "--5"]) {
    assert.throws(
      () => parseSize(text),
      (err: unknown) => err instanceof VdiskError && err.code === "BAD_SIZE" && err.hint !== undefined,
      JSON.stringify(text),
    );
  }
  assert.throws(() => parseSize("-1G"), /negative/);
  assert.throws(() => parseSize(-512), /not a size/);
  assert.throws(() => parseSize(Number.NaN), /not a size/);
});

test("disk sizes are multiples of 512 within the limits", () => {
  assert.equal(parseDiskSize("8G"), 8 * GiB);
  assert.equal(parseDiskSize("512"), 512);
  assert.equal(checkDiskSize(diskBytesMax), diskBytesMax);
  assertBadSize("1000", /multiple of 512/);
  assertBadSize("0", /too small/);
  assertBadSize("256", /too small/);
  assertBadSize("5P", /too large/);
  assertBadSize("9999999P", /too large/);
  assert.throws(
    () => parseDiskSize("1000"),
    (err: unknown) => err instanceof VdiskError && /1024/.test(err.hint ?? ""),
  );
});

test("formatSize picks the largest binary unit, at most two decimals", () => {
  assert.equal(formatSize(0), "0 B");
  assert.equal(formatSize(1023), "1023 B");
  assert.equal(formatSize(1024), "1 KiB");
  assert.equal(formatSize(8 * GiB), "8 GiB");
  assert.equal(formatSize(1.5 * GiB), "1.5 GiB");
  assert.equal(formatSize(20 * MiB + 512), "20 MiB");
  assert.equal(formatSize(TiB + 256 * GiB), "1.25 TiB");
  assert.equal(formatSize(4 * 1024 * TiB), "4 PiB");
  assert.equal(formatRate(100 * MiB), "100 MiB/s");
});

test("formatSize and parseSize round-trip on unit multiples", () => {
  for (const bytes of [512, 4 * KiB, 1.5 * GiB, 8 * GiB, 3 * TiB]) {
    assert.equal(parseSize(formatSize(bytes)), bytes);
  }
});
