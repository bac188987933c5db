//! SGD, RMSprop and AdamW with PyTorch's update rules, f32 state (f64 for f64 parameters)
//! whatever the parameters' dtype, and state that saves to / loads from safetensors.
//!
//! State tensors are stored under `<var name>.<PyTorch state name>` (`exp_avg`, `exp_avg_sq`,
//! `square_avg`), the step count in the file's metadata; variables are visited in name order.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

pub mod adamw;

use crate::train::grads::{grad_dtype, Grads};
use crate::train::policy::save_tensors;
use crate::train::range::RangeError;
use crate::{Error, Result};

/// HF's `optim` values that the trainer supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    /// torch.optim.SGD (no momentum).
    Sgd,
    /// torch.optim.RMSprop (no momentum, not centered): the paper's optimizer.
    Rmsprop,
    /// torch.optim.AdamW (HF's adamw_torch).
    #[serde(alias = "adamw_torch")]
    #[value(alias = "adamw_torch")]
    Adamw,
}

impl std::str::FromStr for OptimizerKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "sgd" => Ok(Self::Sgd),
            "rmsprop" => Ok(Self::Rmsprop),
            "adamw" | "adamw_torch" => Ok(Self::Adamw),
            _ => Err(format!("unknown optim `{s}` (sgd, rmsprop, adamw)")),
        }
    }
}

impl OptimizerKind {
    /// The name written in the state file.
    pub fn name(self) -> &'static str {
        match self {
            Self::Sgd => "sgd",
            Self::Rmsprop => "rmsprop",
            Self::Adamw => "adamw",
        }
    }
}

/// AdamW's default `β₁` (PyTorch's and HF's `TrainingArguments`'): 0.9.
pub const ADAM_BETA1: f64 = 0.9;
/// AdamW's default `β₂` (PyTorch's and HF's): 0.999.
pub const ADAM_BETA2: f64 = 0.999;
/// AdamW's default `ε` (PyTorch's and HF's): 1e-8.
pub const ADAM_EPSILON: f64 = 1e-8;
/// RMSprop's default smoothing constant `α` (PyTorch's): 0.99.
pub const RMSPROP_ALPHA: f64 = 0.99;
/// RMSprop's default `ε` (PyTorch's): 1e-8.
pub const RMSPROP_EPSILON: f64 = 1e-8;

/// Hyper-parameters (PyTorch / HF defaults: [`ADAM_BETA1`], [`ADAM_BETA2`], [`ADAM_EPSILON`],
/// [`RMSPROP_ALPHA`], [`RMSPROP_EPSILON`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OptimizerConfig {
    /// Which optimizer.
    pub kind: OptimizerKind,
    /// Weight decay: decoupled for AdamW, added to the gradient (L2) for SGD and RMSprop, as
    /// PyTorch does; applied only to the parameters [`decays`] selects, as HF's `Trainer`
    /// does. HF default 0.
    pub weight_decay: f64,
    /// AdamW `β₁` ([`ADAM_BETA1`]).
    pub adam_beta1: f64,
    /// AdamW `β₂` ([`ADAM_BETA2`]).
    pub adam_beta2: f64,
    /// AdamW `ε` ([`ADAM_EPSILON`]).
    pub adam_epsilon: f64,
    /// RMSprop `α` ([`RMSPROP_ALPHA`]).
    pub rmsprop_alpha: f64,
    /// RMSprop `ε` ([`RMSPROP_EPSILON`]).
    pub rmsprop_epsilon: f64,
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        Self {
            kind: OptimizerKind::Adamw,
            weight_decay: 0.0,
            adam_beta1: ADAM_BETA1,
            adam_beta2: ADAM_BETA2,
            adam_epsilon: ADAM_EPSILON,
            rmsprop_alpha: RMSPROP_ALPHA,
            rmsprop_epsilon: RMSPROP_EPSILON,
        }
    }
}

impl OptimizerConfig {
    /// Checks the ranges PyTorch's optimizers enforce at construction (`0 ≤ weight_decay`,
    /// `0 ≤ β < 1`, `0 ≤ α`), each value finite, and two stricter ones: `ε > 0` (PyTorch
    /// allows 0, but then a parameter whose gradient is zero at the first step, e.g. an unused
    /// token's embedding, is updated by 0/0 = NaN) and RMSprop's `α ≤ 1` (above it the
    /// running mean of g² turns negative and its square root NaN).
    ///
    /// # Errors
    /// The first option out of range.
    pub fn validate(&self) -> std::result::Result<(), RangeError> {
        let fin = |x: f64| x.is_finite();
        if !(fin(self.weight_decay) && self.weight_decay >= 0.0) {
            return Err(RangeError::new(
                "weight_decay",
                self.weight_decay,
                "must be finite and ≥ 0 (PyTorch's optimizers require 0 ≤ weight_decay)",
            ));
        }
        for (field, b) in [
            ("adam_beta1", self.adam_beta1),
            ("adam_beta2", self.adam_beta2),
        ] {
            if !(0.0..1.0).contains(&b) {
                return Err(RangeError::new(
                    field,
                    b,
                    "must lie in [0, 1) (PyTorch's AdamW requires 0 ≤ β < 1)",
                ));
            }
        }
        for (field, e) in [
            ("adam_epsilon", self.adam_epsilon),
            ("rmsprop_epsilon", self.rmsprop_epsilon),
        ] {
            if !(fin(e) && e > 0.0) {
                return Err(RangeError::new(
                    field,
                    e,
                    "must be finite and > 0 (with ε = 0 a zero gradient entry updates its parameter by 0/0 = NaN)",
                ));
            }
        }
        if !(0.0..=1.0).contains(&self.rmsprop_alpha) {
            return Err(RangeError::new(
                "rmsprop_alpha",
                self.rmsprop_alpha,
                "must lie in [0, 1] (PyTorch's RMSprop requires 0 ≤ α; above 1 the mean of g² turns negative)",
            ));
        }
        Ok(())
    }
}

/// Whether weight decay applies to the parameter `name`, as in transformers' `Trainer`
/// (`get_decay_parameter_names`): not to biases nor to normalization weights, i.e. not when
/// the name contains `bias`, `layernorm` or `rmsnorm`, or has a `norm` or `*_norm` component
/// (`model.norm.weight`, `…input_layernorm.weight`, `…q_norm.weight`).
pub fn decays(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    if ["bias", "layernorm", "rmsnorm"]
        .iter()
        .any(|p| lower.contains(p))
    {
        return false;
    }
    !lower
        .split('.')
        .any(|part| part == "norm" || part.ends_with("_norm"))
}

/// An optimizer over a fixed, name-sorted list of variables.
#[derive(Debug, Clone)]
pub struct Optimizer {
    config: OptimizerConfig,
    names: Vec<String>,
    /// Whether weight decay applies to each variable ([`decays`]).
    decay: Vec<bool>,
    /// First moment (AdamW `exp_avg`).
    m: Vec<Option<Tensor>>,
    /// Second moment (AdamW `exp_avg_sq`, RMSprop `square_avg`).
    v: Vec<Option<Tensor>>,
    step: u64,
}

impl Optimizer {
    /// A fresh optimizer (zero state, step 0) for `vars`.
    ///
    /// # Errors
    /// A hyper-parameter out of range ([`OptimizerConfig::validate`]); unsorted or duplicate
    /// names.
    pub fn new(config: OptimizerConfig, vars: &[(String, Var)]) -> Result<Self> {
        config.validate()?;
        check_sorted(vars)?;
        let mut m = Vec::with_capacity(vars.len());
        let mut v = Vec::with_capacity(vars.len());
        for (_, var) in vars {
            let z = || Tensor::zeros(var.shape(), grad_dtype(var.dtype()), var.device());
            m.push(if config.kind == OptimizerKind::Adamw {
                Some(z()?)
            } else {
                None
            });
            v.push(if config.kind == OptimizerKind::Sgd {
                None
            } else {
                Some(z()?)
            });
        }
        Ok(Self {
            config,
            names: vars.iter().map(|(n, _)| n.clone()).collect(),
            decay: vars.iter().map(|(n, _)| decays(n)).collect(),
            m,
            v,
            step: 0,
        })
    }

    /// The optimizer of the variables `keep` selects (in order), with their state: a rank's
    /// shard under ZeRO stage 1.
    ///
    /// # Errors
    /// A mask of another length than the variable list.
    pub fn restrict(self, keep: &[bool]) -> Result<Self> {
        if keep.len() != self.names.len() {
            return Err(Error::InvalidArgument(format!(
                "a mask of {} for {} variables",
                keep.len(),
                self.names.len()
            )));
        }
        let pick = |v: Vec<Option<Tensor>>| -> Vec<Option<Tensor>> {
            v.into_iter()
                .zip(keep)
                .filter(|(_, &k)| k)
                .map(|(t, _)| t)
                .collect()
        };
        let names = self.names.iter().zip(keep).filter(|(_, &k)| k);
        let decay = self.decay.iter().zip(keep).filter(|(_, &k)| k);
        Ok(Self {
            config: self.config,
            names: names.map(|(n, _)| n.clone()).collect(),
            decay: decay.map(|(d, _)| *d).collect(),
            m: pick(self.m),
            v: pick(self.v),
            step: self.step,
        })
    }

    /// The moments, one entry per variable: `(m, v)` (AdamW's `exp_avg` and `exp_avg_sq`,
    /// RMSprop's `square_avg` as `v`; `None` where the optimizer keeps none).
    pub fn moments(&self) -> (&[Option<Tensor>], &[Option<Tensor>]) {
        (&self.m, &self.v)
    }

    /// An optimizer over `vars` holding the moments `m`, `v` (one entry per variable, as
    /// [`Optimizer::moments`] gives them) after `step` steps.
    ///
    /// # Errors
    /// See [`Optimizer::new`]; lists of another length, a moment of another shape.
    pub fn from_moments(
        config: OptimizerConfig,
        vars: &[(String, Var)],
        m: Vec<Option<Tensor>>,
        v: Vec<Option<Tensor>>,
        step: u64,
    ) -> Result<Self> {
        let mut opt = Self::new(config, vars)?;
        if m.len() != vars.len() || v.len() != vars.len() {
            return Err(Error::InvalidArgument(format!(
                "moments for {} and {} of {} variables",
                m.len(),
                v.len(),
                vars.len()
            )));
        }
        for (i, (name, var)) in vars.iter().enumerate() {
            for (slot, given) in [(&mut opt.m[i], &m[i]), (&mut opt.v[i], &v[i])] {
                match (slot.is_some(), given) {
                    (true, Some(t)) if t.dims() == var.dims() => *slot = Some(t.clone()),
                    (false, None) => {}
                    _ => {
                        return Err(Error::InvalidArgument(format!(
                            "the optimizer state given for `{name}` does not fit it"
                        )))
                    }
                }
            }
        }
        opt.step = step;
        Ok(opt)
    }

    /// Bytes of optimizer state held (the moments).
    pub fn state_bytes(&self) -> usize {
        self.m
            .iter()
            .chain(&self.v)
            .flatten()
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum()
    }

    /// Number of steps taken.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &OptimizerConfig {
        &self.config
    }

    /// One update of every variable with gradient `grads` and learning rate `lr`.
    ///
    /// # Formula
    /// (`t` the step after increment, `g` the gradient, `λ` the weight decay, `η` = `lr`)
    /// ```text
    /// SGD:      g ← g + λθ;  θ ← θ − η g
    /// RMSprop:  g ← g + λθ;  v ← α v + (1−α) g²;  θ ← θ − η g / (√v + ε)
    /// AdamW:    θ ← θ (1 − ηλ);  m ← β₁ m + (1−β₁) g;  v ← β₂ v + (1−β₂) g²;
    ///           θ ← θ − (η / (1−β₁ᵗ)) · m / (√v / √(1−β₂ᵗ) + ε)
    /// ```
    /// computed in the state dtype (f32, or f64 for f64 variables) and cast back to the
    /// variable's dtype.
    ///
    /// # Errors
    /// A variable list that differs from the optimizer's, tensor errors.
    pub fn step(&mut self, vars: &[(String, Var)], grads: &Grads, lr: f64) -> Result<()> {
        self.check_vars(vars)?;
        if grads.len() != vars.len() {
            return Err(Error::InvalidArgument(format!(
                "{} gradients for {} variables",
                grads.len(),
                vars.len()
            )));
        }
        self.step += 1;
        let c = self.config;
        let t = self.step as i32;
        for (i, ((_, var), g)) in vars.iter().zip(&grads.0).enumerate() {
            let wd = if self.decay[i] { c.weight_decay } else { 0.0 };
            let dt = grad_dtype(var.dtype());
            let p = var.as_tensor().detach().to_dtype(dt)?;
            let g = g.to_dtype(dt)?;
            let new_p = match c.kind {
                OptimizerKind::Sgd => {
                    let g = if wd != 0.0 {
                        (&g + p.affine(wd, 0.0)?)?
                    } else {
                        g
                    };
                    (&p - g.affine(lr, 0.0)?)?
                }
                OptimizerKind::Rmsprop => {
                    let g = if wd != 0.0 {
                        (&g + p.affine(wd, 0.0)?)?
                    } else {
                        g
                    };
                    let v = self.v[i].as_ref().expect("rmsprop state");
                    let v = (v.affine(c.rmsprop_alpha, 0.0)?
                        + g.sqr()?.affine(1.0 - c.rmsprop_alpha, 0.0)?)?;
                    let denom = (v.sqrt()? + c.rmsprop_epsilon)?;
                    let upd = (g / denom)?.affine(lr, 0.0)?;
                    self.v[i] = Some(v);
                    (&p - upd)?
                }
                OptimizerKind::Adamw => {
                    let bc1 = 1.0 - c.adam_beta1.powi(t);
                    let bc2 = 1.0 - c.adam_beta2.powi(t);
                    let step = adamw::AdamWStep {
                        lr,
                        weight_decay: wd,
                        beta1: c.adam_beta1,
                        beta2: c.adam_beta2,
                        eps: c.adam_epsilon,
                        bc1,
                        bc2,
                    };
                    let (m, v) = (
                        self.m[i].as_ref().expect("adamw state"),
                        self.v[i].as_ref().expect("adamw state"),
                    );
                    // In place when the variable is in the state's dtype (no parameter-sized
                    // buffer per update: the largest parameter's three copies were the step's
                    // memory peak).
                    if var.dtype() == dt
                        && adamw::adamw_step_in_place(var.as_tensor(), &g, m, v, &step)?
                    {
                        continue;
                    }
                    let fused = adamw::adamw_step(&p, &g, m, v, &step)?;
                    if let Some((new_p, m, v)) = fused {
                        // One pass, bit-identical to the op-by-op update below.
                        self.m[i] = Some(m);
                        self.v[i] = Some(v);
                        var.set(&new_p.to_dtype(var.dtype())?)?;
                        continue;
                    }
                    let p = if wd != 0.0 {
                        p.affine(1.0 - lr * wd, 0.0)?
                    } else {
                        p
                    };
                    let m = self.m[i].as_ref().expect("adamw state");
                    let v = self.v[i].as_ref().expect("adamw state");
                    let m = (m.affine(c.adam_beta1, 0.0)? + g.affine(1.0 - c.adam_beta1, 0.0)?)?;
                    let v = (v.affine(c.adam_beta2, 0.0)?
                        + g.sqr()?.affine(1.0 - c.adam_beta2, 0.0)?)?;
                    let bc1 = 1.0 - c.adam_beta1.powi(t);
                    let bc2 = 1.0 - c.adam_beta2.powi(t);
                    let denom = (v.sqrt()?.affine(1.0 / bc2.sqrt(), 0.0)? + c.adam_epsilon)?;
                    let upd = (&m / denom)?.affine(lr / bc1, 0.0)?;
                    self.m[i] = Some(m);
                    self.v[i] = Some(v);
                    (&p - upd)?
                }
            };
            var.set(&new_p.to_dtype(var.dtype())?)?;
        }
        Ok(())
    }

    /// Writes the state to a safetensors file: `<name>.exp_avg`, `<name>.exp_avg_sq` (AdamW),
    /// `<name>.square_avg` (RMSprop); metadata `optimizer` and `step`.
    ///
    /// # Errors
    /// I/O errors.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut tensors = Vec::new();
        for (i, name) in self.names.iter().enumerate() {
            if let Some(m) = &self.m[i] {
                tensors.push((format!("{name}.exp_avg"), m.clone()));
            }
            if let Some(v) = &self.v[i] {
                let key = if self.config.kind == OptimizerKind::Adamw {
                    "exp_avg_sq"
                } else {
                    "square_avg"
                };
                tensors.push((format!("{name}.{key}"), v.clone()));
            }
        }
        let meta = HashMap::from([
            ("optimizer".to_string(), self.config.kind.name().to_string()),
            ("step".to_string(), self.step.to_string()),
            ("format".to_string(), "difinfo-optimizer-v1".to_string()),
        ]);
        save_tensors(&tensors, path, Some(meta))
    }

    /// Reads state written by [`Optimizer::save`] for the same optimizer kind and variables.
    ///
    /// # Errors
    /// Another optimizer kind, a missing or mis-shaped state tensor (named).
    pub fn load(config: OptimizerConfig, vars: &[(String, Var)], path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::from_bytes(config, vars, &bytes, path)
    }

    /// [`Optimizer::load`] from the bytes of a state file (`path` names it in errors).
    ///
    /// # Errors
    /// See [`Optimizer::load`]; a malformed file; a state tensor with a non-finite value.
    pub fn from_bytes(
        config: OptimizerConfig,
        vars: &[(String, Var)],
        bytes: &[u8],
        path: &Path,
    ) -> Result<Self> {
        let mut opt = Self::new(config, vars)?;
        let (_, header) =
            safetensors::SafeTensors::read_metadata(bytes).map_err(|e| Error::format(path, e))?;
        let meta = header.metadata().clone().unwrap_or_default();
        let bad = |message: String| Error::Checkpoint {
            path: path.to_path_buf(),
            message,
        };
        let kind = meta
            .get("optimizer")
            .ok_or_else(|| bad("no `optimizer` metadata".into()))?;
        if kind != config.kind.name() {
            return Err(bad(format!(
                "optimizer state is {kind}, the run uses {}",
                config.kind.name()
            )));
        }
        opt.step = meta
            .get("step")
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("no valid `step` metadata".into()))?;
        let device = vars
            .first()
            .map_or(candle_core::Device::Cpu, |(_, v)| v.device().clone());
        let tensors = candle_core::safetensors::load_buffer(bytes, &device)
            .map_err(|e| Error::format(path, e))?;
        let take = |key: String, var: &Var| -> Result<Tensor> {
            let t = tensors
                .get(&key)
                .ok_or_else(|| bad(format!("missing state tensor `{key}`")))?;
            if t.dims() != var.dims() {
                return Err(bad(format!(
                    "state `{key}` has shape {:?}, the variable {:?}",
                    t.dims(),
                    var.dims()
                )));
            }
            let t = t.to_dtype(grad_dtype(var.dtype()))?;
            // A NaN or infinity would poison every later update of the variable.
            let total = crate::train::policy::scalar_f64(&t.abs()?.sum_all()?)?;
            if !total.is_finite() {
                return Err(bad(format!("state `{key}` holds non-finite values")));
            }
            Ok(t)
        };
        for (i, (name, var)) in vars.iter().enumerate() {
            if opt.m[i].is_some() {
                opt.m[i] = Some(take(format!("{name}.exp_avg"), var)?);
            }
            if opt.v[i].is_some() {
                let key = if config.kind == OptimizerKind::Adamw {
                    "exp_avg_sq"
                } else {
                    "square_avg"
                };
                opt.v[i] = Some(take(format!("{name}.{key}"), var)?);
            }
        }
        Ok(opt)
    }

    fn check_vars(&self, vars: &[(String, Var)]) -> Result<()> {
        if vars.len() != self.names.len() || vars.iter().zip(&self.names).any(|((a, _), b)| a != b)
        {
            return Err(Error::InvalidArgument(
                "variables differ from those the optimizer was built for".into(),
            ));
        }
        Ok(())
    }
}

fn check_sorted(vars: &[(String, Var)]) -> Result<()> {
    for w in vars.windows(2) {
        if w[0].0 >= w[1].0 {
            return Err(Error::InvalidArgument(format!(
                "variables must be sorted by name without duplicates (`{}` before `{}`)",
                w[0].0, w[1].0
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// HF's `get_decay_parameter_names`: biases and normalization weights are not decayed.
    #[test]
    fn weight_decay_skips_biases_and_norms_as_hf() {
        for n in [
            "model.norm.weight",
            "model.layers.0.input_layernorm.weight",
            "model.layers.3.post_attention_layernorm.weight",
            "model.layers.0.self_attn.q_proj.bias",
            "model.layers.0.self_attn.q_norm.weight",
        ] {
            assert!(!decays(n), "{n}");
        }
        for n in [
            "model.embed_tokens.weight",
            "lm_head.weight",
            "model.layers.0.mlp.down_proj.weight",
            "model.layers.0.self_attn.q_proj.weight",
        ] {
            assert!(decays(n), "{n}");
        }
    }
    use candle_core::{DType, Device};

    fn var(vals: &[f32]) -> Vec<(String, Var)> {
        vec![(
            "w".to_string(),
            Var::from_tensor(&Tensor::new(vals, &Device::Cpu).unwrap()).unwrap(),
        )]
    }

    fn run(kind: OptimizerKind, wd: f64) -> Vec<f32> {
        let vars = var(&[1.0, -2.0, 0.5]);
        let cfg = OptimizerConfig {
            kind,
            weight_decay: wd,
            ..Default::default()
        };
        let mut opt = Optimizer::new(cfg, &vars).unwrap();
        for g in [[0.1f32, -0.2, 0.3], [0.05, 0.4, -0.1], [-0.3, 0.1, 0.2]] {
            let grads = Grads(vec![Tensor::new(&g, &Device::Cpu).unwrap()]);
            opt.step(&vars, &grads, 0.01).unwrap();
        }
        vars[0].1.as_tensor().to_vec1::<f32>().unwrap()
    }

    /// The update rules of PyTorch's documentation (torch.optim.SGD / RMSprop / AdamW
    /// "Algorithm" boxes, default hyper-parameters), written out in f64, three steps of lr 0.01
    /// from θ = [1, −2, 0.5]. Not yet pinned to numbers produced by PyTorch itself.
    #[test]
    fn updates_match_pytorch_recurrences() {
        let reference = |kind: OptimizerKind, wd: f64| -> Vec<f64> {
            let mut p = [1.0f64, -2.0, 0.5];
            let (mut m, mut v) = ([0.0f64; 3], [0.0f64; 3]);
            let gs = [[0.1, -0.2, 0.3], [0.05, 0.4, -0.1], [-0.3, 0.1, 0.2]];
            for (t, g) in gs.iter().enumerate() {
                let t = t as i32 + 1;
                for k in 0..3 {
                    let lr = 0.01;
                    match kind {
                        OptimizerKind::Sgd => p[k] -= lr * (g[k] + wd * p[k]),
                        OptimizerKind::Rmsprop => {
                            let gk = g[k] + wd * p[k];
                            v[k] = 0.99 * v[k] + 0.01 * gk * gk;
                            p[k] -= lr * gk / (v[k].sqrt() + 1e-8);
                        }
                        OptimizerKind::Adamw => {
                            p[k] *= 1.0 - lr * wd;
                            m[k] = 0.9 * m[k] + 0.1 * g[k];
                            v[k] = 0.999 * v[k] + 0.001 * g[k] * g[k];
                            let bc1 = 1.0 - 0.9f64.powi(t);
                            let bc2 = 1.0 - 0.999f64.powi(t);
                            p[k] -= (lr / bc1) * m[k] / (v[k].sqrt() / bc2.sqrt() + 1e-8);
                        }
                    }
                }
            }
            p.to_vec()
        };
        for kind in [
            OptimizerKind::Sgd,
            OptimizerKind::Rmsprop,
            OptimizerKind::Adamw,
        ] {
            for wd in [0.0, 0.1] {
                let got = run(kind, wd);
                let want = reference(kind, wd);
                for (g, w) in got.iter().zip(&want) {
                    assert!(
                        (*g as f64 - w).abs() < 1e-6,
                        "{kind:?} wd={wd}: {got:?} vs {want:?}"
                    );
                }
            }
        }
        // AdamW's first step moves each coordinate by ≈ lr·sign(g) : [0.99, −1.99, 0.49].
        let vars = var(&[1.0, -2.0, 0.5]);
        let mut opt = Optimizer::new(OptimizerConfig::default(), &vars).unwrap();
        opt.step(
            &vars,
            &Grads(vec![
                Tensor::new(&[0.1f32, -0.2, 0.3], &Device::Cpu).unwrap()
            ]),
            0.01,
        )
        .unwrap();
        let p = vars[0].1.as_tensor().to_vec1::<f32>().unwrap();
        for (a, b) in p.iter().zip([0.99f32, -1.99, 0.49]) {
            assert!((a - b).abs() < 1e-6);
        }
    }

    /// Saving after k steps, loading, and continuing equals never stopping, bit for bit.
    #[test]
    fn state_round_trip_is_exact() {
        let dir = tempfile::tempdir().unwrap();
        for kind in [OptimizerKind::Rmsprop, OptimizerKind::Adamw] {
            let cfg = OptimizerConfig {
                kind,
                ..Default::default()
            };
            let g = |s: f32| {
                Grads(vec![Tensor::new(
                    &[0.1f32 * s, -0.2, 0.3 / s],
                    &Device::Cpu,
                )
                .unwrap()])
            };
            let a = var(&[1.0, -2.0, 0.5]);
            let mut oa = Optimizer::new(cfg, &a).unwrap();
            for s in 1..=4 {
                oa.step(&a, &g(s as f32), 0.01).unwrap();
            }
            let b = var(&[1.0, -2.0, 0.5]);
            let mut ob = Optimizer::new(cfg, &b).unwrap();
            for s in 1..=2 {
                ob.step(&b, &g(s as f32), 0.01).unwrap();
            }
            let path = dir.path().join("opt.safetensors");
            ob.save(&path).unwrap();
            let mut oc = Optimizer::load(cfg, &b, &path).unwrap();
            assert_eq!(oc.step_count(), 2);
            for s in 3..=4 {
                oc.step(&b, &g(s as f32), 0.01).unwrap();
            }
            assert_eq!(
                a[0].1.as_tensor().to_vec1::<f32>().unwrap(),
                b[0].1.as_tensor().to_vec1::<f32>().unwrap()
            );
            let wrong = OptimizerConfig {
                kind: OptimizerKind::Sgd,
                ..Default::default()
            };
            assert!(Optimizer::load(wrong, &b, &path).is_err());
        }
    }

    /// bf16 parameters keep f32 state.
    #[test]
    fn bf16_params_have_f32_state() {
        let t = Tensor::new(&[1.0f32, 2.0], &Device::Cpu)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let vars = vec![("w".to_string(), Var::from_tensor(&t).unwrap())];
        let mut opt = Optimizer::new(OptimizerConfig::default(), &vars).unwrap();
        let g = Grads(vec![Tensor::new(&[0.5f32, 0.5], &Device::Cpu).unwrap()]);
        opt.step(&vars, &g, 0.1).unwrap();
        assert_eq!(opt.v[0].as_ref().unwrap().dtype(), DType::F32);
        assert_eq!(vars[0].1.dtype(), DType::BF16);
    }
}
