//! Turning a client's request into a provider's call: pure functions of the request and a
//! `ProviderCall`, with no host calls, so they run the same natively, in wasm, and (later) per
//! upstream attempt.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

use crate::error::RequestError;
use crate::policy::ProviderCall;

/// Rewrites the request headers in place: `:path` (query kept), `:authority`, `authorization`
/// (when the provider has a key), and drops `content-length` (the body may change size).
pub fn rewrite_headers(call: &ProviderCall, headers: &mut Vec<(String, Vec<u8>)>) {
    let query = headers
        .iter()
        .find(|(k, _)| k == ":path")
        .and_then(|(_, path)| {
            path.iter()
                .position(|&b| b == b'?')
                .map(|i| path[i..].to_vec())
        })
        .unwrap_or_default();
    let replace_auth = call.authorization.is_some();
    headers.retain(|(k, _)| {
        !(k == ":path"
            || k == ":authority"
            || k == "content-length"
            || (replace_auth && k == "authorization"))
    });
    let mut path = Vec::with_capacity(call.path.len() + query.len());
    path.extend_from_slice(call.path.as_bytes());
    path.extend_from_slice(&query);
    headers.push((":path".to_string(), path));
    headers.push((":authority".to_string(), call.authority.as_bytes().to_vec()));
    if let Some(auth) = &call.authorization {
        headers.push(("authorization".to_string(), auth.as_bytes().to_vec()));
    }
}

/// The outcome of a body rewrite.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rewritten {
    /// The new body; `None` when the body is already what the provider should get.
    pub body: Option<Vec<u8>>,
    /// The model the provider is asked for (configured, else the client's), if any.
    pub model: Option<String>,
    /// Whether the provider is asked to stream.
    pub stream: bool,
}

/// Checks a chat request body and sets `model` / `stream` as the provider call says; for a
/// streamed request without `stream_options`, asks for usage in the stream when
/// `request_stream_usage` is on. Every byte outside the replaced values is kept as sent: only
/// top-level keys are looked at, nested values are never parsed into a tree.
pub fn rewrite_body(
    call: &ProviderCall,
    body: &[u8],
    request_stream_usage: bool,
) -> Result<Rewritten, RequestError> {
    let Some(open) = body.iter().position(|b| !b.is_ascii_whitespace()) else {
        return Err(RequestError::EmptyBody);
    };
    if body[open] != b'{' {
        return Err(classify_non_object(body));
    }
    let top = parse_top_level(body)?;

    let messages = top.get("messages").ok_or(RequestError::MissingMessages)?;
    if !messages.get().starts_with('[') {
        return Err(RequestError::InvalidMessages);
    }
    let model = top.get("model");
    if model.is_some_and(|m| !m.get().starts_with('"')) {
        return Err(RequestError::InvalidModel);
    }
    let stream = top.get("stream");
    if stream.is_some_and(|s| !matches!(s.get(), "true" | "false" | "null")) {
        return Err(RequestError::InvalidStream);
    }

    let mut edits: Vec<Edit<'_>> = Vec::with_capacity(3);
    let upstream_model = match call.model_json.as_deref() {
        Some(wanted) => {
            plan(&mut edits, body, "model", model, wanted)?;
            wanted
        }
        None => model.map(RawValue::get).unwrap_or(""),
    };
    let streaming = match call.stream {
        Some(wanted) => {
            let text = if wanted { "true" } else { "false" };
            plan(&mut edits, body, "stream", stream, text)?;
            wanted
        }
        None => stream.is_some_and(|s| s.get() == "true"),
    };
    if streaming && request_stream_usage && top.get("stream_options").is_none() {
        plan(&mut edits, body, "stream_options", None, STREAM_USAGE)?;
    }
    let body = (!edits.is_empty()).then(|| apply(body, open, top.entries.is_empty(), &mut edits));
    Ok(Rewritten {
        body,
        model: serde_json::from_str(upstream_model).ok(),
        stream: streaming,
    })
}

/// What a streamed request gets so the provider reports usage in its last event.
const STREAM_USAGE: &str = r#"{"include_usage":true}"#;

/// A change to the body: replace `start..end` with `text`, or insert `"key":text` after `{`.
struct Edit<'a> {
    span: Option<(usize, usize)>,
    key: &'static str,
    text: &'a str,
}

fn plan<'a>(
    edits: &mut Vec<Edit<'a>>,
    body: &[u8],
    key: &'static str,
    current: Option<&RawValue>,
    wanted: &'a str,
) -> Result<(), RequestError> {
    let span = match current {
        Some(raw) if raw.get() == wanted => return Ok(()),
        Some(raw) => Some(span_of(body, raw.get()).ok_or(RequestError::InvalidJson)?),
        None => None,
    };
    edits.push(Edit {
        span,
        key,
        text: wanted,
    });
    Ok(())
}

/// Byte range of `part` inside `body`. serde_json borrows raw values from the input, so this
/// always succeeds; it is checked anyway so that a copy could never make us slice out of bounds.
fn span_of(body: &[u8], part: &str) -> Option<(usize, usize)> {
    let start = (part.as_ptr() as usize).checked_sub(body.as_ptr() as usize)?;
    let end = start.checked_add(part.len())?;
    (body.get(start..end)? == part.as_bytes()).then_some((start, end))
}

fn apply(body: &[u8], open: usize, empty_object: bool, edits: &mut [Edit<'_>]) -> Vec<u8> {
    let extra: usize = edits.iter().map(|e| e.text.len() + e.key.len() + 4).sum();
    let mut out = Vec::with_capacity(body.len() + extra);
    out.extend_from_slice(&body[..=open]);
    let mut inserted = 0;
    for edit in edits.iter().filter(|e| e.span.is_none()) {
        if inserted > 0 {
            out.push(b',');
        }
        out.push(b'"');
        out.extend_from_slice(edit.key.as_bytes());
        out.extend_from_slice(b"\":");
        out.extend_from_slice(edit.text.as_bytes());
        inserted += 1;
    }
    if inserted > 0 && !empty_object {
        out.push(b',');
    }
    edits.sort_by_key(|e| e.span.map(|(start, _)| start));
    let mut cursor = open + 1;
    for edit in edits.iter() {
        if let Some((start, end)) = edit.span {
            out.extend_from_slice(&body[cursor..start]);
            out.extend_from_slice(edit.text.as_bytes());
            cursor = end;
        }
    }
    out.extend_from_slice(&body[cursor..]);
    out
}

/// Error for a body that does not start with `{`: not JSON at all, or JSON of another type.
fn classify_non_object(body: &[u8]) -> RequestError {
    match serde_json::from_slice::<de::IgnoredAny>(body) {
        Ok(_) => RequestError::NotAnObject,
        Err(_) => RequestError::InvalidJson,
    }
}

/// The top-level entries of a JSON object, values left raw (borrowed from the body).
struct TopLevel<'a> {
    entries: Vec<(Cow<'a, str>, &'a RawValue)>,
}

impl<'a> TopLevel<'a> {
    fn get(&self, key: &str) -> Option<&'a RawValue> {
        self.entries.iter().find(|(k, _)| k == key).map(|(_, v)| *v)
    }
}

fn parse_top_level(body: &[u8]) -> Result<TopLevel<'_>, RequestError> {
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let top = deserializer
        .deserialize_map(TopLevelVisitor)
        .map_err(|_| RequestError::InvalidJson)?;
    deserializer.end().map_err(|_| RequestError::InvalidJson)?;
    let top = top?;
    let mut keys: Vec<&str> = top.entries.iter().map(|(k, _)| k.as_ref()).collect();
    keys.sort_unstable();
    if keys.windows(2).any(|w| w[0] == w[1]) {
        return Err(RequestError::DuplicateKey);
    }
    Ok(top)
}

struct TopLevelVisitor;

impl<'de> Visitor<'de> for TopLevelVisitor {
    type Value = Result<TopLevel<'de>, RequestError>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(8));
        while let Some(key) = map.next_key::<Key<'de>>()? {
            let value: &'de RawValue = map.next_value()?;
            entries.push((key.0, value));
        }
        Ok(Ok(TopLevel { entries }))
    }
}

/// An object key, borrowed unless it contains escapes.
struct Key<'a>(Cow<'a, str>);

impl<'de> serde::Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string key")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_string())))
            }
        }
        deserializer.deserialize_str(KeyVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn call(model: Option<&str>, stream: Option<bool>, key: Option<&str>) -> ProviderCall {
        ProviderCall {
            provider: "dashscope-qwen".into(),
            rule: String::new(),
            authority: "dashscope.aliyuncs.com".into(),
            path: "/compatible-mode/v1/chat/completions".into(),
            model_json: model.map(|m| serde_json::Value::String(m.into()).to_string()),
            stream,
            authorization: key.map(|k| format!("Bearer {k}")),
        }
    }

    fn rewrite(call: &ProviderCall, body: &str) -> Result<String, RequestError> {
        rewrite_body(call, body.as_bytes(), false).map(|out| {
            String::from_utf8(out.body.unwrap_or_else(|| body.as_bytes().to_vec())).unwrap()
        })
    }

    fn json(text: &str) -> serde_json::Value {
        serde_json::from_str(text).unwrap()
    }

    #[test]
    fn sets_model_and_stream_keeping_everything_else() {
        let c = call(Some("qwen-turbo"), Some(false), None);
        let body = r#"{"messages":[{"role":"user","content":"hi"}],"temperature":0.7}"#;
        let out = rewrite(&c, body).unwrap();
        assert_eq!(
            json(&out),
            json(
                r#"{"model":"qwen-turbo","stream":false,"messages":[{"role":"user","content":"hi"}],"temperature":0.7}"#
            )
        );
    }

    #[test]
    fn overrides_client_model_in_place_byte_exact() {
        let c = call(Some("qwen-turbo"), None, None);
        let body =
            "{ \"model\" : \"gpt-4o\",\n \"messages\": [ ],  \"n\": 1.000000000000000000001 }";
        let out = rewrite(&c, body).unwrap();
        assert_eq!(
            out,
            "{ \"model\" : \"qwen-turbo\",\n \"messages\": [ ],  \"n\": 1.000000000000000000001 }"
        );
    }

    #[test]
    fn stream_replaced_and_null_allowed() {
        let c = call(None, Some(true), None);
        let out = rewrite(&c, r#"{"messages":[],"stream":false}"#).unwrap();
        assert_eq!(out, r#"{"messages":[],"stream":true}"#);
        let out = rewrite(&c, r#"{"messages":[],"stream":null}"#).unwrap();
        assert_eq!(out, r#"{"messages":[],"stream":true}"#);
    }

    #[test]
    fn unchanged_body_is_not_copied() {
        let c = call(Some("m"), Some(false), None);
        let body = br#"{"model":"m","stream":false,"messages":[]}"#;
        assert_eq!(rewrite_body(&c, body, true).unwrap().body, None);
        let nothing = call(None, None, None);
        let out = rewrite_body(&nothing, br#"{"messages":[]}"#, true).unwrap();
        assert_eq!(out.body, None);
    }

    #[test]
    fn reports_upstream_model_and_stream() {
        let configured = call(Some("qwen-turbo"), None, None);
        let out = rewrite_body(&configured, br#"{"messages":[],"model":"gpt-4o"}"#, true).unwrap();
        assert_eq!(out.model.as_deref(), Some("qwen-turbo"));
        assert!(!out.stream);

        let client = call(None, None, None);
        let out = rewrite_body(&client, br#"{"messages":[],"model":"g\u0070t"}"#, true).unwrap();
        assert_eq!(out.model.as_deref(), Some("gpt"));
        let out = rewrite_body(&client, br#"{"messages":[]}"#, true).unwrap();
        assert_eq!(out.model, None);

        let forced = call(None, Some(true), None);
        assert!(
            rewrite_body(&forced, br#"{"messages":[],"stream":false}"#, false)
                .unwrap()
                .stream
        );
        let off = call(None, Some(false), None);
        assert!(
            !rewrite_body(&off, br#"{"messages":[],"stream":true}"#, true)
                .unwrap()
                .stream
        );
    }

    #[test]
    fn streamed_requests_ask_for_usage_unless_the_client_chose() {
        let c = call(None, None, None);
        let out = rewrite_body(&c, br#"{"messages":[],"stream":true}"#, true).unwrap();
        let body = json(std::str::from_utf8(&out.body.unwrap()).unwrap());
        assert_eq!(body["stream_options"], json(r#"{"include_usage":true}"#));
        assert!(out.stream);

        let own = br#"{"messages":[],"stream":true,"stream_options":{"include_usage":false}}"#;
        assert_eq!(rewrite_body(&c, own, true).unwrap().body, None);
        let switched_off = rewrite_body(&c, br#"{"messages":[],"stream":true}"#, false).unwrap();
        assert_eq!(switched_off.body, None);
        let not_streamed = rewrite_body(&c, br#"{"messages":[]}"#, true).unwrap();
        assert_eq!(not_streamed.body, None);

        let forced = call(Some("m"), Some(true), None);
        let out = rewrite_body(&forced, br#"{}"#, true);
        assert_eq!(out, Err(RequestError::MissingMessages));
        let out = rewrite_body(&forced, br#"{"messages":[]}"#, true).unwrap();
        assert_eq!(
            json(std::str::from_utf8(&out.body.unwrap()).unwrap()),
            json(
                r#"{"model":"m","stream":true,"stream_options":{"include_usage":true},"messages":[]}"#
            )
        );
    }

    #[test]
    fn escaped_model_is_encoded() {
        let c = call(Some("we\"ird\\model"), None, None);
        let out = rewrite(&c, r#"{"messages":[]}"#).unwrap();
        assert_eq!(json(&out)["model"], "we\"ird\\model");
    }

    #[test]
    fn bad_bodies() {
        let c = call(Some("m"), None, None);
        let cases: &[(&[u8], RequestError)] = &[
            (b"", RequestError::EmptyBody),
            (b"  \n", RequestError::EmptyBody),
            (b"not json", RequestError::InvalidJson),
            (b"{\"messages\":[]", RequestError::InvalidJson),
            (b"{\"messages\":[]} trailing", RequestError::InvalidJson),
            (b"{\"messages\":[\"\xff\"]}", RequestError::InvalidJson),
            (b"[1,2]", RequestError::NotAnObject),
            (b"\"text\"", RequestError::NotAnObject),
            (b"42", RequestError::NotAnObject),
            (b"{}", RequestError::MissingMessages),
            (b"{\"messages\":{}}", RequestError::InvalidMessages),
            (b"{\"messages\":null}", RequestError::InvalidMessages),
            (b"{\"messages\":[],\"model\":7}", RequestError::InvalidModel),
            (
                b"{\"messages\":[],\"stream\":\"yes\"}",
                RequestError::InvalidStream,
            ),
            (
                b"{\"messages\":[],\"model\":\"a\",\"model\":\"b\"}",
                RequestError::DuplicateKey,
            ),
            (
                b"{\"messages\":[],\"m\\u006fdel\":\"b\",\"model\":\"a\"}",
                RequestError::DuplicateKey,
            ),
        ];
        for (body, expected) in cases {
            assert_eq!(
                rewrite_body(&c, body, true),
                Err(*expected),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn deep_nesting_does_not_overflow() {
        let c = call(Some("m"), None, None);
        let depth = 10_000;
        let body = format!(
            "{{\"messages\":[],\"x\":{}{}}}",
            "[".repeat(depth),
            "]".repeat(depth)
        );
        // Either accepted as-is (raw, never parsed into a tree) or refused; never a crash.
        let _ = rewrite_body(&c, body.as_bytes(), true);
    }

    #[test]
    fn headers_rewritten_query_kept_key_replaced() {
        let c = call(None, None, Some("sk-provider"));
        let mut headers: Vec<(String, Vec<u8>)> = vec![
            (":method".into(), b"POST".to_vec()),
            (
                ":path".into(),
                b"/anything?api-version=2024-01&x=1".to_vec(),
            ),
            (":authority".into(), b"test.com".to_vec()),
            ("authorization".into(), b"Bearer client".to_vec()),
            ("content-length".into(), b"42".to_vec()),
            ("user-type".into(), b"subscriber".to_vec()),
        ];
        rewrite_headers(&c, &mut headers);
        let get = |name: &str| -> Vec<&[u8]> {
            headers
                .iter()
                .filter(|(k, _)| k == name)
                .map(|(_, v)| v.as_slice())
                .collect()
        };
        assert_eq!(
            get(":path"),
            vec![&b"/compatible-mode/v1/chat/completions?api-version=2024-01&x=1"[..]]
        );
        assert_eq!(get(":authority"), vec![&b"dashscope.aliyuncs.com"[..]]);
        assert_eq!(get("authorization"), vec![&b"Bearer sk-provider"[..]]);
        assert!(get("content-length").is_empty());
        assert_eq!(get("user-type"), vec![&b"subscriber"[..]]);
        assert_eq!(get(":method"), vec![&b"POST"[..]]);
    }

    #[test]
    fn client_authorization_kept_without_configured_key() {
        let c = call(None, None, None);
        let mut headers: Vec<(String, Vec<u8>)> = vec![
            (":path".into(), b"/".to_vec()),
            (":authority".into(), b"x".to_vec()),
            ("authorization".into(), b"Bearer client".to_vec()),
        ];
        rewrite_headers(&c, &mut headers);
        assert_eq!(
            headers
                .iter()
                .find(|(k, _)| k == "authorization")
                .unwrap()
                .1,
            b"Bearer client"
        );
    }
}
