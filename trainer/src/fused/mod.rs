//! Fused CPU kernels with hand-written backward passes for the training forward, one family
//! per file:
//!
//! | file | computes | public ops |
//! | --- | --- | --- |
//! | `norm.rs` | RMSNorm `y = x / sqrt(mean(x²) + ε) ⊙ w` | [`rms_norm`] |
//! | `heads.rs` | head split `[B·l, h·d] → [B, h', l, d]` with RoPE and grouped-query repetition | [`split_heads`] |
//! | `softmax.rs` | `softmax(scale · s + mask)` over the last dimension | [`masked_softmax`] |
//! | `cached_attention.rs` | a decoding step's attention over the KV cache, read in place (no gradient) | [`cached_attention`] |
//! | `attention.rs` | the attention core `softmax(scale · q kᵀ + mask) v`, heads merged | [`attention()`] |
//! | `linear.rs` | `y = x wᵀ`, and `y = r + x wᵀ` (residual folded in) | [`linear()`], [`linear_add`] |
//! | `mlp.rs` | `silu(a) ⊙ b` and the gated MLP input `silu(x w_gateᵀ) ⊙ x w_upᵀ` | [`silu_mul`], [`gate_up`] |
//! | `lm_head.rs` | `z[n, t_n] − log Σ_v exp z[n, v]`, with `z = h wᵀ` formed in chunks | [`token_logps`], [`lm_head_logps`] (+ `_into`, `_chunked`) |
//! | `embedding.rs` | the rows `table[ids]` | [`embedding()`] |
//! | `layer.rs` | a whole decoder layer (norms, attention, MLP, residuals, LoRA) as one node | [`decoder_layer`] |
//! | `sink.rs` | weight gradients left outside candle's store | [`GradSink`] |
//! | `gemm.rs` | `dst (+)= lhs · rhs` on the `gemm` crate | (internal) |
//! | `rows.rs` | `y = x wᵀ` for a few rows without a gradient (decoding), the weight read once | (inside [`linear()`], [`linear_add`], [`gate_up`]) |
//! | `real.rs` | the f32/f64 element trait, `exp`, row max / sum / log-sum-exp | (internal) |
//! | `dispatch.rs` | the generic custom-op wrapper (`Kernel`, `Op`), parallel row builders, the buffer pool | (internal) |
//!
//! The whole-gradient kernels (dot product, scaling, the DPO-PG projection) are in
//! [`crate::train::grads::reduce`], the fused AdamW step in [`crate::train::optim::adamw`].
//!
//! Each op is a candle custom op whose `bwd` returns the exact gradient (computed by a
//! second, no-backward custom op or directly), so unlike candle's own fused ops
//! (`softmax_last_dim`, `rms_norm`, `rope`) they record a backward pass. They run on
//! contiguous f32/f64 CPU tensors, spread rows over rayon's pool, and replace chains of 4–8
//! candle ops, each of which allocates and writes a full tensor in the forward and two more (a
//! zero gradient buffer and an accumulation) in the backward. [`enabled`] tells when they
//! apply; otherwise the callers in [`crate::model`] use the unfused, differentiable candle ops
//! (other devices, half types).
//!
//! The arithmetic follows the unfused path op by op (same formulas, same order of the
//! element-wise operations); only the summation order of reductions may differ, so results
//! agree to rounding. `tests/fused_ops.rs` checks values and gradients against the unfused
//! path in f64 and f32.

use candle_core::{DType, Tensor};

mod attention;
mod cached_attention;
pub(crate) mod dispatch;
mod embedding;
mod gemm;
mod heads;
mod layer;
mod linear;
mod lm_head;
mod mlp;
mod norm;
pub(crate) mod real;
mod rows;
mod sink;
mod softmax;

pub use attention::attention;
pub use cached_attention::cached_attention;
pub use embedding::embedding;
pub use heads::split_heads;
pub use layer::{decoder_layer, LayerDims, LayerWeights, LoraWeights};
pub use linear::{linear, linear_add};
pub use lm_head::{
    head_chunk_rows, lm_head_logps, lm_head_logps_chunked, lm_head_logps_into, token_logps,
    HEAD_CHUNK_ELEMS,
};
pub use mlp::{gate_up, silu_mul};
pub use norm::rms_norm;
pub(crate) use rows::ROWS_MAX;
pub use sink::GradSink;
pub use softmax::masked_softmax;

/// Whether the fused kernels apply to `t`: a CPU tensor of dtype f32 or f64.
pub fn enabled(t: &Tensor) -> bool {
    t.device().is_cpu() && matches!(t.dtype(), DType::F32 | DType::F64)
}
