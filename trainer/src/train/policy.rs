//! What the trainer needs from a model: summed completion log-probs of a right-padded batch,
//! and its trainable variables by name.
//!
//! The batch is the crate's one [`Batch`] (ids `[B, L]`, attention mask `[B, L]`, shifted loss
//! mask `[B, L−1]`), so the real model implements [`PolicyModel`] by forwarding to its own
//! `sequence_logps`.

use std::collections::HashMap;
use std::path::Path;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};

use crate::batch::Batch;
use crate::error::{Error, Result};

/// Per-sequence completion log-probs of a batch, with the per-token values they sum.
#[derive(Debug, Clone)]
pub struct SeqLogps {
    /// `[B]`: `Σ_t loss_mask[b, t] · log π(ids[b, t+1] | ids[b, ≤t])`, differentiable.
    pub sum: Tensor,
    /// `[B]` (same dtype as `sum`): the number of completion tokens of each row.
    pub count: Tensor,
    /// `[B, L−1]`: `loss_mask[b, t] · log π(ids[b, t+1] | ids[b, ≤t])`, differentiable like
    /// `sum` (LD-DPO splits it at the pair's shared length).
    pub tokens: Tensor,
    /// `[B, L−1]` (same dtype): the loss mask.
    pub mask: Tensor,
    /// `[B, L−1]`: `log Σ_v π(v | ids[b, ≤t])²` at the completion positions (0 elsewhere),
    /// detached, when asked for ([`PolicyModel::sequence_logps_with_sq`]; WPO's weights).
    pub log_sum_sq: Option<Tensor>,
}

impl SeqLogps {
    /// From per-token log-probs `[B, L−1]` and the batch's loss mask `[B, L−1]`.
    ///
    /// # Errors
    /// Shape mismatch.
    pub fn from_token_logps(token_logps: &Tensor, loss_mask: &Tensor) -> candle_core::Result<Self> {
        let m = loss_mask.to_dtype(token_logps.dtype())?;
        let tokens = (token_logps * &m)?;
        Ok(SeqLogps {
            sum: tokens.sum(1)?,
            count: m.sum(1)?,
            tokens,
            mask: m,
            log_sum_sq: None,
        })
    }

    /// A batch known by its sums alone (`[B]` log-probs and token counts): one position per
    /// row holds the sum. LD-DPO's split and WPO's weights need the real per-token values of
    /// [`SeqLogps::from_token_logps`].
    ///
    /// # Errors
    /// Shape mismatch.
    pub fn from_sums(sum: &Tensor, count: &Tensor) -> candle_core::Result<Self> {
        let tokens = sum.unsqueeze(1)?;
        Ok(SeqLogps {
            sum: sum.clone(),
            count: count.clone(),
            mask: tokens.ones_like()?,
            tokens,
            log_sum_sq: None,
        })
    }

    /// The same values without a gradient.
    pub fn detach(&self) -> Self {
        SeqLogps {
            sum: self.sum.detach(),
            count: self.count.detach(),
            tokens: self.tokens.detach(),
            mask: self.mask.detach(),
            log_sum_sq: self.log_sum_sq.as_ref().map(Tensor::detach),
        }
    }

    /// Rows `start..start + len` (one side of a batch of pairs).
    ///
    /// # Errors
    /// Rows out of range.
    pub fn rows(&self, start: usize, len: usize) -> candle_core::Result<Self> {
        Ok(SeqLogps {
            sum: self.sum.narrow(0, start, len)?,
            count: self.count.narrow(0, start, len)?,
            tokens: self.tokens.narrow(0, start, len)?,
            mask: self.mask.narrow(0, start, len)?,
            log_sum_sq: self
                .log_sum_sq
                .as_ref()
                .map(|t| t.narrow(0, start, len))
                .transpose()?,
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
    fn sequence_logps(&self, batch: &Batch) -> Result<SeqLogps>;

    /// Trainable variables sorted by name.
    fn named_vars(&self) -> Vec<(String, Var)>;

    /// A reward model's rewards `[B]` of a right-padded batch, differentiable: the value its
    /// objective reads ([`difinfo::objective::Rule::Reward`]). A causal LM has none.
    ///
    /// # Errors
    /// By default: the model has no score head.
    fn sequence_scores(&self, _batch: &Batch) -> Result<Tensor> {
        Err(Error::InvalidArgument(
            "the model has no score head (a reward model is a sequence classifier)".into(),
        ))
    }

    /// [`PolicyModel::sequence_logps`] without a gradient (nothing kept for a backward pass);
    /// by default the same values, detached.
    fn sequence_logps_no_grad(&self, batch: &Batch) -> Result<SeqLogps> {
        Ok(self.sequence_logps(batch)?.detach())
    }

    /// [`PolicyModel::sequence_logps`] with [`SeqLogps::log_sum_sq`] filled in (WPO's
    /// weights read it). The default is an error: a model that gives it overrides this.
    fn sequence_logps_with_sq(&self, _batch: &Batch) -> Result<SeqLogps> {
        Err(Error::Options(
            "use_weighting: this model does not give log Σ_v π(v)² per token".into(),
        ))
    }

    /// The reference model's log-probs of a batch, without a gradient: the model as it is
    /// before training (by default [`PolicyModel::sequence_logps_no_grad`]; a LoRA model
    /// with its adapters off, i.e. the base model, as TRL does with PEFT).
    fn reference_logps(&self, batch: &Batch) -> Result<SeqLogps> {
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
        .map_err(|e| Error::format(path, e))
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
        candle_core::safetensors::load(path, &device).map_err(|e| Error::format(path, e))?;
    set_vars(vars, |name| tensors.get(name), path)
}

/// Sets each variable to the tensor `tensor(name)` gives (moved to the variable's device,
/// converted to its dtype): every variable must be present with its shape. `path` names the
/// file or checkpoint directory they came from.
///
/// # Errors
/// [`Error::Checkpoint`] for a missing or mis-shaped tensor, naming it and `path`; tensor
/// errors.
pub fn set_vars<'t>(
    vars: &[(String, Var)],
    tensor: impl Fn(&str) -> Option<&'t Tensor>,
    path: &Path,
) -> Result<()> {
    for (name, var) in vars {
        let t = tensor(name).ok_or_else(|| Error::Checkpoint {
            path: path.to_path_buf(),
            message: format!("missing tensor `{name}`"),
        })?;
        if t.dims() != var.dims() {
            return Err(Error::Checkpoint {
                path: path.to_path_buf(),
                message: format!(
                    "tensor `{name}` has shape {:?}, the model wants {:?}",
                    t.dims(),
                    var.dims()
                ),
            });
        }
        var.set(&t.to_device(var.device())?.to_dtype(var.dtype())?)?;
    }
    Ok(())
}

/// Reads a safetensors file's string metadata.
///
/// # Errors
/// I/O and format errors.
pub fn read_metadata(path: &Path) -> Result<HashMap<String, String>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let (_, meta) =
        safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| Error::format(path, e))?;
    Ok(meta.metadata().clone().unwrap_or_default())
}

/// `dtype`s whose values the trainer can check and reduce on the host.
pub(crate) fn scalar_f64(t: &Tensor) -> candle_core::Result<f64> {
    t.to_dtype(DType::F64)?.to_scalar::<f64>()
}
