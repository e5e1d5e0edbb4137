//! Criterion micro-benchmarks of the filter's pure paths, without Envoy, so a regression in the
//! core shows up on its own (`cargo bench --bench core`; `scripts/bench.sh` measures the whole
//! filter inside Envoy). What each group times:
//!
//! - `config_compile`: `Policy::from_text` on the seeds' manifests (`tests/data/`), what
//!   `on_configure` does once per worker.
//! - `decide`: `Policy::decide` on a realistic request header list (Envoy hands the filter
//!   about ten headers): an unknown host (pass-through), a direct provider host, an `LLMRoute`
//!   rule chosen by a header match, and a weighted split.
//! - `rewrite_headers`: the header rewrite of a routed request, including the copy of the header
//!   list the filter reads from Envoy.
//! - `rewrite_body`: `rewrite::rewrite_body(call, body, true)` on chat bodies of 1 KB, 64 KB
//!   and 1 MB (the sizes `scripts/bench.sh` sends), model and stream replaced.
//! - `usage`: `usage::SseReader` over the recorded streams in `tests/data/responses/`, fed
//!   whole and in 64-byte pieces (a stream arrives cut anywhere), and `report_from_json` over
//!   the recorded JSON answers.
//! - `request`: one whole request through the request core (`stream::Stream`) with a host that
//!   keeps headers, body and filter state in memory: headers, body, response headers, a JSON
//!   answer, log. What a real host adds is its own calls into Envoy.

// The crate is also built for wasm32 targets (`cargo clippy --all-targets --target wasm32-…`),
// where criterion is not a dependency: the benchmark exists on the host only.
#[cfg(target_arch = "wasm32")]
fn main() {}

#[cfg(not(target_arch = "wasm32"))]
fn main() {
    host::main();
}

#[cfg(not(target_arch = "wasm32"))]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod host {
    use std::hint::black_box;
    use std::sync::Arc;
    use std::time::Duration;

    use criterion::{BenchmarkId, Criterion, Throughput};
    use llm_filter::balancer::SplitMix64;
    use llm_filter::policy::{Decision, Policy, ProviderCall};
    use llm_filter::rewrite::{rewrite_body, rewrite_headers};
    use llm_filter::usage::{report_from_json, SseReader};

    use llm_filter::host::{ConfigHost, Flow, Headers, Host, HostError};
    use llm_filter::metrics::{Metric, Series};
    use llm_filter::stream::{Shared, Stream, Worker};

    const GATEWAY: &str = include_str!("../tests/data/seed000-gateway.yaml");
    const MESH: &str = include_str!("../tests/data/seed001-mesh.yaml");
    const SSE: [(&str, &[u8]); 2] = [
        (
            "openai-stream",
            include_bytes!("../tests/data/responses/openai-stream.sse"),
        ),
        (
            "dashscope-stream",
            include_bytes!("../tests/data/responses/dashscope-stream.sse"),
        ),
    ];
    const JSON: [(&str, &[u8]); 2] = [
        (
            "dashscope-chat",
            include_bytes!("../tests/data/responses/dashscope-chat.json"),
        ),
        (
            "moonshot-chat",
            include_bytes!("../tests/data/responses/moonshot-chat.json"),
        ),
    ];
    /// The request body sizes `scripts/bench.sh` sends.
    const BODY_SIZES: [(&str, usize); 3] = [("1KB", 1 << 10), ("64KB", 64 << 10), ("1MB", 1 << 20)];

    pub fn main() {
        let mut c = Criterion::default()
            .configure_from_args()
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(2));
        config_compile(&mut c);
        decide(&mut c);
        headers(&mut c);
        body(&mut c);
        usage(&mut c);
        request(&mut c);
        c.final_summary();
    }

    fn mesh() -> Policy {
        Policy::from_text(MESH).expect("seed001 compiles")
    }

    /// The headers Envoy hands the filter for a chat POST from curl or an SDK.
    fn request_headers(authority: &str, extra: &[(&str, &str)]) -> Vec<(String, Vec<u8>)> {
        let mut headers: Vec<(String, Vec<u8>)> = [
            (":authority", authority),
            (":path", "/v1/chat/completions"),
            (":method", "POST"),
            (":scheme", "http"),
            ("user-agent", "OpenAI/Python 1.59.0"),
            ("accept", "application/json"),
            ("content-type", "application/json"),
            ("content-length", "1024"),
            ("x-forwarded-proto", "http"),
            ("x-request-id", "6f1c2a9e-3b7d-4e0a-9c55-0d8f2b1e7a44"),
        ]
        .iter()
        .chain(extra)
        .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
        .collect();
        headers.shrink_to_fit();
        headers
    }

    fn forward(policy: &Policy, headers: &[(String, Vec<u8>)]) -> Arc<ProviderCall> {
        match policy.decide(headers, &mut SplitMix64::new(1)) {
            Decision::Forward(call) => call,
            other => panic!("expected a provider call, got {other:?}"),
        }
    }

    fn config_compile(c: &mut Criterion) {
        let mut group = c.benchmark_group("config_compile");
        for (name, text) in [("seed000-gateway", GATEWAY), ("seed001-mesh", MESH)] {
            group.throughput(Throughput::Bytes(text.len() as u64));
            group.bench_function(name, |b| {
                b.iter(|| Policy::from_text(black_box(text)).expect("seed compiles"))
            });
        }
        group.finish();
    }

    fn decide(c: &mut Criterion) {
        let policy = mesh();
        let cases = [
            ("pass-through", request_headers("example.com", &[])),
            ("provider-host", request_headers("api.moonshot.cn", &[])),
            (
                "rule-header-match",
                request_headers("dashscope.aliyuncs.com", &[("user-type", "subscriber")]),
            ),
            (
                "rule-fallthrough",
                request_headers("dashscope.aliyuncs.com", &[]),
            ),
            ("weighted-split", request_headers("demo-llm-server", &[])),
        ];
        let mut group = c.benchmark_group("decide");
        let mut rng = SplitMix64::new(7);
        for (name, headers) in &cases {
            group.bench_function(*name, |b| {
                b.iter(|| policy.decide(black_box(headers), &mut rng))
            });
        }
        group.finish();
    }

    fn headers(c: &mut Criterion) {
        let policy = mesh();
        let headers = request_headers("api.moonshot.cn", &[("authorization", "Bearer client")]);
        let call = forward(&policy, &headers);
        c.bench_function("rewrite_headers/provider-host", |b| {
            b.iter(|| {
                // The filter owns the list it read from Envoy; the clone stands for that read.
                let mut h = headers.clone();
                rewrite_headers(&call, &mut h);
                h
            })
        });
    }

    /// A chat body of exactly `size` bytes as SDKs send it: system prompt, user/assistant turns
    /// of about 400 bytes (with escapes, as real prompts have; the last one padded to the size),
    /// then the client's `model` and `stream`. The same recipe as `chat_body` in
    /// `scripts/bench.sh`.
    pub fn chat_body(size: usize) -> Vec<u8> {
        let sentence = "The quick brown fox jumps over the lazy dog; \\\"quoted\\\" text\\n. ";
        let turn = sentence.repeat(6);
        let head = r#"{"messages":[{"role":"system","content":"You are a helpful assistant."}"#;
        let tail = r#"],"model":"gpt-4o-mini","stream":false,"temperature":0.7}"#;
        let mut body = head.to_string();
        let mut i = 0;
        loop {
            let role = if i % 2 == 0 { "user" } else { "assistant" };
            let open = format!(r#",{{"role":"{role}","content":""#);
            let close = r#""}"#;
            let room = size.saturating_sub(body.len() + open.len() + close.len() + tail.len());
            if room <= turn.len() * 2 {
                // Last turn: pad with plain letters so the size is exact.
                body.push_str(&open);
                body.push_str(&"x".repeat(room));
                body.push_str(close);
                break;
            }
            body.push_str(&open);
            body.push_str(&turn);
            body.push_str(close);
            i += 1;
        }
        body.push_str(tail);
        body.into_bytes()
    }

    fn body(c: &mut Criterion) {
        let policy = Policy::from_text(GATEWAY).expect("seed000 compiles");
        // seed000: model qwen-1.8b-chat and stream false, both replaced in every body.
        let call = forward(&policy, &request_headers("test.com", &[]));
        let mut group = c.benchmark_group("rewrite_body");
        for (name, size) in BODY_SIZES {
            let body = chat_body(size);
            assert_eq!(body.len(), size);
            assert!(serde_json::from_slice::<serde_json::Value>(&body).is_ok());
            let out = rewrite_body(&call, &body, true).expect("body rewrites");
            assert!(out.body.is_some(), "model and stream must be replaced");
            group.throughput(Throughput::Bytes(body.len() as u64));
            group.bench_with_input(BenchmarkId::from_parameter(name), &body, |b, body| {
                b.iter(|| rewrite_body(&call, black_box(body), true).expect("body rewrites"))
            });
        }
        group.finish();
    }

    fn usage(c: &mut Criterion) {
        let mut group = c.benchmark_group("usage");
        for (name, sse) in SSE {
            let mut check = SseReader::new();
            check.feed(sse);
            assert!(check.finish().has_usage(), "{name} reports usage");
            group.throughput(Throughput::Bytes(sse.len() as u64));
            group.bench_function(format!("sse/{name}/whole"), |b| {
                b.iter(|| {
                    let mut reader = SseReader::new();
                    reader.feed(black_box(sse));
                    reader.finish().prompt_tokens
                })
            });
            group.bench_function(format!("sse/{name}/64B-chunks"), |b| {
                b.iter(|| {
                    let mut reader = SseReader::new();
                    for chunk in black_box(sse).chunks(64) {
                        reader.feed(chunk);
                    }
                    reader.finish().prompt_tokens
                })
            });
        }
        for (name, json) in JSON {
            assert!(report_from_json(json).is_some_and(|r| r.has_usage()));
            group.throughput(Throughput::Bytes(json.len() as u64));
            group.bench_function(format!("json/{name}"), |b| {
                b.iter(|| report_from_json(black_box(json)))
            });
        }
        group.finish();
    }

    /// A host in memory: what Envoy would hold for one stream.
    struct MemoryHost {
        request: Headers,
        body: Vec<u8>,
        response: Headers,
        chunk: Vec<u8>,
        state: Vec<(String, Vec<u8>)>,
        recorded: u64,
    }

    struct MemoryConfig;

    impl ConfigHost for MemoryConfig {
        fn define_metric(&mut self, metric: Metric) -> Option<u32> {
            u32::try_from(metric.index()).ok()
        }
    }

    fn first(headers: &Headers, name: &str) -> Option<Vec<u8>> {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    }

    impl Host for MemoryHost {
        const FILTER_STATE_PREFIX: &'static str = "";

        fn request_header(&mut self, name: &str) -> Option<Vec<u8>> {
            first(&self.request, name)
        }
        fn request_headers(&mut self) -> Result<Headers, HostError> {
            Ok(self.request.clone())
        }
        fn set_request_header(
            &mut self,
            name: &str,
            value: Option<&[u8]>,
        ) -> Result<(), HostError> {
            self.request.retain(|(k, _)| k != name);
            if let Some(value) = value {
                self.request.push((name.to_string(), value.to_vec()));
            }
            Ok(())
        }
        fn set_request_headers(&mut self, headers: &[(String, Vec<u8>)]) -> Result<(), HostError> {
            self.request = headers.to_vec();
            Ok(())
        }
        fn request_body(&mut self, _: usize) -> Result<Vec<u8>, HostError> {
            Ok(self.body.clone())
        }
        fn set_request_body(&mut self, _: usize, body: &[u8]) -> Result<(), HostError> {
            self.body = body.to_vec();
            Ok(())
        }
        fn response_header(&mut self, name: &str) -> Option<Vec<u8>> {
            first(&self.response, name)
        }
        fn response_headers(&mut self) -> Result<Headers, HostError> {
            Ok(self.response.clone())
        }
        fn set_response_header(&mut self, name: &str, _: Option<&[u8]>) -> Result<(), HostError> {
            self.response.retain(|(k, _)| k != name);
            Ok(())
        }
        fn read_response_body(&mut self, _: usize, sink: &mut dyn FnMut(&[u8])) {
            sink(&self.chunk);
        }
        fn set_filter_state(&mut self, name: &str, value: &[u8]) -> Result<(), HostError> {
            self.state.push((name.to_string(), value.to_vec()));
            Ok(())
        }
        fn filter_state(&mut self, name: &str) -> Option<Vec<u8>> {
            first(&self.state, name)
        }
        fn request_total_size(&mut self) -> Option<u64> {
            None
        }
        fn response_code_details(&mut self) -> Option<Vec<u8>> {
            None
        }
        fn upstream_provider(&mut self) -> Option<Vec<u8>> {
            None
        }
        fn attempt_count(&mut self) -> u64 {
            1
        }
        fn send_local_reply(
            &mut self,
            _: u32,
            _: &[(&str, &str)],
            _: &[u8],
        ) -> Result<(), HostError> {
            Ok(())
        }
        fn now(&mut self) -> Option<std::time::SystemTime> {
            Some(std::time::UNIX_EPOCH)
        }
        fn record_metric(
            &mut self,
            _: Metric,
            _: u32,
            _: &Series,
            _: Option<&'static str>,
            value: u64,
        ) {
            self.recorded += value;
        }
    }

    fn request(c: &mut Criterion) {
        let shared = Arc::new(Shared::new(
            Policy::from_text(GATEWAY).expect("seed000 compiles"),
            false,
            &mut MemoryConfig,
        ));
        let worker = Arc::new(Worker::new(3));
        let body = chat_body(1 << 10);
        let (_, answer) = JSON[0];
        let request = request_headers("test.com", &[]);
        let response: Headers = vec![
            (":status".to_string(), b"200".to_vec()),
            ("content-type".to_string(), b"application/json".to_vec()),
        ];
        let once = || {
            let mut host = MemoryHost {
                request: request.clone(),
                body: body.clone(),
                response: response.clone(),
                chunk: answer.to_vec(),
                state: Vec::new(),
                recorded: 0,
            };
            let mut stream = Stream::new(1, Arc::clone(&shared), Arc::clone(&worker));
            let mut flows = vec![stream.on_request_headers(&mut host, false)];
            flows.push(stream.on_request_body(&mut host, body.len(), true));
            flows.push(stream.on_response_headers(&mut host, false));
            flows.push(stream.on_response_body(&mut host, answer.len(), true));
            stream.on_log(&mut host);
            (flows, host)
        };
        let (flows, host) = once();
        // The headers may wait for the body (seed000 holds them); the rest goes on.
        assert!(flows[1..].iter().all(|f| *f == Flow::Continue), "{flows:?}");
        assert!(host.state.iter().any(|(k, _)| k == "llm.total_tokens"));
        assert!(host.recorded > 0);
        c.bench_function("request/chat-1KB-json-answer", |b| {
            b.iter(|| black_box(once()))
        });
    }
}
