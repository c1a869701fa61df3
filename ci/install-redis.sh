#!/usr/bin/env bash
# Installs what the cluster tests drive for real: Debian's redis-server (impl/tests/cluster.rs,
# the cluster benchmark). Idempotent. The tests start their own redis-server on a free loopback
# port with a temporary directory and no persistence, so the packaged service is stopped and
# disabled here.
set -euo pipefail
cd "$(dirname "$0")/.."

# Keep the package scripts from starting the service (containers without systemd would fail).
if [ ! -e /usr/sbin/policy-rc.d ] && ! command -v redis-server >/dev/null; then
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
  chmod +x /usr/sbin/policy-rc.d
  trap 'rm -f /usr/sbin/policy-rc.d' EXIT
fi
bash ci/setup.sh redis-server
if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
  systemctl disable --now redis-server.service >/dev/null 2>&1 || true
fi
for pid in $(pgrep -x redis-server || true); do
  # Only the packaged daemon: the one running as the redis user.
  if ps -o user= -p "$pid" | grep -qx redis; then
    echo "install-redis: stopping packaged redis-server (pid $pid)"
    kill "$pid" 2>/dev/null || true
  fi
done
# The tests need TLS (rediss://): Debian builds redis-server with it.
redis-server --version
