#![cfg(not(target_arch = "wasm32"))]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! API keys: `openAIConfig.apiKeyFromEnv` takes the key from Envoy's environment
//! through `vm_config.environment_variables`, so the rendered bootstrap holds no key; and a key
//! reaches only the provider it belongs to, never a log line at trace level, an error body or a
//! response.

mod support;

use std::time::Duration;

use support::client::{Req, SEED_BODY};
use support::envoy::{run_to_exit, Envoy, Launch};
use support::mock::MockServer;
use support::*;

const KEY_ENV: &str = "LLM_FILTER_TEST_DASHSCOPE_KEY";
const KEY: &str = "sk-from-envoy-environment-5150";

const MANIFESTS: &str = "\
apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMProvider
metadata: {name: dashscope-qwen}
spec:
  host: dashscope.aliyuncs.com
  path: /compatible-mode/v1/chat/completions
  configs:
    defaultConfig:
      openAIConfig: {model: qwen-turbo, apiKeyFromEnv: LLM_FILTER_TEST_DASHSCOPE_KEY}
---
apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMRoute
metadata: {name: keys-route}
spec:
  host: test.com
  rules:
  - name: only
    backendRefs:
    - providerHost: dashscope.aliyuncs.com
";

/// `llm-filter render envoy` of `manifests`, the provider host pointed at `provider`. The key
/// variable is not in this process's environment, so the bootstrap cannot hold its value.
fn render(provider: &MockServer, manifests: &str) -> String {
    assert!(std::env::var_os(KEY_ENV).is_none());
    render_envoy("keys-manifests", manifests, &[(DASHSCOPE, provider.addr())])
}

fn assert_no_key(what: &str, text: &str) {
    assert!(!text.contains(KEY), "{what} contains the provider key");
    assert!(
        !text.contains(&KEY[3..]),
        "{what} contains part of the provider key"
    );
}

/// `apiKeyFromEnv`: the key comes from Envoy's environment into the Wasm VM, and the filter
/// sets it. Everything below holds, except that Envoy's own router logs the request headers it
/// forwards at debug level (`router decoding headers`), the key among them: Envoy's behaviour
/// for any header a downstream filter sets. The filter's own lines never name it.
#[tokio::test]
async fn key_from_envoy_environment_reaches_only_its_provider() {
    let provider = MockServer::start_tls(&pki().0).expect("mock provider");
    let yaml = render(&provider, MANIFESTS);
    assert!(yaml.contains("host_env_keys"), "{yaml}");
    assert!(yaml.contains(KEY_ENV), "{yaml}");
    assert_no_key("the rendered bootstrap", &yaml);
    let envoy = Envoy::start_with(
        &yaml,
        "keys-env",
        Launch {
            env: &[(KEY_ENV, KEY)],
            log_level: "debug",
        },
    );
    exercise(&envoy, &provider).await;
    let log = envoy.log();
    let filter_lines: String = log
        .lines()
        .filter(|l| l.contains("llm-filter") || l.contains("[wasm]"))
        .collect::<Vec<_>>()
        .join("\n");
    assert!(!filter_lines.is_empty(), "the filter's lines are missing");
    assert_no_key("the filter's log lines", &filter_lines);
    assert_no_key(
        "Envoy's log apart from its router's header dumps",
        &without_router_header_dumps(&log),
    );
}

/// `apiKeyFile`: Envoy's credential_injector on the provider's cluster reads the key file and
/// adds it after the router; at trace level, no line of Envoy's log holds the key.
#[tokio::test]
async fn key_file_injected_by_envoy_never_logged() {
    let provider = MockServer::start_tls(&pki().0).expect("mock provider");
    let dir = support::envoy::temp_dir("keys-file");
    let key_file = dir.join("dashscope-key");
    std::fs::write(&key_file, KEY).unwrap();
    let manifests = MANIFESTS.replace(
        "apiKeyFromEnv: LLM_FILTER_TEST_DASHSCOPE_KEY",
        &format!("apiKeyFile: {}", key_file.display()),
    );
    let yaml = render(&provider, &manifests);
    assert!(
        yaml.contains("envoy.filters.http.credential_injector"),
        "{yaml}"
    );
    assert_no_key("the rendered bootstrap", &yaml);
    let envoy = Envoy::start_with(
        &yaml,
        "keys-file",
        Launch {
            env: &[],
            log_level: "trace",
        },
    );
    exercise(&envoy, &provider).await;
    let log = envoy.log();
    assert!(log.contains("[trace]"), "Envoy did not log at trace level");
    assert!(
        log.contains("router decoding headers"),
        "no header dump logged"
    );
    assert_no_key("Envoy's trace log", &log);
}

/// Envoy's log without the header maps its router dumps at debug level (each a block of
/// `'name', 'value'` lines after `router decoding headers:`).
fn without_router_header_dumps(log: &str) -> String {
    let mut out = Vec::new();
    let mut in_dump = false;
    for line in log.lines() {
        if line.contains("router decoding headers:") {
            in_dump = true;
            continue;
        }
        if in_dump && line.starts_with('\'') {
            continue;
        }
        in_dump = false;
        out.push(line);
    }
    out.join("\n")
}

/// A chat request, refused bodies and other hosts through `envoy`: the key reaches the provider
/// and nothing else a client can see.
async fn exercise(envoy: &Envoy, provider: &MockServer) {
    let addr = envoy.addr;
    let send = |req: Req| async move { support::client::send(addr, &req).await };

    let ok =
        send(Req::chat("test.com", SEED_BODY).header("authorization", "Bearer client-key")).await;
    assert_eq!(ok.status, 200, "{}", ok.text());
    let seen = provider.requests();
    assert_eq!(seen.len(), 1);
    assert_bearer(&seen[0], KEY);
    assert_eq!(seen[0].sni.as_deref(), Some(DASHSCOPE));
    assert_eq!(seen[0].json().unwrap()["model"], "qwen-turbo");
    assert_no_key("the response", &ok.text());
    for (name, value) in &ok.headers {
        let value = String::from_utf8_lossy(value.as_bytes());
        assert_no_key(&format!("response header {name}"), &value);
    }

    // Refused bodies: the error names no key and the provider sees nothing.
    for body in ["", "not json", r#"{"model": 7, "messages": []}"#] {
        let refused = send(Req::chat("test.com", body)).await;
        assert_eq!(refused.status, 400, "{body:?}: {}", refused.text());
        assert_no_key("an error body", &refused.text());
    }
    assert_eq!(provider.requests().len(), 1);

    // A host the configuration does not name gets Envoy's 404 and no key goes anywhere; so
    // does a client that asks for the provider's path on another host.
    let other = send(Req::chat("attacker.example", SEED_BODY)).await;
    assert_eq!(other.status, 404);
    let sneaky = send(
        Req::post(
            "attacker.example",
            "/compatible-mode/v1/chat/completions",
            SEED_BODY,
        )
        .header("content-type", "application/json"),
    )
    .await;
    assert_eq!(sneaky.status, 404);
    assert_eq!(provider.requests().len(), 1);

    tokio::time::sleep(Duration::from_millis(300)).await; // the log flushes every 100 ms
}

#[test]
fn unset_variable_is_refused_naming_the_field() {
    let provider = MockServer::start_tls(&pki().0).expect("mock provider");
    let yaml = render(&provider, MANIFESTS);
    let (status, log) = run_to_exit(&yaml, "keys-unset", Duration::from_secs(30));
    assert!(!status.success(), "Envoy started without the key variable");
    assert!(
        log.contains(
            "LLMProvider default/dashscope-qwen: configs.defaultConfig.openAIConfig.apiKeyFromEnv: \
             environment variable \"LLM_FILTER_TEST_DASHSCOPE_KEY\" is not set"
        ),
        "{log}"
    );
}
