//! `NativeHandle` and `NativeCancel`: the classes `handle.ts` builds `Handle` on.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use napi::bindgen_prelude::*;
use napi::threadsafe_function::{ThreadsafeFunction, ThreadsafeFunctionCallMode};
use napi::JsValue;
use napi_derive::napi;

use nbd_client::consts::*;
use nbd_client::event_loop::{Payload, Submission, COPY_PAYLOAD_MAX};
use nbd_client::{CancelToken, Command, CommandKind, Errno, Handle, Op};

use crate::event_loop::{JsCommand, LoopDriver, Outcome};
use crate::invalid;
use crate::settle::{self, CallerBuf, ErrorFactory, Ref};
use crate::tokio_path::Completer;

// ---- JavaScript buffers and promises ----
//
// Commands return promises made here. On the event-loop driver (plain connections) they
// are settled on the JavaScript thread as replies are read, and read data goes straight
// into the caller's buffer (`preadInto`) or a Buffer made for it (`pread`); a caller's
// buffer is looked up again before every use, because JavaScript can detach an ArrayBuffer
// at any moment (`structuredClone(b, { transfer })`): a read whose buffer went away fails
// with EFAULT and writes nothing; a write whose buffer went away before any of it was sent
// fails with EFAULT; one that went away half-sent also ends the connection (the server
// expects the rest). On the tokio driver (TLS) data crosses threads, so a write's bytes are
// copied when it is issued and a read's are copied into the caller's buffer on the
// JavaScript thread when it completes, after the same check.

/// An offset: a number (a safe integer, checked by validation.ts) or a bigint.
fn offset(v: Either<f64, BigInt>) -> nbd_client::Result<u64> {
    match v {
        Either::A(n) if n >= 0.0 && n.fract() == 0.0 && n <= 9_007_199_254_740_991.0 => Ok(n as u64),
        Either::A(n) => Err(invalid(format!("offset {n} is not a non-negative safe integer"))),
        Either::B(b) => {
            let (negative, value, lossless) = b.get_u64();
            if negative || !lossless {
                Err(invalid("bigint offset must be between 0 and 2^64-1"))
            } else {
                Ok(value)
            }
        }
    }
}

/// A command's count and offset, or the error of the first that is not valid.
fn span(count_: f64, offset_: Either<f64, BigInt>) -> nbd_client::Result<(u64, u64)> {
    Ok((count(count_)?, offset(offset_)?))
}

fn count(n: f64) -> nbd_client::Result<u64> {
    if n >= 0.0 && n.fract() == 0.0 && n <= 9_007_199_254_740_991.0 {
        Ok(n as u64)
    } else {
        Err(invalid(format!("count {n} is not a non-negative safe integer")))
    }
}

fn tls_mode(mode: &str) -> nbd_client::Result<nbd_client::TlsMode> {
    match mode {
        "disable" => Ok(nbd_client::TlsMode::Disable),
        "allow" => Ok(nbd_client::TlsMode::Allow),
        "require" => Ok(nbd_client::TlsMode::Require),
        other => Err(invalid(format!(
            "TLS mode {other:?} is not one of 'disable', 'allow', 'require'"
        ))),
    }
}

fn token(cancel: Option<&NativeCancel>) -> Option<CancelToken> {
    cancel.map(|c| c.token.clone())
}

/// Cancels the commands it is passed to (the Rust side of an `AbortSignal`).
#[napi]
pub struct NativeCancel {
    token: CancelToken,
}

#[napi]
impl NativeCancel {
    /// A token not yet cancelled.
    #[napi(constructor)]
    pub fn new() -> Self {
        NativeCancel {
            token: CancelToken::new(),
        }
    }

    /// Cancels; once this returns no destination buffer is written any more.
    #[napi]
    pub fn cancel(&self) {
        self.token.cancel();
    }
}

impl Default for NativeCancel {
    fn default() -> Self {
        Self::new()
    }
}

/// Byte and chunk counters.
#[napi(object)]
pub struct NativeStats {
    pub bytes_sent: BigInt,
    pub chunks_sent: BigInt,
    pub bytes_received: BigInt,
    pub chunks_received: BigInt,
}

/// An export the server lists (`optList`).
#[napi(object)]
pub struct NativeExportListing {
    pub name: String,
    pub description: String,
}

/// Debug messages on their way to a JavaScript callback: (context, message).
type DebugCallback =
    ThreadsafeFunction<(String, String), (), FnArgs<(String, String)>, Status, false, true>;

/// The handle, as `nbd-client` implements it. Wrapped by `Handle` in handle.ts.
#[napi]
pub struct NativeHandle {
    handle: Handle,
    make_error: ErrorFactory,
    /// The event-loop driver, once the handshake handed the connection over.
    driver: RefCell<Option<Rc<LoopDriver>>>,
    /// Completions of commands the tokio driver runs (TLS connections).
    completer: Arc<Completer>,
    /// Set (on the JavaScript thread) by `close()`: reads that complete later leave their
    /// buffers alone.
    closed: Arc<AtomicBool>,
    /// `preadInitialize`, kept here for `preadInto`, which zeroes before any check.
    pread_initialize: Cell<bool>,
    /// The debug callback, for the event-loop driver to call directly.
    debug_js: Rc<RefCell<Option<Ref>>>,
}

/// A handle that is garbage-collected (or whose worker ends) without `close()` still lets go
/// of its socket, also while a connect is still waiting for the server.
impl Drop for NativeHandle {
    fn drop(&mut self) {
        self.closed.store(true, Ordering::SeqCst);
        if let Some(d) = self.driver.borrow_mut().take() {
            // No JavaScript inside a finalizer: pending commands reject from the poll
            // handle's close callback.
            d.close();
        }
        self.handle.close_in_background();
    }
}

/// The promise of a call that runs on tokio (`$work` uses `h`, the handle's clone):
/// rejected with `$op`'s `NbdError`.
macro_rules! spawn {
    ($self:ident, $env:expr, $op:literal, $work:expr) => {
        {
            // Made here, on the JavaScript thread: the call's checks and state change happen
            // now, before the promise is returned; only the rest runs on tokio.
            let work = $work;
            settle::spawn($env, $self.make_error, $op, work)
        }
    };
}

/// The largest read this binding allocates for (libnbd's limit on reads too).
const READ_MAX: u64 = 64 * 1024 * 1024;

/// A command for either driver.
struct Cmd {
    operation: &'static str,
    command: Command,
    filter: Option<Vec<String>>,
    record_chunks: bool,
    outcome: Outcome,
}

impl NativeHandle {
    /// The event-loop driver, started on first use once the handshake has handed the
    /// connection over.
    fn driver(&self, env: napi::sys::napi_env) -> Option<Rc<LoopDriver>> {
        if let Some(d) = self.driver.borrow().as_ref() {
            return Some(d.clone());
        }
        let t = self.handle.take_transmission()?;
        match LoopDriver::start(env, t, self.make_error, self.debug_js.clone()) {
            Ok(d) => {
                *self.driver.borrow_mut() = Some(d.clone());
                Some(d)
            }
            Err(_) => None,
        }
    }

    /// A promise already rejected with `operation`'s `NbdError` for `e`.
    pub(crate) fn rejected(&self, env: napi::sys::napi_env, operation: &str, e: &nbd_client::Error) -> settle::Value {
        settle::rejected(env, &self.make_error, operation, e)
    }

    fn reject<'env>(&self, env: &'env Env, operation: &str, e: &nbd_client::Error) -> Unknown<'env> {
        Self::value(env, self.rejected(env.raw(), operation, e))
    }

    /// A core error as `operation`'s `NbdError`, for a synchronous call to throw.
    fn fail(&self, operation: &'static str) -> impl Fn(nbd_client::Error) -> Error {
        let make_error = self.make_error;
        move |e| make_error.throwable(operation, &e)
    }

    /// Applies a TLS mode given by name (`disable`, `allow`, `require`) with `set`.
    fn set_tls_mode(
        &self,
        operation: &'static str,
        mode: &str,
        set: impl FnOnce(&nbd_client::Handle, nbd_client::TlsMode) -> nbd_client::Result<()>,
    ) -> Result<()> {
        tls_mode(mode).and_then(|m| set(&self.handle, m)).map_err(self.fail(operation))
    }

    fn value<'env>(env: &'env Env, v: settle::Value) -> Unknown<'env> {
        unsafe { Unknown::from_napi_value(env.raw(), v) }.expect("a value")
    }

    /// Starts a command; `own` is the Buffer a read goes to, `caller` the caller's buffer
    /// (a preadInto's destination, or a large write's source), `payload` a write's bytes.
    #[allow(clippy::too_many_arguments)]
    fn start<'env>(
        &self,
        env: &'env Env,
        c: Cmd,
        own: Option<(settle::Value, *mut u8, usize)>,
        caller: Option<CallerBuf>,
        payload: Payload,
        cancel: Option<&NativeCancel>,
    ) -> Unknown<'env> {
        let raw = env.raw();
        let cancel = token(cancel);
        if let Some(d) = self.driver(raw) {
            let (deferred, promise) = settle::promise(raw);
            let own = own.and_then(|(v, p, l)| Ref::new(raw, v).map(|r| (r, p, l)));
            let user = JsCommand {
                deferred,
                operation: c.operation,
                outcome: c.outcome,
                own,
                caller,
                cancel,
            };
            let sub = Submission {
                cmd: c.command,
                filter: c.filter,
                record_chunks: c.record_chunks,
                payload,
                user,
            };
            let r = d.conn.borrow_mut().submit(sub, self.handle.strict_mode());
            match r {
                Ok(()) => d.submitted(),
                Err((e, user)) => {
                    settle::reject(raw, user.deferred, settle::error(raw, &self.make_error, c.operation, &e));
                }
            }
            return Self::value(env, promise);
        }
        // The tokio driver (TLS), or not connected: the handle refuses or queues it.
        let Command { kind, offset, length, flags } = c.command;
        let op = match (kind, &payload) {
            (CommandKind::Read, _) if c.record_chunks => Op::ReadStructured { count: length, offset, flags },
            (CommandKind::Read, _) => Op::Read { count: length, offset, flags },
            (CommandKind::Write, Payload::Owned(_)) | (CommandKind::Write, Payload::Borrowed(_)) => {
                let bytes = match payload {
                    Payload::Owned(v) => v,
                    _ => match caller.as_ref().and_then(CallerBuf::check) {
                        // SAFETY: checked live just now, on the JavaScript thread.
                        Some((p, l)) => unsafe { std::slice::from_raw_parts(p, l) }.to_vec(),
                        None => Vec::new(),
                    },
                };
                Op::Write { src: Box::new(bytes), offset, flags }
            }
            (CommandKind::BlockStatus, _) => Op::BlockStatus { count: length, offset, flags, contexts: c.filter },
            (kind, _) => Op::Other { kind, count: length, offset, flags },
        };
        let target = if kind == CommandKind::Read && !c.record_chunks { caller } else { None };
        let (promise, done, refused) =
            self.completer
                .begin(raw, c.operation, c.outcome, target, cancel.clone(), self.closed.clone());
        match self.handle.submit(op, cancel, done) {
            Ok(()) => Self::value(env, promise),
            Err(e) => Self::value(env, refused(e)),
        }
    }

    /// Reads into a new Buffer (`pread`), or with [`Outcome::Structured`], the data and the
    /// chunks the server sent (`preadStructured`).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn read<'env>(
        &self,
        env: &'env Env,
        operation: &'static str,
        count_: f64,
        offset_: Either<f64, BigInt>,
        flags: u32,
        outcome: Outcome,
        cancel: Option<&NativeCancel>,
    ) -> Unknown<'env> {
        let (count, offset) = match span(count_, offset_) {
            Ok(span) => span,
            Err(e) => return self.reject(env, operation, &e),
        };
        let c = Self::read_cmd(operation, count, offset, flags, outcome);
        // The Buffer is made now only for the event-loop driver (which reads straight into
        // it); the tokio driver reads into memory of its own. A read over 64 MiB gets none:
        // the checks refuse it (ERANGE, after the state and range checks, as libnbd).
        let own = if count > READ_MAX {
            None
        } else if self.driver(env.raw()).is_some() {
            match settle::read_buffer(env.raw(), count as usize) {
                Some((v, p)) => Some((v, p, count as usize)),
                None => {
                    let e = nbd_client::Error::usage(Errno::ENOMEM, format!("cannot allocate {count} bytes"));
                    return self.reject(env, operation, &e);
                }
            }
        } else {
            None
        };
        self.start(env, c, own, None, Payload::None, cancel)
    }

    /// A read into the caller's buffer `buf`, directly (event-loop driver) or on completion
    /// (tokio driver):
    /// - `preadInto` ([`Outcome::Void`]): resolves with nothing; with `preadInitialize` on,
    ///   `buf` is zeroed first, before any check, as libnbd does;
    /// - a `pread` ([`Outcome::CallerBuffer`]) into the Buffer handle.ts made for it (a slice
    ///   of its slab, or a Buffer of its own): resolves with `buf`. No zeroing: every byte is
    ///   written on success, and on failure the Buffer is never handed out.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn read_into<'env>(
        &self,
        env: &'env Env,
        op: &'static str,
        buf: Unknown,
        offset_: Either<f64, BigInt>,
        flags: u32,
        cancel: Option<&NativeCancel>,
        outcome: Outcome,
    ) -> Unknown<'env> {
        let Some(target) = CallerBuf::new(env.raw(), buf.value().value) else {
            return self.reject(env, op, &nbd_client::Error::usage(Errno::EINVAL, "buf must be a Uint8Array"));
        };
        if matches!(outcome, Outcome::Void) && self.pread_initialize.get() && target.len > 0 {
            // SAFETY: just looked up, on the JavaScript thread.
            unsafe { std::ptr::write_bytes(target.ptr, 0, target.len) };
        }
        let o = match offset(offset_) {
            Ok(o) => o,
            Err(e) => return self.reject(env, op, &e),
        };
        let c = Self::read_cmd(op, target.len as u64, o, flags, outcome);
        self.start(env, c, None, Some(target), Payload::None, cancel)
    }

    // ---- the per-command calls ----
    //
    // Reached from JavaScript through the raw entry points of `fast.rs`, not as methods of
    // the class: napi-rs's per-call borrow bookkeeping cost more than the rest of a small
    // read's JavaScript-side work. Each returns a promise at once; refusals (state, strict
    // checks, arguments) reject it.

    /// Writes `buf`: small writes are copied now; large ones are sent from `buf` (event-loop
    /// driver) or copied now (tokio driver).
    pub(crate) fn pwrite<'env>(
        &self,
        env: &'env Env,
        buf: Unknown,
        offset_: Either<f64, BigInt>,
        flags: u32,
        cancel: Option<&NativeCancel>,
    ) -> Unknown<'env> {
        let op = "pwrite";
        let Some(source) = CallerBuf::new(env.raw(), buf.value().value) else {
            return self.reject(env, op, &nbd_client::Error::usage(Errno::EINVAL, "buf must be a Uint8Array"));
        };
        let o = match offset(offset_) {
            Ok(o) => o,
            Err(e) => return self.reject(env, op, &e),
        };
        let len = source.len;
        let c = Cmd {
            operation: op,
            command: Command { kind: CommandKind::Write, offset: o, length: len as u64, flags },
            filter: None,
            record_chunks: false,
            outcome: Outcome::Void,
        };
        if len <= COPY_PAYLOAD_MAX {
            // SAFETY: just looked up, on the JavaScript thread.
            let bytes = if len == 0 { Vec::new() } else { unsafe { std::slice::from_raw_parts(source.ptr, len) }.to_vec() };
            self.start(env, c, None, None, Payload::Owned(bytes), cancel)
        } else {
            self.start(env, c, None, Some(source), Payload::Borrowed(len), cancel)
        }
    }

    fn read_cmd(operation: &'static str, count: u64, offset: u64, flags: u32, outcome: Outcome) -> Cmd {
        Cmd {
            operation,
            command: Command { kind: CommandKind::Read, offset, length: count, flags },
            filter: None,
            record_chunks: matches!(outcome, Outcome::Structured),
            outcome,
        }
    }
}

#[napi]
impl NativeHandle {
    /// `make_error(code, errno, operation, message)` makes the `NbdError` a command rejects
    /// with.
    #[napi(constructor)]
    pub fn new(
        env: Env,
        #[napi(ts_arg_type = "(code: string, errno: number, operation: string, message: string) => Error")]
        make_error: ErrorFactory,
    ) -> Result<Self> {
        let completer = Completer::new(env.raw(), make_error)
            .ok_or_else(|| make_error.throwable("create", &invalid("cannot create the completion channel")))?;
        let handle = Handle::default();
        handle.set_event_loop_driver(true);
        Ok(NativeHandle {
            handle,
            make_error,
            driver: RefCell::new(None),
            completer,
            closed: Arc::default(),
            pread_initialize: Cell::new(true),
            debug_js: Rc::default(),
        })
    }

    /// Starts the event-loop driver as soon as a connection is handed over (after a connect
    /// or `optGo` resolves), so that a server hanging up on an idle handle is noticed.
    #[napi]
    pub fn attach(&self, env: Env) {
        let _ = self.driver(env.raw());
    }

    // ---- settings ----

    /// The export to attach to (`nbd_set_export_name`).
    #[napi]
    pub fn set_export_name(&self, name: String) -> Result<()> {
        self.handle.set_export_name(&name).map_err(self.fail("setExportName"))
    }

    /// The export name (`nbd_get_export_name`).
    #[napi]
    pub fn get_export_name(&self) -> String {
        self.handle.settings().negotiation.export_name
    }

    /// The name used in messages (`nbd_set_handle_name`).
    #[napi]
    pub fn set_handle_name(&self, name: String) {
        self.handle.set_handle_name(&name)
    }

    /// The handle's name (`nbd_get_handle_name`).
    #[napi]
    pub fn get_handle_name(&self) -> String {
        self.handle.settings().handle_name
    }

    /// Strict-mode bits (`nbd_set_strict_mode`).
    #[napi]
    pub fn set_strict_mode(&self, flags: u32) -> Result<()> {
        self.handle.set_strict_mode(flags).map_err(self.fail("setStrictMode"))
    }

    /// The strict-mode bits in force (`nbd_get_strict_mode`).
    #[napi]
    pub fn get_strict_mode(&self) -> u32 {
        self.handle.settings().strict
    }

    /// Whether reads zero their buffer first (`nbd_set_pread_initialize`).
    #[napi]
    pub fn set_pread_initialize(&self, on: bool) {
        self.pread_initialize.set(on);
        self.handle.set_pread_initialize(on)
    }

    /// Whether reads zero their buffer first (`nbd_get_pread_initialize`).
    #[napi]
    pub fn get_pread_initialize(&self) -> bool {
        self.handle.settings().pread_initialize
    }

    /// A meta context to ask for (`nbd_add_meta_context`).
    #[napi]
    pub fn add_meta_context(&self, name: String) -> Result<()> {
        self.handle.add_meta_context(&name).map_err(self.fail("addMetaContext"))
    }

    /// Forgets the meta contexts to ask for (`nbd_clear_meta_contexts`).
    #[napi]
    pub fn clear_meta_contexts(&self) -> Result<()> {
        self.handle.clear_meta_contexts().map_err(self.fail("clearMetaContexts"))
    }

    /// The meta contexts that will be (or were) asked for.
    #[napi]
    pub fn get_meta_contexts(&self) -> Vec<String> {
        self.handle.settings().negotiation.meta_contexts
    }

    /// Debug messages on or off; `callback`, when given, receives them from now on (else the
    /// callback given earlier, else stderr).
    #[napi]
    pub fn set_debug(
        &self,
        env: Env,
        on: bool,
        #[napi(ts_arg_type = "((context: string, message: string) => void) | null | undefined")]
        callback: Option<Function<FnArgs<(String, String)>, ()>>,
    ) -> Result<()> {
        if let Some(f) = &callback {
            *self.debug_js.borrow_mut() = Ref::new(env.raw(), f.value().value);
            if let Some(d) = self.driver.borrow().as_ref() {
                d.conn.borrow_mut().queue_debug(true);
            }
        }
        let sink: Option<nbd_client::DebugSink> = match callback {
            None => None,
            Some(f) => {
                let tsfn: DebugCallback = f
                    .build_threadsafe_function::<(String, String)>()
                    .callee_handled::<false>()
                    .weak::<true>()
                    .build_callback(|ctx| Ok(FnArgs::from(ctx.value)))
                    .map_err(|e| self.fail("setDebug")(invalid(e.reason.clone())))?;
                let tsfn = Arc::new(tsfn);
                Some(Arc::new(move |context: &str, message: &str| {
                    tsfn.call(
                        (context.to_string(), message.to_string()),
                        ThreadsafeFunctionCallMode::NonBlocking,
                    );
                }))
            }
        };
        // A boolean alone keeps the callback given earlier (if any).
        if sink.is_some() {
            self.handle.set_debug_sink(sink);
        }
        self.handle.set_debug(on);
        Ok(())
    }

    /// Forgets the debug callback: messages (when on) go to stderr again.
    #[napi]
    pub fn clear_debug_callback(&self) {
        self.handle.set_debug_sink(None);
        *self.debug_js.borrow_mut() = None;
        if let Some(d) = self.driver.borrow().as_ref() {
            d.conn.borrow_mut().queue_debug(false);
        }
    }

    /// Whether debug messages flow (`nbd_get_debug`).
    #[napi]
    pub fn get_debug(&self) -> bool {
        self.handle.settings().debug
    }

    /// `disable`, `allow` or `require`.
    #[napi]
    pub fn set_tls(&self, mode: String) -> Result<()> {
        self.set_tls_mode("setTls", &mode, |h, m| h.set_tls(m))
    }

    /// The TLS mode: `disable`, `allow` or `require` (`nbd_get_tls`).
    #[napi]
    pub fn get_tls(&self) -> &'static str {
        self.handle.settings().tls.mode.name()
    }

    /// The directory of X.509 files (`nbd_set_tls_certificates`).
    #[napi]
    pub fn set_tls_certificates(&self, dir: String) -> Result<()> {
        self.handle.set_tls_certificates(&dir).map_err(self.fail("setTlsCertificates"))
    }

    /// The PSK user name (`nbd_set_tls_username`).
    #[napi]
    pub fn set_tls_username(&self, name: String) -> Result<()> {
        self.handle.set_tls_username(&name).map_err(self.fail("setTlsUsername"))
    }

    /// The name set, else the login name.
    #[napi]
    pub fn get_tls_username(&self) -> Result<String> {
        self.handle.tls_username().map_err(self.fail("getTlsUsername"))
    }

    /// The PSK key file (`nbd_set_tls_psk_file`).
    #[napi]
    pub fn set_tls_psk_file(&self, path: String) -> Result<()> {
        self.handle.set_tls_psk_file(&path).map_err(self.fail("setTlsPskFile"))
    }

    /// The name to check the server's certificate against (`nbd_set_tls_hostname`).
    #[napi]
    pub fn set_tls_hostname(&self, host: String) -> Result<()> {
        self.handle.set_tls_hostname(&host).map_err(self.fail("setTlsHostname"))
    }

    /// The name set, else the TCP host connected to.
    #[napi]
    pub fn get_tls_hostname(&self) -> Option<String> {
        self.handle.tls_hostname()
    }

    /// Bits: 1 TCP, 2 Unix, 4 vsock, 8 ssh.
    #[napi]
    pub fn set_uri_allow_transports(&self, mask: u32) -> Result<()> {
        self.handle.set_uri_allow_transports(mask).map_err(self.fail("setUriAllowTransports"))
    }

    /// The transports a URI may use, as bits (`nbd_get_uri_allow_transports`).
    #[napi]
    pub fn get_uri_allow_transports(&self) -> u32 {
        self.handle.settings().uri_policy.allow_transports
    }

    /// What a URI may say about TLS (`nbd_set_uri_allow_tls`).
    #[napi]
    pub fn set_uri_allow_tls(&self, mode: String) -> Result<()> {
        self.set_tls_mode("setUriAllowTls", &mode, |h, m| h.set_uri_allow_tls(m))
    }

    /// What a URI may say about TLS (`nbd_get_uri_allow_tls`).
    #[napi]
    pub fn get_uri_allow_tls(&self) -> &'static str {
        self.handle.settings().uri_policy.allow_tls.name()
    }

    /// Handshake flags the client may use (`nbd_set_handshake_flags`).
    #[napi]
    pub fn set_handshake_flags(&self, flags: u32) -> Result<()> {
        self.handle.set_handshake_flags(flags).map_err(self.fail("setHandshakeFlags"))
    }

    /// Handshake flags the client may use (`nbd_get_handshake_flags`).
    #[napi]
    pub fn get_handshake_flags(&self) -> u32 {
        self.handle.settings().negotiation.handshake_flags
    }

    /// Milliseconds for the whole connect and handshake, and in option mode for each option
    /// request; 0 means no limit.
    #[napi]
    pub fn set_connect_timeout(&self, ms: f64) -> Result<()> {
        if !(ms >= 0.0 && ms.is_finite()) {
            return Err(self.fail("create")(invalid(format!("connectTimeout {ms} is not a non-negative number"))));
        }
        let limit = match ms {
            0.0 => None,
            _ => Some(Duration::try_from_secs_f64(ms / 1000.0).map_err(|_| {
                self.fail("create")(nbd_client::Error::usage(
                    Errno::ERANGE,
                    format!("connectTimeout {ms} ms is too large"),
                ))
            })?),
        };
        self.handle.set_connect_timeout(limit).map_err(self.fail("create"))
    }

    /// Commands on the wire at once; more are queued.
    #[napi]
    pub fn set_max_in_flight(&self, n: u32) -> Result<()> {
        self.handle.set_max_in_flight(n as usize).map_err(self.fail("create"))
    }

    /// Commands on the wire at once.
    #[napi]
    pub fn get_max_in_flight(&self) -> u32 {
        self.handle.settings().max_in_flight as u32
    }

    // ---- state ----

    /// The handle's state, by libnbd's name.
    #[napi(getter)]
    pub fn state(&self) -> &'static str {
        self.handle.state().name()
    }

    /// Commands submitted and not yet finished.
    #[napi(getter)]
    pub fn in_flight(&self) -> u32 {
        self.handle.in_flight() as u32
    }

    /// Byte and chunk counters (`nbd_stats_*`).
    #[napi]
    pub fn stats(&self) -> NativeStats {
        let s = self.handle.stats();
        NativeStats {
            bytes_sent: BigInt::from(s.bytes_sent),
            chunks_sent: BigInt::from(s.chunks_sent),
            bytes_received: BigInt::from(s.bytes_received),
            chunks_received: BigInt::from(s.chunks_received),
        }
    }

    // ---- connecting ----

    /// Talks NBD over an open connected socket (`nbd_connect_socket`).
    #[napi(ts_return_type = "Promise<void>")]
    pub fn connect_socket<'env>(&self, env: &'env Env, fd: i32) -> Result<PromiseRaw<'env, ()>> {
        let h = self.handle.clone();
        spawn!(self, env, "connectSocket", h.connect_socket(fd))
    }

    /// Connects to a Unix domain socket (`nbd_connect_unix`).
    #[napi(ts_return_type = "Promise<void>")]
    pub fn connect_unix<'env>(&self, env: &'env Env, path: String) -> Result<PromiseRaw<'env, ()>> {
        let h = self.handle.clone();
        spawn!(self, env, "connectUnix", h.connect_unix(&path))
    }

    /// Connects over TCP (`nbd_connect_tcp`).
    #[napi(ts_return_type = "Promise<void>")]
    pub fn connect_tcp<'env>(
        &self,
        env: &'env Env,
        host: String,
        port: String,
    ) -> Result<PromiseRaw<'env, ()>> {
        let h = self.handle.clone();
        spawn!(self, env, "connectTcp", h.connect_tcp(&host, &port))
    }

    /// Connects to what an NBD URI names (`nbd_connect_uri`).
    #[napi(ts_return_type = "Promise<void>")]
    pub fn connect_uri<'env>(&self, env: &'env Env, uri: String) -> Result<PromiseRaw<'env, ()>> {
        let h = self.handle.clone();
        spawn!(self, env, "connectUri", h.connect_uri(&uri))
    }

    /// Starts a server on a socket as its stdin and stdout (`nbd_connect_command`).
    #[napi(ts_return_type = "Promise<void>")]
    pub fn connect_command<'env>(&self, env: &'env Env, argv: Vec<String>) -> Result<PromiseRaw<'env, ()>> {
        let h = self.handle.clone();
        spawn!(self, env, "connectCommand", h.connect_command(argv))
    }

    /// Starts a server with a listening socket (`nbd_connect_systemd_socket_activation`).
    #[napi(ts_return_type = "Promise<void>")]
    pub fn connect_systemd_socket_activation<'env>(
        &self,
        env: &'env Env,
        argv: Vec<String>,
    ) -> Result<PromiseRaw<'env, ()>> {
        let h = self.handle.clone();
        spawn!(self, env, "connectSystemdSocketActivation", h.connect_systemd_socket_activation(argv))
    }

    /// The pid of the server process started by connectCommand or socket activation;
    /// `ESRCH` when there is none.
    #[napi]
    pub fn get_subprocess_pid(&self) -> Result<u32> {
        self.handle.subprocess_pid().map_err(self.fail("getSubprocessPid"))
    }

    /// `LISTEN_FDNAMES` for socket activation (`nbd_set_socket_activation_name`).
    #[napi]
    pub fn set_socket_activation_name(&self, name: String) -> Result<()> {
        self.handle.set_socket_activation_name(&name).map_err(self.fail("setSocketActivationName"))
    }

    /// `LISTEN_FDNAMES` for socket activation (`nbd_get_socket_activation_name`).
    #[napi]
    pub fn get_socket_activation_name(&self) -> String {
        self.handle.settings().socket_activation_name
    }

    /// Connects over AF_VSOCK (`nbd_connect_vsock`).
    #[napi(ts_return_type = "Promise<void>")]
    pub fn connect_vsock<'env>(&self, env: &'env Env, cid: u32, port: u32) -> Result<PromiseRaw<'env, ()>> {
        let h = self.handle.clone();
        spawn!(self, env, "connectVsock", h.connect_vsock(cid, port))
    }

    /// A URI for the current connection (`nbd_get_uri`).
    #[napi]
    pub fn get_uri(&self) -> Result<String> {
        self.handle.get_uri().map_err(self.fail("getUri"))
    }

    // ---- commands ----
    //
    // Each returns a promise at once; refusals (state, strict checks, arguments) reject it.

    /// Block status for every negotiated context, or only `contexts`.
    #[napi(ts_return_type = "Promise<Record<string, Array<{ offset: number; length: number; flags: number }>>>")]
    pub fn block_status<'env>(
        &self,
        env: &'env Env,
        count_: f64,
        offset_: Either<f64, BigInt>,
        flags: u32,
        contexts: Option<Vec<String>>,
        cancel: Option<&NativeCancel>,
    ) -> Unknown<'env> {
        let (c, o) = match span(count_, offset_) {
            Ok(span) => span,
            Err(e) => return self.reject(env, "blockStatus", &e),
        };
        let cmd = Cmd {
            operation: "blockStatus",
            command: Command { kind: CommandKind::BlockStatus, offset: o, length: c, flags },
            filter: contexts,
            record_chunks: false,
            outcome: Outcome::Extents,
        };
        self.start(env, cmd, None, None, Payload::None, cancel)
    }

    /// Flush, trim, cache or zero (`kind`), by their libnbd names.
    #[napi(ts_return_type = "Promise<void>")]
    pub fn command<'env>(
        &self,
        env: &'env Env,
        kind: String,
        count_: f64,
        offset_: Either<f64, BigInt>,
        flags: u32,
        cancel: Option<&NativeCancel>,
    ) -> Unknown<'env> {
        let (kind, operation) = match kind.as_str() {
            "flush" => (CommandKind::Flush, "flush"),
            "trim" => (CommandKind::Trim, "trim"),
            "cache" => (CommandKind::Cache, "cache"),
            "zero" => (CommandKind::WriteZeroes, "zero"),
            other => {
                return self.reject(env, "command", &nbd_client::Error::usage(Errno::EINVAL, format!("unknown command {other:?}")))
            }
        };
        let (c, o) = match span(count_, offset_) {
            Ok(span) => span,
            Err(e) => return self.reject(env, operation, &e),
        };
        let cmd = Cmd {
            operation,
            command: Command { kind, offset: o, length: c, flags },
            filter: None,
            record_chunks: false,
            outcome: Outcome::Void,
        };
        self.start(env, cmd, None, None, Payload::None, cancel)
    }

    // ---- option negotiation ----

    /// Ends negotiation and enters transmission (`nbd_opt_go`).
    #[napi(ts_return_type = "Promise<void>")]
    pub fn opt_go<'env>(&self, env: &'env Env) -> Result<PromiseRaw<'env, ()>> {
        let h = self.handle.clone();
        spawn!(self, env, "optGo", h.opt_go())
    }

    /// Ends the connection politely (`nbd_opt_abort`).
    #[napi(ts_return_type = "Promise<void>")]
    pub fn opt_abort<'env>(&self, env: &'env Env) -> Result<PromiseRaw<'env, ()>> {
        let h = self.handle.clone();
        spawn!(self, env, "optAbort", h.opt_abort())
    }

    /// Asks for the export's details (`nbd_opt_info`).
    #[napi(ts_return_type = "Promise<void>")]
    pub fn opt_info<'env>(&self, env: &'env Env) -> Result<PromiseRaw<'env, ()>> {
        let step = self.handle.opt_info();
        settle::spawn(env, self.make_error, "optInfo", async move { step.await.map(drop) })
    }

    /// The exports the server lists.
    #[napi]
    pub fn opt_list<'env>(&self, env: &'env Env) -> Result<PromiseRaw<'env, Vec<NativeExportListing>>> {
        let step = self.handle.opt_list();
        settle::spawn(env, self.make_error, "optList", async move {
            let list = step.await?;
            Ok(list.into_iter().map(|e| NativeExportListing { name: e.name, description: e.description }).collect())
        })
    }

    /// The meta contexts the server offers (`nbd_opt_list_meta_context`).
    #[napi(ts_return_type = "Promise<string[]>")]
    pub fn opt_list_meta_context<'env>(
        &self,
        env: &'env Env,
        queries: Option<Vec<String>>,
    ) -> Result<PromiseRaw<'env, Vec<String>>> {
        let h = self.handle.clone();
        spawn!(self, env, "optListMetaContext", h.opt_list_meta_context(queries))
    }

    /// The meta contexts the server agreed to (`nbd_opt_set_meta_context`).
    #[napi(ts_return_type = "Promise<string[]>")]
    pub fn opt_set_meta_context<'env>(
        &self,
        env: &'env Env,
        queries: Option<Vec<String>>,
    ) -> Result<PromiseRaw<'env, Vec<String>>> {
        let h = self.handle.clone();
        spawn!(self, env, "optSetMetaContext", h.opt_set_meta_context(queries))
    }

    /// Asks for structured replies (`nbd_opt_structured_reply`).
    #[napi(ts_return_type = "Promise<boolean>")]
    pub fn opt_structured_reply<'env>(&self, env: &'env Env) -> Result<PromiseRaw<'env, bool>> {
        let h = self.handle.clone();
        spawn!(self, env, "optStructuredReply", h.opt_structured_reply())
    }

    /// Asks for extended headers (`nbd_opt_extended_headers`).
    #[napi(ts_return_type = "Promise<boolean>")]
    pub fn opt_extended_headers<'env>(&self, env: &'env Env) -> Result<PromiseRaw<'env, bool>> {
        let h = self.handle.clone();
        spawn!(self, env, "optExtendedHeaders", h.opt_extended_headers())
    }

    /// Asks for TLS (`nbd_opt_starttls`).
    #[napi(ts_return_type = "Promise<boolean>")]
    pub fn opt_starttls<'env>(&self, env: &'env Env) -> Result<PromiseRaw<'env, bool>> {
        let h = self.handle.clone();
        spawn!(self, env, "optStarttls", h.opt_starttls())
    }

    // ---- ending ----

    /// Disconnects politely (`nbd_shutdown`).
    #[napi(ts_return_type = "Promise<void>")]
    pub fn shutdown<'env>(&self, env: &'env Env, abandon_pending: bool) -> Result<Unknown<'env>> {
        if let Some(d) = self.driver(env.raw()) {
            return Ok(Self::value(env, d.shutdown(abandon_pending)));
        }
        let h = self.handle.clone();
        let p = settle::spawn(env, self.make_error, "shutdown", async move { h.shutdown(abandon_pending).await })?;
        Ok(Self::value(env, p.raw()))
    }

    /// Closes the handle: pending commands fail, the socket is closed (`nbd_close`).
    #[napi(ts_return_type = "Promise<void>")]
    pub fn close<'env>(&self, env: &'env Env) -> Result<PromiseRaw<'env, ()>> {
        self.closed.store(true, Ordering::SeqCst);
        if let Some(d) = self.driver.borrow_mut().take() {
            d.close();
        }
        let h = self.handle.clone();
        env.spawn_future(async move {
            h.close().await;
            Ok(())
        })
    }

    // ---- information ----

    /// The export size in bytes.
    #[napi]
    pub fn get_size(&self) -> Result<BigInt> {
        let n = self.handle.negotiated().map_err(self.fail("getSize"))?;
        Ok(BigInt::from(n.export.size))
    }

    /// `minimum`, `preferred`, `maximum` (0 when the server sent none) or `payload`.
    #[napi]
    pub fn get_block_size(&self, kind: String) -> Result<u32> {
        let n = self.handle.negotiated().map_err(self.fail("getBlockSize"))?;
        let bs = n.export.block_size;
        match kind.as_str() {
            "minimum" => Ok(bs.map_or(0, |b| b.minimum)),
            "preferred" => Ok(bs.map_or(0, |b| b.preferred)),
            "maximum" => Ok(bs.map_or(0, |b| b.maximum)),
            "payload" => Ok(n.export.payload_max()),
            other => Err(self.fail("getBlockSize")(invalid(format!(
                "block size kind {other:?} is not one of minimum, preferred, maximum, payload"
            )))),
        }
    }

    /// Whether the server set transmission flag `flag` (one of the `FLAG_*` values).
    fn flag(&self, operation: &'static str, flag: u16) -> Result<bool> {
        let n = self.handle.negotiated().map_err(self.fail(operation))?;
        Ok(n.export.has(flag))
    }

    /// Whether reads may ask for one data chunk (`nbd_can_df`).
    #[napi]
    pub fn can_df(&self) -> Result<bool> {
        self.handle.can_df().map_err(self.fail("canDf"))
    }

    /// The handshake style the server spoke (`nbd_get_protocol`).
    #[napi]
    pub fn get_protocol(&self) -> Result<&'static str> {
        Ok(self.handle.negotiated_so_far().map_err(self.fail("getProtocol"))?.protocol.name())
    }

    /// Whether structured replies were negotiated (`nbd_get_structured_replies_negotiated`).
    #[napi]
    pub fn get_structured_replies_negotiated(&self) -> Result<bool> {
        Ok(self.handle.negotiated_so_far().map_err(self.fail("getStructuredRepliesNegotiated"))?.structured_replies)
    }

    /// Whether extended headers were negotiated (`nbd_get_extended_headers_negotiated`).
    #[napi]
    pub fn get_extended_headers_negotiated(&self) -> Result<bool> {
        Ok(self.handle.negotiated_so_far().map_err(self.fail("getExtendedHeadersNegotiated"))?.extended_headers)
    }

    /// Whether TLS was negotiated (`nbd_get_tls_negotiated`).
    #[napi]
    pub fn get_tls_negotiated(&self) -> Result<bool> {
        Ok(self.handle.negotiated_so_far().map_err(self.fail("getTlsNegotiated"))?.tls)
    }

    /// Whether meta context `name` was negotiated (`EINVAL` when contexts were asked for
    /// and the server has not answered for this export).
    #[napi]
    pub fn can_meta_context(&self, name: String) -> Result<bool> {
        self.handle.can_meta_context(&name).map_err(self.fail("canMetaContext"))
    }

    /// Whether block status can be filtered (`nbd_can_block_status_payload`).
    #[napi]
    pub fn can_block_status_payload(&self) -> Result<bool> {
        self.handle.can_block_status_payload().map_err(self.fail("canBlockStatusPayload"))
    }

    /// The export's canonical name (`nbd_get_canonical_export_name`).
    #[napi]
    pub fn get_canonical_export_name(&self) -> Result<String> {
        let n = self.handle.negotiated().map_err(self.fail("getCanonicalExportName"))?;
        n.export.canonical_name.ok_or_else(|| {
            self.fail("getCanonicalExportName")(nbd_client::Error::server(
                nbd_client::Errno::ENOTSUP,
                "server did not advertise a canonical name (setFullInfo(true) asks for it)",
            ))
        })
    }

    /// The export's description (`nbd_get_export_description`).
    #[napi]
    pub fn get_export_description(&self) -> Result<String> {
        let n = self.handle.negotiated().map_err(self.fail("getExportDescription"))?;
        n.export.description.ok_or_else(|| {
            self.fail("getExportDescription")(nbd_client::Error::server(
                nbd_client::Errno::ENOTSUP,
                "server did not advertise a description (setFullInfo(true) asks for it)",
            ))
        })
    }
}

/// The boolean settings, each a pair: the setter forwards to the handle's setter of the same
/// name (which checks the handle's state), the getter reads the setting.
macro_rules! bool_settings {
    ($($doc:literal $op:literal $set:ident, $get:ident => $($field:ident).+;)*) => {
        #[napi]
        impl NativeHandle {
            $(
                #[doc = $doc]
                #[napi]
                pub fn $set(&self, on: bool) -> Result<()> {
                    self.handle.$set(on).map_err(self.fail($op))
                }

                #[doc = $doc]
                #[napi]
                pub fn $get(&self) -> bool {
                    self.handle.settings().$($field).+
                }
            )*
        }
    };
}

bool_settings! {
    "Whether to ask for structured replies (`nbd_set_request_structured_replies`)."
    "setRequestStructuredReplies" set_request_structured_replies, get_request_structured_replies => negotiation.request_structured_replies;
    "Whether to ask for block size constraints (`nbd_set_request_block_size`)."
    "setRequestBlockSize" set_request_block_size, get_request_block_size => negotiation.request_block_size;
    "Whether to ask for the canonical name and description (`nbd_set_full_info`)."
    "setFullInfo" set_full_info, get_full_info => negotiation.full_info;
    "Whether to ask for extended headers (`nbd_set_request_extended_headers`)."
    "setRequestExtendedHeaders" set_request_extended_headers, get_request_extended_headers => negotiation.request_extended_headers;
    "Whether to set meta contexts before GO/INFO (`nbd_set_request_meta_context`)."
    "setRequestMetaContext" set_request_meta_context, get_request_meta_context => negotiation.request_meta_context;
    "Whether to stop in option negotiation (`nbd_set_opt_mode`)."
    "setOptMode" set_opt_mode, get_opt_mode => negotiation.opt_mode;
    "Whether to verify the server's certificate (`nbd_set_tls_verify_peer`)."
    "setTlsVerifyPeer" set_tls_verify_peer, get_tls_verify_peer => tls.verify_peer;
    "Whether a URI may name local files (`nbd_set_uri_allow_local_file`)."
    "setUriAllowLocalFile" set_uri_allow_local_file, get_uri_allow_local_file => uri_policy.allow_local_file;
}

/// The getters that read one transmission flag of the export, each checking the handle's
/// state first (libnbd's `nbd_can_*` / `nbd_is_*` that answer from the export's flags).
macro_rules! export_flags {
    ($($doc:literal $op:literal $name:ident => $flag:ident;)*) => {
        #[napi]
        impl NativeHandle {
            $(
                #[doc = $doc]
                #[napi]
                pub fn $name(&self) -> Result<bool> {
                    self.flag($op, $flag)
                }
            )*
        }
    };
}

export_flags! {
    "Whether the export is read-only (`nbd_is_read_only`)."
    "isReadOnly" is_read_only => FLAG_READ_ONLY;
    "Whether the export is on rotating media (`nbd_is_rotational`)."
    "isRotational" is_rotational => FLAG_ROTATIONAL;
    "Whether the server can flush (`nbd_can_flush`)."
    "canFlush" can_flush => FLAG_SEND_FLUSH;
    "Whether the server honours FUA (`nbd_can_fua`)."
    "canFua" can_fua => FLAG_SEND_FUA;
    "Whether the server can trim (`nbd_can_trim`)."
    "canTrim" can_trim => FLAG_SEND_TRIM;
    "Whether the server can write zeroes (`nbd_can_zero`)."
    "canZero" can_zero => FLAG_SEND_WRITE_ZEROES;
    "Whether the server can zero fast (`nbd_can_fast_zero`)."
    "canFastZero" can_fast_zero => FLAG_SEND_FAST_ZERO;
    "Whether several connections see one export (`nbd_can_multi_conn`)."
    "canMultiConn" can_multi_conn => FLAG_CAN_MULTI_CONN;
    "Whether the server can cache (`nbd_can_cache`)."
    "canCache" can_cache => FLAG_SEND_CACHE;
}
