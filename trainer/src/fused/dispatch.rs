//! What every kernel shares: the CPU data of tensors, the dtype dispatch, parallel row
//! builders and the buffer pool.
//!
//! - [`Kernel`] and [`Op`]: a kernel is written once, generic over its element type
//!   (`cpu::<T: Real>`), with its backward pass (if any) in the same impl; [`Op`] makes it a
//!   candle custom op of one, two or three inputs (`CustomOp1/2/3`), checks that the float
//!   inputs share one dtype, f32 or f64, and runs `cpu` at that type. No per-op f32/f64 arms.
//!   [`apply`] is the public ops' forward scaffolding: contiguous inputs, one graph node.
//! - [`InPlaceKernel`] and [`InPlace`]: the same for kernels that overwrite their first
//!   tensor's own data (`InplaceOp1/2/3`).
//! - [`data`], [`Reads`], [`with_slice`]: contiguous CPU data as slices.
//! - [`build_rows`], [`write_all`], [`par_rows`], [`par_zeros`], [`par_copy`]: vectors of
//!   `rows × row_len` elements written over rayon's pool, tasks of at least
//!   [`MIN_ELEMS_PER_TASK`] elements, without a zero-fill first where every element is written.
//! - [`pooled_buf`], [`recycle_buf`], [`recycle_any`]: logits-sized buffers kept between steps.

use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, InplaceOp1, InplaceOp2, InplaceOp3,
    Layout, Result, Shape, Tensor, WithDType,
};
use rayon::prelude::*;
use std::mem::MaybeUninit;

use super::real::Real;

/// A fused CPU kernel written once for f32 and f64; [`Op`] makes it a candle custom op.
pub(crate) trait Kernel: Send + Sync {
    /// candle's name of the op (`fused-…`), also in errors.
    const NAME: &'static str;
    /// The input holding u32 token ids, if any (the others share the float dtype).
    const IDS: Option<usize> = None;

    /// The output and its shape from the inputs' storages and layouts, at element type `T`
    /// (the dtype of the float inputs).
    fn cpu<T: Real>(&self, ins: &Ins<'_>) -> Result<(Vec<T>, Shape)>;

    /// The gradients of the inputs (in order; `None` for one that gets none) from the inputs,
    /// the forward result and its gradient. Kernels that are themselves backward passes (run
    /// without a backward) keep the default: an error.
    fn grads(
        &self,
        _args: &[&Tensor],
        _res: &Tensor,
        _grad: &Tensor,
    ) -> Result<Vec<Option<Tensor>>> {
        Err(candle_core::Error::BackwardNotSupported { op: Self::NAME })
    }
}

/// A kernel's inputs: CPU storages and their layouts.
pub(crate) struct Ins<'a>(&'a [(&'a CpuStorage, &'a Layout)]);

impl Ins<'_> {
    /// The contiguous data of input `i`.
    pub(crate) fn get<T: WithDType>(&self, i: usize) -> Result<&[T]> {
        let (s, l) = self.0[i];
        data::<T>(s, l)
    }

    /// The shape of input `i`.
    pub(crate) fn shape(&self, i: usize) -> &Shape {
        self.0[i].1.shape()
    }
}

/// `kernel` applied to contiguous copies (views where already contiguous) of its inputs, as
/// one graph node with its backward pass: the forward scaffolding of every public op.
pub(crate) fn apply<K: Kernel + 'static>(ins: &[&Tensor], kernel: K) -> Result<Tensor> {
    let c: Vec<Tensor> = ins.iter().map(|t| t.contiguous()).collect::<Result<_>>()?;
    match &c[..] {
        [a] => a.apply_op1(Op(kernel)),
        [a, b] => a.apply_op2(b, Op(kernel)),
        [a, b, d] => a.apply_op3(b, d, Op(kernel)),
        _ => bail!("{}: a custom op takes one to three tensors", K::NAME),
    }
}

/// A [`Kernel`] as a candle custom op (`CustomOp1`, `CustomOp2` or `CustomOp3` by the number of
/// inputs it is applied to).
pub(crate) struct Op<K>(pub(crate) K);

impl<K: Kernel> Op<K> {
    /// Runs the kernel at the float inputs' dtype: f32 or f64, the same for all.
    fn run(&self, ins: &[(&CpuStorage, &Layout)]) -> Result<(CpuStorage, Shape)> {
        let dts: Vec<DType> = ins
            .iter()
            .enumerate()
            .filter(|(i, _)| Some(*i) != K::IDS)
            .map(|(_, (s, _))| s.dtype())
            .collect();
        let ins = Ins(ins);
        if dts.iter().all(|&d| d == DType::F32) {
            let (v, s) = self.0.cpu::<f32>(&ins)?;
            Ok((CpuStorage::F32(v), s))
        } else if dts.iter().all(|&d| d == DType::F64) {
            let (v, s) = self.0.cpu::<f64>(&ins)?;
            Ok((CpuStorage::F64(v), s))
        } else {
            bail!(
                "{}: fused CPU kernel needs f32 or f64 inputs of one dtype, got {dts:?}",
                K::NAME
            )
        }
    }

    fn input_grads<const N: usize>(
        &self,
        args: [&Tensor; N],
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<[Option<Tensor>; N]> {
        let mut g = self.0.grads(&args, res, grad)?.into_iter();
        Ok(std::array::from_fn(|_| g.next().flatten()))
    }
}

/// The candle custom-op trait of one arity for [`Op`]: `cpu_fwd` runs the kernel
/// ([`Op::run`]) on the storages, `bwd` returns [`Kernel::grads`] as candle's tuple (a lone
/// `Option` for one input). One body for `CustomOp1/2/3`, which differ only in their arity.
macro_rules! custom_op {
    ($op:ident: $(($s:ident, $l:ident, $arg:ident, $g:ident)),+) => {
        impl<K: Kernel> $op for Op<K> {
            fn name(&self) -> &'static str {
                K::NAME
            }

            fn cpu_fwd(&self, $($s: &CpuStorage, $l: &Layout),+) -> Result<(CpuStorage, Shape)> {
                self.run(&[$(($s, $l)),+])
            }

            #[allow(unused_parens, clippy::type_complexity)]
            fn bwd(
                &self,
                $($arg: &Tensor,)+
                res: &Tensor,
                grad: &Tensor,
            ) -> Result<($(custom_op!(@grad $g)),+)> {
                let [$($g),+] = self.input_grads([$($arg),+], res, grad)?;
                Ok(($($g),+))
            }
        }
    };
    (@grad $g:ident) => {
        Option<Tensor>
    };
}

custom_op!(CustomOp1: (s1, l1, a, ga));
custom_op!(CustomOp2: (s1, l1, a, ga), (s2, l2, b, gb));
custom_op!(CustomOp3: (s1, l1, a, ga), (s2, l2, b, gb), (s3, l3, c, gc));

/// An in-place CPU kernel written once for f32 and f64: the first tensor's own data `dst`
/// (of shape `shape`) is overwritten from the other inputs `srcs`; [`InPlace`] makes it a candle
/// in-place op.
pub(crate) trait InPlaceKernel: Send + Sync {
    /// candle's name of the op (`fused-…`), also in errors.
    const NAME: &'static str;

    /// Updates `dst` at its element type `T` (the sources are read at the same type).
    fn cpu<T: Real>(&self, dst: &mut [T], shape: &Shape, srcs: &Ins<'_>) -> Result<()>;
}

/// An [`InPlaceKernel`] as a candle in-place op (`InplaceOp1/2/3` by the number of tensors).
pub(crate) struct InPlace<K>(pub(crate) K);

impl<K: InPlaceKernel> InPlace<K> {
    /// Runs the kernel on the contiguous data of `dst` at its dtype, f32 or f64.
    fn run(&self, dst: &mut CpuStorage, l: &Layout, srcs: &[(&CpuStorage, &Layout)]) -> Result<()> {
        let (a, b) = l
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg(format!("{}: non-contiguous", K::NAME)))?;
        let ins = Ins(srcs);
        match dst {
            CpuStorage::F32(d) => self.0.cpu(&mut d[a..b], l.shape(), &ins),
            CpuStorage::F64(d) => self.0.cpu(&mut d[a..b], l.shape(), &ins),
            d => bail!(
                "{}: fused CPU kernel needs f32 or f64, got {:?}",
                K::NAME,
                d.dtype()
            ),
        }
    }
}

/// The candle in-place op trait of one arity for [`InPlace`]: the first storage is
/// overwritten from the others ([`InPlace::run`]). One body for `InplaceOp1/2/3`.
macro_rules! inplace_op {
    ($op:ident: $dst:ident, $dl:ident $(, ($s:ident, $l:ident))*) => {
        impl<K: InPlaceKernel> $op for InPlace<K> {
            fn name(&self) -> &'static str {
                K::NAME
            }

            fn cpu_fwd(
                &self,
                $dst: &mut CpuStorage,
                $dl: &Layout
                $(, $s: &CpuStorage, $l: &Layout)*
            ) -> Result<()> {
                self.run($dst, $dl, &[$(($s, $l)),*])
            }
        }
    };
}

inplace_op!(InplaceOp1: s1, l1);
inplace_op!(InplaceOp2: s1, l1, (s2, l2));
inplace_op!(InplaceOp3: s1, l1, (s2, l2), (s3, l3));

/// Rows handled by one rayon task at least (keeps tasks large enough to amortize scheduling).
pub(crate) const MIN_ELEMS_PER_TASK: usize = 1 << 14;

/// The contiguous data of a CPU storage under `layout`.
pub(crate) fn data<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    let d = s.as_slice::<T>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&d[a..b]),
        None => bail!("fused op: non-contiguous input"),
    }
}

/// Read guards on CPU tensors' storages, lending their data as slices.
pub(crate) struct Reads<'a>(Vec<(candle_core::StorageRef<'a>, &'a Layout)>);

impl<'a> Reads<'a> {
    pub(crate) fn of(ts: &[&'a Tensor]) -> Self {
        Self(ts.iter().map(|t| t.storage_and_layout()).collect())
    }

    /// The contiguous data of the `i`-th tensor.
    pub(crate) fn get<T: WithDType>(&self, i: usize) -> Result<&[T]> {
        let (st, l) = &self.0[i];
        match &**st {
            candle_core::Storage::Cpu(c) => data::<T>(c, l),
            _ => bail!("fused op: expected a CPU tensor"),
        }
    }
}

/// Rows per rayon task for rows of `row_len` elements.
pub(crate) fn rows_per_task(row_len: usize) -> usize {
    MIN_ELEMS_PER_TASK.div_ceil(row_len.max(1)).max(1)
}

/// Fills `out` (rows of `row_len`) in parallel: `f(first_row_index, rows)`, compiled for the
/// CPU's vector width ([`difinfo::simd::vectorized`]; as in [`build_rows`]).
pub(crate) fn par_rows<T: Send>(out: &mut [T], row_len: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    let rows = rows_per_task(row_len);
    out.par_chunks_mut(rows * row_len)
        .enumerate()
        .for_each(|(c, chunk)| difinfo::simd::vectorized(|| f(c * rows, chunk)));
}

/// A vector of `n_rows · row_len` elements built in parallel without zero-filling it first:
/// `f(first_row, rows)` receives consecutive whole rows, uninitialized, and must write every
/// element (through [`write_all`]).
pub(crate) fn build_rows<T: Send>(
    n_rows: usize,
    row_len: usize,
    f: impl Fn(usize, &mut [MaybeUninit<T>]) + Sync,
) -> Vec<T> {
    let n = n_rows * row_len;
    let mut v: Vec<T> = Vec::with_capacity(n);
    let rows = rows_per_task(row_len);
    v.spare_capacity_mut()[..n]
        .par_chunks_mut((rows * row_len).max(1))
        .enumerate()
        .for_each(|(c, chunk)| difinfo::simd::vectorized(|| f(c * rows, chunk)));
    // SAFETY: `f` wrote every element (each write goes through `write_all`, which checks that
    // it covered its whole slice); a panic in `f` propagates before this line.
    unsafe { v.set_len(n) };
    v
}

/// `n` zeros, written over rayon's pool (a serial memset of an activation-sized buffer
/// leaves the other cores idle).
pub(crate) fn par_zeros<T: WithDType>(n: usize) -> Vec<T> {
    let mut v: Vec<T> = Vec::with_capacity(n);
    v.spare_capacity_mut()[..n]
        .par_chunks_mut(MIN_ELEMS_PER_TASK)
        .for_each(|c| {
            for x in c {
                x.write(T::zero());
            }
        });
    // SAFETY: every element was just written.
    unsafe { v.set_len(n) };
    v
}

/// A copy of `x`, written over rayon's pool.
pub(crate) fn par_copy<T: WithDType>(x: &[T]) -> Vec<T> {
    build_rows(x.len(), 1, |r0, o| {
        let n = o.len();
        write_all(o, x[r0..r0 + n].iter().copied());
    })
}

/// Writes `src` into every element of `dst` and returns it as initialized.
///
/// # Panics
/// If `src` does not have exactly `dst.len()` items.
pub(crate) fn write_all<T>(
    dst: &mut [MaybeUninit<T>],
    src: impl IntoIterator<Item = T>,
) -> &mut [T] {
    let mut k = 0;
    for (d, x) in dst.iter_mut().zip(src) {
        d.write(x);
        k += 1;
    }
    assert_eq!(k, dst.len(), "write_all: short source");
    // SAFETY: all `dst.len()` elements were just written; MaybeUninit<T> has T's layout.
    unsafe { &mut *(dst as *mut [MaybeUninit<T>] as *mut [T]) }
}

/// A raw pointer that rayon tasks writing disjoint parts of one buffer can share.
#[derive(Clone, Copy)]
pub(crate) struct SyncPtr<T>(pub(crate) *mut T);
// SAFETY: only used for writes to disjoint elements, each by one task.
unsafe impl<T> Send for SyncPtr<T> {}
unsafe impl<T> Sync for SyncPtr<T> {}

impl<T> SyncPtr<T> {
    pub(crate) fn get(self) -> *mut T {
        self.0
    }
}

/// The contiguous CPU data of a tensor, under its read guard.
pub(crate) fn with_slice<T: WithDType, R>(
    t: &Tensor,
    f: impl FnOnce(&[T]) -> Result<R>,
) -> Result<R> {
    let (st, l) = t.storage_and_layout();
    match &*st {
        candle_core::Storage::Cpu(c) => f(data::<T>(c, l)?),
        _ => bail!("fused op: expected a CPU tensor"),
    }
}

/// Logits buffers (`[N, V]`, tens of MB) kept between steps: above glibc's mmap ceiling each
/// fresh one would be mapped, faulted in page by page and unmapped again every step.
static LOGITS_POOL: std::sync::Mutex<Vec<Box<dyn std::any::Any + Send>>> =
    std::sync::Mutex::new(Vec::new());

/// Buffers the pool keeps at most (chosen and rejected may run as two forward passes).
const LOGITS_POOL_MAX: usize = 2;

/// An empty vector with room for `len` elements, from the pool when one fits.
pub(crate) fn pooled_buf<T: Real>(len: usize) -> Vec<T> {
    if let Ok(mut pool) = LOGITS_POOL.lock() {
        let fits = pool.iter().position(|b| {
            b.downcast_ref::<Vec<T>>()
                .is_some_and(|v| v.capacity() >= len)
        });
        if let Some(i) = fits {
            if let Ok(v) = pool.swap_remove(i).downcast::<Vec<T>>() {
                let mut v = *v;
                v.clear();
                return v;
            }
        }
    }
    Vec::with_capacity(len)
}

/// Returns `v` to the pool (dropped when the pool is full).
pub(crate) fn recycle_buf<T: Real>(v: Vec<T>) {
    recycle_any(Box::new(v));
}

/// Returns a pooled buffer kept as `Box<dyn Any>` (a `Vec<T>`) to the pool (dropped when full).
pub(crate) fn recycle_any(b: Box<dyn std::any::Any + Send>) {
    if let Ok(mut pool) = LOGITS_POOL.lock() {
        if pool.len() < LOGITS_POOL_MAX {
            pool.push(b);
        }
    }
}
