#!/usr/bin/env bash
set -euo pipefail
cd "$(dirname "$0")"
[ -x node_modules/.bin/componentize-js ] || npm install --no-audit --no-fund @bytecodealliance/componentize-js@0.23.0
node_modules/.bin/componentize-js plugin.js --wit wit -n filter-plugin -d http fetch-event -o {{name}}.wasm
