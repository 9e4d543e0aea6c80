#!/usr/bin/env node
// stream-rss.js: backpressure check for the streams (npm run stream-rss; not part of npm test).
//
//   node bench/stream-rss.js [--gib N] [--rss-bound MiB] [--write]
//
// Starts `nbdkit pattern` (N GiB, default 4) on a private Unix socket and pipes
// handle.createReadStream() into a SHA-256 hash, sampling the resident set size every 250 ms.
// The hash is compared with the one of `nbdcopy URI -` (libnbd) piped into sha256sum, and the
// time of the stream with nbdcopy's time to copy the same export to null: (no hashing), run one
// after the other (never at once). With --write it also pipes N GiB of generated data into
// createWriteStream() on `nbdkit null` (which drops it) and samples RSS the same way.
//
// Exits non-zero when the hashes differ or RSS ever rises more than --rss-bound MiB (default
// 64) above the first sample taken once the stream runs.
'use strict'

const { spawn, spawnSync } = require('node:child_process')
const crypto = require('node:crypto')
const fs = require('node:fs')
const os = require('node:os')
const path = require('node:path')
const { Readable } = require('node:stream')
const { pipeline } = require('node:stream/promises')

const ROOT = path.join(__dirname, '..')
const { Handle } = require(path.join(ROOT, 'dist', 'index.js'))

const MiB = 1024 * 1024
const GiB = 1024 * MiB

function parseArgs(argv) {
  const opts = { gib: 4, rssBound: 64, write: false }
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]
    if (a === '--write') opts.write = true
    else if ((a === '--gib' || a === '--rss-bound') && Number(argv[i + 1]) > 0) opts[a === '--gib' ? 'gib' : 'rssBound'] = Number(argv[++i])
    else {
      console.error('usage: node bench/stream-rss.js [--gib N] [--rss-bound MiB] [--write]')
      process.exit(2)
    }
  }
  return opts
}

async function startNbdkit(args) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'stream-rss-'))
  const socket = path.join(dir, 'sock')
  const child = spawn('nbdkit', ['-f', '--exit-with-parent', '-U', socket, ...args], { stdio: ['ignore', 'ignore', 'inherit'] })
  const exited = new Promise((resolve) => child.once('exit', resolve))
  for (let i = 0; !fs.existsSync(socket); i++) {
    if (i > 500 || child.exitCode !== null) throw new Error(`nbdkit ${args.join(' ')} did not start`)
    await new Promise((r) => setTimeout(r, 10))
  }
  return {
    socket,
    uri: `nbd+unix:///?socket=${socket}`,
    async stop() {
      child.kill('SIGTERM')
      await exited
      fs.rmSync(dir, { recursive: true, force: true })
    },
  }
}

/** Samples RSS every 250 ms while `run` runs; returns its result with the samples. */
async function sampled(run) {
  const samples = []
  const timer = setInterval(() => samples.push(process.memoryUsage.rss()), 250)
  const t0 = process.hrtime.bigint()
  try {
    const result = await run()
    return { result, samples, seconds: Number(process.hrtime.bigint() - t0) / 1e9 }
  } finally {
    clearInterval(timer)
  }
}

function report(name, bytes, { samples, seconds }, bound) {
  const first = samples[0] ?? process.memoryUsage.rss()
  const max = Math.max(first, ...samples)
  const last = samples[samples.length - 1] ?? first
  const growth = (max - first) / MiB
  console.log(`${name}: ${(bytes / GiB).toFixed(1)} GiB in ${seconds.toFixed(2)} s (${(bytes / MiB / seconds).toFixed(0)} MiB/s); ` +
    `RSS first ${(first / MiB).toFixed(1)} MiB, max ${(max / MiB).toFixed(1)} MiB, last ${(last / MiB).toFixed(1)} MiB, ` +
    `growth ${growth.toFixed(1)} MiB over ${samples.length} samples (bound ${bound} MiB)`)
  return growth <= bound
}

function timed(argv) {
  const t0 = process.hrtime.bigint()
  const r = spawnSync(argv[0], argv.slice(1), { encoding: 'utf8', maxBuffer: 1024 })
  if (r.status !== 0) throw new Error(`${argv.join(' ')} failed: ${r.stderr}`)
  return Number(process.hrtime.bigint() - t0) / 1e9
}

async function main() {
  const opts = parseArgs(process.argv.slice(2))
  const size = opts.gib * GiB
  let ok = true
  const server = await startNbdkit(['pattern', String(size)])
  try {
    const h = new Handle()
    await h.connectUnix(server.socket)
    const hash = crypto.createHash('sha256')
    const rs = h.createReadStream()
    const run = await sampled(() => pipeline(rs, hash))
    const ours = hash.digest('hex')
    ok = report('createReadStream → sha256', rs.bytesRead, run, opts.rssBound) && ok
    if (rs.bytesRead !== size) {
      console.log(`FAIL: read ${rs.bytesRead} bytes, expected ${size}`)
      ok = false
    }
    // Throughput without the hash: the stream into a sink that drops every chunk.
    const drop = h.createReadStream()
    const sink = await sampled(() => pipeline(drop, async function (source) {
      for await (const chunk of source) void chunk
    }))
    report('createReadStream → (drop)', drop.bytesRead, sink, opts.rssBound)
    await h.close()

    const nbdcopy = spawnSync('sh', ['-c', `nbdcopy '${server.uri}' - | sha256sum`], { encoding: 'utf8' })
    const theirs = nbdcopy.stdout.split(' ')[0]
    console.log(`sha256 ours ${ours}, nbdcopy ${theirs}: ${ours === theirs ? 'same' : 'DIFFERENT'}`)
    if (ours !== theirs) ok = false
    const copySeconds = timed(['nbdcopy', server.uri, 'null:'])
    console.log(`nbdcopy URI null: ${(size / MiB / copySeconds).toFixed(0)} MiB/s (${copySeconds.toFixed(2)} s); ` +
      `stream (drop) / nbdcopy = ${(copySeconds / sink.seconds).toFixed(2)}`)
  } finally {
    await server.stop()
  }

  if (opts.write) {
    const memory = await startNbdkit(['null', String(size)])
    try {
      const h = new Handle()
      await h.connectUnix(memory.socket)
      const block = Buffer.alloc(MiB, 0x5a)
      const source = Readable.from((function* () {
        for (let i = 0; i < size / MiB; i++) yield block
      })())
      const ws = h.createWriteStream()
      const run = await sampled(() => pipeline(source, ws))
      ok = report('(generated) → createWriteStream', ws.bytesWritten, run, opts.rssBound) && ok
      await h.close()
    } finally {
      await memory.stop()
    }
  }
  if (!ok) {
    console.log('FAIL')
    process.exit(1)
  }
  console.log('OK')
}

main().catch((e) => {
  console.error(e)
  process.exit(1)
})
