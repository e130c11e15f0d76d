#!/usr/bin/env bash
# Build (and smoke-run) the FIGAN images with podman on a Debian machine that has no Docker engine and no container
# registry: the base image is made locally with debootstrap (Debian bookworm: python3 3.11 + venv + git), then
# deploy/Dockerfile.{service,worker} build on it with BASE_IMAGE=localhost/figan-base:bookworm.
#
#   apt-get install -y podman buildah runc debootstrap uidmap slirp4netns fuse-overlayfs
#   scripts/podman_build.sh [service|worker|both|postgres|s3|stand-ins] [--smoke]
#
# postgres, s3 (stand-ins: both): the stand-ins for the registry images of deploy/compose.yaml that
# scripts/compose_smoke.py runs with deploy/compose.smoke.yaml: Debian's PostgreSQL (localhost/figan-postgres:smoke)
# and moto's S3 server (localhost/figan-s3:smoke), on the same base.
#
# Rootful podman inside an unprivileged sandbox: runc, cgroupfs, the vfs storage driver (no overlay mounts), host
# networking for the build (pip needs PyPI), explicit ulimits within the caller's hard limits. Where pip reaches
# PyPI through a TLS-intercepting proxy, the host's CA bundle is mounted into the build and named in a pip.conf;
# a local torch wheel folder (FIGAN_WHEELS, default /opt/wheels) stands in for the PyTorch CPU index if that is
# unreachable. Image format: docker (OCI images drop HEALTHCHECK). --layers=false: with vfs every layer is a full
# copy of the root filesystem (~3.5 GB here), so 20 cached layers would take ~60 GB of disk; one layer takes ~4.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WHAT="${1:-service}"
SMOKE="${2:-}"
WORK="${FIGAN_PODMAN_WORK:-/tmp/figan-podman}"
WHEELS="${FIGAN_WHEELS:-/opt/wheels}"
BASE=localhost/figan-base:bookworm
NOFILE="$(ulimit -Hn)"; NOFILE=$(( NOFILE > 65536 ? 65536 : NOFILE ))
P=(podman --runtime runc --cgroup-manager cgroupfs --storage-driver vfs)
LIMITS=(--ulimit "nofile=${NOFILE}:${NOFILE}" --ulimit nproc=8192:8192)
mkdir -p "$WORK"

if ! "${P[@]}" image exists "$BASE"; then
  echo "== base image: debootstrap bookworm → $BASE"
  rm -rf "$WORK/rootfs"
  debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates,git \
    bookworm "$WORK/rootfs" http://deb.debian.org/debian
  tar -C "$WORK/rootfs" -c . | "${P[@]}" import - "$BASE"
  rm -rf "$WORK/rootfs"
fi

cat > "$WORK/pip.conf" <<EOF
[global]
cert = /etc/ssl/certs/ca-certificates.crt
find-links = /wheels
EOF

build() {   # $1: service|worker|postgres|s3
  local file tag context="$ROOT"
  case "$1" in
    service|worker) file="$ROOT/deploy/Dockerfile.$1"; tag="localhost/figan-$1:dev" ;;
    postgres) file="$ROOT/deploy/smoke/Containerfile.postgres"; tag=localhost/figan-postgres:smoke
              context="$ROOT/deploy/smoke" ;;
    s3) file="$ROOT/deploy/smoke/Containerfile.s3"; tag=localhost/figan-s3:smoke ;;
  esac
  echo "== build $tag"
  time "${P[@]}" build --layers=false --format docker --network host "${LIMITS[@]}" \
    -v /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro \
    -v "$WORK/pip.conf:/etc/pip.conf:ro" -v "$WHEELS:/wheels:ro" \
    --build-arg BASE_IMAGE="$BASE" -f "$file" -t "$tag" "$context"
}

smoke() {   # $1: service|worker — imports, the CLI, the user, and (service) the health endpoint
  echo "== smoke figan-$1"
  "${P[@]}" run --rm --network none "${LIMITS[@]}" "localhost/figan-$1:dev" \
    sh -c 'id && python3 -c "import torch, mlflow, prefect, bentoml, dvc, flows.explain, services; print(\"torch\", torch.__version__, \"mlflow\", mlflow.__version__)" && figan --help | head -3'
  "${P[@]}" image inspect --format '{{json .Config.Healthcheck}} user={{.Config.User}} cmd={{json .Config.Cmd}}' \
    "localhost/figan-$1:dev"
}

case "$WHAT" in
  service|worker) build "$WHAT"; if [ "$SMOKE" = --smoke ]; then smoke "$WHAT"; fi ;;
  both) build service; build worker; if [ "$SMOKE" = --smoke ]; then smoke service; smoke worker; fi ;;
  postgres|s3) build "$WHAT" ;;
  stand-ins) build postgres; build s3 ;;
  *) echo "usage: $0 [service|worker|both|postgres|s3|stand-ins] [--smoke]" >&2; exit 2 ;;
esac
