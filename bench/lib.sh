# Shared by the bench scripts: source it after `cd` to the project root.

# need_release_binaries BIN: builds the release binaries of pingapp,
# echo-server and loadgen into BIN unless they are there, and checks for
# python3 (the summaries).
need_release_binaries() {
    local bin=$1
    if [[ ! -x "$bin/pingapp" || ! -x "$bin/echo-server" || ! -x "$bin/loadgen" ]]; then
        echo "building release binaries..." >&2
        nice -n 10 cargo build --release -p pingapp -p pingapp-loadgen >&2
    fi
    command -v python3 >/dev/null || { echo "python3 is needed for the summary" >&2; exit 2; }
}

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

# stop_pids PID...: SIGTERM to each, then waits; one that ignores it for
# 15 s is killed.
stop_pids() {
    local pid
    for pid in "$@"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "$@"; do
        for _ in $(seq 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
}

# wait_http URL: until it answers 200 (20 s at most, then exit 1).
wait_http() {
    for _ in $(seq 200); do
        curl -fs -o /dev/null "$1" && return 0
        sleep 0.1
    done
    echo "timed out waiting for $1" >&2
    exit 1
}
