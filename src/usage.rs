//! What a provider's answer says about itself: the model that answered and the token usage,
//! from a JSON body or, incrementally, from a server-sent-event stream. Observation only: the
//! caller forwards every byte unchanged whatever happens here.

use serde::Deserialize;

/// Model and token counts reported by the provider; `None` where it said nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub model: Option<String>,
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
    pub total_tokens: Option<u64>,
}

impl Report {
    /// True once the usage numbers are known.
    pub fn has_usage(&self) -> bool {
        self.prompt_tokens.is_some() || self.completion_tokens.is_some()
    }

    fn absorb(&mut self, chunk: Chunk) {
        if let Some(model) = chunk.model {
            if self.model.is_none() {
                self.model = Some(model);
            }
        }
        if let Some(usage) = chunk.usage {
            self.prompt_tokens = usage.prompt_tokens.or(self.prompt_tokens);
            self.completion_tokens = usage.completion_tokens.or(self.completion_tokens);
            self.total_tokens = usage.total_tokens.or(self.total_tokens);
        }
    }
}

/// The only fields read from a response object; everything else is skipped unparsed.
#[derive(Deserialize)]
struct Chunk {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    usage: Option<UsageFields>,
}

#[derive(Deserialize)]
struct UsageFields {
    #[serde(default)]
    prompt_tokens: Option<u64>,
    #[serde(default)]
    completion_tokens: Option<u64>,
    #[serde(default)]
    total_tokens: Option<u64>,
}

/// Reads a complete (non-streamed) chat completion body. `None`: not a JSON object of that
/// shape (compressed, truncated, an HTML error page...).
pub fn report_from_json(body: &[u8]) -> Option<Report> {
    let chunk: Chunk = serde_json::from_slice(body).ok()?;
    let mut report = Report::default();
    report.absorb(chunk);
    Some(report)
}

/// Largest event kept while waiting for its end; a longer one is skipped, not buffered.
const MAX_EVENT_BYTES: usize = 1 << 20;

/// An incremental reader of an SSE stream (`data: {...}` events separated by blank lines,
/// `:` comments, `data: [DONE]`), fed chunk by chunk as they pass through.
#[derive(Debug, Default)]
pub struct SseReader {
    report: Report,
    /// The current line, when a chunk ended inside it.
    line: Vec<u8>,
    /// `data:` lines of the current event, joined by `\n`.
    data: Vec<u8>,
    /// The current event grew past `MAX_EVENT_BYTES`: ignore it up to its end.
    skipping: bool,
    /// A chunk ended right after `\r`: a following `\n` belongs to the same line end.
    after_cr: bool,
    events: u64,
    done: bool,
}

impl SseReader {
    pub fn new() -> SseReader {
        SseReader::default()
    }

    /// Reads the next piece of the stream, wherever it was cut.
    pub fn feed(&mut self, mut chunk: &[u8]) {
        if chunk.is_empty() {
            // Nothing to read; above all, a pending `\r` must still pair with the next `\n`.
            return;
        }
        if self.after_cr {
            self.after_cr = false;
            if let Some(rest) = chunk.strip_prefix(b"\n") {
                chunk = rest;
            }
        }
        while let Some(end) = chunk.iter().position(|&b| b == b'\n' || b == b'\r') {
            let (head, rest) = chunk.split_at(end);
            self.push_line_part(head);
            self.end_line();
            chunk = &rest[1..];
            if rest[0] == b'\r' {
                match chunk.first() {
                    Some(b'\n') => chunk = &chunk[1..],
                    None => self.after_cr = true,
                    Some(_) => {}
                }
            }
        }
        self.push_line_part(chunk);
    }

    /// The stream ended: an event not closed by a blank line still counts.
    pub fn finish(&mut self) -> &Report {
        if !self.line.is_empty() {
            self.end_line();
        }
        self.dispatch();
        &self.report
    }

    pub fn report(&self) -> &Report {
        &self.report
    }

    /// Number of `data` events seen (excluding `[DONE]`).
    pub fn events(&self) -> u64 {
        self.events
    }

    /// True once `data: [DONE]` arrived.
    pub fn done(&self) -> bool {
        self.done
    }

    fn push_line_part(&mut self, part: &[u8]) {
        if self.skipping || part.is_empty() {
            return;
        }
        if self.line.len() + self.data.len() + part.len() > MAX_EVENT_BYTES {
            self.skipping = true;
            self.line.clear();
            self.data.clear();
            return;
        }
        self.line.extend_from_slice(part);
    }

    fn end_line(&mut self) {
        if self.line.is_empty() {
            // A blank line ends the event.
            self.dispatch();
            self.skipping = false;
            return;
        }
        let line = std::mem::take(&mut self.line);
        if let Some(value) = field_value(&line, b"data") {
            if !self.data.is_empty() {
                self.data.push(b'\n');
            }
            self.data.extend_from_slice(value);
        }
        // Comments (`:`), `event:`, `id:`, `retry:` carry no usage.
        self.line = line;
        self.line.clear();
    }

    fn dispatch(&mut self) {
        if self.data.is_empty() {
            return;
        }
        let data = std::mem::take(&mut self.data);
        if data.trim_ascii() == b"[DONE]" {
            self.done = true;
        } else {
            self.events += 1;
            if let Ok(chunk) = serde_json::from_slice::<Chunk>(&data) {
                self.report.absorb(chunk);
            }
        }
        self.data = data;
        self.data.clear();
    }
}

/// Largest non-streamed answer copied for reading; a longer one counts as usage unknown.
const MAX_JSON_BYTES: usize = 1 << 20;

/// Watches one response go by: JSON copied (bounded) until its end, SSE read event by event,
/// anything else (compressed, another type) ignored. Never changes or holds back a byte.
#[derive(Debug)]
pub enum ResponseObserver {
    Json(Vec<u8>),
    Sse(SseReader),
    Unreadable,
}

impl ResponseObserver {
    /// Chooses how to read a response from its headers.
    pub fn for_response(headers: &[(String, Vec<u8>)]) -> ResponseObserver {
        let value = |name: &str| crate::policy::header(headers, name);
        if value("content-encoding").is_some_and(|e| !e.eq_ignore_ascii_case(b"identity")) {
            return ResponseObserver::Unreadable;
        }
        let content_type = value("content-type").unwrap_or_default();
        let media = content_type
            .split(|&b| b == b';')
            .next()
            .unwrap_or_default()
            .trim_ascii();
        if media.eq_ignore_ascii_case(b"text/event-stream") {
            ResponseObserver::Sse(SseReader::new())
        } else if media.eq_ignore_ascii_case(b"application/json") || media.is_empty() {
            ResponseObserver::Json(Vec::new())
        } else {
            ResponseObserver::Unreadable
        }
    }

    pub fn feed(&mut self, chunk: &[u8]) {
        match self {
            ResponseObserver::Json(body) if body.len() + chunk.len() <= MAX_JSON_BYTES => {
                body.extend_from_slice(chunk)
            }
            ResponseObserver::Json(_) => *self = ResponseObserver::Unreadable,
            ResponseObserver::Sse(reader) => reader.feed(chunk),
            ResponseObserver::Unreadable => {}
        }
    }

    /// `data` events seen so far (0 unless the response is a stream).
    pub fn events(&self) -> u64 {
        match self {
            ResponseObserver::Sse(reader) => reader.events(),
            _ => 0,
        }
    }

    /// What the response reported; `None` when it could not be read.
    pub fn finish(&mut self) -> Option<Report> {
        match self {
            ResponseObserver::Json(body) => report_from_json(body),
            ResponseObserver::Sse(reader) => Some(reader.finish().clone()),
            ResponseObserver::Unreadable => None,
        }
    }
}

/// The value of an SSE `name: value` line (one optional space after the colon).
fn field_value<'a>(line: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    let rest = line.strip_prefix(name)?;
    let value = rest.strip_prefix(b":")?;
    Some(value.strip_prefix(b" ").unwrap_or(value))
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    const DASHSCOPE_JSON: &str = include_str!("../tests/data/responses/dashscope-chat.json");
    const MOONSHOT_JSON: &str = include_str!("../tests/data/responses/moonshot-chat.json");
    const OPENAI_SSE: &str = include_str!("../tests/data/responses/openai-stream.sse");
    const DASHSCOPE_SSE: &str = include_str!("../tests/data/responses/dashscope-stream.sse");

    fn report(model: &str, prompt: u64, completion: u64, total: u64) -> Report {
        Report {
            model: Some(model.to_string()),
            prompt_tokens: Some(prompt),
            completion_tokens: Some(completion),
            total_tokens: Some(total),
        }
    }

    #[test]
    fn json_bodies_from_the_seeds() {
        assert_eq!(
            report_from_json(DASHSCOPE_JSON.as_bytes()),
            Some(report("qwen-1.8b-chat", 3, 72, 75))
        );
        assert_eq!(
            report_from_json(MOONSHOT_JSON.as_bytes()),
            Some(report("moonshot-v1-8k", 78, 78, 156))
        );
    }

    #[test]
    fn unreadable_json_is_unknown_not_an_error() {
        assert_eq!(report_from_json(b""), None);
        assert_eq!(report_from_json(b"\x1f\x8b\x08\x00gzip"), None);
        assert_eq!(report_from_json(&DASHSCOPE_JSON.as_bytes()[..40]), None);
        assert_eq!(report_from_json(b"<html>502</html>"), None);
        let no_usage = report_from_json(br#"{"error":{"message":"rate limited"}}"#).unwrap();
        assert!(!no_usage.has_usage());
    }

    fn read_split(stream: &[u8], cuts: &[usize]) -> (Report, u64, bool) {
        let mut reader = SseReader::new();
        let mut start = 0;
        for &cut in cuts {
            reader.feed(&stream[start..cut]);
            start = cut;
        }
        reader.feed(&stream[start..]);
        let report = reader.finish().clone();
        (report, reader.events(), reader.done())
    }

    #[test]
    fn sse_streams_split_at_every_byte() {
        for (stream, expected, events) in [
            (OPENAI_SSE, report("gpt-4o-mini-2024-07-18", 13, 7, 20), 5),
            (DASHSCOPE_SSE, report("qwen-turbo", 22, 9, 31), 4),
        ] {
            let bytes = stream.as_bytes();
            let whole = read_split(bytes, &[]);
            assert_eq!(whole, (expected.clone(), events, true));
            for cut in 0..=bytes.len() {
                assert_eq!(read_split(bytes, &[cut]), whole, "cut at {cut}");
            }
            let every_byte: Vec<usize> = (1..bytes.len()).collect();
            assert_eq!(read_split(bytes, &every_byte), whole);
        }
    }

    #[test]
    fn crlf_comments_multiline_data_and_keepalives() {
        let stream = b": keep-alive\r\n\r\nevent: message\r\nid: 7\r\ndata: {\"model\":\"m\",\r\ndata: \"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2,\"total_tokens\":3}}\r\n\r\n:\r\n\r\ndata:[DONE]\r\n\r\n";
        for cut in 0..=stream.len() {
            let (report, events, done) = read_split(stream, &[cut]);
            assert_eq!(report, super::tests::report("m", 1, 2, 3), "cut at {cut}");
            assert_eq!((events, done), (1, true));
        }
    }

    #[test]
    fn empty_chunk_between_cr_and_lf_changes_nothing() {
        // An empty chunk must not forget a pending `\r`, or the `\n` after it would end the
        // event early.
        let stream = b"data: {\"model\":\r\ndata: \"two-lines\"}\r\n\r\n";
        let mut reader = SseReader::new();
        reader.feed(&stream[..16]);
        reader.feed(b"");
        reader.feed(&stream[16..]);
        assert_eq!(reader.finish().model.as_deref(), Some("two-lines"));
        assert_eq!(reader.events(), 1);
    }

    #[test]
    fn truncated_stream_keeps_what_it_saw() {
        let bytes = OPENAI_SSE.as_bytes();
        let cut = OPENAI_SSE.rfind("\"usage\"").unwrap();
        let (report, _, done) = read_split(&bytes[..cut], &[]);
        assert_eq!(report.model.as_deref(), Some("gpt-4o-mini-2024-07-18"));
        assert!(!report.has_usage());
        assert!(!done);
    }

    fn headers(pairs: &[(&str, &str)]) -> Vec<(String, Vec<u8>)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
            .collect()
    }

    #[test]
    fn observer_follows_content_type_and_encoding() {
        let mut json = ResponseObserver::for_response(&headers(&[(
            "content-type",
            "application/json; charset=utf-8",
        )]));
        for piece in MOONSHOT_JSON.as_bytes().chunks(7) {
            json.feed(piece);
        }
        assert_eq!(json.finish(), Some(report("moonshot-v1-8k", 78, 78, 156)));

        let mut sse =
            ResponseObserver::for_response(&headers(&[("content-type", "Text/Event-Stream")]));
        for piece in DASHSCOPE_SSE.as_bytes().chunks(5) {
            sse.feed(piece);
        }
        assert_eq!(sse.finish(), Some(report("qwen-turbo", 22, 9, 31)));

        for unreadable in [
            headers(&[
                ("content-type", "application/json"),
                ("content-encoding", "gzip"),
            ]),
            headers(&[("content-type", "text/html")]),
        ] {
            let mut observer = ResponseObserver::for_response(&unreadable);
            observer.feed(MOONSHOT_JSON.as_bytes());
            assert_eq!(observer.finish(), None);
        }

        let mut huge = ResponseObserver::for_response(&headers(&[]));
        huge.feed(&vec![b' '; MAX_JSON_BYTES]);
        huge.feed(MOONSHOT_JSON.as_bytes());
        assert_eq!(
            huge.finish(),
            None,
            "a body past the copy limit is usage unknown"
        );
    }

    #[test]
    fn oversized_event_is_skipped_not_buffered() {
        let mut reader = SseReader::new();
        reader.feed(b"data: {\"model\":\"big\",\"x\":\"");
        let filler = vec![b'a'; 64 * 1024];
        for _ in 0..(MAX_EVENT_BYTES / filler.len() + 2) {
            reader.feed(&filler);
        }
        assert!(reader.line.len() + reader.data.len() <= MAX_EVENT_BYTES);
        reader.feed(b"\"}\n\ndata: {\"model\":\"small\",\"usage\":{\"prompt_tokens\":4}}\n\n");
        let report = reader.finish();
        assert_eq!(report.model.as_deref(), Some("small"));
        assert_eq!(report.prompt_tokens, Some(4));
    }
}
