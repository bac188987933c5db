//! Graph nodes whose forward value is computed without an autograd graph and whose backward
//! pass is a function of the inputs, on any device: gradient checkpointing of a whole decoder
//! layer built from candle's own ops ([`checkpoint`]), and hand-written backward passes of
//! chunked computations ([`with_backward`]). This is how the plain-candle path (the CUDA path,
//! and the CPU path with the fused kernels off) keeps memory bounded, since candle has no
//! checkpointing API.
//!
//! A candle custom op must produce its value from storages in `cpu_fwd` / `cuda_fwd`; the nodes
//! here compute the value beforehand with ordinary tensor ops on detached inputs and their
//! forward hands a copy of that value's storage back (on the CPU or a CUDA device alike), so
//! only the backward pass is hand-written.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, CustomOp2, Layout, MetalStorage, Result, Shape, Storage,
    Tensor, Var,
};

use crate::fused::GradSink;

/// A precomputed value (contiguous, offset 0) handed out by the nodes' forward functions.
#[derive(Clone)]
struct Value(Tensor);

impl Value {
    fn new(t: &Tensor) -> Result<Self> {
        let t = t.detach();
        let t = if t.is_contiguous() && t.layout().start_offset() == 0 {
            t
        } else {
            t.copy()?
        };
        Ok(Self(t))
    }

    fn shape(&self) -> Shape {
        self.0.shape().clone()
    }

    fn cpu(&self) -> Result<(CpuStorage, Shape)> {
        let (s, l) = self.0.storage_and_layout();
        match &*s {
            Storage::Cpu(c) => Ok((c.try_clone(l)?, self.shape())),
            _ => candle_core::bail!("recompute: value and input on different devices"),
        }
    }

    fn cuda(&self) -> Result<(CudaStorage, Shape)> {
        let (s, l) = self.0.storage_and_layout();
        match &*s {
            Storage::Cuda(c) => Ok((c.try_clone(l)?, self.shape())),
            _ => candle_core::bail!("recompute: value and input on different devices"),
        }
    }

    fn metal(&self) -> Result<(MetalStorage, Shape)> {
        let (s, l) = self.0.storage_and_layout();
        match &*s {
            Storage::Metal(c) => Ok((c.try_clone(l)?, self.shape())),
            _ => candle_core::bail!("recompute: value and input on different devices"),
        }
    }
}

/// A function of one tensor to recompute with a graph: `f(x, grad)` builds `y` from `x` (with
/// `grad` false, from detached parameters: nothing is kept).
pub type LayerFn = Arc<dyn Fn(&Tensor, bool) -> Result<Tensor> + Send + Sync>;

struct Checkpoint {
    value: Value,
    f: LayerFn,
    params: Vec<Tensor>,
    sink: GradSink,
}

impl CustomOp1 for Checkpoint {
    fn name(&self) -> &'static str {
        "checkpointed-layer"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.value.cpu()
    }

    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout) -> Result<(CudaStorage, Shape)> {
        self.value.cuda()
    }

    fn metal_fwd(&self, _: &MetalStorage, _: &Layout) -> Result<(MetalStorage, Shape)> {
        self.value.metal()
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let leaf = Var::from_tensor(&x.detach())?;
        let y = (self.f)(leaf.as_tensor(), true)?;
        let grads = (y * grad.detach())?.sum_all()?.backward()?;
        for p in &self.params {
            if let Some(g) = grads.get(p) {
                self.sink.push(p, g.clone())?;
            }
        }
        Ok(grads.get(leaf.as_tensor()).cloned())
    }
}

/// `y = f(x)` with gradient checkpointing: the forward pass keeps nothing of `f` but its
/// input; the backward pass runs `f` again on `x` with a graph, backpropagates the incoming
/// gradient through it and leaves the gradients of `params` (the variables `f` uses that
/// carry one) in `sink`, returning `∂/∂x`. Recomputation repeats the same ops, so the
/// gradients are those of the graph without checkpointing (bit for bit on the CPU).
///
/// # Errors
/// Errors of `f`.
pub fn checkpoint(x: &Tensor, f: LayerFn, params: Vec<Tensor>, sink: &GradSink) -> Result<Tensor> {
    let params: Vec<Tensor> = params.into_iter().filter(Tensor::track_op).collect();
    let value = Value::new(&f(&x.detach(), false)?)?;
    if !x.track_op() && params.is_empty() {
        return Ok(value.0);
    }
    // An input that carries no gradient still needs a node for the parameters' sake.
    let x = if x.track_op() {
        x.clone()
    } else {
        Var::from_tensor(x)?.as_tensor().clone()
    };
    x.apply_op1(Checkpoint {
        value,
        f,
        params,
        sink: sink.clone(),
    })
}

/// The backward pass of [`with_backward`]: `(a, b, ∂/∂y)` → `(∂/∂a, ∂/∂b)`.
pub type BackwardFn = Arc<
    dyn Fn(&Tensor, &Tensor, &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> + Send + Sync,
>;

struct Attach {
    value: Value,
    bwd: BackwardFn,
}

impl CustomOp2 for Attach {
    fn name(&self) -> &'static str {
        "hand-written-backward"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.value.cpu()
    }

    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        self.value.cuda()
    }

    fn metal_fwd(
        &self,
        _: &MetalStorage,
        _: &Layout,
        _: &MetalStorage,
        _: &Layout,
    ) -> Result<(MetalStorage, Shape)> {
        self.value.metal()
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        (self.bwd)(a, b, grad)
    }
}

/// A node `y = value` (computed beforehand from `a` and `b` without a graph) whose backward
/// pass is `bwd(a, b, ∂/∂y)`: `value` must be the function's value at `a`, `b`, and `bwd` its
/// exact gradient. Without an input that carries a gradient, `value` itself is returned.
///
/// # Errors
/// Tensor errors.
pub fn with_backward(value: &Tensor, a: &Tensor, b: &Tensor, bwd: BackwardFn) -> Result<Tensor> {
    let value = Value::new(value)?;
    if !a.track_op() && !b.track_op() {
        return Ok(value.0);
    }
    a.apply_op2(b, Attach { value, bwd })
}
