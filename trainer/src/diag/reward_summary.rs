//! The expected reward of a set of completions under a reward model, with 95 % intervals: per
//! label (a policy's samples, or one side of a preference file) and per prompt. What Figure 6
//! plots (the expected reward of each policy's samples) and what Appendix J.2's pairing reads.
//!
//! ```text
//! per prompt p   n_p rewards r_p,1..n_p;  mean r̄_p;  interval r̄_p ± t_{0.975, n_p−1} s_p / √n_p
//! per label      P prompts;  mean  m = (1/P) Σ_p r̄_p  (each prompt weighs the same);
//!                interval  m ± t_{0.975, P−1} s / √P,  s the standard deviation of the r̄_p
//! ```
//!
//! The label's interval is Student's t over the per-prompt means, not over the rows: the
//! completions of one prompt are not independent draws of the label's reward (they share the
//! prompt), the prompts are. With one completion per prompt (a preference file) the two are
//! the same. An interval needs two values (`null` otherwise).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use statrs::distribution::{ContinuousCDF, StudentsT};

/// The confidence level of every interval.
pub const LEVEL: f64 = 0.95;

/// One scored completion: its group (label and side), its prompt's key and its reward.
#[derive(Debug, Clone, PartialEq)]
pub struct Scored {
    /// The group's label (`LABEL` of `--data LABEL=FILE`, with `/chosen` or `/rejected` for
    /// a preference file's sides).
    pub group: String,
    /// The prompt's key within the group (a `sample` row's `line`; a preference record's line).
    pub prompt: u64,
    /// The reward.
    pub reward: f64,
}

/// A mean with its interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MeanInterval {
    /// The number of values.
    pub n: usize,
    /// Their mean.
    pub mean: f64,
    /// The standard error `s / √n` (`None` for fewer than two values).
    pub std_error: Option<f64>,
    /// The interval's lower end (`None` for fewer than two values).
    pub ci_low: Option<f64>,
    /// The interval's upper end.
    pub ci_high: Option<f64>,
}

/// The mean of `xs` with its Student-t interval at [`LEVEL`].
///
/// # Formula
/// `x̄ ± t_{(1+LEVEL)/2, n−1} · s/√n`, `s² = Σ (x − x̄)² / (n − 1)`.
pub fn mean_interval(xs: &[f64]) -> MeanInterval {
    let n = xs.len();
    let mean = xs.iter().sum::<f64>() / n.max(1) as f64;
    if n < 2 {
        return MeanInterval {
            n,
            mean,
            std_error: None,
            ci_low: None,
            ci_high: None,
        };
    }
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    let se = (var / n as f64).sqrt();
    let t = StudentsT::new(0.0, 1.0, (n - 1) as f64)
        .map(|d| d.inverse_cdf(0.5 + LEVEL / 2.0))
        .unwrap_or(f64::NAN);
    MeanInterval {
        n,
        mean,
        std_error: Some(se),
        ci_low: Some(mean - t * se),
        ci_high: Some(mean + t * se),
    }
}

/// One prompt of a group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptSummary {
    /// The prompt's key (a `sample` row's `line`, a preference record's line).
    pub prompt: u64,
    /// Its completions' rewards: count, mean, interval over them.
    #[serde(flatten)]
    pub reward: MeanInterval,
}

/// One group (label, side).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupSummary {
    /// The group's label.
    pub label: String,
    /// The completions scored.
    pub n: usize,
    /// Over the per-prompt means: `n` is the number of prompts, `mean` their mean.
    pub prompts: MeanInterval,
    /// The mean over all rows (equal to `prompts.mean` when every prompt has as many
    /// completions).
    pub row_mean: f64,
    /// Each prompt.
    pub per_prompt: Vec<PromptSummary>,
}

/// The summary of every group, in the order the groups first appear.
pub fn summarize(rows: &[Scored]) -> Vec<GroupSummary> {
    let mut order: Vec<&str> = Vec::new();
    let mut by: BTreeMap<&str, BTreeMap<u64, Vec<f64>>> = BTreeMap::new();
    for r in rows {
        if !by.contains_key(r.group.as_str()) {
            order.push(&r.group);
        }
        by.entry(&r.group)
            .or_default()
            .entry(r.prompt)
            .or_default()
            .push(r.reward);
    }
    order
        .into_iter()
        .map(|g| {
            let prompts = &by[g];
            let per_prompt: Vec<PromptSummary> = prompts
                .iter()
                .map(|(&p, xs)| PromptSummary {
                    prompt: p,
                    reward: mean_interval(xs),
                })
                .collect();
            let means: Vec<f64> = per_prompt.iter().map(|p| p.reward.mean).collect();
            let all: Vec<f64> = prompts.values().flatten().copied().collect();
            GroupSummary {
                label: g.to_string(),
                n: all.len(),
                prompts: mean_interval(&means),
                row_mean: all.iter().sum::<f64>() / all.len().max(1) as f64,
                per_prompt,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interval_matches_scipy() {
        // t_{0.975, 4} = 2.776445105197794 (mpmath: the root of ½ I_{4/(4+t²)}(2, ½) = 0.025),
        // s/√n = √(2.5/5): 3 ∓ t·s/√n = (1.0367568385224, 4.9632431614776).
        let m = mean_interval(&[1.0, 2.0, 3.0, 4.0, 5.0]);
        assert_eq!(m.mean, 3.0);
        assert!((m.ci_low.unwrap() - 1.036_756_838_522_4).abs() < 1e-9);
        assert!((m.ci_high.unwrap() - 4.963_243_161_477_6).abs() < 1e-9);
        assert_eq!(mean_interval(&[2.0]).ci_low, None);
    }

    #[test]
    fn label_interval_is_over_prompt_means() {
        let row = |g: &str, p, r| Scored {
            group: g.into(),
            prompt: p,
            reward: r,
        };
        let s = summarize(&[
            row("a", 1, 0.0),
            row("a", 1, 2.0),
            row("a", 2, 4.0),
            row("b", 1, 1.0),
        ]);
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].label, "a");
        assert_eq!(s[0].n, 3);
        assert_eq!(s[0].prompts.n, 2);
        assert_eq!(s[0].prompts.mean, 2.5); // (1 + 4) / 2
        assert_eq!(s[0].row_mean, 2.0);
        assert_eq!(s[0].per_prompt[0].reward.mean, 1.0);
    }
}
