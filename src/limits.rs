//! Budgets (`rules[].limits`): what the filter and the rendered Envoy and rate limit service
//! configurations must agree on, and the compiled form the filter uses per request.
//!
//! The counting is Envoy's global rate limiting (`envoy.filters.http.ratelimit`) with the
//! reference rate limit service on Redis; the filter only says which budget a request spends
//! from. Envoy's route is the provider's, shared by every rule that reaches that provider, so
//! the filter marks the request instead: for each limit of the rule it chose, it sets the
//! filter state `wasm.llm.limit.<limit id>` to the value of the limit's key header (empty when
//! the limit has no key, or the request does not carry the header). The provider's route has,
//! per limit, a rate limit entry whose descriptor is
//!
//! ```text
//! (llm_limit, <namespace>/<route>/<rule>/<limit>), (<key header>, <value from the filter state>)
//! ```
//!
//! An entry whose filter state is absent produces no descriptor (Envoy drops it), so a
//! request is counted only against the limits of its own rule; an empty value leaves the key
//! out, and the request counts against the limit's shared budget. Token limits are checked at
//! request time (`hits_addend` 0) and debited when the stream is done by a second entry whose
//! `hits_addend` is the filter state `wasm.llm.debit`: the total tokens the provider reported,
//! 0 when it reported none.

use std::borrow::Cow;
use std::collections::BTreeSet;

use crate::config::{LimitConfig, LimitWindow, RuleConfig};
use crate::error::ConfigError;

/// The rate limit service's domain of every budget.
pub const DOMAIN: &str = "llm-filter";
/// The descriptor key whose value names the budget.
pub const LIMIT_DESCRIPTOR: &str = "llm_limit";
/// Filter state (`set_property` key) with the tokens to debit, as a decimal number.
pub const DEBIT_STATE: &str = "llm.debit";
/// Envoy's name of filter state the filter sets with `set_property(key)`: `wasm.<key>`.
pub const ENVOY_STATE_PREFIX: &str = "wasm.";
/// Largest count the service holds for a limit (its `requests_per_unit` is 32-bit).
pub const MAX_LIMIT: i64 = u32::MAX as i64;

/// `<namespace>/<route>/<rule>/<limit>`: the budget's name in the rate limit service.
pub fn limit_id(namespace: &str, route: &str, rule: &str, limit: &str) -> String {
    format!("{namespace}/{route}/{rule}/{limit}")
}

/// The filter state (`set_property` key) that marks a request for the limit `id`.
pub fn state_key(id: &str) -> String {
    format!("llm.limit.{id}")
}

/// What a limit counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counted {
    Tokens,
    Requests,
}

/// One limit, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitPolicy {
    /// `limit_id`.
    pub id: String,
    pub counted: Counted,
    pub amount: u32,
    pub per: LimitWindow,
    /// The key header, lower case.
    pub header: Option<String>,
}

impl LimitPolicy {
    /// The filter state that marks a request for this limit.
    pub fn state_key(&self) -> String {
        state_key(&self.id)
    }
}

/// The limits of one rule, as the filter applies them to each request the rule chooses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleLimits {
    /// `(filter state key, key header)` per limit.
    pub marks: Vec<(String, Option<String>)>,
    /// Some limit counts tokens: the answer's usage is debited.
    pub counts_tokens: bool,
}

impl RuleLimits {
    /// The filter state values that put a request with these `headers` into its budgets:
    /// `(key, value)` per limit, the value being the key header's (first) value, empty without
    /// one.
    pub fn marks<'a>(
        &'a self,
        headers: &'a [(String, Vec<u8>)],
    ) -> impl Iterator<Item = (&'a str, Cow<'a, [u8]>)> + 'a {
        self.marks.iter().map(move |(state, header)| {
            let value = header
                .as_deref()
                .and_then(|h| headers.iter().find(|(k, _)| k == h))
                .map(|(_, v)| key_value(v))
                .unwrap_or(Cow::Borrowed(&[]));
            (state.as_str(), value)
        })
    }
}

/// A key header's value as a descriptor value: the rate limit service speaks protobuf, whose
/// strings must be UTF-8, so other bytes are replaced (such values may then share a budget,
/// but never escape one: a value the service cannot parse would fail the check).
pub fn key_value(value: &[u8]) -> Cow<'_, [u8]> {
    match String::from_utf8_lossy(value) {
        Cow::Borrowed(_) => Cow::Borrowed(value),
        Cow::Owned(text) => Cow::Owned(text.into_bytes()),
    }
}

/// The tokens an answer debits: the reported total, else prompt plus completion, else 0.
pub fn debit(total: Option<u64>, prompt: Option<u64>, completion: Option<u64>) -> u64 {
    total
        .or_else(|| match (prompt, completion) {
            (None, None) => None,
            (p, c) => Some(p.unwrap_or(0).saturating_add(c.unwrap_or(0))),
        })
        .unwrap_or(0)
}

/// Headers that carry credentials: keying a budget by one would put them into the rate limit
/// service's keys and logs.
const CREDENTIAL_HEADERS: &[&str] = &["authorization", "proxy-authorization", "cookie"];

/// Validates `rule.limits` of rule `index` of route `namespace/route`; `field` gives the path
/// of a field of the rule. Empty when the rule has no limits.
pub fn compile(
    rule: &RuleConfig,
    namespace: &str,
    route: &str,
    resource: &str,
    field: &dyn Fn(&str) -> String,
) -> Result<Vec<LimitPolicy>, ConfigError> {
    if rule.limits.is_empty() {
        return Ok(Vec::new());
    }
    let rule_name = match rule.name.as_deref() {
        Some(name) if !name.is_empty() => name,
        _ => {
            return Err(ConfigError::new(
                resource,
                field("limits"),
                "the rule needs a name: its budgets are counted under <namespace>/<route>/<rule>/<limit>",
            ))
        }
    };
    let mut names = BTreeSet::new();
    let mut out = Vec::with_capacity(rule.limits.len());
    for (l, limit) in rule.limits.iter().enumerate() {
        let at = |leaf: &str| {
            if leaf.is_empty() {
                field(&format!("limits[{l}]"))
            } else {
                field(&format!("limits[{l}].{leaf}"))
            }
        };
        check_name(&limit.name).map_err(|m| ConfigError::new(resource, at("name"), m))?;
        if !names.insert(limit.name.as_str()) {
            return Err(ConfigError::new(
                resource,
                at("name"),
                format!("{:?} names another limit of this rule too", limit.name),
            ));
        }
        let (counted, amount, leaf) =
            counted(limit).map_err(|m| ConfigError::new(resource, at(""), m))?;
        let amount = match u32::try_from(amount) {
            Ok(amount) if amount > 0 => amount,
            _ => {
                return Err(ConfigError::new(
                    resource,
                    at(leaf),
                    format!("{amount} is not between 1 and {MAX_LIMIT}"),
                ))
            }
        };
        let header = limit
            .key
            .as_ref()
            .map(|key| check_header(&key.header))
            .transpose()
            .map_err(|m| ConfigError::new(resource, at("key.header"), m))?;
        out.push(LimitPolicy {
            id: limit_id(namespace, route, rule_name, &limit.name),
            counted,
            amount,
            per: limit.per,
            header,
        });
    }
    Ok(out)
}

/// The filter's view of a rule's limits.
pub fn rule_limits(limits: &[LimitPolicy]) -> Option<RuleLimits> {
    if limits.is_empty() {
        return None;
    }
    Some(RuleLimits {
        marks: limits
            .iter()
            .map(|l| (l.state_key(), l.header.clone()))
            .collect(),
        counts_tokens: limits.iter().any(|l| l.counted == Counted::Tokens),
    })
}

fn counted(limit: &LimitConfig) -> Result<(Counted, i64, &'static str), String> {
    match (limit.tokens, limit.requests) {
        (Some(tokens), None) => Ok((Counted::Tokens, tokens, "tokens")),
        (None, Some(requests)) => Ok((Counted::Requests, requests, "requests")),
        _ => Err("set exactly one of tokens and requests".to_string()),
    }
}

/// A limit name: a DNS label (lower-case letters, digits and `-`, at most 63), so budget names
/// stay unambiguous in the rate limit service's keys.
fn check_name(name: &str) -> Result<(), String> {
    let valid = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if valid {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a limit name (lower-case letters, digits and '-', at most 63)"
        ))
    }
}

/// A header name (an HTTP token), lower-cased; not one that carries credentials.
fn check_header(header: &str) -> Result<String, String> {
    const TCHAR: &[u8] = b"!#$%&'*+-.^_`|~";
    let valid = !header.is_empty()
        && header
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || TCHAR.contains(&b));
    if !valid {
        return Err(format!("{header:?} is not a header name"));
    }
    let header = header.to_ascii_lowercase();
    if CREDENTIAL_HEADERS.contains(&header.as_str()) {
        return Err(format!(
            "{header:?} carries credentials, which would end up in the rate limit service's keys: \
             key the budget by a header authentication sets, e.g. the JWT's subject \
             (jwt_authn claim_to_headers)"
        ));
    }
    Ok(header)
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn rule(limits: &str) -> RuleConfig {
        serde_yaml::from_str(&format!(
            "name: r\nbackendRefs: [{{providerHost: p.example}}]\nlimits: {limits}\n"
        ))
        .unwrap()
    }

    fn compiled(limits: &str) -> Result<Vec<LimitPolicy>, String> {
        compile(&rule(limits), "ns", "route", "LLMRoute ns/route", &|f| {
            format!("rules[0].{f}")
        })
        .map_err(|e| e.to_string())
    }

    #[test]
    fn limits_compile_to_named_budgets() {
        let limits = compiled(
            "[{name: per-user, tokens: 1000, per: minute, key: {header: X-User-Id}}, \
             {name: rpm, requests: 10, per: second}]",
        )
        .unwrap();
        assert_eq!(limits[0].id, "ns/route/r/per-user");
        assert_eq!(limits[0].counted, Counted::Tokens);
        assert_eq!(limits[0].amount, 1000);
        assert_eq!(limits[0].header.as_deref(), Some("x-user-id"));
        assert_eq!(limits[0].state_key(), "llm.limit.ns/route/r/per-user");
        assert_eq!(limits[1].counted, Counted::Requests);
        assert_eq!(limits[1].per, LimitWindow::Second);
        assert_eq!(limits[1].header, None);
        let rule = rule_limits(&limits).unwrap();
        assert!(rule.counts_tokens);
        assert!(rule_limits(&[]).is_none());
    }

    #[test]
    fn bad_limits_name_their_field() {
        for (limits, want) in [
            (
                "[{name: a, tokens: 1, requests: 1, per: minute}]",
                "rules[0].limits[0]: set exactly one of tokens and requests",
            ),
            (
                "[{name: a, per: minute}]",
                "rules[0].limits[0]: set exactly one of tokens and requests",
            ),
            (
                "[{name: a, tokens: 0, per: minute}]",
                "rules[0].limits[0].tokens: 0 is not between",
            ),
            (
                "[{name: a, requests: 4294967296, per: minute}]",
                "rules[0].limits[0].requests: 4294967296 is not between",
            ),
            (
                "[{name: A_b, tokens: 1, per: day}]",
                "rules[0].limits[0].name: \"A_b\" is not a limit name",
            ),
            (
                "[{name: a, tokens: 1, per: day}, {name: a, requests: 1, per: day}]",
                "rules[0].limits[1].name: \"a\" names another limit",
            ),
            (
                "[{name: a, tokens: 1, per: day, key: {header: 'x user'}}]",
                "rules[0].limits[0].key.header: \"x user\" is not a header name",
            ),
            (
                "[{name: a, tokens: 1, per: day, key: {header: Authorization}}]",
                "rules[0].limits[0].key.header: \"authorization\" carries credentials",
            ),
        ] {
            let error = compiled(limits).unwrap_err();
            assert!(
                error.starts_with(&format!("LLMRoute ns/route: {want}")),
                "{limits}: {error}"
            );
        }
        let mut unnamed = rule("[{name: a, tokens: 1, per: day}]");
        unnamed.name = None;
        let error = compile(&unnamed, "ns", "route", "R", &|f| format!("rules[2].{f}"))
            .unwrap_err()
            .to_string();
        assert!(
            error.starts_with("R: rules[2].limits: the rule needs a name"),
            "{error}"
        );
    }

    #[test]
    fn marks_carry_the_key_value_or_nothing() {
        let limits = compiled(
            "[{name: u, tokens: 5, per: hour, key: {header: x-user-id}}, {name: all, requests: 5, per: hour}]",
        )
        .unwrap();
        let rule = rule_limits(&limits).unwrap();
        let headers = vec![
            ("x-user-id".to_string(), b"alice".to_vec()),
            ("x-user-id".to_string(), b"mallory".to_vec()),
        ];
        let marks: Vec<(&str, Cow<[u8]>)> = rule.marks(&headers).collect();
        assert_eq!(
            marks[0],
            ("llm.limit.ns/route/r/u", Cow::Borrowed(&b"alice"[..]))
        );
        assert_eq!(
            marks[1],
            ("llm.limit.ns/route/r/all", Cow::Borrowed(&b""[..]))
        );
        let none: Vec<(&str, Cow<[u8]>)> = rule.marks(&[]).collect();
        assert!(none[0].1.is_empty());
        assert_eq!(key_value(b"caf\xc3\xa9").as_ref(), "café".as_bytes());
        assert_eq!(key_value(b"a\xffb").as_ref(), "a\u{fffd}b".as_bytes());
    }

    #[test]
    fn debits_are_always_a_number() {
        assert_eq!(debit(Some(33), Some(24), Some(9)), 33);
        assert_eq!(debit(None, Some(24), Some(9)), 33);
        assert_eq!(debit(None, None, Some(9)), 9);
        assert_eq!(debit(None, None, None), 0);
    }
}
