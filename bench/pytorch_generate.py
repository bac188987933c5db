#!/usr/bin/env python3
"""Sampling throughput of transformers' `generate`, the counterpart of `difinfo-train bench-generate`.

Same model (a checkpoint directory's config.json and safetensors, or a random Llama of the same
named size), f32 on CPU, the default attention (sdpa) and cache (DynamicCache):
`model.generate(prompt, do_sample=True, num_return_sequences=--batch,
max_new_tokens=--new-tokens, min_new_tokens=--new-tokens, temperature, top_p, top_k=0)`, so
every sample gets exactly --new-tokens tokens (no stop token), the same work as difinfo's.
Each timed call covers the prompt's pass and every decoding step. Prints new tokens/s over the
timed calls and the peak RSS (VmHWM, reset after setup) as the same Markdown row as
`difinfo-train bench-generate`; --json writes the row as JSON.

Not part of CI. Install: pip install torch transformers safetensors
Usage:
  python bench/pytorch_generate.py --model /path/to/SmolLM2-135M-Instruct --batch 8 --prompt-len 64 --new-tokens 128
  difinfo-train bench-generate --model /path/to/SmolLM2-135M-Instruct --batch 8 --prompt-len 64 --new-tokens 128
"""

import argparse
import json
import os
import time

from torch_common import SIZES, load_model, reset_peak_rss, vm_kib


HEADER = (
    "| model | threads | batch × new tokens | prompt | s | new tokens/s | peak RSS (MiB) | load average |\n"
    "|---|---:|---|---:|---:|---:|---:|---|"
)


def build_model(args, torch, transformers):
    m, name = load_model(args, torch, transformers)
    m.eval()
    return m, name


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="Hugging Face checkpoint directory (default: random Llama of --size)")
    p.add_argument("--size", default="small", choices=sorted(SIZES), help="default: small")
    p.add_argument("--batch", type=int, default=8, help="samples drawn together (default 8)")
    p.add_argument("--prompt-len", type=int, default=64, help="prompt tokens, random ids (default 64)")
    p.add_argument("--new-tokens", type=int, default=128, help="new tokens per sample (default 128)")
    p.add_argument("--temperature", type=float, default=1.0, help="default 1.0 (0: greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="default 1.0 (off)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompt and the draws (default 0)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up calls (default 1)")
    p.add_argument("--steps", type=int, default=3, help="timed calls (default 3)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--json", help="also write the row to this file as JSON")
    args = p.parse_args()

    import torch
    import transformers

    torch.set_num_threads(args.threads)
    model, name = build_model(args, torch, transformers)
    g = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(3, model.config.vocab_size, (1, args.prompt_len), generator=g)
    greedy = args.temperature == 0.0
    kw = dict(
        do_sample=not greedy,
        num_return_sequences=args.batch,
        max_new_tokens=args.new_tokens,
        min_new_tokens=args.new_tokens,
        attention_mask=torch.ones_like(prompt),
        pad_token_id=0,
    )
    if not greedy:
        kw.update(temperature=args.temperature, top_p=args.top_p, top_k=0)

    def call():
        with torch.no_grad():
            out = model.generate(prompt, **kw)
        assert out.shape == (args.batch, args.prompt_len + args.new_tokens), out.shape

    torch.manual_seed(args.seed)
    for _ in range(args.warmup):
        call()
    reset = reset_peak_rss()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        call()
    secs = (time.perf_counter() - t0) / args.steps
    hwm = vm_kib("VmHWM") if reset else None
    try:
        with open("/proc/loadavg") as f:
            load = " ".join(f.read().split()[:3])
    except OSError:
        load = None
    row = {
        "model": name,
        "threads": torch.get_num_threads(),
        "batch": args.batch,
        "new_tokens": args.new_tokens,
        "prompt_len": args.prompt_len,
        "seconds": secs,
        "new_tokens_per_second": args.batch * args.new_tokens / secs,
        "peak_rss_mib": hwm / 1024 if hwm is not None else None,
        "load_average": load,
    }
    print(HEADER)
    print(
        f"| {row['model']} | {row['threads']} | {args.batch} × {args.new_tokens} | {args.prompt_len} | "
        f"{secs:.3f} | {row['new_tokens_per_second']:.1f} | "
        f"{'n/a' if hwm is None else f'{hwm / 1024:.0f}'} | {load or 'n/a'} |"
    )
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump([row], f, indent=2)
        os.replace(tmp, args.json)


if __name__ == "__main__":
    main()
