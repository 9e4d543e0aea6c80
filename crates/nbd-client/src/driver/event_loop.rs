//! The event-loop driver: the transmission phase over a non-blocking socket, run on the
//! thread that owns the handle by whoever polls that socket (in the Node binding, libuv on
//! the JavaScript thread). No runtime, no threads, no channels, no locks.
//!
//! # Contract
//!
//! The owner of a [`Connection`] polls its socket ([`Connection::fd`]) and calls:
//!
//! * [`Connection::submit`] for each command. Requests are checked at once (state, strict
//!   mode) and put in the output queue; nothing is written yet.
//! * [`Connection::flush`] when it wants the queued output written: at the end of each
//!   wake-up (so that the requests issued during it share system calls), during one when
//!   [`Connection::should_send_now`] says so, and when the socket is writable while
//!   [`Connection::wants_write`] is true.
//! * [`Connection::on_readable`] when the socket is readable: reads replies in large
//!   batches, moves read data into each command's destination and collects completions.
//!   The poll must be level-triggered: a call stops at a short read and leaves anything
//!   newer to the next wake-up.
//! * [`Connection::take_completions`] afterwards, and settles them.
//!
//! The per-command value `U` owns the command's buffers and is asked for them again
//! before every use ([`CommandData`]), so an owner whose buffers can move or vanish between
//! wake-ups (JavaScript's detachable ArrayBuffers) can say so, and the command fails with
//! `EFAULT` instead of touching memory that is no longer its own.
//!
//! [`Connection::owes_replies`] says whether anything is pending (the owner keeps its event
//! loop alive while it is true).

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use nbd_proto::state::{self, Call, State};
use nbd_proto::transmission::{
    Command, CommandKind, Decoded, Detail, Event, Fatal, ReplyDecoder, Session, Tracking,
};
use nbd_proto::{Errno, Error, Result};

pub use super::COPY_PAYLOAD_MAX;
use super::{
    describe_outcome, describe_request, DISCONNECT, cancelled_error, closed_error, end_of_stream_error, Counters, DebugSwitch, Lifeline, DIRECT_READ_MIN,
    INPUT_SIZE, SMALL_FILL,
};

/// What the connection needs from a command's owner.
pub trait CommandData {
    /// The memory a read's data goes to, looked up again before every use: `None` when it
    /// is gone (the command then fails with `EFAULT`, and nothing is written).
    fn dest(&mut self) -> Option<(*mut u8, usize)>;
    /// The memory a write given as [`Payload::Borrowed`] is sent from, looked up again
    /// before every use: `None` when it is gone.
    fn source(&mut self) -> Option<(*const u8, usize)>;
    /// True once the application gave up on the command: it is then never sent if it is
    /// still queued, and its destination is never written.
    fn cancelled(&self) -> bool;
}

/// A write's payload.
pub enum Payload {
    /// No payload (every command but a write).
    None,
    /// Bytes the connection keeps (small writes are copied when submitted).
    Owned(Vec<u8>),
    /// `len` bytes that [`CommandData::source`] provides when they are sent.
    Borrowed(usize),
}

/// A command for [`Connection::submit`].
pub struct Submission<U> {
    /// The request.
    pub cmd: Command,
    /// Block status only for these context names.
    pub filter: Option<Vec<String>>,
    /// Record a read's chunks ([`Detail::Chunks`]).
    pub record_chunks: bool,
    /// A write's payload.
    pub payload: Payload,
    /// The owner's value for this command (its buffers, its promise).
    pub user: U,
}

/// A finished command, to be settled by the owner.
pub struct Completion<U> {
    /// The owner's value given to [`Connection::submit`].
    pub user: U,
    /// The outcome.
    pub result: Result<()>,
    /// What the reply carried (extents, chunks).
    pub detail: Detail,
}

/// A command waiting for room on the wire (`max_in_flight`).
struct Queued<U> {
    cmd: Command,
    flags: u16,
    tracking: Tracking,
    payload: Payload,
    user: U,
}

/// A command the server owes a reply to.
struct Entry<U> {
    user: U,
    /// Set when the destination went away: the command fails with this error.
    fault: Option<Error>,
    /// Its weight in [`Connection::registered_work`].
    work: usize,
}

/// One piece of the output queue.
enum Segment {
    /// Request headers and small payloads; `sent` bytes are out.
    Bytes { data: Vec<u8>, sent: usize },
    /// A write whose payload is sent from its owner's memory: its header, then `len`
    /// bytes from [`CommandData::source`]; `sent` counts both.
    Write {
        cookie: u64,
        header: Vec<u8>,
        len: usize,
        sent: usize,
    },
    /// NBD_CMD_DISC: after it, the write side is shut.
    Disconnect { data: Vec<u8>, sent: usize },
}

/// Where the reader is inside a read's data.
struct InPayload {
    cookie: u64,
    buf_offset: usize,
    len: usize,
    done: usize,
    /// The bytes are dropped (the command was cancelled or its buffer went away).
    sink: bool,
}

/// What one read into the input buffer brought.
enum Fill {
    Eof,
    /// Some bytes (or an interrupted call); a short read also sets `drained`.
    Data,
    /// Nothing to read now.
    Empty,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Shutdown {
    None,
    /// Send NBD_CMD_DISC once nothing is queued or in flight.
    Pending,
    /// NBD_CMD_DISC is in the output queue or out.
    Queued,
    /// NBD_CMD_DISC is out and the write side is shut.
    Sent,
}

/// Pieces gathered into one `sendmsg`.
const MAX_IOV: usize = 64;

/// See [`Connection::should_send_now`]: requests written together while the owner is busy.
const SEND_BATCH: usize = 16;
/// See [`Connection::should_send_now`]: with less than this much work on the wire (bytes
/// of data, each request counting at least [`MIN_WORK`]), the server may soon have nothing
/// to do.
const SERVER_LOW_WATER: usize = 64 * 1024;
/// The least a request counts for in [`SERVER_LOW_WATER`].
const MIN_WORK: usize = 4096;

/// The transmission phase of one connection, driven by its owner's event loop.
pub struct Connection<U: CommandData> {
    fd: OwnedFd,
    session: Arc<Session>,
    decoder: ReplyDecoder<Entry<U>>,
    queued: VecDeque<Queued<U>>,
    out: VecDeque<Segment>,
    input: Vec<u8>,
    start: usize,
    end: usize,
    payload: Option<InPayload>,
    next_cookie: u64,
    max_in_flight: usize,
    counters: Arc<Counters>,
    lifeline: Arc<Lifeline>,
    debug: DebugSwitch,
    completions: Vec<Completion<U>>,
    shutdown: Shutdown,
    ended: bool,
    /// A sent request segment's memory, for the next one.
    spare_bytes: Option<Vec<u8>>,
    /// Writes whose payload is in the output queue as [`Segment::Write`].
    borrowed_queued: usize,
    /// The last read's data was large (see [`Connection::fill`]).
    large_reads: bool,
    /// DebugSwitch messages kept for the owner ([`Connection::take_debug`]) instead of going to
    /// the handle's sink.
    debug_queue: Option<Vec<(&'static str, String)>>,
    /// Requests put in the output queue since it was last empty, and their work.
    unsent_requests: usize,
    unsent_work: usize,
    /// The work of the commands registered with the decoder (sent or in the output queue):
    /// the sum of their [`Entry::work`].
    registered_work: usize,
    /// The last write found the socket full.
    write_blocked: bool,
    /// A read during this call of [`Connection::on_readable`] came back short: the socket
    /// had nothing more at that moment, so the call ends rather than read again only to
    /// see `EAGAIN` (the owner's poll is level-triggered and reports anything newer).
    drained: bool,
}

/// What the handle hands to an event-loop driver when the handshake is done.
pub struct Transmission {
    pub(crate) fd: OwnedFd,
    pub(crate) session: Arc<Session>,
    pub(crate) early: Vec<u8>,
    pub(crate) max_in_flight: usize,
    pub(crate) counters: Arc<Counters>,
    pub(crate) lifeline: Arc<Lifeline>,
    pub(crate) debug: DebugSwitch,
}

impl<U: CommandData> Connection<U> {
    /// Takes over a connection that finished its handshake.
    pub fn new(t: Transmission) -> Connection<U> {
        let mut input = vec![0; INPUT_SIZE.max(t.early.len())];
        input[..t.early.len()].copy_from_slice(&t.early);
        Connection {
            decoder: {
                let mut d = ReplyDecoder::new(&t.session.negotiated);
                d.spare_from_blame(|e: &Entry<U>| e.user.cancelled());
                d
            },
            fd: t.fd,
            session: t.session,
            queued: VecDeque::new(),
            out: VecDeque::new(),
            end: t.early.len(),
            input,
            start: 0,
            payload: None,
            next_cookie: 1,
            max_in_flight: t.max_in_flight.max(1),
            counters: t.counters,
            lifeline: t.lifeline,
            debug: t.debug,
            completions: Vec::new(),
            shutdown: Shutdown::None,
            ended: false,
            debug_queue: None,
            large_reads: false,
            spare_bytes: None,
            borrowed_queued: 0,
            unsent_requests: 0,
            unsent_work: 0,
            registered_work: 0,
            write_blocked: false,
            drained: false,
        }
    }

    /// Keeps debug messages for [`Connection::take_debug`] rather than sending them to the
    /// handle's sink: an owner on the application's thread can then deliver them in order
    /// with the completions they describe.
    pub fn queue_debug(&mut self, on: bool) {
        self.debug_queue = on.then(Vec::new);
    }

    /// The debug messages kept since the last call: (context, message).
    pub fn take_debug(&mut self) -> Vec<(&'static str, String)> {
        self.debug_queue.as_mut().map(std::mem::take).unwrap_or_default()
    }

    fn log(&mut self, context: &'static str, message: String) {
        match &mut self.debug_queue {
            Some(q) => q.push((context, message)),
            None => self.debug.log(context, &message),
        }
    }

    /// The socket to poll.
    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// What the handshake settled.
    pub fn session(&self) -> &Arc<Session> {
        &self.session
    }

    /// True once the connection is over (dead, or shut down and hung up).
    pub fn is_ended(&self) -> bool {
        self.ended
    }

    /// How many requests wait, wholly or partly, to be written: those queued since the
    /// output queue was last empty. (Commands held back by the in-flight limit are not
    /// counted: they are not encoded yet.)
    pub fn unsent_requests(&self) -> usize {
        if self.out.is_empty() {
            0
        } else {
            self.unsent_requests
        }
    }

    /// Whether requests issued while the owner is busy settling replies should be written
    /// now rather than when it is done: when [`SEND_BATCH`] of them wait, or when the server
    /// has less than [`SERVER_LOW_WATER`] of work left (bytes to read or write, each
    /// request counting at least [`MIN_WORK`]); never while the socket is full (the owner
    /// then waits for it to be writable).
    ///
    /// An owner that settles many replies in one go runs the code awaiting each of them
    /// before it can write, and that code issues the next requests one by one. Held until
    /// the end, they reached the server in one burst after all of it, and a server with
    /// threads could run out of work meanwhile (its CPUs then idle, and on a virtual
    /// machine each halted CPU costs a wake-up). Measured from JavaScript, 4 KiB reads at
    /// depth 64 (`bench/ours.js`, 5 or 6 alternating runs, medians): against nbdkit,
    /// `preadInto` went from 203,000 reads a second to 220,000 and `pread` from 172,000 to
    /// 184,000–194,000, at the same or less CPU per read on both sides; against qemu-nbd,
    /// from 264,000 to 281,000. Writes did not change. Groups of 16 alone, without the
    /// low-water mark, did as well for `pread` but not for `preadInto`; writing every
    /// request at once cost qemu-nbd reads 2–4 % and made 4 KiB writes slower. The mark
    /// counts bytes rather than requests because a server with a few large reads to do is
    /// busy enough: counted in requests (16), a read stream (256 KiB reads, 16 ahead) sent
    /// every request alone and used 7 % more CPU; counted in bytes, it is as before.
    pub fn should_send_now(&self) -> bool {
        if self.write_blocked {
            return false;
        }
        let unsent = self.unsent_requests();
        if unsent == 0 {
            return false;
        }
        // The unsent figures are kept since the queue was last empty, so they may still
        // count a request that was answered early or dropped: never below zero.
        let on_the_wire = self.registered_work.saturating_sub(self.unsent_work);
        unsent >= SEND_BATCH || on_the_wire < SERVER_LOW_WATER
    }

    /// True when output is waiting for the socket to become writable.
    pub fn wants_write(&self) -> bool {
        !self.ended && !self.out.is_empty()
    }

    /// True while commands are queued or in flight, or output is waiting.
    pub fn owes_replies(&self) -> bool {
        !self.ended
            && (!self.decoder.is_empty() || !self.queued.is_empty() || !self.out.is_empty()
                || self.shutdown == Shutdown::Pending)
    }

    /// True once NBD_CMD_DISC is out (or the connection ended): a shutdown is complete.
    pub fn shutdown_done(&self) -> bool {
        self.ended || self.shutdown == Shutdown::Sent
    }

    /// The state a handle on this connection is in.
    pub fn state(&self) -> State {
        // `shutdown` marks the lifeline as disconnecting before anything else.
        self.lifeline.state(self.counters.in_flight.load(Ordering::Relaxed))
    }

    /// Finished commands, to be settled by the owner.
    pub fn take_completions(&mut self) -> Vec<Completion<U>> {
        std::mem::take(&mut self.completions)
    }

    /// Finished commands, swapped into `batch` (which must be empty): the owner keeps one
    /// vector for them and gives it back each time, so no wake-up allocates.
    pub fn swap_completions(&mut self, batch: &mut Vec<Completion<U>>) {
        debug_assert!(batch.is_empty());
        std::mem::swap(&mut self.completions, batch);
    }

    /// Checks a command as libnbd would (state, strict mode) and queues it. On refusal the
    /// command's value comes back with the error.
    pub fn submit(&mut self, sub: Submission<U>, strict: u32) -> std::result::Result<(), (Error, U)> {
        let Submission {
            cmd,
            filter,
            record_chunks,
            payload,
            user,
        } = sub;
        if let Err(e) = self.check_state() {
            return Err((e, user));
        }
        let (flags, ids) = match self.session.strict(strict).check_submission(&cmd, record_chunks, filter.as_deref()) {
            Ok(checked) => checked,
            Err(e) => return Err((e, user)),
        };
        let tracking = Tracking {
            filter: ids,
            record_chunks,
        };
        self.counters.in_flight.fetch_add(1, Ordering::Relaxed);
        let q = Queued {
            cmd,
            flags,
            tracking,
            payload,
            user,
        };
        if self.queued.is_empty() && self.decoder.len() < self.max_in_flight {
            self.send(q);
        } else {
            self.queued.push_back(q);
        }
        Ok(())
    }

    fn check_state(&self) -> Result<()> {
        // A handle shutting down is `closed`, which the table refuses.
        state::ensure_allowed(Call::Command, self.state())
    }

    /// A command is over: no longer in flight, its outcome waits for the owner.
    #[inline]
    fn finish(&mut self, user: U, result: Result<()>, detail: Detail) {
        self.counters.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.completions.push(Completion { user, result, detail });
    }

    /// Encodes a command into the output queue and registers it with the decoder.
    fn send(&mut self, q: Queued<U>) {
        let Queued {
            cmd,
            flags,
            tracking,
            payload,
            mut user,
        } = q;
        if user.cancelled() {
            // The caller has been told already; it never reaches the wire.
            self.finish(user, Err(cancelled_error()), Detail::None);
            return;
        }
        // A borrowed payload must still be there before anything of the command goes out.
        if let Payload::Borrowed(len) = payload {
            if !matches!(user.source(), Some((_, l)) if l == len) {
                self.finish(user, Err(detached_error("write", len)), Detail::None);
                return;
            }
        }
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        if self.debug.on.load(Ordering::Relaxed) {
            self.log("command", describe_request(cookie, &cmd, flags, &tracking));
        }
        let mut sent = 0u64;
        let work = match cmd.kind {
            CommandKind::Read | CommandKind::Write => (cmd.length as usize).max(MIN_WORK),
            _ => MIN_WORK,
        };
        if self.out.is_empty() {
            self.unsent_requests = 0;
            self.unsent_work = 0;
        }
        self.unsent_requests += 1;
        self.unsent_work += work;
        self.registered_work += work;
        match payload {
            Payload::Borrowed(len) => {
                let mut header = Vec::with_capacity(32);
                self.session.encode_request(cookie, &cmd, flags, &mut header);
                sent += (header.len() + len) as u64;
                self.out.push_back(Segment::Write {
                    cookie,
                    header,
                    len,
                    sent: 0,
                });
                self.borrowed_queued += 1;
            }
            other => {
                let data = bytes_tail(&mut self.out, &mut self.spare_bytes);
                let at = data.len();
                match &tracking.filter {
                    Some(ids) => self.session.encode_block_status_filter(cookie, &cmd, flags, ids, data),
                    None => self.session.encode_request(cookie, &cmd, flags, data),
                }
                if let Payload::Owned(bytes) = other {
                    data.extend_from_slice(&bytes);
                }
                sent += (data.len() - at) as u64;
            }
        }
        self.counters.sent(sent);
        self.decoder
            .register_with(cookie, cmd, tracking, Entry { user, fault: None, work });
    }


    /// Moves queued commands onto the wire while there is room.
    fn promote(&mut self) {
        while self.decoder.len() < self.max_in_flight {
            let Some(q) = self.queued.pop_front() else { break };
            self.send(q);
        }
        if self.shutdown == Shutdown::Pending && self.queued.is_empty() && self.decoder.is_empty() {
            self.queue_disconnect();
        }
    }

    /// Fails the queued commands that were cancelled, at once (they would never be sent).
    pub fn drop_cancelled(&mut self) {
        let queued = std::mem::take(&mut self.queued);
        let mut kept = VecDeque::with_capacity(queued.len());
        for q in queued {
            if q.user.cancelled() {
                self.finish(q.user, Err(cancelled_error()), Detail::None);
            } else {
                kept.push_back(q);
            }
        }
        self.queued = kept;
    }

    /// `nbd_shutdown`: NBD_CMD_DISC once the commands in flight are answered, or at once
    /// with `abandon` (the commands not yet sent then fail with `ENOTCONN`).
    pub fn shutdown(&mut self, abandon: bool) -> Result<()> {
        state::ensure_allowed(Call::Shutdown, self.state())?;
        if self.shutdown != Shutdown::None || self.ended {
            return Ok(());
        }
        self.lifeline.begin_disconnect();
        if abandon {
            for q in std::mem::take(&mut self.queued) {
                let e = Error::io(Errno::ENOTCONN, "the handle was shut down before the command was sent");
                self.finish(q.user, Err(e), Detail::None);
            }
            self.queue_disconnect();
        } else {
            self.shutdown = Shutdown::Pending;
            self.promote();
        }
        Ok(())
    }

    fn queue_disconnect(&mut self) {
        let cmd = DISCONNECT;
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        if self.debug.on.load(Ordering::Relaxed) {
            self.log("shutdown", "sending NBD_CMD_DISC".to_string());
        }
        let mut data = Vec::with_capacity(32);
        self.session.encode_request(cookie, &cmd, 0, &mut data);
        self.counters.sent(data.len() as u64);
        self.out.push_back(Segment::Disconnect { data, sent: 0 });
        self.shutdown = Shutdown::Queued;
    }

    // ---- writing ----

    /// Writes as much of the output queue as the socket takes now, gathering many pieces
    /// into one system call.
    pub fn flush(&mut self) {
        while !self.ended && !self.out.is_empty() {
            let mut iov: [libc::iovec; MAX_IOV] = unsafe { std::mem::zeroed() };
            let mut n_iov = 0;
            let mut broken: Option<(u64, usize, bool)> = None;
            for seg in self.out.iter() {
                if n_iov + 2 > MAX_IOV {
                    break;
                }
                match seg {
                    Segment::Bytes { data, sent } | Segment::Disconnect { data, sent } => {
                        iov[n_iov] = iovec(&data[*sent..]);
                        n_iov += 1;
                    }
                    Segment::Write {
                        cookie,
                        header,
                        len,
                        sent,
                    } => {
                        let user = &mut self
                            .decoder
                            .user_mut(*cookie)
                            .expect("a write being sent is registered")
                            .user;
                        let src = match user.source() {
                            Some((ptr, l)) if l == *len && !user.cancelled() => ptr,
                            Some((ptr, l)) if l == *len && *sent > 0 => ptr,
                            _ => {
                                broken = Some((*cookie, *len, *sent > 0));
                                break;
                            }
                        };
                        if *sent < header.len() {
                            iov[n_iov] = iovec(&header[*sent..]);
                            n_iov += 1;
                        }
                        let from = sent.saturating_sub(header.len());
                        // SAFETY: `source` just said `len` bytes live at `src`, and nothing
                        // can move them before this call returns (no other code runs).
                        let data = unsafe { std::slice::from_raw_parts(src.add(from), len - from) };
                        iov[n_iov] = iovec(data);
                        n_iov += 1;
                    }
                }
            }
            if n_iov == 0 {
                if let Some((cookie, len, partly_sent)) = broken {
                    self.write_source_gone(cookie, len, partly_sent);
                    continue;
                }
                break;
            }
            let written = match send_vectored(self.fd.as_raw_fd(), &iov[..n_iov]) {
                Ok(n) => {
                    self.write_blocked = false;
                    n
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.write_blocked = true;
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.fail(crate::transport::io_error("writing to the server", e), None);
                    return;
                }
            };
            self.advance(written);
            if let Some((cookie, len, partly_sent)) = broken {
                if self.out.front().is_some_and(|s| matches!(s, Segment::Write { cookie: c, .. } if *c == cookie)) {
                    self.write_source_gone(cookie, len, partly_sent);
                }
            }
        }
    }

    /// Drops `written` bytes from the front of the output queue.
    fn advance(&mut self, mut written: usize) {
        while written > 0 {
            let Some(seg) = self.out.front_mut() else { break };
            let (total, sent) = match seg {
                Segment::Bytes { data, sent } | Segment::Disconnect { data, sent } => (data.len(), sent),
                Segment::Write {
                    header, len, sent, ..
                } => (header.len() + *len, sent),
            };
            let take = written.min(total - *sent);
            *sent += take;
            written -= take;
            if *sent == total {
                let seg = self.out.pop_front().expect("front exists");
                if let Segment::Bytes { mut data, .. } = seg {
                    // Kept for the next batch of requests.
                    data.clear();
                    self.spare_bytes = Some(data);
                } else if let Segment::Write { .. } = seg {
                    self.borrowed_queued -= 1;
                } else if let Segment::Disconnect { .. } = seg {
                    // Nothing may follow NBD_CMD_DISC: close our side.
                    // SAFETY: shutdown(2) on our own socket.
                    unsafe { libc::shutdown(self.fd.as_raw_fd(), libc::SHUT_WR) };
                    self.shutdown = Shutdown::Sent;
                }
            }
        }
    }

    /// A write's payload went away before it was all sent. Nothing of it sent yet: that
    /// command fails with `EFAULT` and the connection goes on. Partly sent: the stream can
    /// no longer be completed truthfully, so the connection ends.
    fn write_source_gone(&mut self, cookie: u64, len: usize, partly_sent: bool) {
        let cancelled = self
            .decoder
            .user_mut(cookie)
            .is_some_and(|e| e.user.cancelled());
        let error = if cancelled { cancelled_error() } else { detached_error("write", len) };
        if !partly_sent {
            let before = self.out.len();
            self.out.retain(|s| !matches!(s, Segment::Write { cookie: c, .. } if *c == cookie));
            self.borrowed_queued -= before - self.out.len();
            if let Some(entry) = self.decoder.unregister(cookie) {
                self.registered_work -= entry.work;
                self.finish(entry.user, Err(error), Detail::None);
            }
            self.promote();
        } else {
            let fatal = Error::io(
                error.errno(),
                format!("{}; the request was partly sent, so the connection was closed", error.message()),
            );
            let entry = self.decoder.unregister(cookie);
            self.fail(fatal.clone(), entry.map(|e| (e.user, fatal)));
        }
    }

    /// The poller reported an error on the socket (libuv's `status`): the connection ends.
    pub fn poll_failed(&mut self, status: i32) {
        let e = Error::io(Errno::EIO, format!("polling the socket failed (libuv error {status})"));
        self.fail(e, None);
    }

    // ---- reading ----

    /// Reads and decodes what the server sent; completions gather for
    /// [`Connection::take_completions`]. Returns after the first read that comes back
    /// short, having decoded what it brought, without a last read only to see `EAGAIN`:
    /// the owner must poll level-triggered (libuv's poll handles are), so that data which
    /// came meanwhile wakes it again at once.
    pub fn on_readable(&mut self) {
        self.drained = false;
        while !self.ended {
            if self.payload.is_some() {
                match self.continue_payload() {
                    Ok(true) => continue,
                    Ok(false) => return,
                    Err(e) => {
                        self.fail(e, None);
                        return;
                    }
                }
            }
            let decoded = match self.decoder.decode(&self.input[self.start..self.end]) {
                Ok(d) => d,
                Err(Fatal { error, command }) => {
                    if self.debug.on.load(Ordering::Relaxed) {
                        self.log("reply", format!("protocol violation: {}", error.message()));
                    }
                    self.fail(error.clone(), command.map(|(_, e)| (e.user, error)));
                    return;
                }
            };
            match decoded {
                Decoded {
                    consumed: 0,
                    event: None,
                } => {
                    // A short read means the socket is empty for now: what came is
                    // decoded, then the next wake-up brings more.
                    if self.drained {
                        return;
                    }
                    match self.fill() {
                        Ok(Fill::Eof) => {
                            self.end_of_stream();
                            return;
                        }
                        Ok(Fill::Data) => {}
                        Ok(Fill::Empty) => return,
                        Err(e) => {
                            self.fail(e, None);
                            return;
                        }
                    }
                }
                Decoded { consumed, event } => {
                    self.consume(consumed);
                    if let Some(event) = event {
                        self.event(event);
                    }
                }
            }
        }
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// One read into the input buffer.
    fn fill(&mut self) -> Result<Fill> {
        if self.input.len() - self.end < 4096 {
            self.input.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
            if self.input.len() - self.end < 4096 {
                let want = self.end + INPUT_SIZE;
                self.input.resize(want, 0);
            }
        }
        // After a large read's data, the next reply is likely another large read: take only
        // what its header needs, so that its data goes straight into its destination rather
        // than through this buffer (one copy, not two). Small replies are read in batches.
        let room = if self.large_reads {
            (self.input.len() - self.end).min(SMALL_FILL)
        } else {
            self.input.len() - self.end
        };
        match recv(self.fd.as_raw_fd(), &mut self.input[self.end..self.end + room]) {
            Ok(0) => Ok(Fill::Eof),
            Ok(n) => {
                self.end += n;
                self.counters.bytes_received.fetch_add(n as u64, Ordering::Relaxed);
                self.drained = n < room;
                Ok(Fill::Data)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Fill::Empty),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(Fill::Data),
            Err(e) => Err(crate::transport::io_error("reading from the server", e)),
        }
    }

    fn event(&mut self, event: Event<Entry<U>>) {
        // Every event is one reply or reply chunk.
        self.counters.chunks_received.fetch_add(1, Ordering::Relaxed);
        match event {
            Event::Done {
                cookie,
                user: mut entry,
                result,
                detail,
            } => {
                self.registered_work -= entry.work;
                if let Err(e) = self.own_unsent_payload(cookie, &mut entry) {
                    self.fail(e.clone(), Some((entry.user, e)));
                    return;
                }
                if self.debug.on.load(Ordering::Relaxed) {
                    self.log("reply", describe_outcome(cookie, &result));
                }
                let result = match (entry.fault, entry.user.cancelled()) {
                    (_, true) => Err(cancelled_error()),
                    (Some(fault), false) => Err(fault),
                    (None, false) => result,
                };
                self.finish(entry.user, result, detail);
                self.promote();
            }
            Event::ReadHole {
                cookie,
                buf_offset,
                len,
            } => {
                let entry = self.decoder.user_mut(cookie).expect("decoder names a command in flight");
                if let Some(ptr) = dest_checked(entry, buf_offset + len) {
                    // SAFETY: `dest_checked` says the range is inside the live destination.
                    unsafe { std::ptr::write_bytes(ptr.add(buf_offset), 0, len) };
                }
            }
            Event::ReadData {
                cookie,
                buf_offset,
                len,
            } => {
                self.large_reads = len >= DIRECT_READ_MIN;
                self.payload = Some(InPayload {
                    cookie,
                    buf_offset,
                    len,
                    done: 0,
                    sink: false,
                });
            }
        }
    }

    /// A write answered before all of its payload went out (a server may reply early,
    /// but the request must still be sent whole): copies the unsent rest into the output
    /// queue now, while its owner's memory is known to be there.
    fn own_unsent_payload(&mut self, cookie: u64, entry: &mut Entry<U>) -> Result<()> {
        if self.borrowed_queued == 0 {
            return Ok(());
        }
        let Some(i) = self
            .out
            .iter()
            .position(|s| matches!(s, Segment::Write { cookie: c, .. } if *c == cookie))
        else {
            return Ok(());
        };
        let Segment::Write { header, len, sent, .. } = &self.out[i] else { unreachable!() };
        let (header_len, len, sent) = (header.len(), *len, *sent);
        let src = match entry.user.source() {
            Some((ptr, l)) if l == len => ptr,
            _ => return Err(detached_error("write", len)),
        };
        let mut data = Vec::with_capacity(header_len + len - sent);
        if sent < header_len {
            data.extend_from_slice(&header[sent..]);
        }
        let from = sent.saturating_sub(header_len);
        // SAFETY: `source` just said `len` bytes live at `src`.
        data.extend_from_slice(unsafe { std::slice::from_raw_parts(src.add(from), len - from) });
        self.out[i] = Segment::Bytes { data, sent: 0 };
        self.borrowed_queued -= 1;
        Ok(())
    }

    /// Moves read data into its destination: first what is buffered, then straight from
    /// the socket. `Ok(false)` when the socket has no more for now.
    fn continue_payload(&mut self) -> Result<bool> {
        let mut p = self.payload.take().expect("a payload is in progress");
        let entry = self.decoder.user_mut(p.cookie).expect("decoder names a command in flight");
        // Looked up again on every wake-up: JavaScript may have run since the last one.
        let dest = if p.sink {
            None
        } else {
            let d = dest_checked(entry, p.buf_offset + p.len);
            if d.is_none() {
                p.sink = true;
            }
            d
        };
        loop {
            if p.done == p.len {
                self.decoder.payload_done();
                return Ok(true);
            }
            let buffered = (self.end - self.start).min(p.len - p.done);
            if buffered > 0 {
                if let Some(ptr) = dest {
                    // SAFETY: in range of the live destination (checked above), and the
                    // input buffer never overlaps it.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            self.input[self.start..].as_ptr(),
                            ptr.add(p.buf_offset + p.done),
                            buffered,
                        )
                    };
                }
                self.consume(buffered);
                p.done += buffered;
                continue;
            }
            if self.drained {
                self.payload = Some(p);
                return Ok(false);
            }
            let left = p.len - p.done;
            let result = match dest {
                Some(ptr) if left >= DIRECT_READ_MIN || (self.large_reads && left >= SMALL_FILL) => {
                    // SAFETY: as above.
                    let slice = unsafe { std::slice::from_raw_parts_mut(ptr.add(p.buf_offset + p.done), left) };
                    match recv(self.fd.as_raw_fd(), slice) {
                        Ok(n) => {
                            self.counters.bytes_received.fetch_add(n as u64, Ordering::Relaxed);
                            p.done += n;
                            self.drained = n < left;
                            Ok(n)
                        }
                        Err(e) => Err(e),
                    }
                }
                _ => match self.fill() {
                    Ok(Fill::Eof) => Ok(0),
                    Ok(Fill::Data) => Ok(1),
                    Ok(Fill::Empty) => Err(io::ErrorKind::WouldBlock.into()),
                    Err(e) => {
                        self.payload = Some(p);
                        return Err(e);
                    }
                },
            };
            match result {
                Ok(0) => {
                    self.payload = Some(p);
                    self.end_of_stream();
                    return Ok(false);
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.payload = Some(p);
                    return Ok(false);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.payload = Some(p);
                    return Err(crate::transport::io_error("reading from the server", e));
                }
            }
        }
    }

    fn end_of_stream(&mut self) {
        self.fail(end_of_stream_error(self.shutdown != Shutdown::None), None);
    }

    /// Ends the connection: `culprit` (if any) fails with its own error, every other
    /// command with the connection's end. The handle's state is final before any of them
    /// is reported.
    fn fail(&mut self, error: Error, culprit: Option<(U, Error)>) {
        if self.ended {
            return;
        }
        self.ended = true;
        self.lifeline.end(error);
        let pending = self.lifeline.pending_error();
        if self.debug.on.load(Ordering::Relaxed) {
            self.log("connection", format!("connection ended: {}", pending.message()));
        }
        self.payload = None;
        self.out.clear();
        self.borrowed_queued = 0;
        if let Some((user, e)) = culprit {
            self.finish(user, Err(e), Detail::None);
        }
        self.fail_all(pending);
        if self.shutdown == Shutdown::Pending || self.shutdown == Shutdown::Queued {
            self.shutdown = Shutdown::Sent;
        }
    }

    fn fail_all(&mut self, error: Error) {
        let mut entries: Vec<(u64, Entry<U>)> = self.decoder.take_all();
        self.registered_work = 0;
        entries.sort_by_key(|(cookie, _)| *cookie);
        for (_, entry) in entries {
            let result = if entry.user.cancelled() { cancelled_error() } else { error.clone() };
            self.finish(entry.user, Err(result), Detail::None);
        }
        for q in std::mem::take(&mut self.queued) {
            let result = if q.user.cancelled() { cancelled_error() } else { error.clone() };
            self.finish(q.user, Err(result), Detail::None);
        }
    }

    /// Closes the connection: every pending command fails with `ENOTCONN` (see
    /// [`Connection::take_completions`]); the socket closes when the value is dropped.
    pub fn close(&mut self) {
        if !self.ended {
            self.ended = true;
            self.lifeline.end(Error::io(Errno::ENOTCONN, "the handle was closed"));
            self.payload = None;
            self.out.clear();
            self.borrowed_queued = 0;
        }
        self.fail_all(closed_error());
    }
}

/// The byte segment at the end of the output queue `out`, new (from `spare` if there is one)
/// if the last one is not.
fn bytes_tail<'a>(out: &'a mut VecDeque<Segment>, spare: &mut Option<Vec<u8>>) -> &'a mut Vec<u8> {
    if !matches!(out.back(), Some(Segment::Bytes { .. })) {
        let data = spare.take().unwrap_or_else(|| Vec::with_capacity(4096));
        out.push_back(Segment::Bytes { data, sent: 0 });
    }
    match out.back_mut() {
        Some(Segment::Bytes { data, .. }) => data,
        _ => unreachable!("a byte segment was just pushed"),
    }
}

/// The destination of `entry` if it is live, at least `needed` bytes long and the command
/// still wants it; otherwise records why not and gives `None`.
fn dest_checked<U: CommandData>(entry: &mut Entry<U>, needed: usize) -> Option<*mut u8> {
    if entry.user.cancelled() || entry.fault.is_some() {
        return None;
    }
    match entry.user.dest() {
        Some((ptr, len)) if len >= needed && !ptr.is_null() => Some(ptr),
        Some((_, 0)) | None if needed == 0 => None,
        other => {
            let len = other.map_or(0, |(_, l)| l);
            entry.fault = Some(Error::usage(
                Errno::EFAULT,
                format!(
                    "the buffer was detached or resized while the read was in flight \
                     (it now has {len} bytes); the data was dropped"
                ),
            ));
            None
        }
    }
}

fn detached_error(what: &str, len: usize) -> Error {
    Error::usage(
        Errno::EFAULT,
        format!("the buffer of this {what} ({len} bytes) was detached or resized before it was sent"),
    )
}

fn iovec(data: &[u8]) -> libc::iovec {
    libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
const SEND_FLAGS: libc::c_int = libc::MSG_NOSIGNAL;
#[cfg(not(any(target_os = "linux", target_os = "android")))]
const SEND_FLAGS: libc::c_int = 0;

fn send_vectored(fd: RawFd, iov: &[libc::iovec]) -> io::Result<usize> {
    // SAFETY: a zeroed msghdr with only the iovecs set is a valid argument; the iovecs
    // point to memory the caller keeps alive for the call.
    let n = unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
        msg.msg_iovlen = iov.len() as _;
        libc::sendmsg(fd, &msg, SEND_FLAGS | libc::MSG_DONTWAIT)
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

fn recv(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is writable for its length.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}
