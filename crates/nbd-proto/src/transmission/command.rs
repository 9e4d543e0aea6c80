//! Commands as the application asks for them: [`Command`] and [`CommandKind`].

use crate::consts::*;


/// A transmission-phase command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandKind {
    /// `NBD_CMD_READ`.
    Read,
    /// `NBD_CMD_WRITE`.
    Write,
    /// `NBD_CMD_FLUSH`.
    Flush,
    /// `NBD_CMD_TRIM`.
    Trim,
    /// `NBD_CMD_CACHE`.
    Cache,
    /// `NBD_CMD_WRITE_ZEROES`.
    WriteZeroes,
    /// `NBD_CMD_BLOCK_STATUS`.
    BlockStatus,
    /// `NBD_CMD_DISC`.
    Disconnect,
}

impl CommandKind {
    /// The command's number on the wire.
    pub fn code(self) -> u16 {
        match self {
            CommandKind::Read => CMD_READ,
            CommandKind::Write => CMD_WRITE,
            CommandKind::Flush => CMD_FLUSH,
            CommandKind::Trim => CMD_TRIM,
            CommandKind::Cache => CMD_CACHE,
            CommandKind::WriteZeroes => CMD_WRITE_ZEROES,
            CommandKind::BlockStatus => CMD_BLOCK_STATUS,
            CommandKind::Disconnect => CMD_DISC,
        }
    }

    /// Flags that belong with this command (libnbd's `STRICT_FLAGS` check).
    pub(super) fn permitted_flags(self) -> u16 {
        match self {
            CommandKind::Read => CMD_FLAG_DF,
            CommandKind::Write => CMD_FLAG_FUA | CMD_FLAG_PAYLOAD_LEN,
            CommandKind::Trim => CMD_FLAG_FUA,
            CommandKind::WriteZeroes => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
            CommandKind::BlockStatus => CMD_FLAG_REQ_ONE | CMD_FLAG_PAYLOAD_LEN,
            CommandKind::Flush | CommandKind::Cache | CommandKind::Disconnect => 0,
        }
    }

    /// Whether the command changes the export (libnbd refuses it on a read-only one).
    pub(super) fn modifies(self) -> bool {
        matches!(
            self,
            CommandKind::Write | CommandKind::Trim | CommandKind::WriteZeroes
        )
    }
}

/// One command as the application asked for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Command {
    /// Which command.
    pub kind: CommandKind,
    /// Byte offset into the export.
    pub offset: u64,
    /// Bytes affected (for a filtered block status, the effect length).
    pub length: u64,
    /// Flags as given by the application; [`StrictChecks::check`](super::StrictChecks::check)
    /// refuses bits above 16.
    pub flags: u32,
}

