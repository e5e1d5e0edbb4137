#!/usr/bin/env bash
# The filter measured against plain Envoy: a benchmark, not a test (scripts/test.sh
# does not run it, and nothing here fails on a missed target; the table says it).
#
#   scripts/bench.sh [--quick] [--rounds N] [--duration S] [--peers]
#
# One upstream (nginx from Debian, with its echo module for the streamed answer) and two Envoys
# with one worker each, made from one config template: "plain" (listener, route, cluster) and
# "filter" (the same plus llm-filter with a provider that rewrites path, model, stream and
# apiKey). Plain HTTP to nginx: TLS is not what is measured. Envoys (and LiteLLM) run on
# core 1, wrk, nginx and the timing client on core 0 (taskset; no pinning on a 1-core machine).
#
# Cases, in interleaved rounds (plain then filter in odd rounds, filter then plain in even ones,
# so neither always runs on a warmer machine), medians over rounds:
#   - chat bodies of 1 KB, 64 KB, 1 MB: throughput at 32 connections (wrk -t1 -c32) and
#     p50/p99 latency at 1 connection (wrk -t1 -c1 --latency);
#   - streaming: time from sending the request to the first SSE event (own client, new
#     connection per request, connect not timed), median over runs;
#   - Envoy CPU time per request during the throughput runs (/proc/PID/stat);
#   - Envoy RSS (/proc) and heap (admin /memory) before and after 100k 1 KB requests;
#   - the size of the release .wasm.
# --peers adds LiteLLM (pip, its own venv in .work/bench/litellm-venv, 1 worker, same nginx,
# its master key checked) for the 1 KB and streaming cases.
#
# Flags: --quick (1 round of 1 s, 5 streaming runs, 5k requests for memory: for development),
# --rounds N (default 5), --duration S (seconds per wrk run, default 5), --peers, --sizes LIST
# (some of 1KB,64KB,1MB; default all).
# Output: one Markdown table on stdout and .work/bench/results.json; logs in .work/bench/run/.
# Environment: BENCH_WASM=path measures that .wasm instead of building this tree's (to compare
# a variant), BENCH_RESULTS=path writes the JSON there instead, BENCH_MODEL_ROUTED=1 sends the
# chat cases through an LLMRoute rule that matches the body's model (routing at body time),
# BENCH_HOLD_HEADERS=0 lets the headers go at once (the Istio WasmPlugin way), BENCH_APM=1
# puts Envoy's AI Protocol Manager (which buffers the whole body first) before the filter,
# BENCH_ROUTED=1 sends the chat cases through an LLMRoute rule with one backend (the client
# calls the route's host, the filter picks the rule and rewrites for its provider),
# BENCH_FALLBACK=1 through the same rule with a fallback provider (an aggregate cluster, a retry
# policy and the filter's upstream part on every request; no provider fails): compare the two.
# BENCH_LIMITED=1 sends them through the same rule with a token budget per user (`limits`, the
# limit never reached): Envoy's rate limit filter, a check at request time and a debit when the
# stream is done, both gRPC calls to the rate limit service (scripts/ratelimit.sh, on core 0
# with the load) on Redis; compare it with BENCH_ROUTED=1. Every client request carries
# `x-user-id` either way.
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ROUNDS=5
DURATION=5
TTFE_RUNS=31
MEM_REQUESTS=100000
PEERS=0
SIZES=(1KB 64KB 1MB)
while [ $# -gt 0 ]; do
    case "$1" in
    --quick) ROUNDS=1 DURATION=1 TTFE_RUNS=5 MEM_REQUESTS=5000 ;;
    --rounds) ROUNDS="${2:?--rounds needs a number}" && shift ;;
    --duration) DURATION="${2:?--duration needs seconds}" && shift ;;
    --peers) PEERS=1 ;;
    --sizes) IFS=, read -r -a SIZES <<<"${2:?--sizes needs a list such as 1KB,64KB}" && shift ;;
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

BENCH_DIR="$WORK_DIR/bench"
RUN="$BENCH_DIR/run"
RAW="$RUN/raw.jsonl"
RESULTS_JSON="${BENCH_RESULTS:-$BENCH_DIR/results.json}"
ECHO_MODULE=/usr/lib/nginx/modules/ngx_http_echo_module.so
LLM_HOST=llm.bench.local       # the chat provider: path, model, stream false, apiKey
STREAM_HOST=stream.bench.local # the streaming provider: path, model, stream true, apiKey
VERIFY_HOST=verify.bench.local # nginx echoes what it got: proves the rewrite happened
# Every client request carries this key, as SDKs do: the filter replaces it with the
# provider's, plain Envoy passes it on, LiteLLM checks it (its master key).
CLIENT_KEY=sk-bench-client-key

# ---------------------------------------------------------------------------- tools
header "tools"
ensure_cmd wrk wrk
ensure_cmd nginx nginx
[ -f "$ECHO_MODULE" ] || apt_install libnginx-mod-http-echo
ensure_cmd taskset util-linux
ensure_cmd curl curl
ensure_toolchain
ensure_envoy
if [ -n "${BENCH_WASM:-}" ]; then
    # A candidate build to compare (e.g. a variant of the filter): measured instead of ours.
    [ -f "$BENCH_WASM" ] || die "BENCH_WASM=$BENCH_WASM is not a file"
    WASM="$(cd "$(dirname "$BENCH_WASM")" && pwd)/$(basename "$BENCH_WASM")"
    warn "measuring BENCH_WASM=$WASM, not this tree's build"
else
    build_wasm
    WASM="$REPO_ROOT/$WASM_OUT"
fi
ok "$(wrk --version 2>&1 | head -1 | cut -d' ' -f1-2), $(nginx -v 2>&1 | sed 's/.*: //')"

LITELLM=""
LITELLM_VERSION=""
LITELLM_NOTE=""
if [ "$PEERS" = 1 ]; then
    venv="$BENCH_DIR/litellm-venv"
    if [ ! -x "$venv/bin/litellm" ]; then
        log "pip install 'litellm[proxy]' into $venv (a few minutes)"
        if python3 -m venv "$venv" &&
            "$venv/bin/pip" install --quiet --disable-pip-version-check 'litellm[proxy]'; then
            :
        else
            LITELLM_NOTE="LiteLLM could not be installed from PyPI here; its column is skipped"
            warn "$LITELLM_NOTE"
        fi
    fi
    if [ -x "$venv/bin/litellm" ]; then
        LITELLM="$venv/bin/litellm"
        LITELLM_VERSION="$("$venv/bin/pip" show litellm 2>/dev/null | sed -n 's/^Version: //p')"
        ok "litellm $LITELLM_VERSION"
    fi
fi

# ---------------------------------------------------------------------------- cores
NPROC="$(nproc)"
if [ "$NPROC" -ge 2 ]; then
    PROXY_CPU=(taskset -c 1) # Envoys, LiteLLM
    LOAD_CPU=(taskset -c 0)  # wrk, nginx, the streaming client
    CORES_NOTE="proxies on core 1; wrk, nginx and the streaming client on core 0"
else
    PROXY_CPU=() LOAD_CPU=()
    CORES_NOTE="1 core: nothing pinned, proxy and load share it"
    warn "$CORES_NOTE"
fi

# ---------------------------------------------------------------------------- files
rm -rf "$RUN"
mkdir -p "$RUN/nginx-tmp"
: >"$RAW"

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
NGINX_PORT=$(free_port)
PLAIN_PORT=$(free_port) PLAIN_ADMIN=$(free_port)
FILTER_PORT=$(free_port) FILTER_ADMIN=$(free_port)
LITELLM_PORT=$(free_port)

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
# LiteLLM picks the deployment by model name; the streaming one points at the SSE server.
sed 's/"gpt-4o-mini"/"bench-stream"/' "$RUN/body-stream.json" >"$RUN/body-stream-litellm.json"

# The provider configuration the filter runs: every rewrite it can do, on every request. With
# BENCH_MODEL_ROUTED=1 the chat host is an LLMRoute whose rule matches the body's model.
CHAT_PROVIDER_HOST=$LLM_HOST
[ "${BENCH_MODEL_ROUTED:-0}" = 1 ] && CHAT_PROVIDER_HOST=chat.provider.bench.local
[ "${BENCH_FALLBACK:-0}" = 1 ] && BENCH_ROUTED=1
[ "${BENCH_LIMITED:-0}" = 1 ] && BENCH_ROUTED=1
[ "${BENCH_LIMITED:-0}" = 1 ] && [ "${BENCH_FALLBACK:-0}" = 1 ] &&
    die "BENCH_LIMITED and BENCH_FALLBACK each compare with BENCH_ROUTED: set one"
[ "${BENCH_ROUTED:-0}" = 1 ] && CHAT_PROVIDER_HOST=chat.provider.bench.local
[ "${BENCH_ROUTED:-0}" = 1 ] && [ "${BENCH_MODEL_ROUTED:-0}" = 1 ] &&
    die "BENCH_ROUTED/BENCH_FALLBACK and BENCH_MODEL_ROUTED measure different routes: set one"
FALLBACK_HOST=fallback.provider.bench.local
cat >"$RUN/manifests.yaml" <<EOF
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
# As `llm-filter render envoy` ships it: headers held until the body is checked (with Envoy's
# allow_on_headers_stop_iteration below). BENCH_HOLD_HEADERS=0 measures the Istio WasmPlugin
# way instead (headers go on at once, the body is rewritten on its own).
if [ "${BENCH_MODEL_ROUTED:-0}" = 1 ]; then
    cat >>"$RUN/manifests.yaml" <<EOF
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
    cat >>"$RUN/manifests.yaml" <<EOF
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
    [ "${BENCH_FALLBACK:-0}" = 1 ] &&
        echo "    fallback: { providers: [$FALLBACK_HOST] }" >>"$RUN/manifests.yaml"
    # A budget the run never spends (29 tokens an answer): every request is checked and debited.
    [ "${BENCH_LIMITED:-0}" = 1 ] &&
        echo "    limits: [{ name: per-user, tokens: 4000000000, per: minute, key: { header: x-user-id } }]" >>"$RUN/manifests.yaml"
fi
if [ "${BENCH_HOLD_HEADERS:-1}" = 1 ]; then
    printf -- '---\nsettings: { forwardAfterBody: true }\n' >>"$RUN/manifests.yaml"
    ALLOW_STOP=true
else
    ALLOW_STOP=false
fi

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

# envoy_config PORT ADMIN FILTER(0|1): the one template both Envoys are made from.
envoy_config() {
    local port=$1 admin=$2 with_filter=$3
    cat <<EOF
# Generated by scripts/bench.sh ($([ "$with_filter" = 1 ] && echo "with llm-filter" || echo "plain routing")).
admin:
  address: { socket_address: { address: 127.0.0.1, port_value: $admin } }
static_resources:
  listeners:
  - name: bench
    address: { socket_address: { address: 127.0.0.1, port_value: $port } }
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
    # BENCH_FALLBACK=1: what `llm-filter render envoy` emits for a rule with fallback (the
    # marked requests go to an aggregate cluster with a retry policy).
    if [ "$with_filter" = 1 ] && [ "${BENCH_FALLBACK:-0}" = 1 ]; then
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
    if [ "$with_filter" = 1 ]; then
        cat <<EOF
          - name: envoy.filters.http.wasm
            typed_config:
              '@type': type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
              config:
                name: llm-filter
                root_id: llm-filter
                allow_on_headers_stop_iteration: $ALLOW_STOP
                vm_config:
                  vm_id: llm-filter
                  runtime: envoy.wasm.runtime.v8
                  code: { local: { filename: $WASM } }
                configuration:
                  '@type': type.googleapis.com/google.protobuf.StringValue
                  value: |
$(sed 's/^/                    /' "$RUN/manifests.yaml")
EOF
    fi
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
    if [ "$with_filter" = 1 ] && [ "${BENCH_FALLBACK:-0}" = 1 ]; then
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
        - name: envoy.filters.http.wasm
          typed_config:
            '@type': type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
            config:
              name: llm-filter-upstream
              root_id: llm-filter-upstream
              vm_config:
                vm_id: llm-filter
                runtime: envoy.wasm.runtime.v8
                code: { local: { filename: $WASM } }
              configuration:
                '@type': type.googleapis.com/google.protobuf.StringValue
                value: |
$(sed 's/^/                  /' "$RUN/manifests.yaml")
        - name: envoy.filters.http.upstream_codec
          typed_config: { '@type': type.googleapis.com/envoy.extensions.filters.http.upstream_codec.v3.UpstreamCodec }
EOF
    fi
}
envoy_config "$PLAIN_PORT" "$PLAIN_ADMIN" 0 >"$RUN/envoy-plain.yaml"
envoy_config "$FILTER_PORT" "$FILTER_ADMIN" 1 >"$RUN/envoy-filter.yaml"

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
            return 200 '{"id":"chatcmpl-bench","object":"chat.completion","created":1735026073,"model":"bench-model","choices":[{"index":0,"message":{"role":"assistant","content":"Hello! How can I help you today?"},"finish_reason":"stop"}],"usage":{"prompt_tokens":20,"completion_tokens":9,"total_tokens":29}}';
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
stop_all() {
    local pid
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
start_envoy() { # NAME PORT ADMIN
    "${PROXY_CPU[@]}" "$ENVOY" -c "$RUN/envoy-$1.yaml" --concurrency 1 --disable-hot-restart \
        -l warning --log-path "$RUN/envoy-$1.log" &
    PIDS+=($!)
    eval "${1^^}_PID=$!"
}
start_envoy plain
start_envoy filter
wait_http "http://127.0.0.1:$NGINX_PORT/" nginx "$RUN/nginx-error.log"
wait_http "http://127.0.0.1:$PLAIN_ADMIN/ready" "plain Envoy" "$RUN/envoy-plain.log"
wait_http "http://127.0.0.1:$FILTER_ADMIN/ready" "filter Envoy" "$RUN/envoy-filter.log"
if [ -n "$LITELLM" ]; then
    log "starting LiteLLM (1 worker) on core 1"
    (cd "$RUN" && LITELLM_LOG=ERROR LITELLM_TELEMETRY=False NO_DOCS=True \
        exec "${PROXY_CPU[@]}" "$LITELLM" --config "$RUN/litellm.yaml" --host 127.0.0.1 \
        --port "$LITELLM_PORT" --num_workers 1) >"$RUN/litellm.log" 2>&1 &
    PIDS+=($!)
    wait_http "http://127.0.0.1:$LITELLM_PORT/health/liveliness" LiteLLM "$RUN/litellm.log"
fi
ok "nginx :$NGINX_PORT, plain Envoy :$PLAIN_PORT (pid $PLAIN_PID), filter Envoy :$FILTER_PORT (pid $FILTER_PID)${LITELLM:+, LiteLLM :$LITELLM_PORT}"

# The filter really rewrites (path, model, stream, key) and plain Envoy really does not.
header "check"
post() { # PORT HOST BODY-FILE
    curl -fsS --max-time 10 -H "Host: $2" -H 'Content-Type: application/json' \
        -H "Authorization: Bearer $CLIENT_KEY" \
        --data-binary "@$3" "http://127.0.0.1:$1/v1/chat/completions"
}
# A BENCH_WASM variant may rewrite less on purpose: then a missing rewrite is only a warning.
check_failed() { if [ -n "${BENCH_WASM:-}" ]; then warn "$*"; else die "$*"; fi; }
seen="$(post "$FILTER_PORT" "$VERIFY_HOST" "$RUN/body-1KB.json")"
grep -q '^POST /verified/chat/completions authorization=Bearer sk-bench-verify$' <<<"$seen" ||
    check_failed "filter Envoy did not rewrite path and key; nginx saw: $(head -1 <<<"$seen")"
grep -q '"model":"bench-model"' <<<"$seen" || check_failed "filter Envoy did not rewrite the model"
seen="$(post "$PLAIN_PORT" "$VERIFY_HOST" "$RUN/body-1KB.json")"
grep -q "^POST /v1/chat/completions authorization=Bearer $CLIENT_KEY\$" <<<"$seen" || die "plain Envoy rewrote: $seen"
grep -q '"model":"gpt-4o-mini"' <<<"$seen" || die "plain Envoy changed the body"
for port in "$PLAIN_PORT" "$FILTER_PORT" ${LITELLM:+"$LITELLM_PORT"}; do
    for size in "${SIZES[@]}"; do
        post "$port" "$LLM_HOST" "$RUN/body-$size.json" | grep -q '"total_tokens":29' ||
            die "no chat completion through :$port for $size"
    done
done
ok "filter rewrites path, model, key; plain Envoy passes the request as sent; every size answers"
if [ "${BENCH_FALLBACK:-0}" = 1 ]; then
    # The chat cases really go through the aggregate cluster (one attempt each: nothing fails);
    # Envoy counts them on the sub-cluster that served them, `chat`, reached only that way.
    tried="$(curl -fsS "http://127.0.0.1:$FILTER_ADMIN/stats?filter=^cluster%5C.chat%5C.upstream_rq_total$" | sed 's/.*: //')"
    [ "${tried:-0}" -gt 0 ] || die "BENCH_FALLBACK=1 but no request went through the fallback cluster"
    ok "chat requests go through the fallback route ($tried so far)"
fi
if [ "${BENCH_LIMITED:-0}" = 1 ]; then
    # The chat cases really ask the service (and nothing was refused).
    asked="$(curl -fsS "http://127.0.0.1:$FILTER_ADMIN/stats?filter=^cluster%5C.upstream%5C.ratelimit%5C.ok$" | sed 's/.*: //')"
    [ "${asked:-0}" -gt 0 ] || die "BENCH_LIMITED=1 but no request was checked by the rate limit service"
    counted="$(redis-cli -p "$(sed -n 's/^redis=.*://p' "$RATELIMIT_WORK/addresses")" --scan | head -1)"
    [ -n "$counted" ] || die "BENCH_LIMITED=1 but Redis holds no counter"
    ok "chat requests are checked and debited by the rate limit service ($asked checks so far; $counted)"
fi

# ---------------------------------------------------------------------------- measure
# cpu_ticks TARGET: user+system CPU time of that Envoy so far, in clock ticks (0 for others);
# target "service": the rate limit service and its Redis together (BENCH_LIMITED=1).
CLK_TCK="$(getconf CLK_TCK)"
cpu_ticks() {
    local pids
    case "$1" in
    plain) pids=$PLAIN_PID ;;
    filter) pids=$FILTER_PID ;;
    service) pids="$(cat "$RATELIMIT_WORK/ratelimit.pid" "$RATELIMIT_WORK/redis.pid")" ;;
    *) echo 0 && return ;;
    esac
    # Fields 14 and 15 of /proc/PID/stat, counted after the ")" that ends the command name.
    for pid in $pids; do sed 's/.*) //' "/proc/$pid/stat"; done | awk '{t += $12 + $13} END {print t}'
}
# wrk_run KIND SIZE TARGET ROUND PORT CONNECTIONS [SECONDS]: one wrk run, one raw line (with
# the Envoy's CPU ticks spent during the run).
wrk_run() {
    local kind=$1 size=$2 target=$3 round=$4 port=$5 conns=$6 secs=${7:-$DURATION} out t0 s0=0 s1=0
    t0="$(cpu_ticks "$target")"
    if [ -n "$RATELIMIT_ADDR" ] && [ "$target" = filter ]; then s0="$(cpu_ticks service)"; fi
    out="$("${LOAD_CPU[@]}" wrk -t1 -c"$conns" -d"${secs}s" --timeout 30s --latency \
        -s "$RUN/post.lua" "http://127.0.0.1:$port/v1/chat/completions" \
        -- "$RUN/body-$size.json" "$LLM_HOST" "$CLIENT_KEY" 2>&1)" || die "wrk failed: $out"
    out="$(sed -n 's/^WRK_JSON //p' <<<"$out")"
    [ -n "$out" ] || die "wrk printed no result for $kind $size $target"
    if [ -n "$RATELIMIT_ADDR" ] && [ "$target" = filter ]; then s1="$(cpu_ticks service)"; fi
    printf '{"kind":"%s","size":"%s","target":"%s","round":%s,"cpu_s":%s,"service_cpu_s":%s,"wrk":%s}\n' \
        "$kind" "$size" "$target" "$round" \
        "$(awk -v a="$t0" -v b="$(cpu_ticks "$target")" -v hz="$CLK_TCK" 'BEGIN { print (b - a) / hz }')" \
        "$(awk -v a="$s0" -v b="$s1" -v hz="$CLK_TCK" 'BEGIN { print (b - a) / hz }')" \
        "$out" >>"$RAW"
}
port_of() {
    case "$1" in plain) echo "$PLAIN_PORT" ;; filter) echo "$FILTER_PORT" ;; litellm) echo "$LITELLM_PORT" ;; esac
}
TARGETS=(plain filter)
[ -n "$LITELLM" ] && TARGETS+=(litellm)

header "warm-up"
for t in "${TARGETS[@]}"; do
    for size in "${SIZES[@]}"; do
        [ "$t" = litellm ] && [ "$size" != 1KB ] && continue
        wrk_run warmup "$size" "$t" 0 "$(port_of "$t")" 32 1
    done
    if [ "$t" = litellm ]; then sleep 2; fi
done

# Memory: RSS and heap after warm-up, then MEM_REQUESTS 1 KB requests at 32 connections.
rss_kb() { sed -n 's/^VmRSS:[[:space:]]*\([0-9]*\) kB/\1/p' "/proc/$1/status"; }
heap_bytes() { curl -fs "http://127.0.0.1:$1/memory" | python3 -c 'import json,sys; print(json.load(sys.stdin)["allocated"])'; }
memory_snapshot() { # PHASE
    printf '{"kind":"memory","phase":"%s","plain_rss_kb":%s,"filter_rss_kb":%s,"plain_heap":%s,"filter_heap":%s}\n' \
        "$1" "$(rss_kb "$PLAIN_PID")" "$(rss_kb "$FILTER_PID")" \
        "$(heap_bytes "$PLAIN_ADMIN")" "$(heap_bytes "$FILTER_ADMIN")" >>"$RAW"
}
header "memory: $MEM_REQUESTS requests of 1 KB on each Envoy"
memory_snapshot before
# wrk stops on time, not on a count: run long enough for MEM_REQUESTS at the warm-up's rate
# (plus 20%); the table reports how many were sent.
for t in plain filter; do
    secs="$(python3 - "$RAW" "$t" "$MEM_REQUESTS" <<'EOF'
import json, math, sys
raw, target, want = sys.argv[1], sys.argv[2], int(sys.argv[3])
w = [json.loads(l)["wrk"] for l in open(raw)
     if '"warmup"' in l and '"1KB"' in l and f'"{target}"' in l][-1]
rate = w["requests"] / (w["duration_us"] / 1e6)
print(max(2, math.ceil(want / rate * 1.2)))
EOF
)"
    wrk_run memory-load 1KB "$t" 0 "$(port_of "$t")" 32 "$secs"
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
                # LiteLLM: 1 KB only. At ~50 req/s its 32 in-flight 64 KB and 1 MB requests
                # outlast a run and starve the next one; after each run it gets time to drain.
                [ "$t" = litellm ] && [ "$size" != 1KB ] && continue
                wrk_run "$kind" "$size" "$t" "$round" "$(port_of "$t")" \
                    "$([ "$kind" = throughput ] && echo 32 || echo 1)"
                if [ "$t" = litellm ]; then sleep 2; fi
            done
        done
    done
    log "round $round/$ROUNDS done"
done

header "streaming: $TTFE_RUNS runs"
ttfe_targets="[{\"name\":\"plain\",\"port\":$PLAIN_PORT,\"host\":\"$STREAM_HOST\",\"body\":\"$RUN/body-stream.json\"},"
ttfe_targets+="{\"name\":\"filter\",\"port\":$FILTER_PORT,\"host\":\"$STREAM_HOST\",\"body\":\"$RUN/body-stream.json\"}"
[ -n "$LITELLM" ] && ttfe_targets+=",{\"name\":\"litellm\",\"port\":$LITELLM_PORT,\"host\":\"$STREAM_HOST\",\"body\":\"$RUN/body-stream-litellm.json\"}"
ttfe_targets+="]"
"${LOAD_CPU[@]}" python3 "$RUN/ttfe.py" "$TTFE_RUNS" "$ttfe_targets" "$CLIENT_KEY" >>"$RAW"
memory_snapshot end

# ---------------------------------------------------------------------------- report
ENVOY_VERSION_STRING="$("$ENVOY" --version | sed -n 's/.*version: //p')"
CPU_MODEL="$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)"
python3 - "$RAW" "$RESULTS_JSON" <<EOF
import json, statistics, sys
raw_path, out_path = sys.argv[1], sys.argv[2]
rows = [json.loads(line) for line in open(raw_path)]
peers = bool("$LITELLM")
meta = {
    "date": "$(date -u +%Y-%m-%dT%H:%MZ)", "nproc": $NPROC, "cpu": "$CPU_MODEL",
    "envoy": "$ENVOY_VERSION_STRING", "rounds": $ROUNDS, "duration_s": $DURATION,
    "streaming_runs": $TTFE_RUNS, "memory_requests": $MEM_REQUESTS, "cores": "$CORES_NOTE",
    "upstream": "nginx $(nginx -v 2>&1 | sed 's/.*nginx\///') (echo module for the stream), plain HTTP",
    "hold_headers": ${BENCH_HOLD_HEADERS:-1}, "model_routed": ${BENCH_MODEL_ROUTED:-0}, "apm": ${BENCH_APM:-0}, "routed": ${BENCH_ROUTED:-0}, "fallback": ${BENCH_FALLBACK:-0}, "limited": ${BENCH_LIMITED:-0}, "wasm": "$WASM", "wasm_bytes": $(wc -c <"$WASM"), "git": "$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src Cargo.toml Cargo.lock || echo -dirty)",
    "litellm": "$LITELLM_VERSION", "litellm_note": "$LITELLM_NOTE",
}
med = statistics.median
errors = []

def wrk(kind, size, target):
    got = {r["round"]: r["wrk"] for r in rows
           if r["kind"] == kind and r["size"] == size and r["target"] == target}
    for rnd, w in got.items():
        bad = sum(w["errors"].values())
        if bad or not w["requests"]:
            errors.append(f"{kind} {size} {target} round {rnd}: {w['requests']} requests, "
                          f"errors {w['errors']}")
    return got

def rps(w):
    return w["requests"] / (w["duration_us"] / 1e6)

cases = []
def case(name, unit, per_round, budget, check, better):
    """per_round: {target: {round: value}}; check(plain, filter, ratios, added) -> bool or None."""
    rounds = sorted(set(per_round["plain"]) & set(per_round["filter"]))
    p = med(per_round["plain"].values()); f = med(per_round["filter"].values())
    ratios = [per_round["filter"][r] / per_round["plain"][r] for r in rounds]
    added = [per_round["filter"][r] - per_round["plain"][r] for r in rounds]
    c = {"case": name, "unit": unit, "plain": p, "filter": f, "ratio": med(ratios),
         "ratios": ratios, "added": med(added), "added_per_round": added, "budget": budget,
         "per_round": per_round, "higher_is_better": better}
    if peers and per_round.get("litellm"):
        c["litellm"] = med(per_round["litellm"].values())
    ok = check(c)
    c["verdict"] = "—" if ok is None else ("meets" if ok else "misses")
    cases.append(c)

for size, tput_budget in (("1KB", 0.85), ("64KB", 0.70), ("1MB", None)):
    if size not in "${SIZES[*]}".split():
        continue
    tp = {t: {r: rps(w) for r, w in wrk("throughput", size, t).items()}
          for t in ("plain", "filter", "litellm")}
    case(f"{size} throughput, 32 conn", "req/s", tp,
         f"≥ {tput_budget:.2f} × plain" if tput_budget else "",
         (lambda c, b=tput_budget: None if b is None else c["ratio"] >= b), True)
    # Envoy CPU per request, from the same throughput runs: the cost with noise mostly removed.
    cpu = {t: {r["round"]: r["cpu_s"] * 1e6 / r["wrk"]["requests"] for r in rows
               if r["kind"] == "throughput" and r["size"] == size and r["target"] == t
               and r["wrk"]["requests"]}
           for t in ("plain", "filter")}
    case(f"{size} Envoy CPU per request", "µs", cpu, "", lambda c: None, False)
    if meta["limited"]:
        # The rate limit service and Redis, during the filter Envoy's throughput runs.
        service = [r["service_cpu_s"] * 1e6 / r["wrk"]["requests"] for r in rows
                   if r["kind"] == "throughput" and r["size"] == size and r["target"] == "filter"
                   and r["wrk"]["requests"]]
        cases[-1]["service_cpu_us"] = med(service) if service else None
    # How busy the Envoy's core was: near 1.0 means Envoy, not the load side, was the limit.
    cases[-1]["core_busy"] = {
        t: med([r["cpu_s"] / (r["wrk"]["duration_us"] / 1e6) for r in rows
                if r["kind"] == "throughput" and r["size"] == size and r["target"] == t])
        for t in ("plain", "filter")}
    lat = {t: wrk("latency", size, t) for t in ("plain", "filter", "litellm")}
    p50_budget = {"1KB": 40, "1MB": 2000}.get(size)
    case(f"{size} p50, 1 conn", "µs", {t: {r: w["p50_us"] for r, w in v.items()} for t, v in lat.items()},
         f"≤ +{p50_budget} µs" if p50_budget else "",
         (lambda c, b=p50_budget: None if b is None else c["added"] <= b), False)
    case(f"{size} p99, 1 conn", "µs", {t: {r: w["p99_us"] for r, w in v.items()} for t, v in lat.items()},
         "", lambda c: None, False)
ttfe = {t: {r["round"]: r["value"] for r in rows if r["kind"] == "ttfe" and r["target"] == t}
        for t in ("plain", "filter", "litellm")}
case("streaming: time to first event", "µs", ttfe, "≤ +200 µs", lambda c: c["added"] <= 200, False)

mem = {r["phase"]: r for r in rows if r["kind"] == "memory"}
sent = {r["target"]: r["wrk"]["requests"] for r in rows if r["kind"] == "memory-load"}
mem_case = {"case": f"Envoy RSS across {sent['filter']:,} requests (1 KB)", "unit": "MB", "requests": sent}
for t in ("plain", "filter"):
    mem_case[t] = (mem["after"][f"{t}_rss_kb"] - mem["before"][f"{t}_rss_kb"]) / 1024
    mem_case[t + "_heap_delta_mb"] = (mem["after"][f"{t}_heap"] - mem["before"][f"{t}_heap"]) / 2**20
mem_case["snapshots"] = mem
mem_case["budget"] = "± 5 MB"
mem_case["verdict"] = "meets" if abs(mem_case["filter"]) <= 5 else "misses"
wasm_kb = meta["wasm_bytes"] / 1000
size_case = {"case": "wasm binary (release)", "unit": "KB", "filter": wasm_kb, "budget": "≤ 300 KB",
             "verdict": "meets" if wasm_kb <= 300 else "misses"}

def num(v, unit):
    if v is None:
        return ""
    if unit == "req/s":
        return f"{v:,.0f} req/s"
    if unit == "µs":
        return f"{v / 1000:.2f} ms" if abs(v) >= 10000 else f"{v:.0f} µs"
    return f"{v:.1f} {unit}"

def rounds_text(vals, fmt):
    return ", ".join(fmt(v) for v in vals)

head = ["case", "plain Envoy", "with filter", "ratio (per round)", "budget", "verdict"]
if peers:
    head.insert(3, "LiteLLM")
lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
for c in cases:
    if c["unit"] == "req/s":
        ratio = f"×{c['ratio']:.2f} ({rounds_text(c['ratios'], lambda v: f'{v:.2f}')})"
    else:
        def plus(v):
            return f"{v / 1000:+.2f} ms" if abs(v) >= 10000 else f"{v:+.0f} µs"
        ratio = (f"{plus(c['added'])}, ×{c['ratio']:.2f} "
                 f"({rounds_text(c['added_per_round'], lambda v: plus(v).split(' ')[0])})")
    cells = [c["case"], num(c["plain"], c["unit"]), num(c["filter"], c["unit"]), ratio, c["budget"], c["verdict"]]
    if peers:
        cells.insert(3, num(c.get("litellm"), c["unit"]))
    lines.append("| " + " | ".join(cells) + " |")
def rss(t):
    return (f"{mem_case[t]:+.1f} MB ({mem['before'][t + '_rss_kb'] / 1024:.0f} → "
            f"{mem['after'][t + '_rss_kb'] / 1024:.0f} MB)")
cells = [mem_case["case"], rss("plain"), rss("filter"),
         f"heap {mem_case['plain_heap_delta_mb']:+.1f} / {mem_case['filter_heap_delta_mb']:+.1f} MB",
         mem_case["budget"], mem_case["verdict"]]
if peers:
    cells.insert(3, "")
lines.append("| " + " | ".join(cells) + " |")
cells = [size_case["case"], "", f"{meta['wasm_bytes']:,} bytes", "", size_case["budget"], size_case["verdict"]]
if peers:
    cells.insert(3, "")
lines.append("| " + " | ".join(cells) + " |")
table = "\n".join(lines)
print(table)
print()
for c in cases:
    if c.get("service_cpu_us") is not None:
        print(f"{c['case']}: plus {c['service_cpu_us']:.0f} µs in the rate limit service and Redis "
              "(median over rounds, during the filter Envoy's runs)")
print(f"{meta['date']}, {meta['nproc']} cores ({meta['cpu']}), Envoy {meta['envoy']}, "
      f"{meta['rounds']} rounds of {meta['duration_s']} s, {meta['streaming_runs']} streaming runs, "
      f"{meta['cores']}; git {meta['git']}")
if meta["litellm_note"]:
    print(meta["litellm_note"])
if errors:
    print("\nERRORS (non-2xx or socket errors; the numbers above are suspect):")
    for e in errors:
        print("  " + e)
json.dump({"meta": meta, "cases": cases + [mem_case, size_case], "errors": errors,
           "table": table}, open(out_path, "w"), indent=2, ensure_ascii=False)
EOF
ok "results: $RESULTS_JSON (raw runs: $RAW)"
