#!/usr/bin/env bash
# Assembles a CUDA toolkit from NVIDIA's PyPI wheels into DIR (default
# /opt/cuda-pypi): nvcc, the runtime, cuBLAS, cuRAND, NVRTC and NCCL, with headers
# and the unversioned library names a linker needs. Use it to build pt-host for
# a GPU machine whose CUDA is newer than the local one (Debian's nvcc is 11.8;
# a binary linked against it needs libcublas.so.11 at run time, which a CUDA
# 13 machine does not have):
#   scripts/cuda-toolkit-from-pypi.sh 13.2 /opt/cuda13
#   CUDA_ROOT=/opt/cuda13 scripts/build-cuda.sh
# Match the GPU machine's CUDA major version (its PyTorch's `torch.version.cuda`).
set -euo pipefail
version="${1:-13.2}"
dir="${2:-/opt/cuda-pypi}"
major="${version%%.*}"
wheels="$dir/.wheels"
python3 -m pip install --quiet --target "$wheels" \
    "nvidia-cuda-nvcc==$version.*" "nvidia-cuda-runtime==$version.*" \
    "nvidia-cuda-nvrtc==$version.*" "nvidia-cublas" "nvidia-curand" \
    "nvidia-cuda-cccl==$version.*" "nvidia-nvvm==$version.*" "nvidia-cuda-crt==$version.*" \
    "nvidia-nccl-cu$major"
# (nvvm and crt pinned too: left free, pip takes the newest, whose PTX this
# version's ptxas rejects.)
# Wheels for CUDA 13 install under nvidia/cu13; older ones under nvidia/<component>.
for tree in "$wheels"/nvidia/cu"$major" "$wheels"/nvidia/*/; do
    [ -d "$tree" ] && cp -rsn "$(realpath "$tree")"/. "$dir"/
done
cd "$dir/lib"
for lib in cublas cublasLt cudart curand nvrtc nccl; do
    versioned=$(ls "lib$lib.so."* 2>/dev/null | sort | head -1)
    [ -n "$versioned" ] || { echo "lib$lib.so.* missing from the wheels" >&2; exit 1; }
    ln -sf "$versioned" "lib$lib.so"
done
ln -sfn lib "$dir/lib64"
"$dir/bin/nvcc" --version | tail -2
