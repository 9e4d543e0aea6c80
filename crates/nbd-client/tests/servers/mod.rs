//! The one policy of the Rust tests for servers and tools that are not installed, as the
//! ava suite's (`__test__/helpers/servers.ts`): a missing one fails the test, unless
//! `NBD_ALLOW_MISSING_SERVERS=1` is set outside CI, when the test says so loudly and does
//! not run.

/// Whether `name` is an executable file on `PATH`.
fn on_path(name: &str) -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|d| d.join(name).is_file()))
        .unwrap_or(false)
}

/// True when every program in `names` is installed. Otherwise fails the test, unless
/// missing servers are tolerated; then it returns false and the test should return.
pub fn require(names: &[&str]) -> bool {
    let missing: Vec<&str> = names.iter().copied().filter(|n| !on_path(n)).collect();
    if missing.is_empty() {
        return true;
    }
    let message = format!("MISSING SERVER/TOOL: {} not found on PATH", missing.join(", "));
    let tolerated = std::env::var_os("CI").is_none()
        && std::env::var("NBD_ALLOW_MISSING_SERVERS").as_deref() == Ok("1");
    if !tolerated {
        panic!(
            "{message} (install nbdkit, qemu-utils, nbd-server and libnbd-bin; set \
             NBD_ALLOW_MISSING_SERVERS=1 outside CI to tolerate this)"
        );
    }
    eprintln!("\n*** {message}; this test did NOT run ***\n");
    false
}
