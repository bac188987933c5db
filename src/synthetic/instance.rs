//! Energy-based instances of Section 3.5.
//!
//! ```text
//! f_ref = s · z,   z ~ N(0, I_N)          (s: the logit scale)
//! f*    = f_ref / τ                       (τ < 1 reinforcing, τ > 1 smoothing)
//! π_ref = softmax(f_ref),  π* = softmax(f*)
//! π_l   = ideal_rejected(π_ref, π*, β)    (Eq. 1: softmax((1+β) f_ref − β f*))
//! ```
//!
//! so that the preference distribution of `y_w ~ π_ref`, `y_l ~ π_l` is `q_{π*/π_ref}^β`
//! normalized (Theorem 3.3). A *contextual* instance is `P` such instances, one per prompt, each
//! with its own `z`.

use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use serde::Serialize;

use crate::beta::Beta;
use crate::error::{Error, Result};
use crate::policy::Policy;
use crate::rejected::ideal_rejected;

/// A deterministic sub-seed: FNV-1a of `label` mixed into `seed`, so that every run, prompt and
/// instance draws from its own stream whatever order the runs execute in.
pub fn sub_seed(seed: u64, label: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for b in label.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Standard-normal reference logits `z ∈ R^N` for `seed` (before scaling).
pub fn standard_logits(n: usize, seed: u64) -> Vec<f64> {
    let mut rng = StdRng::seed_from_u64(sub_seed(seed, "f_ref"));
    (0..n).map(|_| StandardNormal.sample(&mut rng)).collect()
}

/// One energy-based instance: `π_ref`, `π*` and the ideal rejected `π_l`.
#[derive(Debug, Clone)]
pub struct Instance {
    /// `N`.
    pub n: usize,
    /// `τ`: `f* = f_ref / τ`.
    pub tau: f64,
    /// `β` of the power law and of Eq. 1.
    pub beta: f64,
    /// The logit scale `s`: `f_ref = s z`.
    pub scale: f64,
    /// The seed `z` was drawn with.
    pub seed: u64,
    /// `π_ref = softmax(f_ref)`.
    pub pi_ref: Policy,
    /// `π* = softmax(f_ref / τ)`.
    pub pi_star: Policy,
    /// `π_l ∝ π_ref^{1+β} π*^{−β}` (Eq. 1).
    pub pi_l: Policy,
}

impl Instance {
    /// `f_ref = scale · z` with `z ~ N(0, I)` drawn from `seed`.
    ///
    /// # Errors
    /// [`Error::Empty`] for `n = 0`; [`Error::InvalidParameter`] unless `τ`, `scale` are finite
    /// and positive; [`Error::Beta`] unless `β` is.
    ///
    /// # Examples
    /// ```
    /// use difinfo::{did::did, entropy::entropy, synthetic::instance::Instance};
    /// // τ = 1/4 (reinforcing): the DID q ∝ π_ref^{(1−τ)/τ} = π_ref³ is sharper than π_ref.
    /// let inst = Instance::tempered(1000, 0.25, 1.0, 1.0, 7)?;
    /// assert!(inst.reinforcing());
    /// assert!(entropy(&did(&inst.pi_star, &inst.pi_ref)?) < entropy(&inst.pi_ref));
    /// // The same seed, the same instance.
    /// let again = Instance::tempered(1000, 0.25, 1.0, 1.0, 7)?;
    /// assert_eq!(again.pi_ref, inst.pi_ref);
    /// assert!(Instance::tempered(10, 0.0, 1.0, 1.0, 7).is_err()); // τ must be positive
    /// # Ok::<(), difinfo::Error>(())
    /// ```
    pub fn tempered(n: usize, tau: f64, beta: f64, scale: f64, seed: u64) -> Result<Self> {
        if n == 0 {
            return Err(Error::Empty);
        }
        Self::from_standard_logits(&standard_logits(n, seed), tau, beta, scale, seed)
    }

    /// As [`Instance::tempered`] with a given `z`.
    ///
    /// # Errors
    /// As [`Instance::tempered`].
    ///
    /// # Examples
    /// ```
    /// use difinfo::synthetic::instance::Instance;
    /// // τ = 1: π* = π_ref, and Eq. 1 gives π_l = π_ref for every β.
    /// let inst = Instance::from_standard_logits(&[0.5, -1.0, 2.0], 1.0, 0.5, 2.0, 0)?;
    /// let d = inst.pi_l.log_probs().iter().zip(inst.pi_ref.log_probs());
    /// assert!(d.map(|(a, b)| (a - b).abs()).fold(0.0, f64::max) < 1e-12);
    /// # Ok::<(), difinfo::Error>(())
    /// ```
    pub fn from_standard_logits(
        z: &[f64],
        tau: f64,
        beta: f64,
        scale: f64,
        seed: u64,
    ) -> Result<Self> {
        let positive = |name: &'static str, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(Error::InvalidParameter {
                    name,
                    value: v.to_string(),
                    reason: "must be finite and positive".into(),
                })
            }
        };
        positive("tau", tau)?;
        Beta::new(beta)?;
        positive("scale", scale)?;
        let f_ref: Vec<f64> = z.iter().map(|x| scale * x).collect();
        let f_star: Vec<f64> = f_ref.iter().map(|x| x / tau).collect();
        let pi_ref = Policy::from_logits(&f_ref)?;
        let pi_star = Policy::from_logits(&f_star)?;
        let pi_l = ideal_rejected(&pi_ref, &pi_star, beta)?;
        Ok(Self {
            n: z.len(),
            tau,
            beta,
            scale,
            seed,
            pi_ref,
            pi_star,
            pi_l,
        })
    }

    /// The same `π_ref`, `π*` with another rejected distribution (the `rejected` experiment).
    pub fn with_rejected(&self, pi_l: Policy) -> Result<Self> {
        self.pi_ref.check_same_space(&pi_l)?;
        Ok(Self {
            pi_l,
            ..self.clone()
        })
    }

    /// Whether `π*` reinforces (`τ < 1`) rather than smooths `π_ref`.
    pub fn reinforcing(&self) -> bool {
        self.tau < 1.0
    }

    /// The JSON record of `instance.json`: `N, τ, β, scale, seed` and the normalized logits
    /// (log-probabilities) of `π_ref`, `π*`, `π_l`.
    pub fn record(&self, label: &str) -> InstanceRecord {
        InstanceRecord {
            label: label.to_string(),
            n: self.n,
            tau: self.tau,
            beta: self.beta,
            scale: self.scale,
            seed: self.seed,
            logits_pi_ref: self.pi_ref.log_probs().to_vec(),
            logits_pi_star: self.pi_star.log_probs().to_vec(),
            logits_pi_l: self.pi_l.log_probs().to_vec(),
        }
    }
}

/// One instance as written to `instance.json`. Logits are normalized (`log softmax`), so
/// `softmax(logits)` is the policy and `exp(logits)` already sums to one.
#[derive(Debug, Clone, Serialize)]
pub struct InstanceRecord {
    /// What the instance is used for (`"τ=0.4 β=0.5"`, `"prompt 3"`, …).
    pub label: String,
    /// `N`.
    #[serde(rename = "N")]
    pub n: usize,
    /// `τ`.
    pub tau: f64,
    /// `β`.
    pub beta: f64,
    /// Logit scale `s`.
    pub scale: f64,
    /// Seed of `z`.
    pub seed: u64,
    /// `log π_ref`.
    pub logits_pi_ref: Vec<f64>,
    /// `log π*`.
    pub logits_pi_star: Vec<f64>,
    /// `log π_l`.
    pub logits_pi_l: Vec<f64>,
}

/// `P` prompts, each an [`Instance`] with its own `z` (seeded by `seed` and the prompt index).
#[derive(Debug, Clone)]
pub struct ContextualInstance {
    /// One instance per prompt.
    pub prompts: Vec<Instance>,
}

impl ContextualInstance {
    /// `P` tempered prompts sharing `τ, β, scale`.
    ///
    /// # Errors
    /// As [`Instance::tempered`]; [`Error::Empty`] for `P = 0`.
    pub fn tempered(
        prompts: usize,
        n: usize,
        tau: f64,
        beta: f64,
        scale: f64,
        seed: u64,
    ) -> Result<Self> {
        if prompts == 0 {
            return Err(Error::Empty);
        }
        let prompts = (0..prompts)
            .map(|p| {
                let s = sub_seed(seed, &format!("prompt {p}"));
                Instance::tempered(n, tau, beta, scale, s)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { prompts })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::did::did;
    use crate::entropy::js;
    use crate::preference::preference_distribution;

    /// Theorem 3.3 on the instance: `q_{π_ref/π_l} = normalize(q_{π*/π_ref}^β)`.
    #[test]
    fn power_law_holds_on_the_instance() {
        let inst = Instance::tempered(32, 0.4, 0.5, 1.0, 7).unwrap();
        let p = preference_distribution(&inst.pi_ref, &inst.pi_l).unwrap();
        let q = did(&inst.pi_star, &inst.pi_ref).unwrap();
        let q_beta: Vec<f64> = q.log_probs().iter().map(|l| 0.5 * l).collect();
        let q_beta = Policy::from_logits(&q_beta).unwrap();
        assert!(js(&p, &q_beta).unwrap() < 1e-15);
    }

    #[test]
    fn seeds_are_reproducible_and_distinct() {
        assert_eq!(standard_logits(5, 1), standard_logits(5, 1));
        assert_ne!(standard_logits(5, 1), standard_logits(5, 2));
        assert_ne!(sub_seed(1, "a"), sub_seed(1, "b"));
        assert!(Instance::tempered(4, 0.0, 1.0, 1.0, 0).is_err());
    }
}
