#!/usr/bin/env bash
set -euo pipefail
cd "$(dirname "$0")"
command -v componentize-py >/dev/null || python3 -m pip install componentize-py==0.25.1
componentize-py -d wit -w filter-plugin componentize app -o {{name}}.wasm
