//! The filter as an Envoy dynamic module (`envoy.filters.http.dynamic_modules`), built with
//! `cargo build --release --lib --features native` into `libllm_filter.so`. `abi` holds the
//! hand-written binding (and all of its `unsafe`); this file is the host glue on safe calls.

mod abi;

use std::sync::Arc;

use crate::policy::Policy;
use abi::{BodyStatus, Filter, HeadersStatus, LogLevel, Module, TrailersStatus};

/// The module type the exported hooks drive.
pub struct LlmModule;

/// The answer to a request whose hook panicked: Envoy keeps serving, the client gets a 500 in
/// OpenAI's error shape.
const INTERNAL_ERROR_BODY: &str = r#"{"error":{"message":"The gateway failed while handling this request.","type":"server_error","code":"internal_error"}}"#;

/// The compiled configuration, shared by every worker thread.
pub struct NativeConfig {
    routes: Arc<()>,
}

/// One request.
pub struct NativeStream {
    _routes: Arc<()>,
}

fn log(level: LogLevel, message: &str) {
    if abi::log_enabled(level) {
        abi::log(level, message);
    }
}

impl Module for LlmModule {
    type Config = NativeConfig;
    type Stream = NativeStream;

    fn config_new(_: &abi::Config<'_>, _name: &[u8], text: &[u8]) -> Option<NativeConfig> {
        let Ok(text) = std::str::from_utf8(text) else {
            log(
                LogLevel::Error,
                "llm-filter: invalid configuration: not UTF-8 text",
            );
            return None;
        };
        match Policy::from_text(text) {
            Ok(_policy) => {
                log(
                    LogLevel::Info,
                    "llm-filter: configuration accepted (dynamic module)",
                );
                Some(NativeConfig {
                    routes: Arc::new(()),
                })
            }
            Err(errors) => {
                for e in &errors.0 {
                    log(
                        LogLevel::Error,
                        &format!("llm-filter: invalid configuration: {e}"),
                    );
                }
                None
            }
        }
    }

    fn stream_new(config: &NativeConfig) -> NativeStream {
        NativeStream {
            _routes: Arc::clone(&config.routes),
        }
    }

    fn request_headers(_: &mut NativeStream, f: &mut Filter<'_>, _end: bool) -> HeadersStatus {
        test_panic(f);
        HeadersStatus::Continue
    }

    fn request_body(_: &mut NativeStream, _: &mut Filter<'_>, _end: bool) -> BodyStatus {
        BodyStatus::Continue
    }

    fn request_trailers(_: &mut NativeStream, _: &mut Filter<'_>) -> TrailersStatus {
        TrailersStatus::Continue
    }

    fn response_headers(_: &mut NativeStream, _: &mut Filter<'_>, _end: bool) -> HeadersStatus {
        HeadersStatus::Continue
    }

    fn response_body(_: &mut NativeStream, _: &mut Filter<'_>, _end: bool) -> BodyStatus {
        BodyStatus::Continue
    }

    fn stream_complete(_: &mut NativeStream, _: &mut Filter<'_>) {}

    fn panicked(f: &mut Filter<'_>, hook: &str) {
        log(
            LogLevel::Critical,
            &format!("llm-filter: panic in the {hook} hook: the request gets a 500"),
        );
        f.send_response(
            500,
            &[("content-type", "application/json")],
            INTERNAL_ERROR_BODY.as_bytes(),
            "llm_filter_panic",
        );
    }
}

/// The request header that makes the filter panic, in builds with the `native-test-panic`
/// feature only (tests/native.rs checks that a panic answers 500 and Envoy keeps serving).
#[cfg(feature = "native-test-panic")]
const TEST_PANIC_HEADER: &str = "x-llm-filter-test-panic";

#[cfg(feature = "native-test-panic")]
#[allow(clippy::panic)]
fn test_panic(f: &Filter<'_>) {
    if f.header(abi::HeaderMap::Request, TEST_PANIC_HEADER)
        .is_some()
    {
        panic!("{TEST_PANIC_HEADER} asked for a panic");
    }
}

#[cfg(not(feature = "native-test-panic"))]
fn test_panic(_: &Filter<'_>) {}
