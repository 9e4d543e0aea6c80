//! What the client asks for in the handshake: [`HandshakeConfig`] and [`TlsMode`].

use crate::consts::{FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES};

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
    /// Stop after the first negotiations and wait for [`OptRequest`](super::OptRequest)s.
    pub opt_mode: bool,
    /// Send `NBD_OPT_SET_META_CONTEXT` before `NBD_OPT_GO`/`NBD_OPT_INFO` when
    /// `meta_contexts` is not empty and structured replies were negotiated.
    pub request_meta_context: bool,
    /// Meta contexts to ask for (`nbd_add_meta_context`).
    pub meta_contexts: Vec<String>,
    /// Whether to negotiate TLS.
    pub tls: TlsMode,
    /// Keep a log of what is sent and received ([`Handshake::take_debug`](super::Handshake::take_debug)).
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
