#![no_main]
//! cargo-fuzz target: `cd fuzz && cargo +nightly fuzz run trainer_state corpus/trainer_state` (see trainer/README.md).

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    difinfo_trainer::fuzzing::trainer_state(data);
});
