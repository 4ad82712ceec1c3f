#!/usr/bin/env bash
# Entry point of the `postgres` service in deploy/local/compose.podman.yml:
# Debian's PostgreSQL server, initialised on first start like the official
# image does (POSTGRES_USER, POSTGRES_PASSWORD, POSTGRES_DB, the init
# script of the recorder's roles), then run in the
# foreground as the postgres user, so it receives the container's SIGTERM.
set -euo pipefail
: "${POSTGRES_USER:?POSTGRES_USER must be set}"
: "${POSTGRES_PASSWORD:?POSTGRES_PASSWORD must be set}"
POSTGRES_DB="${POSTGRES_DB:-$POSTGRES_USER}"
PGDATA="${PGDATA:-/var/lib/postgresql/data}"
bin="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)"
as_postgres() { setpriv --reuid=postgres --regid=postgres --init-groups "$@"; }

mkdir -p "$PGDATA" /run/postgresql
chown postgres:postgres "$PGDATA" /run/postgresql
chmod 700 "$PGDATA"
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    pwfile="$(mktemp)"
    printf '%s' "$POSTGRES_PASSWORD" >"$pwfile"
    chown postgres "$pwfile"
    as_postgres "$bin/initdb" -D "$PGDATA" -U "$POSTGRES_USER" --pwfile="$pwfile" \
        --auth-local=trust --auth-host=scram-sha-256 >/dev/null
    rm -f "$pwfile"
    echo "host all all all scram-sha-256" >>"$PGDATA/pg_hba.conf"
    if [ "$POSTGRES_DB" != postgres ]; then
        echo "CREATE DATABASE \"$POSTGRES_DB\" OWNER \"$POSTGRES_USER\";" |
            as_postgres "$bin/postgres" --single -D "$PGDATA" postgres >/dev/null
    fi
    # The recorder's roles (docs/security.md, "Postgres"), as the official
    # image's /docker-entrypoint-initdb.d would: on a server of its own,
    # reachable over its socket only, stopped again afterwards.
    if [ -f /docker-entrypoint-initdb.d/10-roles.sh ]; then
        as_postgres "$bin/pg_ctl" -D "$PGDATA" -w -o "-c listen_addresses='' -c unix_socket_directories=/run/postgresql" start >/dev/null
        as_postgres env PGHOST=/run/postgresql bash /docker-entrypoint-initdb.d/10-roles.sh
        as_postgres "$bin/pg_ctl" -D "$PGDATA" -w -m fast stop >/dev/null
    fi
    echo "pingapp-postgres: initialised $PGDATA (database $POSTGRES_DB)"
fi
exec setpriv --reuid=postgres --regid=postgres --init-groups \
    "$bin/postgres" -D "$PGDATA" -c listen_addresses='*' -c unix_socket_directories=/run/postgresql
