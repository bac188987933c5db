//! A bigram language model (embedding, then a linear head over a small vocabulary) that
//! implements [`PolicyModel`] with differentiable ops only; for tests and examples.

use candle_core::{DType, Device, Tensor, Var, D};

use crate::batch::Batch;
use crate::error::Result;
use crate::train::policy::{PolicyModel, SeqLogps};
use crate::train::rng::SplitMix64;

/// `log π(y_{t+1} | y_t) = log_softmax(E[y_t] Hᵀ)[y_{t+1}]`.
#[derive(Debug, Clone)]
pub struct Bigram {
    embed: Var,
    head: Var,
}

impl Bigram {
    /// Random weights, uniform in `[−scale, scale)`, from `seed`.
    ///
    /// # Errors
    /// Tensor errors.
    pub fn new(
        vocab: usize,
        dim: usize,
        scale: f64,
        seed: u64,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let mut rng = SplitMix64::new(seed);
        let mut mk = |n: usize| -> Vec<f64> {
            (0..n)
                .map(|_| (2.0 * rng.next_f64() - 1.0) * scale)
                .collect()
        };
        let e = Tensor::from_vec(mk(vocab * dim), (vocab, dim), device)?.to_dtype(dtype)?;
        let h = Tensor::from_vec(mk(vocab * dim), (vocab, dim), device)?.to_dtype(dtype)?;
        Ok(Self {
            embed: Var::from_tensor(&e)?,
            head: Var::from_tensor(&h)?,
        })
    }

    /// Vocabulary size.
    pub fn vocab(&self) -> usize {
        self.embed.dims()[0]
    }
}

impl PolicyModel for Bigram {
    fn sequence_logps(&self, batch: &Batch) -> crate::Result<SeqLogps> {
        let (b, l) = batch.input_ids.dims2()?;
        let x = self
            .embed
            .as_tensor()
            .index_select(&batch.input_ids.flatten_all()?, 0)?;
        let logits = x
            .matmul(&self.head.as_tensor().t()?)?
            .reshape((b, l, self.vocab()))?
            .narrow(1, 0, l - 1)?;
        let lp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        let targets = batch
            .input_ids
            .narrow(1, 1, l - 1)?
            .contiguous()?
            .unsqueeze(2)?;
        let tok = lp.gather(&targets, 2)?.squeeze(2)?;
        Ok(SeqLogps::from_token_logps(&tok, &batch.loss_mask)?)
    }

    /// With `log Σ_v π_v² = log Σ_v e^{2 z_v} − 2 log Σ_v e^{z_v}` from the same logits.
    fn sequence_logps_with_sq(&self, batch: &Batch) -> crate::Result<SeqLogps> {
        let mut s = self.sequence_logps(batch)?;
        let (b, l) = batch.input_ids.dims2()?;
        let x = self
            .embed
            .as_tensor()
            .index_select(&batch.input_ids.flatten_all()?, 0)?;
        let z = x
            .matmul(&self.head.as_tensor().t()?)?
            .reshape((b, l, self.vocab()))?
            .narrow(1, 0, l - 1)?
            .detach();
        let sq = (z.affine(2.0, 0.0)?.log_sum_exp(D::Minus1)?
            - z.log_sum_exp(D::Minus1)?.affine(2.0, 0.0)?)?;
        s.log_sum_sq = Some(sq.mul(&s.mask)?);
        Ok(s)
    }

    fn named_vars(&self) -> Vec<(String, Var)> {
        vec![
            ("lm_head.weight".to_string(), self.head.clone()),
            ("model.embed_tokens.weight".to_string(), self.embed.clone()),
        ]
    }
}
