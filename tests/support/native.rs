//! The filter as an Envoy dynamic module (`libllm_filter.so`, `--features native`) for the tests
//! that load it themselves (tests/native.rs): its builds and the HTTP filter that loads it; and
//! what the rest of the suite asks of the build under test (`LLM_FILTER_BUILD=native`, see
//! `native_module` and `patch::wasm_to_native`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use serde_yaml::Value;

use super::patch::WASM_FILTER;
use super::repo;

/// The filter name the module is given for the downstream filter (the wasm build's root id).
pub const FILTER_NAME: &str = "llm-filter";
/// Where Envoy looks for the module.
pub const SEARCH_PATH_VAR: &str = "ENVOY_DYNAMIC_MODULES_SEARCH_PATH";

/// Whether `LLM_FILTER_BUILD=native` runs the dynamic module instead of the wasm filter.
pub fn native_build() -> bool {
    super::native_module().is_some()
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
    let so = target
        .join("release")
        .join(format!("lib{}.so", super::patch::NATIVE_MODULE));
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
/// filter takes), as `render envoy --native` writes it.
pub fn filter(configuration: &str) -> Value {
    let mut wasm: Value = serde_yaml::from_str(&format!(
        "name: {WASM_FILTER}\ntyped_config: {{config: {{root_id: {FILTER_NAME}, configuration: {{value: ''}}}}}}\n"
    ))
    .expect("a wasm filter is YAML");
    wasm["typed_config"]["config"]["configuration"]["value"] = configuration.into();
    assert_eq!(super::patch::wasm_to_native(&mut wasm), 1);
    wasm
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
