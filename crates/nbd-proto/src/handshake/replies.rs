//! Option replies: reading one off the input ([`Handshake::option_reply`]), then the three
//! kinds of it: a part of the answer that the step gathers, the `NBD_REP_ACK` that finishes
//! the step, or an error reply that refuses the option.

use crate::consts::*;
use crate::errno::Errno;
use crate::error::{Error, Result};
use crate::wire::{server_message, FieldReader};

use super::config::TlsMode;
use super::options::OptReply;
use super::negotiated::MetaContext;
use super::steps::{add_export, Awaiting, MetaAnswer, MetaReplies, Purpose, Step};
use super::{Handshake, Outcome};

/// Bytes of an option reply header.
const OPTION_REPLY_HEADER: usize = 8 + 4 + 4 + 4;

impl Handshake {
    /// The step [`Step::OptionReply`]: one option reply, once all of it is in;
    /// `Ok(false)` when more input is needed.
    pub(super) fn option_reply(&mut self) -> Result<bool> {
        let Step::OptionReply(Awaiting { option, .. }) = self.step else {
            unreachable!("option_reply runs in the OptionReply step")
        };
        let Some((reply, payload)) = self.take_option_reply(option)? else {
            return Ok(false);
        };
        if self.config.debug {
            self.debug.push(format!(
                "received {} to {} ({} bytes)",
                reply_name(reply),
                option_name(option),
                payload.len()
            ));
        }
        if let Step::OptionReply(Awaiting { purpose: Purpose::Abort, .. }) = self.step {
            // Any answer to NBD_OPT_ABORT ends the connection.
            self.aborted();
        } else if reply & REP_FLAG_ERROR != 0 {
            let awaiting = self.take_awaiting();
            self.option_error(awaiting, reply, &payload)?;
        } else if reply == REP_ACK {
            if !payload.is_empty() {
                return Err(Error::protocol(format!(
                    "NBD_REP_ACK to {} carries a payload of {} bytes",
                    option_name(option),
                    payload.len()
                )));
            }
            let awaiting = self.take_awaiting();
            self.option_ack(awaiting)?;
        } else {
            self.gather(reply, &payload)?;
        }
        Ok(true)
    }

    /// Removes the next option reply to `option` from the input: its type and payload.
    fn take_option_reply(&mut self, option: u32) -> Result<Option<(u32, Vec<u8>)>> {
        if self.input.len() < OPTION_REPLY_HEADER {
            return Ok(None);
        }
        let mut r = FieldReader::new(&self.input[..OPTION_REPLY_HEADER]);
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
        let Some(mut b) = self.consume(OPTION_REPLY_HEADER + len as usize) else {
            return Ok(None);
        };
        b.drain(..OPTION_REPLY_HEADER);
        Ok(Some((reply, b)))
    }

    /// Ends the option step, handing over what it gathered; the caller sets the next step.
    fn take_awaiting(&mut self) -> Awaiting {
        match std::mem::replace(&mut self.step, Step::Finished) {
            Step::OptionReply(awaiting) => awaiting,
            _ => unreachable!("an option reply is awaited"),
        }
    }

    /// A reply that is one part of the answer: the step keeps it.
    fn gather(&mut self, reply: u32, payload: &[u8]) -> Result<()> {
        let Step::OptionReply(Awaiting { option, purpose }) = &mut self.step else {
            unreachable!("an option reply is awaited")
        };
        match (purpose, reply) {
            (Purpose::SetMeta { contexts, .. }, REP_META_CONTEXT) => contexts.add(payload, true),
            (Purpose::ListMeta { contexts }, REP_META_CONTEXT) => contexts.add(payload, false),
            (Purpose::List { exports, bytes }, REP_SERVER) => add_export(exports, bytes, payload),
            (Purpose::GoInfo { details, .. }, REP_INFO) => details.add(payload),
            _ => Err(Error::protocol(format!(
                "unexpected {} ({reply}) in answer to {}",
                reply_name(reply),
                option_name(*option)
            ))),
        }
    }

    /// `NBD_REP_ACK`: the option succeeded; what its step gathered is the answer.
    fn option_ack(&mut self, awaiting: Awaiting) -> Result<()> {
        match awaiting.purpose {
            Purpose::StartTls { auto } => {
                if !self.input.is_empty() {
                    return Err(Error::protocol(
                        "server sent data after accepting NBD_OPT_STARTTLS, before TLS started",
                    ));
                }
                self.settled = self.settled.after_starttls();
                self.forget_export();
                self.step = Step::Tls { auto };
                self.outcome = Some(Outcome::StartTls);
                Ok(())
            }
            Purpose::ExtendedHeaders { auto } => {
                self.settled.extended_headers = true;
                self.settled.structured_replies = true;
                self.agreed(auto)
            }
            Purpose::StructuredReply { auto } => {
                self.settled.structured_replies = true;
                self.agreed(auto)
            }
            Purpose::SetMeta { then, contexts } => {
                let contexts = contexts.into_contexts();
                let names = then.is_none().then(|| MetaReplies::names(&contexts));
                self.set_meta_answer(contexts);
                match then {
                    Some(option) => self.send_go_info(option, self.auto_go(option)),
                    None => {
                        self.reply(Ok(OptReply::MetaContexts(names.unwrap_or_default())));
                        Ok(())
                    }
                }
            }
            Purpose::ListMeta { contexts } => {
                let names = MetaReplies::names(&contexts.into_contexts());
                self.reply(Ok(OptReply::MetaContexts(names)));
                Ok(())
            }
            Purpose::List { exports, .. } => {
                self.reply(Ok(OptReply::List(exports)));
                Ok(())
            }
            Purpose::GoInfo { option, details, .. } => {
                let export = details.finish(option)?;
                self.export_described();
                if option == OPT_GO {
                    self.finish(export);
                } else {
                    self.known = Some(export.clone());
                    self.reply(Ok(OptReply::Info(export)));
                }
                Ok(())
            }
            Purpose::Abort => {
                self.aborted();
                Ok(())
            }
        }
    }

    /// A feature the server agreed to: on with the automatic negotiations, or the answer
    /// to the application's request.
    fn agreed(&mut self, auto: bool) -> Result<()> {
        if auto {
            self.continue_auto()
        } else {
            self.reply(Ok(OptReply::Agreed(true)));
            Ok(())
        }
    }

    /// Whether the GO after a SET_META_CONTEXT is the machine's own (not in option mode).
    fn auto_go(&self, option: u32) -> bool {
        option == OPT_GO && !self.config.opt_mode
    }

    /// The meta contexts of the configured export are now known.
    pub(super) fn set_meta_answer(&mut self, contexts: Vec<MetaContext>) {
        self.meta = Some(MetaAnswer {
            export: self.config.export_name.clone(),
            contexts,
        });
    }

    /// An error reply. Some refusals only steer the negotiation (optional features, the
    /// fallback from GO to EXPORT_NAME); the rest are errors ([`Handshake::option_refused`]).
    fn option_error(&mut self, awaiting: Awaiting, reply: u32, payload: &[u8]) -> Result<()> {
        let Awaiting { option, purpose } = awaiting;
        match purpose {
            Purpose::StartTls { auto: true } => {
                if self.config.tls == TlsMode::Require {
                    return Err(Error::server(
                        Errno::ENOTSUP,
                        format!(
                            "TLS is required (tls mode 'require') but the server refused \
                             NBD_OPT_STARTTLS with {}{}",
                            reply_name(reply),
                            server_says(payload)
                        ),
                    ));
                }
                // 'allow': carry on in plaintext.
                self.continue_auto()
            }
            Purpose::ExtendedHeaders { auto: true } | Purpose::StructuredReply { auto: true } => {
                // Optional features: a refusal just means the older framing.
                self.continue_auto()
            }
            Purpose::StartTls { auto: false }
            | Purpose::ExtendedHeaders { auto: false }
            | Purpose::StructuredReply { auto: false } => {
                self.reply(Ok(OptReply::Agreed(false)));
                Ok(())
            }
            Purpose::SetMeta { then: Some(next), .. } => {
                // No meta contexts for this export; GO/INFO still proceeds.
                self.set_meta_answer(Vec::new());
                self.send_go_info(next, self.auto_go(next))
            }
            Purpose::GoInfo { option: OPT_GO, .. } if reply == REP_ERR_UNSUP => {
                // An older server: fall back to the option every newstyle server has.
                self.send_export_name()
            }
            Purpose::Abort => {
                self.aborted();
                Ok(())
            }
            purpose => self.option_refused(option, &purpose, reply, payload),
        }
    }

    /// A refused option: the application's request fails and negotiation goes on; the
    /// machine's own GO fails the handshake.
    fn option_refused(&mut self, option: u32, purpose: &Purpose, reply: u32, payload: &[u8]) -> Result<()> {
        let errno = match reply {
            REP_ERR_UNKNOWN => Errno::ENOENT,
            REP_ERR_POLICY => Errno::EPERM,
            // As libnbd: TLS is what the server requires and the client did not do.
            REP_ERR_PLATFORM | REP_ERR_UNSUP | REP_ERR_TLS_REQD => Errno::ENOTSUP,
            REP_ERR_SHUTDOWN => Errno::ESHUTDOWN,
            REP_ERR_TOO_BIG => Errno::ERANGE,
            _ => Errno::EINVAL,
        };
        let mut message = match purpose {
            Purpose::GoInfo { .. } | Purpose::SetMeta { .. } | Purpose::ListMeta { .. } => format!(
                "server refused {} for export {:?} with {}",
                option_name(option),
                self.config.export_name,
                reply_name(reply)
            ),
            _ => format!("server refused {} with {}", option_name(option), reply_name(reply)),
        };
        message.push_str(&server_says(payload));
        if reply == REP_ERR_TLS_REQD && !self.settled.tls {
            message.push_str(" (the server requires TLS: set tls to 'allow' or 'require')");
        }
        let error = Error::server(errno, message);
        if let Purpose::GoInfo { auto, .. } = purpose {
            if *auto {
                return Err(error);
            }
            // A refused export leaves nothing of it behind (libnbd resets the details and
            // the meta contexts).
            self.forget_export();
        }
        self.log_error(&error);
        self.reply(Err(error));
        Ok(())
    }
}

/// The server's message in an error reply, as a suffix for ours.
fn server_says(payload: &[u8]) -> String {
    if payload.is_empty() {
        String::new()
    } else {
        format!(": {}", server_message(payload))
    }
}
