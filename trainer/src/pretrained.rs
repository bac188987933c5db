//! Loading and saving a [`Model`] as transformers does (`from_pretrained`,
//! `save_pretrained`; a reward model as `…ForSequenceClassification`: [`load_reward_model`],
//! [`save_reward_pretrained`]): a Hugging Face directory (or a GGUF file, through its cached conversion
//! in [`crate::gguf_cache`]) in, a directory with the input's tensor names, config and
//! tokenizer files out; and a PEFT adapter folded into its base ([`merge_adapter`], PEFT's
//! `merge_and_unload`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use crate::config_json::ModelConfig;
use crate::dtype::{accumulation_dtype, max_finite, torch_dtype_name};
use crate::error::{Error, Result};
use crate::hf_dir::{CheckpointTensors, SIDE_FILES, WEIGHTS_FILE, WEIGHTS_INDEX_FILE};
use crate::io::write_json;
use crate::lora;
use crate::model::{Model, RewardModel, SCORE_WEIGHT};
use crate::safetensors::{check_finite, first_non_finite, unflatten, write_safetensors};

/// Every tensor of a model path: a Hugging Face directory ([`crate::hf_dir::read_tensors`]) or
/// a GGUF file, read through its cached conversion ([`crate::gguf_cache::resolve_model`]).
///
/// # Errors
/// The conversion's and [`crate::hf_dir::read_tensors`]'s.
pub fn read_tensors(path: &Path) -> Result<CheckpointTensors> {
    crate::hf_dir::read_tensors(&crate::gguf_cache::resolve_model(path)?)
}

/// Loads a checkpoint directory (or a GGUF file, through its cached conversion:
/// [`crate::gguf_cache::resolve_model`]) as a trainable [`Model`] in `dtype` on `device`.
///
/// Every weight the model uses is checked to be finite, in the file and after the conversion
/// to `dtype` (a finite f32 weight above 65504 overflows f16): a NaN or infinite weight gives
/// NaN log-probs, so it is refused here, naming the tensor and the first bad element
/// ([`Error::NonFiniteWeight`]). The check is one parallel pass over the weights.
///
/// # Errors
/// config.json errors; [`Error::MissingTensor`] (naming the tensor and the file where it was
/// expected) and [`Error::ShapeMismatch`] (naming the tensor and the file holding it);
/// [`Error::NonFiniteWeight`].
pub fn load_model(dir: &Path, dtype: DType, device: &Device) -> Result<Model> {
    let (_, config, checkpoint) = read_checkpoint(dir)?;
    model_from_checkpoint(config, checkpoint, dtype, device)
}

/// A checkpoint directory's (or GGUF file's conversion's) resolved directory, config and
/// tensors.
///
/// # Errors
/// An adapter directory; config.json and tensor-reading errors.
fn read_checkpoint(dir: &Path) -> Result<(PathBuf, ModelConfig, CheckpointTensors)> {
    lora::refuse_adapter_as_model(dir)?;
    // A GGUF file stands for its converted directory (crate::gguf_cache::resolve_model).
    let resolved = crate::gguf_cache::resolve_model(dir)?;
    let config = ModelConfig::from_file(&resolved.join("config.json"))?;
    let tensors = crate::hf_dir::read_tensors(&resolved)?;
    Ok((resolved, config, tensors))
}

/// [`load_model`]'s checks and conversion of tensors already read.
fn model_from_checkpoint(
    config: ModelConfig,
    checkpoint: CheckpointTensors,
    dtype: DType,
    device: &Device,
) -> Result<Model> {
    let CheckpointTensors {
        tensors,
        origin,
        source,
    } = checkpoint;
    for (name, shape) in config.tensor_shapes() {
        match tensors.get(&name) {
            None => return Err(Error::MissingTensor { name, file: source }),
            Some(t) if t.dims() != shape.as_slice() => {
                return Err(Error::ShapeMismatch {
                    file: origin[&name].clone(),
                    name,
                    expected: shape,
                    found: t.dims().to_vec(),
                })
            }
            Some(t) => check_finite(&name, t, &origin[&name])?,
        }
    }
    // The tensors whose conversion to `dtype` can overflow (a narrower range).
    let narrowed: BTreeMap<String, Tensor> = config
        .tensor_shapes()
        .into_iter()
        .filter_map(|(name, _)| {
            let t = &tensors[&name];
            (max_finite(dtype) < max_finite(t.dtype())).then(|| (name, t.clone()))
        })
        .collect();
    let model = Model::from_tensors(config, tensors, &source, dtype, device)?;
    for (name, var) in model.named_vars() {
        let Some(orig) = narrowed.get(&name) else {
            continue;
        };
        // Read on the host: the variable itself on the CPU, a CPU conversion otherwise (no
        // copy of the device's weights back).
        let converted = if device.is_cpu() {
            var.as_tensor().clone()
        } else {
            orig.to_dtype(dtype)?
        };
        if let Some((i, _)) = first_non_finite(&converted)? {
            let was = orig
                .flatten_all()?
                .get(i)?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
            return Err(Error::NonFiniteWeight {
                index: unflatten(i, orig.dims()),
                file: origin[&name].clone(),
                name,
                value: was,
                overflow: Some(dtype),
            });
        }
    }
    Ok(model)
}

/// The tensors to save for `model`, by Hugging Face name, cast to `dtype`: every variable,
/// the extra tensors of the input checkpoint, and `lm_head.weight` (a copy of the embedding)
/// when the embeddings are tied and the input checkpoint had one.
///
/// # Errors
/// Tensor errors.
pub fn state_dict(model: &Model, dtype: DType) -> Result<BTreeMap<String, Tensor>> {
    let mut out = BTreeMap::new();
    for (name, var) in model.named_vars() {
        out.insert(
            name,
            var.as_tensor()
                .detach()
                .to_dtype(dtype)?
                .to_device(&Device::Cpu)?,
        );
    }
    for (name, t) in model.extra_tensors() {
        let t = if name == "lm_head.weight" && model.config().tie_word_embeddings {
            out["model.embed_tokens.weight"].clone()
        } else {
            t.clone()
        };
        out.insert(name.clone(), t);
    }
    Ok(out)
}

/// Saves the weights as one safetensors file (metadata `format: pt`, as transformers expects),
/// atomically.
///
/// # Errors
/// I/O and tensor errors.
pub fn save_safetensors(model: &Model, path: &Path, dtype: DType) -> Result<()> {
    let tensors = state_dict(model, dtype)?;
    write_safetensors(path, tensors.iter().map(|(k, v)| (k.as_str(), v)))
}

/// Saves `model` as a Hugging Face directory `out`: model.safetensors in `dtype`, config.json
/// (from `src`, `torch_dtype` updated, else generated) and the tokenizer/generation files of
/// `src` copied unchanged.
///
/// # Errors
/// I/O and tensor errors.
pub fn save_pretrained(model: &Model, src: Option<&Path>, out: &Path, dtype: DType) -> Result<()> {
    save_pretrained_with(model, src, out, dtype, |_| {})
}

/// [`save_pretrained`] with config.json edited by `edit` before it is written.
///
/// # Errors
/// See [`save_pretrained`].
fn save_pretrained_with(
    model: &Model,
    src: Option<&Path>,
    out: &Path,
    dtype: DType,
    edit: impl FnOnce(&mut Value),
) -> Result<()> {
    // A GGUF source stands for its converted directory (crate::gguf_cache::resolve_model).
    let resolved = src.map(crate::gguf_cache::resolve_model).transpose()?;
    let src = resolved.as_deref();
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let mut cfg = match src.map(|s| s.join("config.json")).filter(|p| p.exists()) {
        Some(p) => {
            let text = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
            serde_json::from_str::<Value>(&text).map_err(|e| Error::Config {
                path: p.clone(),
                message: e.to_string(),
            })?
        }
        None => model.config().to_hf_json(),
    };
    if let Some(o) = cfg.as_object_mut() {
        o.insert("torch_dtype".into(), torch_dtype_name(dtype).into());
    }
    edit(&mut cfg);
    write_json(&out.join("config.json"), &cfg)?;
    if let Some(src) = src {
        if src != out {
            for f in SIDE_FILES {
                let p = src.join(f);
                if p.exists() {
                    crate::io::copy_file(&p, &out.join(f))?;
                }
            }
        }
    }
    let stale = out.join(WEIGHTS_INDEX_FILE);
    if stale.exists() {
        std::fs::remove_file(&stale).map_err(|e| Error::io(&stale, e))?;
    }
    save_safetensors(model, &out.join(WEIGHTS_FILE), dtype)
}

/// Folds the PEFT adapter in `adapter` into its base model and writes a full Hugging Face
/// checkpoint to `out` in `dtype` (PEFT's `merge_and_unload` + `save_pretrained`): every
/// adapted weight becomes `W + s · B A`, computed in f32 (f64 for an f64 save); the base's
/// other tensors, config and tokenizer files are kept. `base` overrides the adapter's
/// `base_model_name_or_path`. Returns the base model's directory.
///
/// # Errors
/// An adapter directory that is not PEFT LoRA or does not fit the base model (naming the
/// file and tensor); I/O errors.
pub fn merge_adapter(
    adapter: &Path,
    base: Option<&Path>,
    out: &Path,
    dtype: DType,
) -> Result<PathBuf> {
    let (cfg, base) = lora::adapter_base(adapter, base)?;
    let mut model = load_model(&base, accumulation_dtype(dtype), &Device::Cpu)?;
    let config_file = adapter.join(lora::CONFIG_FILE);
    cfg.check_targets(model.config().num_hidden_layers)
        .map_err(|e| Error::Config {
            path: config_file.clone(),
            message: format!("field `target_modules`: {e}"),
        })?;
    model.add_lora(cfg, 0)?;
    model.load_lora_adapter(
        &lora::read_weights(adapter, &Device::Cpu)?,
        &adapter.join(lora::WEIGHTS_FILE),
    )?;
    model.merge_lora()?;
    save_pretrained(&model, Some(&base), out, dtype)?;
    Ok(base)
}

/// What a reward model's score head starts from when [`load_reward_model`] loads a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScoreHead {
    /// The checkpoint's `score.weight` (a sequence-classification checkpoint); its absence
    /// is an error.
    Required,
    /// The checkpoint's `score.weight` if it has one; else, for a causal LM, a new head drawn
    /// as transformers initializes a linear layer, `N(0, initializer_range²)` per entry,
    /// from this seed (a stream of this crate's, not torch's), and the LM head dropped.
    OrNew(u64),
}

/// The fields of config.json that make it a sequence classifier, read beside
/// [`ModelConfig`]: `architectures`, the label count (`id2label`'s size, else `num_labels`)
/// and `pad_token_id`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClassifierFields {
    /// `architectures`.
    pub architectures: Vec<String>,
    /// The label count, when config.json states one.
    pub num_labels: Option<usize>,
    /// `pad_token_id` (null or absent: `None`).
    pub pad_token_id: Option<u32>,
}

impl ClassifierFields {
    /// Reads them from config.json at `path`.
    ///
    /// # Errors
    /// I/O errors; invalid JSON or a `pad_token_id` that is not a token id, naming the file
    /// and field.
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| Error::Config {
            path: path.to_path_buf(),
            message: format!("invalid JSON: {e}"),
        })?;
        let architectures = v
            .get("architectures")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default();
        let num_labels = match v.get("id2label").and_then(Value::as_object) {
            Some(m) => Some(m.len()),
            None => v
                .get("num_labels")
                .and_then(Value::as_u64)
                .map(|n| n as usize),
        };
        let pad_token_id =
            match v.get("pad_token_id") {
                None | Some(Value::Null) => None,
                Some(x) => Some(x.as_u64().and_then(|n| u32::try_from(n).ok()).ok_or_else(
                    || Error::Config {
                        path: path.to_path_buf(),
                        message: format!("field `pad_token_id`: expected a token id, got {x}"),
                    },
                )?),
            };
        Ok(Self {
            architectures,
            num_labels,
            pad_token_id,
        })
    }
}

/// Loads a checkpoint directory (or GGUF file) as a [`RewardModel`] in `dtype` on `device`:
/// a `…ForSequenceClassification` checkpoint with one label as transformers loads it (its
/// `score.weight` and `pad_token_id`), or, with [`ScoreHead::OrNew`], a causal LM with a new
/// score head and without its LM head (TRL's `RewardTrainer` from a causal LM). The decoder's
/// weights are checked as [`load_model`] checks them.
///
/// # Errors
/// Those of [`load_model`]; a checkpoint without `score.weight` under
/// [`ScoreHead::Required`]; a head or config.json with more than one label; a non-finite
/// head.
pub fn load_reward_model(
    dir: &Path,
    dtype: DType,
    device: &Device,
    head: ScoreHead,
) -> Result<RewardModel> {
    let (resolved, mut config, mut checkpoint) = read_checkpoint(dir)?;
    let config_path = resolved.join("config.json");
    let fields = ClassifierFields::read(&config_path)?;
    let score = checkpoint.tensors.remove(SCORE_WEIGHT);
    let origin = checkpoint.origin.get(SCORE_WEIGHT).cloned();
    let label_err = |n: usize| Error::Config {
        path: config_path.clone(),
        message: format!(
            "field `id2label`/`num_labels`: {n} labels; a reward model has num_labels = 1"
        ),
    };
    if let (Some(n), Some(_)) = (fields.num_labels, &score) {
        if n != 1 {
            return Err(label_err(n));
        }
    }
    let score = match (score, head) {
        (Some(t), _) => {
            check_finite(
                SCORE_WEIGHT,
                &t,
                origin.as_deref().unwrap_or(config_path.as_path()),
            )?;
            t
        }
        (None, ScoreHead::Required) => {
            return Err(Error::Config {
                path: config_path.clone(),
                message: format!(
                    "no `{SCORE_WEIGHT}` in {}: not a sequence-classification checkpoint \
                     (architectures {:?}); train one with `difinfo-train reward`",
                    checkpoint.source.display(),
                    fields.architectures
                ),
            })
        }
        (None, ScoreHead::OrNew(seed)) => {
            new_score_head(config.hidden_size, config.initializer_range, seed)?
        }
    };
    // A classifier has no LM head: the decoder binds it to the embedding, and a causal LM's
    // own is dropped (transformers drops it too).
    checkpoint.tensors.remove("lm_head.weight");
    config.tie_word_embeddings = true;
    let decoder = model_from_checkpoint(config, checkpoint, dtype, device)?;
    RewardModel::new(decoder, &score, fields.pad_token_id).map_err(|e| Error::Config {
        path: config_path,
        message: e.to_string(),
    })
}

/// A new score head `[1, H]`, entries `N(0, std²)` from `seed` (Box–Muller over a seeded
/// generator).
///
/// # Errors
/// Tensor errors.
fn new_score_head(hidden: usize, std: f64, seed: u64) -> Result<Tensor> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let v: Vec<f32> = (0..hidden)
        .map(|_| {
            let (u1, u2): (f64, f64) = (rng.gen::<f64>().max(f64::MIN_POSITIVE), rng.gen());
            (std * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
        })
        .collect();
    Ok(Tensor::from_vec(v, (1, hidden), &Device::Cpu)?)
}

/// The transformers class of a sequence classifier over `causal_class` (`LlamaForCausalLM`
/// → `LlamaForSequenceClassification`).
pub fn classifier_class(causal_class: &str) -> String {
    let stem = causal_class
        .strip_suffix("ForCausalLM")
        .or_else(|| causal_class.strip_suffix("ForSequenceClassification"))
        .unwrap_or(causal_class);
    format!("{stem}ForSequenceClassification")
}

/// Saves a reward model as a Hugging Face directory that transformers loads as a sequence
/// classifier with one label: [`save_pretrained`]'s files (the decoder's tensors and
/// `score.weight`, no LM head) and config.json with `architectures` the model type's
/// `…ForSequenceClassification`, `id2label` `{"0": "LABEL_0"}`, `label2id` and the model's
/// `pad_token_id`.
///
/// # Errors
/// I/O and tensor errors.
pub fn save_reward_pretrained(
    model: &RewardModel,
    src: Option<&Path>,
    out: &Path,
    dtype: DType,
) -> Result<()> {
    let class = classifier_class(model.decoder().config().arch.hf_class());
    let pad = model.pad_token_id();
    save_pretrained_with(model.decoder(), src, out, dtype, |cfg| {
        if let Some(o) = cfg.as_object_mut() {
            o.insert("architectures".into(), serde_json::json!([class]));
            o.insert("id2label".into(), serde_json::json!({"0": "LABEL_0"}));
            o.insert("label2id".into(), serde_json::json!({"LABEL_0": 0}));
            o.remove("num_labels");
            o.insert("pad_token_id".into(), pad.map_or(Value::Null, Value::from));
        }
    })
}
