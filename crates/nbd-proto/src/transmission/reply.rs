//! The reply decoder: turns the server's reply bytes into [`Event`]s for the commands in
//! the in-flight table (`in_flight.rs`), checking every reply against the command it
//! answers (see the module documentation of [`transmission`](super) for the run loop).

use crate::consts::*;
use crate::errno::Errno;
use crate::error::{Error, Result};
use crate::handshake::Negotiated;
use crate::wire::{server_message, FieldReader};

use super::command::{Command, CommandKind};
use super::in_flight::{ChunkStatus, ContextExtents, Detail, Extent, InFlightTable, Tracking};

/// What the reader must do next.
#[derive(Debug)]
pub enum Event<T> {
    /// The next `len` bytes of the stream are data of read `cookie`, to be placed at
    /// `buf_offset` of its buffer. Call [`ReplyDecoder::payload_done`] after consuming them.
    #[allow(missing_docs)] // the fields are described above
    ReadData { cookie: u64, buf_offset: usize, len: usize },
    /// Bytes `buf_offset..buf_offset+len` of read `cookie`'s buffer are a hole (zeroes).
    #[allow(missing_docs)] // the fields are described above
    ReadHole { cookie: u64, buf_offset: usize, len: usize },
    /// Command `cookie` has finished; its user data comes back, with what the decoder
    /// gathered for it (block status extents, read chunks), even when it failed.
    Done {
        /// The command's cookie.
        cookie: u64,
        /// What the driver registered with it.
        user: T,
        /// Its result: the server's error, or a read not covered exactly.
        result: Result<()>,
        /// What the reply carried besides data.
        detail: Detail,
    },
}

/// One call's worth of decoding: `consumed` bytes of input were used. Nothing consumed and
/// no event means more input is needed.
#[derive(Debug)]
pub struct Decoded<T> {
    /// Bytes of input used; the driver drops them.
    pub consumed: usize,
    /// What to do, if anything.
    pub event: Option<Event<T>>,
}

/// A protocol violation: the connection cannot continue.
#[derive(Debug)]
pub struct Fatal<T> {
    /// The protocol error.
    pub error: Error,
    /// The command to fail with the error, with its user data: the one the bad reply was
    /// for, or, when the reply names no command in flight (an unknown cookie, a bad magic),
    /// the oldest command in flight. `None` only when nothing was in flight.
    pub command: Option<(u64, T)>,
}

/// The decoder of the replies to the commands in flight; it owns the in-flight table
/// (`InFlightTable`, in `transmission/in_flight.rs`) and is how a driver registers
/// commands in it.
#[derive(Debug)]
pub struct ReplyDecoder<T> {
    structured: bool,
    extended: bool,
    contexts: Vec<(u32, String)>,
    export_size: u64,
    table: InFlightTable<T>,
    /// Set between a `ReadData` event and `payload_done`: (cookie, reply is done).
    in_payload: Option<(u64, bool)>,
    /// A command whose final chunk has been consumed and whose `Done` is still to report.
    finished: Option<u64>,
    /// Commands not to blame for a reply that names none (see [`ReplyDecoder::spare_from_blame`]).
    spared: fn(&T) -> bool,
}

const SIMPLE_HEADER: usize = 16;
const STRUCTURED_HEADER: usize = 20;
const EXTENDED_HEADER: usize = 32;

/// The header of one structured or extended reply chunk, with the command it answers.
#[derive(Debug, Clone, Copy)]
struct Chunk {
    /// Bytes of the header (20 structured, 32 extended); the payload follows.
    header: usize,
    /// `NBD_REPLY_FLAG_DONE`: the last chunk of the reply.
    done: bool,
    kind: u16,
    cookie: u64,
    /// Bytes of payload the header announces.
    length: u64,
    cmd: Command,
}

impl Chunk {
    /// Input bytes the whole chunk takes (only once `length` has been checked).
    fn total(&self) -> usize {
        self.header + self.length as usize
    }
}

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
            table: InFlightTable::new(),
            in_payload: None,
            finished: None,
            spared: |_| false,
        }
    }

    /// Tells which commands a protocol violation that names no command in flight must not be
    /// blamed on: those whose caller has stopped waiting (aborted), who would never hear of
    /// it. The oldest of the others takes the blame.
    pub fn spare_from_blame(&mut self, spared: fn(&T) -> bool) {
        self.spared = spared;
    }

    /// Records a command about to be sent.
    pub fn register(&mut self, cookie: u64, cmd: Command, user: T) {
        self.register_with(cookie, cmd, Tracking::default(), user);
    }

    /// Records a command about to be sent, with extra bookkeeping.
    pub fn register_with(&mut self, cookie: u64, cmd: Command, tracking: Tracking, user: T) {
        self.table.insert(cookie, cmd, tracking, user);
    }

    /// The user data of a command in flight.
    pub fn user_mut(&mut self, cookie: u64) -> Option<&mut T> {
        self.table.user_mut(cookie)
    }

    /// Forgets a command whose request never reached the server (or whose connection is
    /// being abandoned); its user data comes back.
    pub fn unregister(&mut self, cookie: u64) -> Option<T> {
        if self.in_payload.is_some_and(|(c, _)| c == cookie) || self.finished == Some(cookie) {
            return None;
        }
        self.table.remove(cookie)
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
        self.table.take_all()
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
        let mut r = FieldReader::new(input);
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
                    .filter(|c| self.table.contains(*c));
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
        let mut r = FieldReader::new(&input[4..SIMPLE_HEADER]);
        let error = r.u32().unwrap();
        let cookie = r.u64().unwrap();
        let Some(entry) = self.table.get(cookie) else {
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
            self.table.fail(cookie, e);
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
            self.table.seen_all(cookie);
            if cmd.length > 0 {
                // Without structured replies the whole read comes as one data chunk.
                self.table.record_chunk(cookie, cmd.offset, cmd.length, ChunkStatus::Data);
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

    /// One structured or extended reply chunk, by type.
    fn chunk(
        &mut self,
        input: &[u8],
        header: usize,
        flags: u16,
        kind: u16,
        cookie: u64,
        length: u64,
    ) -> Result<Decoded<T>, Fatal<T>> {
        let Some(entry) = self.table.get(cookie) else {
            return Err(self.fatal(None, format!("server replied to unknown cookie {cookie}")));
        };
        let c = Chunk {
            header,
            done: flags & REPLY_FLAG_DONE != 0,
            kind,
            cookie,
            length,
            cmd: entry.cmd,
        };
        match kind {
            REPLY_TYPE_OFFSET_DATA => self.offset_data(input, &c),
            REPLY_TYPE_BLOCK_STATUS | REPLY_TYPE_BLOCK_STATUS_EXT => self.block_status(input, &c),
            _ => self.metadata_chunk(input, &c),
        }
    }

    /// `NBD_REPLY_TYPE_OFFSET_DATA`: the header and offset are consumed here; the data
    /// is left to the driver ([`Event::ReadData`]).
    fn offset_data(&mut self, input: &[u8], c: &Chunk) -> Result<Decoded<T>, Fatal<T>> {
        let (cookie, length) = (c.cookie, c.length);
        if c.cmd.kind != CommandKind::Read {
            let name = command_name(c.cmd.kind.code());
            return Err(self.fatal(Some(cookie), format!("server sent read data in reply to {name}")));
        }
        if length <= 8 {
            return Err(self.fatal(
                Some(cookie),
                format!("NBD_REPLY_TYPE_OFFSET_DATA chunk of length {length} carries no data"),
            ));
        }
        if input.len() < c.header + 8 {
            return Ok(need_more());
        }
        let offset = FieldReader::new(&input[c.header..c.header + 8]).u64().unwrap();
        let len = length - 8;
        let buf_offset = self.in_range(cookie, &c.cmd, offset, len, "data")?;
        self.table.record_chunk(cookie, offset, len, ChunkStatus::Data);
        self.table.add_seen(cookie, len);
        self.in_payload = Some((cookie, c.done));
        Ok(Decoded {
            consumed: c.header + 8,
            event: Some(Event::ReadData {
                cookie,
                buf_offset,
                len: len as usize,
            }),
        })
    }

    /// Every other chunk is metadata, read whole once it is in: none, a hole, an error.
    fn metadata_chunk(&mut self, input: &[u8], c: &Chunk) -> Result<Decoded<T>, Fatal<T>> {
        let (cookie, kind, length) = (c.cookie, c.kind, c.length);
        // Refuse absurd lengths before waiting.
        if length > MAX_CHUNK_METADATA as u64 {
            return Err(self.fatal(
                Some(cookie),
                format!(
                    "server sent a reply chunk of type {kind} claiming {length} bytes, more than \
                     the {MAX_CHUNK_METADATA} allowed"
                ),
            ));
        }
        let total = c.total();
        if input.len() < total {
            return Ok(need_more());
        }
        let payload = &input[c.header..total];
        match kind {
            REPLY_TYPE_NONE => {
                if length != 0 || !c.done {
                    return Err(self.fatal(
                        Some(cookie),
                        "NBD_REPLY_TYPE_NONE chunk must be empty and final",
                    ));
                }
                Ok(self.done(cookie, total))
            }
            REPLY_TYPE_OFFSET_HOLE => self.hole(c, payload),
            _ if kind & (1 << 15) != 0 => {
                let e = self.error_chunk(cookie, &c.cmd, kind, payload)?;
                self.table.fail(cookie, e);
                Ok(self.consumed(c))
            }
            _ => {
                let name = command_name(c.cmd.kind.code());
                Err(self.fatal(
                    Some(cookie),
                    format!("server sent reply chunk type {kind}, which is unknown or invalid for {name}"),
                ))
            }
        }
    }

    /// `NBD_REPLY_TYPE_OFFSET_HOLE`, whose `payload` is in.
    fn hole(&mut self, c: &Chunk, payload: &[u8]) -> Result<Decoded<T>, Fatal<T>> {
        let (cookie, length) = (c.cookie, c.length);
        if c.cmd.kind != CommandKind::Read {
            let name = command_name(c.cmd.kind.code());
            return Err(self.fatal(Some(cookie), format!("server sent a hole in reply to {name}")));
        }
        if length != 12 {
            return Err(self.fatal(
                Some(cookie),
                format!("NBD_REPLY_TYPE_OFFSET_HOLE chunk has length {length}, not 12"),
            ));
        }
        let mut r = FieldReader::new(payload);
        let offset = r.u64().unwrap();
        let len = r.u32().unwrap() as u64;
        if len == 0 {
            return Err(self.fatal(Some(cookie), "server sent a hole of length 0"));
        }
        let buf_offset = self.in_range(cookie, &c.cmd, offset, len, "hole")?;
        self.table.record_chunk(cookie, offset, len, ChunkStatus::Hole);
        self.table.add_seen(cookie, len);
        if c.done {
            self.finished = Some(cookie);
        }
        Ok(Decoded {
            consumed: c.total(),
            event: Some(Event::ReadHole {
                cookie,
                buf_offset,
                len: len as usize,
            }),
        })
    }

    /// A chunk consumed whole: the command's `Done` when it was the last.
    fn consumed(&mut self, c: &Chunk) -> Decoded<T> {
        if c.done {
            self.done(c.cookie, c.total())
        } else {
            Decoded {
                consumed: c.total(),
                event: None,
            }
        }
    }

    fn error_chunk(
        &mut self,
        cookie: u64,
        cmd: &Command,
        kind: u16,
        payload: &[u8],
    ) -> Result<Error, Fatal<T>> {
        let mut r = FieldReader::new(payload);
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
                self.table.record_chunk(cookie, cmd.offset, 0, ChunkStatus::Error);
            }
            REPLY_TYPE_ERROR_OFFSET if tail.len() == 8 => {
                let offset = FieldReader::new(tail).u64().unwrap();
                self.in_range(cookie, cmd, offset, 1, "error offset")?;
                self.table.record_chunk(cookie, offset, 0, ChunkStatus::Error);
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
            message.push_str(&server_message(msg));
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

    fn done(&mut self, cookie: u64, consumed: usize) -> Decoded<T> {
        Decoded {
            consumed,
            event: Some(self.table.complete(cookie)),
        }
    }

    /// A block status chunk (32-bit descriptors without extended headers, 64-bit with).
    fn block_status(&mut self, input: &[u8], c: &Chunk) -> Result<Decoded<T>, Fatal<T>> {
        let wide = c.kind == REPLY_TYPE_BLOCK_STATUS_EXT;
        let type_name = if wide { "NBD_REPLY_TYPE_BLOCK_STATUS_EXT" } else { "NBD_REPLY_TYPE_BLOCK_STATUS" };
        let descriptor = self.block_status_shape(c, wide, type_name)?;
        let total = c.total();
        if input.len() < total {
            return Ok(need_more());
        }
        let mut r = FieldReader::new(&input[c.header..total]);
        let context_id = r.u32().unwrap();
        let count = (c.length - descriptor.prefix) / descriptor.size;
        if wide {
            let claimed = r.u32().unwrap() as u64;
            if claimed != count {
                return Err(self.fatal(
                    Some(c.cookie),
                    format!("{type_name} chunk says {claimed} descriptors but holds {count}"),
                ));
            }
        }
        let name = self.answering_context(c.cookie, context_id)?;
        let extents = self.extents(&mut r, c, wide, count, &name)?;
        self.table.push_extents(c.cookie, ContextExtents { context_id, name, extents });
        Ok(self.consumed(c))
    }

    /// What a block status chunk's header must say before its bytes are awaited: a block
    /// status command, the format of the negotiated headers, a bounded length that holds a
    /// context id and whole descriptors.
    fn block_status_shape(&mut self, c: &Chunk, wide: bool, type_name: &str) -> Result<Descriptors, Fatal<T>> {
        let (cookie, length) = (c.cookie, c.length);
        if c.cmd.kind != CommandKind::BlockStatus {
            return Err(self.fatal(
                Some(cookie),
                format!("server sent {type_name} in reply to {}", command_name(c.cmd.kind.code())),
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
        let d = if wide {
            Descriptors { prefix: 8, size: 16 }
        } else {
            Descriptors { prefix: 4, size: 8 }
        };
        if length > MAX_BLOCK_STATUS_CHUNK as u64 {
            return Err(self.fatal(
                Some(cookie),
                format!(
                    "{type_name} chunk claims {length} bytes, more than the \
                     {MAX_BLOCK_STATUS_CHUNK} allowed"
                ),
            ));
        }
        if length < d.prefix + d.size || !(length - d.prefix).is_multiple_of(d.size) {
            return Err(self.fatal(
                Some(cookie),
                format!(
                    "{type_name} chunk of {length} bytes does not hold a context id and whole \
                     descriptors of {} bytes",
                    d.size
                ),
            ));
        }
        Ok(d)
    }

    /// The name of `context_id`, which must have been negotiated, not filtered out by the
    /// request, and not have answered this request before.
    fn answering_context(&mut self, cookie: u64, context_id: u32) -> Result<String, Fatal<T>> {
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
        let entry = self.table.get(cookie).expect("checked above");
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
        Ok(name)
    }

    /// The `count` descriptors of a block status chunk as extents with absolute offsets.
    fn extents(
        &mut self,
        r: &mut FieldReader<'_>,
        c: &Chunk,
        wide: bool,
        count: u64,
        name: &str,
    ) -> Result<Vec<Extent>, Fatal<T>> {
        let (cookie, cmd) = (c.cookie, c.cmd);
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
        Ok(extents)
    }

    /// A protocol violation, blamed on `cookie`'s command; with no cookie (the bytes name no
    /// command in flight), on the oldest command in flight (not spared), which a reply in
    /// order would have answered: the caller waiting longest sees `EPROTO`, not only
    /// `ENOTCONN`.
    fn fatal(&mut self, cookie: Option<u64>, message: impl Into<String>) -> Fatal<T> {
        let spared = self.spared;
        let cookie = cookie.or_else(|| self.table.oldest_where(|user| !spared(user)));
        let command = cookie.and_then(|c| self.table.remove(c).map(|user| (c, user)));
        Fatal {
            error: Error::protocol(message),
            command,
        }
    }
}

/// The layout of block status descriptors: bytes before the first (context id, and the
/// descriptor count when wide) and bytes of each.
#[derive(Debug, Clone, Copy)]
struct Descriptors {
    prefix: u64,
    size: u64,
}

fn need_more<T>() -> Decoded<T> {
    Decoded {
        consumed: 0,
        event: None,
    }
}
