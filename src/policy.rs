//! The validated, precompiled form of the configuration, and the routing decision it makes for a
//! request: which rule, which provider, and with which settings. Built once in `on_configure`
//! and shared by every request; nothing here allocates per request except the decision's `Arc`.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::sync::Arc;

use crate::balancer::{RandomSource, WeightedChoice};
use crate::config::{
    check_api_key_source, fallback_key, FallbackConfig, FilterConfig, OpenAIConfig,
    ProviderManifest, RouteManifest, RuleConfig,
};
use crate::error::{ConfigError, ConfigErrors, RequestError};
use crate::limits::{self, RuleLimits};
use crate::matcher::{HeaderConditions, StringMatch};
use crate::models::{model_list_json, ModelMapping};

/// Everything needed to turn a client's request into one provider's call. The rewrite
/// (`rewrite.rs`) is a pure function of the request and this value, so the same value can later
/// drive a per-attempt rewrite in an upstream filter.
#[derive(Clone, PartialEq)]
pub struct ProviderCall {
    /// `metadata.name` of the LLMProvider.
    pub provider: String,
    /// Name of the LLMRoute rule that chose it; empty for a direct provider call.
    pub rule: String,
    /// `:authority` sent upstream (`hostRewrite`, or the provider host).
    pub authority: String,
    /// The provider's chat-completions path.
    pub path: String,
    /// The configured model, already encoded as a JSON string literal.
    pub model_json: Option<String>,
    pub stream: Option<bool>,
    /// `Bearer <apiKey>`: the value of the `authorization` header.
    pub authorization: Option<String>,
    /// `modelMapping`: the client's model → this provider's.
    pub model_mapping: ModelMapping,
    /// The rule has `fallback`: `<fallback_key> <provider host>`. The request carries the key
    /// so Envoy sends it to the rule's aggregate cluster; the upstream filter finds the rule's
    /// calls by it and knows, by the host, which attempt needs no rewrite (the first).
    pub fallback: Option<String>,
    /// The rule's `limits`: the filter state that puts each request into its budgets.
    pub limits: Option<Arc<RuleLimits>>,
}

impl ProviderCall {
    /// With fallback: the rule's key, and the provider host this call goes to.
    pub fn fallback_parts(&self) -> Option<(&str, &str)> {
        self.fallback.as_deref().map(split_fallback)
    }

    pub fn model(&self) -> Option<String> {
        self.model_json
            .as_deref()
            .and_then(|json| serde_json::from_str(json).ok())
    }
}

/// `<key> <host>` → (key, host); a value without a space is all key.
pub fn split_fallback(value: &str) -> (&str, &str) {
    value.split_once(' ').unwrap_or((value, ""))
}

/// Keys never reach a log line, not even through `{:?}`.
impl fmt::Debug for ProviderCall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProviderCall")
            .field("provider", &self.provider)
            .field("rule", &self.rule)
            .field("authority", &self.authority)
            .field("path", &self.path)
            .field("model", &self.model_json)
            .field("stream", &self.stream)
            .field(
                "authorization",
                &self.authorization.as_ref().map(|_| "<redacted>"),
            )
            .field("model_mapping", &self.model_mapping)
            .field("fallback", &self.fallback)
            .field("limits", &self.limits)
            .finish()
    }
}

#[derive(Debug)]
struct RulePolicy {
    /// Entries are ORed; an empty list matches every request.
    matches: Vec<HeaderConditions>,
    backends: Vec<Arc<ProviderCall>>,
    choice: WeightedChoice,
    /// Some entry has a `model` condition: the rule can only be tried with the body's model.
    needs_model: bool,
}

impl RulePolicy {
    fn matches(&self, headers: &[(String, Vec<u8>)], model: Option<&[u8]>) -> bool {
        self.matches.is_empty() || self.matches.iter().any(|m| m.matches(headers, model))
    }

    /// Whether a request with these headers can reach this rule (`Some`), and if so whether
    /// every such request does, whatever its model (`Some(true)`: later rules are out of reach).
    fn reach(&self, headers: &[(String, Vec<u8>)]) -> Option<bool> {
        if self.matches.is_empty() {
            return Some(true);
        }
        let mut reached = None;
        for entry in self.matches.iter().filter(|m| m.matches_headers(headers)) {
            if entry.model.is_none() {
                return Some(true);
            }
            reached = Some(false);
        }
        reached
    }
}

#[derive(Debug)]
enum HostTarget {
    Route(Vec<RulePolicy>),
    Provider(Arc<ProviderCall>),
}

impl HostTarget {
    /// The calls a request with these headers can reach: a route's rules in order, up to the
    /// first one every such request matches.
    fn reachable_calls(&self, headers: &[(String, Vec<u8>)]) -> Vec<&Arc<ProviderCall>> {
        let rules = match self {
            HostTarget::Route(rules) => rules,
            HostTarget::Provider(call) => return vec![call],
        };
        let mut calls = Vec::new();
        for rule in rules {
            let Some(every) = rule.reach(headers) else {
                continue;
            };
            calls.extend(rule.backends.iter());
            if every {
                break;
            }
        }
        calls
    }

    /// `GET /v1/models` for this host, as the asking client sees it: the configured model and
    /// mapping names of each call its headers can reach (a rule for subscribers lists its
    /// models to subscribers only).
    fn model_list(&self, headers: &[(String, Vec<u8>)]) -> Arc<str> {
        let entries: Vec<(String, &str)> = self
            .reachable_calls(headers)
            .into_iter()
            .flat_map(|call| {
                call.model_mapping
                    .exact_names()
                    .map(str::to_string)
                    .chain(call.model())
                    .map(|model| (model, call.provider.as_str()))
                    .collect::<Vec<_>>()
            })
            .collect();
        Arc::from(model_list_json(
            entries
                .iter()
                .map(|(model, owner)| (model.as_str(), *owner)),
        ))
    }
}

/// How the filter treats a request's `:authority`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostClass {
    /// Not an LLM host: the request passes through untouched.
    Other,
    /// An LLM host, written as `host` or `host:port` (any case): the request is the filter's.
    Served,
    /// An LLM host in any other form (see `RequestError::InvalidHost`): refused.
    Refused,
}

/// What to do with a request.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// The host is not an LLM host: leave the request alone.
    PassThrough,
    /// Answer the client with this error.
    Reject(RequestError),
    /// Rewrite the request for this provider.
    Forward(Arc<ProviderCall>),
    /// A rule that matches on the body's `model` must be tried: decide again with the model
    /// (`Policy::decide_with_model`) once the body is read.
    NeedsModel,
    /// `GET /v1/models`: answer with this list (OpenAI's format).
    Models(Arc<str>),
}

/// The calls of a rule with fallback, by provider host: its backendRefs', then its fallback
/// providers' in order.
#[derive(Debug)]
struct Attempts {
    /// How many of `calls` are backendRefs.
    backends: usize,
    calls: Vec<(String, Arc<ProviderCall>)>,
}

/// The compiled configuration.
#[derive(Debug)]
pub struct Policy {
    hosts: HashMap<String, Arc<HostTarget>>,
    /// `settings.directProviderCalls`: a provider's own host is served.
    direct_provider_calls: bool,
    /// `settings.hostWithPort`: `host:port` is a served form.
    host_with_port: bool,
    pub max_request_body_bytes: u64,
    pub request_stream_usage: bool,
    /// `settings.forwardAfterBody`: hold the headers until the body is checked.
    pub forward_after_body: bool,
    /// `settings.holdTimeoutMs`.
    pub hold_timeout_ms: u64,
    /// Rules with `fallback`, by `fallback_key`: each provider an attempt may go to (by its
    /// normalized host), in the order Envoy tries them, with that provider's call.
    fallbacks: HashMap<String, Attempts>,
}

impl Policy {
    /// Parses and compiles a plugin configuration, taking `apiKeyFromEnv` keys from this
    /// process's environment (inside Envoy: the Wasm VM's, through WASI).
    pub fn from_text(text: &str) -> Result<Policy, ConfigErrors> {
        Policy::from_text_with_env(text, |name| std::env::var(name).ok())
    }

    /// `from_text` with the environment given.
    pub fn from_text_with_env(
        text: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Policy, ConfigErrors> {
        let mut config = FilterConfig::parse(text)?;
        config.resolve_env_api_keys(env)?;
        Policy::compile(&config)
    }

    /// Validates and compiles a configuration, reporting every resource that is wrong (the
    /// first problem of each), not just the first one.
    pub fn compile(config: &FilterConfig) -> Result<Policy, ConfigErrors> {
        let mut errors = Vec::new();
        if config.settings.max_request_body_bytes == 0 {
            errors.push(ConfigError::new(
                "settings",
                "maxRequestBodyBytes",
                "must be greater than zero",
            ));
        }
        check_unique_names(config, &mut errors);
        let providers = index_providers(&config.providers, &mut errors);
        let mut hosts: HashMap<String, Arc<HostTarget>> = HashMap::new();
        let mut route_owner: HashMap<String, String> = HashMap::new();
        let mut fallbacks = HashMap::new();

        for route in &config.routes {
            let resource = route.resource_name();
            let compiled = normalize_config_host(&route.spec.host)
                .map_err(|m| ConfigError::new(&resource, "host", m))
                .and_then(|host| {
                    let rules = compile_rules(route, &resource, &providers, &mut fallbacks)?;
                    Ok((host, rules))
                });
            let (host, rules) = match compiled {
                Ok(compiled) => compiled,
                Err(e) => {
                    errors.push(e);
                    continue;
                }
            };
            let target = Arc::new(HostTarget::Route(rules));
            for alias in host_aliases(&host, route.metadata.namespace()) {
                if let Some(other) = route_owner.get(&alias) {
                    errors.push(ConfigError::new(
                        &resource,
                        "host",
                        format!("{alias:?} is already the host of {other}"),
                    ));
                    break;
                }
                route_owner.insert(alias.clone(), resource.clone());
                hosts.insert(alias, Arc::clone(&target));
            }
        }

        for (host, provider) in &providers.by_host {
            if let Err(e) = check_route_specific_keys(provider, host, &config.routes) {
                errors.push(e);
            }
            if !hosts.contains_key(host) {
                let call = provider_call(provider, "", host, None, None);
                hosts.insert(host.clone(), Arc::new(HostTarget::Provider(call)));
            }
        }

        if !errors.is_empty() {
            return Err(ConfigErrors(errors));
        }
        Ok(Policy {
            hosts,
            direct_provider_calls: config.settings.direct_provider_calls,
            host_with_port: config.settings.host_with_port,
            max_request_body_bytes: config.settings.max_request_body_bytes,
            request_stream_usage: config.settings.request_stream_usage,
            forward_after_body: config.settings.forward_after_body,
            hold_timeout_ms: config.settings.hold_timeout_ms,
            fallbacks,
        })
    }

    /// True when some rule matches on the body's `model` (it needs `forwardAfterBody`).
    pub fn routes_by_model(&self) -> bool {
        self.hosts.values().any(|target| match target.as_ref() {
            HostTarget::Route(rules) => rules.iter().any(|r| r.needs_model),
            HostTarget::Provider(_) => false,
        })
    }

    /// True when some rule has `fallback` (the upstream filter has work to do).
    pub fn has_fallbacks(&self) -> bool {
        !self.fallbacks.is_empty()
    }

    /// The call an attempt makes: for the request marked `key` (its `fallback_key`), to the
    /// provider whose host is `provider_host` (from the attempt's endpoint metadata). `None`
    /// when the key or the provider is not the rule's.
    pub fn attempt_call(&self, key: &[u8], provider_host: &[u8]) -> Option<&Arc<ProviderCall>> {
        let key = std::str::from_utf8(key).ok()?;
        let host = normalize_authority(provider_host)?;
        self.fallbacks
            .get(key)?
            .calls
            .iter()
            .find(|(h, _)| *h == host)
            .map(|(_, call)| call)
    }

    /// The call of attempt `n` (from 1) of a request marked `key` and first sent to `first`,
    /// in the order Envoy tries them (see `attempt_order`).
    pub fn attempt_at<'a>(
        &'a self,
        key: &[u8],
        first: &'a Arc<ProviderCall>,
        n: usize,
    ) -> Option<&'a Arc<ProviderCall>> {
        if n <= 1 {
            return (n == 1).then_some(first);
        }
        let attempts = self.fallbacks.get(std::str::from_utf8(key).ok()?)?;
        attempts.calls[attempts.backends..]
            .get(n - 2)
            .map(|(_, call)| call)
    }

    /// The providers a request marked `key` and first sent to `first` may go to, in the order
    /// Envoy tries them: `first` (the chosen backend), then the rule's fallback providers.
    pub fn attempt_order<'a>(&'a self, key: &[u8], first: &'a ProviderCall) -> Vec<&'a str> {
        let mut order = vec![first.provider.as_str()];
        if let Some(attempts) = std::str::from_utf8(key)
            .ok()
            .and_then(|key| self.fallbacks.get(key))
        {
            order.extend(
                attempts.calls[attempts.backends..]
                    .iter()
                    .map(|(_, c)| c.provider.as_str()),
            );
        }
        order
    }

    /// True when requests for this `:authority` are the filter's: served, or refused because
    /// they name an LLM host in a form it does not serve.
    pub fn is_llm_host(&self, authority: &[u8]) -> bool {
        self.classify(authority) != HostClass::Other
    }

    /// Whether an `:authority` names an LLM host, and in which form. Served is exactly
    /// `host` or `host:port` (ASCII case ignored; the port 1 to 5 digits, at most 65535; only
    /// `host` with `settings.hostWithPort: false`): the forms that an authorization rule written
    /// for the host matches (the shipped RBAC and JWT examples match `h` and the prefix `h:`;
    /// Istio translates an AuthorizationPolicy's `hosts: [h]` into exactly `h`, case ignored).
    /// Anything else that still names an LLM host, once user info, ports, trailing dots, spaces
    /// and list commas are looked through, is refused: Envoy or a policy might read it
    /// differently.
    pub fn classify(&self, authority: &[u8]) -> HostClass {
        if self.target(authority).is_some() {
            return HostClass::Served;
        }
        let names_llm_host = authority.split(|&b| b == b',').any(|part| {
            let part = part.trim_ascii();
            let part = match part.iter().rposition(|&b| b == b'@') {
                Some(at) => &part[at + 1..],
                None => part,
            };
            let host = match part.iter().position(|&b| b == b':') {
                Some(colon) => &part[..colon],
                None => part,
            };
            let mut host = host.trim_ascii();
            while let Some(rest) = host.strip_suffix(b".") {
                host = rest;
            }
            self.lookup(host).is_some()
        });
        if names_llm_host {
            HostClass::Refused
        } else {
            HostClass::Other
        }
    }

    fn target(&self, authority: &[u8]) -> Option<&HostTarget> {
        self.lookup(served_host(authority, self.host_with_port)?)
    }

    fn lookup(&self, host: &[u8]) -> Option<&HostTarget> {
        if host.is_empty() {
            return None;
        }
        let host = std::str::from_utf8(host).ok()?;
        let target = if host.bytes().any(|b| b.is_ascii_uppercase()) {
            self.hosts.get(&host.to_ascii_lowercase())
        } else {
            self.hosts.get(host)
        };
        target.map(|t| t.as_ref())
    }

    /// Chooses rule and provider for a request, given all its headers (`:authority` among
    /// them). Pure: the only outside input is the random source. `NeedsModel` when a rule that
    /// matches on the body's model comes before any rule the headers alone decide.
    pub fn decide(&self, headers: &[(String, Vec<u8>)], rng: &mut impl RandomSource) -> Decision {
        self.route(headers, None, rng)
    }

    /// `decide` once the body is read: `model` is its `model` (`None` if it names none).
    pub fn decide_with_model(
        &self,
        headers: &[(String, Vec<u8>)],
        model: Option<&[u8]>,
        rng: &mut impl RandomSource,
    ) -> Decision {
        self.route(headers, Some(model), rng)
    }

    /// `model`: `None` while the body is unread.
    fn route(
        &self,
        headers: &[(String, Vec<u8>)],
        model: Option<Option<&[u8]>>,
        rng: &mut impl RandomSource,
    ) -> Decision {
        let Some(authority) = header(headers, ":authority") else {
            return Decision::PassThrough;
        };
        let Some(target) = self.target(authority) else {
            return match self.classify(authority) {
                HostClass::Other | HostClass::Served => Decision::PassThrough,
                HostClass::Refused => Decision::Reject(RequestError::InvalidHost),
            };
        };
        if !self.direct_provider_calls && matches!(target, HostTarget::Provider(_)) {
            return Decision::Reject(RequestError::ProviderHostNotServed);
        }
        match header(headers, ":method") {
            Some(b"POST") => {}
            Some(b"GET" | b"HEAD") if is_models_path(headers) => {
                return Decision::Models(target.model_list(headers));
            }
            _ => return Decision::Reject(RequestError::MethodNotAllowed),
        }
        let rules = match target {
            HostTarget::Provider(call) => return Decision::Forward(Arc::clone(call)),
            HostTarget::Route(rules) => rules,
        };
        for rule in rules {
            let matched = match (rule.needs_model, model) {
                (true, None) => return Decision::NeedsModel,
                (_, Some(model)) => rule.matches(headers, model),
                (false, None) => rule.matches(headers, None),
            };
            if matched {
                let index = rule.choice.choose(rng);
                return match rule.backends.get(index) {
                    Some(call) => Decision::Forward(Arc::clone(call)),
                    None => Decision::Reject(RequestError::RouteNotFound),
                };
            }
        }
        Decision::Reject(RequestError::RouteNotFound)
    }
}

/// The model list's path: `/v1/models` (or `/models`), query ignored.
fn is_models_path(headers: &[(String, Vec<u8>)]) -> bool {
    let path = header(headers, ":path").unwrap_or_default();
    let path = path.split(|&b| b == b'?').next().unwrap_or_default();
    path == b"/v1/models" || path == b"/models"
}

/// First value of a header.
pub fn header<'a>(headers: &'a [(String, Vec<u8>)], name: &str) -> Option<&'a [u8]> {
    headers
        .iter()
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.as_slice())
}

/// The host of an `:authority` in a served form: `host`, or (`with_port`) `host:port` with the
/// port 1 to 5 ASCII digits and at most 65535; no trailing dot. Case is left to the lookup.
fn served_host(authority: &[u8], with_port: bool) -> Option<&[u8]> {
    let (host, port) = match authority.iter().position(|&b| b == b':') {
        Some(colon) => (&authority[..colon], Some(&authority[colon + 1..])),
        None => (authority, None),
    };
    if let Some(port) = port {
        if !with_port {
            return None;
        }
        if !(1..=5).contains(&port.len()) || !port.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let value = port.iter().fold(0u32, |n, &d| n * 10 + u32::from(d - b'0'));
        if value > 65535 {
            return None;
        }
    }
    if host.is_empty() || host.ends_with(b".") {
        return None;
    }
    Some(host)
}

/// The host part of an `:authority`, lower-cased, without port or trailing dot. Borrowed when
/// already in that form (the common case), so a lookup does not allocate.
pub fn normalize_authority(authority: &[u8]) -> Option<std::borrow::Cow<'_, str>> {
    let text = std::str::from_utf8(authority).ok()?;
    let host = if let Some(rest) = text.strip_prefix('[') {
        // IPv6 literal: "[::1]:80".
        let end = rest.find(']')?;
        &text[..end + 2]
    } else {
        match text.rfind(':') {
            Some(i) if text[i + 1..].bytes().all(|b| b.is_ascii_digit()) => &text[..i],
            _ => text,
        }
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.is_empty() {
        return None;
    }
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Some(std::borrow::Cow::Owned(host.to_ascii_lowercase()))
    } else {
        Some(std::borrow::Cow::Borrowed(host))
    }
}

/// Validates and normalizes a host name written in a manifest.
fn normalize_config_host(host: &str) -> Result<String, String> {
    let trimmed = host.trim().trim_end_matches('.');
    if trimmed.is_empty() {
        return Err("must not be empty".to_string());
    }
    let valid = trimmed
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_');
    if !valid {
        return Err(format!(
            "{host:?} is not a host name (no scheme, port, path or wildcard)"
        ));
    }
    Ok(trimmed.to_ascii_lowercase())
}

/// A short mesh name (`svc`) is also reachable as `svc.ns` and `svc.ns.svc.cluster.local`.
fn host_aliases(host: &str, namespace: &str) -> Vec<String> {
    if host.contains('.') {
        vec![host.to_string()]
    } else {
        let namespace = namespace.to_ascii_lowercase();
        vec![
            host.to_string(),
            format!("{host}.{namespace}"),
            format!("{host}.{namespace}.svc.cluster.local"),
        ]
    }
}

fn check_unique_names(config: &FilterConfig, errors: &mut Vec<ConfigError>) {
    let mut seen = BTreeSet::new();
    let names = config
        .providers
        .iter()
        .map(|p| (p.resource_name(), p.metadata.name.is_empty()))
        .chain(
            config
                .routes
                .iter()
                .map(|r| (r.resource_name(), r.metadata.name.is_empty())),
        );
    for (name, unnamed) in names {
        if unnamed {
            errors.push(ConfigError::new(name, "metadata.name", "must not be empty"));
        } else if !seen.insert(name.clone()) {
            errors.push(ConfigError::new(name, "", "defined more than once"));
        }
    }
}

struct Providers<'a> {
    by_host: Vec<(String, &'a ProviderManifest)>,
}

impl Providers<'_> {
    fn get(&self, host: &str) -> Option<&ProviderManifest> {
        self.by_host
            .iter()
            .find(|(h, _)| h == host)
            .map(|(_, p)| *p)
    }
}

/// Indexes providers by host. A provider whose host is valid and unique is indexed even when
/// other fields are wrong, so routes naming it do not report a second, misleading error.
fn index_providers<'a>(
    providers: &'a [ProviderManifest],
    errors: &mut Vec<ConfigError>,
) -> Providers<'a> {
    let mut by_host: Vec<(String, &ProviderManifest)> = Vec::with_capacity(providers.len());
    for provider in providers {
        let resource = provider.resource_name();
        let host = match normalize_config_host(&provider.spec.host) {
            Ok(host) => host,
            Err(m) => {
                errors.push(ConfigError::new(&resource, "host", m));
                continue;
            }
        };
        if let Some((_, other)) = by_host.iter().find(|(h, _)| *h == host) {
            errors.push(ConfigError::new(
                &resource,
                "host",
                format!(
                    "{host:?} is already the host of {}; two providers may not share a host",
                    other.resource_name()
                ),
            ));
            continue;
        }
        if let Err(e) = check_provider(provider, &resource) {
            errors.push(e);
        }
        by_host.push((host, provider));
    }
    Providers { by_host }
}

/// Path and `openAIConfig` checks of one provider.
fn check_provider(provider: &ProviderManifest, resource: &str) -> Result<(), ConfigError> {
    if !provider.spec.path.starts_with('/') || provider.spec.path.contains(['?', '#']) {
        return Err(ConfigError::new(
            resource,
            "path",
            format!(
                "{:?} must be an absolute path without query, e.g. /v1/chat/completions",
                provider.spec.path
            ),
        ));
    }
    let configs = &provider.spec.configs;
    let openai_configs = configs
        .default_config
        .iter()
        .map(|c| ("configs.defaultConfig.openAIConfig".to_string(), c))
        .chain(configs.route_specific_configs.iter().map(|(name, c)| {
            (
                format!("configs.routeSpecificConfigs.{name}.openAIConfig"),
                c,
            )
        }));
    let key_file = FilterConfig::api_key_file(provider);
    for (field, config) in openai_configs {
        let openai = config.openai_config.as_ref();
        if let Some(openai) = openai {
            check_openai_config(resource, &field, openai)?;
        }
        // Envoy injects a key file per cluster: one file for the whole provider.
        if key_file.is_some() && openai.and_then(|o| o.api_key_file.as_deref()) != key_file {
            return Err(ConfigError::new(
                resource,
                format!("{field}.apiKeyFile"),
                format!(
                    "must be {:?} as in the provider's other configs: Envoy injects the key \
                     file per provider cluster",
                    key_file.unwrap_or_default()
                ),
            ));
        }
    }
    Ok(())
}

fn compile_rules(
    route: &RouteManifest,
    resource: &str,
    providers: &Providers<'_>,
    fallbacks: &mut HashMap<String, Attempts>,
) -> Result<Vec<RulePolicy>, ConfigError> {
    if route.spec.rules.is_empty() {
        return Err(ConfigError::new(
            resource,
            "rules",
            "needs at least one rule",
        ));
    }
    let mut names = BTreeSet::new();
    route
        .spec
        .rules
        .iter()
        .enumerate()
        .map(|(i, rule)| {
            if let Some(name) = rule.name.as_deref() {
                if !names.insert(name) {
                    return Err(ConfigError::new(
                        resource,
                        format!("rules[{i}].name"),
                        format!("{name:?} names another rule of this route too"),
                    ));
                }
            }
            let key = fallback_key(route.metadata.namespace(), &route.metadata.name, i);
            compile_rule(rule, i, route, resource, providers, &key, fallbacks)
        })
        .collect()
}

fn compile_rule(
    rule: &RuleConfig,
    index: usize,
    route: &RouteManifest,
    resource: &str,
    providers: &Providers<'_>,
    key: &str,
    fallbacks: &mut HashMap<String, Attempts>,
) -> Result<RulePolicy, ConfigError> {
    let field = |rest: &str| format!("rules[{index}].{rest}");
    let mut matches = Vec::with_capacity(rule.matches.len());
    for (m, entry) in rule.matches.iter().enumerate() {
        let mut conditions = Vec::with_capacity(entry.headers.len());
        for (name, config) in &entry.headers {
            let string_match = StringMatch::compile(config).map_err(|(sub, message)| {
                let path = if sub.is_empty() {
                    field(&format!("matches[{m}].headers.{name}"))
                } else {
                    field(&format!("matches[{m}].headers.{name}.{sub}"))
                };
                ConfigError::new(resource, path, message)
            })?;
            conditions.push((name.to_ascii_lowercase(), string_match));
        }
        let model = entry
            .model
            .as_ref()
            .map(|config| {
                StringMatch::compile(config).map_err(|(sub, message)| {
                    let path = if sub.is_empty() {
                        field(&format!("matches[{m}].model"))
                    } else {
                        field(&format!("matches[{m}].model.{sub}"))
                    };
                    ConfigError::new(resource, path, message)
                })
            })
            .transpose()?;
        matches.push(HeaderConditions { conditions, model });
    }
    let needs_model = matches.iter().any(|m| m.model.is_some());

    if rule.backend_refs.is_empty() {
        return Err(ConfigError::new(
            resource,
            field("backendRefs"),
            "needs at least one backendRef",
        ));
    }
    let weighted = rule
        .backend_refs
        .iter()
        .filter(|b| b.weight.is_some())
        .count();
    if weighted != 0 && weighted != rule.backend_refs.len() {
        return Err(ConfigError::new(
            resource,
            field("backendRefs"),
            "weight is set on some backendRefs but not on others; set it on all or on none",
        ));
    }
    let rule_name = rule.name.as_deref().unwrap_or("");
    let limits = limits::compile(
        rule,
        route.metadata.namespace(),
        &route.metadata.name,
        resource,
        &field,
    )?;
    let limits = limits::rule_limits(&limits).map(Arc::new);
    let fallback_key = rule.fallback.as_ref().map(|_| key);
    let mut backends = Vec::with_capacity(rule.backend_refs.len());
    let mut backend_hosts = Vec::with_capacity(rule.backend_refs.len());
    let mut weights = Vec::with_capacity(rule.backend_refs.len());
    for (b, backend) in rule.backend_refs.iter().enumerate() {
        let at = |leaf: &str| field(&format!("backendRefs[{b}].{leaf}"));
        let host = normalize_config_host(&backend.provider_host)
            .map_err(|m| ConfigError::new(resource, at("providerHost"), m))?;
        let provider = providers.get(&host).ok_or_else(|| {
            ConfigError::new(
                resource,
                at("providerHost"),
                format!("no LLMProvider has host {host:?}"),
            )
        })?;
        let weight = match backend.weight {
            None => 1,
            Some(w) => u64::try_from(w).map_err(|_| {
                ConfigError::new(resource, at("weight"), format!("{w} is negative"))
            })?,
        };
        let authority = match &backend.host_rewrite {
            None => host.clone(),
            Some(rewrite) => normalize_config_host(rewrite)
                .map_err(|m| ConfigError::new(resource, at("hostRewrite"), m))?,
        };
        let marker = fallback_key.map(|key| format!("{key} {host}"));
        backends.push(provider_call(
            provider,
            rule_name,
            &authority,
            marker.as_deref(),
            limits.as_ref(),
        ));
        weights.push(weight);
        backend_hosts.push(host);
    }
    if let Some(fallback) = &rule.fallback {
        let mut attempts: Vec<(String, Arc<ProviderCall>)> = backend_hosts
            .iter()
            .cloned()
            .zip(backends.iter().cloned())
            .collect();
        compile_fallback(
            fallback,
            &field,
            resource,
            providers,
            rule_name,
            key,
            limits.as_ref(),
        )?
        .into_iter()
        .for_each(|attempt| attempts.push(attempt));
        for (b, host) in backend_hosts.iter().enumerate() {
            if backend_hosts[..b].contains(host) {
                return Err(ConfigError::new(
                    resource,
                    field(&format!("backendRefs[{b}].providerHost")),
                    format!(
                        "{host:?} is already a backendRef of this rule; with fallback each \
                         provider is tried at most once"
                    ),
                ));
            }
        }
        if let Some(at) = attempts
            .iter()
            .skip(backend_hosts.len())
            .position(|(h, _)| backend_hosts.contains(h))
        {
            return Err(ConfigError::new(
                resource,
                field(&format!("fallback.providers[{at}]")),
                format!(
                    "{:?} is a backendRef of this rule: the chosen backend is never tried again",
                    attempts[backend_hosts.len() + at].0
                ),
            ));
        }
        let backends = backend_hosts.len();
        fallbacks.insert(
            key.to_string(),
            Attempts {
                backends,
                calls: attempts,
            },
        );
    }
    let choice = WeightedChoice::new(&weights).ok_or_else(|| {
        ConfigError::new(
            resource,
            field("backendRefs"),
            "all weights are zero (or their sum overflows): nothing could be chosen",
        )
    })?;
    Ok(RulePolicy {
        matches,
        backends,
        choice,
        needs_model,
    })
}

/// The call for `provider` as chosen by rule `rule_name` (empty: a direct call): the rule's
/// `routeSpecificConfigs` entry if there is one, else `defaultConfig` (whole, not merged).
/// `rules[].fallback`: each provider's call, in order. Unknown hosts, repeats and an empty
/// list are refused.
fn compile_fallback(
    fallback: &FallbackConfig,
    field: &dyn Fn(&str) -> String,
    resource: &str,
    providers: &Providers<'_>,
    rule_name: &str,
    key: &str,
    limits: Option<&Arc<RuleLimits>>,
) -> Result<Vec<(String, Arc<ProviderCall>)>, ConfigError> {
    if fallback.providers.is_empty() {
        return Err(ConfigError::new(
            resource,
            field("fallback.providers"),
            "needs at least one providerHost",
        ));
    }
    if fallback.on.as_ref().is_some_and(Vec::is_empty) {
        return Err(ConfigError::new(
            resource,
            field("fallback.on"),
            "names no failure: leave it out for the default (connect-failure, 5xx, 429)",
        ));
    }
    let mut out: Vec<(String, Arc<ProviderCall>)> = Vec::with_capacity(fallback.providers.len());
    for (f, host) in fallback.providers.iter().enumerate() {
        let at = field(&format!("fallback.providers[{f}]"));
        let host = normalize_config_host(host).map_err(|m| ConfigError::new(resource, &at, m))?;
        let provider = providers.get(&host).ok_or_else(|| {
            ConfigError::new(resource, &at, format!("no LLMProvider has host {host:?}"))
        })?;
        if out.iter().any(|(h, _)| *h == host) {
            return Err(ConfigError::new(
                resource,
                &at,
                format!("{host:?} is listed twice: each provider is tried at most once"),
            ));
        }
        let marker = format!("{key} {host}");
        let call = provider_call(provider, rule_name, &host, Some(&marker), limits);
        out.push((host, call));
    }
    Ok(out)
}

fn provider_call(
    provider: &ProviderManifest,
    rule_name: &str,
    authority: &str,
    fallback: Option<&str>,
    limits: Option<&Arc<RuleLimits>>,
) -> Arc<ProviderCall> {
    let configs = &provider.spec.configs;
    let config = (!rule_name.is_empty())
        .then(|| configs.route_specific_configs.get(rule_name))
        .flatten()
        .or(configs.default_config.as_ref())
        .and_then(|c| c.openai_config.as_ref());
    let (model, stream, api_key) = match config {
        Some(c) => (c.model.as_deref(), c.stream, c.api_key.as_deref()),
        None => (None, None, None),
    };
    // Checked by `check_openai_config` before any call is built.
    let model_mapping = config
        .and_then(|c| ModelMapping::compile(&c.model_mapping).ok())
        .unwrap_or_default();
    Arc::new(ProviderCall {
        provider: provider.metadata.name.clone(),
        rule: rule_name.to_string(),
        authority: authority.to_string(),
        path: provider.spec.path.clone(),
        model_json: model.map(|m| serde_json::Value::String(m.to_string()).to_string()),
        stream,
        authorization: api_key.map(|k| format!("Bearer {k}")),
        model_mapping,
        fallback: fallback.map(str::to_string),
        limits: limits.cloned(),
    })
}

/// Checks one `openAIConfig`; `field` is its path inside the provider's spec.
fn check_openai_config(
    resource: &str,
    field: &str,
    config: &OpenAIConfig,
) -> Result<(), ConfigError> {
    if config.model.as_deref().is_some_and(|m| m.trim().is_empty()) {
        return Err(ConfigError::new(
            resource,
            format!("{field}.model"),
            "must not be empty",
        ));
    }
    if let Err((key, message)) = ModelMapping::compile(&config.model_mapping) {
        return Err(ConfigError::new(
            resource,
            format!("{field}.modelMapping.{key}"),
            message,
        ));
    }
    if let Some(path) = &config.api_key_file {
        if !path.starts_with('/') {
            return Err(ConfigError::new(
                resource,
                format!("{field}.apiKeyFile"),
                format!("{path:?} must be an absolute path"),
            ));
        }
        if config.api_key.is_some() || config.api_key_from_env.is_some() {
            return Err(ConfigError::new(
                resource,
                format!("{field}.apiKeyFile"),
                "set one of apiKey, apiKeyFromEnv and apiKeyFile",
            ));
        }
    }
    if let Some(name) = &config.api_key_from_env {
        check_api_key_source(config.api_key.as_deref(), name)
            .map_err(|m| ConfigError::new(resource, format!("{field}.apiKeyFromEnv"), m))?;
    }
    if let Some(key) = &config.api_key {
        if key.is_empty() {
            return Err(ConfigError::new(
                resource,
                format!("{field}.apiKey"),
                "must not be empty",
            ));
        }
        if key.bytes().any(|b| !(0x20..0x7f).contains(&b)) {
            return Err(ConfigError::new(
                resource,
                format!("{field}.apiKey"),
                "must be printable ASCII (it becomes an HTTP header)",
            ));
        }
    }
    Ok(())
}

/// Every `routeSpecificConfigs` key must name a rule that sends traffic to this provider.
fn check_route_specific_keys(
    provider: &ProviderManifest,
    host: &str,
    routes: &[RouteManifest],
) -> Result<(), ConfigError> {
    for key in provider.spec.configs.route_specific_configs.keys() {
        let used = routes.iter().flat_map(|r| &r.spec.rules).any(|rule| {
            let fallbacks = rule.fallback.iter().flat_map(|f| &f.providers);
            rule.name.as_deref() == Some(key.as_str())
                && rule
                    .backend_refs
                    .iter()
                    .map(|b| &b.provider_host)
                    .chain(fallbacks)
                    .any(|h| normalize_config_host(h).as_deref() == Ok(host))
        });
        if !used {
            return Err(ConfigError::new(
                provider.resource_name(),
                format!("configs.routeSpecificConfigs.{key}"),
                format!("no LLMRoute rule named {key:?} sends traffic to this provider"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balancer::SplitMix64;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    const GATEWAY: &str = include_str!("../tests/data/seed000-gateway.yaml");
    const MESH: &str = include_str!("../tests/data/seed001-mesh.yaml");

    fn request(authority: &str, extra: &[(&str, &str)]) -> Vec<(String, Vec<u8>)> {
        let mut headers = vec![
            (":method".to_string(), b"POST".to_vec()),
            (":path".to_string(), b"/".to_vec()),
            (":authority".to_string(), authority.as_bytes().to_vec()),
        ];
        headers.extend(
            extra
                .iter()
                .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec())),
        );
        headers
    }

    fn forward(policy: &Policy, headers: &[(String, Vec<u8>)]) -> Arc<ProviderCall> {
        match policy.decide(headers, &mut SplitMix64::new(1)) {
            Decision::Forward(call) => call,
            other => panic!("expected Forward, got {other:?}"),
        }
    }

    fn error(text: &str) -> String {
        Policy::from_text(text).unwrap_err().to_string()
    }

    #[test]
    fn gateway_seed_routes_test_com_with_host_rewrite() {
        let policy = Policy::from_text(GATEWAY).unwrap();
        let call = forward(&policy, &request("test.com", &[]));
        assert_eq!(call.provider, "dashscope-qwen");
        assert_eq!(call.rule, "ingress-route");
        assert_eq!(call.authority, "dashscope.aliyuncs.com");
        assert_eq!(call.path, "/compatible-mode/v1/chat/completions");
        assert_eq!(call.model().as_deref(), Some("qwen-1.8b-chat"));
        assert_eq!(call.stream, Some(false));
        assert_eq!(call.authorization.as_deref(), Some("Bearer ${API_KEY}"));
        // The provider host itself is callable directly too.
        let direct = forward(&policy, &request("dashscope.aliyuncs.com", &[]));
        assert_eq!(direct.rule, "");
    }

    #[test]
    fn mesh_seed_direct_call_and_subscriber_route() {
        let policy = Policy::from_text(MESH).unwrap();
        let plain = forward(&policy, &request("dashscope.aliyuncs.com", &[]));
        assert_eq!(plain.model().as_deref(), Some("qwen1.5-72b-chat"));
        assert_eq!(plain.stream, None);
        assert_eq!(plain.rule, "");

        let vip = forward(
            &policy,
            &request("dashscope.aliyuncs.com", &[("user-type", "subscriber")]),
        );
        assert_eq!(vip.model().as_deref(), Some("qwen-turbo"));
        assert_eq!(vip.rule, "vip-route");

        let other = forward(
            &policy,
            &request("dashscope.aliyuncs.com", &[("user-type", "free")]),
        );
        assert_eq!(other.model().as_deref(), Some("qwen1.5-72b-chat"));
    }

    #[test]
    fn mesh_seed_splits_fifty_fifty() {
        let policy = Policy::from_text(MESH).unwrap();
        let headers = request("demo-llm-server", &[]);
        let mut rng = SplitMix64::new(99);
        let n = 10_000;
        let mut moonshot = 0;
        for _ in 0..n {
            match policy.decide(&headers, &mut rng) {
                Decision::Forward(call) if call.provider == "moonshot" => {
                    assert_eq!(call.path, "/v1/chat/completions");
                    assert_eq!(call.model().as_deref(), Some("moonshot-v1-8k"));
                    assert_eq!(call.authority, "api.moonshot.cn");
                    moonshot += 1;
                }
                Decision::Forward(call) => {
                    assert_eq!(call.provider, "dashscope-qwen");
                    // migrate-rule has no routeSpecificConfigs entry: defaultConfig applies.
                    assert_eq!(call.model().as_deref(), Some("qwen1.5-72b-chat"));
                    assert_eq!(call.rule, "migrate-rule");
                }
                other => panic!("{other:?}"),
            }
        }
        // 5 sigma of binomial(10000, 0.5) is 250.
        assert!((moonshot - n / 2i32).abs() < 250, "{moonshot}");
    }

    fn decision(policy: &Policy, headers: &[(String, Vec<u8>)]) -> Decision {
        policy.decide(headers, &mut SplitMix64::new(1))
    }

    #[test]
    fn host_forms() {
        let policy = Policy::from_text(MESH).unwrap();
        for host in [
            "demo-llm-server",
            "demo-llm-server:80",
            "DEMO-LLM-SERVER",
            "demo-llm-server.default",
            "demo-llm-server.default.svc.cluster.local",
            "demo-llm-server.default.svc.cluster.local:8080",
            "Dashscope.Aliyuncs.Com",
            "dashscope.aliyuncs.com:0",
            "dashscope.aliyuncs.com:00443",
            "dashscope.aliyuncs.com:65535",
        ] {
            assert_eq!(
                policy.classify(host.as_bytes()),
                HostClass::Served,
                "{host}"
            );
            assert!(policy.is_llm_host(host.as_bytes()), "{host}");
            assert!(matches!(
                decision(&policy, &request(host, &[])),
                Decision::Forward(_)
            ));
        }
        // Forms that still name an LLM host, but that an authorization rule written for the
        // host (exact `h`, or the prefix `h:`) may not match, or that Envoy may route apart.
        for host in [
            "dashscope.aliyuncs.com.",
            "dashscope.aliyuncs.com..",
            "dashscope.aliyuncs.com.:80",
            "dashscope.aliyuncs.com:",
            "dashscope.aliyuncs.com:x",
            "dashscope.aliyuncs.com:80x",
            "dashscope.aliyuncs.com:+80",
            "dashscope.aliyuncs.com:-1",
            "dashscope.aliyuncs.com:65536",
            "dashscope.aliyuncs.com:123456",
            "dashscope.aliyuncs.com:99999999999999999999999",
            "dashscope.aliyuncs.com:80:80",
            "dashscope.aliyuncs.com: 80",
            " dashscope.aliyuncs.com",
            "dashscope.aliyuncs.com ",
            "user@dashscope.aliyuncs.com",
            "user:pass@DASHSCOPE.aliyuncs.com:443",
            "a@b@dashscope.aliyuncs.com",
            "example.com,dashscope.aliyuncs.com",
            "dashscope.aliyuncs.com,example.com",
            "demo-llm-server.",
            "demo-llm-server.default.svc.cluster.local.:8080",
        ] {
            assert_eq!(
                policy.classify(host.as_bytes()),
                HostClass::Refused,
                "{host}"
            );
            assert_eq!(
                decision(&policy, &request(host, &[])),
                Decision::Reject(RequestError::InvalidHost),
                "{host}"
            );
        }
        for host in [
            "demo-llm-server.other",
            "example.com",
            "example.com:80",
            "",
            ":80",
            "[::1]:80",
            "dashscope.aliyuncs.com.evil",
            "evil-dashscope.aliyuncs.com",
            "dashscope.aliyuncs.com@example.com",
            "xdashscope.aliyuncs.com",
        ] {
            assert_eq!(policy.classify(host.as_bytes()), HostClass::Other, "{host}");
            assert_eq!(
                decision(&policy, &request(host, &[])),
                Decision::PassThrough
            );
        }
        assert_eq!(policy.classify(&[0xff, 0x00]), HostClass::Other);
        assert_eq!(
            policy.classify(b"\xffuser@dashscope.aliyuncs.com"),
            HostClass::Refused
        );
        let no_authority = vec![(":path".to_string(), b"/".to_vec())];
        assert_eq!(decision(&policy, &no_authority), Decision::PassThrough);
    }

    fn with_method(authority: &str, method: &str, path: &str) -> Vec<(String, Vec<u8>)> {
        let mut headers = request(authority, &[]);
        headers.retain(|(k, _)| k != ":method" && k != ":path");
        headers.push((":method".to_string(), method.as_bytes().to_vec()));
        headers.push((":path".to_string(), path.as_bytes().to_vec()));
        headers
    }

    #[test]
    fn only_post_chats_and_only_get_or_head_lists_models() {
        let policy = Policy::from_text(MESH).unwrap();
        for host in ["dashscope.aliyuncs.com", "demo-llm-server"] {
            for (method, path) in [
                ("GET", "/v1/chat/completions"),
                ("GET", "/"),
                ("HEAD", "/v1/chat/completions"),
                ("PUT", "/v1/chat/completions"),
                ("DELETE", "/v1/files/x"),
                ("PATCH", "/"),
                ("OPTIONS", "*"),
                ("CONNECT", ""),
                ("TRACE", "/"),
                ("post", "/"),
                ("POST /x", "/"),
                ("PUT", "/v1/models"),
                ("POST-", "/v1/models"),
            ] {
                assert_eq!(
                    decision(&policy, &with_method(host, method, path)),
                    Decision::Reject(RequestError::MethodNotAllowed),
                    "{method} {path}"
                );
            }
            let mut no_method = request(host, &[]);
            no_method.retain(|(k, _)| k != ":method");
            assert_eq!(
                decision(&policy, &no_method),
                Decision::Reject(RequestError::MethodNotAllowed)
            );
            for method in ["GET", "HEAD"] {
                for path in ["/v1/models", "/models", "/v1/models?limit=1"] {
                    assert!(matches!(
                        decision(&policy, &with_method(host, method, path)),
                        Decision::Models(_)
                    ));
                }
            }
            assert!(matches!(
                decision(&policy, &with_method(host, "POST", "/v1/models")),
                Decision::Forward(_)
            ));
        }
        // Other hosts keep every method.
        assert_eq!(
            decision(&policy, &with_method("example.com", "CONNECT", "")),
            Decision::PassThrough
        );
    }

    fn models(decision: Decision) -> Vec<String> {
        let Decision::Models(list) = decision else {
            panic!("expected Models, got {decision:?}");
        };
        let list: serde_json::Value = serde_json::from_str(&list).unwrap();
        list["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_string())
            .collect()
    }

    #[test]
    fn the_model_list_shows_what_the_asking_client_can_reach() {
        let policy = Policy::from_text(MESH).unwrap();
        let list = |host: &str, extra: &[(&str, &str)]| {
            let mut headers = with_method(host, "GET", "/v1/models");
            headers.extend(
                extra
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec())),
            );
            models(decision(&policy, &headers))
        };
        assert_eq!(list("dashscope.aliyuncs.com", &[]), ["qwen1.5-72b-chat"]);
        assert_eq!(
            list("dashscope.aliyuncs.com", &[("user-type", "subscriber")]),
            ["qwen-turbo"]
        );
        let mut split = list("demo-llm-server", &[]);
        split.sort();
        assert_eq!(split, ["moonshot-v1-8k", "qwen1.5-72b-chat"]);

        // A rule that matches on the model is reachable by choosing one; the rule after it
        // too. A rule behind one that every request matches is not.
        let text = r#"
apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMProvider
metadata: {name: a}
spec:
  host: a.example
  path: /v1/chat/completions
  configs:
    defaultConfig: {openAIConfig: {model: a-default}}
    routeSpecificConfigs:
      by-model: {openAIConfig: {model: a-by-model}}
      vip: {openAIConfig: {model: a-vip}}
      hidden: {openAIConfig: {model: a-hidden}}
---
apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMRoute
metadata: {name: r}
spec:
  host: r.example
  rules:
  - name: vip
    matches: [{headers: {x-tier: {exact: vip}}}]
    backendRefs: [{providerHost: a.example}]
  - name: by-model
    matches: [{model: {prefix: gpt-}}]
    backendRefs: [{providerHost: a.example}]
  - name: rest
    backendRefs: [{providerHost: a.example}]
  - name: hidden
    backendRefs: [{providerHost: a.example}]
---
settings: {forwardAfterBody: true}
"#;
        let policy = Policy::from_text(text).unwrap();
        let list = |extra: &[(&str, &str)]| {
            let mut headers = with_method("r.example", "HEAD", "/v1/models");
            headers.extend(
                extra
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec())),
            );
            models(decision(&policy, &headers))
        };
        assert_eq!(list(&[("x-tier", "vip")]), ["a-vip"]);
        assert_eq!(list(&[]), ["a-by-model", "a-default"]);
    }

    #[test]
    fn without_host_ports_only_the_bare_host_is_served() {
        let policy = Policy::from_text(&format!(
            "{GATEWAY}\n---\nsettings: {{hostWithPort: false}}\n"
        ))
        .unwrap();
        for host in ["test.com", "TEST.com"] {
            assert_eq!(
                policy.classify(host.as_bytes()),
                HostClass::Served,
                "{host}"
            );
        }
        for host in ["test.com:80", "test.com:443", "test.com:", "test.com."] {
            assert_eq!(
                policy.classify(host.as_bytes()),
                HostClass::Refused,
                "{host}"
            );
            assert_eq!(
                decision(&policy, &request(host, &[])),
                Decision::Reject(RequestError::InvalidHost)
            );
        }
        assert_eq!(policy.classify(b"example.com:80"), HostClass::Other);
    }

    #[test]
    fn a_gateway_serves_providers_only_through_its_routes() {
        let policy = Policy::from_text(&format!(
            "{GATEWAY}\n---\nsettings: {{directProviderCalls: false}}\n"
        ))
        .unwrap();
        let call = forward(&policy, &request("test.com", &[]));
        assert_eq!(call.authority, "dashscope.aliyuncs.com");
        for host in ["dashscope.aliyuncs.com", "DASHSCOPE.aliyuncs.com:80"] {
            assert_eq!(
                decision(&policy, &request(host, &[])),
                Decision::Reject(RequestError::ProviderHostNotServed)
            );
            assert_eq!(
                decision(&policy, &with_method(host, "GET", "/v1/models")),
                Decision::Reject(RequestError::ProviderHostNotServed)
            );
        }
        assert!(matches!(
            decision(&policy, &with_method("test.com", "GET", "/v1/models")),
            Decision::Models(_)
        ));
    }

    #[test]
    fn rules_in_order_or_of_entries_and_of_conditions() {
        let text = r#"
apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMProvider
metadata: {name: a}
spec: {host: a.example, path: /v1/chat/completions}
---
apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMProvider
metadata: {name: b}
spec: {host: b.example, path: /v1/chat/completions}
---
apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMRoute
metadata: {name: r, namespace: team}
spec:
  host: llm
  rules:
  - name: both
    matches:
    - headers:
        x-tier: {exact: gold}
        x-team: {prefix: ml-}
    - headers:
        x-vip: {regex: "yes|true"}
    backendRefs: [{providerHost: a.example}]
  - name: fallback-b
    matches:
    - headers:
        x-tier: {exact: silver}
    backendRefs: [{providerHost: B.Example}]
"#;
        let policy = Policy::from_text(text).unwrap();
        let decide = |extra: &[(&str, &str)]| {
            policy.decide(&request("llm.team", extra), &mut SplitMix64::new(3))
        };
        let provider = |d: Decision| match d {
            Decision::Forward(c) => c.provider.clone(),
            other => format!("{other:?}"),
        };
        assert_eq!(
            provider(decide(&[("x-tier", "gold"), ("x-team", "ml-infra")])),
            "a"
        );
        assert_eq!(provider(decide(&[("x-vip", "true")])), "a");
        assert_eq!(
            provider(decide(&[("x-vip", "truely")])),
            "Reject(RouteNotFound)"
        );
        assert_eq!(
            provider(decide(&[("x-tier", "gold")])),
            "Reject(RouteNotFound)"
        );
        assert_eq!(provider(decide(&[("x-tier", "silver")])), "b");
        assert_eq!(provider(decide(&[])), "Reject(RouteNotFound)");
        // A repeated header matches if any of its values does.
        assert_eq!(
            provider(decide(&[("x-tier", "bronze"), ("x-tier", "silver")])),
            "b"
        );
        // The namespace alias follows the route's namespace.
        assert!(policy.is_llm_host(b"llm.team.svc.cluster.local"));
        assert!(!policy.is_llm_host(b"llm.default"));
    }

    #[test]
    fn json_form_equals_yaml_form() {
        let json = r#"{"providers": [{"apiVersion": "istio.alibabacloud.com/v1beta1", "kind": "LLMProvider",
            "metadata": {"name": "moonshot", "namespace": "default", "labels": {"a": "b"}},
            "spec": {"host": "api.moonshot.cn", "path": "/v1/chat/completions",
                     "configs": {"defaultConfig": {"openAIConfig": {"model": "moonshot-v1-8k", "stream": false, "apiKey": "k"}}}}}],
          "routes": [{"apiVersion": "istio.alibabacloud.com/v1beta1", "kind": "LLMRoute",
            "metadata": {"name": "r"},
            "spec": {"host": "demo", "rules": [{"name": "x", "backendRefs": [{"providerHost": "api.moonshot.cn"}]}]}}],
          "settings": {"maxRequestBodyBytes": 1024}}"#;
        let policy = Policy::from_text(json).unwrap();
        assert_eq!(policy.max_request_body_bytes, 1024);
        let call = forward(&policy, &request("demo.default.svc.cluster.local", &[]));
        assert_eq!(call.model().as_deref(), Some("moonshot-v1-8k"));
        assert_eq!(call.authorization.as_deref(), Some("Bearer k"));

        let empty = Policy::from_text("").unwrap();
        assert_eq!(
            empty.max_request_body_bytes,
            crate::config::DEFAULT_MAX_REQUEST_BODY_BYTES
        );
        assert!(!empty.is_llm_host(b"anything"));

        let with_settings = format!("{MESH}\n---\nsettings: {{maxRequestBodyBytes: 2048}}\n");
        assert_eq!(
            Policy::from_text(&with_settings)
                .unwrap()
                .max_request_body_bytes,
            2048
        );
    }

    const PROVIDER: &str = "apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMProvider
metadata: {name: p}
spec: {host: p.example, path: /v1/chat/completions}
";

    fn with_route(rules: &str) -> String {
        format!(
            "{PROVIDER}---
apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMRoute
metadata: {{name: demo-llm-server, namespace: default}}
spec:
  host: demo-llm-server
  rules:
{rules}"
        )
    }

    #[test]
    fn model_conditions_wait_for_the_body_and_combine_with_headers() {
        let text = format!(
            "{PROVIDER}---
apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMProvider
metadata: {{name: q}}
spec: {{host: q.example, path: /v1/chat/completions, configs: {{defaultConfig: {{openAIConfig: {{model: q-default, modelMapping: {{gpt-4o: q-max, 'gpt-*': q-plus}}}}}}}}}}
---
apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMRoute
metadata: {{name: r}}
spec:
  host: llm.local
  rules:
  - name: header-only
    matches: [{{headers: {{x-team: {{exact: a}}}}}}]
    backendRefs: [{{providerHost: p.example}}]
  - name: vip-q
    matches: [{{headers: {{user-type: {{exact: vip}}}}, model: {{prefix: q-}}}}]
    backendRefs: [{{providerHost: q.example}}]
  - name: by-model
    matches: [{{model: {{regex: 'gpt-.*|q-.*'}}}}]
    backendRefs: [{{providerHost: q.example}}]
"
        );
        let policy = Policy::from_text(&text).unwrap();
        let rng = &mut SplitMix64::new(1);
        let headers = |extra: &[(&str, &str)]| {
            let mut h = vec![
                (":method".to_string(), b"POST".to_vec()),
                (":authority".to_string(), b"llm.local".to_vec()),
            ];
            h.extend(
                extra
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec())),
            );
            h
        };
        let rule = |d: Decision| match d {
            Decision::Forward(call) => call.rule.clone(),
            other => format!("{other:?}"),
        };
        // A header-only rule before the first model rule decides at header time.
        assert_eq!(
            rule(policy.decide(&headers(&[("x-team", "a")]), rng)),
            "header-only"
        );
        assert_eq!(policy.decide(&headers(&[]), rng), Decision::NeedsModel);
        let with = |h: &[(&str, &str)], model: Option<&str>| {
            rule(policy.decide_with_model(
                &headers(h),
                model.map(str::as_bytes),
                &mut SplitMix64::new(1),
            ))
        };
        assert_eq!(with(&[("user-type", "vip")], Some("q-long")), "vip-q");
        assert_eq!(
            with(&[], Some("q-long")),
            "by-model",
            "header and model are ANDed"
        );
        assert_eq!(with(&[("user-type", "vip")], Some("gpt-4o")), "by-model");
        assert_eq!(
            policy.decide_with_model(&headers(&[]), None, rng),
            Decision::Reject(RequestError::RouteNotFound),
            "no model: no model condition matches"
        );

        let mut get = headers(&[(":path", "/v1/models?x=1")]);
        get[0].1 = b"GET".to_vec();
        let Decision::Models(list) = policy.decide(&get, rng) else {
            panic!("expected the model list");
        };
        let list: serde_json::Value = serde_json::from_str(&list).unwrap();
        let ids: Vec<&str> = list["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, vec!["gpt-4o", "q-default"]);
        get[1].1 = b"q.example".to_vec();
        assert!(matches!(policy.decide(&get, rng), Decision::Models(_)));
        get[0].1 = b"POST".to_vec();
        assert!(matches!(policy.decide(&get, rng), Decision::Forward(_)));
    }

    #[test]
    fn bad_model_conditions_and_mappings_name_their_field() {
        let text = with_route("  - matches: [{model: {exact: a, prefix: b}}]\n    backendRefs: [{providerHost: p.example}]\n");
        let error = Policy::from_text(&text).unwrap_err().to_string();
        assert!(
            error.contains("rules[0].matches[0].model: takes only one of"),
            "{error}"
        );
        let text = PROVIDER.replace(
            "spec: {",
            "spec: {configs: {defaultConfig: {openAIConfig: {modelMapping: {'g*x': m}}}}, ",
        );
        let error = Policy::from_text(&text).unwrap_err().to_string();
        assert!(
            error.contains(
                "configs.defaultConfig.openAIConfig.modelMapping.g*x: `*` may only end a key"
            ),
            "{error}"
        );
    }

    #[test]
    fn api_key_from_the_vm_environment() {
        let text = PROVIDER.replace(
            "spec: {",
            "spec: {configs: {defaultConfig: {openAIConfig: {apiKeyFromEnv: P_KEY}}}, ",
        );
        let env = |name: &str| (name == "P_KEY").then(|| "sk-from-env".to_string());
        let policy = Policy::from_text_with_env(&text, env).unwrap();
        let headers = request("p.example", &[]);
        let Decision::Forward(call) = policy.decide(&headers, &mut SplitMix64::new(1)) else {
            panic!("expected a provider call");
        };
        assert_eq!(call.authorization.as_deref(), Some("Bearer sk-from-env"));

        let empty = |_: &str| Some(String::new());
        let errors = Policy::from_text_with_env(&text, empty).unwrap_err();
        assert!(
            errors.to_string().contains("\"P_KEY\" is not set"),
            "{errors}"
        );
        assert!(!errors.to_string().contains("sk-"), "{errors}");

        // Render-time tools see the name, not a value.
        let config = FilterConfig::parse(&text).unwrap();
        assert_eq!(config.api_key_env_names(), vec!["P_KEY".to_string()]);
        assert!(Policy::compile(&config).is_ok());
    }

    #[test]
    fn config_errors_name_resource_and_field() {
        let cases: Vec<(String, &str)> = vec![
            (
                with_route("  - backendRefs: [{providerHost: p.example}, {providerHost: nowhere.example}]\n"),
                r#"LLMRoute default/demo-llm-server: rules[0].backendRefs[1].providerHost: no LLMProvider has host "nowhere.example""#,
            ),
            (
                with_route("  - backendRefs: [{providerHost: p.example, weight: 0}]\n"),
                "LLMRoute default/demo-llm-server: rules[0].backendRefs: all weights are zero",
            ),
            (
                with_route("  - backendRefs: [{providerHost: p.example, weight: -1}]\n"),
                "LLMRoute default/demo-llm-server: rules[0].backendRefs[0].weight: -1 is negative",
            ),
            (
                with_route("  - backendRefs: [{providerHost: p.example, weight: 2}, {providerHost: p.example}]\n"),
                "LLMRoute default/demo-llm-server: rules[0].backendRefs: weight is set on some",
            ),
            (
                with_route("  - matches: [{headers: {x: {regex: '(oops'}}}]\n    backendRefs: [{providerHost: p.example}]\n"),
                "LLMRoute default/demo-llm-server: rules[0].matches[0].headers.x.regex: invalid regex",
            ),
            (
                with_route("  - matches: [{headers: {x: {exact: a, prefix: b}}}]\n    backendRefs: [{providerHost: p.example}]\n"),
                "LLMRoute default/demo-llm-server: rules[0].matches[0].headers.x: takes only one",
            ),
            (
                with_route("  - backendRefs: []\n"),
                "LLMRoute default/demo-llm-server: rules[0].backendRefs: needs at least one backendRef",
            ),
            (
                with_route("  - name: a\n    backendRefs: [{providerHost: p.example}]\n  - name: a\n    backendRefs: [{providerHost: p.example}]\n"),
                "LLMRoute default/demo-llm-server: rules[1].name: \"a\" names another rule",
            ),
            (
                with_route("  - backendRefs: [{providerHost: p.example, hostRewrite: 'https://x'}]\n"),
                "LLMRoute default/demo-llm-server: rules[0].backendRefs[0].hostRewrite:",
            ),
            (
                with_route("  - backendRefs: [{providerHost: p.example, colour: red}]\n"),
                "LLMRoute default/demo-llm-server: rules[0].backendRefs[0]: unknown field `colour`",
            ),
            (
                with_route("  - backendRefs: [{providerHost: p.example, weight: 1.5}]\n"),
                "LLMRoute default/demo-llm-server: rules[0].backendRefs[0].weight: invalid type",
            ),
            (
                format!("{PROVIDER}---\n{}", PROVIDER.replace("name: p", "name: q")),
                r#"LLMProvider default/q: host: "p.example" is already the host of LLMProvider default/p"#,
            ),
            (
                format!("{PROVIDER}---\n{PROVIDER}"),
                "LLMProvider default/p: defined more than once",
            ),
            (
                PROVIDER.replace("spec: {", "spec: {configs: {routeSpecificConfigs: {vip: {openAIConfig: {model: m}}}}, "),
                r#"LLMProvider default/p: configs.routeSpecificConfigs.vip: no LLMRoute rule named "vip" sends traffic to this provider"#,
            ),
            (
                PROVIDER.replace("spec: {", "spec: {configs: {defaultConfig: {openAIConfig: {apiKey: ''}}}, "),
                "LLMProvider default/p: configs.defaultConfig.openAIConfig.apiKey: must not be empty",
            ),
            (
                PROVIDER.replace("spec: {", "spec: {configs: {defaultConfig: {openAIConfig: {apiKey: \"a\\nb\"}}}, "),
                "LLMProvider default/p: configs.defaultConfig.openAIConfig.apiKey: must be printable",
            ),
            (
                PROVIDER.replace("spec: {", "spec: {configs: {defaultConfig: {openAIConfig: {apiKeyFromEnv: 'A-B'}}}, "),
                "LLMProvider default/p: configs.defaultConfig.openAIConfig.apiKeyFromEnv: \"A-B\" is not an environment variable name",
            ),
            (
                PROVIDER.replace("spec: {", "spec: {configs: {defaultConfig: {openAIConfig: {apiKey: k, apiKeyFromEnv: K}}}, "),
                "LLMProvider default/p: configs.defaultConfig.openAIConfig.apiKeyFromEnv: set either apiKey or apiKeyFromEnv, not both",
            ),
            (
                PROVIDER.replace("spec: {", "spec: {configs: {defaultConfig: {openAIConfig: {apiKeyFromEnv: LLM_FILTER_TEST_UNSET_KEY}}}, "),
                "LLMProvider default/p: configs.defaultConfig.openAIConfig.apiKeyFromEnv: environment variable \"LLM_FILTER_TEST_UNSET_KEY\" is not set in the proxy's Wasm VM",
            ),
            (
                PROVIDER.replace("spec: {", "spec: {configs: {defaultConfig: {openAIConfig: {apiKeyFile: keys/p}}}, "),
                "LLMProvider default/p: configs.defaultConfig.openAIConfig.apiKeyFile: \"keys/p\" must be an absolute path",
            ),
            (
                PROVIDER.replace("spec: {", "spec: {configs: {defaultConfig: {openAIConfig: {apiKeyFile: /k, apiKey: k}}}, "),
                "LLMProvider default/p: configs.defaultConfig.openAIConfig.apiKeyFile: set one of apiKey, apiKeyFromEnv and apiKeyFile",
            ),
            (
                PROVIDER.replace("spec: {", "spec: {configs: {defaultConfig: {openAIConfig: {modle: m}}}, "),
                "LLMProvider default/p: configs.defaultConfig.openAIConfig: unknown field `modle`",
            ),
            (
                PROVIDER.replace("/v1/chat/completions", "v1/chat"),
                "LLMProvider default/p: path: \"v1/chat\" must be an absolute path",
            ),
            (
                PROVIDER.replace("p.example", "p.example:443"),
                "LLMProvider default/p: host: \"p.example:443\" is not a host name",
            ),
            (
                PROVIDER.replace("v1beta1", "v1"),
                "LLMProvider default/p: apiVersion: expected \"istio.alibabacloud.com/v1beta1\"",
            ),
            (
                PROVIDER.replace("kind: LLMProvider", "kind: Gateway"),
                "Gateway default/p: kind: expected LLMProvider or LLMRoute",
            ),
            (
                PROVIDER.replace("metadata: {name: p}", "metadata: {namespace: x}"),
                "LLMProvider x/<unnamed>: metadata.name: must not be empty",
            ),
            (
                PROVIDER.replace("path: /v1/chat/completions", "path: /v1, extra: 1"),
                "LLMProvider default/p: spec: unknown field `extra`",
            ),
            (
                "kind: LLMProvider\nspec: [unclosed".to_string(),
                "document 1: not valid YAML or JSON",
            ),
            (
                "- just\n- a list\n".to_string(),
                "document 1: expected an LLMProvider or LLMRoute manifest",
            ),
            (
                r#"{"providers": [{"kind": "LLMRoute"}]}"#.to_string(),
                "LLMRoute default/<unnamed>: kind: expected LLMProvider",
            ),
            (
                r#"{"settings": {"maxRequestBodyBytes": -5}}"#.to_string(),
                "settings: maxRequestBodyBytes: invalid type: integer `-5`",
            ),
            (
                r#"{"provider": []}"#.to_string(),
                "document 1: unknown field `provider`",
            ),
            (
                format!("{}---\n{}", with_route("  - backendRefs: [{providerHost: p.example}]\n"),
                    with_route("  - backendRefs: [{providerHost: p.example}]\n")
                        .replace(PROVIDER, "").replace("name: demo-llm-server, namespace: default", "name: other")
                        .replace("host: demo-llm-server", "host: demo-llm-server.default")),
                r#"LLMRoute default/other: host: "demo-llm-server.default" is already the host of LLMRoute default/demo-llm-server"#,
            ),
        ];
        for (text, expected) in cases {
            let message = error(&text);
            assert!(
                message.starts_with(expected),
                "expected {expected:?}\n     got {message:?}\nconfig:\n{text}"
            );
        }
    }

    #[test]
    fn every_wrong_resource_is_reported() {
        let text = format!(
            "{}---\n{}",
            PROVIDER.replace("/v1/chat/completions", "relative"),
            with_route("  - backendRefs: [{providerHost: p.example, weight: -2}]\n")
                .replace(PROVIDER, "")
        );
        let errors = Policy::from_text(&text).unwrap_err();
        let lines: Vec<String> = errors.0.iter().map(ToString::to_string).collect();
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(
            lines[0].starts_with("LLMProvider default/p: path:"),
            "{lines:?}"
        );
        // The provider's host is fine, so the route does not also say it is unknown.
        assert!(
            lines[1]
                .starts_with("LLMRoute default/demo-llm-server: rules[0].backendRefs[0].weight"),
            "{lines:?}"
        );
        assert_eq!(errors.to_string(), lines.join("\n"));
    }

    #[test]
    fn keys_never_in_errors_or_debug() {
        let text = PROVIDER.replace(
            "spec: {",
            "spec: {configs: {defaultConfig: {openAIConfig: {apiKey: sk-123, stream: sk-secret-456}}}, ",
        );
        let message = error(&text);
        assert!(message.contains("stream"), "{message}");
        assert!(!message.contains("sk-secret-456"), "{message}");

        let policy = Policy::from_text(GATEWAY).unwrap();
        let call = forward(&policy, &request("test.com", &[]));
        let debug = format!("{call:?} {policy:?}");
        assert!(!debug.contains("API_KEY"), "{debug}");
    }

    const TWO_PROVIDERS: &str = "apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMProvider
metadata: {name: p}
spec:
  host: p.example
  path: /v1/chat/completions
  configs:
    defaultConfig: {openAIConfig: {model: p-model, apiKey: sk-p}}
---
apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMProvider
metadata: {name: q}
spec:
  host: q.example
  path: /q/chat
  configs:
    defaultConfig: {openAIConfig: {model: q-model, apiKey: sk-q}}
    routeSpecificConfigs:
      ha: {openAIConfig: {model: q-ha, apiKey: sk-q-ha}}
";

    fn fallback_route(rule: &str) -> String {
        format!(
            "{TWO_PROVIDERS}---
apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMRoute
metadata: {{name: r, namespace: team}}
spec:
  host: llm.example
  rules:
{rule}"
        )
    }

    #[test]
    fn fallback_marks_the_call_and_gives_each_attempt_its_provider_call() {
        let text = fallback_route(
            "  - name: ha\n    backendRefs: [{providerHost: p.example, hostRewrite: p-alias.example}]\n    fallback: {providers: [Q.example.], on: [5xx, 429]}\n  - name: plain\n    backendRefs: [{providerHost: q.example}]\n",
        );
        let policy = Policy::from_text(&text).unwrap();
        assert!(policy.has_fallbacks());
        let call = forward(&policy, &request("llm.example", &[]));
        assert_eq!(call.fallback.as_deref(), Some("team/r/0 p.example"));
        assert_eq!(call.fallback_parts(), Some(("team/r/0", "p.example")));
        assert_eq!(call.authority, "p-alias.example");
        let key = fallback_key("team", "r", 0);
        assert_eq!(key, "team/r/0");
        let first = policy.attempt_call(key.as_bytes(), b"p.example").unwrap();
        assert_eq!(first, &call);
        let second = policy.attempt_call(key.as_bytes(), b"Q.EXAMPLE").unwrap();
        assert_eq!(second.provider, "q");
        assert_eq!(second.path, "/q/chat");
        assert_eq!(second.authority, "q.example");
        assert_eq!(second.rule, "ha");
        // The rule's routeSpecificConfigs entry applies to a fallback provider too.
        assert_eq!(second.model().as_deref(), Some("q-ha"));
        assert_eq!(second.authorization.as_deref(), Some("Bearer sk-q-ha"));
        assert_eq!(second.fallback.as_deref(), Some("team/r/0 q.example"));
        assert_eq!(policy.attempt_order(key.as_bytes(), &call), vec!["p", "q"]);
        assert_eq!(policy.attempt_order(b"team/r/9", &call), vec!["p"]);
        let first_rc = Arc::new(call.clone());
        let at = |n| {
            policy
                .attempt_at(key.as_bytes(), &first_rc, n)
                .map(|c| c.provider.as_str())
        };
        assert_eq!(
            (at(0), at(1), at(2), at(3)),
            (None, Some("p"), Some("q"), None)
        );
        assert!(policy.attempt_call(b"team/r/1", b"q.example").is_none());
        assert!(policy
            .attempt_call(key.as_bytes(), b"other.example")
            .is_none());
        // A rule without fallback is exactly as before.
        let plain = forward(
            &Policy::from_text(&fallback_route(
                "  - name: ha\n    backendRefs: [{providerHost: q.example}]\n",
            ))
            .unwrap(),
            &request("llm.example", &[]),
        );
        assert_eq!(plain.fallback, None);
    }

    #[test]
    fn fallback_on_accepts_names_and_the_bare_number() {
        let config = FilterConfig::parse(&fallback_route(
            "  - backendRefs: [{providerHost: p.example}]\n    fallback: {providers: [q.example], on: [connect-failure, 5xx, 429, '429']}\n",
        ))
        .unwrap();
        let fallback = config.routes[0].spec.rules[0].fallback.clone().unwrap();
        use crate::config::FallbackOn::*;
        assert_eq!(
            fallback.triggers(),
            vec![ConnectFailure, ServerError, RateLimited, RateLimited]
        );
        let default = FallbackConfig {
            providers: vec![],
            on: None,
        };
        assert_eq!(
            default.triggers(),
            vec![ConnectFailure, ServerError, RateLimited]
        );
        let error = FilterConfig::parse(&fallback_route(
            "  - backendRefs: [{providerHost: p.example}]\n    fallback: {providers: [q.example], on: [timeout]}\n",
        ))
        .unwrap_err()
        .to_string();
        assert!(error.contains("timeout"), "{error}");
    }

    #[test]
    fn bad_fallbacks_name_their_field() {
        for (rule, wanted) in [
            (
                "    fallback: {providers: [q.example, nowhere.example]}",
                r#"LLMRoute team/r: rules[0].fallback.providers[1]: no LLMProvider has host "nowhere.example""#,
            ),
            (
                "    fallback: {providers: [q.example, Q.example]}",
                r#"rules[0].fallback.providers[1]: "q.example" is listed twice"#,
            ),
            (
                "    fallback: {providers: [q.example, p.example]}",
                r#"rules[0].fallback.providers[1]: "p.example" is a backendRef of this rule"#,
            ),
            (
                "    fallback: {providers: []}",
                "rules[0].fallback.providers: needs at least one providerHost",
            ),
            (
                "    fallback: {providers: [q.example], on: []}",
                "rules[0].fallback.on: names no failure",
            ),
            (
                "    fallback: {providers: [q.example], tries: 2}",
                "unknown field `tries`",
            ),
        ] {
            let text = fallback_route(&format!(
                "  - name: ha\n    backendRefs: [{{providerHost: p.example}}]\n{rule}\n"
            ));
            let error = Policy::from_text(&text).unwrap_err().to_string();
            assert!(error.contains(wanted), "{rule}: {error}");
        }
        let text = fallback_route(
            "  - name: ha\n    backendRefs: [{providerHost: p.example}, {providerHost: p.example}]\n    fallback: {providers: [q.example]}\n",
        );
        let error = Policy::from_text(&text).unwrap_err().to_string();
        assert!(
            error.contains("rules[0].backendRefs[1].providerHost: \"p.example\" is already"),
            "{error}"
        );
    }

    #[test]
    fn limits_go_with_every_call_of_their_rule() {
        let text = fallback_route(
            "  - name: ha
    matches: [{headers: {x-plan: {exact: free}}}]
    limits: [{name: per-user, tokens: 50, per: minute, key: {header: x-user-id}}]
    backendRefs: [{providerHost: p.example}]
    fallback: {providers: [q.example]}
  - backendRefs: [{providerHost: q.example}]
",
        );
        let policy = Policy::from_text(&text).unwrap();
        let limited = forward(
            &policy,
            &request("llm.example", &[("x-plan", "free"), ("x-user-id", "alice")]),
        );
        let limits = limited.limits.as_ref().unwrap();
        assert!(limits.counts_tokens);
        assert_eq!(
            limits.marks,
            [(
                "llm.limit.team/r/ha/per-user".to_string(),
                Some("x-user-id".to_string())
            )]
        );
        let attempt = policy.attempt_call(b"team/r/0", b"q.example").unwrap();
        assert!(Arc::ptr_eq(attempt.limits.as_ref().unwrap(), limits));
        let other = forward(&policy, &request("llm.example", &[]));
        assert!(other.limits.is_none());
        let direct = forward(&policy, &request("p.example", &[]));
        assert!(direct.limits.is_none());
    }

    #[test]
    fn bad_limits_name_their_field() {
        for (limits, wanted) in [
            (
                "[{name: a, tokens: 10, per: fortnight}]",
                "LLMRoute team/r: rules[0].limits[0].per: unknown variant `fortnight`",
            ),
            (
                "[{tokens: 10, per: day}]",
                "rules[0].limits[0]: missing field `name`",
            ),
            (
                "[{name: a, tokens: 10, per: day, key: {cookie: x}}]",
                "rules[0].limits[0].key: unknown field `cookie`",
            ),
            (
                "[{name: a, tokens: -1, per: day}]",
                "rules[0].limits[0].tokens: -1 is not between 1 and 4294967295",
            ),
        ] {
            let text = fallback_route(&format!(
                "  - name: ha\n    backendRefs: [{{providerHost: p.example}}]\n    limits: {limits}\n"
            ));
            let error = Policy::from_text(&text).unwrap_err().to_string();
            assert!(error.contains(wanted), "{limits}: {error}");
        }
    }
}
