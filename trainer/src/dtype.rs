//! Parameter and compute dtypes: the names the command line and `torch_dtype` use, and the
//! accumulation dtype of reductions (f32 under half-precision parameters, as transformers).

use candle_core::DType;

use crate::error::{Error, Result};

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

/// The dtype used for normalization, softmax and log-softmax: f32 for half types.
pub fn accumulation_dtype(dtype: DType) -> DType {
    match dtype {
        DType::BF16 | DType::F16 => DType::F32,
        d => d,
    }
}

/// The largest finite value of a float dtype (infinite for other dtypes: nothing overflows
/// into them).
pub fn max_finite(d: DType) -> f64 {
    match d {
        DType::F16 => f64::from(half::f16::MAX),
        DType::BF16 => f64::from(half::bf16::MAX),
        DType::F32 => f64::from(f32::MAX),
        DType::F64 => f64::MAX,
        _ => f64::INFINITY,
    }
}
