//! llm-filter: a proxy-wasm HTTP filter that makes stock Envoy and Istio understand the
//! `LLMProvider` and `LLMRoute` resources: it picks a rule and a provider for a bare
//! OpenAI-style chat request and rewrites it into that provider's call.
//!
//! Everything but `filter` is plain Rust, tested natively and inside wasm: `stream` is the
//! request core, driven through the `host::Host` trait by `filter` (proxy-wasm) or by the native
//! dynamic module.

pub mod balancer;
pub mod config;
pub mod error;
pub mod hold;
pub mod host;
pub mod limits;
pub mod matcher;
pub mod metadata;
pub mod metrics;
pub mod models;
pub mod policy;
pub mod rewrite;
pub mod scan;
pub mod stream;
pub mod usage;

#[cfg(all(target_arch = "wasm32", target_os = "wasi"))]
mod filter;

#[cfg(all(feature = "native", not(target_arch = "wasm32")))]
pub mod native;
