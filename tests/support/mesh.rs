//! A local Istio mesh through `scripts/mesh.sh`: istiod's own translation code (tests/istiod)
//! configuring a real Envoy sidecar and a real Envoy ingress gateway from `render istio`'s
//! output, the providers at the tests' own mocks.
//!
//! The discovery server is built once per test process (`scripts/mesh.sh build`; Go's caches
//! make that seconds when warm) and shared, like the release wasm. Each [`Mesh`] has its own
//! directory, loopback address and ports, so tests run in parallel; dropping it runs
//! `scripts/mesh.sh down`, and a failing test prints the tail of every log first.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::admin::admin_get;
use super::{envoy, native, pki, repo, wasm};

/// `scripts/mesh.sh build`, once per process: the discovery server's path. No Go or a failing
/// build fails the test.
pub fn istiod() -> &'static Path {
    static ISTIOD: OnceLock<PathBuf> = OnceLock::new();
    ISTIOD.get_or_init(|| {
        let out = Command::new("bash")
            .arg(repo().join("scripts/mesh.sh"))
            .arg("build")
            .output()
            .expect("cannot run scripts/mesh.sh");
        assert!(
            out.status.success(),
            "the discovery server (tests/istiod, Go) does not build: `scripts/mesh.sh build` \
             failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        assert!(path.is_file(), "scripts/mesh.sh build printed {path:?}");
        path
    })
}

/// The two proxies of a mesh.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proxy {
    Sidecar,
    Gateway,
}

impl Proxy {
    pub fn name(self) -> &'static str {
        match self {
            Proxy::Sidecar => "sidecar",
            Proxy::Gateway => "gateway",
        }
    }
}

/// A running local mesh.
pub struct Mesh {
    pub work: PathBuf,
    /// The sidecar's outbound listener (port 80 on a loopback address of its own).
    pub sidecar: SocketAddr,
    /// The gateway's listener for the Gateway server on port 80.
    pub gateway: SocketAddr,
    pub sidecar_admin: SocketAddr,
    pub gateway_admin: SocketAddr,
    pub xds: SocketAddr,
    /// The manifest files given to `up`, in order (rewrite one and [`Mesh::reload`]).
    pub manifests: Vec<PathBuf>,
    /// The `--istio` files given to `up`, in order.
    pub istio: Vec<PathBuf>,
}

/// What to start a [`Mesh`] with.
pub struct MeshBuilder {
    label: String,
    manifests: Vec<String>,
    istio: Vec<String>,
    providers: Vec<(String, SocketAddr)>,
    ratelimit: Option<SocketAddr>,
    native: bool,
}

impl Mesh {
    /// A mesh named `label` (its directory), with nothing yet.
    pub fn builder(label: &str) -> MeshBuilder {
        MeshBuilder {
            label: label.into(),
            manifests: Vec::new(),
            istio: Vec::new(),
            providers: Vec::new(),
            ratelimit: None,
            native: false,
        }
    }

    /// The address of a proxy's listener.
    pub fn addr(&self, proxy: Proxy) -> SocketAddr {
        match proxy {
            Proxy::Sidecar => self.sidecar,
            Proxy::Gateway => self.gateway,
        }
    }

    pub fn admin(&self, proxy: Proxy) -> SocketAddr {
        match proxy {
            Proxy::Sidecar => self.sidecar_admin,
            Proxy::Gateway => self.gateway_admin,
        }
    }

    /// A proxy's `/config_dump` (with `query`, e.g. `?resource=ecds_filters`), as JSON.
    pub fn config_dump(&self, proxy: Proxy, query: &str) -> serde_json::Value {
        let (status, body) = admin_get(self.admin(proxy), &format!("/config_dump{query}"))
            .unwrap_or_else(|e| panic!("{}: {e}", proxy.name()));
        assert_eq!(status, 200, "{}: config_dump: {body}", proxy.name());
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("config_dump: {e}"))
    }

    /// A counter or gauge from a proxy's `/stats`.
    pub fn stat(&self, proxy: Proxy, name: &str) -> Option<u64> {
        let (_, body) = admin_get(self.admin(proxy), &format!("/stats?filter=^{name}$")).ok()?;
        body.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .and_then(|v| v.trim().parse().ok())
    }

    /// A proxy's log (Envoy's own lines and the access log).
    pub fn log(&self, proxy: Proxy) -> String {
        std::fs::read_to_string(self.work.join(format!("{}.log", proxy.name()))).unwrap_or_default()
    }

    /// Waits (5 s at most) until the proxy's log contains `needle`.
    pub fn assert_logged(&self, proxy: Proxy, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let log = self.log(proxy);
            if log.contains(needle) {
                return;
            }
            if Instant::now() > deadline {
                panic!("{needle:?} not in the {} log:\n{log}", proxy.name());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `scripts/mesh.sh reload`: render the manifests again and push; Err with the refusal.
    pub fn reload(&self) -> Result<String, String> {
        let out = mesh_sh(&["reload", "--work", &self.work.to_string_lossy()]);
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        if out.status.success() {
            Ok(stderr)
        } else {
            Err(stderr)
        }
    }

    /// Asserts that no proxy logged a wasm failure.
    pub fn assert_no_wasm_failures(&self) {
        for proxy in [Proxy::Sidecar, Proxy::Gateway] {
            let log = self.log(proxy);
            let failures = super::admin::wasm_failure_lines(&log);
            assert!(failures.is_empty(), "{}: {failures:#?}", proxy.name());
        }
    }

    fn dump_logs(&self) {
        for name in ["istiod", "sidecar", "gateway", "mocks/mock"] {
            let log =
                std::fs::read_to_string(self.work.join(format!("{name}.log"))).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            let tail = lines[lines.len().saturating_sub(60)..].join("\n");
            eprintln!(
                "===== {name}.log (last 60 lines, {}) =====\n{tail}",
                self.work.display()
            );
        }
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs();
        }
        let _ = mesh_sh(&["down", "--work", &self.work.to_string_lossy()]);
    }
}

/// `scripts/mesh.sh ARGS` with the prebuilt wasm, CLI and discovery server.
fn mesh_sh(args: &[&str]) -> std::process::Output {
    mesh_sh_with(args, false)
}

/// [`mesh_sh`], with `native` also the release dynamic module (built if need be:
/// [`native::module`]).
fn mesh_sh_with(args: &[&str], native: bool) -> std::process::Output {
    let mut command = Command::new("bash");
    if native {
        command.env("LLM_FILTER_NATIVE", native::module());
    }
    command
        .arg(repo().join("scripts/mesh.sh"))
        .args(args)
        .env("LLM_FILTER_WASM", wasm())
        .env("LLM_FILTER_BIN", env!("CARGO_BIN_EXE_llm-filter"))
        .env("LLM_ISTIOD", istiod())
        .env("ENVOY", envoy::envoy_binary())
        .output()
        .expect("cannot run scripts/mesh.sh")
}

impl MeshBuilder {
    /// A manifest file of these contents (each is rendered on its own).
    pub fn manifests(mut self, text: &str) -> MeshBuilder {
        self.manifests.push(text.into());
        self
    }

    /// A shipped manifest file (`envoy/manifests/<name>`).
    pub fn shipped_manifests(self, name: &str) -> MeshBuilder {
        let path = repo().join("envoy/manifests").join(name);
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        self.manifests(&text)
    }

    /// An `--istio` file of these contents.
    pub fn istio(mut self, text: &str) -> MeshBuilder {
        self.istio.push(text.into());
        self
    }

    /// A shipped Istio file (`istio/<name>`).
    pub fn shipped_istio(self, name: &str) -> MeshBuilder {
        let path = repo().join("istio").join(name);
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        self.istio(&text)
    }

    /// The proxies reach provider `host` at `addr` (a mock trusting the test CA).
    pub fn provider(mut self, host: &str, addr: SocketAddr) -> MeshBuilder {
        self.providers.push((host.into(), addr));
        self
    }

    /// Envoy's rate limit service at `addr` (`--ratelimit`): the manifests are rendered with
    /// `render istio --ratelimit`, the service is a ServiceEntry of the mesh.
    pub fn ratelimit(mut self, addr: SocketAddr) -> MeshBuilder {
        self.ratelimit = Some(addr);
        self
    }

    /// The filter as the native dynamic module (`--native`): `render istio --native`'s
    /// EnvoyFilters, the release `libllm_filter.so` mounted into the proxies.
    pub fn native(mut self) -> MeshBuilder {
        self.native = true;
        self
    }

    /// `scripts/mesh.sh up`; panics with its output if it fails.
    pub fn up(self) -> Mesh {
        self.try_up()
            .unwrap_or_else(|e| panic!("scripts/mesh.sh up failed:\n{e}"))
    }

    /// `scripts/mesh.sh up`; Err with its stderr if it exits non-zero.
    pub fn try_up(self) -> Result<Mesh, String> {
        let work = envoy::temp_dir(&format!("mesh-{}", self.label));
        let write = |kind: &str, i: usize, text: &str| {
            let path = work.join(format!("{kind}-{i}.yaml"));
            std::fs::write(&path, text).expect("write a mesh input");
            path
        };
        let manifests: Vec<PathBuf> = self
            .manifests
            .iter()
            .enumerate()
            .map(|(i, t)| write("manifests", i, t))
            .collect();
        let istio: Vec<PathBuf> = self
            .istio
            .iter()
            .enumerate()
            .map(|(i, t)| write("istio", i, t))
            .collect();
        let (_, ca) = pki();
        let mut args: Vec<String> = vec!["up".into(), "--work".into(), work.display().to_string()];
        for m in &manifests {
            args.extend(["--manifests".into(), m.display().to_string()]);
        }
        for f in &istio {
            args.extend(["--istio".into(), f.display().to_string()]);
        }
        for (host, addr) in &self.providers {
            args.extend(["--provider".into(), format!("{host}={addr}")]);
        }
        args.extend(["--provider-ca".into(), ca.display().to_string()]);
        if let Some(addr) = self.ratelimit {
            args.extend(["--ratelimit".into(), addr.to_string()]);
        }
        if self.native {
            args.push("--native".into());
        }
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = mesh_sh_with(&refs, self.native);
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        if !out.status.success() {
            let _ = mesh_sh(&["down", "--work", &work.to_string_lossy()]);
            return Err(stderr);
        }
        let lines: Vec<(&str, &str)> = stdout
            .lines()
            .map(|l| {
                l.split_once('=')
                    .unwrap_or_else(|| panic!("not key=value: {l:?}"))
            })
            .collect();
        let keys: Vec<&str> = lines.iter().map(|(k, _)| *k).collect();
        assert_eq!(
            keys,
            [
                "sidecar",
                "gateway",
                "sidecar_admin",
                "gateway_admin",
                "xds"
            ],
            "scripts/mesh.sh up printed:\n{stdout}"
        );
        let addr = |i: usize| -> SocketAddr {
            lines[i]
                .1
                .parse()
                .unwrap_or_else(|e| panic!("{}: {e}", lines[i].1))
        };
        Ok(Mesh {
            sidecar: addr(0),
            gateway: addr(1),
            sidecar_admin: addr(2),
            gateway_admin: addr(3),
            xds: addr(4),
            work,
            manifests,
            istio,
        })
    }
}
