/**
 * `info()`: what `nbdinfo --json` (and `nbdinfo --list --json`) reports about a server and its
 * exports, with the same values under camelCase keys, from one connection in option mode.
 *
 * @packageDocumentation
 */

import { execFile } from 'node:child_process'
import fs from 'node:fs'
import os from 'node:os'
import path from 'node:path'
import { NbdError, abortError, checkAborted } from './errors'
import { Handle } from './handle'

/** One export as {@link info} describes it (nbdinfo's JSON keys in camelCase). */
export interface ExportDetails {
  /** `export-name`: the server's canonical name when it sent one, else the name asked for. */
  exportName: string
  /** `description`, when the server has one (absent when empty, as in nbdinfo). */
  description?: string
  /** `content`: `file -b` of the first 8 KiB (only without `list`, as nbdinfo; absent if `file` fails). */
  content?: string
  /** `uri`: only when `info` was given a URI, as nbdinfo. */
  uri?: string
  /** `contexts`: the meta contexts the server offers (absent when it cannot list them). */
  contexts?: string[]
  isRotational: boolean
  isReadOnly: boolean
  canCache: boolean
  canDf: boolean
  canFastZero: boolean
  canFlush: boolean
  canFua: boolean
  canMultiConn: boolean
  canTrim: boolean
  canZero: boolean
  /** Present only when the server advertised block sizes. */
  blockSizeMinimum?: number
  blockSizePreferred?: number
  blockSizeMaximum?: number
  /** The size in bytes: a number, or a bigint for an export past Number.MAX_SAFE_INTEGER (8 PiB). */
  exportSize: number | bigint
  /** `export-size-str`: the size with the largest exact binary suffix (`1M`, `3584K`, `1000`). */
  exportSizeStr: string
}

/** What {@link info} resolves to (nbdinfo's `--json` keys in camelCase; `TLS` is `tls`). */
export interface ExportInfo {
  protocol: 'oldstyle' | 'newstyle' | 'newstyle-fixed'
  tls: boolean
  structured: boolean
  exports: ExportDetails[]
}

/** Options of {@link info}. */
export interface InfoOptions {
  /** Describe every export the server lists (`nbdinfo --list`). */
  list?: boolean
  /**
   * Probe the content with `file -b` as nbdinfo does; default true without `list`, false with
   * it. It ends option mode on the connection (NBD_OPT_GO) and reads the first 8 KiB.
   */
  content?: boolean
  signal?: AbortSignal
}

/** nbdinfo's `export-size-str`: divide by 1024 while it divides exactly, then add K, M, G, T, P or E. */
export function humanSize(bytes: bigint | number): string {
  let n = BigInt(bytes)
  const suffixes = ['', 'K', 'M', 'G', 'T', 'P', 'E']
  let i = 0
  if (n !== 0n) {
    while (n % 1024n === 0n && i < suffixes.length - 1) {
      n /= 1024n
      i++
    }
  }
  return `${n}${suffixes[i]}`
}

function fail(message: string, code = 'EINVAL'): NbdError {
  return new NbdError(code, message, 'info')
}

/** A getter's value, or undefined where the handle cannot tell (nbdinfo then omits the key). */
function maybe<T>(get: () => T): T | undefined {
  try {
    return get()
  } catch {
    return undefined
  }
}

function runFile(file: string): Promise<string | undefined> {
  return new Promise((resolve) => {
    execFile('file', ['-b', file], { encoding: 'utf8' }, (err, stdout) => {
      if (err) return resolve(undefined)
      const line = stdout.split('\n')[0]
      resolve(line === undefined ? undefined : line)
    })
  })
}

/** `file -b` of the export's first 8 KiB, as nbdinfo's content probe. */
async function probeContent(h: Handle, size: number, signal?: AbortSignal): Promise<string | undefined> {
  checkAborted(signal)
  if (h.state === 'negotiating') await h.optGo()
  const first = size > 8192 ? 8192 : size
  let data: Buffer
  try {
    data = first > 0 ? await h.pread(first, 0, { signal }) : Buffer.alloc(0)
  } catch (e) {
    if (signal?.aborted) throw e
    return undefined
  }
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nbd-info-'))
  try {
    const file = path.join(dir, 'content')
    fs.writeFileSync(file, data)
    return await runFile(file)
  } finally {
    fs.rmSync(dir, { recursive: true, force: true })
  }
}

/** Describes the export the handle is set to, as nbdinfo's show_one_export. */
async function describeExport(
  h: Handle,
  listed: { description?: string } | undefined,
  opts: { uri: boolean; content: boolean; signal?: AbortSignal },
): Promise<ExportDetails> {
  if (h.state === 'negotiating') {
    // As nbdinfo: ask without entering transmission; a server that cannot (plain newstyle
    // answers NBD_OPT_INFO with an error) is entered with NBD_OPT_GO instead.
    h.setRequestMetaContext(false)
    try {
      await h.optInfo()
    } catch (e) {
      if (h.state !== 'negotiating') throw e
      // After an abort, info() has already rejected: nothing more goes to the server.
      checkAborted(opts.signal)
      await h.optGo()
    }
  }
  checkAborted(opts.signal)
  const sizeBig = h.getSize({ bigint: true })
  const size = sizeBig > BigInt(Number.MAX_SAFE_INTEGER) ? sizeBig : Number(sizeBig)
  const exportName = maybe(() => h.getCanonicalExportName()) || h.getExportName()
  const description = listed?.description ?? maybe(() => h.getExportDescription())
  const uri = opts.uri ? maybe(() => h.getUri()) : undefined
  const flags = {
    isRotational: h.isRotational(),
    isReadOnly: h.isReadOnly(),
    canCache: h.canCache(),
    canDf: h.canDf(),
    canFastZero: h.canFastZero(),
    canFlush: h.canFlush(),
    canFua: h.canFua(),
    canMultiConn: h.canMultiConn(),
    canTrim: h.canTrim(),
    canZero: h.canZero(),
  }
  const blockSizes = {
    blockSizeMinimum: maybe(() => h.getBlockSize('minimum')),
    blockSizePreferred: maybe(() => h.getBlockSize('preferred')),
    blockSizeMaximum: maybe(() => h.getBlockSize('maximum')),
  }
  let contexts: string[] | undefined
  if (h.state === 'negotiating') {
    checkAborted(opts.signal)
    try {
      contexts = await h.optListMetaContext()
    } catch (e) {
      if (h.state !== 'negotiating') throw e
    }
  }
  // Last, as in nbdinfo: it leaves option mode.
  const content = opts.content ? await probeContent(h, Number(sizeBig), opts.signal) : undefined

  const out: ExportDetails = { exportName } as ExportDetails
  if (description) out.description = description
  if (content !== undefined) out.content = content
  if (uri !== undefined) out.uri = uri
  if (contexts !== undefined) out.contexts = contexts
  Object.assign(out, flags)
  for (const [key, value] of Object.entries(blockSizes)) {
    if (value !== undefined && value > 0) (out as unknown as Record<string, number>)[key] = value
  }
  out.exportSize = size
  out.exportSizeStr = humanSize(sizeBig)
  return out
}

/**
 * Describes a server and its export like `nbdinfo --json`: protocol, TLS, structured replies,
 * and for the export its name, description, content, URI, meta contexts, flags, block sizes
 * and size, with nbdinfo's values under camelCase keys. With `list`, every export the server
 * lists, like `nbdinfo --list --json`.
 *
 * `target` is an NBD URI (one connection in option mode, closed before this resolves; files
 * named in the URI, such as `tls-psk-file`, are allowed as nbdinfo allows them) or a `Handle`:
 * one still `negotiating` (connected with `optMode: true`) is used as it is and left
 * connected, with its export name and `requestMetaContext` setting as they were (no content
 * probe unless `content: true`, which ends its option mode); one that is `ready` is
 * described from its getters alone (no `contexts`, `content` or `list`).
 *
 * `signal` rejects the call at once with an `AbortError`. A connection info() opened is
 * closed; a caller's handle is left open, and an option request it was waiting for stays
 * outstanding until the server answers or the handle is closed.
 */
export async function info(target: string | Handle, options?: InfoOptions): Promise<ExportInfo> {
  if (options !== undefined && (options === null || typeof options !== 'object')) {
    throw fail('options must be an object')
  }
  const o = options ?? {}
  if (o.list !== undefined && typeof o.list !== 'boolean') throw fail('list must be a boolean')
  if (o.content !== undefined && typeof o.content !== 'boolean') throw fail('content must be a boolean')
  if (o.signal !== undefined && !(o.signal instanceof AbortSignal)) throw fail('signal must be an AbortSignal')
  const list = o.list === true
  const signal = o.signal
  checkAborted(signal)

  let h: Handle
  let owned = false
  if (typeof target === 'string') {
    h = new Handle({ optMode: true, fullInfo: true, uriAllowLocalFile: true })
    owned = true
  } else if (target instanceof Handle) {
    h = target
  } else {
    throw fail('target must be an NBD URI or a Handle')
  }

  // An abort closes a handle info() opened, which ends whatever it waits for; a caller's
  // handle is not closed, so the call rejects at once instead, and leaves the handle with
  // its request outstanding (only closing it ends that).
  let onAbort = () => {}
  const aborted = new Promise<never>((_, reject) => {
    onAbort = () => {
      if (owned) void h.close()
      reject(abortError(signal))
    }
  })
  aborted.catch(() => {})
  signal?.addEventListener('abort', onAbort, { once: true })
  // A caller's handle still negotiating gets back the settings info() changes on it.
  const restore = !owned && h.state === 'negotiating' ? { name: h.getExportName(), meta: h.getRequestMetaContext() } : undefined
  const work = describe(h, owned, target, list, o.content, signal)
  try {
    return await (signal ? Promise.race([work, aborted]) : work)
  } catch (e) {
    if (signal?.aborted) throw abortError(signal)
    throw e instanceof NbdError ? new NbdError(e.code, e.message.replace(/^[a-zA-Z]+: /, ''), 'info', e.errno) : e
  } finally {
    if (signal?.aborted) work.catch(() => {})
    if (restore) {
      const giveBack = () => {
        if (h.state !== 'negotiating') return
        try {
          if (h.getExportName() !== restore.name) h.setExportName(restore.name)
          h.setRequestMetaContext(restore.meta)
        } catch {
          // The handle moved on (closed by the caller meanwhile): nothing to give back.
        }
      }
      // After an abort the work may still wait for the server's answer to its last
      // request: the settings are given back once that has come.
      if (signal?.aborted) work.then(giveBack, giveBack)
      else giveBack()
    }
    if (owned) {
      // Polite, but not waited for after an abort (close ends it then).
      if (h.state === 'negotiating' && !signal?.aborted) await h.optAbort().catch(() => {})
      await h.close()
    }
    signal?.removeEventListener('abort', onAbort)
  }
}

/** info()'s work on its handle, `h`, which it opened itself when `owned`. */
async function describe(
  h: Handle,
  owned: boolean,
  target: string | Handle,
  list: boolean,
  wantContent: boolean | undefined,
  signal: AbortSignal | undefined,
): Promise<ExportInfo> {
  if (owned) await h.connectUri(target as string)
  else if (h.state !== 'negotiating' && h.state !== 'ready') {
    throw fail(`the handle is ${h.state}; info needs one that is connected`)
  }
  checkAborted(signal)
  const head = {
    protocol: h.getProtocol(),
    tls: h.getTlsNegotiated(),
    structured: h.getStructuredRepliesNegotiated(),
  }
  const exports: ExportDetails[] = []
  const describeOpts = { uri: owned, signal }
  if (!list) {
    const content = wantContent ?? owned
    exports.push(await describeExport(h, undefined, { ...describeOpts, content }))
  } else {
    if (h.state !== 'negotiating') throw fail('list needs a connection in option mode (optMode: true)')
    const listing = await h.optList()
    for (const entry of listing) {
      checkAborted(signal)
      if (h.state !== 'negotiating') break
      h.setExportName(entry.name)
      exports.push(await describeExport(h, entry, { ...describeOpts, content: wantContent === true }))
    }
  }
  return { ...head, exports }
}
