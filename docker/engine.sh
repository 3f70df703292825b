#!/usr/bin/env bash
# Make sure a Docker engine answers: install Debian's (docker.io, Compose v1, debootstrap for
# docker/local_bases.sh) and start dockerd in the background when none runs. Needs root for that;
# `make test` and .ci/run call it before the `docker` tests.
set -euo pipefail
if docker info >/dev/null 2>&1 && command -v debootstrap >/dev/null && \
   { command -v docker-compose >/dev/null || docker compose version >/dev/null 2>&1; }; then
  exit 0
fi
if [[ $(id -u) != 0 ]]; then
  echo "no Docker engine answers and this is not root: install and start one (docker info)" >&2
  exit 1
fi
missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v docker-compose >/dev/null || docker compose version >/dev/null 2>&1 || missing+=(docker-compose)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if (( ${#missing[@]} )); then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if ! docker info >/dev/null 2>&1; then
  setsid nohup dockerd >/var/log/emkum-dockerd.log 2>&1 </dev/null &
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
fi
docker info >/dev/null 2>&1 || { tail -20 /var/log/emkum-dockerd.log >&2; exit 1; }
echo "Docker engine $(docker info -f '{{.ServerVersion}}') answers"
