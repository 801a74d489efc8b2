#!/usr/bin/env bash
# The quick start: cleans, tokenizes and packs the shipped medical corpus
# (data/pretrain) with the medical_clean plugin and the bundled tiny BLOOM
# tokenizer. Outputs land in out/quickstart/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build-plugins.sh
target="${CARGO_TARGET_DIR:-target}"
cargo run --release -p pt-host -- prepare \
    --plugin "$target/wasm32-wasip2/release/medical_clean.wasm" \
    --plugin_config 'medical_clean={"min_chars": 10}' \
    --train_file_dir data/pretrain \
    --model_name_or_path tests/fixtures/bloom-tiny/model \
    --block_size 512 \
    --output_dir out/quickstart "$@"
