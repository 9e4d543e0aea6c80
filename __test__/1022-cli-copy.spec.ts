// `nbd-client copy` (bin/copy.ts over the library's copy()) against libnbd's nbdcopy on the same
// sources: between nbdkit, qemu-nbd and nbd-server URIs, files, `-` (stdin, stdout; a pipe or a
// redirected file), `null:` and `[ CMD ARGS ... ]`; the bytes equal nbdcopy's, a destination
// file as sparse as nbdcopy's, `--progress=FD` lines, the progress bar in a pseudo-terminal
// (script), and errors as one line with the code and exit status 1. Exports are a few MiB.
import test from 'ava'
import { spawn, spawnSync } from 'node:child_process'
import { randomBytes } from 'node:crypto'
import fs from 'node:fs'
import path from 'node:path'
import { crossReadAll, crossWritePrefix } from './helpers/crosscheck'
import { seededBytes, KiB, MiB } from './helpers/nbd'
import { makeTempDir, requireTool, useNbdkit, useNbdServer, useQemuNbd } from './helpers/servers'

const CLI = path.join(__dirname, '..', 'dist', 'bin', 'nbd-client.js')

interface Run {
  status: number | null
  stdout: Buffer
  stderr: string
  /** What the child wrote on fd 3, when asked for. */
  fd3: string
}

/** Runs argv with `input` on stdin (or nothing); with `fd3`, collects a pipe on fd 3. */
function run(argv: string[], options: { input?: Buffer; fd3?: boolean } = {}): Promise<Run> {
  return new Promise((resolve, reject) => {
    const stdio: ('pipe' | 'ignore')[] = [options.input ? 'pipe' : 'ignore', 'pipe', 'pipe']
    if (options.fd3) stdio.push('pipe')
    const child = spawn(argv[0]!, argv.slice(1), { stdio })
    const out: Buffer[] = []
    let err = ''
    let fd3 = ''
    child.stdout!.on('data', (chunk: Buffer) => out.push(chunk))
    child.stderr!.setEncoding('utf8')
    child.stderr!.on('data', (chunk: string) => {
      err += chunk
    })
    if (options.fd3) {
      const extra = child.stdio[3] as NodeJS.ReadableStream
      extra.setEncoding('utf8')
      extra.on('data', (chunk: string) => {
        fd3 += chunk
      })
    }
    if (options.input) {
      child.stdin!.on('error', () => {})
      child.stdin!.end(options.input)
    }
    child.once('error', reject)
    child.once('close', (status) => resolve({ status, stdout: Buffer.concat(out), stderr: err, fd3 }))
  })
}

const cli = (args: string[], options?: { input?: Buffer; fd3?: boolean }) => run([process.execPath, CLI, 'copy', ...args], options)
const nbdcopy = (args: string[], options?: { input?: Buffer; fd3?: boolean }) => run(['nbdcopy', ...args], options)

/** Both copy `args` successfully (each with its own destination, from `dest`). */
async function bothCopy(t: import('ava').ExecutionContext, args: string[], source: string, ours: string, theirs: string): Promise<void> {
  const a = await cli([...args, source, ours])
  t.is(a.status, 0, `nbd-client copy ${args.join(' ')} ${source} ${ours}: ${a.stderr}`)
  t.is(a.stderr, '')
  const b = await nbdcopy([...args, source, theirs])
  t.is(b.status, 0, `nbdcopy ${args.join(' ')}: ${b.stderr}`)
}

/** The blocks a file takes on disk, in bytes. */
const allocated = (file: string): number => fs.statSync(file).blocks * 512

/**
 * Files written in a different order differ in file-system metadata (extent-tree blocks; a
 * clean-clone CI run saw 20 KiB between two fully allocated 4 MiB files). 48 KiB allows for
 * that and is still less than one 64 KiB hole missed or added.
 */
const SLACK = 48 * KiB

/** 4 MiB: 1 MiB of data, zeroes, 64 KiB of data at 3 MiB, a few bytes at the end. */
function mixed(): Buffer {
  const data = Buffer.alloc(4 * MiB)
  seededBytes(MiB, 21).copy(data, 0)
  seededBytes(64 * KiB, 22).copy(data, 3 * MiB)
  seededBytes(100, 23).copy(data, 4 * MiB - 100)
  return data
}

test('copy to files equals nbdcopy: the same bytes, a destination as sparse as nbdcopy\'s, with each option', async (t) => {
  if (!requireTool(t, 'nbdcopy')) return
  const dir = makeTempDir('nbd-cli-copy-')
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }))
  const memory = await useNbdkit(t, ['memory', String(4 * MiB)])
  const sparse = await useNbdkit(t, ['sparse-random', String(8 * MiB), 'seed=3', 'percent=30', 'runlength=8'], { readOnly: true })
  if (!memory || !sparse) return
  await crossWritePrefix(memory.uri, mixed())
  const ours = path.join(dir, 'ours.img')
  const theirs = path.join(dir, 'theirs.img')
  const optionSets = [[], ['-C', '1', '-R', '4', '--request-size=65536'], ['-S', '0'], ['--allocated'], ['--sparse=65536', '--flush']]
  for (const server of [memory, sparse]) {
    for (const args of optionSets) {
      for (const f of [ours, theirs]) fs.rmSync(f, { force: true })
      await bothCopy(t, args, server.uri, ours, theirs)
      const what = `${server.uri} ${args.join(' ')}`
      t.true(fs.readFileSync(ours).equals(fs.readFileSync(theirs)), `bytes: ${what}`)
      const [a, b] = [allocated(ours), allocated(theirs)]
      t.true(Math.abs(a - b) <= SLACK, `allocated ${a} bytes, nbdcopy ${b}: ${what}`)
      // What -S, --sparse and --allocated allocate depends on the source (a memory export's
      // holes stay holes in a file; a coarse --sparse finds fewer zero blocks): nbdcopy's file
      // above is the measure. Without them, the file is sparse.
      const tuned = args.some((arg) => /^(-S|--sparse|--allocated)/.test(arg))
      if (!tuned) t.true(a <= fs.statSync(ours).size * 0.75, `sparse: ${what}`)
    }
  }
  // An existing, larger destination file is truncated to the source's size, as nbdcopy does.
  fs.writeFileSync(ours, Buffer.alloc(6 * MiB, 0xee))
  t.is((await cli([memory.uri, ours])).status, 0)
  t.true(fs.readFileSync(ours).equals(mixed()))
  t.true(allocated(ours) < 2 * MiB)
})

test('copy between nbdkit, qemu-nbd and nbd-server URIs and files: what arrives is what nbdcopy reads', async (t) => {
  if (!requireTool(t, 'nbdcopy')) return
  const dir = makeTempDir('nbd-cli-copy-')
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }))
  const size = 4 * MiB
  const source = await useNbdkit(t, ['memory', String(size)])
  const qemu = await useQemuNbd(t, { size })
  const nbdServer = await useNbdServer(t, { size })
  const qemuTcp = await useQemuNbd(t, { size, tcp: true })
  if (!source || !qemu || !nbdServer || !qemuTcp) return
  const data = mixed()
  await crossWritePrefix(source.uri, data)
  // A chain: nbdkit → qemu-nbd → nbd-server → file → qemu-nbd (TCP), each hop by nbd-client copy.
  const file = path.join(dir, 'hop.img')
  const hops: [string, string][] = [[source.uri, qemu.uri], [qemu.uri, nbdServer.uri], [nbdServer.uri, file], [file, qemuTcp.uri]]
  for (const [from, to] of hops) {
    const r = await cli([from, to])
    t.is(r.status, 0, `${from} → ${to}: ${r.stderr}`)
    t.is(r.stdout.length, 0)
  }
  for (const uri of [qemu.uri, nbdServer.uri, qemuTcp.uri]) t.true((await crossReadAll(uri)).equals(data), uri)
  t.true(fs.readFileSync(file).equals(data))
  // Over a destination that held other data: every byte replaced, zeroes included.
  await crossWritePrefix(nbdServer.uri, Buffer.alloc(size, 0x5a))
  t.is((await cli(['-C', '1', '--destination-is-zero', qemu.uri, 'null:'])).status, 0)
  t.is((await cli(['--flush', qemu.uri, nbdServer.uri])).status, 0)
  t.true((await crossReadAll(nbdServer.uri)).equals(data))
})

test('copy with - (stdin, stdout), null: and [ CMD ARGS ... ] equals nbdcopy', async (t) => {
  if (!requireTool(t, 'nbdcopy', 'nbdkit', 'sh')) return
  const dir = makeTempDir('nbd-cli-copy-')
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }))
  const size = 4 * MiB
  const source = await useNbdkit(t, ['memory', String(size)])
  const destination = await useNbdkit(t, ['memory', String(size)])
  if (!source || !destination) return
  const data = mixed()
  await crossWritePrefix(source.uri, data)

  // To stdout, a pipe: the same bytes as nbdcopy's.
  const [ours, theirs] = [await cli([source.uri, '-']), await nbdcopy([source.uri, '-'])]
  t.is(ours.status, 0, ours.stderr)
  t.true(ours.stdout.equals(theirs.stdout))
  t.true(ours.stdout.equals(data))

  // To stdout redirected to a regular file: that file, sparse as nbdcopy's.
  const a = path.join(dir, 'a.img')
  const b = path.join(dir, 'b.img')
  const sh = (command: string) => run(['sh', '-c', command])
  t.is((await sh(`'${process.execPath}' '${CLI}' copy '${source.uri}' - > '${a}'`)).status, 0)
  t.is((await sh(`nbdcopy '${source.uri}' - > '${b}'`)).status, 0)
  t.true(fs.readFileSync(a).equals(data))
  t.true(allocated(a) <= allocated(b) + SLACK, `allocated ${allocated(a)}, nbdcopy ${allocated(b)}`)

  // From stdin, a pipe, into an export and into a file (zero blocks become holes).
  const input = Buffer.concat([seededBytes(MiB + 7, 24), Buffer.alloc(MiB), seededBytes(4096, 25)])
  const fromPipe = await cli(['-', destination.uri], { input })
  t.is(fromPipe.status, 0, fromPipe.stderr)
  const written = await crossReadAll(destination.uri)
  t.true(written.subarray(0, input.length).equals(input))
  const c = path.join(dir, 'c.img')
  t.is((await cli(['-', c], { input })).status, 0)
  t.true(fs.readFileSync(c).equals(input))
  t.true(allocated(c) < input.length - MiB / 2, `holes for the zero MiB: ${allocated(c)}`)
  // From stdin redirected from a regular file: copied as that file.
  t.is((await sh(`'${process.execPath}' '${CLI}' copy - '${destination.uri}' < '${a}'`)).status, 0)
  t.true((await crossReadAll(destination.uri)).equals(data))

  // null: reads everything and writes nothing.
  const discard = await cli([source.uri, 'null:'])
  t.is(discard.status, 0, discard.stderr)
  t.is(discard.stdout.length, 0)

  // A server as a subprocess, as source and as destination.
  const cmd = ['[', 'nbdkit', '-r', 'pattern', String(2 * MiB), ']']
  const d = path.join(dir, 'd.img')
  const e = path.join(dir, 'e.img')
  t.is((await cli([...cmd, d])).status, 0)
  t.is((await nbdcopy(['--', ...cmd, e])).status, 0)
  t.true(fs.readFileSync(d).equals(fs.readFileSync(e)))
  const intoSub = await cli([d, '[', 'nbdkit', 'memory', String(2 * MiB), ']'])
  t.is(intoSub.status, 0, intoSub.stderr)
})

test('copy over TLS with the --tls options (PSK) equals nbdcopy over the nbds URI', async (t) => {
  if (!requireTool(t, 'nbdcopy')) return
  const dir = makeTempDir('nbd-cli-copy-tls-')
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }))
  const psk = path.join(dir, 'keys.psk')
  fs.writeFileSync(psk, `alice:${randomBytes(32).toString('hex')}\n`)
  const server = await useNbdkit(t, ['memory', String(2 * MiB)], { extraArgs: ['--tls=require', `--tls-psk=${psk}`] })
  if (!server) return
  const tlsUri = `nbds+unix://alice@/?socket=${server.socket}&tls-psk-file=${psk}`
  const data = seededBytes(2 * MiB, 26)
  const file = path.join(dir, 'in.img')
  fs.writeFileSync(file, data)
  const tls = ['--tls=require', `--tls-psk-file=${psk}`, '--tls-username=alice']
  const r = await cli([...tls, file, server.uri])
  t.is(r.status, 0, r.stderr)
  t.true((await crossReadAll(tlsUri)).equals(data))
  const back = await cli([...tls, server.uri, '-'])
  t.true(back.stdout.equals(data))
  // The nbds URI alone works too; without TLS the server refuses.
  t.true((await cli([tlsUri, '-'])).stdout.equals(data))
  const plain = await cli([server.uri, 'null:'])
  t.is(plain.status, 1)
  t.regex(plain.stderr, /^nbd-client: E[A-Z]+: copy: [^\n]+\n$/)
})

test('--progress=FD writes nbdcopy\'s N/100 lines; -p draws the bar in a terminal', async (t) => {
  if (!requireTool(t, 'nbdcopy', 'script')) return
  const source = await useNbdkit(t, ['--filter=delay', 'memory', String(4 * MiB), 'rdelay=20ms'])
  if (!source) return
  await crossWritePrefix(source.uri, seededBytes(4 * MiB, 27))
  const parse = (text: string): number[] => {
    t.regex(text, /^(\d{1,3}\/100\n)+$/, JSON.stringify(text))
    return text.trimEnd().split('\n').map((line) => Number(line.split('/')[0]))
  }
  const slow = ['-C', '1', '-R', '1', '--request-size=65536']
  const ours = await cli([...slow, '--progress=3', source.uri, 'null:'], { fd3: true })
  const theirs = await nbdcopy([...slow, '--progress=3', source.uri, 'null:'], { fd3: true })
  t.is(ours.status, 0, ours.stderr)
  t.is(ours.stderr, '')
  const [a, b] = [parse(ours.fd3), parse(theirs.fd3)]
  for (const p of [a, b]) {
    t.is(p[0], 0)
    t.is(p[p.length - 1], 100)
    t.true(p.every((v, i) => i === 0 || v >= p[i - 1]!), `non-decreasing: ${p.join(' ')}`)
  }
  t.true(a.some((v) => v > 0 && v < 100), `steps between 0 and 100: ${a.join(' ')}`)
  t.is(a.filter((v) => v === 100).length, 1)

  // The bar, in a pseudo-terminal: frames ending in \r, the last a full bar ending the line.
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  const progress = require(path.join(__dirname, '..', 'dist', 'bin', 'progress.js')) as typeof import('../bin/progress')
  const tty = spawnSync('script', ['-qc', `'${process.execPath}' '${CLI}' copy ${slow.join(' ')} -p '${source.uri}' null:`, '/dev/null'], { encoding: 'utf8' })
  t.is(tty.status, 0, tty.stderr)
  const frames = tty.stdout.split(/(?<=\r(?!\n)|\r\n)/).filter((f) => f.length > 0)
  t.true(frames.length >= 3, JSON.stringify(tty.stdout))
  t.is(frames[0], progress.progressBar(0, 0))
  t.is(frames[frames.length - 1], progress.progressBar(1, 0).replace(/\n$/, '\r\n'))
  let previous = -1
  for (const f of frames) {
    const m = /^(\S) ( {0,2}\d{1,3})% \[(\**)(-*)\]\r\n?$/u.exec(f)
    if (!m) {
      t.fail(`not a bar frame: ${JSON.stringify(f)}`)
      continue
    }
    t.is(m[3]!.length + m[4]!.length, 40)
    t.true(Number(m[2]) >= previous)
    previous = Number(m[2])
  }
})

test('copy errors are one line with the code and exit status 1, where nbdcopy fails too', async (t) => {
  if (!requireTool(t, 'nbdcopy')) return
  const dir = makeTempDir('nbd-cli-copy-')
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }))
  const source = await useNbdkit(t, ['memory', String(2 * MiB)])
  const readOnly = await useNbdkit(t, ['memory', String(2 * MiB)], { readOnly: true })
  const small = await useNbdkit(t, ['memory', String(MiB)])
  const failingArgs = ['--filter=error', 'pattern', String(2 * MiB), 'error-pread-rate=1', 'error=EIO']
  const failing = await useNbdkit(t, failingArgs)
  // nbdcopy reads a failing source of its own: nbdkit 1.32 can die on an assertion
  // (raw_send_socket: sock >= 0) when a client closes a connection with several requests in
  // flight, as our copy does when it fails; nbdcopy must then fail on the EIO, not on a
  // refused connection.
  const failingForNbdcopy = await useNbdkit(t, failingArgs)
  if (!source || !readOnly || !small || !failing || !failingForNbdcopy) return
  const cases: [string[], RegExp][] = [
    [[source.uri, readOnly.uri], /^nbd-client: EPERM: copy: .*read-only/],
    [[source.uri, small.uri], /^nbd-client: ENOSPC: copy: .*smaller than the source/],
    [[failing.uri, 'null:'], /^nbd-client: EIO: copy: /],
    [[path.join(dir, 'missing.img'), 'null:'], /^nbd-client: ENOENT: copy: /],
    [['null:', source.uri], /^nbd-client: EINVAL: copy: 'null:' can only be a destination/],
    [['[', 'false', ']', 'null:'], /^nbd-client: E[A-Z]+: connectSystemdSocketActivation: /],
  ]
  for (const [args, pattern] of cases) {
    const ours = await cli(args)
    const theirArgs = args.map((arg) => (arg === failing.uri ? failingForNbdcopy.uri : arg))
    const theirs = await nbdcopy(theirArgs[0] === '[' ? ['--', ...theirArgs] : theirArgs)
    t.is(ours.status, 1, args.join(' '))
    t.not(theirs.status, 0, `nbdcopy ${args.join(' ')} fails too`)
    t.is(ours.stdout.length, 0)
    t.regex(ours.stderr, pattern, args.join(' '))
    t.is(ours.stderr.split('\n').length, 2, `one line: ${JSON.stringify(ours.stderr)}`)
  }
  // Usage mistakes, as the rest of the command.
  const usage = await cli(['--request-size=0', source.uri, 'null:'])
  t.is(usage.status, 1)
  t.regex(usage.stderr, /^nbd-client: EINVAL: copy: --request-size must be an integer >= 1, got 0 \(see 'nbd-client copy --help'\)\n$/)
  // nbdcopy's rule for --request-size (a power of 2 within 4096-32 MiB), refused as it refuses it.
  for (const size of ['1000', '512', '67108864']) {
    const [ours, theirs] = [await cli([`--request-size=${size}`, source.uri, 'null:']), await nbdcopy([`--request-size=${size}`, source.uri, 'null:'])]
    t.not(theirs.status, 0, `nbdcopy --request-size=${size}`)
    t.is(ours.status, 1, `--request-size=${size}`)
    t.regex(ours.stderr, /--request-size: must be a power of 2 within 4096-33554432/)
  }
  // Counts above copy()'s limits are taken as those limits, where nbdcopy takes them too.
  const [many, theirMany] = [await cli(['-C', '100', '-R', '100000', source.uri, 'null:']), await nbdcopy(['-C', '100', '-R', '100000', source.uri, 'null:'])]
  t.is(theirMany.status, 0, theirMany.stderr.toString())
  t.is(many.status, 0, many.stderr.toString())
})

test('--progress=FD whose reader goes away: the copy goes on without progress and succeeds', async (t) => {
  const source = await useNbdkit(t, ['--filter=delay', 'pattern', String(4 * MiB), 'rdelay=10ms'])
  if (!source) return
  // fd 3 is a pipe whose reader takes 4 bytes and exits: later progress writes get EPIPE.
  const script = `exec 3> >(head -c 4 >/dev/null); '${process.execPath}' '${CLI}' copy -C 1 -R 1 --request-size=65536 --progress=3 '${source.uri}' null:`
  const r = spawnSync('bash', ['-c', script], { encoding: 'utf8', timeout: 60_000 })
  t.is(r.status, 0, r.stderr)
  t.is(r.stderr, '')
})

test('copy to and from a FIFO and to /dev/null, as nbdcopy does (as streams)', async (t) => {
  if (!requireTool(t, 'nbdcopy', 'nbdkit', 'sh', 'mkfifo')) return
  const dir = makeTempDir('nbd-cli-fifo-')
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }))
  const size = 2 * MiB
  const source = await useNbdkit(t, ['memory', String(size)])
  const destination = await useNbdkit(t, ['memory', String(size)])
  if (!source || !destination) return
  const data = mixed().subarray(0, size)
  await crossWritePrefix(source.uri, data)
  // To a character device: nbdcopy exits 0, so does ours (it was refused: "neither a regular file").
  const [ours, theirs] = [await cli([source.uri, '/dev/null']), await nbdcopy([source.uri, '/dev/null'])]
  t.is(theirs.status, 0, theirs.stderr.toString())
  t.is(ours.status, 0, ours.stderr.toString())
  // Through a FIFO: ours writes it while cat reads it, then ours reads one that cat writes.
  const fifo = path.join(dir, 'fifo')
  const out = path.join(dir, 'out')
  t.is((await run(['mkfifo', fifo])).status, 0)
  const sh = (command: string) => run(['sh', '-c', command])
  t.is((await sh(`cat '${fifo}' > '${out}' & '${process.execPath}' '${CLI}' copy '${source.uri}' '${fifo}'; wait`)).status, 0)
  t.true(fs.readFileSync(out).equals(data))
  t.is((await sh(`cat '${out}' > '${fifo}' & '${process.execPath}' '${CLI}' copy '${fifo}' '${destination.uri}'; wait`)).status, 0)
  t.true((await crossReadAll(destination.uri)).equals(data))
})
