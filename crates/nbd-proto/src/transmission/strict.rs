//! The strict checks: what libnbd refuses client-side, before any traffic, under its
//! strict-mode bits (`STRICT_*` in [`crate::consts`]).
//!
//! [`StrictChecks`] pairs what the handshake settled with the bits in force; get one from
//! [`Session::strict`](super::Session::strict). It borrows both and allocates nothing, so
//! it costs nothing per command. The checks run in libnbd's order, so that a request wrong
//! in several ways gets libnbd's errno: the flags ([`STRICT_AUTO_FLAG`], [`STRICT_FLAGS`]),
//! what the server supports ([`STRICT_COMMANDS`]: the command itself, then the read-only
//! bit, then its flags), the range ([`STRICT_ZERO_SIZE`], [`STRICT_BOUNDS`],
//! [`STRICT_ALIGN`]), then the length limits (always).

use crate::consts::*;
use crate::errno::Errno;
use crate::error::{Error, Result};
use crate::handshake::Negotiated;

use super::command::{Command, CommandKind};

/// The client-side checks of one connection under the strict-mode bits `mode`.
#[derive(Debug, Clone, Copy)]
pub struct StrictChecks<'a> {
    negotiated: &'a Negotiated,
    mode: u32,
}

fn usage(errno: Errno, message: impl Into<String>) -> Error {
    Error::usage(errno, message)
}

impl<'a> StrictChecks<'a> {
    /// The checks for a connection that negotiated `negotiated`, under the bits `mode`.
    pub fn new(negotiated: &'a Negotiated, mode: u32) -> StrictChecks<'a> {
        StrictChecks { negotiated, mode }
    }

    fn on(&self, bit: u32) -> bool {
        self.mode & bit != 0
    }

    /// Refuses, without any traffic, what libnbd refuses client-side; returns the 16-bit
    /// flags to put on the wire. For a plain command: a read here is `nbd_pread` (no DF);
    /// see [`StrictChecks::check_submission`] for structured reads and filtered block status.
    pub fn check(&self, cmd: &Command) -> Result<u16> {
        Ok(self.check_submission(cmd, false, None)?.0)
    }

    /// Every check of a command as it is submitted, in libnbd's order. `chunks`: a
    /// structured read (`nbd_pread_structured`, the only read that takes DF); `filter`: the
    /// context names of a filtered block status (`nbd_block_status_filter`), whose own checks
    /// come before the range. Returns the wire flags and the filter's context ids.
    pub fn check_submission(
        &self,
        cmd: &Command,
        chunks: bool,
        filter: Option<&[String]>,
    ) -> Result<(u16, Option<Vec<u32>>)> {
        let flags = self.flags(cmd, chunks)?;
        let ids = match filter {
            Some(names) => {
                self.check_filter()?;
                Some(self.filter_ids(names)?)
            }
            None => {
                if self.on(STRICT_COMMANDS) {
                    self.supported(cmd, flags, chunks)?;
                }
                None
            }
        };
        self.range(cmd)?;
        self.length(cmd)?;
        Ok((flags, ids))
    }

    /// The context ids for a filter of `names`, in the order given. Every name must have
    /// been negotiated. An empty filter and a name given twice are sent as they are, for the
    /// server to judge (as libnbd does: that is how servers are tested).
    pub fn filter_ids(&self, names: &[String]) -> Result<Vec<u32>> {
        names
            .iter()
            .map(|name| {
                let id = self.negotiated.meta_valid.then(|| self.negotiated.meta_context_id(name));
                id.flatten().ok_or_else(|| {
                    usage(
                        Errno::EINVAL,
                        format!("meta context {name:?} was not negotiated, so it cannot be filtered on"),
                    )
                })
            })
            .collect()
    }

    /// The flags to send: 16 bits always; the payload length flag set by the framing
    /// (`STRICT_AUTO_FLAG`); only the command's own flags (`STRICT_FLAGS`).
    fn flags(&self, cmd: &Command, chunks: bool) -> Result<u16> {
        if cmd.flags > 0xffff {
            return Err(usage(
                Errno::EINVAL,
                format!("flags {:#x} do not fit the protocol's 16 bits", cmd.flags),
            ));
        }
        let mut flags = cmd.flags as u16;
        if self.on(STRICT_AUTO_FLAG) {
            // The payload length flag follows the framing, whatever the caller passed: a
            // write carries it exactly when extended headers are on; an unfiltered block
            // status never does (the filtered form adds it when it encodes the filter).
            match cmd.kind {
                CommandKind::Write if self.negotiated.extended_headers => flags |= CMD_FLAG_PAYLOAD_LEN,
                CommandKind::Write | CommandKind::BlockStatus => flags &= !CMD_FLAG_PAYLOAD_LEN,
                _ => {}
            }
        }
        if self.on(STRICT_FLAGS) {
            let mut permitted = cmd.kind.permitted_flags();
            if cmd.kind == CommandKind::Read && !chunks {
                // DF is `nbd_pread_structured`'s; `nbd_pread` takes no flag.
                permitted &= !CMD_FLAG_DF;
            }
            if flags & !permitted != 0 {
                return Err(usage(
                    Errno::EINVAL,
                    format!(
                        "flags {:#x} are not valid for {}",
                        flags & !permitted,
                        command_name(cmd.kind.code())
                    ),
                ));
            }
        }
        Ok(flags)
    }

    /// Length limits: reads and writes are always capped at 64 MiB, and under
    /// `STRICT_PAYLOAD` a write at the payload maximum; other counts need extended headers
    /// above 32 bits.
    fn length(&self, cmd: &Command) -> Result<()> {
        if !matches!(cmd.kind, CommandKind::Read | CommandKind::Write) {
            if !self.negotiated.extended_headers && cmd.length > u32::MAX as u64 {
                return Err(usage(
                    Errno::ERANGE,
                    format!(
                        "count {} needs extended headers, which were not negotiated",
                        cmd.length
                    ),
                ));
            }
            return Ok(());
        }
        // The (smaller) payload maximum applies to what the client sends, i.e. writes
        // (libnbd's STRICT_PAYLOAD).
        if cmd.length > MAX_PAYLOAD_HARD as u64 {
            return Err(usage(
                Errno::ERANGE,
                format!(
                    "request too large: {} bytes, the maximum is {MAX_PAYLOAD_HARD}",
                    cmd.length
                ),
            ));
        }
        let payload_max = self.negotiated.export.payload_max() as u64;
        if cmd.kind == CommandKind::Write && self.on(STRICT_PAYLOAD) && cmd.length > payload_max {
            return Err(usage(
                Errno::ERANGE,
                format!(
                    "request too large: {} bytes, the payload maximum is {payload_max}",
                    cmd.length
                ),
            ));
        }
        Ok(())
    }

    /// `STRICT_COMMANDS`: the server supports the command, writes to the export, and
    /// takes the command's flags.
    fn supported(&self, cmd: &Command, flags: u16, chunks: bool) -> Result<()> {
        let export = &self.negotiated.export;
        if cmd.kind == CommandKind::BlockStatus {
            self.block_status_possible()?;
        }
        let (needed, what) = match cmd.kind {
            CommandKind::Flush => (FLAG_SEND_FLUSH, "flush"),
            CommandKind::Trim => (FLAG_SEND_TRIM, "trim"),
            CommandKind::WriteZeroes => (FLAG_SEND_WRITE_ZEROES, "zero"),
            CommandKind::Cache => (FLAG_SEND_CACHE, "cache"),
            _ => (0, ""),
        };
        if needed != 0 && !export.has(needed) {
            return Err(usage(
                Errno::EINVAL,
                format!("server does not support {what} operations"),
            ));
        }
        // After the command's own bit, as libnbd: a trim on a read-only export that offers no
        // trim is EINVAL, not EPERM.
        if cmd.kind.modifies() && export.has(FLAG_READ_ONLY) {
            return Err(usage(
                Errno::EPERM,
                "server does not support write operations (the export is read-only)",
            ));
        }
        // Each flag is checked for the commands libnbd checks it on; elsewhere (with
        // STRICT_FLAGS off) it goes to the server as it is.
        let writes = matches!(cmd.kind, CommandKind::Write | CommandKind::Trim | CommandKind::WriteZeroes);
        if writes && flags & CMD_FLAG_FUA != 0 && !export.has(FLAG_SEND_FUA) {
            return Err(usage(Errno::EINVAL, "server does not support the FUA flag"));
        }
        if cmd.kind == CommandKind::WriteZeroes && flags & CMD_FLAG_FAST_ZERO != 0 && !export.has(FLAG_SEND_FAST_ZERO) {
            return Err(usage(Errno::EINVAL, "server does not support the fast zero flag"));
        }
        if cmd.kind == CommandKind::Read && chunks && flags & CMD_FLAG_DF != 0 && !self.negotiated.can_df() {
            return Err(usage(Errno::EINVAL, "server does not support the DF flag"));
        }
        Ok(())
    }

    /// The range of a command that has one (not flush or disconnect): not empty
    /// (`STRICT_ZERO_SIZE`), inside the export (`STRICT_BOUNDS`), aligned to the server's
    /// minimum block size (`STRICT_ALIGN`).
    fn range(&self, cmd: &Command) -> Result<()> {
        if matches!(cmd.kind, CommandKind::Flush | CommandKind::Disconnect) {
            return Ok(());
        }
        let export = &self.negotiated.export;
        if self.on(STRICT_ZERO_SIZE) && cmd.length == 0 {
            return Err(usage(Errno::EINVAL, "count cannot be 0"));
        }
        if self.on(STRICT_BOUNDS) {
            let end = cmd.offset.checked_add(cmd.length);
            if end.is_none_or(|end| end > export.size) {
                // libnbd's errno: no space for what modifies, an invalid range for the rest.
                let errno = if cmd.kind.modifies() { Errno::ENOSPC } else { Errno::EINVAL };
                return Err(usage(
                    errno,
                    format!(
                        "request out of bounds: offset {} + count {} is beyond the export size {}",
                        cmd.offset, cmd.length, export.size
                    ),
                ));
            }
        }
        if let (true, Some(bs)) = (self.on(STRICT_ALIGN), export.block_size) {
            let min = bs.minimum as u64;
            if min > 1 && !(cmd.offset.is_multiple_of(min) && cmd.length.is_multiple_of(min)) {
                return Err(usage(
                    Errno::EINVAL,
                    format!(
                        "request is not aligned to the server's minimum block size {min} \
                         (offset {}, count {})",
                        cmd.offset, cmd.length
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Block status needs structured replies and a negotiated meta context (checked under
    /// `STRICT_COMMANDS` only, as libnbd: without it the request goes to the server).
    fn block_status_possible(&self) -> Result<()> {
        if !self.negotiated.structured_replies {
            return Err(usage(
                Errno::ENOTSUP,
                "server does not support structured replies, which block status needs",
            ));
        }
        if !self.negotiated.meta_valid || self.negotiated.meta_contexts.is_empty() {
            return Err(usage(
                Errno::ENOTSUP,
                "did not negotiate any metadata contexts: add one (e.g. base:allocation) before \
                 connecting, and the server must support it",
            ));
        }
        Ok(())
    }

    /// A filtered block status (`nbd_block_status_filter`) needs extended headers always;
    /// under `STRICT_COMMANDS` also the server's `NBD_FLAG_BLOCK_STAT_PAYLOAD` and what
    /// every block status needs.
    pub fn check_filter(&self) -> Result<()> {
        if !self.negotiated.extended_headers {
            return Err(usage(
                Errno::ENOTSUP,
                "filtered block status needs extended headers, which were not negotiated",
            ));
        }
        if self.on(STRICT_COMMANDS) {
            if !self.negotiated.export.has(FLAG_BLOCK_STAT_PAYLOAD) {
                return Err(usage(
                    Errno::EINVAL,
                    "server does not support the block status payload flag \
                     (NBD_FLAG_BLOCK_STAT_PAYLOAD), so block status cannot be filtered",
                ));
            }
            self.block_status_possible()?;
        }
        Ok(())
    }
}
