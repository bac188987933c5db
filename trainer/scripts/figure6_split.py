#!/usr/bin/env python3
"""Three disjoint parts of a preference file for the Figure 6 walk-through (standard library only).

Keeps the pairs whose chosen and rejected texts together are under --max-chars characters and
whose rejected text starts with the chosen one's prompt (the implicit prompt: everything up to
the last "\\n\\nAssistant:"), shuffles them with --seed, and writes into OUT_DIR:

  policy_pairs.jsonl  the first --policy pairs: the policies' DPO training data
  reward_pairs.jsonl  the next --reward pairs: the reward model's training data
  prompts.jsonl       the next --prompts prompts ({"prompt": ...}): held out, sampled by every
                      policy and scored by the reward model

Usage: figure6_split.py DATA.jsonl OUT_DIR [--policy 64] [--reward 256] [--prompts 16]
"""
import argparse
import json
import os
import random

MARK = "\n\nAssistant:"


def implicit_prompt(row):
    text = row["chosen"]
    return text[: text.rfind(MARK) + len(MARK)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data")
    ap.add_argument("out_dir")
    ap.add_argument("--policy", type=int, default=64)
    ap.add_argument("--reward", type=int, default=256)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-chars", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    with open(a.data) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    keep = [
        r for r in rows
        if MARK in r["chosen"]
        and len(r["chosen"]) + len(r["rejected"]) < a.max_chars
        and r["rejected"].startswith(implicit_prompt(r))
    ]
    random.Random(a.seed).shuffle(keep)
    need = a.policy + a.reward + a.prompts
    if len(keep) < need:
        raise SystemExit(f"error: {a.data}: {len(keep)} usable pairs, {need} asked for")
    parts = {
        "policy_pairs.jsonl": keep[: a.policy],
        "reward_pairs.jsonl": keep[a.policy : a.policy + a.reward],
        "prompts.jsonl": [{"prompt": implicit_prompt(r)} for r in keep[a.policy + a.reward : need]],
    }
    os.makedirs(a.out_dir, exist_ok=True)
    for name, part in parts.items():
        path = os.path.join(a.out_dir, name)
        with open(path + ".part", "w") as f:
            for r in part:
                f.write(json.dumps(r) + "\n")
        os.replace(path + ".part", path)
        print(f"{path}: {len(part)}")
    print(f"{a.data}: {len(rows)} pairs, {len(keep)} usable, {need} used")


if __name__ == "__main__":
    main()
