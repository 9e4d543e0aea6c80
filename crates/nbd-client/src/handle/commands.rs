//! The commands: [`Op`], [`Reply`], and one method per data call. Every command goes
//! through [`Handle::submit`], which checks it (state, strict mode) and queues it at once on
//! the calling thread; the async forms wait for its callback.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use nbd_proto::state::{self, Call};
use nbd_proto::transmission::{Command, CommandKind, Detail, Tracking};
use nbd_proto::{Errno, Error, Result};

use super::{lock, Handle, Phase};
use crate::buffer::{DestBuf, SourceBuf};
use crate::cancel::CancelToken;
use crate::driver::tokio_driver::{Callback, CallbackReply, CommandRequest, Completed, Payload, Request};
use crate::driver::{cancelled_error, closed_error, InFlightGuard, Lifeline};

/// A command for [`Handle::submit`]. `offset` is where on the export, `count` how many
/// bytes, `flags` the command flags (`CMD_FLAG_*`).
#[allow(missing_docs)] // the fields are described above, once for all variants
pub enum Op {
    /// Read `count` bytes into a new buffer.
    Read { count: u64, offset: u64, flags: u32 },
    /// Read `count` bytes into a new buffer, recording the reply's chunks
    /// ([`Detail::Chunks`]).
    ReadStructured { count: u64, offset: u64, flags: u32 },
    /// Block status for `count` bytes at `offset`, for every negotiated context or only
    /// those named in `contexts` ([`Detail::Extents`]).
    BlockStatus {
        count: u64,
        offset: u64,
        flags: u32,
        contexts: Option<Vec<String>>,
    },
    /// Read into the caller's buffer (all of it).
    ReadInto { dest: Box<dyn DestBuf>, offset: u64, flags: u32 },
    /// Write the caller's buffer.
    Write { src: Box<dyn SourceBuf>, offset: u64, flags: u32 },
    /// Flush, trim, cache or zero.
    Other { kind: CommandKind, count: u64, offset: u64, flags: u32 },
}

/// What a finished command gives back.
#[derive(Debug, Default)]
pub struct Reply {
    /// The data of `Op::Read` and `Op::ReadStructured`.
    pub data: Option<Vec<u8>>,
    /// Extents of `Op::BlockStatus`, chunks of `Op::ReadStructured`.
    pub detail: Detail,
}

impl Handle {
    /// `nbd_pread` into a new buffer of `count` bytes.
    pub async fn pread(&self, count: u64, offset: u64, flags: u32, cancel: Option<CancelToken>) -> Result<Vec<u8>> {
        let reply = self.run(Op::Read { count, offset, flags }, cancel).await?;
        Ok(reply.data.expect("a read completes with its buffer"))
    }

    /// `nbd_pread_structured`: the data and the chunks the server sent it in.
    pub async fn pread_structured(
        &self,
        count: u64,
        offset: u64,
        flags: u32,
        cancel: Option<CancelToken>,
    ) -> Result<(Vec<u8>, Vec<nbd_proto::transmission::ReadChunk>)> {
        let reply = self.run(Op::ReadStructured { count, offset, flags }, cancel).await?;
        let chunks = match reply.detail {
            Detail::Chunks(c) => c,
            _ => Vec::new(),
        };
        Ok((reply.data.expect("a read completes with its buffer"), chunks))
    }

    /// `nbd_block_status_64` (all negotiated contexts) or `nbd_block_status_filter`
    /// (`contexts`): extents per context.
    pub async fn block_status(
        &self,
        count: u64,
        offset: u64,
        flags: u32,
        contexts: Option<Vec<String>>,
        cancel: Option<CancelToken>,
    ) -> Result<Vec<nbd_proto::transmission::ContextExtents>> {
        let op = Op::BlockStatus { count, offset, flags, contexts };
        match self.run(op, cancel).await?.detail {
            Detail::Extents(e) => Ok(e),
            _ => Ok(Vec::new()),
        }
    }

    /// `nbd_pread` into the caller's buffer (all of it, starting at `offset`).
    pub async fn pread_into(&self, dest: Box<dyn DestBuf>, offset: u64, flags: u32, cancel: Option<CancelToken>) -> Result<()> {
        self.run(Op::ReadInto { dest, offset, flags }, cancel).await.map(drop)
    }

    /// `nbd_pwrite` of the caller's buffer at `offset`.
    pub async fn pwrite(&self, src: Box<dyn SourceBuf>, offset: u64, flags: u32, cancel: Option<CancelToken>) -> Result<()> {
        self.run(Op::Write { src, offset, flags }, cancel).await.map(drop)
    }

    /// `nbd_flush`.
    pub async fn flush(&self, flags: u32, cancel: Option<CancelToken>) -> Result<()> {
        self.other(CommandKind::Flush, 0, 0, flags, cancel).await
    }

    /// `nbd_trim`.
    pub async fn trim(&self, count: u64, offset: u64, flags: u32, cancel: Option<CancelToken>) -> Result<()> {
        self.other(CommandKind::Trim, count, offset, flags, cancel).await
    }

    /// `nbd_cache`.
    pub async fn cache(&self, count: u64, offset: u64, flags: u32, cancel: Option<CancelToken>) -> Result<()> {
        self.other(CommandKind::Cache, count, offset, flags, cancel).await
    }

    /// `nbd_zero`.
    pub async fn zero(&self, count: u64, offset: u64, flags: u32, cancel: Option<CancelToken>) -> Result<()> {
        self.other(CommandKind::WriteZeroes, count, offset, flags, cancel).await
    }

    async fn other(&self, kind: CommandKind, count: u64, offset: u64, flags: u32, cancel: Option<CancelToken>) -> Result<()> {
        let op = Op::Other { kind, count, offset, flags };
        self.run(op, cancel).await.map(drop)
    }

    /// Submits `op` and waits for its outcome, or for `cancel`.
    async fn run(&self, op: Op, cancel: Option<CancelToken>) -> Result<Reply> {
        let (reply, answer) = oneshot::channel();
        self.submit(op, cancel.clone(), move |outcome| {
            let _ = reply.send(outcome);
        })?;
        let outcome = match cancel {
            None => answer.await,
            Some(token) => tokio::select! {
                r = answer => r,
                () = token.cancelled() => return Err(cancelled_error()),
            },
        };
        // The callback is always called (CallbackReply guarantees it), so this never waits
        // on a dropped sender; map it anyway rather than panic.
        outcome.unwrap_or_else(|_| Err(closed_error()))
    }

    /// Queues a command whose outcome goes to `done`, called exactly once on some thread
    /// of the driver (or not at all when this returns an error). For bindings that settle
    /// many commands through one notification channel.
    pub fn submit(
        &self,
        op: Op,
        cancel: Option<CancelToken>,
        done: impl FnOnce(Result<Reply>) + Send + 'static,
    ) -> Result<()> {
        let mut tracking = Tracking::default();
        let mut filter: Option<Vec<String>> = None;
        let (cmd, mut payload) = match op {
            Op::Read { count, offset, flags } => (
                command(CommandKind::Read, offset, count, flags),
                Payload::None,
            ),
            Op::ReadStructured { count, offset, flags } => {
                tracking.record_chunks = true;
                (command(CommandKind::Read, offset, count, flags), Payload::None)
            }
            Op::BlockStatus {
                count,
                offset,
                flags,
                contexts,
            } => {
                filter = contexts;
                (command(CommandKind::BlockStatus, offset, count, flags), Payload::None)
            }
            Op::ReadInto { dest, offset, flags } => (
                command(CommandKind::Read, offset, dest.len() as u64, flags),
                Payload::ReadInto(dest),
            ),
            Op::Write { src, offset, flags } => (
                command(CommandKind::Write, offset, src.len() as u64, flags),
                Payload::Write(src),
            ),
            Op::Other { kind, count, offset, flags } => {
                if matches!(kind, CommandKind::Read | CommandKind::Write | CommandKind::Disconnect) {
                    return Err(Error::usage(Errno::EINVAL, "Op::Other takes flush, trim, cache or zero"));
                }
                (command(kind, offset, count, flags), Payload::None)
            }
        };
        let (requests, lifeline, flags, ids) = self.checked(&cmd, tracking.record_chunks, filter.as_deref())?;
        tracking.filter = ids;
        // A cancelled command must not touch its buffer, not even to zero it.
        if cancel.as_ref().is_some_and(CancelToken::is_cancelled) {
            return Err(cancelled_error());
        }
        match &mut payload {
            // Zeroed memory from the allocator costs nothing extra; it also makes bytes a
            // server fails to send read as zero, as libnbd's pread_initialize does.
            Payload::None if cmd.kind == CommandKind::Read => {
                payload = Payload::ReadOwned(vec![0u8; cmd.length as usize]);
            }
            Payload::ReadInto(dest) if lock(&self.inner.settings).pread_initialize && !dest.is_empty() => {
                // SAFETY: DestBuf promises len writable bytes.
                unsafe { std::ptr::write_bytes(dest.as_mut_ptr(), 0, dest.len()) };
            }
            _ => {}
        }
        let callback: Callback = Box::new(move |r: Result<Completed>| {
            done(r.map(|c| Reply {
                data: match c.payload {
                    Payload::ReadOwned(v) => Some(v),
                    _ => None,
                },
                detail: c.detail,
            }))
        });
        let request = Request::Command(CommandRequest {
            guard: InFlightGuard::new(&self.inner.counters),
            cmd,
            flags,
            tracking,
            payload,
            cancel,
            reply: CallbackReply::new(callback),
        });
        if let Err(unsent) = requests.send(request) {
            // Never queued: the callback is not called (the error is returned instead).
            if let Request::Command(c) = unsent.0 {
                drop(c.reply.disarm());
            }
            return Err(lifeline.pending_error());
        }
        Ok(())
    }

    /// The state check and libnbd's client-side checks; the way to the driver, the wire
    /// flags and a filter's context ids.
    #[allow(clippy::type_complexity)]
    fn checked(
        &self,
        cmd: &Command,
        chunks: bool,
        filter: Option<&[String]>,
    ) -> Result<(mpsc::UnboundedSender<Request>, Arc<Lifeline>, u16, Option<Vec<u32>>)> {
        let state = self.state();
        state::ensure_allowed(Call::Command, state)?;
        let (session, requests, lifeline) = match &*self.phase() {
            Phase::Connected {
                driver,
                shutting_down: false,
                ..
            } => (driver.session.clone(), driver.requests.clone(), driver.lifeline.clone()),
            _ => {
                return Err(Error::usage(
                    Errno::EINVAL,
                    "invalid state: the handle is shutting down",
                ))
            }
        };
        let strict = self.inner.strict.load(Ordering::Relaxed);
        let (flags, ids) = session.strict(strict).check_submission(cmd, chunks, filter)?;
        Ok((requests, lifeline, flags, ids))
    }
}

fn command(kind: CommandKind, offset: u64, length: u64, flags: u32) -> Command {
    Command {
        kind,
        offset,
        length,
        flags,
    }
}
