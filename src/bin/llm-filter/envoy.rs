//! `render envoy`: a complete Envoy 1.40 bootstrap for the manifests.
//!
//! One listener (plain HTTP) whose HTTP connection manager runs the `--extend` filters, the
//! llm-filter (the manifests embedded as its configuration) and the router. The filter sets
//! `:authority` to the chosen provider host and Envoy re-selects the route, so the bootstrap
//! has one virtual host per `LLMProvider` host routing to that provider's TLS cluster, and a
//! catch-all for every other host. The output depends only on the inputs: resources keep the
//! order of the manifests, extends the order of the flags.

use std::path::{Path, PathBuf};

use llm_filter::config::{
    fallback_key, BackendRefConfig, FallbackOn, FilterConfig, Settings, FALLBACK_HEADER,
    PROVIDER_STATE_IN_ENVOY,
};
use llm_filter::metadata;
use serde_yaml::{Mapping, Value};

use crate::args::{EnvoyOptions, SocketAddr};
use crate::ratelimit;

/// The system CA bundle (Debian/Ubuntu/Alpine path) that verifies providers by default.
const SYSTEM_CA: &str = "/etc/ssl/certs/ca-certificates.crt";
/// Envoy answers 413 by itself once a buffered request body passes the listener's buffer
/// limit (1 MiB by default): it must stay above the filter's own limit.
const MIN_BUFFER_LIMIT: u64 = 16 * 1024 * 1024;
/// LLM answers take long; streamed answers pause between events.
const ROUTE_TIMEOUT: &str = "300s";
const CONNECT_TIMEOUT: &str = "10s";
const LISTENER: &str = "llm";
const WASM_FILTER: &str = "envoy.filters.http.wasm";
/// Envoy's HTTP filter that runs a native dynamic module (`--native`).
const NATIVE_FILTER: &str = "envoy.filters.http.dynamic_modules";
/// The dynamic module's name: Envoy opens `libllm_filter.so`.
pub(crate) const NATIVE_MODULE: &str = "llm_filter";
/// The native module's `metrics_namespace` (`llm_filter::native::METRICS_NAMESPACE`).
pub(crate) const NATIVE_METRICS_NAMESPACE: &str = "llm";
/// The downstream filter's name (wasm: its plugin name and root id).
const FILTER_NAME: &str = "llm-filter";
/// The root id of the filter's upstream part (see `filter.rs`).
pub(crate) const UPSTREAM_ROOT_ID: &str = "llm-filter-upstream";
const ROUTER: &str = "envoy.filters.http.router";
const CATCH_ALL: &str = "everything-else";
const ACCESS_LOG_FORMAT: &str =
    "[%START_TIME%] \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% \
%PROTOCOL%\" %RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION%ms \
authority=%REQ(:AUTHORITY)% cluster=%UPSTREAM_CLUSTER% upstream=%UPSTREAM_HOST% \
client=%DOWNSTREAM_REMOTE_ADDRESS% \
provider=%FILTER_STATE(wasm.llm.provider:PLAIN)% rule=%FILTER_STATE(wasm.llm.rule:PLAIN)% \
attempts=%FILTER_STATE(wasm.llm.attempts:PLAIN)% \
model=%FILTER_STATE(wasm.llm.model:PLAIN)% \
response_model=%FILTER_STATE(wasm.llm.response_model:PLAIN)% \
prompt_tokens=%FILTER_STATE(wasm.llm.prompt_tokens:PLAIN)% \
completion_tokens=%FILTER_STATE(wasm.llm.completion_tokens:PLAIN)% \
total_tokens=%FILTER_STATE(wasm.llm.total_tokens:PLAIN)%\n";

/// `stats_config`: Envoy's default tags plus the filter's metric tags
/// (`llm_filter::metrics::TAG_REGEXES`), so `/stats/prometheus` shows labelled series such as
/// `llm_prompt_tokens_total{provider,model,rule}`.
fn stats_config() -> Value {
    let tags = llm_filter::metrics::TAG_REGEXES
        .iter()
        .map(|(tag, regex)| map([("tag_name", (*tag).into()), ("regex", (*regex).into())]))
        .collect();
    map([
        ("use_all_default_tags", true.into()),
        ("stats_tags", Value::Sequence(tags)),
    ])
}

/// The bootstrap as YAML, preceded by a comment naming the command and files it came from.
/// `files` are the manifest files as given on the command line.
pub fn render(
    config: &FilterConfig,
    options: &EnvoyOptions,
    files: &[PathBuf],
) -> Result<String, String> {
    let extends = options
        .extends
        .iter()
        .map(|path| Extend::load(path))
        .collect::<Result<Vec<_>, _>>()?;
    let providers = plan_providers(config, options)?;
    let budgets = ratelimit::plan(config);
    ratelimit::require_service(&budgets, options.ratelimit.is_some(), "--ratelimit")?;
    check_names(&providers, &extends, options.ratelimit.is_some())?;
    // The bootstrap lets the filter hold headers until the body is checked, so it asks for it.
    let mut embedded = config.clone();
    embedded.settings.forward_after_body = true;
    if gateway_only(config) {
        embedded.settings.direct_provider_calls = false;
    }
    let configuration = embedded_configuration(&embedded)?;
    let buffer_limit = buffer_limit(&config.settings);

    let fallbacks = plan_fallbacks(config, &providers)?;
    let mut clusters: Vec<Value> = providers
        .iter()
        .map(|p| {
            let tagged = fallbacks.iter().any(|f| f.clusters.contains(&p.name));
            provider_cluster(p, options, buffer_limit, tagged)
        })
        .collect();
    let upstream_filter = if options.native {
        native_filter(UPSTREAM_ROOT_ID, &configuration)
    } else {
        wasm_upstream_filter(&options.wasm, &configuration, &config.api_key_env_names())
    };
    clusters.extend(
        fallbacks
            .iter()
            .map(|f| aggregate_cluster(f, &upstream_filter, buffer_limit)),
    );
    if let Some(service) = &options.ratelimit {
        clusters.push(ratelimit::cluster(&service.address));
    }
    clusters.extend(extends.iter().flat_map(|e| e.clusters.iter().cloned()));

    let mut virtual_hosts: Vec<Value> = providers
        .iter()
        .map(|p| {
            let limits = ratelimit::limits_for_provider(&budgets, &p.host);
            provider_virtual_host(p, &fallbacks, ratelimit::per_filter_config(&limits))
        })
        .collect();
    let mut catch_all = None;
    for extend in &extends {
        for vh in &extend.virtual_hosts {
            if domains_of(vh).iter().any(|d| d == "*") {
                catch_all = Some(vh.clone());
            } else {
                virtual_hosts.push(vh.clone());
            }
        }
    }
    virtual_hosts.push(catch_all.unwrap_or_else(default_catch_all));

    let mut http_filters: Vec<Value> = extends
        .iter()
        .flat_map(|e| e.http_filters.iter().cloned())
        .collect();
    http_filters.push(if options.native {
        native_filter(FILTER_NAME, &configuration)
    } else {
        wasm_filter(&options.wasm, &configuration, &config.api_key_env_names())
    });
    // After the llm-filter, whose filter state says which budgets a request spends from.
    if let Some(service) = &options.ratelimit {
        http_filters.push(ratelimit::http_filter(ratelimit::CLUSTER, service.failure));
    }
    http_filters.push(map([
        ("name", ROUTER.into()),
        (
            "typed_config",
            typed("envoy.extensions.filters.http.router.v3.Router", []),
        ),
    ]));

    let bootstrap = map([
        ("admin", map([("address", socket_address(&options.admin))])),
        ("stats_config", stats_config()),
        (
            "static_resources",
            map([
                (
                    "listeners",
                    Value::Sequence(vec![listener(
                        &options.listen,
                        buffer_limit,
                        virtual_hosts,
                        http_filters,
                        options
                            .ratelimit
                            .as_ref()
                            .map(|_| ratelimit::local_reply_config()),
                    )]),
                ),
                ("clusters", Value::Sequence(clusters)),
            ]),
        ),
    ]);
    let mut bootstrap = bootstrap;
    let secrets: Vec<Value> = providers.iter().filter_map(key_file_secret).collect();
    if let (false, Some(resources)) = (
        secrets.is_empty(),
        bootstrap
            .get_mut("static_resources")
            .and_then(Value::as_mapping_mut),
    ) {
        resources.insert("secrets".into(), Value::Sequence(secrets));
    }
    let yaml = serde_yaml::to_string(&bootstrap)
        .map_err(|e| format!("render envoy: cannot write YAML: {e}"))?;
    Ok(format!(
        "{}{yaml}",
        header(options, files, &providers, &extends)
    ))
}

/// True when the manifests are a gateway's: they have routes, and every one is bound to a
/// gateway (`spec.gateways`, not `mesh`). A gateway serves providers only through those routes'
/// hosts, so the authorization written for them cannot be side-stepped by naming a provider's
/// own host (`settings.directProviderCalls: false`).
pub(crate) fn gateway_only(config: &FilterConfig) -> bool {
    !config.routes.is_empty()
        && config.routes.iter().all(|route| {
            !route.spec.gateways.is_empty() && route.spec.gateways.iter().all(|g| g != "mesh")
        })
}

/// What the bootstrap needs to know about one provider.
#[derive(Debug)]
pub(crate) struct ProviderPlan {
    /// `LLMProvider ns/name`.
    pub(crate) resource: String,
    /// `metadata.name`: what the filter sets `PROVIDER_STATE_IN_ENVOY` to.
    pub(crate) provider: String,
    /// Cluster and virtual host name: `metadata.name`, or `name.namespace` when two providers
    /// in different namespaces share a name.
    pub(crate) name: String,
    /// The provider host, normalized as the filter does (lower case, no trailing dot).
    pub(crate) host: String,
    /// Every name the filter may set `:authority` to for this provider: its host, then each
    /// distinct `hostRewrite` that targets it.
    pub(crate) authorities: Vec<String>,
    /// `--endpoint`: where to connect instead of `host:443`.
    pub(crate) endpoint: Option<SocketAddr>,
    /// `apiKeyFile`: injected by Envoy's `credential_injector` on this provider's cluster.
    pub(crate) key_file: Option<String>,
}

impl ProviderPlan {
    /// The name of the static generic secret holding this provider's key file.
    fn key_secret_name(&self) -> String {
        format!("{}-api-key", self.name)
    }
}

/// The host as the filter compares it: trimmed, lower case, without a trailing dot.
pub(crate) fn normalize_host(host: &str) -> String {
    host.trim().trim_end_matches('.').to_ascii_lowercase()
}

/// `(:authority the filter sends, provider host)` of a backendRef: its `hostRewrite`, else the
/// provider host, both normalized.
pub(crate) fn backend_authority(backend: &BackendRefConfig) -> (String, String) {
    let provider = normalize_host(&backend.provider_host);
    let authority = backend
        .host_rewrite
        .as_deref()
        .map(normalize_host)
        .unwrap_or_else(|| provider.clone());
    (authority, provider)
}

fn plan_providers(
    config: &FilterConfig,
    options: &EnvoyOptions,
) -> Result<Vec<ProviderPlan>, String> {
    let mut plans: Vec<ProviderPlan> = Vec::with_capacity(config.providers.len());
    for provider in &config.providers {
        let name = &provider.metadata.name;
        let shared = config
            .providers
            .iter()
            .filter(|p| p.metadata.name == *name)
            .count()
            > 1;
        let host = normalize_host(&provider.spec.host);
        plans.push(ProviderPlan {
            resource: provider.resource_name(),
            provider: name.clone(),
            name: if shared {
                format!("{name}.{}", provider.metadata.namespace())
            } else {
                name.clone()
            },
            authorities: vec![host.clone()],
            endpoint: options
                .endpoints
                .iter()
                .find(|(h, _)| normalize_host(h) == host)
                .map(|(_, addr)| addr.clone()),
            key_file: FilterConfig::api_key_file(provider).map(str::to_string),
            host,
        });
    }
    for host in options.endpoints.keys() {
        if !plans.iter().any(|p| p.host == normalize_host(host)) {
            let known: Vec<&str> = plans.iter().map(|p| p.host.as_str()).collect();
            return Err(format!(
                "--endpoint {host}=...: no LLMProvider has host {host:?} (hosts: {})",
                known.join(", ")
            ));
        }
    }
    // The filter sets `:authority` to `hostRewrite`; Envoy then routes on that name, so it
    // must lead to the same provider's cluster.
    for route in &config.routes {
        for (r, rule) in route.spec.rules.iter().enumerate() {
            for (b, backend) in rule.backend_refs.iter().enumerate() {
                let Some(rewrite) = &backend.host_rewrite else {
                    continue;
                };
                let rewrite = normalize_host(rewrite);
                let target = normalize_host(&backend.provider_host);
                let at = format!(
                    "{}: rules[{r}].backendRefs[{b}].hostRewrite",
                    route.resource_name()
                );
                if let Some(owner) = plans
                    .iter()
                    .find(|p| p.host != target && p.authorities.contains(&rewrite))
                {
                    return Err(format!(
                        "{at}: {rewrite:?} also leads to {} (Envoy routes on the rewritten \
                         host, so one name cannot reach two providers)",
                        owner.resource
                    ));
                }
                if let Some(plan) = plans.iter_mut().find(|p| p.host == target) {
                    if !plan.authorities.contains(&rewrite) {
                        plan.authorities.push(rewrite);
                    }
                }
            }
        }
    }
    Ok(plans)
}

/// One rule with `fallback`, as chosen backend `first`: an aggregate cluster of the providers'
/// clusters in the order Envoy tries them, and the route that sends the rule's marked requests
/// there with a retry policy that moves one provider on per failure.
#[derive(Debug)]
pub(crate) struct FallbackPlan {
    /// The aggregate cluster's name.
    pub(crate) name: String,
    /// `x-llm-fallback` of the rule's requests (`llm_filter::config::fallback_key`).
    pub(crate) key: String,
    /// The first provider's cluster (its virtual host gets the route).
    pub(crate) first: String,
    /// The first provider's `metadata.name`, which the filter marks the request with.
    pub(crate) provider: String,
    /// The `:authority` the filter sends that provider for this rule: the backendRef's
    /// `hostRewrite`, else the provider host.
    pub(crate) authority: String,
    /// The sub-clusters: `first`, then the fallback providers' clusters, in order.
    pub(crate) clusters: Vec<String>,
    pub(crate) triggers: Vec<FallbackOn>,
}

/// Every (rule with fallback, backendRef) pair. Providers whose key is an `apiKeyFile` cannot
/// take part: Envoy's credential injector runs per cluster, not per attempt.
pub(crate) fn plan_fallbacks(
    config: &FilterConfig,
    providers: &[ProviderPlan],
) -> Result<Vec<FallbackPlan>, String> {
    let mut plans = Vec::new();
    for route in &config.routes {
        for (r, rule) in route.spec.rules.iter().enumerate() {
            let Some(fallback) = &rule.fallback else {
                continue;
            };
            let key = fallback_key(route.metadata.namespace(), &route.metadata.name, r);
            let plan_of = |host: &str, at: String| -> Result<&ProviderPlan, String> {
                let host = normalize_host(host);
                let plan = providers
                    .iter()
                    .find(|p| p.host == host)
                    .ok_or_else(|| format!("{at}: no LLMProvider has host {host:?}"))?;
                if plan.key_file.is_some() {
                    return Err(format!(
                        "{at}: {} takes its key from apiKeyFile, which Envoy injects per \
                         cluster, not per fallback attempt: use apiKey or apiKeyFromEnv for \
                         providers in a fallback",
                        plan.resource
                    ));
                }
                Ok(plan)
            };
            let resource = route.resource_name();
            let mut rest = Vec::new();
            for (f, host) in fallback.providers.iter().enumerate() {
                rest.push(
                    plan_of(
                        host,
                        format!("{resource}: rules[{r}].fallback.providers[{f}]"),
                    )?
                    .name
                    .clone(),
                );
            }
            for (b, backend) in rule.backend_refs.iter().enumerate() {
                let plan = plan_of(
                    &backend.provider_host,
                    format!("{resource}: rules[{r}].backendRefs[{b}].providerHost"),
                )?;
                let first = plan.name.clone();
                let provider = plan.provider.clone();
                let mut clusters = vec![first.clone()];
                clusters.extend(rest.iter().cloned());
                plans.push(FallbackPlan {
                    name: format!(
                        "fallback.{}.{}.{r}.{first}",
                        route.metadata.namespace(),
                        route.metadata.name
                    ),
                    key: key.clone(),
                    first,
                    provider,
                    authority: normalize_host(
                        backend
                            .host_rewrite
                            .as_deref()
                            .unwrap_or(&backend.provider_host),
                    ),
                    clusters,
                    triggers: fallback.triggers(),
                });
            }
        }
    }
    Ok(plans)
}

/// Cluster and virtual host names must be unique, and two virtual hosts may not claim one
/// domain: Envoy would refuse the bootstrap with a less helpful message.
fn check_names(
    providers: &[ProviderPlan],
    extends: &[Extend],
    ratelimit: bool,
) -> Result<(), String> {
    let mut clusters: Vec<(String, String)> = Vec::new();
    if ratelimit {
        clusters.push((
            ratelimit::CLUSTER.to_string(),
            "the rate limit service (--ratelimit)".to_string(),
        ));
    }
    let mut virtual_hosts: Vec<(String, String)> = Vec::new();
    let mut domains: Vec<(String, String)> = Vec::new();
    for p in providers {
        clusters.push((p.name.clone(), p.resource.clone()));
        virtual_hosts.push((p.name.clone(), p.resource.clone()));
        for a in &p.authorities {
            domains.push((a.clone(), p.resource.clone()));
            domains.push((format!("{a}:*"), p.resource.clone()));
        }
    }
    virtual_hosts.push((CATCH_ALL.to_string(), "the default catch-all".to_string()));
    let mut catch_all_from: Option<String> = None;
    for e in extends {
        let file = e.path.display().to_string();
        for (i, c) in e.clusters.iter().enumerate() {
            let name = name_of(c);
            if let Some((_, owner)) = clusters.iter().find(|(n, _)| *n == name) {
                return Err(format!(
                    "{file}: clusters[{i}]: the name {name:?} is already taken by {owner}"
                ));
            }
            clusters.push((name, file.clone()));
        }
        for (i, vh) in e.virtual_hosts.iter().enumerate() {
            let name = name_of(vh);
            let vh_domains = domains_of(vh);
            if vh_domains.iter().any(|d| d == "*") {
                if let Some(other) = &catch_all_from {
                    return Err(format!(
                        "{file}: virtual_hosts[{i}]: a catch-all (\"*\") virtual host is \
                         already given by {other}"
                    ));
                }
                catch_all_from = Some(file.clone());
                virtual_hosts.retain(|(n, _)| n != CATCH_ALL);
            }
            if let Some((_, owner)) = virtual_hosts.iter().find(|(n, _)| *n == name) {
                return Err(format!(
                    "{file}: virtual_hosts[{i}]: the name {name:?} is already taken by {owner}"
                ));
            }
            virtual_hosts.push((name, file.clone()));
            for d in vh_domains {
                let d = d.to_ascii_lowercase();
                if let Some((_, owner)) = domains.iter().find(|(n, _)| *n == d) {
                    return Err(format!(
                        "{file}: virtual_hosts[{i}]: domain {d:?} is already routed by {owner}"
                    ));
                }
                domains.push((d, file.clone()));
            }
        }
    }
    Ok(())
}

/// The filter's configuration: the manifests (API keys expanded) as a multi-document YAML
/// stream, plus a `settings` document when the settings are not the defaults.
fn embedded_configuration(config: &FilterConfig) -> Result<String, String> {
    let err = |e: serde_yaml::Error| format!("render envoy: cannot write the manifests: {e}");
    let mut documents = Vec::new();
    for provider in &config.providers {
        documents.push(serde_yaml::to_string(provider).map_err(err)?);
    }
    for route in &config.routes {
        documents.push(serde_yaml::to_string(route).map_err(err)?);
    }
    if config.settings != Settings::default() {
        let settings = map([(
            "settings",
            serde_yaml::to_value(&config.settings).map_err(err)?,
        )]);
        documents.push(serde_yaml::to_string(&settings).map_err(err)?);
    }
    Ok(documents.join("---\n"))
}

/// The listener's and clusters' buffer limit: 16 MiB, or twice the filter's body limit when
/// that is larger (Envoy's field is 32-bit).
pub(crate) fn buffer_limit(settings: &Settings) -> u64 {
    settings
        .max_request_body_bytes
        .saturating_mul(2)
        .clamp(MIN_BUFFER_LIMIT, u64::from(u32::MAX))
}

/// A mapping with its keys in the given order.
pub(crate) fn map<const N: usize>(entries: [(&str, Value); N]) -> Value {
    let mut m = Mapping::new();
    for (k, v) in entries {
        m.insert(Value::String(k.to_string()), v);
    }
    Value::Mapping(m)
}

/// `typed_config` of the given proto type, with more fields.
pub(crate) fn typed<const N: usize>(type_name: &str, fields: [(&str, Value); N]) -> Value {
    let mut m = Mapping::new();
    m.insert(
        "@type".into(),
        format!("type.googleapis.com/{type_name}").into(),
    );
    for (k, v) in fields {
        m.insert(Value::String(k.to_string()), v);
    }
    Value::Mapping(m)
}

fn strings(items: &[String]) -> Value {
    Value::Sequence(items.iter().map(|s| s.as_str().into()).collect())
}

pub(crate) fn socket_address(addr: &SocketAddr) -> Value {
    map([(
        "socket_address",
        map([
            ("address", addr.address.as_str().into()),
            ("port_value", u64::from(addr.port).into()),
        ]),
    )])
}

fn name_of(v: &Value) -> String {
    v.get("name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

fn domains_of(v: &Value) -> Vec<String> {
    v.get("domains")
        .and_then(Value::as_sequence)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(str::to_string)
        .collect()
}

fn listener(
    listen: &SocketAddr,
    buffer_limit: u64,
    virtual_hosts: Vec<Value>,
    http_filters: Vec<Value>,
    local_reply_config: Option<Value>,
) -> Value {
    let access_log = map([
        ("name", "envoy.access_loggers.stdout".into()),
        (
            "typed_config",
            typed(
                "envoy.extensions.access_loggers.stream.v3.StdoutAccessLog",
                [(
                    "log_format",
                    map([(
                        "text_format_source",
                        map([("inline_string", ACCESS_LOG_FORMAT.into())]),
                    )]),
                )],
            ),
        ),
    ]);
    let mut hcm = typed(
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        [
            ("stat_prefix", LISTENER.into()),
            ("access_log", Value::Sequence(vec![access_log])),
            (
                "route_config",
                map([
                    ("name", LISTENER.into()),
                    ("virtual_hosts", Value::Sequence(virtual_hosts)),
                ]),
            ),
            ("http_filters", Value::Sequence(http_filters)),
        ],
    );
    if let (Some(replies), Value::Mapping(m)) = (local_reply_config, &mut hcm) {
        m.insert("local_reply_config".into(), replies);
    }
    map([
        ("name", LISTENER.into()),
        ("address", socket_address(listen)),
        ("per_connection_buffer_limit_bytes", buffer_limit.into()),
        (
            "filter_chains",
            Value::Sequence(vec![map([(
                "filters",
                Value::Sequence(vec![map([
                    (
                        "name",
                        "envoy.filters.network.http_connection_manager".into(),
                    ),
                    ("typed_config", hcm),
                ])]),
            )])]),
        ),
    ])
}

/// The wasm filter. `env_keys`: the variables `apiKeyFromEnv` names, passed from Envoy's own
/// environment into the Wasm VM (`vm_config.environment_variables.host_env_keys`).
fn wasm_filter(wasm: &str, configuration: &str, env_keys: &[String]) -> Value {
    let mut vm_config = map([
        ("vm_id", "llm-filter".into()),
        ("runtime", "envoy.wasm.runtime.v8".into()),
        ("code", map([("local", map([("filename", wasm.into())]))])),
    ]);
    if let (Value::Mapping(vm), false) = (&mut vm_config, env_keys.is_empty()) {
        vm.insert(
            "environment_variables".into(),
            map([("host_env_keys", env_keys.to_vec().into())]),
        );
    }
    map([
        ("name", WASM_FILTER.into()),
        (
            "typed_config",
            typed(
                "envoy.extensions.filters.http.wasm.v3.Wasm",
                [(
                    "config",
                    map([
                        ("name", "llm-filter".into()),
                        ("root_id", "llm-filter".into()),
                        // settings.forwardAfterBody: the filter pauses at the headers and
                        // still receives the body.
                        ("allow_on_headers_stop_iteration", true.into()),
                        ("vm_config", vm_config),
                        (
                            "configuration",
                            typed(
                                "google.protobuf.StringValue",
                                [("value", configuration.into())],
                            ),
                        ),
                    ]),
                )],
            ),
        ),
    ])
}

/// The filter as Envoy's native dynamic module (`render envoy --native`): Envoy loads
/// `lib<NATIVE_MODULE>.so` from `ENVOY_DYNAMIC_MODULES_SEARCH_PATH` and hands it `filter_name`
/// (`llm-filter`, or `llm-filter-upstream` for the upstream part, as the wasm root ids) and the
/// same configuration string. The module reads `apiKeyFromEnv` variables from Envoy's own
/// environment and holds headers for the body without a setting.
pub(crate) fn native_filter(filter_name: &str, configuration: &str) -> Value {
    map([
        ("name", NATIVE_FILTER.into()),
        (
            "typed_config",
            typed(
                "envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter",
                [
                    (
                        "dynamic_module_config",
                        // The module's metric families then read `llm.requests_total` and so
                        // on, as the wasm build's (docs/native.md).
                        map([
                            ("name", NATIVE_MODULE.into()),
                            ("metrics_namespace", NATIVE_METRICS_NAMESPACE.into()),
                        ]),
                    ),
                    ("filter_name", filter_name.into()),
                    (
                        "filter_config",
                        typed(
                            "google.protobuf.StringValue",
                            [("value", configuration.into())],
                        ),
                    ),
                ],
            ),
        ),
    ])
}

/// The filter's upstream part: the same module and configuration in the same VM, under the
/// root id that makes it rewrite each fallback attempt.
pub(crate) fn wasm_upstream_filter(wasm: &str, configuration: &str, env_keys: &[String]) -> Value {
    let mut filter = wasm_filter(wasm, configuration, env_keys);
    if let Some(config) = filter
        .get_mut("typed_config")
        .and_then(|t| t.get_mut("config"))
        .and_then(Value::as_mapping_mut)
    {
        config.insert("name".into(), UPSTREAM_ROOT_ID.into());
        config.insert("root_id".into(), UPSTREAM_ROOT_ID.into());
        config.remove("allow_on_headers_stop_iteration");
    }
    filter
}

/// `apiKeyFile`: upstream filters of the provider's cluster. Envoy's `credential_injector` sets
/// `authorization: Bearer <file content>` on each request to this cluster, replacing what the
/// client sent; it runs after the router has logged the request, so the key appears in no log.
fn key_injector_filters(p: &ProviderPlan) -> Value {
    Value::Sequence(vec![
        map([
            ("name", "envoy.filters.http.credential_injector".into()),
            (
                "typed_config",
                typed(
                    "envoy.extensions.filters.http.credential_injector.v3.CredentialInjector",
                    [
                        ("overwrite", true.into()),
                        (
                            "credential",
                            map([
                                ("name", "envoy.http.injected_credentials.generic".into()),
                                (
                                    "typed_config",
                                    typed(
                                        "envoy.extensions.http.injected_credentials.generic.v3.Generic",
                                        [
                                            (
                                                "credential",
                                                map([("name", p.key_secret_name().into())]),
                                            ),
                                            ("header", "Authorization".into()),
                                            ("header_value_prefix", "Bearer ".into()),
                                        ],
                                    ),
                                ),
                            ]),
                        ),
                    ],
                ),
            ),
        ]),
        map([
            ("name", "envoy.filters.http.upstream_codec".into()),
            (
                "typed_config",
                typed(
                    "envoy.extensions.filters.http.upstream_codec.v3.UpstreamCodec",
                    [],
                ),
            ),
        ]),
    ])
}

/// The static generic secret that `key_injector_filters` reads: the key file, read by Envoy.
fn key_file_secret(p: &ProviderPlan) -> Option<Value> {
    let file = p.key_file.as_deref()?;
    Some(map([
        ("name", p.key_secret_name().into()),
        (
            "generic_secret",
            map([("secret", map([("filename", file.into())]))]),
        ),
    ]))
}

/// After the filter has set `:authority` to a provider host (or a `hostRewrite` of it),
/// Envoy re-selects the route and lands here. Every route to the provider requires the mark
/// the filter sets on the requests it rewrote (`rewritten_for`), so a request that reached this
/// virtual host any other way (an `:authority` the filter does not serve, a filter that is not
/// there) gets a 404 and never the provider's cluster, its key injector or its TLS. A request
/// of a rule with fallback also carries `x-llm-fallback` and goes to the rule's aggregate
/// cluster instead. `per_filter`: the rate limit entries of the budgets whose requests come
/// here, on every route to the provider.
fn provider_virtual_host(
    p: &ProviderPlan,
    fallbacks: &[FallbackPlan],
    per_filter: Option<Value>,
) -> Value {
    let mut routes: Vec<Value> = fallbacks
        .iter()
        .filter(|f| f.first == p.name)
        .map(fallback_route)
        .collect();
    routes.push(map([
        (
            "match",
            map([
                ("prefix", "/".into()),
                ("filter_state", rewritten_for(&p.provider)),
            ]),
        ),
        (
            "route",
            map([
                ("cluster", p.name.as_str().into()),
                ("timeout", ROUTE_TIMEOUT.into()),
                // No idle timeout: a streamed answer may pause between events.
                ("idle_timeout", "0s".into()),
            ]),
        ),
    ]));
    if let Some(per_filter) = per_filter {
        for route in &mut routes {
            if let Value::Mapping(m) = route {
                m.insert("typed_per_filter_config".into(), per_filter.clone());
            }
        }
    }
    routes.push(not_rewritten_route());
    map([
        ("name", p.name.as_str().into()),
        // Exactly the names the filter sets: Envoy's host matching never decides alone.
        ("domains", strings(&p.authorities)),
        ("routes", Value::Sequence(routes)),
    ])
}

/// The route match that only requests the filter rewrote for `provider` pass: the filter
/// state it sets before Envoy picks the route. A client cannot set filter state.
pub(crate) fn rewritten_for(provider: &str) -> Value {
    Value::Sequence(vec![map([
        ("key", PROVIDER_STATE_IN_ENVOY.into()),
        ("string_match", map([("exact", provider.into())])),
    ])])
}

/// The last route of a provider's virtual host: what the filter did not rewrite.
fn not_rewritten_route() -> Value {
    map([
        ("match", map([("prefix", "/".into())])),
        (
            "direct_response",
            map([
                ("status", 404u64.into()),
                ("body", map([("inline_string", NOT_REWRITTEN_BODY.into())])),
            ]),
        ),
    ])
}

/// OpenAI's error shape, as the filter's own answers.
const NOT_REWRITTEN_BODY: &str = r#"{"error":{"message":"This host is served only through llm-filter, which did not rewrite this request.","type":"invalid_request_error","code":"route_not_found"}}"#;

/// Envoy's `retry_on` for the configured triggers, and the retriable status codes.
fn retry_on(triggers: &[FallbackOn]) -> (String, Vec<u64>) {
    let mut on: Vec<&str> = Vec::new();
    let mut codes = Vec::new();
    for trigger in triggers {
        let (names, code): (&[&str], _) = match trigger {
            FallbackOn::ConnectFailure => (&["connect-failure", "refused-stream"], None),
            FallbackOn::ServerError => (&["5xx"], None),
            FallbackOn::RateLimited => (&["retriable-status-codes"], Some(429)),
        };
        for name in names {
            if !on.contains(name) {
                on.push(name);
            }
        }
        if let Some(code) = code {
            if !codes.contains(&code) {
                codes.push(code);
            }
        }
    }
    (on.join(","), codes)
}

/// The route of one fallback: the marked requests go to the aggregate cluster; each failure
/// moves on to the next priority (the next provider), never back to one already tried.
pub(crate) fn fallback_route(f: &FallbackPlan) -> Value {
    let (on, codes) = retry_on(&f.triggers);
    let tries = f.clusters.len().saturating_sub(1) as u64;
    let mut policy = Mapping::new();
    policy.insert("retry_on".into(), on.into());
    if !codes.is_empty() {
        policy.insert(
            "retriable_status_codes".into(),
            Value::Sequence(codes.into_iter().map(Value::from).collect()),
        );
    }
    policy.insert("num_retries".into(), tries.into());
    policy.insert(
        "retry_priority".into(),
        map([
            ("name", "envoy.retry_priorities.previous_priorities".into()),
            (
                "typed_config",
                typed(
                    "envoy.extensions.retry.priority.previous_priorities.v3.PreviousPrioritiesConfig",
                    [("update_frequency", 1u64.into())],
                ),
            ),
        ]),
    );
    policy.insert(
        "retry_host_predicate".into(),
        Value::Sequence(vec![map([
            ("name", "envoy.retry_host_predicates.previous_hosts".into()),
            (
                "typed_config",
                typed(
                    "envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate",
                    [],
                ),
            ),
        ])]),
    );
    policy.insert("host_selection_retry_max_attempts".into(), 5u64.into());
    // The next provider is a different service: no reason to wait long before asking it.
    policy.insert(
        "retry_back_off".into(),
        map([
            ("base_interval", "0.01s".into()),
            ("max_interval", "0.05s".into()),
        ]),
    );
    map([
        (
            "match",
            map([
                ("prefix", "/".into()),
                (
                    "headers",
                    Value::Sequence(vec![map([
                        ("name", FALLBACK_HEADER.into()),
                        ("string_match", map([("exact", f.key.as_str().into())])),
                    ])]),
                ),
                ("filter_state", rewritten_for(&f.provider)),
            ]),
        ),
        (
            "route",
            map([
                ("cluster", f.name.as_str().into()),
                ("timeout", ROUTE_TIMEOUT.into()),
                ("idle_timeout", "0s".into()),
                ("retry_policy", Value::Mapping(policy)),
            ]),
        ),
        // The marker has chosen this route; the upstream part reads the rule from filter
        // state, so Envoy drops the header before the first attempt (no host call for it).
        (
            "request_headers_to_remove",
            Value::Sequence(vec![FALLBACK_HEADER.into()]),
        ),
    ])
}

/// The aggregate cluster of one fallback: its sub-clusters' priorities in order, and the
/// filter's upstream part, which rewrites every attempt for the provider it goes to.
pub(crate) fn aggregate_cluster(
    f: &FallbackPlan,
    upstream_filter: &Value,
    buffer_limit: u64,
) -> Value {
    map([
        ("name", f.name.as_str().into()),
        ("connect_timeout", CONNECT_TIMEOUT.into()),
        ("lb_policy", "CLUSTER_PROVIDED".into()),
        ("per_connection_buffer_limit_bytes", buffer_limit.into()),
        (
            "cluster_type",
            map([
                ("name", "envoy.clusters.aggregate".into()),
                (
                    "typed_config",
                    typed(
                        "envoy.extensions.clusters.aggregate.v3.ClusterConfig",
                        [("clusters", strings(&f.clusters))],
                    ),
                ),
            ]),
        ),
        (
            "typed_extension_protocol_options",
            map([(
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                typed(
                    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    [
                        (
                            "use_downstream_protocol_config",
                            Value::Mapping(Mapping::new()),
                        ),
                        (
                            "http_filters",
                            Value::Sequence(vec![upstream_filter.clone(), upstream_codec()]),
                        ),
                    ],
                ),
            )]),
        ),
    ])
}

fn upstream_codec() -> Value {
    map([
        ("name", "envoy.filters.http.upstream_codec".into()),
        (
            "typed_config",
            typed(
                "envoy.extensions.filters.http.upstream_codec.v3.UpstreamCodec",
                [],
            ),
        ),
    ])
}

/// Hosts the manifests do not name. The filter lets their requests pass untouched, and with
/// nowhere to pass them to Envoy answers 404, as a gateway does for a host it does not serve.
/// An `--extend` virtual host with domain `*` replaces this one (e.g. a sidecar's
/// `local-service`).
fn default_catch_all() -> Value {
    map([
        ("name", CATCH_ALL.into()),
        ("domains", strings(&["*".to_string()])),
        (
            "routes",
            Value::Sequence(vec![map([
                ("match", map([("prefix", "/".into())])),
                (
                    "direct_response",
                    map([
                        ("status", 404u64.into()),
                        (
                            "body",
                            map([("inline_string", "no route for this host\n".into())]),
                        ),
                    ]),
                ),
            ])]),
        ),
    ])
}

/// Plain HTTP from the client, HTTPS to the provider: SNI and certificate check name the
/// provider host even when `--endpoint` connects elsewhere.
/// `tagged`: the provider takes part in a fallback, so its endpoint carries
/// `filter_metadata.llm.provider` (the filter's upstream part tells attempts apart by it).
pub(crate) fn provider_cluster(
    p: &ProviderPlan,
    options: &EnvoyOptions,
    buffer_limit: u64,
    tagged: bool,
) -> Value {
    let default_endpoint = SocketAddr::new(&p.host, 443);
    let endpoint = p.endpoint.as_ref().unwrap_or(&default_endpoint);
    let is_ip = endpoint.address.parse::<std::net::IpAddr>().is_ok();
    let mut cluster = Mapping::new();
    cluster.insert("name".into(), p.name.as_str().into());
    if is_ip {
        cluster.insert("type".into(), "STATIC".into());
    } else {
        cluster.insert("type".into(), "LOGICAL_DNS".into());
        cluster.insert("dns_lookup_family".into(), "V4_PREFERRED".into());
    }
    cluster.insert("connect_timeout".into(), CONNECT_TIMEOUT.into());
    cluster.insert(
        "per_connection_buffer_limit_bytes".into(),
        buffer_limit.into(),
    );
    cluster.insert(
        "load_assignment".into(),
        map([
            ("cluster_name", p.name.as_str().into()),
            (
                "endpoints",
                Value::Sequence(vec![map([(
                    "lb_endpoints",
                    Value::Sequence(vec![lb_endpoint(endpoint, tagged.then_some(&p.host))]),
                )])]),
            ),
        ]),
    );
    // HTTP/2 when the provider offers it in ALPN, else HTTP/1.1.
    let auto_config = map([
        ("http_protocol_options", Value::Mapping(Mapping::new())),
        ("http2_protocol_options", Value::Mapping(Mapping::new())),
    ]);
    let protocol_options = match &p.key_file {
        None => typed(
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            [("auto_config", auto_config)],
        ),
        Some(_) => typed(
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            [
                ("auto_config", auto_config),
                ("http_filters", key_injector_filters(p)),
            ],
        ),
    };
    cluster.insert(
        "typed_extension_protocol_options".into(),
        map([(
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            protocol_options,
        )]),
    );
    let ca = options.ca.as_deref().unwrap_or(SYSTEM_CA);
    cluster.insert(
        "transport_socket".into(),
        map([
            ("name", "envoy.transport_sockets.tls".into()),
            (
                "typed_config",
                typed(
                    "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                    [
                        ("sni", p.host.as_str().into()),
                        (
                            "common_tls_context",
                            map([(
                                "validation_context",
                                map([
                                    ("trusted_ca", map([("filename", ca.into())])),
                                    (
                                        "match_typed_subject_alt_names",
                                        Value::Sequence(vec![map([
                                            ("san_type", "DNS".into()),
                                            ("matcher", map([("exact", p.host.as_str().into())])),
                                        ])]),
                                    ),
                                ]),
                            )]),
                        ),
                    ],
                ),
            ),
        ]),
    );
    Value::Mapping(cluster)
}

fn lb_endpoint(endpoint: &SocketAddr, provider: Option<&String>) -> Value {
    let endpoint = map([("endpoint", map([("address", socket_address(endpoint))]))]);
    match (endpoint, provider) {
        (Value::Mapping(mut m), Some(host)) => {
            m.insert(
                "metadata".into(),
                map([(
                    "filter_metadata",
                    map([(
                        metadata::NAMESPACE,
                        map([(metadata::PROVIDER_KEY, host.as_str().into())]),
                    )]),
                )]),
            );
            Value::Mapping(m)
        }
        (endpoint, _) => endpoint,
    }
}

/// An `--extend` file: Envoy fragments added around what the manifests give.
#[derive(Debug)]
struct Extend {
    path: PathBuf,
    /// Inserted before the llm-filter, in order (RBAC, JWT, ext_authz run first).
    http_filters: Vec<Value>,
    /// Appended after the provider clusters.
    clusters: Vec<Value>,
    /// Inserted before the catch-all; one with domain `*` replaces the default catch-all.
    virtual_hosts: Vec<Value>,
}

impl Extend {
    fn load(path: &Path) -> Result<Extend, String> {
        let file = path.display();
        let text =
            std::fs::read_to_string(path).map_err(|e| format!("{file}: cannot read: {e}"))?;
        Extend::parse(path, &text)
    }

    fn parse(path: &Path, text: &str) -> Result<Extend, String> {
        let file = path.display();
        let doc: Value =
            serde_yaml::from_str(text).map_err(|e| format!("{file}: not valid YAML: {e}"))?;
        let mut extend = Extend {
            path: path.to_path_buf(),
            http_filters: Vec::new(),
            clusters: Vec::new(),
            virtual_hosts: Vec::new(),
        };
        let entries = match doc {
            Value::Null => return Ok(extend),
            Value::Mapping(m) => m,
            _ => {
                return Err(format!(
                    "{file}: expected a mapping with http_filters, clusters and/or virtual_hosts"
                ))
            }
        };
        for (key, value) in entries {
            let key = key.as_str().unwrap_or_default().to_string();
            let list = match key.as_str() {
                "http_filters" => &mut extend.http_filters,
                "clusters" => &mut extend.clusters,
                "virtual_hosts" => &mut extend.virtual_hosts,
                _ => {
                    return Err(format!(
                        "{file}: unknown key {key:?} (expected http_filters, clusters, \
                         virtual_hosts)"
                    ))
                }
            };
            let items = match value {
                Value::Sequence(items) => items,
                Value::Null => Vec::new(),
                _ => return Err(format!("{file}: {key}: expected a list")),
            };
            for (i, item) in items.into_iter().enumerate() {
                let name = item.get("name").and_then(Value::as_str).unwrap_or_default();
                if !item.is_mapping() || name.is_empty() {
                    return Err(format!(
                        "{file}: {key}[{i}]: expected a mapping with a name"
                    ));
                }
                if key == "http_filters" && (name == ROUTER) {
                    return Err(format!(
                        "{file}: {key}[{i}]: {ROUTER} is added by render envoy, after the \
                         llm-filter; leave it out"
                    ));
                }
                if key == "virtual_hosts" && domains_of(&item).is_empty() {
                    return Err(format!("{file}: {key}[{i}]: expected a list of domains"));
                }
                list.push(item);
            }
        }
        Ok(extend)
    }
}

/// The opening comment: what generated the file, from what, and how to run it.
fn header(
    options: &EnvoyOptions,
    files: &[PathBuf],
    providers: &[ProviderPlan],
    extends: &[Extend],
) -> String {
    let defaults = EnvoyOptions::default();
    let mut command = vec!["llm-filter render envoy".to_string()];
    command.extend(files.iter().map(|f| f.display().to_string()));
    command.extend(
        extends
            .iter()
            .map(|e| format!("--extend {}", e.path.display())),
    );
    if options.native {
        command.push("--native".to_string());
    } else if options.wasm != defaults.wasm {
        command.push(format!("--wasm {}", options.wasm));
    }
    let addr = |a: &SocketAddr| {
        if a.address.contains(':') {
            format!("[{}]:{}", a.address, a.port)
        } else {
            format!("{}:{}", a.address, a.port)
        }
    };
    if options.listen != defaults.listen {
        command.push(format!("--listen {}", addr(&options.listen)));
    }
    if options.admin != defaults.admin {
        command.push(format!("--admin {}", addr(&options.admin)));
    }
    for (host, a) in &options.endpoints {
        command.push(format!("--endpoint {host}={}", addr(a)));
    }
    if let Some(ca) = &options.ca {
        command.push(format!("--ca {ca}"));
    }
    if let Some(service) = &options.ratelimit {
        command.push(format!("--ratelimit {}", addr(&service.address)));
        if service.failure == ratelimit::Failure::Closed {
            command.push("--ratelimit-failure closed".to_string());
        }
    }

    let list = |paths: Vec<String>| paths.join(", ");
    let mut out = format!(
        "# Generated by `llm-filter render envoy` from {}.\n",
        list(files.iter().map(|f| f.display().to_string()).collect())
    );
    if !extends.is_empty() {
        out.push_str(&format!(
            "# Extended with {}.\n",
            list(
                extends
                    .iter()
                    .map(|e| e.path.display().to_string())
                    .collect()
            )
        ));
    }
    out.push_str("# Re-render instead of editing:\n");
    out.push_str(&format!("#   {}\n#\n", command.join(" ")));
    let extend_filters = if extends.iter().any(|e| !e.http_filters.is_empty()) {
        "the extend files' filters, then "
    } else {
        ""
    };
    out.push_str(&format!(
        "# An Envoy 1.40 bootstrap. The listener ({}, plain HTTP) runs {extend_filters}the\n\
         # llm-filter (the manifests are embedded as its configuration), then the router. The\n\
         # filter sets :authority to the chosen provider host and Envoy routes on it to that\n\
         # provider's cluster, which speaks HTTPS (SNI and certificate name: the provider host;\n\
         # CA: {}):\n",
        addr(&options.listen),
        options.ca.as_deref().unwrap_or(SYSTEM_CA),
    ));
    for p in providers {
        let target = match &p.endpoint {
            Some(a) => format!("{} (--endpoint)", addr(a)),
            None => format!("{}:443", p.host),
        };
        out.push_str(&format!(
            "#   {} -> cluster {} -> {target}\n",
            p.authorities.join(", "),
            p.name
        ));
    }
    let extend_catch_all = extends.iter().any(|e| {
        e.virtual_hosts
            .iter()
            .any(|v| domains_of(v).iter().any(|d| d == "*"))
    });
    out.push_str(if extend_catch_all {
        "#   any other host -> the extend files' catch-all virtual host\n"
    } else {
        "#   any other host -> 404 (this Envoy serves nothing else)\n"
    });
    if let Some(service) = &options.ratelimit {
        out.push_str(&format!(
            "# Budgets (LLMRoute rules' limits): Envoy's rate limit filter, after the llm-filter,\n\
             # asks the rate limit service at {} (cluster {}; configure it with `llm-filter render\n\
             # ratelimit`) and {} when it cannot answer.\n",
            addr(&service.address),
            ratelimit::CLUSTER,
            match service.failure {
                ratelimit::Failure::Open => "lets requests through uncounted",
                ratelimit::Failure::Closed => "refuses requests (503)",
            }
        ));
    }
    let module = if options.native {
        format!(
            "Envoy loads the filter's native\n\
             # module lib{NATIVE_MODULE}.so from the directory ENVOY_DYNAMIC_MODULES_SEARCH_PATH names\n\
             # (else the directory it starts in)."
        )
    } else {
        format!(
            "Envoy opens the wasm module at\n\
             #   {}\n\
             # (a relative path is relative to the directory Envoy starts in).",
            options.wasm
        )
    };
    out.push_str(&format!(
        "# Admin interface: {}. {module} The apiKey values are\n\
         # embedded as rendered (${{NAME}} expanded from the environment): keep a file holding\n\
         # real keys out of version control.\n",
        addr(&options.admin),
    ));
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use llm_filter::policy::Policy;

    const MESH: &str = include_str!("../../../tests/data/seed001-mesh.yaml");
    const GATEWAY: &str = include_str!("../../../tests/data/seed000-gateway.yaml");

    fn config(text: &str) -> FilterConfig {
        let mut config = FilterConfig::parse(text).unwrap();
        config
            .substitute_api_keys(|name| Some(format!("sk-{}", name.replace(' ', "-"))))
            .unwrap();
        Policy::compile(&config).unwrap();
        config
    }

    fn files() -> Vec<PathBuf> {
        vec![PathBuf::from("mesh.yaml")]
    }

    fn rendered(text: &str, options: &EnvoyOptions) -> Value {
        let yaml = render(&config(text), options, &files()).unwrap();
        serde_yaml::from_str(&yaml).unwrap()
    }

    fn hcm(doc: &Value) -> &Value {
        &doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    }

    fn embedded(doc: &Value) -> String {
        let filters = hcm(doc)["http_filters"].as_sequence().unwrap();
        let wasm = filters.iter().find(|f| f["name"] == WASM_FILTER).unwrap();
        wasm["typed_config"]["config"]["configuration"]["value"]
            .as_str()
            .unwrap()
            .to_string()
    }

    fn cluster<'a>(doc: &'a Value, name: &str) -> &'a Value {
        doc["static_resources"]["clusters"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no cluster {name}"))
    }

    fn vhost_names(doc: &Value) -> Vec<String> {
        hcm(doc)["route_config"]["virtual_hosts"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(name_of)
            .collect()
    }

    fn filter_names(doc: &Value) -> Vec<String> {
        hcm(doc)["http_filters"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(name_of)
            .collect()
    }

    #[test]
    fn embedded_configuration_is_accepted_by_the_filter_and_round_trips() {
        for seed in [MESH, GATEWAY] {
            let config = config(seed);
            let doc = rendered(seed, &EnvoyOptions::default());
            let text = embedded(&doc);
            Policy::from_text(&text).unwrap();
            let mut expected = config;
            expected.settings.forward_after_body = true;
            // Seed 000's only route is bound to a gateway: a gateway's manifests.
            expected.settings.direct_provider_calls = seed != GATEWAY;
            assert_eq!(FilterConfig::parse(&text).unwrap(), expected);
            assert!(
                text.contains("  forwardAfterBody: true\n"),
                "the bootstrap's filter holds headers until the body is read: {text}"
            );
            assert_eq!(
                text.contains("  directProviderCalls: false\n"),
                seed == GATEWAY,
                "{text}"
            );
            assert!(
                text.starts_with("apiVersion: istio.alibabacloud.com/v1beta1\nkind: LLMProvider\n")
            );
        }
        let text = embedded(&rendered(MESH, &EnvoyOptions::default()));
        assert!(text.contains("apiKey: sk-dashscope-API_KEY"), "{text}");
        assert_eq!(text.matches("\n---\n").count(), 4, "{text}");
    }

    #[test]
    fn non_default_settings_are_embedded_and_raise_the_buffer_limit() {
        let mut config = config(MESH);
        config.settings.max_request_body_bytes = 12 * 1024 * 1024;
        let yaml = render(&config, &EnvoyOptions::default(), &files()).unwrap();
        let doc: Value = serde_yaml::from_str(&yaml).unwrap();
        let text = embedded(&doc);
        assert!(
            text.contains("---\nsettings:\n  maxRequestBodyBytes: 12582912\n"),
            "{text}"
        );
        config.settings.forward_after_body = true;
        assert_eq!(FilterConfig::parse(&text).unwrap(), config);
        let limit = 24 * 1024 * 1024;
        assert_eq!(
            doc["static_resources"]["listeners"][0]["per_connection_buffer_limit_bytes"],
            limit
        );
        assert_eq!(
            cluster(&doc, "moonshot")["per_connection_buffer_limit_bytes"],
            limit
        );
        assert_eq!(
            buffer_limit(&Settings {
                max_request_body_bytes: u64::MAX,
                ..Settings::default()
            }),
            u64::from(u32::MAX)
        );
    }

    #[test]
    fn one_virtual_host_and_tls_cluster_per_provider() {
        let doc = rendered(MESH, &EnvoyOptions::default());
        assert_eq!(
            vhost_names(&doc),
            ["dashscope-qwen", "moonshot", "everything-else"]
        );
        let vhosts = hcm(&doc)["route_config"]["virtual_hosts"].clone();
        // Exactly the name the filter sets.
        assert_eq!(
            vhosts[1]["domains"],
            serde_yaml::from_str::<Value>("[api.moonshot.cn]").unwrap()
        );
        let routes = vhosts[1]["routes"].as_sequence().unwrap();
        assert_eq!(routes.len(), 2);
        // Only what the filter rewrote for this provider reaches its cluster.
        assert_eq!(
            routes[0]["match"]["filter_state"],
            serde_yaml::from_str::<Value>(
                "[{key: wasm.llm.provider, string_match: {exact: moonshot}}]"
            )
            .unwrap()
        );
        let route = &routes[0]["route"];
        assert_eq!(route["cluster"], "moonshot");
        assert_eq!(route["timeout"], "300s");
        assert_eq!(route["idle_timeout"], "0s");
        assert_eq!(
            routes[1]["match"],
            serde_yaml::from_str::<Value>("{prefix: /}").unwrap()
        );
        assert_eq!(routes[1]["direct_response"]["status"], 404);
        let body: serde_json::Value = serde_json::from_str(
            routes[1]["direct_response"]["body"]["inline_string"]
                .as_str()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(body["error"]["code"], "route_not_found");
        // The default catch-all: 404 for hosts the manifests do not name.
        assert_eq!(vhosts[2]["domains"][0], "*");
        assert_eq!(vhosts[2]["routes"][0]["direct_response"]["status"], 404);

        let c = cluster(&doc, "moonshot");
        assert_eq!(c["type"], "LOGICAL_DNS");
        let sa = &c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
            ["socket_address"];
        assert_eq!(sa["address"], "api.moonshot.cn");
        assert_eq!(sa["port_value"], 443);
        let tls = &c["transport_socket"]["typed_config"];
        assert_eq!(tls["sni"], "api.moonshot.cn");
        let vc = &tls["common_tls_context"]["validation_context"];
        assert_eq!(vc["trusted_ca"]["filename"], SYSTEM_CA);
        assert_eq!(
            vc["match_typed_subject_alt_names"][0]["matcher"]["exact"],
            "api.moonshot.cn"
        );
        assert!(c["typed_extension_protocol_options"]
            ["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]["auto_config"]
            .is_mapping());
        assert_eq!(filter_names(&doc), [WASM_FILTER, ROUTER]);
        let listener = &doc["static_resources"]["listeners"][0];
        assert_eq!(listener["per_connection_buffer_limit_bytes"], 16_777_216);
        assert_eq!(listener["address"]["socket_address"]["address"], "0.0.0.0");
        assert_eq!(listener["address"]["socket_address"]["port_value"], 10000);
        assert_eq!(
            doc["admin"]["address"]["socket_address"]["port_value"],
            9901
        );
    }

    #[test]
    fn endpoint_and_ca_options_keep_sni_and_san() {
        let mut options = EnvoyOptions {
            wasm: "/abs/llm_filter.wasm".into(),
            listen: SocketAddr::new("127.0.0.1", 0),
            admin: SocketAddr::new("::1", 9000),
            ca: Some("/tmp/ca.pem".into()),
            ..EnvoyOptions::default()
        };
        options.endpoints.insert(
            "dashscope.aliyuncs.com.".into(),
            SocketAddr::new("127.0.0.1", 8443),
        );
        options.endpoints.insert(
            "api.moonshot.cn".into(),
            SocketAddr::new("mock.internal", 9443),
        );
        let yaml = render(&config(MESH), &options, &files()).unwrap();
        let doc: Value = serde_yaml::from_str(&yaml).unwrap();
        let c = cluster(&doc, "dashscope-qwen");
        assert_eq!(c["type"], "STATIC");
        assert!(c.get("dns_lookup_family").is_none());
        let sa = &c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
            ["socket_address"];
        assert_eq!(sa["address"], "127.0.0.1");
        assert_eq!(sa["port_value"], 8443);
        let tls = &c["transport_socket"]["typed_config"];
        assert_eq!(tls["sni"], "dashscope.aliyuncs.com");
        let vc = &tls["common_tls_context"]["validation_context"];
        assert_eq!(vc["trusted_ca"]["filename"], "/tmp/ca.pem");
        assert_eq!(
            vc["match_typed_subject_alt_names"][0]["matcher"]["exact"],
            "dashscope.aliyuncs.com"
        );
        // A host name as the endpoint needs DNS.
        assert_eq!(cluster(&doc, "moonshot")["type"], "LOGICAL_DNS");
        assert_eq!(doc["admin"]["address"]["socket_address"]["address"], "::1");
        assert!(yaml.contains(
            "#   llm-filter render envoy mesh.yaml --wasm /abs/llm_filter.wasm --listen 127.0.0.1:0 \
             --admin [::1]:9000 --endpoint api.moonshot.cn=mock.internal:9443 \
             --endpoint dashscope.aliyuncs.com.=127.0.0.1:8443 --ca /tmp/ca.pem\n"
        ), "{yaml}");

        options
            .endpoints
            .insert("nowhere.example".into(), SocketAddr::new("127.0.0.1", 1));
        let error = render(&config(MESH), &options, &files()).unwrap_err();
        assert!(
            error.starts_with("--endpoint nowhere.example=...: no LLMProvider has host"),
            "{error}"
        );
    }

    #[test]
    fn output_is_deterministic_and_starts_with_a_comment() {
        let options = EnvoyOptions::default();
        let a = render(&config(MESH), &options, &files()).unwrap();
        let b = render(&config(MESH), &options, &files()).unwrap();
        assert_eq!(a, b);
        assert!(
            a.starts_with("# Generated by `llm-filter render envoy` from mesh.yaml."),
            "{a}"
        );
        assert!(
            a.contains("#   demo-llm-server")
                || a.contains("-> cluster moonshot -> api.moonshot.cn:443"),
            "{a}"
        );
    }

    #[test]
    fn host_rewrite_to_another_name_gets_a_domain_on_its_provider() {
        let text = GATEWAY.replace(
            "hostRewrite: dashscope.aliyuncs.com",
            "hostRewrite: llm.internal",
        );
        let doc = rendered(&text, &EnvoyOptions::default());
        let vhosts = hcm(&doc)["route_config"]["virtual_hosts"].clone();
        assert_eq!(
            vhosts[0]["domains"],
            serde_yaml::from_str::<Value>("[dashscope.aliyuncs.com, llm.internal]").unwrap()
        );
        // A rewrite to another provider's host would reach the wrong cluster.
        let two = format!(
            "{MESH}---\n{}",
            "apiVersion: istio.alibabacloud.com/v1beta1\nkind: LLMRoute\nmetadata: {name: r}\n\
             spec:\n  host: x.example\n  rules:\n  - backendRefs:\n    - providerHost: api.moonshot.cn\n      hostRewrite: dashscope.aliyuncs.com\n"
        );
        let error = render(&config(&two), &EnvoyOptions::default(), &files()).unwrap_err();
        assert!(
            error.starts_with(
                "LLMRoute default/r: rules[0].backendRefs[0].hostRewrite: \"dashscope.aliyuncs.com\" also leads to LLMProvider default/dashscope-qwen"
            ),
            "{error}"
        );
    }

    #[test]
    fn providers_sharing_a_name_get_namespaced_clusters() {
        let text = format!(
            "{MESH}---\n{}",
            "apiVersion: istio.alibabacloud.com/v1beta1\nkind: LLMProvider\n\
             metadata: {name: moonshot, namespace: other}\n\
             spec: {host: moonshot.example, path: /v1/chat/completions}\n"
        );
        let doc = rendered(&text, &EnvoyOptions::default());
        assert_eq!(
            vhost_names(&doc),
            [
                "dashscope-qwen",
                "moonshot.default",
                "moonshot.other",
                "everything-else"
            ]
        );
        assert_eq!(
            cluster(&doc, "moonshot.other")["transport_socket"]["typed_config"]["sni"],
            "moonshot.example"
        );
    }

    fn write_extend(name: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("llm-filter-extend-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    const RBAC: &str = "http_filters:\n- name: envoy.filters.http.rbac\n  typed_config:\n    \
        '@type': type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC\n";
    const LOCAL: &str = "virtual_hosts:\n- name: local\n  domains: ['*']\n  routes:\n  \
        - match: {prefix: /}\n    route: {cluster: local-service}\nclusters:\n- name: local-service\n  type: STATIC\n";

    #[test]
    fn extends_add_filters_before_the_llm_filter_and_clusters_and_virtual_hosts() {
        let rbac = write_extend("rbac.yaml", RBAC);
        let local = write_extend("local.yaml", LOCAL);
        let extra = write_extend(
            "extra.yaml",
            "http_filters:\n- name: envoy.filters.http.jwt_authn\nvirtual_hosts:\n- name: intranet\n  domains: [intranet.example]\n",
        );
        let options = EnvoyOptions {
            extends: vec![rbac, local, extra],
            ..EnvoyOptions::default()
        };
        let doc = rendered(MESH, &options);
        assert_eq!(
            filter_names(&doc),
            [
                "envoy.filters.http.rbac",
                "envoy.filters.http.jwt_authn",
                WASM_FILTER,
                ROUTER
            ]
        );
        assert_eq!(
            vhost_names(&doc),
            ["dashscope-qwen", "moonshot", "intranet", "local"],
            "the extend's `*` replaces the default catch-all and stays last"
        );
        let clusters: Vec<String> = doc["static_resources"]["clusters"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(name_of)
            .collect();
        assert_eq!(clusters, ["dashscope-qwen", "moonshot", "local-service"]);
        let yaml = render(&config(MESH), &options, &files()).unwrap();
        assert!(
            yaml.contains("any other host -> the extend files' catch-all"),
            "{yaml}"
        );
    }

    #[test]
    fn bad_extends_are_one_clear_line_naming_the_file() {
        for (text, message) in [
            ("http_filters: [", "not valid YAML"),
            ("- a\n", "expected a mapping with http_filters"),
            ("listeners: []\n", "unknown key \"listeners\""),
            ("clusters: {name: x}\n", "clusters: expected a list"),
            ("clusters:\n- type: STATIC\n", "clusters[0]: expected a mapping with a name"),
            ("http_filters:\n- name: envoy.filters.http.router\n", "http_filters[0]: envoy.filters.http.router is added"),
            ("virtual_hosts:\n- name: v\n", "virtual_hosts[0]: expected a list of domains"),
            ("clusters:\n- name: moonshot\n", "clusters[0]: the name \"moonshot\" is already taken by LLMProvider default/moonshot"),
            ("virtual_hosts:\n- name: v\n  domains: ['API.moonshot.cn:*']\n", "virtual_hosts[0]: domain \"api.moonshot.cn:*\" is already routed by LLMProvider default/moonshot"),
        ] {
            let path = write_extend("bad.yaml", text);
            let options = EnvoyOptions {
                extends: vec![path.clone()],
                ..EnvoyOptions::default()
            };
            let error = render(&config(MESH), &options, &files()).unwrap_err();
            let want = format!("{}: {message}", path.display());
            assert!(error.starts_with(&want), "{text:?}: {error}");
            assert!(!error.contains('\n'), "{error}");
        }
        let local = write_extend("local2.yaml", LOCAL);
        let again = write_extend(
            "local3.yaml",
            &LOCAL
                .replace("name: local-service", "name: other")
                .replace("name: local\n", "name: local-b\n"),
        );
        let options = EnvoyOptions {
            extends: vec![local.clone(), again.clone()],
            ..EnvoyOptions::default()
        };
        let error = render(&config(MESH), &options, &files()).unwrap_err();
        assert!(
            error.contains("a catch-all (\"*\") virtual host is already given by"),
            "{error}"
        );
        let missing = EnvoyOptions {
            extends: vec![PathBuf::from("/nonexistent/extend.yaml")],
            ..EnvoyOptions::default()
        };
        let error = render(&config(MESH), &missing, &files()).unwrap_err();
        assert!(
            error.starts_with("/nonexistent/extend.yaml: cannot read:"),
            "{error}"
        );
    }

    pub(crate) const FALLBACK: &str = "apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMProvider
metadata: {name: dashscope-qwen}
spec:
  host: dashscope.aliyuncs.com
  path: /compatible-mode/v1/chat/completions
  configs: {defaultConfig: {openAIConfig: {model: qwen-turbo, apiKey: sk-a}}}
---
apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMProvider
metadata: {name: moonshot}
spec:
  host: api.moonshot.cn
  path: /v1/chat/completions
  configs: {defaultConfig: {openAIConfig: {model: moonshot-v1-8k, apiKey: sk-b}}}
---
apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMRoute
metadata: {name: ha, namespace: team}
spec:
  host: test.com
  rules:
  - name: ha
    backendRefs: [{providerHost: dashscope.aliyuncs.com}]
    fallback: {providers: [api.moonshot.cn], on: [connect-failure, 429]}
";

    #[test]
    fn native_loads_the_dynamic_module_with_the_same_configuration_downstream_and_upstream() {
        let wasm = rendered(FALLBACK, &EnvoyOptions::default());
        let native = rendered(
            FALLBACK,
            &EnvoyOptions {
                native: true,
                ..EnvoyOptions::default()
            },
        );
        let configuration = embedded(&wasm);
        let filters = hcm(&native)["http_filters"].as_sequence().unwrap();
        assert!(filters.iter().all(|f| f["name"] != WASM_FILTER));
        let module = filters.iter().find(|f| f["name"] == NATIVE_FILTER).unwrap();
        let typed = &module["typed_config"];
        assert_eq!(
            typed["@type"],
            "type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter"
        );
        assert_eq!(typed["dynamic_module_config"]["name"], NATIVE_MODULE);
        assert_eq!(typed["filter_name"], FILTER_NAME);
        assert_eq!(
            typed["filter_config"]["@type"],
            "type.googleapis.com/google.protobuf.StringValue"
        );
        assert_eq!(
            typed["filter_config"]["value"].as_str(),
            Some(configuration.as_str())
        );
        let aggregate = cluster(&native, "fallback.team.ha.0.dashscope-qwen");
        let upstream = &aggregate["typed_extension_protocol_options"]
            ["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]["http_filters"][0];
        assert_eq!(upstream["name"], NATIVE_FILTER);
        assert_eq!(upstream["typed_config"]["filter_name"], UPSTREAM_ROOT_ID);
        assert_eq!(
            upstream["typed_config"]["filter_config"]["value"].as_str(),
            Some(configuration.as_str())
        );
        // Everything else is the same bootstrap: routes, clusters, filter state names.
        let without_filters = |doc: &Value| {
            let mut doc = doc.clone();
            let text = serde_yaml::to_string(&doc).unwrap();
            assert!(text.contains("wasm.llm.provider"));
            if let Some(hcm) = doc["static_resources"]["listeners"][0]["filter_chains"][0]
                ["filters"][0]["typed_config"]
                .as_mapping_mut()
            {
                hcm.remove("http_filters");
            }
            let clusters = doc["static_resources"]["clusters"]
                .as_sequence_mut()
                .unwrap();
            for c in clusters.iter_mut() {
                if let Some(o) = c["typed_extension_protocol_options"]
                    ["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
                    .as_mapping_mut()
                {
                    o.remove("http_filters");
                }
            }
            doc
        };
        assert_eq!(without_filters(&wasm), without_filters(&native));
    }

    #[test]
    fn fallback_gets_an_aggregate_cluster_a_retry_route_and_tagged_endpoints() {
        let doc = rendered(FALLBACK, &EnvoyOptions::default());
        let name = "fallback.team.ha.0.dashscope-qwen";
        let aggregate = cluster(&doc, name);
        assert_eq!(
            aggregate["cluster_type"]["typed_config"]["clusters"],
            serde_yaml::from_str::<Value>("[dashscope-qwen, moonshot]").unwrap()
        );
        let options = &aggregate["typed_extension_protocol_options"]
            ["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"];
        let filters = options["http_filters"].as_sequence().unwrap();
        assert_eq!(filters.len(), 2);
        assert_eq!(
            filters[0]["typed_config"]["config"]["root_id"],
            UPSTREAM_ROOT_ID
        );
        assert_eq!(filters[1]["name"], "envoy.filters.http.upstream_codec");
        for (cluster_name, host) in [
            ("dashscope-qwen", "dashscope.aliyuncs.com"),
            ("moonshot", "api.moonshot.cn"),
        ] {
            let endpoint =
                &cluster(&doc, cluster_name)["load_assignment"]["endpoints"][0]["lb_endpoints"][0];
            assert_eq!(
                endpoint["metadata"]["filter_metadata"]["llm"]["provider"],
                host
            );
        }
        let vhosts = hcm(&doc)["route_config"]["virtual_hosts"]
            .as_sequence()
            .unwrap();
        let dashscope = vhosts
            .iter()
            .find(|v| v["name"] == "dashscope-qwen")
            .unwrap();
        let routes = dashscope["routes"].as_sequence().unwrap();
        assert_eq!(routes.len(), 3, "{routes:?}");
        let first = &routes[0];
        assert_eq!(first["match"]["headers"][0]["name"], "x-llm-fallback");
        assert_eq!(
            first["match"]["filter_state"][0]["key"],
            "wasm.llm.provider"
        );
        assert_eq!(
            first["match"]["filter_state"][0]["string_match"]["exact"],
            "dashscope-qwen"
        );
        assert_eq!(
            first["match"]["headers"][0]["string_match"]["exact"],
            "team/ha/0"
        );
        let retry = &first["route"]["retry_policy"];
        assert_eq!(first["route"]["cluster"], name);
        // Envoy drops the marker before the first attempt; the upstream part does not need it.
        assert_eq!(
            first["request_headers_to_remove"],
            Value::Sequence(vec!["x-llm-fallback".into()])
        );
        assert_eq!(
            retry["retry_on"],
            "connect-failure,refused-stream,retriable-status-codes"
        );
        assert_eq!(retry["retriable_status_codes"][0], 429);
        assert_eq!(retry["num_retries"], 1);
        assert_eq!(
            retry["retry_priority"]["name"],
            "envoy.retry_priorities.previous_priorities"
        );
        assert_eq!(routes[1]["route"]["cluster"], "dashscope-qwen");
        let moonshot = vhosts.iter().find(|v| v["name"] == "moonshot").unwrap();
        assert_eq!(moonshot["routes"].as_sequence().unwrap().len(), 2);
    }

    #[test]
    fn budgets_get_the_rate_limit_filter_after_the_llm_filter_and_entries_on_their_routes() {
        let text = crate::ratelimit::tests::budgets().replace(
            "    backendRefs: [{providerHost: dashscope.aliyuncs.com, hostRewrite: qwen.internal}]\n",
            "    backendRefs: [{providerHost: dashscope.aliyuncs.com, hostRewrite: qwen.internal}]\n    fallback: {providers: [api.moonshot.cn]}\n",
        );
        let error = render(&config(&text), &EnvoyOptions::default(), &files()).unwrap_err();
        assert!(error.contains("pass --ratelimit ADDR:PORT"), "{error}");
        let options = EnvoyOptions {
            ratelimit: Some(crate::args::RateLimitService {
                address: SocketAddr::new("127.0.0.1", 8081),
                failure: ratelimit::Failure::Closed,
            }),
            ..EnvoyOptions::default()
        };
        let yaml = render(&config(&text), &options, &files()).unwrap();
        assert!(
            yaml.contains(" --ratelimit 127.0.0.1:8081 --ratelimit-failure closed\n"),
            "{yaml}"
        );
        let doc: Value = serde_yaml::from_str(&yaml).unwrap();
        assert_eq!(
            filter_names(&doc),
            [WASM_FILTER, "envoy.filters.http.ratelimit", ROUTER]
        );
        let rl = cluster(&doc, ratelimit::CLUSTER);
        assert_eq!(rl["type"], "STATIC");
        assert!(rl["typed_extension_protocol_options"]
            ["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]["explicit_http_config"]
            ["http2_protocol_options"]
            .is_mapping());
        assert_eq!(
            hcm(&doc)["local_reply_config"]["mappers"][1]["filter"]["response_flag_filter"]
                ["flags"][0],
            "RLSE"
        );
        let vhosts = hcm(&doc)["route_config"]["virtual_hosts"]
            .as_sequence()
            .unwrap();
        let dashscope = vhosts
            .iter()
            .find(|v| v["name"] == "dashscope-qwen")
            .unwrap();
        let routes = dashscope["routes"].as_sequence().unwrap();
        // The fallback route and the provider's own carry the limited rule's entries; the 404
        // for what the filter did not rewrite needs none.
        assert_eq!(routes.len(), 3);
        assert!(routes[2].get("direct_response").is_some());
        for route in &routes[..2] {
            let entries = route["typed_per_filter_config"]["envoy.filters.http.ratelimit"]
                ["rate_limits"]
                .as_sequence()
                .unwrap();
            assert_eq!(entries.len(), 3);
        }
        let moonshot = vhosts.iter().find(|v| v["name"] == "moonshot").unwrap();
        assert!(moonshot["routes"][0]
            .get("typed_per_filter_config")
            .is_none());
        let extend = write_extend(
            "rl.yaml",
            "clusters:\n- name: llm-ratelimit\n  type: STATIC\n",
        );
        let clash = EnvoyOptions {
            extends: vec![extend],
            ..options
        };
        let error = render(&config(&text), &clash, &files()).unwrap_err();
        assert!(
            error.contains("the name \"llm-ratelimit\" is already taken by the rate limit service"),
            "{error}"
        );
    }

    #[test]
    fn without_fallback_nothing_changes_and_key_files_are_refused_in_one() {
        let yaml = render(&config(MESH), &EnvoyOptions::default(), &files()).unwrap();
        for absent in [
            "fallback.",
            UPSTREAM_ROOT_ID,
            "filter_metadata",
            "retry_policy",
            "ratelimit",
            "local_reply_config",
        ] {
            assert!(!yaml.contains(absent), "{absent}: {yaml}");
        }
        let text = FALLBACK.replace("apiKey: sk-b", "apiKeyFile: /etc/keys/moonshot");
        let error = render(&config(&text), &EnvoyOptions::default(), &files()).unwrap_err();
        assert!(
            error.contains("LLMRoute team/ha: rules[0].fallback.providers[0]: LLMProvider default/moonshot takes its key from apiKeyFile"),
            "{error}"
        );
    }
}
