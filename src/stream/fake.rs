//! A host in memory for the core's unit tests: Envoy's view of one stream (headers, body,
//! filter state, properties) as plain fields, and a record of what the core did to it.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::host::{ConfigHost, Headers, Host, HostError};
use crate::metrics::{Metric, Series};

/// Metric ids are `ID_BASE + Metric::index`.
pub const ID_BASE: u32 = 100;

pub struct FakeConfig;

impl ConfigHost for FakeConfig {
    fn define_metric(&mut self, metric: Metric) -> Option<u32> {
        u32::try_from(metric.index()).ok().map(|i| ID_BASE + i)
    }
}

/// A local reply the core sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: u32,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

/// One metric update.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    pub metric: Metric,
    pub id: u32,
    pub provider: String,
    pub model: String,
    pub rule: String,
    pub class: Option<&'static str>,
    pub value: u64,
}

#[derive(Default)]
pub struct Fake {
    pub request_headers: Headers,
    pub request_body: Vec<u8>,
    pub response_headers: Headers,
    /// The response chunk being delivered.
    pub response_chunk: Vec<u8>,
    pub state: BTreeMap<String, Vec<u8>>,
    pub total_size: Option<u64>,
    pub code_details: Option<Vec<u8>>,
    pub upstream_provider: Option<Vec<u8>>,
    pub attempt_count: Option<u64>,
    pub replies: Vec<Reply>,
    pub metrics: Vec<Recorded>,
    /// Milliseconds since the epoch the clock shows.
    pub clock_ms: u64,
    /// Request header writes (one per set/remove, one per whole-map write).
    pub header_writes: usize,
    pub route_cache_clears: usize,
    /// Every host operation, by name, in order.
    pub calls: Vec<&'static str>,
    /// `request_body` fails.
    pub body_unreadable: bool,
}

fn set(headers: &mut Headers, name: &str, value: Option<&[u8]>) {
    headers.retain(|(k, _)| k != name);
    if let Some(value) = value {
        headers.push((name.to_string(), value.to_vec()));
    }
}

fn get(headers: &Headers, name: &str) -> Option<Vec<u8>> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.clone())
}

impl Fake {
    pub fn request(headers: &[(&str, &str)]) -> Fake {
        Fake {
            request_headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
                .collect(),
            clock_ms: 1_000_000,
            ..Fake::default()
        }
    }

    pub fn header(&self, name: &str) -> Option<String> {
        get(&self.request_headers, name).map(|v| String::from_utf8_lossy(&v).into_owned())
    }

    pub fn response_header_text(&self, name: &str) -> Option<String> {
        get(&self.response_headers, name).map(|v| String::from_utf8_lossy(&v).into_owned())
    }

    pub fn state_text(&self, name: &str) -> Option<String> {
        self.state
            .get(name)
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }

    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.request_body).into_owned()
    }

    pub fn metric(&self, metric: Metric) -> Vec<&Recorded> {
        self.metrics.iter().filter(|r| r.metric == metric).collect()
    }
}

impl Host for Fake {
    const FILTER_STATE_PREFIX: &'static str = "fake.";

    fn request_header(&mut self, name: &str) -> Option<Vec<u8>> {
        self.calls.push("request_header");
        get(&self.request_headers, name)
    }

    fn request_headers(&mut self) -> Result<Headers, HostError> {
        self.calls.push("request_headers");
        Ok(self.request_headers.clone())
    }

    fn set_request_header(&mut self, name: &str, value: Option<&[u8]>) -> Result<(), HostError> {
        self.calls.push("set_request_header");
        self.header_writes += 1;
        set(&mut self.request_headers, name, value);
        Ok(())
    }

    fn set_request_headers(&mut self, headers: &[(String, Vec<u8>)]) -> Result<(), HostError> {
        self.calls.push("set_request_headers");
        self.header_writes += 1;
        self.request_headers = headers.to_vec();
        Ok(())
    }

    fn request_body(&mut self, size: usize) -> Result<Vec<u8>, HostError> {
        self.calls.push("request_body");
        if self.body_unreadable {
            return Err(HostError("NotFound".to_string()));
        }
        Ok(self
            .request_body
            .get(..size.min(self.request_body.len()))
            .unwrap_or_default()
            .to_vec())
    }

    fn set_request_body(&mut self, current_len: usize, body: &[u8]) -> Result<(), HostError> {
        self.calls.push("set_request_body");
        let rest = self
            .request_body
            .split_off(current_len.min(self.request_body.len()));
        self.request_body = body.to_vec();
        self.request_body.extend(rest);
        Ok(())
    }

    fn response_header(&mut self, name: &str) -> Option<Vec<u8>> {
        self.calls.push("response_header");
        get(&self.response_headers, name)
    }

    fn response_headers(&mut self) -> Result<Headers, HostError> {
        self.calls.push("response_headers");
        Ok(self.response_headers.clone())
    }

    fn set_response_header(&mut self, name: &str, value: Option<&[u8]>) -> Result<(), HostError> {
        self.calls.push("set_response_header");
        set(&mut self.response_headers, name, value);
        Ok(())
    }

    fn read_response_body(&mut self, size: usize, sink: &mut dyn FnMut(&[u8])) {
        self.calls.push("read_response_body");
        let chunk = self
            .response_chunk
            .get(..size.min(self.response_chunk.len()))
            .unwrap_or_default();
        // In two slices, as a native host may hand them over.
        let (a, b) = chunk.split_at(chunk.len() / 2);
        sink(a);
        sink(b);
    }

    fn set_filter_state(&mut self, name: &str, value: &[u8]) -> Result<(), HostError> {
        self.calls.push("set_filter_state");
        self.state.insert(name.to_string(), value.to_vec());
        Ok(())
    }

    fn filter_state(&mut self, name: &str) -> Option<Vec<u8>> {
        self.calls.push("filter_state");
        self.state.get(name).cloned()
    }

    fn request_total_size(&mut self) -> Option<u64> {
        self.calls.push("request_total_size");
        self.total_size
    }

    fn response_code_details(&mut self) -> Option<Vec<u8>> {
        self.calls.push("response_code_details");
        self.code_details.clone()
    }

    fn upstream_provider(&mut self) -> Option<Vec<u8>> {
        self.calls.push("upstream_provider");
        self.upstream_provider.clone()
    }

    fn attempt_count(&mut self) -> u64 {
        self.calls.push("attempt_count");
        self.attempt_count.unwrap_or(1)
    }

    fn send_local_reply(
        &mut self,
        status: u32,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<(), HostError> {
        self.calls.push("send_local_reply");
        self.replies.push(Reply {
            status,
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            body: String::from_utf8_lossy(body).into_owned(),
        });
        Ok(())
    }

    fn now(&mut self) -> Option<SystemTime> {
        self.calls.push("now");
        Some(UNIX_EPOCH + Duration::from_millis(self.clock_ms))
    }

    fn record_metric(
        &mut self,
        metric: Metric,
        id: u32,
        series: &Series,
        class: Option<&'static str>,
        value: u64,
    ) {
        self.calls.push("record_metric");
        self.metrics.push(Recorded {
            metric,
            id,
            provider: series.provider.clone(),
            model: series.model.clone(),
            rule: series.rule.clone(),
            class,
            value,
        });
    }

    fn clear_route_cache(&mut self) {
        self.route_cache_clears += 1;
    }
}
