#!/usr/bin/env bash
# The cargo-fuzz targets under fuzz/ (libFuzzer, AddressSanitizer), one after the other:
#   config_compile  Policy::from_text on any UTF-8 text
#   body_rewrite    rewrite_body on any bytes, for calls built from a small configuration
#   sse_usage       the SSE/JSON usage readers on any bytes, cut into chunks anywhere
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]   each target for SECONDS (default 60), all targets
#                                           unless some are named
#
# Installs cargo-fuzz into .work/tools if missing. Uses the nightly toolchain when rustup has
# one, else the pinned toolchain with RUSTC_BOOTSTRAP=1 (cargo-fuzz needs -Z flags). The
# corpus grows in fuzz/corpus/<target> (seeded from fuzz/seeds, envoy/manifests and
# tests/data/responses); a crash is written to fuzz/artifacts/<target>/ and stops the script
# with a non-zero exit. Neither directory is committed.
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

SECONDS_EACH="${1:-60}"
[[ "$SECONDS_EACH" =~ ^[0-9]+$ ]] || die "usage: scripts/fuzz.sh [SECONDS] [TARGET...]"
shift || true
TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=(config_compile body_rewrite sse_usage)

CARGO_FUZZ_VERSION=0.13.2
if ! cargo-fuzz --version 2>/dev/null | grep -q " $CARGO_FUZZ_VERSION"; then
    ensure_cmd cc gcc
    log "cargo install cargo-fuzz $CARGO_FUZZ_VERSION into $TOOLS_DIR"
    cargo install --locked cargo-fuzz --version "=$CARGO_FUZZ_VERSION" --root "$TOOLS_DIR"
fi

if rustup run nightly rustc --version >/dev/null 2>&1; then
    TOOLCHAIN=(+nightly)
    ok "$(rustup run nightly rustc --version)"
else
    warn "no nightly toolchain: using the pinned one with RUSTC_BOOTSTRAP=1"
    export RUSTC_BOOTSTRAP=1
    TOOLCHAIN=()
fi

seeds_of() {
    case "$1" in
    config_compile) echo envoy/manifests ;;
    body_rewrite) echo fuzz/seeds/body_rewrite ;;
    sse_usage) echo tests/data/responses ;;
    *) die "unknown fuzz target $1 (config_compile, body_rewrite, sse_usage)" ;;
    esac
}

for target in "${TARGETS[@]}"; do
    seeds="$(seeds_of "$target")"
    mkdir -p "fuzz/corpus/$target"
    header "fuzz $target for ${SECONDS_EACH}s"
    # One process, one core; new inputs go to the first corpus directory only.
    cargo "${TOOLCHAIN[@]}" fuzz run --fuzz-dir fuzz "$target" "fuzz/corpus/$target" "$seeds" -- \
        -max_total_time="$SECONDS_EACH" -rss_limit_mb=2048 -print_final_stats=1
    ok "$target: no crash in ${SECONDS_EACH}s ($(find "fuzz/corpus/$target" -type f | wc -l) corpus inputs)"
done
