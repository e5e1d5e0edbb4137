//! The filter as an Envoy dynamic module (`envoy.filters.http.dynamic_modules`), built with
//! `cargo build --release --lib --features native` into `libllm_filter.so`. `abi` holds the
//! hand-written binding (and all of its `unsafe`); this file is the host: it implements
//! `host::Host` on the binding's safe calls and drives the same request core (`stream`) as the
//! proxy-wasm filter.
//!
//! - Configuration: the filter's `filter_config` string is the wasm filter's configuration
//!   string, compiled once when Envoy creates the filter config and shared by every worker
//!   thread (`Arc<Shared>`). The filter name `llm-filter-upstream` makes it the upstream part
//!   of a fallback's aggregate cluster (the wasm build's root id).
//! - Filter state: the same Envoy keys as the wasm build, `wasm.llm.<name>`, so access logs,
//!   `render envoy`'s provider routes and the rate limit descriptors read the same names. The
//!   ABI stores filter state read-only: a value can be set once per stream. The host therefore
//!   writes at once only what Envoy reads while the request runs (`llm.provider` for the route,
//!   `llm.fallback` and `llm.client_model` for the upstream part, the budgets' marks for the
//!   rate limit filter) and keeps the rest, last value wins, until the stream completes, before
//!   Envoy writes the access log and the rate limit filter reads the debit.
//! - Metrics: one family per `Metric`, defined with its labels when the config is created
//!   (Envoy allows no later definition); Prometheus shows them under the same names and labels
//!   as the wasm build's tag-extracted series.
//! - A panic in any hook is caught: that request gets a 500 in OpenAI's error shape and the
//!   stream passes through from then on; Envoy keeps serving.

mod abi;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Once, PoisonError};
use std::time::SystemTime;

use crate::hold::Held;
use crate::host::{ConfigHost, Flow, Headers, Host, HostError};
use crate::metadata;
use crate::metrics::{label_value, Metric, Series};
use crate::stream::{AttemptStream, Shared, Stream, Worker};
use abi::{
    Attribute, Body, BodyStatus, Filter, HeaderMap, HeadersStatus, LogLevel, MetricId, Module,
    Scheduler, TrailersStatus,
};

/// The module type the exported hooks drive.
pub struct LlmModule;

/// The filter name that makes the module the upstream part of a fallback's aggregate cluster.
pub const UPSTREAM_FILTER_NAME: &str = "llm-filter-upstream";

/// The answer to a request whose hook panicked: Envoy keeps serving, the client gets a 500 in
/// OpenAI's error shape.
const INTERNAL_ERROR_BODY: &str = r#"{"error":{"message":"The gateway failed while handling this request.","type":"server_error","code":"internal_error"}}"#;

/// The Envoy filter state key prefix (the wasm build's, which Envoy adds to `set_property`).
const FILTER_STATE_PREFIX: &str = crate::limits::ENVOY_STATE_PREFIX;

/// The `dynamic_module_config.metrics_namespace` the native configs set: the metric families'
/// names then read as the wasm build's (`llm.requests_total`).
pub const METRICS_NAMESPACE: &str = "llm";
const METRICS_NAMESPACE_DOT: &str = "llm.";

/// Filter state Envoy reads only after the stream (access log, the rate limit filter's debit):
/// kept until the stream completes, so a later value can replace an earlier one.
const AT_COMPLETION: [&str; 8] = [
    "llm.rule",
    "llm.model",
    "llm.attempts",
    "llm.response_model",
    "llm.prompt_tokens",
    "llm.completion_tokens",
    "llm.total_tokens",
    crate::limits::DEBIT_STATE,
];

/// The compiled configuration, shared by every worker thread.
pub struct NativeConfig {
    shared: Arc<Shared>,
    worker: Arc<Worker>,
    /// Metric ids by `Metric::index` (the same ids `Shared` was given).
    metrics: [Option<MetricId>; Metric::ALL.len()],
    /// The hold watch's timer (`settings.forwardAfterBody` only).
    timer: Option<Arc<HoldTimer>>,
}

impl Drop for NativeConfig {
    fn drop(&mut self) {
        if let Some(timer) = &self.timer {
            timer.stop.store(true, Ordering::Relaxed);
        }
    }
}

/// The timer of the hold watch (`hold`): a thread per configuration ticks `Worker::tick` at
/// `Shared::hold_tick_period`, and each held stream due for a verdict is judged on its own
/// worker thread, through its scheduler (`Module::scheduled`).
#[derive(Default)]
struct HoldTimer {
    /// The scheduler of each stream whose headers were held, by stream id, until the stream
    /// is destroyed.
    schedulers: Mutex<HashMap<u64, Scheduler>>,
    /// What `Worker::tick` said about each stream whose event is on its way.
    due: Mutex<HashMap<u64, Held>>,
    stop: AtomicBool,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing panics while holding these locks; a poisoned one still holds consistent data.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl HoldTimer {
    fn start(worker: Arc<Worker>, period: std::time::Duration) -> Option<Arc<HoldTimer>> {
        let timer = Arc::new(HoldTimer::default());
        let ticking = Arc::clone(&timer);
        let spawned = std::thread::Builder::new()
            .name("llm-filter-hold".into())
            .spawn(move || {
                while !ticking.stop.load(Ordering::Relaxed) {
                    std::thread::sleep(period);
                    ticking.tick(&worker);
                }
            });
        match spawned {
            Ok(_) => Some(timer),
            Err(e) => {
                log::warn!("llm-filter: cannot start the hold timer: {e}");
                None
            }
        }
    }

    fn tick(&self, worker: &Worker) {
        let held = worker.tick();
        if held.is_empty() {
            return;
        }
        let schedulers = lock(&self.schedulers);
        for (id, held) in held {
            match schedulers.get(&id) {
                Some(scheduler) => {
                    lock(&self.due).insert(id, held);
                    scheduler.commit(id);
                }
                None => worker.forget(id),
            }
        }
    }
}

/// One HTTP stream: the core's state machine and what the host keeps for it.
pub struct NativeStream {
    id: u64,
    core: Core,
    state: StreamState,
    shared: Arc<Shared>,
    worker: Arc<Worker>,
    timer: Option<Arc<HoldTimer>>,
}

impl Drop for NativeStream {
    fn drop(&mut self) {
        if let Some(timer) = &self.timer {
            // The scheduler is deleted here, on the stream's worker thread, under the lock the
            // timer commits under.
            let scheduler = lock(&timer.schedulers).remove(&self.id);
            drop(scheduler);
            lock(&timer.due).remove(&self.id);
            self.worker.forget(self.id);
        }
    }
}

enum Core {
    Downstream(Stream),
    Upstream(AttemptStream),
}

/// Per-stream host state.
struct StreamState {
    metrics: [Option<MetricId>; Metric::ALL.len()],
    /// Filter state names already written to Envoy (which refuses a second write).
    written: Vec<String>,
    /// Values for `AT_COMPLETION` names, written when the stream completes: at most one per
    /// name (a later value replaces an earlier one), so at most `AT_COMPLETION.len()` entries.
    pending: Vec<(&'static str, Vec<u8>)>,
    /// Inside a request body hook (the chunk just delivered is readable).
    in_body_hook: bool,
}

/// The host for one hook of one stream.
struct NativeHost<'f, 'a> {
    filter: &'f mut Filter<'a>,
    state: &'f mut StreamState,
}

/// The Envoy filter state key of `name` (a few of these on every request: no `format!`).
fn state_key(name: &str) -> String {
    let mut key = String::with_capacity(FILTER_STATE_PREFIX.len() + name.len());
    key.push_str(FILTER_STATE_PREFIX);
    key.push_str(name);
    key
}

fn host_error(what: &str) -> HostError {
    HostError(format!("Envoy refused to {what}"))
}

impl NativeHost<'_, '_> {
    fn owned_headers(&self, map: HeaderMap) -> Headers {
        self.filter
            .headers(map)
            .into_iter()
            .map(|(k, v)| (String::from_utf8_lossy(k).into_owned(), v.to_vec()))
            .collect()
    }

    /// The request body as Envoy holds it: what it buffered, then the chunk of this body hook;
    /// or only that chunk when it is the buffered body itself (Envoy delivers a body that was
    /// buffered before this filter, such as a retry's, in one piece).
    fn request_body_chunks(&self) -> Vec<&[u8]> {
        if self.state.in_body_hook && self.filter.received_is_buffered() {
            return self.filter.body_chunks(Body::ReceivedRequest);
        }
        let mut chunks = self.filter.body_chunks(Body::BufferedRequest);
        if self.state.in_body_hook {
            chunks.extend(self.filter.body_chunks(Body::ReceivedRequest));
        }
        chunks
    }

    fn write_filter_state(&mut self, name: &str, value: &[u8]) -> Result<(), HostError> {
        if self.state.written.iter().any(|n| n == name) {
            // Read-only once set: the first value (the one Envoy routed on) stays.
            return Err(HostError(format!(
                "filter state {FILTER_STATE_PREFIX}{name} is already set for this stream"
            )));
        }
        let key = state_key(name);
        if !self.filter.set_filter_state(&key, value) {
            return Err(host_error(&format!("set filter state {key}")));
        }
        self.state.written.push(name.to_string());
        Ok(())
    }

    /// Writes the values kept for the end of the stream.
    fn flush_filter_state(&mut self) {
        let pending = std::mem::take(&mut self.state.pending);
        for (name, value) in pending {
            if let Err(e) = self.write_filter_state(name, &value) {
                log::debug!("llm-filter: {e}");
            }
        }
    }
}

impl Host for NativeHost<'_, '_> {
    const FILTER_STATE_PREFIX: &'static str = FILTER_STATE_PREFIX;

    fn request_header(&mut self, name: &str) -> Option<Vec<u8>> {
        self.filter
            .header(HeaderMap::Request, name)
            .map(<[u8]>::to_vec)
    }

    fn request_headers(&mut self) -> Result<Headers, HostError> {
        Ok(self.owned_headers(HeaderMap::Request))
    }

    fn set_request_header(&mut self, name: &str, value: Option<&[u8]>) -> Result<(), HostError> {
        if self.filter.set_header(HeaderMap::Request, name, value) {
            Ok(())
        } else {
            Err(host_error(&format!("set request header {name}")))
        }
    }

    fn set_request_headers(&mut self, headers: &[(String, Vec<u8>)]) -> Result<(), HostError> {
        let current: Vec<String> = self
            .filter
            .headers(HeaderMap::Request)
            .into_iter()
            .map(|(k, _)| String::from_utf8_lossy(k).into_owned())
            .collect();
        for name in &current {
            if !headers.iter().any(|(k, _)| k == name) {
                self.set_request_header(name, None)?;
            }
        }
        let mut done: Vec<&str> = Vec::new();
        for (name, value) in headers {
            if done.contains(&name.as_str()) {
                if !self.filter.add_header(HeaderMap::Request, name, value) {
                    return Err(host_error(&format!("add request header {name}")));
                }
            } else {
                self.set_request_header(name, Some(value))?;
                done.push(name);
            }
        }
        Ok(())
    }

    fn request_body(&mut self, size: usize) -> Result<Vec<u8>, HostError> {
        let chunks = self.request_body_chunks();
        let total: usize = chunks.iter().map(|c| c.len()).sum();
        let mut body = Vec::with_capacity(total.min(size));
        for chunk in chunks {
            let room = size.saturating_sub(body.len());
            body.extend_from_slice(chunk.get(..room.min(chunk.len())).unwrap_or(chunk));
        }
        Ok(body)
    }

    fn set_request_body(&mut self, _current_len: usize, body: &[u8]) -> Result<(), HostError> {
        // Both parts may hold bytes of the body; each drain is a no-op on an empty one.
        let in_body_hook = self.state.in_body_hook;
        self.filter.drain_body(Body::BufferedRequest);
        if in_body_hook {
            self.filter.drain_body(Body::ReceivedRequest);
        }
        let into = if in_body_hook {
            Body::ReceivedRequest
        } else {
            Body::BufferedRequest
        };
        if self.filter.append_body(into, body) {
            Ok(())
        } else {
            Err(host_error("replace the request body"))
        }
    }

    fn response_header(&mut self, name: &str) -> Option<Vec<u8>> {
        self.filter
            .header(HeaderMap::Response, name)
            .map(<[u8]>::to_vec)
    }

    fn response_headers(&mut self) -> Result<Headers, HostError> {
        Ok(self.owned_headers(HeaderMap::Response))
    }

    fn set_response_header(&mut self, name: &str, value: Option<&[u8]>) -> Result<(), HostError> {
        if self.filter.set_header(HeaderMap::Response, name, value) {
            Ok(())
        } else {
            Err(host_error(&format!("set response header {name}")))
        }
    }

    fn read_response_body(&mut self, _size: usize, sink: &mut dyn FnMut(&[u8])) {
        for chunk in self.filter.body_chunks(Body::ReceivedResponse) {
            sink(chunk);
        }
    }

    fn set_filter_state(&mut self, name: &str, value: &[u8]) -> Result<(), HostError> {
        if let Some(late) = AT_COMPLETION.iter().find(|n| **n == name) {
            match self.state.pending.iter_mut().find(|(n, _)| n == late) {
                Some((_, kept)) => *kept = value.to_vec(),
                None => {
                    // One allocation for the stream's few values.
                    if self.state.pending.capacity() == 0 {
                        self.state.pending.reserve_exact(AT_COMPLETION.len());
                    }
                    self.state.pending.push((late, value.to_vec()));
                }
            }
            return Ok(());
        }
        self.write_filter_state(name, value)
    }

    fn filter_state(&mut self, name: &str) -> Option<Vec<u8>> {
        self.filter
            .filter_state(&state_key(name))
            .map(<[u8]>::to_vec)
    }

    fn request_total_size(&mut self) -> Option<u64> {
        self.filter.attribute_int(Attribute::RequestTotalSize)
    }

    fn response_code_details(&mut self) -> Option<Vec<u8>> {
        self.filter
            .attribute_string(Attribute::ResponseCodeDetails)
            .map(<[u8]>::to_vec)
    }

    fn upstream_provider(&mut self) -> Option<Vec<u8>> {
        self.filter
            .host_metadata(metadata::NAMESPACE, metadata::PROVIDER_KEY)
            .map(<[u8]>::to_vec)
    }

    fn attempt_count(&mut self) -> u64 {
        self.filter
            .attribute_int(Attribute::UpstreamRequestAttemptCount)
            .unwrap_or(1)
    }

    fn send_local_reply(
        &mut self,
        status: u32,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<(), HostError> {
        self.filter
            .send_response(status, headers, body, "llm_filter");
        Ok(())
    }

    fn now(&mut self) -> Option<SystemTime> {
        Some(SystemTime::now())
    }

    fn record_metric(
        &mut self,
        metric: Metric,
        _id: u32,
        series: &Series,
        class: Option<&'static str>,
        value: u64,
    ) {
        let Some(Some(id)) = self.state.metrics.get(metric.index()) else {
            return;
        };
        let provider = label_value(&series.provider);
        let model = label_value(&series.model);
        let rule = label_value(&series.rule);
        let labels = [&*provider, &*model, &*rule, class.unwrap_or_default()];
        let count = if class.is_some() { 4 } else { 3 }.min(metric.labels().len());
        if !self.filter.record(
            *id,
            metric.is_histogram(),
            labels.get(..count).unwrap_or(&labels),
            value,
        ) {
            log::debug!("llm-filter: cannot record {}", metric.name());
        }
    }

    fn clear_route_cache(&mut self) {
        self.filter.clear_route_cache();
    }
}

/// Defines the metric families on Envoy's filter config.
struct NativeConfigHost<'c, 'a> {
    config: &'c abi::Config<'a>,
    ids: [Option<MetricId>; Metric::ALL.len()],
}

impl ConfigHost for NativeConfigHost<'_, '_> {
    fn define_metric(&mut self, metric: Metric) -> Option<u32> {
        // Envoy puts the family under the filter's `metrics_namespace` (`llm`, as the shipped
        // configs set it): `llm.requests_total`, `envoy_llm_requests_total` in Prometheus.
        let name = metric.name();
        let name = name.strip_prefix(METRICS_NAMESPACE_DOT).unwrap_or(name);
        let id = self
            .config
            .define_metric(name, metric.labels(), metric.is_histogram());
        if id.is_none() {
            log::warn!("llm-filter: cannot define metric {}", metric.name());
        }
        let slot = self.ids.get_mut(metric.index())?;
        *slot = id;
        id.map(|_| u32::try_from(metric.index()).unwrap_or(u32::MAX))
    }
}

/// The `log` crate's lines (the core's) go to Envoy's `dynamic_modules` logger at its level.
struct EnvoyLogger;

fn level(level: log::Level) -> LogLevel {
    match level {
        log::Level::Error => LogLevel::Error,
        log::Level::Warn => LogLevel::Warn,
        log::Level::Info => LogLevel::Info,
        log::Level::Debug => LogLevel::Debug,
        log::Level::Trace => LogLevel::Trace,
    }
}

impl log::Log for EnvoyLogger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        abi::log_enabled(level(metadata.level()))
    }

    fn log(&self, record: &log::Record<'_>) {
        let level = level(record.level());
        if abi::log_enabled(level) {
            abi::log(level, &record.args().to_string());
        }
    }

    fn flush(&self) {}
}

static LOGGER: EnvoyLogger = EnvoyLogger;

fn install_logger() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if log::set_logger(&LOGGER).is_ok() {
            log::set_max_level(log::LevelFilter::Trace);
        }
    });
}

/// Stream ids for log lines and the hold watch: unique in the process.
static NEXT_STREAM: AtomicU64 = AtomicU64::new(1);

/// A seed for the weighted choice: std's per-process random hasher keys and the clock.
fn seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    if let Ok(since) = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH) {
        hasher.write_u128(since.as_nanos());
    }
    hasher.finish()
}

fn headers_status(flow: Flow) -> HeadersStatus {
    match flow {
        Flow::Continue => HeadersStatus::Continue,
        Flow::Stop => HeadersStatus::StopIteration,
    }
}

fn body_status(flow: Flow) -> BodyStatus {
    match flow {
        Flow::Continue => BodyStatus::Continue,
        Flow::Stop => BodyStatus::StopIterationAndBuffer,
    }
}

fn trailers_status(flow: Flow) -> TrailersStatus {
    match flow {
        Flow::Continue => TrailersStatus::Continue,
        Flow::Stop => TrailersStatus::StopIteration,
    }
}

impl NativeStream {
    fn host<'f, 'a>(state: &'f mut StreamState, filter: &'f mut Filter<'a>) -> NativeHost<'f, 'a> {
        NativeHost { filter, state }
    }
}

impl Module for LlmModule {
    type Config = NativeConfig;
    type Stream = NativeStream;

    fn config_new(config: &abi::Config<'_>, name: &[u8], text: &[u8]) -> Option<NativeConfig> {
        install_logger();
        let upstream = name == UPSTREAM_FILTER_NAME.as_bytes();
        let mut host = NativeConfigHost {
            config,
            ids: [None; Metric::ALL.len()],
        };
        let shared = Shared::configure(text, upstream, &mut host)?;
        log::info!(
            "llm-filter {} loaded as an Envoy dynamic module",
            env!("CARGO_PKG_VERSION")
        );
        let worker = Arc::new(Worker::new(seed()));
        let timer = shared
            .hold_tick_period()
            .and_then(|period| HoldTimer::start(Arc::clone(&worker), period));
        Some(NativeConfig {
            shared: Arc::new(shared),
            worker,
            metrics: host.ids,
            timer,
        })
    }

    fn stream_new(config: &NativeConfig) -> NativeStream {
        let id = NEXT_STREAM.fetch_add(1, Ordering::Relaxed);
        let shared = Arc::clone(&config.shared);
        let core = if shared.upstream() {
            Core::Upstream(AttemptStream::new(id, Arc::clone(&shared)))
        } else {
            Core::Downstream(Stream::new(
                id,
                Arc::clone(&shared),
                Arc::clone(&config.worker),
            ))
        };
        NativeStream {
            id,
            core,
            shared,
            worker: Arc::clone(&config.worker),
            timer: config.timer.clone(),
            state: StreamState {
                metrics: config.metrics,
                written: Vec::new(),
                pending: Vec::new(),
                in_body_hook: false,
            },
        }
    }

    fn request_headers(s: &mut NativeStream, f: &mut Filter<'_>, end: bool) -> HeadersStatus {
        test_panic(f);
        let mut host = NativeStream::host(&mut s.state, f);
        let flow = match &mut s.core {
            Core::Downstream(stream) => stream.on_request_headers(&mut host, end),
            Core::Upstream(attempt) => attempt.on_request_headers(&mut host),
        };
        if let (Flow::Stop, Some(timer), Core::Downstream(_)) = (flow, &s.timer, &s.core) {
            // Held headers (or a local reply, which never becomes due): the timer may have to
            // answer this stream.
            if let Some(scheduler) = f.scheduler() {
                lock(&timer.schedulers).insert(s.id, scheduler);
            }
        }
        headers_status(flow)
    }

    fn request_body(s: &mut NativeStream, f: &mut Filter<'_>, end: bool) -> BodyStatus {
        let size = if f.received_is_buffered() {
            f.body_size(Body::ReceivedRequest)
        } else {
            f.body_size(Body::BufferedRequest) + f.body_size(Body::ReceivedRequest)
        };
        s.state.in_body_hook = true;
        let mut host = NativeStream::host(&mut s.state, f);
        let flow = match &mut s.core {
            Core::Downstream(stream) => stream.on_request_body(&mut host, size, end),
            Core::Upstream(attempt) => attempt.on_request_body(&mut host, size, end),
        };
        s.state.in_body_hook = false;
        body_status(flow)
    }

    fn request_trailers(s: &mut NativeStream, f: &mut Filter<'_>) -> TrailersStatus {
        let mut host = NativeStream::host(&mut s.state, f);
        trailers_status(match &mut s.core {
            Core::Downstream(stream) => stream.on_request_trailers(&mut host),
            Core::Upstream(_) => Flow::Continue,
        })
    }

    fn response_headers(s: &mut NativeStream, f: &mut Filter<'_>, end: bool) -> HeadersStatus {
        let mut host = NativeStream::host(&mut s.state, f);
        headers_status(match &mut s.core {
            Core::Downstream(stream) => stream.on_response_headers(&mut host, end),
            Core::Upstream(attempt) => attempt.on_response_headers(&mut host),
        })
    }

    fn response_body(s: &mut NativeStream, f: &mut Filter<'_>, end: bool) -> BodyStatus {
        let size = f.body_size(Body::ReceivedResponse);
        let mut host = NativeStream::host(&mut s.state, f);
        body_status(match &mut s.core {
            Core::Downstream(stream) => stream.on_response_body(&mut host, size, end),
            Core::Upstream(_) => Flow::Continue,
        })
    }

    fn stream_complete(s: &mut NativeStream, f: &mut Filter<'_>) {
        let mut host = NativeStream::host(&mut s.state, f);
        if let Core::Downstream(stream) = &mut s.core {
            stream.on_log(&mut host);
        }
        host.flush_filter_state();
    }

    fn scheduled(s: &mut NativeStream, f: &mut Filter<'_>, event: u64) {
        let Some(timer) = &s.timer else {
            return;
        };
        let Some(held) = lock(&timer.due).remove(&event) else {
            return;
        };
        let mut host = NativeStream::host(&mut s.state, f);
        s.worker.judge_held(&s.shared, s.id, held, &mut host);
    }

    fn panicked(f: &mut Filter<'_>, hook: &str) {
        log::error!("llm-filter: panic in the {hook} hook: the request gets a 500");
        f.send_response(
            500,
            &[("content-type", "application/json")],
            INTERNAL_ERROR_BODY.as_bytes(),
            "llm_filter_panic",
        );
    }
}

/// The request header that makes the filter panic, in builds with the `native-test-panic`
/// feature only (tests/native.rs checks that a panic answers 500 and Envoy keeps serving).
#[cfg(feature = "native-test-panic")]
const TEST_PANIC_HEADER: &str = "x-llm-filter-test-panic";

#[cfg(feature = "native-test-panic")]
#[allow(clippy::panic)]
fn test_panic(f: &Filter<'_>) {
    if f.header(HeaderMap::Request, TEST_PANIC_HEADER).is_some() {
        panic!("{TEST_PANIC_HEADER} asked for a panic");
    }
}

#[cfg(not(feature = "native-test-panic"))]
fn test_panic(_: &Filter<'_>) {}
