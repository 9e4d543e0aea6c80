//! TLS for NBD connections: the client side of `NBD_OPT_STARTTLS`, authenticated with X.509
//! certificates or with pre-shared keys (PSK), configured as libnbd's `nbd_set_tls*` calls.
//!
//! The TLS library is OpenSSL, built from source into this crate (the `vendored-openssl`
//! feature, on by default), so neither building nor running needs a system TLS library.
//! OpenSSL is used rather than rustls because NBD servers commonly authenticate with PSK
//! (nbdkit `--tls-psk`, qemu-nbd `tls-creds-psk`), which rustls does not implement.
//!
//! # Use
//!
//! After the server has acknowledged `NBD_OPT_STARTTLS`, hand the plaintext stream to
//! [`upgrade`] (or to [`TlsConnector::connect`], when the settings were prepared earlier)
//! and continue the handshake over the [`TlsStream`] it returns. The stream must not hold
//! bytes read past the STARTTLS reply (the server sends none before the client speaks TLS).
//! A reader and writer that were split earlier can be joined for this with
//! [`tokio::io::join`], and the TLS stream split again with [`tokio::io::split`].
//!
//! [`upgrade`] does not time out: a server that stops answering mid-handshake is caught by
//! the caller's connect timeout. Everything else (a closed connection, a refusal, a failed
//! verification) fails promptly.
//!
//! # Authentication
//!
//! * **PSK** when [`TlsSettings::psk_file`] is set: the file is in `psktool` format, one
//!   `username:hexkey` line per user; the line for [`TlsSettings::effective_username`] is
//!   used. TLS 1.3 uses the key with an (EC)DHE exchange; TLS 1.2 offers the ECDHE-PSK,
//!   DHE-PSK and plain PSK cipher suites, in that order. Certificates play no part: a server
//!   that answers with a certificate instead of accepting the key is refused.
//! * **X.509** otherwise. The CA that signs the server's certificate is read from
//!   `ca-cert.pem` in the certificates directory ([`TlsSettings::certificates`], else the
//!   first of libnbd's default directories that holds a `ca-cert.pem`:
//!   `$HOME/.pki/libnbd`, `$HOME/.config/pki/libnbd`, or `/etc/pki/libnbd` for root);
//!   when no directory has one, the system's trusted CAs are used. `client-cert.pem` and
//!   `client-key.pem` in the same directory, when present, authenticate the client to the
//!   server; `ca-crl.pem`, when present, is a revocation list the server's certificate is
//!   checked against.
//!
//! With [`TlsSettings::verify_peer`] (the default) the server's certificate must chain to a
//! trusted CA, and when a host name is known ([`TlsSettings::hostname`], else the host given
//! to the connect call) it must be valid for that name (or IP address). libnbd checks
//! nothing at all when it has no host name (a Unix socket with no TLS hostname set); this
//! crate still checks the chain then, which only refuses servers libnbd would have accepted
//! unauthenticated. Set `verify_peer` to false to accept any certificate.
//!
//! # Errors
//!
//! Every failure is an [`Error`] whose message says which case it is:
//!
//! | errno | case |
//! |---|---|
//! | `ENOENT` | a named file or directory does not exist (PSK file, certificates directory, half of a client certificate/key pair) |
//! | `EACCES` | a file exists but cannot be read |
//! | `ENOTDIR` | the certificates path is not a directory |
//! | `EINVAL` | a file's contents are unusable (no PEM certificate, malformed hex key, a key that does not match its certificate), the user is not in the PSK file, or no login name for the default username |
//! | `EPERM` | authentication failed: the server's certificate failed verification (OpenSSL's reason included), does not match the host name, or is not what PSK expects; or the server refused our key, our user name or our client certificate |
//! | `ECONNREFUSED` | the server refused the handshake with an alert unrelated to credentials (no common protocol version or cipher) |
//! | `ECONNRESET` | the server closed the connection during the handshake without saying why; GnuTLS servers (nbdkit, qemu-nbd) do this, with no alert, for an unknown PSK user and for a wrong key alike, so the message names both causes |
//! | `EPROTO` | the server did not answer in TLS |
//! | `EIO` | anything else (the message carries OpenSSL's error) |
//!
//! A server may also judge the client's certificate only after the handshake has completed
//! (TLS 1.3 always allows this; GnuTLS servers do it with TLS 1.2 too), so a refused client
//! certificate can surface on the first read or write of the [`TlsStream`]: its I/O errors
//! then say that the server ended the session before answering, and why it may have.
//!
//! # Cipher suites
//!
//! TLS 1.3 lists AES-GCM before ChaCha20-Poly1305 when the CPU runs AES in hardware, and
//! ChaCha20-Poly1305 first otherwise (OpenSSL's own order puts it second, which made every
//! PSK session with nbdkit or qemu-nbd run ChaCha20 at a quarter of AES-GCM's speed; see
//! `tls13_suites`). `NBD_CLIENT_TLS_CIPHERSUITES` in the environment replaces the list
//! (OpenSSL's names, colon-separated; names OpenSSL does not know are skipped, and a list
//! with none it knows fails the connect with `EINVAL`). TLS 1.2 offers OpenSSL's defaults,
//! or with PSK the suites named above.
//!
//! Errors found before any TLS byte is sent (settings and files) have [`nbd_proto::Fault::Usage`];
//! errors of the handshake itself have [`nbd_proto::Fault::Io`]. Either way the stream given to
//! [`upgrade`] is consumed: after a failed upgrade the connection cannot continue.

use std::fmt;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};

use openssl::error::ErrorStack;
use openssl::pkey::PKey;
use openssl::ssl::{
    self, ErrorCode, Ssl, SslContext, SslContextBuilder, SslFiletype, SslMethod, SslOptions,
    SslRef, SslVerifyMode, SslVersion,
};
use openssl::x509::store::X509Lookup;
use openssl::x509::verify::{X509CheckFlags, X509VerifyFlags};
use openssl::x509::{X509VerifyResult, X509};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use nbd_proto::{Errno, Error, Result};

pub use nbd_proto::handshake::TlsMode;

/// TLS settings of a handle, as libnbd's `nbd_set_tls*` calls. `Default` gives libnbd's
/// defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    /// Whether to use TLS (`nbd_set_tls`); [`TlsMode::Disable`] by default.
    pub mode: TlsMode,
    /// Directory of `ca-cert.pem` and the optional `client-cert.pem`, `client-key.pem`,
    /// `ca-crl.pem` (`nbd_set_tls_certificates`). `None` searches libnbd's default
    /// directories ([`TlsSettings::certificate_dirs`]), then falls back to the system's CAs.
    pub certificates: Option<PathBuf>,
    /// Verify the server's certificate and host name (`nbd_set_tls_verify_peer`); true by
    /// default. Ignored with PSK.
    pub verify_peer: bool,
    /// The PSK user name (`nbd_set_tls_username`); `None` means the login name
    /// ([`TlsSettings::effective_username`]).
    pub username: Option<String>,
    /// The PSK key file (`nbd_set_tls_psk_file`). When set, PSK is used instead of X.509.
    pub psk_file: Option<PathBuf>,
    /// The server's name for SNI and certificate checks (`nbd_set_tls_hostname`), used in
    /// preference to the host given to the connect call.
    pub hostname: Option<String>,
}

impl Default for TlsSettings {
    fn default() -> Self {
        TlsSettings {
            mode: TlsMode::Disable,
            certificates: None,
            verify_peer: true,
            username: None,
            psk_file: None,
            hostname: None,
        }
    }
}

impl TlsSettings {
    /// The PSK user name in effect (`nbd_get_tls_username`): [`TlsSettings::username`] if
    /// set, else `$LOGNAME`, else the login name of the controlling terminal (`getlogin`).
    /// Fails with `EINVAL` when none of these is available.
    pub fn effective_username(&self) -> Result<String> {
        match &self.username {
            Some(name) => Ok(name.clone()),
            None => login_name(),
        }
    }

    /// The directories searched for `ca-cert.pem`, in order: the one set, or libnbd's
    /// defaults (`$HOME/.pki/libnbd` and `$HOME/.config/pki/libnbd`, or `/etc/pki/libnbd`
    /// when running as root).
    pub fn certificate_dirs(&self) -> Vec<PathBuf> {
        if let Some(dir) = &self.certificates {
            return vec![dir.clone()];
        }
        // SAFETY: geteuid has no preconditions and cannot fail.
        let root = unsafe { libc::geteuid() } == 0;
        default_certificate_dirs(root, std::env::var_os("HOME").map(PathBuf::from))
    }
}

/// libnbd's default certificates directories for a user (`root` or not) whose home is `home`.
fn default_certificate_dirs(root: bool, home: Option<PathBuf>) -> Vec<PathBuf> {
    if root {
        return vec![PathBuf::from("/etc/pki/libnbd")];
    }
    match home {
        Some(home) if !home.as_os_str().is_empty() => {
            vec![home.join(".pki/libnbd"), home.join(".config/pki/libnbd")]
        }
        _ => Vec::new(),
    }
}

/// True: this build supports TLS (`nbd_supports_tls`).
pub fn supports_tls() -> bool {
    true
}

/// How the server proved who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsAuth {
    /// With the pre-shared key.
    Psk,
    /// With an X.509 certificate (verified unless `verify_peer` was false).
    Certificate,
}

/// A TLS connection over `S`, ready for the rest of the NBD handshake.
pub struct TlsStream<S> {
    inner: tokio_openssl::SslStream<S>,
    auth: TlsAuth,
    /// Whether the server has sent any application data yet.
    received_data: bool,
    /// What to say if the server ends the session before sending anything.
    early_close: Option<String>,
}

impl<S> TlsStream<S> {
    /// The stream underneath.
    pub fn get_ref(&self) -> &S {
        self.inner.get_ref()
    }

    /// The protocol version in use, e.g. `"TLSv1.3"`.
    pub fn protocol_version(&self) -> &'static str {
        self.inner.ssl().version_str()
    }

    /// The cipher suite in use, e.g. `"TLS_AES_256_GCM_SHA384"`.
    pub fn cipher(&self) -> Option<&'static str> {
        self.inner.ssl().current_cipher().map(|c| c.name())
    }

    /// How the server was authenticated.
    pub fn auth(&self) -> TlsAuth {
        self.auth
    }
}

impl<S> fmt::Debug for TlsStream<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsStream")
            .field("version", &self.protocol_version())
            .field("cipher", &self.cipher())
            .field("auth", &self.auth)
            .finish()
    }
}

impl<S> TlsStream<S> {
    /// An error from the session, rewritten to say what the server did.
    fn explain(&self, e: io::Error) -> io::Error {
        let e = explain_io(e);
        match &self.early_close {
            Some(hint) if !self.received_data && is_hang_up(&e) => io::Error::new(
                e.kind(),
                format!("TLS: the server ended the session before answering ({e}); {hint}"),
            ),
            _ => e,
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for TlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    self.received_data = true;
                } else if buf.remaining() > 0 && !self.received_data && self.early_close.is_some() {
                    let eof = io::Error::from(io::ErrorKind::UnexpectedEof);
                    return Poll::Ready(Err(self.explain(eof)));
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(self.explain(e))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for TlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write(cx, buf) {
            Poll::Ready(Err(e)) => Poll::Ready(Err(self.explain(e))),
            other => other,
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match Pin::new(&mut self.inner).poll_flush(cx) {
            Poll::Ready(Err(e)) => Poll::Ready(Err(self.explain(e))),
            other => other,
        }
    }

    /// Sends TLS `close_notify`, then shuts down the stream underneath. A server that has
    /// already hung up (as NBD servers do after `NBD_CMD_DISC`) is not an error here.
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match Pin::new(&mut self.inner).poll_shutdown(cx) {
            Poll::Ready(Err(e)) => {
                let e = explain_io(e);
                if is_hang_up(&e) {
                    Poll::Ready(Ok(()))
                } else {
                    Poll::Ready(Err(e))
                }
            }
            other => other,
        }
    }
}

/// Performs the client side of the TLS handshake on `stream`, after the server has
/// acknowledged `NBD_OPT_STARTTLS`. `server_host` is the host the connection was made to,
/// if any (the TCP host name or address; `None` for Unix sockets and inherited fds); it is
/// used for SNI and the certificate check unless `settings.hostname` is set.
///
/// The settings' files are read on tokio's blocking pool. See the module documentation
/// for the authentication rules and the errors.
pub async fn upgrade<S>(
    stream: S,
    settings: &TlsSettings,
    server_host: Option<&str>,
) -> Result<TlsStream<S>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let settings = settings.clone();
    let host = server_host.map(str::to_owned);
    let connector =
        tokio::task::spawn_blocking(move || TlsConnector::new(&settings, host.as_deref()))
            .await
            .map_err(|e| Error::io(Errno::EIO, format!("preparing TLS failed: {e}")))??;
    connector.connect(stream).await
}

/// What the client authenticates with, kept for explaining failures.
#[derive(Debug, Clone)]
enum Credentials {
    Psk {
        username: String,
        file: PathBuf,
    },
    X509 {
        /// Where the trusted CAs came from, for messages.
        trust: String,
        verify: bool,
        client_cert: bool,
    },
}

/// TLS settings prepared for connecting: files read, keys loaded, OpenSSL configured.
/// One connector may upgrade any number of connections to the same server.
pub struct TlsConnector {
    ctx: SslContext,
    credentials: Credentials,
    host: Option<String>,
}

impl fmt::Debug for TlsConnector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConnector")
            .field("credentials", &self.credentials)
            .field("host", &self.host)
            .finish()
    }
}

/// Cipher suites offered for PSK with TLS 1.2: forward-secret key exchanges (ECDHE-PSK,
/// DHE-PSK) first, plain PSK last; GnuTLS servers configured for PSK accept all three kinds.
/// TLS 1.3's suites are chosen separately, for PSK and X.509 alike ([`tls13_suites`]).
const PSK_CIPHERS_TLS12: &str = "ECDHEPSK:DHEPSK:PSK:!RSAPSK:!aNULL:!eNULL:!3DES:!RC4:!MD5";

/// The environment variable that replaces the TLS 1.3 cipher suites offered (OpenSSL's
/// colon-separated names).
const SUITES_VARIABLE: &str = "NBD_CLIENT_TLS_CIPHERSUITES";

/// The TLS 1.3 cipher suites offered, in order of preference: the user's list when
/// `NBD_CLIENT_TLS_CIPHERSUITES` is set and not empty; else, on a CPU with AES instructions,
/// AES-256-GCM, AES-128-GCM, ChaCha20-Poly1305; else ChaCha20-Poly1305 first.
///
/// Why not OpenSSL's own order (AES-256-GCM, ChaCha20-Poly1305, AES-128-GCM): a PSK session
/// cannot use AES-256-GCM (its hash is SHA-384, the key's SHA-256), so the first suite a
/// server could take was ChaCha20, and nbdkit and qemu-nbd (GnuTLS) take the first of the
/// client's suites they can use. Against nbdkit with a PSK (256 KiB reads, 16 in flight),
/// AES-128-GCM in its place gave three times the reads per second and cut the server's CPU
/// per read by three quarters. ChaCha20 stays in the list, last, for servers that allow
/// nothing else.
fn tls13_suites(user: Option<std::ffi::OsString>, aes: bool) -> String {
    if let Some(list) = user.map(|v| v.to_string_lossy().trim().to_owned()).filter(|v| !v.is_empty()) {
        return list;
    }
    if aes {
        "TLS_AES_256_GCM_SHA384:TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256".to_owned()
    } else {
        "TLS_CHACHA20_POLY1305_SHA256:TLS_AES_256_GCM_SHA384:TLS_AES_128_GCM_SHA256".to_owned()
    }
}

/// Whether this CPU runs AES-GCM in hardware (AES rounds and carry-less multiplication).
fn aes_in_hardware() -> bool {
    #[cfg(any(target_arch = "x86_64", target_arch = "x86"))]
    {
        std::arch::is_x86_feature_detected!("aes") && std::arch::is_x86_feature_detected!("pclmulqdq")
    }
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("aes") && std::arch::is_aarch64_feature_detected!("pmull")
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "x86", target_arch = "aarch64")))]
    {
        false
    }
}

impl TlsConnector {
    /// Reads the files the settings name and prepares OpenSSL. Blocking (it reads files);
    /// [`upgrade`] calls it on tokio's blocking pool. `server_host` is as for [`upgrade`].
    pub fn new(settings: &TlsSettings, server_host: Option<&str>) -> Result<TlsConnector> {
        let host = settings
            .hostname
            .as_deref()
            .or(server_host)
            .map(|h| h.trim_start_matches('[').trim_end_matches(']'))
            .filter(|h| !h.is_empty())
            .map(str::to_owned);
        let mut b = SslContextBuilder::new(SslMethod::tls_client()).map_err(setup_error)?;
        b.set_min_proto_version(Some(SslVersion::TLS1_2))
            .map_err(setup_error)?;
        // A server that drops the connection without close_notify reads as end of stream,
        // as it would without TLS; NBD's framing makes truncation visible anyway.
        b.set_options(SslOptions::IGNORE_UNEXPECTED_EOF | SslOptions::NO_RENEGOTIATION);
        let suites = tls13_suites(std::env::var_os(SUITES_VARIABLE), aes_in_hardware());
        b.set_ciphersuites(&suites).map_err(|e| {
            Error::usage(
                Errno::EINVAL,
                format!("{SUITES_VARIABLE}={suites:?} names no TLS 1.3 cipher suite OpenSSL knows ({e})"),
            )
        })?;

        let credentials = match &settings.psk_file {
            Some(file) => {
                let username = settings.effective_username()?;
                let key = find_psk_key(file, &username)?;
                b.set_cipher_list(PSK_CIPHERS_TLS12).map_err(setup_error)?;
                // The trust store stays empty: a server that authenticates with a
                // certificate instead of the key fails verification.
                b.set_verify(SslVerifyMode::PEER);
                check_psk_sizes(&username, &key)?;
                let identity = username.clone().into_bytes();
                b.set_psk_client_callback(move |_ssl, _hint, identity_out, key_out| {
                    // The sizes were checked against OpenSSL's limits already; this only
                    // guards the copies (the identity needs room for its NUL).
                    if identity.len() >= identity_out.len() || key.0.len() > key_out.len() {
                        return Err(ErrorStack::get());
                    }
                    identity_out[..identity.len()].copy_from_slice(&identity);
                    identity_out[identity.len()] = 0;
                    key_out[..key.0.len()].copy_from_slice(&key.0);
                    Ok(key.0.len())
                });
                Credentials::Psk {
                    username,
                    file: file.clone(),
                }
            }
            None => {
                let dirs = settings.certificate_dirs();
                let found = find_ca_dir(settings.certificates.is_some(), &dirs)?;
                let (trust, client_cert) = match &found {
                    Some(dir) => load_cert_dir(&mut b, dir)?,
                    None => (load_system_cas(&mut b, &dirs)?, false),
                };
                b.set_verify(if settings.verify_peer {
                    SslVerifyMode::PEER
                } else {
                    SslVerifyMode::NONE
                });
                Credentials::X509 {
                    trust,
                    verify: settings.verify_peer,
                    client_cert,
                }
            }
        };
        Ok(TlsConnector {
            ctx: b.build(),
            credentials,
            host,
        })
    }

    /// The host name used for SNI and the certificate check, if any.
    pub fn host(&self) -> Option<&str> {
        self.host.as_deref()
    }

    /// True when the connector authenticates with a pre-shared key.
    pub fn is_psk(&self) -> bool {
        matches!(self.credentials, Credentials::Psk { .. })
    }

    /// Performs the TLS handshake on `stream` (see [`upgrade`]).
    pub async fn connect<S>(&self, stream: S) -> Result<TlsStream<S>>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let ssl = self.new_session()?;
        let mut inner = tokio_openssl::SslStream::new(ssl, stream).map_err(setup_error)?;
        if let Err(e) = Pin::new(&mut inner).connect().await {
            return Err(self.explain_handshake(&e, inner.ssl()));
        }
        let ssl = inner.ssl();
        let auth = match &self.credentials {
            Credentials::Psk { .. } => {
                // The empty trust store already refuses certificates; this is the
                // belt to those braces.
                if ssl.peer_certificate().is_some() {
                    return Err(Error::io(
                        Errno::EPERM,
                        "TLS: the server authenticated with a certificate, not the pre-shared key",
                    ));
                }
                TlsAuth::Psk
            }
            Credentials::X509 { .. } => TlsAuth::Certificate,
        };
        // A server may judge the client's certificate after the client has finished its
        // side of the handshake: always with TLS 1.3, and GnuTLS servers (qemu-nbd, nbdkit)
        // check it only after the whole handshake with any version. A refusal then shows as
        // the session ending before the server has sent anything.
        let early_close = (auth == TlsAuth::Certificate).then(|| self.hang_up_hint());
        Ok(TlsStream {
            inner,
            auth,
            received_data: false,
            early_close,
        })
    }

    fn new_session(&self) -> Result<Ssl> {
        let mut ssl = Ssl::new(&self.ctx).map_err(setup_error)?;
        let verify = matches!(self.credentials, Credentials::X509 { verify: true, .. });
        if let Some(host) = &self.host {
            match host.parse::<IpAddr>() {
                Ok(ip) => {
                    // No SNI for addresses (RFC 6066).
                    if verify {
                        ssl.param_mut().set_ip(ip).map_err(setup_error)?;
                    }
                }
                Err(_) => {
                    ssl.set_hostname(host).map_err(|e| {
                        Error::usage(
                            Errno::EINVAL,
                            format!("TLS hostname {host:?} cannot be used for SNI: {e}"),
                        )
                    })?;
                    if verify {
                        let param = ssl.param_mut();
                        param.set_hostflags(X509CheckFlags::NO_PARTIAL_WILDCARDS);
                        param.set_host(host).map_err(setup_error)?;
                    }
                }
            }
        }
        Ok(ssl)
    }

    /// Turns a failed handshake into an error saying which case it is.
    fn explain_handshake(&self, e: &ssl::Error, ssl: &SslRef) -> Error {
        let verify = ssl.verify_result();
        if verify != X509VerifyResult::OK {
            return self.explain_verify(verify);
        }
        // The server hanging up shows as end of stream, as a reset, or as a failed write,
        // depending on timing; all are the same case.
        let closed = |how: Option<&io::Error>| {
            let how = how.map(|e| format!(" ({e})")).unwrap_or_default();
            Error::io(
                Errno::ECONNRESET,
                format!(
                    "TLS handshake: the server closed the connection{how}; {}",
                    self.hang_up_hint()
                ),
            )
        };
        if let Some(io) = e.io_error() {
            if is_hang_up(io) {
                return closed(Some(io));
            }
            let errno = io
                .raw_os_error()
                .map(Errno::from_raw_os_error)
                .unwrap_or(Errno::EIO);
            return Error::io(errno, format!("TLS handshake: connection failed: {io}"));
        }
        match e.code() {
            ErrorCode::ZERO_RETURN => return closed(None),
            ErrorCode::SYSCALL if e.ssl_error().is_none() => return closed(None),
            _ => {}
        }
        let Some(stack) = e.ssl_error() else {
            return Error::io(Errno::EIO, format!("TLS handshake failed: {e}"));
        };
        for err in stack.errors() {
            if let Some(io) = system_error(err) {
                return if is_hang_up(&io) {
                    closed(Some(&io))
                } else {
                    let errno = Errno::from_raw_os_error(io.raw_os_error().unwrap_or(0));
                    Error::io(errno, format!("TLS handshake: connection failed: {io}"))
                };
            }
            if err.library_code() != ERR_LIB_SSL {
                continue;
            }
            let reason = err.reason_code();
            if let Some(alert) = alert_of_reason(reason) {
                return self.explain_alert(alert);
            }
            match reason {
                SSL_R_UNEXPECTED_EOF_WHILE_READING => return closed(None),
                SSL_R_WRONG_VERSION_NUMBER
                | SSL_R_PACKET_LENGTH_TOO_LONG
                | SSL_R_HTTP_REQUEST
                | SSL_R_UNKNOWN_PROTOCOL
                | SSL_R_RECORD_LAYER_FAILURE
                | SSL_R_BAD_PACKET
                | SSL_R_LENGTH_TOO_SHORT => {
                    return Error::io(
                        Errno::EPROTO,
                        format!(
                            "TLS handshake: the server did not answer in TLS ({})",
                            err.reason().unwrap_or("unreadable record")
                        ),
                    );
                }
                SSL_R_UNSUPPORTED_PROTOCOL | SSL_R_NO_CIPHERS_AVAILABLE => {
                    return Error::io(
                        Errno::ECONNREFUSED,
                        format!(
                            "TLS handshake: no protocol version or cipher suite in common with \
                             the server ({}); {SUITES_VARIABLE} sets the TLS 1.3 suites offered",
                            err.reason().unwrap_or("no common parameters")
                        ),
                    );
                }
                _ => {}
            }
        }
        Error::io(
            Errno::EIO,
            format!("TLS handshake failed: {}", brief_stack(stack)),
        )
    }

    /// Why a server may hang up without a word. GnuTLS servers (nbdkit, qemu-nbd) send no
    /// alert when they refuse a client: they just close the connection, so the client
    /// cannot tell an unknown PSK user from a wrong key, nor say which certificate problem
    /// the server saw.
    fn hang_up_hint(&self) -> String {
        match &self.credentials {
            Credentials::Psk { username, file } => format!(
                "GnuTLS servers such as nbdkit and qemu-nbd do this when they do not know PSK \
                 user {username:?} or when its key in {} differs from theirs",
                file.display()
            ),
            Credentials::X509 {
                client_cert: true, ..
            } => "servers do this when they reject the client certificate (client-cert.pem)"
                .to_owned(),
            Credentials::X509 { .. } => "servers do this when they require a client certificate and \
                 none is set (client-cert.pem and client-key.pem in the certificates directory)"
                .to_owned(),
        }
    }

    fn explain_verify(&self, verify: X509VerifyResult) -> Error {
        let reason = verify.error_string();
        match &self.credentials {
            Credentials::Psk { .. } => Error::io(
                Errno::EPERM,
                format!(
                    "TLS: the server authenticated with a certificate instead of the \
                     pre-shared key (is it configured for X.509 rather than PSK?): {reason}"
                ),
            ),
            Credentials::X509 { trust, .. } => {
                let raw = verify.as_raw();
                if raw == X509_V_ERR_HOSTNAME_MISMATCH || raw == X509_V_ERR_IP_ADDRESS_MISMATCH {
                    let host = self.host.as_deref().unwrap_or("");
                    Error::io(
                        Errno::EPERM,
                        format!(
                            "TLS: the server's certificate is not valid for host {host:?} \
                             ({reason}); set the TLS hostname to the name in the certificate, \
                             or turn off peer verification"
                        ),
                    )
                } else {
                    Error::io(
                        Errno::EPERM,
                        format!(
                            "TLS: the server's certificate failed verification: {reason} \
                             (trusted CAs: {trust})"
                        ),
                    )
                }
            }
        }
    }

    fn explain_alert(&self, alert: u8) -> Error {
        let name = alert_name(alert);
        let refused = |errno: Errno, what: String| {
            Error::io(
                errno,
                format!("TLS handshake: {what} (server alert: {name})"),
            )
        };
        match (&self.credentials, alert) {
            (Credentials::Psk { username, file }, ALERT_UNKNOWN_PSK_IDENTITY) => refused(
                Errno::EPERM,
                format!(
                    "the server does not know PSK user {username:?} (from {})",
                    file.display()
                ),
            ),
            (Credentials::Psk { username, file }, ALERT_DECRYPT_ERROR | ALERT_BAD_RECORD_MAC) => refused(
                Errno::EPERM,
                format!(
                    "the server refused the pre-shared key of user {username:?} from {}: the \
                     keys differ",
                    file.display()
                ),
            ),
            (
                Credentials::Psk { username, .. },
                ALERT_HANDSHAKE_FAILURE | ALERT_INSUFFICIENT_SECURITY | ALERT_ILLEGAL_PARAMETER,
            ) => refused(
                Errno::EPERM,
                format!(
                    "the server would not authenticate PSK user {username:?} (unknown user, \
                         or not configured for PSK)"
                ),
            ),
            (Credentials::X509 { client_cert, .. }, ALERT_CERTIFICATE_REQUIRED)
            | (
                Credentials::X509 {
                    client_cert: client_cert @ false,
                    ..
                },
                ALERT_HANDSHAKE_FAILURE,
            ) => {
                let what = if *client_cert {
                    "the server requires a client certificate".to_owned()
                } else {
                    "the server requires a client certificate, and there is none \
                     (client-cert.pem and client-key.pem in the certificates directory)"
                        .to_owned()
                };
                refused(Errno::EPERM, what)
            }
            (Credentials::X509 { .. }, alert) if rejects_certificate(alert) => refused(
                Errno::EPERM,
                "the server rejected our client certificate".into(),
            ),
            (_, ALERT_PROTOCOL_VERSION | ALERT_HANDSHAKE_FAILURE | ALERT_INSUFFICIENT_SECURITY) => {
                refused(
                    Errno::ECONNREFUSED,
                    format!(
                        "the server refused the handshake (no protocol version, cipher suite or \
                         credential type in common; {SUITES_VARIABLE} sets the TLS 1.3 suites \
                         offered)"
                    ),
                )
            }
            _ => refused(
                Errno::ECONNREFUSED,
                "the server refused the handshake".into(),
            ),
        }
    }
}

// OpenSSL error reasons this module tells apart (from <openssl/sslerr.h>, <openssl/err.h>,
// <openssl/x509_vfy.h>).
const ERR_LIB_SSL: libc::c_int = 20;
const SSL_AD_REASON_OFFSET: libc::c_int = 1000;
const SSL_R_BAD_PACKET: libc::c_int = 240;
const SSL_R_HTTP_REQUEST: libc::c_int = 156;
const SSL_R_LENGTH_TOO_SHORT: libc::c_int = 160;
const SSL_R_NO_CIPHERS_AVAILABLE: libc::c_int = 181;
const SSL_R_PACKET_LENGTH_TOO_LONG: libc::c_int = 198;
const SSL_R_RECORD_LAYER_FAILURE: libc::c_int = 313;
const SSL_R_UNEXPECTED_EOF_WHILE_READING: libc::c_int = 294;
const SSL_R_UNKNOWN_PROTOCOL: libc::c_int = 252;
const SSL_R_UNSUPPORTED_PROTOCOL: libc::c_int = 258;
const SSL_R_WRONG_VERSION_NUMBER: libc::c_int = 267;
const X509_V_ERR_HOSTNAME_MISMATCH: libc::c_int = 62;
const X509_V_ERR_IP_ADDRESS_MISMATCH: libc::c_int = 64;

// TLS alert descriptions (RFC 8446 section 6).
const ALERT_BAD_RECORD_MAC: u8 = 20;
const ALERT_HANDSHAKE_FAILURE: u8 = 40;
const ALERT_BAD_CERTIFICATE: u8 = 42;
const ALERT_UNSUPPORTED_CERTIFICATE: u8 = 43;
const ALERT_CERTIFICATE_REVOKED: u8 = 44;
const ALERT_CERTIFICATE_EXPIRED: u8 = 45;
const ALERT_CERTIFICATE_UNKNOWN: u8 = 46;
const ALERT_ILLEGAL_PARAMETER: u8 = 47;
const ALERT_UNKNOWN_CA: u8 = 48;
const ALERT_ACCESS_DENIED: u8 = 49;
const ALERT_DECRYPT_ERROR: u8 = 51;
const ALERT_PROTOCOL_VERSION: u8 = 70;
const ALERT_INSUFFICIENT_SECURITY: u8 = 71;
const ALERT_UNKNOWN_PSK_IDENTITY: u8 = 115;
const ALERT_CERTIFICATE_REQUIRED: u8 = 116;

/// Whether `alert` is a server's refusal of the client's certificate.
fn rejects_certificate(alert: u8) -> bool {
    matches!(
        alert,
        ALERT_BAD_CERTIFICATE
            | ALERT_UNSUPPORTED_CERTIFICATE
            | ALERT_CERTIFICATE_REVOKED
            | ALERT_CERTIFICATE_EXPIRED
            | ALERT_CERTIFICATE_UNKNOWN
            | ALERT_UNKNOWN_CA
            | ALERT_ACCESS_DENIED
    )
}

/// The alert a peer sent, for an OpenSSL reason code that reports one.
fn alert_of_reason(reason: libc::c_int) -> Option<u8> {
    let alert = reason.checked_sub(SSL_AD_REASON_OFFSET)?;
    u8::try_from(alert).ok()
}

fn alert_name(alert: u8) -> String {
    let name = match alert {
        0 => "close notify",
        10 => "unexpected message",
        ALERT_BAD_RECORD_MAC => "bad record mac",
        22 => "record overflow",
        ALERT_HANDSHAKE_FAILURE => "handshake failure",
        ALERT_BAD_CERTIFICATE => "bad certificate",
        ALERT_UNSUPPORTED_CERTIFICATE => "unsupported certificate",
        ALERT_CERTIFICATE_REVOKED => "certificate revoked",
        ALERT_CERTIFICATE_EXPIRED => "certificate expired",
        ALERT_CERTIFICATE_UNKNOWN => "certificate unknown",
        ALERT_ILLEGAL_PARAMETER => "illegal parameter",
        ALERT_UNKNOWN_CA => "unknown CA",
        ALERT_ACCESS_DENIED => "access denied",
        50 => "decode error",
        ALERT_DECRYPT_ERROR => "decrypt error",
        ALERT_PROTOCOL_VERSION => "protocol version",
        ALERT_INSUFFICIENT_SECURITY => "insufficient security",
        80 => "internal error",
        86 => "inappropriate fallback",
        90 => "user canceled",
        109 => "missing extension",
        110 => "unsupported extension",
        112 => "unrecognized name",
        113 => "bad certificate status response",
        ALERT_UNKNOWN_PSK_IDENTITY => "unknown PSK identity",
        ALERT_CERTIFICATE_REQUIRED => "certificate required",
        120 => "no application protocol",
        _ => return format!("alert {alert}"),
    };
    name.to_owned()
}

/// OpenSSL 3 marks an error that is an OS errno with this bit (`ERR_SYSTEM_FLAG`).
const ERR_SYSTEM_FLAG: libc::c_ulong = 1 << 31;

/// The OS error an OpenSSL error entry carries, if it is one.
fn system_error(err: &openssl::error::Error) -> Option<io::Error> {
    let code = err.code();
    (code & ERR_SYSTEM_FLAG != 0)
        .then(|| io::Error::from_raw_os_error((code & !ERR_SYSTEM_FLAG) as i32))
}

/// True for the ways a peer hanging up shows: end of stream, reset, broken pipe.
fn is_hang_up(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
    )
}

/// OpenSSL's error stack in one line, reasons only (not file and line).
fn brief_stack(stack: &ErrorStack) -> String {
    let reasons: Vec<String> = stack
        .errors()
        .iter()
        .map(|e| match (e.reason(), e.data()) {
            _ if system_error(e).is_some() => system_error(e).unwrap().to_string(),
            (Some(r), Some(d)) => format!("{r} ({d})"),
            (Some(r), None) => r.to_owned(),
            (None, _) => format!("error code {:#x}", e.code()),
        })
        .collect();
    if reasons.is_empty() {
        "unknown OpenSSL error".to_owned()
    } else {
        reasons.join("; ")
    }
}

/// An OpenSSL failure while configuring (not while talking to the server).
fn setup_error(e: ErrorStack) -> Error {
    Error::usage(Errno::EIO, format!("TLS setup failed: {}", brief_stack(&e)))
}

/// Rewrites an error from the TLS stream after the handshake so that it says what the
/// server did (e.g. rejected our certificate after a TLS 1.3 handshake had completed).
fn explain_io(e: io::Error) -> io::Error {
    let Some(ssl_err) = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<ssl::Error>())
    else {
        return e;
    };
    let Some(stack) = ssl_err.ssl_error() else {
        return e;
    };
    for err in stack.errors() {
        if let Some(io) = system_error(err) {
            return io;
        }
        if err.library_code() != ERR_LIB_SSL {
            continue;
        }
        if let Some(alert) = alert_of_reason(err.reason_code()) {
            let hint = match alert {
                ALERT_CERTIFICATE_REQUIRED => {
                    " (it requires a client certificate: client-cert.pem and client-key.pem in \
                     the certificates directory)"
                }
                alert if rejects_certificate(alert) => " (it rejected our client certificate)",
                _ => "",
            };
            return io::Error::new(
                e.kind(),
                format!(
                    "TLS: the server ended the session with alert {}{hint}",
                    alert_name(alert)
                ),
            );
        }
    }
    io::Error::new(e.kind(), format!("TLS: {}", brief_stack(stack)))
}

/// A key that is wiped from memory when dropped (best effort: copies OpenSSL makes are
/// OpenSSL's to clear).
struct Secret(Vec<u8>);

impl Drop for Secret {
    fn drop(&mut self) {
        for b in self.0.iter_mut() {
            // SAFETY: b is a valid, aligned, exclusive reference.
            unsafe { std::ptr::write_volatile(b, 0) };
        }
    }
}

/// Reads a file the settings name, with the errno of the failure (`ENOENT`, `EACCES`, …).
fn read_file(what: &str, path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| {
        let errno = e
            .raw_os_error()
            .map(Errno::from_raw_os_error)
            .unwrap_or(Errno::EIO);
        Error::usage(errno, format!("cannot read {what} {}: {e}", path.display()))
    })
}

/// Finds `username`'s key in a psktool-format file (`username:hexkey` lines; the first
/// line for the user wins; lines without a colon are ignored).
fn find_psk_key(path: &Path, username: &str) -> Result<Secret> {
    let data = Secret(read_file("the TLS PSK file", path)?);
    for (index, line) in data.0.split(|&b| b == b'\n').enumerate() {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        if &line[..colon] != username.as_bytes() {
            continue;
        }
        let bad = |why: &str| {
            Error::usage(
                Errno::EINVAL,
                format!(
                    "TLS PSK file {} line {}: the key of user {username:?} {why}",
                    path.display(),
                    index + 1
                ),
            )
        };
        let hex = &line[colon + 1..];
        if hex.is_empty() {
            return Err(bad("is empty"));
        }
        if !hex.iter().all(|c| c.is_ascii_hexdigit()) {
            return Err(bad("is not hexadecimal"));
        }
        if hex.len() % 2 != 0 {
            return Err(bad("has an odd number of hex digits"));
        }
        let key = Secret(
            hex.chunks(2)
                .map(|pair| hex_value(pair[0]) << 4 | hex_value(pair[1]))
                .collect(),
        );
        return Ok(key);
    }
    Err(Error::usage(
        Errno::EINVAL,
        format!(
            "TLS PSK file {} has no key for user {username:?} (set the TLS username to a user \
             the file lists)",
            path.display()
        ),
    ))
}

/// OpenSSL's limits on a PSK identity and key (`PSK_MAX_IDENTITY_LEN`, `PSK_MAX_PSK_LEN`).
const PSK_MAX_IDENTITY_LEN: usize = 256;
const PSK_MAX_PSK_LEN: usize = 512;

fn check_psk_sizes(username: &str, key: &Secret) -> Result<()> {
    if username.is_empty() || username.len() > PSK_MAX_IDENTITY_LEN {
        return Err(Error::usage(
            Errno::EINVAL,
            format!(
                "TLS PSK username {username:?} is {} bytes; it must be 1 to \
                 {PSK_MAX_IDENTITY_LEN}",
                username.len()
            ),
        ));
    }
    if key.0.len() > PSK_MAX_PSK_LEN {
        return Err(Error::usage(
            Errno::EINVAL,
            format!(
                "TLS PSK key of user {username:?} is {} bytes, more than the {PSK_MAX_PSK_LEN} \
                 TLS allows",
                key.0.len()
            ),
        ));
    }
    Ok(())
}

/// The value of an ASCII hex digit (already checked to be one).
fn hex_value(c: u8) -> u8 {
    match c {
        b'0'..=b'9' => c - b'0',
        b'a'..=b'f' => c - b'a' + 10,
        _ => c - b'A' + 10,
    }
}

extern "C" {
    // POSIX; not bound by the libc crate.
    fn getlogin_r(buf: *mut libc::c_char, size: libc::size_t) -> libc::c_int;
}

/// The login name, as libnbd finds it: `$LOGNAME`, else `getlogin_r`.
pub(crate) fn login_name() -> Result<String> {
    if let Some(name) = std::env::var_os("LOGNAME").filter(|n| !n.is_empty()) {
        return name.into_string().map_err(|_| {
            Error::usage(
                Errno::EINVAL,
                "LOGNAME is not valid UTF-8; set the TLS username instead",
            )
        });
    }
    let mut buf = vec![0u8; 64];
    loop {
        // SAFETY: buf is valid for writes of buf.len() bytes.
        let rc = unsafe { getlogin_r(buf.as_mut_ptr().cast(), buf.len()) };
        if rc == 0 {
            let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
            buf.truncate(end);
            return String::from_utf8(buf).map_err(|_| {
                Error::usage(
                    Errno::EINVAL,
                    "the login name is not valid UTF-8; set the TLS username",
                )
            });
        }
        if rc == libc::ERANGE && buf.len() < 4096 {
            buf.resize(buf.len() * 2, 0);
            continue;
        }
        let e = io::Error::from_raw_os_error(rc);
        return Err(Error::usage(
            Errno::EINVAL,
            format!(
                "no TLS username is set and the login name is unknown (LOGNAME is unset, \
                 getlogin: {e}); set the TLS username"
            ),
        ));
    }
}

/// The directory whose `ca-cert.pem` to use: the first of `dirs` that has one. `None`
/// means the system's CAs. A directory the application named must exist.
fn find_ca_dir(explicit: bool, dirs: &[PathBuf]) -> Result<Option<PathBuf>> {
    for dir in dirs {
        if explicit {
            match std::fs::metadata(dir) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    return Err(Error::usage(
                        Errno::ENOTDIR,
                        format!("TLS certificates path {} is not a directory", dir.display()),
                    ))
                }
                Err(e) => {
                    let errno = e
                        .raw_os_error()
                        .map(Errno::from_raw_os_error)
                        .unwrap_or(Errno::EIO);
                    return Err(Error::usage(
                        errno,
                        format!("TLS certificates directory {}: {e}", dir.display()),
                    ));
                }
            }
        }
        if dir.join("ca-cert.pem").exists() {
            return Ok(Some(dir.clone()));
        }
    }
    Ok(None)
}

fn pem_certificates(what: &str, path: &Path) -> Result<Vec<X509>> {
    let pem = read_file(what, path)?;
    let bad =
        |why: String| Error::usage(Errno::EINVAL, format!("{what} {}: {why}", path.display()));
    let certs = X509::stack_from_pem(&pem)
        .map_err(|e| bad(format!("not a PEM certificate ({})", brief_stack(&e))))?;
    if certs.is_empty() {
        return Err(bad("contains no PEM certificate".into()));
    }
    Ok(certs)
}

/// Loads `ca-cert.pem`, the client certificate and key, and `ca-crl.pem` from `dir`.
/// Returns the description of the trust source and whether a client certificate is set.
fn load_cert_dir(b: &mut SslContextBuilder, dir: &Path) -> Result<(String, bool)> {
    let ca_path = dir.join("ca-cert.pem");
    for ca in pem_certificates("TLS CA certificate", &ca_path)? {
        b.cert_store_mut().add_cert(ca).map_err(setup_error)?;
    }

    let cert_path = dir.join("client-cert.pem");
    let key_path = dir.join("client-key.pem");
    let client_cert = match (cert_path.exists(), key_path.exists()) {
        (false, false) => false,
        (true, false) | (false, true) => {
            let (have, missing) = if cert_path.exists() {
                (&cert_path, &key_path)
            } else {
                (&key_path, &cert_path)
            };
            return Err(Error::usage(
                Errno::ENOENT,
                format!(
                    "TLS client credentials are incomplete: {} exists but {} does not",
                    have.display(),
                    missing.display()
                ),
            ));
        }
        (true, true) => {
            let mut chain = pem_certificates("TLS client certificate", &cert_path)?.into_iter();
            let leaf = chain.next().expect("pem_certificates returns at least one");
            b.set_certificate(&leaf).map_err(setup_error)?;
            for extra in chain {
                b.add_extra_chain_cert(extra).map_err(setup_error)?;
            }
            let key_pem = Secret(read_file("the TLS client key", &key_path)?);
            let key = PKey::private_key_from_pem(&key_pem.0).map_err(|e| {
                Error::usage(
                    Errno::EINVAL,
                    format!(
                        "TLS client key {}: not a PEM private key ({})",
                        key_path.display(),
                        brief_stack(&e)
                    ),
                )
            })?;
            // OpenSSL compares the key with the certificate when the key is set.
            let mismatch = b.set_private_key(&key).is_err() || b.check_private_key().is_err();
            if mismatch {
                return Err(Error::usage(
                    Errno::EINVAL,
                    format!(
                        "TLS client key {} does not belong to the certificate {}",
                        key_path.display(),
                        cert_path.display()
                    ),
                ));
            }
            true
        }
    };

    let crl_path = dir.join("ca-crl.pem");
    if crl_path.exists() {
        // Read it ourselves first for a clear error if it is unreadable.
        read_file("the TLS CRL", &crl_path)?;
        let store = b.cert_store_mut();
        store
            .add_lookup(X509Lookup::file())
            .map_err(setup_error)?
            .load_crl_file(&crl_path, SslFiletype::PEM)
            .map_err(|e| {
                Error::usage(
                    Errno::EINVAL,
                    format!("TLS CRL {}: {}", crl_path.display(), brief_stack(&e)),
                )
            })?;
        store
            .set_flags(X509VerifyFlags::CRL_CHECK)
            .map_err(setup_error)?;
    }
    Ok((ca_path.display().to_string(), client_cert))
}

/// CA bundles and directories of common Linux distributions, in the order OpenSSL-based
/// tools usually probe them. The vendored OpenSSL's own default (under /usr/local/ssl) is
/// not where any distribution keeps them.
const SYSTEM_CA_FILES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
    "/etc/ssl/ca-bundle.pem",
    "/etc/pki/tls/cacert.pem",
    "/etc/ssl/cert.pem",
];
const SYSTEM_CA_DIRS: &[&str] = &["/etc/ssl/certs", "/etc/pki/tls/certs"];

/// Trusts the system's CAs (`$SSL_CERT_FILE` / `$SSL_CERT_DIR` when set). Returns the
/// description of what was loaded, for messages.
fn load_system_cas(b: &mut SslContextBuilder, searched: &[PathBuf]) -> Result<String> {
    let env_path = |name: &str| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    let file = env_path("SSL_CERT_FILE").or_else(|| {
        SYSTEM_CA_FILES
            .iter()
            .map(PathBuf::from)
            .find(|p| p.is_file())
    });
    let dir = env_path("SSL_CERT_DIR").or_else(|| {
        SYSTEM_CA_DIRS
            .iter()
            .map(PathBuf::from)
            .find(|p| p.is_dir())
    });
    let searched: Vec<String> = searched
        .iter()
        .map(|d| d.join("ca-cert.pem").display().to_string())
        .collect();
    let why = if searched.is_empty() {
        "no certificates directory".to_owned()
    } else {
        format!("no {}", searched.join(" or "))
    };
    if file.is_none() && dir.is_none() {
        return Ok(format!("none: {why}, and no system CA bundle was found"));
    }
    b.load_verify_locations(file.as_deref(), dir.as_deref())
        .map_err(|e| {
            Error::usage(
                Errno::EIO,
                format!("cannot load the system's trusted CAs: {}", brief_stack(&e)),
            )
        })?;
    let source = file
        .as_deref()
        .or(dir.as_deref())
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    Ok(format!("the system's, from {source}, as there is {why}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn prefers_aes_gcm_when_the_cpu_has_aes_unless_told_otherwise() {
        let all = |list: &str| list.split(':').map(str::to_owned).collect::<Vec<_>>();
        assert_eq!(
            all(&tls13_suites(None, true)),
            ["TLS_AES_256_GCM_SHA384", "TLS_AES_128_GCM_SHA256", "TLS_CHACHA20_POLY1305_SHA256"]
        );
        assert_eq!(
            all(&tls13_suites(None, false)),
            ["TLS_CHACHA20_POLY1305_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_AES_128_GCM_SHA256"]
        );
        assert_eq!(tls13_suites(Some("TLS_CHACHA20_POLY1305_SHA256".into()), true), "TLS_CHACHA20_POLY1305_SHA256");
        // Set but empty (or blank) is as if unset.
        assert_eq!(tls13_suites(Some(" ".into()), true), tls13_suites(None, true));
        // A list with no name OpenSSL knows is refused (the connect then fails with
        // EINVAL); names it does not know beside one it does are skipped.
        let mut b = SslContextBuilder::new(SslMethod::tls_client()).unwrap();
        assert!(b.set_ciphersuites("TLS_NO_SUCH_SUITE").is_err());
        assert!(b.set_ciphersuites("TLS_AES_128_GCM_SHA256:TLS_NO_SUCH_SUITE").is_ok());
        // Every list this picks is one OpenSSL takes.
        for aes in [true, false] {
            let mut b = SslContextBuilder::new(SslMethod::tls_client()).unwrap();
            b.set_ciphersuites(&tls13_suites(None, aes)).unwrap();
        }
    }

    struct TempFile(PathBuf);
    impl TempFile {
        fn new(name: &str, contents: &[u8]) -> TempFile {
            let path =
                std::env::temp_dir().join(format!("nbd-tls-unit-{}-{name}", std::process::id()));
            let mut f = std::fs::File::create(&path).unwrap();
            f.write_all(contents).unwrap();
            TempFile(path)
        }
    }
    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    #[test]
    fn defaults_match_libnbd() {
        let s = TlsSettings::default();
        assert_eq!(s.mode, TlsMode::Disable);
        assert!(s.verify_peer);
        assert!(s.certificates.is_none() && s.psk_file.is_none() && s.username.is_none());
        let explicit = TlsSettings {
            certificates: Some("/x".into()),
            ..TlsSettings::default()
        };
        assert_eq!(explicit.certificate_dirs(), vec![PathBuf::from("/x")]);
        let named = TlsSettings {
            username: Some("alice".into()),
            ..TlsSettings::default()
        };
        assert_eq!(named.effective_username().unwrap(), "alice");
        assert!(supports_tls());
    }

    #[test]
    fn default_certificate_dirs_as_libnbd() {
        assert_eq!(
            default_certificate_dirs(true, Some("/root".into())),
            vec![PathBuf::from("/etc/pki/libnbd")]
        );
        assert_eq!(
            default_certificate_dirs(false, Some("/home/a".into())),
            vec![
                PathBuf::from("/home/a/.pki/libnbd"),
                PathBuf::from("/home/a/.config/pki/libnbd")
            ]
        );
        assert!(default_certificate_dirs(false, None).is_empty());
    }

    #[test]
    fn psk_file_lookup() {
        let f = TempFile::new(
            "keys.psk",
            b"bob:00ff\r\nnot a key line\nalice:0123456789abcdefABCDEF\nalice:ffff\n",
        );
        let key = find_psk_key(&f.0, "alice").unwrap();
        assert_eq!(
            key.0,
            [0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef, 0xab, 0xcd, 0xef]
        );
        assert_eq!(find_psk_key(&f.0, "bob").unwrap().0, [0x00, 0xff]);
        let e = find_psk_key(&f.0, "carol").err().unwrap();
        assert_eq!(e.errno(), Errno::EINVAL);
        assert!(e.message().contains("no key for user \"carol\""), "{e}");
        // A user name that is a prefix of another is not a match.
        let e = find_psk_key(&f.0, "ali").err().unwrap();
        assert_eq!(e.errno(), Errno::EINVAL);
    }

    #[test]
    fn psk_file_errors() {
        let f = TempFile::new("bad.psk", b"odd:abc\nnothex:zz00\nempty:\n");
        for (user, why) in [
            ("odd", "odd number of hex digits"),
            ("nothex", "not hexadecimal"),
            ("empty", "is empty"),
        ] {
            let e = find_psk_key(&f.0, user).err().unwrap();
            assert_eq!(e.errno(), Errno::EINVAL);
            assert!(e.message().contains(why), "{e}");
            assert!(e.message().contains("line"), "{e}");
        }
        let e = find_psk_key(Path::new("/nonexistent/keys.psk"), "alice")
            .err()
            .unwrap();
        assert_eq!(e.errno(), Errno::ENOENT);
        assert!(e.message().contains("/nonexistent/keys.psk"), "{e}");
    }

    #[test]
    fn psk_size_limits() {
        assert!(check_psk_sizes("alice", &Secret(vec![1; 512])).is_ok());
        let e = check_psk_sizes("alice", &Secret(vec![1; 513])).unwrap_err();
        assert!(e.message().contains("513 bytes"), "{e}");
        let e = check_psk_sizes(&"u".repeat(257), &Secret(vec![1; 32])).unwrap_err();
        assert_eq!(e.errno(), Errno::EINVAL);
        assert!(check_psk_sizes("", &Secret(vec![1; 32])).is_err());
    }

    #[test]
    fn alerts_are_decoded() {
        assert_eq!(alert_of_reason(1051), Some(ALERT_DECRYPT_ERROR));
        assert_eq!(alert_of_reason(1116), Some(ALERT_CERTIFICATE_REQUIRED));
        assert_eq!(alert_of_reason(294), None);
        assert_eq!(
            alert_name(ALERT_UNKNOWN_PSK_IDENTITY),
            "unknown PSK identity"
        );
        assert_eq!(alert_name(200), "alert 200");
    }

    #[test]
    fn missing_certificate_dir_is_enoent() {
        let settings = TlsSettings {
            mode: TlsMode::Require,
            certificates: Some("/nonexistent/certs".into()),
            ..TlsSettings::default()
        };
        let e = TlsConnector::new(&settings, None).unwrap_err();
        assert_eq!(e.errno(), Errno::ENOENT);
        assert!(e.message().contains("/nonexistent/certs"), "{e}");
    }
}
