//! A small HTTP/1.1 client for talking to Envoy's listener: any Host header, optional source
//! address (the RBAC test connects from 127.0.0.2), and every body chunk time-stamped so
//! streaming tests can see when each SSE event arrived.

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

/// The seeds' request body.
pub const SEED_BODY: &str =
    r#"{"messages": [{"role": "user", "content": "Please introduce yourself."}]}"#;

#[derive(Clone, Debug)]
pub struct Req {
    pub method: String,
    pub path: String,
    pub host: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub source_ip: Option<IpAddr>,
    /// Add `content-length` for the body (true unless the test sets its own).
    pub auto_content_length: bool,
}

impl Req {
    /// A POST of `body` to `host` at `path`.
    pub fn post(host: &str, path: &str, body: impl Into<Vec<u8>>) -> Req {
        Req {
            method: "POST".into(),
            path: path.into(),
            host: host.into(),
            headers: Vec::new(),
            body: body.into(),
            source_ip: None,
            auto_content_length: true,
        }
    }

    /// What the seeds' curl sends: `POST /` with `content-type: application/json`.
    pub fn chat(host: &str, body: &str) -> Req {
        Req::post(host, "/", body).header("content-type", "application/json")
    }

    pub fn header(mut self, name: &str, value: &str) -> Req {
        self.headers.push((name.into(), value.into()));
        self
    }

    pub fn bind_source(mut self, ip: IpAddr) -> Req {
        self.source_ip = Some(ip);
        self
    }
}

#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub body: Vec<u8>,
    /// Each body chunk with its arrival time after the request was sent.
    pub chunks: Vec<(Duration, Bytes)>,
    /// Set when the body ended with an error (e.g. the upstream aborted mid-stream).
    pub body_error: Option<String>,
}

impl Resp {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).to_string()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "response body is not JSON ({e}); status {}, body: {}",
                self.status,
                self.text()
            )
        })
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).to_string())
    }

    /// Arrival time of the first chunk that contains `needle`.
    pub fn first_arrival_of(&self, needle: &str) -> Option<Duration> {
        self.chunks
            .iter()
            .find(|(_, c)| String::from_utf8_lossy(c).contains(needle))
            .map(|(t, _)| *t)
    }

    /// `data:` events of an SSE body, each with the arrival time of the chunk that carried it
    /// (an event split over chunks gets the time its last piece arrived).
    pub fn sse_events(&self) -> Vec<(Duration, String)> {
        let mut out = Vec::new();
        let mut pending = String::new();
        for (t, c) in &self.chunks {
            pending.push_str(&String::from_utf8_lossy(c));
            while let Some(end) = pending.find("\n\n") {
                let event: String = pending.drain(..end + 2).collect();
                for line in event.lines() {
                    if let Some(data) = line.strip_prefix("data:") {
                        out.push((*t, data.trim().to_string()));
                    }
                }
            }
        }
        out
    }
}

/// Sends one request on a new connection and reads the whole response (60 s at most).
pub async fn send(addr: SocketAddr, req: &Req) -> Resp {
    match tokio::time::timeout(Duration::from_secs(60), send_inner(addr, req)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => panic!(
            "request {} {} (Host {}) to {addr} failed: {e}",
            req.method, req.path, req.host
        ),
        Err(_) => panic!(
            "request {} {} (Host {}) to {addr}: no complete answer within 60 s",
            req.method, req.path, req.host
        ),
    }
}

async fn send_inner(addr: SocketAddr, req: &Req) -> Result<Resp, String> {
    let socket = tokio::net::TcpSocket::new_v4().map_err(|e| e.to_string())?;
    if let Some(ip) = req.source_ip {
        socket
            .bind(SocketAddr::new(ip, 0))
            .map_err(|e| format!("bind {ip}: {e}"))?;
    }
    let stream = socket
        .connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let _ = stream.set_nodelay(true);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });

    let mut builder = hyper::Request::builder()
        .method(req.method.as_str())
        .uri(req.path.as_str())
        .header("host", req.host.as_str());
    for (n, v) in &req.headers {
        builder = builder.header(n.as_str(), v.as_str());
    }
    let has_len = req
        .headers
        .iter()
        .any(|(n, _)| n.eq_ignore_ascii_case("content-length"));
    if req.auto_content_length && !has_len {
        builder = builder.header("content-length", req.body.len().to_string());
    }
    let request = builder
        .body(Full::new(Bytes::from(req.body.clone())))
        .map_err(|e| format!("bad request: {e}"))?;
    let sent = Instant::now();
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("send: {e}"))?;
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let mut body = response.into_body();
    let mut chunks = Vec::new();
    let mut all = Vec::new();
    let mut body_error = None;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => {
                if let Ok(data) = f.into_data() {
                    all.extend_from_slice(&data);
                    chunks.push((sent.elapsed(), data));
                }
            }
            Err(e) => {
                body_error = Some(e.to_string());
                break;
            }
        }
    }
    Ok(Resp {
        status,
        headers,
        body: all,
        chunks,
        body_error,
    })
}

/// Sends `req` over HTTP/2 with prior knowledge (h2c, as a sidecar's client may), with
/// `:authority` = `req.host` (any value the h2 encoder takes), from `req.source_ip` if set.
pub async fn send_h2(addr: SocketAddr, req: &Req) -> Resp {
    let uri = format!("http://{}{}", req.host, req.path);
    let headers: Vec<(&str, &str)> = req
        .headers
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();
    send_h2_to(addr, req.source_ip, &req.method, &uri, &headers, &req.body).await
}

/// One HTTP/2 request (h2c) of `method` to `uri` (an absolute URI, or the authority alone for
/// `CONNECT`) with these headers, from `source` if set; each body chunk with its arrival time.
pub async fn send_h2_to(
    addr: SocketAddr,
    source: Option<IpAddr>,
    method: &str,
    uri: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Resp {
    let work = async {
        let socket = tokio::net::TcpSocket::new_v4().map_err(|e| e.to_string())?;
        if let Some(ip) = source {
            socket
                .bind(SocketAddr::new(ip, 0))
                .map_err(|e| format!("bind {ip}: {e}"))?;
        }
        let stream = socket
            .connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let (mut sender, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            TokioIo::new(stream),
        )
        .await
        .map_err(|e| format!("h2 handshake: {e}"))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut builder = hyper::Request::builder().method(method).uri(uri);
        for (n, v) in headers {
            builder = builder.header(*n, *v);
        }
        let request = builder
            .body(Full::new(Bytes::copy_from_slice(body)))
            .map_err(|e| format!("bad request: {e}"))?;
        let sent = Instant::now();
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("send: {e}"))?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let mut body = response.into_body();
        let (mut chunks, mut all, mut body_error) = (Vec::new(), Vec::new(), None);
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(f) => {
                    if let Ok(data) = f.into_data() {
                        all.extend_from_slice(&data);
                        chunks.push((sent.elapsed(), data));
                    }
                }
                Err(e) => {
                    body_error = Some(e.to_string());
                    break;
                }
            }
        }
        Ok::<Resp, String>(Resp {
            status,
            headers,
            body: all,
            chunks,
            body_error,
        })
    };
    match tokio::time::timeout(Duration::from_secs(60), work).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => panic!("h2 {method} {uri} to {addr} failed: {e}"),
        Err(_) => panic!("h2 request to {addr}: no complete answer within 60 s"),
    }
}
