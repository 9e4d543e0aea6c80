//! Unix domain sockets (`nbd_connect_unix`).

use std::os::fd::OwnedFd;

use nbd_proto::{Errno, Error, Result};

use super::io_error;

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
