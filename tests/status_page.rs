//! The status page in a real browser: headless Chromium, driven through
//! chromedriver's WebDriver HTTP API, loads the page of a primary and of a
//! secondary (two mounts on one SeaweedFS), reads what they render, presses
//! "Make this node primary" on the secondary and sees the lease move. A
//! screenshot is kept in `target/test-artifacts/`.
//!
//! Chromium and chromedriver are Debian's (`scripts/install-deps.sh` installs
//! them); the machine has no outside network, so Chromium runs with every
//! background connection switched off and a fresh profile.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use common::mount::Mount;
use common::wait_for;
use common::SeaweedFs;

const DB: &str = "claude-mem.db";

/// Exactly these, plus a fresh `--user-data-dir`.
const CHROMIUM_FLAGS: &[&str] = &[
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
];

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn artifacts() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap()
        .join("test-artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// One HTTP/1.1 exchange, `Connection: close`; the status and the body.
fn http(port: u16, method: &str, path: &str, headers: &str, body: &str) -> (u16, String) {
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n{headers}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    c.write_all(req.as_bytes()).unwrap();
    let mut raw = Vec::new();
    let mut buf = [0u8; 16384];
    let (head, mut rest) = loop {
        let n = c.read(&mut buf).unwrap();
        assert!(n > 0, "connection closed before the response head");
        raw.extend_from_slice(&buf[..n]);
        if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break (
                String::from_utf8_lossy(&raw[..i]).to_string(),
                raw[i + 4..].to_vec(),
            );
        }
    };
    let code: u16 = head[9..12].parse().unwrap();
    let header = |name: &str| {
        head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    };
    if let Some(len) = header("content-length").and_then(|v| v.parse::<usize>().ok()) {
        while rest.len() < len {
            let n = c.read(&mut buf).unwrap();
            assert!(n > 0, "response body cut short");
            rest.extend_from_slice(&buf[..n]);
        }
        rest.truncate(len);
    } else {
        c.read_to_end(&mut rest).unwrap();
        if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
            rest = dechunk(&rest);
        }
    }
    (code, String::from_utf8_lossy(&rest).to_string())
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(i) = b.windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(
            String::from_utf8_lossy(&b[..i])
                .split(';')
                .next()
                .unwrap()
                .trim(),
            16,
        )
        .unwrap_or(0);
        if size == 0 {
            break;
        }
        out.extend_from_slice(&b[i + 2..i + 2 + size]);
        b = &b[i + 2 + size + 2..];
    }
    out
}

fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let bytes: Vec<u8> = s
        .bytes()
        .filter(|c| !c.is_ascii_whitespace() && *c != b'=')
        .collect();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let mut n = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            n |= u32::from(val(*c)) << (18 - 6 * i);
        }
        out.extend_from_slice(&n.to_be_bytes()[1..chunk.len()]);
    }
    out
}

/// Debian's `chromium` on PATH.
fn chromium() -> String {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join("chromium"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("no chromium on PATH: run scripts/install-deps.sh"))
        .display()
        .to_string()
}

/// chromedriver on a free port, in a process group of its own so that it and
/// its Chromium are killed together.
struct Driver {
    child: Child,
    port: u16,
    profile: tempfile::TempDir,
}

impl Driver {
    fn start() -> Driver {
        let port = free_port();
        let log = artifacts().join("chromedriver.log");
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .arg(format!("--log-path={}", log.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run chromedriver ({e}): run scripts/install-deps.sh (Debian's chromium and chromium-driver)")
            });
        let d = Driver {
            child,
            port,
            profile: tempfile::tempdir().unwrap(),
        };
        let t = Instant::now();
        loop {
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                let (code, body) = http(port, "GET", "/status", "", "");
                if code == 200 && body.contains("\"ready\":true") {
                    return d;
                }
            }
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "chromedriver did not start; see {}",
                log.display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn session(&self) -> Session<'_> {
        let mut args: Vec<String> = CHROMIUM_FLAGS.iter().map(|s| s.to_string()).collect();
        args.push(format!("--user-data-dir={}", self.profile.path().display()));
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": chromium(), "args": args},
        }}});
        let (code, body) = http(self.port, "POST", "/session", "", &caps.to_string());
        assert_eq!(code, 200, "new session: {body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        let s = Session {
            driver: self,
            id: v["value"]["sessionId"].as_str().unwrap().to_string(),
        };
        s.cmd(
            "POST",
            "window/rect",
            json!({"width": 1100, "height": 1150}),
        );
        s
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our child's process group (it is its leader and
        // not reaped yet, so the id cannot have been recycled).
        unsafe {
            libc::kill(-(self.child.id() as libc::pid_t), libc::SIGKILL);
        }
        let _ = self.child.wait();
    }
}

struct Session<'a> {
    driver: &'a Driver,
    id: String,
}

impl Session<'_> {
    fn cmd(&self, method: &str, what: &str, body: Value) -> Value {
        let path = format!("/session/{}/{what}", self.id);
        let body = if method == "GET" {
            String::new()
        } else {
            body.to_string()
        };
        let (code, resp) = http(self.driver.port, method, &path, "", &body);
        assert_eq!(code, 200, "{method} {what}: {resp}");
        serde_json::from_str::<Value>(&resp).unwrap()["value"].clone()
    }

    fn open(&self, url: &str) {
        self.cmd("POST", "url", json!({ "url": url }));
    }

    fn js(&self, script: &str) -> Value {
        self.cmd(
            "POST",
            "execute/sync",
            json!({"script": script, "args": []}),
        )
    }

    /// Whether the button `#id` is disabled (None: no such button).
    fn disabled(&self, id: &str) -> Option<bool> {
        let script = format!("return document.getElementById({}).disabled", json!(id));
        self.js(&script).as_bool()
    }

    fn text_of(&self, css: &str) -> String {
        let script = format!(
            "const e = document.querySelector({}); return e ? e.innerText : null;",
            json!(css)
        );
        self.js(&script).as_str().unwrap_or("").to_string()
    }

    /// Waits until the page's `#id` element's text satisfies `ok`.
    fn wait_text(&self, css: &str, limit: Duration, ok: impl Fn(&str) -> bool) -> String {
        let t = Instant::now();
        loop {
            let text = self.text_of(css);
            if ok(&text) {
                return text;
            }
            if t.elapsed() > limit {
                let page = self.text_of("body");
                panic!("{css} never matched; it says {text:?}; the page:\n{page}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn click(&self, css: &str) {
        let e = self.cmd(
            "POST",
            "element",
            json!({"using": "css selector", "value": css}),
        );
        let id = e
            .as_object()
            .unwrap()
            .values()
            .next()
            .unwrap()
            .as_str()
            .unwrap()
            .to_string();
        self.cmd("POST", &format!("element/{id}/click"), json!({}));
    }

    fn screenshot(&self, name: &str) -> PathBuf {
        let png = base64_decode(self.cmd("GET", "screenshot", json!({})).as_str().unwrap());
        assert!(png.starts_with(b"\x89PNG"), "not a PNG");
        let path = artifacts().join(name);
        std::fs::write(&path, png).unwrap();
        path
    }
}

impl Drop for Session<'_> {
    fn drop(&mut self) {
        let _ = http(
            self.driver.port,
            "DELETE",
            &format!("/session/{}", self.id),
            "",
            "",
        );
    }
}

fn node(env: &[(String, String)], id: &str, port: u16) -> Mount {
    let mut env = env.to_vec();
    env.push(("MEMBRIDGE_NODE_ID".into(), id.into()));
    env.push(("MEMBRIDGE_METRICS_ADDR".into(), format!("127.0.0.1:{port}")));
    Mount::with_files(env, &[])
}

/// The rows of a table of the page, one string per row (cells tab-separated).
fn rows(s: &Session, table: &str) -> Vec<String> {
    let script = format!(
        "return Array.from(document.querySelectorAll('{table} tbody tr')).map(r => Array.from(r.cells).map(c => c.innerText).join('\\t'));"
    );
    s.js(&script)
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn a_browser_sees_both_nodes_and_hands_the_lease_over_from_the_page() {
    let s3 = SeaweedFs::shared();
    let bucket = s3.new_bucket("page");
    let mut env = s3.env(&bucket, "page");
    env.push(("LEADERSHIP_LEASE_SECONDS".into(), "6".into()));
    env.push(("MEMBRIDGE_POLL_MS".into(), "250".into()));
    let (pa, pb) = (free_port(), free_port());
    let a = node(&env, "node-a", pa);
    wait_for("node-a to be primary", Duration::from_secs(15), || {
        a.status()["role"] == "primary"
    });
    let c = rusqlite::Connection::open(a.dir.join(DB)).unwrap();
    c.execute_batch(
        "PRAGMA journal_mode=WAL; CREATE TABLE observations(id INTEGER PRIMARY KEY, text TEXT);",
    )
    .unwrap();
    for i in 0..5 {
        c.execute(
            "INSERT INTO observations(text) VALUES (?1)",
            [format!("row {i}")],
        )
        .unwrap();
    }
    drop(c);
    let b = node(&env, "node-b", pb);
    wait_for(
        "node-b to apply node-a's head",
        Duration::from_secs(20),
        || {
            let head = a.status()["databases"][DB]["uploaded_txid"].as_u64();
            head.is_some() && b.status()["databases"][DB]["applied_txid"].as_u64() == head
        },
    );

    // Actions need the page's token, also on a real daemon.
    let (code, body) = http(pa, "POST", "/api/make-primary", "", "");
    assert_eq!(code, 401, "{body}");
    assert!(body.contains("X-Membridge-Token"), "{body}");

    let driver = Driver::start();
    let s = driver.session();

    // The primary's page.
    s.open(&format!("http://127.0.0.1:{pa}/"));
    s.wait_text("#role", Duration::from_secs(10), |t| t == "primary");
    assert_eq!(s.text_of("#node-id"), "node-a");
    assert_eq!(s.text_of("#primary"), "node-a (this node)");
    assert!(
        s.text_of("#lease").starts_with("held by this node, "),
        "{}",
        s.text_of("#lease")
    );
    s.wait_text("#nodes tbody", Duration::from_secs(15), |t| {
        t.contains("node-a") && t.contains("node-b")
    });
    let dbs = rows(&s, "#databases");
    assert_eq!(dbs.len(), 1, "{dbs:?}");
    let cells: Vec<&str> = dbs[0].split('\t').collect();
    assert_eq!(cells[0], DB, "{dbs:?}");
    assert_eq!(cells[5], "—", "a primary has no lag: {dbs:?}");
    assert_eq!(cells[4], "0", "backlog: {dbs:?}");
    assert_eq!(s.disabled("release"), Some(false));
    assert_eq!(s.disabled("make-primary"), Some(true));

    // The secondary's page: its role, its lag, and both nodes.
    s.open(&format!("http://127.0.0.1:{pb}/"));
    s.wait_text("#role", Duration::from_secs(10), |t| t == "secondary");
    assert_eq!(s.text_of("#node-id"), "node-b");
    assert_eq!(s.text_of("#primary"), "node-a");
    assert!(
        s.text_of("#lease").starts_with("held by node-a, "),
        "{}",
        s.text_of("#lease")
    );
    let dbs = rows(&s, "#databases");
    let cells: Vec<&str> = dbs[0].split('\t').collect();
    assert_eq!(cells[5], "0.0 s", "a caught-up secondary's lag: {dbs:?}");
    assert_eq!(cells[1], cells[3], "applied = head: {dbs:?}");
    let nodes = s.wait_text("#nodes tbody", Duration::from_secs(15), |t| {
        t.contains("node-a") && t.contains("node-b (this node)")
    });
    let row_a = rows(&s, "#nodes")
        .into_iter()
        .find(|r| r.starts_with("node-a"))
        .unwrap();
    assert!(
        row_a.contains("primary") && !row_a.contains("STALE"),
        "{row_a}\n{nodes}"
    );
    s.screenshot("status-page-secondary.png");

    // Hand-over from the page: the button, its confirmation, the lease moves.
    s.click("#make-primary");
    let question = s.cmd("GET", "alert/text", json!({}));
    assert!(
        question
            .as_str()
            .unwrap()
            .contains("Make node-b the primary?"),
        "{question}"
    );
    s.cmd("POST", "alert/accept", json!({}));
    s.wait_text("#role", Duration::from_secs(30), |t| t == "primary");
    s.wait_text("#action-log", Duration::from_secs(15), |t| {
        t.contains("make-primary")
            && t.contains(": done")
            && t.contains("is primary (epoch")
            && t.contains("takes writes")
    });
    let lease = common::block_on(async {
        let cfg = s3.config(&bucket, "page");
        membridge::lease::LeaseClient::new(&cfg.lease(), Arc::new(s3.store(&bucket)))
            .read()
            .await
            .unwrap()
            .unwrap()
            .lease
    });
    assert_eq!(lease.primary_node_id, "node-b");
    assert_eq!(lease.epoch, 2);
    assert_eq!(s.text_of("#primary"), "node-b (this node)");
    s.wait_text("#changes tbody", Duration::from_secs(15), |t| {
        t.contains("handover") && t.contains("node-a → node-b")
    });
    wait_for(
        "node-a to follow as a secondary",
        Duration::from_secs(20),
        || a.status()["role"] == "secondary",
    );
    s.wait_text("#nodes tbody", Duration::from_secs(15), |t| {
        rows(&s, "#nodes")
            .iter()
            .any(|r| r.starts_with("node-a") && r.contains("secondary"))
            && t.contains("node-b")
    });
    let shot = s.screenshot("status-page.png");
    println!("screenshot: {}", shot.display());

    // The old primary's page says so too, and offers no release.
    s.open(&format!("http://127.0.0.1:{pa}/"));
    s.wait_text("#role", Duration::from_secs(10), |t| t == "secondary");
    assert_eq!(s.text_of("#primary"), "node-b");
    assert_eq!(s.disabled("release"), Some(true));

    // Release on the new primary's page: the CLI's release, audited.
    s.open(&format!("http://127.0.0.1:{pb}/"));
    s.wait_text("#role", Duration::from_secs(10), |t| t == "primary");
    s.click("#release");
    s.cmd("POST", "alert/accept", json!({}));
    s.wait_text("#action-log", Duration::from_secs(15), |t| {
        t.contains("release") && t.contains("released the lease (epoch 2)")
    });
    s.wait_text("#changes tbody", Duration::from_secs(15), |t| {
        t.contains("release")
    });
    let lease = common::block_on(async {
        let cfg = s3.config(&bucket, "page");
        membridge::lease::LeaseClient::new(&cfg.lease(), Arc::new(s3.store(&bucket)))
            .read()
            .await
            .unwrap()
            .unwrap()
            .lease
    });
    // Released by node-b, or already taken by node-a at the next epoch.
    assert!(
        (lease.primary_node_id == "node-b" && lease.is_released())
            || (lease.primary_node_id == "node-a" && lease.epoch == 3),
        "{lease:?}"
    );
}
