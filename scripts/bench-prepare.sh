#!/usr/bin/env bash
# Data preparation at scale, beside HF datasets (issue 19's benchmark): for
# each size (MB), a corpus made by `pt-host make-corpus` from the shipped one
# is prepared by `pt-host prepare` and by bench/prepare_reference.py
# (MedicalGPT's HF datasets path), with the same tokenizer, workers and block
# size, each from a cold cache. Prints MB/s and peak RSS (the whole process
# tree, bench/peak_rss.py) side by side, and the ratios.
# Usage: scripts/bench-prepare.sh [SIZE_MB ...]   (default: 256 1024 4096)
# WORKERS (default 2), BENCH_DIR (default: a temporary directory; needs about
# 5× the largest size free). COPIES=N instead prepares N copies of the shipped
# corpus (each line of data/pretrain a JSON-lines document; 20 copies are
# issue 21's 24 MB corpus), and SIZE_MB arguments are ignored.
set -euo pipefail
cd "$(dirname "$0")/.."
sizes=("$@")
[ ${#sizes[@]} -gt 0 ] || sizes=(256 1024 4096)
workers="${WORKERS:-2}"
export HF_DATASETS_DISABLE_PROGRESS_BARS=1 TRANSFORMERS_VERBOSITY=error
venv="$HOME/.cache/pt-host/bench-venv"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install -q 'datasets>=4' 'transformers>=4.40'
cargo build --release -p pt-host
bin="${CARGO_TARGET_DIR:-target}/release/pt-host"
work="${BENCH_DIR:-$(mktemp -d)}"
mkdir -p "$work"
[ -f "$work/model/tokenizer.json" ] ||
    "$bin" init-model --train_file_dir data/pretrain --output_dir "$work/model" >/dev/null
printf '%8s  %22s  %22s  %8s  %8s\n' size "pt-host MB/s, peak" "HF datasets MB/s, peak" speed memory
if [ -n "${COPIES:-}" ]; then
    corpus="$work/copies-$COPIES"
    mkdir -p "$corpus/corpus"
    python3 - "$COPIES" "$corpus/corpus" <<'PY'
import glob, json, sys
copies, out = int(sys.argv[1]), sys.argv[2]
lines = [l.rstrip("\n") for f in sorted(glob.glob("data/pretrain/*.txt")) for l in open(f, encoding="utf-8")]
text = "".join(json.dumps({"text": l}, ensure_ascii=False) + "\n" for l in lines if l.strip())
for i in range(copies):
    open(f"{out}/copy-{i:02}.jsonl", "w", encoding="utf-8").write(text)
PY
    sizes=("$(python3 -c 'import glob, os, sys; print(sum(map(os.path.getsize, glob.glob(sys.argv[1] + "/*.jsonl"))) / 1e6)' "$corpus/corpus")")
fi
for size in "${sizes[@]}"; do
    corpus="${COPIES:+$work/copies-$COPIES}"
    if [ -z "$corpus" ]; then
        corpus="$work/corpus-$size"
        [ -d "$corpus/corpus" ] ||
            "$bin" make-corpus --train_file_dir data/pretrain --output_dir "$corpus" --size_mb "$size" >/dev/null
    fi
    rm -rf "$work/ours" "$work/hf-cache"
    ours=$(python3 bench/peak_rss.py "$bin" prepare --model_name_or_path "$work/model" \
        --train_file_dir "$corpus/corpus" --output_dir "$work/ours" --cache_dir "$work/ours/cache" \
        --preprocessing_num_workers "$workers" --block_size 1024 --disable_tqdm)
    # Disk for the reference's Arrow files (about 3× the corpus).
    rm -rf "$work/ours"
    theirs=$(python3 bench/peak_rss.py "$venv/bin/python" bench/prepare_reference.py \
        "$corpus/corpus" "$work/model" "$work/hf-cache" "$workers" 1024)
    rm -rf "$work/hf-cache"
    python3 - "$size" "$ours" "$theirs" <<'PY'
import json, sys
size, ours, theirs = float(sys.argv[1]), json.loads(sys.argv[2]), json.loads(sys.argv[3])
rate = lambda r: size / r["seconds"]
gb = lambda r: r["peak_rss"] / 2**30
print(f"{size:6.0f}MB  {rate(ours):10.1f} {gb(ours):8.2f} GiB  {rate(theirs):10.1f} {gb(theirs):8.2f} GiB  "
      f"{rate(ours) / rate(theirs):7.2f}×  {gb(ours) / gb(theirs):7.2f}×")
PY
done
