#!/usr/bin/env bash
# Debian packages some tests drive for real: OpenSSH's sshd (the SSH-host tests) and Chromium
# (the dashboard's browser tests); and wrk, the C load generator of `make bench` (H1).
# Idempotent; needs root (CI runs as root) and the Debian mirror.
set -euo pipefail
need=()
command -v /usr/sbin/sshd >/dev/null 2>&1 || need+=(openssh-server)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v wrk >/dev/null 2>&1 || need+=(wrk)
if ((${#need[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "system-deps: missing ${need[*]} and not root: install them with apt-get" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
