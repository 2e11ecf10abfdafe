//! Safe wrappers over the few UCP calls a one-sided block transfer needs: a context with RMA,
//! one worker (single-threaded: the transfer thread owns it), memory registration and packed
//! remote keys, endpoints from worker addresses with peer error handling, GET requests polled
//! to completion, and forced endpoint close (which completes whatever is still in flight).
//! Transports are UCX's choice (`UCX_TLS`, `UCX_NET_DEVICES` from the environment).

pub mod sys;

use std::cell::Cell;
use std::ffi::{c_void, CStr};
use std::ptr::{null, null_mut};
use std::rc::Rc;

use sys::*;

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[error("UCX {call}: {message}")]
pub struct UcxError {
    pub call: &'static str,
    pub message: String,
}

fn check(call: &'static str, status: ucs_status_t) -> Result<(), UcxError> {
    if status == UCS_OK {
        return Ok(());
    }
    Err(error(call, status))
}

fn error(call: &'static str, status: ucs_status_t) -> UcxError {
    // SAFETY: ucs_status_string returns a static string for any status value.
    let message = unsafe { CStr::from_ptr(ucs_status_string(status)) }
        .to_string_lossy()
        .into_owned();
    UcxError { call, message }
}

/// What a `ucs_status_ptr_t` says: done at once, failed, or a request still running
/// (UCS_PTR_IS_ERR / UCS_PTR_STATUS).
fn classify(call: &'static str, p: ucs_status_ptr_t) -> Result<Option<Request>, UcxError> {
    let v = p as isize;
    if v == 0 {
        Ok(None)
    } else if (UCS_ERR_LAST as isize..0).contains(&v) {
        Err(error(call, v as ucs_status_t))
    } else {
        Ok(Some(Request(p)))
    }
}

/// A UCP context with the RMA feature, configured from the `UCX_*` environment.
pub struct Context {
    raw: ucp_context_h,
}

impl Context {
    pub fn new() -> Result<Self, UcxError> {
        let mut config = null_mut();
        // SAFETY: out-pointers are valid; null prefix / file mean "the environment".
        check("ucp_config_read", unsafe {
            ucp_config_read(null(), null(), &mut config)
        })?;
        let params = ucp_params_t {
            field_mask: UCP_PARAM_FIELD_FEATURES as u64,
            features: (UCP_FEATURE_RMA | UCP_FEATURE_WAKEUP) as u64,
            ..Default::default()
        };
        let mut raw = null_mut();
        // SAFETY: params and config are valid for the call; the config is released after it.
        let status =
            unsafe { ucp_init_version(UCP_API_MAJOR, UCP_API_MINOR, &params, config, &mut raw) };
        unsafe { ucp_config_release(config) };
        check("ucp_init", status)?;
        Ok(Self { raw })
    }

    /// Registers `len` bytes at `addr` for remote access. The memory must stay allocated
    /// while the region lives.
    pub fn register(&self, addr: *mut u8, len: usize) -> Result<MemRegion<'_>, UcxError> {
        let params = ucp_mem_map_params_t {
            field_mask: (UCP_MEM_MAP_PARAM_FIELD_ADDRESS | UCP_MEM_MAP_PARAM_FIELD_LENGTH) as u64,
            address: addr.cast(),
            length: len,
            ..Default::default()
        };
        let mut memh = null_mut();
        // SAFETY: the caller keeps [addr, addr+len) allocated while the region lives.
        check("ucp_mem_map", unsafe {
            ucp_mem_map(self.raw, &params, &mut memh)
        })?;
        Ok(MemRegion {
            ctx: self,
            memh,
            addr: addr as u64,
            len,
        })
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: workers and regions borrow the context, so they are gone.
        unsafe { ucp_cleanup(self.raw) }
    }
}

/// Registered memory.
pub struct MemRegion<'c> {
    ctx: &'c Context,
    memh: ucp_mem_h,
    pub addr: u64,
    pub len: usize,
}

impl MemRegion<'_> {
    /// The remote key a peer unpacks to read this region.
    pub fn packed_rkey(&self) -> Result<Vec<u8>, UcxError> {
        let mut buf = null_mut();
        let mut size = 0usize;
        // SAFETY: valid handles and out-pointers; the buffer is copied and released.
        check("ucp_rkey_pack", unsafe {
            ucp_rkey_pack(self.ctx.raw, self.memh, &mut buf, &mut size)
        })?;
        let out = unsafe { std::slice::from_raw_parts(buf as *const u8, size) }.to_vec();
        unsafe { ucp_rkey_buffer_release(buf) };
        Ok(out)
    }
}

impl Drop for MemRegion<'_> {
    fn drop(&mut self) {
        // SAFETY: the handle came from ucp_mem_map on this context.
        unsafe { ucp_mem_unmap(self.ctx.raw, self.memh) };
    }
}

/// A worker, driven by the one thread that owns it.
pub struct Worker<'c> {
    raw: ucp_worker_h,
    _ctx: &'c Context,
}

impl<'c> Worker<'c> {
    pub fn new(ctx: &'c Context) -> Result<Self, UcxError> {
        let params = ucp_worker_params_t {
            field_mask: UCP_WORKER_PARAM_FIELD_THREAD_MODE as u64,
            thread_mode: UCS_THREAD_MODE_SINGLE,
            ..Default::default()
        };
        let mut raw = null_mut();
        // SAFETY: valid context and out-pointer.
        check("ucp_worker_create", unsafe {
            ucp_worker_create(ctx.raw, &params, &mut raw)
        })?;
        Ok(Self { raw, _ctx: ctx })
    }

    /// This worker's address, for a peer's [`Worker::connect`].
    pub fn address(&self) -> Result<Vec<u8>, UcxError> {
        let mut addr = null_mut();
        let mut len = 0usize;
        // SAFETY: valid worker and out-pointers; the address is copied and released.
        check("ucp_worker_get_address", unsafe {
            ucp_worker_get_address(self.raw, &mut addr, &mut len)
        })?;
        let out = unsafe { std::slice::from_raw_parts(addr as *const u8, len) }.to_vec();
        unsafe { ucp_worker_release_address(self.raw, addr) };
        Ok(out)
    }

    /// Makes progress on every endpoint; the number of events handled.
    pub fn progress(&self) -> u32 {
        // SAFETY: valid worker, used from its one thread.
        unsafe { ucp_worker_progress(self.raw) }
    }

    /// A file descriptor that becomes readable when the worker has events, once armed.
    pub fn event_fd(&self) -> Result<i32, UcxError> {
        let mut fd = -1;
        // SAFETY: valid worker (created with the wakeup feature) and out-pointer.
        check("ucp_worker_get_efd", unsafe {
            ucp_worker_get_efd(self.raw, &mut fd)
        })?;
        Ok(fd)
    }

    /// Arms the event fd; false when events are already pending (progress again first).
    pub fn arm(&self) -> Result<bool, UcxError> {
        // SAFETY: valid worker, used from its one thread.
        match unsafe { ucp_worker_arm(self.raw) } {
            UCS_ERR_BUSY => Ok(false),
            status => check("ucp_worker_arm", status).map(|()| true),
        }
    }

    /// An endpoint to the worker whose address is `address`. A peer that dies fails the
    /// endpoint's requests instead of leaving them hanging.
    pub fn connect(&self, address: &[u8]) -> Result<Endpoint<'_>, UcxError> {
        let failed = Rc::new(Cell::new(false));
        let arg = Rc::into_raw(failed.clone()) as *mut c_void;
        let params = ucp_ep_params_t {
            field_mask: (UCP_EP_PARAM_FIELD_REMOTE_ADDRESS
                | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE
                | UCP_EP_PARAM_FIELD_ERR_HANDLER) as u64,
            address: address.as_ptr().cast(),
            err_mode: UCP_ERR_HANDLING_MODE_PEER,
            err_handler: ucp_err_handler_t {
                cb: Some(on_endpoint_error),
                arg,
            },
            ..Default::default()
        };
        let mut raw = null_mut();
        // SAFETY: the address bytes are a worker address a peer packed; UCX copies them.
        let status = unsafe { ucp_ep_create(self.raw, &params, &mut raw) };
        if let Err(e) = check("ucp_ep_create", status) {
            // SAFETY: the handler will never run: take back the reference it was given.
            drop(unsafe { Rc::from_raw(arg as *const Cell<bool>) });
            return Err(e);
        }
        Ok(Endpoint {
            worker: self,
            raw,
            failed,
            handler_arg: arg,
        })
    }
}

impl Drop for Worker<'_> {
    fn drop(&mut self) {
        // SAFETY: endpoints borrow the worker, so they are closed.
        unsafe { ucp_worker_destroy(self.raw) }
    }
}

unsafe extern "C" fn on_endpoint_error(arg: *mut c_void, _ep: ucp_ep_h, _status: ucs_status_t) {
    // SAFETY: arg is the endpoint's Rc<Cell<bool>>, alive until the endpoint is closed.
    let failed = unsafe { &*(arg as *const Cell<bool>) };
    failed.set(true);
}

/// A connection to a peer's worker.
pub struct Endpoint<'w> {
    worker: &'w Worker<'w>,
    raw: ucp_ep_h,
    failed: Rc<Cell<bool>>,
    handler_arg: *mut c_void,
}

impl<'w> Endpoint<'w> {
    /// The peer went away (its requests fail from now on).
    pub fn failed(&self) -> bool {
        self.failed.get()
    }

    pub fn unpack_rkey(&self, packed: &[u8]) -> Result<RemoteKey, UcxError> {
        let mut raw = null_mut();
        // SAFETY: the bytes are what a peer's ucp_rkey_pack produced (UCX validates them).
        check("ucp_ep_rkey_unpack", unsafe {
            ucp_ep_rkey_unpack(self.raw, packed.as_ptr().cast(), &mut raw)
        })?;
        Ok(RemoteKey { raw })
    }

    /// Starts reading `len` bytes at the peer's `remote_addr` into `local`. `None`: done
    /// already.
    ///
    /// # Safety
    /// `local..local+len` must stay valid and untouched until the request completes or the
    /// endpoint is closed, and `rkey` must belong to this endpoint.
    pub unsafe fn get(
        &self,
        local: *mut u8,
        len: usize,
        remote_addr: u64,
        rkey: &RemoteKey,
        local_region: Option<&MemRegion<'_>>,
    ) -> Result<Option<Request>, UcxError> {
        let mut param = ucp_request_param_t::default();
        if let Some(r) = local_region {
            param.op_attr_mask = UCP_OP_ATTR_FIELD_MEMH;
            param.memh = r.memh;
        }
        let p = unsafe { ucp_get_nbx(self.raw, local.cast(), len, remote_addr, rkey.raw, &param) };
        classify("ucp_get_nbx", p)
    }

    /// Closes the endpoint, cancelling whatever is still in flight on it, and waits until UCX
    /// lets go of it (the worker is progressed meanwhile). Local buffers of cancelled GETs may
    /// be freed afterwards.
    pub fn close(self) {
        let param = ucp_request_param_t {
            op_attr_mask: UCP_OP_ATTR_FIELD_FLAGS,
            flags: UCP_EP_CLOSE_FLAG_FORCE,
            ..Default::default()
        };
        // SAFETY: a valid endpoint, closed once (self is consumed).
        let p = unsafe { ucp_ep_close_nbx(self.raw, &param) };
        if let Ok(Some(req)) = classify("ucp_ep_close_nbx", p) {
            while req.poll().is_none() {
                self.worker.progress();
            }
        }
        // SAFETY: closed: the error handler will not run again.
        drop(unsafe { Rc::from_raw(self.handler_arg as *const Cell<bool>) });
    }
}

/// An unpacked remote key.
pub struct RemoteKey {
    raw: ucp_rkey_h,
}

impl Drop for RemoteKey {
    fn drop(&mut self) {
        // SAFETY: from ucp_ep_rkey_unpack; keys are dropped before their endpoint closes.
        unsafe { ucp_rkey_destroy(self.raw) }
    }
}

/// A request UCX is still working on.
pub struct Request(ucs_status_ptr_t);

impl Request {
    /// `None` while in progress; then its outcome.
    pub fn poll(&self) -> Option<Result<(), UcxError>> {
        // SAFETY: a live request handle (freed only on drop).
        let status = unsafe { ucp_request_check_status(self.0) };
        (status != UCS_INPROGRESS).then(|| check("request", status))
    }
}

impl Drop for Request {
    fn drop(&mut self) {
        // SAFETY: a request handle from a *_nbx call; UCX finishes it internally if needed.
        unsafe { ucp_request_free(self.0) }
    }
}
