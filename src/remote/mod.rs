//! The object store: everything membridge keeps in the bucket goes through
//! [`ObjectStore`]. It knows nothing of FUSE or SQLite; it moves opaque bytes under
//! keys and offers the two conditional writes the design rests on (create-if-absent
//! and compare-and-swap on the ETag).
//!
//! - [`keys`]: the bucket layout under `projects/<canonical_id>/` (docs/FORMAT.md).
//! - [`s3`]: the production implementation on aws-sdk-s3 (MinIO, SeaweedFS, AWS).
//! - [`retry`]: the bounded retry policy shared by the implementations.
//! - [`mem`]: an in-memory bucket with the same semantics, for fast tests.
//! - [`faults`]: a wrapper that injects errors, hangs and lost answers.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;

use bytes::Bytes;
use chrono::{DateTime, Utc};

pub mod faults;
pub mod keys;
pub mod mem;
pub mod retry;
pub mod s3;

pub use faults::{Fault, FaultyStore, Op, Rule};
pub use keys::Layout;
pub use mem::MemStore;
pub use retry::RetryPolicy;
pub use s3::{S3Options, S3Store};

/// A boxed future, so that [`ObjectStore`] stays object safe (`Arc<dyn ObjectStore>`)
/// without pulling in a proc-macro crate.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// What a listing or a HEAD tells about an object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    pub key: String,
    pub size: u64,
    /// Opaque, exactly as the server sent it (usually with quotes): pass it back
    /// unchanged to [`PutMode::IfMatch`] or [`ObjectStore::get_if_none_match`].
    pub etag: String,
    pub last_modified: Option<DateTime<Utc>>,
}

/// A whole object and the ETag of the version that was read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GetResult {
    pub body: Bytes,
    pub etag: String,
}

/// How a put treats an object that may already exist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PutMode {
    /// Plain put: last writer wins (heartbeats, audit entries, the legacy snapshot).
    Overwrite,
    /// `If-None-Match: *`: succeeds only if the key does not exist yet (lease
    /// creation, immutable segments and snapshots).
    CreateOnly,
    /// `If-Match: <etag>`: succeeds only if the object still has this ETag (lease
    /// renewal and takeover, manifest advance). A missing object fails too.
    IfMatch(String),
}

impl PutMode {
    pub fn is_conditional(&self) -> bool {
        !matches!(self, PutMode::Overwrite)
    }
}

/// Why a store operation failed. Messages name the operation and key but never
/// credentials: they go to logs, `status.json` and `doctor` as they are.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("{key}: no such object")]
    NotFound { key: String },

    /// A conditional put did not take effect: the key already exists
    /// ([`PutMode::CreateOnly`]) or no longer has the expected ETag
    /// ([`PutMode::IfMatch`]), or a concurrent conditional write won the race
    /// (S3's 409 ConditionalRequestConflict). Re-read before deciding what to do.
    #[error("{key}: precondition failed (another writer changed or created it)")]
    PreconditionFailed { key: String },

    /// The object still has the ETag the caller already holds (HTTP 304).
    #[error("{key}: not modified")]
    NotModified { key: String },

    /// The server refused the request: wrong access key, wrong secret
    /// (`SignatureDoesNotMatch`), no permission, or a clock too far off
    /// (`RequestTimeTooSkewed`). `code` is the S3 error code, or the HTTP status
    /// when the response had no body (HEAD).
    #[error("{op} {key}: access denied by the server ({code}: {message})")]
    AccessDenied {
        op: &'static str,
        key: String,
        code: String,
        message: String,
    },

    #[error("bucket {bucket:?} does not exist")]
    NoSuchBucket { bucket: String },

    /// A range read that starts at or beyond the end of the object.
    #[error("{key}: range of {len} bytes at offset {start} is beyond the end of the object")]
    InvalidRange { key: String, start: u64, len: u64 },

    /// Transient failures (connect errors, timeouts, 5xx, throttling) that
    /// persisted through every retry the policy allowed.
    #[error("{endpoint} unreachable: {op} {key} failed {attempts} time(s) over {elapsed_ms} ms; last error: {detail}")]
    Unreachable {
        endpoint: String,
        op: &'static str,
        key: String,
        attempts: u32,
        elapsed_ms: u64,
        detail: String,
    },

    #[error("{op} {key}: {detail}")]
    Other {
        op: &'static str,
        key: String,
        detail: String,
    },
}

impl StoreError {
    /// Whether trying again later may succeed (the bucket was unreachable), as
    /// opposed to an answer that will not change by itself.
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Unreachable { .. })
    }

    /// Whether the server rejected the credentials themselves (as opposed to, say,
    /// a clock skew, which also comes back as 403).
    pub fn is_credentials_rejected(&self) -> bool {
        matches!(self, StoreError::AccessDenied { code, .. } if code != "RequestTimeTooSkewed")
    }
}

/// A bucket seen as a flat map from keys to immutable versions of bytes.
///
/// Every implementation gives the same guarantees: `put` with a condition is
/// atomic with respect to every other conditional `put` on the same key, so of N
/// concurrent `IfMatch` puts carrying the same ETag at most one succeeds; a
/// successful `put` returns the new version's ETag; reads after a successful
/// write see it. Transient failures are retried inside the store, bounded by its
/// [`RetryPolicy`]; what comes out is final for this call.
pub trait ObjectStore: Send + Sync {
    /// Human-readable location for logs and `doctor`, e.g.
    /// `http://127.0.0.1:9000 (bucket claude-mem)`. Never contains credentials.
    fn describe(&self) -> String;

    /// One cheap authenticated request (a listing of at most one key under
    /// `prefix`) that proves the endpoint answers, the credentials are accepted and
    /// the bucket exists. The prefix keeps it within a policy scoped to a project.
    fn check_bucket<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<()>>;

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<GetResult>>;

    /// `None` when the object still has `etag` (HTTP 304): the cheap poll a
    /// secondary runs against `manifest.json` every second.
    fn get_if_none_match<'a>(
        &'a self,
        key: &'a str,
        etag: &'a str,
    ) -> BoxFuture<'a, Result<Option<GetResult>>>;

    /// `len` bytes from `start`, fewer if the object ends first; an empty result
    /// for `len == 0`. A `start` at or past the end is [`StoreError::InvalidRange`].
    fn get_range<'a>(&'a self, key: &'a str, start: u64, len: u64) -> BoxFuture<'a, Result<Bytes>>;

    fn head<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<ObjectMeta>>;

    /// Stores `body` under `key` and returns the new ETag.
    fn put<'a>(&'a self, key: &'a str, body: Bytes, mode: PutMode)
        -> BoxFuture<'a, Result<String>>;

    /// Stores the file at `path` under `key`, read as it is sent, with the same
    /// conditions and guarantees as [`ObjectStore::put`]. Snapshots and the old
    /// tool's copy are as large as the database: they go through here so the
    /// daemon's memory does not grow with it (docs/ARCHITECTURE.md, "Memory").
    /// The file must not change until the call returns.
    fn put_file<'a>(
        &'a self,
        key: &'a str,
        path: &'a Path,
        mode: PutMode,
    ) -> BoxFuture<'a, Result<String>>;

    /// Writes the whole object to `path` (created or truncated) as it arrives,
    /// with bounded buffers, and returns what a HEAD would have said of it.
    fn get_to_file<'a>(&'a self, key: &'a str, path: &'a Path)
        -> BoxFuture<'a, Result<ObjectMeta>>;

    /// Every object whose key starts with `prefix`, in key order, all pages.
    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<ObjectMeta>>>;

    /// Removes `key`; removing a key that does not exist succeeds.
    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<()>>;
}
