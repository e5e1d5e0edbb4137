//! A mock LLM provider: HTTPS (HTTP/1.1 and h2 via ALPN) with a certificate for every provider
//! host, or plain HTTP (the `local-service` stand-in). It records every request (TLS, SNI,
//! ALPN, method, path with query, headers, body, arrival time) and answers like an
//! OpenAI-compatible provider: a `chat.completion` echoing the model it received, or an SSE
//! stream of `chat.completion.chunk` events when the body asks for `stream: true`. Tests can
//! program a fixed status/body, a delay before the headers, the gap between SSE events and an
//! abort after N events.
//!
//! Shared by the e2e tests and `examples/mock_stack.rs`: it never panics, and runs on its own
//! thread and tokio runtime so it is independent of the caller's runtime.

use http_body_util::BodyExt;
use hyper::body::{Body, Bytes, Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, oneshot};

/// Host names the mock's certificate covers: every provider host of the shipped configs.
pub const PROVIDER_HOSTS: &[&str] = &["dashscope.aliyuncs.com", "api.moonshot.cn"];

/// A throw-away CA and a server certificate it signed.
pub struct TestPki {
    /// PEM of the CA certificate (what Envoy's `trusted_ca` must point at).
    pub ca_pem: String,
    cert: CertificateDer<'static>,
    key: Vec<u8>,
}

impl TestPki {
    /// A new CA, and a server certificate for `hosts` plus `localhost` and `127.0.0.1`.
    pub fn generate(hosts: &[&str]) -> Result<TestPki, String> {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
            KeyPair, KeyUsagePurpose,
        };
        let err = |e: rcgen::Error| format!("certificate generation failed: {e}");
        let ca_key = KeyPair::generate().map_err(err)?;
        let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "llm-filter e2e test CA");
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca.self_signed(&ca_key).map_err(err)?;
        let issuer = Issuer::new(ca, ca_key);

        let mut names: Vec<String> = hosts.iter().map(|h| h.to_string()).collect();
        names.push("localhost".into());
        names.push("127.0.0.1".into());
        let mut leaf = CertificateParams::new(names).map_err(err)?;
        leaf.distinguished_name
            .push(DnType::CommonName, "llm-filter mock provider");
        leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        leaf.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        let leaf_key = KeyPair::generate().map_err(err)?;
        let leaf_cert = leaf.signed_by(&leaf_key, &issuer).map_err(err)?;
        Ok(TestPki {
            ca_pem: ca_cert.pem(),
            cert: leaf_cert.der().clone(),
            key: leaf_key.serialize_der(),
        })
    }

    /// Writes `ca.pem` into `dir` and returns its path.
    pub fn write_ca(&self, dir: &Path) -> Result<PathBuf, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
        let path = dir.join("ca.pem");
        std::fs::write(&path, &self.ca_pem)
            .map_err(|e| format!("write {}: {e}", path.display()))?;
        Ok(path)
    }

    fn server_config(&self) -> Result<rustls::ServerConfig, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.clone()));
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("rustls: {e}"))?
            .with_no_client_auth()
            .with_single_cert(vec![self.cert.clone()], key)
            .map_err(|e| format!("rustls: {e}"))?;
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(cfg)
    }
}

/// A fixed answer instead of the default chat completion.
#[derive(Clone, Debug)]
pub struct FixedReply {
    pub status: u16,
    pub content_type: String,
    pub body: Vec<u8>,
}

/// How the mock answers. Change it with [`MockServer::set_behavior`].
#[derive(Clone, Debug)]
pub struct Behavior {
    /// Answer this instead of the default.
    pub fixed: Option<FixedReply>,
    /// Wait this long after the request body before sending the response headers.
    pub header_delay: Duration,
    /// Number of content events in an SSE answer (then a usage chunk and `[DONE]`).
    pub sse_events: usize,
    /// Gap between consecutive SSE events.
    pub sse_gap: Duration,
    /// Abort the response (connection/stream reset) after this many content events.
    pub abort_after_events: Option<usize>,
    /// Answer requests that came with this SNI (one provider host) with a fixed reply: one
    /// mock serves every provider host, and each can fail on its own.
    pub fixed_for_sni: Vec<(String, FixedReply)>,
}

impl Default for Behavior {
    fn default() -> Self {
        Behavior {
            fixed: None,
            header_delay: Duration::ZERO,
            sse_events: 4,
            sse_gap: Duration::from_millis(20),
            abort_after_events: None,
            fixed_for_sni: Vec::new(),
        }
    }
}

/// One request as the mock received it.
#[derive(Clone, Debug)]
pub struct Recorded {
    /// 1-based arrival order; also sent back as `x-mock-request-id`.
    pub id: usize,
    pub tls: bool,
    /// The SNI the client sent in its TLS ClientHello.
    pub sni: Option<String>,
    /// The ALPN protocol negotiated (`h2` or `http/1.1`).
    pub alpn: Option<String>,
    /// `HTTP/1.1` or `HTTP/2.0`.
    pub version: String,
    pub method: String,
    /// Path with query string, as received.
    pub path: String,
    /// `:authority` (h2) or `Host` (HTTP/1.1).
    pub authority: Option<String>,
    /// All headers in arrival order (names lower-case).
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
    /// When the request headers arrived.
    pub arrived: Instant,
    /// Whether the whole body arrived (false: the client reset the request).
    pub complete: bool,
}

impl Recorded {
    /// The first value of a header, lossily as text.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| String::from_utf8_lossy(v).to_string())
    }

    /// How many times a header appears.
    pub fn header_count(&self, name: &str) -> usize {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .count()
    }

    /// The body as JSON, if it is JSON.
    pub fn json(&self) -> Option<serde_json::Value> {
        serde_json::from_slice(&self.body).ok()
    }

    /// The body's `model`, if any.
    pub fn model(&self) -> Option<String> {
        self.json()
            .and_then(|j| j.get("model").and_then(|m| m.as_str().map(str::to_string)))
    }

    /// The `authorization` header with the secret cut to its last 4 characters.
    pub fn authorization_redacted(&self) -> Option<String> {
        self.header("authorization").map(|a| redact(&a))
    }
}

/// `Bearer sk-abcdefgh` → `Bearer …efgh`: enough to tell keys apart, never the key.
pub fn redact(authorization: &str) -> String {
    let (scheme, secret) = match authorization.split_once(' ') {
        Some((s, k)) => (format!("{s} "), k),
        None => (String::new(), authorization),
    };
    let chars: Vec<char> = secret.chars().collect();
    let tail: String = chars[chars.len().saturating_sub(4)..].iter().collect();
    format!("{scheme}…{tail}")
}

type Observer = Box<dyn Fn(&Recorded) + Send + Sync>;

struct State {
    tls: bool,
    behavior: Mutex<Behavior>,
    requests: Mutex<Vec<Recorded>>,
    next_id: AtomicUsize,
    observer: Mutex<Option<Observer>>,
    /// Keep each request for [`MockServer::requests`] (off for long runs: bodies add up).
    record: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A running mock server; stops when dropped.
pub struct MockServer {
    addr: SocketAddr,
    state: Arc<State>,
    stop: Option<oneshot::Sender<()>>,
}

impl MockServer {
    /// An HTTPS mock provider on 127.0.0.1:0 serving `pki`'s server certificate.
    pub fn start_tls(pki: &TestPki) -> Result<MockServer, String> {
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(pki.server_config()?));
        MockServer::start(Some(acceptor), 0)
    }

    /// A plain-HTTP mock (the `local-service` stand-in) on 127.0.0.1:0.
    pub fn start_plain() -> Result<MockServer, String> {
        MockServer::start(None, 0)
    }

    /// Like [`start_tls`](Self::start_tls) / [`start_plain`](Self::start_plain) on a chosen
    /// port (0: any).
    pub fn start_on(pki: Option<&TestPki>, port: u16) -> Result<MockServer, String> {
        let acceptor = match pki {
            Some(p) => Some(tokio_rustls::TlsAcceptor::from(Arc::new(
                p.server_config()?,
            ))),
            None => None,
        };
        MockServer::start(acceptor, port)
    }

    fn start(tls: Option<tokio_rustls::TlsAcceptor>, port: u16) -> Result<MockServer, String> {
        let listener = std::net::TcpListener::bind(("127.0.0.1", port))
            .map_err(|e| format!("mock: bind 127.0.0.1:{port}: {e}"))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| format!("mock: {e}"))?;
        let addr = listener.local_addr().map_err(|e| format!("mock: {e}"))?;
        let state = Arc::new(State {
            tls: tls.is_some(),
            behavior: Mutex::new(Behavior::default()),
            requests: Mutex::new(Vec::new()),
            next_id: AtomicUsize::new(0),
            observer: Mutex::new(None),
            record: AtomicBool::new(true),
        });
        let (stop_tx, stop_rx) = oneshot::channel();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("mock-provider")
            .enable_all()
            .build()
            .map_err(|e| format!("mock: tokio runtime: {e}"))?;
        let st = state.clone();
        std::thread::Builder::new()
            .name(format!("mock-{}", addr.port()))
            .spawn(move || {
                rt.block_on(async move {
                    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                        return;
                    };
                    accept_loop(listener, tls, st, stop_rx).await;
                });
                rt.shutdown_background();
            })
            .map_err(|e| format!("mock: thread: {e}"))?;
        Ok(MockServer {
            addr,
            state,
            stop: Some(stop_tx),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn set_behavior(&self, b: Behavior) {
        *lock(&self.state.behavior) = b;
    }

    /// Called with every request once its body has arrived (the mock_stack's log line).
    pub fn set_observer(&self, f: impl Fn(&Recorded) + Send + Sync + 'static) {
        *lock(&self.state.observer) = Some(Box::new(f));
    }

    /// Requests whose body arrived completely, in arrival order.
    pub fn requests(&self) -> Vec<Recorded> {
        lock(&self.state.requests)
            .iter()
            .filter(|r| r.complete)
            .cloned()
            .collect()
    }

    /// Every request whose headers arrived, complete or not.
    pub fn all_requests(&self) -> Vec<Recorded> {
        lock(&self.state.requests).clone()
    }

    pub fn clear(&self) {
        lock(&self.state.requests).clear();
    }

    /// Whether requests are kept for [`requests`](Self::requests) (on by default). A soak
    /// run turns it off so the mock's memory does not grow with every body it receives;
    /// [`received`](Self::received) still counts them and the observer still sees them.
    pub fn set_recording(&self, on: bool) {
        self.state.record.store(on, Ordering::SeqCst);
    }

    /// How many requests arrived (headers at least), recorded or not.
    pub fn received(&self) -> usize {
        self.state.next_id.load(Ordering::SeqCst)
    }
}

impl Drop for MockServer {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

#[derive(Clone)]
struct ConnInfo {
    tls: bool,
    sni: Option<String>,
    alpn: Option<String>,
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    state: Arc<State>,
    mut stop: oneshot::Receiver<()>,
) {
    loop {
        let accepted = tokio::select! {
            _ = &mut stop => return,
            a = listener.accept() => a,
        };
        let Ok((stream, _peer)) = accepted else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            match tls {
                Some(acceptor) => {
                    let Ok(stream) = acceptor.accept(stream).await else {
                        return;
                    };
                    let (_, conn) = stream.get_ref();
                    let info = ConnInfo {
                        tls: true,
                        sni: conn.server_name().map(str::to_string),
                        alpn: conn
                            .alpn_protocol()
                            .map(|p| String::from_utf8_lossy(p).to_string()),
                    };
                    serve(TokioIo::new(stream), info, state).await;
                }
                None => {
                    let info = ConnInfo {
                        tls: false,
                        sni: None,
                        alpn: None,
                    };
                    serve(TokioIo::new(stream), info, state).await;
                }
            }
        });
    }
}

async fn serve<I>(io: I, info: ConnInfo, state: Arc<State>)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |req| {
        let info = info.clone();
        let state = state.clone();
        async move { Ok::<_, Infallible>(handle(req, info, state).await) }
    });
    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
        .serve_connection(io, svc)
        .await;
}

/// A response body fed from a channel: lets the mock pace SSE events and abort mid-stream.
pub struct ChannelBody {
    rx: mpsc::Receiver<Result<Bytes, std::io::Error>>,
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(Ok(b))) => Poll::Ready(Some(Ok(Frame::data(b)))),
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

fn full(status: u16, content_type: &str, body: Vec<u8>, id: usize) -> Response<ChannelBody> {
    let (tx, rx) = mpsc::channel(1);
    let _ = tx.try_send(Ok(Bytes::from(body)));
    let mut resp = Response::new(ChannelBody { rx });
    *resp.status_mut() =
        hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    set_header(&mut resp, "content-type", content_type);
    set_header(&mut resp, "x-mock-request-id", &id.to_string());
    resp
}

fn set_header(resp: &mut Response<ChannelBody>, name: &'static str, value: &str) {
    if let Ok(v) = hyper::header::HeaderValue::from_str(value) {
        resp.headers_mut().insert(name, v);
    }
}

async fn handle(
    req: Request<Incoming>,
    info: ConnInfo,
    state: Arc<State>,
) -> Response<ChannelBody> {
    let arrived = Instant::now();
    let id = state.next_id.fetch_add(1, Ordering::SeqCst) + 1;
    let (parts, body) = req.into_parts();
    let headers: Vec<(String, Vec<u8>)> = parts
        .headers
        .iter()
        .map(|(n, v)| (n.as_str().to_string(), v.as_bytes().to_vec()))
        .collect();
    let authority = parts.uri.authority().map(|a| a.to_string()).or_else(|| {
        parts
            .headers
            .get("host")
            .map(|h| String::from_utf8_lossy(h.as_bytes()).to_string())
    });
    let mut rec = Recorded {
        id,
        tls: info.tls,
        sni: info.sni.clone(),
        alpn: info.alpn.clone(),
        version: format!("{:?}", parts.version),
        method: parts.method.to_string(),
        path: parts
            .uri
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| "/".into()),
        authority,
        headers,
        body: Vec::new(),
        arrived,
        complete: false,
    };
    let recording = state.record.load(Ordering::SeqCst);
    let index = if recording {
        let mut reqs = lock(&state.requests);
        reqs.push(rec.clone());
        Some(reqs.len() - 1)
    } else {
        None
    };
    let Ok(collected) = body.collect().await else {
        // The client reset the request before its end: stays recorded as incomplete.
        return full(400, "text/plain", b"incomplete request".to_vec(), id);
    };
    rec.body = collected.to_bytes().to_vec();
    rec.complete = true;
    if let Some(index) = index {
        let mut reqs = lock(&state.requests);
        if let Some(slot) = reqs.get_mut(index) {
            *slot = rec.clone();
        }
    }
    if let Some(obs) = lock(&state.observer).as_ref() {
        obs(&rec);
    }

    let behavior = lock(&state.behavior).clone();
    if !behavior.header_delay.is_zero() {
        tokio::time::sleep(behavior.header_delay).await;
    }
    if let Some(f) = &behavior.fixed {
        return full(f.status, &f.content_type, f.body.clone(), id);
    }
    if let Some((_, f)) = behavior
        .fixed_for_sni
        .iter()
        .find(|(sni, _)| info.sni.as_deref() == Some(sni.as_str()))
    {
        return full(f.status, &f.content_type, f.body.clone(), id);
    }
    if !state.tls {
        let text = format!(
            "local-service: {} {} ({} body bytes)\n",
            rec.method,
            rec.path,
            rec.body.len()
        );
        return full(200, "text/plain", text.into_bytes(), id);
    }
    let json = rec.json();
    let model = json
        .as_ref()
        .and_then(|j| j.get("model"))
        .and_then(|m| m.as_str())
        .unwrap_or("none")
        .to_string();
    let stream = json
        .as_ref()
        .and_then(|j| j.get("stream"))
        .and_then(|s| s.as_bool())
        == Some(true);
    let who = info.sni.clone().unwrap_or_else(|| "no-sni".into());
    let prompt_tokens = rec.body.len().div_ceil(4);
    if stream {
        sse(id, model, who, prompt_tokens, behavior)
    } else {
        let completion = format!("Hello from the mock of {who}, answering as {model}.");
        let completion_tokens = completion.split_whitespace().count();
        let body = serde_json::json!({
            "id": format!("chatcmpl-mock-{id}"),
            "object": "chat.completion",
            "created": now_secs(),
            "model": model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": completion},
                "finish_reason": "stop"
            }],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens
            }
        });
        full(200, "application/json", body.to_string().into_bytes(), id)
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn sse(
    id: usize,
    model: String,
    who: String,
    prompt_tokens: usize,
    b: Behavior,
) -> Response<ChannelBody> {
    let (tx, rx) = mpsc::channel(4);
    let mut resp = Response::new(ChannelBody { rx });
    set_header(&mut resp, "content-type", "text/event-stream");
    set_header(&mut resp, "cache-control", "no-cache");
    set_header(&mut resp, "x-mock-request-id", &id.to_string());
    tokio::spawn(async move {
        let created = now_secs();
        let chunk = |delta: serde_json::Value, finish: Option<&str>| {
            serde_json::json!({
                "id": format!("chatcmpl-mock-{id}"),
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]
            })
        };
        for i in 0..b.sse_events {
            if i > 0 {
                tokio::time::sleep(b.sse_gap).await;
            }
            // The abort comes a gap after the last event, as a dying provider's would.
            if b.abort_after_events == Some(i) {
                let _ = tx
                    .send(Err(std::io::Error::other("mock: abort mid-stream")))
                    .await;
                return;
            }
            let delta = serde_json::json!({
                "role": "assistant",
                "content": format!("part {} of {} from {who}; ", i + 1, b.sse_events)
            });
            let event = format!("data: {}\n\n", chunk(delta, None));
            if tx.send(Ok(Bytes::from(event))).await.is_err() {
                return;
            }
        }
        if b.abort_after_events == Some(b.sse_events) {
            let _ = tx
                .send(Err(std::io::Error::other("mock: abort mid-stream")))
                .await;
            return;
        }
        tokio::time::sleep(b.sse_gap).await;
        let mut last = chunk(serde_json::json!({}), Some("stop"));
        last["usage"] = serde_json::json!({
            "prompt_tokens": prompt_tokens,
            "completion_tokens": b.sse_events,
            "total_tokens": prompt_tokens + b.sse_events
        });
        let _ = tx
            .send(Ok(Bytes::from(format!("data: {last}\n\ndata: [DONE]\n\n"))))
            .await;
    });
    resp
}
