//! `EmbeddedServer`: the in-process NBD server of `nbd-embedded`, exposed for demos and tests.
//!
//! Only conversions live here: JS numbers to offsets and sizes (checked to be safe integers),
//! buffers in and out, `io::Error`s to JS errors. Everything the server does is in
//! `nbd-embedded`. The public face is `EmbeddedServer` in `testing.ts`.

use std::io;
use std::os::fd::IntoRawFd;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use napi::bindgen_prelude::*;
use napi_derive::napi;
use nbd_embedded::{Listener, MemoryServer, ServerOptions, DEFAULT_SIZE};

/// `Number.MAX_SAFE_INTEGER`.
const MAX_SAFE_INTEGER: f64 = 9_007_199_254_740_991.0;

/// Options of `new EmbeddedServer(options)`; every field is optional.
#[napi(object)]
pub struct EmbeddedServerOptions {
    /// Export size in bytes: a positive safe integer (default 64 MiB).
    pub size: Option<f64>,
    /// Advertise the export as read-only and refuse writes (default false).
    pub read_only: Option<bool>,
    /// The only export name served (default `""`).
    pub export_name: Option<String>,
    /// Advertise rotational media (default false).
    pub rotational: Option<bool>,
}

/// An in-process, memory-backed NBD server (see `nbd_embedded::MemoryServer`).
#[napi(js_name = "EmbeddedServer")]
pub struct JsEmbeddedServer {
    server: MemoryServer,
    /// The open listeners; `None` once `close()` has been called.
    listeners: Mutex<Option<Vec<Listener>>>,
}

#[napi]
impl JsEmbeddedServer {
    /// Creates the server and its zero-filled export.
    #[napi(constructor)]
    pub fn new(options: Option<EmbeddedServerOptions>) -> Result<Self> {
        let options = options.unwrap_or(EmbeddedServerOptions {
            size: None,
            read_only: None,
            export_name: None,
            rotational: None,
        });
        let size = match options.size {
            None => DEFAULT_SIZE,
            Some(size) if is_safe_integer(size) && size > 0.0 => size as u64,
            Some(size) => {
                return Err(invalid_arg(format!(
                    "EmbeddedServer: size must be a positive safe integer, got {size}"
                )))
            }
        };
        let server = MemoryServer::try_new(ServerOptions {
            size,
            read_only: options.read_only.unwrap_or(false),
            export_name: options.export_name.unwrap_or_default(),
            rotational: options.rotational.unwrap_or(false),
        })
        .map_err(|e| to_napi_error("EmbeddedServer", e))?;
        Ok(JsEmbeddedServer {
            server,
            listeners: Mutex::new(Some(Vec::new())),
        })
    }

    /// Returns the client end of a new connected socket pair whose other end is being served.
    /// The caller owns the returned file descriptor.
    #[napi]
    pub fn socketpair(&self) -> Result<i32> {
        let _open = self.open_listeners("socketpair")?; // held so close() cannot interleave
        let fd = self
            .server
            .socketpair()
            .map_err(|e| to_napi_error("socketpair", e))?;
        Ok(fd.into_raw_fd())
    }

    /// Listens on a new Unix socket at `path` until `close()`.
    #[napi]
    pub fn listen_unix(&self, path: String) -> Result<()> {
        let mut guard = self.open_listeners("listenUnix")?;
        let listener = self
            .server
            .listen_unix(Path::new(&path))
            .map_err(|e| to_napi_error(&format!("listenUnix {path:?}"), e))?;
        push_listener(&mut guard, listener);
        Ok(())
    }

    /// Listens on a free TCP port of 127.0.0.1 until `close()`; returns the port.
    #[napi]
    pub fn listen_tcp(&self) -> Result<u32> {
        let mut guard = self.open_listeners("listenTcp")?;
        let listener = self
            .server
            .listen_tcp("127.0.0.1:0")
            .map_err(|e| to_napi_error("listenTcp", e))?;
        let port = listener.port().unwrap_or(0);
        push_listener(&mut guard, listener);
        Ok(u32::from(port))
    }

    /// Returns a copy of `length` bytes of the export at `offset`.
    #[napi]
    pub fn read(&self, offset: f64, length: u32) -> Result<Buffer> {
        let offset = to_offset("read", offset)?;
        let bytes = self
            .server
            .try_read(offset, length as usize)
            .map_err(|e| to_napi_error("read", e))?;
        Ok(Buffer::from(bytes))
    }

    /// Overwrites the export at `offset` with `data`.
    #[napi]
    pub fn write(&self, offset: f64, data: &[u8]) -> Result<()> {
        let offset = to_offset("write", offset)?;
        self.server
            .try_write(offset, data)
            .map_err(|e| to_napi_error("write", e))
    }

    /// Export size in bytes.
    #[napi(getter)]
    pub fn size(&self) -> f64 {
        self.server.size() as f64
    }

    /// Connections handed to the server so far.
    #[napi(getter)]
    pub fn connections_served(&self) -> f64 {
        self.server.connections_served() as f64
    }

    /// Stops every listener (waiting for their accept threads) and refuses new connections.
    /// Connections already made carry on. Idempotent.
    #[napi]
    pub fn close(&self) -> Result<()> {
        let listeners = self.lock().take();
        drop(listeners);
        Ok(())
    }
}

impl JsEmbeddedServer {
    fn lock(&self) -> MutexGuard<'_, Option<Vec<Listener>>> {
        self.listeners.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The listener list, or an error naming `operation` if the server is closed.
    fn open_listeners(&self, operation: &str) -> Result<MutexGuard<'_, Option<Vec<Listener>>>> {
        let guard = self.lock();
        if guard.is_none() {
            return Err(Error::new(
                Status::GenericFailure,
                format!("{operation}: the EmbeddedServer is closed"),
            ));
        }
        Ok(guard)
    }
}

fn push_listener(guard: &mut MutexGuard<'_, Option<Vec<Listener>>>, listener: Listener) {
    if let Some(list) = guard.as_mut() {
        list.push(listener);
    }
}

fn is_safe_integer(x: f64) -> bool {
    x.is_finite() && x.fract() == 0.0 && x.abs() <= MAX_SAFE_INTEGER
}

fn to_offset(operation: &str, offset: f64) -> Result<u64> {
    if is_safe_integer(offset) && offset >= 0.0 {
        Ok(offset as u64)
    } else {
        Err(invalid_arg(format!(
            "{operation}: offset must be a non-negative safe integer, got {offset}"
        )))
    }
}

fn invalid_arg(message: String) -> Error {
    Error::new(Status::InvalidArg, message)
}

fn to_napi_error(operation: &str, e: io::Error) -> Error {
    let status = match e.kind() {
        io::ErrorKind::InvalidInput => Status::InvalidArg,
        _ => Status::GenericFailure,
    };
    Error::new(status, format!("{operation}: {e}"))
}
