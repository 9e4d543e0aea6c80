//! The handle: configuration, state, connecting, commands, ending.

use std::os::fd::{OwnedFd, RawFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, watch};

use nbd_proto::consts::MAX_STRING;
use nbd_proto::handshake::{Handshake, Negotiated};
use nbd_proto::state::{self, Call, State};
use nbd_proto::transmission::{Command, CommandKind, Session};
use nbd_proto::{Errno, Error, Result};

use crate::buffer::{DestBuf, SourceBuf};
use crate::cancel::CancelToken;
use crate::config::Config;
use crate::driver::{
    Callback, CallbackReply, CommandRequest, Driver, InFlightGuard, Lifeline, Payload, Request,
    Shared,
};
use crate::transport::{self, io_error, Reader, Writer};

/// A command for [`Handle::submit`].
pub enum Op {
    /// Read `count` bytes into a new buffer.
    Read { count: u64, offset: u64, flags: u32 },
    /// Read into the caller's buffer (all of it).
    ReadInto { dest: Box<dyn DestBuf>, offset: u64, flags: u32 },
    /// Write the caller's buffer.
    Write { src: Box<dyn SourceBuf>, offset: u64, flags: u32 },
    /// Flush, trim, cache or zero.
    Other { kind: CommandKind, count: u64, offset: u64, flags: u32 },
}

/// Byte and chunk counters of a connection (libnbd's `nbd_stats_*`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub bytes_sent: u64,
    pub chunks_sent: u64,
    pub bytes_received: u64,
    pub chunks_received: u64,
}

/// An NBD client handle. Clones share one connection.
#[derive(Clone)]
pub struct Handle {
    inner: Arc<Inner>,
}

struct Inner {
    config: Mutex<Config>,
    strict: AtomicU32,
    phase: Mutex<Phase>,
    shared: Arc<Shared>,
    /// Set when the application closes the handle; a connect in progress gives up.
    closing: watch::Sender<bool>,
}

/// Where the handle is in its life. Each variant holding a socket keeps it open until
/// the handle is closed or dropped.
enum Phase {
    Created,
    Connecting,
    Connected {
        socket: OwnedFd,
        driver: Driver,
        shutting_down: bool,
    },
    /// The connect failed; the socket (if one was adopted) stays open until close.
    Failed {
        // Never read: held so the fd stays open until the handle is closed.
        #[allow(dead_code)]
        socket: Option<OwnedFd>,
    },
    /// Closed by the application: as good as freed.
    Closed,
}

impl Default for Handle {
    fn default() -> Self {
        Handle::new(Config::default())
    }
}

impl std::fmt::Debug for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handle")
            .field("name", &self.config().handle_name)
            .field("state", &self.state())
            .finish()
    }
}

impl Handle {
    /// A newly created handle (`nbd_create`).
    pub fn new(config: Config) -> Handle {
        Handle {
            inner: Arc::new(Inner {
                strict: AtomicU32::new(config.strict),
                config: Mutex::new(config),
                phase: Mutex::new(Phase::Created),
                shared: Arc::new(Shared::default()),
                closing: watch::channel(false).0,
            }),
        }
    }

    fn phase(&self) -> MutexGuard<'_, Phase> {
        self.inner.phase.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A copy of the current settings.
    pub fn config(&self) -> Config {
        self.inner.config.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Changes settings that shape the connection: only on a newly created handle.
    pub fn configure(&self, change: impl FnOnce(&mut Config)) -> Result<()> {
        state::check(Call::Configure, self.state())?;
        self.update_config(change);
        Ok(())
    }

    fn update_config(&self, change: impl FnOnce(&mut Config)) {
        let mut config = self.inner.config.lock().unwrap_or_else(|p| p.into_inner());
        change(&mut config);
        self.inner.strict.store(config.strict, Ordering::Relaxed);
    }

    /// `nbd_set_export_name`: before connecting (or while negotiating).
    pub fn set_export_name(&self, name: &str) -> Result<()> {
        state::check(Call::SetExportName, self.state())?;
        check_string("export name", name)?;
        self.update_config(|c| c.export_name = name.to_string());
        Ok(())
    }

    /// `nbd_set_strict_mode`: allowed in any state.
    pub fn set_strict_mode(&self, flags: u32) -> Result<()> {
        if flags & !nbd_proto::consts::STRICT_MASK != 0 {
            return Err(Error::usage(
                Errno::EINVAL,
                format!("strict mode flags {flags:#x} include unknown bits"),
            ));
        }
        self.update_config(|c| c.strict = flags);
        Ok(())
    }

    /// `nbd_set_pread_initialize`: allowed in any state.
    pub fn set_pread_initialize(&self, on: bool) {
        self.update_config(|c| c.pread_initialize = on);
    }

    /// `nbd_set_handle_name`: allowed in any state.
    pub fn set_handle_name(&self, name: &str) {
        self.update_config(|c| c.handle_name = name.to_string());
    }

    /// The handle's state.
    pub fn state(&self) -> State {
        match &*self.phase() {
            Phase::Created => State::Created,
            Phase::Connecting => State::Connecting,
            Phase::Connected {
                driver,
                shutting_down,
                ..
            } => match driver.lifeline.ended() {
                Some(end) if end.requested || *shutting_down => State::Closed,
                Some(_) => State::Dead,
                None if self.in_flight() > 0 => State::Processing,
                None => State::Ready,
            },
            Phase::Failed { .. } => State::Dead,
            Phase::Closed => State::Closed,
        }
    }

    /// Commands submitted and not yet finished (queued or on the wire).
    pub fn in_flight(&self) -> usize {
        self.inner.shared.in_flight.load(Ordering::Relaxed)
    }

    /// Byte and chunk counters, handshake included.
    pub fn stats(&self) -> Stats {
        let s = &self.inner.shared;
        Stats {
            bytes_sent: s.bytes_sent.load(Ordering::Relaxed),
            chunks_sent: s.chunks_sent.load(Ordering::Relaxed),
            bytes_received: s.bytes_received.load(Ordering::Relaxed),
            chunks_received: s.chunks_received.load(Ordering::Relaxed),
        }
    }

    /// What the handshake settled; an error before the server has told.
    pub fn negotiated(&self) -> Result<Negotiated> {
        let state = self.state();
        state::check(Call::Info, state)?;
        let session = match &*self.phase() {
            Phase::Connected { driver, .. } => Some(driver.session.clone()),
            _ => None,
        };
        session.map(|s| s.negotiated.clone()).ok_or_else(|| {
            Error::usage(
                Errno::EINVAL,
                format!(
                    "invalid state: {}: the server never sent the export's details",
                    state.name()
                ),
            )
        })
    }

    // ---- connecting ----

    /// `nbd_connect_socket`: talks NBD over `fd`, an open connected stream socket.
    ///
    /// On a handle that is not newly created, or an fd that is not a connected stream
    /// socket, the call fails and the caller still owns `fd`. Once those checks pass the
    /// handle owns `fd`, whatever happens next, and closes it when closed or dropped.
    pub async fn connect_socket(&self, fd: RawFd) -> Result<()> {
        self.begin_connect(|| transport::check_connected_stream(fd).map(|_| ()))?;
        // SAFETY: checked open above; from here on the caller has handed it over.
        let socket = unsafe { transport::adopt(fd) };
        self.finish_connect(async move { Ok(socket) }).await
    }

    /// `nbd_connect_unix`.
    pub async fn connect_unix(&self, path: &str) -> Result<()> {
        self.begin_connect(|| Ok(()))?;
        let path = path.to_string();
        self.finish_connect(async move { transport::connect_unix(&path).await })
            .await
    }

    /// `nbd_connect_tcp`: `port` is a number or the service name `nbd`.
    pub async fn connect_tcp(&self, host: &str, port: &str) -> Result<()> {
        self.begin_connect(|| Ok(()))?;
        let (host, port) = (host.to_string(), port.to_string());
        self.finish_connect(async move { transport::connect_tcp(&host, &port).await })
            .await
    }

    /// Moves a newly created handle to `Connecting` if `precheck` passes.
    fn begin_connect(&self, precheck: impl FnOnce() -> Result<()>) -> Result<()> {
        let mut phase = self.phase();
        match *phase {
            Phase::Created => {}
            _ => {
                drop(phase);
                return state::check(Call::Connect, self.state());
            }
        }
        precheck()?;
        *phase = Phase::Connecting;
        Ok(())
    }

    async fn finish_connect(
        &self,
        open: impl std::future::Future<Output = Result<OwnedFd>>,
    ) -> Result<()> {
        let config = self.config();
        let mut closing = self.inner.closing.subscribe();
        let shared = self.inner.shared.clone();
        let adopted: Arc<Mutex<Option<OwnedFd>>> = Arc::default();
        let attempt = {
            let adopted = adopted.clone();
            let hs_config = config.handshake();
            async move {
                let socket = open.await?;
                let (mut reader, mut writer) = transport::split(&socket)?;
                *adopted.lock().unwrap() = Some(socket);
                let (negotiated, early) =
                    handshake(&mut reader, &mut writer, Handshake::new(hs_config), &shared).await?;
                Ok::<_, Error>((negotiated, early, reader, writer))
            }
        };
        let timed = async {
            match config.connect_timeout {
                Some(limit) => tokio::time::timeout(limit, attempt).await.unwrap_or_else(|_| {
                    Err(Error::io(
                        Errno::ETIMEDOUT,
                        format!(
                            "connect and handshake did not finish within {} ms",
                            limit.as_millis()
                        ),
                    ))
                }),
                None => attempt.await,
            }
        };
        let outcome = tokio::select! {
            r = timed => r,
            _ = closing.wait_for(|closed| *closed) => Err(Error::new(
                nbd_proto::Fault::Cancelled,
                Errno::ECANCELED,
                "the handle was closed while connecting",
            )),
        };
        let socket = adopted.lock().unwrap().take();
        let mut phase = self.phase();
        if !matches!(*phase, Phase::Connecting) {
            // Closed meanwhile: the socket goes with this scope.
            return Err(Error::new(
                nbd_proto::Fault::Cancelled,
                Errno::ECANCELED,
                "the handle was closed while connecting",
            ));
        }
        match outcome {
            Ok((negotiated, early, reader, writer)) => {
                let driver = Driver::start(
                    Session::new(negotiated),
                    reader,
                    writer,
                    early,
                    config.max_in_flight,
                    self.inner.shared.clone(),
                );
                *phase = Phase::Connected {
                    socket: socket.expect("a negotiated connection has a socket"),
                    driver,
                    shutting_down: false,
                };
                Ok(())
            }
            Err(e) => {
                *phase = Phase::Failed { socket };
                Err(e)
            }
        }
    }

    // ---- commands ----
    //
    // Every command goes through `submit`, which checks and queues it at once on the calling
    // thread; the async forms wait for its callback.

    /// `nbd_pread` into a new buffer of `count` bytes.
    pub async fn pread(&self, count: u64, offset: u64, flags: u32, cancel: Option<CancelToken>) -> Result<Vec<u8>> {
        let data = self.run(Op::Read { count, offset, flags }, cancel).await?;
        Ok(data.expect("a read completes with its buffer"))
    }

    /// `nbd_pread` into the caller's buffer (all of it, starting at `offset`).
    pub async fn pread_into(&self, dest: Box<dyn DestBuf>, offset: u64, flags: u32, cancel: Option<CancelToken>) -> Result<()> {
        self.run(Op::ReadInto { dest, offset, flags }, cancel).await.map(drop)
    }

    /// `nbd_pwrite` of the caller's buffer at `offset`.
    pub async fn pwrite(&self, src: Box<dyn SourceBuf>, offset: u64, flags: u32, cancel: Option<CancelToken>) -> Result<()> {
        self.run(Op::Write { src, offset, flags }, cancel).await.map(drop)
    }

    /// `nbd_flush`.
    pub async fn flush(&self, flags: u32, cancel: Option<CancelToken>) -> Result<()> {
        self.other(CommandKind::Flush, 0, 0, flags, cancel).await
    }

    /// `nbd_trim`.
    pub async fn trim(&self, count: u64, offset: u64, flags: u32, cancel: Option<CancelToken>) -> Result<()> {
        self.other(CommandKind::Trim, count, offset, flags, cancel).await
    }

    /// `nbd_cache`.
    pub async fn cache(&self, count: u64, offset: u64, flags: u32, cancel: Option<CancelToken>) -> Result<()> {
        self.other(CommandKind::Cache, count, offset, flags, cancel).await
    }

    /// `nbd_zero`.
    pub async fn zero(&self, count: u64, offset: u64, flags: u32, cancel: Option<CancelToken>) -> Result<()> {
        self.other(CommandKind::WriteZeroes, count, offset, flags, cancel).await
    }

    async fn other(&self, kind: CommandKind, count: u64, offset: u64, flags: u32, cancel: Option<CancelToken>) -> Result<()> {
        let op = Op::Other { kind, count, offset, flags };
        self.run(op, cancel).await.map(drop)
    }

    /// Submits `op` and waits for its outcome, or for `cancel`.
    async fn run(&self, op: Op, cancel: Option<CancelToken>) -> Result<Option<Vec<u8>>> {
        let (reply, answer) = oneshot::channel();
        self.submit(op, cancel.clone(), move |outcome| {
            let _ = reply.send(outcome);
        })?;
        let outcome = match cancel {
            None => answer.await,
            Some(token) => tokio::select! {
                r = answer => r,
                () = token.cancelled() => return Err(cancelled_error()),
            },
        };
        // The callback is always called (CallbackReply guarantees it), so this never waits
        // on a dropped sender; map it anyway rather than panic.
        outcome.unwrap_or_else(|_| Err(closed_error()))
    }

    /// Queues a command whose outcome goes to `done`, called exactly once on some thread
    /// of the driver (or not at all when this returns an error). For bindings that settle
    /// many commands through one notification channel; `Some(bytes)` for `Op::Read`.
    pub fn submit(
        &self,
        op: Op,
        cancel: Option<CancelToken>,
        done: impl FnOnce(Result<Option<Vec<u8>>>) + Send + 'static,
    ) -> Result<()> {
        let (cmd, mut payload) = match op {
            Op::Read { count, offset, flags } => (
                command(CommandKind::Read, offset, count, flags),
                Payload::None,
            ),
            Op::ReadInto { dest, offset, flags } => (
                command(CommandKind::Read, offset, dest.len() as u64, flags),
                Payload::ReadInto(dest),
            ),
            Op::Write { src, offset, flags } => (
                command(CommandKind::Write, offset, src.len() as u64, flags),
                Payload::Write(src),
            ),
            Op::Other { kind, count, offset, flags } => {
                if matches!(kind, CommandKind::Read | CommandKind::Write | CommandKind::Disconnect) {
                    return Err(Error::usage(Errno::EINVAL, "Op::Other takes flush, trim, cache or zero"));
                }
                (command(kind, offset, count, flags), Payload::None)
            }
        };
        let (requests, lifeline, flags) = self.checked(&cmd)?;
        // A cancelled command must not touch its buffer, not even to zero it.
        if cancel.as_ref().is_some_and(CancelToken::is_cancelled) {
            return Err(cancelled_error());
        }
        match &mut payload {
            // Zeroed memory from the allocator costs nothing extra; it also makes bytes a
            // server fails to send read as zero, as libnbd's pread_initialize does.
            Payload::None if cmd.kind == CommandKind::Read => {
                payload = Payload::ReadOwned(vec![0u8; cmd.length as usize]);
            }
            Payload::ReadInto(dest) if self.config().pread_initialize && !dest.is_empty() => {
                // SAFETY: DestBuf promises len writable bytes.
                unsafe { std::ptr::write_bytes(dest.as_mut_ptr(), 0, dest.len()) };
            }
            _ => {}
        }
        let callback: Callback = Box::new(move |r: Result<Payload>| {
            done(r.map(|p| match p {
                Payload::ReadOwned(v) => Some(v),
                _ => None,
            }))
        });
        let request = Request::Command(CommandRequest {
            guard: InFlightGuard::new(&self.inner.shared),
            cmd,
            flags,
            payload,
            cancel,
            reply: CallbackReply::new(callback),
        });
        if let Err(unsent) = requests.send(request) {
            // Never queued: the callback is not called (the error is returned instead).
            if let Request::Command(c) = unsent.0 {
                drop(c.reply.disarm());
            }
            return Err(lifeline.pending_error());
        }
        Ok(())
    }

    /// The state check and libnbd's client-side checks; the way to the driver and the
    /// wire flags.
    fn checked(&self, cmd: &Command) -> Result<(mpsc::UnboundedSender<Request>, Arc<Lifeline>, u16)> {
        let state = self.state();
        state::check(Call::Command, state)?;
        let (session, requests, lifeline) = match &*self.phase() {
            Phase::Connected {
                driver,
                shutting_down: false,
                ..
            } => (driver.session.clone(), driver.requests.clone(), driver.lifeline.clone()),
            _ => {
                return Err(Error::usage(
                    Errno::EINVAL,
                    "invalid state: the handle is shutting down",
                ))
            }
        };
        let flags = session.check(cmd, self.inner.strict.load(Ordering::Relaxed))?;
        Ok((requests, lifeline, flags))
    }

    // ---- ending ----

    /// `nbd_shutdown`: sends NBD_CMD_DISC once the commands in flight have finished (at
    /// once with `abandon_pending`), then waits briefly for the server to hang up.
    pub async fn shutdown(&self, abandon_pending: bool) -> Result<()> {
        let state = self.state();
        state::check(Call::Shutdown, state)?;
        let (requests, lifeline) = {
            let mut phase = self.phase();
            match &mut *phase {
                Phase::Connected {
                    driver,
                    shutting_down,
                    ..
                } => {
                    if *shutting_down {
                        return Ok(());
                    }
                    *shutting_down = true;
                    (driver.requests.clone(), driver.lifeline.clone())
                }
                _ => return state::check(Call::Shutdown, State::Closed),
            }
        };
        let (done, sent) = oneshot::channel();
        if requests
            .send(Request::Disconnect {
                abandon: abandon_pending,
                done,
            })
            .is_err()
        {
            return Ok(());
        }
        match sent.await {
            Ok(Ok(())) => {}
            // The connection was already gone: there is nothing left to shut down.
            Ok(Err(_)) | Err(_) => return Ok(()),
        }
        // Give the server a moment to close its end, as libnbd does; a server that keeps
        // the connection open does not hold the caller up for long.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), lifeline.wait()).await;
        Ok(())
    }

    /// Closes the handle without waiting: as [`Handle::close`] (a connect in progress gives
    /// up, pending commands fail, the socket is closed), but the driver's tasks are only told
    /// to stop. For owners that cannot wait, such as a binding's finalizer.
    pub fn close_in_background(&self) {
        self.inner.closing.send_replace(true);
        let old = std::mem::replace(&mut *self.phase(), Phase::Closed);
        // Dropping the driver aborts its tasks; the socket closes with `old`.
        drop(old);
    }

    /// Closes the handle: fails every pending command, stops the driver and closes the
    /// socket. Idempotent.
    pub async fn close(&self) {
        self.inner.closing.send_replace(true);
        // A closed handle is as good as freed (nbd_close): its details go too, and every
        // call but close fails with EINVAL.
        let old = std::mem::replace(&mut *self.phase(), Phase::Closed);
        if let Phase::Connected {
            socket, mut driver, ..
        } = old
        {
            driver.stop().await;
            drop(socket);
        }
    }
}

fn command(kind: CommandKind, offset: u64, length: u64, flags: u32) -> Command {
    Command {
        kind,
        offset,
        length,
        flags,
    }
}

fn cancelled_error() -> Error {
    Error::new(
        nbd_proto::Fault::Cancelled,
        Errno::ECANCELED,
        "the command was cancelled",
    )
}

fn closed_error() -> Error {
    Error::io(
        Errno::ENOTCONN,
        "the handle was closed before the command finished",
    )
}

fn check_string(what: &str, s: &str) -> Result<()> {
    if s.len() > MAX_STRING {
        return Err(Error::usage(
            Errno::ENAMETOOLONG,
            format!("{what} is {} bytes, longer than {MAX_STRING}", s.len()),
        ));
    }
    Ok(())
}

/// Runs the handshake machine over the socket.
async fn handshake(
    reader: &mut Reader,
    writer: &mut Writer,
    mut hs: Handshake,
    shared: &Shared,
) -> Result<(Negotiated, Vec<u8>)> {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let out = hs.poll_transmit();
        if !out.is_empty() {
            writer
                .write_all(&out)
                .await
                .map_err(|e| io_error("sending the handshake", e))?;
            shared.bytes_sent.fetch_add(out.len() as u64, Ordering::Relaxed);
            shared.chunks_sent.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(outcome) = hs.poll_outcome() {
            return outcome.map(|n| (n, hs.take_leftover()));
        }
        let n = reader
            .read(&mut buf)
            .await
            .map_err(|e| io_error("reading the handshake", e))?;
        shared.bytes_received.fetch_add(n as u64, Ordering::Relaxed);
        if n == 0 {
            hs.handle_eof();
        } else {
            shared.chunks_received.fetch_add(1, Ordering::Relaxed);
            hs.handle_input(&buf[..n]);
        }
    }
}

