//! How the status is shown to people and tools: the `.membridge/status.json`
//! and `.membridge/primary` files the filesystem serves, and the text of
//! `membridge status`. The state itself is [`crate::status`], below this
//! module; Prometheus is [`crate::metrics`].

use crate::fs::virt::VirtualFiles;
use crate::status::{Status, StatusDoc};

impl VirtualFiles for Status {
    fn names(&self) -> &'static [&'static str] {
        &["status.json", "primary"]
    }

    fn content(&self, name: &str) -> Option<Vec<u8>> {
        let doc = self.snapshot();
        match name {
            "status.json" => {
                let mut v = serde_json::to_vec_pretty(&doc).ok()?;
                v.push(b'\n');
                Some(v)
            }
            "primary" => {
                let p = match &doc.primary {
                    Some(p) if *p != doc.node_id => format!("{p}\n"),
                    _ => String::new(),
                };
                Some(p.into_bytes())
            }
            _ => None,
        }
    }
}

/// `membridge status` without `--json`: the fields an operator looks at first.
pub fn render_text(d: &StatusDoc) -> String {
    let mut s = format!(
        "mount:     {} ({}, pid {})\nnode:      {}\nproject:   {}\nrole:      {} (policy {})\nprimary:   {}\nepoch:     {}\n",
        d.mount_dir,
        d.state,
        d.pid,
        d.node_id,
        d.canonical_id,
        d.role,
        d.policy,
        d.primary.as_deref().unwrap_or("-"),
        d.epoch.map(|e| e.to_string()).unwrap_or_else(|| "-".into()),
    );
    for (name, db) in &d.databases {
        s += &format!(
            "db {name}: head {} uploaded {} applied {} backlog {} lag {}\n",
            db.head_txid,
            db.uploaded_txid,
            db.applied_txid,
            db.backlog,
            db.lag_seconds
                .map(|l| format!("{l:.1}s"))
                .unwrap_or_else(|| "-".into())
        );
        if let Some(h) = &db.hydration {
            s += &format!(
                "   local {}/{} pages ({:.0}%){}\n",
                h.pages_local,
                h.pages_total,
                h.pages_local as f64 * 100.0 / h.pages_total.max(1) as f64,
                match (h.done, h.verified) {
                    (_, true) => ", hydrated and verified",
                    (true, false) => ", hydrated",
                    _ => ", hydrating",
                },
            );
        }
        if let Some(rate) = db.cache_hit_rate() {
            s += &format!(
                "   read-through: {} fetches, cache hit rate {:.0}%\n",
                db.read_through_fetches,
                rate * 100.0
            );
        }
        if db.refused_writes > 0 {
            s += &format!(
                "   refused {} write transaction(s) of clients here, the last at {} (not the primary: writes go to {})\n",
                db.refused_writes,
                db.last_refused.as_deref().unwrap_or("-"),
                d.primary.as_deref().unwrap_or("the primary"),
            );
        }
        if let Some(e) = &db.last_error {
            s += &format!("   last error: {e}\n");
        }
    }
    if let Some(e) = &d.last_error {
        s += &format!("last error: {e}\n");
    }
    if let Some(l) = &d.legacy {
        s += &format!(
            "legacy:    sqlite/claude-mem.db written by {}{} at {}{}{}\n",
            l.written_by.as_deref().unwrap_or("?"),
            if l.by_membridge {
                ""
            } else {
                " (the old tool)"
            },
            l.written_at.as_deref().unwrap_or("?"),
            l.txid.map(|t| format!(", txid {t}")).unwrap_or_default(),
            l.age_seconds
                .map(|a| format!(
                    ", {a:.0}s behind (refreshed within {} s of a change)",
                    l.refresh_seconds
                ))
                .unwrap_or_default(),
        );
    }
    for c in &d.coexistence {
        s += &format!("old tool:  {c}\n");
    }
    for r in &d.divergent {
        s += &format!("divergent: {r} (never uploaded; see membridge doctor)\n");
        let copy = std::fs::read(r)
            .ok()
            .and_then(|b| serde_json::from_slice::<crate::replica::divergent::Report>(&b).ok())
            .and_then(|r| r.copy);
        if let Some(copy) = copy {
            s += &format!("   bring it back: membridge merge {copy}   (or: membridge merge --dismiss {copy})\n");
        }
    }
    for c in &d.replaced {
        s += &format!(
            "set aside: {c} (this node's database before the bucket's copy replaced it)\n   \
             bring it back: membridge merge {c}   (or: membridge merge --dismiss {c})\n"
        );
    }
    s
}
