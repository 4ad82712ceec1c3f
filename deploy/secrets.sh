#!/usr/bin/env bash
# Generates the secrets of a local PingApp stack (docs/security.md,
# "Secrets"), once: files that exist are kept, so passwords stay those the
# Postgres volume was initialised with.
#
#   bash deploy/secrets.sh [DIR [POSTGRES_HOST]]
#
# DIR (default deploy/secrets, git-ignored) receives, mode 0600 in a 0700
# directory:
#   postgres.env   POSTGRES_USER/PASSWORD/DB (the superuser), and the
#                  passwords of pingapp_owner and pingapp_recorder
#   recorder.env   DATABASE_URL (pingapp_recorder) and
#                  PINGAPP_MIGRATE_DATABASE_URL (pingapp_owner)
#   grafana.env    GF_SECURITY_ADMIN_PASSWORD (user admin)
# POSTGRES_HOST (default postgres, the compose service) is the host in the
# URLs; the k8s dev overlay uses pingapp-postgres.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${1:-$ROOT/deploy/secrets}"
HOST="${2:-postgres}"

password() { head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n'; }

umask 077
mkdir -p "$DIR"
chmod 700 "$DIR"
if [ ! -s "$DIR/postgres.env" ] || [ ! -s "$DIR/recorder.env" ]; then
    superuser="$(password)" owner="$(password)" recorder="$(password)"
    cat >"$DIR/postgres.env" <<ENV
POSTGRES_USER=pingapp
POSTGRES_PASSWORD=$superuser
POSTGRES_DB=pingapp
PINGAPP_OWNER_PASSWORD=$owner
PINGAPP_RECORDER_PASSWORD=$recorder
ENV
    cat >"$DIR/recorder.env" <<ENV
DATABASE_URL=postgres://pingapp_recorder:$recorder@$HOST:5432/pingapp
PINGAPP_MIGRATE_DATABASE_URL=postgres://pingapp_owner:$owner@$HOST:5432/pingapp
ENV
    echo "deploy/secrets.sh: new Postgres passwords in $DIR"
fi
if [ ! -s "$DIR/grafana.env" ]; then
    echo "GF_SECURITY_ADMIN_PASSWORD=$(password)" >"$DIR/grafana.env"
    echo "deploy/secrets.sh: new Grafana admin password in $DIR/grafana.env"
fi
# Compose reads these files itself (env_file) and hands the values to the
# containers: they stay readable by their owner only.
chmod 600 "$DIR"/*.env
