#!/usr/bin/env bash
# The quick start: the main job on the embedded default. Cleans, tokenizes and
# packs the shipped medical corpus (data/pretrain) with the medical_clean
# plugin, then trains a LoRA adapter on the bundled tiny BLOOM
# (tests/fixtures/bloom-tiny) and evaluates it. Outputs land in out/quickstart/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build-plugins.sh
target="${CARGO_TARGET_DIR:-target}"
cargo run --release -p pt-host -- run \
    --plugin "$target/wasm32-wasip2/release/medical_clean.wasm" \
    --plugin_config 'medical_clean={"min_chars": 10}' \
    --train_file_dir data/pretrain \
    --validation_split_percentage 1 \
    --model_name_or_path tests/fixtures/bloom-tiny/model \
    --block_size 128 \
    --do_train --do_eval \
    --use_peft True --lora_rank 16 --lora_alpha 32 --lora_dropout 0.05 \
    --per_device_train_batch_size 8 --learning_rate 2e-3 --max_steps 60 \
    --logging_steps 10 --eval_strategy steps --eval_steps 30 --save_steps 30 \
    --output_dir out/quickstart --overwrite_output_dir "$@"
