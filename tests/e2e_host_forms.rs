#![cfg(not(target_arch = "wasm32"))]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Every form of a host a client can write, against every shipped configuration (mesh, gateway
//! with the seed's RBAC DENY, JWT, ext_authz, `apiKeyFile`, fallback), in real Envoy with the
//! release filter. The forms are generated: case × trailing dots × ports (none, empty,
//! numeric, zero-padded, signed, oversized, not a number, two ports, a space) × user info, for
//! route hosts, provider hosts and a host the manifests do not name; plus two `Host` headers,
//! absolute-form request targets and HTTP/2 `:authority` against a `host` header.
//!
//! Each request ends in one of three ways, and the table says which one each form must get:
//! refused before any provider sees it; served after the filter's rewrite and after the
//! authorization in front of it; or passed through, untouched, to a host that is not an LLM
//! host. Whatever the form, every request a provider receives was rewritten by the filter
//! (its path, `:authority`, key), carries neither the client's credential nor the fallback
//! marker, and comes from a client the authorization let through.

mod support;

use support::envoy::Envoy;
use support::host_forms::*;
use support::mock::{Behavior, FixedReply, MockServer};
use support::*;

/// Seed 001's mesh: route hosts, a provider host, and one the manifests do not name.
#[tokio::test]
async fn mesh() {
    let s = Stack::start("mesh.yaml");
    let t = Target {
        local: Some(&s.local),
        ..Target::new(
            "mesh.yaml",
            s.envoy.addr,
            &s.provider,
            vec![
                (DASHSCOPE, DASHSCOPE_PATH, KEY_DASHSCOPE),
                (MOONSHOT, MOONSHOT_PATH, KEY_MOONSHOT),
            ],
        )
    };
    let hosts = [
        ("demo-llm-server", Kind::Route),
        ("demo-llm-server.default.svc.cluster.local", Kind::Route),
        (DASHSCOPE, Kind::Route),
        (MOONSHOT, Kind::Provider),
        ("example.com", Kind::Other),
    ];
    t.table(&hosts, |kind| match kind {
        Kind::Other => Expect::PassedThrough,
        _ => Expect::Served,
    })
    .await;
    t.odd_forms("demo-llm-server", "example.com").await;
    t.odd_forms(MOONSHOT, "example.com").await;
}

/// Seed 000's gateway with its AuthorizationPolicy (DENY 127.0.0.2 for test.com) as RBAC:
/// no form of test.com gets past it, and the provider's own host is not served at all.
#[tokio::test]
async fn gateway_with_rbac_deny() {
    let s = Stack::start("gateway.yaml");
    let hosts = [
        ("test.com", Kind::Route),
        (DASHSCOPE, Kind::GatewayProvider),
        ("example.com", Kind::Other),
    ];
    for (source, denied) in [(None, false), (Some(DENIED), true)] {
        let t = Target {
            local: Some(&s.local),
            source,
            ..Target::new(
                if denied {
                    "gateway.yaml from 127.0.0.2"
                } else {
                    "gateway.yaml"
                },
                s.envoy.addr,
                &s.provider,
                vec![(DASHSCOPE, DASHSCOPE_PATH, KEY_GATEWAY)],
            )
        };
        let before = s.provider.all_requests().len();
        t.table(&hosts, |kind| match (kind, denied) {
            (Kind::Route, false) => Expect::Served,
            (Kind::Route, true) => Expect::Refused(Some(403)),
            (Kind::GatewayProvider, _) => Expect::Refused(Some(404)),
            _ => Expect::PassedThrough,
        })
        .await;
        t.odd_forms("test.com", "example.com").await;
        if denied {
            let reached: Vec<String> = s.provider.all_requests()[before..]
                .iter()
                .map(|r| format!("{} {} {:?}", r.method, r.path, r.authority))
                .collect();
            assert!(
                reached.is_empty(),
                "a denied client reached the provider: {reached:?}"
            );
        }
    }
}

/// The JWT gateway: without a valid token no form of test.com reaches the provider; with
/// one, the served forms do, and the token stays behind.
#[tokio::test]
async fn jwt_gateway() {
    let s = Stack::start("jwt.yaml");
    let token = jwt::sign(&jwt::claims("alice"));
    let hosts = [
        ("test.com", Kind::Route),
        (DASHSCOPE, Kind::GatewayProvider),
        ("example.com", Kind::Other),
    ];
    for (credential, valid) in [(CLIENT_TOKEN.to_string(), false), (token, true)] {
        let t = Target {
            local: Some(&s.local),
            headers: vec![bearer(&credential)],
            credential: credential.clone(),
            ..Target::new(
                if valid {
                    "jwt.yaml with a valid token"
                } else {
                    "jwt.yaml without a valid token"
                },
                s.envoy.addr,
                &s.provider,
                vec![(DASHSCOPE, DASHSCOPE_PATH, KEY_GATEWAY)],
            )
        };
        let before = s.provider.all_requests().len();
        t.table(&hosts, |kind| match (kind, valid) {
            (Kind::Route, true) => Expect::Served,
            (Kind::Route, false) => Expect::Refused(Some(401)),
            (Kind::GatewayProvider, _) => Expect::Refused(Some(404)),
            _ => Expect::PassedThrough,
        })
        .await;
        t.odd_forms("test.com", "example.com").await;
        if !valid {
            assert_eq!(
                s.provider.all_requests().len(),
                before,
                "a request without a valid JWT reached the provider"
            );
        }
    }
}

/// The ext_authz gateway: while the service denies, nothing reaches the provider in any form;
/// once it allows, the table is the gateway's.
#[tokio::test]
async fn ext_authz_gateway() {
    let s = Stack::builder("ext-authz.yaml")
        .plain_cluster("ext-authz")
        .start();
    let authz = s.mock("ext-authz");
    let hosts = [
        ("test.com", Kind::Route),
        (DASHSCOPE, Kind::GatewayProvider),
        ("example.com", Kind::Other),
    ];
    for allowed in [false, true] {
        authz.set_behavior(if allowed {
            Behavior::default()
        } else {
            Behavior {
                fixed: Some(FixedReply {
                    status: 403,
                    content_type: "text/plain".into(),
                    body: b"denied".to_vec(),
                }),
                ..Behavior::default()
            }
        });
        let t = Target {
            local: Some(&s.local),
            ..Target::new(
                if allowed {
                    "ext-authz.yaml, allowed"
                } else {
                    "ext-authz.yaml, denied"
                },
                s.envoy.addr,
                &s.provider,
                vec![(DASHSCOPE, DASHSCOPE_PATH, KEY_GATEWAY)],
            )
        };
        let before = s.provider.all_requests().len();
        t.table(&hosts, |kind| match (kind, allowed) {
            (_, false) => Expect::Refused(Some(403)),
            (Kind::Route, true) => Expect::Served,
            (Kind::GatewayProvider, true) => Expect::Refused(Some(404)),
            _ => Expect::PassedThrough,
        })
        .await;
        t.odd_forms("test.com", "example.com").await;
        if !allowed {
            assert_eq!(
                s.provider.all_requests().len(),
                before,
                "a request the authorization service denied reached the provider"
            );
        }
    }
}

const KEY_FILE_MANIFESTS: &str = "\
apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMProvider
metadata: {name: dashscope-qwen}
spec:
  host: dashscope.aliyuncs.com
  path: /compatible-mode/v1/chat/completions
  configs:
    defaultConfig:
      openAIConfig: {model: qwen-turbo, apiKeyFile: KEY_FILE}
---
apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMRoute
metadata: {name: keys-route}
spec:
  host: test.com
  rules:
  - backendRefs:
    - providerHost: dashscope.aliyuncs.com
";

/// `apiKeyFile`: Envoy's credential injector adds the key on the provider's cluster, after
/// routing. Only requests the filter rewrote reach that cluster, so the key goes out only on
/// the provider's own path, whatever path or host form the client chose.
#[tokio::test]
async fn api_key_file() {
    const KEY: &str = "sk-key-file-4d2c";
    let provider = MockServer::start_tls(&pki().0).expect("mock provider");
    let dir = support::envoy::temp_dir("host-forms-key-file");
    let key_file = dir.join("dashscope-key");
    std::fs::write(&key_file, KEY).unwrap();
    let manifests = KEY_FILE_MANIFESTS.replace("KEY_FILE", &key_file.display().to_string());
    let yaml = render_envoy(
        "host-forms-key-file",
        &manifests,
        &[(DASHSCOPE, provider.addr())],
    );
    let envoy = Envoy::start(&yaml, "host-forms-key-file");
    let t = Target::new(
        "apiKeyFile",
        envoy.addr,
        &provider,
        vec![(DASHSCOPE, DASHSCOPE_PATH, KEY)],
    );
    let hosts = [
        ("test.com", Kind::Route),
        (DASHSCOPE, Kind::Provider),
        ("example.com", Kind::Other),
    ];
    t.table(&hosts, |kind| match kind {
        Kind::Other => Expect::PassedThrough,
        _ => Expect::Served,
    })
    .await;
    t.odd_forms(DASHSCOPE, "example.com").await;
    // The attack this closes: a host form the filter does not serve, on a path of the
    // client's choosing, once got the provider key injected.
    let before = provider.all_requests().len();
    for path in [b"/v1/files".as_slice(), b"/anything"] {
        let outcome = t
            .send_http1(
                "a provider host with a bad port, another path",
                path,
                &[b"dashscope.aliyuncs.com:x"],
                Some(b"dashscope.aliyuncs.com:x"),
            )
            .await;
        assert!(matches!(outcome, Outcome::Refused(_)), "{outcome:?}");
    }
    assert_eq!(provider.all_requests().len(), before);
}

const FALLBACK_MANIFESTS: &str = "\
apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMProvider
metadata: {name: dashscope-qwen}
spec:
  host: dashscope.aliyuncs.com
  path: /compatible-mode/v1/chat/completions
  configs:
    defaultConfig:
      openAIConfig: {model: qwen-turbo, apiKey: sk-forms-dashscope}
---
apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMProvider
metadata: {name: moonshot}
spec:
  host: api.moonshot.cn
  path: /v1/chat/completions
  configs:
    defaultConfig:
      openAIConfig: {model: moonshot-v1-8k, apiKey: sk-forms-moonshot}
---
apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMRoute
metadata: {name: ha-route}
spec:
  host: test.com
  rules:
  - name: ha
    backendRefs:
    - providerHost: dashscope.aliyuncs.com
    fallback:
      providers: [api.moonshot.cn]
";

/// A fallback rule, with the client sending the fallback marker itself on every request: it
/// never steers a request into the fallback route, and never reaches a provider.
#[tokio::test]
async fn fallback() {
    let provider = MockServer::start_tls(&pki().0).expect("mock provider");
    let yaml = render_envoy(
        "host-forms-fallback",
        FALLBACK_MANIFESTS,
        &[(DASHSCOPE, provider.addr()), (MOONSHOT, provider.addr())],
    );
    let envoy = Envoy::start(&yaml, "host-forms-fallback");
    let t = Target {
        headers: vec![
            bearer(CLIENT_TOKEN),
            (
                "x-llm-fallback".to_string(),
                "default/ha-route/0".to_string(),
            ),
        ],
        ..Target::new(
            "fallback",
            envoy.addr,
            &provider,
            vec![
                (DASHSCOPE, DASHSCOPE_PATH, "sk-forms-dashscope"),
                (MOONSHOT, MOONSHOT_PATH, "sk-forms-moonshot"),
            ],
        )
    };
    let hosts = [
        ("test.com", Kind::Route),
        (DASHSCOPE, Kind::Provider),
        (MOONSHOT, Kind::Provider),
        ("example.com", Kind::Other),
    ];
    t.table(&hosts, |kind| match kind {
        Kind::Other => Expect::PassedThrough,
        _ => Expect::Served,
    })
    .await;
    t.odd_forms("test.com", "example.com").await;
}

/// The oracle itself: the forms it calls served are exactly `host` or `host:port`.
#[test]
fn generated_forms_cover_each_class() {
    let all = forms("test.com");
    assert!(all.len() > 250, "{}", all.len());
    let served: Vec<String> = all
        .iter()
        .filter(|f| f.served)
        .map(|f| String::from_utf8_lossy(&f.text).to_string())
        .collect();
    assert_eq!(served.len(), 2 * 5 + 2, "{served:?}");
    assert!(served.contains(&"TeSt.cOm:00080".to_string()), "{served:?}");
}
