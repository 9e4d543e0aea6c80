//! Accepting connections on a Unix socket or a TCP port.

use std::fmt;
use std::io;
use std::net::TcpListener;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::MemoryServer;

/// The listening socket, shared by the [`Listener`] (which shuts it down) and its accept thread.
enum Socket {
    Unix(UnixListener),
    Tcp(TcpListener),
}

impl Socket {
    /// Waits for one connection and hands it to `server`.
    fn accept_into(&self, server: &MemoryServer, stop: &AtomicBool) -> io::Result<()> {
        match self {
            Socket::Unix(l) => {
                let (stream, _) = l.accept()?;
                if !stop.load(Ordering::SeqCst) {
                    server.spawn(stream)?;
                }
            }
            Socket::Tcp(l) => {
                let (stream, _) = l.accept()?;
                if !stop.load(Ordering::SeqCst) {
                    // Replies are small and written whole; do not let Nagle hold them back.
                    // (Best effort: a connection already reset fails later on its own.)
                    let _ = stream.set_nodelay(true);
                    server.spawn(stream)?;
                }
            }
        }
        Ok(())
    }

    fn raw_fd(&self) -> RawFd {
        match self {
            Socket::Unix(l) => l.as_raw_fd(),
            Socket::Tcp(l) => l.as_raw_fd(),
        }
    }
}

/// A socket on which a [`MemoryServer`] accepts connections, served each on its own thread.
///
/// Closing or dropping the `Listener` stops accepting: the accept thread is woken, exits and is
/// joined before `close`/`drop` returns, and a Unix socket file created by
/// [`MemoryServer::listen_unix`] is removed (if it is still the same file). Connections already
/// accepted are not affected; they end when their clients disconnect.
pub struct Listener {
    socket: Arc<Socket>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    port: Option<u16>,
    path: Option<PathBuf>,
    /// Device and inode of the socket file we bound, so that only that file is ever removed.
    file_id: Option<(u64, u64)>,
}

impl fmt::Debug for Listener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Listener")
            .field("port", &self.port)
            .field("path", &self.path)
            .field("open", &self.thread.is_some())
            .finish()
    }
}

impl Listener {
    pub(crate) fn unix(server: MemoryServer, path: &Path) -> io::Result<Listener> {
        let listener = UnixListener::bind(path)?;
        let file_id = std::fs::symlink_metadata(path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        let mut this = Listener::start(server, Socket::Unix(listener));
        this.path = Some(path.to_path_buf());
        this.file_id = file_id;
        match this.thread {
            Some(_) => Ok(this),
            None => Err(thread_error()), // dropping `this` removes the socket file again
        }
    }

    pub(crate) fn tcp(server: MemoryServer, addr: &str) -> io::Result<Listener> {
        let listener = TcpListener::bind(addr)?;
        let port = listener.local_addr()?.port();
        let mut this = Listener::start(server, Socket::Tcp(listener));
        this.port = Some(port);
        match this.thread {
            Some(_) => Ok(this),
            None => Err(thread_error()),
        }
    }

    /// Starts the accept thread; `thread` is `None` if it could not be started.
    fn start(server: MemoryServer, socket: Socket) -> Listener {
        let socket = Arc::new(socket);
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let socket = Arc::clone(&socket);
            let stop = Arc::clone(&stop);
            std::thread::Builder::new()
                .name("nbd-embedded-accept".to_owned())
                .spawn(move || accept_loop(&server, &socket, &stop))
                .ok()
        };
        Listener {
            socket,
            stop,
            thread,
            port: None,
            path: None,
            file_id: None,
        }
    }

    /// The TCP port listened on (`None` for a Unix socket).
    pub fn port(&self) -> Option<u16> {
        self.port
    }

    /// The Unix socket path listened on (`None` for TCP).
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Stops accepting, waits for the accept thread to exit and removes the Unix socket file.
    /// Dropping the listener does the same.
    pub fn close(self) {
        drop(self);
    }

    fn stop_accepting(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            // On Linux, shutdown(2) of a listening socket wakes a blocked accept(2), which then
            // fails with EINVAL; the accept loop sees `stop` and exits. The fd stays open (and so
            // cannot be reused by anyone else) until both we and the thread drop the socket.
            // SAFETY: the fd belongs to `self.socket`, which is alive here.
            unsafe {
                libc::shutdown(self.socket.raw_fd(), libc::SHUT_RDWR);
            }
            let _ = thread.join();
        }
        if let (Some(path), Some(id)) = (&self.path, self.file_id.take()) {
            let same_file = std::fs::symlink_metadata(path)
                .map(|m| (m.dev(), m.ino()) == id)
                .unwrap_or(false);
            if same_file {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop_accepting();
    }
}

fn thread_error() -> io::Error {
    io::Error::other("nbd-embedded: cannot start the accept thread")
}

/// Accepts until `stop` is set (or the socket fails for good).
fn accept_loop(server: &MemoryServer, socket: &Socket, stop: &AtomicBool) {
    loop {
        let result = socket.accept_into(server, stop);
        if stop.load(Ordering::SeqCst) {
            return;
        }
        if let Err(e) = result {
            match e.raw_os_error() {
                // The socket itself is unusable (shut down, closed): nothing more will come.
                Some(libc::EINVAL | libc::EBADF | libc::ENOTSOCK) => return,
                // A connection that went away before we took it, or a signal: carry on at once.
                Some(libc::EINTR | libc::ECONNABORTED) => {}
                // Out of descriptors, threads or memory, or a network error that the accepted
                // connection brought with it: back off briefly instead of spinning.
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}
