#!/usr/bin/env python3
"""Checks a run's TensorBoard event files (`--report-to tensorboard`) with the `tensorboard`
package's own reader against the run's metrics.jsonl.

Every event directory under RUN_DIR/runs/ is loaded with EventAccumulator; each metrics.jsonl
record must appear as scalars `train/<key>` (every key but `step`) at its step, equal to the
logged value rounded to float32 (PyTorch's `add_scalar` stores float32 too), and no scalar may
be there that metrics.jsonl lacks. The run's options must be the text summary `args`.

    pip install tensorboard
    difinfo-train dpo --model runs/tiny --data data/example_prefs.jsonl \
        --output-dir runs/tb --max-steps 4 --logging-steps 1 --report-to tensorboard
    python trainer/scripts/check_tensorboard.py runs/tb

With a resumed run, the events of steps after the checkpoint it resumed from may appear in two
files (the first run's and the resumed run's); the newest file's value is compared, and
`tokens_per_second` (a timing) is compared only where one file holds the step.
"""

import json
import math
import sys
from pathlib import Path

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import (
    EventAccumulator,
    TENSORS,
    SCALARS,
)


def main(run_dir: str) -> int:
    run = Path(run_dir)
    records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l]
    dirs = sorted(p for p in (run / "runs").iterdir() if p.is_dir())
    if not dirs:
        print(f"{run}/runs: no event directory", file=sys.stderr)
        return 1
    seen = {}  # (tag, step) -> [values, newest last]
    texts = 0
    for d in dirs:
        acc = EventAccumulator(str(d), size_guidance={SCALARS: 0, TENSORS: 0})
        acc.Reload()
        tags = acc.Tags()
        for tag in tags["scalars"]:
            for ev in acc.Scalars(tag):
                seen.setdefault((tag, ev.step), []).append(ev.value)
        if "args/text_summary" in tags["tensors"]:
            (t,) = acc.Tensors("args/text_summary")
            args = json.loads(t.tensor_proto.string_val[0].decode())
            assert "learning_rate" in args, "args text summary without the options"
            texts += 1
    checked, bad = 0, []
    wanted = set()
    for r in records:
        step = r["step"]
        for k, v in r.items():
            if k == "step":
                continue
            tag = f"train/{k}"
            wanted.add((tag, step))
            vals = seen.get((tag, step))
            if vals is None:
                bad.append(f"{tag} at step {step}: missing")
                continue
            if k == "tokens_per_second" and len(vals) > 1:
                continue
            want = np.float32(math.nan if v is None else v)
            got = np.float32(vals[-1])
            if not (got == want or (np.isnan(got) and np.isnan(want))):
                bad.append(f"{tag} at step {step}: {got} in the events, {want} in metrics.jsonl")
            checked += 1
    extra = sorted(set(seen) - wanted)
    bad += [f"{t} at step {s}: in the events, not in metrics.jsonl" for t, s in extra]
    print(
        f"{run}: {len(dirs)} event file dir(s), {len(records)} records, {checked} scalars "
        f"equal to metrics.jsonl (float32), {texts} args text summaries, {len(bad)} mismatches"
    )
    for b in bad[:20]:
        print("  " + b)
    return 1 if bad or texts != len(dirs) else 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1]))
