#!/usr/bin/env bash
# Every benchmark of benches/ in one run (real FUSE mounts, a real S3 server on
# loopback), then the summaries they wrote to target/membridge-bench/.
# Arguments go to the benches: `scripts/bench.sh -- lag` runs only the lag.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
out="${CARGO_TARGET_DIR:-target}/membridge-bench"
rm -f "$out"/*.txt
cargo bench "$@"
echo
echo "=== summary (load at end: $(cut -d' ' -f1-3 /proc/loadavg)) ==="
for f in io lag upload first_query daemon hooks handover-1mb memory; do
  if [ -f "$out/$f.txt" ]; then cat "$out/$f.txt"; fi
done
