#![no_main]
//! cargo-fuzz target: `cd fuzz && cargo +nightly fuzz run gguf_import` — arbitrary bytes as a
//! llama.cpp model file through `difinfo-train convert`'s import.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    difinfo_trainer::fuzzing::gguf_import(data);
});
