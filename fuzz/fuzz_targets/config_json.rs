#![no_main]
//! cargo-fuzz target: `cargo +nightly fuzz run config_json fuzz/corpus/config_json` (from the repository root:
//! `cd fuzz && cargo +nightly fuzz run config_json`).

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    difinfo_trainer::fuzzing::config_json(data);
});
