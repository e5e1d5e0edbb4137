#![cfg(not(target_arch = "wasm32"))]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Hostile input, row by row (docs/security.md, "Hostile input"): real Envoy, the release wasm,
//! the shipped `envoy/mesh.yaml` and the HTTPS mock provider. Every invalid body gets its
//! exact status and OpenAI error code and reaches no provider; every valid but odd request is
//! routed and arrives as the filter should send it; and Envoy's log shows no wasm failure.
//!
//! Rows already proven elsewhere are not repeated here: see the table in docs/security.md.

mod support;

use std::time::Duration;

use support::client::{Req, SEED_BODY};
use support::raw::send_raw;
use support::*;

/// Envoy is still serving, a valid request still works, and its log has no wasm failure.
async fn assert_filter_healthy(s: &mut Stack) {
    let before = s.provider.requests().len();
    let check = Req::post(DASHSCOPE, "/?hostile-check", SEED_BODY);
    let ok = s.send(&check).await;
    assert_eq!(ok.status, 200, "after the hostile input: {}", ok.text());
    assert_eq!(s.provider.requests().len(), before + 1);
    assert!(s.envoy.is_running(), "Envoy exited");
    // The access log line of that last request (its query string is kept) proves the log
    // is flushed up to here.
    let log = s
        .envoy
        .wait_for_log("hostile-check", Duration::from_secs(5));
    assert!(
        log.contains("hostile-check"),
        "the access log was not written"
    );
    let failures = support::admin::wasm_failure_lines(&log);
    assert!(
        failures.is_empty(),
        "Envoy's log shows a wasm failure:\n{}",
        failures.join("\n")
    );
}

/// Sends each body to an LLM host and expects `status` + `code` for it.
async fn assert_refused(s: &Stack, host: &str, cases: &[(&str, Vec<u8>, u16, &str)]) {
    for (label, body, status, code) in cases {
        let mut req = Req::chat(host, "");
        req.body = body.clone();
        let resp = s.send(&req).await;
        assert_eq!(
            resp.status,
            *status,
            "{label}: expected {status} {code}, got {} {}",
            resp.status,
            resp.text()
        );
        assert_openai_error(&resp, *status, code);
    }
}

/// Nothing of an invalid request reached the provider: no body, not even the headers.
fn assert_nothing_reached_the_provider(s: &Stack) {
    let seen = s.provider.all_requests();
    assert!(
        seen.is_empty(),
        "the provider saw {} request(s) for invalid input, first body: {:?}",
        seen.len(),
        seen.first()
            .map(|r| String::from_utf8_lossy(&r.body[..r.body.len().min(200)]).to_string())
    );
}

fn bodies(cases: &[(&str, &[u8])]) -> Vec<(String, Vec<u8>)> {
    cases
        .iter()
        .map(|(l, b)| (l.to_string(), b.to_vec()))
        .collect()
}

// ---------------------------------------------------------------- raw requests

/// `POST / HTTP/1.1` to `host` with these extra header lines (raw bytes) and a body.
fn raw_head(host: &[u8], extra: &[(&str, &[u8])], body_len: Option<usize>) -> Vec<u8> {
    let mut head = b"POST / HTTP/1.1\r\nhost: ".to_vec();
    head.extend_from_slice(host);
    head.extend_from_slice(b"\r\ncontent-type: application/json\r\nconnection: close\r\n");
    match body_len {
        Some(n) => head.extend_from_slice(format!("content-length: {n}\r\n").as_bytes()),
        None => head.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    for (name, value) in extra {
        head.extend_from_slice(name.as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value);
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"\r\n");
    head
}

fn chunk(data: &[u8]) -> Vec<u8> {
    let mut out = format!("{:x}\r\n", data.len()).into_bytes();
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
    out
}

// ---------------------------------------------------------------- body rows

/// Row "empty body", the paths `e2e_errors` does not take: whitespace only, a chunked body
/// whose only chunk is the last one, and a GET without a body.
#[tokio::test]
async fn empty_bodies_in_every_framing_get_empty_body() {
    let mut s = Stack::start("mesh.yaml");
    assert_refused(
        &s,
        DASHSCOPE,
        &[("whitespace only", b" \r\n\t ".to_vec(), 400, "empty_body")],
    )
    .await;
    let resp = send_raw(
        s.envoy.addr,
        raw_head(DASHSCOPE.as_bytes(), &[], None),
        vec![b"0\r\n\r\n".to_vec()],
    )
    .await;
    assert_openai_error(&resp, 400, "empty_body");
    // A GET is not a chat request at all (see e2e_methods.rs).
    let mut get = Req::post(DASHSCOPE, "/v1/chat/completions", "");
    get.method = "GET".into();
    get.auto_content_length = false;
    let resp = s.send(&get).await;
    assert_openai_error(&resp, 405, "method_not_allowed");
    assert_nothing_reached_the_provider(&s);
    assert_filter_healthy(&mut s).await;
}

/// Row "non-JSON": what a hand-written scanner gets wrong and serde_json refuses.
#[tokio::test]
async fn almost_json_gets_invalid_json() {
    let mut s = Stack::start("mesh.yaml");
    let cases = bodies(&[
        ("UTF-8 byte order mark", b"\xef\xbb\xbf{\"messages\": []}"),
        ("trailing garbage", b"{\"messages\": []} x"),
        ("two objects", b"{\"messages\": []}{\"messages\": []}"),
        ("NUL before the object", b"\x00{\"messages\": []}"),
        ("comment", b"{\"messages\": [] /* hi */}"),
        ("single quotes", b"{'messages': []}"),
        ("trailing comma", b"{\"messages\": [],}"),
        ("trailing comma in a value", b"{\"messages\": [1,]}"),
        ("missing colon", b"{\"messages\" []}"),
        ("bare key", b"{messages: []}"),
        ("NaN", b"{\"messages\": [], \"temperature\": NaN}"),
        ("leading zero", b"{\"messages\": [], \"n\": 01}"),
        ("bare minus", b"{\"messages\": [], \"n\": -}"),
        ("dot without digits", b"{\"messages\": [], \"n\": 1.}"),
        ("exponent without digits", b"{\"messages\": [], \"n\": 1e}"),
        ("raw newline in a string", b"{\"messages\": [\"a\nb\"]}"),
        ("raw tab in a key", b"{\"messages\": [], \"a\tb\": 1}"),
        ("unknown escape", b"{\"messages\": [\"\\x41\"]}"),
        ("short unicode escape", b"{\"messages\": [\"\\u12\"]}"),
        ("unterminated string", b"{\"messages\": [\"abc]}"),
        ("escaped closing quote", b"{\"messages\": [\"abc\\\"]}"),
        ("unclosed array", b"{\"messages\": [}"),
        ("mismatched brackets", b"{\"messages\": [{]}]}"),
        ("truncated literal", b"{\"messages\": [], \"stream\": tru}"),
        (
            "capitalised literal",
            b"{\"messages\": [], \"stream\": True}",
        ),
        ("form feed as whitespace", b"{\"messages\":\x0c[]}"),
    ]);
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = cases
        .iter()
        .map(|(l, b)| (l.as_str(), b.clone(), 400, "invalid_json"))
        .collect();
    assert_refused(&s, DASHSCOPE, &cases).await;
    assert_nothing_reached_the_provider(&s);
    assert_filter_healthy(&mut s).await;
}

/// Row "JSON that is not an object", the scalars (`e2e_errors` sends an array and a string).
#[tokio::test]
async fn json_scalars_get_invalid_body() {
    let mut s = Stack::start("mesh.yaml");
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = ["null", "true", "42", " -1.5e3 ", "\"{}\""]
        .iter()
        .map(|b| (*b, b.as_bytes().to_vec(), 400, "invalid_body"))
        .collect();
    assert_refused(&s, DASHSCOPE, &cases).await;
    assert_nothing_reached_the_provider(&s);
    assert_filter_healthy(&mut s).await;
}

/// Row "`messages` of the wrong type": every JSON type but an array (`e2e_errors` sends a
/// string), and keys that only look like `messages`.
#[tokio::test]
async fn messages_of_every_other_type_get_invalid_messages() {
    let mut s = Stack::start("mesh.yaml");
    let mut cases: Vec<(&str, Vec<u8>, u16, &str)> = [
        ("null", "{\"messages\": null}"),
        ("object", "{\"messages\": {\"role\": \"user\"}}"),
        ("number", "{\"messages\": 0}"),
        ("boolean", "{\"messages\": true}"),
        ("string holding an array", "{\"messages\": \"[]\"}"),
    ]
    .iter()
    .map(|(l, b)| (*l, b.as_bytes().to_vec(), 400, "invalid_messages"))
    .collect();
    cases.extend(
        [
            ("other case", "{\"Messages\": []}"),
            ("nested only", "{\"x\": {\"messages\": []}}"),
            ("with a space", "{\"messages \": []}"),
        ]
        .iter()
        .map(|(l, b)| (*l, b.as_bytes().to_vec(), 400, "missing_messages")),
    );
    assert_refused(&s, DASHSCOPE, &cases).await;
    assert_nothing_reached_the_provider(&s);
    assert_filter_healthy(&mut s).await;
}

/// Row "`model`/`stream` of the wrong type": every other JSON type (`e2e_errors` sends a
/// number and a string), also where the configured model or stream would replace the value.
#[tokio::test]
async fn model_and_stream_of_every_other_type_are_refused() {
    let mut s = Stack::start("mesh.yaml");
    let mut cases: Vec<(String, Vec<u8>, u16, &str)> = Vec::new();
    for model in [
        "null",
        "true",
        "1.5",
        "[\"gpt-4o\"]",
        "{\"name\": \"gpt-4o\"}",
    ] {
        cases.push((
            format!("model {model}"),
            format!("{{\"messages\": [], \"model\": {model}}}").into_bytes(),
            400,
            "invalid_model",
        ));
    }
    for stream in ["0", "1", "\"true\"", "[]", "{}", "1e400"] {
        cases.push((
            format!("stream {stream}"),
            format!("{{\"messages\": [], \"stream\": {stream}}}").into_bytes(),
            400,
            "invalid_stream",
        ));
    }
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = cases
        .iter()
        .map(|(l, b, st, c)| (l.as_str(), b.clone(), *st, *c))
        .collect();
    // DashScope's rule sets the model: the client's value is checked all the same.
    assert_refused(&s, DASHSCOPE, &cases).await;
    assert_nothing_reached_the_provider(&s);
    assert_filter_healthy(&mut s).await;
}

/// Row "invalid UTF-8", wherever it is (`e2e_errors` has 0xff 0xfe in a message): in a key,
/// in `model`, outside strings, overlong, an encoded surrogate, cut off at the end.
#[tokio::test]
async fn invalid_utf8_anywhere_gets_invalid_json() {
    let mut s = Stack::start("mesh.yaml");
    let cases = bodies(&[
        ("in a key", b"{\"messages\": [], \"k\xff\": 1}"),
        ("in model", b"{\"messages\": [], \"model\": \"gpt\xc0\"}"),
        ("overlong slash", b"{\"messages\": [\"\xc0\xaf\"]}"),
        ("overlong NUL", b"{\"messages\": [\"\xe0\x80\x80\"]}"),
        (
            "UTF-8 encoded surrogate",
            b"{\"messages\": [\"\xed\xa0\x80\"]}",
        ),
        ("above U+10FFFF", b"{\"messages\": [\"\xf4\x90\x80\x80\"]}"),
        ("lone continuation byte", b"{\"messages\": [\"a\x80b\"]}"),
        (
            "truncated sequence before the quote",
            b"{\"messages\": [\"\xe4\xbd\"]}",
        ),
        (
            "truncated at the very end",
            b"{\"messages\": [\"\xe4\xbd\xa0\"]}\xe4",
        ),
        (
            "Latin-1 text",
            b"{\"messages\": [{\"role\": \"user\", \"content\": \"caf\xe9\"}]}",
        ),
        ("outside any string", b"{\"messages\": []\xa0}"),
    ]);
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = cases
        .iter()
        .map(|(l, b)| (l.as_str(), b.clone(), 400, "invalid_json"))
        .collect();
    assert_refused(&s, DASHSCOPE, &cases).await;
    assert_nothing_reached_the_provider(&s);
    assert_filter_healthy(&mut s).await;
}

/// Row "deeply nested JSON": 10 000 levels inside a message is valid JSON and is forwarded
/// byte for byte with the model replaced; 10 000 unclosed levels are refused; neither
/// overflows the filter's stack.
#[tokio::test]
async fn ten_thousand_levels_of_nesting_are_forwarded_or_refused_never_a_trap() {
    let mut s = Stack::start("mesh.yaml");
    let depth = 10_000;
    for (label, nested) in [
        (
            "arrays",
            format!("{}{}", "[".repeat(depth), "]".repeat(depth)),
        ),
        (
            "objects",
            format!("{}1{}", "{\"a\":".repeat(depth), "}".repeat(depth)),
        ),
    ] {
        let body = format!(
            r#"{{"model": "gpt-4o", "messages": [{{"role": "user", "content": {nested}}}], "n": 1}}"#
        );
        let resp = s.send(&Req::chat(DASHSCOPE, &body)).await;
        assert_eq!(resp.status, 200, "{label}: {}", resp.text());
        let reqs = s.provider.requests();
        let got = reqs.last().unwrap();
        let expected = body.replacen("\"gpt-4o\"", "\"qwen1.5-72b-chat\"", 1);
        assert!(
            got.body == expected.as_bytes(),
            "{label}: the provider did not get the body with only the model replaced \
             ({} bytes sent, {} received)",
            expected.len(),
            got.body.len()
        );
        assert_no_stale_content_length(got);
    }
    s.provider.clear();
    assert_refused(
        &s,
        DASHSCOPE,
        &[
            (
                "unclosed arrays",
                format!(r#"{{"messages": [], "x": {}}}"#, "[".repeat(depth)).into_bytes(),
                400,
                "invalid_json",
            ),
            (
                "one bracket too many",
                format!(
                    r#"{{"messages": [], "x": {}{}]}}"#,
                    "[".repeat(depth),
                    "]".repeat(depth)
                )
                .into_bytes(),
                400,
                "invalid_json",
            ),
        ],
    )
    .await;
    assert_nothing_reached_the_provider(&s);
    assert_filter_healthy(&mut s).await;
}

/// Row "duplicate keys", the forms `e2e_errors` does not send: `model` twice (providers
/// disagree on which one wins), and a second key spelled with escapes.
#[tokio::test]
async fn duplicate_keys_however_spelled_get_duplicate_key() {
    let mut s = Stack::start("mesh.yaml");
    let cases = bodies(&[
        (
            "model twice",
            b"{\"model\": \"cheap\", \"messages\": [], \"model\": \"expensive\"}",
        ),
        (
            "stream twice",
            b"{\"messages\": [], \"stream\": false, \"stream\": true}",
        ),
        (
            "escaped second model",
            b"{\"messages\": [], \"model\": \"a\", \"m\\u006fdel\": \"b\"}",
        ),
        (
            "escaped second messages",
            b"{\"messages\": [], \"\\u006d\\u0065ssages\": []}",
        ),
        (
            "escaped other key",
            b"{\"messages\": [], \"user\": \"a\", \"\\u0075ser\": \"b\"}",
        ),
        ("empty key twice", b"{\"\": 1, \"messages\": [], \"\": 2}"),
    ]);
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = cases
        .iter()
        .map(|(l, b)| (l.as_str(), b.clone(), 400, "duplicate_key"))
        .collect();
    assert_refused(&s, DASHSCOPE, &cases).await;
    assert_nothing_reached_the_provider(&s);
    // The same key nested twice in different objects is not a duplicate.
    let nested = r#"{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "x": {"model": 1}}"#;
    let resp = s.send(&Req::chat(DASHSCOPE, nested)).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(
        s.provider.requests()[0].json().unwrap()["x"]["model"],
        1,
        "a nested `model` is not the request's model"
    );
    assert_filter_healthy(&mut s).await;
}

/// Row "huge numbers": valid JSON however large or precise, so forwarded with every digit
/// as sent (a filter that parsed numbers into f64 would refuse 1e400 or round the rest).
#[tokio::test]
async fn huge_numbers_are_forwarded_digit_for_digit() {
    let mut s = Stack::start("mesh.yaml");
    let digits300 = "9".repeat(300);
    let fraction = format!("0.{}1", "0".repeat(300));
    let body = format!(
        r#"{{"messages": [{{"role": "user", "content": "hi"}}], "temperature": 1e400, "top_p": -1E-400, "seed": {digits300}, "n": -{digits300}, "presence_penalty": {fraction}, "logit_bias": {{"1": 1.7976931348623157e309}}, "model": "gpt-4o"}}"#
    );
    let resp = s.send(&Req::chat(DASHSCOPE, &body)).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let reqs = s.provider.requests();
    assert_eq!(reqs.len(), 1);
    let expected = body.replacen("\"gpt-4o\"", "\"qwen1.5-72b-chat\"", 1);
    assert_eq!(
        String::from_utf8_lossy(&reqs[0].body),
        expected,
        "the numbers did not arrive as sent"
    );
    assert_filter_healthy(&mut s).await;
}

/// Row "body over the limit", the framing `e2e_errors` does not use: chunked, no
/// `content-length`, past the default 8 MiB limit of the shipped config.
#[tokio::test]
async fn chunked_body_over_the_default_limit_gets_413() {
    let mut s = Stack::start("mesh.yaml");
    let piece = vec![b'x'; 256 * 1024];
    let mut chunks = vec![chunk(
        b"{\"messages\": [{\"role\": \"user\", \"content\": \"",
    )];
    for _ in 0..36 {
        // 9 MiB in all.
        chunks.push(chunk(&piece));
    }
    chunks.push(chunk(b"\"}]}"));
    chunks.push(b"0\r\n\r\n".to_vec());
    let resp = send_raw(
        s.envoy.addr,
        raw_head(DASHSCOPE.as_bytes(), &[], None),
        chunks,
    )
    .await;
    assert_openai_error(&resp, 413, "body_too_large");
    assert_nothing_reached_the_provider(&s);
    assert_filter_healthy(&mut s).await;
}

// ---------------------------------------------------------------- header rows

/// Row "headers with odd bytes or very long values": an 8 KB value and values with bytes
/// 0x80-0xff (UTF-8 and not) are routed and reach the provider unchanged; a match rule is
/// not fooled by a value that only starts like the one it wants.
#[tokio::test]
async fn long_and_odd_header_values_are_routed_and_passed_on() {
    let mut s = Stack::start("mesh.yaml");
    let long = "a".repeat(8 * 1024);
    let odd: &[u8] = b"caf\xc3\xa9 \x80\xfe\xff end";
    let body = SEED_BODY.as_bytes();
    for (user_type, model, key) in [
        (&b"subscriber"[..], "qwen-turbo", KEY_DASHSCOPE_VIP),
        (b"subscriber\xff", "qwen1.5-72b-chat", KEY_DASHSCOPE),
        (b"\xe9subscriber", "qwen1.5-72b-chat", KEY_DASHSCOPE),
    ] {
        s.provider.clear();
        let head = raw_head(
            DASHSCOPE.as_bytes(),
            &[
                ("x-long", long.as_bytes()),
                ("x-odd", odd),
                ("user-type", user_type),
            ],
            Some(body.len()),
        );
        let resp = send_raw(s.envoy.addr, head, vec![body.to_vec()]).await;
        assert_eq!(
            resp.status,
            200,
            "user-type {:?}: {}",
            String::from_utf8_lossy(user_type),
            resp.text()
        );
        let reqs = s.provider.requests();
        assert_eq!(reqs.len(), 1);
        let r = &reqs[0];
        assert_eq!(r.model().as_deref(), Some(model), "user-type {user_type:?}");
        assert_bearer(r, key);
        let raw = |name: &str| {
            r.headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
        };
        assert_eq!(raw("x-long").as_deref(), Some(long.as_bytes()));
        assert_eq!(raw("x-odd").as_deref(), Some(odd), "odd bytes changed");
        assert_eq!(raw("user-type").as_deref(), Some(user_type));
    }
    assert_filter_healthy(&mut s).await;
}

/// Past Envoy's own header limit (60 KiB by default) Envoy answers 431 before the filter
/// runs; nothing reaches the provider.
#[tokio::test]
async fn headers_over_envoys_limit_get_431_from_envoy() {
    let mut s = Stack::start("mesh.yaml");
    let huge = "b".repeat(100 * 1024);
    let body = SEED_BODY.as_bytes();
    let head = raw_head(
        DASHSCOPE.as_bytes(),
        &[("x-huge", huge.as_bytes())],
        Some(body.len()),
    );
    let resp = send_raw(s.envoy.addr, head, vec![body.to_vec()]).await;
    assert_eq!(resp.status, 431, "{}", resp.text());
    assert_nothing_reached_the_provider(&s);
    assert_filter_healthy(&mut s).await;
}

/// Row "`Host` with port, case or trailing dot", for a provider's own host (`e2e_seeds`
/// covers the forms of a route's short name; e2e_host_forms.rs every form against every
/// shipped config): port and case are routed to DashScope, rewritten; a trailing dot is refused.
#[tokio::test]
async fn provider_host_with_port_or_case_is_routed_and_a_trailing_dot_refused() {
    let mut s = Stack::start("mesh.yaml");
    for host in ["dashscope.aliyuncs.com.", "DASHSCOPE.ALIYUNCS.COM.:443"] {
        let resp = s.send(&Req::chat(host, SEED_BODY)).await;
        assert_openai_error(&resp, 400, "invalid_host");
    }
    assert_nothing_reached_the_provider(&s);
    let forms = ["dashscope.aliyuncs.com:10000", "DashScope.Aliyuncs.COM"];
    for host in forms {
        s.provider.clear();
        let resp = s.send(&Req::chat(host, SEED_BODY)).await;
        assert_eq!(resp.status, 200, "host {host}: {}", resp.text());
        let reqs = s.provider.requests();
        assert_eq!(reqs.len(), 1, "host {host}");
        let r = &reqs[0];
        assert_eq!(r.authority.as_deref(), Some(DASHSCOPE), "host {host}");
        assert_eq!(r.path, DASHSCOPE_PATH, "host {host}");
        assert_eq!(
            r.model().as_deref(),
            Some("qwen1.5-72b-chat"),
            "host {host}"
        );
        assert_bearer(r, KEY_DASHSCOPE);
    }
    assert!(s.local.all_requests().is_empty(), "a form passed through");
    // A host that only contains a provider's name is not that provider: it passes through.
    for host in [
        "dashscope.aliyuncs.com.evil.example",
        "xdashscope.aliyuncs.com",
    ] {
        let resp = s.send(&Req::chat(host, SEED_BODY)).await;
        assert_eq!(resp.status, 200, "host {host}: {}", resp.text());
    }
    assert_eq!(s.local.requests().len(), 2);
    assert_filter_healthy(&mut s).await;
}

/// An invalid body does not even open a request to the provider: the shipped configs set
/// `settings.forwardAfterBody`, so the filter holds the rewritten headers (with the
/// provider's key) until the body is checked. (Before that setting the headers went upstream
/// at once and the provider saw a request that Envoy reset after the filter's 400. On a fresh
/// Envoy the first bad requests may be cancelled before the provider connection is up, which
/// hides that; hence the warm-up.)
#[tokio::test]
async fn invalid_body_opens_no_provider_request() {
    let mut s = Stack::start("mesh.yaml");
    // With a connection to the provider already open, the early headers usually get there.
    let warm = s.send(&Req::chat(DASHSCOPE, SEED_BODY)).await;
    assert_eq!(warm.status, 200, "{}", warm.text());
    s.provider.clear();
    let cases = [
        ("not JSON", b"{not json".to_vec(), 400, "invalid_json"),
        ("an array", b"[]".to_vec(), 400, "invalid_body"),
        (
            "duplicate model",
            b"{\"messages\": [], \"model\": \"a\", \"model\": \"b\"}".to_vec(),
            400,
            "duplicate_key",
        ),
    ];
    for _ in 0..5 {
        assert_refused(&s, DASHSCOPE, &cases).await;
    }
    let seen = s.provider.all_requests();
    assert!(
        seen.is_empty(),
        "the provider saw {} request(s) for invalid bodies (headers only, then a reset)",
        seen.len()
    );
    assert_filter_healthy(&mut s).await;
}
