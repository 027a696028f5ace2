#!/usr/bin/env bash
# Build the CPU images on a machine that reaches no image registry, only Debian's mirror and PyPI:
#
#   docker/build-local.sh          # `make docker`: coordinator, node-cpu and index, from the same Dockerfiles
#
# 1. wheels: every package the images install, fetched (or built) on this machine into docker/wheels/
# 2. base:   a Debian rootfs with Python 3 (mmdebstrap, the host's own apt sources), `docker import`ed;
#            --build-arg PYTHON_IMAGE puts it where python:3.11.18-slim-trixie stands for everyone else
# 3. images: `docker build --network none --build-arg PIP_NO_INDEX=1`, so the build needs no network
# 4. report: each image's size; and `docker save` of the three into one tar, whose path it prints last
#
# Everything large stays in $COMMONS_DOCKER_CACHE (default /var/cache/commons-docker): the wheels, the
# rootfs, the daemon's data root and the saved tar, so a second run rebuilds only what changed. With
# DOCKER_HOST set it builds with that daemon; otherwise it starts a private dockerd there (root) and
# stops it at the end.
# Debian's docker.io client is used: its `docker build` speaks BuildKit without the buildx plugin.
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE=${COMMONS_DOCKER_CACHE:-/var/cache/commons-docker}
VERSION=$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml)
IMAGES="coordinator node-cpu index"
BASE_PACKAGES="python3,python3-venv,python-is-python3,ca-certificates,netbase"
PY=.venv/bin/python
[ -x "$PY" ] || PY=python3
mkdir -p "$CACHE"
say() { printf 'build-local: %s\n' "$*" >&2; }
elapsed() { echo "$(( $(date +%s) - $1 ))s"; }

# ---- tools: Debian's daemon and client, and mmdebstrap
if ! command -v dockerd >/dev/null || [ ! -x /usr/bin/docker ] || ! command -v mmdebstrap >/dev/null; then
    if [ "$(id -u)" != 0 ]; then
        say "needs dockerd, Debian's docker client and mmdebstrap: apt-get install docker.io mmdebstrap (as root)"
        exit 1
    fi
    say "installing docker.io and mmdebstrap"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker.io mmdebstrap >/dev/null
fi
DOCKER=/usr/bin/docker
export DOCKER_BUILDKIT=1

# One build at a time per cache: a data root serves one daemon.
exec 9>"$CACHE/lock"
flock 9

# ---- 1. wheels, one folder per lock file: a changed pin fetches anew, an unchanged one fetches nothing
started=$(date +%s)
torch=$(grep -o 'torch==[0-9.]*' docker/Dockerfile.node-cpu)
lock_key=$(cat docker/requirements.txt <(echo "$torch") | sha256sum | cut -c1-16)
wheels="$CACHE/wheels/$lock_key"
if [ ! -f "$wheels/.complete" ]; then
    say "fetching wheels into $wheels"
    mkdir -p "$wheels"
    # pip wheel takes a package's wheel where PyPI has one and builds the rest (fastecdsa needs libgmp-dev)
    nice -n 10 "$PY" -m pip wheel -q --no-deps --wheel-dir "$wheels" "$torch" -r docker/requirements.txt \
        2> >(grep -v "^WARNING: Location '" >&2)  # a pip.conf naming local indexes warns once per package
    touch "$wheels/.complete"
    # the wheels of earlier pins are never used again
    find "$CACHE/wheels" -mindepth 1 -maxdepth 1 ! -name "$lock_key" -exec rm -rf {} +
fi
find docker/wheels -name '*.whl' -delete
cp -l "$wheels"/*.whl docker/wheels/ 2>/dev/null || cp "$wheels"/*.whl docker/wheels/
say "wheels: $(find docker/wheels -name '*.whl' | wc -l) in docker/wheels ($(elapsed "$started"))"

# ---- 2. the base rootfs, keyed on what goes into it
started=$(date +%s)
suite=${COMMONS_DEBIAN_SUITE:-$(sed -n 's/^VERSION_CODENAME=//p' /etc/os-release)}
sources=/etc/apt/sources.list.d/debian.sources
[ -f "$sources" ] || sources=/etc/apt/sources.list
base_key=$(cat "$sources" <(echo "$suite $BASE_PACKAGES") | sha256sum | cut -c1-12)
rootfs="$CACHE/base/$suite-$base_key.tar"
BASE_IMAGE="lora-commons/python-base:$suite-$base_key"
if [ ! -f "$rootfs" ]; then
    say "making the $suite base with mmdebstrap from $sources (2-3 minutes)"
    mkdir -p "$CACHE/base"
    nice -n 10 mmdebstrap --quiet --variant=minbase --include="$BASE_PACKAGES" \
        --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*' \
        --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
        --dpkgopt='path-include=/usr/share/doc/*/copyright' \
        "$suite" "${rootfs%.tar}.part.tar" "$sources"  # mmdebstrap picks the format from the name's end
    mv "${rootfs%.tar}.part.tar" "$rootfs"
    find "$CACHE/base" -name '*.tar' ! -name "${rootfs##*/}" -delete
fi
say "base rootfs: $rootfs ($(elapsed "$started"))"

# ---- the daemon: the caller's, or a private one on the cache's data root
start_dockerd() {  # $1: storage driver; returns once it answers, 1 if it exits or stays silent 60 s
    # no bridge or iptables: dockerd runs inside containers and VMs alike; containers use the host's network
    nice -n 10 dockerd --storage-driver "$1" --iptables=false --bridge=none --host "$DOCKER_HOST" \
        --data-root "$CACHE/docker-$1" --exec-root "/run/commons-docker-$$" --pidfile "$run/dockerd.pid" \
        >"$run/dockerd-$1.log" 2>&1 &
    dockerd_pid=$!
    for _ in $(seq 60); do
        "$DOCKER" version >/dev/null 2>&1 && return 0
        kill -0 "$dockerd_pid" 2>/dev/null || return 1
        sleep 1
    done
    kill "$dockerd_pid"
    wait "$dockerd_pid" || true
    return 1
}
if [ -z "${DOCKER_HOST:-}" ]; then
    if [ "$(id -u)" != 0 ]; then
        say "starting dockerd needs root; or point DOCKER_HOST at a running daemon"
        exit 1
    fi
    run="$CACHE/run"
    mkdir -p "$run"
    export DOCKER_HOST="unix://$run/docker.sock"
    dockerd_pid=""
    stop_dockerd() {
        kill "$dockerd_pid" 2>/dev/null
        wait "$dockerd_pid" 2>/dev/null
        # dockerd leaves its default network namespace mounted in the exec root
        awk -v root="/run/commons-docker-$$/" 'index($2, root) == 1 {print $2}' /proc/self/mounts \
            | xargs -r umount --lazy
        rm -rf "/run/commons-docker-$$"
    }
    trap stop_dockerd EXIT
    # overlay2 stores a layer once; vfs, where overlay mounts are refused, copies every layer whole
    start_dockerd overlay2 || start_dockerd vfs || { say "dockerd did not start: see $run/dockerd-*.log"; exit 1; }
fi
if ! "$DOCKER" image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    "$DOCKER" image ls --format '{{.Repository}}:{{.Tag}}' lora-commons/python-base | xargs -r "$DOCKER" rmi >/dev/null
    "$DOCKER" import --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' "$rootfs" "$BASE_IMAGE" >/dev/null
fi

# ---- 3. the images
for name in $IMAGES; do
    started=$(date +%s)
    nice -n 10 "$DOCKER" build --quiet --network none -f "docker/Dockerfile.$name" \
        --build-arg PYTHON_IMAGE="$BASE_IMAGE" --build-arg PIP_NO_INDEX=1 \
        -t "lora-commons/$name:$VERSION" . >/dev/null
    say "built lora-commons/$name:$VERSION ($(elapsed "$started"))"
done
say "not built: lora-commons/node (CUDA), whose base nvidia/cuda:13.0.1-base-ubuntu24.04 needs a registry"
# An image rebuilt leaves its old layers behind: drop them, and keep the build cache bounded.
"$DOCKER" image prune --force >/dev/null
"$DOCKER" builder prune --force --keep-storage 10GB >/dev/null

# ---- 4. sizes (the three share every layer but the last, small one), and one tar of all three for
# `docker load` on another machine (and for tests/test_docker_run.py), saved again only when they change
tags=""
for name in $IMAGES; do
    tags="$tags lora-commons/$name:$VERSION"
    "$DOCKER" image ls --format '{{.Repository}}:{{.Tag}}  {{.Size}}' "lora-commons/$name:$VERSION"
done
"$DOCKER" image ls --format '{{.Repository}}:{{.Tag}}  {{.Size}}  (the base)' "$BASE_IMAGE"
mkdir -p "$CACHE/images"
saved="$CACHE/images/lora-commons.tar"
# shellcheck disable=SC2086 # $tags is a list of image names
ids=$("$DOCKER" image inspect --format '{{.Id}}' $tags)
if [ "$ids" != "$(cat "$saved.ids" 2>/dev/null)" ]; then
    started=$(date +%s)
    # shellcheck disable=SC2086
    nice -n 10 "$DOCKER" save --output "$saved.part" $tags
    mv "$saved.part" "$saved"
    echo "$ids" >"$saved.ids"
    say "saved the three images to $saved ($(elapsed "$started"))"
fi
echo "$saved"
