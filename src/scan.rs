//! A validating JSON scanner for request bodies: checks the whole document against RFC 8259 and
//! returns the byte spans of the top-level object's keys and values, without building a tree or
//! copying a byte. It replaces a serde_json walk on the hot path because the body is mostly
//! message text: strings are skipped eight bytes at a time, and UTF-8 is checked once for the
//! whole body by `std::str::from_utf8`, which has its own word-at-a-time ASCII path.
//!
//! It accepts what serde_json accepts when it skips a value: any nesting depth (iterative, no
//! recursion) and numbers of any size. Like serde_json's parser, it refuses a `\u` escape that
//! is not four hex digits and a lone surrogate (a `\uD800`–`\uDBFF` escape not followed by a
//! `\uDC00`–`\uDFFF` one, or the latter alone): such a string is no Unicode text.

/// Why a body is not a JSON object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScanError {
    /// Valid JSON, but not an object.
    NotAnObject,
    /// Not valid JSON (or not UTF-8).
    Invalid,
}

/// One top-level member: the key's bytes between its quotes (still escaped) and the value's span.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Member {
    pub key: (usize, usize),
    /// Whether the key contains a `\` escape (so its bytes are not its text).
    pub key_escaped: bool,
    pub value: (usize, usize),
}

/// The top-level object of a body: where it opens and its members in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Object {
    /// Index of the opening `{`.
    pub open: usize,
    pub members: Vec<Member>,
}

/// Scans a whole body that must be a JSON object.
pub fn top_level_object(body: &[u8]) -> Result<Object, ScanError> {
    if std::str::from_utf8(body).is_err() {
        return Err(ScanError::Invalid);
    }
    let mut s = Scanner {
        b: body,
        i: 0,
        stack: Vec::new(),
    };
    s.ws();
    let open = s.i;
    if s.peek() != Some(b'{') {
        // Not an object: tell "valid JSON of another type" from "not JSON".
        s.value()?;
        s.ws();
        return Err(if s.i == body.len() {
            ScanError::NotAnObject
        } else {
            ScanError::Invalid
        });
    }
    s.i += 1;
    let mut members = Vec::new();
    s.ws();
    if s.peek() == Some(b'}') {
        s.i += 1;
    } else {
        loop {
            s.ws();
            let key_start = s.i + 1;
            let key_escaped = s.string()?;
            let key = (key_start, s.i - 1);
            s.ws();
            s.expect(b':')?;
            s.ws();
            let value_start = s.i;
            s.value()?;
            members.push(Member {
                key,
                key_escaped,
                value: (value_start, s.i),
            });
            s.ws();
            match s.next() {
                Some(b',') => continue,
                Some(b'}') => break,
                _ => return Err(ScanError::Invalid),
            }
        }
    }
    s.ws();
    if s.i != body.len() {
        return Err(ScanError::Invalid);
    }
    Ok(Object { open, members })
}

struct Scanner<'a> {
    b: &'a [u8],
    i: usize,
    /// Open containers of the value being skipped: `true` for an object, `false` for an array.
    stack: Vec<bool>,
}

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGHS: u64 = 0x8080_8080_8080_8080;

/// Marks (high bit set) the bytes of `w` that are `"`, `\\` or a control character (< 0x20). The
/// lowest mark is always a real one (the borrow tricks only misfire above a real hit), and no
/// mark at all means none of those bytes is there.
#[inline]
fn string_specials(w: u64) -> u64 {
    let quote = w ^ (ONES * u64::from(b'"'));
    let backslash = w ^ (ONES * u64::from(b'\\'));
    let zero = |x: u64| x.wrapping_sub(ONES) & !x;
    let control = w.wrapping_sub(ONES * 0x20) & !w;
    (zero(quote) | zero(backslash) | control) & HIGHS
}

impl Scanner<'_> {
    #[inline]
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    #[inline]
    fn next(&mut self) -> Option<u8> {
        let c = self.peek()?;
        self.i += 1;
        Some(c)
    }

    #[inline]
    fn expect(&mut self, c: u8) -> Result<(), ScanError> {
        if self.next() == Some(c) {
            Ok(())
        } else {
            Err(ScanError::Invalid)
        }
    }

    #[inline]
    fn ws(&mut self) {
        while let Some(b' ' | b'\n' | b'\r' | b'\t') = self.peek() {
            self.i += 1;
        }
    }

    /// Skips a string starting at its opening quote; returns whether it had an escape.
    fn string(&mut self) -> Result<bool, ScanError> {
        self.expect(b'"')?;
        let mut escaped = false;
        loop {
            while let Some(chunk) = self.b.get(self.i..self.i + 8) {
                let mut word = [0u8; 8];
                word.copy_from_slice(chunk);
                let marks = string_specials(u64::from_le_bytes(word));
                if marks != 0 {
                    // Little-endian: the lowest mark is the first special byte.
                    self.i += (marks.trailing_zeros() / 8) as usize;
                    break;
                }
                self.i += 8;
            }
            match self.next() {
                Some(b'"') => return Ok(escaped),
                Some(b'\\') => {
                    escaped = true;
                    match self.next() {
                        Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => {}
                        Some(b'u') => match self.hex4()? {
                            0xD800..=0xDBFF => {
                                let low = (self.next() == Some(b'\\') && self.next() == Some(b'u'))
                                    .then(|| self.hex4())
                                    .transpose()?;
                                if !matches!(low, Some(0xDC00..=0xDFFF)) {
                                    return Err(ScanError::Invalid);
                                }
                            }
                            0xDC00..=0xDFFF => return Err(ScanError::Invalid),
                            _ => {}
                        },
                        _ => return Err(ScanError::Invalid),
                    }
                }
                Some(0..=0x1f) | None => return Err(ScanError::Invalid),
                Some(_) => {}
            }
        }
    }

    /// The four hex digits of a `\u` escape, as a code unit.
    fn hex4(&mut self) -> Result<u32, ScanError> {
        let hex = self.b.get(self.i..self.i + 4).ok_or(ScanError::Invalid)?;
        let mut unit = 0;
        for &h in hex {
            let digit = char::from(h).to_digit(16).ok_or(ScanError::Invalid)?;
            unit = unit * 16 + digit;
        }
        self.i += 4;
        Ok(unit)
    }

    fn digits(&mut self) -> usize {
        let start = self.i;
        while let Some(b'0'..=b'9') = self.peek() {
            self.i += 1;
        }
        self.i - start
    }

    /// `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`
    fn number(&mut self) -> Result<(), ScanError> {
        if self.peek() == Some(b'-') {
            self.i += 1;
        }
        match self.peek() {
            Some(b'0') => self.i += 1,
            Some(b'1'..=b'9') => {
                self.digits();
            }
            _ => return Err(ScanError::Invalid),
        }
        if self.peek() == Some(b'.') {
            self.i += 1;
            if self.digits() == 0 {
                return Err(ScanError::Invalid);
            }
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.i += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.i += 1;
            }
            if self.digits() == 0 {
                return Err(ScanError::Invalid);
            }
        }
        Ok(())
    }

    fn literal(&mut self, word: &[u8]) -> Result<(), ScanError> {
        if self.b.get(self.i..self.i + word.len()) == Some(word) {
            self.i += word.len();
            Ok(())
        } else {
            Err(ScanError::Invalid)
        }
    }

    /// An object key and its colon, after `{` or `,`.
    fn key(&mut self) -> Result<(), ScanError> {
        self.ws();
        self.string()?;
        self.ws();
        self.expect(b':')
    }

    /// Skips one complete value of any depth, iteratively.
    fn value(&mut self) -> Result<(), ScanError> {
        self.stack.clear();
        loop {
            // One value starts here: a scalar, or a container that opens.
            self.ws();
            match self.peek() {
                Some(b'"') => {
                    self.string()?;
                }
                Some(b'-' | b'0'..=b'9') => self.number()?,
                Some(b't') => self.literal(b"true")?,
                Some(b'f') => self.literal(b"false")?,
                Some(b'n') => self.literal(b"null")?,
                Some(open @ (b'{' | b'[')) => {
                    self.i += 1;
                    self.ws();
                    let close = if open == b'{' { b'}' } else { b']' };
                    if self.peek() == Some(close) {
                        self.i += 1;
                    } else {
                        self.stack.push(open == b'{');
                        if open == b'{' {
                            self.key()?;
                        }
                        continue;
                    }
                }
                _ => return Err(ScanError::Invalid),
            }
            // The value is complete: close what it completes, up to a `,` or the end.
            loop {
                let Some(&in_object) = self.stack.last() else {
                    return Ok(());
                };
                self.ws();
                match (self.next(), in_object) {
                    (Some(b','), true) => {
                        self.key()?;
                        break;
                    }
                    (Some(b','), false) => break,
                    (Some(b'}'), true) | (Some(b']'), false) => {
                        self.stack.pop();
                    }
                    _ => return Err(ScanError::Invalid),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn text(body: &str, span: (usize, usize)) -> &str {
        &body[span.0..span.1]
    }

    #[test]
    fn spans_of_top_level_members() {
        let body =
            " { \"model\" : \"gpt-4o\",\n\"messages\":[{\"a\":[1,2,{}]}],\"t\\u0041\":-0.5e+3 } ";
        let object = top_level_object(body.as_bytes()).unwrap();
        assert_eq!(object.open, 1);
        let members: Vec<(&str, bool, &str)> = object
            .members
            .iter()
            .map(|m| (text(body, m.key), m.key_escaped, text(body, m.value)))
            .collect();
        assert_eq!(
            members,
            vec![
                ("model", false, "\"gpt-4o\""),
                ("messages", false, "[{\"a\":[1,2,{}]}]"),
                ("t\\u0041", true, "-0.5e+3"),
            ]
        );
        assert_eq!(top_level_object(b"{}").unwrap().members, vec![]);
    }

    #[test]
    fn kinds_of_refusal() {
        for body in ["[1]", "\"s\"", "3", " null ", "true"] {
            assert_eq!(
                top_level_object(body.as_bytes()),
                Err(ScanError::NotAnObject),
                "{body}"
            );
        }
        for body in [
            "",
            "{",
            "{\"a\"}",
            "{\"a\":}",
            "{\"a\":1,}",
            "{\"a\":1}x",
            "{a:1}",
            "[1,]",
            "01",
            "{\"a\":01}",
            "{\"a\":1.}",
            "{\"a\":1e}",
            "{\"a\":-}",
            "{\"a\":tru}",
            "{\"a\":[}",
            "{\"a\":{\"b\"}}",
            "{\"a\":{\"b\":1,}}",
            "{\"a\":[1 2]}",
            "{\"a\":\"\\x\"}",
            "{\"a\":\"\\u12g4\"}",
            "{\"a\":\"tab\there\"}",
            "{\"a\":\"open}",
            "{\"a\":[1]]}",
            "{\"a\":{}}}",
            "{\"a\":1 \"b\":2}",
            "[1}",
            "{\"a\":\"\\u12\"}",
        ] {
            assert_eq!(
                top_level_object(body.as_bytes()),
                Err(ScanError::Invalid),
                "{body}"
            );
        }
        assert_eq!(
            top_level_object(b"{\"a\":\"\xff\"}"),
            Err(ScanError::Invalid)
        );
    }

    #[test]
    fn lone_surrogates_are_refused_like_serde_json_strings() {
        for (text, valid) in [
            (r#""\ud800""#, false),
            (r#""\udfff""#, false),
            (r#""\ud800x""#, false),
            (r#""\ud800\n""#, false),
            (r#""\ud800\u0041""#, false),
            (r#""\ud800\ud800""#, false),
            (r#""\ud83d\ude00""#, true),
            (r#""\uD83D\uDE00 and \u00e9""#, true),
            (r#""\ud7ff\ue000""#, true),
        ] {
            let body = format!(r#"{{"messages":[],"content":{text}}}"#);
            assert_eq!(top_level_object(body.as_bytes()).is_ok(), valid, "{text}");
            assert_eq!(
                serde_json::from_str::<String>(text).is_ok(),
                valid,
                "{text}"
            );
            let key = format!(r#"{{{text}:1}}"#);
            assert_eq!(
                top_level_object(key.as_bytes()).is_ok(),
                valid,
                "key {text}"
            );
        }
    }

    #[test]
    fn long_strings_with_specials_at_every_offset() {
        // The eight-byte skip must stop at a quote, backslash or control byte wherever it falls.
        for pad in 0..20 {
            let filler = "x".repeat(pad);
            let ok = format!("{{\"a\":\"{filler}\\n{filler}é中{filler}\",\"b\":1}}");
            let object = top_level_object(ok.as_bytes()).unwrap();
            assert_eq!(object.members.len(), 2, "{ok}");
            let bad = format!("{{\"a\":\"{filler}\u{1}{filler}\"}}");
            assert_eq!(top_level_object(bad.as_bytes()), Err(ScanError::Invalid));
        }
    }

    #[test]
    fn agrees_with_serde_json_on_samples() {
        let samples = [
            r#"{"messages":[{"role":"user","content":"hi \"there\" \u00e9"}],"n":1e400}"#,
            r#"{"a":[[[[]]],{"b":{"c":[true,false,null]}}],"d":-0,"e":0.0e-0}"#,
            r#"{"a":1,"a":2}"#,
            "{\"a\":\"\u{7f}\"}",
        ];
        for body in samples {
            let ours = top_level_object(body.as_bytes()).is_ok();
            let theirs = serde_json::from_str::<serde::de::IgnoredAny>(body).is_ok();
            assert_eq!(ours, theirs, "{body}");
        }
    }

    #[test]
    fn any_depth_without_recursion() {
        let depth = 100_000;
        let body = format!(
            "{{\"x\":{}1{}}}",
            "[{\"k\":".repeat(depth),
            "}]".repeat(depth)
        );
        assert_eq!(top_level_object(body.as_bytes()).unwrap().members.len(), 1);
        let cut = format!("{{\"x\":{}}}", "[".repeat(depth));
        assert_eq!(top_level_object(cut.as_bytes()), Err(ScanError::Invalid));
    }
}
