/**
 * Who may use the management API, against real daemons:
 * - `--http 0.0.0.0:0` is refused without `--allow-remote-api`; a short `--api-token` is refused;
 * - with `--allow-remote-api` and no token, one is generated into HOME/api-token (mode 0600) and logged;
 * - over TCP, POST/DELETE without the token (or with a wrong one) answer 401 with a JSON error and hint,
 *   with it 2xx; GETs need no token;
 * - the Unix socket is trusted (no token needed) and the CLI works over it; the CLI falls back to TCP and
 *   sends the token of HOME/api-token (a wrong $VDISK_API_TOKEN gets the 401's message);
 * - responses over TCP carry no absolute path outside the home (the NBD socket is put outside on purpose,
 *   and an import of a file outside the home fails), while the trusted socket shows the real path.
 */
import { after, before, test } from "node:test";
import * as assert from "node:assert/strict";
import * as fs from "node:fs";
import * as http from "node:http";
import * as os from "node:os";
import * as path from "node:path";
import {
  type DaemonFixture,
  describeRun,
  repositoryRoot,
  run,
  startDaemon,
} from "../../src/testing/daemon-fixture";

const vdiskBin = path.join(repositoryRoot, "bin", "vdisk");

let daemon: DaemonFixture;
/** The NBD socket lives outside the home: the API must not show its path over TCP. */
let outsideDir: string;
let outsideSocket: string;

before(async () => {
  outsideDir = fs.mkdtempSync(path.join(os.tmpdir(), "vdisk-sec-sock-"));
  outsideSocket = path.join(outsideDir, "nbd-outside.sock");
  daemon = await startDaemon({
    name: "vdisk-api-security",
    serveArgs: ["--http", "0.0.0.0:0", "--allow-remote-api", "--socket", outsideSocket],
  });
});

after(() => {
  daemon?.cleanup();
  if (outsideDir) fs.rmSync(outsideDir, { recursive: true, force: true });
});

interface Answer {
  status: number;
  text: string;
  json: { error?: { code: string; message: string; hint: string | null } } & Record<string, unknown>;
}

function request(
  target: { port: number } | { socketPath: string },
  method: string,
  apiPath: string,
  options: { body?: object; token?: string; origin?: string } = {},
): Promise<Answer> {
  const payload = options.body === undefined ? undefined : JSON.stringify(options.body);
  const headers: http.OutgoingHttpHeaders = {};
  if (payload !== undefined) {
    headers["content-type"] = "application/json";
    headers["content-length"] = Buffer.byteLength(payload);
  }
  if (options.token !== undefined) headers.authorization = `Bearer ${options.token}`;
  if (options.origin !== undefined) headers.origin = options.origin;
  const where = "port" in target ? { host: "127.0.0.1", port: target.port } : target;
  return new Promise((resolve, reject) => {
    const req = http.request({ ...where, method, path: apiPath, headers, agent: false }, (res) => {
      let text = "";
      res.on("data", (chunk: Buffer) => (text += chunk.toString("utf8")));
      res.on("end", () => {
        let json: Answer["json"] = {};
        try {
          json = JSON.parse(text) as Answer["json"];
        } catch {
          // /metrics is text
        }
        resolve({ status: res.statusCode ?? 0, text, json });
      });
    });
    req.on("error", reject);
    req.end(payload);
  });
}

const tcp = (): { port: number } => ({ port: daemon.httpPort });
const socket = (): { socketPath: string } => ({ socketPath: path.join(daemon.home, "run", "api.sock") });
const token = (): string => fs.readFileSync(path.join(daemon.home, "api-token"), "utf8").trim();

test("a non-loopback --http is refused without --allow-remote-api; a short --api-token is refused", () => {
  const home = daemon.file("refused-home");
  const serve = (extra: string[]) =>
    run(
      process.execPath,
      [vdiskBin, "serve", "--home", home, "--listen", "none", "--socket", "none", ...extra],
      {
        timeoutMs: 20_000,
      },
    );
  const remote = serve(["--http", "0.0.0.0:0"]);
  assert.equal(remote.status, 1, describeRun("vdisk serve", [], remote));
  assert.match(remote.stderr, /refusing to serve the management API on 0\.0\.0\.0/);
  assert.match(remote.stderr, /hint: .*--allow-remote-api/);
  assert.ok(!fs.existsSync(path.join(home, "api-token")), "no token made when refused");
  const short = serve(["--http", "127.0.0.1:0", "--api-token", "short"]);
  assert.equal(short.status, 1, describeRun("vdisk serve", [], short));
  assert.match(short.stderr, /at least 16 printable characters/);
});

test("--allow-remote-api without a token generates HOME/api-token, mode 0600, and says where", () => {
  const file = path.join(daemon.home, "api-token");
  assert.equal(fs.statSync(file).mode & 0o777, 0o600);
  assert.match(token(), /^[A-Za-z0-9_-]{43}$/);
  assert.ok(daemon.log(200).includes(`created an API token in ${file}`), daemon.log());
});

test("over TCP: changes need the bearer token (401 + hint otherwise); reads do not", async () => {
  const create = { name: "sec1", size: "1M" };
  const missing = await request(tcp(), "POST", "/v1/disks", { body: create });
  assert.equal(missing.status, 401, missing.text);
  assert.equal(missing.json.error?.code, "UNAUTHORIZED");
  assert.match(missing.json.error?.hint ?? "", /Authorization: Bearer TOKEN/);
  const wrong = await request(tcp(), "POST", "/v1/disks", { body: create, token: "x".repeat(43) });
  assert.equal(wrong.status, 401);
  assert.match(wrong.json.error?.message ?? "", /not the daemon's/);

  const created = await request(tcp(), "POST", "/v1/disks", { body: create, token: token() });
  assert.equal(created.status, 201, created.text);
  const snapshot = await request(tcp(), "POST", "/v1/disks/sec1/snapshots", { body: { name: "s" } });
  assert.equal(snapshot.status, 401);
  const deleteRefused = await request(tcp(), "DELETE", "/v1/disks/sec1");
  assert.equal(deleteRefused.status, 401);

  for (const route of ["/v1/status", "/v1/disks", "/v1/disks/sec1", "/v1/stats", "/v1/jobs", "/metrics"]) {
    const answer = await request(tcp(), "GET", route);
    assert.equal(answer.status, 200, `GET ${route}: ${answer.text}`);
  }
  const status = await request(tcp(), "GET", "/v1/status");
  assert.equal((status.json.http as { tokenRequired: boolean }).tokenRequired, true);

  // Browsers: only the daemon's own pages (Origin http://HOST of the request) may call, token included.
  const own = `http://127.0.0.1:${daemon.httpPort}`;
  const foreign = await request(tcp(), "POST", "/v1/disks/sec1/snapshots", {
    body: { name: "s" },
    token: token(),
    origin: "http://evil.example",
  });
  assert.equal(foreign.status, 400, foreign.text);
  assert.match(foreign.json.error?.message ?? "", /requests from web pages are not accepted/);
  const fromDashboard = await request(tcp(), "POST", "/v1/disks/sec1/snapshots", {
    body: { name: "s" },
    token: token(),
    origin: own,
  });
  assert.equal(fromDashboard.status, 201, fromDashboard.text);
  const noToken = await request(tcp(), "POST", "/v1/disks/sec1/snapshots", {
    body: { name: "t" },
    origin: own,
  });
  assert.equal(noToken.status, 401, "the dashboard needs the token too");

  const deleted = await request(tcp(), "DELETE", "/v1/disks/sec1", { token: token() });
  assert.equal(deleted.status, 200, deleted.text);
});

test("the Unix socket is trusted, and the CLI works over it and over TCP with the home's token", async () => {
  const created = await request(socket(), "POST", "/v1/disks", { body: { name: "sec2", size: "1M" } });
  assert.equal(created.status, 201, created.text);
  const listed = daemon.vdiskJson<{ disks: Array<{ name: string }> }>(["list"]);
  assert.ok(listed.disks.some((disk) => disk.name === "sec2"));
  const snap = daemon.vdisk(["snapshot", "create", "sec2", "one"]);
  assert.equal(snap.status, 0, snap.stderr);

  // Hide the socket: the CLI falls back to the TCP address in run/daemon.json.
  const apiSocket = socket().socketPath;
  const hidden = `${apiSocket}.hidden`;
  fs.renameSync(apiSocket, hidden);
  try {
    const viaTcp = daemon.vdisk(["snapshot", "create", "sec2", "two"]);
    assert.equal(viaTcp.status, 0, `over TCP with HOME/api-token: ${viaTcp.stderr}`);
    const wrong = daemon.vdisk(["snapshot", "create", "sec2", "three"], {
      env: { VDISK_API_TOKEN: "y".repeat(43) },
    });
    assert.equal(wrong.status, 1);
    assert.match(wrong.stderr, /vdisk: error: the API token sent is not the daemon's/);
    assert.match(wrong.stderr, /hint: send Authorization: Bearer TOKEN/);
  } finally {
    fs.renameSync(hidden, apiSocket);
  }
  const snapshots = daemon.vdiskJson<{ snapshots: Array<{ snapshot: string }> }>([
    "snapshot",
    "list",
    "sec2",
  ]);
  assert.deepEqual(
    snapshots.snapshots.map((s) => s.snapshot),
    ["one", "two"],
  );
});

/** Every absolute path in `text` that is not inside the home. */
function pathsOutsideHome(text: string): string[] {
  const found = text.match(/(?<![\w.:/])\/(?!v1\b|metrics\b)[\w.@+-]+(?:\/[\w.@+-]*)*/g) ?? [];
  return found.filter((candidate) => candidate !== daemon.home && !candidate.startsWith(`${daemon.home}/`));
}

test("no response over TCP names a path outside the home; the trusted socket still shows the real one", async () => {
  // An import of a file outside the home that does not exist.
  const outside = daemon.file("no-such-dir/secret.raw");
  const failed = await request(tcp(), "POST", "/v1/import", {
    body: { file: outside, name: "imp" },
    token: token(),
  });
  assert.ok(failed.status >= 400, failed.text);
  assert.ok(!failed.text.includes(daemon.work + "/no-such-dir"), failed.text);

  const routes = [
    "/v1/status",
    "/v1/disks",
    "/v1/disks/sec2",
    "/v1/disks/sec2/snapshots",
    "/v1/disks/sec2/tree",
    "/v1/disks/sec2/stats",
    "/v1/jobs",
    "/v1/stats",
    "/metrics",
    "/v1/disks/nope",
    "/v1/nothing",
  ];
  for (const route of routes) {
    const answer = await request(tcp(), "GET", route);
    assert.deepEqual(
      pathsOutsideHome(answer.text),
      [],
      `GET ${route} over TCP:\n${answer.text.slice(0, 2000)}`,
    );
    assert.ok(!answer.text.includes(outsideDir), route);
  }
  const overTcp = await request(tcp(), "GET", "/v1/status");
  assert.equal((overTcp.json.nbd as { unix: string }).unix, "nbd-outside.sock");
  const overSocket = await request(socket(), "GET", "/v1/status");
  assert.equal((overSocket.json.nbd as { unix: string }).unix, outsideSocket);
});
