#!/usr/bin/env bash
# Assembles a CUDA 13.2 toolkit from NVIDIA's PyPI wheels into $1 (default /tmp/cuda), enough to
# build `difinfo-train` with `--features cuda` on a machine without a system CUDA toolkit:
# nvcc + ptxas, NVVM (cicc, libdevice), the CRT and runtime headers, CCCL, and the libraries
# candle links (cudart, cuBLAS, cuBLASLt, cuRAND, NVRTC), and NCCL (nvidia-nccl-cu13 ≥ 2.30:
# cudarc links libnccl at build time under the `nccl` feature). The driver library libcuda.so.1 comes
# with the NVIDIA driver and is not on PyPI; with --stub-libcuda (for a compile-and-link check
# on a machine without a GPU) an empty stand-in is built from the symbols cudarc references.
#
# Usage:
#   trainer/scripts/cuda_toolkit_from_pypi.sh /tmp/cuda [--stub-libcuda]
#   export CUDA_ROOT=/tmp/cuda PATH=/tmp/cuda/bin:$PATH CUDARC_CUDA_VERSION=13020 CUDA_COMPUTE_CAP=90
#   export LD_LIBRARY_PATH=/tmp/cuda/lib64:$LD_LIBRARY_PATH
#   cargo build --release -p difinfo-trainer --features cuda
#
# The versions are pinned to one release (13.2): nvcc refuses headers of another release, and
# cudarc 0.19 (candle 0.11) knows CUDA up to 13.4, so CUDARC_CUDA_VERSION must name it.
set -euo pipefail
root="${1:-/tmp/cuda}"
stub=false
[[ "${2:-}" == "--stub-libcuda" ]] && stub=true
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# CUDA_RELEASE picks another 13.x release (13.0 for a driver of the 580 series: the driver must
# accept the PTX that this nvcc writes).
rel="${CUDA_RELEASE:-13.2}"
nvcc_pin="nvidia-cuda-nvcc==$rel.*"
[[ "$rel" == "13.2" ]] && nvcc_pin="nvidia-cuda-nvcc==13.2.86"
pip download --no-deps -d "$work/wheels" \
  "$nvcc_pin" "nvidia-nvvm==$rel.*" "nvidia-cuda-crt==$rel.*" \
  "nvidia-cuda-runtime==$rel.*" "nvidia-cuda-cccl==$rel.*" "nvidia-cublas==13.*" \
  "nvidia-cuda-nvrtc==$rel.*" "nvidia-curand==10.*" "nvidia-nccl-cu13>=2.30"
for w in "$work"/wheels/*.whl; do python3 -m zipfile -e "$w" "$work/x"; done
src="$work/x/nvidia/cu13"
mkdir -p "$root"/{bin,include,lib64,nvvm}
cp -r "$src"/bin/* "$root/bin/"
cp -r "$src"/nvvm/* "$root/nvvm/"
cp -r "$src"/include/* "$root/include/"
cp -r "$src"/lib/* "$root/lib64/"
cp -r "$work"/x/nvidia/nccl/include/* "$root/include/"
cp -r "$work"/x/nvidia/nccl/lib/* "$root/lib64/"
chmod +x "$root"/bin/* "$root"/nvvm/bin/*
cd "$root/lib64"
for f in lib*.so.*; do
  base="${f%%.so.*}.so"
  [[ -e "$base" ]] || ln -s "$f" "$base"
done
if $stub; then
  # Link-time stand-in only: every function does nothing. Never run GPU code against it.
  echo "building a libcuda stub; needs a cudarc rlib from a previous cuda build attempt" >&2
  rlib="$(ls -t "${CARGO_TARGET_DIR:-target}"/release/deps/libcudarc-*.rlib 2>/dev/null | head -1 || true)"
  if [[ -z "$rlib" ]]; then
    echo "no libcudarc rlib found: run the cuda build once (it fails at the link step), then rerun" >&2
    exit 1
  fi
  nm "$rlib" 2>/dev/null | awk '$1 == "U" && $2 ~ /^cu[A-Z]/ {print "void " $2 "(void) {}"}' | sort -u > "$work/stub.c"
  gcc -shared -fPIC -o "$root/lib64/libcuda.so" "$work/stub.c" -Wl,-soname,libcuda.so.1
  ln -sf libcuda.so "$root/lib64/libcuda.so.1"
fi
"$root/bin/nvcc" --version | tail -1
