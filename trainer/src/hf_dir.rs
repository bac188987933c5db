//! A Hugging Face model directory (`save_pretrained`'s layout): the names of its files, its
//! tensors (one `model.safetensors`, or the shards of `model.safetensors.index.json`), and how
//! the files a loader reads from one. The file formats inside it are read by
//! [`crate::safetensors`] and [`crate::config_json`]; a GGUF file stands for a directory through
//! [`crate::gguf_cache`] one floor up.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use serde_json::Value;

use crate::error::{Error, Result};

/// Name of the single-file weights.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// Name of the sharded-weights index.
pub const WEIGHTS_INDEX_FILE: &str = "model.safetensors.index.json";

/// Files copied unchanged by [`crate::pretrained::save_pretrained`] when present in the source directory.
pub const SIDE_FILES: [&str; 5] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
];

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
/// `model.safetensors.index.json` (a GGUF file: [`crate::pretrained::read_tensors`]).
///
/// # Errors
/// No weights file, an unreadable/malformed file, an index naming a tensor its shard lacks.
pub fn read_tensors(dir: &Path) -> Result<CheckpointTensors> {
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
        for (name, t) in crate::safetensors::load_views(st.tensors(), path)? {
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

/// The files of a Hugging Face checkpoint directory that the loaders read: config, weights
/// and their shards, tokenizer and generation files.
pub fn checkpoint_inputs(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = ["config.json", WEIGHTS_FILE, WEIGHTS_INDEX_FILE]
        .iter()
        .chain(SIDE_FILES.iter())
        .map(|f| dir.join(f))
        .collect();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "safetensors") && !v.contains(&p) {
                v.push(p);
            }
        }
    }
    v
}
