#!/usr/bin/env python3
"""Parity of `difinfo-train dpo` with TRL's `DPOTrainer` on the same checkpoint and data.

1. Tokenization: TRL prepares the dataset (its own `_prepare_dataset`: implicit prompt, EOS,
   chat template, shared completion boundary, `max_length`); every example's prompt_ids,
   chosen_ids and rejected_ids must equal those `difinfo-train logps` writes.
2. Training: both run the same steps with the whole dataset as one batch (so the data order
   does not matter): the loss types of `--loss-type` (comma-separated, with `--loss-weights`),
   β, label smoothing, the f-divergence, DiscoPOP's τ, AdamW, linear schedule, gradient
   clipping, and a separate reference model (`--ref-model`, TRL's `ref_model`; default: the
   policy's starting weights). The logged metrics of every step (TRL's names) are printed side
   by side with their differences.
   `--all-loss-types` repeats this for every loss type of TRL 1.x (with the label smoothing
   each needs: robust, aot, aot_unpaired 0.1; exo_pair 1e-3), a combination and the three
   other f-divergences, and ends with a summary table (step-1 loss and the largest relative
   difference over all steps and metrics).
   `--ld-alpha`, `--use-weighting`, `--sync-ref-model` (with `--ref-model-mixup-alpha`,
   `--ref-model-sync-steps`) add TRL's LD-DPO, WPO and TR-DPO options to the case;
   `--dpo-options` runs one case per option (LD-DPO α = 0.5, WPO, TR-DPO with a sync after
   every step, α = 0.6) after the plain sigmoid loss.

Not part of CI. Install: pip install torch transformers trl datasets
Usage:
  difinfo-train init --size tiny --out /tmp/tiny
  difinfo-train init --size tiny --out /tmp/tiny-ref --seed 2
  python trainer/scripts/check_trl_parity.py --model /tmp/tiny --ref-model /tmp/tiny-ref \
      --data data/example_prefs.jsonl --difinfo target/release/difinfo-train --all-loss-types
  python trainer/scripts/check_trl_parity.py --model /tmp/tiny --data data/example_prefs.jsonl \
      --difinfo target/release/difinfo-train --dpo-options
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

METRICS = [
    "loss",
    "grad_norm",
    "learning_rate",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
]

LOSS_TYPES = [
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
    "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
]

# The label smoothing each loss type is checked with (TRL refuses exo_pair at 0; robust and
# AOT are their sigmoid counterparts at 0).
SMOOTHING = {"robust": 0.1, "aot": 0.1, "aot_unpaired": 0.1, "exo_pair": 1e-3}


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def check_tokenization(args, trainer, tmp):
    ours_lp = os.path.join(tmp, "logps.jsonl")
    subprocess.run(
        [args.difinfo, "logps", "--model", args.model, "--data", args.data, "--out", ours_lp,
         "--max-length", str(args.max_length)],
        check=True, capture_output=True,
    )
    ours = read_jsonl(ours_lp)
    mismatched = 0
    for t, o in zip(trainer.train_dataset, ours):
        for k in ("prompt_ids", "chosen_ids", "rejected_ids"):
            if list(t[k]) != list(o[k]):
                mismatched += 1
                print(f"{args.data}:{o['line']}: {k} differ:\n  TRL     {list(t[k])}\n  difinfo {o[k]}",
                      file=sys.stderr)
    print(f"tokenization: {len(ours)} examples (TRL kept {len(trainer.train_dataset)}), "
          f"{mismatched} field(s) differ")
    return mismatched


def run_case(args, case, rows, tmp, first):
    """One loss configuration through TRL and difinfo; returns (step-1 losses, worst rel diff)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    n = len(rows)
    name = case["name"]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    ref = (AutoModelForCausalLM.from_pretrained(args.ref_model, dtype=torch.float32)
           if args.ref_model else None)
    tok = AutoTokenizer.from_pretrained(args.model)
    cfg = DPOConfig(
        output_dir=os.path.join(tmp, f"trl-{name}"),
        per_device_train_batch_size=n,
        gradient_accumulation_steps=1,
        max_steps=args.steps,
        learning_rate=args.learning_rate,
        lr_scheduler_type="linear",
        optim={"adamw": "adamw_torch"}.get(args.optim, args.optim),
        warmup_steps=0,
        max_grad_norm=1.0,
        weight_decay=0.0,
        beta=args.beta,
        loss_type=case["loss_type"],
        loss_weights=case.get("loss_weights"),
        label_smoothing=case.get("label_smoothing", 0.0),
        f_divergence_type=case.get("f_divergence_type", "reverse_kl"),
        f_alpha_divergence_coef=case.get("f_alpha_divergence_coef", 0.5),
        discopop_tau=args.discopop_tau,
        ld_alpha=case.get("ld_alpha"),
        use_weighting=case.get("use_weighting", False),
        sync_ref_model=case.get("sync_ref_model", False),
        ref_model_mixup_alpha=case.get("ref_model_mixup_alpha", 0.6),
        ref_model_sync_steps=case.get("ref_model_sync_steps", 512),
        max_length=args.max_length,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=42,
        use_cpu=True,
        bf16=False,
        dataloader_drop_last=False,
    )
    trainer = DPOTrainer(model=model, ref_model=ref, args=cfg,
                         train_dataset=Dataset.from_list(rows), processing_class=tok)
    mismatched = check_tokenization(args, trainer, tmp) if first else 0
    trainer.train()
    trl_logs = [h for h in trainer.state.log_history if "loss" in h and "step" in h]

    run = os.path.join(tmp, f"ours-{name}")
    cmd = [args.difinfo, "dpo", "--model", args.model, "--data", args.data, "--output-dir", run,
           "--per-device-train-batch-size", str(n), "--max-steps", str(args.steps),
           "--learning-rate", str(args.learning_rate), "--beta", str(args.beta),
           "--loss-type", ",".join(case["loss_type"]),
           "--label-smoothing", str(case.get("label_smoothing", 0.0)),
           "--f-divergence-type", case.get("f_divergence_type", "reverse_kl"),
           "--lr-scheduler-type", "linear", "--optim", args.optim,
           "--warmup-steps", "0", "--max-grad-norm", "1.0",
           "--logging-steps", "1", "--save-steps", "0", "--max-prompt-length", "0",
           "--max-length", str(args.max_length), "--overwrite-output-dir"]
    # Options the objective does not read are refused: give them only where they apply.
    if case.get("f_divergence_type") == "alpha_divergence":
        cmd += ["--f-alpha-divergence-coef", str(case.get("f_alpha_divergence_coef", 0.5))]
    if "discopop" in case["loss_type"]:
        cmd += ["--discopop-tau", str(args.discopop_tau)]
    if case.get("loss_weights"):
        cmd += ["--loss-weights", ",".join(str(w) for w in case["loss_weights"])]
    if args.ref_model:
        cmd += ["--ref-model", args.ref_model]
    if case.get("ld_alpha") is not None:
        cmd += ["--ld-alpha", str(case["ld_alpha"])]
    if case.get("use_weighting"):
        cmd += ["--use-weighting"]
    if case.get("sync_ref_model"):
        cmd += ["--sync-ref-model", "--precompute-ref-log-probs", "false",
                "--ref-model-mixup-alpha", str(case.get("ref_model_mixup_alpha", 0.6)),
                "--ref-model-sync-steps", str(case.get("ref_model_sync_steps", 512))]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"difinfo-train dpo failed ({name}):\n{done.stderr}")
    ours_logs = read_jsonl(os.path.join(run, "metrics.jsonl"))

    print(f"\n### {name}\n")
    print("| step | metric | difinfo | TRL | |Δ| |")
    print("|---:|---|---:|---:|---:|")
    worst = 0.0
    for o, t in zip(ours_logs, trl_logs):
        for k in METRICS:
            if k in o and k in t:
                d = abs(o[k] - t[k])
                rel = d / max(abs(t[k]), 1e-12)
                if k != "learning_rate":
                    worst = max(worst, rel)
                print(f"| {o['step']} | {k} | {o[k]:.6g} | {t[k]:.6g} | {d:.2e} |")
            else:
                print(f"| {o.get('step')} | {k} | {o.get(k)} | {t.get(k)} | missing |")
    return ours_logs[0]["loss"], trl_logs[0]["loss"], worst, mismatched


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--ref-model", default=None, help="TRL's ref_model [default: the policy]")
    ap.add_argument("--data", required=True)
    ap.add_argument("--difinfo", default="target/release/difinfo-train")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--learning-rate", type=float, default=1e-3)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--optim", default="adamw", choices=["adamw", "sgd", "rmsprop"],
                    help="HF's optim (adamw: adamw_torch)")
    ap.add_argument("--loss-type", default="sigmoid", help="comma-separated TRL loss types")
    ap.add_argument("--loss-weights", default=None, help="comma-separated weights")
    ap.add_argument("--label-smoothing", type=float, default=0.0)
    ap.add_argument("--f-divergence-type", default="reverse_kl",
                    choices=["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"])
    ap.add_argument("--f-alpha-divergence-coef", type=float, default=0.5)
    ap.add_argument("--discopop-tau", type=float, default=0.05)
    ap.add_argument("--all-loss-types", action="store_true")
    ap.add_argument("--ld-alpha", type=float, default=None, help="TRL's ld_alpha (LD-DPO)")
    ap.add_argument("--use-weighting", action="store_true", help="TRL's use_weighting (WPO)")
    ap.add_argument("--sync-ref-model", action="store_true", help="TRL's sync_ref_model (TR-DPO)")
    ap.add_argument("--ref-model-mixup-alpha", type=float, default=0.6)
    ap.add_argument("--ref-model-sync-steps", type=int, default=512)
    ap.add_argument("--dpo-options", action="store_true",
                    help="one case each: sigmoid, LD-DPO (α 0.5), WPO, TR-DPO (sync every step)")
    ap.add_argument("--max-length", type=int, default=1024)
    args = ap.parse_args()

    import torch
    import transformers
    import trl

    if args.all_loss_types:
        cases = [{"name": t, "loss_type": [t], "label_smoothing": SMOOTHING.get(t, 0.0)}
                 for t in LOSS_TYPES]
        cases.append({"name": "sigmoid+bco_pair+sft (0.8, 0.2, 1)",
                      "loss_type": ["sigmoid", "bco_pair", "sft"],
                      "loss_weights": [0.8, 0.2, 1.0]})
        for f in ["forward_kl", "js_divergence", "alpha_divergence"]:
            cases.append({"name": f"sigmoid+{f}", "loss_type": ["sigmoid"],
                          "f_divergence_type": f})
    elif args.dpo_options:
        cases = [
            {"name": "sigmoid", "loss_type": ["sigmoid"]},
            {"name": "ld_alpha=0.5", "loss_type": ["sigmoid"], "ld_alpha": 0.5},
            {"name": "ld_alpha=0.5 ipo+sft", "loss_type": ["ipo", "sft"], "ld_alpha": 0.5},
            {"name": "use_weighting", "loss_type": ["sigmoid"], "use_weighting": True},
            # Not with `sft`: TRL 1.16 multiplies its expanded per-sequence tensor in place
            # and fails ("more than one element of the written-to tensor refers to a single
            # memory location"); difinfo's value there is `sft · mean(w_w w_l)`.
            {"name": "use_weighting ipo", "loss_type": ["ipo"], "use_weighting": True},
            {"name": "sync_ref_model (α 0.6, every step)", "loss_type": ["sigmoid"],
             "sync_ref_model": True, "ref_model_mixup_alpha": 0.6, "ref_model_sync_steps": 1},
        ]
    else:
        weights = ([float(w) for w in args.loss_weights.split(",")]
                   if args.loss_weights else None)
        cases = [{"name": args.loss_type, "loss_type": args.loss_type.split(","),
                  "loss_weights": weights, "label_smoothing": args.label_smoothing,
                  "f_divergence_type": args.f_divergence_type,
                  "f_alpha_divergence_coef": args.f_alpha_divergence_coef,
                  "ld_alpha": args.ld_alpha, "use_weighting": args.use_weighting,
                  "sync_ref_model": args.sync_ref_model,
                  "ref_model_mixup_alpha": args.ref_model_mixup_alpha,
                  "ref_model_sync_steps": args.ref_model_sync_steps}]

    tmp = tempfile.mkdtemp(prefix="difinfo-trl-")
    rows = read_jsonl(args.data)
    print(f"transformers {transformers.__version__}, trl {trl.__version__}, torch {torch.__version__}; "
          f"{len(rows)} pairs per step, {args.steps} steps, β = {args.beta}, "
          f"reference {'= ' + args.ref_model if args.ref_model else 'the policy at step 0'}")
    results = []
    mismatched = 0
    for i, case in enumerate(cases):
        d, t, worst, mm = run_case(args, case, rows, tmp, i == 0)
        mismatched += mm
        results.append((case["name"], d, t, worst))

    print("\n## Summary\n")
    print("| loss | step-1 loss difinfo | step-1 loss TRL | rel. diff step 1 | worst rel. diff (all steps, metrics) |")
    print("|---|---:|---:|---:|---:|")
    for name, d, t, worst in results:
        print(f"| {name} | {d:.8g} | {t:.8g} | {abs(d - t) / max(abs(t), 1e-12):.2e} | {worst:.2e} |")
    if mismatched:
        sys.exit(1)


if __name__ == "__main__":
    main()
