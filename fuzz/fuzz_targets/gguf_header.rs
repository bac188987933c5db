#![no_main]
//! cargo-fuzz target: `cd fuzz && cargo +nightly fuzz run gguf_header` — GGUF headers with
//! hostile metadata (byte 0: metadata count, byte 1: tensor count, then the entries; see
//! `difinfo_trainer::fuzzing::gguf_header_file`) through the header reader and the import.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    difinfo_trainer::fuzzing::gguf_header(data);
});
