//! Issue 20: see the module list in `hostile_round2.rs`.

#[allow(unused_imports)]
use super::*;
