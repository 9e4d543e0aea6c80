//! The NBD client protocol, without IO.
//!
//! This crate knows the bytes of the Network Block Device protocol and nothing of sockets,
//! threads or clocks. A driver (such as the `nbd-client` crate) feeds it bytes read from
//! the server and sends the bytes it produces:
//!
//! * [`handshake::Handshake`] turns the server's greeting and option replies into a
//!   [`handshake::Negotiated`] (see its module documentation for the run loop); each of
//!   its steps owns what it gathers from the server (`handshake/steps.rs`);
//! * [`transmission::StrictChecks`] (`transmission/strict.rs`) refuses commands as
//!   libnbd's strict mode does, and [`transmission::Session`] frames requests;
//! * [`transmission::ReplyDecoder`] owns the in-flight table (`transmission/in_flight.rs`:
//!   the commands sent and not yet answered) and turns reply bytes into events (see the
//!   module documentation of [`transmission`] for the run loop);
//! * [`state`] holds the one table of which call is allowed in which handle state
//!   ([`state::ensure_allowed`]);
//! * [`wire`] reads and writes big-endian fields ([`wire::FieldReader`]); [`consts`] has the
//!   protocol's numbers.
//!
//! Every length a server announces is checked against a limit before any allocation or
//! wait, so a hostile server costs an error, not memory.

#![warn(missing_docs)]

pub mod consts;
pub mod errno;
pub mod error;
pub mod handshake;
pub mod state;
pub mod transmission;
pub mod wire;

pub use errno::Errno;
pub use error::{Error, Fault, Result};
