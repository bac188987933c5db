//! Loading and saving a [`Model`] as transformers does (`from_pretrained`,
//! `save_pretrained`): a Hugging Face directory (or a GGUF file, through its cached conversion
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
use crate::model::Model;
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
    lora::refuse_adapter_as_model(dir)?;
    // A GGUF file stands for its converted directory (crate::gguf_cache::resolve_model).
    let resolved = crate::gguf_cache::resolve_model(dir)?;
    let dir = resolved.as_path();
    let config = ModelConfig::from_file(&dir.join("config.json"))?;
    let CheckpointTensors {
        tensors,
        origin,
        source,
    } = crate::hf_dir::read_tensors(dir)?;
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
