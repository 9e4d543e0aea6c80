//! Node-API binding of `nbd-client`.
//!
//! This crate only converts: JavaScript values to Rust types and back, and `nbd-client`
//! errors to JavaScript errors. Arguments arrive already validated by `index.ts` (the
//! public API), which also turns the errors thrown here into `NbdError`s: each message
//! starts with `[CODE:errno] `, the one error bridge ([`to_js`]).

mod handle;
mod testing;

pub use handle::{NativeCancel, NativeHandle};

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
