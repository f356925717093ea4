//! [`MemStore`]: an [`ObjectStore`] held in memory, with the semantics of an S3
//! bucket, for tests that need speed or many runs (model-based tests, fault
//! injection through [`super::faults::FaultyStore`]). SeaweedFS stays the
//! real-server tier; this one must never be more lenient than it.
//!
//! What it guarantees, as S3 does for single-part puts:
//! - `CreateOnly` fails with `PreconditionFailed` if the key exists; `IfMatch`
//!   fails if the key is missing or has another ETag. Each put is atomic with
//!   respect to every other operation (one lock over the whole map).
//! - The ETag is a quoted hash of the body, like S3's MD5: the same bytes give the
//!   same ETag, so a compare-and-swap cannot tell a rewrite of identical bytes
//!   (ABA), exactly as on a real server.
//! - Listings are in key order; ranges are cut at the end of the object, and a
//!   range starting at or past the end is `InvalidRange`.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};

use super::{BoxFuture, GetResult, ObjectMeta, ObjectStore, PutMode, Result, StoreError};

#[derive(Debug, Clone)]
struct Object {
    body: Bytes,
    etag: String,
    last_modified: DateTime<Utc>,
}

/// One bucket in memory. Cheap to create; share it as `Arc<MemStore>` (or
/// `Arc<dyn ObjectStore>`) between the nodes of a test.
#[derive(Debug, Default)]
pub struct MemStore {
    name: String,
    objects: Mutex<BTreeMap<String, Object>>,
}

/// The ETag of `body`: 16 bytes of its SHA-256, quoted like S3's MD5 ETags.
pub fn etag_of(body: &[u8]) -> String {
    let digest = Sha256::digest(body);
    format!("\"{}\"", hex::encode(&digest[..16]))
}

/// A local file a streaming put or get could not read or write.
pub(crate) fn local_io(op: &'static str, key: &str, path: &Path, e: std::io::Error) -> StoreError {
    StoreError::Other {
        op,
        key: key.to_string(),
        detail: format!("{}: {e}", path.display()),
    }
}

impl MemStore {
    /// `name` only serves [`ObjectStore::describe`].
    pub fn new(name: &str) -> MemStore {
        MemStore {
            name: name.to_string(),
            objects: Mutex::new(BTreeMap::new()),
        }
    }

    /// Every key, in order (for assertions).
    pub fn keys(&self) -> Vec<String> {
        self.objects.lock().unwrap().keys().cloned().collect()
    }

    /// The body under `key`, if any (for assertions).
    pub fn body(&self, key: &str) -> Option<Bytes> {
        self.objects
            .lock()
            .unwrap()
            .get(key)
            .map(|o| o.body.clone())
    }

    fn not_found(key: &str) -> StoreError {
        StoreError::NotFound {
            key: key.to_string(),
        }
    }

    fn get_now(&self, key: &str) -> Result<GetResult> {
        let objects = self.objects.lock().unwrap();
        let o = objects.get(key).ok_or_else(|| Self::not_found(key))?;
        Ok(GetResult {
            body: o.body.clone(),
            etag: o.etag.clone(),
        })
    }

    fn get_range_now(&self, key: &str, start: u64, len: u64) -> Result<Bytes> {
        // As S3Store: an empty range asks the server nothing.
        if len == 0 {
            return Ok(Bytes::new());
        }
        let objects = self.objects.lock().unwrap();
        let o = objects.get(key).ok_or_else(|| Self::not_found(key))?;
        let size = o.body.len() as u64;
        if start >= size {
            return Err(StoreError::InvalidRange {
                key: key.to_string(),
                start,
                len,
            });
        }
        let end = start.saturating_add(len).min(size);
        Ok(o.body.slice(start as usize..end as usize))
    }

    fn put_now(&self, key: &str, body: Bytes, mode: &PutMode) -> Result<String> {
        let mut objects = self.objects.lock().unwrap();
        let current = objects.get(key).map(|o| o.etag.as_str());
        let allowed = match mode {
            PutMode::Overwrite => true,
            PutMode::CreateOnly => current.is_none(),
            PutMode::IfMatch(etag) => current == Some(etag.as_str()),
        };
        if !allowed {
            return Err(StoreError::PreconditionFailed {
                key: key.to_string(),
            });
        }
        let etag = etag_of(&body);
        objects.insert(
            key.to_string(),
            Object {
                body,
                etag: etag.clone(),
                last_modified: Utc::now(),
            },
        );
        Ok(etag)
    }

    fn meta(key: &str, o: &Object) -> ObjectMeta {
        ObjectMeta {
            key: key.to_string(),
            size: o.body.len() as u64,
            etag: o.etag.clone(),
            last_modified: Some(o.last_modified),
        }
    }
}

impl ObjectStore for MemStore {
    fn describe(&self) -> String {
        format!("memory://{}", self.name)
    }

    fn check_bucket<'a>(&'a self, _prefix: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async { Ok(()) })
    }

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<GetResult>> {
        Box::pin(async move { self.get_now(key) })
    }

    fn get_if_none_match<'a>(
        &'a self,
        key: &'a str,
        etag: &'a str,
    ) -> BoxFuture<'a, Result<Option<GetResult>>> {
        Box::pin(async move {
            let got = self.get_now(key)?;
            Ok((got.etag != etag).then_some(got))
        })
    }

    fn get_range<'a>(&'a self, key: &'a str, start: u64, len: u64) -> BoxFuture<'a, Result<Bytes>> {
        Box::pin(async move { self.get_range_now(key, start, len) })
    }

    fn head<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<ObjectMeta>> {
        Box::pin(async move {
            let objects = self.objects.lock().unwrap();
            let o = objects.get(key).ok_or_else(|| Self::not_found(key))?;
            Ok(Self::meta(key, o))
        })
    }

    fn put<'a>(
        &'a self,
        key: &'a str,
        body: Bytes,
        mode: PutMode,
    ) -> BoxFuture<'a, Result<String>> {
        Box::pin(async move { self.put_now(key, body, &mode) })
    }

    fn put_file<'a>(
        &'a self,
        key: &'a str,
        path: &'a Path,
        mode: PutMode,
    ) -> BoxFuture<'a, Result<String>> {
        // The bucket is memory: the body ends up here whole anyway.
        Box::pin(async move {
            let body = tokio::fs::read(path)
                .await
                .map_err(|e| local_io("put", key, path, e))?;
            self.put_now(key, Bytes::from(body), &mode)
        })
    }

    fn get_to_file<'a>(
        &'a self,
        key: &'a str,
        path: &'a Path,
    ) -> BoxFuture<'a, Result<ObjectMeta>> {
        Box::pin(async move {
            let meta = {
                let objects = self.objects.lock().unwrap();
                let o = objects.get(key).ok_or_else(|| Self::not_found(key))?;
                (Self::meta(key, o), o.body.clone())
            };
            tokio::fs::write(path, &meta.1)
                .await
                .map_err(|e| local_io("get", key, path, e))?;
            Ok(meta.0)
        })
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<ObjectMeta>>> {
        Box::pin(async move {
            let objects = self.objects.lock().unwrap();
            Ok(objects
                .range(prefix.to_string()..)
                .take_while(|(k, _)| k.starts_with(prefix))
                .map(|(k, o)| Self::meta(k, o))
                .collect())
        })
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.objects.lock().unwrap().remove(key);
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    #[tokio::test]
    async fn conditional_puts() {
        let s = MemStore::new("t");
        let e1 = s.put("k", b("v1"), PutMode::CreateOnly).await.unwrap();
        assert!(matches!(
            s.put("k", b("v2"), PutMode::CreateOnly).await,
            Err(StoreError::PreconditionFailed { .. })
        ));
        let e2 = s
            .put("k", b("v2"), PutMode::IfMatch(e1.clone()))
            .await
            .unwrap();
        assert_ne!(e1, e2);
        assert!(matches!(
            s.put("k", b("v3"), PutMode::IfMatch(e1.clone())).await,
            Err(StoreError::PreconditionFailed { .. })
        ));
        assert!(matches!(
            s.put("absent", b("v"), PutMode::IfMatch(e2.clone())).await,
            Err(StoreError::PreconditionFailed { .. })
        ));
        assert!(s.body("absent").is_none(), "a failed put stores nothing");
        // Same bytes, same ETag, as S3's MD5: a CAS cannot see an ABA rewrite.
        let e1b = s.put("k", b("v1"), PutMode::Overwrite).await.unwrap();
        assert_eq!(e1b, e1);
        s.put("k", b("v4"), PutMode::IfMatch(e1)).await.unwrap();
        assert_eq!(s.body("k").unwrap(), b("v4"));
    }

    #[tokio::test]
    async fn reads_polls_ranges_lists() {
        let s = MemStore::new("t");
        let e = s
            .put("a/2", b("0123456789"), PutMode::Overwrite)
            .await
            .unwrap();
        s.put("a/1", b("x"), PutMode::Overwrite).await.unwrap();
        s.put("b/1", b("y"), PutMode::Overwrite).await.unwrap();
        assert_eq!(s.get_if_none_match("a/2", &e).await.unwrap(), None);
        let fresh = s.get_if_none_match("a/2", "\"other\"").await.unwrap();
        assert_eq!(fresh.unwrap().body, b("0123456789"));
        assert!(matches!(
            s.get_if_none_match("none", &e).await,
            Err(StoreError::NotFound { .. })
        ));
        assert_eq!(s.get_range("a/2", 2, 3).await.unwrap(), b("234"));
        assert_eq!(s.get_range("a/2", 8, 100).await.unwrap(), b("89"));
        assert!(s.get_range("a/2", 3, 0).await.unwrap().is_empty());
        assert!(matches!(
            s.get_range("a/2", 10, 1).await,
            Err(StoreError::InvalidRange { start: 10, .. })
        ));
        let keys: Vec<String> = s
            .list("a/")
            .await
            .unwrap()
            .into_iter()
            .map(|m| m.key)
            .collect();
        assert_eq!(keys, ["a/1", "a/2"]);
        let meta = s.head("a/2").await.unwrap();
        assert_eq!((meta.size, meta.etag), (10, e));
        s.delete("a/2").await.unwrap();
        s.delete("a/2").await.unwrap();
        assert!(matches!(
            s.head("a/2").await,
            Err(StoreError::NotFound { .. })
        ));
        assert_eq!(s.keys(), ["a/1", "b/1"]);
    }

    /// Of N concurrent compare-and-swaps from the same ETag, exactly one wins.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn one_winner_per_round() {
        let s = std::sync::Arc::new(MemStore::new("t"));
        s.put("k", b("0"), PutMode::CreateOnly).await.unwrap();
        for round in 0..20 {
            let start = s.get("k").await.unwrap().etag;
            let mut tasks = tokio::task::JoinSet::new();
            for w in 0..8 {
                let (s, start) = (s.clone(), start.clone());
                tasks.spawn(async move {
                    let body = Bytes::from(format!("{round}-{w}"));
                    s.put("k", body, PutMode::IfMatch(start)).await.is_ok()
                });
            }
            let mut wins = 0;
            while let Some(r) = tasks.join_next().await {
                wins += r.unwrap() as u32;
            }
            assert_eq!(wins, 1, "round {round}");
        }
    }
}
