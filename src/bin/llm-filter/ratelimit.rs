//! Budgets (`rules[].limits`) on Envoy's global rate limiting: `render ratelimit` (the rate
//! limit service's configuration) and the Envoy pieces `render envoy --ratelimit` and `render
//! istio --ratelimit` add (the `envoy.filters.http.ratelimit` filter, the per-route rate limit
//! entries, the local replies). The filter's side, and why the descriptors look as they do, is
//! in `llm_filter::limits`.

use std::path::PathBuf;

use llm_filter::config::FilterConfig;
use llm_filter::limits::{self, Counted, LimitPolicy};
use serde_yaml::{Mapping, Value};

use crate::args::SocketAddr;
use crate::envoy::{backend_authority, map, socket_address, typed};

/// Name of the rate limit service's cluster in a rendered bootstrap.
pub const CLUSTER: &str = "llm-ratelimit";
const FILTER: &str = "envoy.filters.http.ratelimit";
/// How long Envoy waits for the service before the failure mode applies.
const TIMEOUT: &str = "1s";
const FILTER_STATE_INPUT: &str =
    "envoy.extensions.matching.common_inputs.network.v3.FilterStateInput";

/// What Envoy does when the rate limit service (or its Redis) cannot answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Failure {
    /// Let the request through, uncounted (Envoy's default).
    #[default]
    Open,
    /// Refuse it: 503 `rate_limit_service_unavailable`.
    Closed,
}

/// One rule's limits, with where its requests are first sent.
pub struct RuleBudgets {
    /// `LLMRoute ns/name: rules[i].limits`, for messages.
    pub at: String,
    /// The `:authority` of each backendRef (the provider host or its `hostRewrite`) and the
    /// provider host: Envoy's route for a request of the rule is that provider's.
    pub backends: Vec<(String, String)>,
    pub limits: Vec<LimitPolicy>,
}

/// Every rule with limits, in the manifests' order (the configuration is already validated).
pub fn plan(config: &FilterConfig) -> Vec<RuleBudgets> {
    let mut out = Vec::new();
    for route in &config.routes {
        let resource = route.resource_name();
        for (r, rule) in route.spec.rules.iter().enumerate() {
            let field = |rest: &str| format!("rules[{r}].{rest}");
            let Ok(limits) = limits::compile(
                rule,
                route.metadata.namespace(),
                &route.metadata.name,
                &resource,
                &field,
            ) else {
                continue;
            };
            if limits.is_empty() {
                continue;
            }
            let backends = rule.backend_refs.iter().map(backend_authority).collect();
            out.push(RuleBudgets {
                at: format!("{resource}: rules[{r}].limits"),
                backends,
                limits,
            });
        }
    }
    out
}

/// The limits whose requests Envoy routes to provider `host` first (a rule may name it in
/// several backendRefs: each limit once).
pub fn limits_for_provider<'a>(plan: &'a [RuleBudgets], host: &str) -> Vec<&'a LimitPolicy> {
    plan.iter()
        .filter(|rule| rule.backends.iter().any(|(_, h)| h == host))
        .flat_map(|rule| rule.limits.iter())
        .collect()
}

/// The limits whose requests arrive with `:authority` `authority` (Istio's virtual hosts are
/// per authority).
pub fn limits_for_authority<'a>(plan: &'a [RuleBudgets], authority: &str) -> Vec<&'a LimitPolicy> {
    plan.iter()
        .filter(|rule| rule.backends.iter().any(|(a, _)| a == authority))
        .flat_map(|rule| rule.limits.iter())
        .collect()
}

/// Every `:authority` some limited rule sends requests with, sorted.
pub fn authorities(plan: &[RuleBudgets]) -> Vec<String> {
    let mut out: Vec<String> = plan
        .iter()
        .flat_map(|rule| rule.backends.iter().map(|(a, _)| a.clone()))
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Limits need the service: refuse to render them without it, naming the first.
pub fn require_service(plan: &[RuleBudgets], given: bool, flag: &str) -> Result<(), String> {
    match plan.first() {
        Some(rule) if !given => Err(format!(
            "{}: budgets need Envoy's rate limit service: pass {flag} ADDR:PORT (see `llm-filter \
             render ratelimit` and scripts/ratelimit.sh)",
            rule.at
        )),
        _ => Ok(()),
    }
}

/// The HTTP filter, placed after the llm-filter (it reads the filter state the llm-filter
/// sets) and before the router. `cluster`: the service's cluster.
pub fn http_filter(cluster: &str, failure: Failure) -> Value {
    map([
        ("name", FILTER.into()),
        (
            "typed_config",
            typed(
                "envoy.extensions.filters.http.ratelimit.v3.RateLimit",
                [
                    ("domain", limits::DOMAIN.into()),
                    ("timeout", TIMEOUT.into()),
                    ("failure_mode_deny", (failure == Failure::Closed).into()),
                    // x-ratelimit-limit, -remaining, -reset on every answer of a limited route.
                    ("enable_x_ratelimit_headers", "DRAFT_VERSION_03".into()),
                    (
                        "status_on_error",
                        map([("code", "ServiceUnavailable".into())]),
                    ),
                    (
                        "rate_limit_service",
                        map([
                            ("transport_api_version", "V3".into()),
                            (
                                "grpc_service",
                                map([("envoy_grpc", map([("cluster_name", cluster.into())]))]),
                            ),
                        ]),
                    ),
                ],
            ),
        ),
    ])
}

/// The service's cluster for a bootstrap: gRPC (HTTP/2) to `address`, by DNS for a name.
pub fn cluster(address: &SocketAddr) -> Value {
    let is_ip = address.address.parse::<std::net::IpAddr>().is_ok();
    let mut c = Mapping::new();
    c.insert("name".into(), CLUSTER.into());
    c.insert(
        "type".into(),
        if is_ip { "STATIC" } else { "STRICT_DNS" }.into(),
    );
    c.insert("connect_timeout".into(), "1s".into());
    c.insert(
        "typed_extension_protocol_options".into(),
        map([(
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            typed(
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                [(
                    "explicit_http_config",
                    map([("http2_protocol_options", Value::Mapping(Mapping::new()))]),
                )],
            ),
        )]),
    );
    c.insert(
        "load_assignment".into(),
        map([
            ("cluster_name", CLUSTER.into()),
            (
                "endpoints",
                Value::Sequence(vec![map([(
                    "lb_endpoints",
                    Value::Sequence(vec![map([(
                        "endpoint",
                        map([("address", socket_address(address))]),
                    )])]),
                )])]),
            ),
        ]),
    );
    Value::Mapping(c)
}

/// The descriptor of `limit`: its name, then the key header's value from the filter state the
/// llm-filter sets (no filter state: no descriptor; an empty one: the shared budget).
fn actions(limit: &LimitPolicy) -> Value {
    let state = format!("{}{}", limits::ENVOY_STATE_PREFIX, limit.state_key());
    Value::Sequence(vec![
        map([(
            "generic_key",
            map([
                ("descriptor_key", limits::LIMIT_DESCRIPTOR.into()),
                ("descriptor_value", limit.id.as_str().into()),
            ]),
        )]),
        map([(
            "extension",
            map([
                ("name", limit.header.as_deref().unwrap_or("key").into()),
                (
                    "typed_config",
                    typed(FILTER_STATE_INPUT, [("key", state.into())]),
                ),
            ]),
        )]),
    ])
}

/// The rate limit entries of a route: per token limit a check at request time that counts
/// nothing and a debit of the reported tokens when the stream is done; per request limit one
/// count at request time. Only `RateLimitPerRoute.rate_limits` honours `hits_addend` and
/// `apply_on_stream_done` (route-level `rate_limits` ignore them: Envoy issue 45611).
fn rate_limits(limits: &[&LimitPolicy]) -> Vec<Value> {
    let debit = format!(
        "%FILTER_STATE({}{}:PLAIN)%",
        limits::ENVOY_STATE_PREFIX,
        limits::DEBIT_STATE
    );
    let mut out = Vec::new();
    for limit in limits {
        match limit.counted {
            Counted::Tokens => {
                out.push(map([
                    ("actions", actions(limit)),
                    ("hits_addend", map([("number", 0u64.into())])),
                ]));
                out.push(map([
                    ("actions", actions(limit)),
                    ("apply_on_stream_done", true.into()),
                    ("hits_addend", map([("format", debit.as_str().into())])),
                ]));
            }
            Counted::Requests => out.push(map([
                ("actions", actions(limit)),
                ("hits_addend", map([("number", 1u64.into())])),
            ])),
        }
    }
    out
}

/// `typed_per_filter_config` for a route (or virtual host) whose requests spend from `limits`;
/// `None` when there are none.
pub fn per_filter_config(limits: &[&LimitPolicy]) -> Option<Value> {
    if limits.is_empty() {
        return None;
    }
    Some(map([(
        FILTER,
        typed(
            "envoy.extensions.filters.http.ratelimit.v3.RateLimitPerRoute",
            [("rate_limits", Value::Sequence(rate_limits(limits)))],
        ),
    )]))
}

/// The HTTP connection manager's `local_reply_config`: the rate limit filter's own answers in
/// the OpenAI error shape, the 429 with `retry-after` (the seconds until the window ends, from
/// `x-ratelimit-reset`).
pub fn local_reply_config() -> Value {
    let error = |message: &str, kind: &str, code: &str| {
        map([(
            "json_format",
            map([(
                "error",
                map([
                    ("message", message.into()),
                    ("type", kind.into()),
                    ("code", code.into()),
                ]),
            )]),
        )])
    };
    map([(
        "mappers",
        Value::Sequence(vec![
            map([
                (
                    "filter",
                    map([(
                        "response_flag_filter",
                        map([("flags", Value::Sequence(vec!["RL".into()]))]),
                    )]),
                ),
                (
                    "headers_to_add",
                    Value::Sequence(vec![map([
                        (
                            "header",
                            map([
                                ("key", "retry-after".into()),
                                ("value", "%RESP(X-RATELIMIT-RESET)%".into()),
                            ]),
                        ),
                        ("append_action", "OVERWRITE_IF_EXISTS_OR_ADD".into()),
                    ])]),
                ),
                (
                    "body_format_override",
                    error(
                        "Rate limit reached: a budget of this route is spent until its window \
                         ends (see retry-after).",
                        "rate_limit_error",
                        "rate_limit_exceeded",
                    ),
                ),
            ]),
            map([
                (
                    "filter",
                    map([(
                        "response_flag_filter",
                        map([("flags", Value::Sequence(vec!["RLSE".into()]))]),
                    )]),
                ),
                (
                    "body_format_override",
                    error(
                        "The rate limit service cannot be reached, and this gateway refuses \
                         requests it cannot count.",
                        "server_error",
                        "rate_limit_service_unavailable",
                    ),
                ),
            ]),
        ]),
    )])
}

/// `render ratelimit`: the rate limit service's configuration for every limit.
pub fn render(config: &FilterConfig, files: &[PathBuf]) -> Result<String, String> {
    let plan = plan(config);
    let mut descriptors = Vec::new();
    for rule in &plan {
        for limit in &rule.limits {
            let rate_limit = map([
                ("unit", limit.per.name().into()),
                ("requests_per_unit", u64::from(limit.amount).into()),
            ]);
            let mut entry = Mapping::new();
            entry.insert("key".into(), limits::LIMIT_DESCRIPTOR.into());
            entry.insert("value".into(), limit.id.as_str().into());
            // Without a key, or for requests without the key header: one budget for all.
            entry.insert("rate_limit".into(), rate_limit.clone());
            if let Some(header) = &limit.header {
                entry.insert(
                    "descriptors".into(),
                    Value::Sequence(vec![map([
                        ("key", header.as_str().into()),
                        ("rate_limit", rate_limit),
                    ])]),
                );
            }
            descriptors.push(Value::Mapping(entry));
        }
    }
    let doc = map([
        ("domain", limits::DOMAIN.into()),
        ("descriptors", Value::Sequence(descriptors)),
    ]);
    let yaml = serde_yaml::to_string(&doc)
        .map_err(|e| format!("render ratelimit: cannot write YAML: {e}"))?;
    let files: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
    let mut out = format!(
        "# Generated by `llm-filter render ratelimit` from {}.\n\
         # The configuration of Envoy's rate limit service (github.com/envoyproxy/ratelimit) for\n\
         # the budgets (`limits`) of the LLMRoute rules: one descriptor per limit, named\n\
         # <namespace>/<route>/<rule>/<limit>; under it, one budget per value of the key header,\n\
         # and the limit's own budget for requests without one. Token limits count the tokens the\n\
         # providers report; a request is refused once its budget's count is over the limit.\n",
        files.join(", ")
    );
    for rule in &plan {
        for limit in &rule.limits {
            let what = match limit.counted {
                Counted::Tokens => "tokens",
                Counted::Requests => "requests",
            };
            let key = match &limit.header {
                Some(h) => format!("per value of {h}"),
                None => "for the whole rule".to_string(),
            };
            out.push_str(&format!(
                "#   {}: {} {what} per {}, {key}\n",
                limit.id,
                limit.amount,
                limit.per.name()
            ));
        }
    }
    out.push_str(&yaml);
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use llm_filter::policy::Policy;

    /// The two providers of `render envoy`'s fallback tests, and a route whose first rule has
    /// a token budget per user and a request budget, its backend rewritten to qwen.internal.
    pub(crate) fn budgets() -> String {
        let fallback = crate::envoy::tests::FALLBACK;
        let route = "kind: LLMRoute\n";
        let providers = &fallback[..fallback.find(route).map_or(0, |i| i + route.len())];
        format!(
            "{providers}metadata: {{name: chat, namespace: team}}
spec:
  host: test.com
  rules:
  - name: migrate-rule
    matches: [{{headers: {{x-plan: {{exact: free}}}}}}]
    limits:
    - {{name: per-user, tokens: 1000, per: minute, key: {{header: X-User-Id}}}}
    - {{name: all, requests: 100, per: hour}}
    backendRefs: [{{providerHost: dashscope.aliyuncs.com, hostRewrite: qwen.internal}}]
  - backendRefs: [{{providerHost: api.moonshot.cn}}]
"
        )
    }

    fn config(text: &str) -> FilterConfig {
        let config = FilterConfig::parse(text).unwrap();
        Policy::compile(&config).unwrap();
        config
    }

    #[test]
    fn the_service_gets_one_descriptor_per_limit_with_a_budget_per_key() {
        let out = render(&config(&budgets()), &[PathBuf::from("b.yaml")]).unwrap();
        assert!(out.starts_with("# Generated by `llm-filter render ratelimit` from b.yaml."));
        assert!(out.contains("#   team/chat/migrate-rule/per-user: 1000 tokens per minute, per value of x-user-id\n"), "{out}");
        let doc: Value = serde_yaml::from_str(&out).unwrap();
        let want: Value = serde_yaml::from_str(
            "domain: llm-filter
descriptors:
- key: llm_limit
  value: team/chat/migrate-rule/per-user
  rate_limit: {unit: minute, requests_per_unit: 1000}
  descriptors:
  - key: x-user-id
    rate_limit: {unit: minute, requests_per_unit: 1000}
- key: llm_limit
  value: team/chat/migrate-rule/all
  rate_limit: {unit: hour, requests_per_unit: 100}
",
        )
        .unwrap();
        assert_eq!(doc, want);
        let none = render(&config(&budgets().replace("    limits:\n    - {name: per-user, tokens: 1000, per: minute, key: {header: X-User-Id}}\n    - {name: all, requests: 100, per: hour}\n", "")), &[]).unwrap();
        let doc: Value = serde_yaml::from_str(&none).unwrap();
        assert_eq!(doc["descriptors"], Value::Sequence(vec![]));
    }

    #[test]
    fn routes_get_a_check_and_a_debit_per_token_limit_and_a_count_per_request_limit() {
        let plan = plan(&config(&budgets()));
        assert!(limits_for_provider(&plan, "api.moonshot.cn").is_empty());
        assert_eq!(authorities(&plan), ["qwen.internal"]);
        let limits = limits_for_provider(&plan, "dashscope.aliyuncs.com");
        assert_eq!(limits_for_authority(&plan, "qwen.internal"), limits);
        let per_route = per_filter_config(&limits).unwrap();
        let entries = per_route[FILTER]["rate_limits"].as_sequence().unwrap();
        assert_eq!(entries.len(), 3);
        let (check, debit, count) = (&entries[0], &entries[1], &entries[2]);
        assert_eq!(check["hits_addend"]["number"], 0);
        assert!(check.get("apply_on_stream_done").is_none());
        assert_eq!(debit["apply_on_stream_done"], true);
        assert_eq!(
            debit["hits_addend"]["format"],
            "%FILTER_STATE(wasm.llm.debit:PLAIN)%"
        );
        assert_eq!(check["actions"], debit["actions"]);
        assert_eq!(count["hits_addend"]["number"], 1);
        let actions = check["actions"].as_sequence().unwrap();
        assert_eq!(actions[0]["generic_key"]["descriptor_key"], "llm_limit");
        assert_eq!(
            actions[0]["generic_key"]["descriptor_value"],
            "team/chat/migrate-rule/per-user"
        );
        assert_eq!(actions[1]["extension"]["name"], "x-user-id");
        assert_eq!(
            actions[1]["extension"]["typed_config"]["key"],
            "wasm.llm.limit.team/chat/migrate-rule/per-user"
        );
        assert!(per_filter_config(&[]).is_none());
        let error = require_service(&plan, false, "--ratelimit").unwrap_err();
        assert!(
            error.starts_with("LLMRoute team/chat: rules[0].limits: budgets need Envoy's rate limit service: pass --ratelimit ADDR:PORT"),
            "{error}"
        );
        require_service(&plan, true, "--ratelimit").unwrap();
        require_service(&[], false, "--ratelimit").unwrap();
    }

    #[test]
    fn the_filter_refuses_or_fails_open_and_answers_in_the_openai_shape() {
        let open = http_filter(CLUSTER, Failure::Open);
        let config = &open["typed_config"];
        assert_eq!(config["domain"], "llm-filter");
        assert_eq!(config["failure_mode_deny"], false);
        assert_eq!(
            config["rate_limit_service"]["grpc_service"]["envoy_grpc"]["cluster_name"],
            CLUSTER
        );
        assert_eq!(
            http_filter(CLUSTER, Failure::Closed)["typed_config"]["failure_mode_deny"],
            true
        );
        let replies = local_reply_config();
        let rl = &replies["mappers"][0];
        assert_eq!(
            rl["body_format_override"]["json_format"]["error"]["code"],
            "rate_limit_exceeded"
        );
        assert_eq!(rl["headers_to_add"][0]["header"]["key"], "retry-after");
        assert_eq!(
            cluster(&SocketAddr::new("127.0.0.1", 8081))["type"],
            "STATIC"
        );
        assert_eq!(
            cluster(&SocketAddr::new("ratelimit.svc", 8081))["type"],
            "STRICT_DNS"
        );
    }
}
