//! Coverage-guided fuzzing of the handshake machine; the case encoding, invariants and
//! allocation bound are those of `crates/nbd-proto/tests/harness`.
#![no_main]

#[path = "../../crates/nbd-proto/tests/harness/mod.rs"]
mod harness;

use libfuzzer_sys::fuzz_target;

#[global_allocator]
static ALLOC: harness::CountingAlloc = harness::CountingAlloc;

fuzz_target!(|data: &[u8]| {
    let case = harness::handshake::Case::decode(data);
    if let Err(message) = harness::handshake::check(&case) {
        panic!("handshake invariant violated: {message}");
    }
});
