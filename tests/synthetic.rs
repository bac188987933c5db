//! The synthetic experiments (Sections 3.5 and 4): snapshots of every experiment's `--quick`
//! data, assertions on the science, determinism, and the `difinfo` binary end to end.
//!
//! Each experiment runs once per test binary (through the library, not the binary) and is
//! shared by the tests that read it. Snapshots hold the series tables and summaries rounded to
//! 6 significant digits (`tests/snapshots/`); a changed figure shows up as a snapshot diff.
//! Update them with `INSTA_UPDATE=always cargo test --release -p difinfo --test synthetic`.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::sync::{Mutex, OnceLock};

use indicatif::ProgressBar;
use serde_json::Value;

use difinfo::synthetic::{run_experiment, Experiment, ExperimentOutput, SynthConfig, Verdict};

/// The `--quick` settings, exactly.
fn quick() -> SynthConfig {
    SynthConfig::quick()
}

/// `--quick` output of `e`, computed once per test binary.
fn output(e: Experiment) -> ExperimentOutput {
    static CACHE: OnceLock<Mutex<HashMap<&'static str, ExperimentOutput>>> = OnceLock::new();
    static LOCKS: OnceLock<HashMap<&'static str, Mutex<()>>> = OnceLock::new();
    let locks = LOCKS.get_or_init(|| {
        Experiment::ALL
            .iter()
            .map(|e| (e.name(), Mutex::new(())))
            .collect()
    });
    // One computation per experiment even when several tests ask at once.
    let _guard = locks[e.name()].lock().unwrap();
    let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
    if let Some(o) = cache.lock().unwrap().get(e.name()) {
        return o.clone();
    }
    let o = run_experiment(e, &quick(), &ProgressBar::hidden()).expect("experiment runs");
    cache.lock().unwrap().insert(e.name(), o.clone());
    o
}

fn num(v: &Value, path: &str) -> f64 {
    let mut cur = v;
    for k in path.split('/') {
        cur = &cur[k];
    }
    cur.as_f64()
        .unwrap_or_else(|| panic!("{path} is not a number: {cur}"))
}

// ---------------------------------------------------------------- snapshots

macro_rules! snapshot {
    ($test:ident, $e:expr) => {
        #[test]
        fn $test() {
            let out = output($e);
            insta::assert_json_snapshot!(stringify!($test), out.snapshot());
        }
    };
}

snapshot!(snapshot_did_fit, Experiment::DidFit);
snapshot!(snapshot_reward_forms, Experiment::RewardForms);
snapshot!(snapshot_rejected, Experiment::Rejected);
snapshot!(snapshot_entropy, Experiment::Entropy);
snapshot!(snapshot_claim_map, Experiment::ClaimMap);
snapshot!(snapshot_did_entropy, Experiment::DidEntropy);
snapshot!(snapshot_beta_accuracy, Experiment::BetaAccuracy);
snapshot!(snapshot_loss_atlas, Experiment::LossAtlas);

// ---------------------------------------------------------------- science

/// Theorem 3.4 (b): population DPO recovers π*; the reference-free forms do not (τ ≠ 1).
#[test]
fn thm_3_4_only_dpo_recovers_pi_star() {
    let s = output(Experiment::RewardForms).summary;
    assert!(num(&s, "final_js/population/dpo") < 1e-6);
    for other in [
        "ref-free-beta",
        "ref-free-1",
        "dpo-beta-mismatch",
        "hinge",
        "ipo",
    ] {
        let v = num(&s, &format!("final_js/population/{other}"));
        assert!(v > 1e-2, "{other}: {v}");
    }
    // Sampled: DPO is the closest by more than an order of magnitude.
    let dpo = num(&s, "final_js/sampled/dpo");
    for other in [
        "ref-free-beta",
        "ref-free-1",
        "dpo-beta-mismatch",
        "hinge",
        "ipo",
        "dpo-pg",
    ] {
        let v = num(&s, &format!("final_js/sampled/{other}"));
        assert!(v > 10.0 * dpo, "{other}: {v} vs dpo {dpo}");
    }
}

/// DPO-PG with exact expectations: π_ref is a fixed point (g_w = π − π_ref = 0 there).
#[test]
fn dpo_pg_population_stays_at_reference() {
    let s = output(Experiment::RewardForms).summary;
    let rej = output(Experiment::Rejected).summary;
    // JS(π_ref, π*) is the `reference` choice of `rejected` (DPO's optimum is π_ref there).
    let at_ref = num(&rej, "final_js/reference");
    assert!((num(&s, "final_js/population/dpo-pg") - at_ref).abs() < 1e-9);
}

/// Fig. 1: r = log π fits the normalized DID^β exactly in population mode; sampled JS falls.
#[test]
fn fig_1_did_fit_converges() {
    let out = output(Experiment::DidFit);
    let s = &out.summary;
    assert!(num(s, "final_js_max_population") < 1e-8);
    assert!(num(s, "power_law_js_max") < 1e-12);
    assert!(num(s, "final_js_max") < 0.25 * num(s, "initial_js_max"));
    for (label, v) in s["final_js"]["sampled"].as_object().unwrap() {
        let beta: f64 = label.rsplit('=').next().unwrap().parse().unwrap();
        if beta <= 0.5 {
            assert!(v.as_f64().unwrap() < 3e-3, "{label}: {v}");
        }
    }
}

/// Theorem L.1: only the ideal rejected distribution recovers π*.
#[test]
fn thm_l_1_ideal_rejected_is_the_one() {
    let s = output(Experiment::Rejected).summary;
    assert!(num(&s, "final_js/ideal") < 1e-6);
    assert!(num(&s, "final_js_sampled/ideal") < 3e-3);
    for c in ["reference", "uniform", "contrast"] {
        assert!(num(&s, &format!("final_js/{c}")) > 1e-2, "{c}");
        assert!(num(&s, &format!("final_js_sampled/{c}")) > 1e-2, "{c}");
    }
}

/// Section 4: the peaks move in the claimed direction; the mean log-likelihood under π_ref
/// falls in both cases (Gibbs' inequality), matching its value at π*.
#[test]
fn section_4_peaks_and_gibbs() {
    let s = output(Experiment::Entropy).summary;
    assert!(num(&s, "peak_logp_change/reinforcing") > 0.5);
    assert!(num(&s, "peak_logp_change/smoothing") < -0.5);
    assert!(num(&s, "top1pct_logp_change/reinforcing") > 0.0);
    assert!(num(&s, "top1pct_logp_change/smoothing") < 0.0);
    for case in ["reinforcing", "smoothing"] {
        let m = num(&s, &format!("mean_logp_change/{case}"));
        let at_star = num(
            &s,
            &format!("predicted_at_convergence/{case}/mean_logp_change"),
        );
        assert!(m < 0.0 && at_star < 0.0, "{case}: {m}, {at_star}");
        assert!((m - at_star).abs() < 0.1, "{case}: {m} vs {at_star}");
    }
    let h_ref = num(&s, "reference_entropy");
    assert!(num(&s, "exact_did_entropy/reinforcing") < h_ref);
    assert!(num(&s, "exact_did_entropy/smoothing") > h_ref);
    assert!((num(&s, "did_entropy/dpo") - num(&s, "exact_did_entropy/reinforcing")).abs() < 0.1);
    assert!(num(&s, "did_entropy/dpo-pg").is_finite());
}

/// Claim 4.1 in the tempered model: holds for τ < 1/2, fails for 1/2 < τ < 1.
#[test]
fn claim_4_1_map() {
    let s = output(Experiment::ClaimMap).summary;
    assert_eq!(num(&s, "holds_fraction_by_band/tau_below_half"), 1.0);
    assert_eq!(num(&s, "holds_fraction_by_band/tau_half_to_one"), 0.0);
    assert!(num(&s, "holds_fraction_by_band/tau_above_one") > 0.9);
    let f = num(&s, "holds_fraction");
    assert!(f > 0.5 && f < 1.0);
}

/// Appendix K: the DID-entropy estimator is within 0.1 nat.
#[test]
fn appendix_k_did_entropy_estimate() {
    let s = output(Experiment::DidEntropy).summary;
    assert!(num(&s, "abs_error") < 0.1);
}

/// Appendix K.1: β-accuracy near 1 when converged, lower before.
#[test]
fn appendix_k1_beta_accuracy() {
    let s = output(Experiment::BetaAccuracy).summary;
    assert!(num(&s, "final") >= 0.9);
    assert!(num(&s, "initial") < 0.5);
}

/// The loss atlas: every TRL loss type has a population optimum in `final_js`; the closed forms
/// hold (sigmoid → π*, IPO → its linear system, sft → the chosen π_ref).
#[test]
fn loss_atlas_optima() {
    let s = output(Experiment::LossAtlas).summary;
    for t in difinfo::objective::LossType::ALL {
        let v = num(&s, &format!("final_js/{}", t.name()));
        assert!(v.is_finite() && v >= 0.0, "{t}: {v}");
    }
    assert!(num(&s, "final_js/sigmoid") < 1e-8);
    assert!(num(&s, "final_js/sigmoid_norm") < 1e-8);
    assert!(num(&s, "default/ipo/js_closed_form") < 1e-8);
    assert!(num(&s, "default/ipo/js_star") > 1e-2);
    assert!(num(&s, "default/sft/js_ref") < 1e-12);
    // Convex losses reach one optimum from two starts.
    for t in ["sigmoid", "ipo", "sppo_hard", "bco_pair", "nca_pair"] {
        assert!(
            num(&s, &format!("default/{t}/js_between_starts")) < 1e-8,
            "{t}"
        );
    }
}

/// Every verdict of the quick run is as documented in the report.
#[test]
fn verdicts() {
    let expect = [
        (
            Experiment::DidFit,
            vec![Verdict::Held, Verdict::Held, Verdict::Partly],
        ),
        (
            Experiment::RewardForms,
            vec![
                Verdict::Held,
                Verdict::Held,
                Verdict::Held,
                Verdict::Reported,
            ],
        ),
        (Experiment::Rejected, vec![Verdict::Held; 3]),
        (
            Experiment::Entropy,
            vec![
                Verdict::Held,
                Verdict::Held,
                Verdict::Held,
                Verdict::Partly,
                Verdict::Reported,
            ],
        ),
        (Experiment::ClaimMap, vec![Verdict::Partly, Verdict::Partly]),
        (Experiment::DidEntropy, vec![Verdict::Held]),
        (Experiment::BetaAccuracy, vec![Verdict::Held, Verdict::Held]),
        (
            Experiment::LossAtlas,
            vec![
                Verdict::Held,
                Verdict::Held,
                Verdict::Held,
                Verdict::Reported, // runs of other losses that ended above L(π*)
                Verdict::Reported,
                Verdict::Reported,
                Verdict::Reported,
            ],
        ),
    ];
    for (e, want) in expect {
        let got: Vec<Verdict> = output(e).checks.iter().map(|c| c.verdict).collect();
        assert_eq!(got, want, "{e}");
    }
}

// ---------------------------------------------------------------- determinism

fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let p = entry.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(dir).unwrap().display().to_string();
                out.push((rel, std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

/// Same seed, bit-identical files (including the PNG and SVG figures); another seed differs.
#[test]
fn same_seed_gives_identical_files() {
    let mut cfg = quick();
    cfg.train.steps = 1500;
    cfg.train.pop_iters = 200;
    let exps = [Experiment::Rejected, Experiment::Entropy];
    let run = |c: &SynthConfig| {
        let dir = tempfile::tempdir().unwrap();
        difinfo::synthetic::run_and_write(&exps, c, dir.path(), &ProgressBar::hidden()).unwrap();
        let f = files(dir.path());
        assert!(
            f.iter().all(|(n, _)| !n.contains(".tmp")),
            "temporary file left"
        );
        f
    };
    let a = run(&cfg);
    let b = run(&cfg);
    assert_eq!(a.len(), b.len());
    for ((na, fa), (nb, fb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        assert!(fa == fb, "{na} differs between two runs with the same seed");
    }
    cfg.seed = 1;
    let c = run(&cfg);
    let lld = |f: &[(String, Vec<u8>)]| {
        f.iter()
            .find(|(n, _)| n.ends_with("lld.csv"))
            .unwrap()
            .1
            .clone()
    };
    assert_ne!(lld(&a), lld(&c));
}

// ---------------------------------------------------------------- the binary

fn difinfo() -> Command {
    Command::new(env!("CARGO_BIN_EXE_difinfo"))
}

/// `difinfo synth all` with tiny settings writes every file the issue lists.
#[test]
fn binary_writes_every_file() {
    let dir = tempfile::tempdir().unwrap();
    let out = difinfo()
        .args([
            "synth",
            "all",
            "--quick",
            "--steps",
            "300",
            "--pop-iters",
            "40",
            "--prompts",
            "4",
            "--grid-tau",
            "4",
            "--grid-scale",
            "3",
            "--mc-samples",
            "200",
            "--n",
            "32",
            "--records",
            "5",
            "--out",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Not a terminal: no progress bar.
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let d = dir.path();
    let per_exp: [(&str, &[&str]); 8] = [
        ("did-fit", &["js.csv", "js.png", "js.svg"]),
        ("reward-forms", &["js.csv", "js.png", "js.svg"]),
        ("rejected", &["js.csv", "js.png", "js.svg"]),
        (
            "entropy",
            &[
                "entropy_vs_tau.csv",
                "lld.csv",
                "entropy.png",
                "entropy.svg",
            ],
        ),
        ("claim-map", &["grid.csv", "by_n.csv", "map.png", "map.svg"]),
        (
            "did-entropy",
            &["estimates.csv", "estimates.png", "estimates.svg"],
        ),
        (
            "beta-accuracy",
            &["accuracy.csv", "accuracy.png", "accuracy.svg"],
        ),
        (
            "loss-atlas",
            &["default.csv", "grid.csv", "atlas.png", "atlas.svg"],
        ),
    ];
    for (e, fs) in per_exp {
        for f in fs
            .iter()
            .chain(&["instance.json", "final_logits.json", "result.json"])
        {
            let p = d.join(e).join(f);
            assert!(p.is_file(), "missing {}", p.display());
            assert!(
                std::fs::metadata(&p).unwrap().len() > 0,
                "empty {}",
                p.display()
            );
        }
        let inst: Value = serde_json::from_str(
            &std::fs::read_to_string(d.join(e).join("instance.json")).unwrap(),
        )
        .unwrap();
        assert!(inst.is_object());
    }
    let png = std::fs::read(d.join("claim-map/map.png")).unwrap();
    assert_eq!(&png[1..4], b"PNG");
    let svg = std::fs::read_to_string(d.join("reward-forms/js.svg")).unwrap();
    assert!(svg.contains("<svg") && svg.contains("JS(π, π*)"));
    let s: Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("summary.json")).unwrap()).unwrap();
    let mut keys = vec![
        "did-fit/final_js_max".to_string(),
        "entropy/reference_entropy".into(),
        "entropy/did_entropy/dpo".into(),
        "entropy/did_entropy/dpo-pg".into(),
        "did-entropy/abs_error".into(),
        "beta-accuracy/final".into(),
        "claim-map/holds_fraction".into(),
    ];
    for m in ["population", "sampled"] {
        for o in [
            "dpo",
            "dpo-beta-mismatch",
            "ref-free-beta",
            "ref-free-1",
            "hinge",
            "ipo",
            "dpo-pg",
        ] {
            keys.push(format!("reward-forms/final_js/{m}/{o}"));
        }
    }
    for c in ["ideal", "reference", "uniform", "contrast"] {
        keys.push(format!("rejected/final_js/{c}"));
    }
    for c in ["smoothing", "reinforcing"] {
        keys.push(format!("entropy/peak_logp_change/{c}"));
        keys.push(format!("entropy/mean_logp_change/{c}"));
    }
    for k in keys {
        num(&s, &k);
    }
    let md = std::fs::read_to_string(d.join("summary.md")).unwrap();
    for e in Experiment::ALL {
        assert!(
            md.contains(&format!("## {}", e.name())),
            "{e} missing in summary.md"
        );
    }
    assert!(md.contains("Gibbs"));
}

/// A bad flag or value exits non-zero with a message naming it.
#[test]
fn binary_rejects_bad_input() {
    let out = difinfo()
        .args(["synth", "did-fit", "--no-such-flag"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--no-such-flag"), "{err}");

    let out = difinfo().args(["synth", "nope"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope"));

    let dir = tempfile::tempdir().unwrap();
    let out = difinfo()
        .args(["synth", "did-fit", "--tau", "1.5", "--out"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--tau") && err.contains("(0, 1)"), "{err}");
}
