//! Header string matches (Istio `StringMatch`: exact, prefix, regex), compiled once.

use regex_lite::Regex;

use crate::config::StringMatchConfig;

#[derive(Debug, Clone)]
pub enum StringMatch {
    Exact(Vec<u8>),
    Prefix(Vec<u8>),
    /// Anchored at both ends, as Istio's (RE2 full-match) regex.
    Regex(Regex),
}

impl StringMatch {
    /// Compiles a `StringMatch`; the error is the message for the offending field.
    pub fn compile(config: &StringMatchConfig) -> Result<StringMatch, (&'static str, String)> {
        match (&config.exact, &config.prefix, &config.regex) {
            (Some(exact), None, None) => Ok(StringMatch::Exact(exact.as_bytes().to_vec())),
            (None, Some(prefix), None) => Ok(StringMatch::Prefix(prefix.as_bytes().to_vec())),
            (None, None, Some(regex)) => Regex::new(&format!("^(?:{regex})$"))
                .map(StringMatch::Regex)
                .map_err(|e| ("regex", format!("invalid regex: {e}"))),
            (None, None, None) => Err(("", "needs one of exact, prefix or regex".to_string())),
            _ => Err(("", "takes only one of exact, prefix or regex".to_string())),
        }
    }

    pub fn matches(&self, value: &[u8]) -> bool {
        match self {
            StringMatch::Exact(exact) => value == exact.as_slice(),
            StringMatch::Prefix(prefix) => value.starts_with(prefix),
            StringMatch::Regex(regex) => match std::str::from_utf8(value) {
                Ok(text) => regex.is_match(text),
                Err(_) => false,
            },
        }
    }
}

/// All conditions of one `matches[]` entry (ANDed): headers (names lower-case) and the body's
/// `model`.
#[derive(Debug, Clone, Default)]
pub struct HeaderConditions {
    pub conditions: Vec<(String, StringMatch)>,
    pub model: Option<StringMatch>,
}

impl HeaderConditions {
    /// True when every condition holds. A header that is absent fails its condition; when a
    /// header appears several times, any of its values may satisfy it. `model` is the body's
    /// model; a request that names none fails a model condition.
    pub fn matches(&self, headers: &[(String, Vec<u8>)], model: Option<&[u8]>) -> bool {
        let model_ok = match (&self.model, model) {
            (None, _) => true,
            (Some(m), Some(model)) => m.matches(model),
            (Some(_), None) => false,
        };
        model_ok && self.matches_headers(headers)
    }

    /// True when every header condition holds (the model condition, if any, is not looked at).
    pub fn matches_headers(&self, headers: &[(String, Vec<u8>)]) -> bool {
        self.conditions.iter().all(|(name, m)| {
            headers
                .iter()
                .any(|(key, value)| key == name && m.matches(value))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn m(exact: Option<&str>, prefix: Option<&str>, regex: Option<&str>) -> StringMatchConfig {
        StringMatchConfig {
            exact: exact.map(str::to_string),
            prefix: prefix.map(str::to_string),
            regex: regex.map(str::to_string),
        }
    }

    #[test]
    fn exact_prefix_regex() {
        let exact = StringMatch::compile(&m(Some("subscriber"), None, None)).unwrap();
        assert!(exact.matches(b"subscriber"));
        assert!(!exact.matches(b"subscriber2"));
        assert!(!exact.matches(b"Subscriber"));

        let prefix = StringMatch::compile(&m(None, Some("sub"), None)).unwrap();
        assert!(prefix.matches(b"subscriber"));
        assert!(!prefix.matches(b"su"));

        let regex = StringMatch::compile(&m(None, None, Some("sub.*|vip"))).unwrap();
        assert!(regex.matches(b"subscriber"));
        assert!(regex.matches(b"vip"));
        assert!(!regex.matches(b"a-vip"), "regex is a full match");
        assert!(!regex.matches(&[0xff, 0xfe]), "invalid UTF-8 never matches");
    }

    #[test]
    fn refuses_bad_shapes() {
        assert!(StringMatch::compile(&m(None, None, None)).is_err());
        assert!(StringMatch::compile(&m(Some("a"), Some("b"), None)).is_err());
        let (field, message) = StringMatch::compile(&m(None, None, Some("(unclosed"))).unwrap_err();
        assert_eq!(field, "regex");
        assert!(message.starts_with("invalid regex"), "{message}");
    }
}
