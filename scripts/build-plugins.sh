#!/usr/bin/env bash
# Builds the example plugins (plugins/) and the test guests (tests/guests/) as
# WebAssembly components into $CARGO_TARGET_DIR/wasm32-wasip2/release/.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! rustup target list --installed | grep -qx wasm32-wasip2; then
    rustup target add wasm32-wasip2
fi
out="${CARGO_TARGET_DIR:-target}/wasm32-wasip2/release"
# The hostile guest once more, naming itself with terminal escapes.
cargo build --release --target wasm32-wasip2 -p hostile --features evil_id
cp "$out/hostile.wasm" "$out/hostile_evil_id.wasm"
cargo build --release --target wasm32-wasip2 \
    -p medical_clean -p augment_eda -p domain_terms -p medqa_tasks -p length_filter -p hostile
# The native-plugin example (a shared library for --allow_native).
cargo build --release -p length_filter_native
echo "plugins: ${CARGO_TARGET_DIR:-target}/wasm32-wasip2/release/{medical_clean,augment_eda,domain_terms,medqa_tasks}.wasm"
