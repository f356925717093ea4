//! The operations scripts in `mount-scripts/`: the mount(8) helper through a
//! real `mount -t fuse.membridge` and `umount`, the systemd units under
//! `systemd-analyze verify`, `install.sh --dry-run`, and the `claude` wrapper
//! with a stand-in CLI, against a live bucket and an unreachable one.
//!
//! Nothing is installed outside temp dirs: mount(8) only looks for helpers in
//! /sbin, so the mount test runs in a private mount namespace (`unshare -m`)
//! where an overlay adds the helper to /usr/sbin for that namespace alone.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::mount::{is_mounted, BIN};
use common::SeaweedFs;

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("mount-scripts")
        .join(name)
}

fn system_path() -> String {
    std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".into())
}

fn text(out: &Output) -> String {
    format!(
        "status {}\n--- stdout ---\n{}--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn read_json(path: &Path) -> serde_json::Value {
    let t =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&t).unwrap_or_else(|e| panic!("{} is not JSON ({e}): {t}", path.display()))
}

/// Whether `pid` is a live membridge process (not a recycled pid).
fn is_membridge(pid: i32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains("membridge"))
        .unwrap_or(false)
}

/// SIGTERM (the daemon unmounts itself), then SIGKILL after a grace period.
fn stop_daemon(pid: i32) {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    if !is_membridge(pid) {
        return;
    }
    let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(15);
    while is_membridge(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    if is_membridge(pid) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

/// A directory that a script under test may have mounted: whatever happened,
/// it is unmounted and its daemon gone when this is dropped.
struct MountGuard {
    dir: PathBuf,
    env: Vec<(String, String)>,
    pid: Option<i32>,
}

impl MountGuard {
    fn status(&self) -> Option<serde_json::Value> {
        let t = std::fs::read_to_string(self.dir.join(".membridge/status.json")).ok()?;
        serde_json::from_str(&t).ok()
    }

    fn wait_ready(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(s) = self.status() {
                self.pid = s["pid"].as_i64().map(|p| p as i32);
                if s["state"] == "ready" {
                    return true;
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }
}

impl Drop for MountGuard {
    fn drop(&mut self) {
        if self.pid.is_none() {
            self.pid = self
                .status()
                .and_then(|s| s["pid"].as_i64())
                .map(|p| p as i32);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while is_mounted(&self.dir) && Instant::now() < deadline {
            let _ = Command::new(BIN)
                .args(["unmount", "--lazy"])
                .arg(&self.dir)
                .envs(self.env.iter().cloned())
                .output();
            if is_mounted(&self.dir) {
                let _ = nix::mount::umount2(&self.dir, nix::mount::MntFlags::MNT_DETACH);
            }
        }
        if let Some(pid) = self.pid {
            let deadline = Instant::now() + Duration::from_secs(5);
            while is_membridge(pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            stop_daemon(pid);
        }
    }
}

/// The daemon started inside the private namespace, killed if the test left it.
struct NamespacedDaemon {
    status_copy: PathBuf,
}

impl Drop for NamespacedDaemon {
    fn drop(&mut self) {
        let pid = std::fs::read_to_string(&self.status_copy)
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|s| s["pid"].as_i64());
        if let Some(pid) = pid {
            stop_daemon(pid as i32);
        }
    }
}

/// Runs inside `unshare -m`: the helper is visible as /sbin/mount.fuse.membridge
/// in this namespace only; mount, use the mount, `umount`. Whatever fails, the
/// EXIT trap detaches the mount, which ends the daemon.
const MOUNT_SCRIPT: &str = r#"
set -eu
t=$1 dir=$2 project=$3 opts=$4
cleanup() {
    if awk -v d="$dir" '$5 == d { f = 1 } END { exit !f }' /proc/self/mountinfo; then
        umount -l "$dir" || true
    fi
}
trap cleanup EXIT
mount -t overlay membridge-test-helpers -o "lowerdir=$t/helpers:/usr/sbin" /usr/sbin
test -x /sbin/mount.fuse.membridge
mount -n -v -t fuse.membridge "$project" "$dir" -o "$opts"
cp "$dir/.membridge/status.json" "$t/status.json"
pid=$(sed -n 's/^ *"pid": *\([0-9]*\).*/\1/p' "$t/status.json")
tr '\0' ' ' < "/proc/$pid/cmdline" > "$t/cmdline"
tr '\0' '\n' < "/proc/$pid/environ" > "$t/environ"
awk -v d="$dir" '$5 == d' /proc/self/mountinfo > "$t/mountinfo"
echo "written through the mount" > "$dir/through-mount.txt"
ls -a "$dir" > "$t/listing"
umount "$dir"
if awk -v d="$dir" '$5 == d { f = 1 } END { exit !f }' /proc/self/mountinfo; then
    echo "still mounted after umount" >&2
    exit 1
fi
# The daemon finishes (drains, releases the lease) and exits on its own.
for _ in $(seq 150); do
    kill -0 "$pid" 2>/dev/null || exit 0
    sleep 0.1
done
echo "daemon $pid still running 15 s after umount" >&2
exit 1
"#;

#[test]
fn mount_and_umount_through_mount_helper() {
    for tool in ["unshare", "mount", "umount"] {
        assert!(
            Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .stdout(Stdio::null())
                .status()
                .unwrap()
                .success(),
            "{tool} is needed (util-linux)"
        );
    }
    let s3 = SeaweedFs::shared();
    let bucket = s3.new_bucket("ops-mount-helper");
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let dir = t.join("mnt");
    let state = t.join("state");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("existing.txt"), b"was here before").unwrap();
    std::fs::create_dir_all(t.join("helpers")).unwrap();
    // The repo's own link, so the shipped name is the one mount(8) finds.
    std::os::unix::fs::symlink(
        script("mount.fuse.membridge"),
        t.join("helpers/mount.fuse.membridge"),
    )
    .unwrap();
    let _daemon = NamespacedDaemon {
        status_copy: t.join("status.json"),
    };
    let project = "ops-helper-project";
    // Options map to config keys; the fstab/systemd ones are ignored.
    let opts = format!(
        "defaults,rw,noauto,_netdev,nofail,x-systemd.automount,x-systemd.mount-timeout=30,\
         bucket={bucket},endpoint={},node_id=ops-node,state_dir={},poll_ms=500,\
         access_key={},MINIO_REGION=us-east-1",
        s3.endpoint,
        state.display(),
        s3.access_key,
    );
    let out = Command::new("unshare")
        .args([
            "-m",
            "--propagation",
            "private",
            "sh",
            "-c",
            MOUNT_SCRIPT,
            "mount-test",
        ])
        .arg(t)
        .arg(&dir)
        .arg(project)
        .arg(&opts)
        .env_clear()
        .env("PATH", system_path())
        .env("MEMBRIDGE_BIN", BIN)
        // The secret travels in the environment, never in an option.
        .env("MINIO_SECRET_KEY", &s3.secret_key)
        .env("MEMBRIDGE_CONFIG", t.join("no-config.env"))
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    let log = std::fs::read_to_string(
        state
            .join(membridge::config::canonical_id(project))
            .join("membridge.log"),
    )
    .unwrap_or_default();
    assert!(
        out.status.success(),
        "{}\n--- daemon log ---\n{log}",
        text(&out)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    // mount -v: the helper shows the command it runs, without the secret.
    assert!(stderr.contains("mount.membridge:"), "{stderr}");
    assert!(!stderr.contains(&s3.secret_key), "{stderr}");

    let status = read_json(&t.join("status.json"));
    assert_eq!(status["state"], "ready", "{status}");
    assert_eq!(status["node_id"], "ops-node", "{status}");
    assert_eq!(
        status["canonical_id"],
        membridge::config::canonical_id(project),
        "{status}"
    );
    assert_eq!(status["mount_dir"], dir.to_str().unwrap(), "{status}");
    let cmdline = std::fs::read_to_string(t.join("cmdline")).unwrap();
    assert!(cmdline.contains("mount"), "{cmdline}");
    assert!(
        !cmdline.contains(&s3.secret_key),
        "secret on the command line: {cmdline}"
    );
    let environ = std::fs::read_to_string(t.join("environ")).unwrap();
    assert!(
        environ.lines().any(|l| l.starts_with("HOME=/")),
        "the helper sets HOME when mount(8) drops it:\n{environ}"
    );
    let mountinfo = std::fs::read_to_string(t.join("mountinfo")).unwrap();
    assert!(
        mountinfo.contains(" - fuse") && mountinfo.contains("membridge"),
        "{mountinfo}"
    );
    let listing = std::fs::read_to_string(t.join("listing")).unwrap();
    assert!(listing.lines().any(|l| l == "existing.txt"), "{listing}");
    assert!(listing.lines().any(|l| l == ".membridge"), "{listing}");

    // Unmounted: the directory holds what was written through the mount, and
    // nothing of the virtual directory.
    assert_eq!(
        std::fs::read_to_string(dir.join("through-mount.txt")).unwrap(),
        "written through the mount\n"
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("existing.txt")).unwrap(),
        "was here before"
    );
    assert!(!dir.join(".membridge").exists());
    // And the helper never left this test's namespace.
    assert!(
        !Path::new("/sbin/mount.fuse.membridge").exists() || {
            // (unless an admin installed membridge on this machine for real)
            !std::fs::read_link("/sbin/mount.fuse.membridge")
                .map(|p| p.starts_with(t))
                .unwrap_or(false)
        }
    );
}

#[test]
fn mount_helper_maps_and_rejects_options() {
    let run = |opts: &str| {
        Command::new("sh")
            .arg(script("mount.membridge"))
            .args(["my-project", "/nonexistent/mnt", "-f", "-v", "-o", opts])
            .env_clear()
            .env("MEMBRIDGE_BIN", BIN)
            .env("PATH", system_path())
            .output()
            .unwrap()
    };
    let out = run(
        "rw,_netdev,nofail,x-systemd.requires=a,bucket=b-1,node_id=n1,\
                   secret_key=SEKRIT,replicate=\"a.db,*.sqlite3\",config=/etc/m.env,threads=2",
    );
    assert!(out.status.success(), "{}", text(&out));
    let shown = String::from_utf8_lossy(&out.stderr);
    for want in [
        "-o MINIO_BUCKET=b-1",
        "-o MEMBRIDGE_NODE_ID=n1",
        "-o MEMBRIDGE_REPLICATE=a.db,*.sqlite3",
        "--project my-project",
        "--config /etc/m.env",
        "mount --threads 2 /nonexistent/mnt",
    ] {
        assert!(shown.contains(want), "missing {want:?} in {shown}");
    }
    assert!(!shown.contains("SEKRIT"), "{shown}");
    assert!(
        !shown.contains("_netdev") && !shown.contains("nofail"),
        "{shown}"
    );

    for (bad, why) in [("ro", "read-only"), ("frobnicate", "unknown mount option")] {
        let out = run(bad);
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(why),
            "{}",
            text(&out)
        );
    }
}

/// `systemd-analyze verify` on the units, as shipped and as installed.
#[test]
fn systemd_units_verify() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let verify = |paths: &[PathBuf]| {
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .args(paths)
            .current_dir(t)
            .output()
            .unwrap_or_else(|e| {
                panic!("systemd-analyze: {e} (scripts/install-deps.sh installs systemd)")
            });
        let stderr = String::from_utf8_lossy(&out.stderr);
        // Warnings about other units on the machine are not ours to judge.
        let ours: Vec<&str> = stderr
            .lines()
            .filter(|l| l.contains("membridge") || l.contains("claude"))
            .collect();
        assert!(
            out.status.success() && ours.is_empty(),
            "verify {paths:?}: {}",
            text(&out)
        );
    };
    // The shipped mount unit names no binary: it verifies as it is.
    verify(&[script("systemd/root-.claude\\x2dmem.mount")]);

    // Installed (to a temp prefix, so that ExecStart= names an executable; verify
    // checks no more than that, so a small stand-in does).
    let mount_dir = t.join("home/alice/.claude-mem");
    let stub = t.join("membridge-stub");
    std::fs::write(&stub, "#!/bin/sh\n").unwrap();
    std::fs::set_permissions(&stub, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = Command::new("sh")
        .arg(script("install.sh"))
        .arg("--prefix")
        .arg(t.join("usr"))
        .arg("--sbin-dir")
        .arg(t.join("sbin"))
        .arg("--unit-dir")
        .arg(t.join("units"))
        .arg("--mount-dir")
        .arg(&mount_dir)
        .args(["--project", "alice-project", "--bin"])
        .arg(&stub)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let escaped = |suffix: &str| {
        let o = Command::new("systemd-escape")
            .args(["-p", "--suffix", suffix])
            .arg(&mount_dir)
            .output()
            .unwrap();
        String::from_utf8(o.stdout).unwrap().trim().to_string()
    };
    let mount_unit = t.join("units").join(escaped("mount"));
    let unit = std::fs::read_to_string(&mount_unit).unwrap();
    assert!(
        unit.contains(&format!("Where={}\n", mount_dir.display())),
        "{unit}"
    );
    assert!(unit.contains("What=alice-project\n"), "{unit}");
    assert!(unit.contains("Type=fuse.membridge\n"), "{unit}");
    let service = t.join("units/membridge@.service");
    let text_service = std::fs::read_to_string(&service).unwrap();
    let bin = t.join("usr/bin/membridge");
    assert!(
        text_service.contains(&format!(
            "ExecStart={} mount --foreground %f",
            bin.display()
        )),
        "{text_service}"
    );
    assert!(
        text_service.contains("Restart=on-failure"),
        "{text_service}"
    );
    // An instance, as `systemctl enable membridge@<escaped dir>.service` names it.
    let instance = t
        .join("units")
        .join(format!("membridge@{}", escaped("service")));
    verify(&[mount_unit, service, instance]);
}

/// Every path under `root` with its type, mode and content (or link target).
fn snapshot(root: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let meta = std::fs::symlink_metadata(&p).unwrap();
        let what = if meta.file_type().is_symlink() {
            format!("link {}", std::fs::read_link(&p).unwrap().display())
        } else if meta.is_dir() {
            for e in std::fs::read_dir(&p).unwrap() {
                stack.push(e.unwrap().path());
            }
            format!("dir {:o}", meta.permissions().mode())
        } else {
            use sha2::Digest;
            format!(
                "file {:o} {} {}",
                meta.permissions().mode(),
                meta.mtime_nsec(),
                hex::encode(sha2::Sha256::digest(std::fs::read(&p).unwrap()))
            )
        };
        out.insert(p, what);
    }
    out
}

#[test]
fn install_dry_run_changes_nothing_and_never_touches_user_data() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let home = t.join("home");
    for (p, body) in [
        (".claude-mem/claude-mem.db", "the data"),
        (".claude/.credentials.json", "{\"token\":\"x\"}"),
        (".claude/settings.json", "{}"),
        (".claude-mem-minio/config.env", "MINIO_BUCKET=claude-mem\n"),
    ] {
        let f = home.join(p);
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::fs::write(f, body).unwrap();
    }
    let prefix = t.join("prefix");
    std::fs::create_dir_all(prefix.join("bin")).unwrap();
    // install.sh only copies the binary: a small stand-in keeps the snapshots cheap.
    let stub = t.join("membridge-stub");
    std::fs::write(&stub, "#!/bin/sh\necho membridge stub\n").unwrap();
    std::fs::set_permissions(&stub, std::fs::Permissions::from_mode(0o755)).unwrap();
    let stub = stub.to_str().unwrap();
    let install = |extra: &[&str]| {
        Command::new("sh")
            .arg(script("install.sh"))
            .arg("--prefix")
            .arg(prefix.join("usr"))
            .arg("--sbin-dir")
            .arg(prefix.join("sbin"))
            .arg("--unit-dir")
            .arg(prefix.join("units"))
            .args(["--bin", stub, "--user", "root"])
            .arg("--mount-dir")
            .arg(home.join(".claude-mem"))
            .arg("--claude-settings")
            .arg(home.join(".claude/settings.json"))
            .args(extra)
            .env("HOME", &home)
            .output()
            .unwrap()
    };

    let before = snapshot(t);
    let out = install(&["--dry-run"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(snapshot(t), before, "--dry-run changed something");
    let said = String::from_utf8_lossy(&out.stdout);
    for dest in [
        "usr/bin/membridge",
        "sbin/mount.fuse.membridge",
        "sbin/mount.membridge",
        "usr/bin/membridge-session-start",
        "usr/lib/membridge/bin/claude",
        "usr/share/membridge/claude-settings.json",
        "units/membridge@.service",
        ".mount",
    ] {
        assert!(
            said.lines()
                .any(|l| l.starts_with("would: ") && l.contains(dest)),
            "--dry-run does not show {dest}:\n{said}"
        );
    }

    // A real install writes only under the prefix.
    let user_data = snapshot(&home);
    let out = install(&[]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        snapshot(&home),
        user_data,
        "install touched the user's files"
    );
    assert_eq!(
        std::fs::read_to_string(prefix.join("usr/bin/membridge")).unwrap(),
        "#!/bin/sh\necho membridge stub\n"
    );
    let helper = std::fs::read_to_string(prefix.join("sbin/mount.fuse.membridge")).unwrap();
    assert!(
        helper.contains(&format!(
            "default_bin='{}'",
            prefix.join("usr/bin/membridge").display()
        )),
        "the helper knows where the binary is"
    );
    assert_eq!(
        std::fs::read_link(prefix.join("sbin/mount.membridge")).unwrap(),
        Path::new("mount.fuse.membridge")
    );
    let hook: serde_json::Value =
        read_json(&prefix.join("usr/share/membridge/claude-settings.json"));
    assert_eq!(
        hook["hooks"]["SessionStart"][0]["hooks"][0]["command"],
        prefix
            .join("usr/bin/membridge-session-start")
            .to_str()
            .unwrap()
    );

    // Asked to install into protected places, it refuses and writes nothing.
    for inside in [".claude-mem/x", ".claude/x", ".claude-mem-minio"] {
        let before = snapshot(t);
        let out = Command::new("sh")
            .arg(script("install.sh"))
            .arg("--prefix")
            .arg(home.join(inside))
            .args(["--bin", stub, "--no-units"])
            .env("HOME", &home)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("never touches"),
            "{}",
            text(&out)
        );
        assert_eq!(snapshot(t), before);
    }
}

/// Issue 15, item 8: the old tool's Claude hooks (which fail on a membridge
/// secondary and leave temporary files in the mount) are disabled, the
/// other hooks kept, the file as it was kept beside it and named.
#[test]
fn install_disables_the_old_tools_hooks_and_keeps_a_copy() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let settings = t.join("claude/settings.json");
    std::fs::create_dir_all(settings.parent().unwrap()).unwrap();
    let before = serde_json::json!({
        "hooks": {
            "SessionStart": [{"hooks": [
                {"type": "command", "command": "$HOME/.claude-mem-minio/bin/claude-mem-hook-pull"},
                {"type": "command", "command": "/usr/local/bin/membridge-session-start"}
            ]}],
            "Stop": [{"hooks": [
                {"type": "command", "command": "$HOME/.claude-mem-minio/bin/claude-mem-hook-push"}
            ]}]
        },
        "model": "opus"
    });
    let before_text = serde_json::to_string_pretty(&before).unwrap();
    std::fs::write(&settings, &before_text).unwrap();
    let stub = t.join("membridge-stub");
    std::fs::write(&stub, "#!/bin/sh\n").unwrap();
    std::fs::set_permissions(&stub, std::fs::Permissions::from_mode(0o755)).unwrap();
    let install = |extra: &[&str]| {
        Command::new("sh")
            .arg(script("install.sh"))
            .arg("--prefix")
            .arg(t.join("usr"))
            .arg("--sbin-dir")
            .arg(t.join("sbin"))
            .args(["--no-units", "--user", "root", "--bin"])
            .arg(&stub)
            .arg("--mount-dir")
            .arg(t.join("mnt"))
            .arg("--claude-settings")
            .arg(&settings)
            .args(extra)
            .output()
            .unwrap()
    };
    let out = install(&["--dry-run"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("would: disable the old tool's hooks"),
        "{}",
        text(&out)
    );
    assert_eq!(std::fs::read_to_string(&settings).unwrap(), before_text);
    let out = install(&["--keep-old-hooks"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(std::fs::read_to_string(&settings).unwrap(), before_text);

    let out = install(&[]);
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    let after = read_json(&settings);
    assert_eq!(
        after,
        serde_json::json!({
            "hooks": {"SessionStart": [{"hooks": [
                {"type": "command", "command": "/usr/local/bin/membridge-session-start"}
            ]}]},
            "model": "opus"
        })
    );
    assert!(
        said.contains(
            "disabled the old tool's hook Stop: $HOME/.claude-mem-minio/bin/claude-mem-hook-push"
        ),
        "{said}"
    );
    let copies: Vec<_> = std::fs::read_dir(settings.parent().unwrap())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().contains("before-membridge-"))
        .collect();
    assert_eq!(copies.len(), 1, "{said}");
    assert_eq!(std::fs::read_to_string(&copies[0]).unwrap(), before_text);
    assert!(said.contains(copies[0].to_str().unwrap()), "{said}");
}

/// A stand-in for the Claude CLI: records when it ran, its arguments, and
/// whether the mount was ready by then.
const STAND_IN: &str = r#"#!/bin/sh
{
  date +%s%N
  for a in "$@"; do printf 'arg:%s\n' "$a"; done
  if grep -q '"state": *"ready"' "$MEMBRIDGE_DIR/.membridge/status.json" 2>/dev/null; then
    echo mounted
  else
    echo not-mounted
  fi
} > "$STAND_IN_OUT"
echo "stand-in ran"
"#;

struct Wrapper {
    tmp: tempfile::TempDir,
    dir: PathBuf,
    env: Vec<(String, String)>,
}

impl Wrapper {
    fn new(s3_env: Vec<(String, String)>) -> Wrapper {
        let tmp = tempfile::tempdir().unwrap();
        let t = tmp.path();
        let dir = t.join("home/.claude-mem");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::create_dir_all(t.join("standin")).unwrap();
        std::fs::create_dir_all(t.join("tmp")).unwrap();
        let claude = t.join("standin/claude");
        std::fs::write(&claude, STAND_IN).unwrap();
        std::fs::set_permissions(&claude, std::fs::Permissions::from_mode(0o755)).unwrap();
        // The wrapper first in PATH, the real (stand-in) claude after it.
        let path = format!(
            "{}:{}:{}",
            script("").display(),
            t.join("standin").display(),
            system_path()
        );
        let mut env: Vec<(String, String)> = s3_env;
        for (k, v) in [
            ("PATH", path),
            ("HOME", t.join("home").display().to_string()),
            ("TMPDIR", t.join("tmp").display().to_string()),
            ("MEMBRIDGE_BIN", BIN.to_string()),
            ("MEMBRIDGE_STATE_DIR", t.join("state").display().to_string()),
            ("MEMBRIDGE_NODE_ID", "wrapper-node".into()),
            ("MEMBRIDGE_DIR", dir.display().to_string()),
            ("STAND_IN_OUT", t.join("stand-in.out").display().to_string()),
            ("RUST_LOG", "info".into()),
        ] {
            env.push((k.into(), v));
        }
        Wrapper { tmp, dir, env }
    }

    fn guard(&self) -> MountGuard {
        MountGuard {
            dir: self.dir.clone(),
            env: self.env.clone(),
            pid: None,
        }
    }

    /// Runs `claude ARGS` through PATH, as a user would; returns the output and
    /// how long after the start the stand-in ran.
    fn run(&self, extra_env: &[(&str, &str)], args: &[&str]) -> (Output, Duration, String) {
        let start_ns = now_ns();
        let out = Command::new("claude")
            .args(args)
            .env_clear()
            .envs(self.env.iter().cloned())
            .envs(
                extra_env
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string())),
            )
            // Command looks the program up in the PATH it is given.
            .env(
                "PATH",
                &self.env.iter().find(|(k, _)| k == "PATH").unwrap().1,
            )
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let record =
            std::fs::read_to_string(self.tmp.path().join("stand-in.out")).unwrap_or_default();
        let ran_ns: u128 = record
            .lines()
            .next()
            .and_then(|l| l.trim().parse().ok())
            .unwrap_or_else(|| panic!("the stand-in did not run: {}", text(&out)));
        let after = Duration::from_nanos((ran_ns.saturating_sub(start_ns)) as u64);
        (out, after, record)
    }
}

fn now_ns() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

#[test]
fn claude_wrapper_starts_the_cli_within_5s_when_the_bucket_is_down() {
    let s3 = SeaweedFs::shared();
    let mut env = s3.env("unreachable-bucket", "wrapper-down");
    for (k, v) in env.iter_mut() {
        if k == "MINIO_ENDPOINT" {
            *v = format!("http://127.0.0.1:{}", common::closed_port());
        }
    }
    let w = Wrapper::new(env);
    let mut guard = w.guard();
    // The default wait (MEMBRIDGE_WAIT unset).
    let (out, after, record) = w.run(&[], &["--print", "two words", ""]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        after < Duration::from_secs(5),
        "the stand-in started {after:?} after the wrapper: {}",
        text(&out)
    );
    assert_eq!(
        record.lines().skip(1).collect::<Vec<_>>(),
        ["arg:--print", "arg:two words", "arg:", "not-mounted"],
        "{record}"
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "stand-in ran\n");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not ready after 5s"), "{stderr}");
    assert!(!stderr.contains(&s3.secret_key), "{stderr}");
    // The mount went on in the background, and comes up as a secondary
    // (nobody can take a lease from an unreachable bucket).
    assert!(
        guard.wait_ready(Duration::from_secs(30)),
        "the background mount never came up"
    );
    let status = guard.status().unwrap();
    assert_eq!(status["role"], "secondary", "{status}");
    drop(guard);
    assert!(!is_mounted(&w.dir));
    // Nothing is left in the temp dir but the lock file.
    let left: Vec<_> = std::fs::read_dir(w.tmp.path().join("tmp"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| !n.ends_with(".lock"))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn claude_wrapper_mounts_before_the_cli_starts() {
    let s3 = SeaweedFs::shared();
    let bucket = s3.new_bucket("ops-wrapper");
    let w = Wrapper::new(s3.env(&bucket, "wrapper-live"));
    std::fs::write(w.dir.join("settings.local"), b"kept").unwrap();
    let _guard = w.guard();
    // A generous wait: this test is about the order, not the time.
    let (out, _, record) = w.run(&[("MEMBRIDGE_WAIT", "60")], &["-c"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        record.lines().skip(1).collect::<Vec<_>>(),
        ["arg:-c", "mounted"],
        "{record}\n{}",
        text(&out)
    );
    let status: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(w.dir.join(".membridge/status.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(status["node_id"], "wrapper-node", "{status}");
    assert_eq!(
        std::fs::read(w.dir.join("settings.local")).unwrap(),
        b"kept"
    );

    // Mounted already: a second start does not wait, nor mount twice.
    let t0 = Instant::now();
    let (out, _, record) = w.run(&[], &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        record.ends_with("mounted\n") && !record.contains("not-mounted"),
        "{record}"
    );
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    let again: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(w.dir.join(".membridge/status.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(again["pid"], status["pid"]);

    // The hook form prints nothing on stdout (it would go into the conversation).
    let out = Command::new(script("membridge-session-start"))
        .env_clear()
        .envs(w.env.iter().cloned())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(out.stdout.is_empty(), "{}", text(&out));
}
