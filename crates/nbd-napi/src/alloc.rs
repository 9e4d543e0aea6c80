//! glibc malloc's thresholds, set once per process so that large read Buffers reuse memory.
//!
//! A `pread` over 16 KiB returns a new Buffer, which Node allocates with malloc. V8 frees
//! those Buffers in batches, at the full collections that every 64 MiB or so of new
//! ArrayBuffer memory triggers. With glibc's starting thresholds, a batch that large,
//! freed at the top of the heap, goes straight back to the kernel (the trim threshold
//! starts at 128 KiB), and the next reads fault in fresh pages that the kernel zeroes one
//! by one. Measured against nbdkit (`bench/run.js`, ours alone, 3 runs each): 256 KiB reads
//! at depth 16 took 85 µs of CPU per read with glibc's starting thresholds and 59 µs with
//! the ones set here; 2 MiB reads at depth 8, 559 and 452 µs.
//!
//! Blocks under 32 MiB come from the heap (glibc's own dynamic threshold rises to that
//! once a program frees a 32 MiB block it had mapped). Free memory at the top of a heap is
//! given back to the kernel only past 64 MiB (twice the mmap threshold, as glibc's dynamic
//! rule pairs them), and then down to 64 MiB, not to nothing (`M_TOP_PAD`): a batch that the
//! collector frees is reused by the next reads. The cost: the process may keep up to 64 MiB
//! of freed memory per malloc arena that it would otherwise have returned.
//!
//! Left alone when `NBD_CLIENT_MALLOC=default` is set, when `GLIBC_TUNABLES` already sets
//! any of the three (the user chose), and on other C libraries (musl has no such knobs;
//! Electron's renderer allocates ArrayBuffers with its own allocator).

/// Sets the thresholds the first time it is called in a process; later calls (each worker
/// thread loads the addon again) do nothing.
pub(crate) fn tune_malloc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            if !wanted(std::env::var_os("NBD_CLIENT_MALLOC"), std::env::var_os("GLIBC_TUNABLES")) {
                return;
            }
            // SAFETY: mallopt only changes two of malloc's parameters, under malloc's lock.
            unsafe {
                libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
                libc::mallopt(libc::M_TRIM_THRESHOLD, KEPT);
                libc::mallopt(libc::M_TOP_PAD, KEPT);
            }
        });
    }
}

/// glibc's largest dynamic mmap threshold on 64-bit systems.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: libc::c_int = 32 << 20;
/// The trim threshold (what glibc's dynamic rule pairs with that mmap threshold), and what
/// a trim leaves in place.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const KEPT: libc::c_int = 64 << 20;

/// Whether to touch malloc, given `NBD_CLIENT_MALLOC` and `GLIBC_TUNABLES`.
#[cfg_attr(not(all(target_os = "linux", target_env = "gnu")), allow(dead_code))]
fn wanted(opt_out: Option<std::ffi::OsString>, tunables: Option<std::ffi::OsString>) -> bool {
    if opt_out.is_some_and(|v| v == "default") {
        return false;
    }
    let chosen = tunables.is_some_and(|t| {
        let t = t.to_string_lossy();
        ["mmap_threshold", "trim_threshold", "top_pad"].iter().any(|k| t.contains(&format!("glibc.malloc.{k}")))
    });
    !chosen
}

#[cfg(test)]
mod tests {
    use super::wanted;

    #[test]
    fn respects_the_opt_out_and_the_users_tunables() {
        assert!(wanted(None, None));
        assert!(wanted(Some("".into()), Some("glibc.malloc.arena_max=2".into())));
        assert!(!wanted(Some("default".into()), None));
        assert!(!wanted(None, Some("glibc.malloc.trim_threshold=1".into())));
        assert!(!wanted(None, Some("glibc.pthread.x=1:glibc.malloc.mmap_threshold=4096".into())));
        assert!(!wanted(None, Some("glibc.malloc.top_pad=0".into())));
    }
}
