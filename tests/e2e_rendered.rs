#![cfg(not(target_arch = "wasm32"))]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! `llm-filter render envoy` end to end: the seeds' manifests, verbatim, rendered with
//! `--endpoint` and `--ca` pointing at the HTTPS mock provider, run by real Envoy 1.40 with the
//! release wasm, and the seeds' scenarios replayed through it. Nothing in the rendered
//! bootstrap is patched: the keys come from the seeds' (oddly named) environment variables.

mod support;

use std::collections::BTreeMap;
use std::process::Command;
use support::client::{Req, SEED_BODY};
use support::envoy::Envoy;
use support::mock::MockServer;
use support::*;

const KEY_GATEWAY_ENV: &str = "sk-rendered-gateway-1111";
const KEY_DASHSCOPE_ENV: &str = "sk-rendered-dashscope-2222";
const KEY_MOONSHOT_ENV: &str = "sk-rendered-moonshot-3333";

/// The mock provider and an Envoy running what `render envoy` made of `seed`.
struct Rendered {
    provider: MockServer,
    envoy: Envoy,
}

/// `hosts`: the seed's provider hosts, each pointed at the mock with `--endpoint`.
fn start(seed: &str, hosts: &[&str]) -> Rendered {
    let provider = MockServer::start_tls(&pki().0).expect("mock provider");
    let (_, ca) = pki();
    let mock = provider.addr().to_string();
    let out = Command::new(env!("CARGO_BIN_EXE_llm-filter"))
        .current_dir(repo())
        .args(["render", "envoy", &format!("tests/data/{seed}")])
        .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .arg("--wasm")
        .arg(wasm())
        .arg("--ca")
        .arg(ca)
        .args(
            hosts
                .iter()
                .flat_map(|h| ["--endpoint".to_string(), format!("{h}={mock}")]),
        )
        .env("API_KEY", KEY_GATEWAY_ENV)
        .env("dashscope API_KEY", KEY_DASHSCOPE_ENV)
        .env("Moonshot API_KEY", KEY_MOONSHOT_ENV)
        .output()
        .expect("run llm-filter");
    assert!(
        out.status.success(),
        "render envoy {seed} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let yaml = String::from_utf8(out.stdout).unwrap();
    let envoy = Envoy::start(
        &yaml,
        &format!("rendered-{}", seed.trim_end_matches(".yaml")),
    );
    Rendered { provider, envoy }
}

impl Rendered {
    async fn send(&self, req: &Req) -> support::client::Resp {
        support::client::send(self.envoy.addr, req).await
    }
}

fn seed_messages() -> serde_json::Value {
    serde_json::from_str::<serde_json::Value>(SEED_BODY).unwrap()["messages"].clone()
}

/// Seed 001: a direct call to the provider host, and `user-type: subscriber` → vip-route.
#[tokio::test]
async fn mesh_direct_call_and_subscriber_rule() {
    let s = start("seed001-mesh.yaml", &[DASHSCOPE, MOONSHOT]);
    let direct = s
        .send(
            &Req::chat(DASHSCOPE, SEED_BODY)
                .header("authorization", "Bearer client-sent-key-must-vanish"),
        )
        .await;
    assert_eq!(direct.status, 200, "{}", direct.text());
    assert_eq!(direct.json()["model"], "qwen1.5-72b-chat");
    let vip = s
        .send(&Req::chat(DASHSCOPE, SEED_BODY).header("user-type", "subscriber"))
        .await;
    assert_eq!(vip.status, 200, "{}", vip.text());
    assert_eq!(vip.json()["model"], "qwen-turbo");

    let reqs = s.provider.requests();
    assert_eq!(reqs.len(), 2, "{reqs:?}");
    for (r, model) in reqs.iter().zip(["qwen1.5-72b-chat", "qwen-turbo"]) {
        assert!(r.tls);
        assert_eq!(
            r.sni.as_deref(),
            Some(DASHSCOPE),
            "SNI is the provider host"
        );
        assert_eq!(r.authority.as_deref(), Some(DASHSCOPE));
        assert_eq!(r.path, DASHSCOPE_PATH);
        assert_eq!(r.model().as_deref(), Some(model));
        // Both entries of seed 001 use ${dashscope API_KEY}.
        assert_bearer(r, KEY_DASHSCOPE_ENV);
        assert_no_stale_content_length(r);
        assert_eq!(r.json().unwrap()["messages"], seed_messages());
    }
}

/// Seed 001: `demo-llm-server` is split between both providers, each called its own way.
#[tokio::test]
async fn mesh_demo_llm_server_reaches_both_providers() {
    const N: usize = 40;
    let s = start("seed001-mesh.yaml", &[DASHSCOPE, MOONSHOT]);
    for _ in 0..N {
        let resp = s.send(&Req::chat("demo-llm-server", SEED_BODY)).await;
        assert_eq!(resp.status, 200, "{}", resp.text());
    }
    let reqs = s.provider.requests();
    assert_eq!(reqs.len(), N);
    let mut by_sni: BTreeMap<String, usize> = BTreeMap::new();
    for r in &reqs {
        let sni = r.sni.clone().unwrap_or_default();
        *by_sni.entry(sni.clone()).or_default() += 1;
        assert_eq!(r.authority.as_deref(), Some(sni.as_str()));
        let body = r.json().unwrap();
        match sni.as_str() {
            DASHSCOPE => {
                assert_eq!(r.path, DASHSCOPE_PATH);
                assert_eq!(r.model().as_deref(), Some("qwen1.5-72b-chat"));
                assert_bearer(r, KEY_DASHSCOPE_ENV);
                assert!(body.get("stream").is_none(), "{body}");
            }
            MOONSHOT => {
                assert_eq!(r.path, MOONSHOT_PATH);
                assert_eq!(r.model().as_deref(), Some("moonshot-v1-8k"));
                assert_bearer(r, KEY_MOONSHOT_ENV);
                assert_eq!(body["stream"], false);
            }
            other => panic!("request reached an unexpected SNI {other:?}"),
        }
    }
    // 50/50 over 40 requests: each side is seen (P(miss) = 2 * 2^-40).
    assert!(
        by_sni.get(DASHSCOPE).is_some_and(|n| *n > 0)
            && by_sni.get(MOONSHOT).is_some_and(|n| *n > 0),
        "both providers must be seen: {by_sni:?}"
    );
}

/// Seed 000: `test.com` on the gateway is rewritten to DashScope (hostRewrite), with the
/// gateway's model, `stream: false` and the key from `${API_KEY}`. Hosts the manifests do not
/// name get the rendered catch-all's 404 and never reach a provider.
#[tokio::test]
async fn gateway_test_com_is_rewritten_and_other_hosts_get_404() {
    let s = start("seed000-gateway.yaml", &[DASHSCOPE]);
    let body = r#"{"messages": [{"role": "user", "content": "请介绍你自己"}]}"#;
    let resp = s.send(&Req::chat("test.com", body)).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.json()["model"], "qwen-1.8b-chat");
    let with_port = s.send(&Req::chat("TEST.com:80", body)).await;
    assert_eq!(with_port.status, 200, "{}", with_port.text());

    let reqs = s.provider.requests();
    assert_eq!(reqs.len(), 2);
    for r in &reqs {
        assert!(r.tls);
        assert_eq!(r.sni.as_deref(), Some(DASHSCOPE));
        assert_eq!(r.authority.as_deref(), Some(DASHSCOPE), "hostRewrite");
        assert_eq!(r.path, DASHSCOPE_PATH);
        assert_eq!(r.model().as_deref(), Some("qwen-1.8b-chat"));
        assert_eq!(r.json().unwrap()["stream"], false);
        assert_eq!(r.json().unwrap()["messages"][0]["content"], "请介绍你自己");
        assert_bearer(r, KEY_GATEWAY_ENV);
        assert_no_stale_content_length(r);
    }

    let other = s
        .send(&Req::post("intranet.example", "/health", "ok"))
        .await;
    assert_eq!(other.status, 404, "{}", other.text());
    assert_eq!(other.text(), "no route for this host\n");
    assert_eq!(
        s.provider.all_requests().len(),
        2,
        "nothing more reached the provider"
    );
}
