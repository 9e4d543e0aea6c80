//! Node-API binding of `nbd-client`.
//!
//! This crate only converts: JavaScript values to Rust types and back, and `nbd-client`
//! errors to JavaScript errors. Arguments arrive already validated by the TypeScript layer
//! (`validation.ts`). Every error crosses as an object: the `NbdError` (code, errno,
//! operation, message) that `errors.ts`'s factory makes, called from here
//! ([`settle::ErrorFactory`]), whether a command's promise rejects, a synchronous call
//! throws, or a call that runs on tokio rejects.

#![warn(missing_docs)]

mod alloc;
mod copy;
mod event_loop;
mod fast;
mod handle;
mod settle;
mod testing;
mod tokio_path;

pub use copy::NativeCopy;
pub use fast::{command_calls, live_bound_calls, tune_malloc};
pub use handle::{NativeCancel, NativeHandle};

use napi_derive::napi;

/// Whether `s` looks like an NBD URI (`nbd_is_uri`).
#[napi]
pub fn is_uri(s: String) -> bool {
    nbd_client::uri::is_uri(&s)
}

/// Whether this build understands NBD URIs (`nbd_supports_uri`).
#[napi]
pub fn supports_uri() -> bool {
    nbd_client::uri::supports_uri()
}

/// Whether this build can connect over AF_VSOCK (`nbd_supports_vsock`).
#[napi]
pub fn supports_vsock() -> bool {
    nbd_client::supports_vsock()
}

/// Whether this build speaks TLS (`nbd_supports_tls`).
#[napi]
pub fn supports_tls() -> bool {
    nbd_client::supports_tls()
}

/// An `EINVAL` for a bad argument that reached Rust.
pub(crate) fn invalid(message: impl Into<String>) -> nbd_client::Error {
    nbd_client::Error::usage(nbd_client::Errno::EINVAL, message)
}
