#![no_main]
//! cargo-fuzz target: `cargo +nightly fuzz run chat_template fuzz/corpus/chat_template` (from the repository root:
//! `cd fuzz && cargo +nightly fuzz run chat_template`).

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    difinfo_trainer::fuzzing::chat_template(data);
});
