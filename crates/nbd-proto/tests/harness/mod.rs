//! Random-input checking of nbd-proto's decoders, shared by three drivers:
//!
//! * `tests/random.rs`: a short, seeded run inside `cargo test` (and so `npm test`);
//! * `examples/fuzz.rs`: the long run behind `npm run fuzz`;
//! * `fuzz/fuzz_targets/*.rs`: coverage-guided cargo-fuzz targets (nightly).
//!
//! Each target has a *case* type with a byte encoding (`decode` never fails, so any byte
//! string a fuzzer produces is a case), a structure-aware generator that builds plausible
//! server traffic and then mutates it, and a `check_*` function that runs the decoder and
//! returns a violated invariant as `Err(message)`. Panics inside the library are left to
//! the driver (cargo-fuzz wants them; the seeded drivers catch them and print the case).
//!
//! The drivers include this file with `#[path]`, so it is not part of the library's API.

#![allow(dead_code)]

#[path = "../bytes/mod.rs"]
pub mod bytes;
pub mod handshake;
pub mod replies;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

// ---- a small deterministic PRNG ----

/// SplitMix64: tiny, fast, and good enough to drive a fuzzer; the same seed always gives
/// the same stream, which is what makes failures reproducible.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix(self.0)
    }

    /// A number in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }

    /// A number in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    /// True with probability `num/den`.
    pub fn chance(&mut self, num: u64, den: u64) -> bool {
        self.below(den) < num
    }

    pub fn u8(&mut self) -> u8 {
        self.next_u64() as u8
    }

    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.u8()).collect()
    }
}

/// The SplitMix64 finaliser: also used to derive one case's seed from (run seed, index).
pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The seed of case `index` of a run started with `seed`.
pub fn case_seed(seed: u64, index: u64) -> u64 {
    mix(seed ^ mix(index.wrapping_add(1)))
}

// ---- reading a case out of arbitrary bytes ----

/// Reads fields from fuzzer bytes; past the end every field reads as zero, so decoding a
/// case never fails.
pub struct Source<'a> {
    bytes: &'a [u8],
}

impl<'a> Source<'a> {
    pub fn new(bytes: &'a [u8]) -> Source<'a> {
        Source { bytes }
    }

    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let n = N.min(self.bytes.len());
        out[..n].copy_from_slice(&self.bytes[..n]);
        self.bytes = &self.bytes[n..];
        out
    }

    pub fn u8(&mut self) -> u8 {
        self.take::<1>()[0]
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.take())
    }

    pub fn u64(&mut self) -> u64 {
        u64::from_be_bytes(self.take())
    }

    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.bytes)
    }
}

// ---- how the server's bytes are cut into reads ----

/// The sizes of the pieces `len` bytes arrive in, chosen by `seed`: all at once, a byte at
/// a time, or random sizes; empty pieces are thrown in too (a driver may pass them).
pub fn chunking(seed: u64, len: usize) -> Vec<usize> {
    let mut rng = Rng::new(seed);
    let mode = rng.below(5);
    let mut sizes = Vec::new();
    let mut left = len;
    while left > 0 {
        let n = match mode {
            0 => left,
            1 => 1,
            2 => rng.range(1, 8) as usize,
            3 => rng.range(1, 64) as usize,
            _ => {
                if rng.chance(1, 8) {
                    0
                } else {
                    rng.range(1, 512) as usize
                }
            }
        };
        let n = n.min(left);
        sizes.push(n);
        left -= n;
    }
    sizes
}

// ---- mutations ----

const INTERESTING_U8: &[u8] = &[0, 1, 0x7f, 0x80, 0xff];
const INTERESTING_U32: &[u32] = &[
    0,
    1,
    7,
    8,
    9,
    12,
    0xffff,
    0x1_0000,
    0x1_0001,
    0x7fff_ffff,
    0x8000_0000,
    0x8000_0001,
    0xffff_fff8,
    0xffff_ffff,
];

/// Applies one to four random mutations: bit flips, interesting values, insertions,
/// deletions, duplications and truncation.
pub fn mutate(rng: &mut Rng, data: &mut Vec<u8>) {
    for _ in 0..rng.range(1, 4) {
        let len = data.len();
        match rng.below(8) {
            0 if len > 0 => {
                let i = rng.below(len as u64) as usize;
                data[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len as u64) as usize;
                data[i] = rng.pick(INTERESTING_U8);
            }
            2 if len >= 4 => {
                let i = rng.below(len as u64 - 3) as usize;
                let v = rng.pick(INTERESTING_U32);
                data[i..i + 4].copy_from_slice(&v.to_be_bytes());
            }
            3 => {
                let i = rng.below(len as u64 + 1) as usize;
                let n = rng.range(1, 16) as usize;
                let extra = rng.bytes(n);
                data.splice(i..i, extra);
            }
            4 if len > 0 => {
                let i = rng.below(len as u64) as usize;
                let n = (rng.range(1, 16) as usize).min(len - i);
                data.drain(i..i + n);
            }
            5 if len > 0 => {
                let i = rng.below(len as u64) as usize;
                let n = (rng.range(1, 32) as usize).min(len - i);
                let copy = data[i..i + n].to_vec();
                let at = rng.below(len as u64 + 1) as usize;
                data.splice(at..at, copy);
            }
            6 if len > 0 => {
                let at = rng.below(len as u64) as usize;
                data.truncate(at);
            }
            _ => {
                if len > 0 {
                    let i = rng.below(len as u64) as usize;
                    data[i] = rng.u8();
                }
            }
        }
    }
}

// ---- the allocation bound ----

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

/// A global allocator that forwards to `System` and remembers, per thread, the largest
/// single allocation (or reallocation) since the last [`measure`]. Each driver binary
/// installs it with `#[global_allocator]`.
pub struct CountingAlloc;

fn note(size: usize) {
    let _ = LARGEST.try_with(|l| {
        if size > l.get() {
            l.set(size)
        }
    });
}

unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

/// Runs `f` and returns its result with the largest single allocation it made on this
/// thread (0 when [`CountingAlloc`] is not the global allocator).
pub fn measure<R>(f: impl FnOnce() -> R) -> (R, usize) {
    LARGEST.with(|l| l.set(0));
    let r = f();
    (r, LARGEST.with(|l| l.get()))
}

/// The largest single allocation a check may make for an input of `input_len` bytes: the
/// decoders may buffer what they were given (a growing `Vec` can hold twice that) plus
/// bounded metadata, never what a server merely claims.
pub fn allocation_bound(input_len: usize) -> usize {
    (1 << 20) + 2 * input_len
}

/// Fails when `largest` is above the bound for `input_len`.
pub fn check_allocation(largest: usize, input_len: usize) -> Result<(), String> {
    let bound = allocation_bound(input_len);
    if largest > bound {
        Err(format!(
            "a single allocation of {largest} bytes, above the bound of {bound} for {input_len} \
             input bytes"
        ))
    } else {
        Ok(())
    }
}

// ---- hex, for printing and replaying cases ----

pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn from_hex(text: &str) -> Option<Vec<u8>> {
    let text: String = text.chars().filter(|c| !c.is_whitespace()).collect();
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).ok())
        .collect()
}

/// The message of a caught panic.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic with a non-string payload".to_string()
    }
}

// ---- the seeded driver (tests/random.rs and examples/fuzz.rs) ----

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The decoders under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Handshake,
    Replies,
}

impl Target {
    pub const ALL: [Target; 2] = [Target::Handshake, Target::Replies];

    pub fn name(self) -> &'static str {
        match self {
            Target::Handshake => "handshake",
            Target::Replies => "replies",
        }
    }

    pub fn from_name(name: &str) -> Option<Target> {
        Target::ALL.into_iter().find(|t| t.name() == name)
    }

    /// A generated case, encoded.
    pub fn generate(self, rng: &mut Rng) -> Vec<u8> {
        match self {
            Target::Handshake => handshake::generate(rng).encode(),
            Target::Replies => replies::generate(rng).encode(),
        }
    }

    /// Decodes and checks one encoded case; a panic in the library is a violation too.
    /// On success returns tallies of what the case exercised.
    pub fn check_bytes(self, bytes: &[u8]) -> Result<Vec<(&'static str, u64)>, String> {
        let result = catch_unwind(AssertUnwindSafe(|| match self {
            Target::Handshake => {
                handshake::check(&handshake::Case::decode(bytes)).map(|l| vec![(l, 1)])
            }
            Target::Replies => replies::check(&replies::Case::decode(bytes)).map(|s| {
                vec![
                    ("ReadData", s.data),
                    ("ReadHole", s.holes),
                    ("Done ok", s.done_ok),
                    ("Done error", s.done_err),
                    ("Fatal", s.fatal),
                    ("ran out of bytes", s.ends),
                ]
            }),
        }));
        match result {
            Ok(r) => r,
            Err(payload) => Err(format!("panic: {}", panic_message(&*payload))),
        }
    }
}

/// A violated invariant, with what it takes to reproduce it.
#[derive(Debug)]
pub struct Failure {
    pub target: Target,
    pub seed: u64,
    pub index: u64,
    pub case: Vec<u8>,
    pub message: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} target: {}\n  seed {:#x}, case {} (NBD_FUZZ_SEED={:#x} regenerates it)\n  case hex: {}",
            self.target.name(),
            self.message,
            self.seed,
            self.index,
            self.seed,
            to_hex(&self.case)
        )
    }
}

/// What a seeded run did.
#[derive(Debug, Default)]
pub struct Summary {
    pub cases: u64,
    pub input_bytes: u64,
    pub elapsed: Duration,
    pub labels: BTreeMap<&'static str, u64>,
}

/// Generates and checks cases `start..start + count` of the run seeded with `seed`,
/// storing the index of the case at hand in `progress` (for a watchdog); stops at the
/// first violation.
pub fn run_seeded(
    target: Target,
    seed: u64,
    start: u64,
    count: u64,
    progress: &AtomicU64,
) -> Result<Summary, Failure> {
    let began = Instant::now();
    let mut summary = Summary::default();
    for index in start..start + count {
        progress.store(index, Ordering::Relaxed);
        let mut rng = Rng::new(case_seed(seed, index));
        let case = target.generate(&mut rng);
        match target.check_bytes(&case) {
            Ok(tallies) => {
                for (label, n) in tallies {
                    *summary.labels.entry(label).or_default() += n;
                }
            }
            Err(message) => {
                return Err(Failure {
                    target,
                    seed,
                    index,
                    case,
                    message,
                })
            }
        }
        summary.cases += 1;
        summary.input_bytes += case.len() as u64;
    }
    summary.elapsed = began.elapsed();
    Ok(summary)
}

/// Ends the process when the case index in `progress` stays the same for `stall`: a
/// decoder caught in a loop is a hang, which no assertion inside the loop can report.
/// Storing `u64::MAX` in `progress` retires the watchdog.
pub fn spawn_watchdog(what: String, progress: Arc<AtomicU64>, stall: Duration) {
    std::thread::spawn(move || {
        let mut last = progress.load(Ordering::Relaxed);
        let mut since = Instant::now();
        loop {
            std::thread::sleep(Duration::from_millis(250));
            let now = progress.load(Ordering::Relaxed);
            if now == u64::MAX {
                return;
            }
            if now != last {
                last = now;
                since = Instant::now();
            } else if since.elapsed() > stall {
                eprintln!("HANG: {what}: case {now} has run for more than {stall:?}");
                std::process::exit(3);
            }
        }
    });
}
