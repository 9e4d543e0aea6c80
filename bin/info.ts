// nbd-client info: nbdinfo's modes, output and exit statuses.
//
//   info [--json] URI                 the export described (text or JSON)
//   info --list [--json] URI          every export the server lists
//   info --size URI                   the size in bytes
//   info --can X / --is X URI         no output; exit 0 when true, 2 when false
//   info --map[=CONTEXT] [--totals] [--json] URI
//
// The facts come from the library's info() and Handle.map(); the text and JSON are written by
// info-format.ts. As nbdinfo, the output is gathered first and printed at once, so a failure
// prints nothing on stdout; the content of the export is probed with file(1) (info()'s
// `content`) unless --no-content (or --list without --content).

import { Handle, NbdError, type HandleOptions } from '../index'
import {
  COLOUR_OPTIONS, COMMON_HELP, COMMON_OPTIONS, Output, PROGRAM, UsageError, answerHelpOrVersion, colourWanted,
  connectTarget, handleOptions, has, last, parseArgs, parseTarget, type OptionSpec, type Target,
} from './cli'
import {
  exportJson, exportText, jsonHeader, mapJson, mapText, protocolLine, totalsJson, totalsText,
} from './info-format'
import { info, type ExportDetails, type ExportInfo, type MapExtent } from './library'

const SUBCOMMAND = 'info'

const OPTIONS: OptionSpec[] = [
  ...COMMON_OPTIONS,
  { key: 'json', long: ['json'], arg: 'none' },
  { key: 'list', long: ['list'], short: 'L', arg: 'none' },
  { key: 'size', long: ['size'], arg: 'none' },
  { key: 'can', long: ['can', 'is'], arg: 'required' },
  { key: 'map', long: ['map'], arg: 'optional' },
  { key: 'totals', long: ['totals', 'summary'], arg: 'none' },
  { key: 'content', long: ['content'], arg: 'none' },
  { key: 'no-content', long: ['no-content'], arg: 'none' },
  ...COLOUR_OPTIONS,
]

export const INFO_HELP = `
Describe an export, or list a server's exports (as nbdinfo):

    ${PROGRAM} info [--json] NBD-URI | [ CMD ARGS ... ]
    ${PROGRAM} info --size NBD-URI
    ${PROGRAM} info --is read-only|rotational|tls NBD-URI
    ${PROGRAM} info --can cache|connect|df|fast-zero|flush|fua|multi-conn|read|structured-reply|trim|write|zero NBD-URI
    ${PROGRAM} info --map[=CONTEXT] [--totals] [--json] NBD-URI
    ${PROGRAM} info -L|--list [--json] NBD-URI

    --json               JSON output (nbdinfo's keys and values)
    --size               only the size in bytes
    --can X, --is X      no output: exit status 0 if true, 2 if false, 1 on error
    --map[=CONTEXT]      the extents of CONTEXT (default base:allocation)
    --totals             with --map: bytes and share of each type
    -L, --list           every export on the server
    --[no-]content       probe the content with file(1) (default: yes, but not with --list)
    --color, --no-color  ANSI colours (default: when stdout is a terminal)

${COMMON_HELP}`

/** nbdinfo's names for --can / --is, and what each asks of the handle. */
function feature(name: string, h: Handle): boolean | undefined {
  switch (name.toLowerCase()) {
    case 'connect': case 'read': return true
    case 'tls': return h.getTlsNegotiated()
    case 'sr': case 'structured': case 'structured reply': case 'structured-reply': case 'structured_reply':
    case 'structured replies': case 'structured-replies': case 'structured_replies':
      return h.getStructuredRepliesNegotiated()
    case 'readonly': case 'read-only': case 'read_only': return h.isReadOnly()
    case 'write': return !h.isReadOnly()
    case 'rotational': return h.isRotational()
    case 'cache': return h.canCache()
    case 'df': return h.canDf()
    case 'fastzero': case 'fast-zero': case 'fast_zero': return h.canFastZero()
    case 'flush': return h.canFlush()
    case 'fua': return h.canFua()
    case 'multiconn': case 'multi-conn': case 'multi_conn': return h.canMultiConn()
    case 'trim': return h.canTrim()
    case 'zero': return h.canZero()
    default: return undefined
  }
}

function maybe<T>(get: () => T): T | undefined {
  try {
    return get()
  } catch {
    return undefined
  }
}

/** A handle in option mode with nbdinfo's settings (full info), connected to `target`. */
async function optHandle(target: Target, options: HandleOptions): Promise<Handle> {
  const h = new Handle({ ...options, optMode: true, fullInfo: true })
  try {
    await connectTarget(h, target)
  } catch (e) {
    await h.close()
    throw e
  }
  return h
}

/** Ends a handle as nbdinfo does: NBD_OPT_ABORT while negotiating, else NBD_CMD_DISC. */
async function finish(h: Handle): Promise<void> {
  if (h.state === 'negotiating') await h.optAbort().catch(() => undefined)
  else if (h.state === 'ready') await h.shutdown().catch(() => undefined)
  await h.close()
}

/**
 * nbdinfo's content line for export `name`, from a connection of its own: the library's probe
 * ends option mode, and with --list the listing connection must stay in it.
 */
async function contentOf(target: Target, options: HandleOptions, name: string): Promise<string | undefined> {
  const h = await optHandle(target, options)
  try {
    h.setExportName(name) // after connecting: a URI names its own export
    return (await info(h, { content: true })).exports[0]?.content
  } finally {
    await finish(h)
  }
}

interface Failure {
  exportName: string
  error: NbdError
}

/**
 * The library's info() on the command's own connection (so --tls…, --debug and [ CMD ... ]
 * apply), completed with what info() leaves to the caller of a Handle: the `uri` of a URI
 * target, the content probe with --list --content (a connection per export), and, as nbdinfo,
 * an export that will not be described reported on stderr while the others are still printed.
 */
async function describeTarget(target: Target, options: HandleOptions, list: boolean, probe: boolean): Promise<{
  facts: ExportInfo
  failures: Failure[]
}> {
  const h = await optHandle(target, options)
  try {
    const facts: ExportInfo = {
      protocol: h.getProtocol(),
      tls: h.getTlsNegotiated(),
      structured: h.getStructuredRepliesNegotiated(),
      exports: [],
    }
    const failures: Failure[] = []
    // nbdinfo prints a URI only for a URI target (not for a subprocess).
    const uriNow = (): string | undefined => ('uri' in target ? maybe(() => h.getUri()) : undefined)
    const add = (d: ExportDetails, uri: string | undefined): void => {
      if (uri !== undefined) d.uri = uri
      facts.exports.push(d)
    }
    if (!list) {
      const uri = uriNow()
      try {
        for (const d of (await info(h, { content: probe })).exports) add(d, uri)
      } catch (e) {
        failures.push({ exportName: h.getExportName(), error: e as NbdError })
      }
      return { facts, failures }
    }
    for (const { name, description } of await h.optList()) {
      if (h.state !== 'negotiating') break
      h.setExportName(name)
      const uri = uriNow()
      try {
        const d = (await info(h, { content: false })).exports[0]!
        // As info({ list: true }): the listing's description, where the server gave one there.
        if (description !== undefined) {
          if (description) d.description = description
          else delete d.description
        }
        if (probe) {
          const content = await contentOf(target, options, name)
          if (content !== undefined) d.content = content
        }
        add(d, uri)
      } catch (e) {
        failures.push({ exportName: name, error: e as NbdError })
      }
    }
    return { facts, failures }
  } finally {
    await finish(h)
  }
}

/** A connected handle for --size, --can and --map (not opt mode, as nbdinfo). */
async function withHandle<T>(target: Target, options: HandleOptions, run: (h: Handle) => Promise<T>): Promise<T> {
  const h = new Handle(options)
  try {
    await connectTarget(h, target)
    const result = await run(h)
    await h.shutdown().catch(() => undefined)
    return result
  } finally {
    await h.close()
  }
}

/** Runs `nbd-client info ARGS`; resolves to the exit status. */
export async function infoCommand(argv: string[], output = new Output()): Promise<number> {
  const args = parseArgs(SUBCOMMAND, argv, OPTIONS)
  if (await answerHelpOrVersion(args, INFO_HELP, output)) return 0
  const target = parseTarget(SUBCOMMAND, args.positionals)
  const json = has(args, 'json')
  const list = has(args, 'list')
  const sizeOnly = has(args, 'size')
  const can = last(args, 'can') as string | undefined
  const mapArg = last(args, 'map')
  const map = mapArg === undefined ? undefined : mapArg === true ? 'base:allocation' : mapArg
  const totals = has(args, 'totals')
  if (Number(list) + Number(can !== undefined) + Number(map !== undefined) + Number(sizeOnly) > 1) {
    throw new UsageError(SUBCOMMAND, 'you cannot use --list, --map, --size and --can/--is together')
  }
  if (has(args, 'content') && has(args, 'no-content')) {
    throw new UsageError(SUBCOMMAND, 'you cannot use --content and --no-content together')
  }
  if (totals && map === undefined) throw new UsageError(SUBCOMMAND, 'you must use --totals only with --map')
  const options = handleOptions(SUBCOMMAND, args)
  const colour = colourWanted(argv)

  if (sizeOnly) {
    const size = await withHandle(target, options, async (h) => h.getSize({ bigint: true }))
    await output.write(`${size}\n`)
    return 0
  }
  if (can !== undefined) {
    const answer = await withHandle(target, options, async (h) => feature(can, h))
    if (answer === undefined) throw new NbdError('EINVAL', `unknown --can or --is option: ${can}`, SUBCOMMAND)
    return answer ? 0 : 2
  }
  if (map !== undefined) {
    const { extents, size } = await withHandle(target, { ...options, metaContexts: [map] }, async (h) => {
      if (!h.canMetaContext(map)) {
        throw new NbdError('ENOTSUP', `--map: server does not support metadata context "${map}"`, SUBCOMMAND)
      }
      const extents: MapExtent[] = []
      for await (const e of h.map({ context: map })) extents.push(e)
      return { extents, size: h.getSize() }
    })
    if (totals) await output.write(json ? totalsJson(extents, size) : totalsText(extents, size, map, colour))
    else await output.write(json ? mapJson(extents) : mapText(extents, map, colour))
    return 0
  }

  const probe = has(args, 'content') || (!list && !has(args, 'no-content'))
  const { facts, failures } = await describeTarget(target, options, list, probe)
  let out = json ? jsonHeader(facts) : protocolLine(facts, colour)
  if (json && list && facts.exports.length === 0) out += '"exports": []\n'
  facts.exports.forEach((d, i) => {
    out += json ? exportJson(d, i === 0, i + 1 === facts.exports.length) : exportText(d, colour)
  })
  if (json) out += '}\n'
  await output.write(out)
  for (const { exportName, error } of failures) {
    const which = exportName === '' ? 'the default export' : `export: ${exportName}`
    process.stderr.write(`${PROGRAM}: ${error.code}: ${error.message.replace(/\s*\n\s*/g, ' ')} for ${which}\n`)
  }
  return failures.length > 0 ? 1 : 0
}
