#!/usr/bin/env node
// Runs the compiled test files with Node's own test runner, one kind of test after another
// (unit, property, fuzz, crash, interop). `node scripts/run-tests.js unit interop` runs only those kinds.
// Test files run one at a time (--test-concurrency=1): interop tests start daemons and real clients and
// the machine has two cores.
"use strict";
const { spawnSync } = require("node:child_process");
const fs = require("node:fs");
const path = require("node:path");

const kinds = process.argv.slice(2).length
  ? process.argv.slice(2)
  : ["unit", "property", "fuzz", "crash", "interop"];
const files = [];
function walk(dir) {
  if (!fs.existsSync(dir)) return;
  for (const entry of fs.readdirSync(dir, { withFileTypes: true })) {
    const full = path.join(dir, entry.name);
    if (entry.isDirectory()) walk(full);
    else if (entry.name.endsWith(".test.js")) files.push(full);
  }
}
for (const kind of kinds) walk(path.join(__dirname, "..", "dist", "test", kind));
if (files.length === 0) {
  console.error(`no compiled test files found for: ${kinds.join(", ")} (run npm run build:ts first)`);
  process.exit(1);
}
const result = spawnSync(
  process.execPath,
  ["--test", "--test-concurrency=1", "--test-reporter=spec", ...files],
  { stdio: "inherit" },
);
process.exit(result.status ?? 1);
