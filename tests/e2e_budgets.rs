#![cfg(not(target_arch = "wasm32"))]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Budgets (`rules[].limits`) end to end: the release filter in real Envoy, rendered by
//! `llm-filter render envoy --ratelimit`, counted by the real rate limit service
//! (github.com/envoyproxy/ratelimit, from `scripts/ratelimit.sh up`) on real Redis, against the
//! HTTPS mock provider. Each test has its own service, Redis, mock and Envoys.

mod support;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use support::admin::admin_get;
use support::client::{Req, Resp};
use support::envoy::Envoy;
use support::mock::{Behavior, FixedReply, MockServer};
use support::ratelimit::{assert_refused, reported_tokens, service_config, RateLimitService};
use support::*;

const KEY: &str = "sk-demo-budget-dashscope";

/// One provider, and a route whose rules each show one kind of budget (selected by
/// `x-budget`); the last rule has none.
fn manifests(tokens: u32) -> String {
    format!(
        "apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMProvider
metadata: {{name: dashscope-qwen}}
spec:
  host: dashscope.aliyuncs.com
  path: /compatible-mode/v1/chat/completions
  configs: {{defaultConfig: {{openAIConfig: {{model: qwen-turbo, apiKey: {KEY}}}}}}}
---
apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMRoute
metadata: {{name: chat}}
spec:
  host: test.com
  rules:
  - name: tokens
    matches: [{{headers: {{x-budget: {{exact: tokens}}}}}}]
    limits: [{{name: per-user, tokens: {tokens}, per: day, key: {{header: x-user-id}}}}]
    backendRefs: [{{providerHost: dashscope.aliyuncs.com}}]
  - name: requests
    matches: [{{headers: {{x-budget: {{exact: requests}}}}}}]
    limits: [{{name: all, requests: 3, per: day}}]
    backendRefs: [{{providerHost: dashscope.aliyuncs.com}}]
  - name: per-second
    matches: [{{headers: {{x-budget: {{exact: second}}}}}}]
    limits: [{{name: per-user, requests: 1, per: second, key: {{header: x-user-id}}}}]
    backendRefs: [{{providerHost: dashscope.aliyuncs.com}}]
  - name: free
    backendRefs: [{{providerHost: dashscope.aliyuncs.com}}]
"
    )
}

/// The mock provider, the service with the manifests' budgets, and `n` Envoys rendered with
/// `--ratelimit` (plus `extra` arguments) sharing both.
struct Budgets {
    // Dropped in this order: Envoy keeps a connection to the service, which waits for it to
    // close before it exits.
    envoys: Vec<Envoy>,
    service: RateLimitService,
    provider: MockServer,
}

impl Budgets {
    fn start(label: &str, manifests: &str, envoys: &[&[&str]]) -> Budgets {
        Budgets::start_with(label, manifests, envoys, |yaml| yaml)
    }

    /// [`start`](Self::start), each rendered bootstrap changed by `edit` first.
    fn start_with(
        label: &str,
        manifests: &str,
        envoys: &[&[&str]],
        edit: impl Fn(String) -> String,
    ) -> Budgets {
        let service = RateLimitService::up(label, &service_config(label, manifests));
        let provider = MockServer::start_tls(&pki().0).unwrap();
        let ratelimit = service.flag();
        let envoys = envoys
            .iter()
            .enumerate()
            .map(|(i, extra)| {
                let mut args = vec!["--ratelimit", ratelimit.as_str()];
                args.extend_from_slice(extra);
                let yaml = render_envoy_with(
                    &format!("{label}-{i}"),
                    manifests,
                    &[(DASHSCOPE, provider.addr())],
                    &args,
                );
                Envoy::start(&edit(yaml), &format!("{label}-{i}"))
            })
            .collect();
        Budgets {
            provider,
            service,
            envoys,
        }
    }

    async fn send(&self, envoy: usize, req: &Req) -> Resp {
        client::send(self.envoys[envoy].addr, req).await
    }
}

fn chat(budget: &str, user: Option<&str>) -> Req {
    let req = Req::chat("test.com", client::SEED_BODY).header("x-budget", budget);
    match user {
        Some(user) => req.header("x-user-id", user),
        None => req,
    }
}

/// The filter's own counter of refused requests, from Envoy's Prometheus output.
fn rate_limited_series(envoy: &Envoy, rule: &str) -> u64 {
    let (_, text) = admin_get(envoy.admin, "/stats/prometheus").unwrap();
    let want = format!(
        "{}{{provider=\"dashscope-qwen\",model=\"qwen-turbo\",rule=\"{rule}\"}}",
        support::native::prometheus_name("llm_rate_limited_total")
    );
    text.lines()
        .find_map(|l| l.strip_prefix(&want))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Spends `user`'s token budget, of which `already` is counted, through the Envoys in turn
/// until one refuses; returns the tokens the provider reported for the answers that got
/// through (each debited before the next request is sent) and the last answer's.
async fn spend(b: &Budgets, user: &str, envoys: &[usize], already: u64) -> (u64, u64) {
    let needle = format!("x-user-id_{user}_");
    let mut spent = already;
    let mut last = 0;
    for i in 0..50 {
        let resp = b
            .send(envoys[i % envoys.len()], &chat("tokens", Some(user)))
            .await;
        if resp.status == 429 {
            return (spent, last);
        }
        assert_eq!(resp.status, 200, "{}", resp.text());
        last = reported_tokens(&resp);
        spent += last;
        let counted = b.service.wait_for_count(&needle, spent);
        assert_eq!(
            counted, spent,
            "Redis holds {counted} tokens for {user}, the answers reported {spent}"
        );
    }
    panic!("the budget never ran out");
}

#[tokio::test]
async fn two_envoys_spend_one_budget_and_refuse_on_both() {
    let limit = 200;
    let b = Budgets::start("two", &manifests(limit), &[&[], &[]]);
    let (spent, last) = spend(&b, "alice", &[0, 1], 0).await;
    // Let through while the count was at most the limit; refused once it was over.
    assert!(
        spent > u64::from(limit) && spent - last <= u64::from(limit),
        "{spent} {last}"
    );
    let served = b.provider.all_requests().len();
    for envoy in [0, 1] {
        let refused = b.send(envoy, &chat("tokens", Some("alice"))).await;
        assert_refused(&refused, limit);
    }
    assert_eq!(
        b.provider.all_requests().len(),
        served,
        "a refused request reached the provider"
    );
    assert_eq!(
        b.service.count("x-user-id_alice_"),
        spent,
        "refusals debit nothing"
    );

    // Another user has a budget of their own.
    let bob = b.send(1, &chat("tokens", Some("bob"))).await;
    assert_eq!(bob.status, 200, "{}", bob.text());
    assert!(bob.header("x-ratelimit-remaining").is_some());
    let bobs = reported_tokens(&bob);
    assert_eq!(b.service.wait_for_count("x-user-id_bob_", bobs), bobs);

    // Refusals are counted by Envoy and, by rule, by the filter.
    let mut over = 0;
    let mut ours = 0;
    for envoy in &b.envoys {
        over += envoy
            .stat("cluster.dashscope-qwen.ratelimit.over_limit")
            .unwrap_or(0);
        ours += rate_limited_series(envoy, "tokens");
        let errors = envoy.stat("cluster.dashscope-qwen.ratelimit.error");
        assert_eq!(errors.unwrap_or(0), 0);
    }
    assert_eq!(over, 3, "Envoy's over_limit counters");
    assert_eq!(ours, 3, "llm_rate_limited_total{{rule=\"tokens\"}}");
    for envoy in &b.envoys {
        let failures = admin::wasm_failure_lines(&envoy.log())
            .into_iter()
            .chain(
                envoy
                    .log()
                    .lines()
                    .filter(|l| l.contains("Invalid hits_addend")),
            )
            .map(str::to_string)
            .collect::<Vec<_>>();
        assert!(failures.is_empty(), "{failures:?}");
    }
}

/// Istio's WasmPlugin cannot let the filter hold the headers: they go on at header time, and
/// Envoy's rate limit filter asks the service before the body is read.
#[tokio::test]
async fn budgets_work_the_same_when_the_headers_go_on_before_the_body() {
    let limit = 100;
    let b = Budgets::start_with("header-time", &manifests(limit), &[&[]], |yaml| {
        let mut doc: serde_yaml::Value = serde_yaml::from_str(&yaml).unwrap();
        let config = patch::wasm_configuration(&mut doc).unwrap();
        assert!(config.contains("forwardAfterBody: true"), "{config}");
        let config = config.replace("forwardAfterBody: true", "forwardAfterBody: false");
        patch::set_wasm_configuration(&mut doc, &config).unwrap();
        patch::render(&doc).unwrap()
    });
    let (spent, last) = spend(&b, "alice", &[0], 0).await;
    assert!(
        spent > u64::from(limit) && spent - last <= u64::from(limit),
        "{spent} {last}"
    );
    let served = b.provider.all_requests().len();
    assert_refused(&b.send(0, &chat("tokens", Some("alice"))).await, limit);
    assert_eq!(b.provider.all_requests().len(), served);
    assert_eq!(b.service.count("x-user-id_alice_"), spent);
    assert_eq!(rate_limited_series(&b.envoys[0], "tokens"), 2);
    // A bad body after the check: the filter answers 400 and nothing is debited.
    let bad = Req::chat("test.com", "{\"messages\": 1}")
        .header("x-budget", "tokens")
        .header("x-user-id", "bob");
    assert_openai_error(&b.send(0, &bad).await, 400, "invalid_messages");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(b.service.count("x-user-id_bob_"), 0);
    assert!(!b.envoys[0].log().contains("Invalid hits_addend"));
}

/// `render istio` puts the entries on Istio's virtual host (`VIRTUAL_HOST` `MERGE`), not on its
/// routes: Envoy takes a virtual host's per-filter config for a route that has none.
#[tokio::test]
async fn entries_on_the_virtual_host_count_as_render_istio_places_them() {
    let limit = 100;
    let b = Budgets::start_with("vhost", &manifests(limit), &[&[]], |yaml| {
        let mut doc: serde_yaml::Value = serde_yaml::from_str(&yaml).unwrap();
        let hcm = &mut doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
            ["typed_config"];
        let mut moved = 0;
        for vhost in hcm["route_config"]["virtual_hosts"]
            .as_sequence_mut()
            .unwrap()
        {
            let mut entries = None;
            for route in vhost["routes"].as_sequence_mut().unwrap() {
                if let Some(m) = route.as_mapping_mut() {
                    entries = m.remove("typed_per_filter_config").or(entries);
                }
            }
            if let (Some(entries), Some(m)) = (entries, vhost.as_mapping_mut()) {
                m.insert("typed_per_filter_config".into(), entries);
                moved += 1;
            }
        }
        assert_eq!(moved, 1, "the provider's virtual host");
        serde_yaml::to_string(&doc).unwrap()
    });
    let (spent, last) = spend(&b, "alice", &[0], 0).await;
    assert!(
        spent > u64::from(limit) && spent - last <= u64::from(limit),
        "{spent} {last}"
    );
    assert_refused(&b.send(0, &chat("tokens", Some("alice"))).await, limit);
}

#[tokio::test]
async fn streamed_usage_is_debited_and_an_answer_without_usage_debits_nothing() {
    let b = Budgets::start("stream", &manifests(10_000), &[&[]]);
    let body = r#"{"messages": [{"role": "user", "content": "hi"}], "stream": true}"#;
    let req = Req::chat("test.com", body)
        .header("x-budget", "tokens")
        .header("x-user-id", "alice");
    let resp = b.send(0, &req).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert!(resp.text().ends_with("data: [DONE]\n\n"), "{}", resp.text());
    let streamed = reported_tokens(&resp);
    assert!(streamed > 0);
    assert_eq!(
        b.service.wait_for_count("x-user-id_alice_", streamed),
        streamed
    );

    // A provider that reports no usage: the debit is 0, never an invalid hits_addend.
    b.provider.set_behavior(Behavior {
        fixed: Some(FixedReply {
            status: 200,
            content_type: "application/json".into(),
            body: br#"{"object": "chat.completion", "choices": []}"#.to_vec(),
        }),
        ..Behavior::default()
    });
    let resp = b.send(0, &chat("tokens", Some("alice"))).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(b.service.count("x-user-id_alice_"), streamed);
    b.envoys[0].assert_logged("total_tokens=-");
    assert!(!b.envoys[0].log().contains("Invalid hits_addend"));
}

#[tokio::test]
async fn requests_limits_count_each_request_and_rules_never_share_counters() {
    let b = Budgets::start("requests", &manifests(1000), &[&[]]);
    for user in ["a", "b", "c"] {
        let resp = b.send(0, &chat("requests", Some(user))).await;
        assert_eq!(resp.status, 200, "{}", resp.text());
    }
    // The limit has no key: one budget for the rule, whatever the client sends.
    let served = b.provider.all_requests().len();
    let refused = b.send(0, &chat("requests", Some("d"))).await;
    assert_refused(&refused, 3);
    assert_eq!(b.provider.all_requests().len(), served);
    let counters = b.service.counters();
    let keys: Vec<&str> = counters.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys.len(), 1, "{counters:?}");
    assert!(
        keys[0].starts_with("llm-filter_llm_limit_default/chat/requests/all_"),
        "{keys:?}"
    );

    // Other rules keep their own budgets: the same user on the token rule, and a rule without
    // limits, are served.
    let tokens = b.send(0, &chat("tokens", Some("a"))).await;
    assert_eq!(tokens.status, 200, "{}", tokens.text());
    let free = b.send(0, &chat("free", Some("a"))).await;
    assert_eq!(free.status, 200, "{}", free.text());
    assert!(
        free.header("x-ratelimit-limit").is_none(),
        "the free rule has no budget"
    );
}

#[tokio::test]
async fn a_per_second_window_ends_and_requests_are_let_through_again() {
    let b = Budgets::start("second", &manifests(1000), &[&[]]);
    // Start early in a second, so both requests fall in the same window.
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let into = now.subsec_millis();
    if into > 200 {
        std::thread::sleep(Duration::from_millis(u64::from(1000 - into) + 20));
    }
    let first = b.send(0, &chat("second", Some("alice"))).await;
    let second = b.send(0, &chat("second", Some("alice"))).await;
    let other = b.send(0, &chat("second", Some("bob"))).await;
    assert_eq!(first.status, 200, "{}", first.text());
    assert_refused(&second, 1);
    assert_eq!(second.header("retry-after").as_deref(), Some("1"));
    assert_eq!(
        other.status,
        200,
        "bob has a window of his own: {}",
        other.text()
    );
    std::thread::sleep(Duration::from_millis(1100));
    let next = b.send(0, &chat("second", Some("alice"))).await;
    assert_eq!(next.status, 200, "the window ended: {}", next.text());
}

#[tokio::test]
async fn with_the_service_down_envoy_fails_open_or_closed_as_configured() {
    let b = Budgets::start(
        "down",
        &manifests(1000),
        &[&[], &["--ratelimit-failure", "closed"]],
    );
    for envoy in [0, 1] {
        let resp = b.send(envoy, &chat("tokens", Some("alice"))).await;
        assert_eq!(resp.status, 200, "{}", resp.text());
    }
    b.service.stop("ratelimit");
    let served = b.provider.all_requests().len();

    let open = b.send(0, &chat("tokens", Some("alice"))).await;
    assert_eq!(open.status, 200, "fail open: {}", open.text());
    assert!(b.envoys[0].stat("cluster.dashscope-qwen.ratelimit.failure_mode_allowed") >= Some(1));

    let closed = b.send(1, &chat("tokens", Some("alice"))).await;
    assert_openai_error(&closed, 503, "rate_limit_service_unavailable");
    assert!(b.envoys[1].stat("cluster.dashscope-qwen.ratelimit.error") >= Some(1));
    assert_eq!(
        b.provider.all_requests().len(),
        served + 1,
        "only the fail-open request reached the provider"
    );
    // A rule without limits does not ask the service.
    let free = b.send(1, &chat("free", None)).await;
    assert_eq!(free.status, 200, "{}", free.text());
}

#[tokio::test]
async fn redis_restarted_mid_run_keeps_the_counts_and_lets_requests_through_while_down() {
    let limit = 400;
    let b = Budgets::start("redis", &manifests(limit), &[&[]]);
    let mut spent = 0;
    for _ in 0..2 {
        let resp = b.send(0, &chat("tokens", Some("alice"))).await;
        assert_eq!(resp.status, 200, "{}", resp.text());
        spent += reported_tokens(&resp);
        assert_eq!(b.service.wait_for_count("x-user-id_alice_", spent), spent);
    }

    b.service.stop("redis");
    // While Redis is down the service cannot count: Envoy fails open, and what these requests
    // cost is not counted.
    let errors_before = b.envoys[0]
        .stat("cluster.dashscope-qwen.ratelimit.error")
        .unwrap_or(0);
    let down = b.send(0, &chat("tokens", Some("alice"))).await;
    assert_eq!(down.status, 200, "{}", down.text());
    assert!(
        b.envoys[0].stat("cluster.dashscope-qwen.ratelimit.error") > Some(errors_before),
        "the check failed while Redis was down"
    );

    b.service.start_redis();
    // The counters survived (append-only file).
    assert_eq!(b.service.count("x-user-id_alice_"), spent);
    // The service counts again without a restart of its own. Its pooled connections to the
    // old Redis (REDIS_POOL_SIZE, 10) each fail once before they are replaced, and a call that
    // fails lets its request through uncounted: at most that many go uncounted.
    let before = spent;
    let mut sent = 0;
    let mut largest = 0;
    let refused = loop {
        let resp = b.send(0, &chat("tokens", Some("alice"))).await;
        if resp.status != 200 {
            break resp;
        }
        let tokens = reported_tokens(&resp);
        sent += tokens;
        largest = largest.max(tokens);
        // The debit comes after the answer; a failed one never does.
        let count = b.service.count("x-user-id_alice_");
        b.service.wait_for_count_within(
            "x-user-id_alice_",
            count + tokens,
            Duration::from_millis(300),
        );
        assert!(sent < 100 * u64::from(limit), "never refused");
    };
    assert_refused(&refused, limit);
    let end = b.service.count("x-user-id_alice_");
    assert!(end > u64::from(limit), "refused at {end}");
    assert!(end <= before + sent, "{end} counted of {before} + {sent}");
    let uncounted = before + sent - end;
    assert!(
        uncounted <= 10 * largest,
        "{uncounted} tokens went uncounted after Redis came back"
    );
}

#[tokio::test]
async fn no_api_key_reaches_the_services_or_envoys_logs() {
    let b = Budgets::start("keys", &manifests(100), &[&[]]);
    let body = r#"{"messages": [{"role": "user", "content": "hi"}], "stream": true}"#;
    for req in [
        chat("tokens", Some("alice")),
        Req::chat("test.com", body)
            .header("x-budget", "tokens")
            .header("x-user-id", "alice"),
        chat("tokens", Some("alice")),
        chat("tokens", Some("alice")),
        chat("tokens", Some("alice")),
        chat("requests", None),
    ] {
        b.send(0, &req).await;
    }
    assert!(b
        .provider
        .all_requests()
        .iter()
        .all(|r| { r.header("authorization").as_deref() == Some(&format!("Bearer {KEY}")) }));
    b.envoys[0].assert_logged("rule=requests");
    let service_log = b.service.log();
    assert!(
        service_log.contains("x-user-id"),
        "the service logged the descriptors it got (debug level)"
    );
    for (name, log) in [
        ("rate limit service", service_log),
        ("Redis", b.service.redis_log()),
        ("Envoy", b.envoys[0].log()),
    ] {
        assert!(!log.contains(KEY), "the API key is in the {name} log");
        assert!(!log.contains("sk-demo"), "an API key is in the {name} log");
    }
    for (key, _) in b.service.counters() {
        assert!(!key.contains("sk-"), "a key in Redis: {key}");
    }
}

/// The recipe of envoy/extend/jwt-user-id.yaml: jwt_authn copies the token's `sub` into
/// `x-user-id`, a client-sent `x-user-id` is dropped first.
#[tokio::test]
async fn the_jwt_subject_keys_the_budget_and_a_client_sent_user_id_is_dropped() {
    let limit = 100;
    let extend = repo().join("envoy/extend/jwt-user-id.yaml");
    let extend = extend.to_str().unwrap();
    let b = Budgets::start("jwt", &manifests(limit), &[&["--extend", extend]]);
    let as_user = |sub: &str, forged: Option<&str>| {
        let token = jwt::sign(&jwt::claims(sub));
        let req = Req::chat("test.com", client::SEED_BODY)
            .header("x-budget", "tokens")
            .header("authorization", &format!("Bearer {token}"));
        match forged {
            Some(user) => req.header("x-user-id", user),
            None => req,
        }
    };

    // Alice's token, claiming to be carol: counted for alice.
    let mut spent = 0;
    let refused = loop {
        let resp = b.send(0, &as_user("alice", Some("carol"))).await;
        if resp.status != 200 {
            break resp;
        }
        spent += reported_tokens(&resp);
        assert_eq!(b.service.wait_for_count("x-user-id_alice_", spent), spent);
        assert!(spent < 1000, "never refused");
    };
    assert_refused(&refused, limit);
    assert_eq!(b.service.count("x-user-id_carol_"), 0);
    for r in b.provider.requests() {
        assert_eq!(r.header("x-user-id").as_deref(), Some("alice"));
        assert_eq!(r.header_count("x-user-id"), 1);
        assert_bearer(&r, KEY);
    }

    // Bob's token, claiming to be alice: bob is served from his own budget.
    let bob = b.send(0, &as_user("bob", Some("alice"))).await;
    assert_eq!(bob.status, 200, "{}", bob.text());
    let bobs = reported_tokens(&bob);
    assert_eq!(b.service.wait_for_count("x-user-id_bob_", bobs), bobs);
    assert_eq!(b.service.count("x-user-id_alice_"), spent);

    // No token: refused by jwt_authn, counted nowhere.
    let anonymous = b.send(0, &chat("tokens", Some("bob"))).await;
    assert_eq!(anonymous.status, 401, "{}", anonymous.text());
    assert_eq!(b.service.count("x-user-id_bob_"), bobs);
}
