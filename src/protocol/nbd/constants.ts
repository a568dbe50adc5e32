/**
 * NBD protocol numbers, from the protocol specification (NetworkBlockDevice/nbd doc/proto.md).
 * Names follow the spec without the NBD_ prefix, grouped by the field they appear in.
 */

export const NBDMAGIC_HI = 0x4e42444d; // "NBDM"
export const NBDMAGIC_LO = 0x41474943; // "AGIC"
export const IHAVEOPT_HI = 0x49484156; // "IHAV"
export const IHAVEOPT_LO = 0x454f5054; // "EOPT"
export const OPTION_REPLY_MAGIC_HI = 0x0003e889;
export const OPTION_REPLY_MAGIC_LO = 0x045565a9;
export const REQUEST_MAGIC = 0x25609513;
export const SIMPLE_REPLY_MAGIC = 0x67446698;
export const STRUCTURED_REPLY_MAGIC = 0x668e33ef;

/** Handshake flags (server → client). */
export const HandshakeFlag = { FIXED_NEWSTYLE: 1 << 0, NO_ZEROES: 1 << 1 } as const;
/** Client flags (client → server). */
export const ClientFlag = { FIXED_NEWSTYLE: 1 << 0, NO_ZEROES: 1 << 1 } as const;

/** Transmission flags. */
export const TransmissionFlag = {
  HAS_FLAGS: 1 << 0,
  READ_ONLY: 1 << 1,
  SEND_FLUSH: 1 << 2,
  SEND_FUA: 1 << 3,
  ROTATIONAL: 1 << 4,
  SEND_TRIM: 1 << 5,
  SEND_WRITE_ZEROES: 1 << 6,
  SEND_DF: 1 << 7,
  CAN_MULTI_CONN: 1 << 8,
  SEND_RESIZE: 1 << 9,
  SEND_CACHE: 1 << 10,
  SEND_FAST_ZERO: 1 << 11,
} as const;

export const Opt = {
  EXPORT_NAME: 1,
  ABORT: 2,
  LIST: 3,
  PEEK_EXPORT: 4,
  STARTTLS: 5,
  INFO: 6,
  GO: 7,
  STRUCTURED_REPLY: 8,
  LIST_META_CONTEXT: 9,
  SET_META_CONTEXT: 10,
  EXTENDED_HEADERS: 11,
} as const;

export const Rep = {
  ACK: 1,
  SERVER: 2,
  INFO: 3,
  META_CONTEXT: 4,
  ERR_UNSUP: 2 ** 31 + 1,
  ERR_POLICY: 2 ** 31 + 2,
  ERR_INVALID: 2 ** 31 + 3,
  ERR_PLATFORM: 2 ** 31 + 4,
  ERR_TLS_REQD: 2 ** 31 + 5,
  ERR_UNKNOWN: 2 ** 31 + 6,
  ERR_SHUTDOWN: 2 ** 31 + 7,
  ERR_BLOCK_SIZE_REQD: 2 ** 31 + 8,
  ERR_TOO_BIG: 2 ** 31 + 9,
} as const;

export const Info = { EXPORT: 0, NAME: 1, DESCRIPTION: 2, BLOCK_SIZE: 3 } as const;

export const Cmd = {
  READ: 0,
  WRITE: 1,
  DISC: 2,
  FLUSH: 3,
  TRIM: 4,
  CACHE: 5,
  WRITE_ZEROES: 6,
  BLOCK_STATUS: 7,
  RESIZE: 8,
} as const;

export const CmdFlag = {
  FUA: 1 << 0,
  NO_HOLE: 1 << 1,
  DF: 1 << 2,
  REQ_ONE: 1 << 3,
  FAST_ZERO: 1 << 4,
  PAYLOAD_LEN: 1 << 5,
} as const;

export const ReplyFlag = { DONE: 1 << 0 } as const;

export const ReplyType = {
  NONE: 0,
  OFFSET_DATA: 1,
  OFFSET_HOLE: 2,
  BLOCK_STATUS: 5,
  ERROR: 2 ** 15 + 1,
  ERROR_OFFSET: 2 ** 15 + 2,
} as const;

/** Sizes of fixed wire structures, in bytes. */
export const RequestHeaderBytes = 28;
export const SimpleReplyHeaderBytes = 16;
export const StructuredReplyHeaderBytes = 20;
export const OptionHeaderBytes = 16;

export const BASE_ALLOCATION = "base:allocation";

export function commandName(type: number): string {
  for (const [name, value] of Object.entries(Cmd)) if (value === type) return name;
  return `CMD_${type}`;
}

export function optionName(option: number): string {
  for (const [name, value] of Object.entries(Opt)) if (value === option) return name;
  return `OPT_${option}`;
}
