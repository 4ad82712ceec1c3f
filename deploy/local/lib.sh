# Shared by deploy/local/*.sh (sourced): podman with this machine's settings,
# and the missing-tool convention (exit 127 naming what to install).

missing() {
    printf '%s: FAIL: %s is not installed: install %s\n' "$(basename "$0")" "$1" "$2" >&2
    exit 127
}
require() {
    command -v "$1" >/dev/null 2>&1 || missing "$1" "$2"
}

# Podman refuses to start containers in sandboxes that forbid raising
# rlimits unless its default ulimits are cleared: a containers.conf of ours.
export CONTAINERS_CONF="${CONTAINERS_CONF:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/containers.conf}"

require_podman() {
    require podman "podman (apt-get install podman netavark aardvark-dns crun)"
}
podman_cmd() {
    podman "$@"
}
