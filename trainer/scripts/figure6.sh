#!/usr/bin/env bash
# The paper's Figure 6 (Section 3.5, "Do preferences in real datasets encode differential
# information?") at a size two CPU cores run: DPO (reward β log π/π_ref) against the
# reference-free form (reward β log π) at three β, compared by the expected reward of each
# policy's samples under a reward model trained by `difinfo-train reward` on pairs disjoint from
# the policies' training pairs.
#
# Usage: DIFINFO_SMOLLM2_DIR=DIR trainer/scripts/figure6.sh OUT
#   DIR holds model/ from trainer/scripts/fetch_smollm2.sh. Every stage skips what OUT already
#   holds, so an interrupted walk-through goes on where it stopped.
# Sizes (environment): DATA (the shared hh-rlhf pairs), POLICY_PAIRS=64, REWARD_PAIRS=256,
#   PROMPTS=16, SAMPLES=4 per prompt, NEW_TOKENS=48, BETAS="0.03 0.1 0.3", EPOCHS=2,
#   LR=1e-5, RM_EPOCHS=1, RM_LR=1e-5. DIFINFO_TRAIN names the binary (default: target/release).
# Writes OUT/figure6.png (expected reward against β, both reward forms, 95 % intervals, the
# starting policy as a dashed line), OUT/scores.jsonl and OUT/scores.summary.json.
set -euo pipefail
OUT=${1:?usage: DIFINFO_SMOLLM2_DIR=DIR figure6.sh OUT}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
BIN=${DIFINFO_TRAIN:-$ROOT/target/release/difinfo-train}
BASE=${DIFINFO_SMOLLM2_DIR:?set DIFINFO_SMOLLM2_DIR (see trainer/scripts/fetch_smollm2.sh)}/model
DATA=${DATA:-$ROOT/../shared/data/hh-rlhf-harmless-test.jsonl}
BETAS=${BETAS:-"0.03 0.1 0.3"}
SAMPLES=${SAMPLES:-4}
NEW_TOKENS=${NEW_TOKENS:-48}
# The paper's preference recipe (Appendix J.2) scaled down: RMSprop without weight decay,
# constant learning rate after a linear warm-up, loss over completion tokens.
TRAIN=(--optim rmsprop --weight-decay 0 --lr-scheduler-type constant_with_warmup --warmup-ratio 0.1
  --per-device-train-batch-size 8 --max-length 256 --save-total-limit 1 --seed 0)

last_checkpoint() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["last_checkpoint"])' "$1/train_summary.json"; }
done_run() { [ -f "$1/train_summary.json" ]; }

mkdir -p "$OUT/samples"
[ -f "$OUT/data/prompts.jsonl" ] || python3 "$ROOT/trainer/scripts/figure6_split.py" "$DATA" "$OUT/data" \
  --policy "${POLICY_PAIRS:-64}" --reward "${REWARD_PAIRS:-256}" --prompts "${PROMPTS:-16}"

# 1. The reward model: a score head on the base model, Bradley–Terry loss on its own pairs.
done_run "$OUT/reward" || "$BIN" reward --model "$BASE" --data "$OUT/data/reward_pairs.jsonl" \
  --output-dir "$OUT/reward" "${TRAIN[@]}" --learning-rate "${RM_LR:-1e-5}" --num-train-epochs "${RM_EPOCHS:-1}"

# 2. The policies: DPO and reference-free DPO at each β, each sampled on the held-out prompts.
sample() { [ -f "$OUT/samples/$2.jsonl" ] || "$BIN" sample --model "$1" --prompts "$OUT/data/prompts.jsonl" \
  --n "$SAMPLES" --max-new-tokens "$NEW_TOKENS" --temperature 1 --seed 1 --out "$OUT/samples/$2.jsonl"; }
sample "$BASE" reference
POLICIES=()
for beta in $BETAS; do
  for form in dpo reference-free; do
    run="$OUT/policies/$form-$beta"
    flag=(); [ "$form" = reference-free ] && flag=(--reference-free)
    done_run "$run" || "$BIN" dpo --model "$BASE" --data "$OUT/data/policy_pairs.jsonl" --output-dir "$run" \
      --beta "$beta" "${flag[@]}" "${TRAIN[@]}" --learning-rate "${LR:-1e-5}" --num-train-epochs "${EPOCHS:-2}"
    sample "$(last_checkpoint "$run")" "$form-$beta"
    POLICIES+=(--policy "$form-$beta=$run")
  done
done

# 3. Every policy's samples scored by the reward model: rewards, means and 95 % intervals.
DATA_ARGS=(--data "reference=$OUT/samples/reference.jsonl")
for beta in $BETAS; do for form in dpo reference-free; do
  DATA_ARGS+=(--data "$form-$beta=$OUT/samples/$form-$beta.jsonl")
done; done
[ -f "$OUT/scores.summary.json" ] || "$BIN" score --reward-model "$(last_checkpoint "$OUT/reward")" \
  "${DATA_ARGS[@]}" --out "$OUT/scores.jsonl"

# 4. The figure: expected reward against β for both reward forms.
"$BIN" plot --expected-reward "$OUT/scores.summary.json" "${POLICIES[@]}" --baseline reference \
  --out "$OUT/figure6.png"
