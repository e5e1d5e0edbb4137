//! Serde types that mirror the manifests exactly as users write them, and the parser that turns
//! the plugin configuration (a YAML stream of manifests, or the JSON bundle Istio delivers) into
//! them. Nothing here is validated beyond shape: `policy` does the meaning.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_yaml::Value;

use crate::error::ConfigError;

pub const API_VERSION: &str = "istio.alibabacloud.com/v1beta1";
pub const KIND_PROVIDER: &str = "LLMProvider";
pub const KIND_ROUTE: &str = "LLMRoute";
pub const DEFAULT_NAMESPACE: &str = "default";
pub const DEFAULT_MAX_REQUEST_BODY_BYTES: u64 = 8 * 1024 * 1024;

/// `metadata` of a manifest. Other ObjectMeta fields (labels, uid, ...) are accepted and ignored,
/// so `kubectl get -o yaml` output can be fed back in.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
pub struct Metadata {
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

impl Metadata {
    pub fn namespace(&self) -> &str {
        match self.namespace.as_deref() {
            Some(ns) if !ns.is_empty() => ns,
            _ => DEFAULT_NAMESPACE,
        }
    }
}

/// One manifest: `apiVersion`, `kind`, `metadata`, `spec` (and an ignored `status`).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Manifest<S> {
    pub api_version: String,
    pub kind: String,
    #[serde(default)]
    pub metadata: Metadata,
    pub spec: S,
    #[serde(default, skip_serializing)]
    pub status: Option<serde::de::IgnoredAny>,
}

impl<S> Manifest<S> {
    /// `Kind namespace/name`, as error messages name a resource.
    pub fn resource_name(&self) -> String {
        let name = match self.metadata.name.as_str() {
            "" => "<unnamed>",
            name => name,
        };
        format!("{} {}/{name}", self.kind, self.metadata.namespace())
    }
}

pub type ProviderManifest = Manifest<ProviderSpec>;
pub type RouteManifest = Manifest<RouteSpec>;

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ProviderSpec {
    pub host: String,
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload_selector: Option<WorkloadSelector>,
    #[serde(default)]
    pub configs: ProviderConfigs,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadSelector {
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ProviderConfigs {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_config: Option<ProviderConfig>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub route_specific_configs: BTreeMap<String, ProviderConfig>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    #[serde(
        rename = "openAIConfig",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub openai_config: Option<OpenAIConfig>,
}

#[derive(Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct OpenAIConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key: Option<String>,
    /// The name of an environment variable of the proxy's Wasm VM holding the key (Envoy
    /// `vm_config.environment_variables`, Istio `vmConfig.env`), instead of `apiKey` inline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_from_env: Option<String>,
    /// A file Envoy reads the key from (e.g. a mounted Kubernetes Secret): `llm-filter render
    /// envoy` gives the provider's cluster Envoy's `credential_injector`, which adds
    /// `authorization: Bearer <file>` to each upstream request. The key never enters the
    /// filter, the plugin configuration or Envoy's logs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_file: Option<String>,
    /// The client's model → the provider's (an addition to ASM's resource). Keys are exact
    /// names, `prefix*`, or `*`; the most specific applies (exact, longest prefix, `*`) and
    /// decides the upstream model over `model`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub model_mapping: BTreeMap<String, String>,
}

/// Keys never reach a log line, not even through `{:?}`.
impl fmt::Debug for OpenAIConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenAIConfig")
            .field("model", &self.model)
            .field("stream", &self.stream)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("api_key_from_env", &self.api_key_from_env)
            .field("api_key_file", &self.api_key_file)
            .field("model_mapping", &self.model_mapping)
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RouteSpec {
    pub host: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gateways: Vec<String>,
    #[serde(default)]
    pub rules: Vec<RuleConfig>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RuleConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<MatchConfig>,
    #[serde(default)]
    pub backend_refs: Vec<BackendRefConfig>,
    /// Providers tried, in order, when the chosen backend fails (an addition to ASM's
    /// resource): Envoy retries through an aggregate cluster, and the filter's upstream part
    /// rewrites each attempt for its provider.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<FallbackConfig>,
    /// Budgets of tokens or requests (an addition to ASM's resource), counted by Envoy's rate
    /// limit service on Redis and so shared by every proxy: see `crate::limits`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub limits: Vec<LimitConfig>,
}

/// `rules[].limits[]`: at most `tokens` (or `requests`) per window, for each distinct value of
/// the `key` header (without a key: one budget for the rule).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LimitConfig {
    /// Unique within the rule; part of the budget's identity in the rate limit service.
    pub name: String,
    /// Tokens the providers reported (`usage.total_tokens`), counted after each answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<i64>,
    /// Requests, counted when each is let through.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests: Option<i64>,
    /// The window: the count starts again when it ends.
    pub per: LimitWindow,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<LimitKeyConfig>,
}

/// `rules[].limits[].key`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LimitKeyConfig {
    /// One budget per distinct value of this request header.
    pub header: String,
}

/// The windows Envoy's rate limit service counts in: fixed windows aligned on the Unix epoch
/// (a `month` is 30 days, a `year` 365 days).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LimitWindow {
    Second,
    Minute,
    Hour,
    Day,
    Week,
    Month,
    Year,
}

impl LimitWindow {
    /// The unit as the rate limit service's configuration writes it.
    pub fn name(self) -> &'static str {
        match self {
            LimitWindow::Second => "second",
            LimitWindow::Minute => "minute",
            LimitWindow::Hour => "hour",
            LimitWindow::Day => "day",
            LimitWindow::Week => "week",
            LimitWindow::Month => "month",
            LimitWindow::Year => "year",
        }
    }
}

/// `rules[].fallback`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FallbackConfig {
    /// `providerHost`s, tried in this order after the chosen backend, at most once each.
    #[serde(default)]
    pub providers: Vec<String>,
    /// The failures that move on to the next provider; `None`: all of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on: Option<Vec<FallbackOn>>,
}

/// A failure that makes Envoy try the next provider. Written `connect-failure`, `5xx` or `429`
/// (YAML reads a bare `429` as a number: both forms are accepted).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum FallbackOn {
    /// The provider cannot be reached (refused, reset before an answer).
    #[serde(rename = "connect-failure")]
    ConnectFailure,
    /// The provider answers 5xx (or drops the request before answering).
    #[serde(rename = "5xx")]
    ServerError,
    /// The provider rate-limits the request.
    #[serde(rename = "429")]
    RateLimited,
}

impl FallbackOn {
    const NAMES: &'static [&'static str] = &["connect-failure", "5xx", "429"];

    fn from_name(name: &str) -> Option<FallbackOn> {
        match name {
            "connect-failure" => Some(FallbackOn::ConnectFailure),
            "5xx" => Some(FallbackOn::ServerError),
            "429" => Some(FallbackOn::RateLimited),
            _ => None,
        }
    }
}

impl<'de> Deserialize<'de> for FallbackOn {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<FallbackOn, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = FallbackOn;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("one of connect-failure, 5xx, 429")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<FallbackOn, E> {
                FallbackOn::from_name(v).ok_or_else(|| E::unknown_variant(v, FallbackOn::NAMES))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<FallbackOn, E> {
                self.visit_str(&v.to_string())
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<FallbackOn, E> {
                self.visit_str(&v.to_string())
            }
        }
        d.deserialize_any(Visitor)
    }
}

impl FallbackConfig {
    /// `on`, or its default: every failure.
    pub fn triggers(&self) -> Vec<FallbackOn> {
        self.on.clone().unwrap_or_else(|| {
            vec![
                FallbackOn::ConnectFailure,
                FallbackOn::ServerError,
                FallbackOn::RateLimited,
            ]
        })
    }
}

/// The value of the `x-llm-fallback` request header (and filter state `llm.fallback`) that
/// marks a request routed by rule `rule` of route `namespace/name`: Envoy's route sends it to
/// the rule's aggregate cluster, and the upstream filter finds the rule's providers by it.
pub fn fallback_key(namespace: &str, name: &str, rule: usize) -> String {
    format!("{namespace}/{name}/{rule}")
}

/// The request header that carries `fallback_key`.
pub const FALLBACK_HEADER: &str = "x-llm-fallback";

/// The filter state the filter sets, before Envoy picks the route, to the `metadata.name` of
/// the provider it rewrote the request for. Envoy's wasm host stores it as
/// `PROVIDER_STATE_IN_ENVOY`; `llm-filter render envoy`'s provider routes require it, so no
/// request the filter did not rewrite reaches a provider's cluster.
pub const PROVIDER_STATE: &str = "llm.provider";
/// `PROVIDER_STATE` as Envoy names it (route `filter_state` matches, access logs).
pub const PROVIDER_STATE_IN_ENVOY: &str = "wasm.llm.provider";

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MatchConfig {
    #[serde(default)]
    pub headers: BTreeMap<String, StringMatchConfig>,
    /// A match on the `model` of the request body (an addition to ASM's resource). Routing on
    /// it needs the body first: `settings.forwardAfterBody`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<StringMatchConfig>,
}

/// Istio's `StringMatch`: exactly one of the three.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StringMatchConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BackendRefConfig {
    pub provider_host: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_rewrite: Option<String>,
}

/// Filter-wide settings (not a Kubernetes resource).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Settings {
    #[serde(default = "default_max_request_body_bytes")]
    pub max_request_body_bytes: u64,
    /// Add `stream_options.include_usage: true` to streamed requests that set no
    /// `stream_options`, so the provider reports token usage at the end of the stream.
    #[serde(default = "yes")]
    pub request_stream_usage: bool,
    /// Hold the request headers until the body has been read and checked, so an invalid body
    /// never opens a provider request, and send the exact `content-length`. Needs the Envoy
    /// wasm filter's `allow_on_headers_stop_iteration: true` (without it Envoy stops the whole
    /// request at the headers); `llm-filter render envoy` sets both.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub forward_after_body: bool,
    /// With `forwardAfterBody`: a request whose headers wait this long without Envoy handing
    /// the filter any body gets a 500 saying which Envoy setting is missing (instead of hanging).
    #[serde(
        default = "default_hold_timeout_ms",
        skip_serializing_if = "is_default_hold_timeout"
    )]
    pub hold_timeout_ms: u64,
    /// Clients may call an `LLMProvider`'s own host (its `defaultConfig`). `false` on an ingress
    /// gateway, which serves providers only through the `LLMRoute` hosts bound to it: there a
    /// provider host is answered 404, so no authorization written for the route hosts can be
    /// side-stepped by naming the provider. `llm-filter render` sets it for gateways.
    #[serde(default = "yes", skip_serializing_if = "is_yes")]
    pub direct_provider_calls: bool,
    /// A host is served written as `host:port` too, not only as `host`. `false` where the
    /// authorization in front of the filter matches the bare host only: an Istio
    /// `AuthorizationPolicy` with `hosts: [test.com]` matches exactly `test.com` (any case), so
    /// on an Istio gateway `test.com:80` would pass a DENY rule for `test.com`. `render istio`
    /// sets it for gateways.
    #[serde(default = "yes", skip_serializing_if = "is_yes")]
    pub host_with_port: bool,
}

fn is_yes(value: &bool) -> bool {
    *value
}

fn default_hold_timeout_ms() -> u64 {
    DEFAULT_HOLD_TIMEOUT_MS
}

fn is_default_hold_timeout(ms: &u64) -> bool {
    *ms == DEFAULT_HOLD_TIMEOUT_MS
}

/// `settings.holdTimeoutMs` by default.
pub const DEFAULT_HOLD_TIMEOUT_MS: u64 = 10_000;

fn yes() -> bool {
    true
}

fn default_max_request_body_bytes() -> u64 {
    DEFAULT_MAX_REQUEST_BODY_BYTES
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            max_request_body_bytes: DEFAULT_MAX_REQUEST_BODY_BYTES,
            request_stream_usage: true,
            forward_after_body: false,
            hold_timeout_ms: DEFAULT_HOLD_TIMEOUT_MS,
            direct_provider_calls: true,
            host_with_port: true,
        }
    }
}

/// Everything the plugin configuration holds, still as written.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FilterConfig {
    pub providers: Vec<ProviderManifest>,
    pub routes: Vec<RouteManifest>,
    pub settings: Settings,
}

/// The JSON form: `{"providers": [...], "routes": [...], "settings": {...}}`. Elements stay raw
/// so each manifest is parsed on its own and its errors name it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Bundle {
    #[serde(default)]
    providers: Vec<Value>,
    #[serde(default)]
    routes: Vec<Value>,
    #[serde(default)]
    settings: Option<Value>,
}

impl FilterConfig {
    /// Parses the plugin configuration: a multi-document YAML stream of manifests, or the JSON
    /// (or YAML) bundle object. Each document of a stream may itself be a bundle.
    pub fn parse(text: &str) -> Result<FilterConfig, ConfigError> {
        let mut config = FilterConfig::default();
        let mut settings_seen = false;
        for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
            let value = Value::deserialize(document).map_err(|e| {
                ConfigError::new(
                    format!("document {}", index + 1),
                    "",
                    format!("not valid YAML or JSON: {}", scrub(&e.to_string())),
                )
            })?;
            match &value {
                Value::Null => continue,
                Value::Mapping(map) if map.contains_key("kind") => config.add_manifest(value)?,
                Value::Mapping(_) => {
                    let bundle: Bundle = from_value(value, &format!("document {}", index + 1))?;
                    for provider in bundle.providers {
                        config.add_manifest_of(provider, KIND_PROVIDER)?;
                    }
                    for route in bundle.routes {
                        config.add_manifest_of(route, KIND_ROUTE)?;
                    }
                    if let Some(settings) = bundle.settings {
                        if settings_seen {
                            return Err(ConfigError::new("settings", "", "given more than once"));
                        }
                        settings_seen = true;
                        config.settings = from_value(settings, "settings")?;
                    }
                }
                _ => {
                    return Err(ConfigError::new(
                        format!("document {}", index + 1),
                        "",
                        "expected an LLMProvider or LLMRoute manifest, or an object with \
                         providers/routes/settings",
                    ))
                }
            }
        }
        Ok(config)
    }

    /// Adds another configuration's resources (several files make one configuration). Its
    /// settings win if it has any that differ from the defaults.
    pub fn extend(&mut self, other: FilterConfig) {
        self.providers.extend(other.providers);
        self.routes.extend(other.routes);
        if other.settings != Settings::default() {
            self.settings = other.settings;
        }
    }

    /// The JSON form (`{"providers": [...], "routes": [...], "settings": {...}}`): what Istio's
    /// `pluginConfig` carries.
    pub fn to_bundle_json(&self) -> serde_json::Value {
        serde_json::json!({
            "providers": self.providers,
            "routes": self.routes,
            "settings": self.settings,
        })
    }

    /// Every `openAIConfig` with the path of its field in the provider's spec.
    fn openai_configs_mut(
        provider: &mut ProviderManifest,
    ) -> impl Iterator<Item = (String, &mut OpenAIConfig)> {
        let configs = &mut provider.spec.configs;
        configs
            .default_config
            .iter_mut()
            .map(|c| ("configs.defaultConfig".to_string(), c))
            .chain(
                configs
                    .route_specific_configs
                    .iter_mut()
                    .map(|(name, c)| (format!("configs.routeSpecificConfigs.{name}"), c)),
            )
            .filter_map(|(field, c)| {
                Some((format!("{field}.openAIConfig"), c.openai_config.as_mut()?))
            })
    }

    /// Calls `edit(field, config)` on every `openAIConfig` of every provider; each error it
    /// returns (field suffix, message) is reported against that provider and field.
    fn edit_openai_configs(
        &mut self,
        mut edit: impl FnMut(&mut OpenAIConfig) -> Option<(&'static str, String)>,
    ) -> Result<(), crate::error::ConfigErrors> {
        let mut errors = Vec::new();
        for provider in &mut self.providers {
            let resource = provider.resource_name();
            for (field, config) in FilterConfig::openai_configs_mut(provider) {
                if let Some((suffix, message)) = edit(config) {
                    errors.push(ConfigError::new(
                        &resource,
                        format!("{field}.{suffix}"),
                        message,
                    ));
                }
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(crate::error::ConfigErrors(errors))
        }
    }

    /// Moves the value of each `apiKeyFromEnv` variable into `apiKey`, as the filter does when
    /// it loads its configuration (`lookup` is its Wasm VM's environment). A variable that is
    /// not set, or a config with both fields, is an error naming the field, never a value.
    pub fn resolve_env_api_keys(
        &mut self,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<(), crate::error::ConfigErrors> {
        self.edit_openai_configs(|config| {
            let name = config.api_key_from_env.take()?;
            if let Err(message) = check_api_key_source(config.api_key.as_deref(), &name) {
                return Some(("apiKeyFromEnv", message));
            }
            match lookup(&name).filter(|v| !v.is_empty()) {
                Some(value) => {
                    config.api_key = Some(value);
                    None
                }
                None => Some((
                    "apiKeyFromEnv",
                    format!(
                        "environment variable {name:?} is not set in the proxy's Wasm VM \
                         (Envoy: vm_config.environment_variables; Istio: WasmPlugin vmConfig.env)"
                    ),
                )),
            }
        })
    }

    /// The `apiKeyFile` of a provider (every config of a provider that uses one names the same
    /// file; `Policy::compile` refuses anything else).
    pub fn api_key_file(provider: &ProviderManifest) -> Option<&str> {
        let configs = &provider.spec.configs;
        configs
            .default_config
            .iter()
            .chain(configs.route_specific_configs.values())
            .find_map(|c| c.openai_config.as_ref()?.api_key_file.as_deref())
    }

    /// The environment variables the `apiKeyFromEnv` fields name, sorted, without repeats: what
    /// the proxy must pass to the Wasm VM.
    pub fn api_key_env_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .providers
            .iter()
            .flat_map(|p| {
                let configs = &p.spec.configs;
                configs
                    .default_config
                    .iter()
                    .chain(configs.route_specific_configs.values())
                    .filter_map(|c| c.openai_config.as_ref()?.api_key_from_env.clone())
                    .collect::<Vec<_>>()
            })
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// Replaces every `${NAME}` in an `apiKey` with `lookup(NAME)`; a name `lookup` does not
    /// know is an error naming it (and the field), never its value.
    pub fn substitute_api_keys(
        &mut self,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<(), crate::error::ConfigErrors> {
        self.edit_openai_configs(|config| {
            let key = config.api_key.as_mut()?;
            match expand(key, &lookup) {
                Ok(expanded) => {
                    *key = expanded;
                    None
                }
                Err(name) => Some((
                    "apiKey",
                    format!("environment variable {name:?} is not set"),
                )),
            }
        })
    }

    fn add_manifest_of(&mut self, value: Value, expected_kind: &str) -> Result<(), ConfigError> {
        let kind = value.get("kind").and_then(Value::as_str).unwrap_or("");
        if kind != expected_kind {
            return Err(ConfigError::new(
                resource_name(kind, &value),
                "kind",
                format!("expected {expected_kind}, found {kind:?}"),
            ));
        }
        self.add_manifest(value)
    }

    fn add_manifest(&mut self, value: Value) -> Result<(), ConfigError> {
        let kind = value.get("kind").and_then(Value::as_str).unwrap_or("");
        let resource = resource_name(kind, &value);
        let api_version = value.get("apiVersion").and_then(Value::as_str);
        if api_version != Some(API_VERSION) {
            let found = match api_version {
                Some(v) => format!("{v:?}"),
                None => "none".to_string(),
            };
            return Err(ConfigError::new(
                resource,
                "apiVersion",
                format!("expected {API_VERSION:?}, found {found}"),
            ));
        }
        match kind {
            KIND_PROVIDER => self.providers.push(from_value(value, &resource)?),
            KIND_ROUTE => self.routes.push(from_value(value, &resource)?),
            other => {
                return Err(ConfigError::new(
                    resource,
                    "kind",
                    format!("expected LLMProvider or LLMRoute, found {other:?}"),
                ))
            }
        }
        Ok(())
    }
}

/// `text` with each `${NAME}` replaced by `lookup(NAME)`; `Err(NAME)` for the first unknown one.
fn expand(text: &str, lookup: &impl Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        let Some(len) = rest[start + 2..].find('}') else {
            break;
        };
        let name = &rest[start + 2..start + 2 + len];
        out.push_str(&rest[..start]);
        out.push_str(&lookup(name).ok_or_else(|| name.to_string())?);
        rest = &rest[start + 3 + len..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Checks an `apiKeyFromEnv` name (and that `apiKey` is not set beside it).
pub fn check_api_key_source(api_key: Option<&str>, env_name: &str) -> Result<(), String> {
    let valid = env_name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && env_name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid {
        return Err(format!(
            "{env_name:?} is not an environment variable name ([A-Za-z_][A-Za-z0-9_]*)"
        ));
    }
    if api_key.is_some() {
        return Err("set either apiKey or apiKeyFromEnv, not both".to_string());
    }
    Ok(())
}

/// `Kind namespace/name` of a manifest not yet deserialized.
pub fn resource_name(kind: &str, value: &Value) -> String {
    let metadata = value.get("metadata");
    let name = metadata
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .unwrap_or("<unnamed>");
    let namespace = metadata
        .and_then(|m| m.get("namespace"))
        .and_then(Value::as_str)
        .filter(|ns| !ns.is_empty())
        .unwrap_or(DEFAULT_NAMESPACE);
    let kind = if kind.is_empty() { "<no kind>" } else { kind };
    format!("{kind} {namespace}/{name}")
}

/// Deserializes through YAML text so serde_yaml reports the field path of an error
/// (`spec.rules[0].backendRefs[1]: unknown field ...`). Runs once per manifest at configure time.
fn from_value<T: serde::de::DeserializeOwned>(
    value: Value,
    resource: &str,
) -> Result<T, ConfigError> {
    let text = serde_yaml::to_string(&value)
        .map_err(|e| ConfigError::new(resource, "", scrub(&e.to_string())))?;
    serde_yaml::from_str(&text).map_err(|e| {
        let message = e.to_string();
        // serde_yaml: "<path>: <message> at line L column C"; the location refers to our
        // re-serialized text, so it is dropped.
        let message = match message.find(" at line ") {
            Some(i) => &message[..i],
            None => &message,
        };
        let (path, message) = match message.split_once(": ") {
            Some((path, rest)) if !path.contains(' ') => (path, rest),
            _ => ("", message),
        };
        // Paths are given relative to `spec`, as the policy's own errors are.
        let path = path.strip_prefix("spec.").unwrap_or(path);
        ConfigError::new(resource, path, scrub(message))
    })
}

/// Error messages quote offending values; a misplaced key must not reach the log through them.
fn scrub(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(start) = rest.find("string \"") {
        let (head, tail) = rest.split_at(start + "string \"".len());
        out.push_str(head);
        match tail.find('"') {
            Some(end) => {
                out.push_str("…\"");
                rest = &tail[end + 1..];
            }
            None => {
                out.push('…');
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn api_keys_take_environment_variables() {
        let text = "apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMProvider
metadata: {name: p}
spec:
  host: p.example
  path: /v1/chat/completions
  configs:
    defaultConfig: {openAIConfig: {apiKey: '${A}'}}
    routeSpecificConfigs:
      vip: {openAIConfig: {apiKey: 'pre-${B}-${A}'}}
      other: {openAIConfig: {apiKey: '${MISSING}'}}
";
        let lookup = |name: &str| match name {
            "A" => Some("alpha".to_string()),
            "B" => Some("beta".to_string()),
            _ => None,
        };
        let mut config = FilterConfig::parse(text).unwrap();
        let errors = config.substitute_api_keys(lookup).unwrap_err();
        assert_eq!(
            errors.to_string(),
            "LLMProvider default/p: configs.routeSpecificConfigs.other.openAIConfig.apiKey: \
             environment variable \"MISSING\" is not set"
        );
        let configs = &config.providers[0].spec.configs;
        let key = |c: &ProviderConfig| c.openai_config.as_ref().unwrap().api_key.clone().unwrap();
        assert_eq!(key(configs.default_config.as_ref().unwrap()), "alpha");
        assert_eq!(
            key(&configs.route_specific_configs["vip"]),
            "pre-beta-alpha"
        );
        assert_eq!(
            expand("no vars, ${unclosed", &lookup).unwrap(),
            "no vars, ${unclosed"
        );
    }

    #[test]
    fn bundle_json_round_trips() {
        let text = include_str!("../tests/data/seed001-mesh.yaml");
        let config = FilterConfig::parse(text).unwrap();
        let json = config.to_bundle_json().to_string();
        assert_eq!(FilterConfig::parse(&json).unwrap(), config);
        let mut twice = config.clone();
        twice.extend(FilterConfig::parse(&json).unwrap());
        assert_eq!(twice.providers.len(), 2 * config.providers.len());
    }

    #[test]
    fn scrub_hides_quoted_strings() {
        assert_eq!(
            scrub("invalid type: string \"sk-secret\", expected a boolean"),
            "invalid type: string \"…\", expected a boolean"
        );
        assert_eq!(scrub("no strings here"), "no strings here");
        assert_eq!(scrub("string \"unterminated"), "string \"…");
    }
}
