//! What the request core (`stream`) needs from the proxy it runs in. Two hosts implement it:
//! the proxy-wasm filter (`filter`, one `.wasm` for Envoy and Istio) and the native Envoy
//! dynamic module. The core makes every decision; a host only moves bytes between Envoy and
//! the core, and each method is one Envoy operation (one host call in proxy-wasm, where each
//! crossing into Envoy costs 1–3 µs, so the core asks for as little as it can: one header
//! read for a request that is not an LLM host's, only the headers that change written back).
//!
//! Conventions for both hosts:
//! - Header names are lower case, as Envoy keeps them (`:authority`, `content-length`).
//! - A method that can fail returns `HostError`, a text for a log line; the core logs it and
//!   goes on as its callbacks say (it never panics on a host failure).
//! - The core logs through the `log` crate (lines carry `#<stream id>`); each host installs a
//!   logger that writes to Envoy's log at Envoy's level.
//! - Filter state: the core names its values `llm.<name>` (`llm.provider`, `llm.model`,
//!   `llm.prompt_tokens`...; see `FILTER_STATE_NAMES`). The Envoy filter state key is the host's
//!   prefix followed by that name (`Host::FILTER_STATE_PREFIX`). Both hosts use `wasm.`, so
//!   the keys are the same whichever build runs: proxy-wasm's `set_property` stores `llm.x` as
//!   `wasm.llm.x` (Envoy adds the prefix; `limits::ENVOY_STATE_PREFIX`), and the native host
//!   writes `wasm.llm.x` itself. So one access-log format serves both builds,
//!   `%FILTER_STATE(wasm.llm.<name>:PLAIN)%`, and `render envoy` (with or without `--native`)
//!   writes the same provider route matches (`wasm.llm.provider`) and budget descriptors
//!   (`wasm.llm.limit.*`, `wasm.llm.debit`). Values are plain bytes (text), readable by later
//!   filters on the same stream (the upstream part reads `llm.fallback`; `Host::filter_state`
//!   takes the core's name too).
//! - Metrics are families defined once per configuration (`ConfigHost::define_metric`), each
//!   with the labels `Metric::labels` names, and recorded per series (`Host::record_metric`):
//!   a host without labels (proxy-wasm) folds them into the series' name (`metrics::series`).

use std::fmt;
use std::time::SystemTime;

use crate::metrics::{Metric, Series};

/// Headers as the core reads and writes them: (lower-case name, value) in Envoy's order; a
/// name may repeat.
pub type Headers = Vec<(String, Vec<u8>)>;

/// Why a host operation failed, as text for a log line (proxy-wasm: its `Status`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostError(pub String);

impl fmt::Display for HostError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a callback tells the host to do with the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Pass what was delivered on to the next filter.
    Continue,
    /// Keep it in Envoy until the core gives it back (proxy-wasm `Action::Pause`). From
    /// request headers: hold them while the body keeps arriving (native `StopIteration`;
    /// Envoy still delivers the body). From a request body: buffer it, the core reads it whole
    /// at its end (native `StopIterationAndBuffer`). After `Host::send_local_reply`: the
    /// stream is answered, nothing more goes on.
    Stop,
}

/// The names the core stores as filter state (see the module's docs for the Envoy key).
pub const FILTER_STATE_NAMES: [&str; 12] = [
    "llm.provider",
    "llm.rule",
    "llm.model",
    "llm.response_model",
    "llm.prompt_tokens",
    "llm.completion_tokens",
    "llm.total_tokens",
    "llm.attempts",
    "llm.fallback",
    "llm.client_model",
    crate::limits::DEBIT_STATE,
    // One per budget of the request's rule (`limits::state_key`).
    "llm.limit.<namespace>/<route>/<rule>/<limit>",
];

/// The per-request operations. One value serves one HTTP stream (downstream, or one upstream
/// attempt) for the duration of one callback; the core never keeps it.
pub trait Host {
    /// The Envoy filter state key of the core's `llm.<name>` is this prefix followed by the
    /// name: `wasm.` for both hosts (proxy-wasm: added by Envoy itself; see the module's docs).
    const FILTER_STATE_PREFIX: &'static str;

    /// One request header's value (the first if it repeats); `None` if absent or unreadable.
    fn request_header(&mut self, name: &str) -> Option<Vec<u8>>;
    /// All request headers.
    fn request_headers(&mut self) -> Result<Headers, HostError>;
    /// Sets (replacing every value of) or, with `None`, removes one request header.
    fn set_request_header(&mut self, name: &str, value: Option<&[u8]>) -> Result<(), HostError>;
    /// Replaces the whole request header map (used when a name repeats).
    fn set_request_headers(&mut self, headers: &[(String, Vec<u8>)]) -> Result<(), HostError>;

    /// The buffered request body: its first `size` bytes (`usize::MAX`: all of it), as one
    /// contiguous copy; with the chunk just delivered. Called once, when the body is complete.
    fn request_body(&mut self, size: usize) -> Result<Vec<u8>, HostError>;
    /// Replaces the buffered request body, whose current length is `current_len`, with `body`.
    fn set_request_body(&mut self, current_len: usize, body: &[u8]) -> Result<(), HostError>;

    /// One response header's value; `None` if absent or unreadable.
    fn response_header(&mut self, name: &str) -> Option<Vec<u8>>;
    /// All response headers.
    fn response_headers(&mut self) -> Result<Headers, HostError>;
    /// Sets or, with `None`, removes one response header.
    fn set_response_header(&mut self, name: &str, value: Option<&[u8]>) -> Result<(), HostError>;
    /// Hands the response body chunk just delivered (`size` bytes) to `sink`, in one or more
    /// slices in order (a host may pass its own buffers without copying). Nothing when it
    /// cannot be read.
    fn read_response_body(&mut self, size: usize, sink: &mut dyn FnMut(&[u8]));

    /// Stores filter state `name` (`llm.<x>`; see the module's docs for the Envoy key).
    fn set_filter_state(&mut self, name: &str, value: &[u8]) -> Result<(), HostError>;
    /// Reads filter state `name` set earlier on this stream (by the downstream part for the
    /// upstream part); `None` if unset.
    fn filter_state(&mut self, name: &str) -> Option<Vec<u8>>;

    /// Envoy's `request.total_size`: the request headers' size plus the body bytes received
    /// so far (`hold` compares it with what the filter was given).
    fn request_total_size(&mut self) -> Option<u64>;
    /// Envoy's `response.code_details` (`request_rate_limited` when its rate limit filter
    /// answered).
    fn response_code_details(&mut self) -> Option<Vec<u8>>;
    /// Upstream part: the provider host the chosen endpoint names in its metadata,
    /// `filter_metadata.llm.provider` (`metadata::NAMESPACE`, `metadata::PROVIDER_KEY`).
    fn upstream_provider(&mut self) -> Option<Vec<u8>>;
    /// Envoy's count of upstream attempts so far for this request (`upstream.
    /// request_attempt_count`); 1 when unknown.
    fn attempt_count(&mut self) -> u64;

    /// Answers the client (downstream) or ends the attempt (upstream part) with this local
    /// reply; the callback then returns `Flow::Stop`.
    fn send_local_reply(
        &mut self,
        status: u32,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<(), HostError>;

    /// Wall-clock time (latencies are differences of two readings).
    fn now(&mut self) -> Option<SystemTime>;

    /// Adds `value` to a counter, or records it in a histogram (`Metric::is_histogram`):
    /// `id` is what `ConfigHost::define_metric` returned for `metric`; `series` and `class`
    /// (only `Requests` has one) are its labels.
    fn record_metric(
        &mut self,
        metric: Metric,
        id: u32,
        series: &Series,
        class: Option<&'static str>,
        value: u64,
    );

    /// The request headers or filter state changed in a way that may change Envoy's route
    /// (called after the core rewrote the headers and set `llm.provider` and `llm.fallback`,
    /// before `Flow::Continue` gives them back). Proxy-wasm needs nothing: Envoy clears the
    /// route cache itself when a wasm filter changes headers.
    fn clear_route_cache(&mut self) {}
}

/// What the configuration step needs: metric families, defined once per configuration.
pub trait ConfigHost {
    /// Defines `metric` (a counter, or a histogram when `Metric::is_histogram`), with the labels
    /// `Metric::labels`; returns its id for `Host::record_metric`, `None` if it cannot (then
    /// the metric is not recorded).
    fn define_metric(&mut self, metric: Metric) -> Option<u32>;
}
