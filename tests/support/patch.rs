//! Structural patches that turn a shipped `envoy/*.yaml` into one that runs on this machine
//! against the mock provider. Only environment-specific fields change: listener and admin
//! ports, provider cluster endpoints (the mock instead of the provider's DNS name), the CA
//! that verifies the provider's certificate, the wasm file path, and the plain-HTTP clusters.
//! The filter chain, routes, TLS SNI and SAN checks and the filter's configuration stay as
//! users copy them.
//!
//! Shared by the e2e tests (`tests/support/`) and `examples/mock_stack.rs`, so it depends on
//! nothing but `serde_yaml` and never panics.

use serde_yaml::{Mapping, Value};
use std::net::SocketAddr;
use std::path::Path;

/// The HTTP filter name of the llm-filter in every shipped config.
pub const WASM_FILTER: &str = "envoy.filters.http.wasm";
/// The HTTP filter that runs a native dynamic module (`LLM_FILTER_BUILD=native`).
pub const NATIVE_FILTER: &str = "envoy.filters.http.dynamic_modules";
/// The dynamic module's name: Envoy opens `libllm_filter.so`.
pub const NATIVE_MODULE: &str = "llm_filter";
/// The transport socket name that marks a provider (TLS-originating) cluster.
pub const TLS_SOCKET: &str = "envoy.transport_sockets.tls";

/// Where things live on this machine.
pub struct Environment<'a> {
    /// Listener port (0: let the kernel choose; find it with the admin `/listeners`).
    pub listener_port: u16,
    /// Admin port (0: let the kernel choose; use `--admin-address-path`).
    pub admin_port: u16,
    /// Every TLS provider cluster is pointed at this address (the HTTPS mock).
    pub provider_addr: SocketAddr,
    /// Plain clusters by name (e.g. `local-service`) and the address each should use.
    pub plain_clusters: Vec<(String, SocketAddr)>,
    /// PEM file of the CA that signed the mock's certificate.
    pub ca_file: &'a Path,
    /// Absolute path of the release `llm_filter.wasm`.
    pub wasm_file: &'a Path,
}

/// The SNI of every TLS (provider) cluster: the names the mock's certificate must cover.
pub fn provider_snis(doc: &Value) -> Vec<String> {
    let clusters = doc
        .get("static_resources")
        .and_then(|s| s.get("clusters"))
        .and_then(Value::as_sequence);
    clusters
        .into_iter()
        .flatten()
        .filter(|c| is_tls_cluster(c))
        .filter_map(|c| {
            c.get("transport_socket")
                .and_then(|t| t.get("typed_config"))
                .and_then(|t| t.get("sni"))
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .collect()
}

/// Reads and parses a config file.
pub fn load(path: &Path) -> Result<Value, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    serde_yaml::from_str(&text).map_err(|e| format!("{} is not YAML: {e}", path.display()))
}

/// Serializes a (patched) config.
pub fn render(doc: &Value) -> Result<String, String> {
    serde_yaml::to_string(doc).map_err(|e| format!("cannot serialize config: {e}"))
}

/// Applies every environment patch. Fails when the config lacks a field it should have
/// (so a shape regression in a shipped file is caught here, not as a confusing Envoy error).
pub fn patch(doc: &mut Value, env: &Environment<'_>) -> Result<(), String> {
    patch_admin(doc, env.admin_port)?;
    patch_listeners(doc, env.listener_port)?;
    patch_clusters(doc, env)?;
    patch_wasm_files(doc, env.wasm_file)
}

fn field<'v>(v: &'v mut Value, key: &str, ctx: &str) -> Result<&'v mut Value, String> {
    v.get_mut(key)
        .ok_or_else(|| format!("{ctx}: missing field `{key}`"))
}

fn seq<'v>(v: &'v mut Value, key: &str, ctx: &str) -> Result<&'v mut Vec<Value>, String> {
    field(v, key, ctx)?
        .as_sequence_mut()
        .ok_or_else(|| format!("{ctx}.{key}: not a list"))
}

fn name_of(v: &Value) -> String {
    v.get("name")
        .and_then(Value::as_str)
        .unwrap_or("<unnamed>")
        .to_string()
}

fn socket_address(ip: &str, port: u16) -> Value {
    let mut m = Mapping::new();
    m.insert("address".into(), ip.into());
    m.insert("port_value".into(), u64::from(port).into());
    Value::Mapping(m)
}

fn set_socket_address(addr: &mut Value, ip: &str, port: u16, ctx: &str) -> Result<(), String> {
    let sa = field(addr, "socket_address", ctx)?;
    *sa = socket_address(ip, port);
    Ok(())
}

fn patch_admin(doc: &mut Value, port: u16) -> Result<(), String> {
    let admin = field(doc, "admin", "bootstrap")?;
    let address = field(admin, "address", "admin")?;
    set_socket_address(address, "127.0.0.1", port, "admin.address")
}

fn patch_listeners(doc: &mut Value, port: u16) -> Result<(), String> {
    let sr = field(doc, "static_resources", "bootstrap")?;
    let listeners = seq(sr, "listeners", "static_resources")?;
    if listeners.len() != 1 {
        return Err(format!(
            "static_resources.listeners: expected exactly one listener, found {}",
            listeners.len()
        ));
    }
    for l in listeners.iter_mut() {
        let ctx = format!("listener {}", name_of(l));
        let address = field(l, "address", &ctx)?;
        set_socket_address(address, "127.0.0.1", port, &ctx)?;
    }
    Ok(())
}

fn endpoint_list(addr: SocketAddr) -> Value {
    let mut endpoint = Mapping::new();
    let mut address = Mapping::new();
    address.insert(
        "socket_address".into(),
        socket_address(&addr.ip().to_string(), addr.port()),
    );
    endpoint.insert("address".into(), Value::Mapping(address));
    let mut lb = Mapping::new();
    lb.insert("endpoint".into(), Value::Mapping(endpoint));
    let mut locality = Mapping::new();
    locality.insert(
        "lb_endpoints".into(),
        Value::Sequence(vec![Value::Mapping(lb)]),
    );
    Value::Sequence(vec![Value::Mapping(locality)])
}

fn is_tls_cluster(c: &Value) -> bool {
    c.get("transport_socket")
        .and_then(|t| t.get("name"))
        .and_then(Value::as_str)
        == Some(TLS_SOCKET)
}

fn point_cluster_at(c: &mut Value, addr: SocketAddr, ctx: &str) -> Result<(), String> {
    let m = c
        .as_mapping_mut()
        .ok_or_else(|| format!("{ctx}: not a mapping"))?;
    m.insert("type".into(), "STATIC".into());
    m.remove("dns_lookup_family");
    let la = field(c, "load_assignment", ctx)?;
    // Keep each endpoint's metadata (a fallback's upstream part tells providers apart by
    // `filter_metadata.llm.provider`): only the addresses change.
    let mut moved = 0;
    let localities = la.get_mut("endpoints").and_then(Value::as_sequence_mut);
    for locality in localities.into_iter().flatten() {
        let lbs = locality
            .get_mut("lb_endpoints")
            .and_then(Value::as_sequence_mut);
        for lb in lbs.into_iter().flatten() {
            if let Some(endpoint) = lb.get_mut("endpoint").and_then(Value::as_mapping_mut) {
                let mut address = Mapping::new();
                address.insert(
                    "socket_address".into(),
                    socket_address(&addr.ip().to_string(), addr.port()),
                );
                endpoint.insert("address".into(), Value::Mapping(address));
                moved += 1;
            }
        }
    }
    if moved == 0 {
        let la = la
            .as_mapping_mut()
            .ok_or_else(|| format!("{ctx}.load_assignment: not a mapping"))?;
        la.insert("endpoints".into(), endpoint_list(addr));
    }
    Ok(())
}

fn patch_clusters(doc: &mut Value, env: &Environment<'_>) -> Result<(), String> {
    let ca = env.ca_file.to_string_lossy().to_string();
    let sr = field(doc, "static_resources", "bootstrap")?;
    let clusters = seq(sr, "clusters", "static_resources")?;
    let mut tls_clusters = 0;
    for c in clusters.iter_mut() {
        let name = name_of(c);
        let ctx = format!("cluster {name}");
        if is_tls_cluster(c) {
            tls_clusters += 1;
            point_cluster_at(c, env.provider_addr, &ctx)?;
            let tc = field(c, "transport_socket", &ctx)?;
            let tc = field(tc, "typed_config", &ctx)?;
            let ctc = field(tc, "common_tls_context", &ctx)?;
            let vc = field(ctc, "validation_context", &ctx)?;
            let trusted = field(vc, "trusted_ca", &ctx)?;
            let trusted = trusted
                .as_mapping_mut()
                .ok_or_else(|| format!("{ctx}: trusted_ca is not a mapping"))?;
            trusted.clear();
            trusted.insert("filename".into(), ca.clone().into());
        } else if let Some((_, addr)) = env.plain_clusters.iter().find(|(n, _)| *n == name) {
            point_cluster_at(c, *addr, &ctx)?;
        }
    }
    if tls_clusters == 0 {
        return Err("static_resources.clusters: no TLS provider cluster found".into());
    }
    Ok(())
}

/// Every `http_filters` list of every HTTP connection manager in the config.
fn http_filter_lists(doc: &mut Value) -> Result<Vec<&mut Vec<Value>>, String> {
    let sr = field(doc, "static_resources", "bootstrap")?;
    let listeners = seq(sr, "listeners", "static_resources")?;
    let mut out = Vec::new();
    for l in listeners.iter_mut() {
        let Some(chains) = l.get_mut("filter_chains").and_then(Value::as_sequence_mut) else {
            continue;
        };
        for chain in chains.iter_mut() {
            let Some(filters) = chain.get_mut("filters").and_then(Value::as_sequence_mut) else {
                continue;
            };
            for f in filters.iter_mut() {
                if let Some(hf) = f
                    .get_mut("typed_config")
                    .and_then(|t| t.get_mut("http_filters"))
                    .and_then(Value::as_sequence_mut)
                {
                    out.push(hf);
                }
            }
        }
    }
    Ok(out)
}

fn wasm_plugin_configs(doc: &mut Value) -> Result<Vec<&mut Value>, String> {
    let mut out = Vec::new();
    for list in http_filter_lists(doc)? {
        for f in list.iter_mut() {
            if f.get("name").and_then(Value::as_str) == Some(WASM_FILTER) {
                let cfg = f
                    .get_mut("typed_config")
                    .and_then(|t| t.get_mut("config"))
                    .ok_or_else(|| format!("{WASM_FILTER}: missing typed_config.config"))?;
                out.push(cfg);
            }
        }
    }
    if out.is_empty() {
        return Err(format!("no {WASM_FILTER} filter in the config"));
    }
    Ok(out)
}

/// Points every wasm filter at `wasm` (the only patch `envoy --mode validate` needs).
pub fn set_wasm_file(doc: &mut Value, wasm: &Path) -> Result<(), String> {
    patch_wasm_files(doc, wasm)
}

fn patch_wasm_files(doc: &mut Value, wasm: &Path) -> Result<(), String> {
    let path = wasm.to_string_lossy().to_string();
    for cfg in wasm_plugin_configs(doc)? {
        let local = cfg
            .get_mut("vm_config")
            .and_then(|v| v.get_mut("code"))
            .and_then(|c| c.get_mut("local"))
            .and_then(Value::as_mapping_mut)
            .ok_or_else(|| format!("{WASM_FILTER}: missing vm_config.code.local"))?;
        local.insert("filename".into(), path.clone().into());
    }
    Ok(())
}

/// The filter's configuration string (`configuration.value`) of the first wasm filter.
pub fn wasm_configuration(doc: &mut Value) -> Result<String, String> {
    let cfgs = wasm_plugin_configs(doc)?;
    cfgs.into_iter()
        .next()
        .and_then(|c| c.get("configuration"))
        .and_then(|c| c.get("value"))
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| format!("{WASM_FILTER}: missing configuration.value"))
}

/// Replaces the filter's configuration string of every wasm filter.
pub fn set_wasm_configuration(doc: &mut Value, value: &str) -> Result<(), String> {
    for cfg in wasm_plugin_configs(doc)? {
        let conf = cfg
            .get_mut("configuration")
            .and_then(Value::as_mapping_mut)
            .ok_or_else(|| format!("{WASM_FILTER}: missing configuration"))?;
        conf.insert("value".into(), value.into());
    }
    Ok(())
}

/// Replaces every llm-filter wasm filter in the config, wherever it is (a listener's
/// `http_filters`, a fallback aggregate cluster's upstream `http_filters`), by the native
/// dynamic module with the same configuration string, as `llm-filter render envoy --native`
/// writes it: `filter_name` is the wasm root id (`llm-filter`, or `llm-filter-upstream` for the
/// upstream part). Returns how many were replaced.
pub fn wasm_to_native(doc: &mut Value) -> usize {
    if let Some(native) = doc.as_mapping().and_then(native_filter_for) {
        *doc = native;
        return 1;
    }
    match doc {
        Value::Mapping(m) => m.iter_mut().map(|(_, v)| wasm_to_native(v)).sum(),
        Value::Sequence(s) => s.iter_mut().map(wasm_to_native).sum(),
        _ => 0,
    }
}

/// The native filter standing for `filter`, if it is the llm-filter's wasm filter.
fn native_filter_for(filter: &Mapping) -> Option<Value> {
    if filter.get("name").and_then(Value::as_str) != Some(WASM_FILTER) {
        return None;
    }
    let config = filter.get("typed_config")?.get("config")?;
    let filter_name = config
        .get("root_id")
        .and_then(Value::as_str)
        .unwrap_or("llm-filter");
    let configuration = config
        .get("configuration")
        .and_then(|c| c.get("value"))
        .and_then(Value::as_str)
        .unwrap_or_default();
    let mapping = |entries: Vec<(&str, Value)>| {
        Value::Mapping(entries.into_iter().map(|(k, v)| (k.into(), v)).collect())
    };
    let filter_config = mapping(vec![
        (
            "@type",
            "type.googleapis.com/google.protobuf.StringValue".into(),
        ),
        ("value", configuration.into()),
    ]);
    let typed_config = mapping(vec![
        (
            "@type",
            "type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter"
                .into(),
        ),
        ("dynamic_module_config", mapping(vec![("name", NATIVE_MODULE.into())])),
        ("filter_name", filter_name.into()),
        ("filter_config", filter_config),
    ]);
    Some(mapping(vec![
        ("name", NATIVE_FILTER.into()),
        ("typed_config", typed_config),
    ]))
}

/// Removes the wasm filter (a plain Envoy baseline with the same routes and clusters).
pub fn remove_wasm_filter(doc: &mut Value) -> Result<(), String> {
    let mut removed = 0;
    for list in http_filter_lists(doc)? {
        let before = list.len();
        list.retain(|f| f.get("name").and_then(Value::as_str) != Some(WASM_FILTER));
        removed += before - list.len();
    }
    if removed == 0 {
        return Err(format!("no {WASM_FILTER} filter to remove"));
    }
    remove_filter_marks(doc)?;
    Ok(())
}

/// Every route of every HTTP connection manager's inline `route_config`.
fn routes_mut(doc: &mut Value) -> Result<Vec<&mut Value>, String> {
    let sr = field(doc, "static_resources", "bootstrap")?;
    let listeners = seq(sr, "listeners", "static_resources")?;
    let mut all = Vec::new();
    for l in listeners.iter_mut() {
        let chains = l.get_mut("filter_chains").and_then(Value::as_sequence_mut);
        for chain in chains.into_iter().flatten() {
            let filters = chain.get_mut("filters").and_then(Value::as_sequence_mut);
            for f in filters.into_iter().flatten() {
                let vhosts = f
                    .get_mut("typed_config")
                    .and_then(|t| t.get_mut("route_config"))
                    .and_then(|r| r.get_mut("virtual_hosts"))
                    .and_then(Value::as_sequence_mut);
                for vh in vhosts.into_iter().flatten() {
                    let routes = vh.get_mut("routes").and_then(Value::as_sequence_mut);
                    all.extend(routes.into_iter().flatten());
                }
            }
        }
    }
    Ok(all)
}

/// Plain Envoy, routing as the bootstrap does: drops the route matches on the filter's mark
/// (which only the filter sets). Returns how many routes changed.
pub fn remove_filter_marks(doc: &mut Value) -> Result<usize, String> {
    let mut changed = 0;
    for r in routes_mut(doc)? {
        if let Some(m) = r.get_mut("match").and_then(Value::as_mapping_mut) {
            if m.remove("filter_state").is_some() {
                changed += 1;
            }
        }
    }
    Ok(changed)
}

/// Sets `timeout` (an Envoy duration such as `"1s"`) on every route that forwards to a
/// cluster, in every HTTP connection manager's inline `route_config`; returns how many
/// routes changed. The fault tests use it to make Envoy's 504 come in test time.
pub fn set_route_timeout(doc: &mut Value, timeout: &str) -> Result<usize, String> {
    let mut changed = 0;
    for r in routes_mut(doc)? {
        if let Some(action) = r.get_mut("route").and_then(Value::as_mapping_mut) {
            action.insert("timeout".into(), timeout.into());
            changed += 1;
        }
    }
    if changed == 0 {
        return Err("no route with a `route` action to set a timeout on".into());
    }
    Ok(changed)
}
