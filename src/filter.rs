//! The only module that talks to proxy-wasm: it turns host callbacks into calls on the request
//! core (`stream`) and implements the core's `Host` with proxy-wasm host calls. It decides
//! nothing itself.
//!
//! Host calls per request (each one crosses into Envoy): a request for another host costs one
//! (read `:authority`). An LLM request reads `:authority` and then all headers, reads the body,
//! writes only the headers that change (about four small calls) and the body, and stores three
//! filter-state values; its answer costs a header read, a body read per chunk, four filter-state
//! values and up to four metric updates.

use std::cell::RefCell;
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use log::{debug, error, info, warn};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType, MetricType, Status};

use crate::host::{ConfigHost, Flow, Headers, Host, HostError};
use crate::metadata;
use crate::metrics::{Metric, Series};
use crate::stream::{AttemptStream, Shared, Stream, Worker};

const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The root id of the filter's upstream part (`render envoy` configures it on each fallback's
/// aggregate cluster); any other root id is the downstream filter.
const UPSTREAM_ROOT_ID: &str = "llm-filter-upstream";

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    std::panic::set_hook(Box::new(|info| {
        // A panic aborts the VM; say where, at the highest level. (Clippy denies panics in our
        // code; this catches the ones from dependencies.)
        error!("llm-filter: panic: {info}");
    }));
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(LlmRoot::default()) });
}}

/// Series ids defined in Envoy so far, by `Series::index`: each series is defined on first use
/// (proxy-wasm metrics have no labels: the labels are in the name).
type SeriesIds = RefCell<Vec<Vec<(Metric, Option<&'static str>, u32)>>>;

struct LlmRoot {
    shared: Option<Arc<Shared>>,
    worker: Arc<Worker>,
    ids: Rc<SeriesIds>,
}

impl Default for LlmRoot {
    fn default() -> Self {
        LlmRoot {
            shared: None,
            worker: Arc::new(Worker::new(0)),
            ids: Rc::new(RefCell::new(Vec::new())),
        }
    }
}

fn host_error(status: Status) -> HostError {
    HostError(format!("{status:?}"))
}

/// The `Host` of the current proxy-wasm context.
struct WasmHost<'a> {
    ids: &'a SeriesIds,
}

/// Metric families need no definition: each series is defined on first use.
struct WasmConfig;

impl ConfigHost for WasmConfig {
    fn define_metric(&mut self, metric: Metric) -> Option<u32> {
        u32::try_from(metric.index()).ok()
    }
}

impl WasmHost<'_> {
    fn series_id(
        &self,
        metric: Metric,
        series: &Series,
        class: Option<&'static str>,
    ) -> Option<u32> {
        let mut ids = self.ids.borrow_mut();
        if ids.len() <= series.index {
            ids.resize_with(series.index + 1, Vec::new);
        }
        let defined = ids.get_mut(series.index)?;
        if let Some((_, _, id)) = defined.iter().find(|(m, c, _)| *m == metric && *c == class) {
            return Some(*id);
        }
        let name =
            crate::metrics::series(metric, &series.provider, &series.model, &series.rule, class);
        let kind = if metric.is_histogram() {
            MetricType::Histogram
        } else {
            MetricType::Counter
        };
        match hostcalls::define_metric(kind, &name) {
            Ok(id) => {
                defined.push((metric, class, id));
                Some(id)
            }
            Err(status) => {
                warn!("llm-filter: cannot define metric {name}: {status:?}");
                None
            }
        }
    }
}

impl Host for WasmHost<'_> {
    const FILTER_STATE_PREFIX: &'static str = crate::limits::ENVOY_STATE_PREFIX;

    fn request_header(&mut self, name: &str) -> Option<Vec<u8>> {
        hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, name)
            .ok()
            .flatten()
    }

    fn request_headers(&mut self) -> Result<Headers, HostError> {
        hostcalls::get_map_bytes(MapType::HttpRequestHeaders).map_err(host_error)
    }

    fn set_request_header(&mut self, name: &str, value: Option<&[u8]>) -> Result<(), HostError> {
        hostcalls::set_map_value_bytes(MapType::HttpRequestHeaders, name, value).map_err(host_error)
    }

    fn set_request_headers(&mut self, headers: &[(String, Vec<u8>)]) -> Result<(), HostError> {
        let pairs: Vec<(&str, &[u8])> = headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_slice()))
            .collect();
        hostcalls::set_map_bytes(MapType::HttpRequestHeaders, pairs).map_err(host_error)
    }

    fn request_body(&mut self, size: usize) -> Result<Vec<u8>, HostError> {
        hostcalls::get_buffer(BufferType::HttpRequestBody, 0, size)
            .map(Option::unwrap_or_default)
            .map_err(host_error)
    }

    fn set_request_body(&mut self, current_len: usize, body: &[u8]) -> Result<(), HostError> {
        hostcalls::set_buffer(BufferType::HttpRequestBody, 0, current_len, body).map_err(host_error)
    }

    fn response_header(&mut self, name: &str) -> Option<Vec<u8>> {
        hostcalls::get_map_value_bytes(MapType::HttpResponseHeaders, name)
            .ok()
            .flatten()
    }

    fn response_headers(&mut self) -> Result<Headers, HostError> {
        hostcalls::get_map_bytes(MapType::HttpResponseHeaders).map_err(host_error)
    }

    fn set_response_header(&mut self, name: &str, value: Option<&[u8]>) -> Result<(), HostError> {
        hostcalls::set_map_value_bytes(MapType::HttpResponseHeaders, name, value)
            .map_err(host_error)
    }

    fn read_response_body(&mut self, size: usize, sink: &mut dyn FnMut(&[u8])) {
        if let Ok(Some(chunk)) = hostcalls::get_buffer(BufferType::HttpResponseBody, 0, size) {
            sink(&chunk);
        }
    }

    /// Envoy stores it as `wasm.<name>`.
    fn set_filter_state(&mut self, name: &str, value: &[u8]) -> Result<(), HostError> {
        hostcalls::set_property(vec![name], Some(value)).map_err(host_error)
    }

    fn filter_state(&mut self, name: &str) -> Option<Vec<u8>> {
        hostcalls::get_property(vec![name]).ok().flatten()
    }

    fn request_total_size(&mut self) -> Option<u64> {
        let bytes = hostcalls::get_property(vec!["request", "total_size"]).ok()??;
        <[u8; 8]>::try_from(bytes.as_slice())
            .ok()
            .map(i64::from_le_bytes)
            .and_then(|n| u64::try_from(n).ok())
    }

    fn response_code_details(&mut self) -> Option<Vec<u8>> {
        hostcalls::get_property(vec!["response", "code_details"])
            .ok()
            .flatten()
    }

    fn upstream_provider(&mut self) -> Option<Vec<u8>> {
        let bytes = hostcalls::get_property(vec!["xds", "upstream_host_metadata"]).ok()??;
        metadata::filter_metadata_string(&bytes, metadata::NAMESPACE, metadata::PROVIDER_KEY)
            .map(<[u8]>::to_vec)
    }

    fn attempt_count(&mut self) -> u64 {
        hostcalls::get_property(vec!["upstream", "request_attempt_count"])
            .ok()
            .flatten()
            .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
            .map_or(1, u64::from_le_bytes)
    }

    fn send_local_reply(
        &mut self,
        status: u32,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<(), HostError> {
        hostcalls::send_http_response(status, headers.to_vec(), Some(body)).map_err(host_error)
    }

    fn now(&mut self) -> Option<SystemTime> {
        hostcalls::get_current_time().ok()
    }

    fn record_metric(
        &mut self,
        metric: Metric,
        _id: u32,
        series: &Series,
        class: Option<&'static str>,
        value: u64,
    ) {
        let Some(id) = self.series_id(metric, series, class) else {
            return;
        };
        let result = if metric.is_histogram() {
            hostcalls::record_metric(id, value)
        } else {
            hostcalls::increment_metric(id, i64::try_from(value).unwrap_or(i64::MAX))
        };
        if let Err(status) = result {
            debug!("llm-filter: cannot update metric {id}: {status:?}");
        }
    }
}

fn action(flow: Flow) -> Action {
    match flow {
        Flow::Continue => Action::Continue,
        Flow::Stop => Action::Pause,
    }
}

impl Context for LlmRoot {}

impl RootContext for LlmRoot {
    fn on_vm_start(&mut self, _: usize) -> bool {
        // Follow Envoy's log level so disabled levels cost no host call.
        if let Ok(level) = hostcalls::get_log_level() {
            proxy_wasm::set_log_level(level);
        }
        self.worker.reseed(seed());
        info!("llm-filter {VERSION} started");
        true
    }

    fn on_configure(&mut self, _: usize) -> bool {
        let bytes = match hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX) {
            Ok(bytes) => bytes.unwrap_or_default(),
            Err(status) => {
                error!("llm-filter: cannot read the plugin configuration: {status:?}");
                return false;
            }
        };
        let upstream = matches!(
            hostcalls::get_property(vec!["plugin_root_id"]),
            Ok(Some(id)) if id == UPSTREAM_ROOT_ID.as_bytes()
        );
        let Some(shared) = Shared::configure(&bytes, upstream, &mut WasmConfig) else {
            return false;
        };
        if let Some(period) = shared.hold_tick_period() {
            if let Err(status) = hostcalls::set_tick_period(period) {
                warn!("llm-filter: cannot start the hold timer: {status:?}");
            }
        }
        self.shared = Some(Arc::new(shared));
        true
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        let shared = self.shared.clone()?;
        let id = u64::from(context_id);
        if shared.upstream() {
            return Some(Box::new(AttemptHttp {
                stream: AttemptStream::new(id, shared),
                ids: Rc::clone(&self.ids),
            }));
        }
        Some(Box::new(LlmHttp {
            stream: Stream::new(id, shared, Arc::clone(&self.worker)),
            ids: Rc::clone(&self.ids),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn on_tick(&mut self) {
        let Some(shared) = &self.shared else {
            return;
        };
        for (id, held) in self.worker.tick() {
            let context = u32::try_from(id).ok();
            if context.is_none_or(|c| hostcalls::set_effective_context(c).is_err()) {
                self.worker.forget(id);
                continue;
            }
            let mut host = WasmHost { ids: &self.ids };
            self.worker.judge_held(shared, id, held, &mut host);
        }
    }
}

/// A seed from the host's randomness (WASI `random_get`, through std's hasher keys) and clock.
fn seed() -> u64 {
    let mut hasher = RandomState::new().build_hasher();
    if let Ok(now) = hostcalls::get_current_time() {
        if let Ok(since) = now.duration_since(UNIX_EPOCH) {
            hasher.write_u128(since.as_nanos());
        }
    }
    hasher.finish()
}

/// The downstream filter: each callback goes to the core.
struct LlmHttp {
    stream: Stream,
    ids: Rc<SeriesIds>,
}

impl Context for LlmHttp {}

impl HttpContext for LlmHttp {
    fn on_http_request_headers(&mut self, _: usize, end_of_stream: bool) -> Action {
        let mut host = WasmHost { ids: &self.ids };
        action(self.stream.on_request_headers(&mut host, end_of_stream))
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let mut host = WasmHost { ids: &self.ids };
        action(
            self.stream
                .on_request_body(&mut host, body_size, end_of_stream),
        )
    }

    fn on_http_request_trailers(&mut self, _: usize) -> Action {
        let mut host = WasmHost { ids: &self.ids };
        action(self.stream.on_request_trailers(&mut host))
    }

    fn on_http_response_headers(&mut self, _: usize, end_of_stream: bool) -> Action {
        let mut host = WasmHost { ids: &self.ids };
        action(self.stream.on_response_headers(&mut host, end_of_stream))
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let mut host = WasmHost { ids: &self.ids };
        action(
            self.stream
                .on_response_body(&mut host, body_size, end_of_stream),
        )
    }

    fn on_log(&mut self) {
        let mut host = WasmHost { ids: &self.ids };
        self.stream.on_log(&mut host);
    }
}

/// The upstream part on a fallback's aggregate cluster.
struct AttemptHttp {
    stream: AttemptStream,
    ids: Rc<SeriesIds>,
}

impl Context for AttemptHttp {}

impl HttpContext for AttemptHttp {
    fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
        let mut host = WasmHost { ids: &self.ids };
        action(self.stream.on_request_headers(&mut host))
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let mut host = WasmHost { ids: &self.ids };
        action(
            self.stream
                .on_request_body(&mut host, body_size, end_of_stream),
        )
    }

    fn on_http_response_headers(&mut self, _: usize, _: bool) -> Action {
        let mut host = WasmHost { ids: &self.ids };
        action(self.stream.on_response_headers(&mut host))
    }
}
