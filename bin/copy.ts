// nbd-client copy: nbdcopy's options mapped onto the library's copy() (issue 10).
//
// The option parsing and its mapping to CopyOptions are here; the copy itself, the progress
// bar and the --progress=FD lines wait for copy() to land in the library (see library.ts):
// until then the subcommand fails with ENOTSUP after checking its arguments.

import { NbdError } from '../index'
import {
  COMMON_HELP, COMMON_OPTIONS, Output, PROGRAM, UsageError, has, last, parseArgs, versionText, type OptionSpec,
} from './cli'
import { libraryCopy, type CopyOptions } from './library'

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
    --request-size=N        bytes per request
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
export function copyOptions(argv: string[]): { source: string; destination: string; options: CopyOptions; progress?: true | number } {
  const args = parseArgs(SUBCOMMAND, argv, OPTIONS)
  if (args.positionals.length !== 2) throw new UsageError(SUBCOMMAND, 'expected a SOURCE and a DESTINATION')
  const options: CopyOptions = {}
  const connections = count('connections', last(args, 'connections'), 1)
  if (connections !== undefined) options.connections = connections
  const requests = count('requests', last(args, 'requests'), 1)
  if (requests !== undefined) options.requests = requests
  const requestSize = count('request-size', last(args, 'request-size'), 1)
  if (requestSize !== undefined) options.requestSize = requestSize
  const sparse = count('sparse', last(args, 'sparse'), 0)
  if (sparse !== undefined) options.sparse = sparse === 0 ? false : sparse
  if (has(args, 'allocated')) options.allocated = true
  if (has(args, 'destination-is-zero')) options.destinationIsZero = true
  options.flush = has(args, 'flush')
  const p = last(args, 'progress')
  const progress = p === undefined ? undefined : p === true ? true : count('progress', p, 0)
  return { source: args.positionals[0]!, destination: args.positionals[1]!, options, progress }
}

/** Runs `nbd-client copy ARGS`; resolves to the exit status. */
export async function copyCommand(argv: string[], output = new Output()): Promise<number> {
  const args = parseArgs(SUBCOMMAND, argv, OPTIONS)
  if (has(args, 'help')) {
    await output.write(COPY_HELP)
    return 0
  }
  if (has(args, 'version')) {
    await output.write(versionText())
    return 0
  }
  copyOptions(argv)
  if (libraryCopy() === undefined) {
    throw new NbdError('ENOTSUP', 'copy() is not in this build of the library yet (issue 10)', SUBCOMMAND)
  }
  throw new NbdError('ENOTSUP', 'the copy subcommand is not wired to copy() yet', SUBCOMMAND)
}
