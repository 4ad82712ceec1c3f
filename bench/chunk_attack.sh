#!/usr/bin/env bash
# A hostile publisher pins memory in a gateway with incomplete chunked
# messages (issue 12): SETS sets announced as 1024 parts, PARTS parts of KIB
# KiB sent of each (nats-server's default max_payload is 1 MiB), on the
# broadcast subject the gateway subscribes to: 16 x 24 x 1000 KiB = 375 MiB
# by default, within the old reassembler's 16 sets.
# Measured for a baseline gateway binary and the gateway under test, each
# against a fresh anonymous nats-server: the gateway's VmRSS before, right
# after the attack, and WAIT seconds later, and the bytes its bus reports
# holding (pingapp_bus_chunk_bytes; the baseline has no such metric).
# RSS after the timer may stay above "before": the allocator keeps freed
# memory; the gauge shows what is still held.
#
# Usage: BASE=/path/to/baseline/gateway bash bench/chunk_attack.sh
#   env: BIN (default target/debug/gateway), SETS=16, PARTS=24, KIB=1000, WAIT=15
# Needs: nats-server (the test kit's choice: PINGAPP_NATS_SERVER or PATH),
# python3, curl. Loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=bench/lib.sh
source bench/lib.sh

BASE="${BASE:?set BASE to the baseline gateway binary, e.g. the gateway built from main}"
BIN="${BIN:-target/debug/gateway}"
SETS="${SETS:-16}"
PARTS="${PARTS:-24}"
KIB="${KIB:-1000}"
WAIT="${WAIT:-15}"
NATS_SERVER="${PINGAPP_NATS_SERVER:-$(command -v nats-server || echo /usr/sbin/nats-server)}"
OUT="$(mktemp -d /tmp/pingapp-chunks.XXXXXX)"
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT

rss_mib() { awk '/VmRSS/ {printf "%.1f", $2/1024}' "/proc/$1/status"; }
held() { curl -fsS "http://127.0.0.1:$1/metrics" | awk '/^pingapp_bus_chunk_bytes / {printf "%.1f", $2/1048576; f=1} END {if (!f) printf "n/a"}'; }

attack() { # PORT SUBJECT
    python3 bench/chunk_attacker.py "$1" "$2" "$SETS" "$PARTS" "$KIB"
}

run() { # LABEL BINARY
    local label=$1 bin=$2 nport admin listen dir
    nport=$(free_port) admin=$(free_port) listen=$(free_port)
    dir="$OUT/$label"
    mkdir -p "$dir"
    "$NATS_SERVER" -a 127.0.0.1 -p "$nport" -js -sd "$dir/store" >"$dir/nats.log" 2>&1 &
    PIDS+=($!)
    sleep 1
    "$bin" --listen "127.0.0.1:$listen" --admin-listen "127.0.0.1:$admin" \
        --nats-url "nats://127.0.0.1:$nport" --subject-prefix bench --gateway-id gw \
        >"$dir/gateway.log" 2>&1 &
    local gw=$!
    PIDS+=("$gw")
    for _ in $(seq 1 100); do
        curl -fsS "http://127.0.0.1:$admin/readyz" >/dev/null 2>&1 && break
        sleep 0.2
    done
    local before during after
    before=$(rss_mib "$gw")
    attack "$nport" bench.broadcast
    sleep 1
    during=$(rss_mib "$gw")
    local held_during
    held_during=$(held "$admin")
    sleep "$WAIT"
    after=$(rss_mib "$gw")
    printf '%-9s rss before %6s MiB  after the attack %6s MiB (held %s MiB)  %ss later %6s MiB (held %s MiB)\n' \
        "$label" "$before" "$during" "$held_during" "$WAIT" "$after" "$(held "$admin")"
    kill -TERM "$gw" 2>/dev/null || true
}

echo "attack: $SETS incomplete sets of $PARTS parts of $KIB KiB, $((SETS * PARTS * KIB / 1024)) MiB; logs in $OUT"
run baseline "$BASE"
run branch "$BIN"
