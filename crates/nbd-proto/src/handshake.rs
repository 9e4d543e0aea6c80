//! The client side of the NBD handshake, as a sans-IO state machine.
//!
//! # Driving it
//!
//! ```text
//! let mut hs = Handshake::new(config);
//! loop {
//!     let out = hs.poll_transmit();            // bytes to send, maybe none
//!     write_all(out);
//!     if let Some(outcome) = hs.poll_outcome() { break outcome }
//!     match read(&mut buf) {
//!         0 => hs.handle_eof(),                // the server hung up
//!         n => hs.handle_input(&buf[..n]),
//!     }
//! }
//! let early = hs.take_leftover();              // bytes read past the handshake, if any
//! ```
//!
//! The machine understands oldstyle, plain newstyle and fixed newstyle servers. With fixed
//! newstyle it asks for structured replies (when configured), then sends `NBD_OPT_GO`
//! requesting `NBD_INFO_BLOCK_SIZE` (and name and description with `full_info`), and falls
//! back to `NBD_OPT_EXPORT_NAME` when the server answers `NBD_REP_ERR_UNSUP`. Every length
//! the server announces is checked against a limit before the bytes are awaited.

use crate::consts::*;
use crate::errno::Errno;
use crate::error::{Error, Result};
use crate::wire::{put_u16, put_u32, put_u64, server_text, Reader};

/// What the client asks for during the handshake.
#[derive(Debug, Clone)]
pub struct HandshakeConfig {
    /// The export to attach to.
    pub export_name: String,
    /// Send `NBD_OPT_STRUCTURED_REPLY`.
    pub request_structured_replies: bool,
    /// Request `NBD_INFO_BLOCK_SIZE` in `NBD_OPT_GO`.
    pub request_block_size: bool,
    /// Request `NBD_INFO_NAME` and `NBD_INFO_DESCRIPTION` in `NBD_OPT_GO`.
    pub full_info: bool,
    /// Handshake flags the client is willing to use (`FLAG_C_FIXED_NEWSTYLE`,
    /// `FLAG_C_NO_ZEROES`); the ones sent are these masked by what the server offers.
    pub handshake_flags: u32,
}

impl Default for HandshakeConfig {
    fn default() -> Self {
        HandshakeConfig {
            export_name: String::new(),
            request_structured_replies: true,
            request_block_size: true,
            full_info: false,
            handshake_flags: FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES,
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

/// The result of a successful handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    pub protocol: Protocol,
    pub structured_replies: bool,
    pub extended_headers: bool,
    pub export: ExportInfo,
}

/// Where the machine is: what it waits for next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Greeting,
    NewstyleFlags,
    Oldstyle,
    OptionReply(u32),
    ExportNameReply,
    Finished,
}

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
    export: Option<ExportInfo>,
    pending: ExportInfo,
    outcome: Option<Result<Negotiated>>,
    delivered: bool,
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
            export: None,
            pending: ExportInfo::default(),
            outcome: None,
            delivered: false,
        }
    }

    /// Feeds bytes read from the server.
    pub fn handle_input(&mut self, data: &[u8]) {
        self.input.extend_from_slice(data);
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
        let waiting = match self.step {
            Step::Greeting | Step::NewstyleFlags | Step::Oldstyle => {
                "the server closed the connection before completing its greeting".to_string()
            }
            Step::OptionReply(opt) => format!(
                "the server closed the connection instead of answering {}",
                option_name(opt)
            ),
            Step::ExportNameReply => format!(
                "the server closed the connection after NBD_OPT_EXPORT_NAME; \
                 it probably has no export named {:?}",
                self.config.export_name
            ),
            Step::Finished => return,
        };
        self.fail(Error::io(Errno::ECONNRESET, waiting));
    }

    /// Bytes to send to the server now (empty when there is nothing to send).
    pub fn poll_transmit(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.output)
    }

    /// The outcome, once: `Some` when the handshake has finished or failed.
    pub fn poll_outcome(&mut self) -> Option<Result<Negotiated>> {
        if self.delivered {
            return None;
        }
        let outcome = self.outcome.clone()?;
        self.delivered = true;
        Some(outcome)
    }

    /// Bytes received after the end of the handshake (they belong to the transmission phase).
    pub fn take_leftover(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.input)
    }

    fn fail(&mut self, e: Error) {
        self.step = Step::Finished;
        self.outcome = Some(Err(e));
    }

    fn finish(&mut self, export: ExportInfo) {
        self.step = Step::Finished;
        self.outcome = Some(Ok(Negotiated {
            protocol: self.protocol.unwrap_or(Protocol::FixedNewstyle),
            structured_replies: self.structured_replies,
            extended_headers: false,
            export,
        }));
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
                let export = export_info(size, flags)?;
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
                    self.send_export_name()?;
                } else {
                    self.protocol = Some(Protocol::FixedNewstyle);
                    if self.config.request_structured_replies {
                        self.send_option(OPT_STRUCTURED_REPLY, &[]);
                    } else {
                        self.send_go()?;
                    }
                }
                Ok(true)
            }
            Step::OptionReply(option) => self.option_reply(option),
            Step::ExportNameReply => {
                let zeroes = if self.client_flags & FLAG_C_NO_ZEROES != 0 { 0 } else { 124 };
                let Some(b) = self.consume(10 + zeroes) else { return Ok(false) };
                let mut r = Reader::new(&b);
                let size = r.u64().unwrap();
                let flags = r.u16().unwrap();
                let export = export_info(size, flags)?;
                self.finish(export);
                Ok(true)
            }
            Step::Finished => Ok(false),
        }
    }

    fn send_option(&mut self, option: u32, data: &[u8]) {
        put_u64(&mut self.output, IHAVEOPT);
        put_u32(&mut self.output, option);
        put_u32(&mut self.output, data.len() as u32);
        self.output.extend_from_slice(data);
        self.step = Step::OptionReply(option);
    }

    fn checked_name(&self) -> Result<&[u8]> {
        let name = self.config.export_name.as_bytes();
        if name.len() > MAX_STRING {
            return Err(Error::usage(
                Errno::ENAMETOOLONG,
                format!("export name is {} bytes, longer than {MAX_STRING}", name.len()),
            ));
        }
        Ok(name)
    }

    fn send_export_name(&mut self) -> Result<()> {
        let name = self.checked_name()?.to_vec();
        put_u64(&mut self.output, IHAVEOPT);
        put_u32(&mut self.output, OPT_EXPORT_NAME);
        put_u32(&mut self.output, name.len() as u32);
        self.output.extend_from_slice(&name);
        self.step = Step::ExportNameReply;
        Ok(())
    }

    fn send_go(&mut self) -> Result<()> {
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
        data.extend_from_slice(name);
        put_u16(&mut data, infos.len() as u16);
        for info in infos {
            put_u16(&mut data, info);
        }
        self.pending = ExportInfo::default();
        self.export = None;
        self.send_option(OPT_GO, &data);
        Ok(())
    }

    fn option_reply(&mut self, option: u32) -> Result<bool> {
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

        if reply & REP_FLAG_ERROR != 0 {
            return self.option_error(option, reply, payload).map(|()| true);
        }
        match (option, reply) {
            (OPT_STRUCTURED_REPLY, REP_ACK) => {
                if !payload.is_empty() {
                    return Err(Error::protocol(
                        "NBD_REP_ACK to NBD_OPT_STRUCTURED_REPLY carries a payload",
                    ));
                }
                self.structured_replies = true;
                self.send_go()?;
            }
            (OPT_GO, REP_INFO) => self.info_reply(payload)?,
            (OPT_GO, REP_ACK) => {
                let Some(export) = self.export.take() else {
                    return Err(Error::protocol(
                        "server acknowledged NBD_OPT_GO without sending NBD_INFO_EXPORT",
                    ));
                };
                let mut export = export;
                export.block_size = self.pending.block_size;
                export.canonical_name = self.pending.canonical_name.take();
                export.description = self.pending.description.take();
                self.finish(export);
            }
            _ => {
                return Err(Error::protocol(format!(
                    "unexpected {} ({reply}) in answer to {}",
                    reply_name(reply),
                    option_name(option)
                )))
            }
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

    fn option_error(&mut self, option: u32, reply: u32, payload: &[u8]) -> Result<()> {
        // Structured replies are optional: any refusal just means simple replies.
        if option == OPT_STRUCTURED_REPLY {
            self.structured_replies = false;
            return self.send_go();
        }
        if option == OPT_GO && reply == REP_ERR_UNSUP {
            // An older server: fall back to the option every newstyle server has.
            return self.send_export_name();
        }
        let errno = match reply {
            REP_ERR_UNKNOWN => Errno::ENOENT,
            REP_ERR_POLICY | REP_ERR_TLS_REQD => Errno::EPERM,
            REP_ERR_PLATFORM | REP_ERR_UNSUP => Errno::ENOTSUP,
            REP_ERR_SHUTDOWN => Errno::ESHUTDOWN,
            REP_ERR_TOO_BIG => Errno::ERANGE,
            _ => Errno::EINVAL,
        };
        let mut message = format!(
            "server refused {} for export {:?} with {}",
            option_name(option),
            self.config.export_name,
            reply_name(reply)
        );
        if !payload.is_empty() {
            message.push_str(": ");
            message.push_str(&server_text(payload));
        }
        Err(Error::server(errno, message))
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
