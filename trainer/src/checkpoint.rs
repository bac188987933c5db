//! Hugging Face checkpoint directories: loading (single or sharded safetensors) and saving.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::io::write_atomic;
use crate::model::Model;

/// Name of the single-file weights.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// Name of the sharded-weights index.
pub const WEIGHTS_INDEX_FILE: &str = "model.safetensors.index.json";

/// Files copied unchanged by [`save_pretrained`] when present in the source directory.
pub const SIDE_FILES: [&str; 5] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
];

/// Parses a dtype name as used on the command line and in `torch_dtype`.
///
/// # Errors
/// Unknown names.
pub fn parse_dtype(s: &str) -> Result<DType> {
    match s {
        "f32" | "float32" => Ok(DType::F32),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        "f16" | "float16" => Ok(DType::F16),
        "f64" | "float64" => Ok(DType::F64),
        _ => Err(Error::InvalidArgument(format!(
            "unknown dtype `{s}`; expected f32, bf16, f16 or f64"
        ))),
    }
}

/// The transformers spelling of a dtype (`torch_dtype`).
pub fn torch_dtype_name(d: DType) -> &'static str {
    match d {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        DType::F64 => "float64",
        _ => "float32",
    }
}

/// The tensors of a checkpoint directory.
#[derive(Debug, Clone)]
pub struct CheckpointTensors {
    /// Tensors by name (CPU, file dtype).
    pub tensors: BTreeMap<String, Tensor>,
    /// The file holding each tensor.
    pub origin: BTreeMap<String, PathBuf>,
    /// `model.safetensors`, or the index of a sharded checkpoint.
    pub source: PathBuf,
}

/// Reads every tensor of a checkpoint directory: `model.safetensors`, or all shards listed in
/// `model.safetensors.index.json`. A GGUF file is read through its cached conversion
/// ([`crate::gguf_cache::resolve_model`]).
///
/// # Errors
/// No weights file, an unreadable/malformed file, an index naming a tensor its shard lacks.
pub fn read_tensors(dir: &Path) -> Result<CheckpointTensors> {
    // A GGUF file stands for its converted directory (crate::gguf_cache::resolve_model).
    let resolved = crate::gguf_cache::resolve_model(dir)?;
    let dir = resolved.as_path();
    let single = dir.join(WEIGHTS_FILE);
    let index = dir.join(WEIGHTS_INDEX_FILE);
    let mut tensors = BTreeMap::new();
    let mut origin = BTreeMap::new();
    let read_file = |path: &Path,
                     tensors: &mut BTreeMap<String, Tensor>,
                     origin: &mut BTreeMap<String, PathBuf>|
     -> Result<()> {
        if !path.exists() {
            return Err(Error::Checkpoint {
                path: path.to_path_buf(),
                message: "file not found".into(),
            });
        }
        // SAFETY: the file is only read; modifying a checkpoint while it loads is unsupported.
        let st =
            unsafe { candle_core::safetensors::MmapedSafetensors::new(path) }.map_err(|e| {
                Error::Checkpoint {
                    path: path.to_path_buf(),
                    message: format!("not a valid safetensors file: {e}"),
                }
            })?;
        for (name, t) in load_views(st.tensors(), path)? {
            origin.insert(name.clone(), path.to_path_buf());
            tensors.insert(name, t);
        }
        Ok(())
    };
    if single.exists() {
        read_file(&single, &mut tensors, &mut origin)?;
        return Ok(CheckpointTensors {
            tensors,
            origin,
            source: single,
        });
    }
    if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| Error::Checkpoint {
            path: index.clone(),
            message: format!("invalid JSON: {e}"),
        })?;
        let map = v
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| Error::Checkpoint {
                path: index.clone(),
                message: "missing object `weight_map`".into(),
            })?;
        let mut files: Vec<String> = Vec::new();
        let mut want: HashMap<String, String> = HashMap::new();
        for (name, file) in map {
            let file = file.as_str().ok_or_else(|| Error::Checkpoint {
                path: index.clone(),
                message: format!("weight_map[`{name}`] is not a file name"),
            })?;
            if file.contains('/') || file.contains('\\') || file.starts_with('.') {
                return Err(Error::Checkpoint { path: index.clone(), message: format!("weight_map[`{name}`]: shard `{file}` must be a plain file name in the directory") });
            }
            if !files.iter().any(|f| f == file) {
                files.push(file.to_string());
            }
            want.insert(name.clone(), file.to_string());
        }
        files.sort();
        for f in &files {
            read_file(&dir.join(f), &mut tensors, &mut origin)?;
        }
        let mut names: Vec<_> = want.keys().cloned().collect();
        names.sort();
        for name in names {
            let shard = dir.join(&want[&name]);
            if origin.get(&name) != Some(&shard) {
                return Err(Error::MissingTensor { name, file: shard });
            }
        }
        return Ok(CheckpointTensors {
            tensors,
            origin,
            source: index,
        });
    }
    Err(Error::Checkpoint {
        path: dir.to_path_buf(),
        message: format!("no {WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE} in the directory"),
    })
}

/// The tensors of a safetensors file's views, on the CPU in the file's dtype (`path` names
/// the file in errors).
fn load_views(
    views: Vec<(String, safetensors::tensor::TensorView<'_>)>,
    path: &Path,
) -> Result<Vec<(String, Tensor)>> {
    views
        .into_iter()
        .map(|(name, view)| {
            let t = candle_core::safetensors::Load::load(&view, &Device::Cpu).map_err(|e| {
                Error::Checkpoint {
                    path: path.to_path_buf(),
                    message: format!("tensor `{name}`: {e}"),
                }
            })?;
            Ok((name, t))
        })
        .collect()
}

/// Every tensor of a safetensors file held in memory, as [`read_tensors`] reads each file of a
/// checkpoint (`path` names it in errors).
///
/// # Errors
/// A malformed header or tensor, naming the file.
pub fn parse_safetensors(bytes: &[u8], path: &Path) -> Result<Vec<(String, Tensor)>> {
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| Error::Checkpoint {
        path: path.to_path_buf(),
        message: format!("not a valid safetensors file: {e}"),
    })?;
    load_views(st.tensors(), path)
}

/// The first NaN or infinite element of `t`: its flat index and value; `None` when every
/// element is finite (always for integer tensors). One parallel pass over the data, in the
/// tensor's own dtype (a CPU copy first for a tensor on another device).
///
/// # Errors
/// Tensor errors.
pub fn first_non_finite(t: &Tensor) -> Result<Option<(usize, f64)>> {
    let t = t.to_device(&Device::Cpu)?.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        return Ok(None);
    };
    let (a, b) = layout
        .contiguous_offsets()
        .ok_or_else(|| Error::InvalidArgument("first_non_finite: non-contiguous tensor".into()))?;
    Ok(match t.dtype() {
        DType::F32 => scan(&cpu.as_slice::<f32>()?[a..b], |x| !x.is_finite(), f64::from),
        DType::F64 => scan(&cpu.as_slice::<f64>()?[a..b], |x| !x.is_finite(), |x| x),
        DType::BF16 => scan(
            &cpu.as_slice::<half::bf16>()?[a..b],
            |x| !x.is_finite(),
            f64::from,
        ),
        DType::F16 => scan(
            &cpu.as_slice::<half::f16>()?[a..b],
            |x| !x.is_finite(),
            f64::from,
        ),
        _ => None,
    })
}

/// The first element of `v` that is `bad`, with its value as f64: chunks tested in parallel
/// (an OR over each chunk, no early exit inside it, so the test vectorizes), then the first
/// bad chunk searched.
fn scan<T: Copy + Send + Sync>(
    v: &[T],
    bad: impl Fn(T) -> bool + Sync,
    value: impl Fn(T) -> f64,
) -> Option<(usize, f64)> {
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 16;
    let k = v
        .par_chunks(CHUNK)
        .position_first(|c| c.iter().fold(false, |acc, &x| acc | bad(x)))?;
    let i = k * CHUNK + v[k * CHUNK..].iter().position(|&x| bad(x))?;
    Some((i, value(v[i])))
}

/// The largest finite value of a float dtype (infinite for other dtypes: nothing overflows
/// into them).
fn max_finite(d: DType) -> f64 {
    match d {
        DType::F16 => f64::from(half::f16::MAX),
        DType::BF16 => f64::from(half::bf16::MAX),
        DType::F32 => f64::from(f32::MAX),
        DType::F64 => f64::MAX,
        _ => f64::INFINITY,
    }
}

/// The multi-dimensional index of flat index `i` in `dims` (row-major).
fn unflatten(mut i: usize, dims: &[usize]) -> Vec<usize> {
    let mut idx = vec![0; dims.len()];
    for (k, &d) in dims.iter().enumerate().rev() {
        if d > 0 {
            idx[k] = i % d;
            i /= d;
        }
    }
    idx
}

/// Refuses a tensor holding a NaN or an infinity: [`Error::NonFiniteWeight`] naming it, the
/// file and the first such element.
///
/// # Errors
/// As said; tensor errors.
pub fn check_finite(name: &str, t: &Tensor, file: &Path) -> Result<()> {
    match first_non_finite(t)? {
        None => Ok(()),
        Some((i, value)) => Err(Error::NonFiniteWeight {
            name: name.to_string(),
            file: file.to_path_buf(),
            index: unflatten(i, t.dims()),
            value,
            overflow: None,
        }),
    }
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
    crate::lora::refuse_adapter_as_model(dir)?;
    // A GGUF file stands for its converted directory (crate::gguf_cache::resolve_model).
    let resolved = crate::gguf_cache::resolve_model(dir)?;
    let dir = resolved.as_path();
    let config = ModelConfig::from_file(&dir.join("config.json"))?;
    let CheckpointTensors {
        tensors,
        origin,
        source,
    } = read_tensors(dir)?;
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

/// Writes named tensors as one safetensors file (metadata `format: pt`, as transformers
/// expects), atomically.
///
/// # Errors
/// I/O and tensor errors.
pub fn write_safetensors<'a>(
    path: &Path,
    tensors: impl IntoIterator<Item = (&'a str, &'a Tensor)>,
) -> Result<()> {
    let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    write_atomic(path, |tmp| {
        safetensors::tensor::serialize_to_file(tensors, Some(meta), tmp).map_err(|e| {
            Error::Checkpoint {
                path: path.to_path_buf(),
                message: e.to_string(),
            }
        })
    })
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
    let cfg_path = out.join("config.json");
    write_atomic(&cfg_path, |tmp| {
        std::fs::write(
            tmp,
            serde_json::to_string_pretty(&cfg).unwrap_or_default() + "\n",
        )
        .map_err(|e| Error::io(tmp, e))
    })?;
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
