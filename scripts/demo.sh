#!/usr/bin/env bash
# The seeds' scenarios, live on this machine, with stand-ins for the LLM providers:
#   mock providers (examples/mock_stack.rs: TLS servers for dashscope.aliyuncs.com and
#   api.moonshot.cn that answer like them and print every request they receive),
#   a "mesh" Envoy   (envoy/mesh.yaml,    http://127.0.0.1:10000, admin :11000),
#   a "gateway" Envoy (envoy/gateway.yaml, http://127.0.0.1:10001, admin :11001) and
#   a "budgets" Envoy (envoy/budgets.yaml, http://127.0.0.1:10002, admin :11002) with Envoy's
#   rate limit service on Redis (scripts/ratelimit.sh, configured by envoy/ratelimit/budgets.yaml),
# all running the release llm-filter. Then it replays the seeds' curl requests, shows each
# request and answer, and spends a user's token budget until the gateway refuses.
#
#   scripts/demo.sh                 run the demo, stop everything it started
#   scripts/demo.sh --istio         the same requests through a local Istio mesh instead
#                                   (scripts/mesh.sh: istiod's translation of `render istio`'s
#                                   output, a real Envoy sidecar and ingress gateway)
#   scripts/demo.sh --keep-running  leave the stack up afterwards and print how to call it
#   scripts/demo.sh --stop          stop a stack left running by --keep-running
#
# Exits 0 only if every scenario answered as the seeds say (qwen-turbo for subscribers,
# moonshot-v1-8k among the demo-llm-server answers, `RBAC: access denied` for 127.0.0.2, ...)
# and the budget ran out (429 rate_limit_exceeded, also for a client claiming to be someone else).
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

DEMO_DIR="$WORK_DIR/demo"
PIDS_FILE="$WORK_DIR/demo.pids" # outside DEMO_DIR, which each run recreates
MESH_PORT=10000
GATEWAY_PORT=10001
BUDGETS_PORT=10002
RATELIMIT_WORK="$WORK_DIR/demo-ratelimit" # outside DEMO_DIR, which each run recreates
MESH="http://127.0.0.1:$MESH_PORT"
GATEWAY="http://127.0.0.1:$GATEWAY_PORT"
KEEP_RUNNING=0
STACK_UP=0
PIDS=()

usage() { sed -n '2,/^# shellcheck/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }

# Stop the processes recorded in $PIDS_FILE (each started with setsid: pid = process group),
# after checking that the pid still is one of ours (a stale file may name a reused pid).
stop_recorded() {
    [ -f "$PIDS_FILE" ] || return 0
    local pid name cmd
    while read -r pid name; do
        [ -n "$pid" ] || continue
        cmd="$(tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline")" || continue
        case $cmd in *envoy* | *mock_stack*) ;; *) continue ;; esac
        kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || continue
        log "stopping $name (pid $pid)" || true
        for _ in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL -- "-$pid" 2>/dev/null || true
    done <"$PIDS_FILE"
    rm -f "$PIDS_FILE"
}

stop_ratelimit() {
    [ -d "$RATELIMIT_WORK" ] || return 0
    bash scripts/ratelimit.sh down --work "$RATELIMIT_WORK" || true
}

ISTIO=0
MESH_WORK="$WORK_DIR/demo-mesh"
for arg in "$@"; do
    case $arg in
    --istio) ISTIO=1 ;;
    --keep-running) KEEP_RUNNING=1 ;;
    --stop)
        stop_recorded
        stop_ratelimit
        [ ! -d "$MESH_WORK" ] || bash scripts/mesh.sh down --work "$MESH_WORK"
        exit 0
        ;;
    -h | --help)
        usage
        exit 0
        ;;
    *)
        usage >&2
        exit 2
        ;;
    esac
done

cleanup() {
    local rc=$?
    trap - EXIT INT TERM PIPE
    set +e # stop everything even if printing fails (e.g. the reader of our output went away)
    if [ "$KEEP_RUNNING" = 1 ] && [ "$STACK_UP" = 1 ]; then
        exit "$rc"
    fi
    stop_recorded
    stop_ratelimit
    [ "$ISTIO" = 0 ] || bash scripts/mesh.sh down --work "$MESH_WORK" >/dev/null 2>&1
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 141' PIPE

# start NAME LOGFILE CMD...: run CMD in the background in its own session and process group,
# under a small `sh` that waits for it: Envoy stops itself (SIGTERM) when its parent exits,
# so with --keep-running its parent must outlive this script.
start() {
    local name=$1 logfile=$2
    shift 2
    # shellcheck disable=SC2016 # $@ and $! belong to the inner sh
    setsid sh -c '"$@" & wait "$!"' demo-stack "$@" </dev/null >"$logfile" 2>&1 &
    local pid=$!
    PIDS+=("$pid")
    printf '%s %s\n' "$pid" "$name" >>"$PIDS_FILE"
    log "started $name (pid $pid, log ${logfile#"$REPO_ROOT"/})"
    LAST_PID=$pid
}

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# wait_for NAME PID SECONDS CMD...: poll CMD until it succeeds while PID lives.
wait_for() {
    local name=$1 pid=$2 secs=$3
    shift 3
    for _ in $(seq $((secs * 10))); do
        "$@" >/dev/null 2>&1 && return 0
        kill -0 "$pid" 2>/dev/null || die "$name exited early (see its log above)"
        sleep 0.1
    done
    die "$name not ready after ${secs}s"
}

show_log_on_failure() {
    local f
    for f in "$@"; do
        [ -f "$f" ] || continue
        printf '\n--- last lines of %s ---\n' "${f#"$REPO_ROOT"/}" >&2
        tail -n 30 "$f" >&2
    done
}

# ---------------------------------------------------------------------------------------------
header "setup"
stop_recorded # a stack left by an earlier --keep-running
ensure_cmd curl curl
ensure_cmd python3 python3
if [ "$ISTIO" = 1 ]; then
    header "start the local Istio mesh (scripts/mesh.sh up)"
    mkdir -p "$DEMO_DIR"
    # Seed 000, step 5, with the address this demo's denied client uses.
    sed 's/203\.0\.113\.7/127.0.0.2/' istio/authorization-policy.yaml >"$DEMO_DIR/authorization-policy.yaml"
    MESH_OUT=$(bash scripts/mesh.sh up --work "$MESH_WORK" --istio istio/ingress-gw.yaml \
        --istio istio/demo-llm-server.yaml --istio "$DEMO_DIR/authorization-policy.yaml") ||
        die "scripts/mesh.sh up failed (above)"
    printf '%s\n' "$MESH_OUT"
    MESH="http://$(sed -n 's/^sidecar=//p' <<<"$MESH_OUT")"
    GATEWAY="http://$(sed -n 's/^gateway=//p' <<<"$MESH_OUT")"
    MESH_ADMIN="http://$(sed -n 's/^sidecar_admin=//p' <<<"$MESH_OUT")"
    GATEWAY_ADMIN="http://$(sed -n 's/^gateway_admin=//p' <<<"$MESH_OUT")"
    MOCK_LOG="$MESH_WORK/mocks/mock.log"
else
    stop_ratelimit
    for p in $MESH_PORT $GATEWAY_PORT $BUDGETS_PORT $((MESH_PORT + 1000)) $((GATEWAY_PORT + 1000)) $((BUDGETS_PORT + 1000)); do
        port_busy "$p" && die "port $p is in use (a stack from 'scripts/demo.sh --keep-running'? stop it with scripts/demo.sh --stop)"
    done
    ensure_toolchain
    ensure_envoy
    MESH_ADMIN="http://127.0.0.1:$((MESH_PORT + 1000))"
    GATEWAY_ADMIN="http://127.0.0.1:$((GATEWAY_PORT + 1000))"

    header "build"
    build_wasm
    ensure_ratelimit
    log "cargo build --example mock_stack"
    cargo build --quiet --example mock_stack

    header "start the stack"
    rm -rf "$DEMO_DIR" "$RATELIMIT_WORK"
    mkdir -p "$DEMO_DIR"
    # Fresh counters every run: the service's Redis keeps its data in $RATELIMIT_WORK.
    RATELIMIT_ADDR="$(bash scripts/ratelimit.sh up --config envoy/ratelimit/budgets.yaml \
        --work "$RATELIMIT_WORK" | sed -n 's/^ratelimit=//p')"
    [ -n "$RATELIMIT_ADDR" ] || die "scripts/ratelimit.sh up printed no ratelimit=ADDR:PORT"
    ok "rate limit service on $RATELIMIT_ADDR (logs ${RATELIMIT_WORK#"$REPO_ROOT"/}/)"
    MOCK_LOG="$DEMO_DIR/mock.log"
    start "mock providers" "$MOCK_LOG" cargo run --quiet --example mock_stack -- --out "$DEMO_DIR" \
        --config "envoy/mesh.yaml=$MESH_PORT" --config "envoy/gateway.yaml=$GATEWAY_PORT" \
        --config "envoy/budgets.yaml=$BUDGETS_PORT" --cluster "llm-ratelimit=$RATELIMIT_ADDR"
    MOCK_PID=$LAST_PID
    if ! (wait_for "mock providers" "$MOCK_PID" 120 test -f "$DEMO_DIR/ready"); then
        show_log_on_failure "$MOCK_LOG"
        exit 1
    fi
    for f in mesh.yaml gateway.yaml budgets.yaml; do
        [ -f "$DEMO_DIR/$f" ] || die "mock_stack did not write $DEMO_DIR/$f"
    done

    declare -A ENVOY_PID=()
    declare -A ENVOY_PORT=([mesh]=$MESH_PORT [gateway]=$GATEWAY_PORT [budgets]=$BUDGETS_PORT)
    for name in mesh gateway budgets; do
        start "$name Envoy" "$DEMO_DIR/envoy-$name.log" \
            "$ENVOY" -c "$DEMO_DIR/$name.yaml" --concurrency 1 --use-dynamic-base-id
        ENVOY_PID[$name]=$LAST_PID
    done
    for name in mesh gateway budgets; do
        port=${ENVOY_PORT[$name]}
        pid=${ENVOY_PID[$name]}
        if ! (wait_for "$name Envoy" "$pid" 60 curl -fsS "http://127.0.0.1:$((port + 1000))/ready"); then
            show_log_on_failure "$DEMO_DIR/envoy-$name.log"
            exit 1
        fi
        ok "$name Envoy ready on 127.0.0.1:$port"
    done
fi
STACK_UP=1

# ---------------------------------------------------------------------------------------------
ANSWERS="$DEMO_DIR/answers.txt"
: >"$ANSWERS"
BODY="$DEMO_DIR/body"
CHECKS_OK=()
CHECKS_BAD=()

check() { # check DESCRIPTION CONDITION...
    local what=$1
    shift
    if "$@"; then
        CHECKS_OK+=("$what")
        ok "$what"
    else
        CHECKS_BAD+=("$what")
        printf '%sFAILED%s %s\n' "$_RED$_BOLD" "$_RESET" "$what"
    fi
}

# How a shell user would type the argument.
quote() {
    case $1 in
    *[!A-Za-z0-9_./:=@+-]*) printf "'%s'" "${1//\'/\'\\\'\'}" ;;
    *) printf '%s' "$1" ;;
    esac
}
show_command() {
    local a line='$ curl'
    for a in "$@"; do line+=" $(quote "$a")"; done
    printf '%s%s%s\n' "$_BOLD" "$line" "$_RESET"
}

pretty() { python3 -m json.tool --no-ensure-ascii "$1" 2>/dev/null || cat "$1"; }
model_of() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1])).get("model", ""))' "$1" 2>/dev/null || true; }

# One mock log line (JSON) -> one readable line.
DESCRIBE_REQUEST='
import json, sys
for line in sys.stdin:
    try:
        r = json.loads(line)
        scheme = "https" if r.get("tls") else "http"
        stream = "(not set)" if r.get("stream") is None else json.dumps(r.get("stream"))
        print("  provider received: %s %s://%s%s" % (r["method"], scheme, r["host"], r["path"]))
        print("    model=%s stream=%s authorization=%s (%s, %s bytes)" % (
            r.get("model"), stream, r.get("authorization"),
            "TLS, SNI %s" % r.get("sni") if r.get("tls") else "plain HTTP", r.get("bytes")))
    except Exception:
        print("  provider received: " + line.rstrip())
'

MOCK_SEEN=0
# What the mock providers received since the last call (one JSON line per request).
show_provider_side() {
    sleep 0.2
    local total
    total=$(wc -l <"$MOCK_LOG")
    if [ "$total" -gt "$MOCK_SEEN" ]; then
        sed -n "$((MOCK_SEEN + 1)),${total}p" "$MOCK_LOG" | python3 -c "$DESCRIBE_REQUEST"
    else
        printf '  (nothing reached a provider)\n'
    fi
    MOCK_SEEN=$total
}

# call curl-args...: print the request, run it, print status and (pretty) answer.
# Sets STATUS; the answer is in $BODY and appended to $ANSWERS.
call() {
    show_command "$@"
    STATUS=$(curl -sS -o "$BODY" -w '%{http_code}' "$@") || STATUS=000
    printf -- '-> HTTP %s\n' "$STATUS"
    pretty "$BODY"
    printf '\n'
    cat "$BODY" >>"$ANSWERS"
    printf '\n' >>"$ANSWERS"
    show_provider_side
}

JSON=(-H 'content-type: application/json')
ASK_EN='{"messages":[{"role":"user","content":"Please introduce yourself."}]}'
ASK_ZH='{"messages":[{"role":"user","content":"请介绍你自己"}]}'
MOCK_SEEN=$(wc -l <"$MOCK_LOG")

header "(a) seed 001: call the provider host directly (LLMRoute dashscope-route, default rule)"
call "$MESH" -H 'host: dashscope.aliyuncs.com' "${JSON[@]}" --data "$ASK_EN"
check "(a) direct call answered 200 by model qwen1.5-72b-chat" \
    test "$STATUS/$(model_of "$BODY")" = 200/qwen1.5-72b-chat

header "(b) seed 001: the same as a subscriber (rule vip-route -> qwen-turbo)"
call "$MESH" -H 'host: dashscope.aliyuncs.com' -H 'user-type: subscriber' "${JSON[@]}" --data "$ASK_EN"
check "(b) subscriber answered 200 by model qwen-turbo" \
    test "$STATUS/$(model_of "$BODY")" = 200/qwen-turbo

header "(c) seed 001: 20 calls to demo-llm-server (50/50 DashScope / Moonshot)"
show_command "$MESH" -H 'host: demo-llm-server' "${JSON[@]}" --data "$ASK_EN"
declare -A COUNT=()
for _ in $(seq 20); do
    s=$(curl -sS -o "$BODY" -w '%{http_code}' "$MESH" -H 'host: demo-llm-server' "${JSON[@]}" --data "$ASK_EN") || s=000
    m=$(model_of "$BODY")
    [ "$s" = 200 ] || m="HTTP $s"
    COUNT["${m:-no model}"]=$((${COUNT["${m:-no model}"]:-0} + 1))
    cat "$BODY" >>"$ANSWERS"
    printf '\n' >>"$ANSWERS"
done
printf 'answers by model:\n'
for m in "${!COUNT[@]}"; do printf '  %-24s %2d of 20\n' "$m" "${COUNT[$m]}"; done
printf 'requests by provider host (what the mocks received):\n'
tail -n +"$((MOCK_SEEN + 1))" "$MOCK_LOG" | python3 -c '
import collections, json, sys
hosts = collections.Counter(json.loads(l).get("host") for l in sys.stdin if l.strip())
for host, n in sorted(hosts.items()):
    print("  %-24s %2d" % (host, n))' || true
MOCK_SEEN=$(wc -l <"$MOCK_LOG")
check "(c) both qwen1.5-72b-chat and moonshot-v1-8k answered, nothing else" \
    test "${COUNT[qwen1.5-72b-chat]:-0}" -gt 0 -a "${COUNT[moonshot-v1-8k]:-0}" -gt 0 \
    -a $((${COUNT[qwen1.5-72b-chat]:-0} + ${COUNT[moonshot-v1-8k]:-0})) -eq 20

header "(d) a streamed answer (\"stream\": true; dashscope.aliyuncs.com configures no stream)"
STREAM_ASK='{"messages":[{"role":"user","content":"Please introduce yourself."}],"stream":true}'
show_command -N "$MESH" -H 'host: dashscope.aliyuncs.com' "${JSON[@]}" --data "$STREAM_ASK"
curl -sS -N "$MESH" -H 'host: dashscope.aliyuncs.com' "${JSON[@]}" --data "$STREAM_ASK" |
    tee "$BODY" || true
printf '\n'
cat "$BODY" >>"$ANSWERS"
show_provider_side
check "(d) the answer arrived as server-sent events (data: lines)" grep -q '^data:' "$BODY"

header "(e) seed 000: through the gateway with host test.com (-> qwen-1.8b-chat)"
call "$GATEWAY" -H 'host: test.com' "${JSON[@]}" --data "$ASK_ZH"
check "(e) gateway answered 200 by model qwen-1.8b-chat" \
    test "$STATUS/$(model_of "$BODY")" = 200/qwen-1.8b-chat

header "(f) seed 000, step 5: the same from a denied client address (127.0.0.2)"
call --interface 127.0.0.2 "$GATEWAY" -H 'host: test.com' "${JSON[@]}" --data "$ASK_ZH"
check "(f) 127.0.0.2 got 403 RBAC: access denied" \
    grep -q 'RBAC: access denied' "$BODY"

# ---------------------------------------------------------------------------------------------
header "result"
for needle in qwen-turbo moonshot-v1-8k 'RBAC: access denied'; do
    check "the answers contain '$needle'" grep -qF "$needle" "$ANSWERS"
done
# Budgets need Envoy's rate limit service, which the local mesh does not run.
if [ "$ISTIO" = 0 ]; then
    header "(g) budgets: demo-user spends 200 tokens an hour on test.com, then the gateway refuses"
    BUDGETS="http://127.0.0.1:$BUDGETS_PORT"
    TOKEN="$(cat tests/data/jwt/demo.jwt)"
    AUTH=(-H "authorization: Bearer $TOKEN")
    printf 'envoy/budgets.yaml: jwt_authn sets x-user-id from the token'"'"'s subject (demo-user), the\n'
    printf 'llm-filter puts the request into that user'"'"'s budget, Envoy'"'"'s rate limit filter asks the\n'
    printf 'service on Redis (%s); each answer'"'"'s total_tokens is debited when it is done.\n' "$RATELIMIT_ADDR"
    show_command "$BUDGETS" -H 'host: test.com' -H 'authorization: Bearer <tests/data/jwt/demo.jwt>' "${JSON[@]}" --data "$ASK_ZH"
    SERVED=0
    STATUS=000
    for i in $(seq 30); do
        STATUS=$(curl -sS -D "$DEMO_DIR/headers" -o "$BODY" -w '%{http_code}' "$BUDGETS" -H 'host: test.com' \
            "${AUTH[@]}" "${JSON[@]}" --data "$ASK_ZH") || STATUS=000
        remaining=$(sed -n 's/^x-ratelimit-remaining: *\([0-9]*\).*/\1/Ip' "$DEMO_DIR/headers")
        tokens=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1])).get("usage", {}).get("total_tokens", "-"))' "$BODY" 2>/dev/null || echo -)
        printf '  request %2d -> HTTP %s  total_tokens=%s  x-ratelimit-remaining (before it)=%s\n' "$i" "$STATUS" "$tokens" "${remaining:--}"
        [ "$STATUS" = 200 ] || break
        SERVED=$((SERVED + 1))
        sleep 0.2 # the debit reaches the service when the answer is done
    done
    printf 'the refusal:\n'
    grep -i -E '^(retry-after|x-ratelimit-)' "$DEMO_DIR/headers" | sed 's/^/  /'
    pretty "$BODY"
    printf '\n'
    check "(g) demo-user was served ($SERVED answers), then refused with 429 rate_limit_exceeded" \
        test "$SERVED" -ge 2 -a "$STATUS" = 429 -a "$(grep -c rate_limit_exceeded "$BODY")" = 1
    show_provider_side
    show_command "$BUDGETS" -H 'host: test.com' -H 'authorization: Bearer <tests/data/jwt/demo.jwt>' -H 'x-user-id: someone-else' "${JSON[@]}" --data "$ASK_ZH"
    STATUS=$(curl -sS -o "$BODY" -w '%{http_code}' "$BUDGETS" -H 'host: test.com' "${AUTH[@]}" \
        -H 'x-user-id: someone-else' "${JSON[@]}" --data "$ASK_ZH") || STATUS=000
    printf -- '-> HTTP %s\n' "$STATUS"
    pretty "$BODY"
    printf '\n'
    show_provider_side
    check "(g) claiming to be someone else (x-user-id) does not help: 429" test "$STATUS" = 429
fi

printf 'logs:\n'
if [ "$ISTIO" = 1 ]; then
    printf '  %s\n' "${MESH_WORK#"$REPO_ROOT"/}"/*.log "${MOCK_LOG#"$REPO_ROOT"/}"
else
    printf '  %s\n' .work/demo/*.log
fi

if [ "$KEEP_RUNNING" = 1 ]; then
    cat <<EOF

The stack is still running (pids in ${PIDS_FILE#"$REPO_ROOT"/}):
  mesh Envoy     $MESH    admin $MESH_ADMIN
  gateway Envoy  $GATEWAY    admin $GATEWAY_ADMIN
${RATELIMIT_ADDR:+  budgets Envoy  http://127.0.0.1:$BUDGETS_PORT    admin http://127.0.0.1:$((BUDGETS_PORT + 1000))
  rate limit service $RATELIMIT_ADDR (scripts/ratelimit.sh, work dir ${RATELIMIT_WORK#"$REPO_ROOT"/})
}Try:
  curl -s $MESH -H 'host: demo-llm-server' -H 'content-type: application/json' --data '$ASK_EN'
  curl -s $MESH -H 'host: dashscope.aliyuncs.com' -H 'user-type: subscriber' --data '$ASK_EN'
  curl -s $GATEWAY -H 'host: test.com' --data '$ASK_ZH'
  tail -f ${MOCK_LOG#"$REPO_ROOT"/}     # what the providers receive
Stop it with: scripts/demo.sh --stop
EOF
fi

if [ ${#CHECKS_BAD[@]} -gt 0 ]; then
    die "${#CHECKS_BAD[@]} of $((${#CHECKS_OK[@]} + ${#CHECKS_BAD[@]})) checks failed"
fi
ok "all ${#CHECKS_OK[@]} checks passed"
