#!/usr/bin/env bash
# The dashboard in headless Chromium and /metrics through promtool, against a real
# `jobz up` (see dashboard_test.py). Installs what it needs when missing: Debian's
# chromium and prometheus (for promtool), and websocket-client in a venv.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
if [ "${#need[@]}" -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "dashboard: FAIL: ${need[*]} missing and not root to install: apt-get install ${need[*]}" >&2
    exit 1
  fi
  echo "== installing ${need[*]} from Debian"
  timeout 600 apt-get update -qq
  DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

venv=target/ci-venv
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
timeout 300 "$venv/bin/pip" install -q --disable-pip-version-check 'websocket-client==1.9.*'

timeout 600 "$venv/bin/python" .ci/dashboard_test.py "$@"
