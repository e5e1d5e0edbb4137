//! llm-filter: LLMProvider / LLMRoute for stock Envoy and Istio (work in progress).
