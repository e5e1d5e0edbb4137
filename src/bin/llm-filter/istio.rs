//! `render istio`: the Istio resources that deploy the filter for the manifests.

use llm_filter::config::FilterConfig;

use crate::args::IstioOptions;

/// The resources as a multi-document YAML stream. Not written yet.
pub fn render(config: &FilterConfig, options: &IstioOptions) -> Result<String, String> {
    let _ = (config, options);
    Err("render istio: not implemented yet".to_string())
}
