#!/usr/bin/env bash
# Installs what `cargo build -p difinfo-trainer --features mpi` and its tests need, from
# Debian's (or Ubuntu's) packages, when it is missing: Open MPI (`libopenmpi-dev` for the
# headers and `mpicc` that rsmpi's build reads, `openmpi-bin` for `mpirun`) and libclang
# (`libclang-dev`, for the bindgen run of mpi-sys). Does nothing when all are present.
#
# Non-interactive and idempotent; runs apt-get as root, or through sudo when not root.
# Usage: trainer/scripts/install_mpi.sh
set -euo pipefail

have_mpi() {
    command -v mpirun >/dev/null 2>&1 && command -v mpicc >/dev/null 2>&1
}

have_libclang() {
    # bindgen (clang-sys) loads libclang.so / libclang-N.so; LIBCLANG_PATH points to it
    # when it is not where the linker looks.
    if [ -n "${LIBCLANG_PATH:-}" ] && ls "$LIBCLANG_PATH"/libclang*.so* >/dev/null 2>&1; then
        return 0
    fi
    ldconfig -p 2>/dev/null | grep -q 'libclang\(-[0-9.]*\)\?\.so' && return 0
    ls /usr/lib/llvm-*/lib/libclang*.so* >/dev/null 2>&1
}

if have_mpi && have_libclang; then
    echo "install_mpi.sh: mpirun, mpicc and libclang present ($(mpirun --version 2>/dev/null | head -n 1))"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_mpi.sh: no apt-get here; install Open MPI (or MPICH) with its headers and" \
        "libclang with this system's package manager" >&2
    exit 1
fi

if [ "$(id -u)" -eq 0 ]; then
    SUDO=()
elif command -v sudo >/dev/null 2>&1; then
    SUDO=(sudo -n)
else
    echo "install_mpi.sh: not root and no sudo: cannot install libopenmpi-dev openmpi-bin" \
        "libclang-dev" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
apt_install() {
    "${SUDO[@]}" apt-get install -y --no-install-recommends "$@"
}

packages=(libopenmpi-dev openmpi-bin libclang-dev)
echo "install_mpi.sh: installing ${packages[*]}"
# Refresh the package lists only when the packages cannot be found in them (a fresh
# container's lists are empty).
if ! apt_install "${packages[@]}"; then
    "${SUDO[@]}" apt-get update
    apt_install "${packages[@]}"
fi

if ! have_mpi || ! have_libclang; then
    echo "install_mpi.sh: installed ${packages[*]}, but mpirun, mpicc or libclang is still missing" >&2
    exit 1
fi
echo "install_mpi.sh: $(mpirun --version | head -n 1)"
