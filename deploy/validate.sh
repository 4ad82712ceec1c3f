#!/usr/bin/env bash
# Validates PingApp's deployment files offline (no Docker daemon, no cluster).
#
#   bash deploy/validate.sh                 everything below
#   bash deploy/validate.sh compose         docker-compose.yml (+ the files it mounts)
#   bash deploy/validate.sh overlay NAME    k8s/overlays/NAME
#   bash deploy/validate.sh overlays        every overlay under k8s/overlays/
#
# Needs: docker-compose (Debian: apt-get install docker-compose; or Docker
# Compose v2 as `docker compose`), kubectl (bundling kustomize v5), python3 and
# kubernetes-validate (pip install kubernetes-validate). A missing tool is an
# error (exit 127, naming what to install), never a skipped check.
#
# Kubernetes manifests are checked with `kubernetes-validate --strict` against
# the offline schemas of Kubernetes $PINGAPP_K8S_VERSION (default below).
# kubernetes-validate only warns, and passes, on kinds it has no schema for
# (CRDs like ServiceMonitor); deploy/validate_crds.py validates those against
# deploy/schemas/ and turns every other such warning into a failure.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
K8S_VERSION="${PINGAPP_K8S_VERSION:-1.32.0}"

say() { printf '== %s\n' "$*"; }
fail() {
    printf 'deploy/validate.sh: FAIL: %s\n' "$*" >&2
    exit 1
}
missing() {
    printf 'deploy/validate.sh: FAIL: %s is not installed: install %s\n' "$1" "$2" >&2
    exit 127
}
require() {
    command -v "$1" >/dev/null 2>&1 || missing "$1" "$2"
}

# The manifests use kustomize v5 features (labels with includeTemplates);
# older kubectl builds (e.g. Debian bookworm's kubernetes-client 1.20) bundle
# a kustomize that cannot build them.
require_kustomize_v5() {
    local v
    v="$(kubectl version --client -o json 2>/dev/null |
        python3 -c 'import json,sys; print(json.load(sys.stdin).get("kustomizeVersion", ""))' 2>/dev/null)"
    case "$v" in
        v[5-9].* | v[1-9][0-9]*.*) ;;
        *) missing "kustomize v5 in kubectl (kubectl bundles '${v:-unknown}')" "kubectl v1.27 or newer" ;;
    esac
}

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

check_compose() {
    local compose
    if command -v docker-compose >/dev/null 2>&1; then
        compose=(docker-compose)
    elif command -v docker >/dev/null 2>&1 && docker compose version >/dev/null 2>&1; then
        compose=(docker compose)
    else
        missing docker-compose "docker-compose (Debian: apt-get install docker-compose) or the Docker Compose v2 plugin"
    fi
    require python3 "python3"

    say "${compose[*]} config -q (docker-compose.yml)"
    # Interpolated variables are left at their defaults, as on a fresh checkout.
    (cd "$ROOT" && env -u PINGAPP_IMAGE -u POSTGRES_PASSWORD -u GRAFANA_ADMIN_PASSWORD -u RUST_LOG \
        "${compose[@]}" -f docker-compose.yml config -q) ||
        fail "docker-compose.yml is not valid for ${compose[*]}"

    say "files mounted by docker-compose.yml exist"
    local path n=0
    while read -r path; do
        [ -e "$ROOT/$path" ] || fail "docker-compose.yml mounts $path, which does not exist"
        n=$((n + 1))
    done < <(grep -oE '\./deploy/[^:" ]+' "$ROOT/docker-compose.yml" | sort -u)
    [ "$n" -gt 0 ] || fail "found no ./deploy/ mounts in docker-compose.yml"
    [ -f "$ROOT/deploy/Dockerfile" ] || fail "deploy/Dockerfile is missing"

    say "Grafana dashboards are JSON"
    local f
    for f in "$ROOT"/deploy/grafana/dashboards/*.json; do
        python3 -m json.tool "$f" >/dev/null || fail "$f is not valid JSON"
    done
    echo "compose: OK"
}

check_overlay() {
    local name="$1" dir="$ROOT/k8s/overlays/$1"
    [ -d "$dir" ] || fail "no overlay $dir"
    require python3 "python3"
    require kubectl "kubectl (v1.27 or newer, which bundles kustomize v5)"
    require_kustomize_v5
    require kubernetes-validate "kubernetes-validate (pip install kubernetes-validate)"

    say "kubectl kustomize k8s/overlays/$name"
    local rendered="$TMP/$name.yaml" kv_out="$TMP/$name.kubernetes-validate.txt" rc
    kubectl kustomize "$dir" >"$rendered" || fail "kustomize could not build k8s/overlays/$name"
    [ -s "$rendered" ] || fail "k8s/overlays/$name renders to nothing"

    say "kubernetes-validate --strict -k $K8S_VERSION (k8s/overlays/$name)"
    kubernetes-validate --strict -k "$K8S_VERSION" - <"$rendered" >"$kv_out" 2>&1
    rc=$?
    cat "$kv_out"
    [ "$rc" -eq 0 ] || fail "k8s/overlays/$name does not validate against Kubernetes $K8S_VERSION (exit $rc)"

    say "custom resources and unknown kinds (deploy/validate_crds.py)"
    python3 "$ROOT/deploy/validate_crds.py" "$rendered" "$kv_out"
    rc=$?
    [ "$rc" -eq 127 ] && exit 127
    [ "$rc" -eq 0 ] || fail "k8s/overlays/$name: custom resources or unknown kinds failed (see above)"
    echo "overlay $name: OK"
}

overlays() {
    local d found=0
    for d in "$ROOT"/k8s/overlays/*/; do
        [ -f "$d/kustomization.yaml" ] || continue
        found=1
        check_overlay "$(basename "$d")"
    done
    [ "$found" -eq 1 ] || fail "no overlays under k8s/overlays/"
}

case "${1:-all}" in
    all)
        check_compose
        overlays
        echo "deploy/validate.sh: all checks passed"
        ;;
    compose) check_compose ;;
    overlay)
        [ $# -eq 2 ] || fail "usage: deploy/validate.sh overlay NAME"
        check_overlay "$2"
        ;;
    overlays) overlays ;;
    -h | --help) sed -n '2,20p' "$0" ;;
    *) fail "unknown check '$1' (use: all, compose, overlay NAME, overlays)" ;;
esac
