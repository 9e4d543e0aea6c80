//! Whole-export copy, the work of libnbd's `nbdcopy`, over the `nbd-client` tokio API.
//!
//! [`copy`] moves every byte of a source to a destination with no per-request work
//! outside Rust. Endpoints ([`Endpoint`]) are NBD exports (by URI), local files and block
//! devices, and `null:` (a destination that discards).
//!
//! # How a copy runs
//!
//! 1. Both sides are opened: one NBD connection each (the source asks for
//!    `base:allocation`), a file opened or created. A regular destination file is
//!    truncated to the source's size, so it reads as zeroes and zero ranges are skipped
//!    (nbdcopy does the same); a block device or an export smaller than the source is
//!    refused.
//! 2. More connections are opened where that is safe (the server advertises multi-conn, or
//!    the source is read-only): one worker task per connection. If the server refuses any
//!    of them, or leaves one unanswered for ten times as long as the first ones took (from
//!    one second to ten), the copy goes on with one connection per side when
//!    the number was the default, and fails (`ETIMEDOUT` for one left unanswered) when it
//!    was asked for.
//! 3. The export is cut into work units that the workers take in turn. For each unit the
//!    worker asks the source for its extents (block status, or `SEEK_DATA`/`SEEK_HOLE` for
//!    a file); request-sized pieces that are all zero extents become one zero request, the
//!    rest is read. Each read runs as its own task (at most `requests` per connection), and
//!    its data is scanned at the `sparse` granularity: all-zero blocks are written as zero
//!    requests (holes, or allocated zeroes with `allocated`), the rest as writes. Reads and
//!    writes of different pieces overlap.
//! 4. The destination is flushed (`flush`), NBD connections are shut down politely and
//!    everything opened is closed, on success, failure and cancellation alike.
//!
//! Each copy runs on threads of its own (see [`copy`]): with several connections, one
//! thread per connection (as nbdcopy), each owning that connection's sockets and work.
//! Reads from the source land in buffers taken from a pool as the data arrives, and a file
//! destination is written from the thread that received the data.
//!
//! Errors name the side and the offset: `reading the source at 1048576: EIO: …`.

#![warn(missing_docs)]

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nbd_client::consts::{FLAG_CAN_MULTI_CONN, FLAG_READ_ONLY, FLAG_SEND_FLUSH, FLAG_SEND_WRITE_ZEROES, STATE_ZERO};
use nbd_client::{CancelToken, Settings, Errno, Error, Fault, Handle, Result, SourceBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

const BASE_ALLOCATION: &str = "base:allocation";
/// How much of the export a worker takes at a time (nbdcopy uses 128 MiB).
const WORK_UNIT: u64 = 32 << 20;

/// One end of a copy.
#[derive(Debug, Clone)]
pub enum Endpoint {
    /// An NBD export, connected to with `connect_uri` and these settings (TLS files and the
    /// like; the URI policy should allow local files when the URI names any).
    Nbd {
        /// The NBD URI.
        uri: String,
        /// The handle's settings (boxed: they are large).
        settings: Box<Settings>,
    },
    /// A local file or block device. A missing destination file is created (mode 0644).
    File(PathBuf),
    /// Discards everything (destination only).
    Null,
}

/// How to copy; `Default` gives nbdcopy's defaults, but `flush` is on.
#[derive(Debug, Clone)]
pub struct Options {
    /// Connections per NBD side; `None` for 4 (at most one per CPU, as nbdcopy) where
    /// multi-conn is safe. Forced to 1 where it is not (a writable source without
    /// multi-conn, or a destination without multi-conn). `None` also drops to 1 when the
    /// server does not serve the extra connections, where a number asked for fails the copy
    /// (see the module documentation).
    pub connections: Option<usize>,
    /// Requests in flight per connection.
    pub requests: usize,
    /// Bytes per read; raised to the sides' preferred block size, capped at their maximum
    /// and rounded down to a multiple of their minimum.
    pub request_size: u32,
    /// Zero detection granularity; `None` writes every byte read.
    pub sparse: Option<u32>,
    /// Zero ranges become allocated zeroes (zero with `NO_HOLE`), and data is not scanned.
    pub allocated: bool,
    /// The destination already reads as zeroes: zero ranges are skipped.
    pub destination_is_zero: bool,
    /// Flush the destination at the end.
    pub flush: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            connections: None,
            requests: 64,
            request_size: 256 * 1024,
            sparse: Some(4096),
            allocated: false,
            destination_is_zero: false,
            flush: true,
        }
    }
}

/// Counters a caller may read while the copy runs.
#[derive(Debug, Default)]
pub struct Progress {
    /// Bytes of the source dealt with (read and written, or zeroed, or skipped).
    pub bytes_done: AtomicU64,
    /// Of those, bytes that were zero (zero requests, holes or skipped ranges).
    pub bytes_zero: AtomicU64,
    /// The source's size, once known.
    pub bytes_total: AtomicU64,
}

/// What a finished copy did.
#[derive(Debug, Clone)]
pub struct Report {
    /// Bytes copied (the source's size).
    pub bytes: u64,
    /// Of those, bytes that were data.
    pub data_bytes: u64,
    /// Of those, bytes that were zero (zero requests, holes or skipped ranges).
    pub zero_bytes: u64,
    /// How long the copy took.
    pub seconds: f64,
    /// Connections per NBD side actually used.
    pub connections: usize,
    /// Bytes per read actually used.
    pub request_size: u32,
}

fn io_error(e: std::io::Error, what: &str) -> Error {
    let errno = e.raw_os_error().map(Errno::from_raw_os_error).unwrap_or(Errno::EIO);
    Error::io(errno, format!("{what}: {e}"))
}

/// `what at offset: ERRNO: message`, keeping the errno and fault.
fn at(e: Error, what: &str, offset: u64) -> Error {
    let message = format!("{what} at {offset}: {}: {}", e.errno().name(), e.message());
    Error::new(e.fault(), e.errno(), message)
}

fn cancelled() -> Error {
    Error::new(Fault::Cancelled, Errno::ECANCELED, "the copy was aborted")
}

/// A file shared by the tasks of a copy.
struct LocalFile {
    file: File,
    regular: bool,
    /// Ranges recently written to a regular destination, oldest first, per worker (see
    /// [`LocalFile::write_behind`]).
    #[cfg_attr(not(any(target_os = "linux", target_os = "android")), allow(dead_code))]
    written: Mutex<Vec<std::collections::VecDeque<(u64, u64)>>>,
}

/// How many ranges written by one worker may sit in the page cache before the oldest is
/// pushed out.
#[cfg_attr(not(any(target_os = "linux", target_os = "android")), allow(dead_code))]
const WRITE_WINDOWS: usize = 8;

impl LocalFile {
    /// After worker `worker` wrote to a regular file: start writing it back at once, and
    /// push the range that worker wrote `WRITE_WINDOWS` writes ago out of the page cache
    /// once it is on disk. A copy of gigabytes otherwise fills memory with dirty pages that
    /// the kernel then writes back under pressure, stalling every write (nbdcopy does the
    /// same, per thread). Each worker writes its own part of the file, so each keeps its own
    /// windows: shared ones would wait on one worker's disk writes for the other's sake.
    /// Linux only: elsewhere (macOS) there is no `sync_file_range`, and the kernel is left
    /// to write back as it likes.
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    fn write_behind(&self, _worker: usize, _offset: u64, _len: u64) {}

    #[cfg(any(target_os = "linux", target_os = "android"))]
    fn write_behind(&self, worker: usize, offset: u64, len: u64) {
        let fd = self.file.as_raw_fd();
        // SAFETY: hints on a descriptor we own; failures only lose the hint.
        unsafe { libc::sync_file_range(fd, offset as libc::off64_t, len as libc::off64_t, libc::SYNC_FILE_RANGE_WRITE) };
        let oldest = {
            let mut all = self.written.lock().unwrap_or_else(|p| p.into_inner());
            if all.len() <= worker {
                all.resize_with(worker + 1, Default::default);
            }
            let q = &mut all[worker];
            q.push_back((offset, len));
            if q.len() > WRITE_WINDOWS { q.pop_front() } else { None }
        };
        if let Some((o, l)) = oldest {
            let all = libc::SYNC_FILE_RANGE_WAIT_BEFORE | libc::SYNC_FILE_RANGE_WRITE | libc::SYNC_FILE_RANGE_WAIT_AFTER;
            // SAFETY: as above.
            unsafe {
                libc::sync_file_range(fd, o as libc::off64_t, l as libc::off64_t, all);
                libc::posix_fadvise(fd, o as libc::off_t, l as libc::off_t, libc::POSIX_FADV_DONTNEED);
            }
        }
    }
}

/// One opened side.
enum Side {
    Nbd { conns: Vec<Handle>, flags: u16, extents: bool },
    File(Arc<LocalFile>),
    Null,
}

struct Opened {
    side: Side,
    size: u64,
    endpoint: Endpoint,
    /// The server's minimum block size (a power of two), 1 elsewhere.
    minimum: u32,
    preferred: u32,
    maximum: u32,
}

impl Opened {
    fn multi_conn_safe(&self, source: bool) -> bool {
        match &self.side {
            Side::Nbd { flags, .. } => flags & FLAG_CAN_MULTI_CONN != 0 || (source && flags & FLAG_READ_ONLY != 0),
            _ => true,
        }
    }

    fn conn(&self, worker: usize) -> &Handle {
        match &self.side {
            Side::Nbd { conns, .. } => &conns[worker % conns.len()],
            _ => unreachable!("only NBD sides have connections"),
        }
    }

    fn handles(&self) -> Vec<Handle> {
        match &self.side {
            Side::Nbd { conns, .. } => conns.clone(),
            _ => Vec::new(),
        }
    }
}

async fn connect(uri: &str, settings: &Settings, extents: bool) -> Result<Handle> {
    let mut settings = settings.clone();
    // Every read fills its whole buffer or fails: zeroing it first is wasted work.
    settings.pread_initialize = false;
    let h = Handle::new(settings);
    if extents {
        h.add_meta_context(BASE_ALLOCATION)?;
    }
    if let Err(e) = h.connect_uri(uri).await {
        h.close().await;
        return Err(e);
    }
    Ok(h)
}

async fn open(endpoint: Endpoint, source: bool) -> Result<Opened> {
    let name = if source { "the source" } else { "the destination" };
    match &endpoint {
        Endpoint::Nbd { uri, settings } => {
            let h = connect(uri, settings, source).await.map_err(|e| e.context(&format!("connecting to {name}")))?;
            let n = match h.negotiated() {
                Ok(n) => n,
                Err(e) => {
                    h.close().await;
                    return Err(e);
                }
            };
            let (minimum, preferred, maximum) = match n.export.block_size {
                Some(b) => (b.minimum.max(1), b.preferred.max(1), b.maximum.min(n.export.payload_max())),
                None => (1, 1, n.export.payload_max()),
            };
            let extents = source && n.meta_context_id(BASE_ALLOCATION).is_some();
            if !source && n.export.has(FLAG_READ_ONLY) {
                h.close().await;
                return Err(Error::usage(Errno::EPERM, "the destination is read-only"));
            }
            Ok(Opened {
                side: Side::Nbd { conns: vec![h], flags: n.export.flags, extents },
                size: n.export.size,
                endpoint,
                minimum,
                preferred,
                maximum,
            })
        }
        Endpoint::File(path) => {
            let shown = path.display().to_string();
            // Looked at first, so that a FIFO is never opened: the open would wait
            // (uncancellably, on this thread) for its other end. A block device is opened as
            // usual: some drivers skip their media checks on a non-blocking open.
            match std::fs::metadata(path) {
                Ok(m) if !m.file_type().is_file() && !m.file_type().is_block_device() => {
                    return Err(not_a_file(&shown))
                }
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && !source => {}
                Err(e) => return Err(io_error(e, &format!("opening {name} {shown}"))),
            }
            let file = if source {
                File::open(path).map_err(|e| io_error(e, &format!("opening {name} {shown}")))?
            } else {
                // As nbdcopy: open without O_CREAT first so that a block device path that is
                // missing is not turned into a regular file by accident... then create.
                match OpenOptions::new().write(true).open(path) {
                    Ok(f) => f,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(0o644)
                        .open(path)
                        .map_err(|e| io_error(e, &format!("creating {name} {shown}")))?,
                    Err(e) => return Err(io_error(e, &format!("opening {name} {shown}"))),
                }
            };
            let meta = file.metadata().map_err(|e| io_error(e, &shown))?;
            if !meta.file_type().is_file() && !meta.file_type().is_block_device() {
                return Err(not_a_file(&shown));
            }
            let regular = meta.file_type().is_file();
            let size = if regular {
                meta.len()
            } else {
                block_device_size(&file).map_err(|e| io_error(e, &shown))?
            };
            Ok(Opened {
                side: Side::File(Arc::new(LocalFile { file, regular, written: Mutex::default() })),
                size,
                endpoint,
                minimum: 1,
                preferred: 4096,
                maximum: 64 << 20,
            })
        }
        Endpoint::Null => {
            if source {
                return Err(Error::usage(Errno::EINVAL, "null: can only be a destination"));
            }
            Ok(Opened { side: Side::Null, size: u64::MAX, endpoint, minimum: 1, preferred: 1, maximum: 64 << 20 })
        }
    }
}

fn not_a_file(shown: &str) -> Error {
    Error::usage(
        Errno::EINVAL,
        format!("{shown} is neither a regular file nor a block device (use a stream for pipes)"),
    )
}

fn block_device_size(file: &File) -> std::io::Result<u64> {
    // SAFETY: lseek on a descriptor we own; it only moves the file offset.
    let end = unsafe { libc::lseek(file.as_raw_fd(), 0, libc::SEEK_END) };
    if end < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(end as u64)
}

/// A read buffer shared by the read that fills it and the writes that send its pieces.
///
/// The driver writes into it only while the read is in flight, and the writes only read
/// it after the read has completed, so the two never overlap. A read's block stays empty
/// until the reply's data arrives (see [`Fill`]).
struct Block(std::cell::UnsafeCell<Vec<u8>>);

// SAFETY: see above: one writer (the read), then readers only.
unsafe impl Sync for Block {}

impl Block {
    fn bytes(&self) -> &[u8] {
        // SAFETY: only called once the read into the block has completed.
        unsafe { &*self.0.get() }
    }
}

/// The destination of a read of `len` bytes into a [`Block`].
///
/// The memory is taken from the pool when the driver first asks for it, that is when the
/// reply's data arrives, not when the read is sent: with 64 reads in flight per connection,
/// memory taken at sending would be 16 MiB of buffers cycling through the CPU caches, and
/// the kernel's copy into a cold buffer measured about a third dearer than into the warm,
/// just returned one that the pool hands out last-in first-out.
struct Fill {
    block: Arc<Block>,
    len: usize,
    pool: Arc<Pool>,
}

// SAFETY: the Arc keeps the Vec alive; nothing reads it until the read completes, and the
// Vec is replaced only on the first call, before any byte is written.
unsafe impl nbd_client::DestBuf for Fill {
    fn as_mut_ptr(&mut self) -> *mut u8 {
        // SAFETY: the read is the block's only user until it completes.
        let v = unsafe { &mut *self.block.0.get() };
        if v.len() != self.len {
            *v = self.pool.take(self.len);
        }
        v.as_mut_ptr()
    }
    fn len(&self) -> usize {
        self.len
    }
}

/// A piece of a read buffer, written without copying.
struct Piece {
    buf: Arc<Block>,
    start: usize,
    len: usize,
}

// SAFETY: the Arc keeps the bytes alive and nobody writes to them once read.
unsafe impl SourceBuf for Piece {
    fn as_ptr(&self) -> *const u8 {
        self.buf.bytes()[self.start..].as_ptr()
    }
    fn len(&self) -> usize {
        self.len
    }
}

/// Read buffers kept for reuse: fresh memory costs page faults, and recycled memory from
/// the allocator would be zeroed again for every read.
#[derive(Default)]
struct Pool(Mutex<Vec<Vec<u8>>>);

impl Pool {
    fn take(&self, len: usize) -> Vec<u8> {
        let mut v = self.0.lock().unwrap_or_else(|p| p.into_inner()).pop().unwrap_or_default();
        if v.len() != len {
            v.resize(len, 0);
        }
        v
    }

    fn give(&self, block: Arc<Block>) {
        // Still referenced (a write that failed may keep it a little longer): let it go.
        if let Ok(block) = Arc::try_unwrap(block) {
            self.0.lock().unwrap_or_else(|p| p.into_inner()).push(block.0.into_inner());
        }
    }
}

fn is_zero(b: &[u8]) -> bool {
    // Compare in 16-byte words; the compiler vectorises this well.
    let (head, words, tail) = unsafe { b.align_to::<u128>() };
    head.iter().all(|&x| x == 0) && words.iter().all(|&x| x == 0) && tail.iter().all(|&x| x == 0)
}

/// A range of the source: `zero` when it reads as zeroes.
#[derive(Debug, Clone, Copy)]
struct Extent {
    start: u64,
    end: u64,
    zero: bool,
}

/// Everything the workers share.
struct Job {
    /// Where the lanes run, when there are lanes (see [`Placement`]).
    placement: Option<Placement>,
    src: Opened,
    dst: Opened,
    size: u64,
    request_size: u64,
    sparse: Option<u64>,
    requests: usize,
    allocated: bool,
    destination_is_zero: bool,
    next: AtomicU64,
    stop: CancelToken,
    first_error: Mutex<Option<Error>>,
    progress: Arc<Progress>,
    data_bytes: AtomicU64,
    pool: Arc<Pool>,
    /// Bounds the local file calls running at once: a thread per request in flight would
    /// only queue on the file's lock and switch contexts.
    file_calls: Semaphore,
}

impl Job {
    /// Runs a blocking file call on tokio's blocking pool, a few at a time.
    async fn file_call<T: Send + 'static>(&self, what: &str, call: impl FnOnce() -> std::io::Result<T> + Send + 'static) -> Result<T> {
        let _turn = self.file_calls.acquire().await.expect("the semaphore is never closed");
        tokio::task::spawn_blocking(call)
            .await
            .map_err(|e| Error::io(Errno::EIO, format!("{what} task: {e}")))?
            .map_err(|e| io_error(e, what))
    }

    /// Writes a piece read at `offset` to a file destination: its data runs, and its zero
    /// runs unless the file already reads as zeroes, right here on the copy's own worker
    /// thread (see [`copy`]).
    fn write_piece_to_file(&self, worker: usize, f: &LocalFile, offset: u64, buf: &Block, runs: &[(usize, usize, bool)]) -> Result<()> {
        let mut end = offset;
        for &(start, n, zero) in runs {
            let at_offset = offset + start as u64;
            if !zero {
                f.file
                    .write_all_at(&buf.bytes()[start..start + n], at_offset)
                    .map_err(|e| at(io_error(e, "write"), "writing the destination", at_offset))?;
            } else if !self.destination_is_zero {
                zero_file(&f.file, at_offset, n as u64, self.allocated)
                    .map_err(|e| at(io_error(e, "zero"), "zeroing the destination", at_offset))?;
            }
            end = at_offset + n as u64;
        }
        if f.regular {
            f.write_behind(worker, offset, end - offset);
        }
        for &(_, n, zero) in runs {
            self.done(n as u64, zero);
        }
        Ok(())
    }

    fn fail(&self, e: Error) {
        let mut first = self.first_error.lock().unwrap_or_else(|p| p.into_inner());
        if first.is_none() && !self.stop.is_cancelled() {
            *first = Some(e);
        }
        drop(first);
        self.stop.cancel();
    }

    fn done(&self, len: u64, zero: bool) {
        self.progress.bytes_done.fetch_add(len, Ordering::Relaxed);
        if zero {
            self.progress.bytes_zero.fetch_add(len, Ordering::Relaxed);
        } else {
            self.data_bytes.fetch_add(len, Ordering::Relaxed);
        }
    }

    /// The source's extents over [start, end), covering it exactly.
    async fn extents(&self, worker: usize, start: u64, end: u64) -> Result<Vec<Extent>> {
        let all_data = vec![Extent { start, end, zero: false }];
        match &self.src.side {
            Side::Nbd { extents: true, .. } => {
                let h = self.src.conn(worker);
                let mut out = Vec::new();
                let mut pos = start;
                while pos < end {
                    let count = (end - pos).min(u32::MAX as u64 & !0xfff);
                    let reply = h.block_status(count, pos, 0, None, None).await.map_err(|e| at(e, "block status of the source", pos))?;
                    let list = reply.into_iter().find(|c| c.name == BASE_ALLOCATION).map(|c| c.extents).unwrap_or_default();
                    if list.is_empty() {
                        return Err(at(Error::protocol("the server described no extents"), "block status of the source", pos));
                    }
                    for e in list {
                        if pos >= end {
                            break;
                        }
                        let stop = (e.offset + e.length).min(end);
                        if e.offset != pos || stop <= pos {
                            return Err(at(Error::protocol("extents do not follow on"), "block status of the source", pos));
                        }
                        out.push(Extent { start: pos, end: stop, zero: e.flags as u32 & STATE_ZERO != 0 });
                        pos = stop;
                    }
                }
                Ok(out)
            }
            Side::File(f) if f.regular => {
                let f = f.clone();
                self.file_call("seeking data", move || file_extents(&f.file, start, end))
                    .await
                    .map_err(|e| at(e, "the source's extents", start))
            }
            _ => Ok(all_data),
        }
    }

    async fn read(&self, worker: usize, offset: u64, len: u64) -> Result<Arc<Block>> {
        let block = Arc::new(Block(std::cell::UnsafeCell::new(Vec::new())));
        let mut fill = Fill { block: block.clone(), len: len as usize, pool: self.pool.clone() };
        match &self.src.side {
            Side::Nbd { .. } => {
                self.src.conn(worker).pread_into(Box::new(fill), offset, 0, None).await?;
                // A successful read has put data or a hole on every byte, so it has asked for
                // its memory; this guards the pieces below against an empty block.
                if block.bytes().len() != len as usize {
                    return Err(Error::protocol("a read completed without filling its buffer"));
                }
            }
            Side::File(f) => {
                let f = f.clone();
                self.file_call("read", move || {
                    // SAFETY: Fill points at len bytes that nothing else touches meanwhile.
                    let buf = unsafe { std::slice::from_raw_parts_mut(nbd_client::DestBuf::as_mut_ptr(&mut fill), len as usize) };
                    f.file.read_exact_at(buf, offset)
                })
                .await?;
            }
            Side::Null => unreachable!("null is never a source"),
        }
        Ok(block)
    }

    /// Writes `piece` at `offset` of an NBD destination; `null:` takes nothing. (A file
    /// takes whole pieces, in [`Job::write_piece_to_file`].)
    async fn write(&self, worker: usize, offset: u64, piece: Piece) -> Result<()> {
        match &self.dst.side {
            Side::Nbd { .. } => self.dst.conn(worker).pwrite(Box::new(piece), offset, 0, None).await,
            Side::File(_) => Err(Error::io(Errno::EINVAL, "a file destination takes whole pieces")),
            Side::Null => Ok(()),
        }
    }

    /// Makes [offset, offset+len) of the destination read as zeroes.
    async fn zero(&self, worker: usize, offset: u64, len: u64) -> Result<()> {
        if self.destination_is_zero {
            return Ok(());
        }
        match &self.dst.side {
            Side::Nbd { flags, .. } if flags & FLAG_SEND_WRITE_ZEROES != 0 => {
                let flag = if self.allocated { u32::from(nbd_client::consts::CMD_FLAG_NO_HOLE) } else { 0 };
                self.dst.conn(worker).zero(len, offset, flag, None).await
            }
            Side::Nbd { .. } => {
                let zeroes = Arc::new(Block(std::cell::UnsafeCell::new(vec![0u8; self.request_size.min(len) as usize])));
                let mut pos = offset;
                while pos < offset + len {
                    let n = (offset + len - pos).min(zeroes.bytes().len() as u64) as usize;
                    self.write(worker, pos, Piece { buf: zeroes.clone(), start: 0, len: n }).await?;
                    pos += n as u64;
                }
                Ok(())
            }
            Side::File(f) => {
                let f = f.clone();
                let allocated = self.allocated;
                self.file_call("zero", move || zero_file(&f.file, offset, len, allocated)).await
            }
            Side::Null => Ok(()),
        }
    }

    /// Reads one piece and writes it, as data and zero runs.
    async fn copy_piece(&self, worker: usize, offset: u64, len: u64) -> Result<()> {
        let buf = self.read(worker, offset, len).await.map_err(|e| at(e, "reading the source", offset))?;
        let runs = match self.sparse {
            Some(granule) if !self.allocated => zero_runs(buf.bytes(), offset, granule),
            _ => vec![(0, len as usize, false)],
        };
        if let Side::File(f) = &self.dst.side {
            self.write_piece_to_file(worker, f, offset, &buf, &runs)?;
        } else {
            self.write_runs(worker, offset, &buf, runs).await?;
        }
        self.pool.give(buf);
        Ok(())
    }

    /// Writes the runs of a piece read at `offset` to an NBD destination (data as writes,
    /// zero runs as zero requests), or drops them for `null:`.
    async fn write_runs(&self, worker: usize, offset: u64, buf: &Arc<Block>, runs: Vec<(usize, usize, bool)>) -> Result<()> {
        for (start, n, zero) in runs {
            let at_offset = offset + start as u64;
            if zero {
                self.zero(worker, at_offset, n as u64).await.map_err(|e| at(e, "zeroing the destination", at_offset))?;
            } else {
                let piece = Piece { buf: buf.clone(), start, len: n };
                self.write(worker, at_offset, piece).await.map_err(|e| at(e, "writing the destination", at_offset))?;
            }
            self.done(n as u64, zero);
        }
        Ok(())
    }

    async fn zero_range(&self, worker: usize, offset: u64, len: u64) -> Result<()> {
        self.zero(worker, offset, len).await.map_err(|e| at(e, "zeroing the destination", offset))?;
        self.done(len, true);
        Ok(())
    }
}

/// Splits a buffer read at `offset` into runs of (start, length, all zero), testing whole
/// `granule`-sized blocks aligned to the export; partial blocks at either end count as data.
fn zero_runs(buf: &[u8], offset: u64, granule: u64) -> Vec<(usize, usize, bool)> {
    let mut runs: Vec<(usize, usize, bool)> = Vec::new();
    let mut push = |start: usize, n: usize, zero: bool| match runs.last_mut() {
        Some(last) if last.2 == zero && last.0 + last.1 == start => last.1 += n,
        _ => runs.push((start, n, zero)),
    };
    let len = buf.len();
    let first = ((offset.div_ceil(granule) * granule - offset) as usize).min(len);
    if first > 0 {
        push(0, first, false);
    }
    let mut pos = first;
    while pos < len {
        let n = (granule as usize).min(len - pos);
        let zero = n == granule as usize && is_zero(&buf[pos..pos + n]);
        push(pos, n, zero);
        pos += n;
    }
    runs
}

fn file_extents(file: &File, start: u64, end: u64) -> std::io::Result<Vec<Extent>> {
    let fd = file.as_raw_fd();
    let mut out = Vec::new();
    let mut pos = start;
    while pos < end {
        // SAFETY: lseek on a descriptor we own; reads go through pread, so the moved
        // offset does not matter.
        let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                out.push(Extent { start: pos, end, zero: true });
                break;
            }
            // A file system without SEEK_DATA: all data.
            out.push(Extent { start: pos, end, zero: false });
            break;
        }
        let data = (data as u64).min(end);
        if data > pos {
            out.push(Extent { start: pos, end: data, zero: true });
            pos = data;
            if pos >= end {
                break;
            }
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_HOLE) };
        let hole = if hole < 0 { end } else { (hole as u64).min(end) };
        let stop = hole.max(pos + 1).min(end);
        out.push(Extent { start: pos, end: stop, zero: false });
        pos = stop;
    }
    Ok(out)
}

fn zero_file(file: &File, offset: u64, len: u64, allocated: bool) -> std::io::Result<()> {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        let mode = if allocated {
            libc::FALLOC_FL_ZERO_RANGE
        } else {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        };
        // SAFETY: fallocate on a descriptor we own.
        let r = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset as libc::off_t, len as libc::off_t) };
        if r == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if !matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP) | Some(libc::ENODEV) | Some(libc::EINVAL)) {
            return Err(e);
        }
    }
    // No fallocate elsewhere (macOS): zeroes are written.
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let _ = allocated;
    let zeroes = vec![0u8; len.min(1 << 20) as usize];
    let mut pos = offset;
    while pos < offset + len {
        let n = (offset + len - pos).min(zeroes.len() as u64) as usize;
        file.write_all_at(&zeroes[..n], pos)?;
        pos += n as u64;
    }
    Ok(())
}

/// Whether [offset, offset+len) meets only zero extents; `k` walks forward through them.
fn only_zeroes(extents: &[Extent], k: &mut usize, offset: u64, len: u64) -> bool {
    while *k + 1 < extents.len() && extents[*k].end <= offset {
        *k += 1;
    }
    extents[*k..].iter().take_while(|e| e.start < offset + len).all(|e| e.zero)
}

async fn worker(job: Arc<Job>, index: usize) {
    let slots = Arc::new(Semaphore::new(job.requests));
    let mut tasks: JoinSet<()> = JoinSet::new();
    let spawn = |tasks: &mut JoinSet<()>, permit: OwnedSemaphorePermit, offset: u64, len: u64, zero: bool| {
        let job = job.clone();
        tasks.spawn(async move {
            let _slot = permit;
            if job.stop.is_cancelled() {
                return;
            }
            let r = if zero { job.zero_range(index, offset, len).await } else { job.copy_piece(index, offset, len).await };
            if let Err(e) = r {
                job.fail(e);
            }
        });
    };
    // The next unit's extents are asked for while this unit's pieces go out, so the reads
    // never wait for a block-status round trip (a sparse source has few reads per unit).
    let claim = || {
        let start = job.next.fetch_add(WORK_UNIT, Ordering::Relaxed);
        (start < job.size).then(|| (start, (start + WORK_UNIT).min(job.size)))
    };
    let fetch = |(start, end): (u64, u64)| {
        let job = job.clone();
        tokio::spawn(async move { job.extents(index, start, end).await })
    };
    let mut upcoming = claim().map(|unit| (unit, fetch(unit)));
    let mut moved_at = None;
    'units: while let Some(((start, end), asked)) = upcoming.take() {
        if job.stop.is_cancelled() {
            asked.abort();
            break;
        }
        let extents = match asked.await {
            Ok(Ok(e)) => e,
            Ok(Err(e)) => {
                job.fail(e);
                break;
            }
            Err(e) => {
                job.fail(Error::io(Errno::EIO, format!("block status task: {e}")));
                break;
            }
        };
        upcoming = claim().map(|unit| (unit, fetch(unit)));
        let mut k = 0;
        let mut zero_from: Option<u64> = None;
        let mut pos = start;
        // Zero pieces are deferred and joined, so a long zero range goes as one request.
        let mut pieces = Vec::new();
        while pos < end {
            let len = job.request_size.min(end - pos);
            if only_zeroes(&extents, &mut k, pos, len) {
                zero_from.get_or_insert(pos);
            } else {
                if let Some(z) = zero_from.take() {
                    pieces.push((z, pos - z, true));
                }
                pieces.push((pos, len, false));
            }
            pos += len;
        }
        if let Some(z) = zero_from.take() {
            pieces.push((z, end - z, true));
        }
        for (offset, len, zero) in pieces {
            let permit = tokio::select! {
                p = slots.clone().acquire_owned() => p.expect("the semaphore is never closed"),
                _ = job.stop.cancelled() => break 'units,
            };
            if let Some(placement) = &job.placement {
                placement.check(index, &mut moved_at);
            }
            spawn(&mut tasks, permit, offset, len, zero);
            while let Some(r) = tasks.try_join_next() {
                if let Err(e) = r {
                    job.fail(Error::io(Errno::EIO, format!("copy task: {e}")));
                }
            }
        }
    }
    if let Some((_, asked)) = upcoming {
        asked.abort();
    }
    while let Some(r) = tasks.join_next().await {
        if let Err(e) = r {
            job.fail(Error::io(Errno::EIO, format!("copy task: {e}")));
        }
    }
    if let Some(placement) = &job.placement {
        placement.leave(index);
    }
}

async fn close_all(handles: Vec<Handle>, polite: bool) {
    let mut set = JoinSet::new();
    for h in handles {
        set.spawn(async move {
            if polite {
                let _ = h.shutdown(false).await;
            }
            h.close().await;
        });
    }
    while set.join_next().await.is_some() {}
}

/// Copies `src` to `dst`. `cancel` stops it promptly (pending commands are abandoned,
/// connections closed); the copy then fails with `ECANCELED`. `progress` is updated as
/// pieces finish.
///
/// The copy runs on threads of its own, whatever runtime awaits it: a tokio runtime that
/// plans it and runs the work of a copy with one connection (two threads for a file
/// destination, else one), and with several connections one thread per connection (each
/// owning its sockets). It writes local files from the
/// thread that received the data, as nbdcopy writes from its connection threads (handing
/// each write to a blocking pool cost a third more CPU), and a slow disk must not stall the
/// caller's other tasks.
///
/// On Linux, a connection's thread that finds another of the copy's connection threads on its
/// CPU moves itself to one none of them is on, by setting its own affinity for a moment (see
/// [`Placement`]; `NBD_CLIENT_COPY_PLACEMENT=off` in the environment turns this off).
pub async fn copy(src: Endpoint, dst: Endpoint, options: Options, progress: Arc<Progress>, cancel: CancelToken) -> Result<Report> {
    let (done, outcome) = tokio::sync::oneshot::channel();
    // A file destination with one connection writes on one thread while another reads the
    // socket. Otherwise one thread does it all, as nbdcopy's one thread per connection:
    // measured against nbdkit pattern → memory with one connection (alternating runs), the
    // multi-threaded runtime's wake-ups between its threads made half again as many context
    // switches as one thread (nbdcopy's count) and the same or more CPU (0–17 %), for no
    // gain in time. (With several connections this thread only plans; the lanes have
    // threads of their own.)
    let runtime = if matches!(dst, Endpoint::File(_)) {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(cpus().max(2))
            .thread_name("nbd-copy")
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    }
    .map_err(|e| io_error(e, "starting the copy's threads"))?;
    std::thread::Builder::new()
        .name("nbd-copy".into())
        .spawn(move || {
            let report = runtime.block_on(copy_here(src, dst, options, progress, cancel));
            // Everything the copy opened is closed by now: its threads end before the result
            // is handed over (a file call stuck in the kernel is not waited for long).
            runtime.shutdown_timeout(std::time::Duration::from_secs(5));
            let _ = done.send(report);
        })
        .map_err(|e| io_error(e, "starting the copy's thread"))?;
    outcome.await.unwrap_or_else(|_| Err(Error::io(Errno::EIO, "the copy's thread ended without a result")))
}

/// How long the extra connections may take to open: ten times what the first ones took,
/// from one second to ten.
fn lane_wait(opened_in: Duration) -> Duration {
    (opened_in * 10).clamp(Duration::from_secs(1), Duration::from_secs(10))
}

/// The CPUs this process may use (1 when unknown).
fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// [`copy`], on the current runtime.
async fn copy_here(src: Endpoint, dst: Endpoint, options: Options, progress: Arc<Progress>, cancel: CancelToken) -> Result<Report> {
    let started = Instant::now();
    if options.requests == 0 || options.request_size == 0 || options.connections == Some(0) {
        return Err(Error::usage(Errno::EINVAL, "connections, requests and requestSize must be positive"));
    }
    let mut src = tokio::select! {
        r = open(src, true) => r?,
        _ = cancel.cancelled() => return Err(cancelled()),
    };
    let dst = tokio::select! {
        r = open(dst, false) => r,
        _ = cancel.cancelled() => Err(cancelled()),
    };
    let mut dst = match dst {
        Ok(d) => d,
        Err(e) => {
            close_all(src.handles(), false).await;
            return Err(e);
        }
    };
    // How long the sides took to open: the measure of how long the extra connections may
    // take before the server is taken not to serve them.
    let opened_in = started.elapsed();
    let mut plan = tokio::select! {
        r = prepare(&mut src, &mut dst, &options, &progress) => r,
        _ = cancel.cancelled() => Err(cancelled()),
    };
    // The connections the workers use: on threads of their own when there are several.
    let mut handles = src.handles();
    handles.extend(dst.handles());
    let lanes = match &mut plan {
        Ok(p) if p.connections > 1 => match Lanes::start(&mut src, &mut dst, p.connections, &cancel, lane_wait(opened_in)).await {
            Ok(lanes) => Ok(Some(lanes)),
            // A server may serve fewer clients than multi-conn would allow (qemu-nbd serves
            // one unless told `--shared`; a read-only export counts as safe without the
            // flag), refusing the other connections or leaving them unanswered. With the
            // default number, the copy goes on with the connections it has: one per side, on
            // this runtime. A number asked for is kept to: the copy fails, saying why.
            Err(_) if options.connections.is_none() && !cancel.is_cancelled() => {
                p.connections = 1;
                Ok(None)
            }
            Err(e) => Err(e),
        },
        _ => Ok(None),
    };
    if let Ok(Some(_)) = &lanes {
        // The lanes' connections took the places of the planning ones in `src` and `dst`.
        handles.extend(src.handles());
        handles.extend(dst.handles());
    }
    let (result, lanes) = match (plan, lanes) {
        (Ok(plan), Ok(mut lanes)) => (run(src, dst, plan, &options, progress, cancel, started, lanes.as_mut()).await, lanes),
        (Err(e), _) | (_, Err(e)) => (Err(e), None),
    };
    close_all(handles, result.is_ok()).await;
    // Every connection is closed: the lanes' threads may end.
    drop(lanes);
    result
}

/// The threads of a copy with several connections: one per connection, as nbdcopy runs a
/// thread per connection. Each runs a single-threaded runtime that owns its connection to
/// each NBD side (their sockets and driver tasks) and runs that connection's worker, so a
/// reply wakes the thread that asked for it and nothing hops between threads. (On one
/// multi-threaded runtime, the tasks of two connections moved between its threads; measured
/// against nbdkit pattern with two connections to `null:`, the server then spent about a
/// fifth more CPU, its threads migrating between CPUs ten times as often as with nbdcopy.)
/// The connections that planned the copy stay idle until the end. On Linux a lane that finds
/// another on its CPU moves itself off it (see [`Placement`]).
///
/// A copy with one connection runs on the planning runtime: two threads for a file
/// destination (one writes the file while the other reads the socket), else one.
struct Lanes {
    lanes: Vec<Lane>,
}

struct Lane {
    job: Option<tokio::sync::oneshot::Sender<Arc<Job>>>,
    done: Option<tokio::sync::oneshot::Receiver<()>>,
    release: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Lane {
    fn drop(&mut self) {
        // Without a job or a release to wait for, the thread ends at once.
        self.job.take();
        self.release.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// An NBD side's URI and settings, for another connection to it.
/// The side's own connect timeout is not carried over: the extra connections have the wait
/// of [`Lanes::start`], and their failure must not read as the first connection's.
fn nbd_endpoint(side: &Opened) -> Option<(String, Box<Settings>)> {
    match (&side.side, &side.endpoint) {
        (Side::Nbd { .. }, Endpoint::Nbd { uri, settings }) => {
            let mut settings = settings.clone();
            settings.connect_timeout = None;
            Some((uri.clone(), settings))
        }
        _ => None,
    }
}

impl Lanes {
    /// Starts `count` lanes, each connecting to the NBD sides, and hands their connections
    /// to `src` and `dst` in lane order. On failure every connection made is closed and every
    /// thread has ended.
    ///
    /// A connection not made within `wait` (counted from the start) fails the start with
    /// `ETIMEDOUT`: the server is taken not to serve it.
    async fn start(src: &mut Opened, dst: &mut Opened, count: usize, cancel: &CancelToken, wait: Duration) -> Result<Lanes> {
        let deadline = tokio::time::Instant::now() + wait;
        let (src_at, dst_at) = (nbd_endpoint(src), nbd_endpoint(dst));
        let mut lanes = Lanes { lanes: Vec::with_capacity(count) };
        let mut connected = Vec::with_capacity(count);
        for index in 0..count {
            match Lane::spawn(index, src_at.clone(), dst_at.clone(), cancel.clone()) {
                Ok((lane, conns)) => {
                    lanes.lanes.push(lane);
                    connected.push(conns);
                }
                Err(e) => return Err(io_error(e, "starting the copy's threads")),
            }
        }
        let mut pairs = Vec::with_capacity(count);
        let mut first_error = None;
        for c in connected {
            match tokio::time::timeout_at(deadline, c).await {
                Ok(Ok(Ok(pair))) => pairs.push(pair),
                Ok(Ok(Err(e))) => first_error = first_error.or(Some(e)),
                Ok(Err(_)) => first_error = first_error.or(Some(Error::io(Errno::EIO, "a copy thread ended while connecting"))),
                Err(_) => {
                    let e = Error::io(Errno::ETIMEDOUT, format!("the server left another connection unanswered for {wait:?}"));
                    first_error = first_error.or(Some(e));
                }
            }
        }
        if let Some(e) = first_error {
            close_all(pairs.into_iter().flat_map(|(a, b)| a.into_iter().chain(b)).collect(), false).await;
            return Err(e);
        }
        let (mut from, mut to) = (Vec::new(), Vec::new());
        for (a, b) in pairs {
            from.extend(a);
            to.extend(b);
        }
        if let Side::Nbd { conns, .. } = &mut src.side {
            *conns = from;
        }
        if let Side::Nbd { conns, .. } = &mut dst.side {
            *conns = to;
        }
        Ok(lanes)
    }

    /// Starts every lane's worker on `job`; resolves when all of them have finished.
    async fn run(&mut self, job: &Arc<Job>) {
        let mut waiting = Vec::new();
        for lane in &mut self.lanes {
            match lane.job.take().map(|tx| tx.send(job.clone())) {
                Some(Ok(())) => waiting.extend(lane.done.take()),
                _ => job.fail(Error::io(Errno::EIO, "a copy thread ended before its work began")),
            }
        }
        for done in waiting {
            if done.await.is_err() {
                job.fail(Error::io(Errno::EIO, "a copy thread ended without finishing its work"));
            }
        }
    }
}

type LaneConnections = (Option<Handle>, Option<Handle>);

impl Lane {
    /// A lane's thread: connects to each NBD side, waits for the job, runs worker `index`,
    /// then keeps its runtime (and so its connections' drivers) running until released.
    fn spawn(
        index: usize,
        src_at: Option<(String, Box<Settings>)>,
        dst_at: Option<(String, Box<Settings>)>,
        cancel: CancelToken,
    ) -> std::io::Result<(Lane, tokio::sync::oneshot::Receiver<Result<LaneConnections>>)> {
        use tokio::sync::oneshot;
        let (conn_tx, conn_rx) = oneshot::channel::<Result<LaneConnections>>();
        let (job_tx, job_rx) = oneshot::channel::<Arc<Job>>();
        let (done_tx, done_rx) = oneshot::channel::<()>();
        let (release_tx, mut release_rx) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new().name("nbd-copy".into()).spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = conn_tx.send(Err(io_error(e, "starting a copy thread's runtime")));
                    return;
                }
            };
            runtime.block_on(async move {
                let connecting = async {
                    let src = match &src_at {
                        Some((uri, settings)) => Some(connect(uri, settings, true).await.map_err(|e| e.context("connecting to the source"))?),
                        None => None,
                    };
                    let dst = match &dst_at {
                        Some((uri, settings)) => match connect(uri, settings, false).await {
                            Ok(h) => Some(h),
                            Err(e) => {
                                if let Some(h) = src {
                                    h.close().await;
                                }
                                return Err(e.context("connecting to the destination"));
                            }
                        },
                        None => None,
                    };
                    Ok((src, dst))
                };
                let connected = tokio::select! {
                    r = connecting => r,
                    _ = cancel.cancelled() => Err(cancelled()),
                    _ = &mut release_rx => return,
                };
                if conn_tx.send(connected).is_err() {
                    return;
                }
                let job = tokio::select! {
                    j = job_rx => j.ok(),
                    // Released without a job: done (the receiver must not be polled again).
                    _ = &mut release_rx => return,
                };
                if let Some(job) = job {
                    worker(job, index).await;
                    let _ = done_tx.send(());
                }
                let _ = release_rx.await;
            });
            runtime.shutdown_timeout(std::time::Duration::from_secs(5));
        })?;
        let lane = Lane { job: Some(job_tx), done: Some(done_rx), release: Some(release_tx), thread: Some(thread) };
        Ok((lane, conn_rx))
    }
}

/// Keeps the lanes of one copy on different CPUs where it can (Linux; best effort).
///
/// The kernel tends to wake a thread on its waker's CPU, and a lane is woken by the server's
/// replies and wakes the server's threads in turn. Now and then two lanes end up sharing a
/// CPU for the rest of the copy, with a local server's threads dragged over to it and moved
/// back again and again. Measured against nbdkit pattern with two connections to `null:` on
/// two CPUs, 15 runs each way, alternating: without this check, both lanes ran on one CPU in
/// about half the runs, where the server migrated its threads 1,300 to 2,500 times (60 to
/// 600 in the other runs) and spent up to a third more CPU, and the copies took 530 to
/// 817 ms; with it, 563 to 630 ms. In 10 traced runs with it the lanes were on different
/// CPUs throughout (server migrations 270 to 840), for 6 to 12 moves per copy. nbdcopy, a
/// thread per connection as here, shows the same two kinds of run.
///
/// Each lane records the CPU it runs on as it sends a piece. A lane that finds a
/// lower-numbered lane of the same copy on its CPU moves itself to an allowed CPU that no
/// lane of the copy is on, at most once per [`Placement::INTERVAL`]: its affinity is set to
/// that CPU alone and at once set back to what it was (as read just before; a change made by
/// someone else in between is lost), so the kernel stays free to move it again. If setting
/// it back fails, the lane is allowed every CPU rather than left on one. Nothing moves when
/// every allowed CPU has a lane (more lanes than CPUs), with `NBD_CLIENT_COPY_PLACEMENT=off`
/// in the environment, or where the calls are missing (not Linux).
struct Placement {
    /// The CPU each lane last ran on (`usize::MAX`: not known, or the lane has finished).
    #[cfg_attr(not(any(target_os = "linux", target_os = "android")), allow(dead_code))]
    cpus: Vec<std::sync::atomic::AtomicUsize>,
}

impl Placement {
    /// The least time between two moves of one lane.
    #[cfg_attr(not(any(target_os = "linux", target_os = "android")), allow(dead_code))]
    const INTERVAL: std::time::Duration = std::time::Duration::from_millis(5);

    /// For `lanes` lanes, unless the environment turns it off.
    fn new(lanes: usize) -> Option<Placement> {
        if !placement_wanted(std::env::var_os("NBD_CLIENT_COPY_PLACEMENT").as_deref()) {
            return None;
        }
        Some(Placement { cpus: (0..lanes).map(|_| std::sync::atomic::AtomicUsize::new(usize::MAX)).collect() })
    }

    /// Lane `index`'s check, on its own thread; `moved_at` is when it last moved.
    #[cfg(any(target_os = "linux", target_os = "android"))]
    fn check(&self, index: usize, moved_at: &mut Option<Instant>) {
        // SAFETY: sched_getcpu only reports the calling thread's CPU.
        let Ok(cpu) = usize::try_from(unsafe { libc::sched_getcpu() }) else {
            return;
        };
        self.cpus[index].store(cpu, Ordering::Relaxed);
        if !crowded(index, &self.cpus) || moved_at.is_some_and(|t| t.elapsed() < Self::INTERVAL) {
            return;
        }
        *moved_at = Some(Instant::now());
        let Some(allowed) = affinity() else {
            return;
        };
        let lanes: Vec<usize> = self.cpus.iter().map(|c| c.load(Ordering::Relaxed)).collect();
        let Some(free) = free_cpu(&lanes, (0..CPU_SET_BITS).filter(|&c| cpu_isset(c, &allowed))) else {
            return;
        };
        let mut only = empty_cpu_set();
        // SAFETY: `free` < CPU_SET_BITS, the set's size in bits.
        unsafe { libc::CPU_SET(free, &mut only) };
        if set_affinity(&only) {
            self.cpus[index].store(free, Ordering::Relaxed);
            if !set_affinity(&allowed) {
                let mut all = empty_cpu_set();
                for c in 0..CPU_SET_BITS {
                    // SAFETY: c < CPU_SET_BITS.
                    unsafe { libc::CPU_SET(c, &mut all) };
                }
                // The kernel keeps only the CPUs the thread may use (its cpuset's).
                set_affinity(&all);
            }
        }
    }

    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    fn check(&self, _index: usize, _moved_at: &mut Option<Instant>) {}

    /// Lane `index` has finished: its CPU no longer counts as taken.
    fn leave(&self, index: usize) {
        self.cpus[index].store(usize::MAX, Ordering::Relaxed);
    }
}

/// Whether `NBD_CLIENT_COPY_PLACEMENT`'s value (`None`: unset) lets lanes move.
fn placement_wanted(value: Option<&std::ffi::OsStr>) -> bool {
    value.is_none_or(|v| v != "off")
}

/// Bits in a `cpu_set_t` (1024 with glibc and musl; musl's `CPU_SETSIZE` in the libc crate
/// says 128, fewer than its set holds).
#[cfg(any(target_os = "linux", target_os = "android"))]
const CPU_SET_BITS: usize = std::mem::size_of::<libc::cpu_set_t>() * 8;

#[cfg(any(target_os = "linux", target_os = "android"))]
fn empty_cpu_set() -> libc::cpu_set_t {
    // SAFETY: cpu_set_t is plain data, all zeroes being the empty set.
    unsafe { std::mem::zeroed() }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn cpu_isset(cpu: usize, set: &libc::cpu_set_t) -> bool {
    // SAFETY: callers pass cpu < CPU_SET_BITS.
    unsafe { libc::CPU_ISSET(cpu, set) }
}

/// The calling thread's affinity, or `None` when it cannot be read.
#[cfg(any(target_os = "linux", target_os = "android"))]
fn affinity() -> Option<libc::cpu_set_t> {
    let mut set = empty_cpu_set();
    // SAFETY: writes at most size_of::<cpu_set_t>() bytes into `set`, for the calling thread.
    let r = unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    (r == 0).then_some(set)
}

/// Sets the calling thread's affinity; whether that worked.
#[cfg(any(target_os = "linux", target_os = "android"))]
fn set_affinity(set: &libc::cpu_set_t) -> bool {
    // SAFETY: reads size_of::<cpu_set_t>() bytes from `set`, for the calling thread.
    unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), set) == 0 }
}

/// Whether lane `index` shares its CPU with a lower-numbered lane (which stays put).
#[cfg_attr(not(any(target_os = "linux", target_os = "android")), allow(dead_code))]
fn crowded(index: usize, lanes: &[std::sync::atomic::AtomicUsize]) -> bool {
    let cpu = lanes[index].load(Ordering::Relaxed);
    cpu != usize::MAX && lanes[..index].iter().any(|c| c.load(Ordering::Relaxed) == cpu)
}

/// The first of the `allowed` CPUs that no lane is on.
#[cfg_attr(not(any(target_os = "linux", target_os = "android")), allow(dead_code))]
fn free_cpu(lanes: &[usize], mut allowed: impl Iterator<Item = usize>) -> Option<usize> {
    allowed.find(|c| !lanes.contains(c))
}

/// What [`prepare`] settled.
struct Plan {
    connections: usize,
    request_size: u32,
    sparse: Option<u64>,
    destination_is_zero: bool,
}

/// Sizes the destination, checks sizes, settles the numbers and opens the extra connections.
async fn prepare(src: &mut Opened, dst: &mut Opened, options: &Options, progress: &Progress) -> Result<Plan> {
    let size = src.size;
    progress.bytes_total.store(size, Ordering::Relaxed);
    let mut destination_is_zero = options.destination_is_zero;
    if let Side::File(f) = &dst.side {
        if f.regular {
            // As nbdcopy: an ordinary file is emptied and sized to the source, so it reads
            // as zeroes whatever it held.
            f.file.set_len(0).and_then(|()| f.file.set_len(size)).map_err(|e| io_error(e, "truncating the destination"))?;
            dst.size = size;
            destination_is_zero = true;
        }
    }
    if dst.size < size {
        return Err(Error::usage(
            Errno::ENOSPC,
            format!("the destination ({} bytes) is smaller than the source ({size} bytes)", dst.size),
        ));
    }
    // As nbdcopy: 4 by default, but no more than there are CPUs to run them (nbdcopy
    // runs a thread per connection); more only add contention on a small machine.
    let cpus = cpus();
    let mut connections = options.connections.unwrap_or(4.min(cpus));
    if !src.multi_conn_safe(true) || !dst.multi_conn_safe(false) {
        connections = 1;
    }
    let request_size = options.request_size.max(src.preferred).max(dst.preferred).min(src.maximum).min(dst.maximum);
    // Every request must be a whole number of both servers' minimum blocks (powers of two,
    // so the larger is a multiple of the other); offsets are multiples of the size.
    let minimum = src.minimum.max(dst.minimum);
    let most = src.maximum.min(dst.maximum);
    if minimum > most {
        return Err(Error::usage(
            Errno::EINVAL,
            format!(
                "the servers' block sizes do not fit together: one needs requests of at least {minimum} \
                 bytes, the other takes at most {most}"
            ),
        ));
    }
    let request_size = (request_size / minimum * minimum).max(minimum);
    let sparse = options.sparse.map(|s| s.max(dst.preferred).max(1) as u64);
    Ok(Plan { connections, request_size, sparse, destination_is_zero })
}

#[allow(clippy::too_many_arguments)]
async fn run(
    src: Opened,
    dst: Opened,
    plan: Plan,
    options: &Options,
    progress: Arc<Progress>,
    cancel: CancelToken,
    started: Instant,
    lanes: Option<&mut Lanes>,
) -> Result<Report> {
    let job = Arc::new(Job {
        size: src.size,
        src,
        dst,
        request_size: u64::from(plan.request_size),
        sparse: plan.sparse,
        requests: options.requests,
        allocated: options.allocated,
        destination_is_zero: plan.destination_is_zero,
        next: AtomicU64::new(0),
        stop: cancel,
        first_error: Mutex::new(None),
        progress,
        data_bytes: AtomicU64::new(0),
        pool: Arc::new(Pool::default()),
        file_calls: Semaphore::new(cpus().max(2)),
        placement: if lanes.is_some() { Placement::new(plan.connections) } else { None },
    });
    // On abort (or a first error), closing the connections fails whatever is on the wire.
    let watch = {
        let job = job.clone();
        tokio::spawn(async move {
            job.stop.cancelled().await;
            for h in job.src.handles().into_iter().chain(job.dst.handles()) {
                h.close_in_background();
            }
        })
    };
    let result = drive(&job, plan.connections, options.flush, lanes).await;
    watch.abort();
    result?;
    Ok(Report {
        bytes: job.size,
        data_bytes: job.data_bytes.load(Ordering::Relaxed),
        zero_bytes: job.progress.bytes_zero.load(Ordering::Relaxed),
        seconds: started.elapsed().as_secs_f64(),
        connections: plan.connections,
        request_size: plan.request_size,
    })
}

async fn drive(job: &Arc<Job>, connections: usize, flush: bool, lanes: Option<&mut Lanes>) -> Result<()> {
    if let Some(lanes) = lanes {
        lanes.run(job).await;
    } else {
        let mut workers = JoinSet::new();
        for i in 0..connections {
            workers.spawn(worker(job.clone(), i));
        }
        while let Some(r) = workers.join_next().await {
            if let Err(e) = r {
                job.fail(Error::io(Errno::EIO, format!("copy worker: {e}")));
            }
        }
    }
    if let Some(e) = job.first_error.lock().unwrap_or_else(|p| p.into_inner()).take() {
        return Err(e);
    }
    if job.stop.is_cancelled() {
        return Err(cancelled());
    }
    if !flush {
        return Ok(());
    }
    match &job.dst.side {
        Side::Nbd { conns, flags, .. } if flags & FLAG_SEND_FLUSH != 0 => {
            for h in conns {
                h.flush(0, None).await.map_err(|e| e.context("flushing the destination"))?;
            }
            Ok(())
        }
        Side::File(f) => {
            let f = f.clone();
            tokio::task::spawn_blocking(move || f.file.sync_all())
                .await
                .map_err(|e| Error::io(Errno::EIO, format!("flush task: {e}")))?
                .map_err(|e| io_error(e, "flushing the destination"))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_runs_split_at_aligned_granules() {
        let mut buf = vec![0u8; 16384];
        buf[5000] = 1;
        // Read at 1024: 3072 bytes up to the first aligned granule count as data, and so
        // does the granule holding byte 5000; the tail past the last whole granule too.
        assert_eq!(zero_runs(&buf, 1024, 4096), vec![(0, 7168, false), (7168, 8192, true), (15360, 1024, false)]);
        assert_eq!(zero_runs(&buf, 0, 4096), vec![(0, 4096, true), (4096, 4096, false), (8192, 8192, true)]);
        assert_eq!(zero_runs(&[], 0, 4096), vec![]);
    }

    #[test]
    fn only_zeroes_needs_every_overlapping_extent_zero() {
        let e = [
            Extent { start: 0, end: 100, zero: true },
            Extent { start: 100, end: 200, zero: false },
            Extent { start: 200, end: 400, zero: true },
        ];
        let mut k = 0;
        assert!(only_zeroes(&e, &mut k, 0, 100));
        assert!(!only_zeroes(&e, &mut k, 50, 100));
        assert!(!only_zeroes(&e, &mut k, 150, 100));
        assert!(only_zeroes(&e, &mut k, 200, 200));
        assert_eq!(k, 2);
    }

    #[test]
    fn lanes_move_off_a_shared_cpu_to_a_free_one() {
        use std::sync::atomic::AtomicUsize;
        let lanes = |cpus: &[usize]| cpus.iter().map(|&c| AtomicUsize::new(c)).collect::<Vec<_>>();
        // Lane 0 never moves; lane 1 moves when on lane 0's CPU; lane 2 when on lane 0's or 1's.
        assert!(!crowded(0, &lanes(&[3, 3])));
        assert!(crowded(1, &lanes(&[3, 3])));
        assert!(!crowded(1, &lanes(&[3, 4])));
        assert!(crowded(2, &lanes(&[0, 5, 5])));
        assert!(!crowded(1, &lanes(&[0, 5, 5])));
        // A lane whose CPU is not yet known does not count as sharing.
        assert!(!crowded(1, &lanes(&[usize::MAX, 2])));
        // Free CPUs: allowed ones that no lane is on, in order; none when every one has a lane.
        assert_eq!(free_cpu(&[1, 1], [0, 1, 2, 3].into_iter()), Some(0));
        assert_eq!(free_cpu(&[0, 0], [0, 1].into_iter()), Some(1));
        assert_eq!(free_cpu(&[0, 1], [0, 1].into_iter()), None);
        assert_eq!(free_cpu(&[2, 2], [2].into_iter()), None);
        // A finished lane leaves its CPU: nobody is crowded by it any more.
        let p = Placement { cpus: lanes(&[4, 4]) };
        assert!(crowded(1, &p.cpus));
        p.leave(0);
        assert!(!crowded(1, &p.cpus));
        let p = Placement { cpus: lanes(&[4, 5]) };
        p.leave(0);
        let taken: Vec<usize> = p.cpus.iter().map(|c| c.load(Ordering::Relaxed)).collect();
        assert_eq!(free_cpu(&taken, 4..6), Some(4));
        // Only `off` turns moving off.
        assert!(placement_wanted(None));
        assert!(placement_wanted(Some("on".as_ref())));
        assert!(!placement_wanted(Some("off".as_ref())));
    }

    /// A lane that moves ends with the affinity it had, whether it moved or not (there may be
    /// no other CPU, or the thread may move before the check reads its CPU).
    #[cfg(any(target_os = "linux", target_os = "android"))]
    #[test]
    fn a_move_leaves_the_affinity_as_it_was() {
        std::thread::spawn(|| {
            let before = affinity().expect("the affinity can be read");
            let p = Placement { cpus: (0..2).map(|_| std::sync::atomic::AtomicUsize::new(usize::MAX)).collect() };
            // Lane 0 claims this thread's CPU, so lane 1 (this thread) is crowded there.
            // SAFETY: sched_getcpu only reports the calling thread's CPU.
            let cpu = unsafe { libc::sched_getcpu() } as usize;
            p.cpus[0].store(cpu, Ordering::Relaxed);
            let mut moved_at = None;
            p.check(1, &mut moved_at);
            let after = affinity().expect("the affinity can be read");
            assert!((0..CPU_SET_BITS).all(|c| cpu_isset(c, &before) == cpu_isset(c, &after)));
            // Crowded again just after a move: within the interval it stays where it is.
            let first = Some(Instant::now());
            moved_at = first;
            // SAFETY: as above.
            p.cpus[0].store(unsafe { libc::sched_getcpu() } as usize, Ordering::Relaxed);
            p.check(1, &mut moved_at);
            assert_eq!(moved_at, first);
        })
        .join()
        .expect("the test thread");
    }

    #[test]
    fn is_zero_sees_any_byte() {
        let mut b = vec![0u8; 4099];
        assert!(is_zero(&b));
        b[4098] = 1;
        assert!(!is_zero(&b));
        b[4098] = 0;
        b[1] = 1;
        assert!(!is_zero(&b[1..]));
    }
}
