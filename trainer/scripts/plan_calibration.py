#!/usr/bin/env python3
"""Predicted (`difinfo-train plan`) against measured (`difinfo-train bench`) peak memory of
the SmolLM2-135M shape on the CPU: the calibration table of trainer/README.md ("Measurements").

A random checkpoint of SmolLM2-135M's shape (`init --size smollm2-135m`) and the tiny model
(the process baseline: its measured peak minus its predicted peak) are written into --work;
each configuration runs one warm-up step and one measured step (`bench --warmup 1 --steps 1`:
the optimizer's moments are zeros the kernel has not yet mapped until the first update, so a
single step under-reads the peak), one at a time.

Usage (from the repository root, after `cargo build --release -p difinfo-trainer`):

    python3 trainer/scripts/plan_calibration.py --work /tmp/plan-calibration

More ranks (when `bench` runs under a launcher, issue 22): `--launcher "mpirun -np 2
--oversubscribe --bind-to none" --world-size 2 --zero-stage 1` runs every bench under the
launcher and plans each rank with the same world size and stage; the peak compared is the
largest rank's (`bench` prints one row per rank, the largest peak is taken).
"""

import argparse
import json
import os
import re
import shlex
import subprocess
import sys

# name, model, pairs per step, tokens per sequence, options shared by bench and plan
RUNS = [
    ("full", "smol", 1, 256, []),
    ("full", "smol", 1, 512, []),
    ("full", "smol", 2, 512, []),
    ("checkpointing", "smol", 1, 512, ["--gradient-checkpointing"]),
    ("checkpointing", "smol", 2, 512, ["--gradient-checkpointing"]),
    ("LoRA r16 q,v", "smol", 1, 512, ["--use-peft"]),
    ("LoRA r16 q,v + checkpointing", "smol", 1, 512, ["--use-peft", "--gradient-checkpointing"]),
    ("bf16 compute (plain path)", "smol", 1, 128, ["--bf16"]),
    ("bf16 compute (plain path)", "smol", 1, 256, ["--bf16"]),
    ("bf16 compute + checkpointing (plain path)", "smol", 1, 256, ["--bf16", "--gradient-checkpointing"]),
]
MIB = 1024 * 1024


def bench_peak(args, model, batch, seq, opts):
    """The largest `peak RSS (MiB)` cell `bench` prints (one row per rank under a launcher)."""
    cmd = shlex.split(args.launcher) + [args.bin, "bench", "--steps", "1", "--warmup", "1",
                                        "--batch", str(batch), "--seq", str(seq)]
    cmd += ["--model", os.path.join(args.work, model)] + opts
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    peaks = [float(r.split("|")[-2]) for r in out.splitlines()
             if r.startswith("| ") and re.match(r"^\s*[\d.]+\s*$", r.split("|")[-2])]
    if not peaks:
        sys.exit(f"no peak RSS in bench's output:\n{out}")
    return max(peaks)


def plan_peak(args, model, batch, seq, opts):
    cmd = [args.bin, "plan", "--model", os.path.join(args.work, model), "--json",
           "--per-device-train-batch-size", str(batch), "--max-length", str(seq),
           "--world-size", str(args.world_size), "--zero-stage", str(args.zero_stage)] + opts
    p = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    return p["peak_bytes"] / MIB, p["kernels"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bin", default="target/release/difinfo-train")
    ap.add_argument("--work", required=True, help="directory for the two random checkpoints")
    ap.add_argument("--launcher", default="", help="e.g. 'mpirun -np 2' (issue 22's bench)")
    ap.add_argument("--world-size", type=int, default=1)
    ap.add_argument("--zero-stage", type=int, default=0)
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    for size, name in [("smollm2-135m", "smol"), ("tiny", "tiny")]:
        if not os.path.isdir(os.path.join(args.work, name)):
            subprocess.run([args.bin, "init", "--size", size, "--out",
                            os.path.join(args.work, name)], check=True)
    measured = bench_peak(args, "tiny", 1, 16, [])
    predicted, _ = plan_peak(args, "tiny", 1, 16, [])
    base = measured - predicted
    print(f"process baseline: {measured:.0f} MiB measured (tiny model) − {predicted:.0f} predicted"
          f" = {base:.0f} MiB\n")
    print("| training | pairs × tokens | kernels | predicted + baseline (MiB) | measured (MiB) | error |")
    print("|---|---|---|---:|---:|---:|")
    for name, model, batch, seq, opts in RUNS:
        pred, kernels = plan_peak(args, model, batch, seq, opts)
        meas = bench_peak(args, model, batch, seq, opts)
        tot = pred + base
        print(f"| {name} | {batch} × {seq} | {kernels} | {tot:.0f} | {meas:.0f} |"
              f" {100 * (tot - meas) / meas:+.1f} % |", flush=True)


if __name__ == "__main__":
    main()
