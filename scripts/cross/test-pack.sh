#!/usr/bin/env bash
# The "install with no compiler" check: packs each platform package (npm/*/, with the addon
# build-all.js put there) and the main package (with the optionalDependencies a release
# adds: one per platform package), installs the main package into an empty project the way
# a user would, once per platform this machine can run, with that platform's Node running
# npm, and connects to nbdkit, writes and reads back (pack-check.js).
#
#   bash scripts/cross/test-pack.sh [platform ...]   (default: linux-x64-gnu linux-arm64-gnu
#                                                     linux-x64-musl)
#
# No registry is asked: every platform package name is overridden to its tarball. The musl
# run is in a mount namespace where /usr/bin/ldd is musl's, as on a musl system, since that
# is what the loader (binding.js) looks at first; needs root there.
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/cross/common.sh

platforms=("$@")
[ "${#platforms[@]}" -gt 0 ] || platforms=(linux-x64-gnu linux-arm64-gnu linux-x64-musl)
for p in "${platforms[@]}"; do
  [ -f "npm/$p/nbd-client.$p.node" ] || { echo "test-pack: npm/$p has no addon: run node scripts/cross/build-all.js $p" >&2; exit 1; }
done
[ -f dist/index.js ] && [ -f binding.js ] || { echo "test-pack: build the package first (npm run build)" >&2; exit 1; }

work="$(mktemp -d "${TMPDIR:-/tmp}/nbd-client-pack.XXXXXX")"
trap 'rm -rf "$work"' EXIT
tarballs="$work/tarballs"
mkdir -p "$tarballs"

# Platform packages: the ones without an addon here are packed too (an npm install resolves
# every optional dependency before it skips the other platforms' ones); they are never used.
overrides="{}"
for dir in npm/*/; do
  name="$(node -p "require('./${dir}package.json').name")"
  tgz="$(cd "$dir" && npm pack --silent --pack-destination "$tarballs")"
  overrides="$(node -e 'const o = JSON.parse(process.argv[1]); o[process.argv[2]] = "file:" + process.argv[3]; console.log(JSON.stringify(o))' \
    "$overrides" "$name" "$tarballs/$tgz")"
done

# The main package, staged with its optionalDependencies (napi pre-publish adds the same).
stage="$work/stage"
mkdir -p "$stage"
cp -r dist binding.js binding.d.ts README.md "$stage/"
node -e '
  const fs = require("fs")
  const pkg = JSON.parse(fs.readFileSync("package.json", "utf8"))
  pkg.optionalDependencies = {}
  for (const dir of fs.readdirSync("npm").sort()) {
    pkg.optionalDependencies[require(`./npm/${dir}/package.json`).name] = pkg.version
  }
  fs.writeFileSync(process.argv[1] + "/package.json", JSON.stringify(pkg, null, 2) + "\n")
' "$stage"
main_tgz="$(cd "$stage" && npm pack --silent --pack-destination "$tarballs")"
ls -l "$tarballs" | awk 'NR > 1 { printf "test-pack: packed %s (%d KiB)\n", $NF, $5 / 1024 }'

status=0
for p in "${platforms[@]}"; do
  started=$(date +%s)
  (
    use_node "$p"
    app="$work/app-$p"
    mkdir -p "$app"
    node -e '
      const [main, overrides] = process.argv.slice(1)
      console.log(JSON.stringify({ name: "pack-check", private: true,
        dependencies: { "nbd-client": "file:" + main }, overrides: JSON.parse(overrides) }, null, 2))
    ' "$tarballs/$main_tgz" "$overrides" >"$app/package.json"
    cp scripts/cross/pack-check.js "$app/"
    npm_cli="$(dirname "$(readlink -f "$(command -v npm)")")/npm-cli.js"
    run() {
      if [ "$p" = linux-x64-musl ]; then
        unshare --mount sh -c 'mount --bind "$0" /usr/bin/ldd && exec "$@"' /lib/ld-musl-x86_64.so.1 "$@"
      else
        "$@"
      fi
    }
    cd "$app"
    # npm itself runs on this platform's Node, so it picks the platform packages for it.
    run "$NODE_BIN" "$npm_cli" install --no-audit --no-fund --loglevel=error >/dev/null
    installed="$(ls -d node_modules/nbd-client-* 2>/dev/null | xargs -n1 basename | tr '\n' ' ')"
    echo "test-pack: $p: npm installed nbd-client and ${installed:-no platform package}"
    run "$NODE_BIN" pack-check.js "$p"
  ) || status=1
  echo "test-pack: $p took $(($(date +%s) - started)) s"
done
if [ "$status" = 0 ]; then
  echo "test-pack: all ${#platforms[@]} platforms passed"
else
  echo "test-pack: FAILED" >&2
fi
exit "$status"
