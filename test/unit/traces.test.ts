/**
 * Trace parsing (src/replay/traces.ts): the three real traces in test/fixtures/traces are parsed exactly —
 * record counts, reads and writes, byte totals, devices, span and the first and last records — plus small
 * synthetic files for each format: comments, blank lines, CRLF, a last line without newline, a header,
 * case-insensitive opcodes, FILETIME precision, --limit, detection, and malformed lines (each error names
 * the file, the line number and what was wrong).
 *
 * The expected values of the real files were computed independently of this code, with awk (and Python for
 * the MSR FILETIME difference, which is beyond 2^53), e.g. for the MQSim traces:
 *   awk 'NR==1{t0=$1; printf "first: t=%.0f dev=%d off=%.0f len=%.0f type=%d\n", $1-t0, $2, $3*512, $4*512, $5}
 *        {lt=$1-t0; ld=$2; lo=$3*512; ll=$4*512; ly=$5; n++; if($5==1){r++; rb+=$4*512} else {w++; wb+=$4*512};
 *         e=($3+$4)*512; if(e>max)max=e; d[$2]=1}
 *        END{printf "last: t=%.0f dev=%d off=%.0f len=%.0f type=%d n=%d r=%d w=%d rb=%.0f wb=%.0f max=%.0f\n",
 *            lt, ld, lo, ll, ly, n, r, w, rb, wb, max}' FILE
 *   awk -F, '{n++; if($4=="Read")r++; else w++; b+=$6; e=$5+$6; if(e>max)max=e} END{...}' msr-wdev_1.csv
 *   python3 -c 'print((128172360350201168 - 128166410318060999) * 100)'   # MSR span in ns
 * The MQSim traces are sorted by time (checked with awk), so the span is the last record's time.
 */
import { after, test } from "node:test";
import * as assert from "node:assert/strict";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import { VdiskError } from "../../src/errors";
import {
  RecordBatch,
  TraceReader,
  detectFormat,
  traceRecords,
  traceSummary,
  type TraceFormat,
  type TraceRecord,
} from "../../src/replay/traces";

const fixtures = path.resolve(__dirname, "..", "..", "..", "test", "fixtures", "traces");
const work = fs.mkdtempSync(path.join(os.tmpdir(), "vdisk-traces-"));

after(() => fs.rmSync(work, { recursive: true, force: true }));

function fixture(name: string): string {
  return path.join(fixtures, name);
}

function synthetic(name: string, text: string): string {
  const file = path.join(work, name);
  fs.writeFileSync(file, text);
  return file;
}

async function all(file: string, format?: TraceFormat | "auto", limit?: number): Promise<TraceRecord[]> {
  const records: TraceRecord[] = [];
  for await (const record of traceRecords(file, { format, limit })) records.push(record);
  return records;
}

async function rejectsWith(promise: Promise<unknown>, code: string, pattern: RegExp): Promise<void> {
  await assert.rejects(promise, (err: unknown) => {
    assert.ok(err instanceof VdiskError, `a VdiskError, got ${String(err)}`);
    assert.equal(err.code, code);
    assert.match(err.message, pattern);
    assert.ok(err.hint !== undefined && err.hint.length > 0, "with a hint");
    return true;
  });
}

interface Expected {
  file: string;
  format: TraceFormat;
  records: number;
  reads: number;
  writes: number;
  readBytes: number;
  writeBytes: number;
  spanNs: number;
  maxEndBytes: number;
  devices: number[];
  first: TraceRecord;
  last: TraceRecord;
}

const expectations: Expected[] = [
  {
    file: "mqsim-tpcc-small.trace",
    format: "disksim",
    records: 6999,
    reads: 4381,
    writes: 2618,
    readBytes: 36_315_136,
    writeBytes: 23_403_520,
    spanNs: 136_489_000,
    maxEndBytes: 232_713_410_560,
    devices: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15],
    // 938513000 4 264719034 16 0
    first: { timeNs: 0, device: 4, offsetBytes: 135_536_145_408, lengthBytes: 8192, op: "write" },
    // 1075002000 7 160057354 16 0
    last: { timeNs: 136_489_000, device: 7, offsetBytes: 81_949_365_248, lengthBytes: 8192, op: "write" },
  },
  {
    file: "mqsim-wsrch-small.trace",
    format: "disksim",
    records: 24_783, // the last line has no newline: wc -l says 24782
    reads: 24_779,
    writes: 4,
    readBytes: 382_085_120,
    writeBytes: 32_768,
    spanNs: 60_055_212_000,
    maxEndBytes: 17_902_723_072,
    devices: [0, 1, 2, 3, 4, 5],
    // 11413000 0 657728 16 1
    first: { timeNs: 0, device: 0, offsetBytes: 336_756_736, lengthBytes: 8192, op: "read" },
    // 60066625000 1 34371424 64 1
    last: { timeNs: 60_055_212_000, device: 1, offsetBytes: 17_598_169_088, lengthBytes: 32_768, op: "read" },
  },
  {
    file: "msr-wdev_1.csv",
    format: "msr",
    records: 1055,
    reads: 0,
    writes: 1055,
    readBytes: 0,
    writeBytes: 5_537_792,
    spanNs: 595_003_214_016_900,
    maxEndBytes: 54_620_086_272,
    devices: [1],
    // 128166410318060999,wdev,1,Write,3165323264,4096,1189
    first: { timeNs: 0, device: 1, offsetBytes: 3_165_323_264, lengthBytes: 4096, op: "write" },
    // 128172360350201168,wdev,1,Write,2675187712,61440,4718
    last: {
      timeNs: 595_003_214_016_900,
      device: 1,
      offsetBytes: 2_675_187_712,
      lengthBytes: 61_440,
      op: "write",
    },
  },
];

for (const expected of expectations) {
  test(`${expected.file}: every record, exactly`, async () => {
    const records = await all(fixture(expected.file));
    assert.equal(records.length, expected.records);
    assert.equal(records.filter((record) => record.op === "read").length, expected.reads);
    assert.equal(records.filter((record) => record.op === "write").length, expected.writes);
    assert.deepEqual(records[0], expected.first);
    assert.deepEqual(records[records.length - 1], expected.last);
    for (let index = 1; index < records.length; index++) {
      assert.ok(
        (records[index] as TraceRecord).timeNs >= (records[index - 1] as TraceRecord).timeNs,
        "sorted",
      );
    }
  });

  test(`${expected.file}: summary and detection`, async () => {
    const summary = await traceSummary(fixture(expected.file));
    assert.equal(summary.format, expected.format);
    assert.equal(summary.records, expected.records);
    assert.equal(summary.reads, expected.reads);
    assert.equal(summary.writes, expected.writes);
    assert.equal(summary.readBytes, expected.readBytes);
    assert.equal(summary.writeBytes, expected.writeBytes);
    assert.equal(summary.spanNs, expected.spanNs);
    assert.equal(summary.maxEndBytes, expected.maxEndBytes);
    assert.deepEqual(summary.devices, expected.devices);
    // The explicit format gives the same; a limit stops exactly there.
    const explicit = await traceSummary(fixture(expected.file), { format: expected.format, limit: 1000 });
    assert.equal(explicit.records, 1000);
    const limited = await all(fixture(expected.file), expected.format, 1000);
    assert.equal(limited.length, 1000);
    assert.deepEqual(limited[0], expected.first);
  });
}

test("a reader fills batches of its capacity and stops at the end", async () => {
  const reader = await TraceReader.open(fixture("mqsim-tpcc-small.trace"));
  const batch = new RecordBatch(1000);
  const counts: number[] = [];
  try {
    for (;;) {
      const count = await reader.read(batch);
      if (count === 0) break;
      counts.push(count);
    }
    assert.deepEqual(counts, [1000, 1000, 1000, 1000, 1000, 1000, 999]);
    assert.equal(reader.recordsRead, 6999);
    assert.equal(await reader.read(batch), 0, "the end stays the end");
  } finally {
    await reader.close();
  }
});

test("spc: fields, case-insensitive opcodes, comments, blank lines, CRLF, extra fields, no final newline", async () => {
  const file = synthetic(
    "small.spc",
    [
      "# a comment",
      "",
      "0,100,4096,r,0.5",
      "1,0,512,W,0.500001\r",
      "   ",
      "2,8,8192,R,1.25,extra,fields",
      "0, 16 ,0, w ,2.000000000",
    ].join("\n"),
  );
  assert.deepEqual(await all(file), [
    { timeNs: 0, device: 0, offsetBytes: 51_200, lengthBytes: 4096, op: "read" },
    { timeNs: 1000, device: 1, offsetBytes: 0, lengthBytes: 512, op: "write" },
    { timeNs: 750_000_000, device: 2, offsetBytes: 4096, lengthBytes: 8192, op: "read" },
    { timeNs: 1_500_000_000, device: 0, offsetBytes: 8192, lengthBytes: 0, op: "write" },
  ]);
  const summary = await traceSummary(file);
  assert.equal(summary.format, "spc");
  assert.equal(summary.records, 4);
  assert.equal(summary.reads, 2);
  assert.equal(summary.writes, 2);
  assert.equal(summary.spanNs, 1_500_000_000);
  assert.equal(summary.maxOffsetBytes, 51_200);
  assert.equal(summary.maxEndBytes, 55_296);
  assert.deepEqual(summary.devices, [0, 1, 2]);
});

test("spc: times before the first record are negative; the span covers them", async () => {
  const file = synthetic("unsorted.spc", "0,0,512,r,1.0\n0,1,512,r,0.25\n0,2,512,r,3\n");
  const records = await all(file);
  assert.deepEqual(
    records.map((record) => record.timeNs),
    [0, -750_000_000, 2_000_000_000],
  );
  assert.equal((await traceSummary(file)).spanNs, 2_750_000_000);
});

test("disksim: whitespace of any kind, 1 = read and 0 = write", async () => {
  const file = synthetic("small.disksim", "1000 0 8 8 1\n\n1500\t2\t0\t1\t0\r\n  2000   1 16 0 1  \n");
  assert.deepEqual(await all(file), [
    { timeNs: 0, device: 0, offsetBytes: 4096, lengthBytes: 4096, op: "read" },
    { timeNs: 500, device: 2, offsetBytes: 0, lengthBytes: 512, op: "write" },
    { timeNs: 1000, device: 1, offsetBytes: 8192, lengthBytes: 0, op: "read" },
  ]);
});

test("msr: FILETIME differences are exact beyond 2^53, a header line is skipped", async () => {
  const file = synthetic(
    "small.csv",
    [
      "Timestamp,Hostname,DiskNumber,Type,Offset,Size,ResponseTime",
      "128166372003061629,hm,0,Read,383496192,32768,1246",
      "128166372003061630,hm,0,Write,0,512,100",
      "128166372016382155,hm,2,Read,1024,4096,2000",
    ].join("\n"),
  );
  assert.deepEqual(await all(file), [
    { timeNs: 0, device: 0, offsetBytes: 383_496_192, lengthBytes: 32_768, op: "read" },
    { timeNs: 100, device: 0, offsetBytes: 0, lengthBytes: 512, op: "write" },
    // (128166372016382155 - 128166372003061629) * 100
    { timeNs: 1_332_052_600, device: 2, offsetBytes: 1024, lengthBytes: 4096, op: "read" },
  ]);
});

test("detection from the first data line", () => {
  assert.equal(detectFormat(["# c", "", "0,303567,3584,w,0.000000"]), "spc");
  assert.equal(detectFormat(["1,20941264,8192,W,0.551706"]), "spc");
  assert.equal(detectFormat(["11413000 0 657728 16 1"]), "disksim");
  assert.equal(detectFormat(["128166410318060999,wdev,1,Write,3165323264,4096,1189"]), "msr");
  assert.equal(detectFormat(["Timestamp,Hostname,DiskNumber,Type,Offset,Size,ResponseTime"]), "msr");
  assert.equal(detectFormat(["hello world"]), null);
  assert.equal(detectFormat(["1,2,3"]), null);
  assert.equal(detectFormat(["1 2 3 4"]), null);
  assert.equal(detectFormat(["# only comments", ""]), null);
});

test("a file of no known format, and a missing file, are refused with a hint", async () => {
  await rejectsWith(
    TraceReader.open(synthetic("prose.txt", "Dear diary,\n")),
    "INVALID_ARGUMENT",
    /cannot tell the format of trace .*prose\.txt/,
  );
  await rejectsWith(
    TraceReader.open(synthetic("empty.txt", "")),
    "INVALID_ARGUMENT",
    /cannot tell the format/,
  );
  await rejectsWith(
    TraceReader.open(path.join(work, "absent.spc")),
    "NOT_FOUND",
    /absent\.spc does not exist/,
  );
});

test("an explicit format parses a file auto-detection would refuse, and rejects what does not fit", async () => {
  const empty = synthetic("empty.spc", "# nothing yet\n");
  assert.deepEqual(await all(empty, "spc"), []);
  const disksim = synthetic("as-spc.trace", "1000 0 8 8 1\n");
  await rejectsWith(
    all(disksim, "spc"),
    "INVALID_ARGUMENT",
    /as-spc\.trace, line 1: expected 5 comma-separated fields, found 1/,
  );
});

const malformed: Array<{ format: TraceFormat; line: string; message: RegExp }> = [
  { format: "spc", line: "0,1,512,x,0.1", message: /the opcode \(field 4\) is "x", not r or w/ },
  { format: "spc", line: "0,1,512,r", message: /expected 5 comma-separated fields, found 4/ },
  { format: "spc", line: "0,-1,512,r,0.1", message: /the LBA \(field 2\) is not a whole number/ },
  { format: "spc", line: "0,1,5.5,r,0.1", message: /the size \(field 3\) is not a whole number of bytes/ },
  { format: "spc", line: "a,1,512,r,0.1", message: /the ASU \(field 1\) is not a whole number/ },
  { format: "spc", line: "0,1,512,r,soon", message: /the timestamp \(field 5\) is not a number of seconds/ },
  {
    format: "spc",
    line: "0,99999999999999999999,512,r,0.1",
    message: /the LBA \(field 2\) is not a whole number/,
  },
  {
    format: "disksim",
    line: "1000 0 8 8 2",
    message: /the type \(field 5\) is "2", not 1 \(read\) or 0 \(write\)/,
  },
  { format: "disksim", line: "1000 0 8 8", message: /expected 5 whitespace-separated fields, found 4/ },
  {
    format: "disksim",
    line: "1.5 0 8 8 1",
    message: /the arrival time \(field 1\) is not a whole number of nanoseconds/,
  },
  {
    format: "disksim",
    line: "1000 0 x 8 1",
    message: /the LBA \(field 3\) is not a whole number of sectors/,
  },
  {
    format: "msr",
    line: "1,h,0,Erase,0,512,1",
    message: /the type \(field 4\) is "Erase", not Read or Write/,
  },
  { format: "msr", line: "1,h,0,Read,0,512", message: /expected 7 comma-separated fields, found 6/ },
  {
    format: "msr",
    line: "1,h,0,Read,-5,512,1",
    message: /the offset \(field 5\) is not a whole number of bytes/,
  },
];

const goodLine: Record<TraceFormat, string> = {
  spc: "0,1,512,r,0.0",
  disksim: "1000 0 8 8 1",
  msr: "128166372003061629,hm,0,Read,0,512,1",
};

for (const [index, bad] of malformed.entries()) {
  test(`malformed ${bad.format} line ${index + 1}: ${bad.line}`, async () => {
    // Two good lines, a comment, then the bad one: line 4 of the file.
    const file = synthetic(
      `bad-${index}.${bad.format}`,
      `${goodLine[bad.format]}\n# c\n${goodLine[bad.format]}\n${bad.line}\n`,
    );
    const name = path.basename(file).replace(/\./g, "\\.");
    await rejectsWith(
      all(file, bad.format),
      "INVALID_ARGUMENT",
      new RegExp(`${name}, line 4: ${bad.message.source}`),
    );
    // Auto-detection finds the format from the good first line and fails on the same line.
    await rejectsWith(all(file), "INVALID_ARGUMENT", new RegExp(`${name}, line 4: `));
  });
}

test("a huge line without newline is refused, not buffered", async () => {
  const file = synthetic("huge.spc", `0,1,512,r,0.0\n${"9".repeat(2 * 1024 * 1024)}`);
  await rejectsWith(all(file), "INVALID_ARGUMENT", /huge\.spc, line 2: longer than 65536 bytes/);
});

test("lines split across read chunks are parsed whole", async () => {
  // ~1.5 MB of SPC lines: the 1 MiB chunk boundary falls inside a line.
  const lines: string[] = [];
  for (let index = 0; index < 60_000; index++)
    lines.push(`${index % 3},${index * 8},4096,${index % 2 ? "w" : "r"},${index / 1000}`);
  const file = synthetic("long.spc", `${lines.join("\n")}\n`);
  assert.ok(fs.statSync(file).size > 1024 * 1024);
  const summary = await traceSummary(file);
  assert.equal(summary.records, 60_000);
  assert.equal(summary.writes, 30_000);
  assert.equal(summary.maxOffsetBytes, 59_999 * 8 * 512);
  assert.equal(summary.spanNs, 59_999_000_000);
});
