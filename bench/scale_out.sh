#!/usr/bin/env bash
# Scale out: the distributed services (N gateways + presence + recorder over
# NATS JetStream + Postgres), measured with `loadgen` on loopback.
#
# (a) Rename broadcast latency across gateways: public v2 clients spread
#     round robin over 3 gateways; client 0 renames itself every second with
#     its send time in the name (`--measure-broadcast`); every client records
#     the delivery latency, split into receivers on the renamer's gateway
#     (baseline: same gateway) and on the other two (cross gateway).
#     Target: cross-gateway p99 < 50 ms.
# (b) Delay updates: public v2 clients, each reporting a delay_time every
#     second (`--rate 1`), spread over 1 or 3 gateways. `--measure-delays`
#     makes every reported value the client's send time (Unix ms mod 60 s),
#     and 16 observer clients record, for every value in every `delays`
#     frame they get, now - value: the time from a client's delay_time to
#     the moment other clients see it. Target: p99 <= roster tick + 50 ms.
#     Such values are not real delays: the gateways run with
#     `--max-delay-excess-ms 60000` so that they are not refused as
#     implausible (docs/security.md, "Samples").
#     Over a fixed slice of the window (after the ramp) the script also
#     reads nats-server's /varz (in_msgs, out_msgs, bytes), the services'
#     /metrics (presence events and broadcasts by kind), and every
#     process's utime+stime from /proc/PID/stat.
#
# (c) Mode `watch`: as (b), but every client watches WATCH (default 50)
#     other clients (`loadgen --watch`), as the public page does above 100
#     rows: each client gets only those clients' delays.
#
# Usage: bash bench/scale_out.sh     (env: CASES="..." DURATION=20 OUT=/tmp/...)
#   CASES: space-separated NAME:GATEWAYS:CLIENTS:MODE, MODE = rename|delays|watch
# Needs: release binaries (built if missing), nats-server on PATH, a
# PostgreSQL server at $PG_URL (trust), psql, python3, curl. Loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=bench/lib.sh
source bench/lib.sh

DURATION="${DURATION:-20}"          # seconds of measurement window per case
SLICE="${SLICE:-12}"                # seconds of counter sampling inside it
RAMP="${RAMP:-500}"
TICK_MS="${TICK_MS:-500}"           # roster tick of gateways and presence
WATCH="${WATCH:-50}"                # clients each client watches in mode watch
RATE="${RATE:-1}"                   # pings (and delay reports) per client per second
CASES="${CASES:-rename-c300:3:300:rename delays-1gw-c1000:1:1000:delays delays-3gw-c1000:3:1000:delays delays-3gw-c3000:3:3000:delays}"
PG_URL="${PG_URL:-postgres://postgres@127.0.0.1:5432}"
OUT="${OUT:-$(mktemp -d /tmp/pingapp-scale.XXXXXX)}"
BIN="${BIN:-target/release}"
mkdir -p "$OUT"

need_release_binaries "$BIN" gateway presence recorder loadgen
need_tools nats-server psql curl
max_clients=$(for c in $CASES; do echo "$c" | cut -d: -f3; done | sort -n | tail -1)
# Per process: loadgen holds every client's socket, a lone gateway too.
need_open_files $((max_clients + 1000))

DB="bench_scale_$$"
PREFIX="bench$$"
trap 'set +e; stop_stack' EXIT
trap 'exit 130' INT TERM

psql "$PG_URL/postgres" -qc "create database $DB" >/dev/null
start_nats
start_recorder "$PG_URL/$DB"
start_presence --roster-tick-ms "$TICK_MS"
echo "nats $NATS_URL (monitor $NATS_MON), presence pid $PRES_PID, recorder pid $REC_PID; output in $OUT" >&2

# snapshot FILE: counters of every process and service, as JSON.
snapshot() {
    local file=$1 gw_json="" i
    for i in "${!GW_PIDS[@]}"; do
        gw_json+="\"gw$i\":{\"cpu\":$(cpu_ticks "${GW_PIDS[i]}"),\"rss_kb\":$(awk '/VmRSS/{print $2}' "/proc/${GW_PIDS[i]}/status")},"
    done
    {
        echo "{\"t\":$(date +%s.%N),\"gateways\":{${gw_json%,}},"
        echo "\"presence_cpu\":$(cpu_ticks "$PRES_PID"),\"recorder_cpu\":$(cpu_ticks "$REC_PID"),"
        echo "\"nats_cpu\":$(cpu_ticks "$NATS_PID"),\"loadgen_cpu\":$(cpu_ticks "$LG_PID"),"
        echo "\"varz\":$(curl -fs "http://127.0.0.1:$NATS_MON/varz"),"
        echo "\"presence_metrics\":$(curl -fs "http://127.0.0.1:$PRES_ADMIN/metrics" | python3 -c 'import json,sys; print(json.dumps(sys.stdin.read()))')}"
    } >"$file"
}

run_case() { # name gateways clients mode
    local name=$1 ngw=$2 clients=$3 mode=$4 i urls=() flags
    GW_PIDS=()
    for (( i=0; i<ngw; i++ )); do
        start_server gateway "$OUT/$name-gw$i.log" \
            --nats-url "$NATS_URL" --subject-prefix "$PREFIX" --gateway-id "$name-gw$i" \
            --roster-tick-ms "$TICK_MS" --max-delay-excess-ms 60000 \
            --max-renames-per-minute 600 \
            --max-connections-per-ip 0 --max-connects-per-ip-per-second 0
        urls+=("$SERVER_URL")
    done
    # Renames are measured on v1 pages, which get every roster event; a v2
    # page sees a rename only if the renamed row is in its view
    # (docs/protocol.md, "Public room: the view").
    local protocol=2
    case $mode in
        rename) flags=(--measure-broadcast); protocol=1 ;;
        delays) flags=(--measure-delays --send-delay) ;;
        watch) flags=(--measure-delays --send-delay --watch "$WATCH") ;;
        *) echo "unknown mode $mode" >&2; exit 2 ;;
    esac
    echo "== $name: $clients public v$protocol clients over $ngw gateway(s), $mode, ${DURATION}s" >&2
    timeout --signal=INT --kill-after=15 $((DURATION + clients / RAMP + 120)) \
        "$BIN/loadgen" "${urls[@]}" --page public --protocol "$protocol" --clients "$clients" \
        --rate "$RATE" --ramp "$RAMP" --duration "${DURATION}s" --json "${flags[@]}" \
        >"$OUT/$name.json" 2>"$OUT/$name.err" &
    TO_PID=$!
    LG_PID=""
    for _ in $(seq 50); do
        LG_PID=$(pgrep -P "$TO_PID" -x loadgen || true)
        [[ -n $LG_PID ]] && break
        sleep 0.1
    done
    # Counters over SLICE seconds, starting 3 s into the window.
    for _ in $(seq $((clients / RAMP * 20 + 600))); do
        grep -q "all clients connected" "$OUT/$name.err" && break
        kill -0 "$TO_PID" 2>/dev/null || break
        sleep 0.1
    done
    if grep -q "all clients connected" "$OUT/$name.err" && sleep 3 && kill -0 "$TO_PID" 2>/dev/null; then
        snapshot "$OUT/$name.before.json" || true
        sleep "$SLICE"
        snapshot "$OUT/$name.after.json" || true
    fi
    wait "$TO_PID" || echo "loadgen exited with $? for $name (see $OUT/$name.err)" >&2
    stop_pids "${GW_PIDS[@]}"
    GW_PIDS=()
    sleep 2   # let presence settle the goodbyes before the next case
}

for c in $CASES; do
    IFS=: read -r name ngw clients mode <<<"$c"
    run_case "$name" "$ngw" "$clients" "$mode"
done

python3 - "$OUT" "$TICK_MS" "$(getconf CLK_TCK)" $CASES <<'EOF' | tee "$OUT/scale-summary.md"
import json, os, re, sys
out, tick_ms, hz, cases = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
def ms(us): return "-" if us is None else f"{us/1000:.1f}"
def metric(text, name, kind, label="kind"):
    m = re.search(rf'^{name}{{[^}}]*{label}="{kind}"[^}}]*}} ([0-9.e+]+)', text, re.M)
    return float(m.group(1)) if m else 0.0
rename_rows, delay_rows = [], []
for c in cases:
    name, ngw, clients, mode = c.split(":")
    try:
        s = json.load(open(f"{out}/{name}.json"))
    except Exception as e:
        print(f"<!-- {name}: no summary ({e}) -->"); continue
    errs = s["errors_total"]; conn = s["clients_connected"]
    closed = " ".join(f"{n}×{k}" for k, n in s["errors"]["closed_by_server"].items())
    err_txt = f"{errs}" + (f" ({closed})" if closed else "")
    if mode == "rename":
        b = s["broadcast"]
        for label, key in (("same gateway (baseline)", "same_target_us"), ("other gateways", "other_target_us"), ("all", "latency_us")):
            l = b[key]
            rename_rows.append(f"| {name} | {ngw} | {conn}/{clients} | {label} | {l['samples']} | {ms(l['p50'])} | {ms(l['p99'])} | {ms(l['max'])} | {b['renames_sent']} | {err_txt} |")
        continue
    d = s["delays"]["latency_us"]
    row = {"lat": d}
    try:
        a, z = json.load(open(f"{out}/{name}.before.json")), json.load(open(f"{out}/{name}.after.json"))
        dt = z["t"] - a["t"]; ticks = dt * 1000 / tick_ms
        va, vz = a["varz"], z["varz"]
        cpu = lambda x, y: 100.0 * (y - x) / hz / dt
        gws = [cpu(a["gateways"][k]["cpu"], z["gateways"][k]["cpu"]) for k in sorted(a["gateways"])]
        rss = [z["gateways"][k]["rss_kb"] / 1024 for k in sorted(z["gateways"])]
        pa, pz = a["presence_metrics"], z["presence_metrics"]
        row.update(
            in_tick=(vz["in_msgs"] - va["in_msgs"]) / ticks, out_tick=(vz["out_msgs"] - va["out_msgs"]) / ticks,
            in_kb_tick=(vz["in_bytes"] - va["in_bytes"]) / ticks / 1024, out_kb_tick=(vz["out_bytes"] - va["out_bytes"]) / ticks / 1024,
            ev_tick=(metric(pz, "pingapp_presence_events_total", "delays") - metric(pa, "pingapp_presence_events_total", "delays")) / ticks,
            bc_tick=(metric(pz, "pingapp_presence_broadcasts_total", "delays") - metric(pa, "pingapp_presence_broadcasts_total", "delays")) / ticks,
            fast=metric(pz, "pingapp_presence_delay_flushes_total", "all_reported", "trigger") - metric(pa, "pingapp_presence_delay_flushes_total", "all_reported", "trigger"),
            late=metric(pz, "pingapp_presence_delay_flushes_total", "deadline", "trigger") - metric(pa, "pingapp_presence_delay_flushes_total", "deadline", "trigger"),
            gw_cpu=gws, gw_rss=rss, pres=cpu(a["presence_cpu"], z["presence_cpu"]), rec=cpu(a["recorder_cpu"], z["recorder_cpu"]),
            nats=cpu(a["nats_cpu"], z["nats_cpu"]), lg=cpu(a["loadgen_cpu"], z["loadgen_cpu"]), slice=dt)
    except Exception as e:
        row["note"] = f"no counters ({e})"
    row["rtt"] = s["rtt_us"]
    row["frames_per_client_s"] = s["frames_by_command"].get("delays", 0) / max(conn, 1) / max(s["duration_secs"], 1e-9)
    row["kib_per_client_s"] = s.get("delays_bytes", 0) / 1024 / max(conn, 1) / max(s["duration_secs"], 1e-9)
    delay_rows.append((name, ngw, conn, clients, s["frames_by_command"].get("delays", 0), err_txt, row))
if rename_rows:
    print("Rename broadcast latency (ms), change_name sent by client 0, measured at every other client:\n")
    print("| case | gateways | clients | receivers | samples | p50 | p99 | max | renames | loadgen errors |")
    print("| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |")
    print("\n".join(rename_rows)); print()
if delay_rows:
    print(f"Delay updates (roster tick {tick_ms} ms): latency from a client's delay_time to an observer seeing it in a `delays` frame (ms):\n")
    print("| case | gateways | clients | samples | p50 | p90 | p99 | max | target p99 <= tick + 50 | ping RTT p50 / p99 (saturation check) | `delays` frames per client per s (whole run) / KiB per client per s (window) | loadgen errors |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | ---: | --- |")
    for name, ngw, conn, clients, frames, err, r in delay_rows:
        l = r["lat"]; ok = l["p99"] is not None and l["p99"] <= (tick_ms + 50) * 1000
        print(f"| {name} | {ngw} | {conn}/{clients} | {l['samples']} | {ms(l['p50'])} | {ms(l['p90'])} | {ms(l['p99'])} | {ms(l['max'])} | {'met' if ok else '**missed**'} | {ms(r['rtt']['p50'])} / {ms(r['rtt']['p99'])} | {r['frames_per_client_s']:.2f} / {r['kib_per_client_s']:.1f} | {err} |")
    print("\nPer roster tick, over a slice of the window (NATS totals from /varz; presence counters from its /metrics):\n")
    print("| case | gateways | clients | NATS in msgs/tick | NATS out msgs/tick | NATS in KiB/tick | NATS out KiB/tick | presence delays reports in/tick | presence delays broadcasts/tick | broadcasts released when all gateways reported / at the deadline |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for name, ngw, conn, clients, frames, err, r in delay_rows:
        if "in_tick" not in r: print(f"| {name} | {ngw} | {conn} | {r.get('note')} | | | | | | |"); continue
        print(f"| {name} | {ngw} | {conn} | {r['in_tick']:.1f} | {r['out_tick']:.1f} | {r['in_kb_tick']:.0f} | {r['out_kb_tick']:.0f} | {r['ev_tick']:.2f} | {r['bc_tick']:.2f} | {r['fast']:.0f} / {r['late']:.0f} |")
    print("\nCPU over the same slice (% of one core; 2 cores total, loadgen shares them):\n")
    print("| case | gateways | clients | CPU per gateway | gateway RSS MiB | presence | recorder | nats-server | loadgen |")
    print("| --- | ---: | ---: | --- | --- | ---: | ---: | ---: | ---: |")
    for name, ngw, conn, clients, frames, err, r in delay_rows:
        if "gw_cpu" not in r: continue
        print(f"| {name} | {ngw} | {conn} | {' / '.join(f'{x:.1f}' for x in r['gw_cpu'])} | {' / '.join(f'{x:.0f}' for x in r['gw_rss'])} | {r['pres']:.1f} | {r['rec']:.1f} | {r['nats']:.1f} | {r['lg']:.0f} |")
EOF
echo "raw output: $OUT" >&2
