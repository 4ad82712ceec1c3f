#!/usr/bin/env bash
# p50/p99 of a client's history read (limit=1000), of a device's month
# (31 days in 4-hour buckets) and of /api/stats in the shapes
# recorder/examples/support/scale.rs lists (the widest allowed, 31 days in
# hourly buckets; and as the baseline the minute rows 31 days in 10-minute
# buckets read before the coarser tiers) through the store's own read
# functions, at 1M, 10M and 100M samples in
# ONE run: each size adds clients to the previous size's data. The data is
# generated straight into the recorder's packed layout (blocks encoded by
# the store's encoder, rollups of every tier by its sketch, binary COPY into the
# day partitions); see recorder/examples/support/scale.rs for the spread
# (one-hour sessions at one sample a second over 31 days).
#
# Needs PostgreSQL (a user that may CREATE DATABASE):
#   PINGAPP_TEST_DATABASE_URL  default postgres://postgres@127.0.0.1:5432/postgres
# Disk: about 11 bytes per sample (~1.1 GB at 100M) plus WAL while it runs;
# the database is dropped at the end.
#
# Usage: bash bench/storage_scale.sh [SIZES]
#   default SIZES: 1000000,10000000,100000000 (ascending, comma-separated)
set -euo pipefail
cd "$(dirname "$0")/.."
sizes="${1:-1000000,10000000,100000000}"
shift $(( $# > 1 ? 1 : $# ))
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
cargo build --release --quiet -p pingapp-recorder --example storage_bytes
"${CARGO_TARGET_DIR:-target}/release/examples/storage_bytes" --scale "$sizes" "$@"
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
