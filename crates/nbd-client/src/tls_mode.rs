//! The three TLS settings of libnbd's `nbd_set_tls` and `nbd_set_uri_allow_tls`.

/// Whether TLS is off, tried, or insisted on (libnbd's `LIBNBD_TLS_*`, numbered as libnbd
/// numbers them). Used by the TLS setting of a handle and by [`UriPolicy`](crate::uri::UriPolicy).
/// The default is `Disable`, libnbd's default for `nbd_set_tls`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum TlsMode {
    /// No TLS (`LIBNBD_TLS_DISABLE` = 0).
    #[default]
    Disable,
    /// TLS when the server offers it, plain otherwise (`LIBNBD_TLS_ALLOW` = 1).
    Allow,
    /// TLS or failure (`LIBNBD_TLS_REQUIRE` = 2).
    Require,
}

impl TlsMode {
    /// libnbd's number for this mode.
    pub fn as_raw(self) -> u32 {
        match self {
            TlsMode::Disable => 0,
            TlsMode::Allow => 1,
            TlsMode::Require => 2,
        }
    }

    /// The mode with libnbd's number `raw`, if there is one.
    pub fn from_raw(raw: u32) -> Option<TlsMode> {
        match raw {
            0 => Some(TlsMode::Disable),
            1 => Some(TlsMode::Allow),
            2 => Some(TlsMode::Require),
            _ => None,
        }
    }

    /// The lower-case name JavaScript uses: `"disable"`, `"allow"` or `"require"`.
    pub fn name(self) -> &'static str {
        match self {
            TlsMode::Disable => "disable",
            TlsMode::Allow => "allow",
            TlsMode::Require => "require",
        }
    }
}
