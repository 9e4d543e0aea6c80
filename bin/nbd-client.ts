#!/usr/bin/env node
// The nbd-client command: `nbd-client SUBCOMMAND [OPTIONS] ARGS`, with the subcommands
// info (nbdinfo), copy (nbdcopy) and dump (nbddump). Options placed before the subcommand
// (--debug, --tls…) apply to it as if written after it.
//
// Exit status: 0 on success; 1 on any error, reported as one line on stderr
// (`nbd-client: CODE: operation: message`, plus the stack with --debug); 2 for a false
// `info --can`/`--is` test, as nbdinfo.

import {
  COMMON_HELP, COMMON_OPTIONS, Output, PROGRAM, UsageError, answerHelpOrVersion, errorLine, parseArgs,
} from './cli'
import { copyCommand } from './copy'
import { dumpCommand } from './dump'
import { infoCommand } from './info'

const SUBCOMMANDS: Record<string, { run: (argv: string[]) => Promise<number>; summary: string }> = {
  info: { run: infoCommand, summary: 'describe an export or list a server\'s exports (as nbdinfo)' },
  copy: { run: copyCommand, summary: 'copy between exports, files and pipes (as nbdcopy)' },
  dump: { run: dumpCommand, summary: 'hexdump an export (as nbddump)' },
}

const HELP = `
An NBD (Network Block Device) client: look at and copy exports.

    ${PROGRAM} SUBCOMMAND [OPTIONS] ARGS

Subcommands:

${Object.entries(SUBCOMMANDS).map(([name, { summary }]) => `    ${name.padEnd(6)} ${summary}`).join('\n')}

    ${PROGRAM} SUBCOMMAND --help    the options of one subcommand
    ${PROGRAM} --version

Examples:

    ${PROGRAM} info nbd://localhost
    ${PROGRAM} info --map 'nbd+unix:///disk?socket=/tmp/sock'
    ${PROGRAM} copy nbd://localhost disk.img --progress
    ${PROGRAM} dump --length 512 nbd://localhost

${COMMON_HELP}`

async function main(argv: string[]): Promise<number> {
  // Options before the subcommand: only the common ones.
  let i = 0
  while (i < argv.length && argv[i]!.startsWith('-') && argv[i] !== '--') {
    const a = argv[i]!
    const spec = a.startsWith('--') && !a.includes('=') ? COMMON_OPTIONS.find((s) => s.long.includes(a.slice(2))) : undefined
    i += spec?.arg === 'required' ? 2 : 1
  }
  const before = argv.slice(0, i)
  const name = argv[i]
  if (name === undefined || name === '--') {
    if (await answerHelpOrVersion(parseArgs('', before, COMMON_OPTIONS), HELP, new Output())) return 0
    throw new UsageError('', `a subcommand is required: ${Object.keys(SUBCOMMANDS).join(', ')}`)
  }
  const subcommand = SUBCOMMANDS[name]
  if (subcommand === undefined) {
    throw new UsageError('', `unknown subcommand '${name}'; the subcommands are ${Object.keys(SUBCOMMANDS).join(', ')}`)
  }
  parseArgs('', before, COMMON_OPTIONS)
  return subcommand.run([...before, ...argv.slice(i + 1)])
}

const argv = process.argv.slice(2)
const debug = argv.includes('--debug')

// A reader that goes away (`| head`) ends the output, not in an error.
process.stdout.on('error', (e: NodeJS.ErrnoException) => {
  if (e.code === 'EPIPE') process.exit(process.exitCode ?? 0)
  process.stderr.write(errorLine(e))
  process.exit(1)
})

main(argv).then(
  (status) => {
    process.exitCode = status
  },
  (e: unknown) => {
    process.stderr.write(errorLine(e))
    if (debug && e instanceof Error && e.stack) process.stderr.write(`${e.stack}\n`)
    process.exitCode = 1
  },
)
