#![no_main]
//! cargo-fuzz target: `cd fuzz && cargo +nightly fuzz run parquet_file` — arbitrary bytes as
//! a Parquet dataset file through the reader of `--data x.parquet`.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    difinfo_trainer::fuzzing::parquet_file(data);
});
