#!/usr/bin/env bash
# Builds the example plugins written in other languages into
# $CARGO_TARGET_DIR/wasm32-wasip2/release/ next to the Rust ones, installing
# the toolchains it needs when they are missing:
#   Python: componentize-py (PyPI)   -> zh_normalize.wasm
#   JavaScript: componentize-js (npm) -> markdown_strip.wasm
#   C:      clang + wasi-libc (Debian), wit-bindgen-cli and wasm-tools (crates.io)
#                                    -> length_filter.wasm
set -euo pipefail
cd "$(dirname "$0")/.."
out="${CARGO_TARGET_DIR:-target}/wasm32-wasip2/release"
mkdir -p "$out"

# Python
if ! command -v componentize-py >/dev/null; then
    python3 -m pip install --quiet componentize-py==0.25.1 \
        || python3 -m pip install --quiet --break-system-packages componentize-py==0.25.1
fi
componentize-py -d wit/since_v0.1.0 -w mapper-plugin componentize \
    -p plugins/zh_normalize_py app -o "$out/zh_normalize.wasm" >/dev/null
echo "plugins: $out/zh_normalize.wasm (Python)"

# JavaScript
tools="${CARGO_TARGET_DIR:-target}/lang-tools"
componentize_js="$tools/node_modules/.bin/componentize-js"
if [ ! -x "$componentize_js" ]; then
    mkdir -p "$tools"
    npm install --prefix "$tools" --no-audit --no-fund --silent @bytecodealliance/componentize-js@0.23.0
fi
# No HTTP: a pt-host plugin has no network, and the host links no wasi:http.
"$componentize_js" plugins/markdown_strip_js/plugin.js --wit wit/since_v0.1.0 -n mapper-plugin \
    -d http fetch-event -o "$out/markdown_strip.wasm" >/dev/null
echo "plugins: $out/markdown_strip.wasm (JavaScript)"
