//! Byte builders for tests: the server's messages (greetings, option replies, reply chunks)
//! and the client's (option requests), written out field by field from the protocol
//! specification, independently of the library's encoders.
//!
//! The one copy shared by every test that builds NBD bytes by hand: the fixture tests of
//! this crate (`mod bytes;`), the random-input harness (`tests/harness`, and through it
//! `examples/fuzz.rs` and `fuzz/fuzz_targets`) and the tests of `nbd-client`, which include
//! this file with `#[path]`. It depends on `nbd_proto::consts` only.

#![allow(dead_code)]

use nbd_proto::consts::*;

/// `v` in network byte order.
pub fn be16(v: u16) -> [u8; 2] {
    v.to_be_bytes()
}

/// `v` in network byte order.
pub fn be32(v: u32) -> [u8; 4] {
    v.to_be_bytes()
}

/// `v` in network byte order.
pub fn be64(v: u64) -> [u8; 8] {
    v.to_be_bytes()
}

/// Appends `x` in network byte order (for generators that build into one buffer).
pub fn push16(v: &mut Vec<u8>, x: u16) {
    v.extend(be16(x));
}

/// Appends `x` in network byte order.
pub fn push32(v: &mut Vec<u8>, x: u32) {
    v.extend(be32(x));
}

/// Appends `x` in network byte order.
pub fn push64(v: &mut Vec<u8>, x: u64) {
    v.extend(be64(x));
}

// ---- the handshake, server side ----

/// NBDMAGIC, IHAVEOPT and the server's handshake flags.
pub fn newstyle_greeting(server_flags: u16) -> Vec<u8> {
    let mut v = be64(NBDMAGIC).to_vec();
    v.extend(be64(IHAVEOPT));
    v.extend(be16(server_flags));
    v
}

/// The whole oldstyle greeting: magics, size, 32-bit flags, 124 zeroes.
pub fn oldstyle_greeting(size: u64, flags: u16) -> Vec<u8> {
    let mut v = be64(NBDMAGIC).to_vec();
    v.extend(be64(OLDSTYLE_MAGIC));
    v.extend(be64(size));
    v.extend(be32(flags as u32));
    v.extend([0u8; 124]);
    v
}

/// An option reply with its header.
pub fn opt_reply(option: u32, reply: u32, payload: &[u8]) -> Vec<u8> {
    let mut v = be64(OPT_REPLY_MAGIC).to_vec();
    v.extend(be32(option));
    v.extend(be32(reply));
    v.extend(be32(payload.len() as u32));
    v.extend_from_slice(payload);
    v
}

/// The payload of an `NBD_REP_INFO` with `NBD_INFO_EXPORT`.
pub fn info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut v = be16(INFO_EXPORT).to_vec();
    v.extend(be64(size));
    v.extend(be16(flags));
    v
}

/// The payload of an `NBD_REP_INFO` with `NBD_INFO_BLOCK_SIZE`.
pub fn info_block_size(minimum: u32, preferred: u32, maximum: u32) -> Vec<u8> {
    let mut v = be16(INFO_BLOCK_SIZE).to_vec();
    v.extend(be32(minimum));
    v.extend(be32(preferred));
    v.extend(be32(maximum));
    v
}

/// The payload of an `NBD_REP_INFO` with `NBD_INFO_NAME` or `NBD_INFO_DESCRIPTION`.
pub fn info_text(kind: u16, text: &str) -> Vec<u8> {
    let mut v = be16(kind).to_vec();
    v.extend_from_slice(text.as_bytes());
    v
}

/// A successful GO/INFO (`option`): `NBD_INFO_EXPORT` (size `size`, flush supported),
/// then `NBD_REP_ACK`.
pub fn go_ok(option: u32, size: u64) -> Vec<u8> {
    let mut v = opt_reply(option, REP_INFO, &info_export(size, FLAG_HAS_FLAGS | FLAG_SEND_FLUSH));
    v.extend(opt_reply(option, REP_ACK, &[]));
    v
}

/// An `NBD_REP_META_CONTEXT` reply to `option`.
pub fn meta_reply(option: u32, id: u32, name: &str) -> Vec<u8> {
    let mut p = be32(id).to_vec();
    p.extend_from_slice(name.as_bytes());
    opt_reply(option, REP_META_CONTEXT, &p)
}

/// The server's answer to `NBD_OPT_EXPORT_NAME`.
pub fn export_name_reply(size: u64, flags: u16, zeroes: bool) -> Vec<u8> {
    let mut v = be64(size).to_vec();
    v.extend(be16(flags));
    if zeroes {
        v.extend([0u8; 124]);
    }
    v
}

// ---- the handshake, client side (what the client is expected to send) ----

/// An option request.
pub fn client_option(option: u32, data: &[u8]) -> Vec<u8> {
    let mut v = be64(IHAVEOPT).to_vec();
    v.extend(be32(option));
    v.extend(be32(data.len() as u32));
    v.extend_from_slice(data);
    v
}

/// The data of `NBD_OPT_GO`/`NBD_OPT_INFO`: the export name and the information requests.
pub fn go_payload(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut v = be32(name.len() as u32).to_vec();
    v.extend_from_slice(name.as_bytes());
    v.extend(be16(infos.len() as u16));
    for i in infos {
        v.extend(be16(*i));
    }
    v
}

/// The data of `NBD_OPT_SET_META_CONTEXT`/`NBD_OPT_LIST_META_CONTEXT`.
pub fn meta_request(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut v = be32(name.len() as u32).to_vec();
    v.extend_from_slice(name.as_bytes());
    v.extend(be32(queries.len() as u32));
    for q in queries {
        v.extend(be32(q.len() as u32));
        v.extend_from_slice(q.as_bytes());
    }
    v
}

// ---- replies in the transmission phase ----

/// A simple reply header.
pub fn simple_reply(error: u32, cookie: u64) -> Vec<u8> {
    let mut v = be32(SIMPLE_REPLY_MAGIC).to_vec();
    v.extend(be32(error));
    v.extend(be64(cookie));
    v
}

/// A compact structured chunk header announcing `length` bytes.
pub fn chunk_header(flags: u16, kind: u16, cookie: u64, length: u32) -> Vec<u8> {
    let mut v = be32(STRUCTURED_REPLY_MAGIC).to_vec();
    v.extend(be16(flags));
    v.extend(be16(kind));
    v.extend(be64(cookie));
    v.extend(be32(length));
    v
}

/// An extended chunk header announcing `length` bytes.
pub fn ext_chunk_header(flags: u16, kind: u16, cookie: u64, offset: u64, length: u64) -> Vec<u8> {
    let mut v = be32(EXTENDED_REPLY_MAGIC).to_vec();
    v.extend(be16(flags));
    v.extend(be16(kind));
    v.extend(be64(cookie));
    v.extend(be64(offset));
    v.extend(be64(length));
    v
}

/// A compact structured chunk with its payload.
pub fn chunk(flags: u16, kind: u16, cookie: u64, payload: &[u8]) -> Vec<u8> {
    let mut v = chunk_header(flags, kind, cookie, payload.len() as u32);
    v.extend_from_slice(payload);
    v
}

/// An extended chunk (offset field 0) with its payload.
pub fn ext_chunk(flags: u16, kind: u16, cookie: u64, payload: &[u8]) -> Vec<u8> {
    let mut v = ext_chunk_header(flags, kind, cookie, 0, payload.len() as u64);
    v.extend_from_slice(payload);
    v
}

/// `NBD_REPLY_TYPE_OFFSET_DATA`.
pub fn data_chunk(flags: u16, cookie: u64, offset: u64, data: &[u8]) -> Vec<u8> {
    let mut p = be64(offset).to_vec();
    p.extend_from_slice(data);
    chunk(flags, REPLY_TYPE_OFFSET_DATA, cookie, &p)
}

/// `NBD_REPLY_TYPE_OFFSET_HOLE`.
pub fn hole_chunk(flags: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut p = be64(offset).to_vec();
    p.extend(be32(len));
    chunk(flags, REPLY_TYPE_OFFSET_HOLE, cookie, &p)
}

/// The start of every error chunk's payload: the error and the message.
pub fn error_payload(error: u32, msg: &str) -> Vec<u8> {
    let mut p = be32(error).to_vec();
    p.extend(be16(msg.len() as u16));
    p.extend_from_slice(msg.as_bytes());
    p
}

/// `NBD_REPLY_TYPE_ERROR`.
pub fn error_chunk(flags: u16, cookie: u64, error: u32, msg: &str) -> Vec<u8> {
    chunk(flags, REPLY_TYPE_ERROR, cookie, &error_payload(error, msg))
}

/// `NBD_REPLY_TYPE_ERROR_OFFSET`.
pub fn error_offset_chunk(flags: u16, cookie: u64, error: u32, msg: &str, offset: u64) -> Vec<u8> {
    let mut p = error_payload(error, msg);
    p.extend(be64(offset));
    chunk(flags, REPLY_TYPE_ERROR_OFFSET, cookie, &p)
}

/// The final, empty `NBD_REPLY_TYPE_NONE`.
pub fn none_chunk(cookie: u64) -> Vec<u8> {
    chunk(REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, &[])
}

/// The payload of `NBD_REPLY_TYPE_BLOCK_STATUS`: context id, then (length, flags) pairs.
pub fn extents32(id: u32, list: &[(u32, u32)]) -> Vec<u8> {
    let mut v = be32(id).to_vec();
    for (len, flags) in list {
        v.extend(be32(*len));
        v.extend(be32(*flags));
    }
    v
}

/// The payload of `NBD_REPLY_TYPE_BLOCK_STATUS_EXT`: context id, count, then 64-bit pairs.
pub fn extents64(id: u32, list: &[(u64, u64)]) -> Vec<u8> {
    let mut v = be32(id).to_vec();
    v.extend(be32(list.len() as u32));
    for (len, flags) in list {
        v.extend(be64(*len));
        v.extend(be64(*flags));
    }
    v
}
