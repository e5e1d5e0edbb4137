//! Metric names. proxy-wasm metrics carry no labels, so the tags travel in the name, in the
//! encoding Istio's own stats use (`provider=.=p;.;model=.=m;.;rule=.=r;.;llm.requests_total`),
//! and Envoy's `stats_config.stats_tags` (`TAG_REGEXES`; shipped by `llm-filter render envoy`,
//! and what Istio's `extraStatTags` generates) turn them back into labels: `/stats/prometheus`
//! shows `llm_requests_total{provider="p",model="m",rule="r",class="2xx"}`.

use std::borrow::Cow;

/// Counters and histograms the filter keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    /// Requests answered by a provider, by response class.
    Requests,
    PromptTokens,
    CompletionTokens,
    /// Answers whose usage could not be read (compressed, not JSON, truncated, no usage).
    UsageUnknown,
    /// Milliseconds from the request reaching the provider to the end of its answer.
    UpstreamLatency,
    /// Streams only: milliseconds from the request to the first event.
    TimeToFirstToken,
    /// Requests Envoy's rate limit filter refused (429) because a budget of the rule was spent.
    RateLimited,
}

impl Metric {
    /// Every metric, in the order of `Metric::index`.
    pub const ALL: [Metric; 7] = [
        Metric::Requests,
        Metric::PromptTokens,
        Metric::CompletionTokens,
        Metric::UsageUnknown,
        Metric::UpstreamLatency,
        Metric::TimeToFirstToken,
        Metric::RateLimited,
    ];

    /// Position in `Metric::ALL`.
    pub fn index(self) -> usize {
        self as usize
    }

    /// The labels of its series, in order: `provider`, `model`, `rule`, and `class` (the
    /// response class, `2xx`...) for `Requests` only.
    pub fn labels(self) -> &'static [&'static str] {
        match self {
            Metric::Requests => &["provider", "model", "rule", "class"],
            _ => &["provider", "model", "rule"],
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Metric::Requests => "llm.requests_total",
            Metric::PromptTokens => "llm.prompt_tokens_total",
            Metric::CompletionTokens => "llm.completion_tokens_total",
            Metric::UsageUnknown => "llm.usage_unknown_total",
            Metric::UpstreamLatency => "llm.upstream_latency_ms",
            Metric::TimeToFirstToken => "llm.time_to_first_token_ms",
            Metric::RateLimited => "llm.rate_limited_total",
        }
    }

    pub fn is_histogram(self) -> bool {
        matches!(self, Metric::UpstreamLatency | Metric::TimeToFirstToken)
    }
}

/// The labels of one (provider, model, rule) combination, shared by its series. `index` is
/// dense and unique among the sets of one `stream::Worker` (0, 1, 2...), so a host can keep
/// what it defined per set in a vector (the proxy-wasm host keeps the series' ids there).
/// Values are raw: `series` (the name form) cleans them; a host that passes them as labels
/// cleans them with `label_value`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Series {
    pub index: usize,
    pub provider: String,
    pub model: String,
    pub rule: String,
}

/// A label value as `series` writes it into a name: at most 64 characters, without `;`, `=` or
/// control characters. A value that already is one (the usual case) is borrowed, not copied:
/// the native host cleans three labels for every metric it records.
pub fn label_value(value: &str) -> Cow<'_, str> {
    // Printable ASCII other than `;` and `=` is kept as it is (a byte count bounds the chars).
    let clean = value.len() <= MAX_VALUE_CHARS
        && value
            .bytes()
            .all(|b| (b' '..=b'~').contains(&b) && b != b';' && b != b'=');
    if clean {
        Cow::Borrowed(value)
    } else {
        Cow::Owned(
            value
                .chars()
                .take(MAX_VALUE_CHARS)
                .map(clean_char)
                .collect(),
        )
    }
}

fn clean_char(c: char) -> char {
    match c {
        ';' | '=' => '_',
        c if c.is_control() => '_',
        c => c,
    }
}

/// `(tag name, regex)` pairs for Envoy's `stats_config.stats_tags`: the first group is removed
/// from the name, the second is the tag's value.
pub const TAG_REGEXES: [(&str, &str); 4] = [
    ("provider", r"(provider=\.=(.*?);\.;)"),
    ("model", r"(model=\.=(.*?);\.;)"),
    ("rule", r"(rule=\.=(.*?);\.;)"),
    ("class", r"(class=\.=(.*?);\.;)"),
];

/// The full name of one series: the tags, then the metric's name. Tag values lose the
/// characters that could end a tag or forge another (`;`, `=`) and control characters.
pub fn series(
    metric: Metric,
    provider: &str,
    model: &str,
    rule: &str,
    class: Option<&str>,
) -> String {
    let mut name = String::with_capacity(128);
    for (tag, value) in [("provider", provider), ("model", model), ("rule", rule)] {
        push_tag(&mut name, tag, value);
    }
    if let Some(class) = class {
        push_tag(&mut name, "class", class);
    }
    name.push_str(metric.name());
    name
}

/// Longest tag value kept (in characters); longer values are cut.
const MAX_VALUE_CHARS: usize = 64;

fn push_tag(name: &mut String, tag: &str, value: &str) {
    name.push_str(tag);
    name.push_str("=.=");
    name.extend(value.chars().take(MAX_VALUE_CHARS).map(clean_char));
    name.push_str(";.;");
}

/// `2xx`, `4xx`, `5xx`...; `unknown` for what is not a status code.
pub fn status_class(status: &[u8]) -> &'static str {
    match status.first() {
        Some(b'1') if status.len() == 3 => "1xx",
        Some(b'2') if status.len() == 3 => "2xx",
        Some(b'3') if status.len() == 3 => "3xx",
        Some(b'4') if status.len() == 3 => "4xx",
        Some(b'5') if status.len() == 3 => "5xx",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn names_carry_tags_the_regexes_take_back() {
        let name = series(
            Metric::Requests,
            "dashscope-qwen",
            "qwen1.5-72b-chat",
            "vip-route",
            Some("2xx"),
        );
        assert_eq!(
            name,
            "provider=.=dashscope-qwen;.;model=.=qwen1.5-72b-chat;.;rule=.=vip-route;.;\
             class=.=2xx;.;llm.requests_total"
        );
        let mut rest = name.clone();
        for (tag, regex) in TAG_REGEXES {
            let re = regex_lite::Regex::new(regex).unwrap();
            let caps = re.captures(&rest).unwrap();
            let value = caps.get(2).unwrap().as_str().to_string();
            let expected = match tag {
                "provider" => "dashscope-qwen",
                "model" => "qwen1.5-72b-chat",
                "rule" => "vip-route",
                _ => "2xx",
            };
            assert_eq!(value, expected);
            rest = rest.replace(caps.get(1).unwrap().as_str(), "");
        }
        assert_eq!(rest, "llm.requests_total");
    }

    #[test]
    fn hostile_values_cannot_forge_tags() {
        let name = series(Metric::PromptTokens, "p", "m;.;rule=.=x", "", None);
        assert_eq!(
            name,
            "provider=.=p;.;model=.=m_._rule_._x;.;rule=.=;.;llm.prompt_tokens_total"
        );
        let name = series(Metric::PromptTokens, "p", "a\nb", "r", None);
        assert!(!name.contains('\n'));
        let long = "x".repeat(1000);
        let name = series(Metric::PromptTokens, "p", &long, "r", None);
        assert!(name.len() < 200, "{name}");
    }

    #[test]
    fn every_metric_is_listed_at_its_index() {
        for (i, metric) in Metric::ALL.iter().enumerate() {
            assert_eq!(metric.index(), i);
        }
        assert_eq!(label_value("a;b=c\n"), "a_b_c_");
        assert_eq!(label_value("gpt-4o-mini"), "gpt-4o-mini");
        assert!(matches!(label_value("gpt-4o-mini"), Cow::Borrowed(_)));
        assert_eq!(label_value("modèle\u{85}"), "modèle_");
        let long = "é".repeat(MAX_VALUE_CHARS + 1);
        assert_eq!(label_value(&long), "é".repeat(MAX_VALUE_CHARS));
    }

    #[test]
    fn classes() {
        assert_eq!(status_class(b"200"), "2xx");
        assert_eq!(status_class(b"429"), "4xx");
        assert_eq!(status_class(b"503"), "5xx");
        assert_eq!(status_class(b""), "unknown");
        assert_eq!(status_class(b"2000"), "unknown");
    }
}
