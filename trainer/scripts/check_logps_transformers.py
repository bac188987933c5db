#!/usr/bin/env python3
"""Cross-check `difinfo-train logps` against Hugging Face transformers.

For every row of the JSONL that `difinfo-train logps` writes (prompt_ids, chosen_ids,
rejected_ids, chosen_logps, rejected_logps), recompute the summed completion log-probabilities
with `AutoModelForCausalLM` from the same checkpoint directory (f32, CPU, eager attention):

    log π(y | x) = Σ_{t ≥ |x|} log softmax(logits_{t-1})[ids_t]

and print the largest absolute and relative differences. Exit status 1 if any difference
exceeds --atol + --rtol · |value|.

Not part of CI (PyTorch is not a dependency). Install: pip install torch transformers safetensors
Usage:
  difinfo-train init --size tiny --out /tmp/tiny [--arch llama|mistral|qwen2]
  difinfo-train logps --model /tmp/tiny --data data/example_prefs.jsonl --out /tmp/lp.jsonl
  python trainer/scripts/check_logps_transformers.py --model /tmp/tiny --logps /tmp/lp.jsonl
"""

import argparse
import json
import sys


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="checkpoint directory")
    ap.add_argument("--logps", required=True, help="output of `difinfo-train logps`")
    ap.add_argument("--atol", type=float, default=1e-3)
    ap.add_argument("--rtol", type=float, default=1e-5)
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    torch.set_grad_enabled(False)
    model = AutoModelForCausalLM.from_pretrained(
        args.model, dtype=torch.float32, attn_implementation="eager"
    )
    model.eval()

    def completion_logp(prompt_ids, completion_ids):
        ids = torch.tensor([prompt_ids + completion_ids])
        logits = model(input_ids=ids).logits[0].double()
        lp = torch.log_softmax(logits, dim=-1)
        start = len(prompt_ids)
        targets = ids[0, start:]
        return lp[start - 1 : ids.shape[1] - 1].gather(1, targets[:, None]).sum().item()

    worst_abs, worst_rel, bad, n = 0.0, 0.0, 0, 0
    with open(args.logps) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            for side in ("chosen", "rejected"):
                ours = row[f"{side}_logps"]
                theirs = completion_logp(row["prompt_ids"], row[f"{side}_ids"])
                d = abs(ours - theirs)
                worst_abs = max(worst_abs, d)
                worst_rel = max(worst_rel, d / max(abs(theirs), 1e-30))
                n += 1
                if d > args.atol + args.rtol * abs(theirs):
                    bad += 1
                    print(
                        f"{args.logps}:{line_no}: {side}: difinfo {ours:.6f} vs transformers {theirs:.6f}",
                        file=sys.stderr,
                    )
    import transformers

    print(
        f"{n} completion log-probs of {args.model} ({model.config.model_type}, "
        f"transformers {transformers.__version__}, torch {torch.__version__}): "
        f"max |Δ| {worst_abs:.3e}, max relative {worst_rel:.3e}, {bad} over tolerance"
    )
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
