#!/usr/bin/env bash
# Builds, on a machine with nvcc, what bench/gpu_check.sh runs on a GPU machine
# that has no Rust toolchain: pt-host and the two parity-test binaries with
# --features cuda, stripped, into gpu/, and packed as gpu/cuda-binaries.tar.xz
# (about 25 MiB: the kernels' PTX compresses well; carry that file, the
# binaries are 175 MiB). CUDA_COMPUTE_CAP (default 80) picks the
# kernels' PTX target; newer GPUs JIT it.
#
# The binaries link the CUDA libraries of the toolkit they are built with
# (libcublas.so.N, libcudart.so.N, with versioned symbols), so build with the
# GPU machine's major version: Debian's nvidia-cuda-toolkit (non-free) is 11.8;
# for CUDA 13, `scripts/cuda-toolkit-from-pypi.sh 13.2 /opt/cuda13` and then
# `CUDA_ROOT=/opt/cuda13 scripts/build-cuda.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${CUDA_ROOT:-}" ]; then
    export PATH="$CUDA_ROOT/bin:$PATH"
fi
command -v nvcc >/dev/null || {
    echo "nvcc is needed: apt-get install nvidia-cuda-toolkit (Debian non-free), or CUDA_ROOT (see above)" >&2
    exit 1
}
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-80}"
export CARGO_TARGET_DIR="${CUDA_TARGET_DIR:-target-cuda}"
# NCCL too: the data-parallel backend for GPUs (libnccl from the toolkit dir).
cargo build --release --features cuda,nccl -p pt-host
# The test executables, by target name, from cargo's build messages.
tests=$(cargo test --release --features cuda -p pt-model -p pt-train --no-run --message-format=json |
    python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] in ("model", "trajectory") and m.get("executable"):
        print(m["target"]["name"], m["executable"])')
mkdir -p gpu
cp "$CARGO_TARGET_DIR/release/pt-host" gpu/pt-host
while read -r name executable; do
    cp "$executable" "gpu/$name-tests"
done <<<"$tests"
strip gpu/pt-host gpu/*-tests
tar -C gpu -cJf gpu/cuda-binaries.tar.xz pt-host model-tests trajectory-tests
ls -la gpu
echo "CUDA libraries the binaries need at run time:"
ldd gpu/pt-host | grep -E "cublas|cudart|curand|nccl|libcuda" || true
