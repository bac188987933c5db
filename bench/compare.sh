#!/usr/bin/env bash
# difinfo-train against PyTorch + transformers (+ PEFT) on the same training step and the same
# generation, both sides interleaved in one sitting, then the table with ratios
# (bench/compare_table.py). See bench/README.md, "difinfo against PyTorch in one command".
#
#   bench/compare.sh --model runs/smollm2 [--rounds 2] [--batch 2] [--seq 512] [--steps 2]
#                    [--warmup 1] [--variants full,ckpt,lora,lora-ckpt,generate]
#                    [--out bench-results] [--profile]
#
# Environment: DIFINFO_TRAIN, the binary (default target/release/difinfo-train, built when
# missing); DIFINFO_TRAIN_AVX2, optionally a second build measured beside it (e.g. one built
# with --no-default-features: the gemm crate's AVX2 kernels only); PYTHON, an interpreter with
# torch, transformers and peft (default python3); THREADS (default: all CPUs).
set -euo pipefail

model="" rounds=1 batch=2 seq=512 steps=2 warmup=1 out=bench-results profile=""
variants="full,ckpt,lora,lora-ckpt,generate"
while [ $# -gt 0 ]; do
  case "$1" in
    --model) model="$2"; shift 2 ;;
    --rounds) rounds="$2"; shift 2 ;;
    --batch) batch="$2"; shift 2 ;;
    --seq) seq="$2"; shift 2 ;;
    --steps) steps="$2"; shift 2 ;;
    --warmup) warmup="$2"; shift 2 ;;
    --variants) variants="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --profile) profile="--profile"; shift ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "compare.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ -n "$model" ] || { echo "compare.sh: --model DIR is required (a Hugging Face Llama-family checkpoint directory, e.g. from trainer/scripts/fetch_smollm2.sh)" >&2; exit 2; }
[ -f "$model/config.json" ] || { echo "compare.sh: $model/config.json not found" >&2; exit 2; }
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
T="${DIFINFO_TRAIN:-$root/target/release/difinfo-train}"
if [ ! -x "$T" ]; then
  (cd "$root" && cargo build --release -p difinfo-trainer --bin difinfo-train)
fi
PY="${PYTHON:-python3}"
"$PY" -c "import torch, transformers, peft" || { echo "compare.sh: $PY lacks torch, transformers or peft (pip install torch transformers peft)" >&2; exit 2; }
threads="${THREADS:-$(nproc)}"
export OMP_NUM_THREADS="$threads" RAYON_NUM_THREADS="$threads"
mkdir -p "$out"

# One side of one variant: its JSON in $out/r<round>-<variant>-<side>.json, its output in .log.
difinfo() { # binary side round variant
  local bin="$1" side="$2" r="$3" v="$4" extra=()
  case "$v" in
    ckpt) extra=(--gradient-checkpointing) ;;
    lora) extra=(--use-peft --lora-r 16 --lora-alpha 32 --lora-target-modules q_proj,v_proj) ;;
    lora-ckpt) extra=(--use-peft --lora-r 16 --lora-alpha 32 --lora-target-modules q_proj,v_proj --gradient-checkpointing) ;;
  esac
  local base="$out/r$r-$v-$side"
  if [ "$v" = generate ]; then
    "$bin" bench-generate --model "$model" --batch 8 --new-tokens 128 --steps "$steps" --warmup "$warmup" --json "$base.json" >"$base.log" 2>&1
  else
    "$bin" bench --model "$model" --batch "$batch" --seq "$seq" --objective dpo --optim adamw \
      --steps "$steps" --warmup "$warmup" $profile "${extra[@]}" --json "$base.json" >"$base.log" 2>&1
  fi
}
pytorch() { # round variant
  local r="$1" v="$2" extra=()
  case "$v" in
    ckpt) extra=(--gradient-checkpointing) ;;
    lora) extra=(--use-peft) ;;
    lora-ckpt) extra=(--use-peft --gradient-checkpointing) ;;
  esac
  local base="$out/r$r-$v-pytorch"
  if [ "$v" = generate ]; then
    "$PY" "$here/pytorch_generate.py" --model "$model" --batch 8 --new-tokens 128 --steps "$steps" --warmup "$warmup" --threads "$threads" --json "$base.json" >"$base.log" 2>&1
  else
    "$PY" "$here/pytorch_dpo_step.py" --model "$model" --batch "$batch" --seq "$seq" --objective dpo \
      --steps "$steps" --warmup "$warmup" --threads "$threads" "${extra[@]}" --json "$base.json" >"$base.log" 2>&1
  fi
}

echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) CPUs; load $(cut -d' ' -f1-3 /proc/loadavg); $(date -u +%FT%TZ)"
for r in $(seq 1 "$rounds"); do
  for v in ${variants//,/ }; do
    # Alternate which side goes first, so neither always runs on a warmer (or busier) machine.
    if [ $(( r % 2 )) -eq 1 ]; then order="difinfo pytorch"; else order="pytorch difinfo"; fi
    for side in $order; do
      echo "round $r, $v, $side (load $(cut -d' ' -f1 /proc/loadavg))"
      if [ "$side" = difinfo ]; then
        difinfo "$T" difinfo "$r" "$v"
        if [ -n "${DIFINFO_TRAIN_AVX2:-}" ]; then difinfo "$DIFINFO_TRAIN_AVX2" avx2 "$r" "$v"; fi
      else
        pytorch "$r" "$v"
      fi
    done
  done
done
python3 "$here/compare_table.py" "$out"
