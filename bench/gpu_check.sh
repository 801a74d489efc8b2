#!/usr/bin/env bash
# The GPU check, run from the repository root on a GPU machine with the
# binaries of scripts/build-cuda.sh in gpu/ and python3 with torch,
# transformers and peft:
#   1. makes the GPU's CUDA libraries findable: the binaries were built
#      against CUDA 11.8 and cudarc looks for libcublas.so, .so.11 or .so.12,
#      while the machine may have only .so.13 (pip's nvidia wheels);
#   2. runs the parity tests (HF logits, loss, greedy generation, the PEFT
#      LoRA trajectory) on the GPU, f32 and bf16;
#   3. benches a bloomz-560m-shaped random BLOOM at block 512, micro-batch 4
#      (LoRA, full, eval, generation, a matmul) against PyTorch + PEFT on the
#      same GPU.
# Everything goes to ${OUT:-gpu-results}/. See docs/performance.md.
set -uo pipefail
out="${OUT:-gpu-results}"
mkdir -p "$out"
libs=$(mktemp -d)
site=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
for lib in cublas cublasLt curand nvrtc; do
    found=$(find "$site/nvidia" /usr/local/cuda*/lib64 /usr/lib/x86_64-linux-gnu \
        -name "lib$lib.so*" 2>/dev/null | sort | head -1)
    if [ -n "$found" ]; then
        ln -sf "$found" "$libs/lib$lib.so"
        # nvrtc loads its builtins from its own directory's neighbours.
        LD_LIBRARY_PATH="$(dirname "$found"):${LD_LIBRARY_PATH:-}"
    fi
    echo "lib$lib.so -> ${found:-NOT FOUND}" | tee -a "$out/libraries.txt"
done
export LD_LIBRARY_PATH="$libs:$LD_LIBRARY_PATH"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
for tests in model trajectory; do
    PT_TEST_DEVICE=cuda "gpu/$tests-tests" --test-threads 1 2>&1 | tee "$out/$tests-tests.txt"
done
gpu/pt-host bench --device_map cuda --torch always --scaling false \
    --only lora,full,eval,generate,matmul --steps 5 --new_tokens 128 \
    --hidden_size 1024 --n_layer 24 --n_head 16 --vocab_size 250880 \
    --block_size 512 --batch_size 4 2>&1 | tee "$out/bench.txt"
