#!/usr/bin/env node
// Cross-builds the addon for the platforms in package.json's napi.targets (or the ones named on
// the command line, as npm/ folder names: linux-arm64-gnu, darwin-x64, ...) with cargo-zigbuild,
// and puts each one in its npm/<platform>/ package as nbd-client.<platform>.node.
//
//   node scripts/cross/build-all.js [--profile NAME] [--parallel N] [platform ...]
//
// --profile: a cargo profile (default release; CI builds its build-only targets with `check`,
// see Cargo.toml). --parallel: how many targets build at once (default 1: on two cores cargo
// already keeps both busy). glibc targets are built for glibc 2.17 and up, macOS ones for 11.0
// and up. Cargo's output goes to target/cross (or $NBD_CLIENT_CROSS_TARGET_DIR), apart from
// the development build's.
// Run scripts/cross/setup-build.sh first (npm run build:all does).
'use strict'

const fs = require('node:fs')
const path = require('node:path')
const { spawn } = require('node:child_process')

const root = path.resolve(__dirname, '../..')
const pkg = require(path.join(root, 'package.json'))
const targetDir = process.env.NBD_CLIENT_CROSS_TARGET_DIR || path.join(root, 'target', 'cross')
const GLIBC_FLOOR = '2.17'
const MACOS_FLOOR = '11.0'

/** npm/ folder name (napi's platform-arch-abi) of a Rust target triple. */
function platformOf(triple) {
  const [cpu, , os, abi] = triple.split('-')
  const arch = { x86_64: 'x64', aarch64: 'arm64' }[cpu]
  if (!arch) throw new Error(`build-all: unsupported CPU in ${triple}`)
  if (os === 'darwin') return `darwin-${arch}`
  if (os === 'linux') return `linux-${arch}-${abi}`
  throw new Error(`build-all: unsupported OS in ${triple}`)
}

function parseArgs(argv) {
  const opts = { profile: 'release', parallel: 1, platforms: [] }
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]
    if (a === '--profile') opts.profile = argv[++i]
    else if (a === '--parallel') opts.parallel = Number(argv[++i])
    else if (a.startsWith('-')) throw new Error(`build-all: unknown option ${a}`)
    else opts.platforms.push(a)
  }
  if (!opts.profile || !(opts.parallel >= 1)) throw new Error('build-all: bad --profile or --parallel')
  return opts
}

function run(cmd, args, env, label) {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { cwd: root, env, stdio: ['ignore', 'pipe', 'pipe'] })
    const prefix = (chunk) =>
      chunk
        .toString()
        .split('\n')
        .filter((l) => l.length > 0)
        .map((l) => `[${label}] ${l}\n`)
        .join('')
    child.stdout.on('data', (c) => process.stdout.write(prefix(c)))
    child.stderr.on('data', (c) => process.stderr.write(prefix(c)))
    child.on('error', reject)
    child.on('exit', (code, signal) =>
      code === 0 ? resolve() : reject(new Error(`build-all: ${label} failed (${signal ?? `exit ${code}`})`)),
    )
  })
}

async function build(triple, profile) {
  const platform = platformOf(triple)
  const outDir = path.join('npm', platform)
  const zigTarget = triple.endsWith('-gnu') ? `${triple}.${GLIBC_FLOOR}` : triple
  const env = { ...process.env }
  if (triple.endsWith('-darwin')) env.MACOSX_DEPLOYMENT_TARGET = MACOS_FLOOR
  const args = [
    'napi', 'build', '--platform', '--cross-compile',
    '--target', zigTarget,
    '--profile', profile,
    '--manifest-path', 'crates/nbd-napi/Cargo.toml',
    '--target-dir', targetDir,
    // Built at the package root, as the development build is, so that the loader and type
    // definitions written there are the same whichever build wrote them last (a cross build
    // alone makes a usable package); the addon then moves to its npm/ folder.
    '--output-dir', '.',
    '--js', 'binding.js',
    '--dts', 'binding.d.ts',
  ]
  const name = `${pkg.napi.binaryName}.${platform}.node`
  const built = path.join(root, name)
  const file = path.join(root, outDir, name)
  // The development build of this machine's own platform, if any, stays where it is (moved
  // aside meanwhile: do not run npm run build at the same time as this builds that platform).
  const kept = fs.existsSync(built) ? `${built}.kept-${process.pid}` : null
  if (kept) fs.renameSync(built, kept)
  const started = Date.now()
  try {
    await run('npx', args, env, platform)
    fs.renameSync(built, file)
  } finally {
    if (kept) fs.renameSync(kept, built)
  }
  const size = (fs.statSync(file).size / 1048576).toFixed(1)
  const secs = ((Date.now() - started) / 1000).toFixed(0)
  console.log(`build-all: ${platform} (${profile}) built in ${secs} s: ${path.relative(root, file)}, ${size} MiB`)
  return { platform, secs: Number(secs) }
}

async function main() {
  const opts = parseArgs(process.argv.slice(2))
  const all = pkg.napi.targets
  const byPlatform = new Map(all.map((t) => [platformOf(t), t]))
  for (const p of opts.platforms) {
    if (!byPlatform.has(p)) throw new Error(`build-all: ${p} is not one of ${[...byPlatform.keys()].join(', ')}`)
  }
  const triples = opts.platforms.length > 0 ? opts.platforms.map((p) => byPlatform.get(p)) : all
  const queue = [...triples]
  const done = []
  const worker = async () => {
    while (queue.length > 0) done.push(await build(queue.shift(), opts.profile))
  }
  const started = Date.now()
  await Promise.all(Array.from({ length: Math.min(opts.parallel, triples.length) }, worker))
  const total = ((Date.now() - started) / 1000).toFixed(0)
  console.log(`build-all: ${done.map((d) => `${d.platform} ${d.secs} s`).join(', ')}; ${total} s in all`)
}

main().catch((e) => {
  console.error(e.message)
  process.exit(1)
})
