//! The adapter from [`crate::model::Model`] to the training core's [`PolicyModel`].

use std::path::{Path, PathBuf};

use crate::model::Model;
use crate::train::{PolicyModel, SeqLogps, TokenBatch, TrainError};
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

fn model_err(e: crate::Error) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

impl PolicyModel for TrainModel {
    fn sequence_logps(&self, b: &TokenBatch) -> candle_core::Result<SeqLogps> {
        let lp = self
            .model
            .token_logps_masked(&b.input_ids, Some(&b.attention_mask), &b.loss_mask)
            .map_err(model_err)?;
        SeqLogps::from_token_logps(&lp, &b.loss_mask)
    }

    fn named_vars(&self) -> Vec<(String, Var)> {
        self.model.named_vars()
    }

    fn backward(&self, loss: &Tensor) -> candle_core::Result<GradStore> {
        match self.model.grad_sink() {
            Some(sink) => {
                sink.clear();
                let mut store = loss.backward()?;
                sink.drain_into(&mut store)?;
                Ok(store)
            }
            None => loss.backward(),
        }
    }

    fn device(&self) -> candle_core::Device {
        self.model.device().clone()
    }

    /// A Hugging Face checkpoint directory (loads back in transformers).
    fn save_weights(&self, dir: &Path) -> crate::train::Result<()> {
        crate::checkpoint::save_pretrained(&self.model, Some(&self.source), dir, self.save_dtype)
            .map_err(|e| TrainError::Checkpoint {
                path: dir.to_path_buf(),
                message: e.to_string(),
            })
    }

    /// Reads the checkpoint's tensors (single or sharded) into the variables by name.
    fn load_weights(&self, dir: &Path) -> crate::train::Result<()> {
        let tensors = crate::checkpoint::read_tensors(dir)
            .map_err(|e| TrainError::Checkpoint {
                path: dir.to_path_buf(),
                message: e.to_string(),
            })?
            .tensors;
        for (name, var) in self.model.named_vars() {
            let t = tensors.get(&name).ok_or_else(|| TrainError::Checkpoint {
                path: dir.to_path_buf(),
                message: format!("missing tensor `{name}`"),
            })?;
            if t.dims() != var.dims() {
                return Err(TrainError::Checkpoint {
                    path: dir.to_path_buf(),
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
}
