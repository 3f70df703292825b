#!/usr/bin/env bash
# On the GPU machine: add one staged chunk (.stage/cN, carried with the call) to /tmp/st.
# The machine has no network, so data and packaged weights travel in <64 MiB chunks over warm calls.
set -euo pipefail
mkdir -p /tmp/st
cp -r ".stage/$1"/. /tmp/st/
du -sh /tmp/st; ls /tmp/st
