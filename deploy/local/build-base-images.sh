#!/usr/bin/env bash
# Builds, from Debian packages, the two base images the local stack needs on
# a machine that reaches no image registry (deploy/README.md, "Without a
# registry"), and imports them into podman:
#
#   $PINGAPP_BASE_IMAGE    minbase + ca-certificates: the runtime base of
#                          the PingApp service image (deploy/Dockerfile's
#                          RUNTIME_BASE)
#   $PINGAPP_INFRA_IMAGE   NATS, PostgreSQL, HAProxy and Prometheus from
#                          Debian, for deploy/local/compose.podman.yml
#
# An image already present is kept (delete it, or pass --force, to rebuild).
# Needs root, mmdebstrap and podman (apt-get install mmdebstrap podman),
# and Debian's package mirror (the host's apt sources).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$HERE/lib.sh"
load_images

force=0
[ "${1:-}" = "--force" ] && force=1
require mmdebstrap "mmdebstrap (apt-get install mmdebstrap)"
require_podman

# The host's Debian mirror (deb822 or one-line sources), else the default.
mirror="$(grep -hoE 'https?://[^ ]+/debian/?( |$)' /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null | head -n 1 | tr -d ' ' || true)"
mirror="${mirror:-http://deb.debian.org/debian}"

# Smaller images: no docs, man pages or translations.
common=(
    --variant=minbase
    --aptopt='Apt::Install-Recommends "false"'
    --dpkgopt='path-exclude=/usr/share/man/*'
    --dpkgopt='path-exclude=/usr/share/doc/*'
    --dpkgopt='path-exclude=/usr/share/locale/*'
    --dpkgopt='path-include=/usr/share/locale/locale.alias'
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin'
)

build() { # IMAGE PACKAGES...
    local image="$1" pkgs="$2" tar
    if [ "$force" -eq 0 ] && podman_cmd image exists "$image"; then
        echo "build-base-images: $image present, kept"
        return
    fi
    tar="$(mktemp --suffix=.tar)"
    echo "build-base-images: mmdebstrap $PINGAPP_DEBIAN_SUITE ($pkgs) -> $image"
    mmdebstrap --quiet "${common[@]}" --include="$pkgs" "$PINGAPP_DEBIAN_SUITE" "$tar" "$mirror"
    podman_cmd import --change 'CMD ["/bin/bash"]' "$tar" "$image" >/dev/null
    rm -f "$tar"
    echo "build-base-images: $image built"
}

build "$PINGAPP_BASE_IMAGE" ca-certificates
build "$PINGAPP_INFRA_IMAGE" ca-certificates,curl,nats-server,postgresql,haproxy,prometheus
