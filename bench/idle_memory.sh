#!/usr/bin/env bash
# Resident memory per idle WebSocket connection: the standalone `pingapp`
# and, as a reference, the bare `echo-server`, each holding CLIENTS idle
# private v2 connections from `loadgen --idle` on loopback.
#
# Per repetition and server (the order alternates): start the server fresh,
# warm it up with 10 short-lived pinging clients (so the code paths, runtime
# threads and allocator arenas a connection needs exist before we measure),
# read VmRSS from /proc/PID/status ("before"), connect CLIENTS idle
# clients, wait until all are connected plus SETTLE seconds, read VmRSS
# again ("after"), then let loadgen close them and stop the server.
# Per connection = (after - before) / connected. Target for pingapp: at most
# 8 KiB per connection above the idle process.
#
# Usage: bash bench/idle_memory.sh   (env: CLIENTS=10000 REPS=3 SETTLE=5 OUT=/tmp/...)
# Needs: release binaries (built if missing), python3, a hard `ulimit -n`
# above CLIENTS (loadgen and the server each hold one descriptor per
# connection). Loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."

CLIENTS="${CLIENTS:-10000}"
REPS="${REPS:-3}"
SETTLE="${SETTLE:-5}"
OUT="${OUT:-$(mktemp -d /tmp/pingapp-mem.XXXXXX)}"
BIN="${BIN:-target/release}"
mkdir -p "$OUT"

# shellcheck source=bench/lib.sh
source bench/lib.sh
need_release_binaries "$BIN"
need_open_files "$((CLIENTS + 512))"

SERVER_PID=""
LOADGEN_PID=""
stop_pid() {
    local pid=$1
    [[ -n "$pid" ]] || return 0
    kill -TERM "$pid" 2>/dev/null || true
    # Bounded: a server drains within its grace period, loadgen within seconds.
    for _ in $(seq 150); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}
cleanup() {
    stop_pid "$LOADGEN_PID"
    stop_pid "$SERVER_PID"
    rm -f "$OUT"/pingapp.db*
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# wait_for FILE REGEX SECONDS: prints the first match of REGEX in FILE.
wait_for() {
    local _
    for _ in $(seq $(($3 * 10))); do
        if grep -Eo "$2" "$1" 2>/dev/null | head -1 | grep .; then
            return 0
        fi
        sleep 0.1
    done
    echo "timed out waiting for /$2/ in $1:" >&2
    tail -5 "$1" >&2
    exit 1
}

rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }

start_server() { # server log
    rm -f "$OUT"/pingapp.db*
    if [[ $1 == pingapp ]]; then
        # Every client connects from 127.0.0.1: no per-IP caps.
        "$BIN/pingapp" --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 \
            --max-connections-per-ip 0 --max-connects-per-ip-per-second 0 \
            --database-url "sqlite://$OUT/pingapp.db" >"$2" 2>&1 &
        SERVER_PID=$!
        wait_for "$2" 'listening on http://[0-9.]+:[0-9]+' 10 | sed 's#.*http://##'
    else
        "$BIN/echo-server" --listen 127.0.0.1:0 >"$2" 2>&1 &
        SERVER_PID=$!
        wait_for "$2" 'listening on [0-9.]+:[0-9]+' 10 | sed 's#listening on ##'
    fi
}

measure() { # server rep
    local server=$1 rep=$2 addr fresh before after
    local tag="$OUT/idle-$server-$rep"
    # Not `addr=$(start_server ...)`: the server must be our child, not a subshell's.
    start_server "$server" "$tag.server.log" >"$tag.addr"
    addr=$(cat "$tag.addr")
    sleep 1
    fresh=$(rss_kib "$SERVER_PID")
    timeout 20 "$BIN/loadgen" "ws://$addr" --clients 10 --rate 20 --duration 1s --json \
        >"$tag.warmup.json" 2>/dev/null
    sleep 2
    before=$(rss_kib "$SERVER_PID")

    # Hold long enough to settle and read; ramp 5,000/s.
    local hold=$((SETTLE + 5))
    "$BIN/loadgen" "ws://$addr" --idle --clients "$CLIENTS" --ramp 5000 \
        --duration "${hold}s" --json >"$tag.json" 2>"$tag.loadgen.log" &
    LOADGEN_PID=$!
    wait_for "$tag.loadgen.log" 'all clients connected: [0-9]+/[0-9]+' 60 >/dev/null
    sleep "$SETTLE"
    after=$(rss_kib "$SERVER_PID")
    local open
    open=$(find "/proc/$SERVER_PID/fd" -mindepth 1 -maxdepth 1 | wc -l)
    timeout $((hold + 30)) tail --pid="$LOADGEN_PID" -f /dev/null || true
    wait "$LOADGEN_PID" || true
    LOADGEN_PID=""
    stop_pid "$SERVER_PID"
    SERVER_PID=""
    python3 - "$tag.json" "$server" "$rep" "$fresh" "$before" "$after" "$open" <<'EOF' | tee "$tag.result.json" >&2
import json, sys
d = json.load(open(sys.argv[1]))
server, rep = sys.argv[2], int(sys.argv[3])
fresh, before, after, fds = map(int, sys.argv[4:8])
n = d["clients_connected"]
print(json.dumps({"server": server, "rep": rep, "clients_connected": n,
                  "errors_total": d["errors_total"], "server_fds": fds,
                  "rss_fresh_kib": fresh, "rss_before_kib": before, "rss_after_kib": after,
                  "per_connection_kib": (after - before) / n if n else None}))
EOF
}

for rep in $(seq "$REPS"); do
    if (( rep % 2 )); then order=(echo pingapp); else order=(pingapp echo); fi
    for server in "${order[@]}"; do
        measure "$server" "$rep"
    done
done

python3 - "$OUT" "$REPS" "$CLIENTS" <<'EOF' | tee "$OUT/idle-summary.md"
import json, statistics, sys
out, reps, clients = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
med = statistics.median
rows = {s: [json.load(open(f"{out}/idle-{s}-{r}.result.json")) for r in range(1, reps + 1)]
        for s in ("echo", "pingapp")}
print(f"{clients} idle private v2 connections; median of {reps} repetitions (min..max per connection in brackets).\n")
print("| server | connected | RSS fresh (MiB) | RSS before (MiB) | RSS with connections (MiB) | per connection (KiB) | target (<= 8 KiB) |")
print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
summary = {}
for s, rs in rows.items():
    per = [r["per_connection_kib"] for r in rs]
    row = {
        "connected": med(r["clients_connected"] for r in rs),
        "fresh_mib": med(r["rss_fresh_kib"] for r in rs) / 1024,
        "before_mib": med(r["rss_before_kib"] for r in rs) / 1024,
        "after_mib": med(r["rss_after_kib"] for r in rs) / 1024,
        "per_conn_kib": med(per), "min": min(per), "max": max(per),
    }
    summary[s] = row
    verdict = ("met" if row["per_conn_kib"] <= 8 else "**missed**") if s == "pingapp" else "reference"
    print(f"| {s} | {row['connected']:.0f} | {row['fresh_mib']:.1f} | {row['before_mib']:.1f} | {row['after_mib']:.1f} "
          f"| {row['per_conn_kib']:.2f} ({row['min']:.2f}..{row['max']:.2f}) | {verdict} |")
ratio = med(p["per_connection_kib"] / e["per_connection_kib"] for e, p in zip(rows["echo"], rows["pingapp"]))
print(f"\npingapp / echo-server per connection (median of per-repetition ratios): {ratio:.2f}x")
summary["ratio"] = ratio
json.dump(summary, open(f"{out}/idle-summary.json", "w"), indent=1)
EOF
echo "raw JSON: $OUT" >&2
