//! vsock on a machine with no vsock peer to talk to: the connect fails promptly with the
//! kernel's errno, whether the machine has no vsock at all, a guest transport (as in a
//! VM) or only the loopback one. Linux only: elsewhere see `vsock_elsewhere.rs`.
#![cfg(target_os = "linux")]

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use nbd_client::{connect_vsock, Errno, Fault};

#[tokio::test]
async fn vsock_without_a_peer_fails_cleanly() {
    let started = Instant::now();
    // CID 2 is the host seen from a guest; nothing listens on this port there.
    let r = tokio::time::timeout(Duration::from_secs(10), connect_vsock(2, 0x7fff_fffe))
        .await
        .expect("the connect is bounded");
    let e = r.unwrap_err();
    assert_eq!(e.fault(), Fault::Io);
    assert!(e.message().contains("vsock cid 2 port 2147483646"), "{e}");
    let expected = [
        Errno::EAFNOSUPPORT,
        Errno::ENODEV,
        Errno::ECONNRESET,
        Errno::ECONNREFUSED,
        Errno::ETIMEDOUT,
        Errno::EHOSTUNREACH,
        Errno::ENETUNREACH,
    ];
    assert!(expected.contains(&e.errno()), "{e}");
    assert!(started.elapsed() < Duration::from_secs(10));
}

/// CID 1 (local: needs the loopback transport), 3 (another guest, or this machine's own
/// CID inside a VM) and -1 (any): nothing listens on the port, or the CID cannot be
/// reached. Either way an error with the kernel's errno, not a hang.
#[tokio::test]
async fn vsock_to_a_local_cid_fails_cleanly() {
    for cid in [1, 3, u32::MAX] {
        let r = tokio::time::timeout(Duration::from_secs(10), connect_vsock(cid, 0x7fff_fffd))
            .await
            .expect("the connect is bounded");
        let e = r.unwrap_err();
        assert_eq!(e.fault(), Fault::Io, "{e}");
        assert_ne!(e.errno(), Errno::EIO, "the kernel's errno is kept: {e}");
        eprintln!("cid {cid}: {e}");
    }
}

/// Where the loopback transport exists (`vsock_loopback`), a real connection: to a
/// listener of ours through CID 1. Elsewhere the test says why it cannot run and passes.
#[tokio::test]
async fn vsock_loopback_connects_when_available() {
    // SAFETY: socket has no memory arguments.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        eprintln!("skipped: no vsock here ({})", std::io::Error::last_os_error());
        return;
    }
    // SAFETY: a new fd of ours.
    let listener = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: all-zero is a valid sockaddr_vm to fill in.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = libc::VMADDR_CID_ANY;
    addr.svm_port = libc::VMADDR_PORT_ANY;
    let mut len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
    // SAFETY: addr and len describe a valid sockaddr_vm.
    unsafe {
        assert_eq!(libc::bind(listener.as_raw_fd(), (&addr as *const libc::sockaddr_vm).cast(), len), 0);
        assert_eq!(libc::listen(listener.as_raw_fd(), 1), 0);
        assert_eq!(libc::getsockname(listener.as_raw_fd(), (&mut addr as *mut libc::sockaddr_vm).cast(), &mut len), 0);
    }
    let port = addr.svm_port;
    match tokio::time::timeout(Duration::from_secs(10), connect_vsock(libc::VMADDR_CID_LOCAL, port)).await.unwrap() {
        Ok(socket) => {
            // SAFETY: accept on our listener; the result is a new fd of ours.
            let accepted = unsafe { libc::accept(listener.as_raw_fd(), std::ptr::null_mut(), std::ptr::null_mut()) };
            assert!(accepted >= 0);
            // SAFETY: as above.
            let accepted = unsafe { OwnedFd::from_raw_fd(accepted) };
            let mut ours = std::fs::File::from(socket);
            let mut theirs = std::fs::File::from(accepted);
            use std::io::{Read, Write};
            ours.write_all(b"hello").unwrap();
            let mut buf = [0u8; 5];
            theirs.read_exact(&mut buf).unwrap();
            assert_eq!(&buf, b"hello");
        }
        // What a machine without the loopback transport answers; anything else is a bug.
        Err(e) if [Errno::ETIMEDOUT, Errno::ENODEV, Errno::ECONNRESET].contains(&e.errno()) => {
            eprintln!("skipped: no vsock loopback here ({e})")
        }
        Err(e) => panic!("{e}"),
    }
}
