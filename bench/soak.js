#!/usr/bin/env node
// soak.js: a long run on one handle, watching for leaks.
//
//   node --expose-gc bench/soak.js [--commands N] [--depth D] [--sample-every N]
//                                  [--warmup N] [--rss-bound MiB] [--size MiB]
//
// Starts `nbdkit memory` on a private Unix socket and runs N (default 10^6) commands on one
// handle: pread, preadInto, pwrite, flush, zero and trim in a random mix, D (default 64) at a
// time, at random offsets and lengths. Each of the D lanes owns its own slice of the export and
// keeps a copy of what that slice should hold, so every read is checked byte for byte.
//
// Every --sample-every commands (default 50,000) it records the resident set size, the V8 heap,
// external and ArrayBuffer memory and the number of open fds, and at the end prints them as a
// table. It exits non-zero when a command fails, a read returns the wrong bytes, the fd count
// ever differs from the first sample, or RSS grows by more than --rss-bound MiB (default 48)
// above the sample taken after --warmup commands (default 100,000).
'use strict'

const { spawn } = require('node:child_process')
const fs = require('node:fs')
const os = require('node:os')
const path = require('node:path')

const ROOT = path.join(__dirname, '..')
const { Handle } = require(path.join(ROOT, 'dist', 'index.js'))

const MiB = 1024 * 1024

function parseArgs(argv) {
  const opts = { commands: 1_000_000, depth: 64, sampleEvery: 50_000, warmup: 100_000, rssBound: 48, size: 64 }
  const names = { '--commands': 'commands', '--depth': 'depth', '--sample-every': 'sampleEvery', '--warmup': 'warmup', '--rss-bound': 'rssBound', '--size': 'size' }
  for (let i = 0; i < argv.length; i += 2) {
    const key = names[argv[i]]
    const value = Number(argv[i + 1])
    if (key === undefined || !Number.isFinite(value) || value <= 0) {
      console.error(`usage: node --expose-gc bench/soak.js [${Object.keys(names).map((n) => `${n} N`).join('] [')}]`)
      process.exit(2)
    }
    opts[key] = value
  }
  return opts
}

/** A small fast PRNG (xorshift32), seeded, so a failing run can be repeated. */
function rng(seed) {
  let x = seed >>> 0 || 1
  return () => {
    x ^= x << 13
    x >>>= 0
    x ^= x >>> 17
    x ^= x << 5
    x >>>= 0
    return x / 0x100000000
  }
}

function openFds() {
  return fs.readdirSync('/proc/self/fd').length
}

async function startNbdkit(sizeBytes) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nbd-soak-'))
  const socket = path.join(dir, 'nbd.sock')
  const child = spawn('nbdkit', ['-f', '--exit-with-parent', '-U', socket, 'memory', String(sizeBytes)], { stdio: ['ignore', 'ignore', 'inherit'] })
  const exited = new Promise((resolve) => child.once('exit', resolve))
  child.once('error', (e) => {
    console.error(`soak: cannot start nbdkit: ${e.message}`)
    process.exit(2)
  })
  for (let i = 0; !fs.existsSync(socket); i++) {
    if (i > 500) throw new Error('nbdkit did not create its socket within 10 s')
    await new Promise((r) => setTimeout(r, 20))
  }
  return {
    socket,
    async stop() {
      child.kill('SIGTERM')
      await exited
      fs.rmSync(dir, { recursive: true, force: true })
    },
  }
}

const OPS = [
  // [name, weight]
  ['pread', 30],
  ['preadInto', 25],
  ['pwrite', 25],
  ['zero', 8],
  ['trim', 7],
  ['flush', 5],
]
const TOTAL_WEIGHT = OPS.reduce((a, [, w]) => a + w, 0)

function pickOp(r) {
  let x = r() * TOTAL_WEIGHT
  for (const [name, w] of OPS) {
    if ((x -= w) < 0) return name
  }
  return OPS[0][0]
}

async function main() {
  const opts = parseArgs(process.argv.slice(2))
  const gc = globalThis.gc
  if (typeof gc !== 'function') console.error('soak: run with --expose-gc for steadier samples')
  const size = opts.size * MiB
  const server = await startNbdkit(size)
  const h = new Handle()
  await h.connectUnix(server.socket)

  const slice = Math.floor(size / opts.depth / 4096) * 4096
  if (slice < 128 * 1024) throw new Error(`--size ${opts.size} MiB is too small for --depth ${opts.depth}`)
  // What the export should hold (nbdkit memory starts zeroed).
  const shadow = Buffer.alloc(size)
  const counts = Object.fromEntries(OPS.map(([n]) => [n, 0]))
  const samples = []
  let issued = 0
  let done = 0
  let failure
  let verified = 0
  const started = Date.now()

  function sample() {
    if (gc) gc()
    const m = process.memoryUsage()
    samples.push({
      commands: done,
      seconds: (Date.now() - started) / 1000,
      rss: m.rss,
      heapUsed: m.heapUsed,
      external: m.external,
      arrayBuffers: m.arrayBuffers,
      fds: openFds(),
      inFlight: h.inFlight,
    })
  }

  async function lane(id) {
    const r = rng(0x9e3779b9 ^ (id * 2654435761))
    const base = id * slice
    const reusable = Buffer.alloc(64 * 1024)
    while (failure === undefined && issued < opts.commands) {
      issued++
      const op = pickOp(r)
      // 512-byte aligned offsets and lengths from 512 B to 64 KiB, inside the lane's slice.
      const length = (1 + Math.floor(r() * 128)) * 512
      const offset = base + Math.floor(r() * ((slice - length) / 512 + 1)) * 512
      try {
        switch (op) {
          case 'pread': {
            const got = await h.pread(length, offset)
            if (!got.equals(shadow.subarray(offset, offset + length))) throw new Error(`pread ${length}@${offset}: wrong data`)
            verified += length
            break
          }
          case 'preadInto': {
            const into = reusable.subarray(0, length)
            await h.preadInto(into, offset)
            if (!into.equals(shadow.subarray(offset, offset + length))) throw new Error(`preadInto ${length}@${offset}: wrong data`)
            verified += length
            break
          }
          case 'pwrite': {
            const data = Buffer.allocUnsafe(length)
            const fill = Math.floor(r() * 0x100000000)
            for (let i = 0; i + 4 <= length; i += 4) data.writeUInt32LE((fill + i) >>> 0, i)
            await h.pwrite(data, offset, { fua: (issued & 63) === 0 })
            data.copy(shadow, offset)
            break
          }
          case 'zero':
            await h.zero(length, offset, { noHole: (issued & 1) === 0 })
            shadow.fill(0, offset, offset + length)
            break
          case 'trim':
            // nbdkit memory reads trimmed ranges back as zeros.
            await h.trim(length, offset)
            shadow.fill(0, offset, offset + length)
            break
          case 'flush':
            await h.flush()
            break
        }
      } catch (e) {
        failure ??= e
        return
      }
      counts[op]++
      done++
      if (done % opts.sampleEvery === 0) sample()
    }
  }

  sample()
  await Promise.all(Array.from({ length: opts.depth }, (_, i) => lane(i)))
  const seconds = (Date.now() - started) / 1000
  await h.close()
  await server.stop()

  const fmt = (n) => (n / MiB).toFixed(1)
  console.log(`soak: ${done.toLocaleString('en')} commands in ${seconds.toFixed(1)} s (${Math.round(done / seconds).toLocaleString('en')}/s), ` +
    `depth ${opts.depth}, ${opts.size} MiB export, ${(verified / MiB).toFixed(0)} MiB of reads verified`)
  console.log(`soak: mix ${OPS.map(([n]) => `${n} ${counts[n]}`).join(', ')}`)
  console.log('')
  console.log('  commands   seconds   RSS MiB  heap MiB  external MiB  arrayBuffers MiB  fds  inFlight')
  for (const s of samples) {
    console.log(`${String(s.commands).padStart(10)}${s.seconds.toFixed(1).padStart(10)}${fmt(s.rss).padStart(10)}${fmt(s.heapUsed).padStart(10)}` +
      `${fmt(s.external).padStart(14)}${fmt(s.arrayBuffers).padStart(18)}${String(s.fds).padStart(5)}${String(s.inFlight).padStart(10)}`)
  }
  console.log('')

  const problems = []
  if (failure !== undefined) problems.push(`a command failed: ${failure.code ?? ''} ${failure.message}`)
  if (failure === undefined && done !== opts.commands) problems.push(`only ${done} of ${opts.commands} commands completed`)
  const fds0 = samples[0].fds
  const fdDrift = samples.filter((s) => s.fds !== fds0)
  if (fdDrift.length > 0) problems.push(`open fds changed: ${fds0} at the start, ${fdDrift.map((s) => `${s.fds} at ${s.commands}`).join(', ')}`)
  const afterWarmup = samples.filter((s) => s.commands >= opts.warmup)
  if (afterWarmup.length >= 2) {
    const base = afterWarmup[0]
    const peak = afterWarmup.reduce((a, s) => (s.rss > a.rss ? s : a), base)
    const growth = (peak.rss - base.rss) / MiB
    console.log(`soak: RSS after warm-up (${base.commands} commands) ${fmt(base.rss)} MiB, peak ${fmt(peak.rss)} MiB at ${peak.commands}: ` +
      `+${growth.toFixed(1)} MiB (bound ${opts.rssBound} MiB); heap ${fmt(base.heapUsed)} -> ${fmt(samples[samples.length - 1].heapUsed)} MiB`)
    if (growth > opts.rssBound) problems.push(`RSS grew ${growth.toFixed(1)} MiB after warm-up, more than ${opts.rssBound} MiB`)
  } else {
    console.log('soak: too few samples after warm-up to judge RSS growth')
  }
  if (problems.length > 0) {
    for (const p of problems) console.error(`soak: FAIL: ${p}`)
    process.exit(1)
  }
  console.log('soak: PASS')
}

main().catch((e) => {
  console.error(`soak: ${e.stack ?? e}`)
  process.exit(1)
})
