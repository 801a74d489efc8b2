#!/usr/bin/env bash
# The GPU check, run from the repository root on a GPU machine with the
# binaries of scripts/build-cuda.sh in gpu/ (or its gpu/cuda-binaries.tar.xz,
# unpacked here) and python3 with torch,
# transformers and peft:
#   1. checks that the binaries find the CUDA libraries they were linked
#      against (build them with the machine's CUDA major version:
#      scripts/build-cuda.sh) and stops early, naming what is missing;
#   2. runs the parity tests (HF logits, loss, greedy generation, the PEFT
#      LoRA trajectory) on the GPU, f32 and bf16;
#   3. benches a bloomz-560m-shaped random BLOOM at block 512, micro-batch 4
#      (LoRA, full, eval, generation, a matmul) against PyTorch + PEFT on the
#      same GPU;
#   4. proves the NCCL path with one rank (`--ddp_backend nccl`: rendezvous,
#      communicator, a gradient all-reduce per step) against the same run
#      without a backend: the step losses must match.
# Everything goes to ${OUT:-gpu-results}/. See docs/performance.md.
set -uo pipefail
out="${OUT:-gpu-results}"
mkdir -p "$out"
if [ ! -x gpu/pt-host ] && [ -f gpu/cuda-binaries.tar.xz ]; then
    tar -C gpu -xJf gpu/cuda-binaries.tar.xz
fi
# pip's CUDA wheels (PyTorch's) and the toolkit's own directory.
site=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
for dir in "$site"/nvidia/cu*/lib "$site"/nvidia/*/lib /usr/local/cuda/lib64; do
    [ -d "$dir" ] && LD_LIBRARY_PATH="$dir:${LD_LIBRARY_PATH:-}"
done
export LD_LIBRARY_PATH
ldd gpu/pt-host | grep -E "cublas|cudart|curand|nccl|libcuda" | tee "$out/libraries.txt"
if grep -q "not found" "$out/libraries.txt" || ! LD_BIND_NOW=1 gpu/pt-host --version; then
    echo "the CUDA libraries pt-host was linked against are missing here: rebuild with this machine's CUDA version (scripts/build-cuda.sh)" >&2
    exit 1
fi
if ! nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"; then
    echo "no GPU here (nvidia-smi failed)" >&2
    exit 1
fi
for tests in model trajectory; do
    PT_TEST_DEVICE=cuda "gpu/$tests-tests" --test-threads 1 2>&1 | tee "$out/$tests-tests.txt"
done
gpu/pt-host bench --device_map cuda --torch always --scaling false \
    --only lora,full,eval,generate,matmul --steps 5 --new_tokens 128 \
    --hidden_size 1024 --n_layer 24 --n_head 16 --vocab_size 250880 \
    --block_size 512 --batch_size 4 2>&1 | tee "$out/bench.txt"
for backend in none nccl; do
    flags=(); [ "$backend" = nccl ] && flags=(--ddp_backend nccl)
    gpu/pt-host run --model_name_or_path tests/fixtures/bloom-tiny/model \
        --train_file_dir tests/fixtures/bloom-tiny/train.txt --block_size 32 \
        --do_train --device_map cuda --torch_dtype float32 --max_steps 5 --logging_steps 1 \
        --save_strategy no --disable_tqdm --overwrite_output_dir --cache_dir "$out/cache" \
        --output_dir "$out/one-rank-$backend" "${flags[@]}" 2>&1 | tee "$out/one-rank-$backend.txt"
done
python3 - "$out" <<'PY' | tee "$out/nccl-check.txt"
import json, sys
losses = {}
for backend in ("none", "nccl"):
    lines = open(f"{sys.argv[1]}/one-rank-{backend}/trainer_log.jsonl").read().splitlines()
    losses[backend] = [json.loads(l)["loss"] for l in lines if '"loss"' in l]
worst = max(abs(a - b) for a, b in zip(losses["none"], losses["nccl"]))
print(f"one-rank NCCL vs no backend: {len(losses['nccl'])} steps, largest loss difference {worst:.3g}")
PY
