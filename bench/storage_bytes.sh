#!/usr/bin/env bash
# Bytes per sample on disk in Postgres (heap, TOAST and indexes) for the
# packed layout against the first layout (one row per sample), same
# synthetic samples, same database, same run; and the p50/p99 of a history
# read and of the widest statistics query on each.
#
# Needs PostgreSQL (a user that may CREATE DATABASE):
#   PINGAPP_TEST_DATABASE_URL  default postgres://postgres@127.0.0.1:5432/postgres
# Disk: about 450 bytes per sample while it runs (both layouts, the staging
# copy, WAL); the database is dropped at the end unless --keep.
#
# Usage: bash bench/storage_bytes.sh [SAMPLES] [CLIENTS] [--keep]
#   defaults: 10000000 samples, 1000 clients.
set -euo pipefail
cd "$(dirname "$0")/.."
samples="${1:-10000000}"
clients="${2:-1000}"
shift $(( $# > 2 ? 2 : $# ))
exec cargo run --release --quiet -p pingapp-recorder --example storage_bytes -- \
    --samples "$samples" --clients "$clients" "$@"
