#!/usr/bin/env python3
"""Parity of `difinfo-train score` and `difinfo-train reward` with transformers and TRL.

1. Scores: a random `LlamaForSequenceClassification` (num_labels = 1) written by transformers
   over the tokenizer of BASE, once with the tokenizer's own pad token and once with EOS as
   the pad token (TRL's default when a tokenizer has none: every sequence then ends in the pad
   id, and the score is read at the token before it). TRL's `RewardTrainer` tokenizes the
   preference files (plain and conversational) and its collator pads them into one batch;
   transformers scores that batch. `difinfo-train score` scores the same files, and a
   `sample`-style file of the same texts, in batches of 3 (padding in every batch).
2. Training: three steps of `difinfo-train reward` against TRL's `RewardTrainer` from the
   same sequence classifier, the whole dataset as one batch: plain, with
   `center_rewards_coefficient`, with a `margin` column; every logged metric side by side.
3. The trained checkpoint loads in transformers as a sequence classifier, whose scores equal
   `difinfo-train score`'s.
`--pin` prints the float64 scores of the closed-form classifier that
trainer/tests/reward_scores.rs pins (no difinfo binary needed).

Not part of CI. Install: pip install torch transformers trl datasets
Usage:
  difinfo-train init --size tiny --out /tmp/tiny
  python trainer/scripts/check_reward_parity.py --base /tmp/tiny \
      --plain data/example_prefs.jsonl --chat data/example_prefs_chat.jsonl \
      --difinfo target/release/difinfo-train
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

METRICS = ["loss", "grad_norm", "learning_rate", "num_tokens", "min_reward", "mean_reward",
           "max_reward", "accuracy", "margin"]


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def rel(a, b):
    return abs(a - b) / max(abs(b), 1e-12)


def make_classifier(base, out, eos_pad):
    """A random one-label sequence classifier over BASE's config and tokenizer, saved to OUT."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    if eos_pad:
        tok.pad_token = tok.eos_token
    cfg = AutoConfig.from_pretrained(base)
    cfg.num_labels = 1
    cfg.pad_token_id = tok.pad_token_id
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        model.score.weight.normal_(0.0, 1.0)  # rewards of order 1, not 0.02
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return tok


def torch_dtype(args):
    import torch
    return {"float32": torch.float32, "float64": torch.float64}[args.dtype]


def ours_dtype(args):
    return ["--dtype", {"float32": "f32", "float64": "f64"}[args.dtype]]


def trl_scores(args, model_dir, rows, tmp):
    """TRL's tokenization and collation of `rows`, scored by transformers in one batch."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch_dtype(args))
    tok = AutoTokenizer.from_pretrained(model_dir)
    cfg = RewardConfig(output_dir=os.path.join(tmp, "trl-score"), report_to=[], use_cpu=True,
                       max_length=None)
    tr = RewardTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(rows),
                       processing_class=tok)
    feats = [{"chosen_ids": e["chosen_ids"], "rejected_ids": e["rejected_ids"]}
             for e in tr.train_dataset]
    batch = tr.data_collator(feats)
    model.eval()
    with torch.no_grad():
        s = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    s = s.squeeze(-1).tolist()
    n = len(feats)
    ends_in_pad = sum(f["chosen_ids"][-1] == tok.pad_token_id for f in feats)
    return s[:n], s[n:], ends_in_pad


def check_scores(args, tmp):
    worst = 0.0
    for eos_pad in (False, True):
        name = "pad = EOS" if eos_pad else "pad = <pad>"
        d = os.path.join(tmp, f"rm-{int(eos_pad)}")
        make_classifier(args.base, d, eos_pad)
        files = [("plain", args.plain)] + ([("chat", args.chat)] if args.chat else [])
        # A `sample`-style file of the plain texts: prompt, completion, line, sample.
        rows = read_jsonl(args.plain)
        samples = os.path.join(tmp, f"samples-{int(eos_pad)}.jsonl")
        write_jsonl(samples, [
            {"line": i + 1, "sample": k, "prompt": r["prompt"], "completion": r[side]}
            for i, r in enumerate(rows) for k, side in enumerate(("chosen", "rejected"))])
        out = os.path.join(tmp, f"scores-{int(eos_pad)}.jsonl")
        cmd = [args.difinfo, "score", "--reward-model", d, "--out", out, "--batch-size", "3",
               *ours_dtype(args)]
        for label, f in files:
            cmd += ["--data", f"{label}={f}"]
        cmd += ["--data", f"samples={samples}"]
        subprocess.run(cmd, check=True, capture_output=True)
        ours = read_jsonl(out)
        print(f"\n### scores, {name}\n")
        print("| file | texts | ending in the pad id | max rel. diff |")
        print("|---|---:|---:|---:|")
        for label, f in files:
            c, r, ends = trl_scores(args, d, read_jsonl(f), tmp)
            mine = {(o["line"], o["side"]): o["reward"] for o in ours if o["label"] == label}
            lines = sorted({o["line"] for o in ours if o["label"] == label})
            w = 0.0
            for i, line in enumerate(lines):
                w = max(w, rel(mine[(line, "chosen")], c[i]), rel(mine[(line, "rejected")], r[i]))
            worst = max(worst, w)
            print(f"| {label} | {2 * len(lines)} | {ends} chosen | {w:.2e} |")
        c, r, _ = trl_scores(args, d, rows, tmp)
        mine = sorted((o["line"], o["sample"], o["reward"]) for o in ours if o["label"] == "samples")
        w = max(rel(x[2], (c if x[1] == 0 else r)[x[0] - 1]) for x in mine)
        worst = max(worst, w)
        print(f"| samples (sample rows) | {len(mine)} | | {w:.2e} |")
    return worst, os.path.join(tmp, "rm-0")


def train_case(args, model_dir, rows, tmp, case):
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    name = case["name"]
    data = os.path.join(tmp, f"train-{name}.jsonl")
    write_jsonl(data, rows)
    n = len(rows)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch_dtype(args))
    tok = AutoTokenizer.from_pretrained(model_dir)
    cfg = RewardConfig(
        output_dir=os.path.join(tmp, f"trl-{name}"), per_device_train_batch_size=n,
        gradient_accumulation_steps=1, max_steps=args.steps, learning_rate=args.learning_rate,
        lr_scheduler_type="linear", optim="adamw_torch", warmup_steps=0, max_grad_norm=1.0,
        weight_decay=0.0, logging_steps=1, save_strategy="no", report_to=[], seed=42,
        use_cpu=True, bf16=False, dataloader_drop_last=False, max_length=1024,
        center_rewards_coefficient=case.get("center"))
    tr = RewardTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(rows),
                       processing_class=tok)
    tr.train()
    trl_logs = [h for h in tr.state.log_history if "loss" in h and "step" in h]

    run = os.path.join(tmp, f"ours-{name}")
    cmd = [args.difinfo, "reward", "--model", model_dir, "--data", data, "--output-dir", run,
           "--per-device-train-batch-size", str(n), "--max-steps", str(args.steps),
           "--learning-rate", str(args.learning_rate), "--lr-scheduler-type", "linear",
           "--optim", "adamw", "--warmup-steps", "0", "--max-grad-norm", "1.0",
           "--weight-decay", "0", "--logging-steps", "1", "--save-steps", "0",
           "--max-length", "1024", "--overwrite-output-dir", *ours_dtype(args)]
    if case.get("center") is not None:
        cmd += ["--center-rewards-coefficient", str(case["center"])]
    subprocess.run(cmd, check=True, capture_output=True)
    ours_logs = read_jsonl(os.path.join(run, "metrics.jsonl"))
    print(f"\n### reward: {name}\n")
    print("| step | metric | difinfo | TRL | rel. diff |")
    print("|---:|---|---:|---:|---:|")
    worst = 0.0
    for o, t in zip(ours_logs, trl_logs):
        for k in METRICS:
            if k in o and k in t:
                r = rel(o[k], t[k])
                if k not in ("learning_rate", "grad_norm"):
                    worst = max(worst, r)
                print(f"| {o['step']} | {k} | {o[k]:.8g} | {t[k]:.8g} | {r:.1e} |")
            else:
                print(f"| {o.get('step')} | {k} | {o.get(k)} | {t.get(k)} | missing |")
    return worst, run, data


def check_checkpoint(args, run, data, tmp):
    """The run's final checkpoint in transformers against `difinfo-train score` on it."""
    import glob
    ck = sorted(glob.glob(os.path.join(run, "checkpoint-*")),
                key=lambda p: int(p.rsplit("-", 1)[1]))[-1]
    out = os.path.join(tmp, "ck-scores.jsonl")
    subprocess.run([args.difinfo, "score", "--reward-model", ck, "--data", data, "--out", out,
                    *ours_dtype(args)], check=True, capture_output=True)
    ours = read_jsonl(out)
    c, r, _ = trl_scores(args, ck, read_jsonl(data), tmp)
    w = max(max(rel(o["reward"], (c if o["side"] == "chosen" else r)[i // 2])
                for i, o in enumerate(ours)), 0.0)
    print(f"\ncheckpoint {ck} in transformers vs difinfo score: max rel. diff {w:.2e}")
    return w


def pin():
    """Float64 scores of the closed-form classifier of trainer/tests/reward_scores.rs."""
    import numpy as np
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    cfg = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=12, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=4,
                      rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
                      num_labels=1, pad_token_id=3, max_position_embeddings=64)
    model = LlamaForSequenceClassification(cfg).to(torch.float64)
    names = sorted(n for n, _ in model.named_parameters() if n != "score.weight")
    sd = {}
    for k, name in enumerate(names + ["score.weight"]):
        shape = dict(model.named_parameters())[name].shape
        i = np.arange(int(np.prod(shape)), dtype=np.float64)
        base = 1.0 if name.endswith("norm.weight") else 0.0
        sd[name] = torch.tensor((base + 0.5 * np.sin(1.7 * i + 0.37 * k)).reshape(shape))
    model.load_state_dict(sd, strict=True)
    model.eval()
    ids = torch.tensor([[1, 5, 9, 2, 14, 3, 3, 7], [0, 15, 4, 3, 3, 3, 3, 3],
                        [6, 3, 8, 11, 3, 3, 3, 3]])
    mask = torch.tensor([[1] * 8, [1, 1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0, 0]])
    with torch.no_grad():
        s = model(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
    print("tensor order:", names + ["score.weight"])
    print("scores (transformers as is: RoPE's cos/sin and RMSNorm in float32):",
          [repr(float(x)) for x in s])

    # The same with cos and sin of the float32 angles taken in float64 and RMSNorm in float64
    # (transformers computes both in float32 whatever the model's dtype), as difinfo does: the
    # numbers trainer/tests/reward_scores.rs pins to 1e-9.
    from transformers.models.llama import modeling_llama as ml

    def rope64(self, x, position_ids):
        inv = self.inv_freq[None, :, None].float().expand(position_ids.shape[0], -1, 1)
        freqs = (inv @ position_ids[:, None, :].float()).transpose(1, 2)
        emb = torch.cat((freqs, freqs), dim=-1).double()
        return (emb.cos() * self.attention_scaling).to(x.dtype), \
            (emb.sin() * self.attention_scaling).to(x.dtype)

    def rms64(self, x):
        v = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(v + self.variance_epsilon))

    ml.LlamaRotaryEmbedding.forward = rope64
    ml.LlamaRMSNorm.forward = rms64
    with torch.no_grad():
        s = model(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
    print("scores (RoPE trig and RMSNorm in float64):", [repr(float(x)) for x in s])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", help="a causal LM checkpoint with a tokenizer (difinfo-train init)")
    ap.add_argument("--plain", default="data/example_prefs.jsonl")
    ap.add_argument("--chat", default="data/example_prefs_chat.jsonl")
    ap.add_argument("--difinfo", default="target/release/difinfo-train")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--learning-rate", type=float, default=1e-3)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"],
                    help="both sides compute in this dtype (float64: the semantics without "
                         "float32 rounding)")
    ap.add_argument("--tol", type=float, default=1e-5, help="the largest relative difference passed")
    ap.add_argument("--pin", action="store_true")
    args = ap.parse_args()
    if args.pin:
        return pin()

    import torch
    import transformers
    import trl
    print(f"transformers {transformers.__version__}, trl {trl.__version__}, torch {torch.__version__}, "
          f"{args.dtype}, learning rate {args.learning_rate}")
    tmp = tempfile.mkdtemp(prefix="difinfo-reward-")
    worst_scores, rm = check_scores(args, tmp)
    rows = read_jsonl(args.plain)
    margins = [dict(r, margin=0.25 * (i % 3)) for i, r in enumerate(rows)]
    cases = [({"name": "plain"}, rows), ({"name": "center-0.01", "center": 0.01}, rows),
             ({"name": "margin"}, margins)]
    results = []
    run = data = None
    for case, rs in cases:
        w, run_dir, d = train_case(args, rm, rs, tmp, case)
        results.append((case["name"], w))
        if case["name"] == "plain":
            run, data = run_dir, d
    worst_ck = check_checkpoint(args, run, data, tmp)
    print("\n## Summary\n")
    print(f"scores vs transformers + TRL tokenization: max rel. diff {worst_scores:.2e}")
    for name, w in results:
        print(f"reward {name}: max rel. diff over {args.steps} steps (loss, rewards, accuracy, "
              f"margin, num_tokens) {w:.2e}")
    print(f"trained checkpoint in transformers: max rel. diff {worst_ck:.2e}")
    shutil.rmtree(tmp, ignore_errors=True)
    bad = worst_scores > args.tol or worst_ck > args.tol or any(w > args.tol for _, w in results)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
