// A hostile server, block status: meta context negotiation and NBD_CMD_BLOCK_STATUS replies
// from the fake server of helpers/fake-server.ts, correct first, then wrong in each way a
// server can get them wrong.
//
// The rule for the outcomes: a reply that breaks the protocol (a context id never negotiated,
// a zero-length extent anywhere, an extent starting past the request or ending past the
// export, wrong lengths or framing) fails the command with EPROTO and the handle is dead, as
// API.md says of every protocol violation (libnbd tolerates some of these; we do not hand
// half-checked extents to the caller). A final extent running past the request but inside
// the export is allowed by the specification and succeeds. Every settle must be prompt and
// no claimed size may be allocated.
//
// Written against API.md (blockStatus, metaContexts, addMetaContext, canMetaContext,
// requestExtendedHeaders) before the library implements block status.
import test from 'ava'
import { CONTEXT_BASE_ALLOCATION, Handle, STATE_HOLE, STATE_ZERO } from 'nbd-client'
import {
  CMD,
  OPT,
  REPLY_TYPE,
  blockStatusExtPayload,
  blockStatusPayload,
  useFake,
  type Extent,
  type FakeConnection,
  type FakeOptions,
  type NbdRequest,
} from './helpers/fake-server'
import {
  PROMPT_MS,
  assertNoBigAllocation,
  codesOf,
  holdThen,
  memory,
  messageOf,
  openFake,
  settleAll,
  type Outcome,
} from './helpers/hostile'
import { assertNbdError, expectReject, seededBytes } from './helpers/nbd'

type HandleOptions = ConstructorParameters<typeof Handle>[0]
type BlockStatus = Record<string, { offset: number; length: number; flags: number }[]>

const KiB64 = 65536
const HOLE_ZERO = STATE_HOLE | STATE_ZERO
const DIRTY = 'qemu:dirty-bitmap:b0'

/** Handle options that ask for base:allocation (and extended headers when `extended`). */
function withContexts(extended: boolean, contexts = [CONTEXT_BASE_ALLOCATION]): HandleOptions {
  return { metaContexts: contexts, ...(extended ? { requestExtendedHeaders: true } : {}) } as HandleOptions
}

const framings = [false, true]
const framingName = (extended: boolean) => (extended ? 'extended headers, 64-bit extents' : 'compact headers, 32-bit extents')

// ---- what a correct server sends ------------------------------------------------------------------

for (const extended of framings) {
  test.serial(`block status from a correct server: base:allocation follows the export (${framingName(extended)})`, async (t) => {
    const server = await useFake(t, { extendedHeaders: extended })
    const h = await openFake(t, server, withContexts(extended))
    t.is(h.getExtendedHeadersNegotiated(), extended)
    t.true(h.canMetaContext(CONTEXT_BASE_ALLOCATION))
    t.is(server.optionsOf(OPT.SET_META_CONTEXT).length, 1)
    await h.pwrite(seededBytes(KiB64, 1), KiB64)
    const map = (await h.blockStatus(4 * KiB64, 0)) as BlockStatus
    t.deepEqual(map, {
      [CONTEXT_BASE_ALLOCATION]: [
        { offset: 0, length: KiB64, flags: HOLE_ZERO },
        { offset: KiB64, length: KiB64, flags: 0 },
        { offset: 2 * KiB64, length: 2 * KiB64, flags: HOLE_ZERO },
      ],
    })
    const one = (await h.blockStatus(4 * KiB64, 0, { reqOne: true })) as BlockStatus
    t.deepEqual(one, { [CONTEXT_BASE_ALLOCATION]: [{ offset: 0, length: KiB64, flags: HOLE_ZERO }] })
    const bs = server.requestsOf(CMD.BLOCK_STATUS)
    t.is(bs.length, 2)
    t.true(bs.every((r) => r.extended === extended))
    t.deepEqual(server.errors, [])
  })
}

test.serial('block status from a correct server: two contexts, each under its own name', async (t) => {
  const server = await useFake(t, {
    metaContexts: [
      { name: CONTEXT_BASE_ALLOCATION, id: 7 },
      { name: DIRTY, id: 3, extents: (offset, length) => [{ length: 4096n, flags: 1 }, { length: length - 4096n, flags: 0 }] },
    ],
  })
  const h = await openFake(t, server, withContexts(false, [CONTEXT_BASE_ALLOCATION, DIRTY]))
  t.true(h.canMetaContext(DIRTY))
  const map = (await h.blockStatus(KiB64, 0)) as BlockStatus
  t.deepEqual(map[DIRTY], [
    { offset: 0, length: 4096, flags: 1 },
    { offset: 4096, length: KiB64 - 4096, flags: 0 },
  ])
  t.deepEqual(map[CONTEXT_BASE_ALLOCATION], [{ offset: 0, length: KiB64, flags: HOLE_ZERO }])
  t.deepEqual(Object.keys(map).sort(), [CONTEXT_BASE_ALLOCATION, DIRTY].sort())
})

// ---- faults ---------------------------------------------------------------------------------------

interface BsFault {
  title: string
  fake?: FakeOptions
  /** Negotiate extended headers. */
  extended?: boolean
  /** The bytes sent instead of the answer to blockStatus(64 KiB, 0). */
  bad?: (req: NbdRequest, conn: FakeConnection) => Buffer[]
  /** Or: the whole answer to the three held commands (block status, two reads). */
  respond?: (held: NbdRequest[], conn: FakeConnection) => void
  /** Expected codes: the block status call, then two reads pending behind it. */
  codes: string[]
  state: 'ready' | 'dead'
  /** What the failure says, or for a success, what the result must be. */
  message?: RegExp
  result?: BlockStatus
}

const DEAD_EPROTO = ['EPROTO', 'ENOTCONN', 'ENOTCONN']
const OK = ['resolved', 'resolved', 'resolved']
const BASE_ID = 1

/** A 32-bit block status chunk for `req`, in the connection's framing. */
const bs32 = (conn: FakeConnection, req: NbdRequest, id: number, extents: Extent[], done = true, length?: number) =>
  conn.chunk(req, REPLY_TYPE.BLOCK_STATUS, blockStatusPayload(id, extents), { done, length })
/** A 64-bit block status chunk for `req`, in the connection's framing. */
const bs64 = (conn: FakeConnection, req: NbdRequest, id: number, extents: Extent[], done = true, opts: { count?: number; length?: number } = {}) =>
  conn.chunk(req, REPLY_TYPE.BLOCK_STATUS_EXT, blockStatusExtPayload(id, extents, { count: opts.count }), { done, length: opts.length })

const bsFaults: BsFault[] = [
  {
    title: 'a chunk for a context id never negotiated, next to a good one',
    bad: (req, conn) => [bs32(conn, req, 99, [{ length: KiB64, flags: 0 }], false), bs32(conn, req, BASE_ID, [{ length: KiB64, flags: HOLE_ZERO }])],
    codes: DEAD_EPROTO,
    state: 'dead',
    message: /context id 99, which was never negotiated/,
  },
  {
    title: 'a first extent of length 0',
    bad: (req, conn) => [bs32(conn, req, BASE_ID, [{ length: 0, flags: 0 }, { length: KiB64, flags: 0 }])],
    codes: DEAD_EPROTO,
    state: 'dead',
    message: /zero|length 0|0 bytes|empty/i,
  },
  {
    title: 'a zero-length extent after a good one',
    bad: (req, conn) => [bs32(conn, req, BASE_ID, [{ length: 4096, flags: 0 }, { length: 0, flags: 0 }, { length: 4096, flags: HOLE_ZERO }])],
    codes: DEAD_EPROTO,
    state: 'dead',
    message: /zero-length extent \(descriptor 1\)/,
  },
  {
    title: 'an extent past the requested range but inside the export (allowed)',
    bad: (req, conn) => [bs32(conn, req, BASE_ID, [{ length: 4 * KiB64, flags: HOLE_ZERO }])],
    codes: OK,
    state: 'ready',
  },
  {
    title: 'extents past the end of the export',
    bad: (req, conn) => [bs32(conn, req, BASE_ID, [{ length: KiB64, flags: 0 }, { length: 2 * 1024 * 1024, flags: HOLE_ZERO }])],
    codes: DEAD_EPROTO,
    state: 'dead',
    message: /export|beyond|past/,
  },
  {
    title: 'a block status chunk claiming 4 GiB',
    bad: (req, conn) => [bs32(conn, req, BASE_ID, [{ length: KiB64, flags: 0 }], true, 0xffffffff)],
    codes: DEAD_EPROTO,
    state: 'dead',
    message: /4294967295/,
  },
  {
    title: 'a block status chunk whose length is not a whole number of extents',
    bad: (req, conn) => [conn.chunk(req, REPLY_TYPE.BLOCK_STATUS, Buffer.concat([blockStatusPayload(BASE_ID, [{ length: KiB64, flags: 0 }]), Buffer.alloc(4)]), { done: true })],
    codes: DEAD_EPROTO,
    state: 'dead',
    message: /./,
  },
  {
    title: 'a block status chunk with no extents at all',
    bad: (req, conn) => [bs32(conn, req, BASE_ID, [])],
    codes: DEAD_EPROTO,
    state: 'dead',
    message: /./,
  },
  {
    title: 'a 64-bit extent chunk when extended headers were not negotiated',
    bad: (req, conn) => [conn.chunk(req, REPLY_TYPE.BLOCK_STATUS_EXT, blockStatusExtPayload(BASE_ID, [{ length: KiB64, flags: 0 }]), { done: true })],
    codes: DEAD_EPROTO,
    state: 'dead',
    message: /./,
  },
  {
    title: 'block status in reply to a read',
    respond: (held, conn) => {
      // A correct answer to block status, then extents in reply to the first read.
      conn.send(...conn.defaultReply(held[0]!))
      conn.send(bs32(conn, held[1]!, BASE_ID, [{ length: 4096, flags: 0 }]))
    },
    codes: ['resolved', 'EPROTO', 'ENOTCONN'],
    state: 'dead',
    message: /./,
  },
  // extended headers
  {
    title: 'a 64-bit extent of 2^64-1 bytes',
    extended: true,
    bad: (req, conn) => [bs64(conn, req, BASE_ID, [{ length: 2n ** 64n - 1n, flags: 0 }])],
    codes: DEAD_EPROTO,
    state: 'dead',
    message: /past the end of the export/,
  },
  {
    title: 'a 64-bit extent chunk whose count disagrees with its length',
    extended: true,
    bad: (req, conn) => [bs64(conn, req, BASE_ID, [{ length: KiB64, flags: 0 }], true, { count: 1000 })],
    codes: DEAD_EPROTO,
    state: 'dead',
    message: /./,
  },
  {
    title: 'a 32-bit extent chunk when extended headers were negotiated',
    extended: true,
    bad: (req, conn) => [bs32(conn, req, BASE_ID, [{ length: KiB64, flags: 0 }])],
    codes: DEAD_EPROTO,
    state: 'dead',
    message: /./,
  },
  {
    title: 'a 64-bit extent chunk for a context id never negotiated, next to a good one',
    extended: true,
    bad: (req, conn) => [bs64(conn, req, 42, [{ length: KiB64, flags: 0 }], false), bs64(conn, req, BASE_ID, [{ length: KiB64, flags: 0 }])],
    codes: DEAD_EPROTO,
    state: 'dead',
    message: /context id 42, which was never negotiated/,
  },
  {
    title: 'a 64-bit block status chunk claiming 2^64-1 bytes',
    extended: true,
    bad: (req, conn) => [bs64(conn, req, BASE_ID, [{ length: KiB64, flags: 0 }], true, { length: 0xffffffff })],
    codes: DEAD_EPROTO,
    state: 'dead',
    message: /./,
  },
]

for (const f of bsFaults) {
  const outcome = f.state === 'ready' ? 'succeeds, the handle stays ready' : `${f.codes.join('/')}, the handle is dead`
  test.serial(`block status: ${f.title} → ${outcome}`, async (t) => {
    const extended = f.extended ?? false
    const server = await useFake(t, {
      extendedHeaders: extended,
      ...f.fake,
      onCommand: holdThen(3, (held, conn) => {
        if (f.respond) return f.respond(held, conn)
        conn.send(...f.bad!(held[0]!, conn))
        if (f.state === 'ready') for (const req of held.slice(1)) conn.send(...conn.defaultReply(req))
      }),
    })
    const h = await openFake(t, server, withContexts(extended))
    t.is(h.getExtendedHeadersNegotiated(), extended)
    const before = memory()
    const { outcomes, ms } = await settleAll([h.blockStatus(KiB64, 0), h.pread(4096, 8192), h.pread(4096, 16384)])
    t.deepEqual(codesOf(outcomes), f.codes)
    t.true(ms < PROMPT_MS, `the commands took ${ms} ms to settle`)
    const victim = outcomes[f.codes.indexOf('EPROTO')] as Outcome | undefined
    if (victim && !victim.ok) {
      assertNbdError(t, victim.error, 'EPROTO')
      if (f.message) t.regex(messageOf(victim), f.message)
    }
    const first = outcomes[0] as Outcome
    if (first.ok && f.result) t.deepEqual(first.value, f.result)
    if (first.ok && !f.result && f.codes[1] === 'resolved') {
      const extents = (first.value as BlockStatus)[CONTEXT_BASE_ALLOCATION] ?? []
      t.true(extents.length > 0, 'no extents for base:allocation')
      t.is(extents[0]?.offset, 0)
    }
    t.is(h.state, f.state)
    t.is(h.inFlight, 0)
    assertNoBigAllocation(t, before)
    if (f.state === 'ready') {
      const again = (await h.blockStatus(KiB64, 0)) as BlockStatus
      t.deepEqual(again, { [CONTEXT_BASE_ALLOCATION]: [{ offset: 0, length: KiB64, flags: HOLE_ZERO }] })
      t.is(h.state, 'ready')
    } else {
      await expectReject(t, () => h.blockStatus(KiB64, 0), 'EINVAL', 'blockStatus')
    }
    t.deepEqual(server.errors, [])
  })
}

test.serial('block status: a server that offers no context leaves blockStatus refused client-side', async (t) => {
  const server = await useFake(t, { metaContexts: [] })
  const h = await openFake(t, server, withContexts(false))
  t.false(h.canMetaContext(CONTEXT_BASE_ALLOCATION))
  // libnbd refuses block status without a negotiated context (EINVAL under strict mode,
  // ENOTSUP from nbd_block_status otherwise); either way nothing reaches the server.
  await expectReject(t, () => h.blockStatus(KiB64, 0), ['EINVAL', 'ENOTSUP'], 'blockStatus')
  t.is(server.requestsOf(CMD.BLOCK_STATUS).length, 0)
  t.is(h.state, 'ready')
})
