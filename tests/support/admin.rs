//! Envoy's admin interface and its log, without anything test-only, so that
//! `examples/soak.rs` includes this file too (`#[path]`): one GET on the admin interface, and
//! the log lines that show a wasm failure.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// One GET on Envoy's admin interface; returns (status, body).
pub fn admin_get(admin: SocketAddr, path: &str) -> Result<(u16, String), String> {
    let mut s = TcpStream::connect_timeout(&admin, Duration::from_secs(2))
        .map_err(|e| format!("admin connect {admin}: {e}"))?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    // Envoy refuses HTTP/1.0 unless configured to accept it.
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("admin {path}: malformed answer"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("admin {path}: no status"))?;
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_string()
    };
    Ok((status, body))
}

fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    out
}

/// What Envoy logs when the filter traps (a Rust panic is an `unreachable` trap in wasm), its
/// VM fails, or a fail-closed plugin refuses traffic. A healthy run logs none of them.
pub const WASM_FAILURES: &[&str] = &[
    "llm-filter: panic",
    "panicked at",
    "Function: proxy_on_",
    "Uncaught RuntimeError",
    "in-VM backtrace",
    "wasm_fail_stream",
    "Plugin configured to fail closed",
];

/// The lines of `log` that show a wasm failure (see [`WASM_FAILURES`]).
pub fn wasm_failure_lines(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| WASM_FAILURES.iter().any(|n| l.contains(n)))
        .collect()
}
