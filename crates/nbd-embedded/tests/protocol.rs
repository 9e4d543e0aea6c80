//! The embedded server spoken to by hand, byte by byte, over each way of reaching it.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use nbd_embedded::{Listener, MemoryServer, ServerOptions};

const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;

const OPT_EXPORT_NAME: u32 = 1;
const OPT_LIST: u32 = 3;
const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;
const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_ERR_UNSUP: u32 = 0x8000_0001;

const TFLAG_HAS_FLAGS: u16 = 1 << 0;
const TFLAG_READ_ONLY: u16 = 1 << 1;
const TFLAG_SEND_FLUSH: u16 = 1 << 2;
const TFLAG_ROTATIONAL: u16 = 1 << 4;
const TFLAG_SEND_TRIM: u16 = 1 << 5;

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;

const EPERM: u32 = 1;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;
/// What the nbd crate sends for trim and write-zeroes: Linux ENOSYS, which is not one of NBD's
/// error values (clients treat it as unknown, i.e. EINVAL).
const NBD_CRATE_TRIM_ERROR: u32 = 38;

/// A minimal hand-written NBD client over any stream.
struct Client<S: Read + Write> {
    s: S,
    size: u64,
    flags: u16,
}

fn read_u16(s: &mut impl Read) -> io::Result<u16> {
    let mut b = [0; 2];
    s.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}

fn read_u32(s: &mut impl Read) -> io::Result<u32> {
    let mut b = [0; 4];
    s.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_u64(s: &mut impl Read) -> io::Result<u64> {
    let mut b = [0; 8];
    s.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

/// Reads the newstyle greeting and answers with FIXED_NEWSTYLE | NO_ZEROES.
fn greet(s: &mut (impl Read + Write)) -> io::Result<()> {
    let mut magic = [0; 16];
    s.read_exact(&mut magic)?;
    assert_eq!(&magic, b"NBDMAGICIHAVEOPT", "fixed-newstyle greeting");
    let hs = read_u16(s)?;
    assert_eq!(hs, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    s.write_all(&u32::from(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes())
}

fn send_option(s: &mut impl Write, opt: u32, data: &[u8]) -> io::Result<()> {
    let mut m = Vec::new();
    m.extend_from_slice(&IHAVEOPT.to_be_bytes());
    m.extend_from_slice(&opt.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    s.write_all(&m)
}

/// Reads one option reply: (option, reply type, payload).
fn read_option_reply(s: &mut impl Read) -> io::Result<(u32, u32, Vec<u8>)> {
    assert_eq!(read_u64(s)?, OPT_REPLY_MAGIC);
    let opt = read_u32(s)?;
    let typ = read_u32(s)?;
    let len = read_u32(s)?;
    let mut data = vec![0; len as usize];
    s.read_exact(&mut data)?;
    Ok((opt, typ, data))
}

impl<S: Read + Write> Client<S> {
    /// Greeting plus NBD_OPT_EXPORT_NAME.
    fn connect(mut s: S, name: &str) -> io::Result<Self> {
        greet(&mut s)?;
        send_option(&mut s, OPT_EXPORT_NAME, name.as_bytes())?;
        Client::finish_export_name(s)
    }

    /// Reads the NBD_OPT_EXPORT_NAME answer (no zero padding: NO_ZEROES was agreed).
    fn finish_export_name(mut s: S) -> io::Result<Self> {
        let size = read_u64(&mut s)?;
        let flags = read_u16(&mut s)?;
        Ok(Client { s, size, flags })
    }

    fn send(&mut self, cmd: u16, handle: u64, offset: u64, len: u32, payload: &[u8]) {
        let mut m = Vec::with_capacity(28 + payload.len());
        m.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        m.extend_from_slice(&0u16.to_be_bytes());
        m.extend_from_slice(&cmd.to_be_bytes());
        m.extend_from_slice(&handle.to_be_bytes());
        m.extend_from_slice(&offset.to_be_bytes());
        m.extend_from_slice(&len.to_be_bytes());
        m.extend_from_slice(payload);
        self.s.write_all(&m).unwrap();
    }

    /// Reads a simple reply header and checks its handle; returns the error field.
    fn reply(&mut self, handle: u64) -> io::Result<u32> {
        assert_eq!(read_u32(&mut self.s)?, SIMPLE_REPLY_MAGIC);
        let error = read_u32(&mut self.s)?;
        assert_eq!(read_u64(&mut self.s)?, handle, "reply handle");
        Ok(error)
    }

    fn write(&mut self, handle: u64, offset: u64, data: &[u8]) -> u32 {
        self.send(CMD_WRITE, handle, offset, data.len() as u32, data);
        self.reply(handle).unwrap()
    }

    fn read(&mut self, handle: u64, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        self.send(CMD_READ, handle, offset, len, &[]);
        match self.reply(handle).unwrap() {
            0 => {
                let mut data = vec![0; len as usize];
                self.s.read_exact(&mut data).unwrap();
                Ok(data)
            }
            e => Err(e),
        }
    }

    fn flush(&mut self, handle: u64) -> u32 {
        self.send(CMD_FLUSH, handle, 0, 0, &[]);
        self.reply(handle).unwrap()
    }

    /// NBD_CMD_DISC, then expects the server to close the stream.
    fn disconnect(mut self) {
        self.send(CMD_DISC, 0xd15c, 0, 0, &[]);
        self.expect_closed();
    }

    fn expect_closed(&mut self) {
        let mut b = [0; 1];
        match self.s.read(&mut b) {
            Ok(0) => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
            other => panic!("expected the server to close the connection, got {other:?}"),
        }
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn server(size: u64) -> MemoryServer {
    MemoryServer::new(ServerOptions {
        size,
        ..Default::default()
    })
}

fn pair_client(server: &MemoryServer, name: &str) -> io::Result<Client<UnixStream>> {
    let fd = server.socketpair()?;
    let stream = UnixStream::from(fd);
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    Client::connect(stream, name)
}

/// Joins a connection thread, failing the test if it does not end within a few seconds.
fn join_within(handle: JoinHandle<io::Result<()>>) -> io::Result<()> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || tx.send(handle.join().unwrap()).unwrap());
    rx.recv_timeout(Duration::from_secs(10))
        .expect("connection thread did not end")
}

/// Closes a listener on another thread and fails if that does not finish promptly, i.e. if
/// the accept thread did not exit.
fn close_within(listener: Listener) {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        listener.close();
        tx.send(()).unwrap();
    });
    rx.recv_timeout(Duration::from_secs(10))
        .expect("accept thread did not exit on close");
}

fn temp_socket_path(tag: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "nbd-embedded-{}-{}-{}",
        std::process::id(),
        tag,
        N.fetch_add(1, Ordering::SeqCst)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("nbd.sock")
}

#[test]
fn socketpair_handshake_write_read_flush_disconnect() {
    let srv = server(1 << 20);
    srv.write(0, b"preloaded");
    let mut c = pair_client(&srv, "").unwrap();
    assert_eq!(srv.connections_served(), 1);
    assert_eq!(c.size, 1 << 20);
    assert_eq!(c.flags, TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH);
    assert_eq!(
        c.flags & (TFLAG_READ_ONLY | TFLAG_SEND_TRIM | TFLAG_ROTATIONAL),
        0
    );

    assert_eq!(c.read(1, 0, 9).unwrap(), b"preloaded");
    let data = pattern(300_000, 7); // larger than the server's 64 KiB chunks and buffers
    assert_eq!(c.write(2, 4096, &data), 0);
    assert_eq!(c.read(3, 4096, data.len() as u32).unwrap(), data);
    assert_eq!(
        srv.read(4096, data.len()),
        data,
        "writes land in the shared memory"
    );
    assert_eq!(c.flush(4), 0);
    assert_eq!(
        c.read(5, (1 << 20) - 3, 3).unwrap(),
        [0, 0, 0],
        "last bytes, zero-filled"
    );
    c.disconnect();
}

#[test]
fn serve_reports_a_clean_disconnect() {
    let srv = server(65536);
    let (ours, theirs) = UnixStream::pair().unwrap();
    let handle = srv.serve(theirs);
    let mut c = Client::connect(ours, "").unwrap();
    assert_eq!(c.write(9, 0, b"x"), 0);
    c.disconnect();
    join_within(handle).unwrap();
}

#[test]
fn many_requests_in_flight_are_answered_in_order() {
    let srv = server(1 << 20);
    let mut c = pair_client(&srv, "").unwrap();
    let block = 4096u32;
    let mut expected = Vec::new();
    for i in 0..64u64 {
        let data = pattern(block as usize, i as u8);
        c.send(CMD_WRITE, 1000 + i, i * u64::from(block), block, &data);
        expected.push(data);
    }
    for i in 0..64u64 {
        assert_eq!(c.reply(1000 + i).unwrap(), 0);
    }
    for i in 0..64u64 {
        c.send(CMD_READ, 2000 + i, i * u64::from(block), block, &[]);
    }
    for (i, data) in expected.iter().enumerate() {
        assert_eq!(c.reply(2000 + i as u64).unwrap(), 0);
        let mut got = vec![0; block as usize];
        c.s.read_exact(&mut got).unwrap();
        assert_eq!(&got, data);
    }
    c.disconnect();
}

#[test]
fn connections_share_the_export() {
    let srv = server(65536);
    let mut a = pair_client(&srv, "").unwrap();
    let mut b = pair_client(&srv, "").unwrap();
    assert_eq!(srv.connections_served(), 2);
    assert_eq!(a.write(1, 100, b"from a"), 0);
    assert_eq!(b.read(1, 100, 6).unwrap(), b"from a");
    a.disconnect();
    b.disconnect();
}

#[test]
fn named_export_and_flags() {
    let srv = MemoryServer::new(ServerOptions {
        size: 8192,
        export_name: "disk0".into(),
        rotational: true,
        ..Default::default()
    });
    let c = pair_client(&srv, "disk0").unwrap();
    assert_eq!(c.size, 8192);
    assert_eq!(
        c.flags,
        TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_ROTATIONAL
    );
    c.disconnect();
}

#[test]
fn wrong_export_name_is_refused() {
    let srv = MemoryServer::new(ServerOptions {
        size: 8192,
        export_name: "disk0".into(),
        ..Default::default()
    });
    let (ours, theirs) = UnixStream::pair().unwrap();
    ours.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let handle = srv.serve(theirs);
    let err = Client::connect(ours, "other")
        .err()
        .expect("handshake must fail");
    assert_eq!(
        err.kind(),
        io::ErrorKind::UnexpectedEof,
        "server closes the connection"
    );
    let server_err = join_within(handle).unwrap_err();
    assert_eq!(server_err.kind(), io::ErrorKind::NotFound);
    assert!(server_err.to_string().contains("\"other\""), "{server_err}");

    // The default export "" is not served either when a name is configured.
    assert!(pair_client(&srv, "").is_err());
}

#[test]
fn go_and_structured_replies_are_unsupported_then_export_name_works() {
    let srv = server(4096);
    let fd = srv.socketpair().unwrap();
    let mut s = UnixStream::from(fd);
    greet(&mut s).unwrap();

    send_option(&mut s, OPT_STRUCTURED_REPLY, &[]).unwrap();
    assert_eq!(
        read_option_reply(&mut s).unwrap(),
        (OPT_STRUCTURED_REPLY, REP_ERR_UNSUP, vec![])
    );

    let mut go = Vec::new();
    go.extend_from_slice(&0u32.to_be_bytes()); // name length
    go.extend_from_slice(&0u16.to_be_bytes()); // no info requests
    send_option(&mut s, OPT_GO, &go).unwrap();
    assert_eq!(
        read_option_reply(&mut s).unwrap(),
        (OPT_GO, REP_ERR_UNSUP, vec![])
    );

    send_option(&mut s, OPT_LIST, &[]).unwrap();
    let (opt, typ, _) = read_option_reply(&mut s).unwrap();
    assert_eq!((opt, typ), (OPT_LIST, REP_SERVER));
    assert_eq!(
        read_option_reply(&mut s).unwrap(),
        (OPT_LIST, REP_ACK, vec![])
    );

    send_option(&mut s, OPT_EXPORT_NAME, b"").unwrap();
    let mut c = Client::finish_export_name(s).unwrap();
    assert_eq!(c.size, 4096);
    assert_eq!(c.read(1, 0, 16).unwrap(), vec![0; 16]);
    c.disconnect();
}

#[test]
fn bad_requests_get_error_replies_and_the_connection_survives() {
    let srv = server(4096);
    let mut c = pair_client(&srv, "").unwrap();
    assert_eq!(c.read(1, 4096, 1), Err(EINVAL), "read starting at the end");
    assert_eq!(
        c.read(2, 1 << 40, 512),
        Err(EINVAL),
        "read far past the end"
    );
    assert_eq!(
        c.read(3, 0, 0),
        Err(EINVAL),
        "zero-length read gets an answer"
    );
    c.send(CMD_TRIM, 4, 0, 512, &[]);
    assert_eq!(
        c.reply(4).unwrap(),
        NBD_CRATE_TRIM_ERROR,
        "trim is not supported"
    );
    assert_eq!(c.write(5, 0, b"still alive"), 0);
    assert_eq!(c.read(6, 0, 11).unwrap(), b"still alive");
    c.disconnect();
}

#[test]
fn write_past_the_end_is_refused_then_the_connection_closes() {
    let srv = server(4096);
    let mut c = pair_client(&srv, "").unwrap();
    assert_eq!(c.write(1, 4000, &[0xaa; 200]), ENOSPC);
    c.expect_closed();
    assert_eq!(
        srv.read(4000, 96),
        vec![0; 96],
        "nothing of the refused chunk is written"
    );
}

#[test]
fn read_only_export() {
    let srv = MemoryServer::new(ServerOptions {
        size: 4096,
        read_only: true,
        ..Default::default()
    });
    srv.write(0, b"fixed");
    let mut c = pair_client(&srv, "").unwrap();
    assert_eq!(c.flags, TFLAG_HAS_FLAGS | TFLAG_READ_ONLY);
    assert_eq!(c.read(1, 0, 5).unwrap(), b"fixed");
    assert_eq!(c.write(2, 0, b"nope!"), EPERM);
    c.expect_closed();
    assert_eq!(srv.read(0, 5), b"fixed");
}

#[test]
fn client_going_away_without_disconnect_ends_the_thread() {
    let srv = server(4096);
    let (ours, theirs) = UnixStream::pair().unwrap();
    let handle = srv.serve(theirs);
    let c = Client::connect(ours, "").unwrap();
    drop(c);
    assert_eq!(
        join_within(handle).unwrap_err().kind(),
        io::ErrorKind::UnexpectedEof
    );
}

#[test]
fn unix_listener_serves_and_cleans_up() {
    let srv = server(1 << 20);
    let path = temp_socket_path("unix");
    let listener = srv.listen_unix(&path).unwrap();
    assert_eq!(listener.path(), Some(path.as_path()));
    assert_eq!(listener.port(), None);
    assert!(path.exists());

    let mut c1 = Client::connect(UnixStream::connect(&path).unwrap(), "").unwrap();
    let mut c2 = Client::connect(UnixStream::connect(&path).unwrap(), "").unwrap();
    assert_eq!(srv.connections_served(), 2);
    assert_eq!(c1.write(1, 512, b"via unix"), 0);
    assert_eq!(c2.read(1, 512, 8).unwrap(), b"via unix");
    c2.disconnect();

    close_within(listener);
    assert!(!path.exists(), "socket file removed");
    assert!(UnixStream::connect(&path).is_err());

    // A connection accepted before the close keeps working.
    assert_eq!(c1.read(2, 512, 8).unwrap(), b"via unix");
    c1.disconnect();
    std::fs::remove_dir(path.parent().unwrap()).unwrap();
}

#[test]
fn unix_listener_drop_stops_accepting() {
    let srv = server(4096);
    let path = temp_socket_path("drop");
    {
        let _listener = srv.listen_unix(&path).unwrap();
        let c = Client::connect(UnixStream::connect(&path).unwrap(), "").unwrap();
        c.disconnect();
    } // dropped here; the drop joins the accept thread
    assert!(!path.exists());
    // Binding the same path again works: nothing is left behind.
    let again = srv.listen_unix(&path).unwrap();
    close_within(again);
    std::fs::remove_dir(path.parent().unwrap()).unwrap();
}

#[test]
fn unix_listener_refuses_an_existing_path() {
    let srv = server(4096);
    let path = temp_socket_path("busy");
    std::fs::write(&path, b"not a socket").unwrap();
    assert!(srv.listen_unix(&path).is_err());
    assert_eq!(std::fs::read(&path).unwrap(), b"not a socket", "left alone");
    std::fs::remove_file(&path).unwrap();
    std::fs::remove_dir(path.parent().unwrap()).unwrap();
}

#[test]
fn tcp_listener_serves_and_stops() {
    let srv = server(1 << 20);
    let listener = srv.listen_tcp("127.0.0.1:0").unwrap();
    let port = listener.port().unwrap();
    assert_ne!(port, 0);
    assert_eq!(listener.path(), None);

    let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut c = Client::connect(stream, "").unwrap();
    assert_eq!(c.size, 1 << 20);
    let data = pattern(200_000, 3);
    assert_eq!(c.write(1, 0, &data), 0);
    assert_eq!(c.read(2, 0, data.len() as u32).unwrap(), data);
    assert_eq!(c.flush(3), 0);
    c.disconnect();

    close_within(listener);
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "no longer listening"
    );
}

#[test]
fn tcp_listener_drop_stops_accepting() {
    let srv = server(4096);
    let listener = srv.listen_tcp("127.0.0.1:0").unwrap();
    let port = listener.port().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        drop(listener);
        tx.send(()).unwrap();
    });
    rx.recv_timeout(Duration::from_secs(10))
        .expect("drop did not stop the accept thread");
    assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
    assert_eq!(srv.connections_served(), 0);
}
