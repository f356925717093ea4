//! `membridge doctor` against a real S3 server: a good setup passes, and each
//! broken one fails with a line that names the problem and never a secret.

mod common;

use std::time::{Duration, Instant};

use membridge::config::Config;
use membridge::doctor::{self, DoctorReport};
use membridge::remote::ObjectStore;

use common::SeaweedFs;

async fn run(cfg: &Config) -> (DoctorReport, String) {
    let mut out = Vec::new();
    let report = doctor::run(cfg, &mut out).await;
    let text = String::from_utf8(out).expect("doctor prints UTF-8");
    (report, text)
}

fn assert_no_secrets(text: &str, secrets: &[&str]) {
    for s in secrets {
        assert!(!text.contains(s), "output leaks a secret:\n{text}");
    }
}

#[tokio::test]
async fn good_config_passes() {
    let s3 = SeaweedFs::shared();
    let bucket = s3.new_bucket("doctor-ok");
    let cfg = s3.config(&bucket, "doctor-project");
    let (report, text) = run(&cfg).await;
    assert!(report.passed(), "{text}");
    assert_eq!(report.exit_code(), 0);
    let reachable = format!("[ok]   bucket reachable: {} (bucket {bucket})", s3.endpoint);
    for line in [
        reachable.as_str(),
        "[ok]   credentials accepted",
        "[ok]   conditional writes enforced",
        "[ok]   lease: none yet",
    ] {
        assert!(text.contains(line), "missing {line:?} in:\n{text}");
    }
    assert!(
        text.contains(&format!("canonical_id {}", cfg.canonical_id)),
        "{text}"
    );
    assert!(!text.contains("[FAIL]"), "{text}");
    assert_no_secrets(&text, &[&s3.secret_key, &s3.access_key]);
    // The probe object is gone.
    let probes = cfg.layout().doctor_probe("");
    assert!(s3.store(&bucket).list(&probes).await.unwrap().is_empty());
}

#[tokio::test]
async fn wrong_secret_is_reported_as_rejected_credentials() {
    let s3 = SeaweedFs::shared();
    let bucket = s3.new_bucket("doctor-creds");
    let wrong = "definitely-not-the-secret";
    let cfg = s3.config_with(&bucket, "p", &[("MINIO_SECRET_KEY", wrong)]);
    let (report, text) = run(&cfg).await;
    assert!(!report.passed(), "{text}");
    assert_eq!(report.exit_code(), 1);
    assert!(text.contains("[FAIL] credentials rejected"), "{text}");
    assert!(text.contains("SignatureDoesNotMatch"), "{text}");
    assert_no_secrets(&text, &[wrong, &s3.secret_key, &s3.access_key]);
}

#[tokio::test]
async fn missing_bucket_is_named() {
    let s3 = SeaweedFs::shared();
    let cfg = s3.config("no-such-bucket-for-doctor", "p");
    let (report, text) = run(&cfg).await;
    assert!(!report.passed(), "{text}");
    assert!(text.contains("[ok]   credentials accepted"), "{text}");
    assert!(
        text.contains("bucket \"no-such-bucket-for-doctor\" does not exist"),
        "{text}"
    );
}

#[tokio::test]
async fn unreachable_endpoint_fails_fast() {
    let s3 = SeaweedFs::shared();
    let endpoint = format!("http://127.0.0.1:{}", common::closed_port());
    let cfg = s3.config_with("any-bucket", "p", &[("MINIO_ENDPOINT", &endpoint)]);
    let t = Instant::now();
    let (report, text) = run(&cfg).await;
    let took = t.elapsed();
    assert!(took < Duration::from_secs(10), "took {took:?}:\n{text}");
    assert!(!report.passed(), "{text}");
    assert!(text.contains("[FAIL] bucket unreachable"), "{text}");
    assert!(text.contains(&endpoint), "{text}");
    assert!(text.contains("[skip]"), "{text}");
    assert_no_secrets(&text, &[&s3.secret_key, &s3.access_key]);
}

#[tokio::test]
async fn lease_is_described_and_malformed_lease_fails() {
    let s3 = SeaweedFs::shared();
    let bucket = s3.new_bucket("doctor-lease");
    let cfg = s3.config_with(&bucket, "p", &[("LEADERSHIP_ENABLED", "0")]);
    let store = s3.store(&bucket);
    let key = cfg.layout().lease();
    let now = chrono::Utc::now().timestamp();
    // As the old tool writes it.
    let lease = |cid: &str| {
        format!(
            r#"{{"canonical_id":"{cid}","primary_node_id":"{}","issued_at":{now},"expires_at":{},"lease_seconds":100,"epoch":4,"policy":"primary_authoritative","issued_by":"x"}}"#,
            cfg.node_id,
            now + 100
        )
    };
    store
        .put(
            &key,
            lease(&cfg.canonical_id).into(),
            membridge::remote::PutMode::Overwrite,
        )
        .await
        .unwrap();
    let (report, text) = run(&cfg).await;
    assert!(report.passed(), "{text}");
    assert!(text.contains("[warn] leadership disabled"), "{text}");
    let want = format!(
        "lease: primary {} (this node), epoch 4, expires in",
        cfg.node_id
    );
    assert!(text.contains(&want), "{text}");
    store
        .put(
            &key,
            bytes::Bytes::from_static(b"{not json"),
            membridge::remote::PutMode::Overwrite,
        )
        .await
        .unwrap();
    let (report, text) = run(&cfg).await;
    assert!(!report.passed());
    assert!(
        text.contains("[FAIL] lease:") && text.contains("not valid JSON"),
        "{text}"
    );
    store
        .put(
            &key,
            lease("ffffffffffffffff").into(),
            membridge::remote::PutMode::Overwrite,
        )
        .await
        .unwrap();
    let (report, text) = run(&cfg).await;
    assert!(!report.passed());
    assert!(
        text.contains("[FAIL] lease:") && text.contains("belongs to project ffffffffffffffff"),
        "{text}"
    );
}

// ── The full doctor through the binary: this machine's side and the verdict ──

use common::mount::Mount;

fn doctor_env(s3: &SeaweedFs, bucket: &str, endpoint: Option<&str>) -> Vec<(String, String)> {
    let mut env = s3.env(bucket, "doctor-full");
    env.push(("MEMBRIDGE_NODE_ID".into(), "doc-node".into()));
    if let Some(e) = endpoint {
        env.retain(|(k, _)| k != "MINIO_ENDPOINT");
        env.push(("MINIO_ENDPOINT".into(), e.into()));
    }
    env
}

fn claude_mem_db() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("db");
    let c = rusqlite::Connection::open(&p).unwrap();
    c.execute_batch(
        "PRAGMA journal_mode=WAL;
         CREATE TABLE observations(id INTEGER PRIMARY KEY, text TEXT);
         CREATE TABLE session_summaries(id INTEGER PRIMARY KEY, summary TEXT);
         INSERT INTO observations(text) VALUES ('a'), ('b');
         INSERT INTO session_summaries(summary) VALUES ('s');",
    )
    .unwrap();
    drop(c);
    std::fs::read(&p).unwrap()
}

fn output(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn last_line(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .last()
        .unwrap_or("")
        .to_string()
}

#[test]
fn healthy_mounted_primary_is_ok() {
    let s3 = SeaweedFs::shared();
    let bucket = s3.new_bucket("doctor-mounted");
    let db = claude_mem_db();
    let m = Mount::with_files(doctor_env(s3, &bucket, None), &[("claude-mem.db", &db)]);
    let t = Instant::now();
    while !(m.status()["role"] == "primary"
        && m.status()["databases"]["claude-mem.db"]["backlog"] == 0
        && m.status()["databases"]["claude-mem.db"]["uploaded_txid"].is_u64())
    {
        assert!(t.elapsed() < Duration::from_secs(15), "{}", m.status());
        std::thread::sleep(Duration::from_millis(100));
    }
    let o = m.run(&["doctor", m.dir.to_str().unwrap()]);
    let text = output(&o);
    assert_eq!(o.status.code(), Some(0), "{text}");
    assert_eq!(last_line(&o), "STATUS: OK", "{text}");
    for want in [
        "[ok]   identity: node doc-node, project \"doctor-full\"",
        "[ok]   lease: primary doc-node (this node), epoch 1",
        "[ok]   mount: ",
        "[ok]   role: primary, epoch 1",
        "[ok]   db claude-mem.db: integrity ok, 2 observations, 1 session_summaries",
        "[ok]   replication claude-mem.db: head txid",
        "backlog 0",
        "[info] mount helper",
        "[info] Claude hook",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
    assert!(
        !text.contains("[warn]") && !text.contains("[FAIL]"),
        "{text}"
    );
    // One line per check: every line is a check or the verdict.
    for line in text.lines() {
        assert!(
            line.starts_with('[') || line.starts_with("STATUS: "),
            "{line:?} in:\n{text}"
        );
    }
}

#[test]
fn not_mounted_is_degraded_and_bucket_down_is_an_error() {
    let s3 = SeaweedFs::shared();
    let bucket = s3.new_bucket("doctor-verdicts");
    let db = claude_mem_db();
    let m = Mount::prepared(doctor_env(s3, &bucket, None), &[("claude-mem.db", &db)]);
    let dir = m.dir.to_str().unwrap().to_string();
    let o = m.run(&["doctor", &dir]);
    let text = output(&o);
    assert_eq!(o.status.code(), Some(4), "{text}");
    assert_eq!(last_line(&o), "STATUS: DEGRADED", "{text}");
    assert!(text.contains("[warn] mount: "), "{text}");
    assert!(text.contains("is not mounted"), "{text}");
    assert!(
        text.contains("[ok]   db claude-mem.db: integrity ok, 2 observations"),
        "{text}"
    );
    let names: Vec<_> = std::fs::read_dir(&m.dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(names.len(), 1, "doctor left no sidecar behind: {names:?}");

    // The old tool's hooks still installed next to membridge are a warning.
    let settings = m.state.join("home/.claude/settings.json");
    std::fs::create_dir_all(settings.parent().unwrap()).unwrap();
    std::fs::write(
        &settings,
        r#"{"hooks":{"SessionStart":[{"hooks":[{"type":"command","command":"~/.claude-mem-minio/bin/claude-mem-pull"}]}]}}"#,
    )
    .unwrap();
    let text = output(&m.run(&["doctor", &dir]));
    assert!(text.contains("[warn] old tool's hooks"), "{text}");

    // The bucket down: an error, reported within seconds.
    let endpoint = format!("http://127.0.0.1:{}", common::closed_port());
    let down = Mount::prepared(doctor_env(s3, &bucket, Some(&endpoint)), &[]);
    let t = Instant::now();
    let o = down.run(&["doctor", down.dir.to_str().unwrap()]);
    let text = output(&o);
    assert!(t.elapsed() < Duration::from_secs(20), "{text}");
    assert_eq!(o.status.code(), Some(1), "{text}");
    assert_eq!(last_line(&o), "STATUS: ERROR", "{text}");
    assert!(text.contains("[FAIL] bucket unreachable"), "{text}");
    assert_no_secrets(&text, &[&s3.secret_key]);
}
