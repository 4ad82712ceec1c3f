#!/usr/bin/env bash
# The compose stack without Docker and without an image registry:
# docker-compose.yml (plus deploy/local/compose.podman.yml) run by Debian's
# docker-compose against podman's Docker-compatible API.
#
#   bash deploy/local/stack.sh up        build what is missing, start the stack,
#                                        wait until every service is healthy
#   bash deploy/local/stack.sh down      remove everything `up` started: containers,
#                                        network, volumes, podman API service
#   bash deploy/local/stack.sh compose ARGS...   docker-compose on this stack
#                                        (ps, logs gateway-1, stop gateway-1, exec ...)
#
# Environment:
#   PINGAPP_STACK_PROJECT   compose project name (default pingapp): several
#                           stacks can run side by side under different names
#   PINGAPP_HTTP_PORT, PINGAPP_PROMETHEUS_PORT, PINGAPP_HAPROXY_STATS_PORT
#                           host ports (8000, 9090, 8404)
#   PINGAPP_BUILD_PROFILE   debug (default) or release: which host binaries go
#                           into the image (deploy/local/build-image.sh)
#   PINGAPP_BIN_DIR         take the binaries from this folder, build nothing
#
# Needs root, podman (+ netavark, aardvark-dns, runc), docker-compose,
# mmdebstrap, curl; scripts/setup-test-deps.sh installs them. A missing tool
# exits 127 naming what to install.
#
# Podman runs health checks from systemd timers; where there is no systemd
# (CI machines, containers) `up` starts a small loop that runs them instead,
# so compose's `depends_on: condition: service_healthy` works as with Docker.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
source "$HERE/lib.sh"
load_images

PROJECT="${PINGAPP_STACK_PROJECT:-pingapp}"
STATE="${PINGAPP_STACK_STATE:-/run/pingapp-stack/$PROJECT}"
# The services the local stack runs: every one with a Debian stand-in.
SERVICES=(nats postgres recorder presence gateway-1 gateway-2 lb prometheus)
export PINGAPP_IMAGE PINGAPP_INFRA_IMAGE
export DOCKER_HOST="unix://$STATE/podman.sock"
# docker-compose 1.29 would otherwise try BuildKit-less builds and TTY output.
export COMPOSE_INTERACTIVE_NO_CLI=1 DOCKER_BUILDKIT=0 COMPOSE_DOCKER_CLI_BUILD=0

log() { printf 'stack.sh: %s\n' "$*" >&2; }

# The stack's generated passwords (deploy/secrets.sh; `up` makes them):
# every compose command reads their files.
export PINGAPP_SECRETS_DIR="${PINGAPP_SECRETS_DIR:-$ROOT/deploy/secrets}"

compose() {
    docker-compose --ansi never -p "$PROJECT" --project-directory "$ROOT" \
        -f "$ROOT/docker-compose.yml" -f "$HERE/compose.podman.yml" "$@"
}

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# Podman's Docker-compatible API on a socket of this stack's own.
start_api() {
    mkdir -p "$STATE"
    pid_alive "$STATE/api.pid" && return
    rm -f "$STATE/podman.sock"
    podman system service --time=0 "unix://$STATE/podman.sock" >"$STATE/api.log" 2>&1 &
    echo $! >"$STATE/api.pid"
    for _ in $(seq 1 100); do
        [ -S "$STATE/podman.sock" ] && curl -fsS --unix-socket "$STATE/podman.sock" \
            http://d/_ping >/dev/null 2>&1 && return
        sleep 0.1
    done
    log "podman system service did not start: $(cat "$STATE/api.log")"
    exit 1
}

# Runs the health checks of this project's containers every 2 s, as
# podman's systemd timers would (see the header).
start_health_loop() {
    pid_alive "$STATE/health.pid" && return
    (
        while [ -d "$STATE" ]; do
            for id in $(podman ps -q --filter "label=com.docker.compose.project=$PROJECT" 2>/dev/null); do
                podman healthcheck run "$id" >/dev/null 2>&1 || true
            done
            sleep 2
        done
    ) </dev/null >/dev/null 2>&1 &
    echo $! >"$STATE/health.pid"
}

stop_pid() { # PIDFILE
    local pid
    [ -f "$1" ] || return 0
    pid="$(cat "$1")"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$1"
}

# Waits until every container of the project that has a health check is
# healthy (gateways included: compose itself waits only for dependencies).
wait_healthy() {
    local deadline=$((SECONDS + ${PINGAPP_STACK_TIMEOUT:-180})) pending
    while :; do
        pending=""
        for svc in "${SERVICES[@]}"; do
            id="$(compose ps -q "$svc" 2>/dev/null)"
            [ -n "$id" ] || { pending+=" $svc(no container)"; continue; }
            status="$(podman inspect -f '{{if .State.Healthcheck}}{{.State.Healthcheck.Status}}{{end}}' "$id" 2>/dev/null || true)"
            case "$status" in
                healthy | "") ;;
                *) pending+=" $svc($status)" ;;
            esac
        done
        [ -z "$pending" ] && return 0
        if [ "$SECONDS" -ge "$deadline" ]; then
            log "not healthy in time:$pending"
            compose ps >&2 || true
            return 1
        fi
        sleep 1
    done
}

tools() {
    require_podman
    require docker-compose "docker-compose (apt-get install docker-compose)"
    require curl "curl (apt-get install curl)"
    [ "$(id -u)" -eq 0 ] || { log "must run as root (rootful podman)"; exit 1; }
}

# NATS identities, permissions and TLS (docs/security.md, "The bus"), made
# once: deploy/nats/secrets is not committed. Later runs keep the seeds and
# the CA.
nats_identities() {
    if [ ! -f "$ROOT/deploy/nats/secrets/auth.conf" ]; then
        log "generating NATS identities in deploy/nats/secrets"
    fi
    python3 "$ROOT/deploy/nats/gen-auth.py" "$ROOT/deploy/nats/secrets" \
        --gateways gateway-1,gateway-2 --seed-mode 644 >/dev/null
}

up() {
    tools
    bash "$HERE/build-base-images.sh"
    if [ -n "${PINGAPP_BIN_DIR:-}" ]; then
        bash "$HERE/build-image.sh" --bin-dir "$PINGAPP_BIN_DIR"
    else
        bash "$HERE/build-image.sh" "${PINGAPP_BUILD_PROFILE:-debug}"
    fi
    nats_identities
    # Random passwords, once (kept across runs): no default password.
    bash "$ROOT/deploy/secrets.sh" "$PINGAPP_SECRETS_DIR"
    start_api
    start_health_loop
    log "docker-compose up ($PROJECT): ${SERVICES[*]}"
    compose up -d --no-build "${SERVICES[@]}"
    wait_healthy
    local http="${PINGAPP_HTTP_PORT:-8000}"
    [[ "$http" == *:* ]] || http="localhost:$http"
    log "up: pages on http://$http/, Prometheus on http://127.0.0.1:${PINGAPP_PROMETHEUS_PORT:-9090}/"
}

down() {
    tools
    local rc=0 left
    if [ -d "$STATE" ]; then
        start_api
        compose down -v --remove-orphans --timeout 30 || rc=$?
    fi
    stop_pid "$STATE/health.pid"
    stop_pid "$STATE/api.pid"
    rm -rf "$STATE"
    # Whatever compose could not remove (a failed `up`), by its project label.
    left="$(podman ps -aq --filter "label=com.docker.compose.project=$PROJECT")"
    [ -z "$left" ] || podman rm -f -t 10 $left >/dev/null || rc=1
    left="$(podman volume ls -q --filter "label=com.docker.compose.project=$PROJECT")"
    [ -z "$left" ] || podman volume rm -f $left >/dev/null || rc=1
    left="$(podman network ls -q --filter "label=com.docker.compose.project=$PROJECT")"
    [ -z "$left" ] || podman network rm -f $left >/dev/null || rc=1
    return "$rc"
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    compose)
        shift
        tools
        start_api
        compose "$@"
        ;;
    *)
        sed -n '2,30p' "$0"
        exit 2
        ;;
esac
