#!/usr/bin/env bash
# Installs what deploy/validate.sh (and so `cargo test -p pingapp --test deploy`)
# needs, on Debian/Ubuntu. Idempotent; run as root or with sudo available.
#   docker-compose        Debian package (1.29 on bookworm); Docker Compose v2 works too
#   kubernetes-validate   PyPI, offline Kubernetes JSON schemas (brings PyYAML, jsonschema)
#   kubectl               v1.27+ (bundles kustomize v5); not installed here: Debian
#                         bookworm's kubernetes-client is 1.20, too old
#   promtool              Debian package prometheus (deploy/validate.sh prometheus)
# The compose system test needs more (podman, mmdebstrap, ...):
# scripts/setup-test-deps.sh installs everything the tests need.
set -euo pipefail

KUBERNETES_VALIDATE_VERSION="${KUBERNETES_VALIDATE_VERSION:-1.37.0}"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

if command -v docker-compose >/dev/null 2>&1 ||
    { command -v docker >/dev/null 2>&1 && docker compose version >/dev/null 2>&1; }; then
    echo "compose: present"
else
    $SUDO apt-get update
    # No recommends: `config` needs no Docker daemon.
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends docker-compose
fi

if command -v promtool >/dev/null 2>&1; then
    echo "promtool: present"
else
    $SUDO apt-get update
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus
fi

if command -v kubernetes-validate >/dev/null 2>&1; then
    echo "kubernetes-validate: present ($(kubernetes-validate --version))"
else
    python3 -m pip install --quiet "kubernetes-validate==${KUBERNETES_VALIDATE_VERSION}"
fi

if ! command -v kubectl >/dev/null 2>&1; then
    echo "install-tools.sh: kubectl is missing: install kubectl v1.27 or newer" >&2
    exit 127
fi
echo "kubectl: $(kubectl version --client 2>/dev/null | tr '\n' ' ')"
