//! The tokio driver: a writer task ([`RequestWriter`]) and a reader task ([`ReplyReader`])
//! per connection.
//!
//! The writer takes requests from an unbounded channel (the queue never refuses), waits for
//! one of `max_in_flight` permits, registers the command with the reader, and writes the
//! request; requests that arrive together share one system call, and large write payloads
//! are sent straight from the caller's buffer. The reader owns the `nbd-proto` reply
//! decoder and the table of commands in flight; it moves read data from the socket into
//! each command's destination and completes commands through oneshot channels.
//!
//! Either task ending for a reason other than a requested disconnect marks the connection
//! dead, and every command still pending is failed: nothing waits forever.

use std::future::poll_fn;
use std::io::IoSlice;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Poll;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadBuf};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

use nbd_proto::transmission::{
    Command, Decoded, Detail, Event, Fatal, ReplyDecoder, Session, Tracking,
};
use nbd_proto::{Error, Result};

use super::{
    describe_outcome, describe_request, DISCONNECT, closed_error, end_of_stream_error, Counters, DebugSwitch, InFlightGuard, Lifeline, COPY_PAYLOAD_MAX,
    DIRECT_READ_MIN, INPUT_SIZE, SMALL_FILL,
};
use crate::buffer::{DestBuf, SourceBuf};
use crate::cancel::CancelToken;
use crate::transport::{io_error, Reader, Writer};

/// Where a command's data lives.
pub(crate) enum Payload {
    None,
    /// A read into a buffer the driver allocated.
    ReadOwned(Vec<u8>),
    /// A read into the application's buffer.
    ReadInto(Box<dyn DestBuf>),
    /// A write from the application's buffer.
    Write(Box<dyn SourceBuf>),
}

impl Payload {
    fn dest(&mut self) -> Option<(*mut u8, usize)> {
        match self {
            Payload::ReadOwned(v) => Some((v.as_mut_ptr(), v.len())),
            Payload::ReadInto(b) => Some((b.as_mut_ptr(), b.len())),
            _ => None,
        }
    }
}


/// What a finished command hands back: its buffer (for reads) and what the reply carried.
pub(crate) struct Completed {
    pub payload: Payload,
    pub detail: Detail,
}

/// A command's outcome, boxed for a callback.
pub(crate) type Callback = Box<dyn FnOnce(Result<Completed>) + Send>;


/// A command's callback, called exactly once: if the command is dropped unanswered (say
/// because the handle closed), the callback hears of it from the drop.
pub(crate) struct CallbackReply(Option<Callback>);

impl CallbackReply {
    pub(crate) fn new(f: Callback) -> CallbackReply {
        CallbackReply(Some(f))
    }

    /// Takes the callback back uncalled (the command was never queued).
    pub(crate) fn disarm(mut self) -> Callback {
        self.0.take().expect("armed")
    }

    pub(crate) fn send(mut self, result: Result<Completed>) {
        if let Some(f) = self.0.take() {
            f(result)
        }
    }
}

impl Drop for CallbackReply {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f(Err(closed_error()));
        }
    }
}

/// A command on its way to the writer.
pub(crate) struct CommandRequest {
    // Declared first so that it drops first: a request dropped unsent stops counting as in
    // flight before its callback (if any) reports it.
    pub guard: InFlightGuard,
    pub cmd: Command,
    pub flags: u16,
    pub tracking: Tracking,
    pub payload: Payload,
    pub cancel: Option<CancelToken>,
    pub reply: CallbackReply,
}

pub(crate) enum Request {
    Command(CommandRequest),
    /// Send NBD_CMD_DISC (after the commands in flight finish, unless `abandon`), then
    /// close the write side.
    Disconnect {
        abandon: bool,
        done: oneshot::Sender<Result<()>>,
    },
}

/// A command the reader is waiting for.
struct InFlight {
    // Dropped first (declaration order) when an entry is dropped unanswered, for the same
    // reason as in CommandRequest.
    _guard: InFlightGuard,
    _permit: OwnedSemaphorePermit,
    reply: CallbackReply,
    payload: Payload,
    cancel: Option<CancelToken>,
}

impl InFlight {
    fn complete(self, result: Result<()>, detail: Detail) {
        let InFlight {
            reply,
            payload,
            cancel,
            _permit,
            _guard,
        } = self;
        // No longer in flight before anyone hears of the outcome: a caller that looks at
        // the handle's state right after must see it idle.
        drop((_permit, _guard, cancel));
        reply.send(result.map(|()| Completed { payload, detail }));
    }
}


/// A running connection: the way in (the request channel) and the tasks.
pub(crate) struct Driver {
    pub session: Arc<Session>,
    pub requests: mpsc::UnboundedSender<Request>,
    pub lifeline: Arc<Lifeline>,
    tasks: Vec<JoinHandle<()>>,
}

/// Registration of a command with the reader.
type Registration = (u64, Command, Tracking, InFlight);

impl Driver {
    /// Starts the tasks on the current tokio runtime. `early` holds bytes the handshake
    /// read past its end.
    pub(crate) fn start(
        session: Session,
        reader: Reader,
        writer: Writer,
        early: Vec<u8>,
        max_in_flight: usize,
        counters: Arc<Counters>,
        debug: Option<DebugSwitch>,
    ) -> Driver {
        let session = Arc::new(session);
        let lifeline = Lifeline::new();
        let (requests, request_rx) = mpsc::unbounded_channel();
        let (register, register_rx) = mpsc::unbounded_channel();
        let max_in_flight = max_in_flight.clamp(1, Semaphore::MAX_PERMITS);
        let mut decoder = ReplyDecoder::new(&session.negotiated);
        decoder.spare_from_blame(|f: &InFlight| f.cancel.as_ref().is_some_and(CancelToken::is_cancelled));
        let reader_task = tokio::spawn(
            ReplyReader {
                reader,
                decoder,
                register: register_rx,
                input: InputBuffer::with_leftover(early),
                counters: counters.clone(),
                lifeline: lifeline.clone(),
                debug: debug.clone(),
            }
            .run(),
        );
        let writer_task = tokio::spawn(
            RequestWriter {
                writer,
                session: session.clone(),
                requests: request_rx,
                register,
                permits: Arc::new(Semaphore::new(max_in_flight)),
                max_in_flight: max_in_flight as u32,
                counters,
                lifeline: lifeline.clone(),
                next_cookie: 1,
                out: Vec::with_capacity(OUT_BATCH),
                debug,
            }
            .run(),
        );
        Driver {
            session,
            requests,
            lifeline,
            tasks: vec![reader_task, writer_task],
        }
    }

    /// Stops both tasks and waits until they are gone (their sockets closed, their
    /// commands failed).
    pub(crate) async fn stop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Requests are gathered into one write up to this many bytes.
const OUT_BATCH: usize = 256 * 1024;

struct RequestWriter {
    writer: Writer,
    session: Arc<Session>,
    requests: mpsc::UnboundedReceiver<Request>,
    register: mpsc::UnboundedSender<Registration>,
    permits: Arc<Semaphore>,
    max_in_flight: u32,
    counters: Arc<Counters>,
    lifeline: Arc<Lifeline>,
    next_cookie: u64,
    out: Vec<u8>,
    debug: Option<DebugSwitch>,
}

impl RequestWriter {
    async fn run(mut self) {
        let lifeline = self.lifeline.clone();
        let result = tokio::select! {
            r = self.serve() => r,
            () = lifeline.wait() => Ok(()),
        };
        if let Err(e) = result {
            self.lifeline.end(e);
        }
        // Whatever is still queued can no longer be sent.
        self.requests.close();
        while let Ok(req) = self.requests.try_recv() {
            match req {
                Request::Command(CommandRequest { reply, guard, .. }) => {
                    drop(guard);
                    reply.send(Err(self.lifeline.pending_error()));
                }
                Request::Disconnect { done, .. } => {
                    let _ = done.send(Err(self.lifeline.pending_error()));
                }
            }
        }
    }

    async fn serve(&mut self) -> Result<()> {
        while let Some(mut req) = self.requests.recv().await {
            loop {
                match req {
                    Request::Command(c) => self.command(c).await?,
                    Request::Disconnect { abandon, done } => {
                        let r = self.disconnect(abandon).await;
                        let failed = r.is_err();
                        let _ = done.send(r);
                        if failed {
                            return Err(self.lifeline.pending_error());
                        }
                        // Nothing may follow NBD_CMD_DISC on the wire.
                        return Ok(());
                    }
                }
                if self.out.len() >= OUT_BATCH {
                    self.flush().await?;
                }
                match self.requests.try_recv() {
                    Ok(next) => req = next,
                    Err(_) => break,
                }
            }
            self.flush().await?;
        }
        Ok(())
    }

    async fn command(&mut self, c: CommandRequest) -> Result<()> {
        if c.cancel.as_ref().is_some_and(CancelToken::is_cancelled) {
            // The caller has already been told; never send it.
            return Ok(());
        }
        if self.lifeline.abandoned() {
            let CommandRequest { guard, reply, .. } = c;
            drop(guard);
            reply.send(Err(Lifeline::abandoned_error()));
            return Ok(());
        }
        let permit = match self.permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                // Replies free permits, and the server only replies to what it has seen.
                self.flush().await?;
                tokio::select! {
                    p = self.permits.clone().acquire_owned() => p.expect("the semaphore is never closed"),
                    () = self.lifeline.until_abandoned() => {
                        let CommandRequest { guard, reply, .. } = c;
                        drop(guard);
                        reply.send(Err(Lifeline::abandoned_error()));
                        return Ok(());
                    }
                }
            }
        };
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        let CommandRequest {
            cmd,
            flags,
            tracking,
            payload,
            cancel,
            reply,
            guard,
        } = c;
        if let Some(debug) = self.debug.as_ref().and_then(DebugSwitch::active) {
            debug.log("command", &describe_request(cookie, &cmd, flags, &tracking));
        }
        let header_at = self.out.len();
        match &tracking.filter {
            Some(ids) => self
                .session
                .encode_block_status_filter(cookie, &cmd, flags, ids, &mut self.out),
            None => self.session.encode_request(cookie, &cmd, flags, &mut self.out),
        }
        let mut sent = (self.out.len() - header_at) as u64;
        // The writer keeps a write's source until it is sent, whatever the reader does:
        // a server may answer (or the connection fail) before the payload is out.
        let (payload, source) = match payload {
            Payload::Write(src) => (Payload::None, Some(src)),
            other => (other, None),
        };
        // Register before writing: an honest server cannot answer an unsent request.
        let in_flight = InFlight {
            reply,
            payload,
            cancel,
            _permit: permit,
            _guard: guard,
        };
        if self.register.send((cookie, cmd, tracking, in_flight)).is_err() {
            return Err(self.lifeline.pending_error());
        }
        if let Some(src) = source {
            // SAFETY: `src` promises `len` readable bytes for as long as it lives, and it
            // lives until the end of this block.
            let data = unsafe { std::slice::from_raw_parts(src.as_ptr(), src.len()) };
            sent += data.len() as u64;
            if data.len() <= COPY_PAYLOAD_MAX {
                self.out.extend_from_slice(data);
            } else {
                self.write_with(data).await?;
            }
        }
        self.counters.sent(sent);
        Ok(())
    }

    async fn disconnect(&mut self, abandon: bool) -> Result<()> {
        self.flush().await?;
        if !abandon {
            // All permits back means every command sent has been answered.
            let all = self
                .permits
                .acquire_many(self.max_in_flight)
                .await
                .expect("the semaphore is never closed");
            drop(all);
        }
        self.lifeline.begin_disconnect();
        let cmd = DISCONNECT;
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        if let Some(debug) = self.debug.as_ref().and_then(DebugSwitch::active) {
            debug.log("shutdown", "sending NBD_CMD_DISC");
        }
        let before = self.out.len();
        self.session.encode_request(cookie, &cmd, 0, &mut self.out);
        let header = (self.out.len() - before) as u64;
        self.counters.sent(header);
        self.flush().await?;
        let _ = self.writer.shutdown().await;
        Ok(())
    }

    async fn flush(&mut self) -> Result<()> {
        if self.out.is_empty() {
            return Ok(());
        }
        let r = self.writer.write_all(&self.out).await;
        self.out.clear();
        r.map_err(|e| io_error("writing to the server", e))
    }

    /// Writes the batched bytes followed by `data`, gathering both into as few system
    /// calls as the socket allows.
    async fn write_with(&mut self, mut data: &[u8]) -> Result<()> {
        let mut head = std::mem::take(&mut self.out);
        let mut head_pos = 0;
        let result = async {
            while head_pos < head.len() || !data.is_empty() {
                let bufs = [IoSlice::new(&head[head_pos..]), IoSlice::new(data)];
                let n = self.writer.write_vectored(&bufs).await?;
                if n == 0 {
                    return Err(std::io::ErrorKind::WriteZero.into());
                }
                let from_head = n.min(head.len() - head_pos);
                head_pos += from_head;
                data = &data[n - from_head..];
            }
            Ok::<(), std::io::Error>(())
        }
        .await;
        head.clear();
        self.out = head;
        result.map_err(|e| io_error("writing to the server", e))
    }
}

/// The reader's buffer: bytes read but not yet decoded are `buf[start..end]`.
struct InputBuffer {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// The last read's data was large: read only a few headers' worth next, so that the
    /// next large payload goes straight to its destination (copied once, not twice).
    large_reads: bool,
}


impl InputBuffer {
    fn with_leftover(early: Vec<u8>) -> InputBuffer {
        let mut buf = vec![0; INPUT_SIZE.max(early.len())];
        buf[..early.len()].copy_from_slice(&early);
        InputBuffer {
            end: early.len(),
            buf,
            start: 0,
            large_reads: false,
        }
    }

    fn pending(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Makes room for at least `want` more bytes after the pending ones.
    fn make_room(&mut self, want: usize) {
        if self.buf.len() - self.end >= want {
            return;
        }
        self.buf.copy_within(self.start..self.end, 0);
        self.end -= self.start;
        self.start = 0;
        if self.buf.len() - self.end < want {
            self.buf.resize(self.end + want, 0);
        }
    }

    /// Reads once from the socket; returns the byte count (0 at end of stream).
    async fn fill(&mut self, reader: &mut Reader, counters: &Counters) -> std::io::Result<usize> {
        self.make_room(4096);
        let room = if self.large_reads {
            (self.buf.len() - self.end).min(SMALL_FILL)
        } else {
            self.buf.len() - self.end
        };
        let n = reader.read(&mut self.buf[self.end..self.end + room]).await?;
        self.end += n;
        counters.bytes_received.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

struct ReplyReader {
    reader: Reader,
    decoder: ReplyDecoder<InFlight>,
    register: mpsc::UnboundedReceiver<Registration>,
    input: InputBuffer,
    counters: Arc<Counters>,
    lifeline: Arc<Lifeline>,
    debug: Option<DebugSwitch>,
}

impl ReplyReader {
    async fn run(mut self) {
        let lifeline = self.lifeline.clone();
        let error = tokio::select! {
            e = self.serve() => e,
            () = lifeline.wait() => lifeline.pending_error(),
        };
        self.lifeline.end(error);
        let pending = self.lifeline.pending_error();
        self.register.close();
        while let Ok((cookie, cmd, tracking, f)) = self.register.try_recv() {
            self.decoder.register_with(cookie, cmd, tracking, f);
        }
        if let Some(debug) = self.debug.as_ref().and_then(DebugSwitch::active) {
            debug.log("connection", &format!("connection ended: {}", pending.message()));
        }
        for (_, f) in self.decoder.take_all() {
            f.complete(Err(pending.clone()), Detail::None);
        }
    }

    fn take_registrations(&mut self) {
        while let Ok((cookie, cmd, tracking, f)) = self.register.try_recv() {
            self.decoder.register_with(cookie, cmd, tracking, f);
        }
    }

    /// Runs until the connection ends; returns why.
    async fn serve(&mut self) -> Error {
        loop {
            self.take_registrations();
            let decoded = match self.decoder.decode(self.input.pending()) {
                Ok(d) => d,
                Err(Fatal { error, command }) => {
                    if let Some(debug) = self.debug.as_ref().and_then(DebugSwitch::active) {
                        debug.log("reply", &format!("protocol violation: {}", error.message()));
                    }
                    // The handle is dead before anyone hears of the failure: a rejection
                    // handler that looks at the state must see `dead`.
                    self.lifeline.end(error.clone());
                    if let Some((_, f)) = command {
                        f.complete(Err(error.clone()), Detail::None);
                    }
                    return error;
                }
            };
            match decoded {
                Decoded {
                    consumed: 0,
                    event: None,
                } => match self.input.fill(&mut self.reader, &self.counters).await {
                    Ok(0) => return self.end_of_stream(),
                    Ok(_) => {}
                    Err(e) => return io_error("reading from the server", e),
                },
                Decoded { consumed, event } => {
                    self.input.consume(consumed);
                    if let Some(event) = event {
                        if let Err(e) = self.event(event).await {
                            return e;
                        }
                    }
                }
            }
        }
    }

    fn end_of_stream(&self) -> Error {
        end_of_stream_error(self.lifeline.is_disconnecting())
    }

    async fn event(&mut self, event: Event<InFlight>) -> Result<()> {
        // Every event is one reply or reply chunk.
        self.counters.chunks_received.fetch_add(1, Ordering::Relaxed);
        match event {
            Event::Done {
                cookie,
                user,
                result,
                detail,
            } => {
                if let Some(debug) = self.debug.as_ref().and_then(DebugSwitch::active) {
                    debug.log("reply", &describe_outcome(cookie, &result));
                }
                user.complete(result, detail);
            }
            Event::ReadHole { cookie, buf_offset, len } => self.zero_hole(cookie, buf_offset, len),
            Event::ReadData { cookie, buf_offset, len } => {
                self.input.large_reads = len >= DIRECT_READ_MIN;
                self.read_payload(cookie, buf_offset, len).await?;
                self.decoder.payload_done();
            }
        }
        Ok(())
    }

    /// Zeroes `len` bytes of command `cookie`'s destination at `buf_offset` (a hole in the
    /// reply), unless the command was cancelled.
    fn zero_hole(&mut self, cookie: u64, buf_offset: usize, len: usize) {
        let f = self.decoder.user_mut(cookie).expect("decoder names a command in flight");
        if let Some((ptr, dest_len)) = f.payload.dest() {
            let _guard = f.cancel.as_ref().map(CancelToken::lock);
            if !_guard.as_ref().is_some_and(|cancelled| **cancelled) {
                assert!(buf_offset + len <= dest_len);
                // SAFETY: in range (checked by the decoder against the command's length,
                // which is the destination's length), and the destination is live and ours
                // while the command is in flight.
                unsafe { std::ptr::write_bytes(ptr.add(buf_offset), 0, len) };
            }
        }
    }

    /// Moves the next `len` bytes of the stream into command `cookie`'s destination at
    /// `buf_offset`: first what is already buffered, then straight from the socket. Once the
    /// command is cancelled, the rest is read and dropped.
    async fn read_payload(&mut self, cookie: u64, buf_offset: usize, len: usize) -> Result<()> {
        let f = self.decoder.user_mut(cookie).expect("decoder names a command in flight");
        let (ptr, dest_len) = f.payload.dest().expect("reads have a destination");
        assert!(buf_offset + len <= dest_len);
        // SAFETY (for every use of `dest`): in range, as asserted; the destination belongs to
        // the InFlight entry, which stays in the decoder's table until this payload is
        // consumed; writes happen only under the cancel lock, after checking the command was
        // not cancelled.
        let dest = Destination {
            at: ptr as usize + buf_offset,
            cancel: f.cancel.clone(),
        };
        let mut done = 0;
        while done < len {
            let buffered = self.input.pending().len().min(len - done);
            if buffered > 0 {
                dest.copy_in(done, &self.input.pending()[..buffered]);
                self.input.consume(buffered);
                done += buffered;
                continue;
            }
            let left = len - done;
            if left < DIRECT_READ_MIN && !(self.input.large_reads && left >= SMALL_FILL) {
                self.fill_input().await?;
                continue;
            }
            match self.read_direct(&dest, done, left).await? {
                Some(n) => done += n,
                None => {
                    // Cancelled: the rest goes through the input buffer and is dropped.
                    self.skip_payload(len - done).await?;
                    done = len;
                }
            }
        }
        Ok(())
    }

    /// Reads once into the input buffer; end of stream is an error.
    async fn fill_input(&mut self) -> Result<()> {
        match self.input.fill(&mut self.reader, &self.counters).await {
            Ok(0) => Err(self.end_of_stream()),
            Ok(_) => Ok(()),
            Err(e) => Err(io_error("reading from the server", e)),
        }
    }

    /// Reads once from the socket straight into `dest` at `done`, at most `left` bytes, under
    /// the cancel lock so that a cancellation is never overtaken. `None` when the command was
    /// cancelled (nothing is read).
    async fn read_direct(&mut self, dest: &Destination, done: usize, left: usize) -> Result<Option<usize>> {
        let reader = &mut self.reader;
        let n = poll_fn(|cx| {
            let guard = dest.cancel.as_ref().map(CancelToken::lock);
            if guard.as_ref().is_some_and(|cancelled| **cancelled) {
                return Poll::Ready(Ok(None));
            }
            // SAFETY: see `read_payload`.
            let slice = unsafe { std::slice::from_raw_parts_mut((dest.at as *mut u8).add(done), left) };
            let mut rb = ReadBuf::new(slice);
            match Pin::new(&mut *reader).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => Poll::Ready(Ok(Some(rb.filled().len()))),
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                Poll::Pending => Poll::Pending,
            }
        })
        .await
        .map_err(|e| io_error("reading from the server", e))?;
        match n {
            Some(0) => Err(self.end_of_stream()),
            Some(n) => {
                self.counters.bytes_received.fetch_add(n as u64, Ordering::Relaxed);
                Ok(Some(n))
            }
            None => Ok(None),
        }
    }

    /// Reads and drops the next `len` bytes of payload.
    async fn skip_payload(&mut self, mut len: usize) -> Result<()> {
        while len > 0 {
            let buffered = self.input.pending().len().min(len);
            if buffered == 0 {
                self.fill_input().await?;
                continue;
            }
            self.input.consume(buffered);
            len -= buffered;
        }
        Ok(())
    }
}

/// Where a read's payload goes: the address of its first byte in the destination, and the
/// command's cancel token (written only while it is not cancelled, under its lock).
struct Destination {
    at: usize,
    cancel: Option<CancelToken>,
}

impl Destination {
    /// Copies `data` to `offset` bytes past the start, unless the command was cancelled.
    fn copy_in(&self, offset: usize, data: &[u8]) {
        let guard = self.cancel.as_ref().map(CancelToken::lock);
        if !guard.as_ref().is_some_and(|cancelled| **cancelled) {
            // SAFETY: see `read_payload`.
            unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), (self.at as *mut u8).add(offset), data.len()) };
        }
    }
}
