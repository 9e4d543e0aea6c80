// The whole-export calls the CLI needs from the library — info(), Handle.map() and copy() of
// API.md's "Whole-export work" — and the shapes it reads from them.
//
// Those calls are being written in another branch (issue 10). Until they land, this module
// holds minimal stand-ins built on the public Handle API so that `nbd-client info` works and
// can be tested against nbdinfo now. When issue 10 is merged: delete the stand-ins below,
// re-export the library's own `info`, `ExportInfo` and `copy` from '../index', and replace
// `mapExtents(h, …)` by `h.map(…)`. The CLI modules (info.ts, copy.ts) only use what is
// exported here, under the contract's names and shapes.

import { Handle, NbdError, type HandleOptions } from '../index'
import { connectTarget, type Target } from './cli'

/** One export, as `nbdinfo --json` describes it, with camelCase keys (API.md: info()). */
export interface ExportDetails {
  exportName: string
  /** The server's description, when it sent one (from NBD_OPT_LIST in list mode). */
  description?: string
  /** The URI of the export; absent for a subprocess (it would not be meaningful). */
  uri?: string
  /** Every meta context the server offers for the export. */
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
  /** Block size constraints; absent when the server did not advertise them. */
  blockSizeMinimum?: number
  blockSizePreferred?: number
  blockSizeMaximum?: number
  exportSize: bigint
}

/** What info() resolves to: the connection's facts and every export described. */
export interface ExportInfo {
  protocol: 'oldstyle' | 'newstyle' | 'newstyle-fixed'
  tls: boolean
  structured: boolean
  extended: boolean
  exports: ExportDetails[]
  /** Exports the server listed but would not describe (list mode), with the error. */
  failures?: { exportName: string; error: NbdError }[]
}

/** One merged extent of a map (API.md: Handle.map()). */
export interface MapExtent {
  offset: number
  length: number
  flags: number
  /** As nbdinfo names the flags of the known contexts; '' when it has no name for them. */
  description: string
}


function orUndefined<T>(get: () => T): T | undefined {
  try {
    return get()
  } catch {
    return undefined
  }
}

/** Describes the export `h` has chosen (opt mode: NBD_OPT_INFO first, as nbdinfo does). */
async function describe(h: Handle, listedDescription: string | undefined, uri: boolean): Promise<ExportDetails> {
  if (h.state === 'negotiating') {
    h.setRequestMetaContext(false)
    try {
      await h.optInfo()
    } catch {
      await h.optGo()
    }
  }
  const exportName = orUndefined(() => h.getCanonicalExportName()) ?? h.getExportName()
  const description = listedDescription ?? orUndefined(() => h.getExportDescription())
  const d: ExportDetails = {
    exportName,
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
    exportSize: h.getSize({ bigint: true }),
  }
  if (description) d.description = description
  if (uri) d.uri = orUndefined(() => h.getUri())
  if (h.state === 'negotiating') {
    const contexts = await h.optListMetaContext().catch(() => undefined)
    if (contexts !== undefined) d.contexts = contexts
  }
  const minimum = h.getBlockSize('minimum')
  const preferred = h.getBlockSize('preferred')
  const maximum = h.getBlockSize('maximum')
  if (minimum > 0) d.blockSizeMinimum = minimum
  if (preferred > 0) d.blockSizePreferred = preferred
  if (maximum > 0) d.blockSizeMaximum = maximum
  return d
}

/**
 * STAND-IN for the library's info() (issue 10): describes the export of `target`, or with
 * `list` every export the server lists. An export the server will not describe is reported
 * in `failures` (and, without `list`, leaves `exports` empty).
 *
 * Beyond the contract, for the CLI's content probe (nbdinfo runs file(1) on the first 8 KiB):
 * with `firstBytes`, `heads[i]` holds up to that many bytes from the start of `exports[i]`.
 * The library's info() will not read data; once it is used, the CLI reads them itself.
 */
export async function info(
  target: Target,
  options: { list?: boolean; handle?: HandleOptions; firstBytes?: number } = {},
): Promise<ExportInfo & { failures: { exportName: string; error: NbdError }[]; heads: (Buffer | undefined)[] }> {
  const settings: HandleOptions = { ...options.handle, optMode: true, fullInfo: true }
  const uri = 'uri' in target
  const readHead = async (h: Handle, d: ExportDetails): Promise<Buffer | undefined> => {
    if (options.firstBytes === undefined) return undefined
    if (h.state === 'negotiating') await h.optGo()
    const n = d.exportSize < BigInt(options.firstBytes) ? Number(d.exportSize) : options.firstBytes
    return n > 0 ? h.pread(n, 0) : Buffer.alloc(0)
  }
  const h = new Handle(settings)
  try {
    await connectTarget(h, target)
    const result = {
      protocol: h.getProtocol(),
      tls: h.getTlsNegotiated(),
      structured: h.getStructuredRepliesNegotiated(),
      extended: h.getExtendedHeadersNegotiated(),
      exports: [] as ExportDetails[],
      failures: [] as { exportName: string; error: NbdError }[],
      heads: [] as (Buffer | undefined)[],
    }
    if (!options.list) {
      try {
        const d = await describe(h, undefined, uri)
        result.heads.push(await readHead(h, d))
        result.exports.push(d)
      } catch (e) {
        result.failures.push({ exportName: h.getExportName(), error: e as NbdError })
      }
    } else {
      for (const { name, description } of await h.optList()) {
        try {
          if (options.firstBytes === undefined) {
            h.setExportName(name)
            result.exports.push(await describe(h, description, uri))
            result.heads.push(undefined)
          } else {
            // Reading data ends negotiation: one connection per export, as nbdinfo does.
            const one = new Handle(settings)
            try {
              await connectTarget(one, target)
              one.setExportName(name) // after connecting: a URI names its own export
              const d = await describe(one, description, uri)
              result.heads.push(await readHead(one, d))
              result.exports.push(d)
            } finally {
              await one.close()
            }
          }
        } catch (e) {
          result.failures.push({ exportName: name, error: e as NbdError })
        }
      }
    }
    if (h.state === 'negotiating') await h.optAbort().catch(() => undefined)
    else await h.shutdown().catch(() => undefined)
    return result
  } finally {
    await h.close()
  }
}

/** nbdinfo's names for the flags of the contexts it knows. */
export function extentDescription(context: string, flags: number): string {
  if (context === 'base:allocation') return ['data', 'hole', 'zero', 'hole,zero'][flags] ?? ''
  if (context.startsWith('qemu:dirty-bitmap:')) return ['clean', 'dirty'][flags] ?? ''
  if (context === 'qemu:allocation-depth') {
    return flags === 0 ? 'absent' : flags === 1 ? 'local' : `backing depth ${flags}`
  }
  return ''
}

/**
 * STAND-IN for Handle.map() (issue 10): the extents of `context` over the whole export,
 * neighbours with equal flags merged, asking again wherever the server described less.
 */
export async function* mapExtents(h: Handle, context: string): AsyncGenerator<MapExtent> {
  const size = h.getSize()
  const align = h.getBlockSize('minimum') || 512
  const most = 0xffffffff - align + 1
  let pending: MapExtent | undefined
  let offset = 0
  while (offset < size) {
    const reply = await h.blockStatus(Math.min(size - offset, most), offset)
    const extents = reply[context] ?? []
    if (extents.length === 0) throw new NbdError('EPROTO', 'server did not return any extents', 'map')
    for (const e of extents) {
      if (pending !== undefined && pending.flags === e.flags) {
        pending.length += e.length
      } else {
        if (pending !== undefined) yield pending
        pending = { offset, length: e.length, flags: e.flags, description: extentDescription(context, e.flags) }
      }
      offset += e.length
    }
  }
  if (pending !== undefined) yield pending
}

/** Options of copy() (API.md), for the copy subcommand. */
export interface CopyOptions {
  connections?: number
  requests?: number
  requestSize?: number
  sparse?: number | false
  allocated?: boolean
  destinationIsZero?: boolean
  flush?: boolean
  signal?: AbortSignal
  onProgress?(p: { bytesDone: number; bytesTotal: number; bytesZero: number }): void
}

/** What copy() resolves to (API.md). */
export interface CopyResult {
  bytes: number
  dataBytes: number
  zeroBytes: number
  seconds: number
}

/** The library's copy() when it has one (issue 10); undefined in this build. */
export function libraryCopy():
  | ((source: unknown, destination: unknown, options?: CopyOptions) => Promise<CopyResult>)
  | undefined {
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  const lib = require('../index') as Record<string, unknown>
  return typeof lib.copy === 'function' ? (lib.copy as never) : undefined
}
