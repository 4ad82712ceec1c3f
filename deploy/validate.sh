#!/usr/bin/env bash
# Validates PingApp's deployment files offline (no Docker daemon, no cluster).
#
#   bash deploy/validate.sh                 everything below
#   bash deploy/validate.sh compose         docker-compose.yml (+ the files it mounts)
#   bash deploy/validate.sh overlay NAME    k8s/overlays/NAME
#   bash deploy/validate.sh overlays        every overlay under k8s/overlays/
#   bash deploy/validate.sh prometheus      promtool check config / check rules /
#                                           test rules, every alert tested both ways
#   bash deploy/validate.sh dashboards      every metric the dashboards and rules
#                                           query is documented (deploy/check_metrics.py)
#
# Image names have one source, deploy/local/images.env: the compose default
# and every PingApp container of the rendered overlays must agree with it.
#
# Needs: promtool (Debian: apt-get install prometheus), docker-compose (Debian: apt-get install docker-compose; or Docker
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
    # The secrets are generated (deploy/secrets.sh), here into a temp dir.
    bash "$ROOT/deploy/secrets.sh" "$TMP/secrets" >/dev/null || fail "deploy/secrets.sh"
    (cd "$ROOT" && env -u PINGAPP_IMAGE -u RUST_LOG PINGAPP_SECRETS_DIR="$TMP/secrets" \
        "${compose[@]}" -f docker-compose.yml config -q) ||
        fail "docker-compose.yml is not valid for ${compose[*]}"
    say "no default passwords in docker-compose.yml, no anonymous Grafana"
    if grep -nE 'PASSWORD[^_]*:-|GF_AUTH_ANONYMOUS_ENABLED: *"?true' "$ROOT/docker-compose.yml"; then
        fail "docker-compose.yml has a default password or anonymous Grafana access"
    fi

    say "files mounted by docker-compose.yml exist (deploy/nats/secrets: as deploy/nats/gen-auth.py makes them)"
    local path n=0 secrets="$TMP/nats-secrets"
    python3 "$ROOT/deploy/nats/gen-auth.py" "$secrets" --gateways gateway-1,gateway-2 >/dev/null ||
        fail "deploy/nats/gen-auth.py failed (it needs python3 and openssl)"
    while read -r path; do
        case "$path" in
            ./deploy/nats/secrets | ./deploy/nats/secrets/*)
                [ -e "$secrets${path#./deploy/nats/secrets}" ] ||
                    fail "docker-compose.yml mounts $path, which deploy/nats/gen-auth.py does not make"
                ;;
            *) [ -e "$ROOT/$path" ] || fail "docker-compose.yml mounts $path, which does not exist" ;;
        esac
        n=$((n + 1))
    done < <(grep -oE '\./(deploy|k8s)/[^:" }]+' "$ROOT/docker-compose.yml" | grep -v '^\./deploy/secrets' | sort -u)
    [ "$n" -gt 0 ] || fail "found no ./deploy/ mounts in docker-compose.yml"
    [ -f "$ROOT/deploy/Dockerfile" ] || fail "deploy/Dockerfile is missing"

    say "the service image is \$PINGAPP_IMAGE of deploy/local/images.env"
    local want got
    want="$(image_name)"
    got="$(sed -nE 's/^ *image: \$\{PINGAPP_IMAGE:-([^}]+)\}.*/\1/p' "$ROOT/docker-compose.yml" | sort -u)"
    [ "$got" = "$want" ] || fail "docker-compose.yml's default image is '$got', deploy/local/images.env says '$want'"

    say "Grafana dashboards are JSON"
    local f
    for f in "$ROOT"/deploy/grafana/dashboards/*.json; do
        python3 -m json.tool "$f" >/dev/null || fail "$f is not valid JSON"
    done
    echo "compose: OK"
}

# PINGAPP_IMAGE from deploy/local/images.env.
image_name() {
    local v
    v="$(sed -n 's/^PINGAPP_IMAGE=//p' "$ROOT/deploy/local/images.env")"
    [ -n "$v" ] || fail "deploy/local/images.env sets no PINGAPP_IMAGE"
    printf '%s\n' "$v"
}

# The PingApp containers of a rendered overlay run the built image: as
# named (dev, local clusters load it as built) or retagged to a registry
# under the same repository name (prod).
check_images() { # RENDERED NAME
    python3 - "$1" "$2" "$(image_name)" <<'PY' || fail "k8s/overlays/$2: images do not match deploy/local/images.env"
import sys, yaml
rendered, overlay, want = sys.argv[1:]
repo = want.rsplit(":", 1)[0]
seen = 0
for doc in yaml.safe_load_all(open(rendered)):
    if not doc or doc.get("kind") not in ("Deployment", "StatefulSet"):
        continue
    name = doc["metadata"]["name"]
    if name not in ("pingapp-gateway", "pingapp-presence", "pingapp-recorder"):
        continue
    for c in doc["spec"]["template"]["spec"]["containers"]:
        seen += 1
        image = c["image"]
        ok = image == want if overlay == "dev" else image.rsplit(":", 1)[0].rsplit("/", 1)[-1] == repo
        if not ok:
            print(f"{name}/{c['name']}: image {image}, expected {want if overlay == 'dev' else 'REGISTRY/' + repo + ':TAG'}")
            sys.exit(1)
if seen < 3:
    print(f"found {seen} PingApp containers, expected at least 3")
    sys.exit(1)
print(f"{seen} PingApp containers run {want if overlay == 'dev' else repo}")
PY
}

check_prometheus() {
    require promtool "promtool (Debian: apt-get install prometheus)"
    require python3 "python3"
    say "promtool check config (deploy/prometheus.yml, rules from deploy/)"
    # The config names the rules by their path in the container.
    sed "s#/etc/prometheus/rules/\*\.yml#$ROOT/deploy/prometheus-rules.yml#" \
        "$ROOT/deploy/prometheus.yml" >"$TMP/prometheus.yml"
    grep -q "$ROOT/deploy/prometheus-rules.yml" "$TMP/prometheus.yml" ||
        fail "deploy/prometheus.yml no longer loads /etc/prometheus/rules/*.yml"
    promtool check config "$TMP/prometheus.yml" || fail "promtool check config"
    say "promtool check rules deploy/prometheus-rules.yml"
    promtool check rules "$ROOT/deploy/prometheus-rules.yml" || fail "promtool check rules"
    say "promtool test rules deploy/prometheus-rules.test.yml"
    promtool test rules "$ROOT/deploy/prometheus-rules.test.yml" || fail "promtool test rules"
    say "every alert has a firing and a not-firing test"
    python3 - "$ROOT/deploy/prometheus-rules.yml" "$ROOT/deploy/prometheus-rules.test.yml" <<'PY' || fail "alerts without unit tests"
import sys, yaml
rules, tests = (yaml.safe_load(open(p)) for p in sys.argv[1:])
alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
cases = [c for t in tests["tests"] for c in t.get("alert_rule_test", [])]
missing = []
for a in sorted(alerts):
    mine = [c for c in cases if c["alertname"] == a]
    if not any(c.get("exp_alerts") for c in mine):
        missing.append(f"{a}: no firing case")
    if not any(not c.get("exp_alerts") for c in mine):
        missing.append(f"{a}: no not-firing case")
print("\n".join(missing) or f"{len(alerts)} alerts, each tested firing and not firing")
sys.exit(1 if missing or not alerts else 0)
PY
    echo "prometheus: OK"
}

check_dashboards() {
    require python3 "python3"
    say "metrics queried by dashboards and rules are documented (deploy/check_metrics.py)"
    python3 "$ROOT/deploy/check_metrics.py" || fail "dashboards or rules query unknown metrics"
    echo "dashboards: OK"
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
    # Overlays read generated secrets (deploy/secrets.sh): render a copy
    # with fresh ones, never the checkout's own.
    local copy="$TMP/k8s-$name"
    cp -r "$ROOT/k8s" "$copy"
    rm -rf "$copy/overlays/$name/secrets"
    if grep -q 'secrets/' "$dir/kustomization.yaml"; then
        bash "$ROOT/deploy/secrets.sh" "$copy/overlays/$name/secrets" pingapp-postgres >/dev/null ||
            fail "deploy/secrets.sh for k8s/overlays/$name"
    fi
    kubectl kustomize "$copy/overlays/$name" >"$rendered" || fail "kustomize could not build k8s/overlays/$name"
    say "no committed passwords in k8s/ (generated Secrets only)"
    if grep -rniE 'password[=:] *[^$ ]|PASSWORD=[a-z0-9]' "$ROOT/k8s" --include=*.yaml | grep -v '^\s*#' | grep -vE ':[0-9]+: *#'; then
        fail "a password is committed under k8s/"
    fi
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

    say "network policies: default deny, bounded rules (deploy/check_networkpolicies.py)"
    python3 "$ROOT/deploy/check_networkpolicies.py" "$rendered" ||
        fail "k8s/overlays/$name: network policies (see above)"

    say "PingApp containers run the built image (deploy/local/images.env)"
    check_images "$rendered" "$name"
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
        check_prometheus
        check_dashboards
        overlays
        echo "deploy/validate.sh: all checks passed"
        ;;
    compose) check_compose ;;
    overlay)
        [ $# -eq 2 ] || fail "usage: deploy/validate.sh overlay NAME"
        check_overlay "$2"
        ;;
    overlays) overlays ;;
    prometheus) check_prometheus ;;
    dashboards) check_dashboards ;;
    -h | --help) sed -n '2,27p' "$0" ;;
    *) fail "unknown check '$1' (use: all, compose, prometheus, dashboards, overlay NAME, overlays)" ;;
esac
