// NBD URIs: every form and parameter against real servers, percent-decoding, the uriAllow*
// policy refusals, malformed URIs, getUri round trips checked by nbdinfo, isUri/supportsUri.
import test from 'ava'
import { ALLOW_TRANSPORT_TCP, ALLOW_TRANSPORT_UNIX, Handle, isUri, supportsUri } from 'nbd-client'
import { nbdinfoSize } from './helpers/crosscheck'
import { connectedSocketFd } from './helpers/fds'
import { expectReject, expectThrow, seededBytes, KiB, MiB } from './helpers/nbd'
import { requireTool, useNbdkit, useQemuNbd } from './helpers/servers'

function fresh(t: import('ava').ExecutionContext, options: ConstructorParameters<typeof Handle>[0] = {}): Handle {
  const h = new Handle(options)
  t.teardown(() => h.close())
  return h
}

test('nbd+unix:// with socket= reaches the named export; getUri gives it back', async (t) => {
  if (!requireTool(t, 'nbdinfo')) return
  const server = await useQemuNbd(t, { size: 2 * MiB })
  if (!server) return
  const h = fresh(t)
  await h.connectUri(`nbd+unix:///disk?socket=${encodeURIComponent(server.socket!)}`)
  t.is(h.state, 'ready')
  t.is(h.getExportName(), 'disk')
  t.is(h.getSize(), 2 * MiB)
  const uri = h.getUri()
  t.regex(uri, /^nbd\+unix:\/\/\/disk\?socket=/)
  t.is(await nbdinfoSize(uri), 2 * MiB, 'libnbd understands getUri()')
})

test('nbd://host:port/export over TCP, and the default port number in getUri', async (t) => {
  if (!requireTool(t, 'nbdinfo')) return
  const server = await useQemuNbd(t, { size: 1 * MiB, tcp: true })
  if (!server) return
  const h = fresh(t)
  await h.connectUri(`nbd://127.0.0.1:${server.port}/disk`)
  t.is(h.getSize(), 1 * MiB)
  t.is(h.getUri(), `nbd://127.0.0.1:${server.port}/disk`)
  t.is(await nbdinfoSize(h.getUri()), 1 * MiB)
})

test('export names are percent-decoded (spaces, slashes, unicode)', async (t) => {
  const name = 'my disk/é'
  const server = await useQemuNbd(t, { size: 1 * MiB, exportName: name })
  if (!server) return
  const h = fresh(t)
  await h.connectUri(`nbd+unix:///${encodeURIComponent(name)}?socket=${server.socket}`)
  t.is(h.getExportName(), name)
  await h.pwrite(seededBytes(4 * KiB, 3), 0)
  t.deepEqual(await h.pread(4 * KiB, 0), seededBytes(4 * KiB, 3))
  const back = fresh(t)
  await back.connectUri(h.getUri())
  t.is(back.getExportName(), name, 'getUri encodes what connectUri decodes')
})

test('an empty path is the default export', async (t) => {
  const server = await useNbdkit(t, ['memory', '1M'])
  if (!server) return
  for (const uri of [`nbd+unix://?socket=${server.socket}`, `nbd+unix:///?socket=${server.socket}`]) {
    const h = fresh(t)
    await h.connectUri(uri)
    t.is(h.getExportName(), '')
    t.is(h.getSize(), 1 * MiB)
  }
})

test('uriAllowTransports refuses a transport with EPERM before connecting', async (t) => {
  const server = await useNbdkit(t, ['memory', '1M'])
  if (!server) return
  const unixOnly = fresh(t, { uriAllowTransports: ALLOW_TRANSPORT_UNIX })
  await expectReject(t, () => unixOnly.connectUri('nbd://127.0.0.1:1/'), 'EPERM', 'connectUri')
  t.is(unixOnly.state, 'created', 'a refused URI leaves the handle as it was')
  await unixOnly.connectUri(`nbd+unix:///?socket=${server.socket}`)
  const tcpOnly = fresh(t, { uriAllowTransports: ALLOW_TRANSPORT_TCP })
  await expectReject(t, () => tcpOnly.connectUri(`nbd+unix:///?socket=${server.socket}`), 'EPERM', 'connectUri')
  await expectReject(t, () => tcpOnly.connectUri('nbd+vsock://2:10809/'), 'EPERM', 'connectUri')
})

test('uriAllowTls: disable refuses nbds, require refuses nbd', async (t) => {
  const noTls = fresh(t, { uriAllowTls: 'disable' })
  const err = await expectReject(t, () => noTls.connectUri('nbds://localhost/'), 'EPERM', 'connectUri')
  t.regex(err?.message ?? '', /uriAllowTls/)
  const onlyTls = fresh(t, { uriAllowTls: 'require' })
  await expectReject(t, () => onlyTls.connectUri('nbd+unix:///?socket=/nonexistent'), 'EPERM', 'connectUri')
  t.is(onlyTls.getUriAllowTls(), 'require')
})

test('uriAllowLocalFile guards tls-psk-file and tls-certificates', async (t) => {
  for (const param of ['tls-psk-file=/etc/keys.psk', 'tls-certificates=/etc/pki']) {
    const h = fresh(t)
    const err = await expectReject(t, () => h.connectUri(`nbds+unix:///?socket=/nonexistent&${param}`), 'EPERM', 'connectUri')
    t.regex(err?.message ?? '', /uriAllowLocalFile/)
  }
  // Allowed: the URI is accepted and the connect gets as far as the socket.
  const ok = fresh(t, { uriAllowLocalFile: true })
  await expectReject(t, () => ok.connectUri('nbds+unix:///?socket=/nonexistent/sock&tls-psk-file=/x.psk'), 'ENOENT', 'connectUri')
})

test('TLS parameters and user@ become the handle settings', async (t) => {
  const h = fresh(t, { uriAllowLocalFile: true })
  await expectReject(
    t,
    () => h.connectUri('nbds+unix://alice@/disk?socket=/nonexistent/s&tls-hostname=srv.example&tls-verify-peer=false&tls-psk-file=/k.psk'),
    'ENOENT',
    'connectUri',
  )
  t.is(h.getTls(), 'require')
  t.is(h.getTlsUsername(), 'alice')
  t.is(h.getTlsHostname(), 'srv.example')
  t.false(h.getTlsVerifyPeer())
  t.is(h.getExportName(), 'disk')
})

test('nbd+vsock:// fails cleanly where there is no vsock peer', async (t) => {
  const h = fresh(t)
  const err = await expectReject(t, () => h.connectUri('nbd+vsock://3:10809/'), ['ENODEV', 'EAFNOSUPPORT', 'ECONNREFUSED', 'ENOTSUP', 'ETIMEDOUT', 'EHOSTUNREACH', 'ENETUNREACH', 'ECONNRESET', 'EINVAL'], 'connectUri')
  t.truthy(err)
  t.is(h.state, 'dead')
})

test('malformed URIs reject with EINVAL naming the fault', async (t) => {
  const cases: [string, RegExp][] = [
    ['http://localhost/', /scheme/i],
    ['nbd:/no-slashes', /nbd:\/\//],
    ['nbd://host:99999/', /port/i],
    ['nbd://host:abc/', /port/i],
    ['nbd+unix:///disk', /socket/],
    ['nbd://host/%zz', /percent|%/i],
    ['nbd+vsock://notanumber/', /cid|vsock/i],
    ['', /./],
  ]
  for (const [uri, message] of cases) {
    const h = fresh(t)
    const err = await expectReject(t, () => h.connectUri(uri), 'EINVAL', 'connectUri')
    t.regex(err?.message ?? '', message, uri)
    t.is(h.state, 'created')
  }
  const h = fresh(t)
  await expectReject(t, () => h.connectUri(42 as unknown as string), 'EINVAL', 'connectUri')
})

test('getUri: ENOTCONN before connecting, EINVAL for a socket passed in (libnbd)', async (t) => {
  const server = await useNbdkit(t, ['memory', '1M'])
  if (!server) return
  const h = fresh(t)
  expectThrow(t, () => h.getUri(), 'ENOTCONN', 'getUri')
  await h.connectSocket(await connectedSocketFd(server))
  expectThrow(t, () => h.getUri(), 'EINVAL', 'getUri')
  const u = fresh(t)
  await u.connectUnix(server.socket!)
  t.is(u.getUri(), `nbd+unix:///?socket=${server.socket}`)
})

test('isUri and supportsUri', (t) => {
  t.true(supportsUri())
  for (const s of ['nbd://h/', 'nbds://h/', 'nbd+unix:///?socket=/s', 'nbds+unix:///?socket=/s', 'nbd+vsock://2/', 'NBD://H/']) {
    t.true(isUri(s), s)
  }
  // As libnbd: the scheme must be followed by "://".
  for (const s of ['', '/dev/nbd0', 'http://x/', 'nbd', 'nbdx://h/', 'nbd:foo', 'nbd:/x', 'nbds+unix:']) t.false(isUri(s), s)
  t.false(isUri(undefined as unknown as string))
})
