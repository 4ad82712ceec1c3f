#!/usr/bin/env bash
# Where a public connection's memory goes: the standalone `pingapp` under
# heaptrack (Debian: `apt-get install heaptrack`) with N public v2 clients
# from `loadgen` (the public room's load: default view, pinging and
# reporting once a second, `--churn 20 --renames 10`), then the peak heap
# by allocation site (`heaptrack_print`), and the same load without
# heaptrack for the process's RSS against its live heap.
#
# Prints, per run: VmRSS before any client and at the end of the load
# (KiB), and heaptrack's summary (peak heap, peak RSS) and its top peak
# consumers; the raw heaptrack file stays in OUT.
#
# Usage: bash bench/heap_profile.sh   (env: N=2000 DURATION=25 BIN=target/release
#        OUT=/tmp/... HEAPTRACK=1; HEAPTRACK=0 SERVER_ENV="MALLOC_ARENA_MAX=2" for
#        the server's environment, e.g. another allocator through LD_PRELOAD)
# Needs: release binaries, heaptrack (unless HEAPTRACK=0), python3.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh

N="${N:-2000}"
DURATION="${DURATION:-25}"
BIN="${BIN:-target/release}"
HEAPTRACK="${HEAPTRACK:-1}"
OUT="${OUT:-$(mktemp -d /tmp/pingapp-heap.XXXXXX)}"
mkdir -p "$OUT"
need_release_binaries "$BIN"
need_open_files $((N + 1000))
if [[ $HEAPTRACK == 1 ]] && ! command -v heaptrack >/dev/null; then
    echo "heaptrack is needed (Debian: apt-get install heaptrack), or HEAPTRACK=0" >&2
    exit 2
fi

rss_kib() { awk '/VmRSS/{print $2}' "/proc/$1/status"; }
SERVER=""; pid=""
cleanup() { set +e; [[ -n $SERVER ]] && stop_pids $pid "$SERVER"; }
trap cleanup EXIT
trap 'exit 130' INT TERM

port=$(free_port); admin=$(free_port)
flags=(--listen "127.0.0.1:$port" --admin-listen "127.0.0.1:$admin"
    --max-connections-per-ip 0 --max-connects-per-ip-per-second 0
    --max-delay-excess-ms 60000 --max-connections $((N + 1000))
    --max-public-clients $((N + 1000)) --database-url "sqlite://$OUT/heap.db")
if [[ $HEAPTRACK == 1 ]]; then
    heaptrack -o "$OUT/heaptrack.pingapp" "$BIN/pingapp" "${flags[@]}" >"$OUT/pingapp.log" 2>&1 &
else
    # SERVER_ENV: e.g. "MALLOC_ARENA_MAX=2" or "LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"
    # (the server only, not loadgen).
    env ${SERVER_ENV:-} "$BIN/pingapp" "${flags[@]}" >"$OUT/pingapp.log" 2>&1 &
fi
SERVER=$!
wait_http "http://127.0.0.1:$admin/readyz"
# heaptrack runs pingapp as its child: the RSS is the child's.
pid=$(pgrep -P "$SERVER" -x pingapp || echo "$SERVER")
rss0=$(rss_kib "$pid")
"$BIN/loadgen" "ws://127.0.0.1:$port" --page public --clients "$N" --ramp 1000 \
    --threads 1 --churn 20 --renames 10 --measure-delays --duration "${DURATION}s" --json \
    >"$OUT/loadgen.json" 2>"$OUT/loadgen.err" &
lg=$!
sleep $((DURATION - 2))
rss1=$(rss_kib "$pid")
wait "$lg" || true
# heaptrack's wrapper does not pass SIGTERM on: the server first.
stop_pids "$pid" "$SERVER"
SERVER=""
echo "N=$N rss0=${rss0} KiB rss1=${rss1} KiB per client $(( (rss1 - rss0) / N )) KiB marginal, $(( rss1 / N )) KiB total/N"
if [[ $HEAPTRACK == 1 ]]; then
    file=$(ls "$OUT"/heaptrack.pingapp*)
    heaptrack_print -f "$file" --print-peaks 1 --print-allocators 0 --print-temporary 0 \
        --print-leaks 0 --peak-limit 25 --sub-peak-limit 3 >"$OUT/peaks.txt" 2>&1 || true
    grep -E "peak heap memory|peak RSS|total memory leaked|calls to allocation" "$OUT/peaks.txt" || true
    echo "top peak consumers: $OUT/peaks.txt"
fi
echo "raw results in $OUT" >&2
