#!/usr/bin/env bash
# Presence's NATS traffic: messages and bytes per second on the bus with
# presence and 1 or 3 gateways over a local nats-server, N public v2
# clients (loadgen) spread round robin over the gateways, measured from
# nats-server's /varz (in_msgs, in_bytes, out_msgs, out_bytes) over a
# window of WINDOW seconds (default 60: two of presence's 30 s periodic
# roster broadcasts).
#
# Modes (clients ping once a second; the pongs never touch the bus):
#   rest   no delay reports, no churn: what presence costs when nothing
#          changes (heartbeats, empty tick reports, periodic roster
#          broadcasts, the lease);
#   churn  as rest, plus CHURN (default 20) clients a second closing and
#          connecting again as new clients (loadgen --churn).
# Delay reports are left out on purpose: they are per-tick changes, the
# same before and after this change (bench/scale_out.sh measures them).
#
# Usage: BIN=target/release bash bench/presence_bus.sh
#   env: CASES="NAME:GATEWAYS:CLIENTS:MODE ..." WINDOW=60 CHURN=20 OUT=/tmp/...
# Run it once with the binaries of the version before (BIN=...) and once
# with these, on the same machine, and compare the tables.
# Needs: release binaries gateway, presence, loadgen in BIN (built if
# missing), nats-server on PATH, python3, curl. Loopback only; no Postgres
# and no recorder (without delay reports there are no samples).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=bench/lib.sh
source bench/lib.sh

WINDOW="${WINDOW:-60}"
CHURN="${CHURN:-20}"
RAMP="${RAMP:-500}"
CASES="${CASES:-rest-1gw-c1000:1:1000:rest rest-3gw-c1000:3:1000:rest rest-1gw-c5000:1:5000:rest rest-3gw-c5000:3:5000:rest churn-1gw-c1000:1:1000:churn churn-3gw-c1000:3:1000:churn churn-1gw-c5000:1:5000:churn churn-3gw-c5000:3:5000:churn}"
OUT="${OUT:-$(mktemp -d /tmp/pingapp-presence-bus.XXXXXX)}"
BIN="${BIN:-target/release}"
mkdir -p "$OUT"

need_release_binaries "$BIN" gateway presence loadgen
need_tools nats-server curl
max_clients=$(for c in $CASES; do echo "$c" | cut -d: -f3; done | sort -n | tail -1)
need_open_files $((max_clients + 1000))

PREFIX="bench$$"
trap 'set +e; stop_stack' EXIT
trap 'exit 130' INT TERM
start_nats
start_presence
echo "nats $NATS_URL (monitor $NATS_MON); output in $OUT" >&2

# varz FILE: the time and nats-server's counters, as JSON.
varz() { echo "{\"t\":$(date +%s.%N),\"v\":$(curl -fs "http://127.0.0.1:$NATS_MON/varz")}" >"$1"; }

run_case() { # name gateways clients mode
    local name=$1 ngw=$2 clients=$3 mode=$4 i urls=() flags=()
    GW_PIDS=()
    for (( i=0; i<ngw; i++ )); do
        start_server gateway "$OUT/$name-gw$i.log" \
            --nats-url "$NATS_URL" --subject-prefix "$PREFIX" --gateway-id "$name-gw$i" \
            --max-connections-per-ip 0 --max-connects-per-ip-per-second 0
        urls+=("$SERVER_URL")
    done
    case $mode in
        rest) ;;
        churn) flags=(--churn "$CHURN") ;;
        *) echo "unknown mode $mode" >&2; exit 2 ;;
    esac
    echo "== $name: $clients public v2 clients over $ngw gateway(s), $mode, ${WINDOW}s window" >&2
    timeout --signal=INT --kill-after=15 $((WINDOW + clients / RAMP + 60)) \
        "$BIN/loadgen" "${urls[@]}" --page public --protocol 2 --clients "$clients" \
        --send-delay=false --rate 1 --ramp "$RAMP" --duration "$((WINDOW + 8))s" --json "${flags[@]}" \
        >"$OUT/$name.json" 2>"$OUT/$name.err" &
    local lg=$!
    for _ in $(seq $((clients / RAMP * 20 + 600))); do
        grep -q "all clients connected" "$OUT/$name.err" && break
        kill -0 "$lg" 2>/dev/null || break
        sleep 0.1
    done
    # 4 s for the connects to settle, then the window.
    if grep -q "all clients connected" "$OUT/$name.err" && sleep 4 && kill -0 "$lg" 2>/dev/null; then
        varz "$OUT/$name.before.json"
        sleep "$WINDOW"
        varz "$OUT/$name.after.json"
    fi
    wait "$lg" || echo "loadgen exited with $? for $name (see $OUT/$name.err)" >&2
    stop_pids "${GW_PIDS[@]}"
    GW_PIDS=()
    sleep 3
}

for c in $CASES; do
    IFS=: read -r name ngw clients mode <<<"$c"
    run_case "$name" "$ngw" "$clients" "$mode"
done

python3 - "$OUT" $CASES <<'EOF' | tee "$OUT/presence-bus-summary.md"
import json, sys
out, cases = sys.argv[1], sys.argv[2:]
print("| case | gateways | clients | mode | NATS in msgs/s | NATS out msgs/s | NATS in KiB/s | NATS out KiB/s | in+out bytes/s per client | loadgen connected / errors |")
print("| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |")
for c in cases:
    name, ngw, clients, mode = c.split(":")
    try:
        a = json.load(open(f"{out}/{name}.before.json")); z = json.load(open(f"{out}/{name}.after.json"))
        s = json.load(open(f"{out}/{name}.json"))
    except Exception as e:
        print(f"| {name} | {ngw} | {clients} | {mode} | no data ({e}) | | | | | |"); continue
    dt = z["t"] - a["t"]
    d = lambda k: (z["v"][k] - a["v"][k]) / dt
    per_client = (d("in_bytes") + d("out_bytes")) / int(clients)
    print(f"| {name} | {ngw} | {clients} | {mode} | {d('in_msgs'):.1f} | {d('out_msgs'):.1f} | {d('in_bytes')/1024:.1f} | {d('out_bytes')/1024:.1f} | {per_client:.2f} | {s['clients_connected']} / {s['errors_total']} |")
EOF
echo "raw output: $OUT" >&2
