/**
 * Who may reach the management API, decided once at `vdisk serve`.
 *
 * - The API listens on loopback by default. A `--http` address that is not loopback (0.0.0.0, a LAN
 *   address, ::) is refused unless `--allow-remote-api` is given, and then only with a token.
 * - The token is `--api-token TOKEN`, else the content of HOME/api-token. With `--allow-remote-api` on a
 *   non-loopback address and neither, a random token is written to HOME/api-token (mode 0600) and the
 *   daemon says where it is.
 * - Whenever a token is configured (on loopback too), mutating calls over TCP must carry it (api.ts). The
 *   Unix socket run/api.sock is trusted: its directory is the owner's alone (0700).
 * - The CLI sends the token of HOME/api-token (or $VDISK_API_TOKEN) with every request (client.ts).
 */
import * as crypto from "node:crypto";
import * as fs from "node:fs";
import * as net from "node:net";
import { VdiskError } from "../errors";
import { type HomePaths, writeFileAtomic } from "./home";

/** Shortest token accepted: guessing must be hopeless. */
export const apiTokenCharactersMin = 16;
/** Random bytes in a generated token (base64url: 43 characters). */
const generatedTokenBytes = 32;

/** Whether `host` names this machine only: 127.0.0.0/8, ::1, ::ffff:127.x.y.z, localhost. */
export function isLoopback(host: string): boolean {
  if (host === "localhost") return true;
  if (net.isIPv4(host)) return host.startsWith("127.");
  if (net.isIPv6(host)) {
    const lower = host.toLowerCase();
    if (lower === "::1" || lower === "0:0:0:0:0:0:0:1") return true;
    const mapped = /^::ffff:(\d+\.\d+\.\d+\.\d+)$/.exec(lower);
    return mapped !== null && (mapped[1] as string).startsWith("127.");
  }
  return false;
}

function checkToken(token: string, where: string): string {
  if (token.length < apiTokenCharactersMin || !/^[\x21-\x7e]+$/.test(token)) {
    throw new VdiskError(
      "INVALID_ARGUMENT",
      `the API token ${where} must be at least ${apiTokenCharactersMin} printable characters without spaces`,
      { hint: "remove it to have vdisk serve --allow-remote-api generate one, or write a longer one" },
    );
  }
  return token;
}

/** HOME/api-token's token, or null when there is no such file (or it cannot be read by this user). */
export function readTokenFile(paths: HomePaths): string | null {
  let text: string;
  try {
    text = fs.readFileSync(paths.apiTokenFile, "utf8");
  } catch {
    return null;
  }
  return text.trim();
}

export interface ApiAccess {
  /** The token mutating TCP calls need, or null. */
  token: string | null;
  /** Lines for the daemon's log (a generated token, a readable token file). */
  notices: string[];
}

/**
 * Decide the API's access rules for `vdisk serve`: refuse a remote address without the flag, find or
 * make the token. Runs after the home exists and before anything listens.
 */
export function resolveApiAccess(
  paths: HomePaths,
  http: { host: string } | null,
  options: { allowRemoteApi?: boolean; apiToken?: string },
): ApiAccess {
  const remote = http !== null && !isLoopback(http.host);
  if (remote && options.allowRemoteApi !== true) {
    throw new VdiskError(
      "INVALID_ARGUMENT",
      `refusing to serve the management API on ${http.host}, which is not a loopback address`,
      {
        hint: "anyone who reaches it can create and delete disks: keep it on 127.0.0.1, or add --allow-remote-api (mutating calls then need a token: --api-token TOKEN or HOME/api-token)",
      },
    );
  }
  const notices: string[] = [];
  if (options.apiToken !== undefined) {
    return { token: checkToken(options.apiToken, "given to --api-token"), notices };
  }
  const stored = readTokenFile(paths);
  if (stored !== null) {
    const mode = fs.statSync(paths.apiTokenFile).mode & 0o777;
    if ((mode & 0o077) !== 0) {
      notices.push(
        `warning: ${paths.apiTokenFile} is readable by others (mode ${mode.toString(8)}); chmod 600 it`,
      );
    }
    return { token: checkToken(stored, `in ${paths.apiTokenFile}`), notices };
  }
  if (!remote) return { token: null, notices };
  const token = crypto.randomBytes(generatedTokenBytes).toString("base64url");
  writeFileAtomic(paths.apiTokenFile, `${token}\n`, 0o600);
  notices.push(
    `created an API token in ${paths.apiTokenFile} (mode 0600): mutating calls over TCP need "Authorization: Bearer TOKEN"`,
  );
  return { token, notices };
}
