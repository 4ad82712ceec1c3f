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
