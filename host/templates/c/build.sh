#!/usr/bin/env bash
# Needs clang, lld, wasi-libc and libclang-rt-14-dev-wasm32 (Debian), and
# `cargo install wit-bindgen-cli wasm-tools`.
set -euo pipefail
cd "$(dirname "$0")"
mkdir -p build
wit-bindgen c wit --world filter-plugin --out-dir build >/dev/null 2>&1
clang --target=wasm32-wasi --sysroot=/usr -O2 -Wall -mexec-model=reactor -Wl,--strip-debug -I build \
    -o build/{{name}}.core.wasm plugin.c build/filter_plugin.c build/filter_plugin_component_type.o
wasm-tools component new build/{{name}}.core.wasm -o {{name}}.wasm
