//! A reward model as the training core's [`PolicyModel`]: its per-sequence value is the score
//! ([`PolicyModel::sequence_scores`]); its checkpoints are sequence classifiers that
//! transformers loads, or with LoRA a PEFT `SEQ_CLS` adapter whose `score` head is saved
//! whole (PEFT's `modules_to_save`), as TRL's `RewardTrainer` writes them.

use std::path::{Path, PathBuf};

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

use crate::batch::Batch;
use crate::error::Error;
use crate::model::{RewardModel, SCORE_WEIGHT};
use crate::train::{PolicyModel, SeqLogps};

/// The score head's name in a PEFT adapter file (`modules_to_save`, saved without PEFT's
/// `modules_to_save.default` infix).
pub const PEFT_SCORE_WEIGHT: &str = "base_model.model.score.weight";

/// A reward model being trained, with what its checkpoints need: the source checkpoint (config,
/// tokenizer files) and the dtype to save in.
pub struct RewardTrainModel {
    /// The model.
    pub model: RewardModel,
    /// The checkpoint it was loaded from.
    pub source: PathBuf,
    /// The dtype of saved weights.
    pub save_dtype: DType,
}

impl RewardTrainModel {
    /// A reward model to train, its decoder layers run as whole-layer graph nodes (as
    /// [`crate::train::adapter::TrainModel::new`] does).
    pub fn new(mut model: RewardModel, source: PathBuf, save_dtype: DType) -> Self {
        model
            .decoder_mut()
            .set_grad_sink(Some(crate::fused::GradSink::default()));
        Self {
            model,
            source,
            save_dtype,
        }
    }
}

impl PolicyModel for RewardTrainModel {
    /// A reward model has no completion log-probs.
    fn sequence_logps(&self, _b: &Batch) -> crate::Result<SeqLogps> {
        Err(Error::InvalidArgument(
            "a reward model has no completion log-probs (it scores sequences)".into(),
        ))
    }

    fn sequence_scores(&self, b: &Batch) -> crate::Result<Tensor> {
        self.model
            .scores(&b.input_ids, Some(&b.attention_mask), &b.lengths)
    }

    /// With LoRA: the adapters' variables and the score head (`score.weight`); else every
    /// weight, the score head included.
    fn named_vars(&self) -> Vec<(String, Var)> {
        let d = self.model.decoder();
        match d.lora_config() {
            Some(_) => {
                let mut v = d.lora_vars();
                v.push((SCORE_WEIGHT.to_string(), self.model.score_var().clone()));
                v.sort_by(|a, b| a.0.cmp(&b.0));
                v
            }
            None => d.named_vars(),
        }
    }

    fn set_dropout_seed(&self, seed: Option<u64>) {
        self.model.decoder().set_dropout_seed(seed);
    }

    fn backward(&self, loss: &Tensor) -> candle_core::Result<GradStore> {
        self.model.decoder().backward(loss)
    }

    fn device(&self) -> candle_core::Device {
        self.model.decoder().device().clone()
    }

    /// A sequence-classifier checkpoint directory (loads in transformers); with LoRA a PEFT
    /// `SEQ_CLS` adapter directory (the adapters and `base_model.model.score.weight`) with the
    /// tokenizer files.
    fn save_weights(&self, dir: &Path) -> crate::Result<()> {
        let err = |e: crate::Error| Error::Checkpoint {
            path: dir.to_path_buf(),
            message: e.to_string(),
        };
        let d = self.model.decoder();
        if let Some(cfg) = d.lora_config() {
            let base = std::fs::canonicalize(&self.source).unwrap_or_else(|_| self.source.clone());
            let mut tensors: Vec<(String, Tensor)> = d
                .lora_vars()
                .into_iter()
                .map(|(n, v)| (n, v.as_tensor().clone()))
                .collect();
            tensors.push((
                PEFT_SCORE_WEIGHT.to_string(),
                self.model.score_var().as_tensor().clone(),
            ));
            crate::lora::save_peft_dir_as(dir, &cfg.to_peft_seq_cls_json(&base), &tensors)
                .map_err(err)?;
            for f in crate::hf_dir::SIDE_FILES {
                let p = self.source.join(f);
                if p.exists() && self.source != dir {
                    crate::io::copy_file(&p, &dir.join(f))?;
                }
            }
            return Ok(());
        }
        crate::pretrained::save_reward_pretrained(
            &self.model,
            Some(&self.source),
            dir,
            self.save_dtype,
        )
        .map_err(err)
    }

    /// Reads a checkpoint written by [`PolicyModel::save_weights`] into the variables.
    fn load_weights(&self, dir: &Path) -> crate::Result<()> {
        let err = |e: crate::Error| Error::Checkpoint {
            path: dir.to_path_buf(),
            message: e.to_string(),
        };
        let d = self.model.decoder();
        if d.lora_config().is_some() {
            let file = dir.join(crate::lora::WEIGHTS_FILE);
            let mut t = crate::lora::read_weights(dir, d.device()).map_err(err)?;
            let score = t
                .remove(PEFT_SCORE_WEIGHT)
                .ok_or_else(|| Error::Checkpoint {
                    path: file.clone(),
                    message: format!("missing tensor `{PEFT_SCORE_WEIGHT}`"),
                })?;
            let head = [(SCORE_WEIGHT.to_string(), self.model.score_var().clone())];
            crate::train::policy::set_vars(&head, |_| Some(&score), &file)?;
            return d.set_lora_weights(&t, &file).map_err(err);
        }
        let tensors = crate::pretrained::read_tensors(dir).map_err(err)?.tensors;
        crate::train::policy::set_vars(&d.named_vars(), |name| tensors.get(name), dir)
    }
}
