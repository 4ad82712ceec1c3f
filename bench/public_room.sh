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
#   - loadgen's own CPU and RSS per client (it shares the machine);
#   - errors: loadgen's by kind (error frames by `code`, closes by code,
#     ping timeouts), and the gateways' own count from their /metrics at
#     the run's end (`pingapp_gateway_errors_total` by code,
#     `pingapp_gateway_samples_refused_total` by reason, closes, outbound
#     drops, persist errors), with a timeline of those series every 2 s
#     in OUT/why-N.txt ("TIME GATEWAY SERIES VALUE") that says when they
#     first grew.
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

if [[ $STACK == distributed ]]; then
    need_release_binaries "$BIN" gateway presence recorder loadgen
    need_tools nats-server psql curl
else
    need_release_binaries "$BIN" pingapp loadgen
    need_tools curl
fi
max_n=$(printf '%s\n' $NS | sort -n | tail -1)
need_open_files $((max_n + 1000))

rss_kib() { awk '/VmRSS/{print $2}' "/proc/$1/status"; }
HZ=$(getconf CLK_TCK)
# sum_of FUNC PID...: FUNC summed over the processes.
sum_of() { local f=$1 t=0 pid; shift; for pid in "$@"; do t=$((t + $($f "$pid"))); done; echo "$t"; }
# each_of FUNC PID...: FUNC of each process, as a JSON list.
each_of() { local f=$1 l="" pid; shift; for pid in "$@"; do l+="${l:+,}$($f "$pid")"; done; echo "[$l]"; }

PREFIX="room$$"
SAMPLER=""   # the metrics sampler of the current N
trap 'set +e; [[ -n $SAMPLER ]] && stop_pids "$SAMPLER"; stop_stack' EXIT
trap 'exit 130' INT TERM

caps=()
server_bin=pingapp; [[ $STACK == distributed ]] && server_bin=gateway
if "$BIN/$server_bin" --help | grep -q -- '--max-public-clients'; then
    caps=(yes)
fi
common_flags=(--roster-tick-ms "$TICK_MS" --max-connections-per-ip 0
    --max-connects-per-ip-per-second 0 --max-delay-excess-ms 60000)

if [[ $STACK == distributed ]]; then
    DB="bench_room_$$"
    psql "$PG_URL/postgres" -qc "create database $DB" >/dev/null
    start_nats
    start_recorder "$PG_URL/$DB"
    start_presence --roster-tick-ms "$TICK_MS" --max-clients-per-gateway $((max_n + 1000))
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
# The gateway series that say why a client got an error frame or lost a
# sample (docs/metrics.md): error frames by code, samples refused by
# reason, the persist buffer, outbound drops, closes by code.
WHY='^pingapp_gateway_(errors_total|samples_refused_total|persist_buffer_bytes|persist_errors_total|samples_pending|outbound_drops_total|disconnects_total)'
# why_metrics FILE ADMIN...: those series of every gateway, one
# "TIME GATEWAY SERIES VALUE" line each, appended to FILE.
why_metrics() {
    local file=$1 i=0 admin t
    shift
    t=$(date +%s.%N)
    for admin in "$@"; do
        curl -fs --max-time 2 "http://$admin/metrics" | grep -E "$WHY" | sed "s/^/$t $i /" >>"$file" || true
        i=$((i + 1))
    done
}

for n in $NS; do
    GW_PIDS=(); urls=(); admins=()
    per_gw=$(( (n + GATEWAYS - 1) / GATEWAYS + 1000 ))
    for (( i=0; i<GATEWAYS; i++ )); do
        flags=("${common_flags[@]}")
        if [[ -n "${caps[*]}" ]]; then
            flags+=(--max-connections "$per_gw" --max-public-clients "$per_gw")
        fi
        if [[ $STACK == distributed ]]; then
            start_server gateway "$OUT/gateway-$n-$i.log" "${flags[@]}" --nats-url "$NATS_URL" \
                --subject-prefix "$PREFIX" --gateway-id "n$n-gw$i"
        else
            start_server pingapp "$OUT/pingapp-$n.log" "${flags[@]}" \
                --database-url "sqlite://$OUT/room-$n.db"
        fi
        urls+=("$SERVER_URL"); admins+=("$SERVER_ADMIN")
    done
    rss0=$(sum_of rss_kib "${GW_PIDS[@]}")
    # Every 2 s through the run, the gateways' error and overflow series
    # (the timeline that says when error frames started, and why).
    rm -f "$OUT/why-$n.txt"
    ( while true; do why_metrics "$OUT/why-$n.txt" "${admins[@]}"; sleep 2; done ) &
    SAMPLER=$!

    "$BIN/loadgen" "${urls[@]}" --page public --clients "$n" --ramp "$RAMP" \
        --threads 1 --churn 20 --renames 10 --measure-delays --duration "${DURATION}s" --json \
        >"$OUT/loadgen-$n.json" 2>"$OUT/loadgen-$n.err" &
    lg=$!
    until grep -q "all clients connected" "$OUT/loadgen-$n.err" 2>/dev/null; do
        kill -0 "$lg" 2>/dev/null || { echo "loadgen ended early:" >&2; tail "$OUT/loadgen-$n.err" >&2; exit 1; }
        sleep 0.2
    done
    sleep "$WARM"
    c0=$(each_of cpu_ticks "${GW_PIDS[@]}"); s0=$(stack_json); t0=$(date +%s.%N)
    sleep "$SLICE"
    c1=$(each_of cpu_ticks "${GW_PIDS[@]}"); s1=$(stack_json); t1=$(date +%s.%N)
    rss1=$(each_of rss_kib "${GW_PIDS[@]}")
    wait "$lg" || true
    stop_pids "$SAMPLER"; SAMPLER=""
    # The gateways' own count at the end of the run, before they stop.
    why_metrics "$OUT/why-$n.end.txt" "${admins[@]}"
    stop_pids "${GW_PIDS[@]}"
    GW_PIDS=()
    echo "{\"n\":$n,\"gateways\":$GATEWAYS,\"cpu0\":$c0,\"cpu1\":$c1,\"hz\":$HZ,\"t0\":$t0,\"t1\":$t1,\"rss0\":$rss0,\"rss1\":$rss1,\"stack0\":$s0,\"stack1\":$s1}" \
        >"$OUT/gw-$n.json"
    echo "N=$n done" >&2
    [[ $STACK == distributed ]] && sleep 3   # presence settles the goodbyes
done

python3 - "$OUT" "$TICK_MS" $NS <<'EOF'
import json, re, sys
GREW = r"pingapp_gateway_(errors_total|samples_refused_total|outbound_drops_total)"
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

def why(path):
    """The gateways' error and overflow series in a why-N file: the last
    value of each series per gateway, summed over the gateways, and the
    time (s since the file's first line) each error or refusal series
    first grew."""
    last, first_seen, t_start = {}, {}, None
    try:
        lines = open(path).read().split("\n")
    except OSError:
        return {}, {}
    for line in lines:
        parts = line.split(" ")
        if len(parts) < 4:
            continue
        t, gw, series, value = float(parts[0]), parts[1], parts[2], float(parts[-1])
        t_start = t if t_start is None else t_start
        if value > last.get((gw, series), 0) and re.match(GREW, series):
            first_seen.setdefault(series, t - t_start)
        last[(gw, series)] = value
    total = {}
    for (gw, series), value in last.items():
        total[series] = total.get(series, 0) + value
    return total, first_seen

def by_label(total, family, label):
    """{label value: n} of a family's non-zero series."""
    out = {}
    for series, value in total.items():
        if series.startswith(family + "{") and value:
            out[series.split(f'{label}="', 1)[1].split('"', 1)[0]] = int(value)
    return out

def tally(d):
    return " ".join(f"{k} {v:,}" for k, v in sorted(d.items())) or "none"

rows = []
for n in ns:
    gw = json.load(open(f"{out}/gw-{n}.json"))
    lg = json.load(open(f"{out}/loadgen-{n}.json"))
    secs = gw["t1"] - gw["t0"]
    own = lg.get("loadgen") or {}
    cpu_each = [(b - a) / gw["hz"] for a, b in zip(gw["cpu0"], gw["cpu1"])]
    e = lg["errors"]
    lg_errors = {f"error:{k}": v for k, v in (e.get("server_error_codes") or {}).items()}
    lg_errors.update({f"close:{k}": v for k, v in e["closed_by_server"].items()})
    for k in ("connect_failed", "timeouts", "unexpected_pongs"):
        if e[k]:
            lg_errors[k] = e[k]
    if e["server_errors"] and not e.get("server_error_codes"):
        lg_errors["error:(code not recorded)"] = e["server_errors"]
    total, first_seen = why(f"{out}/why-{n}.end.txt")
    _, timeline = why(f"{out}/why-{n}.txt")
    rows.append(dict(
        n=n,
        connected=lg["clients_connected"],
        errors=lg["errors_total"],
        lg_errors=lg_errors,
        gw_errors=by_label(total, "pingapp_gateway_errors_total", "code"),
        gw_refused=by_label(total, "pingapp_gateway_samples_refused_total", "reason"),
        gw_closes=by_label(total, "pingapp_gateway_disconnects_total", "code"),
        gw_drops=int(total.get("pingapp_gateway_outbound_drops_total", 0)),
        gw_persist_errors=int(total.get("pingapp_gateway_persist_errors_total", 0)),
        first_seen=timeline,
        cpu=sum(cpu_each) * 1e6 / secs / n,
        cpu_pct=sum(cpu_each) * 100 / secs,
        cpu_each=[c * 100 / secs for c in cpu_each],
        rss_each=[r / 1024 for r in gw["rss1"]],
        rss=sum(gw["rss1"]) / n,
        rss_marginal=(sum(gw["rss1"]) - gw["rss0"]) / n,
        rss_mib=sum(gw["rss1"]) / 1024,
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
if len(rows[0]["cpu_each"]) > 1:
    print()
    print("| N | CPU % per gateway | RSS MiB per gateway |")
    print("| --- | --- | --- |")
    for r in rows:
        print(f"| {r['n']:,} | {' / '.join(f'{x:.1f}' for x in r['cpu_each'])} | {' / '.join(f'{x:.0f}' for x in r['rss_each'])} |")
print()
print("Errors, as loadgen saw them and as the gateways counted them (/metrics at the run's end, summed over the gateways; first grew: seconds into the 2 s timeline in why-N.txt):")
print()
print("| N | loadgen: errors by kind and code | gateway: error frames by code | gateway: samples refused by reason | gateway: closes by code | outbound drops | persist errors | first grew (s) |")
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
for r in rows:
    first = " ".join(f"{k.removeprefix('pingapp_gateway_')} {v:.0f}" for k, v in sorted(r["first_seen"].items(), key=lambda kv: kv[1])) or "-"
    print(f"| {r['n']:,} | {tally(r['lg_errors'])} | {tally(r['gw_errors'])} | {tally(r['gw_refused'])} | {tally(r['gw_closes'])} | {r['gw_drops']:,} | {r['gw_persist_errors']:,} | {first} |")
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
