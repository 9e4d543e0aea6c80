//! What the handshake settles: the finished values it hands to the transmission phase
//! ([`Negotiated`], [`ExportInfo`], [`MetaContext`]) and to option requests
//! ([`ExportEntry`]).

use crate::consts::{DEFAULT_PAYLOAD, FLAG_BLOCK_STAT_PAYLOAD, FLAG_SEND_DF, MAX_PAYLOAD_HARD};
use crate::errno::Errno;
use crate::error::{Error, Result};

/// The handshake style the server spoke.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// The oldstyle greeting: size and flags, no options.
    Oldstyle,
    /// Newstyle without `NBD_FLAG_FIXED_NEWSTYLE`: only `NBD_OPT_EXPORT_NAME`.
    Newstyle,
    /// Fixed newstyle: option negotiation.
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
    /// The smallest block the server can address (requests are aligned to it).
    pub minimum: u32,
    /// The block size the server handles best.
    pub preferred: u32,
    /// The largest payload the server accepts in one request.
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
    /// The id the server gave it for this connection.
    pub id: u32,
    /// Its name, such as `base:allocation`.
    pub name: String,
}

/// The result of a successful handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    /// The handshake style the server spoke.
    pub protocol: Protocol,
    /// Structured replies were negotiated (`NBD_OPT_STRUCTURED_REPLY`, or implied by
    /// extended headers).
    pub structured_replies: bool,
    /// Extended headers were negotiated (`NBD_OPT_EXTENDED_HEADERS`: 64-bit lengths).
    pub extended_headers: bool,
    /// TLS is running on the connection.
    pub tls: bool,
    /// The export's size, flags and details.
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
    /// `nbd_can_df`: the server's `NBD_FLAG_SEND_DF`, and structured replies to carry a
    /// read that asks for one data chunk.
    pub fn can_df(&self) -> bool {
        self.structured_replies && self.export.has(FLAG_SEND_DF)
    }

    /// `nbd_can_block_status_payload`: extended headers and the server's
    /// `NBD_FLAG_BLOCK_STAT_PAYLOAD`, which a filtered block status needs.
    pub fn can_block_status_payload(&self) -> bool {
        self.extended_headers && self.export.has(FLAG_BLOCK_STAT_PAYLOAD)
    }

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
    /// The export's name.
    pub name: String,
    /// Its description (empty when the server sent none).
    pub description: String,
}
