#!/usr/bin/env bash
# Builds the example plugins written in other languages into
# $CARGO_TARGET_DIR/wasm32-wasip2/release/ next to the Rust ones, installing
# the toolchains it needs when they are missing:
#   Python: componentize-py (PyPI)   -> zh_normalize.wasm
#   JavaScript: componentize-js (npm) -> markdown_strip.wasm
#   C:      clang + wasi-libc (Debian), wit-bindgen-cli and wasm-tools (crates.io)
#                                    -> length_filter_c.wasm
# plus length_filter's rules in Python and JavaScript (plugins/length_filter_py, _js),
# for the language benchmark and the cross-language agreement test.
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
componentize-py -d wit/since_v0.1.0 -w filter-plugin componentize \
    -p plugins/length_filter_py app -o "$out/length_filter_py.wasm" >/dev/null
echo "plugins: $out/zh_normalize.wasm, length_filter_py.wasm (Python)"

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
"$componentize_js" plugins/length_filter_js/plugin.js --wit wit/since_v0.1.0 -n filter-plugin \
    -d http fetch-event -o "$out/length_filter_js.wasm" >/dev/null
echo "plugins: $out/markdown_strip.wasm, length_filter_js.wasm (JavaScript)"

# C: clang + wasi-libc give a core module without WASI imports (no stdio);
# wit-bindgen c writes the bindings, wasm-tools wraps the module as a component.
if ! command -v clang >/dev/null || [ ! -f /usr/lib/wasm32-wasi/libc.a ] \
    || ! ls /usr/lib/llvm-*/lib/clang/*/lib/wasi/libclang_rt.builtins-wasm32.a >/dev/null 2>&1; then
    sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
    $sudo apt-get install -y --no-install-recommends clang lld wasi-libc libclang-rt-14-dev-wasm32 >/dev/null
fi
command -v wit-bindgen >/dev/null || cargo install --locked --quiet wit-bindgen-cli@0.61.1
command -v wasm-tools >/dev/null || cargo install --locked --quiet wasm-tools@1.263.0
build="${CARGO_TARGET_DIR:-target}/lang-tools/length_filter"
mkdir -p "$build"
wit-bindgen c wit/since_v0.1.0 --world filter-plugin --out-dir "$build" >/dev/null 2>&1
clang --target=wasm32-wasi --sysroot=/usr -O2 -Wall -Werror -mexec-model=reactor -Wl,--strip-debug \
    -I "$build" -o "$build/length_filter.core.wasm" plugins/length_filter_c/length_filter.c \
    "$build/filter_plugin.c" "$build/filter_plugin_component_type.o"
wasm-tools component new "$build/length_filter.core.wasm" -o "$out/length_filter_c.wasm"
echo "plugins: $out/length_filter_c.wasm (C)"

# A test guest: the same C filter built against a future interface version,
# which this host must refuse with what to rebuild against.
future="$build/future"
mkdir -p "$future/wit"
sed 's/pt:plugin@0\.1\.0/pt:plugin@0.3.0/' wit/since_v0.1.0/plugin.wit > "$future/wit/plugin.wit"
wit-bindgen c "$future/wit" --world filter-plugin --out-dir "$future" >/dev/null 2>&1
clang --target=wasm32-wasi --sysroot=/usr -O2 -mexec-model=reactor -Wl,--strip-debug \
    -I "$future" -o "$future/core.wasm" plugins/length_filter_c/length_filter.c \
    "$future/filter_plugin.c" "$future/filter_plugin_component_type.o"
wasm-tools component new "$future/core.wasm" -o "$out/future_interface.wasm"
