#![cfg(not(target_arch = "wasm32"))]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Model-aware routing and model mapping, through the bootstrap `llm-filter render
//! envoy` makes: `matches[].model` routes on the body's model (the filter holds the headers
//! until the body is read), `openAIConfig.modelMapping` renames it for the provider, and
//! `GET /v1/models` lists what a client may ask for.

mod support;

use std::time::Duration;

use support::client::Req;
use support::envoy::Envoy;
use support::mock::{Behavior, MockServer};
use support::*;

const HOST: &str = "llm.local";

const MANIFESTS: &str = "\
apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMProvider
metadata: {name: dashscope}
spec:
  host: dashscope.aliyuncs.com
  path: /compatible-mode/v1/chat/completions
  configs:
    defaultConfig:
      openAIConfig:
        apiKey: sk-models-dashscope
        modelMapping: {gpt-4o: qwen-max, 'gpt-*': qwen-plus}
    routeSpecificConfigs:
      vip-qwen:
        openAIConfig: {model: qwen-turbo, apiKey: sk-models-dashscope-vip}
---
apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMProvider
metadata: {name: moonshot}
spec:
  host: api.moonshot.cn
  path: /v1/chat/completions
  configs:
    defaultConfig:
      openAIConfig: {apiKey: sk-models-moonshot}
---
apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMRoute
metadata: {name: models}
spec:
  host: llm.local
  rules:
  - name: vip-qwen
    matches:
    - headers: {user-type: {exact: subscriber}}
      model: {prefix: qwen-}
    backendRefs: [{providerHost: dashscope.aliyuncs.com}]
  - name: qwen
    matches: [{model: {prefix: qwen-}}]
    backendRefs: [{providerHost: dashscope.aliyuncs.com}]
  - name: moonshot
    matches: [{model: {regex: 'moonshot-v1-(8|32|128)k'}}]
    backendRefs: [{providerHost: api.moonshot.cn}]
  - name: gpt
    matches: [{model: {prefix: gpt-}}]
    backendRefs: [{providerHost: dashscope.aliyuncs.com}]
";

/// The mock provider (both provider hosts point at it) and Envoy on what `render envoy` made.
struct Models {
    provider: MockServer,
    envoy: Envoy,
}

fn rendered(provider: &MockServer) -> String {
    render_envoy(
        "models-manifests",
        MANIFESTS,
        &[(DASHSCOPE, provider.addr()), (MOONSHOT, provider.addr())],
    )
}

fn start() -> Models {
    let provider = MockServer::start_tls(&pki().0).expect("mock provider");
    let yaml = rendered(&provider);
    assert!(
        yaml.contains("allow_on_headers_stop_iteration: true"),
        "{yaml}"
    );
    let envoy = Envoy::start(&yaml, "models");
    Models { provider, envoy }
}

impl Models {
    async fn chat(&self, model: &str, extra: &[(&str, &str)]) -> support::client::Resp {
        let body =
            format!(r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}]}}"#);
        let mut req = Req::chat(HOST, &body);
        for (name, value) in extra {
            req = req.header(name, value);
        }
        support::client::send(self.envoy.addr, &req).await
    }

    /// SNI, path, model and redacted key of the last request the mock saw.
    fn last(&self) -> (String, String, String) {
        let seen = self.provider.requests();
        let last = seen.last().expect("the provider saw a request");
        (
            last.sni.clone().unwrap_or_default(),
            last.path.clone(),
            last.model().unwrap_or_default(),
        )
    }
}

#[tokio::test]
async fn mapped_models_and_routing_by_model() {
    let m = start();
    let cases = [
        // (client model, headers, SNI, path, upstream model, key)
        (
            "gpt-4o",
            vec![],
            DASHSCOPE,
            DASHSCOPE_PATH,
            "qwen-max",
            "sk-models-dashscope",
        ),
        (
            "gpt-4-turbo",
            vec![],
            DASHSCOPE,
            DASHSCOPE_PATH,
            "qwen-plus",
            "sk-models-dashscope",
        ),
        (
            "qwen-long",
            vec![],
            DASHSCOPE,
            DASHSCOPE_PATH,
            "qwen-long",
            "sk-models-dashscope",
        ),
        (
            "moonshot-v1-8k",
            vec![],
            MOONSHOT,
            MOONSHOT_PATH,
            "moonshot-v1-8k",
            "sk-models-moonshot",
        ),
        // Header and model conditions together: the subscriber's qwen request takes vip-qwen...
        (
            "qwen-long",
            vec![("user-type", "subscriber")],
            DASHSCOPE,
            DASHSCOPE_PATH,
            "qwen-turbo",
            "sk-models-dashscope-vip",
        ),
        // ...but a subscriber asking for a Moonshot model does not match it.
        (
            "moonshot-v1-32k",
            vec![("user-type", "subscriber")],
            MOONSHOT,
            MOONSHOT_PATH,
            "moonshot-v1-32k",
            "sk-models-moonshot",
        ),
    ];
    for (model, headers, sni, path, upstream, key) in cases {
        let resp = m.chat(model, &headers).await;
        assert_eq!(resp.status, 200, "{model}: {}", resp.text());
        let (seen_sni, seen_path, seen_model) = m.last();
        assert_eq!(
            (seen_sni.as_str(), seen_path.as_str(), seen_model.as_str()),
            (sni, path, upstream),
            "{model} {headers:?}"
        );
        assert_bearer(m.provider.requests().last().unwrap(), key);
        assert_no_stale_content_length(m.provider.requests().last().unwrap());
    }

    // No rule for this model, or no model at all: 404, and the provider sees nothing.
    let before = m.provider.all_requests().len();
    let unknown = m.chat("claude-3", &[]).await;
    assert_openai_error(&unknown, 404, "route_not_found");
    let nameless = support::client::send(
        m.envoy.addr,
        &Req::chat(HOST, r#"{"messages":[{"role":"user","content":"hi"}]}"#),
    )
    .await;
    assert_openai_error(&nameless, 404, "route_not_found");
    assert_eq!(m.provider.all_requests().len(), before);
}

#[tokio::test]
async fn model_routed_streams_are_not_held() {
    let m = start();
    m.provider.set_behavior(Behavior {
        sse_events: 3,
        sse_gap: Duration::from_millis(150),
        ..Behavior::default()
    });
    let body =
        r#"{"model":"moonshot-v1-8k","messages":[{"role":"user","content":"hi"}],"stream":true}"#;
    let resp = support::client::send(m.envoy.addr, &Req::chat(HOST, body)).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let events = resp.sse_events();
    assert_eq!(events.last().map(|(_, d)| d.as_str()), Some("[DONE]"));
    let first = events.first().unwrap().0;
    let last = events.last().unwrap().0;
    assert!(
        last - first >= Duration::from_millis(300),
        "events arrived together ({first:?}..{last:?}): the stream was held back"
    );
    assert_eq!(m.last().0, MOONSHOT);
}

#[tokio::test]
async fn models_endpoint_lists_what_clients_may_ask_for() {
    let m = start();
    let mut req = Req::post(HOST, "/v1/models", Vec::new());
    req.method = "GET".into();
    let resp = support::client::send(m.envoy.addr, &req).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(
        resp.header("content-type").as_deref(),
        Some("application/json")
    );
    let list = resp.json();
    assert_eq!(list["object"], "list");
    let ids: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    // Mapping keys that are names (not `gpt-*`) and configured models, once each, of the
    // rules this client can reach: vip-qwen's qwen-turbo is for subscribers.
    assert_eq!(ids, vec!["gpt-4o"]);
    req.headers.push(("user-type".into(), "subscriber".into()));
    let resp = support::client::send(m.envoy.addr, &req).await;
    let ids: Vec<String> = resp.json()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, vec!["gpt-4o", "qwen-turbo"]);
    assert!(m.provider.all_requests().is_empty());
}

#[test]
fn model_routes_without_the_body_aware_envoy_setting_fail_loudly() {
    let provider = MockServer::start_tls(&pki().0).expect("mock provider");
    // An Envoy that lets the headers go at once (as Istio's WasmPlugin does).
    let yaml = rendered(&provider)
        .replace(
            "allow_on_headers_stop_iteration: true",
            "allow_on_headers_stop_iteration: false",
        )
        .replace("forwardAfterBody: true", "forwardAfterBody: false");
    let envoy = Envoy::start(&yaml, "models-no-hold");
    let said = |log: &str| {
        log.matches("a route matches on the request's model, but the headers cannot wait")
            .count()
    };
    // Said when the configuration loads (once per Wasm VM), before any client asks.
    let at_start = said(&envoy.log());
    assert!(at_start >= 1, "{}", envoy.log());
    assert_eq!(
        at_start,
        envoy.log().matches("configuration accepted").count(),
        "{}",
        envoy.log()
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    for _ in 0..3 {
        let body = r#"{"model":"qwen-long","messages":[{"role":"user","content":"hi"}]}"#;
        let resp = rt.block_on(support::client::send(envoy.addr, &Req::chat(HOST, body)));
        assert_eq!(resp.status, 500, "{}", resp.text());
        let error = resp.json();
        assert_eq!(error["error"]["code"], "model_routing_unavailable");
        assert_eq!(error["error"]["type"], "server_error");
        let message = error["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("allow_on_headers_stop_iteration"),
            "{message}"
        );
        assert!(message.contains("forwardAfterBody"), "{message}");
    }
    assert!(provider.all_requests().is_empty());
    std::thread::sleep(Duration::from_millis(300));
    let log = envoy.log();
    assert_eq!(said(&log), at_start, "not per request:\n{log}");
}

/// `forwardAfterBody` without Envoy's `allow_on_headers_stop_iteration`: Envoy never hands the
/// filter the body. Instead of hanging, each such request gets a 500 naming the setting after
/// `settings.holdTimeoutMs`, and the log says it once.
#[test]
fn held_headers_without_the_envoy_flag_fail_loudly() {
    let provider = MockServer::start_tls(&pki().0).expect("mock provider");
    let yaml = with_hold_timeout(
        &rendered(&provider).replace(
            "allow_on_headers_stop_iteration: true",
            "allow_on_headers_stop_iteration: false",
        ),
        1000,
    );
    let envoy = Envoy::start(&yaml, "models-no-flag");
    let rt = tokio::runtime::Runtime::new().unwrap();
    if support::native::native_build() {
        // The dynamic module has no such flag: Envoy always hands it the body of headers it
        // holds, so the same requests are served.
        for model in ["qwen-long", "gpt-4o"] {
            let body =
                format!(r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}]}}"#);
            let resp = rt.block_on(support::client::send(envoy.addr, &Req::chat(HOST, &body)));
            assert_eq!(resp.status, 200, "{model}: {}", resp.text());
        }
        assert_eq!(provider.all_requests().len(), 2);
        assert!(!envoy
            .log()
            .contains("Envoy received a request body but did not hand it to the filter"));
        return;
    }
    for model in ["qwen-long", "gpt-4o"] {
        let body =
            format!(r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}]}}"#);
        let started = std::time::Instant::now();
        let resp = rt.block_on(async {
            tokio::time::timeout(
                Duration::from_secs(10),
                support::client::send(envoy.addr, &Req::chat(HOST, &body)),
            )
            .await
            .expect("the held request was answered, not left hanging")
        });
        assert_openai_error(&resp, 500, "body_not_delivered");
        // Detected from what Envoy holds, a tick or two after the headers: not after the
        // hold timeout, which is what a client that sends nothing gets (held_bodies.rs).
        assert!(
            started.elapsed() < Duration::from_millis(900),
            "{:?}",
            started.elapsed()
        );
    }
    assert!(provider.all_requests().is_empty());
    std::thread::sleep(Duration::from_millis(300));
    let log = envoy.log();
    assert_eq!(
        log.matches("Envoy received a request body but did not hand it to the filter")
            .count(),
        1,
        "logged once:\n{log}"
    );
}
