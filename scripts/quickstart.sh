#!/usr/bin/env bash
# The quick start: the main job on the embedded default, in about three
# minutes on 2 CPU cores. Builds a tiny BLOOM here (a BPE tokenizer trained on
# the shipped corpus, random weights), cleans, tokenizes and packs the corpus
# (data/pretrain) with the medical_clean plugin, trains every weight while
# evaluating (perplexity falls from ~4096 to ~140), samples from the result,
# and reports base vs trained (docs/benchmarks.md). Outputs land in
# out/quickstart/ and out/quickstart-report/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build-plugins.sh
cargo build --release -p pt-host
target="${CARGO_TARGET_DIR:-target}"
pt_host="$target/release/pt-host"

# The example plugins go into the local plugin store as bundles signed by this
# machine's own key: `--plugin medical_clean.wasm` then works from any directory.
bash scripts/install-plugins.sh "$pt_host"
"$pt_host" init-model --preset tiny --train_file_dir data/pretrain --output_dir out/quickstart-model
# The training run is a recipe (its plugin: medical_clean.wasm, from the store).
"$pt_host" run examples/quickstart.yaml "$@"
echo "--- samples from out/quickstart"
"$pt_host" generate --model_name_or_path out/quickstart \
    --prompt "发热是" --prompt "传染病的" --prompt "The history of" \
    --do_sample --temperature 0.8 --top_k 40 --repetition_penalty 1.2 --max_new_tokens 40
echo "--- base vs trained: out/quickstart-report"
"$pt_host" eval --model_name_or_path out/quickstart --base_model_name_or_path out/quickstart-model \
    --use_peft false --block_size 128 --disable_tqdm \
    --validation_file_dir data/pretrain/fever.txt --general_file_dir data/pretrain/en_article_tail500.txt \
    --plugin medqa_tasks --eval_tasks examples/tasks/fever_zh.jsonl,medqa=examples/tasks/medqa_sample.jsonl \
    --output_dir out/quickstart-report
