//! soak: a long run through real Envoy with the filter, driven by `scripts/soak.sh`.
//!
//! ```text
//! soak --envoy PATH --wasm PATH [--requests N] [--connections C] [--out DIR]
//!      [--rss-tolerance-mb M]
//! ```
//!
//! It starts the HTTPS mock provider and the `local-service` mock (as `mock_stack` does, but
//! keeping no request: a long run must not grow the mock), writes `envoy/mesh.yaml` patched
//! for them (`DIR/envoy.yaml`), runs Envoy on it (`--concurrency 1`, log in `DIR/envoy.log`),
//! then sends N requests over C keep-alive HTTP/1.1 connections, in a fixed rotation of
//! classes, each with the answer it must get:
//!
//! | class   | share | request                                              | expected |
//! |---------|-------|------------------------------------------------------|----------|
//! | valid   | 11/20 | ~1 KB chat body to DashScope (also as a subscriber) or `demo-llm-server` | 200 `chat.completion` |
//! | invalid | 4/20  | not JSON, JSON array, `messages` a string, `stream` a string | 400 with that OpenAI error code |
//! | stream  | 3/20  | `"stream": true` to DashScope                        | 200 `text/event-stream` ending `data: [DONE]` |
//! | large   | 2/20  | ~256 KB chat body to DashScope                       | 200 `chat.completion` |
//!
//! Checks: every answer has its class's expected status and shape (anything else, and any
//! transport error, is unexpected); Envoy's log shows no wasm failure; Envoy's RSS
//! (`/proc/<pid>/status` VmRSS) at the end is within ±M MB (default 5) of its RSS after the
//! first 10k requests. Prints a summary; exits 1 on any failure.

#[cfg(target_arch = "wasm32")]
fn main() {}

#[cfg(not(target_arch = "wasm32"))]
fn main() -> std::process::ExitCode {
    match host::run() {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::FAILURE,
        Err(e) => {
            eprintln!("soak: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(not(target_arch = "wasm32"))]
#[path = "../tests/support/admin.rs"]
mod admin;
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
    use super::admin::{admin_get, wasm_failure_lines};
    use super::{mock, patch};

    use http_body_util::{BodyExt, Full};
    use hyper::body::Bytes;
    use hyper_util::rt::TokioIo;
    use mock::{Behavior, MockServer, TestPki};
    use std::collections::BTreeMap;
    use std::net::SocketAddr;
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, Stdio};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    const RSS_AT: usize = 10_000;

    struct Args {
        envoy: PathBuf,
        wasm: PathBuf,
        requests: usize,
        connections: usize,
        out: PathBuf,
        rss_tolerance_mb: f64,
    }

    fn parse_args() -> Result<Args, String> {
        let mut envoy = None;
        let mut wasm = None;
        let mut requests = 100_000;
        let mut connections = 16;
        let mut out = PathBuf::from(".work/soak");
        let mut rss_tolerance_mb = 5.0;
        let mut it = std::env::args().skip(1);
        while let Some(flag) = it.next() {
            let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
            let num = |v: &str| {
                v.parse::<usize>()
                    .map_err(|_| format!("{flag}: `{v}` is not a number"))
            };
            match flag.as_str() {
                "--envoy" => envoy = Some(PathBuf::from(value)),
                "--wasm" => wasm = Some(PathBuf::from(value)),
                "--requests" => requests = num(&value)?,
                "--connections" => connections = num(&value)?.max(1),
                "--out" => out = PathBuf::from(value),
                "--rss-tolerance-mb" => {
                    rss_tolerance_mb = value
                        .parse()
                        .map_err(|_| format!("{flag}: `{value}` is not a number"))?
                }
                _ => return Err(format!("unknown flag {flag}")),
            }
        }
        let absolute = |p: PathBuf| -> Result<PathBuf, String> {
            std::fs::canonicalize(&p).map_err(|e| format!("{}: {e}", p.display()))
        };
        Ok(Args {
            envoy: absolute(envoy.ok_or("--envoy is required")?)?,
            wasm: absolute(wasm.ok_or("--wasm is required")?)?,
            requests,
            connections,
            out,
            rss_tolerance_mb,
        })
    }

    // ------------------------------------------------------------------ request classes

    #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
    enum Class {
        Valid,
        Invalid,
        Stream,
        Large,
    }

    impl Class {
        fn name(self) -> &'static str {
            match self {
                Class::Valid => "valid",
                Class::Invalid => "invalid",
                Class::Stream => "stream",
                Class::Large => "large",
            }
        }
    }

    /// One request and what its answer must be.
    struct Case {
        class: Class,
        host: &'static str,
        subscriber: bool,
        body: Bytes,
        expect_status: u16,
        /// The body must contain this.
        expect_in_body: &'static str,
    }

    /// The fixed rotation of 20 cases (11 valid, 4 invalid, 3 stream, 2 large).
    fn rotation() -> Vec<Case> {
        let filler = "lorem ipsum dolor sit amet, ".repeat(34); // ~1 KB body
        let valid = format!(
            r#"{{"messages":[{{"role":"system","content":"be brief"}},{{"role":"user","content":"{filler}"}}],"temperature":0.2}}"#
        );
        let stream =
            format!(r#"{{"messages":[{{"role":"user","content":"{filler}"}}],"stream":true}}"#);
        let big = "0123456789abcdef".repeat(16 * 1024); // 256 KiB
        let large = format!(r#"{{"messages":[{{"role":"user","content":"{big}"}}]}}"#);
        let v = |host, subscriber| Case {
            class: Class::Valid,
            host,
            subscriber,
            body: Bytes::from(valid.clone()),
            expect_status: 200,
            expect_in_body: "\"chat.completion\"",
        };
        let bad = |body: &'static str, code| Case {
            class: Class::Invalid,
            host: "demo-llm-server",
            subscriber: false,
            body: Bytes::from_static(body.as_bytes()),
            expect_status: 400,
            expect_in_body: code,
        };
        let s = || Case {
            class: Class::Stream,
            host: "dashscope.aliyuncs.com",
            subscriber: false,
            body: Bytes::from(stream.clone()),
            expect_status: 200,
            expect_in_body: "data: [DONE]",
        };
        let l = || Case {
            class: Class::Large,
            host: "dashscope.aliyuncs.com",
            subscriber: false,
            body: Bytes::from(large.clone()),
            expect_status: 200,
            expect_in_body: "\"chat.completion\"",
        };
        let d = "dashscope.aliyuncs.com";
        vec![
            v(d, false),
            v("demo-llm-server", false),
            bad("messages=hello", "\"invalid_json\""),
            s(),
            v(d, true),
            l(),
            v("demo-llm-server", false),
            bad("[1,2,3]", "\"invalid_body\""),
            v(d, false),
            s(),
            v(d, true),
            v("demo-llm-server", false),
            bad(r#"{"messages":"hello"}"#, "\"invalid_messages\""),
            v(d, false),
            l(),
            s(),
            v("demo-llm-server", false),
            bad(r#"{"messages":[],"stream":"yes"}"#, "\"invalid_stream\""),
            v(d, true),
            v(d, false),
        ]
    }

    // ------------------------------------------------------------------ Envoy

    struct Envoy {
        child: Child,
        addr: SocketAddr,
        admin: SocketAddr,
        log: PathBuf,
    }

    impl Drop for Envoy {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    fn start_envoy(binary: &Path, config: &Path, dir: &Path) -> Result<Envoy, String> {
        let log = dir.join("envoy.log");
        let out = std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        let address_file = dir.join("admin-address");
        let _ = std::fs::remove_file(&address_file);
        let child = Command::new(binary)
            .arg("-c")
            .arg(config)
            .args(["--concurrency", "1", "--use-dynamic-base-id"])
            .args(["--log-level", "info", "--file-flush-interval-msec", "500"])
            .arg("--admin-address-path")
            .arg(&address_file)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
        let mut envoy = Envoy {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            admin: SocketAddr::from(([127, 0, 0, 1], 0)),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = envoy.child.try_wait() {
                return Err(format!(
                    "Envoy exited during startup ({status}); see {}",
                    envoy.log.display()
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "Envoy not ready after 60 s; see {}",
                    envoy.log.display()
                ));
            }
            let ready = (|| {
                let admin: SocketAddr = std::fs::read_to_string(&address_file)
                    .ok()?
                    .trim()
                    .parse()
                    .ok()?;
                let (status, body) = admin_get(admin, "/ready").ok()?;
                if status != 200 || body.trim() != "LIVE" {
                    return None;
                }
                let (_, l) = admin_get(admin, "/listeners?format=json").ok()?;
                let v: serde_json::Value = serde_json::from_str(&l).ok()?;
                let port = v["listener_statuses"][0]["local_address"]["socket_address"]
                    ["port_value"]
                    .as_u64()?;
                Some((admin, u16::try_from(port).ok()?))
            })();
            if let Some((admin, port)) = ready {
                envoy.admin = admin;
                envoy.addr = SocketAddr::from(([127, 0, 0, 1], port));
                return Ok(envoy);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// VmRSS of a process, in KiB.
    fn rss_kib(pid: u32) -> Result<u64, String> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .map_err(|e| format!("/proc/{pid}/status: {e}"))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("/proc/{pid}/status: no VmRSS"))
    }

    // ------------------------------------------------------------------ load

    #[derive(Default)]
    struct Results {
        /// (class, status) → count.
        statuses: BTreeMap<(Class, u16), usize>,
        /// Answers that were not what their class expects (first few kept).
        unexpected: usize,
        unexpected_samples: Vec<String>,
        transport_errors: usize,
        connections: usize,
        /// (requests done, RSS KiB) samples.
        rss: Vec<(usize, u64)>,
    }

    impl Results {
        fn unexpected(&mut self, what: String) {
            self.unexpected += 1;
            if self.unexpected_samples.len() < 10 {
                self.unexpected_samples.push(what);
            }
        }
    }

    type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

    async fn connect(addr: SocketAddr) -> Result<Sender, String> {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let _ = stream.set_nodelay(true);
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }

    /// Sends one case; Ok(status, content-type, body) or a transport error.
    async fn send(s: &mut Sender, case: &Case) -> Result<(u16, String, Vec<u8>), String> {
        s.ready().await.map_err(|e| format!("connection: {e}"))?;
        let mut req = hyper::Request::post("/v1/chat/completions")
            .header("host", case.host)
            .header("content-type", "application/json")
            .header("content-length", case.body.len().to_string());
        if case.subscriber {
            req = req.header("user-type", "subscriber");
        }
        let req = req
            .body(Full::new(case.body.clone()))
            .map_err(|e| e.to_string())?;
        let resp = s
            .send_request(req)
            .await
            .map_err(|e| format!("send: {e}"))?;
        let status = resp.status().as_u16();
        let ct = resp
            .headers()
            .get("content-type")
            .map(|v| String::from_utf8_lossy(v.as_bytes()).to_string())
            .unwrap_or_default();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("body: {e}"))?
            .to_bytes()
            .to_vec();
        Ok((status, ct, body))
    }

    fn check(case: &Case, status: u16, ct: &str, body: &[u8]) -> Result<(), String> {
        let text = String::from_utf8_lossy(body);
        let shape_ok = match case.class {
            Class::Stream => {
                ct.starts_with("text/event-stream") && text.ends_with("data: [DONE]\n\n")
            }
            Class::Invalid => ct.starts_with("application/json") && text.contains("\"code\""),
            _ => ct.starts_with("application/json"),
        };
        if status == case.expect_status && shape_ok && text.contains(case.expect_in_body) {
            Ok(())
        } else {
            let cut: String = text.chars().take(200).collect();
            Err(format!(
                "{} to {}: expected {} with {}, got {status} ({ct}): {cut}",
                case.class.name(),
                case.host,
                case.expect_status,
                case.expect_in_body
            ))
        }
    }

    async fn worker(
        addr: SocketAddr,
        cases: Arc<Vec<Case>>,
        next: Arc<AtomicUsize>,
        done: Arc<AtomicUsize>,
        total: usize,
        results: Arc<Mutex<Results>>,
        pid: u32,
    ) {
        let mut sender: Option<Sender> = None;
        loop {
            let i = next.fetch_add(1, Ordering::SeqCst);
            if i >= total {
                return;
            }
            let case = &cases[i % cases.len()];
            let mut s = match sender.take() {
                Some(s) if !s.is_closed() => s,
                _ => match connect(addr).await {
                    Ok(s) => {
                        lock(&results).connections += 1;
                        s
                    }
                    Err(e) => {
                        let mut r = lock(&results);
                        r.transport_errors += 1;
                        r.unexpected(format!("request {i}: {e}"));
                        continue;
                    }
                },
            };
            let outcome = tokio::time::timeout(Duration::from_secs(30), send(&mut s, case)).await;
            let n = done.fetch_add(1, Ordering::SeqCst) + 1;
            let mut r = lock(&results);
            match outcome {
                Ok(Ok((status, ct, body))) => {
                    *r.statuses.entry((case.class, status)).or_default() += 1;
                    if let Err(e) = check(case, status, &ct, &body) {
                        r.unexpected(format!("request {i}: {e}"));
                    }
                    sender = Some(s);
                }
                Ok(Err(e)) => {
                    r.transport_errors += 1;
                    r.unexpected(format!("request {i} ({}): {e}", case.class.name()));
                }
                Err(_) => {
                    r.transport_errors += 1;
                    r.unexpected(format!(
                        "request {i} ({}): no answer in 30 s",
                        case.class.name()
                    ));
                }
            }
            if n.is_multiple_of(RSS_AT) || n == total {
                if let Ok(kib) = rss_kib(pid) {
                    r.rss.push((n, kib));
                }
            }
        }
    }

    fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
        m.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The sum of the filter's `llm_requests_total` series (every LLM request it logged).
    fn filter_requests_total(admin: SocketAddr) -> Option<f64> {
        let (_, body) = admin_get(admin, "/stats/prometheus").ok()?;
        Some(
            body.lines()
                .filter(|l| l.starts_with("llm_requests_total{"))
                .filter_map(|l| l.rsplit_once(' ')?.1.trim().parse::<f64>().ok())
                .sum(),
        )
    }

    pub fn run() -> Result<bool, String> {
        let args = parse_args()?;
        std::fs::create_dir_all(&args.out)
            .map_err(|e| format!("mkdir {}: {e}", args.out.display()))?;
        let out = std::fs::canonicalize(&args.out).map_err(|e| e.to_string())?;

        let pki = TestPki::generate(mock::PROVIDER_HOSTS)?;
        let ca = pki.write_ca(&out)?;
        let provider = MockServer::start_on(Some(&pki), 0)?;
        let local = MockServer::start_on(None, 0)?;
        for m in [&provider, &local] {
            m.set_recording(false);
        }
        provider.set_behavior(Behavior {
            sse_events: 4,
            sse_gap: Duration::ZERO,
            ..Behavior::default()
        });

        let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut doc = patch::load(&repo.join("envoy/mesh.yaml"))?;
        let env = patch::Environment {
            listener_port: 0,
            admin_port: 0,
            provider_addr: provider.addr(),
            plain_clusters: vec![("local-service".into(), local.addr())],
            ca_file: &ca,
            wasm_file: &args.wasm,
        };
        patch::patch(&mut doc, &env)?;
        let config = out.join("envoy.yaml");
        std::fs::write(&config, patch::render(&doc)?).map_err(|e| e.to_string())?;
        let mut envoy = start_envoy(&args.envoy, &config, &out)?;
        let pid = envoy.child.id();
        let rss_start = rss_kib(pid)?;
        println!(
            "soak: Envoy pid {pid} on {} (log {}), {} requests over {} connections",
            envoy.addr,
            envoy.log.display(),
            args.requests,
            args.connections
        );

        let cases = Arc::new(rotation());
        let next = Arc::new(AtomicUsize::new(0));
        let done = Arc::new(AtomicUsize::new(0));
        let results = Arc::new(Mutex::new(Results::default()));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("tokio: {e}"))?;
        let started = Instant::now();
        rt.block_on(async {
            let progress = {
                let done = done.clone();
                let total = args.requests;
                tokio::spawn(async move {
                    let mut last = 0;
                    loop {
                        tokio::time::sleep(Duration::from_secs(10)).await;
                        let n = done.load(Ordering::SeqCst);
                        let rss = rss_kib(pid).map(|k| k / 1024).unwrap_or(0);
                        println!(
                            "soak: {n}/{total} done ({:.0} req/s), Envoy RSS {rss} MiB",
                            (n - last) as f64 / 10.0
                        );
                        last = n;
                    }
                })
            };
            let tasks: Vec<_> = (0..args.connections)
                .map(|_| {
                    tokio::spawn(worker(
                        envoy.addr,
                        cases.clone(),
                        next.clone(),
                        done.clone(),
                        args.requests,
                        results.clone(),
                        pid,
                    ))
                })
                .collect();
            for t in tasks {
                let _ = t.await;
            }
            progress.abort();
        });
        let elapsed = started.elapsed();
        // Envoy settles (connections closed, buffers returned) before the last reading.
        std::thread::sleep(Duration::from_secs(2));
        let rss_end = rss_kib(pid)?;
        let filter_total = filter_requests_total(envoy.admin);
        let mut running = true;
        if let Ok(Some(status)) = envoy.child.try_wait() {
            println!("soak: Envoy exited: {status}");
            running = false;
        }
        let log = std::fs::read_to_string(&envoy.log).unwrap_or_default();
        let wasm_failures = wasm_failure_lines(&log);
        let access_lines = log.lines().filter(|l| l.contains(" provider=")).count();
        drop(envoy);

        let r = lock(&results);
        let rss_first = r
            .rss
            .iter()
            .find(|(n, _)| *n >= RSS_AT.min(args.requests))
            .map(|(_, k)| *k);
        println!("\n==== soak summary ====");
        println!(
            "requests: {} in {:.1} s ({:.0} req/s) over {} connection(s) opened",
            done.load(Ordering::SeqCst),
            elapsed.as_secs_f64(),
            done.load(Ordering::SeqCst) as f64 / elapsed.as_secs_f64(),
            r.connections
        );
        for ((class, status), n) in &r.statuses {
            println!("  {:<8} {status}: {n}", class.name());
        }
        println!(
            "unexpected answers or errors: {} (transport errors: {})",
            r.unexpected, r.transport_errors
        );
        for s in &r.unexpected_samples {
            println!("  {s}");
        }
        println!(
            "mock provider received {} request(s); local-service {}",
            provider.received(),
            local.received()
        );
        println!(
            "filter: llm_requests_total sums to {}; {access_lines} access-log lines",
            filter_total.map_or("?".into(), |v| format!("{v}"))
        );
        println!("wasm failures in Envoy's log: {}", wasm_failures.len());
        for l in wasm_failures.iter().take(5) {
            println!("  {l}");
        }
        let mib = |k: u64| k as f64 / 1024.0;
        let samples: Vec<String> = r
            .rss
            .iter()
            .map(|(n, k)| format!("{}k:{:.1}", n / 1000, mib(*k)))
            .collect();
        println!(
            "Envoy RSS MiB: start {:.1}; by requests done {}; end (2 s after) {:.1}",
            mib(rss_start),
            samples.join(" "),
            mib(rss_end)
        );
        let mut ok = running && r.unexpected == 0 && wasm_failures.is_empty();
        match rss_first {
            Some(first) => {
                let drift = mib(rss_end) - mib(first);
                let flat = drift.abs() <= args.rss_tolerance_mb;
                println!(
                    "RSS drift from {RSS_AT} requests to the end: {drift:+.1} MiB (limit ±{} MiB): {}",
                    args.rss_tolerance_mb,
                    if flat { "flat" } else { "NOT FLAT" }
                );
                ok &= flat;
            }
            None => {
                println!("RSS: no reading at {RSS_AT} requests");
                ok = false;
            }
        }
        println!("result: {}", if ok { "PASS" } else { "FAIL" });
        Ok(ok)
    }
}
