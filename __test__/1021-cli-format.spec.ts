// The pure parts of the nbd-client command: nbdinfo's number and string formats, the option
// parser, and the hexdump lines fed in pieces of any size.
import test from 'ava'
import path from 'node:path'

const bin = path.join(__dirname, '..', 'dist', 'bin')
/* eslint-disable @typescript-eslint/no-require-imports */
const format = require(path.join(bin, 'info-format.js')) as typeof import('../bin/info-format')
const cli = require(path.join(bin, 'cli.js')) as typeof import('../bin/cli')
const dump = require(path.join(bin, 'dump.js')) as typeof import('../bin/dump')

test('humanSize abbreviates only exact multiples of 1024, as nbdinfo', (t) => {
  const cases: [bigint, string, boolean][] = [
    [0n, '0', false], [1n, '1', false], [1000n, '1000', false], [1024n, '1K', true], [1536n, '1536', false],
    [1048576n, '1M', true], [3n << 30n, '3G', true], [3955556352n, '3862848K', true], [1n << 60n, '1E', true],
    [1n << 62n, '4E', true], [(1n << 63n) - 512n, '9223372036854775296', false], [(1n << 63n) - 1024n, '9007199254740991K', true],
  ]
  for (const [bytes, text, human] of cases) t.deepEqual(format.humanSize(bytes), { text, human }, String(bytes))
})

test('fixed1 and cG print as printf %.1f and %g', (t) => {
  t.is(format.fixed1(100), '100.0')
  t.is(format.fixed1(50), '50.0')
  t.is(format.fixed1(0.25), '0.2') // a tie: to even, as glibc
  t.is(format.fixed1(0.75), '0.8')
  t.is(format.fixed1(33.33333333), '33.3')
  t.is(format.fixed1(0.05), '0.1') // 0.05 is a little above the tie in binary
  t.is(format.cG(100), '100')
  t.is(format.cG(50), '50')
  t.is(format.cG(33.333333333), '33.3333')
  t.is(format.cG(0.5), '0.5')
  t.is(format.cG(0.0001), '0.0001')
  t.is(format.cG(0.00001234), '1.234e-05')
  t.is(format.cG(9.094947017729282e-11), '9.09495e-11')
  t.is(format.cG(1e6), '1e+06')
  t.is(format.cG(123456), '123456')
  t.is(format.cG(99.99999999), '100')
  t.is(format.cG(13.28125), '13.2812') // a tie: to even
  t.is(format.cG(13.28135), '13.2813') // just below the tie in binary
  t.is(format.cG(99.999996), '100')
  t.is(format.cG(0.00009999996), '0.0001')
  t.is(format.fixed1(99.96), '100.0')
  t.is(format.fixed1(12.25), '12.2')
})

test('jsonString escapes as nbdinfo: backslash, quote and control bytes only', (t) => {
  t.is(format.jsonString('plain'), '"plain"')
  t.is(format.jsonString('a "b" \\ c'), '"a \\"b\\" \\\\ c"')
  t.is(format.jsonString('tab\tnl\n\x01'), '"tab\\u0009nl\\u000a\\u0001"')
  t.is(format.jsonString('ünï/'), '"ünï/"')
})

test('the option parser: long, short, clustered, =values, permutation, -- and [', (t) => {
  const specs = [
    { key: 'n', long: ['length'], short: 'n', arg: 'required' as const },
    { key: 'v', long: ['verbose'], short: 'v', arg: 'none' as const },
    { key: 'map', long: ['map'], arg: 'optional' as const },
  ]
  const p = cli.parseArgs('x', ['-vn5', 'uri', '--length', '7', '--map', '--map=ctx', '-n', '9'], specs)
  t.deepEqual(p.positionals, ['uri'])
  t.deepEqual(p.options.get('n'), ['5', '7', '9'])
  t.deepEqual(p.options.get('v'), [true])
  t.deepEqual(p.options.get('map'), [true, 'ctx'])
  t.deepEqual(cli.parseArgs('x', ['-v', '--', '-n', 'a'], specs).positionals, ['-n', 'a'])
  t.deepEqual(cli.parseArgs('x', ['-v', '[', 'nbdkit', '-r', 'null', ']'], specs).positionals, ['[', 'nbdkit', '-r', 'null', ']'])
  t.throws(() => cli.parseArgs('x', ['--verbose=1'], specs), { message: /doesn't allow an argument/ })
  t.throws(() => cli.parseArgs('x', ['--nope'], specs), { message: /unrecognized option '--nope'/ })
  t.is(cli.parseSize('x', 'length', '4k'), 4096n)
  t.is(cli.parseSize('x', 'length', '1E'), 1n << 60n)
  t.throws(() => cli.parseSize('x', 'length', '16E'), { message: /too large/ })
  t.throws(() => cli.parseSize('x', 'length', '-1'), { message: /could not parse/ })
})

test('HexDumper gives the same lines whatever the pieces it is fed', (t) => {
  const data = Buffer.alloc(1000)
  for (let i = 0; i < data.length; i++) data[i] = i % 7 === 0 ? 0 : (i * 31) & 0xff
  data.fill(0x20, 300, 500)
  const whole = new dump.HexDumper(0n, 1000n, false)
  const expected = whole.push(data) + whole.end()
  for (const piece of [1, 3, 15, 16, 17, 999]) {
    const d = new dump.HexDumper(0n, 1000n, false)
    let out = ''
    for (let i = 0; i < data.length; i += piece) out += d.push(data.subarray(i, i + piece))
    out += d.end()
    t.is(out, expected, `pieces of ${piece}`)
  }
  t.regex(expected, /^\*$/m)
  t.true(expected.endsWith('00000003e0: '.slice(0, 0) + expected.split('\n').slice(-2)[0] + '\n'))
})

test('HexDumper.zeros(n) prints exactly what push() of n zero bytes prints', (t) => {
  let cases = 0
  for (const size of [0n, 1n, 15n, 16n, 17n, 40n, 47n, 48n, 49n, 100n, 1000n]) {
    for (const start of [0n, 1n, 5n, 16n, 17n]) {
      if (start > size) continue
      const total = Number(size - start)
      for (const a of [0, 1, 3, 16, 20, 33]) {
        for (const z of [0, 1, 15, 16, 17, 31, 32, 33, 64, 100]) {
          if (a + z > total) continue
          const data = Buffer.alloc(total, 0x41)
          data.fill(0, a, a + z)
          const ref = new dump.HexDumper(start, size, false)
          const want = ref.push(data) + ref.end()
          const d = new dump.HexDumper(start, size, false)
          const got = d.push(data.subarray(0, a)) + d.zeros(BigInt(z)) + d.push(data.subarray(a + z)) + d.end()
          t.is(got, want, `size ${size} start ${start}: ${a} data bytes, then ${z} zeros`)
          cases++
        }
      }
    }
  }
  t.true(cases > 1000)
  // A terabyte of zeros is three lines and a star, at once.
  const big = new dump.HexDumper(0n, 1n << 40n, false)
  const text = big.zeros(1n << 40n) + big.end()
  t.is(text, '0000000000: 00 00 00 00 00 00 00 00  00 00 00 00 00 00 00 00 |................|\n*\n' +
    'fffffffff0: 00 00 00 00 00 00 00 00  00 00 00 00 00 00 00 00 |................|\n')
})

test('the copy progress bar and --progress=FD lines are nbdcopy\'s', async (t) => {
  const progress = require(path.join(bin, 'progress.js')) as typeof import('../bin/progress')
  const dashes = '-'.repeat(40)
  t.is(progress.progressBar(0, 0), `▝   0% [${dashes}]\r`)
  t.is(progress.progressBar(0, 1), `▐   0% [${dashes}]\r`)
  t.is(progress.progressBar(0.5, 2), `▗  50% [${'*'.repeat(20)}${'-'.repeat(20)}]\r`)
  t.is(progress.progressBar(0.001, 8), `▝   0% [*${'-'.repeat(39)}]\r`)
  t.is(progress.progressBar(0.999, 3), `▃  99% [${'*'.repeat(40)}]\r`)
  t.is(progress.progressBar(1, 5), `█ 100% [${'*'.repeat(40)}]\n`)
  t.is(progress.progressLine(0), '0/100\n')
  t.is(progress.progressLine(0.4299), '42/100\n')
  t.is(progress.progressLine(1), '100/100\n')
  t.is(progress.progressLine(2), '100/100\n')
})

test('nbdcopy itself prints those bars (in a pseudo-terminal) and lines', async (t) => {
  const { requireTool, startNbdkit } = require('./helpers/servers') as typeof import('./helpers/servers')
  if (!requireTool(t, 'nbdcopy', 'nbdkit', 'script')) return
  const progress = require(path.join(bin, 'progress.js')) as typeof import('../bin/progress')
  const { spawnSync } = require('node:child_process') as typeof import('node:child_process')
  const server = await startNbdkit(['memory', '16M'])
  t.teardown(() => server.stop())
  const tty = spawnSync('script', ['-qc', `nbdcopy -p '${server.uri}' null:`, '/dev/null'], { encoding: 'utf8' })
  const frames = tty.stdout.split(/(?<=\r(?!\n)|\r\n)/).filter((f) => f.length > 0)
  t.is(frames[0], progress.progressBar(0, 0))
  // nbdcopy ends the bar with \n; the terminal shows it as \r\n.
  t.is(frames[frames.length - 1], progress.progressBar(1, 0).replace(/\n$/, '\r\n'))
  for (const f of frames) t.regex(f, /^(\S) ( {0,2}\d{1,3})% \[(\**)(-*)\]\r\n?$/u)
  const lines = spawnSync('nbdcopy', ['--progress=1', server.uri, 'null:'], { encoding: 'utf8' }).stdout.split(/(?<=\n)/)
  t.is(lines[0], progress.progressLine(0))
  t.is(lines[lines.length - 1], progress.progressLine(1))
})
