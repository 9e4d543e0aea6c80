//! AF_VSOCK connections (libnbd's `nbd_connect_vsock`): between a virtual machine and its
//! host, addressed by context id (CID) and port. Linux only.

use std::os::fd::OwnedFd;

use nbd_proto::Result;

/// `nbd_connect_vsock`: connects to `port` on the vsock context `cid` (2 is the host seen
/// from a guest, 1 the local machine where the loopback transport is loaded, 3 and up are
/// guests). The connect is awaited without blocking a thread and is bounded by the
/// kernel's vsock connect timeout (two seconds by default). Returns a connected stream
/// socket (close-on-exec, in blocking mode) for [`Handle::connect_socket`](crate::Handle).
///
/// Errors keep the kernel's errno: `EAFNOSUPPORT` when this system has no vsock support
/// at all, `ENODEV` when no vsock transport reaches `cid`, `ECONNRESET` or `ECONNREFUSED`
/// when nothing listens on the port, `ETIMEDOUT` when nothing answers. Needs a tokio runtime
/// with IO enabled. On systems other than Linux it fails with `ENOTSUP`.
pub async fn connect_vsock(cid: u32, port: u32) -> Result<OwnedFd> {
    imp::connect(cid, port).await
}

/// `nbd_supports_vsock`: whether this build can connect over AF_VSOCK (Linux builds can;
/// whether the running kernel has a vsock transport is another matter).
pub fn supports_vsock() -> bool {
    cfg!(target_os = "linux")
}

#[cfg(target_os = "linux")]
mod imp {
    use std::io;
    use std::mem::size_of;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    use tokio::io::unix::AsyncFd;
    use tokio::io::Interest;

    use nbd_proto::{Error, Result};

    use crate::transport::{io_error, set_nonblocking};

    fn last_error(what: &str) -> Error {
        io_error(what, io::Error::last_os_error())
    }


    pub(super) async fn connect(cid: u32, port: u32) -> Result<OwnedFd> {
        let target = format!("vsock cid {cid} port {port}");
        // SAFETY: socket has no memory arguments.
        let fd = unsafe {
            libc::socket(
                libc::AF_VSOCK,
                libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                0,
            )
        };
        if fd < 0 {
            let e = io::Error::last_os_error();
            let context = if e.raw_os_error() == Some(libc::EAFNOSUPPORT) {
                format!("cannot connect to {target}: this system has no vsock support (is the vsock module loaded?)")
            } else {
                format!("creating a vsock socket for {target}")
            };
            return Err(io_error(&context, e));
        }
        // SAFETY: fd is a new socket nobody else owns.
        let socket = unsafe { OwnedFd::from_raw_fd(fd) };

        // SAFETY: sockaddr_vm is plain data; all-zero is a valid value to fill in.
        let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
        addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
        addr.svm_cid = cid;
        addr.svm_port = port;
        // SAFETY: addr is a valid sockaddr_vm of the length given.
        let rc = unsafe {
            libc::connect(
                socket.as_raw_fd(),
                (&addr as *const libc::sockaddr_vm).cast(),
                size_of::<libc::sockaddr_vm>() as libc::socklen_t,
            )
        };
        let refused = |e: io::Error| {
            let context = if e.raw_os_error() == Some(libc::ENODEV) {
                format!("connecting to {target}: no vsock transport reaches cid {cid}")
            } else {
                format!("connecting to {target}")
            };
            io_error(&context, e)
        };
        if rc != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINPROGRESS) {
                return Err(refused(e));
            }
            // Wait for the socket to become writable, then read the outcome.
            // SAFETY: the AsyncFd takes the OwnedFd, so the fd stays open and the same
            // socket for as long as it is registered.
            let registered = unsafe { AsyncFd::register_with_interest(socket, Interest::WRITABLE) }
                .map_err(|e| io_error("registering the vsock socket", e.into()))?;
            loop {
                let mut ready = registered
                    .writable()
                    .await
                    .map_err(|e| io_error(&format!("waiting to connect to {target}"), e))?;
                let mut err: libc::c_int = 0;
                let mut len = size_of::<libc::c_int>() as libc::socklen_t;
                // SAFETY: err and len are valid for writes of the sizes given.
                let rc = unsafe {
                    libc::getsockopt(
                        registered.as_raw_fd(),
                        libc::SOL_SOCKET,
                        libc::SO_ERROR,
                        (&mut err as *mut libc::c_int).cast(),
                        &mut len,
                    )
                };
                if rc != 0 {
                    return Err(last_error("reading the vsock connect result"));
                }
                if err != 0 {
                    return Err(refused(io::Error::from_raw_os_error(err)));
                }
                // Writable with no error: connected, unless the wakeup was spurious.
                // SAFETY: as for addr above.
                let mut peer: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
                let mut peer_len = size_of::<libc::sockaddr_vm>() as libc::socklen_t;
                // SAFETY: peer and peer_len describe a writable sockaddr_vm.
                let connected = unsafe {
                    libc::getpeername(
                        registered.as_raw_fd(),
                        (&mut peer as *mut libc::sockaddr_vm).cast(),
                        &mut peer_len,
                    )
                } == 0;
                if connected {
                    break;
                }
                ready.clear_ready();
            }
            let socket = registered.into_inner();
            set_nonblocking(socket.as_raw_fd(), false)
                .map_err(|e| io_error("making the vsock socket blocking", e))?;
            return Ok(socket);
        }
        set_nonblocking(socket.as_raw_fd(), false)
            .map_err(|e| io_error("making the vsock socket blocking", e))?;
        Ok(socket)
    }
}

#[cfg(not(target_os = "linux"))]
mod imp {
    use std::os::fd::OwnedFd;

    use nbd_proto::{Errno, Error, Result};

    pub(super) async fn connect(cid: u32, port: u32) -> Result<OwnedFd> {
        Err(Error::usage(
            Errno::ENOTSUP,
            format!("cannot connect to vsock cid {cid} port {port}: vsock is only supported on Linux"),
        ))
    }
}
