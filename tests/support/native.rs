//! The filter as an Envoy dynamic module (`libllm_filter.so`, `--features native`): the build,
//! the HTTP filter that loads it, and `LLM_FILTER_BUILD=native`, which turns every wasm filter of
//! every Envoy the tests start into that filter, with the same configuration string.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use serde_yaml::Value;

use super::patch::WASM_FILTER;
use super::repo;

/// The HTTP filter that loads a dynamic module.
pub const DYNAMIC_MODULE_FILTER: &str = "envoy.filters.http.dynamic_modules";
/// The module's name: Envoy opens `lib<name>.so` in `ENVOY_DYNAMIC_MODULES_SEARCH_PATH`.
pub const MODULE_NAME: &str = "llm_filter";
/// The filter name the module is given for the downstream filter.
pub const FILTER_NAME: &str = "llm-filter";
/// The filter name of the upstream part (the wasm build's root id).
pub const UPSTREAM_FILTER_NAME: &str = "llm-filter-upstream";
/// The module's metrics namespace: its families are `llm.<name>` in `/stats`, and
/// `envoy_llm_<name>` in `/stats/prometheus` (Envoy strips no prefix but the wasm one).
pub const METRICS_NAMESPACE: &str = "llm";
/// Where Envoy looks for the module.
pub const SEARCH_PATH_VAR: &str = "ENVOY_DYNAMIC_MODULES_SEARCH_PATH";

/// Whether `LLM_FILTER_BUILD=native` asks for the dynamic module instead of the wasm filter.
pub fn native_build() -> bool {
    match std::env::var("LLM_FILTER_BUILD").as_deref() {
        Ok("native") => true,
        Ok("wasm") | Ok("") | Err(_) => false,
        Ok(other) => panic!("LLM_FILTER_BUILD={other}: expected `wasm` or `native`"),
    }
}

fn target_dir() -> PathBuf {
    // CARGO_TARGET_TMPDIR is <target dir>/tmp, so this honours CARGO_TARGET_DIR too.
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("target dir")
        .to_path_buf()
}

fn cargo_build(features: &str, target: &Path) -> PathBuf {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .args(["build", "--release", "--lib", "--features", features])
        .arg("--target-dir")
        .arg(target)
        .current_dir(repo())
        .output()
        .expect("cannot run cargo to build the dynamic module");
    assert!(
        out.status.success(),
        "the dynamic module does not build (`cargo build --release --lib --features {features}`):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let so = target.join("release").join(format!("lib{MODULE_NAME}.so"));
    assert!(
        so.is_file(),
        "cargo built the module but {} is missing",
        so.display()
    );
    so
}

/// `libllm_filter.so`, built once per test process (`cargo build --release --lib --features
/// native`); `LLM_FILTER_NATIVE` names a prebuilt file instead.
pub fn module() -> &'static Path {
    static SO: OnceLock<PathBuf> = OnceLock::new();
    SO.get_or_init(|| {
        if let Some(p) = std::env::var_os("LLM_FILTER_NATIVE").filter(|p| !p.is_empty()) {
            let p = PathBuf::from(p);
            assert!(
                p.is_file(),
                "LLM_FILTER_NATIVE={} does not exist",
                p.display()
            );
            return p;
        }
        cargo_build("native", &target_dir())
    })
}

/// The module built with the test-only panic trigger (`--features native-test-panic`), in a
/// target directory of its own so it never replaces the real one.
pub fn module_with_test_panic() -> &'static Path {
    static SO: OnceLock<PathBuf> = OnceLock::new();
    SO.get_or_init(|| cargo_build("native-test-panic", &target_dir().join("native-test-panic")))
}

/// The directory to put in `ENVOY_DYNAMIC_MODULES_SEARCH_PATH` for `so`.
pub fn search_path(so: &Path) -> String {
    so.parent()
        .expect("the module's directory")
        .to_string_lossy()
        .into_owned()
}

/// The dynamic-module HTTP filter running the module on `configuration` (the string the wasm
/// filter takes).
pub fn filter(configuration: &str) -> Value {
    filter_named(FILTER_NAME, configuration)
}

/// [`filter`] under another filter name (`UPSTREAM_FILTER_NAME`: the upstream part).
pub fn filter_named(filter_name: &str, configuration: &str) -> Value {
    let yaml = format!(
        "name: {DYNAMIC_MODULE_FILTER}\n\
         typed_config:\n  \
           '@type': type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter\n  \
           dynamic_module_config: {{name: {MODULE_NAME}, metrics_namespace: {METRICS_NAMESPACE}}}\n  \
           filter_name: {filter_name}\n  \
           filter_config:\n    \
             '@type': type.googleapis.com/google.protobuf.StringValue\n    \
             value: ''\n"
    );
    let mut f: Value = serde_yaml::from_str(&yaml).expect("the dynamic module filter is YAML");
    f["typed_config"]["filter_config"]["value"] = configuration.into();
    f
}

/// The wasm filter `f`'s filter name for the module (by its root id) and configuration
/// string, if `f` is the llm-filter wasm filter.
fn wasm_configuration(f: &Value) -> Option<(&'static str, String)> {
    if f.get("name").and_then(Value::as_str) != Some(WASM_FILTER) {
        return None;
    }
    let config = f.get("typed_config")?.get("config")?;
    let value = config
        .get("configuration")
        .and_then(|c| c.get("value"))
        .and_then(Value::as_str)
        .unwrap_or_default();
    let name = match config.get("root_id").and_then(Value::as_str) {
        Some(UPSTREAM_FILTER_NAME) => UPSTREAM_FILTER_NAME,
        _ => FILTER_NAME,
    };
    Some((name, value.to_string()))
}

/// Replaces every llm-filter wasm filter in `v` (HTTP connection managers' `http_filters` and
/// clusters' upstream `http_filters` alike) by the dynamic module on the same configuration.
/// Returns how many it replaced.
pub fn swap_filters(v: &mut Value) -> usize {
    match v {
        Value::Mapping(m) => {
            let mut n = 0;
            if let Some(Value::Sequence(list)) = m.get_mut("http_filters") {
                for f in list.iter_mut() {
                    if let Some((name, configuration)) = wasm_configuration(f) {
                        *f = filter_named(name, &configuration);
                        n += 1;
                    }
                }
            }
            for (_, child) in m.iter_mut() {
                n += swap_filters(child);
            }
            n
        }
        Value::Sequence(items) => items.iter_mut().map(swap_filters).sum(),
        _ => 0,
    }
}

/// `config_yaml` as the tests' build runs it: unchanged for the wasm build; for
/// `LLM_FILTER_BUILD=native`, every llm-filter wasm filter becomes the dynamic module.
pub fn for_build(config_yaml: &str) -> String {
    if !native_build() || !config_yaml.contains(WASM_FILTER) {
        return config_yaml.to_string();
    }
    let mut doc: Value = match serde_yaml::from_str(config_yaml) {
        Ok(doc) => doc,
        // Not ours to judge: Envoy reports what is wrong with it.
        Err(_) => return config_yaml.to_string(),
    };
    if swap_filters(&mut doc) == 0 {
        return config_yaml.to_string();
    }
    serde_yaml::to_string(&doc).expect("the swapped config is YAML")
}

/// The environment Envoy needs to find the module for this config: the search path when the
/// config loads the module and the caller did not name one.
pub fn envoy_env(config_yaml: &str, env: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    if config_yaml.contains(DYNAMIC_MODULE_FILTER)
        && !env.iter().any(|(k, _)| *k == SEARCH_PATH_VAR)
    {
        out.push((SEARCH_PATH_VAR.to_string(), search_path(module())));
    }
    out.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    out
}

/// The Prometheus name of the filter's metric `name` (`llm_requests_total`, as the wasm build
/// shows it) in this build: Envoy prefixes the dynamic module's with `envoy_`.
pub fn prometheus_name(name: &str) -> String {
    if native_build() {
        format!("envoy_{name}")
    } else {
        name.to_string()
    }
}
