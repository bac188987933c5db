//! The safetensors format: tensors parsed from a file's bytes, written atomically with the
//! metadata transformers expects, and the finiteness check every loader runs on them (a NaN or
//! infinite weight, named with its file and first bad element).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::io::write_atomic;

/// The tensors of a safetensors file's views, on the CPU in the file's dtype (`path` names
/// the file in errors): what every reader of safetensors bytes builds its tensors with.
pub fn load_views(
    views: Vec<(String, ::safetensors::tensor::TensorView<'_>)>,
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

/// Every tensor of a safetensors file held in memory, as [`crate::hf_dir::read_tensors`] reads each file of a
/// checkpoint (`path` names it in errors).
///
/// # Errors
/// A malformed header or tensor, naming the file.
pub fn parse_safetensors(bytes: &[u8], path: &Path) -> Result<Vec<(String, Tensor)>> {
    let st = ::safetensors::SafeTensors::deserialize(bytes).map_err(|e| Error::Checkpoint {
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

/// The multi-dimensional index of flat index `i` in `dims` (row-major).
pub fn unflatten(mut i: usize, dims: &[usize]) -> Vec<usize> {
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
        ::safetensors::tensor::serialize_to_file(tensors, Some(meta), tmp).map_err(|e| {
            Error::Checkpoint {
                path: path.to_path_buf(),
                message: e.to_string(),
            }
        })
    })
}
