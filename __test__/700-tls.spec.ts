// TLS through the public API: PSK and X.509 against nbdkit and qemu-nbd, with keys and
// certificates made by the test (openssl CLI); data integrity cross-checked by libnbd's nbdcopy
// over the same TLS server; allow vs require against plaintext servers; the distinct failures
// (wrong key, unknown CA, wrong hostname); STARTTLS in option mode; nbds URIs.
import { randomBytes } from 'node:crypto'
import { spawnSync } from 'node:child_process'
import fs from 'node:fs'
import path from 'node:path'
import test, { type ExecutionContext } from 'ava'
import { Handle, supportsTls } from 'nbd-client'
import { crossRead } from './helpers/crosscheck'
import { connectTo, expectReject, seededBytes, KiB, MiB } from './helpers/nbd'
import { makeTempDir, requireTool, useNbdkit, useQemuNbd, type Server } from './helpers/servers'

function sh(argv: string[]): void {
  const r = spawnSync(argv[0]!, argv.slice(1), { encoding: 'utf8' })
  if (r.status !== 0) throw new Error(`${argv.join(' ')} failed: ${r.stderr}`)
}

interface Creds {
  dir: string
  /** Server side: ca-cert.pem, server-cert.pem, server-key.pem (and keys.psk). */
  server: string
  /** Client side: ca-cert.pem, client-cert.pem, client-key.pem. */
  client: string
  /** A CA the server's certificate is not signed by. */
  otherCa: string
  psk: string
  wrongPsk: string
}

function makeCreds(t: ExecutionContext): Creds {
  const dir = makeTempDir('nbd-tls-')
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }))
  const server = path.join(dir, 'server')
  const client = path.join(dir, 'client')
  const otherCa = path.join(dir, 'other')
  for (const d of [server, client, otherCa]) fs.mkdirSync(d)
  const p = (name: string) => path.join(dir, name)
  const ca = (key: string, cert: string, cn: string) => {
    sh(['openssl', 'req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout', key,
      '-out', cert, '-days', '2', '-subj', `/CN=${cn}`])
  }
  const leaf = (name: string, cn: string, san: string | null, usage: string) => {
    sh(['openssl', 'req', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout', p(`${name}-key.pem`),
      '-out', p(`${name}.csr`), '-subj', `/CN=${cn}`])
    const ext = p(`${name}.ext`)
    fs.writeFileSync(ext, `extendedKeyUsage=${usage}\nkeyUsage=digitalSignature\n${san ? `subjectAltName=${san}\n` : ''}`)
    sh(['openssl', 'x509', '-req', '-in', p(`${name}.csr`), '-CA', p('ca-cert.pem'), '-CAkey', p('ca-key.pem'),
      '-CAcreateserial', '-out', p(`${name}-cert.pem`), '-days', '2', '-extfile', ext])
  }
  ca(p('ca-key.pem'), p('ca-cert.pem'), 'nbd test CA')
  ca(p('other-key.pem'), path.join(otherCa, 'ca-cert.pem'), 'another CA')
  leaf('server', 'localhost', 'DNS:localhost,IP:127.0.0.1', 'serverAuth')
  leaf('client', 'alice', null, 'clientAuth')
  for (const f of ['ca-cert.pem']) {
    fs.copyFileSync(p(f), path.join(server, f))
    fs.copyFileSync(p(f), path.join(client, f))
  }
  fs.copyFileSync(p('server-cert.pem'), path.join(server, 'server-cert.pem'))
  fs.copyFileSync(p('server-key.pem'), path.join(server, 'server-key.pem'))
  fs.copyFileSync(p('client-cert.pem'), path.join(client, 'client-cert.pem'))
  fs.copyFileSync(p('client-key.pem'), path.join(client, 'client-key.pem'))
  const key = randomBytes(32).toString('hex')
  const psk = path.join(dir, 'keys.psk')
  fs.writeFileSync(psk, `alice:${key}\n`)
  fs.copyFileSync(psk, path.join(server, 'keys.psk'))
  const wrongPsk = path.join(dir, 'wrong.psk')
  fs.writeFileSync(wrongPsk, `alice:${randomBytes(32).toString('hex')}\n`)
  return { dir, server, client, otherCa, psk, wrongPsk }
}

const nbdkitPsk = (t: ExecutionContext, c: Creds, tcp = false) =>
  useNbdkit(t, ['memory', '4M'], { tcp, extraArgs: ['--tls=require', `--tls-psk=${c.psk}`] })
const nbdkitX509 = (t: ExecutionContext, c: Creds, tcp = false) =>
  useNbdkit(t, ['memory', '4M'], { tcp, extraArgs: ['--tls=require', `--tls-certificates=${c.server}`] })
const qemuTls = (t: ExecutionContext, c: Creds, kind: 'psk' | 'x509', tcp = false) =>
  useQemuNbd(t, {
    size: 4 * MiB,
    tcp,
    extraArgs: ['--object', `tls-creds-${kind},id=tls0,dir=${c.server},endpoint=server`, '--tls-creds', 'tls0'],
  })

function tlsUri(server: Server, query: string): string {
  // libnbd's PSK user is the URI's user part (it cannot guess a login name in CI).
  const user = query.includes('tls-psk-file') ? 'alice@' : ''
  const base = server.uri.replace(/^nbd(\+unix)?:\/\//, (_m, unix: string | undefined) => `nbds${unix ?? ''}://${user}`)
  return base + (base.includes('?') ? '&' : '?') + query
}

async function roundTrip(t: ExecutionContext, h: Handle, server: Server, query: string) {
  t.true(h.getTlsNegotiated())
  const data = seededBytes(256 * KiB, 7)
  await h.pwrite(data, 1 * MiB)
  await h.flush()
  t.deepEqual(await h.pread(256 * KiB, 1 * MiB), data)
  // libnbd reads back over its own TLS connection to the same server.
  if (requireTool(t, 'nbdcopy')) {
    t.deepEqual(await crossRead(tlsUri(server, query), 1 * MiB, 256 * KiB), data)
  }
}

test('supportsTls', (t) => {
  t.true(supportsTls())
})

test('PSK with nbdkit: data round trip, cross-checked by nbdcopy', async (t) => {
  if (!requireTool(t, 'openssl')) return
  const c = makeCreds(t)
  const server = await nbdkitPsk(t, c)
  if (!server) return
  const h = new Handle({ tls: 'require', tlsPskFile: c.psk, tlsUsername: 'alice' })
  t.teardown(() => h.close())
  await connectTo(h, server)
  await roundTrip(t, h, server, `tls-psk-file=${c.psk}`)
})

test('PSK with qemu-nbd, through an nbds+unix URI with user@', async (t) => {
  if (!requireTool(t, 'openssl')) return
  const c = makeCreds(t)
  const server = await qemuTls(t, c, 'psk')
  if (!server) return
  const h = new Handle({ uriAllowLocalFile: true })
  t.teardown(() => h.close())
  await h.connectUri(`nbds+unix://alice@/disk?socket=${server.socket}&tls-psk-file=${c.psk}`)
  t.is(h.getTls(), 'require')
  await roundTrip(t, h, server, `tls-psk-file=${c.psk}`)
})

test('X.509 with nbdkit over TCP: verified against the CA and the host name', async (t) => {
  if (!requireTool(t, 'openssl')) return
  const c = makeCreds(t)
  const server = await nbdkitX509(t, c, true)
  if (!server) return
  const h = new Handle({ tls: 'require', tlsCertificates: c.client })
  t.teardown(() => h.close())
  await h.connectTcp('localhost', server.port!)
  await roundTrip(t, h, server, `tls-certificates=${c.client}`)
})

test('X.509 with qemu-nbd', async (t) => {
  if (!requireTool(t, 'openssl')) return
  const c = makeCreds(t)
  const server = await qemuTls(t, c, 'x509', true)
  if (!server) return
  const h = new Handle({ tls: 'require', tlsCertificates: c.client, exportName: 'disk' })
  t.teardown(() => h.close())
  await h.connectTcp('127.0.0.1', server.port!)
  t.true(h.getTlsNegotiated())
  const data = seededBytes(64 * KiB, 3)
  await h.pwrite(data, 0)
  t.deepEqual(await h.pread(64 * KiB, 0), data)
})

async function failsPromptly(t: ExecutionContext, h: Handle, connect: () => Promise<void>, code: string | string[], message: RegExp) {
  const started = Date.now()
  const err = await expectReject(t, connect, code)
  t.true(Date.now() - started < 5000, 'fails promptly')
  t.regex(err?.message ?? '', message)
  t.is(h.state, 'dead')
}

/**
 * Whether this CPU runs AES-GCM in hardware, from /proc/cpuinfo; undefined where it can't say.
 * Only on x86-64, where /proc/cpuinfo is the CPU this test runs on (an emulator may show its
 * host's instead).
 */
function aesInHardware(): boolean | undefined {
  if (process.arch !== 'x64') return undefined
  let info: string
  try {
    info = fs.readFileSync('/proc/cpuinfo', 'utf8')
  } catch {
    return undefined
  }
  const flags = new Set((/^flags\s*:(.*)$/m.exec(info)?.[1] ?? '').trim().split(/\s+/))
  return flags.has('aes') && flags.has('pclmulqdq')
}

/** The "TLS handshake done: …" debug message of one connect to `server`, with `suites` in the environment. */
async function handshakeWith(server: Server, c: Creds, suites: string | undefined): Promise<string> {
  const saved = process.env.NBD_CLIENT_TLS_CIPHERSUITES
  if (suites === undefined) delete process.env.NBD_CLIENT_TLS_CIPHERSUITES
  else process.env.NBD_CLIENT_TLS_CIPHERSUITES = suites
  let done = ''
  const h = new Handle({
    exportName: server.exportName,
    tls: 'require',
    tlsPskFile: c.psk,
    tlsUsername: 'alice',
    debug: (_context, message) => {
      if (message.startsWith('TLS handshake done')) done = message
    },
  })
  try {
    await connectTo(h, server)
    const b = await h.pread(4096, 0)
    if (b.length !== 4096) throw new Error(`read ${b.length} bytes`)
    return done
  } finally {
    await h.close()
    if (saved === undefined) delete process.env.NBD_CLIENT_TLS_CIPHERSUITES
    else process.env.NBD_CLIENT_TLS_CIPHERSUITES = saved
  }
}

// Serial: the tests change the process's environment, which the connect reads.
test.serial('TLS 1.3 with a PSK: nbdkit and qemu-nbd agree on AES-128-GCM where the CPU has AES, on ChaCha20 when the environment lists it alone; a list of unknown suites is refused', async (t) => {
  if (!requireTool(t, 'openssl')) return
  const c = makeCreds(t)
  const aes = aesInHardware()
  for (const server of [await nbdkitPsk(t, c), await qemuTls(t, c, 'psk')]) {
    if (!server) return
    const chosen = await handshakeWith(server, c, undefined)
    t.regex(chosen, /TLSv1\.3, cipher suite TLS_(AES_128_GCM_SHA256|CHACHA20_POLY1305_SHA256)$/)
    if (aes === true) t.regex(chosen, /TLS_AES_128_GCM_SHA256$/, server.uri)
    if (aes === false) t.regex(chosen, /TLS_CHACHA20_POLY1305_SHA256$/, server.uri)
    t.regex(await handshakeWith(server, c, 'TLS_CHACHA20_POLY1305_SHA256'), /cipher suite TLS_CHACHA20_POLY1305_SHA256$/)
  }
  const server = await nbdkitPsk(t, c)
  if (!server) return
  const err = await t.throwsAsync(handshakeWith(server, c, 'TLS_NO_SUCH_SUITE'))
  t.is((err as { code?: string }).code, 'EINVAL')
  t.regex(err!.message, /NBD_CLIENT_TLS_CIPHERSUITES="TLS_NO_SUCH_SUITE"/)
})

test('a wrong PSK key fails promptly and says which key file and user', async (t) => {
  if (!requireTool(t, 'openssl')) return
  const c = makeCreds(t)
  const server = await nbdkitPsk(t, c)
  if (!server) return
  const h = new Handle({ tls: 'require', tlsPskFile: c.wrongPsk, tlsUsername: 'alice' })
  t.teardown(() => h.close())
  await failsPromptly(t, h, () => connectTo(h, server), ['ECONNRESET', 'EPERM', 'EIO', 'ECONNREFUSED'], /alice/)
})

test('a server certificate from an unknown CA is refused with EPERM', async (t) => {
  if (!requireTool(t, 'openssl')) return
  const c = makeCreds(t)
  const server = await nbdkitX509(t, c, true)
  if (!server) return
  const h = new Handle({ tls: 'require', tlsCertificates: c.otherCa })
  t.teardown(() => h.close())
  await failsPromptly(t, h, () => h.connectTcp('localhost', server.port!), 'EPERM', /certificate|verif/i)
  // With verification off the same connection works.
  const lax = new Handle({ tls: 'require', tlsCertificates: c.otherCa, tlsVerifyPeer: false })
  t.teardown(() => lax.close())
  await lax.connectTcp('localhost', server.port!)
  t.true(lax.getTlsNegotiated())
})

test('a wrong host name is refused with EPERM', async (t) => {
  if (!requireTool(t, 'openssl')) return
  const c = makeCreds(t)
  const server = await nbdkitX509(t, c, true)
  if (!server) return
  const h = new Handle({ tls: 'require', tlsCertificates: c.client, tlsHostname: 'wrong.example' })
  t.teardown(() => h.close())
  await failsPromptly(t, h, () => h.connectTcp('localhost', server.port!), 'EPERM', /wrong\.example|host/i)
})

test("'require' against a plaintext server fails with ENOTSUP having sent only STARTTLS; 'allow' falls back", async (t) => {
  const server = await useNbdkit(t, ['memory', '1M'])
  if (!server) return
  const req = new Handle({ tls: 'require', tlsPskFile: '/nonexistent.psk' })
  t.teardown(() => req.close())
  const err = await expectReject(t, () => connectTo(req, server), 'ENOTSUP', 'connectUnix')
  t.regex(err?.message ?? '', /STARTTLS/)
  const allow = new Handle({ tls: 'allow' })
  t.teardown(() => allow.close())
  await connectTo(allow, server)
  t.false(allow.getTlsNegotiated())
  t.is(allow.getSize(), 1 * MiB)
})

test("'allow' uses TLS when the server offers it; a plaintext client is refused by a TLS-only server", async (t) => {
  if (!requireTool(t, 'openssl')) return
  const c = makeCreds(t)
  const server = await nbdkitPsk(t, c)
  if (!server) return
  const allow = new Handle({ tls: 'allow', tlsPskFile: c.psk, tlsUsername: 'alice' })
  t.teardown(() => allow.close())
  await connectTo(allow, server)
  t.true(allow.getTlsNegotiated())
  t.regex(allow.getUri(), /^nbds\+unix:/)
  // The URI still says TLS once the handle is closed and its session gone.
  await allow.close()
  t.regex(allow.getUri(), /^nbds\+unix:/)
  const plain = new Handle()
  t.teardown(() => plain.close())
  // NBD_REP_ERR_TLS_REQD: ENOTSUP, as libnbd.
  const err = await expectReject(t, () => connectTo(plain, server), 'ENOTSUP', 'connectUnix')
  t.regex(err?.message ?? '', /requires TLS/)
})

test('optStarttls in option mode, then optGo over TLS', async (t) => {
  if (!requireTool(t, 'openssl')) return
  const c = makeCreds(t)
  const server = await nbdkitPsk(t, c)
  if (!server) return
  const h = new Handle({ optMode: true, tlsPskFile: c.psk, tlsUsername: 'alice' })
  t.teardown(() => h.close())
  await connectTo(h, server)
  t.is(h.state, 'negotiating')
  t.false(h.getTlsNegotiated())
  t.true(await h.optStarttls())
  t.true(h.getTlsNegotiated())
  t.false(await h.optStarttls(), 'a second STARTTLS is refused')
  const list = await h.optList()
  t.true(Array.isArray(list))
  await h.optGo()
  t.is(h.state, 'ready')
  t.deepEqual(await h.pread(4096, 0), Buffer.alloc(4096))
})
