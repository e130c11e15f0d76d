#!/bin/sh
# Startup guard of the third-party containers (Postgres, MinIO, the MLflow and Prefect servers, the Prefect worker):
#
#   sh refuse-placeholders.sh VAR [VAR ...] -- COMMAND [ARG ...]
#
# exits 1 naming every VAR whose value still holds the CHANGE-ME placeholder of deploy/env.example or
# deploy/k8s/secrets/*.env.example (never printing a value), and otherwise execs COMMAND. The FIGAN worker, service
# and explanation Jobs check the same in Python (flows.settings.refuse_placeholders). POSIX sh only: the MinIO and
# Postgres images have no Python. Shared by deploy/compose.yaml (bind mount) and deploy/k8s (ConfigMap figan-scripts).
set -eu

placeholder="CHANGE-ME"
left=""
while [ "$#" -gt 0 ] && [ "$1" != "--" ]; do
    case "$1" in
        "" | [0-9]* | *[!A-Za-z0-9_]*)
            echo "refuse-placeholders: '$1' is not a variable name" >&2
            exit 2 ;;
    esac
    eval "value=\${$1-}"
    case "$value" in
        *"$placeholder"*) left="$left $1" ;;
    esac
    shift
done
if [ "$#" -lt 2 ]; then
    echo "usage: refuse-placeholders.sh VAR [VAR ...] -- COMMAND [ARG ...]" >&2
    exit 2
fi
shift
if [ -n "$left" ]; then
    echo "refusing to start $1: still the $placeholder placeholder in:$left (set real values in deploy/.env or the component's Secret)" >&2
    exit 1
fi
exec "$@"
