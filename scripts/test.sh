#!/usr/bin/env bash
# Every check, in the order CI runs them, stopping at the first failure:
#   format, clippy (host, native module, wasm32-wasip1, wasm32-unknown-unknown), host unit tests,
#   the same unit tests inside wasm (wasm-bindgen-test-runner under Node.js), the release .wasm
#   and .so, the generated configs being current (render-configs.sh --check), `envoy --mode validate` on
#   every envoy/*.yaml, and the end-to-end suite (tests/*.rs) against real Envoy, then its
#   Envoy-bootstrap tests again with the native dynamic module (libllm_filter.so) in place of
#   the wasm filter (LLM_FILTER_BUILD=native).
# Installs what is missing first (toolchain targets, Envoy, wasm-bindgen-cli, skopeo and umoci
# for tests/oci.rs, prometheus for tests/e2e_prometheus.rs, Go for tests/istiod (the discovery
# server tests/e2e_istio.rs runs through scripts/mesh.sh), Redis and the rate limit service for
# tests/e2e_budgets.rs): see lib.sh.
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

mkdir -p "$WORK_DIR"
RESULTS="$WORK_DIR/test-results.log" # every `test result:` line, for the final count
: >"$RESULTS"
T0=$(date +%s)
STEP_NO=0
CURRENT_STEP=""

elapsed() {
    local s=$(($(date +%s) - $1))
    printf '%dm%02ds' $((s / 60)) $((s % 60))
}

# step "title" cmd...: run one step under a banner; stop everything if it fails.
step() {
    local title=$1 t
    shift
    STEP_NO=$((STEP_NO + 1))
    CURRENT_STEP="$STEP_NO. $title"
    header "$CURRENT_STEP"
    t=$(date +%s)
    if ! "$@"; then
        printf '\n' >&2
        die "step '$CURRENT_STEP' failed after $(elapsed "$t") (total $(elapsed "$T0"))"
    fi
    ok "$title ($(elapsed "$t"))"
}

# cargo_test args...: cargo test, its output also appended to $RESULTS.
cargo_test() {
    cargo test "$@" 2>&1 | tee -a "$RESULTS"
}

wasm_unit_tests() {
    ensure_wasm_bindgen || return 1
    CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUNNER=wasm-bindgen-test-runner \
        cargo_test --lib --target wasm32-unknown-unknown
}

validate_envoy_configs() {
    local f out n=0
    for f in envoy/*.yaml; do
        [ -e "$f" ] || break
        n=$((n + 1))
        if ! out="$("$ENVOY" --mode validate -c "$f" -l warning 2>&1)"; then
            printf '%s\n' "$out" >&2
            printf 'envoy --mode validate rejected %s\n' "$f" >&2
            return 1
        fi
        ok "$f: $(printf '%s\n' "$out" | tail -n 1)"
    done
    [ "$n" -gt 0 ] || { printf 'no envoy/*.yaml to validate\n' >&2; return 1; }
}

gofmt_check() {
    local unformatted
    unformatted=$(gofmt -l tests/istiod) || return 1
    [ -z "$unformatted" ] || { printf 'not gofmt-formatted: %s\n' "$unformatted" >&2; return 1; }
}

e2e_tests() {
    if ! compgen -G 'tests/*.rs' >/dev/null; then
        warn "no tests/*.rs yet: nothing to run"
        return 0
    fi
    # Integration tests only (`--test '*'`): the unit tests already ran above. A hung test
    # must not eat CI's whole budget: stop after $E2E_TIMEOUT seconds (compilation included).
    local rc=0
    E2E_TIMEOUT=${E2E_TIMEOUT:-1800}
    timeout -k 10 "$E2E_TIMEOUT" cargo test --test '*' 2>&1 | tee -a "$RESULTS" || rc=$?
    [ "$rc" -ne 124 ] || printf 'end-to-end tests timed out after %ss\n' "$E2E_TIMEOUT" >&2
    return "$rc"
}

# The dynamic module: every e2e test that starts Envoy from a bootstrap again, with
# LLM_FILTER_BUILD=native (tests/support/native.rs swaps each wasm filter for the module, same
# configuration). e2e_istio gets its filter from istiod and runs the module's own form
# (`render istio --native`, scripts/mesh.sh up --native) in the first pass, after build_native.
native_e2e_tests() {
    local args=() f name rc=0
    for f in tests/e2e_*.rs; do
        name=$(basename "$f" .rs)
        [ "$name" = e2e_istio ] && continue
        args+=(--test "$name")
    done
    E2E_TIMEOUT=${E2E_TIMEOUT:-1800}
    LLM_FILTER_BUILD=native LLM_FILTER_NATIVE="$PWD/$NATIVE_OUT" \
        timeout -k 10 "$E2E_TIMEOUT" cargo test "${args[@]}" 2>&1 | tee -a "$RESULTS" || rc=$?
    [ "$rc" -ne 124 ] || printf 'native end-to-end tests timed out after %ss\n' "$E2E_TIMEOUT" >&2
    return "$rc"
}

build_native() {
    cargo build --release --lib --features native || return 1
    [ -f "$NATIVE_OUT" ] || { printf 'cargo built no %s\n' "$NATIVE_OUT" >&2; return 1; }
    ok "$NATIVE_OUT: $(wc -c <"$NATIVE_OUT") bytes"
}

header "setup"
ensure_toolchain
ensure_envoy
ensure_cmd node nodejs
ensure_cmd nm binutils # tests/native.rs checks the module's symbols against Envoy's
ensure_oci_tools
ensure_prometheus
ensure_go
ensure_ratelimit

step "cargo fmt --check" cargo fmt --all --check
step "clippy (host, all targets)" cargo clippy --all-targets -- -D warnings
step "clippy (native dynamic module, lib)" cargo clippy --lib --features native-test-panic -- -D warnings
step "clippy (wasm32-wasip1, lib)" cargo clippy --lib --target wasm32-wasip1 -- -D warnings
step "clippy (wasm32-unknown-unknown, all targets)" \
    cargo clippy --all-targets --target wasm32-unknown-unknown -- -D warnings
step "unit tests (host)" cargo_test --lib --bins
step "unit tests (wasm32-unknown-unknown, Node.js)" wasm_unit_tests
step "release build ($WASM_OUT)" build_wasm
step "release build ($NATIVE_OUT)" build_native
# envoy/*.yaml and istio/*.yaml are rendered from envoy/manifests: a stale one fails here.
step "generated configs are current (render-configs.sh --check)" \
    bash scripts/render-configs.sh --check
step "envoy --mode validate envoy/*.yaml" validate_envoy_configs
# istiod's translation code (tests/istiod): the first build compiles istio.io/istio (many minutes);
# Go's caches make later ones seconds. tests/e2e_istio.rs uses this binary (scripts/mesh.sh).
step "gofmt tests/istiod" gofmt_check
step "discovery server (tests/istiod, go build)" build_istiod
step "end-to-end tests (tests/*.rs, real Envoy)" e2e_tests
step "end-to-end tests again with the dynamic module (LLM_FILTER_BUILD=native)" native_e2e_tests

# Sum libtest's own `test result:` lines (host, wasm runner and e2e binaries alike).
read -r passed failed ignored < <(awk '
    /^test result:/ {
        for (i = 1; i <= NF; i++) {
            if ($(i+1) ~ /^passed/) p += $i
            if ($(i+1) ~ /^failed/) f += $i
            if ($(i+1) ~ /^ignored/) g += $i
        }
    }
    END { printf "%d %d %d\n", p, f, g }' "$RESULTS")
header "summary"
ok "all $STEP_NO steps passed in $(elapsed "$T0")"
# CI reads a closing line of exactly this shape.
printf '%d passed, %d failed\n' "$passed" "$failed"
[ "$ignored" -eq 0 ] || warn "$ignored tests ignored"
