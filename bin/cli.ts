// What every subcommand of the nbd-client command shares: a getopt_long-like option parser,
// the options common to all (TLS, --debug, --help, --version), connecting a Handle to a URI or
// to a `[ CMD ARGS ... ]` subprocess as libnbd's tools do, writing to stdout with backpressure,
// and the one-line error report.

import { Handle, NbdError, version, type HandleOptions, type TlsMode } from '../index'

/** The program name in messages. */
export const PROGRAM = 'nbd-client'

/** One option: its long names, an optional short letter, and whether it takes a value. */
export interface OptionSpec {
  /** Key under which its values are collected. */
  key: string
  long: string[]
  short?: string
  /** 'required': `--x=V`, `--x V`, `-xV`, `-x V`; 'optional': only `--x=V` (else `true`). */
  arg: 'none' | 'required' | 'optional'
}

export interface ParsedArgs {
  /** Every occurrence of each option, in order: its value, or true. */
  options: Map<string, (string | true)[]>
  positionals: string[]
}

/** A mistake on the command line: reported as one line with code EINVAL, exit status 1. */
export class UsageError extends NbdError {
  constructor(subcommand: string, message: string) {
    super('EINVAL', `${message} (see '${PROGRAM}${subcommand ? ' ' + subcommand : ''} --help')`, subcommand || 'usage')
  }
}

/**
 * Parses `argv` as getopt_long does with argument permutation: options may come before or
 * after positionals; `--` ends the options; a lone `[` starts a subprocess command line,
 * taken whole as positionals (so `[ nbdkit -r ... ]` needs no `--`).
 */
export function parseArgs(subcommand: string, argv: string[], specs: OptionSpec[]): ParsedArgs {
  const options = new Map<string, (string | true)[]>()
  const positionals: string[] = []
  const add = (spec: OptionSpec, value: string | true): void => {
    const list = options.get(spec.key) ?? []
    list.push(value)
    options.set(spec.key, list)
  }
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!
    if (a === '--' || a === '[') {
      positionals.push(...argv.slice(a === '--' ? i + 1 : i))
      break
    }
    if (a.startsWith('--')) {
      const eq = a.indexOf('=')
      const name = eq < 0 ? a.slice(2) : a.slice(2, eq)
      const spec = specs.find((s) => s.long.includes(name))
      if (spec === undefined) throw new UsageError(subcommand, `unrecognized option '--${name}'`)
      if (spec.arg === 'none') {
        if (eq >= 0) throw new UsageError(subcommand, `option '--${name}' doesn't allow an argument`)
        add(spec, true)
      } else if (eq >= 0) {
        add(spec, a.slice(eq + 1))
      } else if (spec.arg === 'optional') {
        add(spec, true)
      } else {
        if (i + 1 >= argv.length) throw new UsageError(subcommand, `option '--${name}' requires an argument`)
        add(spec, argv[++i]!)
      }
    } else if (a.startsWith('-') && a.length > 1) {
      for (let j = 1; j < a.length; j++) {
        const letter = a[j]!
        const spec = specs.find((s) => s.short === letter)
        if (spec === undefined) throw new UsageError(subcommand, `invalid option -- '${letter}'`)
        if (spec.arg === 'none') {
          add(spec, true)
        } else if (j + 1 < a.length) {
          add(spec, a.slice(j + 1))
          break
        } else if (spec.arg === 'optional') {
          add(spec, true)
        } else {
          if (i + 1 >= argv.length) throw new UsageError(subcommand, `option requires an argument -- '${letter}'`)
          add(spec, argv[++i]!)
        }
      }
    } else {
      positionals.push(a)
    }
  }
  return { options, positionals }
}

/** The last value given for `key`, if any. */
export function last(args: ParsedArgs, key: string): string | true | undefined {
  const list = args.options.get(key)
  return list === undefined ? undefined : list[list.length - 1]
}

export function has(args: ParsedArgs, key: string): boolean {
  return args.options.has(key)
}

const SIZE_SUFFIX: Record<string, number> = { '': 1, b: 1, k: 2 ** 10, m: 2 ** 20, g: 2 ** 30, t: 2 ** 40, p: 2 ** 50, e: 2 ** 60 }

/** A byte count: decimal digits with an optional k, M, G, T, P or E suffix (powers of 1024). */
export function parseSize(subcommand: string, option: string, text: string): bigint {
  const m = /^\s*(\d+)([bBkKmMgGtTpPeE]?)\s*$/.exec(text)
  if (m === null) throw new UsageError(subcommand, `could not parse --${option} option: ${text}`)
  const value = BigInt(m[1]!) * BigInt(SIZE_SUFFIX[m[2]!.toLowerCase()]!)
  if (value >= 1n << 64n) throw new UsageError(subcommand, `--${option} is too large: ${text}`)
  return value
}

/** Options every subcommand takes. */
export const COMMON_OPTIONS: OptionSpec[] = [
  { key: 'help', long: ['help'], arg: 'none' },
  { key: 'version', long: ['version'], short: 'V', arg: 'none' },
  { key: 'debug', long: ['debug'], arg: 'none' },
  { key: 'tls', long: ['tls'], arg: 'required' },
  { key: 'tls-certificates', long: ['tls-certificates'], arg: 'required' },
  { key: 'tls-verify-peer', long: ['tls-verify-peer'], arg: 'none' },
  { key: 'no-tls-verify-peer', long: ['no-tls-verify-peer'], arg: 'none' },
  { key: 'tls-username', long: ['tls-username'], arg: 'required' },
  { key: 'tls-psk-file', long: ['tls-psk-file'], arg: 'required' },
  { key: 'tls-hostname', long: ['tls-hostname'], arg: 'required' },
]

/** --color / --no-color, as libnbd's tools spell them. */
export const COLOUR_OPTIONS: OptionSpec[] = [
  { key: 'color', long: ['color', 'colors', 'colour', 'colours'], arg: 'none' },
  { key: 'no-color', long: ['no-color', 'no-colors', 'no-colour', 'no-colours'], arg: 'none' },
]

/** Whether to colour stdout: the last of --color / --no-color, else whether it is a terminal. */
export function colourWanted(argv: string[]): boolean {
  const given = argv.filter((a) => /^--(no-)?colou?rs?$/.test(a))
  if (given.length === 0) return process.stdout.isTTY === true
  return !given[given.length - 1]!.startsWith('--no-')
}

/** The help text lines for {@link COMMON_OPTIONS}. */
export const COMMON_HELP = `Options of every subcommand:

    --tls=disable|allow|require   TLS for nbd:// and nbd+unix:// (nbds:// requires it)
    --tls-certificates=DIR        X.509 files (ca-cert.pem, client-cert.pem, client-key.pem)
    --[no-]tls-verify-peer        verify the server's certificate (default: verify)
    --tls-username=NAME           PSK or X.509 user name
    --tls-psk-file=FILE           pre-shared keys file (psktool format)
    --tls-hostname=HOST           name the server's certificate must carry
    --debug                       print the protocol exchange, and a stack trace on error
    --help                        this help
    -V, --version                 the program's version
`

/** `nbd-client VERSION`, for --version. */
export function versionText(): string {
  return `${PROGRAM} ${version}\n`
}

/**
 * Writes `help` for `--help`, or the version for `--version`, when `args` asks for them:
 * whether it did, and the command is done (exit status 0).
 */
export async function answerHelpOrVersion(args: ParsedArgs, help: string, output: Output): Promise<boolean> {
  if (has(args, 'help')) {
    await output.write(help)
    return true
  }
  if (has(args, 'version')) {
    await output.write(versionText())
    return true
  }
  return false
}

/** Handle settings from the common options (TLS, --debug). */
export function handleOptions(subcommand: string, args: ParsedArgs): HandleOptions {
  const o: HandleOptions = { uriAllowLocalFile: true }
  const tls = last(args, 'tls')
  if (tls !== undefined) {
    if (tls !== 'disable' && tls !== 'allow' && tls !== 'require') {
      throw new UsageError(subcommand, `--tls must be disable, allow or require, not ${String(tls)}`)
    }
    o.tls = tls as TlsMode
  }
  const certificates = last(args, 'tls-certificates')
  if (typeof certificates === 'string') o.tlsCertificates = certificates
  if (has(args, 'no-tls-verify-peer')) o.tlsVerifyPeer = false
  if (has(args, 'tls-verify-peer')) o.tlsVerifyPeer = true
  const username = last(args, 'tls-username')
  if (typeof username === 'string') o.tlsUsername = username
  const psk = last(args, 'tls-psk-file')
  if (typeof psk === 'string') o.tlsPskFile = psk
  const hostname = last(args, 'tls-hostname')
  if (typeof hostname === 'string') o.tlsHostname = hostname
  if (has(args, 'debug')) o.debug = true
  return o
}

/** What to connect to: an NBD URI, or a server command run with systemd socket activation. */
export type Target = { uri: string } | { command: string[] }

/**
 * The target in `positionals`: one URI, or `[ CMD ARGS ... ]` (as libnbd's tools take it).
 * Anything else is a usage error.
 */
export function parseTarget(subcommand: string, positionals: string[]): Target {
  if (positionals.length >= 3 && positionals[0] === '[' && positionals[positionals.length - 1] === ']') {
    return { command: positionals.slice(1, -1) }
  }
  if (positionals.length === 1) return { uri: positionals[0]! }
  if (positionals.length === 0) throw new UsageError(subcommand, 'an NBD URI or [ CMD ARGS ... ] is required')
  throw new UsageError(subcommand, `expected one NBD URI or [ CMD ARGS ... ], got ${positionals.length} arguments`)
}

/** Connects `h` to `target`. */
export async function connectTarget(h: Handle, target: Target): Promise<void> {
  if ('uri' in target) await h.connectUri(target.uri)
  else await h.connectSystemdSocketActivation(target.command)
}

/** Writes to stdout, waiting for it to drain when its buffer is full. */
export class Output {
  readonly #stream: NodeJS.WritableStream
  constructor(stream: NodeJS.WritableStream = process.stdout) {
    this.#stream = stream
  }

  async write(text: string): Promise<void> {
    if (this.#stream.write(text)) return
    await new Promise<void>((resolve, reject) => {
      const onError = (e: Error): void => {
        this.#stream.off('drain', onDrain)
        reject(e)
      }
      const onDrain = (): void => {
        this.#stream.off('error', onError)
        resolve()
      }
      this.#stream.once('drain', onDrain)
      this.#stream.once('error', onError)
    })
  }
}

/** The one line that reports `e` on stderr: `nbd-client: CODE: operation: message`. */
export function errorLine(e: unknown): string {
  let text: string
  if (e instanceof NbdError) text = `${e.code}: ${e.message}`
  else if (e instanceof Error && typeof (e as NodeJS.ErrnoException).code === 'string') text = `${(e as NodeJS.ErrnoException).code}: ${e.message}`
  else if (e instanceof Error) text = e.message
  else text = String(e)
  return `${PROGRAM}: ${text.replace(/\s*\n\s*/g, ' ')}\n`
}
