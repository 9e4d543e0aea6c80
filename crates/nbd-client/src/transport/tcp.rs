//! TCP (`nbd_connect_tcp`): host names, addresses and service names.

use std::os::fd::OwnedFd;

use nbd_proto::{Errno, Error, Result};

use super::io_error;

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
