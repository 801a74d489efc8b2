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
# The TensorBoard test reads the event files back with TensorBoard's own reader.
if ! python3 -c "import tensorboard" 2>/dev/null; then
    python3 -m pip install --quiet tensorboard \
        || python3 -m pip install --quiet --break-system-packages tensorboard
fi
export PT_REQUIRE_TENSORBOARD=1
cargo test --workspace --features pt-host/mpi "$@"
