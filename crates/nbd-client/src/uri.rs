//! NBD URIs: parsing ([`parse`]), writing ([`format()`]), and the policy that limits what a URI
//! may ask of a handle ([`UriPolicy`]).
//!
//! The grammar is the NBD project's URI standard (doc/uri.md of NetworkBlockDevice/nbd), as
//! libnbd's `nbd_connect_uri` reads it:
//!
//! ```text
//! nbd://[user@][host][:port][/export][?query]              TCP, plain
//! nbds://[user@][host][:port][/export][?query]             TCP, TLS required
//! nbd+unix://[user@]/[export]?socket=PATH[&query]          Unix domain socket, plain
//! nbds+unix://[user@]/[export]?socket=PATH[&query]         Unix domain socket, TLS required
//! nbd+vsock://[user@][cid][:port][/export][?query]         AF_VSOCK, plain
//! nbds+vsock://[user@][cid][:port][/export][?query]        AF_VSOCK, TLS required
//! nbd+ssh://[user@]host[:port][/export][?query]            through ssh, plain
//! nbds+ssh://[user@]host[:port][/export][?query]           through ssh, TLS required
//! ```
//!
//! - TCP: the host is a name, an IPv4 address, or an IPv6 address in brackets (`[::1]`, with
//!   an optional RFC 6874 zone, `[fe80::1%25eth0]`). No host means `localhost`; no port (or an
//!   empty one) means 10809. Ports run from 1 to 65535.
//! - Unix: the `socket` query parameter names the socket and is required; the authority holds
//!   at most a user name (`nbds+unix://alice@/?socket=...`), never a host or port.
//! - Vsock: the host is the numeric CID, 2 (the hypervisor) when absent; the port is any
//!   32-bit number, 10809 when absent.
//! - Ssh (libnbd 1.22's `nbd+ssh`): the client runs `ssh` to log in to the host (the URI's
//!   port is ssh's port, ssh's own default when absent; `user@` is also the ssh login), and
//!   ssh runs `nc` on that host to reach the NBD server there: its Unix socket when the
//!   `socket` parameter names one (`nc -U PATH`), else TCP port `nbd-port` (10809 when
//!   absent) on the remote `localhost`. `compress` (a boolean) adds ssh's `-C`. See
//!   [`ssh_argv`]. The host is required and may not begin with `-`.
//! - The export name is the path without its leading `/`, percent-decoded: `nbd://h` and
//!   `nbd://h/` both name the export `""`, `nbd://h//x` names `"/x"`, `nbd://h/a%20b` names
//!   `"a b"`.
//! - `user@` is the TLS user name (percent-decoded). A password (`user:pw@`) is refused.
//! - Query parameters, percent-decoded, separated by `&` or `;`, their names in any case
//!   (`SOCKET=` is `socket=`, as libnbd): `socket`, `tls-certificates`,
//!   `tls-psk-file`, `tls-hostname`, `tls-verify-peer` (as libnbd: `true`/`false`, `t`/`f`,
//!   `yes`/`no`, `y`/`n`, `on`/`off` in any case, `1`/`0`; anything else, a bare
//!   `tls-verify-peer` included, is `EINVAL`), and
//!   for ssh URIs `nbd-port` and `compress` (a boolean read the same way). A parameter given
//!   twice takes its last value. Parameters with other names are ignored, as libnbd ignores them; they
//!   are kept in [`NbdUri::unknown_params`] so a caller can mention them in debug output.
//!   TLS parameters are accepted on plain schemes too (as in libnbd, they then have no
//!   effect because TLS is off).
//! - A `#fragment` is ignored, as libnbd ignores it.
//!
//! # Choices where libnbd and the standard leave room
//!
//! - The scheme is matched without regard to case (`NBD://` works), as RFC 3986 §3.1 says;
//!   libnbd compares it exactly.
//! - Characters RFC 3986 does not allow unescaped (space, `"`, `<`, `>`, `\`, `^`, `` ` ``,
//!   `{`, `|`, `}`, control characters, `[` and `]` outside an IPv6 host) are refused, as
//!   libnbd (through libxml2) refuses them. Unescaped non-ASCII characters are accepted, as
//!   an IRI (RFC 3987) allows, so `nbd://host/café` names the export `café`.
//! - Every decoded string must be valid UTF-8 (JavaScript strings cannot hold anything else)
//!   and must not contain NUL (`%00`), which libnbd would silently cut the string at. So
//!   abstract-namespace Unix sockets (`socket=%00name`) are refused, as libnbd refuses them.
//! - Out-of-range ports and CIDs are refused rather than wrapped or defaulted.
//!
//! # Errors
//!
//! A malformed URI fails with `EINVAL`; a URI the [`UriPolicy`] forbids fails with `EPERM`,
//! as in libnbd. Messages name the part that is wrong. No input makes these functions panic.

use std::fmt;
use std::fmt::Write as _;
use std::net::Ipv6Addr;
use std::str::FromStr;

use nbd_proto::{Errno, Error, Result};

use nbd_proto::handshake::TlsMode;

use crate::tls::TlsSettings;

/// The NBD port assigned by IANA, used when a TCP or vsock URI names none.
pub const DEFAULT_PORT: u16 = 10809;
/// The vsock CID of the host (hypervisor), used when a vsock URI names none.
pub const VSOCK_CID_HOST: u32 = 2;

/// TCP URIs (`nbd://`, `nbds://`) are allowed (`LIBNBD_ALLOW_TRANSPORT_TCP`).
pub const ALLOW_TRANSPORT_TCP: u32 = 0x1;
/// Unix-socket URIs (`nbd+unix://`, `nbds+unix://`) are allowed (`LIBNBD_ALLOW_TRANSPORT_UNIX`).
pub const ALLOW_TRANSPORT_UNIX: u32 = 0x2;
/// Vsock URIs (`nbd+vsock://`, `nbds+vsock://`) are allowed (`LIBNBD_ALLOW_TRANSPORT_VSOCK`).
pub const ALLOW_TRANSPORT_VSOCK: u32 = 0x4;
/// Ssh URIs (`nbd+ssh://`, `nbds+ssh://`) are allowed (`LIBNBD_ALLOW_TRANSPORT_SSH`).
pub const ALLOW_TRANSPORT_SSH: u32 = 0x8;
/// Every transport this library knows (`LIBNBD_ALLOW_TRANSPORT_MASK`).
pub const ALLOW_TRANSPORT_MASK: u32 =
    ALLOW_TRANSPORT_TCP | ALLOW_TRANSPORT_UNIX | ALLOW_TRANSPORT_VSOCK | ALLOW_TRANSPORT_SSH;
/// The NBD port on the far side of an ssh URI when `nbd-port` names none.
pub const SSH_DEFAULT_NBD_PORT: u16 = DEFAULT_PORT;

/// What an NBD URI asks for: where to connect, which export, and the TLS settings.
///
/// The TLS fields say what the URI says, no more: a URI changes only the TLS settings it
/// names ([`NbdUri::apply_tls`]), and the URI policy judges what the URI itself asks for.
/// A handle connecting to it sets the export name and applies the TLS part to its
/// [`TlsSettings`]; [`NbdUri::describing`] goes the other way, for `nbd_get_uri`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    /// The scheme is one of the `nbds` ones: TLS is required.
    pub tls: bool,
    /// Where the server is.
    pub transport: UriTransport,
    /// The export name, decoded (`""` when the URI has no path).
    pub export_name: String,
    /// The user name from `user@`, for TLS PSK authentication (`nbd_set_tls_username`).
    /// An empty one (`nbd://@host`) counts as none.
    pub tls_username: Option<String>,
    /// `tls-certificates=DIR` (`nbd_set_tls_certificates`); reads local files.
    pub tls_certificates: Option<String>,
    /// `tls-psk-file=FILE` (`nbd_set_tls_psk_file`); reads a local file.
    pub tls_psk_file: Option<String>,
    /// `tls-hostname=NAME` (`nbd_set_tls_hostname`): the name to check the certificate against.
    pub tls_hostname: Option<String>,
    /// `tls-verify-peer=BOOL` (`nbd_set_tls_verify_peer`).
    pub tls_verify_peer: Option<bool>,
    /// Query parameters this library does not know, as `(name, value)` in URI order. They do
    /// not change the connection (libnbd ignores them too); [`format()`] writes them back.
    pub unknown_params: Vec<(String, String)>,
}

/// Where an NBD URI says the server is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UriTransport {
    /// A TCP server. `host` is a name or an address as `getaddrinfo` takes it: an IPv6
    /// address without brackets, its zone after a plain `%` (`fe80::1%eth0`).
    Tcp {
        /// The host: a name or an address.
        host: String,
        /// The TCP port.
        port: u16,
    },
    /// A Unix domain socket at the path `socket`.
    Unix {
        /// The socket's path.
        socket: String,
    },
    /// An AF_VSOCK server.
    Vsock {
        /// The context id.
        cid: u32,
        /// The vsock port.
        port: u32,
    },
    /// A server on another host, reached by running `ssh` there (see [`ssh_argv`]).
    Ssh {
        /// The host ssh logs in to, as ssh takes it (an IPv6 address without brackets).
        host: String,
        /// ssh's port; `None` leaves it to ssh (22, or its configuration).
        port: Option<u16>,
        /// Where `nc` on that host finds the NBD server.
        remote: SshRemote,
        /// `compress=true`: ssh compresses the stream (`-C`).
        compress: bool,
    },
}

/// Where the NBD server is, as seen from the host an ssh URI logs in to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SshRemote {
    /// A Unix socket there (`socket=PATH`).
    Unix(String),
    /// A TCP port on that host's `localhost` (`nbd-port=N`, 10809 by default).
    Tcp(u16),
}

impl UriTransport {
    /// This transport's `ALLOW_TRANSPORT_*` bit.
    pub fn allow_bit(&self) -> u32 {
        match self {
            UriTransport::Tcp { .. } => ALLOW_TRANSPORT_TCP,
            UriTransport::Unix { .. } => ALLOW_TRANSPORT_UNIX,
            UriTransport::Vsock { .. } => ALLOW_TRANSPORT_VSOCK,
            UriTransport::Ssh { .. } => ALLOW_TRANSPORT_SSH,
        }
    }

    fn kind(&self) -> Kind {
        match self {
            UriTransport::Tcp { .. } => Kind::Tcp,
            UriTransport::Unix { .. } => Kind::Unix,
            UriTransport::Vsock { .. } => Kind::Vsock,
            UriTransport::Ssh { .. } => Kind::Ssh,
        }
    }
}

impl NbdUri {
    /// The scheme that says this transport and TLS setting, e.g. `"nbds+unix"`.
    pub fn scheme(&self) -> &'static str {
        scheme_name(self.transport.kind(), self.tls)
    }

    /// A URI for `transport` and `export_name` that says everything `tls` holds: `nbds` when
    /// `tls_in_use`, the user name and files whenever they are set (TLS or not, as libnbd's
    /// `nbd_get_uri`), and `tls-verify-peer=false` when verification is off.
    pub fn describing(transport: UriTransport, export_name: String, tls: &TlsSettings, tls_in_use: bool) -> NbdUri {
        let path = |p: &Option<std::path::PathBuf>| p.as_ref().map(|p| p.to_string_lossy().into_owned());
        NbdUri {
            tls: tls_in_use,
            transport,
            export_name,
            tls_username: tls.username.clone(),
            tls_certificates: path(&tls.certificates),
            tls_psk_file: path(&tls.psk_file),
            tls_hostname: tls.hostname.clone(),
            tls_verify_peer: if tls.verify_peer { None } else { Some(false) },
            unknown_params: Vec::new(),
        }
    }

    /// Changes `tls` as connecting to this URI does (`nbd_connect_uri`): TLS required for an
    /// `nbds` scheme (a plain one leaves the mode alone, as libnbd), and each TLS setting the
    /// URI names.
    pub fn apply_tls(&self, tls: &mut TlsSettings) {
        if self.tls {
            tls.mode = TlsMode::Require;
        }
        if let Some(name) = &self.tls_username {
            tls.username = Some(name.clone());
        }
        if let Some(dir) = &self.tls_certificates {
            tls.certificates = Some(dir.into());
        }
        if let Some(file) = &self.tls_psk_file {
            tls.psk_file = Some(file.into());
        }
        if let Some(host) = &self.tls_hostname {
            tls.hostname = Some(host.clone());
        }
        if let Some(on) = self.tls_verify_peer {
            tls.verify_peer = on;
        }
    }
}

impl FromStr for NbdUri {
    type Err = Error;

    /// Same as [`parse`].
    fn from_str(s: &str) -> Result<NbdUri> {
        parse(s)
    }
}

impl fmt::Display for NbdUri {
    /// Same as [`format()`].
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format(self))
    }
}

/// True: this library always understands NBD URIs (`nbd_supports_uri`; libnbd answers false
/// when built without libxml2).
pub fn supports_uri() -> bool {
    true
}

/// A cheap guess whether `s` is meant as an NBD URI rather than, say, a file name
/// (`nbd_is_uri`): true when it begins with one of the eight NBD schemes followed by `://`,
/// in any case (`nbd:foo` is not one, as in libnbd). It does not check the rest, so
/// [`parse`] may still refuse a string this accepts.
pub fn is_uri(s: &str) -> bool {
    SCHEMES.iter().any(|&(name, _, _)| {
        let name = name.as_bytes();
        s.len() >= name.len() + 3
            && s.as_bytes()[..name.len()].eq_ignore_ascii_case(name)
            && &s.as_bytes()[name.len()..name.len() + 3] == b"://"
    })
}

/// Limits on what URIs may ask for, as libnbd's `nbd_set_uri_allow_transports`,
/// `nbd_set_uri_allow_tls` and `nbd_set_uri_allow_local_file`. `Default` gives libnbd's
/// defaults: every transport, TLS or not, no local files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UriPolicy {
    /// `ALLOW_TRANSPORT_*` bits of the transports a URI may use.
    pub allow_transports: u32,
    /// `Disable`: `nbds` schemes are refused. `Allow`: either kind. `Require`: only `nbds`.
    pub allow_tls: TlsMode,
    /// Whether `tls-certificates` and `tls-psk-file`, which make the handle read local
    /// files, may appear.
    pub allow_local_file: bool,
}

impl Default for UriPolicy {
    fn default() -> Self {
        UriPolicy {
            allow_transports: ALLOW_TRANSPORT_MASK,
            allow_tls: TlsMode::Allow,
            allow_local_file: false,
        }
    }
}

impl UriPolicy {
    /// Refuses, with `EPERM`, a URI whose transport, TLS setting or local-file parameters
    /// this policy forbids; the checks run in that order, as in libnbd.
    pub fn check(&self, uri: &NbdUri) -> Result<()> {
        let scheme = uri.scheme();
        if self.allow_transports & uri.transport.allow_bit() == 0 {
            let bit = match uri.transport.kind() {
                Kind::Tcp => "TCP",
                Kind::Unix => "UNIX",
                Kind::Vsock => "VSOCK",
                Kind::Ssh => "SSH",
            };
            return Err(denied(format!(
                "URI transport {scheme} is not permitted: uriAllowTransports does not include {bit}"
            )));
        }
        match (self.allow_tls, uri.tls) {
            (TlsMode::Disable, true) => {
                return Err(denied(format!(
                    "URI scheme {scheme} is not permitted: uriAllowTls is 'disable', so the \
                     URI must not ask for TLS (use {})",
                    scheme_name(uri.transport.kind(), false)
                )))
            }
            (TlsMode::Require, false) => {
                return Err(denied(format!(
                    "URI scheme {scheme} is not permitted: uriAllowTls is 'require', so the \
                     URI must ask for TLS (use {})",
                    scheme_name(uri.transport.kind(), true)
                )))
            }
            _ => {}
        }
        if !self.allow_local_file {
            for (param, value) in [
                ("tls-certificates", &uri.tls_certificates),
                ("tls-psk-file", &uri.tls_psk_file),
            ] {
                if value.is_some() {
                    return Err(denied(format!(
                        "URI parameter {param} is not allowed: uriAllowLocalFile is off \
                         (the parameter makes the handle read a local file)"
                    )));
                }
            }
        }
        Ok(())
    }
}

/// Parses an NBD URI (`nbd_connect_uri`'s grammar; see the [module](self) documentation).
/// Fails with `EINVAL` and a message naming the fault when `uri` is not a valid NBD URI.
/// No policy is applied; see [`UriPolicy::check`].
pub fn parse(uri: &str) -> Result<NbdUri> {
    let mut parts = Parts::split(uri)?;
    let transport = match parts.kind {
        Kind::Tcp => tcp_transport(&parts)?,
        Kind::Unix => unix_transport(&mut parts)?,
        Kind::Vsock => vsock_transport(&parts)?,
        Kind::Ssh => ssh_transport(&mut parts)?,
    };
    let mut params = parts.params;
    // nbd-port and compress mean something only to ssh URIs; elsewhere they are ignored
    // like any parameter this library does not know.
    if let Some(v) = params.nbd_port.take() {
        params.unknown.push(("nbd-port".to_string(), v));
    }
    if let Some(v) = params.compress.take() {
        params.unknown.push(("compress".to_string(), v));
    }
    Ok(NbdUri {
        tls: parts.tls,
        transport,
        export_name: parts.export_name,
        tls_username: parts.tls_username,
        tls_certificates: params.tls_certificates,
        tls_psk_file: params.tls_psk_file,
        tls_hostname: params.tls_hostname,
        tls_verify_peer: params.tls_verify_peer,
        unknown_params: params.unknown,
    })
}

/// A URI taken apart, each part checked and decoded, before its transport is read.
struct Parts<'a> {
    kind: Kind,
    tls: bool,
    scheme: &'static str,
    /// The authority without its user info, as written.
    hostport: &'a str,
    host: Host<'a>,
    /// The port as written; `None` when absent or empty (the default port, RFC 3986 §6.2.3).
    port: Option<&'a str>,
    tls_username: Option<String>,
    export_name: String,
    params: Params,
}

impl<'a> Parts<'a> {
    /// Splits `uri` into scheme, authority, path, query and fragment, and checks and decodes
    /// each (in that order, so that the first fault in reading order is the one reported).
    fn split(uri: &'a str) -> Result<Parts<'a>> {
        let (kind, tls, after_scheme) = split_scheme(uri)?;
        let scheme = scheme_name(kind, tls);
        let Some(rest) = after_scheme.strip_prefix("//") else {
            return Err(invalid(format!(
                "URI must begin with '{scheme}://' (got {})",
                shown(uri)
            )));
        };

        // Fragment, query, path, in that order: '#' ends everything, '?' ends the path.
        let (rest, fragment) = split_at_byte(rest, b'#');
        let (rest, query) = split_at_byte(rest, b'?');
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };

        // Authority: [userinfo@]host[:port]. Userinfo cannot hold a raw '@', so the last one
        // ends it.
        let (userinfo, hostport) = match authority.rfind('@') {
            Some(i) => (Some(&authority[..i]), &authority[i + 1..]),
            None => (None, authority),
        };
        let tls_username = match userinfo {
            Some(user) => {
                check_chars(uri, user, Part::UserInfo)?;
                Some(decode(user, "user name")?).filter(|u| !u.is_empty())
            }
            None => None,
        };
        let (host, port) = split_host_port(uri, hostport)?;

        check_chars(uri, path, Part::Path)?;
        let export_name = match path.strip_prefix('/') {
            Some(name) => decode(name, "export name")?,
            None => String::new(),
        };

        let params = match query {
            Some(q) => {
                check_chars(uri, q, Part::Query)?;
                parse_query(q)?
            }
            None => Params::default(),
        };
        if let Some(f) = fragment {
            // Ignored, as libnbd ignores it, but it must still be well-formed.
            check_chars(uri, f, Part::Query)?;
        }
        Ok(Parts {
            kind,
            tls,
            scheme,
            hostport,
            host,
            port: port.filter(|p| !p.is_empty()),
            tls_username,
            export_name,
            params,
        })
    }
}

/// `nbd://` and `nbds://`: a host (`localhost` when none) and a port (10809 when none).
fn tcp_transport(parts: &Parts) -> Result<UriTransport> {
    refuse_socket(&parts.params, parts.scheme, parts.tls)?;
    let host = parts.host.decoded()?.unwrap_or_else(|| "localhost".to_string());
    let port = match parts.port {
        Some(text) => parse_number(text, "port", 1, u16::MAX.into())? as u16,
        None => DEFAULT_PORT,
    };
    Ok(UriTransport::Tcp { host, port })
}

/// `nbd+unix://` and `nbds+unix://`: no host or port, a non-empty `socket=`.
fn unix_transport(parts: &mut Parts) -> Result<UriTransport> {
    let scheme = parts.scheme;
    if !parts.hostport.is_empty() {
        return Err(invalid(format!(
            "{scheme} URIs name no host or port (got {}); the socket is given by the \
             socket= query parameter, as in {scheme}:///export?socket=/path/to/socket",
            shown(parts.hostport)
        )));
    }
    let Some(socket) = parts.params.socket.take() else {
        return Err(invalid(format!(
            "{scheme} URI needs a socket= query parameter, as in \
             {scheme}:///export?socket=/path/to/socket"
        )));
    };
    Ok(UriTransport::Unix { socket: non_empty_socket(socket)? })
}

/// `socket=` of a Unix or ssh URI, refused when empty.
fn non_empty_socket(socket: String) -> Result<String> {
    if socket.is_empty() {
        return Err(invalid("the socket= query parameter of the URI is empty"));
    }
    Ok(socket)
}

/// `nbd+vsock://` and `nbds+vsock://`: a numeric CID (2 when none) and a 32-bit port.
fn vsock_transport(parts: &Parts) -> Result<UriTransport> {
    let scheme = parts.scheme;
    refuse_socket(&parts.params, scheme, parts.tls)?;
    let cid = match &parts.host {
        Host::Empty => VSOCK_CID_HOST,
        Host::Name(raw) => {
            let text = decode(raw, "vsock CID")?;
            parse_number(&text, "vsock CID", 0, u32::MAX.into())? as u32
        }
        Host::Ipv6(_) => {
            return Err(invalid(format!(
                "{scheme} URIs take a numeric CID as host, not an IPv6 address"
            )))
        }
    };
    let port = match parts.port {
        Some(text) => parse_number(text, "vsock port", 0, u32::MAX.into())? as u32,
        None => DEFAULT_PORT.into(),
    };
    Ok(UriTransport::Vsock { cid, port })
}

/// `nbd+ssh://` and `nbds+ssh://`: the host to log in to (required, not starting with
/// `-`), ssh's port, where the server is on that host, and `compress`.
fn ssh_transport(parts: &mut Parts) -> Result<UriTransport> {
    let scheme = parts.scheme;
    let Some(host) = parts.host.decoded()? else {
        return Err(invalid(format!(
            "{scheme} URIs need the host to log in to, as in {scheme}://host/export"
        )));
    };
    if host.starts_with('-') {
        return Err(invalid(format!(
            "the host {} of the {scheme} URI begins with '-', which ssh would read as \
             an option",
            shown(&host)
        )));
    }
    let port = match parts.port {
        Some(text) => Some(parse_number(text, "ssh port", 1, u16::MAX.into())? as u16),
        None => None,
    };
    let params = &mut parts.params;
    let remote = match (params.socket.take(), params.nbd_port.take()) {
        (Some(_), Some(_)) => {
            return Err(invalid(format!(
                "a {scheme} URI names either the remote socket (socket=) or the \
                 remote TCP port (nbd-port=), not both"
            )))
        }
        (Some(socket), None) => SshRemote::Unix(non_empty_socket(socket)?),
        (None, Some(text)) => {
            SshRemote::Tcp(parse_number(&text, "nbd-port", 1, u16::MAX.into())? as u16)
        }
        (None, None) => SshRemote::Tcp(SSH_DEFAULT_NBD_PORT),
    };
    let compress = match params.compress.take() {
        Some(text) => parse_bool("compress", &text)?,
        None => false,
    };
    Ok(UriTransport::Ssh { host, port, remote, compress })
}

/// Writes `uri` as an NBD URI, in the forms libnbd's `nbd_get_uri` uses:
/// `nbd://host:port/export` (the port always written), `nbd+unix:///export?socket=PATH`,
/// `nbd+vsock://cid:port/export`, `nbd+ssh://host[:port]/export` (with `socket`, or
/// `nbd-port` when it is not 10809, and `compress=true` when set), with `user@` and the TLS
/// parameters when set, then any
/// [`unknown_params`](NbdUri::unknown_params). Everything but unreserved characters (and `/`
/// in the path and in parameter values) is percent-encoded, non-ASCII included.
///
/// [`parse`] of the result gives `uri` back whenever `uri` is something `parse` can return:
/// a non-empty TCP host (an empty one is written as no host, which reads back as
/// `localhost`), a TCP port above 0, a non-empty Unix socket path, no NUL in any string, no
/// empty `tls_username`, and unknown parameter names that are non-empty and not among the
/// known ones.
pub fn format(uri: &NbdUri) -> String {
    let mut out = String::with_capacity(32 + uri.export_name.len());
    out.push_str(uri.scheme());
    out.push_str("://");
    if let Some(user) = uri.tls_username.as_deref().filter(|u| !u.is_empty()) {
        encode_into(&mut out, user, b"");
        out.push('@');
    }
    let mut params: Vec<(&str, &str)> = Vec::new();
    let mut nbd_port: Option<String> = None;
    match &uri.transport {
        UriTransport::Tcp { host, port } => {
            write_host(&mut out, host);
            let _ = write!(out, ":{port}");
        }
        UriTransport::Unix { socket } => params.push(("socket", socket)),
        UriTransport::Vsock { cid, port } => {
            let _ = write!(out, "{cid}:{port}");
        }
        UriTransport::Ssh { host, port, remote, compress } => {
            write_host(&mut out, host);
            if let Some(port) = port {
                let _ = write!(out, ":{port}");
            }
            match remote {
                SshRemote::Unix(socket) => params.push(("socket", socket)),
                SshRemote::Tcp(p) => nbd_port = (*p != SSH_DEFAULT_NBD_PORT).then(|| p.to_string()),
            }
            if *compress {
                params.push(("compress", "true"));
            }
        }
    }
    if let Some(p) = &nbd_port {
        params.push(("nbd-port", p));
    }
    out.push('/');
    encode_into(&mut out, &uri.export_name, b"/");

    if let Some(v) = &uri.tls_certificates {
        params.push(("tls-certificates", v));
    }
    if let Some(v) = &uri.tls_psk_file {
        params.push(("tls-psk-file", v));
    }
    if let Some(v) = &uri.tls_hostname {
        params.push(("tls-hostname", v));
    }
    if let Some(v) = uri.tls_verify_peer {
        params.push(("tls-verify-peer", if v { "true" } else { "false" }));
    }
    for (name, value) in &uri.unknown_params {
        params.push((name, value));
    }
    for (i, (name, value)) in params.iter().enumerate() {
        out.push(if i == 0 { '?' } else { '&' });
        encode_into(&mut out, name, b"");
        out.push('=');
        encode_into(&mut out, value, b"/");
    }
    out
}

/// The command that reaches the server of an ssh URI, as `nbd_connect_command` takes it:
/// `ssh [-C] [-p PORT] [-o User=USER] -- HOST nc -U SOCKET` for a remote Unix socket, or
/// `... -- HOST nc localhost NBD-PORT` for a remote TCP port. ssh joins what follows the
/// host into one command line for the remote shell, so the socket path is quoted for a
/// POSIX shell. `None` for URIs of other transports.
///
/// The remote host needs `nc` (netcat) with Unix-socket support (`-U`) for the socket
/// form; ssh must log in without asking for a password (keys or an agent), because its
/// stdin and stdout carry the NBD stream.
pub fn ssh_argv(uri: &NbdUri) -> Option<Vec<String>> {
    let UriTransport::Ssh { host, port, remote, compress } = &uri.transport else {
        return None;
    };
    let mut argv = vec!["ssh".to_string()];
    if *compress {
        argv.push("-C".into());
    }
    if let Some(port) = port {
        argv.extend(["-p".into(), port.to_string()]);
    }
    if let Some(user) = uri.tls_username.as_deref().filter(|u| !u.is_empty()) {
        argv.extend(["-o".into(), format!("User={user}")]);
    }
    argv.extend(["--".into(), host.clone(), "nc".into()]);
    match remote {
        SshRemote::Unix(socket) => argv.extend(["-U".into(), shell_quote(socket)]),
        SshRemote::Tcp(p) => argv.extend(["localhost".into(), p.to_string()]),
    }
    Some(argv)
}

/// `s` as one word for a POSIX shell: as it is when it holds only characters no shell
/// treats specially, else in single quotes (a `'` inside written as `'\''`).
fn shell_quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"/._-+=:,@%".contains(&b));
    if plain {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', "'\\''"))
}

// ---------------------------------------------------------------------------------------
// Schemes

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Tcp,
    Unix,
    Vsock,
    Ssh,
}

/// (name, kind, tls) of every scheme this library accepts.
const SCHEMES: [(&str, Kind, bool); 8] = [
    ("nbd", Kind::Tcp, false),
    ("nbds", Kind::Tcp, true),
    ("nbd+unix", Kind::Unix, false),
    ("nbds+unix", Kind::Unix, true),
    ("nbd+vsock", Kind::Vsock, false),
    ("nbds+vsock", Kind::Vsock, true),
    ("nbd+ssh", Kind::Ssh, false),
    ("nbds+ssh", Kind::Ssh, true),
];

fn scheme_name(kind: Kind, tls: bool) -> &'static str {
    SCHEMES
        .iter()
        .find(|&&(_, k, t)| k == kind && t == tls)
        .map(|&(name, _, _)| name)
        .expect("every kind has a plain and a TLS scheme")
}

/// Splits `scheme:` off, returning the transport, TLS flag and the text after the colon.
fn split_scheme(uri: &str) -> Result<(Kind, bool, &str)> {
    // RFC 3986: scheme = ALPHA *( ALPHA / DIGIT / "+" / "-" / "." ), ended by ':'.
    let scheme_len = uri
        .bytes()
        .position(|b| !(b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.')));
    let has_scheme = matches!(scheme_len, Some(n) if n > 0
        && uri.as_bytes()[0].is_ascii_alphabetic()
        && uri.as_bytes()[n] == b':');
    if !has_scheme {
        if uri.is_empty() {
            return Err(invalid("the URI is empty"));
        }
        let hint = if uri.starts_with('/') {
            "; to connect to a Unix socket use nbd+unix:///?socket=PATH"
        } else if uri.len() >= 9 && uri.as_bytes()[..9].eq_ignore_ascii_case(b"localhost") {
            "; to connect to a local TCP port use nbd://localhost or nbd://localhost:PORT"
        } else {
            ""
        };
        return Err(invalid(format!(
            "{} is not an NBD URI: it has no scheme (NBD URIs begin with nbd://, nbds://, \
             nbd+unix:// or another NBD scheme){hint}",
            shown(uri)
        )));
    }
    let n = scheme_len.unwrap_or(0);
    let (written, rest) = (&uri[..n], &uri[n + 1..]);
    match SCHEMES
        .iter()
        .find(|(name, _, _)| name.eq_ignore_ascii_case(written))
    {
        Some(&(_, kind, tls)) => Ok((kind, tls, rest)),
        None => {
            // "host:port" reads as scheme "host"; say what was probably meant.
            let hint = if !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_digit()) {
                let (host, port) = (clip(written), clip(rest));
                format!("; to connect to TCP port {port} on {host} use nbd://{host}:{port}")
            } else {
                String::new()
            };
            Err(invalid(format!(
                "unknown URI scheme {} (NBD URIs use nbd, nbds, nbd+unix, nbds+unix, nbd+vsock, \
                 nbds+vsock, nbd+ssh or nbds+ssh){hint}",
                shown(written)
            )))
        }
    }
}

// ---------------------------------------------------------------------------------------
// Authority

enum Host<'a> {
    Empty,
    /// A registered name or IPv4 address, still percent-encoded.
    Name(&'a str),
    /// An IPv6 address, brackets removed, zone decoded (`fe80::1%eth0`).
    Ipv6(String),
}

impl Host<'_> {
    /// The host as getaddrinfo and ssh take it (a name decoded, an IPv6 address without
    /// brackets); `None` when the URI names none.
    fn decoded(&self) -> Result<Option<String>> {
        match self {
            Host::Empty => Ok(None),
            Host::Name(raw) => decode(raw, "host name").map(Some),
            Host::Ipv6(addr) => Ok(Some(addr.clone())),
        }
    }
}

/// Splits `host[:port]` (no user info; a slice of `uri`), checking the host's characters.
fn split_host_port<'a>(uri: &str, hostport: &'a str) -> Result<(Host<'a>, Option<&'a str>)> {
    if let Some(bracketed) = hostport.strip_prefix('[') {
        let Some(close) = bracketed.find(']') else {
            return Err(invalid(format!(
                "the IPv6 address {} in the URI has no closing ']'",
                shown(hostport)
            )));
        };
        let literal = &bracketed[..close];
        let after = &bracketed[close + 1..];
        let port = if after.is_empty() {
            None
        } else if let Some(port) = after.strip_prefix(':') {
            Some(port)
        } else {
            return Err(invalid(format!(
                "unexpected {} after the IPv6 address in the URI (expected ':port' or nothing)",
                shown(after)
            )));
        };
        return Ok((Host::Ipv6(parse_ipv6_literal(literal)?), port));
    }
    let (host, port) = match hostport.find(':') {
        Some(i) => (&hostport[..i], Some(&hostport[i + 1..])),
        None => (hostport, None),
    };
    check_chars(uri, host, Part::Host)?;
    let host = if host.is_empty() {
        Host::Empty
    } else {
        Host::Name(host)
    };
    Ok((host, port))
}

/// The inside of `[...]`: an IPv6 address with an optional RFC 6874 zone (`%25` + zone).
fn parse_ipv6_literal(literal: &str) -> Result<String> {
    if literal.starts_with(['v', 'V']) {
        return Err(invalid(format!(
            "the IP address [{}] in the URI is an IPvFuture literal, which is not supported",
            clip(literal)
        )));
    }
    let (addr, zone) = match literal.find('%') {
        Some(i) => {
            let Some(zone) = literal[i..].strip_prefix("%25") else {
                return Err(invalid(format!(
                    "the zone of IPv6 address [{}] in the URI must be written after %25 \
                     (RFC 6874), as in [fe80::1%25eth0]",
                    clip(literal)
                )));
            };
            (&literal[..i], Some(zone))
        }
        None => (literal, None),
    };
    if addr.parse::<Ipv6Addr>().is_err() {
        return Err(invalid(format!(
            "[{}] in the URI is not a valid IPv6 address",
            clip(literal)
        )));
    }
    match zone {
        None => Ok(addr.to_string()),
        Some(zone) => {
            let ok = !zone.is_empty()
                && zone
                    .bytes()
                    .all(|b| is_unreserved(b) || b == b'%' || b >= 0x80);
            if !ok || !percent_escapes_valid(zone) {
                return Err(invalid(format!(
                    "the zone of IPv6 address [{}] in the URI is empty or has characters \
                     that must be percent-encoded",
                    clip(literal)
                )));
            }
            Ok(format!("{addr}%{}", decode(zone, "IPv6 zone")?))
        }
    }
}

/// A run of decimal digits within `min..=max`, named `what` in messages.
fn parse_number(text: &str, what: &str, min: u64, max: u64) -> Result<u64> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid(format!("{what} {} is not a number", shown(text))));
    }
    let value = text.bytes().try_fold(0u64, |acc, b| {
        acc.checked_mul(10)?.checked_add(u64::from(b - b'0'))
    });
    match value {
        Some(v) if (min..=max).contains(&v) => Ok(v),
        _ => Err(invalid(format!(
            "{what} {} is out of range ({min} to {max})",
            clip(text)
        ))),
    }
}

// ---------------------------------------------------------------------------------------
// Query

#[derive(Default)]
struct Params {
    socket: Option<String>,
    tls_certificates: Option<String>,
    tls_psk_file: Option<String>,
    tls_hostname: Option<String>,
    tls_verify_peer: Option<bool>,
    /// `nbd-port`, still text: it is checked only for ssh URIs.
    nbd_port: Option<String>,
    /// `compress`, still text: it is read as a boolean only for ssh URIs.
    compress: Option<String>,
    unknown: Vec<(String, String)>,
}

/// Reads `name=value` pairs separated by `&` or `;`. As libnbd (after CGI.pm): an empty
/// piece is skipped, `name` alone has the value `""`, and `=value` is skipped.
fn parse_query(query: &str) -> Result<Params> {
    let mut params = Params::default();
    for piece in query.split(['&', ';']) {
        let (raw_name, raw_value) = match piece.find('=') {
            Some(0) => continue,
            Some(i) => (&piece[..i], &piece[i + 1..]),
            None if piece.is_empty() => continue,
            None => (piece, ""),
        };
        let name = decode(raw_name, "name of a query parameter")?;
        let what = format!("value of query parameter {name}");
        match name.to_ascii_lowercase().as_str() {
            "socket" => {
                if raw_value.starts_with("%00") {
                    return Err(invalid(
                        "abstract-namespace Unix sockets (socket=%00...) are not supported",
                    ));
                }
                params.socket = Some(decode(raw_value, &what)?);
            }
            "tls-certificates" => params.tls_certificates = Some(decode(raw_value, &what)?),
            "tls-psk-file" => params.tls_psk_file = Some(decode(raw_value, &what)?),
            "tls-hostname" => params.tls_hostname = Some(decode(raw_value, &what)?),
            "tls-verify-peer" => {
                let value = decode(raw_value, &what)?;
                params.tls_verify_peer = Some(parse_bool(&name, &value)?);
            }
            "nbd-port" => params.nbd_port = Some(decode(raw_value, &what)?),
            "compress" => params.compress = Some(decode(raw_value, &what)?),
            _ => {
                let value = decode(raw_value, &what)?;
                params.unknown.push((name, value));
            }
        }
    }
    Ok(params)
}

/// A boolean query parameter, read as libnbd reads one: `1`, `true`, `t`, `yes`, `y`, `on`
/// or `0`, `false`, `f`, `no`, `n`, `off`, the words in any case. Anything else, the empty
/// value of a bare name included, is `EINVAL`.
fn parse_bool(name: &str, value: &str) -> Result<bool> {
    const TRUE: [&str; 6] = ["1", "true", "t", "yes", "y", "on"];
    const FALSE: [&str; 6] = ["0", "false", "f", "no", "n", "off"];
    if TRUE.iter().any(|w| w.eq_ignore_ascii_case(value)) {
        Ok(true)
    } else if FALSE.iter().any(|w| w.eq_ignore_ascii_case(value)) {
        Ok(false)
    } else {
        Err(invalid(format!(
            "could not parse {name} parameter, expecting {name}=true|false (got {}; also \
             accepted: 1 or 0, t or f, yes or no, y or n, on or off)",
            shown(value)
        )))
    }
}

fn refuse_socket(params: &Params, scheme: &str, tls: bool) -> Result<()> {
    if params.socket.is_some() {
        let unix = scheme_name(Kind::Unix, tls);
        return Err(invalid(format!(
            "the socket= query parameter is only for Unix-socket URIs, not {scheme}: \
             (did you mean {unix}:///export?socket=...?)"
        )));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Characters and percent-encoding

#[derive(Clone, Copy)]
enum Part {
    UserInfo,
    Host,
    Path,
    Query,
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn is_sub_delim(b: u8) -> bool {
    matches!(
        b,
        b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+' | b',' | b';' | b'='
    )
}

/// Checks that `text`, a slice of `uri`, has only characters RFC 3986 allows unescaped in
/// `part` (plus non-ASCII, as an IRI allows) and well-formed `%XX` escapes. Messages give
/// byte offsets in `uri`.
fn check_chars(uri: &str, text: &str, part: Part) -> Result<()> {
    // `text` lies inside `uri`, so the address difference is its offset.
    let at = (text.as_ptr() as usize).wrapping_sub(uri.as_ptr() as usize);
    let bytes = text.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        if b == b'%' {
            let ok = bytes.len() > i + 2
                && bytes[i + 1].is_ascii_hexdigit()
                && bytes[i + 2].is_ascii_hexdigit();
            if !ok {
                let end = (i + 3).min(bytes.len());
                return Err(invalid(format!(
                    "invalid percent-encoding at byte {} of the URI: '%' must be followed by \
                     two hex digits (got '{}')",
                    at + i,
                    String::from_utf8_lossy(&bytes[i..end]).escape_debug()
                )));
            }
            continue;
        }
        let allowed = b >= 0x80
            || is_unreserved(b)
            || is_sub_delim(b)
            || match part {
                Part::UserInfo | Part::Host => false,
                Part::Path => matches!(b, b':' | b'@' | b'/'),
                Part::Query => matches!(b, b':' | b'@' | b'/' | b'?'),
            };
        if allowed {
            continue;
        }
        let message = match (part, b) {
            (Part::UserInfo, b':') => "the URI gives a password (user:password@); NBD URIs \
                                       carry only a TLS user name"
                .to_string(),
            (Part::UserInfo, b'@') => {
                "an '@' in the user name of the URI must be written %40".to_string()
            }
            (Part::Host, b'[' | b']') => format!(
                "'{}' at byte {} of the URI: brackets may only surround an IPv6 address, as \
                 in nbd://[::1]:10809/",
                b as char,
                at + i
            ),
            _ => {
                let part_name = match part {
                    Part::UserInfo => "user name",
                    Part::Host => "host",
                    Part::Path => "export name",
                    Part::Query => "query",
                };
                format!(
                    "the {part_name} in the URI has a character that must be percent-encoded: \
                     '{}' at byte {} (write it as %{b:02X})",
                    (b as char).escape_debug(),
                    at + i
                )
            }
        };
        return Err(invalid(message));
    }
    Ok(())
}

fn percent_escapes_valid(text: &str) -> bool {
    let bytes = text.as_bytes();
    bytes.iter().enumerate().all(|(i, &b)| {
        b != b'%'
            || (bytes.len() > i + 2
                && bytes[i + 1].is_ascii_hexdigit()
                && bytes[i + 2].is_ascii_hexdigit())
    })
}

fn hex_value(b: u8) -> u8 {
    match b {
        b'0'..=b'9' => b - b'0',
        b'a'..=b'f' => b - b'a' + 10,
        b'A'..=b'F' => b - b'A' + 10,
        _ => 0,
    }
}

/// Percent-decodes `text` (whose escapes [`check_chars`] has checked) into a string that
/// must be valid UTF-8 without NUL; `what` names it in messages.
fn decode(text: &str, what: &str) -> Result<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escape = bytes[i] == b'%'
            && i + 2 < bytes.len()
            && bytes[i + 1].is_ascii_hexdigit()
            && bytes[i + 2].is_ascii_hexdigit();
        if escape {
            out.push(hex_value(bytes[i + 1]) << 4 | hex_value(bytes[i + 2]));
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    let decoded = String::from_utf8(out).map_err(|_| {
        invalid(format!(
            "the {what} in the URI is not valid UTF-8 after percent-decoding ({})",
            shown(text)
        ))
    })?;
    if decoded.contains('\0') {
        return Err(invalid(format!(
            "the {what} in the URI contains a NUL byte (%00), which is not allowed"
        )));
    }
    Ok(decoded)
}

/// Appends `text`, percent-encoding every byte except unreserved characters and `keep`.
fn encode_into(out: &mut String, text: &str, keep: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in text.as_bytes() {
        if is_unreserved(b) || keep.contains(&b) {
            out.push(b as char);
        } else {
            out.push('%');
            out.push(HEX[usize::from(b >> 4)] as char);
            out.push(HEX[usize::from(b & 0xf)] as char);
        }
    }
}

/// Writes a TCP host: an IPv6 address (with optional `%zone`) in brackets, anything else
/// percent-encoded as a registered name (so a stray ':' cannot be read as a port).
fn write_host(out: &mut String, host: &str) {
    let (addr, zone) = match host.find('%') {
        Some(i) => (&host[..i], Some(&host[i + 1..])),
        None => (host, None),
    };
    if addr.contains(':') && addr.parse::<Ipv6Addr>().is_ok() && zone != Some("") {
        out.push('[');
        out.push_str(addr);
        if let Some(zone) = zone {
            out.push_str("%25");
            encode_into(out, zone, b"");
        }
        out.push(']');
    } else {
        encode_into(out, host, b"");
    }
}

// ---------------------------------------------------------------------------------------
// Messages

fn invalid(message: impl Into<String>) -> Error {
    Error::usage(Errno::EINVAL, message)
}

fn denied(message: impl Into<String>) -> Error {
    Error::usage(Errno::EPERM, message)
}

/// `text` with control characters escaped, cut to 60 characters so a huge URI cannot make
/// a huge message.
fn clip(text: &str) -> String {
    const LIMIT: usize = 60;
    let mut out = String::new();
    for (i, c) in text.chars().enumerate() {
        if i == LIMIT {
            out.push('…');
            break;
        }
        out.extend(c.escape_debug());
    }
    out
}

/// [`clip`]ped and quoted.
fn shown(text: &str) -> String {
    format!("'{}'", clip(text))
}

/// Splits `text` at the first `sep`: the part before, and the part after if `sep` occurs.
fn split_at_byte(text: &str, sep: u8) -> (&str, Option<&str>) {
    match text.bytes().position(|b| b == sep) {
        Some(i) => (&text[..i], Some(&text[i + 1..])),
        None => (text, None),
    }
}
