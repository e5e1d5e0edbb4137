//! Turning a client's request into a provider's call: pure functions of the request and a
//! `ProviderCall`, with no host calls, so they run the same natively, in wasm, and (later) per
//! upstream attempt.

use std::borrow::Cow;

use crate::error::RequestError;
use crate::policy::ProviderCall;
use crate::scan::{self, Member, Object, ScanError};

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

/// One edit of a header map: set `name` to `value` (replacing every value it had), or remove
/// it (`None`).
pub type HeaderChange<'a> = (&'a str, Option<&'a [u8]>);

/// The edits that turn `before` into `after`, so only changed headers cross into Envoy (one
/// small host call each instead of rewriting the whole map). `None` when a name appears more
/// than once on either side: a targeted edit could not say which value it means, so the caller
/// replaces the whole map.
pub fn header_changes<'a>(
    before: &'a [(String, Vec<u8>)],
    after: &'a [(String, Vec<u8>)],
) -> Option<Vec<HeaderChange<'a>>> {
    let unique = |list: &[(String, Vec<u8>)]| {
        list.iter()
            .enumerate()
            .all(|(i, (k, _))| list[..i].iter().all(|(other, _)| other != k))
    };
    if !unique(before) || !unique(after) {
        return None;
    }
    let mut changes = Vec::new();
    for (name, value) in after {
        if crate::policy::header(before, name) != Some(value.as_slice()) {
            changes.push((name.as_str(), Some(value.as_slice())));
        }
    }
    for (name, _) in before {
        if crate::policy::header(after, name).is_none() {
            changes.push((name.as_str(), None));
        }
    }
    Some(changes)
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
/// `request_stream_usage` is on; a request that does not stream loses its `stream_options`. Every byte outside the replaced values is kept as sent: the
/// whole body is validated by `scan`, which only notes where the top-level values are.
pub fn rewrite_body(
    call: &ProviderCall,
    body: &[u8],
    request_stream_usage: bool,
) -> Result<Rewritten, RequestError> {
    Ok(ChatRequest::parse(body)?.rewrite(call, request_stream_usage))
}

/// A chat request body that passed every check, with its top-level values located: what the
/// filter routes on (its `model`) and rewrites for the chosen provider.
pub struct ChatRequest<'a> {
    body: &'a [u8],
    /// Index of the opening `{`, and whether the object has no members.
    open: usize,
    empty: bool,
    top: TopLevel<'a>,
}

impl<'a> ChatRequest<'a> {
    /// Validates the whole body: a JSON object with a `messages` array, `model` a string and
    /// `stream` a boolean (or null) when present, no top-level key twice.
    pub fn parse(body: &'a [u8]) -> Result<ChatRequest<'a>, RequestError> {
        if body.iter().all(u8::is_ascii_whitespace) {
            return Err(RequestError::EmptyBody);
        }
        let object = scan::top_level_object(body).map_err(|e| match e {
            ScanError::NotAnObject => RequestError::NotAnObject,
            ScanError::Invalid => RequestError::InvalidJson,
        })?;
        let top = TopLevel::new(body, &object)?;
        let messages = top.get("messages").ok_or(RequestError::MissingMessages)?;
        if !messages.starts_with(b"[") {
            return Err(RequestError::InvalidMessages);
        }
        if top.get("model").is_some_and(|m| !m.starts_with(b"\"")) {
            return Err(RequestError::InvalidModel);
        }
        let stream = top.get("stream");
        if stream.is_some_and(|s| !matches!(s, b"true" | b"false" | b"null")) {
            return Err(RequestError::InvalidStream);
        }
        Ok(ChatRequest {
            body,
            open: object.open,
            empty: object.members.is_empty(),
            top,
        })
    }

    /// The client's `model`, decoded (`None` if it names none, or names one that is not valid
    /// Unicode, e.g. a lone surrogate escape).
    pub fn model(&self) -> Option<String> {
        serde_json::from_slice(self.top.get("model")?).ok()
    }

    /// The client's `model` as it is in the body (its JSON text, quotes and escapes included).
    pub fn model_json(&self) -> Option<&'a [u8]> {
        self.top.get("model")
    }

    /// The body with its `model` set to `model_json` (a JSON string's text), or without a
    /// `model` for `None`; `None` when the body already is that. How a later fallback attempt
    /// gets back the request the client sent before it is rewritten for its own provider.
    pub fn with_model(&self, model_json: Option<&[u8]>) -> Option<Vec<u8>> {
        let current = self.top.get_span("model");
        match model_json {
            Some(wanted) => {
                let wanted = std::str::from_utf8(wanted).ok()?;
                let mut edits = Vec::with_capacity(1);
                plan(&mut edits, self.body, "model", current, wanted);
                (!edits.is_empty()).then(|| apply(self.body, self.open, self.empty, &mut edits))
            }
            None => {
                let (start, end) = self.top.member_span("model")?;
                let mut out = Vec::with_capacity(self.body.len() - (end - start));
                out.extend_from_slice(&self.body[..start]);
                out.extend_from_slice(&self.body[end..]);
                Some(out)
            }
        }
    }

    /// The body for `call`: the upstream model is the `modelMapping` entry for the client's
    /// model if one applies, else the configured `model`, else the client's own.
    pub fn rewrite(&self, call: &ProviderCall, request_stream_usage: bool) -> Rewritten {
        let body = self.body;
        let top = &self.top;
        let mut edits: Vec<Edit<'_>> = Vec::with_capacity(3);
        let mapped = if call.model_mapping.is_empty() {
            None
        } else {
            self.model()
                .and_then(|model| call.model_mapping.lookup(&model))
        };
        let wanted = mapped
            .map(|target| target.json.as_str())
            .or(call.model_json.as_deref());
        let upstream_model: &[u8] = match wanted {
            Some(wanted) => {
                plan(&mut edits, body, "model", top.get_span("model"), wanted);
                wanted.as_bytes()
            }
            None => top.get("model").unwrap_or(b""),
        };
        let stream = top.get_span("stream");
        let streaming = match call.stream {
            Some(wanted) => {
                let text = if wanted { "true" } else { "false" };
                plan(&mut edits, body, "stream", stream, text);
                wanted
            }
            None => stream.is_some_and(|s| &body[s.0..s.1] == b"true"),
        };
        if streaming && request_stream_usage && top.get("stream_options").is_none() {
            plan(&mut edits, body, "stream_options", None, STREAM_USAGE);
        }
        if !streaming {
            // OpenAI-compatible providers refuse `stream_options` without `stream: true`: the
            // client's, or the one a streamed first attempt got before a fallback to a
            // provider that does not stream.
            if let Some(member) = top.member_span("stream_options") {
                edits.push(Edit {
                    span: Some(member),
                    key: "stream_options",
                    text: "",
                });
            }
        }
        let new_body = (!edits.is_empty()).then(|| apply(body, self.open, self.empty, &mut edits));
        Rewritten {
            body: new_body,
            model: serde_json::from_slice(upstream_model).ok(),
            stream: streaming,
        }
    }
}

/// What a streamed request gets so the provider reports usage in its last event.
const STREAM_USAGE: &str = r#"{"include_usage":true}"#;

/// A change to the body: replace `start..end` with `text` (a value, or a whole member with its
/// comma, to remove it), or insert `"key":text` after `{`.
struct Edit<'a> {
    span: Option<(usize, usize)>,
    key: &'static str,
    text: &'a str,
}

fn plan<'a>(
    edits: &mut Vec<Edit<'a>>,
    body: &[u8],
    key: &'static str,
    current: Option<(usize, usize)>,
    wanted: &'a str,
) {
    if current.is_some_and(|(start, end)| &body[start..end] == wanted.as_bytes()) {
        return;
    }
    edits.push(Edit {
        span: current,
        key,
        text: wanted,
    });
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

/// A byte range of the body.
type Span = (usize, usize);

/// The top-level members of the body by key text (escapes decoded), duplicates refused.
struct TopLevel<'a> {
    body: &'a [u8],
    entries: Vec<Entry<'a>>,
}

/// A top-level member: its key's text, its value's span, and where it begins (its key's
/// opening quote).
type Entry<'a> = (Cow<'a, [u8]>, Span, usize);

impl<'a> TopLevel<'a> {
    fn new(body: &'a [u8], object: &Object) -> Result<TopLevel<'a>, RequestError> {
        let entries: Vec<Entry<'a>> = object
            .members
            .iter()
            .map(|m| (key_text(body, m), m.value, m.key.0 - 1))
            .collect();
        let mut keys: Vec<&[u8]> = entries.iter().map(|(k, _, _)| k.as_ref()).collect();
        keys.sort_unstable();
        if keys.windows(2).any(|w| w[0] == w[1]) {
            return Err(RequestError::DuplicateKey);
        }
        Ok(TopLevel { body, entries })
    }

    fn get_span(&self, key: &str) -> Option<Span> {
        self.entries
            .iter()
            .find(|(k, _, _)| k.as_ref() == key.as_bytes())
            .map(|(_, span, _)| *span)
    }

    /// The bytes to cut to remove `key`'s member with one of its commas, if it is there.
    fn member_span(&self, key: &str) -> Option<Span> {
        let i = self
            .entries
            .iter()
            .position(|(k, _, _)| k.as_ref() == key.as_bytes())?;
        let (_, (_, value_end), start) = self.entries[i];
        Some(match (self.entries.get(i + 1), i.checked_sub(1)) {
            // Up to the next member: this member and the comma after it.
            (Some(&(_, _, next)), _) => (start, next),
            // The last member: from the end of the one before, so its comma goes too.
            (None, Some(before)) => (self.entries[before].1 .1, value_end),
            (None, None) => (start, value_end),
        })
    }

    fn get(&self, key: &str) -> Option<&'a [u8]> {
        self.get_span(key)
            .map(|(start, end)| &self.body[start..end])
    }
}

/// A key's text: its bytes, or for a key with escapes, the decoded string (kept raw when it
/// cannot be decoded, e.g. a lone surrogate: then it equals no key the filter looks for).
fn key_text<'a>(body: &'a [u8], member: &Member) -> Cow<'a, [u8]> {
    let (start, end) = member.key;
    if !member.key_escaped {
        return Cow::Borrowed(&body[start..end]);
    }
    match serde_json::from_slice::<String>(&body[start - 1..end + 1]) {
        Ok(text) => Cow::Owned(text.into_bytes()),
        Err(_) => Cow::Borrowed(&body[start - 1..end + 1]),
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
            model_mapping: Default::default(),
            fallback: None,
            limits: None,
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
    fn the_model_is_set_back_or_removed_and_the_rest_kept() {
        let with = |body: &str, model: Option<&str>| {
            let request = ChatRequest::parse(body.as_bytes()).unwrap();
            request
                .with_model(model.map(str::as_bytes))
                .map(|out| String::from_utf8(out).unwrap())
        };
        let first = r#"{"model":"qwen-turbo", "messages":[],"n":1}"#;
        assert_eq!(
            with(first, Some(r#""gpt-4o""#)).as_deref(),
            Some(r#"{"model":"gpt-4o", "messages":[],"n":1}"#)
        );
        assert_eq!(with(first, Some(r#""qwen-turbo""#)), None);
        assert_eq!(
            with(first, None).as_deref(),
            Some(r#"{"messages":[],"n":1}"#)
        );
        let middle = r#"{ "messages" : [ ] , "model" : "m" , "n" : 1 }"#;
        assert_eq!(
            with(middle, None).as_deref(),
            Some(r#"{ "messages" : [ ] , "n" : 1 }"#)
        );
        let last = r#"{"messages":[] ,"model":"m"}"#;
        assert_eq!(with(last, None).as_deref(), Some(r#"{"messages":[]}"#));
        let escaped_key = r#"{"messages":[],"mod\u0065l":"m"}"#;
        assert_eq!(
            with(escaped_key, None).as_deref(),
            Some(r#"{"messages":[]}"#)
        );
        assert_eq!(with(r#"{"messages":[]}"#, None), None);
        let inserted = with(r#"{"messages":[]}"#, Some(r#""x""#)).unwrap();
        assert_eq!(json(&inserted), json(r#"{"model":"x","messages":[]}"#));
        // What the client sent comes back as it was, escapes included.
        let client = r#"{"model":"caf\u00e9","messages":[]}"#;
        let request = ChatRequest::parse(client.as_bytes()).unwrap();
        assert_eq!(request.model_json(), Some(&br#""caf\u00e9""#[..]));
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
    fn stream_options_go_whenever_the_provider_is_not_asked_to_stream() {
        let off = call(Some("m"), Some(false), None);
        for (body, expected) in [
            (
                r#"{"messages":[],"stream":true,"stream_options":{"include_usage":true}}"#,
                r#"{"model":"m","messages":[],"stream":false}"#,
            ),
            (
                r#"{"stream_options":{"include_usage":true},"stream":true,"messages":[1]}"#,
                r#"{"model":"m","stream":false,"messages":[1]}"#,
            ),
            (
                r#"{"stream":true, "stream_options" : {"a":[1,{"b":2}]} ,"messages":[]}"#,
                r#"{"model":"m","stream":false,"messages":[]}"#,
            ),
        ] {
            let out = rewrite_body(&off, body.as_bytes(), true).unwrap();
            let text = String::from_utf8(out.body.unwrap()).unwrap();
            assert_eq!(json(&text), json(expected), "{body} -> {text}");
            assert!(!out.stream);
        }
        // Not forced either way: a client that does not stream loses its stream_options too.
        let free = call(None, None, None);
        let out = rewrite_body(
            &free,
            br#"{"messages":[],"stream_options":{"include_usage":true}}"#,
            true,
        )
        .unwrap();
        assert_eq!(out.body.as_deref(), Some(&br#"{"messages":[]}"#[..]));
        let out = rewrite_body(
            &free,
            br#"{"messages":[],"stream":false,"stream_options":{}}"#,
            true,
        )
        .unwrap();
        assert_eq!(
            out.body.as_deref(),
            Some(&br#"{"messages":[],"stream":false}"#[..])
        );
        // A fallback attempt to a provider that does not stream, after a streamed first one.
        let first = call(None, Some(true), None);
        let sent = rewrite_body(&first, br#"{"messages":[]}"#, true)
            .unwrap()
            .body
            .unwrap();
        let next = rewrite_body(&off, &sent, true).unwrap();
        assert_eq!(
            json(std::str::from_utf8(&next.body.unwrap()).unwrap()),
            json(r#"{"model":"m","stream":false,"messages":[]}"#)
        );
    }

    #[test]
    fn model_mapping_decides_over_the_configured_model() {
        let mut c = call(Some("fallback-model"), None, None);
        c.model_mapping = crate::models::ModelMapping::compile(
            &[("gpt-4o", "qwen-max"), ("gpt-*", "qwen-plus")]
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
        .unwrap();
        let model_of = |body: &str| {
            let out = rewrite_body(&c, body.as_bytes(), false).unwrap();
            let sent = out.body.unwrap_or_else(|| body.as_bytes().to_vec());
            let sent: serde_json::Value = serde_json::from_slice(&sent).unwrap();
            assert_eq!(out.model.as_deref(), sent["model"].as_str());
            out.model
        };
        assert_eq!(
            model_of(r#"{"messages":[],"model":"gpt-4o"}"#).as_deref(),
            Some("qwen-max")
        );
        assert_eq!(
            model_of(r#"{"messages":[],"model":"gpt-\u0034"}"#).as_deref(),
            Some("qwen-plus")
        );
        assert_eq!(
            model_of(r#"{"messages":[],"model":"claude"}"#).as_deref(),
            Some("fallback-model")
        );
        assert_eq!(
            model_of(r#"{"messages":[]}"#).as_deref(),
            Some("fallback-model")
        );

        let mut keep = call(None, None, None);
        keep.model_mapping = c.model_mapping.clone();
        let out = rewrite_body(&keep, br#"{"messages":[],"model":"claude"}"#, false).unwrap();
        assert_eq!(
            out.body, None,
            "no key applies and no model configured: kept"
        );
        assert_eq!(out.model.as_deref(), Some("claude"));
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
    fn header_changes_touch_only_what_differs() {
        let c = call(None, None, Some("sk-provider"));
        let before: Vec<(String, Vec<u8>)> = vec![
            (":method".into(), b"POST".to_vec()),
            (":path".into(), b"/v1/chat?x=1".to_vec()),
            (":authority".into(), b"test.com".to_vec()),
            ("content-length".into(), b"42".to_vec()),
            ("user-type".into(), b"subscriber".to_vec()),
        ];
        let mut after = before.clone();
        rewrite_headers(&c, &mut after);
        let mut changes = header_changes(&before, &after).unwrap();
        changes.sort();
        assert_eq!(
            changes,
            vec![
                (":authority", Some(&b"dashscope.aliyuncs.com"[..])),
                (
                    ":path",
                    Some(&b"/compatible-mode/v1/chat/completions?x=1"[..])
                ),
                ("authorization", Some(&b"Bearer sk-provider"[..])),
                ("content-length", None),
            ]
        );
        assert_eq!(header_changes(&before, &before), Some(vec![]));
        let mut twice = before.clone();
        twice.push(("user-type".into(), b"other".to_vec()));
        assert_eq!(header_changes(&twice, &after), None);
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
