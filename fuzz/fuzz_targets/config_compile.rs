//! The plugin configuration as Envoy hands it over (any UTF-8 text): parsing and compiling
//! must refuse or accept, never panic, and a policy that compiles must route any host.
#![no_main]

use libfuzzer_sys::fuzz_target;
use llm_filter::balancer::SplitMix64;
use llm_filter::policy::Policy;

fuzz_target!(|text: &str| {
    let Ok(policy) = Policy::from_text(text) else {
        return;
    };
    let mut rng = SplitMix64::new(text.len() as u64);
    for authority in [
        &b"dashscope.aliyuncs.com"[..],
        b"demo-llm-server",
        b"Test.COM.:8080",
        b"[::1]:80",
        b"",
    ] {
        let headers = vec![
            (":authority".to_string(), authority.to_vec()),
            ("user-type".to_string(), b"subscriber".to_vec()),
        ];
        let _ = policy.is_llm_host(authority);
        let _ = policy.decide(&headers, &mut rng);
    }
});
