//! The GGUF conversion cache: a GGUF file accepted wherever a Hugging Face checkpoint directory
//! is expected. [`resolve_model`] converts the file once (with [`crate::gguf::convert`], f32)
//! into a cache directory keyed by the SHA-256 of the file's content and returns that
//! directory; a directory passes through untouched.
//!
//! This room sits above the file format: it imports [`crate::gguf`], never the reverse. A
//! conversion is written into a temporary directory beside its cache directory and renamed
//! into place with a marker file ([`CACHE_MARKER`]) naming the content it was made from, so a
//! half-written or stale conversion is never read.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::DType;
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::gguf::{convert, is_gguf, CONVERTER_VERSION};
use crate::io::write_json;

/// Name of the marker file [`resolve_model`] writes into a finished cache directory.
pub const CACHE_MARKER: &str = "difinfo-gguf-source.json";

/// The directory GGUF conversions are cached in: `$DIFINFO_CACHE/gguf`, else
/// `$XDG_CACHE_HOME/difinfo/gguf`, else `~/.cache/difinfo/gguf`.
///
/// # Errors
/// None of the three variables set.
pub fn cache_root() -> Result<PathBuf> {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(d) = var("DIFINFO_CACHE") {
        return Ok(d.join("gguf"));
    }
    if let Some(d) = var("XDG_CACHE_HOME") {
        return Ok(d.join("difinfo").join("gguf"));
    }
    if let Some(d) = var("HOME") {
        return Ok(d.join(".cache").join("difinfo").join("gguf"));
    }
    Err(Error::InvalidArgument(
        "a GGUF model needs a cache directory for its conversion: set DIFINFO_CACHE (or convert it with `difinfo-train convert`)".into(),
    ))
}

/// The identity of a GGUF file for the cache: the SHA-256 of its content (streamed, 1 MiB at
/// a time), its size and the converter version. Content, not path and modification time: an
/// in-place rewrite that keeps the mtime (`cp -p`, `rsync -t`, `tar x`) is a new file.
///
/// A command resolves its model several times (tokenizer, weights, output): within one
/// process the hash is computed once per file version unless `fresh`. A version is the
/// device, inode, size, modification and status-change times: every write changes the
/// status-change time (ctime), which, unlike the mtime, no user can set back.
fn source_record(path: &Path, fresh: bool) -> Result<Value> {
    type Seen = HashMap<[i64; 7], String>;
    static HASHES: std::sync::Mutex<Option<Seen>> = std::sync::Mutex::new(None);
    let md = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    let id = file_version(&md);
    let known = (!fresh)
        .then(|| HASHES.lock().ok()?.as_ref()?.get(&id?).cloned())
        .flatten();
    let sha = match known {
        Some(h) => h,
        None => {
            let h = crate::io::sha256_file(path)?;
            if let (Ok(mut m), Some(id)) = (HASHES.lock(), id) {
                m.get_or_insert_with(HashMap::new).insert(id, h.clone());
            }
            h
        }
    };
    Ok(json!({
        "sha256": sha,
        "size": md.len(),
        "converter_version": CONVERTER_VERSION,
    }))
}

/// A file's version for [`source_record`]'s memo: device, inode, size, modification and
/// status-change times (`None` off Unix: no memo there).
fn file_version(md: &std::fs::Metadata) -> Option<[i64; 7]> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        Some([
            md.dev() as i64,
            md.ino() as i64,
            md.size() as i64,
            md.mtime(),
            md.mtime_nsec(),
            md.ctime(),
            md.ctime_nsec(),
        ])
    }
    #[cfg(not(unix))]
    {
        let _ = md;
        None
    }
}

/// FNV-1a, 64 bits: a stable hash for cache names (std's hasher may change between releases).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The cache directory under `root` of the file `path` whose identity is `rec`.
fn cache_dir_of(path: &Path, rec: &Value, root: &Path) -> PathBuf {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    let stem: String = stem
        .chars()
        .map(|c| {
            if c.is_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    root.join(format!("{stem}-{:016x}", fnv1a(rec.to_string().as_bytes())))
}

/// Where [`resolve_model_in`] puts the conversion of `path` under `root` (named after the
/// file's content: see [`resolve_model_in`]).
///
/// # Errors
/// I/O errors reading the file.
pub fn cache_dir_for(path: &Path, root: &Path) -> Result<PathBuf> {
    Ok(cache_dir_of(path, &source_record(path, false)?, root))
}

/// Whether `dir` holds a finished conversion of the file whose identity is `rec`.
fn cache_is_current(dir: &Path, rec: &Value) -> bool {
    let Ok(text) = std::fs::read_to_string(dir.join(CACHE_MARKER)) else {
        return false;
    };
    serde_json::from_str::<Value>(&text).is_ok_and(|saved| saved == *rec)
}

/// The error for a regular file given where a checkpoint directory or a GGUF file is
/// expected: it does not start with the GGUF magic.
fn not_a_gguf_file(path: &Path) -> Error {
    let mut head = Vec::new();
    let read = std::fs::File::open(path).and_then(|f| f.take(4).read_to_end(&mut head));
    if let Err(e) = read {
        return Error::io(path, e);
    }
    Error::GgufMalformed {
        path: path.to_path_buf(),
        message: format!(
            "it starts with {:?}, not the magic `GGUF` (a model is a checkpoint directory or a GGUF file)",
            String::from_utf8_lossy(&head)
        ),
    }
}

/// A checkpoint directory for `path`: `path` itself unless it is a file. A GGUF file is
/// converted (f32, lossless for every quantization) into a cache directory under `root` the
/// first time and reused while the file's content is unchanged: the cache is keyed by the
/// SHA-256 of the file (hashed on each call, about a second per GB), not by its path and
/// modification time. `converting` is called before a conversion starts, with the cache
/// directory.
///
/// # Errors
/// A regular file that is not a GGUF file ([`Error::GgufMalformed`]: bad magic); see
/// [`convert`]; I/O errors in the cache.
pub fn resolve_model_in(
    path: &Path,
    root: &Path,
    converting: &mut dyn FnMut(&Path),
) -> Result<PathBuf> {
    if !path.is_file() {
        return Ok(path.to_path_buf());
    }
    if !is_gguf(path) {
        return Err(not_a_gguf_file(path));
    }
    let rec = source_record(path, false)?;
    let dir = cache_dir_of(path, &rec, root);
    if cache_is_current(&dir, &rec) {
        return Ok(dir);
    }
    converting(&dir);
    convert_into_cache(path, &rec, &dir, root)?;
    Ok(dir)
}

/// Converts `path` (identity `rec`) into a temporary directory under `root`, writes the
/// marker and renames it to `dir`: a reader never sees a half-written conversion. The
/// temporary directory is removed on failure; a failure is no error when another process
/// finished the same conversion first.
///
/// # Errors
/// See [`convert`]; the file changed while it was converted ([`Error::GgufMalformed`]); I/O
/// errors in the cache.
fn convert_into_cache(path: &Path, rec: &Value, dir: &Path, root: &Path) -> Result<()> {
    std::fs::create_dir_all(root).map_err(|e| Error::io(root, e))?;
    let name = dir
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = root.join(format!(".{name}.tmp{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    let result = (|| {
        convert(path, &tmp, DType::F32, &mut |_, _| {})?;
        // The file may have changed while it was converted: the marker names what was read.
        let after = source_record(path, true)?;
        if after != *rec {
            return Err(Error::GgufMalformed {
                path: path.to_path_buf(),
                message: "the file changed while it was being converted; run the command again"
                    .into(),
            });
        }
        write_json(&tmp.join(CACHE_MARKER), rec)?;
        if dir.exists() {
            // A half-written or stale conversion: replaced whole.
            std::fs::remove_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        std::fs::rename(&tmp, dir).map_err(|e| Error::io(dir, e))
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&tmp);
        // Another process may have finished the same conversion first.
        if cache_is_current(dir, rec) {
            return Ok(());
        }
        return Err(e);
    }
    Ok(())
}

/// [`resolve_model_in`] under [`cache_root`], silently: how every loader accepts a GGUF file
/// where a checkpoint directory is expected (directories pass through untouched).
///
/// # Errors
/// See [`resolve_model_in`] and [`cache_root`].
pub fn resolve_model(path: &Path) -> Result<PathBuf> {
    if !path.is_file() {
        return Ok(path.to_path_buf());
    }
    resolve_model_in(path, &cache_root()?, &mut |_| {})
}
