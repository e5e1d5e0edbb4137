#![cfg(not(target_arch = "wasm32"))]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Methods on an LLM host, in real Envoy with the shipped mesh config: `POST` is a chat
//! request, `GET` and `HEAD` of `/v1/models` the model list; anything else (`PUT`, `DELETE`, a
//! `GET` of the chat path even with a body, `CONNECT` over HTTP/1.1 and HTTP/2) gets a prompt
//! 405 in OpenAI's error shape, and nothing reaches a provider.

mod support;

use std::time::{Duration, Instant};

use support::client::{Req, SEED_BODY};
use support::raw::{send_h2_request, send_raw};
use support::*;

/// Answered well before any of Envoy's timeouts (the hold timeout is 10 s, the stream idle
/// timeout 300 s).
const PROMPT: Duration = Duration::from_secs(2);

#[tokio::test]
async fn only_post_and_model_list_reads_are_served() {
    let s = Stack::start("mesh.yaml");
    for host in [DASHSCOPE, "demo-llm-server"] {
        for (method, path, body) in [
            ("PUT", "/v1/chat/completions", SEED_BODY),
            ("DELETE", "/v1/files/file-1", ""),
            ("PATCH", "/v1/chat/completions", SEED_BODY),
            ("OPTIONS", "/v1/chat/completions", ""),
            ("GET", "/v1/chat/completions", SEED_BODY),
            ("GET", "/v1/files", ""),
            ("TRACE", "/", ""),
            ("PUT", "/v1/models", ""),
        ] {
            let mut req = Req::post(host, path, body);
            req.method = method.into();
            let started = Instant::now();
            let resp = s.send(&req).await;
            assert!(
                started.elapsed() < PROMPT,
                "{method} {path}: {:?}",
                started.elapsed()
            );
            if method == "TRACE" && resp.status != 405 {
                // Envoy refuses TRACE itself before any filter runs.
                assert!((400..500).contains(&resp.status), "{}", resp.status);
                continue;
            }
            assert_openai_error(&resp, 405, "method_not_allowed");
            assert_eq!(resp.header("allow").as_deref(), Some("POST, GET, HEAD"));
        }
        // The model list, with or without a body: answered by the filter itself.
        for (method, body) in [("GET", ""), ("GET", SEED_BODY), ("HEAD", "")] {
            let mut req = Req::post(host, "/v1/models", body);
            req.method = method.into();
            let resp = s.send(&req).await;
            assert_eq!(resp.status, 200, "{method}: {}", resp.text());
            if method == "HEAD" {
                assert!(resp.body.is_empty(), "{}", resp.text());
            } else {
                assert_eq!(resp.json()["object"], "list");
            }
        }
    }
    assert!(
        s.provider.all_requests().is_empty(),
        "{:#?}",
        s.provider.all_requests()
    );
    // Other hosts keep every method.
    let mut put = Req::post("inventory.internal", "/items/1", "x");
    put.method = "PUT".into();
    assert_eq!(s.send(&put).await.status, 200);
    assert_eq!(s.local.requests().len(), 1);
}

#[tokio::test]
async fn connect_to_an_llm_host_never_hangs() {
    let s = Stack::start("mesh.yaml");
    for target in [format!("{DASHSCOPE}:443"), "demo-llm-server:80".to_string()] {
        let head = format!("CONNECT {target} HTTP/1.1\r\nhost: {target}\r\n\r\n");
        let started = Instant::now();
        let resp = send_raw(s.envoy.addr, head.into_bytes(), Vec::new()).await;
        assert!(
            started.elapsed() < PROMPT,
            "{target}: {:?}",
            started.elapsed()
        );
        assert_openai_error(&resp, 405, "method_not_allowed");

        let started = Instant::now();
        let resp = tokio::time::timeout(
            PROMPT,
            send_h2_request(None, s.envoy.addr, "CONNECT", &target, None, &[], b""),
        )
        .await
        .expect("an HTTP/2 CONNECT is answered promptly");
        assert!(started.elapsed() < PROMPT);
        assert_openai_error(&resp, 405, "method_not_allowed");
    }
    assert!(s.provider.all_requests().is_empty());
}
