#!/usr/bin/env bash
# Runs the ava suite with Node's build for PLATFORM and the addon built for it by
# build-all.js (npm/PLATFORM/), e.g. linux-arm64-gnu under qemu-user or linux-x64-musl under
# the musl Node. Extra arguments go to ava (spec files, --match, ...). The TypeScript is
# compiled by the host's Node first when dist/ is missing.
#
#   bash scripts/cross/suite.sh [--rerun-failed] PLATFORM [ava arguments]
#
# --rerun-failed: the spec files with a failing test run again, each alone, once; the run
# passes if they all pass then. Under emulation on a loaded machine, tests that measure time
# (aborts, timeouts) fail now and then, as the known-flaky ones do natively (README, Tests);
# the reruns and their results are printed.
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/cross/common.sh

rerun=0
if [ "${1:-}" = --rerun-failed ]; then rerun=1; shift; fi
platform="${1:?usage: suite.sh [--rerun-failed] PLATFORM [ava arguments]}"
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
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
# Emulated runs are many times slower than native ones: ava's 2-minute inactivity timeout
# becomes 10 minutes (a CLI spec that spawns a dozen emulated Node processes needs it).
node node_modules/ava/entrypoints/cli.mjs --timeout=10m "$@" 2>&1 | tee "$log" || status=$?
echo "suite: $platform: ava finished in $(($(date +%s) - started)) s (exit $status)"
if [ "$status" != 0 ] && [ "$rerun" = 1 ]; then
  mapfile -t failed < <(sed -n 's/^ *✘ \(\[fail\]: \)\{0,1\}\(__test__\/\)\{0,1\}\([0-9][0-9a-z-]*\).*/\3/p' "$log" |
    sed 's/\.spec\.ts$//' | sort -u)
  if [ "${#failed[@]}" -gt 0 ]; then
    status=0
    for spec in "${failed[@]}"; do
      echo "suite: $platform: rerunning __test__/$spec.spec.ts alone"
      node node_modules/ava/entrypoints/cli.mjs --timeout=10m "__test__/$spec.spec.ts" || status=1
    done
    echo "suite: $platform: reruns of ${failed[*]} finished in $(($(date +%s) - started)) s from the start (exit $status)"
  fi
fi
exit "$status"
