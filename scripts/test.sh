#!/usr/bin/env bash
# The whole test suite: builds the plugin components the tests load, then runs
# every crate's unit, integration and doc tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build-plugins.sh
bash scripts/build-lang-plugins.sh
cargo test --workspace "$@"
