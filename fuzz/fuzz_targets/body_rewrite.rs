//! A client's request body (any bytes) through `rewrite_body`, for calls built from a small
//! configuration. Besides never panicking: a body that is not JSON is refused, and a body
//! that is accepted is forwarded as JSON.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use llm_filter::balancer::SplitMix64;
use llm_filter::policy::{Decision, Policy, ProviderCall};
use llm_filter::rewrite::rewrite_body;

const CONFIG: &str = r#"
apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMProvider
metadata: {name: forced}
spec:
  host: forced.example
  path: /v1/chat/completions
  configs:
    defaultConfig:
      openAIConfig: {model: "qwen-\"turbo\"", stream: true, apiKey: sk-fuzz}
---
apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMProvider
metadata: {name: model-only}
spec:
  host: model.example
  path: /v1/chat/completions
  configs:
    defaultConfig:
      openAIConfig: {model: gpt-4o, stream: false}
---
apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMProvider
metadata: {name: as-sent}
spec:
  host: plain.example
  path: /v1/chat/completions
"#;

/// One call per provider of `CONFIG`, chosen the way the filter chooses them.
fn calls() -> &'static [ProviderCall] {
    static CALLS: OnceLock<Vec<ProviderCall>> = OnceLock::new();
    CALLS.get_or_init(|| {
        let policy = match Policy::from_text(CONFIG) {
            Ok(policy) => policy,
            Err(e) => panic!("the fuzz configuration is refused: {e}"),
        };
        let mut rng = SplitMix64::new(0);
        ["forced.example", "model.example", "plain.example"]
            .iter()
            .map(|host| {
                let headers = vec![
                    (":method".to_string(), b"POST".to_vec()),
                    (":authority".to_string(), host.as_bytes().to_vec()),
                ];
                match policy.decide(&headers, &mut rng) {
                    Decision::Forward(call) => (*call).clone(),
                    other => panic!("{host}: {other:?}"),
                }
            })
            .collect()
    })
}

fn is_json(bytes: &[u8]) -> bool {
    std::str::from_utf8(bytes)
        .is_ok_and(|text| serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok())
}

fuzz_target!(|data: &[u8]| {
    // The first byte picks the call and the stream-usage switch; the rest is the body.
    let Some((&pick, body)) = data.split_first() else {
        return;
    };
    let calls = calls();
    let call = &calls[usize::from(pick) % calls.len()];
    let usage = pick & 0x80 != 0;
    if let Ok(out) = rewrite_body(call, body, usage) {
        assert!(is_json(body), "accepted a body that is not JSON");
        if let Some(new_body) = &out.body {
            assert!(is_json(new_body), "forwarded a body that is not JSON");
        }
    }
});
