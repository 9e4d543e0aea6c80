//! Byte-fixture tests of what the handshake remembers, and forgets, as libnbd 1.22 does:
//! STARTTLS resets what plaintext negotiated, a changed export name or a refused export
//! forgets the export's details and meta contexts, `can_meta_context` needs an answer,
//! and option mode against a plain newstyle server.

use nbd_proto::consts::*;
use nbd_proto::handshake::{
    ExportInfo, Handshake, HandshakeConfig, OptReply, OptRequest, Outcome, Protocol,
};
use nbd_proto::Errno;

mod bytes;
use bytes::*;

/// Feeds the server's bytes in two pieces; returns what the client sent and the events.
fn feed(hs: &mut Handshake, bytes: &[u8]) -> (Vec<u8>, Vec<Outcome>) {
    let mut sent = hs.poll_transmit();
    let mut events: Vec<Outcome> = hs.poll_event().into_iter().collect();
    let half = bytes.len() / 2;
    for piece in [&bytes[..half], &bytes[half..]] {
        if piece.is_empty() {
            continue;
        }
        hs.handle_input(piece);
        sent.extend(hs.poll_transmit());
        events.extend(hs.poll_event());
    }
    sent.extend(hs.poll_transmit());
    (sent, events)
}

fn base() -> Vec<String> {
    vec![CONTEXT_BASE_ALLOCATION.to_string()]
}

const CONTEXT_BASE_ALLOCATION: &str = "base:allocation";

/// Option mode after structured replies were agreed (no extended headers, so that the
/// fixtures stay short), asking for base:allocation.
fn negotiating(request_meta_context: bool) -> Handshake {
    let mut hs = Handshake::new(HandshakeConfig {
        opt_mode: true,
        request_extended_headers: false,
        request_block_size: false,
        request_meta_context,
        meta_contexts: base(),
        ..HandshakeConfig::default()
    });
    let mut server = newstyle_greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    server.extend(opt_reply(OPT_STRUCTURED_REPLY, REP_ACK, &[]));
    let (_, events) = feed(&mut hs, &server);
    assert_eq!(events, vec![Outcome::Negotiating]);
    hs
}

fn answer(hs: &mut Handshake, req: OptRequest, server: &[u8]) -> Outcome {
    hs.request(req).unwrap();
    let (_, mut events) = feed(hs, server);
    assert_eq!(events.len(), 1, "{events:?}");
    events.pop().unwrap()
}

fn so_far(hs: &Handshake) -> nbd_proto::handshake::Negotiated {
    hs.negotiated(ExportInfo::default())
}

// ---- item 4: STARTTLS resets what was negotiated in plaintext ----

#[test]
fn starttls_forgets_structured_replies_meta_contexts_and_export_details() {
    let mut hs = negotiating(false);
    let set = {
        let mut v = meta_reply(OPT_SET_META_CONTEXT, 7, CONTEXT_BASE_ALLOCATION);
        v.extend(opt_reply(OPT_SET_META_CONTEXT, REP_ACK, &[]));
        v
    };
    let out = answer(&mut hs, OptRequest::SetMetaContext(None), &set);
    assert_eq!(out, Outcome::Reply(Ok(OptReply::MetaContexts(base()))));
    let out = answer(&mut hs, OptRequest::Info, &go_ok(OPT_INFO, 4096));
    assert!(matches!(out, Outcome::Reply(Ok(OptReply::Info(_)))), "{out:?}");
    let before = hs.export_known().expect("NBD_OPT_INFO told the details");
    assert!(before.structured_replies);
    assert!(before.meta_valid);
    assert!(before.can_meta_context(CONTEXT_BASE_ALLOCATION, &base()).unwrap());

    hs.request(OptRequest::StartTls).unwrap();
    let (sent, events) = feed(&mut hs, &opt_reply(OPT_STARTTLS, REP_ACK, &[]));
    assert_eq!(sent, client_option(OPT_STARTTLS, &[]));
    assert_eq!(events, vec![Outcome::StartTls]);
    hs.tls_done();
    assert_eq!(hs.poll_event(), Some(Outcome::Reply(Ok(OptReply::Agreed(true)))));

    let after = so_far(&hs);
    assert!(after.tls);
    assert!(!after.structured_replies, "structured replies must be negotiated again over TLS");
    assert!(!after.extended_headers);
    assert!(!after.meta_valid);
    assert!(after.meta_contexts.is_empty());
    assert!(hs.export_known().is_none(), "export details learned in plaintext are gone");
    let e = after.can_meta_context(CONTEXT_BASE_ALLOCATION, &base()).unwrap_err();
    assert_eq!(e.errno(), Errno::EINVAL);
    // Meta contexts now need structured replies again, negotiated over TLS.
    let out = answer(&mut hs, OptRequest::SetMetaContext(None), &[]);
    match out {
        Outcome::Reply(Err(e)) => assert_eq!(e.errno(), Errno::ENOTSUP),
        other => panic!("expected ENOTSUP, got {other:?}"),
    }
}

#[test]
fn automatic_starttls_negotiates_the_rest_over_tls() {
    let mut hs = Handshake::new(HandshakeConfig {
        tls: nbd_proto::handshake::TlsMode::Require,
        request_extended_headers: false,
        request_block_size: false,
        ..HandshakeConfig::default()
    });
    let (sent, events) = feed(&mut hs, &{
        let mut v = newstyle_greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        v.extend(opt_reply(OPT_STARTTLS, REP_ACK, &[]));
        v
    });
    let mut want = be32(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_vec();
    want.extend(client_option(OPT_STARTTLS, &[]));
    assert_eq!(sent, want);
    assert_eq!(events, vec![Outcome::StartTls]);
    hs.tls_done();
    let (sent, _) = feed(&mut hs, &[]);
    assert_eq!(sent, client_option(OPT_STRUCTURED_REPLY, &[]), "asked for over TLS");
}

// ---- item 1: can_meta_context needs the server's answer ----

#[test]
fn can_meta_context_is_einval_until_the_server_answered_for_the_export() {
    let mut hs = negotiating(false);
    let n = so_far(&hs);
    assert!(!n.meta_valid);
    let e = n.can_meta_context(CONTEXT_BASE_ALLOCATION, &base()).unwrap_err();
    assert_eq!(e.errno(), Errno::EINVAL);
    assert!(e.message().contains("meta context"), "{}", e.message());
    // Nothing asked for: a plain no.
    assert!(!n.can_meta_context(CONTEXT_BASE_ALLOCATION, &[]).unwrap());

    // With request_meta_context off, GO does not set contexts: still no answer.
    let out = answer(&mut hs, OptRequest::Go, &go_ok(OPT_GO, 512));
    let Outcome::Ready(n) = out else { panic!("expected Ready, got {out:?}") };
    assert!(!n.meta_valid);
    assert_eq!(
        n.can_meta_context(CONTEXT_BASE_ALLOCATION, &base()).unwrap_err().errno(),
        Errno::EINVAL
    );
}

#[test]
fn a_context_the_server_did_not_agree_to_is_false_once_it_answered() {
    let mut hs = negotiating(true);
    let mut server = opt_reply(OPT_SET_META_CONTEXT, REP_ACK, &[]);
    server.extend(go_ok(OPT_GO, 512));
    let out = answer(&mut hs, OptRequest::Go, &server);
    let Outcome::Ready(n) = out else { panic!("expected Ready, got {out:?}") };
    assert!(n.meta_valid);
    assert!(!n.can_meta_context(CONTEXT_BASE_ALLOCATION, &base()).unwrap());
}

#[test]
fn no_contexts_asked_for_makes_the_empty_answer_final_at_go() {
    let mut hs = Handshake::new(HandshakeConfig {
        request_extended_headers: false,
        request_block_size: false,
        ..HandshakeConfig::default()
    });
    let mut server = newstyle_greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    server.extend(opt_reply(OPT_STRUCTURED_REPLY, REP_ACK, &[]));
    server.extend(go_ok(OPT_GO, 512));
    let (_, events) = feed(&mut hs, &server);
    let [Outcome::Ready(n)] = &events[..] else { panic!("{events:?}") };
    assert!(n.meta_valid);
}

// ---- item 2: the same export name changes nothing ----

#[test]
fn setting_the_same_export_name_keeps_what_opt_info_learned() {
    let mut hs = negotiating(false);
    hs.set_export_name("disk");
    let out = answer(&mut hs, OptRequest::Info, &go_ok(OPT_INFO, 8192));
    assert!(matches!(out, Outcome::Reply(Ok(OptReply::Info(_)))));
    hs.set_export_name("disk");
    assert_eq!(hs.export_known().expect("still known").export.size, 8192);
    hs.set_export_name("other");
    assert!(hs.export_known().is_none());
    assert_eq!(hs.config().export_name, "other");
}

// ---- item 3: a refused export forgets its meta contexts and details ----

#[test]
fn a_refused_go_forgets_the_meta_contexts_it_set() {
    let mut hs = negotiating(true);
    let mut server = meta_reply(OPT_SET_META_CONTEXT, 3, CONTEXT_BASE_ALLOCATION);
    server.extend(opt_reply(OPT_SET_META_CONTEXT, REP_ACK, &[]));
    server.extend(opt_reply(OPT_GO, REP_ERR_UNKNOWN, b"no such export"));
    let out = answer(&mut hs, OptRequest::Go, &server);
    match out {
        Outcome::Reply(Err(e)) => assert_eq!(e.errno(), Errno::ENOENT),
        other => panic!("expected ENOENT, got {other:?}"),
    }
    assert!(hs.is_negotiating());
    let n = so_far(&hs);
    assert!(!n.meta_valid);
    assert!(n.meta_contexts.is_empty());
    assert_eq!(
        n.can_meta_context(CONTEXT_BASE_ALLOCATION, &base()).unwrap_err().errno(),
        Errno::EINVAL
    );
}

#[test]
fn a_refused_info_forgets_the_previous_details() {
    let mut hs = negotiating(false);
    answer(&mut hs, OptRequest::Info, &go_ok(OPT_INFO, 8192));
    assert!(hs.export_known().is_some());
    let out = answer(&mut hs, OptRequest::Info, &opt_reply(OPT_INFO, REP_ERR_POLICY, &[]));
    assert!(matches!(out, Outcome::Reply(Err(_))), "{out:?}");
    assert!(hs.export_known().is_none());
}

// ---- item 5: option mode against a plain newstyle server ----

fn plain_negotiating() -> Handshake {
    let mut hs = Handshake::new(HandshakeConfig {
        opt_mode: true,
        export_name: "a".into(),
        ..HandshakeConfig::default()
    });
    let (sent, events) = feed(&mut hs, &newstyle_greeting(0));
    assert_eq!(sent, be32(0).to_vec(), "only the client flags: no option is sent");
    assert_eq!(events, vec![Outcome::Negotiating]);
    assert_eq!(hs.protocol(), Some(Protocol::Newstyle));
    hs
}

#[test]
fn option_mode_stops_in_negotiating_against_plain_newstyle() {
    let mut hs = plain_negotiating();
    for req in [
        OptRequest::List,
        OptRequest::Info,
        OptRequest::StructuredReply,
        OptRequest::ExtendedHeaders,
        OptRequest::StartTls,
        OptRequest::ListMetaContext(None),
        OptRequest::SetMetaContext(None),
    ] {
        let e = hs.request(req.clone()).unwrap_err();
        assert_eq!(e.errno(), Errno::ENOTSUP, "{req:?}");
        assert!(hs.is_negotiating(), "{req:?} left the machine negotiating");
        assert!(hs.poll_transmit().is_empty(), "{req:?} sent nothing");
    }
    // GO is NBD_OPT_EXPORT_NAME here, for the name set meanwhile.
    hs.set_export_name("b");
    hs.request(OptRequest::Go).unwrap();
    let mut server = be64(1 << 20).to_vec();
    server.extend(be16(FLAG_HAS_FLAGS));
    server.extend([0u8; 124]);
    let (sent, events) = feed(&mut hs, &server);
    assert_eq!(sent, client_option(OPT_EXPORT_NAME, b"b"));
    let [Outcome::Ready(n)] = &events[..] else { panic!("{events:?}") };
    assert_eq!(n.protocol, Protocol::Newstyle);
    assert_eq!(n.export.size, 1 << 20);
}

#[test]
fn opt_abort_against_plain_newstyle_sends_nothing() {
    let mut hs = plain_negotiating();
    hs.request(OptRequest::Abort).unwrap();
    assert!(hs.poll_transmit().is_empty());
    assert_eq!(hs.poll_event(), Some(Outcome::Reply(Ok(OptReply::Aborted))));
    assert!(hs.is_finished());
}
