//! Random-input tests of the handshake and reply decoders: structure-aware generated
//! server traffic, mutated, fed whole and in random pieces, with the invariants of
//! `harness` checked on every case (no panic, one outcome, well-formed client bytes, the
//! same result whatever the chunking, events inside the command's buffer, every command
//! finished exactly once, progress, and no allocation of a size the server merely claims).
//!
//! The run is seeded and so reproducible. By default it is short enough for `cargo test`;
//! `NBD_FUZZ_ITERATIONS=<n>` sets the cases per target and `NBD_FUZZ_SEED=<n or 0xhex>`
//! another seed. `npm run fuzz` (`examples/fuzz.rs`) is the long run.

mod harness;

use harness::{measure, Rng, Target};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[global_allocator]
static ALLOC: harness::CountingAlloc = harness::CountingAlloc;

/// Cases per target when `NBD_FUZZ_ITERATIONS` is unset: about a second each in release
/// (as `npm test` runs it), a tenth as many in a debug build, which is some ten times slower.
const DEFAULT_ITERATIONS: u64 = if cfg!(debug_assertions) { 5_000 } else { 50_000 };
const DEFAULT_SEED: u64 = 0x6e62_642d_6675_7a7a;

fn env_number(name: &str) -> Option<u64> {
    let text = std::env::var(name).ok()?;
    let text = text.trim().replace('_', "");
    let parsed = match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => text.parse(),
    };
    Some(parsed.unwrap_or_else(|_| panic!("{name}={text:?} is not a number")))
}

fn fuzz(target: Target) {
    let iterations = env_number("NBD_FUZZ_ITERATIONS").unwrap_or(DEFAULT_ITERATIONS);
    let seed = env_number("NBD_FUZZ_SEED").unwrap_or(DEFAULT_SEED);
    let progress = Arc::new(AtomicU64::new(0));
    harness::spawn_watchdog(
        format!("{} (seed {seed:#x})", target.name()),
        progress.clone(),
        Duration::from_secs(60),
    );
    let result = harness::run_seeded(target, seed, 0, iterations, &progress);
    progress.store(u64::MAX, Ordering::Relaxed);
    match result {
        Ok(summary) => {
            eprintln!(
                "{}: {} cases, {} bytes in {:?}: {:?}",
                target.name(),
                summary.cases,
                summary.input_bytes,
                summary.elapsed,
                summary.labels
            );
            assert_eq!(summary.cases, iterations);
        }
        Err(failure) => panic!("{failure}"),
    }
}

#[test]
fn handshake_survives_random_server_bytes() {
    fuzz(Target::Handshake);
}

#[test]
fn reply_decoder_survives_random_replies() {
    fuzz(Target::Replies);
}

#[test]
fn generated_cases_reach_every_outcome() {
    // A generator that never reaches an outcome tests nothing: the statistics of a small
    // run must show each kind of ending.
    let progress = AtomicU64::new(0);
    let hs = harness::run_seeded(Target::Handshake, 1, 0, 3000, &progress).unwrap();
    for label in [
        "ok (oldstyle)",
        "ok (structured)",
        "ok (simple)",
        "protocol error",
        "hang-up",
        "server refusal",
        "usage error",
        "pending",
    ] {
        assert!(
            hs.labels.get(label).copied().unwrap_or(0) > 0,
            "no {label}: {:?}",
            hs.labels
        );
    }
    let rp = harness::run_seeded(Target::Replies, 1, 0, 3000, &progress).unwrap();
    for label in [
        "ReadData",
        "ReadHole",
        "Done ok",
        "Done error",
        "Fatal",
        "ran out of bytes",
    ] {
        assert!(
            rp.labels.get(label).copied().unwrap_or(0) > 0,
            "no {label}: {:?}",
            rp.labels
        );
    }
}

#[test]
fn case_encodings_round_trip() {
    let mut rng = Rng::new(7);
    for _ in 0..2000 {
        let h = harness::handshake::generate(&mut rng);
        assert_eq!(harness::handshake::Case::decode(&h.encode()), h);
        let r = harness::replies::generate(&mut rng);
        assert_eq!(harness::replies::Case::decode(&r.encode()), r);
    }
    // Any bytes at all are a case.
    for n in 0..64 {
        let bytes = rng.bytes(n);
        harness::handshake::Case::decode(&bytes);
        harness::replies::Case::decode(&bytes);
    }
}

#[test]
fn allocation_bound_is_enforced() {
    // The counting allocator sees a large allocation, and the check refuses it.
    let (v, largest) = measure(|| vec![0u8; 3 << 20]);
    assert!(
        largest >= v.len(),
        "largest allocation {largest} < {}",
        v.len()
    );
    assert!(harness::check_allocation(largest, 100).is_err());
    assert!(harness::check_allocation(1000, 100).is_ok());
}

#[test]
fn hex_round_trips() {
    let bytes = [0u8, 1, 0xab, 0xff];
    assert_eq!(harness::from_hex(&harness::to_hex(&bytes)).unwrap(), bytes);
    assert_eq!(harness::from_hex("0g"), None);
}
