#!/usr/bin/env bash
# Latency of the store's inserts while packing runs: none, packing with the
# fence held through each transaction (before), and packing that takes the
# fence only to check and write (after), in one run on one database.
#
# Needs PostgreSQL (a user that may CREATE DATABASE):
#   PINGAPP_TEST_DATABASE_URL  default postgres://postgres@127.0.0.1:5432/postgres
#
# Usage: bash bench/pack_stall.sh [--clients 2000] [--per-client 600] [--batch 100]
set -euo pipefail
cd "$(dirname "$0")/.."
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
cargo build --release --quiet -p pingapp-recorder --example pack_stall
"${CARGO_TARGET_DIR:-target}/release/examples/pack_stall" "$@"
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
