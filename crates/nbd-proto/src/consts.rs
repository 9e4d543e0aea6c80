//! Numbers from the NBD protocol specification (doc/proto.md of the NBD project).

/// "NBDMAGIC", the first 8 bytes every server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": newstyle greeting, and the magic of every option request.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// The oldstyle greeting's second magic.
pub const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;
/// Magic of an option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

/// Magic of a compact (32-bit length) request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of an extended-header (64-bit length) request.
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// Magic of an extended-header reply chunk.
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

// Handshake flags (server) and client flags.
/// `NBD_FLAG_FIXED_NEWSTYLE`: handshake flag.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// `NBD_FLAG_NO_ZEROES`: handshake flag.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// `NBD_FLAG_C_FIXED_NEWSTYLE`: handshake flag (client flag).
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// `NBD_FLAG_C_NO_ZEROES`: handshake flag (client flag).
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Transmission flags.
/// `NBD_FLAG_HAS_FLAGS`: transmission flag.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
/// `NBD_FLAG_READ_ONLY`: transmission flag.
pub const FLAG_READ_ONLY: u16 = 1 << 1;
/// `NBD_FLAG_SEND_FLUSH`: transmission flag.
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
/// `NBD_FLAG_SEND_FUA`: transmission flag.
pub const FLAG_SEND_FUA: u16 = 1 << 3;
/// `NBD_FLAG_ROTATIONAL`: transmission flag.
pub const FLAG_ROTATIONAL: u16 = 1 << 4;
/// `NBD_FLAG_SEND_TRIM`: transmission flag.
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
/// `NBD_FLAG_SEND_WRITE_ZEROES`: transmission flag.
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// `NBD_FLAG_SEND_DF`: transmission flag.
pub const FLAG_SEND_DF: u16 = 1 << 7;
/// `NBD_FLAG_CAN_MULTI_CONN`: transmission flag.
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// `NBD_FLAG_SEND_RESIZE`: transmission flag.
pub const FLAG_SEND_RESIZE: u16 = 1 << 9;
/// `NBD_FLAG_SEND_CACHE`: transmission flag.
pub const FLAG_SEND_CACHE: u16 = 1 << 10;
/// `NBD_FLAG_SEND_FAST_ZERO`: transmission flag.
pub const FLAG_SEND_FAST_ZERO: u16 = 1 << 11;
/// `NBD_FLAG_BLOCK_STAT_PAYLOAD`: transmission flag.
pub const FLAG_BLOCK_STAT_PAYLOAD: u16 = 1 << 12;

// Options.
/// `NBD_OPT_EXPORT_NAME`: option.
pub const OPT_EXPORT_NAME: u32 = 1;
/// `NBD_OPT_ABORT`: option.
pub const OPT_ABORT: u32 = 2;
/// `NBD_OPT_LIST`: option.
pub const OPT_LIST: u32 = 3;
/// `NBD_OPT_STARTTLS`: option.
pub const OPT_STARTTLS: u32 = 5;
/// `NBD_OPT_INFO`: option.
pub const OPT_INFO: u32 = 6;
/// `NBD_OPT_GO`: option.
pub const OPT_GO: u32 = 7;
/// `NBD_OPT_STRUCTURED_REPLY`: option.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// `NBD_OPT_LIST_META_CONTEXT`: option.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// `NBD_OPT_SET_META_CONTEXT`: option.
pub const OPT_SET_META_CONTEXT: u32 = 10;
/// `NBD_OPT_EXTENDED_HEADERS`: option.
pub const OPT_EXTENDED_HEADERS: u32 = 11;

// Option reply types.
/// `NBD_REP_ACK`: option reply type.
pub const REP_ACK: u32 = 1;
/// `NBD_REP_SERVER`: option reply type.
pub const REP_SERVER: u32 = 2;
/// `NBD_REP_INFO`: option reply type.
pub const REP_INFO: u32 = 3;
/// `NBD_REP_META_CONTEXT`: option reply type.
pub const REP_META_CONTEXT: u32 = 4;
/// `NBD_REP_FLAG_ERROR`: option reply type.
pub const REP_FLAG_ERROR: u32 = 1 << 31;
/// `NBD_REP_ERR_UNSUP`: option reply type.
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
/// `NBD_REP_ERR_POLICY`: option reply type.
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
/// `NBD_REP_ERR_INVALID`: option reply type.
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
/// `NBD_REP_ERR_PLATFORM`: option reply type.
pub const REP_ERR_PLATFORM: u32 = REP_FLAG_ERROR | 4;
/// `NBD_REP_ERR_TLS_REQD`: option reply type.
pub const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR | 5;
/// `NBD_REP_ERR_UNKNOWN`: option reply type.
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;
/// `NBD_REP_ERR_SHUTDOWN`: option reply type.
pub const REP_ERR_SHUTDOWN: u32 = REP_FLAG_ERROR | 7;
/// `NBD_REP_ERR_BLOCK_SIZE_REQD`: option reply type.
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_FLAG_ERROR | 8;
/// `NBD_REP_ERR_TOO_BIG`: option reply type.
pub const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR | 9;
/// `NBD_REP_ERR_EXT_HEADER_REQD`: option reply type.
pub const REP_ERR_EXT_HEADER_REQD: u32 = REP_FLAG_ERROR | 10;

// NBD_INFO types.
/// `NBD_INFO_EXPORT`: information type.
pub const INFO_EXPORT: u16 = 0;
/// `NBD_INFO_NAME`: information type.
pub const INFO_NAME: u16 = 1;
/// `NBD_INFO_DESCRIPTION`: information type.
pub const INFO_DESCRIPTION: u16 = 2;
/// `NBD_INFO_BLOCK_SIZE`: information type.
pub const INFO_BLOCK_SIZE: u16 = 3;

// Commands.
/// `NBD_CMD_READ`: command.
pub const CMD_READ: u16 = 0;
/// `NBD_CMD_WRITE`: command.
pub const CMD_WRITE: u16 = 1;
/// `NBD_CMD_DISC`: command.
pub const CMD_DISC: u16 = 2;
/// `NBD_CMD_FLUSH`: command.
pub const CMD_FLUSH: u16 = 3;
/// `NBD_CMD_TRIM`: command.
pub const CMD_TRIM: u16 = 4;
/// `NBD_CMD_CACHE`: command.
pub const CMD_CACHE: u16 = 5;
/// `NBD_CMD_WRITE_ZEROES`: command.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// `NBD_CMD_BLOCK_STATUS`: command.
pub const CMD_BLOCK_STATUS: u16 = 7;

// Command flags.
/// `NBD_CMD_FLAG_FUA`: command flag.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// `NBD_CMD_FLAG_NO_HOLE`: command flag.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// `NBD_CMD_FLAG_DF`: command flag.
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// `NBD_CMD_FLAG_REQ_ONE`: command flag.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// `NBD_CMD_FLAG_FAST_ZERO`: command flag.
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
/// `NBD_CMD_FLAG_PAYLOAD_LEN`: command flag.
pub const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;
/// Every command flag this library knows.
pub const CMD_FLAG_MASK: u16 = 0x3f;

// Structured reply flags and chunk types.
/// `NBD_REPLY_FLAG_DONE`: reply chunk flag or type.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// `NBD_REPLY_TYPE_NONE`: reply chunk flag or type.
pub const REPLY_TYPE_NONE: u16 = 0;
/// `NBD_REPLY_TYPE_OFFSET_DATA`: reply chunk flag or type.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// `NBD_REPLY_TYPE_OFFSET_HOLE`: reply chunk flag or type.
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// `NBD_REPLY_TYPE_BLOCK_STATUS`: reply chunk flag or type.
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// `NBD_REPLY_TYPE_BLOCK_STATUS_EXT`: reply chunk flag or type.
pub const REPLY_TYPE_BLOCK_STATUS_EXT: u16 = 6;
/// `NBD_REPLY_TYPE_ERROR`: reply chunk flag or type.
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;
/// `NBD_REPLY_TYPE_ERROR_OFFSET`: reply chunk flag or type.
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) | 2;

// libnbd's strict-mode bits.
/// `LIBNBD_STRICT_COMMANDS`: libnbd strict-mode bit.
pub const STRICT_COMMANDS: u32 = 1 << 0;
/// `LIBNBD_STRICT_FLAGS`: libnbd strict-mode bit.
pub const STRICT_FLAGS: u32 = 1 << 1;
/// `LIBNBD_STRICT_BOUNDS`: libnbd strict-mode bit.
pub const STRICT_BOUNDS: u32 = 1 << 2;
/// `LIBNBD_STRICT_ZERO_SIZE`: libnbd strict-mode bit.
pub const STRICT_ZERO_SIZE: u32 = 1 << 3;
/// `LIBNBD_STRICT_ALIGN`: libnbd strict-mode bit.
pub const STRICT_ALIGN: u32 = 1 << 4;
/// `LIBNBD_STRICT_PAYLOAD`: libnbd strict-mode bit.
pub const STRICT_PAYLOAD: u32 = 1 << 5;
/// `LIBNBD_STRICT_AUTO_FLAG`: libnbd strict-mode bit.
pub const STRICT_AUTO_FLAG: u32 = 1 << 6;
/// All strict-mode bits: the default.
pub const STRICT_MASK: u32 = 0x7f;

// Block status flags of base:allocation.
/// `NBD_STATE_HOLE`: block status flag (of `base:allocation`).
pub const STATE_HOLE: u32 = 1 << 0;
/// `NBD_STATE_ZERO`: block status flag (of `base:allocation`).
pub const STATE_ZERO: u32 = 1 << 1;
/// `NBD_STATE_DIRTY`: block status flag (of `qemu:dirty-bitmap:*` contexts).
pub const STATE_DIRTY: u32 = 1 << 0;

/// The longest string (export name, description, context) libnbd sends or accepts.
pub const MAX_STRING: usize = 4096;
/// The largest read or write payload ever sent in one command, as libnbd.
pub const MAX_PAYLOAD_HARD: u32 = 64 * 1024 * 1024;
/// Payload maximum when the server advertises no block size maximum.
pub const DEFAULT_PAYLOAD: u32 = 32 * 1024 * 1024;
/// The largest option reply accepted from a server; larger ones are a protocol error and
/// are never allocated.
pub const MAX_OPTION_REPLY: u32 = 64 * 1024;
/// The largest non-data structured reply chunk payload accepted (error messages, holes).
pub const MAX_CHUNK_METADATA: u32 = 64 * 1024;
/// Default TCP port.
pub const DEFAULT_PORT: u16 = 10809;
/// Largest block status chunk accepted (qemu sends up to 2^17 descriptors of 16 bytes).
pub const MAX_BLOCK_STATUS_CHUNK: u32 = 4 * 1024 * 1024;

/// The protocol's name of a command, for messages.
pub fn command_name(cmd: u16) -> &'static str {
    match cmd {
        CMD_READ => "NBD_CMD_READ",
        CMD_WRITE => "NBD_CMD_WRITE",
        CMD_DISC => "NBD_CMD_DISC",
        CMD_FLUSH => "NBD_CMD_FLUSH",
        CMD_TRIM => "NBD_CMD_TRIM",
        CMD_CACHE => "NBD_CMD_CACHE",
        CMD_WRITE_ZEROES => "NBD_CMD_WRITE_ZEROES",
        CMD_BLOCK_STATUS => "NBD_CMD_BLOCK_STATUS",
        _ => "unknown command",
    }
}

/// The protocol's name of an option, for messages.
pub fn option_name(opt: u32) -> &'static str {
    match opt {
        OPT_EXPORT_NAME => "NBD_OPT_EXPORT_NAME",
        OPT_ABORT => "NBD_OPT_ABORT",
        OPT_LIST => "NBD_OPT_LIST",
        OPT_STARTTLS => "NBD_OPT_STARTTLS",
        OPT_INFO => "NBD_OPT_INFO",
        OPT_GO => "NBD_OPT_GO",
        OPT_STRUCTURED_REPLY => "NBD_OPT_STRUCTURED_REPLY",
        OPT_LIST_META_CONTEXT => "NBD_OPT_LIST_META_CONTEXT",
        OPT_SET_META_CONTEXT => "NBD_OPT_SET_META_CONTEXT",
        OPT_EXTENDED_HEADERS => "NBD_OPT_EXTENDED_HEADERS",
        _ => "unknown option",
    }
}

/// The protocol's name of an option reply type, for messages.
pub fn reply_name(rep: u32) -> &'static str {
    match rep {
        REP_ACK => "NBD_REP_ACK",
        REP_SERVER => "NBD_REP_SERVER",
        REP_INFO => "NBD_REP_INFO",
        REP_META_CONTEXT => "NBD_REP_META_CONTEXT",
        REP_ERR_UNSUP => "NBD_REP_ERR_UNSUP",
        REP_ERR_POLICY => "NBD_REP_ERR_POLICY",
        REP_ERR_INVALID => "NBD_REP_ERR_INVALID",
        REP_ERR_PLATFORM => "NBD_REP_ERR_PLATFORM",
        REP_ERR_TLS_REQD => "NBD_REP_ERR_TLS_REQD",
        REP_ERR_UNKNOWN => "NBD_REP_ERR_UNKNOWN",
        REP_ERR_SHUTDOWN => "NBD_REP_ERR_SHUTDOWN",
        REP_ERR_BLOCK_SIZE_REQD => "NBD_REP_ERR_BLOCK_SIZE_REQD",
        REP_ERR_TOO_BIG => "NBD_REP_ERR_TOO_BIG",
        REP_ERR_EXT_HEADER_REQD => "NBD_REP_ERR_EXT_HEADER_REQD",
        _ => "unknown reply",
    }
}
