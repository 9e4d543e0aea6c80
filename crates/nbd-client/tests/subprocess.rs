//! Servers as child processes (`spawn_command`, `spawn_socket_activation`) against real
//! nbdkit, qemu-nbd and nbd-server, their failures and their ends. A missing server fails
//! the test, unless `NBD_ALLOW_MISSING_SERVERS=1` (see `servers`).

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, IntoRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nbd_client::{
    spawn_command, spawn_socket_activation, spawn_socket_activation_named, Child,
    Settings, Errno, Error, Fault, Handle,
};

fn argv(words: &[&str]) -> Vec<String> {
    words.iter().map(|w| w.to_string()).collect()
}

mod servers;

/// The start time of process `pid` (field 22 of /proc/PID/stat), which tells a process
/// from a later one that reused its pid.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_name = &stat[stat.rfind(')')? + 2..];
    after_name.split(' ').nth(19)?.parse().ok()
}

fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 2..].chars().next()
}

/// A process we watch for its end: gone from /proc, not a zombie of ours.
struct Watched {
    pid: u32,
    started: u64,
}

impl Watched {
    fn of(child: &Child) -> Watched {
        let pid = child.pid();
        Watched {
            pid,
            started: start_time(pid).expect("the child is in /proc"),
        }
    }

    /// The process (not another with its pid) still exists, zombie or not.
    fn exists(&self) -> bool {
        start_time(self.pid) == Some(self.started)
    }

    #[track_caller]
    fn assert_gone_within(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while self.exists() {
            assert!(
                Instant::now() < deadline,
                "pid {} still exists (state {:?}) after {limit:?}",
                self.pid,
                proc_state(self.pid)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // SAFETY: kill with signal 0 only checks.
        let rc = unsafe { libc::kill(self.pid as i32, 0) };
        if rc == 0 {
            // The pid was reused by an unrelated process: ours is still gone.
            assert!(!self.exists());
        } else {
            assert_eq!(std::io::Error::last_os_error().raw_os_error(), Some(libc::ESRCH));
        }
    }
}

async fn connect(fd: OwnedFd) -> (Handle, Result<(), Error>) {
    let h = Handle::new(Settings::default());
    let r = h.connect_socket(fd.into_raw_fd()).await;
    (h, r)
}

async fn write_read_back(h: &Handle) {
    let data: Vec<u8> = (0..65536u32).map(|i| (i * 7 + 3) as u8).collect();
    h.pwrite(Box::new(data.clone()), 4096, 0, None).await.unwrap();
    assert_eq!(h.pread(65536, 4096, 0, None).await.unwrap(), data);
}

#[track_caller]
fn expect_err<T>(r: Result<T, Error>, errno: Errno) -> Error {
    match r {
        Ok(_) => panic!("expected {errno}, got Ok"),
        Err(e) => {
            assert_eq!(e.errno(), errno, "{e}");
            e
        }
    }
}

async fn wait_exited(child: &Child, limit: Duration) {
    let deadline = Instant::now() + limit;
    while !child.has_exited() {
        assert!(Instant::now() < deadline, "pid {} did not exit within {limit:?}", child.pid());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("nbd-sub-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

// ---- command mode ----

#[tokio::test]
async fn command_mode_serves_nbdkit_and_exits_on_eof() {
    if !servers::require(&["nbdkit"]) {
        return;
    }
    let (fd, child) = spawn_command(&argv(&["nbdkit", "-s", "memory", "1M"])).unwrap();
    assert!(child.pid() > 0);
    assert_eq!(child.program(), "nbdkit");
    let watched = Watched::of(&child);
    let (h, r) = connect(fd).await;
    r.unwrap();
    h.pread(512, (1 << 20) - 512, 0, None).await.unwrap();
    write_read_back(&h).await;
    assert!(!child.has_exited());
    assert_eq!(child.exit_status(), None);
    assert_eq!(child.report(), None, "a healthy quiet server has nothing to report");
    // Closing the connection is all a well-behaved server needs to exit.
    h.close().await;
    wait_exited(&child, Duration::from_secs(5)).await;
    assert_eq!(child.exit_status().unwrap().code(), Some(0));
    // Already reaped: no zombie even before the Child drops.
    assert!(!watched.exists());
    drop(child);
}

/// The fds of process `pid`, sorted, each with what it points to.
fn fds_of(pid: u32) -> Vec<(i32, String)> {
    let mut fds: Vec<(i32, String)> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let target = std::fs::read_link(e.path()).unwrap();
            (e.file_name().to_str().unwrap().parse().unwrap(), target.to_string_lossy().into_owned())
        })
        .collect();
    fds.sort();
    fds
}

/// Field 5 of /proc/PID/stat: the process group.
fn pgid_of(pid: u32) -> u32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    stat[stat.rfind(')').unwrap() + 2..].split(' ').nth(2).unwrap().parse().unwrap()
}

#[tokio::test]
async fn command_mode_serves_nbd_server() {
    if !servers::require(&["nbd-server"]) {
        return;
    }
    let dir = temp_dir("nbd-server");
    let image = dir.join("disk.raw");
    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
    // Port 0 is nbd-server's inetd mode (the connection on stdin/stdout); -d keeps it in
    // the foreground, -C /dev/null keeps the system configuration out.
    let (fd, child) = spawn_command(&argv(&[
        "nbd-server",
        "-C",
        "/dev/null",
        "-d",
        "0",
        image.to_str().unwrap(),
    ]))
    .unwrap();
    let watched = Watched::of(&child);
    let (h, r) = connect(fd).await;
    if let Err(e) = r {
        panic!("{e}; {:?}", child.failure_report(Duration::from_secs(2)).await);
    }
    write_read_back(&h).await;
    h.close().await;
    drop(child);
    watched.assert_gone_within(Duration::from_secs(5));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn command_mode_child_sees_only_its_stdio() {
    // A file descriptor of ours that is not close-on-exec: the child must not get it.
    let leaky = unsafe { libc::dup(2) };
    assert!(leaky > 2);
    let (fd, child) = spawn_command(&argv(&["cat"])).unwrap();
    unsafe { libc::close(leaky) };
    let watched = Watched::of(&child);
    // cat echoes over the socket: stdin and stdout are both our connection.
    let mut stream = UnixStream::from(fd);
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    stream.write_all(b"ping\n").unwrap();
    let mut echoed = [0u8; 5];
    stream.read_exact(&mut echoed).unwrap();
    assert_eq!(&echoed, b"ping\n");
    let pid = child.pid();
    let fds = fds_of(pid);
    let numbers: Vec<i32> = fds.iter().map(|(n, _)| *n).collect();
    assert_eq!(numbers, [0, 1, 2], "{fds:?}");
    assert!(fds[0].1.starts_with("socket:["), "{fds:?}");
    assert_eq!(fds[0].1, fds[1].1, "stdin and stdout are the same socket");
    assert!(fds[2].1.starts_with("pipe:["), "{fds:?}");
    // The child leads its own process group.
    assert_eq!(pgid_of(pid), pid);
    drop(stream);
    drop(child);
    watched.assert_gone_within(Duration::from_secs(5));
}

// ---- socket activation ----

#[tokio::test]
async fn socket_activation_serves_nbdkit() {
    if !servers::require(&["nbdkit"]) {
        return;
    }
    let (fd, child) = spawn_socket_activation(&argv(&["nbdkit", "memory", "1M"])).unwrap();
    let watched = Watched::of(&child);
    let (h, r) = connect(fd).await;
    r.unwrap();
    h.pread(512, (1 << 20) - 512, 0, None).await.unwrap();
    write_read_back(&h).await;
    h.close().await;
    // nbdkit under socket activation keeps serving after a disconnect: only the drop
    // (SIGTERM) ends it.
    assert!(!child.has_exited());
    drop(child);
    watched.assert_gone_within(Duration::from_secs(5));
}

#[tokio::test]
async fn socket_activation_serves_qemu_nbd() {
    if !servers::require(&["qemu-nbd"]) {
        return;
    }
    let dir = temp_dir("qemu");
    let image = dir.join("disk.raw");
    let content: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 251) as u8).collect();
    std::fs::write(&image, &content).unwrap();
    let (fd, child) =
        spawn_socket_activation(&argv(&["qemu-nbd", "-f", "raw", image.to_str().unwrap()])).unwrap();
    let watched = Watched::of(&child);
    let (h, r) = connect(fd).await;
    r.unwrap();
    h.pread(512, (1 << 20) - 512, 0, None).await.unwrap();
    assert_eq!(h.pread(8192, 12345, 0, None).await.unwrap(), &content[12345..12345 + 8192]);
    write_read_back(&h).await;
    h.close().await;
    drop(child);
    watched.assert_gone_within(Duration::from_secs(5));
    // What was written reached the file.
    let after = std::fs::read(&image).unwrap();
    assert_eq!(after[4096], 3);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn socket_activation_environment_and_fds() {
    let script = "echo \"env $LISTEN_PID $LISTEN_FDS ${LISTEN_FDNAMES-unset} $$\" >&2; exec sleep 1000";
    // No name is systemd's `unknown`, which libnbd passes too.
    for (name, shown) in [("", "unknown"), ("nbd", "nbd")] {
        std::env::set_var("LISTEN_FDNAMES", "stale-from-our-environment");
        let spawned = spawn_socket_activation_named(&argv(&["sh", "-c", script]), name);
        std::env::remove_var("LISTEN_FDNAMES");
        let (fd, child) = spawned.unwrap();
        let pid = child.pid();
        let deadline = Instant::now() + Duration::from_secs(5);
        while child.stderr_tail().is_empty()
            || std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap().trim() != "sleep"
        {
            assert!(Instant::now() < deadline, "no output: {:?}", child.stderr_tail());
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(child.stderr_tail(), format!("env {pid} 1 {shown} {pid}"));
        let fds = fds_of(pid);
        let numbers: Vec<i32> = fds.iter().map(|(n, _)| *n).collect();
        assert_eq!(numbers, [0, 1, 2, 3], "{fds:?}");
        assert_eq!(fds[0].1, "/dev/null");
        assert!(fds[1].1.starts_with("pipe:["), "{fds:?}");
        assert_eq!(fds[1].1, fds[2].1, "stdout goes with stderr");
        assert!(fds[3].1.starts_with("socket:["), "{fds:?}");
        assert!(fd.as_raw_fd() > 2);
        let watched = Watched::of(&child);
        drop(child);
        watched.assert_gone_within(Duration::from_secs(5));
    }
}

#[tokio::test]
async fn socket_activation_name_is_checked() {
    expect_err(spawn_socket_activation_named(&argv(&["true"]), "a:b"), Errno::EINVAL);
    expect_err(spawn_socket_activation_named(&argv(&["true"]), &"x".repeat(300)), Errno::EINVAL);
}

/// Socket activation leaves no temporary directory behind, started or not.
#[tokio::test]
async fn socket_activation_removes_its_directory() {
    let tmp = std::env::temp_dir();
    let ours = |tmp: &Path| -> HashSet<PathBuf> {
        std::fs::read_dir(tmp)
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("nbd-client-"))
            .collect()
    };
    let before = ours(&tmp);
    let (fd, child) = spawn_socket_activation(&argv(&["sleep", "1000"])).unwrap();
    expect_err(spawn_socket_activation(&argv(&["/nonexistent/server"])), Errno::ENOENT);
    // Other tests (and other processes) create such directories for an instant too:
    // wait until none is left that was not there before.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let new: Vec<_> = ours(&tmp).difference(&before).cloned().collect();
        if new.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "left behind: {new:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    drop((fd, child));
}

// ---- failures ----

#[tokio::test]
async fn nbdkit_that_cannot_start_explains_why() {
    if !servers::require(&["nbdkit"]) {
        return;
    }
    let (fd, child) = spawn_command(&argv(&["nbdkit", "-s", "no-such-plugin"])).unwrap();
    let (_h, r) = connect(fd).await;
    let e = r.unwrap_err();
    assert!(e.is_fatal(), "{e}");
    let report = child.failure_report(Duration::from_secs(5)).await.unwrap();
    assert!(report.starts_with(&format!("the server process nbdkit (pid {}) exited with status 1: ", child.pid())), "{report}");
    assert!(report.contains("no-such-plugin"), "{report}");
    assert!(child.stderr_tail().contains("cannot open plugin"), "{}", child.stderr_tail());
    assert_eq!(child.exit_status().unwrap().code(), Some(1));
}

#[tokio::test]
async fn qemu_nbd_that_cannot_start_explains_why() {
    if !servers::require(&["qemu-nbd"]) {
        return;
    }
    let started = Instant::now();
    let (fd, child) =
        spawn_socket_activation(&argv(&["qemu-nbd", "-f", "raw", "/nonexistent/disk.img"])).unwrap();
    let (_h, r) = tokio::time::timeout(Duration::from_secs(10), connect(fd)).await.expect("no hang");
    let e = r.unwrap_err();
    assert!(e.is_fatal(), "{e}");
    let report = child.failure_report(Duration::from_secs(5)).await.unwrap();
    assert!(report.contains("exited with status 1"), "{report}");
    assert!(report.contains("/nonexistent/disk.img"), "{report}");
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn programs_that_cannot_run_fail_the_spawn() {
    let dir = temp_dir("exec");
    let not_executable = dir.join("plain");
    std::fs::write(&not_executable, "#!/bin/sh\nexit 0\n").unwrap();
    std::fs::set_permissions(&not_executable, std::fs::Permissions::from_mode(0o644)).unwrap();
    let not_a_program = dir.join("garbage");
    std::fs::write(&not_a_program, [0u8, 1, 2, 3, 0xff, 0xfe, 0, 0]).unwrap();
    std::fs::set_permissions(&not_a_program, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = |p: &Path| p.to_str().unwrap().to_string();

    for spawn in [spawn_command, spawn_socket_activation] {
        let e = expect_err(spawn(&argv(&["/nonexistent/nbd-server"])), Errno::ENOENT);
        assert_eq!(e.fault(), Fault::Io);
        assert!(e.message().contains("\"/nonexistent/nbd-server\""), "{e}");
        let e = expect_err(spawn(&argv(&["no-such-program-for-nbd-tests"])), Errno::ENOENT);
        assert!(e.message().contains("not found in PATH"), "{e}");
        let e = expect_err(spawn(&[path(&not_executable)]), Errno::EACCES);
        assert!(e.message().contains("Permission denied"), "{e}");
        expect_err(spawn(&[path(&dir)]), Errno::EACCES);
        expect_err(spawn(&[path(&not_a_program)]), Errno::ENOEXEC);
        expect_err(spawn(&[]), Errno::EINVAL);
        expect_err(spawn(&argv(&[""])), Errno::EINVAL);
        let e = expect_err(spawn(&argv(&["nbdkit", "-s", "mem\0ory"])), Errno::EINVAL);
        assert_eq!(e.fault(), Fault::Usage);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn failure_report_of_a_killed_server() {
    let (_fd, child) = spawn_command(&argv(&["sh", "-c", "echo about to die >&2; kill -SEGV $$"])).unwrap();
    let report = child.failure_report(Duration::from_secs(5)).await.unwrap();
    assert!(report.contains("was killed by signal 11 (SIGSEGV)"), "{report}");
    assert!(report.ends_with(": about to die"), "{report}");
}

#[tokio::test]
async fn report_of_a_running_server_with_output() {
    let (_fd, child) = spawn_command(&argv(&["sh", "-c", "echo starting >&2; exec sleep 1000"])).unwrap();
    // failure_report waits for an exit that does not come, then tells what it knows.
    let started = Instant::now();
    let report = child.failure_report(Duration::from_millis(300)).await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert!(report.ends_with("is still running; its last output: starting"), "{report}");
}

// ---- ending ----

#[tokio::test]
async fn a_server_ignoring_eof_and_sigterm_is_killed() {
    let (fd, child) = spawn_command(&argv(&["sh", "-c", "trap '' TERM; sleep 1000"])).unwrap();
    let watched = Watched::of(&child);
    // Let the shell set up its trap and start sleep (a grandchild in the same group).
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(fd);
    let dropped = Instant::now();
    drop(child);
    assert!(dropped.elapsed() < Duration::from_millis(100), "drop must not block");
    watched.assert_gone_within(Duration::from_secs(10));
    // Two grace periods passed: end of file, then SIGTERM.
    assert!(dropped.elapsed() >= Duration::from_secs(3), "{:?}", dropped.elapsed());
}

#[tokio::test]
async fn the_whole_process_group_ends() {
    // The server starts a helper and ignores SIGTERM; the helper would survive a kill of
    // the server alone.
    let (fd, child) = spawn_command(&argv(&[
        "sh",
        "-c",
        "trap '' TERM; sleep 1000 & echo helper=$! >&2; wait",
    ]))
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let helper: u32 = loop {
        if let Some(pid) = child.stderr_tail().strip_prefix("helper=") {
            break pid.trim().parse().unwrap();
        }
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(10));
    };
    let helper = Watched {
        pid: helper,
        started: start_time(helper).unwrap(),
    };
    let watched = Watched::of(&child);
    drop((fd, child));
    watched.assert_gone_within(Duration::from_secs(10));
    helper.assert_gone_within(Duration::from_secs(5));
}

#[tokio::test]
async fn many_children_dropped_at_once_leave_no_zombies() {
    let mut watched = Vec::new();
    let mut children = Vec::new();
    for i in 0..24 {
        // Half exit on end of file, half need a signal.
        let program = if i % 2 == 0 { "cat" } else { "sleep" };
        let args = if i % 2 == 0 { argv(&["cat"]) } else { argv(&[program, "1000"]) };
        let (fd, child) = spawn_command(&args).unwrap();
        watched.push(Watched::of(&child));
        children.push((fd, child));
    }
    let dropped = Instant::now();
    drop(children);
    assert!(dropped.elapsed() < Duration::from_millis(500), "drop must not block");
    for w in &watched {
        w.assert_gone_within(Duration::from_secs(10));
    }
}

#[tokio::test]
async fn a_server_that_exits_by_itself_is_reaped_at_once() {
    let (_fd, child) = spawn_command(&argv(&["true"])).unwrap();
    let pid = child.pid();
    wait_exited(&child, Duration::from_secs(5)).await;
    assert_eq!(child.exit_status().unwrap().code(), Some(0));
    assert_eq!(proc_state(pid), None, "reaped, not a zombie");
    assert_eq!(child.report().unwrap(), format!("the server process true (pid {pid}) exited with status 0"));
}

/// The test binary re-run as a helper: it starts a server, prints its pid and waits to
/// be killed.
#[test]
fn helper_parent_that_gets_killed() {
    if std::env::var_os("NBD_TEST_HELPER").is_none() {
        return;
    }
    let (_fd, child) = spawn_socket_activation(&argv(&["sleep", "1000"])).unwrap();
    println!("server={}", child.pid());
    std::io::stdout().flush().unwrap();
    std::thread::sleep(Duration::from_secs(1000));
}

#[test]
fn servers_end_when_this_process_dies() {
    let mut helper = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "helper_parent_that_gets_killed", "--nocapture", "--test-threads=1"])
        .env("NBD_TEST_HELPER", "1")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(helper.stdout.take().unwrap()).lines();
    let server: u32 = loop {
        // libtest may print its "test ... " prefix on the same line.
        let line = lines.next().expect("the helper printed the server pid").unwrap();
        if let Some((_, pid)) = line.split_once("server=") {
            break pid.trim().parse().unwrap();
        }
    };
    let watched = Watched {
        pid: server,
        started: start_time(server).unwrap(),
    };
    helper.kill().unwrap();
    helper.wait().unwrap();
    // The parent-death signal (SIGTERM) ends it; whoever inherits it reaps it. A zombie
    // waiting for that reaper no longer runs, which is what matters here.
    let deadline = Instant::now() + Duration::from_secs(5);
    while watched.exists() && proc_state(server) != Some('Z') {
        assert!(Instant::now() < deadline, "server {server} outlived its parent");
        std::thread::sleep(Duration::from_millis(20));
    }
}
