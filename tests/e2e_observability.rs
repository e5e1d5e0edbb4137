#![cfg(not(target_arch = "wasm32"))]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Observability end to end: the access-log fields (`%FILTER_STATE(wasm.llm.*:PLAIN)%`) and the
//! labelled metrics (`/stats/prometheus`) of the shipped `envoy/mesh.yaml`, for JSON answers and
//! for SSE streams, against what the mock provider actually reported.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use support::admin::admin_get;
use support::client::{Req, SEED_BODY};
use support::mock::{Behavior, FixedReply};
use support::*;

/// The `key=value` fields of the `n`-th (1-based) access-log line of an LLM request.
fn access_log_fields(s: &Stack, n: usize) -> BTreeMap<String, String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let log = s.envoy.log();
        let line = log
            .lines()
            .filter(|l| l.contains(" provider=") && l.contains(" model="))
            .nth(n - 1);
        if let Some(line) = line {
            return line
                .split_whitespace()
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no access-log line number {n} for an LLM request:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `name{labels} value` lines of Envoy's Prometheus output for one metric name.
fn prometheus(s: &Stack, metric: &str) -> Vec<(BTreeMap<String, String>, f64)> {
    let (status, body) = admin_get(s.envoy.admin, "/stats/prometheus").unwrap();
    assert_eq!(status, 200);
    body.lines()
        .filter_map(|line| {
            let rest = line
                .strip_prefix(&support::native::prometheus_name(metric))?
                .strip_prefix('{')?;
            let (labels, value) = rest.split_once("} ")?;
            let labels = labels
                .split("\",")
                .filter_map(|kv| kv.split_once("=\""))
                .map(|(k, v)| (k.to_string(), v.trim_end_matches('"').to_string()))
                .collect();
            Some((labels, value.trim().parse().ok()?))
        })
        .collect()
}

fn value_for(series: &[(BTreeMap<String, String>, f64)], want: &[(&str, &str)]) -> Option<f64> {
    series
        .iter()
        .find(|(labels, _)| {
            want.iter()
                .all(|(k, v)| labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, v)| *v)
}

fn usage(answer: &serde_json::Value) -> (u64, u64, u64) {
    let u = &answer["usage"];
    (
        u["prompt_tokens"].as_u64().unwrap(),
        u["completion_tokens"].as_u64().unwrap(),
        u["total_tokens"].as_u64().unwrap(),
    )
}

/// Two subscriber requests: the access log names provider, rule and models with the tokens
/// the provider reported, and the prompt-token counter for qwen-turbo / vip-route is the sum.
#[tokio::test]
async fn json_answers_fill_access_log_and_token_counters() {
    let s = Stack::start("mesh.yaml");
    let mut prompt_sum = 0;
    let mut completion_sum = 0;
    for i in 0..2 {
        let body = SEED_BODY.replace("yourself", &"yourself ".repeat(i + 1));
        let resp = s
            .send(&Req::chat("dashscope.aliyuncs.com", &body).header("user-type", "subscriber"))
            .await;
        assert_eq!(resp.status, 200, "{}", resp.text());
        let answer = resp.json();
        let (prompt, completion, total) = usage(&answer);
        prompt_sum += prompt;
        completion_sum += completion;

        let fields = access_log_fields(&s, i + 1);
        assert_eq!(fields["provider"], "dashscope-qwen");
        assert_eq!(fields["rule"], "vip-route");
        assert_eq!(fields["model"], "qwen-turbo");
        assert_eq!(fields["response_model"], answer["model"].as_str().unwrap());
        assert_eq!(fields["prompt_tokens"], prompt.to_string());
        assert_eq!(fields["completion_tokens"], completion.to_string());
        assert_eq!(fields["total_tokens"], total.to_string());
    }
    let tags = [
        ("provider", "dashscope-qwen"),
        ("model", "qwen-turbo"),
        ("rule", "vip-route"),
    ];
    let prompt = prometheus(&s, "llm_prompt_tokens_total");
    assert_eq!(
        value_for(&prompt, &tags),
        Some(prompt_sum as f64),
        "{prompt:?}"
    );
    let completion = prometheus(&s, "llm_completion_tokens_total");
    assert_eq!(value_for(&completion, &tags), Some(completion_sum as f64));
    let requests = prometheus(&s, "llm_requests_total");
    let ok = [tags.as_slice(), &[("class", "2xx")]].concat();
    assert_eq!(value_for(&requests, &ok), Some(2.0), "{requests:?}");
}

/// A stream: usage is asked for, read from the last event as it passes, and counted; the
/// client gets every event unchanged.
#[tokio::test]
async fn sse_streams_report_usage_without_being_held() {
    let s = Stack::start("mesh.yaml");
    s.provider.set_behavior(Behavior {
        sse_events: 3,
        sse_gap: Duration::from_millis(150),
        ..Behavior::default()
    });
    let body = r#"{"messages":[{"role":"user","content":"stream please"}],"stream":true}"#;
    let resp = s.send(&Req::chat("dashscope.aliyuncs.com", body)).await;
    assert_eq!(resp.status, 200);
    let events = resp.sse_events();
    assert_eq!(events.last().map(|(_, d)| d.as_str()), Some("[DONE]"));
    let first = events.first().unwrap().0;
    let last = events.last().unwrap().0;
    assert!(
        last - first >= Duration::from_millis(300),
        "events arrived together ({first:?}..{last:?}): the stream was held back"
    );
    let usage_event: serde_json::Value = events
        .iter()
        .filter_map(|(_, d)| serde_json::from_str::<serde_json::Value>(d).ok())
        .find(|e| e["usage"].is_object())
        .expect("a usage event");
    let (prompt, completion, total) = usage(&usage_event);

    let sent = s.provider.requests();
    let sent = sent.last().unwrap().json().unwrap();
    assert_eq!(sent["stream_options"]["include_usage"], true, "{sent}");

    let fields = access_log_fields(&s, 1);
    assert_eq!(fields["rule"], "-", "no rule: not set, Envoy prints -");
    assert_eq!(fields["model"], "qwen1.5-72b-chat");
    assert_eq!(fields["prompt_tokens"], prompt.to_string());
    assert_eq!(fields["completion_tokens"], completion.to_string());
    assert_eq!(fields["total_tokens"], total.to_string());

    let tags = [
        ("provider", "dashscope-qwen"),
        ("model", "qwen1.5-72b-chat"),
        ("rule", ""),
    ];
    let counted = prometheus(&s, "llm_prompt_tokens_total");
    assert_eq!(value_for(&counted, &tags), Some(prompt as f64));
    // Histograms reach the admin output at Envoy's stats flush (every 5 s by default).
    let deadline = std::time::Instant::now() + Duration::from_secs(12);
    loop {
        let ttft = prometheus(&s, "llm_time_to_first_token_ms_count");
        if value_for(&ttft, &tags) == Some(1.0) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{ttft:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A client that set `stream_options` itself keeps them as sent.
#[tokio::test]
async fn client_stream_options_are_kept() {
    let s = Stack::start("mesh.yaml");
    let body = r#"{"messages":[],"stream":true,"stream_options":{"include_usage":false}}"#;
    let resp = s.send(&Req::chat("dashscope.aliyuncs.com", body)).await;
    assert_eq!(resp.status, 200);
    let sent = s.provider.requests();
    let sent = sent.last().unwrap().json().unwrap();
    assert_eq!(sent["stream_options"]["include_usage"], false);
}

/// An answer the filter cannot read passes through byte for byte and counts as usage unknown.
#[tokio::test]
async fn unreadable_answers_pass_untouched_as_usage_unknown() {
    let s = Stack::start("mesh.yaml");
    let page = b"<html><body>upstream maintenance</body></html>".to_vec();
    s.provider.set_behavior(Behavior {
        fixed: Some(FixedReply {
            status: 503,
            content_type: "text/html".into(),
            body: page.clone(),
        }),
        ..Behavior::default()
    });
    let resp = s.send(&Req::chat("api.moonshot.cn", SEED_BODY)).await;
    assert_eq!(resp.status, 503);
    assert_eq!(resp.body, page);
    let tags = [
        ("provider", "moonshot"),
        ("model", "moonshot-v1-8k"),
        ("rule", ""),
    ];
    let unknown = prometheus(&s, "llm_usage_unknown_total");
    assert_eq!(value_for(&unknown, &tags), Some(1.0), "{unknown:?}");
    let requests = prometheus(&s, "llm_requests_total");
    let failed = [tags.as_slice(), &[("class", "5xx")]].concat();
    assert_eq!(value_for(&requests, &failed), Some(1.0), "{requests:?}");
}
