#![cfg(not(target_arch = "wasm32"))]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The Grafana dashboard (`envoy/dashboards/llm-filter.json`) against a real Prometheus
//! (Debian's `prometheus`, installed by `scripts/test.sh`) scraping real Envoy on the shipped
//! `envoy/mesh.yaml` every second: after JSON, subscriber, split, streamed and failing requests,
//! every `expr` of every panel and every template-variable query returns exactly the series the
//! traffic produced, and the raw counters hold exactly the tokens the mock provider reported.
//!
//! Traffic comes in two rounds so that every series has a sample before and after an increase:
//! a counter first scraped at its final value has a `rate` of 0, which would prove little.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::admin::admin_get;
use support::client::{Req, SEED_BODY};
use support::envoy::temp_dir;
use support::mock::{Behavior, FixedReply};
use support::*;

/// What the test puts for Grafana's `$__rate_interval` and `$__range`: longer than the whole
/// test, so each query covers every sample Prometheus took.
const WINDOW: &str = "1m";

const DASHBOARD: &str = "envoy/dashboards/llm-filter.json";

// ---------------------------------------------------------------------------------------------
// Prometheus

/// A Prometheus server on 127.0.0.1 scraping one Envoy's admin `/stats/prometheus` every
/// second, in its own temp dir; killed on drop, its log printed if the test failed.
struct Prometheus {
    child: Child,
    dir: PathBuf,
    addr: SocketAddr,
}

/// `$PROMETHEUS`, else `prometheus` on `PATH`. Missing → the test fails.
fn prometheus_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("PROMETHEUS").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join("prometheus"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "the `prometheus` binary is not on PATH. This test runs a real Prometheus: run \
                 scripts/test.sh (it installs Debian's `prometheus` package), or \
                 `apt-get install prometheus`, or set PROMETHEUS=/path/to/prometheus."
            )
        })
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Waits for `/-/ready`; false if Prometheus exited or is not ready after 30 s.
fn wait_ready(child: &mut Child, addr: SocketAddr) -> bool {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return false;
        }
        if let Ok((200, _)) = admin_get(addr, "/-/ready") {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

impl Prometheus {
    fn start(envoy_admin: SocketAddr) -> Prometheus {
        let binary = prometheus_binary();
        let dir = temp_dir("prometheus");
        let config = dir.join("prometheus.yml");
        // The dynamic module's families are `envoy_llm_<name>`: renamed to the wasm build's
        // `llm_<name>`, so the dashboards' queries serve both builds.
        let relabel = if support::native::native_build() {
            "  metric_relabel_configs:\n  - source_labels: [__name__]\n    \
             regex: 'envoy_(llm_.*)'\n    target_label: __name__\n    replacement: '$1'\n"
        } else {
            ""
        };
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n\
                 scrape_configs:\n- job_name: envoy\n  metrics_path: /stats/prometheus\n  \
                 static_configs:\n  - targets: ['{envoy_admin}']\n{relabel}"
            ),
        )
        .expect("write prometheus.yml");
        let log_path = dir.join("prometheus.log");
        // The port is free when chosen; if another process takes it first, try another.
        for _ in 0..3 {
            let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
            let log = std::fs::File::create(&log_path).expect("create prometheus.log");
            let mut child = Command::new(&binary)
                .arg(format!("--config.file={}", config.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.join("data").display()
                ))
                .arg(format!("--web.listen-address={addr}"))
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("clone log handle"))
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
            if wait_ready(&mut child, addr) {
                return Prometheus { child, dir, addr };
            }
            let _ = child.kill();
            let _ = child.wait();
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            assert!(
                log.contains("address already in use"),
                "Prometheus did not start:\n{log}"
            );
        }
        panic!("Prometheus found no free port in 3 attempts");
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    /// `GET path` on the HTTP API; the `data` of a `success` answer.
    fn api(&self, path: &str) -> Value {
        let (status, body) = admin_get(self.addr, path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let v: Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {body}"));
        assert!(
            status == 200 && v["status"] == "success",
            "{path}: status {status}: {body}"
        );
        v["data"].clone()
    }

    /// An instant query at the current time: each series' labels and value.
    fn query(&self, expr: &str) -> Vec<(BTreeMap<String, String>, f64)> {
        let data = self.api(&format!("/api/v1/query?query={}", urlencode(expr)));
        assert_eq!(data["resultType"], "vector", "{expr}: {data}");
        data["result"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                let labels = r["metric"]
                    .as_object()
                    .unwrap()
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
                    .collect();
                let value = r["value"][1].as_str().unwrap();
                let value = value
                    .parse::<f64>()
                    .unwrap_or_else(|e| panic!("{expr}: value {value}: {e}"));
                (labels, value)
            })
            .collect()
    }

    /// The single value of an aggregated query (0 when there is no series yet).
    fn scalar(&self, expr: &str) -> f64 {
        match self.query(expr).as_slice() {
            [] => 0.0,
            [(_, v)] => *v,
            more => panic!("{expr}: more than one series: {more:?}"),
        }
    }

    /// What Grafana's `label_values(matcher, label)` lists.
    fn label_values(&self, matcher: &str, label: &str) -> BTreeSet<String> {
        let data = self.api(&format!(
            "/api/v1/label/{label}/values?match[]={}",
            urlencode(matcher)
        ));
        data.as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect()
    }

    /// Polls until `expr` (one aggregated value) equals `want`.
    fn wait_for(&self, expr: &str, want: f64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.scalar(expr);
            if got == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{expr} is {got} after {timeout:?}, want {want} (histograms reach \
                 /stats/prometheus at Envoy's 5 s stats flush)"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "===== Prometheus log ({}) =====\n{}\n===== end of Prometheus log =====",
                self.dir.display(),
                self.log()
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            b => format!("%{b:02X}"),
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Traffic and what it must show

/// Provider, model sent upstream, rule (empty for a direct call).
type Series = (String, String, String);

/// What the mock reported for one series.
#[derive(Debug, Default, Clone)]
struct Seen {
    /// Requests by response class.
    classes: BTreeMap<String, u64>,
    prompt: u64,
    completion: u64,
    /// Answers with readable usage.
    readable: u64,
    unknown: u64,
    streams: u64,
}

impl Seen {
    fn requests(&self) -> u64 {
        self.classes.values().sum()
    }

    fn errors(&self) -> u64 {
        self.classes
            .iter()
            .filter(|(c, _)| c.as_str() != "2xx")
            .map(|(_, n)| n)
            .sum()
    }

    /// Whether the filter defined `metric` (a Prometheus family name) for this series.
    fn has(&self, metric: &str) -> bool {
        match metric {
            "llm_requests_total" | "llm_upstream_latency_ms" => self.requests() > 0,
            "llm_prompt_tokens_total" | "llm_completion_tokens_total" => self.readable > 0,
            "llm_usage_unknown_total" => self.unknown > 0,
            "llm_time_to_first_token_ms" => self.streams > 0,
            other => panic!("the dashboard queries {other}, which this test does not know"),
        }
    }
}

#[derive(Debug, Default)]
struct Traffic {
    series: BTreeMap<Series, Seen>,
}

fn provider_name(sni: Option<&str>) -> &'static str {
    match sni {
        Some(DASHSCOPE) => "dashscope-qwen",
        Some(MOONSHOT) => "moonshot",
        other => panic!("the mock was reached with SNI {other:?}"),
    }
}

fn usage_of(v: &Value) -> Option<(u64, u64)> {
    let u = v.get("usage")?;
    Some((
        u["prompt_tokens"].as_u64()?,
        u["completion_tokens"].as_u64()?,
    ))
}

impl Traffic {
    fn total(&self, f: impl Fn(&Seen) -> u64) -> u64 {
        self.series.values().map(f).sum()
    }

    /// Sends one request and books what the provider answered under its series.
    async fn send(&mut self, s: &Stack, req: Req, rule: &str) -> Series {
        let before = s.provider.requests().len();
        let resp = s.send(&req).await;
        let recorded = s.provider.requests();
        assert_eq!(
            recorded.len(),
            before + 1,
            "the request did not reach the mock"
        );
        let upstream = recorded.last().unwrap();
        let key = (
            provider_name(upstream.sni.as_deref()).to_string(),
            upstream.model().expect("a model sent upstream"),
            rule.to_string(),
        );
        let stream = upstream
            .json()
            .is_some_and(|j| j["stream"] == Value::Bool(true));
        let seen = self.series.entry(key.clone()).or_default();
        let class = format!("{}xx", resp.status / 100);
        *seen.classes.entry(class).or_default() += 1;
        let usage = if resp.status != 200 {
            None
        } else if stream {
            seen.streams += 1;
            resp.sse_events()
                .iter()
                .filter_map(|(_, d)| serde_json::from_str::<Value>(d).ok())
                .find_map(|e| usage_of(&e))
        } else {
            usage_of(&resp.json())
        };
        match usage {
            Some((prompt, completion)) => {
                seen.readable += 1;
                seen.prompt += prompt;
                seen.completion += completion;
            }
            None => seen.unknown += 1,
        }
        key
    }

    /// One round: subscriber and direct JSON calls, a stream, the weighted split until both
    /// providers answered, and a provider failing with an HTML page (5xx, usage unknown).
    async fn round(&mut self, s: &Stack) {
        for i in 0..2 {
            let body = SEED_BODY.replace("yourself", &"yourself ".repeat(i + 1));
            let req = Req::chat(DASHSCOPE, &body).header("user-type", "subscriber");
            self.send(s, req, "vip-route").await;
        }
        self.send(s, Req::chat(DASHSCOPE, SEED_BODY), "").await;
        let stream = r#"{"messages":[{"role":"user","content":"stream please"}],"stream":true}"#;
        self.send(s, Req::chat(DASHSCOPE, stream), "").await;
        let mut providers = BTreeSet::new();
        for _ in 0..40 {
            let (provider, _, _) = self
                .send(s, Req::chat("demo-llm-server", SEED_BODY), "migrate-rule")
                .await;
            providers.insert(provider);
            if providers.len() == 2 {
                break;
            }
        }
        assert_eq!(
            providers.len(),
            2,
            "the 50/50 split chose one provider 40 times"
        );
        s.provider.set_behavior(Behavior {
            fixed: Some(FixedReply {
                status: 503,
                content_type: "text/html".into(),
                body: b"<html><body>upstream maintenance</body></html>".to_vec(),
            }),
            ..Behavior::default()
        });
        self.send(s, Req::chat(MOONSHOT, SEED_BODY), "").await;
        s.provider.set_behavior(Behavior::default());
    }

    /// Waits until Prometheus holds this traffic's counts, histograms included.
    fn wait_scraped(&self, prom: &Prometheus) {
        let timeout = Duration::from_secs(15);
        let requests = self.total(Seen::requests) as f64;
        prom.wait_for("sum(llm_requests_total)", requests, timeout);
        prom.wait_for("sum(llm_upstream_latency_ms_count)", requests, timeout);
        let streams = self.total(|s| s.streams) as f64;
        prom.wait_for("sum(llm_time_to_first_token_ms_count)", streams, timeout);
    }
}

// ---------------------------------------------------------------------------------------------
// The dashboard's queries

/// A series' labels as Prometheus returns them: an empty label is no label at all.
type Labels = BTreeMap<String, String>;

fn labels_of(key: &Series, seen: &Seen, by: &[String]) -> Vec<Labels> {
    let values = |class: Option<&str>| -> Labels {
        by.iter()
            .filter_map(|l| {
                let v = match l.as_str() {
                    "provider" => key.0.as_str(),
                    "model" => key.1.as_str(),
                    "rule" => key.2.as_str(),
                    "class" => class.unwrap_or_default(),
                    other => panic!("grouping by {other}, which the filter does not set"),
                };
                (!v.is_empty()).then(|| (l.clone(), v.to_string()))
            })
            .collect()
    };
    if by.iter().any(|l| l == "class") {
        seen.classes.keys().map(|c| values(Some(c))).collect()
    } else {
        vec![values(None)]
    }
}

/// The metric family an expression reads (`llm_x_bucket` → `llm_x`).
fn family(expr: &str) -> String {
    let start = expr
        .find("llm_")
        .unwrap_or_else(|| panic!("no llm_ metric in {expr}"));
    let name: String = expr[start..]
        .chars()
        .take_while(|c| c.is_ascii_lowercase() || *c == '_')
        .collect();
    name.trim_end_matches("_bucket").to_string()
}

/// The labels every `by (...)` of the expression keeps (`le` aside); they must agree.
fn grouping(expr: &str) -> Vec<String> {
    let mut all = expr.split("by (").skip(1).map(|rest| {
        let list = rest.split_once(')').expect("closing parenthesis").0;
        list.split(',')
            .map(|l| l.trim().to_string())
            .filter(|l| l != "le")
            .collect::<Vec<_>>()
    });
    let first = all
        .next()
        .unwrap_or_else(|| panic!("no `by (...)` in {expr}"));
    for other in all {
        assert_eq!(other, first, "different groupings in {expr}");
    }
    first
}

/// A value as Grafana puts it into a regex matcher (regex metacharacters escaped, then the
/// backslash escaped for the PromQL string).
fn regex_literal(v: &str) -> String {
    v.chars()
        .map(|c| {
            if r".+*?()|[]{}^$\".contains(c) {
                format!(r"\\{c}")
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// The template variables and Grafana's interval variables replaced.
fn substitute(expr: &str, vars: &[(&str, String)]) -> String {
    let mut e = expr
        .replace("$__rate_interval", WINDOW)
        .replace("$__range", WINDOW);
    for (name, value) in vars {
        e = e.replace(&format!("${name}"), value);
    }
    assert!(!e.contains('$'), "a variable was left in {e}");
    e
}

fn all_vars() -> Vec<(&'static str, String)> {
    ["provider", "model", "rule"]
        .into_iter()
        .map(|v| (v, ".*".to_string()))
        .collect()
}

fn vars_for(key: &Series) -> Vec<(&'static str, String)> {
    vec![
        ("provider", regex_literal(&key.0)),
        ("model", regex_literal(&key.1)),
        ("rule", regex_literal(&key.2)),
    ]
}

/// Each panel's title with its targets' expressions (rows' nested panels included).
fn panel_queries(dashboard: &Value) -> Vec<(String, String)> {
    fn walk(panels: &Value, out: &mut Vec<(String, String)>) {
        for p in panels.as_array().into_iter().flatten() {
            walk(&p["panels"], out);
            if p["type"] == "row" {
                continue;
            }
            let title = p["title"].as_str().unwrap_or_default().to_string();
            let targets = p["targets"].as_array();
            assert!(
                targets.is_some_and(|t| !t.is_empty()),
                "panel {title:?} has no query"
            );
            assert_eq!(p["datasource"]["uid"], "${datasource}", "panel {title:?}");
            let mut refs = BTreeSet::new();
            for t in targets.into_iter().flatten() {
                assert_eq!(t["datasource"]["uid"], "${datasource}", "panel {title:?}");
                assert!(
                    refs.insert(t["refId"].to_string()),
                    "panel {title:?}: refId twice"
                );
                let expr = t["expr"].as_str().expect("every target has an expr");
                out.push((title.clone(), expr.to_string()));
            }
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

/// Runs one panel query with these variables and checks it against the traffic.
fn check_query(
    prom: &Prometheus,
    traffic: &Traffic,
    title: &str,
    expr: &str,
    only: Option<&Series>,
) {
    let vars = only.map_or_else(all_vars, vars_for);
    let promql = substitute(expr, &vars);
    let metric = family(expr);
    let by = grouping(expr);
    let result = prom.query(&promql);
    let context = || format!("panel {title:?}, query\n{promql}\ngave {result:#?}");

    let mut want = BTreeSet::new();
    for (key, seen) in &traffic.series {
        if only.is_none_or(|o| o == key) && seen.has(&metric) {
            want.extend(labels_of(key, seen, &by));
        }
    }
    let got: BTreeSet<Labels> = result.iter().map(|(l, _)| l.clone()).collect();
    assert_eq!(got, want, "{}", context());
    assert_eq!(got.len(), result.len(), "a series twice: {}", context());

    for (labels, value) in &result {
        assert!(value.is_finite(), "{labels:?} is {value}: {}", context());
        if expr.contains("histogram_quantile") {
            assert!(*value >= 0.0, "{labels:?}: {}", context());
        } else if expr.contains("class=~") {
            // The error ratio: every series here is all-2xx or all-failed.
            let key = traffic
                .series
                .iter()
                .find(|(k, _)| labels_of(k, &Seen::default(), &by).contains(labels))
                .map(|(_, s)| s)
                .unwrap();
            let want = key.errors() as f64 / key.requests() as f64;
            assert!(
                (value - want).abs() < 1e-9,
                "{labels:?} want {want}: {}",
                context()
            );
        } else {
            assert!(*value > 0.0, "{labels:?}: {}", context());
        }
    }
}

/// Template variables: `label_values(matcher, label)`, as Grafana asks Prometheus.
fn check_variables(prom: &Prometheus, traffic: &Traffic, dashboard: &Value) -> usize {
    let vars = dashboard["templating"]["list"]
        .as_array()
        .expect("templating.list");
    let ds = vars
        .iter()
        .find(|v| v["name"] == "datasource")
        .expect("a datasource variable");
    assert_eq!(ds["type"], "datasource");
    assert_eq!(ds["query"], "prometheus");
    let mut checked = 0;
    for name in ["provider", "model", "rule"] {
        let var = vars
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no template variable {name}"));
        assert_eq!(var["type"], "query", "{name}");
        assert_eq!(var["datasource"]["uid"], "${datasource}", "{name}");
        assert_eq!(var["allValue"], ".*", "{name}: All must match every value");
        let query = var["query"].as_str().expect("a query string");
        let inner = query
            .strip_prefix("label_values(")
            .and_then(|q| q.strip_suffix(')'))
            .unwrap_or_else(|| panic!("{name}: not label_values(...): {query}"));
        let (matcher, label) = inner
            .rsplit_once(',')
            .expect("label_values(matcher, label)");
        let label = label.trim();
        assert_eq!(label, name);
        // Every value, then narrowed to each provider in turn (the variables chain).
        let providers: BTreeSet<&String> = traffic.series.keys().map(|k| &k.0).collect();
        let mut scopes: Vec<Option<&String>> = vec![None];
        if matcher.contains("$provider") {
            scopes.extend(providers.into_iter().map(Some));
        }
        for scope in scopes {
            let vars: Vec<(&str, String)> = all_vars()
                .into_iter()
                .map(|(n, v)| match (n, scope) {
                    ("provider", Some(p)) => (n, regex_literal(p)),
                    _ => (n, v),
                })
                .collect();
            let got = prom.label_values(&substitute(matcher, &vars), label);
            let want: BTreeSet<String> = traffic
                .series
                .iter()
                .filter(|(k, s)| scope.is_none_or(|p| *p == k.0) && s.requests() > 0)
                .map(|(k, _)| match label {
                    "provider" => k.0.clone(),
                    "model" => k.1.clone(),
                    _ => k.2.clone(),
                })
                .filter(|v| !v.is_empty())
                .collect();
            assert_eq!(
                got, want,
                "variable {name} ({query}) for provider {scope:?}"
            );
            checked += 1;
        }
    }
    checked
}

/// The raw counters hold exactly what the mock reported, series by series.
fn check_exact_totals(prom: &Prometheus, traffic: &Traffic) {
    let by_series = |expr: &str| -> BTreeMap<Series, f64> {
        prom.query(expr)
            .into_iter()
            .map(|(l, v)| {
                let get = |k: &str| l.get(k).cloned().unwrap_or_default();
                ((get("provider"), get("model"), get("rule")), v)
            })
            .collect()
    };
    let expect = |expr: &str, f: &dyn Fn(&Seen) -> u64| {
        let want: BTreeMap<Series, f64> = traffic
            .series
            .iter()
            .filter(|(_, s)| f(s) > 0)
            .map(|(k, s)| (k.clone(), f(s) as f64))
            .collect();
        assert_eq!(by_series(expr), want, "{expr}");
    };
    expect(
        "sum by (provider, model, rule) (llm_prompt_tokens_total)",
        &|s| s.prompt,
    );
    expect(
        "sum by (provider, model, rule) (llm_completion_tokens_total)",
        &|s| s.completion,
    );
    expect(
        "sum by (provider, model, rule) (llm_usage_unknown_total)",
        &|s| s.unknown,
    );
    expect(
        "sum by (provider, model, rule) (llm_upstream_latency_ms_count)",
        &Seen::requests,
    );
    expect(
        "sum by (provider, model, rule) (llm_time_to_first_token_ms_count)",
        &|s| s.streams,
    );
    for class in ["2xx", "5xx"] {
        expect(
            &format!("sum by (provider, model, rule) (llm_requests_total{{class=\"{class}\"}})"),
            &|s| s.classes.get(class).copied().unwrap_or(0),
        );
    }
}

fn load_dashboard() -> Value {
    let path = repo().join(DASHBOARD);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{DASHBOARD} is not JSON: {e}"))
}

#[tokio::test]
async fn dashboard_queries_return_the_traffic_in_real_prometheus() {
    let dashboard = load_dashboard();
    let queries = panel_queries(&dashboard);
    assert!(
        queries.len() >= 10,
        "only {} queries in {DASHBOARD}",
        queries.len()
    );
    let ids: Vec<&Value> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| &p["id"])
        .collect();
    let unique: BTreeSet<String> = ids.iter().map(|v| v.to_string()).collect();
    assert_eq!(unique.len(), ids.len(), "panel ids must be unique");

    let s = Stack::start("mesh.yaml");
    let prom = Prometheus::start(s.envoy.admin);
    let mut traffic = Traffic::default();
    traffic.round(&s).await;
    traffic.wait_scraped(&prom);
    traffic.round(&s).await;
    traffic.wait_scraped(&prom);
    assert_eq!(
        prom.scalar("up{job=\"envoy\"}"),
        1.0,
        "Envoy's scrape failed"
    );

    // The filter's metrics live in Envoy's `wasmcustom` stats namespace (what Istio's
    // inclusion prefixes must let through); /stats/prometheus drops the namespace. The dynamic
    // module's are `llm.<name>` (its metrics namespace), `envoy_llm_<name>` in Prometheus, which
    // the scrape's relabelling (docs/native.md) turns back into the dashboards' names.
    let (_, stats) = admin_get(s.envoy.admin, "/stats?filter=llm.requests_total").unwrap();
    let namespace = if support::native::native_build() {
        "llm.requests_total"
    } else {
        "wasmcustom."
    };
    assert!(
        stats
            .lines()
            .any(|l| l.starts_with(namespace) && l.contains("llm.requests_total")),
        "{stats}"
    );

    check_exact_totals(&prom, &traffic);
    let variables = check_variables(&prom, &traffic, &dashboard);
    let mut runs = 0;
    for (title, expr) in &queries {
        check_query(&prom, &traffic, title, expr, None);
        for key in traffic.series.keys() {
            check_query(&prom, &traffic, title, expr, Some(key));
        }
        runs += 1 + traffic.series.len();
    }
    eprintln!(
        "{} dashboard queries checked {runs} times over {} series, {variables} variable lookups",
        queries.len(),
        traffic.series.len()
    );
}
