#!/usr/bin/env bash
# Builds, on a machine with nvcc (Debian: nvidia-cuda-toolkit from non-free),
# what bench/gpu_check.sh runs on a GPU machine that has no Rust toolchain:
# pt-host and the two parity-test binaries with --features cuda, stripped,
# into gpu/ (about 60 MiB, small enough to carry). CUDA_COMPUTE_CAP (default
# 80) picks the kernels' PTX target; newer GPUs JIT it.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v nvcc >/dev/null || {
    echo "nvcc is needed: apt-get install nvidia-cuda-toolkit (Debian non-free)" >&2
    exit 1
}
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-80}"
export CARGO_TARGET_DIR="${CUDA_TARGET_DIR:-target-cuda}"
cargo build --release --features cuda -p pt-host
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
strip gpu/*
ls -la gpu
