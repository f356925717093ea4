//! Which of claude-mem's tables `membridge merge` imports, by what natural key,
//! and how their rows point at each other: the one place that knows
//! claude-mem's schema.
//!
//! Read from the schema claude-mem 13.25.3 creates (`schema_versions` max 52;
//! `.schema` of a database its worker made, and the import code in
//! `plugin/scripts/worker-service.cjs`):
//!
//! - `sdk_sessions`: `UNIQUE INDEX ux_sdk_sessions_platform_content ON
//!   sdk_sessions(platform_source, content_session_id)`, and
//!   `memory_session_id TEXT UNIQUE` (nullable: set once the observer agent
//!   starts), which `observations`, `session_summaries` and `tool_uses` refer
//!   to by value (`FOREIGN KEY ... REFERENCES sdk_sessions(memory_session_id)
//!   ON UPDATE CASCADE`).
//! - `observations`: `UNIQUE INDEX ux_observations_session_hash ON
//!   observations(memory_session_id, content_hash)`; `content_hash` may be
//!   NULL (rows older than it), then claude-mem's own `importObservation` key
//!   `(memory_session_id, title, created_at_epoch)` applies.
//! - `user_prompts`: no unique index; `importUserPrompt` and
//!   `idx_user_prompts_content_lookup` use `(content_session_id,
//!   prompt_number)`; `session_db_id` is `sdk_sessions.id`.
//! - `session_summaries`: no unique index, one per prompt of a session:
//!   `(memory_session_id, prompt_number, created_at_epoch)`.
//! - `tool_uses`: `UNIQUE(content_session_id, tool_use_id)`; `session_db_id`
//!   is `sdk_sessions.id`, `observation_id` is `observations.id`.
//! - `pending_messages`: the observer agent's work queue (rows are deleted
//!   once processed); `ux_pending_session_tool` is unique on
//!   `(session_db_id, tool_use_id)`. See [`Guard::NewParent`].
//! - `telegram_wrapups`: `UNIQUE(platform_source, content_session_id,
//!   project, route_key)`.
//!
//! The FTS5 tables (`observations_fts`, `session_summaries_fts`,
//! `user_prompts_fts` and their shadow tables) are kept by claude-mem's
//! triggers on insert: merge never writes them. Integer ids are always
//! assigned anew by the replicated database (`AUTOINCREMENT`), and every
//! column that holds another table's id is remapped.

/// The `schema_versions` max these specs were read from.
pub const SCHEMA_VERSION: i64 = 52;

/// How a row may be imported beyond "its key is not there".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Guard {
    /// Any row whose key the replicated database lacks.
    None,
    /// Only a row whose session, or whose tool use, this merge imported: a
    /// queue item of a tool use the replicated database already has was
    /// processed (and deleted) or is queued there; queueing it again would
    /// make the observer agent write the observation twice.
    NewParent,
}

/// One table `merge` imports.
#[derive(Debug)]
pub struct TableSpec {
    pub name: &'static str,
    /// Columns whose values identify a row across databases (after remapping).
    pub key: &'static [&'static str],
    /// Tried when `key` has a NULL or finds nothing (claude-mem's own
    /// import key); a row with NULLs in both is matched on all its columns.
    pub fallback: Option<&'static [&'static str]>,
    /// Integer columns holding `id` of an earlier table: (column, table).
    pub id_refs: &'static [(&'static str, &'static str)],
    /// Text columns holding `sdk_sessions.memory_session_id`.
    pub session_refs: &'static [&'static str],
    pub guard: Guard,
}

/// In import order: every table after the tables it refers to.
pub const TABLES: &[TableSpec] = &[
    TableSpec {
        name: "sdk_sessions",
        key: &["platform_source", "content_session_id"],
        fallback: None,
        id_refs: &[],
        session_refs: &[],
        guard: Guard::None,
    },
    TableSpec {
        name: "user_prompts",
        key: &["content_session_id", "prompt_number"],
        fallback: None,
        id_refs: &[("session_db_id", "sdk_sessions")],
        session_refs: &[],
        guard: Guard::None,
    },
    TableSpec {
        name: "observations",
        key: &["memory_session_id", "content_hash"],
        fallback: Some(&["memory_session_id", "title", "created_at_epoch"]),
        id_refs: &[],
        session_refs: &["memory_session_id"],
        guard: Guard::None,
    },
    TableSpec {
        name: "session_summaries",
        key: &["memory_session_id", "prompt_number", "created_at_epoch"],
        fallback: None,
        id_refs: &[],
        session_refs: &["memory_session_id"],
        guard: Guard::None,
    },
    TableSpec {
        name: "tool_uses",
        key: &["content_session_id", "tool_use_id"],
        fallback: None,
        id_refs: &[
            ("session_db_id", "sdk_sessions"),
            ("observation_id", "observations"),
        ],
        session_refs: &["memory_session_id"],
        guard: Guard::None,
    },
    TableSpec {
        name: "pending_messages",
        key: &["content_session_id", "tool_use_id"],
        fallback: None,
        id_refs: &[("session_db_id", "sdk_sessions")],
        session_refs: &[],
        guard: Guard::NewParent,
    },
    TableSpec {
        name: "telegram_wrapups",
        key: &[
            "platform_source",
            "content_session_id",
            "project",
            "route_key",
        ],
        fallback: None,
        id_refs: &[],
        session_refs: &[],
        guard: Guard::None,
    },
];

/// Tables merge leaves alone on purpose, and why (shown by `--dry-run`).
/// Names ending in `*` are prefixes.
pub const NOT_MERGED: &[(&str, &str)] = &[
    ("schema_versions", "the schema, equal on both sides"),
    ("sqlite_sequence", "kept by SQLite for AUTOINCREMENT"),
    ("observations_fts*", "kept by claude-mem's triggers"),
    ("session_summaries_fts*", "kept by claude-mem's triggers"),
    ("user_prompts_fts*", "kept by claude-mem's triggers"),
    (
        "sync_*",
        "Cloud Sync's state of one device (cursors, outbox), not memories",
    ),
    (
        "file_context_injections",
        "the file-context hook's short-lived de-duplication gate",
    ),
];

/// The entry of [`NOT_MERGED`] that `table` falls under: (name or
/// prefix*, why).
pub fn not_merged(table: &str) -> Option<(&'static str, &'static str)> {
    NOT_MERGED
        .iter()
        .copied()
        .find(|(name, _)| match name.strip_suffix('*') {
            Some(prefix) => table.starts_with(prefix),
            None => table == *name,
        })
}

pub fn spec(table: &str) -> Option<&'static TableSpec> {
    TABLES.iter().find(|t| t.name == table)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reference_points_at_an_earlier_table() {
        for (i, t) in TABLES.iter().enumerate() {
            for (_, target) in t.id_refs {
                let j = TABLES.iter().position(|s| s.name == *target).unwrap();
                assert!(j < i, "{} refers to {target}, imported later", t.name);
            }
            assert!(!t.key.is_empty());
            assert!(not_merged(t.name).is_none(), "{}", t.name);
        }
        assert_eq!(
            not_merged("observations_fts_data"),
            Some(("observations_fts*", "kept by claude-mem's triggers"))
        );
        assert!(not_merged("sync_outbox").is_some());
        assert!(not_merged("observations").is_none());
    }
}
