//! [`SynthConfig::validate_for`]: every setting's range (the counts, the real numbers, the
//! lists), then the instances the experiments are built on, refused where f64 cannot tell
//! apart what the experiments measure. Each refusal names the flag.

use super::{compact, instance, limits, Experiment, SynthConfig, SynthError};
use crate::policy::Policy;

/// The refusal of the flag `name` at `value`.
fn setting(name: &'static str, value: String, reason: String) -> Result<(), SynthError> {
    Err(SynthError::Setting {
        name,
        value,
        reason,
    })
}

impl SynthConfig {
    /// Check every setting's range, for every experiment (the instances are checked when an
    /// experiment runs: [`SynthConfig::validate_for`]).
    ///
    /// # Errors
    /// [`SynthError::Setting`] naming the flag.
    pub fn validate(&self) -> Result<(), SynthError> {
        self.validate_ranges(&Experiment::ALL)
    }

    /// Check every setting's domain, and the settings that only `experiments` use (beta-accuracy's
    /// `--prompts × --n`); then, for the experiments built on them (all but claim-map and
    /// beta-accuracy), that the instances of `--n`, `--scale`, `--tau`, `--tau-smooth`, `--beta`
    /// and `--did-fit-betas` are not degenerate ([`limits::DEGENERATE`]).
    ///
    /// # Errors
    /// [`SynthError::Setting`] naming the flag (both, for a product of two).
    pub fn validate_for(&self, experiments: &[Experiment]) -> Result<(), SynthError> {
        self.validate_ranges(experiments)?;
        // claim-map sweeps its own τ × scale grid; beta-accuracy draws its own instances.
        let own = [Experiment::ClaimMap, Experiment::BetaAccuracy];
        if experiments.iter().any(|e| !own.contains(e)) {
            self.validate_instances()?;
        }
        Ok(())
    }

    /// Refuses an instance where f64 cannot tell apart what the experiments measure, naming
    /// the flag that made it so.
    fn validate_instances(&self) -> Result<(), SynthError> {
        use crate::entropy::js;
        use limits::DEGENERATE;
        // The mass outside the most likely class.
        let rest = |p: &Policy| {
            let lp = p.log_probs();
            let top = (0..lp.len()).fold(0, |b, i| if lp[i] > lp[b] { i } else { b });
            (0..lp.len())
                .filter(|&i| i != top)
                .map(|i| lp[i].exp())
                .sum::<f64>()
        };
        let n = self.n;
        let betas = std::iter::once(self.beta).chain(self.did_fit_betas.iter().copied());
        for beta in betas {
            for (tau_flag, tau) in [("--tau", self.tau), ("--tau-smooth", self.tau_smooth)] {
                let inst = instance::Instance::tempered(n, tau, beta, self.scale, self.seed)?;
                let beta_flag = if beta == self.beta {
                    "--beta"
                } else {
                    "--did-fit-betas"
                };
                let (r, s, l) = (&inst.pi_ref, &inst.pi_star, &inst.pi_l);
                let uniform = (n as f64).ln() - crate::entropy::entropy(r) < DEGENERATE;
                let bad = |name: &'static str, value: f64, why: String| {
                    setting(
                        name,
                        compact(value),
                        format!(
                            "a degenerate instance at N = {n}, seed {}: {why}; the experiments' \
                             predictions cannot be measured on it",
                            self.seed
                        ),
                    )
                };
                if rest(r) < DEGENERATE {
                    return bad(
                        "--scale",
                        self.scale,
                        format!(
                            "π_ref = softmax(scale · z) is one-hot to f64 precision (mass {:.1e} \
                         outside its top class)",
                            rest(r)
                        ),
                    );
                }
                let d = js(s, r)?;
                if d < DEGENERATE {
                    return if uniform {
                        bad(
                            "--scale",
                            self.scale,
                            format!(
                                "π_ref = softmax(scale · z) is uniform to f64 precision, so π* = \
                             π_ref^(1/τ) is too (JS(π*, π_ref) = {d:.1e})"
                            ),
                        )
                    } else {
                        bad(
                            tau_flag,
                            tau,
                            format!("π* = π_ref^(1/τ) is π_ref to f64 precision (JS = {d:.1e})"),
                        )
                    };
                }
                if rest(s) < DEGENERATE {
                    return bad(
                        tau_flag,
                        tau,
                        format!(
                        "π* = π_ref^(1/τ) is one-hot to f64 precision (mass {:.1e} outside its \
                         top class)", rest(s)),
                    );
                }
                if rest(l) < DEGENERATE {
                    return bad(
                        beta_flag,
                        beta,
                        format!(
                        "Eq. 1's π_l ∝ π_ref^(1+β) π*^(−β) (τ = {}) is one-hot to f64 precision \
                         (mass {:.1e} outside its top class)", compact(tau), rest(l)),
                    );
                }
                let d = js(l, r)?;
                if d < DEGENERATE {
                    return bad(
                        beta_flag,
                        beta,
                        format!(
                            "Eq. 1's π_l ∝ π_ref^(1+β) π*^(−β) (τ = {}) is π_ref to f64 precision \
                         (JS = {d:.1e})",
                            compact(tau)
                        ),
                    );
                }
            }
        }
        Ok(())
    }

    /// The range checks of [`SynthConfig::validate_for`]: the counts, the real numbers, the
    /// lists.
    fn validate_ranges(&self, experiments: &[Experiment]) -> Result<(), SynthError> {
        self.validate_counts(experiments)?;
        self.validate_reals()?;
        self.validate_lists()
    }

    /// The integer settings: each within its bounds, and beta-accuracy's `P · N`.
    fn validate_counts(&self, experiments: &[Experiment]) -> Result<(), SynthError> {
        use limits::*;
        let memory = "fewer classes leave the verdicts' distributions within JS 1e-2 of each \
                      other; about 50 f64 vectors of N are held at once: 1.6 GiB at the upper \
                      bound";
        let long = "more would run for days";
        for (name, v, lo, hi, why) in [
            ("--n", self.n, MIN_N, MAX_N, memory),
            (
                "--prompts",
                self.prompts,
                1,
                MAX_PROMPTS,
                "the prompts of beta-accuracy",
            ),
            (
                "--mc-samples",
                self.mc_samples,
                1,
                MAX_MC_SAMPLES,
                "one f64 kept per sample: 1 GiB at the bound",
            ),
            (
                "--beta-samples",
                self.beta_samples,
                2,
                MAX_BETA_SAMPLES,
                "a line fit needs 2; three vectors of them per prompt",
            ),
            ("--grid-tau", self.grid_tau, 2, MAX_GRID, "a grid axis"),
            (
                "--atlas-n",
                self.atlas_n,
                2,
                MAX_N,
                "the loss atlas's classes; each cell solves an L-BFGS problem of N",
            ),
            ("--grid-scale", self.grid_scale, 2, MAX_GRID, "a grid axis"),
            (
                "--records",
                self.train.records,
                1,
                MAX_RECORDS,
                "each record copies the logits",
            ),
            ("--steps", self.train.steps, 1, MAX_STEPS, long),
            ("--pop-iters", self.train.pop_iters, 1, MAX_POP_ITERS, long),
            ("--batch", self.train.batch, 1, MAX_BATCH, long),
        ] {
            if !(lo..=hi).contains(&v) {
                return setting(
                    name,
                    v.to_string(),
                    format!("must lie in [{lo}, {hi}] ({why})"),
                );
            }
        }
        // Only beta-accuracy holds P · N logits: the other experiments take any --n in range.
        if experiments.contains(&Experiment::BetaAccuracy)
            && self.prompts.saturating_mul(self.n) > MAX_PROMPT_CLASSES
        {
            return setting(
                "--prompts × --n",
                format!("{} × {}", self.prompts, self.n),
                format!(
                    "beta-accuracy trains the P · N logits of all prompts as one vector: at \
                     most {MAX_PROMPT_CLASSES}; lower --n or --prompts"
                ),
            );
        }
        Ok(())
    }

    /// The real settings: τ, the smoothing τ, β, β', the scale, the contrast, the optimizer's.
    fn validate_reals(&self) -> Result<(), SynthError> {
        use limits::*;
        let in_range = |x: f64| (MIN_POSITIVE..=MAX_POSITIVE).contains(&x);
        let span = format!("[{MIN_POSITIVE:e}, {MAX_POSITIVE:e}]");
        if !(self.tau >= MIN_POSITIVE && self.tau < 1.0) {
            return setting(
                "--tau",
                compact(self.tau),
                format!("the reinforcing τ must lie in (0, 1), at least {MIN_POSITIVE:e}"),
            );
        }
        if !(self.tau_smooth > 1.0 && self.tau_smooth <= MAX_POSITIVE) {
            return setting(
                "--tau-smooth",
                compact(self.tau_smooth),
                format!("the smoothing τ must be > 1, at most {MAX_POSITIVE:e}"),
            );
        }
        for (name, v) in [
            ("--beta", self.beta),
            ("--beta-mismatch", self.beta_mismatch),
            ("--scale", self.scale),
            ("--contrast", self.contrast),
        ] {
            if !in_range(v) {
                return setting(name, compact(v), format!("must lie in {span}"));
            }
        }
        if self.beta_mismatch == self.beta {
            return setting(
                "--beta-mismatch",
                compact(self.beta_mismatch),
                "must differ from --beta".into(),
            );
        }
        let lr = self.train.lr;
        if !(lr > 0.0 && lr <= MAX_LR) {
            return setting("--lr", compact(lr), format!("must lie in (0, {MAX_LR:e}]"));
        }
        let clip = self.train.clip;
        if !(clip.is_finite() && clip > 0.0) {
            return setting(
                "--clip",
                compact(clip),
                "must be finite and positive".into(),
            );
        }
        if !(0.0..1.0).contains(&self.train.alpha) {
            return setting(
                "--rms-alpha",
                compact(self.train.alpha),
                "RMSprop's α must lie in [0, 1)".into(),
            );
        }
        let eps = self.train.eps;
        if !(eps.is_finite() && eps >= 0.0) {
            return setting(
                "--rms-eps",
                compact(eps),
                "RMSprop's ε must be finite and ≥ 0".into(),
            );
        }
        Ok(())
    }

    /// The comma-separated lists: 1 to `MAX_LIST` values, each in range.
    fn validate_lists(&self) -> Result<(), SynthError> {
        use limits::*;
        let in_range = |x: f64| (MIN_POSITIVE..=MAX_POSITIVE).contains(&x);
        let span = format!("[{MIN_POSITIVE:e}, {MAX_POSITIVE:e}]");
        for (name, list) in [
            ("--did-fit-betas", &self.did_fit_betas),
            ("--did-entropy-taus", &self.did_entropy_taus),
            ("--atlas-betas", &self.atlas_betas),
            ("--atlas-taus", &self.atlas_taus),
        ] {
            if list.is_empty() || list.len() > MAX_LIST || !list.iter().all(|&v| in_range(v)) {
                return setting(
                    name,
                    list.iter()
                        .map(|&x| compact(x))
                        .collect::<Vec<_>>()
                        .join(","),
                    format!("need 1 to {MAX_LIST} values, each in {span}"),
                );
            }
        }
        Ok(())
    }
}
