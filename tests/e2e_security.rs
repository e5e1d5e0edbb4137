#![cfg(not(target_arch = "wasm32"))]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The seeds' security options ahead of the filter, end to end: JWT authentication
//! (`envoy/jwt.yaml`) and an external authorization service (`envoy/ext-authz.yaml`). A
//! refused request never reaches the provider; an accepted one reaches it with the provider
//! key only (the client's credential is gone). The RBAC case is in e2e_seeds.rs.

mod support;

use std::time::Duration;
use support::client::{Req, SEED_BODY};
use support::mock::{Behavior, FixedReply};
use support::*;

fn with_bearer(host: &str, token: &str) -> Req {
    Req::chat(host, SEED_BODY).header("authorization", &format!("Bearer {token}"))
}

/// The provider saw the gateway key and no trace of the client's credential.
fn assert_only_provider_key(r: &mock::Recorded, client_credential: &str) {
    assert_bearer(r, KEY_GATEWAY);
    for (name, value) in &r.headers {
        assert!(
            !String::from_utf8_lossy(value).contains(client_credential),
            "the client's credential reached the provider in header {name}"
        );
    }
}

#[tokio::test]
async fn jwt_gateway_lets_only_valid_tokens_through() {
    let s = Stack::start("jwt.yaml");
    let missing = s.send(&Req::chat("test.com", SEED_BODY)).await;
    assert_eq!(missing.status, 401, "{}", missing.text());
    assert_eq!(missing.text(), "Jwt is missing");
    assert!(s.provider.all_requests().is_empty());

    let token = jwt::sign(&jwt::claims("alice"));
    let ok = s.send(&with_bearer("test.com", &token)).await;
    assert_eq!(ok.status, 200, "{}", ok.text());
    assert_eq!(ok.json()["model"], "qwen-1.8b-chat");
    let with_port = s.send(&with_bearer("TEST.com:80", &token)).await;
    assert_eq!(with_port.status, 200, "{}", with_port.text());
    let reqs = s.provider.requests();
    assert_eq!(reqs.len(), 2);
    for r in &reqs {
        assert_eq!(r.sni.as_deref(), Some(DASHSCOPE));
        assert_eq!(r.path, DASHSCOPE_PATH);
        assert_only_provider_key(r, &token);
    }

    // The shipped demo token (long-lived, same demo key) works as the config comment says.
    let demo = std::fs::read_to_string(repo().join("tests/data/jwt/demo.jwt")).unwrap();
    let resp = s.send(&with_bearer("test.com", demo.trim())).await;
    assert_eq!(resp.status, 200, "tests/data/jwt/demo.jwt: {}", resp.text());

    // Hosts other than test.com need no token.
    let other = s.send(&Req::post("status.example", "/", "ping")).await;
    assert_eq!(other.status, 200, "{}", other.text());
    assert_eq!(s.local.requests().len(), 1);
}

#[tokio::test]
async fn jwt_gateway_refuses_bad_tokens_before_the_filter() {
    let s = Stack::start("jwt.yaml");
    let mut expired = jwt::claims("bob");
    expired["iat"] = (jwt::now() - 7200).into();
    expired["exp"] = (jwt::now() - 3600).into();
    let mut wrong_aud = jwt::claims("bob");
    wrong_aud["aud"] = "someone-else".into();
    let mut wrong_iss = jwt::claims("bob");
    wrong_iss["iss"] = "https://evil.example".into();
    let valid = jwt::sign(&jwt::claims("bob"));
    let (head, _) = valid.rsplit_once('.').unwrap();
    let forged_claims = jwt::claims("admin");
    let forged = format!(
        "{}.{}.{}",
        head.split('.').next().unwrap(),
        jwt::b64url(forged_claims.to_string().as_bytes()),
        valid.rsplit('.').next().unwrap()
    );
    let cases = [
        (jwt::sign(&expired), 401, "Jwt is expired"),
        (
            jwt::sign(&wrong_aud),
            403,
            "Audiences in Jwt are not allowed",
        ),
        (jwt::sign(&wrong_iss), 401, "Jwt issuer is not configured"),
        (forged, 401, "Jwt verification fails"),
        (
            "not.a.jwt".to_string(),
            401,
            "Jwt header is an invalid JSON",
        ),
    ];
    for (token, status, text) in cases {
        let resp = s.send(&with_bearer("test.com", &token)).await;
        assert_eq!(
            resp.status,
            status,
            "expected {status} `{text}`, got {}",
            resp.text()
        );
        assert_eq!(resp.text(), text);
    }
    assert!(
        s.provider.all_requests().is_empty(),
        "a request with a bad JWT reached the provider"
    );
}

#[tokio::test]
async fn ext_authz_decides_before_the_filter() {
    let s = Stack::builder("ext-authz.yaml")
        .plain_cluster("ext-authz")
        .start();
    let authz = s.mock("ext-authz");
    let user_token = "user-token-7f3a9c";

    // Denied: the service's answer reaches the client; nothing reaches the provider.
    let denial = r#"{"error":"user is not allowed to use LLMs"}"#;
    authz.set_behavior(Behavior {
        fixed: Some(FixedReply {
            status: 403,
            content_type: "application/json".into(),
            body: denial.as_bytes().to_vec(),
        }),
        ..Behavior::default()
    });
    let resp = s
        .send(&with_bearer("test.com", user_token).header("x-user", "mallory"))
        .await;
    assert_eq!(resp.status, 403, "{}", resp.text());
    assert_eq!(resp.text(), denial);
    assert!(s.provider.all_requests().is_empty());

    // Allowed: the filter then rewrites as usual; the client's token is replaced.
    authz.set_behavior(Behavior::default());
    let resp = s
        .send(&with_bearer("test.com", user_token).header("x-user", "alice"))
        .await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.json()["model"], "qwen-1.8b-chat");
    let reqs = s.provider.requests();
    assert_eq!(reqs.len(), 1);
    assert_only_provider_key(&reqs[0], user_token);
    assert_eq!(reqs[0].path, DASHSCOPE_PATH);

    // The service saw the request as the client sent it (it runs before the rewrite).
    let checks = authz.requests();
    assert_eq!(checks.len(), 2, "{checks:?}");
    for c in &checks {
        assert_eq!(c.path, "/check/", "check path");
        assert_eq!(
            c.header("authorization").as_deref(),
            Some(format!("Bearer {user_token}").as_str()),
            "the service must see the client's credential, not the provider key"
        );
        assert!(!c
            .headers
            .iter()
            .any(|(_, v)| String::from_utf8_lossy(v).contains("sk-demo")));
    }
    assert_eq!(checks[0].header("x-user").as_deref(), Some("mallory"));
    assert_eq!(checks[1].header("x-user").as_deref(), Some("alice"));
}

#[tokio::test]
async fn ext_authz_failure_denies() {
    let s = Stack::builder("ext-authz.yaml")
        .plain_cluster("ext-authz")
        .start();
    // Slower than the 2 s check timeout: failure_mode_allow is false, so the request fails.
    s.mock("ext-authz").set_behavior(Behavior {
        header_delay: Duration::from_millis(3000),
        ..Behavior::default()
    });
    let resp = s.send(&with_bearer("test.com", "t")).await;
    assert_eq!(resp.status, 403, "{}", resp.text());
    assert!(s.provider.all_requests().is_empty());
}
