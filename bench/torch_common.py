"""What bench/pytorch_dpo_step.py and bench/pytorch_generate.py share: the process's peak
resident set as `difinfo-train bench` measures it (`VmHWM` of /proc/self/status, reset through
/proc/self/clear_refs after setup), and the model: a checkpoint directory, or a random Llama of
a size `difinfo-train init` names."""


def vm_kib(field):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


SIZES = {
    # name: (vocab, hidden, intermediate, layers, heads, kv_heads), as difinfo-trainer's init.rs
    "tiny": (1024, 128, 352, 4, 4, 2),
    "small": (8192, 384, 1152, 8, 6, 2),
    "smollm2-135m": (49152, 576, 1536, 30, 9, 3),
}


def load_model(args, torch, transformers, attn="sdpa"):
    """`--model DIR` (any causal LM transformers loads, f32) or a random Llama of `--size`
    (seed 0); returns the model and its name in the table."""
    if args.model:
        m = transformers.AutoModelForCausalLM.from_pretrained(
            args.model, dtype=torch.float32, attn_implementation=attn
        )
        return m, args.model
    v, h, i, l, a, kv = SIZES[args.size]
    cfg = transformers.LlamaConfig(
        vocab_size=v, hidden_size=h, intermediate_size=i, num_hidden_layers=l,
        num_attention_heads=a, num_key_value_heads=kv, rms_norm_eps=1e-5, rope_theta=10000.0,
        max_position_embeddings=2048, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1,
    )
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg), f"random {args.size}"
