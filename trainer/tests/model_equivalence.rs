//! Equivalences the forward passes must satisfy: padding does not change log-probs, the KV
//! cache reproduces the full forward, temperature → 0 sampling is greedy decoding.

mod common;

use candle_core::{DType, IndexOp, Tensor};
use difinfo_trainer::batch::{Batch, Sequence};
use difinfo_trainer::config_json::Architecture;
use difinfo_trainer::generate::{argmax, generate, log_softmax_at, SamplingParams};
use difinfo_trainer::logps::sequence_logps;
use difinfo_trainer::model::{KvCache, Model};
use rand::SeedableRng;

/// f32 forward passes over different batch shapes accumulate in different orders; sums of
/// ~20 token log-probs of magnitude ~6 agree to this absolute tolerance.
const F32_TOL: f64 = 2e-4;

fn seqs() -> Vec<Sequence> {
    vec![
        Sequence {
            ids: vec![0, 17, 99, 3, 250, 41, 8, 77, 12, 5, 300, 1],
            completion_start: 4,
        },
        Sequence {
            ids: vec![0, 5, 6],
            completion_start: 1,
        },
        Sequence {
            ids: vec![0, 9, 200, 201, 202, 14, 15],
            completion_start: 3,
        },
        Sequence {
            ids: (0..20).map(|i| (i * 13 % 310) as u32).collect(),
            completion_start: 10,
        },
    ]
}

fn padded_equals_single(arch: Architecture) {
    let (_d, m) = common::model(common::micro_config(arch), DType::F32, 1);
    let s = seqs();
    let batched = sequence_logps(&m, &s, 2).unwrap();
    for (i, seq) in s.iter().enumerate() {
        let alone = sequence_logps(&m, std::slice::from_ref(seq), 2).unwrap()[0];
        assert!(
            (alone - batched[i]).abs() < F32_TOL,
            "{arch:?} row {i}: alone {alone} vs batched {}",
            batched[i]
        );
    }
    // Padding with a different id changes nothing either.
    let other_pad = sequence_logps(&m, &s, 300).unwrap();
    for i in 0..s.len() {
        assert!((other_pad[i] - batched[i]).abs() < F32_TOL);
    }
}

#[test]
fn padded_batch_logps_equal_per_example_llama() {
    padded_equals_single(Architecture::Llama);
}

#[test]
fn padded_batch_logps_equal_per_example_mistral_window() {
    padded_equals_single(Architecture::Mistral);
}

#[test]
fn padded_batch_logps_equal_per_example_qwen2() {
    padded_equals_single(Architecture::Qwen2);
}

#[test]
fn padded_batch_logps_equal_per_example_qwen3_gemma2() {
    padded_equals_single(Architecture::Qwen3);
    padded_equals_single(Architecture::Gemma2);
}

#[test]
fn sequence_logp_is_sum_of_masked_token_logps() {
    let (_d, m) = common::model(common::micro_config(Architecture::Llama), DType::F64, 2);
    let s = &seqs()[0];
    let ids = Tensor::new(s.ids.as_slice(), m.device())
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let tok: Vec<f64> = m
        .token_logps(&ids, None)
        .unwrap()
        .i(0)
        .unwrap()
        .to_vec1()
        .unwrap();
    let expect: f64 = tok[s.completion_start - 1..].iter().sum();
    let got = sequence_logps(&m, std::slice::from_ref(s), 2).unwrap()[0];
    assert!((expect - got).abs() < 1e-10, "{expect} vs {got}");
    // Token log-probs are log-probabilities: the logits' log-softmax sums to one.
    let logits = m.logits(&ids, None).unwrap();
    let row: Vec<f64> = logits.i((0, 3)).unwrap().to_vec1().unwrap();
    let total: f64 = row.iter().map(|z| z.exp()).sum::<f64>();
    let lse = total.ln();
    let p: f64 = row.iter().map(|z| (z - lse).exp()).sum();
    assert!((p - 1.0).abs() < 1e-12);
}

fn cache_matches_full(arch: Architecture, dtype: DType, tol: f64) {
    let (_d, m) = common::model(common::micro_config(arch), dtype, 3);
    let ids: Vec<u32> = vec![0, 44, 120, 7, 7, 301, 19, 88, 250, 3, 61, 2, 140];
    let t = Tensor::new(ids.as_slice(), m.device())
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let full: Vec<f64> = m
        .token_logps(&t, None)
        .unwrap()
        .i(0)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap();
    let mut cache = KvCache::new();
    let prefill = 4;
    let mut inc = Vec::new();
    let logits = m
        .forward_with_cache(&t.narrow(1, 0, prefill).unwrap(), &mut cache)
        .unwrap();
    for p in 0..prefill {
        let row: Vec<f32> = logits
            .i((0, p))
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1()
            .unwrap();
        inc.push(log_softmax_at(&row, ids[p + 1] as usize));
    }
    for p in prefill..ids.len() - 1 {
        let logits = m
            .forward_with_cache(&t.narrow(1, p, 1).unwrap(), &mut cache)
            .unwrap();
        let row: Vec<f32> = logits
            .i((0, 0))
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1()
            .unwrap();
        inc.push(log_softmax_at(&row, ids[p + 1] as usize));
    }
    assert_eq!(cache.len(), ids.len() - 1);
    for (i, (a, b)) in full.iter().zip(&inc).enumerate() {
        assert!(
            (a - b).abs() < tol,
            "{arch:?} position {i}: full {a} vs cached {b}"
        );
    }
}

#[test]
fn kv_cache_next_token_logps_equal_full_forward() {
    cache_matches_full(Architecture::Llama, DType::F32, 1e-4);
    // Mistral's window (5) is shorter than the sequence: both paths must apply it.
    cache_matches_full(Architecture::Mistral, DType::F32, 1e-4);
    // f64 model; the comparison rounds logits to f32 (log_softmax_at takes f32).
    cache_matches_full(Architecture::Qwen2, DType::F64, 1e-6);
    // Windows (5) on one layer of two, soft-caps, q/k norms.
    cache_matches_full(Architecture::Qwen3, DType::F32, 1e-4);
    cache_matches_full(Architecture::Gemma2, DType::F32, 1e-4);
}

/// The logits of a batch of three sequences decoded through the KV cache (a 4-token prefill,
/// then one token per step: the few-row products and the attention over the cache read in
/// place) against the full forward's, in the model's accumulation dtype; and the same decode
/// on the plain candle ops (fused kernels off) against the fused one.
fn batched_cache_matches_full(arch: Architecture, dtype: DType, tol: f64) {
    let (_d, mut m) = common::model(common::micro_config(arch), dtype, 3);
    let rows: [Vec<u32>; 3] = [
        vec![0, 44, 120, 7, 7, 301, 19, 88, 250, 3, 61, 2, 140],
        vec![0, 5, 6, 9, 200, 201, 202, 14, 15, 17, 99, 3, 250],
        (0..13).map(|i| (i * 37 % 310) as u32).collect(),
    ];
    let flat: Vec<u32> = rows.concat();
    let t = Tensor::from_vec(flat, (3, 13), m.device()).unwrap();
    let as_f64 = |x: &Tensor| -> Vec<f64> {
        x.to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let full = m.logits(&t, None).unwrap(); // [3, 13, V]
    let decode = |m: &Model| -> Vec<Tensor> {
        let mut cache = KvCache::new();
        let mut out = vec![m
            .forward_with_cache(&t.narrow(1, 0, 4).unwrap(), &mut cache)
            .unwrap()];
        for p in 4..13 {
            out.push(
                m.forward_with_cache(&t.narrow(1, p, 1).unwrap(), &mut cache)
                    .unwrap(),
            );
        }
        assert_eq!(cache.len(), 13);
        out
    };
    let fused = decode(&m);
    m.set_fused_kernels(false);
    let plain = decode(&m);
    let cached = Tensor::cat(&fused, 1).unwrap();
    let worst = |a: &[f64], b: &[f64]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f64, f64::max)
    };
    let (f, c) = (as_f64(&full), as_f64(&cached));
    assert_eq!(f.len(), c.len());
    let d = worst(&f, &c);
    assert!(
        d < tol,
        "{arch:?} {dtype:?}: full vs cached logits differ by {d}"
    );
    let d = worst(&c, &as_f64(&Tensor::cat(&plain, 1).unwrap()));
    assert!(
        d < tol,
        "{arch:?} {dtype:?}: fused vs plain cached logits differ by {d}"
    );
}

#[test]
fn batched_kv_cache_logits_equal_full_forward() {
    for arch in [
        Architecture::Llama,
        // Biases, tied embeddings.
        Architecture::Qwen2,
        // Window (5) shorter than the sequence.
        Architecture::Mistral,
        // q/k norms, a window on one layer of two.
        Architecture::Qwen3,
        // Soft-caps, windows, (1 + w) norms, GeGLU.
        Architecture::Gemma2,
    ] {
        batched_cache_matches_full(arch, DType::F32, 1e-4);
        batched_cache_matches_full(arch, DType::F64, 1e-10);
    }
}

#[test]
fn temperature_to_zero_equals_greedy() {
    let (_d, m) = common::model(common::micro_config(Architecture::Llama), DType::F32, 4);
    let prompt = [0u32, 17, 99, 3];
    let greedy_params = SamplingParams {
        temperature: 0.0,
        top_p: 1.0,
        max_new_tokens: 12,
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let greedy = generate(&m, &prompt, 1, &greedy_params, &[], &mut rng)
        .unwrap()
        .remove(0);
    // Reference greedy decoding without the cache: argmax of the full forward each step.
    let mut ids = prompt.to_vec();
    for _ in 0..12 {
        let t = Tensor::new(ids.as_slice(), m.device())
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logits = m.logits(&t, None).unwrap();
        let row: Vec<f32> = logits.i((0, ids.len() - 1)).unwrap().to_vec1().unwrap();
        ids.push(argmax(&row));
    }
    assert_eq!(greedy.completion_ids, ids[prompt.len()..].to_vec());
    for seed in 0..3 {
        let cold = SamplingParams {
            temperature: 1e-6,
            top_p: 1.0,
            max_new_tokens: 12,
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let samples = generate(&m, &prompt, 3, &cold, &[], &mut rng).unwrap();
        for s in samples {
            assert_eq!(s.completion_ids, greedy.completion_ids);
            assert!((s.logp - greedy.logp).abs() < 1e-3);
        }
    }
}

#[test]
fn sampling_is_seeded_and_stops_at_stop_tokens() {
    let (_d, m) = common::model(common::micro_config(Architecture::Llama), DType::F32, 5);
    let params = SamplingParams {
        temperature: 1.0,
        top_p: 0.9,
        max_new_tokens: 20,
    };
    let run = |seed| {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        generate(&m, &[0, 5, 6], 4, &params, &[], &mut rng).unwrap()
    };
    assert_eq!(run(7), run(7));
    let samples = run(7);
    // Make the first token of sample 0 a stop token: sample 0 must end right there.
    let stop = samples[0].completion_ids[0];
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let stopped = generate(&m, &[0, 5, 6], 4, &params, &[stop], &mut rng).unwrap();
    assert_eq!(stopped[0].completion_ids, vec![stop]);
    assert!(stopped[0].finished);
    // logp is the model's log-probability of the sampled tokens.
    let seq = Sequence {
        ids: [vec![0, 5, 6], samples[1].completion_ids.clone()].concat(),
        completion_start: 3,
    };
    let lp = sequence_logps(&m, &[seq], 2).unwrap()[0];
    assert!(
        (lp - samples[1].logp).abs() < 1e-3,
        "{lp} vs {}",
        samples[1].logp
    );
}

#[test]
fn bf16_logps_track_f32() {
    let cfg = common::micro_config(Architecture::Llama);
    let (dir, m32) = common::model(cfg, DType::F32, 6);
    let m16 = difinfo_trainer::pretrained::load_model(dir.path(), DType::BF16, &common::device())
        .unwrap();
    assert_eq!(m16.dtype(), DType::BF16);
    let s = seqs();
    let a = sequence_logps(&m32, &s, 2).unwrap();
    let b = sequence_logps(&m16, &s, 2).unwrap();
    for (x, y) in a.iter().zip(&b) {
        // bf16 keeps 8 bits of mantissa: a relative error of a few percent on a sum.
        assert!((x - y).abs() < 0.05 * x.abs() + 0.5, "f32 {x} vs bf16 {y}");
    }
}

#[test]
fn batch_masks_follow_completion_start() {
    let s = vec![
        Sequence {
            ids: vec![1, 2, 3, 4],
            completion_start: 2,
        },
        Sequence {
            ids: vec![1, 2],
            completion_start: 0,
        },
    ];
    let b = Batch::from_sequences(&s, 9, &common::device()).unwrap();
    assert_eq!(
        b.input_ids.to_vec2::<u32>().unwrap(),
        vec![vec![1, 2, 3, 4], vec![1, 2, 9, 9]]
    );
    assert_eq!(
        b.attention_mask.to_vec2::<u32>().unwrap(),
        vec![vec![1, 1, 1, 1], vec![1, 1, 0, 0]]
    );
    assert_eq!(
        b.loss_mask.to_vec2::<f32>().unwrap(),
        vec![vec![0.0, 1.0, 1.0], vec![1.0, 0.0, 0.0]]
    );
    let _ = Model::num_parameters;
}
