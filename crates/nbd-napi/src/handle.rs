//! `NativeHandle` and `NativeCancel`: the classes `index.ts` builds `Handle` on.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use napi::bindgen_prelude::*;
use napi::threadsafe_function::{ThreadsafeFunction, ThreadsafeFunctionCallMode};
use napi_derive::napi;

use nbd_client::consts::*;

use nbd_client::{CancelToken, ChunkStatus, CommandKind, Detail, Errno, Handle, Op, Reply};

use crate::{invalid, to_js};

// ---- JavaScript buffers ----
//
// No command keeps a raw pointer into JavaScript memory past the call that started it.
// JavaScript can detach a buffer's ArrayBuffer at any moment (`structuredClone(b, {
// transfer })`, `postMessage`, `ArrayBuffer.prototype.transfer`): its memory then belongs to
// another object and is freed with it, while a reference to the old view keeps nothing alive.
// A driver thread writing a read's data there, or sending a write's data from there, would
// corrupt or read freed memory. So a write's bytes are copied while `pwrite` runs, and a read
// lands in memory the driver owns and is copied into the caller's buffer on the JavaScript
// thread when it completes, after checking that the buffer is still attached and that the
// command was neither aborted nor its handle closed meanwhile.

/// The caller's buffer of a `preadInto`, waiting for its data.
struct ReadTarget {
    /// Holds a reference to the JavaScript object only: its data pointer is looked up again
    /// when the data arrives, never taken from here.
    buf: Buffer,
    cancel: Option<CancelToken>,
    closed: Arc<AtomicBool>,
}

impl ReadTarget {
    /// On the JavaScript thread: copies `data` into the buffer, unless the command was
    /// aborted (its promise has already rejected) or the handle closed (it rejects now).
    fn deliver(self, env: &Env, data: &[u8]) -> std::result::Result<(), String> {
        if self.cancel.as_ref().is_some_and(CancelToken::is_cancelled) {
            return Ok(());
        }
        if self.closed.load(Ordering::SeqCst) {
            return Err(error_text(&closed_error()));
        }
        let env = env.raw();
        // SAFETY: on the JavaScript thread of `env`, which created the reference; the
        // pointer and length are fetched now and used before returning to JavaScript, so
        // nothing can detach the buffer in between.
        unsafe {
            let value = Buffer::to_napi_value(env, self.buf).map_err(|e| e.reason.clone())?;
            let mut ptr = std::ptr::null_mut();
            let mut len = 0usize;
            let status = napi::sys::napi_get_buffer_info(env, value, &mut ptr, &mut len);
            if status != napi::sys::Status::napi_ok || len != data.len() || (len > 0 && ptr.is_null()) {
                return Err(error_text(&nbd_client::Error::usage(
                    Errno::EFAULT,
                    format!(
                        "the buffer was detached or resized while the read was in flight \
                         ({} bytes read, the buffer now has {len}); the data was dropped",
                        data.len()
                    ),
                )));
            }
            if len > 0 {
                std::ptr::copy_nonoverlapping(data.as_ptr(), ptr.cast::<u8>(), len);
            }
        }
        Ok(())
    }
}

fn closed_error() -> nbd_client::Error {
    nbd_client::Error::io(
        Errno::ENOTCONN,
        "the handle was closed before the command finished",
    )
}

/// An offset: a number (a safe integer, checked by index.ts) or a bigint.
fn offset(v: Either<f64, BigInt>) -> Result<u64> {
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

fn count(n: f64) -> Result<u64> {
    if n >= 0.0 && n.fract() == 0.0 && n <= 9_007_199_254_740_991.0 {
        Ok(n as u64)
    } else {
        Err(invalid(format!("count {n} is not a non-negative safe integer")))
    }
}

fn tls_mode(mode: &str) -> Result<nbd_client::TlsMode> {
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

/// A finished command: its id, its outcome (`[CODE:errno] message` on failure) with the data
/// of reads and block status extents or read chunks as JSON, and for a `preadInto` the
/// caller's buffer the data goes to.
type Done = (
    u32,
    std::result::Result<(Option<Vec<u8>>, Option<String>), String>,
    Option<ReadTarget>,
);

/// The arguments of the completion callback: id, error, data, detail.
type DoneArgs = FnArgs<(u32, Option<String>, Option<Buffer>, Option<String>)>;

/// One notification channel per handle for every command's outcome: a weak threadsafe
/// function (index.ts keeps the event loop alive while commands are pending), so finishing
/// a command costs one queued call, not a promise machinery of its own.
type Completions = ThreadsafeFunction<Done, (), DoneArgs, Status, false, true>;

/// Debug messages on their way to a JavaScript callback: (context, message).
type DebugCallback =
    ThreadsafeFunction<(String, String), (), FnArgs<(String, String)>, Status, false, true>;

/// Block status extents or read chunks as JSON for index.ts: extents as
/// `{"context": [[offset, length, flags], ...]}`, chunks as `[[offset, length, status]]`.
fn detail_json(detail: &Detail) -> Option<String> {
    use std::fmt::Write;
    match detail {
        Detail::None => None,
        Detail::Extents(contexts) => {
            let mut out = String::from("{");
            for (i, c) in contexts.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&json_string(&c.name));
                out.push_str(":[");
                for (j, e) in c.extents.iter().enumerate() {
                    if j > 0 {
                        out.push(',');
                    }
                    let _ = write!(out, "[{},{},{}]", e.offset, e.length, e.flags);
                }
                out.push(']');
            }
            out.push('}');
            Some(out)
        }
        Detail::Chunks(chunks) => {
            let mut out = String::from("[");
            for (i, c) in chunks.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                let status = match c.status {
                    ChunkStatus::Data => "data",
                    ChunkStatus::Hole => "hole",
                    ChunkStatus::Error => "error",
                };
                let _ = write!(out, "[{},{},\"{status}\"]", c.offset, c.length);
            }
            out.push(']');
            Some(out)
        }
    }
}

/// `s` as a JSON string literal.
fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for ch in s.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The handle, as `nbd-client` implements it. Wrapped by `Handle` in index.ts.
#[napi]
pub struct NativeHandle {
    handle: Handle,
    completions: Arc<Completions>,
    /// Set (on the JavaScript thread) by `close()`: reads that complete later leave their
    /// buffers alone.
    closed: Arc<AtomicBool>,
}

/// A handle that is garbage-collected (or whose worker ends) without `close()` still lets go
/// of its socket, also while a connect is still waiting for the server.
impl Drop for NativeHandle {
    fn drop(&mut self) {
        self.closed.store(true, Ordering::SeqCst);
        self.handle.close_in_background();
    }
}

fn error_text(e: &nbd_client::Error) -> String {
    format!("[{}:{}] {}", e.errno().name(), e.errno().number(), e.message())
}

macro_rules! spawn {
    ($env:expr, $fut:expr) => {
        $env.spawn_future(async move { $fut.await.map_err(to_js) })
    };
}

#[napi]
impl NativeHandle {
    /// `on_complete(id, error, data)` is called once for every command started with an id.
    #[napi(constructor)]
    pub fn new(
        #[napi(
            ts_arg_type = "(id: number, error: string | null, data: Buffer | null, detail: string | null) => void"
        )]
        on_complete: Function<DoneArgs, ()>,
    ) -> Result<Self> {
        let completions = on_complete
            .build_threadsafe_function::<Done>()
            .callee_handled::<false>()
            .weak::<true>()
            .build_callback(|ctx| {
                let (id, outcome, target) = ctx.value;
                Ok(FnArgs::from(match (outcome, target) {
                    (Ok((data, _)), Some(target)) => {
                        let data = data.unwrap_or_default();
                        match target.deliver(&ctx.env, &data) {
                            Ok(()) => (id, None, None, None),
                            Err(message) => (id, Some(message), None, None),
                        }
                    }
                    (Ok((data, detail)), None) => (id, None, data.map(Buffer::from), detail),
                    (Err(message), _) => (id, Some(message), None, None),
                }))
            })?;
        Ok(NativeHandle {
            handle: Handle::default(),
            completions: Arc::new(completions),
            closed: Arc::default(),
        })
    }

    /// The callback that reports command `id` through the completion channel (with the
    /// buffer a `preadInto` copies its data to).
    fn done(
        &self,
        id: u32,
        target: Option<ReadTarget>,
    ) -> impl FnOnce(nbd_client::Result<Reply>) + Send + 'static {
        let completions = self.completions.clone();
        move |outcome| {
            let outcome = outcome
                .map(|r| {
                    let detail = detail_json(&r.detail);
                    (r.data, detail)
                })
                .map_err(|e| error_text(&e));
            completions.call((id, outcome, target), ThreadsafeFunctionCallMode::NonBlocking);
        }
    }

    // ---- settings ----

    #[napi]
    pub fn set_export_name(&self, name: String) -> Result<()> {
        self.handle.set_export_name(&name).map_err(to_js)
    }

    #[napi]
    pub fn get_export_name(&self) -> String {
        self.handle.config().export_name
    }

    #[napi]
    pub fn set_handle_name(&self, name: String) {
        self.handle.set_handle_name(&name)
    }

    #[napi]
    pub fn get_handle_name(&self) -> String {
        self.handle.config().handle_name
    }

    #[napi]
    pub fn set_strict_mode(&self, flags: u32) -> Result<()> {
        self.handle.set_strict_mode(flags).map_err(to_js)
    }

    #[napi]
    pub fn get_strict_mode(&self) -> u32 {
        self.handle.config().strict
    }

    #[napi]
    pub fn set_pread_initialize(&self, on: bool) {
        self.handle.set_pread_initialize(on)
    }

    #[napi]
    pub fn get_pread_initialize(&self) -> bool {
        self.handle.config().pread_initialize
    }

    #[napi]
    pub fn set_request_structured_replies(&self, on: bool) -> Result<()> {
        self.handle
            .configure(|c| c.request_structured_replies = on)
            .map_err(to_js)
    }

    #[napi]
    pub fn get_request_structured_replies(&self) -> bool {
        self.handle.config().request_structured_replies
    }

    #[napi]
    pub fn set_request_block_size(&self, on: bool) -> Result<()> {
        self.handle
            .negotiation_setting(|c| c.request_block_size = on)
            .map_err(to_js)
    }

    #[napi]
    pub fn get_request_block_size(&self) -> bool {
        self.handle.config().request_block_size
    }

    #[napi]
    pub fn set_full_info(&self, on: bool) -> Result<()> {
        self.handle.negotiation_setting(|c| c.full_info = on).map_err(to_js)
    }

    #[napi]
    pub fn get_full_info(&self) -> bool {
        self.handle.config().full_info
    }

    #[napi]
    pub fn set_request_extended_headers(&self, on: bool) -> Result<()> {
        self.handle
            .configure(|c| c.request_extended_headers = on)
            .map_err(to_js)
    }

    #[napi]
    pub fn get_request_extended_headers(&self) -> bool {
        self.handle.config().request_extended_headers
    }

    #[napi]
    pub fn set_request_meta_context(&self, on: bool) -> Result<()> {
        self.handle
            .negotiation_setting(|c| c.request_meta_context = on)
            .map_err(to_js)
    }

    #[napi]
    pub fn get_request_meta_context(&self) -> bool {
        self.handle.config().request_meta_context
    }

    #[napi]
    pub fn set_opt_mode(&self, on: bool) -> Result<()> {
        self.handle.configure(|c| c.opt_mode = on).map_err(to_js)
    }

    #[napi]
    pub fn get_opt_mode(&self) -> bool {
        self.handle.config().opt_mode
    }

    #[napi]
    pub fn add_meta_context(&self, name: String) -> Result<()> {
        self.handle.add_meta_context(&name).map_err(to_js)
    }

    #[napi]
    pub fn clear_meta_contexts(&self) -> Result<()> {
        self.handle.clear_meta_contexts().map_err(to_js)
    }

    /// The meta contexts that will be (or were) asked for.
    #[napi]
    pub fn get_meta_contexts(&self) -> Vec<String> {
        self.handle.config().meta_contexts
    }

    /// Debug messages on or off; `callback`, when given, receives them from now on (else the
    /// callback given earlier, else stderr).
    #[napi]
    pub fn set_debug(
        &self,
        on: bool,
        #[napi(ts_arg_type = "((context: string, message: string) => void) | null | undefined")]
        callback: Option<Function<FnArgs<(String, String)>, ()>>,
    ) -> Result<()> {
        let sink: Option<nbd_client::DebugSink> = match callback {
            None => None,
            Some(f) => {
                let tsfn: DebugCallback = f
                    .build_threadsafe_function::<(String, String)>()
                    .callee_handled::<false>()
                    .weak::<true>()
                    .build_callback(|ctx| Ok(FnArgs::from(ctx.value)))?;
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
    }

    #[napi]
    pub fn get_debug(&self) -> bool {
        self.handle.config().debug
    }

    /// `disable`, `allow` or `require`.
    #[napi]
    pub fn set_tls(&self, mode: String) -> Result<()> {
        let mode = tls_mode(&mode)?;
        self.handle.configure(|c| c.tls = mode).map_err(to_js)
    }

    #[napi]
    pub fn get_tls(&self) -> &'static str {
        self.handle.config().tls.name()
    }

    #[napi]
    pub fn set_tls_certificates(&self, dir: String) -> Result<()> {
        self.handle.configure(|c| c.tls_certificates = Some(dir)).map_err(to_js)
    }

    #[napi]
    pub fn set_tls_verify_peer(&self, on: bool) -> Result<()> {
        self.handle.configure(|c| c.tls_verify_peer = on).map_err(to_js)
    }

    #[napi]
    pub fn get_tls_verify_peer(&self) -> bool {
        self.handle.config().tls_verify_peer
    }

    #[napi]
    pub fn set_tls_username(&self, name: String) -> Result<()> {
        self.handle.configure(|c| c.tls_username = Some(name)).map_err(to_js)
    }

    /// The name set, else the login name.
    #[napi]
    pub fn get_tls_username(&self) -> Result<String> {
        self.handle.tls_username().map_err(to_js)
    }

    #[napi]
    pub fn set_tls_psk_file(&self, path: String) -> Result<()> {
        self.handle.configure(|c| c.tls_psk_file = Some(path)).map_err(to_js)
    }

    #[napi]
    pub fn set_tls_hostname(&self, host: String) -> Result<()> {
        self.handle.configure(|c| c.tls_hostname = Some(host)).map_err(to_js)
    }

    /// The name set, else the TCP host connected to.
    #[napi]
    pub fn get_tls_hostname(&self) -> Option<String> {
        self.handle.tls_hostname()
    }

    /// Bits: 1 TCP, 2 Unix, 4 vsock.
    #[napi]
    pub fn set_uri_allow_transports(&self, mask: u32) -> Result<()> {
        if mask & !nbd_client::uri::ALLOW_TRANSPORT_MASK != 0 {
            return Err(invalid(format!("uriAllowTransports {mask:#x} has unknown bits")));
        }
        self.handle.configure(|c| c.uri_policy.allow_transports = mask).map_err(to_js)
    }

    #[napi]
    pub fn get_uri_allow_transports(&self) -> u32 {
        self.handle.config().uri_policy.allow_transports
    }

    #[napi]
    pub fn set_uri_allow_tls(&self, mode: String) -> Result<()> {
        let mode = tls_mode(&mode)?;
        self.handle.configure(|c| c.uri_policy.allow_tls = mode).map_err(to_js)
    }

    #[napi]
    pub fn get_uri_allow_tls(&self) -> &'static str {
        self.handle.config().uri_policy.allow_tls.name()
    }

    #[napi]
    pub fn set_uri_allow_local_file(&self, on: bool) -> Result<()> {
        self.handle.configure(|c| c.uri_policy.allow_local_file = on).map_err(to_js)
    }

    #[napi]
    pub fn get_uri_allow_local_file(&self) -> bool {
        self.handle.config().uri_policy.allow_local_file
    }

    #[napi]
    pub fn set_handshake_flags(&self, flags: u32) -> Result<()> {
        if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
            return Err(invalid(format!("handshake flags {flags:#x} include unknown bits")));
        }
        self.handle.configure(|c| c.handshake_flags = flags).map_err(to_js)
    }

    #[napi]
    pub fn get_handshake_flags(&self) -> u32 {
        self.handle.config().handshake_flags
    }

    /// Milliseconds for the whole connect and handshake; 0 means no limit.
    #[napi]
    pub fn set_connect_timeout(&self, ms: f64) -> Result<()> {
        if !(ms >= 0.0 && ms.is_finite()) {
            return Err(invalid(format!("connectTimeout {ms} is not a non-negative number")));
        }
        let limit = match ms {
            0.0 => None,
            _ => Some(Duration::try_from_secs_f64(ms / 1000.0).map_err(|_| {
                to_js(nbd_client::Error::usage(
                    Errno::ERANGE,
                    format!("connectTimeout {ms} ms is too large"),
                ))
            })?),
        };
        self.handle.configure(|c| c.connect_timeout = limit).map_err(to_js)
    }

    #[napi]
    pub fn set_max_in_flight(&self, n: u32) -> Result<()> {
        if n == 0 {
            return Err(invalid("maxInFlight must be at least 1"));
        }
        self.handle.configure(|c| c.max_in_flight = n as usize).map_err(to_js)
    }

    #[napi]
    pub fn get_max_in_flight(&self) -> u32 {
        self.handle.config().max_in_flight as u32
    }

    // ---- state ----

    #[napi(getter)]
    pub fn state(&self) -> &'static str {
        self.handle.state().name()
    }

    #[napi(getter)]
    pub fn in_flight(&self) -> u32 {
        self.handle.in_flight() as u32
    }

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

    #[napi(ts_return_type = "Promise<void>")]
    pub fn connect_socket<'env>(&self, env: &'env Env, fd: i32) -> Result<PromiseRaw<'env, ()>> {
        let h = self.handle.clone();
        spawn!(env, h.connect_socket(fd))
    }

    #[napi(ts_return_type = "Promise<void>")]
    pub fn connect_unix<'env>(&self, env: &'env Env, path: String) -> Result<PromiseRaw<'env, ()>> {
        let h = self.handle.clone();
        spawn!(env, h.connect_unix(&path))
    }

    #[napi(ts_return_type = "Promise<void>")]
    pub fn connect_tcp<'env>(
        &self,
        env: &'env Env,
        host: String,
        port: String,
    ) -> Result<PromiseRaw<'env, ()>> {
        let h = self.handle.clone();
        spawn!(env, h.connect_tcp(&host, &port))
    }

    #[napi(ts_return_type = "Promise<void>")]
    pub fn connect_uri<'env>(&self, env: &'env Env, uri: String) -> Result<PromiseRaw<'env, ()>> {
        let h = self.handle.clone();
        spawn!(env, h.connect_uri(&uri))
    }

    #[napi(ts_return_type = "Promise<void>")]
    pub fn connect_command<'env>(&self, env: &'env Env, argv: Vec<String>) -> Result<PromiseRaw<'env, ()>> {
        let h = self.handle.clone();
        spawn!(env, h.connect_command(argv))
    }

    #[napi(ts_return_type = "Promise<void>")]
    pub fn connect_systemd_socket_activation<'env>(
        &self,
        env: &'env Env,
        argv: Vec<String>,
    ) -> Result<PromiseRaw<'env, ()>> {
        let h = self.handle.clone();
        spawn!(env, h.connect_systemd_socket_activation(argv))
    }

    /// The pid of the server process started by connectCommand or socket activation;
    /// `ESRCH` when there is none.
    #[napi]
    pub fn get_subprocess_pid(&self) -> Result<u32> {
        self.handle.subprocess_pid().map_err(to_js)
    }

    #[napi]
    pub fn set_socket_activation_name(&self, name: String) -> Result<()> {
        self.handle.set_socket_activation_name(&name).map_err(to_js)
    }

    #[napi]
    pub fn get_socket_activation_name(&self) -> String {
        self.handle.config().socket_activation_name
    }

    #[napi(ts_return_type = "Promise<void>")]
    pub fn connect_vsock<'env>(&self, env: &'env Env, cid: u32, port: u32) -> Result<PromiseRaw<'env, ()>> {
        let h = self.handle.clone();
        spawn!(env, h.connect_vsock(cid, port))
    }

    #[napi]
    pub fn get_uri(&self) -> Result<String> {
        self.handle.get_uri().map_err(to_js)
    }

    // ---- commands ----
    //
    // Each starts the command and returns at once; its outcome arrives through the
    // completion callback under `id`. Refusals (state, strict checks) throw here instead.

    #[napi]
    pub fn pread(
        &self,
        id: u32,
        count_: f64,
        offset_: Either<f64, BigInt>,
        flags: u32,
        cancel: Option<&NativeCancel>,
    ) -> Result<()> {
        let op = Op::Read { count: count(count_)?, offset: offset(offset_)?, flags };
        self.handle.submit(op, token(cancel), self.done(id, None)).map_err(to_js)
    }

    /// Reads `buf.length` bytes; they are copied into `buf` on completion (see
    /// [`ReadTarget`]). With `preadInitialize` on, `buf` is zeroed now, so a failed read
    /// leaves zeros rather than stale bytes.
    #[napi]
    pub fn pread_into(
        &self,
        id: u32,
        mut buf: Buffer,
        offset_: Either<f64, BigInt>,
        flags: u32,
        cancel: Option<&NativeCancel>,
    ) -> Result<()> {
        let op = Op::Read { count: buf.len() as u64, offset: offset(offset_)?, flags };
        let zero = self.handle.config().pread_initialize;
        let (ptr, len) = (buf.as_mut_ptr(), buf.len());
        let target = ReadTarget {
            buf,
            cancel: token(cancel),
            closed: self.closed.clone(),
        };
        self.handle
            .submit(op, token(cancel), self.done(id, Some(target)))
            .map_err(to_js)?;
        if zero && len > 0 {
            // SAFETY: still inside the call, on the JavaScript thread, so the buffer is
            // attached and `ptr` is its memory (the completion that copies into it runs on
            // this thread too, later).
            unsafe { std::ptr::write_bytes(ptr, 0, len) };
        }
        Ok(())
    }

    /// Writes a copy of `buf`, taken now (see [`ReadTarget`] for why).
    #[napi]
    pub fn pwrite(
        &self,
        id: u32,
        buf: BufferSlice,
        offset_: Either<f64, BigInt>,
        flags: u32,
        cancel: Option<&NativeCancel>,
    ) -> Result<()> {
        let src = Box::new(buf.to_vec());
        let op = Op::Write { src, offset: offset(offset_)?, flags };
        self.handle.submit(op, token(cancel), self.done(id, None)).map_err(to_js)
    }

    #[napi]
    pub fn pread_structured(
        &self,
        id: u32,
        count_: f64,
        offset_: Either<f64, BigInt>,
        flags: u32,
        cancel: Option<&NativeCancel>,
    ) -> Result<()> {
        let op = Op::ReadStructured { count: count(count_)?, offset: offset(offset_)?, flags };
        self.handle.submit(op, token(cancel), self.done(id, None)).map_err(to_js)
    }

    /// Block status for every negotiated context, or only `contexts`.
    #[napi]
    pub fn block_status(
        &self,
        id: u32,
        count_: f64,
        offset_: Either<f64, BigInt>,
        flags: u32,
        contexts: Option<Vec<String>>,
        cancel: Option<&NativeCancel>,
    ) -> Result<()> {
        let op = Op::BlockStatus {
            count: count(count_)?,
            offset: offset(offset_)?,
            flags,
            contexts,
        };
        self.handle.submit(op, token(cancel), self.done(id, None)).map_err(to_js)
    }

    /// Flush, trim, cache or zero (`kind`), by their libnbd names.
    #[napi]
    pub fn command(
        &self,
        id: u32,
        kind: String,
        count_: f64,
        offset_: Either<f64, BigInt>,
        flags: u32,
        cancel: Option<&NativeCancel>,
    ) -> Result<()> {
        let kind = match kind.as_str() {
            "flush" => CommandKind::Flush,
            "trim" => CommandKind::Trim,
            "cache" => CommandKind::Cache,
            "zero" => CommandKind::WriteZeroes,
            other => return Err(invalid(format!("unknown command {other:?}"))),
        };
        let op = Op::Other { kind, count: count(count_)?, offset: offset(offset_)?, flags };
        self.handle.submit(op, token(cancel), self.done(id, None)).map_err(to_js)
    }

    // ---- option negotiation ----

    #[napi(ts_return_type = "Promise<void>")]
    pub fn opt_go<'env>(&self, env: &'env Env) -> Result<PromiseRaw<'env, ()>> {
        let h = self.handle.clone();
        spawn!(env, h.opt_go())
    }

    #[napi(ts_return_type = "Promise<void>")]
    pub fn opt_abort<'env>(&self, env: &'env Env) -> Result<PromiseRaw<'env, ()>> {
        let h = self.handle.clone();
        spawn!(env, h.opt_abort())
    }

    #[napi(ts_return_type = "Promise<void>")]
    pub fn opt_info<'env>(&self, env: &'env Env) -> Result<PromiseRaw<'env, ()>> {
        let h = self.handle.clone();
        env.spawn_future(async move { h.opt_info().await.map(drop).map_err(to_js) })
    }

    /// The exports as `[name, description]` pairs.
    #[napi(ts_return_type = "Promise<Array<[string, string]>>")]
    pub fn opt_list<'env>(&self, env: &'env Env) -> Result<PromiseRaw<'env, Vec<Vec<String>>>> {
        let h = self.handle.clone();
        env.spawn_future(async move {
            let list = h.opt_list().await.map_err(to_js)?;
            Ok(list.into_iter().map(|e| vec![e.name, e.description]).collect())
        })
    }

    #[napi(ts_return_type = "Promise<string[]>")]
    pub fn opt_list_meta_context<'env>(
        &self,
        env: &'env Env,
        queries: Option<Vec<String>>,
    ) -> Result<PromiseRaw<'env, Vec<String>>> {
        let h = self.handle.clone();
        spawn!(env, h.opt_list_meta_context(queries))
    }

    #[napi(ts_return_type = "Promise<string[]>")]
    pub fn opt_set_meta_context<'env>(
        &self,
        env: &'env Env,
        queries: Option<Vec<String>>,
    ) -> Result<PromiseRaw<'env, Vec<String>>> {
        let h = self.handle.clone();
        spawn!(env, h.opt_set_meta_context(queries))
    }

    #[napi(ts_return_type = "Promise<boolean>")]
    pub fn opt_structured_reply<'env>(&self, env: &'env Env) -> Result<PromiseRaw<'env, bool>> {
        let h = self.handle.clone();
        spawn!(env, h.opt_structured_reply())
    }

    #[napi(ts_return_type = "Promise<boolean>")]
    pub fn opt_extended_headers<'env>(&self, env: &'env Env) -> Result<PromiseRaw<'env, bool>> {
        let h = self.handle.clone();
        spawn!(env, h.opt_extended_headers())
    }

    #[napi(ts_return_type = "Promise<boolean>")]
    pub fn opt_starttls<'env>(&self, env: &'env Env) -> Result<PromiseRaw<'env, bool>> {
        let h = self.handle.clone();
        spawn!(env, h.opt_starttls())
    }

    // ---- ending ----

    #[napi(ts_return_type = "Promise<void>")]
    pub fn shutdown<'env>(&self, env: &'env Env, abandon_pending: bool) -> Result<PromiseRaw<'env, ()>> {
        let h = self.handle.clone();
        spawn!(env, h.shutdown(abandon_pending))
    }

    #[napi(ts_return_type = "Promise<void>")]
    pub fn close<'env>(&self, env: &'env Env) -> Result<PromiseRaw<'env, ()>> {
        self.closed.store(true, Ordering::SeqCst);
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
        let n = self.handle.negotiated().map_err(to_js)?;
        Ok(BigInt::from(n.export.size))
    }

    /// `minimum`, `preferred`, `maximum` (0 when the server sent none) or `payload`.
    #[napi]
    pub fn get_block_size(&self, kind: String) -> Result<u32> {
        let n = self.handle.negotiated().map_err(to_js)?;
        let bs = n.export.block_size;
        match kind.as_str() {
            "minimum" => Ok(bs.map_or(0, |b| b.minimum)),
            "preferred" => Ok(bs.map_or(0, |b| b.preferred)),
            "maximum" => Ok(bs.map_or(0, |b| b.maximum)),
            "payload" => Ok(n.export.payload_max()),
            other => Err(invalid(format!(
                "block size kind {other:?} is not one of minimum, preferred, maximum, payload"
            ))),
        }
    }

    /// Whether the server set transmission flag `flag` (one of the `FLAG_*` values).
    fn flag(&self, flag: u16) -> Result<bool> {
        let n = self.handle.negotiated().map_err(to_js)?;
        Ok(n.export.has(flag))
    }

    #[napi]
    pub fn is_read_only(&self) -> Result<bool> {
        self.flag(FLAG_READ_ONLY)
    }

    #[napi]
    pub fn is_rotational(&self) -> Result<bool> {
        self.flag(FLAG_ROTATIONAL)
    }

    #[napi]
    pub fn can_flush(&self) -> Result<bool> {
        self.flag(FLAG_SEND_FLUSH)
    }

    #[napi]
    pub fn can_fua(&self) -> Result<bool> {
        self.flag(FLAG_SEND_FUA)
    }

    #[napi]
    pub fn can_trim(&self) -> Result<bool> {
        self.flag(FLAG_SEND_TRIM)
    }

    #[napi]
    pub fn can_zero(&self) -> Result<bool> {
        self.flag(FLAG_SEND_WRITE_ZEROES)
    }

    #[napi]
    pub fn can_fast_zero(&self) -> Result<bool> {
        self.flag(FLAG_SEND_FAST_ZERO)
    }

    /// DF needs structured replies as well as the server's flag (as libnbd).
    #[napi]
    pub fn can_df(&self) -> Result<bool> {
        let n = self.handle.negotiated().map_err(to_js)?;
        Ok(n.structured_replies && n.export.has(FLAG_SEND_DF))
    }

    #[napi]
    pub fn can_multi_conn(&self) -> Result<bool> {
        self.flag(FLAG_CAN_MULTI_CONN)
    }

    #[napi]
    pub fn can_cache(&self) -> Result<bool> {
        self.flag(FLAG_SEND_CACHE)
    }

    #[napi]
    pub fn get_protocol(&self) -> Result<&'static str> {
        Ok(self.handle.negotiated_so_far().map_err(to_js)?.protocol.name())
    }

    #[napi]
    pub fn get_structured_replies_negotiated(&self) -> Result<bool> {
        Ok(self.handle.negotiated_so_far().map_err(to_js)?.structured_replies)
    }

    #[napi]
    pub fn get_extended_headers_negotiated(&self) -> Result<bool> {
        Ok(self.handle.negotiated_so_far().map_err(to_js)?.extended_headers)
    }

    #[napi]
    pub fn get_tls_negotiated(&self) -> Result<bool> {
        Ok(self.handle.negotiated_so_far().map_err(to_js)?.tls)
    }

    /// Whether meta context `name` was negotiated (`EINVAL` when contexts were asked for
    /// and the server has not answered for this export).
    #[napi]
    pub fn can_meta_context(&self, name: String) -> Result<bool> {
        self.handle.can_meta_context(&name).map_err(to_js)
    }

    /// Filtered block status needs extended headers and the server's flag.
    #[napi]
    pub fn can_block_status_payload(&self) -> Result<bool> {
        let n = self.handle.negotiated().map_err(to_js)?;
        Ok(n.extended_headers && n.export.has(FLAG_BLOCK_STAT_PAYLOAD))
    }

    #[napi]
    pub fn get_canonical_export_name(&self) -> Result<String> {
        let n = self.handle.negotiated().map_err(to_js)?;
        n.export.canonical_name.ok_or_else(|| {
            to_js(nbd_client::Error::server(
                nbd_client::Errno::ENOTSUP,
                "server did not advertise a canonical name (setFullInfo(true) asks for it)",
            ))
        })
    }

    #[napi]
    pub fn get_export_description(&self) -> Result<String> {
        let n = self.handle.negotiated().map_err(to_js)?;
        n.export.description.ok_or_else(|| {
            to_js(nbd_client::Error::server(
                nbd_client::Errno::ENOTSUP,
                "server did not advertise a description (setFullInfo(true) asks for it)",
            ))
        })
    }
}

