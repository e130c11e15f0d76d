#!/bin/sh
# The part of the official postgres image's docker-entrypoint.sh that deploy/compose.yaml relies on, for Debian's
# PostgreSQL (deploy/smoke/Containerfile.postgres):
#   docker-entrypoint.sh postgres [ARG ...]
# On an empty $PGDATA: initdb (superuser `postgres` with $POSTGRES_PASSWORD, scram-sha-256 for TCP, trust on the
# container's own Unix socket), then every /docker-entrypoint-initdb.d/*.sql through psql (ON_ERROR_STOP) on a
# server listening on the socket only. Then exec postgres on every address. A failed init removes nothing: the
# data folder keeps no PG_VERSION until initdb succeeds, and a failed script leaves the error in the log.
set -eu

: "${PGDATA:=/var/lib/postgresql/data}"
if [ "${1:-}" != "postgres" ]; then
    exec "$@"
fi
shift

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    : "${POSTGRES_PASSWORD:?POSTGRES_PASSWORD is not set: the superuser needs a password}"
    pwfile="$(mktemp)"
    printf '%s\n' "$POSTGRES_PASSWORD" > "$pwfile"
    initdb -D "$PGDATA" -U postgres --pwfile="$pwfile" --auth-local=trust --auth-host=scram-sha-256 \
        -E UTF8 --locale=C.UTF-8
    rm -f "$pwfile"
    printf "listen_addresses = '*'\n" >> "$PGDATA/postgresql.conf"
    printf 'host all all all scram-sha-256\n' >> "$PGDATA/pg_hba.conf"

    # init scripts against a socket-only server, as the official image does
    sockdir="$(mktemp -d)"
    pg_ctl -D "$PGDATA" -o "-c listen_addresses='' -k $sockdir" -w -t 60 start
    for f in /docker-entrypoint-initdb.d/*.sql; do
        [ -e "$f" ] || continue
        echo "docker-entrypoint.sh: running $f"
        psql -v ON_ERROR_STOP=1 -h "$sockdir" -U postgres -d "${POSTGRES_DB:-postgres}" -f "$f"
    done
    pg_ctl -D "$PGDATA" -m fast -w stop
    rmdir "$sockdir"
fi

exec postgres -D "$PGDATA" "$@"
