//! The decoder (Llama / Mistral / Qwen2 / Qwen3 / Gemma2) as a differentiable training model.
//!
//! Every parameter is a [`candle_core::Var`] held in a [`candle_nn::VarMap`] under its Hugging
//! Face name. The forward pass is built only from ops that record a backward pass: matmul,
//! an additive mask and [`candle_nn::ops::softmax`] for attention, a hand-written RMSNorm and a
//! hand-written rotate-half RoPE from cos/sin tables. candle's fused `softmax_last_dim`,
//! `rms_norm`, `RmsNorm::forward` and `rope` are never used: they record no gradient.
//! On f32/f64 CPU tensors, RMSNorm, `silu(gate) ⊙ up`, the head split with RoPE, the attention
//! core and the final log-softmax-and-pick run as the fused kernels of [`crate::fused`], which
//! carry hand-written backward passes ([`Model::set_fused_kernels`] turns them off).
//!
//! Low-precision models (bf16/f16) compute RMSNorm, the attention softmax and the final
//! log-softmax in f32, as transformers does; f32 and f64 models compute everything in their own
//! dtype (f64 is what the finite-difference tests use).
//!
//! One file per concept: this file holds [`Model`], its construction from named tensors and
//! its settings; `adapted_linear` a projection with its optional LoRA adapter; `block` one
//! decoder layer on the plain path (RMSNorm, RoPE, the causal mask); `kv_cache`; `forward` the
//! pass through embedding, layers and final norm; `output_head` logits and token log-probs
//! ([`chunked_head`] the plain path's chunked head); `adapters` LoRA on the model;
//! `footprint` the memory a forward needs, checked before it runs; `score_head` the one-label
//! sequence classifier (a reward model) over the final hidden states.

mod adapted_linear;
mod adapters;
mod block;
pub mod chunked_head;
mod footprint;
mod forward;
mod kv_cache;
mod output_head;
mod score_head;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;

use crate::config_json::ModelConfig;
use crate::error::{Error, Result};

use adapted_linear::{Lin, LoraLin};
use block::Block;
pub use block::{
    apply_rope, causal_mask, gelu_tanh, gemma_rms_norm, packed_causal_mask, rms_norm, softcap,
    window_band, MASK_VALUE,
};
pub use kv_cache::KvCache;
pub use score_head::{scored_position, RewardModel, SCORE_WEIGHT};

/// A decoder-only transformer with trainable parameters.
#[derive(Clone)]
pub struct Model {
    config: ModelConfig,
    varmap: VarMap,
    dtype: DType,
    compute_dtype: DType,
    device: Device,
    embed: Tensor,
    layers: Vec<Block>,
    norm: Tensor,
    lm_head: Tensor,
    extra: BTreeMap<String, Tensor>,
    fused: bool,
    /// Where whole-layer nodes leave their weights' gradients; `None`: layers are graphs of
    /// the separate kernels (see [`Model::set_grad_sink`]).
    grad_sink: Option<crate::fused::GradSink>,
    /// LoRA adapters (the base weights are then frozen).
    lora: Option<LoraSet>,
    /// Whether the adapters take part in the forward pass.
    adapters_on: bool,
    /// Gradient checkpointing of the decoder layers in training forward passes.
    checkpointing: bool,
    /// Training batches packed into one row ([`crate::batch::Packed`]).
    padding_free: bool,
    /// Logits per chunk of the LM head.
    head_chunk: usize,
    /// The LoRA dropout seed and the count of training forward passes since it was set.
    dropout: Arc<Mutex<DropoutState>>,
}

/// LoRA adapters of a [`Model`]: their configuration and variables (PEFT names).
#[derive(Debug, Clone)]
struct LoraSet {
    config: crate::lora::LoraConfig,
    vars: Vec<(String, Var)>,
}

/// See [`Model::set_dropout_seed`].
#[derive(Debug, Default)]
struct DropoutState {
    seed: Option<u64>,
    passes: u64,
}

/// The model's tensors by role, in Hugging Face's names.
fn bind_weights(
    config: &ModelConfig,
    vars: &BTreeMap<String, Tensor>,
) -> (Tensor, Vec<Block>, Tensor, Tensor) {
    let get = |n: &str| -> Tensor { vars[n].clone() };
    let opt = |n: &str| -> Option<Tensor> { vars.get(n).cloned() };
    let lin = |p: &str| Lin {
        w: get(&format!("{p}.weight")),
        b: opt(&format!("{p}.bias")),
        lora: None,
    };
    let layers = (0..config.num_hidden_layers)
        .map(|l| {
            let p = format!("model.layers.{l}");
            let pair = |a: &str, b: &str| -> Option<(Tensor, Tensor)> {
                Some((
                    opt(&format!("{p}.{a}.weight"))?,
                    opt(&format!("{p}.{b}.weight"))?,
                ))
            };
            let gemma = config.arch == crate::config_json::Architecture::Gemma2;
            let ln2 = if gemma {
                "pre_feedforward_layernorm"
            } else {
                "post_attention_layernorm"
            };
            Block {
                ln1: get(&format!("{p}.input_layernorm.weight")),
                ln2: get(&format!("{p}.{ln2}.weight")),
                qk_norm: pair("self_attn.q_norm", "self_attn.k_norm"),
                out_norms: if gemma {
                    pair("post_attention_layernorm", "post_feedforward_layernorm")
                } else {
                    None
                },
                q: lin(&format!("{p}.self_attn.q_proj")),
                k: lin(&format!("{p}.self_attn.k_proj")),
                v: lin(&format!("{p}.self_attn.v_proj")),
                o: lin(&format!("{p}.self_attn.o_proj")),
                gate: lin(&format!("{p}.mlp.gate_proj")),
                up: lin(&format!("{p}.mlp.up_proj")),
                down: lin(&format!("{p}.mlp.down_proj")),
            }
        })
        .collect();
    let embed = get("model.embed_tokens.weight");
    let lm_head = if config.tie_word_embeddings {
        embed.clone()
    } else {
        get("lm_head.weight")
    };
    (embed, layers, get("model.norm.weight"), lm_head)
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("config", &self.config)
            .field("dtype", &self.dtype)
            .field("device", &self.device)
            .finish_non_exhaustive()
    }
}

impl Model {
    /// Builds a model from named tensors (Hugging Face names), converting each to `dtype` and
    /// `device` and making it a trainable variable.
    ///
    /// Tensors the config does not use are kept unchanged (not trainable) and written back by
    /// [`crate::pretrained::save_pretrained`], so a saved checkpoint has the input's tensor names.
    ///
    /// # Errors
    /// [`Error::MissingTensor`] / [`Error::ShapeMismatch`] naming the tensor and `source`.
    pub fn from_tensors(
        config: ModelConfig,
        mut tensors: BTreeMap<String, Tensor>,
        source: &std::path::Path,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        if !matches!(dtype, DType::F32 | DType::F64 | DType::BF16 | DType::F16) {
            return Err(Error::InvalidArgument(format!(
                "unsupported model dtype {dtype:?}; use f32, bf16, f16 or f64"
            )));
        }
        let varmap = VarMap::new();
        let mut vars: BTreeMap<String, Tensor> = BTreeMap::new();
        for (name, shape) in config.tensor_shapes() {
            let t = tensors.remove(&name).ok_or_else(|| Error::MissingTensor {
                name: name.clone(),
                file: source.to_path_buf(),
            })?;
            if t.dims() != shape.as_slice() {
                return Err(Error::ShapeMismatch {
                    name,
                    file: source.to_path_buf(),
                    expected: shape,
                    found: t.dims().to_vec(),
                });
            }
            let var = Var::from_tensor(&t.to_device(device)?.to_dtype(dtype)?)?;
            vars.insert(name.clone(), var.as_tensor().clone());
            varmap
                .data()
                .lock()
                .map_err(|_| Error::InvalidArgument("poisoned VarMap lock".into()))?
                .insert(name, var);
        }
        if config.tie_word_embeddings {
            if let Some(t) = tensors.get("lm_head.weight") {
                let want = [config.vocab_size, config.hidden_size];
                if t.dims() != want {
                    return Err(Error::ShapeMismatch {
                        name: "lm_head.weight".into(),
                        file: source.to_path_buf(),
                        expected: want.to_vec(),
                        found: t.dims().to_vec(),
                    });
                }
            }
        }
        let (embed, layers, norm, lm_head) = bind_weights(&config, &vars);
        Ok(Model {
            norm,
            embed,
            lm_head,
            layers,
            varmap,
            dtype,
            compute_dtype: dtype,
            device: device.clone(),
            config,
            extra: tensors,
            fused: true,
            grad_sink: None,
            lora: None,
            adapters_on: true,
            checkpointing: false,
            padding_free: false,
            head_chunk: crate::fused::HEAD_CHUNK_ELEMS,
            dropout: Arc::default(),
        })
    }

    /// (Re)binds the layers to the variables: as themselves, or detached (frozen: no gradient
    /// reaches them), and re-attaches the adapters.
    fn rebind(&mut self, frozen: bool) {
        let vars: BTreeMap<String, Tensor> = self
            .named_vars()
            .into_iter()
            .map(|(n, v)| {
                let t = v.as_tensor();
                (n, if frozen { t.detach() } else { t.clone() })
            })
            .collect();
        let (embed, layers, norm, lm_head) = bind_weights(&self.config, &vars);
        (self.embed, self.layers, self.norm, self.lm_head) = (embed, layers, norm, lm_head);
        if let Some(set) = &self.lora {
            let vars: BTreeMap<&str, &Var> =
                set.vars.iter().map(|(n, v)| (n.as_str(), v)).collect();
            let (scale, p) = (set.config.scale(), set.config.dropout());
            for (li, blk) in self.layers.iter_mut().enumerate() {
                for (j, lin) in blk.lins_mut().into_iter().enumerate() {
                    let (na, nb) = crate::lora::tensor_names(li, j);
                    if let (Some(a), Some(b)) = (vars.get(na.as_str()), vars.get(nb.as_str())) {
                        lin.lora = Some(LoraLin {
                            a: a.as_tensor().clone(),
                            b: b.as_tensor().clone(),
                            scale,
                            p,
                            key: None,
                        });
                    }
                }
            }
        }
    }

    /// Turns the adapters on or off in the forward pass (off: the base model, e.g. as the
    /// reference of a LoRA run).
    pub fn set_adapters_enabled(&mut self, on: bool) {
        self.adapters_on = on;
    }

    /// Gradient checkpointing (TRL's `gradient_checkpointing`): in forward passes that carry
    /// gradients, each decoder layer keeps only its input, and its activations are recomputed
    /// in the backward pass. The gradients are the same (bit for bit on the CPU). Needs a
    /// gradient sink ([`Model::set_grad_sink`]), where the recomputed layers leave their
    /// weights' gradients.
    pub fn set_gradient_checkpointing(&mut self, on: bool) {
        self.checkpointing = on;
    }

    /// Whether gradient checkpointing is on.
    pub fn gradient_checkpointing(&self) -> bool {
        self.checkpointing
    }

    /// Padding-free batches (TRL's `padding_free`): the trainer's log-probs of a batch
    /// ([`crate::train::PolicyModel::sequence_logps`]) run on its sequences packed into one
    /// row ([`crate::batch::Packed`], [`Model::packed_token_logps`]), no padding token
    /// computed; the log-probs are the padded batch's (LoRA dropout, whose masks follow the
    /// rows of the layout, draws other masks).
    pub fn set_padding_free(&mut self, on: bool) {
        self.padding_free = on;
    }

    /// Whether padding-free batches are on.
    pub fn padding_free(&self) -> bool {
        self.padding_free
    }

    /// The LM head's chunk size in logits (positions × vocabulary entries; default
    /// [`crate::fused::HEAD_CHUNK_ELEMS`]): no `[tokens, vocabulary]` tensor larger than this
    /// is formed on any path.
    pub fn set_head_chunk_elems(&mut self, elems: usize) {
        self.head_chunk = elems.max(1);
    }

    /// LoRA dropout for the training forward passes that follow (`Some(seed)`), or none
    /// (`None`, the default: evaluation). Each forward pass after this call draws its masks
    /// from `seed` and its index since the call, so equal seeds give equal masks.
    pub fn set_dropout_seed(&self, seed: Option<u64>) {
        if let Ok(mut d) = self.dropout.lock() {
            *d = DropoutState { seed, passes: 0 };
        }
    }

    /// The same model with every tensor detached (the same storage, detached from the
    /// variables, adapters included): its forward passes record no autograd graph, so no
    /// activation outlives the op that reads it (PyTorch's `torch.no_grad()`). For inference:
    /// log-probs, sampling.
    pub fn detached(&self) -> Model {
        let mut m = self.clone();
        let d = |t: &mut Tensor| *t = t.detach();
        d(&mut m.embed);
        d(&mut m.norm);
        d(&mut m.lm_head);
        for blk in &mut m.layers {
            *blk = blk.detached();
        }
        m.grad_sink = None;
        m.dropout = Arc::default();
        m
    }

    /// The configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The parameter dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The dtype of the forward pass (by default the parameter dtype).
    pub fn compute_dtype(&self) -> DType {
        self.compute_dtype
    }

    /// Sets the dtype of the forward pass, e.g. bf16 compute over f32 parameters (mixed
    /// precision: each parameter is cast where it is used, and the cast's backward returns
    /// gradients in the parameter dtype).
    ///
    /// # Errors
    /// A dtype other than f32, f64, bf16, f16.
    pub fn set_compute_dtype(&mut self, dtype: DType) -> Result<()> {
        if !matches!(dtype, DType::F32 | DType::F64 | DType::BF16 | DType::F16) {
            return Err(Error::InvalidArgument(format!(
                "unsupported compute dtype {dtype:?}"
            )));
        }
        self.compute_dtype = dtype;
        Ok(())
    }

    /// Whether the forward uses the fused CPU kernels of [`crate::fused`] (RMSNorm,
    /// `silu(gate) ⊙ up`, head split + RoPE, the attention core, the final log-softmax and
    /// pick) where they apply: f32/f64 compute on the CPU, and for the head split and attention
    /// no KV cache. On by default; off, every op is a plain candle op (the reference the fused
    /// kernels are tested against).
    pub fn fused_kernels(&self) -> bool {
        self.fused
    }

    /// Turns the fused CPU kernels on or off (see [`Model::fused_kernels`]).
    pub fn set_fused_kernels(&mut self, on: bool) {
        self.fused = on;
    }

    /// Whether forward passes record an autograd graph (the weights are variables; false for
    /// a [`Model::detached`] model).
    pub fn tracks_graph(&self) -> bool {
        self.embed.track_op()
    }

    /// Runs each decoder layer of a training forward pass (no KV cache, f32/f64 CPU, fused
    /// kernels on, no biases) as one graph node ([`crate::fused::decoder_layer`]) whose
    /// backward pass leaves the layer weights' gradients in `sink` instead of the
    /// `GradStore` that `backward()` returns: whoever calls `backward()` on such a graph must
    /// add them with [`crate::fused::GradSink::drain_into`] ([`Model::backward`] does). `None` (the
    /// default) turns this off, so a plain `backward()` holds every gradient.
    pub fn set_grad_sink(&mut self, sink: Option<crate::fused::GradSink>) {
        self.grad_sink = sink;
    }

    /// The sink set by [`Model::set_grad_sink`].
    pub fn grad_sink(&self) -> Option<&crate::fused::GradSink> {
        self.grad_sink.as_ref()
    }

    /// The gradients of `loss`: candle's backward pass, with the weight gradients the fused
    /// nodes left in the sink ([`Model::set_grad_sink`]) moved into its store.
    ///
    /// # Errors
    /// candle's.
    pub fn backward(&self, loss: &Tensor) -> candle_core::Result<candle_core::backprop::GradStore> {
        let _p = crate::profile::region("backward (candle ops, graph)");
        match &self.grad_sink {
            Some(sink) => {
                sink.clear();
                let mut store = loss.backward()?;
                sink.drain_into(&mut store)?;
                Ok(store)
            }
            None => loss.backward(),
        }
    }

    /// The device holding the parameters.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The variable store (Hugging Face names → trainable variables).
    pub fn varmap(&self) -> &VarMap {
        &self.varmap
    }

    /// All trainable variables, sorted by name (deterministic order for optimizers,
    /// checkpoints and gradient norms).
    pub fn named_vars(&self) -> Vec<(String, Var)> {
        let data = self.varmap.data().lock().expect("VarMap lock poisoned");
        let mut v: Vec<(String, Var)> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Checkpoint tensors that the model does not use, kept to be written back unchanged.
    pub fn extra_tensors(&self) -> &BTreeMap<String, Tensor> {
        &self.extra
    }

    /// Number of trainable scalars.
    pub fn num_parameters(&self) -> usize {
        self.named_vars().iter().map(|(_, v)| v.elem_count()).sum()
    }
}
