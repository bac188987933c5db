//! The linear layer of every projection, with its optional LoRA adapter (PEFT's
//! `y = x Wᵀ + s · (drop(x) Aᵀ) Bᵀ`, [`crate::lora`]), on the fused kernels where they apply.

use candle_core::Tensor;

use crate::error::Result;

/// A linear layer `y = x Wᵀ + b` with `W` of shape `[out, in]`, and optionally a LoRA
/// adapter `+ s · (drop(x) Aᵀ) Bᵀ` (see [`crate::lora`]).
#[derive(Debug, Clone)]
pub(super) struct Lin {
    pub(super) w: Tensor,
    pub(super) b: Option<Tensor>,
    pub(super) lora: Option<LoraLin>,
}

/// A LoRA adapter on a [`Lin`].
#[derive(Debug, Clone)]
pub(super) struct LoraLin {
    /// `lora_A.weight`, `[r, in]`.
    pub(super) a: Tensor,
    /// `lora_B.weight`, `[out, r]`.
    pub(super) b: Tensor,
    /// `lora_alpha / r` (rsLoRA: `/ √r`).
    pub(super) scale: f64,
    /// Dropout probability on the adapter's input.
    pub(super) p: f64,
    /// This forward pass's dropout mask key (none: no dropout, e.g. evaluation).
    pub(super) key: Option<u64>,
}

impl LoraLin {
    /// `s · (drop(x) Aᵀ) Bᵀ` for `x: [N, in]`, in `x`'s dtype.
    pub(super) fn delta(&self, x: &Tensor) -> Result<Tensor> {
        let dt = x.dtype();
        let xd = match self.key {
            Some(key) if self.p > 0.0 => {
                let (n, d) = x.dims2()?;
                (x * crate::lora::dropout_mask(key, n, d, self.p, dt, x.device())?)?
            }
            _ => x.clone(),
        };
        let u = xd.matmul(&self.a.to_dtype(dt)?.t()?)?;
        Ok(u.matmul(&self.b.to_dtype(dt)?.t()?)?
            .affine(self.scale, 0.0)?)
    }

    /// The adapter for [`crate::fused::decoder_layer`].
    pub(super) fn weights(&self) -> crate::fused::LoraWeights {
        crate::fused::LoraWeights {
            a: self.a.clone(),
            b: self.b.clone(),
            scale: self.scale,
            dropout: self.key.filter(|_| self.p > 0.0).map(|k| (self.p, k)),
        }
    }
}

impl Lin {
    /// `x`: `[N, in]` → `[N, out]`, computed in `x`'s dtype (parameters are cast to it; a
    /// no-op when the dtypes already agree).
    pub(super) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dt = x.dtype();
        let y = x.matmul(&self.w.to_dtype(dt)?.t()?)?;
        let y = match &self.b {
            Some(b) => y.broadcast_add(&b.to_dtype(dt)?)?,
            None => y,
        };
        self.add_lora(x, y)
    }

    /// `y + adapter(x)` when there is an adapter.
    pub(super) fn add_lora(&self, x: &Tensor, y: Tensor) -> Result<Tensor> {
        match &self.lora {
            Some(ad) => Ok((y + ad.delta(x)?)?),
            None => Ok(y),
        }
    }

    /// `r + self(x)`, one fused node ([`crate::fused::linear_add`]) under the conditions of
    /// [`Lin::apply`] when there is no bias.
    pub(super) fn apply_add(&self, fused: bool, x: &Tensor, r: &Tensor) -> Result<Tensor> {
        if fused && self.b.is_none() && x.rank() == 2 && self.w.dtype() == x.dtype() {
            let y = crate::fused::linear_add(x, &self.w, r)?;
            return self.add_lora(x, y);
        }
        Ok((r + self.apply(fused, x)?)?)
    }

    /// [`Lin::forward`], through the fused [`crate::fused::linear`] when `fused` is set and
    /// `x` is 2-D in the weight's dtype.
    pub(super) fn apply(&self, fused: bool, x: &Tensor) -> Result<Tensor> {
        if fused && x.rank() == 2 && self.w.dtype() == x.dtype() {
            let y = crate::fused::linear(x, &self.w)?;
            let y = match &self.b {
                Some(b) => y.broadcast_add(&b.to_dtype(x.dtype())?)?,
                None => y,
            };
            return self.add_lora(x, y);
        }
        self.forward(x)
    }
}
