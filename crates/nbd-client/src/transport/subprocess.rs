//! Servers run as child processes: libnbd's `nbd_connect_command` (the connection is the
//! child's stdin and stdout) and `nbd_connect_systemd_socket_activation` (the child is
//! handed a listening socket as fd 3 with the `LISTEN_*` environment of the systemd
//! socket activation protocol, and we connect to it).
//!
//! Both return the connected socket, for [`Handle::connect_socket`](crate::Handle), and a
//! [`Child`] that owns the process. The child is started with:
//!
//! - exactly fds 0, 1 and 2 open (and 3, the listening socket, under socket activation):
//!   every other fd of this process is marked close-on-exec in the child before `exec`,
//!   whoever opened it;
//! - stdin and stdout on the NBD socket (command mode), or stdin on `/dev/null` and stdout
//!   with stderr (socket activation);
//! - stderr on a pipe this library reads: each chunk is copied to this process's stderr as
//!   it arrives (so the server's messages are still seen, as with libnbd, whose child
//!   inherits stderr) and the last few KiB are kept for error reports
//!   ([`Child::stderr_tail`], [`Child::report`]);
//! - an empty signal mask and `SIGPIPE` at its default action (Node ignores it);
//! - its own process group (so a Ctrl-C meant for the application does not reach it, and
//!   ending it also ends any process it started in its group);
//! - on Linux, `SIGTERM` as its parent-death signal: if this whole process dies, even by
//!   `SIGKILL`, the server is told to exit too (as nbdkit's `--exit-with-parent` does).
//!
//! The program is looked up in `PATH` as `execvp` does (without `execvp`'s retry through
//! `/bin/sh` for a file that is not a valid executable: that is reported as `ENOEXEC`).
//! A program that cannot be executed fails the `spawn_*` call itself with the errno of
//! `execve` (`ENOENT`, `EACCES`, `ENOEXEC`, ...), not a later end of file.
//!
//! Each child has a watcher thread that started it and reaps it the moment it exits, so
//! there are no zombies, and another thread that reads its output. Dropping the [`Child`]
//! ends the process without blocking the caller (see [`Child`]).

use std::ffi::{c_char, CString, OsStr};
use std::fs::File;
use std::io::{self, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nbd_proto::{Errno, Error, Result};

use crate::transport::io_error;

/// How much of the child's output is kept for error reports.
const OUTPUT_KEPT: usize = 4096;
/// How much of the kept output goes into [`Child::report`].
const OUTPUT_REPORTED: usize = 1024;
/// After the [`Child`] of a command-mode server drops, how long the server gets to exit by
/// itself (it sees end of file once the socket is closed) before it is sent `SIGTERM`.
const EOF_GRACE: Duration = Duration::from_secs(2);
/// After `SIGTERM`, how long before `SIGKILL`.
const TERM_GRACE: Duration = Duration::from_secs(2);
/// How long a forked child may take to exec, or to report why it could not, before it is
/// killed. A child stuck between fork and exec would otherwise hold its connect up for ever,
/// beyond any timeout's reach (the wait is on a blocking thread); seen once under qemu-user,
/// whose own locks a fork from a many-threaded process can inherit held.
const EXEC_REPORT_LIMIT: Duration = Duration::from_secs(60);
/// Stack size of the helper threads: they read, write, fork and wait, nothing more.
const THREAD_STACK: usize = 128 * 1024;
/// The fd the systemd protocol passes the first socket on.
const LISTEN_FD: RawFd = 3;
/// Room for a pid in decimal (`u32::MAX` has 10 digits) and its terminating NUL.
const PID_ROOM: usize = 11;

// ---- public API ----

/// `nbd_connect_command`: runs `argv` with a connected socket as its stdin and stdout, for
/// servers that speak NBD on stdin/stdout like `nbdkit -s` or `nbd-server` with port 0.
/// Returns our end of the connection and the running child.
///
/// Fails with `EINVAL` for an empty `argv` or one with a NUL byte, and with the errno of
/// `execve` when the program cannot be run (`ENOENT`, `EACCES`, `ENOEXEC`, ...). A server
/// that starts and then fails shows up later, as end of file during the handshake: the
/// caller should then add [`Child::failure_report`] to its error.
pub fn spawn_command(argv: &[String]) -> Result<(OwnedFd, Child)> {
    let plan = ExecRequest::new(argv, None)?;
    let (ours, theirs) = socketpair()?;
    let stdin = above_stdio(theirs)?;
    let stdout = above_stdio(
        stdin
            .try_clone()
            .map_err(|e| io_error("duplicating the server's end of the socket", e))?,
    )?;
    let stdio = Stdio {
        stdin,
        stdout: Some(stdout),
        listener: None,
    };
    let child = launch(plan, Mode::Command, stdio)?;
    Ok((ours, child))
}

/// `nbd_connect_systemd_socket_activation`: runs `argv` with a listening Unix socket as
/// fd 3 and `LISTEN_PID` (the child's own pid) and `LISTEN_FDS=1` in its environment, then
/// connects to that socket. For qemu-nbd (e.g. `["qemu-nbd", "-f", "qcow2", path]`), nbdkit
/// and other servers that support socket activation. `LISTEN_FDNAMES` is `unknown`
/// (libnbd's default); see [`spawn_socket_activation_named`].
///
/// The socket lives in a private directory under `$TMPDIR` (or `/tmp` when that path would
/// be too long for a socket address); the directory and socket are removed as soon as we are
/// connected, so nothing is left behind however the process ends. Errors as
/// [`spawn_command`].
pub fn spawn_socket_activation(argv: &[String]) -> Result<(OwnedFd, Child)> {
    spawn_socket_activation_named(argv, "")
}

/// [`spawn_socket_activation`] with `LISTEN_FDNAMES=name` (libnbd's
/// `nbd_set_socket_activation_name`), which some servers such as qemu-storage-daemon use to
/// tell sockets apart. An empty `name` means `unknown`. A name must be at most
/// 255 printable ASCII characters other than `:` (systemd's rule), else `EINVAL`.
pub fn spawn_socket_activation_named(argv: &[String], name: &str) -> Result<(OwnedFd, Child)> {
    check_socket_name(name)?;
    let plan = ExecRequest::new(argv, Some(name))?;
    let dir = TempDir::new()?;
    let path = dir.path.join("sock");
    let listener = std::os::unix::net::UnixListener::bind(&path)
        .map_err(|e| io_error(&format!("binding the activation socket {}", path.display()), e))?;
    // Connect before the server exists: the connection waits in the listen queue until the
    // server accepts it. If the server dies first, the queue goes with the last copy of
    // the listening socket and our end sees a reset, so the handshake fails promptly and
    // the caller can ask the Child why. Nobody else needs the path after this.
    let stream = std::os::unix::net::UnixStream::connect(&path).map_err(|e| {
        io_error(&format!("connecting to the activation socket {}", path.display()), e)
    })?;
    drop(dir);
    let listener = above_stdio(OwnedFd::from(listener))?;
    let null = File::options()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(|e| io_error("opening /dev/null", e))?;
    let stdio = Stdio {
        stdin: above_stdio(OwnedFd::from(null))?,
        stdout: None,
        listener: Some(listener),
    };
    let child = launch(plan, Mode::Activation, stdio)?;
    Ok((OwnedFd::from(stream), child))
}

/// A server process started by [`spawn_command`] or [`spawn_socket_activation`].
///
/// Dropping it ends the process without blocking: a background thread waits for a
/// command-mode server to exit by itself (it sees end of file once its socket is closed,
/// so close the socket before or together with the `Child`) for up to two seconds, then
/// sends `SIGTERM`, waits two more seconds, then sends `SIGKILL`. A socket-activated server
/// (which may serve other connections and never see end of file) is sent `SIGTERM` at once,
/// as libnbd does on `nbd_close`. The signals go to the child's process group, so helpers
/// it started there end with it. The process is reaped the moment it exits whatever
/// happens, so it never lingers as a zombie.
pub struct Child {
    watched: Arc<Watched>,
    mode: Mode,
}

impl Child {
    /// The process id.
    pub fn pid(&self) -> u32 {
        self.watched.pid as u32
    }

    /// The program the child runs (`argv[0]`).
    pub fn program(&self) -> &str {
        &self.watched.program
    }

    /// True once the process has exited (and been reaped). Does not block.
    pub fn has_exited(&self) -> bool {
        !matches!(self.watched.lock().exit, Exit::Running)
    }

    /// How the process ended, if it has. `None` while it runs, and also in the unusual case
    /// that it has ended but its status was collected by someone else (a process that sets
    /// `SIGCHLD` to `SIG_IGN` has its children reaped by the kernel); see
    /// [`Child::has_exited`]. Does not block.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        match self.watched.lock().exit {
            Exit::Exited(status) => Some(status),
            _ => None,
        }
    }

    /// The last few KiB (at most 4096 bytes) the process wrote to stderr (and, under socket
    /// activation, stdout), starting at a line boundary when older output was dropped, with
    /// invalid UTF-8 replaced and trailing whitespace trimmed. Empty if it wrote nothing.
    pub fn stderr_tail(&self) -> String {
        tail_text(&self.watched.lock().output, OUTPUT_KEPT)
    }

    /// One sentence on the state of the process for an error message, from what is known
    /// now, e.g. `the server process nbdkit (pid 123) exited with status 1: nbdkit: error:
    /// cannot open plugin ...`. `None` while the process runs and has written nothing.
    /// Does not block; after a failed handshake prefer [`Child::failure_report`], which
    /// first gives the process a moment to finish exiting and writing.
    pub fn report(&self) -> Option<String> {
        let state = self.watched.lock();
        let who = format!("the server process {} (pid {})", self.watched.program, self.watched.pid);
        let what = match state.exit {
            Exit::Running => None,
            Exit::Exited(status) => Some(describe_status(status)),
            Exit::Lost => Some("has exited".to_string()),
        };
        let output = tail_text(&state.output, OUTPUT_REPORTED);
        match (what, output.is_empty()) {
            (None, true) => None,
            (None, false) => Some(format!("{who} is still running; its last output: {output}")),
            (Some(what), true) => Some(format!("{who} {what}")),
            (Some(what), false) => Some(format!("{who} {what}: {output}")),
        }
    }

    /// [`Child::report`] after waiting up to `within` for the process to exit and its
    /// output to end: a server that closes the connection because it failed to start is
    /// usually still writing its last message and exiting when the client sees end of
    /// file. Returns as soon as both have happened. Needs a tokio runtime (for the timer).
    pub async fn failure_report(&self, within: Duration) -> Option<String> {
        let mut events = self.watched.events.subscribe();
        let settled = async {
            loop {
                {
                    let state = self.watched.lock();
                    if !matches!(state.exit, Exit::Running) && state.output.closed {
                        return;
                    }
                }
                if events.changed().await.is_err() {
                    return;
                }
            }
        };
        let _ = tokio::time::timeout(within, settled).await;
        self.report()
    }
}

impl std::fmt::Debug for Child {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Child")
            .field("pid", &self.watched.pid)
            .field("program", &self.watched.program)
            .field("exit", &self.watched.lock().exit)
            .finish()
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if self.has_exited() {
            return;
        }
        let first_wait = match self.mode {
            Mode::Command => EOF_GRACE,
            Mode::Activation => Duration::ZERO,
        };
        let watched = Arc::clone(&self.watched);
        let ender = std::thread::Builder::new()
            .name("nbd-server-end".into())
            .stack_size(THREAD_STACK)
            .spawn(move || watched.end(first_wait));
        if ender.is_err() {
            // No thread to wait with: end it now; the watcher thread still reaps it.
            self.watched.signal(libc::SIGKILL);
        }
    }
}

// ---- the running child ----

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Command,
    Activation,
}

#[derive(Debug, Clone, Copy)]
enum Exit {
    Running,
    Exited(ExitStatus),
    /// Gone, but its status was collected elsewhere (waitpid said ECHILD).
    Lost,
}

#[derive(Default)]
struct Output {
    kept: Vec<u8>,
    /// Older output was dropped to stay within OUTPUT_KEPT.
    truncated: bool,
    /// End of file: every writer (the child and anything it passed its stderr to) is gone.
    closed: bool,
}

struct WatchedState {
    exit: Exit,
    output: Output,
}

/// The process as the Child, its watcher thread and its output thread see it. The process is only
/// ever reaped with `state` locked, and only signalled with `state` locked and `exit`
/// still `Running`: so a signal can never reach another process that reused the pid.
struct Watched {
    pid: libc::pid_t,
    program: String,
    state: Mutex<WatchedState>,
    /// Notified whenever `state` changes (for threads).
    changed: Condvar,
    /// Bumped whenever `state` changes (for async waiters).
    events: tokio::sync::watch::Sender<u64>,
}

impl Watched {
    fn lock(&self) -> MutexGuard<'_, WatchedState> {
        // A panic while holding the lock cannot leave WatchedState inconsistent (plain fields).
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn notify(&self) {
        self.changed.notify_all();
        self.events.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Reaps the process if it has exited; never blocks. Call with the lock held.
    fn reap(&self, state: &mut WatchedState) {
        while matches!(state.exit, Exit::Running) {
            let mut status: libc::c_int = 0;
            // SAFETY: plain waitpid on our own child.
            let rc = unsafe { libc::waitpid(self.pid, &mut status, libc::WNOHANG) };
            if rc == self.pid {
                state.exit = Exit::Exited(ExitStatus::from_raw(status));
            } else if rc == 0 {
                return;
            } else {
                match io::Error::last_os_error().raw_os_error() {
                    Some(libc::EINTR) => continue,
                    _ => state.exit = Exit::Lost,
                }
            }
        }
    }

    /// Sends `signal` if the process has not been reaped yet.
    fn signal(&self, signal: libc::c_int) {
        let mut state = self.lock();
        self.reap(&mut state);
        if matches!(state.exit, Exit::Running) {
            // SAFETY: getpgid and kill on our own child's pid, which cannot have been
            // reused: we hold the lock and it is not reaped. The child made itself a
            // process group leader, so its group id is its pid (unless it moved itself
            // elsewhere), and signalling the group also ends what it started there.
            unsafe {
                if libc::getpgid(self.pid) == self.pid {
                    libc::kill(-self.pid, signal);
                } else {
                    libc::kill(self.pid, signal);
                }
            }
        }
    }

    /// Waits up to `timeout` for the process to exit; true if it has.
    fn wait_exit(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut state = self.lock();
        loop {
            if !matches!(state.exit, Exit::Running) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            state = match self.changed.wait_timeout(state, deadline - now) {
                Ok((guard, _)) => guard,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
    }

    /// The end of a dropped Child (runs on its own thread).
    fn end(&self, first_wait: Duration) {
        if self.wait_exit(first_wait) {
            return;
        }
        self.signal(libc::SIGTERM);
        if self.wait_exit(TERM_GRACE) {
            return;
        }
        self.signal(libc::SIGKILL);
    }

    /// The watcher thread, once the child runs: waits for it to exit and reaps it.
    fn reap_on_exit(&self) {
        loop {
            // Wait without reaping (WNOWAIT), so that reaping happens under the lock.
            let mut info = MaybeUninit::<libc::siginfo_t>::zeroed();
            // SAFETY: info is a writable siginfo_t.
            let rc = unsafe {
                libc::waitid(
                    libc::P_PID,
                    self.pid as libc::id_t,
                    info.as_mut_ptr(),
                    libc::WEXITED | libc::WNOWAIT,
                )
            };
            let interrupted = rc != 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EINTR);
            if interrupted {
                continue;
            }
            let mut state = self.lock();
            self.reap(&mut state);
            if !matches!(state.exit, Exit::Running) {
                drop(state);
                self.notify();
                return;
            }
            drop(state);
            if rc != 0 {
                // waitid refused while the child runs (not expected): do not spin.
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    /// The output thread: copies the child's output to our stderr and keeps its tail.
    fn collect_output(&self, pipe: OwnedFd) {
        let mut pipe = File::from(pipe);
        let mut buf = vec![0u8; 4096];
        loop {
            match pipe.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    let chunk = &buf[..n];
                    // Our stderr may be closed or full of trouble; the child must not care.
                    let _ = io::stderr().write_all(chunk);
                    let mut state = self.lock();
                    let out = &mut state.output;
                    out.kept.extend_from_slice(chunk);
                    if out.kept.len() > OUTPUT_KEPT {
                        let excess = out.kept.len() - OUTPUT_KEPT;
                        out.kept.drain(..excess);
                        out.truncated = true;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
        self.lock().output.closed = true;
        self.notify();
    }
}

fn describe_status(status: ExitStatus) -> String {
    if let Some(code) = status.code() {
        return format!("exited with status {code}");
    }
    if let Some(signal) = status.signal() {
        let name = match signal {
            libc::SIGHUP => " (SIGHUP)",
            libc::SIGINT => " (SIGINT)",
            libc::SIGQUIT => " (SIGQUIT)",
            libc::SIGILL => " (SIGILL)",
            libc::SIGABRT => " (SIGABRT)",
            libc::SIGBUS => " (SIGBUS)",
            libc::SIGFPE => " (SIGFPE)",
            libc::SIGKILL => " (SIGKILL)",
            libc::SIGSEGV => " (SIGSEGV)",
            libc::SIGPIPE => " (SIGPIPE)",
            libc::SIGTERM => " (SIGTERM)",
            _ => "",
        };
        let core = if status.core_dumped() { ", core dumped" } else { "" };
        return format!("was killed by signal {signal}{name}{core}");
    }
    format!("ended ({status})")
}

/// The last `max` bytes of the output as text, from a line boundary when older output
/// was cut off.
fn tail_text(output: &Output, max: usize) -> String {
    let start = output.kept.len().saturating_sub(max);
    let mut bytes = &output.kept[start..];
    let mid_line = if start > 0 {
        output.kept[start - 1] != b'\n'
    } else {
        output.truncated
    };
    if mid_line {
        if let Some(nl) = bytes.iter().position(|&b| b == b'\n') {
            if nl + 1 < bytes.len() {
                bytes = &bytes[nl + 1..];
            }
        }
    }
    String::from_utf8_lossy(bytes).trim_end().to_string()
}

// ---- starting the child ----

/// The child's fds for stdin, stdout (None: the output pipe, with stderr) and (socket
/// activation) fd 3, all at 4 or above so that placing them on 0..=3 in the child never
/// overwrites one still to be placed.
struct Stdio {
    stdin: OwnedFd,
    stdout: Option<OwnedFd>,
    listener: Option<OwnedFd>,
}

/// Everything `execve` needs, prepared before `fork` so that the child allocates nothing.
struct ExecRequest {
    program: String,
    /// Paths to try in order (one, or one per `PATH` entry).
    candidates: Vec<CString>,
    argv: Vec<CString>,
    env: Vec<CString>,
    /// `LISTEN_PID=` with room for the digits, filled in by the child (socket activation).
    pid_entry: Option<Vec<u8>>,
    searched_path: bool,
}

/// Raw pointers into a [`ExecRequest`], for the child. Built after the plan stopped moving data
/// around (its buffers are heap allocations that stay put while the plan lives).
struct ExecPointers {
    candidates: Vec<*const c_char>,
    argv: Vec<*const c_char>,
    envp: Vec<*const c_char>,
    /// Where the child writes its pid in decimal, with PID_ROOM bytes of room.
    pid_digits: *mut u8,
}

fn check_argv(argv: &[String]) -> Result<Vec<CString>> {
    let Some(program) = argv.first() else {
        return Err(Error::usage(
            Errno::EINVAL,
            "the command is empty: argv needs at least the program to run",
        ));
    };
    if program.is_empty() {
        return Err(Error::usage(Errno::EINVAL, "the program to run (argv[0]) is an empty string"));
    }
    argv.iter()
        .enumerate()
        .map(|(i, arg)| {
            CString::new(arg.as_bytes()).map_err(|_| {
                Error::usage(Errno::EINVAL, format!("argv[{i}] contains a NUL byte"))
            })
        })
        .collect()
}

pub(crate) fn check_socket_name(name: &str) -> Result<()> {
    if name.len() > 255 {
        return Err(Error::usage(
            Errno::EINVAL,
            format!("the socket activation name is {} bytes long; at most 255 are allowed", name.len()),
        ));
    }
    if let Some(c) = name.chars().find(|&c| (!c.is_ascii_graphic() && c != ' ') || c == ':') {
        return Err(Error::usage(
            Errno::EINVAL,
            format!("the socket activation name {name:?} contains {c:?}; only printable ASCII other than ':' is allowed"),
        ));
    }
    Ok(())
}

impl ExecRequest {
    /// `activation`: None for command mode, else the socket name ("" for none).
    fn new(argv: &[String], activation: Option<&str>) -> Result<ExecRequest> {
        let argv_c = check_argv(argv)?;
        let program = argv[0].clone();
        let path_var = std::env::var_os("PATH");
        let (candidates, searched_path) = exec_candidates(&program, path_var.as_deref());
        let mut env = Vec::new();
        let mut pid_entry = None;
        if let Some(name) = activation {
            let mut entry = b"LISTEN_PID=".to_vec();
            entry.resize(entry.len() + PID_ROOM, 0);
            pid_entry = Some(entry);
            env.push(CString::new("LISTEN_FDS=1").expect("no NUL"));
            // systemd's name for a socket nobody named, which libnbd passes too.
            let name = if name.is_empty() { "unknown" } else { name };
            env.push(CString::new(format!("LISTEN_FDNAMES={name}")).expect("checked: no NUL"));
        }
        for (key, value) in std::env::vars_os() {
            let ours = ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"];
            if activation.is_some() && ours.iter().any(|k| key.as_bytes() == k.as_bytes()) {
                continue;
            }
            let mut entry = key.as_bytes().to_vec();
            entry.push(b'=');
            entry.extend_from_slice(value.as_bytes());
            // The environment cannot hold NUL bytes; skip rather than fail if it somehow does.
            if let Ok(entry) = CString::new(entry) {
                env.push(entry);
            }
        }
        Ok(ExecRequest {
            program,
            candidates,
            argv: argv_c,
            env,
            pid_entry,
            searched_path,
        })
    }

    fn pointers(&mut self) -> ExecPointers {
        let strings = |v: &[CString]| -> Vec<*const c_char> {
            v.iter().map(|s| s.as_ptr()).chain(std::iter::once(std::ptr::null())).collect()
        };
        let mut envp = Vec::with_capacity(self.env.len() + 2);
        let mut pid_digits = std::ptr::null_mut();
        if let Some(entry) = self.pid_entry.as_mut() {
            let start = entry.as_mut_ptr();
            envp.push(start.cast_const().cast::<c_char>());
            // SAFETY: the entry is "LISTEN_PID=" followed by PID_ROOM bytes.
            pid_digits = unsafe { start.add(entry.len() - PID_ROOM) };
        }
        envp.extend(self.env.iter().map(|s| s.as_ptr()));
        envp.push(std::ptr::null());
        ExecPointers {
            candidates: self.candidates.iter().map(|s| s.as_ptr()).collect(),
            argv: strings(&self.argv),
            envp,
            pid_digits,
        }
    }
}

/// The paths `execvp` would try for `program`, and whether they came from a `PATH` search.
fn exec_candidates(program: &str, path: Option<&OsStr>) -> (Vec<CString>, bool) {
    if program.contains('/') {
        return (vec![CString::new(program).expect("checked: no NUL")], false);
    }
    // glibc's default search path when PATH is unset.
    let path = path.map(|p| p.as_bytes()).unwrap_or(b"/bin:/usr/bin");
    let candidates = path
        .split(|&b| b == b':')
        .map(|dir| {
            // An empty entry means the current directory.
            let mut full = if dir.is_empty() { b".".to_vec() } else { dir.to_vec() };
            if !full.ends_with(b"/") {
                full.push(b'/');
            }
            full.extend_from_slice(program.as_bytes());
            full
        })
        .filter_map(|full| CString::new(full).ok())
        .collect();
    (candidates, true)
}

/// Moves `fd` to a number of 4 or more (keeping close-on-exec), so that the child's
/// `dup2` onto 0..=3 cannot overwrite it.
fn above_stdio(fd: OwnedFd) -> Result<OwnedFd> {
    if fd.as_raw_fd() > LISTEN_FD {
        return Ok(fd);
    }
    // SAFETY: fcntl on an fd we own; the result, if valid, is a new fd we then own.
    let moved = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, LISTEN_FD + 1) };
    if moved < 0 {
        return Err(io_error("moving a descriptor above the standard ones", io::Error::last_os_error()));
    }
    // SAFETY: moved is a new open fd nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(moved) })
}

fn socketpair() -> Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: fds has room for the two fds socketpair writes.
    #[cfg(any(target_os = "linux", target_os = "android"))]
    let rc = unsafe {
        libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0, fds.as_mut_ptr())
    };
    // No SOCK_CLOEXEC on macOS: close-on-exec is set right after (as std does there).
    // SAFETY: as above.
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let rc = unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, fds.as_mut_ptr()) };
    if rc != 0 {
        return Err(io_error("creating a socket pair for the server", io::Error::last_os_error()));
    }
    // SAFETY: both fds are new and ours.
    let pair = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    set_cloexec_late(&pair).map_err(|e| io_error("creating a socket pair for the server", e))?;
    Ok(pair)
}

fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: fds has room for the two fds pipe2 writes.
    #[cfg(any(target_os = "linux", target_os = "android"))]
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    // No pipe2 on macOS: close-on-exec is set right after.
    // SAFETY: as above.
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let rc = unsafe { libc::pipe(fds.as_mut_ptr()) };
    if rc != 0 {
        return Err(io_error("creating a pipe for the server's output", io::Error::last_os_error()));
    }
    // SAFETY: both fds are new and ours.
    let pair = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    set_cloexec_late(&pair).map_err(|e| io_error("creating a pipe for the server's output", e))?;
    Ok(pair)
}

/// Where descriptors cannot be created close-on-exec (macOS), marks a new pair so. A child
/// another thread forks in between may inherit them until its exec; ours never do, since
/// the child marks everything above its standard descriptors close-on-exec.
#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn set_cloexec_late(pair: &(OwnedFd, OwnedFd)) -> io::Result<()> {
    for fd in [pair.0.as_raw_fd(), pair.1.as_raw_fd()] {
        // SAFETY: fcntl on an fd we own.
        if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Linux creates them close-on-exec already.
#[cfg(any(target_os = "linux", target_os = "android"))]
fn set_cloexec_late(_pair: &(OwnedFd, OwnedFd)) -> io::Result<()> {
    Ok(())
}

/// A private (mode 0700) directory, removed with what is in it when dropped.
struct TempDir {
    path: PathBuf,
}

impl TempDir {
    fn new() -> Result<TempDir> {
        // The socket path must fit in sun_path (108 bytes with its NUL); libnbd always uses
        // /tmp for that reason, we prefer $TMPDIR when it is short enough.
        let base = std::env::temp_dir();
        let base = if base.as_os_str().len() + "/nbd-client-XXXXXX/sock".len() < 100 {
            base
        } else {
            PathBuf::from("/tmp")
        };
        let template = base.join("nbd-client-XXXXXX");
        let mut template = CString::new(template.as_os_str().as_bytes())
            .map_err(|_| Error::usage(Errno::EINVAL, "the temporary directory path contains a NUL byte"))?
            .into_bytes_with_nul();
        // SAFETY: template is a writable NUL-terminated buffer ending in XXXXXX.
        if unsafe { libc::mkdtemp(template.as_mut_ptr().cast()) }.is_null() {
            let e = io::Error::last_os_error();
            return Err(io_error(&format!("creating a temporary directory in {}", base.display()), e));
        }
        template.pop();
        Ok(TempDir {
            path: PathBuf::from(OsStr::from_bytes(&template)),
        })
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.path.join("sock"));
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// Starts the child from a new watcher thread, which then stays to reap it: on Linux the
/// child's parent-death signal fires when the thread that forked it ends, so that thread
/// must outlive the child. Closes our copies of the child's fds before returning.
fn launch(plan: ExecRequest, mode: Mode, stdio: Stdio) -> Result<Child> {
    let (output_r, output_w) = pipe()?;
    let output_w = above_stdio(output_w)?;
    let (tx, rx) = mpsc::sync_channel::<Result<Arc<Watched>>>(1);
    let fds = ChildFds {
        stdin: stdio.stdin.as_raw_fd(),
        stdout: stdio.stdout.as_ref().unwrap_or(&output_w).as_raw_fd(),
        stderr: output_w.as_raw_fd(),
        listener: stdio.listener.as_ref().map(|l| l.as_raw_fd()),
    };
    let watcher = std::thread::Builder::new()
        .name("nbd-server-watch".into())
        .stack_size(THREAD_STACK)
        .spawn(move || {
            let mut plan = plan;
            let started = fork_exec(&mut plan, fds);
            let watched = match started {
                Ok(pid) => Arc::new(Watched {
                    pid,
                    program: plan.program.clone(),
                    state: Mutex::new(WatchedState {
                        exit: Exit::Running,
                        output: Output::default(),
                    }),
                    changed: Condvar::new(),
                    events: tokio::sync::watch::Sender::new(0),
                }),
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            drop(plan);
            let _ = tx.send(Ok(Arc::clone(&watched)));
            watched.reap_on_exit();
        })
        .map_err(|e| io_error("starting a thread to watch the server process", e))?;
    // The thread reports once fork and exec are done; until then our fds stay open.
    let started = rx.recv();
    drop(stdio);
    drop(output_w);
    let watched = match started {
        Ok(Ok(watched)) => watched,
        Ok(Err(e)) => {
            let _ = watcher.join();
            return Err(e);
        }
        Err(_) => {
            return Err(Error::io(Errno::EIO, "the thread starting the server process ended unexpectedly"))
        }
    };
    let child = Child { watched, mode };
    let collector = Arc::clone(&child.watched);
    std::thread::Builder::new()
        .name("nbd-server-output".into())
        .stack_size(THREAD_STACK)
        .spawn(move || collector.collect_output(output_r))
        .map_err(|e| io_error("starting a thread to read the server's output", e))?;
    Ok(child)
}

#[derive(Clone, Copy)]
struct ChildFds {
    stdin: RawFd,
    stdout: RawFd,
    stderr: RawFd,
    listener: Option<RawFd>,
}

/// What the child reports through the error pipe when it cannot exec: the step and errno.
const STEP_SETUP: u32 = 1;
const STEP_EXEC: u32 = 2;

/// Forks and execs the plan; returns the child's pid once `execve` succeeded, or the
/// error that stopped it (the failed child is reaped).
fn fork_exec(plan: &mut ExecRequest, fds: ChildFds) -> Result<libc::pid_t> {
    let pointers = plan.pointers();
    let (report_r, report_w) = pipe()?;
    let report_w = above_stdio(report_w)?;
    // SAFETY: getpid has no preconditions.
    let parent = unsafe { libc::getpid() };
    // SAFETY: the child runs only async-signal-safe code (child_exec) and never returns.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io_error("starting the server process (fork)", io::Error::last_os_error()));
    }
    if pid == 0 {
        // SAFETY: we are the child of a fork; child_exec execs or exits.
        unsafe { child_exec(&pointers, fds, report_w.as_raw_fd(), parent) }
    }
    drop(report_w);
    if !wait_readable(&report_r, EXEC_REPORT_LIMIT) {
        // SAFETY: kill and waitpid on our own child, not yet reaped.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let mut status = 0;
        // SAFETY: as above.
        while unsafe { libc::waitpid(pid, &mut status, 0) } < 0
            && io::Error::last_os_error().raw_os_error() == Some(libc::EINTR)
        {}
        return Err(Error::io(
            Errno::ETIMEDOUT,
            format!(
                "cannot run {:?}: the process neither exec'd it nor failed within {} s of fork (killed)",
                plan.program,
                EXEC_REPORT_LIMIT.as_secs()
            ),
        ));
    }
    // The pipe closes on a successful exec (close-on-exec) or carries 8 bytes.
    let mut report = File::from(report_r);
    let mut buf = [0u8; 8];
    let mut got = 0;
    while got < buf.len() {
        match report.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
    if got == 0 {
        return Ok(pid);
    }
    // The child failed before exec and exits at once: reap it.
    let mut status = 0;
    // SAFETY: waitpid on our own child.
    while unsafe { libc::waitpid(pid, &mut status, 0) } < 0
        && io::Error::last_os_error().raw_os_error() == Some(libc::EINTR)
    {}
    let step = u32::from_ne_bytes(buf[..4].try_into().expect("4 bytes"));
    let errno = i32::from_ne_bytes(buf[4..].try_into().expect("4 bytes"));
    let os = io::Error::from_raw_os_error(errno);
    let errno_kind = Errno::from_raw_os_error(errno);
    let message = if got < buf.len() {
        format!("cannot run {:?}: the process failed before exec", plan.program)
    } else if step == STEP_EXEC && plan.searched_path && errno == libc::ENOENT {
        format!("cannot run {:?}: not found in PATH", plan.program)
    } else if step == STEP_EXEC {
        format!("cannot run {:?}: {os}", plan.program)
    } else {
        format!("cannot set up the server process for {:?}: {os}", plan.program)
    };
    Err(Error::io(errno_kind, message))
}

/// Whether `fd` became readable (data or end of file) within `limit`.
fn wait_readable(fd: &OwnedFd, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        let mut pfd = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n > 0 {
            return true;
        }
        if n < 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            // Let the read that follows tell what is wrong.
            return true;
        }
    }
}

/// The child between fork and exec. Only async-signal-safe calls; no allocation, no locks,
/// no panics.
unsafe fn child_exec(p: &ExecPointers, fds: ChildFds, report: RawFd, parent: libc::pid_t) -> ! {
    let last_errno = || io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO);
    let fail = |step: u32, errno: i32| -> ! {
        let mut msg = [0u8; 8];
        msg[..4].copy_from_slice(&step.to_ne_bytes());
        msg[4..].copy_from_slice(&errno.to_ne_bytes());
        libc::write(report, msg.as_ptr().cast(), msg.len());
        libc::_exit(127)
    };

    #[cfg(target_os = "linux")]
    {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong, 0, 0, 0);
        // The parent may have died before prctl: then nobody wants this server.
        if libc::getppid() != parent {
            libc::_exit(127);
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = parent;

    // Its own process group: the terminal's Ctrl-C goes to the application, not to its
    // server, and ending the server can end what the server started.
    libc::setpgid(0, 0);

    let mut empty = MaybeUninit::<libc::sigset_t>::uninit();
    libc::sigemptyset(empty.as_mut_ptr());
    libc::pthread_sigmask(libc::SIG_SETMASK, empty.as_ptr(), std::ptr::null_mut());
    libc::signal(libc::SIGPIPE, libc::SIG_DFL);

    // Sources are all >= 4 (above_stdio), so no dup2 overwrites a later source. dup2 clears
    // close-on-exec on the new fd.
    if libc::dup2(fds.stdin, 0) < 0 || libc::dup2(fds.stdout, 1) < 0 || libc::dup2(fds.stderr, 2) < 0 {
        fail(STEP_SETUP, last_errno());
    }
    let mut first_closed = LISTEN_FD;
    if let Some(listener) = fds.listener {
        if libc::dup2(listener, LISTEN_FD) < 0 {
            fail(STEP_SETUP, last_errno());
        }
        first_closed = LISTEN_FD + 1;
        write_decimal(p.pid_digits, libc::getpid() as u32);
    }
    cloexec_from(first_closed);

    // execvp's search, minus its /bin/sh retry: go on past the errors that mean "not
    // here", remember EACCES, stop at anything else.
    let mut saw_eacces = false;
    let mut last = libc::ENOENT;
    for &path in &p.candidates {
        libc::execve(path, p.argv.as_ptr(), p.envp.as_ptr());
        match last_errno() {
            libc::EACCES => saw_eacces = true,
            e @ (libc::ENOENT | libc::ENOTDIR | libc::ESTALE | libc::ENODEV | libc::ETIMEDOUT) => {
                last = e
            }
            e => fail(STEP_EXEC, e),
        }
    }
    fail(STEP_EXEC, if saw_eacces { libc::EACCES } else { last })
}

/// Writes `n` in decimal and a NUL at `dst` (PID_ROOM bytes of room). Async-signal-safe.
unsafe fn write_decimal(dst: *mut u8, mut n: u32) {
    let mut digits = [0u8; 10];
    let mut len = 0;
    loop {
        digits[len] = b'0' + (n % 10) as u8;
        len += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for i in 0..len {
        *dst.add(i) = digits[len - 1 - i];
    }
    *dst.add(len) = 0;
}

/// Marks every fd from `first` up close-on-exec (in the child, so only what we placed on
/// 0..first survives exec). Async-signal-safe.
unsafe fn cloexec_from(first: RawFd) {
    #[cfg(target_os = "linux")]
    {
        const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
        let rc = libc::syscall(
            libc::SYS_close_range,
            first as libc::c_uint,
            libc::c_uint::MAX,
            CLOSE_RANGE_CLOEXEC,
        );
        if rc == 0 {
            return;
        }
    }
    // Older kernels: one fcntl per possible fd.
    let mut limit = MaybeUninit::<libc::rlimit>::uninit();
    let max = if libc::getrlimit(libc::RLIMIT_NOFILE, limit.as_mut_ptr()) == 0 {
        let cur = limit.assume_init().rlim_cur;
        if cur == libc::RLIM_INFINITY {
            1 << 20
        } else {
            cur.min(1 << 20) as RawFd
        }
    } else {
        65536
    };
    for fd in first..max {
        let flags = libc::fcntl(fd, libc::F_GETFD);
        if flags >= 0 && flags & libc::FD_CLOEXEC == 0 {
            libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn child_can_move_between_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Child>();
    }

    #[test]
    fn decimal() {
        let mut buf = [0xffu8; PID_ROOM];
        for (n, text) in [(0u32, "0"), (7, "7"), (4194304, "4194304"), (u32::MAX, "4294967295")] {
            // SAFETY: buf has PID_ROOM bytes.
            unsafe { write_decimal(buf.as_mut_ptr(), n) };
            let end = buf.iter().position(|&b| b == 0).unwrap();
            assert_eq!(&buf[..end], text.as_bytes());
        }
    }

    #[test]
    fn path_search_candidates() {
        let (c, searched) = exec_candidates("nbdkit", Some(OsStr::new("/a:/b/::/c")));
        let c: Vec<_> = c.iter().map(|s| s.to_str().unwrap().to_string()).collect();
        assert_eq!(c, ["/a/nbdkit", "/b/nbdkit", "./nbdkit", "/c/nbdkit"]);
        assert!(searched);
        let (c, searched) = exec_candidates("./x", Some(OsStr::new("/a")));
        assert_eq!(c.len(), 1);
        assert!(!searched);
        let (c, _) = exec_candidates("x", None);
        assert_eq!(c.len(), 2);
    }

    #[test]
    fn tails() {
        let mut out = Output {
            kept: b"line one\nline two\n\n".to_vec(),
            ..Default::default()
        };
        assert_eq!(tail_text(&out, 100), "line one\nline two");
        assert_eq!(tail_text(&out, 12), "line two");
        out.truncated = true;
        out.kept = b"ne one\nline two".to_vec();
        assert_eq!(tail_text(&out, 100), "line two");
        out.kept = b"no newline at all".to_vec();
        assert_eq!(tail_text(&out, 100), "no newline at all");
    }

    #[test]
    fn socket_names() {
        assert!(check_socket_name("").is_ok());
        assert!(check_socket_name("nbd-sock_1.x").is_ok());
        assert_eq!(check_socket_name("a:b").unwrap_err().errno(), Errno::EINVAL);
        assert_eq!(check_socket_name("a\nb").unwrap_err().errno(), Errno::EINVAL);
        assert_eq!(check_socket_name(&"x".repeat(256)).unwrap_err().errno(), Errno::EINVAL);
    }

    #[test]
    fn argv_checks() {
        assert_eq!(check_argv(&[]).unwrap_err().errno(), Errno::EINVAL);
        assert_eq!(check_argv(&["".into()]).unwrap_err().errno(), Errno::EINVAL);
        let e = check_argv(&["nbdkit".into(), "a\0b".into()]).unwrap_err();
        assert_eq!(e.errno(), Errno::EINVAL);
        assert!(e.message().contains("argv[1]"), "{e}");
        assert_eq!(check_argv(&["nbdkit".into()]).unwrap().len(), 1);
    }

    #[test]
    fn statuses() {
        assert_eq!(describe_status(ExitStatus::from_raw(1 << 8)), "exited with status 1");
        assert_eq!(describe_status(ExitStatus::from_raw(libc::SIGKILL)), "was killed by signal 9 (SIGKILL)");
    }
}
