//! The transmission phase: commands, client-side (strict) checks, request encoding, and
//! the reply decoder that owns the table of commands in flight.
//!
//! # Driving it
//!
//! A driver writes requests and reads replies; the two halves may run concurrently (the
//! tokio driver of `nbd-client` runs them as two tasks) or interleaved on one thread (its
//! event-loop driver, which the Node binding polls with libuv). Both follow these rules:
//!
//! * Before sending, [`Session::check`] refuses what libnbd refuses client-side, and
//!   [`Session::encode_request`] appends the request header (the write payload follows it
//!   on the wire, sent from the caller's buffer).
//! * [`ReplyDecoder::register`] must learn of a command before its request can be answered,
//!   i.e. before the request is written.
//! * The reader feeds what it has read to [`ReplyDecoder::decode`] and acts on the
//!   [`Event`]s:
//!
//! ```text
//! loop {
//!     match decoder.decode(&input)? {
//!         Decoded { consumed: 0, event: None } => read more into input,
//!         Decoded { consumed, event } => {
//!             input.drain(..consumed);
//!             match event {
//!                 Some(Event::ReadData { cookie, buf_offset, len }) => {
//!                     // the next `len` bytes of the stream are read data: move them into
//!                     // the command's buffer at `buf_offset`, then:
//!                     decoder.payload_done();
//!                 }
//!                 Some(Event::ReadHole { cookie, buf_offset, len }) => zero that range,
//!                 Some(Event::Done { cookie, user, result }) => complete the command,
//!                 None => {}
//!             }
//!         }
//!     }
//! }
//! ```
//!
//! An `Err(Fatal)` means the server broke the protocol: the connection is unusable, the
//! command named in it (if any) fails with its error, and [`ReplyDecoder::take_all`]
//! returns every other command so the driver can fail them too.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// Hashes cookies for the in-flight table. Cookies are the driver's own counter, never the
/// peer's choice, so a multiplicative hash spreads them well and costs one instruction
/// (the default SipHash defends against keys an attacker picks, which these are not; a
/// reply naming an unknown cookie is only looked up, never inserted).
#[derive(Default)]
struct CookieHasher(u64);

impl Hasher for CookieHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

type CookieMap<V> = HashMap<u64, V, BuildHasherDefault<CookieHasher>>;

use crate::consts::*;
use crate::errno::Errno;
use crate::error::{Error, Result};
use crate::handshake::Negotiated;
use crate::wire::{put_u16, put_u32, put_u64, server_text, Reader};

/// A transmission-phase command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandKind {
    Read,
    Write,
    Flush,
    Trim,
    Cache,
    WriteZeroes,
    BlockStatus,
    Disconnect,
}

impl CommandKind {
    /// The command's number on the wire.
    pub fn code(self) -> u16 {
        match self {
            CommandKind::Read => CMD_READ,
            CommandKind::Write => CMD_WRITE,
            CommandKind::Flush => CMD_FLUSH,
            CommandKind::Trim => CMD_TRIM,
            CommandKind::Cache => CMD_CACHE,
            CommandKind::WriteZeroes => CMD_WRITE_ZEROES,
            CommandKind::BlockStatus => CMD_BLOCK_STATUS,
            CommandKind::Disconnect => CMD_DISC,
        }
    }

    /// Flags that belong with this command (libnbd's `STRICT_FLAGS` check).
    fn permitted_flags(self) -> u16 {
        match self {
            CommandKind::Read => CMD_FLAG_DF,
            CommandKind::Write => CMD_FLAG_FUA | CMD_FLAG_PAYLOAD_LEN,
            CommandKind::Trim => CMD_FLAG_FUA,
            CommandKind::WriteZeroes => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
            CommandKind::BlockStatus => CMD_FLAG_REQ_ONE | CMD_FLAG_PAYLOAD_LEN,
            CommandKind::Flush | CommandKind::Cache | CommandKind::Disconnect => 0,
        }
    }

    fn modifies(self) -> bool {
        matches!(
            self,
            CommandKind::Write | CommandKind::Trim | CommandKind::WriteZeroes
        )
    }
}

/// One command as the application asked for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Command {
    pub kind: CommandKind,
    pub offset: u64,
    pub length: u64,
    /// Flags as given by the application; [`Session::check`] refuses bits above 16.
    pub flags: u32,
}

/// What the handshake settled, needed to check and frame commands.
#[derive(Debug, Clone)]
pub struct Session {
    pub negotiated: Negotiated,
}

impl Session {
    /// A session after `negotiated`.
    pub fn new(negotiated: Negotiated) -> Session {
        Session { negotiated }
    }

    /// Refuses, without any traffic, what libnbd refuses client-side under the strict-mode
    /// bits `strict` (`STRICT_*`); returns the 16-bit flags to put on the wire.
    pub fn check(&self, cmd: &Command, strict_mode: u32) -> Result<u16> {
        let export = &self.negotiated.export;
        let strict = |bit: u32| strict_mode & bit != 0;
        let usage = |errno: Errno, message: String| Error::usage(errno, message);

        if cmd.flags > 0xffff {
            return Err(usage(
                Errno::EINVAL,
                format!("flags {:#x} do not fit the protocol's 16 bits", cmd.flags),
            ));
        }
        let mut flags = cmd.flags as u16;
        if strict(STRICT_AUTO_FLAG) {
            // The payload length flag follows the framing, whatever the caller passed: a
            // write carries it exactly when extended headers are on; an unfiltered block
            // status never does (the filtered form adds it when it encodes the filter).
            match cmd.kind {
                CommandKind::Write if self.negotiated.extended_headers => flags |= CMD_FLAG_PAYLOAD_LEN,
                CommandKind::Write | CommandKind::BlockStatus => flags &= !CMD_FLAG_PAYLOAD_LEN,
                _ => {}
            }
        }
        if strict(STRICT_FLAGS) {
            let permitted = cmd.kind.permitted_flags();
            if flags & !permitted != 0 {
                return Err(usage(
                    Errno::EINVAL,
                    format!(
                        "flags {:#x} are not valid for {}",
                        flags & !permitted,
                        command_name(cmd.kind.code())
                    ),
                ));
            }
        }

        if matches!(cmd.kind, CommandKind::Read | CommandKind::Write) {
            // Reads and writes are always capped at 64 MiB; the (smaller) payload maximum
            // applies to what the client sends, i.e. writes (libnbd's STRICT_PAYLOAD).
            if cmd.length > MAX_PAYLOAD_HARD as u64 {
                return Err(usage(
                    Errno::ERANGE,
                    format!(
                        "request too large: {} bytes, the maximum is {MAX_PAYLOAD_HARD}",
                        cmd.length
                    ),
                ));
            }
            let payload_max = export.payload_max() as u64;
            if cmd.kind == CommandKind::Write && strict(STRICT_PAYLOAD) && cmd.length > payload_max {
                return Err(usage(
                    Errno::ERANGE,
                    format!(
                        "request too large: {} bytes, the payload maximum is {payload_max}",
                        cmd.length
                    ),
                ));
            }
        } else if !self.negotiated.extended_headers && cmd.length > u32::MAX as u64 {
            return Err(usage(
                Errno::ERANGE,
                format!(
                    "count {} needs extended headers, which were not negotiated",
                    cmd.length
                ),
            ));
        }

        if strict(STRICT_COMMANDS) {
            if cmd.kind == CommandKind::BlockStatus {
                self.check_block_status_possible()?;
            }
            if cmd.kind.modifies() && export.has(FLAG_READ_ONLY) {
                return Err(usage(
                    Errno::EPERM,
                    "server does not support write operations (the export is read-only)".into(),
                ));
            }
            let (needed, what) = match cmd.kind {
                CommandKind::Flush => (FLAG_SEND_FLUSH, "flush"),
                CommandKind::Trim => (FLAG_SEND_TRIM, "trim"),
                CommandKind::WriteZeroes => (FLAG_SEND_WRITE_ZEROES, "zero"),
                CommandKind::Cache => (FLAG_SEND_CACHE, "cache"),
                _ => (0, ""),
            };
            if needed != 0 && !export.has(needed) {
                return Err(usage(
                    Errno::EINVAL,
                    format!("server does not support {what} operations"),
                ));
            }
            if flags & CMD_FLAG_FUA != 0 && !export.has(FLAG_SEND_FUA) {
                return Err(usage(Errno::EINVAL, "server does not support the FUA flag".into()));
            }
            if flags & CMD_FLAG_FAST_ZERO != 0 && !export.has(FLAG_SEND_FAST_ZERO) {
                return Err(usage(
                    Errno::EINVAL,
                    "server does not support the fast zero flag".into(),
                ));
            }
            if flags & CMD_FLAG_DF != 0
                && !(export.has(FLAG_SEND_DF) && self.negotiated.structured_replies)
            {
                return Err(usage(Errno::EINVAL, "server does not support the DF flag".into()));
            }
        }

        let ranged = cmd.kind != CommandKind::Flush && cmd.kind != CommandKind::Disconnect;
        if ranged && strict(STRICT_ZERO_SIZE) && cmd.length == 0 {
            return Err(usage(Errno::EINVAL, "count cannot be 0".into()));
        }
        if ranged && strict(STRICT_BOUNDS) {
            let end = cmd.offset.checked_add(cmd.length);
            if end.is_none_or(|end| end > export.size) {
                // libnbd's errno: no space for what modifies, an invalid range for the rest.
                let errno = if cmd.kind.modifies() { Errno::ENOSPC } else { Errno::EINVAL };
                return Err(usage(
                    errno,
                    format!(
                        "request out of bounds: offset {} + count {} is beyond the export size {}",
                        cmd.offset, cmd.length, export.size
                    ),
                ));
            }
        }
        if ranged && strict(STRICT_ALIGN) {
            if let Some(bs) = export.block_size {
                let min = bs.minimum as u64;
                if min > 1 && (cmd.offset % min != 0 || cmd.length % min != 0) {
                    return Err(usage(
                        Errno::EINVAL,
                        format!(
                            "request is not aligned to the server's minimum block size {min} \
                             (offset {}, count {})",
                            cmd.offset, cmd.length
                        ),
                    ));
                }
            }
        }
        Ok(flags)
    }

    /// Block status needs structured replies and a negotiated meta context (checked under
    /// `STRICT_COMMANDS` only, as libnbd: without it the request goes to the server).
    fn check_block_status_possible(&self) -> Result<()> {
        if !self.negotiated.structured_replies {
            return Err(Error::usage(
                Errno::ENOTSUP,
                "server does not support structured replies, which block status needs",
            ));
        }
        if !self.negotiated.meta_valid || self.negotiated.meta_contexts.is_empty() {
            return Err(Error::usage(
                Errno::ENOTSUP,
                "did not negotiate any metadata contexts: add one (e.g. base:allocation) before \
                 connecting, and the server must support it",
            ));
        }
        Ok(())
    }

    /// The context ids for a block status request filtered to `names`
    /// (`nbd_block_status_filter`), in the order given. Extended headers are needed
    /// always; under `STRICT_COMMANDS` also the server's `NBD_FLAG_BLOCK_STAT_PAYLOAD` and a
    /// negotiated context. Every name must have been negotiated. An empty filter and a
    /// name given twice are sent as they are, for the server to judge (as libnbd does:
    /// that is how servers are tested).
    pub fn block_status_filter(&self, names: &[String], strict_mode: u32) -> Result<Vec<u32>> {
        if !self.negotiated.extended_headers {
            return Err(Error::usage(
                Errno::ENOTSUP,
                "filtered block status needs extended headers, which were not negotiated",
            ));
        }
        if strict_mode & STRICT_COMMANDS != 0 {
            if !self.negotiated.export.has(FLAG_BLOCK_STAT_PAYLOAD) {
                return Err(Error::usage(
                    Errno::EINVAL,
                    "server does not support the block status payload flag \
                     (NBD_FLAG_BLOCK_STAT_PAYLOAD), so block status cannot be filtered",
                ));
            }
            self.check_block_status_possible()?;
        }
        names
            .iter()
            .map(|name| {
                let id = self.negotiated.meta_valid.then(|| self.negotiated.meta_context_id(name));
                id.flatten().ok_or_else(|| {
                    Error::usage(
                        Errno::EINVAL,
                        format!("meta context {name:?} was not negotiated, so it cannot be filtered on"),
                    )
                })
            })
            .collect()
    }

    /// Appends a block status request filtered to context `ids` (from
    /// [`Session::block_status_filter`]): the header with `NBD_CMD_FLAG_PAYLOAD_LEN`, then
    /// the effect length and the ids.
    pub fn encode_block_status_filter(&self, cookie: u64, cmd: &Command, flags: u16, ids: &[u32], out: &mut Vec<u8>) {
        let payload = 8 + 4 * ids.len() as u64;
        let header = Command { length: payload, ..*cmd };
        self.encode_request(cookie, &header, flags | CMD_FLAG_PAYLOAD_LEN, out);
        put_u64(out, cmd.length);
        for id in ids {
            put_u32(out, *id);
        }
    }

    /// Appends the request header for `cmd` (already checked, `flags` as returned by
    /// [`Session::check`]).
    pub fn encode_request(&self, cookie: u64, cmd: &Command, flags: u16, out: &mut Vec<u8>) {
        if self.negotiated.extended_headers {
            put_u32(out, EXTENDED_REQUEST_MAGIC);
            put_u16(out, flags);
            put_u16(out, cmd.kind.code());
            put_u64(out, cookie);
            put_u64(out, cmd.offset);
            put_u64(out, cmd.length);
        } else {
            put_u32(out, REQUEST_MAGIC);
            put_u16(out, flags);
            put_u16(out, cmd.kind.code());
            put_u64(out, cookie);
            put_u64(out, cmd.offset);
            put_u32(out, cmd.length as u32);
        }
    }

    /// Bytes of a request header in this session.
    pub fn request_header_len(&self) -> usize {
        if self.negotiated.extended_headers {
            32
        } else {
            28
        }
    }
}

/// What the reader must do next.
#[derive(Debug)]
pub enum Event<T> {
    /// The next `len` bytes of the stream are data of read `cookie`, to be placed at
    /// `buf_offset` of its buffer. Call [`ReplyDecoder::payload_done`] after consuming them.
    ReadData { cookie: u64, buf_offset: usize, len: usize },
    /// Bytes `buf_offset..buf_offset+len` of read `cookie`'s buffer are a hole (zeroes).
    ReadHole { cookie: u64, buf_offset: usize, len: usize },
    /// Command `cookie` has finished; its user data comes back, with what the decoder
    /// gathered for it (block status extents, read chunks), even when it failed.
    Done {
        cookie: u64,
        user: T,
        result: Result<()>,
        detail: Detail,
    },
}

/// One extent of a block status reply: `length` bytes at `offset` with context-specific
/// `flags`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
    pub flags: u64,
}

/// The extents one meta context reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContextExtents {
    pub context_id: u32,
    pub name: String,
    pub extents: Vec<Extent>,
}

/// What a chunk of a structured read said about a range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkStatus {
    Data,
    Hole,
    /// The server reported an error at `offset` (length 0), or for the whole request.
    Error,
}

/// One chunk of a structured read, with an absolute offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadChunk {
    pub offset: u64,
    pub length: u64,
    pub status: ChunkStatus,
}

/// What a command's reply carried besides data.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Detail {
    #[default]
    None,
    /// Block status: one entry per context that answered, in the order they came.
    Extents(Vec<ContextExtents>),
    /// A read registered with `record_chunks`: its chunks in the order they came (a simple
    /// reply's data is one data chunk).
    Chunks(Vec<ReadChunk>),
}

/// Extra bookkeeping for a command (see [`ReplyDecoder::register_with`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tracking {
    /// Block status filtered to these context ids.
    pub filter: Option<Vec<u32>>,
    /// Record the chunks of a read ([`Detail::Chunks`]).
    pub record_chunks: bool,
}

/// One call's worth of decoding: `consumed` bytes of input were used. Nothing consumed and
/// no event means more input is needed.
#[derive(Debug)]
pub struct Decoded<T> {
    pub consumed: usize,
    pub event: Option<Event<T>>,
}

/// A protocol violation: the connection cannot continue.
#[derive(Debug)]
pub struct Fatal<T> {
    pub error: Error,
    /// The command the bad reply was for, when it could be told, with its user data.
    pub command: Option<(u64, T)>,
}

#[derive(Debug)]
struct InFlight<T> {
    cmd: Command,
    user: T,
    error: Option<Error>,
    filter: Option<Vec<u32>>,
    detail: Detail,
    /// Reads: bytes of data and holes the server has sent so far (saturating). A read
    /// that finishes without an error must have been covered exactly.
    seen: u64,
}

/// The table of commands in flight, and the decoder of the replies to them.
#[derive(Debug)]
pub struct ReplyDecoder<T> {
    structured: bool,
    extended: bool,
    contexts: Vec<(u32, String)>,
    export_size: u64,
    table: CookieMap<InFlight<T>>,
    /// Set between a `ReadData` event and `payload_done`: (cookie, reply is done).
    in_payload: Option<(u64, bool)>,
    /// A command whose final chunk has been consumed and whose `Done` is still to report.
    finished: Option<u64>,
}

const SIMPLE_HEADER: usize = 16;
const STRUCTURED_HEADER: usize = 20;
const EXTENDED_HEADER: usize = 32;

impl<T> ReplyDecoder<T> {
    /// A decoder for replies in the framing that `negotiated` settled.
    pub fn new(negotiated: &Negotiated) -> ReplyDecoder<T> {
        ReplyDecoder {
            structured: negotiated.structured_replies,
            extended: negotiated.extended_headers,
            export_size: negotiated.export.size,
            contexts: negotiated
                .meta_contexts
                .iter()
                .map(|m| (m.id, m.name.clone()))
                .collect(),
            table: CookieMap::default(),
            in_payload: None,
            finished: None,
        }
    }

    /// Records a command about to be sent.
    pub fn register(&mut self, cookie: u64, cmd: Command, user: T) {
        self.register_with(cookie, cmd, Tracking::default(), user);
    }

    /// Records a command about to be sent, with extra bookkeeping.
    pub fn register_with(&mut self, cookie: u64, cmd: Command, tracking: Tracking, user: T) {
        let detail = if tracking.record_chunks && cmd.kind == CommandKind::Read {
            Detail::Chunks(Vec::new())
        } else if cmd.kind == CommandKind::BlockStatus {
            Detail::Extents(Vec::new())
        } else {
            Detail::None
        };
        self.table.insert(
            cookie,
            InFlight {
                cmd,
                user,
                error: None,
                filter: tracking.filter,
                detail,
                seen: 0,
            },
        );
    }

    /// The user data of a command in flight.
    pub fn user_mut(&mut self, cookie: u64) -> Option<&mut T> {
        self.table.get_mut(&cookie).map(|f| &mut f.user)
    }

    /// Forgets a command whose request never reached the server (or whose connection is
    /// being abandoned); its user data comes back.
    pub fn unregister(&mut self, cookie: u64) -> Option<T> {
        if self.in_payload.is_some_and(|(c, _)| c == cookie) || self.finished == Some(cookie) {
            return None;
        }
        self.table.remove(&cookie).map(|f| f.user)
    }

    /// Commands in flight.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    /// True when no command is in flight.
    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// Removes every command in flight (after a fatal error or a lost connection).
    pub fn take_all(&mut self) -> Vec<(u64, T)> {
        self.in_payload = None;
        self.finished = None;
        self.table.drain().map(|(c, f)| (c, f.user)).collect()
    }

    /// Reports that the payload announced by the last `ReadData` has been consumed.
    pub fn payload_done(&mut self) {
        if let Some((cookie, done)) = self.in_payload.take() {
            if done {
                self.finished = Some(cookie);
            }
        }
    }

    /// Decodes at most one event from the front of `input`.
    pub fn decode(&mut self, input: &[u8]) -> Result<Decoded<T>, Fatal<T>> {
        assert!(
            self.in_payload.is_none(),
            "ReplyDecoder::decode called before payload_done"
        );
        if let Some(cookie) = self.finished.take() {
            return Ok(self.done(cookie, 0));
        }
        let mut r = Reader::new(input);
        let Some(magic) = r.u32() else { return Ok(need_more()) };
        match magic {
            SIMPLE_REPLY_MAGIC => self.simple(input),
            STRUCTURED_REPLY_MAGIC if self.structured && !self.extended => {
                if input.len() < STRUCTURED_HEADER {
                    return Ok(need_more());
                }
                let flags = r.u16().unwrap();
                let kind = r.u16().unwrap();
                let cookie = r.u64().unwrap();
                let length = r.u32().unwrap() as u64;
                self.chunk(input, STRUCTURED_HEADER, flags, kind, cookie, length)
            }
            EXTENDED_REPLY_MAGIC if self.extended => {
                if input.len() < EXTENDED_HEADER {
                    return Ok(need_more());
                }
                let flags = r.u16().unwrap();
                let kind = r.u16().unwrap();
                let cookie = r.u64().unwrap();
                let _offset = r.u64().unwrap();
                let length = r.u64().unwrap();
                self.chunk(input, EXTENDED_HEADER, flags, kind, cookie, length)
            }
            STRUCTURED_REPLY_MAGIC | EXTENDED_REPLY_MAGIC => {
                // Every reply framing has the cookie at bytes 8..16: blame that command.
                let cookie = input
                    .get(8..16)
                    .map(|b| u64::from_be_bytes(b.try_into().unwrap()))
                    .filter(|c| self.table.contains_key(c));
                if cookie.is_none() && input.len() < 16 {
                    return Ok(need_more());
                }
                Err(self.fatal(
                    cookie,
                    format!(
                        "server sent a reply with magic {magic:#010x}, a framing that was not \
                         negotiated"
                    ),
                ))
            }
            _ => Err(self.fatal(None, format!("server sent a reply with unknown magic {magic:#010x}"))),
        }
    }

    fn simple(&mut self, input: &[u8]) -> Result<Decoded<T>, Fatal<T>> {
        if input.len() < SIMPLE_HEADER {
            return Ok(need_more());
        }
        let mut r = Reader::new(&input[4..SIMPLE_HEADER]);
        let error = r.u32().unwrap();
        let cookie = r.u64().unwrap();
        let Some(entry) = self.table.get(&cookie) else {
            return Err(self.fatal(None, format!("server replied to unknown cookie {cookie}")));
        };
        let cmd = entry.cmd;
        if self.extended {
            return Err(self.fatal(
                Some(cookie),
                "server sent a simple reply although extended headers were negotiated",
            ));
        }
        if error != 0 {
            let errno = Errno::from_nbd_error(error);
            let e = Error::server(
                errno,
                format!(
                    "server failed {} at offset {} (length {}) with error {error} ({errno})",
                    command_name(cmd.kind.code()),
                    cmd.offset,
                    cmd.length
                ),
            );
            self.table.get_mut(&cookie).unwrap().error.get_or_insert(e);
            return Ok(self.done(cookie, SIMPLE_HEADER));
        }
        if cmd.kind == CommandKind::Read {
            if self.structured {
                return Err(self.fatal(
                    Some(cookie),
                    "server sent a simple reply with data to NBD_CMD_READ although structured \
                     replies were negotiated",
                ));
            }
            self.table.get_mut(&cookie).unwrap().seen = cmd.length;
            if cmd.length > 0 {
                // Without structured replies the whole read comes as one data chunk.
                self.record_chunk(cookie, cmd.offset, cmd.length, ChunkStatus::Data);
            }
            self.in_payload = Some((cookie, true));
            return Ok(Decoded {
                consumed: SIMPLE_HEADER,
                event: Some(Event::ReadData {
                    cookie,
                    buf_offset: 0,
                    len: cmd.length as usize,
                }),
            });
        }
        Ok(self.done(cookie, SIMPLE_HEADER))
    }

    fn chunk(
        &mut self,
        input: &[u8],
        header: usize,
        flags: u16,
        kind: u16,
        cookie: u64,
        length: u64,
    ) -> Result<Decoded<T>, Fatal<T>> {
        let Some(entry) = self.table.get(&cookie) else {
            return Err(self.fatal(None, format!("server replied to unknown cookie {cookie}")));
        };
        let cmd = entry.cmd;
        let done = flags & REPLY_FLAG_DONE != 0;
        let name = command_name(cmd.kind.code());

        if kind == REPLY_TYPE_OFFSET_DATA {
            if cmd.kind != CommandKind::Read {
                return Err(self.fatal(Some(cookie), format!("server sent read data in reply to {name}")));
            }
            if length <= 8 {
                return Err(self.fatal(
                    Some(cookie),
                    format!("NBD_REPLY_TYPE_OFFSET_DATA chunk of length {length} carries no data"),
                ));
            }
            if input.len() < header + 8 {
                return Ok(need_more());
            }
            let offset = Reader::new(&input[header..header + 8]).u64().unwrap();
            let len = length - 8;
            let buf_offset = self.in_range(cookie, &cmd, offset, len, "data")?;
            self.record_chunk(cookie, offset, len, ChunkStatus::Data);
            self.add_seen(cookie, len);
            self.in_payload = Some((cookie, done));
            return Ok(Decoded {
                consumed: header + 8,
                event: Some(Event::ReadData {
                    cookie,
                    buf_offset,
                    len: len as usize,
                }),
            });
        }

        if kind == REPLY_TYPE_BLOCK_STATUS || kind == REPLY_TYPE_BLOCK_STATUS_EXT {
            return self.block_status(input, header, kind, cookie, length, done, &cmd);
        }

        // Every other chunk is metadata, read whole; refuse absurd lengths before waiting.
        if length > MAX_CHUNK_METADATA as u64 {
            return Err(self.fatal(
                Some(cookie),
                format!(
                    "server sent a reply chunk of type {kind} claiming {length} bytes, more than \
                     the {MAX_CHUNK_METADATA} allowed"
                ),
            ));
        }
        let total = header + length as usize;
        if input.len() < total {
            return Ok(need_more());
        }
        let payload = &input[header..total];

        match kind {
            REPLY_TYPE_NONE => {
                if length != 0 || !done {
                    return Err(self.fatal(
                        Some(cookie),
                        "NBD_REPLY_TYPE_NONE chunk must be empty and final",
                    ));
                }
                Ok(self.done(cookie, total))
            }
            REPLY_TYPE_OFFSET_HOLE => {
                if cmd.kind != CommandKind::Read {
                    return Err(self.fatal(Some(cookie), format!("server sent a hole in reply to {name}")));
                }
                if length != 12 {
                    return Err(self.fatal(
                        Some(cookie),
                        format!("NBD_REPLY_TYPE_OFFSET_HOLE chunk has length {length}, not 12"),
                    ));
                }
                let mut r = Reader::new(payload);
                let offset = r.u64().unwrap();
                let len = r.u32().unwrap() as u64;
                if len == 0 {
                    return Err(self.fatal(Some(cookie), "server sent a hole of length 0"));
                }
                let buf_offset = self.in_range(cookie, &cmd, offset, len, "hole")?;
                self.record_chunk(cookie, offset, len, ChunkStatus::Hole);
                self.add_seen(cookie, len);
                if done {
                    self.finished = Some(cookie);
                }
                Ok(Decoded {
                    consumed: total,
                    event: Some(Event::ReadHole {
                        cookie,
                        buf_offset,
                        len: len as usize,
                    }),
                })
            }
            _ if kind & (1 << 15) != 0 => {
                let e = self.error_chunk(cookie, &cmd, kind, payload)?;
                self.table.get_mut(&cookie).unwrap().error.get_or_insert(e);
                if done {
                    Ok(self.done(cookie, total))
                } else {
                    Ok(Decoded {
                        consumed: total,
                        event: None,
                    })
                }
            }
            _ => Err(self.fatal(
                Some(cookie),
                format!("server sent reply chunk type {kind}, which is unknown or invalid for {name}"),
            )),
        }
    }

    fn error_chunk(
        &mut self,
        cookie: u64,
        cmd: &Command,
        kind: u16,
        payload: &[u8],
    ) -> Result<Error, Fatal<T>> {
        let mut r = Reader::new(payload);
        let (Some(error), Some(msg_len)) = (r.u32(), r.u16()) else {
            return Err(self.fatal(Some(cookie), "error chunk shorter than its error and length fields"));
        };
        let Some(msg) = r.take(msg_len as usize) else {
            return Err(self.fatal(
                Some(cookie),
                format!("error chunk message claims {msg_len} bytes, more than the chunk holds"),
            ));
        };
        let tail = r.rest();
        let mut where_ = String::new();
        match kind {
            REPLY_TYPE_ERROR if tail.is_empty() => {
                self.record_chunk(cookie, cmd.offset, 0, ChunkStatus::Error);
            }
            REPLY_TYPE_ERROR_OFFSET if tail.len() == 8 => {
                let offset = Reader::new(tail).u64().unwrap();
                self.in_range(cookie, cmd, offset, 1, "error offset")?;
                self.record_chunk(cookie, offset, 0, ChunkStatus::Error);
                where_ = format!(" at offset {offset}");
            }
            REPLY_TYPE_ERROR | REPLY_TYPE_ERROR_OFFSET => {
                return Err(self.fatal(
                    Some(cookie),
                    format!("error chunk of type {kind} has {} unexpected trailing bytes", tail.len()),
                ))
            }
            // Unknown error types still start with an error and a message (specification).
            _ => {}
        }
        if error == 0 {
            return Err(self.fatal(Some(cookie), "server sent an error chunk with error number 0"));
        }
        let errno = Errno::from_nbd_error(error);
        let mut message = format!(
            "server failed {} at offset {} (length {}){where_} with error {error} ({errno})",
            command_name(cmd.kind.code()),
            cmd.offset,
            cmd.length
        );
        if !msg.is_empty() {
            message.push_str(": ");
            message.push_str(&server_text(msg));
        }
        Ok(Error::server(errno, message))
    }

    /// Checks that `offset..offset+len` lies within the command's range; returns the
    /// position relative to the command's offset.
    fn in_range(
        &mut self,
        cookie: u64,
        cmd: &Command,
        offset: u64,
        len: u64,
        what: &str,
    ) -> Result<usize, Fatal<T>> {
        // Without strict bounds a request may run past 2^64: saturate, never overflow.
        let cmd_end = cmd.offset.saturating_add(cmd.length);
        let inside = offset >= cmd.offset
            && offset.checked_add(len).is_some_and(|end| end <= cmd_end);
        if inside {
            Ok((offset - cmd.offset) as usize)
        } else {
            Err(self.fatal(
                Some(cookie),
                format!(
                    "server sent {what} for {}..{} outside the requested {}..{}",
                    offset,
                    offset.saturating_add(len),
                    cmd.offset,
                    cmd_end
                ),
            ))
        }
    }

    fn add_seen(&mut self, cookie: u64, len: u64) {
        let entry = self.table.get_mut(&cookie).expect("command is in the table");
        entry.seen = entry.seen.saturating_add(len);
    }

    fn done(&mut self, cookie: u64, consumed: usize) -> Decoded<T> {
        let entry = self.table.remove(&cookie).expect("finished command is in the table");
        let cmd = entry.cmd;
        // A read the server calls successful must have had every byte accounted for, as
        // libnbd checks: missing (or doubly sent) data fails the read with EIO, and the
        // connection goes on, since the framing is intact.
        let result = match entry.error {
            Some(e) => Err(e),
            None if cmd.kind == CommandKind::Read && entry.seen != cmd.length => {
                let what = if entry.seen < cmd.length {
                    format!("covered only {} of {} bytes", entry.seen, cmd.length)
                } else {
                    format!(
                        "sent {} bytes of data and holes for {} requested (overlapping chunks)",
                        entry.seen, cmd.length
                    )
                };
                Err(Error::server(
                    Errno::EIO,
                    format!(
                        "server's reply to NBD_CMD_READ at offset {} (length {}) {what}",
                        cmd.offset, cmd.length
                    ),
                ))
            }
            None => Ok(()),
        };
        Decoded {
            consumed,
            event: Some(Event::Done {
                cookie,
                user: entry.user,
                result,
                detail: entry.detail,
            }),
        }
    }

    fn record_chunk(&mut self, cookie: u64, offset: u64, length: u64, status: ChunkStatus) {
        if let Some(InFlight { detail: Detail::Chunks(chunks), .. }) = self.table.get_mut(&cookie) {
            chunks.push(ReadChunk { offset, length, status });
        }
    }

    /// A block status chunk (32-bit descriptors without extended headers, 64-bit with).
    #[allow(clippy::too_many_arguments)]
    fn block_status(
        &mut self,
        input: &[u8],
        header: usize,
        kind: u16,
        cookie: u64,
        length: u64,
        done: bool,
        cmd: &Command,
    ) -> Result<Decoded<T>, Fatal<T>> {
        let wide = kind == REPLY_TYPE_BLOCK_STATUS_EXT;
        let type_name = if wide { "NBD_REPLY_TYPE_BLOCK_STATUS_EXT" } else { "NBD_REPLY_TYPE_BLOCK_STATUS" };
        if cmd.kind != CommandKind::BlockStatus {
            return Err(self.fatal(
                Some(cookie),
                format!("server sent {type_name} in reply to {}", command_name(cmd.kind.code())),
            ));
        }
        if wide != self.extended {
            return Err(self.fatal(
                Some(cookie),
                format!(
                    "server sent {type_name}, which is not the block status format for {} headers",
                    if self.extended { "extended" } else { "compact" }
                ),
            ));
        }
        let (prefix, descriptor) = if wide { (8u64, 16u64) } else { (4u64, 8u64) };
        if length > MAX_BLOCK_STATUS_CHUNK as u64 {
            return Err(self.fatal(
                Some(cookie),
                format!(
                    "{type_name} chunk claims {length} bytes, more than the \
                     {MAX_BLOCK_STATUS_CHUNK} allowed"
                ),
            ));
        }
        if length < prefix + descriptor || (length - prefix) % descriptor != 0 {
            return Err(self.fatal(
                Some(cookie),
                format!(
                    "{type_name} chunk of {length} bytes does not hold a context id and whole \
                     descriptors of {descriptor} bytes"
                ),
            ));
        }
        let total = header + length as usize;
        if input.len() < total {
            return Ok(need_more());
        }
        let mut r = Reader::new(&input[header..total]);
        let context_id = r.u32().unwrap();
        let count = (length - prefix) / descriptor;
        if wide {
            let claimed = r.u32().unwrap() as u64;
            if claimed != count {
                return Err(self.fatal(
                    Some(cookie),
                    format!("{type_name} chunk says {claimed} descriptors but holds {count}"),
                ));
            }
        }
        let Some(name) = self
            .contexts
            .iter()
            .find(|(id, _)| *id == context_id)
            .map(|(_, name)| name.clone())
        else {
            return Err(self.fatal(
                Some(cookie),
                format!("server sent block status for context id {context_id}, which was never negotiated"),
            ));
        };
        let entry = self.table.get(&cookie).expect("checked above");
        if let Some(filter) = &entry.filter {
            if !filter.contains(&context_id) {
                return Err(self.fatal(
                    Some(cookie),
                    format!("server sent block status for context {name:?}, which the request filtered out"),
                ));
            }
        }
        if let Detail::Extents(list) = &entry.detail {
            if list.iter().any(|c| c.context_id == context_id) {
                return Err(self.fatal(
                    Some(cookie),
                    format!("server sent block status for context {name:?} twice in one reply"),
                ));
            }
        }
        let cmd_end = cmd.offset.saturating_add(cmd.length);
        let mut offset = cmd.offset;
        let mut extents = Vec::with_capacity(count as usize);
        for i in 0..count {
            let (len, flags) = if wide {
                (r.u64().unwrap(), r.u64().unwrap())
            } else {
                (r.u32().unwrap() as u64, r.u32().unwrap() as u64)
            };
            if len == 0 {
                return Err(self.fatal(
                    Some(cookie),
                    format!("server sent a zero-length extent (descriptor {i}) for context {name:?}"),
                ));
            }
            if offset >= cmd_end {
                return Err(self.fatal(
                    Some(cookie),
                    format!(
                        "server sent an extent at {offset} for context {name:?}, past the \
                         requested {}..{cmd_end}",
                        cmd.offset
                    ),
                ));
            }
            if offset.checked_add(len).is_none_or(|end| end > self.export_size) {
                return Err(self.fatal(
                    Some(cookie),
                    format!(
                        "server sent an extent {offset}+{len} for context {name:?}, past the end \
                         of the export ({} bytes)",
                        self.export_size
                    ),
                ));
            }
            extents.push(Extent { offset, length: len, flags });
            // Only the final extent may run past the request; saturate so a hostile length
            // cannot wrap around.
            offset = offset.saturating_add(len);
        }
        if let Some(InFlight { detail: Detail::Extents(list), .. }) = self.table.get_mut(&cookie) {
            list.push(ContextExtents { context_id, name, extents });
        }
        if done {
            Ok(self.done(cookie, total))
        } else {
            Ok(Decoded { consumed: total, event: None })
        }
    }

    fn fatal(&mut self, cookie: Option<u64>, message: impl Into<String>) -> Fatal<T> {
        let command = cookie.and_then(|c| self.table.remove(&c).map(|f| (c, f.user)));
        Fatal {
            error: Error::protocol(message),
            command,
        }
    }
}

fn need_more<T>() -> Decoded<T> {
    Decoded {
        consumed: 0,
        event: None,
    }
}
