#!/usr/bin/env node
// ours.js: the nbd-client side of `npm run bench`.
//
// The same workload as bench/libnbd-bench.c, driven through the public API:
// one Handle over a Unix socket, exactly `depth` commands in flight (each
// completion starts the next command on its slot), offsets walking
// sequentially through the export and wrapping around, `warmup` untimed
// operations, then `ops` timed operations. Prints one JSON line:
//
//   {"ops":N,"seconds":s,"opsPerSec":x,"mibPerSec":y,
//    "cpuUserUs":u,"cpuSystemUs":k,"cpuUsPerOp":c}
//
// The CPU figures are process.cpuUsage() (getrusage(RUSAGE_SELF): every
// thread of the process, so the driver's threads too) taken just before and
// just after the timed phase, in microseconds, and their sum divided by ops.
//
// Usage:
//   node bench/ours.js --socket PATH --op pread|pwrite --bs BYTES --depth N
//                      [--ops N | --seconds S] [--size BYTES] [--warmup N]
//                      [--into]
//
// --into reads with preadInto() into a buffer preallocated per slot instead
// of pread(), which allocates a fresh Buffer per read. Any failure prints a
// message on stderr and exits 1.
'use strict';

const path = require('node:path');

function die(msg) {
  process.stderr.write(`ours.js: ${msg}\n`);
  process.exit(1);
}

function parseSize(name, s) {
  const m = /^(\d+)([kKmMgG]?)$/.exec(String(s));
  if (!m) die(`${name}: expected a non-negative integer, got '${s}'`);
  const shift = { '': 0, k: 10, m: 20, g: 30 }[m[2].toLowerCase()];
  const v = Number(m[1]) * 2 ** shift;
  if (!Number.isSafeInteger(v)) die(`${name}: '${s}' is too large`);
  return v;
}

function parseArgs(argv) {
  const o = { socket: null, op: null, bs: 0, depth: 0, ops: 0, seconds: 0, size: 0, warmup: 300, into: false, pskFile: null, pskUser: null };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const eq = a.indexOf('=');
    const key = eq >= 0 ? a.slice(0, eq) : a;
    const value = () => {
      if (eq >= 0) return a.slice(eq + 1);
      if (i + 1 >= argv.length) die(`${key} needs a value`);
      return argv[++i];
    };
    switch (key) {
      case '--socket': o.socket = value(); break;
      case '--op': o.op = value(); break;
      case '--bs': o.bs = parseSize('--bs', value()); break;
      case '--depth': o.depth = parseSize('--depth', value()); break;
      case '--ops': o.ops = parseSize('--ops', value()); break;
      case '--size': o.size = parseSize('--size', value()); break;
      case '--warmup': o.warmup = parseSize('--warmup', value()); break;
      case '--seconds': {
        const v = value();
        o.seconds = Number(v);
        if (!(o.seconds > 0)) die(`--seconds: expected a positive number, got '${v}'`);
        break;
      }
      case '--into': o.into = true; break;
      case '--psk-file': o.pskFile = value(); break;
      case '--psk-user': o.pskUser = value(); break;
      case '--help':
        process.stdout.write(
          'usage: node bench/ours.js --socket PATH --op pread|pwrite --bs BYTES --depth N\n' +
          '                          [--ops N | --seconds S] [--size BYTES] [--warmup N] [--into]\n');
        process.exit(0);
        break;
      default: die(`unknown argument '${a}'`);
    }
  }
  if (!o.socket || !o.op || o.bs === 0 || o.depth === 0) die('--socket, --op, --bs and --depth are required (see --help)');
  if (o.op !== 'pread' && o.op !== 'pwrite') die(`--op must be pread or pwrite, got '${o.op}'`);
  if ((o.ops === 0) === (o.seconds === 0)) die('give exactly one of --ops N (N > 0) and --seconds S');
  if (o.into && o.op !== 'pread') die('--into only applies to --op pread');
  if (o.depth > 65536) die(`--depth ${o.depth} is unreasonably large`);
  if (o.bs > 64 * 1024 * 1024) die(`--bs ${o.bs} exceeds the 64 MiB NBD payload limit`);
  return o;
}

function describe(err) {
  if (err && typeof err === 'object') {
    const bits = [err.operation, err.code].filter(Boolean).join(' ');
    return bits ? `${bits}: ${err.message}` : String(err.stack || err.message || err);
  }
  return String(err);
}

async function main() {
  const o = parseArgs(process.argv.slice(2));

  let Handle;
  try {
    ({ Handle } = require(path.join(__dirname, '..', 'dist', 'index.js')));
  } catch (err) {
    die(`cannot load ../dist/index.js (run \`npm run build\` first): ${err.message}`);
  }

  // The default request window is 64; only widen it if the benchmark asks
  // for more, so that "depth" really is the number on the wire.
  const options = o.depth > 64 ? { maxInFlight: o.depth } : {};
  if (o.pskFile) Object.assign(options, { tls: 'require', tlsPskFile: o.pskFile, ...(o.pskUser ? { tlsUsername: o.pskUser } : {}) });
  const h = new Handle(options);
  try {
    await h.connectUnix(o.socket);

    const exportSize = Number(h.getSize());
    const size = o.size === 0 ? exportSize : o.size;
    if (size > exportSize) die(`--size ${size} exceeds the export size ${exportSize}`);
    if (o.op === 'pwrite' && h.isReadOnly()) die('the export is read-only; cannot benchmark pwrite');
    const blocksInSpan = Math.floor(size / o.bs);
    if (blocksInSpan === 0) die(`the export (${size} bytes) is smaller than one block`);

    const bs = o.bs;
    const depth = o.depth;
    let nextBlock = 0;

    // Per-slot read buffers (used with --into) and one shared write buffer
    // (it is only read), filled with the same non-zero pattern as the C side.
    const readBufs = [];
    if (o.op === 'pread' && o.into) for (let i = 0; i < depth; i++) readBufs.push(Buffer.alloc(bs));
    let writeBuf = null;
    if (o.op === 'pwrite') {
      writeBuf = Buffer.allocUnsafe(bs);
      for (let j = 0; j < bs; j++) writeBuf[j] = (j * 131 + 7) & 0xff;
    }

    // Start one command on `slot` at the next offset; returns its promise.
    let issueOne;
    if (o.op === 'pwrite') {
      issueOne = () => {
        const off = (nextBlock++ % blocksInSpan) * bs;
        return h.pwrite(writeBuf, off);
      };
    } else if (o.into) {
      issueOne = (slot) => {
        const off = (nextBlock++ % blocksInSpan) * bs;
        return h.preadInto(readBufs[slot], off);
      };
    } else {
      issueOne = () => {
        const off = (nextBlock++ % blocksInSpan) * bs;
        return h.pread(bs, off).then((buf) => {
          if (buf.length !== bs) throw new Error(`pread returned ${buf.length} bytes, expected ${bs}`);
        });
      };
    }

    // Run n operations (or, when n is 0, until maxSeconds have passed) with
    // exactly `depth` in flight: each completion refills its own slot.
    const runPhase = (n, maxSeconds) =>
      new Promise((resolve, reject) => {
        const timed = n === 0;
        const deadline = timed ? process.hrtime.bigint() + BigInt(Math.round(maxSeconds * 1e9)) : 0n;
        let issued = 0;
        let completed = 0;
        let stopIssuing = false;
        let failed = false;
        const mayIssue = () => {
          if (stopIssuing) return false;
          if (!timed) return issued < n;
          if ((issued & 15) === 0 && process.hrtime.bigint() >= deadline) stopIssuing = true;
          return !stopIssuing;
        };
        const start = (slot) => {
          issued++;
          issueOne(slot).then(
            () => {
              completed++;
              if (failed) return;
              if (mayIssue()) start(slot);
              else if (completed === issued) resolve(completed);
            },
            (err) => {
              if (!failed) {
                failed = true;
                reject(err);
              }
            },
          );
        };
        for (let slot = 0; slot < depth && mayIssue(); slot++) start(slot);
        if (issued === 0) resolve(0);
      });

    if (o.warmup > 0) await runPhase(o.warmup, 0);

    const cpu0 = process.cpuUsage();
    const t0 = process.hrtime.bigint();
    const done = await runPhase(o.ops, o.seconds);
    const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
    const cpu = process.cpuUsage(cpu0);
    const opsPerSec = done / seconds;
    const mibPerSec = (opsPerSec * bs) / (1024 * 1024);
    const cpuUsPerOp = done > 0 ? (cpu.user + cpu.system) / done : 0;
    process.stdout.write(
      JSON.stringify({
        ops: done,
        seconds: Number(seconds.toFixed(6)),
        opsPerSec: Number(opsPerSec.toFixed(1)),
        mibPerSec: Number(mibPerSec.toFixed(2)),
        cpuUserUs: cpu.user,
        cpuSystemUs: cpu.system,
        cpuUsPerOp: Number(cpuUsPerOp.toFixed(3)),
      }) + '\n',
    );
  } finally {
    await h.close();
  }
}

main().catch((err) => die(describe(err)));
