#!/usr/bin/env python3
"""The table of bench/compare.sh: reads its results directory (r<round>-<variant>-<side>.json,
written by `difinfo-train bench --json`, `bench-generate --json`, bench/pytorch_dpo_step.py and
bench/pytorch_generate.py) and prints, per variant, the median tokens/s of each side over the
rounds with its range, the ratio (median of the per-round ratios), peak memory and MFU; then,
where difinfo ran with --profile, where its step went by kernel family.

Standard library only.  Usage: python3 bench/compare_table.py bench-results
"""

import glob
import json
import os
import re
import statistics
import sys

VARIANTS = {
    "full": "full",
    "ckpt": "gradient checkpointing",
    "lora": "LoRA r 16 (q, v)",
    "lora-ckpt": "LoRA + checkpointing",
    "generate": "generation, 8 × 128 new tokens",
}


def row_of(path):
    with open(path) as f:
        j = json.load(f)
    if isinstance(j, list):  # bench-generate and pytorch_generate.py: a list of rows
        j = {"rows": j, "load_average": j[0].get("load_average")}
    r = j["rows"][0]
    tps = r.get("tokens_per_second", r.get("new_tokens_per_second"))
    return {
        "tps": tps,
        "peak": r.get("peak_rss_mib"),
        "mfu": r.get("mfu"),
        "profile": (r.get("profile") or {}).get("regions"),
        "seconds": r.get("seconds_per_step", r.get("seconds")),
        "load": j.get("load_average"),
        "model": j.get("model"),
        "versions": j.get("versions"),
        "steps": j.get("steps"),
    }


def fmt_range(xs, f="{:.0f}"):
    if not xs:
        return "–"
    m = f.format(statistics.median(xs))
    if len(xs) == 1:
        return m
    return f"{m} ({f.format(min(xs))}–{f.format(max(xs))})"


def family(name):
    if name.startswith("gemm"):
        return "matrix products (weights, LM head)"
    if name.startswith("attention"):
        return "attention core (its products included)"
    if name.startswith(("AdamW", "gradient", "optimizer")):
        return "optimizer, norm, clipping"
    if "candle" in name or name.startswith("decoder layer") or name == "embedding":
        return "candle graph and ops, node overhead"
    return "element-wise kernels (norms, RoPE, SiLU, softmax, log-softmax)"


def main():
    d = sys.argv[1] if len(sys.argv) > 1 else "bench-results"
    runs = {}
    for p in sorted(glob.glob(os.path.join(d, "r*-*.json"))):
        m = re.match(r"r(\d+)-(.+)-(difinfo|pytorch|avx2)\.json$", os.path.basename(p))
        if not m:
            continue
        try:
            runs.setdefault(m.group(2), {}).setdefault(m.group(3), {})[int(m.group(1))] = row_of(p)
        except (OSError, KeyError, IndexError, ValueError) as e:
            print(f"skipping {p}: {e}", file=sys.stderr)
    if not runs:
        sys.exit(f"no results in {d}")
    has_avx2 = any("avx2" in s for s in runs.values())
    head = "| variant | difinfo tok/s | PyTorch tok/s | ratio |"
    sep = "|---|---:|---:|---:|"
    if has_avx2:
        head += " difinfo AVX2 build tok/s | ratio |"
        sep += "---:|---:|"
    head += " peak memory difinfo / PyTorch (GB) | difinfo MFU |"
    sep += "---:|---:|"
    print(head)
    print(sep)
    for v in [k for k in VARIANTS if k in runs] + [k for k in runs if k not in VARIANTS]:
        sides = runs[v]
        dif, pt, av = sides.get("difinfo", {}), sides.get("pytorch", {}), sides.get("avx2", {})
        ratio = lambda a: [a[r]["tps"] / pt[r]["tps"] for r in a if r in pt and pt[r]["tps"]]
        cells = [
            VARIANTS.get(v, v),
            fmt_range([x["tps"] for x in dif.values()]),
            fmt_range([x["tps"] for x in pt.values()]),
            fmt_range(ratio(dif), "{:.2f}×"),
        ]
        if has_avx2:
            cells += [fmt_range([x["tps"] for x in av.values()]), fmt_range(ratio(av), "{:.2f}×")]
        gb = lambda s: [x["peak"] / 1024 for x in s.values() if x["peak"]]
        cells.append(f"{fmt_range(gb(dif), '{:.1f}')} / {fmt_range(gb(pt), '{:.1f}')}")
        cells.append(fmt_range([100 * x["mfu"] for x in dif.values() if x["mfu"]], "{:.0f} %"))
        print("| " + " | ".join(cells) + " |")
    loads = sorted({x["load"] for s in runs.values() for side in s.values() for x in side.values() if x["load"]})
    if loads:
        print(f"\nload averages seen (1, 5, 15 min): {loads[0]} … {loads[-1]}")
    for v, sides in runs.items():
        for side in ("difinfo", "avx2"):
            profs = [x for x in sides.get(side, {}).values() if x["profile"]]
            if not profs:
                continue
            x = profs[-1]
            fams = {}
            for name, st in x["profile"].items():
                f = fams.setdefault(family(name), [0.0, 0.0])
                f[0] += st["seconds"]
                f[1] += st["flops"]
            covered = sum(f[0] for f in fams.values())
            total = covered
            if x["steps"] and x["seconds"]:
                total = max(covered, x["steps"] * x["seconds"])
                fams["no region (candle graph, allocation, data)"] = [total - covered, 0.0]
            print(f"\n{VARIANTS.get(v, v)}, {side}: where the profiled step went (last round)\n")
            print("| family | share of the step | GFLOP/s |")
            print("|---|---:|---:|")
            for name, (s, fl) in sorted(fams.items(), key=lambda kv: -kv[1][0]):
                g = f"{fl / s / 1e9:.1f}" if fl and s else ""
                print(f"| {name} | {100 * s / total:.1f} % | {g} |")


if __name__ == "__main__":
    main()
