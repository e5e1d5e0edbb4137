#![cfg(not(target_arch = "wasm32"))]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Cross-provider fallback through what `llm-filter render istio` writes, run in real Envoy.
//!
//! No Kubernetes or istiod here, so this test plays istiod's part for two proxies, a sidecar
//! (namespace `default`, labels `app: sleep`) and an ingress gateway (namespace `istio-system`,
//! labels `istio: ingressgateway`):
//! 1. From the rendered ServiceEntries, DestinationRules and VirtualServices it builds the
//!    configuration Istio generates for them, named as Istio names it (checked against
//!    istio/istio's `pilot/pkg/networking/core`): the sidecar's outbound route configuration
//!    `80` with a virtual host `<host>:80` per ServiceEntry host routing to
//!    `outbound|80||<host>` (TLS origination with SNI `<host>`, Istio's default retry
//!    policy) and the `allow_any` catch-all; the gateway's route configuration `http.80` with a
//!    virtual host `<host>:80` per VirtualService host, its routes translated.
//! 2. It applies the rendered EnvoyFilters' patches that select the proxy, the way istiod's
//!    `envoyfilter` package does: HTTP_FILTER INSERT_BEFORE the router, CLUSTER ADD appended,
//!    HTTP_ROUTE INSERT_FIRST into the virtual host the match names. A patch it does not
//!    know, or a route patch whose virtual host is missing, fails the test.
//! 3. Only what differs on this machine changes afterwards: the module file (mounted at
//!    `/var/local/lib/wasm/llm_filter.wasm` in a pod) is the release build, and the provider
//!    clusters' DNS names and the system CA bundle become the mock's address and the test CA.
//!    Endpoint metadata, SNI, certificate names, routes, retry policies and the filters'
//!    configuration stay as rendered.
//!
//! Then a provider answering 503 (or 429) must fall back to the next one, each attempt
//! rewritten for its own provider (path, model, key, SNI and `:authority`), on both proxies.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;

use serde_json::{json, Value};
use support::client::{Req, SEED_BODY};
use support::envoy::Envoy;
use support::fallback::{self, fail};
use support::mock::{Behavior, MockServer, Recorded};
use support::*;

const KEY_A: &str = "sk-istio-dashscope";
const KEY_B: &str = "sk-istio-moonshot";
/// Where the EnvoyFilter form expects the module in the istio-proxy container.
const MOUNTED_WASM: &str = "/var/local/lib/wasm/llm_filter.wasm";
const HCM: &str = "envoy.filters.network.http_connection_manager";
const ROUTER: &str = "envoy.filters.http.router";

const MANIFESTS: &str = "\
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
  host: edge.example.com
  gateways: [istio-system/ingress-gw]
  rules:
  - backendRefs:
    - providerHost: dashscope.aliyuncs.com
    fallback:
      providers: [api.moonshot.cn]
---
apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMRoute
metadata: {name: plain-route, namespace: default}
spec:
  host: plain.com
  rules:
  - backendRefs:
    - providerHost: dashscope.aliyuncs.com
";

/// What istiod knows of the proxy it configures.
struct Proxy {
    /// EnvoyFilter `match.context` of its traffic.
    context: &'static str,
    namespace: &'static str,
    labels: &'static [(&'static str, &'static str)],
    /// The gateway a VirtualService must name to be on this proxy (`None`: a sidecar, `mesh`).
    gateway: Option<&'static str>,
}

const SIDECAR: Proxy = Proxy {
    context: "SIDECAR_OUTBOUND",
    namespace: "default",
    labels: &[("app", "sleep")],
    gateway: None,
};

const GATEWAY: Proxy = Proxy {
    context: "GATEWAY",
    namespace: "istio-system",
    labels: &[("istio", "ingressgateway")],
    gateway: Some("istio-system/ingress-gw"),
};

/// Istio's root namespace: its EnvoyFilters apply to the proxies of every namespace.
const ROOT_NAMESPACE: &str = "istio-system";

/// `llm-filter render istio` of [`MANIFESTS`], as JSON documents.
fn render_istio() -> Vec<Value> {
    let dir = envoy::temp_dir("istio-render");
    let file = dir.join("llm.yaml");
    std::fs::write(&file, MANIFESTS).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_llm-filter"))
        .args(["render", "istio"])
        .arg(&file)
        .output()
        .expect("run llm-filter");
    assert!(
        out.status.success(),
        "render istio failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .filter(|v: &Value| !v.is_null())
        .collect()
}

fn of_kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

/// Whether an EnvoyFilter selects the proxy: its namespace (or the root namespace), and every
/// label of its `workloadSelector`.
fn selects(filter: &Value, proxy: &Proxy) -> bool {
    let namespace = filter["metadata"]["namespace"].as_str().unwrap();
    if namespace != proxy.namespace && namespace != ROOT_NAMESPACE {
        return false;
    }
    let labels = filter["spec"]["workloadSelector"]["labels"].as_object();
    labels.into_iter().flatten().all(|(k, v)| {
        proxy
            .labels
            .iter()
            .any(|(pk, pv)| pk == k && v.as_str() == Some(*pv))
    })
}

/// The patches of every EnvoyFilter that selects the proxy, for its context, in order.
fn patches_for(docs: &[Value], proxy: &Proxy) -> Vec<Value> {
    of_kind(docs, "EnvoyFilter")
        .into_iter()
        .filter(|f| selects(f, proxy))
        .flat_map(|f| f["spec"]["configPatches"].as_array().unwrap().clone())
        .filter(|p| {
            let context = p["match"]["context"].as_str().unwrap_or("ANY");
            context == proxy.context || context == "ANY"
        })
        .collect()
}

/// Istio's default retry policy of an outbound route (`route/retry/retry.go`).
fn istio_default_retry_policy() -> Value {
    json!({
        "retry_on": "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes",
        "num_retries": 2,
        "retry_host_predicate": [{
            "name": "envoy.retry_host_predicates.previous_hosts",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate",
            },
        }],
        "host_selection_retry_max_attempts": 5,
    })
}

/// `outbound|80||<host>` as Istio builds it from the rendered ServiceEntry (port 80 sent to
/// 443) and DestinationRule (TLS `SIMPLE`, SNI), here at the mock and verified with the test CA.
fn outbound_cluster(docs: &[Value], host: &str, mock: SocketAddr, ca: &Path) -> Value {
    let rule = of_kind(docs, "DestinationRule")
        .into_iter()
        .find(|d| d["spec"]["host"] == host)
        .unwrap_or_else(|| panic!("no DestinationRule for {host}"));
    let tls = &rule["spec"]["trafficPolicy"]["portLevelSettings"][0];
    assert_eq!(tls["port"]["number"], 80);
    assert_eq!(tls["tls"]["mode"], "SIMPLE");
    json!({
        "name": format!("outbound|80||{host}"),
        "type": "STATIC",
        "connect_timeout": "10s",
        "load_assignment": {
            "cluster_name": format!("outbound|80||{host}"),
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {
                "address": mock.ip().to_string(), "port_value": mock.port(),
            }}}}]}],
        },
        "transport_socket": {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": tls["tls"]["sni"],
                "common_tls_context": {"validation_context": {
                    "trusted_ca": {"filename": ca.to_string_lossy()},
                }},
            },
        },
    })
}

/// One rendered VirtualService `http` entry as Istio translates it (the two forms render
/// istio writes: an `authority` match to a destination, and a direct response).
fn translate_http_route(http: &Value) -> Value {
    let mut headers = Vec::new();
    if let Some(exact) = http["match"][0]["authority"]["exact"].as_str() {
        headers.push(json!({"name": ":authority", "string_match": {"exact": exact}}));
    }
    let matcher = json!({"prefix": "/", "headers": headers});
    if let Some(direct) = http.get("directResponse") {
        return json!({
            "name": http["name"],
            "match": matcher,
            "direct_response": {
                "status": direct["status"],
                "body": {"inline_string": direct["body"]["string"]},
            },
        });
    }
    let destination = &http["route"][0]["destination"];
    json!({
        "name": http["name"],
        "match": matcher,
        "route": {
            "cluster": format!(
                "outbound|{}||{}",
                destination["port"]["number"],
                destination["host"].as_str().unwrap()
            ),
            "timeout": "0s",
            "retry_policy": istio_default_retry_policy(),
        },
    })
}

/// The route configuration Istio gives the proxy for port 80.
fn route_configuration(docs: &[Value], proxy: &Proxy) -> Value {
    let mut virtual_hosts = Vec::new();
    let services: Vec<&Value> = of_kind(docs, "VirtualService")
        .into_iter()
        .filter(|vs| {
            let wanted = proxy.gateway.unwrap_or("mesh");
            vs["spec"]["gateways"]
                .as_array()
                .unwrap()
                .iter()
                .any(|g| g == wanted)
        })
        .collect();
    match proxy.gateway {
        None => {
            // A sidecar: one virtual host per service host on port 80 (here the ServiceEntries;
            // render istio's mesh VirtualServices only add hostRewrite names, none here).
            assert!(services.is_empty(), "{services:?}");
            for entry in of_kind(docs, "ServiceEntry") {
                let host = entry["spec"]["hosts"][0].as_str().unwrap();
                assert_eq!(entry["spec"]["ports"][0]["number"], 80);
                virtual_hosts.push(json!({
                    "name": format!("{host}:80"),
                    "domains": [host, format!("{host}:80")],
                    "routes": [{
                        "name": "default",
                        "match": {"prefix": "/"},
                        "route": {
                            "cluster": format!("outbound|80||{host}"),
                            "timeout": "0s",
                            "retry_policy": istio_default_retry_policy(),
                        },
                    }],
                    "include_request_attempt_count": true,
                }));
            }
            virtual_hosts.push(json!({
                "name": "allow_any",
                "domains": ["*"],
                "routes": [{
                    "name": "allow_any",
                    "match": {"prefix": "/"},
                    "route": {"cluster": "PassthroughCluster", "timeout": "0s"},
                }],
                "include_request_attempt_count": true,
            }));
            json!({"name": "80", "virtual_hosts": virtual_hosts, "validate_clusters": false})
        }
        Some(_) => {
            // A gateway: one virtual host per VirtualService host, carrying its routes.
            assert!(!services.is_empty());
            for vs in services {
                let routes: Vec<Value> = vs["spec"]["http"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(translate_http_route)
                    .collect();
                for host in vs["spec"]["hosts"].as_array().unwrap() {
                    let host = host.as_str().unwrap();
                    virtual_hosts.push(json!({
                        "name": format!("{host}:80"),
                        "domains": [host],
                        "routes": routes,
                    }));
                }
            }
            json!({"name": "http.80", "virtual_hosts": virtual_hosts, "validate_clusters": false})
        }
    }
}

/// The port a route configuration serves, as istiod reads it from the name (`80`, `http.80`).
fn route_configuration_port(name: &str) -> u64 {
    name.rsplit('.').next().unwrap().parse().unwrap()
}

/// Applies the patches as istiod's `envoyfilter` package does, for the operations render istio
/// writes; anything else fails the test.
fn apply_patches(bootstrap: &mut Value, patches: &[Value]) {
    for patch in patches {
        let what = (
            patch["applyTo"].as_str().unwrap(),
            patch["patch"]["operation"].as_str().unwrap(),
        );
        let value = patch["patch"]["value"].clone();
        let hcm =
            &mut bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0];
        assert_eq!(hcm["name"], HCM);
        match what {
            ("HTTP_FILTER", "INSERT_BEFORE") => {
                let filter = &patch["match"]["listener"]["filterChain"]["filter"];
                assert_eq!(filter["name"], HCM, "{patch}");
                assert_eq!(filter["subFilter"]["name"], ROUTER, "{patch}");
                let filters = hcm["typed_config"]["http_filters"].as_array_mut().unwrap();
                let router = filters.iter().position(|f| f["name"] == ROUTER).unwrap();
                filters.insert(router, value);
            }
            ("CLUSTER", "ADD") => {
                assert!(patch["match"].get("cluster").is_none(), "{patch}");
                bootstrap["static_resources"]["clusters"]
                    .as_array_mut()
                    .unwrap()
                    .push(value);
            }
            ("HTTP_ROUTE", "INSERT_FIRST") => {
                let wanted = &patch["match"]["routeConfiguration"];
                let rc = &mut hcm["typed_config"]["route_config"];
                let name = rc["name"].as_str().unwrap().to_string();
                if let Some(n) = wanted["name"].as_str() {
                    assert_eq!(n, name, "{patch}");
                }
                if let Some(port) = wanted["portNumber"].as_u64() {
                    assert_eq!(port, route_configuration_port(&name), "{patch}");
                }
                assert!(wanted["vhost"].get("route").is_none(), "{patch}");
                let vhost_name = wanted["vhost"]["name"].as_str().unwrap();
                let vhost = rc["virtual_hosts"]
                    .as_array_mut()
                    .unwrap()
                    .iter_mut()
                    .find(|v| v["name"] == vhost_name)
                    .unwrap_or_else(|| {
                        panic!("no virtual host {vhost_name} in route configuration {name}")
                    });
                vhost["routes"].as_array_mut().unwrap().insert(0, value);
            }
            other => panic!("this test does not know how istiod applies {other:?}: {patch}"),
        }
    }
}

/// What differs on this machine: the mounted module is the release build; our provider
/// clusters reach the mock instead of the provider's DNS name and trust the test CA.
fn adapt_to_this_machine(bootstrap: &mut Value, mock: SocketAddr, ca: &Path) {
    fn replace_module(v: &mut Value, wasm: &str, count: &mut usize) {
        match v {
            Value::String(s) if s == MOUNTED_WASM => {
                *s = wasm.to_string();
                *count += 1;
            }
            Value::Array(items) => items
                .iter_mut()
                .for_each(|i| replace_module(i, wasm, count)),
            Value::Object(map) => map
                .values_mut()
                .for_each(|i| replace_module(i, wasm, count)),
            _ => {}
        }
    }
    let mut modules = 0;
    replace_module(bootstrap, &wasm().to_string_lossy(), &mut modules);
    assert!(
        modules >= 2,
        "the filter and its upstream part load the module"
    );
    let mut providers = 0;
    for cluster in bootstrap["static_resources"]["clusters"]
        .as_array_mut()
        .unwrap()
    {
        if !cluster["name"]
            .as_str()
            .unwrap()
            .starts_with("llm-provider|")
        {
            continue;
        }
        providers += 1;
        let endpoints = cluster["load_assignment"]["endpoints"]
            .as_array_mut()
            .unwrap();
        assert_eq!(endpoints.len(), 1);
        let address = &mut endpoints[0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"];
        assert_eq!(address["port_value"], 443);
        address["address"] = json!(mock.ip().to_string());
        address["port_value"] = json!(mock.port());
        let trusted = &mut cluster["transport_socket"]["typed_config"]["common_tls_context"]
            ["validation_context"]["trusted_ca"]["filename"];
        assert_eq!(*trusted, "/etc/ssl/certs/ca-certificates.crt");
        *trusted = json!(ca.to_string_lossy());
    }
    assert_eq!(providers, 2);
}

/// The configuration istiod would push to `proxy`, as an Envoy bootstrap running against
/// `mock`.
fn istio_like_bootstrap(docs: &[Value], proxy: &Proxy, mock: SocketAddr) -> Value {
    let (_, ca) = pki();
    let listener = if proxy.gateway.is_some() {
        "0.0.0.0_8080"
    } else {
        "0.0.0.0_80"
    };
    let access_log = json!({
        "name": "envoy.access_loggers.stdout",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog",
            "log_format": {"text_format_source": {"inline_string":
                "%RESPONSE_CODE% authority=%REQ(:AUTHORITY)% cluster=%UPSTREAM_CLUSTER% \
                 provider=%FILTER_STATE(wasm.llm.provider:PLAIN)% \
                 attempts=%FILTER_STATE(wasm.llm.attempts:PLAIN)%\n"}},
        },
    });
    let typed = |t: &str| json!({"@type": format!("type.googleapis.com/{t}")});
    let mut clusters: Vec<Value> = ["dashscope.aliyuncs.com", "api.moonshot.cn"]
        .iter()
        .map(|host| outbound_cluster(docs, host, mock, ca))
        .collect();
    if proxy.gateway.is_none() {
        clusters.push(json!({
            "name": "PassthroughCluster",
            "type": "ORIGINAL_DST",
            "lb_policy": "CLUSTER_PROVIDED",
            "connect_timeout": "10s",
        }));
    }
    let mut bootstrap = json!({
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {
            "listeners": [{
                "name": listener,
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                "filter_chains": [{"filters": [{
                    "name": HCM,
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                        "stat_prefix": format!("outbound_{listener}"),
                        "access_log": [access_log],
                        "route_config": route_configuration(docs, proxy),
                        // Stock Envoy stands in for Istio's own filters (metadata exchange,
                        // stats), which run around these in an istio-proxy.
                        "http_filters": [
                            {"name": "envoy.filters.http.fault",
                             "typed_config": typed("envoy.extensions.filters.http.fault.v3.HTTPFault")},
                            {"name": "envoy.filters.http.cors",
                             "typed_config": typed("envoy.extensions.filters.http.cors.v3.Cors")},
                            {"name": ROUTER,
                             "typed_config": typed("envoy.extensions.filters.http.router.v3.Router")},
                        ],
                    },
                }]}],
            }],
            "clusters": clusters,
        },
    });
    let patches = patches_for(docs, proxy);
    let count = |apply_to: &str| patches.iter().filter(|p| p["applyTo"] == apply_to).count();
    assert_eq!(count("HTTP_FILTER"), 1, "{patches:#?}");
    assert!(count("CLUSTER") >= 3 && count("HTTP_ROUTE") >= 1);
    apply_patches(&mut bootstrap, &patches);
    adapt_to_this_machine(&mut bootstrap, mock, ca);
    bootstrap
}

fn start(proxy: &Proxy, mock: &MockServer, label: &str) -> Envoy {
    let docs = render_istio();
    assert!(of_kind(&docs, "WasmPlugin").is_empty());
    let bootstrap = istio_like_bootstrap(&docs, proxy, mock.addr());
    // The retry route went first into the first provider's virtual host.
    let hcm = &bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0];
    let vhost = hcm["typed_config"]["route_config"]["virtual_hosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "dashscope.aliyuncs.com:80")
        .unwrap();
    assert_eq!(
        vhost["routes"][0]["match"]["headers"][0]["name"],
        "x-llm-fallback"
    );
    let names: Vec<&str> = hcm["typed_config"]["http_filters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "envoy.filters.http.fault",
            "envoy.filters.http.cors",
            "llm-filter",
            ROUTER
        ]
    );
    Envoy::start(&serde_yaml::to_string(&bootstrap).unwrap(), label)
}

fn assert_dashscope_attempt(r: &Recorded) {
    fallback::assert_attempt(r, DASHSCOPE, DASHSCOPE_PATH, "qwen-turbo", KEY_A);
}

fn assert_moonshot_attempt(r: &Recorded) {
    fallback::assert_attempt(r, MOONSHOT, MOONSHOT_PATH, "moonshot-v1-8k", KEY_B);
}

/// A request to `host` while DashScope answers `status`: Moonshot answers it, after one
/// attempt on each, each rewritten for its provider, through the rendered aggregate cluster.
async fn falls_back(envoy: &Envoy, mock: &MockServer, host: &str, status: u16, cluster: &str) {
    mock.clear();
    mock.set_behavior(Behavior {
        fixed_for_sni: vec![fail(DASHSCOPE, status, "dashscope is down")],
        ..Behavior::default()
    });
    let resp = support::client::send(envoy.addr, &Req::chat(host, SEED_BODY)).await;
    assert_eq!(resp.status, 200, "{host} {status}: {}", resp.text());
    assert!(
        resp.text().contains("mock of api.moonshot.cn"),
        "{}",
        resp.text()
    );
    let seen = mock.requests();
    assert_eq!(seen.len(), 2, "{host} {status}: {seen:#?}");
    assert_dashscope_attempt(&seen[0]);
    assert_moonshot_attempt(&seen[1]);
    envoy.assert_logged(&format!(
        "cluster={cluster} provider=moonshot attempts=dashscope-qwen,moonshot"
    ));
}

#[tokio::test]
async fn a_sidecar_falls_back_through_the_rendered_envoy_filters() {
    let mock = MockServer::start_tls(&pki().0).expect("mock provider");
    let envoy = start(&SIDECAR, &mock, "istio-sidecar-fallback");
    let cluster = "llm-fallback|default.ha-route.0|dashscope.aliyuncs.com";
    for status in [503, 429] {
        falls_back(&envoy, &mock, "test.com", status, cluster).await;
    }

    // No failure: one attempt, still through the aggregate cluster.
    mock.clear();
    mock.set_behavior(Behavior::default());
    let resp = support::client::send(envoy.addr, &Req::chat("test.com", SEED_BODY)).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let seen = mock.requests();
    assert_eq!(seen.len(), 1);
    assert_dashscope_attempt(&seen[0]);
    envoy.assert_logged(&format!(
        "cluster={cluster} provider=dashscope-qwen attempts=-\n"
    ));

    // A route without fallback keeps Istio's own route (whose default retry policy does not
    // retry a 503): the failure reaches the client after one attempt, even when the client
    // sends a marker of its own.
    mock.clear();
    mock.set_behavior(Behavior {
        fixed_for_sni: vec![fail(DASHSCOPE, 503, "dashscope is down")],
        ..Behavior::default()
    });
    let req = Req::chat("plain.com", SEED_BODY).header("x-llm-fallback", "default/ha-route/0");
    let resp = support::client::send(envoy.addr, &req).await;
    assert_eq!(resp.status, 503, "{}", resp.text());
    assert!(resp.text().contains("dashscope is down"), "{}", resp.text());
    let seen = mock.requests();
    assert_eq!(seen.len(), 1, "{seen:#?}");
    assert_dashscope_attempt(&seen[0]);
    envoy.assert_logged(
        "503 authority=dashscope.aliyuncs.com cluster=outbound|80||dashscope.aliyuncs.com",
    );
    assert_no_wasm_failures(&envoy);
}

#[tokio::test]
async fn a_gateway_falls_back_through_the_rendered_envoy_filters() {
    let mock = MockServer::start_tls(&pki().0).expect("mock provider");
    let envoy = start(&GATEWAY, &mock, "istio-gateway-fallback");
    let cluster = "llm-fallback|default.edge-route.0|dashscope.aliyuncs.com";
    falls_back(&envoy, &mock, "edge.example.com", 503, cluster).await;

    // No failure: one attempt, the first provider's.
    mock.clear();
    mock.set_behavior(Behavior::default());
    let resp = support::client::send(envoy.addr, &Req::chat("edge.example.com", SEED_BODY)).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let seen = mock.requests();
    assert_eq!(seen.len(), 1);
    assert_dashscope_attempt(&seen[0]);
    envoy.assert_logged(&format!(
        "cluster={cluster} provider=dashscope-qwen attempts=-\n"
    ));
    assert_no_wasm_failures(&envoy);
}

fn assert_no_wasm_failures(envoy: &Envoy) {
    let log = envoy.log();
    let failures = support::admin::wasm_failure_lines(&log);
    assert!(failures.is_empty(), "{failures:#?}");
}
