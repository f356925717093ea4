//! Prometheus metrics: the counters of [`Metrics`] and gauges derived from the
//! [`StatusDoc`] at scrape time, rendered as the text exposition format
//! (version 0.0.4) at `/metrics` when `--metrics-addr` is given.
//!
//! The counters and the document are state in [`crate::status`], below this
//! module; this module only renders them. [`crate::http`] serves it, beside
//! the status page ([`crate::page`]).

use std::fmt::Write as _;
use std::sync::atomic::Ordering;

use crate::status::counters::{render_labels, Family};
use crate::status::{Metrics, StatusDoc};

/// The whole exposition: counters from here, gauges from `doc`.
pub fn render(m: &Metrics, doc: &StatusDoc) -> String {
    let mut out = Text::default();

    out.family(
        "membridge_info",
        "gauge",
        "Constant 1, labelled with this daemon's version, node and project.",
    );
    out.sample(
        "membridge_info",
        &render_labels(&[
            ("version", &doc.version),
            ("node", &doc.node_id),
            ("canonical_id", &doc.canonical_id),
        ]),
        1.0,
    );

    out.family(
        "membridge_ready",
        "gauge",
        "1 once the mount serves requests, 0 while starting.",
    );
    out.sample("membridge_ready", "", bool01(doc.state == "ready"));

    out.family(
        "membridge_role",
        "gauge",
        "This node's role: 1 for the current one, 0 for the others.",
    );
    let mut roles: Vec<&str> = ROLES.to_vec();
    if !roles.contains(&doc.role.as_str()) {
        roles.push(&doc.role);
    }
    for r in roles {
        out.sample(
            "membridge_role",
            &render_labels(&[("role", r)]),
            bool01(doc.role == r),
        );
    }

    out.family(
        "membridge_epoch",
        "gauge",
        "Epoch of the lease this node last saw (absent before any lease).",
    );
    if let Some(e) = doc.epoch {
        out.sample("membridge_epoch", "", e as f64);
    }

    out.family(
        "membridge_upload_state",
        "gauge",
        "The uploader's state: 1 for the current one (ok, unreachable, error).",
    );
    let mut states = vec!["ok", "unreachable", "error"];
    if !states.contains(&doc.upload_state.as_str()) {
        states.push(&doc.upload_state);
    }
    for s in states {
        out.sample(
            "membridge_upload_state",
            &render_labels(&[("state", s)]),
            bool01(doc.upload_state == s),
        );
    }

    let per_db: [(&str, &str, DbGauge); 5] = [
        (
            "membridge_head_txid",
            "Newest txid known for the database (captured on the primary, published on a secondary).",
            |d| Some(d.head_txid as f64),
        ),
        (
            "membridge_uploaded_txid",
            "Newest txid of the database this node has published to the bucket.",
            |d| Some(d.uploaded_txid as f64),
        ),
        (
            "membridge_applied_txid",
            "Newest txid of the database applied on this secondary.",
            |d| Some(d.applied_txid as f64),
        ),
        (
            "membridge_backlog_transactions",
            "Captured transactions of the database not yet in the bucket.",
            |d| Some(d.backlog as f64),
        ),
        (
            "membridge_replication_lag_seconds",
            "How far this secondary's copy of the database is behind the bucket's head, in seconds.",
            |d| d.lag_seconds,
        ),
    ];
    for (name, help, value) in per_db {
        out.family(name, "gauge", help);
        for (db, d) in &doc.databases {
            if let Some(v) = value(d) {
                out.sample(name, &render_labels(&[("db", db)]), v);
            }
        }
    }

    let counters: [(&str, &str, &Family); 6] = [
        (
            "membridge_transactions_captured_total",
            "Committed transactions journaled on this node as primary.",
            &m.captured,
        ),
        (
            "membridge_transactions_applied_total",
            "Transactions applied from the bucket on this node as secondary.",
            &m.applied,
        ),
        (
            "membridge_bootstraps_total",
            "Rebuilds of a local copy from the bucket's snapshot.",
            &m.bootstraps,
        ),
        (
            "membridge_upload_bytes_total",
            "Bytes of segments and snapshots stored in the bucket.",
            &m.upload_bytes,
        ),
        (
            "membridge_uploads_total",
            "Segments and snapshots stored in the bucket.",
            &m.uploads,
        ),
        (
            "membridge_upload_failures_total",
            "Upload rounds that failed and will be retried.",
            &m.upload_failures,
        ),
    ];
    for (name, help, family) in counters {
        out.family(name, "counter", help);
        for (labels, v) in family.samples() {
            out.sample(name, &labels, v as f64);
        }
    }
    for (name, help, v) in [
        (
            "membridge_read_through_fetches_total",
            "Pages (ranges) fetched from the bucket by the read-through cache.",
            &m.read_through_fetches,
        ),
        (
            "membridge_cache_hits_total",
            "Reads served from the read-through page cache.",
            &m.cache_hits,
        ),
    ] {
        out.family(name, "counter", help);
        out.sample(name, "", v.load(Ordering::Relaxed) as f64);
    }
    out.0
}

/// Reads one per-database gauge from the status document.
type DbGauge = fn(&crate::status::DbStatus) -> Option<f64>;

/// Every role a node can be in (`replica::node::Role` names, and the
/// configured role shown before the lease is known).
const ROLES: &[&str] = &[
    "primary",
    "catching-up",
    "secondary",
    "fenced",
    "handing-over",
    "candidate",
];

fn bool01(b: bool) -> f64 {
    if b {
        1.0
    } else {
        0.0
    }
}

#[derive(Default)]
struct Text(String);

impl Text {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &str, v: f64) {
        let v = if v.is_nan() {
            "NaN".to_string()
        } else if v.is_infinite() {
            if v > 0.0 { "+Inf" } else { "-Inf" }.to_string()
        } else {
            format!("{v}")
        };
        if labels.is_empty() {
            let _ = writeln!(self.0, "{name} {v}");
        } else {
            let _ = writeln!(self.0, "{name}{{{labels}}} {v}");
        }
    }
}

fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{DbStatus, Object};
    use std::collections::BTreeMap;

    fn doc() -> StatusDoc {
        let mut databases = BTreeMap::new();
        databases.insert(
            "claude-mem.db".to_string(),
            DbStatus {
                head_txid: 7,
                uploaded_txid: 5,
                backlog: 2,
                lag_seconds: Some(0.5),
                ..Default::default()
            },
        );
        StatusDoc {
            version: "0.1.0".into(),
            pid: 1,
            node_id: "n\"1".into(),
            canonical_id: "abc".into(),
            mount_dir: "/m".into(),
            started_at: String::new(),
            state: "ready".into(),
            role: "primary".into(),
            policy: "auto".into(),
            epoch: Some(3),
            primary: None,
            classes: crate::status::ClassGlobsDoc {
                replicated_databases: vec![],
                replicated_files: vec![],
                local: String::new(),
            },
            databases,
            log_file: None,
            upload_state: "ok".into(),
            last_outage: None,
            divergent: vec![],
            replaced: vec![],
            last_error: None,
            role_history: vec![],
            legacy: None,
            coexistence: vec![],
            io: Default::default(),
        }
    }

    #[test]
    fn renders_counters_and_gauges_as_prometheus_text() {
        let m = Metrics::default();
        m.txns_captured("claude-mem.db", 2);
        m.txns_captured("claude-mem.db", 1);
        m.uploaded("claude-mem.db", Object::Segment, 100);
        m.upload_failure(true);
        m.read_through_fetch();
        m.cache_hit();
        m.cache_hit();
        let text = render(&m, &doc());
        for line in [
            "membridge_role{role=\"primary\"} 1",
            "membridge_role{role=\"secondary\"} 0",
            "membridge_epoch 3",
            "membridge_transactions_captured_total{db=\"claude-mem.db\"} 3",
            "membridge_upload_bytes_total{db=\"claude-mem.db\",object=\"segment\"} 100",
            "membridge_upload_failures_total{reason=\"unreachable\"} 1",
            "membridge_backlog_transactions{db=\"claude-mem.db\"} 2",
            "membridge_replication_lag_seconds{db=\"claude-mem.db\"} 0.5",
            "membridge_read_through_fetches_total 1",
            "membridge_cache_hits_total 2",
            "membridge_info{version=\"0.1.0\",node=\"n\\\"1\",canonical_id=\"abc\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line}:\n{text}");
        }
        // Every sample belongs to a family declared (HELP, TYPE) before it.
        let mut typed = std::collections::HashSet::new();
        for l in text.lines() {
            if let Some(rest) = l.strip_prefix("# TYPE ") {
                typed.insert(rest.split(' ').next().unwrap().to_string());
            } else if !l.starts_with('#') {
                let name = l.split(['{', ' ']).next().unwrap();
                assert!(typed.contains(name), "untyped sample {l}");
            }
        }
    }
}
