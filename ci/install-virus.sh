#!/usr/bin/env bash
# Installs what the virus-scanning tests drive for real: clamd (clamav-daemon) and swaks.
# Idempotent. The tests start their own clamd with a private test-signature database, so the
# packaged daemons are stopped and disabled here, and freshclam never runs (no network needed).
set -euo pipefail
cd "$(dirname "$0")/.."

# Keep the package scripts from starting services (containers without systemd would fail).
if [ ! -e /usr/sbin/policy-rc.d ] && ! command -v clamd >/dev/null; then
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
  chmod +x /usr/sbin/policy-rc.d
  trap 'rm -f /usr/sbin/policy-rc.d' EXIT
fi
# swaks --tls needs Net::SSLeay; ci/swaks.sh makes its test certificate with openssl.
bash ci/setup.sh clamav-daemon swaks libnet-ssleay-perl openssl

# Stop and disable whatever the packages started: the packaged clamd would load no database
# (we never run freshclam) and freshclam would reach for the network.
if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
  for unit in clamav-daemon.service clamav-daemon.socket clamav-freshclam.service; do
    systemctl disable --now "$unit" >/dev/null 2>&1 || true
  done
fi
for name in clamd freshclam; do
  for pid in $(pgrep -x "$name" || true); do
    # Only the packaged daemons: those running as the clamav user or from /etc/clamav.
    if ps -o user= -p "$pid" | grep -qx clamav || grep -q /etc/clamav "/proc/$pid/cmdline" 2>/dev/null; then
      echo "install-virus: stopping packaged $name (pid $pid)"
      kill "$pid" 2>/dev/null || true
    fi
  done
done
echo "install-virus: $(clamd --version), swaks $(swaks --version 2>/dev/null | head -n1 | awk '{print $NF}')"
