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

/// The Envoy executable itself: `.venv/bin/envoy` is pip's Python wrapper around it.
fn envoy_executable() -> std::path::PathBuf {
    let wrapper = support::envoy::envoy_binary();
    let head = std::fs::read(&wrapper).expect("read the Envoy binary");
    if !head.starts_with(b"#!") {
        return wrapper;
    }
    let venv = wrapper.parent().and_then(|bin| bin.parent()).unwrap();
    let lib = venv.join("lib");
    std::fs::read_dir(&lib)
        .unwrap_or_else(|e| panic!("{}: {e}", lib.display()))
        .filter_map(Result::ok)
        .map(|d| d.path().join("site-packages/envoy/_bin/envoy"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("no envoy/_bin/envoy under {}", lib.display()))
}

/// `nm -D` of `path`: the dynamic symbols, defined or undefined.
fn dynamic_symbols(path: &std::path::Path, which: &str) -> Vec<String> {
    let out = std::process::Command::new("nm")
        .args(["-D", which])
        .arg(path)
        .output()
        .expect("nm (binutils) is needed to check the module's symbols");
    assert!(
        out.status.success(),
        "nm {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().last())
        .filter(|s| s.starts_with("envoy_dynamic_module_"))
        .map(str::to_string)
        .collect()
}

/// What tests/native.rs's loading shows as a whole, checked symbol by symbol: every Envoy
/// callback the module calls is exported by this Envoy (it is linked BIND_NOW: one missing
/// refuses the module), and every hook the module exports is a name this Envoy looks up.
#[test]
fn the_binding_matches_this_envoys_symbols() {
    let envoy = envoy_executable();
    let so = native::module();
    let exported = dynamic_symbols(&envoy, "--defined-only");
    let called = dynamic_symbols(so, "--undefined-only");
    assert!(!called.is_empty(), "the module calls no Envoy callback?");
    for symbol in &called {
        assert!(exported.contains(symbol), "Envoy does not export {symbol}");
    }
    let hooks = dynamic_symbols(so, "--defined-only");
    // The names Envoy looks up are strings in its binary (std's search, optimized even here).
    let binary = std::fs::read(&envoy).unwrap();
    let text = String::from_utf8_lossy(&binary);
    for hook in &hooks {
        assert!(text.contains(hook.as_str()), "Envoy never looks up {hook}");
    }
    for required in [
        "envoy_dynamic_module_on_program_init",
        "envoy_dynamic_module_on_http_filter_config_new",
        "envoy_dynamic_module_on_http_filter_new",
        "envoy_dynamic_module_on_http_filter_request_headers",
        "envoy_dynamic_module_on_http_filter_destroy",
    ] {
        assert!(
            hooks.iter().any(|h| h == required),
            "the module lacks {required}"
        );
    }
}
