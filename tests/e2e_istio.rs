#![cfg(not(target_arch = "wasm32"))]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The seeds, and what else the filter promises on Istio, through istiod's own translation
//! code: `scripts/mesh.sh up` renders the manifests with `render istio`, tests/istiod (istiod's
//! FakeDiscoveryServer, its real generators, WasmPlugin translation and EnvoyFilter patching)
//! serves them over ADS, and real Envoy 1.40 runs them as a sidecar (namespace `default`,
//! labels `app: sleep`) and as an ingress gateway (namespace `istio-system`, labels
//! `istio: ingressgateway`). The providers are this test's HTTPS mocks.

mod support;

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use serde_json::Value;
use support::client::{send, send_h2, Req, SEED_BODY};
use support::mesh::{Mesh, MeshBuilder, Proxy};
use support::mock::{Behavior, MockServer, Recorded};
use support::raw::send_raw_from;
use support::*;

const DENIED: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

/// The seed's AuthorizationPolicy with the client address to refuse filled in, as its comment
/// tells users to do.
fn seed_authorization_policy(ip: &str) -> String {
    let path = repo().join("istio/authorization-policy.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains("203.0.113.7"));
    text.replace("203.0.113.7", ip)
}

/// A mesh of both seeds (`envoy/manifests/`, each file rendered on its own), the seeds' Gateway
/// and Service, and `extra` Istio files, the providers at `mock`.
fn seeds_mesh(label: &str, mock: &MockServer, extra: &[&str]) -> Mesh {
    seeds_builder(label, mock, extra).up()
}

/// The seeds' manifests, Gateway and Service, the mock as both providers, and `extra`.
fn seeds_builder(label: &str, mock: &MockServer, extra: &[&str]) -> MeshBuilder {
    let mut builder = Mesh::builder(label)
        .shipped_manifests("mesh.yaml")
        .shipped_manifests("gateway.yaml")
        .shipped_istio("ingress-gw.yaml")
        .shipped_istio("demo-llm-server.yaml")
        .provider(DASHSCOPE, mock.addr())
        .provider(MOONSHOT, mock.addr());
    for text in extra {
        builder = builder.istio(text);
    }
    builder
}

/// A call rewritten for DashScope with `model` and `key`.
fn assert_dashscope(r: &Recorded, model: &str, key: &str) {
    assert_call(r, DASHSCOPE, DASHSCOPE_PATH, model, key);
}

/// A call of the seeds' split: DashScope's or Moonshot's, as its SNI says, each rewritten for
/// its provider.
fn assert_split_call(r: &Recorded) {
    if r.sni.as_deref() == Some(DASHSCOPE) {
        assert_dashscope(r, "qwen1.5-72b-chat", KEY_DASHSCOPE);
    } else {
        assert_call(r, MOONSHOT, MOONSHOT_PATH, "moonshot-v1-8k", KEY_MOONSHOT);
    }
}

/// How many of `seen` went to DashScope.
fn dashscope_share(seen: &[Recorded]) -> usize {
    seen.iter()
        .filter(|r| r.sni.as_deref() == Some(DASHSCOPE))
        .count()
}

fn assert_call(r: &Recorded, host: &str, path: &str, model: &str, key: &str) {
    assert!(r.tls, "{r:?}");
    assert_eq!(r.sni.as_deref(), Some(host), "{r:?}");
    assert_eq!(r.authority.as_deref(), Some(host), "{r:?}");
    assert_eq!(r.path, path, "{r:?}");
    assert_eq!(r.model().as_deref(), Some(model), "{r:?}");
    assert_bearer(r, key);
    assert_no_stale_content_length(r);
}

/// The HTTP filters of the proxy's listener on `port`, in order: (name, whether it comes over
/// ECDS).
fn http_filters(mesh: &Mesh, proxy: Proxy, port: u16) -> Vec<(String, bool)> {
    listener_http_filters(mesh, proxy, port)
        .iter()
        .map(|f| {
            (
                f["name"].as_str().unwrap().to_string(),
                f.get("config_discovery").is_some(),
            )
        })
        .collect()
}

/// The HTTP filters of the proxy's listener on `port`, in order, as Envoy holds them.
fn listener_http_filters(mesh: &Mesh, proxy: Proxy, port: u16) -> Vec<Value> {
    let dump = mesh.config_dump(proxy, "?resource=dynamic_listeners");
    let listener = dump["configs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| &c["active_state"]["listener"])
        .find(|l| l["address"]["socket_address"]["port_value"] == port)
        .unwrap_or_else(|| panic!("{}: no listener on port {port}: {dump:#}", proxy.name()));
    let hcm = listener["filter_chains"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|c| c["filters"].as_array().unwrap())
        .find(|f| f["name"] == "envoy.filters.network.http_connection_manager")
        .unwrap_or_else(|| panic!("no HTTP connection manager: {listener:#}"));
    hcm["typed_config"]["http_filters"]
        .as_array()
        .unwrap()
        .clone()
}

/// The ECDS filter named `name` the proxy received: it is the llm-filter module from the
/// release build with the rendered configuration.
fn assert_ecds_filter(mesh: &Mesh, proxy: Proxy, name: &str) -> Value {
    let dump = mesh.config_dump(proxy, "?resource=ecds_filters");
    let filters: Vec<&Value> = dump["configs"]
        .as_array()
        .unwrap_or_else(|| panic!("{}: no ECDS filters: {dump:#}", proxy.name()))
        .iter()
        .map(|c| &c["ecds_filter"])
        .collect();
    let names: Vec<&str> = filters
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, [name], "{}", proxy.name());
    let config = &filters[0]["typed_config"]["config"];
    assert_eq!(config["root_id"], "llm-filter");
    assert_eq!(
        config["vm_config"]["code"]["local"]["filename"],
        wasm().to_string_lossy().as_ref()
    );
    let configuration = config["configuration"]["value"].as_str().unwrap();
    llm_filter::policy::Policy::from_text(configuration).unwrap();
    filters[0].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seeds_run_on_a_sidecar_and_a_gateway_configured_by_istiod() {
    let mock = MockServer::start_tls(&pki().0).expect("mock provider");
    let policy = seed_authorization_policy("127.0.0.2");
    let mesh = seeds_mesh("seeds", &mock, &[&policy]);

    // Seed 001 on the sidecar: a direct call to the provider host.
    let resp = send(mesh.sidecar, &Req::chat(DASHSCOPE, SEED_BODY)).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.json()["model"], "qwen1.5-72b-chat");
    let seen = mock.requests();
    assert_eq!(seen.len(), 1);
    assert_dashscope(&seen[0], "qwen1.5-72b-chat", KEY_DASHSCOPE);

    // The same over HTTP/2 (h2c), and as a subscriber: rule vip-route, qwen-turbo, VIP key.
    mock.clear();
    let resp = send_h2(mesh.sidecar, &Req::chat(DASHSCOPE, SEED_BODY)).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let req = Req::chat(DASHSCOPE, SEED_BODY).header("user-type", "subscriber");
    let resp = send(mesh.sidecar, &req).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.json()["model"], "qwen-turbo");
    let seen = mock.requests();
    assert_dashscope(&seen[0], "qwen1.5-72b-chat", KEY_DASHSCOPE);
    assert_dashscope(&seen[1], "qwen-turbo", KEY_DASHSCOPE_VIP);

    // The 50/50 split of demo-llm-server over 200 requests.
    mock.clear();
    for _ in 0..200 {
        let resp = send(mesh.sidecar, &Req::chat("demo-llm-server", SEED_BODY)).await;
        assert_eq!(resp.status, 200, "{}", resp.text());
    }
    let seen = mock.requests();
    assert_eq!(seen.len(), 200);
    let dashscope = dashscope_share(&seen);
    seen.iter().for_each(assert_split_call);
    // Binomial(200, 0.5): outside 70..=130 with a probability below 1e-5.
    assert!(
        (70..=130).contains(&dashscope),
        "{dashscope} of 200 to DashScope"
    );

    // Streaming stays unbuffered: the events arrive as the provider sends them.
    mock.clear();
    mock.set_behavior(Behavior {
        sse_events: 5,
        sse_gap: Duration::from_millis(150),
        ..Behavior::default()
    });
    let body = r#"{"messages": [{"role": "user", "content": "hi"}], "stream": true}"#;
    let resp = send(mesh.sidecar, &Req::chat(DASHSCOPE, body)).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let events = resp.sse_events();
    assert!(events.len() >= 6, "{events:?}");
    let first = events[0].0;
    let last = events[events.len() - 1].0;
    assert!(
        last - first >= Duration::from_millis(600),
        "the events arrived together ({first:?} .. {last:?}): the stream was buffered"
    );
    mock.set_behavior(Behavior::default());

    // Seed 000 on the gateway: test.com reaches DashScope as qwen-1.8b-chat, stream false.
    mock.clear();
    let resp = send(
        mesh.gateway,
        &Req::chat(
            "test.com",
            "{\"messages\": [{\"role\": \"user\", \"content\": \"请介绍你自己\"}]}",
        ),
    )
    .await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.json()["model"], "qwen-1.8b-chat");
    let seen = mock.requests();
    assert_eq!(seen.len(), 1);
    assert_dashscope(&seen[0], "qwen-1.8b-chat", KEY_GATEWAY);
    assert_eq!(seen[0].json().unwrap()["stream"], false);

    // The seed's AuthorizationPolicy: the denied client gets Istio's 403 and nothing reaches a
    // provider; over HTTP/1.1, HTTP/2 and a raw request alike.
    mock.clear();
    let denied = Req::chat("test.com", SEED_BODY).bind_source(DENIED);
    let resp = send(mesh.gateway, &denied).await;
    assert_eq!(resp.status, 403, "{}", resp.text());
    assert_eq!(resp.text(), "RBAC: access denied");
    let resp = send_h2(mesh.gateway, &denied).await;
    assert_eq!(resp.status, 403, "{}", resp.text());
    let raw = format!(
        "POST / HTTP/1.1\r\nHost: test.com\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{SEED_BODY}",
        SEED_BODY.len()
    );
    let answer = send_raw_from(Some(DENIED), mesh.gateway, raw.into_bytes(), Vec::new()).await;
    assert_eq!(answer.status, 403, "{}", answer.text());
    assert_eq!(answer.text(), "RBAC: access denied");
    assert!(mock.all_requests().is_empty(), "{:#?}", mock.all_requests());
    // Other clients are served.
    let resp = send(mesh.gateway, &Req::chat("test.com", SEED_BODY)).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    mesh.assert_logged(Proxy::Gateway, "downstream=127.0.0.2:");

    // The filter arrived through istiod's ECDS: the WasmPlugin's translated name, in the
    // listener after Istio's authorization filter and before the router.
    assert_ecds_filter(
        &mesh,
        Proxy::Gateway,
        "extensions.istio.io/trafficextension/istio-system.llm-filter-ingressgateway~istio-translated-wasmplugin",
    );
    let filters = http_filters(&mesh, Proxy::Gateway, mesh.gateway.port());
    let position = |name: &str| filters.iter().position(|(n, _)| n == name);
    let llm = filters
        .iter()
        .position(|(n, ecds)| *ecds && n.contains("llm-filter"))
        .unwrap_or_else(|| panic!("{filters:?}"));
    assert!(
        position("envoy.filters.http.rbac").unwrap() < llm,
        "{filters:?}"
    );
    assert_eq!(
        filters.last().unwrap().0,
        "envoy.filters.http.router",
        "{filters:?}"
    );
    assert_ecds_filter(
        &mesh,
        Proxy::Sidecar,
        "extensions.istio.io/trafficextension/default.llm-filter~istio-translated-wasmplugin",
    );
    let filters = http_filters(&mesh, Proxy::Sidecar, 80);
    assert!(
        filters
            .iter()
            .any(|(n, ecds)| *ecds && n.contains("default.llm-filter")),
        "{filters:?}"
    );
    mesh.assert_no_wasm_failures();
}

/// The dynamic module filter istiod put into a proxy's listener on `port` from `render istio
/// --native`'s EnvoyFilter: just before the router (after Istio's RBAC filter, where there is
/// one), not over ECDS, loading `libllm_filter.so` with a configuration the filter accepts.
fn assert_native_filter(mesh: &Mesh, proxy: Proxy, port: u16) -> llm_filter::policy::Policy {
    let filters = listener_http_filters(mesh, proxy, port);
    let names: Vec<&str> = filters
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names[names.len() - 2..],
        [
            "envoy.filters.http.dynamic_modules",
            "envoy.filters.http.router"
        ],
        "{}: {names:?}",
        proxy.name()
    );
    assert!(
        !names.iter().any(|n| n.contains("llm-filter")),
        "{}: a WasmPlugin's filter too: {names:?}",
        proxy.name()
    );
    if let Some(rbac) = names.iter().position(|n| *n == "envoy.filters.http.rbac") {
        assert!(rbac < names.len() - 2, "{}: {names:?}", proxy.name());
    }
    let filter = &filters[names.len() - 2];
    assert!(filter.get("config_discovery").is_none(), "{filter:#}");
    let config = &filter["typed_config"];
    assert_eq!(
        config["@type"],
        "type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter"
    );
    assert_eq!(config["dynamic_module_config"]["name"], "llm_filter");
    assert_eq!(config["dynamic_module_config"]["metrics_namespace"], "llm");
    assert_eq!(config["filter_name"], native::FILTER_NAME);
    let configuration = config["filter_config"]["value"].as_str().unwrap();
    llm_filter::policy::Policy::from_text(configuration).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seeds_run_the_native_module_from_an_envoy_filter_on_a_sidecar_and_a_gateway() {
    let mock = MockServer::start_tls(&pki().0).expect("mock provider");
    let policy = seed_authorization_policy("127.0.0.2");
    let mesh = seeds_builder("native-seeds", &mock, &[&policy])
        .native()
        .up();

    // Where istiod put the EnvoyFilters' filter; no WasmPlugin, so nothing over ECDS.
    assert_native_filter(&mesh, Proxy::Sidecar, 80);
    assert_native_filter(&mesh, Proxy::Gateway, mesh.gateway.port());
    for proxy in [Proxy::Sidecar, Proxy::Gateway] {
        // Envoy answers 404 for a resource type it holds none of.
        let (status, body) =
            support::admin::admin_get(mesh.admin(proxy), "/config_dump?resource=ecds_filters")
                .unwrap();
        assert_eq!(status, 404, "{}: {body}", proxy.name());
        assert!(body.contains("ecds_filters not found"), "{body}");
    }

    // Seed 001 on the sidecar: a direct call, the subscriber rule, and the 50/50 split.
    let resp = send(mesh.sidecar, &Req::chat(DASHSCOPE, SEED_BODY)).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.json()["model"], "qwen1.5-72b-chat");
    let req = Req::chat(DASHSCOPE, SEED_BODY).header("user-type", "subscriber");
    let resp = send_h2(mesh.sidecar, &req).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.json()["model"], "qwen-turbo");
    let seen = mock.requests();
    assert_eq!(seen.len(), 2, "{seen:#?}");
    assert_dashscope(&seen[0], "qwen1.5-72b-chat", KEY_DASHSCOPE);
    assert_dashscope(&seen[1], "qwen-turbo", KEY_DASHSCOPE_VIP);
    mock.clear();
    for _ in 0..40 {
        let resp = send(mesh.sidecar, &Req::chat("demo-llm-server", SEED_BODY)).await;
        assert_eq!(resp.status, 200, "{}", resp.text());
    }
    let seen = mock.requests();
    assert_eq!(seen.len(), 40);
    seen.iter().for_each(assert_split_call);
    // Binomial(40, 0.5): all 40 to one provider with a probability below 1e-11.
    let dashscope = dashscope_share(&seen);
    assert!(
        (1..40).contains(&dashscope),
        "{dashscope} of 40 to DashScope"
    );

    // Seed 000 on the gateway: test.com reaches DashScope as qwen-1.8b-chat with the gateway key.
    mock.clear();
    let resp = send(mesh.gateway, &Req::chat("test.com", SEED_BODY)).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.json()["model"], "qwen-1.8b-chat");
    let seen = mock.requests();
    assert_eq!(seen.len(), 1, "{seen:#?}");
    assert_dashscope(&seen[0], "qwen-1.8b-chat", KEY_GATEWAY);

    // The seed's AuthorizationPolicy refuses the denied client before the module runs.
    mock.clear();
    let denied = Req::chat("test.com", SEED_BODY).bind_source(DENIED);
    let resp = send(mesh.gateway, &denied).await;
    assert_eq!(resp.status, 403, "{}", resp.text());
    assert_eq!(resp.text(), "RBAC: access denied");
    assert!(mock.all_requests().is_empty(), "{:#?}", mock.all_requests());

    // The module counted the requests it routed, under its metrics namespace.
    for (proxy, expected) in [(Proxy::Sidecar, 42), (Proxy::Gateway, 1)] {
        let (_, body) =
            support::admin::admin_get(mesh.admin(proxy), "/stats?filter=^llm\\.").unwrap();
        let total: u64 = body
            .lines()
            .filter(|l| l.starts_with("llm.requests_total"))
            .filter_map(|l| {
                l.rsplit_once(": ")
                    .and_then(|(_, v)| v.trim().parse::<u64>().ok())
            })
            .sum();
        assert_eq!(total, expected, "{}: {body}", proxy.name());
    }
}

/// RequestAuthentication for the demo issuer and an AuthorizationPolicy that lets only requests
/// with a valid JWT reach test.com on the gateway (the seed's "JWT" security option).
fn jwt_policies() -> String {
    let jwks = std::fs::read_to_string(repo().join("tests/data/jwt/demo-jwks.json")).unwrap();
    let jwks: Value = serde_json::from_str(&jwks).unwrap();
    format!(
        "apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: demo-issuer, namespace: istio-system}}
spec:
  selector:
    matchLabels: {{istio: ingressgateway}}
  jwtRules:
  - issuer: {issuer}
    audiences: [{audience}]
    jwks: '{jwks}'
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: require-jwt, namespace: istio-system}}
spec:
  selector:
    matchLabels: {{istio: ingressgateway}}
  action: ALLOW
  rules:
  - from:
    - source:
        requestPrincipals: ['*']
    to:
    - operation:
        hosts: [test.com]
",
        issuer = jwt::ISSUER,
        audience = jwt::AUDIENCE,
        jwks = jwks,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_requires_a_jwt_before_the_filter_runs() {
    let mock = MockServer::start_tls(&pki().0).expect("mock provider");
    let mesh = Mesh::builder("jwt")
        .shipped_manifests("gateway.yaml")
        .shipped_istio("ingress-gw.yaml")
        .istio(&jwt_policies())
        .provider(DASHSCOPE, mock.addr())
        .up();

    // No token: Istio's authorization refuses, nothing reaches the provider.
    let resp = send(mesh.gateway, &Req::chat("test.com", SEED_BODY)).await;
    assert_eq!(resp.status, 403, "{}", resp.text());
    assert_eq!(resp.text(), "RBAC: access denied");
    // A token signed by another key, or for another audience: refused by the JWT filter.
    let forged = jwt::sign(&jwt::claims("alice"))
        .replace('.', ".x")
        .replacen(".x", ".", 1);
    let resp = send(
        mesh.gateway,
        &Req::chat("test.com", SEED_BODY).header("authorization", &format!("Bearer {forged}")),
    )
    .await;
    assert_eq!(resp.status, 401, "{}", resp.text());
    let mut claims = jwt::claims("alice");
    claims["aud"] = "someone-else".into();
    let resp = send(
        mesh.gateway,
        &Req::chat("test.com", SEED_BODY)
            .header("authorization", &format!("Bearer {}", jwt::sign(&claims))),
    )
    .await;
    assert!(
        matches!(resp.status, 401 | 403),
        "{} {}",
        resp.status,
        resp.text()
    );
    assert!(mock.all_requests().is_empty(), "{:#?}", mock.all_requests());

    // A valid token: the provider gets its own key only, never the client's JWT.
    let token = jwt::sign(&jwt::claims("alice"));
    let req = Req::chat("test.com", SEED_BODY).header("authorization", &format!("Bearer {token}"));
    let resp = send(mesh.gateway, &req).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let seen = mock.requests();
    assert_eq!(seen.len(), 1);
    assert_dashscope(&seen[0], "qwen-1.8b-chat", KEY_GATEWAY);
    assert!(
        !seen[0]
            .headers
            .iter()
            .any(|(_, v)| String::from_utf8_lossy(v).contains(&token)),
        "the JWT reached the provider"
    );
    mesh.assert_no_wasm_failures();
}

const KEY_A: &str = "sk-istio-dashscope";
const KEY_B: &str = "sk-istio-moonshot";

/// Manifests that need the EnvoyFilter forms: fallback (a sidecar route and a gateway route)
/// and routing on the request's model. The gateway route's host is longer than its provider's:
/// istiod then names the gateway's one virtual host for both (it collapses hosts with the same
/// routes, the longest first) after the route host, not the provider's.
const FALLBACK_MANIFESTS: &str = "\
apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMProvider
metadata: {name: dashscope-qwen, namespace: default}
spec:
  host: dashscope.aliyuncs.com
  path: /compatible-mode/v1/chat/completions
  configs:
    defaultConfig:
      openAIConfig: {model: qwen-turbo, apiKey: sk-istio-dashscope}
---
apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMProvider
metadata: {name: moonshot, namespace: default}
spec:
  host: api.moonshot.cn
  path: /v1/chat/completions
  configs:
    defaultConfig:
      openAIConfig: {model: moonshot-v1-8k, apiKey: sk-istio-moonshot}
---
apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMRoute
metadata: {name: ha-route, namespace: default}
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
metadata: {name: edge-route, namespace: default}
spec:
  host: assistants.chat.example.com
  gateways: [istio-system/ingress-gw]
  rules:
  - backendRefs:
    - providerHost: dashscope.aliyuncs.com
    fallback:
      providers: [api.moonshot.cn]
---
apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMRoute
metadata: {name: models, namespace: default}
spec:
  host: models.example.com
  rules:
  - matches:
    - model: {prefix: moonshot-}
    backendRefs:
    - providerHost: api.moonshot.cn
  - backendRefs:
    - providerHost: dashscope.aliyuncs.com
";

fn assert_dashscope_attempt(r: &Recorded) {
    fallback::assert_attempt(r, DASHSCOPE, DASHSCOPE_PATH, "qwen-turbo", KEY_A);
}

fn assert_moonshot_attempt(r: &Recorded) {
    fallback::assert_attempt(r, MOONSHOT, MOONSHOT_PATH, "moonshot-v1-8k", KEY_B);
}

/// A request to `host` on `proxy` while DashScope fails (`dash` answers `status`, or is gone
/// when `status` is None): Moonshot answers it, each attempt rewritten for its provider.
async fn falls_back(
    mesh: &Mesh,
    proxy: Proxy,
    host: &str,
    dash: Option<&MockServer>,
    moon: &MockServer,
    cluster: &str,
) {
    falls_back_logging(mesh, proxy, host, dash, moon, cluster, "moonshot").await;
}

/// [`falls_back`], the access log naming `provider` (the native module keeps the provider the
/// request was routed to: docs/native.md).
async fn falls_back_logging(
    mesh: &Mesh,
    proxy: Proxy,
    host: &str,
    dash: Option<&MockServer>,
    moon: &MockServer,
    cluster: &str,
    provider: &str,
) {
    moon.clear();
    if let Some(dash) = dash {
        dash.clear();
    }
    let resp = send(mesh.addr(proxy), &Req::chat(host, SEED_BODY)).await;
    assert_eq!(resp.status, 200, "{} {host}: {}", proxy.name(), resp.text());
    assert!(
        resp.text().contains("mock of api.moonshot.cn"),
        "{}",
        resp.text()
    );
    if let Some(dash) = dash {
        let tried = dash.requests();
        assert_eq!(tried.len(), 1, "{tried:#?}");
        assert_dashscope_attempt(&tried[0]);
    }
    let answered = moon.requests();
    assert_eq!(answered.len(), 1, "{answered:#?}");
    assert_moonshot_attempt(&answered[0]);
    mesh.assert_logged(proxy, &format!("cluster={cluster} upstream="));
    mesh.assert_logged(
        proxy,
        &format!("provider={provider} attempts=dashscope-qwen,moonshot"),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallback_and_model_routing_work_in_their_envoy_filter_forms() {
    let dash = MockServer::start_tls(&pki().0).expect("mock provider");
    let moon = MockServer::start_tls(&pki().0).expect("mock provider");
    let mesh = Mesh::builder("fallback")
        .manifests(FALLBACK_MANIFESTS)
        .shipped_istio("ingress-gw.yaml")
        .provider(DASHSCOPE, dash.addr())
        .provider(MOONSHOT, moon.addr())
        .up();
    // The EnvoyFilter form's filter sits just before the router, on both proxies.
    for (proxy, port) in [(Proxy::Sidecar, 80), (Proxy::Gateway, mesh.gateway.port())] {
        let filters = http_filters(&mesh, proxy, port);
        let names: Vec<&str> = filters.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names[names.len() - 2..],
            ["llm-filter", "envoy.filters.http.router"],
            "{}: {names:?}",
            proxy.name()
        );
    }
    let sidecar_cluster = "llm-fallback|default.ha-route.0|dashscope.aliyuncs.com";
    let gateway_cluster = "llm-fallback|default.edge-route.0|dashscope.aliyuncs.com";

    // A 503 and a 429 from DashScope fall back to Moonshot, on both proxies.
    for status in [503, 429] {
        dash.set_behavior(Behavior {
            fixed_for_sni: vec![fallback::fail(DASHSCOPE, status, "dashscope is down")],
            ..Behavior::default()
        });
        falls_back(
            &mesh,
            Proxy::Sidecar,
            "test.com",
            Some(&dash),
            &moon,
            sidecar_cluster,
        )
        .await;
        falls_back(
            &mesh,
            Proxy::Gateway,
            "assistants.chat.example.com",
            Some(&dash),
            &moon,
            gateway_cluster,
        )
        .await;
    }
    dash.set_behavior(Behavior::default());

    // No failure: one attempt, DashScope's.
    dash.clear();
    moon.clear();
    let resp = send(mesh.sidecar, &Req::chat("test.com", SEED_BODY)).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(dash.requests().len(), 1);
    assert_dashscope_attempt(&dash.requests()[0]);
    assert!(moon.requests().is_empty());

    // Routing on the body's model (the EnvoyFilter form holds the headers until the body).
    dash.clear();
    let body = r#"{"model": "moonshot-v1-8k", "messages": [{"role": "user", "content": "hi"}]}"#;
    let resp = send(mesh.sidecar, &Req::chat("models.example.com", body)).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(moon.requests().len(), 1);
    assert_call(
        &moon.requests()[0],
        MOONSHOT,
        MOONSHOT_PATH,
        "moonshot-v1-8k",
        KEY_B,
    );
    let resp = send(mesh.sidecar, &Req::chat("models.example.com", SEED_BODY)).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(dash.requests().len(), 1);
    assert_dashscope(&dash.requests()[0], "qwen-turbo", KEY_A);

    // DashScope refuses connections: both proxies fall back.
    drop(dash);
    tokio::time::sleep(Duration::from_millis(200)).await;
    falls_back(
        &mesh,
        Proxy::Sidecar,
        "test.com",
        None,
        &moon,
        sidecar_cluster,
    )
    .await;
    falls_back(
        &mesh,
        Proxy::Gateway,
        "assistants.chat.example.com",
        None,
        &moon,
        gateway_cluster,
    )
    .await;
    mesh.assert_no_wasm_failures();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallback_and_model_routing_run_the_native_module_downstream_and_upstream() {
    let dash = MockServer::start_tls(&pki().0).expect("mock provider");
    let moon = MockServer::start_tls(&pki().0).expect("mock provider");
    let mesh = Mesh::builder("native-fallback")
        .manifests(FALLBACK_MANIFESTS)
        .shipped_istio("ingress-gw.yaml")
        .provider(DASHSCOPE, dash.addr())
        .provider(MOONSHOT, moon.addr())
        .native()
        .up();
    assert_native_filter(&mesh, Proxy::Sidecar, 80);
    assert_native_filter(&mesh, Proxy::Gateway, mesh.gateway.port());

    // A 503 from DashScope falls back to Moonshot through the aggregate cluster, whose upstream
    // part (the module again) rewrites each attempt for its provider, on both proxies.
    dash.set_behavior(Behavior {
        fixed_for_sni: vec![fallback::fail(DASHSCOPE, 503, "dashscope is down")],
        ..Behavior::default()
    });
    for (proxy, host, route) in [
        (Proxy::Sidecar, "test.com", "ha-route"),
        (Proxy::Gateway, "assistants.chat.example.com", "edge-route"),
    ] {
        falls_back_logging(
            &mesh,
            proxy,
            host,
            Some(&dash),
            &moon,
            &format!("llm-fallback|default.{route}.0|dashscope.aliyuncs.com"),
            "dashscope-qwen",
        )
        .await;
    }
    dash.set_behavior(Behavior::default());

    // Routing on the body's model: the module holds the headers until the body.
    dash.clear();
    moon.clear();
    let body = r#"{"model": "moonshot-v1-8k", "messages": [{"role": "user", "content": "hi"}]}"#;
    let resp = send(mesh.sidecar, &Req::chat("models.example.com", body)).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(moon.requests().len(), 1);
    assert_call(
        &moon.requests()[0],
        MOONSHOT,
        MOONSHOT_PATH,
        "moonshot-v1-8k",
        KEY_B,
    );
    let resp = send(mesh.sidecar, &Req::chat("models.example.com", SEED_BODY)).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(dash.requests().len(), 1);
    assert_dashscope(&dash.requests()[0], "qwen-turbo", KEY_A);
}

/// Providers of seed 001 and one route for demo-llm-server to `provider`.
fn reload_manifests(provider: &str) -> String {
    format!(
        "apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMProvider
metadata: {{name: dashscope-qwen, namespace: default}}
spec:
  host: dashscope.aliyuncs.com
  path: /compatible-mode/v1/chat/completions
  configs:
    defaultConfig:
      openAIConfig: {{model: qwen-turbo, apiKey: sk-istio-dashscope}}
---
apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMProvider
metadata: {{name: moonshot, namespace: default}}
spec:
  host: api.moonshot.cn
  path: /v1/chat/completions
  configs:
    defaultConfig:
      openAIConfig: {{model: moonshot-v1-8k, apiKey: sk-istio-moonshot}}
---
apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMRoute
metadata: {{name: demo-llm-server, namespace: default}}
spec:
  host: demo-llm-server
  rules:
  - backendRefs:
    - providerHost: {provider}
"
    )
}

/// A VirtualService of the user's own, unrelated to the filter; `attempts` -1 is invalid.
fn spare_virtual_service(attempts: i32) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: spare, namespace: default}}
spec:
  hosts: [spare.example.com]
  http:
  - route:
    - destination: {{host: spare.example.com}}
    retries: {{attempts: {attempts}}}
"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_changed_route_goes_out_over_ecds_under_load_and_an_invalid_change_does_not() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    let mock = MockServer::start_tls(&pki().0).expect("mock provider");
    mock.set_recording(false);
    let mesh = Mesh::builder("reload")
        .manifests(&reload_manifests(DASHSCOPE))
        .shipped_istio("demo-llm-server.yaml")
        .istio(&spare_virtual_service(2))
        .provider(DASHSCOPE, mock.addr())
        .provider(MOONSHOT, mock.addr())
        .up();
    let ecds_reloads = "extension_config_discovery.http_filter.extensions.istio.io/\
                        trafficextension/default.llm-filter~istio-translated-wasmplugin.config_reload";
    let reloads_before = mesh.stat(Proxy::Sidecar, ecds_reloads).unwrap();

    // Clients keep sending (4 at a time, bounded by count and time) while the change goes out.
    let stop = Arc::new(AtomicBool::new(false));
    let answers: Arc<Mutex<Vec<(u16, String)>>> = Arc::default();
    let started = std::time::Instant::now();
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (stop, answers, addr) = (stop.clone(), answers.clone(), mesh.sidecar);
        clients.push(tokio::spawn(async move {
            for _ in 0..5000 {
                if stop.load(Ordering::SeqCst) || started.elapsed() > Duration::from_secs(90) {
                    break;
                }
                let resp = send(addr, &Req::chat("demo-llm-server", SEED_BODY)).await;
                let model = if resp.status == 200 {
                    resp.json()["model"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string()
                } else {
                    resp.text()
                };
                answers.lock().unwrap().push((resp.status, model));
            }
        }));
    }
    let wait_for = |n: usize| {
        let answers = answers.clone();
        async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            while answers.lock().unwrap().len() < n {
                assert!(std::time::Instant::now() < deadline, "clients stalled");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    wait_for(40).await;

    // Re-render the changed LLMRoute and push it: Moonshot takes over, through ECDS.
    std::fs::write(&mesh.manifests[0], reload_manifests(MOONSHOT)).unwrap();
    let pushed = mesh
        .reload()
        .unwrap_or_else(|e| panic!("reload refused: {e}"));
    assert!(pushed.contains("updated"), "{pushed}");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let switched_at = loop {
        let seen = answers.lock().unwrap().clone();
        if let Some(i) = seen.iter().position(|(_, m)| m == "moonshot-v1-8k") {
            break i;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the new rule never took effect"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(mesh.stat(Proxy::Sidecar, ecds_reloads).unwrap() > reloads_before);
    let settled = answers.lock().unwrap().len() + 8;
    wait_for(settled + 40).await;

    // Invalid changes are refused, naming the object, and the old configuration keeps serving:
    // one Istio's validation refuses, one the filter refuses at render time.
    std::fs::write(&mesh.istio[1], spare_virtual_service(-1)).unwrap();
    let refused = mesh.reload().unwrap_err();
    assert!(
        refused.contains("VirtualService default/spare: attempts cannot be negative"),
        "{refused}"
    );
    std::fs::write(&mesh.istio[1], spare_virtual_service(2)).unwrap();
    std::fs::write(&mesh.manifests[0], reload_manifests("nowhere.example.com")).unwrap();
    let refused = mesh.reload().unwrap_err();
    assert!(
        refused.contains("LLMRoute default/demo-llm-server"),
        "{refused}"
    );
    let after_refusals = answers.lock().unwrap().len();
    wait_for(after_refusals + 40).await;

    stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.await.unwrap();
    }
    let seen = answers.lock().unwrap().clone();
    let failed: Vec<&(u16, String)> = seen.iter().filter(|(s, _)| *s != 200).collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {failed:?}",
        failed.len(),
        seen.len()
    );
    assert!(
        seen[..switched_at].iter().all(|(_, m)| m == "qwen-turbo"),
        "{seen:?}"
    );
    // After the switch settled (requests in flight during the push may still be DashScope's),
    // Moonshot answers everything, through both refused changes.
    assert!(
        seen[settled..].iter().all(|(_, m)| m == "moonshot-v1-8k"),
        "{:?}",
        &seen[settled..]
    );
    assert!(mock.received() >= seen.len());
    mesh.assert_no_wasm_failures();
}

#[test]
fn mesh_up_fails_naming_what_istio_or_a_proxy_refused() {
    // Istio's validation refuses an object: nothing starts, the object and reason are named.
    let refused = Mesh::builder("invalid")
        .shipped_manifests("gateway.yaml")
        .istio(&spare_virtual_service(-1))
        .try_up()
        .err()
        .expect("an invalid VirtualService must stop scripts/mesh.sh up");
    assert!(
        refused.contains("VirtualService default/spare: attempts cannot be negative"),
        "{refused}"
    );

    // istiod accepts it but Envoy rejects it: a cluster Envoy cannot build.
    let bad_cluster = "apiVersion: networking.istio.io/v1alpha3
kind: EnvoyFilter
metadata: {name: bad-cluster, namespace: istio-system}
spec:
  configPatches:
  - applyTo: CLUSTER
    match: {context: GATEWAY}
    patch:
      operation: ADD
      value:
        name: bad
        type: STATIC
        connect_timeout: 1s
        load_assignment:
          cluster_name: bad
          endpoints:
          - lb_endpoints:
            - endpoint: {address: {socket_address: {address: not-an-ip, port_value: 80}}}
";
    let refused = Mesh::builder("rejected")
        .shipped_manifests("gateway.yaml")
        .shipped_istio("ingress-gw.yaml")
        .istio(bad_cluster)
        .provider(DASHSCOPE, "127.0.0.1:9".parse().unwrap())
        .try_up()
        .err()
        .expect("a cluster the gateway rejects must stop scripts/mesh.sh up");
    assert!(
        refused.contains("gateway: rejected a cluster update"),
        "{refused}"
    );
    assert!(refused.contains("not-an-ip"), "{refused}");
}

/// The host-form table (`tests/support/host_forms.rs`, as `e2e_host_forms.rs` runs it on
/// standalone Envoy) through what istiod generates, where Istio sets up the connection manager
/// itself: the sidecar with seed 001, the gateway with seed 000 and the seed's
/// AuthorizationPolicy (DENY 127.0.0.2), from an allowed and a denied client. No form reaches a
/// provider unrewritten or gets past the policy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_host_form_reaches_a_provider_unrewritten_or_skips_the_policy() {
    use support::host_forms::*;
    let mock = MockServer::start_tls(&pki().0).expect("mock provider");
    let policy = seed_authorization_policy("127.0.0.2");
    let mesh = seeds_mesh("host-forms", &mock, &[&policy]);

    let sidecar = Target {
        others_go_nowhere: true,
        ..Target::new(
            "Istio sidecar",
            mesh.sidecar,
            &mock,
            vec![
                (DASHSCOPE, DASHSCOPE_PATH, KEY_DASHSCOPE),
                (MOONSHOT, MOONSHOT_PATH, KEY_MOONSHOT),
            ],
        )
    };
    let hosts = [
        ("demo-llm-server", Kind::Route),
        (DASHSCOPE, Kind::Route),
        (MOONSHOT, Kind::Provider),
        ("example.com", Kind::Other),
    ];
    sidecar
        .table(&hosts, |kind| match kind {
            Kind::Other => Expect::NotServed,
            _ => Expect::Served,
        })
        .await;
    sidecar.odd_forms("demo-llm-server", "example.com").await;

    let hosts = [
        ("test.com", Kind::Route),
        (DASHSCOPE, Kind::GatewayProvider),
        ("example.com", Kind::Other),
    ];
    for (source, denied) in [(None, false), (Some(DENIED), true)] {
        let gateway = Target {
            name: format!(
                "Istio gateway{}",
                if denied { " from 127.0.0.2" } else { "" }
            ),
            addr: mesh.gateway,
            source,
            others_go_nowhere: true,
            // An AuthorizationPolicy's `hosts: [test.com]` matches exactly `test.com`.
            host_with_port: false,
            calls: vec![(DASHSCOPE, DASHSCOPE_PATH, KEY_GATEWAY)],
            ..sidecar.clone_for()
        };
        let before = mock.all_requests().len();
        gateway
            .table(&hosts, |kind| match (kind, denied) {
                (Kind::Route, false) => Expect::Served,
                (Kind::Route, true) => Expect::Refused(Some(403)),
                (Kind::GatewayProvider, _) => Expect::Refused(Some(404)),
                _ => Expect::NotServed,
            })
            .await;
        gateway.odd_forms("test.com", "example.com").await;
        if denied {
            assert_eq!(
                mock.all_requests().len(),
                before,
                "a denied client reached the provider"
            );
        }
    }
    mesh.assert_no_wasm_failures();
}

/// The same table on a gateway whose AuthorizationPolicy requires a JWT from a
/// RequestAuthentication for test.com: without a valid token no form gets through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_host_form_skips_the_jwt_requirement() {
    use support::host_forms::*;
    let mock = MockServer::start_tls(&pki().0).expect("mock provider");
    let mesh = Mesh::builder("host-forms-jwt")
        .shipped_manifests("gateway.yaml")
        .shipped_istio("ingress-gw.yaml")
        .istio(&jwt_policies())
        .provider(DASHSCOPE, mock.addr())
        .up();
    let token = jwt::sign(&jwt::claims("alice"));
    let hosts = [
        ("test.com", Kind::Route),
        (DASHSCOPE, Kind::GatewayProvider),
        ("example.com", Kind::Other),
    ];
    for (credential, valid) in [(CLIENT_TOKEN.to_string(), false), (token, true)] {
        let gateway = Target {
            headers: vec![bearer(&credential)],
            credential: credential.clone(),
            others_go_nowhere: true,
            host_with_port: false,
            ..Target::new(
                format!(
                    "Istio JWT gateway {} a valid token",
                    if valid { "with" } else { "without" }
                ),
                mesh.gateway,
                &mock,
                vec![(DASHSCOPE, DASHSCOPE_PATH, KEY_GATEWAY)],
            )
        };
        let before = mock.all_requests().len();
        gateway
            .table(&hosts, |kind| match (kind, valid) {
                (Kind::Route, true) => Expect::Served,
                // 401 for a token that is no JWT, 403 for none at all.
                (Kind::Route, false) => Expect::Refused(None),
                // The ALLOW policy names only test.com: every other host is refused by it.
                (Kind::GatewayProvider, _) => Expect::Refused(None),
                _ => Expect::NotServed,
            })
            .await;
        gateway.odd_forms("test.com", "example.com").await;
        if !valid {
            assert_eq!(
                mock.all_requests().len(),
                before,
                "a request without a valid JWT reached the provider"
            );
        }
    }
}

/// The rate limit service's cluster as istiod names it for `render istio --ratelimit
/// ratelimit.istio-system.svc.cluster.local:8081` (scripts/mesh.sh's ServiceEntry).
const RATELIMIT_CLUSTER: &str = "outbound|8081||ratelimit.istio-system.svc.cluster.local";

/// A provider for every workload of `default` and a route served by the sidecar and by the
/// gateway (`gateways`; the filter itself serves a route wherever it runs), with a token budget
/// per user. The route host is longer than the provider's: on the gateway istiod collapses the
/// route's VirtualService into one virtual host named after it, not after the provider host.
fn shared_budget_manifests(tokens: u32) -> String {
    format!(
        "apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMProvider
metadata: {{name: dashscope-qwen, namespace: default}}
spec:
  host: dashscope.aliyuncs.com
  path: /compatible-mode/v1/chat/completions
  configs:
    defaultConfig:
      openAIConfig: {{model: qwen-turbo, apiKey: {KEY_A}}}
---
apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMRoute
metadata: {{name: assistants, namespace: default}}
spec:
  host: {BUDGET_HOST}
  gateways: [istio-system/ingress-gw]
  rules:
  - name: chat
    limits:
    - {{name: per-user, tokens: {tokens}, per: hour, key: {{header: x-user-id}}}}
    backendRefs:
    - providerHost: dashscope.aliyuncs.com
"
    )
}

const BUDGET_HOST: &str = "assistants.budgets.example.com";

/// The HTTP connection manager of the proxy's listener on `port`.
fn hcm(mesh: &Mesh, proxy: Proxy, port: u16) -> Value {
    let dump = mesh.config_dump(proxy, "?resource=dynamic_listeners");
    dump["configs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| &c["active_state"]["listener"])
        .find(|l| l["address"]["socket_address"]["port_value"] == port)
        .and_then(|l| {
            l["filter_chains"]
                .as_array()
                .unwrap()
                .iter()
                .flat_map(|c| c["filters"].as_array().unwrap())
                .find(|f| f["name"] == "envoy.filters.network.http_connection_manager")
        })
        .unwrap_or_else(|| panic!("{}: no HTTP connection manager on {port}", proxy.name()))
        ["typed_config"]
        .clone()
}

/// Every virtual host of the proxy's route configurations: (route configuration, virtual host).
fn virtual_hosts(mesh: &Mesh, proxy: Proxy) -> Vec<(String, Value)> {
    let dump = mesh.config_dump(proxy, "?resource=dynamic_route_configs");
    dump["configs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| &c["route_config"])
        .flat_map(|rc| {
            let name = rc["name"].as_str().unwrap_or_default().to_string();
            rc["virtual_hosts"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .map(move |vh| (name.clone(), vh))
        })
        .collect()
}

/// The budgets' descriptors on a virtual host: the `llm_limit` values of its rate limit
/// entries.
fn budget_entries(vhost: &Value) -> Vec<String> {
    vhost["typed_per_filter_config"]["envoy.filters.http.ratelimit"]["rate_limits"]
        .as_array()
        .map(|entries| {
            entries
                .iter()
                .flat_map(|e| e["actions"].as_array().cloned().unwrap_or_default())
                .filter_map(|a| {
                    a["generic_key"]["descriptor_value"]
                        .as_str()
                        .map(str::to_string)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The budgets' pieces where istiod put them on `proxy`: the rate limit filter just before the
/// router and after the llm-filter, talking to the service's cluster (HTTP/2); the
/// OpenAI-shaped local replies; and the entries of `limit` on exactly the virtual host
/// `vhost` of route configuration `route_config` (None: any), which serves `domain`.
fn assert_budget_pieces(
    mesh: &Mesh,
    proxy: Proxy,
    port: u16,
    route_config: Option<&str>,
    vhost: &str,
    domain: &str,
    limit: &str,
) {
    let name = proxy.name();
    let filters = http_filters(mesh, proxy, port);
    let names: Vec<&str> = filters.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names[names.len() - 2..],
        ["envoy.filters.http.ratelimit", "envoy.filters.http.router"],
        "{name}: {names:?}"
    );
    let llm = filters
        .iter()
        .position(|(n, ecds)| *ecds && n.contains("llm-filter"))
        .unwrap_or_else(|| panic!("{name}: no llm-filter: {names:?}"));
    assert!(llm < names.len() - 2, "{name}: {names:?}");
    let hcm = hcm(mesh, proxy, port);
    let ratelimit = hcm["http_filters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == "envoy.filters.http.ratelimit")
        .unwrap();
    assert_eq!(
        ratelimit["typed_config"]["rate_limit_service"]["grpc_service"]["envoy_grpc"]
            ["cluster_name"],
        RATELIMIT_CLUSTER,
        "{name}: {ratelimit:#}"
    );
    let replies = hcm["local_reply_config"].to_string();
    assert!(
        replies.contains("rate_limit_exceeded") && replies.contains("retry-after"),
        "{name}: {replies}"
    );

    let clusters = mesh.config_dump(proxy, "?resource=dynamic_active_clusters");
    let cluster = clusters["configs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| &c["cluster"])
        .find(|c| c["name"] == RATELIMIT_CLUSTER)
        .unwrap_or_else(|| panic!("{name}: no cluster {RATELIMIT_CLUSTER}"));
    assert!(
        cluster.to_string().contains("http2_protocol_options"),
        "{name}: the service's cluster is not HTTP/2: {cluster:#}"
    );

    let vhosts = virtual_hosts(mesh, proxy);
    let with_entries: Vec<(&str, &str)> = vhosts
        .iter()
        .filter(|(_, vh)| budget_entries(vh).iter().any(|e| e == limit))
        .map(|(rc, vh)| (rc.as_str(), vh["name"].as_str().unwrap()))
        .collect();
    assert_eq!(with_entries.len(), 1, "{name}: {with_entries:?}");
    let (rc, vh) = with_entries[0];
    assert_eq!(vh, vhost, "{name}: the entries are on {rc}/{vh}");
    if let Some(want) = route_config {
        assert_eq!(rc, want, "{name}");
    }
    let served = vhosts
        .iter()
        .find(|(r, v)| r == rc && v["name"] == vh)
        .map(|(_, v)| v["domains"].to_string())
        .unwrap();
    assert!(
        served.contains(&format!("\"{domain}\"")),
        "{name}: {vh} serves {served}"
    );
}

fn budget_chat(host: &str, user: Option<&str>) -> Req {
    let req = Req::chat(host, SEED_BODY);
    match user {
        Some(user) => req.header("x-user-id", user),
        None => req,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_is_spent_through_the_sidecar_and_the_gateway_from_one_service() {
    use support::ratelimit::{assert_refused, reported_tokens, service_config, RateLimitService};
    let limit = 120;
    let manifests = shared_budget_manifests(limit);
    let service = RateLimitService::up("istio-shared", &service_config("istio-shared", &manifests));
    let mock = MockServer::start_tls(&pki().0).expect("mock provider");
    let mesh = Mesh::builder("budgets")
        .manifests(&manifests)
        .shipped_istio("ingress-gw.yaml")
        .provider(DASHSCOPE, mock.addr())
        .ratelimit(service.grpc)
        .up();

    // Where istiod put the EnvoyFilter's patches: on the sidecar the provider's virtual host of
    // route configuration 80; on the gateway the one virtual host istiod collapses the route's
    // VirtualService into, named after its longest host (no `dashscope.aliyuncs.com:80` there).
    let limit_id = "default/assistants/chat/per-user";
    assert_budget_pieces(
        &mesh,
        Proxy::Sidecar,
        80,
        Some("80"),
        "dashscope.aliyuncs.com:80",
        DASHSCOPE,
        limit_id,
    );
    assert_budget_pieces(
        &mesh,
        Proxy::Gateway,
        mesh.gateway.port(),
        None,
        &format!("{BUDGET_HOST}:80"),
        DASHSCOPE,
        limit_id,
    );
    assert!(
        !virtual_hosts(&mesh, Proxy::Gateway)
            .iter()
            .any(|(_, vh)| vh["name"] == "dashscope.aliyuncs.com:80"),
        "istiod no longer collapses the gateway's virtual hosts"
    );

    // Alice spends her budget through both proxies in turn: Redis counts exactly the tokens
    // the provider reported, answer by answer.
    let proxies = [mesh.sidecar, mesh.gateway];
    let mut spent = 0;
    let mut last = 0;
    for i in 0.. {
        assert!(i < 50, "the budget never ran out");
        let resp = send(proxies[i % 2], &budget_chat(BUDGET_HOST, Some("alice"))).await;
        if resp.status == 429 {
            break;
        }
        assert_eq!(resp.status, 200, "{}", resp.text());
        assert!(resp.header("x-ratelimit-remaining").is_some());
        last = reported_tokens(&resp);
        spent += last;
        let counted = service.wait_for_count("x-user-id_alice_", spent);
        assert_eq!(
            counted, spent,
            "Redis holds {counted}, the answers reported {spent}"
        );
    }
    assert!(
        spent > u64::from(limit) && spent - last <= u64::from(limit),
        "{spent} {last}"
    );
    let seen = mock.requests();
    for r in &seen {
        assert_dashscope(r, "qwen-turbo", KEY_A);
    }

    // The next request is refused on both, OpenAI-shaped, and reaches no provider.
    for addr in proxies {
        let refused = send(addr, &budget_chat(BUDGET_HOST, Some("alice"))).await;
        assert_refused(&refused, limit);
    }
    let refused = send_h2(mesh.gateway, &budget_chat(BUDGET_HOST, Some("alice"))).await;
    assert_refused(&refused, limit);
    assert_eq!(
        mock.requests().len(),
        seen.len(),
        "a refused request reached the provider"
    );
    assert_eq!(
        service.count("x-user-id_alice_"),
        spent,
        "refusals debit nothing"
    );

    // Bob has a budget of his own, on both proxies.
    let mut bobs = 0;
    for addr in proxies {
        let resp = send(addr, &budget_chat(BUDGET_HOST, Some("bob"))).await;
        assert_eq!(resp.status, 200, "{}", resp.text());
        bobs += reported_tokens(&resp);
        assert_eq!(service.wait_for_count("x-user-id_bob_", bobs), bobs);
    }
    assert_eq!(mock.requests().len(), seen.len() + 2);
    mesh.assert_no_wasm_failures();
}

/// The shipped budgets (`envoy/manifests/budgets.yaml`: test.com, 200 tokens an hour per
/// `x-user-id`) and one more route on the same gateway that requires no token, with a request
/// budget per `x-user-id`.
fn jwt_budget_manifests() -> String {
    let shipped = std::fs::read_to_string(repo().join("envoy/manifests/budgets.yaml")).unwrap();
    format!(
        "{shipped}---
apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMRoute
metadata: {{name: open-route}}
spec:
  host: open.example.com
  gateways: [istio-system/ingress-gw]
  rules:
  - name: open
    limits:
    - {{name: per-user, requests: 100, per: hour, key: {{header: x-user-id}}}}
    backendRefs:
    - providerHost: dashscope.aliyuncs.com
"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_budget_follows_the_tokens_subject_through_istiod_and_a_forged_user_id_is_dropped() {
    use support::ratelimit::{assert_refused, reported_tokens, service_config, RateLimitService};
    let manifests = jwt_budget_manifests();
    let service = RateLimitService::up("istio-jwt", &service_config("istio-jwt", &manifests));
    let mock = MockServer::start_tls(&pki().0).expect("mock provider");
    let mesh = Mesh::builder("budgets-jwt")
        .manifests(&manifests)
        .shipped_istio("ingress-gw.yaml")
        .shipped_istio("jwt-user-id.yaml")
        .provider(DASHSCOPE, mock.addr())
        .ratelimit(service.grpc)
        .up();
    let tokens = "default/dashscope-route/ingress-route/per-user";
    let requests = "default/open-route/open/per-user";
    let bearer = |sub: &str| format!("Bearer {}", jwt::sign(&jwt::claims(sub)));
    let chat = |host: &str, sub: Option<&str>, forged: Option<&str>| {
        let mut req = budget_chat(host, forged);
        if let Some(sub) = sub {
            req = req.header("authorization", &bearer(sub));
        }
        req
    };

    // istiod's jwt_authn: outputClaimToHeaders became claim_to_headers, before the filter.
    let filters = http_filters(&mesh, Proxy::Gateway, mesh.gateway.port());
    let names: Vec<&str> = filters.iter().map(|(n, _)| n.as_str()).collect();
    let jwt_at = names
        .iter()
        .position(|n| *n == "envoy.filters.http.jwt_authn")
        .unwrap_or_else(|| panic!("{names:?}"));
    let llm_at = filters
        .iter()
        .position(|(n, ecds)| *ecds && n.contains("llm-filter"))
        .unwrap_or_else(|| panic!("{names:?}"));
    assert!(jwt_at < llm_at, "{names:?}");
    let jwt_filter =
        hcm(&mesh, Proxy::Gateway, mesh.gateway.port())["http_filters"][jwt_at].clone();
    let claim_to_headers: Vec<&Value> = jwt_filter["typed_config"]["providers"]
        .as_object()
        .unwrap()
        .values()
        .map(|p| &p["claim_to_headers"])
        .collect();
    assert_eq!(
        claim_to_headers,
        [&serde_json::json!([{"header_name": "x-user-id", "claim_name": "sub"}])],
        "{jwt_filter:#}"
    );

    // Alice's token claiming to be carol: alice's budget is spent until it is refused.
    let mut spent = 0;
    let refused = loop {
        let resp = send(
            mesh.gateway,
            &chat("test.com", Some("alice"), Some("carol")),
        )
        .await;
        if resp.status != 200 {
            break resp;
        }
        spent += reported_tokens(&resp);
        let counted = service.wait_for_count(&format!("{tokens}_x-user-id_alice_"), spent);
        assert_eq!(counted, spent);
        assert!(spent < 2000, "never refused");
    };
    assert_refused(&refused, 200);
    assert_eq!(service.count("x-user-id_carol_"), 0);
    let seen = mock.requests();
    assert!(!seen.is_empty());
    for r in &seen {
        assert_dashscope(r, "qwen-1.8b-chat", KEY_GATEWAY);
        assert_eq!(r.header("x-user-id").as_deref(), Some("alice"), "{r:?}");
        assert_eq!(r.header_count("x-user-id"), 1, "{r:?}");
    }

    // Bob's token claiming to be alice: served from bob's own budget.
    let resp = send(mesh.gateway, &chat("test.com", Some("bob"), Some("alice"))).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let bobs = reported_tokens(&resp);
    assert_eq!(
        service.wait_for_count(&format!("{tokens}_x-user-id_bob_"), bobs),
        bobs
    );
    assert_eq!(service.count(&format!("{tokens}_x-user-id_alice_")), spent);

    // No token on test.com: the AuthorizationPolicy refuses it, counted nowhere.
    mock.clear();
    let before = service.counters();
    let resp = send(mesh.gateway, &chat("test.com", None, Some("bob"))).await;
    assert_eq!(resp.status, 403, "{}", resp.text());
    assert!(mock.requests().is_empty());

    // A host that requires no token: a client's x-user-id is removed all the same (jwt_authn
    // clears its claim headers on every request its rule covers), so the request spends the
    // budget shared by requests without the header, never alice's.
    let resp = send(mesh.gateway, &chat("open.example.com", None, Some("alice"))).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let resp = send_h2(mesh.gateway, &chat("open.example.com", None, Some("alice"))).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let seen = mock.requests();
    assert_eq!(seen.len(), 2);
    for r in &seen {
        assert_eq!(r.header("x-user-id"), None, "{r:?}");
    }
    let after = service.counters();
    let changed: Vec<&(String, u64)> = after.iter().filter(|c| !before.contains(c)).collect();
    assert_eq!(changed.len(), 1, "{changed:?}");
    assert!(
        changed[0].0.contains(requests) && !changed[0].0.contains("x-user-id"),
        "{changed:?}"
    );
    assert_eq!(changed[0].1, 2, "{changed:?}");
    // With a token there, the subject is the key, whatever the client claims.
    let resp = send(
        mesh.gateway,
        &chat("open.example.com", Some("dave"), Some("alice")),
    )
    .await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(
        service.wait_for_count(&format!("{requests}_x-user-id_dave_"), 1),
        1
    );
    assert_eq!(service.count(&format!("{requests}_x-user-id_alice_")), 0);
    // A valid token without `sub`: nothing to copy, and the client's x-user-id is gone too.
    let mut claims = jwt::claims("nobody");
    claims.as_object_mut().unwrap().remove("sub");
    let keyless = |counters: &[(String, u64)]| -> u64 {
        counters
            .iter()
            .filter(|(k, _)| k.contains(requests) && !k.contains("x-user-id"))
            .map(|(_, v)| v)
            .sum()
    };
    let shared = keyless(&service.counters());
    mock.clear();
    let req = budget_chat("open.example.com", Some("alice"))
        .header("authorization", &format!("Bearer {}", jwt::sign(&claims)));
    let resp = send(mesh.gateway, &req).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(mock.requests()[0].header("x-user-id"), None);
    assert_eq!(keyless(&service.counters()), shared + 1);
    assert_eq!(service.count(&format!("{requests}_x-user-id_alice_")), 0);

    // A CORS preflight skips jwt_authn (istiod sets bypass_cors_preflight): the filter answers
    // it 405 on an LLM host, so its x-user-id spends nothing and nothing reaches a provider.
    mock.clear();
    let before = service.counters();
    let mut preflight = Req::chat("open.example.com", "")
        .header("origin", "https://app.example.com")
        .header("access-control-request-method", "POST")
        .header("x-user-id", "alice");
    preflight.method = "OPTIONS".into();
    let resp = send(mesh.gateway, &preflight).await;
    assert_eq!(resp.status, 405, "{}", resp.text());
    assert!(mock.requests().is_empty());
    assert_eq!(service.counters(), before);
    mesh.assert_no_wasm_failures();
}
