//! A byte-exact HTTP/1.1 client (any header bytes, any framing, a chosen source address) and
//! an HTTP/2 (h2c) client that sets `:authority` and a `host` header apart: for requests that
//! ordinary clients refuse to send.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::client::Resp;

/// Writes a request exactly as given (header values need not be UTF-8; the body may go in
/// chunks), reads the answer to the end (`Connection: close`), and returns it as a [`Resp`]
/// so the usual assertions apply. Writing stops quietly if Envoy answers and closes first.
pub async fn send_raw(addr: SocketAddr, head: Vec<u8>, body: Vec<Vec<u8>>) -> Resp {
    send_raw_from(None, addr, head, body).await
}

/// `send_raw` from `source` (e.g. 127.0.0.2, for a policy on the client's address).
pub async fn send_raw_from(
    source: Option<IpAddr>,
    addr: SocketAddr,
    head: Vec<u8>,
    body: Vec<Vec<u8>>,
) -> Resp {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    if let Some(ip) = source {
        socket.bind(SocketAddr::new(ip, 0)).unwrap();
    }
    let stream = socket.connect(addr).await.unwrap();
    let (mut read, mut write) = stream.into_split();
    let writer = tokio::spawn(async move {
        for piece in std::iter::once(head).chain(body) {
            if write.write_all(&piece).await.is_err() {
                break;
            }
        }
        let _ = write.flush().await;
        // Dropping the write half would half-close the connection, which Envoy takes for
        // the client going away: keep it open until the answer has been read.
        std::future::pending::<()>().await;
        drop(write);
    });
    let mut raw = Vec::new();
    let read_all = async {
        let mut buf = [0u8; 16 * 1024];
        // Until the answer is complete: waiting for Envoy to close would cost its delayed
        // close timeout on every local reply.
        while !is_complete(&raw) {
            match read.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => raw.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(60), read_all)
        .await
        .expect("no complete answer within 60 s");
    writer.abort();
    parse_response(&raw)
}

/// A whole response: its head, and a body of its `content-length` or a chunked body's end.
fn is_complete(raw: &[u8]) -> bool {
    let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
    let body = &raw[end + 4..];
    let value = |name: &str| {
        head.split("\r\n")
            .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
    };
    if let Some(n) = value("content-length:").and_then(|v| v.parse::<usize>().ok()) {
        return body.len() >= n;
    }
    if value("transfer-encoding:").is_some_and(|v| v.contains("chunked")) {
        return body.ends_with(b"0\r\n\r\n");
    }
    // 1xx, 204 and 304 have no body; anything else without a length ends at close.
    head.starts_with("http/1.1 204") || head.starts_with("http/1.1 304")
}

fn parse_response(raw: &[u8]) -> Resp {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no response head in {:?}", String::from_utf8_lossy(raw)));
    let head = String::from_utf8_lossy(&raw[..end]).to_string();
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line in {head:?}"));
    let mut headers = hyper::HeaderMap::new();
    for line in lines {
        if let Some((n, v)) = line.split_once(':') {
            headers.append(
                hyper::header::HeaderName::from_bytes(n.trim().as_bytes()).unwrap(),
                hyper::header::HeaderValue::from_str(v.trim()).unwrap(),
            );
        }
    }
    let mut body = raw[end + 4..].to_vec();
    let chunked = headers
        .get("transfer-encoding")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"chunked"));
    if chunked {
        body = dechunk(&body);
    }
    Resp {
        status,
        headers,
        body,
        chunks: Vec::new(),
        body_error: None,
    }
}

fn dechunk(mut rest: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") {
        let size = std::str::from_utf8(&rest[..eol]).unwrap_or("0");
        let n =
            usize::from_str_radix(size.split(';').next().unwrap_or("0").trim(), 16).unwrap_or(0);
        rest = &rest[eol + 2..];
        if n == 0 || rest.len() < n {
            break;
        }
        out.extend_from_slice(&rest[..n]);
        rest = rest[n..].strip_prefix(b"\r\n").unwrap_or(&rest[n..]);
    }
    out
}

/// One HTTP/2 POST without TLS (prior knowledge, as Envoy's listener accepts it) from
/// `source`: `:authority` from `authority`, and, if given, a separate `host` header.
pub async fn send_h2(
    source: Option<IpAddr>,
    addr: SocketAddr,
    authority: &str,
    host: Option<&str>,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Resp {
    let uri = format!("http://{authority}/");
    send_h2_request(source, addr, "POST", &uri, host, headers, body).await
}

/// One HTTP/2 request of any method to `uri` (`authority` alone for CONNECT).
pub async fn send_h2_request(
    source: Option<IpAddr>,
    addr: SocketAddr,
    method: &str,
    uri: &str,
    host: Option<&str>,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Resp {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    if let Some(ip) = source {
        socket.bind(SocketAddr::new(ip, 0)).unwrap();
    }
    let stream = socket.connect(addr).await.unwrap();
    let io = hyper_util::rt::TokioIo::new(stream);
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut request = hyper::Request::builder().method(method).uri(uri);
    if let Some(host) = host {
        request = request.header("host", host);
    }
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request
        .body(Full::new(Bytes::copy_from_slice(body)))
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(30), sender.send_request(request))
        .await
        .expect("an HTTP/2 answer within 30 s")
        .unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes().to_vec())
        .unwrap_or_default();
    Resp {
        status,
        headers,
        body,
        chunks: Vec::new(),
        body_error: None,
    }
}
