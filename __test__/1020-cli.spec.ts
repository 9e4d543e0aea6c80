// The nbd-client command (bin/): `dump` byte for byte against libnbd's nbddump on nbdkit,
// qemu-nbd and nbd-server (plain and coloured, --length, --offset, subprocesses, TLS), and the
// command's help, version, usage errors, error lines and exit statuses.
import test, { type ExecutionContext } from 'ava'
import { spawn } from 'node:child_process'
import { randomBytes } from 'node:crypto'
import fs from 'node:fs'
import path from 'node:path'
import { version } from 'nbd-client'
import { CROSSCHECK_TOOLS, crossWritePrefix } from './helpers/crosscheck'
import { seededBytes, KiB, MiB } from './helpers/nbd'
import { makeTempDir, requireTool, useNbdkit, useNbdServer, useQemuNbd } from './helpers/servers'

const CLI = path.join(__dirname, '..', 'dist', 'bin', 'nbd-client.js')

interface Run {
  status: number | null
  stdout: Buffer
  stderr: string
}

function run(argv: string[], env: NodeJS.ProcessEnv = process.env): Promise<Run> {
  return new Promise((resolve, reject) => {
    const child = spawn(argv[0]!, argv.slice(1), { stdio: ['ignore', 'pipe', 'pipe'], env })
    const out: Buffer[] = []
    let err = ''
    child.stdout.on('data', (chunk: Buffer) => out.push(chunk))
    child.stderr.setEncoding('utf8')
    child.stderr.on('data', (chunk: string) => {
      err += chunk
    })
    child.once('error', reject)
    child.once('close', (status) => resolve({ status, stdout: Buffer.concat(out), stderr: err }))
  })
}

const cli = (...args: string[]) => run([process.execPath, CLI, ...args])
const nbddump = (...args: string[]) => run(['nbddump', ...args])

/** Runs `nbd-client dump ARGS` and `nbddump ARGS`; both must succeed with the same bytes. */
async function sameAsNbddump(t: ExecutionContext, args: string[], theirArgs = args): Promise<Buffer> {
  const [ours, theirs] = [await cli('dump', ...args), await nbddump(...theirArgs)]
  t.is(theirs.status, 0, `nbddump ${theirArgs.join(' ')}: ${theirs.stderr}`)
  t.is(ours.status, 0, `nbd-client dump ${args.join(' ')}: ${ours.stderr}`)
  t.is(ours.stderr, '')
  if (!ours.stdout.equals(theirs.stdout)) {
    const a = ours.stdout.toString('latin1').split('\n')
    const b = theirs.stdout.toString('latin1').split('\n')
    const i = a.findIndex((line, k) => line !== b[k])
    t.fail(`dump ${args.join(' ')} differs from nbddump at line ${i + 1}:\n  ours:    ${JSON.stringify(a[i])}\n  nbddump: ${JSON.stringify(b[i])}`)
  } else {
    t.pass()
  }
  return ours.stdout
}

/** Bytes that exercise every column: text, control bytes, high bytes, runs of repeats, zeros. */
function mixedContent(size: number): Buffer {
  const data = Buffer.alloc(size)
  Buffer.from('hello, world! The quick brown fox jumps over the lazy dog.\n').copy(data, 0x100)
  for (let i = 0; i < 256; i++) data[0x200 + i] = i
  seededBytes(3000, 1).copy(data, 0x400 + 5)
  data.fill(0xab, 0x2000, 0x3000)
  data.fill(0x41, 0x3000, 0x3008)
  seededBytes(100, 2).copy(data, size - 100)
  return data
}

test('dump equals nbddump on nbdkit: mixed content, --length (with its squashing), --color, odd sizes', async (t) => {
  if (!requireTool(t, 'nbddump', ...CROSSCHECK_TOOLS)) return
  const size = 64 * KiB
  const server = await useNbdkit(t, ['memory', String(size)])
  if (!server) return
  await crossWritePrefix(server.uri, mixedContent(size))
  const out = await sameAsNbddump(t, [server.uri])
  t.regex(out.toString(), /^0000000100: 68 65 6c 6c 6f 2c 20 77  6f 72 6c 64 21 20 54 68 \|hello, world! Th\|$/m)
  t.regex(out.toString(), /^\*$/m)
  await sameAsNbddump(t, ['--color', server.uri])
  for (const length of ['0', '1', '15', '16', '17', '40', '4100', '12288', '65535', '65536', '1000000']) {
    await sameAsNbddump(t, ['--length', length, server.uri])
  }
  await sameAsNbddump(t, ['-n', '777', '--colour', server.uri])
  // Sizes that are not a multiple of 16, and an empty export.
  for (const odd of [1, 15, 17, 4097]) {
    const s = await useNbdkit(t, ['pattern', String(odd)])
    if (!s) return
    await sameAsNbddump(t, [s.uri])
  }
  const empty = await useNbdkit(t, ['null', '0'])
  if (!empty) return
  t.is((await sameAsNbddump(t, [empty.uri])).length, 0)
})

test('dump equals nbddump on qemu-nbd and nbd-server', async (t) => {
  if (!requireTool(t, 'nbddump', ...CROSSCHECK_TOOLS)) return
  const size = 2 * MiB
  const data = Buffer.alloc(size)
  mixedContent(64 * KiB).copy(data, 0)
  seededBytes(10_000, 3).copy(data, MiB + 3)
  const qemu = await useQemuNbd(t, { size })
  const nbdServer = await useNbdServer(t, { size })
  if (!qemu || !nbdServer) return
  for (const server of [qemu, nbdServer]) {
    await crossWritePrefix(server.uri, data)
    await sameAsNbddump(t, [server.uri])
    await sameAsNbddump(t, ['--length=100000', server.uri])
  }
})

test('dump --offset: absolute addresses, the same lines as nbddump of that range (nbdkit offset filter)', async (t) => {
  if (!requireTool(t, 'nbddump')) return
  const size = 256 * KiB
  const whole = await useNbdkit(t, ['pattern', String(size)])
  if (!whole) return
  for (const offset of [16, 4096 + 3, size - 40]) {
    const part = await useNbdkit(t, ['--filter=offset', 'pattern', String(size), `offset=${offset}`])
    if (!part) return
    const ours = await cli('dump', '--offset', String(offset), whole.uri)
    const theirs = await nbddump(part.uri)
    t.is(ours.status, 0, ours.stderr)
    // nbddump's addresses start at 0 in the filtered export: shift them.
    const shifted = theirs.stdout.toString('latin1').replace(/^([0-9a-f]{10,}):/gm,
      (_, a: string) => (BigInt('0x' + a) + BigInt(offset)).toString(16).padStart(10, '0') + ':')
    t.is(ours.stdout.toString('latin1'), shifted, `--offset ${offset}`)
  }
  // With a size suffix, and together with --length.
  const r = await cli('dump', '--offset=1k', '--length', '32', whole.uri)
  t.is(r.stdout.toString(), '0000000400: 00 00 00 00 00 00 04 00  00 00 00 00 00 00 04 08 |................|\n' +
    '0000000410: 00 00 00 00 00 00 04 10  00 00 00 00 00 00 04 18 |................|\n')
  // At the end: nothing; past it: an error.
  t.is((await cli('dump', '--offset', String(size), whole.uri)).stdout.length, 0)
  const past = await cli('dump', '--offset', String(size + 1), whole.uri)
  t.is(past.status, 1)
  t.regex(past.stderr, /^nbd-client: EINVAL: dump: --offset \d+ is past the end of the export \(size 262144\)\n$/)
})

test('dump skips what block status says reads as zeros: a sparse 4 GiB export equals nbddump; a sparse terabyte takes no time', async (t) => {
  if (!requireTool(t, 'nbddump')) return
  const data = 'data="hello" @1048576 "mid" @^4096 "x" @4294966000 "tail" 1 2 3'
  const sparse = await useNbdkit(t, ['data', data, 'size=4G'])
  const noExtents = await useNbdkit(t, ['--filter=noextents', 'data', data.replace('@4294966000', '@6000000'), 'size=8M'])
  if (!sparse || !noExtents) return
  await sameAsNbddump(t, [sparse.uri])
  await sameAsNbddump(t, ['--length', '1048580', sparse.uri])
  await sameAsNbddump(t, [noExtents.uri])
  const huge = await useNbdkit(t, ['data', 'data="start" @1099511627770 "end"', 'size=1T'])
  if (!huge) return
  const started = Date.now()
  const r = await cli('dump', huge.uri)
  t.is(r.status, 0, r.stderr)
  // Reading the terabyte would take over eight minutes even at 2 GB/s; skipping it takes a
  // second natively and up to half a minute under arm64 emulation.
  t.true(Date.now() - started < 90_000, `${Date.now() - started} ms`)
  t.is(r.stdout.toString(), [
    '0000000000: 73 74 61 72 74 00 00 00  00 00 00 00 00 00 00 00 |start...........|',
    '0000000010: 00 00 00 00 00 00 00 00  00 00 00 00 00 00 00 00 |................|',
    '*',
    'fffffffff0: 00 00 00 00 00 00 00 00  00 00 65 6e 64 00 00 00 |..........end...|',
    '',
  ].join('\n'))
})

test('dump [ CMD ARGS ... ] runs the server as nbddump does (systemd socket activation)', async (t) => {
  if (!requireTool(t, 'nbddump', 'nbdkit')) return
  const cmd = ['[', 'nbdkit', 'data', 'data="NBD" 0x00 0xff @128 "end"', ']']
  await sameAsNbddump(t, ['--', ...cmd])
  // No `--` needed before the bracket.
  const r = await cli('dump', ...cmd)
  t.is(r.status, 0, r.stderr)
  t.regex(r.stdout.toString(), /^0000000000: 4e 42 44 00 ff/)
})

test('dump and info over TLS with the --tls options equal nbddump and nbdinfo over an nbds URI (PSK)', async (t) => {
  if (!requireTool(t, 'nbddump', 'nbdinfo', 'file', ...CROSSCHECK_TOOLS)) return
  const dir = makeTempDir('nbd-cli-tls-')
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }))
  const psk = path.join(dir, 'keys.psk')
  fs.writeFileSync(psk, `alice:${randomBytes(32).toString('hex')}\n`)
  const server = await useNbdkit(t, ['memory', String(64 * KiB)], { extraArgs: ['--tls=require', `--tls-psk=${psk}`] })
  if (!server) return
  const tlsUri = `nbds+unix://alice@/?socket=${server.socket}&tls-psk-file=${psk}`
  await crossWritePrefix(tlsUri, mixedContent(64 * KiB))
  await sameAsNbddump(t, ['--tls=require', `--tls-psk-file=${psk}`, '--tls-username', 'alice', server.uri], [tlsUri])
  // Options before the subcommand apply too; a separate value works for them.
  const before = await cli('--tls', 'require', `--tls-psk-file=${psk}`, '--tls-username=alice', 'dump', '-n', '16', server.uri)
  t.is(before.status, 0, before.stderr)
  t.is(before.stdout.length, 80)
  // Without TLS the server refuses: one line, the code, exit status 1.
  const plain = await cli('dump', server.uri)
  t.is(plain.status, 1)
  t.is(plain.stdout.length, 0)
  t.regex(plain.stderr, /^nbd-client: [A-Z]+: connectUri: [^\n]+\n$/)
  // info over the same TLS URI: nbdinfo's text ("with TLS", the nbds URI) and --is tls.
  const ours = await cli('info', tlsUri)
  const theirs = await run(['nbdinfo', tlsUri])
  t.is(ours.status, 0, ours.stderr)
  t.is(ours.stdout.toString(), theirs.stdout.toString())
  t.regex(ours.stdout.toString(), /^protocol: newstyle-fixed with TLS/)
  t.is((await cli('info', '--is', 'tls', tlsUri)).status, 0)
  t.is((await cli('info', '--is', 'tls', '--tls=require', `--tls-psk-file=${psk}`, '--tls-username=alice', server.uri)).status, 0)
  const wrong = path.join(dir, 'wrong.psk')
  fs.writeFileSync(wrong, `alice:${randomBytes(32).toString('hex')}\n`)
  const bad = await cli('dump', '--tls=require', `--tls-psk-file=${wrong}`, '--tls-username=alice', server.uri)
  t.is(bad.status, 1)
  t.regex(bad.stderr, /^nbd-client: E[A-Z]+: connectUri: [^\n]*\n$/)
})

test('--help lists the subcommands; --version; each subcommand has --help', async (t) => {
  const help = await cli('--help')
  t.is(help.status, 0)
  t.is(help.stderr, '')
  const text = help.stdout.toString()
  for (const name of ['info', 'copy', 'dump']) t.regex(text, new RegExp(`^    ${name} `, 'm'))
  for (const option of ['--tls=', '--tls-psk-file', '--debug', '--version']) t.true(text.includes(option), option)
  const v = await cli('--version')
  t.is(v.status, 0)
  t.is(v.stdout.toString(), `nbd-client ${version}\n`)
  t.is((await cli('dump', '-V')).stdout.toString(), `nbd-client ${version}\n`)
  for (const name of ['info', 'copy', 'dump']) {
    const sub = await cli(name, '--help')
    t.is(sub.status, 0, `${name} --help: ${sub.stderr}`)
    t.true(sub.stdout.toString().includes(`nbd-client ${name}`), `${name} --help names its synopsis`)
  }
})

test('usage errors and failures: one line on stderr with the code, exit status 1, no stack unless --debug', async (t) => {
  const cases: [string[], RegExp][] = [
    [[], /^nbd-client: EINVAL: usage: a subcommand is required/],
    [['frobnicate'], /^nbd-client: EINVAL: usage: unknown subcommand 'frobnicate'/],
    [['dump'], /^nbd-client: EINVAL: dump: an NBD URI or \[ CMD ARGS \.\.\. \] is required/],
    [['dump', 'a', 'b'], /^nbd-client: EINVAL: dump: expected one NBD URI/],
    [['dump', '--bogus', 'nbd://x'], /^nbd-client: EINVAL: dump: unrecognized option '--bogus'/],
    [['dump', '-q', 'nbd://x'], /^nbd-client: EINVAL: dump: invalid option -- 'q'/],
    [['dump', '--length'], /^nbd-client: EINVAL: dump: option '--length' requires an argument/],
    [['dump', '--length=12x', 'nbd://x'], /^nbd-client: EINVAL: dump: could not parse --length option: 12x/],
    [['dump', '--tls=sometimes', 'nbd://x'], /^nbd-client: EINVAL: dump: --tls must be disable, allow or require/],
    [['dump', 'http://example.com/'], /^nbd-client: EINVAL: connectUri: /],
    [['dump', 'nbd+unix:///?socket=/nonexistent/sock'], /^nbd-client: ENOENT: connectUri: /],
    [['dump', '[', 'false', ']'], /^nbd-client: E[A-Z]+: connectSystemdSocketActivation: /],
  ]
  for (const [args, pattern] of cases) {
    const r = await cli(...args)
    t.is(r.status, 1, args.join(' '))
    t.is(r.stdout.length, 0, args.join(' '))
    t.regex(r.stderr, pattern, args.join(' '))
    t.is(r.stderr.split('\n').length, 2, `one line: ${JSON.stringify(r.stderr)}`)
    t.false(r.stderr.includes('    at '), 'no stack trace')
  }
  const debug = await cli('--debug', 'dump', 'nbd+unix:///?socket=/nonexistent/sock')
  t.is(debug.status, 1)
  // The debug lines (libnbd's 'closing handle' among them) come first; then the error line.
  t.regex(debug.stderr, /^nbd-client: ENOENT: connectUri: /m)
  t.true(debug.stderr.includes('    at '), 'a stack trace with --debug')
})

test('--debug prints the protocol exchange on stderr and leaves stdout alone', async (t) => {
  const server = await useNbdkit(t, ['pattern', '64'])
  if (!server) return
  const plain = await cli('dump', server.uri)
  const debug = await cli('dump', '--debug', server.uri)
  t.is(debug.status, 0)
  t.true(debug.stdout.equals(plain.stdout))
  t.regex(debug.stderr, /NBD_OPT_GO/)
  t.regex(debug.stderr, /NBD_CMD_READ/)
})

test('dump into a closed pipe ends quietly', async (t) => {
  const server = await useNbdkit(t, ['pattern', String(64 * MiB)])
  if (!server) return
  const r2 = await run(['bash', '-c', `set -o pipefail; '${process.execPath}' '${CLI}' dump '${server.uri}' | head -c 100 >/dev/null; echo "status $?"`])
  t.is(r2.stdout.toString(), 'status 0\n')
  t.is(r2.stderr, '')
})

// ---- info: nbdinfo's output and exit statuses ----

/** Runs `nbd-client info ARGS TARGET` and `nbdinfo ARGS TARGET`: same status, same stdout. */
async function sameAsNbdinfo(t: ExecutionContext, args: string[], target: string[]): Promise<Run> {
  const ours = await cli('info', ...args, ...target)
  const theirs = await run(['nbdinfo', ...args, ...target])
  const what = `info ${args.join(' ')}`
  t.is(ours.status, theirs.status, `${what}: exit status (ours: ${ours.stderr.trim()}; nbdinfo: ${theirs.stderr.trim()})`)
  if (!ours.stdout.equals(theirs.stdout)) {
    const a = ours.stdout.toString().split('\n')
    const b = theirs.stdout.toString().split('\n')
    const i = a.findIndex((line, k) => line !== b[k])
    t.fail(`${what} differs from nbdinfo at line ${i + 1}:\n  ours:    ${JSON.stringify(a[i])}\n  nbdinfo: ${JSON.stringify(b[i])}`)
  } else {
    t.pass()
  }
  return ours
}

const DESCRIBE_MODES = [[], ['--json'], ['--no-content'], ['--list'], ['--list', '--json'], ['--size'], ['--size', '--json']]
const MAP_MODES = [['--map'], ['--map', '--json'], ['--map', '--totals'], ['--map', '--totals', '--json']]
const FEATURES = ['connect', 'read', 'write', 'tls', 'structured-reply', 'read-only', 'rotational', 'cache', 'df',
  'fast-zero', 'flush', 'fua', 'multi-conn', 'trim', 'zero']

test('info equals nbdinfo on nbdkit: every mode, --map with totals, --can/--is exit statuses', async (t) => {
  if (!requireTool(t, 'nbdinfo', 'file', ...CROSSCHECK_TOOLS)) return
  const size = 8 * MiB
  const memory = await useNbdkit(t, ['memory', String(size)])
  const sparse = await useNbdkit(t, ['sparse-random', String(64 * MiB), 'seed=7'])
  const readOnly = await useNbdkit(t, ['--filter=blocksize-policy', 'pattern', String(3 * MiB + 512), 'blocksize-minimum=512',
    'blocksize-preferred=4096', 'blocksize-maximum=1M'], { readOnly: true })
  if (!memory || !sparse || !readOnly) return
  // Some data, some zeroes, some holes.
  const data = Buffer.alloc(4 * MiB)
  seededBytes(MiB, 5).copy(data, 0)
  seededBytes(64 * KiB, 6).copy(data, 3 * MiB)
  await crossWritePrefix(memory.uri, data)
  for (const server of [memory, sparse, readOnly]) {
    for (const mode of [...DESCRIBE_MODES, ...MAP_MODES]) await sameAsNbdinfo(t, mode, [server.uri])
    for (const mode of [['--color'], ['--color', '--map'], ['--color', '--map', '--totals'], ['--color', '--no-color']]) {
      await sameAsNbdinfo(t, mode, [server.uri])
    }
    for (const f of FEATURES) await sameAsNbdinfo(t, ['--can', f], [server.uri])
    await sameAsNbdinfo(t, ['--is', 'read-only'], [server.uri])
  }
  const text = (await cli('info', memory.uri)).stdout.toString()
  t.regex(text, /^protocol: newstyle-fixed without TLS, using structured packets\n/)
  t.regex(text, /\texport-size: 8388608 \(8M\)\n/)
  t.regex(text, /\tcontent: data\n/)
  // --can answers with 0 or 2; an unknown feature is an error (1).
  t.is((await cli('info', '--can', 'trim', memory.uri)).status, 0)
  t.is((await cli('info', '--is', 'read-only', memory.uri)).status, 2)
  t.is((await cli('info', '--is', 'read-only', readOnly.uri)).status, 0)
  const unknown = await cli('info', '--can', 'fly', memory.uri)
  t.is(unknown.status, 1)
  t.regex(unknown.stderr, /^nbd-client: EINVAL: info: unknown --can or --is option: fly\n$/)
  // Parsed, the JSON is what the text says.
  const json = JSON.parse((await cli('info', '--json', readOnly.uri)).stdout.toString())
  t.is(json.exports[0]['export-size'], 3 * MiB + 512)
  t.is(json.exports[0].block_size_minimum, 512)
  t.is(json.exports[0].is_read_only, true)
})

test('info equals nbdinfo on qemu-nbd: description, contexts, allocation depth, dirty bitmap maps, subprocess', async (t) => {
  if (!requireTool(t, 'nbdinfo', 'file', 'qemu-io', 'qemu-img')) return
  const qemuIo = (image: string, ...commands: string[]) => {
    const args = ['-f', 'qcow2']
    for (const c of commands) args.push('-c', c)
    const r = require('node:child_process').spawnSync('qemu-io', [...args, image], { encoding: 'utf8' })
    if (r.status !== 0) throw new Error(`qemu-io: ${r.stderr}`)
  }
  let top = ''
  const server = await useQemuNbd(t, {
    format: 'qcow2', size: 4 * MiB, description: 'a "quoted"\tdescription', extraArgs: ['-A', '-B', 'b0'],
    prepare: (image, dir) => {
      qemuIo(image, 'write -P 1 0 64k')
      top = path.join(dir, 'top.qcow2')
      const sh = require('node:child_process').spawnSync
      sh('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', image, '-F', 'qcow2', top])
      qemuIo(top, 'write -P 2 1M 64k', 'write -z 2M 64k')
      sh('qemu-img', ['bitmap', '--add', top, 'b0'])
      qemuIo(top, 'write -P 3 3M 4k')
      return top
    },
  })
  if (!server) return
  for (const mode of [...DESCRIBE_MODES, ...MAP_MODES, ['--colour']]) await sameAsNbdinfo(t, mode, [server.uri])
  for (const context of ['qemu:allocation-depth', 'qemu:dirty-bitmap:b0']) {
    for (const extra of [[], ['--json'], ['--totals'], ['--totals', '--json'], ['--color'], ['--totals', '--colour']]) {
      await sameAsNbdinfo(t, [`--map=${context}`, ...extra], [server.uri])
    }
  }
  for (const f of FEATURES) await sameAsNbdinfo(t, ['--can', f], [server.uri])
  const text = (await cli('info', server.uri)).stdout.toString()
  t.regex(text, /\tdescription: a "quoted"\tdescription\n/)
  t.regex(text, /\t\tqemu:dirty-bitmap:b0\n/)
  t.regex((await cli('info', '--map=qemu:dirty-bitmap:b0', server.uri)).stdout.toString(), /dirty/)
  // A context the server lacks: an error, nothing on stdout.
  await sameAsNbdinfo(t, ['--map=qemu:dirty-bitmap:nope'], [server.uri])
  // The server as a subprocess (no uri: line), read-only on the same image.
  for (const mode of [[], ['--json'], ['--map']]) {
    await sameAsNbdinfo(t, mode, ['--', '[', 'qemu-nbd', '-r', '-f', 'qcow2', top, ']'])
  }
})

test('info equals nbdinfo on nbd-server: several exports, --list with and without --content, a missing export', async (t) => {
  if (!requireTool(t, 'nbdinfo', 'file')) return
  const server = await useNbdServer(t, { size: 3 * MiB, extraExports: ['second', 'third'] })
  if (!server) return
  for (const mode of [...DESCRIBE_MODES, ['--list', '--content'], ['--list', '--content', '--json'], ...MAP_MODES]) {
    await sameAsNbdinfo(t, mode, [server.uri])
  }
  for (const f of FEATURES) await sameAsNbdinfo(t, ['--can', f], [server.uri])
  const listed = JSON.parse((await cli('info', '--list', '--json', server.uri)).stdout.toString())
  t.deepEqual(listed.exports.map((e: { 'export-name': string }) => e['export-name']).sort(), ['disk', 'second', 'third'])
  const missing = server.uri.replace('/disk?', '/nonexistent?')
  for (const mode of [[], ['--json']]) {
    const r = await sameAsNbdinfo(t, mode, [missing])
    t.is(r.status, 1)
    t.regex(r.stderr, /^nbd-client: ENOENT: [^\n]* for export: nonexistent\n$/)
  }
})

test('info equals nbdinfo on oldstyle and plain newstyle nbdkit', async (t) => {
  if (!requireTool(t, 'nbdinfo', 'file')) return
  const oldstyle = await useNbdkit(t, ['memory', String(MiB)], { oldstyle: true })
  const plain = await useNbdkit(t, ['memory', String(MiB)], { plainNewstyle: true })
  if (!oldstyle || !plain) return
  for (const server of [oldstyle, plain]) {
    for (const mode of [[], ['--json'], ['--list'], ['--size'], ['--can', 'flush'], ['--map']]) {
      await sameAsNbdinfo(t, mode, [server.uri])
    }
  }
})

test('info equals nbdinfo on an export past 2^53 bytes (nbdkit null 4E): every describing mode', async (t) => {
  if (!requireTool(t, 'nbdinfo', 'file')) return
  const huge = await useNbdkit(t, ['null', '4E'])
  if (!huge) return
  for (const mode of DESCRIBE_MODES) await sameAsNbdinfo(t, mode, [huge.uri])
})

test('info usage errors: conflicting modes, --totals alone, --content with --no-content', async (t) => {
  const cases: [string[], RegExp][] = [
    [['--list', '--size', 'nbd://x'], /you cannot use --list, --map, --size and --can\/--is together/],
    [['--map', '--can', 'trim', 'nbd://x'], /you cannot use/],
    [['--totals', 'nbd://x'], /you must use --totals only with --map/],
    [['--content', '--no-content', 'nbd://x'], /you cannot use --content and --no-content together/],
    [['--can'], /option '--can' requires an argument/],
  ]
  for (const [args, pattern] of cases) {
    const r = await cli('info', ...args)
    t.is(r.status, 1)
    t.regex(r.stderr, /^nbd-client: EINVAL: info: /)
    t.regex(r.stderr, pattern)
    t.is(r.stdout.length, 0)
  }
})

test('copy parses nbdcopy\'s options; a source it cannot reach fails with one line naming the code', async (t) => {
  const bad = await cli('copy', '-C', 'zero', 'nbd://a', 'nbd://b')
  t.is(bad.status, 1)
  t.regex(bad.stderr, /^nbd-client: EINVAL: copy: --connections must be an integer >= 1, got zero/)
  const one = await cli('copy', 'nbd://a')
  t.regex(one.stderr, /^nbd-client: EINVAL: copy: expected a SOURCE and a DESTINATION/)
  const r = await cli('copy', '-C', '2', '-R', '16', '--request-size=65536', '-S', '0', '--flush', 'nbd+unix:///?socket=/nonexistent/nbd.sock', 'null:')
  t.is(r.status, 1)
  t.regex(r.stderr, /^nbd-client: ENOENT: copy: .*nonexistent/)
  t.is(r.stderr.trim().split('\n').length, 1)
})
