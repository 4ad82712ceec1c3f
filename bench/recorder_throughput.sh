#!/usr/bin/env bash
# Recorder throughput: samples/s from JetStream into Postgres through the
# real recorder, next to raw UNNEST inserts straight into Postgres (the
# baseline), so the ratio shows what NATS and the consume loop cost.
#
# Needs PostgreSQL (a user that may CREATE DATABASE) and NATS with JetStream:
#   PINGAPP_TEST_DATABASE_URL  default postgres://postgres@127.0.0.1:5432/postgres
#   PINGAPP_TEST_NATS_URL      default nats://127.0.0.1:4222
#
# Usage: bash bench/recorder_throughput.sh [SAMPLES] [BATCH] [SAMPLES_PER_INSERT]
#   defaults: 1000000 samples, 1000 per stream message, 5000 per insert.
set -euo pipefail
cd "$(dirname "$0")/.."
samples="${1:-1000000}"
batch="${2:-1000}"
per_insert="${3:-5000}"
exec cargo run --release --quiet -p pingapp-recorder --example throughput -- \
    --samples "$samples" --batch "$batch" --batch-max-samples "$per_insert"
