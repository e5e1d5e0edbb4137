//! The request core: one HTTP stream's life in the filter, as plain Rust driven by a `Host`
//! (proxy-wasm in `filter`, or the native dynamic module). It holds and gives back headers,
//! buffers the body, decides (`Policy`), rewrites (`rewrite`), refuses with OpenAI-shaped
//! errors, routes by the body's model, answers `/v1/models`, marks fallback requests and
//! rewrites their later attempts, watches the answer (usage, first event, metrics, access-log
//! filter state) and settles token budgets.
//!
//! Three kinds of value:
//! - `Shared`: the compiled configuration and its metric ids. Immutable once built, `Send +
//!   Sync`: a host builds it once per configuration and shares it by `Arc` with every stream of
//!   every worker thread.
//! - `Worker`: what streams share that changes (the random source, the metric series seen, the
//!   requests whose headers wait for their body). Also `Send + Sync` (an atomic and two short
//!   mutexes, uncontended in proxy-wasm's single thread), shared by `Arc`; it outlives
//!   configurations (proxy-wasm keeps one per VM). A host may keep one per thread or one for all.
//! - `Stream` (downstream) and `AttemptStream` (the upstream part on a fallback's aggregate
//!   cluster, once per attempt): one per HTTP stream, called back as the request goes.
//!
//! Host operations per request: see `Host`; a request for another host costs one header read.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use log::{debug, error, info, warn};

use crate::balancer::SharedSplitMix64;
use crate::config::{FALLBACK_HEADER, PROVIDER_STATE};
use crate::error::RequestError;
use crate::hold::{header_bytes, held_verdict, hold_timer, ticks_per_minute, Held, HeldVerdict};
use crate::host::{ConfigHost, Flow, Headers, Host};
use crate::limits;
use crate::metrics::{status_class, Metric, Series};
use crate::policy::{self, Decision, Policy, ProviderCall};
use crate::rewrite::{header_changes, rewrite_headers, ChatRequest};
use crate::usage::{Report, ResponseObserver};

#[cfg(test)]
mod fake;
#[cfg(test)]
mod tests;

/// Response headers by which the upstream part tells the downstream part which provider
/// answered and on which attempt; the downstream part records and removes them.
pub const ANSWERED_BY: &str = "x-llm-answered-by";
pub const ATTEMPT: &str = "x-llm-attempt";

/// Distinct (provider, model, rule) combinations beyond this count are folded into
/// `model="other"`: a client choosing the model must not be able to grow Envoy's stats without
/// bound (each combination has up to 10 series).
const MAX_SERIES_SETS: usize = 200;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing here panics while holding a lock; a poisoned one still holds consistent data.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The compiled configuration, shared by every stream (see the module's docs).
pub struct Shared {
    pub policy: Policy,
    /// The upstream part of a fallback's aggregate cluster (`AttemptStream`s), not the
    /// downstream filter.
    upstream: bool,
    /// `ConfigHost::define_metric`'s id for each metric, by `Metric::index`.
    metric_ids: [Option<u32>; Metric::ALL.len()],
}

impl Shared {
    /// Compiles a plugin configuration; logs why it is refused (`None`). `upstream`: for the
    /// upstream part (proxy-wasm root id `llm-filter-upstream`).
    pub fn configure(text: &[u8], upstream: bool, host: &mut impl ConfigHost) -> Option<Shared> {
        let Ok(text) = std::str::from_utf8(text) else {
            error!("llm-filter: invalid configuration: not UTF-8 text");
            return None;
        };
        if text.trim().is_empty() {
            warn!("llm-filter: empty configuration: every request passes through untouched");
        }
        match Policy::from_text(text) {
            Ok(policy) => {
                if upstream {
                    info!("llm-filter: configuration accepted (upstream: per-attempt rewrites)");
                } else {
                    info!("llm-filter: configuration accepted");
                    if policy.routes_by_model() && !policy.forward_after_body {
                        error!(
                            "llm-filter: a route matches on the request's model, but the headers \
                             cannot wait for the body: set settings.forwardAfterBody: true and, \
                             for the wasm build, allow_on_headers_stop_iteration: true on its \
                             Envoy filter (llm-filter render envoy sets both); such requests get \
                             a 500 until then"
                        );
                    }
                }
                Some(Shared::new(policy, upstream, host))
            }
            Err(errors) => {
                for e in &errors.0 {
                    error!("llm-filter: invalid configuration: {e}");
                }
                None
            }
        }
    }

    /// An already compiled policy; defines its metrics.
    pub fn new(policy: Policy, upstream: bool, host: &mut impl ConfigHost) -> Shared {
        Shared {
            policy,
            upstream,
            metric_ids: Metric::ALL.map(|metric| host.define_metric(metric)),
        }
    }

    pub fn upstream(&self) -> bool {
        self.upstream
    }

    /// How often the host calls `Worker::tick` (and `Worker::judge_held`): only a downstream
    /// filter that holds headers (`settings.forwardAfterBody`) needs a timer.
    pub fn hold_tick_period(&self) -> Option<Duration> {
        (!self.upstream && self.policy.forward_after_body)
            .then(|| hold_timer(self.policy.hold_timeout_ms).0)
    }

    fn record<H: Host>(
        &self,
        host: &mut H,
        series: &Series,
        metric: Metric,
        class: Option<&'static str>,
        value: u64,
    ) {
        if let Some(Some(id)) = self.metric_ids.get(metric.index()) {
            host.record_metric(metric, *id, series, class, value);
        }
    }
}

/// What streams share that changes (see the module's docs).
#[derive(Default)]
pub struct Worker {
    rng: SharedSplitMix64,
    series: Mutex<SeriesSets>,
    waiting: Mutex<Waiting>,
}

/// Requests whose headers the filter holds and for which no body came yet, watched on the
/// host's timer (see `hold` for what it decides).
#[derive(Default)]
struct Waiting {
    /// Timer ticks so far.
    ticks: u64,
    /// Stream id → the request while its headers wait.
    since: HashMap<u64, Held>,
    /// Tick of the last missing-setting error line (at most one a minute).
    warned_at: Option<u64>,
}

/// Metric series, found per request with one map lookup: each (provider call, model) gets a
/// `Series` the first time it is seen.
#[derive(Default)]
struct SeriesSets {
    /// By the provider call's address. The entry keeps the call alive, so the address cannot be
    /// reused by another call (after a configuration change) while the entry exists.
    by_call: HashMap<usize, CallSeries>,
    count: usize,
}

struct CallSeries {
    _call: Arc<ProviderCall>,
    by_model: HashMap<String, Arc<Series>>,
}

impl Worker {
    /// `seed`: for the weighted choice among a rule's backends.
    pub fn new(seed: u64) -> Worker {
        Worker {
            rng: SharedSplitMix64::new(seed),
            ..Worker::default()
        }
    }

    pub fn reseed(&self, seed: u64) {
        self.rng.reseed(seed);
    }

    /// The labels of `call`'s answers for `model`.
    fn series_for(&self, call: &Arc<ProviderCall>, model: &str) -> Arc<Series> {
        let mut sets = lock(&self.series);
        let SeriesSets { by_call, count } = &mut *sets;
        let entry = by_call
            .entry(Arc::as_ptr(call) as usize)
            .or_insert_with(|| CallSeries {
                _call: Arc::clone(call),
                by_model: HashMap::new(),
            });
        if let Some(set) = entry.by_model.get(model) {
            return Arc::clone(set);
        }
        let model = if *count >= MAX_SERIES_SETS {
            "other"
        } else {
            model
        };
        let set = entry.by_model.entry(model.to_string()).or_insert_with(|| {
            let index = *count;
            *count += 1;
            Arc::new(Series {
                index,
                provider: call.provider.clone(),
                model: model.to_string(),
                rule: call.rule.clone(),
            })
        });
        Arc::clone(set)
    }

    fn hold(&self, id: u64, headers: &Headers) {
        let mut waiting = lock(&self.waiting);
        let held = Held {
            tick: waiting.ticks,
            header_bytes: header_bytes(headers),
        };
        waiting.since.insert(id, held);
    }

    fn release(&self, id: u64) {
        let mut waiting = lock(&self.waiting);
        if !waiting.since.is_empty() {
            waiting.since.remove(&id);
        }
    }

    /// One tick of the hold timer (`Shared::hold_tick_period`): the held requests to judge now.
    /// For each, the host makes that stream current and calls `judge_held`, or `forget` when the
    /// stream is gone.
    pub fn tick(&self) -> Vec<(u64, Held)> {
        let mut waiting = lock(&self.waiting);
        waiting.ticks += 1;
        let now = waiting.ticks;
        if waiting.since.is_empty() {
            return Vec::new();
        }
        waiting
            .since
            .iter()
            .filter(|(_, h)| now.saturating_sub(h.tick) >= 2)
            .map(|(id, h)| (*id, *h))
            .collect()
    }

    pub fn forget(&self, id: u64) {
        lock(&self.waiting).since.remove(&id);
    }

    /// Judges a held request (`hold::held_verdict`): it waits on, or gets its error reply
    /// through `host` (the stream `id`'s) and leaves the watch.
    pub fn judge_held<H: Host>(&self, shared: &Shared, id: u64, held: Held, host: &mut H) {
        let (period, limit) = hold_timer(shared.policy.hold_timeout_ms);
        let now = lock(&self.waiting).ticks;
        let received = host
            .request_total_size()
            .map(|n| n.saturating_sub(held.header_bytes));
        let error = match held_verdict(held, now, limit, received) {
            HeldVerdict::Wait => return,
            HeldVerdict::NotDelivered => {
                let minute = ticks_per_minute(period);
                let due = {
                    let mut waiting = lock(&self.waiting);
                    let due = waiting
                        .warned_at
                        .is_none_or(|at| now.saturating_sub(at) >= minute);
                    if due {
                        waiting.warned_at = Some(now);
                    }
                    due
                };
                if due {
                    error!(
                        "llm-filter: Envoy received a request body but did not hand it to the \
                         filter while it held the headers (settings.forwardAfterBody): set \
                         allow_on_headers_stop_iteration: true on the wasm filter; such \
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
        self.forget(id);
        if let Err(e) = host.send_local_reply(
            error.status(),
            &[("content-type", "application/json")],
            error.body().as_bytes(),
        ) {
            debug!("#{id} llm-filter: cannot answer a held request: {e}");
        }
    }

    #[cfg(test)]
    fn held_count(&self) -> usize {
        lock(&self.waiting).since.len()
    }
}

enum State {
    /// Not an LLM request, or answered locally.
    PassThrough,
    /// Waiting for the whole body.
    Buffering(Pending),
    /// Sent to the provider: the response is watched for model, usage and timing.
    Forwarded(Box<Upstream>),
}

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
fn write_request_headers<H: Host>(host: &mut H, id: u64, before: &Headers, after: &Headers) {
    let result = match header_changes(before, after) {
        Some(changes) => changes
            .into_iter()
            .try_for_each(|(name, value)| host.set_request_header(name, value)),
        None => host.set_request_headers(after),
    };
    if let Err(e) = result {
        error!("#{id} llm-filter: cannot set request headers: {e}");
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

/// Stores one filter state value (see `Host` for its Envoy name).
fn set_state<H: Host>(host: &mut H, key: &str, value: &[u8]) {
    if let Err(e) = host.set_filter_state(key, value) {
        debug!("llm-filter: cannot set {key}: {e}");
    }
}

/// Filter state `llm.provider`: the provider the request was rewritten for. Besides naming it
/// in the access log, it is what `render envoy`'s provider routes require (a route
/// `filter_state` match), so Envoy sends only requests this filter rewrote to a provider's
/// cluster, whatever their `:authority` says. Set before the headers go on: Envoy picks the
/// route then.
fn mark_routed<H: Host>(host: &mut H, call: &ProviderCall) {
    set_state(host, PROVIDER_STATE, call.provider.as_bytes());
}

/// Filter state `llm.fallback` for the upstream part: `<rule key> <chosen provider host>`,
/// then, once the body is known and its model was replaced, a line with the client's model
/// (`CLIENT_MODEL_LINE`). One host call per request: with held headers the first attempt
/// cannot start before the body is read, so both go together; without, the key is set at
/// header time and the client's model separately (`llm.client_model`) at body time.
fn mark_fallback<H: Host>(host: &mut H, call: &ProviderCall, client_model: Option<&[u8]>) {
    let Some(marker) = &call.fallback else {
        return;
    };
    match client_model {
        Some(model) => {
            let mut value = Vec::with_capacity(marker.len() + 1 + model.len());
            value.extend_from_slice(marker.as_bytes());
            value.push(CLIENT_MODEL_LINE);
            value.extend_from_slice(model);
            set_state(host, "llm.fallback", &value);
        }
        None => set_state(host, "llm.fallback", marker.as_bytes()),
    }
}

/// Separates the client's model from the rule key and provider in `llm.fallback` (a model's
/// JSON text has no raw newline).
const CLIENT_MODEL_LINE: u8 = b'\n';

/// Filter state `llm.client_model` for a client that named no model (a model's JSON text
/// always starts with a quote).
const NO_CLIENT_MODEL: &[u8] = b"-";

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
fn mark_budget<H: Host>(
    host: &mut H,
    call: &Arc<ProviderCall>,
    headers: &Headers,
) -> Option<Budget> {
    let limits = call.limits.as_ref()?;
    for (key, value) in limits.marks(headers) {
        set_state(host, key, &value);
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

fn record_report<H: Host>(host: &mut H, report: &Report) {
    if let Some(model) = &report.model {
        set_state(host, "llm.response_model", model.as_bytes());
    }
    for (key, value) in [
        ("llm.prompt_tokens", report.prompt_tokens),
        ("llm.completion_tokens", report.completion_tokens),
        ("llm.total_tokens", report.total_tokens),
    ] {
        if let Some(value) = value {
            set_state(host, key, value.to_string().as_bytes());
        }
    }
}

fn millis_since<H: Host>(host: &mut H, start: Option<SystemTime>) -> Option<u64> {
    let elapsed = host.now()?.duration_since(start?).ok()?;
    Some(u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX))
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
    series: Option<Arc<Series>>,
}

impl Upstream {
    fn series(&mut self, worker: &Worker) -> Arc<Series> {
        let call = &self.call;
        let model = &self.model;
        Arc::clone(
            self.series
                .get_or_insert_with(|| worker.series_for(call, model)),
        )
    }

    /// The answer is over (or the stream was cut): record what it reported. Returns the tokens
    /// it debits from token budgets.
    fn complete<H: Host>(&mut self, host: &mut H, shared: &Shared, worker: &Worker) -> u64 {
        let series = self.series(worker);
        shared.record(host, &series, Metric::Requests, Some(self.class), 1);
        if let Some(ms) = millis_since(host, self.sent_at) {
            shared.record(host, &series, Metric::UpstreamLatency, None, ms);
        }
        let report = self.observer.as_mut().and_then(ResponseObserver::finish);
        if let Some(report) = &report {
            record_report(host, report);
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
                        shared.record(host, &series, metric, None, value);
                    }
                }
            }
            _ => shared.record(host, &series, Metric::UsageUnknown, None, 1),
        }
        debit
    }

    /// Streams: the first event is the first token.
    fn watch_first_event<H: Host>(&mut self, host: &mut H, shared: &Shared, worker: &Worker) {
        let seen = self.observer.as_ref().map_or(0, ResponseObserver::events);
        if !self.first_event_seen && seen > 0 {
            self.first_event_seen = true;
            if let Some(ms) = millis_since(host, self.sent_at) {
                let series = self.series(worker);
                shared.record(host, &series, Metric::TimeToFirstToken, None, ms);
            }
        }
    }
}

/// The answer of a request with fallback. When a later attempt answered, the upstream part
/// said which provider and on which attempt; when Envoy answered itself (5xx) after more than
/// one attempt, the last provider tried could not be reached (Envoy's attempt count says which
/// one); otherwise the first provider answered and nothing changes. Records `llm.provider` (the
/// provider that answered, or failed last) and `llm.attempts` (every provider tried, in order:
/// Envoy tries the aggregate cluster's providers in order), counts the answer for that
/// provider, and removes the internal headers.
fn record_attempts<H: Host>(
    host: &mut H,
    policy: &Policy,
    upstream: &mut Upstream,
    key: &[u8],
    headers: &Headers,
) {
    let answered = policy::header(headers, ANSWERED_BY);
    let (call, attempt) = match answered {
        Some(provider) => {
            let attempt = policy::header(headers, ATTEMPT)
                .and_then(|a| std::str::from_utf8(a).ok())
                .and_then(|a| a.parse::<usize>().ok())
                .unwrap_or(1);
            (policy.attempt_call(key, provider), attempt)
        }
        None => {
            let failed = policy::header(headers, ":status").is_some_and(|s| s.starts_with(b"5"));
            if !failed {
                return;
            }
            let attempt = usize::try_from(host.attempt_count()).unwrap_or(usize::MAX);
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
        set_state(host, PROVIDER_STATE, call.provider.as_bytes());
        set_state(host, "llm.attempts", attempts.join(",").as_bytes());
        if !Arc::ptr_eq(call, &upstream.call) {
            // Another provider answered: its configured model is the one it was sent (a
            // mapped or client-chosen model is not known here; the first one's is kept).
            if let Some(model) = call.model() {
                set_state(host, "llm.model", model.as_bytes());
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
        if let Err(e) = host.set_response_header(name, None) {
            debug!("llm-filter: cannot remove {name}: {e}");
        }
    }
}

/// One downstream HTTP stream (see the module's docs).
pub struct Stream {
    id: u64,
    shared: Arc<Shared>,
    worker: Arc<Worker>,
    state: State,
    /// The request was put into its rule's budgets (`limits`): see `Budget`.
    budget: Option<Budget>,
}

impl Stream {
    /// `id`: unique among the worker's live streams (log lines and the hold watch name it).
    pub fn new(id: u64, shared: Arc<Shared>, worker: Arc<Worker>) -> Stream {
        Stream {
            id,
            shared,
            worker,
            state: State::PassThrough,
            budget: None,
        }
    }

    /// `end_of_stream`: the request has no body.
    pub fn on_request_headers<H: Host>(&mut self, host: &mut H, end_of_stream: bool) -> Flow {
        // Most traffic of a sidecar is not for an LLM host: one small read decides that.
        match host.request_header(":authority") {
            Some(authority) if self.shared.policy.is_llm_host(&authority) => {}
            _ => return Flow::Continue,
        }
        let headers = match host.request_headers() {
            Ok(headers) => headers,
            Err(e) => {
                error!("#{} llm-filter: cannot read request headers: {e}", self.id);
                return Flow::Continue;
            }
        };
        let shared = Arc::clone(&self.shared);
        let policy = &shared.policy;
        let decision = policy.decide(&headers, &mut &self.worker.rng);
        match decision {
            Decision::PassThrough => Flow::Continue,
            Decision::Reject(error) => self.reject(host, error),
            Decision::Forward(_) if end_of_stream => self.reject(host, RequestError::EmptyBody),
            Decision::Forward(call) => {
                debug!(
                    "#{} llm-filter: provider {} rule {:?}",
                    self.id, call.provider, call.rule
                );
                let after = headers_for(&call, &headers);
                if policy.forward_after_body {
                    // Envoy's `allow_on_headers_stop_iteration` lets the body arrive while the
                    // headers wait; they go on, with the exact length, once the body is good.
                    let held = HeldHeaders {
                        before: headers,
                        after,
                    };
                    self.worker.hold(self.id, &held.before);
                    self.state = State::Buffering(Pending::Routed {
                        call,
                        held: Some(held),
                    });
                    return Flow::Stop;
                }
                write_request_headers(host, self.id, &headers, &after);
                // Envoy picks the route as soon as the headers go on, and a provider's route
                // requires this mark (see `mark_routed`); the first attempt may start before the
                // body is read. Envoy's rate limit filter runs next, before the body is read.
                mark_routed(host, &call);
                self.budget = mark_budget(host, &call, &headers);
                mark_fallback(host, &call, None);
                host.clear_route_cache();
                self.state = State::Buffering(Pending::Routed { call, held: None });
                Flow::Continue
            }
            // The configuration's error line said so when it loaded.
            Decision::NeedsModel if !policy.forward_after_body => {
                self.reject(host, RequestError::ModelRoutingUnavailable)
            }
            Decision::NeedsModel if end_of_stream => self.reject(host, RequestError::EmptyBody),
            Decision::NeedsModel => {
                self.worker.hold(self.id, &headers);
                self.state = State::Buffering(Pending::Unrouted { headers });
                Flow::Stop
            }
            Decision::Models(list) => {
                self.state = State::PassThrough;
                if let Err(e) = host.send_local_reply(
                    200,
                    &[("content-type", "application/json")],
                    list.as_bytes(),
                ) {
                    error!("#{} llm-filter: cannot send the model list: {e}", self.id);
                }
                Flow::Stop
            }
        }
    }

    /// `body_size`: the body bytes received so far in all, those buffered plus this chunk
    /// (proxy-wasm's count); `end_of_stream`: this chunk ends the body.
    pub fn on_request_body<H: Host>(
        &mut self,
        host: &mut H,
        body_size: usize,
        end_of_stream: bool,
    ) -> Flow {
        if !matches!(self.state, State::Buffering(_)) {
            return Flow::Continue;
        }
        self.worker.release(self.id);
        if body_size as u64 > self.shared.policy.max_request_body_bytes {
            return self.reject(host, RequestError::BodyTooLarge);
        }
        if !end_of_stream {
            return Flow::Stop;
        }
        self.take_buffered_and_finish(host, body_size)
    }

    /// A body that ends with trailers never sees `end_of_stream` in the body callback.
    pub fn on_request_trailers<H: Host>(&mut self, host: &mut H) -> Flow {
        if !matches!(self.state, State::Buffering(_)) {
            return Flow::Continue;
        }
        self.worker.release(self.id);
        self.take_buffered_and_finish(host, usize::MAX)
    }

    pub fn on_response_headers<H: Host>(&mut self, host: &mut H, end_of_stream: bool) -> Flow {
        if !matches!(self.state, State::Forwarded(_)) {
            // Envoy's rate limit filter may refuse a request whose headers went on at header
            // time, before the body was read.
            if self.budget.is_some() {
                if let Some(status) = host.response_header(":status") {
                    self.rate_limit_reply(host, &status);
                }
            }
            return Flow::Continue;
        }
        let headers = host.response_headers();
        if let Ok(headers) = &headers {
            let status = policy::header(headers, ":status").unwrap_or_default();
            if self.rate_limit_reply(host, status) {
                return Flow::Continue;
            }
        }
        let State::Forwarded(upstream) = &mut self.state else {
            return Flow::Continue;
        };
        match headers {
            Ok(headers) => {
                if let Some((key, _)) = upstream.call.fallback_parts() {
                    let key = key.to_string();
                    record_attempts(
                        host,
                        &self.shared.policy,
                        upstream,
                        key.as_bytes(),
                        &headers,
                    );
                }
                upstream.class =
                    policy::header(&headers, ":status").map_or("unknown", status_class);
                upstream.observer = Some(ResponseObserver::for_response(&headers));
            }
            Err(e) => debug!("#{} llm-filter: cannot read response headers: {e}", self.id),
        }
        if end_of_stream {
            let debit = upstream.complete(host, &self.shared, &self.worker);
            self.state = State::PassThrough;
            self.settle_debit(host, debit);
        }
        Flow::Continue
    }

    /// Every chunk is passed on as it comes (`Continue`); a copy is read on the side.
    pub fn on_response_body<H: Host>(
        &mut self,
        host: &mut H,
        body_size: usize,
        end_of_stream: bool,
    ) -> Flow {
        let State::Forwarded(upstream) = &mut self.state else {
            return Flow::Continue;
        };
        if body_size > 0 {
            if let Some(observer) = upstream.observer.as_mut() {
                host.read_response_body(body_size, &mut |chunk| observer.feed(chunk));
            }
            upstream.watch_first_event(host, &self.shared, &self.worker);
        }
        if end_of_stream {
            let debit = upstream.complete(host, &self.shared, &self.worker);
            self.state = State::PassThrough;
            self.settle_debit(host, debit);
        }
        Flow::Continue
    }

    /// The stream is over (the host's access-log callback, before it is destroyed).
    pub fn on_log<H: Host>(&mut self, host: &mut H) {
        self.worker.release(self.id);
        // The answer was cut short (reset, timeout): count it with what was seen. Envoy's rate
        // limit filter reads the debit after this, when the stream is destroyed.
        let mut debit = 0;
        if let State::Forwarded(upstream) = &mut self.state {
            debit = upstream.complete(host, &self.shared, &self.worker);
            self.state = State::PassThrough;
        }
        self.settle_debit(host, debit);
    }

    fn reject<H: Host>(&mut self, host: &mut H, error: RequestError) -> Flow {
        debug!(
            "#{} llm-filter: {} {}",
            self.id,
            error.status(),
            error.code()
        );
        self.state = State::PassThrough;
        let body = error.body();
        let mut headers = vec![("content-type", "application/json")];
        headers.extend_from_slice(error.extra_headers());
        if let Err(e) = host.send_local_reply(error.status(), &headers, body.as_bytes()) {
            error!("#{} llm-filter: cannot send local reply: {e}", self.id);
        }
        Flow::Stop
    }

    fn take_buffered_and_finish<H: Host>(&mut self, host: &mut H, body_size: usize) -> Flow {
        match std::mem::replace(&mut self.state, State::PassThrough) {
            State::Buffering(pending) => self.finish_body(host, pending, body_size),
            other => {
                self.state = other;
                Flow::Continue
            }
        }
    }

    /// Rewrites the complete buffered body for the chosen provider; gives back held headers.
    fn finish_body<H: Host>(&mut self, host: &mut H, pending: Pending, body_size: usize) -> Flow {
        let body = match host.request_body(body_size) {
            Ok(body) => body,
            Err(e) => {
                error!("#{} llm-filter: cannot read the request body: {e}", self.id);
                return self.reject(host, RequestError::InvalidJson);
            }
        };
        let request = match ChatRequest::parse(&body) {
            Ok(request) => request,
            Err(error) => return self.reject(host, error),
        };
        let shared = Arc::clone(&self.shared);
        let policy = &shared.policy;
        let (call, held) = match pending {
            Pending::Routed { call, held } => (call, held),
            Pending::Unrouted { headers } => {
                let model = request.model();
                let decision = policy.decide_with_model(
                    &headers,
                    model.as_deref().map(str::as_bytes),
                    &mut &self.worker.rng,
                );
                match decision {
                    Decision::Forward(call) => {
                        debug!(
                            "#{} llm-filter: by model {model:?}: provider {} rule {:?}",
                            self.id, call.provider, call.rule
                        );
                        let after = headers_for(&call, &headers);
                        let held = HeldHeaders {
                            before: headers,
                            after,
                        };
                        (call, Some(held))
                    }
                    Decision::Reject(error) => return self.reject(host, error),
                    _ => return self.reject(host, RequestError::RouteNotFound),
                }
            }
        };
        let rewritten = request.rewrite(&call, policy.request_stream_usage);
        let new_body = rewritten.body.as_ref();
        if call.fallback.is_some() {
            // A later attempt rewrites this body for its own provider: keep what the client
            // asked for (its modelMapping, or no configured model, means the client's model;
            // no model at all stays none).
            let client = (request.model() != rewritten.model)
                .then(|| request.model_json().unwrap_or(NO_CLIENT_MODEL));
            if held.is_some() {
                mark_fallback(host, &call, client);
            } else if let Some(client) = client {
                set_state(host, "llm.client_model", client);
            }
        }
        let routed_at_header_time = held.is_none();
        if let Some(held) = &held {
            self.budget = mark_budget(host, &call, &held.before);
        }
        if let Some(HeldHeaders { before, mut after }) = held {
            // The whole body is known: send its exact length, never a chunked framing.
            let length = new_body.map_or(body.len(), Vec::len);
            after.retain(|(k, _)| k != "transfer-encoding");
            after.push((
                "content-length".to_string(),
                length.to_string().into_bytes(),
            ));
            write_request_headers(host, self.id, &before, &after);
        }
        if let Some(new_body) = new_body {
            if let Err(e) = host.set_request_body(body.len(), new_body) {
                error!("#{} llm-filter: cannot replace the body: {e}", self.id);
            }
        }
        if !routed_at_header_time {
            mark_routed(host, &call);
        }
        if !call.rule.is_empty() {
            set_state(host, "llm.rule", call.rule.as_bytes());
        }
        if let Some(model) = &rewritten.model {
            set_state(host, "llm.model", model.as_bytes());
        }
        if !routed_at_header_time {
            host.clear_route_cache();
        }
        self.state = State::Forwarded(Box::new(Upstream {
            call,
            model: rewritten.model.unwrap_or_else(|| "unknown".to_string()),
            sent_at: host.now(),
            class: "unknown",
            observer: None,
            first_event_seen: false,
            series: None,
        }));
        Flow::Continue
    }

    /// Writes the tokens to debit, once.
    fn settle_debit<H: Host>(&mut self, host: &mut H, tokens: u64) {
        if let Some(budget) = self.budget.as_mut().filter(|b| b.debit_pending) {
            budget.debit_pending = false;
            set_state(host, limits::DEBIT_STATE, tokens.to_string().as_bytes());
        }
    }

    /// A 429 or 503 for a request with a budget may be Envoy's rate limit filter answering
    /// instead of the provider (one property read, on those statuses only). Then nothing was
    /// sent upstream: a refusal is counted by rule, nothing is debited, and the answer is not
    /// the provider's.
    fn rate_limit_reply<H: Host>(&mut self, host: &mut H, status: &[u8]) -> bool {
        if self.budget.is_none() || !matches!(status, b"429" | b"503") {
            return false;
        }
        let details = host.response_code_details().unwrap_or_default();
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
                let series = self.worker.series_for(&budget.call, &model);
                self.shared
                    .record(host, &series, Metric::RateLimited, None, 1);
            }
            debug!(
                "#{} llm-filter: {} by the rate limit filter (rule {:?})",
                self.id,
                if refused { "refused" } else { "failed closed" },
                budget.call.rule
            );
        }
        self.settle_debit(host, 0);
        true
    }
}

/// The upstream part, once per attempt on a fallback's aggregate cluster: rewrites the
/// attempt's headers and body for the provider Envoy chose (named by the endpoint's metadata,
/// `filter_metadata.llm.provider`), whichever attempt it is.
pub struct AttemptStream {
    id: u64,
    shared: Arc<Shared>,
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

impl AttemptStream {
    pub fn new(id: u64, shared: Arc<Shared>) -> AttemptStream {
        AttemptStream {
            id,
            shared,
            call: None,
        }
    }

    /// The call for this attempt: the request's rule (filter state `llm.fallback`, set by the
    /// downstream part) and the endpoint's provider. `Ok(None)`: the attempt goes to the
    /// provider the downstream part chose and rewrote for (the first attempt). `Err`: why the
    /// attempt cannot be placed (no rule marked by the downstream part, an endpoint that does not
    /// name its provider, or names one that is not the rule's); it is refused, never sent with
    /// another provider's key, path and model.
    fn attempt_call<H: Host>(&self, host: &mut H) -> Result<Option<Attempt>, String> {
        let marker = host
            .filter_state("llm.fallback")
            .ok_or("the request reached a fallback cluster without the filter's mark")?;
        let (marker, client_model) = match marker.iter().position(|&b| b == CLIENT_MODEL_LINE) {
            Some(i) => (
                marker.get(..i).unwrap_or_default(),
                Some(marker.get(i + 1..).unwrap_or_default().to_vec()),
            ),
            None => (&marker[..], None),
        };
        let marker = std::str::from_utf8(marker).map_err(|_| "the filter's mark is not text")?;
        let (key, chosen) = policy::split_fallback(marker);
        let provider = host.upstream_provider().ok_or_else(|| {
            format!(
                "the endpoint chosen for rule {key:?} has no filter_metadata.llm.provider \
                 (each fallback provider's endpoint must name its provider host)"
            )
        })?;
        if provider == chosen.as_bytes() {
            return Ok(None);
        }
        let call = self
            .shared
            .policy
            .attempt_call(key.as_bytes(), &provider)
            .ok_or_else(|| {
                format!(
                    "the endpoint names provider {:?}, which is not one of rule {key:?}'s",
                    String::from_utf8_lossy(&provider)
                )
            })?;
        Ok(Some(Attempt {
            call: Arc::clone(call),
            host: provider,
            client_model,
        }))
    }

    pub fn on_request_headers<H: Host>(&mut self, host: &mut H) -> Flow {
        let attempt = match self.attempt_call(host) {
            Ok(Some(attempt)) => attempt,
            // The attempt goes where the downstream part rewrote it for (Envoy's route has
            // dropped the marker).
            Ok(None) => return Flow::Continue,
            Err(reason) => {
                error!(
                    "#{} llm-filter: fallback attempt refused (503): {reason}",
                    self.id
                );
                let error = RequestError::AttemptProviderUnknown;
                if let Err(e) = host.send_local_reply(
                    error.status(),
                    &[("content-type", "application/json")],
                    error.body().as_bytes(),
                ) {
                    error!("#{} llm-filter: cannot refuse the attempt: {e}", self.id);
                }
                return Flow::Stop;
            }
        };
        match host.request_headers() {
            Ok(headers) => {
                let mut after = headers.clone();
                rewrite_headers(&attempt.call, &mut after);
                after.retain(|(k, _)| k != FALLBACK_HEADER);
                write_request_headers(host, self.id, &headers, &after);
            }
            Err(e) => error!(
                "#{} llm-filter: cannot read the attempt's headers: {e}",
                self.id
            ),
        }
        debug!(
            "#{} llm-filter: attempt to provider {}",
            self.id, attempt.call.provider
        );
        self.call = Some(attempt);
        Flow::Continue
    }

    pub fn on_request_body<H: Host>(
        &mut self,
        host: &mut H,
        body_size: usize,
        end_of_stream: bool,
    ) -> Flow {
        let Some(attempt) = &self.call else {
            return Flow::Continue;
        };
        if !end_of_stream {
            return Flow::Stop;
        }
        let body = match host.request_body(body_size) {
            Ok(body) => body,
            Err(e) => {
                error!(
                    "#{} llm-filter: cannot read the attempt's body: {e}",
                    self.id
                );
                return Flow::Continue;
            }
        };
        // The body as the first provider got it, with the client's model back (the downstream
        // part stored it when it replaced it), then rewritten for this attempt's provider.
        let restored = client_model_restored(host, &body, attempt.client_model.as_deref());
        let body_now = restored.as_deref().unwrap_or(&body);
        // The downstream part has checked the body; a body that no longer parses goes as is.
        if let Ok(request) = ChatRequest::parse(body_now) {
            let rewritten = request.rewrite(&attempt.call, self.shared.policy.request_stream_usage);
            if let Some(new_body) = rewritten.body.as_ref().or(restored.as_ref()) {
                if let Err(e) = host.set_request_body(body.len(), new_body) {
                    error!(
                        "#{} llm-filter: cannot replace the attempt's body: {e}",
                        self.id
                    );
                }
            }
        }
        Flow::Continue
    }

    pub fn on_response_headers<H: Host>(&mut self, host: &mut H) -> Flow {
        let Some(Attempt { host: provider, .. }) = &self.call else {
            return Flow::Continue;
        };
        let attempt = host.attempt_count().to_string();
        for (name, value) in [
            (ANSWERED_BY, provider.as_slice()),
            (ATTEMPT, attempt.as_bytes()),
        ] {
            if let Err(e) = host.set_response_header(name, Some(value)) {
                debug!("llm-filter: cannot set {name}: {e}");
            }
        }
        Flow::Continue
    }
}

/// `body` with `model` as the client sent it (its JSON text, or `NO_CLIENT_MODEL`), stored by
/// the downstream part when it replaced it: `carried` from `llm.fallback`, else filter state
/// `llm.client_model`; `None` when the client's model was kept.
fn client_model_restored<H: Host>(
    host: &mut H,
    body: &[u8],
    carried: Option<&[u8]>,
) -> Option<Vec<u8>> {
    let model = match carried {
        Some(model) => model.to_vec(),
        None => host.filter_state("llm.client_model")?,
    };
    let model = (model != NO_CLIENT_MODEL).then_some(model);
    ChatRequest::parse(body).ok()?.with_model(model.as_deref())
}

/// The shared values cross threads (the native host's workers).
#[allow(dead_code)]
fn assert_send_sync() {
    fn both<T: Send + Sync>() {}
    both::<Shared>();
    both::<Worker>();
    both::<Stream>();
    both::<AttemptStream>();
}
