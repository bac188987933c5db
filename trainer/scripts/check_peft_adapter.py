#!/usr/bin/env python3
"""Checks a LoRA adapter written by `difinfo-train dpo/sft --use-peft` with PEFT itself.

Usage:
    python3 trainer/scripts/check_peft_adapter.py BASE_DIR ADAPTER_DIR MERGED_DIR LOGPS.jsonl

- BASE_DIR: the base checkpoint the run trained (a Hugging Face directory);
- ADAPTER_DIR: a LoRA run's checkpoint-N (adapter_config.json + adapter_model.safetensors);
- MERGED_DIR: `difinfo-train merge --adapter ADAPTER_DIR --out MERGED_DIR`;
- LOGPS.jsonl: `difinfo-train logps --model MERGED_DIR --data ... --out LOGPS.jsonl`.

It loads the base model with transformers, the adapter with `peft.PeftModel.from_pretrained`
(which must find every adapter tensor: a missing or unexpected key is an error), and checks
(1) PEFT's `merge_and_unload()` weights against MERGED_DIR's, and (2) the log-probs of every
row of LOGPS.jsonl under the PEFT model (adapter active) against difinfo's. Needs
`pip install torch transformers peft safetensors`; not part of CI.
"""

import json
import sys

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM


def summed_logps(model, prompt, completion):
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    lp = torch.log_softmax(logits[:-1], dim=-1)
    targets = ids[0, 1:]
    tok = lp.gather(1, targets[:, None])[:, 0]
    return tok[len(prompt) - 1 :].sum().item()


def main():
    base_dir, adapter_dir, merged_dir, logps_file = sys.argv[1:5]
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_dir)
    model.eval()
    # Every tensor of the file was loaded into a LoRA module.
    saved = load_file(f"{adapter_dir}/adapter_model.safetensors")
    state = model.state_dict()
    for name, t in saved.items():
        key = name.replace(".lora_A.weight", ".lora_A.default.weight").replace(
            ".lora_B.weight", ".lora_B.default.weight"
        )
        if key not in state:
            raise SystemExit(f"adapter tensor {name} has no place in the PEFT model")
        if not torch.equal(state[key].float(), t.float()):
            raise SystemExit(f"adapter tensor {name} was not loaded as saved")
    lora_params = [k for k in state if "lora_" in k]
    if len(lora_params) != len(saved):
        raise SystemExit(f"PEFT model has {len(lora_params)} LoRA tensors, the file {len(saved)}")
    print(f"PEFT loaded {len(saved)} adapter tensors from {adapter_dir}")

    worst_lp = 0.0
    rows = [json.loads(l) for l in open(logps_file) if l.strip()]
    for r in rows:
        for which in ("chosen", "rejected"):
            mine = r[f"{which}_logps"]
            theirs = summed_logps(model, r["prompt_ids"], r[f"{which}_ids"])
            worst_lp = max(worst_lp, abs(mine - theirs) / (1.0 + abs(theirs)))
    print(f"log-probs of {len(rows)} pairs: PEFT model vs difinfo's merged checkpoint, "
          f"max |difference| / (1 + |value|) = {worst_lp:.2e}")

    merged = model.merge_and_unload()
    ours = load_file(f"{merged_dir}/model.safetensors")
    worst_w = 0.0
    for name, t in merged.state_dict().items():
        if name not in ours:
            continue
        worst_w = max(worst_w, (t.float() - ours[name].float()).abs().max().item())
    print(f"merge_and_unload vs difinfo-train merge: max |weight difference| = {worst_w:.2e}")
    ok = worst_lp < 1e-4 and worst_w < 1e-5
    print("OK" if ok else "MISMATCH")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
