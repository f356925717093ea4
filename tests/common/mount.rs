//! A real membridge mount over a temp dir, always unmounted on drop.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_membridge");

pub struct Mount {
    pub dir: PathBuf,
    pub state: PathBuf,
    pub env: Vec<(String, String)>,
    _tmp: tempfile::TempDir,
}

impl Mount {
    /// A fresh temp dir holding `files` before the mount covers it.
    pub fn with_files(env: Vec<(String, String)>, files: &[(&str, &[u8])]) -> Mount {
        let m = Mount::prepared(env, files);
        m.mount();
        m
    }

    /// Like [`Mount::with_files`], but not mounted yet (for commands that run
    /// before the first mount, e.g. `migrate`); [`Mount::mount`] mounts it.
    pub fn prepared(env: Vec<(String, String)>, files: &[(&str, &[u8])]) -> Mount {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("mnt");
        let state = tmp.path().join("state");
        std::fs::create_dir_all(&dir).unwrap();
        for (name, body) in files {
            let p = dir.join(name);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, body).unwrap();
        }
        Mount {
            dir,
            state,
            env,
            _tmp: tmp,
        }
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", self.state.join("home"))
            .env("MEMBRIDGE_STATE_DIR", &self.state)
            .env("RUST_LOG", "info");
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("running membridge")
    }

    pub fn mount(&self) {
        let out = self.run(&["mount", self.dir.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "mount failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn status(&self) -> serde_json::Value {
        let text = std::fs::read_to_string(self.dir.join(".membridge/status.json"))
            .expect("status.json readable");
        serde_json::from_str(&text).expect("status.json is JSON")
    }

    /// The last `lines` lines of the daemon's log, for failure messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let path = self.status()["log_file"].as_str().unwrap_or("").to_string();
        let log = std::fs::read_to_string(path).unwrap_or_default();
        let mut tail: Vec<&str> = log.lines().rev().take(lines).collect();
        tail.reverse();
        tail.join("\n")
    }

    pub fn pid(&self) -> i32 {
        self.status()["pid"].as_i64().unwrap() as i32
    }

    pub fn unmount(&self) {
        let out = self.run(&["unmount", self.dir.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "unmount failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn is_mounted(&self) -> bool {
        is_mounted(&self.dir)
    }
}

pub fn is_mounted(dir: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let want = dir.to_str().unwrap();
    info.lines()
        .any(|l| l.split(' ').nth(4) == Some(want) && l.contains(" - fuse"))
}

impl Drop for Mount {
    fn drop(&mut self) {
        // Whatever the test did: detach, then make sure the daemon is gone.
        let pid = std::fs::read_to_string(self.dir.join(".membridge/status.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v["pid"].as_i64());
        let deadline = Instant::now() + Duration::from_secs(10);
        while is_mounted(&self.dir) && Instant::now() < deadline {
            let _ = self.run(&["unmount", "--lazy", self.dir.to_str().unwrap()]);
            if is_mounted(&self.dir) {
                let _ = nix::mount::umount2(&self.dir, nix::mount::MntFlags::MNT_DETACH);
            }
        }
        if let Some(pid) = pid {
            let pid = nix::unistd::Pid::from_raw(pid as i32);
            let deadline = Instant::now() + Duration::from_secs(5);
            while nix::sys::signal::kill(pid, None).is_ok() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        }
    }
}
