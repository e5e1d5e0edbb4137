//! The Envoy dynamic module ABI (Envoy 1.40, ABI v0.2.0), by hand: only the callbacks the filter
//! calls and the hooks Envoy looks up for an HTTP filter. Every `unsafe` of the native build is in
//! this file; each block names the part of the ABI contract (`abi/abi.h` in envoyproxy/envoy) it
//! relies on. The rest of `native` sees safe functions taking an [`Filter`] or [`Config`] handle.
//!
//! Checked against the 1.40.0 binary: every callback declared here is in `nm -D` of Envoy (Envoy
//! is linked with BIND_NOW, so a missing one would refuse the module), and every hook exported
//! by `hooks!` is a name in its `strings` (the ones Envoy's HTTP filter config requires).
//!
//! Threads: the config hooks run on the main thread; a filter's hooks and every callback on its
//! `filter_envoy_ptr` run on the worker thread that owns the stream. Envoy never calls one
//! filter's hooks concurrently.

use std::ffi::{c_char, c_void};
use std::marker::PhantomData;
use std::panic::{catch_unwind, AssertUnwindSafe};

/// `envoy_dynamic_module_type_envoy_buffer`: bytes owned by Envoy.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct EnvoyBuffer {
    ptr: *const c_char,
    length: usize,
}

impl EnvoyBuffer {
    const EMPTY: EnvoyBuffer = EnvoyBuffer {
        ptr: std::ptr::null(),
        length: 0,
    };
}

/// `envoy_dynamic_module_type_module_buffer`: bytes owned by the module, read by Envoy only
/// during the call they are passed to.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ModuleBuffer {
    ptr: *const c_char,
    length: usize,
}

impl ModuleBuffer {
    fn of(bytes: &[u8]) -> ModuleBuffer {
        ModuleBuffer {
            ptr: bytes.as_ptr().cast(),
            length: bytes.len(),
        }
    }

    /// A null buffer: "no value" where the header says one may be null (header removal).
    const NULL: ModuleBuffer = ModuleBuffer {
        ptr: std::ptr::null(),
        length: 0,
    };
}

/// `envoy_dynamic_module_type_module_http_header` (the same layout serves
/// `envoy_dynamic_module_type_envoy_http_header`, whose pointers are Envoy's).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct HttpHeader {
    key_ptr: *const c_char,
    key_length: usize,
    value_ptr: *const c_char,
    value_length: usize,
}

/// C enums are `int`-sized in the ABI.
pub type CEnum = u32;

/// `envoy_dynamic_module_type_http_header_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeaderMap {
    Request = 0,
    Response = 2,
}

/// `envoy_dynamic_module_type_http_body_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Body {
    ReceivedRequest = 0,
    BufferedRequest = 1,
    ReceivedResponse = 2,
}

/// `envoy_dynamic_module_type_log_level`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogLevel {
    Trace = 0,
    Debug = 1,
    Info = 2,
    Warn = 3,
    Error = 4,
    Critical = 5,
}

/// `envoy_dynamic_module_type_metadata_source`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetadataSource {
    /// The upstream host's (`LbEndpoint`) metadata.
    Host = 3,
}

/// The `envoy_dynamic_module_type_attribute_id` values the filter reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attribute {
    /// `request.total_size`
    RequestTotalSize = 14,
    /// `response.code_details`
    ResponseCodeDetails = 16,
    /// `upstream.request_attempt_count`
    UpstreamRequestAttemptCount = 53,
}

/// `envoy_dynamic_module_type_metrics_result_Success`.
const METRICS_SUCCESS: CEnum = 0;

/// What a request or response headers hook answers
/// (`envoy_dynamic_module_type_on_http_filter_{request,response}_headers_status`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeadersStatus {
    Continue = 0,
    StopIteration = 1,
}

/// What a body hook answers (`..._{request,response}_body_status`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyStatus {
    Continue = 0,
    StopIterationAndBuffer = 1,
}

/// What a trailers hook answers (`..._{request,response}_trailers_status`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrailersStatus {
    Continue = 0,
    StopIteration = 1,
}

/// The version string `envoy_dynamic_module_on_program_init` returns: the ABI these
/// declarations were checked against (Envoy only warns on a mismatch).
const ABI_VERSION: &[u8] = b"v0.2.0\0";

type EnvoyPtr = *mut c_void;

extern "C" {
    fn envoy_dynamic_module_callback_log(level: CEnum, message: ModuleBuffer);
    fn envoy_dynamic_module_callback_log_enabled(level: CEnum) -> bool;

    fn envoy_dynamic_module_callback_http_get_header(
        filter: EnvoyPtr,
        map: CEnum,
        key: ModuleBuffer,
        result: *mut EnvoyBuffer,
        index: usize,
        count: *mut usize,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_get_headers_size(filter: EnvoyPtr, map: CEnum) -> usize;
    fn envoy_dynamic_module_callback_http_get_headers(
        filter: EnvoyPtr,
        map: CEnum,
        result: *mut HttpHeader,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_set_header(
        filter: EnvoyPtr,
        map: CEnum,
        key: ModuleBuffer,
        value: ModuleBuffer,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_add_header(
        filter: EnvoyPtr,
        map: CEnum,
        key: ModuleBuffer,
        value: ModuleBuffer,
    ) -> bool;

    fn envoy_dynamic_module_callback_http_send_response(
        filter: EnvoyPtr,
        status: u32,
        headers: *mut HttpHeader,
        headers_size: usize,
        body: ModuleBuffer,
        details: ModuleBuffer,
    );

    fn envoy_dynamic_module_callback_http_get_body_size(filter: EnvoyPtr, body: CEnum) -> usize;
    fn envoy_dynamic_module_callback_http_get_body_chunks_size(
        filter: EnvoyPtr,
        body: CEnum,
    ) -> usize;
    fn envoy_dynamic_module_callback_http_get_body_chunks(
        filter: EnvoyPtr,
        body: CEnum,
        result: *mut EnvoyBuffer,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_append_body(
        filter: EnvoyPtr,
        body: CEnum,
        data: ModuleBuffer,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_drain_body(
        filter: EnvoyPtr,
        body: CEnum,
        bytes: usize,
    ) -> bool;

    fn envoy_dynamic_module_callback_http_set_filter_state_bytes(
        filter: EnvoyPtr,
        key: ModuleBuffer,
        value: ModuleBuffer,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_get_filter_state_bytes(
        filter: EnvoyPtr,
        key: ModuleBuffer,
        result: *mut EnvoyBuffer,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_get_metadata_string(
        filter: EnvoyPtr,
        source: CEnum,
        namespace: ModuleBuffer,
        key: ModuleBuffer,
        result: *mut EnvoyBuffer,
    ) -> bool;

    fn envoy_dynamic_module_callback_http_filter_get_attribute_string(
        filter: EnvoyPtr,
        id: CEnum,
        result: *mut EnvoyBuffer,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_filter_get_attribute_int(
        filter: EnvoyPtr,
        id: CEnum,
        result: *mut u64,
    ) -> bool;

    fn envoy_dynamic_module_callback_http_received_buffered_request_body(filter: EnvoyPtr) -> bool;

    fn envoy_dynamic_module_callback_http_filter_scheduler_new(filter: EnvoyPtr) -> EnvoyPtr;
    fn envoy_dynamic_module_callback_http_filter_scheduler_commit(scheduler: EnvoyPtr, event: u64);
    fn envoy_dynamic_module_callback_http_filter_scheduler_delete(scheduler: EnvoyPtr);
    fn envoy_dynamic_module_callback_http_clear_route_cache(filter: EnvoyPtr);

    fn envoy_dynamic_module_callback_http_filter_config_define_counter(
        config: EnvoyPtr,
        name: ModuleBuffer,
        labels: *mut ModuleBuffer,
        labels_length: usize,
        id: *mut usize,
    ) -> CEnum;
    fn envoy_dynamic_module_callback_http_filter_config_define_histogram(
        config: EnvoyPtr,
        name: ModuleBuffer,
        labels: *mut ModuleBuffer,
        labels_length: usize,
        id: *mut usize,
    ) -> CEnum;
    fn envoy_dynamic_module_callback_http_filter_increment_counter(
        filter: EnvoyPtr,
        id: usize,
        labels: *mut ModuleBuffer,
        labels_length: usize,
        value: u64,
    ) -> CEnum;
    fn envoy_dynamic_module_callback_http_filter_record_histogram_value(
        filter: EnvoyPtr,
        id: usize,
        labels: *mut ModuleBuffer,
        labels_length: usize,
        value: u64,
    ) -> CEnum;
}

/// Logs through Envoy's `dynamic_modules` logger. Any thread.
pub fn log(level: LogLevel, message: &str) {
    // SAFETY: `log` reads `message` only during the call (module-owned buffer) and may be called
    // from any thread.
    unsafe {
        envoy_dynamic_module_callback_log(level as CEnum, ModuleBuffer::of(message.as_bytes()))
    }
}

/// Whether Envoy's `dynamic_modules` logger would print `level`. Any thread.
pub fn log_enabled(level: LogLevel) -> bool {
    // SAFETY: a pure query of the logger's level, callable from any thread.
    unsafe { envoy_dynamic_module_callback_log_enabled(level as CEnum) }
}

/// The `DynamicModuleHttpFilterConfig` Envoy passes to `on_http_filter_config_new`. Only valid
/// during that hook (metrics can only be defined then: Envoy freezes stat creation after it),
/// hence the borrow.
pub struct Config<'a> {
    ptr: EnvoyPtr,
    _hook: PhantomData<&'a ()>,
}

/// A metric defined on the config: its id, valid for every filter the config creates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MetricId(usize);

impl Config<'_> {
    /// Defines a counter (`histogram`: a histogram) with these label names.
    pub fn define_metric(&self, name: &str, labels: &[&str], histogram: bool) -> Option<MetricId> {
        let mut names: Vec<ModuleBuffer> = labels
            .iter()
            .map(|l| ModuleBuffer::of(l.as_bytes()))
            .collect();
        let mut id = 0usize;
        // SAFETY: called on the main thread inside on_http_filter_config_new with the config
        // pointer of that call; `name` and the label buffers are read during the call only; `id`
        // is a valid out pointer.
        let result = unsafe {
            if histogram {
                envoy_dynamic_module_callback_http_filter_config_define_histogram(
                    self.ptr,
                    ModuleBuffer::of(name.as_bytes()),
                    names.as_mut_ptr(),
                    names.len(),
                    &mut id,
                )
            } else {
                envoy_dynamic_module_callback_http_filter_config_define_counter(
                    self.ptr,
                    ModuleBuffer::of(name.as_bytes()),
                    names.as_mut_ptr(),
                    names.len(),
                    &mut id,
                )
            }
        };
        (result == METRICS_SUCCESS).then_some(MetricId(id))
    }
}

/// The `DynamicModuleHttpFilter` of one stream, for the duration of one hook. Envoy's buffers
/// it hands out (header values, body chunks, filter state) stay valid until the hook returns or
/// the same map is changed; `&self` borrows for reads and `&mut self` for writes make the borrow
/// checker enforce that.
pub struct Filter<'a> {
    ptr: EnvoyPtr,
    _hook: PhantomData<&'a ()>,
}

/// Turns an Envoy buffer into a slice borrowed from the filter.
///
/// SAFETY (caller): `buffer` was filled by Envoy during this hook, by a getter whose contract says
/// the bytes stay valid until the end of the hook unless a setter is called; the returned
/// lifetime is tied to a `&self` borrow of the filter, so no setter (`&mut self`) can run while
/// it lives.
unsafe fn envoy_bytes<'b>(buffer: EnvoyBuffer) -> &'b [u8] {
    if buffer.ptr.is_null() || buffer.length == 0 {
        return &[];
    }
    // SAFETY: see the function's contract: a non-null pointer to `length` bytes owned by Envoy.
    unsafe { std::slice::from_raw_parts(buffer.ptr.cast::<u8>(), buffer.length) }
}

impl<'a> Filter<'a> {
    /// The first value of header `name` (lower case), without a copy.
    pub fn header(&self, map: HeaderMap, name: &str) -> Option<&[u8]> {
        let mut value = EnvoyBuffer::EMPTY;
        let mut count = 0usize;
        // SAFETY: worker thread of this stream, inside one of its hooks; `name` is read during
        // the call; `value` and `count` are valid out pointers. The value's bytes are Envoy's
        // and valid until the hook ends or the map changes (see `envoy_bytes`).
        unsafe {
            let ok = envoy_dynamic_module_callback_http_get_header(
                self.ptr,
                map as CEnum,
                ModuleBuffer::of(name.as_bytes()),
                &mut value,
                0,
                &mut count,
            );
            (ok && count > 0).then(|| envoy_bytes(value))
        }
    }

    /// Every header of `map` in order, names and values borrowed from Envoy.
    pub fn headers(&self, map: HeaderMap) -> Vec<(&[u8], &[u8])> {
        // SAFETY: same thread/hook contract as `header`; Envoy writes exactly `size` entries
        // into the array sized by `get_headers_size` just before, with no change in between.
        unsafe {
            let size = envoy_dynamic_module_callback_http_get_headers_size(self.ptr, map as CEnum);
            if size == 0 {
                return Vec::new();
            }
            let empty = HttpHeader {
                key_ptr: std::ptr::null(),
                key_length: 0,
                value_ptr: std::ptr::null(),
                value_length: 0,
            };
            let mut raw = vec![empty; size];
            if !envoy_dynamic_module_callback_http_get_headers(
                self.ptr,
                map as CEnum,
                raw.as_mut_ptr(),
            ) {
                return Vec::new();
            }
            raw.iter()
                .map(|h| {
                    let key = envoy_bytes(EnvoyBuffer {
                        ptr: h.key_ptr,
                        length: h.key_length,
                    });
                    let value = envoy_bytes(EnvoyBuffer {
                        ptr: h.value_ptr,
                        length: h.value_length,
                    });
                    (key, value)
                })
                .collect()
        }
    }

    /// Sets header `name` to `value` (replacing every value), or removes it (`None`).
    pub fn set_header(&mut self, map: HeaderMap, name: &str, value: Option<&[u8]>) -> bool {
        let value = value.map_or(ModuleBuffer::NULL, ModuleBuffer::of);
        // SAFETY: worker thread, inside a hook; both buffers are read during the call only (a
        // null value removes the header, as the ABI defines).
        unsafe {
            envoy_dynamic_module_callback_http_set_header(
                self.ptr,
                map as CEnum,
                ModuleBuffer::of(name.as_bytes()),
                value,
            )
        }
    }

    /// Adds one more value of header `name`.
    pub fn add_header(&mut self, map: HeaderMap, name: &str, value: &[u8]) -> bool {
        // SAFETY: worker thread, inside a hook; both buffers are read during the call only.
        unsafe {
            envoy_dynamic_module_callback_http_add_header(
                self.ptr,
                map as CEnum,
                ModuleBuffer::of(name.as_bytes()),
                ModuleBuffer::of(value),
            )
        }
    }

    /// Answers the client with a local reply; `details` goes to the response code details.
    pub fn send_response(
        &mut self,
        status: u32,
        headers: &[(&str, &str)],
        body: &[u8],
        details: &str,
    ) {
        let mut raw: Vec<HttpHeader> = headers
            .iter()
            .map(|(k, v)| HttpHeader {
                key_ptr: k.as_ptr().cast(),
                key_length: k.len(),
                value_ptr: v.as_ptr().cast(),
                value_length: v.len(),
            })
            .collect();
        // SAFETY: worker thread, inside a hook; Envoy copies headers, body and details during
        // the call (module-owned buffers).
        unsafe {
            envoy_dynamic_module_callback_http_send_response(
                self.ptr,
                status,
                raw.as_mut_ptr(),
                raw.len(),
                ModuleBuffer::of(body),
                ModuleBuffer::of(details.as_bytes()),
            )
        }
    }

    /// The chunks of a body, without a copy.
    pub fn body_chunks(&self, body: Body) -> Vec<&[u8]> {
        // SAFETY: worker thread, inside a hook; the array is sized by `get_body_chunks_size`
        // just before and filled by Envoy with slices valid until the hook ends or the body
        // changes (see `envoy_bytes`).
        unsafe {
            let n =
                envoy_dynamic_module_callback_http_get_body_chunks_size(self.ptr, body as CEnum);
            if n == 0 {
                return Vec::new();
            }
            let mut raw = vec![EnvoyBuffer::EMPTY; n];
            if !envoy_dynamic_module_callback_http_get_body_chunks(
                self.ptr,
                body as CEnum,
                raw.as_mut_ptr(),
            ) {
                return Vec::new();
            }
            raw.into_iter().map(|b| envoy_bytes(b)).collect()
        }
    }

    /// The size of a body in bytes.
    pub fn body_size(&self, body: Body) -> usize {
        // SAFETY: worker thread, inside a hook; a plain query.
        unsafe { envoy_dynamic_module_callback_http_get_body_size(self.ptr, body as CEnum) }
    }

    /// Whether the request body chunk of this hook is the body another filter buffered
    /// (delivered again when that filter resumed).
    pub fn received_is_buffered(&self) -> bool {
        // SAFETY: worker thread, inside a hook; a plain query.
        unsafe { envoy_dynamic_module_callback_http_received_buffered_request_body(self.ptr) }
    }

    /// Empties a body (draining more than its size drains it all).
    pub fn drain_body(&mut self, body: Body) -> bool {
        // SAFETY: worker thread, inside a hook; `&mut self` ends every borrow of its chunks.
        unsafe {
            envoy_dynamic_module_callback_http_drain_body(self.ptr, body as CEnum, usize::MAX)
        }
    }

    /// Appends `data` to a body (Envoy copies it during the call).
    pub fn append_body(&mut self, body: Body, data: &[u8]) -> bool {
        // SAFETY: worker thread, inside a hook; `data` is read during the call only.
        unsafe {
            envoy_dynamic_module_callback_http_append_body(
                self.ptr,
                body as CEnum,
                ModuleBuffer::of(data),
            )
        }
    }

    /// Stores filter state `key` (a string accessor, read-only once set: Envoy refuses to
    /// change it afterwards).
    pub fn set_filter_state(&mut self, key: &str, value: &[u8]) -> bool {
        // SAFETY: worker thread, inside a hook; Envoy copies key and value into the stream's
        // filter state during the call.
        unsafe {
            envoy_dynamic_module_callback_http_set_filter_state_bytes(
                self.ptr,
                ModuleBuffer::of(key.as_bytes()),
                ModuleBuffer::of(value),
            )
        }
    }

    /// Filter state `key` (set by this module, here or in the downstream part), without a copy.
    pub fn filter_state(&self, key: &str) -> Option<&[u8]> {
        let mut value = EnvoyBuffer::EMPTY;
        // SAFETY: worker thread, inside a hook; `value` is a valid out pointer whose bytes are
        // Envoy's, valid until the hook ends or the state changes (see `envoy_bytes`).
        unsafe {
            envoy_dynamic_module_callback_http_get_filter_state_bytes(
                self.ptr,
                ModuleBuffer::of(key.as_bytes()),
                &mut value,
            )
            .then(|| envoy_bytes(value))
        }
    }

    /// A string of the upstream host's metadata (`filter_metadata.<namespace>.<key>`).
    pub fn host_metadata(&self, namespace: &str, key: &str) -> Option<&[u8]> {
        let mut value = EnvoyBuffer::EMPTY;
        // SAFETY: worker thread, inside a hook; the buffers are read during the call; the
        // result's bytes are Envoy's (see `envoy_bytes`).
        unsafe {
            envoy_dynamic_module_callback_http_get_metadata_string(
                self.ptr,
                MetadataSource::Host as CEnum,
                ModuleBuffer::of(namespace.as_bytes()),
                ModuleBuffer::of(key.as_bytes()),
                &mut value,
            )
            .then(|| envoy_bytes(value))
        }
    }

    /// A string attribute.
    pub fn attribute_string(&self, id: Attribute) -> Option<&[u8]> {
        let mut value = EnvoyBuffer::EMPTY;
        // SAFETY: worker thread, inside a hook; the result's bytes are Envoy's (see
        // `envoy_bytes`).
        unsafe {
            envoy_dynamic_module_callback_http_filter_get_attribute_string(
                self.ptr,
                id as CEnum,
                &mut value,
            )
            .then(|| envoy_bytes(value))
        }
    }

    /// An integer attribute.
    pub fn attribute_int(&self, id: Attribute) -> Option<u64> {
        let mut value = 0u64;
        // SAFETY: worker thread, inside a hook; `value` is a valid out pointer.
        unsafe {
            envoy_dynamic_module_callback_http_filter_get_attribute_int(
                self.ptr,
                id as CEnum,
                &mut value,
            )
            .then_some(value)
        }
    }

    /// A scheduler for this stream: lets another thread run `Module::scheduled` on the stream's
    /// worker thread.
    pub fn scheduler(&mut self) -> Option<Scheduler> {
        // SAFETY: worker thread, inside a hook of this stream; Envoy allocates the scheduler and
        // the module owns it until `scheduler_delete` (`Scheduler::drop`).
        let ptr = unsafe { envoy_dynamic_module_callback_http_filter_scheduler_new(self.ptr) };
        (!ptr.is_null()).then_some(Scheduler { ptr })
    }

    /// Makes Envoy pick the route again (after the headers or the filter state it matches on
    /// changed).
    pub fn clear_route_cache(&mut self) {
        // SAFETY: worker thread, inside a hook of this stream; a no-op in the wrong phase.
        unsafe { envoy_dynamic_module_callback_http_clear_route_cache(self.ptr) }
    }

    /// Adds `value` to a counter or records it in a histogram defined on this filter's config.
    pub fn record(&mut self, id: MetricId, histogram: bool, labels: &[&str], value: u64) -> bool {
        let mut values: Vec<ModuleBuffer> = labels
            .iter()
            .map(|l| ModuleBuffer::of(l.as_bytes()))
            .collect();
        // SAFETY: worker thread, inside a hook; `id` was defined on the config that created this
        // filter; the label values (as many as the definition's names) are read during the call.
        let result = unsafe {
            if histogram {
                envoy_dynamic_module_callback_http_filter_record_histogram_value(
                    self.ptr,
                    id.0,
                    values.as_mut_ptr(),
                    values.len(),
                    value,
                )
            } else {
                envoy_dynamic_module_callback_http_filter_increment_counter(
                    self.ptr,
                    id.0,
                    values.as_mut_ptr(),
                    values.len(),
                    value,
                )
            }
        };
        result == METRICS_SUCCESS
    }
}

/// A stream's scheduler (`envoy_dynamic_module_type_http_filter_scheduler_module_ptr`).
pub struct Scheduler {
    ptr: EnvoyPtr,
}

// SAFETY: the ABI says `scheduler_commit` is safe from any thread (a no-op once the filter is
// destroyed); `scheduler_delete` runs in `Drop`, and the module's owner of a `Scheduler` keeps it
// behind a lock so no commit can race the delete.
unsafe impl Send for Scheduler {}

impl Scheduler {
    /// Asks Envoy to call `Module::scheduled` with `event` on the stream's worker thread.
    pub fn commit(&self, event: u64) {
        // SAFETY: a live scheduler (deleted only in Drop); callable from any thread.
        unsafe { envoy_dynamic_module_callback_http_filter_scheduler_commit(self.ptr, event) }
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        // SAFETY: the pointer came from `scheduler_new` and is deleted exactly once, here.
        unsafe { envoy_dynamic_module_callback_http_filter_scheduler_delete(self.ptr) }
    }
}

/// What the module implements: `super` provides one value of this type, and the exported hooks
/// below turn Envoy's calls into calls on it, each inside `catch_unwind`.
pub trait Module {
    /// The compiled configuration, shared by every worker thread.
    type Config: Send + Sync + 'static;
    /// One stream's state; only ever touched by the worker thread that owns the stream.
    type Stream: 'static;

    fn config_new(config: &Config<'_>, name: &[u8], text: &[u8]) -> Option<Self::Config>;
    fn stream_new(config: &Self::Config) -> Self::Stream;
    fn request_headers(s: &mut Self::Stream, f: &mut Filter<'_>, end: bool) -> HeadersStatus;
    fn request_body(s: &mut Self::Stream, f: &mut Filter<'_>, end: bool) -> BodyStatus;
    fn request_trailers(s: &mut Self::Stream, f: &mut Filter<'_>) -> TrailersStatus;
    fn response_headers(s: &mut Self::Stream, f: &mut Filter<'_>, end: bool) -> HeadersStatus;
    fn response_body(s: &mut Self::Stream, f: &mut Filter<'_>, end: bool) -> BodyStatus;
    fn stream_complete(s: &mut Self::Stream, f: &mut Filter<'_>);
    /// An event committed through the stream's `Scheduler`.
    fn scheduled(s: &mut Self::Stream, f: &mut Filter<'_>, event: u64);
    /// A hook panicked: answer the client (called inside its own `catch_unwind`).
    fn panicked(f: &mut Filter<'_>, hook: &str);
}

/// The module's stream as Envoy holds it: the config it came from (kept alive by the `Arc`
/// even if Envoy destroys the config first) and the stream state.
pub struct StreamBox<M: Module> {
    _config: std::sync::Arc<M::Config>,
    stream: M::Stream,
    /// A hook panicked and the client was answered: later hooks pass everything through.
    poisoned: bool,
}

/// Runs one hook of a stream: `None` when the pointer is null or the hook panicked (then
/// `M::panicked` has answered the client, once).
///
/// SAFETY (caller): `filter_envoy` is the `DynamicModuleHttpFilter` of the current hook and
/// `stream` is a pointer returned by `http_filter_new` and not yet passed to `http_filter_destroy`
/// (the ABI's contract for every per-stream hook), on the stream's worker thread.
pub unsafe fn run_hook<M: Module, R>(
    filter_envoy: *mut c_void,
    stream: *const c_void,
    hook: &str,
    body: impl FnOnce(&mut M::Stream, &mut Filter<'_>) -> R,
) -> Option<R> {
    if stream.is_null() || filter_envoy.is_null() {
        return None;
    }
    // SAFETY: see the contract above: the pointer is our own `Box<StreamBox<M>>`, alive, and
    // Envoy calls one stream's hooks one at a time on one thread, so this is the only reference.
    let boxed = unsafe { &mut *(stream as *mut StreamBox<M>) };
    if boxed.poisoned {
        return None;
    }
    let mut filter = Filter {
        ptr: filter_envoy,
        _hook: PhantomData,
    };
    let result = catch_unwind(AssertUnwindSafe(|| body(&mut boxed.stream, &mut filter)));
    match result {
        Ok(value) => Some(value),
        Err(_) => {
            boxed.poisoned = true;
            let answered = catch_unwind(AssertUnwindSafe(|| M::panicked(&mut filter, hook)));
            if answered.is_err() {
                log(
                    LogLevel::Critical,
                    "llm-filter: panic while answering a panic",
                );
            }
            None
        }
    }
}

/// Creates the config: `None` refuses it.
///
/// SAFETY (caller): `config_envoy` is the `DynamicModuleHttpFilterConfig` of the current
/// `on_http_filter_config_new` call on the main thread, `name` and `text` Envoy buffers valid
/// during it.
unsafe fn config_new<M: Module>(
    config_envoy: *mut c_void,
    name: EnvoyBuffer,
    text: EnvoyBuffer,
) -> *const c_void {
    // SAFETY: name and config are Envoy-owned buffers valid during this hook (the ABI says so
    // for on_http_filter_config_new's arguments); nothing keeps them past it.
    let (name, text) = unsafe { (envoy_bytes(name), envoy_bytes(text)) };
    let config = Config {
        ptr: config_envoy,
        _hook: PhantomData,
    };
    match catch_unwind(AssertUnwindSafe(|| M::config_new(&config, name, text))) {
        Ok(Some(compiled)) => std::sync::Arc::into_raw(std::sync::Arc::new(compiled)).cast(),
        Ok(None) => std::ptr::null(),
        Err(_) => {
            log(
                LogLevel::Critical,
                "llm-filter: panic while loading the configuration: refused",
            );
            std::ptr::null()
        }
    }
}

/// SAFETY (caller): `config` is a pointer returned by `config_new::<M>` and not yet destroyed.
unsafe fn config_destroy<M: Module>(config: *const c_void) {
    if config.is_null() {
        return;
    }
    // SAFETY: the pointer came from `Arc::into_raw` in `config_new` and Envoy calls
    // on_http_filter_config_destroy exactly once for it; streams keep their own `Arc` clones.
    drop(unsafe { std::sync::Arc::from_raw(config.cast::<M::Config>()) });
}

/// SAFETY (caller): `config` is a live pointer returned by `config_new::<M>`.
unsafe fn stream_new<M: Module>(config: *const c_void) -> *const c_void {
    if config.is_null() {
        return std::ptr::null();
    }
    let config = config.cast::<M::Config>();
    // SAFETY: the config outlives this call (Envoy destroys a config only after its last
    // filter_new); incrementing the count gives this stream its own reference.
    let config = unsafe {
        std::sync::Arc::increment_strong_count(config);
        std::sync::Arc::from_raw(config)
    };
    match catch_unwind(AssertUnwindSafe(|| M::stream_new(&config))) {
        Ok(stream) => Box::into_raw(Box::new(StreamBox::<M> {
            _config: config,
            stream,
            poisoned: false,
        }))
        .cast(),
        Err(_) => {
            log(LogLevel::Critical, "llm-filter: panic creating a stream");
            std::ptr::null()
        }
    }
}

/// SAFETY (caller): `stream` is a pointer returned by `stream_new::<M>`, destroyed once.
unsafe fn stream_destroy<M: Module>(stream: *const c_void) {
    if stream.is_null() {
        return;
    }
    // SAFETY: the pointer came from `Box::into_raw` in `stream_new`, and Envoy calls
    // on_http_filter_destroy exactly once per filter, after its last hook.
    let boxed = unsafe { Box::from_raw(stream as *mut StreamBox<M>) };
    if catch_unwind(AssertUnwindSafe(|| drop(boxed))).is_err() {
        log(LogLevel::Critical, "llm-filter: panic dropping a stream");
    }
}

/// Exports every hook Envoy looks up for an HTTP filter, for module type `$m`.
macro_rules! hooks {
    ($m:ty) => {
        #[no_mangle]
        pub extern "C" fn envoy_dynamic_module_on_program_init() -> *const c_char {
            ABI_VERSION.as_ptr().cast()
        }

        #[no_mangle]
        pub extern "C" fn envoy_dynamic_module_on_http_filter_config_new(
            config_envoy: *mut c_void,
            name: EnvoyBuffer,
            config: EnvoyBuffer,
        ) -> *const c_void {
            // SAFETY: Envoy's arguments to on_http_filter_config_new, on the main thread.
            unsafe { config_new::<$m>(config_envoy, name, config) }
        }

        #[no_mangle]
        pub extern "C" fn envoy_dynamic_module_on_http_filter_config_destroy(config: *const c_void) {
            // SAFETY: Envoy passes back the pointer config_new returned, once.
            unsafe { config_destroy::<$m>(config) }
        }

        #[no_mangle]
        pub extern "C" fn envoy_dynamic_module_on_http_filter_new(
            config: *const c_void,
            _filter_envoy: *mut c_void,
        ) -> *const c_void {
            // SAFETY: Envoy passes the live pointer config_new returned.
            unsafe { stream_new::<$m>(config) }
        }

        #[no_mangle]
        pub extern "C" fn envoy_dynamic_module_on_http_filter_destroy(stream: *const c_void) {
            // SAFETY: Envoy passes back the pointer http_filter_new returned, once.
            unsafe { stream_destroy::<$m>(stream) }
        }

        #[no_mangle]
        pub extern "C" fn envoy_dynamic_module_on_http_filter_request_headers(
            filter_envoy: *mut c_void,
            stream: *const c_void,
            end_of_stream: bool,
        ) -> CEnum {
            // SAFETY: Envoy's per-stream hook arguments (see run_hook).
            unsafe {
                run_hook::<$m, _>(filter_envoy, stream, "request headers", |s, f| {
                    <$m as Module>::request_headers(s, f, end_of_stream)
                })
            }
            .map_or(HeadersStatus::StopIteration as CEnum, |r| r as CEnum)
        }

        #[no_mangle]
        pub extern "C" fn envoy_dynamic_module_on_http_filter_request_body(
            filter_envoy: *mut c_void,
            stream: *const c_void,
            end_of_stream: bool,
        ) -> CEnum {
            // SAFETY: Envoy's per-stream hook arguments (see run_hook).
            unsafe {
                run_hook::<$m, _>(filter_envoy, stream, "request body", |s, f| {
                    <$m as Module>::request_body(s, f, end_of_stream)
                })
            }
            .map_or(BodyStatus::Continue as CEnum, |r| r as CEnum)
        }

        #[no_mangle]
        pub extern "C" fn envoy_dynamic_module_on_http_filter_request_trailers(
            filter_envoy: *mut c_void,
            stream: *const c_void,
        ) -> CEnum {
            // SAFETY: Envoy's per-stream hook arguments (see run_hook).
            unsafe {
                run_hook::<$m, _>(filter_envoy, stream, "request trailers", |s, f| {
                    <$m as Module>::request_trailers(s, f)
                })
            }
            .map_or(TrailersStatus::Continue as CEnum, |r| r as CEnum)
        }

        #[no_mangle]
        pub extern "C" fn envoy_dynamic_module_on_http_filter_response_headers(
            filter_envoy: *mut c_void,
            stream: *const c_void,
            end_of_stream: bool,
        ) -> CEnum {
            // SAFETY: Envoy's per-stream hook arguments (see run_hook).
            unsafe {
                run_hook::<$m, _>(filter_envoy, stream, "response headers", |s, f| {
                    <$m as Module>::response_headers(s, f, end_of_stream)
                })
            }
            .map_or(HeadersStatus::Continue as CEnum, |r| r as CEnum)
        }

        #[no_mangle]
        pub extern "C" fn envoy_dynamic_module_on_http_filter_response_body(
            filter_envoy: *mut c_void,
            stream: *const c_void,
            end_of_stream: bool,
        ) -> CEnum {
            // SAFETY: Envoy's per-stream hook arguments (see run_hook).
            unsafe {
                run_hook::<$m, _>(filter_envoy, stream, "response body", |s, f| {
                    <$m as Module>::response_body(s, f, end_of_stream)
                })
            }
            .map_or(BodyStatus::Continue as CEnum, |r| r as CEnum)
        }

        #[no_mangle]
        pub extern "C" fn envoy_dynamic_module_on_http_filter_response_trailers(
            _filter_envoy: *mut c_void,
            _stream: *const c_void,
        ) -> CEnum {
            TrailersStatus::Continue as CEnum
        }

        #[no_mangle]
        pub extern "C" fn envoy_dynamic_module_on_http_filter_stream_complete(
            filter_envoy: *mut c_void,
            stream: *const c_void,
        ) {
            // SAFETY: Envoy's per-stream hook arguments (see run_hook).
            unsafe {
                run_hook::<$m, _>(filter_envoy, stream, "stream complete", |s, f| {
                    <$m as Module>::stream_complete(s, f)
                })
            };
        }

        // Hooks Envoy requires but the filter does not use (it starts no callouts and is not a
        // terminal filter).
        #[no_mangle]
        pub extern "C" fn envoy_dynamic_module_on_http_filter_http_callout_done(
            _filter_envoy: *mut c_void,
            _stream: *const c_void,
            _callout_id: u64,
            _result: CEnum,
            _headers: *mut HttpHeader,
            _headers_size: usize,
            _body: *mut EnvoyBuffer,
            _body_size: usize,
        ) {
        }

        #[no_mangle]
        pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_headers(
            _filter_envoy: *mut c_void,
            _stream: *const c_void,
            _stream_id: u64,
            _headers: *mut HttpHeader,
            _headers_size: usize,
            _end_stream: bool,
        ) {
        }

        #[no_mangle]
        pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_data(
            _filter_envoy: *mut c_void,
            _stream: *const c_void,
            _stream_id: u64,
            _data: *const EnvoyBuffer,
            _data_count: usize,
            _end_stream: bool,
        ) {
        }

        #[no_mangle]
        pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_trailers(
            _filter_envoy: *mut c_void,
            _stream: *const c_void,
            _stream_id: u64,
            _trailers: *mut HttpHeader,
            _trailers_size: usize,
        ) {
        }

        #[no_mangle]
        pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_complete(
            _filter_envoy: *mut c_void,
            _stream: *const c_void,
            _stream_id: u64,
        ) {
        }

        #[no_mangle]
        pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_reset(
            _filter_envoy: *mut c_void,
            _stream: *const c_void,
            _stream_id: u64,
            _reason: CEnum,
        ) {
        }

        #[no_mangle]
        pub extern "C" fn envoy_dynamic_module_on_http_filter_scheduled(
            filter_envoy: *mut c_void,
            stream: *const c_void,
            event_id: u64,
        ) {
            // SAFETY: Envoy's per-stream hook arguments (see run_hook).
            unsafe {
                run_hook::<$m, _>(filter_envoy, stream, "scheduled", |s, f| {
                    <$m as Module>::scheduled(s, f, event_id)
                })
            };
        }

        #[no_mangle]
        pub extern "C" fn envoy_dynamic_module_on_http_filter_downstream_above_write_buffer_high_watermark(
            _filter_envoy: *mut c_void,
            _stream: *const c_void,
        ) {
        }

        #[no_mangle]
        pub extern "C" fn envoy_dynamic_module_on_http_filter_downstream_below_write_buffer_low_watermark(
            _filter_envoy: *mut c_void,
            _stream: *const c_void,
        ) {
        }
    };
}

hooks!(super::LlmModule);
