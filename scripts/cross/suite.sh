#!/usr/bin/env bash
# Runs the ava suite with Node's build for PLATFORM and the addon built for it by
# build-all.js (npm/PLATFORM/), e.g. linux-arm64-gnu under qemu-user or linux-x64-musl under
# the musl Node. Extra arguments go to ava (spec files, --match, ...). The TypeScript is
# compiled by the host's Node first when dist/ is missing.
#
#   bash scripts/cross/suite.sh PLATFORM [ava arguments]
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/cross/common.sh

platform="${1:?usage: suite.sh PLATFORM [ava arguments]}"
shift
addon="$PWD/npm/$platform/nbd-client.$platform.node"
if [ ! -f "$addon" ]; then
  echo "suite: $addon is missing: run node scripts/cross/build-all.js $platform" >&2
  exit 1
fi
if [ ! -f dist/index.js ]; then
  npm run build:ts
fi

use_node "$platform"
# The loader's override: this addon, whatever the loader would pick.
export NAPI_RS_NATIVE_LIBRARY_PATH="$addon"
echo "suite: $platform: $("$NODE_BIN" -p 'process.version + " " + process.arch') with $addon"
started=$(date +%s)
status=0
node node_modules/ava/entrypoints/cli.mjs "$@" || status=$?
echo "suite: $platform: ava finished in $(($(date +%s) - started)) s (exit $status)"
exit "$status"
