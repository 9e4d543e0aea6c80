//! The in-flight table: every command sent and not yet answered, keyed by cookie, with
//! what its reply has brought so far ([`Detail`]: block status extents, read chunks; the
//! first error; the bytes a read has had).
//!
//! [`InFlightTable`] belongs to the [`ReplyDecoder`](super::ReplyDecoder), which is how a
//! driver reaches it (`register`, `unregister`, `take_all`). It does one hash lookup per
//! reply with a hash made for cookies, and allocates per command only what the command's
//! detail needs.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use crate::errno::Errno;
use crate::error::{Error, Result};

use super::command::{Command, CommandKind};
use super::reply::Event;

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

/// One extent of a block status reply: `length` bytes at `offset` with context-specific
/// `flags`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Absolute offset in the export.
    pub offset: u64,
    /// Bytes it covers.
    pub length: u64,
    /// The context's flags for it (for `base:allocation`, `STATE_HOLE` and `STATE_ZERO`).
    pub flags: u64,
}

/// The extents one meta context reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContextExtents {
    /// The id the server uses for the context.
    pub context_id: u32,
    /// The context's name.
    pub name: String,
    /// The extents, in order from the request's offset.
    pub extents: Vec<Extent>,
}

/// What a chunk of a structured read said about a range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkStatus {
    /// Data (`NBD_REPLY_TYPE_OFFSET_DATA`).
    Data,
    /// A hole, read as zeroes (`NBD_REPLY_TYPE_OFFSET_HOLE`).
    Hole,
    /// The server reported an error at `offset` (length 0), or for the whole request.
    Error,
}

/// One chunk of a structured read, with an absolute offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadChunk {
    /// Absolute offset in the export.
    pub offset: u64,
    /// Bytes it covers (0 for an error).
    pub length: u64,
    /// What the server said about the range.
    pub status: ChunkStatus,
}

/// What a command's reply carried besides data.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Detail {
    /// Nothing besides data (or nothing was recorded).
    #[default]
    None,
    /// Block status: one entry per context that answered, in the order they came.
    Extents(Vec<ContextExtents>),
    /// A read registered with `record_chunks`: its chunks in the order they came (a simple
    /// reply's data is one data chunk).
    Chunks(Vec<ReadChunk>),
}

/// Extra bookkeeping for a command (see [`ReplyDecoder::register_with`](super::ReplyDecoder::register_with)).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tracking {
    /// Block status filtered to these context ids.
    pub filter: Option<Vec<u32>>,
    /// Record the chunks of a read ([`Detail::Chunks`]).
    pub record_chunks: bool,
}

/// One command in the table.
#[derive(Debug)]
pub(super) struct Entry<T> {
    pub cmd: Command,
    pub user: T,
    /// The first error the server reported for it.
    pub error: Option<Error>,
    /// Block status filtered to these context ids.
    pub filter: Option<Vec<u32>>,
    pub detail: Detail,
    /// Reads: bytes of data and holes the server has sent so far (saturating). A read
    /// that finishes without an error must have been covered exactly.
    pub seen: u64,
}

/// The table of commands in flight (see the module documentation).
#[derive(Debug)]
pub(super) struct InFlightTable<T> {
    map: CookieMap<Entry<T>>,
}

impl<T> InFlightTable<T> {
    pub fn new() -> InFlightTable<T> {
        InFlightTable { map: CookieMap::default() }
    }

    /// Records a command about to be sent.
    pub fn insert(&mut self, cookie: u64, cmd: Command, tracking: Tracking, user: T) {
        let detail = if tracking.record_chunks && cmd.kind == CommandKind::Read {
            Detail::Chunks(Vec::new())
        } else if cmd.kind == CommandKind::BlockStatus {
            Detail::Extents(Vec::new())
        } else {
            Detail::None
        };
        let entry = Entry { cmd, user, error: None, filter: tracking.filter, detail, seen: 0 };
        self.map.insert(cookie, entry);
    }

    pub fn get(&self, cookie: u64) -> Option<&Entry<T>> {
        self.map.get(&cookie)
    }

    pub fn contains(&self, cookie: u64) -> bool {
        self.map.contains_key(&cookie)
    }

    pub fn user_mut(&mut self, cookie: u64) -> Option<&mut T> {
        self.map.get_mut(&cookie).map(|e| &mut e.user)
    }

    /// Takes a command out, with its user data.
    pub fn remove(&mut self, cookie: u64) -> Option<T> {
        self.map.remove(&cookie).map(|e| e.user)
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// The command sent first (cookies are handed out in increasing order) of those in
    /// flight whose user data passes `keep`, if any.
    pub fn oldest_where(&self, keep: impl Fn(&T) -> bool) -> Option<u64> {
        self.map.iter().filter(|(_, e)| keep(&e.user)).map(|(c, _)| *c).min()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Takes every command out, with its user data.
    pub fn take_all(&mut self) -> Vec<(u64, T)> {
        self.map.drain().map(|(c, e)| (c, e.user)).collect()
    }

    fn entry(&mut self, cookie: u64) -> &mut Entry<T> {
        self.map.get_mut(&cookie).expect("command is in the table")
    }

    /// Records an error for `cookie`; the first one wins.
    pub fn fail(&mut self, cookie: u64, error: Error) {
        self.entry(cookie).error.get_or_insert(error);
    }

    /// Counts `len` bytes of data or holes sent for read `cookie`.
    pub fn add_seen(&mut self, cookie: u64, len: u64) {
        let entry = self.entry(cookie);
        entry.seen = entry.seen.saturating_add(len);
    }

    /// A simple reply with data covers the whole read.
    pub fn seen_all(&mut self, cookie: u64) {
        let entry = self.entry(cookie);
        entry.seen = entry.cmd.length;
    }

    /// Records a chunk of a read registered with `record_chunks`.
    pub fn record_chunk(&mut self, cookie: u64, offset: u64, length: u64, status: ChunkStatus) {
        if let Some(Entry { detail: Detail::Chunks(chunks), .. }) = self.map.get_mut(&cookie) {
            chunks.push(ReadChunk { offset, length, status });
        }
    }

    /// Adds the extents of one context to block status `cookie`.
    pub fn push_extents(&mut self, cookie: u64, extents: ContextExtents) {
        if let Some(Entry { detail: Detail::Extents(list), .. }) = self.map.get_mut(&cookie) {
            list.push(extents);
        }
    }

    /// Takes finished command `cookie` out and reports it. A read the server calls
    /// successful must have had every byte accounted for, as libnbd checks: missing (or
    /// doubly sent) data fails the read with EIO, and the connection goes on, since the
    /// framing is intact.
    pub fn complete(&mut self, cookie: u64) -> Event<T> {
        let entry = self.map.remove(&cookie).expect("finished command is in the table");
        let result = match entry.error {
            Some(e) => Err(e),
            None => read_coverage(&entry.cmd, entry.seen),
        };
        Event::Done { cookie, user: entry.user, result, detail: entry.detail }
    }
}

/// A finished read must have had data or holes for exactly its length.
fn read_coverage(cmd: &Command, seen: u64) -> Result<()> {
    if cmd.kind != CommandKind::Read || seen == cmd.length {
        return Ok(());
    }
    let what = if seen < cmd.length {
        format!("covered only {seen} of {} bytes", cmd.length)
    } else {
        format!(
            "sent {seen} bytes of data and holes for {} requested (overlapping chunks)",
            cmd.length
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
