//! The KV cache of generation: per layer, keys and values of the positions seen so far, in
//! buffers grown by doubling.

use candle_core::Tensor;

use crate::error::{Error, Result};

/// Per-layer key/value cache for incremental decoding: one `[B, kv_heads, capacity, d]` buffer
/// for the keys and one for the values of each layer, written in place as positions are
/// appended (capacity doubles when full), detached from any autograd graph. Memory is linear in
/// the cached length: no step keeps an earlier step's tensors or graph alive.
#[derive(Debug, Default)]
pub struct KvCache {
    pub(super) layers: Vec<Option<(Tensor, Tensor)>>,
    pub(super) len: usize,
    /// Positions to allocate room for at the first append.
    pub(super) reserve: usize,
}

impl KvCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty cache that allocates room for `positions` at its first append (it still grows
    /// past them).
    pub fn with_capacity(positions: usize) -> Self {
        KvCache {
            reserve: positions,
            ..Self::default()
        }
    }

    /// Number of positions already cached.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether a cached tensor records an autograd graph (never, by construction: the buffers
    /// are fresh tensors written in place).
    pub fn tracks_graph(&self) -> bool {
        self.layers
            .iter()
            .flatten()
            .any(|(k, v)| k.track_op() || v.track_op())
    }

    /// Positions the buffers hold room for (0 before the first append).
    pub fn capacity(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .next()
            .and_then(|(k, _)| k.dim(2).ok())
            .unwrap_or(0)
    }

    /// Layer `li`'s whole key and value buffers, `[B, kv_heads, capacity, d]` (the first
    /// [`KvCache::len`] positions hold data once a pass has appended to all layers).
    pub(super) fn buffers(&self, li: usize) -> Result<(Tensor, Tensor)> {
        self.layers
            .get(li)
            .and_then(Option::as_ref)
            .cloned()
            .ok_or_else(|| Error::InvalidArgument(format!("KV cache: layer {li} has no buffers")))
    }

    /// Copies the cached positions of a one-sequence cache to `n` sequences (the prompt of
    /// `n` samples encoded once): every buffer `[1, kv_heads, capacity, d]` becomes
    /// `[n, kv_heads, capacity, d]`.
    ///
    /// # Errors
    /// A cache of more than one sequence; tensor errors.
    pub fn repeat_batch(&mut self, n: usize) -> Result<()> {
        for (k, v) in self.layers.iter_mut().flatten() {
            let (b, kvh, cap, d) = k.dims4()?;
            if b != 1 {
                return Err(Error::InvalidArgument(format!(
                    "KV cache: repeat_batch needs one sequence, the cache holds {b}"
                )));
            }
            let rep = |t: &Tensor| -> Result<Tensor> {
                Ok(t.broadcast_as((n, kvh, cap, d))?.contiguous()?)
            };
            (*k, *v) = (rep(k)?, rep(v)?);
        }
        Ok(())
    }

    /// Writes layer `li`'s new keys and values (`[B, kv_heads, l, d]`) at positions
    /// `len .. len + l` and returns all cached ones, `[B, kv_heads, len + l, d]` views of the
    /// buffers. `limit`: the bytes the buffers may take in all (the model's memory ceiling).
    pub(super) fn append(
        &mut self,
        li: usize,
        k: &Tensor,
        v: &Tensor,
        limit: Option<u128>,
    ) -> Result<(Tensor, Tensor)> {
        let (b, kvh, l, d) = k.dims4()?;
        let need = self.len + l;
        let cap = self.layers[li]
            .as_ref()
            .map_or(0, |(kb, _)| kb.dim(2).unwrap_or(0));
        if need > cap {
            let new_cap = need.max(2 * cap).max(self.reserve);
            let bytes = (b * kvh * d) as u128 * new_cap as u128 * k.dtype().size_in_bytes() as u128;
            if let Some(limit) = limit.filter(|&lim| 2 * bytes * self.layers.len() as u128 > lim) {
                return Err(Error::TooLarge {
                    what: format!("the key/value cache for {b} sequence(s) of {need} positions"),
                    bytes: 2 * bytes * self.layers.len() as u128,
                    detail: format!(
                        "{} layers × keys and values × {b} sequence(s) × {kvh} heads × {new_cap} \
                         positions × {d} × {} bytes",
                        self.layers.len(),
                        k.dtype().size_in_bytes()
                    ),
                    limit,
                });
            }
            let grow = |old: Option<&Tensor>, new: &Tensor| -> Result<Tensor> {
                let buf = Tensor::zeros((b, kvh, new_cap, d), new.dtype(), new.device())?;
                if let Some(old) = old {
                    buf.slice_set(&old.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
                }
                Ok(buf)
            };
            let old = self.layers[li].take();
            let (ok, ov) = (old.as_ref().map(|x| &x.0), old.as_ref().map(|x| &x.1));
            self.layers[li] = Some((grow(ok, k)?, grow(ov, v)?));
        }
        let (kb, vb) = self.layers[li]
            .as_ref()
            .ok_or_else(|| Error::InvalidArgument("KV cache: layer without buffers".into()))?;
        kb.slice_set(&k.detach().contiguous()?, 2, self.len)?;
        vb.slice_set(&v.detach().contiguous()?, 2, self.len)?;
        Ok((kb.narrow(2, 0, need)?, vb.narrow(2, 0, need)?))
    }
}
