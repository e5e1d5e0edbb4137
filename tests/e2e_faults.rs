#![cfg(not(target_arch = "wasm32"))]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Upstream faults end to end: real Envoy running the shipped
//! `envoy/mesh.yaml` with the release wasm, and a provider that refuses connections, resets a
//! stream after its first event, is slow to its first byte, or answers 429/500/503.
//!
//! Each test asserts that the client gets Envoy's usual answer within a bounded time (every
//! request runs under a tokio timeout: a hang fails the test), that the filter still records
//! the request (its access-log line and `llm_requests_total` by status class), that Envoy keeps
//! serving, and that its log shows no wasm failure.

mod support;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use support::admin::{admin_get, wasm_failure_lines};
use support::client::{Req, Resp, SEED_BODY};
use support::envoy::Envoy;
use support::mock::{Behavior, FixedReply, MockServer};
use support::*;

const STREAM_BODY: &str =
    r#"{"messages":[{"role":"user","content":"stream please"}],"stream":true}"#;

/// The mocks and an Envoy on `mesh.yaml`, with the provider clusters pointed at
/// `provider_addr` (default: the HTTPS mock) and every route's timeout set if asked.
struct Faulty {
    provider: MockServer,
    _local: MockServer,
    envoy: Envoy,
}

fn start(provider_addr: Option<SocketAddr>, route_timeout: Option<&str>) -> Faulty {
    let provider = MockServer::start_tls(&pki().0).unwrap();
    let local = MockServer::start_plain().unwrap();
    let mut doc = shipped("mesh.yaml");
    let (_, ca) = pki();
    let env = patch::Environment {
        listener_port: 0,
        admin_port: 0,
        provider_addr: provider_addr.unwrap_or(provider.addr()),
        plain_clusters: vec![("local-service".to_string(), local.addr())],
        ca_file: ca,
        wasm_file: wasm(),
    };
    patch::patch(&mut doc, &env).unwrap();
    if let Some(t) = route_timeout {
        patch::set_route_timeout(&mut doc, t).unwrap();
    }
    let envoy = Envoy::start(&patch::render(&doc).unwrap(), "faults");
    Faulty {
        provider,
        _local: local,
        envoy,
    }
}

/// A port on 127.0.0.1 that nothing listens on (bound once by us, then closed).
fn closed_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    addr
}

/// Runs `f`, failing the test if it takes longer than `limit`; returns its output and time.
async fn within<T>(limit: Duration, what: &str, f: impl Future<Output = T>) -> (T, Duration) {
    let started = Instant::now();
    match tokio::time::timeout(limit, f).await {
        Ok(v) => (v, started.elapsed()),
        Err(_) => panic!("{what}: no complete answer within {limit:?} (a hung request)"),
    }
}

/// A chat request to DashScope whose query string marks its access-log line.
fn marked(marker: &str, body: &str) -> Req {
    Req::post(DASHSCOPE, &format!("/?fault={marker}"), body)
        .header("content-type", "application/json")
}

/// The access-log line of the request marked `marker` (`fault=<marker>` in its path), as
/// the whitespace-separated fields after the request line: status, flags, then the rest.
fn access_log_line(envoy: &Envoy, marker: &str) -> String {
    let needle = format!("fault={marker} ");
    let log = envoy.wait_for_log(&needle, Duration::from_secs(10));
    log.lines()
        .find(|l| l.contains(&needle) && l.contains(" provider="))
        .unwrap_or_else(|| panic!("no access-log line for `{marker}`:\n{log}"))
        .to_string()
}

/// The status code and response flags of an access-log line (`"POST /path HTTP/1.1" 503 UF ...`).
fn status_and_flags(line: &str) -> (String, String) {
    let after = line.split("\" ").nth(1).unwrap_or_default();
    let mut it = after.split_whitespace();
    (
        it.next().unwrap_or_default().to_string(),
        it.next().unwrap_or_default().to_string(),
    )
}

fn fields(line: &str) -> BTreeMap<String, String> {
    line.split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// `llm_requests_total` for DashScope's default config by status class.
fn requests_by_class(envoy: &Envoy) -> BTreeMap<String, f64> {
    let (status, body) = admin_get(envoy.admin, "/stats/prometheus").unwrap();
    assert_eq!(status, 200);
    body.lines()
        .filter_map(|line| {
            let rest = line
                .strip_prefix(&support::native::prometheus_name("llm_requests_total"))?
                .strip_prefix('{')?;
            let (labels, value) = rest.split_once("} ")?;
            if !labels.contains("provider=\"dashscope-qwen\"")
                || !labels.contains("model=\"qwen1.5-72b-chat\"")
            {
                return None;
            }
            let class = labels.split("class=\"").nth(1)?.split('"').next()?;
            Some((class.to_string(), value.trim().parse().ok()?))
        })
        .collect()
}

/// Envoy still serves a normal request and its whole log shows no wasm failure.
async fn assert_still_healthy(f: &mut Faulty) {
    f.provider.set_behavior(Behavior::default());
    let (ok, _) = within(
        Duration::from_secs(10),
        "health check",
        f.envoy_send(&marked("healthy", SEED_BODY)),
    )
    .await;
    assert!(f.envoy.is_running(), "Envoy exited");
    assert_eq!(ok.status, 200, "after the fault: {}", ok.text());
    access_log_line(&f.envoy, "healthy");
    let log = f.envoy.log();
    let failures = wasm_failure_lines(&log);
    assert!(
        failures.is_empty(),
        "Envoy's log shows a wasm failure: {failures:#?}"
    );
    assert!(
        !log.contains("sk-demo"),
        "an API key appears in Envoy's log"
    );
}

impl Faulty {
    async fn envoy_send(&self, req: &Req) -> Resp {
        client::send(self.envoy.addr, req).await
    }
}

/// The provider's port is closed: Envoy answers 503 `upstream connect error ...` (flag UF)
/// at once, and the filter counts it as a 5xx of the provider it chose.
#[tokio::test]
async fn connection_refused_gets_envoys_503() {
    let f = start(Some(closed_port()), None);
    for (marker, body) in [("refused", SEED_BODY), ("refused-stream", STREAM_BODY)] {
        let (resp, took) = within(
            Duration::from_secs(5),
            marker,
            f.envoy_send(&marked(marker, body)),
        )
        .await;
        assert_eq!(resp.status, 503, "{marker}: {}", resp.text());
        assert!(
            resp.text()
                .starts_with("upstream connect error or disconnect/reset before headers")
                && resp.text().contains("remote connection failure"),
            "{marker}: not Envoy's connect-failure answer: {}",
            resp.text()
        );
        assert!(took < Duration::from_secs(3), "{marker} took {took:?}");
        let line = access_log_line(&f.envoy, marker);
        assert_eq!(
            status_and_flags(&line),
            ("503".into(), "UF".into()),
            "{line}"
        );
        let fl = fields(&line);
        assert_eq!(fl["provider"], "dashscope-qwen", "{line}");
        assert_eq!(fl["model"], "qwen1.5-72b-chat", "{line}");
    }
    assert_eq!(requests_by_class(&f.envoy).get("5xx"), Some(&2.0));
    let log = f.envoy.log();
    let failures = wasm_failure_lines(&log);
    assert!(failures.is_empty(), "wasm failures: {failures:#?}");
    let mut f = f;
    assert!(f.envoy.is_running());
}

/// The provider resets the stream after its first SSE event: the client has that event,
/// then the stream is cut (no `[DONE]`) well before the events still due; the request is
/// logged with Envoy's upstream-reset flag and counted.
#[tokio::test]
async fn reset_after_first_sse_event_cuts_the_stream() {
    let mut f = start(None, None);
    f.provider.set_behavior(Behavior {
        sse_events: 6,
        sse_gap: Duration::from_millis(200),
        abort_after_events: Some(1),
        ..Behavior::default()
    });
    let (resp, took) = within(
        Duration::from_secs(5),
        "reset stream",
        f.envoy_send(&marked("reset", STREAM_BODY)),
    )
    .await;
    assert_eq!(resp.status, 200, "the headers were sent before the reset");
    let events = resp.sse_events();
    assert_eq!(events.len(), 1, "one event before the reset: {events:?}");
    assert!(
        resp.body_error.is_some(),
        "the client should see the stream cut, got a clean end: {}",
        resp.text()
    );
    assert!(!resp.text().contains("[DONE]"));
    assert!(took < Duration::from_secs(2), "took {took:?}");
    let line = access_log_line(&f.envoy, "reset");
    let (status, flags) = status_and_flags(&line);
    assert_eq!(status, "200", "{line}");
    assert!(flags.contains("UR") || flags.contains("UPE"), "{line}");
    assert_eq!(fields(&line)["provider"], "dashscope-qwen", "{line}");
    assert_eq!(requests_by_class(&f.envoy).get("2xx"), Some(&1.0));
    assert_still_healthy(&mut f).await;
}

/// Slow first byte: beyond the route timeout Envoy answers 504 `upstream request timeout`
/// (flag UT) at the timeout, JSON or stream alike; within it the answer is served.
#[tokio::test]
async fn slow_first_byte_beyond_the_route_timeout_gets_504() {
    let mut f = start(None, Some("1s"));
    f.provider.set_behavior(Behavior {
        header_delay: Duration::from_secs(3),
        ..Behavior::default()
    });
    for (marker, body) in [("slow", SEED_BODY), ("slow-stream", STREAM_BODY)] {
        let (resp, took) = within(
            Duration::from_secs(5),
            marker,
            f.envoy_send(&marked(marker, body)),
        )
        .await;
        assert_eq!(resp.status, 504, "{marker}: {}", resp.text());
        assert_eq!(resp.text(), "upstream request timeout");
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_millis(2500),
            "{marker}: 504 after {took:?}, the route timeout is 1 s"
        );
        let line = access_log_line(&f.envoy, marker);
        assert_eq!(
            status_and_flags(&line),
            ("504".into(), "UT".into()),
            "{line}"
        );
        assert_eq!(fields(&line)["model"], "qwen1.5-72b-chat", "{line}");
    }
    assert_eq!(requests_by_class(&f.envoy).get("5xx"), Some(&2.0));

    f.provider.set_behavior(Behavior {
        header_delay: Duration::from_millis(400),
        ..Behavior::default()
    });
    for (marker, body) in [("prompt", SEED_BODY), ("prompt-stream", STREAM_BODY)] {
        let (resp, took) = within(
            Duration::from_secs(5),
            marker,
            f.envoy_send(&marked(marker, body)),
        )
        .await;
        assert_eq!(resp.status, 200, "{marker}: {}", resp.text());
        assert!(took >= Duration::from_millis(400), "{marker}: {took:?}");
        if body == STREAM_BODY {
            assert!(resp.text().contains("[DONE]"), "{}", resp.text());
        } else {
            assert_eq!(resp.json()["model"], "qwen1.5-72b-chat");
        }
        let line = access_log_line(&f.envoy, marker);
        assert_eq!(
            status_and_flags(&line),
            ("200".into(), "-".into()),
            "{line}"
        );
    }
    assert_eq!(requests_by_class(&f.envoy).get("2xx"), Some(&2.0));
    assert_still_healthy(&mut f).await;
}

/// 429, 500 and 503 from the provider reach the client unchanged (status, content type,
/// body), once each (no retries), and are logged and counted by class.
#[tokio::test]
async fn provider_429_and_5xx_pass_through_with_their_bodies() {
    let mut f = start(None, None);
    let cases: [(u16, &str, &str); 3] = [
        (
            429,
            "application/json",
            r#"{"error":{"message":"Rate limit reached for requests","type":"requests","code":"rate_limit_exceeded"}}"#,
        ),
        (
            500,
            "application/json",
            r#"{"error":{"message":"The server had an error while processing your request.","type":"server_error"}}"#,
        ),
        (
            503,
            "text/html",
            "<html><body>upstream maintenance</body></html>",
        ),
    ];
    for (status, content_type, body) in cases {
        f.provider.set_behavior(Behavior {
            fixed: Some(FixedReply {
                status,
                content_type: content_type.into(),
                body: body.as_bytes().to_vec(),
            }),
            ..Behavior::default()
        });
        let marker = format!("status-{status}");
        let (resp, _) = within(
            Duration::from_secs(5),
            &marker,
            f.envoy_send(&marked(&marker, SEED_BODY)),
        )
        .await;
        assert_eq!(resp.status, status, "{}", resp.text());
        assert_eq!(resp.text(), body, "the provider's body must arrive as sent");
        assert_eq!(resp.header("content-type").as_deref(), Some(content_type));
        let line = access_log_line(&f.envoy, &marker);
        assert_eq!(
            status_and_flags(&line),
            (status.to_string(), "-".into()),
            "{line}"
        );
    }
    assert_eq!(
        f.provider.requests().len(),
        3,
        "one attempt each, no retries"
    );
    let by_class = requests_by_class(&f.envoy);
    assert_eq!(by_class.get("4xx"), Some(&1.0), "{by_class:?}");
    assert_eq!(by_class.get("5xx"), Some(&2.0), "{by_class:?}");
    assert_still_healthy(&mut f).await;
}

/// An invalid body costs the client only that request: the filter's 400 should leave the
/// HTTP/1.1 keep-alive connection open for the next request, as a provider's own 400 does
/// (checked by hand: a mock provider answering 400 gets no `connection: close`). Today Envoy
/// sends the filter's 400 with `connection: close` and closes the connection, so every
/// invalid request costs a reconnect (the soak run opened one connection per invalid body).
/// The request was read to its end before the filter answered, and it happens with the
/// headers held until the body is checked (`forwardAfterBody`, commit 18b7db3) as well as
/// without. Possibly Envoy's connection manager closing an HTTP/1 connection whenever a
/// decoder filter answers before the end of stream has passed the whole decoder chain, in
/// which case the filter cannot avoid it; not settled.
#[tokio::test]
#[ignore = "the filter's 400 for an invalid body closes the client's keep-alive connection (connection: close); src or Envoy, see the doc comment"]
async fn invalid_body_keeps_the_keep_alive_connection() {
    use http_body_util::{BodyExt, Full};
    use hyper::body::Bytes;
    let f = start(None, None);
    let stream = tokio::net::TcpStream::connect(f.envoy.addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = |body: &'static str| {
        hyper::Request::post("/")
            .header("host", "demo-llm-server")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap()
    };
    let first = within(
        Duration::from_secs(5),
        "invalid body",
        sender.send_request(req("[1,2,3]")),
    )
    .await
    .0
    .unwrap();
    assert_eq!(first.status(), 400);
    let close = first.headers().get("connection").cloned();
    first.into_body().collect().await.unwrap();
    assert_eq!(close, None, "the filter's 400 closes the connection");
    within(Duration::from_secs(2), "connection ready", sender.ready())
        .await
        .0
        .expect("the connection was closed after the 400");
    let second = within(
        Duration::from_secs(5),
        "valid body",
        sender.send_request(req(SEED_BODY)),
    )
    .await
    .0
    .unwrap();
    assert_eq!(second.status(), 200);
}
