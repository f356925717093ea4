//! The CLI's answer to bad configuration: one line naming the key, where it was
//! looked for and the fix, exit code 1, and never a secret.

mod common;

use std::process::Output;

use common::mount::BIN;
use common::SeaweedFs;

fn run(env: &[(String, String)], args: &[&str]) -> Output {
    std::process::Command::new(BIN)
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", "/nonexistent-home")
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .output()
        .expect("run membridge")
}

fn with(env: &[(String, String)], key: &str, value: Option<&str>) -> Vec<(String, String)> {
    let mut e: Vec<_> = env.iter().filter(|(k, _)| k != key).cloned().collect();
    if let Some(v) = value {
        e.push((key.to_string(), v.to_string()));
    }
    e
}

fn one_line_error(out: &Output) -> String {
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
    err
}

#[test]
fn missing_endpoint() {
    let s3 = SeaweedFs::shared();
    let env = with(&s3.env("b-any", "p"), "MINIO_ENDPOINT", None);
    let err = one_line_error(&run(&env, &["doctor"]));
    assert!(err.contains("MINIO_ENDPOINT is not set"), "{err}");
    assert!(err.contains("looked in flags, environment"), "{err}");
    assert!(err.contains("fix:"), "{err}");
    assert!(!err.contains(&s3.secret_key), "{err}");
}

#[test]
fn bad_url() {
    let s3 = SeaweedFs::shared();
    for bad in [
        "ftp://127.0.0.1:9000",
        "http://127.0.0.1:notaport",
        "http://h/x/y",
    ] {
        let env = with(&s3.env("b-any", "p"), "MINIO_ENDPOINT", Some(bad));
        let err = one_line_error(&run(&env, &["mount", "/tmp"]));
        assert!(err.contains("MINIO_ENDPOINT is malformed"), "{err}");
    }
}

#[test]
fn malformed_number_names_the_key_and_its_source() {
    let s3 = SeaweedFs::shared();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("config.env");
    std::fs::write(&file, "LEADERSHIP_LEASE_SECONDS=soon\n").unwrap();
    let env = with(
        &s3.env("b-any", "p"),
        "MEMBRIDGE_CONFIG",
        Some(file.to_str().unwrap()),
    );
    let err = one_line_error(&run(&env, &["doctor"]));
    assert!(err.contains("LEADERSHIP_LEASE_SECONDS"), "{err}");
    assert!(err.contains(file.to_str().unwrap()), "{err}");
}

#[test]
fn wrong_credentials_are_rejected_by_doctor() {
    let s3 = SeaweedFs::shared();
    let bucket = s3.new_bucket("cli-creds");
    let env = with(
        &s3.env(&bucket, "p"),
        "MINIO_SECRET_KEY",
        Some("wrong-secret-value"),
    );
    let out = run(&env, &["doctor"]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("[FAIL] credentials rejected"), "{text}");
    assert!(!text.contains("wrong-secret-value"), "{text}");
}

#[test]
fn missing_bucket_is_reported_by_doctor() {
    let s3 = SeaweedFs::shared();
    let env = s3.env("no-such-bucket-here", "p");
    let out = run(&env, &["doctor"]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("does not exist"), "{text}");
}

#[test]
fn good_config_passes_doctor() {
    let s3 = SeaweedFs::shared();
    let bucket = s3.new_bucket("cli-ok");
    let out = run(&s3.env(&bucket, "p"), &["doctor"]);
    let text = String::from_utf8_lossy(&out.stdout);
    // The bucket side passes; nothing is mounted at ~/.claude-mem (HOME does
    // not exist here), so the node is degraded, not broken: exit 4.
    assert_eq!(out.status.code(), Some(4), "{text}");
    assert!(text.ends_with("STATUS: DEGRADED\n"), "{text}");
    assert!(!text.contains("[FAIL]"), "{text}");
    assert!(
        text.contains("[ok]   conditional writes enforced"),
        "{text}"
    );
    assert!(!text.contains(&s3.secret_key) && !text.contains(&s3.access_key));
}

/// `bucket` durability is designed, not built: asking for it is refused in
/// one line that says why and what to use instead, before anything mounts.
#[test]
fn bucket_durability_is_refused_with_the_reason() {
    let s3 = SeaweedFs::shared();
    let dir = tempfile::tempdir().unwrap();
    let env = with(
        &s3.env("b-any", "p"),
        "MEMBRIDGE_DURABILITY",
        Some("bucket"),
    );
    let err = one_line_error(&run(&env, &["mount", dir.path().to_str().unwrap()]));
    assert!(err.contains("not available in this version"), "{err}");
    assert!(err.contains("--durability local"), "{err}");
    let env = with(&s3.env("b-any", "p"), "MEMBRIDGE_DURABILITY", Some("fast"));
    let out = run(&env, &["mount", dir.path().to_str().unwrap()]);
    assert_ne!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stderr).contains("possible values: local, bucket"));
}
