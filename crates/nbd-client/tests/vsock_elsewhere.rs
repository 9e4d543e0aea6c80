//! vsock where the system has none (macOS): the connect fails at once with `ENOTSUP` and
//! `supports_vsock` says so. On Linux see `vsock.rs`.
#![cfg(not(target_os = "linux"))]

use nbd_client::{connect_vsock, supports_vsock, Errno, Handle};

#[tokio::test]
async fn vsock_is_not_supported_here() {
    assert!(!supports_vsock());
    let e = connect_vsock(2, 10809).await.unwrap_err();
    assert_eq!(e.errno(), Errno::ENOTSUP, "{e}");
    assert!(e.message().contains("only supported on Linux"), "{e}");

    let h = Handle::default();
    let e = h.connect_vsock(2, 10809).await.unwrap_err();
    assert_eq!(e.errno(), Errno::ENOTSUP, "{e}");
}
