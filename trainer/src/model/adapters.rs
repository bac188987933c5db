//! The model's LoRA adapters (PEFT): adding, loading, enabling and merging them.

use std::collections::BTreeMap;

use candle_core::{Tensor, Var};

use crate::dtype::accumulation_dtype;
use crate::error::{Error, Result};

use super::{LoraSet, Model};

impl Model {
    /// Adds LoRA adapters (see [`crate::lora`]) to the projections `cfg` targets (matched by
    /// their full module names as PEFT matches them), initialized as PEFT does (deterministic in `seed`: `A` Kaiming-uniform, `B = 0`),
    /// and freezes every other weight: from now on only the adapters carry gradients
    /// ([`Model::lora_vars`]). Adapters are trained in f32 (f64 for an f64 model) whatever
    /// the parameter dtype, and cast to the compute dtype in the forward pass.
    ///
    /// # Errors
    /// A model that already has adapters; targets that match no module or a module that is
    /// not a projection ([`crate::lora::LoraConfig::check_targets`]); tensor errors.
    pub fn add_lora(&mut self, cfg: crate::lora::LoraConfig, seed: u64) -> Result<()> {
        if self.lora.is_some() {
            return Err(Error::InvalidArgument(
                "the model already has LoRA adapters".into(),
            ));
        }
        cfg.check_targets(self.layers.len())?;
        let mut shapes = Vec::new();
        for (li, blk) in self.layers.iter().enumerate() {
            for (j, lin) in blk.lins().into_iter().enumerate() {
                if cfg.targets(li, j) {
                    let (d_out, d_in) = lin.w.dims2()?;
                    if cfg.r() > d_in.min(d_out) {
                        return Err(Error::InvalidArgument(format!(
                            "lora_r (--lora-r) = {} exceeds the rank of {} ({d_out}×{d_in}): \
                             an adapter B·A of a larger r spans no more updates than r = {}; \
                             choose --lora-r ≤ {}",
                            cfg.r(),
                            crate::lora::PROJECTIONS[j].1,
                            d_in.min(d_out),
                            d_in.min(d_out)
                        )));
                    }
                    shapes.push((li, j, d_in, d_out));
                }
            }
        }
        let dt = accumulation_dtype(self.dtype);
        let vars = crate::lora::init_weights(&cfg, &shapes, seed)?
            .into_iter()
            .map(|(n, t)| {
                Ok((
                    n,
                    Var::from_tensor(&t.to_device(&self.device)?.to_dtype(dt)?)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        self.lora = Some(LoraSet { config: cfg, vars });
        self.rebind(true);
        Ok(())
    }

    /// The LoRA configuration, when the model has adapters.
    pub fn lora_config(&self) -> Option<&crate::lora::LoraConfig> {
        self.lora.as_ref().map(|s| &s.config)
    }

    /// The adapters' variables by PEFT name, sorted (empty without adapters).
    pub fn lora_vars(&self) -> Vec<(String, Var)> {
        self.lora.as_ref().map_or_else(Vec::new, |s| s.vars.clone())
    }

    /// Sets the adapters' values from tensors named as PEFT names them (e.g. read by
    /// [`crate::lora::read_weights`]), converting dtype and device.
    ///
    /// # Errors
    /// No adapters; a missing, extra or mis-shaped tensor, naming it and `file`.
    pub fn set_lora_weights(
        &self,
        tensors: &BTreeMap<String, Tensor>,
        file: &std::path::Path,
    ) -> Result<()> {
        let set = self
            .lora
            .as_ref()
            .ok_or_else(|| Error::InvalidArgument("the model has no LoRA adapters".into()))?;
        if let Some(extra) = tensors
            .keys()
            .find(|k| !set.vars.iter().any(|(n, _)| n == *k))
        {
            return Err(Error::Checkpoint {
                path: file.to_path_buf(),
                message: format!(
                    "tensor `{extra}` is not an adapter of this model and configuration"
                ),
            });
        }
        for (name, var) in &set.vars {
            let t = tensors.get(name).ok_or_else(|| Error::MissingTensor {
                name: name.clone(),
                file: file.to_path_buf(),
            })?;
            if t.dims() != var.dims() {
                return Err(Error::ShapeMismatch {
                    name: name.clone(),
                    file: file.to_path_buf(),
                    expected: var.dims().to_vec(),
                    found: t.dims().to_vec(),
                });
            }
            var.set(&t.to_device(&self.device)?.to_dtype(var.dtype())?)?;
        }
        Ok(())
    }

    /// Sets the adapters' values from a PEFT adapter file that may hold only some of the
    /// targeted modules (PEFT loads such a file; the modules it lacks stay unadapted): an
    /// adapter with neither `lora_A` nor `lora_B` in `tensors` is removed, then
    /// [`Model::set_lora_weights`].
    ///
    /// # Errors
    /// [`Model::set_lora_weights`]'s; a file with no adapter of this model at all.
    pub fn load_lora_adapter(
        &mut self,
        tensors: &BTreeMap<String, Tensor>,
        file: &std::path::Path,
    ) -> Result<()> {
        if let Some(set) = &mut self.lora {
            let pair = |n: &str| {
                let m = n
                    .strip_suffix(".lora_A.weight")
                    .or_else(|| n.strip_suffix(".lora_B.weight"))
                    .unwrap_or(n)
                    .to_string();
                [format!("{m}.lora_A.weight"), format!("{m}.lora_B.weight")]
            };
            set.vars
                .retain(|(n, _)| pair(n).iter().any(|p| tensors.contains_key(p)));
            if set.vars.is_empty() {
                return Err(Error::Checkpoint {
                    path: file.to_path_buf(),
                    message: "holds no adapter of the modules its adapter_config.json targets"
                        .into(),
                });
            }
            self.rebind(true);
        }
        self.set_lora_weights(tensors, file)
    }

    /// Folds the adapters into the base weights (`W ← W + s · B A`, PEFT's
    /// `merge_and_unload`), removes them and unfreezes the model.
    ///
    /// # Errors
    /// Tensor errors.
    pub fn merge_lora(&mut self) -> Result<()> {
        let Some(set) = self.lora.take() else {
            return Ok(());
        };
        let scale = set.config.scale();
        let base: BTreeMap<String, Var> = self.named_vars().into_iter().collect();
        let vars: BTreeMap<&str, &Var> = set.vars.iter().map(|(n, v)| (n.as_str(), v)).collect();
        for li in 0..self.layers.len() {
            for (j, (_, path)) in crate::lora::PROJECTIONS.iter().enumerate() {
                let (na, nb) = crate::lora::tensor_names(li, j);
                if let (Some(a), Some(b)) = (vars.get(na.as_str()), vars.get(nb.as_str())) {
                    let wname = format!("model.layers.{li}.{path}.weight");
                    let w = &base[&wname];
                    let merged = crate::lora::merged_weight(
                        w.as_tensor(),
                        a.as_tensor(),
                        b.as_tensor(),
                        scale,
                    )?;
                    w.set(&merged)?;
                }
            }
        }
        self.rebind(false);
        Ok(())
    }
}
