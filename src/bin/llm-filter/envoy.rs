//! `render envoy`: a complete Envoy 1.40 bootstrap for the manifests.

use llm_filter::config::FilterConfig;

use crate::args::EnvoyOptions;

/// The bootstrap as YAML. Not written yet.
pub fn render(config: &FilterConfig, options: &EnvoyOptions) -> Result<String, String> {
    let _ = (config, options);
    Err("render envoy: not implemented yet".to_string())
}
