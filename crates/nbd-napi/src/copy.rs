//! `NativeCopy`: the binding of `nbd-copy`, which `copy.ts` builds `copy()` on. Bytes move
//! in Rust; JavaScript only starts the copy, polls its counters and may abort it. Failures
//! reject with `NbdError`s of operation `copy`, made by the error factory.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use napi::bindgen_prelude::*;
use napi_derive::napi;
use nbd_client::{CancelToken, Settings};
use nbd_copy::{Endpoint, Options, Progress};

use crate::invalid;
use crate::settle::{self, ErrorFactory};

/// One end of a copy, as `copy.ts` resolved it.
#[napi(object)]
pub struct NativeCopyEndpoint {
    /// `nbd` (an NBD URI), `file` (a path) or `null`.
    pub kind: String,
    pub uri: Option<String>,
    pub path: Option<String>,
    /// `nbd`: milliseconds for the engine's first connection and its handshake, which then
    /// fails with `ETIMEDOUT` (copy.ts sets it for a `Handle`'s export); none by default.
    pub connect_timeout: Option<f64>,
}

/// Options, already checked by `copy.ts`.
#[napi(object)]
pub struct NativeCopyOptions {
    pub connections: Option<u32>,
    pub requests: u32,
    pub request_size: u32,
    /// 0 turns zero detection off.
    pub sparse: u32,
    pub allocated: bool,
    pub destination_is_zero: bool,
    pub flush: bool,
}

/// What a finished copy did.
#[napi(object)]
pub struct NativeCopyResult {
    pub bytes: f64,
    pub data_bytes: f64,
    pub zero_bytes: f64,
    pub seconds: f64,
    pub connections: u32,
    pub request_size: u32,
}

/// Counters of a copy in progress.
#[napi(object)]
pub struct NativeCopyProgress {
    pub bytes_done: f64,
    pub bytes_total: f64,
    pub bytes_zero: f64,
}

fn endpoint(e: NativeCopyEndpoint) -> nbd_client::Result<Endpoint> {
    match e.kind.as_str() {
        "nbd" => {
            let uri = e.uri.ok_or_else(|| invalid("an nbd endpoint needs a uri"))?;
            let mut settings = Box::<Settings>::default();
            // As nbdcopy: a URI may name TLS files.
            settings.uri_policy.allow_local_file = true;
            if let Some(ms) = e.connect_timeout.filter(|ms| ms.is_finite() && *ms > 0.0) {
                settings.connect_timeout = Some(std::time::Duration::from_secs_f64(ms / 1000.0));
            }
            Ok(Endpoint::Nbd { uri, settings })
        }
        "file" => Ok(Endpoint::File(PathBuf::from(e.path.ok_or_else(|| invalid("a file endpoint needs a path"))?))),
        "null" => Ok(Endpoint::Null),
        other => Err(invalid(format!("unknown endpoint kind {other}"))),
    }
}

/// One copy: run it once, read its progress, abort it.
#[napi]
pub struct NativeCopy {
    progress: Arc<Progress>,
    cancel: CancelToken,
    make_error: ErrorFactory,
}

#[napi]
impl NativeCopy {
    /// A copy not yet started; `make_error(code, errno, operation, message)` makes the
    /// `NbdError` it rejects with.
    #[napi(constructor)]
    pub fn new(
        #[napi(ts_arg_type = "(code: string, errno: number, operation: string, message: string) => Error")]
        make_error: ErrorFactory,
    ) -> Self {
        NativeCopy { progress: Arc::default(), cancel: CancelToken::new(), make_error }
    }

    /// Copies; rejects with an `NbdError` (`ECANCELED` once aborted).
    #[napi]
    pub fn run<'env>(
        &self,
        env: &'env Env,
        source: NativeCopyEndpoint,
        destination: NativeCopyEndpoint,
        options: NativeCopyOptions,
    ) -> Result<PromiseRaw<'env, NativeCopyResult>> {
        let opts = Options {
            connections: options.connections.map(|n| n as usize),
            requests: options.requests as usize,
            request_size: options.request_size,
            sparse: if options.sparse == 0 { None } else { Some(options.sparse) },
            allocated: options.allocated,
            destination_is_zero: options.destination_is_zero,
            flush: options.flush,
        };
        let progress = self.progress.clone();
        let cancel = self.cancel.clone();
        // Awaited on napi's tokio runtime; the copy itself runs on threads of its own.
        settle::spawn(env, self.make_error, "copy", async move {
            let src = endpoint(source)?;
            let dst = endpoint(destination)?;
            let report = nbd_copy::copy(src, dst, opts, progress, cancel).await?;
            Ok(NativeCopyResult {
                bytes: report.bytes as f64,
                data_bytes: report.data_bytes as f64,
                zero_bytes: report.zero_bytes as f64,
                seconds: report.seconds,
                connections: report.connections as u32,
                request_size: report.request_size,
            })
        })
    }

    /// The counters so far.
    #[napi]
    pub fn progress(&self) -> NativeCopyProgress {
        NativeCopyProgress {
            bytes_done: self.progress.bytes_done.load(Ordering::Relaxed) as f64,
            bytes_total: self.progress.bytes_total.load(Ordering::Relaxed) as f64,
            bytes_zero: self.progress.bytes_zero.load(Ordering::Relaxed) as f64,
        }
    }

    /// Stops the copy: pending commands are abandoned, everything opened is closed.
    #[napi]
    pub fn abort(&self) {
        self.cancel.cancel();
    }
}
