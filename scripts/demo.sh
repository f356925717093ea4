#!/usr/bin/env bash
# One-command demo on a fresh Debian machine (as root): two "machines" on one
# host, `desktop` and `laptop` (two data dirs, two state dirs, one local
# SeaweedFS S3 server on free loopback ports). A row written on the primary
# appears on the secondary (the delay is measured), the secondary refuses
# writes, the lease is handed over, and the new primary writes. Each node serves
# its status page. Nothing under ~/.claude-mem or ~/.claude-mem-minio is
# touched: everything lives in $MEMBRIDGE_DEMO_ROOT (default /tmp/membridge-demo)
# and is started afresh each run. `scripts/demo.sh stop` stops it all.
set -euo pipefail
cd "$(dirname "$0")/.."
root="${MEMBRIDGE_DEMO_ROOT:-/tmp/membridge-demo}"
bin="$PWD/target/release/membridge"
case "$root" in /|"") echo "demo: MEMBRIDGE_DEMO_ROOT must be a directory of its own" >&2; exit 1 ;; esac

mb() { local node=$1; shift; "$bin" --config "$root/$node.env" "$@"; }
db() { echo "$root/$1/claude-mem/claude-mem.db"; }
sql() { sqlite3 -cmd ".timeout 5000" "$(db "$1")" "$2"; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }

stop() {
  for node in desktop laptop; do
    if [ -f "$root/$node.env" ]; then
      mb "$node" unmount --lazy "$root/$node/claude-mem" >/dev/null 2>&1 || true
    fi
  done
  if [ -f "$root/weed.pid" ]; then
    local pid
    pid=$(cat "$root/weed.pid")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    rm -f "$root/weed.pid"
  fi
}

if [ "${1:-}" = stop ]; then
  stop
  echo "demo: stopped both nodes and SeaweedFS (files left in $root)"
  exit 0
fi

# Waits until node $1 has the row with text $2; prints the seconds since $3.
wait_row() {
  local node=$1 text=$2 start=$3
  for _ in $(seq 1 600); do
    if [ "$(sql "$node" "SELECT count(*) FROM observations WHERE text = '$text';" 2>/dev/null)" = 1 ]; then
      since "$start"
      return 0
    fi
    sleep 0.05
  done
  echo "demo: the row never appeared on $node" >&2
  return 1
}

MEMBRIDGE_DEPS_NO_BROWSER=1 ./scripts/install-deps.sh
echo "demo: building membridge (release)"
cargo build --release --quiet
t0=$(now)

stop
rm -rf "$root"
mkdir -p "$root"
read -r s3 s3g m mg v vg f fg a ag page_desktop page_laptop < <(python3 - <<'PY'
import socket
socks = [socket.socket() for _ in range(12)]
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

for node in desktop laptop; do
  port=$page_desktop
  [ "$node" = laptop ] && port=$page_laptop
  mkdir -p "$root/$node/claude-mem/logs"
  cat >"$root/$node.env" <<CFG
# Demo config of node $node in the old tool's format (KEY=VALUE); membridge only reads it.
MINIO_ENDPOINT=http://127.0.0.1:$s3
MINIO_ACCESS_KEY=membridge-demo
MINIO_SECRET_KEY=$secret
MINIO_BUCKET=claude-mem-demo
CLAUDE_PROJECT_ID=membridge-demo
MEMBRIDGE_NODE_ID=$node
MEMBRIDGE_STATE_DIR=$root/$node/state
MEMBRIDGE_METRICS_ADDR=127.0.0.1:$port
# A short lease, so that the hand-over takes seconds (default 30).
LEADERSHIP_LEASE_SECONDS=10
CFG
  chmod 600 "$root/$node.env"
done

echo "demo: waiting for SeaweedFS on 127.0.0.1:$s3"
# doctor exits 0 (OK) or 4 (DEGRADED: nothing mounted yet) once S3 answers.
for _ in $(seq 1 120); do
  rc=0
  mb desktop doctor --create-bucket >/dev/null 2>&1 || rc=$?
  if [ "$rc" -eq 0 ] || [ "$rc" -eq 4 ]; then break; fi
  sleep 0.5
done

# A row written on primary $1 and read back on follower $2, with the delay.
write_and_follow() {
  local from=$1 to=$2 start delay
  start=$(now)
  sql "$from" "PRAGMA synchronous=NORMAL; INSERT INTO observations(text, created_at) VALUES ('hello from $from', datetime('now'));" >/dev/null
  echo "$from\$ INSERT INTO observations ... 'hello from $from'"
  delay=$(wait_row "$to" "hello from $from" "$start")
  echo "$to\$ SELECT id, text FROM observations;   # the row arrived after ${delay} s"
  sql "$to" "SELECT id, text FROM observations;" | sed 's/^/  /'
}

# The desktop has a claude-mem database already; the laptop has nothing yet.
sqlite3 "$(db desktop)" >/dev/null <<'SQL'
PRAGMA journal_mode=WAL;
CREATE TABLE observations(id INTEGER PRIMARY KEY, text TEXT, created_at TEXT);
CREATE TABLE session_summaries(id INTEGER PRIMARY KEY, summary TEXT);
CREATE TABLE user_prompts(id INTEGER PRIMARY KEY, prompt TEXT);
INSERT INTO observations(text, created_at) VALUES ('written on desktop before the mount', datetime('now'));
SQL

echo
echo "== 1. two nodes, one bucket: the first to mount takes the lease"
mb desktop mount "$root/desktop/claude-mem"
mb laptop mount "$root/laptop/claude-mem"
for node in desktop laptop; do
  printf '%-8s %s\n' "$node:" "$("$bin" status "$root/$node/claude-mem" | grep '^role:' | tr -s ' ')"
done

echo
echo "== 2. a write on the primary (desktop) appears on the secondary (laptop)"
write_and_follow desktop laptop

echo
echo "== 3. the secondary refuses writes (WAL mode reports a refused write as an I/O error)"
echo "laptop\$ INSERT INTO observations ... 'written on the laptop'"
rc=0
out=$(sql laptop "INSERT INTO observations(text) VALUES ('written on the laptop');" 2>&1) || rc=$?
echo "  $out (exit $rc)"
[ "$rc" -ne 0 ] || { echo "demo: the secondary accepted a write" >&2; exit 1; }
"$bin" status "$root/laptop/claude-mem" | grep 'refused' | sed 's/^ */  status: /' || true

echo
echo "== 4. hand the lease over to the laptop (the desktop publishes everything first)"
echo "laptop\$ membridge leadership select laptop"
mb laptop leadership select laptop | sed 's/^/  /'
for _ in $(seq 1 200); do
  "$bin" status "$root/laptop/claude-mem" | grep -q '^role: *primary' && break
  sleep 0.1
done
for node in desktop laptop; do
  printf '%-8s %s\n' "$node:" "$("$bin" status "$root/$node/claude-mem" | grep '^role:' | tr -s ' ')"
done

echo
echo "== 5. the new primary (laptop) writes; the desktop follows"
write_and_follow laptop desktop
# Heartbeats come every 5 s: wait for the ones written since the hand-over.
for _ in $(seq 1 100); do
  mb laptop nodes 2>/dev/null | awk '
    $1 == "laptop" && $2 == "primary" && $3 == 2 { l = $4 }
    $1 == "desktop" && $2 == "secondary" && $3 == 2 { d = $4 }
    END { exit !(l != "" && l == d) }' && break
  sleep 0.1
done
echo
echo "laptop\$ membridge nodes"
mb laptop nodes | sed 's/^/  /'

for port in "$page_desktop" "$page_laptop"; do
  python3 -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)" \
    "http://127.0.0.1:$port/" || { echo "demo: no status page on port $port" >&2; exit 1; }
done
cat <<MSG

demo: $(since "$t0") s from the build to here

== 6. status pages (open them in a browser on this machine)
  desktop: http://127.0.0.1:$page_desktop/
  laptop:  http://127.0.0.1:$page_laptop/

Everything is in $root (configs desktop.env and laptop.env, S3 on 127.0.0.1:$s3).
  status:    $bin status $root/laptop/claude-mem
  stop all:  scripts/demo.sh stop
             (or: $bin --config $root/desktop.env unmount $root/desktop/claude-mem,
                  the same for laptop, then kill \$(cat $root/weed.pid))
MSG
