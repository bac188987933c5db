#![no_main]
//! cargo-fuzz target: `cd fuzz && cargo +nightly fuzz run train_config_toml corpus/train_config_toml` (see trainer/README.md).

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    difinfo_trainer::fuzzing::train_config_toml(data);
});
