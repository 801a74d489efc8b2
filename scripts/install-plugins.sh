#!/usr/bin/env bash
# Installs the example plugins (built by scripts/build-plugins.sh) into the
# local store as bundles signed by a key of this machine's own, which the
# store then trusts: afterwards `--plugin medical_clean` (or medical_clean.wasm)
# works from any directory. The key is made once, in the user's config dir.
# Usage: scripts/install-plugins.sh PT_HOST_BINARY
set -euo pipefail
cd "$(dirname "$0")/.."
pt_host="$1"
out="${CARGO_TARGET_DIR:-target}/wasm32-wasip2/release"
config="${XDG_CONFIG_HOME:-$HOME/.config}/pt-host"
key="$config/local-plugins.key"
trusted="${PT_TRUSTED_KEYS:-$config/trusted_keys}"
if [ ! -f "$key" ]; then
    "$pt_host" plugin keygen --name local-plugins --output_dir "$config" >/dev/null
    chmod 600 "$key"
fi
mkdir -p "$trusted"
cp "$config/local-plugins.pub" "$trusted/local-plugins.pub"
bundles=$(mktemp -d)
trap 'rm -rf "$bundles"' EXIT
for plugin in medical_clean augment_eda domain_terms medqa_tasks; do
    "$pt_host" plugin pack --component "$out/$plugin.wasm" --plugin_dir "plugins/$plugin" \
        --output_dir "$bundles" --key "$key" >/dev/null
done
for bundle in "$bundles"/*.ptplugin; do
    "$pt_host" plugin install "$bundle"
done
