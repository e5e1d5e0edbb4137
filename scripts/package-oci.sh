#!/usr/bin/env bash
# scripts/package-oci.sh [OUT_DIR]: the release filter as an OCI image that Istio's WasmPlugin
# pulls (`url: oci://REGISTRY/REPOSITORY:TAG`), built without a container engine.
#
# Format: the "compat" variant of the Wasm image specification Istio's image fetcher reads
# (https://github.com/solo-io/wasm/blob/master/spec/spec-compat.md): an ordinary OCI image
# whose single layer (application/vnd.oci.image.layer.v1.tar+gzip) holds one file,
# `plugin.wasm`. Istio takes the last layer of such an image and reads `plugin.wasm` from it;
# registries, skopeo and umoci treat it like any other image. (The other variant, with wasm
# artifact media types, is one that generic image tools do not unpack.)
#
# Writes, in OUT_DIR (default target/oci):
#   llm-filter/                 an OCI image layout (oci-layout, index.json, blobs/sha256/),
#                               tagged with the crate version (or $TAG)
#   llm-filter-TAG.oci.tar      the same layout as one tarball (skopeo's oci-archive: transport)
# Reproducible: the same .wasm gives the same digests (file times $SOURCE_DATE_EPOCH, default
# 0; owner 0:0; `gzip -n`; JSON written byte for byte here).
#
# Push it anywhere with skopeo, e.g.:
#   skopeo copy oci:target/oci/llm-filter:0.1.0 docker://registry.example/llm-filter:0.1.0
CALLER_DIR="$PWD"
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

case "${1:-}" in
    -h | --help)
        sed -n '2,/^CALLER_DIR/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'
        exit 0
        ;;
    "") OUT_DIR="$REPO_ROOT/target/oci" ;;
    /*) OUT_DIR="$1" ;;
    *) OUT_DIR="$CALLER_DIR/$1" ;;
esac
[ $# -le 1 ] || die "usage: scripts/package-oci.sh [OUT_DIR]"

NAME=llm-filter
TAG="${TAG:-$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)}"
[ -n "$TAG" ] || die "no version in Cargo.toml; set TAG"
EPOCH="${SOURCE_DATE_EPOCH:-0}"
for cmd in sha256sum tar gzip; do
    command -v "$cmd" >/dev/null 2>&1 || die "$cmd is required"
done

build_wasm

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
LAYOUT="$WORK/$NAME"
BLOBS="$LAYOUT/blobs/sha256"
mkdir -p "$WORK/rootfs" "$BLOBS"

sha256() { sha256sum "$1" | cut -d' ' -f1; }
size() { wc -c <"$1" | tr -d ' '; }
# add_blob FILE: moves FILE into the layout under its digest; prints the digest (hex).
add_blob() {
    local digest
    digest="$(sha256 "$1")"
    mv "$1" "$BLOBS/$digest"
    printf '%s' "$digest"
}
# det_tar MODE TAR-ARGS...: deterministic tar (sorted names, fixed owner, mode and time).
det_tar() {
    local mode=$1
    shift
    tar --create --format=ustar --sort=name --owner=0 --group=0 --numeric-owner \
        --mtime="@$EPOCH" --mode="$mode" "$@"
}

# The layer: plugin.wasm alone.
cp "$WASM_OUT" "$WORK/rootfs/plugin.wasm"
det_tar 0644 -C "$WORK/rootfs" -f "$WORK/layer.tar" plugin.wasm
DIFF_ID="$(sha256 "$WORK/layer.tar")"
gzip -9 -n -c "$WORK/layer.tar" >"$WORK/layer.tar.gz"
LAYER_SIZE="$(size "$WORK/layer.tar.gz")"
LAYER_DIGEST="$(add_blob "$WORK/layer.tar.gz")"

# The image configuration: platform wasm/wasip1 (what the module is), one layer.
printf '{"architecture":"wasm","os":"wasip1","config":{},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]}}' \
    "$DIFF_ID" >"$WORK/config.json"
CONFIG_SIZE="$(size "$WORK/config.json")"
CONFIG_DIGEST="$(add_blob "$WORK/config.json")"

printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:%s","size":%s,"annotations":{"org.opencontainers.image.title":"plugin.wasm"}}],"annotations":{"org.opencontainers.image.title":"%s","org.opencontainers.image.version":"%s"}}' \
    "$CONFIG_DIGEST" "$CONFIG_SIZE" "$LAYER_DIGEST" "$LAYER_SIZE" "$NAME" "$TAG" >"$WORK/manifest.json"
MANIFEST_SIZE="$(size "$WORK/manifest.json")"
MANIFEST_DIGEST="$(add_blob "$WORK/manifest.json")"

printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"annotations":{"org.opencontainers.image.ref.name":"%s"}}]}' \
    "$MANIFEST_DIGEST" "$MANIFEST_SIZE" "$TAG" >"$LAYOUT/index.json"
printf '{"imageLayoutVersion":"1.0.0"}' >"$LAYOUT/oci-layout"

TARBALL="$NAME-$TAG.oci.tar"
det_tar 'u=rwX,go=rX' -C "$LAYOUT" -f "$WORK/$TARBALL" oci-layout index.json blobs

# Replace the previous output only now that everything is written.
mkdir -p "$OUT_DIR"
rm -rf "${OUT_DIR:?}/$NAME" "${OUT_DIR:?}/$TARBALL"
mv "$LAYOUT" "$OUT_DIR/$NAME"
mv "$WORK/$TARBALL" "$OUT_DIR/$TARBALL"

ok "OCI image layout: $OUT_DIR/$NAME (tag $TAG)"
ok "OCI archive:      $OUT_DIR/$TARBALL"
ok "plugin.wasm sha256: $(sha256 "$WASM_OUT")"
ok "manifest digest:  sha256:$MANIFEST_DIGEST"
cat <<EOF

Push, then point the WasmPlugin at it (pin the digest with spec.sha256 or url @sha256):
  skopeo copy oci:$OUT_DIR/$NAME:$TAG docker://REGISTRY/$NAME:$TAG
  llm-filter render istio MANIFESTS.yaml --wasm-url oci://REGISTRY/$NAME:$TAG
EOF
