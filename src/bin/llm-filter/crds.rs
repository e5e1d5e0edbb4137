//! `crds`: CustomResourceDefinitions for LLMProvider and LLMRoute.

/// The CRDs as a multi-document YAML stream. Not written yet.
pub fn render() -> String {
    String::new()
}
