//! Settling command promises on the JavaScript thread: results built as JavaScript values
//! (buffers, extents, chunks) and errors made by the `NbdError` factory that `errors.ts`
//! hands to every handle, also for the errors of synchronous calls and of the calls that
//! run on tokio ([`spawn`]). Raw Node-API calls: this is the hot path of every command.

use std::ffi::c_void;
use std::ptr;

use napi::sys;

use nbd_client::{ChunkStatus, Detail, Error, ReadChunk};

pub(crate) type Env = sys::napi_env;
pub(crate) type Value = sys::napi_value;

/// A strong reference to a JavaScript value, deleted when dropped (on the JavaScript
/// thread; see [`Ref::leak`] for the other case).
pub(crate) struct Ref {
    env: Env,
    raw: sys::napi_ref,
}

impl Ref {
    /// A reference to `value`, or `None` when Node-API refuses.
    pub(crate) fn new(env: Env, value: Value) -> Option<Ref> {
        let mut raw = ptr::null_mut();
        // SAFETY: called on the JavaScript thread of `env` with a live value.
        let status = unsafe { sys::napi_create_reference(env, value, 1, &mut raw) };
        (status == sys::Status::napi_ok).then_some(Ref { env, raw })
    }

    pub(crate) fn value(&self) -> Value {
        let mut v = ptr::null_mut();
        // SAFETY: a live reference, on its thread.
        unsafe { sys::napi_get_reference_value(self.env, self.raw, &mut v) };
        v
    }

    /// Forgets the reference without deleting it (when its environment is going away).
    pub(crate) fn leak(self) {
        std::mem::forget(self)
    }
}

impl Drop for Ref {
    fn drop(&mut self) {
        // SAFETY: deleted once, on the JavaScript thread that made it.
        unsafe { sys::napi_delete_reference(self.env, self.raw) };
    }
}

/// The bytes of an ArrayBuffer view right now: `(data, length)`; `None` when it is not a
/// view. A detached buffer reports length 0.
pub(crate) fn view_bytes(env: Env, value: Value) -> Option<(*mut u8, usize)> {
    let mut data: *mut c_void = ptr::null_mut();
    let mut len = 0usize;
    // SAFETY: on the JavaScript thread; Node-API checks the value's kind.
    let status = unsafe { sys::napi_get_buffer_info(env, value, &mut data, &mut len) };
    (status == sys::Status::napi_ok).then_some((data.cast(), len))
}

/// A caller's buffer that a command reads into or writes from, checked again before every
/// use: JavaScript may detach or resize its ArrayBuffer between two wake-ups.
pub(crate) struct CallerBuf {
    pub(crate) obj: Ref,
    pub(crate) ptr: *mut u8,
    pub(crate) len: usize,
}

impl CallerBuf {
    pub(crate) fn new(env: Env, value: Value) -> Option<CallerBuf> {
        let (ptr, len) = view_bytes(env, value)?;
        Some(CallerBuf {
            obj: Ref::new(env, value)?,
            ptr,
            len,
        })
    }

    /// The memory if it is still where it was, as long as it was.
    pub(crate) fn check(&self) -> Option<(*mut u8, usize)> {
        match view_bytes(self.obj.env, self.obj.value()) {
            Some((p, l)) if p == self.ptr && l == self.len => Some((p, l)),
            _ => None,
        }
    }
}

pub(crate) fn undefined(env: Env) -> Value {
    let mut v = ptr::null_mut();
    // SAFETY: on the JavaScript thread.
    unsafe { sys::napi_get_undefined(env, &mut v) };
    v
}

pub(crate) fn string(env: Env, s: &str) -> Value {
    let mut v = ptr::null_mut();
    // SAFETY: on the JavaScript thread; the bytes are valid UTF-8 of the given length.
    unsafe { sys::napi_create_string_utf8(env, s.as_ptr().cast(), s.len() as isize, &mut v) };
    v
}

/// A non-negative integer: a number when it is safe, else a bigint (exact either way).
pub(crate) fn integer(env: Env, n: u64) -> Value {
    let mut v = ptr::null_mut();
    // SAFETY: on the JavaScript thread.
    unsafe {
        if n < (1u64 << 53) {
            sys::napi_create_double(env, n as f64, &mut v);
        } else {
            sys::napi_create_bigint_uint64(env, n, &mut v);
        }
    }
    v
}

fn set(env: Env, obj: Value, name: &std::ffi::CStr, value: Value) {
    // SAFETY: on the JavaScript thread, `obj` an object.
    unsafe { sys::napi_set_named_property(env, obj, name.as_ptr(), value) };
}

fn object(env: Env) -> Value {
    let mut v = ptr::null_mut();
    // SAFETY: on the JavaScript thread.
    unsafe { sys::napi_create_object(env, &mut v) };
    v
}

fn array(env: Env, items: impl ExactSizeIterator<Item = Value>) -> Value {
    let mut a = ptr::null_mut();
    // SAFETY: on the JavaScript thread.
    unsafe {
        sys::napi_create_array_with_length(env, items.len(), &mut a);
        for (i, item) in items.enumerate() {
            sys::napi_set_element(env, a, i as u32, item);
        }
    }
    a
}

/// Block status extents as `{ [context]: [{ offset, length, flags }] }`.
pub(crate) fn extents(env: Env, detail: &Detail) -> Value {
    let out = object(env);
    if let Detail::Extents(contexts) = detail {
        for c in contexts {
            let list = array(
                env,
                c.extents.iter().map(|e| {
                    let o = object(env);
                    set(env, o, c"offset", integer(env, e.offset));
                    set(env, o, c"length", integer(env, e.length));
                    set(env, o, c"flags", integer(env, e.flags));
                    o
                }),
            );
            // SAFETY: on the JavaScript thread.
            unsafe { sys::napi_set_property(env, out, string(env, &c.name), list) };
        }
    }
    out
}

/// A structured read's result: `{ data, chunks }`, the chunks as the core recorded them
/// (a simple reply's data is one data chunk).
pub(crate) fn structured(env: Env, data: Value, detail: &Detail) -> Value {
    let out = object(env);
    set(env, out, c"data", data);
    let chunks: &[ReadChunk] = match detail {
        Detail::Chunks(chunks) => chunks,
        _ => &[],
    };
    let list = array(
        env,
        chunks.iter().map(|c| {
            let status = match c.status {
                ChunkStatus::Data => "data",
                ChunkStatus::Hole => "hole",
                ChunkStatus::Error => "error",
            };
            let o = object(env);
            set(env, o, c"offset", integer(env, c.offset));
            set(env, o, c"length", integer(env, c.length));
            set(env, o, c"status", string(env, status));
            o
        }),
    );
    set(env, out, c"chunks", list);
    out
}

/// errors.ts's `NbdError` factory, `(code, errno, operation, message) => NbdError`: one
/// reference per environment, never deleted (it lives as long as the environment, and a
/// reference deleted while an environment is torn down would be a use after free).
#[derive(Clone, Copy)]
pub struct ErrorFactory {
    env: Env,
    raw: sys::napi_ref,
}

impl ErrorFactory {
    pub(crate) fn new(env: Env, f: Value) -> Option<ErrorFactory> {
        thread_local! {
            static CACHED: std::cell::Cell<Option<ErrorFactory>> = const { std::cell::Cell::new(None) };
        }
        if let Some(cached) = CACHED.get() {
            if cached.env == env {
                return Some(cached);
            }
        }
        let mut raw = ptr::null_mut();
        // SAFETY: on the JavaScript thread of `env`.
        let status = unsafe { sys::napi_create_reference(env, f, 1, &mut raw) };
        if status != sys::Status::napi_ok {
            return None;
        }
        let factory = ErrorFactory { env, raw };
        CACHED.set(Some(factory));
        Some(factory)
    }

    fn value(&self) -> Value {
        let mut v = ptr::null_mut();
        // SAFETY: a live reference, on its thread.
        unsafe { sys::napi_get_reference_value(self.env, self.raw, &mut v) };
        v
    }
}

/// An `NbdError` for `e`, made by the factory.
pub(crate) fn error(env: Env, make_error: &ErrorFactory, operation: &str, e: &Error) -> Value {
    let args = [
        string(env, e.errno().name()),
        integer(env, e.errno().number() as u64),
        string(env, operation),
        string(env, e.message()),
    ];
    let mut result = ptr::null_mut();
    // SAFETY: on the JavaScript thread; the factory is a function (errors.ts's).
    let status = unsafe {
        sys::napi_call_function(env, undefined(env), make_error.value(), args.len(), args.as_ptr(), &mut result)
    };
    if status != sys::Status::napi_ok || result.is_null() {
        // The factory threw (it does not): reject with the message rather than nothing.
        let mut pending = ptr::null_mut();
        unsafe { sys::napi_get_and_clear_last_exception(env, &mut pending) };
        return string(env, &format!("{operation}: {}", e.message()));
    }
    result
}

/// The factory as the argument of a constructor (`NativeHandle`, `NativeCopy`).
impl napi::bindgen_prelude::FromNapiValue for ErrorFactory {
    unsafe fn from_napi_value(env: Env, value: Value) -> napi::Result<Self> {
        ErrorFactory::new(env, value).ok_or_else(|| napi::Error::from_reason("cannot keep the error factory"))
    }
}

impl napi::bindgen_prelude::TypeName for ErrorFactory {
    fn type_name() -> &'static str {
        "Function"
    }

    fn value_type() -> napi::ValueType {
        napi::ValueType::Function
    }
}

impl ErrorFactory {
    /// `e` as `operation`'s `NbdError`, for napi-rs to throw from a synchronous call or to
    /// reject a promise with: the object itself crosses (napi-rs keeps a reference to it),
    /// on the JavaScript thread.
    pub(crate) fn throwable(&self, operation: &str, e: &Error) -> napi::Error {
        let value = error(self.env, self, operation, e);
        // SAFETY: a live value of this environment, on its thread.
        napi::Error::from(unsafe { napi::Unknown::from_raw_unchecked(self.env, value) })
    }
}

/// Runs `work` on napi's tokio runtime and returns its promise: resolved with the value,
/// or rejected with `operation`'s `NbdError`, made on the JavaScript thread.
pub(crate) fn spawn<'env, T: napi::bindgen_prelude::ToNapiValue + Send + 'static>(
    env: &'env napi::Env,
    make_error: ErrorFactory,
    operation: &'static str,
    work: impl std::future::Future<Output = nbd_client::Result<T>> + Send + 'static,
) -> napi::Result<napi::bindgen_prelude::PromiseRaw<'env, T>> {
    env.spawn_future_with_callback(async move { Ok(work.await) }, move |_, result| {
        result.map_err(|e| make_error.throwable(operation, &e))
    })
}

/// A new promise and its resolver.
pub(crate) fn promise(env: Env) -> (sys::napi_deferred, Value) {
    let mut deferred = ptr::null_mut();
    let mut promise = ptr::null_mut();
    // SAFETY: on the JavaScript thread.
    unsafe { sys::napi_create_promise(env, &mut deferred, &mut promise) };
    (deferred, promise)
}

pub(crate) fn resolve(env: Env, deferred: sys::napi_deferred, value: Value) {
    // SAFETY: each deferred is settled once, on its thread.
    unsafe { sys::napi_resolve_deferred(env, deferred, value) };
}

pub(crate) fn reject(env: Env, deferred: sys::napi_deferred, value: Value) {
    // SAFETY: each deferred is settled once, on its thread.
    unsafe { sys::napi_reject_deferred(env, deferred, value) };
}

/// A promise already rejected with `e`.
pub(crate) fn rejected(env: Env, make_error: &ErrorFactory, operation: &str, e: &Error) -> Value {
    let (deferred, p) = promise(env);
    reject(env, deferred, error(env, make_error, operation, e));
    p
}

/// A new Buffer of `len` bytes (zero-filled by Node) and its memory.
pub(crate) fn new_buffer(env: Env, len: usize) -> Option<(Value, *mut u8)> {
    let mut data: *mut c_void = ptr::null_mut();
    let mut v = ptr::null_mut();
    // SAFETY: on the JavaScript thread.
    let status = unsafe { sys::napi_create_buffer(env, len, &mut data, &mut v) };
    (status == sys::Status::napi_ok).then_some((v, data.cast()))
}

/// Reads this large that the binding makes the Buffer for (`preadStructured`; a `pread`
/// gets its Buffer from handle.ts) get memory recycled through [`READ_POOL`] instead of a
/// Buffer zeroed by Node: a fresh allocation this size can be a new mapping, faulted in and
/// zeroed page by page.
pub(crate) const POOLED_READ_MIN: usize = 64 * 1024;
/// The most memory the pool keeps for reuse.
const POOL_MAX_BYTES: usize = 64 * 1024 * 1024;

/// Memory of read Buffers that JavaScript has let go of, by size, ready for the next read
/// of that size. Shared by every thread (a Buffer may be finalized on any).
static READ_POOL: std::sync::Mutex<Vec<Box<[u8]>>> = std::sync::Mutex::new(Vec::new());

fn pool_take(len: usize) -> Box<[u8]> {
    let mut pool = READ_POOL.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(i) = pool.iter().rposition(|b| b.len() == len) {
        return pool.swap_remove(i);
    }
    drop(pool);
    vec![0u8; len].into_boxed_slice()
}

fn pool_give(memory: Box<[u8]>) {
    let mut pool = READ_POOL.lock().unwrap_or_else(|p| p.into_inner());
    let held: usize = pool.iter().map(|b| b.len()).sum();
    if held + memory.len() <= POOL_MAX_BYTES {
        pool.push(memory);
    }
}

/// A Buffer of `len` bytes for a read to fill, and its memory: from the pool for large reads
/// (its old bytes are never seen: a read that succeeds has written every byte, and one that
/// fails never hands its Buffer out), else a new Buffer.
pub(crate) fn read_buffer(env: Env, len: usize) -> Option<(Value, *mut u8)> {
    unsafe extern "C" fn give_back(_env: Env, _data: *mut c_void, hint: *mut c_void) {
        // SAFETY: the box leaked in `read_buffer`, handed back once by Node.
        let memory = unsafe { Box::from_raw(hint.cast::<Box<[u8]>>()) };
        pool_give(*memory);
    }
    if len < POOLED_READ_MIN {
        return new_buffer(env, len);
    }
    let mut memory = Box::new(pool_take(len));
    let data = memory.as_mut_ptr();
    let hint = Box::into_raw(memory);
    let mut v = ptr::null_mut();
    // SAFETY: the memory lives in `hint` until `give_back`.
    let status = unsafe {
        sys::napi_create_external_buffer(env, len, data.cast(), Some(give_back), hint.cast(), &mut v)
    };
    if status == sys::Status::napi_ok {
        return Some((v, data));
    }
    // No external buffers here (Electron's memory cage): a plain one.
    pool_give(*unsafe { Box::from_raw(hint) });
    new_buffer(env, len)
}

/// A Buffer over `bytes` without copying them where the runtime allows it (Electron's
/// sandbox does not: then a copy).
pub(crate) fn buffer_from_vec(env: Env, bytes: Vec<u8>) -> Value {
    unsafe extern "C" fn free_vec(_env: Env, _data: *mut c_void, hint: *mut c_void) {
        // SAFETY: `hint` is the box made below, freed once by Node.
        drop(unsafe { Box::from_raw(hint.cast::<Vec<u8>>()) });
    }
    if bytes.is_empty() {
        return new_buffer(env, 0).map_or_else(|| undefined(env), |(v, _)| v);
    }
    let mut boxed = Box::new(bytes);
    let (data, len) = (boxed.as_mut_ptr(), boxed.len());
    let hint = Box::into_raw(boxed);
    let mut v = ptr::null_mut();
    // SAFETY: the memory lives in `hint` until the finalizer frees it.
    let status = unsafe {
        sys::napi_create_external_buffer(env, len, data.cast(), Some(free_vec), hint.cast(), &mut v)
    };
    if status == sys::Status::napi_ok {
        return v;
    }
    // SAFETY: not handed over: ours to take back.
    let bytes = unsafe { Box::from_raw(hint) };
    let mut copy: *mut c_void = ptr::null_mut();
    unsafe { sys::napi_create_buffer_copy(env, bytes.len(), bytes.as_ptr().cast(), &mut copy, &mut v) };
    v
}
