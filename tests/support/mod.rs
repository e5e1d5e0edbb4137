//! Shared e2e harness: the release wasm built once per test process, a throw-away PKI, the
//! HTTPS mock provider, the plain `local-service` mock, and real Envoy running a shipped
//! `envoy/*.yaml` patched only where this machine differs (see `patch.rs`).
//!
//! Every test starts its own mocks and its own Envoy on kernel-chosen ports, so tests run in
//! parallel. A missing Envoy binary or a wasm that does not build fails the test.

#![allow(dead_code)]

pub mod admin;
pub mod client;
pub mod envoy;
pub mod fallback;
pub mod host_forms;
pub mod jwt;
pub mod mesh;
pub mod mock;
pub mod patch;
pub mod ratelimit;
pub mod raw;

use client::{Req, Resp};
use mock::{MockServer, TestPki};
use serde_yaml::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The demo keys of the shipped configs (the tests check which one reached the provider).
pub const KEY_DASHSCOPE: &str = "sk-demo-dashscope";
pub const KEY_DASHSCOPE_VIP: &str = "sk-demo-dashscope-vip";
pub const KEY_MOONSHOT: &str = "sk-demo-moonshot";
pub const KEY_GATEWAY: &str = "sk-demo-dashscope-gateway";

pub const DASHSCOPE: &str = "dashscope.aliyuncs.com";
pub const MOONSHOT: &str = "api.moonshot.cn";
pub const DASHSCOPE_PATH: &str = "/compatible-mode/v1/chat/completions";
pub const MOONSHOT_PATH: &str = "/v1/chat/completions";

/// The repository root.
pub fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Builds the filter (`cargo build --release --lib --target wasm32-wasip1`) once per test
/// process and returns the absolute path of `llm_filter.wasm`. `LLM_FILTER_WASM` names a
/// prebuilt file instead.
pub fn wasm() -> &'static Path {
    static WASM: OnceLock<PathBuf> = OnceLock::new();
    WASM.get_or_init(|| {
        if let Some(p) = std::env::var_os("LLM_FILTER_WASM").filter(|p| !p.is_empty()) {
            let p = PathBuf::from(p);
            assert!(
                p.is_file(),
                "LLM_FILTER_WASM={} does not exist",
                p.display()
            );
            return p;
        }
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let out = Command::new(cargo)
            .args(["build", "--release", "--lib", "--target", "wasm32-wasip1"])
            .current_dir(repo())
            .output()
            .expect("cannot run cargo to build the filter");
        assert!(
            out.status.success(),
            "the filter does not build (`cargo build --release --lib --target wasm32-wasip1`):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // CARGO_TARGET_TMPDIR is <target dir>/tmp, so this honours CARGO_TARGET_DIR too.
        let target = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .parent()
            .expect("target dir")
            .to_path_buf();
        let wasm = target.join("wasm32-wasip1/release/llm_filter.wasm");
        assert!(
            wasm.is_file(),
            "cargo built the filter but {} is missing",
            wasm.display()
        );
        wasm
    })
}

/// The filter build the e2e tests run, from `LLM_FILTER_BUILD`: unset or `wasm`, the .wasm
/// ([`wasm`]); `native`, Envoy's dynamic module instead, in every Envoy the tests start
/// (`envoy::Envoy`), loaded from `$LLM_FILTER_NATIVE`, else `target/release/libllm_filter.so`
/// (`cargo build --release --lib`). Returns the module's path for the native build; a missing
/// module fails the test.
pub fn native_module() -> Option<&'static Path> {
    static NATIVE: OnceLock<Option<PathBuf>> = OnceLock::new();
    NATIVE
        .get_or_init(|| {
            match std::env::var("LLM_FILTER_BUILD")
                .unwrap_or_default()
                .as_str()
            {
                "" | "wasm" => return None,
                "native" => {}
                other => panic!("LLM_FILTER_BUILD={other}: expected wasm or native"),
            }
            let path = match std::env::var_os("LLM_FILTER_NATIVE").filter(|p| !p.is_empty()) {
                Some(p) => PathBuf::from(p),
                None => Path::new(env!("CARGO_TARGET_TMPDIR"))
                    .parent()
                    .expect("target dir")
                    .join("release/libllm_filter.so"),
            };
            let path = std::path::absolute(&path).unwrap_or(path);
            assert!(
                path.is_file(),
                "LLM_FILTER_BUILD=native: the dynamic module {} does not exist (build it with \
                 `cargo build --release --lib`, or set LLM_FILTER_NATIVE)",
                path.display()
            );
            let expected = format!("lib{}.so", patch::NATIVE_MODULE);
            assert!(
                path.file_name().is_some_and(|n| n == expected.as_str()),
                "LLM_FILTER_NATIVE={}: Envoy looks for {expected}",
                path.display()
            );
            Some(path)
        })
        .as_deref()
}

/// The process-wide test PKI and its `ca.pem`.
pub fn pki() -> &'static (TestPki, PathBuf) {
    static PKI: OnceLock<(TestPki, PathBuf)> = OnceLock::new();
    PKI.get_or_init(|| {
        let pki = TestPki::generate(mock::PROVIDER_HOSTS).expect("test PKI");
        let dir = envoy::temp_dir("pki");
        let ca = pki.write_ca(&dir).expect("write ca.pem");
        (pki, ca)
    })
}

/// Loads a shipped config from `envoy/`.
pub fn shipped(name: &str) -> Value {
    patch::load(&repo().join("envoy").join(name)).unwrap_or_else(|e| panic!("{e}"))
}

/// Mocks plus an Envoy running a shipped config against them.
pub struct Stack {
    pub provider: MockServer,
    pub local: MockServer,
    /// Plain mocks for other clusters (e.g. `ext-authz`), by cluster name.
    pub extra: Vec<(String, MockServer)>,
    pub envoy: envoy::Envoy,
}

/// How to start a [`Stack`].
pub struct StackBuilder {
    config: String,
    wasm_configuration: Option<String>,
    without_filter: bool,
    extra_clusters: Vec<String>,
}

impl Stack {
    /// `envoy/<config>` as shipped.
    pub fn builder(config: &str) -> StackBuilder {
        StackBuilder {
            config: config.into(),
            wasm_configuration: None,
            without_filter: false,
            extra_clusters: Vec::new(),
        }
    }

    pub fn start(config: &str) -> Stack {
        Stack::builder(config).start()
    }

    pub async fn send(&self, req: &Req) -> Resp {
        client::send(self.envoy.addr, req).await
    }

    /// The plain mock standing in for `cluster`.
    pub fn mock(&self, cluster: &str) -> &MockServer {
        self.extra
            .iter()
            .find(|(n, _)| n == cluster)
            .map(|(_, m)| m)
            .unwrap_or_else(|| panic!("no mock for cluster {cluster}"))
    }
}

/// Patches a shipped config for these mocks (listener and admin on port 0).
pub fn patched(config: &str, provider: &MockServer, local: &MockServer) -> Value {
    patched_with(config, provider, local, &[])
}

/// Like [`patched`], with more plain clusters pointed at mocks.
pub fn patched_with(
    config: &str,
    provider: &MockServer,
    local: &MockServer,
    extra: &[(String, MockServer)],
) -> Value {
    let mut doc = shipped(config);
    let (_, ca) = pki();
    let mut plain_clusters = vec![("local-service".to_string(), local.addr())];
    plain_clusters.extend(extra.iter().map(|(n, m)| (n.clone(), m.addr())));
    let env = patch::Environment {
        listener_port: 0,
        admin_port: 0,
        provider_addr: provider.addr(),
        plain_clusters,
        ca_file: ca,
        wasm_file: wasm(),
    };
    patch::patch(&mut doc, &env).unwrap_or_else(|e| panic!("patching envoy/{config}: {e}"));
    doc
}

impl StackBuilder {
    /// Replaces the filter's configuration string.
    pub fn wasm_configuration(mut self, value: &str) -> StackBuilder {
        self.wasm_configuration = Some(value.into());
        self
    }

    /// Removes the wasm filter: plain Envoy with the same routes and clusters.
    pub fn without_filter(mut self) -> StackBuilder {
        self.without_filter = true;
        self
    }

    /// Points the plain cluster `name` at a mock of its own ([`Stack::mock`]).
    pub fn plain_cluster(mut self, name: &str) -> StackBuilder {
        self.extra_clusters.push(name.into());
        self
    }

    /// The patched config this builder would run.
    pub fn render(&self, provider: &MockServer, local: &MockServer) -> String {
        self.render_with(provider, local, &[])
    }

    fn render_with(
        &self,
        provider: &MockServer,
        local: &MockServer,
        extra: &[(String, MockServer)],
    ) -> String {
        let mut doc = patched_with(&self.config, provider, local, extra);
        if let Some(v) = &self.wasm_configuration {
            patch::set_wasm_configuration(&mut doc, v).unwrap_or_else(|e| panic!("{e}"));
        }
        if self.without_filter {
            patch::remove_wasm_filter(&mut doc).unwrap_or_else(|e| panic!("{e}"));
        }
        patch::render(&doc).unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn start(self) -> Stack {
        let provider = MockServer::start_tls(&pki().0).expect("mock provider");
        let local = MockServer::start_plain().expect("local-service mock");
        let extra: Vec<(String, MockServer)> = self
            .extra_clusters
            .iter()
            .map(|n| (n.clone(), MockServer::start_plain().expect("plain mock")))
            .collect();
        let yaml = self.render_with(&provider, &local, &extra);
        let label = self.config.trim_end_matches(".yaml").to_string();
        let envoy = envoy::Envoy::start(&yaml, &label);
        Stack {
            provider,
            local,
            extra,
            envoy,
        }
    }
}

/// `llm-filter render envoy` of `manifests` (written to a file of its own), listening on free
/// ports, with the release wasm, the test CA, and each `(provider host, address)` of
/// `endpoints` as an `--endpoint`. Variables named by `${NAME}` or `apiKeyFromEnv` are left to
/// the caller's environment.
pub fn render_envoy(
    label: &str,
    manifests: &str,
    endpoints: &[(&str, std::net::SocketAddr)],
) -> String {
    render_envoy_with(label, manifests, endpoints, &[])
}

/// [`render_envoy`] with more arguments (`--extend FILE`, `--ratelimit ADDR:PORT`, ...).
pub fn render_envoy_with(
    label: &str,
    manifests: &str,
    endpoints: &[(&str, std::net::SocketAddr)],
    extra: &[&str],
) -> String {
    let dir = envoy::temp_dir(label);
    let file = dir.join("llm.yaml");
    std::fs::write(&file, manifests).expect("write the manifests");
    let (_, ca) = pki();
    let out = Command::new(env!("CARGO_BIN_EXE_llm-filter"))
        .current_dir(repo())
        .args(["render", "envoy"])
        .arg(&file)
        .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .arg("--wasm")
        .arg(wasm())
        .arg("--ca")
        .arg(ca)
        .args(
            endpoints
                .iter()
                .flat_map(|(host, addr)| ["--endpoint".to_string(), format!("{host}={addr}")]),
        )
        .args(extra)
        .output()
        .expect("run llm-filter");
    assert!(
        out.status.success(),
        "render envoy failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("render envoy writes UTF-8")
}

/// A rendered bootstrap whose filter gives up on a missing body after `ms` milliseconds
/// (`settings.holdTimeoutMs`, written beside the `forwardAfterBody` that `render envoy` sets).
pub fn with_hold_timeout(yaml: &str, ms: u64) -> String {
    let out: String = yaml
        .lines()
        .flat_map(|line| {
            // The same indentation: a line of the settings document inside the config string.
            let extra = line
                .trim_start()
                .starts_with("forwardAfterBody: true")
                .then(|| {
                    let indent = &line[..line.len() - line.trim_start().len()];
                    format!("{indent}holdTimeoutMs: {ms}")
                });
            std::iter::once(line.to_string()).chain(extra)
        })
        .map(|line| line + "\n")
        .collect();
    assert!(out.contains(&format!("holdTimeoutMs: {ms}")), "{out}");
    out
}

/// Asserts the request carried `authorization: Bearer <key>` exactly once, printing only
/// redacted values on failure.
pub fn assert_bearer(r: &mock::Recorded, key: &str) {
    let want = format!("Bearer {key}");
    let got = r.header("authorization");
    assert!(
        got.as_deref() == Some(want.as_str()) && r.header_count("authorization") == 1,
        "request #{} to {:?}: expected one `authorization: {}`, got {:?} ({} header(s))",
        r.id,
        r.sni,
        mock::redact(&want),
        got.as_deref().map(mock::redact),
        r.header_count("authorization")
    );
}

/// Asserts the provider saw a body whose length matches any `content-length` it got.
pub fn assert_no_stale_content_length(r: &mock::Recorded) {
    if let Some(cl) = r.header("content-length") {
        assert_eq!(
            cl.parse::<usize>().ok(),
            Some(r.body.len()),
            "request #{}: content-length {cl} but {} body bytes arrived",
            r.id,
            r.body.len()
        );
    }
}

/// Asserts an OpenAI-shaped error reply with this status and code.
pub fn assert_openai_error(resp: &Resp, status: u16, code: &str) {
    assert_eq!(
        resp.status,
        status,
        "expected {status} `{code}`, got {} with body {}",
        resp.status,
        resp.text()
    );
    assert!(
        resp.header("content-type")
            .is_some_and(|c| c.starts_with("application/json")),
        "error reply content-type is {:?}",
        resp.header("content-type")
    );
    let j = resp.json();
    // The gateway's own misconfiguration (5xx) is a server error, everything else the client's.
    let kind = if status >= 500 {
        "server_error"
    } else {
        "invalid_request_error"
    };
    assert_eq!(j["error"]["type"], kind, "error body: {j}");
    assert_eq!(j["error"]["code"], code, "error body: {j}");
    assert!(
        j["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "error.message missing or empty: {j}"
    );
}
