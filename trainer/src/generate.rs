//! Sampling with a KV cache: temperature, top-p, a token budget and a seed.
//!
//! The `n` samples of one prompt decode together as a batch of identical prompts (no padding
//! needed). Each sample records `logp`, the summed log-probability of its tokens under the
//! model itself (temperature 1, no top-p): the `log π(y)` that Monte Carlo entropy estimates
//! (Appendix K) need, whatever distribution drew `y`.

use candle_core::Tensor;
use rand::Rng;
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::model::{KvCache, Model};

/// Sampling settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// Softmax temperature; `0` means greedy (argmax).
    pub temperature: f64,
    /// Nucleus mass in `(0, 1]`; `1` disables top-p.
    pub top_p: f64,
    /// Most tokens generated per sample (a stop token included).
    pub max_new_tokens: usize,
}

impl SamplingParams {
    /// Checks the ranges transformers' `GenerationConfig.validate` enforces: `T` finite and
    /// ≥ 0, top-p in `(0, 1]`, at least one new token.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming the command-line option.
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(Error::InvalidArgument(format!(
                "--temperature must be finite and ≥ 0, got {}",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::InvalidArgument(format!(
                "--top-p must be in (0, 1], got {}",
                self.top_p
            )));
        }
        if self.max_new_tokens == 0 {
            return Err(Error::InvalidArgument(
                "--max-new-tokens must be ≥ 1, got 0 (there would be nothing to sample; \
                 transformers' generate refuses 0 too)"
                    .into(),
            ));
        }
        Ok(())
    }
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            max_new_tokens: 64,
        }
    }
}

/// One generated completion.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Sample {
    /// Generated token ids (the stop token included when one was produced).
    pub completion_ids: Vec<u32>,
    /// `Σ log π(token | prefix)` over `completion_ids` under the untempered model.
    pub logp: f64,
    /// Whether a stop token ended the sample (otherwise the token budget did).
    pub finished: bool,
    /// `Σ log π_T(token | prefix)` under the distribution sampled from, `π_T = softmax(logits/T)`
    /// (top-p truncation not applied; 0 for greedy decoding). Equals `logp` at `T = 1`.
    pub logp_sampled: f64,
    /// `Σ_t H(π_T(· | prefix_t))` over the generated positions: the exact next-token entropies
    /// (nats) of the sampling distribution, summed (0 for greedy decoding).
    pub token_entropy: f64,
}

/// `(log π_T(i), H(π_T))` of `π_T = softmax(logits / T)` in f64; `(0, 0)` for `T = 0` (greedy:
/// a point mass).
pub fn tempered_logp_entropy(logits: &[f32], temperature: f64, i: usize) -> (f64, f64) {
    if temperature == 0.0 {
        return (0.0, 0.0);
    }
    let z: Vec<f64> = logits.iter().map(|&x| x as f64 / temperature).collect();
    let lse = difinfo::logspace::log_sum_exp(&z);
    let entropy = -z.iter().map(|&x| (x - lse).exp() * (x - lse)).sum::<f64>();
    (z[i] - lse, entropy)
}

/// `log softmax(logits)[i]` in f64.
pub fn log_softmax_at(logits: &[f32], i: usize) -> f64 {
    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = logits
        .iter()
        .map(|&x| (x as f64 - m).exp())
        .sum::<f64>()
        .ln()
        + m;
    logits[i] as f64 - lse
}

/// Index of the largest logit (the first one on ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in logits.iter().enumerate() {
        if x > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Draws a token from `softmax(logits / temperature)` restricted to the top-`p` nucleus.
///
/// # Formula
/// `p_i ∝ exp((z_i − max z) / T)`; with top-p, the smallest set of most probable tokens whose
/// mass reaches `p` is kept and renormalized. `T = 0` returns [`argmax`].
pub fn sample_token(logits: &[f32], temperature: f64, top_p: f64, rng: &mut impl Rng) -> u32 {
    if temperature <= 0.0 {
        return argmax(logits);
    }
    sample_token_at(logits, temperature, top_p, || rng.gen::<f64>())
}

/// [`sample_token`] at `T > 0` with the uniform draw `u ∈ [0, 1)` taken from `draw` (called
/// once, unless the weights are not finite: then [`argmax`] without a draw).
fn sample_token_at(
    logits: &[f32],
    temperature: f64,
    top_p: f64,
    draw: impl FnOnce() -> f64,
) -> u32 {
    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let mut probs: Vec<(usize, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &z)| (i, ((z as f64 - m) / temperature).exp()))
        .collect();
    let total: f64 = probs.iter().map(|p| p.1).sum();
    if !(total.is_finite() && total > 0.0) {
        return argmax(logits);
    }
    if top_p < 1.0 {
        probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let mut acc = 0.0;
        let mut keep = 0;
        for (k, p) in probs.iter().enumerate() {
            acc += p.1 / total;
            keep = k + 1;
            if acc >= top_p {
                break;
            }
        }
        probs.truncate(keep.max(1));
    }
    let mass: f64 = probs.iter().map(|p| p.1).sum();
    let mut u = draw() * mass;
    for &(i, p) in &probs {
        if u < p {
            return i as u32;
        }
        u -= p;
    }
    probs.last().map(|p| p.0 as u32).unwrap_or(0)
}

/// The least memory [`generate`] takes for `n` samples of a `prompt_len`-token prompt with a
/// budget of `max_new_tokens`, and what it is made of: the prompt's ids and, once the prompt
/// is encoded, the key/value cache of the `n` samples (room for the prompt and the new tokens
/// up to the context, as [`generate`] reserves it), the next-token logits copied to the host
/// and the samples, or, while the prompt is encoded (once, for all samples), its attention
/// probabilities ([`Model::forward_memory`] of one sequence without a graph). The cache and the attention count only on the
/// CPU, where they are host memory. A lower bound, so that a refusal is certain to be right.
pub fn generate_memory(
    model: &Model,
    n: usize,
    prompt_len: usize,
    max_new_tokens: usize,
) -> (u128, String) {
    let c = model.config();
    let (n, p) = (n as u128, prompt_len as u128);
    let room = max_new_tokens.min(c.max_position_embeddings.max(1)) as u128;
    let mul = |xs: &[u128]| xs.iter().fold(1u128, |a, &x| a.saturating_mul(x));
    let ids = mul(&[p, 4]);
    let logits = mul(&[n, c.vocab_size as u128, 4]);
    let samples = mul(&[n, std::mem::size_of::<Sample>() as u128]);
    let mut detail = format!(
        "prompt ids: {p} tokens × 4 bytes; next-token logits: {n} × {} × 4 bytes",
        c.vocab_size
    );
    let (mut kv, mut attention) = (0, 0);
    if model.device().is_cpu() {
        let bytes = model.compute_dtype().size_in_bytes() as u128;
        kv = mul(&[
            c.num_hidden_layers as u128,
            2,
            n,
            c.num_key_value_heads as u128,
            p.saturating_add(room),
            c.head_dim as u128,
            bytes,
        ]);
        detail += &format!(
            "; key/value cache: {} layers × keys and values × {n} × {} heads × {} positions × {} × \
             {bytes} bytes",
            c.num_hidden_layers,
            c.num_key_value_heads,
            p.saturating_add(room),
            c.head_dim
        );
        let (a, d) = model.detached().forward_memory(1, p as usize, p as usize);
        attention = a;
        detail += &format!("; or, while the prompt is encoded, {d}");
    }
    let peak = attention.max(kv.saturating_add(logits).saturating_add(samples));
    (ids.saturating_add(peak), detail)
}

/// Refuses a [`generate`] call whose [`generate_memory`] exceeds the machine's memory, before
/// anything of that size is allocated ([`crate::memory::check_memory`]).
///
/// # Errors
/// [`Error::TooLarge`].
pub fn check_generate_size(
    model: &Model,
    n: usize,
    prompt_len: usize,
    max_new_tokens: usize,
) -> Result<()> {
    let (bytes, detail) = generate_memory(model, n, prompt_len, max_new_tokens);
    crate::memory::check_memory(
        || {
            format!(
                "generating {n} sample(s) of a {prompt_len}-token prompt with up to \
                 {max_new_tokens} new tokens"
            )
        },
        bytes,
        || detail,
    )
}

/// The command-line checks of a sampling command before any prompt is sampled: `option` (the
/// samples per prompt, `n` of them: `--n`, `--samples`, ...) must fit the machine's memory for
/// the longest prompt, `longest_prompt` tokens ([`check_generate_size`]), and
/// `--max-new-tokens` must not pass the model's context (`max_position_embeddings`; the model
/// read from `model_dir`). When even one sample of the longest prompt is too large, the
/// prompt is to blame and its own sampling says so, naming its line.
///
/// # Errors
/// [`Error::InvalidArgument`] naming the option, its value and the memory it needs, or
/// `--max-new-tokens` and the model's context.
pub fn check_sampling_options(
    model: &Model,
    model_dir: &std::path::Path,
    option: &str,
    n: usize,
    longest_prompt: usize,
    max_new_tokens: usize,
) -> Result<()> {
    let ctx = model.config().max_position_embeddings;
    if max_new_tokens > ctx {
        return Err(Error::InvalidArgument(format!(
            "--max-new-tokens {max_new_tokens} is more than the model's context of {ctx} \
             positions (`max_position_embeddings` in {}): positions past it were never trained; \
             lower --max-new-tokens",
            model_dir.join("config.json").display()
        )));
    }
    if let Err(e) = check_generate_size(model, n, longest_prompt, max_new_tokens) {
        if check_generate_size(model, 1, longest_prompt, max_new_tokens).is_ok() {
            return Err(Error::InvalidArgument(format!(
                "{option} {n}: {e} (the samples of a prompt are drawn together); lower {option}"
            )));
        }
    }
    Ok(())
}

/// Generates `n` completions of `prompt_ids`, stopping a sample at any of `stop_ids`.
///
/// Builds no autograd graph (the model's weights are read [detached](Model::detached)) and
/// keeps the keys and values in a [`KvCache`] written in place: memory is linear in the
/// generated length.
///
/// # Errors
/// An empty prompt, `n = 0`, invalid parameters ([`SamplingParams::validate`]), a prompt or
/// cache too large for the machine's memory ([`Error::TooLarge`]), non-finite logits
/// ([`Error::NonFiniteOutput`]: NaN weights or an overflow; nothing is sampled from them),
/// tensor errors.
pub fn generate(
    model: &Model,
    prompt_ids: &[u32],
    n: usize,
    params: &SamplingParams,
    stop_ids: &[u32],
    rng: &mut impl Rng,
) -> Result<Vec<Sample>> {
    if prompt_ids.is_empty() {
        return Err(Error::InvalidArgument(
            "cannot generate from an empty prompt (the tokenizer added no BOS)".into(),
        ));
    }
    params.validate()?;
    if n == 0 {
        return Err(Error::InvalidArgument(
            "at least one sample per prompt is needed, got 0".into(),
        ));
    }
    let model = &model.detached();
    // The prompt's pass first (its own message), then all that generating keeps.
    model.check_forward_size(1, prompt_ids.len(), 0)?;
    check_generate_size(model, n, prompt_ids.len(), params.max_new_tokens)?;
    let dev = model.device();
    let p = prompt_ids.len();
    // Room for the prompt and the new tokens, up to the model's context (growing past it).
    let room = params
        .max_new_tokens
        .min(model.config().max_position_embeddings.max(1));
    let mut cache = KvCache::with_capacity(p.saturating_add(room));
    // The prompt's pass once, its keys and values then copied to every sample's row.
    let input = Tensor::from_vec(prompt_ids.to_vec(), (1, p), dev)?;
    let mut logits = model.forward_last_with_cache(&input, &mut cache)?;
    if n > 1 {
        cache.repeat_batch(n)?;
        logits = logits.repeat((n, 1))?;
    }
    let mut samples = vec![
        Sample {
            completion_ids: Vec::new(),
            logp: 0.0,
            finished: false,
            logp_sampled: 0.0,
            token_entropy: 0.0,
        };
        n
    ];
    for step in 0..params.max_new_tokens {
        let rows: Vec<Vec<f32>> = logits.to_dtype(candle_core::DType::F32)?.to_vec2()?;
        // In sample order: the finiteness checks, then one uniform draw per live sample (what
        // `sample_token` draws at T > 0 from finite logits); the rows then in parallel.
        let mut draws = vec![None; n];
        for (k, (s, row)) in samples.iter().zip(&rows).enumerate() {
            if s.finished {
                continue;
            }
            if let Some(&bad) = row.iter().find(|x| !x.is_finite()) {
                return Err(Error::NonFiniteOutput {
                    what: format!("a next-token logit of sample {k} at new token {step}"),
                    value: f64::from(bad),
                });
            }
            draws[k] = Some((params.temperature > 0.0).then(|| rng.gen::<f64>()));
        }
        let next: Vec<u32> = samples
            .par_iter_mut()
            .zip(&rows)
            .zip(&draws)
            .map(|((s, row), draw)| {
                let Some(u) = *draw else {
                    return stop_ids.first().copied().unwrap_or(0);
                };
                let tok = match u {
                    Some(u) => sample_token_at(row, params.temperature, params.top_p, || u),
                    None => argmax(row),
                };
                s.logp += log_softmax_at(row, tok as usize);
                let (lt, h) = tempered_logp_entropy(row, params.temperature, tok as usize);
                s.logp_sampled += lt;
                s.token_entropy += h;
                s.completion_ids.push(tok);
                if stop_ids.contains(&tok) {
                    s.finished = true;
                }
                tok
            })
            .collect();
        if samples.iter().all(|s| s.finished) || step + 1 == params.max_new_tokens {
            break;
        }
        let input = Tensor::from_vec(next, (n, 1), dev)?;
        logits = model.forward_last_with_cache(&input, &mut cache)?;
    }
    Ok(samples)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn tiny_top_p_is_greedy_and_frequencies_follow_softmax() {
        let logits = [0.5f32, 2.0, -1.0, 1.0];
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        for _ in 0..100 {
            assert_eq!(sample_token(&logits, 1.0, 1e-6, &mut rng), 1);
        }
        // Frequencies of 40 000 draws at T = 1 are within 4 standard errors of softmax.
        let n = 40_000;
        let mut counts = [0usize; 4];
        for _ in 0..n {
            counts[sample_token(&logits, 1.0, 1.0, &mut rng) as usize] += 1;
        }
        for (i, &c) in counts.iter().enumerate() {
            let p = log_softmax_at(&logits, i).exp();
            let se = (p * (1.0 - p) / n as f64).sqrt();
            assert!(
                (c as f64 / n as f64 - p).abs() < 4.0 * se,
                "token {i}: {c} draws, p = {p}"
            );
        }
        // top-p = 0.8 keeps tokens 1 and 3 (mass 0.61 + 0.22 ≥ 0.8) only.
        for _ in 0..1000 {
            let t = sample_token(&logits, 1.0, 0.8, &mut rng);
            assert!(t == 1 || t == 3, "{t}");
        }
    }
}
