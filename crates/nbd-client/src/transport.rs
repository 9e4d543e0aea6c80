//! Sockets: checking an fd the application hands over, opening Unix and TCP connections,
//! and turning a socket into the reader and writer the driver uses.
//!
//! The handle keeps the socket's original fd for as long as it lives and gives tokio a
//! duplicate, so the fd number the application passed in stays open until the handle is
//! closed (as the `connectSocket` contract promises), whatever happens to the connection.

use std::io;
use std::mem::{size_of, MaybeUninit};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use tokio::io::{AsyncRead, AsyncWrite};

use nbd_proto::{Errno, Error, Result};

pub(crate) type Reader = Box<dyn AsyncRead + Send + Unpin>;
pub(crate) type Writer = Box<dyn AsyncWrite + Send + Unpin>;

/// An OS error as an NBD error, its errno kept, with `context` before the message.
pub(crate) fn io_error(context: &str, e: io::Error) -> Error {
    let errno = e
        .raw_os_error()
        .map(Errno::from_raw_os_error)
        .unwrap_or(Errno::EIO);
    Error::io(errno, format!("{context}: {e}"))
}

fn getsockopt_int(fd: RawFd, level: libc::c_int, name: libc::c_int) -> io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: value and len are valid for writes of the sizes given.
    let rc = unsafe { libc::getsockopt(fd, level, name, (&mut value as *mut libc::c_int).cast(), &mut len) };
    if rc == 0 {
        Ok(value)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Checks that `fd` is an open, connected stream socket, without taking it. Returns its
/// address family.
pub(crate) fn check_connected_stream(fd: RawFd) -> Result<libc::c_int> {
    let refuse = |errno: Errno, why: String| Error::usage(errno, format!("fd {fd} {why}"));
    if fd < 0 {
        return Err(refuse(Errno::EBADF, "is negative".into()));
    }
    let mut st = MaybeUninit::<libc::stat>::uninit();
    // SAFETY: st is valid for a write of one stat.
    if unsafe { libc::fstat(fd, st.as_mut_ptr()) } != 0 {
        let e = io::Error::last_os_error();
        return Err(refuse(Errno::EBADF, format!("is not an open file descriptor ({e})")));
    }
    // SAFETY: fstat succeeded and filled st.
    let mode = unsafe { st.assume_init() }.st_mode;
    if mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(refuse(Errno::ENOTSOCK, "is not a socket".into()));
    }
    let kind = getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_TYPE)
        .map_err(|e| refuse(Errno::ENOTSOCK, format!("cannot be queried as a socket ({e})")))?;
    if kind != libc::SOCK_STREAM {
        return Err(refuse(Errno::EINVAL, "is not a stream socket".into()));
    }
    if getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_ACCEPTCONN).unwrap_or(0) != 0 {
        return Err(refuse(Errno::EINVAL, "is a listening socket, not a connected one".into()));
    }
    let mut addr = MaybeUninit::<libc::sockaddr_storage>::uninit();
    let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: addr and len describe a writable sockaddr_storage.
    if unsafe { libc::getpeername(fd, addr.as_mut_ptr().cast(), &mut len) } != 0 {
        return Err(refuse(Errno::ENOTCONN, "is a socket that is not connected".into()));
    }
    socket_domain(fd).map_err(|e| refuse(Errno::EINVAL, format!("has no readable address family ({e})")))
}

/// A socket's address family: `SO_DOMAIN` where the system has it (Linux), else the family
/// of the socket's own address (macOS has no `SO_DOMAIN`).
fn socket_domain(fd: RawFd) -> io::Result<libc::c_int> {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_DOMAIN)
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    {
        let mut addr = MaybeUninit::<libc::sockaddr_storage>::zeroed();
        let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        // SAFETY: addr and len describe a writable sockaddr_storage.
        if unsafe { libc::getsockname(fd, addr.as_mut_ptr().cast(), &mut len) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: zeroed, then (partly) written by getsockname; the family is always set.
        Ok(libc::c_int::from(unsafe { addr.assume_init() }.ss_family))
    }
}

/// Takes ownership of `fd` (already checked) so that it is closed when the result drops.
///
/// # Safety
///
/// `fd` must be open and owned by nobody else from now on.
pub(crate) unsafe fn adopt(fd: RawFd) -> OwnedFd {
    OwnedFd::from_raw_fd(fd)
}

/// Anything the connection can run over: a socket, or TLS on top of one.
pub(crate) trait AsyncStream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> AsyncStream for T {}

/// The connection's byte stream, whole during the handshake (TLS may wrap it), split in two
/// for the driver afterwards.
pub(crate) enum Stream {
    Unix(tokio::net::UnixStream),
    Tcp(tokio::net::TcpStream),
    /// TLS (or any other layer) over one of the above.
    Layered(Box<dyn AsyncStream>),
}

impl Stream {
    /// A stream over a duplicate of `socket` (close-on-exec, non-blocking).
    pub(crate) fn new(socket: &OwnedFd) -> Result<Stream> {
        let domain = socket_domain(socket.as_raw_fd()).map_err(|e| io_error("querying the socket", e))?;
        let dup = socket
            .try_clone()
            .map_err(|e| io_error("duplicating the socket", e))?;
        let set_nonblocking = |fd: RawFd| -> io::Result<()> {
            // SAFETY: plain fcntl calls on an fd we own.
            unsafe {
                let flags = libc::fcntl(fd, libc::F_GETFL);
                if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        };
        set_nonblocking(dup.as_raw_fd())
            .map_err(|e| io_error("making the socket non-blocking", e))?;
        if domain == libc::AF_INET || domain == libc::AF_INET6 {
            let std_stream = std::net::TcpStream::from(dup);
            // Requests are small and latency-bound; never wait to coalesce them.
            let _ = std_stream.set_nodelay(true);
            let stream = tokio::net::TcpStream::from_std(std_stream)
                .map_err(|e| io_error("registering the socket", e))?;
            Ok(Stream::Tcp(stream))
        } else {
            // Unix sockets, and any other stream socket (e.g. vsock), through the Unix type:
            // it only needs read, write and shutdown on the fd.
            let std_stream = std::os::unix::net::UnixStream::from(dup);
            let stream = tokio::net::UnixStream::from_std(std_stream)
                .map_err(|e| io_error("registering the socket", e))?;
            Ok(Stream::Unix(stream))
        }
    }

    /// The reader and writer halves for the driver. Plain sockets split without a lock;
    /// a layered stream shares one.
    pub(crate) fn split(self) -> (Reader, Writer) {
        match self {
            Stream::Unix(s) => {
                let (r, w) = s.into_split();
                (Box::new(r), Box::new(w))
            }
            Stream::Tcp(s) => {
                let (r, w) = s.into_split();
                (Box::new(r), Box::new(w))
            }
            Stream::Layered(s) => {
                let (r, w) = tokio::io::split(s);
                (Box::new(r), Box::new(w))
            }
        }
    }
}

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            Stream::Unix($s) => $e,
            Stream::Tcp($s) => $e,
            Stream::Layered($s) => $e,
        }
    };
}

impl AsyncRead for Stream {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        delegate!(self, s => std::pin::Pin::new(s).poll_read(cx, buf))
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        delegate!(self, s => std::pin::Pin::new(s).poll_write(cx, buf))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        delegate!(self, s => std::pin::Pin::new(s).poll_flush(cx))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        delegate!(self, s => std::pin::Pin::new(s).poll_shutdown(cx))
    }
}

/// Room for a path in `sockaddr_un` (`sun_path`), its terminating NUL included.
const SUN_PATH_MAX: usize = 108;

/// Connects to a Unix domain socket.
pub(crate) async fn connect_unix(path: &str) -> Result<OwnedFd> {
    // Refused here with the codes libnbd uses; the standard library would report both as
    // errors without an errno.
    if path.contains('\0') {
        return Err(Error::usage(Errno::EINVAL, format!("socket path {path:?} contains a NUL byte")));
    }
    if path.len() >= SUN_PATH_MAX {
        return Err(Error::usage(
            Errno::ENAMETOOLONG,
            format!(
                "socket path is {} bytes, longer than a Unix socket address holds ({} at most)",
                path.len(),
                SUN_PATH_MAX - 1
            ),
        ));
    }
    let stream = tokio::net::UnixStream::connect(path)
        .await
        .map_err(|e| io_error(&format!("connecting to {path}"), e))?;
    let std_stream = stream
        .into_std()
        .map_err(|e| io_error("detaching the socket", e))?;
    Ok(OwnedFd::from(std_stream))
}

/// Connects over TCP, trying each address `host` resolves to.
pub(crate) async fn connect_tcp(host: &str, port: &str) -> Result<OwnedFd> {
    if host.contains('\0') {
        return Err(Error::usage(Errno::EINVAL, format!("host {host:?} contains a NUL byte")));
    }
    let port_num: u16 = match port.parse() {
        Ok(p) => p,
        Err(_) => {
            let name = port.to_string();
            // Reading the services database is file IO: keep it off the runtime's threads.
            tokio::task::spawn_blocking(move || service_port(&name))
                .await
                .ok()
                .flatten()
                .ok_or_else(|| {
                    Error::usage(Errno::EINVAL, format!("port {port:?} is not a number or a known service"))
                })?
        }
    };
    let addrs = tokio::net::lookup_host((host, port_num))
        .await
        .map_err(|e| Error::io(Errno::ENOENT, format!("cannot resolve host {host:?}: {e}")))?;
    let mut last = Error::io(Errno::ENOENT, format!("host {host:?} resolved to no address"));
    for addr in addrs {
        match tokio::net::TcpStream::connect(addr).await {
            Ok(stream) => {
                let std_stream = stream
                    .into_std()
                    .map_err(|e| io_error("detaching the socket", e))?;
                return Ok(OwnedFd::from(std_stream));
            }
            Err(e) => last = io_error(&format!("connecting to {addr}"), e),
        }
    }
    Err(last)
}

/// The TCP port of service `name` as getaddrinfo knows it (`/etc/services` and the other
/// NSS sources), as libnbd's `nbd_connect_tcp` takes any; `nbd` is 10809 even where the
/// system does not list it.
pub(crate) fn service_port(name: &str) -> Option<u16> {
    if name == "nbd" {
        return Some(nbd_proto::consts::DEFAULT_PORT);
    }
    // Numbers are the caller's to parse: getaddrinfo would wrap 99999 to 34463.
    if name.is_empty() || name.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let service = std::ffi::CString::new(name).ok()?;
    // SAFETY: zeroed addrinfo is a valid "no hints" value; only the fields set are read.
    let mut hints: libc::addrinfo = unsafe { std::mem::zeroed() };
    hints.ai_socktype = libc::SOCK_STREAM;
    hints.ai_family = libc::AF_UNSPEC;
    let mut found: *mut libc::addrinfo = std::ptr::null_mut();
    // SAFETY: valid C strings and hints; `found` is freed below on success.
    let rc = unsafe { libc::getaddrinfo(std::ptr::null(), service.as_ptr(), &hints, &mut found) };
    if rc != 0 || found.is_null() {
        return None;
    }
    // SAFETY: getaddrinfo returned a list whose first entry has a socket address of
    // `ai_addrlen` bytes, IPv4 or IPv6 (the port sits at the same place in both).
    let port = unsafe {
        let ai = &*found;
        match ai.ai_family {
            libc::AF_INET => Some(u16::from_be((*(ai.ai_addr as *const libc::sockaddr_in)).sin_port)),
            libc::AF_INET6 => Some(u16::from_be((*(ai.ai_addr as *const libc::sockaddr_in6)).sin6_port)),
            _ => None,
        }
    };
    // SAFETY: allocated by getaddrinfo above, freed once.
    unsafe { libc::freeaddrinfo(found) };
    port
}

#[cfg(test)]
mod tests {
    use super::service_port;

    #[test]
    fn service_names_resolve_as_getaddrinfo_does() {
        assert_eq!(service_port("nbd"), Some(10809));
        // In every /etc/services (and netbase's): ssh is 22, discard 9 with alias sink.
        assert_eq!(service_port("ssh"), Some(22));
        assert_eq!(service_port("sink"), Some(9));
        assert_eq!(service_port("no-such-service-here"), None);
        assert_eq!(service_port("a\0b"), None);
        assert_eq!(service_port("99999"), None, "not wrapped to 16 bits");
        assert_eq!(service_port(""), None);
    }
}
