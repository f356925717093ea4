#!/usr/bin/env bash
# One-command demo on a fresh Debian machine (as root): installs the dependencies,
# builds membridge, starts a local SeaweedFS S3 server on free loopback ports,
# and mounts a demo claude-mem directory in place. Nothing under ~/.claude-mem or
# ~/.claude-mem-minio is touched: the demo lives in $MEMBRIDGE_DEMO_ROOT.
set -euo pipefail
cd "$(dirname "$0")/.."
root="${MEMBRIDGE_DEMO_ROOT:-/tmp/membridge-demo}"

./scripts/install-deps.sh
echo "demo: building membridge (release)"
cargo build --release --quiet
bin="$PWD/target/release/membridge"

mkdir -p "$root"
# A previous demo: unmount and stop its server first.
if [ -f "$root/weed.pid" ]; then
  "$bin" --config "$root/config.env" unmount --lazy "$root/claude-mem" 2>/dev/null || true
  kill "$(cat "$root/weed.pid")" 2>/dev/null || true
  sleep 1
fi

read -r s3 s3g m mg v vg f fg a ag < <(python3 - <<'PY'
import socket
socks = [socket.socket() for _ in range(10)]
for s in socks: s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
)
secret="demo-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
mkdir -p "$root/s3"
AWS_ACCESS_KEY_ID=membridge-demo AWS_SECRET_ACCESS_KEY="$secret" \
  nohup weed mini -dir="$root/s3" -ip=127.0.0.1 -ip.bind=127.0.0.1 -admin.ui=false -webdav=false \
  -master.telemetry=false -s3.autoCreateBucket=false -s3.port.iceberg=0 -s3.port.lance=0 \
  -s3.port="$s3" -s3.port.grpc="$s3g" -master.port="$m" -master.port.grpc="$mg" \
  -volume.port="$v" -volume.port.grpc="$vg" -filer.port="$f" -filer.port.grpc="$fg" \
  -admin.port="$a" -admin.port.grpc="$ag" >"$root/weed.log" 2>&1 &
echo $! >"$root/weed.pid"

cat >"$root/config.env" <<CFG
# Demo config in the old tool's format (KEY=VALUE); membridge only reads it.
MINIO_ENDPOINT=http://127.0.0.1:$s3
MINIO_ACCESS_KEY=membridge-demo
MINIO_SECRET_KEY=$secret
MINIO_BUCKET=claude-mem-demo
CLAUDE_PROJECT_ID=membridge-demo
MEMBRIDGE_NODE_ID=demo-node
MEMBRIDGE_STATE_DIR=$root/state
CFG
chmod 600 "$root/config.env"
mb() { "$bin" --config "$root/config.env" "$@"; }

echo "demo: waiting for SeaweedFS on 127.0.0.1:$s3"
# doctor exits 0 (OK) or 4 (DEGRADED: nothing mounted yet) once S3 answers.
for _ in $(seq 1 120); do
  rc=0
  mb doctor --create-bucket >/dev/null 2>&1 || rc=$?
  if [ "$rc" -eq 0 ] || [ "$rc" -eq 4 ]; then break; fi
  sleep 0.5
done

dir="$root/claude-mem"
mkdir -p "$dir/logs"
if [ ! -f "$dir/claude-mem.db" ]; then
  sqlite3 "$dir/claude-mem.db" <<'SQL'
PRAGMA journal_mode=WAL;
CREATE TABLE observations(id INTEGER PRIMARY KEY, text TEXT, created_at TEXT);
CREATE TABLE session_summaries(id INTEGER PRIMARY KEY, summary TEXT);
CREATE TABLE user_prompts(id INTEGER PRIMARY KEY, prompt TEXT);
INSERT INTO observations(text, created_at) VALUES ('written before the mount', datetime('now'));
SQL
fi

mb mount "$dir"
echo "demo: writing through the mount"
sqlite3 "$dir/claude-mem.db" "PRAGMA synchronous=NORMAL; INSERT INTO observations(text, created_at) VALUES ('written through membridge', datetime('now'));"
echo "worker started" >>"$dir/logs/worker.log"
sqlite3 "$dir/claude-mem.db" "SELECT id, text FROM observations;"
mb status "$dir"
mb doctor "$dir" || true
cat <<MSG

demo: mounted $dir (config $root/config.env, S3 on 127.0.0.1:$s3)
  status:   $bin status $dir   (or cat $dir/.membridge/status.json)
  unmount:  $bin --config $root/config.env unmount $dir
  stop S3:  kill \$(cat $root/weed.pid)
MSG
