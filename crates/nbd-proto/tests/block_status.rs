//! Byte fixtures of block status (32-bit and extended replies, filtering, validation) and
//! of the chunk record of structured reads.

use nbd_proto::consts::*;
use nbd_proto::handshake::{ExportInfo, MetaContext, Negotiated, Protocol};
use nbd_proto::transmission::{
    ChunkStatus, Command, CommandKind, ContextExtents, Decoded, Detail, Event, Extent, ReadChunk,
    ReplyDecoder, Session, Tracking,
};
use nbd_proto::{Errno, Fault};

mod bytes;
use bytes::*;

fn negotiated(extended: bool, flags: u16) -> Negotiated {
    Negotiated {
        protocol: Protocol::FixedNewstyle,
        structured_replies: true,
        extended_headers: extended,
        tls: false,
        export: ExportInfo {
            size: 8 << 30,
            flags: FLAG_HAS_FLAGS | flags,
            ..ExportInfo::default()
        },
        meta_contexts: vec![
            MetaContext { id: 1, name: "base:allocation".into() },
            MetaContext { id: 5, name: "qemu:dirty-bitmap:b0".into() },
        ],
        meta_valid: true,
    }
}

fn bs(offset: u64, length: u64) -> Command {
    Command { kind: CommandKind::BlockStatus, offset, length, flags: 0 }
}

enum End {
    Done(Result<(), nbd_proto::Error>, Detail),
    Fatal(nbd_proto::Error, bool),
}

/// Decodes `input` fed one byte at a time until the command finishes or the decoder fails.
fn decode_all(d: &mut ReplyDecoder<u32>, input: &[u8]) -> End {
    let mut pending = Vec::new();
    for b in input {
        pending.push(*b);
        loop {
            match d.decode(&pending) {
                Err(f) => return End::Fatal(f.error, f.command.is_some()),
                Ok(Decoded { consumed: 0, event: None }) => break,
                Ok(Decoded { consumed, event }) => {
                    pending.drain(..consumed);
                    match event {
                        Some(Event::Done { result, detail, .. }) => return End::Done(result, detail),
                        Some(other) => panic!("unexpected event {other:?}"),
                        None => {}
                    }
                }
            }
        }
    }
    panic!("the input ended before the command finished")
}

fn extents(detail: Detail) -> Vec<ContextExtents> {
    match detail {
        Detail::Extents(e) => e,
        other => panic!("expected extents, got {other:?}"),
    }
}

#[test]
fn compact_block_status_gives_absolute_offsets_per_context() {
    let n = negotiated(false, 0);
    let mut d = ReplyDecoder::new(&n);
    d.register(9, bs(4096, 65536), 0);
    let mut input = chunk(0, REPLY_TYPE_BLOCK_STATUS, 9, &extents32(1, &[(512, 3), (1024, 0)]));
    input.extend(chunk(0, REPLY_TYPE_BLOCK_STATUS, 9, &extents32(5, &[(65536, 1)])));
    input.extend(chunk(REPLY_FLAG_DONE, REPLY_TYPE_NONE, 9, &[]));
    let End::Done(Ok(()), detail) = decode_all(&mut d, &input) else { panic!("expected success") };
    assert_eq!(
        extents(detail),
        vec![
            ContextExtents {
                context_id: 1,
                name: "base:allocation".into(),
                extents: vec![
                    Extent { offset: 4096, length: 512, flags: 3 },
                    Extent { offset: 4608, length: 1024, flags: 0 },
                ],
            },
            ContextExtents {
                context_id: 5,
                name: "qemu:dirty-bitmap:b0".into(),
                extents: vec![Extent { offset: 4096, length: 65536, flags: 1 }],
            },
        ]
    );
    assert!(d.is_empty());
}

#[test]
fn extended_block_status_carries_64_bit_lengths() {
    let n = negotiated(true, 0);
    let mut d = ReplyDecoder::new(&n);
    d.register(2, bs(0, 6 << 30), 0);
    let input = ext_chunk(
        REPLY_FLAG_DONE,
        REPLY_TYPE_BLOCK_STATUS_EXT,
        2,
        &extents64(1, &[(5 << 30, 0), (1 << 30, 3)]),
    );
    let End::Done(Ok(()), detail) = decode_all(&mut d, &input) else { panic!("expected success") };
    assert_eq!(
        extents(detail)[0].extents,
        vec![
            Extent { offset: 0, length: 5 << 30, flags: 0 },
            Extent { offset: 5 << 30, length: 1 << 30, flags: 3 },
        ]
    );
}

#[test]
fn the_final_extent_may_run_past_the_request() {
    let n = negotiated(false, 0);
    let mut d = ReplyDecoder::new(&n);
    d.register(1, bs(0, 1000), 0);
    let input = chunk(REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, 1, &extents32(1, &[(512, 0), (4096, 3)]));
    let End::Done(Ok(()), detail) = decode_all(&mut d, &input) else { panic!("expected success") };
    assert_eq!(extents(detail)[0].extents[1], Extent { offset: 512, length: 4096, flags: 3 });
}

fn fatal(n: &Negotiated, cmd: Command, tracking: Tracking, input: &[u8]) -> (nbd_proto::Error, bool) {
    let mut d = ReplyDecoder::new(n);
    d.register_with(1, cmd, tracking, 0u32);
    match decode_all(&mut d, input) {
        End::Fatal(e, blamed) => {
            assert_eq!(e.fault(), Fault::Protocol);
            assert_eq!(e.errno(), Errno::EPROTO);
            (e, blamed)
        }
        End::Done(r, _) => panic!("expected a protocol error, got {r:?}"),
    }
}

#[test]
fn violations_are_protocol_errors_blamed_on_the_command() {
    let n = negotiated(false, 0);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("never negotiated", chunk(REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, 1, &extents32(77, &[(512, 0)]))),
        ("zero-length extent", chunk(REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, 1, &extents32(1, &[(512, 0), (0, 0)]))),
        (
            "past the requested",
            chunk(REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, 1, &extents32(1, &[(1024, 0), (512, 0)])),
        ),
        ("twice", {
            let mut v = chunk(0, REPLY_TYPE_BLOCK_STATUS, 1, &extents32(1, &[(512, 0)]));
            v.extend(chunk(REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, 1, &extents32(1, &[(512, 0)])));
            v
        }),
        ("whole", chunk(REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, 1, &[0, 0, 0, 1, 0, 0, 0])),
        ("whole", chunk(REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, 1, &[0, 0, 0, 1])),
        (
            "format for compact",
            chunk(REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS_EXT, 1, &extents64(1, &[(512, 0)])),
        ),
    ];
    for (what, input) in cases {
        let (e, blamed) = fatal(&n, bs(0, 1024), Tracking::default(), &input);
        assert!(e.message().contains(what), "{what}: {}", e.message());
        assert!(blamed, "{what}: the command is named");
    }
}

#[test]
fn an_extent_past_the_end_of_the_export_is_a_protocol_error() {
    let n = negotiated(true, 0);
    let (e, _) = fatal(
        &n,
        bs(0, 1024),
        Tracking::default(),
        &ext_chunk(REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS_EXT, 1, &extents64(1, &[(u64::MAX, 0)])),
    );
    assert!(e.message().contains("past the end of the export"), "{}", e.message());
}

#[test]
fn extended_violations() {
    let n = negotiated(true, FLAG_BLOCK_STAT_PAYLOAD);
    let mut bad_count = extents64(1, &[(512, 0)]);
    bad_count[4..8].copy_from_slice(&3u32.to_be_bytes());
    let (e, _) = fatal(&n, bs(0, 1024), Tracking::default(), &ext_chunk(REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS_EXT, 1, &bad_count));
    assert!(e.message().contains("says 3 descriptors"), "{}", e.message());

    let (e, _) = fatal(
        &n,
        bs(0, 1024),
        Tracking::default(),
        &ext_chunk(REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, 1, &extents32(1, &[(512, 0)])),
    );
    assert!(e.message().contains("format for extended"), "{}", e.message());

    let filtered = Tracking { filter: Some(vec![5]), record_chunks: false };
    let (e, _) = fatal(
        &n,
        bs(0, 1024),
        filtered,
        &ext_chunk(REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS_EXT, 1, &extents64(1, &[(512, 0)])),
    );
    assert!(e.message().contains("filtered out"), "{}", e.message());
}

#[test]
fn a_4_gib_block_status_chunk_fails_without_waiting_for_it() {
    let n = negotiated(true, 0);
    let mut d = ReplyDecoder::new(&n);
    d.register(1, bs(0, 1024), 0u32);
    let mut header = EXTENDED_REPLY_MAGIC.to_be_bytes().to_vec();
    header.extend(REPLY_FLAG_DONE.to_be_bytes());
    header.extend(REPLY_TYPE_BLOCK_STATUS_EXT.to_be_bytes());
    header.extend(1u64.to_be_bytes());
    header.extend(0u64.to_be_bytes());
    header.extend((4u64 << 30).to_be_bytes());
    let err = d.decode(&header).expect_err("refused on the header alone");
    assert!(err.error.message().contains("claims 4294967296 bytes"), "{}", err.error.message());
}

#[test]
fn block_status_needs_negotiated_contexts() {
    let mut n = negotiated(false, 0);
    n.meta_contexts.clear();
    let e = Session::new(n).strict(STRICT_MASK).check(&bs(0, 512)).unwrap_err();
    assert_eq!(e.errno(), Errno::ENOTSUP);
}

#[test]
fn block_status_flags_and_64_bit_counts() {
    let s = Session::new(negotiated(false, 0));
    let mut c = bs(0, 512);
    c.flags = CMD_FLAG_REQ_ONE as u32;
    assert_eq!(s.strict(STRICT_MASK).check(&c).unwrap(), CMD_FLAG_REQ_ONE);
    c.flags = CMD_FLAG_FUA as u32;
    assert_eq!(s.strict(STRICT_MASK).check(&c).unwrap_err().errno(), Errno::EINVAL);
    let big = Command { length: 5 << 30, ..bs(0, 0) };
    assert_eq!(s.strict(0).check(&big).unwrap_err().errno(), Errno::ERANGE, "needs extended headers");
    let ext = Session::new(negotiated(true, 0));
    assert!(ext.strict(STRICT_MASK & !STRICT_BOUNDS).check(&big).is_ok());
}

#[test]
fn filters_need_extended_headers_and_known_names() {
    let base = || vec!["base:allocation".to_string()];
    let compact = Session::new(negotiated(false, FLAG_BLOCK_STAT_PAYLOAD));
    assert_eq!(compact.block_status_filter(&base(), STRICT_MASK).unwrap_err().errno(), Errno::ENOTSUP);
    assert_eq!(compact.block_status_filter(&base(), 0).unwrap_err().errno(), Errno::ENOTSUP);
    // Without the server's flag: refused under STRICT_COMMANDS (EINVAL, as libnbd), sent
    // without it.
    let no_flag = Session::new(negotiated(true, 0));
    assert_eq!(no_flag.block_status_filter(&base(), STRICT_MASK).unwrap_err().errno(), Errno::EINVAL);
    assert_eq!(no_flag.block_status_filter(&base(), 0).unwrap(), vec![1]);
    let s = Session::new(negotiated(true, FLAG_BLOCK_STAT_PAYLOAD));
    assert_eq!(s.block_status_filter(&["nope".into()], STRICT_MASK).unwrap_err().errno(), Errno::EINVAL);
    assert_eq!(s.block_status_filter(&["nope".into()], 0).unwrap_err().errno(), Errno::EINVAL);
    // An empty filter and a name given twice go to the server as they are (libnbd tests
    // servers that way); the order of the names is kept.
    assert_eq!(s.block_status_filter(&[], STRICT_MASK).unwrap(), Vec::<u32>::new());
    let twice = ["qemu:dirty-bitmap:b0".to_string(), "qemu:dirty-bitmap:b0".to_string()];
    assert_eq!(s.block_status_filter(&twice, STRICT_MASK).unwrap(), vec![5, 5]);
    let both = ["qemu:dirty-bitmap:b0".to_string(), "base:allocation".to_string()];
    assert_eq!(s.block_status_filter(&both, STRICT_MASK).unwrap(), vec![5, 1]);
    let ids = vec![5];

    let mut out = Vec::new();
    s.encode_block_status_filter(42, &bs(4096, 1 << 20), CMD_FLAG_REQ_ONE, &ids, &mut out);
    let mut want = EXTENDED_REQUEST_MAGIC.to_be_bytes().to_vec();
    want.extend((CMD_FLAG_REQ_ONE | CMD_FLAG_PAYLOAD_LEN).to_be_bytes());
    want.extend(CMD_BLOCK_STATUS.to_be_bytes());
    want.extend(42u64.to_be_bytes());
    want.extend(4096u64.to_be_bytes());
    want.extend(12u64.to_be_bytes()); // payload: effect length + one id
    want.extend((1u64 << 20).to_be_bytes());
    want.extend(5u32.to_be_bytes());
    assert_eq!(out, want);
}

#[test]
fn structured_reads_record_their_chunks() {
    let n = negotiated(false, 0);
    let mut d: ReplyDecoder<u32> = ReplyDecoder::new(&n);
    let read = Command { kind: CommandKind::Read, offset: 1000, length: 300, flags: 0 };
    d.register_with(3, read, Tracking { filter: None, record_chunks: true }, 0);
    let mut hole = 1100u64.to_be_bytes().to_vec();
    hole.extend(200u32.to_be_bytes());
    let mut input = chunk(0, REPLY_TYPE_OFFSET_HOLE, 3, &hole);
    let mut data = 1000u64.to_be_bytes().to_vec();
    data.extend([7u8; 100]);
    input.extend(chunk(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 3, &data));

    let mut pending = input;
    let mut detail = None;
    while detail.is_none() {
        let Decoded { consumed, event } = d.decode(&pending).expect("valid");
        pending.drain(..consumed);
        match event {
            Some(Event::ReadData { len, .. }) => {
                pending.drain(..len);
                d.payload_done();
            }
            Some(Event::Done { detail: got, result, .. }) => {
                assert!(result.is_ok());
                detail = Some(got);
            }
            _ => {}
        }
    }
    assert_eq!(
        detail.unwrap(),
        Detail::Chunks(vec![
            ReadChunk { offset: 1100, length: 200, status: ChunkStatus::Hole },
            ReadChunk { offset: 1000, length: 100, status: ChunkStatus::Data },
        ])
    );
}

#[test]
fn an_error_offset_chunk_is_recorded_and_fails_the_read() {
    let n = negotiated(false, 0);
    let mut d: ReplyDecoder<u32> = ReplyDecoder::new(&n);
    let read = Command { kind: CommandKind::Read, offset: 0, length: 512, flags: 0 };
    d.register_with(4, read, Tracking { filter: None, record_chunks: true }, 0);
    let mut p = 5u32.to_be_bytes().to_vec();
    p.extend(4u16.to_be_bytes());
    p.extend(b"oops");
    p.extend(256u64.to_be_bytes());
    let input = chunk(REPLY_FLAG_DONE, REPLY_TYPE_ERROR_OFFSET, 4, &p);
    let End::Done(Err(e), detail) = decode_all(&mut d, &input) else { panic!("expected an error") };
    assert_eq!(e.errno(), Errno::EIO);
    assert!(e.message().contains("oops"));
    assert_eq!(detail, Detail::Chunks(vec![ReadChunk { offset: 256, length: 0, status: ChunkStatus::Error }]));
}

#[test]
fn a_simple_read_reply_is_recorded_as_one_data_chunk() {
    let mut n = negotiated(false, 0);
    n.structured_replies = false;
    let mut d: ReplyDecoder<u32> = ReplyDecoder::new(&n);
    let read = Command { kind: CommandKind::Read, offset: 4096, length: 8, flags: 0 };
    d.register_with(6, read, Tracking { filter: None, record_chunks: true }, 0);
    let mut input = SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
    input.extend(0u32.to_be_bytes());
    input.extend(6u64.to_be_bytes());
    let Decoded { consumed, event } = d.decode(&input).expect("valid");
    assert_eq!(consumed, input.len());
    assert!(matches!(event, Some(Event::ReadData { cookie: 6, buf_offset: 0, len: 8 })));
    d.payload_done();
    let Decoded { event: Some(Event::Done { result, detail, .. }), .. } = d.decode(&[]).expect("valid") else {
        panic!("expected the read to finish")
    };
    assert!(result.is_ok());
    assert_eq!(detail, Detail::Chunks(vec![ReadChunk { offset: 4096, length: 8, status: ChunkStatus::Data }]));
}

#[test]
fn a_filtered_request_is_checked_as_a_filter_before_its_range() {
    let base = vec!["base:allocation".to_string()];
    let check = |s: &Session, c: Command, strict: u32| {
        s.strict(strict).check_submission(&c, false, Some(&base)).map(|(f, _)| f).map_err(|e| e.errno())
    };
    let past_end = bs(1 << 40, 512);
    // No extended headers: ENOTSUP comes before the range (EINVAL) or a zero count.
    let compact = Session::new(negotiated(false, FLAG_BLOCK_STAT_PAYLOAD));
    assert_eq!(check(&compact, past_end, STRICT_MASK), Err(Errno::ENOTSUP));
    assert_eq!(check(&compact, bs(0, 0), STRICT_MASK), Err(Errno::ENOTSUP));
    // No payload flag and no contexts: the flag (EINVAL) is checked before the contexts.
    let mut bare = negotiated(true, 0);
    bare.meta_contexts.clear();
    assert_eq!(check(&Session::new(bare), bs(0, 512), STRICT_MASK), Err(Errno::EINVAL));
    // Everything in place: the range is then checked as for any block status.
    let ok = Session::new(negotiated(true, FLAG_BLOCK_STAT_PAYLOAD));
    assert_eq!(check(&ok, past_end, STRICT_MASK), Err(Errno::EINVAL));
    let (_, ids) = ok.strict(STRICT_MASK).check_submission(&bs(0, 512), false, Some(&base)).unwrap();
    assert_eq!(ids.map(|v| v.len()), Some(1));
}
