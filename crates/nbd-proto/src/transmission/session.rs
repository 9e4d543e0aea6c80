//! [`Session`]: what the handshake settled, for checking and framing requests.

use crate::consts::*;
use crate::error::Result;
use crate::handshake::Negotiated;
use crate::wire::{put_u16, put_u32, put_u64};

use super::command::Command;
use super::strict::StrictChecks;

/// What the handshake settled, needed to check and frame commands.
#[derive(Debug, Clone)]
pub struct Session {
    /// The handshake's result.
    pub negotiated: Negotiated,
}

impl Session {
    /// A session after `negotiated`.
    pub fn new(negotiated: Negotiated) -> Session {
        Session { negotiated }
    }

    /// The strict checks of this session under the strict-mode bits `mode` (`STRICT_*`):
    /// `session.strict(mode).check(&cmd)` refuses what libnbd refuses client-side and
    /// returns the flags to send.
    pub fn strict(&self, mode: u32) -> StrictChecks<'_> {
        StrictChecks::new(&self.negotiated, mode)
    }

    /// The context ids for a block status request filtered to `names`
    /// (`nbd_block_status_filter`), in the order given, after
    /// [`StrictChecks::check_filter`]; see [`StrictChecks::filter_ids`].
    pub fn block_status_filter(&self, names: &[String], strict_mode: u32) -> Result<Vec<u32>> {
        let checks = self.strict(strict_mode);
        checks.check_filter()?;
        checks.filter_ids(names)
    }

    /// Appends a block status request filtered to context `ids` (from
    /// [`Session::block_status_filter`]): the header with `NBD_CMD_FLAG_PAYLOAD_LEN`, then
    /// the effect length and the ids.
    pub fn encode_block_status_filter(&self, cookie: u64, cmd: &Command, flags: u16, ids: &[u32], out: &mut Vec<u8>) {
        let payload = 8 + 4 * ids.len() as u64;
        let header = Command { length: payload, ..*cmd };
        self.encode_request(cookie, &header, flags | CMD_FLAG_PAYLOAD_LEN, out);
        put_u64(out, cmd.length);
        for id in ids {
            put_u32(out, *id);
        }
    }

    /// Appends the request header for `cmd` (already checked, `flags` as returned by
    /// [`StrictChecks::check`]).
    pub fn encode_request(&self, cookie: u64, cmd: &Command, flags: u16, out: &mut Vec<u8>) {
        if self.negotiated.extended_headers {
            put_u32(out, EXTENDED_REQUEST_MAGIC);
            put_u16(out, flags);
            put_u16(out, cmd.kind.code());
            put_u64(out, cookie);
            put_u64(out, cmd.offset);
            put_u64(out, cmd.length);
        } else {
            put_u32(out, REQUEST_MAGIC);
            put_u16(out, flags);
            put_u16(out, cmd.kind.code());
            put_u64(out, cookie);
            put_u64(out, cmd.offset);
            put_u32(out, cmd.length as u32);
        }
    }

    /// Bytes of a request header in this session.
    pub fn request_header_len(&self) -> usize {
        if self.negotiated.extended_headers {
            32
        } else {
            28
        }
    }
}

