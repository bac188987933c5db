//! Diagnostics on a model small enough to enumerate: the Monte Carlo sequence entropy of
//! `difinfo-train entropy` (Appendix K) against the exact entropy.

mod common;

use candle_core::{DType, IndexOp, Tensor};
use difinfo_trainer::config_json::Architecture;
use difinfo_trainer::diag::entropy::prompt_entropy;
use difinfo_trainer::model::{KvCache, Model};
use rand::SeedableRng;

/// Next-token log-probabilities after each row of `ids` (`[B, L]`), in f64.
fn next_logps(m: &Model, ids: Vec<u32>, rows: usize) -> Vec<Vec<f64>> {
    let l = ids.len() / rows;
    let t = Tensor::from_vec(ids, (rows, l), m.device()).unwrap();
    let logits = m.forward_with_cache(&t, &mut KvCache::new()).unwrap();
    let last: Vec<Vec<f32>> = logits
        .i((.., l - 1, ..))
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec2()
        .unwrap();
    last.iter()
        .map(|row| {
            let z: Vec<f64> = row.iter().map(|&x| x as f64).collect();
            let lse = difinfo::logspace::log_sum_exp(&z);
            z.iter().map(|x| x - lse).collect()
        })
        .collect()
}

fn entropy_of(lp: &[f64]) -> f64 {
    -lp.iter().map(|l| l.exp() * l).sum::<f64>()
}

/// The exact entropy of completions of at most 2 tokens, stopping at `stop`, by the chain rule
/// over every first token: `H = H(y1) + Σ_{t ≠ stop} π(t) H(y2 | t)`.
fn exact_two_token_entropy(m: &Model, prompt: &[u32], stop: u32) -> f64 {
    let first = &next_logps(m, prompt.to_vec(), 1)[0];
    let v = first.len();
    let mut ids = Vec::with_capacity(v * (prompt.len() + 1));
    for t in 0..v as u32 {
        ids.extend_from_slice(prompt);
        ids.push(t);
    }
    let second = next_logps(m, ids, v);
    let mut h = entropy_of(first);
    for t in 0..v {
        if t as u32 != stop {
            h += first[t].exp() * entropy_of(&second[t]);
        }
    }
    h
}

#[test]
fn app_k_monte_carlo_entropy_matches_enumeration_and_stderr_shrinks() {
    let mut cfg = common::micro_config(Architecture::Llama);
    cfg.initializer_range = 0.6; // a peaked, far-from-uniform model
    let (_dir, m) = common::model(cfg, DType::F32, 7);
    let prompt = [1u32, 17, 42, 99];
    let stop = 2u32;
    let exact = exact_two_token_entropy(&m, &prompt, stop);
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let small = prompt_entropy(&m, &prompt, 400, 1.0, 2, &[stop], &mut rng)
        .unwrap()
        .0;
    let large = prompt_entropy(&m, &prompt, 1600, 1.0, 2, &[stop], &mut rng)
        .unwrap()
        .0;
    for e in [&small, &large] {
        let z = (e.entropy - exact).abs() / e.stderr;
        assert!(
            z < 4.0,
            "MC {} ± {} vs exact {exact}: {z:.2} standard errors",
            e.entropy,
            e.stderr
        );
    }
    // Four times the samples: half the standard error (1/√K), up to the noise of s itself.
    let ratio = small.stderr / large.stderr;
    assert!(
        (1.6..2.5).contains(&ratio),
        "stderr ratio {ratio} for 4× the samples"
    );
    assert!(exact > 0.0 && small.token_entropy > 0.0);
    eprintln!(
        "exact {exact}, K=400 {} ± {}, K=1600 {} ± {}",
        small.entropy, small.stderr, large.entropy, large.stderr
    );
}

#[test]
fn app_k_entropy_refuses_degenerate_settings() {
    let (_dir, m) = common::model(common::micro_config(Architecture::Llama), DType::F32, 1);
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    assert!(prompt_entropy(&m, &[1, 2], 1, 1.0, 2, &[], &mut rng).is_err());
    assert!(prompt_entropy(&m, &[1, 2], 8, 0.0, 2, &[], &mut rng).is_err());
}

/// SIR over candidates drawn from a known `π_ref` reproduces Eq. 1's `π_l ∝ π_ref^{1+β} π*^{−β}`:
/// a chi-square goodness-of-fit test at a fixed seed (4 degrees of freedom; the critical value is
/// the 0.999 quantile, 18.47, computed by statrs, so a correct sampler fails with probability 1e-3
/// at a random seed, and this seed is fixed). 400 candidates per draw keep SIR's finite-M bias (O(1/M)) far below what 4,000 draws
/// can detect.
#[test]
fn eq_1_sir_reproduces_the_ideal_rejected_distribution() {
    use difinfo::Policy;
    use difinfo_trainer::diag::resample::resample;
    let pi_ref = Policy::from_probs(&[0.4, 0.25, 0.2, 0.1, 0.05]).unwrap();
    let pi_star = Policy::from_probs(&[0.1, 0.2, 0.2, 0.25, 0.25]).unwrap();
    let beta = 0.7;
    let pi_l = difinfo::rejected::ideal_rejected(&pi_ref, &pi_star, beta).unwrap();
    let sampler = pi_ref.sampler();
    let mut rng = rand::rngs::StdRng::seed_from_u64(2024);
    let (draws, m) = (4000usize, 400usize);
    let mut counts = [0usize; 5];
    for _ in 0..draws {
        let ys: Vec<usize> = (0..m).map(|_| sampler.sample(&mut rng)).collect();
        let lr: Vec<f64> = ys.iter().map(|&y| pi_ref.log_probs()[y]).collect();
        let lt: Vec<f64> = ys.iter().map(|&y| pi_star.log_probs()[y]).collect();
        let r = resample(&lr, &lt, beta, &mut rng).unwrap();
        assert!(r.ess >= 1.0 && r.ess <= m as f64);
        counts[ys[r.index]] += 1;
    }
    let chi2: f64 = counts
        .iter()
        .zip(pi_l.probs())
        .map(|(&c, p)| {
            let e = p * draws as f64;
            (c as f64 - e).powi(2) / e
        })
        .sum();
    use statrs::distribution::{ChiSquared, ContinuousCDF};
    let critical = ChiSquared::new(4.0).unwrap().inverse_cdf(0.999);
    assert!(
        (critical - 18.467).abs() < 1e-3,
        "χ²_4 0.999 quantile {critical}"
    );
    assert!(
        chi2 < critical,
        "chi-square {chi2} (counts {counts:?}, π_l {:?})",
        pi_l.probs()
    );
    // …and the test has power: π_ref itself is rejected by the same statistic.
    let chi2_ref: f64 = counts
        .iter()
        .zip(pi_ref.probs())
        .map(|(&c, p)| (c as f64 - p * draws as f64).powi(2) / (p * draws as f64))
        .sum();
    assert!(chi2_ref > 100.0, "chi-square against π_ref only {chi2_ref}");
    // The resampler's own test gives the same statistic and its p-value.
    use difinfo_trainer::diag::resample::goodness_of_fit;
    let fit = goodness_of_fit(&counts, &pi_l).unwrap();
    assert_eq!((fit.statistic, fit.df), (chi2, 4));
    assert!(fit.p_value > 1e-3, "p = {}", fit.p_value);
    let against_ref = goodness_of_fit(&counts, &pi_ref).unwrap();
    assert!(against_ref.p_value < 1e-12, "p = {}", against_ref.p_value);
    assert!(goodness_of_fit(&counts[..4], &pi_l).is_err());
}

#[test]
fn resample_rejected_candidate_lines_name_their_field() {
    use difinfo_trainer::records::parse_candidates_line;
    let f = std::path::Path::new("c.jsonl");
    let ok = parse_candidates_line(
        r#"{"prompt":"p","chosen":"a","candidates":["b","c"]}"#,
        f,
        1,
    )
    .unwrap();
    assert_eq!(ok.candidates.len(), 2);
    for (line, field) in [
        (r#"{"prompt":"p","chosen":"a"}"#, "candidates"),
        (
            r#"{"prompt":"p","chosen":"a","candidates":[]}"#,
            "candidates",
        ),
        (
            r#"{"prompt":"p","chosen":"a","candidates":["b",3]}"#,
            "candidates[1]",
        ),
        (
            r#"{"prompt":"p","chosen":"a","candidates":"b"}"#,
            "candidates",
        ),
    ] {
        let e = parse_candidates_line(line, f, 7).unwrap_err().to_string();
        assert!(e.contains("c.jsonl:7") && e.contains(field), "{e}");
    }
}

#[test]
fn report_tells_whether_displacement_happened() {
    use difinfo_trainer::diag::report::report;
    let write = |rows: &[(f64, f64, f64)]| {
        let dir = common::TempDir::new();
        let text: String = rows
            .iter()
            .enumerate()
            .map(|(i, (loss, c, r))| {
                format!(
                    "{{\"step\":{},\"loss\":{loss},\"logps/chosen\":{c},\"logps/rejected\":{r}}}\n",
                    i + 1
                )
            })
            .collect();
        std::fs::write(dir.join("metrics.jsonl"), text).unwrap();
        dir
    };
    let displaced = write(&[(0.69, -80.0, -70.0), (0.3, -90.0, -110.0)]);
    let md = std::fs::read_to_string(report(displaced.path()).unwrap()).unwrap();
    assert!(md.contains("displacement: yes"), "{md}");
    assert!(displaced.join("report.png").exists());
    let kept = write(&[(0.69, -80.0, -70.0), (0.3, -79.0, -110.0)]);
    let md = std::fs::read_to_string(report(kept.path()).unwrap()).unwrap();
    assert!(md.contains("displacement: no"), "{md}");
    let empty = common::TempDir::new();
    assert!(report(empty.path()).is_err());
    // A did-entropy result in a subdirectory is quoted, with Claim 4.1's side and K.1's warning.
    std::fs::create_dir_all(displaced.join("did")).unwrap();
    let did = r#"{"did_entropy": {"entropy": 105.0, "stderr": 0.5},
        "reference_entropy": {"entropy": 80.0, "stderr": 1.5},
        "policy_entropy": {"entropy": 95.0, "stderr": 1.0},
        "beta_accuracy": {"accuracy": 0.3, "determined": 10, "undetermined": 0}}"#;
    std::fs::write(displaced.join("did/did_entropy.json"), did).unwrap();
    let md = std::fs::read_to_string(report(displaced.path()).unwrap()).unwrap();
    assert!(
        md.contains("## DID entropy (`did/did_entropy.json`"),
        "{md}"
    );
    assert!(
        md.contains("| H(π̂): the DID entropy estimate | 105.0000 | 0.5000 |"),
        "{md}"
    );
    assert!(md.contains("high-entropy DID"), "{md}");
    assert!(
        md.contains("0.3000 over 10 prompt(s)") && md.contains("unreliable"),
        "{md}"
    );
    std::fs::write(displaced.join("did/did_entropy.json"), "{}").unwrap();
    let e = report(displaced.path()).unwrap_err().to_string();
    assert!(e.contains("not a did-entropy result"), "{e}");
}

/// Two different micro models `(directories, π_ref, π)`.
fn reference_and_policy() -> ((common::TempDir, common::TempDir), Model, Model) {
    let cfg = common::micro_config(Architecture::Llama);
    let (a, m_ref) = common::model(cfg.clone(), DType::F32, 3);
    let (b, m_pi) = common::model(cfg, DType::F32, 4);
    ((a, b), m_ref, m_pi)
}

/// Appendix K.1 on real models: with π = π_ref every x = log π − log π_ref is 0, so no prompt's
/// fit is determined (reported as such, not as a number, and the β-accuracy is undetermined);
/// with π ≠ π_ref the fits exist.
#[test]
fn app_k1_beta_fits_are_undetermined_when_pi_equals_reference() {
    use difinfo::beta_accuracy::{beta_accuracy, BetaFit};
    use difinfo_trainer::diag::beta_accuracy::prompt_fit;
    use difinfo_trainer::generate::SamplingParams;
    let (_dirs, m_ref, m_pi) = reference_and_policy();
    let params = SamplingParams {
        temperature: 1.0,
        top_p: 1.0,
        max_new_tokens: 3,
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let prompt = [1u32, 50, 60];
    let same = prompt_fit(
        &m_ref,
        &m_ref,
        &m_ref,
        &prompt,
        4,
        &params,
        &[],
        0,
        &mut rng,
    )
    .unwrap();
    assert!(same.x.iter().all(|&x| x == 0.0));
    assert_eq!(same.fit, BetaFit::Undetermined);
    assert!(beta_accuracy(&[same.fit]).is_err());
    let other = prompt_fit(&m_pi, &m_pi, &m_ref, &prompt, 4, &params, &[], 0, &mut rng).unwrap();
    assert!(matches!(other.fit, BetaFit::Determined(_)), "{other:?}");
    let acc = beta_accuracy(&[other.fit, BetaFit::Undetermined]).unwrap();
    assert_eq!((acc.determined, acc.undetermined), (1, 1));
}

/// Appendix K end to end with π = π_ref: the DID `q_{π/π_ref}` is uniform, so the estimator π̂
/// (trained from a peaked π_ref on pairs y_w, y_l ~ π_ref) must flatten to an almost uniform
/// distribution over the sampled support, while every β fit is undetermined (x ≡ 0) and
/// reported as such; every artifact is in the run directory.
#[test]
fn app_k_did_entropy_with_pi_equal_reference_learns_a_flat_did() {
    use difinfo::beta_accuracy::BetaFit;
    use difinfo_trainer::commands::did_entropy::{pipeline as run, DidEntropyArgs};
    use difinfo_trainer::diag::did_entropy::{
        PairDecoding, Stage, PAIRS_FILE, REPORT_FILE, SAMPLES_FILE,
    };
    let mut cfg = common::micro_config(Architecture::Llama);
    cfg.initializer_range = 0.6; // a peaked reference: far from the uniform DID
    let (model_dir, _) = common::checkpoint(cfg, 7);
    let tmp = common::TempDir::new();
    let prompts = common::write_lines(&tmp, "prompts.jsonl", &[r#"{"prompt": "The cat"}"#]);
    let out = tmp.join("run");
    let mut args = DidEntropyArgs {
        policy: model_dir.path().to_path_buf(),
        reference: model_dir.path().to_path_buf(),
        prompts,
        eval_prompts: None,
        decoding: PairDecoding::Sample,
        pairs_per_prompt: 4096,
        temperature: 1.0,
        max_new_tokens: 1,
        samples: 16,
        beta_samples: 4,
        device: "cpu".into(),
        config: None,
        // The training options given on the command line, as TOML keys.
        options: toml::toml! {
            max_prompt_length = 0
            seed = 3
            learning_rate = 3e-3
            warmup_steps = 0
            num_train_epochs = 8.0
            per_device_train_batch_size = 256
            gradient_accumulation_steps = 1
        },
    };
    args.options
        .insert("output_dir".into(), out.display().to_string().into());
    let mut stages = Vec::new();
    let r = run(&args, &mut |s, done, total| stages.push((s, done, total))).unwrap();
    assert_eq!(stages, [(Stage::Pairs, 1, 1), (Stage::Evaluate, 1, 1)]);
    for f in [PAIRS_FILE, SAMPLES_FILE, REPORT_FILE] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    assert!(r.estimator.join("model.safetensors").is_file());
    assert_eq!(r.pairs, 4096);
    // K.1: x = log π − log π_ref is exactly 0, so no fit exists.
    assert!(r.prompts.iter().all(|p| p.beta.x.iter().all(|&x| x == 0.0)));
    assert!(r
        .prompts
        .iter()
        .all(|p| p.beta.fit == BetaFit::Undetermined));
    assert!(r.beta_accuracy.is_none());

    // The sampled support: completion tokens seen at least 64 times among the 8192 drawn.
    let first = std::fs::read_to_string(out.join(PAIRS_FILE)).unwrap();
    let mut counts = std::collections::BTreeMap::<u32, usize>::new();
    let mut prompt_ids = Vec::new();
    for line in first.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        prompt_ids = serde_json::from_value::<Vec<u32>>(v["prompt_ids"].clone()).unwrap();
        for k in ["chosen_ids", "rejected_ids"] {
            let ids: Vec<u32> = serde_json::from_value(v[k].clone()).unwrap();
            *counts.entry(ids[0]).or_default() += 1;
        }
    }
    let support: Vec<usize> = counts
        .iter()
        .filter(|(_, &c)| c >= 64)
        .map(|(&t, _)| t as usize)
        .collect();
    assert!(support.len() >= 4, "support {counts:?}");
    let restricted_entropy = |lp: &[f64]| {
        let l: Vec<f64> = support.iter().map(|&t| lp[t]).collect();
        let lse = difinfo::logspace::log_sum_exp(&l);
        let h: f64 = -l.iter().map(|x| (x - lse).exp() * (x - lse)).sum::<f64>();
        h / (support.len() as f64).ln()
    };
    let m_ref =
        difinfo_trainer::pretrained::load_model(model_dir.path(), DType::F32, &common::device())
            .unwrap();
    let m_hat =
        difinfo_trainer::pretrained::load_model(&r.estimator, DType::F32, &common::device())
            .unwrap();
    let h_ref = restricted_entropy(&next_logps(&m_ref, prompt_ids.clone(), 1)[0]);
    let h_hat = restricted_entropy(&next_logps(&m_hat, prompt_ids, 1)[0]);
    eprintln!(
        "support {} tokens; normalized entropy on it: π_ref {h_ref:.4}, π̂ {h_hat:.4}; H(π̂) {} H(π_ref) {}",
        support.len(),
        r.did_entropy.entropy,
        r.reference_entropy.entropy
    );
    assert!(h_ref < 0.9, "the reference should be peaked: {h_ref}");
    assert!(
        h_hat > 0.98,
        "π̂ should be almost uniform on the support: {h_hat}"
    );
    assert!(r.did_entropy.entropy > r.reference_entropy.entropy);
}

/// `did-entropy` refuses, before any sampling, a β or objective that would not estimate the DID
/// and an output directory holding an earlier run.
#[test]
fn app_k_did_entropy_refuses_other_betas_and_earlier_runs() {
    use difinfo_trainer::commands::did_entropy::{pipeline as run, DidEntropyArgs};
    use difinfo_trainer::diag::did_entropy::PairDecoding;
    let tmp = common::TempDir::new();
    let cfg = common::write_lines(&tmp, "k.toml", &["beta = 0.5"]);
    let mut args = DidEntropyArgs {
        policy: tmp.join("no-such-policy"),
        reference: tmp.join("no-such-reference"),
        prompts: tmp.join("no-such-prompts.jsonl"),
        eval_prompts: None,
        decoding: PairDecoding::Greedy,
        pairs_per_prompt: 1,
        temperature: 1.0,
        max_new_tokens: 4,
        samples: 8,
        beta_samples: 4,
        device: "cpu".into(),
        config: Some(cfg),
        options: toml::toml! { seed = 0 },
    };
    let run_dir = tmp.join("run").display().to_string();
    args.options.insert("output_dir".into(), run_dir.into());
    let e = run(&args, &mut |_, _, _| {}).unwrap_err().to_string();
    assert!(e.contains("β = 0.5") && e.contains("ref-free"), "{e}");
    args.config = None;
    args.samples = 1;
    let e = run(&args, &mut |_, _, _| {}).unwrap_err().to_string();
    assert!(e.contains("--samples"), "{e}");
    args.samples = 8;
    std::fs::create_dir_all(tmp.join("run")).unwrap();
    std::fs::write(tmp.join("run/pairs.jsonl"), "").unwrap();
    let e = run(&args, &mut |_, _, _| {}).unwrap_err().to_string();
    assert!(
        e.contains("pairs.jsonl") && e.contains("--overwrite-output-dir"),
        "{e}"
    );
    args.options
        .insert("overwrite_output_dir".into(), true.into());
    let e = run(&args, &mut |_, _, _| {}).unwrap_err().to_string();
    assert!(e.contains("no-such-reference"), "{e}");
}

/// Greedy pairs (the paper's Table 2): one pair per prompt, each side the argmax decode of its
/// model, whatever the random streams; several greedy pairs per prompt are refused.
#[test]
fn app_k_greedy_pairs_are_the_argmax_decodes() {
    use difinfo_trainer::diag::did_entropy::{sample_pairs, PairDecoding};
    use difinfo_trainer::generate::{generate, SamplingParams};
    let (_dirs, m_ref, m_pi) = reference_and_policy();
    let prompt = [1u32, 50, 60];
    let greedy = SamplingParams {
        temperature: 0.0,
        top_p: 1.0,
        max_new_tokens: 5,
    };
    let mut r = rand::rngs::StdRng::seed_from_u64(0);
    let want_w = generate(&m_pi, &prompt, 1, &greedy, &[], &mut r).unwrap();
    let want_l = generate(&m_ref, &prompt, 1, &greedy, &[], &mut r).unwrap();
    let (mut rw, mut rl) = (
        rand::rngs::StdRng::seed_from_u64(7),
        rand::rngs::StdRng::seed_from_u64(8),
    );
    let pairs = sample_pairs(
        &m_pi,
        &m_ref,
        &prompt,
        1,
        PairDecoding::Greedy,
        1.0,
        5,
        &[],
        &mut rw,
        &mut rl,
    )
    .unwrap();
    assert_eq!(pairs.len(), 1);
    assert_eq!(pairs[0].chosen.completion_ids, want_w[0].completion_ids);
    assert_eq!(pairs[0].rejected.completion_ids, want_l[0].completion_ids);
    assert_ne!(want_w[0].completion_ids, want_l[0].completion_ids);
    let e = sample_pairs(
        &m_pi,
        &m_ref,
        &prompt,
        2,
        PairDecoding::Greedy,
        1.0,
        5,
        &[],
        &mut rw,
        &mut rl,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("one pair per prompt"), "{e}");
}
