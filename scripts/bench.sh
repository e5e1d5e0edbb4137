#!/usr/bin/env bash
# The filter measured against plain Envoy: a benchmark, not a test (scripts/test.sh does not
# run it, and nothing here fails on a missed budget; the tables say it).
#
#   scripts/bench.sh [--quick] [--rounds N] [--duration S] [--sizes LIST] [--builds LIST]
#                    [--peers] [--chart PATH]
#
# One upstream (nginx from Debian, with its echo module for the streamed answer) and one Envoy
# per target, each with one worker, made from one config template: "plain" (listener, route,
# cluster) and one per build of the filter with a provider that rewrites path, model, stream and
# apiKey: "wasm" (envoy.filters.http.wasm, V8) and "native" (the same filter as an Envoy dynamic
# module, envoy.filters.http.dynamic_modules, with the same configuration string). Plain HTTP to
# nginx: TLS is not what is measured. Proxies run on core 1; wrk, nginx and the timing client on
# core 0 (taskset; no pinning on a 1-core machine).
#
# Cases, in interleaved rounds (the targets in one order in odd rounds and reversed in even
# ones, so none always runs on a warmer machine), medians over rounds:
#   - chat bodies of 1 KB, 64 KB, 1 MB: throughput at 32 connections (wrk -t1 -c32) and
#     p50/p99 latency at 1 connection (wrk -t1 -c1 --latency);
#   - streaming: time from sending the request to the first SSE event (own client, new
#     connection per request, connect not timed), median over runs;
#   - CPU time per request during the throughput runs (/proc/PID/stat): the Envoy's, and the
#     processes beside it (AI Gateway's ext_proc server, the rate limit service and Redis);
#   - Envoy RSS (/proc) and heap (admin /memory) before and after 100k 1 KB requests;
#   - the size of the release .wasm.
# Every ratio and added time is against plain Envoy in the same round.
#
# --builds LIST: the filter builds to measure, some of wasm,native. Default: wasm, and native
# when it can be had (this tree has the cargo feature `native`, or BENCH_NATIVE names a .so);
# a build named in --builds that cannot be had stops the run.
# --peers adds, on the same nginx:
#   - Envoy AI Gateway: its ext_proc server (cmd/extproc, go install into .work/tools) beside a
#     plain Envoy 1.40 configured as its controller configures Envoy for one OpenAI-compatible
#     backend per rule: the router-level ext_proc filter (request and response bodies buffered)
#     enabled per generated route, the upstream ext_proc filter and header mutation in each
#     backend cluster, the backend's name in the endpoint metadata, routes matching the
#     x-ai-eg-model header; the backend overrides model, path prefix and API key.
#     BENCH_AIGW_EXTPROC=path runs that binary instead of installing it;
#   - LiteLLM (pip, its own venv in .work/bench/litellm-venv, 1 worker, its master key checked),
#     for the 1 KB and streaming cases.
#   BENCH_PEERS=aigw or BENCH_PEERS=litellm runs only that one.
#
# Flags: --quick (1 round of 1 s, 5 streaming runs, 5k requests for memory: for development),
# --rounds N (default 5), --duration S (seconds per wrk run, default 5), --sizes LIST (some of
# 1KB,64KB,1MB; default all), --chart PATH (where the SVG chart goes; default
# .work/bench/bench.svg).
# Output: Markdown tables on stdout, .work/bench/results.json and the chart (drawn by
# scripts/bench_report.py from results.json); logs in .work/bench/run/.
# Environment: BENCH_WASM=path measures that .wasm instead of building this tree's (to compare
# a variant), BENCH_WASM_BASELINE=path runs that .wasm too, as "wasm-baseline" (the budget "wasm no
# slower than before" is then judged against it in the same rounds), BENCH_NATIVE=path that
# libllm_filter.so, BENCH_RESULTS=path writes the JSON
# there instead, BENCH_MODEL_ROUTED=1 sends the chat cases through an LLMRoute rule that matches
# the body's model (routing at body time), BENCH_HOLD_HEADERS=0 lets the headers go at once (the
# Istio WasmPlugin way), BENCH_APM=1 puts Envoy's AI Protocol Manager (which buffers the whole
# body first) before the filter, BENCH_ROUTED=1 sends the chat cases through an LLMRoute rule
# with one backend (the client calls the route's host, the filter picks the rule and rewrites
# for its provider), BENCH_FALLBACK=1 measures each build twice in the same run: through that
# rule ("wasm", "native") and through the same rule with a fallback provider ("wasm-fallback",
# "native-fallback": an aggregate cluster, a retry policy and the filter's upstream part on
# every request; no provider fails).
# BENCH_LIMITED=1 sends them through the same rule with a token budget per user (`limits`, the
# limit never reached; the wasm build): Envoy's rate limit filter, a check at request time and a
# debit when the stream is done, both gRPC calls to the rate limit service (scripts/ratelimit.sh,
# on core 0 with the load) on Redis; compare it with BENCH_ROUTED=1. Every client request
# carries `x-user-id` either way.
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ROUNDS=5
DURATION=5
TTFE_RUNS=31
MEM_REQUESTS=100000
PEERS=0
SIZES=(1KB 64KB 1MB)
BUILDS=()
BUILDS_ASKED=0
CHART="$WORK_DIR/bench/bench.svg"
while [ $# -gt 0 ]; do
    case "$1" in
    --quick) ROUNDS=1 DURATION=1 TTFE_RUNS=5 MEM_REQUESTS=5000 ;;
    --rounds) ROUNDS="${2:?--rounds needs a number}" && shift ;;
    --duration) DURATION="${2:?--duration needs seconds}" && shift ;;
    --peers) PEERS=1 ;;
    --sizes) IFS=, read -r -a SIZES <<<"${2:?--sizes needs a list such as 1KB,64KB}" && shift ;;
    --builds) IFS=, read -r -a BUILDS <<<"${2:?--builds needs a list such as wasm,native}" && BUILDS_ASKED=1 && shift ;;
    --chart) CHART="${2:?--chart needs a path}" && shift ;;
    -h | --help) sed -n '2,/^# shellcheck/p' "$0" | sed '$d; s/^# \{0,1\}//' && exit 0 ;;
    *) die "unknown flag $1 (see --help)" ;;
    esac
    shift
done
[[ "$ROUNDS" =~ ^[1-9][0-9]*$ ]] || die "--rounds wants a positive integer, got $ROUNDS"
[[ "$DURATION" =~ ^[1-9][0-9]*$ ]] || die "--duration wants whole seconds, got $DURATION"
for size in "${SIZES[@]}"; do
    case "$size" in 1KB | 64KB | 1MB) ;; *) die "--sizes: $size is not one of 1KB, 64KB, 1MB" ;; esac
done
for b in "${BUILDS[@]}"; do
    case "$b" in wasm | native) ;; *) die "--builds: $b is not one of wasm, native" ;; esac
done
[ "$BUILDS_ASKED" = 0 ] || [ ${#BUILDS[@]} -gt 0 ] || die "--builds needs at least one of wasm, native"
case "$CHART" in /*) ;; *) CHART="$PWD/$CHART" ;; esac
wants_build() { [[ " ${BUILDS[*]} " == *" $1 "* ]]; }

[ "${BENCH_FALLBACK:-0}" = 1 ] && BENCH_ROUTED=1
[ "${BENCH_LIMITED:-0}" = 1 ] && BENCH_ROUTED=1
[ "${BENCH_LIMITED:-0}" = 1 ] && [ "${BENCH_FALLBACK:-0}" = 1 ] &&
    die "BENCH_LIMITED and BENCH_FALLBACK each compare with BENCH_ROUTED: set one"
[ "${BENCH_ROUTED:-0}" = 1 ] && [ "${BENCH_MODEL_ROUTED:-0}" = 1 ] &&
    die "BENCH_ROUTED/BENCH_FALLBACK and BENCH_MODEL_ROUTED measure different routes: set one"

BENCH_DIR="$WORK_DIR/bench"
RUN="$BENCH_DIR/run"
RAW="$RUN/raw.jsonl"
RESULTS_JSON="${BENCH_RESULTS:-$BENCH_DIR/results.json}"
ECHO_MODULE=/usr/lib/nginx/modules/ngx_http_echo_module.so
LLM_HOST=llm.bench.local       # the chat provider: path, model, stream false, apiKey
STREAM_HOST=stream.bench.local # the streaming provider: path, model, stream true, apiKey
VERIFY_HOST=verify.bench.local # nginx echoes what it got: proves the rewrite happened
AIGW_VERIFY_HOST=aigw-verify.bench.local # the same for AI Gateway, in nginx's log
# Every client request carries this key, as SDKs do: the filter replaces it with the
# provider's, plain Envoy passes it on, LiteLLM checks it (its master key).
CLIENT_KEY=sk-bench-client-key
NATIVE_BUILD_CMD="cargo build --release --lib --features native"
# Envoy AI Gateway's ext_proc server, from the Go module proxy (the release the config below
# follows: filterapi.Config, the ext_proc filters and metadata of its extension server).
AIGW_MODULE=github.com/envoyproxy/ai-gateway
AIGW_VERSION=v1.1.0
AIGW_BIN="$TOOLS_DIR/ai-gateway/$AIGW_VERSION/extproc"

# ---------------------------------------------------------------------------- tools
header "tools"
ensure_cmd wrk wrk
ensure_cmd nginx nginx
[ -f "$ECHO_MODULE" ] || apt_install libnginx-mod-http-echo
ensure_cmd taskset util-linux
ensure_cmd curl curl
ensure_toolchain
ensure_envoy

# The native build: this tree's when it has the feature, or BENCH_NATIVE.
has_native_feature() {
    python3 - <<'EOF'
import sys, tomllib
sys.exit(0 if "native" in tomllib.load(open("Cargo.toml", "rb")).get("features", {}) else 1)
EOF
}
NATIVE_SO=""
NATIVE_MISSING=""
if [ -n "${BENCH_NATIVE:-}" ]; then
    [ -f "$BENCH_NATIVE" ] || die "BENCH_NATIVE=$BENCH_NATIVE is not a file"
    NATIVE_SO="$(cd "$(dirname "$BENCH_NATIVE")" && pwd)/$(basename "$BENCH_NATIVE")"
elif [ "$BUILDS_ASKED" = 0 ] || wants_build native; then
    if has_native_feature; then
        $NATIVE_BUILD_CMD
        NATIVE_SO="${CARGO_TARGET_DIR:-$REPO_ROOT/target}/release/libllm_filter.so"
        [ -f "$NATIVE_SO" ] || die "$NATIVE_BUILD_CMD built no $NATIVE_SO"
    else
        NATIVE_MISSING="native build not found: build it with \`$NATIVE_BUILD_CMD\` on a tree that has the feature, or set BENCH_NATIVE=path/to/libllm_filter.so"
    fi
fi
if [ "$BUILDS_ASKED" = 0 ]; then
    BUILDS=(wasm)
    if [ -n "$NATIVE_SO" ]; then
        BUILDS+=(native)
    else
        warn "$NATIVE_MISSING; measuring the wasm build only"
    fi
elif wants_build native && [ -z "$NATIVE_SO" ]; then
    die "$NATIVE_MISSING"
fi
if [ "${BENCH_LIMITED:-0}" = 1 ] && wants_build native; then
    # The rate limit entries read the filter state the wasm build writes (wasm.llm.*).
    [ "$BUILDS_ASKED" = 1 ] && die "BENCH_LIMITED=1 measures the wasm build only: --builds wasm"
    BUILDS=(wasm)
fi
if wants_build native; then
    # Envoy finds libNAME.so for `dynamic_module_config: {name: llm_filter}` in this directory.
    mkdir -p "$BENCH_DIR/native"
    ln -sfn "$NATIVE_SO" "$BENCH_DIR/native/libllm_filter.so"
    export ENVOY_DYNAMIC_MODULES_SEARCH_PATH="$BENCH_DIR/native"
    ok "native build: $NATIVE_SO ($(wc -c <"$NATIVE_SO") bytes)"
fi
WASM=""
if wants_build wasm; then
    if [ -n "${BENCH_WASM:-}" ]; then
        # A candidate build to compare (e.g. a variant of the filter): measured instead of ours.
        [ -f "$BENCH_WASM" ] || die "BENCH_WASM=$BENCH_WASM is not a file"
        WASM="$(cd "$(dirname "$BENCH_WASM")" && pwd)/$(basename "$BENCH_WASM")"
        warn "measuring BENCH_WASM=$WASM, not this tree's build"
    else
        build_wasm
        WASM="$REPO_ROOT/$WASM_OUT"
    fi
fi
WASM_BASELINE=""
if [ -n "${BENCH_WASM_BASELINE:-}" ]; then
    # Another .wasm (e.g. the main branch's) beside this tree's in the same rounds: the budget
    # "wasm no slower than before" is then judged against it.
    [ -f "$BENCH_WASM_BASELINE" ] || die "BENCH_WASM_BASELINE=$BENCH_WASM_BASELINE is not a file"
    wants_build wasm || die "BENCH_WASM_BASELINE compares with the wasm build: add it to --builds"
    WASM_BASELINE="$(cd "$(dirname "$BENCH_WASM_BASELINE")" && pwd)/$(basename "$BENCH_WASM_BASELINE")"
fi
ok "builds: ${BUILDS[*]}${WASM_BASELINE:+, wasm-baseline ($WASM_BASELINE)}; $(wrk --version 2>&1 | head -1 | cut -d' ' -f1-2), $(nginx -v 2>&1 | sed 's/.*: //')"

LITELLM=""
LITELLM_VERSION=""
PEER_NOTES=()
AIGW=""
PEER_LIST=",${BENCH_PEERS:-aigw,litellm},"
if [ "$PEERS" = 1 ] && [[ "$PEER_LIST" == *,litellm,* ]]; then
    venv="$BENCH_DIR/litellm-venv"
    if [ ! -x "$venv/bin/litellm" ]; then
        log "pip install 'litellm[proxy]' into $venv (a few minutes)"
        if python3 -m venv "$venv" &&
            "$venv/bin/pip" install --quiet --disable-pip-version-check 'litellm[proxy]'; then
            :
        else
            PEER_NOTES+=("LiteLLM could not be installed from PyPI here; its column is left out")
            warn "${PEER_NOTES[-1]}"
        fi
    fi
    if [ -x "$venv/bin/litellm" ]; then
        LITELLM="$venv/bin/litellm"
        LITELLM_VERSION="$("$venv/bin/pip" show litellm 2>/dev/null | sed -n 's/^Version: //p')"
        ok "litellm $LITELLM_VERSION"
    fi
fi
if [ "$PEERS" = 1 ] && [[ "$PEER_LIST" == *,aigw,* ]]; then
    if [ -n "${BENCH_AIGW_EXTPROC:-}" ]; then
        [ -x "$BENCH_AIGW_EXTPROC" ] || die "BENCH_AIGW_EXTPROC=$BENCH_AIGW_EXTPROC is not an executable file"
        AIGW="$(cd "$(dirname "$BENCH_AIGW_EXTPROC")" && pwd)/$(basename "$BENCH_AIGW_EXTPROC")"
    else
        if [ ! -x "$AIGW_BIN" ]; then
            ensure_go
            log "go install $AIGW_MODULE/cmd/extproc@$AIGW_VERSION into ${AIGW_BIN%/*} (minutes the first time)"
            GOBIN="$(dirname "$AIGW_BIN")" GOFLAGS=-buildvcs=false \
                go install "$AIGW_MODULE/cmd/extproc@$AIGW_VERSION" 2>"$BENCH_DIR/aigw-install.log" || true
        fi
        if [ -x "$AIGW_BIN" ]; then
            AIGW="$AIGW_BIN"
        else
            PEER_NOTES+=("Envoy AI Gateway left out: \`go install $AIGW_MODULE/cmd/extproc@$AIGW_VERSION\` failed: $(grep -v '^go: downloading' "$BENCH_DIR/aigw-install.log" | head -2 | tr '\n' ' ')(BENCH_AIGW_EXTPROC=path runs a binary built elsewhere)")
            warn "${PEER_NOTES[-1]}"
        fi
    fi
    [ -n "$AIGW" ] && ok "AI Gateway ext_proc: $AIGW"
fi

# ---------------------------------------------------------------------------- cores
NPROC="$(nproc)"
if [ "$NPROC" -ge 2 ]; then
    PROXY_CPU=(taskset -c 1) # Envoys, AI Gateway's ext_proc, LiteLLM
    LOAD_CPU=(taskset -c 0)  # wrk, nginx, the streaming client
    CORES_NOTE="proxies on core 1; wrk, nginx and the streaming client on core 0"
else
    PROXY_CPU=() LOAD_CPU=()
    CORES_NOTE="1 core: nothing pinned, proxy and load share it"
    warn "$CORES_NOTE"
fi

# ---------------------------------------------------------------------------- targets
# Every target: an Envoy (or LiteLLM) on its own port. TARGET_KIND: plain, wasm, native, aigw,
# litellm; TARGET_FALLBACK: 1 for the fallback variant of a build.
TARGETS=(plain)
declare -A TARGET_KIND=([plain]=plain) TARGET_FALLBACK=([plain]=0)
for b in "${BUILDS[@]}"; do
    TARGETS+=("$b")
    TARGET_KIND[$b]=$b TARGET_FALLBACK[$b]=0
done
if [ "${BENCH_FALLBACK:-0}" = 1 ]; then
    for b in "${BUILDS[@]}"; do
        TARGETS+=("$b-fallback")
        TARGET_KIND[$b-fallback]=$b TARGET_FALLBACK[$b-fallback]=1
    done
fi
if [ -n "$WASM_BASELINE" ]; then TARGETS+=(wasm-baseline) TARGET_KIND[wasm-baseline]=wasm TARGET_FALLBACK[wasm-baseline]=0; fi
if [ -n "$AIGW" ]; then TARGETS+=(aigw) TARGET_KIND[aigw]=aigw TARGET_FALLBACK[aigw]=0; fi
if [ -n "$LITELLM" ]; then TARGETS+=(litellm) TARGET_KIND[litellm]=litellm TARGET_FALLBACK[litellm]=0; fi
# The Envoys with the filter, and every Envoy (memory is measured on these).
FILTER_TARGETS=()
ENVOY_TARGETS=(plain)
for t in "${TARGETS[@]}"; do
    case "${TARGET_KIND[$t]}" in wasm | native) FILTER_TARGETS+=("$t") ENVOY_TARGETS+=("$t") ;; esac
done

# ---------------------------------------------------------------------------- files
rm -rf "$RUN"
mkdir -p "$RUN/nginx-tmp"
: >"$RAW"

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
NGINX_PORT=$(free_port)
declare -A PORT ADMIN
for t in "${TARGETS[@]}"; do
    PORT[$t]=$(free_port)
    ADMIN[$t]=$(free_port)
done

# chat_body SIZE FILE: the recipe of `chat_body` in benches/core.rs (same bytes).
chat_body() {
    python3 - "$1" "$2" <<'EOF'
import sys
size, path = int(sys.argv[1]), sys.argv[2]
turn = 'The quick brown fox jumps over the lazy dog; \\"quoted\\" text\\n. ' * 6
head = '{"messages":[{"role":"system","content":"You are a helpful assistant."}'
tail = '],"model":"gpt-4o-mini","stream":false,"temperature":0.7}'
body, i = head, 0
while True:
    role = "user" if i % 2 == 0 else "assistant"
    opn, close = '{"role":"%s","content":"' % role, '"}'
    opn = "," + opn
    room = max(0, size - (len(body) + len(opn) + len(close) + len(tail)))
    if room <= len(turn) * 2:
        body += opn + "x" * room + close
        break
    body += opn + turn + close
    i += 1
body += tail
assert len(body) == size, (len(body), size)
open(path, "w").write(body)
EOF
}
chat_body 1024 "$RUN/body-1KB.json"
chat_body 65536 "$RUN/body-64KB.json"
chat_body 1048576 "$RUN/body-1MB.json"
sed 's/"stream":false/"stream":true/' "$RUN/body-1KB.json" >"$RUN/body-stream.json"
# LiteLLM and AI Gateway pick the backend by model name; that one points at the SSE server.
sed 's/"gpt-4o-mini"/"bench-stream"/' "$RUN/body-stream.json" >"$RUN/body-stream-by-model.json"
# AI Gateway's verifying backend (nginx echoes what it got), also picked by model name.
sed 's/"gpt-4o-mini"/"bench-verify"/' "$RUN/body-1KB.json" >"$RUN/body-verify-by-model.json"

# The provider configuration the filter runs: every rewrite it can do, on every request. With
# BENCH_MODEL_ROUTED=1 the chat host is an LLMRoute whose rule matches the body's model.
CHAT_PROVIDER_HOST=$LLM_HOST
[ "${BENCH_MODEL_ROUTED:-0}" = 1 ] && CHAT_PROVIDER_HOST=chat.provider.bench.local
[ "${BENCH_ROUTED:-0}" = 1 ] && CHAT_PROVIDER_HOST=chat.provider.bench.local
FALLBACK_HOST=fallback.provider.bench.local
# manifests FALLBACK(0|1): the configuration string every filter target gets (both builds the
# same); the fallback variant differs only in the rule's fallback line.
manifests() {
    cat <<EOF
apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMProvider
metadata:
  name: bench-chat
spec:
  host: $CHAT_PROVIDER_HOST
  path: /compatible-mode/v1/chat/completions
  configs:
    defaultConfig:
      openAIConfig: { model: bench-model, stream: false, apiKey: sk-bench-chat }
---
apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMProvider
metadata:
  name: bench-stream
spec:
  host: $STREAM_HOST
  path: /compatible-mode/v1/chat/completions
  configs:
    defaultConfig:
      openAIConfig: { model: bench-model, stream: true, apiKey: sk-bench-stream }
---
apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMProvider
metadata:
  name: bench-verify
spec:
  host: $VERIFY_HOST
  path: /verified/chat/completions
  configs:
    defaultConfig:
      openAIConfig: { model: bench-model, stream: false, apiKey: sk-bench-verify }
EOF
    if [ "${BENCH_MODEL_ROUTED:-0}" = 1 ]; then
        cat <<EOF
---
apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMRoute
metadata:
  name: bench-models
spec:
  host: $LLM_HOST
  rules:
  - name: by-model
    matches: [{model: {prefix: gpt-}}]
    backendRefs: [{providerHost: $CHAT_PROVIDER_HOST}]
EOF
    fi
    if [ "${BENCH_ROUTED:-0}" = 1 ]; then
        # The fallback provider is configured either way, so both variants hold the same providers.
        cat <<EOF
---
apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMProvider
metadata:
  name: bench-fallback
spec:
  host: $FALLBACK_HOST
  path: /fallback/chat/completions
  configs:
    defaultConfig:
      openAIConfig: { model: bench-model, stream: false, apiKey: sk-bench-fallback }
---
apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMRoute
metadata:
  name: bench-fallback
spec:
  host: $LLM_HOST
  rules:
  - name: ha
    backendRefs: [{providerHost: $CHAT_PROVIDER_HOST}]
EOF
        if [ "$1" = 1 ]; then echo "    fallback: { providers: [$FALLBACK_HOST] }"; fi
        # A budget the run never spends (29 tokens an answer): every request is checked and debited.
        if [ "${BENCH_LIMITED:-0}" = 1 ]; then
            echo "    limits: [{ name: per-user, tokens: 4000000000, per: minute, key: { header: x-user-id } }]"
        fi
    fi
    # As `llm-filter render envoy` ships it: headers held until the body is checked (with Envoy's
    # allow_on_headers_stop_iteration for the wasm build). BENCH_HOLD_HEADERS=0 measures the
    # Istio WasmPlugin way instead (headers go on at once, the body is rewritten on its own).
    if [ "${BENCH_HOLD_HEADERS:-1}" = 1 ]; then printf -- '---\nsettings: { forwardAfterBody: true }\n'; fi
}
manifests 0 >"$RUN/manifests.yaml"
manifests 1 >"$RUN/manifests-fallback.yaml"
ALLOW_STOP=true
[ "${BENCH_HOLD_HEADERS:-1}" = 1 ] || ALLOW_STOP=false

# BENCH_LIMITED=1: the rate limit service with the budget (as `llm-filter render ratelimit`
# prints it), on the load's core.
RATELIMIT_WORK="$BENCH_DIR/ratelimit"
RATELIMIT_ADDR=""
if [ "${BENCH_LIMITED:-0}" = 1 ]; then
    cargo build --quiet --bin llm-filter
    "${CARGO_TARGET_DIR:-$REPO_ROOT/target}/debug/llm-filter" render ratelimit "$RUN/manifests.yaml" \
        >"$RUN/ratelimit.yaml" || die "llm-filter render ratelimit failed"
    RATELIMIT_ADDR="$(RATELIMIT_LOG_LEVEL=warn "${LOAD_CPU[@]}" bash scripts/ratelimit.sh up \
        --config "$RUN/ratelimit.yaml" --work "$RATELIMIT_WORK" | sed -n 's/^ratelimit=//p')"
    [ -n "$RATELIMIT_ADDR" ] || die "scripts/ratelimit.sh up printed no ratelimit=ADDR:PORT"
    trap 'bash scripts/ratelimit.sh down --work "$RATELIMIT_WORK"' EXIT
fi

# filter_snippet KIND MANIFESTS INDENT [upstream]: the filter's entry in an http_filters list,
# for the wasm or the native build, with the configuration string MANIFESTS; "upstream" gives
# the part that runs in a cluster's upstream filter chain (fallback).
filter_snippet() {
    local kind=$1 manifests=$2 pad=$3 part=${4:-} name=llm-filter
    [ "$part" = upstream ] && name=llm-filter-upstream
    if [ "$kind" = wasm ]; then
        sed "s/^/$pad/" <<EOF
- name: envoy.filters.http.wasm
  typed_config:
    '@type': type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
    config:
      name: $name
      root_id: $name
$([ "$part" = upstream ] || echo "      allow_on_headers_stop_iteration: $ALLOW_STOP")
      vm_config:
        vm_id: llm-filter
        runtime: envoy.wasm.runtime.v8
        code: { local: { filename: $wasm_file } }
      configuration:
        '@type': type.googleapis.com/google.protobuf.StringValue
        value: |
$(sed 's/^/          /' "$manifests")
EOF
    else
        sed "s/^/$pad/" <<EOF
- name: envoy.filters.http.dynamic_modules
  typed_config:
    '@type': type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter
    dynamic_module_config: { name: llm_filter, metrics_namespace: llm }
    filter_name: $name
    filter_config:
      '@type': type.googleapis.com/google.protobuf.StringValue
      value: |
$(sed 's/^/        /' "$manifests")
EOF
    fi
}

# envoy_config TARGET: the one template every Envoy target is made from (AI Gateway's below).
envoy_config() {
    local t=$1 kind=${TARGET_KIND[$1]} fallback=${TARGET_FALLBACK[$1]} manifests=$RUN/manifests.yaml
    # filter_snippet reads wasm_file: the baseline target runs the other .wasm.
    local wasm_file=$WASM
    [ "$t" = wasm-baseline ] && wasm_file=$WASM_BASELINE
    local with_filter=1
    [ "$kind" = plain ] && with_filter=0
    [ "$fallback" = 1 ] && manifests=$RUN/manifests-fallback.yaml
    cat <<EOF
# Generated by scripts/bench.sh: $t ($([ "$with_filter" = 1 ] && echo "llm-filter, $kind build" || echo "plain routing")).
admin:
  address: { socket_address: { address: 127.0.0.1, port_value: ${ADMIN[$t]} } }
static_resources:
  listeners:
  - name: bench
    address: { socket_address: { address: 127.0.0.1, port_value: ${PORT[$t]} } }
    per_connection_buffer_limit_bytes: 16777216
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          '@type': type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: bench
          route_config:
            name: bench
            virtual_hosts:
            - name: providers
              domains: [$LLM_HOST, "$LLM_HOST:*", chat.provider.bench.local, $STREAM_HOST, "$STREAM_HOST:*", $VERIFY_HOST, "$VERIFY_HOST:*"]
              routes:
EOF
    # The fallback variant: what `llm-filter render envoy` emits for a rule with fallback (the
    # marked requests go to an aggregate cluster with a retry policy).
    if [ "$fallback" = 1 ]; then
        cat <<EOF
              - match: { prefix: /, headers: [{ name: x-llm-fallback, string_match: { exact: default/bench-fallback/0 } }] }
                request_headers_to_remove: [x-llm-fallback]
                route:
                  cluster: fallback
                  timeout: 300s
                  idle_timeout: 0s
                  retry_policy:
                    retry_on: connect-failure,refused-stream,5xx,retriable-status-codes
                    retriable_status_codes: [429]
                    num_retries: 1
                    retry_priority:
                      name: envoy.retry_priorities.previous_priorities
                      typed_config:
                        '@type': type.googleapis.com/envoy.extensions.retry.priority.previous_priorities.v3.PreviousPrioritiesConfig
                        update_frequency: 1
                    retry_host_predicate:
                    - name: envoy.retry_host_predicates.previous_hosts
                      typed_config: { '@type': type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate }
                    host_selection_retry_max_attempts: 5
                    retry_back_off: { base_interval: 0.01s, max_interval: 0.05s }
EOF
    fi
    cat <<EOF
              - match: { prefix: / }
                route: { cluster: upstream, timeout: 300s, idle_timeout: 0s }
EOF
    # BENCH_LIMITED=1: the rule's entries as `llm-filter render envoy --ratelimit` writes them.
    if [ "$with_filter" = 1 ] && [ "${BENCH_LIMITED:-0}" = 1 ]; then
        local id=default/bench-fallback/ha/per-user
        cat <<EOF
                typed_per_filter_config:
                  envoy.filters.http.ratelimit:
                    '@type': type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3.RateLimitPerRoute
                    rate_limits:
                    - actions: &actions
                      - generic_key: { descriptor_key: llm_limit, descriptor_value: $id }
                      - extension:
                          name: x-user-id
                          typed_config:
                            '@type': type.googleapis.com/envoy.extensions.matching.common_inputs.network.v3.FilterStateInput
                            key: wasm.llm.limit.$id
                      hits_addend: { number: 0 }
                    - actions: *actions
                      apply_on_stream_done: true
                      hits_addend: { format: '%FILTER_STATE(wasm.llm.debit:PLAIN)%' }
EOF
    fi
    cat <<EOF
          http_filters:
EOF
    if [ "$with_filter" = 1 ] && [ "${BENCH_APM:-0}" = 1 ]; then
        cat <<EOF
          - name: envoy.filters.http.ai_protocol_manager
            typed_config:
              '@type': type.googleapis.com/envoy.extensions.filters.http.ai_protocol_manager.v3.AiProtocolManager
EOF
    fi
    [ "$with_filter" = 1 ] && filter_snippet "$kind" "$manifests" "          "
    if [ "$with_filter" = 1 ] && [ "${BENCH_LIMITED:-0}" = 1 ]; then
        cat <<EOF
          - name: envoy.filters.http.ratelimit
            typed_config:
              '@type': type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3.RateLimit
              domain: llm-filter
              timeout: 1s
              failure_mode_deny: false
              enable_x_ratelimit_headers: DRAFT_VERSION_03
              status_on_error: { code: ServiceUnavailable }
              rate_limit_service:
                transport_api_version: V3
                grpc_service: { envoy_grpc: { cluster_name: llm-ratelimit } }
EOF
    fi
    cat <<EOF
          - name: envoy.filters.http.router
            typed_config:
              '@type': type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: upstream
    type: STATIC
    connect_timeout: 1s
    per_connection_buffer_limit_bytes: 16777216
    load_assignment:
      cluster_name: upstream
      endpoints:
      - lb_endpoints:
        - endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: $NGINX_PORT } } }
EOF
    if [ "$with_filter" = 1 ] && [ "${BENCH_LIMITED:-0}" = 1 ]; then
        cat <<EOF
  - name: llm-ratelimit
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        '@type': type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: { http2_protocol_options: {} }
    load_assignment:
      cluster_name: llm-ratelimit
      endpoints:
      - lb_endpoints:
        - endpoint: { address: { socket_address: { address: ${RATELIMIT_ADDR%:*}, port_value: ${RATELIMIT_ADDR##*:} } } }
EOF
    fi
    if [ "$fallback" = 1 ]; then
        local name host
        for name in chat fallback-provider; do
            host=$CHAT_PROVIDER_HOST
            [ "$name" = chat ] || host=$FALLBACK_HOST
            cat <<EOF
  - name: $name
    type: STATIC
    connect_timeout: 1s
    per_connection_buffer_limit_bytes: 16777216
    load_assignment:
      cluster_name: $name
      endpoints:
      - lb_endpoints:
        - endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: $NGINX_PORT } } }
          metadata: { filter_metadata: { llm: { provider: $host } } }
EOF
        done
        cat <<EOF
  - name: fallback
    connect_timeout: 1s
    lb_policy: CLUSTER_PROVIDED
    per_connection_buffer_limit_bytes: 16777216
    cluster_type:
      name: envoy.clusters.aggregate
      typed_config:
        '@type': type.googleapis.com/envoy.extensions.clusters.aggregate.v3.ClusterConfig
        clusters: [chat, fallback-provider]
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        '@type': type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        use_downstream_protocol_config: {}
        http_filters:
$(filter_snippet "$kind" "$manifests" "        " upstream)
        - name: envoy.filters.http.upstream_codec
          typed_config: { '@type': type.googleapis.com/envoy.extensions.filters.http.upstream_codec.v3.UpstreamCodec }
EOF
    fi
}
for t in "${ENVOY_TARGETS[@]}"; do envoy_config "$t" >"$RUN/envoy-$t.yaml"; done

# Envoy AI Gateway: what its controller generates for one AIGatewayRoute `default/bench` with
# three rules, each matching the model header (x-ai-eg-model, which its ext_proc server sets from
# the body) and naming one AIServiceBackend with schema OpenAI and a BackendSecurityPolicy API
# key: the chat backend (model override bench-model, prefix compatible-mode/v1), the streaming
# one and a verifying one (nginx echoes the request). The filterapi.Config its controller writes
# for the ext_proc server, with backends named <namespace>/<backend>/route/<route>/rule/<i>/ref/<j>:
AIGW_SOCK="$RUN/aigw-extproc.sock"
AIGW_ADMIN=$(free_port)
aigw_backend_name() { echo "default/bench-$1/route/bench/rule/$2/ref/0"; }
cat >"$RUN/aigw-filterapi.yaml" <<EOF
version: dev
uuid: bench
backends:
- name: $(aigw_backend_name chat 0)
  modelNameOverride: bench-model
  schema: { name: OpenAI, prefix: compatible-mode/v1 }
  auth: { apiKey: { key: sk-bench-chat } }
- name: $(aigw_backend_name stream 1)
  modelNameOverride: bench-model
  schema: { name: OpenAI, prefix: compatible-mode/v1 }
  auth: { apiKey: { key: sk-bench-stream } }
- name: $(aigw_backend_name verify 2)
  modelNameOverride: bench-model
  schema: { name: OpenAI, prefix: verified }
  auth: { apiKey: { key: sk-bench-verify } }
models:
- { name: gpt-4o-mini, ownedBy: bench }
- { name: bench-stream, ownedBy: bench }
- { name: bench-verify, ownedBy: bench }
EOF
# The Envoy side, as Envoy Gateway translates the generated HTTPRoute and AI Gateway's extension
# server then patches it: the router-level ext_proc filter (disabled on the listener, enabled on
# each generated route, bodies buffered, the route name in the route's metadata), a
# `route-not-found` rule that matches first (no model header yet) and is left once ext_proc has
# set the header and cleared the route cache, the backend host rewrite, and per backend cluster
# the upstream ext_proc filter (request headers only: it translates and authenticates from the
# body the router-level one kept), a header mutation restoring content-length, and the upstream
# codec; the ext_proc server on a unix socket over HTTP/2.
aigw_route() { # RULE MODEL BACKEND HOST
    cat <<EOF
              - name: httproute/default/bench/rule/$1/match/0
                match: { prefix: /, headers: [{ name: x-ai-eg-model, string_match: { exact: $2 } }] }
                metadata: &meta$1
                  filter_metadata:
                    envoy-gateway: { resources: [{ kind: HTTPRoute, name: bench, namespace: default, annotations: { gateway.envoyproxy.io/ai-gateway-generated: "true" } }] }
                    aigateway.envoy.io: { aigw_route_name: default/bench }
                typed_per_filter_config: &extproc_on$1
                  envoy.filters.http.ext_proc/aigateway: { '@type': type.googleapis.com/envoy.config.route.v3.FilterConfig, config: {} }
                route: { cluster: httproute/default/bench/rule/$1, auto_host_rewrite: true, timeout: 300s, idle_timeout: 0s }
EOF
}
aigw_cluster() { # RULE BACKEND HOST
    cat <<EOF
  - name: httproute/default/bench/rule/$1
    type: STATIC
    connect_timeout: 1s
    per_connection_buffer_limit_bytes: 16777216
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        '@type': type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: { http_protocol_options: {} }
        http_filters:
        - name: envoy.filters.http.ext_proc/aigateway
          typed_config:
            '@type': type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor
            grpc_service: { envoy_grpc: { cluster_name: ai-gateway-extproc-uds }, timeout: 30s }
            message_timeout: 10s
            allow_mode_override: true
            metadata_options: { receiving_namespaces: { untyped: [io.envoy.ai_gateway] } }
            request_attributes:
            - xds.upstream_host_metadata.filter_metadata['aigateway.envoy.io']['per_route_rule_backend_name']
            - xds.cluster_metadata.filter_metadata['aigateway.envoy.io']['per_route_rule_backend_name']
            - xds.upstream_host_metadata.filter_metadata['aigateway.envoy.io']['upstream_host']
            - xds.route_metadata.filter_metadata['aigateway.envoy.io']['aigw_route_name']
            processing_mode: { request_header_mode: SEND, request_body_mode: NONE, response_header_mode: SKIP, response_body_mode: NONE }
        - name: envoy.filters.http.header_mutation
          typed_config:
            '@type': type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation
            mutations:
              request_mutations:
              - append:
                  append_action: ADD_IF_ABSENT
                  header: { key: content-length, value: '%DYNAMIC_METADATA(io.envoy.ai_gateway:content_length)%' }
        - name: envoy.filters.http.upstream_codec
          typed_config: { '@type': type.googleapis.com/envoy.extensions.filters.http.upstream_codec.v3.UpstreamCodec }
    load_assignment:
      cluster_name: httproute/default/bench/rule/$1
      endpoints:
      - lb_endpoints:
        - endpoint:
            hostname: $3
            address: { socket_address: { address: 127.0.0.1, port_value: $NGINX_PORT } }
          metadata:
            filter_metadata:
              aigateway.envoy.io: { per_route_rule_backend_name: $(aigw_backend_name "$2" "$1"), upstream_host: $3 }
EOF
}
aigw_envoy_config() {
    cat <<EOF
# Generated by scripts/bench.sh: Envoy AI Gateway's data plane for one route with three rules.
admin:
  address: { socket_address: { address: 127.0.0.1, port_value: ${ADMIN[aigw]} } }
static_resources:
  listeners:
  - name: bench
    address: { socket_address: { address: 127.0.0.1, port_value: ${PORT[aigw]} } }
    per_connection_buffer_limit_bytes: 16777216
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          '@type': type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: bench
          scheme_header_transformation: { match_upstream: true }
          route_config:
            name: default/bench
            virtual_hosts:
            - name: bench
              domains: ["*"]
              routes:
$(aigw_route 0 gpt-4o-mini)
$(aigw_route 1 bench-stream)
$(aigw_route 2 bench-verify)
              - name: httproute/default/bench/rule/3/match/0
                match: { prefix: / }
                metadata: *meta0
                typed_per_filter_config: *extproc_on0
                direct_response:
                  status: 404
                  body: { inline_string: No matching route found. It is likely because the model specified in your request is not configured in the Gateway. }
          http_filters:
          - name: envoy.filters.http.ext_proc/aigateway
            disabled: true
            typed_config:
              '@type': type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor
              grpc_service: { envoy_grpc: { cluster_name: ai-gateway-extproc-uds } }
              message_timeout: 10s
              failure_mode_allow: false
              allow_mode_override: true
              metadata_options: { receiving_namespaces: { untyped: [io.envoy.ai_gateway] } }
              processing_mode: { request_header_mode: SEND, request_body_mode: BUFFERED, request_trailer_mode: SKIP, response_header_mode: SEND, response_body_mode: BUFFERED, response_trailer_mode: SKIP }
          - name: envoy.filters.http.router
            typed_config:
              '@type': type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
$(aigw_cluster 0 chat "$LLM_HOST")
$(aigw_cluster 1 stream "$STREAM_HOST")
$(aigw_cluster 2 verify "$AIGW_VERIFY_HOST")
  - name: ai-gateway-extproc-uds
    type: STATIC
    connect_timeout: 10s
    per_connection_buffer_limit_bytes: 52428800
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        '@type': type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: { http2_protocol_options: { initial_connection_window_size: 1048576, initial_stream_window_size: 65536 } }
    load_assignment:
      cluster_name: ai-gateway-extproc-uds
      endpoints:
      - lb_endpoints:
        - endpoint: { address: { pipe: { path: $AIGW_SOCK } } }
EOF
}
[ -n "$AIGW" ] && aigw_envoy_config >"$RUN/envoy-aigw.yaml"

CHAT_ANSWER='{"id":"chatcmpl-bench","object":"chat.completion","created":1735026073,"model":"bench-model","choices":[{"index":0,"message":{"role":"assistant","content":"Hello! How can I help you today?"},"finish_reason":"stop"}],"usage":{"prompt_tokens":20,"completion_tokens":9,"total_tokens":29}}'
# The upstream: a fixed chat completion (with usage, which the filter reads), a stream whose
# first event leaves at once and the rest 10 ms apart, and an echo of the request for checks.
cat >"$RUN/nginx-sse.conf" <<'EOF'
default_type text/event-stream;
echo_read_request_body;
echo -n 'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1735026073,"model":"bench-model","choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}\n\n';
echo_flush;
echo_sleep 0.01;
echo -n 'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1735026073,"model":"bench-model","choices":[{"index":0,"delta":{"content":"Hello"},"finish_reason":null}]}\n\n';
echo_flush;
echo_sleep 0.01;
echo -n 'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1735026073,"model":"bench-model","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n';
echo_flush;
echo_sleep 0.01;
echo -n 'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1735026073,"model":"bench-model","choices":[],"usage":{"prompt_tokens":20,"completion_tokens":2,"total_tokens":22}}\n\ndata: [DONE]\n\n';
EOF
cat >"$RUN/nginx.conf" <<EOF
load_module $ECHO_MODULE;
worker_processes 1;
pid $RUN/nginx.pid;
error_log $RUN/nginx-error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $RUN/nginx-tmp/body;
    proxy_temp_path $RUN/nginx-tmp/proxy;
    fastcgi_temp_path $RUN/nginx-tmp/fastcgi;
    uwsgi_temp_path $RUN/nginx-tmp/uwsgi;
    scgi_temp_path $RUN/nginx-tmp/scgi;
    client_max_body_size 0;
    client_body_buffer_size 2m;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    server {
        listen 127.0.0.1:$NGINX_PORT default_server;
        server_name $LLM_HOST;
        # LiteLLM reaches the stream by path (its api_base), the Envoys by Host.
        location /stream/ { include $RUN/nginx-sse.conf; }
        location / {
            default_type application/json;
            return 200 '$CHAT_ANSWER';
        }
    }
    server {
        listen 127.0.0.1:$NGINX_PORT;
        server_name $STREAM_HOST;
        location / { include $RUN/nginx-sse.conf; }
    }
    server {
        listen 127.0.0.1:$NGINX_PORT;
        server_name $VERIFY_HOST;
        location / {
            default_type text/plain;
            echo_read_request_body;
            echo "\$request_method \$request_uri authorization=\$http_authorization";
            echo_request_body;
        }
    }
    # AI Gateway parses every answer as a chat completion: this host answers one and logs what it
    # got instead.
    log_format verify escape=json '\$request_method \$request_uri authorization=\$http_authorization \$request_body';
    server {
        listen 127.0.0.1:$NGINX_PORT;
        server_name $AIGW_VERIFY_HOST;
        access_log $RUN/nginx-verify.log verify;
        location / {
            default_type application/json;
            echo_read_request_body;
            echo '$CHAT_ANSWER';
        }
    }
}
EOF

cat >"$RUN/litellm.yaml" <<EOF
model_list:
  - model_name: gpt-4o-mini
    litellm_params:
      model: openai/bench-model
      api_base: http://127.0.0.1:$NGINX_PORT/v1
      api_key: sk-bench-litellm
  - model_name: bench-stream
    litellm_params:
      model: openai/bench-model
      api_base: http://127.0.0.1:$NGINX_PORT/stream/v1
      api_key: sk-bench-litellm
litellm_settings:
  telemetry: false
  drop_params: true
general_settings:
  master_key: $CLIENT_KEY
EOF

# wrk: POST the body file with the LLM route's Host and a client key; one JSON line when done.
# No per-response Lua (it would slow wrk down).
cat >"$RUN/post.lua" <<'EOF'
function init(args)
  local f = assert(io.open(args[1], "rb"))
  wrk.body = f:read("*a")
  f:close()
  wrk.method = "POST"
  wrk.headers["Host"] = args[2]
  wrk.headers["Content-Type"] = "application/json"
  wrk.headers["Authorization"] = "Bearer " .. args[3]
  wrk.headers["x-user-id"] = "bench-user"
end
function done(s, latency, requests)
  local e = s.errors
  io.write(string.format('WRK_JSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"p50_us":%d,"p99_us":%d,"mean_us":%.1f}\n',
    s.requests, s.duration, s.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.mean))
end
EOF

# The streaming client: time from sending the request (connection already open) to the first
# `data:` event, over RUNS runs per target, alternating which target goes first.
cat >"$RUN/ttfe.py" <<'EOF'
import json, socket, sys, time
runs, targets, key = int(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]

def once(t):
    body = open(t["body"], "rb").read()
    req = ("POST /v1/chat/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
           "Authorization: Bearer %s\r\nx-user-id: bench-user\r\nContent-Length: %d\r\n"
           "Connection: close\r\n\r\n"
           % (t["host"], key, len(body))).encode() + body
    s = socket.create_connection(("127.0.0.1", t["port"]))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    t0 = time.perf_counter()
    s.sendall(req)
    buf, first = b"", None
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        buf += chunk
        if first is None:
            end = buf.find(b"\r\n\r\n")
            if end >= 0 and b"data:" in buf[end:]:
                first = time.perf_counter() - t0
    s.close()
    ok = buf.startswith(b"HTTP/1.1 200") and b"[DONE]" in buf and first is not None
    return first, ok, buf[:200].decode("latin-1")

for t in targets:  # warm up
    once(t)
for r in range(runs):
    order = targets if r % 2 == 0 else targets[::-1]
    for t in order:
        first, ok, head = once(t)
        if not ok:
            sys.exit("streaming request to %s failed: %r" % (t["name"], head))
        print(json.dumps({"kind": "ttfe", "size": "stream", "target": t["name"], "round": r,
                          "value": first * 1e6}))
EOF

# ---------------------------------------------------------------------------- processes
PIDS=()
declare -A MAIN_PIDS SIDE_PIDS
stop_all() {
    local pid
    # AI Gateway's ext_proc server waits 15 s after SIGTERM for its pod's load balancer.
    [ -n "${SIDE_PIDS[aigw]:-}" ] && kill -KILL "${SIDE_PIDS[aigw]}" 2>/dev/null
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    if [ -n "$RATELIMIT_ADDR" ]; then
        bash scripts/ratelimit.sh down --work "$RATELIMIT_WORK" || true
    fi
}
trap stop_all EXIT

# wait_http URL NAME LOG: until URL answers (120 s: LiteLLM starts slowly).
wait_http() {
    local i
    for i in $(seq 1 1200); do
        curl -fs -o /dev/null --max-time 1 "$1" && return 0
        sleep 0.1
    done
    tail -20 "$3" >&2 || true
    die "$2 did not come up ($1); log: $3"
}

header "upstream and proxies"
"${LOAD_CPU[@]}" nginx -c "$RUN/nginx.conf" -g 'daemon off;' 2>>"$RUN/nginx-error.log" &
PIDS+=($!)
# MAIN_PIDS, SIDE_PIDS: the processes whose CPU time counts for a target: its Envoy (or
# LiteLLM), and the ones beside it.
start_envoy() { # TARGET
    "${PROXY_CPU[@]}" "$ENVOY" -c "$RUN/envoy-$1.yaml" --concurrency 1 --disable-hot-restart \
        -l warning --log-path "$RUN/envoy-$1.log" &
    PIDS+=($!)
    MAIN_PIDS[$1]=$!
}
wait_http "http://127.0.0.1:$NGINX_PORT/" nginx "$RUN/nginx-error.log"
for t in "${ENVOY_TARGETS[@]}"; do start_envoy "$t"; done
if [ -n "$AIGW" ]; then
    log "starting AI Gateway's ext_proc server and its Envoy on core 1"
    # As its controller runs it beside Envoy (unix socket, root prefix /, no request size limit),
    # with pprof off and its admin server on a free port.
    DISABLE_PPROF=1 "${PROXY_CPU[@]}" "$AIGW" -configPath "$RUN/aigw-filterapi.yaml" \
        -extProcAddr "unix://$AIGW_SOCK" -adminPort "$AIGW_ADMIN" -logLevel info \
        -rootPrefix / >"$RUN/aigw-extproc.log" 2>&1 &
    PIDS+=($!)
    SIDE_PIDS[aigw]=$!
    wait_http "http://127.0.0.1:$AIGW_ADMIN/health" "AI Gateway ext_proc" "$RUN/aigw-extproc.log"
    start_envoy aigw
fi
for t in "${ENVOY_TARGETS[@]}" ${AIGW:+aigw}; do
    wait_http "http://127.0.0.1:${ADMIN[$t]}/ready" "Envoy $t" "$RUN/envoy-$t.log"
done
if [ -n "$LITELLM" ]; then
    log "starting LiteLLM (1 worker) on core 1"
    (cd "$RUN" && LITELLM_LOG=ERROR LITELLM_TELEMETRY=False NO_DOCS=True \
        exec "${PROXY_CPU[@]}" "$LITELLM" --config "$RUN/litellm.yaml" --host 127.0.0.1 \
        --port "${PORT[litellm]}" --num_workers 1) >"$RUN/litellm.log" 2>&1 &
    PIDS+=($!)
    MAIN_PIDS[litellm]=$!
    wait_http "http://127.0.0.1:${PORT[litellm]}/health/liveliness" LiteLLM "$RUN/litellm.log"
fi
if [ -n "$RATELIMIT_ADDR" ]; then
    for t in "${FILTER_TARGETS[@]}"; do
        SIDE_PIDS[$t]="$(cat "$RATELIMIT_WORK/ratelimit.pid" "$RATELIMIT_WORK/redis.pid")"
    done
fi
up=""
for t in "${TARGETS[@]}"; do up+="${up:+, }$t :${PORT[$t]}"; done
ok "nginx :$NGINX_PORT; $up"

# Each proxy really rewrites (path, model, key) and plain Envoy really does not.
header "check"
post() { # PORT HOST BODY-FILE
    curl -fsS --max-time 10 -H "Host: $2" -H 'Content-Type: application/json' \
        -H "Authorization: Bearer $CLIENT_KEY" -H 'x-user-id: bench-user' \
        --data-binary "@$3" "http://127.0.0.1:$1/v1/chat/completions"
}
# A BENCH_WASM/BENCH_NATIVE variant may rewrite less on purpose: then a missing rewrite warns.
# Such a target is marked in results.json ("unverified") and its budgets are not judged.
UNVERIFIED=()
check_failed() { # TARGET MESSAGE
    if [ -n "${BENCH_WASM:-}${BENCH_NATIVE:-}${BENCH_WASM_BASELINE:-}" ]; then
        warn "$2"
        [[ " ${UNVERIFIED[*]} " == *" $1 "* ]] || UNVERIFIED+=("$1")
    else
        die "$2"
    fi
}
for t in "${FILTER_TARGETS[@]}"; do
    seen="$(post "${PORT[$t]}" "$VERIFY_HOST" "$RUN/body-1KB.json")"
    grep -q '^POST /verified/chat/completions authorization=Bearer sk-bench-verify$' <<<"$seen" ||
        check_failed "$t" "$t did not rewrite path and key; nginx saw: $(head -1 <<<"$seen")"
    grep -q '"model":"bench-model"' <<<"$seen" || check_failed "$t" "$t did not rewrite the model"
done
seen="$(post "${PORT[plain]}" "$VERIFY_HOST" "$RUN/body-1KB.json")"
grep -q "^POST /v1/chat/completions authorization=Bearer $CLIENT_KEY\$" <<<"$seen" || die "plain Envoy rewrote: $seen"
grep -q '"model":"gpt-4o-mini"' <<<"$seen" || die "plain Envoy changed the body"
if [ -n "$AIGW" ]; then
    # The verifying backend is picked by the body's model: ext_proc must have set the header,
    # re-routed, and rewritten path, model and key for that backend.
    post "${PORT[aigw]}" "$LLM_HOST" "$RUN/body-verify-by-model.json" | grep -q '"total_tokens":29' ||
        die "no answer from AI Gateway's verifying backend; see $RUN/aigw-extproc.log"
    seen="$(tail -1 "$RUN/nginx-verify.log" 2>/dev/null)"
    grep -q '^POST /verified/chat/completions authorization=Bearer sk-bench-verify ' <<<"$seen" ||
        die "AI Gateway did not rewrite path and key; nginx saw: ${seen:0:200}"
    grep -qF '\"model\":\"bench-model\"' <<<"$seen" || die "AI Gateway did not override the model: $seen"
    ok "AI Gateway: nginx got $(cut -d' ' -f1-2 <<<"$seen"), the backend's key and model bench-model"
fi
for t in "${TARGETS[@]}"; do
    for size in "${SIZES[@]}"; do
        [ "$t" = litellm ] && [ "$size" != 1KB ] && continue
        post "${PORT[$t]}" "$LLM_HOST" "$RUN/body-$size.json" | grep -q '"total_tokens":29' ||
            die "no chat completion through $t for $size"
    done
done
ok "${FILTER_TARGETS[*]}${AIGW:+ and AI Gateway} checked${UNVERIFIED[*]:+ (${UNVERIFIED[*]} did not rewrite)}; plain Envoy passes the request as sent; every size answers"
for t in "${FILTER_TARGETS[@]}"; do
    [ "${TARGET_FALLBACK[$t]}" = 1 ] || continue
    # The chat cases really go through the aggregate cluster (one attempt each: nothing fails);
    # Envoy counts them on the sub-cluster that served them, `chat`, reached only that way.
    tried="$(curl -fsS "http://127.0.0.1:${ADMIN[$t]}/stats?filter=^cluster%5C.chat%5C.upstream_rq_total$" | sed 's/.*: //')"
    if [ "${tried:-0}" -gt 0 ]; then
        ok "$t: chat requests go through the fallback route ($tried so far)"
    else
        check_failed "$t" "$t: no request went through the fallback cluster"
    fi
done
if [ "${BENCH_LIMITED:-0}" = 1 ]; then
    # The chat cases really ask the service (and nothing was refused).
    asked="$(curl -fsS "http://127.0.0.1:${ADMIN[wasm]}/stats?filter=^cluster%5C.upstream%5C.ratelimit%5C.ok$" | sed 's/.*: //')"
    [ "${asked:-0}" -gt 0 ] || die "BENCH_LIMITED=1 but no request was checked by the rate limit service"
    counted="$(redis-cli -p "$(sed -n 's/^redis=.*://p' "$RATELIMIT_WORK/addresses")" --scan | head -1)"
    [ -n "$counted" ] || die "BENCH_LIMITED=1 but Redis holds no counter"
    ok "chat requests are checked and debited by the rate limit service ($asked checks so far; $counted)"
fi

# ---------------------------------------------------------------------------- measure
# cpu_ticks PIDS...: user+system CPU time of those processes and their children so far
# (LiteLLM's workers), in clock ticks.
CLK_TCK="$(getconf CLK_TCK)"
cpu_ticks() {
    local pid all=()
    for pid in "$@"; do all+=("$pid" $(pgrep -P "$pid" || true)); done
    [ ${#all[@]} -gt 0 ] || { echo 0 && return; }
    # Fields 14 and 15 of /proc/PID/stat, counted after the ")" that ends the command name.
    for pid in "${all[@]}"; do sed 's/.*) //' "/proc/$pid/stat" 2>/dev/null || true; done |
        awk '{t += $12 + $13} END {print t + 0}'
}
# wrk_run KIND SIZE TARGET ROUND CONNECTIONS [SECONDS]: one wrk run, one raw line (with the CPU
# ticks its processes spent during the run).
wrk_run() {
    local kind=$1 size=$2 target=$3 round=$4 conns=$5 secs=${6:-$DURATION} out t0 s0 t1 s1
    # shellcheck disable=SC2086 # the PID lists split on purpose
    t0="$(cpu_ticks ${MAIN_PIDS[$target]})" s0="$(cpu_ticks ${SIDE_PIDS[$target]:-})"
    out="$("${LOAD_CPU[@]}" wrk -t1 -c"$conns" -d"${secs}s" --timeout 30s --latency \
        -s "$RUN/post.lua" "http://127.0.0.1:${PORT[$target]}/v1/chat/completions" \
        -- "$RUN/body-$size.json" "$LLM_HOST" "$CLIENT_KEY" 2>&1)" || die "wrk failed: $out"
    # shellcheck disable=SC2086
    t1="$(cpu_ticks ${MAIN_PIDS[$target]})" s1="$(cpu_ticks ${SIDE_PIDS[$target]:-})"
    out="$(sed -n 's/^WRK_JSON //p' <<<"$out")"
    [ -n "$out" ] || die "wrk printed no result for $kind $size $target"
    printf '{"kind":"%s","size":"%s","target":"%s","round":%s,"cpu_s":%s,"side_cpu_s":%s,"wrk":%s}\n' \
        "$kind" "$size" "$target" "$round" \
        "$(awk -v a="$t0" -v b="$t1" -v hz="$CLK_TCK" 'BEGIN { print (b - a) / hz }')" \
        "$(awk -v a="$s0" -v b="$s1" -v hz="$CLK_TCK" 'BEGIN { print (b - a) / hz }')" \
        "$out" >>"$RAW"
}
# LiteLLM: 1 KB only. At ~50 req/s its 32 in-flight 64 KB and 1 MB requests outlast a run and
# starve the next one; after each run it gets time to drain.
skip_case() { [ "$1" = litellm ] && [ "$2" != 1KB ]; }

header "warm-up"
for t in "${TARGETS[@]}"; do
    for size in "${SIZES[@]}"; do
        skip_case "$t" "$size" && continue
        wrk_run warmup "$size" "$t" 0 32 1
    done
    if [ "$t" = litellm ]; then sleep 2; fi
done

# Memory: RSS and heap of each Envoy after warm-up, then MEM_REQUESTS 1 KB requests at 32
# connections.
rss_kb() { sed -n 's/^VmRSS:[[:space:]]*\([0-9]*\) kB/\1/p' "/proc/$1/status"; }
heap_bytes() { curl -fs "http://127.0.0.1:$1/memory" | python3 -c 'import json,sys; print(json.load(sys.stdin)["allocated"])'; }
memory_snapshot() { # PHASE
    local t
    for t in "${ENVOY_TARGETS[@]}"; do
        printf '{"kind":"memory","phase":"%s","target":"%s","rss_kb":%s,"heap":%s}\n' \
            "$1" "$t" "$(rss_kb "${MAIN_PIDS[$t]}")" "$(heap_bytes "${ADMIN[$t]}")" >>"$RAW"
    done
}
header "memory: $MEM_REQUESTS requests of 1 KB on each Envoy (${ENVOY_TARGETS[*]})"
memory_snapshot before
# wrk stops on time, not on a count: run long enough for MEM_REQUESTS at the warm-up's rate
# (plus 20%); the table reports how many were sent.
for t in "${ENVOY_TARGETS[@]}"; do
    secs="$(python3 - "$RAW" "$t" "$MEM_REQUESTS" <<'EOF'
import json, math, sys
raw, target, want = sys.argv[1], sys.argv[2], int(sys.argv[3])
w = [r["wrk"] for r in map(json.loads, open(raw))
     if r["kind"] == "warmup" and r["size"] == "1KB" and r["target"] == target][-1]
rate = w["requests"] / (w["duration_us"] / 1e6)
print(max(2, math.ceil(want / rate * 1.2)))
EOF
)"
    wrk_run memory-load 1KB "$t" 0 32 "$secs"
done
memory_snapshot after

header "rounds: $ROUNDS x ${DURATION}s per run (${TARGETS[*]})"
for round in $(seq 1 "$ROUNDS"); do
    order=("${TARGETS[@]}")
    if [ $((round % 2)) = 0 ]; then
        order=()
        for ((i = ${#TARGETS[@]} - 1; i >= 0; i--)); do order+=("${TARGETS[i]}"); done
    fi
    for size in "${SIZES[@]}"; do
        for kind in throughput latency; do
            for t in "${order[@]}"; do
                skip_case "$t" "$size" && continue
                wrk_run "$kind" "$size" "$t" "$round" "$([ "$kind" = throughput ] && echo 32 || echo 1)"
                if [ "$t" = litellm ]; then sleep 2; fi
            done
        done
    done
    log "round $round/$ROUNDS done"
done

header "streaming: $TTFE_RUNS runs"
ttfe_targets=""
for t in "${TARGETS[@]}"; do
    body="$RUN/body-stream.json"
    case "$t" in aigw | litellm) body="$RUN/body-stream-by-model.json" ;; esac
    ttfe_targets+="${ttfe_targets:+,}{\"name\":\"$t\",\"port\":${PORT[$t]},\"host\":\"$STREAM_HOST\",\"body\":\"$body\"}"
done
"${LOAD_CPU[@]}" python3 "$RUN/ttfe.py" "$TTFE_RUNS" "[$ttfe_targets]" "$CLIENT_KEY" >>"$RAW"
memory_snapshot end

# ---------------------------------------------------------------------------- report
target_list() { local t out=""; for t in "${TARGETS[@]}"; do out+="${out:+,}\"$t\":\"${TARGET_KIND[$t]}\""; done; echo "{$out}"; }
notes_json() { python3 -c 'import json,sys; print(json.dumps(sys.argv[1:]))' "${PEER_NOTES[@]}"; }
python3 - "$RUN/meta.json" <<EOF
import json, sys
json.dump({
    "date": "$(date -u +%Y-%m-%dT%H:%MZ)", "nproc": $NPROC,
    "cpu": "$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)",
    "load": "$(cut -d' ' -f1-3 /proc/loadavg)",
    "envoy": "$("$ENVOY" --version | sed -n 's/.*version: //p')", "rounds": $ROUNDS,
    "duration_s": $DURATION, "streaming_runs": $TTFE_RUNS, "memory_requests": $MEM_REQUESTS,
    "cores": "$CORES_NOTE", "sizes": "${SIZES[*]}".split(), "targets": $(target_list),
    "upstream": "nginx $(nginx -v 2>&1 | sed 's/.*nginx\///') (echo module for the stream), plain HTTP",
    "hold_headers": ${BENCH_HOLD_HEADERS:-1}, "model_routed": ${BENCH_MODEL_ROUTED:-0},
    "apm": ${BENCH_APM:-0}, "routed": ${BENCH_ROUTED:-0}, "fallback": ${BENCH_FALLBACK:-0},
    "limited": ${BENCH_LIMITED:-0}, "wasm": "$WASM",
    "wasm_baseline": "$WASM_BASELINE",
    "wasm_bytes": $([ -n "$WASM" ] && wc -c <"$WASM" || echo None),
    "native": "$NATIVE_SO", "native_bytes": $([ -n "$NATIVE_SO" ] && wc -c <"$NATIVE_SO" || echo None),
    "git": "$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src Cargo.toml Cargo.lock || echo -dirty)",
    "litellm": "$LITELLM_VERSION", "aigw": "$([ -n "$AIGW" ] && echo "$AIGW_VERSION ($AIGW)")",
    "notes": $(notes_json), "unverified": $(python3 -c 'import json,sys; print(json.dumps(sys.argv[1:]))' "${UNVERIFIED[@]}"),
}, open(sys.argv[1], "w"), indent=2)
EOF
python3 scripts/bench_report.py --raw "$RAW" --meta "$RUN/meta.json" --out "$RESULTS_JSON" --svg "$CHART"
ok "results: $RESULTS_JSON (raw runs: $RAW); chart: $CHART"
