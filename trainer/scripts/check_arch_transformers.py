#!/usr/bin/env python3
"""Cross-check the Qwen3 and Gemma2 decoders against Hugging Face transformers.

Five subcommands:

  write   a tiny random checkpoint written by transformers itself (Qwen3Config / Gemma2Config:
          hidden 64, 2 layers, 4 heads over 2 key/value heads, head_dim 32 ≠ 64 / 4, a sliding
          window of 8 positions on one layer, Gemma2's soft-caps set), its norm weights drawn
          at random too, with the tokenizer files of a `difinfo-train init` directory;
  greedy  compares `difinfo-train sample --temperature 0 --n 1` rows with
          `generate(do_sample=False)` token for token;
  grads   compares the gradient of the summed log-prob with respect to every parameter with
          the file trainer/tests/arch_reference.rs's ignored `dump_gradients` writes;
  pin     prints the float64 reference values of trainer/tests/arch_reference.rs: per-token
          log-probs and, for every parameter tensor, two projections of the gradient of the
          summed log-prob (Σ g and Σ g_i cos(0.7 i + 0.2)), on closed-form weights
          `base + 0.5 sin(1.7 i + 0.37 k)` (k the tensor's index in name order; base 1 for
          Qwen3's norms, 0 for Gemma2's (1 + w) norms and every other tensor), no padding_idx
          (PyTorch's embedding leaves that row without gradient; no token of a trained
          sequence is padding).
  gguf    writes a checkpoint as llama.cpp's converter writes a qwen3 / gemma2 GGUF file
          (with the `gguf` package: pip install gguf), for `difinfo-train convert`; GGUF has no
          Qwen3 window and no query_pre_attn_scalar (llama.cpp derives it): write the
          checkpoint with `write --for-gguf`.

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
  python trainer/scripts/check_arch_transformers.py write --arch gemma2 --tokenizer /tmp/tok \
      --for-gguf --out /tmp/g2f
  python trainer/scripts/check_arch_transformers.py gguf --model /tmp/g2f --out /tmp/g2f.gguf
  difinfo-train logps --model /tmp/g2f.gguf --data data/example_prefs.jsonl --out /tmp/lp2.jsonl
  python trainer/scripts/check_logps_transformers.py --model /tmp/g2f --logps /tmp/lp2.jsonl
  DIFINFO_GRAD_MODEL=/tmp/g2 DIFINFO_GRAD_OUT=/tmp/g2-grads.safetensors \
      cargo test --release -p difinfo-trainer --test arch_reference -- --ignored dump_gradients
  python trainer/scripts/check_arch_transformers.py grads --model /tmp/g2 --grads /tmp/g2-grads.safetensors
  python trainer/scripts/check_arch_transformers.py pin
"""

import argparse
import json
import math
import shutil
import sys
from pathlib import Path


def tiny_config(arch, vocab, bos, eos, for_gguf=False):
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
            use_sliding_window=not for_gguf,
            sliding_window=8,
            max_window_layers=1,
        )
    return Gemma2Config(
        **common,
        tie_word_embeddings=True,
        query_pre_attn_scalar=32 if for_gguf else 24,
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
        args.arch,
        init_cfg["vocab_size"],
        init_cfg.get("bos_token_id"),
        init_cfg.get("eos_token_id"),
        args.for_gguf,
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


GGUF_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def to_gguf(args):
    """The checkpoint as llama.cpp's convert_hf_to_gguf.py writes a qwen3 / gemma2 file (F32
    tensors, names of gguf-py's tensor map, Gemma's norms stored as 1 + w, no q/k permutation,
    the byte-level BPE tokenizer as `gpt2`), with the `gguf` package."""
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    d = Path(args.model)
    cfg = json.loads((d / "config.json").read_text())
    arch = cfg["model_type"]
    gemma = arch == "gemma2"
    w = gguf.GGUFWriter(args.out, arch)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_key_length(cfg["head_dim"])
    w.add_value_length(cfg["head_dim"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base((cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    if gemma:
        w.add_attn_logit_softcapping(cfg["attn_logit_softcapping"])
        w.add_final_logit_softcapping(cfg["final_logit_softcapping"])
        w.add_sliding_window(cfg["sliding_window"])
    tj = json.loads((d / "tokenizer.json").read_text())
    tc = json.loads((d / "tokenizer_config.json").read_text())
    vocab = tj["model"]["vocab"]
    tokens = [""] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    special = {t["id"] for t in tj["added_tokens"] if t.get("special")}
    types = [3 if i in special else 1 for i in range(len(tokens))]
    # The converter pads the list to the model's vocabulary with unused tokens.
    for i in range(len(tokens), cfg["vocab_size"]):
        tokens.append(f"[PAD{i}]")
        types.append(5)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]])
    w.add_bos_token_id(tokens.index(tc["bos_token"]))
    w.add_eos_token_id(tokens.index(tc["eos_token"]))
    w.add_pad_token_id(tokens.index(tc["pad_token"]))
    w.add_add_bos_token(True)
    w.add_chat_template(tc["chat_template"])
    for name, t in sorted(load_file(d / "model.safetensors").items()):
        t = t.astype(np.float32)
        if gemma and name.endswith("norm.weight"):
            t = t + 1
        if name == "model.embed_tokens.weight":
            g = "token_embd.weight"
        elif name == "model.norm.weight":
            g = "output_norm.weight"
        elif name == "lm_head.weight":
            g = "output.weight"
        else:
            rest = name.removeprefix("model.layers.")
            layer, rest = rest.split(".", 1)
            part, kind = rest.rsplit(".", 1)
            gemma_norms = {
                "post_attention_layernorm": "post_attention_norm",
                "pre_feedforward_layernorm": "ffn_norm",
                "post_feedforward_layernorm": "post_ffw_norm",
            }
            plain_norms = {"post_attention_layernorm": "ffn_norm"}
            g = (gemma_norms if gemma else plain_norms).get(part) or GGUF_NAMES[part]
            g = f"blk.{layer}.{g}.{kind}"
        w.add_tensor(g, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"wrote {args.out} ({arch})")


def dump_sequences():
    """The sequences of trainer/tests/arch_reference.rs's dump_gradients."""
    return [[0] + [(7 + 31 * i + 97 * s) % 600 + 3 for i in range(1, 12 + 5 * s)] for s in range(3)]


def grads(args):
    """Gradients of the summed token log-probs of dump_sequences() with respect to every
    parameter: transformers' (f32, eager) against the file dump_gradients wrote."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        args.model, dtype=torch.float32, attn_implementation="eager"
    )
    total = 0
    for s in dump_sequences():
        ids = torch.tensor([s])
        lp = torch.log_softmax(model(input_ids=ids).logits[0], -1)
        total = total + lp[:-1].gather(1, ids[0, 1:, None]).sum()
    total.backward()
    ours = load_file(args.grads)
    params = dict(model.named_parameters())
    if model.config.tie_word_embeddings:
        params.pop("lm_head.weight", None)
    assert sorted(ours) == sorted(params), (sorted(ours), sorted(params))
    worst, worst_name = 0.0, ""
    for name, p in params.items():
        g = p.grad
        rel = float((ours[name] - g).abs().max() / g.abs().max())
        if rel > worst:
            worst, worst_name = rel, name
    print(
        f"{len(params)} gradients of {args.model} ({model.config.model_type}): "
        f"max |Δ| / max |g| per tensor {worst:.2e} ({worst_name})"
    )
    sys.exit(0 if worst <= args.rtol else 1)


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
    w.add_argument(
        "--for-gguf",
        action="store_true",
        help="only what a GGUF file stores: no Qwen3 window, Gemma2's query_pre_attn_scalar = head_dim",
    )
    g = sub.add_parser("greedy")
    g.add_argument("--model", required=True)
    g.add_argument("--samples", required=True, help="output of `difinfo-train sample`")
    sub.add_parser("pin")
    gr = sub.add_parser("grads")
    gr.add_argument("--model", required=True)
    gr.add_argument("--grads", required=True, help="the file dump_gradients wrote")
    gr.add_argument("--rtol", type=float, default=1e-4)
    gg = sub.add_parser("gguf")
    gg.add_argument("--model", required=True, help="a qwen3 / gemma2 checkpoint directory")
    gg.add_argument("--out", required=True)
    args = ap.parse_args()
    {"write": write, "greedy": greedy, "grads": grads, "pin": pin, "gguf": to_gguf}[args.cmd](args)


if __name__ == "__main__":
    main()
