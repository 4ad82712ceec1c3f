#!/usr/bin/env bash
# Builds the PingApp service image without a registry: deploy/Dockerfile's
# target `prebuilt`, on the local base image, from binaries built on the host
# (none of the Dockerfile's builder stages runs).
#
#   bash deploy/local/build-image.sh [PROFILE]     PROFILE: debug (default) or release
#   bash deploy/local/build-image.sh --bin-dir DIR take DIR's binaries, build nothing
#                                                 (a test inside `cargo test` cannot
#                                                 run cargo on its own target dir)
#
# Builds the binaries first (`cargo build --workspace --bins`, as scripts/test does, with --release for
# release), strips their debug info into a staging folder (the build context),
# and tags the image $PINGAPP_IMAGE (deploy/local/images.env). The base image
# must exist: deploy/local/build-base-images.sh makes it.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
source "$HERE/lib.sh"
load_images

target_dir="${CARGO_TARGET_DIR:-$ROOT/target}"
bin_dir=""
profile="${1:-debug}"
case "$profile" in
    debug) cargo_args=() ;;
    release) cargo_args=(--release) ;;
    --bin-dir)
        bin_dir="${2:?--bin-dir needs a folder}"
        profile="binaries from $bin_dir"
        ;;
    *) echo "build-image: unknown profile '$profile' (debug or release)" >&2; exit 2 ;;
esac
require_podman
require objcopy "binutils (apt-get install binutils)"
podman_cmd image exists "$PINGAPP_BASE_IMAGE" ||
    { echo "build-image: $PINGAPP_BASE_IMAGE is missing: run deploy/local/build-base-images.sh" >&2; exit 1; }

if [ -z "$bin_dir" ]; then
    require cargo "the Rust toolchain (cargo)"
    (cd "$ROOT" && cargo build --workspace --locked --bins ${cargo_args[@]+"${cargo_args[@]}"})
    bin_dir="$target_dir/$profile"
fi

stage="$target_dir/image-context"
rm -rf "$stage"
mkdir -p "$stage/deploy/local/bin"
for bin in pingapp gateway presence recorder loadgen echo-server; do
    src="$bin_dir/$bin"
    [ -x "$src" ] || { echo "build-image: missing binary $src" >&2; exit 1; }
    objcopy --strip-debug "$src" "$stage/deploy/local/bin/$bin"
done

echo "build-image: podman build --target prebuilt ($profile) -> $PINGAPP_IMAGE"
old="$(podman_cmd image inspect -f '{{.Id}}' "$PINGAPP_IMAGE" 2>/dev/null || true)"
podman_cmd build --quiet -f "$ROOT/deploy/Dockerfile" --target prebuilt \
    --build-arg "RUNTIME_BASE=$PINGAPP_BASE_IMAGE" -t "$PINGAPP_IMAGE" "$stage" >/dev/null
# The image this one replaced would stay behind untagged, run after run.
if [ -n "$old" ] && ! podman_cmd image inspect -f '{{.RepoTags}}' "$old" 2>/dev/null | grep -q '[a-z]'; then
    podman_cmd rmi "$old" >/dev/null 2>&1 || true
fi
echo "build-image: $PINGAPP_IMAGE built"
