#![cfg(not(target_arch = "wasm32"))]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Errors and edge cases end to end (real Envoy, release wasm, HTTPS mock provider): bad
//! bodies, body limits, unmatched rules, refused configurations, upstream failures, large
//! bodies, and API-key hygiene.

mod support;

use std::time::Duration;
use support::client::{Req, SEED_BODY};
use support::mock::{Behavior, FixedReply};
use support::*;

/// The mesh manifests plus one more YAML document.
/// The shipped mesh configuration's manifests (without its settings document) and `extra`.
fn mesh_manifests_plus(extra: &str) -> String {
    let mut doc = shipped("mesh.yaml");
    let value = patch::wasm_configuration(&mut doc).unwrap();
    let manifests: Vec<&str> = value
        .split("\n---\n")
        .filter(|d| !d.starts_with("settings:"))
        .collect();
    format!("{}\n---\n{extra}\n", manifests.join("\n---\n"))
}

#[tokio::test]
async fn malformed_json_gets_openai_shaped_400_and_never_reaches_the_provider() {
    let s = Stack::start("mesh.yaml");
    let resp = s
        .send(&Req::chat(
            DASHSCOPE,
            r#"{"messages": [{"role": "user", "content": "hi"}"#,
        ))
        .await;
    assert_openai_error(&resp, 400, "invalid_json");
    assert!(
        s.provider.requests().is_empty(),
        "the provider saw a complete request: {:?}",
        s.provider.requests()
    );
    // The filter and Envoy are fine afterwards.
    let ok = s.send(&Req::chat(DASHSCOPE, SEED_BODY)).await;
    assert_eq!(ok.status, 200, "{}", ok.text());
    assert_eq!(s.provider.requests().len(), 1);
}

#[tokio::test]
async fn each_kind_of_bad_body_gets_its_error_code() {
    let s = Stack::start("mesh.yaml");
    let cases: &[(&[u8], &str)] = &[
        (b"", "empty_body"),
        (b"messages=hello", "invalid_json"),
        (b"{\"messages\": [{\"role\": \"user\", \"content\": \"\xff\xfe\"}]}", "invalid_json"),
        (b"[{\"role\": \"user\", \"content\": \"hi\"}]", "invalid_body"),
        (b"\"just a string\"", "invalid_body"),
        (b"{\"model\": \"x\"}", "missing_messages"),
        (b"{\"messages\": \"hello\"}", "invalid_messages"),
        (b"{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}], \"model\": 42}", "invalid_model"),
        (b"{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}], \"stream\": \"yes\"}", "invalid_stream"),
        (
            b"{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}], \"messages\": [{\"role\": \"user\", \"content\": \"b\"}]}",
            "duplicate_key",
        ),
    ];
    for (body, code) in cases {
        let mut req = Req::chat("demo-llm-server", "");
        req.body = body.to_vec();
        let resp = s.send(&req).await;
        assert_eq!(
            resp.status,
            400,
            "body {:?}: expected 400 {code}, got {} {}",
            String::from_utf8_lossy(body),
            resp.status,
            resp.text()
        );
        assert_openai_error(&resp, 400, code);
    }
    assert!(
        s.provider.requests().is_empty(),
        "a bad body reached the provider: {:?}",
        s.provider.requests()
    );
}

#[tokio::test]
async fn upstream_error_statuses_and_bodies_reach_the_client_unchanged() {
    let s = Stack::start("mesh.yaml");
    for (status, body) in [
        (
            429u16,
            r#"{"error":{"message":"Rate limit reached for requests","type":"requests","code":"rate_limit_exceeded"}}"#,
        ),
        (
            500u16,
            r#"{"error":{"message":"The server had an error while processing your request.","type":"server_error"}}"#,
        ),
    ] {
        s.provider.set_behavior(Behavior {
            fixed: Some(FixedReply {
                status,
                content_type: "application/json".into(),
                body: body.as_bytes().to_vec(),
            }),
            ..Behavior::default()
        });
        let resp = s.send(&Req::chat(DASHSCOPE, SEED_BODY)).await;
        assert_eq!(resp.status, status, "{}", resp.text());
        assert_eq!(
            resp.text(),
            body,
            "the provider's error body must arrive as sent"
        );
        assert_eq!(
            resp.header("content-type").as_deref(),
            Some("application/json")
        );
    }
    assert_eq!(
        s.provider.requests().len(),
        2,
        "no retries on a provider's error"
    );
}

/// A ~1 MiB prompt (above Envoy's default 1 MiB buffer) is rewritten intact: every message
/// kept byte for byte, the model replaced, other fields kept.
#[tokio::test]
async fn one_mebibyte_body_is_rewritten_intact() {
    let s = Stack::start("mesh.yaml");
    let mut messages = Vec::new();
    let mut total = 0;
    let mut i = 0u64;
    while total < 1024 * 1024 {
        // Deterministic, varied text: ASCII, escapes, non-ASCII, a quoted fragment.
        let mut content =
            format!("message {i}: \"quoted\" \\ back\\slash \u{00e9}\u{4f60}\u{597d} \n\t");
        let mut x = i
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        while content.len() < 16 * 1024 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            content.push(char::from(b'a' + ((x >> 33) % 26) as u8));
            if x.is_multiple_of(7) {
                content.push(' ');
            }
        }
        total += content.len();
        let role = if i.is_multiple_of(2) {
            "user"
        } else {
            "assistant"
        };
        messages.push(serde_json::json!({"role": role, "content": content}));
        i += 1;
    }
    let messages_text = serde_json::to_string(&messages).unwrap();
    let body = format!(
        r#"{{"model":"gpt-4o","messages":{messages_text},"temperature":0.25,"user":"e2e","tools":[{{"type":"function","function":{{"name":"f","parameters":{{"type":"object"}}}}}}]}}"#
    );
    assert!(body.len() > 1024 * 1024);
    let resp = s.send(&Req::chat(DASHSCOPE, &body)).await;
    assert_eq!(resp.status, 200, "{}", resp.text());

    let reqs = s.provider.requests();
    assert_eq!(reqs.len(), 1);
    let r = &reqs[0];
    assert_no_stale_content_length(r);
    assert_eq!(r.model().as_deref(), Some("qwen1.5-72b-chat"));
    let got = r.json().unwrap();
    let sent: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(got["messages"], sent["messages"], "messages changed");
    for key in ["temperature", "user", "tools"] {
        assert_eq!(got[key], sent[key], "{key} changed");
    }
    let forwarded = String::from_utf8(r.body.clone()).unwrap();
    assert!(
        forwarded.contains(&messages_text),
        "the messages were re-encoded instead of kept byte for byte"
    );
    assert!(
        forwarded.len().abs_diff(body.len()) < 64,
        "body grew or shrank by {} bytes",
        forwarded.len().abs_diff(body.len())
    );
}

/// `settings.maxRequestBodyBytes` (a document in the YAML stream) caps the body: 413
/// `body_too_large` above it, normal service below it.
#[tokio::test]
async fn body_over_the_configured_limit_gets_413() {
    let config =
        mesh_manifests_plus("settings:\n  maxRequestBodyBytes: 1024\n  forwardAfterBody: true");
    let s = Stack::builder("mesh.yaml")
        .wasm_configuration(&config)
        .start();
    let big = format!(
        r#"{{"messages": [{{"role": "user", "content": "{}"}}]}}"#,
        "x".repeat(2000)
    );
    let resp = s.send(&Req::chat(DASHSCOPE, &big)).await;
    assert_openai_error(&resp, 413, "body_too_large");
    assert!(s.provider.requests().is_empty());

    let small = s.send(&Req::chat(DASHSCOPE, SEED_BODY)).await;
    assert_eq!(small.status, 200, "{}", small.text());
    assert_eq!(s.provider.requests().len(), 1);
}

/// An LLMRoute whose only rule needs a header answers 404 `route_not_found` without it.
/// The configuration is given in the JSON form Istio's pluginConfig delivers.
#[tokio::test]
async fn no_matching_rule_gets_404_route_not_found() {
    let config = serde_json::json!({
        "providers": [{
            "apiVersion": "istio.alibabacloud.com/v1beta1",
            "kind": "LLMProvider",
            "metadata": {"name": "dashscope-qwen"},
            "spec": {
                "host": DASHSCOPE,
                "path": DASHSCOPE_PATH,
                "configs": {"defaultConfig": {"openAIConfig": {
                    "model": "qwen-max", "apiKey": KEY_DASHSCOPE
                }}}
            }
        }],
        "routes": [{
            "apiVersion": "istio.alibabacloud.com/v1beta1",
            "kind": "LLMRoute",
            "metadata": {"name": "gold-only", "namespace": "default"},
            "spec": {
                "host": "demo-llm-server",
                "rules": [{
                    "name": "gold",
                    "matches": [{"headers": {"x-tier": {"prefix": "gold"}}}],
                    "backendRefs": [{"providerHost": DASHSCOPE}]
                }]
            }
        }]
    });
    let s = Stack::builder("mesh.yaml")
        .wasm_configuration(&config.to_string())
        .start();
    let resp = s.send(&Req::chat("demo-llm-server", SEED_BODY)).await;
    assert_openai_error(&resp, 404, "route_not_found");
    let resp = s
        .send(&Req::chat("demo-llm-server", SEED_BODY).header("x-tier", "silver"))
        .await;
    assert_openai_error(&resp, 404, "route_not_found");
    assert!(s.provider.all_requests().is_empty());

    let gold = s
        .send(&Req::chat("demo-llm-server", SEED_BODY).header("x-tier", "gold-plus"))
        .await;
    assert_eq!(gold.status, 200, "{}", gold.text());
    assert_eq!(gold.json()["model"], "qwen-max");
    let reqs = s.provider.requests();
    assert_eq!(reqs.len(), 1);
    assert_bearer(&reqs[0], KEY_DASHSCOPE);
}

/// A configuration the filter refuses stops a static Envoy, and the log names the resource
/// and the field.
#[test]
fn refused_configuration_stops_envoy_and_names_resource_and_field() {
    let provider = support::mock::MockServer::start_tls(&pki().0).unwrap();
    let local = support::mock::MockServer::start_plain().unwrap();
    let cases = [
        (
            "apiVersion: istio.alibabacloud.com/v1beta1\nkind: LLMRoute\nmetadata:\n  name: typo-route\n  namespace: default\nspec:\n  host: typo.example\n  rules:\n  - backendRefs:\n    - providerHost: dashscope.aliyuncs.com\n    - providerHost: nowhere.example",
            vec!["LLMRoute default/typo-route", "rules[0].backendRefs[1].providerHost", "nowhere.example"],
        ),
        (
            "apiVersion: istio.alibabacloud.com/v1beta1\nkind: LLMProvider\nmetadata:\n  name: sloppy\nspec:\n  host: sloppy.example\n  path: /v1/chat/completions\n  modle: gpt-4o",
            vec!["LLMProvider default/sloppy", "modle"],
        ),
    ];
    for (extra, needles) in cases {
        let config = mesh_manifests_plus(extra);
        let yaml = Stack::builder("mesh.yaml")
            .wasm_configuration(&config)
            .render(&provider, &local);
        let (status, log) =
            support::envoy::run_to_exit(&yaml, "bad-config", Duration::from_secs(60));
        assert!(
            !status.success(),
            "Envoy accepted a bad configuration ({status}). Log:\n{log}"
        );
        for needle in needles {
            assert!(
                log.contains(needle),
                "Envoy's log does not name `{needle}`. Log:\n{log}"
            );
        }
        assert!(
            !log.contains("sk-demo"),
            "an API key appears in Envoy's log"
        );
    }
}

/// API keys reach the provider and nothing else: not the client, not Envoy's log or access
/// log, not error replies.
#[tokio::test]
async fn api_keys_never_appear_in_replies_or_logs() {
    let s = Stack::start("mesh.yaml");
    let mut bodies = Vec::new();
    for (host, body, header) in [
        (DASHSCOPE, SEED_BODY, None),
        (DASHSCOPE, SEED_BODY, Some(("user-type", "subscriber"))),
        ("demo-llm-server", SEED_BODY, None),
        ("demo-llm-server", SEED_BODY, None),
        ("demo-llm-server", "{not json", None),
        (DASHSCOPE, "[]", None),
    ] {
        let mut req = Req::chat(host, body);
        if let Some((n, v)) = header {
            req = req.header(n, v);
        }
        let resp = s.send(&req).await;
        bodies.push(format!("{:?}\n{}", resp.headers, resp.text()));
    }
    assert!(s.provider.requests().len() >= 4);
    for b in &bodies {
        assert!(!b.contains("sk-demo"), "an API key reached the client");
    }
    let log = s
        .envoy
        .wait_for_log("demo-llm-server", Duration::from_secs(5));
    assert!(
        log.contains("authority="),
        "the access log was not written (so the check below would prove nothing)"
    );
    assert!(
        !log.contains("sk-demo"),
        "an API key appears in Envoy's log"
    );
}

/// A provider that takes long before its first byte is waited for (LLM-sized timeouts).
#[tokio::test]
async fn slow_first_byte_is_waited_for() {
    let s = Stack::start("mesh.yaml");
    s.provider.set_behavior(Behavior {
        header_delay: Duration::from_millis(2500),
        ..Behavior::default()
    });
    let started = std::time::Instant::now();
    let resp = s.send(&Req::chat(DASHSCOPE, SEED_BODY)).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert!(started.elapsed() >= Duration::from_millis(2500));
    assert_eq!(resp.json()["model"], "qwen1.5-72b-chat");
}

/// A provider that dies mid-stream truncates that answer only; the next request works.
#[tokio::test]
async fn provider_abort_mid_stream_truncates_only_that_answer() {
    let s = Stack::start("mesh.yaml");
    s.provider.set_behavior(Behavior {
        sse_events: 5,
        sse_gap: Duration::from_millis(50),
        abort_after_events: Some(2),
        ..Behavior::default()
    });
    let body = r#"{"messages": [{"role": "user", "content": "hi"}], "stream": true}"#;
    let resp = s.send(&Req::chat(DASHSCOPE, body)).await;
    assert_eq!(resp.status, 200);
    let events = resp.sse_events();
    assert_eq!(events.len(), 2, "two events before the abort: {events:?}");
    assert!(
        resp.body_error.is_some() || !resp.text().contains("[DONE]"),
        "the truncated stream looked complete"
    );

    s.provider.set_behavior(Behavior::default());
    let next = s.send(&Req::chat(DASHSCOPE, body)).await;
    assert_eq!(next.status, 200);
    assert!(next.text().contains("[DONE]"), "{}", next.text());
    assert!(s.envoy.stat("server.state").is_some());
}
