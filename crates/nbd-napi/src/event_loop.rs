//! The event-loop driver's Node side: libuv polls the connection's socket on the
//! JavaScript thread, and each wake-up reads, decodes and settles promises there, inside
//! one callback scope, so the awaiting JavaScript runs at once; the requests it issues
//! leave in groups as they pile up, and the rest when the wake-up ends. No thread,
//! channel or threadsafe function is involved (see `nbd_client::event_loop` for the
//! connection itself).
//!
//! The poll handle is referenced (keeps the process alive) only while replies are owed,
//! and closed before its environment goes away (worker threads), through an environment
//! cleanup hook.

use std::cell::{Cell, RefCell};
use std::ffi::{c_int, c_void};
use std::ptr;
use std::rc::Rc;

use napi::sys;

use nbd_client::event_loop::{CommandData, Completion, Connection, Transmission};
use nbd_client::{CancelToken, Error};

use crate::settle::{self, CallerBuf, Env, ErrorFactory, Ref, Value};

// ---- libuv, resolved from the host process (Node.js or Electron) at load time ----

#[allow(non_camel_case_types)]
type uv_poll_cb = unsafe extern "C" fn(handle: *mut c_void, status: c_int, events: c_int);
#[allow(non_camel_case_types)]
type uv_close_cb = unsafe extern "C" fn(handle: *mut c_void);

extern "C" {
    fn uv_handle_size(kind: c_int) -> usize;
    fn uv_poll_init_socket(loop_: *mut c_void, handle: *mut c_void, fd: c_int) -> c_int;
    fn uv_poll_start(handle: *mut c_void, events: c_int, cb: uv_poll_cb) -> c_int;
    fn uv_poll_stop(handle: *mut c_void) -> c_int;
    fn uv_close(handle: *mut c_void, cb: uv_close_cb);
    fn uv_ref(handle: *mut c_void);
    fn uv_unref(handle: *mut c_void);
}

/// `UV_POLL` in libuv's `uv_handle_type`.
const UV_POLL: c_int = 8;
const UV_READABLE: c_int = 1;
const UV_WRITABLE: c_int = 2;

// ---- commands ----

/// What a command resolves to.
pub(crate) enum Outcome {
    /// `undefined` (writes, flush, …, `preadInto`).
    Void,
    /// The Buffer made for a `pread`.
    Buffer,
    /// The caller's buffer itself: a `pread`'s, which handle.ts made for it (a slice of its
    /// slab, or a Buffer of its own).
    CallerBuffer,
    /// `{ data, chunks }` of a `preadStructured`.
    Structured,
    /// Extents per context.
    Extents,
}

/// One command of a JavaScript handle: its promise, its buffers, its abort token.
pub(crate) struct JsCommand {
    pub(crate) deferred: sys::napi_deferred,
    pub(crate) operation: &'static str,
    pub(crate) outcome: Outcome,
    /// A Buffer this binding made for the data (not visible to JavaScript until the
    /// promise resolves, so it cannot move): the reference and its memory.
    pub(crate) own: Option<(Ref, *mut u8, usize)>,
    /// The caller's buffer of a `preadInto` or a large `pwrite`.
    pub(crate) caller: Option<CallerBuf>,
    pub(crate) cancel: Option<CancelToken>,
}

impl CommandData for JsCommand {
    fn dest(&mut self) -> Option<(*mut u8, usize)> {
        if let Some((_, ptr, len)) = &self.own {
            return Some((*ptr, *len));
        }
        self.caller.as_ref().and_then(CallerBuf::check)
    }

    fn source(&mut self) -> Option<(*const u8, usize)> {
        self.caller.as_ref().and_then(CallerBuf::check).map(|(p, l)| (p as *const u8, l))
    }

    fn cancelled(&self) -> bool {
        self.cancel.as_ref().is_some_and(CancelToken::is_cancelled)
    }
}

/// Settles one finished command.
fn settle_one(env: Env, make_error: &ErrorFactory, c: Completion<JsCommand>) {
    let Completion { user, result, detail } = c;
    if user.cancelled() {
        // The caller's promise was rejected when the signal aborted; this one is only
        // awaited by handle.ts, which ignores it.
        settle::resolve(env, user.deferred, settle::undefined(env));
        return;
    }
    match result {
        Err(e) => settle::reject(env, user.deferred, settle::error(env, make_error, user.operation, &e)),
        Ok(()) => {
            let value = match (&user.outcome, &user.own) {
                (Outcome::Buffer, Some((r, _, _))) => r.value(),
                (Outcome::Structured, Some((r, _, _))) => settle::structured(env, r.value(), &detail),
                (Outcome::Extents, _) => settle::extents(env, &detail),
                (Outcome::CallerBuffer, _) => match &user.caller {
                    Some(b) => b.obj.value(),
                    None => settle::undefined(env),
                },
                _ => settle::undefined(env),
            };
            settle::resolve(env, user.deferred, value);
        }
    }
}

// ---- the driver ----

/// A connection polled by libuv on the JavaScript thread.
pub(crate) struct LoopDriver {
    env: Env,
    pub(crate) conn: RefCell<Connection<JsCommand>>,
    make_error: ErrorFactory,
    /// libuv's poll handle (memory of `uv_handle_size(UV_POLL)` bytes, ours to free after
    /// its close callback).
    poll: *mut c_void,
    events: Cell<c_int>,
    referenced: Cell<bool>,
    /// Inside a wake-up: requests issued now are sent when it ends.
    in_turn: Cell<bool>,
    closed: Cell<bool>,
    /// The environment is being torn down: no more Node-API calls.
    env_gone: Cell<bool>,
    resource: std::mem::ManuallyDrop<Ref>,
    async_context: sys::napi_async_context,
    /// The vector completions are settled from, kept between wake-ups.
    batch: RefCell<Vec<Completion<JsCommand>>>,
    /// `shutdown()` promises waiting for NBD_CMD_DISC to be out.
    shutdown_waiters: RefCell<Vec<sys::napi_deferred>>,
    /// The JavaScript debug callback, called here directly (in order with the completions)
    /// instead of through a threadsafe function.
    debug_js: Rc<RefCell<Option<Ref>>>,
    /// Completions of a driver closed by garbage collection, settled from the close
    /// callback (no JavaScript may run inside a finalizer).
    orphans: RefCell<Vec<Completion<JsCommand>>>,
}

impl LoopDriver {
    /// Starts polling a connection that finished its handshake.
    pub(crate) fn start(
        env: Env,
        t: Transmission,
        make_error: ErrorFactory,
        debug_js: Rc<RefCell<Option<Ref>>>,
    ) -> Result<Rc<LoopDriver>, Error> {
        let mut conn = Connection::new(t);
        conn.queue_debug(debug_js.borrow().is_some());
        let fail = |what: &str| Error::io(nbd_client::Errno::EIO, format!("starting the event-loop driver: {what}"));
        let mut uv_loop: *mut sys::uv_loop_s = ptr::null_mut();
        // SAFETY: on the JavaScript thread.
        if unsafe { sys::napi_get_uv_event_loop(env, &mut uv_loop) } != sys::Status::napi_ok {
            return Err(fail("no event loop"));
        }
        // SAFETY: libuv's own size for its poll handle; the memory is freed in `on_close`.
        let size = unsafe { uv_handle_size(UV_POLL) };
        let layout = std::alloc::Layout::from_size_align(size.max(8), 16).expect("valid layout");
        let poll = unsafe { std::alloc::alloc_zeroed(layout) }.cast::<c_void>();
        if poll.is_null() {
            return Err(fail("out of memory"));
        }
        // SAFETY: a fresh handle on the thread's loop, for a socket nobody else polls.
        if unsafe { uv_poll_init_socket(uv_loop.cast(), poll, conn.fd()) } != 0 {
            unsafe { std::alloc::dealloc(poll.cast(), layout) };
            return Err(fail("uv_poll_init_socket failed"));
        }
        let resource_obj = {
            let mut o = ptr::null_mut();
            unsafe { sys::napi_create_object(env, &mut o) };
            o
        };
        let mut async_context = ptr::null_mut();
        unsafe {
            sys::napi_async_init(env, resource_obj, settle::string(env, "nbd-client"), &mut async_context)
        };
        let driver = Rc::new(LoopDriver {
            env,
            conn: RefCell::new(conn),
            make_error,
            poll,
            events: Cell::new(0),
            referenced: Cell::new(true),
            in_turn: Cell::new(false),
            closed: Cell::new(false),
            env_gone: Cell::new(false),
            resource: std::mem::ManuallyDrop::new(Ref::new(env, resource_obj).ok_or_else(|| fail("no reference"))?),
            async_context,
            batch: RefCell::new(Vec::with_capacity(64)),
            shutdown_waiters: RefCell::default(),
            debug_js,
            orphans: RefCell::default(),
        });
        // The handle's `data` (its first field) holds one count of the driver until
        // `on_close`.
        unsafe { *(poll as *mut *const LoopDriver) = Rc::into_raw(driver.clone()) };
        unsafe { sys::napi_add_env_cleanup_hook(env, Some(env_cleanup), Rc::as_ptr(&driver) as *mut c_void) };
        driver.update();
        Ok(driver)
    }

    /// After a command was submitted from JavaScript. Outside a wake-up, the socket is
    /// watched for writability and every request issued until then leaves in one system
    /// call. Inside one, requests leave as the settled code issues them when the
    /// connection says so ([`Connection::should_send_now`]), and the rest when the wake-up
    /// ends.
    pub(crate) fn submitted(&self) {
        if !self.in_turn.get() {
            self.update();
        } else if self.conn.borrow().should_send_now() {
            // A write failing here completes commands, which the wake-up settles next.
            self.conn.borrow_mut().flush();
        }
    }

    /// Watches what the connection needs, and keeps the process alive only while replies
    /// are owed.
    fn update(&self) {
        if self.closed.get() {
            return;
        }
        let (want, owed) = {
            let conn = self.conn.borrow();
            if conn.is_ended() {
                (0, false)
            } else {
                (UV_READABLE | if conn.wants_write() { UV_WRITABLE } else { 0 }, conn.owes_replies())
            }
        };
        if want != self.events.get() {
            // SAFETY: our live poll handle.
            unsafe {
                if want == 0 {
                    uv_poll_stop(self.poll);
                } else {
                    uv_poll_start(self.poll, want, on_poll);
                }
            }
            self.events.set(want);
        }
        if owed != self.referenced.get() {
            unsafe {
                if owed {
                    uv_ref(self.poll)
                } else {
                    uv_unref(self.poll)
                }
            };
            self.referenced.set(owed);
        }
    }

    /// One wake-up: IO, then the promises settled in one callback scope (the awaiting
    /// JavaScript runs as it closes), then the requests issued meanwhile sent together.
    fn turn(&self, status: c_int, events: c_int) {
        let env = self.env;
        let mut scope = ptr::null_mut();
        unsafe { sys::napi_open_handle_scope(env, &mut scope) };
        {
            let mut conn = self.conn.borrow_mut();
            if status < 0 {
                conn.poll_failed(status);
            } else {
                if events & UV_WRITABLE != 0 {
                    conn.flush();
                }
                if events & UV_READABLE != 0 {
                    conn.on_readable();
                }
            }
        }
        loop {
            let debug = self.conn.borrow_mut().take_debug();
            if !debug.is_empty() {
                self.in_turn.set(true);
                self.deliver_debug(debug);
                self.in_turn.set(false);
            }
            // One vector carries every wake-up's completions: swapped in, drained, kept.
            let mut completions = std::mem::take(&mut *self.batch.borrow_mut());
            self.conn.borrow_mut().swap_completions(&mut completions);
            let shutdown_done = self.conn.borrow().shutdown_done();
            let waiters = if shutdown_done && !self.shutdown_waiters.borrow().is_empty() {
                std::mem::take(&mut *self.shutdown_waiters.borrow_mut())
            } else {
                Vec::new()
            };
            if completions.is_empty() && waiters.is_empty() {
                *self.batch.borrow_mut() = completions;
                break;
            }
            self.in_turn.set(true);
            self.settle_batch(&mut completions, waiters);
            self.in_turn.set(false);
            *self.batch.borrow_mut() = completions;
            if self.closed.get() {
                break;
            }
            // What the settled code issued leaves now; a write failing here completes
            // commands, which the next round settles.
            self.conn.borrow_mut().flush();
        }
        if !self.closed.get() {
            self.update();
        }
        unsafe { sys::napi_close_handle_scope(env, scope) };
    }

    /// Calls the JavaScript debug callback with each message.
    fn deliver_debug(&self, messages: Vec<(&'static str, String)>) {
        let env = self.env;
        let f = match self.debug_js.borrow().as_ref() {
            Some(r) => r.value(),
            None => return,
        };
        let mut cb_scope = ptr::null_mut();
        unsafe { sys::napi_open_callback_scope(env, self.resource.value(), self.async_context, &mut cb_scope) };
        for (context, message) in messages {
            let args = [settle::string(env, context), settle::string(env, &message)];
            let mut result = ptr::null_mut();
            let status = unsafe {
                sys::napi_call_function(env, settle::undefined(env), f, 2, args.as_ptr(), &mut result)
            };
            if status == sys::Status::napi_pending_exception {
                // A throwing debug callback is the application's bug: report it as Node
                // reports any uncaught exception, and go on.
                let mut e = ptr::null_mut();
                unsafe {
                    sys::napi_get_and_clear_last_exception(env, &mut e);
                    sys::napi_fatal_exception(env, e);
                }
            }
        }
        unsafe { sys::napi_close_callback_scope(env, cb_scope) };
    }

    /// Settles completions inside a callback scope; promise reactions run as it closes.
    fn settle(&self, mut completions: Vec<Completion<JsCommand>>, waiters: Vec<sys::napi_deferred>) {
        self.settle_batch(&mut completions, waiters)
    }

    /// As [`LoopDriver::settle`], draining `completions` (its memory is kept).
    fn settle_batch(&self, completions: &mut Vec<Completion<JsCommand>>, waiters: Vec<sys::napi_deferred>) {
        let env = self.env;
        let mut cb_scope = ptr::null_mut();
        unsafe { sys::napi_open_callback_scope(env, self.resource.value(), self.async_context, &mut cb_scope) };
        for c in completions.drain(..) {
            settle_one(env, &self.make_error, c);
        }
        for w in waiters {
            settle::resolve(env, w, settle::undefined(env));
        }
        unsafe { sys::napi_close_callback_scope(env, cb_scope) };
    }

    /// Settles what is ready now, from a JavaScript call (no callback scope needed: the
    /// caller's own returns to the event loop).
    pub(crate) fn settle_now(&self) {
        let completions = self.conn.borrow_mut().take_completions();
        let waiters = if self.conn.borrow().shutdown_done() {
            std::mem::take(&mut *self.shutdown_waiters.borrow_mut())
        } else {
            Vec::new()
        };
        for c in completions {
            settle_one(self.env, &self.make_error, c);
        }
        for w in waiters {
            settle::resolve(self.env, w, settle::undefined(self.env));
        }
    }

    /// `shutdown()`: resolves once NBD_CMD_DISC is out.
    pub(crate) fn shutdown(&self, abandon: bool) -> Value {
        let env = self.env;
        let r = self.conn.borrow_mut().shutdown(abandon);
        if let Err(e) = r {
            return settle::rejected(env, &self.make_error, "shutdown", &e);
        }
        let (deferred, promise) = settle::promise(env);
        self.shutdown_waiters.borrow_mut().push(deferred);
        if !self.in_turn.get() {
            self.conn.borrow_mut().flush();
            self.settle_now();
            self.update();
        }
        promise
    }

    /// Closes the connection and the poll handle; the socket goes with the driver. Pending
    /// commands reject, and `shutdown()` promises resolve, from the close callback on the
    /// next turn of the loop: never inside `close()` (code reacting to them, a stream's
    /// error handling say, then runs after it) nor inside a finalizer (no JavaScript there).
    pub(crate) fn close(self: &Rc<Self>) {
        if self.closed.replace(true) {
            return;
        }
        self.conn.borrow_mut().close();
        unsafe { sys::napi_remove_env_cleanup_hook(self.env, Some(env_cleanup), Rc::as_ptr(self) as *mut c_void) };
        let completions = self.conn.borrow_mut().take_completions();
        self.orphans.borrow_mut().extend(completions);
        // SAFETY: our poll handle, closed once; `on_close` frees it and the driver's count.
        unsafe {
            uv_poll_stop(self.poll);
            uv_close(self.poll, on_close);
        }
    }

    /// The environment is being torn down (worker exit): close the handle without calling
    /// into JavaScript.
    fn teardown(&self) {
        self.env_gone.set(true);
        if self.closed.replace(true) {
            return;
        }
        self.conn.borrow_mut().close();
        self.conn.borrow_mut().take_completions().into_iter().for_each(forget_refs);
        unsafe {
            uv_poll_stop(self.poll);
            uv_close(self.poll, on_close);
        }
    }
}

impl Drop for LoopDriver {
    fn drop(&mut self) {
        if self.env_gone.get() {
            return;
        }
        // SAFETY: the environment is alive (not torn down), on its thread.
        unsafe {
            sys::napi_async_destroy(self.env, self.async_context);
            std::mem::ManuallyDrop::drop(&mut self.resource);
        }
    }
}

unsafe extern "C" fn on_poll(handle: *mut c_void, status: c_int, events: c_int) {
    // SAFETY: `data` holds a count of the driver until `on_close`, and libuv calls this
    // only between start and close.
    let driver = unsafe { &*(*(handle as *const *const LoopDriver)) };
    if !driver.closed.get() {
        driver.turn(status, events);
    }
}

unsafe extern "C" fn on_close(handle: *mut c_void) {
    // SAFETY: the count stored in `start`; the handle is closed, so this is the last use.
    let driver = unsafe { Rc::from_raw(*(handle as *const *const LoopDriver)) };
    let orphans = std::mem::take(&mut *driver.orphans.borrow_mut());
    let waiters = std::mem::take(&mut *driver.shutdown_waiters.borrow_mut());
    if driver.env_gone.get() {
        orphans.into_iter().for_each(forget_refs);
    } else if !orphans.is_empty() || !waiters.is_empty() {
        let env = driver.env;
        let mut scope = ptr::null_mut();
        unsafe { sys::napi_open_handle_scope(env, &mut scope) };
        driver.settle(orphans, waiters);
        unsafe { sys::napi_close_handle_scope(env, scope) };
    }
    let size = unsafe { uv_handle_size(UV_POLL) };
    let layout = std::alloc::Layout::from_size_align(size.max(8), 16).expect("valid layout");
    drop(driver);
    unsafe { std::alloc::dealloc(handle.cast(), layout) };
}

/// Drops a completion whose environment is going away without deleting its references
/// (Node-API calls are no longer allowed there).
fn forget_refs(c: Completion<JsCommand>) {
    if let Some((r, _, _)) = c.user.own {
        r.leak()
    }
    if let Some(b) = c.user.caller {
        b.obj.leak()
    }
}

unsafe extern "C" fn env_cleanup(arg: *mut c_void) {
    // SAFETY: the hook is removed before the driver closes; until then the poll handle's
    // count keeps the driver alive.
    let driver = unsafe { &*(arg as *const LoopDriver) };
    driver.teardown();
}
