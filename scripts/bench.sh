#!/usr/bin/env bash
# The benchmark: training (LoRA, full), evaluation, generation, a matmul,
# data preparation with and without a plugin, and the sandbox's cost, each
# beside PyTorch + PEFT on the same work when python3 has torch, transformers
# and peft; then how LoRA training scales. About 3 minutes on 2 CPU cores.
# Extra flags go to `pt-host bench` (e.g. --torch never, --scaling false).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build-plugins.sh >/dev/null
# With Open MPI installed (libopenmpi-dev, openmpi-bin, libclang-dev), the
# bench also measures the gradient all-reduce between 2 ranks.
features=()
if dpkg -s libopenmpi-dev openmpi-bin libclang-dev >/dev/null 2>&1; then
    features=(--features mpi)
fi
cargo build --release -p pt-host "${features[@]}"
target="${CARGO_TARGET_DIR:-target}"
"$target/release/pt-host" bench \
    --plugin "$target/wasm32-wasip2/release/medical_clean.wasm" \
    --plugin_pair "$target/wasm32-wasip2/release/length_filter.wasm,$target/release/liblength_filter_native.so" \
    "$@"
