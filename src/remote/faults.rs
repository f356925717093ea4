//! [`FaultyStore`]: wraps any [`ObjectStore`] and makes chosen calls fail, hang,
//! lose their answer after the write happened, or run a test's code first (a
//! concurrent writer slipping in between a read and a compare-and-swap). For the
//! faults a real server cannot be made to produce on cue.
//!
//! Faults are [`Rule`]s, scripted from the test: an operation (or any), a glob
//! over the key (`*` also matches `/`), what happens, and how many matching
//! calls to let through first and to fault. The first rule that matches a call
//! and still has faults left decides; calls no rule takes reach the inner store
//! unchanged.
//!
//! ```ignore
//! let store = FaultyStore::new(Arc::new(MemStore::new("b")));
//! // The manifest's next compare-and-swap is applied, but its answer is lost.
//! let lost = store.inject(Rule::new(Op::Put, "*/manifest.json", Fault::LostResponse).times(1));
//! ...
//! assert_eq!(lost.fired(), 1);
//! ```

use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::{BoxFuture, GetResult, ObjectMeta, ObjectStore, PutMode, Result, StoreError};

/// The operations of [`ObjectStore`], to aim a rule at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    CheckBucket,
    Get,
    GetIfNoneMatch,
    GetRange,
    Head,
    Put,
    /// A put streamed from a file ([`ObjectStore::put_file`]).
    PutFile,
    /// A get streamed to a file ([`ObjectStore::get_to_file`]).
    GetToFile,
    List,
    Delete,
}

impl Op {
    /// A rule for puts (gets) also takes the streamed ones, so the faults
    /// scripted for an object hold however its bytes travel; a rule for
    /// [`Op::PutFile`] ([`Op::GetToFile`]) takes only those.
    fn covers(self, call: Op) -> bool {
        self == call
            || matches!(
                (self, call),
                (Op::Put, Op::PutFile) | (Op::Get, Op::GetToFile)
            )
    }

    fn name(self) -> &'static str {
        match self {
            Op::CheckBucket => "check bucket",
            Op::Get => "get",
            Op::GetIfNoneMatch => "get",
            Op::GetRange => "get range",
            Op::Head => "head",
            Op::Put | Op::PutFile => "put",
            Op::GetToFile => "get",
            Op::List => "list",
            Op::Delete => "delete",
        }
    }
}

/// Code a test runs in place of a faulted call's start (see [`Fault::Before`]);
/// it gets the call's key.
pub type Hook = Arc<dyn Fn(String) -> BoxFuture<'static, ()> + Send + Sync>;

/// What happens to a call a rule takes.
#[derive(Clone)]
pub enum Fault {
    /// Fails with this error; the store never sees the call.
    Error(StoreError),
    /// Waits this long, then fails as unreachable (a request that timed out);
    /// the store never sees the call.
    Hang(Duration),
    /// Waits this long, then makes the call.
    Delay(Duration),
    /// Makes the call (a put is stored), then loses the answer: the caller
    /// gets [`StoreError::Unreachable`] whatever the store said.
    LostResponse,
    /// Runs the hook to completion, then makes the call.
    Before(Hook),
}

impl Fault {
    /// The bucket cannot be reached.
    pub fn unreachable() -> Fault {
        Fault::Hang(Duration::ZERO)
    }

    /// Runs `f` (given the key) before the call.
    pub fn before<F, Fut>(f: F) -> Fault
    where
        F: Fn(String) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        Fault::Before(Arc::new(move |key| Box::pin(f(key))))
    }
}

impl std::fmt::Debug for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fault::Error(e) => write!(f, "Error({e})"),
            Fault::Hang(d) => write!(f, "Hang({d:?})"),
            Fault::Delay(d) => write!(f, "Delay({d:?})"),
            Fault::LostResponse => write!(f, "LostResponse"),
            Fault::Before(_) => write!(f, "Before(..)"),
        }
    }
}

/// Which calls a fault applies to, and how often.
#[derive(Debug, Clone)]
pub struct Rule {
    op: Option<Op>,
    pattern: glob::Pattern,
    fault: Fault,
    skip: u32,
    times: Option<u32>,
}

impl Rule {
    /// Every call of `op` on a key matching the glob `pattern`, until removed.
    /// Panics on a malformed pattern (a test's typo).
    pub fn new(op: Op, pattern: &str, fault: Fault) -> Rule {
        Rule {
            op: Some(op),
            ..Rule::any(pattern, fault)
        }
    }

    /// Every operation on a key (or listing prefix) matching `pattern`.
    pub fn any(pattern: &str, fault: Fault) -> Rule {
        Rule {
            op: None,
            pattern: glob::Pattern::new(pattern)
                .unwrap_or_else(|e| panic!("fault rule pattern {pattern:?}: {e}")),
            fault,
            skip: 0,
            times: None,
        }
    }

    /// Let the first `n` matching calls through untouched.
    pub fn skip(mut self, n: u32) -> Rule {
        self.skip = n;
        self
    }

    /// Fault at most `n` calls, then let every call through.
    pub fn times(mut self, n: u32) -> Rule {
        self.times = Some(n);
        self
    }

    fn matches(&self, op: Op, key: &str) -> bool {
        self.op.is_none_or(|o| o.covers(op)) && self.pattern.matches(key)
    }
}

/// Counts the calls a rule faulted.
#[derive(Debug, Clone)]
pub struct RuleHandle {
    fired: Arc<AtomicU32>,
}

impl RuleHandle {
    pub fn fired(&self) -> u32 {
        self.fired.load(Ordering::SeqCst)
    }
}

struct Slot {
    rule: Rule,
    seen: u32,
    fired: Arc<AtomicU32>,
}

/// An [`ObjectStore`] that passes every call to `inner` unless a rule takes it.
pub struct FaultyStore {
    inner: Arc<dyn ObjectStore>,
    rules: Mutex<Vec<Slot>>,
}

impl FaultyStore {
    pub fn new(inner: Arc<dyn ObjectStore>) -> FaultyStore {
        FaultyStore {
            inner,
            rules: Mutex::new(Vec::new()),
        }
    }

    /// The wrapped store (to act as another client, behind the faults' back).
    pub fn inner(&self) -> &Arc<dyn ObjectStore> {
        &self.inner
    }

    pub fn inject(&self, rule: Rule) -> RuleHandle {
        let fired = Arc::new(AtomicU32::new(0));
        self.rules.lock().unwrap().push(Slot {
            rule,
            seen: 0,
            fired: fired.clone(),
        });
        RuleHandle { fired }
    }

    /// Removes every rule: all calls go through from now on.
    pub fn clear(&self) {
        self.rules.lock().unwrap().clear();
    }

    /// The fault for this call, if a rule takes it (and counts it).
    fn pick(&self, op: Op, key: &str) -> Option<Fault> {
        let mut rules = self.rules.lock().unwrap();
        for slot in rules.iter_mut().filter(|s| s.rule.matches(op, key)) {
            slot.seen += 1;
            let fired = slot.fired.load(Ordering::SeqCst);
            if slot.seen > slot.rule.skip && slot.rule.times.is_none_or(|t| fired < t) {
                slot.fired.fetch_add(1, Ordering::SeqCst);
                return Some(slot.rule.fault.clone());
            }
        }
        None
    }

    fn unreachable(&self, op: Op, key: &str, start: Instant, detail: &str) -> StoreError {
        StoreError::Unreachable {
            endpoint: self.inner.describe(),
            op: op.name(),
            key: key.to_string(),
            attempts: 1,
            elapsed_ms: start.elapsed().as_millis() as u64,
            detail: format!("injected fault: {detail}"),
        }
    }

    /// Runs `call` under whatever fault a rule has for it.
    async fn run<'a, T>(
        &'a self,
        op: Op,
        key: &'a str,
        call: impl FnOnce() -> BoxFuture<'a, Result<T>>,
    ) -> Result<T> {
        let start = Instant::now();
        match self.pick(op, key) {
            None => call().await,
            Some(Fault::Error(e)) => Err(e),
            Some(Fault::Hang(d)) => {
                tokio::time::sleep(d).await;
                Err(self.unreachable(op, key, start, "no answer"))
            }
            Some(Fault::Delay(d)) => {
                tokio::time::sleep(d).await;
                call().await
            }
            Some(Fault::LostResponse) => {
                let _ = call().await;
                Err(self.unreachable(op, key, start, "the answer was lost"))
            }
            Some(Fault::Before(hook)) => {
                hook(key.to_string()).await;
                call().await
            }
        }
    }
}

impl ObjectStore for FaultyStore {
    fn describe(&self) -> String {
        format!("{} (with injected faults)", self.inner.describe())
    }

    fn check_bucket<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(self.run(Op::CheckBucket, prefix, || self.inner.check_bucket(prefix)))
    }

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<GetResult>> {
        Box::pin(self.run(Op::Get, key, || self.inner.get(key)))
    }

    fn get_if_none_match<'a>(
        &'a self,
        key: &'a str,
        etag: &'a str,
    ) -> BoxFuture<'a, Result<Option<GetResult>>> {
        Box::pin(self.run(Op::GetIfNoneMatch, key, || {
            self.inner.get_if_none_match(key, etag)
        }))
    }

    fn get_range<'a>(&'a self, key: &'a str, start: u64, len: u64) -> BoxFuture<'a, Result<Bytes>> {
        Box::pin(self.run(Op::GetRange, key, move || {
            self.inner.get_range(key, start, len)
        }))
    }

    fn head<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<ObjectMeta>> {
        Box::pin(self.run(Op::Head, key, || self.inner.head(key)))
    }

    fn put<'a>(
        &'a self,
        key: &'a str,
        body: Bytes,
        mode: PutMode,
    ) -> BoxFuture<'a, Result<String>> {
        Box::pin(self.run(Op::Put, key, move || self.inner.put(key, body, mode)))
    }

    fn put_file<'a>(
        &'a self,
        key: &'a str,
        path: &'a Path,
        mode: PutMode,
    ) -> BoxFuture<'a, Result<String>> {
        Box::pin(self.run(Op::PutFile, key, move || {
            self.inner.put_file(key, path, mode)
        }))
    }

    fn get_to_file<'a>(
        &'a self,
        key: &'a str,
        path: &'a Path,
    ) -> BoxFuture<'a, Result<ObjectMeta>> {
        Box::pin(self.run(Op::GetToFile, key, || self.inner.get_to_file(key, path)))
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<ObjectMeta>>> {
        Box::pin(self.run(Op::List, prefix, || self.inner.list(prefix)))
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(self.run(Op::Delete, key, || self.inner.delete(key)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::remote::MemStore;

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    fn faulty() -> (Arc<MemStore>, FaultyStore) {
        let mem = Arc::new(MemStore::new("t"));
        (mem.clone(), FaultyStore::new(mem))
    }

    #[tokio::test]
    async fn errors_are_per_operation_and_key_and_counted() {
        let (mem, s) = faulty();
        let denied = StoreError::AccessDenied {
            op: "put",
            key: "x".into(),
            code: "AccessDenied".into(),
            message: "no".into(),
        };
        let h = s.inject(Rule::new(Op::Put, "seg/*", Fault::Error(denied.clone())).times(2));
        assert_eq!(
            s.put("seg/1", b("a"), PutMode::Overwrite).await,
            Err(denied.clone())
        );
        // Another key, another operation: untouched.
        s.put("manifest.json", b("m"), PutMode::Overwrite)
            .await
            .unwrap();
        assert!(matches!(
            s.get("seg/1").await,
            Err(StoreError::NotFound { .. })
        ));
        assert_eq!(
            s.put("seg/2", b("a"), PutMode::Overwrite).await,
            Err(denied)
        );
        // Exhausted after two.
        s.put("seg/3", b("a"), PutMode::Overwrite).await.unwrap();
        assert_eq!(h.fired(), 2);
        assert_eq!(mem.keys(), ["manifest.json", "seg/3"]);
    }

    #[tokio::test]
    async fn skip_lets_the_first_calls_through() {
        let (_, s) = faulty();
        let h = s.inject(Rule::any("*", Fault::unreachable()).skip(2).times(1));
        s.put("a", b("1"), PutMode::Overwrite).await.unwrap();
        s.get("a").await.unwrap();
        let e = s.get("a").await.unwrap_err();
        assert!(e.is_transient(), "{e:?}");
        s.get("a").await.unwrap();
        assert_eq!(h.fired(), 1);
    }

    #[tokio::test]
    async fn a_lost_response_still_writes() {
        let (mem, s) = faulty();
        s.inject(Rule::new(Op::Put, "*manifest.json", Fault::LostResponse).times(1));
        let e = s
            .put("p/manifest.json", b("v1"), PutMode::CreateOnly)
            .await
            .unwrap_err();
        assert!(e.is_transient(), "{e:?}");
        assert_eq!(mem.body("p/manifest.json"), Some(b("v1")));
        // The retry of the same create finds its own write.
        assert!(matches!(
            s.put("p/manifest.json", b("v1"), PutMode::CreateOnly).await,
            Err(StoreError::PreconditionFailed { .. })
        ));
    }

    #[tokio::test]
    async fn hangs_and_delays_are_bounded() {
        let (mem, s) = faulty();
        let ms = Duration::from_millis;
        s.inject(Rule::new(Op::Get, "slow", Fault::Delay(ms(100))).times(1));
        s.inject(Rule::new(Op::Get, "dead", Fault::Hang(ms(200))).times(1));
        mem.put("slow", b("s"), PutMode::Overwrite).await.unwrap();
        mem.put("dead", b("d"), PutMode::Overwrite).await.unwrap();
        let t = Instant::now();
        assert_eq!(s.get("slow").await.unwrap().body, b("s"));
        assert!(t.elapsed() >= ms(100), "{:?}", t.elapsed());
        let t = Instant::now();
        let e = s.get("dead").await.unwrap_err();
        assert!(e.is_transient(), "{e:?}");
        assert!(
            (ms(200)..ms(2000)).contains(&t.elapsed()),
            "{:?}",
            t.elapsed()
        );
        // Once used up, both answer at once.
        let t = Instant::now();
        s.get("dead").await.unwrap();
        assert!(t.elapsed() < ms(100));
    }

    /// A concurrent writer slips in between a read and a compare-and-swap.
    #[tokio::test]
    async fn a_hook_runs_before_the_call() {
        let (mem, s) = faulty();
        let e1 = s.put("m", b("v1"), PutMode::CreateOnly).await.unwrap();
        let other = mem.clone();
        s.inject(
            Rule::new(
                Op::Put,
                "m",
                Fault::before(move |key| {
                    let other = other.clone();
                    async move {
                        let cur = other.get(&key).await.unwrap().etag;
                        other
                            .put(&key, b("theirs"), PutMode::IfMatch(cur))
                            .await
                            .unwrap();
                    }
                }),
            )
            .times(1),
        );
        let mine = s.put("m", b("mine"), PutMode::IfMatch(e1)).await;
        assert!(
            matches!(mine, Err(StoreError::PreconditionFailed { .. })),
            "{mine:?}"
        );
        assert_eq!(mem.body("m"), Some(b("theirs")));
        s.clear();
        let cur = s.get("m").await.unwrap().etag;
        s.put("m", b("mine"), PutMode::IfMatch(cur)).await.unwrap();
    }
}
