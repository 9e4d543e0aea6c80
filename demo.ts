/**
 * `npm run demo`: nbd-client against the in-process server of `nbd-client/testing`.
 *
 * Starts an {@link EmbeddedServer}, connects a {@link Handle} to it through a socket pair,
 * prints what the handshake told the client, then writes a pattern over the whole export with
 * many commands in flight, reads it back the same way, verifies every byte and prints the
 * throughput and the handle's traffic counters. Needs no system packages.
 *
 * Usage: `node dist/demo.js [--size MiB]` (export size, all of which is written and read back;
 * default 256).
 *
 * @packageDocumentation
 */

import { Handle, version } from './index'
import { EmbeddedServer } from './testing'

const KiB = 1024
const MiB = 1024 * KiB

/** Bytes per pwrite/pread. */
const REQUEST_SIZE = 256 * KiB
/** Commands kept in flight at once. */
const IN_FLIGHT = 64
/** Each sector of the pattern starts with its own offset, so a misplaced block is caught. */
const SECTOR = 4 * KiB

const DEFAULT_SIZE_MIB = 256

const USAGE = `usage: node dist/demo.js [--size MiB]

  --size MiB   size of the in-process export, all of which is written and read back
               (a positive integer; default ${DEFAULT_SIZE_MIB})
`

/** Parses the command line; exits with the usage text on anything unexpected. */
function parseArgs(argv: string[]): { sizeMiB: number } {
  let sizeMiB = DEFAULT_SIZE_MIB
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i] ?? ''
    if (arg === '-h' || arg === '--help') {
      process.stdout.write(USAGE)
      process.exit(0)
    }
    let value: string | undefined
    if (arg === '--size') value = argv[++i]
    else if (arg.startsWith('--size=')) value = arg.slice('--size='.length)
    else usageError(`unknown argument '${arg}'`)
    const n = Number(value)
    if (value === undefined || !/^\d+$/.test(value) || !Number.isSafeInteger(n * MiB) || n < 1) {
      usageError(`--size needs a positive whole number of MiB, got '${value ?? ''}'`)
    }
    sizeMiB = n
  }
  return { sizeMiB }
}

function usageError(message: string): never {
  process.stderr.write(`demo: ${message}\n\n${USAGE}`)
  process.exit(2)
}

/** A fixed pseudo-random block (xorshift32), the body of every request's data. */
function makeTemplate(length: number): Buffer {
  const out = Buffer.allocUnsafe(length)
  let x = 0x9e3779b9
  for (let i = 0; i < length; i++) {
    x ^= x << 13
    x ^= x >>> 17
    x ^= x << 5
    out[i] = x & 0xff
  }
  return out
}

/** The data expected at `offset`: the template, each sector stamped with its own offset. */
function patternAt(template: Buffer, offset: number, length: number): Buffer {
  const block = Buffer.from(template.subarray(0, length))
  for (let s = 0; s + 8 <= length; s += SECTOR) block.writeBigUInt64BE(BigInt(offset + s), s)
  return block
}

/**
 * Runs `task(0) … task(count - 1)` keeping up to `concurrency` of them pending at once;
 * rejects with the first failure.
 */
async function pool(count: number, concurrency: number, task: (i: number) => Promise<void>): Promise<void> {
  let next = 0
  const worker = async (): Promise<void> => {
    while (next < count) await task(next++)
  }
  await Promise.all(Array.from({ length: Math.min(concurrency, count) }, worker))
}

function mib(bytes: number | bigint): string {
  return `${(Number(bytes) / MiB).toFixed(1)} MiB`
}

function yesNo(value: boolean): string {
  return value ? 'yes' : 'no'
}

/** Evaluates one piece of handle information for printing, showing an error code instead of failing. */
function show(get: () => string): string {
  try {
    return get()
  } catch (err) {
    return `(${(err as { code?: string }).code ?? String(err)})`
  }
}

function row(label: string, value: string): void {
  console.log(`  ${label.padEnd(22)}${value}`)
}

async function main(): Promise<void> {
  const { sizeMiB } = parseArgs(process.argv.slice(2))
  const size = sizeMiB * MiB
  const requests = Math.ceil(size / REQUEST_SIZE)

  console.log(`nbd-client ${version} demo: in-process NBD server, ${sizeMiB} MiB memory export\n`)

  const server = new EmbeddedServer({ size })
  const h = new Handle({ name: 'demo' })
  try {
    const fd = server.socketpair()
    await h.connectSocket(fd)
    console.log(`Connected through a socket pair (fd ${fd}); the handshake reported:`)
    row('protocol', show(() => h.getProtocol()))
    row('structured replies', show(() => yesNo(h.getStructuredRepliesNegotiated())))
    row('export size', show(() => {
      const bytes = h.getSize({ bigint: true })
      return `${mib(bytes)} (${bytes} bytes)`
    }))
    row('read-only', show(() => yesNo(h.isReadOnly())))
    row('rotational', show(() => yesNo(h.isRotational())))
    const flags: [string, () => boolean][] = [
      ['flush', () => h.canFlush()],
      ['fua', () => h.canFua()],
      ['trim', () => h.canTrim()],
      ['zero', () => h.canZero()],
      ['fast zero', () => h.canFastZero()],
      ['cache', () => h.canCache()],
      ['df', () => h.canDf()],
      ['multi-conn', () => h.canMultiConn()],
    ]
    for (const [name, can] of flags) row(`can ${name}`, show(() => yesNo(can())))
    const kinds = ['minimum', 'preferred', 'maximum', 'payload'] as const
    row('block sizes', kinds.map((k) => `${k} ${show(() => {
      const n = h.getBlockSize(k)
      return n === 0 ? '-' : n % MiB === 0 ? `${n / MiB} MiB` : n % KiB === 0 ? `${n / KiB} KiB` : `${n} B`
    })}`).join(', '))
    console.log()

    const template = makeTemplate(REQUEST_SIZE)
    const lengthOf = (i: number): number => Math.min(REQUEST_SIZE, size - i * REQUEST_SIZE)
    const plan = `${requests} × ${REQUEST_SIZE / KiB} KiB, up to ${IN_FLIGHT} in flight`

    let start = performance.now()
    await pool(requests, IN_FLIGHT, (i) => h.pwrite(patternAt(template, i * REQUEST_SIZE, lengthOf(i)), i * REQUEST_SIZE))
    await h.flush()
    const writeSeconds = (performance.now() - start) / 1000
    console.log(`Wrote   ${mib(size)} (${plan}, then flush) in ${writeSeconds.toFixed(2)} s: ${(size / MiB / writeSeconds).toFixed(0)} MiB/s`)

    let verified = 0
    start = performance.now()
    await pool(requests, IN_FLIGHT, async (i) => {
      const offset = i * REQUEST_SIZE
      const got = await h.pread(lengthOf(i), offset)
      const want = patternAt(template, offset, lengthOf(i))
      if (!got.equals(want)) {
        let at = 0
        while (at < want.length && got[at] === want[at]) at++
        throw new Error(`data mismatch at byte ${offset + at}: read ${got[at]}, expected ${want[at]}`)
      }
      verified += got.length
    })
    const readSeconds = (performance.now() - start) / 1000
    console.log(`Read    ${mib(size)} (${plan}) in ${readSeconds.toFixed(2)} s: ${(size / MiB / readSeconds).toFixed(0)} MiB/s`)
    // Cross-check one block on the server side too: the writes really reached its memory.
    const lastOffset = (requests - 1) * REQUEST_SIZE
    const lastLength = lengthOf(requests - 1)
    const serverAgrees = server.read(lastOffset, lastLength).equals(patternAt(template, lastOffset, lastLength))
    console.log(`Verified all ${verified} bytes; server memory agrees: ${yesNo(serverAgrees)}\n`)

    const { bytesSent, chunksSent, bytesReceived, chunksReceived } = h.stats
    console.log('Handle stats:')
    row('bytes sent', `${bytesSent} (${mib(bytesSent)})`)
    row('chunks sent', `${chunksSent}`)
    row('bytes received', `${bytesReceived} (${mib(bytesReceived)})`)
    row('chunks received', `${chunksReceived}`)

    await h.shutdown()
    console.log('\nDisconnected cleanly (NBD_CMD_DISC).')
  } finally {
    await h.close()
    server.close()
  }
}

main().catch((err: unknown) => {
  const e = err as { code?: string; operation?: string; message?: string }
  const where = e.operation ? ` in ${e.operation}` : ''
  const code = e.code ? ` [${e.code}]` : ''
  console.error(`demo failed${where}${code}: ${e.message ?? String(err)}`)
  process.exitCode = 1
})
