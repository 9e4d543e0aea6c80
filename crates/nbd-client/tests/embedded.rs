//! Integration tests of the Rust client: against the embedded server (socketpair and Unix
//! socket), and against a server played by hand for what a real server will not do on cue
//! (stay silent, answer late, hang up mid-flight).

use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::task::JoinSet;

use nbd_client::consts::*;
use nbd_client::{CancelToken, Settings, DestBuf, Errno, Error, Handle, Op, Protocol, State};
use nbd_embedded::{MemoryServer, ServerOptions};

const MIB: u64 = 1024 * 1024;

#[path = "../../nbd-proto/tests/bytes/mod.rs"]
mod bytes;
use bytes::{chunk, oldstyle_greeting, simple_reply};

fn server(size: u64) -> MemoryServer {
    MemoryServer::new(ServerOptions {
        size,
        ..Default::default()
    })
}

/// Moves `fd` to a number at or above `min`, far above what the rest of the process
/// allocates, so that "is this number still open?" cannot be answered by someone else's
/// new descriptor reusing it.
fn high_fd(fd: OwnedFd, min: RawFd) -> RawFd {
    // SAFETY: plain fcntl on an fd we own.
    let high = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, min) };
    assert!(high >= min, "F_DUPFD_CLOEXEC: {}", std::io::Error::last_os_error());
    high
}

fn fd_is_open(fd: RawFd) -> bool {
    // SAFETY: F_GETFD only queries.
    unsafe { libc::fcntl(fd, libc::F_GETFD) != -1 }
}

fn fd_is_closed(fd: RawFd) -> bool {
    // SAFETY: F_GETFD only queries.
    let rc = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    rc == -1 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EBADF)
}

/// Closes an fd the test still owns.
fn close_fd(fd: RawFd) {
    // SAFETY: the caller owns `fd` and no longer uses it.
    drop(unsafe { OwnedFd::from_raw_fd(fd) });
}

#[track_caller]
fn assert_errno<T: std::fmt::Debug>(r: Result<T, Error>, errno: Errno) -> Error {
    match r {
        Ok(v) => panic!("expected {errno}, got Ok({v:?})"),
        Err(e) => {
            assert_eq!(e.errno(), errno, "{e}");
            e
        }
    }
}

async fn connected(server: &MemoryServer, config: Settings) -> Handle {
    let h = Handle::new(config);
    let fd = server.socketpair().unwrap().into_raw_fd();
    h.connect_socket(fd).await.unwrap();
    h
}

fn pattern(i: usize, len: usize) -> Vec<u8> {
    (0..len).map(|j| (i * 31 + j * 7 + (j >> 8)) as u8).collect()
}

/// Waits (briefly) until no command counts as in flight. A returned command may still be
/// counted for a moment: see state_is_ready_as_soon_as_the_last_command_returns.
async fn settled(h: &Handle) {
    let deadline = Instant::now() + Duration::from_secs(2);
    while h.in_flight() != 0 {
        assert!(Instant::now() < deadline, "in_flight stuck at {}", h.in_flight());
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Writes `count` distinct 4 KiB blocks, all in flight at once, then reads them back the
/// same way.
async fn write_and_read_back(h: &Handle, server: &MemoryServer, count: usize) {
    const BLOCK: usize = 4096;
    let mut writes = JoinSet::new();
    for i in 0..count {
        let h = h.clone();
        writes.spawn(async move {
            h.pwrite(Box::new(pattern(i, BLOCK)), (i * BLOCK) as u64, 0, None)
                .await
        });
    }
    while let Some(r) = writes.join_next().await {
        r.unwrap().unwrap();
    }
    for i in 0..count {
        assert_eq!(server.read((i * BLOCK) as u64, BLOCK), pattern(i, BLOCK), "block {i} on the server");
    }
    let mut reads = JoinSet::new();
    for i in 0..count {
        let h = h.clone();
        reads.spawn(async move { (i, h.pread(BLOCK as u64, (i * BLOCK) as u64, 0, None).await) });
    }
    while let Some(r) = reads.join_next().await {
        let (i, data) = r.unwrap();
        assert_eq!(data.unwrap(), pattern(i, BLOCK), "block {i} read back");
    }
}

// ---- the embedded server ----

#[tokio::test(flavor = "multi_thread")]
async fn socketpair_500_commands_in_flight() {
    let srv = server(4 * MIB);
    let h = connected(
        &srv,
        Settings {
            max_in_flight: 1024,
            ..Settings::default()
        },
    )
    .await;
    assert_eq!(h.state(), State::Ready);
    let n = h.negotiated().unwrap();
    // The embedded server refuses GO and structured replies: fixed newstyle, simple replies.
    assert_eq!(n.protocol, Protocol::FixedNewstyle);
    assert!(!n.structured_replies);
    assert_eq!(n.export.size, 4 * MIB);
    assert!(n.export.has(FLAG_SEND_FLUSH));
    write_and_read_back(&h, &srv, 500).await;
    h.flush(0, None).await.unwrap();
    // (That it is 0 at once is checked, and found wanting, by
    // state_is_ready_as_soon_as_the_last_command_returns.)
    settled(&h).await;
    assert_eq!(h.state(), State::Ready);
    let stats = h.stats();
    assert!(stats.bytes_sent > 500 * 4096 && stats.bytes_received > 500 * 4096, "{stats:?}");
    h.shutdown(false).await.unwrap();
    assert_eq!(h.state(), State::Closed);
    h.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn state_is_ready_as_soon_as_the_last_command_returns() {
    let srv = server(MIB);
    let h = connected(&srv, Settings::default()).await;
    let mut stale = 0;
    for i in 0..300u64 {
        h.pread(512, (i % 64) * 512, 0, None).await.unwrap();
        if h.in_flight() != 0 || h.state() != State::Ready {
            stale += 1;
        }
    }
    assert_eq!(stale, 0, "{stale} of 300 completed reads left the handle looking busy");
    h.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn listen_unix_and_connect_unix() {
    let srv = server(4 * MIB);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let path = std::env::temp_dir().join(format!(
        "nbd-client-embedded-{}-{nanos}.sock",
        std::process::id()
    ));
    let listener = srv.listen_unix(&path).unwrap();
    let h = Handle::new(Settings {
        max_in_flight: 1024,
        ..Settings::default()
    });
    h.connect_unix(path.to_str().unwrap()).await.unwrap();
    assert_eq!(h.state(), State::Ready);
    write_and_read_back(&h, &srv, 500).await;

    // A second client on the same listener sees the first one's data.
    let h2 = Handle::default();
    h2.connect_unix(path.to_str().unwrap()).await.unwrap();
    assert_eq!(h2.pread(4096, 4096 * 7, 0, None).await.unwrap(), pattern(7, 4096));
    h2.shutdown(false).await.unwrap();
    h.shutdown(false).await.unwrap();
    assert_eq!(h.state(), State::Closed);
    listener.close();
    assert!(!path.exists());

    // Nothing listens there any more.
    let h3 = Handle::default();
    assert!(h3.connect_unix(path.to_str().unwrap()).await.is_err());
    assert_eq!(h3.state(), State::Dead);
}

#[tokio::test(flavor = "multi_thread")]
async fn state_transitions() {
    let srv = server(MIB);
    let h = Handle::default();
    assert_eq!(h.state(), State::Created);
    assert_errno(h.pread(512, 0, 0, None).await, Errno::ENOTCONN);
    assert_errno(h.negotiated(), Errno::ENOTCONN);
    assert_errno(h.shutdown(false).await, Errno::ENOTCONN);

    h.connect_socket(srv.socketpair().unwrap().into_raw_fd()).await.unwrap();
    assert_eq!(h.state(), State::Ready);
    assert_errno(h.configure(|c| c.negotiation.full_info = true), Errno::EINVAL);
    assert_errno(h.set_export_name("x"), Errno::EINVAL);
    h.pwrite(Box::new(vec![1u8; 512]), 0, 0, None).await.unwrap();

    h.shutdown(false).await.unwrap();
    assert_eq!(h.state(), State::Closed);
    assert_errno(h.pread(512, 0, 0, None).await, Errno::EINVAL);
    // Information stays available after the end, as in libnbd.
    assert_eq!(h.negotiated().unwrap().export.size, MIB);
    h.close().await;
    assert_eq!(h.state(), State::Closed);
    h.close().await; // idempotent

    // close() without shutdown.
    let h = connected(&srv, Settings::default()).await;
    assert_eq!(h.state(), State::Ready);
    h.close().await;
    assert_eq!(h.state(), State::Closed);
    assert_errno(h.pread(512, 0, 0, None).await, Errno::EINVAL);
    assert_errno(
        h.connect_socket(-1).await,
        Errno::EINVAL,
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn second_connect_is_refused_and_leaves_the_fd_alone() {
    let srv = server(MIB);
    let h = connected(&srv, Settings::default()).await;
    let other = high_fd(srv.socketpair().unwrap(), 2000);
    let e = assert_errno(h.connect_socket(other).await, Errno::EINVAL);
    assert!(e.message().contains("state"), "{e}");
    assert!(fd_is_open(other), "a refused connect must not take the fd");
    // The first connection is unharmed.
    assert_eq!(h.state(), State::Ready);
    h.pwrite(Box::new(vec![9u8; 512]), 512, 0, None).await.unwrap();
    assert_eq!(h.pread(512, 512, 0, None).await.unwrap(), vec![9u8; 512]);
    h.close().await;
    // Refused on a closed handle too, still without taking the fd.
    assert_errno(h.connect_socket(other).await, Errno::EINVAL);
    assert!(fd_is_open(other));
    // The fd still works: another handle can use it.
    let h2 = Handle::default();
    h2.connect_socket(other).await.unwrap();
    assert_eq!(h2.pread(512, 512, 0, None).await.unwrap(), vec![9u8; 512]);
    h2.close().await;
    assert!(fd_is_closed(other));
}

#[tokio::test(flavor = "multi_thread")]
async fn connect_socket_refuses_what_is_not_a_connected_stream_socket() {
    let srv = server(MIB);
    let h = Handle::default();

    let mut fds = [0; 2];
    // SAFETY: fds has room for two descriptors.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    let e = assert_errno(h.connect_socket(fds[0]).await, Errno::ENOTSOCK);
    assert!(e.message().contains(&fds[0].to_string()), "{e}");
    assert!(fd_is_open(fds[0]) && fd_is_open(fds[1]));
    assert_eq!(h.state(), State::Created, "a refused fd leaves the handle as it was");

    // A closed number.
    let closed = high_fd(srv.socketpair().unwrap(), 3000);
    close_fd(closed);
    assert_errno(h.connect_socket(closed).await, Errno::EBADF);
    assert_errno(h.connect_socket(-5).await, Errno::EBADF);

    // A listening socket, and a stream socket that is not connected.
    let dir = std::env::temp_dir().join(format!("nbd-client-listen-{}", std::process::id()));
    let _ = std::fs::remove_file(&dir);
    let listening = std::os::unix::net::UnixListener::bind(&dir).unwrap();
    assert_errno(h.connect_socket(listening.as_raw_fd()).await, Errno::EINVAL);
    assert!(fd_is_open(listening.as_raw_fd()));
    drop(listening);
    let _ = std::fs::remove_file(&dir);
    // SAFETY: plain socket(2).
    let unconnected = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
    assert!(unconnected >= 0);
    assert_errno(h.connect_socket(unconnected).await, Errno::ENOTCONN);
    assert!(fd_is_open(unconnected));
    close_fd(unconnected);

    // The handle is still newly created and connects fine.
    assert_eq!(h.state(), State::Created);
    h.connect_socket(srv.socketpair().unwrap().into_raw_fd()).await.unwrap();
    assert_eq!(h.state(), State::Ready);
    h.close().await;
    close_fd(fds[0]);
    close_fd(fds[1]);
}

#[tokio::test(flavor = "multi_thread")]
async fn close_closes_the_adopted_fd() {
    let srv = server(MIB);
    let fd = high_fd(srv.socketpair().unwrap(), 4000);
    let h = Handle::default();
    h.connect_socket(fd).await.unwrap();
    assert!(fd_is_open(fd));
    h.pwrite(Box::new(vec![3u8; 512]), 0, 0, None).await.unwrap();
    // Shutting down ends the connection but the handle keeps the fd until closed.
    h.shutdown(false).await.unwrap();
    assert!(fd_is_open(fd), "the fd lives until the handle is closed");
    h.close().await;
    assert!(fd_is_closed(fd), "close() closes the adopted fd");

    // Without shutdown.
    let fd = high_fd(srv.socketpair().unwrap(), 4100);
    let h = Handle::default();
    h.connect_socket(fd).await.unwrap();
    h.close().await;
    assert!(fd_is_closed(fd));
}

// ---- a server played by hand ----

/// The export the hand-played server announces.
const HAND_SIZE: u64 = 16 * MIB;

/// A handle connected over a socketpair to the returned end, where the test is the server
/// (after a valid oldstyle greeting). The client's socket sits at an fd at or above `min_fd`.
async fn hand_played(config: Settings, min_fd: RawFd) -> (Handle, UnixStream, RawFd) {
    hand_played_by(Handle::new(config), min_fd).await
}

/// As [`hand_played`], for a handle set up by the caller.
async fn hand_played_by(h: Handle, min_fd: RawFd) -> (Handle, UnixStream, RawFd) {
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    let fd = high_fd(OwnedFd::from(theirs), min_fd);
    ours.set_nonblocking(true).unwrap();
    let mut ours = UnixStream::from_std(ours).unwrap();
    ours.write_all(&oldstyle_greeting(HAND_SIZE, FLAG_HAS_FLAGS | FLAG_SEND_FLUSH))
        .await
        .unwrap();
    h.connect_socket(fd).await.unwrap();
    assert_eq!(h.negotiated().unwrap().protocol, Protocol::Oldstyle);
    (h, ours, fd)
}

#[derive(Debug)]
struct Request {
    kind: u16,
    cookie: u64,
    offset: u64,
    length: u32,
}

async fn next_request(s: &mut UnixStream) -> Request {
    let mut b = [0u8; 28];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut b))
        .await
        .expect("the client sends a request")
        .unwrap();
    assert_eq!(&b[..4], &REQUEST_MAGIC.to_be_bytes());
    Request {
        kind: u16::from_be_bytes([b[6], b[7]]),
        cookie: u64::from_be_bytes(b[8..16].try_into().unwrap()),
        offset: u64::from_be_bytes(b[16..24].try_into().unwrap()),
        length: u32::from_be_bytes(b[24..28].try_into().unwrap()),
    }
}

/// A Vec-backed read destination that, when the client drops it, hands the bytes back
/// through a shared slot: the test looks at them only once the client has let go, so the
/// buffer is never read while the client may write it.
struct ReturnedBuf {
    data: Vec<u8>,
    home: Arc<Mutex<Option<Vec<u8>>>>,
}

impl ReturnedBuf {
    fn new(data: Vec<u8>) -> (ReturnedBuf, Arc<Mutex<Option<Vec<u8>>>>) {
        let home = Arc::new(Mutex::new(None));
        (
            ReturnedBuf {
                data,
                home: home.clone(),
            },
            home,
        )
    }
}

// SAFETY: the pointer is to the Vec's heap block, which is owned by this value alone, never
// reallocated, and stays put when the value moves; it is released only in Drop.
unsafe impl DestBuf for ReturnedBuf {
    fn as_mut_ptr(&mut self) -> *mut u8 {
        self.data.as_mut_ptr()
    }
    fn len(&self) -> usize {
        self.data.len()
    }
}

impl Drop for ReturnedBuf {
    fn drop(&mut self) {
        let data = std::mem::take(&mut self.data);
        *self.home.lock().unwrap_or_else(|p| p.into_inner()) = Some(data);
    }
}

/// Waits for the client to give a buffer back.
async fn returned(home: &Arc<Mutex<Option<Vec<u8>>>>) -> Vec<u8> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(v) = home.lock().unwrap().take() {
            return v;
        }
        assert!(Instant::now() < deadline, "the client never released the buffer");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Proves that everything the server sent before has been consumed by the client: a read
/// sent now completes only after the reader has gone past all of it.
async fn round_trip(h: &Handle, s: &mut UnixStream) {
    let h2 = h.clone();
    let task = tokio::spawn(async move { h2.pread(16, 0, 0, None).await });
    let req = next_request(s).await;
    assert_eq!((req.kind, req.length), (CMD_READ, 16));
    let mut reply = simple_reply(0, req.cookie);
    reply.extend([0x77; 16]);
    s.write_all(&reply).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), task).await.unwrap().unwrap();
    assert_eq!(got.unwrap(), vec![0x77; 16]);
}

async fn cancelled_read_is_not_written(len: usize, min_fd: RawFd) {
    let (h, mut s, _) = hand_played(
        Settings {
            pread_initialize: false,
            ..Settings::default()
        },
        min_fd,
    )
    .await;
    let (buf, home) = ReturnedBuf::new(vec![0xaa; len]);
    let token = CancelToken::new();
    let h2 = h.clone();
    let t2 = token.clone();
    let task = tokio::spawn(async move { h2.pread_into(Box::new(buf), 4096, 0, Some(t2)).await });
    let req = next_request(&mut s).await;
    assert_eq!((req.kind, req.offset, req.length as usize), (CMD_READ, 4096, len));
    assert_eq!(h.state(), State::Processing);

    let t0 = Instant::now();
    token.cancel();
    let r = tokio::time::timeout(Duration::from_secs(2), task)
        .await
        .expect("a cancelled read settles promptly")
        .unwrap();
    let e = assert_errno(r, Errno::ECANCELED);
    assert_eq!(e.fault(), nbd_client::Fault::Cancelled);
    assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());

    // The server answers after all.
    let mut reply = simple_reply(0, req.cookie);
    reply.extend(vec![0x55; len]);
    s.write_all(&reply).await.unwrap();
    round_trip(&h, &mut s).await;

    let data = returned(&home).await;
    assert_eq!(data.len(), len);
    assert!(
        data.iter().all(|&b| b == 0xaa),
        "a cancelled read wrote {} bytes into its buffer",
        data.iter().filter(|&&b| b != 0xaa).count()
    );
    // The connection survived, and the cancelled read is gone from the books.
    settled(&h).await;
    assert_eq!(h.state(), State::Ready);
    h.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn cancelled_small_read_is_not_written_afterwards() {
    cancelled_read_is_not_written(4096, 5000).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn cancelled_large_read_is_not_written_afterwards() {
    // Large enough for the reader to read straight into the destination.
    cancelled_read_is_not_written(MIB as usize, 5100).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn cancel_in_the_middle_of_a_payload() {
    let (h, mut s, _) = hand_played(
        Settings {
            pread_initialize: false,
            ..Settings::default()
        },
        5200,
    )
    .await;
    let len = MIB as usize;
    let (buf, home) = ReturnedBuf::new(vec![0xaa; len]);
    let token = CancelToken::new();
    let (h2, t2) = (h.clone(), token.clone());
    let task = tokio::spawn(async move { h2.pread_into(Box::new(buf), 0, 0, Some(t2)).await });
    let req = next_request(&mut s).await;
    let mut first = simple_reply(0, req.cookie);
    first.extend(vec![0x55; len / 4]);
    s.write_all(&first).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    token.cancel();
    assert_errno(tokio::time::timeout(Duration::from_secs(2), task).await.unwrap().unwrap(), Errno::ECANCELED);
    // Everything sent from now on must not land.
    s.write_all(&vec![0x66; len - len / 4]).await.unwrap();
    round_trip(&h, &mut s).await;
    let data = returned(&home).await;
    assert!(data[..len / 4].iter().all(|&b| b == 0x55 || b == 0xaa));
    assert!(
        data[len / 4..].iter().all(|&b| b == 0xaa),
        "bytes sent after the cancellation landed in the buffer"
    );
    settled(&h).await;
    assert_eq!(h.state(), State::Ready);
    h.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_read_cancelled_before_it_is_sent_never_goes_out() {
    let (h, mut s, _) = hand_played(Settings::default(), 5300).await;
    let token = CancelToken::new();
    token.cancel();
    assert_errno(h.pread(512, 0, 0, Some(token.clone())).await, Errno::ECANCELED);
    let (buf, _home) = ReturnedBuf::new(vec![0xaa; 512]);
    assert_errno(h.pread_into(Box::new(buf), 0, 0, Some(token)).await, Errno::ECANCELED);
    // The next request on the wire is the round trip's read, not a cancelled one.
    round_trip(&h, &mut s).await;
    h.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_read_cancelled_before_the_call_leaves_the_buffer_alone() {
    // cancel.rs: "once CancelToken::cancel returns, no byte lands in the destination any
    // more"; API.md: if the call is aborted, `buf` is not written after that moment.
    let (h, _s, _) = hand_played(Settings::default(), 5400).await;
    let token = CancelToken::new();
    token.cancel();
    let (buf, home) = ReturnedBuf::new(vec![0xaa; 512]);
    assert_errno(h.pread_into(Box::new(buf), 0, 0, Some(token)).await, Errno::ECANCELED);
    let data = returned(&home).await;
    assert!(
        data.iter().all(|&b| b == 0xaa),
        "{} bytes of a buffer whose read was cancelled before the call were overwritten",
        data.iter().filter(|&&b| b != 0xaa).count()
    );
    h.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn server_hanging_up_fails_every_pending_command() {
    let (h, mut s, fd) = hand_played(Settings::default(), 6000).await;
    let mut tasks = JoinSet::new();
    for i in 0..20u64 {
        let (h1, h2) = (h.clone(), h.clone());
        tasks.spawn(async move { h1.pread(512, i * 512, 0, None).await.map(drop) });
        tasks.spawn(async move { h2.pwrite(Box::new(vec![1u8; 512]), i * 512, 0, None).await });
    }
    let h2 = h.clone();
    tasks.spawn(async move { h2.flush(0, None).await });
    // All 41 submitted, and at least one on the wire.
    let deadline = Instant::now() + Duration::from_secs(5);
    while h.in_flight() < 41 {
        assert!(Instant::now() < deadline, "commands never got submitted");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let _ = next_request(&mut s).await;
    assert_eq!(h.state(), State::Processing);

    let t0 = Instant::now();
    drop(s);
    let mut failures = 0;
    while let Some(r) = tokio::time::timeout(Duration::from_secs(2), tasks.join_next())
        .await
        .expect("pending commands fail promptly")
    {
        assert_errno(r.unwrap(), Errno::ENOTCONN);
        failures += 1;
    }
    assert_eq!(failures, 41);
    assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
    assert_eq!(h.state(), State::Dead);
    settled(&h).await;
    // A dead handle refuses new commands at once, and its getters too (libnbd allows
    // them negotiating, connected or closed, not dead).
    assert_errno(h.pread(512, 0, 0, None).await, Errno::EINVAL);
    assert_errno(h.negotiated(), Errno::EINVAL);
    assert!(fd_is_open(fd), "the fd lives until the handle is closed");
    h.close().await;
    assert_eq!(h.state(), State::Closed);
    assert!(fd_is_closed(fd));
}

#[tokio::test(flavor = "multi_thread")]
async fn connect_timeout_against_a_silent_peer() {
    let (silent, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    let fd = high_fd(OwnedFd::from(theirs), 7000);
    let h = Handle::new(Settings {
        connect_timeout: Some(Duration::from_millis(200)),
        ..Settings::default()
    });
    let t0 = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(5), h.connect_socket(fd))
        .await
        .expect("connect_timeout bounds the connect");
    let e = assert_errno(r, Errno::ETIMEDOUT);
    assert!(e.message().contains("200"), "{e}");
    let took = t0.elapsed();
    assert!(took >= Duration::from_millis(150) && took < Duration::from_secs(2), "{took:?}");
    assert_eq!(h.state(), State::Dead);
    // Ownership passed at the call: the handle keeps the fd until closed, then closes it.
    assert!(fd_is_open(fd));
    h.close().await;
    assert!(fd_is_closed(fd));
    drop(silent);
}

#[tokio::test(flavor = "multi_thread")]
async fn protocol_violation_fails_its_command_with_eproto_and_the_rest_with_enotconn() {
    let (h, mut s, _) = hand_played(Settings::default(), 8000).await;
    let (h1, h2) = (h.clone(), h.clone());
    let first = tokio::spawn(async move { h1.pread(512, 0, 0, None).await });
    let a = next_request(&mut s).await;
    let second = tokio::spawn(async move { h2.pread(512, 512, 0, None).await });
    let _b = next_request(&mut s).await;
    // A structured reply chunk, never negotiated with an oldstyle server, for the first read.
    let chunk = chunk(REPLY_FLAG_DONE, REPLY_TYPE_NONE, a.cookie, &[]);
    s.write_all(&chunk).await.unwrap();
    let wait = |t| async move { tokio::time::timeout(Duration::from_secs(2), t).await.unwrap() };
    let e = assert_errno(wait(first).await.unwrap(), Errno::EPROTO);
    assert_eq!(e.fault(), nbd_client::Fault::Protocol);
    assert_errno(wait(second).await.unwrap(), Errno::ENOTCONN);
    assert_eq!(h.state(), State::Dead);
    h.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn close_with_a_read_pending_rejects_it_and_releases_the_buffer_untouched() {
    let (h, mut s, fd) = hand_played(
        Settings {
            pread_initialize: false,
            ..Settings::default()
        },
        8100,
    )
    .await;
    let (buf, home) = ReturnedBuf::new(vec![0xaa; 4096]);
    let h2 = h.clone();
    let task = tokio::spawn(async move { h2.pread_into(Box::new(buf), 0, 0, None).await });
    let _ = next_request(&mut s).await;
    h.close().await;
    let r = tokio::time::timeout(Duration::from_secs(2), task)
        .await
        .expect("closing settles pending reads")
        .unwrap();
    assert!(r.is_err());
    assert!(returned(&home).await.iter().all(|&b| b == 0xaa));
    assert_eq!(h.state(), State::Closed);
    assert!(fd_is_closed(fd));
    // The server side sees the connection end.
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut rest))
        .await
        .unwrap();
    assert!(n.is_ok() || n.is_err());
}

/// The handle is `Dead` before the command blamed for a protocol violation hears of it
/// (issue 11, item 26): a completion that looks at the state sees the final one.
#[tokio::test(flavor = "multi_thread")]
async fn a_protocol_violation_is_dead_before_the_command_hears() {
    let (h, mut s, _) = hand_played(Settings::default(), 6100).await;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let seen = h.clone();
    h.submit(Op::Read { count: 512, offset: 0, flags: 0 }, None, move |r| {
        let _ = tx.send((r.map(drop), seen.state()));
    })
    .unwrap();
    let req = next_request(&mut s).await;
    // A structured chunk where only simple replies were negotiated blames its command.
    let chunk = chunk(REPLY_FLAG_DONE, REPLY_TYPE_NONE, req.cookie, &[]);
    s.write_all(&chunk).await.unwrap();
    let (result, state) = tokio::time::timeout(Duration::from_secs(5), rx).await.unwrap().unwrap();
    assert_errno(result, Errno::EPROTO);
    assert_eq!(state, State::Dead, "the state the completion saw");
    h.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_connect_or_option_future_dropped_does_not_leave_the_handle_busy() {
    let srv = server(MIB);
    // The call takes the handle at once; dropping its future unpolled leaves it dead (as a
    // failed connect), not connecting forever.
    let h = Handle::default();
    drop(h.connect_socket(srv.socketpair().unwrap().into_raw_fd()));
    assert_eq!(h.state(), State::Dead);
    assert_errno(h.connect_socket(-1).await, Errno::EINVAL);
    h.close().await;

    // An option request dropped before it started gives the connection back.
    let mut config = Settings::default();
    config.negotiation.opt_mode = true;
    let h = Handle::new(config);
    h.connect_socket(srv.socketpair().unwrap().into_raw_fd()).await.unwrap();
    assert_eq!(h.state(), State::Negotiating);
    drop(h.opt_info());
    assert_eq!(h.state(), State::Negotiating);
    h.opt_go().await.unwrap();
    assert_eq!(h.state(), State::Ready);
    h.close().await;
}

// ---- the event-loop driver's connection ----

/// The test's own commands on an event-loop connection: flushes, with no buffers.
struct NoBuffers;

impl nbd_client::event_loop::CommandData for NoBuffers {
    fn dest(&mut self) -> Option<(*mut u8, usize)> {
        None
    }

    fn source(&mut self) -> Option<(*const u8, usize)> {
        None
    }

    fn cancelled(&self) -> bool {
        false
    }
}

type LoopConnection = nbd_client::event_loop::Connection<NoBuffers>;

/// Submits a command without a payload to write, owned by `user`; it must be accepted.
fn submit_as<U: nbd_client::event_loop::CommandData>(
    c: &mut nbd_client::event_loop::Connection<U>,
    kind: nbd_client::CommandKind,
    offset: u64,
    length: u64,
    user: U,
) {
    use nbd_client::event_loop::{Payload, Submission};
    let sub = Submission {
        cmd: nbd_client::Command {
            kind,
            offset,
            length,
            flags: 0,
        },
        filter: None,
        record_chunks: false,
        payload: Payload::None,
        user,
    };
    assert!(c.submit(sub, STRICT_MASK).is_ok(), "{kind:?} is accepted");
}

fn submit(c: &mut LoopConnection, kind: nbd_client::CommandKind, length: u64) {
    submit_as(c, kind, 0, length, NoBuffers)
}

fn submit_flush(c: &mut LoopConnection) {
    submit(c, nbd_client::CommandKind::Flush, 0)
}

/// An event-loop connection to a hand-played server (see [`hand_played`]), with no limit
/// on commands in flight to speak of.
async fn loop_connection(min_fd: RawFd) -> (Handle, UnixStream, LoopConnection) {
    let h = Handle::new(Settings {
        max_in_flight: 1 << 20,
        ..Default::default()
    });
    h.set_event_loop_driver(true);
    let (h, ours, _) = hand_played_by(h, min_fd).await;
    let c = LoopConnection::new(h.take_transmission().expect("handed over"));
    (h, ours, c)
}

/// While its owner settles a batch of replies, an event-loop connection holds the requests
/// issued meanwhile until 16 wait, except while the server has less than 64 KiB of work
/// left (a flush counts as 4 KiB, a read as its length), and never tries the socket again
/// once it was found full.
#[tokio::test]
async fn event_loop_connection_sends_mid_batch_only_when_it_helps() {
    let (h, ours, mut c) = loop_connection(6200).await;

    // Fewer than 16 flushes on the wire: each request should go at once.
    for on_wire in 0..16 {
        submit_flush(&mut c);
        assert_eq!(c.unsent_requests(), 1);
        assert!(c.should_send_now(), "with {on_wire} on the wire");
        c.flush();
        assert_eq!(c.unsent_requests(), 0);
    }
    // 16 on the wire: requests wait until 16 of them can go together.
    for waiting in 1..16 {
        submit_flush(&mut c);
        assert_eq!(c.unsent_requests(), waiting);
        assert!(!c.should_send_now(), "with {waiting} waiting");
    }
    submit_flush(&mut c);
    assert!(c.should_send_now());
    c.flush();
    assert!(!c.wants_write());

    // The server reads nothing: write until the socket is full.
    while !c.wants_write() {
        for _ in 0..16 {
            submit_flush(&mut c);
        }
        c.flush();
    }
    assert!(!c.is_ended());
    for _ in 0..16 {
        submit_flush(&mut c);
    }
    assert!(c.unsent_requests() >= 16);
    assert!(!c.should_send_now(), "the socket was found full");

    // Once the server reads, writing goes on and the rule applies again.
    use std::io::Read;
    let mut ours = ours.into_std().unwrap();
    let mut sink = vec![0u8; 1 << 20];
    while ours.read(&mut sink).is_ok_and(|n| n > 0) {}
    c.flush();
    assert!(!c.wants_write());
    submit_flush(&mut c);
    assert!(!c.should_send_now(), "thousands on the wire, one waiting");
    drop(c);
    h.close().await;
}

/// The server's remaining work is counted in bytes: one large read on the wire is enough
/// to keep the next requests waiting for their group.
#[tokio::test]
async fn event_loop_connection_counts_a_large_read_as_enough_work() {
    use nbd_client::CommandKind;
    let (h, _ours, mut c) = loop_connection(6300).await;
    submit(&mut c, CommandKind::Read, 48 * 1024);
    assert!(c.should_send_now(), "nothing on the wire");
    c.flush();
    submit_flush(&mut c);
    assert!(c.should_send_now(), "48 KiB on the wire");
    c.flush();
    submit(&mut c, CommandKind::Read, 256 * 1024);
    assert!(c.should_send_now(), "52 KiB on the wire");
    c.flush();
    for waiting in 1..16 {
        submit_flush(&mut c);
        assert!(!c.should_send_now(), "308 KiB on the wire, {waiting} waiting");
    }
    submit_flush(&mut c);
    assert!(c.should_send_now(), "16 waiting");
    drop(c);
    h.close().await;
}

/// A read destination owned by the test's command (the connection writes into it).
struct VecDest(Vec<u8>);

impl nbd_client::event_loop::CommandData for VecDest {
    fn dest(&mut self) -> Option<(*mut u8, usize)> {
        Some((self.0.as_mut_ptr(), self.0.len()))
    }

    fn source(&mut self) -> Option<(*const u8, usize)> {
        None
    }

    fn cancelled(&self) -> bool {
        false
    }
}

/// Replies that come in pieces, with the owner's wake-ups in between: each call of
/// `on_readable` takes what is there and returns at the first short read, and the next
/// call goes on where it stopped, also in the middle of a large read's data and when one
/// piece holds the end of one reply and the start of the next.
#[tokio::test]
async fn event_loop_connection_reads_replies_that_come_in_pieces() {
    use nbd_client::event_loop::Connection;
    const LEN: usize = 64 * 1024;
    let h = Handle::new(Settings::default());
    h.set_event_loop_driver(true);
    let (h, mut ours, _) = hand_played_by(h, 6400).await;
    let mut c: Connection<VecDest> = Connection::new(h.take_transmission().expect("handed over"));
    for i in 0..2u64 {
        let read = nbd_client::CommandKind::Read;
        submit_as(&mut c, read, i * LEN as u64, LEN as u64, VecDest(vec![0; LEN]));
    }
    c.flush();
    let (a, b) = (next_request(&mut ours).await, next_request(&mut ours).await);
    let mut wire = simple_reply(0, a.cookie);
    wire.extend(pattern(1, LEN));
    wire.extend(simple_reply(0, b.cookie));
    wire.extend(pattern(2, LEN));
    // The first reply's header and the start of its data; then its data in two pieces (the
    // first read straight into the destination); then its end with the second reply's
    // header; then the rest of the second reply.
    let cuts = [16 + 20_000, 16 + 40_000, 16 + LEN + 10, wire.len()];
    let mut from = 0;
    let mut done = Vec::new();
    for (i, &to) in cuts.iter().enumerate() {
        ours.write_all(&wire[from..to]).await.unwrap();
        from = to;
        c.on_readable();
        assert!(!c.is_ended(), "after piece {i}");
        done.extend(c.take_completions());
        let expected = match i {
            0 | 1 => 0,
            2 => 1,
            _ => 2,
        };
        assert_eq!(done.len(), expected, "completions after piece {i}");
    }
    for (i, d) in done.into_iter().enumerate() {
        assert!(d.result.is_ok(), "read {i}: {:?}", d.result);
        assert!(d.user.0 == pattern(i + 1, LEN), "read {i}'s data");
    }
    assert!(!c.owes_replies());
    drop(c);
    h.close().await;
}
