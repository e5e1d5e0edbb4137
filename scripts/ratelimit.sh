#!/usr/bin/env bash
# Envoy's rate limit service (github.com/envoyproxy/ratelimit) on Redis, on this machine, for the
# budgets (`limits`) of LLMRoute rules: what `llm-filter render envoy --ratelimit` points at.
#
#   scripts/ratelimit.sh up [--config FILE] [--work DIR]
#   scripts/ratelimit.sh down [--work DIR]
#
# up installs what is missing (redis-server and redis-tools from Debian, the service with
# `go install` at the version pinned in lib.sh), starts Redis and the service on free loopback
# ports, waits until both answer, and prints on stdout (everything else goes to stderr):
#
#   ratelimit=127.0.0.1:PORT   (the service's gRPC address: --ratelimit)
#   redis=127.0.0.1:PORT
#
# FILE is the service's configuration, as `llm-filter render ratelimit MANIFESTS` prints it
# (without one, the configuration already in DIR, else a domain with no limits). The service
# reloads it when its copy, DIR/runtime/ratelimit/config/llm-filter.yaml, changes. Redis keeps its counters in an append-only file in
# DIR/redis (fsync every second), so budgets survive a restart of Redis. up on a DIR that
# already runs stops that instance first; down stops both. DIR defaults to .work/ratelimit.
# Logs: DIR/redis.log, DIR/ratelimit.log. Environment: RATELIMIT_LOG_LEVEL (the service's
# LOG_LEVEL, default info), RATELIMIT_GRPC_PORT and RATELIMIT_REDIS_PORT (fixed ports instead
# of free ones).
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() { sed -n '2,/^# shellcheck/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }

command=${1:-}
[ $# -gt 0 ] && shift
CONFIG=""
WORK="$WORK_DIR/ratelimit"
while [ $# -gt 0 ]; do
    case "$1" in
    --config) CONFIG="${2:?--config needs a file}" && shift ;;
    --work) WORK="${2:?--work needs a directory}" && shift ;;
    -h | --help) usage && exit 0 ;;
    *) usage >&2 && die "unknown argument $1" ;;
    esac
    shift
done
mkdir -p "$WORK"
WORK="$(cd "$WORK" && pwd)"

# stop_pid FILE PATTERN: stop the process in FILE if it still runs PATTERN (a stale file may
# name a reused pid), then remove FILE.
stop_pid() {
    local file=$1 pattern=$2 pid cmd
    [ -f "$file" ] || return 0
    pid="$(cat "$file")"
    cmd="$(tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline")" || cmd=""
    case $cmd in
    *"$pattern"*)
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
        log "stopped $pattern (pid $pid)" >&2
        ;;
    esac
    rm -f "$file"
}

down() {
    stop_pid "$WORK/ratelimit.pid" service_cmd
    stop_pid "$WORK/redis.pid" redis-server
    rm -f "$WORK/addresses"
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# wait_until SECONDS PIDFILE NAME LOG CMD...: poll CMD while the process lives.
wait_until() {
    local secs=$1 pidfile=$2 name=$3 logfile=$4
    shift 4
    for _ in $(seq $((secs * 10))); do
        "$@" >/dev/null 2>&1 && return 0
        if ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then
            tail -n 20 "$logfile" >&2 || true
            die "$name exited (log: $logfile)"
        fi
        sleep 0.1
    done
    tail -n 20 "$logfile" >&2 || true
    die "$name not ready after ${secs}s (log: $logfile)"
}

up() {
    ensure_ratelimit >&2 || die "cannot install the rate limit service"
    down
    local redis_port grpc_port http_port debug_port config_dir
    redis_port=${RATELIMIT_REDIS_PORT:-$(free_port)}
    grpc_port=${RATELIMIT_GRPC_PORT:-$(free_port)}
    http_port=$(free_port)
    debug_port=$(free_port)
    config_dir="$WORK/runtime/ratelimit/config"
    mkdir -p "$WORK/redis" "$config_dir"
    if [ -n "$CONFIG" ]; then
        [ -f "$CONFIG" ] || die "--config $CONFIG: no such file"
        cp "$CONFIG" "$config_dir/llm-filter.yaml"
    elif [ ! -f "$config_dir/llm-filter.yaml" ]; then
        printf 'domain: llm-filter\ndescriptors: []\n' >"$config_dir/llm-filter.yaml"
    fi

    # Loopback only; no RDB snapshots, an append-only file instead (see the header).
    cat >"$WORK/redis.conf" <<EOF
bind 127.0.0.1
port $redis_port
protected-mode yes
daemonize no
dir $WORK/redis
appendonly yes
appendfsync everysec
save ""
EOF
    setsid redis-server "$WORK/redis.conf" </dev/null >"$WORK/redis.log" 2>&1 &
    echo $! >"$WORK/redis.pid"
    wait_until 10 "$WORK/redis.pid" redis "$WORK/redis.log" \
        sh -c "redis-cli -h 127.0.0.1 -p $redis_port ping | grep -q PONG"

    # The service's settings (src/settings/settings.go of the pinned version): every listener on
    # loopback, no statsd, Redis over TCP, the configuration read from $config_dir.
    setsid env USE_STATSD=false LOG_LEVEL="${RATELIMIT_LOG_LEVEL:-info}" LOG_FORMAT=text \
        HOST=127.0.0.1 PORT="$http_port" GRPC_HOST=127.0.0.1 GRPC_PORT="$grpc_port" \
        DEBUG_HOST=127.0.0.1 DEBUG_PORT="$debug_port" \
        REDIS_SOCKET_TYPE=tcp REDIS_URL="127.0.0.1:$redis_port" \
        RUNTIME_ROOT="$WORK/runtime" RUNTIME_SUBDIRECTORY=ratelimit RUNTIME_WATCH_ROOT=false \
        "$RATELIMIT_BIN" </dev/null >"$WORK/ratelimit.log" 2>&1 &
    echo $! >"$WORK/ratelimit.pid"
    wait_until 30 "$WORK/ratelimit.pid" "rate limit service" "$WORK/ratelimit.log" \
        sh -c "curl -fsS http://127.0.0.1:$http_port/healthcheck | grep -q OK"

    printf 'ratelimit=127.0.0.1:%s\nredis=127.0.0.1:%s\n' "$grpc_port" "$redis_port" | tee "$WORK/addresses"
    ok "rate limit service (gRPC 127.0.0.1:$grpc_port, logs $WORK/ratelimit.log) on redis 127.0.0.1:$redis_port" >&2
}

case "$command" in
up) up ;;
down) down ;;
-h | --help | "") usage ;;
*) usage >&2 && die "unknown command $command (up or down)" ;;
esac
