//! Envoy's real rate limit service on real Redis, started by `scripts/ratelimit.sh up` in a
//! directory of the test's own (free ports, its own Redis data), stopped on drop. The counters
//! are read from Redis with `redis-cli`. Also what the budgets tests share: the service's
//! configuration from `render ratelimit`, the tokens an answer reported, the 429 of a refusal.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::client::Resp;
use super::envoy::temp_dir;
use super::repo;

/// `up` installs what is missing the first time: one at a time until one has succeeded.
static UP: Mutex<()> = Mutex::new(());
static INSTALLED: AtomicBool = AtomicBool::new(false);

pub struct RateLimitService {
    /// The service's gRPC address (`--ratelimit`).
    pub grpc: SocketAddr,
    pub redis: SocketAddr,
    dir: PathBuf,
}

fn script(args: &[&str], dir: &Path) -> std::process::Output {
    Command::new("bash")
        .arg(repo().join("scripts/ratelimit.sh"))
        .args(args)
        .arg("--work")
        .arg(dir)
        .current_dir(repo())
        .stdin(Stdio::null())
        .output()
        .expect("run scripts/ratelimit.sh")
}

impl RateLimitService {
    /// `scripts/ratelimit.sh up --config <config> --work <fresh dir>`, with the service's
    /// debug log (so the log checks see everything it logs).
    pub fn up(label: &str, config: &str) -> RateLimitService {
        let dir = temp_dir(&format!("ratelimit-{label}"));
        let file = dir.join("config.yaml");
        std::fs::write(&file, config).expect("write the rate limit configuration");
        let out = {
            let _one = (!INSTALLED.load(Ordering::SeqCst))
                .then(|| UP.lock().unwrap_or_else(|e| e.into_inner()));
            let mut cmd = Command::new("bash");
            cmd.arg(repo().join("scripts/ratelimit.sh"))
                .arg("up")
                .arg("--config")
                .arg(&file)
                .arg("--work")
                .arg(&dir)
                .env("RATELIMIT_LOG_LEVEL", "debug")
                .current_dir(repo())
                .stdin(Stdio::null());
            let out = cmd.output().expect("run scripts/ratelimit.sh up");
            if out.status.success() {
                INSTALLED.store(true, Ordering::SeqCst);
            }
            out
        };
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "scripts/ratelimit.sh up failed ({}):\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let address = |name: &str| -> SocketAddr {
            stdout
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{name}=")))
                .and_then(|a| a.parse().ok())
                .unwrap_or_else(|| panic!("ratelimit.sh up printed no {name}=ADDR:PORT: {stdout}"))
        };
        RateLimitService {
            grpc: address("ratelimit"),
            redis: address("redis"),
            dir,
        }
    }

    /// `--ratelimit ADDR:PORT` for `llm-filter render envoy`.
    pub fn flag(&self) -> String {
        self.grpc.to_string()
    }

    /// The service's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("ratelimit.log")).unwrap_or_default()
    }

    /// Redis's log so far.
    pub fn redis_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default()
    }

    fn redis_cli(&self, args: &[&str]) -> String {
        self.try_redis_cli(args)
            .unwrap_or_else(|e| panic!("redis-cli {args:?}: {e}"))
    }

    fn try_redis_cli(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &self.redis.port().to_string()])
            .args(args)
            .output()
            .expect("run redis-cli (redis-tools; scripts/ratelimit.sh installs it)");
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        if out.status.success() && !stdout.starts_with("Could not connect") {
            Ok(stdout)
        } else {
            Err(format!("{stdout}{}", String::from_utf8_lossy(&out.stderr)))
        }
    }

    /// Every counter in Redis, `(key, count)`, sorted by key.
    pub fn counters(&self) -> Vec<(String, u64)> {
        let keys = self.redis_cli(&["--scan"]);
        let mut out: Vec<(String, u64)> = keys
            .lines()
            .filter(|k| !k.is_empty())
            .map(|k| {
                let value = self.redis_cli(&["get", k]);
                (k.to_string(), value.trim().parse().unwrap_or(0))
            })
            .collect();
        out.sort();
        out
    }

    /// The sum of the counters whose key contains `needle` (a budget's windows).
    pub fn count(&self, needle: &str) -> u64 {
        self.counters()
            .iter()
            .filter(|(k, _)| k.contains(needle))
            .map(|(_, v)| v)
            .sum()
    }

    /// Waits until the count of `needle` is `want` (the debit is sent when a stream is done,
    /// after the client has its answer). Returns the last count seen.
    pub fn wait_for_count(&self, needle: &str, want: u64) -> u64 {
        self.wait_for_count_within(needle, want, Duration::from_secs(5))
    }

    /// [`wait_for_count`](Self::wait_for_count) for at most `timeout`.
    pub fn wait_for_count_within(&self, needle: &str, want: u64, timeout: Duration) -> u64 {
        let deadline = Instant::now() + timeout;
        loop {
            let count = self.count(needle);
            if count == want || Instant::now() > deadline {
                return count;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn pid(&self, name: &str) -> Option<u32> {
        std::fs::read_to_string(self.dir.join(format!("{name}.pid")))
            .ok()
            .and_then(|p| p.trim().parse().ok())
    }

    /// Stops a process the script started (`ratelimit` or `redis`) and waits until it is gone.
    pub fn stop(&self, name: &str) {
        let pid = self.pid(name).unwrap_or_else(|| panic!("no {name}.pid"));
        let _ = Command::new("kill").arg(pid.to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Path::new(&format!("/proc/{pid}")).exists()
            && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .unwrap_or_default()
                .contains(") Z ")
        {
            assert!(Instant::now() < deadline, "{name} (pid {pid}) did not stop");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts Redis again on its own configuration (port and data directory), as an operator
    /// restarting it would, and waits until it answers.
    pub fn start_redis(&self) {
        // As the script starts it: in its own session, outliving the shell that started it.
        let out = Command::new("bash")
            .arg("-c")
            .arg(r#"setsid redis-server "$1" </dev/null >>"$2" 2>&1 & echo $!"#)
            .arg("redis")
            .arg(self.dir.join("redis.conf"))
            .arg(self.dir.join("redis.log"))
            .output()
            .expect("start redis-server");
        let pid = String::from_utf8_lossy(&out.stdout).trim().to_string();
        std::fs::write(self.dir.join("redis.pid"), &pid).expect("redis.pid");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self
            .try_redis_cli(&["ping"])
            .is_ok_and(|pong| pong.contains("PONG"))
        {
            assert!(Instant::now() < deadline, "Redis did not come back");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for RateLimitService {
    fn drop(&mut self) {
        let out = script(&["down"], &self.dir);
        if std::thread::panicking() {
            eprintln!(
                "===== rate limit service log ({}) =====\n{}\n===== redis log =====\n{}\n{}",
                self.dir.display(),
                self.log(),
                self.redis_log(),
                String::from_utf8_lossy(&out.stderr)
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// `llm-filter render ratelimit` of `manifests`.
pub fn service_config(label: &str, manifests: &str) -> String {
    let dir = temp_dir(label);
    let file = dir.join("llm.yaml");
    std::fs::write(&file, manifests).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_llm-filter"))
        .args(["render", "ratelimit"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The tokens an answer reported (`usage.total_tokens` of the JSON, or of the last SSE event
/// that has one).
pub fn reported_tokens(resp: &Resp) -> u64 {
    if resp
        .header("content-type")
        .is_some_and(|c| c.starts_with("text/event-stream"))
    {
        return resp
            .sse_events()
            .iter()
            .rev()
            .filter_map(|(_, data)| serde_json::from_str::<serde_json::Value>(data).ok())
            .find_map(|j| j["usage"]["total_tokens"].as_u64())
            .expect("a usage event");
    }
    resp.json()["usage"]["total_tokens"]
        .as_u64()
        .expect("usage.total_tokens")
}

/// The rate limit filter's refusal: 429, OpenAI-shaped, `retry-after` and the x-ratelimit
/// headers.
pub fn assert_refused(resp: &Resp, limit: u32) {
    assert_eq!(resp.status, 429, "{}", resp.text());
    assert!(
        resp.header("content-type")
            .is_some_and(|c| c.starts_with("application/json")),
        "{:?}",
        resp.headers
    );
    let j = resp.json();
    assert_eq!(j["error"]["code"], "rate_limit_exceeded", "{j}");
    assert_eq!(j["error"]["type"], "rate_limit_error", "{j}");
    assert!(j["error"]["message"]
        .as_str()
        .is_some_and(|m| !m.is_empty()));
    let retry: u64 = resp
        .header("retry-after")
        .and_then(|r| r.parse().ok())
        .unwrap_or_else(|| panic!("no numeric retry-after: {:?}", resp.headers));
    assert!((1..=86_400).contains(&retry), "retry-after {retry}");
    assert_eq!(resp.header("x-ratelimit-remaining").as_deref(), Some("0"));
    let limit_header = resp.header("x-ratelimit-limit").unwrap_or_default();
    assert!(
        limit_header.starts_with(&format!("{limit}, {limit};w=")),
        "x-ratelimit-limit: {limit_header}"
    );
}
