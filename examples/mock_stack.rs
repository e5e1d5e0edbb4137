//! mock_stack: stand-ins for the LLM providers, and Envoy configs patched to use them, so the
//! seeds' scenarios run on one machine without real API keys (used by `scripts/demo.sh`).
//!
//! ```text
//! cargo run --quiet --example mock_stack -- --out DIR \
//!     --config envoy/mesh.yaml=10000 --config envoy/gateway.yaml=10001
//! ```
//!
//! Flags:
//! - `--out DIR` (required): where the files below go (created if missing).
//! - `--config FILE=PORT` (any number): a shipped Envoy config and the listener port for it.
//!   The admin interface goes on PORT+1000. Without one, only the mocks run (what
//!   `scripts/mesh.sh` uses: its proxies get their configuration from the discovery server).
//! - `--host NAME` (any number): another provider host for the mock's certificate.
//! - `--wasm PATH`: the filter to load (default: the absolute path of
//!   `target/wasm32-wasip1/release/llm_filter.wasm`, honouring `CARGO_TARGET_DIR`).
//! - `--provider-port N`, `--local-port N`: fixed ports for the mocks (default: any free port).
//! - `--cluster NAME=ADDR:PORT` (repeatable): point that plain cluster at a running service
//!   instead (e.g. `llm-ratelimit` at the rate limit service of `scripts/ratelimit.sh up`).
//!
//! What it does:
//! - generates a throw-away CA and writes `DIR/ca.pem`; starts one HTTPS mock provider
//!   (HTTP/1.1 and h2) whose certificate covers every provider host (each TLS cluster's SNI),
//!   one plain-HTTP mock for the `local-service` cluster (non-LLM traffic), and one for the
//!   `ext-authz` cluster of `envoy/ext-authz.yaml` (allows every request);
//! - writes `DIR/<basename of FILE>` for each config: the shipped file with only
//!   environment-specific fields changed (listener on 127.0.0.1:PORT, admin on
//!   127.0.0.1:PORT+1000, provider clusters pointed at the mock and verified with `ca.pem`,
//!   absolute wasm path, `local-service` at the plain mock). Run Envoy on it as usual.
//! - writes `DIR/ready` once serving, holding the provider mock's address (and removes it on
//!   exit);
//! - prints one JSON line per request the mocks receive to stdout (mock, tls, sni, host,
//!   method, path, model, stream, authorization redacted to its last 4 characters, bytes),
//!   and nothing else to stdout or stderr after `ready`;
//! - runs until SIGINT or SIGTERM, then exits 0.
//!
//! The mock answers like an OpenAI-compatible provider: a `chat.completion` echoing the model
//! it received (content names the SNI it was reached by), or an SSE stream of chunks when the
//! request body has `"stream": true`.

// The crate is also tested on wasm32 targets, where `cargo test` builds examples too.
#[cfg(target_arch = "wasm32")]
fn main() {}

#[cfg(not(target_arch = "wasm32"))]
fn main() -> std::process::ExitCode {
    match host::run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mock_stack: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(not(target_arch = "wasm32"))]
#[path = "../tests/support/mock.rs"]
#[allow(dead_code)]
mod mock;
#[cfg(not(target_arch = "wasm32"))]
#[path = "../tests/support/patch.rs"]
#[allow(dead_code)]
mod patch;

#[cfg(not(target_arch = "wasm32"))]
mod host {
    use super::{mock, patch};

    use mock::{MockServer, Recorded, TestPki};
    use std::path::{Path, PathBuf};

    struct Args {
        out: PathBuf,
        configs: Vec<(PathBuf, u16)>,
        hosts: Vec<String>,
        wasm: PathBuf,
        provider_port: u16,
        local_port: u16,
        clusters: Vec<(String, std::net::SocketAddr)>,
    }

    fn usage() -> &'static str {
        "usage: mock_stack --out DIR [--config FILE=PORT ...] [--host NAME ...] \
         [--wasm PATH] [--provider-port N] [--local-port N] [--cluster NAME=ADDR:PORT ...]"
    }

    fn default_wasm() -> PathBuf {
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .filter(|t| !t.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
        let target = if target.is_absolute() {
            target
        } else {
            Path::new(env!("CARGO_MANIFEST_DIR")).join(target)
        };
        target.join("wasm32-wasip1/release/llm_filter.wasm")
    }

    fn parse_port(s: &str, what: &str) -> Result<u16, String> {
        s.parse()
            .map_err(|_| format!("{what}: `{s}` is not a port number"))
    }

    fn parse_args() -> Result<Args, String> {
        let mut out = None;
        let mut configs = Vec::new();
        let mut hosts = Vec::new();
        let mut wasm = None;
        let mut provider_port = 0;
        let mut local_port = 0;
        let mut clusters = Vec::new();
        let mut it = std::env::args().skip(1);
        while let Some(flag) = it.next() {
            if flag == "-h" || flag == "--help" {
                println!("{}", usage());
                std::process::exit(0);
            }
            let value = it
                .next()
                .ok_or_else(|| format!("{flag} needs a value\n{}", usage()))?;
            match flag.as_str() {
                "--out" => out = Some(PathBuf::from(value)),
                "--config" => {
                    let (file, port) = value
                        .rsplit_once('=')
                        .ok_or_else(|| format!("--config {value}: expected FILE=PORT"))?;
                    let port = parse_port(port, "--config")?;
                    if port > u16::MAX - 1000 {
                        return Err(format!(
                            "--config {value}: PORT+1000 (admin) must be a port"
                        ));
                    }
                    configs.push((PathBuf::from(file), port));
                }
                "--host" => hosts.push(value),
                "--wasm" => wasm = Some(PathBuf::from(value)),
                "--provider-port" => provider_port = parse_port(&value, &flag)?,
                "--local-port" => local_port = parse_port(&value, &flag)?,
                "--cluster" => {
                    let (name, addr) = value
                        .split_once('=')
                        .ok_or_else(|| format!("--cluster {value}: expected NAME=ADDR:PORT"))?;
                    let addr = addr
                        .parse()
                        .map_err(|_| format!("--cluster {value}: {addr} is not ADDR:PORT"))?;
                    clusters.push((name.to_string(), addr));
                }
                _ => return Err(format!("unknown flag {flag}\n{}", usage())),
            }
        }
        let out = out.ok_or_else(|| format!("--out is required\n{}", usage()))?;
        let wasm = wasm.unwrap_or_else(default_wasm);
        let wasm = if wasm.is_absolute() {
            wasm
        } else {
            std::env::current_dir()
                .map_err(|e| format!("current dir: {e}"))?
                .join(wasm)
        };
        Ok(Args {
            out,
            configs,
            hosts,
            wasm,
            provider_port,
            local_port,
            clusters,
        })
    }

    /// One stdout line per request; the API key cut to its last 4 characters.
    fn log_line(mock: &str, r: &Recorded) {
        let json = r.json();
        let line = serde_json::json!({
            "mock": mock,
            "tls": r.tls,
            "sni": r.sni,
            "host": r.authority,
            "method": r.method,
            "path": r.path,
            "model": json.as_ref().and_then(|j| j.get("model")).cloned(),
            "stream": json.as_ref().and_then(|j| j.get("stream")).cloned(),
            "authorization": r.authorization_redacted(),
            "bytes": r.body.len(),
        });
        println!("{line}");
    }

    pub fn run() -> Result<(), String> {
        let args = parse_args()?;
        std::fs::create_dir_all(&args.out)
            .map_err(|e| format!("mkdir {}: {e}", args.out.display()))?;
        if !args.configs.is_empty() && !args.wasm.is_file() {
            eprintln!(
                "mock_stack: warning: {} does not exist yet (build it with \
                 `cargo build --release --lib --target wasm32-wasip1`)",
                args.wasm.display()
            );
        }

        let mut docs = Vec::new();
        let mut hosts: Vec<String> = mock::PROVIDER_HOSTS.iter().map(|h| h.to_string()).collect();
        for host in &args.hosts {
            if !hosts.contains(host) {
                hosts.push(host.clone());
            }
        }
        for (file, port) in &args.configs {
            let doc = patch::load(file)?;
            for sni in patch::provider_snis(&doc) {
                if !hosts.contains(&sni) {
                    hosts.push(sni);
                }
            }
            docs.push((file, *port, doc));
        }
        let host_refs: Vec<&str> = hosts.iter().map(String::as_str).collect();
        let pki = TestPki::generate(&host_refs)?;
        let ca = pki.write_ca(&args.out)?;
        let ca = std::fs::canonicalize(&ca).map_err(|e| format!("{}: {e}", ca.display()))?;

        let provider = MockServer::start_on(Some(&pki), args.provider_port)?;
        let local = MockServer::start_on(None, args.local_port)?;
        // Stand-in for envoy/ext-authz.yaml's authorization service: allows everything.
        let authz = MockServer::start_on(None, 0)?;
        provider.set_observer(|r| log_line("provider", r));
        local.set_observer(|r| log_line("local-service", r));
        authz.set_observer(|r| log_line("ext-authz", r));

        for (file, port, mut doc) in docs {
            let env = patch::Environment {
                listener_port: port,
                admin_port: port + 1000,
                provider_addr: provider.addr(),
                plain_clusters: [
                    ("local-service".to_string(), local.addr()),
                    ("ext-authz".to_string(), authz.addr()),
                ]
                .into_iter()
                .chain(args.clusters.iter().cloned())
                .collect(),
                ca_file: &ca,
                wasm_file: &args.wasm,
            };
            patch::patch(&mut doc, &env).map_err(|e| format!("{}: {e}", file.display()))?;
            let name = file
                .file_name()
                .ok_or_else(|| format!("{}: not a file name", file.display()))?;
            let dest = args.out.join(name);
            std::fs::write(&dest, patch::render(&doc)?)
                .map_err(|e| format!("write {}: {e}", dest.display()))?;
            eprintln!(
                "mock_stack: {} -> {} (listener 127.0.0.1:{port}, admin 127.0.0.1:{})",
                file.display(),
                dest.display(),
                port + 1000
            );
        }
        eprintln!(
            "mock_stack: provider mock https://{} (SNI {}), local-service mock http://{}, CA {}",
            provider.addr(),
            hosts.join(", "),
            local.addr(),
            ca.display()
        );

        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("tokio: {e}"))?;
        let ready = args.out.join("ready");
        let result = rt.block_on(async {
            use tokio::signal::unix::{signal, SignalKind};
            let mut term = signal(SignalKind::terminate()).map_err(|e| format!("SIGTERM: {e}"))?;
            let mut int = signal(SignalKind::interrupt()).map_err(|e| format!("SIGINT: {e}"))?;
            std::fs::write(&ready, format!("{}\n", provider.addr()))
                .map_err(|e| format!("write {}: {e}", ready.display()))?;
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            Ok::<(), String>(())
        });
        let _ = std::fs::remove_file(&ready);
        drop(provider);
        drop(local);
        drop(authz);
        result
    }
}
