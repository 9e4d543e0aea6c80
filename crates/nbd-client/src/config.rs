//! Settings of a handle, as libnbd's `nbd_set_*` calls.

use std::time::Duration;

use nbd_proto::consts::{FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES, STRICT_MASK};
use nbd_proto::handshake::{HandshakeConfig, TlsMode};

use crate::uri::UriPolicy;

/// How a handle connects and behaves. `Default` gives libnbd's defaults.
#[derive(Debug, Clone)]
pub struct Config {
    /// Export to attach to (`nbd_set_export_name`).
    pub export_name: String,
    /// Name used in messages (`nbd_set_handle_name`). When empty, [`crate::Handle::new`]
    /// names the handle `nbd1`, `nbd2`, … as libnbd's `nbd_create` does.
    pub handle_name: String,
    /// Strict-mode bits (`nbd_set_strict_mode`), all by default.
    pub strict: u32,
    /// Zero read buffers before reading (`nbd_set_pread_initialize`), on by default.
    pub pread_initialize: bool,
    /// Ask for structured replies (`nbd_set_request_structured_replies`).
    pub request_structured_replies: bool,
    /// Ask for extended headers (`nbd_set_request_extended_headers`).
    pub request_extended_headers: bool,
    /// Set meta contexts automatically before GO/INFO (`nbd_set_request_meta_context`).
    pub request_meta_context: bool,
    /// Meta contexts to ask for (`nbd_add_meta_context`).
    pub meta_contexts: Vec<String>,
    /// Stop in option negotiation after connecting (`nbd_set_opt_mode`).
    pub opt_mode: bool,
    /// Whether to use TLS (`nbd_set_tls`).
    pub tls: TlsMode,
    /// Directory of X.509 files (`nbd_set_tls_certificates`).
    pub tls_certificates: Option<String>,
    /// Verify the server's certificate (`nbd_set_tls_verify_peer`), on by default.
    pub tls_verify_peer: bool,
    /// User name for PSK (`nbd_set_tls_username`); the login name when unset.
    pub tls_username: Option<String>,
    /// psktool key file (`nbd_set_tls_psk_file`).
    pub tls_psk_file: Option<String>,
    /// Name to check the server's certificate against (`nbd_set_tls_hostname`); the
    /// host connected to when unset.
    pub tls_hostname: Option<String>,
    /// What `connect_uri` accepts (`nbd_set_uri_allow_*`).
    pub uri_policy: UriPolicy,
    /// Report what happens to the debug sink (`nbd_set_debug`).
    pub debug: bool,
    /// Ask for block size constraints (`nbd_set_request_block_size`).
    pub request_block_size: bool,
    /// Ask for the canonical name and description (`nbd_set_full_info`).
    pub full_info: bool,
    /// Handshake flags the client may use (`nbd_set_handshake_flags`).
    pub handshake_flags: u32,
    /// Limit on the whole connect and handshake; `None` waits as long as the OS does.
    pub connect_timeout: Option<Duration>,
    /// Commands on the wire at once; more are queued.
    pub max_in_flight: usize,
    /// `LISTEN_FDNAMES` for socket activation (`nbd_set_socket_activation_name`); empty
    /// means systemd's `unknown`.
    pub socket_activation_name: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            export_name: String::new(),
            handle_name: String::new(),
            strict: STRICT_MASK,
            pread_initialize: true,
            request_structured_replies: true,
            request_extended_headers: true,
            request_meta_context: true,
            meta_contexts: Vec::new(),
            opt_mode: false,
            tls: TlsMode::Disable,
            tls_certificates: None,
            tls_verify_peer: true,
            tls_username: None,
            tls_psk_file: None,
            tls_hostname: None,
            uri_policy: UriPolicy::default(),
            debug: false,
            request_block_size: true,
            full_info: false,
            handshake_flags: FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES,
            connect_timeout: None,
            max_in_flight: 64,
            socket_activation_name: String::new(),
        }
    }
}

impl Config {
    pub(crate) fn handshake(&self) -> HandshakeConfig {
        HandshakeConfig {
            export_name: self.export_name.clone(),
            request_structured_replies: self.request_structured_replies,
            request_extended_headers: self.request_extended_headers,
            request_block_size: self.request_block_size,
            full_info: self.full_info,
            handshake_flags: self.handshake_flags,
            opt_mode: self.opt_mode,
            request_meta_context: self.request_meta_context,
            meta_contexts: self.meta_contexts.clone(),
            tls: self.tls,
            debug: self.debug,
        }
    }
}
