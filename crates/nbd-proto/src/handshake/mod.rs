//! The client side of the NBD handshake, as a sans-IO state machine.
//!
//! # Driving it
//!
//! ```text
//! let mut hs = Handshake::new(config);
//! loop {
//!     write_all(hs.poll_transmit());           // bytes to send, maybe none
//!     match hs.poll_event() {
//!         Some(Outcome::Ready(negotiated)) => break,          // transmission phase
//!         Some(Outcome::Negotiating) => wait for the application's option request,
//!                                       then hs.request(OptRequest::…),
//!         Some(Outcome::Reply(answer)) => hand the answer to the application,
//!         Some(Outcome::StartTls) => upgrade the transport to TLS, then hs.tls_done(),
//!         Some(Outcome::Failed(error)) => give up,
//!         None => match read(&mut buf) {
//!             0 => hs.handle_eof(),            // the server hung up
//!             n => hs.handle_input(&buf[..n]),
//!         },
//!     }
//! }
//! let early = hs.take_leftover();              // bytes read past the handshake, if any
//! ```
//!
//! The machine understands oldstyle, plain newstyle and fixed newstyle servers. With fixed
//! newstyle it first negotiates, as configured, TLS (`NBD_OPT_STARTTLS`), extended headers
//! and structured replies. In option mode (`opt_mode`) it then stops and waits for option
//! requests from the application ([`OptRequest`]); otherwise it sets the meta contexts
//! (when asked for) and sends `NBD_OPT_GO`, falling back to `NBD_OPT_EXPORT_NAME` when the
//! server answers `NBD_REP_ERR_UNSUP`. Every length the server announces is checked against
//! a limit before the bytes are awaited.
//!
//! # Where things are
//!
//! * `config.rs`: what the client asks for ([`HandshakeConfig`], [`TlsMode`]);
//! * `negotiated.rs`: the finished values the handshake hands on ([`Negotiated`],
//!   [`ExportInfo`], [`MetaContext`], [`ExportEntry`]);
//! * `steps.rs`: the steps of the machine, each owning what it gathers from the server's
//!   replies until the reply that finishes it (nothing partial is kept beside them);
//! * `options.rs`: the option requests sent ([`OptRequest`], [`OptReply`]);
//! * `replies.rs`: the option replies read;
//! * this file: the machine ([`Handshake`]), its driving API and the greetings.

mod config;
mod negotiated;
mod options;
mod replies;
mod steps;

pub use config::{HandshakeConfig, TlsMode};
pub use negotiated::{BlockSize, ExportEntry, ExportInfo, MetaContext, Negotiated, Protocol};
pub use options::{OptReply, OptRequest};

use crate::consts::*;
use crate::errno::Errno;
use crate::error::{Error, Result};
use crate::wire::{put_u32, FieldReader};

use steps::{export_info, Awaiting, MetaAnswer, Purpose, Settled, Step};

/// What the driver must do next; see the module documentation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The handshake is over: transmission begins.
    Ready(Negotiated),
    /// Option mode: waiting for [`Handshake::request`].
    Negotiating,
    /// The server accepted `NBD_OPT_STARTTLS`: run the TLS handshake on the transport,
    /// then call [`Handshake::tls_done`].
    StartTls,
    /// The answer to an option request; the machine waits for the next one. A failed
    /// option leaves the connection usable.
    Reply(Result<OptReply>),
    /// The handshake failed; the connection is unusable.
    Failed(Error),
}

/// The handshake state machine. See the module documentation for how to drive it.
///
/// Besides the step it is in (which owns any reply data being gathered), it keeps only
/// finished values: what the connection has settled, the configured export's details from
/// the last `NBD_OPT_INFO`, and the meta contexts the server agreed to.
#[derive(Debug)]
pub struct Handshake {
    config: HandshakeConfig,
    step: Step,
    input: Vec<u8>,
    output: Vec<u8>,
    client_flags: u32,
    protocol: Option<Protocol>,
    settled: Settled,
    /// The configured export's details from the last successful `NBD_OPT_INFO`; forgotten
    /// when the export name changes, when GO/INFO is refused and after STARTTLS.
    known: Option<ExportInfo>,
    /// The meta contexts of the last SET_META_CONTEXT (or the empty answer when none was
    /// needed); `None` when not negotiated.
    meta: Option<MetaAnswer>,
    outcome: Option<Outcome>,
    debug: Vec<String>,
}

/// Bytes of the oldstyle greeting after the first 16.
const OLDSTYLE_REST: usize = 8 + 2 + 2 + 124;

impl Handshake {
    /// A machine that waits for the server's greeting.
    pub fn new(config: HandshakeConfig) -> Handshake {
        Handshake {
            config,
            step: Step::Greeting,
            input: Vec::new(),
            output: Vec::new(),
            client_flags: 0,
            protocol: None,
            settled: Settled::default(),
            known: None,
            meta: None,
            outcome: None,
            debug: Vec::new(),
        }
    }
    /// The settings, which option mode may change between requests (export name, meta
    /// contexts, info requests).
    pub fn config(&self) -> &HandshakeConfig {
        &self.config
    }

    /// Changes settings between option requests.
    pub fn config_mut(&mut self) -> &mut HandshakeConfig {
        &mut self.config
    }

    /// Feeds bytes read from the server.
    pub fn handle_input(&mut self, data: &[u8]) {
        self.input.extend_from_slice(data);
        self.run();
    }

    fn run(&mut self) {
        while self.outcome.is_none() {
            match self.advance() {
                Ok(true) => {}
                Ok(false) => break,
                Err(e) => self.fail(e),
            }
        }
    }

    /// Reports that the server closed the connection.
    pub fn handle_eof(&mut self) {
        if self.outcome.is_some() {
            return;
        }
        let waiting = match &self.step {
            Step::Greeting | Step::NewstyleFlags | Step::Oldstyle => {
                "the server closed the connection before completing its greeting".to_string()
            }
            Step::OptionReply(Awaiting { purpose: Purpose::Abort, .. }) => {
                // Hanging up is a fine answer to NBD_OPT_ABORT.
                self.aborted();
                return;
            }
            Step::OptionReply(Awaiting { option, .. }) => format!(
                "the server closed the connection instead of answering {}",
                option_name(*option)
            ),
            Step::ExportNameReply => format!(
                "the server closed the connection after NBD_OPT_EXPORT_NAME; \
                 it probably has no export named {:?}",
                self.config.export_name
            ),
            Step::Tls { .. } | Step::Negotiating => {
                "the server closed the connection during option negotiation".to_string()
            }
            Step::Finished => return,
        };
        self.fail(Error::io(Errno::ECONNRESET, waiting));
    }

    /// Bytes to send to the server now (empty when there is nothing to send).
    pub fn poll_transmit(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.output)
    }

    /// What the driver must do next, once per event.
    pub fn poll_event(&mut self) -> Option<Outcome> {
        self.outcome.take()
    }

    /// The end of a handshake without option mode or TLS: `Some` once, when it has
    /// finished or failed. (Other events are left for [`Handshake::poll_event`].)
    pub fn poll_outcome(&mut self) -> Option<Result<Negotiated>> {
        match self.outcome.take()? {
            Outcome::Ready(n) => Some(Ok(n)),
            Outcome::Failed(e) => Some(Err(e)),
            other => {
                self.outcome = Some(other);
                None
            }
        }
    }

    /// Bytes received after the end of the handshake (they belong to the transmission phase).
    pub fn take_leftover(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.input)
    }

    /// Debug messages gathered since the last call (only with `config.debug`).
    pub fn take_debug(&mut self) -> Vec<String> {
        std::mem::take(&mut self.debug)
    }

    /// The handshake style the server spoke, once its greeting is in.
    pub fn protocol(&self) -> Option<Protocol> {
        self.protocol
    }

    /// True while waiting for an option request.
    pub fn is_negotiating(&self) -> bool {
        matches!(self.step, Step::Negotiating) && self.outcome.is_none()
    }

    /// True once the handshake is over (ready, failed or aborted).
    pub fn is_finished(&self) -> bool {
        matches!(self.step, Step::Finished)
    }

    /// What has been negotiated so far (export details as of the last `NBD_OPT_INFO`,
    /// when `export` is given).
    pub fn negotiated(&self, export: ExportInfo) -> Negotiated {
        let meta = match &self.meta {
            Some(m) if m.export == self.config.export_name => Some(m.contexts.clone()),
            _ => None,
        };
        Negotiated {
            protocol: self.protocol.unwrap_or(Protocol::FixedNewstyle),
            structured_replies: self.settled.structured_replies,
            extended_headers: self.settled.extended_headers,
            tls: self.settled.tls,
            export,
            meta_valid: meta.is_some(),
            meta_contexts: meta.unwrap_or_default(),
        }
    }

    /// The configured export's details, once a successful `NBD_OPT_INFO` has told them
    /// (option mode), with everything else negotiated so far.
    pub fn export_known(&self) -> Option<Negotiated> {
        self.known.clone().map(|export| self.negotiated(export))
    }

    /// Changes the export to ask about (option mode, between requests). The same name is
    /// a no-op; another name forgets what was learned about the previous export (its
    /// details and its meta contexts), as libnbd's `nbd_set_export_name`.
    pub fn set_export_name(&mut self, name: &str) {
        if self.config.export_name == name {
            return;
        }
        self.config.export_name = name.to_string();
        self.known = None;
        self.meta = None;
    }

    /// The server has described the export (GO/INFO acknowledged, or EXPORT_NAME/oldstyle
    /// answered): when no SET_META_CONTEXT was needed (none requested, or no structured
    /// replies to carry them), the empty set of contexts is the final answer.
    fn export_described(&mut self) {
        if self.meta.is_none()
            && self.config.request_meta_context
            && (!self.settled.structured_replies || self.config.meta_contexts.is_empty())
        {
            self.set_meta_answer(Vec::new());
        }
    }

    /// Forgets what is tied to the plaintext part of the connection or to a refused export.
    fn forget_export(&mut self) {
        self.known = None;
        self.meta = None;
    }

    /// Reports that the TLS handshake the machine asked for with [`Outcome::StartTls`]
    /// has succeeded; the handshake continues over TLS.
    pub fn tls_done(&mut self) {
        let Step::Tls { auto } = self.step else { return };
        self.settled.tls = true;
        self.log(|| "TLS is running".to_string());
        if auto {
            if let Err(e) = self.continue_auto() {
                self.fail(e);
            }
        } else {
            self.reply(Ok(OptReply::Agreed(true)));
        }
        self.run();
    }

    fn log(&mut self, message: impl FnOnce() -> String + 'static) {
        if self.config.debug {
            let m = message();
            self.debug.push(m);
        }
    }

    fn fail(&mut self, e: Error) {
        self.step = Step::Finished;
        self.log_error(&e);
        self.outcome = Some(Outcome::Failed(e));
    }

    fn log_error(&mut self, e: &Error) {
        if self.config.debug {
            self.debug.push(format!("handshake failed: {}", e.message()));
        }
    }

    /// Answers an option request and waits for the next.
    fn reply(&mut self, answer: Result<OptReply>) {
        self.step = Step::Negotiating;
        self.outcome = Some(Outcome::Reply(answer));
    }

    /// `NBD_OPT_ABORT` answered (or needing no answer): the connection is over.
    fn aborted(&mut self) {
        self.step = Step::Finished;
        self.outcome = Some(Outcome::Reply(Ok(OptReply::Aborted)));
    }

    fn finish(&mut self, export: ExportInfo) {
        self.step = Step::Finished;
        let negotiated = self.negotiated(export);
        if self.config.debug {
            self.debug.push(format!(
                "handshake done: {} protocol, export size {}, flags {:#x}, structured replies {}, \
                 extended headers {}, meta contexts {:?}",
                negotiated.protocol.name(),
                negotiated.export.size,
                negotiated.export.flags,
                negotiated.structured_replies,
                negotiated.extended_headers,
                negotiated.meta_contexts.iter().map(|m| m.name.as_str()).collect::<Vec<_>>()
            ));
        }
        self.outcome = Some(Outcome::Ready(negotiated));
    }

    /// Removes `n` bytes from the front of the input if they are there.
    fn consume(&mut self, n: usize) -> Option<Vec<u8>> {
        if self.input.len() < n {
            return None;
        }
        let rest = self.input.split_off(n);
        Some(std::mem::replace(&mut self.input, rest))
    }

    /// One step; `Ok(false)` when more input is needed.
    fn advance(&mut self) -> Result<bool> {
        match self.step {
            Step::Greeting => self.greeting(),
            Step::Oldstyle => self.oldstyle(),
            Step::NewstyleFlags => self.newstyle_flags(),
            Step::OptionReply(_) => self.option_reply(),
            Step::ExportNameReply => self.export_name_reply(),
            Step::Tls { .. } | Step::Negotiating | Step::Finished => Ok(false),
        }
    }

    /// NBDMAGIC, then the magic that says which handshake style follows.
    fn greeting(&mut self) -> Result<bool> {
        let Some(b) = self.consume(16) else { return Ok(false) };
        let mut r = FieldReader::new(&b);
        if r.u64() != Some(NBDMAGIC) {
            return Err(Error::protocol(
                "the peer is not an NBD server (its greeting lacks NBDMAGIC)",
            ));
        }
        match r.u64() {
            Some(IHAVEOPT) => self.step = Step::NewstyleFlags,
            Some(OLDSTYLE_MAGIC) => self.step = Step::Oldstyle,
            Some(other) => {
                return Err(Error::protocol(format!(
                    "unknown handshake magic {other:#018x} after NBDMAGIC"
                )))
            }
            None => unreachable!(),
        }
        Ok(true)
    }

    /// The rest of an oldstyle greeting: the export, and the end of the handshake.
    fn oldstyle(&mut self) -> Result<bool> {
        let Some(b) = self.consume(OLDSTYLE_REST) else { return Ok(false) };
        let mut r = FieldReader::new(&b);
        let size = r.u64().unwrap();
        let _global_flags = r.u16().unwrap();
        let flags = r.u16().unwrap();
        self.protocol = Some(Protocol::Oldstyle);
        self.log(|| "server speaks the oldstyle handshake".to_string());
        self.refuse_without_tls("an oldstyle server")?;
        let export = export_info(size, flags)?;
        self.export_described();
        self.finish(export);
        Ok(true)
    }

    /// The newstyle server's flags: answer with the client's, then negotiate (fixed
    /// newstyle) or send the export name (plain newstyle).
    fn newstyle_flags(&mut self) -> Result<bool> {
        let Some(b) = self.consume(2) else { return Ok(false) };
        let server_flags = u16::from_be_bytes([b[0], b[1]]) as u32;
        self.client_flags = server_flags & self.config.handshake_flags & 0x3;
        put_u32(&mut self.output, self.client_flags);
        if self.client_flags & FLAG_C_FIXED_NEWSTYLE != 0 {
            self.protocol = Some(Protocol::FixedNewstyle);
            self.continue_auto()?;
            return Ok(true);
        }
        self.protocol = Some(Protocol::Newstyle);
        self.refuse_without_tls("a server without fixed newstyle negotiation")?;
        if self.config.opt_mode {
            // Nothing can be negotiated, but option mode still stops here (libnbd does):
            // the export name may change before optGo.
            self.step = Step::Negotiating;
            self.log(|| "option mode: negotiating (plain newstyle server)".to_string());
            self.outcome = Some(Outcome::Negotiating);
        } else {
            self.send_export_name()?;
        }
        Ok(true)
    }

    /// The answer to `NBD_OPT_EXPORT_NAME`: the export, and the end of the handshake.
    fn export_name_reply(&mut self) -> Result<bool> {
        let zeroes = if self.client_flags & FLAG_C_NO_ZEROES != 0 { 0 } else { 124 };
        let Some(b) = self.consume(10 + zeroes) else { return Ok(false) };
        let mut r = FieldReader::new(&b);
        let size = r.u64().unwrap();
        let flags = r.u16().unwrap();
        let export = export_info(size, flags)?;
        // Contexts set before a GO that fell back here stay, as in libnbd.
        self.export_described();
        self.finish(export);
        Ok(true)
    }
}
