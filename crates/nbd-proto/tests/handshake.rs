//! Byte-fixture tests of the handshake machine: server bytes built by hand are fed in (whole
//! and one byte at a time), and the exact bytes the client sends are checked.

use nbd_proto::consts::*;
use nbd_proto::handshake::{BlockSize, Handshake, HandshakeConfig, Negotiated, Protocol};
use nbd_proto::{Errno, Error, Fault};

mod bytes;
use bytes::*;

// ---- driving ----

struct Run {
    hs: Handshake,
    sent: Vec<u8>,
    outcome: Option<Result<Negotiated, Error>>,
    /// What `take_leftover` returned after the last byte was fed.
    leftover: Vec<u8>,
}

/// Feeds `server` to a new machine in pieces of `piece` bytes, collecting everything sent
/// and the outcome (taken as soon as it appears; bytes after it are still fed).
fn drive(config: HandshakeConfig, server: &[u8], piece: usize) -> Run {
    let mut hs = Handshake::new(config);
    let mut sent = hs.poll_transmit();
    let mut outcome = hs.poll_outcome();
    for chunk in server.chunks(piece.max(1)) {
        hs.handle_input(chunk);
        sent.extend(hs.poll_transmit());
        if let Some(o) = hs.poll_outcome() {
            assert!(outcome.is_none(), "the outcome is delivered once");
            outcome = Some(o);
        }
    }
    let leftover = hs.take_leftover();
    Run {
        hs,
        sent,
        outcome,
        leftover,
    }
}

/// Runs whole and byte by byte; both must agree exactly. Returns the whole run.
fn drive_both(config: HandshakeConfig, server: &[u8]) -> Run {
    let whole = drive(config.clone(), server, server.len());
    let bytewise = drive(config, server, 1);
    assert_eq!(whole.sent, bytewise.sent, "chunking changed what the client sent");
    assert_eq!(whole.outcome, bytewise.outcome, "chunking changed the outcome");
    assert_eq!(whole.leftover, bytewise.leftover, "chunking changed the leftover");
    whole
}

fn ok(run: &Run) -> Negotiated {
    match &run.outcome {
        Some(Ok(n)) => n.clone(),
        other => panic!("expected a successful handshake, got {other:?}"),
    }
}

fn err(run: &Run) -> Error {
    match &run.outcome {
        Some(Err(e)) => e.clone(),
        other => panic!("expected a failed handshake, got {other:?}"),
    }
}

fn assert_protocol_error(run: &Run, needle: &str) {
    let e = err(run);
    assert_eq!(e.errno(), Errno::EPROTO, "{e}");
    assert_eq!(e.fault(), Fault::Protocol, "{e}");
    assert!(
        e.message().contains(needle),
        "message {:?} should mention {needle:?}",
        e.message()
    );
}

/// The defaults without extended headers: the framing most of these fixtures speak.
fn compact() -> HandshakeConfig {
    HandshakeConfig {
        request_extended_headers: false,
        ..HandshakeConfig::default()
    }
}

fn cfg(name: &str) -> HandshakeConfig {
    HandshakeConfig {
        export_name: name.to_string(),
        ..compact()
    }
}

const BOTH: u16 = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES;
const TFLAGS: u16 = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA;

/// Server bytes of a full fixed-newstyle handshake: SR ACK, then GO with INFO_EXPORT,
/// INFO_BLOCK_SIZE and ACK.
fn modern_server(size: u64, flags: u16, bs: (u32, u32, u32)) -> Vec<u8> {
    let mut s = newstyle_greeting(BOTH);
    s.extend(opt_reply(OPT_STRUCTURED_REPLY, REP_ACK, &[]));
    s.extend(opt_reply(OPT_GO, REP_INFO, &info_export(size, flags)));
    s.extend(opt_reply(OPT_GO, REP_INFO, &info_block_size(bs.0, bs.1, bs.2)));
    s.extend(opt_reply(OPT_GO, REP_ACK, &[]));
    s
}

// ---- fixed newstyle, the common path ----

#[test]
fn fixed_newstyle_structured_replies_and_go() {
    let server = modern_server(1 << 30, TFLAGS, (512, 4096, 1 << 25));
    let mut run = drive_both(cfg("disk"), &server);
    let n = ok(&run);
    assert_eq!(n.protocol, Protocol::FixedNewstyle);
    assert_eq!(n.protocol.name(), "newstyle-fixed");
    assert!(n.structured_replies);
    assert!(!n.extended_headers);
    assert_eq!(n.export.size, 1 << 30);
    assert_eq!(n.export.flags, TFLAGS);
    assert!(n.export.has(FLAG_SEND_FUA));
    assert!(!n.export.has(FLAG_READ_ONLY));
    assert_eq!(
        n.export.block_size,
        Some(BlockSize {
            minimum: 512,
            preferred: 4096,
            maximum: 1 << 25
        })
    );
    assert_eq!(n.export.payload_max(), 1 << 25);
    assert_eq!(n.export.canonical_name, None);
    assert_eq!(n.export.description, None);

    let mut want = be32(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_vec();
    want.extend(client_option(OPT_STRUCTURED_REPLY, &[]));
    let go = go_payload("disk", &[INFO_BLOCK_SIZE]);
    assert_eq!(go.len(), 4 + 4 + 2 + 2);
    want.extend(client_option(OPT_GO, &go));
    assert_eq!(run.sent, want);
    // Spelled out once, to be sure of the framing itself.
    assert_eq!(
        &run.sent[4..20],
        &[
            0x49, 0x48, 0x41, 0x56, 0x45, 0x4f, 0x50, 0x54, // IHAVEOPT
            0, 0, 0, 8, // NBD_OPT_STRUCTURED_REPLY
            0, 0, 0, 0, // no data
        ]
    );
    assert_eq!(
        &run.sent[20..],
        &[
            0x49, 0x48, 0x41, 0x56, 0x45, 0x4f, 0x50, 0x54, // IHAVEOPT
            0, 0, 0, 7, // NBD_OPT_GO
            0, 0, 0, 12, // length
            0, 0, 0, 4, b'd', b'i', b's', b'k', // name
            0, 1, 0, 3, // one info: NBD_INFO_BLOCK_SIZE
        ]
    );
    assert!(run.leftover.is_empty());
    assert!(run.hs.poll_outcome().is_none(), "the outcome is delivered once");
}

#[test]
fn go_is_only_sent_after_the_structured_reply_answer() {
    let mut hs = Handshake::new(cfg(""));
    assert!(hs.poll_transmit().is_empty(), "the client speaks after the server");
    hs.handle_input(&newstyle_greeting(BOTH));
    let mut want = be32(3).to_vec();
    want.extend(client_option(OPT_STRUCTURED_REPLY, &[]));
    assert_eq!(hs.poll_transmit(), want);
    assert!(hs.poll_outcome().is_none());
    // Part of the answer: nothing new yet.
    let ack = opt_reply(OPT_STRUCTURED_REPLY, REP_ACK, &[]);
    hs.handle_input(&ack[..19]);
    assert!(hs.poll_transmit().is_empty());
    hs.handle_input(&ack[19..]);
    assert_eq!(
        hs.poll_transmit(),
        client_option(OPT_GO, &go_payload("", &[INFO_BLOCK_SIZE]))
    );
    assert!(hs.poll_outcome().is_none());
}

#[test]
fn go_info_requests_follow_the_configuration() {
    let config = HandshakeConfig {
        export_name: "x".into(),
        request_structured_replies: false,
        request_block_size: false,
        full_info: true,
        ..compact()
    };
    let mut s = newstyle_greeting(BOTH);
    s.extend(opt_reply(OPT_GO, REP_INFO, &info_text(INFO_NAME, "canonical-x")));
    s.extend(opt_reply(OPT_GO, REP_INFO, &info_text(INFO_DESCRIPTION, "a test disk")));
    // An information type nobody knows is ignored, as the specification requires.
    s.extend(opt_reply(OPT_GO, REP_INFO, &[0x12, 0x34, 1, 2, 3]));
    s.extend(opt_reply(OPT_GO, REP_INFO, &info_export(4096, 0)));
    s.extend(opt_reply(OPT_GO, REP_ACK, &[]));
    let run = drive_both(config, &s);
    let n = ok(&run);
    assert!(!n.structured_replies);
    assert_eq!(n.export.canonical_name.as_deref(), Some("canonical-x"));
    assert_eq!(n.export.description.as_deref(), Some("a test disk"));
    assert_eq!(n.export.block_size, None);
    assert_eq!(n.export.payload_max(), DEFAULT_PAYLOAD);
    // Without FLAG_HAS_FLAGS the transmission flags count as zero.
    assert_eq!(n.export.flags, 0);

    let mut want = be32(3).to_vec();
    want.extend(client_option(
        OPT_GO,
        &go_payload("x", &[INFO_NAME, INFO_DESCRIPTION]),
    ));
    assert_eq!(run.sent, want);
}

#[test]
fn block_size_maximum_is_clamped_for_the_payload_limit() {
    let small = ok(&drive_both(cfg(""), &modern_server(1 << 20, TFLAGS, (1, 4096, 4096))));
    assert_eq!(small.export.payload_max(), 1024 * 1024);
    let huge = ok(&drive_both(cfg(""), &modern_server(1 << 20, TFLAGS, (1, 4096, u32::MAX))));
    assert_eq!(huge.export.payload_max(), MAX_PAYLOAD_HARD);
}

#[test]
fn structured_replies_refused_still_sends_go() {
    let mut s = newstyle_greeting(BOTH);
    s.extend(opt_reply(OPT_STRUCTURED_REPLY, REP_ERR_UNSUP, b"not here"));
    s.extend(opt_reply(OPT_GO, REP_INFO, &info_export(8192, FLAG_HAS_FLAGS | FLAG_READ_ONLY)));
    s.extend(opt_reply(OPT_GO, REP_ACK, &[]));
    let run = drive_both(cfg("a"), &s);
    let n = ok(&run);
    assert!(!n.structured_replies, "refused structured replies mean simple replies");
    assert_eq!(n.protocol, Protocol::FixedNewstyle);
    assert_eq!(n.export.size, 8192);
    assert!(n.export.has(FLAG_READ_ONLY));
    let mut want = be32(3).to_vec();
    want.extend(client_option(OPT_STRUCTURED_REPLY, &[]));
    want.extend(client_option(OPT_GO, &go_payload("a", &[INFO_BLOCK_SIZE])));
    assert_eq!(run.sent, want);
}

// ---- fallback to NBD_OPT_EXPORT_NAME ----

#[test]
fn go_unsupported_falls_back_to_export_name_with_no_zeroes() {
    let mut s = newstyle_greeting(BOTH);
    s.extend(opt_reply(OPT_STRUCTURED_REPLY, REP_ERR_UNSUP, &[]));
    s.extend(opt_reply(OPT_GO, REP_ERR_UNSUP, &[]));
    s.extend(export_name_reply(1 << 20, TFLAGS, false));
    let run = drive_both(cfg("exp"), &s);
    let n = ok(&run);
    assert_eq!(n.protocol, Protocol::FixedNewstyle);
    assert!(!n.structured_replies);
    assert_eq!(n.export.size, 1 << 20);
    assert_eq!(n.export.flags, TFLAGS);
    assert_eq!(n.export.block_size, None);
    let mut want = be32(3).to_vec();
    want.extend(client_option(OPT_STRUCTURED_REPLY, &[]));
    want.extend(client_option(OPT_GO, &go_payload("exp", &[INFO_BLOCK_SIZE])));
    want.extend(client_option(OPT_EXPORT_NAME, b"exp"));
    assert_eq!(run.sent, want);
    assert!(run.leftover.is_empty());
}

#[test]
fn go_unsupported_falls_back_to_export_name_with_zeroes() {
    // The server does not offer NO_ZEROES, so the client cannot use it: 124 zeroes follow.
    let mut s = newstyle_greeting(FLAG_FIXED_NEWSTYLE);
    s.extend(opt_reply(OPT_STRUCTURED_REPLY, REP_ACK, &[]));
    s.extend(opt_reply(OPT_GO, REP_ERR_UNSUP, &[]));
    let reply = export_name_reply(12345, FLAG_HAS_FLAGS, true);
    assert_eq!(reply.len(), 134);

    let mut hs = Handshake::new(cfg("exp"));
    hs.handle_input(&s);
    let sent = hs.poll_transmit();
    assert_eq!(&sent[..4], &be32(FLAG_C_FIXED_NEWSTYLE));
    assert!(sent.ends_with(&client_option(OPT_EXPORT_NAME, b"exp")));
    // Size and flags alone, and all but one zero, do not finish it.
    hs.handle_input(&reply[..10]);
    assert!(hs.poll_outcome().is_none());
    hs.handle_input(&reply[10..133]);
    assert!(hs.poll_outcome().is_none());
    hs.handle_input(&reply[133..]);
    let n = hs.poll_outcome().expect("finished").expect("succeeded");
    assert_eq!(n.export.size, 12345);
    // Structured replies were acknowledged before the fallback; they stay negotiated.
    assert!(n.structured_replies);
    assert!(hs.take_leftover().is_empty());

    let mut whole = s.clone();
    whole.extend(&reply);
    assert_eq!(ok(&drive_both(cfg("exp"), &whole)).export.size, 12345);
}

#[test]
fn go_unknown_export_fails_with_enoent_and_the_server_message() {
    let mut s = newstyle_greeting(BOTH);
    s.extend(opt_reply(OPT_STRUCTURED_REPLY, REP_ACK, &[]));
    s.extend(opt_reply(OPT_GO, REP_ERR_UNKNOWN, b"no such export: nope"));
    let run = drive_both(cfg("nope"), &s);
    let e = err(&run);
    assert_eq!(e.errno(), Errno::ENOENT);
    assert_eq!(e.fault(), Fault::Server);
    assert!(e.message().contains("no such export: nope"), "{e}");
    assert!(e.message().contains("NBD_OPT_GO"), "{e}");
}

#[test]
fn go_refusals_map_to_errnos() {
    for (reply, errno) in [
        (REP_ERR_POLICY, Errno::EPERM),
        (REP_ERR_TLS_REQD, Errno::ENOTSUP),
        (REP_ERR_PLATFORM, Errno::ENOTSUP),
        (REP_ERR_SHUTDOWN, Errno::ESHUTDOWN),
        (REP_ERR_TOO_BIG, Errno::ERANGE),
        (REP_ERR_INVALID, Errno::EINVAL),
        (REP_FLAG_ERROR | 0x1234, Errno::EINVAL),
    ] {
        let mut s = newstyle_greeting(BOTH);
        s.extend(opt_reply(OPT_STRUCTURED_REPLY, REP_ACK, &[]));
        s.extend(opt_reply(OPT_GO, reply, &[]));
        assert_eq!(err(&drive_both(cfg(""), &s)).errno(), errno, "reply {reply:#x}");
    }
}

// ---- plain newstyle, oldstyle, handshake flags ----

#[test]
fn plain_newstyle_sends_export_name_directly() {
    let mut s = newstyle_greeting(0);
    s.extend(export_name_reply(4096, FLAG_HAS_FLAGS | FLAG_SEND_TRIM, true));
    let run = drive_both(cfg("old"), &s);
    let n = ok(&run);
    assert_eq!(n.protocol, Protocol::Newstyle);
    assert_eq!(n.protocol.name(), "newstyle");
    assert!(!n.structured_replies);
    assert_eq!(n.export.size, 4096);
    assert!(n.export.has(FLAG_SEND_TRIM));
    let mut want = be32(0).to_vec();
    want.extend(client_option(OPT_EXPORT_NAME, b"old"));
    assert_eq!(run.sent, want);
}

#[test]
fn plain_newstyle_with_no_zeroes() {
    let mut s = newstyle_greeting(FLAG_NO_ZEROES);
    s.extend(export_name_reply(4096, 0, false));
    let run = drive_both(cfg(""), &s);
    assert_eq!(ok(&run).protocol, Protocol::Newstyle);
    let mut want = be32(FLAG_C_NO_ZEROES).to_vec();
    want.extend(client_option(OPT_EXPORT_NAME, b""));
    assert_eq!(run.sent, want);
}

#[test]
fn oldstyle_greeting_is_parsed() {
    let flags = FLAG_HAS_FLAGS | FLAG_READ_ONLY | FLAG_ROTATIONAL;
    let s = oldstyle_greeting(0x0123_4567_89ab, flags);
    assert_eq!(s.len(), 152);
    let run = drive_both(cfg("ignored"), &s);
    let n = ok(&run);
    assert_eq!(n.protocol, Protocol::Oldstyle);
    assert_eq!(n.protocol.name(), "oldstyle");
    assert!(!n.structured_replies);
    assert_eq!(n.export.size, 0x0123_4567_89ab);
    assert_eq!(n.export.flags, flags);
    assert!(n.export.has(FLAG_ROTATIONAL));
    assert!(run.sent.is_empty(), "an oldstyle client sends nothing");
    assert!(run.leftover.is_empty());

    // One byte short: not finished.
    let run = drive(cfg(""), &s[..151], 7);
    assert!(run.outcome.is_none());
}

#[test]
fn oldstyle_upper_flag_bits_are_not_transmission_flags() {
    let mut s = oldstyle_greeting(512, FLAG_HAS_FLAGS);
    // Set bits in the upper half of the 32-bit flags field.
    s[24] = 0xff;
    s[25] = 0xff;
    let n = ok(&drive_both(cfg(""), &s));
    assert_eq!(n.export.flags, FLAG_HAS_FLAGS);
}

#[test]
fn handshake_flags_mask_what_the_client_sends() {
    // The client refuses NO_ZEROES although the server offers it.
    let config = HandshakeConfig {
        handshake_flags: FLAG_C_FIXED_NEWSTYLE,
        ..cfg("e")
    };
    let mut s = newstyle_greeting(BOTH);
    s.extend(opt_reply(OPT_STRUCTURED_REPLY, REP_ERR_UNSUP, &[]));
    s.extend(opt_reply(OPT_GO, REP_ERR_UNSUP, &[]));
    s.extend(export_name_reply(1024, 0, true));
    let run = drive_both(config.clone(), &s);
    assert_eq!(&run.sent[..4], &be32(FLAG_C_FIXED_NEWSTYLE));
    assert_eq!(ok(&run).export.size, 1024);

    // Without the zeroes the reply is incomplete for this client.
    let mut short = newstyle_greeting(BOTH);
    short.extend(opt_reply(OPT_STRUCTURED_REPLY, REP_ERR_UNSUP, &[]));
    short.extend(opt_reply(OPT_GO, REP_ERR_UNSUP, &[]));
    short.extend(export_name_reply(1024, 0, false));
    assert!(drive(config, &short, 1).outcome.is_none());

    // Without FIXED_NEWSTYLE the client speaks plain newstyle to a fixed server.
    let config = HandshakeConfig {
        handshake_flags: FLAG_C_NO_ZEROES,
        ..cfg("e")
    };
    let mut s = newstyle_greeting(BOTH);
    s.extend(export_name_reply(1024, 0, false));
    let run = drive_both(config, &s);
    let mut want = be32(FLAG_C_NO_ZEROES).to_vec();
    want.extend(client_option(OPT_EXPORT_NAME, b"e"));
    assert_eq!(run.sent, want);
    assert_eq!(ok(&run).protocol, Protocol::Newstyle);

    // Unknown server flag bits are never echoed back.
    let config = HandshakeConfig {
        handshake_flags: 0xffff_ffff,
        ..cfg("")
    };
    let run = drive(config, &newstyle_greeting(0xffff), 100);
    assert_eq!(&run.sent[..4], &be32(3));
}

// ---- faults ----

#[test]
fn wrong_nbdmagic_is_refused() {
    let mut s = newstyle_greeting(BOTH);
    s[0] = b'X';
    assert_protocol_error(&drive_both(cfg(""), &s), "NBDMAGIC");
    let run = drive(cfg(""), b"HTTP/1.1 400 Bad Request\r\n", 100);
    assert_protocol_error(&run, "NBDMAGIC");
    assert!(run.sent.is_empty());
}

#[test]
fn unknown_second_magic_is_refused() {
    let mut s = Vec::new();
    s.extend(be64(NBDMAGIC));
    s.extend(be64(0x1122_3344_5566_7788));
    assert_protocol_error(&drive_both(cfg(""), &s), "0x1122334455667788");
}

#[test]
fn option_reply_with_wrong_magic_is_refused() {
    let mut s = newstyle_greeting(BOTH);
    let mut reply = opt_reply(OPT_STRUCTURED_REPLY, REP_ACK, &[]);
    reply[7] ^= 1;
    s.extend(reply);
    assert_protocol_error(&drive_both(cfg(""), &s), "magic");
}

#[test]
fn reply_to_an_option_never_sent_is_refused() {
    let mut s = newstyle_greeting(BOTH);
    s.extend(opt_reply(OPT_LIST, REP_ACK, &[]));
    assert_protocol_error(&drive_both(cfg(""), &s), "NBD_OPT_STRUCTURED_REPLY");

    // GO answered while structured replies are outstanding.
    let mut s = newstyle_greeting(BOTH);
    s.extend(opt_reply(OPT_GO, REP_ACK, &[]));
    assert_protocol_error(&drive_both(cfg(""), &s), "NBD_OPT_GO");
}

#[test]
fn unexpected_reply_types_are_refused() {
    let mut s = newstyle_greeting(BOTH);
    s.extend(opt_reply(OPT_STRUCTURED_REPLY, REP_ACK, &[]));
    s.extend(opt_reply(OPT_GO, REP_SERVER, &[0, 0, 0, 0]));
    assert_protocol_error(&drive_both(cfg(""), &s), "NBD_REP_SERVER");

    let mut s = newstyle_greeting(BOTH);
    s.extend(opt_reply(OPT_STRUCTURED_REPLY, REP_ACK, &[1, 2, 3]));
    assert_protocol_error(&drive_both(cfg(""), &s), "payload");
}

#[test]
fn option_reply_of_4_gib_fails_without_waiting_for_the_bytes() {
    let mut s = newstyle_greeting(BOTH);
    s.extend(be64(OPT_REPLY_MAGIC));
    s.extend(be32(OPT_STRUCTURED_REPLY));
    s.extend(be32(REP_ERR_UNSUP));
    s.extend(be32(u32::MAX));
    // Only the header is there: the refusal must not wait for 4 GiB of payload.
    let run = drive_both(cfg(""), &s);
    assert_protocol_error(&run, &u32::MAX.to_string());

    // Just past the limit is refused too; at the limit it waits.
    let mut s = newstyle_greeting(BOTH);
    s.extend(be64(OPT_REPLY_MAGIC));
    s.extend(be32(OPT_STRUCTURED_REPLY));
    s.extend(be32(REP_ERR_UNSUP));
    let mut past = s.clone();
    past.extend(be32(MAX_OPTION_REPLY + 1));
    assert_protocol_error(&drive(cfg(""), &past, 64), "more than");
    let mut at = s;
    at.extend(be32(MAX_OPTION_REPLY));
    assert!(drive(cfg(""), &at, 64).outcome.is_none());
}

#[test]
fn info_export_of_wrong_length_is_refused() {
    for body in [info_export(1, 0)[..11].to_vec(), {
        let mut b = info_export(1, 0);
        b.push(0);
        b
    }] {
        let mut s = newstyle_greeting(BOTH);
        s.extend(opt_reply(OPT_STRUCTURED_REPLY, REP_ACK, &[]));
        s.extend(opt_reply(OPT_GO, REP_INFO, &body));
        assert_protocol_error(&drive_both(cfg(""), &s), "NBD_INFO_EXPORT");
    }
    // An NBD_REP_INFO without even its type.
    let mut s = newstyle_greeting(BOTH);
    s.extend(opt_reply(OPT_STRUCTURED_REPLY, REP_ACK, &[]));
    s.extend(opt_reply(OPT_GO, REP_INFO, &[0]));
    assert_protocol_error(&drive_both(cfg(""), &s), "NBD_REP_INFO");
}

#[test]
fn info_block_size_nonsense_is_refused() {
    for (min, pref, max) in [
        (0, 4096, 4096),          // minimum zero
        (3, 4096, 4095),          // minimum not a power of two
        (128 * 1024, 128 * 1024, 1 << 20), // minimum above 64 KiB
        (512, 1000, 4096),        // preferred not a power of two
        (4096, 512, 1 << 20),     // preferred below minimum
        (4096, 4096, 512),        // maximum below minimum
        (512, 4096, 1000),        // maximum not a multiple of minimum
    ] {
        let run = drive_both(cfg(""), &modern_server(1 << 20, TFLAGS, (min, pref, max)));
        assert_protocol_error(&run, "block sizes");
    }
    // Wrong length.
    let mut s = newstyle_greeting(BOTH);
    s.extend(opt_reply(OPT_STRUCTURED_REPLY, REP_ACK, &[]));
    s.extend(opt_reply(OPT_GO, REP_INFO, &info_block_size(1, 4096, 4096)[..13]));
    assert_protocol_error(&drive_both(cfg(""), &s), "NBD_INFO_BLOCK_SIZE");
    // Sensible extremes pass.
    for (min, pref, max) in [(1, 1, 1), (65536, 65536, u32::MAX), (512, 4096, 32768)] {
        ok(&drive_both(cfg(""), &modern_server(1 << 20, TFLAGS, (min, pref, max))));
    }
}

#[test]
fn ack_to_go_without_info_export_is_refused() {
    let mut s = newstyle_greeting(BOTH);
    s.extend(opt_reply(OPT_STRUCTURED_REPLY, REP_ACK, &[]));
    s.extend(opt_reply(OPT_GO, REP_INFO, &info_block_size(1, 4096, 1 << 20)));
    s.extend(opt_reply(OPT_GO, REP_ACK, &[]));
    assert_protocol_error(&drive_both(cfg(""), &s), "NBD_INFO_EXPORT");
}

#[test]
fn export_size_past_2_63_is_refused() {
    let too_big = 1u64 << 63;
    // NBD_INFO_EXPORT
    let run = drive_both(cfg(""), &modern_server(too_big, TFLAGS, (1, 4096, 1 << 20)));
    assert_protocol_error(&run, &too_big.to_string());
    // NBD_OPT_EXPORT_NAME
    let mut s = newstyle_greeting(0);
    s.extend(export_name_reply(u64::MAX, 0, true));
    assert_protocol_error(&drive_both(cfg(""), &s), "2^63");
    // oldstyle
    assert_protocol_error(&drive_both(cfg(""), &oldstyle_greeting(too_big, 0)), "2^63");
    // The largest size allowed passes.
    let n = ok(&drive_both(cfg(""), &oldstyle_greeting(i64::MAX as u64, 0)));
    assert_eq!(n.export.size, i64::MAX as u64);
}

#[test]
fn eof_at_each_step_says_what_was_awaited() {
    let eof_after = |config: HandshakeConfig, bytes: &[u8]| -> Error {
        let mut hs = Handshake::new(config);
        hs.handle_input(bytes);
        let _ = hs.poll_transmit();
        assert!(hs.poll_outcome().is_none(), "not finished before the EOF");
        hs.handle_eof();
        let e = hs.poll_outcome().expect("EOF ends the handshake").unwrap_err();
        assert!(e.is_fatal(), "{e}");
        assert_eq!(e.fault(), Fault::Io, "{e}");
        // A second EOF changes nothing.
        hs.handle_eof();
        assert!(hs.poll_outcome().is_none());
        e
    };
    let greeting = newstyle_greeting(BOTH);
    for cut in [0, 5, 16, 17] {
        let e = eof_after(cfg(""), &greeting[..cut]);
        assert!(e.message().contains("greeting"), "cut {cut}: {e}");
    }
    let e = eof_after(cfg(""), &oldstyle_greeting(1, 0)[..100]);
    assert!(e.message().contains("greeting"), "{e}");

    let e = eof_after(cfg(""), &greeting);
    assert!(e.message().contains("NBD_OPT_STRUCTURED_REPLY"), "{e}");

    let mut s = greeting.clone();
    s.extend(opt_reply(OPT_STRUCTURED_REPLY, REP_ACK, &[]));
    let e = eof_after(cfg(""), &s);
    assert!(e.message().contains("NBD_OPT_GO"), "{e}");
    // In the middle of GO's replies, after an INFO and half of another.
    s.extend(opt_reply(OPT_GO, REP_INFO, &info_export(1, 0)));
    s.extend(&opt_reply(OPT_GO, REP_INFO, &info_block_size(1, 1, 1))[..25]);
    let e = eof_after(cfg(""), &s);
    assert!(e.message().contains("NBD_OPT_GO"), "{e}");

    let mut s = greeting.clone();
    s.extend(opt_reply(OPT_STRUCTURED_REPLY, REP_ACK, &[]));
    s.extend(opt_reply(OPT_GO, REP_ERR_UNSUP, &[]));
    let e = eof_after(cfg("missing"), &s);
    assert!(e.message().contains("NBD_OPT_EXPORT_NAME"), "{e}");
    assert!(e.message().contains("missing"), "{e}");

    // After the end, EOF is not an error any more.
    let mut hs = Handshake::new(cfg(""));
    hs.handle_input(&oldstyle_greeting(1, 0));
    assert!(hs.poll_outcome().unwrap().is_ok());
    hs.handle_eof();
    assert!(hs.poll_outcome().is_none());
}

#[test]
fn export_name_longer_than_4096_is_refused() {
    let long = "n".repeat(MAX_STRING + 1);
    // Fixed newstyle (GO) and plain newstyle (EXPORT_NAME) both refuse it.
    for greeting in [newstyle_greeting(BOTH), newstyle_greeting(0)] {
        let config = HandshakeConfig {
            request_structured_replies: false,
            ..cfg(&long)
        };
        let run = drive(config, &greeting, 100);
        let e = err(&run);
        assert_eq!(e.errno(), Errno::ENAMETOOLONG, "{e}");
        assert!(
            !run.sent.windows(64).any(|w| w.iter().all(|&b| b == b'n')),
            "the long name must not be sent"
        );
    }
    // Exactly 4096 bytes is fine.
    let name = "n".repeat(MAX_STRING);
    let mut s = newstyle_greeting(0);
    s.extend(export_name_reply(1, 0, true));
    let run = drive(cfg(&name), &s, s.len());
    ok(&run);
    assert!(run.sent.ends_with(name.as_bytes()));
}

#[test]
fn bytes_after_the_handshake_are_left_over() {
    let early = [0x67, 0x44, 0x66, 0x98, 0, 0, 0, 0, 9, 9];
    // After GO's ACK.
    let mut s = modern_server(1 << 20, TFLAGS, (1, 4096, 1 << 20));
    s.extend(early);
    let mut run = drive_both(cfg(""), &s);
    ok(&run);
    assert_eq!(run.leftover, early);
    assert!(run.hs.take_leftover().is_empty(), "taken once");

    // After NBD_OPT_EXPORT_NAME's reply (with zeroes).
    let mut s = newstyle_greeting(0);
    s.extend(export_name_reply(1, 0, true));
    s.extend(early);
    let run = drive_both(cfg(""), &s);
    ok(&run);
    assert_eq!(run.leftover, early);

    // After an oldstyle greeting.
    let mut s = oldstyle_greeting(1, 0);
    s.extend(early);
    let run = drive_both(cfg(""), &s);
    ok(&run);
    assert_eq!(run.leftover, early);
}

#[test]
fn input_after_a_failure_is_ignored() {
    let mut hs = Handshake::new(cfg(""));
    hs.handle_input(b"NOTMAGIC........");
    assert!(hs.poll_outcome().unwrap().is_err());
    hs.handle_input(&newstyle_greeting(BOTH));
    assert!(hs.poll_transmit().is_empty());
    assert!(hs.poll_outcome().is_none());
}
