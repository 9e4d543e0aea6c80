#!/usr/bin/env node
// copy.js: copy() against nbdcopy on the same servers, alternating runs.
//
//   node bench/copy.js [--rows name,...] [--runs N] [--quick] [--json FILE]
//
// The last row (dense2g-stream) compares Handle.createReadStream with the copy engine rather
// than with nbdcopy: its columns are copy() and the stream.
//
// Rows (issue 10): an 8 GiB sparse-random export to a file; a 2 GiB dense export (nbdkit
// pattern) to a file, to an nbdkit memory export and to null:; each with the default
// connections and with one connection each (-C 1 / connections: 1). Every run is a fresh
// process (`nbdcopy SRC DST` or `node -e "copy(SRC, DST)"`) timed from spawn to exit. Ours
// is also timed from inside its process, from just before it loads this package to the
// moment copy() resolves: the cost of the library call without Node's own start-up (which
// an application that calls copy() has paid long before). Both sides use their defaults
// otherwise, except that ours runs with flush: false, as nbdcopy does not flush unless
// asked. The file destination is removed and `sync` run before every run (untimed). Prints
// the median of each side and the ratio nbdcopy/ours (≥ 1.0: ours is at least as fast),
// for the call and for the whole process. The last two columns are the median CPU time (user
// and system, every thread) that the nbdkit servers of the row spent during each side's runs:
// on a small machine both sides share the CPUs with the servers, and how the client drives a
// server changes what the server spends (Linux only; n/a elsewhere).
'use strict'

const { spawn, spawnSync } = require('node:child_process')
const fs = require('node:fs')
const os = require('node:os')
const path = require('node:path')
const { cpuSeconds } = require('./server-cpu')

const ROOT = path.join(__dirname, '..')
const DIST = path.join(ROOT, 'dist', 'index.js')

const ROWS = [
  { name: 'sparse8g-file', label: '8 GiB sparse-random → file', src: 'sparse', dst: 'file' },
  { name: 'sparse8g-file-c1', label: '8 GiB sparse-random → file, 1 conn', src: 'sparse', dst: 'file', c1: true },
  { name: 'dense2g-file', label: '2 GiB dense → file', src: 'dense', dst: 'file' },
  { name: 'dense2g-file-c1', label: '2 GiB dense → file, 1 conn', src: 'dense', dst: 'file', c1: true },
  { name: 'dense2g-nbd', label: '2 GiB dense → nbdkit memory', src: 'dense', dst: 'nbd' },
  { name: 'dense2g-nbd-c1', label: '2 GiB dense → nbdkit memory, 1 conn', src: 'dense', dst: 'nbd', c1: true },
  { name: 'dense2g-null', label: '2 GiB dense → null:', src: 'dense', dst: 'null' },
  { name: 'dense2g-null-c1', label: '2 GiB dense → null:, 1 conn', src: 'dense', dst: 'null', c1: true },
  // Issue 13: a stream's throughput against the copy engine's on the same export. Here the
  // first column is copy(SRC, 'null:', { connections: 1 }) (one connection, as a stream has),
  // the second h.createReadStream() piped into a Writable that drops the bytes.
  { name: 'dense2g-stream', label: '2 GiB dense: stream vs copy() → null:', src: 'dense', dst: 'null', stream: true },
]

function parseArgs(argv) {
  const a = { runs: 3, rows: ROWS.map((r) => r.name), quick: false, json: undefined }
  for (let i = 0; i < argv.length; i++) {
    const x = argv[i]
    if (x === '--runs') a.runs = Number(argv[++i])
    else if (x === '--rows') a.rows = argv[++i].split(',')
    else if (x === '--quick') a.quick = true
    else if (x === '--json') a.json = argv[++i]
    else {
      console.error(`unknown argument ${x}\nusage: node bench/copy.js [--rows a,b] [--runs N] [--quick] [--json FILE]`)
      process.exit(2)
    }
  }
  for (const name of a.rows) {
    if (!ROWS.some((r) => r.name === name)) {
      console.error(`unknown row ${name}; rows: ${ROWS.map((r) => r.name).join(', ')}`)
      process.exit(2)
    }
  }
  return a
}

function startNbdkit(dir, name, args) {
  const sock = path.join(dir, `${name}.sock`)
  const child = spawn('nbdkit', ['-f', '--exit-with-parent', '-U', sock, ...args], { stdio: ['ignore', 'ignore', 'inherit'] })
  const until = Date.now() + 10000
  while (!fs.existsSync(sock)) {
    if (Date.now() > until) throw new Error(`nbdkit ${args.join(' ')} did not start`)
    spawnSync('sleep', ['0.05'])
  }
  return { uri: `nbd+unix:///?socket=${sock}`, child }
}

// Both sides run without NODE_EXTRA_CA_CERTS: with it, Node parses that certificate bundle
// before running any code (about 80 ms per start on the development machine, whose
// environment sets it to the whole system bundle). Nothing here uses TLS, and nbdcopy never
// reads it; the start-up that remains is Node's own.
const CHILD_ENV = { ...process.env }
delete CHILD_ENV.NODE_EXTRA_CA_CERTS

// Runs argv to its end: { process } is the wall time from spawn to exit; { call }, when the
// child printed a line `{"call":seconds}` on stdout, its own timing of the library call.
function timed(argv) {
  return new Promise((resolve, reject) => {
    const t0 = process.hrtime.bigint()
    const child = spawn(argv[0], argv.slice(1), { stdio: ['ignore', 'pipe', 'pipe'], env: CHILD_ENV })
    let err = ''
    let out = ''
    child.stdout.setEncoding('utf8').on('data', (s) => (out += s))
    child.stderr.setEncoding('utf8').on('data', (s) => (err += s))
    child.once('error', reject)
    child.once('close', (code) => {
      const seconds = Number(process.hrtime.bigint() - t0) / 1e9
      if (code !== 0) return reject(new Error(`${argv.join(' ')} failed (${code}): ${err}`))
      const line = out.split('\n').find((l) => l.startsWith('{"call":'))
      resolve({ process: seconds, call: line ? JSON.parse(line).call : seconds })
    })
  })
}

function median(xs) {
  const s = [...xs].sort((a, b) => a - b)
  const m = s.length >> 1
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2
}

async function main() {
  const args = parseArgs(process.argv.slice(2))
  if (!fs.existsSync(DIST)) throw new Error('dist/index.js is missing: run npm run build first')
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nbd-copy-bench-'))
  const scale = args.quick ? 8 : 1
  const servers = {
    sparse: startNbdkit(dir, 'sparse', ['-r', 'sparse-random', `${8 / scale}G`, 'seed=1']),
    dense: startNbdkit(dir, 'dense', ['-r', 'pattern', `${2048 / scale}M`]),
    nbd: startNbdkit(dir, 'mem', ['memory', `${2048 / scale}M`]),
  }
  const file = path.join(dir, 'dest.img')
  const results = []
  try {
    console.log(`copy bench: ${args.runs} runs per side, alternating, each a fresh process; ratio = nbdcopy/ours${args.quick ? ' (--quick: sizes / 8)' : ''}`)
    console.log(`${''.padEnd(40)} ${'the call (ours: load + copy())'.padEnd(29)}   ${'the whole process'.padEnd(29)}   ${'servers\' CPU s'}`)
    console.log(`${'row'.padEnd(40)} ${'nbdcopy s'.padStart(10)} ${'ours s'.padStart(10)} ${'ratio'.padStart(7)}   ${'nbdcopy s'.padStart(10)} ${'ours s'.padStart(10)} ${'ratio'.padStart(7)}   ${'nbdcopy'.padStart(8)} ${'ours'.padStart(8)}`)
    for (const row of ROWS.filter((r) => args.rows.includes(r.name))) {
      const src = servers[row.src].uri
      const dst = row.dst === 'file' ? file : row.dst === 'null' ? 'null:' : servers.nbd.uri
      // Each child of ours times itself from just before loading the package to the end.
      const start = 'const t0 = process.hrtime.bigint(); const done = () => console.log(JSON.stringify({ call: Number(process.hrtime.bigint() - t0) / 1e9 }));'
      const engine = `${start} require(${JSON.stringify(DIST)}).copy(${JSON.stringify(src)}, 'null:', { flush: false, connections: 1 }).then(done, (e) => { console.error(e); process.exit(1) })`
      const streamed = [
        `${start} const { Handle } = require(${JSON.stringify(DIST)}); const { Writable, pipeline } = require('node:stream');`,
        `(async () => { const h = new Handle(); await h.connectUri(${JSON.stringify(src)});`,
        `pipeline(h.createReadStream(), new Writable({ write(c, e, cb) { cb() } }), (e) => { if (e) { console.error(e); process.exit(1) } h.close(); done() }) })()`,
      ].join(' ')
      const theirs = row.stream
        ? [process.execPath, '-e', engine]
        : ['nbdcopy', ...(row.c1 ? ['-C', '1'] : []), src, dst]
      const options = JSON.stringify({ flush: false, ...(row.c1 ? { connections: 1 } : {}) })
      const script = `${start} require(${JSON.stringify(DIST)}).copy(${JSON.stringify(src)}, ${JSON.stringify(dst)}, ${options}).then(done, (e) => { console.error(e); process.exit(1) })`
      const ours = [process.execPath, '-e', row.stream ? streamed : script]
      const times = { nbdcopy: [], ours: [] }
      const processTimes = { nbdcopy: [], ours: [] }
      const serverTimes = { nbdcopy: [], ours: [] }
      const involved = [servers[row.src].child.pid, ...(row.dst === 'nbd' ? [servers.nbd.child.pid] : [])]
      for (let i = 0; i < args.runs; i++) {
        for (const [side, argv] of [['nbdcopy', theirs], ['ours', ours]]) {
          fs.rmSync(file, { force: true })
          spawnSync('sync')
          const before = cpuSeconds(involved)
          const t = await timed(argv)
          const after = cpuSeconds(involved)
          times[side].push(t.call)
          processTimes[side].push(t.process)
          if (before !== null && after !== null) serverTimes[side].push(after - before)
        }
      }
      const a = median(times.nbdcopy)
      const b = median(times.ours)
      const pa = median(processTimes.nbdcopy)
      const pb = median(processTimes.ours)
      results.push({
        row: row.name,
        label: row.label,
        nbdcopy: times.nbdcopy,
        ours: times.ours,
        medianNbdcopy: a,
        medianOurs: b,
        ratio: a / b,
        processNbdcopy: processTimes.nbdcopy,
        processOurs: processTimes.ours,
        processRatio: pa / pb,
        serverCpuNbdcopy: serverTimes.nbdcopy,
        serverCpuOurs: serverTimes.ours,
      })
      const cols = [a, b].map((x) => x.toFixed(3).padStart(10)).join(' ')
      const pcols = [pa, pb].map((x) => x.toFixed(3).padStart(10)).join(' ')
      const scols = ['nbdcopy', 'ours']
        .map((side) => (serverTimes[side].length > 0 ? median(serverTimes[side]).toFixed(2) : 'n/a').padStart(8))
        .join(' ')
      console.log(`${row.label.padEnd(40)} ${cols} ${(a / b).toFixed(2).padStart(7)}   ${pcols} ${(pa / pb).toFixed(2).padStart(7)}   ${scols}`)
    }
  } finally {
    for (const s of Object.values(servers)) s.child.kill()
    fs.rmSync(dir, { recursive: true, force: true })
  }
  if (args.json) fs.writeFileSync(args.json, JSON.stringify(results, null, 2))
}

main().catch((e) => {
  console.error(e.message)
  process.exit(1)
})
