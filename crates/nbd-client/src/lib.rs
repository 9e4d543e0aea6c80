//! An asynchronous NBD client on tokio.
//!
//! [`Handle`] is the client: cheap to clone, safe to share between tasks. It connects over
//! a socket it is given ([`Handle::connect_socket`], taking ownership of the fd) or one it
//! opens itself ([`Handle::connect_unix`], [`Handle::connect_tcp`]), runs the handshake
//! with the `nbd-proto` engine, then hands the socket to a driver: a writer task and a
//! reader task that run concurrently, so a reply can be read while a large write is still
//! being sent.
//!
//! # Pipelining
//!
//! Every command method may be called many times without waiting: commands are queued on
//! a channel (never refused for being too many), up to [`Settings::max_in_flight`] are on the
//! wire at once, and replies are matched to commands by cookie in whatever order the server
//! sends them. Small requests submitted together are written with one system call.
//! Read data goes from the socket straight into the destination buffer.
//!
//! # Errors
//!
//! Every failure is an [`Error`] with an errno ([`Errno`]) as libnbd would report it, and a
//! [`Fault`] telling who caused it. Server error replies fail one command and leave the
//! connection usable; a protocol violation or a lost connection fails every pending command
//! and leaves the handle `Dead`.

//! # Layout
//!
//! - [`settings`](Settings): one model of the handle's settings ([`NegotiationSettings`],
//!   [`TlsSettings`], the rest);
//! - `connect`: connecting as steps (the transport step, the handshake step, option
//!   requests), each returning the next phase;
//! - `handle`: [`Handle`], a state cell and one method per call (the setters and the data
//!   commands in files of their own);
//! - `transport`: Unix, TCP, vsock, subprocesses, and the stream over a socket;
//! - `driver`: the tokio driver and the event-loop driver ([`event_loop`]);
//! - [`tls`], [`uri`].

#![warn(missing_docs)]

mod buffer;
mod cancel;
mod connect;
mod driver;
mod handle;
mod settings;
pub mod tls;
mod transport;
pub mod uri;

pub use buffer::{DestBuf, SourceBuf};
pub use cancel::CancelToken;
pub use driver::event_loop;
pub use driver::DebugSink;
pub use handle::{Handle, Op, Reply, Stats};
pub use nbd_proto::consts;
pub use nbd_proto::handshake::{
    BlockSize, ExportEntry, ExportInfo, MetaContext, Negotiated, Protocol, TlsMode,
};
pub use nbd_proto::state::State;
pub use nbd_proto::transmission::{ChunkStatus, ContextExtents, Detail, Extent, ReadChunk};
pub use nbd_proto::transmission::{Command, CommandKind};
pub use nbd_proto::{Errno, Error, Fault, Result};
pub use settings::{NegotiationSettings, Settings};
pub use tls::{supports_tls, TlsSettings};
pub use transport::subprocess::{
    spawn_command, spawn_socket_activation, spawn_socket_activation_named, Child,
};
pub use transport::vsock::{connect_vsock, supports_vsock};
