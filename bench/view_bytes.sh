#!/usr/bin/env bash
# Bytes the standalone `pingapp` sends per public v2 client per second, and
# its RSS per public connection, with N clients on the default view, each
# pinging and reporting its delay once a second (`loadgen --page public`).
# The per-client figure at a larger N, divided by the same figure at a
# smaller N of the same run, is the ratio the public room's target is
# about (docs/benchmarks.md, "The public room's view").
#
# Bytes: the sum of `bytes_acked` over the server's established sockets
# (`ss -ti`), read 20 s and 30 s into a 40 s run. RSS: VmRSS before the
# clients and at 30 s.
#
# Usage: bash bench/view_bytes.sh N PORT   (env: BIN=target/release)
# Needs: the `pingapp` and `loadgen` binaries in BIN, `ss`, `bc`. Loopback.
set -euo pipefail
N=$1
PORT=$2
BIN="${BIN:-target/release}"
OUT="$(mktemp -d /tmp/pingapp-view.XXXXXX)"
"$BIN/pingapp" --listen "127.0.0.1:$PORT" --admin-listen 127.0.0.1:0 \
    --database-url "sqlite://$OUT/db.sqlite?mode=rwc" \
    --max-connects-per-ip-per-second 0 --max-connections-per-ip 0 \
    --max-public-clients 100000 >"$OUT/pingapp.log" 2>&1 &
PID=$!
trap 'kill $PID 2>/dev/null || true' EXIT
sleep 3
rss() { awk '/VmRSS/ {print $2}' "/proc/$PID/status"; }
sent() {
    ss -tinH state established "( sport = :$PORT )" |
        grep -o 'bytes_acked:[0-9]*' | cut -d: -f2 | paste -sd+ | bc
}
R0=$(rss)
"$BIN/loadgen" "ws://127.0.0.1:$PORT" --page public --clients "$N" --ramp 1000 \
    --duration 40s >"$OUT/loadgen.log" 2>&1 &
LG=$!
sleep 20
B1=$(sent); T1=$(date +%s.%N)
sleep 10
B2=$(sent); T2=$(date +%s.%N)
R1=$(rss)
wait $LG || true
echo "N=$N rss_before_kib=$R0 rss_loaded_kib=$R1" \
    "per_conn_kib=$(echo "($R1-$R0)/$N" | bc -l | cut -c1-6)" \
    "bytes_per_client_per_s=$(echo "($B2-$B1)/($T2-$T1)/$N" | bc -l | cut -c1-8)" \
    "(logs in $OUT)"
