#!/usr/bin/env python3
"""Cross-check greedy `difinfo-train sample` (KV-cache decoding) against Hugging Face transformers.

For every row of the JSONL that `difinfo-train sample --temperature 0` writes (prompt_ids,
completion_ids, logp, finished), run transformers' greedy `generate` from the same prompt ids
(f32, CPU, its default attention and DynamicCache) for as many new tokens, and check that

- the generated token ids are the same (a stop token ends both), and
- `logp`, the summed log-probability of the completion under the model,
  `Σ_t log softmax(logits_{t-1})[ids_t]`, agrees with transformers' teacher-forced value to
  --atol + --rtol · |value| (per token: the largest per-row difference divided by its length).

Prints the number of rows whose tokens agree and the largest differences; exit status 1 when a
token or a log-probability disagrees.

Not part of CI (PyTorch is not a dependency). Install: pip install torch transformers safetensors
Usage:
  difinfo-train sample --model DIR --prompts data/example_prompts.jsonl --n 4 --temperature 0 \\
      --max-new-tokens 48 --out /tmp/greedy.jsonl
  python trainer/scripts/check_generate_transformers.py --model DIR --samples /tmp/greedy.jsonl
"""

import argparse
import json
import sys


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="checkpoint directory")
    ap.add_argument("--samples", required=True, help="output of `difinfo-train sample --temperature 0`")
    ap.add_argument("--atol", type=float, default=1e-3)
    ap.add_argument("--rtol", type=float, default=1e-5)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.eval()

    rows = [json.loads(line) for line in open(args.samples) if line.strip()]
    same, worst_abs, worst_tok, bad = 0, 0.0, 0.0, 0
    cache = {}
    for k, r in enumerate(rows):
        prompt, completion = r["prompt_ids"], r["completion_ids"]
        key = (tuple(prompt), len(completion))
        if key not in cache:
            ids = torch.tensor([prompt])
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=len(completion),
                pad_token_id=0,
            )
            cache[key] = out[0, len(prompt):].tolist()
        theirs = cache[key]
        if r.get("finished"):
            theirs = theirs[: len(completion)]
        ids = torch.tensor([prompt + completion])
        logits = model(input_ids=ids).logits[0].double()
        lp = torch.log_softmax(logits, -1)
        tgt = torch.tensor(completion)
        ref = lp[len(prompt) - 1 : len(prompt) - 1 + len(completion)].gather(-1, tgt[:, None]).sum().item()
        d = abs(ref - r["logp"])
        worst_abs = max(worst_abs, d)
        worst_tok = max(worst_tok, d / max(1, len(completion)))
        ok_tokens = theirs == completion
        same += ok_tokens
        if not ok_tokens:
            print(f"row {k}: difinfo {completion} vs transformers {theirs}", file=sys.stderr)
            bad += 1
        if d > args.atol + args.rtol * abs(ref):
            print(f"row {k}: logp difinfo {r['logp']} vs transformers {ref}", file=sys.stderr)
            bad += 1
    print(
        f"{same}/{len(rows)} rows with the same greedy tokens; |Δ logp| max {worst_abs:.3g} "
        f"(per token {worst_tok:.3g})"
    )
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
