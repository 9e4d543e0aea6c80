//! The `handshake` target: server bytes fed to [`Handshake`] whole and in pieces.

use super::bytes::{self, push16, push32, push64};
use super::{check_allocation, chunking, measure, mutate, Rng, Source};
use nbd_proto::consts::*;
use nbd_proto::handshake::{Handshake, HandshakeConfig, Negotiated, Protocol};
use nbd_proto::{Errno, Error, Fault, Result};

/// One handshake case.
///
/// Encoding: `[config bits][chunk seed: u64 BE][server bytes...]`. Config bits: 0 request
/// structured replies, 1 request block size, 2 full info, 3 offer `FLAG_C_FIXED_NEWSTYLE`,
/// 4 offer `FLAG_C_NO_ZEROES`, 5 the server hangs up after its bytes, 6-7 export name
/// (`""`, `"disk"`, 4097 bytes, non-ASCII).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Case {
    pub bits: u8,
    pub chunk_seed: u64,
    pub server: Vec<u8>,
}

impl Case {
    pub fn decode(data: &[u8]) -> Case {
        let mut s = Source::new(data);
        Case {
            bits: s.u8(),
            chunk_seed: s.u64(),
            server: s.rest().to_vec(),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut v = vec![self.bits];
        v.extend(self.chunk_seed.to_be_bytes());
        v.extend_from_slice(&self.server);
        v
    }

    pub fn config(&self) -> HandshakeConfig {
        let b = self.bits;
        let mut handshake_flags = 0;
        if b & 8 != 0 {
            handshake_flags |= FLAG_C_FIXED_NEWSTYLE;
        }
        if b & 16 != 0 {
            handshake_flags |= FLAG_C_NO_ZEROES;
        }
        HandshakeConfig {
            export_name: match b >> 6 {
                0 => String::new(),
                1 => "disk".to_string(),
                2 => "n".repeat(MAX_STRING + 1),
                _ => "dïsk/ü".to_string(),
            },
            request_structured_replies: b & 1 != 0,
            request_block_size: b & 2 != 0,
            full_info: b & 4 != 0,
            handshake_flags,
            // The option-order checks below model the handshake before extended headers,
            // meta contexts and option mode; those paths have byte fixtures (options.rs).
            request_extended_headers: false,
            ..HandshakeConfig::default()
        }
    }

    pub fn eof(&self) -> bool {
        self.bits & 32 != 0
    }
}

/// What one run produced.
#[derive(Debug, PartialEq)]
struct Run {
    output: Vec<u8>,
    outcome: Option<Result<Negotiated>>,
    leftover: Vec<u8>,
}

/// A coarse label of how a run ended, for the drivers' statistics.
fn label(outcome: &Option<Result<Negotiated>>) -> &'static str {
    match outcome {
        None => "pending",
        Some(Ok(n)) if n.protocol == Protocol::Oldstyle => "ok (oldstyle)",
        Some(Ok(n)) if n.structured_replies => "ok (structured)",
        Some(Ok(_)) => "ok (simple)",
        Some(Err(e)) => match e.fault() {
            Fault::Protocol => "protocol error",
            Fault::Io => "hang-up",
            Fault::Server => "server refusal",
            Fault::Usage => "usage error",
            _ => "other error",
        },
    }
}

/// Runs `case` whole and in its pieces and checks every invariant; returns how it ended.
pub fn check(case: &Case) -> std::result::Result<&'static str, String> {
    let (result, largest) = measure(|| -> std::result::Result<&'static str, String> {
        let whole = run(case, &[case.server.len()])?;
        let pieces = run(case, &chunking(case.chunk_seed, case.server.len()))?;
        if whole != pieces {
            return Err(format!(
                "feeding the bytes whole and in pieces differ:\nwhole:  {whole:?}\npieces: {pieces:?}"
            ));
        }
        check_output(case, &whole)?;
        check_outcome(case, &whole)?;
        Ok(label(&whole.outcome))
    });
    let label = result?;
    check_allocation(largest, case.server.len())?;
    Ok(label)
}

fn run(case: &Case, sizes: &[usize]) -> std::result::Result<Run, String> {
    let mut hs = Handshake::new(case.config());
    let mut output = Vec::new();
    let mut outcome = None;
    let mut at = 0;
    let deliver = |hs: &mut Handshake,
                   output: &mut Vec<u8>,
                   outcome: &mut Option<Result<Negotiated>>|
     -> std::result::Result<(), String> {
        let out = hs.poll_transmit();
        if outcome.is_some() && !out.is_empty() {
            return Err(format!("{} bytes to send after the outcome", out.len()));
        }
        output.extend(out);
        if let Some(o) = hs.poll_outcome() {
            if outcome.is_some() {
                return Err("poll_outcome yielded a second outcome".into());
            }
            *outcome = Some(o);
            if hs.poll_outcome().is_some() {
                return Err("poll_outcome yielded twice in a row".into());
            }
        }
        Ok(())
    };
    for &n in sizes {
        hs.handle_input(&case.server[at..at + n]);
        at += n;
        deliver(&mut hs, &mut output, &mut outcome)?;
    }
    if case.eof() {
        let before = outcome.is_some();
        hs.handle_eof();
        deliver(&mut hs, &mut output, &mut outcome)?;
        match (&outcome, before) {
            (None, _) => return Err("no outcome after the server hung up".into()),
            (Some(Err(e)), false) if e.fault() != Fault::Io || e.errno() != Errno::ECONNRESET => {
                return Err(format!(
                    "hang-up reported as {e:?}, not an ECONNRESET I/O error"
                ))
            }
            (Some(Ok(_)), false) => return Err("the hang-up produced a successful outcome".into()),
            _ => {}
        }
        // A second hang-up changes nothing either.
        hs.handle_eof();
        deliver(&mut hs, &mut output, &mut outcome)?;
    }
    let leftover = hs.take_leftover();
    if outcome.is_some() {
        // After the outcome the machine only collects transmission-phase bytes.
        if !case.server.ends_with(&leftover) {
            return Err("the leftover is not a suffix of the server's bytes".into());
        }
        hs.handle_input(b"more bytes after the outcome");
        deliver(&mut hs, &mut output, &mut outcome)?;
        if hs.take_leftover() != b"more bytes after the outcome" {
            return Err("input after the outcome was not kept as leftover".into());
        }
    } else {
        let needed = decision_point(&output, &leftover);
        if leftover.len() >= needed {
            return Err(format!(
                "waiting for more input while holding {} bytes; {needed} decide the next step",
                leftover.len()
            ));
        }
    }
    Ok(Run {
        output,
        outcome,
        leftover,
    })
}

/// How many unconsumed server bytes suffice for the machine to move on, judged from what
/// the client has sent so far (the machine consumes whole messages, so the leftover of a
/// pending handshake starts at a message boundary): it may wait for more input only while
/// it holds fewer. An independent reading of the protocol, so that a machine that stalls
/// on a complete message is caught as the hang it would be.
fn decision_point(output: &[u8], leftover: &[u8]) -> usize {
    if output.is_empty() {
        // The greeting: 16 bytes of magics, then 136 more (oldstyle) or 2 flag bytes
        // (newstyle, which makes the client answer). The magics are consumed on their own,
        // so which of these is pending cannot be told from the leftover: allow the largest.
        return 136;
    }
    // The last option sent (the output is well formed, checked separately).
    let mut rest = output.get(4..).unwrap_or_default();
    let mut last = None;
    while rest.len() >= 16 {
        let len = u32::from_be_bytes(rest[12..16].try_into().unwrap()) as usize;
        last = Some(u32::from_be_bytes(rest[8..12].try_into().unwrap()));
        rest = rest.get(16 + len..).unwrap_or_default();
    }
    match last {
        // Flags sent and nothing else: the machine had nothing to wait for.
        None => 0,
        Some(OPT_EXPORT_NAME) => {
            let flags = u32::from_be_bytes(output[..4].try_into().unwrap());
            if flags & FLAG_C_NO_ZEROES != 0 {
                10
            } else {
                10 + 124
            }
        }
        Some(_) => match leftover.get(16..20) {
            None => 20,
            Some(l) => {
                let len = u32::from_be_bytes(l.try_into().unwrap());
                if len > MAX_OPTION_REPLY {
                    20
                } else {
                    20 + len as usize
                }
            }
        },
    }
}

/// The option requests in the client's bytes after its flags: (option, data) each.
fn client_options(mut rest: &[u8]) -> std::result::Result<Vec<(u32, &[u8])>, String> {
    let mut options = Vec::new();
    while !rest.is_empty() {
        if rest.len() < 16 {
            return Err(format!("a partial option header of {} bytes", rest.len()));
        }
        let magic = u64::from_be_bytes(rest[..8].try_into().unwrap());
        let option = u32::from_be_bytes(rest[8..12].try_into().unwrap());
        let len = u32::from_be_bytes(rest[12..16].try_into().unwrap()) as usize;
        if magic != IHAVEOPT {
            return Err(format!("option with magic {magic:#x}"));
        }
        if rest.len() < 16 + len {
            return Err(format!(
                "option {option} claims {len} bytes, {} sent",
                rest.len() - 16
            ));
        }
        options.push((option, &rest[16..16 + len]));
        rest = &rest[16 + len..];
    }
    Ok(options)
}

/// The client's bytes: client flags, then options, each complete and well framed.
fn check_output(case: &Case, run: &Run) -> std::result::Result<(), String> {
    let config = case.config();
    let out = &run.output;
    let oldstyle = matches!(&run.outcome, Some(Ok(n)) if n.protocol == Protocol::Oldstyle);
    if out.is_empty() {
        if matches!(&run.outcome, Some(Ok(n)) if n.protocol != Protocol::Oldstyle) {
            return Err("a newstyle handshake succeeded without the client saying anything".into());
        }
        return Ok(());
    }
    if oldstyle {
        return Err("the client sent bytes to an oldstyle server".into());
    }
    if out.len() < 4 {
        return Err(format!(
            "client output of {} bytes is shorter than its flags",
            out.len()
        ));
    }
    let flags = u32::from_be_bytes(out[..4].try_into().unwrap());
    if flags & !config.handshake_flags != 0 || flags > 3 {
        return Err(format!(
            "client flags {flags:#x} not within the configured {:#x}",
            config.handshake_flags
        ));
    }
    let options = client_options(&out[4..])?;
    let name = config.export_name.as_bytes();
    for (i, &(option, data)) in options.iter().enumerate() {
        match option {
            OPT_STRUCTURED_REPLY => {
                if i != 0 || !config.request_structured_replies || !data.is_empty() {
                    return Err(format!("unexpected NBD_OPT_STRUCTURED_REPLY as option {i}"));
                }
            }
            OPT_GO => {
                let mut infos = Vec::new();
                if config.request_block_size {
                    infos.push(INFO_BLOCK_SIZE);
                }
                if config.full_info {
                    infos.extend([INFO_NAME, INFO_DESCRIPTION]);
                }
                let want = bytes::go_payload(&config.export_name, &infos);
                if data != want.as_slice() {
                    return Err(format!(
                        "NBD_OPT_GO carries {data:02x?}, expected {want:02x?}"
                    ));
                }
            }
            OPT_EXPORT_NAME => {
                if data != name {
                    return Err("NBD_OPT_EXPORT_NAME carries the wrong name".into());
                }
                if i + 1 != options.len() {
                    return Err("options sent after NBD_OPT_EXPORT_NAME".into());
                }
            }
            other => return Err(format!("the client sent unknown option {other}")),
        }
    }
    if options.len() > 3 {
        return Err(format!(
            "{} options sent; at most 3 are ever needed",
            options.len()
        ));
    }
    Ok(())
}

fn check_error(e: &Error) -> std::result::Result<(), String> {
    if e.message().is_empty() {
        return Err(format!("an error without a message: {e:?}"));
    }
    match e.fault() {
        Fault::Protocol if e.errno() == Errno::EPROTO => Ok(()),
        Fault::Io if e.errno() == Errno::ECONNRESET => Ok(()),
        Fault::Server => Ok(()),
        Fault::Usage if e.errno() == Errno::ENAMETOOLONG => Ok(()),
        _ => Err(format!("an error with an unexpected fault or errno: {e:?}")),
    }
}

fn check_outcome(case: &Case, run: &Run) -> std::result::Result<(), String> {
    let config = case.config();
    match &run.outcome {
        None => {
            if case.eof() {
                return Err("no outcome although the server hung up".into());
            }
            Ok(())
        }
        Some(Err(e)) => {
            check_error(e)?;
            if e.fault() == Fault::Usage && config.export_name.len() <= MAX_STRING {
                return Err(format!("a usage error with a valid name: {e:?}"));
            }
            Ok(())
        }
        Some(Ok(n)) => {
            let ex = &n.export;
            if ex.size > i64::MAX as u64 {
                return Err(format!("accepted export size {}", ex.size));
            }
            if ex.flags != 0 && ex.flags & FLAG_HAS_FLAGS == 0 {
                return Err(format!("flags {:#x} kept without FLAG_HAS_FLAGS", ex.flags));
            }
            if let Some(bs) = ex.block_size {
                let ok = bs.minimum.is_power_of_two()
                    && bs.minimum <= 64 * 1024
                    && bs.preferred.is_power_of_two()
                    && bs.preferred >= bs.minimum
                    && bs.maximum >= bs.minimum;
                if !ok {
                    return Err(format!("accepted impossible block sizes {bs:?}"));
                }
            }
            let payload_max = ex.payload_max();
            if !(1 << 20..=MAX_PAYLOAD_HARD).contains(&payload_max) {
                return Err(format!("payload maximum {payload_max} out of range"));
            }
            for text in [&ex.canonical_name, &ex.description].into_iter().flatten() {
                // Lossy decoding may triple invalid bytes, never more.
                if text.len() > 3 * MAX_STRING {
                    return Err(format!("accepted a string of {} bytes", text.len()));
                }
            }
            if n.extended_headers {
                return Err("extended headers without asking for them".into());
            }
            if n.structured_replies && !config.request_structured_replies {
                return Err("structured replies without asking for them".into());
            }
            if n.protocol != Protocol::Oldstyle && config.export_name.len() > MAX_STRING {
                return Err("a newstyle handshake succeeded with an over-long name".into());
            }
            Ok(())
        }
    }
}

// ---- generation ----

fn opt_reply(v: &mut Vec<u8>, option: u32, reply: u32, payload: &[u8]) {
    v.extend(bytes::opt_reply(option, reply, payload));
}

fn size(rng: &mut Rng) -> u64 {
    match rng.below(6) {
        0 => 0,
        1 => i64::MAX as u64,
        2 => rng.range(i64::MAX as u64 + 1, u64::MAX),
        _ => rng.below(1 << 40),
    }
}

fn text(rng: &mut Rng) -> Vec<u8> {
    match rng.below(5) {
        0 => Vec::new(),
        1 => vec![b'x'; MAX_STRING],
        2 => vec![b'y'; MAX_STRING + 1],
        3 => {
            let n = rng.below(40) as usize;
            rng.bytes(n)
        }
        _ => b"a description".to_vec(),
    }
}

fn pow2(rng: &mut Rng) -> u32 {
    1u32 << rng.below(32)
}

/// One `NBD_REP_INFO` payload, usually valid.
fn info(rng: &mut Rng) -> Vec<u8> {
    let mut p = Vec::new();
    match rng.below(7) {
        0 | 1 => {
            push16(&mut p, INFO_EXPORT);
            push64(&mut p, size(rng));
            push16(
                &mut p,
                rng.next_u64() as u16 | if rng.chance(3, 4) { 1 } else { 0 },
            );
        }
        2 | 3 => {
            push16(&mut p, INFO_BLOCK_SIZE);
            let (min, pref, max) = if rng.chance(3, 4) {
                let min = 1u32 << rng.below(17);
                let pref = min << rng.below(4);
                let max = if rng.chance(1, 4) {
                    u32::MAX
                } else {
                    min.saturating_mul(rng.range(1, 1 << 14) as u32)
                };
                (min, pref, max)
            } else {
                (pow2(rng), rng.next_u64() as u32, rng.next_u64() as u32)
            };
            push32(&mut p, min);
            push32(&mut p, pref);
            push32(&mut p, max);
        }
        4 => {
            push16(&mut p, INFO_NAME);
            p.extend(text(rng));
        }
        5 => {
            push16(&mut p, INFO_DESCRIPTION);
            p.extend(text(rng));
        }
        _ => {
            push16(&mut p, rng.next_u64() as u16);
            let n = rng.below(20) as usize;
            p.extend(rng.bytes(n));
        }
    }
    p
}

fn export_name_reply(rng: &mut Rng, v: &mut Vec<u8>, zeroes: bool) {
    let size = size(rng);
    v.extend(bytes::export_name_reply(size, rng.next_u64() as u16, zeroes));
}

const ERRORS: &[u32] = &[
    REP_ERR_UNSUP,
    REP_ERR_POLICY,
    REP_ERR_INVALID,
    REP_ERR_PLATFORM,
    REP_ERR_TLS_REQD,
    REP_ERR_UNKNOWN,
    REP_ERR_SHUTDOWN,
    REP_ERR_BLOCK_SIZE_REQD,
    REP_ERR_TOO_BIG,
    REP_ERR_EXT_HEADER_REQD,
    REP_FLAG_ERROR | 0x7fff,
];

/// A fixed newstyle server's answers to what the client asks: structured replies (when
/// configured), then GO with its information, refusals and fallbacks mixed in.
fn fixed_newstyle_replies(rng: &mut Rng, v: &mut Vec<u8>, config: &HandshakeConfig, zeroes: bool) {
    if config.request_structured_replies {
        match rng.below(10) {
            0 => opt_reply(v, OPT_STRUCTURED_REPLY, REP_ERR_UNSUP, &[]),
            1 => opt_reply(v, OPT_STRUCTURED_REPLY, rng.pick(ERRORS), &text(rng)),
            2 => opt_reply(v, OPT_STRUCTURED_REPLY, REP_ACK, b"junk"),
            3 => opt_reply(v, rng.pick(&[OPT_GO, OPT_INFO, 0]), REP_ACK, &[]),
            _ => opt_reply(v, OPT_STRUCTURED_REPLY, REP_ACK, &[]),
        }
    }
    let infos = rng.below(5);
    // Most servers do send NBD_INFO_EXPORT, which success needs.
    let export_at = if rng.chance(3, 4) {
        rng.below(infos + 1)
    } else {
        u64::MAX
    };
    for i in 0..=infos {
        if i == export_at {
            let mut p = Vec::new();
            push16(&mut p, INFO_EXPORT);
            push64(&mut p, rng.below(1 << 40));
            push16(&mut p, rng.next_u64() as u16 | FLAG_HAS_FLAGS);
            opt_reply(v, OPT_GO, REP_INFO, &p);
        }
        if i < infos {
            let p = info(rng);
            opt_reply(v, OPT_GO, REP_INFO, &p);
        }
    }
    match rng.below(8) {
        0 => {
            opt_reply(v, OPT_GO, REP_ERR_UNSUP, &[]);
            export_name_reply(rng, v, zeroes);
        }
        1 => opt_reply(v, OPT_GO, rng.pick(ERRORS), &text(rng)),
        2 => opt_reply(
            v,
            OPT_GO,
            rng.pick(&[REP_SERVER, REP_META_CONTEXT, 99]),
            &[],
        ),
        3 => {}
        _ => opt_reply(v, OPT_GO, REP_ACK, &[]),
    }
}

/// A plausible server transcript for `config`, then (half of the time) mutated.
pub fn generate(rng: &mut Rng) -> Case {
    let mut bits = rng.u8();
    if bits >> 6 == 2 && rng.chance(3, 4) {
        // Keep the over-long name (refused client-side) to a sixteenth of the cases.
        bits ^= 0xc0;
    }
    let chunk_seed = rng.next_u64();
    let mut case = Case {
        bits,
        chunk_seed,
        server: Vec::new(),
    };
    let config = case.config();
    let v = &mut case.server;
    match rng.below(12) {
        0 => {
            let n = rng.below(64) as usize;
            *v = rng.bytes(n);
        }
        1 => {
            push64(v, NBDMAGIC);
            push64(v, OLDSTYLE_MAGIC);
            push64(v, size(rng));
            push32(v, rng.next_u64() as u32);
            v.extend([0u8; 124]);
        }
        _ => {
            push64(v, NBDMAGIC);
            push64(v, IHAVEOPT);
            let server_flags = match rng.below(4) {
                0 => rng.next_u64() as u16,
                1 => FLAG_FIXED_NEWSTYLE,
                _ => FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES,
            };
            push16(v, server_flags);
            let client = server_flags as u32 & config.handshake_flags & 3;
            let zeroes = client & FLAG_C_NO_ZEROES == 0;
            if client & FLAG_C_FIXED_NEWSTYLE == 0 {
                export_name_reply(rng, v, zeroes);
            } else {
                fixed_newstyle_replies(rng, v, &config, zeroes);
            }
        }
    }
    if rng.chance(1, 4) {
        let n = rng.range(1, 40) as usize;
        v.extend(rng.bytes(n));
    }
    if rng.chance(1, 2) {
        mutate(rng, v);
    }
    case
}
