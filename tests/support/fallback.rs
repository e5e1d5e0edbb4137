//! What the fallback tests (through `render envoy` and through `render istio`) share: a
//! provider's failing answer, and the check that one attempt was rewritten for its provider.

use super::assert_bearer;
use super::mock::{FixedReply, Recorded};

/// For the mock's `fixed_for_sni`: the provider at `sni` answers `status` with an
/// OpenAI-shaped error.
pub fn fail(sni: &str, status: u16, message: &str) -> (String, FixedReply) {
    (
        sni.to_string(),
        FixedReply {
            status,
            content_type: "application/json".into(),
            body: format!(r#"{{"error": {{"message": "{message}"}}}}"#).into_bytes(),
        },
    )
}

/// One attempt as its provider must get it: its host as SNI and `:authority`, its path, model
/// and key, the client's messages, and never the internal marker.
pub fn assert_attempt(r: &Recorded, host: &str, path: &str, model: &str, key: &str) {
    assert_eq!(r.sni.as_deref(), Some(host), "{r:?}");
    assert_eq!(r.authority.as_deref(), Some(host), "{r:?}");
    assert_eq!(r.path, path, "{r:?}");
    assert_eq!(r.model().as_deref(), Some(model), "{r:?}");
    assert_bearer(r, key);
    assert!(r.header("x-llm-fallback").is_none(), "marker leaked: {r:?}");
    let json = r.json().unwrap_or_default();
    assert_eq!(json["messages"][0]["role"], "user", "{json}");
}
