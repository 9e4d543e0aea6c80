//! The NBD client protocol, without IO.
//!
//! This crate knows the bytes of the Network Block Device protocol and nothing of sockets,
//! threads or clocks. A driver (such as the `nbd-client` crate) feeds it bytes read from
//! the server and sends the bytes it produces:
//!
//! * [`handshake::Handshake`] turns the server's greeting and option replies into a
//!   [`handshake::Negotiated`] (see its module documentation for the run loop);
//! * [`transmission::Session`] checks commands as libnbd's strict mode does and frames
//!   requests;
//! * [`transmission::ReplyDecoder`] keeps the table of commands in flight and turns reply
//!   bytes into events (see its module documentation for the run loop);
//! * [`state`] holds the one table of which call is allowed in which handle state.
//!
//! Every length a server announces is checked against a limit before any allocation or
//! wait, so a hostile server costs an error, not memory.

pub mod consts;
pub mod errno;
pub mod error;
pub mod handshake;
pub mod state;
pub mod transmission;
pub mod wire;

pub use errno::Errno;
pub use error::{Error, Fault, Result};
