//! The transmission phase: what both drivers share (the counters, the connection's end, the
//! debug switch, the buffer sizes), and the drivers themselves.
//!
//! - [`tokio_driver`]: the tokio driver, a writer task and a reader task per connection, for Rust
//!   programs and for TLS connections;
//! - [`event_loop`]: the event-loop driver, a non-blocking connection its owner polls (the
//!   Node binding polls it with libuv on the JavaScript thread).
//!
//! Both follow the driving rules of `nbd-proto`'s transmission module and report the same
//! errors for the same events.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use nbd_proto::consts::command_name;
use nbd_proto::transmission::{Command, CommandKind, Tracking};
use nbd_proto::{Errno, Error, Result};

pub mod event_loop;
pub(crate) mod tokio_driver;

/// Replies are read in batches up to this size.
pub(crate) const INPUT_SIZE: usize = 256 * 1024;
/// Read data still to come beyond this goes straight from the socket into its destination.
pub(crate) const DIRECT_READ_MIN: usize = 32 * 1024;
/// What one read asks for while large reads are coming: room for a few reply headers, so
/// that the next large payload goes straight to its destination (copied once, not twice).
pub(crate) const SMALL_FILL: usize = 4096;
/// Write payloads up to this size are copied next to their header (many small writes share
/// one system call); larger ones are sent from the caller's buffer.
pub const COPY_PAYLOAD_MAX: usize = 16 * 1024;

/// NBD_CMD_DISC: the last request of a connection.
pub(crate) const DISCONNECT: Command = Command {
    kind: CommandKind::Disconnect,
    offset: 0,
    length: 0,
    flags: 0,
};

/// The debug message for a request on its way out.
pub(crate) fn describe_request(cookie: u64, cmd: &Command, flags: u16, tracking: &Tracking) -> String {
    let contexts = match &tracking.filter {
        Some(ids) => format!(" contexts {ids:?}"),
        None => String::new(),
    };
    format!(
        "sending {} cookie {cookie} offset {} count {} flags {flags:#x}{contexts}",
        command_name(cmd.kind.code()),
        cmd.offset,
        cmd.length,
    )
}

/// The debug message for a command's outcome.
pub(crate) fn describe_outcome(cookie: u64, result: &Result<()>) -> String {
    match result {
        Ok(()) => format!("cookie {cookie} done: success"),
        Err(e) => format!("cookie {cookie} done: {}: {}", e.errno(), e.message()),
    }
}

/// The error of a command the application cancelled.
pub(crate) fn cancelled_error() -> Error {
    Error::new(nbd_proto::Fault::Cancelled, Errno::ECANCELED, "the command was cancelled")
}

/// The error of a command still pending when the handle was closed.
pub(crate) fn closed_error() -> Error {
    Error::io(Errno::ENOTCONN, "the handle was closed before the command finished")
}

/// The error of a connection that ended at end of stream: after NBD_CMD_DISC (`after_disc`)
/// or not.
pub(crate) fn end_of_stream_error(after_disc: bool) -> Error {
    if after_disc {
        Error::io(Errno::ESHUTDOWN, "the server closed the connection after NBD_CMD_DISC")
    } else {
        Error::io(Errno::ECONNRESET, "the server closed the connection")
    }
}

/// The connection's counters, kept by its driver and read by the handle: commands in
/// flight, and bytes and chunks each way (libnbd's `nbd_stats_*`, handshake included).
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub in_flight: AtomicUsize,
    pub bytes_sent: AtomicU64,
    pub chunks_sent: AtomicU64,
    pub bytes_received: AtomicU64,
    pub chunks_received: AtomicU64,
}

impl Counters {
    /// Counts one request or message of `bytes` bytes sent.
    pub(crate) fn sent(&self, bytes: u64) {
        self.bytes_sent.fetch_add(bytes, Ordering::Relaxed);
        self.chunks_sent.fetch_add(1, Ordering::Relaxed);
    }
}

/// Counts a command as in flight for as long as it lives.
pub(crate) struct InFlightGuard(Arc<Counters>);

impl InFlightGuard {
    pub(crate) fn new(counters: &Arc<Counters>) -> InFlightGuard {
        counters.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlightGuard(counters.clone())
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Where debug messages go: (context, message).
pub type DebugSink = Arc<dyn Fn(&str, &str) + Send + Sync>;

/// The driver's view of debugging: a switch the handle can flip at any time, and the sink.
/// Messages are only formatted while the switch is on.
#[derive(Clone)]
pub(crate) struct DebugSwitch {
    pub on: Arc<AtomicBool>,
    pub sink: DebugSink,
}

impl DebugSwitch {
    /// The switch, when it is on.
    pub(crate) fn active(&self) -> Option<&DebugSwitch> {
        self.on.load(Ordering::Relaxed).then_some(self)
    }

    pub(crate) fn log(&self, context: &str, message: &str) {
        (self.sink)(context, message)
    }
}

/// Why a connection ended.
#[derive(Debug, Clone)]
pub(crate) struct Ended {
    pub error: Error,
    /// True when the application asked for the disconnect.
    pub requested: bool,
}

/// The end of a connection, observed by the handle and both tasks.
#[derive(Debug)]
pub(crate) struct Lifeline {
    ended: Mutex<Option<Ended>>,
    signal: watch::Sender<bool>,
    disconnecting: AtomicBool,
    /// Set by `shutdown` with `abandon_pending`: commands not yet written are never sent.
    abandoning: watch::Sender<bool>,
}

impl Lifeline {
    pub(crate) fn new() -> Arc<Lifeline> {
        Arc::new(Lifeline {
            ended: Mutex::new(None),
            signal: watch::channel(false).0,
            disconnecting: AtomicBool::new(false),
            abandoning: watch::channel(false).0,
        })
    }

    /// The state of a handle whose transmission this lifeline follows, with `in_flight`
    /// commands pending: closed once a disconnect was asked for, dead after any other end.
    pub(crate) fn state(&self, in_flight: usize) -> nbd_proto::state::State {
        use nbd_proto::state::State;
        match self.ended() {
            Some(end) if end.requested || self.is_disconnecting() => State::Closed,
            Some(_) => State::Dead,
            None if self.is_disconnecting() => State::Closed,
            None if in_flight > 0 => State::Processing,
            None => State::Ready,
        }
    }

    /// True once the application asked for a disconnect.
    pub(crate) fn is_disconnecting(&self) -> bool {
        self.disconnecting.load(Ordering::SeqCst)
    }

    /// Marks the end that follows as asked for by the application (NBD_CMD_DISC).
    pub(crate) fn begin_disconnect(&self) {
        self.disconnecting.store(true, Ordering::SeqCst);
    }

    /// From now on commands not yet written fail with `ENOTCONN` instead of being sent
    /// (`shutdown` with `abandon_pending`, before it queues the disconnect).
    pub(crate) fn abandon_unsent(&self) {
        self.abandoning.send_replace(true);
    }

    /// Resolves once [`Lifeline::abandon_unsent`] was called.
    pub(crate) async fn until_abandoned(&self) {
        let mut abandoning = self.abandoning.subscribe();
        let _ = abandoning.wait_for(|abandon| *abandon).await;
    }

    pub(crate) fn abandoned(&self) -> bool {
        *self.abandoning.borrow()
    }

    pub(crate) fn abandoned_error() -> Error {
        Error::io(
            Errno::ENOTCONN,
            "the command was abandoned by shutdown({ abandonPending: true }) before it was sent",
        )
    }

    /// Records the end (the first reason wins).
    pub(crate) fn end(&self, error: Error) {
        let requested = self.disconnecting.load(Ordering::SeqCst);
        let mut ended = self.ended.lock().unwrap_or_else(|p| p.into_inner());
        if ended.is_none() {
            *ended = Some(Ended { error, requested });
        }
        drop(ended);
        self.signal.send_replace(true);
    }

    pub(crate) fn ended(&self) -> Option<Ended> {
        self.ended.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub(crate) async fn wait(&self) {
        let mut rx = self.signal.subscribe();
        let _ = rx.wait_for(|ended| *ended).await;
    }

    /// The error for a command that cannot be answered because the connection ended.
    pub(crate) fn pending_error(&self) -> Error {
        match self.ended() {
            Some(Ended { requested: true, .. }) => Error::io(
                Errno::ESHUTDOWN,
                "the handle was shut down before the server answered",
            ),
            Some(Ended { error, .. }) => Error::io(
                Errno::ENOTCONN,
                format!("the connection is dead: {}", error.message()),
            ),
            None => Error::io(Errno::ENOTCONN, "the connection is closed"),
        }
    }
}
