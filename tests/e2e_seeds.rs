#![cfg(not(target_arch = "wasm32"))]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The seeds' scenarios end to end: real Envoy 1.40 running the shipped `envoy/mesh.yaml` and
//! `envoy/gateway.yaml` with the release `llm_filter.wasm`, against an HTTPS mock provider.

mod support;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;
use support::client::{Req, SEED_BODY};
use support::mock::Behavior;
use support::*;

fn seed_messages() -> serde_json::Value {
    serde_json::from_str::<serde_json::Value>(SEED_BODY).unwrap()["messages"].clone()
}

/// Seed 001, step 2: a workload calls `http://dashscope.aliyuncs.com` with a bare request.
#[tokio::test]
async fn direct_provider_call_gets_provider_path_model_key_over_tls() {
    let s = Stack::start("mesh.yaml");
    let resp = s
        .send(
            &Req::chat(DASHSCOPE, SEED_BODY)
                .header("authorization", "Bearer client-sent-key-must-vanish"),
        )
        .await;
    assert_eq!(resp.status, 200, "body: {}", resp.text());

    let reqs = s.provider.requests();
    assert_eq!(reqs.len(), 1, "provider requests: {reqs:?}");
    let r = &reqs[0];
    assert!(r.tls, "the provider must be reached over TLS");
    assert_eq!(r.sni.as_deref(), Some(DASHSCOPE), "SNI");
    assert_eq!(r.method, "POST");
    assert_eq!(r.path, DASHSCOPE_PATH);
    assert_eq!(r.authority.as_deref(), Some(DASHSCOPE));
    assert_eq!(r.model().as_deref(), Some("qwen1.5-72b-chat"));
    assert_bearer(r, KEY_DASHSCOPE);
    assert_no_stale_content_length(r);
    let body = r.json().expect("provider got JSON");
    assert_eq!(body["messages"], seed_messages(), "messages kept as sent");
    assert!(
        body.get("stream").is_none(),
        "no stream configured for dashscope-qwen, so none may be added: {body}"
    );
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("application/json")
    );

    let answer = resp.json();
    assert_eq!(answer["model"], "qwen1.5-72b-chat");
    assert_eq!(answer["object"], "chat.completion");
    assert!(
        answer["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .contains(DASHSCOPE),
        "answer comes from the dashscope endpoint: {answer}"
    );
    assert!(
        s.local.all_requests().is_empty(),
        "LLM traffic leaked to local-service"
    );
}

/// Seed 001, scenario 1: `user-type: subscriber` matches vip-route → qwen-turbo, vip key.
#[tokio::test]
async fn subscriber_header_selects_vip_route_config() {
    let s = Stack::start("mesh.yaml");
    let vip = s
        .send(&Req::chat(DASHSCOPE, SEED_BODY).header("user-type", "subscriber"))
        .await;
    assert_eq!(vip.status, 200, "body: {}", vip.text());
    assert_eq!(vip.json()["model"], "qwen-turbo");
    // Exact match only: anything else falls to the catch-all rule (defaultConfig).
    let other = s
        .send(&Req::chat(DASHSCOPE, SEED_BODY).header("user-type", "subscriber-trial"))
        .await;
    assert_eq!(other.status, 200, "body: {}", other.text());
    assert_eq!(other.json()["model"], "qwen1.5-72b-chat");
    let plain = s.send(&Req::chat(DASHSCOPE, SEED_BODY)).await;
    assert_eq!(plain.json()["model"], "qwen1.5-72b-chat");

    let reqs = s.provider.requests();
    assert_eq!(reqs.len(), 3);
    assert_eq!(reqs[0].model().as_deref(), Some("qwen-turbo"));
    assert_bearer(&reqs[0], KEY_DASHSCOPE_VIP);
    assert_eq!(reqs[0].path, DASHSCOPE_PATH);
    for r in &reqs[1..] {
        assert_eq!(r.model().as_deref(), Some("qwen1.5-72b-chat"));
        assert_bearer(r, KEY_DASHSCOPE);
        assert_eq!(r.sni.as_deref(), Some(DASHSCOPE));
    }
}

/// Seed 001, scenario 2: `demo-llm-server` splits 50/50 between DashScope and Moonshot, and
/// each provider gets its own path, model, key, stream setting and SNI.
#[tokio::test]
async fn demo_llm_server_splits_half_and_half_between_providers() {
    const N: usize = 200;
    let s = Stack::start("mesh.yaml");
    let addr = s.envoy.addr;
    let mut set = tokio::task::JoinSet::new();
    let mut answered: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..N {
        set.spawn(async move {
            support::client::send(addr, &Req::chat("demo-llm-server", SEED_BODY)).await
        });
        if set.len() >= 8 || i == N - 1 {
            while let Some(r) = set.join_next().await {
                let r = r.unwrap();
                assert_eq!(r.status, 200, "body: {}", r.text());
                let model = r.json()["model"].as_str().unwrap().to_string();
                *answered.entry(model).or_default() += 1;
            }
        }
    }

    let reqs = s.provider.requests();
    assert_eq!(reqs.len(), N);
    let mut by_sni: BTreeMap<String, usize> = BTreeMap::new();
    for r in &reqs {
        let sni = r.sni.clone().unwrap_or_default();
        *by_sni.entry(sni.clone()).or_default() += 1;
        assert_eq!(
            r.authority.as_deref(),
            Some(sni.as_str()),
            "authority = SNI"
        );
        assert_no_stale_content_length(r);
        let body = r.json().unwrap();
        assert_eq!(body["messages"], seed_messages());
        match sni.as_str() {
            DASHSCOPE => {
                assert_eq!(r.path, DASHSCOPE_PATH);
                assert_eq!(r.model().as_deref(), Some("qwen1.5-72b-chat"));
                assert_bearer(r, KEY_DASHSCOPE);
                assert!(body.get("stream").is_none(), "{body}");
            }
            MOONSHOT => {
                assert_eq!(r.path, MOONSHOT_PATH);
                assert_eq!(r.model().as_deref(), Some("moonshot-v1-8k"));
                assert_bearer(r, KEY_MOONSHOT);
                assert_eq!(body["stream"], false, "moonshot's stream: false is set");
            }
            other => panic!("request reached an unexpected SNI {other:?}"),
        }
    }
    // Binomial(200, 0.5): sd ≈ 7.07; allow 5 sigma either side.
    let band = 5.0 * ((N as f64) * 0.25).sqrt();
    for host in [DASHSCOPE, MOONSHOT] {
        let n = *by_sni.get(host).unwrap_or(&0) as f64;
        assert!(
            (n - N as f64 / 2.0).abs() <= band,
            "{host} got {n} of {N} requests; expected {} ± {band:.0}: {by_sni:?}",
            N / 2
        );
    }
    assert_eq!(answered.get("qwen1.5-72b-chat"), by_sni.get(DASHSCOPE));
    assert_eq!(answered.get("moonshot-v1-8k"), by_sni.get(MOONSHOT));
}

/// Short mesh names also match `name.namespace[.svc.cluster.local]`, any case, any port. A
/// trailing dot is not a form the filter serves (e2e_host_forms.rs): refused, never forwarded.
#[tokio::test]
async fn demo_llm_server_matches_its_long_and_uppercase_host_forms() {
    let s = Stack::start("mesh.yaml");
    let forms = [
        "demo-llm-server.default.svc.cluster.local",
        "demo-llm-server.default",
        "DEMO-LLM-SERVER:80",
        "Demo-Llm-Server.Default.Svc.Cluster.Local:8080",
    ];
    for host in forms {
        let resp = s.send(&Req::chat(host, SEED_BODY)).await;
        assert_eq!(resp.status, 200, "host {host}: {}", resp.text());
        let model = resp.json()["model"].as_str().unwrap().to_string();
        assert!(
            model == "qwen1.5-72b-chat" || model == "moonshot-v1-8k",
            "host {host} answered by model {model}"
        );
    }
    assert_eq!(s.provider.requests().len(), forms.len());
    assert!(s.local.all_requests().is_empty());
    let dotted = s.send(&Req::chat("demo-llm-server.", SEED_BODY)).await;
    assert_openai_error(&dotted, 400, "invalid_host");
    assert_eq!(s.provider.requests().len(), forms.len());

    // Another namespace is another service: not the route's host, so it passes through.
    let resp = s
        .send(&Req::chat(
            "demo-llm-server.other.svc.cluster.local",
            SEED_BODY,
        ))
        .await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(s.provider.requests().len(), forms.len());
    let local = s.local.requests();
    assert_eq!(local.len(), 1);
    assert_eq!(local[0].path, "/");
    assert_eq!(
        local[0].body,
        SEED_BODY.as_bytes(),
        "passed through untouched"
    );
}

/// Seed 000: a client calls the gateway with `Host: test.com`; hostRewrite sends it to
/// DashScope with qwen-1.8b-chat, stream false and the gateway's key.
#[tokio::test]
async fn gateway_test_com_is_rewritten_to_dashscope() {
    let s = Stack::start("gateway.yaml");
    let body = r#"{"messages": [{"role": "user", "content": "请介绍你自己"}]}"#;
    let resp = s.send(&Req::chat("test.com", body)).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.json()["model"], "qwen-1.8b-chat");

    let reqs = s.provider.requests();
    assert_eq!(reqs.len(), 1);
    let r = &reqs[0];
    assert!(r.tls);
    assert_eq!(r.sni.as_deref(), Some(DASHSCOPE));
    assert_eq!(r.authority.as_deref(), Some(DASHSCOPE), "hostRewrite");
    assert_eq!(r.path, DASHSCOPE_PATH);
    assert_eq!(r.model().as_deref(), Some("qwen-1.8b-chat"));
    assert_eq!(r.json().unwrap()["stream"], false);
    assert_eq!(
        r.json().unwrap()["messages"][0]["content"],
        "请介绍你自己",
        "non-ASCII content kept"
    );
    assert_bearer(r, KEY_GATEWAY);
    assert_no_stale_content_length(r);
}

/// Seed 000, step 5: the AuthorizationPolicy (RBAC before the filter) denies 127.0.0.2 for
/// test.com; the provider never sees the request. Other clients and hosts are unaffected.
#[tokio::test]
async fn gateway_rbac_denies_the_listed_ip_before_the_filter() {
    let s = Stack::start("gateway.yaml");
    let denied_ip = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
    let denied = s
        .send(&Req::chat("test.com", SEED_BODY).bind_source(denied_ip))
        .await;
    assert_eq!(denied.status, 403, "{}", denied.text());
    assert_eq!(denied.text(), "RBAC: access denied");
    let denied_port = s
        .send(&Req::chat("test.com:80", SEED_BODY).bind_source(denied_ip))
        .await;
    assert_eq!(denied_port.status, 403, "{}", denied_port.text());
    assert!(
        s.provider.all_requests().is_empty(),
        "a denied request reached the provider"
    );

    let allowed = s.send(&Req::chat("test.com", SEED_BODY)).await;
    assert_eq!(
        allowed.status,
        200,
        "127.0.0.1 is not denied: {}",
        allowed.text()
    );
    let other_host = s
        .send(&Req::post("intranet.example", "/health", "ok").bind_source(denied_ip))
        .await;
    assert_eq!(
        other_host.status,
        200,
        "the policy is for test.com only: {}",
        other_host.text()
    );
    assert_eq!(s.provider.requests().len(), 1);
    assert_eq!(s.local.requests().len(), 1);
}

/// Traffic to a host no LLMRoute or LLMProvider names passes through byte-identical:
/// method, path with query, headers (including the client's authorization and
/// content-length) and a body that is not JSON.
#[tokio::test]
async fn other_hosts_pass_through_byte_identical() {
    let s = Stack::start("mesh.yaml");
    let body: Vec<u8> = b"not json: {\"model\": \x00\xff\xfe binary tail\r\n"
        .iter()
        .copied()
        .cycle()
        .take(5000)
        .collect();
    let path = "/api/v1/items?model=keep&x=%20y&flag";
    let mut req = Req::post("inventory.internal:8080", path, body.clone())
        .header("content-type", "application/octet-stream")
        .header("authorization", "Bearer workload-own-token")
        .header("x-custom", "Value With Spaces")
        .header("user-type", "subscriber")
        .header("content-length", &body.len().to_string());
    req.method = "PUT".into();
    let resp = s.send(&req).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert!(s.provider.all_requests().is_empty());

    let json_body = r#"{"model":"client-choice","messages":[{"role":"user","content":"hi"}]}"#;
    let resp = s
        .send(&Req::chat("search.example.com", json_body).header("authorization", "Bearer t2"))
        .await;
    assert_eq!(resp.status, 200, "{}", resp.text());

    let local = s.local.requests();
    assert_eq!(local.len(), 2);
    let r = &local[0];
    assert!(!r.tls);
    assert_eq!(r.method, "PUT");
    assert_eq!(r.path, path);
    assert_eq!(r.authority.as_deref(), Some("inventory.internal:8080"));
    assert_eq!(r.body, body, "body changed on the way");
    for (name, value) in [
        ("content-type", "application/octet-stream".to_string()),
        ("authorization", "Bearer workload-own-token".to_string()),
        ("x-custom", "Value With Spaces".to_string()),
        ("user-type", "subscriber".to_string()),
        ("content-length", body.len().to_string()),
    ] {
        assert_eq!(
            r.header(name).as_deref(),
            Some(value.as_str()),
            "header {name}"
        );
        assert_eq!(r.header_count(name), 1, "header {name} duplicated");
    }
    let r = &local[1];
    assert_eq!(r.path, "/");
    assert_eq!(
        r.body,
        json_body.as_bytes(),
        "JSON to another host is not rewritten"
    );
    assert_eq!(r.header("authorization").as_deref(), Some("Bearer t2"));
    assert_eq!(
        r.header("content-length").as_deref(),
        Some(json_body.len().to_string().as_str())
    );
}

/// The client's query string survives the path rewrite; the client's path does not.
#[tokio::test]
async fn query_string_is_kept_when_the_path_is_rewritten() {
    let s = Stack::start("mesh.yaml");
    let mut req = Req::chat(DASHSCOPE, SEED_BODY);
    req.path = "/?trace=abc&x=1%202".into();
    assert_eq!(s.send(&req).await.status, 200);
    req.path = "/v1/chat/completions?api-version=2024-02-01".into();
    req.host = "demo-llm-server".into();
    assert_eq!(s.send(&req).await.status, 200);

    let reqs = s.provider.requests();
    assert_eq!(reqs.len(), 2);
    assert_eq!(reqs[0].path, format!("{DASHSCOPE_PATH}?trace=abc&x=1%202"));
    let expected_base = if reqs[1].sni.as_deref() == Some(MOONSHOT) {
        MOONSHOT_PATH
    } else {
        DASHSCOPE_PATH
    };
    assert_eq!(
        reqs[1].path,
        format!("{expected_base}?api-version=2024-02-01")
    );
}

/// A streamed answer is not buffered: with ~300 ms between provider events, the client gets
/// the first event long before the last.
#[tokio::test]
async fn streamed_answers_flow_event_by_event() {
    let s = Stack::start("mesh.yaml");
    s.provider.set_behavior(Behavior {
        sse_events: 5,
        sse_gap: Duration::from_millis(300),
        ..Behavior::default()
    });
    let body = r#"{"messages": [{"role": "user", "content": "Count to five."}], "stream": true}"#;
    let resp = s.send(&Req::chat(DASHSCOPE, body)).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(
        resp.header("content-type").as_deref(),
        Some("text/event-stream")
    );
    assert!(resp.body_error.is_none(), "{:?}", resp.body_error);
    let events = resp.sse_events();
    assert_eq!(
        events.len(),
        7,
        "5 content events, a usage chunk, [DONE]: {events:?}"
    );
    assert_eq!(events.last().unwrap().1, "[DONE]");
    for (_, data) in &events[..6] {
        let chunk: serde_json::Value = serde_json::from_str(data).unwrap();
        assert_eq!(chunk["model"], "qwen1.5-72b-chat");
        assert_eq!(chunk["object"], "chat.completion.chunk");
    }
    let usage: serde_json::Value = serde_json::from_str(&events[5].1).unwrap();
    assert!(usage["usage"]["total_tokens"].as_u64().unwrap() > 0);

    let first = events[0].0;
    let last = events[6].0;
    // 5 gaps of 300 ms separate the first and the last event at the provider.
    assert!(
        last.saturating_sub(first) >= Duration::from_millis(1100),
        "events arrived together (first at {first:?}, last at {last:?}): the response was buffered"
    );
    assert!(
        first < Duration::from_millis(1000),
        "first event took {first:?}"
    );
    let r = &s.provider.requests()[0];
    assert_eq!(r.json().unwrap()["stream"], true, "client's stream kept");
}
