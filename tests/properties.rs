#![cfg(not(target_arch = "wasm32"))]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Properties of the pure core, checked on generated inputs (proptest): the body rewrite never
//! panics and agrees with serde_json on what is JSON; a valid chat body keeps every key but
//! `model`/`stream`/`stream_options` exactly; the weighted choice follows its weights; the SSE
//! usage reader gives the same report however the stream is cut into chunks.
//!
//! Case counts are modest so the file runs in seconds; a failure prints the shrunk input.
//! `PROPTEST_CASES=10000 cargo test --test properties` runs longer.

use std::fmt::Write as _;

use llm_filter::balancer::{SplitMix64, WeightedChoice};
use llm_filter::error::RequestError;
use llm_filter::policy::ProviderCall;
use llm_filter::rewrite::rewrite_body;
use llm_filter::usage::{Report, SseReader};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};
use serde_json::{Map, Value};

/// The configuration of every block: fixed seed (the same cases every run), `cases` cases
/// unless `PROPTEST_CASES` says otherwise.
fn config(cases: u32) -> Config {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(cases);
    Config {
        cases,
        rng_seed: RngSeed::Fixed(0x5eed_11f1),
        // The seed is fixed, so a failure comes back on every run without a regressions file.
        failure_persistence: None,
        ..Config::default()
    }
}

fn call(model: Option<&str>, stream: Option<bool>) -> ProviderCall {
    ProviderCall {
        provider: "p".into(),
        rule: String::new(),
        authority: "llm.example".into(),
        path: "/v1/chat/completions".into(),
        model_json: model.map(|m| Value::String(m.into()).to_string()),
        stream,
        authorization: Some("Bearer sk-test".into()),
        model_mapping: Default::default(),
        fallback: None,
        limits: None,
    }
}

/// What serde_json says: the body is one JSON text (UTF-8, RFC 8259 grammar, no trailing
/// bytes). `IgnoredAny` walks nested values without recursing, so depth is not a reason.
fn is_json(body: &[u8]) -> bool {
    std::str::from_utf8(body)
        .is_ok_and(|text| serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok())
}

// ---------------------------------------------------------------- generated JSON, printed
// with arbitrary whitespace and arbitrary (valid) string escapes

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        any::<String>().prop_map(Value::String),
        "[a-z\"\\\\/ \u{e9}\u{4f60}\u{1f600}\t\n]{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 5, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::vec(("[a-z_]{0,6}", inner), 0..5)
                .prop_map(|entries| Value::Object(entries.into_iter().collect())),
        ]
    })
}

/// Choices for one JSON text: whitespace runs and whether to escape each character, drawn
/// from a small generator so any value can be printed many ways.
struct Printer {
    state: u64,
}

impl Printer {
    fn next(&mut self) -> u64 {
        self.state = self
            .state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.state >> 33
    }

    fn ws(&mut self, out: &mut String) {
        // Mostly nothing, sometimes a run of the four JSON whitespace characters.
        if !self.next().is_multiple_of(3) {
            return;
        }
        for _ in 0..self.next() % 4 {
            out.push([' ', '\t', '\n', '\r'][(self.next() % 4) as usize]);
        }
    }

    fn string(&mut self, s: &str, out: &mut String) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str(["\\n", "\\u000a", "\\u000A"][(self.next() % 3) as usize]),
                '\t' => out.push_str("\\t"),
                '/' if self.next().is_multiple_of(2) => out.push_str("\\/"),
                c if (c as u32) < 0x20 => {
                    let _ = write!(out, "\\u{:04x}", c as u32);
                }
                c if self.next().is_multiple_of(5) => {
                    // Any character may be written as \uXXXX (a surrogate pair above U+FFFF).
                    let mut units = [0u16; 2];
                    for unit in c.encode_utf16(&mut units) {
                        let _ = write!(out, "\\u{unit:04X}");
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }

    fn value(&mut self, v: &Value, out: &mut String) {
        match v {
            Value::Null | Value::Bool(_) | Value::Number(_) => out.push_str(&v.to_string()),
            Value::String(s) => self.string(s, out),
            Value::Array(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        self.ws(out);
                        out.push(',');
                    }
                    self.ws(out);
                    self.value(item, out);
                    self.ws(out);
                }
                if items.is_empty() {
                    self.ws(out);
                }
                out.push(']');
            }
            Value::Object(map) => {
                let entries: Vec<(&String, &Value)> = map.iter().collect();
                self.object(&entries, out);
            }
        }
    }

    fn object(&mut self, entries: &[(&String, &Value)], out: &mut String) {
        out.push('{');
        for (i, (k, v)) in entries.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            self.ws(out);
            self.string(k, out);
            self.ws(out);
            out.push(':');
            self.ws(out);
            self.value(v, out);
            self.ws(out);
        }
        if entries.is_empty() {
            self.ws(out);
        }
        out.push('}');
    }
}

/// A valid chat body: `messages`, optionally `model` / `stream` / `stream_options`, and
/// extra top-level keys with arbitrary values, in arbitrary order.
#[derive(Debug, Clone)]
struct ChatBody {
    /// The top-level entries in the order they are written.
    entries: Vec<(String, Value)>,
    /// Seed of the printer (whitespace and escapes).
    print_seed: u64,
    /// Leading and trailing whitespace around the object.
    pad: (String, String),
}

impl ChatBody {
    fn text(&self) -> String {
        let mut printer = Printer {
            state: self.print_seed,
        };
        let mut out = self.pad.0.clone();
        let entries: Vec<(&String, &Value)> = self.entries.iter().map(|(k, v)| (k, v)).collect();
        printer.object(&entries, &mut out);
        out.push_str(&self.pad.1);
        out
    }

    fn get(&self, key: &str) -> Option<&Value> {
        self.entries.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }
}

const RESERVED: [&str; 4] = ["messages", "model", "stream", "stream_options"];

fn chat_body() -> impl Strategy<Value = ChatBody> {
    let message = ("[a-z]{1,9}", any::<String>())
        .prop_map(|(role, content)| serde_json::json!({"role": role, "content": content}));
    let messages = prop::collection::vec(message, 0..4).prop_map(Value::Array);
    let model = prop::option::of(any::<String>().prop_map(Value::String));
    let stream = prop::option::of(prop_oneof![
        Just(Value::Bool(true)),
        Just(Value::Bool(false)),
        Just(Value::Null),
    ]);
    let stream_options = prop::option::of(json_value());
    let extra = prop::collection::btree_map("[a-zA-Z_][a-zA-Z0-9_ .-]{0,11}", json_value(), 0..6);
    let ws = "[ \t\r\n]{0,3}";
    (
        messages,
        model,
        stream,
        stream_options,
        extra,
        any::<u64>(),
        any::<u64>(),
        (ws, ws),
    )
        .prop_map(
            |(messages, model, stream, stream_options, extra, order_seed, print_seed, pad)| {
                let mut entries: Vec<(String, Value)> = vec![("messages".into(), messages)];
                for (key, value) in [("model", model), ("stream", stream)] {
                    if let Some(v) = value {
                        entries.push((key.into(), v));
                    }
                }
                if let Some(v) = stream_options {
                    entries.push(("stream_options".into(), v));
                }
                entries.extend(
                    extra
                        .into_iter()
                        .filter(|(k, _)| !RESERVED.contains(&k.as_str())),
                );
                // Fisher-Yates with a seeded generator: any key order.
                let mut rng = SplitMixRng(order_seed);
                for i in (1..entries.len()).rev() {
                    let j = (rng.next() % (i as u64 + 1)) as usize;
                    entries.swap(i, j);
                }
                ChatBody {
                    entries,
                    print_seed,
                    pad,
                }
            },
        )
}

struct SplitMixRng(u64);

impl SplitMixRng {
    fn next(&mut self) -> u64 {
        use llm_filter::balancer::RandomSource;
        let mut g = SplitMix64::new(self.0);
        self.0 = g.next_u64();
        self.0
    }
}

/// Bytes that look like JSON often enough to reach deep into a parser.
fn json_soup() -> impl Strategy<Value = Vec<u8>> {
    let token = prop_oneof![
        Just(&b"{"[..]),
        Just(&b"}"[..]),
        Just(&b"["[..]),
        Just(&b"]"[..]),
        Just(&b","[..]),
        Just(&b":"[..]),
        Just(&b" "[..]),
        Just(&b"\""[..]),
        Just(&b"\\"[..]),
        Just(&b"\"messages\""[..]),
        Just(&b"\"model\""[..]),
        Just(&b"\"stream\""[..]),
        Just(&b"\"stream_options\""[..]),
        Just(&b"\"m\\u006fdel\""[..]),
        Just(&b"\"x\""[..]),
        Just(&b"\"\\ud83d\\ude00\""[..]),
        Just(&b"\"\\ud800\""[..]),
        Just(&b"\\u"[..]),
        Just(&b"true"[..]),
        Just(&b"false"[..]),
        Just(&b"null"[..]),
        Just(&b"-0"[..]),
        Just(&b"1e400"[..]),
        Just(&b"12345678901234567890123"[..]),
        Just(&b"0.5E-3"[..]),
        Just(&b"\xff"[..]),
        Just(&b"\xc3\xa9"[..]),
        Just(&b"\xe4\xbd"[..]),
        Just(&b"\x00"[..]),
        Just(&b"/*"[..]),
    ];
    prop::collection::vec(token, 0..40).prop_map(|tokens| tokens.concat())
}

/// One edit of a byte string.
#[derive(Debug, Clone)]
enum Mutation {
    Flip(prop::sample::Index, u8),
    Insert(prop::sample::Index, u8),
    Delete(prop::sample::Index, usize),
    Duplicate(prop::sample::Index, usize),
    Truncate(prop::sample::Index),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let interesting = prop_oneof![
        any::<u8>(),
        prop::sample::select(b"{}[],:\"\\ 0e-.tfnu\x80\xff".to_vec()),
    ];
    prop_oneof![
        (any::<prop::sample::Index>(), interesting.clone()).prop_map(|(i, b)| Mutation::Flip(i, b)),
        (any::<prop::sample::Index>(), interesting).prop_map(|(i, b)| Mutation::Insert(i, b)),
        (any::<prop::sample::Index>(), 1..8usize).prop_map(|(i, n)| Mutation::Delete(i, n)),
        (any::<prop::sample::Index>(), 1..16usize).prop_map(|(i, n)| Mutation::Duplicate(i, n)),
        any::<prop::sample::Index>().prop_map(Mutation::Truncate),
    ]
}

fn mutate(mut body: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        let len = body.len();
        match m {
            Mutation::Flip(i, b) if len > 0 => body[i.index(len)] = *b,
            Mutation::Insert(i, b) => body.insert(i.index(len + 1), *b),
            Mutation::Delete(i, n) if len > 0 => {
                let at = i.index(len);
                body.drain(at..(at + n).min(len));
            }
            Mutation::Duplicate(i, n) if len > 0 => {
                let at = i.index(len);
                let piece = body[at..(at + n).min(len)].to_vec();
                body.splice(at..at, piece);
            }
            Mutation::Truncate(i) => body.truncate(i.index(len + 1)),
            _ => {}
        }
    }
    body
}

/// The body the provider gets.
fn forwarded(body: &[u8], out: &llm_filter::rewrite::Rewritten) -> Vec<u8> {
    out.body.clone().unwrap_or_else(|| body.to_vec())
}

/// Checks one outcome of `rewrite_body` on any input against serde_json: what serde_json
/// refuses is refused; what is accepted is forwarded as a JSON object with the model and
/// stream the call dictates.
fn check_against_serde_json(
    c: &ProviderCall,
    body: &[u8],
    usage: bool,
) -> Result<(), TestCaseError> {
    let result = rewrite_body(c, body, usage);
    match &result {
        Err(_) => {}
        Ok(out) => {
            prop_assert!(
                is_json(body),
                "accepted a body serde_json refuses: {:?}",
                String::from_utf8_lossy(body)
            );
            let sent = forwarded(body, out);
            prop_assert!(
                is_json(&sent),
                "forwarded a body that is not JSON: {:?}",
                String::from_utf8_lossy(&sent)
            );
            // Deep nesting is valid JSON but beyond serde_json's tree depth limit: only
            // compare trees when serde_json can build them.
            if let Ok(tree) = serde_json::from_slice::<Value>(&sent) {
                prop_assert!(tree.is_object());
                prop_assert!(tree["messages"].is_array());
                if let Some(m) = c.model() {
                    prop_assert_eq!(&tree["model"], &Value::String(m));
                }
                if let Some(s) = c.stream {
                    prop_assert_eq!(&tree["stream"], &Value::Bool(s));
                }
                prop_assert_eq!(out.stream, tree["stream"] == Value::Bool(true));
            }
        }
    }
    if result.is_ok() || matches!(result, Err(RequestError::EmptyBody)) {
        return Ok(());
    }
    // Refused: refused for a reason serde_json agrees with, when it is about syntax.
    if is_json(body) {
        prop_assert_ne!(
            result,
            Err(RequestError::InvalidJson),
            "valid JSON called invalid: {:?}",
            String::from_utf8_lossy(body)
        );
    }
    Ok(())
}

fn calls() -> impl Strategy<Value = (ProviderCall, bool)> {
    (
        prop::option::of(prop_oneof!["[a-z0-9.-]{1,16}", any::<String>()]),
        prop::option::of(any::<bool>()),
        any::<bool>(),
    )
        .prop_map(|(model, stream, usage)| (call(model.as_deref(), stream), usage))
}

proptest! {
    #![proptest_config(config(512))]

    /// (a) Any bytes: no panic, and no disagreement with serde_json.
    #[test]
    fn rewrite_never_panics_on_arbitrary_bytes(
        body in prop::collection::vec(any::<u8>(), 0..200),
        (c, usage) in calls(),
    ) {
        check_against_serde_json(&c, &body, usage)?;
    }

    /// (a) JSON-like token soup reaches past the first byte.
    #[test]
    fn rewrite_never_panics_on_json_soup(body in json_soup(), (c, usage) in calls()) {
        check_against_serde_json(&c, &body, usage)?;
        let mut wrapped = b"{\"messages\":[],".to_vec();
        wrapped.extend_from_slice(&body);
        check_against_serde_json(&c, &wrapped, usage)?;
    }

    /// (a) A valid body with a few bytes changed, inserted, deleted, repeated or cut.
    #[test]
    fn rewrite_never_panics_on_mutated_valid_bodies(
        chat in chat_body(),
        mutations in prop::collection::vec(mutation(), 1..5),
        (c, usage) in calls(),
    ) {
        let body = mutate(chat.text().into_bytes(), &mutations);
        check_against_serde_json(&c, &body, usage)?;
    }

    /// (b) A valid chat body keeps every key but `model` / `stream` / `stream_options`,
    /// and those are what the call dictates.
    #[test]
    fn valid_body_keeps_every_other_key(chat in chat_body(), (c, usage) in calls()) {
        let text = chat.text();
        let original: Value = serde_json::from_str(&text).unwrap();
        let out = match rewrite_body(&c, text.as_bytes(), usage) {
            Ok(out) => out,
            Err(e) => {
                return Err(TestCaseError::fail(format!("refused a valid body ({e:?}): {text:?}")));
            }
        };
        let sent = forwarded(text.as_bytes(), &out);
        let got: Value = serde_json::from_slice(&sent).map_err(|e| {
            TestCaseError::fail(format!(
                "forwarded body is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&sent)
            ))
        })?;
        let (original, got): (&Map<String, Value>, &Map<String, Value>) =
            (original.as_object().unwrap(), got.as_object().unwrap());

        for (key, value) in original {
            if !["model", "stream", "stream_options"].contains(&key.as_str()) {
                prop_assert_eq!(got.get(key), Some(value), "key {:?} changed", key);
            }
        }
        let expected_model = c.model().map(Value::String).or_else(|| chat.get("model").cloned());
        prop_assert_eq!(got.get("model"), expected_model.as_ref());
        prop_assert_eq!(out.model.clone(), expected_model.and_then(|m| m.as_str().map(str::to_string)));

        let client_stream = chat.get("stream").cloned();
        let expected_stream = c.stream.map(Value::Bool).or(client_stream);
        prop_assert_eq!(got.get("stream"), expected_stream.as_ref());
        let streaming = expected_stream == Some(Value::Bool(true));
        prop_assert_eq!(out.stream, streaming);

        // Providers refuse `stream_options` on a request that does not stream: it goes.
        let expected_options = match chat.get("stream_options") {
            _ if !streaming => None,
            Some(own) => Some(own.clone()),
            None if usage => Some(serde_json::json!({"include_usage": true})),
            None => None,
        };
        prop_assert_eq!(got.get("stream_options"), expected_options.as_ref());

        let mut expected_keys: Vec<&String> = original.keys().collect();
        if !streaming {
            expected_keys.retain(|k| k.as_str() != "stream_options");
        }
        let mut got_keys: Vec<&String> = got.keys().collect();
        for key in ["model", "stream", "stream_options"] {
            let key = key.to_string();
            if got.contains_key(&key) && !original.contains_key(&key) {
                expected_keys.push(got.get_key_value(&key).unwrap().0);
            }
        }
        expected_keys.sort();
        got_keys.sort();
        prop_assert_eq!(expected_keys, got_keys, "keys added or lost");

        // Nothing to change: the body is forwarded as sent.
        let options_change = if streaming {
            usage && chat.get("stream_options").is_none()
        } else {
            chat.get("stream_options").is_some()
        };
        if c.model_json.is_none() && c.stream.is_none() && !options_change {
            prop_assert_eq!(sent, text.into_bytes());
        }
    }

    /// (b) Any of the generated values alone (not an object, or an object without a
    /// `messages` array) is refused with the error that says so.
    #[test]
    fn other_json_gets_the_error_that_names_it(value in json_value(), seed in any::<u64>()) {
        let mut text = String::new();
        Printer { state: seed }.value(&value, &mut text);
        let c = call(Some("m"), None);
        let result = rewrite_body(&c, text.as_bytes(), true);
        let expected = match &value {
            Value::Object(map) => match map.get("messages") {
                Some(Value::Array(_)) => return Ok(()),
                // Which error wins when `model`/`stream` are wrong too is not promised.
                _ if map.contains_key("model") || map.contains_key("stream") => {
                    prop_assert!(
                        matches!(result, Err(e) if e != RequestError::InvalidJson && e != RequestError::EmptyBody),
                        "{:?}: {:?}", text, result
                    );
                    return Ok(());
                }
                None => Err(RequestError::MissingMessages),
                Some(_) => Err(RequestError::InvalidMessages),
            },
            _ => Err(RequestError::NotAnObject),
        };
        prop_assert_eq!(result.map(|_| ()), expected, "{:?}", text);
    }

    /// (b) A top-level key written twice (however it is escaped) is refused.
    #[test]
    fn duplicate_top_level_keys_are_refused(chat in chat_body(), pick in any::<prop::sample::Index>(), seed in any::<u64>()) {
        let mut chat = chat;
        let (key, value) = chat.entries[pick.index(chat.entries.len())].clone();
        chat.entries.push((key, value));
        chat.print_seed = seed;
        let text = chat.text();
        let result = rewrite_body(&call(Some("m"), None), text.as_bytes(), true);
        prop_assert_eq!(result, Err(RequestError::DuplicateKey), "{:?}", text);
    }
}

// ---------------------------------------------------------------- weighted choice

proptest! {
    #![proptest_config(config(48))]

    /// (c) Over many draws each backend's share is its weight's share (a chi-square bound),
    /// and a zero-weight backend is never chosen.
    #[test]
    fn weighted_choice_follows_weights(
        weights in prop::collection::vec(prop_oneof![Just(0u64), 1..100u64, 1_000_000..1_000_000_000u64], 1..7),
        seed in any::<u64>(),
    ) {
        prop_assume!(weights.iter().any(|&w| w > 0));
        let choice = WeightedChoice::new(&weights).unwrap();
        let mut rng = SplitMix64::new(seed);
        let draws = 20_000u64;
        let mut counts = vec![0u64; weights.len()];
        for _ in 0..draws {
            counts[choice.choose(&mut rng)] += 1;
        }
        let total: u64 = weights.iter().sum();
        // Pearson's chi-square over the backends expected at least 5 times; the rarer ones
        // are pooled into one cell (the usual rule, so one lucky draw of a 1-in-20-million
        // backend does not count as a failure).
        let (mut chi2, mut cells) = (0.0, 0);
        let (mut pooled_expected, mut pooled_count) = (0.0, 0u64);
        for (&w, &n) in weights.iter().zip(&counts) {
            if w == 0 {
                prop_assert_eq!(n, 0, "a zero-weight backend was chosen: {:?} {:?}", weights, counts);
                continue;
            }
            let expected = draws as f64 * w as f64 / total as f64;
            if expected < 5.0 {
                pooled_expected += expected;
                pooled_count += n;
            } else {
                chi2 += (n as f64 - expected).powi(2) / expected;
                cells += 1;
            }
        }
        if pooled_expected >= 5.0 {
            chi2 += (pooled_count as f64 - pooled_expected).powi(2) / pooled_expected;
            cells += 1;
        } else {
            // Poisson with mean < 5: 20 or more has probability below 1e-6.
            prop_assert!(pooled_count < 20, "rare backends chosen {pooled_count} times, expected {pooled_expected:.2}: {weights:?} {counts:?}");
        }
        // At most 5 degrees of freedom: P(chi2 > 40) < 1e-6.
        prop_assert!(cells <= 1 || chi2 <= 40.0, "chi2 {chi2:.1} > 40 for weights {weights:?}: {counts:?}");
    }

    /// (c) Weights that overflow or are all zero give nothing to choose from, never a panic.
    #[test]
    fn weighted_choice_refuses_nothing_to_choose(weights in prop::collection::vec(prop_oneof![Just(0u64), Just(u64::MAX), any::<u64>()], 0..5)) {
        let sum = weights.iter().try_fold(0u64, |a, &w| a.checked_add(w));
        let choice = WeightedChoice::new(&weights);
        prop_assert_eq!(choice.is_some(), sum.is_some_and(|s| s > 0));
        if let Some(choice) = choice {
            let mut rng = SplitMix64::new(1);
            for _ in 0..64 {
                let i = choice.choose(&mut rng);
                prop_assert!(weights[i] > 0);
            }
        }
    }
}

// ---------------------------------------------------------------- SSE usage

/// One piece of an SSE stream.
fn sse_event() -> impl Strategy<Value = String> {
    let usage = (0..10_000u64, 0..10_000u64).prop_map(|(p, c)| {
        serde_json::json!({"model": "m-final", "choices": [], "usage": {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}})
            .to_string()
    });
    let delta = "[a-z \u{4f60}]{0,10}".prop_map(|t| {
        serde_json::json!({"model": "m", "choices": [{"delta": {"content": t}}]}).to_string()
    });
    let data = prop_oneof![
        usage,
        delta,
        Just("[DONE]".to_string()),
        Just("{not json".to_string()),
        Just(String::new()),
    ];
    let eol = prop_oneof![Just("\n"), Just("\r\n"), Just("\r")];
    prop_oneof![
        4 => (data, eol.clone(), any::<bool>()).prop_map(|(d, eol, space)| {
            format!("data:{}{d}{eol}{eol}", if space { " " } else { "" })
        }),
        // A JSON object split over two data lines of one event.
        1 => (eol.clone()).prop_map(|eol| format!("data: {{\"model\":{eol}data: \"two-lines\"}}{eol}{eol}")),
        1 => (eol.clone()).prop_map(|eol| format!(": keep-alive{eol}")),
        1 => (eol.clone()).prop_map(|eol| format!("event: message{eol}id: 7{eol}retry: 10{eol}")),
        1 => eol.prop_map(str::to_string),
    ]
}

fn read_whole(stream: &[u8]) -> (Report, u64, bool) {
    let mut reader = SseReader::new();
    reader.feed(stream);
    let report = reader.finish().clone();
    (report, reader.events(), reader.done())
}

fn read_split(stream: &[u8], cuts: &[prop::sample::Index]) -> (Report, u64, bool) {
    let mut points: Vec<usize> = cuts.iter().map(|i| i.index(stream.len() + 1)).collect();
    points.push(0);
    points.push(stream.len());
    points.sort_unstable();
    let mut reader = SseReader::new();
    for pair in points.windows(2) {
        // Equal cut points feed empty chunks, which must change nothing.
        reader.feed(&stream[pair[0]..pair[1]]);
    }
    let report = reader.finish().clone();
    (report, reader.events(), reader.done())
}

proptest! {
    #![proptest_config(config(512))]

    /// (d) An SSE stream cut anywhere, any number of times, reads like the whole stream.
    #[test]
    fn sse_usage_ignores_chunk_boundaries(
        events in prop::collection::vec(sse_event(), 0..12),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..24),
        twice in any::<bool>(),
    ) {
        let stream = events.concat().into_bytes();
        // Every cut made twice: an empty chunk at every boundary.
        let cuts = if twice { cuts.repeat(2) } else { cuts };
        prop_assert_eq!(
            read_split(&stream, &cuts),
            read_whole(&stream),
            "{:?}",
            String::from_utf8_lossy(&stream)
        );
    }

    /// (d) The same for arbitrary bytes: whatever the reader makes of them, cutting them
    /// into chunks does not change it.
    #[test]
    fn sse_arbitrary_bytes_ignore_chunk_boundaries(
        stream in prop::collection::vec(prop_oneof![any::<u8>(), prop::sample::select(b"\r\n:data [DONE]{}\"".to_vec())], 0..300),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..24),
        twice in any::<bool>(),
    ) {
        let cuts = if twice { cuts.repeat(2) } else { cuts };
        prop_assert_eq!(read_split(&stream, &cuts), read_whole(&stream));
    }
}
