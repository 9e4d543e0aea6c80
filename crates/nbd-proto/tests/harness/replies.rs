//! The `replies` target: reply bytes fed to [`ReplyDecoder`] whole and in pieces, the
//! events driven exactly as the module documentation of `transmission` says.

use std::collections::{HashMap, HashSet};

use super::bytes::{self, push16, push32, push64};
use super::{check_allocation, chunking, measure, mutate, Rng, Source};
use nbd_proto::consts::*;
use nbd_proto::handshake::{ExportInfo, Negotiated, Protocol};
use nbd_proto::transmission::{Command, CommandKind, Decoded, Event, Fatal, ReplyDecoder};
use nbd_proto::{Errno, Fault};

/// At most this many commands are registered in one case.
pub const MAX_COMMANDS: usize = 32;
/// Bytes of one encoded command: kind, cookie, offset, length.
const COMMAND_BYTES: usize = 1 + 8 + 8 + 8;

/// One replies case.
///
/// Encoding: `[bits][chunk seed: u64 BE][count][count × (kind u8, cookie u64, offset u64,
/// length u64)][reply bytes...]`. Bits: 0 structured replies, 1 extended headers.
/// `count` is taken modulo 33; the kind modulo 7 (read, write, flush, trim, cache,
/// write-zeroes, disconnect); the length of reads and writes modulo 64 MiB + 1, as
/// `StrictChecks::check` allows no more. Commands with a cookie seen before are dropped (a
/// driver never has two commands with one cookie).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Case {
    pub bits: u8,
    pub chunk_seed: u64,
    pub commands: Vec<(u64, Command)>,
    pub stream: Vec<u8>,
}

const KINDS: [CommandKind; 7] = [
    CommandKind::Read,
    CommandKind::Write,
    CommandKind::Flush,
    CommandKind::Trim,
    CommandKind::Cache,
    CommandKind::WriteZeroes,
    CommandKind::Disconnect,
];

impl Case {
    pub fn decode(data: &[u8]) -> Case {
        let mut s = Source::new(data);
        let bits = s.u8();
        let chunk_seed = s.u64();
        let count = s.u8() as usize % (MAX_COMMANDS + 1);
        let mut commands: Vec<(u64, Command)> = Vec::new();
        for _ in 0..count {
            let kind = KINDS[s.u8() as usize % KINDS.len()];
            let cookie = s.u64();
            let offset = s.u64();
            let mut length = s.u64();
            if matches!(kind, CommandKind::Read | CommandKind::Write) {
                length %= MAX_PAYLOAD_HARD as u64 + 1;
            }
            if commands.iter().all(|(c, _)| *c != cookie) {
                commands.push((
                    cookie,
                    Command {
                        kind,
                        offset,
                        length,
                        flags: 0,
                    },
                ));
            }
        }
        Case {
            bits,
            chunk_seed,
            commands,
            stream: s.rest().to_vec(),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut v = vec![self.bits];
        v.extend(self.chunk_seed.to_be_bytes());
        v.push(self.commands.len() as u8);
        for (cookie, cmd) in &self.commands {
            v.push(KINDS.iter().position(|k| *k == cmd.kind).unwrap() as u8);
            v.extend(cookie.to_be_bytes());
            v.extend(cmd.offset.to_be_bytes());
            v.extend(cmd.length.to_be_bytes());
        }
        v.extend_from_slice(&self.stream);
        v
    }

    pub fn structured(&self) -> bool {
        self.bits & 1 != 0
    }

    pub fn extended(&self) -> bool {
        self.bits & 2 != 0
    }

    fn negotiated(&self) -> Negotiated {
        Negotiated {
            protocol: Protocol::FixedNewstyle,
            structured_replies: self.structured() || self.extended(),
            extended_headers: self.extended(),
            tls: false,
            export: ExportInfo::default(),
            meta_contexts: Vec::new(),
            meta_valid: true,
        }
    }
}

/// What a run observed, in order; two runs of one case must observe the same.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    Data {
        cookie: u64,
        buf_offset: usize,
        len: usize,
    },
    Hole {
        cookie: u64,
        buf_offset: usize,
        len: usize,
    },
    Done {
        cookie: u64,
        result: Result<(), (Errno, Fault, String)>,
    },
    Fatal {
        cookie: Option<u64>,
        message: String,
    },
    /// The reply bytes ran out (in the middle of a read's data when `in_payload`).
    End { in_payload: bool, in_flight: usize },
}

/// Tallies of what runs saw, for the drivers' statistics.
#[derive(Debug, Default, Clone)]
pub struct Stats {
    pub data: u64,
    pub holes: u64,
    pub done_ok: u64,
    pub done_err: u64,
    pub fatal: u64,
    pub ends: u64,
}

impl Stats {
    pub fn add(&mut self, o: &Stats) {
        self.data += o.data;
        self.holes += o.holes;
        self.done_ok += o.done_ok;
        self.done_err += o.done_err;
        self.fatal += o.fatal;
        self.ends += o.ends;
    }
}

/// The user data a command is registered with: derived from the cookie, so the harness can
/// tell that `Done` and `Fatal` hand back the right one.
fn tag(cookie: u64) -> u64 {
    cookie.rotate_left(17) ^ 0x5eed_5eed_5eed_5eed
}

/// Runs `case` whole and in its pieces, checks every invariant, and returns what the run
/// saw.
pub fn check(case: &Case) -> Result<Stats, String> {
    let (result, largest) = measure(|| -> Result<Vec<Seen>, String> {
        let whole = run(case, &[case.stream.len()])?;
        let pieces = run(case, &chunking(case.chunk_seed, case.stream.len()))?;
        if whole != pieces {
            return Err(format!(
                "feeding the bytes whole and in pieces differ:\nwhole:  {whole:?}\npieces: {pieces:?}"
            ));
        }
        Ok(whole)
    });
    let seen = result?;
    check_allocation(largest, case.stream.len())?;
    let mut stats = Stats::default();
    for s in &seen {
        match s {
            Seen::Data { .. } => stats.data += 1,
            Seen::Hole { .. } => stats.holes += 1,
            Seen::Done { result: Ok(()), .. } => stats.done_ok += 1,
            Seen::Done { .. } => stats.done_err += 1,
            Seen::Fatal { .. } => stats.fatal += 1,
            Seen::End { .. } => stats.ends += 1,
        }
    }
    Ok(stats)
}

/// The driver loop of the `transmission` module documentation, with the server's bytes
/// arriving in pieces of `sizes`.
fn run(case: &Case, sizes: &[usize]) -> Result<Vec<Seen>, String> {
    let mut driver = Driver::new(case, sizes);
    // Every decode call either consumes bytes, asks for more, or reports the one `Done`
    // of a command finished by a payload or hole; so the calls are bounded by this.
    let max_calls = 2 * (case.stream.len() + case.commands.len()) + sizes.len() + 8;
    let mut calls = 0;
    loop {
        calls += 1;
        if calls > max_calls {
            return Err(format!(
                "no progress: {calls} decode calls for {} bytes",
                case.stream.len()
            ));
        }
        if driver.decoder.len() != driver.live.len() {
            return Err(format!(
                "the decoder holds {} commands, {} are in flight",
                driver.decoder.len(),
                driver.live.len()
            ));
        }
        if !driver.step()? {
            return finish(driver.decoder, driver.live, driver.seen);
        }
    }
}

/// The server's bytes as a driver receives them: in pieces of `sizes`, into a buffer whose
/// unconsumed part is `buf[pos..]`.
struct Feed<'a> {
    stream: &'a [u8],
    sizes: &'a [usize],
    next_piece: usize,
    stream_at: usize,
    buf: Vec<u8>,
    pos: usize,
}

impl<'a> Feed<'a> {
    fn new(stream: &'a [u8], sizes: &'a [usize]) -> Feed<'a> {
        Feed { stream, sizes, next_piece: 0, stream_at: 0, buf: Vec::new(), pos: 0 }
    }

    /// Received and not yet consumed.
    fn pending(&self) -> &[u8] {
        &self.buf[self.pos..]
    }

    /// Receives the next piece; false when the server has nothing more.
    fn receive(&mut self) -> bool {
        let Some(&n) = self.sizes.get(self.next_piece) else {
            return false;
        };
        self.next_piece += 1;
        if self.pos > 0 && self.pos * 2 >= self.buf.len() {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.extend_from_slice(&self.stream[self.stream_at..self.stream_at + n]);
        self.stream_at += n;
        true
    }

    /// Consumes a read payload of `len` bytes, as a driver copies it into the buffer,
    /// receiving as needed; false when the stream ends inside it.
    fn skip_payload(&mut self, len: usize) -> bool {
        let mut left = len;
        loop {
            let n = left.min(self.buf.len() - self.pos);
            self.pos += n;
            left -= n;
            if left == 0 {
                return true;
            }
            if !self.receive() {
                return false;
            }
        }
    }
}

/// A driver of one case: the decoder, the commands in flight as the driver knows them,
/// and what it has seen.
struct Driver<'a> {
    case: &'a Case,
    decoder: ReplyDecoder<u64>,
    live: HashMap<u64, Command>,
    seen: Vec<Seen>,
    feed: Feed<'a>,
    oracle: Oracle,
    idle_events: u32,
}

impl<'a> Driver<'a> {
    fn new(case: &'a Case, sizes: &'a [usize]) -> Driver<'a> {
        let mut decoder: ReplyDecoder<u64> = ReplyDecoder::new(&case.negotiated());
        let mut live: HashMap<u64, Command> = HashMap::new();
        for &(cookie, cmd) in &case.commands {
            decoder.register(cookie, cmd, tag(cookie));
            live.insert(cookie, cmd);
        }
        Driver {
            case,
            decoder,
            live,
            seen: Vec::new(),
            feed: Feed::new(&case.stream, sizes),
            oracle: Oracle::default(),
            idle_events: 0,
        }
    }

    /// One decode call and what the driver does about it; false when the run is over.
    fn step(&mut self) -> Result<bool, String> {
        let available = self.feed.pending().len();
        match self.decoder.decode(self.feed.pending()) {
            Ok(Decoded { consumed: 0, event: None }) => {
                let (case, pending) = (self.case, self.feed.pending());
                let needed = decision_point(pending, case.structured() || case.extended(), case.extended());
                if available >= needed {
                    return Err(format!(
                        "asked for more input while holding {available} bytes; {needed} decide the next step"
                    ));
                }
                Ok(self.feed.receive() || self.ended(false))
            }
            Ok(Decoded { consumed, event }) => {
                if consumed > available {
                    return Err(format!("consumed {consumed} of {available} bytes"));
                }
                let step = Step::of(&event);
                self.oracle.check(&self.feed.pending()[..consumed], &step, &self.live)?;
                self.feed.pos += consumed;
                if consumed == 0 {
                    self.idle_events += 1;
                    if self.idle_events > 1 {
                        return Err("two events in a row consumed nothing".into());
                    }
                } else {
                    self.idle_events = 0;
                }
                match event {
                    Some(event) => self.event(event),
                    None => Ok(true),
                }
            }
            Err(fatal) => {
                let seen = fatal_seen(&mut self.live, fatal)?;
                self.seen.push(seen);
                // The driver stops reading and fails every other command.
                Ok(false)
            }
        }
    }

    /// The server has nothing more to send: the run is over.
    fn ended(&mut self, in_payload: bool) -> bool {
        self.seen.push(Seen::End {
            in_payload,
            in_flight: self.live.len(),
        });
        false
    }

    fn event(&mut self, event: Event<u64>) -> Result<bool, String> {
        match event {
            Event::ReadData { cookie, buf_offset, len } => {
                check_range(&self.live, cookie, buf_offset, len, "ReadData")?;
                self.seen.push(Seen::Data { cookie, buf_offset, len });
                if !self.feed.skip_payload(len) {
                    return Ok(self.ended(true));
                }
                self.decoder.payload_done();
            }
            Event::ReadHole { cookie, buf_offset, len } => {
                check_range(&self.live, cookie, buf_offset, len, "ReadHole")?;
                self.seen.push(Seen::Hole { cookie, buf_offset, len });
            }
            Event::Done { cookie, user, result, .. } => {
                if self.live.remove(&cookie).is_none() {
                    return Err(format!("Done for cookie {cookie}, not in flight"));
                }
                if user != tag(cookie) {
                    return Err(format!("Done for cookie {cookie} with another's user data"));
                }
                let result = match result {
                    Ok(()) => Ok(()),
                    Err(e) => {
                        if e.fault() != Fault::Server || e.message().is_empty() {
                            return Err(format!("a command failed with {e:?}"));
                        }
                        Err((e.errno(), e.fault(), e.message().to_string()))
                    }
                };
                self.seen.push(Seen::Done { cookie, result });
            }
        }
        Ok(true)
    }
}

/// A protocol violation must be a protocol error, naming a command in flight if any.
fn fatal_seen(live: &mut HashMap<u64, Command>, fatal: Fatal<u64>) -> Result<Seen, String> {
    let e = &fatal.error;
    if e.fault() != Fault::Protocol || e.errno() != Errno::EPROTO || e.message().is_empty() {
        return Err(format!("Fatal carries {e:?}, not a protocol error"));
    }
    let cookie = match fatal.command {
        Some((cookie, user)) => {
            if live.remove(&cookie).is_none() {
                return Err(format!("Fatal names cookie {cookie}, not in flight"));
            }
            if user != tag(cookie) {
                return Err(format!("Fatal for cookie {cookie} with another's user data"));
            }
            Some(cookie)
        }
        None => None,
    };
    Ok(Seen::Fatal {
        cookie,
        message: e.message().to_string(),
    })
}

/// One decode step's event, without the user data.
#[derive(Debug)]
enum Step {
    Nothing,
    Data {
        cookie: u64,
        buf_offset: usize,
        len: usize,
    },
    Hole {
        cookie: u64,
        buf_offset: usize,
        len: usize,
    },
    Done {
        cookie: u64,
        failed: bool,
    },
}

impl Step {
    fn of(event: &Option<Event<u64>>) -> Step {
        match event {
            None => Step::Nothing,
            Some(Event::ReadData {
                cookie,
                buf_offset,
                len,
            }) => Step::Data {
                cookie: *cookie,
                buf_offset: *buf_offset,
                len: *len,
            },
            Some(Event::ReadHole {
                cookie,
                buf_offset,
                len,
            }) => Step::Hole {
                cookie: *cookie,
                buf_offset: *buf_offset,
                len: *len,
            },
            Some(Event::Done { cookie, result, .. }) => Step::Done {
                cookie: *cookie,
                failed: result.is_err(),
            },
        }
    }
}

/// The fields of a reply header, read independently of the decoder.
struct Header {
    simple: bool,
    error: u32,
    flags: u16,
    kind: u16,
    cookie: u64,
    length: u64,
    size: usize,
}

fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a[8 - b.len()..].copy_from_slice(b);
    u64::from_be_bytes(a)
}

fn parse_header(b: &[u8]) -> Option<Header> {
    let magic = be_u64(b.get(..4)?) as u32;
    let (simple, size) = match magic {
        SIMPLE_REPLY_MAGIC => (true, 16),
        STRUCTURED_REPLY_MAGIC => (false, 20),
        EXTENDED_REPLY_MAGIC => (false, 32),
        _ => return None,
    };
    if b.len() < size {
        return None;
    }
    Some(Header {
        simple,
        error: if simple { be_u64(&b[4..8]) as u32 } else { 0 },
        flags: if simple { 0 } else { be_u64(&b[4..6]) as u16 },
        kind: if simple { 0 } else { be_u64(&b[6..8]) as u16 },
        cookie: be_u64(&b[8..16]),
        length: match size {
            20 => be_u64(&b[16..20]),
            32 => be_u64(&b[24..32]),
            _ => 0,
        },
        size,
    })
}

/// Checks each event against the bytes its decode step consumed, read independently:
/// the cookie, offset and length come from the reply; a `Done` ends a reply flagged final
/// (or comes right after the data or hole chunk that was), and fails exactly when an
/// error was received for the command.
#[derive(Default)]
struct Oracle {
    /// A final data or hole chunk was seen: the next step must be its `Done`.
    pending_done: Option<u64>,
    /// Commands an error was received for.
    errored: HashSet<u64>,
    /// Bytes of data and holes received per read: a read the server ends without
    /// covering exactly must fail too (EIO), as libnbd checks.
    covered: HashMap<u64, u64>,
}

impl Oracle {
    fn check(
        &mut self,
        bytes: &[u8],
        step: &Step,
        live: &HashMap<u64, Command>,
    ) -> Result<(), String> {
        if let Some(c) = self.pending_done.take() {
            return match *step {
                Step::Done { cookie, failed } if cookie == c && bytes.is_empty() => {
                    self.result(cookie, failed, live)
                }
                _ => Err(format!(
                    "expected the Done of {c} after its final chunk, got {step:?} consuming {} bytes",
                    bytes.len()
                )),
            };
        }
        let Some(h) = parse_header(bytes) else {
            return Err(format!(
                "{step:?} after consuming {} bytes that are no reply header",
                bytes.len()
            ));
        };
        let payload = &bytes[h.size..];
        match *step {
            Step::Data { cookie, buf_offset, len } => {
                self.data(&Reply { h: &h, payload, step, live }, (cookie, buf_offset, len))
            }
            Step::Hole { cookie, buf_offset, len } => {
                self.hole(&Reply { h: &h, payload, step, live }, (cookie, buf_offset, len))
            }
            Step::Done { cookie, failed } => self.done(&h, payload, step, cookie, failed, live),
            Step::Nothing => {
                if h.simple
                    || h.kind & (1 << 15) == 0
                    || h.flags & REPLY_FLAG_DONE != 0
                    || payload.len() as u64 != h.length
                {
                    return wrong(step, "bytes are no whole, non-final error chunk");
                }
                self.errored.insert(h.cookie);
                Ok(())
            }
        }
    }

    /// `ReadData` (cookie, buffer offset, length) from a simple header or an
    /// `NBD_REPLY_TYPE_OFFSET_DATA` chunk header.
    fn data(&mut self, r: &Reply, (cookie, buf_offset, len): (u64, usize, usize)) -> Result<(), String> {
        let Reply { h, payload, step, live } = *r;
        if h.cookie != cookie {
            return wrong(step, "cookie differs");
        }
        self.cover(cookie, len);
        if h.simple {
            let want = live.get(&cookie).map_or(0, |c| c.length) as usize;
            if h.error != 0 || !payload.is_empty() || buf_offset != 0 || len != want {
                return wrong(step, "simple header does not announce this data");
            }
            self.pending_done = Some(cookie);
            return Ok(());
        }
        if h.kind != REPLY_TYPE_OFFSET_DATA || payload.len() != 8 {
            return wrong(step, "chunk is no NBD_REPLY_TYPE_OFFSET_DATA header");
        }
        let same_len = len as u64 == h.length.wrapping_sub(8);
        self.placed(step, h, live, (cookie, buf_offset), be_u64(payload), same_len)
    }

    /// `ReadHole` (cookie, buffer offset, length) from an `NBD_REPLY_TYPE_OFFSET_HOLE`.
    fn hole(&mut self, r: &Reply, (cookie, buf_offset, len): (u64, usize, usize)) -> Result<(), String> {
        let Reply { h, payload, step, live } = *r;
        self.cover(cookie, len);
        if h.cookie != cookie || h.simple || h.kind != REPLY_TYPE_OFFSET_HOLE || payload.len() != 12 {
            return wrong(step, "header is no NBD_REPLY_TYPE_OFFSET_HOLE for this cookie");
        }
        let same_len = len as u64 == be_u64(&payload[8..]);
        self.placed(step, h, live, (cookie, buf_offset), be_u64(&payload[..8]), same_len)
    }

    /// What data and holes share: the event's place in the buffer is the chunk's `offset`
    /// (and its length the chunk's), and a final chunk's `Done` comes next.
    fn placed(
        &mut self,
        step: &Step,
        h: &Header,
        live: &HashMap<u64, Command>,
        (cookie, buf_offset): (u64, usize),
        offset: u64,
        same_len: bool,
    ) -> Result<(), String> {
        if buf_offset as u64 != offset.wrapping_sub(cmd_offset(live, cookie)) || !same_len {
            return wrong(step, "offset or length differ");
        }
        if h.flags & REPLY_FLAG_DONE != 0 {
            self.pending_done = Some(cookie);
        }
        Ok(())
    }

    /// `Done` from a simple reply or a final chunk (none or an error).
    fn done(
        &mut self,
        h: &Header,
        payload: &[u8],
        step: &Step,
        cookie: u64,
        failed: bool,
        live: &HashMap<u64, Command>,
    ) -> Result<(), String> {
        if h.cookie != cookie {
            return wrong(step, "cookie differs");
        }
        if h.simple {
            if !payload.is_empty() {
                return wrong(step, "simple header is followed by consumed bytes");
            }
            if h.error != 0 {
                self.errored.insert(cookie);
            }
        } else {
            if h.flags & REPLY_FLAG_DONE == 0 {
                return wrong(step, "chunk is not flagged final");
            }
            if payload.len() as u64 != h.length {
                return wrong(step, "chunk's payload was not consumed whole");
            }
            if h.kind & (1 << 15) != 0 {
                self.errored.insert(cookie);
            } else if h.kind != REPLY_TYPE_NONE {
                return wrong(step, "chunk type is neither NONE nor an error");
            }
        }
        self.result(cookie, failed, live)
    }

    fn cover(&mut self, cookie: u64, len: usize) {
        let c = self.covered.entry(cookie).or_insert(0);
        *c = c.saturating_add(len as u64);
    }

    fn result(&mut self, cookie: u64, failed: bool, live: &HashMap<u64, Command>) -> Result<(), String> {
        let covered = self.covered.remove(&cookie).unwrap_or(0);
        let short = live
            .get(&cookie)
            .is_some_and(|c| c.kind == CommandKind::Read && covered != c.length);
        let errored = self.errored.remove(&cookie) || short;
        if errored != failed {
            return Err(format!(
                "Done of {cookie} {} although {}",
                if failed { "failed" } else { "succeeded" },
                if errored {
                    "an error was received for it"
                } else {
                    "no error was received for it"
                }
            ));
        }
        Ok(())
    }
}

/// A decode step with the reply bytes it consumed, parsed, and the commands in flight.
#[derive(Clone, Copy)]
struct Reply<'a> {
    h: &'a Header,
    payload: &'a [u8],
    step: &'a Step,
    live: &'a HashMap<u64, Command>,
}

/// An oracle verdict: `step` does not match the reply it came from.
fn wrong(step: &Step, what: &str) -> Result<(), String> {
    Err(format!("{step:?} from a reply whose {what}"))
}

/// The offset of command `cookie` (0 when it is not in flight).
fn cmd_offset(live: &HashMap<u64, Command>, cookie: u64) -> u64 {
    live.get(&cookie).map_or(0, |c| c.offset)
}

/// How many bytes at the front of `input` suffice for the decoder to do something
/// (produce an event, consume bytes or fail), by the protocol: the decoder may ask for
/// more input only while it holds fewer. An independent reading of the framing, so that a
/// decoder that stalls on a complete reply is caught as the hang it would be.
fn decision_point(input: &[u8], structured: bool, extended: bool) -> usize {
    let Some(magic) = input.get(..4) else {
        return 4;
    };
    let magic = u32::from_be_bytes(magic.try_into().unwrap());
    let (header, kind_at, len_at, len_size) = match magic {
        SIMPLE_REPLY_MAGIC => return 16,
        STRUCTURED_REPLY_MAGIC if structured && !extended => (20, 6, 16, 4),
        EXTENDED_REPLY_MAGIC if extended => (32, 6, 24, 8),
        // A framing that was not negotiated: at most the cookie is needed, to blame it.
        STRUCTURED_REPLY_MAGIC | EXTENDED_REPLY_MAGIC => return 16,
        _ => return 4,
    };
    if input.len() < header {
        return header;
    }
    let kind = u16::from_be_bytes([input[kind_at], input[kind_at + 1]]);
    let mut len_bytes = [0u8; 8];
    len_bytes[8 - len_size..].copy_from_slice(&input[len_at..len_at + len_size]);
    let length = u64::from_be_bytes(len_bytes);
    if kind == REPLY_TYPE_OFFSET_DATA {
        // The data's offset; the data itself is streamed after the event.
        header + 8
    } else if length > MAX_CHUNK_METADATA as u64 {
        header
    } else {
        header + length as usize
    }
}

fn check_range(
    live: &HashMap<u64, Command>,
    cookie: u64,
    buf_offset: usize,
    len: usize,
    what: &str,
) -> Result<(), String> {
    let Some(cmd) = live.get(&cookie) else {
        return Err(format!("{what} for cookie {cookie}, not in flight"));
    };
    if cmd.kind != CommandKind::Read {
        return Err(format!("{what} for a {:?} command", cmd.kind));
    }
    if buf_offset
        .checked_add(len)
        .is_none_or(|end| end as u64 > cmd.length)
    {
        return Err(format!(
            "{what} {buf_offset}+{len} outside the {}-byte buffer",
            cmd.length
        ));
    }
    Ok(())
}

/// After the last event: `take_all` must return exactly the commands still in flight.
fn finish(
    mut decoder: ReplyDecoder<u64>,
    live: HashMap<u64, Command>,
    seen: Vec<Seen>,
) -> Result<Vec<Seen>, String> {
    let mut rest = decoder.take_all();
    rest.sort();
    let mut want: Vec<(u64, u64)> = live.keys().map(|&c| (c, tag(c))).collect();
    want.sort();
    if rest != want {
        return Err(format!("take_all returned {rest:?}, expected {want:?}"));
    }
    if !decoder.is_empty() {
        return Err("commands left after take_all".into());
    }
    Ok(seen)
}

// ---- generation ----


/// A chunk header in the case's framing.
fn chunk_header(
    v: &mut Vec<u8>,
    extended: bool,
    flags: u16,
    kind: u16,
    cookie: u64,
    offset: u64,
    len: u64,
) {
    v.extend(if extended {
        bytes::ext_chunk_header(flags, kind, cookie, offset, len)
    } else {
        bytes::chunk_header(flags, kind, cookie, len as u32)
    });
}


fn error_chunk(rng: &mut Rng, v: &mut Vec<u8>, ext: bool, done: bool, cookie: u64, cmd: &Command) {
    let msg = if rng.chance(1, 2) {
        b"no such luck".to_vec()
    } else {
        Vec::new()
    };
    let with_offset = rng.chance(1, 3);
    let mut payload = Vec::new();
    push32(&mut payload, rng.pick(&[5u32, 1, 22, 28, 0, 108, 999]));
    push16(&mut payload, msg.len() as u16);
    payload.extend(&msg);
    let kind = if with_offset {
        push64(
            &mut payload,
            cmd.offset.wrapping_add(rng.below(cmd.length.max(1) + 1)),
        );
        REPLY_TYPE_ERROR_OFFSET
    } else if rng.chance(1, 8) {
        REPLY_TYPE_ERROR | 0x40
    } else {
        REPLY_TYPE_ERROR
    };
    let flags = if done { REPLY_FLAG_DONE } else { 0 };
    chunk_header(
        v,
        ext,
        flags,
        kind,
        cookie,
        cmd.offset,
        payload.len() as u64,
    );
    v.extend(payload);
}

/// Data bytes for a payload: capped, so a huge read yields a truncated stream rather than
/// megabytes of input.
fn data(rng: &mut Rng, v: &mut Vec<u8>, len: u64) {
    let n = len.min(4096) as usize;
    v.extend(rng.bytes(n));
}

/// The replies to one command: mostly valid for the framing, sometimes not.
fn reply(rng: &mut Rng, v: &mut Vec<u8>, case_bits: u8, cookie: u64, cmd: &Command) {
    // Now and then a framing that may not be the negotiated one.
    let framing = if rng.chance(1, 16) {
        rng.u8()
    } else {
        case_bits
    };
    let structured = framing & 3 != 0;
    let ext = framing & 2 != 0;
    if !structured || rng.chance(1, 8) {
        let error = if rng.chance(1, 4) {
            rng.pick(&[1u32, 5, 12, 22, 28, 108, 7777])
        } else {
            0
        };
        v.extend(bytes::simple_reply(error, cookie));
        if error == 0 && cmd.kind == CommandKind::Read {
            data(rng, v, cmd.length);
        }
        return;
    }
    // Mostly the chunks that fit the command; now and then read chunks for another one.
    let as_read = cmd.kind == CommandKind::Read || rng.chance(1, 12);
    if !as_read || rng.chance(1, 10) {
        match rng.below(4) {
            0 => error_chunk(rng, v, ext, true, cookie, cmd),
            1 => {
                error_chunk(rng, v, ext, false, cookie, cmd);
                chunk_header(v, ext, REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0, 0);
            }
            _ => chunk_header(v, ext, REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0, 0),
        }
        return;
    }
    // A read: cover the range with data and hole pieces, in a random order, with the
    // last one or a NONE chunk flagged done.
    let mut pieces = Vec::new();
    let mut at = 0u64;
    while at < cmd.length && pieces.len() < 8 {
        let n = if rng.chance(1, 3) {
            cmd.length - at
        } else {
            rng.range(1, cmd.length - at)
        };
        pieces.push((at, n));
        at += n;
    }
    if rng.chance(1, 3) && pieces.len() > 1 {
        let i = rng.below(pieces.len() as u64) as usize;
        let j = rng.below(pieces.len() as u64) as usize;
        pieces.swap(i, j);
    }
    let none_last = pieces.is_empty() || rng.chance(1, 3);
    for (i, &(rel, n)) in pieces.iter().enumerate() {
        let last = i + 1 == pieces.len() && !none_last;
        let flags = if last { REPLY_FLAG_DONE } else { 0 };
        let offset = cmd.offset.wrapping_add(rel);
        match rng.below(10) {
            0 => error_chunk(rng, v, ext, last, cookie, cmd),
            1 | 2 if n <= u32::MAX as u64 => {
                chunk_header(v, ext, flags, REPLY_TYPE_OFFSET_HOLE, cookie, offset, 12);
                push64(v, offset);
                push32(v, n as u32);
            }
            _ => {
                chunk_header(v, ext, flags, REPLY_TYPE_OFFSET_DATA, cookie, offset, n + 8);
                push64(v, offset);
                data(rng, v, n);
            }
        }
    }
    if none_last {
        chunk_header(v, ext, REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0, 0);
    }
}

fn command(rng: &mut Rng) -> Command {
    let kind = if rng.chance(1, 2) {
        CommandKind::Read
    } else {
        KINDS[rng.below(6) as usize]
    };
    let offset = match rng.below(8) {
        0 => u64::MAX - rng.below(4096),
        1 => rng.next_u64(),
        _ => rng.below(1 << 20) * 512,
    };
    let mut length = match rng.below(10) {
        0 => 0,
        1 => rng.range(1 << 16, MAX_PAYLOAD_HARD as u64),
        2 => rng.next_u64(),
        _ => rng.range(1, 2048),
    };
    if matches!(kind, CommandKind::Read | CommandKind::Write) {
        length %= MAX_PAYLOAD_HARD as u64 + 1;
    }
    Command {
        kind,
        offset,
        length,
        flags: 0,
    }
}

/// Commands and a stream of replies to them in a random order (some to unknown cookies,
/// some repeated), then (half of the time) mutated.
pub fn generate(rng: &mut Rng) -> Case {
    let bits = rng.u8();
    let chunk_seed = rng.next_u64();
    let n = rng.below(10) as usize;
    let mut commands = Vec::new();
    for i in 0..n {
        let cookie = if rng.chance(1, 8) {
            rng.next_u64()
        } else {
            i as u64 + 1
        };
        if commands.iter().all(|(c, _)| *c != cookie) {
            commands.push((cookie, command(rng)));
        }
    }
    let mut order: Vec<usize> = (0..commands.len()).collect();
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i as u64 + 1) as usize);
    }
    if rng.chance(1, 3) {
        order.truncate(rng.below(order.len() as u64 + 1) as usize);
    }
    let mut stream = Vec::new();
    for &i in &order {
        let (cookie, cmd) = commands[i];
        reply(rng, &mut stream, bits, cookie, &cmd);
        if rng.chance(1, 20) {
            // A reply to a command that has already finished, or to an unknown one.
            let other = if rng.chance(1, 2) {
                cookie
            } else {
                rng.next_u64()
            };
            reply(rng, &mut stream, bits, other, &cmd);
        }
    }
    if rng.chance(1, 2) {
        mutate(rng, &mut stream);
    }
    Case {
        bits,
        chunk_seed,
        commands,
        stream,
    }
}
