//! Reference log-probs: computed once before training with the reference model (the initial
//! policy, or TRL's `ref_model` given by `--ref-model`), stored on disk under a key that hashes
//! the reference's weights (its identity), the tokenized data and the tokenization and
//! batching settings, and reloaded when the key matches, so the reference model is never held
//! in memory while training.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};

use crate::batch::{Batch, Sequence};
use crate::dist::{Collective, Single};
use crate::error::{Error, Result};
use crate::train::data::PreferencePair;
use crate::train::objective::pair_logps;
use crate::train::parallel::all_reduce_f64;
use crate::train::policy::{read_metadata, save_tensors, PolicyModel};
use difinfo::objective::{Objective, ObjectiveSpec};

/// Per-pair reference log-probs: sums over completion tokens and token counts.
#[derive(Debug, Clone, PartialEq)]
pub struct RefLogps {
    /// `log π_ref(y_w)` (sum over completion tokens).
    pub chosen_sum: Vec<f64>,
    /// Completion tokens of the chosen.
    pub chosen_count: Vec<f64>,
    /// `log π_ref(y_l)`.
    pub rejected_sum: Vec<f64>,
    /// Completion tokens of the rejected.
    pub rejected_count: Vec<f64>,
}

/// A 64-bit FNV-1a-style hash over 64-bit words (FNV's offset basis and prime, one
/// multiply per word), stable across platforms and Rust versions.
#[derive(Debug, Clone, Copy)]
pub struct Fnv64(u64);

impl Default for Fnv64 {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv64 {
    /// Mixes one word.
    pub fn word(&mut self, w: u64) {
        self.0 = (self.0 ^ w).wrapping_mul(0x0000_0100_0000_01b3);
    }

    /// Mixes a byte string (its length, then its bytes in 8-byte little-endian words).
    pub fn bytes(&mut self, b: &[u8]) {
        self.word(b.len() as u64);
        for c in b.chunks(8) {
            let mut w = [0u8; 8];
            w[..c.len()].copy_from_slice(c);
            self.word(u64::from_le_bytes(w));
        }
    }

    /// The hash.
    pub fn finish(&self) -> u64 {
        self.0
    }
}

/// A hash of the variables' names, dtypes, shapes and values (in the given order).
///
/// # Errors
/// Tensor errors.
pub fn fingerprint_vars(vars: &[(String, Var)]) -> Result<u64> {
    let mut h = Fnv64::default();
    for (name, var) in vars {
        h.bytes(name.as_bytes());
        h.bytes(format!("{:?}{:?}", var.dtype(), var.dims()).as_bytes());
        let flat = var.as_tensor().flatten_all()?.to_device(&Device::Cpu)?;
        if var.dtype() == DType::F64 {
            for x in flat.to_vec1::<f64>()? {
                h.word(x.to_bits());
            }
        } else {
            let v = flat.to_dtype(DType::F32)?.to_vec1::<f32>()?;
            for c in v.chunks(2) {
                let lo = c[0].to_bits() as u64;
                let hi = c.get(1).map_or(0, |x| x.to_bits() as u64);
                h.word(lo | (hi << 32));
            }
        }
    }
    Ok(h.finish())
}

fn hash_seq(h: &mut Fnv64, s: &Sequence) {
    h.word(s.ids.len() as u64);
    h.word(s.completion_start as u64);
    for &id in &s.ids {
        h.word(u64::from(id));
    }
}

/// The cache key: hex of a hash of the model fingerprint, the tokenized pairs, the settings
/// text, the pad id and the reference batch size (padding can change the last bits).
pub fn cache_key(
    model_fingerprint: u64,
    pairs: &[PreferencePair],
    settings: &str,
    pad_id: u32,
    batch_size: usize,
) -> String {
    let mut h = Fnv64::default();
    h.word(model_fingerprint);
    h.word(pairs.len() as u64);
    for p in pairs {
        hash_seq(&mut h, &p.chosen);
        hash_seq(&mut h, &p.rejected);
    }
    h.bytes(settings.as_bytes());
    h.word(u64::from(pad_id));
    h.word(batch_size as u64);
    format!("{:016x}", h.finish())
}

/// The cache file for `key` in `dir`.
pub fn cache_path(dir: &Path, key: &str) -> PathBuf {
    dir.join(format!("ref_logps-{key}.safetensors"))
}

impl RefLogps {
    /// Runs `model` over the pairs in dataset order, `batch_size` pairs (chosen and rejected
    /// concatenated, as TRL's `concatenated_forward`) at a time.
    ///
    /// # Errors
    /// A non-finite reference log-prob (naming the example), tensor errors.
    pub fn compute<M: PolicyModel + ?Sized>(
        model: &M,
        pairs: &[PreferencePair],
        batch_size: usize,
        pad_id: u32,
    ) -> Result<Self> {
        Self::compute_sharded(&Single, model, pairs, batch_size, pad_id, None)
    }

    /// [`RefLogps::compute`] spread over the ranks of `world`: batch `c` (the same batches as
    /// one process makes, so the values are bit-identical) is computed by rank `c mod N`, and
    /// the ranks' vectors, zero where another rank computed, are summed into every rank's.
    /// With LD-DPO's `ld_alpha` the sums are its `shared + α · verbose`
    /// ([`crate::train::objective::pair_logps`]).
    ///
    /// # Errors
    /// See [`RefLogps::compute`]; the engine's errors.
    pub fn compute_sharded<M: PolicyModel + ?Sized>(
        world: &dyn Collective,
        model: &M,
        pairs: &[PreferencePair],
        batch_size: usize,
        pad_id: u32,
        ld_alpha: Option<f64>,
    ) -> Result<Self> {
        let (rank, n) = (world.rank(), world.world_size());
        let device = model.device();
        let mut out = RefLogps {
            chosen_sum: vec![],
            chosen_count: vec![],
            rejected_sum: vec![],
            rejected_count: vec![],
        };
        for (c, chunk) in pairs.chunks(batch_size.max(1)).enumerate() {
            if c % n != rank {
                let zeros = vec![0.0; chunk.len()];
                for v in [
                    &mut out.chosen_sum,
                    &mut out.rejected_sum,
                    &mut out.chosen_count,
                    &mut out.rejected_count,
                ] {
                    v.extend_from_slice(&zeros);
                }
                continue;
            }
            let seqs: Vec<&Sequence> = chunk
                .iter()
                .map(|p| &p.chosen)
                .chain(chunk.iter().map(|p| &p.rejected))
                .collect();
            let batch = Batch::for_training(&seqs, pad_id, &device)?;
            let s = model.reference_logps(&batch)?;
            let b = chunk.len();
            let sum = match ld_alpha {
                Some(_) => {
                    let ld = Objective::new(ObjectiveSpec {
                        ld_alpha,
                        ..ObjectiveSpec::default()
                    })
                    .map_err(|e| Error::Options(e.to_string()))?;
                    let (c, r) = pair_logps(&ld, &s.rows(0, b)?, &s.rows(b, b)?)?;
                    Tensor::cat(&[c, r], 0)?
                }
                None => s.sum.clone(),
            };
            let sums = sum.detach().to_dtype(DType::F64)?.to_vec1::<f64>()?;
            let counts = s.count.to_dtype(DType::F64)?.to_vec1::<f64>()?;
            for (i, v) in sums.iter().enumerate() {
                if !v.is_finite() {
                    let idx = c * batch_size.max(1) + i % b;
                    return Err(Error::InvalidArgument(format!(
                        "non-finite reference log-prob {v} for the {} of example {idx}",
                        if i < b { "chosen" } else { "rejected" }
                    )));
                }
            }
            out.chosen_sum.extend_from_slice(&sums[..b]);
            out.rejected_sum.extend_from_slice(&sums[b..]);
            out.chosen_count.extend_from_slice(&counts[..b]);
            out.rejected_count.extend_from_slice(&counts[b..]);
        }
        if n == 1 {
            return Ok(out);
        }
        let p = pairs.len();
        let flat = [
            out.chosen_sum,
            out.chosen_count,
            out.rejected_sum,
            out.rejected_count,
        ]
        .concat();
        let all = all_reduce_f64(world, &flat)?;
        let part = |i: usize| all[i * p..(i + 1) * p].to_vec();
        Ok(RefLogps {
            chosen_sum: part(0),
            chosen_count: part(1),
            rejected_sum: part(2),
            rejected_count: part(3),
        })
    }

    /// Number of pairs.
    pub fn len(&self) -> usize {
        self.chosen_sum.len()
    }

    /// Whether there is no pair.
    pub fn is_empty(&self) -> bool {
        self.chosen_sum.is_empty()
    }

    /// Writes the four vectors (f64) to `path`, with `key` in the metadata.
    ///
    /// # Errors
    /// I/O errors.
    pub fn save(&self, path: &Path, key: &str) -> Result<()> {
        let t = |v: &Vec<f64>| Tensor::from_slice(v, v.len(), &Device::Cpu);
        let tensors = vec![
            ("chosen_sum".to_string(), t(&self.chosen_sum)?),
            ("chosen_count".to_string(), t(&self.chosen_count)?),
            ("rejected_sum".to_string(), t(&self.rejected_sum)?),
            ("rejected_count".to_string(), t(&self.rejected_count)?),
        ];
        crate::io::write_atomic(path, |tmp| {
            save_tensors(
                &tensors,
                tmp,
                Some(HashMap::from([("key".to_string(), key.to_string())])),
            )
        })
    }

    /// Reads a file written by [`RefLogps::save`], checking its key and length.
    ///
    /// # Errors
    /// Another key, a missing tensor, a wrong length.
    pub fn load(path: &Path, key: &str, n: usize) -> Result<Self> {
        let bad = |message: String| Error::Checkpoint {
            path: path.to_path_buf(),
            message,
        };
        let meta = read_metadata(path)?;
        if meta.get("key").map(String::as_str) != Some(key) {
            return Err(bad(format!(
                "reference cache key {:?}, expected {key}",
                meta.get("key")
            )));
        }
        let t = candle_core::safetensors::load(path, &Device::Cpu)
            .map_err(|e| Error::format(path, e))?;
        let get = |name: &str| -> Result<Vec<f64>> {
            let v = t
                .get(name)
                .ok_or_else(|| bad(format!("missing `{name}`")))?
                .to_dtype(DType::F64)?
                .to_vec1::<f64>()?;
            if v.len() != n {
                return Err(bad(format!(
                    "`{name}` has {} entries for {n} pairs",
                    v.len()
                )));
            }
            Ok(v)
        };
        Ok(RefLogps {
            chosen_sum: get("chosen_sum")?,
            chosen_count: get("chosen_count")?,
            rejected_sum: get("rejected_sum")?,
            rejected_count: get("rejected_count")?,
        })
    }

    /// The cached log-probs when `dir` holds the file of `key`, else computed over the ranks
    /// of `world` ([`RefLogps::compute_sharded`], with LD-DPO's `ld_alpha`) and (when `dir` is
    /// given) written there by rank 0. Returns whether the cache was hit (on every rank: a miss on any rank is a miss).
    ///
    /// # Errors
    /// See [`RefLogps::compute`], [`RefLogps::load`].
    #[allow(clippy::too_many_arguments)]
    pub fn load_or_compute<M: PolicyModel + ?Sized>(
        world: &dyn Collective,
        model: &M,
        pairs: &[PreferencePair],
        dir: Option<&Path>,
        key: &str,
        batch_size: usize,
        pad_id: u32,
        ld_alpha: Option<f64>,
    ) -> Result<(Self, bool)> {
        let here = dir.map(|d| cache_path(d, key)).filter(|p| p.exists());
        let misses = all_reduce_f64(world, &[f64::from(u8::from(here.is_none()))])?[0];
        if let (Some(p), 0.0) = (&here, misses) {
            return Ok((Self::load(p, key, pairs.len())?, true));
        }
        let r = Self::compute_sharded(world, model, pairs, batch_size, pad_id, ld_alpha)?;
        if let (Some(d), 0) = (dir, world.rank()) {
            std::fs::create_dir_all(d).map_err(|e| Error::io(d, e))?;
            r.save(&cache_path(d, key), key)?;
        }
        Ok((r, false))
    }

    /// `[B]` tensors `(chosen, rejected)` of the summed log-probs of the examples `idx`, in
    /// `dtype` on `device` (length normalization, where a loss type asks for it, is the
    /// library's, on the policy's token counts: the same sequences).
    ///
    /// # Errors
    /// Tensor errors.
    pub fn select(&self, idx: &[usize], dtype: DType, device: &Device) -> Result<(Tensor, Tensor)> {
        let pick = |s: &[f64]| -> Vec<f64> { idx.iter().map(|&i| s[i]).collect() };
        let c = Tensor::from_vec(pick(&self.chosen_sum), idx.len(), device)?.to_dtype(dtype)?;
        let r = Tensor::from_vec(pick(&self.rejected_sum), idx.len(), device)?.to_dtype(dtype)?;
        Ok((c, r))
    }
}
