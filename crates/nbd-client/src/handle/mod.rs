//! The handle: a state cell ([`Phase`]) and one method per libnbd call.
//!
//! This file holds the cell, the state, the getters, connecting (it runs the steps of
//! [`crate::connect`] and keeps what they return), option negotiation and ending; the
//! setters are in [`setters`], the data commands (which go to one of the drivers of
//! [`crate::driver`]) in [`commands`]. Each method checks its own row of the state table
//! (`nbd_proto::state`) and its own arguments, so a binding above only converts.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::future::Future;
use std::time::Duration;

use tokio::sync::{oneshot, watch};

use nbd_proto::consts::MAX_STRING;
use nbd_proto::handshake::{ExportEntry, ExportInfo, Negotiated, OptReply, OptRequest, TlsMode};
use nbd_proto::state::{self, Call, State};
use nbd_proto::transmission::Session;
use nbd_proto::{Errno, Error, Result};

mod commands;
mod setters;

pub use commands::{Op, Reply};

use crate::connect::{self, Handshaken, Link, Negotiation, Opened, OptStep, Ready, Target, TlsParams};
use crate::driver::tokio_driver::{Driver, Request};
use crate::driver::{Counters, DebugSink, DebugSwitch, Lifeline};
use crate::settings::Settings;
use crate::transport::subprocess::Child;
use crate::transport::{self, tcp, Stream};
use crate::uri::{self, NbdUri, UriTransport};

/// How long `opt_abort` waits for the server's answer before it ends the connection
/// anyway.
const OPT_ABORT_WAIT: Duration = Duration::from_secs(2);

/// Byte and chunk counters of a connection (libnbd's `nbd_stats_*`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Bytes written to the server, handshake included.
    pub bytes_sent: u64,
    /// Requests (and handshake messages) written.
    pub chunks_sent: u64,
    /// Bytes read from the server.
    pub bytes_received: u64,
    /// Replies, reply chunks and handshake messages read.
    pub chunks_received: u64,
}

/// An NBD client handle. Clones share one connection.
#[derive(Clone)]
pub struct Handle {
    inner: Arc<Inner>,
}

struct Inner {
    settings: Mutex<Settings>,
    /// `settings.strict` and `settings.debug`, for the paths that read them without the
    /// settings' lock (every command; the driver before each message). Only
    /// [`Handle::update_settings`] writes them, right after the settings.
    strict: AtomicU32,
    debug_on: Arc<AtomicBool>,
    phase: Mutex<Phase>,
    counters: Arc<Counters>,
    /// Set when the application closes the handle; a connect in progress gives up.
    closing: watch::Sender<bool>,
    /// Where debug messages go when `settings.debug` is on.
    debug_sink: Arc<Mutex<Option<DebugSink>>>,
    /// Hand plain connections to an event-loop driver ([`Handle::set_event_loop_driver`]).
    event_loop: AtomicBool,
    /// Where the handle connected, for `get_uri`.
    target: Mutex<Option<UriTransport>>,
    /// Whether the connection that entered transmission negotiated TLS: `get_uri` still
    /// says `nbds` after `close()`, when the session is gone.
    tls_negotiated: AtomicBool,
    /// The server process of `connect_command` / socket activation. Declared after
    /// `phase` so that on drop the socket closes first (a server on stdin then sees end of
    /// file and exits by itself); dropping it ends and reaps the process.
    child: Mutex<Option<Arc<Child>>>,
}

/// Where the handle is in its life. Each variant holding a socket keeps it open until
/// the handle is closed or dropped.
enum Phase {
    Created,
    Connecting,
    /// Option mode, waiting for an option request.
    Negotiating {
        socket: OwnedFd,
        negotiation: Box<Negotiation>,
    },
    /// Option mode, an option request in progress (its future holds the socket).
    OptBusy,
    Connected {
        socket: OwnedFd,
        driver: Driver,
        shutting_down: bool,
    },
    /// In transmission, run by an event-loop driver outside this crate
    /// ([`Handle::take_transmission`]); `socket` is `None` once it has been taken.
    Detached {
        socket: Option<OwnedFd>,
        session: Arc<Session>,
        early: Vec<u8>,
        lifeline: Arc<Lifeline>,
        max_in_flight: usize,
    },
    /// The connect failed; the socket (if one was adopted) stays open until close.
    Failed {
        // Never read: held so the fd stays open until the handle is closed.
        #[allow(dead_code)]
        socket: Option<OwnedFd>,
    },
    /// Negotiation ended with `NBD_OPT_ABORT`: shut down, details still readable.
    Ended {
        #[allow(dead_code)]
        socket: OwnedFd,
    },
    /// Closed by the application: as good as freed.
    Closed,
}

impl Default for Handle {
    fn default() -> Self {
        Handle::new(Settings::default())
    }
}

impl std::fmt::Debug for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handle")
            .field("name", &self.settings().handle_name)
            .field("state", &self.state())
            .finish()
    }
}

impl Handle {
    /// A newly created handle (`nbd_create`). As libnbd, a handle without a name is named
    /// `nbd1`, `nbd2`, … in order of creation, and `LIBNBD_DEBUG=1` in the environment turns
    /// debugging on.
    pub fn new(mut settings: Settings) -> Handle {
        static CREATED: AtomicU64 = AtomicU64::new(0);
        let n = CREATED.fetch_add(1, Ordering::Relaxed) + 1;
        if settings.handle_name.is_empty() {
            settings.handle_name = format!("nbd{n}");
        }
        if std::env::var_os("LIBNBD_DEBUG").is_some_and(|v| v == "1") {
            settings.debug = true;
        }
        Handle {
            inner: Arc::new(Inner {
                strict: AtomicU32::new(settings.strict),
                debug_on: Arc::new(AtomicBool::new(settings.debug)),
                settings: Mutex::new(settings),
                phase: Mutex::new(Phase::Created),
                counters: Arc::new(Counters::default()),
                closing: watch::channel(false).0,
                debug_sink: Arc::default(),
                event_loop: AtomicBool::new(false),
                tls_negotiated: AtomicBool::new(false),
                target: Mutex::new(None),
                child: Mutex::new(None),
            }),
        }
    }

    fn phase(&self) -> MutexGuard<'_, Phase> {
        lock(&self.inner.phase)
    }

    // ---- settings ----

    /// A copy of the current settings.
    pub fn settings(&self) -> Settings {
        lock(&self.inner.settings).clone()
    }

    /// The one way settings change: `change`, then the lock-free copies.
    fn update_settings(&self, change: impl FnOnce(&mut Settings)) {
        let mut settings = lock(&self.inner.settings);
        change(&mut settings);
        self.inner.strict.store(settings.strict, Ordering::Relaxed);
        self.inner.debug_on.store(settings.debug, Ordering::Relaxed);
    }

    /// Sets (or removes) where debug messages go; they flow when debugging is on.
    pub fn set_debug_sink(&self, sink: Option<DebugSink>) {
        *lock(&self.inner.debug_sink) = sink;
    }

    /// The driver's debug switch and a sink that follows later changes of it.
    fn debug_switch(&self) -> DebugSwitch {
        let sinks = self.inner.debug_sink.clone();
        let inner = Arc::downgrade(&self.inner);
        DebugSwitch {
            on: self.inner.debug_on.clone(),
            sink: Arc::new(move |context: &str, message: &str| {
                let sink = lock(&sinks).clone();
                match sink {
                    Some(sink) => sink(context, message),
                    None => {
                        let name = inner
                            .upgrade()
                            .map(|i| lock(&i.settings).handle_name.clone())
                            .unwrap_or_default();
                        to_stderr(&name, context, message);
                    }
                }
            }),
        }
    }

    /// The sink for the handshake, fixed for its length; `None` with debugging off.
    fn debug_sink(&self) -> Option<DebugSink> {
        if !self.inner.debug_on.load(Ordering::Relaxed) {
            return None;
        }
        let sink = lock(&self.inner.debug_sink).clone();
        Some(sink.unwrap_or_else(|| {
            let name = self.settings().handle_name;
            Arc::new(move |context: &str, message: &str| to_stderr(&name, context, message))
        }))
    }

    // ---- state ----

    /// The handle's state.
    pub fn state(&self) -> State {
        match &*self.phase() {
            Phase::Created => State::Created,
            Phase::Connecting | Phase::OptBusy => State::Connecting,
            Phase::Negotiating { .. } => State::Negotiating,
            Phase::Ended { .. } => State::Closed,
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
            Phase::Detached { lifeline, .. } => lifeline.state(self.in_flight()),
            Phase::Failed { .. } => State::Dead,
            Phase::Closed => State::Closed,
        }
    }

    /// Asks for plain (not TLS) connections to be handed to an event-loop driver once
    /// their handshake is done, instead of starting the tokio driver: see
    /// [`Handle::take_transmission`]. Bindings whose application runs its own event loop
    /// (Node.js) use it; Rust programs keep the tokio driver.
    pub fn set_event_loop_driver(&self, on: bool) {
        self.inner.event_loop.store(on, Ordering::Relaxed);
    }

    /// The connection, for an event-loop driver, once the handshake has handed it over
    /// (see [`Handle::set_event_loop_driver`]); `None` before that, after it was taken, and
    /// for connections the tokio driver runs (TLS). The handle keeps answering getters and
    /// `state` from what it shares with the driver.
    pub fn take_transmission(&self) -> Option<crate::event_loop::Transmission> {
        let mut phase = self.phase();
        let Phase::Detached {
            socket,
            session,
            early,
            lifeline,
            max_in_flight,
        } = &mut *phase
        else {
            return None;
        };
        let fd = socket.take()?;
        Some(crate::event_loop::Transmission {
            fd,
            session: session.clone(),
            early: std::mem::take(early),
            max_in_flight: *max_in_flight,
            counters: self.inner.counters.clone(),
            lifeline: lifeline.clone(),
            debug: self.debug_switch(),
        })
    }

    /// Commands submitted and not yet finished (queued or on the wire).
    pub fn in_flight(&self) -> usize {
        self.inner.counters.in_flight.load(Ordering::Relaxed)
    }

    /// Byte and chunk counters, handshake included.
    pub fn stats(&self) -> Stats {
        let s = &self.inner.counters;
        Stats {
            bytes_sent: s.bytes_sent.load(Ordering::Relaxed),
            chunks_sent: s.chunks_sent.load(Ordering::Relaxed),
            bytes_received: s.bytes_received.load(Ordering::Relaxed),
            chunks_received: s.chunks_received.load(Ordering::Relaxed),
        }
    }

    // ---- information ----

    /// What the handshake settled; an error before the server has told.
    pub fn negotiated(&self) -> Result<Negotiated> {
        let state = self.state();
        state::ensure_allowed(Call::Info, state)?;
        let negotiated = match &*self.phase() {
            Phase::Connected { driver, .. } => Some(driver.session.negotiated.clone()),
            Phase::Detached { session, .. } => Some(session.negotiated.clone()),
            Phase::Negotiating { negotiation, .. } => negotiation.hs.export_known(),
            _ => None,
        };
        negotiated.ok_or_else(|| {
            let why = match state {
                // (After shutdown() the details stay: that case never gets here.)
                State::Closed => "the handle was closed, and the export's details with it",
                _ => "the server never sent the export's details",
            };
            Error::usage(Errno::EINVAL, format!("invalid state: {}: {why}", state.name()))
        })
    }

    /// What has been negotiated so far, export details aside: unlike
    /// [`Handle::negotiated`] this also answers in option mode before `NBD_OPT_INFO`
    /// (protocol, structured replies, extended headers, TLS, meta contexts).
    pub fn negotiated_so_far(&self) -> Result<Negotiated> {
        if let Phase::Negotiating { negotiation, .. } = &*self.phase() {
            return Ok(negotiation
                .hs
                .export_known()
                .unwrap_or_else(|| negotiation.hs.negotiated(ExportInfo::default())));
        }
        self.negotiated()
    }

    /// `nbd_can_meta_context`: whether meta context `name` was negotiated; `EINVAL` when
    /// contexts were asked for but the server has not answered for this export.
    pub fn can_meta_context(&self, name: &str) -> Result<bool> {
        let negotiated = self.negotiated_so_far()?;
        negotiated.can_meta_context(name, &self.settings().negotiation.meta_contexts)
    }

    /// `nbd_can_df`: the server's flag, and structured replies to carry it (as libnbd).
    pub fn can_df(&self) -> Result<bool> {
        Ok(self.negotiated()?.can_df())
    }

    /// `nbd_can_block_status_payload`: filtered block status needs extended headers and the
    /// server's flag.
    pub fn can_block_status_payload(&self) -> Result<bool> {
        Ok(self.negotiated()?.can_block_status_payload())
    }

    /// `nbd_get_tls_username`: the name set, else the login name PSK would use
    /// (`$LOGNAME`, else `getlogin`); `EINVAL` when there is none.
    pub fn tls_username(&self) -> Result<String> {
        self.settings().tls.effective_username()
    }

    /// `nbd_get_tls_hostname`: the name set, else the host the handle connects to over TCP
    /// (what the server's certificate is checked against); `None` when neither exists.
    pub fn tls_hostname(&self) -> Option<String> {
        self.settings().tls.hostname.or_else(|| self.tcp_host())
    }

    /// The host of a TCP target, if the handle has one.
    fn tcp_host(&self) -> Option<String> {
        match lock(&self.inner.target).as_ref() {
            Some(UriTransport::Tcp { host, .. }) => Some(host.clone()),
            _ => None,
        }
    }

    /// `nbd_get_uri`: a URI for the current connection (host, port or socket, export,
    /// TLS, and the TLS user and files whenever they are set). `EINVAL` for connections a
    /// URI cannot describe (a socket passed in, a command's stdin/stdout), as libnbd.
    pub fn get_uri(&self) -> Result<String> {
        let state = self.state();
        if state == State::Created {
            return state::ensure_allowed(Call::Info, state).map(|()| String::new());
        }
        let Some(transport) = lock(&self.inner.target).clone() else {
            return Err(Error::usage(
                Errno::EINVAL,
                "cannot construct a URI for this connection type (a URI needs connectUri, \
                 connectTcp, connectUnix or connectVsock)",
            ));
        };
        let s = self.settings();
        let tls = match self.negotiated_so_far() {
            Ok(n) => n.tls,
            Err(_) => s.tls.mode == TlsMode::Require || self.inner.tls_negotiated.load(Ordering::Relaxed),
        };
        let u = NbdUri::describing(transport, s.negotiation.export_name, &s.tls, tls);
        Ok(uri::format(&u))
    }

    /// The server process started by `connect_command` or socket activation, if any.
    pub fn child_pid(&self) -> Option<u32> {
        lock(&self.inner.child).as_ref().map(|c| c.pid())
    }

    /// `nbd_get_subprocess_pid`: the server process's pid; `ESRCH` when there is none.
    pub fn subprocess_pid(&self) -> Result<u32> {
        self.child_pid().ok_or_else(|| {
            Error::usage(
                Errno::ESRCH,
                "the handle has no subprocess (only connectCommand and \
                 connectSystemdSocketActivation start one)",
            )
        })
    }

    // ---- connecting ----

    /// `nbd_connect_socket`: talks NBD over `fd`, an open connected stream socket.
    ///
    /// On a handle that is not newly created, or an fd that is not a connected stream
    /// socket, the call fails and the caller still owns `fd`. Once those checks pass the
    /// handle owns `fd`, whatever happens next, and closes it when closed or dropped.
    ///
    /// Like every connect and option call, the checks and the move to `Connecting` happen
    /// when it is called, not when the future is first polled: of two calls made one after
    /// the other, the first wins. The future should then be awaited (or spawned): dropped
    /// before it ends, it leaves the handle dead, as a failed connect does (an option request
    /// dropped before it started leaves the handle negotiating).
    pub fn connect_socket(&self, fd: RawFd) -> impl Future<Output = Result<()>> + Send + 'static {
        let begun = self.begin_connect(|| transport::check_connected_stream(fd).map(|_| ()));
        // SAFETY: checked open above; from here on the caller has handed it over.
        let socket = begun.map(|()| unsafe { transport::adopt(fd) });
        self.connecting(socket, |h, socket| async move {
            h.finish_connect(async move { Ok(Opened { socket, child: None }) }).await
        })
    }

    /// `nbd_connect_uri`: parses `uri` (libnbd's grammar), checks it against the URI
    /// policy, applies its settings (export name, TLS), then connects.
    pub fn connect_uri(&self, text: &str) -> impl Future<Output = Result<()>> + Send + 'static {
        let mut parsed: Option<NbdUri> = None;
        let begun = self.begin_connect(|| {
            let u = uri::parse(text)?;
            self.settings().uri_policy.check(&u)?;
            check_string("export name", &u.export_name)?;
            self.update_settings(|s| {
                s.negotiation.export_name = u.export_name.clone();
                u.apply_tls(&mut s.tls);
            });
            parsed = Some(u);
            Ok(())
        });
        let begun = begun.map(|()| parsed.expect("set by the precheck"));
        if let Ok(u) = &begun {
            self.set_target(u.transport.clone());
        }
        self.connecting(begun, |h, u| async move {
            let target = match &u.transport {
                UriTransport::Tcp { host, port } => Target::Tcp { host: host.clone(), port: port.to_string() },
                UriTransport::Unix { socket } => Target::Unix { path: socket.clone() },
                UriTransport::Vsock { cid, port } => Target::Vsock { cid: *cid, port: *port },
                UriTransport::Ssh { .. } => {
                    let argv = uri::ssh_argv(&u).expect("an ssh transport");
                    return h.connect_child(Target::Command { argv }).await;
                }
            };
            h.finish_connect(connect::open(target)).await
        })
    }

    fn set_target(&self, t: UriTransport) {
        *lock(&self.inner.target) = Some(t);
    }

    /// `nbd_connect_command`: starts `argv` with a socket as its stdin and stdout (e.g.
    /// `nbdkit -s memory 1G`) and talks NBD over it. The process is ended and reaped when
    /// the handle is closed or dropped; if the connect fails, the error says how the
    /// process ended and what it wrote to stderr.
    pub fn connect_command(&self, argv: Vec<String>) -> impl Future<Output = Result<()>> + Send + 'static {
        let begun = self.begin_connect(|| Ok(()));
        self.connecting(begun, |h, ()| async move { h.connect_child(Target::Command { argv }).await })
    }

    /// `nbd_connect_systemd_socket_activation`: starts `argv` with a listening socket as
    /// fd 3 (`LISTEN_FDS`, `LISTEN_PID`), as systemd would, e.g. `qemu-nbd -f qcow2 IMG`.
    pub fn connect_systemd_socket_activation(
        &self,
        argv: Vec<String>,
    ) -> impl Future<Output = Result<()>> + Send + 'static {
        let begun = self.begin_connect(|| Ok(()));
        let name = self.settings().socket_activation_name;
        self.connecting(begun, |h, ()| async move {
            h.connect_child(Target::SocketActivation { argv, name }).await
        })
    }

    /// Connects to a server it starts; a failure says how the server ended.
    async fn connect_child(&self, target: Target) -> Result<()> {
        let result = self.finish_connect(connect::open(target)).await;
        let Err(e) = result else { return Ok(()) };
        let child = lock(&self.inner.child).clone();
        // A server that failed to start is usually still exiting when the connection ends:
        // wait a moment to say how. Not after a timeout (a server that stalls is still
        // running, and the caller asked not to wait longer) or a close.
        let wait = if matches!(e.errno(), Errno::ETIMEDOUT | Errno::ECANCELED) {
            Duration::ZERO
        } else {
            Duration::from_secs(1)
        };
        match child {
            Some(child) => match child.failure_report(wait).await {
                Some(report) => Err(Error::new(e.fault(), e.errno(), format!("{}; {report}", e.message()))),
                None => Err(e),
            },
            None => Err(e),
        }
    }

    /// `nbd_connect_vsock` (Linux).
    pub fn connect_vsock(&self, cid: u32, port: u32) -> impl Future<Output = Result<()>> + Send + 'static {
        let begun = self.begin_connect(|| Ok(()));
        if begun.is_ok() {
            self.set_target(UriTransport::Vsock { cid, port });
        }
        self.connecting(begun, move |h, ()| async move {
            h.finish_connect(connect::open(Target::Vsock { cid, port })).await
        })
    }

    /// `nbd_connect_unix`.
    pub fn connect_unix(&self, path: &str) -> impl Future<Output = Result<()>> + Send + 'static {
        let begun = self.begin_connect(|| Ok(()));
        if begun.is_ok() {
            self.set_target(UriTransport::Unix { socket: path.to_string() });
        }
        let path = path.to_string();
        self.connecting(begun, |h, ()| async move { h.finish_connect(connect::open(Target::Unix { path })).await })
    }

    /// `nbd_connect_tcp`: `port` is a number or any service name getaddrinfo knows
    /// (`nbd` is 10809).
    pub fn connect_tcp(&self, host: &str, port: &str) -> impl Future<Output = Result<()>> + Send + 'static {
        let begun = self.begin_connect(|| Ok(()));
        let (host, port) = (host.to_string(), port.to_string());
        self.connecting(begun, |h, ()| async move { h.connect_tcp_begun(&host, &port).await })
    }

    /// The rest of [`Handle::connect_tcp`], once the handle is `Connecting`.
    async fn connect_tcp_begun(&self, host: &str, port: &str) -> Result<()> {
        let number = match port.parse::<u16>() {
            Ok(p) => Some(p),
            Err(_) => {
                let name = port.to_string();
                // The services database is file IO: off the runtime's threads.
                tokio::task::spawn_blocking(move || tcp::service_port(&name))
                    .await
                    .ok()
                    .flatten()
            }
        };
        if let Some(p) = number {
            self.set_target(UriTransport::Tcp { host: host.to_string(), port: p });
        }
        // An unknown service name fails in the transport step, with its message.
        let target = Target::Tcp { host: host.to_string(), port: port.to_string() };
        self.finish_connect(connect::open(target)).await
    }

    /// Moves a newly created handle to `Connecting` if `precheck` passes.
    fn begin_connect(&self, precheck: impl FnOnce() -> Result<()>) -> Result<()> {
        // Held while the precheck runs: it may change settings (connect_uri).
        let mut phase = self.phase();
        match *phase {
            Phase::Created => {}
            _ => {
                drop(phase);
                return state::ensure_allowed(Call::Connect, self.state());
            }
        }
        precheck()?;
        *phase = Phase::Connecting;
        Ok(())
    }

    /// The rest of a connect whose call `begun` (with what the call prepared, `T`): `rest`
    /// runs on the handle once the future is polled, and a [`ConnectGuard`] held from now on
    /// leaves the handle dead if the future is dropped before it ends.
    fn connecting<T, F>(
        &self,
        begun: Result<T>,
        rest: impl FnOnce(Handle, T) -> F + Send + 'static,
    ) -> impl Future<Output = Result<()>> + Send + 'static
    where
        T: Send + 'static,
        F: Future<Output = Result<()>> + Send + 'static,
    {
        let begun = begun.map(|prepared| (ConnectGuard(self.clone()), prepared));
        async move {
            let (guard, prepared) = begun?;
            rest(guard.0.clone(), prepared).await
        }
    }

    /// What the handshake steps need: the counters, the debug sink, the TLS settings.
    fn link(&self, settings: &Settings) -> Link {
        Link {
            counters: self.inner.counters.clone(),
            debug: self.debug_sink(),
            tls: TlsParams {
                settings: settings.tls.clone(),
                host: self.tcp_host(),
            },
        }
    }

    /// Runs the transport step (`open`) and the handshake step, within the connect timeout
    /// and until the handle is closed, and moves the handle to the phase they end in.
    async fn finish_connect(&self, open: impl std::future::Future<Output = Result<Opened>>) -> Result<()> {
        let settings = self.settings();
        let link = self.link(&settings);
        // The socket is the handle's as soon as it is open, whatever happens next.
        let adopted: Mutex<Option<OwnedFd>> = Mutex::new(None);
        let attempt = async {
            let Opened { socket, child } = open.await?;
            if let Some(child) = child {
                *lock(&self.inner.child) = Some(Arc::new(child));
            }
            // Kept before anything can fail: a connectSocket fd is the handle's from here on,
            // and is closed with the handle, never earlier.
            let stream = Stream::new(&socket);
            *lock(&adopted) = Some(socket);
            let stream = stream?;
            connect::handshake(stream, settings.handshake(), &link).await
        };
        let timed = async {
            match settings.connect_timeout {
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
        let outcome = self.unless_closed(timed).await;
        let socket = lock(&adopted).take();
        let mut phase = self.phase();
        if !matches!(*phase, Phase::Connecting) {
            // Closed meanwhile: the socket goes with this scope.
            return Err(closed_while_connecting());
        }
        match outcome {
            Err(e) => {
                *phase = Phase::Failed { socket };
                Err(e)
            }
            Ok(next) => {
                let socket = socket.expect("a negotiated connection has a socket");
                *phase = match next {
                    Handshaken::Ready(ready) => self.transmission(socket, ready, &settings),
                    Handshaken::Negotiating(negotiation) => Phase::Negotiating { socket, negotiation },
                };
                Ok(())
            }
        }
    }

    /// Runs a connecting step until it ends, or until the handle is closed.
    async fn unless_closed<T>(&self, step: impl std::future::Future<Output = Result<T>>) -> Result<T> {
        let mut closing = self.inner.closing.subscribe();
        tokio::select! {
            r = step => r,
            _ = closing.wait_for(|closed| *closed) => Err(closed_while_connecting()),
        }
    }

    /// The phase of a connection that has entered transmission: handed to an event-loop
    /// driver, or run by the tokio driver.
    fn transmission(&self, socket: OwnedFd, ready: Ready, settings: &Settings) -> Phase {
        let Ready {
            stream,
            negotiated,
            early,
        } = ready;
        self.inner.tls_negotiated.store(negotiated.tls, Ordering::Relaxed);
        if self.inner.event_loop.load(Ordering::Relaxed) && !matches!(stream, Stream::Layered(_)) {
            // The stream is a registered duplicate of `socket`: dropping it leaves the
            // socket to the event-loop driver alone.
            drop(stream);
            return Phase::Detached {
                socket: Some(socket),
                session: Arc::new(Session::new(negotiated)),
                early,
                lifeline: Lifeline::new(),
                max_in_flight: settings.max_in_flight,
            };
        }
        let (reader, writer) = stream.split();
        let driver = Driver::start(
            Session::new(negotiated),
            reader,
            writer,
            early,
            settings.max_in_flight,
            self.inner.counters.clone(),
            Some(self.debug_switch()),
        );
        Phase::Connected {
            socket,
            driver,
            shutting_down: false,
        }
    }

    // ---- option negotiation ----

    /// Runs one option request; `None` when `NBD_OPT_GO` moved the connection to
    /// transmission. The state check and the move to `OptBusy` happen now, at the call; the
    /// exchange itself when the future runs.
    fn opt(&self, req: OptRequest) -> impl Future<Output = Result<Option<OptReply>>> + Send + 'static {
        let begun = self.opt_begin(req);
        let h = self.clone();
        async move { h.opt_exchange(begun?).await }
    }

    /// Takes the negotiating connection for one option request (the handle is `OptBusy`,
    /// which refuses other calls, until [`Handle::opt_exchange`] puts it back).
    fn opt_begin(&self, req: OptRequest) -> Result<OptBegun> {
        state::ensure_allowed(Call::Opt, self.state())?;
        let (socket, negotiation) = {
            let mut phase = self.phase();
            match std::mem::replace(&mut *phase, Phase::Connecting) {
                Phase::Negotiating { socket, negotiation } => {
                    *phase = Phase::OptBusy;
                    (socket, negotiation)
                }
                other => {
                    *phase = other;
                    drop(phase);
                    // Another option request (or the connect) has the connection: refused as
                    // while connecting.
                    return Err(state::ensure_allowed(Call::Opt, State::Connecting)
                        .expect_err("option requests are refused while connecting"));
                }
            }
        };
        Ok(OptBegun {
            handle: self.clone(),
            taken: Some((socket, negotiation, req)),
        })
    }

    /// The exchange of an option request taken by [`Handle::opt_begin`], and the phase it
    /// leaves the handle in.
    async fn opt_exchange(&self, mut begun: OptBegun) -> Result<Option<OptReply>> {
        // `begun` stays alive to the end: if this future is dropped midway, it marks the
        // handle dead rather than leaving it busy.
        let (socket, mut negotiation, req) = begun.taken.take().expect("an option request runs once");
        let aborting = matches!(req, OptRequest::Abort);
        if let Err(e) = negotiation.begin(req) {
            *self.phase() = Phase::Negotiating { socket, negotiation };
            return Err(e);
        }
        let settings = self.settings();
        let link = self.link(&settings);
        let answer = self.unless_closed(negotiation.answer(&link));
        let result = if aborting {
            // The server should answer NBD_OPT_ABORT and hang up, but nothing needs its
            // answer (libnbd does not wait for it): one that never answers holds the caller
            // up for a moment only, as shutdown's wait for the server to close.
            match tokio::time::timeout(OPT_ABORT_WAIT, answer).await {
                Ok(r) => r,
                Err(_) => {
                    // Ends the connection now, as the server should have: `closed` means the
                    // server sees it gone, even before close() releases the descriptor.
                    // SAFETY: shutdown(2) on the socket this handle owns; it stays open.
                    unsafe { libc::shutdown(socket.as_raw_fd(), libc::SHUT_RDWR) };
                    Ok(OptStep::Aborted { newstyle: false })
                }
            }
        } else if let Some(limit) = settings.connect_timeout {
            // The connect timeout covers each option exchange too: in option mode these are
            // the rest of the handshake, and a server that stalls one must not hang the
            // caller. The connection is then out of step, so it is dead.
            tokio::time::timeout(limit, answer).await.unwrap_or_else(|_| {
                Err(Error::io(
                    Errno::ETIMEDOUT,
                    format!(
                        "the server did not answer the option request within {} ms",
                        limit.as_millis()
                    ),
                ))
            })
        } else {
            answer.await
        };
        let mut phase = self.phase();
        if !matches!(*phase, Phase::OptBusy) {
            return Err(closed_while_connecting());
        }
        match result {
            Err(e) => {
                *phase = Phase::Failed { socket: Some(socket) };
                Err(e)
            }
            Ok(OptStep::Ready(ready)) => {
                *phase = self.transmission(socket, ready, &settings);
                Ok(None)
            }
            Ok(OptStep::Aborted { newstyle }) => {
                // A plain newstyle server knows no NBD_OPT_ABORT: the connection is just
                // dropped, and the handle is dead rather than closed (as libnbd).
                *phase = if newstyle {
                    Phase::Failed { socket: Some(socket) }
                } else {
                    Phase::Ended { socket }
                };
                Ok(Some(OptReply::Aborted))
            }
            Ok(OptStep::Answered(negotiation, answer)) => {
                *phase = Phase::Negotiating { socket, negotiation };
                answer.map(Some)
            }
        }
    }

    /// `nbd_opt_go`: ends negotiation and enters transmission. A refusal by a server that
    /// is still there leaves the handle negotiating.
    pub fn opt_go(&self) -> impl Future<Output = Result<()>> + Send + 'static {
        let step = self.opt(OptRequest::Go);
        async move {
            match step.await? {
                None => Ok(()),
                Some(other) => Err(Error::protocol(format!("unexpected answer to NBD_OPT_GO: {other:?}"))),
            }
        }
    }

    /// `nbd_opt_abort`: ends the connection politely (the handle is then closed). A
    /// server that does not answer within 2 seconds is not waited for any longer.
    pub fn opt_abort(&self) -> impl Future<Output = Result<()>> + Send + 'static {
        let step = self.opt(OptRequest::Abort);
        async move { step.await.map(|_| ()) }
    }

    /// `nbd_opt_info`: the export's details, after which the getters report them.
    pub fn opt_info(&self) -> impl Future<Output = Result<ExportInfo>> + Send + 'static {
        let step = self.opt(OptRequest::Info);
        async move {
            match step.await? {
                Some(OptReply::Info(info)) => Ok(info),
                other => Err(Error::protocol(format!("unexpected answer to NBD_OPT_INFO: {other:?}"))),
            }
        }
    }

    /// `nbd_opt_list`: the server's exports.
    pub fn opt_list(&self) -> impl Future<Output = Result<Vec<ExportEntry>>> + Send + 'static {
        let step = self.opt(OptRequest::List);
        async move {
            match step.await? {
                Some(OptReply::List(list)) => Ok(list),
                other => Err(Error::protocol(format!("unexpected answer to NBD_OPT_LIST: {other:?}"))),
            }
        }
    }

    /// `nbd_opt_list_meta_context(_queries)`: the contexts the server offers for the
    /// export (for `queries`, or the configured contexts).
    pub fn opt_list_meta_context(
        &self,
        queries: Option<Vec<String>>,
    ) -> impl Future<Output = Result<Vec<String>>> + Send + 'static {
        self.opt_meta_context(OptRequest::ListMetaContext, "NBD_OPT_LIST_META_CONTEXT", queries)
    }

    /// `nbd_opt_set_meta_context(_queries)`: the contexts the server agreed to.
    pub fn opt_set_meta_context(
        &self,
        queries: Option<Vec<String>>,
    ) -> impl Future<Output = Result<Vec<String>>> + Send + 'static {
        self.opt_meta_context(OptRequest::SetMetaContext, "NBD_OPT_SET_META_CONTEXT", queries)
    }

    fn opt_meta_context(
        &self,
        request: fn(Option<Vec<String>>) -> OptRequest,
        name: &'static str,
        queries: Option<Vec<String>>,
    ) -> impl Future<Output = Result<Vec<String>>> + Send + 'static {
        let checked = queries
            .iter()
            .flatten()
            .try_for_each(|q| check_string("meta context query", q));
        // A bad query is refused before the option is taken: the handle stays negotiating.
        let step = checked.map(|()| self.opt(request(queries)));
        async move {
            match step?.await? {
                Some(OptReply::MetaContexts(names)) => Ok(names),
                other => Err(Error::protocol(format!("unexpected answer to {name}: {other:?}"))),
            }
        }
    }

    fn opt_bool(&self, req: OptRequest) -> impl Future<Output = Result<bool>> + Send + 'static {
        let step = self.opt(req);
        async move {
            match step.await? {
                Some(OptReply::Agreed(yes)) => Ok(yes),
                other => Err(Error::protocol(format!("unexpected option answer: {other:?}"))),
            }
        }
    }

    /// `nbd_opt_structured_reply`.
    pub fn opt_structured_reply(&self) -> impl Future<Output = Result<bool>> + Send + 'static {
        self.opt_bool(OptRequest::StructuredReply)
    }

    /// `nbd_opt_extended_headers`.
    pub fn opt_extended_headers(&self) -> impl Future<Output = Result<bool>> + Send + 'static {
        self.opt_bool(OptRequest::ExtendedHeaders)
    }

    /// `nbd_opt_starttls`.
    pub fn opt_starttls(&self) -> impl Future<Output = Result<bool>> + Send + 'static {
        self.opt_bool(OptRequest::StartTls)
    }

    // ---- ending ----

    /// `nbd_shutdown`: sends NBD_CMD_DISC once the commands in flight have finished (at
    /// once with `abandon_pending`), then waits briefly for the server to hang up.
    pub async fn shutdown(&self, abandon_pending: bool) -> Result<()> {
        let state = self.state();
        state::ensure_allowed(Call::Shutdown, state)?;
        if state == State::Negotiating {
            // Nothing is in flight while negotiating: end politely with NBD_OPT_ABORT.
            return self.opt_abort().await;
        }
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
                    if abandon_pending {
                        driver.lifeline.abandon_unsent();
                    }
                    (driver.requests.clone(), driver.lifeline.clone())
                }
                _ => return state::ensure_allowed(Call::Shutdown, State::Closed),
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
        if let Some(debug) = self.debug_sink() {
            debug("close", "closing handle");
        }
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
        } else {
            drop(old);
        }
        // The socket is closed: the server process (if any) ends and is reaped in the
        // background.
        drop(lock(&self.inner.child).take());
    }
}

/// A negotiating connection taken for one option request. Dropped while the handle is
/// still `OptBusy` (its future dropped before it ended), it puts the handle back: to
/// negotiating if the exchange never started, else to dead (the connection is out of step).
struct OptBegun {
    handle: Handle,
    /// The connection and the request, until the exchange takes them.
    taken: Option<(OwnedFd, Box<Negotiation>, OptRequest)>,
}

impl Drop for OptBegun {
    fn drop(&mut self) {
        let mut phase = self.handle.phase();
        if matches!(*phase, Phase::OptBusy) {
            *phase = match self.taken.take() {
                Some((socket, negotiation, _)) => Phase::Negotiating { socket, negotiation },
                None => Phase::Failed { socket: None },
            };
        }
    }
}

/// Held by a connect's future once the handle is `Connecting`: dropped before the connect
/// ended (the future dropped), it leaves the handle dead, as a failed connect does, rather
/// than connecting forever.
struct ConnectGuard(Handle);

impl Drop for ConnectGuard {
    fn drop(&mut self) {
        let mut phase = self.0.phase();
        if matches!(*phase, Phase::Connecting) {
            *phase = Phase::Failed { socket: None };
        }
    }
}

/// Locks `m`, whatever a panicking holder left (every value kept under these locks is
/// whole at all times).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Where debug messages go when no sink is set.
fn to_stderr(name: &str, context: &str, message: &str) {
    eprintln!("nbd-client: debug: {name}: {context}: {message}");
}

fn closed_while_connecting() -> Error {
    Error::new(
        nbd_proto::Fault::Cancelled,
        Errno::ECANCELED,
        "the handle was closed while connecting",
    )
}

/// Refuses `value` with `EINVAL` and the message `refusal` makes when it has bits outside
/// `known`.
fn check_bits(value: u32, known: u32, refusal: impl FnOnce() -> String) -> Result<()> {
    if value & !known != 0 {
        return Err(Error::usage(Errno::EINVAL, refusal()));
    }
    Ok(())
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
