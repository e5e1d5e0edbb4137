//! The request core against the in-memory host (`fake`): each path of a request's life, with
//! what the core reads, writes and answers.

use std::sync::Arc;

use super::fake::{Fake, FakeConfig, ID_BASE};
use super::*;
#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

const PROVIDERS: &str = "apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMProvider
metadata: {name: p}
spec:
  host: p.example
  path: /v1/chat/completions
  configs:
    defaultConfig: {openAIConfig: {model: p-model, apiKey: sk-p}}
---
apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMProvider
metadata: {name: q}
spec:
  host: q.example
  path: /q/chat
  configs:
    defaultConfig: {openAIConfig: {model: q-model, apiKey: sk-q}}
";
/// q's settings for rule `ha` (only a configuration with that rule may have them).
const Q_HA: &str = "    routeSpecificConfigs:
      ha: {openAIConfig: {model: q-ha, apiKey: sk-q-ha}}
";

/// `PROVIDERS`, a route `llm.example` in namespace `team` with these rules, and `settings`.
fn config(rules: &str, settings: &str) -> String {
    let q_ha = if rules.contains("name: ha\n") {
        Q_HA
    } else {
        ""
    };
    format!(
        "{PROVIDERS}{q_ha}---
apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMRoute
metadata: {{name: r, namespace: team}}
spec:
  host: llm.example
  rules:
{rules}---
settings: {{{settings}}}
"
    )
}

const ONE_RULE: &str = "  - name: main\n    backendRefs: [{providerHost: p.example}]\n";
const FALLBACK: &str = "  - name: ha\n    backendRefs: [{providerHost: p.example}]\n    fallback: {providers: [q.example]}\n";
const BY_MODEL: &str = "  - name: by-model\n    matches: [{model: {prefix: q-}}]\n    backendRefs: [{providerHost: q.example}]\n  - name: rest\n    backendRefs: [{providerHost: p.example}]\n";
const BUDGET: &str = "  - name: main\n    backendRefs: [{providerHost: p.example}]\n    limits: [{name: per-user, tokens: 1000, per: minute, key: {header: x-user-id}}]\n";

fn shared(text: &str, upstream: bool) -> Arc<Shared> {
    if let Err(errors) = Policy::from_text(text) {
        panic!("{errors}\n{text}");
    }
    match Shared::configure(text.as_bytes(), upstream, &mut FakeConfig) {
        Some(shared) => Arc::new(shared),
        None => panic!("the test configuration compiles:\n{text}"),
    }
}

fn downstream(text: &str) -> (Stream, Arc<Worker>) {
    let worker = Arc::new(Worker::new(1));
    (
        Stream::new(7, shared(text, false), Arc::clone(&worker)),
        worker,
    )
}

fn chat(host: &str) -> Fake {
    Fake::request(&[
        (":authority", host),
        (":method", "POST"),
        (":path", "/v1/chat/completions"),
        ("content-type", "application/json"),
        ("transfer-encoding", "chunked"),
        ("x-user-id", "alice"),
    ])
}

const BODY: &str = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#;

fn set_header(host: &mut Fake, name: &str, value: &str) {
    host.request_headers.retain(|(k, _)| k != name);
    host.request_headers
        .push((name.to_string(), value.as_bytes().to_vec()));
}

/// Delivers `body` whole: one callback with end of stream.
fn send_body(stream: &mut Stream, host: &mut Fake, body: &str) -> Flow {
    host.request_body = body.as_bytes().to_vec();
    stream.on_request_body(host, body.len(), true)
}

fn reply(host: &Fake) -> &super::fake::Reply {
    match host.replies.as_slice() {
        [reply] => reply,
        other => panic!("one local reply expected, got {other:?}"),
    }
}

fn error_code(host: &Fake) -> (u32, String) {
    let reply = reply(host);
    let json: serde_json::Value = match serde_json::from_str(&reply.body) {
        Ok(json) => json,
        Err(e) => panic!("not JSON: {e}: {}", reply.body),
    };
    let code = json["error"]["code"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    (reply.status, code)
}

fn respond(stream: &mut Stream, host: &mut Fake, status: &str, content_type: &str) -> Flow {
    host.response_headers = vec![
        (":status".to_string(), status.as_bytes().to_vec()),
        ("content-type".to_string(), content_type.as_bytes().to_vec()),
    ];
    stream.on_response_headers(host, false)
}

fn respond_body(stream: &mut Stream, host: &mut Fake, chunk: &str, end: bool) -> Flow {
    host.response_chunk = chunk.as_bytes().to_vec();
    stream.on_response_body(host, chunk.len(), end)
}

#[test]
fn another_host_costs_one_header_read() {
    let (mut stream, _) = downstream(&config(ONE_RULE, ""));
    let mut host = chat("example.com");
    assert_eq!(stream.on_request_headers(&mut host, false), Flow::Continue);
    assert_eq!(stream.on_request_body(&mut host, 10, true), Flow::Continue);
    assert_eq!(host.calls, ["request_header"]);
}

#[test]
fn held_headers_go_on_with_the_body_and_its_exact_length() {
    let (mut stream, worker) = downstream(&config(ONE_RULE, "forwardAfterBody: true"));
    let mut host = chat("llm.example");
    assert_eq!(stream.on_request_headers(&mut host, false), Flow::Stop);
    // Nothing went to Envoy yet: the headers wait, watched by the timer.
    assert_eq!(host.header_writes, 0);
    assert!(host.state.is_empty());
    assert_eq!(worker.held_count(), 1);

    // A first piece of the body: still buffering, no longer on the hold watch.
    host.request_body = BODY.as_bytes()[..10].to_vec();
    assert_eq!(stream.on_request_body(&mut host, 10, false), Flow::Stop);
    assert_eq!(worker.held_count(), 0);
    assert_eq!(host.header_writes, 0);

    assert_eq!(send_body(&mut stream, &mut host, BODY), Flow::Continue);
    assert_eq!(host.header(":authority").as_deref(), Some("p.example"));
    assert_eq!(
        host.header(":path").as_deref(),
        Some("/v1/chat/completions")
    );
    assert_eq!(host.header("authorization").as_deref(), Some("Bearer sk-p"));
    assert_eq!(host.header("transfer-encoding"), None);
    let body = host.body_text();
    assert!(body.contains(r#""model":"p-model""#), "{body}");
    assert_eq!(host.header("content-length"), Some(body.len().to_string()));
    assert_eq!(host.state_text("llm.provider").as_deref(), Some("p"));
    assert_eq!(host.state_text("llm.rule").as_deref(), Some("main"));
    assert_eq!(host.state_text("llm.model").as_deref(), Some("p-model"));
    assert_eq!(host.route_cache_clears, 1);
    assert!(host.replies.is_empty());
}

#[test]
fn without_holding_the_headers_go_on_at_once_and_the_body_follows() {
    let (mut stream, worker) = downstream(&config(ONE_RULE, ""));
    let mut host = chat("llm.example");
    assert_eq!(stream.on_request_headers(&mut host, false), Flow::Continue);
    assert_eq!(worker.held_count(), 0);
    assert_eq!(host.header(":authority").as_deref(), Some("p.example"));
    // The route requires the mark before the headers go on.
    assert_eq!(host.state_text("llm.provider").as_deref(), Some("p"));
    assert_eq!(host.route_cache_clears, 1);
    let writes = host.header_writes;
    assert!(writes > 0 && writes <= 4, "{writes} header writes");

    assert_eq!(stream.on_request_body(&mut host, 5, false), Flow::Stop);
    assert_eq!(send_body(&mut stream, &mut host, BODY), Flow::Continue);
    assert!(host.body_text().contains(r#""model":"p-model""#));
    // The headers were already gone: no more header writes.
    assert_eq!(host.header_writes, writes);
    assert_eq!(host.state_text("llm.model").as_deref(), Some("p-model"));
}

#[test]
fn a_body_ending_in_trailers_is_finished_there() {
    let (mut stream, _) = downstream(&config(ONE_RULE, "forwardAfterBody: true"));
    let mut host = chat("llm.example");
    stream.on_request_headers(&mut host, false);
    host.request_body = BODY.as_bytes().to_vec();
    assert_eq!(
        stream.on_request_body(&mut host, BODY.len(), false),
        Flow::Stop
    );
    assert_eq!(stream.on_request_trailers(&mut host), Flow::Continue);
    assert_eq!(host.header(":authority").as_deref(), Some("p.example"));
}

#[test]
fn the_body_model_routes_once_the_body_is_read() {
    let text = config(BY_MODEL, "forwardAfterBody: true");
    for (model, provider, rule, authority) in [
        ("q-large", "q", "by-model", "q.example"),
        ("gpt-4o", "p", "rest", "p.example"),
    ] {
        let (mut stream, worker) = downstream(&text);
        let mut host = chat("llm.example");
        assert_eq!(stream.on_request_headers(&mut host, false), Flow::Stop);
        assert_eq!(worker.held_count(), 1);
        let body = BODY.replace("gpt-4o", model);
        assert_eq!(send_body(&mut stream, &mut host, &body), Flow::Continue);
        assert_eq!(host.header(":authority").as_deref(), Some(authority));
        assert_eq!(host.state_text("llm.provider").as_deref(), Some(provider));
        assert_eq!(host.state_text("llm.rule").as_deref(), Some(rule));
        assert_eq!(host.route_cache_clears, 1);
    }
}

#[test]
fn model_routing_needs_held_headers() {
    let (mut stream, _) = downstream(&config(BY_MODEL, ""));
    let mut host = chat("llm.example");
    assert_eq!(stream.on_request_headers(&mut host, false), Flow::Stop);
    assert_eq!(
        error_code(&host),
        (500, "model_routing_unavailable".to_string())
    );
}

#[test]
fn refusals_are_openai_errors() {
    let text = config(
        ONE_RULE,
        "forwardAfterBody: true, maxRequestBodyBytes: 1000",
    );
    // At header time.
    for (headers, end, wanted) in [
        (vec![(":method", "PUT")], false, (405, "method_not_allowed")),
        (
            vec![(":authority", "llm.example.")],
            false,
            (400, "invalid_host"),
        ),
        (
            vec![(":authority", "LLM.example:80:80")],
            false,
            (400, "invalid_host"),
        ),
        (vec![], true, (400, "empty_body")),
    ] {
        let (mut stream, _) = downstream(&text);
        let mut host = chat("llm.example");
        for (name, value) in &headers {
            set_header(&mut host, name, value);
        }
        assert_eq!(stream.on_request_headers(&mut host, end), Flow::Stop);
        assert_eq!(
            error_code(&host),
            (wanted.0, wanted.1.to_string()),
            "{headers:?}"
        );
        assert!(host.state.is_empty());
        if wanted.0 == 405 {
            let allow = &reply(&host).headers;
            assert!(allow
                .iter()
                .any(|(k, v)| k == "allow" && v == "POST, GET, HEAD"));
        }
    }
    // At body time.
    for (body, wanted) in [
        ("{not json", (400, "invalid_json")),
        ("[]", (400, "invalid_body")),
        (r#"{"model":"m"}"#, (400, "missing_messages")),
    ] {
        let (mut stream, _) = downstream(&text);
        let mut host = chat("llm.example");
        stream.on_request_headers(&mut host, false);
        assert_eq!(send_body(&mut stream, &mut host, body), Flow::Stop);
        assert_eq!(
            error_code(&host),
            (wanted.0, wanted.1.to_string()),
            "{body}"
        );
        assert_eq!(host.header_writes, 0, "held headers never went on");
    }
    let (mut stream, _) = downstream(&text);
    let mut host = chat("llm.example");
    stream.on_request_headers(&mut host, false);
    assert_eq!(stream.on_request_body(&mut host, 1001, false), Flow::Stop);
    assert_eq!(error_code(&host), (413, "body_too_large".to_string()));
    // After a refusal the stream is the client's answer: nothing more is done.
    assert_eq!(
        stream.on_request_body(&mut host, 1001, true),
        Flow::Continue
    );
    assert_eq!(host.replies.len(), 1);

    let (mut stream, _) = downstream(&text);
    let mut host = chat("llm.example");
    host.body_unreadable = true;
    stream.on_request_headers(&mut host, false);
    assert_eq!(stream.on_request_body(&mut host, 10, true), Flow::Stop);
    assert_eq!(error_code(&host), (400, "invalid_json".to_string()));
}

#[test]
fn held_requests_time_out_or_name_the_missing_setting() {
    // holdTimeoutMs 400: a tick every 100 ms, 4 ticks.
    let text = config(ONE_RULE, "forwardAfterBody: true, holdTimeoutMs: 400");
    let shared = shared(&text, false);
    assert_eq!(
        shared.hold_tick_period(),
        Some(std::time::Duration::from_millis(100))
    );
    for (received, ticks, wanted) in [
        (Some(0), 4, (408, "request_timeout")),
        (None, 4, (408, "request_timeout")),
        (Some(25), 2, (500, "body_not_delivered")),
    ] {
        let worker = Arc::new(Worker::new(1));
        let mut stream = Stream::new(9, Arc::clone(&shared), Arc::clone(&worker));
        let mut host = chat("llm.example");
        assert_eq!(stream.on_request_headers(&mut host, false), Flow::Stop);
        let header_size = crate::hold::header_bytes(&host.request_headers);
        host.total_size = received.map(|n| n + header_size);
        let mut judged = 0;
        for tick in 1..=ticks {
            for (id, held) in worker.tick() {
                assert_eq!(id, 9);
                judged += 1;
                worker.judge_held(&shared, id, held, &mut host);
            }
            if tick < ticks {
                assert!(host.replies.is_empty(), "answered at tick {tick}");
            }
        }
        assert!(judged > 0);
        assert_eq!(error_code(&host), (wanted.0, wanted.1.to_string()));
        assert_eq!(worker.held_count(), 0);
        assert!(worker.tick().is_empty());
    }
    // A body in time: nothing to judge.
    let worker = Arc::new(Worker::new(1));
    let mut stream = Stream::new(3, Arc::clone(&shared), Arc::clone(&worker));
    let mut host = chat("llm.example");
    stream.on_request_headers(&mut host, false);
    worker.tick();
    send_body(&mut stream, &mut host, BODY);
    assert!(worker.tick().is_empty());
    assert!(worker.tick().is_empty());
    // No timer without held headers.
    assert_eq!(
        self::shared(&config(ONE_RULE, ""), false).hold_tick_period(),
        None
    );
    assert_eq!(self::shared(&text, true).hold_tick_period(), None);
}

#[test]
fn the_model_list_is_answered_locally() {
    let (mut stream, _) = downstream(&config(ONE_RULE, ""));
    let mut host = Fake::request(&[
        (":authority", "llm.example"),
        (":method", "GET"),
        (":path", "/v1/models"),
    ]);
    assert_eq!(stream.on_request_headers(&mut host, true), Flow::Stop);
    let reply = reply(&host);
    assert_eq!(reply.status, 200);
    assert!(reply.body.contains(r#""id":"p-model""#), "{}", reply.body);
    assert!(host.state.is_empty());
}

#[test]
fn a_fallback_request_carries_its_rule_and_the_clients_model() {
    // Headers at once: the key at header time, the client's model at body time.
    let (mut stream, _) = downstream(&config(FALLBACK, ""));
    let mut host = chat("llm.example");
    host.request_headers
        .push(("x-llm-fallback".to_string(), b"forged".to_vec()));
    assert_eq!(stream.on_request_headers(&mut host, false), Flow::Continue);
    assert_eq!(host.header("x-llm-fallback").as_deref(), Some("team/r/0"));
    assert_eq!(
        host.state_text("llm.fallback").as_deref(),
        Some("team/r/0 p.example")
    );
    send_body(&mut stream, &mut host, BODY);
    assert_eq!(
        host.state_text("llm.client_model").as_deref(),
        Some(r#""gpt-4o""#)
    );

    // Held headers: both in one value.
    let (mut stream, _) = downstream(&config(FALLBACK, "forwardAfterBody: true"));
    let mut host = chat("llm.example");
    stream.on_request_headers(&mut host, false);
    send_body(&mut stream, &mut host, BODY);
    assert_eq!(
        host.state_text("llm.fallback").as_deref(),
        Some("team/r/0 p.example\n\"gpt-4o\"")
    );
    assert_eq!(host.state_text("llm.client_model"), None);
}

/// The upstream part's stream for an attempt with the downstream part's filter state.
fn attempt_host(provider: Option<&str>, marker: Option<&str>) -> Fake {
    let mut host = Fake::request(&[
        (":authority", "p.example"),
        (":method", "POST"),
        (":path", "/v1/chat/completions"),
        ("authorization", "Bearer sk-p"),
        ("x-llm-fallback", "team/r/0"),
    ]);
    host.upstream_provider = provider.map(|p| p.as_bytes().to_vec());
    if let Some(marker) = marker {
        host.state
            .insert("llm.fallback".to_string(), marker.as_bytes().to_vec());
    }
    host.request_body = BODY.replace("gpt-4o", "p-model").into_bytes();
    host
}

#[test]
fn a_later_attempt_is_rewritten_for_its_provider() {
    let shared = shared(&config(FALLBACK, "forwardAfterBody: true"), true);
    let mut attempt = AttemptStream::new(11, Arc::clone(&shared));
    let mut host = attempt_host(Some("q.example"), Some("team/r/0 p.example\n\"gpt-4o\""));
    assert_eq!(attempt.on_request_headers(&mut host), Flow::Continue);
    assert_eq!(host.header(":authority").as_deref(), Some("q.example"));
    assert_eq!(host.header(":path").as_deref(), Some("/q/chat"));
    assert_eq!(
        host.header("authorization").as_deref(),
        Some("Bearer sk-q-ha")
    );
    assert_eq!(host.header("x-llm-fallback"), None);
    let len = host.request_body.len();
    assert_eq!(attempt.on_request_body(&mut host, len, false), Flow::Stop);
    assert_eq!(
        attempt.on_request_body(&mut host, len, true),
        Flow::Continue
    );
    assert!(
        host.body_text().contains(r#""model":"q-ha""#),
        "{}",
        host.body_text()
    );

    host.attempt_count = Some(2);
    assert_eq!(attempt.on_response_headers(&mut host), Flow::Continue);
    assert_eq!(
        host.response_header_text(ANSWERED_BY).as_deref(),
        Some("q.example")
    );
    assert_eq!(host.response_header_text(ATTEMPT).as_deref(), Some("2"));
    assert!(host.replies.is_empty());

    // The first attempt goes as the downstream part rewrote it.
    let mut first = AttemptStream::new(12, shared);
    let mut host = attempt_host(Some("p.example"), Some("team/r/0 p.example"));
    let before = host.request_headers.clone();
    assert_eq!(first.on_request_headers(&mut host), Flow::Continue);
    assert_eq!(first.on_request_body(&mut host, 10, true), Flow::Continue);
    assert_eq!(first.on_response_headers(&mut host), Flow::Continue);
    assert_eq!(host.request_headers, before);
    assert!(host.response_headers.is_empty());
}

#[test]
fn an_attempt_that_cannot_be_placed_is_refused() {
    let shared = shared(&config(FALLBACK, ""), true);
    for (provider, marker) in [
        (Some("q.example"), None),
        (None, Some("team/r/0 p.example")),
        (Some("elsewhere.example"), Some("team/r/0 p.example")),
        (Some("q.example"), Some("team/other/0 p.example")),
    ] {
        let mut attempt = AttemptStream::new(13, Arc::clone(&shared));
        let mut host = attempt_host(provider, marker);
        let before = host.request_headers.clone();
        assert_eq!(attempt.on_request_headers(&mut host), Flow::Stop);
        assert_eq!(error_code(&host), (503, "provider_unknown".to_string()));
        // Never sent with another provider's key, path and model.
        assert_eq!(host.request_headers, before);
    }
}

#[test]
fn the_answer_of_a_later_attempt_names_its_provider() {
    let (mut stream, _) = downstream(&config(FALLBACK, "forwardAfterBody: true"));
    let mut host = chat("llm.example");
    stream.on_request_headers(&mut host, false);
    send_body(&mut stream, &mut host, BODY);
    host.response_headers = vec![
        (":status".to_string(), b"200".to_vec()),
        ("content-type".to_string(), b"application/json".to_vec()),
        (ANSWERED_BY.to_string(), b"q.example".to_vec()),
        (ATTEMPT.to_string(), b"2".to_vec()),
    ];
    assert_eq!(stream.on_response_headers(&mut host, false), Flow::Continue);
    assert_eq!(host.response_header_text(ANSWERED_BY), None);
    assert_eq!(host.response_header_text(ATTEMPT), None);
    assert_eq!(host.state_text("llm.provider").as_deref(), Some("q"));
    assert_eq!(host.state_text("llm.attempts").as_deref(), Some("p,q"));
    assert_eq!(host.state_text("llm.model").as_deref(), Some("q-ha"));
    respond_body(&mut stream, &mut host, "{}", true);
    let requests = host.metric(Metric::Requests);
    assert_eq!(requests.len(), 1);
    assert_eq!(
        (requests[0].provider.as_str(), requests[0].model.as_str()),
        ("q", "q-ha")
    );

    // Envoy's own 503 after two attempts: the last provider tried failed.
    let (mut stream, _) = downstream(&config(FALLBACK, ""));
    let mut host = chat("llm.example");
    stream.on_request_headers(&mut host, false);
    send_body(&mut stream, &mut host, BODY);
    host.attempt_count = Some(2);
    respond(&mut stream, &mut host, "503", "text/plain");
    assert_eq!(host.state_text("llm.provider").as_deref(), Some("q"));
    assert_eq!(host.state_text("llm.attempts").as_deref(), Some("p,q"));
}

const JSON_ANSWER: &str = r#"{"id":"c","model":"p-model-0613","choices":[{"message":{"role":"assistant","content":"hello"}}],"usage":{"prompt_tokens":12,"completion_tokens":30,"total_tokens":42}}"#;

#[test]
fn a_json_answer_reports_usage_metrics_and_latency() {
    let (mut stream, _) = downstream(&config(ONE_RULE, ""));
    let mut host = chat("llm.example");
    stream.on_request_headers(&mut host, false);
    send_body(&mut stream, &mut host, BODY);
    host.clock_ms += 250;
    assert_eq!(
        respond(&mut stream, &mut host, "200", "application/json"),
        Flow::Continue
    );
    let (a, b) = JSON_ANSWER.split_at(40);
    assert_eq!(
        respond_body(&mut stream, &mut host, a, false),
        Flow::Continue
    );
    assert!(host.metrics.is_empty());
    respond_body(&mut stream, &mut host, b, true);
    assert_eq!(host.state_text("llm.prompt_tokens").as_deref(), Some("12"));
    assert_eq!(
        host.state_text("llm.completion_tokens").as_deref(),
        Some("30")
    );
    assert_eq!(host.state_text("llm.total_tokens").as_deref(), Some("42"));
    assert_eq!(
        host.state_text("llm.response_model").as_deref(),
        Some("p-model-0613")
    );
    let value = |metric| {
        host.metric(metric)
            .iter()
            .map(|r| r.value)
            .collect::<Vec<_>>()
    };
    assert_eq!(value(Metric::Requests), [1]);
    assert_eq!(host.metric(Metric::Requests)[0].class, Some("2xx"));
    assert_eq!(
        host.metric(Metric::Requests)[0].id,
        ID_BASE + Metric::Requests.index() as u32
    );
    assert_eq!(value(Metric::UpstreamLatency), [250]);
    assert_eq!(value(Metric::PromptTokens), [12]);
    assert_eq!(value(Metric::CompletionTokens), [30]);
    assert!(value(Metric::UsageUnknown).is_empty());
    assert!(value(Metric::TimeToFirstToken).is_empty());
    let series = &host.metrics[0];
    assert_eq!(
        (
            series.provider.as_str(),
            series.model.as_str(),
            series.rule.as_str()
        ),
        ("p", "p-model", "main")
    );
    // Once: the log callback after the end records nothing more.
    let count = host.metrics.len();
    stream.on_log(&mut host);
    assert_eq!(host.metrics.len(), count);
}

#[test]
fn a_stream_reports_its_first_event_once_and_a_cut_answer_on_log() {
    let (mut stream, _) = downstream(&config(ONE_RULE, ""));
    let mut host = chat("llm.example");
    stream.on_request_headers(&mut host, false);
    send_body(&mut stream, &mut host, BODY);
    respond(&mut stream, &mut host, "200", "text/event-stream");
    host.clock_ms += 40;
    respond_body(&mut stream, &mut host, "data: {\"choices\":[]}\n\n", false);
    host.clock_ms += 40;
    respond_body(&mut stream, &mut host, "data: {\"choices\":[]}\n\n", false);
    let ttft: Vec<u64> = host
        .metric(Metric::TimeToFirstToken)
        .iter()
        .map(|r| r.value)
        .collect();
    assert_eq!(ttft, [40]);
    // Cut short: counted on log, usage unknown.
    stream.on_log(&mut host);
    assert_eq!(host.metric(Metric::Requests).len(), 1);
    assert_eq!(host.metric(Metric::UsageUnknown).len(), 1);
    assert_eq!(host.metric(Metric::UpstreamLatency)[0].value, 80);
}

#[test]
fn a_budget_is_marked_and_debited_once() {
    let (mut stream, _) = downstream(&config(BUDGET, "forwardAfterBody: true"));
    let mut host = chat("llm.example");
    stream.on_request_headers(&mut host, false);
    send_body(&mut stream, &mut host, BODY);
    assert_eq!(
        host.state_text("llm.limit.team/r/main/per-user").as_deref(),
        Some("alice")
    );
    assert_eq!(host.state_text(limits::DEBIT_STATE), None);
    respond(&mut stream, &mut host, "200", "application/json");
    respond_body(&mut stream, &mut host, JSON_ANSWER, true);
    assert_eq!(host.state_text(limits::DEBIT_STATE).as_deref(), Some("42"));
    host.state.remove(limits::DEBIT_STATE);
    stream.on_log(&mut host);
    assert_eq!(host.state_text(limits::DEBIT_STATE), None, "written once");

    // An answer that never came debits 0.
    let (mut stream, _) = downstream(&config(BUDGET, ""));
    let mut host = chat("llm.example");
    stream.on_request_headers(&mut host, false);
    stream.on_log(&mut host);
    assert_eq!(host.state_text(limits::DEBIT_STATE).as_deref(), Some("0"));
}

#[test]
fn the_rate_limit_filters_429_is_counted_by_rule_and_debits_nothing() {
    // Refused before the body was read (headers went on at once).
    let (mut stream, _) = downstream(&config(BUDGET, ""));
    let mut host = chat("llm.example");
    stream.on_request_headers(&mut host, false);
    host.code_details = Some(b"request_rate_limited".to_vec());
    respond(&mut stream, &mut host, "429", "text/plain");
    let limited = host.metric(Metric::RateLimited);
    assert_eq!(limited.len(), 1);
    assert_eq!(
        (
            limited[0].provider.as_str(),
            limited[0].model.as_str(),
            limited[0].rule.as_str()
        ),
        ("p", "p-model", "main")
    );
    assert_eq!(host.state_text(limits::DEBIT_STATE).as_deref(), Some("0"));
    assert!(host.metric(Metric::Requests).is_empty());

    // After the body: not the provider's answer either.
    let (mut stream, _) = downstream(&config(BUDGET, "forwardAfterBody: true"));
    let mut host = chat("llm.example");
    stream.on_request_headers(&mut host, false);
    send_body(&mut stream, &mut host, BODY);
    host.code_details = Some(b"request_rate_limited".to_vec());
    respond(&mut stream, &mut host, "429", "text/plain");
    respond_body(&mut stream, &mut host, "slow down", true);
    stream.on_log(&mut host);
    assert_eq!(host.metric(Metric::RateLimited).len(), 1);
    assert!(host.metric(Metric::Requests).is_empty());
    assert_eq!(host.state_text(limits::DEBIT_STATE).as_deref(), Some("0"));

    // A provider's own 429 is its answer: one property read, then counted as usual.
    let (mut stream, _) = downstream(&config(BUDGET, "forwardAfterBody: true"));
    let mut host = chat("llm.example");
    stream.on_request_headers(&mut host, false);
    send_body(&mut stream, &mut host, BODY);
    respond(&mut stream, &mut host, "429", "application/json");
    respond_body(&mut stream, &mut host, "{}", true);
    assert!(host.metric(Metric::RateLimited).is_empty());
    assert_eq!(host.metric(Metric::Requests)[0].class, Some("4xx"));
    assert_eq!(
        host.calls
            .iter()
            .filter(|c| **c == "response_code_details")
            .count(),
        1
    );
}

#[test]
fn series_fold_into_other_past_the_cap() {
    let worker = Worker::new(0);
    let shared = shared(&config(ONE_RULE, ""), false);
    let Decision::Forward(call) = shared
        .policy
        .decide(&chat("llm.example").request_headers, &mut &worker.rng)
    else {
        panic!("routed");
    };
    for i in 0..MAX_SERIES_SETS {
        let series = worker.series_for(&call, &format!("m{i}"));
        assert_eq!(series.index, i);
    }
    let other = worker.series_for(&call, "one-more");
    assert_eq!(other.model, "other");
    assert_eq!(other.index, MAX_SERIES_SETS);
    assert_eq!(worker.series_for(&call, "m3").index, 3);
    assert_eq!(
        worker.series_for(&call, "yet-another").index,
        MAX_SERIES_SETS
    );
}

#[test]
fn a_refused_configuration_gives_no_shared_state() {
    assert!(Shared::configure(b"\xff\xfe", false, &mut FakeConfig).is_none());
    assert!(Shared::configure(b"settings: {nope: 1}", false, &mut FakeConfig).is_none());
    let empty = Shared::configure(b"", false, &mut FakeConfig);
    let Some(empty) = empty else {
        panic!("an empty configuration passes everything through");
    };
    let mut stream = Stream::new(1, Arc::new(empty), Arc::new(Worker::new(0)));
    let mut host = chat("llm.example");
    assert_eq!(stream.on_request_headers(&mut host, false), Flow::Continue);
}
