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


use crate::consts::*;
use crate::errno::Errno;
use crate::error::{Error, Result};
use crate::wire::{put_u16, put_u32, put_u64, server_text, Reader};

/// Whether to use TLS (libnbd's `nbd_set_tls`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsMode {
    /// Never (the default).
    #[default]
    Disable,
    /// When the server agrees; plaintext when it refuses.
    Allow,
    /// Always: fail when the server cannot.
    Require,
}

impl TlsMode {
    /// libnbd's name for it.
    pub fn name(self) -> &'static str {
        match self {
            TlsMode::Disable => "disable",
            TlsMode::Allow => "allow",
            TlsMode::Require => "require",
        }
    }
}

/// What the client asks for during the handshake.
#[derive(Debug, Clone)]
pub struct HandshakeConfig {
    /// The export to attach to.
    pub export_name: String,
    /// Send `NBD_OPT_STRUCTURED_REPLY` (when extended headers are not negotiated).
    pub request_structured_replies: bool,
    /// Send `NBD_OPT_EXTENDED_HEADERS` first (ignored without `request_structured_replies`).
    pub request_extended_headers: bool,
    /// Request `NBD_INFO_BLOCK_SIZE` in `NBD_OPT_GO`/`NBD_OPT_INFO`.
    pub request_block_size: bool,
    /// Request `NBD_INFO_NAME` and `NBD_INFO_DESCRIPTION` in `NBD_OPT_GO`/`NBD_OPT_INFO`.
    pub full_info: bool,
    /// Handshake flags the client is willing to use (`FLAG_C_FIXED_NEWSTYLE`,
    /// `FLAG_C_NO_ZEROES`); the ones sent are these masked by what the server offers.
    pub handshake_flags: u32,
    /// Stop after the first negotiations and wait for [`OptRequest`]s.
    pub opt_mode: bool,
    /// Send `NBD_OPT_SET_META_CONTEXT` before `NBD_OPT_GO`/`NBD_OPT_INFO` when
    /// `meta_contexts` is not empty and structured replies were negotiated.
    pub request_meta_context: bool,
    /// Meta contexts to ask for (`nbd_add_meta_context`).
    pub meta_contexts: Vec<String>,
    /// Whether to negotiate TLS.
    pub tls: TlsMode,
    /// Keep a log of what is sent and received ([`Handshake::take_debug`]).
    pub debug: bool,
}

impl Default for HandshakeConfig {
    fn default() -> Self {
        HandshakeConfig {
            export_name: String::new(),
            request_structured_replies: true,
            request_extended_headers: true,
            request_block_size: true,
            full_info: false,
            handshake_flags: FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES,
            opt_mode: false,
            request_meta_context: true,
            meta_contexts: Vec::new(),
            tls: TlsMode::Disable,
            debug: false,
        }
    }
}

/// The handshake style the server spoke.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Oldstyle,
    Newstyle,
    FixedNewstyle,
}

impl Protocol {
    /// libnbd's name for it (`nbd_get_protocol`).
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Oldstyle => "oldstyle",
            Protocol::Newstyle => "newstyle",
            Protocol::FixedNewstyle => "newstyle-fixed",
        }
    }
}

/// Block size constraints advertised with `NBD_INFO_BLOCK_SIZE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSize {
    pub minimum: u32,
    pub preferred: u32,
    pub maximum: u32,
}

/// What the server told about the export.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExportInfo {
    /// Size in bytes (never above `i64::MAX`: larger sizes are refused as a protocol error).
    pub size: u64,
    /// Transmission flags (`FLAG_*`); zero when the server did not set `FLAG_HAS_FLAGS`.
    pub flags: u16,
    /// Block size constraints, when the server sent them.
    pub block_size: Option<BlockSize>,
    /// The canonical name, when the server sent `NBD_INFO_NAME`.
    pub canonical_name: Option<String>,
    /// The description, when the server sent `NBD_INFO_DESCRIPTION`.
    pub description: Option<String>,
}

impl ExportInfo {
    /// True when the server set transmission flag `flag`.
    pub fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }

    /// The largest read or write payload the client sends in one command: the server's
    /// advertised maximum clamped to 1 MiB–64 MiB, else 32 MiB (as libnbd).
    pub fn payload_max(&self) -> u32 {
        match self.block_size {
            Some(bs) => bs.maximum.clamp(1024 * 1024, MAX_PAYLOAD_HARD),
            None => DEFAULT_PAYLOAD,
        }
    }
}

/// A meta context the server agreed to, with the id its block status replies use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContext {
    pub id: u32,
    pub name: String,
}

/// The result of a successful handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    pub protocol: Protocol,
    pub structured_replies: bool,
    pub extended_headers: bool,
    /// TLS is running on the connection.
    pub tls: bool,
    pub export: ExportInfo,
    /// Meta contexts negotiated for this export (empty when none were asked for).
    pub meta_contexts: Vec<MetaContext>,
    /// Whether `meta_contexts` is the server's answer for this export (libnbd's
    /// `meta_valid`): a `NBD_OPT_SET_META_CONTEXT` succeeded, or the export was entered
    /// without needing one. False after the export name changed, after a refused
    /// `NBD_OPT_GO`/`NBD_OPT_INFO` and after `NBD_OPT_STARTTLS`.
    pub meta_valid: bool,
}

impl Negotiated {
    /// The id of meta context `name`, if it was negotiated.
    pub fn meta_context_id(&self, name: &str) -> Option<u32> {
        self.meta_contexts.iter().find(|m| m.name == name).map(|m| m.id)
    }

    /// `nbd_can_meta_context`: whether `name` was negotiated. When the application asked
    /// for contexts (`requested` is not empty) but the server has not answered for this
    /// export, there is nothing to tell yet: `EINVAL`, as libnbd.
    pub fn can_meta_context(&self, name: &str, requested: &[String]) -> Result<bool> {
        if !requested.is_empty() && !self.meta_valid {
            return Err(Error::usage(
                Errno::EINVAL,
                "need a successful server meta context request first (the contexts asked for \
                 were not negotiated for this export)",
            ));
        }
        Ok(self.meta_context_id(name).is_some())
    }
}

/// One export listed by `NBD_OPT_LIST`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportEntry {
    pub name: String,
    pub description: String,
}

/// An option request in option mode (libnbd's `nbd_opt_*` calls).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OptRequest {
    /// `NBD_OPT_GO` for the configured export (with meta contexts first, as configured).
    Go,
    /// `NBD_OPT_INFO` for the configured export.
    Info,
    /// `NBD_OPT_LIST`.
    List,
    /// `NBD_OPT_LIST_META_CONTEXT` with these queries, or the configured contexts.
    ListMetaContext(Option<Vec<String>>),
    /// `NBD_OPT_SET_META_CONTEXT` with these queries, or the configured contexts.
    SetMetaContext(Option<Vec<String>>),
    /// `NBD_OPT_STRUCTURED_REPLY`.
    StructuredReply,
    /// `NBD_OPT_EXTENDED_HEADERS`.
    ExtendedHeaders,
    /// `NBD_OPT_STARTTLS`.
    StartTls,
    /// `NBD_OPT_ABORT`: end the connection politely.
    Abort,
}

/// The answer to an [`OptRequest`] (`Go` answers with [`Outcome::Ready`] instead).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OptReply {
    Info(ExportInfo),
    List(Vec<ExportEntry>),
    MetaContexts(Vec<String>),
    /// Whether the server agreed (structured replies, extended headers, TLS).
    Agreed(bool),
    /// The server acknowledged `NBD_OPT_ABORT` (or hung up): the connection is over.
    Aborted,
}

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

/// Why an option reply is awaited.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Purpose {
    /// STARTTLS: automatically (true) or by request.
    StartTls { auto: bool },
    ExtendedHeaders { auto: bool },
    StructuredReply { auto: bool },
    /// SET_META_CONTEXT before GO/INFO (`then`), or by request (`then == None`).
    SetMeta { then: Option<u32> },
    ListMeta,
    /// GO or INFO; `auto` when not requested by the application.
    GoInfo { option: u32, auto: bool },
    List,
    Abort,
}

/// Where the machine is: what it waits for next.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    Greeting,
    NewstyleFlags,
    Oldstyle,
    OptionReply { option: u32, purpose: Purpose },
    ExportNameReply,
    /// STARTTLS was accepted; waiting for the driver's TLS handshake.
    Tls { auto: bool },
    /// Option mode: waiting for a request.
    Negotiating,
    Finished,
}

/// Most entries accepted in one list reply (exports, meta contexts).
const MAX_LIST_ENTRIES: usize = 65_536;

/// The handshake state machine. See the module documentation for how to drive it.
#[derive(Debug)]
pub struct Handshake {
    config: HandshakeConfig,
    step: Step,
    input: Vec<u8>,
    output: Vec<u8>,
    client_flags: u32,
    protocol: Option<Protocol>,
    structured_replies: bool,
    extended_headers: bool,
    tls: bool,
    tried_tls: bool,
    tried_extended: bool,
    tried_structured: bool,
    /// INFO_EXPORT of the GO/INFO in progress.
    export: Option<ExportInfo>,
    pending: ExportInfo,
    /// The configured export's details from the last successful `NBD_OPT_INFO`; forgotten
    /// when the export name changes, when GO/INFO is refused and after STARTTLS.
    known: Option<ExportInfo>,
    /// Meta contexts negotiated, for `meta_export`; `None` when not negotiated.
    meta: Option<Vec<MetaContext>>,
    meta_export: String,
    list: Vec<ExportEntry>,
    names: Vec<String>,
    outcome: Option<Outcome>,
    debug: Vec<String>,
}

/// Bytes of the oldstyle greeting after the first 16.
const OLDSTYLE_REST: usize = 8 + 2 + 2 + 124;
/// Bytes of an option reply header.
const OPTION_REPLY_HEADER: usize = 8 + 4 + 4 + 4;

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
            structured_replies: false,
            extended_headers: false,
            tls: false,
            tried_tls: false,
            tried_extended: false,
            tried_structured: false,
            export: None,
            pending: ExportInfo::default(),
            known: None,
            meta: None,
            meta_export: String::new(),
            list: Vec::new(),
            names: Vec::new(),
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
            Step::OptionReply { purpose: Purpose::Abort, .. } => {
                // Hanging up is a fine answer to NBD_OPT_ABORT.
                self.step = Step::Finished;
                self.outcome = Some(Outcome::Reply(Ok(OptReply::Aborted)));
                return;
            }
            Step::OptionReply { option, .. } => format!(
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
        self.step == Step::Negotiating && self.outcome.is_none()
    }

    /// True once the handshake is over (ready, failed or aborted).
    pub fn is_finished(&self) -> bool {
        self.step == Step::Finished
    }

    /// What has been negotiated so far (export details as of the last `NBD_OPT_INFO`,
    /// when `export` is given).
    pub fn negotiated(&self, export: ExportInfo) -> Negotiated {
        let meta = match &self.meta {
            Some(m) if self.meta_export == self.config.export_name => Some(m.clone()),
            _ => None,
        };
        Negotiated {
            protocol: self.protocol.unwrap_or(Protocol::FixedNewstyle),
            structured_replies: self.structured_replies,
            extended_headers: self.extended_headers,
            tls: self.tls,
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
            && (!self.structured_replies || self.config.meta_contexts.is_empty())
        {
            self.meta = Some(Vec::new());
            self.meta_export = self.config.export_name.clone();
        }
    }

    /// Forgets what is tied to the plaintext part of the connection or to a refused export.
    fn forget_export(&mut self) {
        self.known = None;
        self.meta = None;
        self.export = None;
        self.pending = ExportInfo::default();
    }

    /// Starts option request `req` (option mode only, while negotiating).
    pub fn request(&mut self, req: OptRequest) -> Result<()> {
        if !self.is_negotiating() {
            return Err(Error::usage(
                Errno::EINVAL,
                "invalid state: option requests need a connection in option negotiation, \
                 with no other option request in progress",
            ));
        }
        if self.protocol == Some(Protocol::Newstyle) {
            return self.request_plain_newstyle(req);
        }
        match req {
            OptRequest::Go => self.start_go_info(OPT_GO, false)?,
            OptRequest::Info => self.start_go_info(OPT_INFO, false)?,
            OptRequest::List => {
                self.list.clear();
                self.send_option(OPT_LIST, &[], Purpose::List);
            }
            OptRequest::ListMetaContext(queries) => {
                let data = self.meta_request(queries.as_deref())?;
                self.names.clear();
                self.send_option(OPT_LIST_META_CONTEXT, &data, Purpose::ListMeta);
            }
            OptRequest::SetMetaContext(queries) => {
                if !self.structured_replies {
                    self.outcome = Some(Outcome::Reply(Err(Error::usage(
                        Errno::ENOTSUP,
                        "meta contexts need structured replies, which were not negotiated",
                    ))));
                    return Ok(());
                }
                let data = self.meta_request(queries.as_deref())?;
                self.names.clear();
                self.meta = None;
                self.send_option(OPT_SET_META_CONTEXT, &data, Purpose::SetMeta { then: None });
            }
            OptRequest::StructuredReply => self.send_option(
                OPT_STRUCTURED_REPLY,
                &[],
                Purpose::StructuredReply { auto: false },
            ),
            OptRequest::ExtendedHeaders => self.send_option(
                OPT_EXTENDED_HEADERS,
                &[],
                Purpose::ExtendedHeaders { auto: false },
            ),
            OptRequest::StartTls => {
                if self.tls {
                    self.outcome = Some(Outcome::Reply(Ok(OptReply::Agreed(false))));
                    return Ok(());
                }
                self.send_option(OPT_STARTTLS, &[], Purpose::StartTls { auto: false })
            }
            OptRequest::Abort => self.send_option(OPT_ABORT, &[], Purpose::Abort),
        }
        self.run();
        Ok(())
    }

    /// Option mode against a server without fixed newstyle negotiation: `NBD_OPT_EXPORT_NAME`
    /// stands in for GO, ending the connection needs no message (the server knows no
    /// NBD_OPT_ABORT), and every other option is unsupported.
    fn request_plain_newstyle(&mut self, req: OptRequest) -> Result<()> {
        match req {
            OptRequest::Go => self.send_export_name()?,
            OptRequest::Abort => {
                self.step = Step::Finished;
                self.outcome = Some(Outcome::Reply(Ok(OptReply::Aborted)));
            }
            _ => {
                return Err(Error::server(
                    Errno::ENOTSUP,
                    "the server is not using fixed newstyle negotiation: only optGo and \
                     optAbort are possible",
                ))
            }
        }
        self.run();
        Ok(())
    }

    /// Reports that the TLS handshake the machine asked for with [`Outcome::StartTls`]
    /// has succeeded; the handshake continues over TLS.
    pub fn tls_done(&mut self) {
        let Step::Tls { auto } = self.step else { return };
        self.tls = true;
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
        match self.step.clone() {
            Step::Greeting => {
                let Some(b) = self.consume(16) else { return Ok(false) };
                let mut r = Reader::new(&b);
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
            Step::Oldstyle => {
                let Some(b) = self.consume(OLDSTYLE_REST) else { return Ok(false) };
                let mut r = Reader::new(&b);
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
            Step::NewstyleFlags => {
                let Some(b) = self.consume(2) else { return Ok(false) };
                let server_flags = u16::from_be_bytes([b[0], b[1]]) as u32;
                self.client_flags = server_flags & self.config.handshake_flags & 0x3;
                put_u32(&mut self.output, self.client_flags);
                if self.client_flags & FLAG_C_FIXED_NEWSTYLE == 0 {
                    self.protocol = Some(Protocol::Newstyle);
                    self.refuse_without_tls("a server without fixed newstyle negotiation")?;
                    if self.config.opt_mode {
                        // Nothing can be negotiated, but option mode still stops here
                        // (libnbd does): the export name may change before optGo.
                        self.step = Step::Negotiating;
                        self.log(|| "option mode: negotiating (plain newstyle server)".to_string());
                        self.outcome = Some(Outcome::Negotiating);
                    } else {
                        self.send_export_name()?;
                    }
                } else {
                    self.protocol = Some(Protocol::FixedNewstyle);
                    self.continue_auto()?;
                }
                Ok(true)
            }
            Step::OptionReply { option, purpose } => self.option_reply(option, purpose),
            Step::ExportNameReply => {
                let zeroes = if self.client_flags & FLAG_C_NO_ZEROES != 0 { 0 } else { 124 };
                let Some(b) = self.consume(10 + zeroes) else { return Ok(false) };
                let mut r = Reader::new(&b);
                let size = r.u64().unwrap();
                let flags = r.u16().unwrap();
                let export = export_info(size, flags)?;
                // Contexts set before a GO that fell back here stay, as in libnbd.
                self.export_described();
                self.finish(export);
                Ok(true)
            }
            Step::Tls { .. } | Step::Negotiating | Step::Finished => Ok(false),
        }
    }

    fn refuse_without_tls(&self, what: &str) -> Result<()> {
        if self.config.tls == TlsMode::Require {
            return Err(Error::server(
                Errno::ENOTSUP,
                format!("TLS is required (tls mode 'require') but {what} cannot start TLS"),
            ));
        }
        Ok(())
    }

    /// The automatic negotiations after the greeting, then option mode or GO.
    fn continue_auto(&mut self) -> Result<()> {
        if self.config.tls != TlsMode::Disable && !self.tried_tls {
            self.tried_tls = true;
            self.send_option(OPT_STARTTLS, &[], Purpose::StartTls { auto: true });
            return Ok(());
        }
        let want_structured = self.config.request_structured_replies;
        if want_structured && self.config.request_extended_headers && !self.tried_extended {
            self.tried_extended = true;
            self.send_option(OPT_EXTENDED_HEADERS, &[], Purpose::ExtendedHeaders { auto: true });
            return Ok(());
        }
        if want_structured && !self.extended_headers && !self.tried_structured {
            self.tried_structured = true;
            self.send_option(OPT_STRUCTURED_REPLY, &[], Purpose::StructuredReply { auto: true });
            return Ok(());
        }
        if self.config.opt_mode {
            self.step = Step::Negotiating;
            self.log(|| "option mode: negotiating".to_string());
            self.outcome = Some(Outcome::Negotiating);
            return Ok(());
        }
        self.start_go_info(OPT_GO, true)
    }

    fn send_option(&mut self, option: u32, data: &[u8], purpose: Purpose) {
        if self.config.debug {
            self.debug.push(format!(
                "sending {} ({} bytes of data)",
                option_name(option),
                data.len()
            ));
        }
        put_u64(&mut self.output, IHAVEOPT);
        put_u32(&mut self.output, option);
        put_u32(&mut self.output, data.len() as u32);
        self.output.extend_from_slice(data);
        self.step = Step::OptionReply { option, purpose };
    }

    fn checked_name(&self) -> Result<Vec<u8>> {
        let name = self.config.export_name.as_bytes();
        if name.len() > MAX_STRING {
            return Err(Error::usage(
                Errno::ENAMETOOLONG,
                format!("export name is {} bytes, longer than {MAX_STRING}", name.len()),
            ));
        }
        Ok(name.to_vec())
    }

    fn send_export_name(&mut self) -> Result<()> {
        let name = self.checked_name()?;
        if self.config.debug {
            self.debug.push(format!(
                "sending NBD_OPT_EXPORT_NAME for export {:?}",
                self.config.export_name
            ));
        }
        put_u64(&mut self.output, IHAVEOPT);
        put_u32(&mut self.output, OPT_EXPORT_NAME);
        put_u32(&mut self.output, name.len() as u32);
        self.output.extend_from_slice(&name);
        self.step = Step::ExportNameReply;
        Ok(())
    }

    /// The data of SET/LIST_META_CONTEXT: the export name and the queries.
    fn meta_request(&self, queries: Option<&[String]>) -> Result<Vec<u8>> {
        let name = self.checked_name()?;
        let queries = queries.unwrap_or(&self.config.meta_contexts);
        let mut data = Vec::new();
        put_u32(&mut data, name.len() as u32);
        data.extend_from_slice(&name);
        put_u32(&mut data, queries.len() as u32);
        for q in queries {
            if q.len() > MAX_STRING {
                return Err(Error::usage(
                    Errno::ENAMETOOLONG,
                    format!("meta context query is {} bytes, longer than {MAX_STRING}", q.len()),
                ));
            }
            put_u32(&mut data, q.len() as u32);
            data.extend_from_slice(q.as_bytes());
        }
        Ok(data)
    }

    /// GO or INFO, after SET_META_CONTEXT when configured.
    fn start_go_info(&mut self, option: u32, auto: bool) -> Result<()> {
        let want_meta = self.config.request_meta_context
            && !self.config.meta_contexts.is_empty()
            && self.structured_replies;
        if want_meta {
            let data = self.meta_request(None)?;
            self.names.clear();
            self.meta = None;
            self.send_option(OPT_SET_META_CONTEXT, &data, Purpose::SetMeta { then: Some(option) });
            return Ok(());
        }
        self.send_go_info(option, auto)
    }

    fn send_go_info(&mut self, option: u32, auto: bool) -> Result<()> {
        let name = self.checked_name()?;
        let mut infos = Vec::new();
        if self.config.request_block_size {
            infos.push(INFO_BLOCK_SIZE);
        }
        if self.config.full_info {
            infos.push(INFO_NAME);
            infos.push(INFO_DESCRIPTION);
        }
        let mut data = Vec::with_capacity(4 + name.len() + 2 + 2 * infos.len());
        put_u32(&mut data, name.len() as u32);
        data.extend_from_slice(&name);
        put_u16(&mut data, infos.len() as u16);
        for info in infos {
            put_u16(&mut data, info);
        }
        self.pending = ExportInfo::default();
        self.export = None;
        if self.config.debug {
            self.debug.push(format!(
                "asking about export {:?} with {}",
                self.config.export_name,
                option_name(option)
            ));
        }
        self.send_option(option, &data, Purpose::GoInfo { option, auto });
        Ok(())
    }

    fn option_reply(&mut self, option: u32, purpose: Purpose) -> Result<bool> {
        if self.input.len() < OPTION_REPLY_HEADER {
            return Ok(false);
        }
        let mut r = Reader::new(&self.input[..OPTION_REPLY_HEADER]);
        let magic = r.u64().unwrap();
        let replied_to = r.u32().unwrap();
        let reply = r.u32().unwrap();
        let len = r.u32().unwrap();
        if magic != OPT_REPLY_MAGIC {
            return Err(Error::protocol(format!(
                "option reply has wrong magic {magic:#018x}"
            )));
        }
        if replied_to != option {
            return Err(Error::protocol(format!(
                "server answered {} ({replied_to}) while {} was outstanding",
                option_name(replied_to),
                option_name(option)
            )));
        }
        if len > MAX_OPTION_REPLY {
            return Err(Error::protocol(format!(
                "server's {} to {} claims {len} bytes, more than the {MAX_OPTION_REPLY} allowed",
                reply_name(reply),
                option_name(option)
            )));
        }
        let Some(b) = self.consume(OPTION_REPLY_HEADER + len as usize) else {
            return Ok(false);
        };
        let payload = &b[OPTION_REPLY_HEADER..];
        if self.config.debug {
            self.debug.push(format!(
                "received {} to {} ({} bytes)",
                reply_name(reply),
                option_name(option),
                payload.len()
            ));
        }

        if reply & REP_FLAG_ERROR != 0 {
            return self.option_error(option, purpose, reply, payload).map(|()| true);
        }
        let unexpected = || {
            Error::protocol(format!(
                "unexpected {} ({reply}) in answer to {}",
                reply_name(reply),
                option_name(option)
            ))
        };
        let ack_without_payload = |what: &str| -> Result<()> {
            if payload.is_empty() {
                Ok(())
            } else {
                Err(Error::protocol(format!(
                    "NBD_REP_ACK to {what} carries a payload of {} bytes",
                    payload.len()
                )))
            }
        };
        match (purpose, reply) {
            (Purpose::StartTls { auto }, REP_ACK) => {
                ack_without_payload("NBD_OPT_STARTTLS")?;
                if !self.input.is_empty() {
                    return Err(Error::protocol(
                        "server sent data after accepting NBD_OPT_STARTTLS, before TLS started",
                    ));
                }
                // Nothing negotiated in plaintext survives into TLS (the protocol says
                // so; CVE-2021-3716 was a server keeping it): ask again over TLS.
                self.structured_replies = false;
                self.extended_headers = false;
                self.tried_extended = false;
                self.tried_structured = false;
                self.forget_export();
                self.step = Step::Tls { auto };
                self.outcome = Some(Outcome::StartTls);
            }
            (Purpose::ExtendedHeaders { auto }, REP_ACK) => {
                ack_without_payload("NBD_OPT_EXTENDED_HEADERS")?;
                self.extended_headers = true;
                self.structured_replies = true;
                if auto {
                    self.continue_auto()?;
                } else {
                    self.reply(Ok(OptReply::Agreed(true)));
                }
            }
            (Purpose::StructuredReply { auto }, REP_ACK) => {
                ack_without_payload("NBD_OPT_STRUCTURED_REPLY")?;
                self.structured_replies = true;
                if auto {
                    self.continue_auto()?;
                } else {
                    self.reply(Ok(OptReply::Agreed(true)));
                }
            }
            (Purpose::SetMeta { .. } | Purpose::ListMeta, REP_META_CONTEXT) => {
                let mut r = Reader::new(payload);
                let Some(id) = r.u32() else {
                    return Err(Error::protocol("NBD_REP_META_CONTEXT shorter than its id"));
                };
                let name = r.rest();
                if name.len() > MAX_STRING {
                    return Err(Error::protocol(format!(
                        "meta context name of {} bytes, longer than {MAX_STRING}",
                        name.len()
                    )));
                }
                if self.names.len() >= MAX_LIST_ENTRIES {
                    return Err(Error::protocol(format!(
                        "server listed more than {MAX_LIST_ENTRIES} meta contexts"
                    )));
                }
                let name = server_text(name);
                if let Step::OptionReply { purpose: Purpose::SetMeta { .. }, .. } = self.step {
                    let meta = self.meta.get_or_insert_with(Vec::new);
                    if meta.iter().any(|m| m.id == id) {
                        return Err(Error::protocol(format!(
                            "server gave meta context id {id} to two contexts"
                        )));
                    }
                    meta.push(MetaContext { id, name: name.clone() });
                }
                self.names.push(name);
            }
            (Purpose::SetMeta { then }, REP_ACK) => {
                ack_without_payload("NBD_OPT_SET_META_CONTEXT")?;
                let meta = self.meta.take().unwrap_or_default();
                self.meta = Some(meta);
                self.meta_export = self.config.export_name.clone();
                match then {
                    Some(option) => self.send_go_info(option, option == OPT_GO && !self.config.opt_mode)?,
                    None => {
                        let names = std::mem::take(&mut self.names);
                        self.reply(Ok(OptReply::MetaContexts(names)));
                    }
                }
            }
            (Purpose::ListMeta, REP_ACK) => {
                ack_without_payload("NBD_OPT_LIST_META_CONTEXT")?;
                let names = std::mem::take(&mut self.names);
                self.reply(Ok(OptReply::MetaContexts(names)));
            }
            (Purpose::List, REP_SERVER) => {
                let mut r = Reader::new(payload);
                let Some(n) = r.u32() else {
                    return Err(Error::protocol("NBD_REP_SERVER shorter than its name length"));
                };
                let Some(name) = r.take(n as usize) else {
                    return Err(Error::protocol(format!(
                        "NBD_REP_SERVER name claims {n} bytes, more than the reply holds"
                    )));
                };
                if self.list.len() >= MAX_LIST_ENTRIES {
                    return Err(Error::protocol(format!(
                        "server listed more than {MAX_LIST_ENTRIES} exports"
                    )));
                }
                let entry = ExportEntry {
                    name: server_text(name),
                    description: server_text(r.rest()),
                };
                self.list.push(entry);
            }
            (Purpose::List, REP_ACK) => {
                ack_without_payload("NBD_OPT_LIST")?;
                let list = std::mem::take(&mut self.list);
                self.reply(Ok(OptReply::List(list)));
            }
            (Purpose::GoInfo { .. }, REP_INFO) => self.info_reply(payload)?,
            (Purpose::GoInfo { option, .. }, REP_ACK) => {
                ack_without_payload(option_name(option))?;
                let Some(mut export) = self.export.take() else {
                    return Err(Error::protocol(format!(
                        "server acknowledged {} without sending NBD_INFO_EXPORT",
                        option_name(option)
                    )));
                };
                export.block_size = self.pending.block_size;
                export.canonical_name = self.pending.canonical_name.take();
                export.description = self.pending.description.take();
                self.export_described();
                if option == OPT_GO {
                    self.finish(export);
                } else {
                    self.known = Some(export.clone());
                    self.reply(Ok(OptReply::Info(export)));
                }
            }
            (Purpose::Abort, _) => {
                self.step = Step::Finished;
                self.outcome = Some(Outcome::Reply(Ok(OptReply::Aborted)));
            }
            _ => return Err(unexpected()),
        }
        Ok(true)
    }

    fn info_reply(&mut self, payload: &[u8]) -> Result<()> {
        let mut r = Reader::new(payload);
        let Some(info) = r.u16() else {
            return Err(Error::protocol("NBD_REP_INFO shorter than its type field"));
        };
        let body = r.rest();
        let wrong_len = |what: &str, want: usize| {
            Error::protocol(format!(
                "{what} has {} bytes, the protocol says {want}",
                body.len()
            ))
        };
        match info {
            INFO_EXPORT => {
                if body.len() != 10 {
                    return Err(wrong_len("NBD_INFO_EXPORT", 10));
                }
                let mut r = Reader::new(body);
                let size = r.u64().unwrap();
                let flags = r.u16().unwrap();
                self.export = Some(export_info(size, flags)?);
            }
            INFO_BLOCK_SIZE => {
                if body.len() != 12 {
                    return Err(wrong_len("NBD_INFO_BLOCK_SIZE", 12));
                }
                let mut r = Reader::new(body);
                let bs = BlockSize {
                    minimum: r.u32().unwrap(),
                    preferred: r.u32().unwrap(),
                    maximum: r.u32().unwrap(),
                };
                validate_block_size(bs)?;
                self.pending.block_size = Some(bs);
            }
            INFO_NAME | INFO_DESCRIPTION => {
                if body.len() > MAX_STRING {
                    return Err(Error::protocol(format!(
                        "NBD_INFO_{} is {} bytes, longer than {MAX_STRING}",
                        if info == INFO_NAME { "NAME" } else { "DESCRIPTION" },
                        body.len()
                    )));
                }
                let text = server_text(body);
                if info == INFO_NAME {
                    self.pending.canonical_name = Some(text);
                } else {
                    self.pending.description = Some(text);
                }
            }
            // Unknown information types must be ignored (protocol specification).
            _ => {}
        }
        Ok(())
    }

    fn option_error(&mut self, option: u32, purpose: Purpose, reply: u32, payload: &[u8]) -> Result<()> {
        let server_says = if payload.is_empty() {
            String::new()
        } else {
            format!(": {}", server_text(payload))
        };
        match purpose {
            Purpose::StartTls { auto: true } => {
                if self.config.tls == TlsMode::Require {
                    return Err(Error::server(
                        Errno::ENOTSUP,
                        format!(
                            "TLS is required (tls mode 'require') but the server refused \
                             NBD_OPT_STARTTLS with {}{server_says}",
                            reply_name(reply)
                        ),
                    ));
                }
                // 'allow': carry on in plaintext.
                return self.continue_auto();
            }
            Purpose::ExtendedHeaders { auto: true } | Purpose::StructuredReply { auto: true } => {
                // Optional features: a refusal just means the older framing.
                return self.continue_auto();
            }
            Purpose::StartTls { auto: false }
            | Purpose::ExtendedHeaders { auto: false }
            | Purpose::StructuredReply { auto: false } => {
                self.reply(Ok(OptReply::Agreed(false)));
                return Ok(());
            }
            Purpose::SetMeta { then: Some(next) } => {
                // No meta contexts for this export; GO/INFO still proceeds.
                self.meta = Some(Vec::new());
                self.meta_export = self.config.export_name.clone();
                self.names.clear();
                let auto = next == OPT_GO && !self.config.opt_mode;
                return self.send_go_info(next, auto);
            }
            Purpose::GoInfo { option: OPT_GO, .. } if reply == REP_ERR_UNSUP => {
                // An older server: fall back to the option every newstyle server has.
                return self.send_export_name();
            }
            Purpose::Abort => {
                self.step = Step::Finished;
                self.outcome = Some(Outcome::Reply(Ok(OptReply::Aborted)));
                return Ok(());
            }
            _ => {}
        }
        let errno = match reply {
            REP_ERR_UNKNOWN => Errno::ENOENT,
            REP_ERR_POLICY | REP_ERR_TLS_REQD => Errno::EPERM,
            REP_ERR_PLATFORM | REP_ERR_UNSUP => Errno::ENOTSUP,
            REP_ERR_SHUTDOWN => Errno::ESHUTDOWN,
            REP_ERR_TOO_BIG => Errno::ERANGE,
            _ => Errno::EINVAL,
        };
        let mut message = match purpose {
            Purpose::GoInfo { .. } | Purpose::SetMeta { .. } | Purpose::ListMeta => format!(
                "server refused {} for export {:?} with {}",
                option_name(option),
                self.config.export_name,
                reply_name(reply)
            ),
            _ => format!("server refused {} with {}", option_name(option), reply_name(reply)),
        };
        message.push_str(&server_says);
        if reply == REP_ERR_TLS_REQD && !self.tls {
            message.push_str(" (the server requires TLS: set tls to 'allow' or 'require')");
        }
        let error = Error::server(errno, message);
        let fatal = matches!(purpose, Purpose::GoInfo { auto: true, .. });
        if fatal {
            return Err(error);
        }
        if matches!(purpose, Purpose::SetMeta { then: None }) {
            self.meta = None;
        }
        if matches!(purpose, Purpose::GoInfo { .. }) {
            // A refused export leaves nothing of it behind (libnbd resets the details and
            // the meta contexts).
            self.forget_export();
        }
        self.names.clear();
        self.list.clear();
        self.log_error(&error);
        self.reply(Err(error));
        Ok(())
    }
}

fn export_info(size: u64, flags: u16) -> Result<ExportInfo> {
    if size > i64::MAX as u64 {
        return Err(Error::protocol(format!(
            "server claims an export size of {size} bytes, beyond the 2^63-1 the protocol allows"
        )));
    }
    Ok(ExportInfo {
        size,
        flags: if flags & FLAG_HAS_FLAGS != 0 { flags } else { 0 },
        ..ExportInfo::default()
    })
}

fn validate_block_size(bs: BlockSize) -> Result<()> {
    let ok = bs.minimum.is_power_of_two()
        && bs.minimum <= 64 * 1024
        && bs.preferred.is_power_of_two()
        && bs.preferred >= bs.minimum
        && bs.maximum >= bs.minimum
        && (bs.maximum == u32::MAX || bs.maximum % bs.minimum == 0);
    if ok {
        Ok(())
    } else {
        Err(Error::protocol(format!(
            "server sent impossible block sizes: minimum {}, preferred {}, maximum {}",
            bs.minimum, bs.preferred, bs.maximum
        )))
    }
}
