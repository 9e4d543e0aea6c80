#!/usr/bin/env node
// Runs `npm run build` when the package has not been built yet, so that `npm run demo` works on
// a fresh checkout. "Built" means dist/index.js, dist/demo.js and a native addon
// (nbd-client.<platform>.node) at the package root all exist; nothing is rebuilt otherwise.
// Exits with npm's exit code if the build fails.
'use strict'

const fs = require('node:fs')
const path = require('node:path')
const { spawnSync } = require('node:child_process')

const root = path.resolve(__dirname, '..')

const missing = []
for (const file of ['dist/index.js', 'dist/demo.js']) {
  if (!fs.existsSync(path.join(root, file))) missing.push(file)
}
const hasAddon = fs.readdirSync(root).some((name) => name.startsWith('nbd-client.') && name.endsWith('.node'))
if (!hasAddon) missing.push('nbd-client.*.node')

if (missing.length > 0) {
  console.error(`ensure-built: missing ${missing.join(', ')}; running npm run build`)
  const npm = process.platform === 'win32' ? 'npm.cmd' : 'npm'
  const result = spawnSync(npm, ['run', 'build'], { cwd: root, stdio: 'inherit' })
  if (result.error) {
    console.error(`ensure-built: cannot run npm: ${result.error.message}`)
    process.exit(1)
  }
  if (result.status !== 0) process.exit(result.status ?? 1)
}
