#![cfg(not(target_arch = "wasm32"))]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Configuration changes under traffic: Envoy reads its listener, which holds the
//! http_connection_manager with the llm-filter and the filter's configuration, from a watched
//! file (`dynamic_resources.lds_config.path_config_source` with `watched_directory`). The
//! test moves new files into place atomically (write a temp file in the same directory, then
//! rename) while four clients keep sending requests:
//!
//! 1. a valid config that changes DashScope's model: the mock sees the new model, and every
//!    request answers 200;
//! 2. an invalid config (an `LLMRoute` naming an unknown `providerHost`): Envoy rejects the
//!    LDS update (`listener_manager.lds.update_rejected` goes up; the log has the filter's
//!    error naming the resource and field) and the previous config keeps serving, again with
//!    every request answered 200.
//!
//! What counts as a failure, exactly: any answer other than 200, and any transport error on a
//! request that hyper had started to send (a reset, a connection closed before the answer, a
//! request not answered within 5 s). Not a failure: a request hyper never wrote because the
//! connection was already closed (`TrySendError::message` gives it back; Envoy closes
//! keep-alive connections of a replaced listener's filter chain as it drains them); such a
//! request is resent on a new connection and counted as `unsent_retried`. Each client also
//! opens a fresh connection every 10 requests, as a pool with a connection lifetime does, so
//! new connections (which get the new filter chain) keep coming; the rest are keep-alive.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde_yaml::{Mapping, Value};
use support::admin::wasm_failure_lines;
use support::client::SEED_BODY;
use support::envoy::Envoy;
use support::mock::MockServer;
use support::*;

const OLD_MODEL: &str = "qwen1.5-72b-chat";
const NEW_MODEL: &str = "qwen-max-reloaded";
const CLIENTS: usize = 4;
const REQUESTS_PER_CONNECTION: usize = 10;

/// The shipped mesh bootstrap, patched for the mocks, with its listener moved out to a
/// watched LDS file. Returns (bootstrap, listener, the filter's configuration string).
fn split_bootstrap(
    provider: &MockServer,
    local: &MockServer,
    lds_dir: &Path,
) -> (String, Value, String) {
    let mut doc = patched("mesh.yaml", provider, local);
    let configuration = patch::wasm_configuration(&mut doc).unwrap();
    let sr = doc
        .get_mut("static_resources")
        .and_then(Value::as_mapping_mut)
        .unwrap();
    let mut listeners = sr.remove("listeners").unwrap();
    let mut listener = listeners.as_sequence_mut().unwrap().remove(0);
    // A fixed port: the listener is replaced, and the test must find it again (port 0 would
    // be resolved anew by a replacement that does not take the old socket over).
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    listener["address"]["socket_address"]["port_value"] = Value::from(u64::from(port));
    let lds = lds_dir.join("lds.yaml");
    let dynamic: Value = serde_yaml::from_str(&format!(
        "lds_config:\n  resource_api_version: V3\n  path_config_source:\n    path: {}\n    watched_directory:\n      path: {}\n",
        lds.display(),
        lds_dir.display()
    ))
    .unwrap();
    let root = doc.as_mapping_mut().unwrap();
    root.insert("dynamic_resources".into(), dynamic);
    // Dynamic resources need a node identity, even from a file.
    root.insert(
        "node".into(),
        serde_yaml::from_str("{id: e2e-reload, cluster: e2e}").unwrap(),
    );
    (patch::render(&doc).unwrap(), listener, configuration)
}

/// Writes the LDS file for `listener` with the filter's `configuration`, atomically: a temp
/// file in the watched directory, then a rename over `lds.yaml`.
fn publish(lds_dir: &Path, listener: &Value, configuration: &str, version: &str) {
    let mut listener = listener.clone();
    let filters = listener["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]
        .as_sequence_mut()
        .unwrap();
    let wasm = filters
        .iter_mut()
        .find(|f| f["name"] == patch::WASM_FILTER)
        .unwrap();
    wasm["typed_config"]["config"]["configuration"]["value"] = Value::from(configuration);
    let mut resource = Mapping::new();
    resource.insert(
        "@type".into(),
        "type.googleapis.com/envoy.config.listener.v3.Listener".into(),
    );
    for (k, v) in listener.as_mapping().unwrap() {
        resource.insert(k.clone(), v.clone());
    }
    let mut file = Mapping::new();
    file.insert("version_info".into(), version.into());
    file.insert(
        "resources".into(),
        Value::Sequence(vec![Value::Mapping(resource)]),
    );
    let tmp = lds_dir.join(format!(".lds-{version}.tmp"));
    std::fs::write(&tmp, serde_yaml::to_string(&Value::Mapping(file)).unwrap()).unwrap();
    std::fs::rename(&tmp, lds_dir.join("lds.yaml")).unwrap();
}

/// What the clients saw.
#[derive(Default, Debug)]
struct Tally {
    ok: usize,
    /// Non-200 answers: (status, body).
    bad_status: Vec<(u16, String)>,
    /// Transport errors on requests that had (possibly) been sent.
    transport_errors: Vec<String>,
    /// Requests hyper never wrote because the connection had closed; resent.
    unsent_retried: usize,
    /// Connections opened.
    connections: usize,
    /// Answers with `connection: close` (Envoy draining a connection).
    closed_by_envoy: usize,
}

impl Tally {
    fn failures(&self) -> usize {
        self.bad_status.len() + self.transport_errors.len()
    }
}

fn chat_request() -> hyper::Request<Full<Bytes>> {
    hyper::Request::post("/?reload")
        .header("host", DASHSCOPE)
        .header("content-type", "application/json")
        .header("content-length", SEED_BODY.len().to_string())
        .body(Full::new(Bytes::from_static(SEED_BODY.as_bytes())))
        .unwrap()
}

enum Outcome {
    /// Status, `connection: close`, body.
    Answered(u16, bool, String),
    /// hyper gave the request back unwritten: the connection had closed.
    Unsent,
    Failed(String),
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

/// One client: keep-alive requests until `stop`, a new connection every
/// [`REQUESTS_PER_CONNECTION`] requests or when Envoy closes one.
async fn client_loop(addr: SocketAddr, stop: Arc<AtomicBool>, tally: Arc<Mutex<Tally>>) {
    let mut sender: Option<Sender> = None;
    let mut on_this_connection = 0;
    while !stop.load(Ordering::SeqCst) {
        if on_this_connection >= REQUESTS_PER_CONNECTION {
            sender = None;
        }
        let mut s = match sender.take() {
            Some(s) if !s.is_closed() => s,
            _ => match connect(addr).await {
                Ok(s) => {
                    tally.lock().unwrap().connections += 1;
                    on_this_connection = 0;
                    s
                }
                Err(e) => {
                    tally.lock().unwrap().transport_errors.push(e);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        if s.ready().await.is_err() {
            // Closed before anything was written on it: not a request yet.
            on_this_connection = REQUESTS_PER_CONNECTION;
            continue;
        }
        on_this_connection += 1;
        let sent = tokio::time::timeout(Duration::from_secs(5), async {
            let resp = match s.try_send_request(chat_request()).await {
                Ok(r) => r,
                Err(e) if e.message().is_some() => return Outcome::Unsent,
                Err(e) => return Outcome::Failed(format!("sent, then: {}", e.error())),
            };
            let status = resp.status().as_u16();
            let close = resp
                .headers()
                .get("connection")
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
            match resp.into_body().collect().await {
                Ok(b) => Outcome::Answered(
                    status,
                    close,
                    String::from_utf8_lossy(&b.to_bytes()).to_string(),
                ),
                Err(e) => Outcome::Failed(format!("answer body cut: {e}")),
            }
        })
        .await
        .unwrap_or_else(|_| Outcome::Failed("no answer within 5 s".into()));
        let mut t = tally.lock().unwrap();
        match sent {
            Outcome::Unsent => {
                t.unsent_retried += 1;
                on_this_connection = REQUESTS_PER_CONNECTION;
                continue;
            }
            Outcome::Failed(e) => {
                t.transport_errors.push(e);
                on_this_connection = REQUESTS_PER_CONNECTION;
                continue;
            }
            Outcome::Answered(status, close, body) => {
                if status == 200 {
                    t.ok += 1;
                } else {
                    t.bad_status.push((status, body));
                }
                if close {
                    t.closed_by_envoy += 1;
                    on_this_connection = REQUESTS_PER_CONNECTION;
                }
            }
        }
        drop(t);
        sender = Some(s);
    }
}

/// Four clients, stopped (and awaited) by [`Traffic::stop`].
struct Traffic {
    stop: Arc<AtomicBool>,
    tally: Arc<Mutex<Tally>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Traffic {
    fn start(addr: SocketAddr) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let tally = Arc::new(Mutex::new(Tally::default()));
        let tasks = (0..CLIENTS)
            .map(|_| tokio::spawn(client_loop(addr, stop.clone(), tally.clone())))
            .collect();
        Traffic { stop, tally, tasks }
    }

    fn answered(&self) -> usize {
        let t = self.tally.lock().unwrap();
        t.ok + t.bad_status.len()
    }

    async fn stop(self) -> Tally {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.tasks {
            tokio::time::timeout(Duration::from_secs(10), t)
                .await
                .expect("a client did not stop within 10 s")
                .unwrap();
        }
        Arc::try_unwrap(self.tally).unwrap().into_inner().unwrap()
    }
}

fn models_seen(provider: &MockServer, from: usize) -> Vec<String> {
    provider.requests()[from..]
        .iter()
        .map(|r| r.model().unwrap_or_default())
        .collect()
}

async fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn lds_dir() -> PathBuf {
    // Canonical: Envoy compares the watched directory with the path it is given.
    std::fs::canonicalize(support::envoy::temp_dir("reload-lds")).unwrap()
}

/// A valid config swapped in under traffic takes effect with no failed request; an invalid
/// one is rejected, logged, and the previous one keeps serving with no failed request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_swaps_under_traffic_fail_no_request() {
    let provider = MockServer::start_tls(&pki().0).unwrap();
    let local = MockServer::start_plain().unwrap();
    let dir = lds_dir();
    let (bootstrap, listener, v1) = split_bootstrap(&provider, &local, &dir);
    assert!(v1.contains(OLD_MODEL), "the shipped config changed: {v1}");
    publish(&dir, &listener, &v1, "v1");
    let envoy = Envoy::start(&bootstrap, "reload");
    assert_eq!(envoy.stat("listener_manager.lds.update_success"), Some(1));
    let rejected_before = envoy
        .stat("listener_manager.lds.update_rejected")
        .unwrap_or(0);

    let traffic = Traffic::start(envoy.addr);
    wait_until("traffic before the swap", Duration::from_secs(5), || {
        traffic.answered() >= 40
    })
    .await;
    assert!(models_seen(&provider, 0).iter().all(|m| m == OLD_MODEL));

    // (a) a valid config with another model.
    let v2 = v1.replace(OLD_MODEL, NEW_MODEL);
    let swap_at = provider.requests().len();
    publish(&dir, &listener, &v2, "v2");
    wait_until("LDS update v2 accepted", Duration::from_secs(10), || {
        envoy.stat("listener_manager.lds.update_success") == Some(2)
    })
    .await;
    wait_until(
        "the mock sees the new model",
        Duration::from_secs(5),
        || {
            models_seen(&provider, swap_at)
                .iter()
                .any(|m| m == NEW_MODEL)
        },
    )
    .await;
    // Connections opened after the swap get the new filter chain; once every client has
    // reconnected, only the new model arrives.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let settled = provider.requests().len();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let after = models_seen(&provider, settled);
    assert!(
        after.len() >= 20 && after.iter().all(|m| m == NEW_MODEL),
        "after the swap settled the mock saw: {after:?}"
    );

    // (b) an invalid config: an LLMRoute naming a provider host nobody has.
    let v3 = format!(
        "{v2}\n---\napiVersion: istio.alibabacloud.com/v1beta1\nkind: LLMRoute\nmetadata:\n  name: typo-route\n  namespace: default\nspec:\n  host: typo.example\n  rules:\n  - backendRefs:\n    - providerHost: nowhere.example\n"
    );
    let bad_at = provider.requests().len();
    publish(&dir, &listener, &v3, "v3-invalid");
    wait_until("LDS update v3 rejected", Duration::from_secs(10), || {
        envoy.stat("listener_manager.lds.update_rejected") == Some(rejected_before + 1)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let tally = traffic.stop().await;

    let after_bad = models_seen(&provider, bad_at);
    assert!(
        after_bad.len() >= 20 && after_bad.iter().all(|m| m == NEW_MODEL),
        "after the rejected update the mock saw: {after_bad:?}"
    );
    assert_eq!(
        envoy.stat("listener_manager.lds.update_success"),
        Some(2),
        "the invalid config was accepted"
    );
    let log = envoy.log();
    for needle in [
        "LLMRoute default/typo-route",
        "rules[0].backendRefs[0].providerHost",
        "nowhere.example",
    ] {
        assert!(
            log.lines()
                .any(|l| l.contains("llm-filter: invalid configuration") && l.contains(needle)),
            "no filter error line naming `{needle}`:\n{log}"
        );
    }
    // Envoy logs the refused plugin as "Plugin configured to fail closed failed to load": that
    // line is the rejection itself (at config time, no request involved); nothing else may be.
    let failures: Vec<&str> = wasm_failure_lines(&log)
        .into_iter()
        .filter(|l| !l.ends_with("Plugin configured to fail closed failed to load"))
        .collect();
    assert!(failures.is_empty(), "wasm failures: {failures:#?}");
    assert!(
        log.contains("lds: listener 'llm' config rejected"),
        "Envoy did not log the rejection:\n{log}"
    );
    assert!(
        !log.contains("sk-demo"),
        "an API key appears in Envoy's log"
    );

    eprintln!("reload traffic: {tally:?}");
    assert!(
        tally.ok >= 100,
        "too little traffic to prove much: {tally:?}"
    );
    assert_eq!(tally.failures(), 0, "requests failed: {tally:?}");
}
