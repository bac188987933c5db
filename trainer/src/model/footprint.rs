//! What a forward pass of the model costs in memory, checked before it runs: the token ids
//! in the vocabulary and the activations within the machine's memory.

use crate::dtype::accumulation_dtype;
use crate::error::{Error, Result};
use crate::memory::physical_memory;

use super::Model;

impl Model {
    /// The ceiling of the size checks: [`physical_memory`] on the CPU, none on other devices
    /// (their allocators fail with an error rather than aborting the process).
    pub(super) fn memory_limit(&self) -> Option<u128> {
        if self.device.is_cpu() {
            physical_memory()
        } else {
            None
        }
    }

    /// The least memory a forward pass over `b` sequences of `l` positions attending `t` keys
    /// takes, and what it is made of: the `[B, heads, l, t]` attention probabilities (every
    /// layer's kept for the backward pass when the model [tracks a graph](Model::tracks_graph),
    /// one layer's otherwise) and the `[B, 1, l, t]` additive mask, in the accumulation dtype.
    /// A lower bound, so that a refusal is certain to be right.
    pub fn forward_memory(&self, b: usize, l: usize, t: usize) -> (u128, String) {
        let bytes = accumulation_dtype(self.compute_dtype).size_in_bytes() as u128;
        let heads = self.config.num_attention_heads as u128;
        let layers = if self.tracks_graph() {
            self.config.num_hidden_layers as u128
        } else {
            1
        };
        let (b, l, t) = (b as u128, l as u128, t as u128);
        let total = [b, l, t, bytes]
            .iter()
            .fold(layers * heads + 1, |acc, &x| acc.saturating_mul(x));
        let detail = format!(
            "attention probabilities: {b} sequence(s) × {heads} heads × {l} × {t} positions × {bytes} bytes{}, \
             and the mask",
            if layers > 1 {
                format!(" × {layers} layers kept for the backward pass")
            } else {
                String::new()
            }
        );
        (total, detail)
    }

    /// [`Model::forward_memory`] of sequences packed into one row
    /// ([`crate::batch::Packed`]): each sequence's `len (len + 1) / 2` attention probabilities per
    /// head (the block-diagonal mask's blocks; every layer's with a graph) and the `[1, 1, T,
    /// T]` mask, `T = Σ len`, in the accumulation dtype.
    pub fn packed_forward_memory(&self, lengths: &[usize]) -> (u128, String) {
        let bytes = accumulation_dtype(self.compute_dtype).size_in_bytes() as u128;
        let heads = self.config.num_attention_heads as u128;
        let layers = if self.tracks_graph() {
            self.config.num_hidden_layers as u128
        } else {
            1
        };
        let sq: u128 = lengths
            .iter()
            .map(|&n| (n as u128) * (n as u128 + 1) / 2)
            .sum();
        let t: u128 = lengths.iter().map(|&n| n as u128).sum();
        let total = layers
            .saturating_mul(heads)
            .saturating_mul(sq)
            .saturating_add(t.saturating_mul(t))
            .saturating_mul(bytes);
        let detail = format!(
            "attention probabilities: {heads} heads × Σ len (len + 1) / 2 = {sq} × {bytes} bytes{}, and the \
             {t} × {t} mask",
            if layers > 1 {
                format!(" × {layers} layers kept for the backward pass")
            } else {
                String::new()
            }
        );
        (total, detail)
    }

    /// Refuses token ids the embedding has no row for.
    ///
    /// # Errors
    /// [`Error::TokenOutOfVocab`] with the first such id.
    pub fn check_token_ids(&self, ids: &[u32]) -> Result<()> {
        let v = self.config.vocab_size;
        match ids.iter().find(|&&i| i as usize >= v) {
            Some(&id) => Err(Error::TokenOutOfVocab { id, vocab_size: v }),
            None => Ok(()),
        }
    }

    /// Refuses a forward pass over `b` sequences of `l` positions (attending `offset + l`
    /// keys) whose [`Model::forward_memory`] exceeds the machine's memory, before anything of
    /// that size is allocated.
    ///
    /// # Errors
    /// [`Error::TooLarge`].
    pub fn check_forward_size(&self, b: usize, l: usize, offset: usize) -> Result<()> {
        let Some(limit) = self.memory_limit() else {
            return Ok(());
        };
        let (bytes, detail) = self.forward_memory(b, l, offset.saturating_add(l));
        Self::within(
            limit,
            bytes,
            detail,
            format!("{b} sequence(s) of {l} positions"),
        )
    }

    /// [`Model::check_forward_size`] of sequences of `lengths` packed into one row
    /// ([`Model::packed_forward_memory`]).
    ///
    /// # Errors
    /// [`Error::TooLarge`].
    pub fn check_packed_size(&self, lengths: &[usize]) -> Result<()> {
        let Some(limit) = self.memory_limit() else {
            return Ok(());
        };
        let (bytes, detail) = self.packed_forward_memory(lengths);
        let what = format!("{} sequence(s) packed into one row", lengths.len());
        Self::within(limit, bytes, detail, what)
    }

    fn within(limit: u128, bytes: u128, detail: String, what: String) -> Result<()> {
        if bytes > limit {
            return Err(Error::TooLarge {
                what: format!("a forward pass over {what}"),
                bytes,
                detail,
                limit,
            });
        }
        Ok(())
    }
}
