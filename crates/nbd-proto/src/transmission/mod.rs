//! The transmission phase: commands, client-side (strict) checks, request encoding, and
//! the reply decoder that owns the table of commands in flight.
//!
//! # Driving it
//!
//! A driver writes requests and reads replies; the two halves may run concurrently (the
//! tokio driver of `nbd-client` runs them as two tasks) or interleaved on one thread (its
//! event-loop driver, which the Node binding polls with libuv). Both follow these rules:
//!
//! * Before sending, [`StrictChecks::check`] (from [`Session::strict`]) refuses what libnbd
//!   refuses client-side, and [`Session::encode_request`] appends the request header (the
//!   write payload follows it on the wire, sent from the caller's buffer).
//! * [`ReplyDecoder::register`] must learn of a command before its request can be answered,
//!   i.e. before the request is written.
//! * The reader feeds what it has read to [`ReplyDecoder::decode`] and acts on the
//!   [`Event`]s:
//!
//! ```text
//! loop {
//!     match decoder.decode(&input)? {
//!         Decoded { consumed: 0, event: None } => read more into input,
//!         Decoded { consumed, event } => {
//!             input.drain(..consumed);
//!             match event {
//!                 Some(Event::ReadData { cookie, buf_offset, len }) => {
//!                     // the next `len` bytes of the stream are read data: move them into
//!                     // the command's buffer at `buf_offset`, then:
//!                     decoder.payload_done();
//!                 }
//!                 Some(Event::ReadHole { cookie, buf_offset, len }) => zero that range,
//!                 Some(Event::Done { cookie, user, result }) => complete the command,
//!                 None => {}
//!             }
//!         }
//!     }
//! }
//! ```
//!
//! An `Err(Fatal)` means the server broke the protocol: the connection is unusable, the
//! command named in it fails with its error (the one the bad reply was for or, when the
//! bytes name no command in flight, the oldest command in flight), and
//! [`ReplyDecoder::take_all`] returns every other command so the driver can fail them too.

//!
//! # Where things are
//!
//! * `command.rs`: [`Command`] and [`CommandKind`];
//! * `strict.rs`: [`StrictChecks`], the client-side checks of libnbd's strict mode;
//! * `session.rs`: [`Session`], which frames requests;
//! * `in_flight.rs`: the in-flight table (`InFlightTable`) and what it gathers per
//!   command ([`Detail`], [`Extent`], [`ReadChunk`]);
//! * `reply.rs`: [`ReplyDecoder`], which owns the table and decodes replies into
//!   [`Event`]s.

mod command;
mod in_flight;
mod reply;
mod session;
mod strict;

pub use command::{Command, CommandKind};
pub use in_flight::{ChunkStatus, ContextExtents, Detail, Extent, ReadChunk, Tracking};
pub use reply::{Decoded, Event, Fatal, ReplyDecoder};
pub use session::Session;
pub use strict::StrictChecks;
