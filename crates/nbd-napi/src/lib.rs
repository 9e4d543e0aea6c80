//! Node-API binding of `nbd-client`.
//!
//! This crate only converts: JavaScript values to Rust types and back, and `nbd-client`
//! errors to JavaScript errors. Arguments arrive already validated by `index.ts` (the
//! public API), which also turns the errors thrown here into `NbdError`s: each message
//! starts with `[CODE:errno] `, the one error bridge ([`to_js`]).

#![warn(missing_docs)]

mod copy;
mod event_loop;
mod handle;
mod settle;
mod testing;
mod tokio_path;

pub use copy::NativeCopy;
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

/// Turns a core error into a JavaScript error whose message carries the errno.
pub(crate) fn to_js(e: nbd_client::Error) -> napi::Error {
    napi::Error::new(
        napi::Status::GenericFailure,
        format!("[{}:{}] {}", e.errno().name(), e.errno().number(), e.message()),
    )
}

/// An `EINVAL` for a bad argument that reached Rust.
pub(crate) fn invalid(message: impl Into<String>) -> napi::Error {
    to_js(nbd_client::Error::usage(nbd_client::Errno::EINVAL, message))
}
