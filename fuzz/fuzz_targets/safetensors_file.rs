#![no_main]
//! cargo-fuzz target: `cd fuzz && cargo +nightly fuzz run safetensors_file corpus/safetensors_file` (see trainer/README.md).

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    difinfo_trainer::fuzzing::safetensors_file(data);
});
