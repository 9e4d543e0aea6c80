//! Raw Node-API entry points for the calls JavaScript makes once per command: `pread`,
//! `preadInto` and `pwrite`.
//!
//! As methods of the napi-rs class these paid, on every call, for napi-rs's bookkeeping of
//! borrowed class instances (a borrow scope, a registry behind a mutex, a class identity
//! lookup for the receiver and for the cancel argument): measured with 4 KiB `preadInto`
//! at depth 64 against nbdkit, about 5 % of the client's CPU. Here each call is a plain
//! `napi_callback` bound to one handle: [`command_calls`] makes the three functions for a
//! [`NativeHandle`] once, when handle.ts creates it, and each call finds its handle through
//! its function's data rather than by checking and unwrapping an argument. (Finding it from
//! an argument took two private-property lookups per call, the type tag's and the wrap's:
//! about 1.5 % of the client's CPU at depth 1.) The three share one [`Bound`]: a weak
//! reference to the handle's object and the address of the `NativeHandle` it wraps. A
//! collection clears the reference at once, and napi-rs drops the `NativeHandle` only
//! later, from the wrap's finalizer; so whenever JavaScript runs, the reference reads
//! `null` or the address is good. (At environment teardown Node runs finalizers while
//! objects still live, but no JavaScript runs then, so no call can come.)
//!
//! handle.ts calls them with arguments that validation.ts has checked. Nothing is trusted
//! anyway: binding to an object that is not a `NativeHandle` throws a `TypeError`, and any
//! argument of the wrong type rejects the returned promise with `EINVAL`; so does the
//! cancel argument if it is not a [`NativeCancel`] (checked by its type tag).
//!
//! No `&mut` reference to either class exists anywhere (every method takes `&self`; their
//! state is in cells), which is what napi-rs's bookkeeping guards against, so the shared
//! references made here are sound for the length of the call, during which the handle's
//! object (held in the call's scope) keeps it alive.

use std::cell::Cell;
use std::ffi::{c_char, c_void, CStr};
use std::ptr;
use std::rc::Rc;

use napi::bindgen_prelude::*;
use napi::sys;
use napi::JsValue;
use napi_derive::napi;

use crate::event_loop::Outcome;
use crate::handle::{NativeCancel, NativeHandle};

/// The most arguments an entry point takes, counting the handle's object in `argv[0]`.
const MAX_ARGS: usize = 6;

/// What one handle's bound functions carry (each holds one count): the handle they act on.
struct Bound {
    env: sys::napi_env,
    /// Weak: the `NativeHandle` object, `null` once collected.
    object: sys::napi_ref,
    /// The `NativeHandle` that object wraps, valid while the object lives.
    handle: *const NativeHandle,
}

thread_local! {
    /// `Bound`s alive on this thread, for [`live_bound_calls`].
    static LIVE_BOUND: Cell<u32> = const { Cell::new(0) };
}

impl Bound {
    fn new(env: sys::napi_env, object: sys::napi_ref, handle: *const NativeHandle) -> Bound {
        LIVE_BOUND.with(|n| n.set(n.get() + 1));
        Bound { env, object, handle }
    }
}

impl Drop for Bound {
    fn drop(&mut self) {
        LIVE_BOUND.with(|n| n.set(n.get() - 1));
        // SAFETY: our reference, in its environment, deleted once; a reference whose
        // object was collected may still be deleted.
        unsafe { sys::napi_delete_reference(self.env, self.object) };
    }
}

/// How many handles' per-command calls are alive on this thread (their functions not yet
/// finalized). For tests: it goes back down once the functions are collected.
#[napi]
pub fn live_bound_calls() -> u32 {
    LIVE_BOUND.with(Cell::get)
}

/// The call's arguments after `argv[0]`, which is left for the handle's object (missing
/// ones are `undefined`), and the function's data: null if Node could not describe the call.
unsafe fn arguments(env: sys::napi_env, info: sys::napi_callback_info) -> ([sys::napi_value; MAX_ARGS], *mut c_void) {
    let mut argc = MAX_ARGS - 1;
    let mut argv = [ptr::null_mut(); MAX_ARGS];
    let mut data = ptr::null_mut();
    // SAFETY: argv[1..] has room for argc values; Node fills the ones not passed with
    // undefined.
    let status = unsafe { sys::napi_get_cb_info(env, info, &mut argc, argv[1..].as_mut_ptr(), ptr::null_mut(), &mut data) };
    if status != sys::Status::napi_ok {
        data = ptr::null_mut();
    }
    (argv, data)
}

/// The Rust value wrapped by `value` if it is an instance of class `T` (its type tag, which
/// napi-rs stamps on every instance, says so), else `None`.
unsafe fn instance<'a, T: TypeTag>(env: sys::napi_env, value: sys::napi_value) -> Option<&'a T> {
    let mut kind = sys::ValueType::napi_undefined;
    // SAFETY: a value of this call.
    let status = unsafe { sys::napi_typeof(env, value, &mut kind) };
    // Only objects: the tag check would convert a primitive (and throw for null).
    if status != sys::Status::napi_ok || kind != sys::ValueType::napi_object {
        return None;
    }
    let tag = T::type_tag();
    let mut matches = false;
    // SAFETY: an object of this call.
    let status = unsafe { sys::napi_check_object_type_tag(env, value, &tag, &mut matches) };
    if status != sys::Status::napi_ok || !matches {
        return None;
    }
    let mut wrapped: *mut c_void = ptr::null_mut();
    // SAFETY: as above.
    let status = unsafe { sys::napi_unwrap(env, value, &mut wrapped) };
    if status != sys::Status::napi_ok || wrapped.is_null() {
        return None;
    }
    // SAFETY: the tag says napi-rs wrapped a `T` in this object, which this call's argument
    // keeps alive; only shared references to it are ever made (see the module's note).
    Some(unsafe { &*(wrapped as *const T) })
}

/// Throws a `TypeError` with `message` and returns nothing.
unsafe fn type_error(env: sys::napi_env, message: String) -> sys::napi_value {
    let mut message = message;
    message.push('\0');
    // SAFETY: a NUL-terminated message, on the JavaScript thread.
    unsafe { sys::napi_throw_type_error(env, ptr::null(), message.as_ptr().cast::<c_char>()) };
    ptr::null_mut()
}

/// What converts one call's arguments after the handle: each conversion's `Err` says what
/// is wrong, for the call to reject with.
struct Converted<'a> {
    env: sys::napi_env,
    handle: &'a NativeHandle,
}

impl<'a> Converted<'a> {
    fn type_of(&self, v: sys::napi_value) -> sys::napi_valuetype {
        let mut t = sys::ValueType::napi_undefined;
        // SAFETY: a value of this call.
        unsafe { sys::napi_typeof(self.env, v, &mut t) };
        t
    }

    fn number(&self, v: sys::napi_value, name: &str) -> std::result::Result<f64, String> {
        let mut n = 0f64;
        // SAFETY: as above; a non-number answers with an error status.
        match unsafe { sys::napi_get_value_double(self.env, v, &mut n) } {
            sys::Status::napi_ok => Ok(n),
            _ => Err(format!("{name} must be a number")),
        }
    }

    fn offset(&self, v: sys::napi_value) -> std::result::Result<Either<f64, BigInt>, String> {
        match self.type_of(v) {
            sys::ValueType::napi_number => self.number(v, "offset").map(Either::A),
            sys::ValueType::napi_bigint => {
                // SAFETY: a bigint of this call.
                unsafe { BigInt::from_napi_value(self.env, v) }.map(Either::B).map_err(|e| e.reason.clone())
            }
            _ => Err("offset must be a number or a bigint".into()),
        }
    }

    fn flags(&self, v: sys::napi_value) -> std::result::Result<u32, String> {
        let mut n = 0u32;
        // SAFETY: as above.
        match unsafe { sys::napi_get_value_uint32(self.env, v, &mut n) } {
            sys::Status::napi_ok => Ok(n),
            _ => Err("flags must be a number".into()),
        }
    }

    fn cancel(&self, v: sys::napi_value) -> std::result::Result<Option<&'a NativeCancel>, String> {
        match self.type_of(v) {
            sys::ValueType::napi_undefined | sys::ValueType::napi_null => Ok(None),
            // SAFETY: a value of this call.
            _ => match unsafe { instance::<NativeCancel>(self.env, v) } {
                Some(c) => Ok(Some(c)),
                None => Err("cancel must be a NativeCancel or null".into()),
            },
        }
    }

    fn flag(&self, v: sys::napi_value, name: &str) -> std::result::Result<bool, String> {
        match self.type_of(v) {
            sys::ValueType::napi_undefined => Ok(false),
            _ => {
                let mut b = false;
                // SAFETY: as above.
                match unsafe { sys::napi_get_value_bool(self.env, v, &mut b) } {
                    sys::Status::napi_ok => Ok(b),
                    _ => Err(format!("{name} must be a boolean")),
                }
            }
        }
    }

    fn unknown(&self, v: sys::napi_value) -> Unknown<'static> {
        // SAFETY: any value converts; it lives as long as this call's scope.
        unsafe { Unknown::from_napi_value(self.env, v) }.expect("any value is an Unknown")
    }

    /// The promise of `operation` rejected with `EINVAL` for `message`.
    fn refuse(&self, operation: &str, message: String) -> sys::napi_value {
        let e = crate::invalid(message);
        self.handle.rejected(self.env, operation, &e)
    }
}

/// Runs `call` with the function's handle (its object in `argv[0]`, the call's arguments
/// after it), or throws if the handle is gone.
unsafe fn with_handle(
    env: sys::napi_env,
    info: sys::napi_callback_info,
    name: &CStr,
    call: impl FnOnce(&Converted<'_>, &[sys::napi_value; MAX_ARGS]) -> sys::napi_value,
) -> sys::napi_value {
    // SAFETY: called by Node with this call's info.
    let (mut argv, data) = unsafe { arguments(env, info) };
    if data.is_null() {
        // Only if Node could not describe the call, which it always can.
        // SAFETY: on the JavaScript thread.
        return unsafe { type_error(env, format!("{}: the call has no handle", name.to_str().unwrap_or("call"))) };
    }
    // SAFETY: every function with one of these callbacks was made by `command_calls` with
    // a count of an `Rc<Bound>` as its data, given up only by the function's finalizer
    // (the function is alive: it is being called).
    let bound = unsafe { &*(data as *const Bound) };
    // SAFETY: a reference of this environment.
    let status = unsafe { sys::napi_get_reference_value(env, bound.object, &mut argv[0]) };
    if status != sys::Status::napi_ok || argv[0].is_null() {
        // Only if JavaScript kept a function and dropped its handle, which handle.ts never does.
        // SAFETY: on the JavaScript thread.
        return unsafe { type_error(env, format!("{}: its handle was garbage-collected", name.to_str().unwrap_or("call"))) };
    }
    // SAFETY: the reference is not yet cleared, so no collection has taken the object and
    // napi-rs has not dropped the NativeHandle it wraps (see the module's note); the
    // object's value, now in this call's scope, keeps it so for the call. Only shared
    // references to it are ever made.
    let handle = unsafe { &*bound.handle };
    call(&Converted { env, handle }, &argv)
}

/// `pread(count, offset, flags, cancel, structured)`: a new Buffer, or with
/// `structured` the data and its chunks (`preadStructured`); see [`NativeHandle::read`].
unsafe extern "C" fn pread(env: sys::napi_env, info: sys::napi_callback_info) -> sys::napi_value {
    // SAFETY: a napi callback.
    unsafe {
        with_handle(env, info, c"pread", |c, argv| {
            let structured = c.flag(argv[5], "structured");
            let op = if structured == Ok(true) { "preadStructured" } else { "pread" };
            let args = (|| Ok::<_, String>((c.number(argv[1], "count")?, c.offset(argv[2])?, c.flags(argv[3])?, c.cancel(argv[4])?, structured?)))();
            match args {
                Ok((count, offset, flags, cancel, structured)) => {
                    let outcome = if structured { Outcome::Structured } else { Outcome::Buffer };
                    c.handle.read(&Env::from_raw(env), op, count, offset, flags, outcome, cancel).raw()
                }
                Err(m) => c.refuse(op, m),
            }
        })
    }
}

/// `preadInto(buf, offset, flags, cancel, fresh)`: into `buf`, or with `fresh` a
/// `pread` into the Buffer handle.ts made for it (a slice of its slab, or one of its own);
/// see [`NativeHandle::read_into`].
unsafe extern "C" fn pread_into(env: sys::napi_env, info: sys::napi_callback_info) -> sys::napi_value {
    // SAFETY: a napi callback.
    unsafe {
        with_handle(env, info, c"preadInto", |c, argv| {
            let fresh = c.flag(argv[5], "fresh");
            let op = if fresh == Ok(true) { "pread" } else { "preadInto" };
            let args = (|| Ok::<_, String>((c.offset(argv[2])?, c.flags(argv[3])?, c.cancel(argv[4])?, fresh?)))();
            match args {
                Ok((offset, flags, cancel, fresh)) => {
                    let outcome = if fresh { Outcome::CallerBuffer } else { Outcome::Void };
                    c.handle.read_into(&Env::from_raw(env), op, c.unknown(argv[1]), offset, flags, cancel, outcome).raw()
                }
                Err(m) => c.refuse(op, m),
            }
        })
    }
}

/// `pwrite(buf, offset, flags, cancel)`: see [`NativeHandle::pwrite`].
unsafe extern "C" fn pwrite(env: sys::napi_env, info: sys::napi_callback_info) -> sys::napi_value {
    // SAFETY: a napi callback.
    unsafe {
        with_handle(env, info, c"pwrite", |c, argv| {
            let args = (|| Ok::<_, String>((c.offset(argv[2])?, c.flags(argv[3])?, c.cancel(argv[4])?)))();
            match args {
                Ok((offset, flags, cancel)) => c.handle.pwrite(&Env::from_raw(env), c.unknown(argv[1]), offset, flags, cancel).raw(),
                Err(m) => c.refuse("pwrite", m),
            }
        })
    }
}

/// Gives up a bound function's count of its `Bound` when the function is collected.
unsafe extern "C" fn drop_bound(_env: sys::napi_env, data: *mut c_void, _hint: *mut c_void) {
    // SAFETY: `data` is the count `command_calls` gave this function, and this finalizer
    // runs once.
    drop(unsafe { Rc::from_raw(data as *const Bound) });
}

/// Sets glibc malloc up for large reads, once per process (see `alloc.rs`); handle.ts
/// calls it as it loads.
#[napi]
pub fn tune_malloc() {
    crate::alloc::tune_malloc();
}

/// The per-command entry points bound to `handle`: functions that take the call's
/// arguments without the handle. handle.ts makes them once per handle.
#[napi(ts_return_type = "{
  pread(count: number, offset: number | bigint, flags: number, cancel: NativeCancel | null, structured?: boolean): Promise<Buffer | { data: Buffer; chunks: Array<{ offset: number; length: number; status: 'data' | 'hole' | 'error' }> }>
  preadInto(buf: Uint8Array, offset: number | bigint, flags: number, cancel: NativeCancel | null, fresh?: boolean): Promise<void | Buffer>
  pwrite(buf: Uint8Array, offset: number | bigint, flags: number, cancel: NativeCancel | null): Promise<void>
}")]
pub fn command_calls<'env>(env: &'env Env, #[napi(ts_arg_type = "NativeHandle")] handle: Unknown<'env>) -> Result<Object<'env>> {
    let raw_env = env.raw();
    let object = handle.raw();
    // SAFETY: a value of this call.
    let Some(native) = (unsafe { instance::<NativeHandle>(raw_env, object) }) else {
        // SAFETY: on the JavaScript thread; napi-rs leaves a pending exception as it is.
        unsafe { type_error(raw_env, "commandCalls: the argument is not a NativeHandle".into()) };
        return Err(Error::from_status(Status::PendingException));
    };
    type Callback = unsafe extern "C" fn(sys::napi_env, sys::napi_callback_info) -> sys::napi_value;
    let calls: [(&CStr, Callback); 3] = [(c"pread", pread), (c"preadInto", pread_into), (c"pwrite", pwrite)];
    let mut weak = ptr::null_mut();
    // SAFETY: an object of this call; a count of 0 makes the reference weak.
    check_status!(unsafe { sys::napi_create_reference(raw_env, object, 0, &mut weak) }, "referencing the handle")?;
    let bound = Rc::new(Bound::new(raw_env, weak, native as *const NativeHandle));
    let mut result = Object::new(env)?;
    for (name, callback) in calls {
        let data = Rc::into_raw(bound.clone()).cast_mut();
        let mut f = ptr::null_mut();
        // SAFETY: a NUL-terminated name and a callback that lives as long as the addon.
        let made = unsafe { sys::napi_create_function(raw_env, name.as_ptr(), name.to_bytes().len() as isize, Some(callback), data.cast(), &mut f) };
        let made = if made == sys::Status::napi_ok {
            // SAFETY: a function just made; `drop_bound` gives up its count when it is
            // collected.
            unsafe { sys::napi_add_finalizer(raw_env, f, data.cast(), Some(drop_bound), ptr::null_mut(), ptr::null_mut()) }
        } else {
            made
        };
        if made != sys::Status::napi_ok {
            // SAFETY: the count was this function's, which nothing can reach or call.
            unsafe { drop_bound(raw_env, data.cast(), ptr::null_mut()) };
            check_status!(made, "making {:?}", name)?;
        }
        // SAFETY: a function just made, on the JavaScript thread.
        let f = unsafe { Unknown::from_napi_value(raw_env, f) }?;
        result.set_named_property(name.to_str().expect("ASCII names"), f)?;
    }
    Ok(result)
}
