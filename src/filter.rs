//! The only module that talks to proxy-wasm: it turns host callbacks into calls on `Policy` and
//! `rewrite`, and their results back into host calls and `Action`s. It decides nothing itself.
//!
//! Host calls per request (each one crosses into Envoy): a request for another host costs one
//! (read `:authority`). An LLM request reads `:authority` and then all headers, reads the body,
//! writes only the headers that change (about four small calls) and the body, and stores three
//! filter-state values; its answer costs a header read, a body read per chunk, four filter-state
//! values and up to four metric updates.

use std::cell::{Cell, RefCell};
use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use log::{debug, error, info, warn};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType, MetricType};

use crate::balancer::SplitMix64;
use crate::config::{FALLBACK_HEADER, PROVIDER_STATE};
use crate::error::RequestError;
use crate::hold::{header_bytes, held_verdict, hold_timer, ticks_per_minute, Held, HeldVerdict};
use crate::limits;
use crate::metadata;
use crate::metrics::{series, status_class, Metric};
use crate::policy::{self, Decision, Policy, ProviderCall};
use crate::rewrite::{header_changes, rewrite_headers, ChatRequest};
use crate::usage::{Report, ResponseObserver};

const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The root id of the filter's upstream part (`render envoy` configures it on each fallback's
/// aggregate cluster); any other root id is the downstream filter.
const UPSTREAM_ROOT_ID: &str = "llm-filter-upstream";
/// Response headers by which the upstream part tells the downstream part which provider
/// answered and on which attempt; the downstream part records and removes them.
const ANSWERED_BY: &str = "x-llm-answered-by";
const ATTEMPT: &str = "x-llm-attempt";

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    std::panic::set_hook(Box::new(|info| {
        // A panic aborts the VM; say where, at the highest level. (Clippy denies panics in our
        // code; this catches the ones from dependencies.)
        error!("llm-filter: panic: {info}");
    }));
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(LlmRoot::default()) });
}}

struct LlmRoot {
    policy: Option<Rc<Policy>>,
    /// Runs as the upstream filter of a fallback's aggregate cluster (root id
    /// `llm-filter-upstream`): rewrites each attempt for its provider.
    upstream: bool,
    rng: Rc<RefCell<SplitMix64>>,
    metrics: Rc<Metrics>,
    waiting: Rc<Waiting>,
}

/// Requests whose headers the filter holds and for which Envoy has delivered no body yet,
/// watched by the root's timer (see `hold` for what it decides).
#[derive(Default)]
struct Waiting {
    /// Timer ticks since the configuration was loaded.
    ticks: Cell<u64>,
    /// Context id → the request while its headers wait.
    since: RefCell<HashMap<u32, Held>>,
    /// Tick of the last missing-setting error line (at most one a minute).
    warned_at: Cell<Option<u64>>,
}

impl Default for LlmRoot {
    fn default() -> Self {
        LlmRoot {
            policy: None,
            upstream: false,
            rng: Rc::new(RefCell::new(SplitMix64::new(0))),
            metrics: Rc::new(Metrics::default()),
            waiting: Rc::new(Waiting::default()),
        }
    }
}

/// Metric ids, found per request with one map lookup: each (provider call, model) gets a
/// `SeriesSet` the first time it is seen, and each series in it is defined in Envoy on first use.
#[derive(Default)]
struct Metrics {
    /// By the provider call's address. The entry keeps the call alive, so the address cannot be
    /// reused by another call (after a configuration change) while the entry exists.
    by_call: RefCell<HashMap<usize, CallSeries>>,
    sets: Cell<usize>,
}

struct CallSeries {
    _call: Arc<ProviderCall>,
    by_model: HashMap<String, Rc<SeriesSet>>,
}

/// Distinct (provider, model, rule) combinations beyond this count are folded into
/// `model="other"`: a client choosing the model must not be able to grow Envoy's stats without
/// bound (each combination has up to 10 series).
const MAX_SERIES_SETS: usize = 200;

/// The series of one (provider, model, rule): their ids once defined.
struct SeriesSet {
    provider: String,
    model: String,
    rule: String,
    ids: RefCell<Vec<(Metric, Option<&'static str>, u32)>>,
}

impl Metrics {
    fn set_for(&self, call: &Arc<ProviderCall>, model: &str) -> Rc<SeriesSet> {
        let mut by_call = self.by_call.borrow_mut();
        let entry = by_call
            .entry(Arc::as_ptr(call) as usize)
            .or_insert_with(|| CallSeries {
                _call: Arc::clone(call),
                by_model: HashMap::new(),
            });
        if let Some(set) = entry.by_model.get(model) {
            return Rc::clone(set);
        }
        let model = if self.sets.get() >= MAX_SERIES_SETS {
            "other"
        } else {
            model
        };
        let set = entry.by_model.entry(model.to_string()).or_insert_with(|| {
            self.sets.set(self.sets.get() + 1);
            Rc::new(SeriesSet {
                provider: call.provider.clone(),
                model: model.to_string(),
                rule: call.rule.clone(),
                ids: RefCell::new(Vec::with_capacity(6)),
            })
        });
        Rc::clone(set)
    }
}

impl SeriesSet {
    fn id(&self, metric: Metric, class: Option<&'static str>) -> Option<u32> {
        if let Some((_, _, id)) = self
            .ids
            .borrow()
            .iter()
            .find(|(m, c, _)| *m == metric && *c == class)
        {
            return Some(*id);
        }
        let name = series(metric, &self.provider, &self.model, &self.rule, class);
        let kind = if metric.is_histogram() {
            MetricType::Histogram
        } else {
            MetricType::Counter
        };
        match hostcalls::define_metric(kind, &name) {
            Ok(id) => {
                self.ids.borrow_mut().push((metric, class, id));
                Some(id)
            }
            Err(status) => {
                warn!("llm-filter: cannot define metric {name}: {status:?}");
                None
            }
        }
    }

    fn add(&self, metric: Metric, class: Option<&'static str>, value: u64) {
        let Some(id) = self.id(metric, class) else {
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

fn now() -> Option<SystemTime> {
    hostcalls::get_current_time().ok()
}

fn millis_since(start: Option<SystemTime>) -> Option<u64> {
    let elapsed = now()?.duration_since(start?).ok()?;
    Some(u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX))
}

impl Context for LlmRoot {}

impl RootContext for LlmRoot {
    fn on_vm_start(&mut self, _: usize) -> bool {
        // Follow Envoy's log level so disabled levels cost no host call.
        if let Ok(level) = hostcalls::get_log_level() {
            proxy_wasm::set_log_level(level);
        }
        *self.rng.borrow_mut() = SplitMix64::new(seed());
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
        let Ok(text) = std::str::from_utf8(&bytes) else {
            error!("llm-filter: invalid configuration: not UTF-8 text");
            return false;
        };
        if text.trim().is_empty() {
            warn!("llm-filter: empty configuration: every request passes through untouched");
        }
        self.upstream = matches!(
            hostcalls::get_property(vec!["plugin_root_id"]),
            Ok(Some(id)) if id == UPSTREAM_ROOT_ID.as_bytes()
        );
        match Policy::from_text(text) {
            Ok(policy) => {
                if self.upstream {
                    info!("llm-filter: configuration accepted (upstream: per-attempt rewrites)");
                    self.policy = Some(Rc::new(policy));
                    return true;
                }
                info!("llm-filter: configuration accepted");
                if policy.routes_by_model() && !policy.forward_after_body {
                    error!(
                        "llm-filter: a route matches on the request's model, but the headers \
                         cannot wait for the body: set allow_on_headers_stop_iteration: true on \
                         the wasm filter and settings.forwardAfterBody: true (llm-filter render \
                         envoy sets both); such requests get a 500 until then"
                    );
                }
                if policy.forward_after_body {
                    let (period, _) = hold_timer(policy.hold_timeout_ms);
                    if let Err(status) = hostcalls::set_tick_period(period) {
                        warn!("llm-filter: cannot start the hold timer: {status:?}");
                    }
                }
                self.policy = Some(Rc::new(policy));
                true
            }
            Err(errors) => {
                for e in &errors.0 {
                    error!("llm-filter: invalid configuration: {e}");
                }
                false
            }
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        let policy = self.policy.clone()?;
        if self.upstream {
            return Some(Box::new(AttemptHttp {
                context_id,
                policy,
                call: None,
            }));
        }
        Some(Box::new(LlmHttp {
            context_id,
            policy,
            rng: Rc::clone(&self.rng),
            metrics: Rc::clone(&self.metrics),
            waiting: Rc::clone(&self.waiting),
            state: State::PassThrough,
            budget: None,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn on_tick(&mut self) {
        let Some(policy) = &self.policy else {
            return;
        };
        let (period, limit) = hold_timer(policy.hold_timeout_ms);
        let waiting = &self.waiting;
        let now = waiting.ticks.get() + 1;
        waiting.ticks.set(now);
        if waiting.since.borrow().is_empty() {
            return;
        }
        let held: Vec<(u32, Held)> = waiting
            .since
            .borrow()
            .iter()
            .filter(|(_, h)| now.saturating_sub(h.tick) >= 2)
            .map(|(id, h)| (*id, *h))
            .collect();
        for (id, held) in held {
            if hostcalls::set_effective_context(id).is_err() {
                waiting.since.borrow_mut().remove(&id);
                continue;
            }
            let received = request_total_size().map(|n| n.saturating_sub(held.header_bytes));
            let error = match held_verdict(held, now, limit, received) {
                HeldVerdict::Wait => continue,
                HeldVerdict::NotDelivered => {
                    let minute = ticks_per_minute(period);
                    let due = waiting
                        .warned_at
                        .get()
                        .is_none_or(|at| now.saturating_sub(at) >= minute);
                    if due {
                        waiting.warned_at.set(Some(now));
                        error!(
                            "llm-filter: Envoy received a request body but did not hand it to \
                             the filter while it held the headers (settings.forwardAfterBody): \
                             set allow_on_headers_stop_iteration: true on the wasm filter; such \
                             requests get a 500"
                        );
                    }
                    RequestError::BodyNotDelivered
                }
                HeldVerdict::TimedOut => {
                    debug!("#{id} llm-filter: no request body within the hold timeout");
                    RequestError::BodyTimeout
                }
            };
            waiting.since.borrow_mut().remove(&id);
            if let Err(status) = hostcalls::send_http_response(
                error.status(),
                vec![("content-type", "application/json")],
                Some(error.body().as_bytes()),
            ) {
                debug!("#{id} llm-filter: cannot answer a held request: {status:?}");
            }
        }
    }
}

/// Envoy's `request.total_size` for the current request: its headers' size plus the body
/// bytes received so far.
fn request_total_size() -> Option<u64> {
    let bytes = hostcalls::get_property(vec!["request", "total_size"]).ok()??;
    <[u8; 8]>::try_from(bytes.as_slice())
        .ok()
        .map(i64::from_le_bytes)
        .and_then(|n| u64::try_from(n).ok())
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

enum State {
    /// Not an LLM request, or answered locally.
    PassThrough,
    /// Waiting for the whole body.
    Buffering(Pending),
    /// Sent to the provider: the response is watched for model, usage and timing.
    Forwarded(Box<Upstream>),
}

type Headers = Vec<(String, Vec<u8>)>;

/// What a buffering request still needs.
enum Pending {
    /// Routed to `call`; the body is rewritten for it. `held`: the rewritten headers, not yet
    /// given back to Envoy (`settings.forwardAfterBody`); `None` when they already went on at
    /// header time.
    Routed {
        call: Arc<ProviderCall>,
        held: Option<HeldHeaders>,
    },
    /// A rule matches on the body's model: routed once the body is read. The headers wait.
    Unrouted { headers: Headers },
}

/// The request headers as Envoy has them and as they should go upstream.
struct HeldHeaders {
    before: Headers,
    after: Headers,
}

/// Turns Envoy's request headers from `before` into `after`: one small host call per changed
/// header (usually `:path`, `:authority`, `authorization`, `content-length`), or the whole map
/// when a name repeats. Logs (never fails) if Envoy refuses.
fn write_request_headers(context_id: u32, before: &Headers, after: &Headers) {
    let result = match header_changes(before, after) {
        Some(changes) => changes.into_iter().try_for_each(|(name, value)| {
            hostcalls::set_map_value_bytes(MapType::HttpRequestHeaders, name, value)
        }),
        None => {
            let pairs: Vec<(&str, &[u8])> = after
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_slice()))
                .collect();
            hostcalls::set_map_bytes(MapType::HttpRequestHeaders, pairs)
        }
    };
    if let Err(status) = result {
        error!("#{context_id} llm-filter: cannot set request headers: {status:?}");
    }
}

/// The client's headers rewritten for `call`. A call with fallback also gets the marker that
/// sends it to its rule's aggregate cluster (see `mark_fallback` for what the upstream part
/// reads). A marker the client sent is always dropped: it must not steer a request into
/// another rule's fallback.
fn headers_for(call: &ProviderCall, headers: &Headers) -> Headers {
    let mut after = headers.clone();
    rewrite_headers(call, &mut after);
    after.retain(|(k, _)| k != FALLBACK_HEADER);
    if let Some((key, _)) = call.fallback_parts() {
        after.push((FALLBACK_HEADER.to_string(), key.as_bytes().to_vec()));
    }
    after
}

/// Filter state `llm.provider`: the provider the request was rewritten for. Besides naming it
/// in the access log, it is what `render envoy`'s provider routes require (a route
/// `filter_state` match), so Envoy sends only requests this filter rewrote to a provider's
/// cluster, whatever their `:authority` says. Set before the headers go on: Envoy picks the
/// route then.
fn mark_routed(call: &ProviderCall) {
    set_filter_state(PROVIDER_STATE, call.provider.as_bytes());
}

/// Filter state `llm.fallback` for the upstream part: `<rule key> <chosen provider host>`,
/// then, once the body is known and its model was replaced, a line with the client's model
/// (`CLIENT_MODEL_LINE`). One host call per request: with held headers the first attempt
/// cannot start before the body is read, so both go together; without, the key is set at
/// header time and the client's model separately (`llm.client_model`) at body time.
fn mark_fallback(call: &ProviderCall, client_model: Option<&[u8]>) {
    let Some(marker) = &call.fallback else {
        return;
    };
    match client_model {
        Some(model) => {
            let mut value = Vec::with_capacity(marker.len() + 1 + model.len());
            value.extend_from_slice(marker.as_bytes());
            value.push(CLIENT_MODEL_LINE);
            value.extend_from_slice(model);
            set_filter_state("llm.fallback", &value);
        }
        None => set_filter_state("llm.fallback", marker.as_bytes()),
    }
}

/// Separates the client's model from the rule key and provider in `llm.fallback` (a model's
/// JSON text has no raw newline).
const CLIENT_MODEL_LINE: u8 = b'\n';

/// The answer of a request with fallback. When a later attempt answered, the upstream part
/// said which provider and on which attempt; when Envoy answered itself (5xx) after more than
/// one attempt, the last provider tried could not be reached (Envoy's attempt count says which
/// one); otherwise the first provider answered and nothing changes. Records `llm.provider` (the
/// provider that answered, or failed last) and `llm.attempts` (every provider tried, in order:
/// Envoy tries the aggregate cluster's providers in order), counts the answer for that
/// provider, and removes the internal headers.
fn record_attempts(policy: &Policy, upstream: &mut Upstream, key: &[u8], headers: &Headers) {
    let answered = policy::header(headers, ANSWERED_BY);
    let (call, attempt) = match answered {
        Some(host) => {
            let attempt = policy::header(headers, ATTEMPT)
                .and_then(|a| std::str::from_utf8(a).ok())
                .and_then(|a| a.parse::<usize>().ok())
                .unwrap_or(1);
            (policy.attempt_call(key, host), attempt)
        }
        None => {
            let failed = policy::header(headers, ":status").is_some_and(|s| s.starts_with(b"5"));
            if !failed {
                return;
            }
            let attempt = usize::try_from(attempt_count()).unwrap_or(usize::MAX);
            if attempt <= 1 {
                return;
            }
            (policy.attempt_at(key, &upstream.call, attempt), attempt)
        }
    };
    if let Some(call) = call {
        let tried = policy.attempt_order(key, &upstream.call);
        let mut attempts: Vec<&str> = tried
            .iter()
            .take(attempt.saturating_sub(1))
            .copied()
            .filter(|p| *p != call.provider)
            .collect();
        attempts.push(&call.provider);
        set_filter_state(PROVIDER_STATE, call.provider.as_bytes());
        set_filter_state("llm.attempts", attempts.join(",").as_bytes());
        if !Arc::ptr_eq(call, &upstream.call) {
            // Another provider answered: its configured model is the one it was sent (a
            // mapped or client-chosen model is not known here; the first one's is kept).
            if let Some(model) = call.model() {
                set_filter_state("llm.model", model.as_bytes());
                upstream.model = model;
            }
            upstream.call = Arc::clone(call);
            upstream.series = None;
        }
    }
    if answered.is_none() {
        return;
    }
    for name in [ANSWERED_BY, ATTEMPT] {
        if let Err(status) =
            hostcalls::set_map_value_bytes(MapType::HttpResponseHeaders, name, None)
        {
            debug!("llm-filter: cannot remove {name}: {status:?}");
        }
    }
}

/// The upstream part, once per attempt on a fallback's aggregate cluster: rewrites the
/// attempt's headers and body for the provider Envoy chose (named by the endpoint's metadata,
/// `filter_metadata.llm.provider`), whichever attempt it is.
struct AttemptHttp {
    context_id: u32,
    policy: Rc<Policy>,
    /// A later attempt's call and its provider's host (from the endpoint); `None` for the
    /// first attempt, which the downstream part has already rewritten.
    call: Option<Attempt>,
}

/// A later attempt: its provider's call and host, and the client's model if the downstream
/// part replaced it (`llm.fallback`'s second line; `None`: see `llm.client_model`).
struct Attempt {
    call: Arc<ProviderCall>,
    host: Vec<u8>,
    client_model: Option<Vec<u8>>,
}

impl AttemptHttp {
    /// The call for this attempt: the request's rule (filter state `llm.fallback`, set by the
    /// downstream part) and the endpoint's provider. `Ok(None)`: the attempt goes to the
    /// provider the downstream part chose and rewrote for (the first attempt). `Err`: why the
    /// attempt cannot be placed (no rule marked by the downstream part, an endpoint that does not
    /// name its provider, or names one that is not the rule's); it is refused, never sent with
    /// another provider's key, path and model.
    fn attempt_call(&self) -> Result<Option<Attempt>, String> {
        let marker = hostcalls::get_property(vec!["llm.fallback"])
            .ok()
            .flatten()
            .ok_or("the request reached a fallback cluster without the filter's mark")?;
        let (marker, client_model) = match marker.iter().position(|&b| b == CLIENT_MODEL_LINE) {
            Some(i) => (&marker[..i], Some(marker[i + 1..].to_vec())),
            None => (&marker[..], None),
        };
        let marker = std::str::from_utf8(marker).map_err(|_| "the filter's mark is not text")?;
        let (key, chosen) = policy::split_fallback(marker);
        let host = hostcalls::get_property(vec!["xds", "upstream_host_metadata"])
            .ok()
            .flatten()
            .and_then(|bytes| {
                metadata::filter_metadata_string(
                    &bytes,
                    metadata::NAMESPACE,
                    metadata::PROVIDER_KEY,
                )
                .map(<[u8]>::to_vec)
            })
            .ok_or_else(|| {
                format!(
                    "the endpoint chosen for rule {key:?} has no filter_metadata.llm.provider \
                     (each fallback provider's endpoint must name its provider host)"
                )
            })?;
        if host == chosen.as_bytes() {
            return Ok(None);
        }
        let call = self
            .policy
            .attempt_call(key.as_bytes(), &host)
            .ok_or_else(|| {
                format!(
                    "the endpoint names provider {:?}, which is not one of rule {key:?}'s",
                    String::from_utf8_lossy(&host)
                )
            })?;
        Ok(Some(Attempt {
            call: Arc::clone(call),
            host,
            client_model,
        }))
    }
}

impl Context for AttemptHttp {}

impl HttpContext for AttemptHttp {
    fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
        let attempt = match self.attempt_call() {
            Ok(Some(attempt)) => attempt,
            // The attempt goes where the downstream part rewrote it for (Envoy's route has
            // dropped the marker).
            Ok(None) => return Action::Continue,
            Err(reason) => {
                error!(
                    "#{} llm-filter: fallback attempt refused (503): {reason}",
                    self.context_id
                );
                let error = RequestError::AttemptProviderUnknown;
                if let Err(status) = hostcalls::send_http_response(
                    error.status(),
                    vec![("content-type", "application/json")],
                    Some(error.body().as_bytes()),
                ) {
                    error!(
                        "#{} llm-filter: cannot refuse the attempt: {status:?}",
                        self.context_id
                    );
                }
                return Action::Pause;
            }
        };
        match hostcalls::get_map_bytes(MapType::HttpRequestHeaders) {
            Ok(headers) => {
                let mut after = headers.clone();
                rewrite_headers(&attempt.call, &mut after);
                after.retain(|(k, _)| k != FALLBACK_HEADER);
                write_request_headers(self.context_id, &headers, &after);
            }
            Err(status) => error!(
                "#{} llm-filter: cannot read the attempt's headers: {status:?}",
                self.context_id
            ),
        }
        debug!(
            "#{} llm-filter: attempt to provider {}",
            self.context_id, attempt.call.provider
        );
        self.call = Some(attempt);
        Action::Continue
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let Some(attempt) = &self.call else {
            return Action::Continue;
        };
        if !end_of_stream {
            return Action::Pause;
        }
        let body = match hostcalls::get_buffer(BufferType::HttpRequestBody, 0, body_size) {
            Ok(body) => body.unwrap_or_default(),
            Err(status) => {
                error!(
                    "#{} llm-filter: cannot read the attempt's body: {status:?}",
                    self.context_id
                );
                return Action::Continue;
            }
        };
        // The body as the first provider got it, with the client's model back (the downstream
        // part stored it when it replaced it), then rewritten for this attempt's provider.
        let restored = client_model_restored(&body, attempt.client_model.as_deref());
        let body_now = restored.as_deref().unwrap_or(&body);
        // The downstream part has checked the body; a body that no longer parses goes as is.
        if let Ok(request) = ChatRequest::parse(body_now) {
            let rewritten = request.rewrite(&attempt.call, self.policy.request_stream_usage);
            if let Some(new_body) = rewritten.body.as_ref().or(restored.as_ref()) {
                if let Err(status) =
                    hostcalls::set_buffer(BufferType::HttpRequestBody, 0, body.len(), new_body)
                {
                    error!(
                        "#{} llm-filter: cannot replace the attempt's body: {status:?}",
                        self.context_id
                    );
                }
            }
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _: usize, _: bool) -> Action {
        let Some(Attempt { host, .. }) = &self.call else {
            return Action::Continue;
        };
        let attempt = attempt_count().to_string();
        for (name, value) in [
            (ANSWERED_BY, host.as_slice()),
            (ATTEMPT, attempt.as_bytes()),
        ] {
            if let Err(status) =
                hostcalls::set_map_value_bytes(MapType::HttpResponseHeaders, name, Some(value))
            {
                debug!("llm-filter: cannot set {name}: {status:?}");
            }
        }
        Action::Continue
    }
}

/// Envoy's count of attempts so far for this request (a u64, little-endian); 1 if unknown.
fn attempt_count() -> u64 {
    hostcalls::get_property(vec!["upstream", "request_attempt_count"])
        .ok()
        .flatten()
        .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
        .map_or(1, u64::from_le_bytes)
}

/// Filter state `llm.client_model` for a client that named no model (a model's JSON text
/// always starts with a quote).
const NO_CLIENT_MODEL: &[u8] = b"-";

/// `body` with `model` as the client sent it (its JSON text, or `NO_CLIENT_MODEL`), stored by
/// the downstream part when it replaced it: `carried` from `llm.fallback`, else filter state
/// `llm.client_model`; `None` when the client's model was kept.
fn client_model_restored(body: &[u8], carried: Option<&[u8]>) -> Option<Vec<u8>> {
    let model = match carried {
        Some(model) => model.to_vec(),
        None => hostcalls::get_property(vec!["llm.client_model"]).ok()??,
    };
    let model = (model != NO_CLIENT_MODEL).then_some(model);
    ChatRequest::parse(body).ok()?.with_model(model.as_deref())
}

/// A request on its way to a provider, and what its answer has shown so far.
struct Upstream {
    call: Arc<ProviderCall>,
    /// The model sent upstream, or `unknown`.
    model: String,
    sent_at: Option<SystemTime>,
    class: &'static str,
    observer: Option<ResponseObserver>,
    first_event_seen: bool,
    /// This request's metric series, looked up on first use.
    series: Option<Rc<SeriesSet>>,
}

impl Upstream {
    fn series(&mut self, metrics: &Metrics) -> Rc<SeriesSet> {
        let call = &self.call;
        let model = &self.model;
        Rc::clone(
            self.series
                .get_or_insert_with(|| metrics.set_for(call, model)),
        )
    }

    /// The answer is over (or the stream was cut): record what it reported. Returns the tokens
    /// it debits from token budgets.
    fn complete(&mut self, metrics: &Metrics) -> u64 {
        let series = self.series(metrics);
        series.add(Metric::Requests, Some(self.class), 1);
        if let Some(ms) = millis_since(self.sent_at) {
            series.add(Metric::UpstreamLatency, None, ms);
        }
        let report = self.observer.as_mut().and_then(ResponseObserver::finish);
        if let Some(report) = &report {
            record_report(report);
        }
        let debit = report.as_ref().map_or(0, |r| {
            limits::debit(r.total_tokens, r.prompt_tokens, r.completion_tokens)
        });
        match report {
            Some(report) if report.has_usage() => {
                for (metric, value) in [
                    (Metric::PromptTokens, report.prompt_tokens),
                    (Metric::CompletionTokens, report.completion_tokens),
                ] {
                    if let Some(value) = value {
                        series.add(metric, None, value);
                    }
                }
            }
            _ => series.add(Metric::UsageUnknown, None, 1),
        }
        debit
    }

    /// Streams: the first event is the first token.
    fn watch_first_event(&mut self, metrics: &Metrics) {
        let seen = self.observer.as_ref().map_or(0, ResponseObserver::events);
        if !self.first_event_seen && seen > 0 {
            self.first_event_seen = true;
            if let Some(ms) = millis_since(self.sent_at) {
                self.series(metrics).add(Metric::TimeToFirstToken, None, ms);
            }
        }
    }
}

struct LlmHttp {
    context_id: u32,
    policy: Rc<Policy>,
    rng: Rc<RefCell<SplitMix64>>,
    metrics: Rc<Metrics>,
    waiting: Rc<Waiting>,
    state: State,
    /// The request was put into its rule's budgets (`limits`): see `Budget`.
    budget: Option<Budget>,
}

/// A request counted by Envoy's rate limit filter: the call whose rule's limits it spends
/// from, and whether the tokens to debit (filter state `llm.debit`, which the rate limit
/// filter reads when the stream is done) still have to be written. Written exactly once per
/// request, 0 when the answer reported no usage or never came.
struct Budget {
    call: Arc<ProviderCall>,
    debit_pending: bool,
}

/// Puts the request into the budgets of `call`'s rule: one filter state value per limit, the
/// key header's value (see `crate::limits`). `None` when the rule has no limits.
fn mark_budget(call: &Arc<ProviderCall>, headers: &Headers) -> Option<Budget> {
    let limits = call.limits.as_ref()?;
    for (key, value) in limits.marks(headers) {
        set_filter_state(key, &value);
    }
    Some(Budget {
        call: Arc::clone(call),
        debit_pending: limits.counts_tokens,
    })
}

/// Response code details of the local replies of Envoy's rate limit filter: over a limit, and
/// the service unreachable with `failure_mode_deny`.
const RATE_LIMITED: &[u8] = b"request_rate_limited";
const RATE_LIMITER_ERROR: &[u8] = b"rate_limiter_error";

/// Stores one value as Envoy filter state `wasm.llm.<key>`, readable in access logs as
/// `%FILTER_STATE(wasm.llm.<key>:PLAIN)%`.
fn set_filter_state(key: &str, value: &[u8]) {
    if let Err(status) = hostcalls::set_property(vec![key], Some(value)) {
        debug!("llm-filter: cannot set {key}: {status:?}");
    }
}

fn record_report(report: &Report) {
    if let Some(model) = &report.model {
        set_filter_state("llm.response_model", model.as_bytes());
    }
    for (key, value) in [
        ("llm.prompt_tokens", report.prompt_tokens),
        ("llm.completion_tokens", report.completion_tokens),
        ("llm.total_tokens", report.total_tokens),
    ] {
        if let Some(value) = value {
            set_filter_state(key, value.to_string().as_bytes());
        }
    }
}

impl LlmHttp {
    fn reject(&mut self, error: RequestError) -> Action {
        debug!(
            "#{} llm-filter: {} {}",
            self.context_id,
            error.status(),
            error.code()
        );
        self.state = State::PassThrough;
        let body = error.body();
        let mut headers = vec![("content-type", "application/json")];
        headers.extend_from_slice(error.extra_headers());
        if let Err(status) =
            hostcalls::send_http_response(error.status(), headers, Some(body.as_bytes()))
        {
            error!(
                "#{} llm-filter: cannot send local reply: {status:?}",
                self.context_id
            );
        }
        Action::Pause
    }

    /// Rewrites the complete buffered body for the chosen provider; gives back held headers.
    fn finish_body(&mut self, pending: Pending, body_size: usize) -> Action {
        let body = match hostcalls::get_buffer(BufferType::HttpRequestBody, 0, body_size) {
            Ok(body) => body.unwrap_or_default(),
            Err(status) => {
                error!(
                    "#{} llm-filter: cannot read the request body: {status:?}",
                    self.context_id
                );
                return self.reject(RequestError::InvalidJson);
            }
        };
        let request = match ChatRequest::parse(&body) {
            Ok(request) => request,
            Err(error) => return self.reject(error),
        };
        let (call, held) = match pending {
            Pending::Routed { call, held } => (call, held),
            Pending::Unrouted { headers } => {
                let model = request.model();
                let decision = self.policy.decide_with_model(
                    &headers,
                    model.as_deref().map(str::as_bytes),
                    &mut *self.rng.borrow_mut(),
                );
                match decision {
                    Decision::Forward(call) => {
                        debug!(
                            "#{} llm-filter: by model {model:?}: provider {} rule {:?}",
                            self.context_id, call.provider, call.rule
                        );
                        let after = headers_for(&call, &headers);
                        let held = HeldHeaders {
                            before: headers,
                            after,
                        };
                        (call, Some(held))
                    }
                    Decision::Reject(error) => return self.reject(error),
                    _ => return self.reject(RequestError::RouteNotFound),
                }
            }
        };
        let rewritten = request.rewrite(&call, self.policy.request_stream_usage);
        let new_body = rewritten.body.as_ref();
        if call.fallback.is_some() {
            // A later attempt rewrites this body for its own provider: keep what the client
            // asked for (its modelMapping, or no configured model, means the client's model;
            // no model at all stays none).
            let client = (request.model() != rewritten.model)
                .then(|| request.model_json().unwrap_or(NO_CLIENT_MODEL));
            if held.is_some() {
                mark_fallback(&call, client);
            } else if let Some(client) = client {
                set_filter_state("llm.client_model", client);
            }
        }
        let routed_at_header_time = held.is_none();
        if let Some(held) = &held {
            self.budget = mark_budget(&call, &held.before);
        }
        if let Some(HeldHeaders { before, mut after }) = held {
            // The whole body is known: send its exact length, never a chunked framing.
            let length = new_body.map_or(body.len(), Vec::len);
            after.retain(|(k, _)| k != "transfer-encoding");
            after.push((
                "content-length".to_string(),
                length.to_string().into_bytes(),
            ));
            write_request_headers(self.context_id, &before, &after);
        }
        if let Some(new_body) = new_body {
            if let Err(status) =
                hostcalls::set_buffer(BufferType::HttpRequestBody, 0, body.len(), new_body)
            {
                error!(
                    "#{} llm-filter: cannot replace the body: {status:?}",
                    self.context_id
                );
            }
        }
        if !routed_at_header_time {
            mark_routed(&call);
        }
        if !call.rule.is_empty() {
            set_filter_state("llm.rule", call.rule.as_bytes());
        }
        if let Some(model) = &rewritten.model {
            set_filter_state("llm.model", model.as_bytes());
        }
        self.state = State::Forwarded(Box::new(Upstream {
            call,
            model: rewritten.model.unwrap_or_else(|| "unknown".to_string()),
            sent_at: now(),
            class: "unknown",
            observer: None,
            first_event_seen: false,
            series: None,
        }));
        Action::Continue
    }
}

impl LlmHttp {
    /// Writes the tokens to debit, once.
    fn settle_debit(&mut self, tokens: u64) {
        if let Some(budget) = self.budget.as_mut().filter(|b| b.debit_pending) {
            budget.debit_pending = false;
            set_filter_state(limits::DEBIT_STATE, tokens.to_string().as_bytes());
        }
    }

    /// A 429 or 503 for a request with a budget may be Envoy's rate limit filter answering
    /// instead of the provider (one property read, on those statuses only). Then nothing was
    /// sent upstream: a refusal is counted by rule, nothing is debited, and the answer is not
    /// the provider's.
    fn rate_limit_reply(&mut self, status: &[u8]) -> bool {
        if self.budget.is_none() || !matches!(status, b"429" | b"503") {
            return false;
        }
        let details = hostcalls::get_property(vec!["response", "code_details"])
            .ok()
            .flatten()
            .unwrap_or_default();
        let refused = details == RATE_LIMITED;
        if !refused && details != RATE_LIMITER_ERROR {
            return false;
        }
        let state = std::mem::replace(&mut self.state, State::PassThrough);
        if let Some(budget) = &self.budget {
            if refused {
                let model = match &state {
                    State::Forwarded(upstream) => upstream.model.clone(),
                    _ => budget.call.model().unwrap_or_else(|| "unknown".to_string()),
                };
                self.metrics
                    .set_for(&budget.call, &model)
                    .add(Metric::RateLimited, None, 1);
            }
            debug!(
                "#{} llm-filter: {} by the rate limit filter (rule {:?})",
                self.context_id,
                if refused { "refused" } else { "failed closed" },
                budget.call.rule
            );
        }
        self.settle_debit(0);
        true
    }

    /// The headers wait for the body: watched by the root's timer until a body arrives.
    fn hold(&self, headers: &Headers) {
        let held = Held {
            tick: self.waiting.ticks.get(),
            header_bytes: header_bytes(headers),
        };
        self.waiting
            .since
            .borrow_mut()
            .insert(self.context_id, held);
    }

    fn release(&self) {
        if !self.waiting.since.borrow().is_empty() {
            self.waiting.since.borrow_mut().remove(&self.context_id);
        }
    }

    fn take_buffered_and_finish(&mut self, body_size: usize) -> Action {
        match std::mem::replace(&mut self.state, State::PassThrough) {
            State::Buffering(pending) => self.finish_body(pending, body_size),
            other => {
                self.state = other;
                Action::Continue
            }
        }
    }
}

impl Context for LlmHttp {}

impl HttpContext for LlmHttp {
    fn on_http_request_headers(&mut self, _: usize, end_of_stream: bool) -> Action {
        // Most traffic of a sidecar is not for an LLM host: one small read decides that.
        match hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, ":authority") {
            Ok(Some(authority)) if self.policy.is_llm_host(&authority) => {}
            _ => return Action::Continue,
        }
        let headers = match hostcalls::get_map_bytes(MapType::HttpRequestHeaders) {
            Ok(headers) => headers,
            Err(status) => {
                error!(
                    "#{} llm-filter: cannot read request headers: {status:?}",
                    self.context_id
                );
                return Action::Continue;
            }
        };
        let decision = self.policy.decide(&headers, &mut *self.rng.borrow_mut());
        match decision {
            Decision::PassThrough => Action::Continue,
            Decision::Reject(error) => self.reject(error),
            Decision::Forward(_) if end_of_stream => self.reject(RequestError::EmptyBody),
            Decision::Forward(call) => {
                debug!(
                    "#{} llm-filter: provider {} rule {:?}",
                    self.context_id, call.provider, call.rule
                );
                let after = headers_for(&call, &headers);
                if self.policy.forward_after_body {
                    // Envoy's `allow_on_headers_stop_iteration` lets the body arrive while the
                    // headers wait; they go on, with the exact length, once the body is good.
                    let held = HeldHeaders {
                        before: headers,
                        after,
                    };
                    self.hold(&held.before);
                    self.state = State::Buffering(Pending::Routed {
                        call,
                        held: Some(held),
                    });
                    return Action::Pause;
                }
                write_request_headers(self.context_id, &headers, &after);
                // Envoy picks the route as soon as the headers go on, and a provider's route
                // requires this mark (see `mark_routed`); the first attempt may start before the
                // body is read. Envoy's rate limit filter runs next, before the body is read.
                mark_routed(&call);
                self.budget = mark_budget(&call, &headers);
                mark_fallback(&call, None);
                self.state = State::Buffering(Pending::Routed { call, held: None });
                Action::Continue
            }
            // The configuration's error line said so when it loaded.
            Decision::NeedsModel if !self.policy.forward_after_body => {
                self.reject(RequestError::ModelRoutingUnavailable)
            }
            Decision::NeedsModel if end_of_stream => self.reject(RequestError::EmptyBody),
            Decision::NeedsModel => {
                self.hold(&headers);
                self.state = State::Buffering(Pending::Unrouted { headers });
                Action::Pause
            }
            Decision::Models(list) => {
                self.state = State::PassThrough;
                if let Err(status) = hostcalls::send_http_response(
                    200,
                    vec![("content-type", "application/json")],
                    Some(list.as_bytes()),
                ) {
                    error!(
                        "#{} llm-filter: cannot send the model list: {status:?}",
                        self.context_id
                    );
                }
                Action::Pause
            }
        }
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if !matches!(self.state, State::Buffering(_)) {
            return Action::Continue;
        }
        self.release();
        if body_size as u64 > self.policy.max_request_body_bytes {
            return self.reject(RequestError::BodyTooLarge);
        }
        if !end_of_stream {
            return Action::Pause;
        }
        self.take_buffered_and_finish(body_size)
    }

    fn on_http_response_headers(&mut self, _: usize, end_of_stream: bool) -> Action {
        if !matches!(self.state, State::Forwarded(_)) {
            // Envoy's rate limit filter may refuse a request whose headers went on at header
            // time, before the body was read.
            if self.budget.is_some() {
                if let Ok(Some(status)) =
                    hostcalls::get_map_value_bytes(MapType::HttpResponseHeaders, ":status")
                {
                    self.rate_limit_reply(&status);
                }
            }
            return Action::Continue;
        }
        let headers = hostcalls::get_map_bytes(MapType::HttpResponseHeaders);
        if let Ok(headers) = &headers {
            let status = policy::header(headers, ":status").unwrap_or_default();
            if self.rate_limit_reply(status) {
                return Action::Continue;
            }
        }
        let State::Forwarded(upstream) = &mut self.state else {
            return Action::Continue;
        };
        match headers {
            Ok(headers) => {
                if let Some((key, _)) = upstream.call.fallback_parts() {
                    let key = key.to_string();
                    record_attempts(&self.policy, upstream, key.as_bytes(), &headers);
                }
                upstream.class =
                    policy::header(&headers, ":status").map_or("unknown", status_class);
                upstream.observer = Some(ResponseObserver::for_response(&headers));
            }
            Err(status) => debug!(
                "#{} llm-filter: cannot read response headers: {status:?}",
                self.context_id
            ),
        }
        if end_of_stream {
            let debit = upstream.complete(&self.metrics);
            self.state = State::PassThrough;
            self.settle_debit(debit);
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        // Every chunk is passed on as it comes (`Continue`); a copy is read on the side.
        let State::Forwarded(upstream) = &mut self.state else {
            return Action::Continue;
        };
        if body_size > 0 {
            if let Some(observer) = upstream.observer.as_mut() {
                if let Ok(Some(chunk)) =
                    hostcalls::get_buffer(BufferType::HttpResponseBody, 0, body_size)
                {
                    observer.feed(&chunk);
                }
            }
            upstream.watch_first_event(&self.metrics);
        }
        if end_of_stream {
            let debit = upstream.complete(&self.metrics);
            self.state = State::PassThrough;
            self.settle_debit(debit);
        }
        Action::Continue
    }

    fn on_log(&mut self) {
        self.release();
        // The answer was cut short (reset, timeout): count it with what was seen. Envoy's rate
        // limit filter reads the debit after this, when the stream is destroyed.
        let mut debit = 0;
        if let State::Forwarded(upstream) = &mut self.state {
            debit = upstream.complete(&self.metrics);
            self.state = State::PassThrough;
        }
        self.settle_debit(debit);
    }

    fn on_http_request_trailers(&mut self, _: usize) -> Action {
        // A body that ends with trailers never sees end_of_stream in the body callback.
        if !matches!(self.state, State::Buffering(_)) {
            return Action::Continue;
        }
        self.release();
        self.take_buffered_and_finish(usize::MAX)
    }
}
