//! Operations: `--metrics-addr` serves Prometheus text from a real mount whose
//! counters and gauges follow real SQLite transactions, a port in use stops the
//! mount with one line, and the daemon's log honours `--log-format json` and
//! `RUST_LOG`.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use common::mount::{is_mounted, Mount, BIN};
use common::wait_for;
use common::SeaweedFs;

const DB: &str = "claude-mem.db";

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `GET /metrics`: the status line, the content type and the body.
fn scrape(port: u16) -> (String, String, String) {
    let mut c = TcpStream::connect(("127.0.0.1", port)).expect("metrics port answers");
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/plain\r\n\r\n")
        .unwrap();
    let mut resp = String::new();
    c.read_to_string(&mut resp).unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").expect("an HTTP response");
    let status = head.lines().next().unwrap_or("").to_string();
    let ctype = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Type: "))
        .unwrap_or("")
        .to_string();
    (status, ctype, body.to_string())
}

/// Parse the text exposition format strictly enough to catch malformed
/// output: every sample is `name{labels} value` or `name value`, the value is
/// a float, its family has a `# TYPE` (and `# HELP`) line before it, a counter
/// is named `*_total`. Returns `name{labels}` -> value.
fn parse(text: &str) -> BTreeMap<String, f64> {
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut helps: HashSet<String> = HashSet::new();
    let mut samples = BTreeMap::new();
    let valid_name = |n: &str| {
        !n.is_empty()
            && !n.starts_with(|c: char| c.is_ascii_digit())
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    };
    for line in text.lines() {
        assert!(!line.is_empty(), "blank line in:\n{text}");
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split(' ').next().unwrap();
            assert!(valid_name(name), "{line}");
            helps.insert(name.to_string());
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect(line);
            assert!(valid_name(name), "{line}");
            assert!(
                ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                "{line}"
            );
            assert!(
                types.insert(name.into(), kind.into()).is_none(),
                "family declared twice: {line}"
            );
            continue;
        }
        assert!(!line.starts_with('#'), "stray comment {line}");
        let (series, value) = line.rsplit_once(' ').expect(line);
        let name = match series.split_once('{') {
            Some((name, labels)) => {
                let labels = labels.strip_suffix('}').unwrap_or_else(|| panic!("{line}"));
                for pair in split_labels(labels) {
                    let (k, v) = pair.split_once('=').unwrap_or_else(|| panic!("{line}"));
                    assert!(valid_name(k), "label {k} in {line}");
                    assert!(
                        v.len() >= 2 && v.starts_with('"') && v.ends_with('"'),
                        "label value {v} in {line}"
                    );
                }
                name
            }
            None => series,
        };
        assert!(valid_name(name), "{line}");
        let kind = types
            .get(name)
            .unwrap_or_else(|| panic!("sample without a TYPE line: {line}"));
        assert!(helps.contains(name), "sample without a HELP line: {line}");
        if kind == "counter" {
            assert!(name.ends_with("_total"), "counter {name} not *_total");
        }
        let v: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("value {value:?} in {line}"));
        assert!(
            samples.insert(series.to_string(), v).is_none(),
            "duplicate series {series}"
        );
    }
    samples
}

/// `a="x",b="y\"z"` -> [`a="x"`, `b="y\"z"`], honouring escapes.
fn split_labels(s: &str) -> Vec<String> {
    let (mut out, mut cur, mut quoted, mut escaped) = (Vec::new(), String::new(), false, false);
    for c in s.chars() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            ',' if !quoted => {
                out.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    assert!(!quoted, "unterminated label value in {s}");
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

fn get(m: &BTreeMap<String, f64>, series: &str) -> f64 {
    *m.get(series)
        .unwrap_or_else(|| panic!("no series {series} in {m:#?}"))
}

fn db_status(m: &Mount) -> serde_json::Value {
    m.status()["databases"][DB].clone()
}

fn log_of(m: &Mount) -> String {
    std::fs::read_to_string(m.status()["log_file"].as_str().unwrap()).unwrap()
}

#[test]
fn primary_metrics_follow_transactions_and_logs_are_json() {
    let s3 = SeaweedFs::shared();
    let port = free_port();
    let mut env = s3.env(&s3.new_bucket("metrics"), "metrics");
    env.extend(
        [
            ("MEMBRIDGE_NODE_ID", "metrics-primary".to_string()),
            ("MEMBRIDGE_METRICS_ADDR", format!("127.0.0.1:{port}")),
            ("MEMBRIDGE_LOG_FORMAT", "json".into()),
            // Only the daemon's and the metrics server's info lines.
            (
                "RUST_LOG",
                "warn,membridge::daemon=info,membridge::metrics=info".into(),
            ),
        ]
        .map(|(k, v)| (k.to_string(), v)),
    );
    let m = Mount::with_files(env, &[]);
    wait_for("the primary role", Duration::from_secs(15), || {
        m.status()["role"] == "primary"
    });

    let (status, ctype, body) = scrape(port);
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(ctype.starts_with("text/plain; version=0.0.4"), "{ctype}");
    let before = parse(&body);
    assert_eq!(get(&before, r#"membridge_role{role="primary"}"#), 1.0);
    assert_eq!(get(&before, r#"membridge_role{role="secondary"}"#), 0.0);
    assert_eq!(get(&before, "membridge_ready"), 1.0);
    assert!(get(&before, "membridge_epoch") >= 1.0, "{body}");
    assert_eq!(get(&before, "membridge_read_through_fetches_total"), 0.0);
    assert_eq!(get(&before, "membridge_cache_hits_total"), 0.0);

    // A few transactions through the mount.
    let c = rusqlite::Connection::open(m.dir.join(DB)).unwrap();
    c.execute_batch(
        "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;
         CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT);",
    )
    .unwrap();
    for i in 0..5 {
        c.execute("INSERT INTO t(v) VALUES (?1)", [format!("row {i}")])
            .unwrap();
    }
    let head = db_status(&m)["head_txid"].as_u64().unwrap();
    assert!(head >= 6, "{}", db_status(&m));
    wait_for("the upload", Duration::from_secs(20), || {
        let d = db_status(&m);
        d["uploaded_txid"].as_u64() == Some(head) && d["backlog"].as_u64() == Some(0)
    });

    let (_, _, body) = scrape(port);
    let after = parse(&body);
    let db = |name: &str| format!("{name}{{db=\"{DB}\"}}");
    assert_eq!(
        get(&after, &db("membridge_transactions_captured_total")),
        head as f64,
        "{body}"
    );
    assert_eq!(get(&after, &db("membridge_head_txid")), head as f64);
    assert_eq!(get(&after, &db("membridge_uploaded_txid")), head as f64);
    assert_eq!(get(&after, &db("membridge_backlog_transactions")), 0.0);
    let seg_bytes = format!("membridge_upload_bytes_total{{db=\"{DB}\",object=\"segment\"}}");
    let snap_bytes = format!("membridge_upload_bytes_total{{db=\"{DB}\",object=\"snapshot\"}}");
    assert!(get(&after, &seg_bytes) > 0.0, "{body}");
    assert!(get(&after, &snap_bytes) > 0.0, "{body}");
    // A small transaction ships a few pages, not the database.
    let segs = get(
        &after,
        &format!("membridge_uploads_total{{db=\"{DB}\",object=\"segment\"}}"),
    );
    assert!(segs >= 1.0 && get(&after, &seg_bytes) / segs < 64.0 * 1024.0);
    assert_eq!(get(&after, r#"membridge_upload_state{state="ok"}"#), 1.0);
    assert!(!body.contains("membridge_upload_failures_total{"), "{body}");
    // The primary follows nobody: no lag, nothing applied.
    assert!(
        !body.contains("membridge_replication_lag_seconds{"),
        "{body}"
    );
    assert!(
        !body.contains("membridge_transactions_applied_total{"),
        "{body}"
    );
    // No secret in the exposition.
    assert!(!body.contains(&s3.secret_key));

    // Anything else than GET /metrics or the status page's paths.
    let mut conn = TcpStream::connect(("127.0.0.1", port)).unwrap();
    conn.write_all(b"GET /nope HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .unwrap();
    let mut resp = String::new();
    conn.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 404"), "{resp}");

    // The log file: one JSON object per line, filtered by RUST_LOG.
    drop(c);
    let log = log_of(&m);
    let mut messages = Vec::new();
    for line in log.lines() {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("log line is not JSON ({e}): {line}\n{log}"));
        let (level, target) = (v["level"].as_str().unwrap(), v["target"].as_str().unwrap());
        assert!(v["timestamp"].is_string(), "{line}");
        if !["WARN", "ERROR"].contains(&level) {
            assert!(
                target == "membridge::daemon" || target == "membridge::metrics",
                "RUST_LOG let through {level} from {target}: {line}"
            );
        }
        messages.push(v["fields"]["message"].as_str().unwrap_or("").to_string());
    }
    assert!(messages.iter().any(|m| m == "mounted"), "{log}");
    assert!(
        messages
            .iter()
            .any(|m| m.contains(&format!("http://127.0.0.1:{port}/metrics"))),
        "{log}"
    );
    assert!(!log.contains(&s3.secret_key));
    m.unmount();
    assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
}

#[test]
fn secondary_metrics_count_applied_transactions() {
    let s3 = SeaweedFs::shared();
    let mut env = s3.env(&s3.new_bucket("metrics-sec"), "metrics-sec");
    env.push(("PRIMARY_NODE_ID".into(), "m-primary".into()));
    let node = |id: &str, port: Option<u16>| {
        let mut env = env.clone();
        env.push(("MEMBRIDGE_NODE_ID".into(), id.into()));
        if let Some(p) = port {
            env.push(("MEMBRIDGE_METRICS_ADDR".into(), format!("127.0.0.1:{p}")));
        }
        Mount::with_files(env, &[])
    };
    let a = node("m-primary", None);
    let c = rusqlite::Connection::open(a.dir.join(DB)).unwrap();
    c.execute_batch("PRAGMA journal_mode=WAL; CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT);")
        .unwrap();
    let port = free_port();
    let b = node("m-secondary", Some(port));
    let bdb = &b.dir.join(DB);
    let rows = |n: i64| {
        move || {
            rusqlite::Connection::open(bdb)
                .ok()
                .and_then(|c| c.query_row("SELECT count(*) FROM t", [], |r| r.get(0)).ok())
                == Some(n)
        }
    };
    wait_for("the secondary's copy", Duration::from_secs(20), rows(0));
    for i in 0..4 {
        c.execute("INSERT INTO t(v) VALUES (?1)", [format!("{i}")])
            .unwrap();
    }
    wait_for(
        "the inserts on the secondary",
        Duration::from_secs(20),
        rows(4),
    );
    let applied = |m: &BTreeMap<String, f64>| {
        m.get(&format!(
            "membridge_transactions_applied_total{{db=\"{DB}\"}}"
        ))
        .copied()
        .unwrap_or(0.0)
            + m.get(&format!("membridge_bootstraps_total{{db=\"{DB}\"}}"))
                .copied()
                .unwrap_or(0.0)
    };
    let (_, _, body) = scrape(port);
    let s = parse(&body);
    assert_eq!(
        get(&s, r#"membridge_role{role="secondary"}"#),
        1.0,
        "{body}"
    );
    assert_eq!(get(&s, r#"membridge_role{role="primary"}"#), 0.0);
    assert!(applied(&s) >= 1.0, "{body}");
    let lag = get(
        &s,
        &format!("membridge_replication_lag_seconds{{db=\"{DB}\"}}"),
    );
    assert!((0.0..60.0).contains(&lag), "{body}");
    assert!(
        !body.contains("membridge_transactions_captured_total{"),
        "{body}"
    );
    // One more commit moves the applied counter.
    let before = applied(&s);
    c.execute("INSERT INTO t(v) VALUES ('x')", []).unwrap();
    wait_for("the applied counter", Duration::from_secs(20), || {
        applied(&parse(&scrape(port).2)) > before
    });
}

#[test]
fn a_metrics_port_in_use_stops_the_mount_with_one_line() {
    let s3 = SeaweedFs::shared();
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("mnt");
    std::fs::create_dir_all(&dir).unwrap();
    let out = std::process::Command::new(BIN)
        .args(["--metrics-addr", &addr, "mount", dir.to_str().unwrap()])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", tmp.path())
        .env("MEMBRIDGE_STATE_DIR", tmp.path().join("state"))
        .env("MEMBRIDGE_NODE_ID", "metrics-busy")
        .envs(s3.env(&s3.new_bucket("metrics-busy"), "metrics-busy"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
    assert!(err.contains(&addr) && err.contains("metrics"), "{err}");
    assert!(!is_mounted(&dir));
    // A malformed address is a config error naming the key.
    let out = std::process::Command::new(BIN)
        .args(["mount", dir.to_str().unwrap()])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", tmp.path())
        .env("MEMBRIDGE_METRICS_ADDR", "localhost")
        .envs(s3.env("b-any", "p"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("MEMBRIDGE_METRICS_ADDR is malformed"), "{err}");
    drop(taken);
}
