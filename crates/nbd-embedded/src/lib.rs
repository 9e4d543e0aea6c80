//! An in-process, memory-backed NBD server for demos and tests.
//!
//! `nbd-embedded` lets a program (the nbd-client demo, the ava specs, Rust tests) talk to a real
//! NBD server without installing nbdkit, qemu-nbd or nbd-server. The protocol itself is spoken by
//! the [`nbd`] crate's server half; this crate supplies what that crate leaves to its user: a
//! zero-filled export held in memory and shared by every connection, the export-name check, the
//! threads, and the ways to reach it (a `socketpair(2)`, a Unix socket, a TCP port).
//!
//! # What a client sees
//!
//! The server is deliberately small, and its limits come from the `nbd` crate:
//!
//! - Handshake: fixed newstyle only. `NBD_OPT_GO`, `NBD_OPT_INFO`, `NBD_OPT_STRUCTURED_REPLY` and
//!   `NBD_OPT_EXTENDED_HEADERS` are answered with `NBD_REP_ERR_UNSUP`, so a client falls back to
//!   `NBD_OPT_EXPORT_NAME`; `NBD_OPT_LIST` is answered; `NBD_OPT_STARTTLS` and any unknown option
//!   end the connection. No block-size constraints are advertised.
//! - Export name: only [`ServerOptions::export_name`] (default `""`) is served. Asking for any
//!   other name ends the connection during the handshake, as the protocol prescribes for
//!   `NBD_OPT_EXPORT_NAME`.
//! - Transmission flags: `NBD_FLAG_READ_ONLY` when read-only, otherwise `NBD_FLAG_SEND_FLUSH`;
//!   `NBD_FLAG_ROTATIONAL` when asked for. Trim, write-zeroes, FUA, cache, block status and
//!   multi-conn are not advertised. The `nbd` crate answers trim and write-zeroes with error 38
//!   (Linux `ENOSYS`, not an NBD error value, so clients see it as an unknown error: `EINVAL`)
//!   and ends the connection on any other command it does not know. Replies are always simple
//!   replies, and the server handles one request at a time per connection (clients may still
//!   send many at once; they are answered in order).
//! - Errors: a read that *starts* at or past the end of the export, or asks for zero bytes, gets
//!   an `EINVAL` error reply and the connection stays usable. A read that starts inside the export
//!   but runs past its end ends the connection (the reply header has already been sent by then).
//!   A refused write (read-only export: `EPERM`; past the end: `ENOSPC`) gets its error reply and
//!   then the connection is closed, because the `nbd` crate cannot skip the unread part of the
//!   write payload.
//!
//! # Example
//!
//! ```no_run
//! use nbd_embedded::{MemoryServer, ServerOptions};
//!
//! let server = MemoryServer::new(ServerOptions { size: 1 << 20, ..Default::default() });
//! server.write(0, b"hello");
//! let client_fd = server.socketpair().unwrap();      // hand this to an NBD client
//! let listener = server.listen_tcp("127.0.0.1:0").unwrap();
//! println!("also at nbd://127.0.0.1:{}/", listener.port().unwrap());
//! # drop(client_fd);
//! ```

#![warn(missing_docs)]

mod listener;
mod storage;
mod stream;

pub use listener::Listener;

use std::alloc::Layout;
use std::cell::Cell;
use std::fmt;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::thread::JoinHandle;

use storage::Storage;
use stream::BufferedStream;

/// Export size used by [`ServerOptions::default`]: 64 MiB.
pub const DEFAULT_SIZE: u64 = 64 * 1024 * 1024;

/// How a [`MemoryServer`] presents its export.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerOptions {
    /// Size of the export in bytes. The memory is reserved zero-filled up front; the operating
    /// system commits pages only as they are written.
    pub size: u64,
    /// Advertise `NBD_FLAG_READ_ONLY` and refuse writes with `EPERM`.
    pub read_only: bool,
    /// The only export name the server accepts (default `""`, the default export).
    pub export_name: String,
    /// Advertise `NBD_FLAG_ROTATIONAL`.
    pub rotational: bool,
}

impl Default for ServerOptions {
    /// 64 MiB, writable, default export name `""`, not rotational.
    fn default() -> Self {
        ServerOptions {
            size: DEFAULT_SIZE,
            read_only: false,
            export_name: String::new(),
            rotational: false,
        }
    }
}

/// State shared by every handle on one server and by all of its connection threads.
struct Shared {
    data: RwLock<Vec<u8>>,
    options: ServerOptions,
    served: AtomicU64,
}

impl Shared {
    fn data(&self) -> RwLockReadGuard<'_, Vec<u8>> {
        // A panic while holding the lock cannot leave the bytes inconsistent in a way that matters
        // for a test server, so a poisoned lock is simply taken over.
        self.data.read().unwrap_or_else(|e| e.into_inner())
    }

    fn data_mut(&self) -> RwLockWriteGuard<'_, Vec<u8>> {
        self.data.write().unwrap_or_else(|e| e.into_inner())
    }
}

/// A memory-backed NBD server.
///
/// Cloning is cheap and every clone refers to the same export: bytes written by one connection
/// (or through [`MemoryServer::write`]) are seen by all others. The memory is freed when the last
/// clone, listener and connection thread is gone.
///
/// Every connection is served on its own thread with blocking IO; requests on one connection are
/// handled in order, one at a time.
#[derive(Clone)]
pub struct MemoryServer {
    shared: Arc<Shared>,
}

impl fmt::Debug for MemoryServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryServer")
            .field("options", &self.shared.options)
            .field("connections_served", &self.connections_served())
            .finish()
    }
}

impl MemoryServer {
    /// Creates a server with a zero-filled export of `opts.size` bytes.
    ///
    /// # Panics
    ///
    /// If the memory cannot be reserved; use [`MemoryServer::try_new`] to get an error instead.
    pub fn new(opts: ServerOptions) -> MemoryServer {
        match MemoryServer::try_new(opts) {
            Ok(server) => server,
            Err(e) => panic!("nbd-embedded: {e}"),
        }
    }

    /// Creates a server like [`MemoryServer::new`], failing with `OutOfMemory` or `InvalidInput`
    /// instead of aborting when the export cannot be held in memory.
    pub fn try_new(opts: ServerOptions) -> io::Result<MemoryServer> {
        let data = zeroed_bytes(opts.size)?;
        Ok(MemoryServer {
            shared: Arc::new(Shared {
                data: RwLock::new(data),
                options: opts,
                served: AtomicU64::new(0),
            }),
        })
    }

    /// Serves one already-connected stream on a new thread: the handshake, then transmission
    /// until the client sends `NBD_CMD_DISC` or the stream ends.
    ///
    /// The thread's result is `Ok(())` after a clean disconnect and the error that ended the
    /// connection otherwise (for example `NotFound` for a wrong export name, `UnexpectedEof` when
    /// the client went away without `NBD_CMD_DISC`). The stream is dropped, and so closed, when
    /// the thread ends.
    ///
    /// # Panics
    ///
    /// If the operating system refuses to start a thread.
    pub fn serve<S>(&self, stream: S) -> JoinHandle<io::Result<()>>
    where
        S: io::Read + io::Write + Send + 'static,
    {
        match self.spawn(stream) {
            Ok(handle) => handle,
            Err(e) => panic!("nbd-embedded: cannot start a connection thread: {e}"),
        }
    }

    /// Creates a connected `socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC)`, serves one end on a
    /// new thread and returns the other end, the client's, in blocking mode.
    ///
    /// The connection ends when the client disconnects or closes its end.
    pub fn socketpair(&self) -> io::Result<OwnedFd> {
        // std creates the pair with SOCK_CLOEXEC on Linux.
        let (server_end, client_end) = UnixStream::pair()?;
        self.spawn(server_end)?;
        Ok(OwnedFd::from(client_end))
    }

    /// Listens on a new Unix socket at `path` (which must not exist yet) and serves every
    /// connection accepted there, until the returned [`Listener`] is closed or dropped.
    pub fn listen_unix(&self, path: &Path) -> io::Result<Listener> {
        Listener::unix(self.clone(), path)
    }

    /// Listens on TCP at `addr` (for example `"127.0.0.1:0"` for a free port, which
    /// [`Listener::port`] then tells) and serves every connection accepted there, until the
    /// returned [`Listener`] is closed or dropped.
    pub fn listen_tcp(&self, addr: &str) -> io::Result<Listener> {
        Listener::tcp(self.clone(), addr)
    }

    /// Returns a copy of `len` bytes of the export starting at `offset`.
    ///
    /// # Panics
    ///
    /// If the range does not lie within the export; see [`MemoryServer::try_read`].
    pub fn read(&self, offset: u64, len: usize) -> Vec<u8> {
        match self.try_read(offset, len) {
            Ok(bytes) => bytes,
            Err(e) => panic!("nbd-embedded: read: {e}"),
        }
    }

    /// Returns a copy of `len` bytes of the export starting at `offset`, or an `InvalidInput`
    /// error if the range does not lie within the export.
    pub fn try_read(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let data = self.shared.data();
        let range = checked_range(data.len(), offset, len)?;
        Ok(data[range].to_vec())
    }

    /// Overwrites the export at `offset` with `data` (to preload contents before a test).
    /// Connections see the new bytes from their next request on.
    ///
    /// # Panics
    ///
    /// If the range does not lie within the export; see [`MemoryServer::try_write`].
    pub fn write(&self, offset: u64, data: &[u8]) {
        if let Err(e) = self.try_write(offset, data) {
            panic!("nbd-embedded: write: {e}");
        }
    }

    /// Overwrites the export at `offset` with `data`, or fails with an `InvalidInput` error (and
    /// writes nothing) if the range does not lie within the export. Writing here is allowed even
    /// when the export is read-only to clients.
    pub fn try_write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut bytes = self.shared.data_mut();
        let range = checked_range(bytes.len(), offset, data.len())?;
        bytes[range].copy_from_slice(data);
        Ok(())
    }

    /// Size of the export in bytes.
    pub fn size(&self) -> u64 {
        self.shared.options.size
    }

    /// The options the server was created with.
    pub fn options(&self) -> &ServerOptions {
        &self.shared.options
    }

    /// How many connections have been handed to the server so far (through
    /// [`MemoryServer::serve`], [`MemoryServer::socketpair`] or a listener), whether or not their
    /// handshake succeeded. Counted when the connection's thread starts.
    pub fn connections_served(&self) -> u64 {
        self.shared.served.load(Ordering::SeqCst)
    }

    /// Starts the thread serving `stream`; the fallible core of `serve`.
    pub(crate) fn spawn<S>(&self, stream: S) -> io::Result<JoinHandle<io::Result<()>>>
    where
        S: io::Read + io::Write + Send + 'static,
    {
        let shared = Arc::clone(&self.shared);
        let handle = std::thread::Builder::new()
            .name("nbd-embedded-conn".to_owned())
            .spawn(move || serve_connection(&shared, stream))?;
        self.shared.served.fetch_add(1, Ordering::SeqCst);
        Ok(handle)
    }
}

/// The body of a connection thread: handshake, then transmission.
fn serve_connection<S: io::Read + io::Write>(shared: &Shared, stream: S) -> io::Result<()> {
    // Set by the storage when it refuses a write: the rest of that write's payload is still
    // unread, so the stream must not be parsed any further.
    let refused_write = Rc::new(Cell::new(false));
    let mut conn = BufferedStream::new(stream, Rc::clone(&refused_write));
    let options = &shared.options;

    nbd::server::handshake(&mut conn, |name| {
        if name != options.export_name {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "no export named {name:?}; this server serves only {:?}",
                    options.export_name
                ),
            ));
        }
        Ok(nbd::server::Export {
            size: options.size,
            readonly: options.read_only,
            resizeable: false,
            rotational: options.rotational,
            send_trim: false,
            // The nbd crate sends NBD_FLAG_SEND_FLUSH exactly when the export is writable.
            send_flush: !options.read_only,
            data: (),
        })
    })?;

    let storage = Storage::new(shared, refused_write);
    nbd::server::transmission(&mut conn, storage)
}

/// The index range `offset .. offset + len` if it lies within a buffer of `size` bytes.
fn checked_range(size: usize, offset: u64, len: usize) -> io::Result<std::ops::Range<usize>> {
    let start = usize::try_from(offset).ok().filter(|&s| s <= size);
    match start.and_then(|s| s.checked_add(len).filter(|&e| e <= size).map(|e| s..e)) {
        Some(range) => Ok(range),
        None => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{len} bytes at offset {offset} do not fit in the {size}-byte export"),
        )),
    }
}

/// A zero-filled buffer of `size` bytes, or an error if it cannot be had.
///
/// `vec![0; n]` would abort the whole process when the allocation fails, which is not acceptable
/// inside a Node.js process, so the allocation is made (zeroed, hence lazily committed) by hand.
fn zeroed_bytes(size: u64) -> io::Result<Vec<u8>> {
    let too_large = || {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("an export of {size} bytes cannot be held in memory on this machine"),
        )
    };
    let len = usize::try_from(size).map_err(|_| too_large())?;
    if len == 0 {
        return Ok(Vec::new());
    }
    let layout = Layout::array::<u8>(len).map_err(|_| too_large())?;
    // SAFETY: `layout` has a non-zero size (len > 0).
    let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
    if ptr.is_null() {
        return Err(io::Error::new(
            io::ErrorKind::OutOfMemory,
            format!("cannot allocate {size} bytes for the export"),
        ));
    }
    // SAFETY: `ptr` comes from the global allocator with the layout of `[u8; len]`, and all `len`
    // bytes are initialised (to zero), so it is a valid Vec buffer of length and capacity `len`.
    Ok(unsafe { Vec::from_raw_parts(ptr, len, len) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_options() {
        let o = ServerOptions::default();
        assert_eq!(o.size, 64 * 1024 * 1024);
        assert!(!o.read_only && !o.rotational);
        assert_eq!(o.export_name, "");
    }

    #[test]
    fn preload_and_read_back() {
        let s = MemoryServer::new(ServerOptions {
            size: 4096,
            ..Default::default()
        });
        assert_eq!(s.size(), 4096);
        assert_eq!(s.read(0, 4096), vec![0; 4096]);
        s.write(4090, b"abcdef");
        assert_eq!(s.read(4088, 8), b"\0\0abcdef");
        assert_eq!(s.connections_served(), 0);
    }

    #[test]
    fn out_of_range_access_is_refused() {
        let s = MemoryServer::new(ServerOptions {
            size: 100,
            ..Default::default()
        });
        assert!(s.try_read(0, 101).is_err());
        assert!(s.try_read(101, 0).is_err());
        assert!(s.try_read(u64::MAX, 2).is_err());
        assert_eq!(s.try_read(100, 0).unwrap(), Vec::<u8>::new());
        assert!(s.try_write(99, b"xy").is_err());
        assert_eq!(s.read(99, 1), [0]);
    }

    #[test]
    fn zero_size_and_huge_exports() {
        let s = MemoryServer::try_new(ServerOptions {
            size: 0,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(s.size(), 0);
        let e = MemoryServer::try_new(ServerOptions {
            size: u64::MAX,
            ..Default::default()
        });
        assert!(e.is_err());
    }
}
