//! `membridge doctor` against a real S3 server: a good setup passes, and each
//! broken one fails with a line that names the problem and never a secret.

mod common;

use std::time::{Duration, Instant};

use membridge::config::Config;
use membridge::doctor::{self, DoctorReport};
use membridge::remote::{Layout, ObjectStore};

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
    let probes = Layout::for_config(&cfg).doctor_probe("");
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
    let key = Layout::for_config(&cfg).lease();
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
