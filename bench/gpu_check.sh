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
#      same GPU.
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
ldd gpu/pt-host | grep -E "cublas|cudart|curand|libcuda" | tee "$out/libraries.txt"
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
