#![cfg(not(target_arch = "wasm32"))]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The filter as an Envoy dynamic module in real Envoy 1.40: the module loads and takes the
//! configuration string the wasm filter takes, a configuration the filter refuses stops Envoy
//! with the filter's own message, and a panic in a hook answers that request with a 500 in
//! OpenAI's error shape while Envoy keeps serving.

mod support;

use std::time::Duration;

use support::client::{self, Req, SEED_BODY};
use support::envoy::{run_to_exit_with, Envoy, Launch};
use support::native::{self, SEARCH_PATH_VAR};
use support::*;

const MANIFESTS: &str = "\
apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMProvider
metadata: {name: qwen}
spec:
  host: dashscope.aliyuncs.com
  path: /compatible-mode/v1/chat/completions
  configs:
    defaultConfig:
      openAIConfig: {model: qwen-turbo, apiKey: sk-test}
---
apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMRoute
metadata: {name: demo}
spec:
  host: demo-llm-server
  rules:
  - name: all
    backendRefs:
    - providerHost: dashscope.aliyuncs.com
";

/// A bootstrap with only the module's filter and a route that answers `passed` itself.
fn bootstrap(configuration: &str) -> String {
    let mut doc: serde_yaml::Value = serde_yaml::from_str(
        "admin:
  address: {socket_address: {address: 127.0.0.1, port_value: 0}}
static_resources:
  listeners:
  - name: main
    address: {socket_address: {address: 127.0.0.1, port_value: 0}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          '@type': type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: main
          route_config:
            virtual_hosts:
            - name: all
              domains: ['*']
              routes:
              - match: {prefix: /}
                direct_response: {status: 200, body: {inline_string: passed}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              '@type': type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
",
    )
    .unwrap();
    let filters = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
        ["typed_config"]["http_filters"]
        .as_sequence_mut()
        .unwrap();
    filters.insert(0, native::filter(configuration));
    serde_yaml::to_string(&doc).unwrap()
}

#[tokio::test]
async fn the_module_loads_and_passes_other_hosts_through() {
    let so = native::module();
    let path = native::search_path(so);
    let env = [(SEARCH_PATH_VAR, path.as_str())];
    let envoy = Envoy::start_with(
        &bootstrap(MANIFESTS),
        "native-load",
        Launch {
            env: &env,
            ..Launch::default()
        },
    );
    envoy.assert_logged("llm-filter: configuration accepted");
    envoy.assert_logged("loaded as an Envoy dynamic module");
    let resp = client::send(envoy.addr, &Req::chat("other.example", SEED_BODY)).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.text(), "passed");
}

#[test]
fn a_refused_configuration_stops_envoy_with_the_filters_message() {
    let so = native::module();
    let path = native::search_path(so);
    let env = [(SEARCH_PATH_VAR, path.as_str())];
    let broken = MANIFESTS.replace(
        "providerHost: dashscope.aliyuncs.com",
        "providerHost: nowhere.example",
    );
    let (status, log) = run_to_exit_with(
        &bootstrap(&broken),
        "native-refused",
        Duration::from_secs(30),
        Launch {
            env: &env,
            ..Launch::default()
        },
    );
    assert!(!status.success(), "Envoy accepted a broken config:\n{log}");
    let line = log
        .lines()
        .find(|l| l.contains("llm-filter: invalid configuration:"))
        .unwrap_or_else(|| panic!("no refusal from the filter in the log:\n{log}"));
    assert!(
        line.contains("LLMRoute default/demo")
            && line.contains("backendRefs[0]")
            && line.contains("nowhere.example"),
        "the refusal does not name resource and field: {line}"
    );
    assert!(
        log.contains("Failed to initialize dynamic module"),
        "Envoy did not refuse the filter config:\n{log}"
    );
}

#[tokio::test]
async fn a_panic_answers_500_and_envoy_keeps_serving() {
    let so = native::module_with_test_panic();
    let path = native::search_path(so);
    let env = [(SEARCH_PATH_VAR, path.as_str())];
    let mut envoy = Envoy::start_with(
        &bootstrap(MANIFESTS),
        "native-panic",
        Launch {
            env: &env,
            ..Launch::default()
        },
    );
    for round in 0..3 {
        let boom = Req::chat("demo-llm-server", SEED_BODY).header("x-llm-filter-test-panic", "1");
        let resp = client::send(envoy.addr, &boom).await;
        assert_openai_error(&resp, 500, "internal_error");
        let fine = client::send(envoy.addr, &Req::chat("other.example", SEED_BODY)).await;
        assert_eq!(fine.status, 200, "round {round}: {}", fine.text());
        assert!(envoy.is_running(), "Envoy died after a panic in the module");
    }
    envoy.assert_logged("llm-filter: panic in the request headers hook");
}
