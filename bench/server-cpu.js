// server-cpu.js: how much CPU the benchmarks' nbdkit servers have used, shared by run.js and
// copy.js.
'use strict'

const fs = require('node:fs')
const { spawnSync } = require('node:child_process')

const CLK_TCK = Number(spawnSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).stdout) || 100

// CPU seconds (user + system, every thread, ended ones included) that the processes `pids`
// have used so far, or null where /proc cannot tell (not Linux, or a process gone).
function cpuSeconds(pids) {
  let ticks = 0
  for (const pid of pids) {
    let stat
    try {
      stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8')
    } catch {
      return null
    }
    // Fields after the command name: state is the 3rd field of the line, utime the 14th.
    const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ')
    ticks += Number(f[11]) + Number(f[12])
  }
  return ticks / CLK_TCK
}

module.exports = { cpuSeconds }
