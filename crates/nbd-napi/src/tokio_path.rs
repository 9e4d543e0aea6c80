//! Commands of handles whose connection the tokio driver runs (TLS): their promises are
//! made here and settled on the JavaScript thread through one threadsafe function per
//! handle, which keeps the process alive only while such commands are pending.

use std::cell::Cell;
use std::ffi::c_void;
use std::ptr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use napi::sys;

use nbd_client::{CancelToken, Errno, Error, Reply};

use crate::event_loop::Outcome;
use crate::settle::{self, CallerBuf, Env, ErrorFactory, Value};

/// The threadsafe function's context: JavaScript-thread state.
struct Context {
    /// Set when Node destroyed the threadsafe function (its environment is going away):
    /// it must not be released any more.
    gone: AtomicBool,
    pending: Cell<usize>,
    tsfn: Cell<sys::napi_threadsafe_function>,
    make_error: ErrorFactory,
}

/// A handle's way back to the JavaScript thread; released when the last holder drops it.
pub(crate) struct Completer {
    tsfn: sys::napi_threadsafe_function,
    /// Shared with the threadsafe function, which holds one count until `finalize`.
    context: Arc<Context>,
}

// SAFETY: a threadsafe function may be called and released from any thread; the context's
// cells are only touched on the JavaScript thread (in `call_js` and `begin`).
unsafe impl Send for Context {}
unsafe impl Sync for Context {}
unsafe impl Send for Completer {}
unsafe impl Sync for Completer {}

impl Drop for Completer {
    fn drop(&mut self) {
        if self.context.gone.load(Ordering::SeqCst) {
            return;
        }
        // SAFETY: released once; Node frees it (and calls `finalize`) when its queue is empty.
        unsafe { sys::napi_release_threadsafe_function(self.tsfn, sys::ThreadsafeFunctionReleaseMode::release) };
    }
}

/// A finished command on its way to the JavaScript thread.
struct Done {
    carry: Carry,
    result: nbd_client::Result<Reply>,
}

/// What a command takes along to its completion.
struct Carry {
    deferred: usize,
    operation: &'static str,
    outcome: Outcome,
    target: Option<CallerBuf>,
    cancel: Option<CancelToken>,
    /// Set when the handle is closed: a read finishing after that writes nothing.
    closed: Arc<AtomicBool>,
}

// SAFETY: the deferred and the caller buffer's reference are only used on the JavaScript
// thread (in `call_js`); elsewhere they are carried, never touched.
unsafe impl Send for Carry {}

impl Completer {
    pub(crate) fn new(env: Env, make_error: ErrorFactory) -> Option<Arc<Completer>> {
        let shared = Arc::new(Context {
            gone: AtomicBool::new(false),
            pending: Cell::new(0),
            tsfn: Cell::new(ptr::null_mut()),
            make_error,
        });
        let context = Arc::into_raw(shared.clone()) as *mut Context;
        let mut tsfn = ptr::null_mut();
        // SAFETY: on the JavaScript thread; no JavaScript function: `call_js` settles.
        let status = unsafe {
            sys::napi_create_threadsafe_function(
                env,
                ptr::null_mut(),
                ptr::null_mut(),
                settle::string(env, "nbd-client tls completions"),
                0,
                1,
                context.cast(),
                Some(finalize),
                context.cast(),
                Some(call_js),
                &mut tsfn,
            )
        };
        if status != sys::Status::napi_ok {
            drop(unsafe { Arc::from_raw(context) });
            return None;
        }
        shared.tsfn.set(tsfn);
        unsafe { sys::napi_unref_threadsafe_function(env, tsfn) };
        Some(Arc::new(Completer { tsfn, context: shared }))
    }

    /// Starts tracking a command (on the JavaScript thread): its promise, and the callback
    /// the driver calls once with its outcome.
    pub(crate) fn begin(
        self: &Arc<Self>,
        env: Env,
        operation: &'static str,
        outcome: Outcome,
        target: Option<CallerBuf>,
        cancel: Option<CancelToken>,
        closed: Arc<AtomicBool>,
    ) -> (Value, impl FnOnce(nbd_client::Result<Reply>) + Send + 'static, impl FnOnce(Error) -> Value) {
        let (deferred, promise) = settle::promise(env);
        let context = &*self.context;
        let completer = self.clone();
        let carry = Carry {
            deferred: deferred as usize,
            operation,
            outcome,
            target,
            cancel,
            closed,
        };
        let done = move |result: nbd_client::Result<Reply>| {
            if completer.context.gone.load(Ordering::SeqCst) {
                // The environment is gone: nothing is left to settle.
                std::mem::forget(carry);
                return;
            }
            let done = Box::new(Done { carry, result });
            // SAFETY: any thread may call it; `call_js` owns the box from here.
            unsafe {
                sys::napi_call_threadsafe_function(
                    completer.tsfn,
                    Box::into_raw(done).cast(),
                    sys::ThreadsafeFunctionCallMode::nonblocking,
                )
            };
        };
        if context.pending.get() == 0 {
            unsafe { sys::napi_ref_threadsafe_function(env, self.tsfn) };
        }
        context.pending.set(context.pending.get() + 1);
        let tsfn = self.tsfn;
        let make_error = context.make_error;
        let keep = self.context.clone();
        // Used instead of `done` when the command is refused before it is queued.
        let refused = move |e: Error| {
            let pending = &keep.pending;
            pending.set(pending.get() - 1);
            if pending.get() == 0 {
                unsafe { sys::napi_unref_threadsafe_function(env, tsfn) };
            }
            settle::reject(env, deferred, settle::error(env, &make_error, operation, &e));
            promise
        };
        (promise, done, refused)
    }
}

unsafe extern "C" fn finalize(_env: Env, data: *mut c_void, _hint: *mut c_void) {
    // SAFETY: the count given to the threadsafe function in `new`, returned once here.
    let context = unsafe { Arc::from_raw(data as *const Context) };
    context.gone.store(true, Ordering::SeqCst);
}

unsafe extern "C" fn call_js(env: Env, _js: Value, context: *mut c_void, data: *mut c_void) {
    // SAFETY: the box made in `begin`'s callback.
    let done = unsafe { Box::from_raw(data.cast::<Done>()) };
    if env.is_null() {
        // The environment is going away: nothing can be settled, nothing may be deleted.
        if let Some(t) = done.carry.target {
            t.obj.leak();
        }
        return;
    }
    let context = unsafe { &*(context as *const Context) };
    context.pending.set(context.pending.get() - 1);
    if context.pending.get() == 0 {
        unsafe { sys::napi_unref_threadsafe_function(env, context.tsfn.get()) };
    }
    let Done {
        carry:
            Carry {
                deferred,
                operation,
                outcome,
                target,
                cancel,
                closed,
            },
        result,
    } = *done;
    let deferred = deferred as sys::napi_deferred;
    if cancel.as_ref().is_some_and(CancelToken::is_cancelled) {
        settle::resolve(env, deferred, settle::undefined(env));
        return;
    }
    let result = match result {
        Ok(_) if target.is_some() && closed.load(Ordering::SeqCst) => Err(Error::io(
            Errno::ENOTCONN,
            "the handle was closed before the command finished",
        )),
        other => other,
    };
    let reply = match result {
        Ok(r) => r,
        Err(e) => {
            settle::reject(env, deferred, settle::error(env, &context.make_error, operation, &e));
            return;
        }
    };
    let value = match (outcome, target) {
        (outcome, Some(target)) => {
            // A preadInto: the data lands in the caller's buffer now, if it is still there.
            let data = reply.data.unwrap_or_default();
            match target.check() {
                Some((ptr, len)) if len == data.len() => {
                    // SAFETY: checked live and as long as the data, on the JavaScript thread.
                    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), ptr, len) };
                    match outcome {
                        Outcome::CallerBuffer => target.obj.value(),
                        _ => settle::undefined(env),
                    }
                }
                _ => {
                    let e = Error::usage(
                        Errno::EFAULT,
                        format!(
                            "the buffer was detached or resized while the read was in flight ({} bytes read); the data was dropped",
                            data.len()
                        ),
                    );
                    settle::reject(env, deferred, settle::error(env, &context.make_error, operation, &e));
                    return;
                }
            }
        }
        (Outcome::Buffer, None) => settle::buffer_from_vec(env, reply.data.unwrap_or_default()),
        (Outcome::Structured, None) => {
            let data = settle::buffer_from_vec(env, reply.data.unwrap_or_default());
            settle::structured(env, data, &reply.detail)
        }
        (Outcome::Extents, None) => settle::extents(env, &reply.detail),
        (Outcome::Void, None) | (Outcome::CallerBuffer, None) => settle::undefined(env),
    };
    settle::resolve(env, deferred, value);
}
