#!/usr/bin/env node
// run.js: nbd-client vs libnbd, side by side, on one nbdkit server.
//
//   node bench/run.js [--rows name,...|all] [--runs N] [--quick] [--syscalls]
//                     [--floor] [--only ours|libnbd] [--json FILE] [--verbose]
//
// Builds bench/build/libnbd-bench from bench/libnbd-bench.c when needed,
// starts `nbdkit memory 1G` on a private Unix socket, fills the export with
// non-zero data once, then for each row alternates fresh processes
// (ours, libnbd, ours, libnbd, ...) and reports the median ops/s of each
// side, the ratio ours/libnbd and the median CPU time per operation of each
// side. With --syscalls it also counts system calls per operation under
// `strace -f -c`. With --floor the depth-1 rows also run bench/floor.c, a
// client with no library that does the least a round trip needs, as a third
// side in the alternation. See bench/README.md.
'use strict';

const { spawn, spawnSync } = require('node:child_process');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const { cpuSeconds } = require('./server-cpu');

const BENCH_DIR = __dirname;
const ROOT = path.join(BENCH_DIR, '..');
const C_SOURCE = path.join(BENCH_DIR, 'libnbd-bench.c');
const C_BINARY = path.join(BENCH_DIR, 'build', 'libnbd-bench');
const C_SHARED = path.join(BENCH_DIR, 'bench-util.h'); // included by both C programs
const FLOOR_SOURCE = path.join(BENCH_DIR, 'floor.c');
const FLOOR_BINARY = path.join(BENCH_DIR, 'build', 'floor-bench');
const OURS = path.join(BENCH_DIR, 'ours.js');
const DIST = path.join(ROOT, 'dist', 'index.js');

const EXPORT_SIZE = 1024 * 1024 * 1024; // nbdkit memory 1G
const KiB = 1024;
const MiB = 1024 * KiB;

// Op counts are sized so that one run of either side takes roughly 1-3 s on
// the 2-core development machine (libnbd near 1 s, ours near 2-3 s).
const ROWS = [
  { name: 'pread-4k-qd1', label: 'pread 4 KiB QD1', op: 'pread', bs: 4 * KiB, depth: 1, ops: 25000 },
  { name: 'pread-4k-qd64', label: 'pread 4 KiB QD64', op: 'pread', bs: 4 * KiB, depth: 64, ops: 120000 },
  // ours reads with preadInto into a buffer per slot; the libnbd side is the
  // same program as pread-4k-qd64 (libnbd always reads into caller buffers).
  { name: 'pread-4k-qd64-into', label: 'preadInto 4 KiB QD64', op: 'pread', bs: 4 * KiB, depth: 64, ops: 120000, into: true },
  { name: 'pread-256k-qd16', label: 'pread 256 KiB QD16', op: 'pread', bs: 256 * KiB, depth: 16, ops: 15000 },
  { name: 'pread-2m-qd8', label: 'pread 2 MiB QD8', op: 'pread', bs: 2 * MiB, depth: 8, ops: 2000 },
  // The same large reads into a buffer per slot, as libnbd's side always reads: what the
  // driver costs without a new Buffer (and the garbage collection it brings) per read.
  { name: 'pread-256k-qd16-into', label: 'preadInto 256 KiB QD16', op: 'pread', bs: 256 * KiB, depth: 16, ops: 15000, into: true, optional: true },
  { name: 'pread-2m-qd8-into', label: 'preadInto 2 MiB QD8', op: 'pread', bs: 2 * MiB, depth: 8, ops: 2000, into: true, optional: true },
  { name: 'pwrite-4k-qd64', label: 'pwrite 4 KiB QD64', op: 'pwrite', bs: 4 * KiB, depth: 64, ops: 100000 },
  { name: 'pwrite-256k-qd16', label: 'pwrite 256 KiB QD16', op: 'pwrite', bs: 256 * KiB, depth: 16, ops: 20000 },
  // TLS 1.3 with a pre-shared key, against a second nbdkit (--tls=require --tls-psk).
  { name: 'tls-pread-256k-qd16', label: 'TLS (PSK) pread 256 KiB QD16', op: 'pread', bs: 256 * KiB, depth: 16, ops: 8000, tls: true },
];

const WARMUP = 300;
const QUICK_DIVISOR = 10;
// --syscalls: each side runs each row twice more under strace: with `depth`
// timed operations and with as many as a timed run (see measureSyscalls).

class BenchError extends Error {}

function usage() {
  const names = ROWS.map((r) => `  ${r.name.padEnd(20)} ${r.label}${r.optional ? ' (only with --rows all or by name)' : ''}`);
  return [
    'usage: node bench/run.js [options]',
    '',
    '  --rows a,b,...   rows to run (default, or "all": every row)',
    '  --runs N         runs per side per row, alternating ours/libnbd (default 5; 3 with --quick)',
    '  --quick          a tenth of the operations per run: a smoke test, not a measurement',
    '  --syscalls       also count system calls per operation of each side under strace -f -c',
    '  --floor          depth-1 rows also run bench/floor.c (a client with no library, one command',
    '                   at a time) as a third side, and report each client against it',
    '  --only SIDE      run only "ours" or only "libnbd"',
    '  --json FILE      also write the results as JSON to FILE',
    '  --verbose        print every run as it finishes',
    '',
    'rows:',
    ...names,
    '',
  ].join('\n');
}

function parseArgs(argv) {
  const o = { rows: null, runs: null, quick: false, syscalls: false, floor: false, only: null, json: null, verbose: false };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const eq = a.indexOf('=');
    const key = eq >= 0 ? a.slice(0, eq) : a;
    const value = () => {
      if (eq >= 0) return a.slice(eq + 1);
      if (i + 1 >= argv.length) throw new BenchError(`${key} needs a value`);
      return argv[++i];
    };
    switch (key) {
      case '--rows': o.rows = value(); break;
      case '--runs': {
        const v = value();
        o.runs = Number(v);
        if (!Number.isInteger(o.runs) || o.runs < 1) throw new BenchError(`--runs: expected a positive integer, got '${v}'`);
        break;
      }
      case '--quick': o.quick = true; break;
      case '--syscalls': o.syscalls = true; break;
      case '--floor': o.floor = true; break;
      case '--only': {
        o.only = value();
        if (o.only !== 'ours' && o.only !== 'libnbd') throw new BenchError(`--only must be "ours" or "libnbd", got '${o.only}'`);
        break;
      }
      case '--json': o.json = value(); break;
      case '--verbose': case '-v': o.verbose = true; break;
      case '--help': case '-h': process.stdout.write(usage()); process.exit(0); break;
      default: throw new BenchError(`unknown argument '${a}'\n\n${usage()}`);
    }
  }
  if (o.runs === null) o.runs = o.quick ? 3 : 5;
  let rows;
  if (o.rows === 'all') rows = ROWS.slice();
  else if (o.rows === null) rows = ROWS.filter((r) => !r.optional);
  else {
    rows = o.rows.split(',').filter(Boolean).map((n) => {
      const r = ROWS.find((x) => x.name === n);
      if (!r) throw new BenchError(`unknown row '${n}'; known rows: ${ROWS.map((x) => x.name).join(', ')}`);
      return r;
    });
    if (rows.length === 0) throw new BenchError('--rows: no rows given');
  }
  o.rowList = rows;
  return o;
}

function which(cmd) {
  for (const dir of (process.env.PATH || '').split(path.delimiter)) {
    if (!dir) continue;
    const p = path.join(dir, cmd);
    try {
      fs.accessSync(p, fs.constants.X_OK);
      return p;
    } catch {
      // keep looking
    }
  }
  return null;
}

// Whether `binary` is newer than its source and the header both C programs share.
function isUpToDate(binary, source) {
  try {
    const built = fs.statSync(binary).mtimeMs;
    return [source, C_SHARED].every((f) => built >= fs.statSync(f).mtimeMs);
  } catch {
    return false;
  }
}

function compile(source, binary, libs) {
  const cc = process.env.CC || 'cc';
  if (!which(cc)) throw new BenchError(`C compiler '${cc}' not found (set CC or install gcc)`);
  fs.mkdirSync(path.dirname(binary), { recursive: true });
  const args = ['-O2', '-Wall', '-o', binary, source, ...libs];
  process.stderr.write(`building ${path.relative(ROOT, binary)}: ${cc} ${args.join(' ')}\n`);
  const r = spawnSync(cc, args, { stdio: 'inherit' });
  if (r.error) throw new BenchError(`running ${cc}: ${r.error.message}`);
  if (r.status !== 0) throw new BenchError(`building ${path.relative(ROOT, binary)} failed (exit ${r.status})`);
}

function buildFloorBinary() {
  if (!isUpToDate(FLOOR_BINARY, FLOOR_SOURCE)) compile(FLOOR_SOURCE, FLOOR_BINARY, []);
}

function buildCBinary() {
  if (isUpToDate(C_BINARY, C_SOURCE)) return;

  if (!which('pkg-config')) throw new BenchError('pkg-config not found: install pkg-config and libnbd-dev to build bench/libnbd-bench.c');
  const pc = spawnSync('pkg-config', ['--cflags', '--libs', 'libnbd'], { encoding: 'utf8' });
  if (pc.status !== 0) {
    throw new BenchError(`pkg-config cannot find libnbd (install libnbd-dev):\n${(pc.stderr || '').trim()}`);
  }
  compile(C_SOURCE, C_BINARY, pc.stdout.trim().split(/\s+/).filter(Boolean));
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

// Start nbdkit in the foreground as our child. It writes the pid file only
// once it accepts connections, which is what we wait for.
async function startNbdkit(tmp, pskFile = null) {
  if (!which('nbdkit')) throw new BenchError('nbdkit not found on PATH (install nbdkit)');
  const tag = pskFile ? 'tls' : 'nbd';
  const sock = path.join(tmp, `${tag}.sock`);
  const pidFile = path.join(tmp, `${tag}kit.pid`);
  const logFile = path.join(tmp, `${tag}kit.log`);
  const logFd = fs.openSync(logFile, 'w');
  const tlsArgs = pskFile ? ['--tls=require', `--tls-psk=${pskFile}`] : [];
  const child = spawn(
    'nbdkit',
    ['--foreground', '--exit-with-parent', '--pidfile', pidFile, '--unix', sock, ...tlsArgs, 'memory', String(EXPORT_SIZE)],
    { stdio: ['ignore', logFd, logFd] },
  );
  fs.closeSync(logFd);
  const server = { child, sock, logFile, exited: false, exitInfo: null };
  child.on('exit', (code, signal) => {
    server.exited = true;
    server.exitInfo = signal ? `signal ${signal}` : `exit code ${code}`;
  });
  child.on('error', (err) => {
    server.exited = true;
    server.exitInfo = err.message;
  });

  const deadline = Date.now() + 15000;
  for (;;) {
    if (server.exited) throw new BenchError(`nbdkit exited during startup (${server.exitInfo})${logTail(server)}`);
    if (fs.existsSync(pidFile) && fs.readFileSync(pidFile, 'utf8').trim() !== '' && fs.existsSync(sock)) break;
    if (Date.now() > deadline) throw new BenchError(`nbdkit did not become ready within 15 s${logTail(server)}`);
    await sleep(20);
  }
  return server;
}

function logTail(server) {
  try {
    const text = fs.readFileSync(server.logFile, 'utf8').trim();
    if (!text) return '';
    return `\nnbdkit log (last lines):\n${text.split('\n').slice(-20).join('\n')}`;
  } catch {
    return '';
  }
}

function stopNbdkit(server) {
  if (!server || server.exited) return;
  try {
    server.child.kill('SIGTERM');
  } catch {
    // already gone
  }
}

// Stop nbdkit and wait for it to exit (so it is reaped, not left a zombie);
// SIGKILL if it has not gone within 5 s.
async function stopNbdkitAndWait(server) {
  if (!server || server.exited) return;
  const gone = new Promise((resolve) => server.child.once('exit', resolve));
  stopNbdkit(server);
  const timer = setTimeout(() => {
    try {
      server.child.kill('SIGKILL');
    } catch {
      // already gone
    }
  }, 5000);
  await gone;
  clearTimeout(timer);
}

// One benchmark process; returns its parsed JSON line. `wrapper`, if given,
// is a command line the process is started under (strace for --syscalls).
function runOnce(side, row, sock, ops, server, wrapper = null) {
  const common = ['--socket', sock, '--op', row.op, '--bs', String(row.bs), '--depth', String(row.depth),
    '--ops', String(ops), '--size', String(EXPORT_SIZE), '--warmup', String(WARMUP),
    ...(server.pskFile ? ['--psk-file', server.pskFile, '--psk-user', 'bench'] : [])];
  let cmd;
  let args;
  if (side === 'ours') {
    cmd = process.execPath;
    args = [OURS, ...common, ...(row.into ? ['--into'] : [])];
  } else {
    cmd = side === 'floor' ? FLOOR_BINARY : C_BINARY;
    args = common;
  }
  if (wrapper) {
    args = [...wrapper.slice(1), cmd, ...args];
    cmd = wrapper[0];
  }
  const serverBefore = cpuSeconds([server.child.pid]);
  const r = spawnSync(cmd, args, { encoding: 'utf8', timeout: 600000, maxBuffer: 16 * 1024 * 1024 });
  const serverAfter = cpuSeconds([server.child.pid]);
  const what = `${row.name} (${side}${wrapper ? `, under ${wrapper[0]}` : ''})`;
  if (r.error) throw new BenchError(`${what}: ${r.error.message}`);
  if (r.status !== 0) {
    const why = r.signal ? `killed by ${r.signal}` : `exit code ${r.status}`;
    const extra = server.exited ? `\nnbdkit has exited (${server.exitInfo})${logTail(server)}` : '';
    throw new BenchError(`${what} failed (${why}):\n${(r.stderr || '').trim()}${extra}\n  command: ${cmd} ${args.join(' ')}`);
  }
  const lines = r.stdout.trim().split('\n');
  let result;
  try {
    result = JSON.parse(lines[lines.length - 1]);
  } catch {
    throw new BenchError(`${what}: could not parse output as JSON:\n${r.stdout}`);
  }
  for (const k of ['ops', 'seconds', 'opsPerSec', 'mibPerSec', 'cpuUserUs', 'cpuSystemUs', 'cpuUsPerOp']) {
    if (typeof result[k] !== 'number' || !Number.isFinite(result[k])) {
      throw new BenchError(`${what}: output lacks a numeric "${k}": ${lines[lines.length - 1]}`);
    }
  }
  if (result.ops !== ops) throw new BenchError(`${what}: ran ${result.ops} operations, expected ${ops}`);
  // The server's CPU over the whole run (connecting and warming up too), per operation.
  result.serverCpuUsPerOp = serverBefore === null || serverAfter === null || wrapper
    ? null
    : ((serverAfter - serverBefore) * 1e6) / (ops + WARMUP);
  return result;
}

// The per-syscall call counts of a `strace -c` summary file:
//
//   % time     seconds  usecs/call     calls    errors syscall
//   ------ ----------- ----------- --------- --------- ----------------
//    80.00    0.000044          22         2           getdents64
//    ...
//   ------ ----------- ----------- --------- --------- ----------------
//   100.00    0.000055           0       157        27 total
//
// The errors column may be blank, so a row is read as: four numbers, an
// optional error count, the name. The total row is left out (it is the sum).
function parseStraceSummary(text, what) {
  const counts = new Map();
  for (const line of text.split('\n')) {
    const t = line.trim().split(/\s+/);
    if (t.length < 5 || t.length > 6 || !/^\d/.test(t[0])) continue;
    const name = t[t.length - 1];
    const calls = Number(t[3]);
    if (name === 'total' || !Number.isInteger(calls)) continue;
    counts.set(name, (counts.get(name) || 0) + calls);
  }
  if (counts.size === 0) throw new BenchError(`${what}: no system call counts in the strace summary:\n${text}`);
  return counts;
}

// System calls per operation of one side on one row. The process is run
// under `strace -f -c` (every thread) twice: a short run whose timed phase
// is only `depth` operations (one per slot, so it still fills and drains the
// pipeline) and a full run of `ops` operations. Start-up, connecting, the
// warm-up and closing are the same in both, so
//
//   perOp = (calls of the full run - calls of the short run) / (ops - depth)
//
// is what the steady-state timed operations cost. (A run with N and one with
// 2N operations would do too, but then the warm-up and the run-to-run drift
// of the per-op rate weigh in about twice, which on timing-dependent rows
// gave negative figures.)
function measureSyscalls(side, row, server, ops, tmp) {
  const nShort = row.depth;
  if (ops <= nShort) throw new BenchError(`${row.name}: ${ops} ops per run is too few to count syscalls (need more than ${nShort})`);
  const what = `${row.name} (${side}, syscalls)`;
  const count = (k) => {
    const file = path.join(tmp, `strace-${side}-${k}.txt`);
    runOnce(side, row, server.sock, k, server, ['strace', '-f', '-c', '-o', file]);
    let text;
    try {
      text = fs.readFileSync(file, 'utf8');
    } catch (err) {
      throw new BenchError(`${what}: strace wrote no summary: ${err.message}`);
    }
    fs.rmSync(file, { force: true });
    return parseStraceSummary(text, what);
  };
  const short = count(nShort);
  const full = count(ops);
  const n = ops - nShort;
  const total = (m) => [...m.values()].reduce((x, y) => x + y, 0);
  const names = new Set([...short.keys(), ...full.keys()]);
  const diffs = [...names].map((name) => [name, ((full.get(name) || 0) - (short.get(name) || 0)) / n]);
  diffs.sort((x, y) => Math.abs(y[1]) - Math.abs(x[1]) || (x[0] < y[0] ? -1 : 1));
  const bySyscall = {};
  for (const [name, perOp] of diffs) if (perOp !== 0) bySyscall[name] = Number(perOp.toFixed(4));
  return {
    opsShort: nShort,
    callsShort: total(short),
    opsFull: ops,
    callsFull: total(full),
    perOp: Number(((total(full) - total(short)) / n).toFixed(4)),
    bySyscall,
  };
}

// "futex 2.01, read 1.00, ..." for the largest few entries of bySyscall.
function topSyscalls(bySyscall, k = 6) {
  const entries = Object.entries(bySyscall).filter(([, v]) => Math.abs(v) >= 0.005);
  if (entries.length === 0) return '(none)';
  const shown = entries.slice(0, k).map(([name, v]) => `${name} ${v.toFixed(2)}`);
  if (entries.length > k) shown.push('...');
  return shown.join(', ');
}

function median(xs) {
  if (xs.length === 0) return null;
  const s = xs.slice().sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}

function fmtNum(x, digits = 0) {
  if (x === null || x === undefined) return '-';
  return x.toLocaleString('en-US', { minimumFractionDigits: digits, maximumFractionDigits: digits });
}

// The rows the floor client can run: one command at a time, no TLS.
function hasFloor(row) {
  return row.depth === 1 && !row.tls;
}

function printTable(results, withSyscalls, withFloor) {
  const header = ['row', 'ours ops/s', 'libnbd ops/s', 'ours/libnbd', 'ours MiB/s', 'libnbd MiB/s',
    'ours CPU µs/op', 'libnbd CPU µs/op', 'server µs/op (ours)', 'server µs/op (libnbd)'];
  if (withSyscalls) header.push('ours syscalls/op', 'libnbd syscalls/op');
  if (withFloor) header.push('floor ops/s', 'floor CPU µs/op', 'ours/floor', 'libnbd/floor');
  const body = results.map((r) => {
    const cells = [
      r.label,
      fmtNum(r.ours.medianOpsPerSec),
      fmtNum(r.libnbd.medianOpsPerSec),
      r.ratio === null ? '-' : r.ratio.toFixed(2),
      fmtNum(r.ours.medianMibPerSec, 1),
      fmtNum(r.libnbd.medianMibPerSec, 1),
      fmtNum(r.ours.medianCpuUsPerOp, 2),
      fmtNum(r.libnbd.medianCpuUsPerOp, 2),
      fmtNum(r.ours.medianServerCpuUsPerOp, 2),
      fmtNum(r.libnbd.medianServerCpuUsPerOp, 2),
    ];
    if (withSyscalls) {
      cells.push(fmtNum(r.ours.syscalls ? r.ours.syscalls.perOp : null, 2),
        fmtNum(r.libnbd.syscalls ? r.libnbd.syscalls.perOp : null, 2));
    }
    if (withFloor) {
      const f = r.floor;
      const share = (side) => (f && side.medianOpsPerSec !== null ? (side.medianOpsPerSec / f.medianOpsPerSec).toFixed(2) : '-');
      cells.push(fmtNum(f ? f.medianOpsPerSec : null), fmtNum(f ? f.medianCpuUsPerOp : null, 2), share(r.ours), share(r.libnbd));
    }
    return cells;
  });
  const widths = header.map((h, i) => Math.max(h.length, ...body.map((b) => b[i].length)));
  const line = (cells) => cells.map((c, i) => (i === 0 ? c.padEnd(widths[i]) : c.padStart(widths[i]))).join('  ');
  const out = [line(header), widths.map((w) => '-'.repeat(w)).join('  '), ...body.map(line)];
  process.stdout.write(out.join('\n') + '\n');
}

async function main() {
  const opts = parseArgs(process.argv.slice(2));
  const sides = opts.only ? [opts.only] : ['ours', 'libnbd'];

  if (sides.includes('ours') && !fs.existsSync(DIST)) {
    throw new BenchError(`${path.relative(process.cwd(), DIST) || DIST} not found: run \`npm run build\` first (or use --only libnbd)`);
  }
  // The C binary is also used to prefill the export, so build it either way.
  buildCBinary();
  if (opts.floor) buildFloorBinary();
  if (opts.syscalls && !which('strace')) {
    throw new BenchError('--syscalls needs strace, which is not on PATH (Debian/Ubuntu: apt-get install -y strace)');
  }

  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'nbd-bench-'));
  let server = null;
  let tlsServer = null;
  const cleanup = () => {
    stopNbdkit(server);
    stopNbdkit(tlsServer);
    try {
      fs.rmSync(tmp, { recursive: true, force: true });
    } catch {
      // best effort
    }
  };
  process.on('exit', cleanup);
  for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP']) {
    process.on(sig, () => {
      cleanup();
      process.exit(128 + os.constants.signals[sig]);
    });
  }

  try {
    server = await startNbdkit(tmp);

    // Fill the whole export once with non-zero data so reads return real
    // bytes (nbdkit's memory plugin would otherwise serve sparse zeroes).
    process.stderr.write('prefilling the 1 GiB export ...\n');
    const fillBs = 256 * KiB;
    const fill = spawnSync(C_BINARY, ['--socket', server.sock, '--op', 'pwrite', '--bs', String(fillBs),
      '--depth', '16', '--ops', String(EXPORT_SIZE / fillBs), '--warmup', '0'],
    { encoding: 'utf8', timeout: 300000 });
    if (fill.error || fill.status !== 0) {
      throw new BenchError(`prefill failed: ${fill.error ? fill.error.message : (fill.stderr || '').trim()}${logTail(server)}`);
    }

    if (opts.rowList.some((r) => r.tls)) {
      const pskFile = path.join(tmp, 'bench.psk');
      fs.writeFileSync(pskFile, `bench:${require('node:crypto').randomBytes(32).toString('hex')}\n`, { mode: 0o600 });
      tlsServer = await startNbdkit(tmp, pskFile);
      tlsServer.pskFile = pskFile;
      process.stderr.write('prefilling the TLS export ...\n');
      const tfill = spawnSync(C_BINARY, ['--socket', tlsServer.sock, '--psk-file', pskFile, '--psk-user', 'bench',
        '--op', 'pwrite', '--bs', String(fillBs), '--depth', '16', '--ops', String(EXPORT_SIZE / fillBs), '--warmup', '0'],
      { encoding: 'utf8', timeout: 300000 });
      if (tfill.error || tfill.status !== 0) {
        throw new BenchError(`TLS prefill failed: ${tfill.error ? tfill.error.message : (tfill.stderr || '').trim()}${logTail(tlsServer)}`);
      }
    }

    const results = [];
    for (const row of opts.rowList) {
      const target = row.tls ? tlsServer : server;
      const ops = opts.quick ? Math.max(100, Math.round(row.ops / QUICK_DIVISOR)) : row.ops;
      const runs = { ours: [], libnbd: [], floor: [] };
      const rowSides = opts.floor && hasFloor(row) ? [...sides, 'floor'] : sides;
      for (let i = 0; i < opts.runs; i++) {
        for (const side of rowSides) {
          const r = runOnce(side, row, target.sock, ops, target);
          runs[side].push(r);
          if (opts.verbose) {
            process.stderr.write(`  ${row.name} ${side.padEnd(6)} run ${i + 1}/${opts.runs}: ` +
              `${fmtNum(r.opsPerSec)} ops/s, ${fmtNum(r.mibPerSec, 1)} MiB/s, ${r.seconds.toFixed(2)} s, ` +
              `CPU ${fmtNum(r.cpuUsPerOp, 2)} µs/op\n`);
          }
        }
      }
      const summarize = (list) => ({
        runs: list,
        medianOpsPerSec: median(list.map((r) => r.opsPerSec)),
        medianMibPerSec: median(list.map((r) => r.mibPerSec)),
        medianCpuUsPerOp: median(list.map((r) => r.cpuUsPerOp)),
        medianCpuUserUsPerOp: median(list.map((r) => r.cpuUserUs / r.ops)),
        medianCpuSystemUsPerOp: median(list.map((r) => r.cpuSystemUs / r.ops)),
        medianServerCpuUsPerOp: list.every((r) => r.serverCpuUsPerOp !== null) ? median(list.map((r) => r.serverCpuUsPerOp)) : null,
        syscalls: null,
      });
      const ours = summarize(runs.ours);
      const libnbd = summarize(runs.libnbd);
      if (opts.syscalls) {
        for (const side of sides) {
          const sc = measureSyscalls(side, row, target, ops, tmp);
          (side === 'ours' ? ours : libnbd).syscalls = sc;
          if (opts.verbose) {
            process.stderr.write(`  ${row.name} ${side.padEnd(6)} syscalls: ${sc.callsShort} with ${sc.opsShort} ops, ` +
              `${sc.callsFull} with ${sc.opsFull}: ${sc.perOp.toFixed(2)} per op (${topSyscalls(sc.bySyscall)})\n`);
          }
        }
      }
      const ratio = ours.medianOpsPerSec !== null && libnbd.medianOpsPerSec ? ours.medianOpsPerSec / libnbd.medianOpsPerSec : null;
      results.push({
        name: row.name, label: row.label, op: row.op, blockSize: row.bs, depth: row.depth,
        preadInto: !!row.into, opsPerRun: ops, ours, libnbd, ratio,
        floor: runs.floor.length > 0 ? summarize(runs.floor) : null,
      });
      process.stderr.write(`${row.label}: done (${opts.runs} run${opts.runs === 1 ? '' : 's'} per side)\n`);
    }

    process.stdout.write('\n');
    printTable(results, opts.syscalls, opts.floor);
    process.stdout.write(`\nmedians of ${opts.runs} alternating runs per side; ratio = ours/libnbd ops/s (>1: ours faster); ` +
      'CPU = user+system time of the client process over the timed phase; ' +
      'server = nbdkit\'s user+system time over the whole run (connect and warm-up too) per operation' +
      `${opts.floor ? '; floor = bench/floor.c (no library, simple replies, one command at a time), ' +
        'run in the same alternation on the depth-1 rows; ours/floor and libnbd/floor = each client\'s ops/s over the floor\'s' : ''}` +
      `${opts.quick ? '; --quick: smoke run, not a measurement' : ''}\n`);

    if (opts.syscalls) {
      process.stdout.write('syscalls = (calls with all ops - calls with depth ops) / (ops - depth) under strace -f -c, ' +
        'every thread; the largest per op:\n');
      const width = Math.max(...results.map((r) => r.label.length));
      for (const r of results) {
        for (const side of sides) {
          const sc = r[side].syscalls;
          process.stdout.write(`  ${r.label.padEnd(width)}  ${side.padEnd(6)}  ${topSyscalls(sc.bySyscall)}\n`);
        }
      }
    }

    if (opts.json) {
      const doc = {
        date: new Date().toISOString(),
        host: { cpus: os.cpus().length, cpuModel: (os.cpus()[0] || {}).model, node: process.version, platform: `${os.platform()} ${os.release()}` },
        server: `nbdkit memory ${EXPORT_SIZE} over a Unix socket`,
        runsPerSide: opts.runs, quick: opts.quick, warmup: WARMUP, sides,
        floor: opts.floor
          ? 'bench/floor.c: no library, NBD_OPT_GO without structured replies, one command at a time ' +
            '(one send and two recv each, plus a poll when the reply has not come yet), on the depth-1 rows without TLS'
          : null,
        cpu: 'user and system time of the client process (every thread) over the timed phase: ' +
          'process.cpuUsage() in ours.js, getrusage(RUSAGE_SELF) in libnbd-bench',
        syscalls: opts.syscalls
          ? 'strace -f -c, each side run with opsShort (= depth) and with opsFull timed operations; ' +
            'perOp = (callsFull - callsShort) / (opsFull - opsShort)'
          : null,
        rows: results,
      };
      fs.writeFileSync(opts.json, JSON.stringify(doc, null, 2) + '\n');
      process.stderr.write(`wrote ${opts.json}\n`);
    }
  } finally {
    await stopNbdkitAndWait(server);
    await stopNbdkitAndWait(tlsServer);
    cleanup();
  }
}

main().catch((err) => {
  process.stderr.write(`bench: ${err instanceof BenchError ? err.message : err.stack || err}\n`);
  process.exitCode = 1;
});
