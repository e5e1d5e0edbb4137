//! The two kinds of failure the filter reports: a configuration it refuses (naming the resource
//! and the field), and a request it answers itself (an OpenAI-shaped error body).

use std::fmt;

/// A refused configuration: `LLMRoute default/demo: rules[0].backendRefs[1].providerHost: ...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// `Kind namespace/name`, or where in the configuration the problem is.
    pub resource: String,
    /// Field path inside the resource, e.g. `spec.rules[0].backendRefs[1].weight`; may be empty.
    pub field: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(
        resource: impl Into<String>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> ConfigError {
        ConfigError {
            resource: resource.into(),
            field: field.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}: {}", self.resource, self.message)
        } else {
            write!(f, "{}: {}: {}", self.resource, self.field, self.message)
        }
    }
}

impl std::error::Error for ConfigError {}

/// Every problem found in one configuration, in the order of the resources.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl From<ConfigError> for ConfigErrors {
    fn from(error: ConfigError) -> Self {
        ConfigErrors(vec![error])
    }
}

/// One line per error.
impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Why the filter answers a request itself instead of forwarding it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestError {
    EmptyBody,
    InvalidJson,
    NotAnObject,
    MissingMessages,
    InvalidMessages,
    InvalidModel,
    InvalidStream,
    DuplicateKey,
    BodyTooLarge,
    RouteNotFound,
    /// The `:authority` names an LLM host, but not as `host` or `host:port` (a trailing dot,
    /// user info, a port that is not a number up to 65535, several hosts): the authorization in
    /// front of the filter may not recognise it, so it is not served.
    InvalidHost,
    /// Not `POST` (a chat request) or `GET`/`HEAD` of the model list.
    MethodNotAllowed,
    /// A provider's own host on a proxy that serves providers only through `LLMRoute` hosts
    /// (`settings.directProviderCalls: false`, an ingress gateway).
    ProviderHostNotServed,
    /// The filter held the headers for the body, and the client sent none within
    /// `settings.holdTimeoutMs`.
    BodyTimeout,
    /// A fallback attempt whose endpoint does not say which provider it is (or names one that
    /// is not the rule's): refused rather than sent with another provider's key.
    AttemptProviderUnknown,
    /// A route matches on the body's `model`, but this Envoy lets the headers go before the
    /// body is read (no `settings.forwardAfterBody` / `allow_on_headers_stop_iteration`).
    ModelRoutingUnavailable,
    /// The filter held the headers for the body and Envoy never delivered it (the wasm filter
    /// lacks `allow_on_headers_stop_iteration`).
    BodyNotDelivered,
}

impl RequestError {
    pub fn status(self) -> u32 {
        match self {
            RequestError::BodyTooLarge => 413,
            RequestError::RouteNotFound | RequestError::ProviderHostNotServed => 404,
            RequestError::MethodNotAllowed => 405,
            RequestError::BodyTimeout => 408,
            RequestError::ModelRoutingUnavailable | RequestError::BodyNotDelivered => 500,
            RequestError::AttemptProviderUnknown => 503,
            _ => 400,
        }
    }

    pub fn code(self) -> &'static str {
        match self {
            RequestError::EmptyBody => "empty_body",
            RequestError::InvalidJson => "invalid_json",
            RequestError::NotAnObject => "invalid_body",
            RequestError::MissingMessages => "missing_messages",
            RequestError::InvalidMessages => "invalid_messages",
            RequestError::InvalidModel => "invalid_model",
            RequestError::InvalidStream => "invalid_stream",
            RequestError::DuplicateKey => "duplicate_key",
            RequestError::BodyTooLarge => "body_too_large",
            RequestError::RouteNotFound | RequestError::ProviderHostNotServed => "route_not_found",
            RequestError::InvalidHost => "invalid_host",
            RequestError::MethodNotAllowed => "method_not_allowed",
            RequestError::BodyTimeout => "request_timeout",
            RequestError::AttemptProviderUnknown => "provider_unknown",
            RequestError::ModelRoutingUnavailable => "model_routing_unavailable",
            RequestError::BodyNotDelivered => "body_not_delivered",
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            RequestError::EmptyBody => {
                "The request body is empty; expected a chat completion request in JSON."
            }
            RequestError::InvalidJson => "The request body is not valid JSON (or not valid UTF-8).",
            RequestError::NotAnObject => "The request body must be a JSON object.",
            RequestError::MissingMessages => "Missing required parameter: 'messages'.",
            RequestError::InvalidMessages => "'messages' must be an array.",
            RequestError::InvalidModel => "'model' must be a string.",
            RequestError::InvalidStream => "'stream' must be a boolean.",
            RequestError::DuplicateKey => {
                "The request body has the same top-level key more than once."
            }
            RequestError::BodyTooLarge => "The request body is larger than this gateway accepts.",
            RequestError::RouteNotFound => "No LLMRoute rule matches this request for this host.",
            RequestError::InvalidHost => {
                "The Host header names an LLM host in a form this gateway does not serve; send \
                 host or host:port."
            }
            RequestError::MethodNotAllowed => {
                "Use POST for chat completions, or GET for the model list (/v1/models)."
            }
            RequestError::ProviderHostNotServed => {
                "This gateway serves LLM providers only through its LLMRoute hosts."
            }
            RequestError::BodyTimeout => "The request body did not arrive in time.",
            RequestError::AttemptProviderUnknown => {
                "The gateway could not tell which provider a fallback attempt goes to, so it \
                 did not send it."
            }
            RequestError::ModelRoutingUnavailable => {
                "This route matches on the request's model, which needs the body before routing: \
                 the filter needs settings.forwardAfterBody: true and, in its wasm build, the \
                 gateway's Envoy allow_on_headers_stop_iteration: true on the wasm filter \
                 (llm-filter render envoy sets both)."
            }
            RequestError::BodyNotDelivered => {
                "The gateway held the request headers for the body, but Envoy delivered none: \
                 the wasm filter needs allow_on_headers_stop_iteration: true with \
                 settings.forwardAfterBody (llm-filter render envoy sets both)."
            }
        }
    }

    /// OpenAI's error type: the client's mistake, or the gateway's.
    pub fn kind(self) -> &'static str {
        match self {
            RequestError::ModelRoutingUnavailable
            | RequestError::BodyNotDelivered
            | RequestError::AttemptProviderUnknown => "server_error",
            _ => "invalid_request_error",
        }
    }

    /// Headers of the local reply besides `content-type`: a 405 says what is allowed.
    pub fn extra_headers(self) -> &'static [(&'static str, &'static str)] {
        match self {
            RequestError::MethodNotAllowed => &[("allow", "POST, GET, HEAD")],
            _ => &[],
        }
    }

    /// `{"error":{"message":...,"type":"invalid_request_error","code":...}}`.
    pub fn body(self) -> String {
        // Messages and codes are fixed ASCII without quotes or backslashes, so no escaping is
        // needed; the unit test below checks the result parses.
        format!(
            r#"{{"error":{{"message":"{}","type":"{}","code":"{}"}}}}"#,
            self.message(),
            self.kind(),
            self.code()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    const ALL: [RequestError; 17] = [
        RequestError::EmptyBody,
        RequestError::InvalidJson,
        RequestError::NotAnObject,
        RequestError::MissingMessages,
        RequestError::InvalidMessages,
        RequestError::InvalidModel,
        RequestError::InvalidStream,
        RequestError::DuplicateKey,
        RequestError::BodyTooLarge,
        RequestError::RouteNotFound,
        RequestError::ModelRoutingUnavailable,
        RequestError::BodyNotDelivered,
        RequestError::InvalidHost,
        RequestError::MethodNotAllowed,
        RequestError::ProviderHostNotServed,
        RequestError::BodyTimeout,
        RequestError::AttemptProviderUnknown,
    ];

    #[test]
    fn error_bodies_are_openai_shaped_json() {
        for error in ALL {
            let body: serde_json::Value = serde_json::from_str(&error.body()).unwrap();
            assert_eq!(body["error"]["type"], error.kind());
            assert_eq!(body["error"]["code"], error.code());
            assert_eq!(body["error"]["message"], error.message());
        }
    }

    #[test]
    fn statuses() {
        assert_eq!(RequestError::BodyTooLarge.status(), 413);
        assert_eq!(RequestError::RouteNotFound.status(), 404);
        assert_eq!(RequestError::InvalidJson.status(), 400);
        assert_eq!(RequestError::ModelRoutingUnavailable.status(), 500);
        assert_eq!(RequestError::ModelRoutingUnavailable.kind(), "server_error");
        assert_eq!(RequestError::InvalidHost.status(), 400);
        assert_eq!(RequestError::MethodNotAllowed.status(), 405);
        assert_eq!(
            RequestError::MethodNotAllowed.extra_headers(),
            &[("allow", "POST, GET, HEAD")]
        );
        assert_eq!(RequestError::BodyTimeout.status(), 408);
        assert_eq!(RequestError::BodyTimeout.kind(), "invalid_request_error");
        assert_eq!(RequestError::AttemptProviderUnknown.status(), 503);
        assert_eq!(RequestError::AttemptProviderUnknown.kind(), "server_error");
    }

    #[test]
    fn config_error_names_resource_and_field() {
        let e = ConfigError::new("LLMRoute default/x", "spec.host", "must not be empty");
        assert_eq!(
            e.to_string(),
            "LLMRoute default/x: spec.host: must not be empty"
        );
        let e = ConfigError::new("settings", "", "given more than once");
        assert_eq!(e.to_string(), "settings: given more than once");
    }
}
