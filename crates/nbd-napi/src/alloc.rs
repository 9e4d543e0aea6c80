//! glibc malloc's thresholds, set once per process so that large read Buffers reuse memory.
//!
//! A `pread` over 16 KiB returns a new Buffer, which Node allocates with malloc. V8 frees
//! those Buffers in batches, at the collections that new ArrayBuffer memory triggers. With
//! glibc's starting thresholds, a batch freed at the top of the heap goes straight back to
//! the kernel (the trim threshold starts at 128 KiB), and the next reads fault in fresh
//! pages that the kernel zeroes one by one. Measured against nbdkit (`bench/ours.js`, 256
//! KiB reads at depth 16, 5 alternating runs, medians): 61,000 page faults per run and 90
//! µs of CPU per read with glibc's starting thresholds, 13,000 and 80 µs with the ones set
//! here. The read stream's CPU fell by a tenth.
//!
//! What is set, on 64-bit glibc only:
//! - `M_MMAP_THRESHOLD` 32 MiB: blocks under 32 MiB come from the heap rather than a
//!   mapping of their own (glibc's dynamic threshold rises that far by itself once the
//!   program frees a mapped block that large);
//! - `M_TRIM_THRESHOLD` 64 MiB: free memory at the top of a heap goes back to the kernel
//!   once it passes 64 MiB, not 128 KiB. This pair (32 MiB and 64 MiB) is where glibc's
//!   own dynamic adjustment ends up in a program that frees a 32 MiB mapped block. The
//!   collector frees read Buffers in batches of tens of MiB (one batch per scavenge that
//!   new ArrayBuffer memory triggers: about 27 MiB of 256 KiB Buffers on Node 20), so a
//!   lower threshold hands each batch back to the kernel and the next reads fault it in
//!   again. Measured with 256 KiB reads at depth 16, 30,000 per run: with 16 MiB, 79,000
//!   to 128,000 page faults and 1,200 to 2,000 `brk` calls per run, 64 to 68 µs of CPU per
//!   read; with 64 MiB, 13,000 faults, 170 `brk` calls and 58 to 60 µs (128 MiB did no
//!   better). 2 MiB reads were the same either way.
//!
//! Setting either switches glibc's dynamic adjustment off for the process. The costs: up to
//! 64 MiB of freed memory at the top of each malloc arena (one per thread that allocates,
//! up to eight per CPU) is kept rather than returned, and a block up to 32 MiB in the heap
//! can be pinned there by a live block above it, where a mapping would have been returned
//! when freed. The settings cannot be undone once made.
//!
//! Left alone when `NBD_CLIENT_MALLOC=default` is set, when the environment already sets
//! either threshold (`GLIBC_TUNABLES`, or the older `MALLOC_*_` variables), and on other C
//! libraries (musl has no such knobs) and 32-bit systems. Electron calls it too, but gains
//! nothing there: its ArrayBuffers do not come from malloc.

/// Sets the thresholds the first time it is called in a process; later calls (each worker
/// thread loads the addon again) do nothing.
pub(crate) fn tune_malloc() {
    #[cfg(all(target_os = "linux", target_env = "gnu", target_pointer_width = "64"))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            if !wanted(|name| std::env::var_os(name)) {
                return;
            }
            // SAFETY: mallopt only changes malloc's parameters, under malloc's lock. The trim
            // threshold is set only if the mmap threshold was taken: either call turns the
            // dynamic adjustment off, which must not leave the mmap threshold at 128 KiB.
            unsafe {
                if libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 {
                    libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
                }
            }
        });
    }
}

/// glibc's largest dynamic mmap threshold on 64-bit systems.
#[cfg(all(target_os = "linux", target_env = "gnu", target_pointer_width = "64"))]
const MMAP_THRESHOLD: libc::c_int = 32 << 20;
/// Free memory kept at the top of a heap before any goes back to the kernel.
#[cfg(all(target_os = "linux", target_env = "gnu", target_pointer_width = "64"))]
const TRIM_THRESHOLD: libc::c_int = 64 << 20;

/// Whether to touch malloc, given the environment (`env` looks a variable up): not with
/// `NBD_CLIENT_MALLOC=default`, nor when the user set either threshold.
#[cfg_attr(not(all(target_os = "linux", target_env = "gnu", target_pointer_width = "64")), allow(dead_code))]
fn wanted(env: impl Fn(&str) -> Option<std::ffi::OsString>) -> bool {
    if env("NBD_CLIENT_MALLOC").is_some_and(|v| v == "default") {
        return false;
    }
    if env("MALLOC_MMAP_THRESHOLD_").is_some() || env("MALLOC_TRIM_THRESHOLD_").is_some() {
        return false;
    }
    !env("GLIBC_TUNABLES").is_some_and(|t| {
        let t = t.to_string_lossy();
        t.contains("glibc.malloc.mmap_threshold") || t.contains("glibc.malloc.trim_threshold")
    })
}

#[cfg(test)]
mod tests {
    use super::wanted;

    #[test]
    fn respects_the_opt_out_and_the_users_settings() {
        let with = |vars: &'static [(&'static str, &'static str)]| {
            wanted(move |name| vars.iter().find(|(n, _)| *n == name).map(|(_, v)| (*v).into()))
        };
        assert!(with(&[]));
        assert!(with(&[("NBD_CLIENT_MALLOC", ""), ("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")]));
        assert!(!with(&[("NBD_CLIENT_MALLOC", "default")]));
        assert!(!with(&[("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1")]));
        assert!(!with(&[("GLIBC_TUNABLES", "glibc.pthread.x=1:glibc.malloc.mmap_threshold=4096")]));
        assert!(!with(&[("MALLOC_TRIM_THRESHOLD_", "1048576")]));
        assert!(!with(&[("MALLOC_MMAP_THRESHOLD_", "131072")]));
    }
}
