//! The settings of a handle, as libnbd's `nbd_set_*` calls: one model, in three parts.
//!
//! - [`NegotiationSettings`]: what the handshake asks the server for (export name, structured
//!   replies, meta contexts, …). It is `nbd-proto`'s handshake configuration itself: the
//!   handshake is started with a copy of it, and while negotiating (option mode) a change
//!   replaces the machine's copy whole.
//! - [`TlsSettings`]: everything about TLS (mode, files, names, verification), the one type
//!   the URI parser, the handle and the TLS connector share.
//! - the rest: how the handle behaves (name, strict mode, debug, timeouts, …).
//!
//! Which call may change which setting in which state is the handle's business (see
//! [`Handle`](crate::Handle)'s setters): each checks its own row of the state table.

use std::time::Duration;

use nbd_proto::consts::STRICT_MASK;

pub use nbd_proto::handshake::HandshakeConfig as NegotiationSettings;

pub use crate::tls::TlsSettings;
use crate::uri::UriPolicy;

/// How a handle connects and behaves. `Default` gives libnbd's defaults.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Name used in messages (`nbd_set_handle_name`). When empty, [`crate::Handle::new`]
    /// names the handle `nbd1`, `nbd2`, … as libnbd's `nbd_create` does.
    pub handle_name: String,
    /// Strict-mode bits (`nbd_set_strict_mode`), all by default.
    pub strict: u32,
    /// Zero read buffers before reading (`nbd_set_pread_initialize`), on by default.
    pub pread_initialize: bool,
    /// Report what happens to the debug sink (`nbd_set_debug`).
    pub debug: bool,
    /// What the handshake asks for. Its `tls` and `debug` fields are not settings of their
    /// own: the handshake is given [`TlsSettings::mode`] and [`Settings::debug`]
    /// ([`Settings::handshake`]).
    pub negotiation: NegotiationSettings,
    /// TLS: whether, and with which files and names.
    pub tls: TlsSettings,
    /// What `connect_uri` accepts (`nbd_set_uri_allow_*`).
    pub uri_policy: UriPolicy,
    /// Limit on the whole connect and handshake, and in option mode on each option request;
    /// `None` waits as long as the OS does.
    pub connect_timeout: Option<Duration>,
    /// Commands on the wire at once; more are queued.
    pub max_in_flight: usize,
    /// `LISTEN_FDNAMES` for socket activation (`nbd_set_socket_activation_name`); empty
    /// means systemd's `unknown`.
    pub socket_activation_name: String,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            handle_name: String::new(),
            strict: STRICT_MASK,
            pread_initialize: true,
            debug: false,
            negotiation: NegotiationSettings::default(),
            tls: TlsSettings::default(),
            uri_policy: UriPolicy::default(),
            connect_timeout: None,
            max_in_flight: 64,
            socket_activation_name: String::new(),
        }
    }
}

impl Settings {
    /// The handshake's configuration: the negotiation settings, with the TLS mode and the
    /// debug switch in force.
    pub fn handshake(&self) -> NegotiationSettings {
        NegotiationSettings {
            tls: self.tls.mode,
            debug: self.debug,
            ..self.negotiation.clone()
        }
    }
}
