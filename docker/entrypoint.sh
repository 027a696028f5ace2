#!/bin/sh
# Runs before every container command. On first start it creates this container's identity (an ed25519
# key) inside the $COMMONS_HOME volume: images never carry keys, and a restarted container keeps its key.
set -eu

: "${COMMONS_HOME:?COMMONS_HOME must be set (the images set it to /data)}"

if [ ! -f "$COMMONS_HOME/identity/ed25519.key" ]; then
    commons init </dev/null
fi

exec "$@"
