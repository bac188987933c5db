#!/usr/bin/env python3
"""The DPO training step of `difinfo-train bench`, in PyTorch eager with transformers.

Same model (LlamaForCausalLM from the checkpoint directory's config.json and safetensors, or a
random Llama of the same named size), f32 on CPU, same batch and sequence length, same step:
forward of the chosen and rejected sequences, summed completion log-probs, the DPO sigmoid loss
against precomputed reference log-probs (or, for dpo-pg, the two NLL gradients and the
projection of Appendix H), backward, global gradient-norm clipping to 1, AdamW (lr 1e-6).
Prints tokens/s over the timed steps and the peak RSS (VmHWM, reset after setup) as a Markdown
row matching `difinfo-train bench`; `--json FILE` writes the rows as `bench --json` does.
`--gradient-checkpointing` is transformers' (`use_reentrant=False`), `--use-peft` a PEFT LoRA
adapter as TRL builds it from `--lora-r`, `--lora-alpha`, `--lora-target-modules`.

Not part of CI. Install: pip install torch transformers safetensors
Usage:
  difinfo-train init --size small --out /tmp/small
  python bench/pytorch_dpo_step.py --model /tmp/small --batch 4 --seq 256 --objective dpo
  difinfo-train bench --model /tmp/small --batch 4 --seq 256 --objective dpo,dpo-pg
"""

import argparse
import os
import time

from torch_common import SIZES, load_model, reset_peak_rss, vm_kib


def build_model(args, torch, transformers):
    m, name = load_model(args, torch, transformers, args.attn)
    m.config.use_cache = False
    if args.gradient_checkpointing:
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if args.use_peft:
        import peft

        lora = peft.LoraConfig(
            r=args.lora_r,
            lora_alpha=args.lora_alpha,
            lora_dropout=0.0,
            target_modules=args.lora_target_modules.split(","),
            task_type="CAUSAL_LM",
        )
        m = peft.get_peft_model(m, lora)
    m.train()
    return m, name


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="Hugging Face checkpoint directory (default: random Llama of --size)")
    p.add_argument("--size", default="small", choices=sorted(SIZES), help="default: small")
    p.add_argument("--batch", type=int, default=4, help="pairs per step (default 4)")
    p.add_argument("--seq", type=int, default=256, help="tokens per sequence, half prompt (default 256)")
    p.add_argument("--objective", default="dpo", help="dpo, dpo-pg, or both comma-separated (default dpo)")
    p.add_argument("--steps", type=int, default=3, help="timed steps (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up steps (default 1)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all CPUs)")
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="attention (default: sdpa, transformers' default)")
    p.add_argument(
        "--logits-to-keep",
        action="store_true",
        help="compute logits for the completion positions only (transformers' logits_to_keep, as "
        "TRL's DPOConfig(use_logits_to_keep=True); TRL's default computes all positions)",
    )
    p.add_argument("--gradient-checkpointing", action="store_true", help="transformers' gradient checkpointing (use_reentrant=False)")
    p.add_argument("--use-peft", action="store_true", help="train a PEFT LoRA adapter instead of the weights")
    p.add_argument("--lora-r", type=int, default=16, help="LoRA rank (default 16, TRL's)")
    p.add_argument("--lora-alpha", type=int, default=32, help="LoRA alpha (default 32, TRL's)")
    p.add_argument("--lora-target-modules", default="q_proj,v_proj", help="default q_proj,v_proj (PEFT's Llama default)")
    p.add_argument("--json", help="also write the rows as JSON")
    args = p.parse_args()

    import torch
    import torch.nn.functional as F
    import transformers

    torch.set_num_threads(args.threads)
    model, name = build_model(args, torch, transformers)
    params = [q for q in model.parameters() if q.requires_grad]
    nparams = sum(q.numel() for q in params)
    vocab = model.config.vocab_size
    B, L, P = args.batch, args.seq, args.seq // 2
    beta = 0.1
    steps = args.warmup + args.steps

    g = torch.Generator().manual_seed(7)
    prompts = torch.randint(3, vocab, (steps, B, P), generator=g)
    chosen = torch.cat([prompts, torch.randint(3, vocab, (steps, B, L - P), generator=g)], -1)
    rejected = torch.cat([prompts, torch.randint(3, vocab, (steps, B, L - P), generator=g)], -1)
    attn = torch.ones(B, L, dtype=torch.long)
    loss_mask = torch.zeros(B, L - 1)
    loss_mask[:, P - 1:] = 1.0  # targets ids[t+1] with t+1 >= P: the completion tokens

    def seq_logps(ids, mask_rows):
        am = torch.ones(ids.shape, dtype=torch.long)
        if args.logits_to_keep:
            # The last k positions P−1 .. L−1; their first k−1 predict the completion ids[P:].
            k = L - P + 1
            logits = model(input_ids=ids, attention_mask=am, logits_to_keep=k).logits[:, :-1]
            tgt, rows = ids[:, L - k + 1 :], mask_rows[:, L - k :]
        else:
            logits = model(input_ids=ids, attention_mask=am).logits[:, :-1]
            tgt, rows = ids[:, 1:], mask_rows
        lp = torch.log_softmax(logits.float(), -1).gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
        return (lp * rows).sum(-1)

    with torch.no_grad():
        ref = [
            (seq_logps(chosen[s], loss_mask), seq_logps(rejected[s], loss_mask)) for s in range(steps)
        ]

    print("| model | params | objective | optim | dtype | device | threads | batch × seq | tokens/step | s/step | tokens/s | peak RSS (MiB) |")
    print("|---|---:|---|---|---|---|---:|---|---:|---:|---:|---:|")
    rows = []
    for objective in args.objective.split(","):
        opt = torch.optim.AdamW(params, lr=1e-6, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
        reset = reset_peak_rss()
        secs = 0.0
        tokens = 0
        for s in range(steps):
            t0 = time.perf_counter()
            rc, rr = ref[s]
            if objective == "dpo":
                ids = torch.cat([chosen[s], rejected[s]], 0)
                lp = seq_logps(ids, torch.cat([loss_mask, loss_mask], 0))
                pc, pr = lp[:B], lp[B:]
                loss = -F.logsigmoid(beta * ((pc - rc) - (pr - rr))).mean()
                loss.backward()
            elif objective == "dpo-pg":
                pc = seq_logps(chosen[s], loss_mask)
                pr = seq_logps(rejected[s], loss_mask)
                with torch.no_grad():
                    loss = -F.logsigmoid(beta * ((pc - rc) - (pr - rr))).mean()
                gw = torch.autograd.grad(-pc.mean(), params)
                gl = torch.autograd.grad(-pr.mean(), params)
                dot = sum((a * b).sum() for a, b in zip(gw, gl))
                nl = sum((b * b).sum() for b in gl)
                c = (dot / nl) if (dot > 0 and nl > 0) else torch.tensor(0.0)
                for q, a, b in zip(params, gw, gl):
                    q.grad = a - c * b
            else:
                raise SystemExit(f"unknown objective {objective}")
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            float(loss.detach())
            dt = time.perf_counter() - t0
            if s >= args.warmup:
                secs += dt
                tokens += 2 * B * L
        peak = vm_kib("VmHWM") if reset else None
        rows.append(
            {
                "objective": objective,
                "tokens_per_step": tokens // args.steps,
                "seconds_per_step": secs / args.steps,
                "tokens_per_second": tokens / secs,
                "peak_rss_mib": None if peak is None else peak / 1024,
            }
        )
        print(
            f"| {name} (PyTorch {torch.__version__}, transformers {transformers.__version__}, {args.attn}"
            f"{', logits_to_keep' if args.logits_to_keep else ''}) "
            f"| {nparams / 1e6:.2f}M | {objective} | adamw | F32 | cpu | {args.threads} | {B} × {L} "
            f"| {tokens // args.steps} | {secs / args.steps:.3f} | {tokens / secs:.0f} "
            f"| {'n/a' if peak is None else f'{peak / 1024:.0f}'} |"
        )
        del opt
    try:
        load = " ".join(open("/proc/loadavg").read().split()[:3])
        print("\nload average (1, 5, 15 min): " + load)
    except OSError:
        load = None
    if args.json:
        import json

        training = ("LoRA" if args.use_peft else "full") + (" + ckpt" if args.gradient_checkpointing else "")
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(
                {
                    "model": name,
                    "training": training,
                    "threads": args.threads,
                    "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
                    "load_average": load,
                    "rows": rows,
                },
                f,
                indent=1,
            )
        os.replace(tmp, args.json)


if __name__ == "__main__":
    main()
