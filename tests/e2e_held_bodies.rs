#![cfg(not(target_arch = "wasm32"))]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Requests whose headers the filter holds until the body is read (`settings.forwardAfterBody`,
//! as `render envoy` configures it): a client that sends no body in time gets a 408, never a
//! 500 that blames the configuration. Only a real misconfiguration (Envoy without
//! `allow_on_headers_stop_iteration`, so it keeps the body from the filter) raises the
//! operator's error, and no slow client can trigger it or use it up.

mod support;

use std::time::{Duration, Instant};

use support::client::{Req, SEED_BODY};
use support::envoy::Envoy;
use support::mock::MockServer;
use support::raw::send_raw;
use support::*;

const MANIFESTS: &str = "\
apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMProvider
metadata: {name: dashscope-qwen}
spec:
  host: dashscope.aliyuncs.com
  path: /compatible-mode/v1/chat/completions
  configs:
    defaultConfig:
      openAIConfig: {model: qwen-turbo, apiKey: sk-held-dashscope}
";

const WARNING: &str = "Envoy received a request body but did not hand it to the filter";

/// A chat request's headers, announcing a body that never comes.
fn headers_only() -> Vec<u8> {
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: {DASHSCOPE}\r\ncontent-type: \
         application/json\r\ncontent-length: {}\r\n\r\n",
        SEED_BODY.len()
    )
    .into_bytes()
}

fn start(label: &str, with_flag: bool) -> (MockServer, Envoy) {
    let provider = MockServer::start_tls(&pki().0).expect("mock provider");
    let mut yaml = render_envoy(label, MANIFESTS, &[(DASHSCOPE, provider.addr())]);
    if !with_flag {
        yaml = yaml.replace(
            "allow_on_headers_stop_iteration: true",
            "allow_on_headers_stop_iteration: false",
        );
    }
    let envoy = Envoy::start(&with_hold_timeout(&yaml, 1000), label);
    (provider, envoy)
}

/// Sends the headers alone and expects a 408 once the hold timeout is over.
async fn slow_client_times_out(envoy: &Envoy) {
    let started = Instant::now();
    let resp = send_raw(envoy.addr, headers_only(), Vec::new()).await;
    let waited = started.elapsed();
    assert_openai_error(&resp, 408, "request_timeout");
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
}

#[tokio::test]
async fn a_client_that_sends_no_body_gets_a_408() {
    let (provider, envoy) = start("held-slow", true);
    slow_client_times_out(&envoy).await;
    assert!(provider.all_requests().is_empty());
    // Envoy and the filter are fine: the next request is served.
    let resp = support::client::send(envoy.addr, &Req::chat(DASHSCOPE, SEED_BODY)).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(provider.requests().len(), 1);
    std::thread::sleep(Duration::from_millis(300));
    let log = envoy.log();
    assert!(
        !log.contains(WARNING),
        "a slow client blamed the config:\n{log}"
    );
    assert!(!log.contains("allow_on_headers_stop_iteration"), "{log}");
}

#[tokio::test]
async fn slow_clients_neither_trigger_nor_use_up_the_missing_setting_error() {
    let (provider, envoy) = start("held-no-flag", false);
    for _ in 0..2 {
        slow_client_times_out(&envoy).await;
    }
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !envoy.log().contains(WARNING),
        "slow clients raised the error:\n{}",
        envoy.log()
    );
    // A client that does send its body shows the real misconfiguration.
    let resp = support::client::send(envoy.addr, &Req::chat(DASHSCOPE, SEED_BODY)).await;
    if support::native::native_build() {
        // The dynamic module has no such flag to forget: Envoy always hands it the body.
        assert_eq!(resp.status, 200, "{}", resp.text());
        assert_eq!(provider.all_requests().len(), 1);
        return;
    }
    assert_openai_error(&resp, 500, "body_not_delivered");
    assert!(provider.all_requests().is_empty());
    let log = envoy.wait_for_log(WARNING, Duration::from_secs(5));
    assert!(log.contains(WARNING), "{log}");
    assert!(
        log.contains("allow_on_headers_stop_iteration: true"),
        "{log}"
    );
}
