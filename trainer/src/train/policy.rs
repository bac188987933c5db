//! What the trainer needs from a model: summed completion log-probs of a right-padded batch,
//! and its trainable variables by name.
//!
//! [`TokenBatch`] has the same fields and conventions as `difinfo_trainer::batch::Batch`
//! (ids `[B, L]`, attention mask `[B, L]`, shifted loss mask `[B, L−1]`), so the real model
//! implements [`PolicyModel`] by forwarding to its own `sequence_logps`.

use std::collections::HashMap;
use std::path::Path;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};

use crate::train::error::{Result, TrainError};

/// One sequence to score: tokens, and where its completion starts.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Sequence {
    /// All token ids (prompt followed by completion).
    pub ids: Vec<u32>,
    /// Index of the first completion token in `ids` (0 = every token after the first is scored).
    pub completion_start: usize,
}

impl Sequence {
    /// Number of scored (completion) tokens: `len − max(completion_start, 1)`.
    pub fn num_completion_tokens(&self) -> usize {
        self.ids.len().saturating_sub(self.completion_start.max(1))
    }
}

/// A right-padded batch.
#[derive(Debug, Clone)]
pub struct TokenBatch {
    /// `[B, L]` u32 token ids, padded with the pad id.
    pub input_ids: Tensor,
    /// `[B, L]` u32: 1 for real tokens, 0 for padding.
    pub attention_mask: Tensor,
    /// `[B, L−1]` f32: 1 where target token `t+1` is a completion token of a real sequence.
    pub loss_mask: Tensor,
    /// Real length of each row.
    pub lengths: Vec<usize>,
    /// Number of completion tokens of each row (the row sums of `loss_mask`).
    pub completion_counts: Vec<usize>,
}

impl TokenBatch {
    /// Pads `seqs` on the right to the longest length (at least 2).
    ///
    /// # Formula
    /// `loss_mask[b, t] = 1` iff `completion_start_b ≤ t + 1 < len_b`.
    ///
    /// # Errors
    /// An empty batch, an empty sequence, a sequence with no completion token.
    pub fn from_sequences(seqs: &[&Sequence], pad_id: u32, device: &Device) -> Result<Self> {
        if seqs.is_empty() {
            return Err(TrainError::InvalidArgument("empty batch".into()));
        }
        let l = seqs.iter().map(|s| s.ids.len()).max().unwrap_or(0).max(2);
        let b = seqs.len();
        let mut ids = vec![pad_id; b * l];
        let mut att = vec![0u32; b * l];
        let mut loss = vec![0f32; b * (l - 1)];
        let mut counts = Vec::with_capacity(b);
        for (r, s) in seqs.iter().enumerate() {
            if s.num_completion_tokens() == 0 {
                return Err(TrainError::InvalidArgument(format!(
                    "sequence {r} of the batch has no completion token (length {}, completion start {})",
                    s.ids.len(),
                    s.completion_start
                )));
            }
            for (t, &id) in s.ids.iter().enumerate() {
                ids[r * l + t] = id;
                att[r * l + t] = 1;
            }
            let mut c = 0;
            for t in 0..l - 1 {
                if t + 1 >= s.completion_start && t + 1 < s.ids.len() {
                    loss[r * (l - 1) + t] = 1.0;
                    c += 1;
                }
            }
            counts.push(c);
        }
        Ok(TokenBatch {
            input_ids: Tensor::from_vec(ids, (b, l), device)?,
            attention_mask: Tensor::from_vec(att, (b, l), device)?,
            loss_mask: Tensor::from_vec(loss, (b, l - 1), device)?,
            lengths: seqs.iter().map(|s| s.ids.len()).collect(),
            completion_counts: counts,
        })
    }

    /// Number of rows `B`.
    pub fn batch_size(&self) -> usize {
        self.lengths.len()
    }

    /// Number of non-padding tokens.
    pub fn num_tokens(&self) -> usize {
        self.lengths.iter().sum()
    }
}

/// Per-sequence completion log-probs of a batch.
#[derive(Debug, Clone)]
pub struct SeqLogps {
    /// `[B]`: `Σ_t loss_mask[b, t] · log π(ids[b, t+1] | ids[b, ≤t])`, differentiable.
    pub sum: Tensor,
    /// `[B]` (same dtype as `sum`): the number of completion tokens of each row.
    pub count: Tensor,
}

impl SeqLogps {
    /// From per-token log-probs `[B, L−1]` and the batch's loss mask `[B, L−1]`.
    ///
    /// # Errors
    /// Shape mismatch.
    pub fn from_token_logps(token_logps: &Tensor, loss_mask: &Tensor) -> candle_core::Result<Self> {
        let m = loss_mask.to_dtype(token_logps.dtype())?;
        Ok(SeqLogps {
            sum: (token_logps * &m)?.sum(1)?,
            count: m.sum(1)?,
        })
    }

    /// `[B]`: the mean per-token log-prob `sum / count` (TRL's IPO normalization).
    pub fn mean(&self) -> candle_core::Result<Tensor> {
        self.sum.div(&self.count)
    }
}

/// A trainable causal language model, as the trainer sees it.
pub trait PolicyModel {
    /// Summed completion-token log-probs (and token counts) per sequence of a right-padded
    /// batch: shape `[B]`.
    fn sequence_logps(&self, batch: &TokenBatch) -> candle_core::Result<SeqLogps>;

    /// Trainable variables sorted by name.
    fn named_vars(&self) -> Vec<(String, Var)>;

    /// [`PolicyModel::sequence_logps`] without a gradient (nothing kept for a backward pass);
    /// by default the same values, detached.
    fn sequence_logps_no_grad(&self, batch: &TokenBatch) -> candle_core::Result<SeqLogps> {
        let s = self.sequence_logps(batch)?;
        Ok(SeqLogps {
            sum: s.sum.detach(),
            count: s.count.detach(),
        })
    }

    /// The reference model's log-probs of a batch, without a gradient: the model as it is
    /// before training (by default [`PolicyModel::sequence_logps_no_grad`]; a LoRA model
    /// with its adapters off, i.e. the base model, as TRL does with PEFT).
    fn reference_logps(&self, batch: &TokenBatch) -> candle_core::Result<SeqLogps> {
        self.sequence_logps_no_grad(batch)
    }

    /// The variables that determine [`PolicyModel::reference_logps`] (fingerprinted in the
    /// reference cache's key); by default [`PolicyModel::named_vars`].
    fn reference_vars(&self) -> Vec<(String, Var)> {
        self.named_vars()
    }

    /// Seeds the random parts of the training forward passes that follow (LoRA dropout);
    /// `None`: evaluation (no dropout). The trainer sets a seed derived from its seed, the
    /// step and the micro-batch before each micro-batch, so a resumed run draws what the
    /// uninterrupted run drew. The default does nothing.
    fn set_dropout_seed(&self, _seed: Option<u64>) {}

    /// The gradients of `loss` (a scalar built by this model's forward passes) with respect to
    /// everything it depends on. The default is candle's `loss.backward()`; a model whose
    /// graph nodes hand some gradients over outside candle's store adds them here (see
    /// [`crate::model::Model::set_grad_sink`]).
    fn backward(&self, loss: &Tensor) -> candle_core::Result<GradStore> {
        loss.backward()
    }

    /// The device the batches are built on (that of the first variable by default).
    fn device(&self) -> Device {
        self.named_vars()
            .first()
            .map_or(Device::Cpu, |(_, v)| v.device().clone())
    }

    /// Writes the weights into checkpoint directory `dir`. The default writes
    /// `dir/model.safetensors` with the variables' names; the real model overrides it to write
    /// a Hugging Face checkpoint (config, tokenizer, untrained tensors).
    fn save_weights(&self, dir: &Path) -> Result<()> {
        save_named(&self.named_vars(), &dir.join(WEIGHTS_FILE), None)
    }

    /// Loads the weights written by [`PolicyModel::save_weights`] into the variables.
    fn load_weights(&self, dir: &Path) -> Result<()> {
        load_named_into(&self.named_vars(), &dir.join(WEIGHTS_FILE))
    }
}

/// The weights file of a checkpoint written by the default [`PolicyModel::save_weights`].
pub const WEIGHTS_FILE: &str = "model.safetensors";

/// Writes named tensors (vars) to a safetensors file, with optional string metadata.
///
/// # Errors
/// I/O and format errors, naming the file.
pub fn save_named(
    vars: &[(String, Var)],
    path: &Path,
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let tensors: Vec<(String, Tensor)> = vars
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
        .collect();
    save_tensors(&tensors, path, metadata)
}

/// Writes named tensors to a safetensors file, with optional string metadata.
///
/// # Errors
/// I/O and format errors, naming the file.
pub fn save_tensors(
    tensors: &[(String, Tensor)],
    path: &Path,
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let mut owned = Vec::with_capacity(tensors.len());
    for (n, t) in tensors {
        owned.push((n.clone(), t.to_device(&Device::Cpu)?.contiguous()?));
    }
    safetensors::serialize_to_file(owned.iter().map(|(n, t)| (n.as_str(), t)), metadata, path)
        .map_err(|e| TrainError::format(path, e))
}

/// Loads a safetensors file into existing variables by name: every variable must be present
/// with its shape; values are converted to the variable's dtype.
///
/// # Errors
/// A missing or mis-shaped tensor, naming it and the file.
pub fn load_named_into(vars: &[(String, Var)], path: &Path) -> Result<()> {
    let device = vars
        .first()
        .map_or(Device::Cpu, |(_, v)| v.device().clone());
    let tensors =
        candle_core::safetensors::load(path, &device).map_err(|e| TrainError::format(path, e))?;
    for (name, var) in vars {
        let t = tensors.get(name).ok_or_else(|| TrainError::Checkpoint {
            path: path.to_path_buf(),
            message: format!("missing tensor `{name}`"),
        })?;
        if t.dims() != var.dims() {
            return Err(TrainError::Checkpoint {
                path: path.to_path_buf(),
                message: format!(
                    "tensor `{name}` has shape {:?}, the model wants {:?}",
                    t.dims(),
                    var.dims()
                ),
            });
        }
        var.set(&t.to_dtype(var.dtype())?)?;
    }
    Ok(())
}

/// Reads a safetensors file's string metadata.
///
/// # Errors
/// I/O and format errors.
pub fn read_metadata(path: &Path) -> Result<HashMap<String, String>> {
    let bytes = std::fs::read(path).map_err(|e| TrainError::io(path, e))?;
    let (_, meta) =
        safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| TrainError::format(path, e))?;
    Ok(meta.metadata().clone().unwrap_or_default())
}

/// `dtype`s whose values the trainer can check and reduce on the host.
pub(crate) fn scalar_f64(t: &Tensor) -> candle_core::Result<f64> {
    t.to_dtype(DType::F64)?.to_scalar::<f64>()
}
