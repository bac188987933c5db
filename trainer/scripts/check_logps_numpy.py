#!/usr/bin/env python3
"""Independent check of `difinfo-train logps` with a from-scratch NumPy forward pass.

Reads a checkpoint directory (config.json + model.safetensors, Llama/Mistral/Qwen2) and the
JSONL written by `difinfo-train logps`, recomputes every chosen/rejected log-prob from the
token ids in float64 following transformers' modeling_llama (RMSNorm, rotate-half RoPE,
grouped-query attention, SiLU MLP, optional q/k/v biases, Mistral's sliding window), and
prints the largest absolute difference. Needs only NumPy.

    python3 trainer/scripts/check_logps_numpy.py MODEL_DIR LOGPS.jsonl [--tol 1e-3]
"""
import argparse
import json
import math
import os
import struct
import sys

import numpy as np


def load_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        raw = data[a:b]
        dt = info["dtype"]
        if dt == "F32":
            arr = np.frombuffer(raw, dtype="<f4")
        elif dt == "F64":
            arr = np.frombuffer(raw, dtype="<f8")
        elif dt == "F16":
            arr = np.frombuffer(raw, dtype="<f2")
        elif dt == "BF16":
            arr = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            raise ValueError(f"{name}: unsupported dtype {dt}")
        out[name] = arr.astype(np.float64).reshape(info["shape"])
    return out


def load_weights(model_dir):
    single = os.path.join(model_dir, "model.safetensors")
    if os.path.exists(single):
        return load_safetensors(single)
    index = json.load(open(os.path.join(model_dir, "model.safetensors.index.json")))
    w = {}
    for shard in sorted(set(index["weight_map"].values())):
        w.update(load_safetensors(os.path.join(model_dir, shard)))
    return w


def rope_inv_freq(cfg, head_dim):
    theta = cfg.get("rope_theta", 10000.0)
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    rs = cfg.get("rope_scaling") or {}
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind == "linear":
        inv = inv / rs["factor"]
    elif kind == "llama3":
        f, lo, hi, old = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"], rs["original_max_position_embeddings"]
        wl = 2 * math.pi / inv
        smooth = (old / wl - lo) / (hi - lo)
        scaled = np.where(wl > old / lo, inv / f, inv)
        mid = (wl >= old / hi) & (wl <= old / lo)
        inv = np.where(mid, (1 - smooth) * inv / f + smooth * inv, scaled)
    return inv


def token_logps(cfg, w, ids):
    H = cfg["hidden_size"]
    nh = cfg["num_attention_heads"]
    nkv = cfg.get("num_key_value_heads", nh)
    hd = cfg.get("head_dim") or H // nh
    eps = cfg.get("rms_norm_eps", 1e-6)
    window = cfg.get("sliding_window") if cfg["model_type"] == "mistral" else None
    L = len(ids)

    def rms(x, g):
        return g * (x / np.sqrt((x * x).mean(-1, keepdims=True) + eps))

    def lin(x, name):
        y = x @ w[name + ".weight"].T
        b = w.get(name + ".bias")
        return y + b if b is not None else y

    # transformers computes inverse frequencies and angles in float32.
    inv = rope_inv_freq(cfg, hd).astype(np.float32)
    ang = (np.arange(L, dtype=np.float32)[:, None] * inv[None, :]).astype(np.float64)
    cos = np.cos(np.concatenate([ang, ang], -1))
    sin = np.sin(np.concatenate([ang, ang], -1))

    def rope(x):  # [heads, L, hd]
        x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
        return x * cos + np.concatenate([-x2, x1], -1) * sin

    i = np.arange(L)[:, None]
    j = np.arange(L)[None, :]
    allowed = j <= i
    if window:
        allowed &= (i - j) < window
    x = w["model.embed_tokens.weight"][ids]
    for l in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{l}"
        h = rms(x, w[p + ".input_layernorm.weight"])
        q = lin(h, p + ".self_attn.q_proj").reshape(L, nh, hd).transpose(1, 0, 2)
        k = lin(h, p + ".self_attn.k_proj").reshape(L, nkv, hd).transpose(1, 0, 2)
        v = lin(h, p + ".self_attn.v_proj").reshape(L, nkv, hd).transpose(1, 0, 2)
        q, k = rope(q), rope(k)
        k = np.repeat(k, nh // nkv, axis=0)
        v = np.repeat(v, nh // nkv, axis=0)
        s = q @ k.transpose(0, 2, 1) / math.sqrt(hd)
        s = np.where(allowed[None], s, -np.inf)
        s = s - s.max(-1, keepdims=True)
        a = np.exp(s)
        a /= a.sum(-1, keepdims=True)
        o = (a @ v).transpose(1, 0, 2).reshape(L, nh * hd)
        x = x + lin(o, p + ".self_attn.o_proj")
        h = rms(x, w[p + ".post_attention_layernorm.weight"])
        g = lin(h, p + ".mlp.gate_proj")
        x = x + lin((g / (1 + np.exp(-g))) * lin(h, p + ".mlp.up_proj"), p + ".mlp.down_proj")
    x = rms(x, w["model.norm.weight"])
    head = w["model.embed_tokens.weight"] if cfg.get("tie_word_embeddings", False) else w["lm_head.weight"]
    z = x[:-1] @ head.T
    m = z.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(z - m).sum(-1, keepdims=True)))[:, 0]
    return z[np.arange(L - 1), ids[1:]] - lse


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("logps_jsonl")
    ap.add_argument("--tol", type=float, default=1e-3, help="largest allowed |difference| (default 1e-3)")
    args = ap.parse_args()
    cfg = json.load(open(os.path.join(args.model_dir, "config.json")))
    w = load_weights(args.model_dir)
    worst = 0.0
    n = 0
    for line in open(args.logps_jsonl):
        r = json.loads(line)
        for side in ("chosen", "rejected"):
            ids = np.array(r["prompt_ids"] + r[side + "_ids"], dtype=np.int64)
            lp = token_logps(cfg, w, ids)
            ref = lp[len(r["prompt_ids"]) - 1 :].sum() if r["prompt_ids"] else lp.sum()
            worst = max(worst, abs(ref - r[side + "_logps"]))
            n += 1
    print(f"{n} sequences: max |numpy - difinfo-train| = {worst:.3e}")
    sys.exit(0 if worst <= args.tol else 1)


if __name__ == "__main__":
    main()
