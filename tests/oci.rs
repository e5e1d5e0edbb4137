//! `scripts/package-oci.sh`: the OCI image Istio pulls, checked with real OCI tools (skopeo and
//! umoci from Debian; `scripts/lib.sh ensure_oci_tools` installs them, and a missing tool
//! fails these tests): a valid image layout and archive, in the "compat" layout Istio's
//! fetcher reads (last layer `tar+gzip` holding `plugin.wasm`), whose layer holds exactly the
//! release `.wasm`, and the same digests on every run.
#![cfg(not(target_arch = "wasm32"))]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use serde_json::Value;

const TAG: &str = env!("CARGO_PKG_VERSION");

fn sha256_hex(bytes: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, bytes)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Runs a command; its stdout, or a panic with everything it said.
fn run(program: &str, args: &[&str]) -> String {
    let output = Command::new(program)
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {program} ({e}): install it with \
                 `bash -c 'source scripts/lib.sh && ensure_oci_tools'`"
            )
        });
    assert!(
        output.status.success(),
        "{program} {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

fn fresh_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("oci-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn path_str(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Runs the script once into `dir` (it builds the release filter first).
fn package(dir: &Path) {
    run("bash", &["scripts/package-oci.sh", path_str(dir)]);
}

/// One packaging run shared by the tests of this file.
fn packaged() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = fresh_dir("main");
        package(&dir);
        dir
    })
}

fn layout_ref(dir: &Path) -> String {
    format!("oci:{}:{TAG}", path_str(&dir.join("llm-filter")))
}

fn archive_ref(dir: &Path) -> String {
    format!(
        "oci-archive:{}:{TAG}",
        path_str(&dir.join(format!("llm-filter-{TAG}.oci.tar")))
    )
}

fn release_wasm() -> Vec<u8> {
    std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("target/wasm32-wasip1/release/llm_filter.wasm"),
    )
    .unwrap()
}

#[test]
fn skopeo_reads_the_layout_and_the_archive_as_one_single_layer_image() {
    let dir = packaged();
    for reference in [layout_ref(dir), archive_ref(dir)] {
        let raw = run("skopeo", &["inspect", "--raw", &reference]);
        let manifest: Value = serde_json::from_str(&raw).unwrap();
        assert_eq!(manifest["schemaVersion"], 2);
        assert_eq!(
            manifest["mediaType"],
            "application/vnd.oci.image.manifest.v1+json"
        );
        assert_eq!(
            manifest["config"]["mediaType"],
            "application/vnd.oci.image.config.v1+json"
        );
        let layers = manifest["layers"].as_array().unwrap();
        assert_eq!(layers.len(), 1);
        // What Istio's fetcher requires of the "compat" variant's (last) layer.
        assert_eq!(
            layers[0]["mediaType"],
            "application/vnd.oci.image.layer.v1.tar+gzip"
        );

        let inspect: Value =
            serde_json::from_str(&run("skopeo", &["inspect", &reference])).unwrap();
        // skopeo's digest of the manifest is the digest of the bytes it read.
        assert_eq!(
            inspect["Digest"],
            format!("sha256:{}", sha256_hex(raw.as_bytes()))
        );
        assert_eq!(inspect["Layers"][0], layers[0]["digest"]);
        assert_eq!(inspect["Os"], "wasip1");
        assert_eq!(inspect["Architecture"], "wasm");

        let config: Value = serde_json::from_str(&run(
            "skopeo",
            &["inspect", "--config", "--raw", &reference],
        ))
        .unwrap();
        assert_eq!(config["rootfs"]["type"], "layers");
    }
    // Both transports name the same image.
    let digest = |reference: &str| -> Value {
        serde_json::from_str::<Value>(&run("skopeo", &["inspect", reference])).unwrap()["Digest"]
            .clone()
    };
    assert_eq!(digest(&layout_ref(dir)), digest(&archive_ref(dir)));
}

#[test]
fn skopeo_copies_the_image_verifying_every_blob() {
    let dir = packaged();
    let copy = fresh_dir("copy");
    // `dir:` keeps the blobs as files named by digest; skopeo verifies each digest on the way.
    run(
        "skopeo",
        &[
            "copy",
            "--quiet",
            &layout_ref(dir),
            &format!("dir:{}", path_str(&copy.join("image"))),
        ],
    );
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(copy.join("image/manifest.json")).unwrap()).unwrap();
    let layer_digest = manifest["layers"][0]["digest"].as_str().unwrap();
    let layer = std::fs::read(
        copy.join("image")
            .join(layer_digest.trim_start_matches("sha256:")),
    )
    .unwrap();
    assert_eq!(format!("sha256:{}", sha256_hex(&layer)), layer_digest);
}

#[test]
fn umoci_unpacks_exactly_the_release_wasm_as_plugin_wasm() {
    let dir = packaged();
    let layout = dir.join("llm-filter");
    let tags = run("umoci", &["ls", "--layout", path_str(&layout)]);
    assert_eq!(tags.trim(), TAG);
    let stat = run(
        "umoci",
        &["stat", "--image", &format!("{}:{TAG}", path_str(&layout))],
    );
    assert!(stat.contains("LAYER"), "{stat}");

    // `raw unpack`: the root filesystem only (umoci generates no runtime config for wasip1).
    let rootfs = fresh_dir("rootfs").join("rootfs");
    run(
        "umoci",
        &[
            "raw",
            "unpack",
            "--rootless",
            "--image",
            &format!("{}:{TAG}", path_str(&layout)),
            path_str(&rootfs),
        ],
    );
    let files: Vec<String> = std::fs::read_dir(&rootfs)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(files, ["plugin.wasm"]);
    let unpacked = std::fs::read(rootfs.join("plugin.wasm")).unwrap();
    let wasm = release_wasm();
    assert!(wasm.starts_with(b"\0asm"));
    assert_eq!(sha256_hex(&unpacked), sha256_hex(&wasm));

    // The layer tar itself: one entry, plugin.wasm, owned by 0:0 with a fixed time.
    let manifest: Value =
        serde_json::from_str(&run("skopeo", &["inspect", "--raw", &layout_ref(dir)])).unwrap();
    let blob = layout.join("blobs/sha256").join(
        manifest["layers"][0]["digest"]
            .as_str()
            .unwrap()
            .trim_start_matches("sha256:"),
    );
    let listing = run("tar", &["-tvzf", path_str(&blob)]);
    let entries: Vec<&str> = listing.lines().collect();
    assert_eq!(entries.len(), 1, "{listing}");
    assert!(entries[0].starts_with("-rw-r--r-- 0/0"), "{listing}");
    assert!(
        entries[0].ends_with(" 1970-01-01 00:00 plugin.wasm"),
        "{listing}"
    );
}

#[test]
fn packaging_twice_gives_the_same_bytes() {
    let first = packaged();
    let second = fresh_dir("again");
    package(&second);
    let archive = format!("llm-filter-{TAG}.oci.tar");
    assert_eq!(
        std::fs::read(first.join(&archive)).unwrap(),
        std::fs::read(second.join(&archive)).unwrap()
    );
    assert_eq!(
        std::fs::read(first.join("llm-filter/index.json")).unwrap(),
        std::fs::read(second.join("llm-filter/index.json")).unwrap()
    );
}
