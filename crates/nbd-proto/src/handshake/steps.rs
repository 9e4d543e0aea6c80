//! The steps of the handshake and the data each one owns.
//!
//! A step that gathers several server replies (the exports of `NBD_OPT_LIST`, the contexts
//! of `NBD_OPT_SET_META_CONTEXT`, the `NBD_REP_INFO` replies of `NBD_OPT_GO`) holds what it
//! has gathered so far inside its own [`Purpose`]. The `NBD_REP_ACK` that ends it turns the
//! gathered data into a finished value; a refusal, a failure or the next request drops the
//! step with everything in it. Nothing partial outlives its step, so nothing is cleared by
//! hand.

use crate::consts::*;
use crate::error::{Error, Result};
use crate::wire::{server_text, FieldReader};

use super::negotiated::{BlockSize, ExportEntry, ExportInfo, MetaContext};

/// Most entries accepted in one list reply (exports, meta contexts).
const MAX_LIST_ENTRIES: usize = 65_536;
/// The most bytes of names (and export descriptions) one list may bring: with each string
/// at most 4096 bytes and 65,536 entries, a server could otherwise make the client hold
/// gigabytes.
const MAX_LIST_BYTES: usize = 16 << 20;

/// Where the machine is: what it waits for next.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Step {
    /// The first 16 bytes: NBDMAGIC and the style's magic.
    Greeting,
    /// The newstyle handshake flags.
    NewstyleFlags,
    /// The rest of an oldstyle greeting.
    Oldstyle,
    /// The answer to an option request.
    OptionReply(Awaiting),
    /// The answer to `NBD_OPT_EXPORT_NAME`.
    ExportNameReply,
    /// STARTTLS was accepted; waiting for the driver's TLS handshake.
    Tls { auto: bool },
    /// Option mode: waiting for a request.
    Negotiating,
    /// Ready, failed or aborted.
    Finished,
}

/// An option request sent, whose reply is awaited.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Awaiting {
    /// The option sent (the reply must name it).
    pub option: u32,
    /// Why it was sent, with what its replies have brought so far.
    pub purpose: Purpose,
}

/// Why an option reply is awaited; `auto` when the machine asked by itself, not the
/// application.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Purpose {
    /// `NBD_OPT_STARTTLS`.
    StartTls { auto: bool },
    /// `NBD_OPT_EXTENDED_HEADERS`.
    ExtendedHeaders { auto: bool },
    /// `NBD_OPT_STRUCTURED_REPLY`.
    StructuredReply { auto: bool },
    /// `NBD_OPT_SET_META_CONTEXT`, before GO/INFO (`then`) or by request (`then == None`).
    SetMeta { then: Option<u32>, contexts: MetaReplies },
    /// `NBD_OPT_LIST_META_CONTEXT`.
    ListMeta { contexts: MetaReplies },
    /// `NBD_OPT_GO` or `NBD_OPT_INFO` (`option`).
    GoInfo { option: u32, auto: bool, details: ExportReplies },
    /// `NBD_OPT_LIST`.
    /// `bytes`: of the names and descriptions so far (see [`MAX_LIST_BYTES`]).
    List { exports: Vec<ExportEntry>, bytes: usize },
    /// `NBD_OPT_ABORT`.
    Abort,
}

impl Purpose {
    /// `SET_META_CONTEXT` by request or before GO/INFO.
    pub fn set_meta(then: Option<u32>) -> Purpose {
        Purpose::SetMeta { then, contexts: MetaReplies::default() }
    }

    /// `LIST_META_CONTEXT`.
    pub fn list_meta() -> Purpose {
        Purpose::ListMeta { contexts: MetaReplies::default() }
    }

    /// GO or INFO.
    pub fn go_info(option: u32, auto: bool) -> Purpose {
        Purpose::GoInfo { option, auto, details: ExportReplies::default() }
    }

    /// `LIST`.
    pub fn list() -> Purpose {
        Purpose::List { exports: Vec::new(), bytes: 0 }
    }
}

/// What the connection has settled so far. STARTTLS starts it over (see
/// [`Settled::after_starttls`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Settled {
    pub structured_replies: bool,
    pub extended_headers: bool,
    /// TLS is running.
    pub tls: bool,
    /// The automatic negotiations already tried (each is tried once).
    pub tried_tls: bool,
    pub tried_extended: bool,
    pub tried_structured: bool,
}

impl Settled {
    /// Nothing negotiated in plaintext survives into TLS (the protocol says so;
    /// CVE-2021-3716 was a server keeping it): only the TLS attempt itself is remembered,
    /// and the rest is asked again over TLS.
    pub fn after_starttls(self) -> Settled {
        Settled {
            tls: self.tls,
            tried_tls: self.tried_tls,
            ..Settled::default()
        }
    }
}

/// The meta contexts the server agreed to for `export`: the finished answer of a
/// `NBD_OPT_SET_META_CONTEXT` (or the empty answer when none was needed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct MetaAnswer {
    pub export: String,
    pub contexts: Vec<MetaContext>,
}

/// The `NBD_REP_META_CONTEXT` replies of one SET or LIST request, in the order they came.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct MetaReplies(Vec<MetaContext>, usize);

impl MetaReplies {
    /// Adds one reply. `set`: ids name contexts for block status, so one id given twice
    /// is a protocol error (a LIST reply's ids mean nothing).
    pub fn add(&mut self, payload: &[u8], set: bool) -> Result<()> {
        let mut r = FieldReader::new(payload);
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
        self.1 += name.len();
        check_room(self.0.len(), self.1, "meta contexts")?;
        if set && self.0.iter().any(|m| m.id == id) {
            return Err(Error::protocol(format!(
                "server gave meta context id {id} to two contexts"
            )));
        }
        self.0.push(MetaContext { id, name: server_text(name) });
        Ok(())
    }

    /// The contexts, with their ids.
    pub fn into_contexts(self) -> Vec<MetaContext> {
        self.0
    }

    /// The names only (the answer an application sees).
    pub fn names(contexts: &[MetaContext]) -> Vec<String> {
        contexts.iter().map(|m| m.name.clone()).collect()
    }
}

/// Adds one `NBD_REP_SERVER` reply to the exports of a LIST.
/// `bytes` counts the names and descriptions of the list so far.
pub(super) fn add_export(exports: &mut Vec<ExportEntry>, bytes: &mut usize, payload: &[u8]) -> Result<()> {
    let mut r = FieldReader::new(payload);
    let Some(n) = r.u32() else {
        return Err(Error::protocol("NBD_REP_SERVER shorter than its name length"));
    };
    let Some(name) = r.take(n as usize) else {
        return Err(Error::protocol(format!(
            "NBD_REP_SERVER name claims {n} bytes, more than the reply holds"
        )));
    };
    let description = r.rest();
    for (what, text) in [("name", name), ("description", description)] {
        if text.len() > MAX_STRING {
            return Err(Error::protocol(format!(
                "NBD_REP_SERVER {what} of {} bytes, longer than {MAX_STRING}",
                text.len()
            )));
        }
    }
    *bytes += name.len() + description.len();
    check_room(exports.len(), *bytes, "exports")?;
    exports.push(ExportEntry {
        name: server_text(name),
        description: server_text(description),
    });
    Ok(())
}

/// Refuses a list that has grown past [`MAX_LIST_ENTRIES`] entries or [`MAX_LIST_BYTES`]
/// bytes of text.
fn check_room(len: usize, bytes: usize, what: &str) -> Result<()> {
    if len >= MAX_LIST_ENTRIES {
        return Err(Error::protocol(format!(
            "server listed more than {MAX_LIST_ENTRIES} {what}"
        )));
    }
    if bytes > MAX_LIST_BYTES {
        return Err(Error::protocol(format!(
            "server listed {what} with more than {MAX_LIST_BYTES} bytes of names"
        )));
    }
    Ok(())
}

/// The `NBD_REP_INFO` replies of one GO/INFO. A later reply of a type replaces an earlier.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct ExportReplies {
    /// `NBD_INFO_EXPORT`: size and flags (required).
    export: Option<ExportInfo>,
    block_size: Option<BlockSize>,
    canonical_name: Option<String>,
    description: Option<String>,
}

impl ExportReplies {
    /// Adds one `NBD_REP_INFO` reply.
    pub fn add(&mut self, payload: &[u8]) -> Result<()> {
        let mut r = FieldReader::new(payload);
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
                let mut r = FieldReader::new(body);
                let size = r.u64().unwrap();
                let flags = r.u16().unwrap();
                self.export = Some(export_info(size, flags)?);
            }
            INFO_BLOCK_SIZE => {
                if body.len() != 12 {
                    return Err(wrong_len("NBD_INFO_BLOCK_SIZE", 12));
                }
                let mut r = FieldReader::new(body);
                let bs = BlockSize {
                    minimum: r.u32().unwrap(),
                    preferred: r.u32().unwrap(),
                    maximum: r.u32().unwrap(),
                };
                validate_block_size(bs)?;
                self.block_size = Some(bs);
            }
            INFO_NAME | INFO_DESCRIPTION => {
                if body.len() > MAX_STRING {
                    return Err(Error::protocol(format!(
                        "NBD_INFO_{} is {} bytes, longer than {MAX_STRING}",
                        if info == INFO_NAME { "NAME" } else { "DESCRIPTION" },
                        body.len()
                    )));
                }
                let text = Some(server_text(body));
                if info == INFO_NAME {
                    self.canonical_name = text;
                } else {
                    self.description = text;
                }
            }
            // Unknown information types must be ignored (protocol specification).
            _ => {}
        }
        Ok(())
    }

    /// The export's details, once the server acknowledged `option`.
    pub fn finish(self, option: u32) -> Result<ExportInfo> {
        let Some(export) = self.export else {
            return Err(Error::protocol(format!(
                "server acknowledged {} without sending NBD_INFO_EXPORT",
                option_name(option)
            )));
        };
        Ok(ExportInfo {
            block_size: self.block_size,
            canonical_name: self.canonical_name,
            description: self.description,
            ..export
        })
    }
}

/// Size and transmission flags as a server sent them (oldstyle greeting, EXPORT_NAME reply,
/// `NBD_INFO_EXPORT`).
pub(super) fn export_info(size: u64, flags: u16) -> Result<ExportInfo> {
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
        && (bs.maximum == u32::MAX || bs.maximum.is_multiple_of(bs.minimum));
    if ok {
        Ok(())
    } else {
        Err(Error::protocol(format!(
            "server sent impossible block sizes: minimum {}, preferred {}, maximum {}",
            bs.minimum, bs.preferred, bs.maximum
        )))
    }
}
