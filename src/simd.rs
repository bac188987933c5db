//! The vectorized loops under the float arithmetic: instruction-set dispatch (`Level`,
//! `multiversion!`), the fixed-order lane sums, the polynomial `exp` and `ln(1 + t)` the compiler
//! vectorizes, the log-sum-exp block kernel and the huge-page allocation of long results.
//!
//! No formula of the paper lives here: [`crate::logspace`], [`crate::entropy`] and
//! [`crate::policy`] write theirs on top of these loops. Every loop is compiled for baseline
//! x86-64, AVX2 and AVX-512F and gives the same bits at each (a unit test checks it).

/// The instruction sets the hot loops are compiled for, picked once at run time.
///
/// The default target is baseline x86-64 (SSE2), so every hot loop is compiled three times:
/// baseline, AVX2 and AVX-512F (`#[target_feature]`; AVX-512 needs Rust 1.89, see `build.rs`),
/// and the widest one the CPU has runs. The
/// three are **bit-identical**: each loop keeps eight fixed accumulator lanes whatever the vector
/// width, Rust never contracts `a * b + c` into an FMA nor reassociates floating-point
/// operations, so only the number of lanes per instruction differs. (A unit test checks this.)
/// `DIFINFO_SIMD=baseline|avx2|avx512` lowers the choice, e.g. to measure what SIMD buys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Level {
    Baseline,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(all(target_arch = "x86_64", difinfo_avx512))]
    Avx512,
}

impl Level {
    /// Every level this CPU can run, baseline first.
    #[allow(dead_code)]
    pub(crate) fn available() -> Vec<Level> {
        #[allow(unused_mut)]
        let mut v = vec![Level::Baseline];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") {
                v.push(Level::Avx2);
            }
            #[cfg(difinfo_avx512)]
            if is_x86_feature_detected!("avx512f") {
                v.push(Level::Avx512);
            }
        }
        v
    }
}

/// The level the dispatched kernels use (detected once, then cached).
#[inline]
pub(crate) fn level() -> Level {
    use std::sync::atomic::{AtomicU8, Ordering};
    static LEVEL: AtomicU8 = AtomicU8::new(u8::MAX);
    let code = LEVEL.load(Ordering::Relaxed);
    let decode = |c: u8| match c {
        #[cfg(all(target_arch = "x86_64", difinfo_avx512))]
        2 => Level::Avx512,
        #[cfg(target_arch = "x86_64")]
        1 => Level::Avx2,
        _ => Level::Baseline,
    };
    if code != u8::MAX {
        return decode(code);
    }
    let best = *Level::available().last().expect("baseline");
    let wanted = match std::env::var("DIFINFO_SIMD").as_deref() {
        Ok("baseline") | Ok("sse2") => Level::Baseline,
        #[cfg(all(target_arch = "x86_64", difinfo_avx512))]
        Ok("avx2") if best == Level::Avx512 => Level::Avx2,
        _ => best,
    };
    let code = match wanted {
        Level::Baseline => 0,
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => 1,
        #[cfg(all(target_arch = "x86_64", difinfo_avx512))]
        Level::Avx512 => 2,
    };
    LEVEL.store(code, Ordering::Relaxed);
    wanted
}

/// Define `fn $name(args) -> R` that runs `body` at the detected [`Level`], and
/// `fn $name_at(level, args) -> R` that runs it at a given one (for the bit-identity tests).
/// The body is plain scalar Rust written so that the compiler vectorizes it.
macro_rules! multiversion {
    (
        $(#[$attr:meta])*
        $vis:vis fn $name:ident / $name_at:ident ($($arg:ident : $ty:ty),* $(,)?) -> $ret:ty
        $body:block
    ) => {
        $(#[$attr])*
        #[inline]
        $vis fn $name($($arg: $ty),*) -> $ret {
            $name_at($crate::simd::level(), $($arg),*)
        }

        #[allow(dead_code)]
        pub(crate) fn $name_at(level: $crate::simd::Level, $($arg: $ty),*) -> $ret {
            #[inline(always)]
            fn imp($($arg: $ty),*) -> $ret $body
            match level {
                #[cfg(all(target_arch = "x86_64", difinfo_avx512))]
                $crate::simd::Level::Avx512 => {
                    #[target_feature(enable = "avx512f")]
                    unsafe fn v($($arg: $ty),*) -> $ret {
                        imp($($arg),*)
                    }
                    // SAFETY: `Level::Avx512` is only produced when the CPU has AVX-512F.
                    unsafe { v($($arg),*) }
                }
                #[cfg(target_arch = "x86_64")]
                $crate::simd::Level::Avx2 => {
                    #[target_feature(enable = "avx2")]
                    unsafe fn v($($arg: $ty),*) -> $ret {
                        imp($($arg),*)
                    }
                    // SAFETY: `Level::Avx2` is only produced when the CPU has AVX2.
                    unsafe { v($($arg),*) }
                }
                $crate::simd::Level::Baseline => imp($($arg),*),
            }
        }
    };
}
pub(crate) use multiversion;

/// Runs `f` compiled for the widest instruction set of [`level`] (AVX-512F, AVX2 or baseline
/// x86-64; `DIFINFO_SIMD` lowers it): `f` and what it inlines are compiled inside a
/// `#[target_feature]` function, so their loops vectorize to that width. Rust contracts no
/// `a * b + c` into an FMA and reorders no float operation, so the result does not depend on
/// the level. Lets another crate's element-wise kernels (the trainer's) run at the CPU's width
/// from a baseline x86-64 build.
#[inline(always)]
pub fn vectorized<R>(f: impl FnOnce() -> R) -> R {
    match level() {
        #[cfg(all(target_arch = "x86_64", difinfo_avx512))]
        Level::Avx512 => {
            #[target_feature(enable = "avx512f,avx2")]
            unsafe fn v<R>(f: impl FnOnce() -> R) -> R {
                f()
            }
            // SAFETY: `Level::Avx512` is only produced when the CPU has AVX-512F.
            unsafe { v(f) }
        }
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => {
            #[target_feature(enable = "avx2")]
            unsafe fn v<R>(f: impl FnOnce() -> R) -> R {
                f()
            }
            // SAFETY: `Level::Avx2` is only produced when the CPU has AVX2.
            unsafe { v(f) }
        }
        Level::Baseline => f(),
    }
}

/// Block length of the one-pass log-sum-exp: a block of `f64`s stays in the L1 cache between
/// its max pass and its exp pass.
pub(crate) const BLOCK: usize = 2048;

/// How far ahead (in `f64`s) the streaming loops prefetch.
const PREFETCH: usize = 512;

/// Hint the cache to fetch the line at `p` (no effect on results; `p` may be past the end).
#[inline(always)]
fn prefetch(p: *const f64) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch never faults, whatever the address.
    unsafe {
        std::arch::x86_64::_mm_prefetch(p as *const i8, std::arch::x86_64::_MM_HINT_T0);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// `Σ_i f(x_i)` in a fixed order: eight accumulator lanes (`lane_j` gets `i ≡ j mod 8`, in
/// increasing `i`), then the lanes summed `0..8`, then the tail `i ≥ 8⌊n/8⌋` one by one. The
/// terms are evaluated 32 at a time so that the vectorized `f` has independent work to overlap;
/// the order of the additions does not depend on that, nor on the vector width.
#[inline(always)]
pub(crate) fn lane_sum(xs: &[f64], f: impl Fn(f64) -> f64) -> f64 {
    let mut lanes = [0.0f64; 8];
    let big = xs.chunks_exact(32);
    let rest = big.remainder();
    for c in big {
        prefetch(c.as_ptr().wrapping_add(PREFETCH));
        let c: &[f64; 32] = c.try_into().expect("32");
        let mut e = [0.0f64; 32];
        for j in 0..32 {
            e[j] = f(c[j]);
        }
        for j in 0..32 {
            lanes[j % 8] += e[j];
        }
    }
    let small = rest.chunks_exact(8);
    let tail = small.remainder();
    for c in small {
        for j in 0..8 {
            lanes[j] += f(c[j]);
        }
    }
    let mut s = 0.0;
    for l in lanes {
        s += l;
    }
    for &x in tail {
        s += f(x);
    }
    s
}

/// [`lane_sum`] of `f(a_i, b_i)` over two slices of equal length (panics otherwise).
#[inline(always)]
pub(crate) fn lane_sum2(a: &[f64], b: &[f64], f: impl Fn(f64, f64) -> f64) -> f64 {
    assert_eq!(a.len(), b.len());
    let mut lanes = [0.0f64; 8];
    let n32 = a.len() / 32 * 32;
    let n8 = a.len() / 8 * 8;
    for (ca, cb) in a[..n32].chunks_exact(32).zip(b[..n32].chunks_exact(32)) {
        prefetch(ca.as_ptr().wrapping_add(PREFETCH));
        prefetch(cb.as_ptr().wrapping_add(PREFETCH));
        let ca: &[f64; 32] = ca.try_into().expect("32");
        let cb: &[f64; 32] = cb.try_into().expect("32");
        let mut e = [0.0f64; 32];
        for j in 0..32 {
            e[j] = f(ca[j], cb[j]);
        }
        for j in 0..32 {
            lanes[j % 8] += e[j];
        }
    }
    for (ca, cb) in a[n32..n8].chunks_exact(8).zip(b[n32..n8].chunks_exact(8)) {
        for j in 0..8 {
            lanes[j] += f(ca[j], cb[j]);
        }
    }
    let mut s = 0.0;
    for l in lanes {
        s += l;
    }
    for i in n8..a.len() {
        s += f(a[i], b[i]);
    }
    s
}

/// A zeroed `Vec<f64>` of length `n` for a result the hot paths are about to write.
///
/// A fresh allocation of `10^7` doubles is 80 MB of pages the kernel maps on first touch; with
/// 4 KiB pages that is 20 000 page faults, about as long as the arithmetic itself. On Linux,
/// vectors of 4 MiB and more are therefore offered to transparent huge pages
/// (`madvise(MADV_HUGEPAGE)`, effective where THP is `always` or `madvise`; advisory, so a refusal
/// changes nothing). The zeroed allocation (`calloc`) takes fresh pages without a memset.
pub(crate) fn zeroed(n: usize) -> Vec<f64> {
    let mut v = vec![0.0f64; n];
    #[cfg(target_os = "linux")]
    huge_pages(&mut v);
    v
}

#[cfg(target_os = "linux")]
fn huge_pages(v: &mut [f64]) {
    use std::ffi::{c_int, c_void};
    extern "C" {
        fn madvise(addr: *mut c_void, len: usize, advice: c_int) -> c_int;
    }
    const MADV_HUGEPAGE: c_int = 14;
    const PAGE: usize = 4096;
    let bytes = std::mem::size_of_val(v);
    if bytes < 4 << 20 {
        return;
    }
    let start = (v.as_mut_ptr() as usize).next_multiple_of(PAGE);
    let end = (v.as_mut_ptr() as usize + bytes) / PAGE * PAGE;
    if end > start {
        // SAFETY: the range lies inside the allocation `v` owns; MADV_HUGEPAGE only changes how
        // the kernel backs those pages, never their contents. The result is advisory: ignored.
        unsafe {
            madvise(start as *mut c_void, end - start, MADV_HUGEPAGE);
        }
    }
}

/// Largest element of a slice (`-∞` for an empty one).
pub fn max(xs: &[f64]) -> f64 {
    // Eight independent lanes: the compiler vectorizes this, and the result is
    // independent of the order (max is associative and commutative).
    let mut lanes = [f64::NEG_INFINITY; 8];
    let chunks = xs.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..8 {
            lanes[i] = lanes[i].max(c[i]);
        }
    }
    let mut m = lanes.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    for &x in rest {
        m = m.max(x);
    }
    m
}

#[inline(always)]
fn sum_exp_shifted_body(xs: &[f64], shift: f64) -> f64 {
    lane_sum(xs, |x| fast_exp(x - shift))
}

multiversion! {
    /// `Σ_i exp(x_i − shift)`, summed in a fixed order (bit-identical on every run).
    pub fn sum_exp_shifted / sum_exp_shifted_at(xs: &[f64], shift: f64) -> f64 {
        sum_exp_shifted_body(xs, shift)
    }
}

multiversion! {
    /// One block of the one-pass log-sum-exp: `[m, Σ exp(x − m), Σ 0·x]` with `m = max x`.
    /// The last entry is `0` when every `x` is finite and NaN otherwise (a free finiteness check).
    pub(crate) fn block_stats / block_stats_at(xs: &[f64]) -> [f64; 3] {
        let mut mx = [f64::NEG_INFINITY; 8];
        let mut chk = [0.0f64; 8];
        let chunks = xs.chunks_exact(8);
        let rest = chunks.remainder();
        for c in chunks {
            for i in 0..8 {
                mx[i] = mx[i].max(c[i]);
                chk[i] += c[i] * 0.0;
            }
        }
        let mut m = f64::NEG_INFINITY;
        let mut z = 0.0;
        for i in 0..8 {
            m = m.max(mx[i]);
            z += chk[i];
        }
        for &x in rest {
            m = m.max(x);
            z += x * 0.0;
        }
        if !m.is_finite() {
            return [m, f64::NAN, z];
        }
        [m, sum_exp_shifted_body(xs, m), z]
    }
}

/// `exp(x)` for the hot loops: a branch-free polynomial evaluation that the compiler
/// vectorizes, within 4 ulp of `f64::exp` wherever the result is a normal number (checked by a
/// unit test; about 1 ulp measured), correctly rounded from the polynomial in the subnormal range,
/// `0` below `−745.2`, `+∞` above `709.8` and for `+∞`, NaN for NaN.
///
/// Method: `x = k ln 2 + r` with `|r| ≤ ln2/2` (Cody–Waite split of ln 2; `k` rounded by the
/// `1.5·2^52` shifter, so no rounding instruction is needed), `exp(r)` by a degree-13 Taylor
/// polynomial in Horner form (truncation error < 5e-18 on that interval), and `2^k` applied as
/// two exact powers of two `2^{⌊k/2⌋} · 2^{k−⌊k/2⌋}` built in the exponent bits, so that results
/// in the subnormal and overflow ranges are rounded once.
#[inline(always)]
#[allow(clippy::excessive_precision)] // the constants as published (fdlibm)
pub fn fast_exp(x: f64) -> f64 {
    const LN2_HI: f64 = 6.931_471_803_691_238_164_90e-1;
    const LN2_LO: f64 = 1.908_214_929_270_587_700_02e-10;
    const INV_LN2: f64 = std::f64::consts::LOG2_E;
    // 1.5 · 2^52: adding it rounds to an integer, which then sits in the low mantissa bits.
    const SHIFT: f64 = 6_755_399_441_055_744.0;

    // Beyond [−746, 710] the result is 0 or +∞ anyway; NaN passes through the clamp.
    let xc = x.clamp(-746.0, 710.0);
    let kf = xc * INV_LN2 + SHIFT;
    let k = kf - SHIFT;
    let r = (xc - k * LN2_HI) - k * LN2_LO;
    let mut p = 1.0 / 6_227_020_800.0;
    p = p * r + 1.0 / 479_001_600.0;
    p = p * r + 1.0 / 39_916_800.0;
    p = p * r + 1.0 / 3_628_800.0;
    p = p * r + 1.0 / 362_880.0;
    p = p * r + 1.0 / 40_320.0;
    p = p * r + 1.0 / 5_040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    // k ∈ [−1077, 1025] sits in the low bits of kf; k1 = ⌊k/2⌋, k2 = k − k1 ∈ [−539, 513].
    let ki = kf.to_bits().wrapping_sub(SHIFT.to_bits());
    let k1 = (ki.wrapping_add(2048) >> 1).wrapping_sub(1024);
    let k2 = ki.wrapping_sub(k1);
    let s1 = f64::from_bits(k1.wrapping_add(1023) << 52);
    let s2 = f64::from_bits(k2.wrapping_add(1023) << 52);
    p * s1 * s2
}

/// `ln(1 + t)` for `t ∈ [0, 1]`, branch-free and vectorizable, within 1 ulp (fdlibm's `log1p`
/// method: `u = 1 + t` with the rounding correction `c = (t − (u − 1))/u`, `u` scaled into
/// `[√2/2, √2]`, `log(1+f) = 2 atanh(f/(2+f))` by the Remez polynomial `Lg1..Lg7`).
#[inline(always)]
#[allow(clippy::excessive_precision)] // the constants as published (fdlibm)
pub(crate) fn ln_1p_unit(t: f64) -> f64 {
    const LN2_HI: f64 = 6.931_471_803_691_238_164_90e-1;
    const LN2_LO: f64 = 1.908_214_929_270_587_700_02e-10;
    const LG1: f64 = 6.666_666_666_666_735_130e-1;
    const LG2: f64 = 3.999_999_999_940_941_908e-1;
    const LG3: f64 = 2.857_142_874_366_239_149e-1;
    const LG4: f64 = 2.222_219_843_214_978_396e-1;
    const LG5: f64 = 1.818_357_216_161_805_012e-1;
    const LG6: f64 = 1.531_383_769_920_937_332e-1;
    const LG7: f64 = 1.479_819_860_511_658_591e-1;
    let u = 1.0 + t;
    let c = (t - (u - 1.0)) / u;
    let big = u > std::f64::consts::SQRT_2;
    let k = if big { 1.0 } else { 0.0 };
    let f = if big { 0.5 * u } else { u } - 1.0;
    let s = f / (2.0 + f);
    let z = s * s;
    let w = z * z;
    let t1 = w * (LG2 + w * (LG4 + w * LG6));
    let t2 = z * (LG1 + w * (LG3 + w * (LG5 + w * LG7)));
    let r = t2 + t1;
    let hfsq = 0.5 * f * f;
    k * LN2_HI - ((hfsq - (s * (hfsq + r) + (k * LN2_LO + c))) - f)
}

multiversion! {
    /// `out[i] = exp(xs[i])` by [`fast_exp`]. Panics unless the lengths agree.
    pub(crate) fn exp_into / exp_into_at(xs: &[f64], out: &mut [f64]) -> () {
        assert_eq!(xs.len(), out.len());
        for (o, &x) in out.iter_mut().zip(xs) {
            *o = fast_exp(x);
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn vectorized_runs_the_closure_with_the_same_bits() {
        let xs: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let work = || {
            let mut lanes = [0f32; 8];
            for c in xs.chunks_exact(8) {
                for j in 0..8 {
                    lanes[j] += c[j] * c[j] + 1.5 * c[j];
                }
            }
            lanes
        };
        let plain = work();
        let fast = vectorized(work);
        assert_eq!(plain.map(f32::to_bits), fast.map(f32::to_bits));
    }

    use super::*;

    /// Distance in units in the last place (0 for equal values, including equal infinities).
    fn ulps(a: f64, b: f64) -> u64 {
        if a == b {
            return 0;
        }
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs()
    }

    #[test]
    fn fast_exp_matches_libm() {
        // 4 ulp on normal results (the documented accuracy); results in the subnormal range
        // carry fewer bits and are compared at 2 units of the smallest subnormal.
        let mut worst = 0;
        let mut x = -750.0;
        while x < 712.0 {
            let (a, b) = (fast_exp(x), x.exp());
            if b >= f64::MIN_POSITIVE && b.is_finite() {
                worst = worst.max(ulps(a, b));
                assert!(ulps(a, b) <= 4, "x = {x}: {a} vs {b}");
            } else {
                assert!(
                    a == b || (a - b).abs() <= 2.0 * 4.9e-324,
                    "x = {x}: {a} vs {b}"
                );
            }
            x += 0.000_937;
        }
        assert!(worst <= 2, "worst {worst} ulp");
        assert_eq!(fast_exp(f64::NEG_INFINITY), 0.0);
        assert_eq!(fast_exp(f64::INFINITY), f64::INFINITY);
        assert_eq!(fast_exp(-1e300), 0.0);
        assert_eq!(fast_exp(1e300), f64::INFINITY);
        assert!(fast_exp(f64::NAN).is_nan());
        assert_eq!(fast_exp(0.0), 1.0);
        assert_eq!(fast_exp(-0.0), 1.0);
        assert!(ulps(fast_exp(1.0), std::f64::consts::E) <= 1);
    }

    #[test]
    fn ln_1p_unit_matches_libm() {
        let mut worst = 0;
        for i in 0..=200_000 {
            let t = i as f64 / 200_000.0;
            worst = worst.max(ulps(ln_1p_unit(t), t.ln_1p()));
        }
        for e in 1..1075 {
            let t = 2f64.powi(-e);
            worst = worst.max(ulps(ln_1p_unit(t), t.ln_1p()));
            worst = worst.max(ulps(ln_1p_unit(1.3 * t), (1.3 * t).ln_1p()));
        }
        assert!(worst <= 1, "worst {worst} ulp");
        assert_eq!(ln_1p_unit(0.0), 0.0);
        assert_eq!(ln_1p_unit(1.0), std::f64::consts::LN_2);
    }

    fn logits(n: usize, seed: u64, scale: f64) -> Vec<f64> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n).map(|_| scale * (rng.gen::<f64>() - 0.5)).collect()
    }

    /// The baseline, AVX2 and AVX-512 builds of every kernel give the same bits.
    #[test]
    fn simd_levels_are_bit_identical() {
        let levels = Level::available();
        for n in [0, 1, 9, 1000, BLOCK + 17] {
            let xs = logits(n, 7, 60.0);
            let mut shifted = xs.clone();
            shifted.iter_mut().for_each(|x| *x -= 30.0);
            let base_sum = sum_exp_shifted_at(Level::Baseline, &xs, 3.0);
            let base_stats = block_stats_at(Level::Baseline, &xs);
            let mut base_exp = vec![0.0; n];
            exp_into_at(Level::Baseline, &shifted, &mut base_exp);
            for &l in &levels {
                assert_eq!(
                    sum_exp_shifted_at(l, &xs, 3.0).to_bits(),
                    base_sum.to_bits(),
                    "{l:?}"
                );
                let s = block_stats_at(l, &xs);
                for k in 0..3 {
                    assert_eq!(s[k].to_bits(), base_stats[k].to_bits(), "{l:?}");
                }
                let mut e = vec![0.0; n];
                exp_into_at(l, &shifted, &mut e);
                assert!(e
                    .iter()
                    .zip(&base_exp)
                    .all(|(a, b)| a.to_bits() == b.to_bits()));
            }
        }
    }
}
