//! An in-process [`ObjectStore`] with the same contract as S3 (conditional puts,
//! 304s, ranges, listing by prefix), so that the lease, uploader and follower can
//! be unit-tested without a server, including an outage ([`MemoryStore::set_offline`]).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use bytes::Bytes;
use chrono::{DateTime, Utc};

use super::{BoxFuture, GetResult, ObjectMeta, ObjectStore, PutMode, Result, StoreError};

#[derive(Debug)]
struct Object {
    body: Bytes,
    etag: String,
    modified: DateTime<Utc>,
}

/// A bucket in memory. Every write gets a fresh ETag, even for identical bytes,
/// so that callers cannot come to rely on content-derived ETags.
#[derive(Debug, Default)]
pub struct MemoryStore {
    objects: Mutex<BTreeMap<String, Object>>,
    next_etag: AtomicU64,
    offline: AtomicBool,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// While offline every operation fails with [`StoreError::Unreachable`], as
    /// the S3 store does once its retries are exhausted.
    pub fn set_offline(&self, offline: bool) {
        self.offline.store(offline, Ordering::SeqCst);
    }

    /// Number of objects stored (for assertions in tests).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Object>> {
        // A panic while holding the lock cannot leave the map half-updated (every
        // mutation is a single insert or remove), so a poisoned lock is still usable.
        self.objects.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn check_online(&self, op: &'static str, key: &str) -> Result<()> {
        if self.offline.load(Ordering::SeqCst) {
            return Err(StoreError::Unreachable {
                endpoint: "memory".into(),
                op,
                key: key.into(),
                attempts: 1,
                elapsed_ms: 0,
                detail: "store set offline".into(),
            });
        }
        Ok(())
    }

    fn get_now(&self, key: &str) -> Result<GetResult> {
        self.check_online("get", key)?;
        let map = self.lock();
        let o = map
            .get(key)
            .ok_or_else(|| StoreError::NotFound { key: key.into() })?;
        Ok(GetResult {
            body: o.body.clone(),
            etag: o.etag.clone(),
        })
    }

    fn put_now(&self, key: &str, body: Bytes, mode: PutMode) -> Result<String> {
        self.check_online("put", key)?;
        let mut map = self.lock();
        let allowed = match (&mode, map.get(key)) {
            (PutMode::Overwrite, _) => true,
            (PutMode::CreateOnly, existing) => existing.is_none(),
            (PutMode::IfMatch(want), Some(o)) => o.etag == *want,
            (PutMode::IfMatch(_), None) => false,
        };
        if !allowed {
            return Err(StoreError::PreconditionFailed { key: key.into() });
        }
        let n = self.next_etag.fetch_add(1, Ordering::SeqCst) + 1;
        let etag = format!("\"mem-{n:016x}\"");
        map.insert(
            key.to_string(),
            Object {
                body,
                etag: etag.clone(),
                modified: Utc::now(),
            },
        );
        Ok(etag)
    }

    fn meta(key: &str, o: &Object) -> ObjectMeta {
        ObjectMeta {
            key: key.to_string(),
            size: o.body.len() as u64,
            etag: o.etag.clone(),
            last_modified: Some(o.modified),
        }
    }
}

impl ObjectStore for MemoryStore {
    fn describe(&self) -> String {
        "memory store".into()
    }

    fn check_bucket<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move { self.check_online("check bucket", prefix) })
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
            let r = self.get_now(key)?;
            Ok((r.etag != etag).then_some(r))
        })
    }

    fn get_range<'a>(&'a self, key: &'a str, start: u64, len: u64) -> BoxFuture<'a, Result<Bytes>> {
        Box::pin(async move {
            let body = self.get_now(key)?.body;
            if len == 0 {
                return Ok(Bytes::new());
            }
            let size = body.len() as u64;
            if start >= size {
                return Err(StoreError::InvalidRange {
                    key: key.into(),
                    start,
                    len,
                });
            }
            let end = start.saturating_add(len).min(size);
            Ok(body.slice(start as usize..end as usize))
        })
    }

    fn head<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<ObjectMeta>> {
        Box::pin(async move {
            self.check_online("head", key)?;
            let map = self.lock();
            map.get(key)
                .map(|o| Self::meta(key, o))
                .ok_or_else(|| StoreError::NotFound { key: key.into() })
        })
    }

    fn put<'a>(
        &'a self,
        key: &'a str,
        body: Bytes,
        mode: PutMode,
    ) -> BoxFuture<'a, Result<String>> {
        Box::pin(async move { self.put_now(key, body, mode) })
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<ObjectMeta>>> {
        Box::pin(async move {
            self.check_online("list", prefix)?;
            let map = self.lock();
            Ok(map
                .range(prefix.to_string()..)
                .take_while(|(k, _)| k.starts_with(prefix))
                .map(|(k, o)| Self::meta(k, o))
                .collect())
        })
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.check_online("delete", key)?;
            self.lock().remove(key);
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn conditional_puts_follow_the_s3_contract() {
        let s = MemoryStore::new();
        let e1 = s
            .put("k", Bytes::from_static(b"1"), PutMode::CreateOnly)
            .await
            .unwrap();
        let again = s
            .put("k", Bytes::from_static(b"2"), PutMode::CreateOnly)
            .await;
        assert!(matches!(again, Err(StoreError::PreconditionFailed { .. })));
        let e2 = s
            .put("k", Bytes::from_static(b"2"), PutMode::IfMatch(e1.clone()))
            .await
            .unwrap();
        let stale = s
            .put("k", Bytes::from_static(b"3"), PutMode::IfMatch(e1))
            .await;
        assert!(matches!(stale, Err(StoreError::PreconditionFailed { .. })));
        let missing = s
            .put("nope", Bytes::new(), PutMode::IfMatch(e2.clone()))
            .await;
        assert!(matches!(
            missing,
            Err(StoreError::PreconditionFailed { .. })
        ));
        assert_eq!(s.get_if_none_match("k", &e2).await.unwrap(), None);
        assert_eq!(s.get("k").await.unwrap().body, Bytes::from_static(b"2"));
    }

    #[tokio::test]
    async fn ranges_lists_and_outages() {
        let s = MemoryStore::new();
        s.put("p/a", Bytes::from_static(b"hello"), PutMode::Overwrite)
            .await
            .unwrap();
        s.put("p/b", Bytes::new(), PutMode::Overwrite)
            .await
            .unwrap();
        s.put("q", Bytes::new(), PutMode::Overwrite).await.unwrap();
        assert_eq!(
            s.get_range("p/a", 1, 3).await.unwrap(),
            Bytes::from_static(b"ell")
        );
        assert_eq!(
            s.get_range("p/a", 3, 10).await.unwrap(),
            Bytes::from_static(b"lo")
        );
        assert!(matches!(
            s.get_range("p/a", 5, 1).await,
            Err(StoreError::InvalidRange { .. })
        ));
        let keys: Vec<_> = s
            .list("p/")
            .await
            .unwrap()
            .into_iter()
            .map(|m| m.key)
            .collect();
        assert_eq!(keys, ["p/a", "p/b"]);
        s.set_offline(true);
        let e = s.get("p/a").await.unwrap_err();
        assert!(e.is_transient(), "{e}");
        s.set_offline(false);
        s.delete("p/a").await.unwrap();
        s.delete("p/a").await.unwrap();
        assert!(matches!(
            s.head("p/a").await,
            Err(StoreError::NotFound { .. })
        ));
    }
}
