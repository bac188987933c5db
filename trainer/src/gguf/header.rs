//! The GGUF header (magic, metadata, tensor infos) read with every size checked against the
//! file before anything is allocated, and every value candle later divides or indexes by
//! validated, so that a hostile header is an error naming the file and the key or tensor.
//!
//! candle's own reader (`gguf_file::Content::read`) divides by `general.alignment` (a zero
//! panics), materialises every metadata array as `Value`s of 32 bytes each (about 32 bytes of
//! memory per byte of file for an array of `u8`) and lets a duplicate key or tensor name
//! silently replace the first. This reader builds the same [`Content`], with three
//! differences:
//! - only the arrays the import reads ([`READ_ARRAYS`]) are materialised, each bounded by
//!   [`MAX_READ_ARRAY_ELEMENTS`] and by the machine's memory; every other array is walked over
//!   (its bytes checked to lie in the file) and kept as an empty array;
//! - a duplicate metadata key or tensor name is refused, as llama.cpp and gguf-py do;
//! - `general.alignment` must be a power of two, each tensor's dimensions (at most
//!   [`MAX_TENSOR_DIMS`], none zero) must not overflow, its rows must be whole quantization
//!   blocks, its offset a multiple of the alignment, and its bytes must lie inside the file.

use std::collections::HashMap;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, TensorInfo, Value, VersionedMagic};

use super::{ggml_dtype, ggml_type_name, GGUF_MAGIC};
use crate::error::{Error, Result};

/// The metadata arrays the import reads (the tokenizer's); every other array is skipped.
pub const READ_ARRAYS: [&str; 4] = [
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.scores",
    "tokenizer.ggml.merges",
];

/// The most elements a read array may declare: 2^24, far above any real vocabulary
/// (Gemma 3's 262,144 tokens) or merge list.
pub const MAX_READ_ARRAY_ELEMENTS: u64 = 1 << 24;

/// GGML's `GGML_MAX_DIMS`.
pub const MAX_TENSOR_DIMS: u32 = 4;

/// The deepest nesting of arrays walked over (candle's and llama.cpp's bound).
const MAX_DEPTH: usize = 64;

/// The default `general.alignment` (llama.cpp's `GGUF_DEFAULT_ALIGNMENT`).
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// GGUF value type ids (the spec's `gguf_metadata_value_type`).
const T_U8: u32 = 0;
const T_I8: u32 = 1;
const T_U16: u32 = 2;
const T_I16: u32 = 3;
const T_U32: u32 = 4;
const T_I32: u32 = 5;
const T_F32: u32 = 6;
const T_BOOL: u32 = 7;
const T_STRING: u32 = 8;
const T_ARRAY: u32 = 9;
const T_U64: u32 = 10;
const T_I64: u32 = 11;
const T_F64: u32 = 12;

/// What a string of the header belongs to, for its errors.
enum Owner<'k> {
    /// The value of a metadata key.
    Key(&'k str),
    /// A key or tensor name itself (`metadata key 3`, `the name of tensor 7`).
    Header(String),
}

/// A reader over the header that knows its position and the file's size.
struct Header<'a, R: Read + Seek> {
    r: BufReader<&'a mut R>,
    path: &'a Path,
    size: u64,
    pos: u64,
    /// GGUF version 1 (32-bit lengths).
    v1: bool,
}

impl<R: Read + Seek> Header<'_, R> {
    fn malformed(&self, message: impl Into<String>) -> Error {
        Error::GgufMalformed {
            path: self.path.to_path_buf(),
            message: message.into(),
        }
    }

    fn bad_key(&self, key: &str, message: impl Into<String>) -> Error {
        Error::GgufBadKey {
            path: self.path.to_path_buf(),
            key: key.to_string(),
            message: message.into(),
        }
    }

    fn bad_tensor(&self, name: &str, message: impl Into<String>) -> Error {
        Error::GgufTensor {
            path: self.path.to_path_buf(),
            name: name.to_string(),
            message: message.into(),
        }
    }

    fn remaining(&self) -> u64 {
        self.size.saturating_sub(self.pos)
    }

    fn bytes<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let mut b = [0u8; N];
        if (N as u64) > self.remaining() {
            return Err(self.malformed(format!(
                "truncated: {what} at byte {} runs past the end of the file ({} bytes)",
                self.pos, self.size
            )));
        }
        self.r
            .read_exact(&mut b)
            .map_err(|e| Error::io(self.path, e))?;
        self.pos += N as u64;
        Ok(b)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.bytes(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.bytes(what)?))
    }

    /// A length: 32 bits in version 1, 64 after.
    fn len(&mut self, what: &str) -> Result<u64> {
        if self.v1 {
            self.u32(what).map(u64::from)
        } else {
            self.u64(what)
        }
    }

    fn len_size(&self) -> u64 {
        if self.v1 {
            4
        } else {
            8
        }
    }

    /// Skips `n` bytes, already checked to lie in the file.
    fn skip(&mut self, n: u64) -> Result<()> {
        let n_i64 = i64::try_from(n).map_err(|_| self.malformed("a skip beyond 2^63 bytes"))?;
        self.r
            .seek_relative(n_i64)
            .map_err(|e| Error::io(self.path, e))?;
        self.pos += n;
        Ok(())
    }

    /// A string's length, checked against the rest of the file; `owner` names it in errors.
    fn string_len(&mut self, owner: &Owner) -> Result<u64> {
        let at = self.pos;
        let n = self.len("a string length")?;
        if n > self.remaining() {
            let detail = format!(
                "a string of {n} bytes at byte {at}, but only {} bytes are left in the file",
                self.remaining()
            );
            return Err(match owner {
                Owner::Key(key) => self.bad_key(key, detail),
                Owner::Header(what) => self.malformed(format!("{what}: {detail}")),
            });
        }
        Ok(n)
    }

    /// A string as candle reads it (trailing NULs dropped, invalid UTF-8 replaced).
    fn string(&mut self, owner: &Owner) -> Result<String> {
        let n = self.string_len(owner)?;
        let mut v = vec![0u8; n as usize];
        self.r
            .read_exact(&mut v)
            .map_err(|e| Error::io(self.path, e))?;
        self.pos += n;
        while v.last() == Some(&0) {
            v.pop();
        }
        Ok(String::from_utf8_lossy(&v).into_owned())
    }

    /// The least bytes one value of type `ty` takes in the file.
    fn min_size(&self, ty: u32) -> u64 {
        match ty {
            T_U8 | T_I8 | T_BOOL => 1,
            T_U16 | T_I16 => 2,
            T_U32 | T_I32 | T_F32 => 4,
            T_U64 | T_I64 | T_F64 => 8,
            T_STRING => self.len_size(),
            _ => 4 + self.len_size(),
        }
    }

    fn check_type(&self, key: &str, ty: u32) -> Result<()> {
        if ty > T_F64 {
            return Err(self.bad_key(key, format!("unknown value type {ty}")));
        }
        Ok(())
    }

    /// One scalar or string value of type `ty`.
    fn scalar(&mut self, key: &str, ty: u32) -> Result<Value> {
        let w = "a metadata value";
        Ok(match ty {
            T_U8 => Value::U8(self.bytes::<1>(w)?[0]),
            T_I8 => Value::I8(self.bytes::<1>(w)?[0] as i8),
            T_U16 => Value::U16(u16::from_le_bytes(self.bytes(w)?)),
            T_I16 => Value::I16(i16::from_le_bytes(self.bytes(w)?)),
            T_U32 => Value::U32(self.u32(w)?),
            T_I32 => Value::I32(i32::from_le_bytes(self.bytes(w)?)),
            T_U64 => Value::U64(self.u64(w)?),
            T_I64 => Value::I64(i64::from_le_bytes(self.bytes(w)?)),
            T_F32 => Value::F32(f32::from_le_bytes(self.bytes(w)?)),
            T_F64 => Value::F64(f64::from_le_bytes(self.bytes(w)?)),
            T_BOOL => match self.bytes::<1>(w)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(self.bad_key(key, format!("boolean byte {b} (not 0 or 1)"))),
            },
            T_STRING => Value::String(self.string(&Owner::Key(key))?),
            other => return Err(self.bad_key(key, format!("unknown value type {other}"))),
        })
    }

    /// An array's element type and length, the length checked against the rest of the file.
    fn array_head(&mut self, key: &str) -> Result<(u32, u64)> {
        let ty = self.u32("an array's element type")?;
        self.check_type(key, ty)?;
        let n = self.len("an array length")?;
        let need = n.checked_mul(self.min_size(ty));
        match need {
            Some(need) if need <= self.remaining() => Ok((ty, n)),
            _ => Err(self.bad_key(
                key,
                format!(
                    "an array of {n} elements needs at least {} bytes, but only {} bytes are left in the file",
                    need.map_or_else(|| "2^64".to_string(), |b| b.to_string()),
                    self.remaining()
                ),
            )),
        }
    }

    /// Walks over a value of type `ty` without keeping it.
    fn skip_value(&mut self, key: &str, ty: u32, depth: usize) -> Result<()> {
        match ty {
            T_STRING => {
                let n = self.string_len(&Owner::Key(key))?;
                self.skip(n)
            }
            T_ARRAY => {
                if depth >= MAX_DEPTH {
                    return Err(
                        self.bad_key(key, format!("arrays nested more than {MAX_DEPTH} deep"))
                    );
                }
                let (ety, n) = self.array_head(key)?;
                match ety {
                    T_STRING | T_ARRAY => {
                        for _ in 0..n {
                            self.skip_value(key, ety, depth + 1)?;
                        }
                        Ok(())
                    }
                    // Checked by array_head to lie in the file.
                    _ => self.skip(n * self.min_size(ety)),
                }
            }
            _ => self.skip(self.min_size(ty)),
        }
    }

    /// Reads one of [`READ_ARRAYS`]: a flat array, its length bounded before allocation.
    fn read_array(&mut self, key: &str) -> Result<Value> {
        let (ety, n) = self.array_head(key)?;
        if ety == T_ARRAY {
            return Err(self.bad_key(key, "an array of arrays (expected strings or numbers)"));
        }
        if n > MAX_READ_ARRAY_ELEMENTS {
            return Err(self.bad_key(
                key,
                format!(
                    "{n} elements, more than the {MAX_READ_ARRAY_ELEMENTS} any real vocabulary has"
                ),
            ));
        }
        // Each element is a `Value` in memory (a lower bound: strings add their bytes).
        let value = std::mem::size_of::<Value>();
        crate::memory::check_memory(
            || format!("{}: GGUF metadata `{key}`", self.path.display()),
            u128::from(n) * value as u128,
            || format!("{n} elements × {value} bytes"),
        )?;
        let mut v = Vec::with_capacity(n as usize);
        for _ in 0..n {
            v.push(self.scalar(key, ety)?);
        }
        Ok(Value::Array(v))
    }
}

/// The integer value of `general.alignment`, checked to be a power of two.
fn alignment(md: &HashMap<String, Value>, path: &Path) -> Result<u64> {
    const KEY: &str = "general.alignment";
    let bad = |message: String| Error::GgufBadKey {
        path: path.to_path_buf(),
        key: KEY.to_string(),
        message,
    };
    let a: i128 = match md.get(KEY) {
        None => return Ok(DEFAULT_ALIGNMENT),
        Some(Value::U8(x)) => i128::from(*x),
        Some(Value::I8(x)) => i128::from(*x),
        Some(Value::U16(x)) => i128::from(*x),
        Some(Value::I16(x)) => i128::from(*x),
        Some(Value::U32(x)) => i128::from(*x),
        Some(Value::I32(x)) => i128::from(*x),
        Some(Value::U64(x)) => i128::from(*x),
        Some(Value::I64(x)) => i128::from(*x),
        Some(v) => {
            return Err(bad(format!(
                "expected an integer, found {:?}",
                v.value_type()
            )))
        }
    };
    match u64::try_from(a) {
        Ok(a) if a.is_power_of_two() => Ok(a),
        _ => Err(bad(format!(
            "{a}; the alignment must be a power of two (llama.cpp writes {DEFAULT_ALIGNMENT})"
        ))),
    }
}

/// Reads the GGUF header of `reader` (`path` names the file in errors) into candle's
/// [`Content`], as described in the module documentation. The reader is left at an
/// unspecified position.
///
/// # Errors
/// [`Error::GgufMalformed`] (not a GGUF file, truncated, counts beyond the file),
/// [`Error::GgufBadKey`] (a duplicate key, an array or string beyond the file, a bad
/// alignment), [`Error::GgufTensor`] (a duplicate name, bad dimensions or offset, bytes past
/// the end of the file), [`Error::GgufUnsupportedQuantization`]; I/O errors.
pub fn read_header<R: Read + Seek>(reader: &mut R, path: &Path) -> Result<Content> {
    let start = reader.stream_position().map_err(|e| Error::io(path, e))?;
    let size = reader
        .seek(SeekFrom::End(0))
        .map_err(|e| Error::io(path, e))?;
    reader
        .seek(SeekFrom::Start(start))
        .map_err(|e| Error::io(path, e))?;
    let mut h = Header {
        r: BufReader::with_capacity(1 << 16, reader),
        path,
        size,
        pos: start,
        v1: false,
    };
    let magic = h.magic_and_version()?;
    let (n_tensors, n_kv) = h.counts()?;
    let metadata = h.metadata(n_kv)?;
    let align = alignment(&metadata, path)?;
    let infos = h.tensor_infos(n_tensors, align)?;
    let (tensor_data_offset, tensor_infos) = h.place_tensor_data(infos, align)?;
    Ok(Content {
        magic,
        metadata,
        tensor_infos,
        tensor_data_offset,
    })
}

/// A tensor's header entry with the number of bytes its data takes.
type SizedInfo = (String, TensorInfo, u64);

/// The steps of [`read_header`], in the order of the file.
impl<R: Read + Seek> Header<'_, R> {
    /// The magic `GGUF` and the version (1, 2 or 3; version 1 has 32-bit lengths).
    fn magic_and_version(&mut self) -> Result<VersionedMagic> {
        if self.remaining() < 4 {
            return Err(self.malformed(format!(
                "{} bytes, too short for the magic `GGUF`",
                self.remaining()
            )));
        }
        let magic: [u8; 4] = self.bytes("the magic")?;
        if magic != GGUF_MAGIC {
            return Err(self.malformed(format!(
                "it starts with {:?}, not the magic `GGUF`",
                String::from_utf8_lossy(&magic)
            )));
        }
        let version = self.u32("the version")?;
        let magic = match version {
            1 => VersionedMagic::GgufV1,
            2 => VersionedMagic::GgufV2,
            3 => VersionedMagic::GgufV3,
            v => return Err(self.malformed(format!("GGUF version {v} (supported: 1, 2, 3)"))),
        };
        self.v1 = version == 1;
        Ok(magic)
    }

    /// The tensor and metadata counts, checked against the bytes left: a key-value pair takes
    /// at least a key length, a type and one byte; a tensor info a name length, n_dims, a type
    /// and an offset.
    fn counts(&mut self) -> Result<(u64, u64)> {
        let n_tensors = self.len("the tensor count")?;
        let n_kv = self.len("the metadata count")?;
        let need = n_kv
            .checked_mul(self.len_size() + 5)
            .and_then(|a| a.checked_add(n_tensors.checked_mul(self.len_size() + 16)?));
        match need {
            Some(need) if need <= self.remaining() => Ok((n_tensors, n_kv)),
            _ => Err(self.malformed(format!(
                "the header declares {n_tensors} tensors and {n_kv} metadata entries, more than the {} bytes left in the file can hold",
                self.remaining()
            ))),
        }
    }

    /// The `n_kv` metadata entries: duplicates refused, the arrays of [`READ_ARRAYS`] read,
    /// every other array walked over and kept empty.
    fn metadata(&mut self, n_kv: u64) -> Result<HashMap<String, Value>> {
        let mut metadata: HashMap<String, Value> = HashMap::new();
        for i in 0..n_kv {
            let key = self.string(&Owner::Header(format!("metadata key {i}")))?;
            if metadata.contains_key(&key) {
                return Err(self.bad_key(
                    &key,
                    "appears twice in the header (llama.cpp and gguf-py refuse duplicate keys)",
                ));
            }
            let ty = self.u32("a metadata value type")?;
            self.check_type(&key, ty)?;
            let value = if ty != T_ARRAY {
                self.scalar(&key, ty)?
            } else if READ_ARRAYS.contains(&key.as_str()) {
                self.read_array(&key)?
            } else {
                // Not read by the import: walked over, kept as an empty array.
                self.skip_value(&key, ty, 0)?;
                Value::Array(Vec::new())
            };
            metadata.insert(key, value);
        }
        Ok(metadata)
    }

    /// The `n_tensors` tensor infos ([`Header::tensor_info`]), duplicate names refused.
    fn tensor_infos(&mut self, n_tensors: u64, align: u64) -> Result<Vec<SizedInfo>> {
        let mut infos: Vec<SizedInfo> = Vec::new();
        let mut seen: std::collections::HashSet<String> = std::collections::HashSet::new();
        for i in 0..n_tensors {
            let name = self.string(&Owner::Header(format!("the name of tensor {i}")))?;
            if !seen.insert(name.clone()) {
                return Err(self.bad_tensor(
                    &name,
                    "appears twice in the header (llama.cpp and gguf-py refuse duplicate tensor names)",
                ));
            }
            let (info, bytes) = self.tensor_info(&name, align)?;
            infos.push((name, info, bytes));
        }
        Ok(infos)
    }

    /// The tensor info after the name `name`, with the bytes of its data: 1 to
    /// [`MAX_TENSOR_DIMS`] dimensions, none zero, no overflow; a type candle reads; rows of
    /// whole quantization blocks; an offset that is a multiple of `align`.
    fn tensor_info(&mut self, name: &str, align: u64) -> Result<(TensorInfo, u64)> {
        let n_dims = self.u32("a tensor's n_dims")?;
        if n_dims == 0 || n_dims > MAX_TENSOR_DIMS {
            return Err(self.bad_tensor(
                name,
                format!("{n_dims} dimensions (GGML tensors have 1 to {MAX_TENSOR_DIMS})"),
            ));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(self.len("a tensor dimension")?);
        }
        let elems = dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .filter(|&n| n <= i64::MAX as u64 && usize::try_from(n).is_ok());
        let Some(elems) = elems else {
            return Err(self.bad_tensor(name, format!("dimensions {dims:?} overflow")));
        };
        if elems == 0 {
            return Err(self.bad_tensor(name, format!("dimensions {dims:?} hold no element")));
        }
        let type_id = self.u32("a tensor type")?;
        let Some(dtype) = ggml_dtype(type_id) else {
            return Err(Error::GgufUnsupportedQuantization {
                path: self.path.to_path_buf(),
                detail: format!(
                    "tensor `{name}` is stored as {} (GGML type {type_id})",
                    ggml_type_name(type_id)
                ),
                supported: &super::SUPPORTED_QUANTIZATIONS,
            });
        };
        let block = dtype.block_size() as u64;
        // dims[0] is the innermost (row) dimension in the file's order.
        if dims[0] % block != 0 {
            return Err(self.bad_tensor(
                name,
                format!(
                    "rows of {} elements are not whole blocks of {block} ({:?})",
                    dims[0], dtype
                ),
            ));
        }
        let bytes = (elems / block).checked_mul(dtype.type_size() as u64);
        let Some(bytes) = bytes else {
            return Err(self.bad_tensor(name, format!("dimensions {dims:?} overflow")));
        };
        let offset = self.u64("a tensor offset")?;
        if offset % align != 0 {
            return Err(self.bad_tensor(
                name,
                format!("offset {offset} is not a multiple of the alignment {align}"),
            ));
        }
        dims.reverse();
        let shape: Vec<usize> = dims.iter().map(|&d| d as usize).collect();
        let info = TensorInfo {
            ggml_dtype: dtype,
            shape: shape.into(),
            offset,
        };
        Ok((info, bytes))
    }

    /// The tensor data's offset (the next multiple of the alignment after the header) and the
    /// tensor infos by name, each tensor's bytes checked to lie inside the file.
    fn place_tensor_data(
        &self,
        infos: Vec<SizedInfo>,
        align: u64,
    ) -> Result<(u64, HashMap<String, TensorInfo>)> {
        let size = self.size;
        let mut tensor_infos: HashMap<String, TensorInfo> = HashMap::with_capacity(infos.len());
        let data_offset = self
            .pos
            .checked_next_multiple_of(align)
            .ok_or_else(|| self.malformed("the tensor data offset overflows"))?;
        for (name, info, bytes) in infos {
            let end = data_offset
                .checked_add(info.offset)
                .and_then(|s| s.checked_add(bytes));
            match end {
                Some(end) if end <= size => {}
                _ => {
                    return Err(self.bad_tensor(
                        &name,
                        format!(
                        "its {bytes} bytes at offset {} extend past the end of the file ({size} bytes)",
                        data_offset.saturating_add(info.offset)
                    ),
                    ))
                }
            }
            tensor_infos.insert(name, info);
        }
        Ok((data_offset, tensor_infos))
    }
}
