#!/usr/bin/env bash
# Installs what cross-building the addon for every platform in package.json's napi.targets
# needs: the Rust standard libraries of those targets (rustup) and cargo-zigbuild with Zig
# (PyPI packages; Zig is the C compiler and linker for every target, its own libc headers
# and stubs stand in for each target's sysroot, macOS included). Idempotent and quick
# when all is there.
set -euo pipefail
cd "$(dirname "$0")/../.."

ZIGLANG_VERSION="0.17.1"
CARGO_ZIGBUILD_VERSION="0.24.1"

mapfile -t triples < <(node -p "require('./package.json').napi.targets.join('\n')")
installed="$(rustup target list --installed)"
missing=()
for t in "${triples[@]}"; do
  grep -qx "$t" <<<"$installed" || missing+=("$t")
done
if [ "${#missing[@]}" -gt 0 ]; then
  rustup target add "${missing[@]}"
fi

py="$(command -v python3 || command -v python)"
if ! "$py" -m ziglang version >/dev/null 2>&1 || ! command -v cargo-zigbuild >/dev/null 2>&1; then
  "$py" -m pip install -q --disable-pip-version-check \
    "ziglang==${ZIGLANG_VERSION}" "cargo-zigbuild==${CARGO_ZIGBUILD_VERSION}"
fi
echo "cross: zig $("$py" -m ziglang version), $(cargo-zigbuild --version)"
