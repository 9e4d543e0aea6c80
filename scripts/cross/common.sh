# Shared by the scripts in scripts/cross: where downloaded runtimes are kept, and helpers.
# Sourced, not run.

# Downloaded Node builds and the like live outside the clone, so that later runs (CI's
# included, on the same machine) reuse them.
TOOLS_DIR="${NBD_CLIENT_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/nbd-client-tools}"
mkdir -p "$TOOLS_DIR"

sudo=""
if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
export DEBIAN_FRONTEND=noninteractive

# npm_unpack SPEC DIR: the contents of the npm package SPEC (its tarball, no install
# scripts run) in DIR.
npm_unpack() {
  local spec="$1" dir="$2" tmp
  tmp="$(mktemp -d)"
  (cd "$tmp" && npm pack --silent "$spec" >/dev/null && mkdir x && tar -xzf ./*.tgz -C x)
  rm -rf "$dir"
  mkdir -p "$(dirname "$dir")"
  mv "$tmp/x/package" "$dir"
  rm -rf "$tmp"
}

# register_binfmt NAME MAGIC MASK INTERPRETER: lets the kernel start programs whose ELF
# header matches through INTERPRETER (flag F: opened now, so it works in any mount
# namespace). Mounts binfmt_misc first where it is not.
register_binfmt() {
  local name="qemu-$1" magic="$2" mask="$3" interp="$4" fs=/proc/sys/fs/binfmt_misc
  if [ ! -e "$fs/register" ]; then
    $sudo mount -t binfmt_misc binfmt_misc "$fs"
  fi
  if [ -e "$fs/$name" ]; then
    grep -q "^interpreter $interp\$" "$fs/$name" && return 0
    echo -1 | $sudo tee "$fs/$name" >/dev/null
  fi
  printf ':%s:M::%s:%s:%s:F\n' "$name" "$magic" "$mask" "$interp" | $sudo tee "$fs/register" >/dev/null
}

# use_node PLATFORM: makes `node` (on PATH and in NODE_BIN) Node's build for PLATFORM
# (linux-x64-gnu: the one running here; linux-arm64-gnu: under qemu-user; linux-x64-musl),
# setting it up first. esbuild (under tsx) keeps using the host's binary, which runs here
# whatever the Node.
use_node() {
  local platform="$1" bindir
  case "$platform" in
    linux-x64-gnu) NODE_BIN="$(command -v node)" ;;
    linux-arm64-gnu)
      NODE_BIN="$(bash scripts/cross/setup-arm64.sh)"
      export QEMU_LD_PREFIX=/usr/aarch64-linux-gnu
      # Tests that measure the process's memory from outside read this (qemu-user keeps
      # what the guest unmaps in its own resident set).
      export NBD_TEST_EMULATED=1
      ;;
    linux-x64-musl) NODE_BIN="$(bash scripts/cross/setup-musl.sh)" ;;
    *) echo "cross: no Node to run $platform code with here" >&2; return 1 ;;
  esac
  bindir="$TOOLS_DIR/bin-$platform"
  mkdir -p "$bindir"
  ln -sfn "$NODE_BIN" "$bindir/node"
  export PATH="$bindir:$PATH"
  local esbuild="$PWD/node_modules/@esbuild/linux-$(uname -m | sed 's/x86_64/x64/; s/aarch64/arm64/')/bin/esbuild"
  if [ -x "$esbuild" ]; then export ESBUILD_BINARY_PATH="$esbuild"; fi
}
