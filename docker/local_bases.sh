#!/usr/bin/env bash
# Make the base images the Dockerfiles and docker-compose.yml take, from Debian packages alone, for a
# machine that reaches no container registry (only Debian's mirror and PyPI).
#
#   docker/local_bases.sh            # make the three images (skips any that exist; --force remakes)
#   source <(docker/local_bases.sh --env)   # then docker compose builds and runs on them
#
# EMKUM_BASE_IMAGE        Debian bookworm, Python 3.11, with `python` and `pip` on PATH (a venv in
#                         /opt/python): the run-time stage of both images.
# EMKUM_BUILD_BASE_IMAGE  the same plus this machine's CA bundle, for the build stage only: pip inside
#                         a container reaches PyPI here only if it trusts that bundle. The shipped
#                         images copy their venv out of that stage, so the bundle never reaches them.
# EMKUM_PROMETHEUS_IMAGE  Debian's prometheus package (`prometheus` on PATH).
set -euo pipefail

BASE=${EMKUM_BASE_IMAGE:-emkum-local/python:3.11-bookworm}
BUILD_BASE=${EMKUM_BUILD_BASE_IMAGE:-emkum-local/python-build:3.11-bookworm}
PROMETHEUS=${EMKUM_PROMETHEUS_IMAGE:-emkum-local/prometheus:bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
CA_BUNDLE=${EMKUM_BUILD_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
WORK=${EMKUM_BASES_WORKDIR:-/var/tmp/emkum-bases}

if [[ "${1:-}" == "--env" ]]; then
  printf 'export EMKUM_BASE_IMAGE=%s\nexport EMKUM_BUILD_BASE_IMAGE=%s\nexport EMKUM_PROMETHEUS_IMAGE=%s\n' \
    "$BASE" "$BUILD_BASE" "$PROMETHEUS"
  exit 0
fi
FORCE=0
[[ "${1:-}" == "--force" ]] && FORCE=1

have() { [[ $FORCE == 0 ]] && docker image inspect "$1" >/dev/null 2>&1; }

# debootstrap a minimal bookworm with PACKAGES into DIR, trimmed of docs and apt lists.
rootfs() {
  local dir=$1 packages=$2
  rm -rf "$dir" && mkdir -p "$WORK/cache"
  debootstrap --variant=minbase --cache-dir="$WORK/cache" --include="$packages" bookworm "$dir" "$MIRROR" \
    >"$dir.log" 2>&1 || { tail -20 "$dir.log"; exit 1; }
  chroot "$dir" apt-get clean
  rm -rf "$dir"/var/lib/apt/lists/* "$dir"/usr/share/doc/* "$dir"/usr/share/man/* "$dir"/usr/share/locale/*
}

import_rootfs() {  # DIR NAME [--change ...]
  local dir=$1 name=$2
  shift 2
  tar -C "$dir" -c . | docker import "$@" - "$name" >/dev/null
  echo "made $name ($(docker image inspect -f '{{.Size}}' "$name" | awk '{printf "%.0f MB", $1/1e6}'))"
}

PATH_ENV="PATH=/opt/python/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

if ! have "$BASE"; then
  echo "debootstrap bookworm with Python 3.11 into $WORK/python (a few minutes) ..."
  rootfs "$WORK/python" python3,python3-venv,ca-certificates
  # A venv gives `python` and `pip` on PATH the way the official python image has them, and a pip
  # that installs into it (Debian's own pip refuses system-wide installs, PEP 668).
  chroot "$WORK/python" python3 -m venv /opt/python
  chroot "$WORK/python" /opt/python/bin/pip --version
  import_rootfs "$WORK/python" "$BASE" --change "ENV $PATH_ENV" --change "ENV LANG=C.UTF-8" \
    --change 'CMD ["python"]'
fi

if ! have "$BUILD_BASE"; then
  container=$(docker create "$BASE")
  docker cp "$CA_BUNDLE" "$container:/etc/ssl/certs/ca-certificates.crt"
  docker commit --change "ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt" \
    --change "ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt" "$container" "$BUILD_BASE" >/dev/null
  docker rm "$container" >/dev/null
  echo "made $BUILD_BASE ($BASE + the CA bundle $CA_BUNDLE; build stages only)"
fi

if ! have "$PROMETHEUS"; then
  echo "debootstrap bookworm with Debian's prometheus into $WORK/prometheus ..."
  rootfs "$WORK/prometheus" prometheus,ca-certificates,wget
  install -d -o 65534 -g 65534 "$WORK/prometheus/prometheus"  # the TSDB volume, owned as in prom/prometheus
  import_rootfs "$WORK/prometheus" "$PROMETHEUS" --change "USER nobody" --change "WORKDIR /prometheus" \
    --change 'ENTRYPOINT ["/usr/bin/prometheus"]' \
    --change 'CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]'
fi
rm -rf "$WORK/python" "$WORK/prometheus"
