#!/usr/bin/env bash
# A local Istio mesh in one command: istiod's own translation code (tests/istiod) configures a
# real Envoy 1.40 sidecar and a real Envoy 1.40 ingress gateway from what
# `llm-filter render istio` makes of your manifests. No Kubernetes; mock providers stand in for
# the real ones unless you name your own.
#
#   scripts/mesh.sh up [--manifests FILE] [--istio FILE]... [--provider HOST=IP:PORT]...
#                      [--provider-ca PEM] [--ratelimit IP:PORT [--ratelimit-failure open|closed]]
#                      [--native] [--work DIR]
#   scripts/mesh.sh reload [--work DIR]   render the same manifests again and push the change
#   scripts/mesh.sh down [--work DIR]     stop everything `up` started
#   scripts/mesh.sh build                 build the discovery server only; print its path
#
# up:
#   --manifests FILE  LLMProvider/LLMRoute manifests (repeatable; a directory means each of its
#                     *.yaml files). Each file is rendered on its own, as one configuration, with
#                     `render istio --wasm-url file://<the release .wasm>`. Default: the seeds'
#                     envoy/manifests/ (seed 001's mesh.yaml, seed 000's gateway.yaml).
#   --istio FILE      Istio resources and Kubernetes Services/Pods/Namespaces, applied verbatim
#                     (repeatable). Default: the seeds' Gateway istio-system/ingress-gw
#                     (istio/ingress-gw.yaml) and Service default/demo-llm-server
#                     (istio/demo-llm-server.yaml).
#   --provider HOST=IP:PORT  where the proxies reach provider HOST (repeatable). Without any,
#                     mock providers (examples/mock_stack.rs) answer for every provider host; what
#                     they receive is logged to DIR/mocks/mock.log.
#   --provider-ca PEM the CA that signed the providers' certificates (default: the mocks' CA;
#                     with --provider, none beyond the OS bundle). The proxies see it as part of
#                     their OS CA bundle, /etc/ssl/certs/ca-certificates.crt, which is what both
#                     forms of TLS origination verify against: istio-agent serves that file as
#                     the SDS secret file-root:system (DestinationRule SIMPLE without
#                     caCertificates), and the fallback clusters name it directly.
#   --ratelimit IP:PORT  Envoy's rate limit service (what `scripts/ratelimit.sh up` prints as
#                     ratelimit=), for manifests with budgets (`limits`): every file is rendered
#                     with `render istio --ratelimit ratelimit.istio-system.svc.cluster.local:8081`,
#                     and the mesh gets a ServiceEntry for that host, as a Kubernetes Service in
#                     front of the service's pods would be; the proxies reach it at IP:PORT
#                     through the same --endpoint override as the providers. Without it,
#                     manifests with budgets are refused.
#   --ratelimit-failure open|closed  passed on to `render istio` (default open).
#   --native          the filter as Envoy's native dynamic module: every file is rendered with
#                     `render istio --native` (EnvoyFilters inserting the module, no WasmPlugin),
#                     and the proxies run with the release libllm_filter.so mounted at
#                     /var/local/lib/llm-filter/ and ENVOY_DYNAMIC_MODULES_SEARCH_PATH naming that
#                     directory, what docs/native.md's pod annotations (a volume mount and
#                     proxyMetadata) give a sidecar or gateway in a cluster.
#   --work DIR        where state, logs and configs go (default: .work/mesh).
#
# It starts the discovery server, the sidecar (namespace default, labels app=sleep) and the
# gateway (namespace istio-system, labels istio=ingressgateway), waits until both proxies have
# warmed their listeners and accepted their ECDS filters (if any), and prints exactly these lines on
# stdout (everything else goes to stderr):
#   sidecar=IP:PORT  gateway=IP:PORT  sidecar_admin=IP:PORT  gateway_admin=IP:PORT  xds=IP:PORT
# It exits non-zero, naming the object and the reason, when Istio's validation refuses an object
# or a proxy rejects its configuration.
#
# What the local mesh adds around your files (DIR/config/local-mesh.yaml): a Sidecar resource
# that binds the sidecar's outbound listeners to a loopback address of its own (port 80, so
# `curl http://SIDECAR -H 'host: demo-llm-server'` is what `curl http://demo-llm-server` is in a
# pod), and the gateway's Service istio-system/istio-ingressgateway (port 80 to a free port,
# the translation a real install's gateway Service makes from 80 to 8080), and with --ratelimit
# the rate limit service's ServiceEntry. The proxies run in
# their own mount namespace with the release .wasm at /var/local/lib/wasm/llm_filter.wasm, where
# the EnvoyFilter form expects the mounted module (with --native: the release libllm_filter.so in
# /var/local/lib/llm-filter/), and the OS bundle plus --provider-ca at
# /etc/ssl/certs/ca-certificates.crt. Provider hosts reach --provider addresses
# through the discovery server's --endpoint override (see tests/istiod/endpoints.go).
#
# The seeds' key variables (DASHSCOPE_API_KEY, DASHSCOPE_VIP_API_KEY, MOONSHOT_API_KEY,
# DASHSCOPE_GATEWAY_API_KEY) default to the demo keys of scripts/render-configs.sh.
# LLM_FILTER_WASM, LLM_FILTER_NATIVE, LLM_FILTER_BIN and LLM_ISTIOD name prebuilt files (the
# release .wasm, the release libllm_filter.so, the llm-filter CLI, the discovery server) instead
# of building them.
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# Our five lines go to the real stdout (fd 3); every log line to stderr.
exec 3>&1 1>&2

usage() { sed -n '2,/^# shellcheck/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }

# The module path the EnvoyFilter form loads (src/bin/llm-filter/istio.rs MOUNTED_WASM).
MOUNTED_WASM=/var/local/lib/wasm/llm_filter.wasm
# Where --native mounts the dynamic module (istio.rs MOUNTED_NATIVE_DIR), the proxies'
# ENVOY_DYNAMIC_MODULES_SEARCH_PATH.
MOUNTED_NATIVE_DIR=/var/local/lib/llm-filter
OS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt
# The rate limit service as the mesh names it (envoyproxy/ratelimit's gRPC port); see --ratelimit.
RATELIMIT_HOST=ratelimit.istio-system.svc.cluster.local
RATELIMIT_PORT=8081

# _proxy MESH NAME MODULE ENVOY (internal): Envoy in a mount namespace of its own with the
# module mounted where the EnvoyFilter form expects it (a .so: in MOUNTED_NATIVE_DIR, which
# ENVOY_DYNAMIC_MODULES_SEARCH_PATH then names) and MESH/root/ca-bundle.pem as its OS CA
# bundle; working directory MESH/root (the SDS socket's relative path is istio-agent's).
run_proxy() {
    local mesh=$1 name=$2 module=$3 envoy=$4 target=$MOUNTED_WASM
    [ -d /var/local ] || mkdir -p /var/local
    [ -f "$OS_CA_BUNDLE" ] || die "$OS_CA_BUNDLE is missing (apt-get install ca-certificates)"
    case $module in
    *.so)
        target=$MOUNTED_NATIVE_DIR/$(basename "$module")
        export ENVOY_DYNAMIC_MODULES_SEARCH_PATH=$MOUNTED_NATIVE_DIR
        ;;
    *) unset ENVOY_DYNAMIC_MODULES_SEARCH_PATH ;;
    esac
    # shellcheck disable=SC2016 # the inner bash expands them
    exec unshare --mount --propagation private bash -c '
        set -e
        mount -t tmpfs -o size=16m llm-filter-module /var/local
        mkdir -p "$(dirname "$5")"
        : >"$5"
        mount --bind "$3" "$5"
        mount --bind "$1/root/ca-bundle.pem" "$6"
        cd "$1/root"
        exec "$4" -c "$1/$2.json" --concurrency 1 --use-dynamic-base-id \
            --admin-address-path "$1/$2.admin" --file-flush-interval-msec 100 --log-level info
    ' mesh-proxy "$mesh" "$name" "$module" "$envoy" "$target" "$OS_CA_BUNDLE"
}

COMMAND=${1:-}
[ $# -gt 0 ] && shift
if [ "$COMMAND" = _proxy ]; then
    run_proxy "$@"
fi
MESH=$WORK_DIR/mesh
MANIFESTS=()
ISTIO_FILES=()
PROVIDERS=()
PROVIDER_CA=""
RATELIMIT=""
RATELIMIT_FAILURE=""
NATIVE=""
while [ $# -gt 0 ]; do
    case $1 in
    --manifests | --istio | --provider | --provider-ca | --ratelimit | --ratelimit-failure | --work)
        [ $# -ge 2 ] || die "$1 needs a value"
        case $1 in
        --manifests) MANIFESTS+=("$2") ;;
        --istio) ISTIO_FILES+=("$2") ;;
        --provider) PROVIDERS+=("$2") ;;
        --provider-ca) PROVIDER_CA=$2 ;;
        --ratelimit) RATELIMIT=$2 ;;
        --ratelimit-failure) RATELIMIT_FAILURE=$2 ;;
        --work) MESH=$2 ;;
        esac
        shift 2
        ;;
    --native)
        NATIVE=1
        shift
        ;;
    -h | --help)
        usage
        exit 0
        ;;
    *) die "unknown argument $1 (see scripts/mesh.sh --help)" ;;
    esac
done
if [ -n "$RATELIMIT" ]; then
    [[ $RATELIMIT =~ ^([0-9]{1,3}\.){3}[0-9]{1,3}:[0-9]{1,5}$ ]] ||
        die "--ratelimit $RATELIMIT: expected IP:PORT (what scripts/ratelimit.sh up prints)"
fi
case $RATELIMIT_FAILURE in
"" | open | closed) ;;
*) die "--ratelimit-failure $RATELIMIT_FAILURE: expected open or closed" ;;
esac
[ -z "$RATELIMIT_FAILURE" ] || [ -n "$RATELIMIT" ] || die "--ratelimit-failure needs --ratelimit"
mkdir -p "$MESH"
MESH=$(cd "$MESH" && pwd)
PIDS_FILE=$MESH/pids
STATE=$MESH/state

# stop_recorded: stop the process groups in $PIDS_FILE (each started with setsid), checking
# first that each pid still runs one of ours (a stale file may name a reused pid).
stop_recorded() {
    [ -f "$PIDS_FILE" ] || return 0
    local pid name cmd
    while read -r pid name; do
        [ -n "$pid" ] || continue
        cmd="$(tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline")" || continue
        case $cmd in *"$MESH"*) ;; *) continue ;; esac
        kill -TERM -- "-$pid" 2>/dev/null || continue
        log "stopping $name (pid $pid)"
        for _ in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL -- "-$pid" 2>/dev/null || true
    done <"$PIDS_FILE"
    rm -f "$PIDS_FILE"
}

# start NAME LOG CMD...: CMD in its own session and process group, under a `sh` that waits for
# it (Envoy's launcher stops Envoy when its parent exits).
start() {
    local name=$1 logfile=$2
    shift 2
    # shellcheck disable=SC2016 # $@ and $! belong to the inner sh
    setsid sh -c '"$@" & wait "$!"' "mesh-$name" "$@" </dev/null >"$logfile" 2>&1 3>&- &
    printf '%s %s\n' "$!" "$name" >>"$PIDS_FILE"
    LAST_PID=$!
    log "started $name (pid $!, log ${logfile#"$REPO_ROOT"/})"
}

# wait_file FILE PID SECONDS WHAT: until FILE exists, while PID runs.
wait_file() {
    local file=$1 pid=$2 secs=$3 what=$4
    for _ in $(seq $((secs * 10))); do
        [ -s "$file" ] && return 0
        kill -0 "$pid" 2>/dev/null || return 1
        sleep 0.1
    done
    printf '%s not ready after %ss\n' "$what" "$secs" >&2
    return 1
}

# render_all: each manifest file through `render istio` into $MESH/config/rendered-N.yaml.
render_all() {
    local i=0 f out flags=(--wasm-url "file://$WASM")
    [ -z "$NATIVE" ] || flags=(--native)
    RENDERED=()
    if [ -n "$RATELIMIT" ]; then
        flags+=(--ratelimit "$RATELIMIT_HOST:$RATELIMIT_PORT")
        [ -z "$RATELIMIT_FAILURE" ] || flags+=(--ratelimit-failure "$RATELIMIT_FAILURE")
    fi
    for f in "${MANIFEST_FILES[@]}"; do
        i=$((i + 1))
        out=$MESH/config/rendered-$i-$(basename "$f")
        if ! "$LLM_FILTER" render istio "$f" "${flags[@]}" >"$out.tmp"; then
            rm -f "$out.tmp"
            printf 'llm-filter render istio %s failed (above)\n' "$f" >&2
            return 1
        fi
        mv "$out.tmp" "$out"
        RENDERED+=("$out")
    done
}

# The demo keys of scripts/render-configs.sh for the seeds' ${NAME} apiKeys, unless set.
export DASHSCOPE_API_KEY=${DASHSCOPE_API_KEY:-sk-demo-dashscope}
export DASHSCOPE_VIP_API_KEY=${DASHSCOPE_VIP_API_KEY:-sk-demo-dashscope-vip}
export MOONSHOT_API_KEY=${MOONSHOT_API_KEY:-sk-demo-moonshot}
export DASHSCOPE_GATEWAY_API_KEY=${DASHSCOPE_GATEWAY_API_KEY:-sk-demo-dashscope-gateway}

# tools: the release .wasm (with --native the release .so), the CLI and the discovery server
# (built unless given). MODULE: the file the proxies mount.
tools() {
    if [ -n "$NATIVE" ]; then
        if [ -n "${LLM_FILTER_NATIVE:-}" ]; then
            MODULE=$LLM_FILTER_NATIVE
        else
            ensure_toolchain
            cargo build --release --lib --features native || die "the dynamic module does not build"
            MODULE=${CARGO_TARGET_DIR:-$REPO_ROOT/target}/release/libllm_filter.so
        fi
        [ -f "$MODULE" ] || die "no dynamic module at $MODULE"
        MODULE=$(cd "$(dirname "$MODULE")" && pwd)/$(basename "$MODULE")
        WASM=""
    elif [ -n "${LLM_FILTER_WASM:-}" ]; then
        WASM=$LLM_FILTER_WASM
    else
        ensure_toolchain
        build_wasm
        WASM=$REPO_ROOT/$WASM_OUT
    fi
    if [ -z "$NATIVE" ]; then
        [ -f "$WASM" ] || die "no filter module at $WASM"
        WASM=$(cd "$(dirname "$WASM")" && pwd)/$(basename "$WASM")
        MODULE=$WASM
    fi
    if [ -n "${LLM_FILTER_BIN:-}" ]; then
        LLM_FILTER=$LLM_FILTER_BIN
    else
        cargo build --quiet --bin llm-filter
        LLM_FILTER="${CARGO_TARGET_DIR:-$REPO_ROOT/target}/debug/llm-filter"
    fi
    [ -x "$LLM_FILTER" ] || die "no llm-filter CLI at $LLM_FILTER"
    build_istiod || die "cannot build the discovery server (tests/istiod)"
}

# A loopback address of the sidecar's own, with nothing on port 80 yet.
pick_sidecar_ip() {
    local ip
    for _ in $(seq 50); do
        ip=127.$((RANDOM % 200 + 40)).$((RANDOM % 250 + 1)).$((RANDOM % 250 + 2))
        (exec 4<>"/dev/tcp/$ip/80") 2>/dev/null || {
            printf '%s\n' "$ip"
            return 0
        }
    done
    die "no free loopback address for the sidecar"
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("0.0.0.0", 0)); print(s.getsockname()[1])'
}

# The local mesh's own resources (see the header).
local_mesh() {
    cat <<EOF
# Written by scripts/mesh.sh for the local mesh, not part of what you deploy.
# The sidecar runs without iptables (INTERCEPTION_MODE NONE): its outbound listeners bind to
# $SIDECAR_IP, an address of its own on this machine.
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata:
  name: local-mesh-sidecar
  namespace: default
spec:
  workloadSelector:
    labels:
      app: sleep
  egress:
  - bind: $SIDECAR_IP
    hosts: ["*/*"]
---
# The gateway's Service: Gateway servers on port 80 listen on the pods' targetPort, as istiod
# translates them for a real ingress gateway (80 -> 8080).
apiVersion: v1
kind: Service
metadata:
  name: istio-ingressgateway
  namespace: istio-system
  labels:
    istio: ingressgateway
spec:
  selector:
    istio: ingressgateway
  ports:
  - name: http2
    port: 80
    targetPort: $GATEWAY_PORT
EOF
    [ -n "$RATELIMIT" ] || return 0
    cat <<EOF
---
# The rate limit service (--ratelimit), what a Kubernetes Service in front of its pods is in a
# cluster: \`render istio --ratelimit $RATELIMIT_HOST:$RATELIMIT_PORT\` points the proxies at
# Istio's cluster outbound|$RATELIMIT_PORT||$RATELIMIT_HOST for it (gRPC, so HTTP/2). Resolution DNS
# with the discovery server's --endpoint override to ${RATELIMIT}, not a STATIC endpoint: istiod
# takes a proxy whose IP is a ServiceEntry endpoint's address for an instance of that service, and
# here the gateway and the service share 127.0.0.1.
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: ratelimit
  namespace: istio-system
spec:
  hosts: [$RATELIMIT_HOST]
  location: MESH_INTERNAL
  resolution: DNS
  ports:
  - {name: grpc, number: $RATELIMIT_PORT, protocol: GRPC}
EOF
}

# istio-agent's SDS socket, relative to the proxies' working directory ($MESH/root) as in
# istio-agent's own bootstrap: an absolute path under a long --work DIR would exceed the 107 bytes
# of a UNIX socket path, which Envoy refuses.
SDS_SOCKET=./var/run/secrets/workload-spiffe-uds/socket

# proxy NAME TYPE IP POD NAMESPACE LABELS WORKLOAD: bootstrap and start one Envoy.
proxy() {
    local name=$1 type=$2 ip=$3 pod=$4 ns=$5 labels=$6 workload=$7
    "$ISTIOD" bootstrap --type "$type" --ip "$ip" --name "$pod" --namespace "$ns" \
        --labels "$labels" --workload "$workload" --xds "$XDS" \
        --sds "$SDS_SOCKET" >"$MESH/$name.json" ||
        die "bootstrap of the $name failed"
    rm -f "$MESH/$name.admin"
    start "$name" "$MESH/$name.log" bash "$REPO_ROOT/scripts/mesh.sh" _proxy "$MESH" "$name" "$MODULE" "$ENVOY"
}

up() {
    stop_recorded
    ensure_envoy
    ensure_cmd unshare util-linux
    ensure_cmd python3 python3
    ensure_cmd curl curl
    tools

    [ ${#MANIFESTS[@]} -gt 0 ] || MANIFESTS=("$REPO_ROOT/envoy/manifests")
    MANIFEST_FILES=()
    local m f
    for m in "${MANIFESTS[@]}"; do
        if [ -d "$m" ]; then
            for f in "$m"/*.yaml; do
                [ -f "$f" ] && MANIFEST_FILES+=("$(cd "$(dirname "$f")" && pwd)/$(basename "$f")")
            done
        elif [ -f "$m" ]; then
            MANIFEST_FILES+=("$(cd "$(dirname "$m")" && pwd)/$(basename "$m")")
        else
            die "--manifests $m: no such file or directory"
        fi
    done
    [ ${#MANIFEST_FILES[@]} -gt 0 ] || die "no manifests to render"
    [ ${#ISTIO_FILES[@]} -gt 0 ] ||
        ISTIO_FILES=("$REPO_ROOT/istio/ingress-gw.yaml" "$REPO_ROOT/istio/demo-llm-server.yaml")
    local abs=()
    for f in "${ISTIO_FILES[@]}"; do
        [ -f "$f" ] || die "--istio $f: no such file"
        abs+=("$(cd "$(dirname "$f")" && pwd)/$(basename "$f")")
    done
    ISTIO_FILES=("${abs[@]}")

    rm -rf "$MESH/config" "$MESH/root" "$MESH/mocks"
    mkdir -p "$MESH/config" "$MESH/root"
    render_all || exit 1
    SIDECAR_IP=$(pick_sidecar_ip)
    GATEWAY_PORT=$(free_port)
    local_mesh >"$MESH/config/local-mesh.yaml"
    CONFIGS=("${RENDERED[@]}" "${ISTIO_FILES[@]}" "$MESH/config/local-mesh.yaml")
    "$ISTIOD" validate "${CONFIGS[@]}" || exit 1

    local endpoints=() p ca=$PROVIDER_CA
    if [ ${#PROVIDERS[@]} -eq 0 ]; then
        local hosts=() host_args=()
        mapfile -t hosts < <("$ISTIOD" hosts "${RENDERED[@]}")
        for f in "${hosts[@]}"; do host_args+=(--host "$f"); done
        local mock_bin="${CARGO_TARGET_DIR:-$REPO_ROOT/target}/debug/examples/mock_stack"
        cargo build --quiet --example mock_stack
        mkdir -p "$MESH/mocks"
        start "mock providers" "$MESH/mocks/mock.log" "$mock_bin" --out "$MESH/mocks" "${host_args[@]}"
        wait_file "$MESH/mocks/ready" "$LAST_PID" 60 "the mock providers" || {
            tail -n 20 "$MESH/mocks/mock.log" >&2
            die "the mock providers did not start"
        }
        local addr
        addr=$(cat "$MESH/mocks/ready")
        for f in "${hosts[@]}"; do PROVIDERS+=("$f=$addr"); done
        [ -n "$ca" ] || ca=$MESH/mocks/ca.pem
    fi
    [ -z "$ca" ] || [ -f "$ca" ] || die "--provider-ca $ca: no such file"
    [ -f "$OS_CA_BUNDLE" ] || ensure_cmd update-ca-certificates ca-certificates
    # The proxies' OS bundle: this machine's, plus the providers' CA.
    cat "$OS_CA_BUNDLE" ${ca:+"$ca"} >"$MESH/root/ca-bundle.pem"
    ca=$MESH/root/ca-bundle.pem
    for p in "${PROVIDERS[@]}"; do endpoints+=(--endpoint "$p"); done
    [ -z "$RATELIMIT" ] || endpoints+=(--endpoint "$RATELIMIT_HOST=$RATELIMIT")

    local args=() c
    for c in "${CONFIGS[@]}"; do args+=(--config "$c"); done
    rm -f "$MESH/istiod.addr"
    start "discovery server" "$MESH/istiod.log" "$ISTIOD" serve "${args[@]}" --ca "$ca" \
        --root "$MESH/root" --addresses "$MESH/istiod.addr" "${endpoints[@]}"
    if ! wait_file "$MESH/istiod.addr" "$LAST_PID" 60 "the discovery server"; then
        grep -E 'error|istiod-local' "$MESH/istiod.log" | tail -n 5 >&2
        stop_recorded
        die "the discovery server did not start (log: $MESH/istiod.log)"
    fi
    XDS=$(sed -n 's/^xds=//p' "$MESH/istiod.addr")
    ISTIOD_ADMIN=$(sed -n 's/^admin=//p' "$MESH/istiod.addr")

    proxy sidecar sidecar "$SIDECAR_IP" sleep-local default app=sleep sleep
    local sidecar_pid=$LAST_PID
    proxy gateway router 127.0.0.1 istio-ingressgateway-local istio-system \
        istio=ingressgateway,app=istio-ingressgateway istio-ingressgateway
    local gateway_pid=$LAST_PID
    wait_file "$MESH/sidecar.admin" "$sidecar_pid" 30 "the sidecar" &&
        wait_file "$MESH/gateway.admin" "$gateway_pid" 30 "the gateway" || {
        tail -n 20 "$MESH/sidecar.log" "$MESH/gateway.log" >&2
        stop_recorded
        die "a proxy did not start"
    }
    SIDECAR_ADMIN=$(cat "$MESH/sidecar.admin")
    GATEWAY_ADMIN=$(cat "$MESH/gateway.admin")
    if ! "$ISTIOD" wait --timeout 60s --proxy "sidecar=$SIDECAR_ADMIN,$MESH/sidecar.log" \
        --proxy "gateway=$GATEWAY_ADMIN,$MESH/gateway.log"; then
        stop_recorded
        die "the proxies did not get their configuration (logs: $MESH/*.log)"
    fi
    # The gateway listens on 0.0.0.0:PORT, as an ingress gateway does: nothing else may serve
    # that port, or the kernel could hand connections to the other listener.
    local ours=0
    curl -fsS "http://$GATEWAY_ADMIN/listeners" | grep -q ":$GATEWAY_PORT\$" && ours=1
    if [ "$(ss -Hltn "sport = :$GATEWAY_PORT" | wc -l)" != "$ours" ]; then
        ss -ltnp "sport = :$GATEWAY_PORT" >&2
        stop_recorded
        die "port $GATEWAY_PORT is also served by another process"
    fi
    {
        printf 'MANIFEST_FILES=(%s)\n' "$(printf '%q ' "${MANIFEST_FILES[@]}")"
        printf 'LLM_FILTER=%q\nWASM=%q\nISTIOD_ADMIN=%q\n' "$LLM_FILTER" "$WASM" "$ISTIOD_ADMIN"
        printf 'RATELIMIT=%q\nRATELIMIT_FAILURE=%q\nNATIVE=%q\n' "$RATELIMIT" "$RATELIMIT_FAILURE" "$NATIVE"
    } >"$STATE"
    ok "local mesh up (istiod log: $MESH/istiod.log; proxies: $MESH/sidecar.log, $MESH/gateway.log)"
    printf 'sidecar=%s:80\ngateway=127.0.0.1:%s\nsidecar_admin=%s\ngateway_admin=%s\nxds=%s\n' \
        "$SIDECAR_IP" "$GATEWAY_PORT" "$SIDECAR_ADMIN" "$GATEWAY_ADMIN" "$XDS" >&3
}

# reload: render the manifests of `up` again (edit them first) and push through the discovery
# server; it validates everything and refuses an invalid change, keeping the old one serving.
reload() {
    [ -f "$STATE" ] || die "no local mesh in $MESH (scripts/mesh.sh up first)"
    # shellcheck disable=SC1090
    source "$STATE"
    render_all || exit 1
    local out status
    out=$(mktemp)
    status=$(curl -sS -o "$out" -w '%{http_code}' -X POST "http://$ISTIOD_ADMIN/reload") || status=000
    cat "$out" >&2
    rm -f "$out"
    [ "$status" = 200 ] || die "the discovery server refused the change (HTTP $status); the previous configuration keeps serving"
    ok "pushed"
}

case $COMMAND in
up) up ;;
reload) reload ;;
build)
    build_istiod >&2 || die "cannot build the discovery server (tests/istiod)"
    printf '%s\n' "$ISTIOD" >&3
    ;;
down)
    stop_recorded
    ok "local mesh in $MESH stopped"
    ;;
_proxy) run_proxy "${@}" ;;
-h | --help | "") usage ;;
*) die "unknown command $COMMAND (up, reload, down, build)" ;;
esac
