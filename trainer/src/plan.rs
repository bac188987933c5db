//! A memory and compute plan of a DPO training run before it starts (`difinfo-train plan`):
//! per device, the bytes of the weights, gradients, optimizer state and activations that this
//! trainer holds at its peak, and the FLOPs and tokens of one optimizer step.
//!
//! The model follows this trainer's implementation (candle), not PyTorch's:
//! - **Weights** in the parameter dtype (`--dtype`); `--bf16` computes in bf16 over those
//!   parameters: there are **no separate f32 master weights** (with f32 parameters the
//!   parameters are the master copy; with `--dtype bf16` there is none), and on the plain path
//!   each use of a weight casts it, so the graph holds a compute-dtype copy of the weights it
//!   used ([`crate::model`]'s `Lin::forward`).
//! - **Gradients** in f32 whatever the parameter dtype (f64 for f64), one per trainable
//!   variable ([`crate::train::grads::grad_dtype`]); with accumulation (K ≥ 2) the running sum,
//!   the micro-batch's gradient and their new sum are alive at once (`Grads::add` is not in
//!   place).
//! - **Optimizer state** in f32 (f64 for f64 variables): AdamW two moments, RMSprop one, SGD
//!   none ([`crate::train::optim`]); under ZeRO stage 1 a rank holds the state of the
//!   variables [`crate::shard::owners`] gives it.
//! - **Activations** of a DPO micro-batch: chosen and rejected run in one forward pass, so
//!   `2·B` sequences, each counted at the full `--max-length` (the batch is padded to its
//!   longest sequence). What a pass keeps depends on where the layers run ([`Kernels`]): the
//!   fused CPU layer keeps 11 tensors per layer and frees them as its backward pass runs;
//!   plain candle ops keep every intermediate of the graph (the attention scores six times:
//!   raw, scaled, masked, and softmax's difference, exponential and quotient) until the step's
//!   loss is dropped. Attention probabilities are kept per layer (no flash attention in
//!   training, [`crate::model`]'s `forward_memory`); gradient checkpointing keeps each layer's
//!   input and recomputes one layer at a time in the backward pass ([`crate::recompute`]).
//!
//! The terms were checked against `difinfo-train bench`'s measured peak resident set on the
//! CPU (trainer/README.md, "Measurements"): the fused path within 3 % with
//! [`FUSED_TRANSIENT_LAYERS`]; the plain path (bf16 compute on the CPU) reads 27–43 % low, so
//! [`PLAIN_TRANSIENT_LAYERS`] is a count, not a calibration, and plain-path figures are lower
//! bounds until a GPU run measures them.

use std::path::Path;

use candle_core::DType;
use serde::Serialize;
use serde_json::Value;

use crate::config_json::ModelConfig;
use crate::dtype::accumulation_dtype;
use crate::error::{Error, Result};
use crate::lora::{LoraConfig, PROJECTIONS};
use crate::train::grads::grad_dtype;
use crate::train::optim::OptimizerKind;

/// The backward pass of one fused decoder layer allocates about this many times what the
/// layer's forward kept (gradients of its activations), on top of what is kept: calibrated on
/// the SmolLM2-135M shape (trainer/README.md, "Measurements").
pub const FUSED_TRANSIENT_LAYERS: f64 = 1.0;

/// As [`FUSED_TRANSIENT_LAYERS`], for a layer of plain candle ops (candle's backward pass
/// keeps the gradient of every intermediate of the layer until it is consumed): not
/// calibrated (the plain path reads low on the CPU; see the module's doc).
pub const PLAIN_TRANSIENT_LAYERS: f64 = 1.0;

/// The ZeRO stages this trainer implements.
pub const SUPPORTED_ZERO_STAGES: [usize; 2] = [0, 1];

/// Where the decoder layers run, which decides what a forward pass keeps for the backward
/// pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kernels {
    /// The fused CPU layer ([`crate::fused::decoder_layer`]): f32 or f64 compute on the CPU.
    Fused,
    /// Plain candle ops: a CUDA device, or bf16 / f16 compute.
    Plain,
}

impl Kernels {
    /// The trainer's choice: [`Kernels::Fused`] for f32/f64 compute on the CPU
    /// ([`crate::fused::enabled`]), [`Kernels::Plain`] otherwise.
    pub fn of(cuda: bool, compute: DType) -> Self {
        if !cuda && matches!(compute, DType::F32 | DType::F64) {
            Kernels::Fused
        } else {
            Kernels::Plain
        }
    }
}

/// A model as the plan sees it: the configuration of a supported architecture
/// ([`ModelConfig`]) and what its layers keep beyond Llama's.
#[derive(Debug, Clone, PartialEq)]
pub struct PlanModel {
    /// The dimensions.
    pub config: ModelConfig,
    /// config.json's `model_type`.
    pub model_type: String,
    /// Tensors beyond `config`'s (none for the supported architectures).
    pub extra_tensors: Vec<(String, Vec<usize>)>,
    /// RMSNorms per layer beyond Llama's two (Gemma2: two).
    pub extra_norms: usize,
    /// Attention-logit soft-capping (Gemma2's `attn_logit_softcapping`): three more
    /// score-sized tensors per layer.
    pub softcap: bool,
}

impl PlanModel {
    /// Reads `path`: a checkpoint directory (its `config.json`) or a config.json file.
    ///
    /// # Errors
    /// I/O errors naming the file; see [`PlanModel::from_json_str`].
    pub fn read(path: &Path) -> Result<Self> {
        let file = if path.is_dir() {
            path.join("config.json")
        } else {
            path.to_path_buf()
        };
        let text = std::fs::read_to_string(&file).map_err(|e| Error::io(&file, e))?;
        Self::from_json_str(&text, &file)
    }

    /// Parses config.json text (`path` for messages) through [`ModelConfig::from_json_str`]:
    /// Gemma2 with its two norms per layer beyond Llama's and its soft-capped attention logits.
    ///
    /// # Errors
    /// Invalid JSON; the errors of [`ModelConfig::from_json_str`] (an unsupported
    /// `model_type` among them).
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self> {
        let v: Value = serde_json::from_str(text).map_err(|e| Error::Config {
            path: path.to_path_buf(),
            message: format!("invalid JSON: {e}"),
        })?;
        let model_type = v
            .get("model_type")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let config = ModelConfig::from_json_str(text, path)?;
        let gemma = config.arch == crate::config_json::Architecture::Gemma2;
        Ok(Self {
            softcap: config.attn_logit_softcapping.is_some(),
            extra_norms: if gemma { 2 } else { 0 },
            config,
            model_type,
            extra_tensors: Vec::new(),
        })
    }

    /// Every tensor's name and shape, sorted by name: [`ModelConfig::tensor_shapes`] and the
    /// extra tensors.
    pub fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let mut t = self.config.tensor_shapes();
        t.extend(self.extra_tensors.iter().cloned());
        t.sort();
        t
    }

    /// Parameters: [`ModelConfig::num_parameters`] plus the extra tensors' elements.
    pub fn num_parameters(&self) -> u128 {
        let extra: u128 = self.extra_tensors.iter().map(|(_, s)| elems(s)).sum();
        self.config.num_parameters() as u128 + extra
    }

    /// The trainable variables as the trainer's optimizer sees them, `(name, elements)` sorted
    /// by name: every tensor, or with LoRA the adapters `A: [r, in]`, `B: [out, r]` of each
    /// targeted projection (PEFT's names, [`crate::lora::tensor_names`]).
    ///
    /// # Errors
    /// Targets that match no projection, or `r` above a projection's rank (as
    /// `Model::add_lora` refuses them).
    pub fn trainable(&self, lora: Option<&LoraConfig>) -> Result<Vec<(String, u128)>> {
        let shapes = self.tensor_shapes();
        let Some(cfg) = lora else {
            return Ok(shapes.into_iter().map(|(n, s)| (n, elems(&s))).collect());
        };
        let layers = self.config.num_hidden_layers;
        cfg.check_targets(layers)?;
        let mut out = Vec::new();
        for l in 0..layers {
            for (j, (short, module)) in PROJECTIONS.iter().enumerate() {
                if !cfg.targets(l, j) {
                    continue;
                }
                let name = format!("model.layers.{l}.{module}.weight");
                let Some((_, s)) = shapes.iter().find(|(n, _)| *n == name) else {
                    continue;
                };
                let (d_out, d_in) = (s[0] as u128, s[1] as u128);
                let r = cfg.r() as u128;
                if r > d_in.min(d_out) {
                    return Err(Error::InvalidArgument(format!(
                        "lora_r (--lora-r) = {r} exceeds the rank of {short} ({d_out}×{d_in})"
                    )));
                }
                let (a, b) = crate::lora::tensor_names(l, j);
                out.push((a, r * d_in));
                out.push((b, d_out * r));
            }
        }
        out.sort();
        Ok(out)
    }
}

fn elems(shape: &[usize]) -> u128 {
    shape.iter().map(|&d| d as u128).product()
}

/// A run to plan: the `dpo` / `sft` options that size memory and compute, and the
/// data-parallel layout.
#[derive(Debug, Clone)]
pub struct Setup {
    /// Data-parallel ranks, one device each (`--world-size`, ≥ 1).
    pub world_size: usize,
    /// ZeRO stage (`--zero-stage`): 0 or 1 ([`SUPPORTED_ZERO_STAGES`]).
    pub zero_stage: usize,
    /// Parameter dtype (`--dtype`).
    pub param_dtype: DType,
    /// Compute dtype: bf16 with `--bf16`, else the parameter dtype.
    pub compute_dtype: DType,
    /// Whether the device is a CUDA GPU (`--device cuda`).
    pub cuda: bool,
    /// The optimizer (`--optim`).
    pub optim: OptimizerKind,
    /// LoRA (`--use-peft` and the `--lora-*` options), if any.
    pub lora: Option<LoraConfig>,
    /// `--gradient-checkpointing`.
    pub gradient_checkpointing: bool,
    /// Preference pairs per micro-batch (`--per-device-train-batch-size`).
    pub batch: usize,
    /// Tokens per sequence (`--max-length`, > 0).
    pub max_length: usize,
    /// Micro-batches per optimizer step (`--gradient-accumulation-steps`).
    pub accumulation: usize,
}

/// One line of the memory table: bytes per device and what they are.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Item {
    /// `weights`, `weight casts`, `gradients`, `optimizer state`, `activations`,
    /// `backward transient`.
    pub name: String,
    /// Bytes per device.
    pub bytes: u128,
    /// How they are counted.
    pub detail: String,
}

/// The plan of one run, per device unless named global.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Plan {
    /// config.json's `model_type`.
    pub model_type: String,
    /// All parameters.
    pub parameters: u128,
    /// Trainable parameters (the LoRA adapters' with `--use-peft`).
    pub trainable_parameters: u128,
    /// Where the layers run.
    pub kernels: Kernels,
    /// Ranks.
    pub world_size: usize,
    /// ZeRO stage.
    pub zero_stage: usize,
    /// Sequences per forward pass: chosen + rejected of each pair.
    pub sequences_per_micro_batch: usize,
    /// Tokens per optimizer step on one device: `2·B·L·K`.
    pub tokens_per_step: u128,
    /// Tokens per optimizer step over all ranks.
    pub global_tokens_per_step: u128,
    /// The memory terms, each in full (they are not all held at once: see `peak_bytes`).
    pub memory: Vec<Item>,
    /// Optimizer-state bytes without sharding (stage 0), for comparison.
    pub optimizer_bytes_unsharded: u128,
    /// The peak per device: the largest of the step's phases ([`peak`]).
    pub peak_bytes: u128,
    /// Which phase holds the peak.
    pub peak_phase: String,
    /// Model FLOPs per optimizer step on one device ([`model_flops`]).
    pub flops_per_step: f64,
    /// FLOPs of the recomputation (gradient checkpointing: one more forward of the layers).
    pub recompute_flops_per_step: f64,
    /// Model FLOPs per optimizer step over all ranks.
    pub global_flops_per_step: f64,
    /// What the numbers leave out or assume.
    pub notes: Vec<String>,
}

/// The dtype's size in bytes.
fn size(d: DType) -> u128 {
    d.size_in_bytes() as u128
}

/// Checks the setup's options, naming the one out of range.
///
/// # Errors
/// [`Error::InvalidArgument`].
fn check(s: &Setup) -> Result<()> {
    if !SUPPORTED_ZERO_STAGES.contains(&s.zero_stage) {
        return Err(Error::InvalidArgument(format!(
            "--zero-stage {}: not supported; supported: 0 (no sharding) and 1 (optimizer state \
             sharded across ranks); stages 2 (gradients) and 3 (parameters) are not implemented",
            s.zero_stage
        )));
    }
    for (flag, v) in [
        ("--world-size", s.world_size),
        ("--per-device-train-batch-size", s.batch),
        ("--gradient-accumulation-steps", s.accumulation),
        ("--max-length", s.max_length),
    ] {
        if v == 0 {
            let why = if flag == "--max-length" {
                " (the plan needs a length; `none` and 0 are no limit)"
            } else {
                ""
            };
            return Err(Error::InvalidArgument(format!(
                "{flag} 0: must be ≥ 1{why}"
            )));
        }
    }
    Ok(())
}

/// What one micro-batch's forward pass keeps and its backward pass allocates, in bytes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Activations {
    /// Held until the step's loss is dropped: the layers' inputs (every one on the fused
    /// path and with checkpointing; on the plain path everything the graph keeps), the final
    /// norm, the mask.
    pub fixed: u128,
    /// Kept by the fused layers and freed as the backward pass reaches each (0 on the plain
    /// path, where nothing is freed before the loss is).
    pub freed_in_backward: u128,
    /// One layer's kept activations (the layer being recomputed under checkpointing).
    pub one_layer: u128,
    /// The backward pass's own allocations: [`FUSED_TRANSIENT_LAYERS`] or
    /// [`PLAIN_TRANSIENT_LAYERS`] layers' worth, and the LM head's chunk buffers.
    pub transient: u128,
}

/// Activation bytes of `sequences` sequences of `len` tokens of `m` under `s`.
///
/// # Formula
/// Per token and layer, with `H` hidden, `d_q = heads·head_dim`, `d_kv = kv_heads·head_dim`,
/// `I` intermediate, `c` the compute dtype's bytes, `a` the accumulation dtype's (f32 for
/// bf16), `n_h` heads and `L` the length:
/// ```text
/// fused:  c·(3H + 2d_q + 2d_kv + 3I) + c·n_h·L  freed in backward, + c·H (the input) fixed
/// plain:  2·norm + c·(2(d_q + 2d_kv) + 4.5(d_q + d_kv) + 2d_q·[GQA] + 2d_q + 4H + 4I)
///         + lora + n_h·L·(2c + 4a + cast)             all fixed
/// norm  = H·(2a + c + cast)                           (cast: a + c when c ≠ a, else 0)
/// lora  = Σ_adapted (2·in·[dropout] + r + 3·out)·c    (plain path)
/// ```
/// times `S·L` tokens (`S` sequences); checkpointing keeps per layer only its input (twice
/// on the plain path: the checkpoint node's value and output; with the whole-layer kernels
/// also the MLP's two inputs, `2·c·I`, freed in backward) plus one recomputed layer.
/// The mask is `S·L²·a`; Gemma2 adds its extra norms and `3·c·n_h·L` per token and layer
/// for soft-capping.
pub fn activations(m: &PlanModel, s: &Setup, sequences: u128, len: u128) -> Activations {
    let cfg = &m.config;
    let kernels = Kernels::of(s.cuda, s.compute_dtype);
    let (c, a) = (
        size(s.compute_dtype),
        size(accumulation_dtype(s.compute_dtype)),
    );
    let cast = if c == a { 0 } else { a + c };
    let h = cfg.hidden_size as u128;
    let (dq, dkv) = (
        (cfg.num_attention_heads * cfg.head_dim) as u128,
        (cfg.num_key_value_heads * cfg.head_dim) as u128,
    );
    let (i, nh, nl) = (
        cfg.intermediate_size as u128,
        cfg.num_attention_heads as u128,
        cfg.num_hidden_layers as u128,
    );
    let tokens = sequences * len;
    let norm = h * (2 * a + c + cast);
    let softcap = if m.softcap { 3 * c * nh * len } else { 0 };
    let extra_norms = m.extra_norms as u128 * norm;
    // Per token: what one layer keeps; the part its fused backward frees; the layer input.
    let (per_layer, freed) = match kernels {
        Kernels::Fused => {
            let kept = c * (3 * h + 2 * dq + 2 * dkv + 3 * i) + c * nh * len;
            (
                kept + c * h + softcap + extra_norms,
                kept + softcap + extra_norms,
            )
        }
        Kernels::Plain => {
            let gqa = if dkv != dq { 2 * dq } else { 0 };
            let body = 2 * (dq + 2 * dkv) + (9 * (dq + dkv)) / 2 + gqa + 2 * dq + 4 * h + 4 * i;
            let scores = nh * len * (2 * c + 4 * a + cast);
            let kept = 2 * norm + c * body + scores + lora_tokens(m, s) + softcap + extra_norms;
            (kept, 0)
        }
    };
    let mask = sequences * len * len * a;
    let one_layer = tokens * per_layer;
    let (fixed, freed_in_backward) = match (s.gradient_checkpointing, kernels) {
        (true, Kernels::Fused) => (
            tokens * (nl * c * h + 2 * c * h) + mask,
            if whole_layer(cfg, kernels) {
                tokens * nl * 2 * c * i
            } else {
                0
            },
        ),
        (true, Kernels::Plain) => (tokens * (nl * 2 * c * h + norm + c * h) + mask, 0),
        (false, Kernels::Fused) => (
            tokens * (nl * c * h + 2 * c * h) + mask,
            tokens * nl * freed,
        ),
        (false, Kernels::Plain) => (tokens * (nl * per_layer + norm + c * h) + mask, 0),
    };
    let layers = match kernels {
        Kernels::Fused => FUSED_TRANSIENT_LAYERS,
        Kernels::Plain => PLAIN_TRANSIENT_LAYERS,
    };
    let head =
        2 * a * (crate::fused::HEAD_CHUNK_ELEMS as u128).min(tokens * cfg.vocab_size as u128);
    Activations {
        fixed,
        freed_in_backward,
        one_layer,
        transient: (one_layer as f64 * layers) as u128 + head,
    }
}

/// Per token and layer, the bytes the plain path's LoRA adapters keep: for each adapted
/// projection, the dropout mask and the dropped input (when dropout is on), `x·Aᵀ`, its
/// product with `Bᵀ`, the scaled delta and the sum.
fn lora_tokens(m: &PlanModel, s: &Setup) -> u128 {
    let Some(cfg) = &s.lora else { return 0 };
    let c = size(s.compute_dtype);
    let shapes = m.config.tensor_shapes();
    let layers = m.config.num_hidden_layers.max(1) as u128;
    let mut total = 0u128;
    for l in 0..m.config.num_hidden_layers {
        for (j, (_, module)) in PROJECTIONS.iter().enumerate() {
            let name = format!("model.layers.{l}.{module}.weight");
            if let (true, Some((_, sh))) =
                (cfg.targets(l, j), shapes.iter().find(|(n, _)| *n == name))
            {
                let drop = if cfg.dropout() > 0.0 { 2 * sh[1] } else { 0 };
                total += c * (drop + cfg.r() + 3 * sh[0]) as u128;
            }
        }
    }
    total / layers
}

/// Model FLOPs of one training step over `sequences` sequences of `len` tokens with `scored`
/// tokens through the LM head each (PaLM's accounting, Appendix B of Chowdhery et al. 2022).
///
/// # Formula
/// ```text
/// body      = n_layers · (2·H·d_q + 2·H·d_kv + 3·H·I)     (the projections' weights)
/// weights   = 2·body·len + 2·V·H·scored                   (forward, per sequence)
/// attention = 4·n_layers·len²·d_q                         (QKᵀ and PV, no causal discount)
/// flops     = sequences · (w·weights + 3·attention),  w = 3 (full), 2 (frozen weights)
/// ```
/// The backward pass costs twice the forward pass, or once for frozen weights (LoRA: no
/// weight gradients; the attention products still cost twice). Recomputation (gradient
/// checkpointing, [`recompute_flops`]) is not counted: these are the FLOPs the model needs,
/// not the FLOPs the hardware runs.
pub fn model_flops(
    cfg: &ModelConfig,
    sequences: usize,
    len: usize,
    scored: usize,
    frozen_weights: bool,
) -> f64 {
    let (weights, attention) = forward_flops(cfg, len, scored);
    let w_factor = if frozen_weights { 2.0 } else { 3.0 };
    sequences as f64 * (w_factor * weights + 3.0 * attention)
}

/// Whether the decoder layers run as the CPU's whole-layer kernels
/// ([`crate::fused::decoder_layer`]: Llama-family layers without biases under
/// [`Kernels::Fused`]); other layers run the separate kernels or plain candle ops.
pub fn whole_layer(cfg: &ModelConfig, kernels: Kernels) -> bool {
    kernels == Kernels::Fused && cfg.plain_layers() && !cfg.qkv_bias
}

/// What gradient checkpointing recomputes in the backward pass, per sequence: without the
/// whole-layer kernels ([`whole_layer`]) one forward pass of the decoder layers, `sequences · (2·body·len + 4·n_layers·len²·d_q)`
/// (see [`model_flops`]); on the whole-layer kernels, which keep the MLP's inputs,
/// the attention half only, `sequences · n_layers · (4·H·(d_q + d_kv)·len + 4·len²·d_q)`
/// (the q, k, v and o projections and the attention products).
pub fn recompute_flops(cfg: &ModelConfig, sequences: usize, len: usize, kernels: Kernels) -> f64 {
    let (weights, attention) = forward_flops(cfg, len, 0);
    match kernels {
        _ if !whole_layer(cfg, kernels) => sequences as f64 * (weights + attention),
        _ => {
            let h = cfg.hidden_size as f64;
            let dq = (cfg.num_attention_heads * cfg.head_dim) as f64;
            let dkv = (cfg.num_key_value_heads * cfg.head_dim) as f64;
            let projections = cfg.num_hidden_layers as f64 * 4.0 * h * (dq + dkv) * len as f64;
            sequences as f64 * (projections + attention)
        }
    }
}

/// `(weights, attention)`: the forward FLOPs of one sequence, as [`model_flops`] defines them.
fn forward_flops(cfg: &ModelConfig, len: usize, scored: usize) -> (f64, f64) {
    let (h, i) = (cfg.hidden_size as f64, cfg.intermediate_size as f64);
    let dq = (cfg.num_attention_heads * cfg.head_dim) as f64;
    let dkv = (cfg.num_key_value_heads * cfg.head_dim) as f64;
    let layers = cfg.num_hidden_layers as f64;
    let body = layers * (2.0 * h * dq + 2.0 * h * dkv + 3.0 * h * i);
    let head = cfg.vocab_size as f64 * h;
    let (len_f, scored_f) = (len as f64, scored as f64);
    (
        2.0 * body * len_f + 2.0 * head * scored_f,
        4.0 * layers * len_f * len_f * dq,
    )
}

/// The peak of a step's phases and its name.
///
/// # Formula
/// (`W` weights and casts, `O` optimizer state, `G` gradients, `G_h` the gradient the LM
/// head produces first (0 with LoRA), `K` micro-batches, `A` = [`Activations`])
/// ```text
/// backward (fused)  = W + O + [K≥2]·G + A.fixed + A.transient
///                     + max(A.freed + G_h, G + [ckpt]·A.one_layer)
/// backward (plain)  = W + O + [K≥2]·G + A.fixed + G + [ckpt]·A.one_layer + A.transient
/// accumulate (K≥2)  = W + O + 3·G + (plain: A.fixed)
/// reduce (N ≥ 2)    = W + O + G + R
/// peak              = max(backward, accumulate, reduce, W + O + G)
/// ```
/// where `R` is the gradients summed over the ranks, a new allocation beside the rank's own:
/// all of them at ZeRO stage 0 (all-reduce), the rank's share at stage 1 (reduce-scatter);
/// 0 on one rank.
pub fn peak(
    w: u128,
    o: u128,
    g: u128,
    g_head: u128,
    reduced: u128,
    act: &Activations,
    s: &Setup,
) -> (u128, &'static str) {
    let prev = if s.accumulation >= 2 { g } else { 0 };
    let ckpt = if s.gradient_checkpointing {
        act.one_layer
    } else {
        0
    };
    let fused = Kernels::of(s.cuda, s.compute_dtype) == Kernels::Fused;
    let during = if fused {
        (act.freed_in_backward + g_head).max(g + ckpt)
    } else {
        g + ckpt
    };
    let backward = w + o + prev + act.fixed + act.transient + during;
    let accumulate = if s.accumulation >= 2 {
        w + o + 3 * g + if fused { 0 } else { act.fixed }
    } else {
        0
    };
    let update = w + o + g;
    let reduce = update + reduced;
    if reduced > 0 && reduce > backward.max(accumulate) {
        (reduce, "summing the gradients over the ranks")
    } else if accumulate > backward {
        (
            accumulate,
            "adding a micro-batch's gradient to the running sum",
        )
    } else if update > backward {
        (update, "the optimizer step")
    } else {
        (backward, "the backward pass")
    }
}

/// Per-layer parameters (the tensors of `model.layers.0`) and the embedding table's.
fn layer_and_embedding(m: &PlanModel) -> (u128, u128) {
    let shapes = m.tensor_shapes();
    let sum = |prefix: &str| -> u128 {
        shapes
            .iter()
            .filter(|(n, _)| n.starts_with(prefix))
            .map(|(_, s)| elems(s))
            .sum()
    };
    (sum("model.layers.0."), sum("model.embed_tokens."))
}

/// The plan of `s` on model `m`: the memory terms per device, the peak ([`peak`]), tokens
/// and FLOPs per optimizer step.
///
/// # Formula
/// (`P` parameters, `T` trainable elements, `p`, `g` the parameter and gradient dtypes'
/// bytes, `k` the optimizer's state tensors per variable: AdamW 2, RMSprop 1, SGD 0)
/// ```text
/// weights   = P·p (+ LoRA adapters in f32)
/// casts     = c·(V·H + layers·P_layer)   plain path with c ≠ p (one layer with checkpointing)
/// gradients = T·g
/// optimizer = k·g·T                      stage 0
///           = k·g·max_r load_r           stage 1, load_r from crate::shard::loads
/// tokens    = 2·B·L·K  per device;  × N over the ranks
/// flops     = model_flops(2·B·K sequences of L tokens, all L scored)
/// ```
///
/// # Errors
/// A stage other than 0 or 1; a zero world size, batch, length or accumulation; LoRA
/// targets that match no projection.
pub fn plan(m: &PlanModel, s: &Setup) -> Result<Plan> {
    check(s)?;
    let cfg = &m.config;
    let p = size(s.param_dtype);
    let adapter_dtype = accumulation_dtype(s.param_dtype);
    let trainable = m.trainable(s.lora.as_ref())?;
    let t: u128 = trainable.iter().map(|(_, n)| n).sum();
    let params = m.num_parameters();
    let lora_bytes = if s.lora.is_some() {
        t * size(adapter_dtype)
    } else {
        0
    };
    let g = size(grad_dtype(if s.lora.is_some() {
        adapter_dtype
    } else {
        s.param_dtype
    }));
    let kernels = Kernels::of(s.cuda, s.compute_dtype);
    let c = size(s.compute_dtype);
    let (p_layer, p_embed) = layer_and_embedding(m);
    let layers = cfg.num_hidden_layers as u128;
    let casts = if kernels == Kernels::Plain && c != p {
        c * (p_embed + p_layer * if s.gradient_checkpointing { 1 } else { layers })
    } else {
        0
    };
    let k: u128 = match s.optim {
        OptimizerKind::Adamw => 2,
        OptimizerKind::Rmsprop => 1,
        OptimizerKind::Sgd => 0,
    };
    let sizes: Vec<usize> = trainable
        .iter()
        .map(|(_, n)| usize::try_from(*n).unwrap_or(usize::MAX))
        .collect();
    let share = match s.zero_stage {
        0 => t,
        _ => crate::shard::loads(&sizes, s.world_size)
            .into_iter()
            .max()
            .unwrap_or(0),
    };
    let (optimizer, unsharded) = (k * g * share, k * g * t);
    let gradients = t * g;
    let g_head = if s.lora.is_some() {
        0
    } else {
        cfg.vocab_size as u128 * cfg.hidden_size as u128 * g
    };
    let sequences = 2 * s.batch as u128;
    let len = s.max_length as u128;
    let act = activations(m, s, sequences, len);
    let weights = params * p + lora_bytes;
    let reduced = match (s.world_size, s.zero_stage) {
        (0 | 1, _) => 0,
        (_, 0) => gradients,
        _ => share * g,
    };
    let (peak_bytes, phase) = peak(
        weights + casts,
        optimizer,
        gradients,
        g_head,
        reduced,
        &act,
        s,
    );
    let memory = items(
        s,
        whole_layer(cfg, kernels),
        [
            weights,
            casts,
            gradients,
            optimizer,
            act.fixed + act.freed_in_backward,
            act.transient
                + if s.gradient_checkpointing {
                    act.one_layer
                } else {
                    0
                },
        ],
        (params, t, share),
    );
    let seqs = 2 * s.batch * s.accumulation;
    let flops = model_flops(cfg, seqs, s.max_length, s.max_length, s.lora.is_some());
    let recompute = if s.gradient_checkpointing {
        recompute_flops(
            cfg,
            seqs,
            s.max_length,
            Kernels::of(s.cuda, s.compute_dtype),
        )
    } else {
        0.0
    };
    let tokens = sequences * len * s.accumulation as u128;
    Ok(Plan {
        model_type: m.model_type.clone(),
        parameters: params,
        trainable_parameters: t,
        kernels,
        world_size: s.world_size,
        zero_stage: s.zero_stage,
        sequences_per_micro_batch: 2 * s.batch,
        tokens_per_step: tokens,
        global_tokens_per_step: tokens * s.world_size as u128,
        memory,
        optimizer_bytes_unsharded: unsharded,
        peak_bytes,
        peak_phase: phase.to_string(),
        flops_per_step: flops,
        recompute_flops_per_step: recompute,
        global_flops_per_step: flops * s.world_size as f64,
        notes: notes(s, kernels),
    })
}

/// The memory lines with their explanations; `bytes` in the order weights, casts,
/// gradients, optimizer, activations, transient; `counts` = (parameters, trainable, this
/// rank's optimizer share in elements).
fn items(s: &Setup, whole_layer: bool, bytes: [u128; 6], counts: (u128, u128, u128)) -> Vec<Item> {
    let (params, t, share) = counts;
    let dt = |d: DType| crate::dtype::torch_dtype_name(d).to_string();
    let grad_dt = dt(grad_dtype(accumulation_dtype(s.param_dtype)));
    let lora = s.lora.as_ref().map_or(String::new(), |l| {
        format!(
            " + LoRA adapters (r = {}, {}) in {}",
            l.r(),
            l.target_modules().join(","),
            dt(accumulation_dtype(s.param_dtype))
        )
    });
    let optim = match s.optim {
        OptimizerKind::Adamw => "AdamW: 2 moments",
        OptimizerKind::Rmsprop => "RMSprop: 1 square average",
        OptimizerKind::Sgd => "SGD: no state",
    };
    let zero = if s.zero_stage == 1 {
        format!(
            "ZeRO-1: the largest rank's share under crate::shard::owners, {share} of {t} elements over {} ranks",
            s.world_size
        )
    } else {
        "every rank holds all of it (stage 0)".to_string()
    };
    let ckpt = if s.gradient_checkpointing && whole_layer {
        "gradient checkpointing: each layer's input and its MLP's two inputs kept, the attention half recomputed one layer at a time"
    } else if s.gradient_checkpointing {
        "gradient checkpointing: each layer's input kept, one layer recomputed at a time"
    } else {
        "every layer's activations and attention probabilities kept for the backward pass"
    };
    let detail = [
        format!("{params} parameters in {}{lora}; no separate f32 master copy", dt(s.param_dtype)),
        "compute-dtype copies of the weights the graph holds (--bf16 over wider parameters, plain path)".to_string(),
        format!(
            "{t} trainable elements in {grad_dt}{}",
            if s.accumulation >= 2 { "; K ≥ 2 adds the running sum (and a third buffer while adding)" } else { "" }
        ),
        format!("{optim} in {grad_dt} per trainable element; {zero}"),
        format!(
            "DPO micro-batch: chosen + rejected = {} sequences of {} tokens in one pass; {ckpt}",
            2 * s.batch,
            s.max_length
        ),
        format!(
            "one layer's backward allocations{}, the LM head's chunk buffers",
            if s.gradient_checkpointing { " and its recomputed activations" } else { "" }
        ),
    ];
    let names = [
        "weights",
        "weight casts",
        "gradients",
        "optimizer state",
        "activations",
        "backward transient",
    ];
    names
        .iter()
        .zip(bytes)
        .zip(detail)
        .map(|((n, b), d)| Item {
            name: n.to_string(),
            bytes: b,
            detail: d,
        })
        .collect()
}

/// What the plan leaves out or assumes, for the reader of its table.
fn notes(s: &Setup, kernels: Kernels) -> Vec<String> {
    let mut n = vec![
        match kernels {
            Kernels::Fused => "the peak is the largest phase of a step, less than the sum of the lines: the fused layers free their activations as the backward pass reaches them while the gradients appear",
            Kernels::Plain => "the peak is the largest phase of a step: on the plain path the graph holds every line at once until the step's loss is dropped",
        }
        .to_string(),
        "no separate f32 master weights: with --bf16 the f32 parameters are the master copy; with --dtype bf16 there is none (the optimizer state is f32 either way)".to_string(),
        "reference log-probs are precomputed and cached: no reference model is held".to_string(),
        "not counted: the process and runtime baseline (~14 MB measured on the CPU, ~24 MB more under MPI; a CUDA context), the allocator's caching, the collectives' 25 MiB buckets".to_string(),
        "FLOPs: the LM head counted at every position (the trainer runs it on completion positions only: an upper bound)".to_string(),
    ];
    if kernels == Kernels::Plain {
        n.push("plain-path activations are counted op by op; on the CPU (bf16 compute) the plan reads 27–43 % below the measured peaks (trainer/README.md, Measurements): read it as a lower bound; not yet measured on a GPU".to_string());
    }
    if s.zero_stage == 1 {
        n.push(
            "ZeRO-1 shards the optimizer state only: every rank keeps full weights and gradients"
                .to_string(),
        );
    }
    n
}

/// Parses a memory size: a number with an optional unit, decimal (`B`, `kB`, `MB`, `GB`,
/// `TB`: powers of 1000, as [`crate::units::format_bytes`] prints) or binary (`KiB`, `MiB`,
/// `GiB`, `TiB`: powers of 1024), case-insensitive, spaces allowed: `80GB` is 80·10⁹ bytes.
///
/// # Errors
/// [`Error::InvalidArgument`] for anything else, a non-finite or non-positive number.
pub fn parse_memory(text: &str) -> Result<u128> {
    let bad = || {
        Error::InvalidArgument(format!(
            "`{text}` is not a memory size: expected a positive number with an optional unit \
             (B, kB, MB, GB, TB; KiB, MiB, GiB, TiB), e.g. 80GB"
        ))
    };
    let t = text.trim();
    let at = t
        .find(|ch: char| ch.is_ascii_alphabetic() && ch != 'e' && ch != 'E')
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(at);
    let x: f64 = num.trim().parse().map_err(|_| bad())?;
    let scale = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024f64.powi(2),
        "gib" => 1024f64.powi(3),
        "tib" => 1024f64.powi(4),
        _ => return Err(bad()),
    };
    let bytes = x * scale;
    if !(1.0..1e30).contains(&bytes) {
        return Err(bad());
    }
    Ok(bytes.round() as u128)
}
