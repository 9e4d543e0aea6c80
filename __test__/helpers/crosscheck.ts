// An independent client (libnbd's nbdcopy and nbdinfo) to check what our client wrote and to
// plant data that our client must read back. nbdsh would allow ranged reads and writes, but it
// needs libnbd's Python bindings, which are not always installed; nbdcopy copies whole exports,
// so ranged operations here read (and for writes, write back) the whole export. Keep the exports
// used with these helpers small (a few MiB).
import { spawn } from 'node:child_process'

export const CROSSCHECK_TOOLS = ['nbdcopy', 'nbdinfo']

function run(argv: string[], input?: Uint8Array): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const child = spawn(argv[0], argv.slice(1), { stdio: ['pipe', 'pipe', 'pipe'] })
    const out: Buffer[] = []
    let err = ''
    child.stdout.on('data', (chunk: Buffer) => out.push(chunk))
    child.stderr.setEncoding('utf8')
    child.stderr.on('data', (chunk: string) => {
      err += chunk
    })
    child.once('error', reject)
    child.once('close', (code, signal) => {
      if (code === 0) resolve(Buffer.concat(out))
      else reject(new Error(`${argv.join(' ')} failed (${code ?? signal}): ${err}`))
    })
    child.stdin.on('error', () => {
      // reported through the exit status
    })
    child.stdin.end(input)
  })
}

/** The whole export, read by nbdcopy. */
export function crossReadAll(uri: string): Promise<Buffer> {
  return run(['nbdcopy', uri, '-'])
}

/** `length` bytes at `offset`, read by nbdcopy. */
export async function crossRead(uri: string, offset: number, length: number): Promise<Buffer> {
  const all = await crossReadAll(uri)
  if (offset + length > all.length) throw new RangeError(`crossRead past the end of ${uri}`)
  return all.subarray(offset, offset + length)
}

/** Writes `data` at offset 0 with nbdcopy (bytes past data.length are left alone). */
export async function crossWritePrefix(uri: string, data: Uint8Array): Promise<void> {
  await run(['nbdcopy', '-', uri], data)
}

/** Writes `data` at `offset` with nbdcopy, as a read-modify-write of the whole export. */
export async function crossWrite(uri: string, offset: number, data: Uint8Array): Promise<void> {
  const all = Buffer.from(await crossReadAll(uri))
  if (offset + data.length > all.length) throw new RangeError(`crossWrite past the end of ${uri}`)
  all.set(data, offset)
  await crossWritePrefix(uri, all)
}

export interface NbdinfoExport {
  'export-name': string
  'export-size': number
  is_read_only: boolean
  is_rotational: boolean
  can_cache: boolean
  can_df: boolean
  can_fast_zero: boolean
  can_flush: boolean
  can_fua: boolean
  can_multi_conn: boolean
  can_trim: boolean
  can_zero: boolean
  block_size_minimum?: number
  block_size_preferred?: number
  block_size_maximum?: number
  [key: string]: unknown
}

export interface NbdinfoResult {
  protocol: 'oldstyle' | 'newstyle' | 'newstyle-fixed'
  TLS: boolean
  structured: boolean
  exports: NbdinfoExport[]
}

/** `nbdinfo --json URI`, parsed. */
export async function nbdinfoJson(uri: string): Promise<NbdinfoResult> {
  return JSON.parse((await run(['nbdinfo', '--json', uri])).toString('utf8')) as NbdinfoResult
}

/** `nbdinfo --size URI`: the size as libnbd sees it after NBD_OPT_GO. */
export async function nbdinfoSize(uri: string): Promise<number> {
  return Number((await run(['nbdinfo', '--size', uri])).toString('utf8').trim())
}

/** One line of `nbdinfo --map --json`. */
export interface MapEntry {
  offset: number
  length: number
  type: number
}

/** `nbdinfo --map[=CONTEXT] --json URI`: the whole export's extents, merged as nbdinfo merges them. */
export async function nbdinfoMap(uri: string, context = 'base:allocation'): Promise<MapEntry[]> {
  const out = await run(['nbdinfo', `--map=${context}`, '--json', uri])
  const list = JSON.parse(out.toString('utf8')) as MapEntry[]
  return list.map(({ offset, length, type }) => ({ offset, length, type }))
}

/** `nbdinfo --list --json URI`. */
export async function nbdinfoList(uri: string): Promise<NbdinfoResult> {
  return JSON.parse((await run(['nbdinfo', '--list', '--json', uri])).toString('utf8')) as NbdinfoResult
}
