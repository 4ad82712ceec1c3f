# Shared by deploy/local/*.sh (sourced): image names, podman with this
# machine's settings, and the missing-tool convention (exit 127 naming what
# to install).

# The image names of deploy/local/images.env, each unless the environment
# already sets it (a test names its own PINGAPP_IMAGE, so that parallel
# stacks built from different binaries do not share one tag).
load_images() {
    local key value
    while IFS='=' read -r key value; do
        case "$key" in '' | \#*) continue ;; esac
        [ -n "${!key:-}" ] || export "$key=$value"
    done <"$(dirname "${BASH_SOURCE[0]}")/images.env"
}

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
