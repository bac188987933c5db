#!/usr/bin/env bash
# The GPU check of difinfo-train, in two halves: build on a machine with cargo (no GPU needed),
# run on the GPU machine (which needs no Rust toolchain and no network).
#
#   trainer/scripts/gpu_check.sh prepare [DIR]   # here: CUDA build, binaries packed into DIR
#   trainer/scripts/gpu_check.sh run [DIR]       # on the GPU: tests, CPU-vs-CUDA checks, bench
#
# DIR defaults to target-gpu (ignored by git; name it in the device tool's `carry`). `run`
# writes its log and results to $OUT (or DIR/out) and exits non-zero if a check fails.
# A rehearsal of the whole script on a machine without a GPU:
#   GPU_CHECK_FEATURES= trainer/scripts/gpu_check.sh prepare   # CPU binaries
#   GPU_CHECK_DEVICE=cpu trainer/scripts/gpu_check.sh run       # "cuda" replaced by "cpu"
#
# prepare:
#   - a CUDA toolkit: $CUDA_ROOT if it holds bin/nvcc, else nvcc on PATH, else CUDA
#     $CUDA_RELEASE (default 13.0: the PTX must not be newer than the GPU machine's driver,
#     580 series = CUDA 13.0) assembled from NVIDIA's PyPI wheels by cuda_toolkit_from_pypi.sh
#     into /tmp/cuda-$CUDA_RELEASE;
#   - `cargo build --release --features cuda` of difinfo-train and of the test binaries
#     device_path, gradients, model_equivalence, train_real_model (CUDA_COMPUTE_CAP, default
#     90: H100/H200); without a driver here, libcuda is a link-time stand-in (never run GPU
#     code against it);
#   - `cargo build --release --features cuda,nccl,mpi` of difinfo-train (GPU_CHECK_NCCL=0
#     skips it), kept as bin/nccl/difinfo-train with the Open MPI libraries it loads
#     (bin/nccl/lib; NCCL itself, 190 MB, is not packed: the GPU machine's, e.g. PyTorch's
#     nvidia-nccl wheel);
#   - DIR/gpu_bins.tar.xz: those binaries stripped, and data/ (the tests' example data); it
#     must stay under the device tool's 64 MiB (xz with a 256 MiB dictionary, so the candle
#     kernels every binary embeds are stored once).
# run:
#   1. nvidia-smi; the CUDA libraries (cuBLAS, cuBLASLt, cuRAND, NVRTC, cudart) found on the
#      machine (CUDA_HOME, /usr/local/cuda*, Python's nvidia/cu13 wheels) on LD_LIBRARY_PATH;
#   2. the test binaries with DIFINFO_TEST_DEVICE=cuda: every model of a test on the GPU; the
#      plain path (what CUDA runs) against the fused CPU path at 1e-4 relative (log-probs,
#      gradients, three DPO/DPO-PG/LoRA steps, checkpointing, the chunked head, bf16);
#   3. the command line on a tiny model: `logps` and a one-step `dpo` on --device cpu and
#      --device cuda, compared (f32, 1e-4 relative);
#   4. the NCCL engine (where libnccl.so.2 is found): the one-step `dpo` of 3. as 1 rank
#      (DIFINFO_DIST=nccl) and, with NCCL ≥ 2.30, as 2 ranks on the one GPU
#      (NCCL_MULTI_RANK_GPU_ENABLE=1, NCCL_NVLS_ENABLE=0; torchrun's variables, the id through
#      DIFINFO_NCCL_ID_FILE; per-device batch 4 = the CPU run's 8), each against the CPU run
#      (f32, 1e-4 relative);
#   5. `bench` of SmolLM2-135M's configuration (134.5M parameters, random weights) on CUDA:
#      bf16 (f32 master weights) full, with --gradient-checkpointing, with --use-peft; and f32;
#      tokens/s, peak host RSS and model-FLOPs utilization against the H200's bf16 peak.
set -uo pipefail

cmd="${1:-}"
dir="${2:-target-gpu}"
root="$(cd "$(dirname "$0")/../.." && pwd)"
tests=(device_path gradients model_equivalence train_real_model)

prepare() {
  set -e
  cd "$root"
  local features="${GPU_CHECK_FEATURES-cuda}"
  rm -rf "$dir/nccl"
  if [[ -z "$features" ]]; then
    export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target}"
    pack "$(build_tests --release -p difinfo-trainer)"
    return
  fi
  local rel="${CUDA_RELEASE:-13.0}"
  local cap="${CUDA_COMPUTE_CAP:-90}"
  local tk="${CUDA_ROOT:-}"
  if [[ -z "$tk" || ! -x "$tk/bin/nvcc" ]]; then
    if command -v nvcc >/dev/null; then
      tk="$(dirname "$(dirname "$(command -v nvcc)")")"
    else
      tk="/tmp/cuda-$rel"
      [[ -x "$tk/bin/nvcc" ]] || CUDA_RELEASE="$rel" bash trainer/scripts/cuda_toolkit_from_pypi.sh "$tk"
    fi
  fi
  local ver
  ver="$("$tk/bin/nvcc" --version | sed -n 's/.*release \([0-9]*\)\.\([0-9]*\).*/\1 \2/p')"
  read -r major minor <<<"$ver"
  export CUDA_ROOT="$tk" PATH="$tk/bin:$PATH" CUDA_COMPUTE_CAP="$cap"
  export CUDARC_CUDA_VERSION="$((major * 1000 + minor * 10))"
  export LD_LIBRARY_PATH="$tk/lib64:${LD_LIBRARY_PATH:-}"
  export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target-cuda}"
  echo "toolkit $tk (CUDA $major.$minor), compute capability $cap, target $CARGO_TARGET_DIR"
  local args=(--release -p difinfo-trainer --features "$features")
  if ! ldconfig -p 2>/dev/null | grep -q 'libcuda.so.1' && [[ ! -e "$tk/lib64/libcuda.so.1" ]]; then
    # No driver here: a first build compiles cudarc (and fails to link), then the stand-in.
    cargo build "${args[@]}" || true
    CARGO_TARGET_DIR="$CARGO_TARGET_DIR" bash trainer/scripts/cuda_toolkit_from_pypi.sh "$tk" --stub-libcuda
  fi
  local t0=$SECONDS
  if [[ "${GPU_CHECK_NCCL:-1}" != 0 ]]; then
    # Built first, kept aside: the build of the tests below relinks difinfo-train without it.
    cargo build --release -p difinfo-trainer --features "$features,nccl,mpi"
    mkdir -p "$dir/nccl/lib"
    cp "$CARGO_TARGET_DIR/release/difinfo-train" "$dir/nccl/"
    # The MPI libraries it links (the GPU machine may have no Open MPI); not glibc's, not CUDA's.
    ldd "$dir/nccl/difinfo-train" | awk '$3 ~ /^\// {print $3}' |
      grep -E 'lib(mpi|open-rte|open-pal|hwloc|event|udev|z)[._-]' | xargs -r cp -L -t "$dir/nccl/lib"
  fi
  local exes
  exes="$(build_tests "${args[@]}")"
  echo "built in $((SECONDS - t0)) s"
  pack "$exes"
}

# Builds difinfo-train and the test binaries with cargo arguments "$@"; prints the tests' paths.
build_tests() {
  cargo build "$@" >&2
  local build=(cargo test "$@" --no-run --message-format=json)
  for t in "${tests[@]}"; do build+=(--test "$t"); done
  "${build[@]}" | jq -r 'select(.executable != null and .target.kind == ["test"]) | .executable'
}

# Packs difinfo-train, the test binaries "$1" (paths) and data/ into DIR/gpu_bins.tar.xz.
pack() {
  local out="$1"
  rm -rf "$dir/pack" && mkdir -p "$dir/pack/bin"
  cp "$CARGO_TARGET_DIR/release/difinfo-train" "$dir/pack/bin/"
  for exe in $out; do
    local name
    name="$(basename "$exe" | sed 's/-[0-9a-f]*$//')"
    cp "$exe" "$dir/pack/bin/$name"
  done
  strip "$dir"/pack/bin/*
  if [[ -d "$dir/nccl" ]]; then
    cp -r "$dir/nccl" "$dir/pack/bin/nccl"
    strip "$dir/pack/bin/nccl/difinfo-train"
  fi
  cp -r data "$dir/pack/data"
  XZ_OPT='--lzma2=preset=6,dict=256MiB' tar -C "$dir/pack" -cJf "$dir/gpu_bins.tar.xz" bin data
  rm -rf "$dir/pack"
  local size
  size="$(stat -c %s "$dir/gpu_bins.tar.xz")"
  echo "$dir/gpu_bins.tar.xz: $((size / 1048576)) MiB ($(tar -tJf "$dir/gpu_bins.tar.xz" | tr '\n' ' '))"
  if ((size > 60 * 1048576)); then
    echo "too large for the device tool's 64 MiB" >&2
    return 1
  fi
}

# Finds the directories of the CUDA libraries candle loads.
cuda_lib_path() {
  local dirs=()
  for d in "${CUDA_HOME:-}/lib64" /usr/local/cuda/lib64 /usr/local/cuda-*/lib64 \
    /usr/local/cuda/targets/x86_64-linux/lib /usr/lib/x86_64-linux-gnu; do
    [[ -e "$d/libcublas.so.13" || -e "$d/libcublas.so" ]] && dirs+=("$d")
  done
  local py
  for py in python3 /opt/torch/.venv/bin/python3; do
    command -v "$py" >/dev/null || continue
    local site
    site="$("$py" -c 'import nvidia, os; print(os.path.dirname(nvidia.__path__[0]))' 2>/dev/null)" || continue
    for d in "$site"/nvidia/cu13/lib "$site"/nvidia/*/lib; do
      [[ -d "$d" ]] && dirs+=("$d")
    done
  done
  local IFS=:
  echo "${dirs[*]}"
}

run() {
  cd "$root"
  local dev="${GPU_CHECK_DEVICE:-cuda}"
  local out="${OUT:-$dir/out}"
  mkdir -p "$out"
  exec > >(tee "$out/gpu_check.log") 2>&1
  local work
  work="$(mktemp -d)"
  tar -C "$work" -xJf "$dir/gpu_bins.tar.xz" || { echo "no $dir/gpu_bins.tar.xz: run prepare first"; return 1; }
  local bin="$work/bin"
  export LD_LIBRARY_PATH="$(cuda_lib_path):${LD_LIBRARY_PATH:-}"
  export DIFINFO_DATA_DIR="$work/data"
  echo "== GPU"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
  local failed=()
  echo "== tests on the GPU (DIFINFO_TEST_DEVICE=$dev)"
  for t in "${tests[@]}"; do
    echo "-- $t"
    DIFINFO_TEST_DEVICE="$dev" timeout 300 "$bin/$t" --test-threads=1 || failed+=("test $t")
  done
  echo "== command line: CPU vs CUDA on a tiny model (f32)"
  local T="$bin/difinfo-train" m="$work/tiny"
  "$T" init --size tiny --out "$m" || failed+=(init)
  # Output names by role ("cpu", "dev"), so the rehearsal with GPU_CHECK_DEVICE=cpu writes two runs.
  local role d
  for role in cpu dev; do
    d=cpu
    [[ "$role" == dev ]] && d="$dev"
    "$T" logps --model "$m" --data "$work/data/example_prefs.jsonl" --out "$work/logps-$role.jsonl" --device "$d" ||
      failed+=("logps $d")
    "$T" dpo --model "$m" --data "$work/data/example_prefs.jsonl" --output-dir "$work/dpo-$role" --device "$d" \
      --max-steps 1 --logging-steps 1 --learning-rate 1e-3 --save-steps 0 ||
      failed+=("dpo $d")
  done
  python3 - "$work" <<'PY' || failed+=("cpu-vs-cuda comparison")
import json, sys
w = sys.argv[1]
rel = lambda a, b: abs(a - b) / max(abs(b), 1e-12)
cpu = [json.loads(l) for l in open(f"{w}/logps-cpu.jsonl")]
gpu = [json.loads(l) for l in open(f"{w}/logps-dev.jsonl")]
worst = max(rel(g[k], c[k]) for c, g in zip(cpu, gpu) for k in ("chosen_logps", "rejected_logps"))
print(f"logps: {len(cpu)} pairs, max relative difference CUDA vs CPU {worst:.2e}")
mc = json.loads(open(f"{w}/dpo-cpu/metrics.jsonl").readline())
mg = json.loads(open(f"{w}/dpo-dev/metrics.jsonl").readline())
keys = ["loss", "grad_norm", "logps/chosen", "logps/rejected", "rewards/margins"]
for k in keys:
    print(f"dpo step 1 {k}: cpu {mc[k]:.8g} cuda {mg[k]:.8g} relative {rel(mg[k], mc[k]):.2e}")
bad = worst > 1e-4 or any(rel(mg[k], mc[k]) > 1e-4 for k in ["loss", "grad_norm", "logps/chosen", "logps/rejected"])
sys.exit(1 if bad else 0)
PY
  nccl_check "$dev" "$bin" "$work" "$m" || failed+=("nccl")
  echo "== bench: SmolLM2-135M's configuration on CUDA"
  local b=(bench --size smollm2-135m --device "$dev" --batch 8 --seq 512 --objective dpo --steps 5 --warmup 2)
  if [[ "$dev" == cpu ]]; then
    b=(bench --size tiny --batch 2 --seq 64 --objective dpo --steps 1 --warmup 1)
  fi
  timeout 240 "$T" "${b[@]}" --bf16 || failed+=("bench bf16")
  timeout 120 "$T" "${b[@]}" --bf16 --gradient-checkpointing || failed+=("bench bf16 ckpt")
  timeout 120 "$T" "${b[@]}" --bf16 --use-peft --lora-target-modules all-linear || failed+=("bench bf16 lora")
  timeout 120 "$T" "${b[@]}" || failed+=("bench f32")
  rm -rf "$work"
  if ((${#failed[@]})); then
    echo "FAILED: ${failed[*]}"
    return 1
  fi
  echo "ALL GPU CHECKS PASSED"
}

# The NCCL engine's one-step dpo (1 rank; 2 ranks on the one GPU where NCCL allows it) against
# the CPU run $3/dpo-cpu; skipped (not failed) without a GPU, a packed NCCL binary or libnccl.
nccl_check() {
  local dev="$1" bin="$2" work="$3" m="$4"
  local T="$bin/nccl/difinfo-train"
  echo "== NCCL engine: one-step dpo on the GPU vs the CPU (f32)"
  if [[ "$dev" != cuda* || ! -x "$T" ]]; then
    echo "skipped: no GPU or no NCCL binary packed"
    return 0
  fi
  local lib
  lib="$(IFS=:; for d in $LD_LIBRARY_PATH /usr/lib/x86_64-linux-gnu /usr/local/lib; do
    [[ -e "$d/libnccl.so.2" ]] && { echo "$d/libnccl.so.2"; break; }; done)"
  if [[ -z "$lib" ]]; then
    echo "skipped: no libnccl.so.2 on this machine (pip install nvidia-nccl-cu13)"
    return 0
  fi
  local ver
  ver="$(python3 -c 'import ctypes, sys
v = ctypes.c_int(); ctypes.CDLL(sys.argv[1]).ncclGetVersion(ctypes.byref(v)); print(v.value)' "$lib")"
  echo "NCCL $lib, version code $ver"
  local -x LD_LIBRARY_PATH="$LD_LIBRARY_PATH:$bin/nccl/lib"
  local args=(dpo --model "$m" --data "$work/data/example_prefs.jsonl" --device cuda --max-steps 1
    --logging-steps 1 --learning-rate 1e-3 --save-steps 0)
  local bad=0 runs=(nccl1)
  DIFINFO_DIST=nccl RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 timeout 300 "$T" "${args[@]}" \
    --output-dir "$work/dpo-nccl1" || bad=1
  if ((ver >= 23000)); then
    runs+=(nccl2)
    local r pids=()
    for r in 0 1; do
      NCCL_MULTI_RANK_GPU_ENABLE=1 NCCL_NVLS_ENABLE=0 DIFINFO_DIST=nccl RANK=$r WORLD_SIZE=2 \
        LOCAL_RANK=0 DIFINFO_NCCL_ID_FILE="$work/nccl-id" timeout 300 "$T" "${args[@]}" \
        --per-device-train-batch-size 4 --output-dir "$work/dpo-nccl2" &
      pids+=($!)
    done
    for r in "${pids[@]}"; do wait "$r" || bad=1; done
  else
    echo "2 ranks on one GPU skipped: NCCL $ver < 2.30 refuses them (Duplicate GPU detected)"
  fi
  python3 - "$work" "${runs[@]}" <<'PY' || bad=1
import json, sys
w, runs = sys.argv[1], sys.argv[2:]
rel = lambda a, b: abs(a - b) / max(abs(b), 1e-12)
mc = json.loads(open(f"{w}/dpo-cpu/metrics.jsonl").readline())
bad = False
for run in runs:
    mg = json.loads(open(f"{w}/dpo-{run}/metrics.jsonl").readline())
    for k in ["loss", "grad_norm", "logps/chosen", "logps/rejected", "rewards/margins"]:
        print(f"{run} dpo step 1 {k}: cpu {mc[k]:.8g} nccl {mg[k]:.8g} relative {rel(mg[k], mc[k]):.2e}")
    bad |= any(rel(mg[k], mc[k]) > 1e-4 for k in ["loss", "grad_norm", "logps/chosen", "logps/rejected"])
sys.exit(1 if bad else 0)
PY
  return "$bad"
}

case "$cmd" in
  prepare) prepare ;;
  run) run ;;
  *)
    sed -n '2,9p' "$0"
    exit 2
    ;;
esac
