//! Build script of `difinfo`: one compiler-version check, nothing else.
//!
//! `#[target_feature(enable = "avx512f")]` is stable since Rust 1.89; the crate's minimum is 1.85.
//! On 1.89 and newer this sets `cfg(difinfo_avx512)`, which adds an AVX-512 build of the hot loops
//! (`src/simd.rs`, `multiversion!`) beside the baseline and AVX2 ones; on older compilers that
//! build is left out. Results are bit-identical either way, only the speed differs.

use std::process::Command;

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-env-changed=RUSTC");
    println!("cargo::rustc-check-cfg=cfg(difinfo_avx512)");
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let minor = Command::new(rustc)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|v| {
            // "rustc 1.95.0 (59807616e 2026-04-14)"
            let mut parts = v.split_whitespace().nth(1)?.split('.');
            let major: u32 = parts.next()?.parse().ok()?;
            let minor: u32 = parts.next()?.parse().ok()?;
            (major == 1).then_some(minor)
        });
    if minor.is_some_and(|m| m >= 89) {
        println!("cargo::rustc-cfg=difinfo_avx512");
    }
}
