//! Connecting, as steps that each return the next phase of the connection:
//!
//! 1. the transport step ([`open`]): from a [`Target`] (where to connect) to an open
//!    socket ([`Opened`]), starting the server process first for the subprocess targets;
//! 2. the handshake step ([`handshake`]): from the socket's [`Stream`] to a connection in
//!    transmission ([`Ready`]) or in option negotiation ([`Negotiation`]), with TLS started
//!    on the way when the handshake asks for it;
//! 3. in option negotiation, each option request ([`Negotiation::answer`]) is a step from
//!    negotiation to the next phase ([`OptStep`]).
//!
//! The steps hold no state of their own and touch no handle: the handle runs them, keeps
//! what they return, and decides what the application sees. A target can be opened again,
//! so a later reconnect runs the same steps from the same [`Target`].

use std::os::fd::OwnedFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use nbd_proto::handshake::{Handshake, Negotiated, OptReply, OptRequest, Outcome, Protocol};
use nbd_proto::{Errno, Error, Result};

use crate::driver::{Counters, DebugSink};
use crate::settings::NegotiationSettings;
use crate::tls::TlsSettings;
use crate::transport::subprocess::{self, Child};
use crate::transport::{io_error, tcp, unix, vsock, Stream};

/// Where a connection goes: what the transport step opens. (A socket the application hands
/// over is already open and skips the step.)
#[derive(Debug, Clone)]
pub(crate) enum Target {
    /// A Unix domain socket at `path`.
    Unix { path: String },
    /// A TCP server; `port` is a number or a service name.
    Tcp { host: String, port: String },
    /// An AF_VSOCK server.
    Vsock { cid: u32, port: u32 },
    /// A server started with `argv`, talking NBD on its stdin and stdout.
    Command { argv: Vec<String> },
    /// A server started with `argv` and a listening socket (systemd socket activation,
    /// `LISTEN_FDNAMES` = `name`).
    SocketActivation { argv: Vec<String>, name: String },
}

/// What the transport step opened: the socket, and the server process when the target
/// started one.
pub(crate) struct Opened {
    pub socket: OwnedFd,
    pub child: Option<Child>,
}

/// The transport step: opens `target`.
pub(crate) async fn open(target: Target) -> Result<Opened> {
    let socket = match target {
        Target::Unix { path } => unix::connect_unix(&path).await?,
        Target::Tcp { host, port } => tcp::connect_tcp(&host, &port).await?,
        Target::Vsock { cid, port } => vsock::connect_vsock(cid, port).await?,
        Target::Command { argv } => return spawn(move || subprocess::spawn_command(&argv)).await,
        Target::SocketActivation { argv, name } => {
            return spawn(move || subprocess::spawn_socket_activation_named(&argv, &name)).await
        }
    };
    Ok(Opened { socket, child: None })
}

/// Starts a server process (fork and exec block: off the runtime's threads).
async fn spawn(start: impl FnOnce() -> Result<(OwnedFd, Child)> + Send + 'static) -> Result<Opened> {
    let (socket, child) = tokio::task::spawn_blocking(start)
        .await
        .map_err(|e| Error::io(Errno::EIO, format!("starting the server process: {e}")))??;
    Ok(Opened {
        socket,
        child: Some(child),
    })
}

/// What the handshake steps need from the handle: where the byte counts go, where debug
/// messages go, and what TLS needs.
pub(crate) struct Link {
    pub counters: Arc<Counters>,
    pub debug: Option<DebugSink>,
    pub tls: TlsParams,
}

/// What the TLS handshake needs: the settings and the host connected to (for checking the
/// server's certificate).
#[derive(Clone)]
pub(crate) struct TlsParams {
    pub settings: TlsSettings,
    pub host: Option<String>,
}

/// A connection whose handshake is done: ready for a driver.
pub(crate) struct Ready {
    pub stream: Stream,
    pub negotiated: Negotiated,
    /// Bytes the handshake read past its end (the start of the first reply).
    pub early: Vec<u8>,
}

impl Ready {
    /// The connection `hs` has just handed over to transmission.
    fn new(hs: &mut Handshake, stream: Stream, negotiated: Negotiated) -> Ready {
        Ready {
            early: hs.take_leftover(),
            stream,
            negotiated,
        }
    }
}

/// A connection in option negotiation, between option requests. The handshake machine
/// keeps what has been learned (the export's details from `NBD_OPT_INFO`, meta contexts).
pub(crate) struct Negotiation {
    pub hs: Handshake,
    stream: Stream,
}

/// Where the handshake step ends.
pub(crate) enum Handshaken {
    Ready(Ready),
    Negotiating(Box<Negotiation>),
}

/// Where an option request ends.
pub(crate) enum OptStep {
    /// `NBD_OPT_GO` succeeded: transmission.
    Ready(Ready),
    /// The server answered; negotiation goes on.
    Answered(Box<Negotiation>, Result<OptReply>),
    /// `NBD_OPT_ABORT` was sent; `newstyle` when the server speaks plain newstyle, which knows
    /// no `NBD_OPT_ABORT` (the connection was just dropped).
    Aborted { newstyle: bool },
}

/// The handshake step: runs the handshake with `settings` over `stream`.
pub(crate) async fn handshake(stream: Stream, settings: NegotiationSettings, link: &Link) -> Result<Handshaken> {
    let mut hs = Handshake::new(settings);
    let (stream, outcome) = drive(stream, &mut hs, link).await?;
    match outcome {
        Outcome::Ready(negotiated) => Ok(Handshaken::Ready(Ready::new(&mut hs, stream, negotiated))),
        Outcome::Negotiating => Ok(Handshaken::Negotiating(Box::new(Negotiation { hs, stream }))),
        other => Err(Error::protocol(format!("handshake stopped unexpectedly at {other:?}"))),
    }
}

impl Negotiation {
    /// Starts option request `req`; refused at once (and nothing sent) when the machine
    /// cannot make it now.
    pub(crate) fn begin(&mut self, req: OptRequest) -> Result<()> {
        self.hs.request(req)
    }

    /// Runs the request started by [`Negotiation::begin`] to its answer.
    pub(crate) async fn answer(self, link: &Link) -> Result<OptStep> {
        let Negotiation { mut hs, stream } = self;
        let (stream, outcome) = drive(stream, &mut hs, link).await?;
        match outcome {
            Outcome::Ready(negotiated) => Ok(OptStep::Ready(Ready::new(&mut hs, stream, negotiated))),
            Outcome::Reply(Ok(OptReply::Aborted)) => Ok(OptStep::Aborted {
                newstyle: hs.protocol() == Some(Protocol::Newstyle),
            }),
            Outcome::Reply(answer) => Ok(OptStep::Answered(Box::new(Negotiation { hs, stream }), answer)),
            other => Err(Error::protocol(format!("option negotiation stopped unexpectedly at {other:?}"))),
        }
    }
}

/// Runs the handshake machine over `stream` until it needs the application (ready,
/// negotiating, an option answer); starts TLS on the way when the machine asks. A failed
/// handshake is an error.
async fn drive(mut stream: Stream, hs: &mut Handshake, link: &Link) -> Result<(Stream, Outcome)> {
    loop {
        match exchange(&mut stream, hs, link).await? {
            Outcome::StartTls => {
                if let Some(debug) = &link.debug {
                    debug("handshake", "server accepted NBD_OPT_STARTTLS; starting the TLS handshake");
                }
                let (upgraded, session) = tls_upgrade(stream, &link.tls).await?;
                stream = upgraded;
                if let Some(debug) = &link.debug {
                    debug("handshake", &format!("TLS handshake done: {session}"));
                }
                hs.tls_done();
            }
            Outcome::Failed(e) => return Err(e),
            other => return Ok((stream, other)),
        }
    }
}

/// Runs the TLS handshake over `stream` (after the server accepted STARTTLS); the
/// connection goes on over TLS. Also says what was agreed (protocol version and cipher
/// suite), for the debug message.
async fn tls_upgrade(stream: Stream, tls: &TlsParams) -> Result<(Stream, String)> {
    let params = tls.clone();
    // Reading keys and certificates is file IO: keep it off the runtime's threads.
    let connector = tokio::task::spawn_blocking(move || {
        crate::tls::TlsConnector::new(&params.settings, params.host.as_deref())
    })
    .await
    .map_err(|e| Error::io(Errno::EIO, format!("preparing TLS: {e}")))??;
    let tls_stream = connector.connect(stream).await?;
    let session = format!(
        "{}, cipher suite {}",
        tls_stream.protocol_version(),
        tls_stream.cipher().unwrap_or("unknown")
    );
    Ok((Stream::Layered(Box::new(tls_stream)), session))
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
async fn exchange(stream: &mut Stream, hs: &mut Handshake, link: &Link) -> Result<Outcome> {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        forward_debug(hs, &link.debug);
        let out = hs.poll_transmit();
        if !out.is_empty() {
            stream
                .write_all(&out)
                .await
                .map_err(|e| io_error("sending the handshake", e))?;
            link.counters.sent(out.len() as u64);
        }
        if let Some(outcome) = hs.poll_event() {
            forward_debug(hs, &link.debug);
            return Ok(outcome);
        }
        let n = stream
            .read(&mut buf)
            .await
            .map_err(|e| io_error("reading the handshake", e))?;
        link.counters.bytes_received.fetch_add(n as u64, Ordering::Relaxed);
        if n == 0 {
            hs.handle_eof();
        } else {
            link.counters.chunks_received.fetch_add(1, Ordering::Relaxed);
            hs.handle_input(&buf[..n]);
        }
    }
}
