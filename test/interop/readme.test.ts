/**
 * The README's promise to a newcomer, checked on a fresh clone of this repository's HEAD:
 * command 1 (install and start the daemon on the embedded default) is taken verbatim from the README,
 * run in the clone, and must serve the default 8 GiB disk to qemu-img on 127.0.0.1:10809; command 2
 * must be `bash .ci/run`, which installs the Debian packages and runs `npm ci && npm test` — CI runs
 * exactly that on a fresh clone, so running it again here would only recurse.
 */
import { after, test } from "node:test";
import assert from "node:assert/strict";
import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";

const root = path.resolve(__dirname, "..", "..", "..");
const readme = fs.readFileSync(path.join(root, "README.md"), "utf8");
let clone: string | null = null;
let daemon: ChildProcess | null = null;

after(() => {
  if (daemon?.pid && daemon.exitCode === null) process.kill(-daemon.pid, "SIGKILL");
  if (clone) fs.rmSync(clone, { recursive: true, force: true });
});

/** The command on the line after the comment that starts with `# N.` in the README's first code block. */
function readmeCommand(n: number): string {
  const block = /## Two commands[\s\S]*?```sh\n([\s\S]*?)```/.exec(readme)?.[1];
  assert.ok(block, "README has a 'Two commands' section with a sh block");
  const lines = block.split("\n");
  const start = lines.findIndex((line) => line.startsWith(`# ${n}.`));
  assert.ok(start >= 0, `README names command ${n}`);
  const command = lines.slice(start + 1).find((line) => line.trim() !== "" && !line.startsWith("#"));
  assert.ok(command, `README gives command ${n}`);
  return command.trim();
}

test("README command 2 is what CI runs, and .ci/run runs npm test after installing the clients", () => {
  assert.equal(readmeCommand(2), "bash .ci/run");
  const ci = fs.readFileSync(path.join(root, ".ci", "run"), "utf8");
  assert.match(ci, /install-test-deps\.sh/);
  assert.match(ci, /^npm ci$/m);
  assert.match(ci, /^npm test$/m);
  const deps = fs.readFileSync(path.join(root, "scripts", "install-test-deps.sh"), "utf8");
  for (const pkg of ["qemu-utils", "libnbd-bin", "python3-libnbd", "nbdkit", "fio"])
    assert.match(deps, new RegExp(pkg));
});

test(
  "README command 1 installs and serves the default disk on a fresh clone",
  { timeout: 240_000 },
  async () => {
    const command = readmeCommand(1);
    assert.match(command, /vdisk serve/);
    // The README's address is fixed (127.0.0.1:10809); if another server holds it this test cannot run.
    const busy = spawnSync("nbdinfo", ["--size", "nbd://127.0.0.1:10809/default"], { encoding: "utf8" });
    assert.notEqual(busy.status, 0, "something already serves 127.0.0.1:10809; stop it to run this test");

    clone = fs.mkdtempSync(path.join(os.tmpdir(), "vdisk-readme-"));
    const cloned = spawnSync("git", ["clone", "--quiet", root, clone], { encoding: "utf8" });
    assert.equal(cloned.status, 0, cloned.stderr);

    daemon = spawn("bash", ["-c", command], {
      cwd: clone,
      detached: true,
      stdio: ["ignore", "pipe", "pipe"],
    });
    let output = "";
    daemon.stdout?.on("data", (chunk: Buffer) => (output += chunk.toString()));
    daemon.stderr?.on("data", (chunk: Buffer) => (output += chunk.toString()));
    const deadline = Date.now() + 200_000;
    while (!output.includes("qemu-img info nbd://127.0.0.1:10809/default")) {
      assert.ok(daemon.exitCode === null, `README command 1 exited early:\n${output}`);
      assert.ok(Date.now() < deadline, `vdisk serve did not start:\n${output}`);
      await new Promise((resolve) => setTimeout(resolve, 200));
    }
    const info = spawnSync("qemu-img", ["info", "--output=json", "nbd://127.0.0.1:10809/default"], {
      encoding: "utf8",
    });
    assert.equal(info.status, 0, info.stderr);
    assert.equal(JSON.parse(info.stdout)["virtual-size"], 8 * 1024 ** 3);
    assert.ok(fs.existsSync(path.join(clone, "vdisk-home", "catalog.json")), "home created under the clone");

    // Ctrl-C drains, flushes and exits cleanly.
    const exited = new Promise<number | null>((resolve) => daemon?.once("exit", (code) => resolve(code)));
    const pid = JSON.parse(fs.readFileSync(path.join(clone, "vdisk-home", "run", "daemon.json"), "utf8")).pid;
    process.kill(pid, "SIGINT");
    const deadlineExit = Date.now() + 20_000;
    while (fs.existsSync(path.join(clone, "vdisk-home", "run", "daemon.json")) && Date.now() < deadlineExit) {
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
    assert.equal(
      fs.existsSync(path.join(clone, "vdisk-home", "run", "daemon.json")),
      false,
      "run files removed",
    );
    assert.equal(await exited, 0);
  },
);
