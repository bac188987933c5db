#!/usr/bin/env python3
"""Cross-check the Qwen3 and Gemma2 decoders against Hugging Face transformers.

Three subcommands:

  write   a tiny random checkpoint written by transformers itself (Qwen3Config / Gemma2Config:
          hidden 64, 2 layers, 4 heads over 2 key/value heads, head_dim 32 ≠ 64 / 4, a sliding
          window of 8 positions on one layer, Gemma2's soft-caps set), its norm weights drawn
          at random too, with the tokenizer files of a `difinfo-train init` directory;
  greedy  compares `difinfo-train sample --temperature 0 --n 1` rows with
          `generate(do_sample=False)` token for token;
  pin     prints the float64 reference values of trainer/tests/arch_reference.rs: per-token
          log-probs and, for every parameter tensor, two projections of the gradient of the
          summed log-prob (Σ g and Σ g_i cos(0.7 i + 0.2)), on closed-form weights
          `base + 0.5 sin(1.7 i + 0.37 k)` (k the tensor's index in name order; base 1 for
          Qwen3's norms, 0 for Gemma2's (1 + w) norms and every other tensor), no padding_idx
          (PyTorch's embedding leaves that row without gradient; no token of a trained
          sequence is padding).

Log-probs of a written checkpoint are compared by check_logps_transformers.py.
Not part of CI (PyTorch is not a dependency). Install: pip install torch transformers safetensors
Usage:
  difinfo-train init --size tiny --out /tmp/tok
  python trainer/scripts/check_arch_transformers.py write --arch gemma2 --tokenizer /tmp/tok --out /tmp/g2
  difinfo-train logps --model /tmp/g2 --data data/example_prefs.jsonl --out /tmp/lp.jsonl
  python trainer/scripts/check_logps_transformers.py --model /tmp/g2 --logps /tmp/lp.jsonl
  difinfo-train sample --model /tmp/g2 --prompts data/example_prompts.jsonl --n 1 \\
      --temperature 0 --max-new-tokens 24 --out /tmp/s.jsonl
  python trainer/scripts/check_arch_transformers.py greedy --model /tmp/g2 --samples /tmp/s.jsonl
  python trainer/scripts/check_arch_transformers.py pin
"""

import argparse
import json
import math
import shutil
import sys
from pathlib import Path


def tiny_config(arch, vocab, bos, eos):
    from transformers import Gemma2Config, Qwen3Config

    common = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=None,
    )
    if arch == "qwen3":
        return Qwen3Config(
            **common,
            tie_word_embeddings=False,
            use_sliding_window=True,
            sliding_window=8,
            max_window_layers=1,
        )
    return Gemma2Config(
        **common,
        tie_word_embeddings=True,
        query_pre_attn_scalar=24,
        attn_logit_softcapping=5.0,
        final_logit_softcapping=3.0,
        sliding_window=8,
    )


def write(args):
    import torch
    from transformers import AutoModelForCausalLM

    tok = Path(args.tokenizer)
    init_cfg = json.loads((tok / "config.json").read_text())
    cfg = tiny_config(
        args.arch, init_cfg["vocab_size"], init_cfg.get("bos_token_id"), init_cfg.get("eos_token_id")
    )
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.3 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.2)
    out = Path(args.out)
    model.save_pretrained(out, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tok / f).exists():
            shutil.copy(tok / f, out / f)
    print(f"wrote {out}: {cfg.model_type}, {sum(p.numel() for p in model.parameters())} parameters")


def greedy(args):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_grad_enabled(False)
    model = AutoModelForCausalLM.from_pretrained(
        args.model, dtype=torch.float32, attn_implementation="eager"
    )
    model.eval()
    n, same = 0, 0
    for line in open(args.samples):
        if not line.strip():
            continue
        row = json.loads(line)
        ours = row["completion_ids"]
        ids = torch.tensor([row["prompt_ids"]])
        out = model.generate(
            ids,
            # All ones: inferred from a pad id, the mask would drop <s> (id 0 in init's vocabulary).
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=len(ours),
            min_new_tokens=len(ours),
            eos_token_id=None,
            pad_token_id=0,
        )
        theirs = out[0, ids.shape[1] :].tolist()
        n += 1
        if theirs == ours:
            same += 1
        else:
            print(f"prompt line {row['line']}: difinfo {ours} vs transformers {theirs}", file=sys.stderr)
    print(f"{same} of {n} greedy completions equal ({model.config.model_type})")
    sys.exit(0 if same == n else 1)


PIN_CONFIGS = {
    "qwen3": dict(
        model_type="qwen3", vocab_size=16, hidden_size=8, intermediate_size=12,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=6,
        rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
        use_sliding_window=True, sliding_window=3, max_window_layers=1,
    ),
    "gemma2": dict(
        model_type="gemma2", vocab_size=16, hidden_size=8, intermediate_size=12,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=6,
        rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=True,
        query_pre_attn_scalar=5, attn_logit_softcapping=1.5, final_logit_softcapping=2.0,
        sliding_window=3, pad_token_id=None,
    ),
}
PIN_SEQS = [[1, 5, 9, 2, 14, 3, 3, 7], [0, 15, 4]]


def pin(args):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    for arch, c in PIN_CONFIGS.items():
        cfg = AutoConfig.for_model(**c)
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").double()
        params = dict(model.named_parameters())
        names = sorted(params)
        with torch.no_grad():
            for k, name in enumerate(names):
                p = params[name]
                i = torch.arange(p.numel(), dtype=torch.float64)
                base = 1.0 if (arch == "qwen3" and name.endswith("norm.weight")) else 0.0
                p.copy_((base + 0.5 * torch.sin(1.7 * i + 0.37 * k)).reshape(p.shape))
        print(f"// {arch}: token log-probs")
        for s in PIN_SEQS:
            ids = torch.tensor([s])
            lp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
            tok = lp[:-1].gather(1, ids[0, 1:, None])[:, 0]
            print(f"(&{s}, &[{', '.join(repr(float(x)) for x in tok)}]),")
        model.zero_grad()
        total = 0
        for s in PIN_SEQS:
            ids = torch.tensor([s])
            lp = torch.log_softmax(model(input_ids=ids).logits[0], -1)
            total = total + lp[:-1].gather(1, ids[0, 1:, None]).sum()
        total.backward()
        print(f"// {arch}: gradient projections of the summed log-prob")
        for name in names:
            g = params[name].grad.flatten()
            i = torch.arange(g.numel(), dtype=torch.float64)
            a = float(g.sum())
            b = float((g * torch.cos(0.7 * i + 0.2)).sum())
            print(f'("{name}", {a!r}, {b!r}),')


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write")
    w.add_argument("--arch", choices=["qwen3", "gemma2"], required=True)
    w.add_argument("--tokenizer", required=True, help="a `difinfo-train init` directory")
    w.add_argument("--out", required=True)
    w.add_argument("--seed", type=int, default=0)
    g = sub.add_parser("greedy")
    g.add_argument("--model", required=True)
    g.add_argument("--samples", required=True, help="output of `difinfo-train sample`")
    sub.add_parser("pin")
    args = ap.parse_args()
    {"write": write, "greedy": greedy, "pin": pin}[args.cmd](args)


if __name__ == "__main__":
    main()
