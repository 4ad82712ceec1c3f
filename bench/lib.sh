# Shared by the bench scripts: source it after `cd` to the project root.

# need_release_binaries BIN [NAME...]: builds the workspace's release
# binaries into BIN unless every NAME (default: pingapp, echo-server,
# loadgen) is there, and checks for python3 (the summaries).
need_release_binaries() {
    local bin=$1 name
    shift
    (( $# )) || set -- pingapp echo-server loadgen
    for name in "$@"; do
        if [[ ! -x "$bin/$name" ]]; then
            echo "building release binaries..." >&2
            nice -n 10 cargo build --release --workspace --bins >&2
            break
        fi
    done
    need_tools python3
}

# need_tools TOOL...: exits 2 naming the first one missing from PATH.
need_tools() {
    local tool
    for tool in "$@"; do
        command -v "$tool" >/dev/null || { echo "$tool is needed on PATH" >&2; exit 2; }
    done
}

# cpu_ticks PID: the process's utime+stime, in clock ticks.
cpu_ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }

# need_open_files N: raises `ulimit -n` to the hard limit; exits 2 if that
# is still below N.
need_open_files() {
    ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
    if (( $(ulimit -n) < $1 )); then
        echo "ulimit -n is $(ulimit -n); need at least $1 (raise the hard limit)" >&2
        exit 2
    fi
}

# free_port: a free TCP port on 127.0.0.1.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# wait_http URL: until it answers 200 (30 s at most), else exits 1.
wait_http() {
    for _ in $(seq 300); do
        curl -fs -o /dev/null "$1" && return 0
        sleep 0.1
    done
    echo "timed out waiting for $1" >&2
    exit 1
}

# stop_pids PID...: SIGTERM to each, then waits; a process that ignores
# SIGTERM for 15 s is killed.
stop_pids() {
    local pid
    for pid in "$@"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "$@"; do
        for _ in $(seq 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
}

# The distributed stack (docs/architecture.md): nats-server, the recorder
# and presence in PIDS (in start order), the servers under test of the
# current case in GW_PIDS. A script sets OUT, BIN and PREFIX (the
# subject prefix) before starting them, DB (a database it created at
# PG_URL, dropped by stop_stack) if any, and calls stop_stack on exit.
PIDS=()
GW_PIDS=()
DB=""

# start_nats: nats-server with JetStream (store in $OUT/js) on random
# loopback ports, log $OUT/nats.log; sets NATS_PID, NATS_URL and
# NATS_MON (its monitor port: /varz).
start_nats() {
    local port
    port=$(free_port); NATS_MON=$(free_port)
    nats-server -js -sd "$OUT/js" -a 127.0.0.1 -p "$port" -m "$NATS_MON" >"$OUT/nats.log" 2>&1 &
    NATS_PID=$!; PIDS+=("$NATS_PID")
    NATS_URL="nats://127.0.0.1:$port"
    wait_http "http://127.0.0.1:$NATS_MON/healthz"
}

# start_recorder DATABASE_URL: the recorder on NATS_URL, log
# $OUT/recorder.log; sets REC_PID and REC_ADMIN; waits until ready.
start_recorder() {
    REC_ADMIN=$(free_port)
    "$BIN/recorder" --admin-listen "127.0.0.1:$REC_ADMIN" --nats-url "$NATS_URL" \
        --subject-prefix "$PREFIX" --database-url "$1" >"$OUT/recorder.log" 2>&1 &
    REC_PID=$!; PIDS+=("$REC_PID")
    wait_http "http://127.0.0.1:$REC_ADMIN/readyz"
}

# start_presence [FLAG...]: presence on NATS_URL with FLAGs, log
# $OUT/presence.log; sets PRES_PID and PRES_ADMIN; waits until it holds
# the lease (it broadcasts only then), else exits 1.
start_presence() {
    PRES_ADMIN=$(free_port)
    "$BIN/presence" --admin-listen "127.0.0.1:$PRES_ADMIN" --nats-url "$NATS_URL" \
        --subject-prefix "$PREFIX" "$@" >"$OUT/presence.log" 2>&1 &
    PRES_PID=$!; PIDS+=("$PRES_PID")
    wait_http "http://127.0.0.1:$PRES_ADMIN/readyz"
    for _ in $(seq 300); do
        curl -fs "http://127.0.0.1:$PRES_ADMIN/metrics" | grep -Eq '^pingapp_presence_active 1' && return 0
        sleep 0.1
    done
    echo "presence never became active (see $OUT/presence.log)" >&2
    exit 1
}

# start_server NAME LOG FLAG...: $BIN/NAME (gateway or pingapp) with FLAGs
# on random loopback ports, log LOG; appends its pid to GW_PIDS, sets
# SERVER_URL (ws://...) and SERVER_ADMIN (host:port); waits until ready.
start_server() {
    local name=$1 log=$2 port
    shift 2
    port=$(free_port); SERVER_ADMIN="127.0.0.1:$(free_port)"
    "$BIN/$name" --listen "127.0.0.1:$port" --admin-listen "$SERVER_ADMIN" "$@" >"$log" 2>&1 &
    GW_PIDS+=($!)
    SERVER_URL="ws://127.0.0.1:$port"
    wait_http "http://$SERVER_ADMIN/readyz"
}

# stop_stack: stops the servers under test, then the stack in reverse
# order (presence and the recorder before nats-server); drops the database
# DB at PG_URL if DB is set; removes $OUT/js.
stop_stack() {
    stop_pids "${GW_PIDS[@]}"
    GW_PIDS=()
    local i
    for (( i=${#PIDS[@]}-1; i>=0; i-- )); do stop_pids "${PIDS[i]}"; done
    PIDS=()
    if [[ -n "${DB:-}" ]]; then
        psql "$PG_URL/postgres" -qc "drop database if exists $DB" >/dev/null 2>&1
    fi
    rm -rf "$OUT/js"
}
