#!/usr/bin/env bash
# The whole test suite: builds the plugin components the tests load, then runs
# every crate's unit, integration and doc tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build-plugins.sh
bash scripts/build-lang-plugins.sh
sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
# The registry tests push to and pull from a real OCI registry on loopback.
if [ ! -x /usr/bin/docker-registry ]; then
    $sudo apt-get install -y --no-install-recommends docker-registry >/dev/null
fi
export PT_REQUIRE_REGISTRY=1
# The data-parallel tests run `mpirun -n 2` on loopback: pt-host builds with
# --features mpi (rsmpi binds the system's Open MPI through libclang).
if ! dpkg -s libopenmpi-dev openmpi-bin libclang-dev >/dev/null 2>&1; then
    $sudo apt-get install -y --no-install-recommends libopenmpi-dev openmpi-bin libclang-dev >/dev/null
fi
export PT_REQUIRE_MPI=1
# The interop tests run HF's own code: PEFT loads our adapter, transformers
# our merged model, bitsandbytes our 4-bit base, the fixture's reference
# numbers are recomputed, and TensorBoard's reader reads our events. torch,
# transformers, peft, bitsandbytes and tensorboard go into a virtual
# environment outside the clone, reused across runs (5.7 GB, about 2½
# minutes to install from nothing here).
venv="${PT_PYTHON_VENV:-$HOME/.cache/pt-host/python-venv}"
if ! "$venv/bin/python" -c "import torch, transformers, peft, bitsandbytes, tensorboard" 2>/dev/null; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check \
        torch==2.15.0 transformers==5.24.0 peft==0.21.2 bitsandbytes==0.50.2 tensorboard
fi
export PATH="$venv/bin:$PATH"
export PT_REQUIRE_PYTHON=1 PT_REQUIRE_TENSORBOARD=1
# The live progress bar is tested on a pseudo-terminal made by `script`.
if ! command -v script >/dev/null; then
    $sudo apt-get install -y --no-install-recommends bsdutils >/dev/null
fi
export PT_REQUIRE_TERMINAL=1
cargo test --workspace --features pt-host/mpi "$@"
