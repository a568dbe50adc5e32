/**
 * One error type for all of vdisk.
 *
 * Every failure that crosses a module boundary is a `VdiskError` with a stable `code` (callers match on
 * the code, never on the message) and an optional `cause`. The one table below maps each code to the
 * NBD errno value sent on the wire and to the HTTP status the API answers with, in the manner of nbdkit's
 * `nbd_errno`: read-only → EPERM, out of space / beyond the end on writes → ENOSPC, unsupported fast zero →
 * ENOTSUP, everything we cannot classify → EIO (a server bug or a device failure), bad requests → EINVAL.
 */

/** NBD error values (doc/proto.md, "Error values"). */
export const NbdErrno = {
  EPERM: 1,
  EIO: 5,
  ENOMEM: 12,
  EINVAL: 22,
  ENOSPC: 28,
  EOVERFLOW: 75,
  ENOTSUP: 95,
  ESHUTDOWN: 108,
} as const;
export type NbdErrnoValue = (typeof NbdErrno)[keyof typeof NbdErrno];

/**
 * The code for an NBD error value a client receives. Several codes share an errno on the wire; each errno
 * maps back to the plainest of them (an unknown value is an I/O error).
 */
const codeOfErrno: Record<NbdErrnoValue, ErrorCode> = {
  [NbdErrno.EPERM]: "READ_ONLY",
  [NbdErrno.EIO]: "IO_ERROR",
  [NbdErrno.ENOMEM]: "NO_MEMORY",
  [NbdErrno.EINVAL]: "INVALID_ARGUMENT",
  [NbdErrno.ENOSPC]: "NO_SPACE",
  [NbdErrno.EOVERFLOW]: "OVERFLOW",
  [NbdErrno.ENOTSUP]: "NOT_SUPPORTED",
  [NbdErrno.ESHUTDOWN]: "SHUTTING_DOWN",
};

export function codeOfNbdErrno(errno: number): ErrorCode {
  return codeOfErrno[errno as NbdErrnoValue] ?? "IO_ERROR";
}

interface CodeInfo {
  nbd: NbdErrnoValue;
  http: number;
}

/** The stable codes. Adding one means adding its row here and nothing else. */
export const ErrorCodes = {
  // Request validation (protocol edge).
  OUT_OF_RANGE: { nbd: NbdErrno.EINVAL, http: 400 }, // read/trim/cache/status beyond the end
  WRITE_OUT_OF_RANGE: { nbd: NbdErrno.ENOSPC, http: 400 }, // write/zero beyond the end
  TOO_LARGE: { nbd: NbdErrno.EINVAL, http: 413 }, // payload over the configured maximum
  OVERFLOW: { nbd: NbdErrno.EOVERFLOW, http: 413 }, // DF read that cannot be sent in one chunk
  INVALID_ARGUMENT: { nbd: NbdErrno.EINVAL, http: 400 },
  UNKNOWN_COMMAND: { nbd: NbdErrno.EINVAL, http: 400 },
  READ_ONLY: { nbd: NbdErrno.EPERM, http: 409 },
  NOT_SUPPORTED: { nbd: NbdErrno.ENOTSUP, http: 501 }, // only for FAST_ZERO on the wire
  NO_SPACE: { nbd: NbdErrno.ENOSPC, http: 507 },
  NO_MEMORY: { nbd: NbdErrno.ENOMEM, http: 503 },
  SHUTTING_DOWN: { nbd: NbdErrno.ESHUTDOWN, http: 503 },
  IO_ERROR: { nbd: NbdErrno.EIO, http: 500 },
  // Protocol violations: the connection is closed, nothing is replied.
  PROTOCOL: { nbd: NbdErrno.EINVAL, http: 400 },
  // Management.
  UNKNOWN_DISK: { nbd: NbdErrno.EINVAL, http: 404 },
  DISK_EXISTS: { nbd: NbdErrno.EINVAL, http: 409 },
  DISK_BUSY: { nbd: NbdErrno.EINVAL, http: 409 },
  UNKNOWN_SNAPSHOT: { nbd: NbdErrno.EINVAL, http: 404 },
  SNAPSHOT_EXISTS: { nbd: NbdErrno.EINVAL, http: 409 },
  WRONG_FORMAT: { nbd: NbdErrno.EINVAL, http: 409 }, // e.g. a snapshot of a raw disk
  TOOL_MISSING: { nbd: NbdErrno.EIO, http: 501 }, // an external program (qemu-img) is not installed
  BAD_NAME: { nbd: NbdErrno.EINVAL, http: 400 },
  BAD_SIZE: { nbd: NbdErrno.EINVAL, http: 400 },
  BAD_REQUEST: { nbd: NbdErrno.EINVAL, http: 400 },
  NOT_FOUND: { nbd: NbdErrno.EINVAL, http: 404 },
  UNAUTHORIZED: { nbd: NbdErrno.EPERM, http: 401 }, // an API call over TCP without the token
  DAEMON_NOT_RUNNING: { nbd: NbdErrno.EIO, http: 503 },
  HOME_LOCKED: { nbd: NbdErrno.EIO, http: 409 },
  CORRUPT: { nbd: NbdErrno.EIO, http: 500 },
  LIMIT: { nbd: NbdErrno.EINVAL, http: 429 },
  INTERNAL: { nbd: NbdErrno.EIO, http: 500 },
} as const satisfies Record<string, CodeInfo>;

export type ErrorCode = keyof typeof ErrorCodes;

export class VdiskError extends Error {
  readonly code: ErrorCode;
  /** What the user can do about it, for CLI messages. */
  readonly hint: string | undefined;

  constructor(code: ErrorCode, message: string, options?: { cause?: unknown; hint?: string }) {
    super(message, options?.cause === undefined ? undefined : { cause: options.cause });
    this.name = "VdiskError";
    this.code = code;
    this.hint = options?.hint;
  }

  get nbdErrno(): NbdErrnoValue {
    return ErrorCodes[this.code].nbd;
  }

  get httpStatus(): number {
    return ErrorCodes[this.code].http;
  }
}

/** Map a Node.js system error (errno code string) onto a VdiskError. */
export function fromSystemError(err: unknown, what: string): VdiskError {
  if (err instanceof VdiskError) return err;
  const code = (err as NodeJS.ErrnoException | undefined)?.code;
  const message = `${what}: ${(err as Error | undefined)?.message ?? String(err)}`;
  switch (code) {
    case "ENOSPC":
    case "EDQUOT":
    case "EFBIG":
      return new VdiskError("NO_SPACE", message, { cause: err });
    case "EROFS":
    case "EPERM":
    case "EACCES":
      return new VdiskError("READ_ONLY", message, { cause: err });
    case "ENOMEM":
      return new VdiskError("NO_MEMORY", message, { cause: err });
    case "EOPNOTSUPP":
    case "ENOTSUP":
      return new VdiskError("NOT_SUPPORTED", message, { cause: err });
    case "EINVAL":
      return new VdiskError("INVALID_ARGUMENT", message, { cause: err });
    default:
      return new VdiskError("IO_ERROR", message, { cause: err });
  }
}

/** Assert an invariant. A broken invariant is a bug: it throws and is never caught and ignored. */
export function assert(condition: unknown, message = "assertion failed"): asserts condition {
  if (!condition) throw new Error(`invariant violated: ${message}`);
}

/** The NBD errno for any thrown value: VdiskError by its code, anything else EIO. */
export function nbdErrnoOf(err: unknown): NbdErrnoValue {
  return err instanceof VdiskError ? err.nbdErrno : NbdErrno.EIO;
}
