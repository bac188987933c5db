//! LoRA adapters as PEFT defines them, with TRL's `ModelConfig` options.
//!
//! An adapted projection `y = x Wᵀ` computes `y = x Wᵀ + s · (drop(x) Aᵀ) Bᵀ` with `A: [r, in]`
//! (PEFT's `lora_A`, Kaiming-uniform at initialization: `U(−1/√in, 1/√in)`), `B: [out, r]`
//! (`lora_B`, zero at initialization, so an untrained adapter changes nothing), the scale
//! `s = lora_alpha / r` (`lora_alpha / √r` with rsLoRA) and inverted dropout on the adapter's
//! input only. The base weights are frozen: only `A` and `B` train.
//!
//! Files are PEFT's: `adapter_config.json` (a `LoraConfig` with `peft_type = "LORA"`) and
//! `adapter_model.safetensors` with tensors named
//! `base_model.model.<module>.lora_A.weight` / `.lora_B.weight` (`<module>` the Hugging Face
//! name of the adapted linear layer, e.g. `model.layers.0.self_attn.q_proj`), which
//! `peft.PeftModel.from_pretrained(base, dir)` loads. [`merged_weight`] folds an adapter into
//! its base weight (`W' = W + s · B A`, PEFT's `merge_and_unload`).
//!
//! Dropout masks are a pure function of a key and the element index ([`dropout_keeps`]), so a
//! forward pass recomputed for gradient checkpointing, the fused CPU layer and the plain
//! candle path all draw the same mask, and a resumed run draws the masks the uninterrupted run
//! drew (the trainer derives each micro-batch's key from the seed and the step).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use crate::error::{Error, Result};

/// The projections of a decoder layer that can carry an adapter, with their module paths
/// inside `model.layers.N`.
pub const PROJECTIONS: [(&str, &str); 7] = [
    ("q_proj", "self_attn.q_proj"),
    ("k_proj", "self_attn.k_proj"),
    ("v_proj", "self_attn.v_proj"),
    ("o_proj", "self_attn.o_proj"),
    ("gate_proj", "mlp.gate_proj"),
    ("up_proj", "mlp.up_proj"),
    ("down_proj", "mlp.down_proj"),
];

/// PEFT's shorthand for every linear layer but the output head.
pub const ALL_LINEAR: &str = "all-linear";

/// PEFT's default targets for Llama, Mistral and Qwen2
/// (`TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`).
pub const DEFAULT_TARGETS: [&str; 2] = ["q_proj", "v_proj"];

/// The adapter file names of a PEFT directory.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// See [`CONFIG_FILE`].
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// Which modules an adapter targets: PEFT's `target_modules` as given, matched as PEFT's
/// `check_target_module_exists` matches it against a module's full name
/// (`model.layers.0.self_attn.q_proj`).
#[derive(Debug, Clone)]
enum Targets {
    /// `all-linear`: every projection of every layer.
    AllLinear,
    /// A list: a module whose full name equals an entry or ends with `.` + the entry
    /// (`q_proj` adapts every layer's, `model.layers.0.self_attn.q_proj` only layer 0's).
    List(Vec<String>),
    /// One string: a regular expression matching a module's whole name (`re.fullmatch`).
    Regex(String, regex::Regex),
}

impl PartialEq for Targets {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Targets::AllLinear, Targets::AllLinear) => true,
            (Targets::List(a), Targets::List(b)) => a == b,
            (Targets::Regex(a, _), Targets::Regex(b, _)) => a == b,
            _ => false,
        }
    }
}

/// PEFT's rule for one entry of a `target_modules` list: the module's full name equals it or
/// ends with `.` + it (`q_proj` matches `model.layers.0.self_attn.q_proj`).
fn entry_matches(name: &str, entry: &str) -> bool {
    name.strip_suffix(entry)
        .is_some_and(|head| head.is_empty() || head.ends_with('.'))
}

/// The full module name of projection `j` (an index of [`PROJECTIONS`]) of layer `layer`.
fn module_name(layer: usize, j: usize) -> String {
    format!("model.layers.{layer}.{}", PROJECTIONS[j].1)
}

/// Modules of a decoder model that are not projections (per layer: `{}` the layer index),
/// which a regular expression must not reach: PEFT would adapt them (or fail on them), and
/// this crate adapts projections only.
const OTHER_MODULES: [&str; 12] = [
    "model",
    "model.embed_tokens",
    "model.norm",
    "model.rotary_emb",
    "lm_head",
    "model.layers",
    "model.layers.{}",
    "model.layers.{}.self_attn",
    "model.layers.{}.mlp",
    "model.layers.{}.mlp.act_fn",
    "model.layers.{}.input_layernorm",
    "model.layers.{}.post_attention_layernorm",
];

/// A LoRA configuration (PEFT's `LoraConfig` fields that this crate implements; the defaults
/// are TRL's `ModelConfig`: `lora_r` 16, `lora_alpha` 32, `lora_dropout` 0.05, targets
/// `q_proj`, `v_proj`).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    r: usize,
    alpha: f64,
    dropout: f64,
    targets: Targets,
    use_rslora: bool,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self::new(16, 32.0, 0.05, &[], false).expect("TRL's defaults are valid")
    }
}

impl LoraConfig {
    /// A configuration: rank `r ≥ 1`, `alpha > 0`, dropout in `[0, 1)`, target modules as a
    /// PEFT list (`q_proj` … `down_proj`, or a module path ending in one of them, which
    /// targets that module only, e.g. `model.layers.0.self_attn.q_proj`; or `all-linear`;
    /// empty: PEFT's default for the architecture, `q_proj` and `v_proj`).
    ///
    /// # Errors
    /// Out-of-range values; an unknown target module (the message lists the known ones).
    pub fn new(
        r: usize,
        alpha: f64,
        dropout: f64,
        target_modules: &[String],
        use_rslora: bool,
    ) -> Result<Self> {
        let names: Vec<String> = if target_modules.is_empty() {
            DEFAULT_TARGETS.map(String::from).to_vec()
        } else {
            target_modules.to_vec()
        };
        for name in &names {
            let known = name == ALL_LINEAR
                || PROJECTIONS
                    .iter()
                    .any(|(short, _)| entry_matches(name, short));
            if !known {
                return Err(Error::InvalidArgument(format!(
                    "unknown LoRA target module `{name}`; expected {} (or a module path ending \
                     in one, e.g. model.layers.0.self_attn.q_proj) or {ALL_LINEAR}",
                    PROJECTIONS.map(|p| p.0).join(", ")
                )));
            }
        }
        let targets = if names.iter().any(|n| n == ALL_LINEAR) {
            Targets::AllLinear
        } else {
            Targets::List(names)
        };
        Self::with_targets(r, alpha, dropout, targets, use_rslora)
    }

    /// A configuration whose `target_modules` is one string, as PEFT reads it: `all-linear`,
    /// else a regular expression that a module's full name must match entirely
    /// (`re.fullmatch`, e.g. `model\.layers\.[01]\.self_attn\.(q|v)_proj`).
    ///
    /// # Errors
    /// [`LoraConfig::new`]'s; a pattern that does not compile.
    pub fn with_pattern(
        r: usize,
        alpha: f64,
        dropout: f64,
        pattern: &str,
        use_rslora: bool,
    ) -> Result<Self> {
        let targets = if pattern == ALL_LINEAR {
            Targets::AllLinear
        } else {
            let re = regex::Regex::new(&format!(r"\A(?:{pattern})\z")).map_err(|e| {
                Error::InvalidArgument(format!(
                    "target_modules `{pattern}` is not a regular expression: {e}"
                ))
            })?;
            Targets::Regex(pattern.to_string(), re)
        };
        Self::with_targets(r, alpha, dropout, targets, use_rslora)
    }

    /// [`LoraConfig::new`] with checked targets.
    fn with_targets(
        r: usize,
        alpha: f64,
        dropout: f64,
        targets: Targets,
        use_rslora: bool,
    ) -> Result<Self> {
        if r == 0 {
            return Err(Error::InvalidArgument("lora_r must be ≥ 1".into()));
        }
        if !(alpha.is_finite() && alpha > 0.0) {
            return Err(Error::InvalidArgument(format!(
                "lora_alpha must be finite and positive, got {alpha}"
            )));
        }
        if !(0.0..1.0).contains(&dropout) {
            return Err(Error::InvalidArgument(format!(
                "lora_dropout must be in [0, 1), got {dropout}"
            )));
        }
        Ok(Self {
            r,
            alpha,
            dropout,
            targets,
            use_rslora,
        })
    }

    /// The rank `r`.
    pub fn r(&self) -> usize {
        self.r
    }

    /// `lora_alpha`.
    pub fn alpha(&self) -> f64 {
        self.alpha
    }

    /// `lora_dropout`.
    pub fn dropout(&self) -> f64 {
        self.dropout
    }

    /// Whether rsLoRA scaling is used.
    pub fn use_rslora(&self) -> bool {
        self.use_rslora
    }

    /// `target_modules` as given (a list, or the one pattern), `all-linear` expanded to the
    /// projections' short names as PEFT saves it.
    pub fn target_modules(&self) -> Vec<String> {
        match &self.targets {
            Targets::AllLinear => PROJECTIONS.iter().map(|p| p.0.to_string()).collect(),
            Targets::List(v) => v.clone(),
            Targets::Regex(p, _) => vec![p.clone()],
        }
    }

    /// Whether projection `j` (an index of [`PROJECTIONS`]) of layer `layer` is adapted: its
    /// full name (`model.layers.{layer}.self_attn.q_proj`) matched as PEFT matches it.
    pub fn targets(&self, layer: usize, j: usize) -> bool {
        self.matches(&module_name(layer, j))
    }

    /// Whether the module called `name` is a target (PEFT's `check_target_module_exists`).
    fn matches(&self, name: &str) -> bool {
        match &self.targets {
            Targets::AllLinear => true,
            Targets::List(v) => v.iter().any(|t| entry_matches(name, t)),
            Targets::Regex(_, re) => re.is_match(name),
        }
    }

    /// Checks the targets against a model of `layers` decoder layers: each list entry adapts
    /// some module, a pattern adapts some projection and no other module.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming the entry or pattern and the module.
    pub fn check_targets(&self, layers: usize) -> Result<()> {
        let all = || (0..layers).flat_map(|l| (0..PROJECTIONS.len()).map(move |j| (l, j)));
        let hint = format!(
            "this model's modules are model.layers.N.self_attn.q_proj … model.layers.N.mlp.down_proj, N from 0 to {}",
            layers.saturating_sub(1)
        );
        match &self.targets {
            Targets::AllLinear => Ok(()),
            Targets::List(v) => {
                for t in v {
                    if !all().any(|(l, j)| entry_matches(&module_name(l, j), t)) {
                        return Err(Error::InvalidArgument(format!(
                            "LoRA target module `{t}` matches no module ({hint})"
                        )));
                    }
                }
                Ok(())
            }
            Targets::Regex(p, _) => {
                let other = OTHER_MODULES.iter().flat_map(|m| {
                    let per_layer = m.contains("{}");
                    (0..if per_layer { layers } else { 1 })
                        .map(move |l| m.replace("{}", &l.to_string()))
                });
                for m in other {
                    if self.matches(&m) {
                        return Err(Error::InvalidArgument(format!(
                            "LoRA target_modules pattern `{p}` matches module `{m}`, which is not \
                             a projection: only {} can be adapted",
                            PROJECTIONS.map(|p| p.0).join(", ")
                        )));
                    }
                }
                if !all().any(|(l, j)| self.targets(l, j)) {
                    return Err(Error::InvalidArgument(format!(
                        "LoRA target_modules pattern `{p}` matches no module ({hint})"
                    )));
                }
                Ok(())
            }
        }
    }

    /// The scale `s = lora_alpha / r`, or `lora_alpha / √r` with rsLoRA.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }

    /// `adapter_config.json` as PEFT writes it (`LoraConfig.to_dict()`), for the base model at
    /// `base`.
    pub fn to_peft_json(&self, base: &Path) -> Value {
        let alpha = if self.alpha.fract() == 0.0 && self.alpha.abs() < 1e15 {
            json!(self.alpha as i64)
        } else {
            json!(self.alpha)
        };
        json!({
            "alpha_pattern": {},
            "auto_mapping": null,
            "base_model_name_or_path": base.display().to_string(),
            "bias": "none",
            "exclude_modules": null,
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "layer_replication": null,
            "layers_pattern": null,
            "layers_to_transform": null,
            "lora_alpha": alpha,
            "lora_bias": false,
            "lora_dropout": self.dropout,
            "megatron_config": null,
            "megatron_core": "megatron.core",
            "modules_to_save": null,
            "peft_type": "LORA",
            "r": self.r,
            "rank_pattern": {},
            "revision": null,
            "target_modules": match &self.targets {
                Targets::Regex(p, _) => json!(p),
                _ => json!(self.target_modules()),
            },
            "task_type": "CAUSAL_LM",
            "use_dora": false,
            "use_rslora": self.use_rslora,
        })
    }

    /// `adapter_config.json` of a sequence classifier's adapter as PEFT writes it
    /// (`task_type` `SEQ_CLS`: the classifier head, `score`, trained whole and saved beside
    /// the adapters as one of `modules_to_save`).
    pub fn to_peft_seq_cls_json(&self, base: &Path) -> Value {
        let mut v = self.to_peft_json(base);
        v["task_type"] = json!("SEQ_CLS");
        v["modules_to_save"] = json!(["classifier", "score"]);
        v
    }

    /// Reads `adapter_config.json` from a PEFT adapter directory: the configuration and the
    /// base model path it names (if any).
    ///
    /// # Errors
    /// I/O, JSON; a PEFT type other than LORA; PEFT options this crate does not implement
    /// (DoRA, biases, `fan_in_fan_out`, per-layer patterns, `modules_to_save`), each named.
    pub fn from_peft_dir(dir: &Path) -> Result<(Self, Option<PathBuf>)> {
        let path = dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| Error::Config {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let bad = |m: String| Error::Config {
            path: path.clone(),
            message: m,
        };
        if v.get("peft_type").and_then(Value::as_str) != Some("LORA") {
            return Err(bad("`peft_type` is not \"LORA\"".into()));
        }
        let truthy = |k: &str| match v.get(k) {
            None | Some(Value::Null) | Some(Value::Bool(false)) => false,
            Some(Value::String(s)) => s != "none",
            Some(Value::Object(o)) => !o.is_empty(),
            Some(Value::Array(a)) => !a.is_empty(),
            Some(_) => true,
        };
        for k in [
            "use_dora",
            "fan_in_fan_out",
            "layers_to_transform",
            "rank_pattern",
            "alpha_pattern",
            "modules_to_save",
            "lora_bias",
            "bias",
            "layer_replication",
            "exclude_modules",
        ] {
            if truthy(k) {
                return Err(bad(format!("`{k}` = {} is not supported", v[k])));
            }
        }
        let num = |k: &str| -> Result<f64> {
            v.get(k)
                .and_then(Value::as_f64)
                .ok_or_else(|| bad(format!("field `{k}`: expected a number")))
        };
        let base = v
            .get("base_model_name_or_path")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(PathBuf::from);
        let r = num("r")?;
        if r.fract() != 0.0 || r < 1.0 {
            return Err(bad(format!(
                "field `r`: expected a positive integer, got {r}"
            )));
        }
        let dropout = v.get("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0);
        let rslora = v
            .get("use_rslora")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let targets: Vec<String> = match v.get("target_modules") {
            Some(Value::String(p)) => {
                let cfg = Self::with_pattern(r as usize, num("lora_alpha")?, dropout, p, rslora)
                    .map_err(|e| bad(e.to_string()))?;
                return Ok((cfg, base));
            }
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| {
                    x.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| bad("field `target_modules`: expected strings".into()))
                })
                .collect::<Result<_>>()?,
            _ => {
                return Err(bad(
                    "field `target_modules`: expected a list of names".into()
                ))
            }
        };
        let cfg = Self::new(r as usize, num("lora_alpha")?, dropout, &targets, rslora)
            .map_err(|e| bad(e.to_string()))?;
        Ok((cfg, base))
    }
}

/// PEFT's tensor names of the adapter on projection `j` of layer `layer`: `(lora_A, lora_B)`.
pub fn tensor_names(layer: usize, j: usize) -> (String, String) {
    let m = format!("base_model.model.model.layers.{layer}.{}", PROJECTIONS[j].1);
    (format!("{m}.lora_A.weight"), format!("{m}.lora_B.weight"))
}

/// Fresh adapter weights for `(layer, j, in, out)` projections: `A ~ U(−1/√in, 1/√in)` (PEFT's
/// `kaiming_uniform_(a = √5)`), `B = 0`, f32 on the CPU, deterministic in `seed`, by PEFT name.
///
/// # Errors
/// Tensor errors.
pub fn init_weights(
    cfg: &LoraConfig,
    shapes: &[(usize, usize, usize, usize)],
    seed: u64,
) -> Result<BTreeMap<String, Tensor>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x4c6f_5241_2d69_6e69);
    let mut out = BTreeMap::new();
    for &(layer, j, d_in, d_out) in shapes {
        let bound = 1.0 / (d_in as f64).sqrt();
        let a: Vec<f32> = (0..cfg.r * d_in)
            .map(|_| rng.gen_range(-bound..bound) as f32)
            .collect();
        let (na, nb) = tensor_names(layer, j);
        out.insert(na, Tensor::from_vec(a, (cfg.r, d_in), &Device::Cpu)?);
        out.insert(nb, Tensor::zeros((d_out, cfg.r), DType::F32, &Device::Cpu)?);
    }
    Ok(out)
}

/// `W + s · B A` in `W`'s dtype (computed in f32 or f64): PEFT's `merge_and_unload` for one
/// projection.
///
/// # Errors
/// Shapes; tensor errors.
pub fn merged_weight(w: &Tensor, a: &Tensor, b: &Tensor, scale: f64) -> Result<Tensor> {
    let acc = crate::dtype::accumulation_dtype(w.dtype());
    let delta = b
        .to_dtype(acc)?
        .matmul(&a.to_dtype(acc)?)?
        .affine(scale, 0.0)?;
    Ok((w.to_dtype(acc)? + delta)?.to_dtype(w.dtype())?)
}

/// Reads `adapter_model.safetensors` of a PEFT directory onto `device` (f32), every tensor
/// checked to be finite (as a model's weights are: a NaN adapter makes every log-prob of the
/// adapted model NaN, and a merge would write it into the base weights).
///
/// # Errors
/// I/O and format errors naming the file; [`Error::NonFiniteWeight`] naming the tensor and
/// its first NaN or infinity.
pub fn read_weights(dir: &Path, device: &Device) -> Result<BTreeMap<String, Tensor>> {
    let path = dir.join(WEIGHTS_FILE);
    let t = candle_core::safetensors::load(&path, device).map_err(|e| Error::Checkpoint {
        path: path.clone(),
        message: e.to_string(),
    })?;
    t.into_iter()
        .map(|(k, v)| {
            crate::safetensors::check_finite(&k, &v, &path)?;
            Ok((k, v.to_dtype(DType::F32)?))
        })
        .collect()
}

/// Writes a PEFT adapter directory: `adapter_config.json` and `adapter_model.safetensors`
/// (`tensors` by PEFT name, saved in f32), each through a temporary file and a rename.
///
/// # Errors
/// I/O and tensor errors.
pub fn save_peft_dir(
    dir: &Path,
    cfg: &LoraConfig,
    base: &Path,
    tensors: &[(String, Tensor)],
) -> Result<()> {
    save_peft_dir_as(dir, &cfg.to_peft_json(base), tensors)
}

/// [`save_peft_dir`] with `adapter_config.json` given (e.g.
/// [`LoraConfig::to_peft_seq_cls_json`]).
///
/// # Errors
/// I/O and tensor errors.
pub fn save_peft_dir_as(dir: &Path, config: &Value, tensors: &[(String, Tensor)]) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    crate::io::write_json(&dir.join(CONFIG_FILE), config)?;
    let mut owned = Vec::with_capacity(tensors.len());
    for (n, t) in tensors {
        owned.push((
            n.clone(),
            t.to_device(&Device::Cpu)?
                .to_dtype(DType::F32)?
                .contiguous()?,
        ));
    }
    let path = dir.join(WEIGHTS_FILE);
    let meta: std::collections::HashMap<String, String> =
        [("format".to_string(), "pt".to_string())].into();
    crate::io::write_atomic(&path, |tmp| {
        safetensors::tensor::serialize_to_file(
            owned.iter().map(|(k, v)| (k.as_str(), v)),
            Some(meta),
            tmp,
        )
        .map_err(|e| Error::Checkpoint {
            path: path.clone(),
            message: e.to_string(),
        })
    })
}

/// The configuration of the PEFT adapter in `adapter` and its base model: `base` when given,
/// else the adapter's `base_model_name_or_path`.
///
/// # Errors
/// [`LoraConfig::from_peft_dir`]'s; no base given or named.
pub fn adapter_base(adapter: &Path, base: Option<&Path>) -> Result<(LoraConfig, PathBuf)> {
    let (cfg, named) = LoraConfig::from_peft_dir(adapter)?;
    let base = match (base, named) {
        (Some(b), _) => b.to_path_buf(),
        (None, Some(b)) => b,
        (None, None) => {
            return Err(Error::InvalidArgument(format!(
                "{}: no base_model_name_or_path; pass the base model with --model",
                adapter.join(CONFIG_FILE).display()
            )))
        }
    };
    Ok((cfg, base))
}

/// Refuses a PEFT adapter directory given where a model is read (`--model`): it has an
/// adapter_config.json and no config.json. The message names the adapter's base model
/// (`base_model_name_or_path`) and `merge`.
///
/// # Errors
/// [`Error::InvalidArgument`] for an adapter directory.
pub fn refuse_adapter_as_model(dir: &Path) -> Result<()> {
    let cfg = dir.join(CONFIG_FILE);
    if !cfg.is_file() || dir.join("config.json").exists() {
        return Ok(());
    }
    let base = std::fs::read_to_string(&cfg)
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .and_then(|v| {
            v.get("base_model_name_or_path")
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .filter(|b| !b.is_empty());
    let pass = match base {
        Some(b) => format!(
            "pass its base model ({b}, base_model_name_or_path in {})",
            cfg.display()
        ),
        None => "pass its base model".to_string(),
    };
    Err(Error::InvalidArgument(format!(
        "{} is a PEFT adapter (it has {CONFIG_FILE}, no config.json), not a model: {pass} as \
         --model, or fold the adapter into it first with `difinfo-train merge --adapter {}`",
        dir.display(),
        dir.display()
    )))
}

/// SplitMix64's output function.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The dropout key of projection `j` of layer `layer` in forward pass `pass` under `seed`.
pub fn dropout_key(seed: u64, pass: u64, layer: usize, j: usize) -> u64 {
    mix(mix(mix(seed) ^ pass) ^ ((layer as u64) << 8 | j as u64))
}

/// Whether inverted dropout with probability `p` keeps element `i` under `key`: a uniform
/// `u = (mix(key + i·φ) >> 11) / 2⁵³` is kept iff `u ≥ p`.
pub fn dropout_keeps(key: u64, i: u64, p: f64) -> bool {
    let u = (mix(key ^ i.wrapping_mul(0xD1B5_4A32_D192_ED03)) >> 11) as f64 / (1u64 << 53) as f64;
    u >= p
}

/// The factor of a kept element, `1 / (1 − p)`.
pub fn dropout_scale(p: f64) -> f64 {
    1.0 / (1.0 - p)
}

/// The dropout mask `[n, d]` of `key` as a tensor of `dtype` on `device`: `1 / (1 − p)` where
/// [`dropout_keeps`], 0 elsewhere (what the fused CPU layer multiplies by, element for element).
///
/// # Errors
/// Tensor errors.
pub fn dropout_mask(
    key: u64,
    n: usize,
    d: usize,
    p: f64,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let keep = dropout_scale(p) as f32;
    let m: Vec<f32> = (0..(n * d) as u64)
        .map(|i| if dropout_keeps(key, i, p) { keep } else { 0.0 })
        .collect();
    Ok(Tensor::from_vec(m, (n, d), device)?.to_dtype(dtype)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trl_defaults_and_peft_names() {
        let c = LoraConfig::default();
        assert_eq!((c.r(), c.alpha(), c.dropout()), (16, 32.0, 0.05));
        assert_eq!(c.target_modules(), vec!["q_proj", "v_proj"]);
        assert_eq!(c.scale(), 2.0);
        let all = LoraConfig::new(4, 8.0, 0.0, &["all-linear".into()], true).unwrap();
        assert_eq!(all.target_modules().len(), 7);
        assert_eq!(all.scale(), 4.0);
        assert!(LoraConfig::new(4, 8.0, 0.0, &["lm_head".into()], false).is_err());
        assert!(LoraConfig::new(0, 8.0, 0.0, &[], false).is_err());
        assert!(LoraConfig::new(4, 8.0, 1.0, &[], false).is_err());
        assert_eq!(
            tensor_names(3, 6).0,
            "base_model.model.model.layers.3.mlp.down_proj.lora_A.weight"
        );
    }

    #[test]
    fn dropout_keeps_the_right_fraction_deterministically() {
        let n = 100_000u64;
        let kept = (0..n).filter(|&i| dropout_keeps(7, i, 0.25)).count() as f64;
        // Binomial(1e5, 0.75): standard deviation ≈ 137.
        assert!((kept - 75_000.0).abs() < 700.0, "{kept}");
        assert!((0..1000).all(|i| dropout_keeps(7, i, 0.25) == dropout_keeps(7, i, 0.25)));
        assert!((0..1000).any(|i| dropout_keeps(7, i, 0.25) != dropout_keeps(8, i, 0.25)));
        assert!((0..1000).all(|i| dropout_keeps(9, i, 0.0)));
    }
}
