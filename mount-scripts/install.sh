#!/bin/sh
# install.sh: install membridge, its mount helper, systemd units and the Claude
# CLI integration.
#
#   mount-scripts/install.sh [--dry-run] [--prefix DIR] [options]
#
# Installs (PREFIX defaults to /usr/local):
#   PREFIX/bin/membridge                        the binary (--bin FILE, default
#                                               target/release/membridge, else target/debug/)
#   SBIN/mount.fuse.membridge, mount.membridge  the mount(8) helper (SBIN: /sbin,
#                                               the only place mount(8) looks)
#   PREFIX/bin/membridge-session-start          waits (bounded) for the mount
#   PREFIX/lib/membridge/bin/claude             the claude wrapper (not on PATH by itself)
#   PREFIX/share/membridge/claude-settings.json the SessionStart hook snippet
#   UNITS/membridge@.service                    the service template
#   UNITS/<escaped mount dir>.mount             the mount unit for --mount-dir
#
# It enables nothing, and it never writes the mounted directory, ~/.claude
# (the Claude CLI's settings and credentials) or ~/.claude-mem-minio/config.env:
# the last lines it prints say what to run or add by hand. One exception: the
# old hook-based tool's hooks in ~/.claude/settings.json (claude-mem-hook-pull,
# claude-mem-hook-push, ...) are disabled, because on a membridge secondary
# they fail and leave database-sized temporary files in the mount; the file
# as it was is kept beside it (settings.json.before-membridge-<utc>) and the
# removed commands are printed (--keep-old-hooks leaves them).
#
# Options:
#   --dry-run          print every action, change nothing
#   --prefix DIR       default /usr/local
#   --bin FILE         the membridge binary to install
#   --sbin-dir DIR     where the helper goes (default /sbin)
#   --unit-dir DIR     systemd units (default /etc/systemd/system)
#   --no-units         skip the systemd units
#   --user NAME        whose ~/.claude-mem the mount unit mounts (default: you);
#                      the daemon then runs as NAME (setuid= mount option)
#   --mount-dir DIR    the directory to mount (default: NAME's ~/.claude-mem)
#   --project NAME     CLAUDE_PROJECT_ID for the mount unit (default: from the
#                      config file)
#   --keep-old-hooks   leave the old tool's Claude hooks in place
#   --claude-settings FILE  the Claude settings to look for them in (default:
#                      NAME's ~/.claude/settings.json)
set -eu

prog=install.sh
die() {
    printf '%s: %s\n' "$prog" "$*" >&2
    exit 1
}

here=$(cd "$(dirname -- "$0")" && pwd -P)
repo=$(dirname -- "$here")

dry_run=
prefix=/usr/local
bin=
sbin_dir=/sbin
unit_dir=/etc/systemd/system
units=1
user=$(id -un)
mount_dir=
project=membridge
keep_old_hooks=
claude_settings=

need_arg() {
    if [ $# -lt 2 ] || [ -z "$2" ]; then die "$1 needs a value"; fi
}
while [ $# -gt 0 ]; do
    case $1 in
        --dry-run | -n) dry_run=1; shift ;;
        --prefix) need_arg "$@"; prefix=$2; shift 2 ;;
        --prefix=*) prefix=${1#*=}; shift ;;
        --bin) need_arg "$@"; bin=$2; shift 2 ;;
        --bin=*) bin=${1#*=}; shift ;;
        --sbin-dir) need_arg "$@"; sbin_dir=$2; shift 2 ;;
        --sbin-dir=*) sbin_dir=${1#*=}; shift ;;
        --unit-dir) need_arg "$@"; unit_dir=$2; shift 2 ;;
        --unit-dir=*) unit_dir=${1#*=}; shift ;;
        --no-units) units=; shift ;;
        --user) need_arg "$@"; user=$2; shift 2 ;;
        --user=*) user=${1#*=}; shift ;;
        --mount-dir) need_arg "$@"; mount_dir=$2; shift 2 ;;
        --mount-dir=*) mount_dir=${1#*=}; shift ;;
        --project) need_arg "$@"; project=$2; shift 2 ;;
        --project=*) project=${1#*=}; shift ;;
        --keep-old-hooks) keep_old_hooks=1; shift ;;
        --claude-settings) need_arg "$@"; claude_settings=$2; shift 2 ;;
        --claude-settings=*) claude_settings=${1#*=}; shift ;;
        -h | --help) sed -n '2,/^set -eu/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument $1 (try --help)" ;;
    esac
done

case $prefix in /*) ;; *) die "--prefix must be absolute: $prefix" ;; esac
prefix=${prefix%/}

if [ -z "$bin" ]; then
    for c in "$repo/target/release/membridge" "$repo/target/debug/membridge"; do
        if [ -x "$c" ]; then bin=$c; break; fi
    done
    [ -n "$bin" ] || die "no membridge binary: build it first (cargo build --release) or pass --bin FILE"
fi
if [ ! -f "$bin" ] || [ ! -x "$bin" ]; then die "--bin $bin: not an executable file"; fi

user_home=$(getent passwd "$user" 2>/dev/null | cut -d: -f6) || user_home=
[ -n "$user_home" ] || die "--user $user: no such user"
[ -n "$mount_dir" ] || mount_dir=$user_home/.claude-mem
[ -n "$claude_settings" ] || claude_settings=$user_home/.claude/settings.json
case $mount_dir in /*) ;; *) die "--mount-dir must be absolute: $mount_dir" ;; esac
mount_dir=${mount_dir%/}

bindir=$prefix/bin
installed_bin=$bindir/membridge
session_start=$bindir/membridge-session-start
wrapper_dir=$prefix/lib/membridge/bin
share=$prefix/share/membridge

# What must never be written: the data, the Claude CLI's own files and the old
# tool's config, for the target user and for whoever runs this.
protected="$mount_dir $user_home/.claude-mem $user_home/.claude $user_home/.claude-mem-minio"
if [ -n "${HOME:-}" ]; then
    protected="$protected $HOME/.claude-mem $HOME/.claude $HOME/.claude-mem-minio"
fi
guard() {
    for p in $protected; do
        case $1 in
            "$p" | "$p"/*) die "refusing to write $1: it is inside $p, which install.sh never touches" ;;
        esac
    done
}

say() {
    if [ -n "$dry_run" ]; then
        printf 'would: %s\n' "$*"
    else
        printf '+ %s\n' "$*"
    fi
}

# `sed` replacement text with its special characters escaped.
sed_quote() {
    printf '%s' "$1" | sed 's/[\\|&]/\\&/g'
}

# install SRC DST MODE
put() {
    guard "$2"
    say "install -m $3 $1 $2"
    [ -n "$dry_run" ] && return 0
    mkdir -p "$(dirname -- "$2")"
    install -m "$3" "$1" "$2"
}

# render SRC DST MODE SED-SCRIPT: SRC with the install paths filled in.
render() {
    guard "$2"
    say "install -m $3 $2 (from $1, paths filled in)"
    [ -n "$dry_run" ] && return 0
    mkdir -p "$(dirname -- "$2")"
    t=$(mktemp "$(dirname -- "$2")/.membridge-install.XXXXXX")
    if ! sed "$4" "$1" >"$t"; then
        rm -f "$t"
        die "rendering $1 failed"
    fi
    chmod "$3" "$t"
    mv -f "$t" "$2"
}

link() {
    guard "$2"
    say "ln -sfn $1 $2"
    [ -n "$dry_run" ] && return 0
    mkdir -p "$(dirname -- "$2")"
    ln -sfn "$1" "$2"
}

[ -n "$dry_run" ] && echo "$prog: dry run: printing what would be done; nothing is changed"

q_bin=$(sed_quote "$installed_bin")
q_start=$(sed_quote "$session_start")

put "$bin" "$installed_bin" 0755
render "$here/mount.membridge" "$sbin_dir/mount.fuse.membridge" 0755 "s|@MEMBRIDGE_BIN@|$q_bin|g"
link mount.fuse.membridge "$sbin_dir/mount.membridge"
render "$here/membridge-session-start" "$session_start" 0755 "s|@MEMBRIDGE_BIN@|$q_bin|g"
render "$here/claude" "$wrapper_dir/claude" 0755 "s|@SESSION_START@|$q_start|g"
render "$here/claude-settings.json" "$share/claude-settings.json" 0644 \
    "s|/usr/local/bin/membridge-session-start|$q_start|g"

mount_unit=
if [ -n "$units" ]; then
    render "$here/systemd/membridge@.service" "$unit_dir/membridge@.service" 0644 \
        "s|/usr/local/bin/membridge|$q_bin|g"
    if command -v systemd-escape >/dev/null 2>&1; then
        mount_unit=$(systemd-escape -p --suffix=mount "$mount_dir")
        options="_netdev,nofail,config=$user_home/.claude-mem-minio/config.env"
        [ "$user" = root ] || options="$options,setuid=$user"
        render "$here/systemd/root-.claude\\x2dmem.mount" "$unit_dir/$mount_unit" 0644 "
s|^Options=.*|Options=$(sed_quote "$options")|
s|^What=.*|What=$(sed_quote "$project")|
/^Options=/!s|/root/.claude-mem|$(sed_quote "$mount_dir")|g
s|root-\\.claude\\\\x2dmem\\.mount|$(sed_quote "$mount_unit")|g
s|root's ~/.claude-mem|$(sed_quote "$mount_dir")|"
    else
        echo "$prog: systemd-escape not found: no mount unit written (the service template is)"
    fi
fi

# The old tool's hooks: every hook whose command runs one of its scripts.
old_hooks='claude-mem-hook-pull|claude-mem-hook-push|claude-mem-pull|claude-mem-push|sqlite_minio_sync|cm-pull|cm-push'
if [ -z "$keep_old_hooks" ] && [ -f "$claude_settings" ] && grep -Eq "$old_hooks" "$claude_settings"; then
    command -v python3 >/dev/null 2>&1 ||
        die "$claude_settings runs the old tool's hooks and python3 (to edit it) is missing: remove them by hand, or pass --keep-old-hooks"
    backup=$claude_settings.before-membridge-$(date -u +%Y%m%dT%H%M%SZ)
    say "disable the old tool's hooks in $claude_settings (the file as it was kept as $backup)"
    if [ -z "$dry_run" ]; then
        cp -p "$claude_settings" "$backup"
        python3 - "$claude_settings" "$old_hooks" <<'PY' || die "could not edit $claude_settings (unchanged; the copy is $backup)"
import json, os, re, sys
path, pattern = sys.argv[1], re.compile(sys.argv[2])
with open(path) as f:
    settings = json.load(f)
removed = []
hooks = settings.get("hooks") or {}
for event in list(hooks):
    groups = []
    for group in hooks[event]:
        kept = []
        for h in group.get("hooks", []):
            if pattern.search(str(h.get("command", ""))):
                removed.append(f"{event}: {h.get('command')}")
            else:
                kept.append(h)
        if kept:
            groups.append(dict(group, hooks=kept))
    if groups:
        hooks[event] = groups
    else:
        del hooks[event]
tmp = path + ".membridge-tmp"
with open(tmp, "w") as f:
    json.dump(settings, f, indent=2)
    f.write("\n")
os.replace(tmp, path)
for r in removed:
    print(f"install.sh: disabled the old tool's hook {r}")
PY
        echo "$prog: the settings as they were: $backup"
    fi
fi

if [ -n "$dry_run" ]; then
    echo "$prog: dry run done; nothing was changed"
    exit 0
fi

cat <<EOF

Installed. Nothing is enabled or mounted yet; choose one way to mount $mount_dir:
  fstab:    $project  $mount_dir  fuse.membridge  _netdev,nofail,config=$user_home/.claude-mem-minio/config.env$([ "$user" = root ] || printf ',setuid=%s' "$user")  0 0
EOF
if [ -n "$mount_unit" ]; then
    cat <<EOF
  mount:    systemctl daemon-reload && systemctl enable --now '$mount_unit'
  service:  systemctl daemon-reload && systemctl enable --now 'membridge@${mount_unit%.mount}.service'
EOF
fi
cat <<EOF
Claude CLI: put $wrapper_dir first in PATH (the wrapper runs the next claude in
PATH), and/or merge $share/claude-settings.json into
~/.claude/settings.json (install.sh adds nothing to it).
EOF
