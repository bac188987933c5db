#!/usr/bin/env python3
"""Parity of `difinfo-train dpo` with TRL's `DPOTrainer` on the same checkpoint and data.

1. Tokenization: TRL prepares the dataset (its own `_prepare_dataset`: implicit prompt, EOS,
   chat template, shared completion boundary, `max_length`); every example's prompt_ids,
   chosen_ids and rejected_ids must equal those `difinfo-train logps` writes.
2. Training: both run the same steps with the whole dataset as one batch (so the data order
   does not matter): DPO sigmoid loss, β, AdamW, linear schedule, gradient clipping. The logged
   metrics of every step (TRL's names) are printed side by side with their differences
   (`--loss-type sigmoid|hinge|ipo`).

Not part of CI. Install: pip install torch transformers trl datasets
Usage:
  difinfo-train init --size tiny --out /tmp/tiny
  python trainer/scripts/check_trl_parity.py --model /tmp/tiny --data data/example_prefs.jsonl \
      --difinfo target/release/difinfo-train
"""

import argparse
import json
import math
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


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--difinfo", default="target/release/difinfo-train")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--learning-rate", type=float, default=1e-3)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--loss-type", default="sigmoid", choices=["sigmoid", "hinge", "ipo"])
    ap.add_argument("--max-length", type=int, default=1024)
    args = ap.parse_args()

    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tmp = tempfile.mkdtemp(prefix="difinfo-trl-")
    rows = read_jsonl(args.data)
    n = len(rows)

    # 1. Tokenization.
    ours_lp = os.path.join(tmp, "logps.jsonl")
    subprocess.run(
        [args.difinfo, "logps", "--model", args.model, "--data", args.data, "--out", ours_lp,
         "--max-length", str(args.max_length)],
        check=True, capture_output=True,
    )
    ours = read_jsonl(ours_lp)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(args.model)
    cfg = DPOConfig(
        output_dir=os.path.join(tmp, "trl"),
        per_device_train_batch_size=n,
        gradient_accumulation_steps=1,
        max_steps=args.steps,
        learning_rate=args.learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=0,
        max_grad_norm=1.0,
        weight_decay=0.0,
        beta=args.beta,
        loss_type=args.loss_type,
        max_length=args.max_length,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=42,
        use_cpu=True,
        bf16=False,
        dataloader_drop_last=False,
    )
    trainer = DPOTrainer(
        model=model, args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tok
    )
    mismatched = 0
    for i, (t, o) in enumerate(zip(trainer.train_dataset, ours)):
        for k in ("prompt_ids", "chosen_ids", "rejected_ids"):
            if list(t[k]) != list(o[k]):
                mismatched += 1
                print(f"{args.data}:{o['line']}: {k} differ:\n  TRL     {list(t[k])}\n  difinfo {o[k]}",
                      file=sys.stderr)
    print(f"tokenization: {len(ours)} examples (TRL kept {len(trainer.train_dataset)}), "
          f"{mismatched} field(s) differ")

    # 2. Training.
    trainer.train()
    trl_logs = [h for h in trainer.state.log_history if "loss" in h and "step" in h]
    run = os.path.join(tmp, "ours")
    subprocess.run(
        [args.difinfo, "dpo", "--model", args.model, "--data", args.data, "--output-dir", run,
         "--per-device-train-batch-size", str(n), "--max-steps", str(args.steps),
         "--learning-rate", str(args.learning_rate), "--beta", str(args.beta),
         "--loss-type", args.loss_type,
         "--lr-scheduler-type", "linear", "--warmup-steps", "0", "--max-grad-norm", "1.0",
         "--logging-steps", "1", "--save-steps", "0", "--max-prompt-length", "0",
         "--max-length", str(args.max_length)],
        check=True, capture_output=True,
    )
    ours_logs = read_jsonl(os.path.join(run, "metrics.jsonl"))
    print(f"training: {args.loss_type}, transformers {transformers.__version__}, trl {trl.__version__}, "
          f"torch {torch.__version__}; {n} pairs per step, {args.steps} steps")
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
    print(f"largest relative difference (excluding learning_rate): {worst:.2e}")
    if mismatched:
        sys.exit(1)


if __name__ == "__main__":
    main()
