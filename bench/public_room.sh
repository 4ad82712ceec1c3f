#!/usr/bin/env bash
# The public room benchmark. By default standalone: one `pingapp` process (gateway,
# presence and recorder in one, in-memory bus, SQLite) and N public v2
# clients from `loadgen`, each pinging and reporting its delay once a
# second with the default view (docs/protocol.md, "Public room: the
# view"), while 20 clients a second leave and are replaced (`--churn 20`)
# and 10 rename (`--renames 10`).
#
# Per N (default 1,000 / 2,500 / 5,000 / 10,000), over a slice of the window
# after the ramp and a warm-up:
#   - gateway CPU per client, µs per second: the pingapp process's
#     utime+stime (/proc/PID/stat) over the slice / N;
#   - RSS per client, KiB: VmRSS at the end of the slice / N, and the
#     marginal (VmRSS - VmRSS before any client) / N;
#   - bytes sent per client per second: the text frames loadgen received
#     over the window / N / window (WebSocket framing not counted);
#   - delay-update latency p99 (`--measure-delays`: from a client's
#     delay_time to the moment 16 observers see it in a view frame);
#   - ping RTT p99 (loadgen, every client, the whole window);
#   - loadgen's own CPU and RSS per client (it shares the machine).
# Then the targets (docs/benchmarks.md, "Public room"): each per-client
# figure at the largest N within 1.25x of its value at the smallest N,
# <= 16 KiB RSS per connection at the largest N, delay-update p99 <=
# roster tick + 50 ms, ping RTT p99 at the largest N within 2x of the
# smallest N's.
#
# Flags the server under test needs, passed explicitly: every client
# connects from 127.0.0.1, so the per-IP caps are off
# (`--max-connections-per-ip 0 --max-connects-per-ip-per-second 0`,
# docs/security.md); `--measure-delays` reports send times as delays, so
# `--max-delay-excess-ms 60000` (docs/security.md, "Samples"); and, where
# the gateway has them, `--max-connections` and `--max-public-clients` at
# N + 1000 (the population plus the churn in flight). Renames stay under
# the default `--max-renames-per-minute`: loadgen spreads them round robin.
#
# STACK=distributed runs the same against GATEWAYS gateway processes
# (clients round robin) with presence and the recorder over a nats-server
# (started here, random ports, JetStream in OUT) and a fresh Postgres
# database at PG_URL: the gateway figures are summed over the gateways,
# and a second table gives presence's, the recorder's and nats-server's CPU
# and NATS messages and bytes per client per second.
#
# Usage: bash bench/public_room.sh   (env: NS="1000 10000" DURATION=40
#        WARM=8 SLICE=20 TICK_MS=500 OUT=/tmp/... BIN=target/release
#        STACK=standalone|distributed GATEWAYS=1 PG_URL=postgres://...)
# Needs: release binaries (built if missing), python3. Loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh

NS="${NS:-1000 2500 5000 10000}"
DURATION="${DURATION:-40}"   # loadgen's window, seconds
WARM="${WARM:-8}"            # seconds into the window before the slice
SLICE="${SLICE:-20}"         # seconds of CPU sampling
TICK_MS="${TICK_MS:-500}"
RAMP="${RAMP:-1000}"
BIN="${BIN:-target/release}"
STACK="${STACK:-standalone}"   # or distributed: gateway(s) + presence + recorder over NATS + Postgres
GATEWAYS="${GATEWAYS:-1}"      # gateways of a distributed run (clients round robin)
PG_URL="${PG_URL:-postgres://postgres@127.0.0.1:5432}"
OUT="${OUT:-$(mktemp -d /tmp/pingapp-room.XXXXXX)}"
mkdir -p "$OUT"
[[ $STACK == standalone || $STACK == distributed ]] || { echo "STACK is standalone or distributed" >&2; exit 2; }
[[ $STACK == distributed || $GATEWAYS == 1 ]] || { echo "GATEWAYS > 1 needs STACK=distributed" >&2; exit 2; }
(( WARM + SLICE < DURATION )) || { echo "WARM + SLICE must be below DURATION" >&2; exit 2; }

need_release_binaries "$BIN"
max_n=$(printf '%s\n' $NS | sort -n | tail -1)
need_open_files $((max_n + 1000))

cpu_ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
rss_kib() { awk '/VmRSS/{print $2}' "/proc/$1/status"; }
HZ=$(getconf CLK_TCK)
# sum_of FUNC PID...: FUNC summed over the processes.
sum_of() { local f=$1 t=0 pid; shift; for pid in "$@"; do t=$((t + $($f "$pid"))); done; echo "$t"; }

DB="bench_room_$$"; PREFIX="room$$"
PIDS=()      # the stack of a distributed run (nats, recorder, presence)
GW_PIDS=()   # the server(s) under test of the current N
cleanup() {
    set +e
    stop_pids "${GW_PIDS[@]}"
    local i
    for (( i=${#PIDS[@]}-1; i>=0; i-- )); do stop_pids "${PIDS[i]}"; done
    if [[ $STACK == distributed ]]; then
        psql "$PG_URL/postgres" -qc "drop database if exists $DB" >/dev/null 2>&1
        rm -rf "$OUT/js"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

caps=()
server_bin=pingapp; [[ $STACK == distributed ]] && server_bin=gateway
if [[ -x "$BIN/$server_bin" ]] && "$BIN/$server_bin" --help | grep -q -- '--max-public-clients'; then
    caps=(yes)
fi
common_flags=(--roster-tick-ms "$TICK_MS" --max-connections-per-ip 0
    --max-connects-per-ip-per-second 0 --max-delay-excess-ms 60000)

if [[ $STACK == distributed ]]; then
    for tool in nats-server psql curl; do
        command -v "$tool" >/dev/null || { echo "$tool is needed for STACK=distributed" >&2; exit 2; }
    done
    for b in gateway presence recorder; do
        [[ -x "$BIN/$b" ]] || nice -n 10 cargo build --release --workspace --bins >&2
    done
    psql "$PG_URL/postgres" -qc "create database $DB" >/dev/null
    NATS_PORT=$(free_port); NATS_MON=$(free_port)
    nats-server -js -sd "$OUT/js" -a 127.0.0.1 -p "$NATS_PORT" -m "$NATS_MON" >"$OUT/nats.log" 2>&1 &
    NATS_PID=$!; PIDS+=("$NATS_PID")
    wait_http "http://127.0.0.1:$NATS_MON/healthz"
    NATS_URL="nats://127.0.0.1:$NATS_PORT"
    REC_ADMIN=$(free_port)
    "$BIN/recorder" --admin-listen "127.0.0.1:$REC_ADMIN" --nats-url "$NATS_URL" \
        --subject-prefix "$PREFIX" --database-url "$PG_URL/$DB" >"$OUT/recorder.log" 2>&1 &
    REC_PID=$!; PIDS+=("$REC_PID")
    PRES_ADMIN=$(free_port)
    "$BIN/presence" --admin-listen "127.0.0.1:$PRES_ADMIN" --nats-url "$NATS_URL" \
        --subject-prefix "$PREFIX" --roster-tick-ms "$TICK_MS" \
        --max-clients-per-gateway $((max_n + 1000)) >"$OUT/presence.log" 2>&1 &
    PRES_PID=$!; PIDS+=("$PRES_PID")
    wait_http "http://127.0.0.1:$REC_ADMIN/readyz"
    wait_http "http://127.0.0.1:$PRES_ADMIN/readyz"
    for _ in $(seq 300); do
        curl -fs "http://127.0.0.1:$PRES_ADMIN/metrics" | grep -Eq '^pingapp_presence_active 1' && break
        sleep 0.1
    done
fi
# stack_json: CPU ticks of the stack's processes and nats-server's byte
# counters (distributed), else {}.
stack_json() {
    if [[ $STACK == distributed ]]; then
        echo "{\"presence\":$(cpu_ticks "$PRES_PID"),\"recorder\":$(cpu_ticks "$REC_PID"),\"nats\":$(cpu_ticks "$NATS_PID"),\"varz\":$(curl -fs "http://127.0.0.1:$NATS_MON/varz")}"
    else
        echo "{}"
    fi
}

for n in $NS; do
    GW_PIDS=(); urls=()
    per_gw=$(( (n + GATEWAYS - 1) / GATEWAYS + 1000 ))
    for (( i=0; i<GATEWAYS; i++ )); do
        port=$(free_port); admin=$(free_port)
        flags=(--listen "127.0.0.1:$port" --admin-listen "127.0.0.1:$admin" "${common_flags[@]}")
        if [[ -n "${caps[*]}" ]]; then
            flags+=(--max-connections "$per_gw" --max-public-clients "$per_gw")
        fi
        if [[ $STACK == distributed ]]; then
            "$BIN/gateway" "${flags[@]}" --nats-url "$NATS_URL" --subject-prefix "$PREFIX" \
                --gateway-id "n$n-gw$i" >"$OUT/gateway-$n-$i.log" 2>&1 &
        else
            "$BIN/pingapp" "${flags[@]}" --database-url "sqlite://$OUT/room-$n.db" \
                >"$OUT/pingapp-$n.log" 2>&1 &
        fi
        GW_PIDS+=($!)
        wait_http "http://127.0.0.1:$admin/readyz"
        urls+=("ws://127.0.0.1:$port")
    done
    rss0=$(sum_of rss_kib "${GW_PIDS[@]}")

    "$BIN/loadgen" "${urls[@]}" --page public --clients "$n" --ramp "$RAMP" \
        --threads 1 --churn 20 --renames 10 --measure-delays --duration "${DURATION}s" --json \
        >"$OUT/loadgen-$n.json" 2>"$OUT/loadgen-$n.err" &
    lg=$!
    until grep -q "all clients connected" "$OUT/loadgen-$n.err" 2>/dev/null; do
        kill -0 "$lg" 2>/dev/null || { echo "loadgen ended early:" >&2; tail "$OUT/loadgen-$n.err" >&2; exit 1; }
        sleep 0.2
    done
    sleep "$WARM"
    c0=$(sum_of cpu_ticks "${GW_PIDS[@]}"); s0=$(stack_json); t0=$(date +%s.%N)
    sleep "$SLICE"
    c1=$(sum_of cpu_ticks "${GW_PIDS[@]}"); s1=$(stack_json); t1=$(date +%s.%N)
    rss1=$(sum_of rss_kib "${GW_PIDS[@]}")
    wait "$lg" || true
    stop_pids "${GW_PIDS[@]}"
    GW_PIDS=()
    echo "{\"n\":$n,\"gateways\":$GATEWAYS,\"cpu_ticks\":$((c1 - c0)),\"hz\":$HZ,\"t0\":$t0,\"t1\":$t1,\"rss0\":$rss0,\"rss1\":$rss1,\"stack0\":$s0,\"stack1\":$s1}" \
        >"$OUT/gw-$n.json"
    echo "N=$n done" >&2
    [[ $STACK == distributed ]] && sleep 3   # presence settles the goodbyes
done

python3 - "$OUT" "$TICK_MS" $NS <<'EOF'
import json, sys
out, tick, ns = sys.argv[1], int(sys.argv[2]), [int(x) for x in sys.argv[3:]]
def stack_row(gw, secs, n):
    """Distributed runs: CPU of presence, recorder and nats-server (% of a
    core) and NATS bytes in+out per second per client over the slice."""
    a, z = gw.get("stack0") or {}, gw.get("stack1") or {}
    if "varz" not in a:
        return None
    cpu = lambda k: (z[k] - a[k]) / gw["hz"] * 100 / secs
    va, vz = a["varz"], z["varz"]
    d = lambda k: (vz[k] - va[k]) / secs
    return dict(presence=cpu("presence"), recorder=cpu("recorder"), nats=cpu("nats"),
                in_msgs=d("in_msgs"), out_msgs=d("out_msgs"),
                in_b=d("in_bytes") / n, out_b=d("out_bytes") / n)

rows = []
for n in ns:
    gw = json.load(open(f"{out}/gw-{n}.json"))
    lg = json.load(open(f"{out}/loadgen-{n}.json"))
    secs = gw["t1"] - gw["t0"]
    own = lg.get("loadgen") or {}
    rows.append(dict(
        n=n,
        connected=lg["clients_connected"],
        errors=lg["errors_total"],
        cpu=gw["cpu_ticks"] / gw["hz"] * 1e6 / secs / n,
        cpu_pct=gw["cpu_ticks"] / gw["hz"] * 100 / secs,
        rss=gw["rss1"] / n,
        rss_marginal=(gw["rss1"] - gw["rss0"]) / n,
        rss_mib=gw["rss1"] / 1024,
        bytes=lg["bytes_received"] / lg["duration_secs"] / n,
        delay_p99=(lg["delays"]["latency_us"]["p99"] or 0) / 1000,
        delay_n=lg["delays"]["latency_us"]["samples"],
        rtt_p99=(lg["rtt_us"]["p99"] or 0) / 1000,
        rtt_p50=(lg["rtt_us"]["p50"] or 0) / 1000,
        churn=lg.get("churn") or {},
        lg_cpu=own.get("cpu_us_per_client_per_sec"),
        lg_rss=own.get("rss_kib_per_client"),
        stack=stack_row(gw, secs, n),
    ))
print("| N | connected | errors | gateway CPU % | CPU µs/s per client | RSS MiB | RSS KiB per client (marginal) | bytes/s per client | delay-update p99 ms (samples) | ping RTT p50 / p99 ms | churn closed/renames | loadgen µs/s, KiB per client |")
print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
for r in rows:
    c = r["churn"]
    print(f"| {r['n']:,} | {r['connected']:,} | {r['errors']} | {r['cpu_pct']:.1f} | {r['cpu']:.1f} | {r['rss_mib']:.0f} | {r['rss']:.1f} ({r['rss_marginal']:.1f}) | {r['bytes']:.0f} | {r['delay_p99']:.1f} ({r['delay_n']}) | {r['rtt_p50']:.2f} / {r['rtt_p99']:.2f} | {c.get('closed', 0)}/{c.get('renames', 0)} | {r['lg_cpu'] or 0:.1f}, {r['lg_rss'] or 0:.1f} |")
if rows[0]["stack"]:
    print()
    print("| N | presence CPU % | recorder CPU % | nats-server CPU % | NATS msgs/s in / out | NATS bytes/s per client in / out |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        t = r["stack"]
        print(f"| {r['n']:,} | {t['presence']:.1f} | {t['recorder']:.1f} | {t['nats']:.1f} | {t['in_msgs']:,.0f} / {t['out_msgs']:,.0f} | {t['in_b']:.0f} / {t['out_b']:.0f} |")
a, z = rows[0], rows[-1]
def mark(ok): return "met" if ok else "missed"
print()
print(f"Targets, N={z['n']:,} against N={a['n']:,} (ratios of per-client figures):")
for key, label in [("cpu", "gateway CPU per client"), ("rss", "RSS per client"), ("bytes", "bytes sent per client")]:
    ratio = z[key] / a[key] if a[key] else float("inf")
    print(f"- {label}: {ratio:.2f}x (<= 1.25x: {mark(ratio <= 1.25)})")
print(f"- RSS per connection at N={z['n']:,}: {z['rss']:.1f} KiB total/N, {z['rss_marginal']:.1f} KiB marginal (<= 16 KiB: {mark(z['rss'] <= 16)} total, {mark(z['rss_marginal'] <= 16)} marginal)")
for r in rows:
    print(f"- delay-update p99 at N={r['n']:,}: {r['delay_p99']:.1f} ms (<= tick {tick} + 50 ms: {mark(r['delay_p99'] <= tick + 50)})")
ratio = z["rtt_p99"] / a["rtt_p99"] if a["rtt_p99"] else float("inf")
print(f"- ping RTT p99: {z['rtt_p99']:.2f} ms vs {a['rtt_p99']:.2f} ms = {ratio:.2f}x (<= 2x: {mark(ratio <= 2)})")
EOF
echo "raw results in $OUT" >&2
