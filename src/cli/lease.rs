//! What `membridge leadership info` and `membridge nodes` print
//! (docs/ARCHITECTURE.md §3 "Lease, roles and fencing"), from what
//! [`crate::lease`] reads.

use std::fmt::Write as _;

use chrono::{DateTime, Utc};

use crate::lease::time::fmt_time;
use crate::lease::Policy;
use crate::lease::{Handover, Lease, LeaseClient, NodeEntry};

fn policy_of_node(p: &Policy) -> String {
    match p {
        Policy::Pinned { primary } => format!("pinned to {primary}"),
        Policy::Auto { candidate: true } => "auto, candidate".into(),
        Policy::Auto { candidate: false } => "auto, not a candidate".into(),
        Policy::Follow { idle_s } => format!("follow, after {idle_s} s idle"),
        Policy::Disabled => "disabled".into(),
    }
}

/// `membridge leadership info`, in the old tool's `leadership_info` layout.
pub fn render_info(
    client: &LeaseClient,
    lease: Option<&Lease>,
    handover: Option<&Handover>,
    now: DateTime<Utc>,
) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "=== Leadership Lease ===");
    let _ = writeln!(s, "  node_id:       {}", client.node_id);
    let _ = writeln!(s, "  canonical_id:  {}", client.canonical_id);
    let _ = writeln!(s);
    let role = match (&client.policy, lease) {
        (Policy::Disabled, _) => "primary (leadership disabled: no lease is used)",
        (_, Some(l)) if l.primary_node_id == client.node_id && client.seen_held(l, now) => {
            "primary"
        }
        _ => "secondary",
    };
    let _ = writeln!(s, "  role:          {role}");
    let Some(l) = lease else {
        let _ = writeln!(s, "  primary:       none (no lease yet)");
        let _ = writeln!(s, "  epoch:         0");
        let _ = writeln!(s, "  policy:        {}", policy_of_node(&client.policy));
        let _ = writeln!(s, "  ttl_remaining: -");
        if client.policy == Policy::Disabled {
            warn_disabled(&mut s);
        }
        return s;
    };
    let held = client.seen_held(l, now);
    let primary = if held {
        l.primary_node_id.clone()
    } else {
        format!("none (last: {})", l.primary_node_id)
    };
    let _ = writeln!(s, "  primary:       {primary}");
    let _ = writeln!(s, "  epoch:         {}", l.epoch);
    let _ = writeln!(
        s,
        "  policy:        {} (this node: {})",
        l.policy,
        policy_of_node(&client.policy)
    );
    let _ = writeln!(s, "  issued_by:     {}", l.issued_by);
    let _ = writeln!(s, "  issued_at:     {}", fmt_time(l.issued_at));
    let _ = writeln!(s, "  expires_at:    {}", fmt_time(l.expires_at));
    let ttl = l.remaining(now).num_seconds();
    let note = if l.is_released() {
        format!(
            " (released by {}; any eligible node may take it now)",
            l.released_by().unwrap_or("?")
        )
    } else if ttl < 0 {
        " (expired)".to_string()
    } else {
        String::new()
    };
    let _ = writeln!(s, "  ttl_remaining: {ttl}s{note}");
    if let Some(h) = handover {
        let _ = writeln!(
            s,
            "  handover:      to {} requested by {} at {}",
            h.to,
            h.requested_by,
            fmt_time(h.at)
        );
    }
    if l.needs_ui_selection == Some(true) {
        let _ = writeln!(s);
        let _ = writeln!(s, "  WARNING: needs_ui_selection=true");
        let _ = writeln!(
            s,
            "  Confirm the primary node with: membridge leadership select NODE"
        );
    }
    if client.policy == Policy::Disabled {
        warn_disabled(&mut s);
    }
    s
}

fn warn_disabled(s: &mut String) {
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "  WARNING: LEADERSHIP_ENABLED=0: this node writes without a lease; make sure no other node writes"
    );
}

/// `membridge nodes`: one row per heartbeat, stale ones marked.
pub fn render_nodes(entries: &[NodeEntry], now: DateTime<Utc>) -> String {
    if entries.is_empty() {
        return "no node has written a heartbeat yet\n".into();
    }
    let header = [
        "NODE",
        "ROLE",
        "EPOCH",
        "APPLIED",
        "LAG",
        "VERSION",
        "LAST SEEN",
        "",
    ];
    let mut rows: Vec<[String; 8]> = vec![header.map(String::from)];
    for e in entries {
        let stale = if e.stale { "STALE" } else { "" }.to_string();
        match &e.heartbeat {
            Ok(h) => {
                let age = (now - h.last_seen).num_seconds().max(0);
                rows.push([
                    h.node_id.clone(),
                    h.role.clone(),
                    h.epoch.map_or("-".into(), |e| e.to_string()),
                    h.applied_txid.to_string(),
                    h.lag_seconds.map_or("-".into(), |l| format!("{l:.1}s")),
                    h.version.clone(),
                    format!("{} ({age}s ago)", fmt_time(h.last_seen)),
                    stale,
                ]);
            }
            Err(why) => {
                let name = e.key.rsplit('/').next().unwrap_or(&e.key);
                let node = name.trim_end_matches(".json").to_string();
                rows.push([
                    node,
                    format!("unreadable: {why}"),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    stale,
                ]);
            }
        }
    }
    let mut widths = [0usize; 8];
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut s = String::new();
    for r in &rows {
        let mut line = String::new();
        for (i, (c, w)) in r.iter().zip(widths).enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            let _ = write!(line, "{c:<w$}");
        }
        s.push_str(line.trim_end());
        s.push('\n');
    }
    s
}
