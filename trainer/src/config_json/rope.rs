//! RoPE settings of config.json: `rope_theta`, the scaling (`rope_scaling`, transformers 5's
//! `rope_parameters`), and the inverse frequencies they give.

use std::path::Path;

use serde_json::Value;

use super::{cfg_err, ModelConfig};
use crate::error::Result;

/// RoPE frequency scaling (`rope_scaling` / `rope_parameters`).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Llama 3.1 scaling: long wavelengths divided by `factor`, short ones kept, a smooth
    /// interpolation in between.
    Llama3 {
        /// Divisor of the low frequencies.
        factor: f64,
        /// `low_freq_factor`.
        low_freq_factor: f64,
        /// `high_freq_factor`.
        high_freq_factor: f64,
        /// `original_max_position_embeddings`.
        original_max_position_embeddings: f64,
    },
    /// Linear position interpolation: every frequency divided by `factor`.
    Linear {
        /// The divisor.
        factor: f64,
    },
}

impl RopeScaling {
    /// The `rope_scaling` object config.json writes.
    pub fn to_json(&self) -> Value {
        match self {
            RopeScaling::Linear { factor } => {
                serde_json::json!({"rope_type": "linear", "factor": factor})
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => serde_json::json!({
                "rope_type": "llama3", "factor": factor, "low_freq_factor": low_freq_factor,
                "high_freq_factor": high_freq_factor,
                "original_max_position_embeddings": original_max_position_embeddings,
            }),
        }
    }
}

/// `rope_theta` (default 10000) and the RoPE scaling, from the top level or (transformers
/// ≥ 5) `rope_parameters`.
///
/// # Errors
/// A `rope_theta` that is not a positive number; the errors of [`parse_rope_scaling`].
pub(super) fn rope(raw: &super::RawConfig, path: &Path) -> Result<(f64, Option<RopeScaling>)> {
    // transformers >= 5 moves rope settings into `rope_parameters`.
    let rope_params = raw.rope_parameters.as_ref().and_then(Value::as_object);
    let rope_theta = raw
        .rope_theta
        .or_else(|| {
            rope_params
                .and_then(|p| p.get("rope_theta"))
                .and_then(Value::as_f64)
        })
        .unwrap_or(10000.0);
    if !(rope_theta.is_finite() && rope_theta > 0.0) {
        return Err(cfg_err(path, "`rope_theta` must be a positive number"));
    }
    let rope_scaling = match (&raw.rope_scaling, &raw.rope_parameters) {
        (Some(v), _) if !v.is_null() => parse_rope_scaling(v, path)?,
        (_, Some(v)) => parse_rope_scaling(v, path)?,
        _ => None,
    };
    Ok((rope_theta, rope_scaling))
}

pub(super) fn parse_rope_scaling(v: &Value, path: &Path) -> Result<Option<RopeScaling>> {
    let Some(obj) = v.as_object() else {
        return match v {
            Value::Null => Ok(None),
            _ => Err(cfg_err(path, "`rope_scaling` must be an object")),
        };
    };
    let kind = obj
        .get("rope_type")
        .or_else(|| obj.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let num = |key: &str| -> Result<f64> {
        obj.get(key).and_then(Value::as_f64).ok_or_else(|| {
            cfg_err(
                path,
                format!("rope scaling `{kind}` needs a number `{key}`"),
            )
        })
    };
    match kind {
        "default" => Ok(None),
        "llama3" => {
            let s = RopeScaling::Llama3 {
                factor: num("factor")?,
                low_freq_factor: num("low_freq_factor")?,
                high_freq_factor: num("high_freq_factor")?,
                original_max_position_embeddings: num("original_max_position_embeddings")?,
            };
            if let RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } = &s
            {
                if !(*factor > 0.0
                    && *original_max_position_embeddings > 0.0
                    && high_freq_factor > low_freq_factor
                    && *low_freq_factor > 0.0)
                {
                    return Err(cfg_err(path, "llama3 rope scaling needs factor > 0, original_max_position_embeddings > 0 and high_freq_factor > low_freq_factor > 0"));
                }
            }
            Ok(Some(s))
        }
        "linear" => {
            let factor = num("factor")?;
            if factor <= 0.0 {
                return Err(cfg_err(path, "linear rope scaling needs factor > 0"));
            }
            Ok(Some(RopeScaling::Linear { factor }))
        }
        other => Err(cfg_err(
            path,
            format!("unsupported rope scaling type `{other}`; supported: default, llama3, linear"),
        )),
    }
}

impl ModelConfig {
    /// RoPE inverse frequencies `θ^(−2k/d)` for `k = 0 .. d/2`, with the configured scaling.
    ///
    /// # Formula
    /// `inv_freq_k = rope_theta^(−2k/head_dim)`; Llama 3 scaling with wavelength
    /// `λ = 2π / inv_freq_k`: kept when `λ < L/high`, divided by `factor` when `λ > L/low`,
    /// otherwise `(1−s)·f/factor + s·f` with `s = (L/λ − low)/(high − low)`, where `L` is
    /// `original_max_position_embeddings`.
    pub fn rope_inv_freq(&self) -> Vec<f64> {
        let d = self.head_dim;
        let base: Vec<f64> = (0..d / 2)
            .map(|k| 1.0 / self.rope_theta.powf((2 * k) as f64 / d as f64))
            .collect();
        match &self.rope_scaling {
            None => base,
            Some(RopeScaling::Linear { factor }) => base.into_iter().map(|f| f / factor).collect(),
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => {
                let low_wavelen = original_max_position_embeddings / low_freq_factor;
                let high_wavelen = original_max_position_embeddings / high_freq_factor;
                base.into_iter()
                    .map(|f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let s = (original_max_position_embeddings / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - s) * f / factor + s * f
                        }
                    })
                    .collect()
            }
        }
    }
}
