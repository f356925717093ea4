use super::*;

fn layers(env: &[(&str, &str)]) -> Layers {
    let env = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let mut flags = BTreeMap::new();
    flags.insert("MEMBRIDGE_CONFIG".into(), "/nonexistent/config.env".into());
    Layers::from_parts(flags, env)
}

const GOOD: &[(&str, &str)] = &[
    ("MINIO_ENDPOINT", "http://127.0.0.1:9000"),
    ("MINIO_ACCESS_KEY", "ak"),
    ("MINIO_SECRET_KEY", "sk-very-secret"),
    ("MINIO_BUCKET", "claude-mem"),
    ("CLAUDE_PROJECT_ID", "demo"),
    ("MEMBRIDGE_NODE_ID", "n1"),
];

#[test]
fn canonical_id_matches_python_hashlib() {
    // python3 -c 'import hashlib;print(hashlib.sha256(b"demo").hexdigest()[:16])'
    assert_eq!(canonical_id("demo"), "2a97516c354b6884");
    assert_eq!(canonical_id(""), "e3b0c44298fc1c14");
}

#[test]
fn env_file_parsing_is_shell_like() {
    let m = parse_env_file(
        "# c\nexport MINIO_BUCKET=\"b1\"\nMINIO_REGION='eu' \nX=1 # trailing\n\nbad line\n",
    );
    assert_eq!(m["MINIO_BUCKET"], "b1");
    assert_eq!(m["MINIO_REGION"], "eu");
    assert_eq!(m["X"], "1");
    assert_eq!(m.len(), 3);
}

#[test]
fn flags_beat_env_beat_file() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("config.env");
    std::fs::write(&f, "MINIO_BUCKET=from-file\nMINIO_REGION=file-region\n").unwrap();
    let mut flags = BTreeMap::new();
    flags.insert("MEMBRIDGE_CONFIG".into(), f.display().to_string());
    flags.insert("MINIO_BUCKET".into(), "from-flag".into());
    let mut env = BTreeMap::new();
    env.insert("MINIO_BUCKET".into(), "from-env".into());
    env.insert("MINIO_REGION".into(), "env-region".into());
    let l = Layers::from_parts(flags, env);
    assert_eq!(
        l.get("MINIO_BUCKET").unwrap(),
        ("from-flag".into(), Source::Flag)
    );
    assert_eq!(
        l.get("MINIO_REGION").unwrap(),
        ("env-region".into(), Source::Env)
    );
    let mut l2 = l.clone();
    l2.env.clear();
    assert_eq!(l2.get("MINIO_REGION").unwrap().1, Source::File(f));
}

#[test]
fn missing_key_error_names_key_places_and_fix() {
    let env: Vec<_> = GOOD
        .iter()
        .filter(|(k, _)| *k != "MINIO_ENDPOINT")
        .cloned()
        .collect();
    let e = Config::from_layers(&layers(&env)).unwrap_err().to_string();
    assert!(e.contains("MINIO_ENDPOINT is not set"), "{e}");
    assert!(e.contains("/nonexistent/config.env"), "{e}");
    assert!(e.contains("fix: add MINIO_ENDPOINT="), "{e}");
    assert!(!e.contains('\n'));
}

#[test]
fn malformed_values_are_rejected_without_leaking_secrets() {
    for (k, v) in [
        ("MINIO_ENDPOINT", "ftp://x"),
        ("MINIO_ENDPOINT", "http://host:99999"),
        ("MINIO_ENDPOINT", "http://host/path"),
        ("MINIO_BUCKET", "Bad_Bucket"),
        ("LEADERSHIP_LEASE_SECONDS", "soon"),
        ("LEADERSHIP_ENABLED", "maybe"),
        ("LEADERSHIP_POLICY", "sometimes"),
        ("MEMBRIDGE_FOLLOW_IDLE_S", "0"),
        ("MEMBRIDGE_REPLICATE", "/abs.db"),
        ("MEMBRIDGE_METRICS_ADDR", "localhost"),
        ("MEMBRIDGE_METRICS_ADDR", "127.0.0.1:99999"),
    ] {
        let mut env: Vec<_> = GOOD.iter().filter(|(kk, _)| *kk != k).cloned().collect();
        env.push((k, v));
        let e = Config::from_layers(&layers(&env)).unwrap_err().to_string();
        assert!(e.contains(k) && e.contains("malformed"), "{k}: {e}");
        assert!(!e.contains("sk-very-secret"));
    }
}

#[test]
fn policy_and_defaults() {
    let c = Config::from_layers(&layers(GOOD)).unwrap();
    assert_eq!(c.policy, Policy::Auto { candidate: true });
    assert_eq!(c.lease_ttl, Duration::from_secs(30));
    assert_eq!(c.classes.databases, vec!["claude-mem.db"]);
    assert_eq!(c.s3.region, "us-east-1");
    assert_eq!(c.metrics_addr, None);
    assert!(!format!("{c:?}").contains("sk-very-secret"));
    let mut env = GOOD.to_vec();
    env.push(("PRIMARY_NODE_ID", "n1"));
    let c = Config::from_layers(&layers(&env)).unwrap();
    assert_eq!(c.configured_role(), "primary");
    env.push(("LEADERSHIP_ENABLED", "0"));
    assert_eq!(
        Config::from_layers(&layers(&env)).unwrap().policy,
        Policy::Disabled
    );
}

#[test]
fn replicated_files_default_to_the_markers_and_empty_means_none() {
    let files = |extra: &[(&str, &str)]| {
        let mut env = GOOD.to_vec();
        env.extend_from_slice(extra);
        Config::from_layers(&layers(&env)).unwrap().classes.files
    };
    assert_eq!(
        files(&[]),
        vec![".cwd-remap-applied-v1", ".cleanup-v12.4.3-applied"]
    );
    assert_eq!(
        files(&[("MEMBRIDGE_REPLICATE_FILES", "")]),
        Vec::<String>::new()
    );
    assert_eq!(
        files(&[("MEMBRIDGE_REPLICATE_FILES", "a.json, modes/*.json")]),
        vec!["a.json", "modes/*.json"]
    );
    // An empty flag wins over a value further down.
    let mut flags = BTreeMap::new();
    flags.insert("MEMBRIDGE_CONFIG".to_string(), "/nonexistent".to_string());
    flags.insert("MEMBRIDGE_REPLICATE_FILES".to_string(), String::new());
    let mut env: BTreeMap<String, String> = GOOD
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    env.insert("MEMBRIDGE_REPLICATE_FILES".into(), "x".into());
    let c = Config::from_layers(&Layers::from_parts(flags, env)).unwrap();
    assert!(c.classes.files.is_empty());
}

#[test]
fn follow_is_opt_in_and_excludes_pinning() {
    let mut env = GOOD.to_vec();
    env.push(("LEADERSHIP_POLICY", "follow"));
    let c = Config::from_layers(&layers(&env)).unwrap();
    assert_eq!(c.policy, Policy::Follow { idle_s: 120 });
    assert_eq!(
        (c.policy.name(), c.configured_role()),
        ("follow", "candidate")
    );
    env.push(("MEMBRIDGE_FOLLOW_IDLE_S", "30"));
    let c = Config::from_layers(&layers(&env)).unwrap();
    assert_eq!(c.policy, Policy::Follow { idle_s: 30 });
    for clash in [
        ("PRIMARY_NODE_ID", "n1"),
        ("LEADERSHIP_ENABLED", "0"),
        ("LEADERSHIP_CANDIDATE", "0"),
    ] {
        let mut env = env.clone();
        env.push(clash);
        let e = Config::from_layers(&layers(&env)).unwrap_err().to_string();
        assert!(
            e.contains("LEADERSHIP_POLICY") && e.contains(clash.0),
            "{e}"
        );
    }
}

#[test]
fn readme_documents_every_key() {
    let readme = include_str!("../../README.md");
    for (key, _, _) in KEYS {
        assert!(
            readme.contains(&format!("| `{key}` |")),
            "README lacks {key}"
        );
    }
}

#[test]
fn endpoint_normalization() {
    assert_eq!(
        normalize_endpoint("host:9000", false).unwrap(),
        "http://host:9000"
    );
    assert_eq!(
        normalize_endpoint("host:9000", true).unwrap(),
        "https://host:9000"
    );
    assert_eq!(normalize_endpoint("HTTP://h/", true).unwrap(), "http://h");
    assert!(normalize_endpoint("http://", true).is_err());
}
