//! The handle: configuration, state, connecting, commands, ending.

use std::os::fd::{OwnedFd, RawFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, watch};

use nbd_proto::consts::MAX_STRING;
use nbd_proto::handshake::{
    ExportEntry, ExportInfo, Handshake, Negotiated, OptReply, OptRequest, Outcome,
};
use nbd_proto::state::{self, Call, State};
use nbd_proto::transmission::{Command, CommandKind, Detail, Session, Tracking};
use nbd_proto::{Errno, Error, Result};

use crate::buffer::{DestBuf, SourceBuf};
use crate::cancel::CancelToken;
use crate::config::Config;
use crate::driver::{
    Callback, CallbackReply, CommandRequest, Completed, Debug, DebugSink, Driver, InFlightGuard,
    Lifeline, Payload, Request, Shared,
};
use crate::transport::{self, io_error, Stream};
use crate::subprocess::{self, Child};
use crate::uri::{self, NbdUri, UriTransport};

/// A command for [`Handle::submit`].
pub enum Op {
    /// Read `count` bytes into a new buffer.
    Read { count: u64, offset: u64, flags: u32 },
    /// Read `count` bytes into a new buffer, recording the reply's chunks
    /// ([`Detail::Chunks`]).
    ReadStructured { count: u64, offset: u64, flags: u32 },
    /// Block status for `count` bytes at `offset`, for every negotiated context or only
    /// those named in `contexts` ([`Detail::Extents`]).
    BlockStatus {
        count: u64,
        offset: u64,
        flags: u32,
        contexts: Option<Vec<String>>,
    },
    /// Read into the caller's buffer (all of it).
    ReadInto { dest: Box<dyn DestBuf>, offset: u64, flags: u32 },
    /// Write the caller's buffer.
    Write { src: Box<dyn SourceBuf>, offset: u64, flags: u32 },
    /// Flush, trim, cache or zero.
    Other { kind: CommandKind, count: u64, offset: u64, flags: u32 },
}

/// What a finished command gives back.
#[derive(Debug, Default)]
pub struct Reply {
    /// The data of `Op::Read` and `Op::ReadStructured`.
    pub data: Option<Vec<u8>>,
    /// Extents of `Op::BlockStatus`, chunks of `Op::ReadStructured`.
    pub detail: Detail,
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
    /// Where debug messages go when `config.debug` is on.
    debug_sink: Arc<Mutex<Option<DebugSink>>>,
    /// `config.debug`, for the driver, which checks it before each message.
    debug_on: Arc<std::sync::atomic::AtomicBool>,
    /// Hand plain connections to an event-loop driver ([`Handle::set_event_loop_driver`]).
    event_loop: std::sync::atomic::AtomicBool,
    /// Where the handle connected, for `get_uri`.
    target: Mutex<Option<UriTransport>>,
    /// The server process of `connect_command` / socket activation. Declared after
    /// `phase` so that on drop the socket closes first (a server on stdin then sees end of
    /// file and exits by itself); dropping it ends and reaps the process.
    child: Mutex<Option<Arc<Child>>>,
}

/// A connection in option negotiation, between option requests. The handshake machine
/// keeps what has been learned (the export's details from `NBD_OPT_INFO`, meta contexts).
struct Negotiation {
    hs: Handshake,
    stream: Stream,
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
    /// A newly created handle (`nbd_create`). As libnbd, a handle without a name is named
    /// `nbd1`, `nbd2`, … in order of creation, and `LIBNBD_DEBUG=1` in the environment turns
    /// debugging on.
    pub fn new(mut config: Config) -> Handle {
        static CREATED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = CREATED.fetch_add(1, Ordering::Relaxed) + 1;
        if config.handle_name.is_empty() {
            config.handle_name = format!("nbd{n}");
        }
        if std::env::var_os("LIBNBD_DEBUG").is_some_and(|v| v == "1") {
            config.debug = true;
        }
        let debug_on = config.debug;
        Handle {
            inner: Arc::new(Inner {
                strict: AtomicU32::new(config.strict),
                config: Mutex::new(config),
                phase: Mutex::new(Phase::Created),
                shared: Arc::new(Shared::default()),
                closing: watch::channel(false).0,
                debug_sink: Arc::default(),
                debug_on: Arc::new(std::sync::atomic::AtomicBool::new(debug_on)),
                event_loop: std::sync::atomic::AtomicBool::new(false),
                target: Mutex::new(None),
                child: Mutex::new(None),
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
        state::ensure_allowed(Call::Configure, self.state())?;
        self.update_config(change);
        Ok(())
    }

    fn update_config(&self, change: impl FnOnce(&mut Config)) {
        let mut config = self.inner.config.lock().unwrap_or_else(|p| p.into_inner());
        change(&mut config);
        self.inner.strict.store(config.strict, Ordering::Relaxed);
    }

    /// `nbd_set_export_name`: before connecting, or while negotiating, where another name
    /// forgets what was learned about the previous export (the same name changes nothing).
    pub fn set_export_name(&self, name: &str) -> Result<()> {
        check_string("export name", name)?;
        self.negotiation_setting(|c| c.export_name = name.to_string())
    }

    /// Changes a setting that option mode may change between requests (export name, meta
    /// contexts, info requests): before connecting or while negotiating.
    pub fn negotiation_setting(&self, change: impl Fn(&mut Config)) -> Result<()> {
        state::ensure_allowed(Call::SetExportName, self.state())?;
        let mut phase = self.phase();
        self.update_config(&change);
        if let Phase::Negotiating { negotiation, .. } = &mut *phase {
            let c = self.config();
            negotiation.hs.set_export_name(&c.export_name);
            let hs = negotiation.hs.config_mut();
            hs.meta_contexts = c.meta_contexts;
            hs.request_meta_context = c.request_meta_context;
            hs.request_block_size = c.request_block_size;
            hs.full_info = c.full_info;
        }
        Ok(())
    }

    /// `nbd_add_meta_context`. An empty name is accepted, as libnbd does (the server
    /// judges it).
    pub fn add_meta_context(&self, name: &str) -> Result<()> {
        check_string("meta context name", name)?;
        self.negotiation_setting(|c| c.meta_contexts.push(name.to_string()))
    }

    /// `nbd_clear_meta_contexts`.
    pub fn clear_meta_contexts(&self) -> Result<()> {
        self.negotiation_setting(|c| c.meta_contexts.clear())
    }

    /// Sets (or removes) where debug messages go; they flow when `config.debug` is on.
    pub fn set_debug_sink(&self, sink: Option<DebugSink>) {
        *self.inner.debug_sink.lock().unwrap_or_else(|p| p.into_inner()) = sink;
    }

    /// `nbd_set_debug`: allowed in any state (takes effect for what follows).
    pub fn set_debug(&self, on: bool) {
        self.update_config(|c| c.debug = on);
        self.inner.debug_on.store(on, Ordering::Relaxed);
    }

    /// The driver's debug switch and a sink that follows later changes of it.
    fn debug_hub(&self) -> Debug {
        let sinks = self.inner.debug_sink.clone();
        let inner = Arc::downgrade(&self.inner);
        Debug {
            on: self.inner.debug_on.clone(),
            sink: Arc::new(move |context: &str, message: &str| {
                let sink = sinks.lock().unwrap_or_else(|p| p.into_inner()).clone();
                match sink {
                    Some(sink) => sink(context, message),
                    None => {
                        let name = inner
                            .upgrade()
                            .map(|i| i.config.lock().unwrap_or_else(|p| p.into_inner()).handle_name.clone())
                            .unwrap_or_default();
                        eprintln!("nbd-client: debug: {name}: {context}: {message}");
                    }
                }
            }),
        }
    }

    fn debug_sink(&self) -> Option<DebugSink> {
        if !self.config().debug {
            return None;
        }
        let sink = self.inner.debug_sink.lock().unwrap_or_else(|p| p.into_inner()).clone();
        Some(sink.unwrap_or_else(|| {
            let name = self.config().handle_name;
            Arc::new(move |context: &str, message: &str| {
                eprintln!("nbd-client: debug: {name}: {context}: {message}");
            })
        }))
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
            shared: self.inner.shared.clone(),
            lifeline: lifeline.clone(),
            debug: self.debug_hub(),
        })
    }

    /// The strict-mode bits in force (`nbd_get_strict_mode`).
    pub fn strict_mode(&self) -> u32 {
        self.inner.strict.load(Ordering::Relaxed)
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
        state::ensure_allowed(Call::Info, state)?;
        let negotiated = match &*self.phase() {
            Phase::Connected { driver, .. } => Some(driver.session.negotiated.clone()),
            Phase::Detached { session, .. } => Some(session.negotiated.clone()),
            Phase::Negotiating { negotiation, .. } => negotiation.hs.export_known(),
            _ => None,
        };
        negotiated.ok_or_else(|| {
            Error::usage(
                Errno::EINVAL,
                format!(
                    "invalid state: {}: the server never sent the export's details",
                    state.name()
                ),
            )
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
        negotiated.can_meta_context(name, &self.config().meta_contexts)
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

    /// `nbd_connect_uri`: parses `uri` (libnbd's grammar), checks it against the URI
    /// policy, applies its settings (export name, TLS), then connects.
    pub async fn connect_uri(&self, text: &str) -> Result<()> {
        let mut parsed: Option<NbdUri> = None;
        self.begin_connect(|| {
            let u = uri::parse(text)?;
            self.config().uri_policy.check(&u)?;
            check_string("export name", &u.export_name)?;
            self.update_config(|c| {
                c.export_name = u.export_name.clone();
                if u.tls {
                    c.tls = nbd_proto::handshake::TlsMode::Require;
                }
                if u.tls_username.is_some() {
                    c.tls_username = u.tls_username.clone();
                }
                if u.tls_certificates.is_some() {
                    c.tls_certificates = u.tls_certificates.clone();
                }
                if u.tls_psk_file.is_some() {
                    c.tls_psk_file = u.tls_psk_file.clone();
                }
                if u.tls_hostname.is_some() {
                    c.tls_hostname = u.tls_hostname.clone();
                }
                if let Some(v) = u.tls_verify_peer {
                    c.tls_verify_peer = v;
                }
            });
            parsed = Some(u);
            Ok(())
        })?;
        let u = parsed.expect("set by the precheck");
        self.set_target(u.transport.clone());
        match u.transport.clone() {
            UriTransport::Tcp { host, port } => {
                let port = port.to_string();
                self.finish_connect(async move { transport::connect_tcp(&host, &port).await })
                    .await
            }
            UriTransport::Unix { socket } => {
                self.finish_connect(async move { transport::connect_unix(&socket).await })
                    .await
            }
            UriTransport::Vsock { cid, port } => {
                self.finish_connect(async move { crate::vsock::connect_vsock(cid, port).await })
                    .await
            }
            UriTransport::Ssh { .. } => {
                let argv = uri::ssh_argv(&u).expect("an ssh transport");
                self.connect_child(argv, false).await
            }
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
        let Some(transport) = self.inner.target.lock().unwrap_or_else(|p| p.into_inner()).clone() else {
            return Err(Error::usage(
                Errno::EINVAL,
                "cannot construct a URI for this connection type (a URI needs connectUri, \
                 connectTcp, connectUnix or connectVsock)",
            ));
        };
        let c = self.config();
        let tls = match self.negotiated_so_far() {
            Ok(n) => n.tls,
            Err(_) => c.tls == nbd_proto::handshake::TlsMode::Require,
        };
        let u = NbdUri {
            tls,
            transport,
            export_name: c.export_name,
            // Written whenever set, TLS or not (libnbd does).
            tls_username: c.tls_username,
            tls_certificates: c.tls_certificates,
            tls_psk_file: c.tls_psk_file,
            tls_hostname: c.tls_hostname,
            tls_verify_peer: if c.tls_verify_peer { None } else { Some(false) },
            unknown_params: Vec::new(),
        };
        Ok(uri::format(&u))
    }

    fn set_target(&self, t: UriTransport) {
        *self.inner.target.lock().unwrap_or_else(|p| p.into_inner()) = Some(t);
    }

    /// `nbd_connect_command`: starts `argv` with a socket as its stdin and stdout (e.g.
    /// `nbdkit -s memory 1G`) and talks NBD over it. The process is ended and reaped when
    /// the handle is closed or dropped; if the connect fails, the error says how the
    /// process ended and what it wrote to stderr.
    pub async fn connect_command(&self, argv: Vec<String>) -> Result<()> {
        self.begin_connect(|| Ok(()))?;
        self.connect_child(argv, false).await
    }

    /// `nbd_connect_systemd_socket_activation`: starts `argv` with a listening socket as
    /// fd 3 (`LISTEN_FDS`, `LISTEN_PID`), as systemd would, e.g. `qemu-nbd -f qcow2 IMG`.
    pub async fn connect_systemd_socket_activation(&self, argv: Vec<String>) -> Result<()> {
        self.begin_connect(|| Ok(()))?;
        self.connect_child(argv, true).await
    }

    async fn connect_child(&self, argv: Vec<String>, activation: bool) -> Result<()> {
        let inner = self.inner.clone();
        let name = self.config().socket_activation_name;
        let open = async move {
            let spawned = tokio::task::spawn_blocking(move || {
                if activation {
                    subprocess::spawn_socket_activation_named(&argv, &name)
                } else {
                    subprocess::spawn_command(&argv)
                }
            })
            .await
            .map_err(|e| Error::io(Errno::EIO, format!("starting the server process: {e}")))??;
            let (fd, child) = spawned;
            *inner.child.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(child));
            Ok(fd)
        };
        let result = self.finish_connect(open).await;
        let Err(e) = result else { return Ok(()) };
        let child = self.inner.child.lock().unwrap_or_else(|p| p.into_inner()).clone();
        match child {
            Some(child) => match child.failure_report(std::time::Duration::from_secs(1)).await {
                Some(report) => Err(Error::new(e.fault(), e.errno(), format!("{}; {report}", e.message()))),
                None => Err(e),
            },
            None => Err(e),
        }
    }

    /// The server process started by `connect_command` or socket activation, if any.
    pub fn child_pid(&self) -> Option<u32> {
        self.inner.child.lock().unwrap_or_else(|p| p.into_inner()).as_ref().map(|c| c.pid())
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

    /// `nbd_get_tls_username`: the name set, else the login name PSK would use
    /// (`$LOGNAME`, else `getlogin`); `EINVAL` when there is none.
    pub fn tls_username(&self) -> Result<String> {
        match self.config().tls_username {
            Some(name) => Ok(name),
            None => crate::tls::login_name(),
        }
    }

    /// `nbd_get_tls_hostname`: the name set, else the host the handle connects to over TCP
    /// (what the server's certificate is checked against); `None` when neither exists.
    pub fn tls_hostname(&self) -> Option<String> {
        self.config().tls_hostname.or_else(|| {
            match self.inner.target.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
                Some(UriTransport::Tcp { host, .. }) => Some(host.clone()),
                _ => None,
            }
        })
    }

    /// `nbd_set_socket_activation_name`: `LISTEN_FDNAMES` for
    /// `connect_systemd_socket_activation` (empty: `unknown`). At most 255 printable ASCII
    /// characters other than `:`. Only on a newly created handle.
    pub fn set_socket_activation_name(&self, name: &str) -> Result<()> {
        subprocess::check_socket_name(name)?;
        self.configure(|c| c.socket_activation_name = name.to_string())
    }

    /// `nbd_connect_vsock` (Linux).
    pub async fn connect_vsock(&self, cid: u32, port: u32) -> Result<()> {
        self.begin_connect(|| Ok(()))?;
        self.set_target(UriTransport::Vsock { cid, port });
        self.finish_connect(async move { crate::vsock::connect_vsock(cid, port).await })
            .await
    }

    /// `nbd_connect_unix`.
    pub async fn connect_unix(&self, path: &str) -> Result<()> {
        self.begin_connect(|| Ok(()))?;
        self.set_target(UriTransport::Unix { socket: path.to_string() });
        let path = path.to_string();
        self.finish_connect(async move { transport::connect_unix(&path).await })
            .await
    }

    /// `nbd_connect_tcp`: `port` is a number or any service name getaddrinfo knows
    /// (`nbd` is 10809).
    pub async fn connect_tcp(&self, host: &str, port: &str) -> Result<()> {
        self.begin_connect(|| Ok(()))?;
        let number = match port.parse::<u16>() {
            Ok(p) => Some(p),
            Err(_) => {
                let name = port.to_string();
                // The services database is file IO: off the runtime's threads.
                tokio::task::spawn_blocking(move || transport::service_port(&name))
                    .await
                    .ok()
                    .flatten()
            }
        };
        if let Some(p) = number {
            self.set_target(UriTransport::Tcp { host: host.to_string(), port: p });
        }
        // An unknown service name fails in transport::connect_tcp, with its message.
        let (host, port) = (host.to_string(), port.to_string());
        self.finish_connect(async move { transport::connect_tcp(&host, &port).await })
            .await
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

    async fn finish_connect(
        &self,
        open: impl std::future::Future<Output = Result<OwnedFd>>,
    ) -> Result<()> {
        let config = self.config();
        let mut closing = self.inner.closing.subscribe();
        let shared = self.inner.shared.clone();
        let debug = self.debug_sink();
        let adopted: Arc<Mutex<Option<OwnedFd>>> = Arc::default();
        let tls = TlsParams::new(&config, self.inner.target.lock().unwrap_or_else(|p| p.into_inner()).as_ref());
        let attempt = {
            let adopted = adopted.clone();
            let hs_config = config.handshake();
            let debug = debug.clone();
            async move {
                let socket = open.await?;
                let stream = Stream::new(&socket)?;
                *adopted.lock().unwrap() = Some(socket);
                let mut hs = Handshake::new(hs_config);
                let (stream, outcome) = drive(stream, &mut hs, &shared, &debug, &tls).await?;
                Ok::<_, Error>((hs, stream, outcome))
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
            _ = closing.wait_for(|closed| *closed) => Err(closed_while_connecting()),
        };
        let socket = adopted.lock().unwrap().take();
        let mut phase = self.phase();
        if !matches!(*phase, Phase::Connecting) {
            // Closed meanwhile: the socket goes with this scope.
            return Err(closed_while_connecting());
        }
        let (mut hs, stream, outcome) = match outcome {
            Ok(o) => o,
            Err(e) => {
                *phase = Phase::Failed { socket };
                return Err(e);
            }
        };
        let socket = socket.expect("a negotiated connection has a socket");
        match outcome {
            Outcome::Ready(negotiated) => {
                let early = hs.take_leftover();
                *phase = self.connected(socket, negotiated, stream, early, &config);
                Ok(())
            }
            Outcome::Negotiating => {
                *phase = Phase::Negotiating {
                    socket,
                    negotiation: Box::new(Negotiation { hs, stream }),
                };
                Ok(())
            }
            other => {
                let e = Error::protocol(format!("handshake stopped unexpectedly at {other:?}"));
                *phase = Phase::Failed { socket: Some(socket) };
                Err(e)
            }
        }
    }

    /// The phase of a connection that has entered transmission.
    fn connected(
        &self,
        socket: OwnedFd,
        negotiated: Negotiated,
        stream: Stream,
        early: Vec<u8>,
        config: &Config,
    ) -> Phase {
        if self.inner.event_loop.load(Ordering::Relaxed) && !matches!(stream, Stream::Layered(_)) {
            // The stream is a registered duplicate of `socket`: dropping it leaves the
            // socket to the event-loop driver alone.
            drop(stream);
            return Phase::Detached {
                socket: Some(socket),
                session: Arc::new(Session::new(negotiated)),
                early,
                lifeline: Lifeline::new(),
                max_in_flight: config.max_in_flight,
            };
        }
        let (reader, writer) = stream.split();
        let driver = Driver::start(
            Session::new(negotiated),
            reader,
            writer,
            early,
            config.max_in_flight,
            self.inner.shared.clone(),
            Some(self.debug_hub()),
        );
        Phase::Connected {
            socket,
            driver,
            shutting_down: false,
        }
    }

    // ---- option negotiation ----

    /// Runs one option request; `None` when `NBD_OPT_GO` moved the connection to
    /// transmission.
    async fn opt(&self, req: OptRequest) -> Result<Option<OptReply>> {
        state::ensure_allowed(Call::Opt, self.state())?;
        let (socket, mut negotiation) = {
            let mut phase = self.phase();
            match std::mem::replace(&mut *phase, Phase::Connecting) {
                Phase::Negotiating { socket, negotiation } => {
                    *phase = Phase::OptBusy;
                    (socket, negotiation)
                }
                other => {
                    *phase = other;
                    drop(phase);
                    return state::ensure_allowed(Call::Opt, State::Connecting).map(|()| None);
                }
            }
        };
        if let Err(e) = negotiation.hs.request(req) {
            *self.phase() = Phase::Negotiating { socket, negotiation };
            return Err(e);
        }
        let config = self.config();
        let debug = self.debug_sink();
        let mut closing = self.inner.closing.subscribe();
        let Negotiation { mut hs, stream } = *negotiation;
        let tls = TlsParams::new(&config, self.inner.target.lock().unwrap_or_else(|p| p.into_inner()).as_ref());
        let shared = self.inner.shared.clone();
        let result = tokio::select! {
            r = drive(stream, &mut hs, &shared, &debug, &tls) => r,
            _ = closing.wait_for(|closed| *closed) => Err(closed_while_connecting()),
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
            Ok((stream, Outcome::Ready(negotiated))) => {
                let early = hs.take_leftover();
                *phase = self.connected(socket, negotiated, stream, early, &config);
                Ok(None)
            }
            Ok((_, Outcome::Reply(Ok(OptReply::Aborted)))) => {
                // A plain newstyle server knows no NBD_OPT_ABORT: the connection is just
                // dropped, and the handle is dead rather than closed (as libnbd).
                *phase = if hs.protocol() == Some(nbd_proto::handshake::Protocol::Newstyle) {
                    Phase::Failed { socket: Some(socket) }
                } else {
                    Phase::Ended { socket }
                };
                Ok(Some(OptReply::Aborted))
            }
            Ok((stream, Outcome::Reply(answer))) => {
                *phase = Phase::Negotiating {
                    socket,
                    negotiation: Box::new(Negotiation { hs, stream }),
                };
                answer.map(Some)
            }
            Ok((_, other)) => {
                *phase = Phase::Failed { socket: Some(socket) };
                Err(Error::protocol(format!("option negotiation stopped unexpectedly at {other:?}")))
            }
        }
    }

    /// `nbd_opt_go`: ends negotiation and enters transmission. A refusal by a server that
    /// is still there leaves the handle negotiating.
    pub async fn opt_go(&self) -> Result<()> {
        match self.opt(OptRequest::Go).await? {
            None => Ok(()),
            Some(other) => Err(Error::protocol(format!("unexpected answer to NBD_OPT_GO: {other:?}"))),
        }
    }

    /// `nbd_opt_abort`: ends the connection politely (the handle is then closed).
    pub async fn opt_abort(&self) -> Result<()> {
        self.opt(OptRequest::Abort).await.map(|_| ())
    }

    /// `nbd_opt_info`: the export's details, after which the getters report them.
    pub async fn opt_info(&self) -> Result<ExportInfo> {
        match self.opt(OptRequest::Info).await? {
            Some(OptReply::Info(info)) => Ok(info),
            other => Err(Error::protocol(format!("unexpected answer to NBD_OPT_INFO: {other:?}"))),
        }
    }

    /// `nbd_opt_list`: the server's exports.
    pub async fn opt_list(&self) -> Result<Vec<ExportEntry>> {
        match self.opt(OptRequest::List).await? {
            Some(OptReply::List(list)) => Ok(list),
            other => Err(Error::protocol(format!("unexpected answer to NBD_OPT_LIST: {other:?}"))),
        }
    }

    /// `nbd_opt_list_meta_context(_queries)`: the contexts the server offers for the
    /// export (for `queries`, or the configured contexts).
    pub async fn opt_list_meta_context(&self, queries: Option<Vec<String>>) -> Result<Vec<String>> {
        check_queries(&queries)?;
        match self.opt(OptRequest::ListMetaContext(queries)).await? {
            Some(OptReply::MetaContexts(names)) => Ok(names),
            other => Err(Error::protocol(format!(
                "unexpected answer to NBD_OPT_LIST_META_CONTEXT: {other:?}"
            ))),
        }
    }

    /// `nbd_opt_set_meta_context(_queries)`: the contexts the server agreed to.
    pub async fn opt_set_meta_context(&self, queries: Option<Vec<String>>) -> Result<Vec<String>> {
        check_queries(&queries)?;
        match self.opt(OptRequest::SetMetaContext(queries)).await? {
            Some(OptReply::MetaContexts(names)) => Ok(names),
            other => Err(Error::protocol(format!(
                "unexpected answer to NBD_OPT_SET_META_CONTEXT: {other:?}"
            ))),
        }
    }

    async fn opt_bool(&self, req: OptRequest) -> Result<bool> {
        match self.opt(req).await? {
            Some(OptReply::Agreed(yes)) => Ok(yes),
            other => Err(Error::protocol(format!("unexpected option answer: {other:?}"))),
        }
    }

    /// `nbd_opt_structured_reply`.
    pub async fn opt_structured_reply(&self) -> Result<bool> {
        self.opt_bool(OptRequest::StructuredReply).await
    }

    /// `nbd_opt_extended_headers`.
    pub async fn opt_extended_headers(&self) -> Result<bool> {
        self.opt_bool(OptRequest::ExtendedHeaders).await
    }

    /// `nbd_opt_starttls`.
    pub async fn opt_starttls(&self) -> Result<bool> {
        self.opt_bool(OptRequest::StartTls).await
    }

    // ---- commands ----
    //
    // Every command goes through `submit`, which checks and queues it at once on the calling
    // thread; the async forms wait for its callback.

    /// `nbd_pread` into a new buffer of `count` bytes.
    pub async fn pread(&self, count: u64, offset: u64, flags: u32, cancel: Option<CancelToken>) -> Result<Vec<u8>> {
        let reply = self.run(Op::Read { count, offset, flags }, cancel).await?;
        Ok(reply.data.expect("a read completes with its buffer"))
    }

    /// `nbd_pread_structured`: the data and the chunks the server sent it in.
    pub async fn pread_structured(
        &self,
        count: u64,
        offset: u64,
        flags: u32,
        cancel: Option<CancelToken>,
    ) -> Result<(Vec<u8>, Vec<nbd_proto::transmission::ReadChunk>)> {
        let reply = self.run(Op::ReadStructured { count, offset, flags }, cancel).await?;
        let chunks = match reply.detail {
            Detail::Chunks(c) => c,
            _ => Vec::new(),
        };
        Ok((reply.data.expect("a read completes with its buffer"), chunks))
    }

    /// `nbd_block_status_64` (all negotiated contexts) or `nbd_block_status_filter`
    /// (`contexts`): extents per context.
    pub async fn block_status(
        &self,
        count: u64,
        offset: u64,
        flags: u32,
        contexts: Option<Vec<String>>,
        cancel: Option<CancelToken>,
    ) -> Result<Vec<nbd_proto::transmission::ContextExtents>> {
        let op = Op::BlockStatus { count, offset, flags, contexts };
        match self.run(op, cancel).await?.detail {
            Detail::Extents(e) => Ok(e),
            _ => Ok(Vec::new()),
        }
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
    async fn run(&self, op: Op, cancel: Option<CancelToken>) -> Result<Reply> {
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
    /// many commands through one notification channel.
    pub fn submit(
        &self,
        op: Op,
        cancel: Option<CancelToken>,
        done: impl FnOnce(Result<Reply>) + Send + 'static,
    ) -> Result<()> {
        let mut tracking = Tracking::default();
        let mut filter: Option<Vec<String>> = None;
        let (cmd, mut payload) = match op {
            Op::Read { count, offset, flags } => (
                command(CommandKind::Read, offset, count, flags),
                Payload::None,
            ),
            Op::ReadStructured { count, offset, flags } => {
                tracking.record_chunks = true;
                (command(CommandKind::Read, offset, count, flags), Payload::None)
            }
            Op::BlockStatus {
                count,
                offset,
                flags,
                contexts,
            } => {
                filter = contexts;
                (command(CommandKind::BlockStatus, offset, count, flags), Payload::None)
            }
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
        let (requests, lifeline, flags, session) = self.checked(&cmd)?;
        if let Some(names) = &filter {
            let strict = self.inner.strict.load(Ordering::Relaxed);
            tracking.filter = Some(session.block_status_filter(names, strict)?);
        }
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
        let callback: Callback = Box::new(move |r: Result<Completed>| {
            done(r.map(|c| Reply {
                data: match c.payload {
                    Payload::ReadOwned(v) => Some(v),
                    _ => None,
                },
                detail: c.detail,
            }))
        });
        let request = Request::Command(CommandRequest {
            guard: InFlightGuard::new(&self.inner.shared),
            cmd,
            flags,
            tracking,
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
    #[allow(clippy::type_complexity)]
    fn checked(
        &self,
        cmd: &Command,
    ) -> Result<(mpsc::UnboundedSender<Request>, Arc<Lifeline>, u16, Arc<Session>)> {
        let state = self.state();
        state::ensure_allowed(Call::Command, state)?;
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
        let flags = session.strict(self.inner.strict.load(Ordering::Relaxed)).check(cmd)?;
        Ok((requests, lifeline, flags, session))
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
        if self.inner.debug_on.load(Ordering::Relaxed) {
            (self.debug_hub().sink)("close", "closing handle");
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
        drop(self.inner.child.lock().unwrap_or_else(|p| p.into_inner()).take());
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

fn closed_while_connecting() -> Error {
    Error::new(
        nbd_proto::Fault::Cancelled,
        Errno::ECANCELED,
        "the handle was closed while connecting",
    )
}

fn check_queries(queries: &Option<Vec<String>>) -> Result<()> {
    for q in queries.iter().flatten() {
        check_string("meta context query", q)?;
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

/// Runs the handshake machine over `stream` until it needs the application (ready,
/// negotiating, an option answer); starts TLS on the way when the machine asks. A failed
/// handshake is an error.
async fn drive(
    mut stream: Stream,
    hs: &mut Handshake,
    shared: &Shared,
    debug: &Option<DebugSink>,
    tls: &TlsParams,
) -> Result<(Stream, Outcome)> {
    loop {
        match exchange(&mut stream, hs, shared, debug).await? {
            Outcome::StartTls => {
                if let Some(debug) = debug {
                    debug("handshake", "server accepted NBD_OPT_STARTTLS; starting the TLS handshake");
                }
                stream = tls_upgrade(stream, tls).await?;
                if let Some(debug) = debug {
                    debug("handshake", "TLS handshake done");
                }
                hs.tls_done();
            }
            Outcome::Failed(e) => return Err(e),
            other => return Ok((stream, other)),
        }
    }
}

/// What the TLS handshake needs: the settings and the host connected to (for checking the
/// server's certificate).
#[derive(Clone)]
struct TlsParams {
    settings: crate::tls::TlsSettings,
    host: Option<String>,
}

impl TlsParams {
    fn new(config: &Config, target: Option<&UriTransport>) -> TlsParams {
        TlsParams {
            settings: crate::tls::TlsSettings {
                mode: config.tls,
                certificates: config.tls_certificates.clone().map(Into::into),
                verify_peer: config.tls_verify_peer,
                username: config.tls_username.clone(),
                psk_file: config.tls_psk_file.clone().map(Into::into),
                hostname: config.tls_hostname.clone(),
            },
            host: match target {
                Some(UriTransport::Tcp { host, .. }) => Some(host.clone()),
                _ => None,
            },
        }
    }
}

/// Runs the TLS handshake over `stream` (after the server accepted STARTTLS); the
/// connection goes on over TLS.
async fn tls_upgrade(stream: Stream, tls: &TlsParams) -> Result<Stream> {
    let params = tls.clone();
    // Reading keys and certificates is file IO: keep it off the runtime's threads.
    let connector = tokio::task::spawn_blocking(move || {
        crate::tls::TlsConnector::new(&params.settings, params.host.as_deref())
    })
    .await
    .map_err(|e| Error::io(Errno::EIO, format!("preparing TLS: {e}")))??;
    let tls_stream = connector.connect(stream).await?;
    Ok(Stream::Layered(Box::new(tls_stream)))
}

/// Hands the machine's debug messages to the sink (they are only gathered with debug on).
fn forward_debug(hs: &mut Handshake, debug: &Option<DebugSink>) {
    if let Some(debug) = debug {
        for message in hs.take_debug() {
            debug("handshake", &message);
        }
    }
}

/// Sends what the machine has to send and feeds it what the server says, until the
/// machine has an outcome.
async fn exchange(
    stream: &mut Stream,
    hs: &mut Handshake,
    shared: &Shared,
    debug: &Option<DebugSink>,
) -> Result<Outcome> {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        forward_debug(hs, debug);
        let out = hs.poll_transmit();
        if !out.is_empty() {
            stream
                .write_all(&out)
                .await
                .map_err(|e| io_error("sending the handshake", e))?;
            shared.bytes_sent.fetch_add(out.len() as u64, Ordering::Relaxed);
            shared.chunks_sent.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(outcome) = hs.poll_event() {
            forward_debug(hs, debug);
            return Ok(outcome);
        }
        let n = stream
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
