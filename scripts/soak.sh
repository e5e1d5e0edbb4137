#!/usr/bin/env bash
# Soak test (not part of scripts/test.sh): the release filter in real Envoy
# (envoy/mesh.yaml, --concurrency 1) against the mock providers, under >= 100k mixed requests
# from examples/soak.rs over 16 keep-alive connections: valid ~1 KB chat bodies (200),
# invalid bodies (400 with their OpenAI error code), streamed requests (200 SSE ending
# `data: [DONE]`) and ~256 KB bodies (200).
#
#   scripts/soak.sh                        100000 requests
#   scripts/soak.sh --requests 500000      more (any flag is passed to examples/soak.rs:
#                                          --connections C, --rss-tolerance-mb M)
#
# Fails (exit 1) on any unexpected status or transport error, any wasm failure or panic in
# Envoy's log, or Envoy's RSS moving more than 5 MiB between the first 10k requests and the
# end. Envoy's config, log and the CA go to .work/soak/.
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

case "${1:-}" in
-h | --help)
    sed -n '2,15s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
    exit 0
    ;;
esac

header "setup"
ensure_toolchain
ensure_envoy

header "build"
# Only the library: build_wasm insists on exactly one .wasm in the output directory, and a
# CLI built for wasm by someone else must not stop a soak run.
cargo build --release --lib --target "$WASM_TARGET"
[ -f "$WASM_OUT" ] || die "cargo built the filter but $WASM_OUT is missing"
ok "$WASM_OUT: $(wc -c <"$WASM_OUT") bytes"
log "cargo build --release --example soak"
cargo build --quiet --release --example soak

header "soak"
rm -rf "$WORK_DIR/soak"
if target/release/examples/soak --envoy "$ENVOY" --wasm "$WASM_OUT" --out "$WORK_DIR/soak" "$@"; then
    ok "soak passed (Envoy's log: .work/soak/envoy.log)"
else
    die "soak failed (Envoy's log: .work/soak/envoy.log)"
fi
