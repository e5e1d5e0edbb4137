#!/usr/bin/env bash
# Regenerates the shipped deployment files from the seeds' manifests, so they never drift from
# what `llm-filter render` makes of them:
#   envoy/mesh.yaml       envoy/manifests/mesh.yaml     + extend/local-service.yaml
#   envoy/gateway.yaml    envoy/manifests/gateway.yaml  + extend/rbac-deny.yaml (seed 000's
#                                                         security step) + local-service
#   envoy/jwt.yaml        envoy/manifests/gateway.yaml  + extend/jwt.yaml + local-service
#   envoy/ext-authz.yaml  envoy/manifests/gateway.yaml  + extend/ext-authz.yaml + local-service
#   envoy/budgets.yaml    envoy/manifests/budgets.yaml  + extend/jwt-user-id.yaml + local-service,
#                                                         --ratelimit 127.0.0.1:8081
#   envoy/ratelimit/budgets.yaml          `llm-filter render ratelimit` of the budgets
#   istio/mesh.yaml, istio/gateway.yaml   `llm-filter render istio` of the same manifests
#   istio/budgets.yaml                    `render istio --ratelimit` of the budgets
#   istio/crds.yaml                       `llm-filter crds`
# The manifests' ${NAME} apiKeys are expanded from the demo keys below (distinct, so tests can
# tell which key reached the provider).
#
#   scripts/render-configs.sh           write the files
#   scripts/render-configs.sh --check   render into a temp dir; fail with a diff if a committed
#                                       file is stale (scripts/test.sh runs this)
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

CHECK=0
case "${1:-}" in
"") ;;
--check) CHECK=1 ;;
*) die "usage: scripts/render-configs.sh [--check]" ;;
esac

export DASHSCOPE_API_KEY=sk-demo-dashscope
export DASHSCOPE_VIP_API_KEY=sk-demo-dashscope-vip
export MOONSHOT_API_KEY=sk-demo-moonshot
export DASHSCOPE_GATEWAY_API_KEY=sk-demo-dashscope-gateway

cargo build --quiet --bin llm-filter
BIN="${CARGO_TARGET_DIR:-$REPO_ROOT/target}/debug/llm-filter"
[ -x "$BIN" ] || die "cargo built llm-filter but $BIN is missing"

OUT_DIR=$(mktemp -d)
trap 'rm -rf "$OUT_DIR"' EXIT
GENERATED=() # repository paths rendered into $OUT_DIR

# render FILE ARGS...: `llm-filter ARGS...` into $OUT_DIR/FILE; stop on failure.
render() {
    local file=$1 err
    shift
    mkdir -p "$OUT_DIR/$(dirname "$file")"
    if ! "$BIN" "$@" >"$OUT_DIR/$file" 2>"$OUT_DIR/stderr"; then
        cat "$OUT_DIR/stderr" >&2
        die "llm-filter $* failed"
    fi
    GENERATED+=("$file")
}

# render_optional FILE ARGS...: like render, but a command the other half of the CLI has not
# implemented yet (a "not implemented yet" error, or no output at all) is skipped with a
# warning. Any other failure stops the script.
render_optional() {
    local file=$1
    shift
    mkdir -p "$OUT_DIR/$(dirname "$file")"
    if ! "$BIN" "$@" >"$OUT_DIR/$file" 2>"$OUT_DIR/stderr"; then
        if grep -q "not implemented yet" "$OUT_DIR/stderr"; then
            warn "skipping $file: llm-filter $1 $2 is not implemented yet"
            return 0
        fi
        cat "$OUT_DIR/stderr" >&2
        die "llm-filter $* failed"
    fi
    if [ ! -s "$OUT_DIR/$file" ]; then
        warn "skipping $file: llm-filter $* printed nothing (not implemented yet?)"
        return 0
    fi
    GENERATED+=("$file")
}

LOCAL=envoy/extend/local-service.yaml
render envoy/mesh.yaml render envoy envoy/manifests/mesh.yaml --extend "$LOCAL"
render envoy/gateway.yaml render envoy envoy/manifests/gateway.yaml \
    --extend envoy/extend/rbac-deny.yaml --extend "$LOCAL"
render envoy/jwt.yaml render envoy envoy/manifests/gateway.yaml \
    --extend envoy/extend/jwt.yaml --extend "$LOCAL"
render envoy/ext-authz.yaml render envoy envoy/manifests/gateway.yaml \
    --extend envoy/extend/ext-authz.yaml --extend "$LOCAL"
render envoy/budgets.yaml render envoy envoy/manifests/budgets.yaml \
    --extend envoy/extend/jwt-user-id.yaml --extend "$LOCAL" --ratelimit 127.0.0.1:8081
render envoy/ratelimit/budgets.yaml render ratelimit envoy/manifests/budgets.yaml
render_optional istio/mesh.yaml render istio envoy/manifests/mesh.yaml
render_optional istio/gateway.yaml render istio envoy/manifests/gateway.yaml
render istio/budgets.yaml render istio envoy/manifests/budgets.yaml \
    --ratelimit ratelimit.istio-system.svc.cluster.local:8081
render_optional istio/crds.yaml crds

if [ "$CHECK" = 0 ]; then
    for f in "${GENERATED[@]}"; do
        mkdir -p "$(dirname "$f")"
        if cmp -s "$OUT_DIR/$f" "$f"; then
            ok "$f (unchanged)"
        else
            cp "$OUT_DIR/$f" "$f"
            ok "$f (written)"
        fi
    done
    exit 0
fi

stale=()
for f in "${GENERATED[@]}"; do
    if [ ! -f "$f" ]; then
        printf '%s is not committed\n' "$f" >&2
        stale+=("$f")
    elif ! diff -u "$f" "$OUT_DIR/$f" >&2; then
        stale+=("$f")
    else
        ok "$f is current"
    fi
done
[ ${#stale[@]} -eq 0 ] ||
    die "stale generated files: ${stale[*]} (run scripts/render-configs.sh and commit them)"
