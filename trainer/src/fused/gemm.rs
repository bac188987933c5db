//! Matrix products on the `gemm` crate, the kernels' only dense products:
//! `dst = lhs · rhs` (`gemm_into`, `gemm_vec` into a new vector), `dst += lhs · rhs`
//! (`gemm_acc`), and `gemm_raw` with a row stride for `dst` and an explicit parallelism (the
//! attention blocks run one product per rayon task, single-threaded). Operands are read
//! through `(column, row)` strides, so a transpose costs nothing.

use super::real::Real;

/// The parallelism of a product that has rayon's whole pool to itself.
pub(crate) fn gemm_par() -> gemm::Parallelism {
    let threads = rayon::current_num_threads();
    if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    }
}

/// `dst = lhs · rhs` (`m × k` by `k × n`, row-major `dst`) through the `gemm` crate, written into
/// `n·m` uninitialized elements; `*_cs`/`*_rs` are column/row strides in elements.
///
/// # Safety
/// `dst` must be valid for `m·n` writes, `lhs` and `rhs` for reads at every index their
/// strides reach, and none may overlap `dst`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_into<T: Real>(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut T,
    lhs: *const T,
    lhs_cs: usize,
    lhs_rs: usize,
    rhs: *const T,
    rhs_cs: usize,
    rhs_rs: usize,
) {
    gemm_raw(
        (m, n, k),
        dst,
        n,
        lhs,
        (lhs_cs, lhs_rs),
        rhs,
        (rhs_cs, rhs_rs),
        gemm_par(),
        false,
    );
}

/// [`gemm_into`] with a row stride for `dst` and an explicit parallelism; with `acc` the
/// product is added to `dst` (initialized) instead of overwriting it.
///
/// # Safety
/// As [`gemm_into`], `dst` rows `dst_rs` apart.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_raw<T: Real>(
    (m, n, k): (usize, usize, usize),
    dst: *mut T,
    dst_rs: usize,
    lhs: *const T,
    (lhs_cs, lhs_rs): (usize, usize),
    rhs: *const T,
    (rhs_cs, rhs_rs): (usize, usize),
    par: gemm::Parallelism,
    acc: bool,
) {
    let _p = crate::profile::gemm(m, n, k);
    if m == 0 || n == 0 || (acc && k == 0) {
        return;
    }
    if k == 0 {
        for i in 0..m {
            for j in 0..n {
                dst.add(i * dst_rs + j).write(T::zero());
            }
        }
        return;
    }
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        acc,
        lhs,
        lhs_cs as isize,
        lhs_rs as isize,
        rhs,
        rhs_cs as isize,
        rhs_rs as isize,
        if acc { T::one() } else { T::zero() },
        T::one(),
        false,
        false,
        false,
        par,
    );
}

/// `lhs · rhs` (`m × k` by `k × n`, operands read through their `(column, row)` strides) as a
/// new row-major `m × n` vector, written whole by the parallel gemm (no zero-fill first).
///
/// # Panics
/// If an operand is too short for the strides and sizes given.
pub(crate) fn gemm_vec<T: Real>(
    (m, n, k): (usize, usize, usize),
    lhs: &[T],
    (lhs_cs, lhs_rs): (usize, usize),
    rhs: &[T],
    (rhs_cs, rhs_rs): (usize, usize),
) -> Vec<T> {
    assert!(
        lhs.len() >= reach((lhs_cs, lhs_rs), m, k) && rhs.len() >= reach((rhs_cs, rhs_rs), k, n),
        "gemm_vec: operands too short"
    );
    let mut out: Vec<T> = Vec::with_capacity(m * n);
    // SAFETY: out has room for m·n elements, all written by the gemm; every operand index the
    // strides reach lies within the slices (checked above).
    unsafe {
        gemm_into(
            m,
            n,
            k,
            out.as_mut_ptr(),
            lhs.as_ptr(),
            lhs_cs,
            lhs_rs,
            rhs.as_ptr(),
            rhs_cs,
            rhs_rs,
        );
        out.set_len(m * n);
    }
    out
}

/// `dst += lhs · rhs` (as [`gemm_into`], `dst` row-major `m × n` and initialized).
///
/// # Safety
/// As [`gemm_into`].
pub(crate) unsafe fn gemm_acc<T: Real>(
    mnk: (usize, usize, usize),
    dst: *mut T,
    lhs: *const T,
    lhs_strides: (usize, usize),
    rhs: *const T,
    rhs_strides: (usize, usize),
) {
    let par = gemm_par();
    gemm_raw(
        mnk,
        dst,
        mnk.1,
        lhs,
        lhs_strides,
        rhs,
        rhs_strides,
        par,
        true,
    );
}

/// `dst += lhs · rhs` on slices (`dst` row-major `m × n`, initialized), as [`gemm_acc`].
///
/// # Panics
/// If a slice is too short for the sizes and strides given.
pub(crate) fn gemm_add<T: Real>(
    mnk: (usize, usize, usize),
    dst: &mut [T],
    lhs: &[T],
    lhs_strides: (usize, usize),
    rhs: &[T],
    rhs_strides: (usize, usize),
) {
    let (m, n, k) = mnk;
    assert!(
        dst.len() >= m * n
            && lhs.len() >= reach(lhs_strides, m, k)
            && rhs.len() >= reach(rhs_strides, k, n),
        "gemm_add: operands too short"
    );
    // SAFETY: every index the sizes and strides reach lies within the slices (checked above);
    // `dst` is borrowed mutably, so it overlaps neither operand.
    unsafe {
        gemm_acc(
            mnk,
            dst.as_mut_ptr(),
            lhs.as_ptr(),
            lhs_strides,
            rhs.as_ptr(),
            rhs_strides,
        )
    }
}

/// The elements an `r × c` operand read through `(column, row)` strides spans.
fn reach((cs, rs): (usize, usize), r: usize, c: usize) -> usize {
    if r == 0 || c == 0 {
        0
    } else {
        (r - 1) * rs + (c - 1) * cs + 1
    }
}
