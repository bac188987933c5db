#![no_main]
//! cargo-fuzz target: `cargo +nightly fuzz run jsonl_example fuzz/corpus/jsonl_example` (from the repository root:
//! `cd fuzz && cargo +nightly fuzz run jsonl_example`).

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    difinfo_trainer::fuzzing::jsonl_example(data);
});
