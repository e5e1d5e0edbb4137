#![cfg(not(target_arch = "wasm32"))]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Cross-provider fallback through the bootstrap `llm-filter render envoy` writes:
//! Envoy retries a failed request on the next provider through an aggregate cluster, and the
//! filter's upstream part rewrites each attempt for its own provider. One mock serves both
//! provider hosts on one address, so attempts can only be told apart by the endpoint metadata
//! the bootstrap attaches (never by address); the mock records each attempt's SNI, path, model
//! and key.

mod support;

/// The access log's `provider` of a request a later provider answered: that provider, or in the
/// native build the provider Envoy routed it to (the dynamic module ABI stores filter state
/// read-only, and the route matched on the first value; `attempts` ends with the answer's).
fn answered_by(provider: &str) -> &str {
    if support::native::native_build() {
        "dashscope-qwen"
    } else {
        provider
    }
}

use std::time::{Duration, Instant};

use support::client::{Req, SEED_BODY};
use support::envoy::Envoy;
use support::fallback::{self, fail};
use support::mock::{Behavior, MockServer, Recorded};
use support::*;

const KEY_A: &str = "sk-fallback-dashscope";
const KEY_B: &str = "sk-fallback-moonshot";

const MANIFESTS: &str = "\
apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMProvider
metadata: {name: dashscope-qwen}
spec:
  host: dashscope.aliyuncs.com
  path: /compatible-mode/v1/chat/completions
  configs:
    defaultConfig:
      openAIConfig: {model: qwen-turbo, apiKey: sk-fallback-dashscope}
---
apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMProvider
metadata: {name: moonshot}
spec:
  host: api.moonshot.cn
  path: /v1/chat/completions
  configs:
    defaultConfig:
      openAIConfig:
        model: moonshot-v1-8k
        apiKey: sk-fallback-moonshot
        modelMapping: {gpt-4o: moonshot-v1-32k}
---
apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMRoute
metadata: {name: ha-route}
spec:
  host: test.com
  rules:
  - name: ha
    backendRefs:
    - providerHost: dashscope.aliyuncs.com
    fallback:
      providers: [api.moonshot.cn]
---
apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMRoute
metadata: {name: plain-route}
spec:
  host: plain.com
  rules:
  - backendRefs:
    - providerHost: dashscope.aliyuncs.com
";

/// `render envoy` of the manifests with both provider hosts at `dashscope` / `moonshot`.
fn render(dashscope: &str, moonshot: &str) -> String {
    let addr = |a: &str| a.parse().expect("a socket address");
    render_envoy(
        "fallback-manifests",
        MANIFESTS,
        &[(DASHSCOPE, addr(dashscope)), (MOONSHOT, addr(moonshot))],
    )
}

fn assert_dashscope_attempt(r: &Recorded) {
    fallback::assert_attempt(r, DASHSCOPE, DASHSCOPE_PATH, "qwen-turbo", KEY_A);
}

fn assert_moonshot_attempt(r: &Recorded) {
    fallback::assert_attempt(r, MOONSHOT, MOONSHOT_PATH, "moonshot-v1-8k", KEY_B);
}

#[tokio::test]
async fn failures_fall_back_to_the_next_provider_rewritten_for_it() {
    let mock = MockServer::start_tls(&pki().0).expect("mock provider");
    let at = mock.addr().to_string();
    let yaml = render(&at, &at);
    let envoy = Envoy::start(&yaml, "fallback");
    let addr = envoy.addr;
    let send = |req: Req| async move { support::client::send(addr, &req).await };

    // 503, then 429: the client gets the second provider's answer; the mock saw both attempts,
    // each rewritten for its own provider.
    for status in [503, 429] {
        mock.clear();
        mock.set_behavior(Behavior {
            fixed_for_sni: vec![fail(DASHSCOPE, status, "dashscope is down")],
            ..Behavior::default()
        });
        let resp = send(Req::chat("test.com", SEED_BODY)).await;
        assert_eq!(resp.status, 200, "{status}: {}", resp.text());
        assert!(
            resp.text().contains("mock of api.moonshot.cn"),
            "{}",
            resp.text()
        );
        assert!(resp.header("x-llm-answered-by").is_none());
        assert!(resp.header("x-llm-attempt").is_none());
        let seen = mock.requests();
        assert_eq!(seen.len(), 2, "{status}: {seen:#?}");
        assert_dashscope_attempt(&seen[0]);
        assert_moonshot_attempt(&seen[1]);
        envoy.assert_logged(&format!(
            "provider={} rule=ha attempts=dashscope-qwen,moonshot model=moonshot-v1-8k",
            answered_by("moonshot")
        ));
    }

    // The first provider got its own model; the next one maps the client's model, not that.
    mock.clear();
    mock.set_behavior(Behavior {
        fixed_for_sni: vec![fail(DASHSCOPE, 503, "dashscope is down")],
        ..Behavior::default()
    });
    let body = r#"{"model": "gpt-4o", "messages": [{"role": "user", "content": "Hi"}]}"#;
    let resp = send(Req::chat("test.com", body)).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let seen = mock.requests();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].model().as_deref(), Some("qwen-turbo"));
    assert_eq!(seen[1].model().as_deref(), Some("moonshot-v1-32k"));
    assert_eq!(seen[1].path, MOONSHOT_PATH);
    assert_bearer(&seen[1], KEY_B);

    // No failure: one attempt, the chosen backend's.
    mock.clear();
    mock.set_behavior(Behavior::default());
    let resp = send(Req::chat("test.com", SEED_BODY)).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let seen = mock.requests();
    assert_eq!(seen.len(), 1);
    assert_dashscope_attempt(&seen[0]);
    envoy.assert_logged("provider=dashscope-qwen rule=ha attempts=- ");

    // Every provider fails: the last provider's error, promptly, after one attempt each.
    mock.clear();
    mock.set_behavior(Behavior {
        fixed_for_sni: vec![
            fail(DASHSCOPE, 503, "dashscope is down"),
            fail(MOONSHOT, 500, "moonshot is down too"),
        ],
        ..Behavior::default()
    });
    let started = Instant::now();
    let resp = send(Req::chat("test.com", SEED_BODY)).await;
    let took = started.elapsed();
    assert_eq!(resp.status, 500, "{}", resp.text());
    assert!(
        resp.text().contains("moonshot is down too"),
        "{}",
        resp.text()
    );
    assert!(took < Duration::from_secs(2), "took {took:?}");
    assert_eq!(mock.requests().len(), 2);

    // A route without fallback is as before: the failure goes to the client, one attempt. A
    // client's own marker is dropped: it cannot steer a request into another rule's fallback.
    mock.clear();
    let resp =
        send(Req::chat("plain.com", SEED_BODY).header("x-llm-fallback", "default/ha-route/0"))
            .await;
    assert_eq!(resp.status, 503, "{}", resp.text());
    assert!(resp.text().contains("dashscope is down"), "{}", resp.text());
    let seen = mock.requests();
    assert_eq!(seen.len(), 1);
    assert_dashscope_attempt(&seen[0]);

    // A streamed request falls back before its first byte, then streams unbuffered.
    mock.clear();
    mock.set_behavior(Behavior {
        fixed_for_sni: vec![fail(DASHSCOPE, 503, "dashscope is down")],
        sse_events: 4,
        sse_gap: Duration::from_millis(250),
        ..Behavior::default()
    });
    let body = r#"{"messages": [{"role": "user", "content": "Hello!"}], "stream": true}"#;
    let resp = send(Req::chat("test.com", body)).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let events = resp.sse_events();
    assert!(events.len() >= 4, "{events:?}");
    let spread = events.last().unwrap().0 - events[0].0;
    assert!(
        spread >= Duration::from_millis(600),
        "events arrived together ({spread:?}): the stream was buffered"
    );
    let seen = mock.requests();
    assert_eq!(seen.len(), 2);
    assert_dashscope_attempt(&seen[0]);
    assert_moonshot_attempt(&seen[1]);
    assert_eq!(seen[1].json().unwrap()["stream"], true);
}

#[tokio::test]
async fn a_refused_connection_falls_back() {
    let mock = MockServer::start_tls(&pki().0).expect("mock provider");
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let yaml = render(&closed.to_string(), &mock.addr().to_string());
    let envoy = Envoy::start(&yaml, "fallback-refused");
    let started = Instant::now();
    let resp = support::client::send(envoy.addr, &Req::chat("test.com", SEED_BODY)).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert!(started.elapsed() < Duration::from_secs(2));
    let seen = mock.requests();
    assert_eq!(seen.len(), 1, "{seen:#?}");
    assert_moonshot_attempt(&seen[0]);
    envoy.assert_logged(&format!(
        "provider={} rule=ha attempts=dashscope-qwen,moonshot",
        answered_by("moonshot")
    ));
}

#[tokio::test]
async fn an_unreachable_last_provider_is_the_one_recorded() {
    // The first provider answers 503, the last one refuses the connection: Envoy answers the
    // client itself, and the log and metrics name the provider that failed last.
    let mock = MockServer::start_tls(&pki().0).expect("mock provider");
    mock.set_behavior(Behavior {
        fixed_for_sni: vec![fail(DASHSCOPE, 503, "dashscope is down")],
        ..Behavior::default()
    });
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let yaml = render(&mock.addr().to_string(), &closed.to_string());
    let envoy = Envoy::start(&yaml, "fallback-last-refused");
    let resp = support::client::send(envoy.addr, &Req::chat("test.com", SEED_BODY)).await;
    assert_eq!(resp.status, 503, "{}", resp.text());
    let seen = mock.requests();
    assert_eq!(seen.len(), 1, "{seen:#?}");
    assert_dashscope_attempt(&seen[0]);
    envoy.assert_logged(&format!(
        "provider={} rule=ha attempts=dashscope-qwen,moonshot",
        answered_by("moonshot")
    ));
}

#[tokio::test]
async fn a_client_without_a_model_sends_none_to_a_provider_without_one() {
    // The first provider sets its model; the next configures none, so it gets what the client
    // sent: no model at all (not the first provider's).
    let manifests = MANIFESTS.replace(
        "      openAIConfig:\n        model: moonshot-v1-8k\n        apiKey: sk-fallback-moonshot\n        modelMapping: {gpt-4o: moonshot-v1-32k}\n",
        "      openAIConfig: {apiKey: sk-fallback-moonshot}\n",
    );
    assert_ne!(manifests, MANIFESTS);
    let mock = MockServer::start_tls(&pki().0).expect("mock provider");
    mock.set_behavior(Behavior {
        fixed_for_sni: vec![fail(DASHSCOPE, 503, "dashscope is down")],
        ..Behavior::default()
    });
    let at: std::net::SocketAddr = mock.addr();
    let yaml = render_envoy(
        "fallback-no-model",
        &manifests,
        &[(DASHSCOPE, at), (MOONSHOT, at)],
    );
    let envoy = Envoy::start(&yaml, "fallback-no-model");
    let body = r#"{"messages": [{"role": "user", "content": "Hi"}], "n": 1}"#;
    let resp = support::client::send(envoy.addr, &Req::chat("test.com", body)).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let seen = mock.requests();
    assert_eq!(seen.len(), 2, "{seen:#?}");
    assert_eq!(seen[0].model().as_deref(), Some("qwen-turbo"));
    let json = seen[1].json().unwrap();
    assert_eq!(
        json,
        serde_json::json!({"messages": [{"role": "user", "content": "Hi"}], "n": 1}),
        "the second attempt's body"
    );
    assert_bearer(&seen[1], KEY_B);
}

/// The bootstrap of `render envoy` without `--endpoint`, patched as the demo's mock stack
/// patches a config (every TLS cluster at the mock): the endpoints keep the metadata that
/// names their provider, so fallback still rewrites each attempt for its own provider.
#[tokio::test]
async fn the_mock_stack_patch_keeps_each_endpoints_provider() {
    let mock = MockServer::start_tls(&pki().0).expect("mock provider");
    let local = MockServer::start_plain().expect("local mock");
    let plain = render_envoy("fallback-unpatched", MANIFESTS, &[]);
    let mut doc: serde_yaml::Value = serde_yaml::from_str(&plain).unwrap();
    let dir = support::envoy::temp_dir("fallback-patched");
    let ca = pki().0.write_ca(&dir).unwrap();
    let env = support::patch::Environment {
        listener_port: 0,
        admin_port: 0,
        provider_addr: mock.addr(),
        plain_clusters: vec![("local-service".into(), local.addr())],
        ca_file: &ca,
        wasm_file: wasm(),
    };
    support::patch::patch(&mut doc, &env).unwrap();
    let yaml = support::patch::render(&doc).unwrap();
    assert!(yaml.contains("filter_metadata"), "{yaml}");
    let envoy = Envoy::start(&yaml, "fallback-patched");
    mock.set_behavior(Behavior {
        fixed_for_sni: vec![fail(DASHSCOPE, 503, "dashscope is down")],
        ..Behavior::default()
    });
    let resp = support::client::send(envoy.addr, &Req::chat("test.com", SEED_BODY)).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let seen = mock.requests();
    assert_eq!(seen.len(), 2, "{seen:#?}");
    assert_dashscope_attempt(&seen[0]);
    assert_moonshot_attempt(&seen[1]);
}

/// Endpoints that do not say which provider they are: no attempt can be placed, so each is
/// refused (503, and an error line), never sent with another provider's key, path and model.
#[tokio::test]
async fn attempts_to_endpoints_without_a_provider_are_refused() {
    let mock = MockServer::start_tls(&pki().0).expect("mock provider");
    let at = mock.addr().to_string();
    let yaml = render(&at, &at);
    let mut doc: serde_yaml::Value = serde_yaml::from_str(&yaml).unwrap();
    let mut stripped = 0;
    for cluster in doc["static_resources"]["clusters"]
        .as_sequence_mut()
        .unwrap()
    {
        let endpoints = cluster
            .get_mut("load_assignment")
            .and_then(|l| l.get_mut("endpoints"))
            .and_then(serde_yaml::Value::as_sequence_mut);
        for locality in endpoints.into_iter().flatten() {
            for lb in locality["lb_endpoints"].as_sequence_mut().unwrap() {
                if lb.as_mapping_mut().unwrap().remove("metadata").is_some() {
                    stripped += 1;
                }
            }
        }
    }
    assert_eq!(stripped, 2, "{yaml}");
    let envoy = Envoy::start(
        &support::patch::render(&doc).unwrap(),
        "fallback-no-metadata",
    );
    for failing in [None, Some(503)] {
        mock.clear();
        mock.set_behavior(Behavior {
            fixed_for_sni: failing
                .map(|status| vec![fail(DASHSCOPE, status, "dashscope is down")])
                .unwrap_or_default(),
            ..Behavior::default()
        });
        let resp = support::client::send(envoy.addr, &Req::chat("test.com", SEED_BODY)).await;
        assert_openai_error(&resp, 503, "provider_unknown");
        assert!(
            mock.all_requests().is_empty(),
            "an attempt went out: {:#?}",
            mock.all_requests()
        );
    }
    envoy.assert_logged("fallback attempt refused (503)");
    envoy.assert_logged("has no filter_metadata.llm.provider");
    // Rules without fallback do not go through the aggregate cluster: unaffected.
    mock.set_behavior(Behavior::default());
    let resp = support::client::send(envoy.addr, &Req::chat("plain.com", SEED_BODY)).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_dashscope_attempt(&mock.requests()[0]);
}
