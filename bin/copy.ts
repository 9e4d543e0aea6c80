// nbd-client copy: nbdcopy's options mapped onto the library's copy().
//
// The option parsing, its mapping to CopyOptions, the endpoints (-, null:, URIs, files,
// [ CMD ARGS ... ]) and the progress output (progress.ts) are here; the copy itself is the
// library's copy() (the native engine for URIs, files and null:, the JavaScript one for
// stdin/stdout and subprocesses).

import fs from 'node:fs'
import { CONTEXT_BASE_ALLOCATION, Handle, isUri, type HandleOptions } from '../index'
import {
  COMMON_HELP, COMMON_OPTIONS, Output, PROGRAM, UsageError, answerHelpOrVersion, handleOptions, has, last, parseArgs,
  type OptionSpec,
} from './cli'
import { COPY_LIMITS, copy, type CopyEndpoint, type CopyOptions } from './library'
import { Progress } from './progress'

const SUBCOMMAND = 'copy'

const OPTIONS: OptionSpec[] = [
  ...COMMON_OPTIONS,
  { key: 'connections', long: ['connections'], short: 'C', arg: 'required' },
  { key: 'requests', long: ['requests'], short: 'R', arg: 'required' },
  { key: 'request-size', long: ['request-size'], arg: 'required' },
  { key: 'sparse', long: ['sparse'], short: 'S', arg: 'required' },
  { key: 'allocated', long: ['allocated'], arg: 'none' },
  { key: 'destination-is-zero', long: ['destination-is-zero', 'target-is-zero'], arg: 'none' },
  { key: 'flush', long: ['flush'], arg: 'none' },
  { key: 'progress', long: ['progress'], short: 'p', arg: 'optional' },
]

export const COPY_HELP = `
Copy between exports, files and pipes (as nbdcopy):

    ${PROGRAM} copy [OPTIONS] SOURCE DESTINATION

SOURCE and DESTINATION are NBD URIs, file or device paths, or - (stdin, stdout);
DESTINATION may also be null: (discard).

    -C, --connections=N     connections per NBD side
    -R, --requests=N        requests in flight per connection
    --request-size=N        bytes per request (a power of 2, 4096 to 32 MiB, as nbdcopy)
    -S, --sparse=N          zero detection granularity (0: write every byte)
    --allocated             zeroes become allocated zeroes, not holes
    --destination-is-zero   the destination already reads as zeroes
    --flush                 flush the destination at the end
    -p, --progress[=FD]     a progress bar (on a terminal), or progress lines on FD

${COMMON_HELP}`

function count(name: string, text: string | true | undefined, min: number): number | undefined {
  if (text === undefined) return undefined
  const n = typeof text === 'string' && /^\d+$/.test(text) ? Number(text) : NaN
  if (!Number.isSafeInteger(n) || n < min) throw new UsageError(SUBCOMMAND, `--${name} must be an integer >= ${min}, got ${String(text)}`)
  return n
}

/** The CopyOptions nbdcopy's options ask for. */
export function copyOptions(argv: string[]): {
  source: string | string[]
  destination: string | string[]
  options: CopyOptions
  progress?: true | number
} {
  const args = parseArgs(SUBCOMMAND, argv, OPTIONS)
  const ends = splitEndpoints(args.positionals)
  if (ends.length !== 2) throw new UsageError(SUBCOMMAND, 'expected a SOURCE and a DESTINATION')
  const options: CopyOptions = {}
  // nbdcopy takes any count of connections and requests; larger counts than copy() takes
  // are copy()'s limits.
  const connections = count('connections', last(args, 'connections'), 1)
  if (connections !== undefined) options.connections = Math.min(connections, COPY_LIMITS.connections)
  const requests = count('requests', last(args, 'requests'), 1)
  if (requests !== undefined) options.requests = Math.min(requests, COPY_LIMITS.requests)
  const requestSize = count('request-size', last(args, 'request-size'), 1)
  if (requestSize !== undefined) {
    // nbdcopy's rule and words.
    if (requestSize < 4096 || requestSize > 32 * 1024 * 1024 || (requestSize & (requestSize - 1)) !== 0) {
      throw new UsageError(SUBCOMMAND, '--request-size: must be a power of 2 within 4096-33554432')
    }
    options.requestSize = requestSize
  }
  const sparse = count('sparse', last(args, 'sparse'), 0)
  if (sparse !== undefined) options.sparse = sparse === 0 ? false : sparse
  if (has(args, 'allocated')) options.allocated = true
  if (has(args, 'destination-is-zero')) options.destinationIsZero = true
  options.flush = has(args, 'flush')
  const p = last(args, 'progress')
  const progress = p === undefined ? undefined : p === true ? true : count('progress', p, 0)
  return { source: ends[0]!, destination: ends[1]!, options, progress }
}

/**
 * A copy endpoint as copy() takes it (API.md): `-` is stdin (source) or stdout (destination)
 * (`/dev/fd/N` when that is a regular file),
 * `null:` discards, an NBD URI stays a string (copy() connects, with the native engine), a
 * file or device path stays a path, and `[ CMD ARGS ... ]` becomes a handle connected to that
 * server (systemd socket activation). With --tls… options or --debug a URI is connected here
 * with them, and copy() takes the handle (its getUri() carries the TLS user and files).
 */
async function endpoint(spec: string | string[], role: 'source' | 'destination', settings: HandleOptions): Promise<CopyEndpoint> {
  const connect = async (how: (h: Handle) => Promise<void>): Promise<Handle> => {
    // The source's extents decide what is read; a destination needs no context.
    const h = new Handle({ ...settings, metaContexts: role === 'source' ? [CONTEXT_BASE_ALLOCATION] : [] })
    try {
      await how(h)
    } catch (e) {
      await h.close()
      throw e
    }
    return h
  }
  if (Array.isArray(spec)) return connect((h) => h.connectSystemdSocketActivation(spec))
  if (spec === '-') {
    // As nbdcopy: a regular file on stdin or stdout is copied as that file (random access, and
    // holes in a destination), a pipe or terminal as a stream.
    const fd = role === 'source' ? 0 : 1
    if (fs.fstatSync(fd).isFile()) return `/dev/fd/${fd}`
    return role === 'source' ? process.stdin : process.stdout
  }
  if (spec !== 'null:' && !isUri(spec)) {
    // nbdcopy copies to and from pipes and character devices (a FIFO, /dev/null) as streams;
    // copy() takes paths of regular files and block devices only, so those go as streams.
    let st: fs.Stats | undefined
    try {
      st = fs.statSync(spec)
    } catch {
      st = undefined
    }
    if (st !== undefined && (st.isFIFO() || st.isCharacterDevice())) {
      return role === 'source' ? fs.createReadStream(spec) : fs.createWriteStream(spec)
    }
  }
  const custom = Object.keys(settings).some((k) => k !== 'uriAllowLocalFile')
  if (custom && isUri(spec)) return connect((h) => h.connectUri(spec))
  return spec
}

/** SOURCE and DESTINATION among the positionals, each a word or a `[ CMD ARGS ... ]` group. */
export function splitEndpoints(positionals: string[]): (string | string[])[] {
  const out: (string | string[])[] = []
  for (let i = 0; i < positionals.length; i++) {
    if (positionals[i] !== '[') {
      out.push(positionals[i]!)
      continue
    }
    const close = positionals.indexOf(']', i + 1)
    if (close < 0) throw new UsageError(SUBCOMMAND, "'[' without a matching ']'")
    out.push(positionals.slice(i + 1, close))
    i = close
  }
  return out
}

/** Runs `nbd-client copy ARGS`; resolves to the exit status. */
export async function copyCommand(argv: string[], output = new Output()): Promise<number> {
  const args = parseArgs(SUBCOMMAND, argv, OPTIONS)
  if (await answerHelpOrVersion(args, COPY_HELP, output)) return 0
  const { source, destination, options, progress } = copyOptions(argv)
  const settings = handleOptions(SUBCOMMAND, args)
  const ends: CopyEndpoint[] = []
  try {
    ends.push(await endpoint(source, 'source', settings))
    ends.push(await endpoint(destination, 'destination', settings))
    const bar = progress === undefined ? undefined : new Progress(progress === true ? undefined : progress)
    await copy(ends[0]!, ends[1]!, { ...options, onProgress: bar && ((p) => bar.update(p.bytesDone, p.bytesTotal)) })
    bar?.finish()
  } finally {
    for (const end of ends) if (end instanceof Handle) await end.close()
  }
  return 0
}
