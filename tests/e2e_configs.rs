#![cfg(not(target_arch = "wasm32"))]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Every shipped Envoy config (`envoy/*.yaml`) passes `envoy --mode validate` with the real
//! filter, and is consistent with its own LLMProvider manifests: a virtual host and a TLS
//! cluster (SNI and SAN = provider host) per provider, LLM-sized buffer limits.

mod support;

use serde_yaml::Value;
use std::path::PathBuf;
use std::process::Command;
use support::*;

fn shipped_configs() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(repo().join("envoy"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    v.sort();
    assert!(
        v.iter().any(|p| p.ends_with("mesh.yaml")) && v.iter().any(|p| p.ends_with("gateway.yaml")),
        "envoy/mesh.yaml and envoy/gateway.yaml must ship: {v:?}"
    );
    v
}

#[test]
fn every_shipped_config_passes_envoy_validate() {
    let wasm = wasm();
    let relative = repo().join("target/wasm32-wasip1/release/llm_filter.wasm");
    for path in shipped_configs() {
        // As shipped (relative wasm path, run from the repo root) when the wasm is where the
        // shipped file says; otherwise only the wasm path is patched.
        let config = if wasm == relative.as_path() {
            path.clone()
        } else {
            let mut doc = patch::load(&path).unwrap();
            patch::set_wasm_file(&mut doc, wasm).unwrap();
            let dir = support::envoy::temp_dir("validate");
            let out = dir.join(path.file_name().unwrap());
            std::fs::write(&out, patch::render(&doc).unwrap()).unwrap();
            out
        };
        let out = Command::new(support::envoy::envoy_binary())
            .args(["--mode", "validate", "--log-level", "warn", "-c"])
            .arg(&config)
            .current_dir(repo())
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && text.contains(" OK") && !text.contains("critical"),
            "{} does not validate:\n{text}",
            path.display()
        );
    }
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    let mut cur = v;
    for k in path {
        cur = cur.get(*k)?;
    }
    cur.as_str()
}

#[test]
fn every_provider_has_a_virtual_host_and_a_verified_tls_cluster() {
    for path in shipped_configs() {
        let name = path.display().to_string();
        let mut doc = patch::load(&path).unwrap();
        let manifests = patch::wasm_configuration(&mut doc).unwrap();
        let hosts: Vec<String> = serde_yaml::Deserializer::from_str(&manifests)
            .map(|d| Value::deserialize(d).unwrap())
            .filter(|m| str_at(m, &["kind"]) == Some("LLMProvider"))
            .map(|m| str_at(&m, &["spec", "host"]).unwrap().to_string())
            .collect();
        assert!(!hosts.is_empty(), "{name}: no LLMProvider");

        let sr = &doc["static_resources"];
        let listener = &sr["listeners"][0];
        assert_eq!(
            listener["per_connection_buffer_limit_bytes"].as_u64(),
            Some(16_777_216),
            "{name}: listener buffer limit"
        );
        let hcm = &listener["filter_chains"][0]["filters"][0]["typed_config"];
        let vhosts = hcm["route_config"]["virtual_hosts"].as_sequence().unwrap();
        let filters: Vec<&str> = hcm["http_filters"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|f| f["name"].as_str().unwrap())
            .collect();
        assert_eq!(filters.last(), Some(&"envoy.filters.http.router"), "{name}");
        assert!(filters.contains(&patch::WASM_FILTER), "{name}: {filters:?}");
        assert!(
            vhosts
                .iter()
                .any(|v| v["domains"].as_sequence().unwrap().iter().any(|d| d == "*")),
            "{name}: no catch-all virtual host"
        );
        for host in &hosts {
            let vh = vhosts
                .iter()
                .find(|v| {
                    v["domains"]
                        .as_sequence()
                        .unwrap()
                        .iter()
                        .any(|d| d.as_str() == Some(host))
                })
                .unwrap_or_else(|| panic!("{name}: no virtual host for provider {host}"));
            // Only requests the filter rewrote pass: a route for the provider requires its
            // mark, and the last route answers everything else.
            let routes = vh["routes"].as_sequence().unwrap();
            for route in &routes[..routes.len() - 1] {
                assert_eq!(
                    route["match"]["filter_state"][0]["key"], "wasm.llm.provider",
                    "{name}: a route to {host} without the filter's mark"
                );
            }
            assert_eq!(
                routes[routes.len() - 1]["direct_response"]["status"],
                404,
                "{name}: {host}'s unmarked requests"
            );
            let route = &routes[routes.len() - 2]["route"];
            assert_eq!(
                route["timeout"].as_str(),
                Some("300s"),
                "{name}: {host} timeout"
            );
            let cluster_name = route["cluster"].as_str().unwrap();
            let cluster = sr["clusters"]
                .as_sequence()
                .unwrap()
                .iter()
                .find(|c| c["name"].as_str() == Some(cluster_name))
                .unwrap_or_else(|| panic!("{name}: no cluster {cluster_name}"));
            let tls = &cluster["transport_socket"]["typed_config"];
            assert_eq!(
                tls["sni"].as_str(),
                Some(host.as_str()),
                "{name}: {cluster_name} SNI"
            );
            let vc = &tls["common_tls_context"]["validation_context"];
            assert!(
                vc["trusted_ca"]["filename"].as_str().is_some(),
                "{name}: {cluster_name} CA"
            );
            assert_eq!(
                vc["match_typed_subject_alt_names"][0]["matcher"]["exact"].as_str(),
                Some(host.as_str()),
                "{name}: {cluster_name} SAN check"
            );
            let ep = &cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
                ["address"]["socket_address"];
            assert_eq!(
                ep["address"].as_str(),
                Some(host.as_str()),
                "{name}: {cluster_name}"
            );
            assert_eq!(
                ep["port_value"].as_u64(),
                Some(443),
                "{name}: {cluster_name}"
            );
            assert_eq!(
                cluster["per_connection_buffer_limit_bytes"].as_u64(),
                Some(16_777_216),
                "{name}: {cluster_name} buffer limit"
            );
        }
    }
}

use serde::Deserialize;
