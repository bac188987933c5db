//! `difinfo-train plan` and its library (`difinfo_trainer::plan`): the numbers pinned on the
//! fixture configs (tests/fixtures/plan/: Mistral-7B-v0.3 and Gemma2-9B as published, the
//! SmolLM2-135M shape of the calibration runs) and the command line's errors. No training
//! here: the calibration against measured peaks is in trainer/README.md ("Measurements").

use std::path::PathBuf;
use std::process::{Command, Output};

use candle_core::DType;
use difinfo_trainer::lora::LoraConfig;
use difinfo_trainer::plan::{
    model_flops, parse_memory, plan, Kernels, Plan, PlanModel, Setup, FUSED_TRANSIENT_LAYERS,
};
use difinfo_trainer::train::OptimizerKind;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/plan")
        .join(name)
}

fn mistral() -> PlanModel {
    PlanModel::read(&fixture("mistral-7b-v0.3.config.json")).unwrap()
}

fn gemma() -> PlanModel {
    PlanModel::read(&fixture("gemma2-9b.config.json")).unwrap()
}

fn smollm() -> PlanModel {
    PlanModel::read(&fixture("smollm2-135m.config.json")).unwrap()
}

/// The paper's setting: 8 GPUs, bf16 compute over f32 parameters, AdamW, one pair of 4096
/// tokens per device.
fn paper(world: usize, stage: usize) -> Setup {
    Setup {
        world_size: world,
        zero_stage: stage,
        param_dtype: DType::F32,
        compute_dtype: DType::BF16,
        cuda: true,
        optim: OptimizerKind::Adamw,
        lora: None,
        gradient_checkpointing: false,
        batch: 1,
        max_length: 4096,
        accumulation: 1,
    }
}

fn lora(r: usize, targets: &[&str]) -> LoraConfig {
    let t: Vec<String> = targets.iter().map(|s| s.to_string()).collect();
    LoraConfig::new(r, 2.0 * r as f64, 0.05, &t, false).unwrap()
}

fn line(p: &Plan, name: &str) -> u128 {
    p.memory
        .iter()
        .find(|i| i.name == name)
        .unwrap_or_else(|| panic!("no line {name}"))
        .bytes
}

#[test]
fn parameter_counts_are_the_published_ones() {
    // Mistral-7B-v0.3: 7.25 B (untied 32768-token embeddings); Gemma2-9B: 9.24 B (tied
    // 256000-token embeddings, 4 norms per layer); SmolLM2-135M: 134.5 M.
    assert_eq!(mistral().num_parameters(), 7_248_023_552);
    assert_eq!(gemma().num_parameters(), 9_241_705_984);
    assert_eq!(smollm().num_parameters(), 134_515_008);
    let g = gemma();
    assert_eq!(g.model_type, "gemma2");
    assert!(g.config.tie_word_embeddings);
    assert_eq!(g.config.head_dim, 256);
    assert!(g.softcap);
    // The count is ModelConfig's own, the four norms per layer included.
    assert_eq!(g.extra_norms, 2);
    assert_eq!(g.num_parameters(), g.config.num_parameters() as u128);
}

#[test]
fn full_training_terms_follow_the_trainer() {
    let m = mistral();
    let p = plan(&m, &paper(8, 0)).unwrap();
    let params = 7_248_023_552u128;
    assert_eq!(p.kernels, Kernels::Plain);
    // f32 parameters are the master copy: 4 bytes each, nothing more.
    assert_eq!(line(&p, "weights"), 4 * params);
    // Gradients in f32; AdamW's two f32 moments.
    assert_eq!(line(&p, "gradients"), 4 * params);
    assert_eq!(line(&p, "optimizer state"), 8 * params);
    assert_eq!(p.optimizer_bytes_unsharded, 8 * params);
    // bf16 copies of the embedding and every layer's weights, held by the graph.
    assert!(line(&p, "weight casts") < 2 * params);
    assert!(line(&p, "weight casts") > 2 * (params - 2 * 32768 * 4096));
    // A DPO micro-batch: chosen + rejected.
    assert_eq!(p.sequences_per_micro_batch, 2);
    assert_eq!(p.tokens_per_step, 2 * 4096);
    assert_eq!(p.global_tokens_per_step, 8 * 2 * 4096);
    // --dtype bf16 without --bf16: 2-byte weights, gradients and state still f32.
    let s = Setup {
        param_dtype: DType::BF16,
        ..paper(8, 0)
    };
    let q = plan(&m, &s).unwrap();
    assert_eq!(line(&q, "weights"), 2 * params);
    assert_eq!(line(&q, "weight casts"), 0);
    assert_eq!(line(&q, "gradients"), 4 * params);
    assert_eq!(line(&q, "optimizer state"), 8 * params);
}

#[test]
fn stage_one_share_is_at_most_an_even_share_plus_one_variable() {
    for m in [mistral(), gemma(), smollm()] {
        let largest = m
            .tensor_shapes()
            .iter()
            .map(|(_, s)| s.iter().product::<usize>() as u128)
            .max()
            .unwrap();
        for world in [1, 2, 3, 8] {
            let p0 = plan(&m, &paper(world, 0)).unwrap();
            let p1 = plan(&m, &paper(world, 1)).unwrap();
            let (o0, o1) = (line(&p0, "optimizer state"), line(&p1, "optimizer state"));
            assert!(
                o1 <= o0 / world as u128 + 8 * largest,
                "{world}: {o1} vs {o0}"
            );
            assert!(o1 >= o0 / world as u128, "{world}: {o1} vs {o0}");
            // Stage 1 shards the optimizer state only.
            for name in ["weights", "gradients", "activations"] {
                assert_eq!(line(&p0, name), line(&p1, name));
            }
            assert!(p1.peak_bytes <= p0.peak_bytes);
            if world == 1 {
                assert_eq!(o0, o1);
            }
        }
    }
}

#[test]
fn lora_gradient_and_optimizer_terms_are_small() {
    let m = mistral();
    let full = plan(&m, &paper(8, 0)).unwrap();
    let s = Setup {
        lora: Some(lora(16, &["q_proj", "k_proj", "v_proj", "o_proj"])),
        ..paper(8, 0)
    };
    let p = plan(&m, &s).unwrap();
    // r = 16 on q, k, v, o of 32 layers: A [16, 4096] on each; B [4096|1024, 16].
    let per_layer = 4 * 16 * 4096 + 16 * (4096 + 1024 + 1024 + 4096);
    assert_eq!(p.trainable_parameters, 32 * per_layer);
    assert_eq!(line(&p, "gradients"), 4 * 32 * per_layer);
    assert_eq!(line(&p, "optimizer state"), 8 * 32 * per_layer);
    assert!(line(&p, "gradients") * 500 < line(&full, "gradients"));
    assert!(line(&p, "optimizer state") * 500 < line(&full, "optimizer state"));
    // The frozen base is still held, plus the adapters in f32.
    assert_eq!(
        line(&p, "weights"),
        line(&full, "weights") + 4 * 32 * per_layer
    );
    // Frozen weights: forward and backward-to-input only.
    assert!(p.flops_per_step < full.flops_per_step);
    assert!(p.flops_per_step > 0.6 * full.flops_per_step);
}

#[test]
fn checkpointing_keeps_far_fewer_activations_and_costs_a_forward() {
    for m in [mistral(), gemma(), smollm()] {
        let mut plain_share = None;
        for cuda in [true, false] {
            let base = Setup {
                cuda,
                compute_dtype: if cuda { DType::BF16 } else { DType::F32 },
                ..paper(1, 0)
            };
            let p = plan(&m, &base).unwrap();
            let c = plan(
                &m,
                &Setup {
                    gradient_checkpointing: true,
                    ..base.clone()
                },
            )
            .unwrap();
            assert!(
                line(&c, "activations") * 5 < line(&p, "activations"),
                "{}",
                m.model_type
            );
            assert!(c.peak_bytes < p.peak_bytes);
            assert_eq!(p.recompute_flops_per_step, 0.0);
            // The plain path recomputes a forward pass (a third of a step's layer FLOPs);
            // the fused CPU layer keeps the MLP's inputs and recomputes the attention half:
            // its products, and the attention's (which approach a forward's at long lengths).
            let share = c.recompute_flops_per_step / c.flops_per_step;
            if cuda {
                assert!(share > 0.2 && share < 0.4, "{}: {share}", m.model_type);
            } else {
                let plain = plain_share.take().expect("the CPU plan comes second");
                if difinfo_trainer::plan::whole_layer(&m.config, Kernels::Fused) {
                    assert!(
                        share > 0.03 && share < plain,
                        "{}: {share} vs {plain}",
                        m.model_type
                    );
                } else {
                    // Gemma2 runs the separate kernels: a whole forward again.
                    assert_eq!(share, plain, "{}", m.model_type);
                }
            }
            plain_share = Some(share);
        }
    }
}

#[test]
fn flops_are_six_p_per_token_plus_attention() {
    let m = mistral();
    let p = plan(&m, &paper(8, 0)).unwrap();
    let tokens = 2.0 * 4096.0;
    let six_p = 6.0 * 7_248_023_552f64 * tokens;
    let attention = 3.0 * 2.0 * 4.0 * 32.0 * 4096f64.powi(2) * 4096.0;
    // The head counted at every position, the embedding's gather not at all: within 2 %.
    assert!(
        ((p.flops_per_step - six_p - attention) / six_p).abs() < 0.02,
        "{} vs {}",
        p.flops_per_step,
        six_p + attention
    );
    assert_eq!(p.global_flops_per_step, 8.0 * p.flops_per_step);
    assert_eq!(
        p.flops_per_step,
        model_flops(&m.config, 2, 4096, 4096, false)
    );
    // Accumulation multiplies the step.
    let k = plan(
        &m,
        &Setup {
            accumulation: 4,
            ..paper(8, 0)
        },
    )
    .unwrap();
    assert_eq!(k.flops_per_step, 4.0 * p.flops_per_step);
    assert_eq!(k.tokens_per_step, 4 * p.tokens_per_step);
}

#[test]
fn accumulation_holds_more_gradient_buffers() {
    let m = smollm();
    let s = Setup {
        cuda: false,
        compute_dtype: DType::F32,
        max_length: 128,
        ..paper(1, 0)
    };
    let one = plan(&m, &s).unwrap();
    let two = plan(
        &m,
        &Setup {
            accumulation: 2,
            ..s
        },
    )
    .unwrap();
    assert!(two.peak_bytes > one.peak_bytes);
    assert!(two.peak_bytes <= one.peak_bytes + 2 * line(&one, "gradients"));
}

#[test]
fn the_calibrated_cpu_peak_of_the_135m_shape() {
    // Pinned from the calibration (trainer/README.md, "Measurements"): the fused CPU path,
    // one pair of 512 tokens, f32, AdamW. Measured peak RSS 3349 MiB (bench), 14 MiB of it
    // the process baseline.
    assert_eq!(FUSED_TRANSIENT_LAYERS, 1.0);
    let s = Setup {
        cuda: false,
        compute_dtype: DType::F32,
        max_length: 512,
        ..paper(1, 0)
    };
    let p = plan(&smollm(), &s).unwrap();
    assert_eq!(p.kernels, Kernels::Fused);
    let mib = p.peak_bytes as f64 / 1048576.0 + 14.0;
    assert!((mib - 3349.0).abs() / 3349.0 < 0.05, "{mib}");
}

#[test]
fn bad_setups_are_errors_naming_the_option() {
    let m = smollm();
    for (s, want) in [
        (
            Setup {
                zero_stage: 2,
                ..paper(8, 0)
            },
            "supported: 0",
        ),
        (
            Setup {
                zero_stage: 3,
                ..paper(8, 0)
            },
            "--zero-stage 3",
        ),
        (
            Setup {
                world_size: 0,
                ..paper(8, 0)
            },
            "--world-size",
        ),
        (
            Setup {
                max_length: 0,
                ..paper(8, 0)
            },
            "--max-length",
        ),
        (
            Setup {
                batch: 0,
                ..paper(8, 0)
            },
            "--per-device-train-batch-size",
        ),
    ] {
        let e = plan(&m, &s).unwrap_err().to_string();
        assert!(e.contains(want), "{e}");
    }
    let e = plan(
        &m,
        &Setup {
            lora: Some(lora(1000, &["q_proj"])),
            ..paper(1, 0)
        },
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("lora_r"), "{e}");
}

#[test]
fn memory_sizes_parse_in_decimal_and_binary_units() {
    assert_eq!(parse_memory("80GB").unwrap(), 80_000_000_000);
    assert_eq!(parse_memory("80 gb").unwrap(), 80_000_000_000);
    assert_eq!(parse_memory("80GiB").unwrap(), 80 << 30);
    assert_eq!(parse_memory("1.5MiB").unwrap(), 3 << 19);
    assert_eq!(parse_memory("8e10").unwrap(), 80_000_000_000);
    assert_eq!(parse_memory("4096").unwrap(), 4096);
    for bad in [
        "", "GB", "80XB", "-1GB", "0", "nan", "inf", "80 G B", "1e40TB",
    ] {
        let e = parse_memory(bad).unwrap_err().to_string();
        assert!(e.contains("not a memory size"), "{bad}: {e}");
    }
}

#[test]
fn unsupported_model_types_are_named_with_the_supported_ones() {
    let e = PlanModel::from_json_str(
        r#"{"model_type": "phi3", "vocab_size": 10, "hidden_size": 8}"#,
        std::path::Path::new("c.json"),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("phi3") && e.contains("gemma2"), "{e}");
    assert!(!e.contains("plan only"), "{e}");
}

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_difinfo-train"))
        .arg("plan")
        .args(args)
        .output()
        .expect("run difinfo-train")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn cli_prints_the_table_and_says_whether_it_fits() {
    let cfg = fixture("mistral-7b-v0.3.config.json");
    let common = [
        "--model",
        cfg.to_str().unwrap(),
        "--world-size",
        "8",
        "--zero-stage",
        "1",
        "--bf16",
        "--device",
        "cuda",
        "--per-device-train-batch-size",
        "1",
        "--max-length",
        "4096",
    ];
    let o = run(&[&common[..], &["--device-memory", "80GB"]].concat());
    assert!(o.status.success(), "{}", text(&o));
    let t = text(&o);
    for want in [
        "weights",
        "gradients",
        "optimizer state",
        "activations",
        "total (peak)",
        "FLOPs per optimizer step",
        "does not fit in 80.0 GB",
        "chosen + rejected",
        "no separate f32 master",
    ] {
        assert!(t.contains(want), "missing {want}:\n{t}");
    }
    // LoRA on bf16 weights with checkpointing fits; exit 0 either way.
    let cfg = fixture("smollm2-135m.config.json");
    let o = run(&[
        "--model",
        cfg.to_str().unwrap(),
        "--per-device-train-batch-size",
        "1",
        "--max-length",
        "512",
        "--use-peft",
        "--gradient-checkpointing",
        "--device-memory",
        "80GB",
        "--json",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON");
    assert_eq!(v["fits"], serde_json::Value::Bool(true));
    assert_eq!(v["kernels"], "fused");
    assert!(v["memory"].as_array().unwrap().len() >= 5);
    assert!(v["peak_bytes"].as_u64().unwrap() > 500_000_000);
}

#[test]
fn cli_errors_are_clear_and_exit_non_zero() {
    let cfg = fixture("smollm2-135m.config.json");
    let c = cfg.to_str().unwrap();
    let missing = fixture("no-such-config.json");
    for (args, want) in [
        (vec!["--model", c, "--zero-stage", "2"], "--zero-stage 2"),
        (vec!["--model", c, "--zero-stage", "3"], "supported: 0"),
        (
            vec!["--model", missing.to_str().unwrap()],
            "no-such-config.json",
        ),
        (
            vec!["--model", c, "--device-memory", "80 parsecs"],
            "--device-memory",
        ),
        (vec!["--model", c, "--device", "tpu"], "unknown device"),
        (vec!["--model", c, "--max-length", "none"], "--max-length"),
        (vec!["--model", c, "--world-size", "0"], "--world-size"),
        (vec!["--model", c, "--lora-r", "8"], "--use-peft"),
    ] {
        let o = run(&args);
        assert!(!o.status.success(), "{args:?} succeeded");
        let t = text(&o);
        assert!(t.contains(want), "{args:?}: missing {want}:\n{t}");
        assert!(!t.contains("panicked"), "{t}");
    }
}

#[test]
fn gemma2_plans_as_a_trained_architecture() {
    let o = run(&[
        "--model",
        fixture("gemma2-9b.config.json").to_str().unwrap(),
        "--bf16",
        "--device",
        "cuda",
        "--per-device-train-batch-size",
        "1",
        "--max-length",
        "4096",
        "--use-peft",
        "--gradient-checkpointing",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let t = text(&o);
    assert!(!t.contains("does not train it yet"), "{t}");
    assert!(t.contains("9.242 B parameters"), "{t}");
}
