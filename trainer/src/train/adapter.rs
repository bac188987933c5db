//! The adapter from [`crate::model::Model`] to the training core's [`PolicyModel`].

use std::path::{Path, PathBuf};

use crate::batch::Batch;
use crate::error::Error;
use crate::model::Model;
use crate::train::{PolicyModel, SeqLogps};
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

/// A model being trained, with what its checkpoints need: the source checkpoint directory
/// (config, tokenizer files, untrained tensors) and the dtype to save in.
pub struct TrainModel {
    /// The model.
    pub model: Model,
    /// The checkpoint it was loaded from.
    pub source: PathBuf,
    /// The dtype of saved weights.
    pub save_dtype: DType,
}

impl TrainModel {
    /// A model to train, its layers run as whole-layer graph nodes
    /// ([`Model::set_grad_sink`]; [`PolicyModel::backward`] collects their gradients).
    pub fn new(mut model: Model, source: PathBuf, save_dtype: DType) -> Self {
        model.set_grad_sink(Some(crate::fused::GradSink::default()));
        Self {
            model,
            source,
            save_dtype,
        }
    }
}

/// The summed completion log-probs of a batch under `model`.
/// The summed completion log-probs of a batch under `model` (packed into one row when the
/// model is [padding-free](Model::set_padding_free)).
fn seq_logps(model: &Model, b: &Batch) -> crate::Result<SeqLogps> {
    let lp = if model.padding_free() {
        model.packed_token_logps(&b.packed()?, false)?.0
    } else {
        model.token_logps_masked(&b.input_ids, Some(&b.attention_mask), &b.loss_mask)?
    };
    Ok(SeqLogps::from_token_logps(&lp, &b.loss_mask)?)
}

impl PolicyModel for TrainModel {
    fn sequence_logps(&self, b: &Batch) -> crate::Result<SeqLogps> {
        let _p = crate::profile::region("forward (candle ops, graph)");
        seq_logps(&self.model, b)
    }

    fn sequence_logps_with_sq(&self, b: &Batch) -> crate::Result<SeqLogps> {
        let _p = crate::profile::region("forward (candle ops, graph)");
        let (lp, sq) = if self.model.padding_free() {
            let (lp, sq) = self.model.packed_token_logps(&b.packed()?, true)?;
            let sq = sq.ok_or_else(|| Error::InvalidArgument("log Σ π² not computed".into()))?;
            (lp, sq)
        } else {
            self.model.token_logps_masked_with_sq(
                &b.input_ids,
                Some(&b.attention_mask),
                &b.loss_mask,
            )?
        };
        let mut s = SeqLogps::from_token_logps(&lp, &b.loss_mask)?;
        s.log_sum_sq = Some(sq.detach());
        Ok(s)
    }

    /// The adapters' variables (PEFT names) for a LoRA model, else every weight.
    fn named_vars(&self) -> Vec<(String, Var)> {
        match self.model.lora_config() {
            Some(_) => self.model.lora_vars(),
            None => self.model.named_vars(),
        }
    }

    fn sequence_logps_no_grad(&self, b: &Batch) -> crate::Result<SeqLogps> {
        seq_logps(&self.model.detached(), b)
    }

    /// The base model: adapters off (TRL with PEFT), no gradient.
    fn reference_logps(&self, b: &Batch) -> crate::Result<SeqLogps> {
        let mut m = self.model.detached();
        m.set_adapters_enabled(false);
        seq_logps(&m, b)
    }

    /// The base weights (the reference does not depend on the adapters).
    fn reference_vars(&self) -> Vec<(String, Var)> {
        self.model.named_vars()
    }

    fn set_dropout_seed(&self, seed: Option<u64>) {
        self.model.set_dropout_seed(seed);
    }

    fn backward(&self, loss: &Tensor) -> candle_core::Result<GradStore> {
        self.model.backward(loss)
    }

    fn device(&self) -> candle_core::Device {
        self.model.device().clone()
    }

    /// A Hugging Face checkpoint directory (loads back in transformers); for a LoRA model a
    /// PEFT adapter directory (`adapter_config.json`, `adapter_model.safetensors`, naming the
    /// base model) with the tokenizer files, as TRL's checkpoints with PEFT are.
    fn save_weights(&self, dir: &Path) -> crate::Result<()> {
        let err = |e: crate::Error| Error::Checkpoint {
            path: dir.to_path_buf(),
            message: e.to_string(),
        };
        if let Some(cfg) = self.model.lora_config() {
            let base = std::fs::canonicalize(&self.source).unwrap_or_else(|_| self.source.clone());
            let tensors: Vec<(String, Tensor)> = self
                .model
                .lora_vars()
                .into_iter()
                .map(|(n, v)| (n, v.as_tensor().clone()))
                .collect();
            crate::lora::save_peft_dir(dir, cfg, &base, &tensors).map_err(err)?;
            for f in crate::hf_dir::SIDE_FILES {
                let p = self.source.join(f);
                if p.exists() && self.source != dir {
                    crate::io::copy_file(&p, &dir.join(f))?;
                }
            }
            return Ok(());
        }
        crate::pretrained::save_pretrained(&self.model, Some(&self.source), dir, self.save_dtype)
            .map_err(err)
    }

    /// Reads the checkpoint's tensors (single or sharded) into the variables by name; for a
    /// LoRA model the adapter of a PEFT directory.
    fn load_weights(&self, dir: &Path) -> crate::Result<()> {
        let err = |e: crate::Error| Error::Checkpoint {
            path: dir.to_path_buf(),
            message: e.to_string(),
        };
        if self.model.lora_config().is_some() {
            let t = crate::lora::read_weights(dir, self.model.device()).map_err(err)?;
            return self
                .model
                .set_lora_weights(&t, &dir.join(crate::lora::WEIGHTS_FILE))
                .map_err(err);
        }
        let tensors = crate::pretrained::read_tensors(dir).map_err(err)?.tensors;
        crate::train::policy::set_vars(&self.model.named_vars(), |name| tensors.get(name), dir)
    }
}
