// nbd+ssh:// URIs (libnbd 1.22): the handle runs `ssh … -- HOST nc …` and talks NBD over its
// stdin and stdout. No sshd runs here, so a stand-in `ssh` on PATH records its arguments and
// runs the remote command locally, and a stand-in `nc` (Node) joins its stdio to the socket
// or port it is given: what is checked is the command line, that NBD flows through it to a
// real nbdkit, the policy, and the errors.
import fs from 'node:fs'
import path from 'node:path'
import test from 'ava'
import { ALLOW_TRANSPORT_MASK, ALLOW_TRANSPORT_SSH, ALLOW_TRANSPORT_TCP, Handle, isUri } from 'nbd-client'
import { expectReject, seededBytes, KiB, MiB } from './helpers/nbd'
import { makeTempDir, useNbdkit } from './helpers/servers'

const bin = makeTempDir('nbd-fake-ssh-')
const log = path.join(bin, 'log')
fs.mkdirSync(log)

// ssh: write argv one per line to log/<host>, drop the options up to "--" and the host, then
// run what is left as the remote shell would (ssh joins it with spaces). A host named
// unreachable* fails as ssh does when it cannot resolve the name.
fs.writeFileSync(
  path.join(bin, 'ssh'),
  `#!/bin/sh
host=
for a in "$@"; do
  if [ "$a" = "--" ]; then found=1; continue; fi
  if [ -n "$found" ] && [ -z "$host" ]; then host=$a; fi
done
printf '%s\\n' "$(basename "$0")" "$@" > "${log}/$host"
while [ $# -gt 0 ]; do a=$1; shift; [ "$a" = "--" ] && break; done
shift
case "$host" in unreachable*) echo "ssh: Could not resolve hostname $host: Name or service not known" >&2; exit 255;; esac
exec sh -c "$*"
`,
  { mode: 0o755 },
)
fs.writeFileSync(
  path.join(bin, 'nc'),
  `#!${process.execPath}
const net = require('node:net')
const a = process.argv.slice(2)
const s = a[0] === '-U' ? net.connect(a[1]) : net.connect(Number(a[1]), a[0])
process.stdin.pipe(s)
s.pipe(process.stdout)
s.on('error', (e) => { process.stderr.write('nc: ' + e.message + '\\n'); process.exit(1) })
s.on('close', () => process.exit(0))
`,
  { mode: 0o755 },
)
process.env.PATH = `${bin}:${process.env.PATH}`
test.after.always(() => fs.rmSync(bin, { recursive: true, force: true }))

function argvOf(host: string): string[] {
  return fs.readFileSync(path.join(log, host), 'utf8').trimEnd().split('\n')
}

function fresh(t: import('ava').ExecutionContext, options: ConstructorParameters<typeof Handle>[0] = {}): Handle {
  const h = new Handle(options)
  t.teardown(() => h.close())
  return h
}

test('isUri and the transport bit know ssh, as libnbd 1.22', (t) => {
  t.true(isUri('nbd+ssh://host/disk'))
  t.true(isUri('nbds+ssh://host'))
  t.false(isUri('nbd+ssh:host'))
  t.is(ALLOW_TRANSPORT_SSH, 0x8)
  t.is(ALLOW_TRANSPORT_MASK, 0xf)
  const h = fresh(t)
  h.setUriAllowTransports(0xf)
  t.is(h.getUriAllowTransports(), 0xf)
})

test('socket=: ssh runs nc -U on the remote host; data goes both ways; getUri gives it back', async (t) => {
  const server = await useNbdkit(t, ['memory', '4M'])
  if (!server) return
  const h = fresh(t)
  const socket = server.socket!
  await h.connectUri(`nbd+ssh://alice@host-a:2222/?socket=${encodeURIComponent(socket)}&compress=true`)
  t.is(h.state, 'ready')
  t.deepEqual(argvOf('host-a'), ['ssh', '-C', '-p', '2222', '-o', 'User=alice', '--', 'host-a', 'nc', '-U', socket])
  t.is(h.getSize(), 4 * MiB)
  t.true(h.getSubprocessPid() > 0, 'ssh is the subprocess')
  const data = seededBytes(256 * KiB, 7)
  await h.pwrite(data, 1 * MiB)
  t.deepEqual(await h.pread(data.length, 1 * MiB), data)
  t.is(h.getUri(), `nbd+ssh://alice@host-a:2222/?socket=${socket}&compress=true`)
  await h.shutdown()
})

test('no socket=: nc reaches the remote localhost on nbd-port (10809 by default)', async (t) => {
  const server = await useNbdkit(t, ['memory', '1M'], { tcp: true })
  if (!server) return
  const h = fresh(t)
  await h.connectUri(`nbd+ssh://host-b/?nbd-port=${server.port}`)
  t.deepEqual(argvOf('host-b'), ['ssh', '--', 'host-b', 'nc', 'localhost', String(server.port)])
  t.is(h.getSize(), 1 * MiB)
  t.deepEqual(await h.pread(4096, 0), Buffer.alloc(4096))
  t.is(h.getUri(), `nbd+ssh://host-b/?nbd-port=${server.port}`)
})

test('a socket path the remote shell would split is passed as one word', async (t) => {
  const server = await useNbdkit(t, ['memory', '1M'])
  if (!server) return
  const odd = path.join(path.dirname(server.socket!), "it's a; socket")
  fs.symlinkSync(server.socket!, odd)
  const h = fresh(t)
  await h.connectUri(`nbd+ssh://host-c/?socket=${encodeURIComponent(odd)}`)
  t.is(h.getSize(), 1 * MiB)
  t.is(argvOf('host-c').at(-1), `'${odd.replace(/'/g, "'\\''")}'`)
})

test('ssh failing to reach the host rejects with its exit status and stderr', async (t) => {
  const h = fresh(t)
  const err = await expectReject(t, () => h.connectUri('nbd+ssh://unreachable.example/'), '*', 'connectUri')
  t.regex(err!.message, /Could not resolve hostname unreachable\.example/)
  t.regex(err!.message, /255/)
  t.is(h.state, 'dead')
})

test('a host that ssh would read as an option is refused before anything runs', async (t) => {
  for (const host of ['-oProxyCommand=touch%20pwned', '%2DoProxyCommand=x']) {
    const h = fresh(t)
    await expectReject(t, () => h.connectUri(`nbd+ssh://${host}/`), 'EINVAL', 'connectUri')
    t.is(h.state, 'created')
  }
  t.deepEqual(fs.readdirSync(log).filter((f) => f.startsWith('-')), [])
})

test('malformed ssh URIs are EINVAL; without ALLOW_TRANSPORT_SSH they are EPERM', async (t) => {
  for (const bad of ['nbd+ssh:///disk', 'nbd+ssh://h/?socket=/s&nbd-port=1', 'nbd+ssh://h/?nbd-port=0', 'nbd+ssh://h/?compress=maybe']) {
    await expectReject(t, () => fresh(t).connectUri(bad), 'EINVAL', 'connectUri')
  }
  const h = fresh(t, { uriAllowTransports: ALLOW_TRANSPORT_TCP })
  const err = await expectReject(t, () => h.connectUri('nbd+ssh://host-d/'), 'EPERM', 'connectUri')
  t.regex(err!.message, /SSH/)
  t.false(fs.existsSync(path.join(log, 'host-d')), 'ssh never ran')
})
