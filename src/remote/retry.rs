//! Bounded retries with exponential backoff and jitter, for transient failures
//! only. The store owns the one retry loop: the SDK's own retries are switched
//! off, so the two never multiply, and callers get a final answer in bounded time
//! (a secondary's poll loop or `doctor` must not hang on a dead endpoint).

use std::time::{Duration, Instant};

use rand::Rng;

/// How hard the store tries before reporting [`super::StoreError::Unreachable`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in total, the first included; 1 means no retry.
    pub max_attempts: u32,
    /// Backoff before the second attempt; doubled for each further one.
    pub base_delay: Duration,
    /// Cap on a single backoff.
    pub max_delay: Duration,
    /// No new attempt starts once this much time has passed since the first began
    /// (an attempt already running is bounded by the store's own timeouts).
    pub max_elapsed: Duration,
}

impl Default for RetryPolicy {
    /// For the daemon: rides out a restart of the S3 server or a burst of
    /// throttling, then hands the failure to the caller's own backlog logic.
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 6,
            base_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(5),
            max_elapsed: Duration::from_secs(30),
        }
    }
}

impl RetryPolicy {
    /// For commands a person waits on (`doctor`, `status`): a few quick tries.
    pub fn interactive() -> Self {
        RetryPolicy {
            max_attempts: 3,
            base_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(1),
            max_elapsed: Duration::from_secs(5),
        }
    }

    /// One attempt, no retry.
    pub fn none() -> Self {
        RetryPolicy {
            max_attempts: 1,
            ..RetryPolicy::interactive()
        }
    }

    /// The backoff after `failures` failed attempts (1-based): "equal jitter",
    /// half of the exponential step fixed and half random, so that nodes that
    /// failed together do not retry in lockstep.
    pub fn backoff(&self, failures: u32) -> Duration {
        let step = self
            .base_delay
            .saturating_mul(1u32 << failures.saturating_sub(1).min(20))
            .min(self.max_delay);
        let half = step / 2;
        let jitter_ns =
            rand::thread_rng().gen_range(0..=half.as_nanos().min(u64::MAX as u128) as u64);
        half + Duration::from_nanos(jitter_ns)
    }
}

/// The state of one retried operation.
pub(crate) struct Retrier<'p> {
    policy: &'p RetryPolicy,
    start: Instant,
    failures: u32,
}

impl<'p> Retrier<'p> {
    pub(crate) fn new(policy: &'p RetryPolicy) -> Self {
        Retrier {
            policy,
            start: Instant::now(),
            failures: 0,
        }
    }

    /// Records a transient failure; sleeps and returns `true` if the policy allows
    /// another attempt, returns `false` at once if not.
    pub(crate) async fn backoff(&mut self) -> bool {
        self.failures += 1;
        if self.failures >= self.policy.max_attempts.max(1) {
            return false;
        }
        let delay = self.policy.backoff(self.failures);
        if self.start.elapsed() + delay > self.policy.max_elapsed {
            return false;
        }
        tokio::time::sleep(delay).await;
        true
    }

    pub(crate) fn attempts(&self) -> u32 {
        self.failures
    }

    pub(crate) fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_is_capped_and_jittered_within_bounds() {
        let p = RetryPolicy {
            max_attempts: 10,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(800),
            max_elapsed: Duration::from_secs(60),
        };
        for (failures, step_ms) in [(1, 100), (2, 200), (3, 400), (4, 800), (5, 800), (40, 800)] {
            for _ in 0..50 {
                let d = p.backoff(failures);
                let step = Duration::from_millis(step_ms);
                assert!(d >= step / 2 && d <= step, "{failures}: {d:?}");
            }
        }
    }

    #[tokio::test]
    async fn retrier_stops_at_max_attempts() {
        let p = RetryPolicy {
            max_attempts: 3,
            base_delay: Duration::from_millis(1),
            ..RetryPolicy::default()
        };
        let mut r = Retrier::new(&p);
        assert!(r.backoff().await);
        assert!(r.backoff().await);
        assert!(!r.backoff().await);
        assert_eq!(r.attempts(), 3);
        let none = RetryPolicy::none();
        let mut r = Retrier::new(&none);
        assert!(!r.backoff().await);
    }

    #[tokio::test]
    async fn retrier_stops_at_max_elapsed() {
        let p = RetryPolicy {
            max_attempts: 100,
            base_delay: Duration::from_millis(20),
            max_delay: Duration::from_millis(20),
            max_elapsed: Duration::from_millis(100),
        };
        let mut r = Retrier::new(&p);
        let mut n = 0;
        while r.backoff().await {
            n += 1;
        }
        // Each backoff is 10..=20 ms, so 100 ms allows between 4 and 9 of them.
        assert!((4..=9).contains(&n), "{n}");
        assert!(r.elapsed() < Duration::from_millis(150));
    }
}
