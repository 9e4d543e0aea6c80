//! Deterministic tests of the transmission phase: libnbd's client-side (strict) refusals,
//! request framing, and the reply decoder fed hand-built reply bytes in arbitrary pieces.

use nbd_proto::consts::*;
use nbd_proto::handshake::{BlockSize, ExportInfo, Negotiated, Protocol};
use nbd_proto::transmission::{
    Command, CommandKind, Decoded, Event, Fatal, ReplyDecoder, Session,
};
use nbd_proto::{Errno, Error, Fault};

mod bytes;
use bytes::*;

// ---- sessions and commands ----

fn negotiated(size: u64, flags: u16, block_size: Option<BlockSize>, structured: bool) -> Negotiated {
    Negotiated {
        protocol: Protocol::FixedNewstyle,
        structured_replies: structured,
        extended_headers: false,
        tls: false,
        export: ExportInfo {
            size,
            flags: flags | FLAG_HAS_FLAGS,
            block_size,
            ..ExportInfo::default()
        },
        meta_contexts: Vec::new(),
        meta_valid: true,
    }
}

const EVERYTHING: u16 = FLAG_SEND_FLUSH
    | FLAG_SEND_FUA
    | FLAG_SEND_TRIM
    | FLAG_SEND_WRITE_ZEROES
    | FLAG_SEND_DF
    | FLAG_SEND_CACHE
    | FLAG_SEND_FAST_ZERO;

const MIB: u64 = 1024 * 1024;

fn session(size: u64, flags: u16) -> Session {
    Session::new(negotiated(size, flags, None, true))
}

fn cmd(kind: CommandKind, offset: u64, length: u64, flags: u32) -> Command {
    Command {
        kind,
        offset,
        length,
        flags,
    }
}

#[track_caller]
fn refused(s: &Session, c: Command, strict: u32, errno: Errno) -> Error {
    match s.strict(strict).check(&c) {
        Ok(f) => panic!("{c:?} under strict {strict:#x} passed with flags {f:#x}, expected {errno}"),
        Err(e) => {
            assert_eq!(e.errno(), errno, "{c:?}: {e}");
            assert_eq!(e.fault(), Fault::Usage, "{c:?}: {e}");
            assert!(!e.is_fatal());
            e
        }
    }
}

#[track_caller]
fn passes(s: &Session, c: Command, strict: u32) -> u16 {
    match s.strict(strict).check(&c) {
        Ok(f) => f,
        Err(e) => panic!("{c:?} under strict {strict:#x} was refused: {e}"),
    }
}

/// A structured read (`nbd_pread_structured`): the only read that takes DF.
#[track_caller]
fn structured_read(s: &Session, c: Command, strict: u32) -> std::result::Result<u16, Errno> {
    s.strict(strict).check_submission(&c, true, None).map(|(f, _)| f).map_err(|e| e.errno())
}

use CommandKind::*;

// ---- StrictChecks::check ----

#[test]
fn bounds_are_checked_under_strict_bounds() {
    let s = session(MIB, EVERYTHING);
    // libnbd's errnos: ENOSPC for what modifies the export, EINVAL for the rest.
    for (kind, errno) in [
        (Read, Errno::EINVAL),
        (Write, Errno::ENOSPC),
        (Trim, Errno::ENOSPC),
        (WriteZeroes, Errno::ENOSPC),
        (Cache, Errno::EINVAL),
    ] {
        passes(&s, cmd(kind, MIB - 512, 512, 0), STRICT_MASK);
        let e = refused(&s, cmd(kind, MIB - 512, 513, 0), STRICT_MASK, errno);
        assert!(e.message().contains("out of bounds"), "{e}");
        refused(&s, cmd(kind, MIB, 1, 0), STRICT_MASK, errno);
        // offset + count overflowing 64 bits is out of bounds, not a wrap-around.
        refused(&s, cmd(kind, u64::MAX, 2, 0), STRICT_MASK, errno);
        passes(&s, cmd(kind, MIB, 1, 0), STRICT_MASK & !STRICT_BOUNDS);
        passes(&s, cmd(kind, u64::MAX, 2, 0), STRICT_MASK & !STRICT_BOUNDS);
    }
    // Flush has no range.
    passes(&s, cmd(Flush, 0, 0, 0), STRICT_MASK);
}

#[test]
fn zero_size_is_refused_under_strict_zero_size() {
    let s = session(MIB, EVERYTHING);
    for kind in [Read, Write, Trim, WriteZeroes, Cache] {
        let e = refused(&s, cmd(kind, 0, 0, 0), STRICT_MASK, Errno::EINVAL);
        assert!(e.message().contains("0"), "{e}");
        passes(&s, cmd(kind, 0, 0, 0), STRICT_MASK & !STRICT_ZERO_SIZE);
    }
}

#[test]
fn writes_to_read_only_exports_are_refused_with_eperm() {
    let s = session(MIB, EVERYTHING | FLAG_READ_ONLY);
    for kind in [Write, Trim, WriteZeroes] {
        refused(&s, cmd(kind, 0, 512, 0), STRICT_MASK, Errno::EPERM);
        passes(&s, cmd(kind, 0, 512, 0), STRICT_MASK & !STRICT_COMMANDS);
    }
    for kind in [Read, Cache] {
        passes(&s, cmd(kind, 0, 512, 0), STRICT_MASK);
    }
    passes(&s, cmd(Flush, 0, 0, 0), STRICT_MASK);
}

#[test]
fn unsupported_commands_are_refused_with_einval() {
    let s = session(MIB, 0);
    for (kind, flag) in [
        (Flush, FLAG_SEND_FLUSH),
        (Trim, FLAG_SEND_TRIM),
        (WriteZeroes, FLAG_SEND_WRITE_ZEROES),
        (Cache, FLAG_SEND_CACHE),
    ] {
        let len = if kind == Flush { 0 } else { 512 };
        let e = refused(&s, cmd(kind, 0, len, 0), STRICT_MASK, Errno::EINVAL);
        assert!(e.message().contains("does not support"), "{e}");
        passes(&s, cmd(kind, 0, len, 0), STRICT_MASK & !STRICT_COMMANDS);
        passes(&session(MIB, flag), cmd(kind, 0, len, 0), STRICT_MASK);
    }
    // Reads and writes need no flag.
    passes(&s, cmd(Read, 0, 512, 0), STRICT_MASK);
    passes(&s, cmd(Write, 0, 512, 0), STRICT_MASK);
}

#[test]
fn flags_the_server_does_not_support_are_refused() {
    let none = session(MIB, FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES);
    let e = refused(&none, cmd(Write, 0, 512, CMD_FLAG_FUA as u32), STRICT_MASK, Errno::EINVAL);
    assert!(e.message().contains("FUA"), "{e}");
    refused(&none, cmd(Trim, 0, 512, CMD_FLAG_FUA as u32), STRICT_MASK, Errno::EINVAL);
    assert_eq!(
        passes(&none, cmd(Write, 0, 512, CMD_FLAG_FUA as u32), STRICT_MASK & !STRICT_COMMANDS),
        CMD_FLAG_FUA
    );
    let fua = session(MIB, FLAG_SEND_FUA);
    assert_eq!(passes(&fua, cmd(Write, 0, 512, CMD_FLAG_FUA as u32), STRICT_MASK), CMD_FLAG_FUA);

    refused(
        &none,
        cmd(WriteZeroes, 0, 512, CMD_FLAG_FAST_ZERO as u32),
        STRICT_MASK,
        Errno::EINVAL,
    );
    passes(
        &session(MIB, FLAG_SEND_WRITE_ZEROES | FLAG_SEND_FAST_ZERO),
        cmd(WriteZeroes, 0, 512, CMD_FLAG_FAST_ZERO as u32),
        STRICT_MASK,
    );

    // DF (on a structured read) needs the server's flag and structured replies.
    let df = CMD_FLAG_DF as u32;
    assert_eq!(structured_read(&none, cmd(Read, 0, 512, df), STRICT_MASK), Err(Errno::EINVAL));
    let simple = Session::new(negotiated(MIB, FLAG_SEND_DF, None, false));
    assert_eq!(structured_read(&simple, cmd(Read, 0, 512, df), STRICT_MASK), Err(Errno::EINVAL));
    assert_eq!(structured_read(&session(MIB, FLAG_SEND_DF), cmd(Read, 0, 512, df), STRICT_MASK), Ok(CMD_FLAG_DF));
    // A plain read takes no flag at all (nbd_pread), DF included.
    refused(&session(MIB, FLAG_SEND_DF), cmd(Read, 0, 512, df), STRICT_MASK, Errno::EINVAL);
    // Each flag's support is checked only on the commands libnbd checks it on: without
    // STRICT_FLAGS, FUA on a flush goes to a server that has no FUA, as libnbd sends it.
    let flush_only = session(MIB, FLAG_SEND_FLUSH);
    passes(&flush_only, cmd(Flush, 0, 0, CMD_FLAG_FUA as u32), STRICT_MASK & !STRICT_FLAGS);
    refused(&flush_only, cmd(Write, 0, 512, CMD_FLAG_FUA as u32), STRICT_MASK & !STRICT_FLAGS, Errno::EINVAL);
}

#[test]
fn flags_beyond_16_bits_are_always_refused() {
    let s = session(MIB, EVERYTHING);
    for strict in [STRICT_MASK, 0] {
        for flags in [0x1_0000, 0x8000_0000, u32::MAX] {
            refused(&s, cmd(Read, 0, 512, flags), strict, Errno::EINVAL);
            refused(&s, cmd(Flush, 0, 0, flags), strict, Errno::EINVAL);
        }
    }
}

#[test]
fn flags_invalid_for_the_command_are_refused_under_strict_flags() {
    let s = session(MIB, EVERYTHING);
    let fua = CMD_FLAG_FUA as u32;
    for (kind, bad) in [
        (Read, fua),
        (Read, CMD_FLAG_NO_HOLE as u32),
        (Read, CMD_FLAG_DF as u32),
        (Write, CMD_FLAG_DF as u32),
        (Trim, CMD_FLAG_NO_HOLE as u32),
        (Flush, fua),
        (Cache, fua),
        (WriteZeroes, CMD_FLAG_DF as u32),
        (Read, 0x8000),
        (Write, 0x40),
    ] {
        let len = if kind == Flush { 0 } else { 512 };
        let e = refused(&s, cmd(kind, 0, len, bad), STRICT_MASK, Errno::EINVAL);
        assert!(e.message().contains("not valid"), "{e}");
        // Without STRICT_FLAGS the flags go to the server as they are.
        assert_eq!(passes(&s, cmd(kind, 0, len, bad), STRICT_MASK & !STRICT_FLAGS), bad as u16);
    }
    assert_eq!(structured_read(&s, cmd(Read, 0, 512, CMD_FLAG_DF as u32), STRICT_MASK), Ok(CMD_FLAG_DF));
    for (kind, good) in [
        (Write, CMD_FLAG_FUA),
        (Trim, CMD_FLAG_FUA),
        (WriteZeroes, CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO),
    ] {
        assert_eq!(passes(&s, cmd(kind, 0, 512, good as u32), STRICT_MASK), good);
    }
}

#[test]
fn alignment_is_checked_when_the_minimum_block_size_exceeds_one() {
    let bs = |minimum| {
        Some(BlockSize {
            minimum,
            preferred: 4096,
            maximum: 32 * MIB as u32,
        })
    };
    let s = Session::new(negotiated(MIB, EVERYTHING, bs(512), true));
    for kind in [Read, Write, Trim, WriteZeroes, Cache] {
        passes(&s, cmd(kind, 1024, 512, 0), STRICT_MASK);
        let e = refused(&s, cmd(kind, 100, 512, 0), STRICT_MASK, Errno::EINVAL);
        assert!(e.message().contains("aligned"), "{e}");
        refused(&s, cmd(kind, 512, 100, 0), STRICT_MASK, Errno::EINVAL);
        passes(&s, cmd(kind, 100, 100, 0), STRICT_MASK & !STRICT_ALIGN);
    }
    let one = Session::new(negotiated(MIB, EVERYTHING, bs(1), true));
    passes(&one, cmd(Read, 1, 3, 0), STRICT_MASK);
    // No block size information: nothing to align to.
    passes(&session(MIB, EVERYTHING), cmd(Read, 1, 3, 0), STRICT_MASK);
}

#[test]
fn payload_limits() {
    let big = 1u64 << 40;
    let plain = session(big, EVERYTHING);
    // Above 64 MiB: ERANGE whatever the strict mode.
    for kind in [Read, Write] {
        for strict in [STRICT_MASK, 0] {
            let e = refused(&plain, cmd(kind, 0, 64 * MIB + 1, 0), strict, Errno::ERANGE);
            assert!(e.message().contains("too large"), "{e}");
        }
    }
    // Above the payload maximum (32 MiB without block size information): STRICT_PAYLOAD,
    // which limits what the client sends (writes); reads go up to 64 MiB (as libnbd).
    refused(&plain, cmd(Write, 0, 32 * MIB + 512, 0), STRICT_MASK, Errno::ERANGE);
    refused(&plain, cmd(Write, 0, 64 * MIB, 0), STRICT_MASK, Errno::ERANGE);
    passes(&plain, cmd(Write, 0, 64 * MIB, 0), STRICT_MASK & !STRICT_PAYLOAD);
    passes(&plain, cmd(Read, 0, 32 * MIB + 512, 0), STRICT_MASK);
    passes(&plain, cmd(Read, 0, 64 * MIB, 0), STRICT_MASK);
    // A server maximum of 64 MiB raises the payload maximum.
    let wide = Session::new(negotiated(
        big,
        EVERYTHING,
        Some(BlockSize {
            minimum: 1,
            preferred: 4096,
            maximum: 64 * MIB as u32,
        }),
        true,
    ));
    passes(&wide, cmd(Read, 0, 64 * MIB, 0), STRICT_MASK);
    // A server maximum below 1 MiB is clamped up to 1 MiB.
    let narrow = Session::new(negotiated(
        big,
        EVERYTHING,
        Some(BlockSize {
            minimum: 512,
            preferred: 4096,
            maximum: 64 * 1024,
        }),
        true,
    ));
    passes(&narrow, cmd(Write, 0, MIB, 0), STRICT_MASK);
    refused(&narrow, cmd(Write, 0, MIB + 512, 0), STRICT_MASK, Errno::ERANGE);
    // Other commands are not payload-limited, but need 32 bits without extended headers.
    passes(&plain, cmd(Trim, 0, 1 << 31, 0), STRICT_MASK);
    refused(&plain, cmd(Trim, 0, 1 << 32, 0), 0, Errno::ERANGE);
}

#[test]
fn strict_mode_off_passes_what_the_server_may_judge() {
    let s = Session::new(negotiated(
        4096,
        FLAG_READ_ONLY,
        Some(BlockSize {
            minimum: 512,
            preferred: 4096,
            maximum: 4096,
        }),
        false,
    ));
    for kind in [Write, Trim, WriteZeroes, Cache, Read] {
        passes(&s, cmd(kind, 3, 0, 0x8000), 0);
        passes(&s, cmd(kind, 1 << 20, 7, CMD_FLAG_FUA as u32), 0);
    }
    passes(&s, cmd(Flush, 0, 0, CMD_FLAG_FUA as u32), 0);
}

// ---- encode_request ----

#[test]
fn requests_are_28_byte_compact_headers() {
    let s = session(1 << 40, EVERYTHING);
    assert_eq!(s.request_header_len(), 28);
    let mut out = vec![0xee];
    let c = cmd(Write, 0x1122_3344_5566_7788, 0x99aa_bbcc, CMD_FLAG_FUA as u32);
    s.encode_request(0x0102_0304_0506_0708, &c, CMD_FLAG_FUA, &mut out);
    assert_eq!(
        out,
        [
            0xee, // what was there is kept
            0x25, 0x60, 0x95, 0x13, // NBD_REQUEST_MAGIC
            0x00, 0x01, // flags: FUA
            0x00, 0x01, // NBD_CMD_WRITE
            1, 2, 3, 4, 5, 6, 7, 8, // cookie
            0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, // offset
            0x99, 0xaa, 0xbb, 0xcc, // length
        ]
    );

    let mut out = Vec::new();
    s.encode_request(u64::MAX, &cmd(Flush, 0, 0, 0), 0, &mut out);
    let mut want = vec![0x25, 0x60, 0x95, 0x13, 0, 0, 0, 3];
    want.extend([0xff; 8]);
    want.extend([0; 12]);
    assert_eq!(out, want);

    let mut out = Vec::new();
    s.encode_request(9, &cmd(Read, 512, 4096, 0), CMD_FLAG_DF, &mut out);
    assert_eq!(out.len(), 28);
    assert_eq!(&out[4..8], &[0, 4, 0, 0]);
    let mut out = Vec::new();
    s.encode_request(9, &cmd(Disconnect, 0, 0, 0), 0, &mut out);
    assert_eq!(&out[6..8], &[0, 2]);
    for (kind, code) in [(Trim, 4), (Cache, 5), (WriteZeroes, 6)] {
        let mut out = Vec::new();
        s.encode_request(1, &cmd(kind, 0, 1, 0), 0, &mut out);
        assert_eq!(&out[6..8], &[0, code]);
    }
}

#[test]
fn extended_requests_are_32_bytes_with_a_64_bit_length() {
    let mut n = negotiated(1 << 40, EVERYTHING, None, true);
    n.extended_headers = true;
    let s = Session::new(n);
    assert_eq!(s.request_header_len(), 32);
    let mut out = Vec::new();
    s.encode_request(5, &cmd(Trim, 7, 1 << 33, 0), 0, &mut out);
    let mut want = vec![0x21, 0xe4, 0x1c, 0x71, 0, 0, 0, 4];
    want.extend(5u64.to_be_bytes());
    want.extend(7u64.to_be_bytes());
    want.extend((1u64 << 33).to_be_bytes());
    assert_eq!(out, want);
    // With extended headers, large non-data commands pass.
    passes(&s, cmd(Trim, 0, 1 << 33, 0), STRICT_MASK);
}

// ---- reply bytes (builders in tests/bytes) ----

const DONE: u16 = REPLY_FLAG_DONE;

// ---- driving the decoder ----

/// What the reader did, in order.
#[derive(Debug, Clone, PartialEq)]
enum Ev {
    Data { cookie: u64, at: usize, bytes: Vec<u8> },
    Hole { cookie: u64, at: usize, len: usize },
    Done { cookie: u64, user: u32, result: Result<(), Error> },
}

struct Outcome {
    events: Vec<Ev>,
    fatal: Option<Fatal<u32>>,
    /// Input left undecoded at the end.
    rest: Vec<u8>,
}

/// A decoder with `cmds` registered (user data: cookie * 10).
fn decoder(structured: bool, cmds: &[(u64, Command)]) -> ReplyDecoder<u32> {
    let mut d = ReplyDecoder::new(&negotiated(1 << 40, EVERYTHING, None, structured));
    for (cookie, c) in cmds {
        d.register(*cookie, *c, (*cookie as u32) * 10);
    }
    d
}

/// Plays the reader of the module documentation, with `input` arriving `piece` bytes at a
/// time.
fn run(d: &mut ReplyDecoder<u32>, input: &[u8], piece: usize) -> Outcome {
    let mut pending: Vec<u8> = Vec::new();
    let mut events = Vec::new();
    let mut payload: Option<(u64, usize, usize, Vec<u8>)> = None;
    for part in input.chunks(piece.max(1)) {
        pending.extend_from_slice(part);
        loop {
            if let Some((cookie, at, len, mut got)) = payload.take() {
                let n = (len - got.len()).min(pending.len());
                got.extend(pending.drain(..n));
                if got.len() < len {
                    payload = Some((cookie, at, len, got));
                    break;
                }
                events.push(Ev::Data {
                    cookie,
                    at,
                    bytes: got,
                });
                d.payload_done();
                continue;
            }
            let Decoded { consumed, event } = match d.decode(&pending) {
                Ok(decoded) => decoded,
                Err(fatal) => {
                    return Outcome {
                        events,
                        fatal: Some(fatal),
                        rest: pending,
                    }
                }
            };
            if consumed == 0 && event.is_none() {
                break;
            }
            assert!(consumed <= pending.len());
            pending.drain(..consumed);
            match event {
                Some(Event::ReadData {
                    cookie,
                    buf_offset,
                    len,
                }) => payload = Some((cookie, buf_offset, len, Vec::new())),
                Some(Event::ReadHole {
                    cookie,
                    buf_offset,
                    len,
                }) => events.push(Ev::Hole {
                    cookie,
                    at: buf_offset,
                    len,
                }),
                Some(Event::Done {
                    cookie,
                    user,
                    result,
                    ..
                }) => events.push(Ev::Done {
                    cookie,
                    user,
                    result,
                }),
                None => {}
            }
        }
    }
    assert!(payload.is_none(), "input ended inside a read payload");
    Outcome {
        events,
        fatal: None,
        rest: pending,
    }
}

/// Runs `input` whole and in pieces of several sizes on fresh decoders; all must agree.
fn run_all(structured: bool, cmds: &[(u64, Command)], input: &[u8]) -> Vec<Ev> {
    let mut d = decoder(structured, cmds);
    let whole = run(&mut d, input, input.len());
    assert!(whole.fatal.is_none(), "fatal: {:?}", whole.fatal.map(|f| f.error));
    assert!(whole.rest.is_empty(), "bytes left: {:?}", whole.rest);
    for piece in [1, 2, 3, 5, 7, 13, 64] {
        let mut d = decoder(structured, cmds);
        let split = run(&mut d, input, piece);
        assert!(split.fatal.is_none(), "piece {piece}: fatal {:?}", split.fatal.map(|f| f.error));
        assert_eq!(split.events, whole.events, "piece {piece} changed the events");
        assert!(split.rest.is_empty());
        assert!(d.is_empty(), "every command finished");
    }
    assert!(d.is_empty(), "every command finished");
    whole.events
}

/// Runs `input` expecting a protocol violation, whole and byte by byte.
#[track_caller]
fn run_fatal(structured: bool, cmds: &[(u64, Command)], input: &[u8]) -> (Fatal<u32>, Vec<Ev>, ReplyDecoder<u32>) {
    let mut d = decoder(structured, cmds);
    let out = run(&mut d, input, input.len());
    let mut d1 = decoder(structured, cmds);
    let bytewise = run(&mut d1, input, 1);
    let fatal = out.fatal.expect("a protocol violation");
    let fatal1 = bytewise.fatal.expect("a protocol violation, byte by byte");
    assert_eq!(fatal.error, fatal1.error);
    assert_eq!(fatal.command, fatal1.command);
    assert_eq!(out.events, bytewise.events);
    assert_eq!(fatal.error.errno(), Errno::EPROTO, "{}", fatal.error);
    assert_eq!(fatal.error.fault(), Fault::Protocol);
    assert!(fatal.error.is_fatal());
    (fatal, out.events, d)
}

fn done_ok(cookie: u64) -> Ev {
    Ev::Done {
        cookie,
        user: cookie as u32 * 10,
        result: Ok(()),
    }
}

#[track_caller]
fn done_err(ev: &Ev, cookie: u64, errno: Errno) -> Error {
    match ev {
        Ev::Done {
            cookie: c,
            user,
            result: Err(e),
        } if *c == cookie => {
            assert_eq!(*user, cookie as u32 * 10);
            assert_eq!(e.errno(), errno, "{e}");
            assert_eq!(e.fault(), Fault::Server, "{e}");
            assert!(!e.is_fatal());
            e.clone()
        }
        other => panic!("expected command {cookie} to fail with {errno}, got {other:?}"),
    }
}

fn read(offset: u64, len: u64) -> Command {
    cmd(Read, offset, len, 0)
}

fn write(offset: u64, len: u64) -> Command {
    cmd(Write, offset, len, 0)
}

// ---- simple replies ----

#[test]
fn simple_replies_complete_commands() {
    let cmds = [(1, write(0, 512)), (2, cmd(Flush, 0, 0, 0)), (3, cmd(Trim, 0, 512, 0))];
    let mut input = simple_reply(0, 2);
    input.extend(simple_reply(0, 3));
    input.extend(simple_reply(0, 1));
    for structured in [false, true] {
        let events = run_all(structured, &cmds, &input);
        assert_eq!(events, vec![done_ok(2), done_ok(3), done_ok(1)]);
    }
}

#[test]
fn simple_error_replies_map_errnos_like_libnbd() {
    for (number, errno) in [
        (1, Errno::EPERM),
        (5, Errno::EIO),
        (12, Errno::ENOMEM),
        (22, Errno::EINVAL),
        (28, Errno::ENOSPC),
        (75, Errno::EOVERFLOW),
        (95, Errno::ENOTSUP),
        (108, Errno::ESHUTDOWN),
        // Not NBD error values: EINVAL.
        (2, Errno::EINVAL),
        (38, Errno::EINVAL),
        (u32::MAX, Errno::EINVAL),
    ] {
        let events = run_all(false, &[(4, write(4096, 512))], &simple_reply(number, 4));
        let e = done_err(&events[0], 4, errno);
        assert!(e.message().contains("NBD_CMD_WRITE"), "{e}");
        assert!(e.message().contains("4096"), "{e}");
    }
}

#[test]
fn simple_read_delivers_its_data_then_completes() {
    let data: Vec<u8> = (0..=255).cycle().take(1000).collect();
    let mut input = simple_reply(0, 7);
    input.extend(&data);
    input.extend(simple_reply(0, 8));
    let events = run_all(false, &[(7, read(5000, 1000)), (8, write(0, 1))], &input);
    assert_eq!(
        events,
        vec![
            Ev::Data {
                cookie: 7,
                at: 0,
                bytes: data
            },
            done_ok(7),
            done_ok(8),
        ]
    );

    // Step by step: ReadData, payload_done, then Done with nothing consumed.
    let mut d = decoder(false, &[(7, read(5000, 1000))]);
    let header = simple_reply(0, 7);
    let got = d.decode(&header).unwrap();
    assert_eq!(got.consumed, 16);
    assert!(matches!(
        got.event,
        Some(Event::ReadData {
            cookie: 7,
            buf_offset: 0,
            len: 1000
        })
    ));
    d.payload_done();
    let got = d.decode(&[]).unwrap();
    assert_eq!(got.consumed, 0);
    assert!(matches!(
        got.event,
        Some(Event::Done {
            cookie: 7,
            user: 70,
            result: Ok(()),
            ..
        })
    ));
    assert!(d.is_empty());
    let got = d.decode(&[]).unwrap();
    assert!(got.consumed == 0 && got.event.is_none());
}

#[test]
fn simple_read_error_carries_no_data() {
    let mut input = simple_reply(5, 1);
    input.extend(simple_reply(0, 2));
    for structured in [false, true] {
        let events = run_all(structured, &[(1, read(0, 4096)), (2, write(0, 1))], &input);
        assert_eq!(events.len(), 2);
        done_err(&events[0], 1, Errno::EIO);
        assert_eq!(events[1], done_ok(2));
    }
}

#[test]
#[should_panic(expected = "payload_done")]
fn decoding_before_payload_done_is_a_driver_bug() {
    let mut d = decoder(false, &[(1, read(0, 10))]);
    let got = d.decode(&simple_reply(0, 1)).unwrap();
    assert!(matches!(got.event, Some(Event::ReadData { .. })));
    let _ = d.decode(&[0; 10]);
}

// ---- structured replies ----

#[test]
fn structured_offset_data_and_done() {
    let mut input = data_chunk(0, 3, 8192 + 3, b"hello");
    input.extend(data_chunk(DONE, 3, 8192, b"abc"));
    let events = run_all(true, &[(3, read(8192, 8))], &input);
    assert_eq!(
        events,
        vec![
            Ev::Data {
                cookie: 3,
                at: 3,
                bytes: b"hello".to_vec()
            },
            Ev::Data {
                cookie: 3,
                at: 0,
                bytes: b"abc".to_vec()
            },
            done_ok(3),
        ]
    );
    // The data chunk is announced after its header and offset: 28 bytes.
    let mut d = decoder(true, &[(3, read(8192, 8))]);
    let got = d.decode(&input).unwrap();
    assert_eq!(got.consumed, 28);
}

#[test]
fn structured_offset_hole() {
    let first = hole_chunk(0, 3, 8192, 1024);
    let last = hole_chunk(DONE, 3, 8192 + 1024, 2048);
    let events = run_all(true, &[(3, read(8192, 3072))], &[first.clone(), last.clone()].concat());
    assert_eq!(
        events,
        vec![
            Ev::Hole {
                cookie: 3,
                at: 0,
                len: 1024
            },
            Ev::Hole {
                cookie: 3,
                at: 1024,
                len: 2048
            },
            done_ok(3),
        ]
    );
    // The final hole's Done comes with nothing consumed.
    let mut d = decoder(true, &[(3, read(8192, 3072))]);
    assert_eq!(d.decode(&first).unwrap().consumed, first.len());
    assert_eq!(d.decode(&last).unwrap().consumed, last.len());
    let got = d.decode(&[]).unwrap();
    assert_eq!(got.consumed, 0);
    assert!(matches!(got.event, Some(Event::Done { cookie: 3, .. })));
}

#[test]
fn structured_error_with_message() {
    let input = error_chunk(DONE, 9, 5, "bad sector on disk 3");
    let events = run_all(true, &[(9, read(0, 512))], &input);
    let e = done_err(&events[0], 9, Errno::EIO);
    assert!(e.message().contains("bad sector on disk 3"), "{e}");
    assert_eq!(events.len(), 1);

    // For a write, errno mapping as for simple replies.
    let events = run_all(true, &[(2, write(0, 512))], &error_chunk(DONE, 2, 28, ""));
    done_err(&events[0], 2, Errno::ENOSPC);
    let events = run_all(true, &[(2, write(0, 512))], &error_chunk(DONE, 2, 2, "x"));
    done_err(&events[0], 2, Errno::EINVAL);
}

#[test]
fn structured_error_offset() {
    let input = error_offset_chunk(DONE, 4, 5, "media", 4096 + 700);
    let events = run_all(true, &[(4, read(4096, 1024))], &input);
    let e = done_err(&events[0], 4, Errno::EIO);
    assert!(e.message().contains("4796"), "{e}");
    assert!(e.message().contains("media"), "{e}");
}

#[test]
fn unknown_error_chunk_types_still_fail_the_command() {
    let input = chunk(DONE, 0x8000 | 0x55, 4, &error_payload(1, "odd"));
    let events = run_all(true, &[(4, read(0, 1024))], &input);
    let e = done_err(&events[0], 4, Errno::EPERM);
    assert!(e.message().contains("odd"), "{e}");
}

#[test]
fn structured_none_completes() {
    // A read of 0 bytes has no data to cover (strict zero-size off).
    let events = run_all(true, &[(1, write(0, 1)), (2, read(0, 0))], &[none_chunk(2), none_chunk(1)].concat());
    assert_eq!(events, vec![done_ok(2), done_ok(1)]);
}

#[test]
fn a_structured_read_that_misses_or_repeats_bytes_fails_with_eio_and_decoding_goes_on() {
    // As libnbd: a read the server ends without error must have been covered exactly by
    // data and holes; otherwise EIO for that read, and the connection continues.
    let cases: [(Vec<u8>, &str); 4] = [
        (none_chunk(1), "covered only 0 of 4096 bytes"),
        ([data_chunk(0, 1, 0, &[1; 2048]), none_chunk(1)].concat(), "covered only 2048 of 4096 bytes"),
        (
            [hole_chunk(0, 1, 0, 1024), data_chunk(DONE, 1, 2048, &[1; 1024])].concat(),
            "covered only 2048 of 4096 bytes",
        ),
        (
            [data_chunk(0, 1, 0, &[1; 2048]), hole_chunk(0, 1, 0, 2048), data_chunk(DONE, 1, 2048, &[2; 2048])].concat(),
            "6144 bytes of data and holes for 4096 requested",
        ),
    ];
    for (input, says) in cases {
        let mut all = input.clone();
        all.extend(simple_reply(0, 2));
        let events = run_all(true, &[(1, read(0, 4096)), (2, write(0, 1))], &all);
        let e = done_err(events.iter().rev().nth(1).unwrap(), 1, Errno::EIO);
        assert!(e.message().contains(says), "{e}");
        assert!(e.message().contains("NBD_CMD_READ at offset 0 (length 4096)"), "{e}");
        assert_eq!(events.last(), Some(&done_ok(2)), "the next reply is still decoded");
    }
    // A server error is reported as such, not as missing data.
    let events = run_all(true, &[(1, read(0, 4096))], &error_chunk(DONE, 1, 1, "no"));
    let e = done_err(&events[0], 1, Errno::EPERM);
    assert!(!e.message().contains("covered"), "{e}");
    // Data and holes that cover the read exactly, in any order, succeed.
    let input = [hole_chunk(0, 1, 3072, 1024), data_chunk(0, 1, 0, &[1; 3072]), none_chunk(1)].concat();
    let events = run_all(true, &[(1, read(0, 4096))], &input);
    assert_eq!(events.last(), Some(&done_ok(1)));
}

#[test]
fn several_chunks_then_done_interleaved_between_commands() {
    let mut input = Vec::new();
    input.extend(data_chunk(0, 1, 0, &[1; 100]));
    input.extend(hole_chunk(0, 2, 1000, 50));
    input.extend(hole_chunk(0, 1, 100, 100));
    input.extend(simple_reply(0, 3));
    input.extend(data_chunk(0, 2, 1050, &[2; 50]));
    input.extend(data_chunk(0, 1, 200, &[3; 56]));
    input.extend(none_chunk(1));
    input.extend(data_chunk(DONE, 2, 1100, &[4; 10]));
    let cmds = [(1, read(0, 256)), (2, read(1000, 110)), (3, write(0, 8))];
    let events = run_all(true, &cmds, &input);
    assert_eq!(
        events,
        vec![
            Ev::Data { cookie: 1, at: 0, bytes: vec![1; 100] },
            Ev::Hole { cookie: 2, at: 0, len: 50 },
            Ev::Hole { cookie: 1, at: 100, len: 100 },
            done_ok(3),
            Ev::Data { cookie: 2, at: 50, bytes: vec![2; 50] },
            Ev::Data { cookie: 1, at: 200, bytes: vec![3; 56] },
            done_ok(1),
            Ev::Data { cookie: 2, at: 100, bytes: vec![4; 10] },
            done_ok(2),
        ]
    );
}

#[test]
fn the_first_error_wins_and_later_data_is_still_consumed() {
    let mut input = Vec::new();
    input.extend(data_chunk(0, 5, 0, &[9; 10]));
    input.extend(error_chunk(0, 5, 5, "first"));
    input.extend(data_chunk(0, 5, 10, &[8; 10]));
    input.extend(error_offset_chunk(0, 5, 28, "second", 30));
    input.extend(hole_chunk(0, 5, 20, 10));
    input.extend(none_chunk(5));
    input.extend(simple_reply(0, 6));
    let events = run_all(true, &[(5, read(0, 64)), (6, write(0, 1))], &input);
    assert_eq!(events.len(), 5, "{events:?}");
    assert_eq!(events[0], Ev::Data { cookie: 5, at: 0, bytes: vec![9; 10] });
    assert_eq!(events[1], Ev::Data { cookie: 5, at: 10, bytes: vec![8; 10] });
    assert_eq!(events[2], Ev::Hole { cookie: 5, at: 20, len: 10 });
    let e = done_err(&events[3], 5, Errno::EIO);
    assert!(e.message().contains("first"), "{e}");
    assert!(!e.message().contains("second"), "{e}");
    assert_eq!(events[4], done_ok(6));
}

#[test]
fn nothing_is_consumed_until_a_whole_unit_is_there() {
    let r = read(4096, 4096);
    // (unit, bytes consumed once it is all there)
    let units: Vec<(Vec<u8>, usize, bool)> = vec![
        (simple_reply(0, 1), 16, false),
        (simple_reply(5, 1), 16, true),
        (none_chunk(1), 20, true),
        (hole_chunk(DONE, 1, 4096, 10), 32, true),
        (error_chunk(DONE, 1, 5, "message text"), 20 + 6 + 12, true),
        (error_offset_chunk(0, 1, 5, "m", 4100), 20 + 6 + 1 + 8, true),
        (data_chunk(DONE, 1, 4096, &[7; 40]), 28, true),
    ];
    for (unit, consumed, structured) in units {
        let mut d = decoder(structured, &[(1, r)]);
        for k in 0..consumed {
            let got = d.decode(&unit[..k]).unwrap_or_else(|f| {
                panic!("prefix {k} of {unit:?} is fatal: {}", f.error)
            });
            assert_eq!(got.consumed, 0, "prefix {k} of {unit:?}");
            assert!(got.event.is_none(), "prefix {k} of {unit:?}");
        }
        let got = d.decode(&unit).unwrap();
        assert_eq!(got.consumed, consumed, "{unit:?}");
        assert_eq!(d.len(), 1 - got.event.iter().filter(|e| matches!(e, Event::Done { .. })).count());
    }
}

// ---- protocol faults ----

#[test]
fn reply_to_an_unknown_cookie_blames_the_oldest_command() {
    let cmds = [(1, write(0, 1)), (2, read(0, 10))];
    let (f, _, mut d) = run_fatal(false, &cmds, &simple_reply(0, 99));
    assert!(f.error.message().contains("99"), "{}", f.error);
    assert_eq!(f.command, Some((1, 10)));
    assert_eq!(d.take_all(), vec![(2, 20)]);
    assert!(d.is_empty());

    let (f, _, _) = run_fatal(true, &cmds, &none_chunk(98));
    assert_eq!(f.command, Some((1, 10)));
    // A cookie that has already been answered is unknown; the oldest left takes the blame.
    let mut input = simple_reply(0, 1);
    input.extend(simple_reply(0, 1));
    let (f, events, mut d) = run_fatal(false, &cmds, &input);
    assert_eq!(events, vec![done_ok(1)]);
    assert_eq!(f.command, Some((2, 20)));
    assert!(d.take_all().is_empty());
    // Cookies, not the order of registration, tell which is oldest.
    let later_first = [(7, read(0, 10)), (3, write(0, 1))];
    let (f, _, mut d) = run_fatal(false, &later_first, &simple_reply(0, 99));
    assert_eq!(f.command, Some((3, 30)));
    assert_eq!(d.take_all(), vec![(7, 70)]);
}

#[test]
fn unknown_magic_blames_the_oldest_command() {
    let mut input = simple_reply(0, 1);
    input[0] = 0x12;
    let (f, _, mut d) = run_fatal(true, &[(1, write(0, 1)), (2, write(0, 1))], &input);
    assert_eq!(f.command, Some((1, 10)));
    assert!(f.error.message().contains("magic"), "{}", f.error);
    assert_eq!(d.take_all(), vec![(2, 20)]);
    // With nothing in flight there is nobody to blame.
    let (f, _, _) = run_fatal(true, &[], &input);
    assert!(f.command.is_none());
    // Commands the driver spares (their callers stopped waiting) are passed over.
    let mut d = decoder(true, &[(1, write(0, 1)), (2, write(0, 1)), (3, read(0, 10))]);
    d.spare_from_blame(|user| *user < 30);
    let f = d.decode(&input).expect_err("a bad magic");
    assert_eq!(f.command, Some((3, 30)));
    let mut d = decoder(true, &[(1, write(0, 1))]);
    d.spare_from_blame(|_| true);
    assert!(d.decode(&input).expect_err("a bad magic").command.is_none());
}

#[test]
fn structured_reply_when_not_negotiated_blames_its_command() {
    let cmds = [(1, read(0, 512)), (2, write(0, 1))];
    let (f, _, mut d) = run_fatal(false, &cmds, &none_chunk(1));
    assert_eq!(f.command, Some((1, 10)));
    assert!(f.error.message().contains("not negotiated"), "{}", f.error);
    assert_eq!(d.take_all(), vec![(2, 20)]);
    // An unknown cookie in that framing blames the oldest command.
    let (f, _, _) = run_fatal(false, &cmds, &none_chunk(77));
    assert_eq!(f.command, Some((1, 10)));
}

#[test]
fn huge_error_chunk_is_refused_before_its_bytes_arrive() {
    let header = chunk_header(DONE, REPLY_TYPE_ERROR, 1, u32::MAX);
    let (f, _, mut d) = run_fatal(true, &[(1, read(0, 512)), (2, write(0, 1))], &header);
    assert_eq!(f.command, Some((1, 10)));
    assert!(f.error.message().contains(&u32::MAX.to_string()), "{}", f.error);
    assert_eq!(d.take_all(), vec![(2, 20)]);
    // Just past the limit too, and for holes and NONE.
    for kind in [REPLY_TYPE_ERROR_OFFSET, REPLY_TYPE_OFFSET_HOLE, REPLY_TYPE_NONE] {
        let header = chunk_header(0, kind, 1, MAX_CHUNK_METADATA + 1);
        let (f, _, _) = run_fatal(true, &[(1, read(0, 512))], &header);
        assert_eq!(f.command, Some((1, 10)));
    }
}

#[test]
fn data_outside_the_requested_range_is_fatal() {
    let r = read(1000, 100);
    for (offset, len) in [(1050, 100), (900, 10), (999, 2), (1100, 1), (u64::MAX - 4, 20)] {
        // Only the header and offset: the decision needs no payload.
        let mut input = chunk_header(0, REPLY_TYPE_OFFSET_DATA, 1, 8 + len);
        input.extend(offset.to_be_bytes());
        let (f, events, _) = run_fatal(true, &[(1, r)], &input);
        assert!(events.is_empty());
        assert_eq!(f.command, Some((1, 10)), "offset {offset} len {len}");
        assert!(f.error.message().contains("outside"), "{}", f.error);
    }
    for (offset, len) in [(1050, 51), (990, 20), (1100, 1)] {
        let (f, _, _) = run_fatal(true, &[(1, r)], &hole_chunk(0, 1, offset, len));
        assert_eq!(f.command, Some((1, 10)));
    }
    let (f, _, _) = run_fatal(true, &[(1, r)], &error_offset_chunk(DONE, 1, 5, "", 1100));
    assert_eq!(f.command, Some((1, 10)));
}

#[test]
fn data_chunk_without_data_is_fatal() {
    for length in [0u32, 4, 8] {
        let mut input = chunk_header(DONE, REPLY_TYPE_OFFSET_DATA, 1, length);
        input.extend(0u64.to_be_bytes());
        let (f, _, _) = run_fatal(true, &[(1, read(0, 512))], &input);
        assert_eq!(f.command, Some((1, 10)));
    }
}

#[test]
fn hole_faults_are_fatal() {
    let r = read(0, 512);
    let (f, _, _) = run_fatal(true, &[(1, r)], &hole_chunk(DONE, 1, 0, 0));
    assert_eq!(f.command, Some((1, 10)));
    assert!(f.error.message().contains("length 0"), "{}", f.error);
    // A hole chunk must be 12 bytes.
    let (f, _, _) = run_fatal(true, &[(1, r)], &chunk(DONE, REPLY_TYPE_OFFSET_HOLE, 1, &[0; 16]));
    assert_eq!(f.command, Some((1, 10)));
}

#[test]
fn none_without_done_is_fatal() {
    let (f, _, _) = run_fatal(true, &[(1, write(0, 1))], &chunk(0, REPLY_TYPE_NONE, 1, &[]));
    assert_eq!(f.command, Some((1, 10)));
    let (f, _, _) = run_fatal(true, &[(1, write(0, 1))], &chunk(DONE, REPLY_TYPE_NONE, 1, &[0; 4]));
    assert_eq!(f.command, Some((1, 10)));
}

#[test]
fn simple_reply_with_data_to_a_structured_read_is_fatal() {
    let mut input = simple_reply(0, 1);
    input.extend([0; 512]);
    let (f, events, mut d) = run_fatal(true, &[(1, read(0, 512)), (2, write(0, 1))], &input);
    assert!(events.is_empty());
    assert_eq!(f.command, Some((1, 10)));
    assert_eq!(d.take_all(), vec![(2, 20)]);
}

#[test]
fn error_chunk_faults_are_fatal() {
    let r = read(0, 512);
    // Message longer than the chunk.
    let mut p = 5u32.to_be_bytes().to_vec();
    p.extend(100u16.to_be_bytes());
    p.extend(b"short");
    let (f, _, _) = run_fatal(true, &[(1, r)], &chunk(DONE, REPLY_TYPE_ERROR, 1, &p));
    assert_eq!(f.command, Some((1, 10)));
    // Shorter than the error and length fields.
    let (f, _, _) = run_fatal(true, &[(1, r)], &chunk(DONE, REPLY_TYPE_ERROR, 1, &[0, 0, 0, 5]));
    assert_eq!(f.command, Some((1, 10)));
    // Error number 0.
    let (f, _, _) = run_fatal(true, &[(1, r)], &error_chunk(DONE, 1, 0, "not an error"));
    assert_eq!(f.command, Some((1, 10)));
    assert!(f.error.message().contains('0'), "{}", f.error);
    // Trailing bytes after the message of NBD_REPLY_TYPE_ERROR.
    let mut p = error_payload(5, "m");
    p.push(0);
    let (f, _, _) = run_fatal(true, &[(1, r)], &chunk(DONE, REPLY_TYPE_ERROR, 1, &p));
    assert_eq!(f.command, Some((1, 10)));
}

#[test]
fn chunks_invalid_for_the_command_are_fatal() {
    // Read data or a hole in reply to a write.
    let (f, _, _) = run_fatal(true, &[(1, write(0, 512))], &data_chunk(DONE, 1, 0, &[1; 4]));
    assert_eq!(f.command, Some((1, 10)));
    let (f, _, _) = run_fatal(true, &[(1, write(0, 512))], &hole_chunk(DONE, 1, 0, 4));
    assert_eq!(f.command, Some((1, 10)));
    // Block status (never asked for) and unknown non-error types.
    for kind in [REPLY_TYPE_BLOCK_STATUS, 3, 0x7fff] {
        let (f, _, _) = run_fatal(true, &[(1, read(0, 512))], &chunk(DONE, kind, 1, &[0; 8]));
        assert_eq!(f.command, Some((1, 10)));
    }
}

#[test]
fn take_all_returns_every_remaining_command() {
    let mut d = decoder(true, &[(1, read(0, 10)), (2, write(0, 1)), (3, cmd(Flush, 0, 0, 0))]);
    assert_eq!(d.len(), 3);
    assert_eq!(d.user_mut(2).copied(), Some(20));
    *d.user_mut(2).unwrap() = 21;
    // In the middle of a read payload.
    let got = d.decode(&data_chunk(0, 1, 0, &[1; 10])).unwrap();
    assert!(matches!(got.event, Some(Event::ReadData { cookie: 1, .. })));
    let mut all = d.take_all();
    all.sort();
    assert_eq!(all, vec![(1, 10), (2, 21), (3, 30)]);
    assert!(d.is_empty());
    assert!(d.take_all().is_empty());
    // The decoder is usable again afterwards (take_all forgets the payload in progress).
    d.register(4, write(0, 1), 40);
    let got = d.decode(&simple_reply(0, 4)).unwrap();
    assert!(matches!(got.event, Some(Event::Done { cookie: 4, user: 40, result: Ok(()), .. })));
}

#[test]
fn replies_to_a_range_that_wraps_past_2_64_do_not_panic() {
    // With STRICT_BOUNDS off the client may ask for a range beyond 2^64 - 1; whatever the
    // server then answers must be an event or a protocol error, never a panic.
    let s = session(1 << 40, EVERYTHING);
    let c = read(u64::MAX - 10, 100);
    passes(&s, c, 0);
    let inputs = [
        data_chunk(DONE, 1, u64::MAX - 10, &[1; 5]),
        data_chunk(DONE, 1, 5, &[1; 5]),
        hole_chunk(DONE, 1, u64::MAX - 10, 5),
        error_offset_chunk(DONE, 1, 5, "", u64::MAX - 10),
        error_offset_chunk(DONE, 1, 5, "", 3),
    ];
    for input in inputs {
        let result = std::panic::catch_unwind(|| {
            let mut d = decoder(true, &[(1, c)]);
            let out = run(&mut d, &input, input.len());
            out.fatal.map(|f| f.error.errno())
        });
        match result {
            Ok(None) | Ok(Some(Errno::EPROTO)) => {}
            Ok(Some(other)) => panic!("unexpected {other}"),
            Err(_) => panic!("the decoder panicked on {input:?}"),
        }
    }
}

// ---- STRICT_AUTO_FLAG ----

fn extended_session() -> Session {
    let mut n = negotiated(MIB, EVERYTHING, None, true);
    n.extended_headers = true;
    Session::new(n)
}

#[test]
fn auto_flag_makes_the_payload_length_flag_follow_the_framing() {
    let compact = session(MIB, EVERYTHING);
    let extended = extended_session();
    let len = CMD_FLAG_PAYLOAD_LEN as u32;
    let fua = CMD_FLAG_FUA as u32;
    // Under STRICT_AUTO_FLAG the caller's choice does not matter: set with extended
    // headers, clear without.
    for given in [0, len] {
        assert_eq!(passes(&compact, cmd(Write, 0, 512, given), STRICT_MASK), 0);
        assert_eq!(passes(&extended, cmd(Write, 0, 512, given), STRICT_MASK), CMD_FLAG_PAYLOAD_LEN);
        assert_eq!(
            passes(&extended, cmd(Write, 0, 512, given | fua), STRICT_MASK),
            CMD_FLAG_PAYLOAD_LEN | CMD_FLAG_FUA
        );
    }
    // Without it the flag goes out as the caller gave it.
    let manual = STRICT_MASK & !STRICT_AUTO_FLAG;
    assert_eq!(passes(&compact, cmd(Write, 0, 512, len), manual), CMD_FLAG_PAYLOAD_LEN);
    assert_eq!(passes(&extended, cmd(Write, 0, 512, 0), manual), 0);
    // Other commands keep their flags.
    assert_eq!(passes(&extended, cmd(WriteZeroes, 0, 512, fua), STRICT_MASK), CMD_FLAG_FUA);
}

// ---- block status without contexts ----

#[test]
fn block_status_without_contexts_is_refused_only_under_strict_commands() {
    // negotiated() has structured replies and no meta contexts.
    let s = session(MIB, EVERYTHING);
    let e = refused(&s, cmd(BlockStatus, 0, 512, 0), STRICT_MASK, Errno::ENOTSUP);
    assert!(e.message().contains("metadata contexts"), "{e}");
    passes(&s, cmd(BlockStatus, 0, 512, 0), STRICT_MASK & !STRICT_COMMANDS);
    // Without structured replies there can be no block status either.
    let simple = Session::new(negotiated(MIB, EVERYTHING, None, false));
    let e = refused(&simple, cmd(BlockStatus, 0, 512, 0), STRICT_MASK, Errno::ENOTSUP);
    assert!(e.message().contains("structured replies"), "{e}");
    passes(&simple, cmd(BlockStatus, 0, 512, 0), 0);
}
