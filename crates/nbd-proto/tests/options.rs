//! Byte-fixture tests of the handshake's newer paths: extended headers, meta contexts,
//! option mode and the STARTTLS hand-off.

use nbd_proto::consts::*;
use nbd_proto::handshake::{
    ExportEntry, Handshake, HandshakeConfig, MetaContext, OptReply, OptRequest, Outcome, TlsMode,
};
use nbd_proto::{Errno, Fault};

mod bytes;
use bytes::*;

fn go_request(option: u32, name: &str) -> Vec<u8> {
    client_option(option, &go_payload(name, &[INFO_BLOCK_SIZE]))
}

/// Feeds `bytes` one at a time (the harder case) and returns what was sent and the events.
fn feed(hs: &mut Handshake, bytes: &[u8]) -> (Vec<u8>, Vec<Outcome>) {
    let mut sent = hs.poll_transmit();
    let mut events = Vec::new();
    if let Some(e) = hs.poll_event() {
        events.push(e);
    }
    for b in bytes {
        hs.handle_input(std::slice::from_ref(b));
        sent.extend(hs.poll_transmit());
        if let Some(e) = hs.poll_event() {
            events.push(e);
        }
    }
    sent.extend(hs.poll_transmit());
    (sent, events)
}

fn flags_word() -> Vec<u8> {
    be32(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_vec()
}

#[test]
fn extended_headers_are_asked_first_and_imply_structured_replies() {
    let mut hs = Handshake::new(HandshakeConfig::default());
    let mut server = newstyle_greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    server.extend(opt_reply(OPT_EXTENDED_HEADERS, REP_ACK, &[]));
    server.extend(go_ok(OPT_GO, 4096));
    let (sent, events) = feed(&mut hs, &server);
    let mut want = flags_word();
    want.extend(client_option(OPT_EXTENDED_HEADERS, &[]));
    want.extend(go_request(OPT_GO, ""));
    assert_eq!(sent, want, "no NBD_OPT_STRUCTURED_REPLY after extended headers");
    match &events[..] {
        [Outcome::Ready(n)] => {
            assert!(n.extended_headers && n.structured_replies);
            assert_eq!(n.export.size, 4096);
        }
        other => panic!("expected Ready, got {other:?}"),
    }
}

#[test]
fn refused_extended_headers_fall_back_to_structured_replies() {
    let mut hs = Handshake::new(HandshakeConfig::default());
    let mut server = newstyle_greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    server.extend(opt_reply(OPT_EXTENDED_HEADERS, REP_ERR_UNSUP, &[]));
    server.extend(opt_reply(OPT_STRUCTURED_REPLY, REP_ACK, &[]));
    server.extend(go_ok(OPT_GO, 512));
    let (sent, events) = feed(&mut hs, &server);
    let mut want = flags_word();
    want.extend(client_option(OPT_EXTENDED_HEADERS, &[]));
    want.extend(client_option(OPT_STRUCTURED_REPLY, &[]));
    want.extend(go_request(OPT_GO, ""));
    assert_eq!(sent, want);
    match &events[..] {
        [Outcome::Ready(n)] => assert!(!n.extended_headers && n.structured_replies),
        other => panic!("expected Ready, got {other:?}"),
    }
}

#[test]
fn meta_contexts_are_set_before_go() {
    let config = HandshakeConfig {
        export_name: "disk".into(),
        meta_contexts: vec!["base:allocation".into(), "qemu:dirty-bitmap:b0".into()],
        request_extended_headers: false,
        ..HandshakeConfig::default()
    };
    let mut hs = Handshake::new(config);
    let mut server = newstyle_greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    server.extend(opt_reply(OPT_STRUCTURED_REPLY, REP_ACK, &[]));
    server.extend(meta_reply(OPT_SET_META_CONTEXT, 7, "base:allocation"));
    server.extend(meta_reply(OPT_SET_META_CONTEXT, 9, "qemu:dirty-bitmap:b0"));
    server.extend(opt_reply(OPT_SET_META_CONTEXT, REP_ACK, &[]));
    server.extend(go_ok(OPT_GO, 1 << 20));
    let (sent, events) = feed(&mut hs, &server);
    let mut want = flags_word();
    want.extend(client_option(OPT_STRUCTURED_REPLY, &[]));
    want.extend(client_option(
        OPT_SET_META_CONTEXT,
        &meta_request("disk", &["base:allocation", "qemu:dirty-bitmap:b0"]),
    ));
    want.extend(go_request(OPT_GO, "disk"));
    assert_eq!(sent, want);
    match &events[..] {
        [Outcome::Ready(n)] => {
            assert_eq!(
                n.meta_contexts,
                vec![
                    MetaContext { id: 7, name: "base:allocation".into() },
                    MetaContext { id: 9, name: "qemu:dirty-bitmap:b0".into() },
                ]
            );
            assert_eq!(n.meta_context_id("qemu:dirty-bitmap:b0"), Some(9));
        }
        other => panic!("expected Ready, got {other:?}"),
    }
}

#[test]
fn a_refused_meta_context_request_still_goes() {
    let config = HandshakeConfig {
        meta_contexts: vec!["base:allocation".into()],
        request_extended_headers: false,
        ..HandshakeConfig::default()
    };
    let mut hs = Handshake::new(config);
    let mut server = newstyle_greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    server.extend(opt_reply(OPT_STRUCTURED_REPLY, REP_ACK, &[]));
    server.extend(opt_reply(OPT_SET_META_CONTEXT, REP_ERR_UNSUP, b"no"));
    server.extend(go_ok(OPT_GO, 1024));
    let (_, events) = feed(&mut hs, &server);
    match &events[..] {
        [Outcome::Ready(n)] => assert!(n.meta_contexts.is_empty()),
        other => panic!("expected Ready, got {other:?}"),
    }
}

#[test]
fn meta_contexts_need_structured_replies() {
    let config = HandshakeConfig {
        meta_contexts: vec!["base:allocation".into()],
        ..HandshakeConfig::default()
    };
    let mut hs = Handshake::new(config);
    let mut server = newstyle_greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    server.extend(opt_reply(OPT_EXTENDED_HEADERS, REP_ERR_UNSUP, &[]));
    server.extend(opt_reply(OPT_STRUCTURED_REPLY, REP_ERR_UNSUP, &[]));
    server.extend(go_ok(OPT_GO, 1024));
    let (sent, events) = feed(&mut hs, &server);
    assert!(!sent.windows(4).any(|w| w == be32(OPT_SET_META_CONTEXT)), "no SET_META_CONTEXT without structured replies");
    assert!(matches!(&events[..], [Outcome::Ready(n)] if n.meta_contexts.is_empty()));
}

#[test]
fn a_context_id_given_twice_is_a_protocol_error() {
    let config = HandshakeConfig {
        meta_contexts: vec!["a".into(), "b".into()],
        request_extended_headers: false,
        ..HandshakeConfig::default()
    };
    let mut hs = Handshake::new(config);
    let mut server = newstyle_greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    server.extend(opt_reply(OPT_STRUCTURED_REPLY, REP_ACK, &[]));
    server.extend(meta_reply(OPT_SET_META_CONTEXT, 1, "a"));
    server.extend(meta_reply(OPT_SET_META_CONTEXT, 1, "b"));
    let (_, events) = feed(&mut hs, &server);
    match &events[..] {
        [Outcome::Failed(e)] => {
            assert_eq!(e.fault(), Fault::Protocol);
            assert!(e.message().contains("id 1"), "{}", e.message());
        }
        other => panic!("expected a failure, got {other:?}"),
    }
}

fn opt_mode_machine() -> Handshake {
    let config = HandshakeConfig {
        opt_mode: true,
        request_extended_headers: false,
        ..HandshakeConfig::default()
    };
    let mut hs = Handshake::new(config);
    let mut server = newstyle_greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    server.extend(opt_reply(OPT_STRUCTURED_REPLY, REP_ACK, &[]));
    let (_, events) = feed(&mut hs, &server);
    assert_eq!(events, vec![Outcome::Negotiating]);
    assert!(hs.is_negotiating());
    hs
}

#[test]
fn option_mode_lists_exports() {
    let mut hs = opt_mode_machine();
    hs.request(OptRequest::List).unwrap();
    let mut server = Vec::new();
    for (name, desc) in [("a", "first"), ("bb", "")] {
        let mut p = be32(name.len() as u32).to_vec();
        p.extend_from_slice(name.as_bytes());
        p.extend_from_slice(desc.as_bytes());
        server.extend(opt_reply(OPT_LIST, REP_SERVER, &p));
    }
    server.extend(opt_reply(OPT_LIST, REP_ACK, &[]));
    let (sent, events) = feed(&mut hs, &server);
    assert_eq!(sent, client_option(OPT_LIST, &[]));
    assert_eq!(
        events,
        vec![Outcome::Reply(Ok(OptReply::List(vec![
            ExportEntry { name: "a".into(), description: "first".into() },
            ExportEntry { name: "bb".into(), description: "".into() },
        ])))]
    );
    assert!(hs.is_negotiating());
}

#[test]
fn a_list_entry_with_a_name_longer_than_its_reply_is_a_protocol_error() {
    let mut hs = opt_mode_machine();
    hs.request(OptRequest::List).unwrap();
    let mut p = be32(100).to_vec();
    p.extend_from_slice(b"short");
    let (_, events) = feed(&mut hs, &opt_reply(OPT_LIST, REP_SERVER, &p));
    assert!(matches!(&events[..], [Outcome::Failed(e)] if e.fault() == Fault::Protocol));
}

#[test]
fn list_entries_and_lists_are_bounded() {
    let entry = |name: &[u8], desc: &[u8]| {
        let mut p = be32(name.len() as u32).to_vec();
        p.extend_from_slice(name);
        p.extend_from_slice(desc);
        opt_reply(OPT_LIST, REP_SERVER, &p)
    };
    let failed = |server: &[u8]| {
        let mut hs = opt_mode_machine();
        hs.request(OptRequest::List).unwrap();
        match feed(&mut hs, server).1.as_slice() {
            [Outcome::Failed(e)] if e.fault() == Fault::Protocol => e.message().to_string(),
            other => panic!("expected a protocol error, got {other:?}"),
        }
    };
    // Strings are at most 4096 bytes: a name or a description over that is refused.
    assert!(failed(&entry(&[b'n'; 4097], b"")).contains("name of 4097 bytes"));
    assert!(failed(&entry(b"disk", &[b'd'; 4097])).contains("description of 4097 bytes"));
    // Within the limit, many large entries stop at 16 MiB of text rather than gigabytes.
    let big = entry(&[b'n'; 4096], &[b'd'; 4096]);
    let mut server = Vec::new();
    for _ in 0..2100 {
        server.extend_from_slice(&big);
    }
    assert!(failed(&server).contains("bytes of names"));
    // The largest legal entry alone is fine.
    let mut hs = opt_mode_machine();
    hs.request(OptRequest::List).unwrap();
    let mut server = big.clone();
    server.extend(opt_reply(OPT_LIST, REP_ACK, &[]));
    assert!(matches!(feed(&mut hs, &server).1.as_slice(), [Outcome::Reply(Ok(OptReply::List(l)))] if l.len() == 1));
}

#[test]
fn a_refusal_shows_at_most_4096_bytes_of_the_servers_message_with_control_characters_escaped() {
    let mut hs = opt_mode_machine();
    hs.request(OptRequest::Info).unwrap();
    let mut text = b"go away\x1b[2J\0".to_vec();
    text.extend(vec![b'x'; 5000]);
    let (_, events) = feed(&mut hs, &opt_reply(OPT_INFO, REP_ERR_POLICY, &text));
    match &events[..] {
        [Outcome::Reply(Err(e))] => {
            let m = e.message();
            assert!(m.contains("go away\\u{1b}[2J\\u{0}"), "{m}");
            assert!(!m.contains('\u{1b}'));
            assert!(m.ends_with("(916 more bytes)"), "{}", &m[m.len() - 40..]);
            assert!(m.len() < 4300);
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn option_mode_info_failure_stays_negotiating_then_go_succeeds() {
    let mut hs = opt_mode_machine();
    hs.config_mut().export_name = "missing".into();
    hs.request(OptRequest::Info).unwrap();
    let (sent, events) = feed(&mut hs, &opt_reply(OPT_INFO, REP_ERR_UNKNOWN, b"no such export"));
    assert_eq!(sent, go_request(OPT_INFO, "missing"));
    match &events[..] {
        [Outcome::Reply(Err(e))] => {
            assert_eq!(e.errno(), Errno::ENOENT);
            assert!(e.message().contains("no such export"));
        }
        other => panic!("expected an ENOENT reply, got {other:?}"),
    }
    assert!(hs.is_negotiating());

    hs.config_mut().export_name = "disk".into();
    hs.request(OptRequest::Info).unwrap();
    let (_, events) = feed(&mut hs, &go_ok(OPT_INFO, 8192));
    assert!(matches!(&events[..], [Outcome::Reply(Ok(OptReply::Info(i)))] if i.size == 8192));

    hs.request(OptRequest::Go).unwrap();
    let (sent, events) = feed(&mut hs, &go_ok(OPT_GO, 8192));
    assert_eq!(sent, go_request(OPT_GO, "disk"));
    assert!(matches!(&events[..], [Outcome::Ready(n)] if n.export.size == 8192 && n.structured_replies));
    assert!(hs.is_finished());
}

#[test]
fn option_mode_go_refused_returns_to_negotiating() {
    let mut hs = opt_mode_machine();
    hs.request(OptRequest::Go).unwrap();
    let (_, events) = feed(&mut hs, &opt_reply(OPT_GO, REP_ERR_POLICY, &[]));
    assert!(matches!(&events[..], [Outcome::Reply(Err(e))] if e.errno() == Errno::EPERM));
    assert!(hs.is_negotiating());
}

#[test]
fn option_mode_meta_context_list_and_set() {
    let mut hs = opt_mode_machine();
    hs.config_mut().export_name = "d".into();
    hs.request(OptRequest::ListMetaContext(None)).unwrap();
    let mut server = meta_reply(OPT_LIST_META_CONTEXT, 0, "base:allocation");
    server.extend(meta_reply(OPT_LIST_META_CONTEXT, 0, "qemu:dirty-bitmap:"));
    server.extend(opt_reply(OPT_LIST_META_CONTEXT, REP_ACK, &[]));
    let (sent, events) = feed(&mut hs, &server);
    assert_eq!(sent, client_option(OPT_LIST_META_CONTEXT, &meta_request("d", &[])));
    assert_eq!(
        events,
        vec![Outcome::Reply(Ok(OptReply::MetaContexts(vec![
            "base:allocation".into(),
            "qemu:dirty-bitmap:".into()
        ])))]
    );
    // Listing negotiates nothing.
    assert!(hs.negotiated(Default::default()).meta_contexts.is_empty());

    hs.request(OptRequest::SetMetaContext(Some(vec!["base:allocation".into()]))).unwrap();
    let mut server = meta_reply(OPT_SET_META_CONTEXT, 3, "base:allocation");
    server.extend(opt_reply(OPT_SET_META_CONTEXT, REP_ACK, &[]));
    let (sent, events) = feed(&mut hs, &server);
    assert_eq!(sent, client_option(OPT_SET_META_CONTEXT, &meta_request("d", &["base:allocation"])));
    assert_eq!(events, vec![Outcome::Reply(Ok(OptReply::MetaContexts(vec!["base:allocation".into()])))]);
    assert_eq!(hs.negotiated(Default::default()).meta_context_id("base:allocation"), Some(3));

    // Another export name: the contexts were for "d" only.
    hs.config_mut().export_name = "e".into();
    assert!(hs.negotiated(Default::default()).meta_contexts.is_empty());
}

#[test]
fn option_mode_abort_ends_on_ack_or_hang_up() {
    let mut hs = opt_mode_machine();
    hs.request(OptRequest::Abort).unwrap();
    let (sent, events) = feed(&mut hs, &opt_reply(OPT_ABORT, REP_ACK, &[]));
    assert_eq!(sent, client_option(OPT_ABORT, &[]));
    assert_eq!(events, vec![Outcome::Reply(Ok(OptReply::Aborted))]);
    assert!(hs.is_finished());

    let mut hs = opt_mode_machine();
    hs.request(OptRequest::Abort).unwrap();
    let _ = hs.poll_transmit();
    hs.handle_eof();
    assert_eq!(hs.poll_event(), Some(Outcome::Reply(Ok(OptReply::Aborted))));
}

#[test]
fn option_requests_are_refused_outside_negotiation() {
    let mut hs = Handshake::new(HandshakeConfig::default());
    let e = hs.request(OptRequest::List).unwrap_err();
    assert_eq!(e.errno(), Errno::EINVAL);

    let mut hs = opt_mode_machine();
    hs.request(OptRequest::List).unwrap();
    let e = hs.request(OptRequest::Info).unwrap_err();
    assert_eq!(e.errno(), Errno::EINVAL, "one option request at a time");
}

#[test]
fn option_mode_structured_reply_and_extended_headers_answer_booleans() {
    let mut hs = opt_mode_machine();
    hs.request(OptRequest::ExtendedHeaders).unwrap();
    let (_, events) = feed(&mut hs, &opt_reply(OPT_EXTENDED_HEADERS, REP_ERR_UNSUP, &[]));
    assert_eq!(events, vec![Outcome::Reply(Ok(OptReply::Agreed(false)))]);
    hs.request(OptRequest::StructuredReply).unwrap();
    let (_, events) = feed(&mut hs, &opt_reply(OPT_STRUCTURED_REPLY, REP_ACK, &[]));
    assert_eq!(events, vec![Outcome::Reply(Ok(OptReply::Agreed(true)))]);
}

#[test]
fn tls_require_against_a_refusing_server_fails_with_enotsup() {
    let config = HandshakeConfig {
        tls: TlsMode::Require,
        ..HandshakeConfig::default()
    };
    let mut hs = Handshake::new(config);
    let mut server = newstyle_greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    server.extend(opt_reply(OPT_STARTTLS, REP_ERR_POLICY, &[]));
    let (sent, events) = feed(&mut hs, &server);
    let mut want = flags_word();
    want.extend(client_option(OPT_STARTTLS, &[]));
    assert_eq!(sent, want, "nothing but STARTTLS in plaintext");
    assert!(matches!(&events[..], [Outcome::Failed(e)] if e.errno() == Errno::ENOTSUP));
}

#[test]
fn tls_allow_falls_back_to_plaintext_when_refused() {
    let config = HandshakeConfig {
        tls: TlsMode::Allow,
        request_extended_headers: false,
        ..HandshakeConfig::default()
    };
    let mut hs = Handshake::new(config);
    let mut server = newstyle_greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    server.extend(opt_reply(OPT_STARTTLS, REP_ERR_UNSUP, &[]));
    server.extend(opt_reply(OPT_STRUCTURED_REPLY, REP_ACK, &[]));
    server.extend(go_ok(OPT_GO, 1024));
    let (_, events) = feed(&mut hs, &server);
    assert!(matches!(&events[..], [Outcome::Ready(n)] if !n.tls));
}

#[test]
fn starttls_accepted_hands_over_then_continues_after_tls() {
    let config = HandshakeConfig {
        tls: TlsMode::Require,
        ..HandshakeConfig::default()
    };
    let mut hs = Handshake::new(config);
    let mut server = newstyle_greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    server.extend(opt_reply(OPT_STARTTLS, REP_ACK, &[]));
    let (_, events) = feed(&mut hs, &server);
    assert_eq!(events, vec![Outcome::StartTls]);
    hs.tls_done();
    assert_eq!(hs.poll_transmit(), client_option(OPT_EXTENDED_HEADERS, &[]));
    let mut server = opt_reply(OPT_EXTENDED_HEADERS, REP_ACK, &[]);
    server.extend(go_ok(OPT_GO, 1024));
    let (_, events) = feed(&mut hs, &server);
    assert!(matches!(&events[..], [Outcome::Ready(n)] if n.tls && n.extended_headers));
}

#[test]
fn bytes_after_the_starttls_ack_are_refused() {
    let config = HandshakeConfig {
        tls: TlsMode::Require,
        ..HandshakeConfig::default()
    };
    let mut hs = Handshake::new(config);
    let mut server = newstyle_greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    server.extend(opt_reply(OPT_STARTTLS, REP_ACK, &[]));
    server.extend(b"injected");
    hs.handle_input(&server);
    match hs.poll_event() {
        Some(Outcome::Failed(e)) => assert_eq!(e.fault(), Fault::Protocol),
        other => panic!("expected a protocol failure, got {other:?}"),
    }
}

#[test]
fn tls_require_refuses_oldstyle_and_plain_newstyle() {
    let config = HandshakeConfig {
        tls: TlsMode::Require,
        ..HandshakeConfig::default()
    };
    let mut old = Vec::new();
    old.extend(be64(NBDMAGIC));
    old.extend(be64(OLDSTYLE_MAGIC));
    old.extend(be64(1024));
    old.extend(be32(1));
    old.extend([0u8; 124]);
    let mut hs = Handshake::new(config.clone());
    hs.handle_input(&old);
    assert!(matches!(hs.poll_event(), Some(Outcome::Failed(e)) if e.errno() == Errno::ENOTSUP));

    let mut plain = Vec::new();
    plain.extend(be64(NBDMAGIC));
    plain.extend(be64(IHAVEOPT));
    plain.extend(be16(0));
    let mut hs = Handshake::new(config);
    hs.handle_input(&plain);
    assert!(matches!(hs.poll_event(), Some(Outcome::Failed(e)) if e.errno() == Errno::ENOTSUP));
}

#[test]
fn unexpected_reply_kinds_to_new_options_are_protocol_errors() {
    let mut hs = opt_mode_machine();
    hs.request(OptRequest::Go).unwrap();
    let (_, events) = feed(&mut hs, &meta_reply(OPT_GO, 1, "x"));
    assert!(matches!(&events[..], [Outcome::Failed(e)] if e.fault() == Fault::Protocol));
}

#[test]
fn debug_messages_name_the_options() {
    let config = HandshakeConfig {
        debug: true,
        ..HandshakeConfig::default()
    };
    let mut hs = Handshake::new(config);
    let mut server = newstyle_greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    server.extend(opt_reply(OPT_EXTENDED_HEADERS, REP_ACK, &[]));
    server.extend(go_ok(OPT_GO, 4096));
    feed(&mut hs, &server);
    let log = hs.take_debug().join("\n");
    assert!(log.contains("sending NBD_OPT_EXTENDED_HEADERS"), "{log}");
    assert!(log.contains("received NBD_REP_ACK to NBD_OPT_GO"), "{log}");
    assert!(log.contains("handshake done"), "{log}");
}
