#!/usr/bin/env bash
# Creates PingApp's two Postgres roles (roles.sql next to this file) in
# $POSTGRES_DB, at the first start of a fresh Postgres: the official image
# runs it from /docker-entrypoint-initdb.d (compose, k8s dev), and
# deploy/local/postgres.sh calls it for the Debian-built image. Passwords
# come from the environment (deploy/secrets.sh generates them).
set -euo pipefail
: "${PINGAPP_OWNER_PASSWORD:?PINGAPP_OWNER_PASSWORD must be set (deploy/secrets.sh)}"
: "${PINGAPP_RECORDER_PASSWORD:?PINGAPP_RECORDER_PASSWORD must be set (deploy/secrets.sh)}"
psql -X -q -v ON_ERROR_STOP=1 --username "${POSTGRES_USER:-postgres}" --dbname "${POSTGRES_DB:-pingapp}" \
    -v owner=pingapp_owner -v owner_password="$PINGAPP_OWNER_PASSWORD" \
    -v runtime=pingapp_recorder -v runtime_password="$PINGAPP_RECORDER_PASSWORD" \
    -f "${PINGAPP_ROLES_SQL:-/etc/pingapp/roles.sql}"
echo "pingapp: roles pingapp_owner and pingapp_recorder ready"
