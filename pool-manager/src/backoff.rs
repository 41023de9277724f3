//! Exponential back-off for background work that fails (warm-pool refills, periodic
//! snapshots): the first retry after `base`, each next one twice as late, never later
//! than `cap`. A success starts over. Failing work that retried at a fixed rate filled
//! the log (a refill failed ten times a second, forever) and burnt a core.

use std::time::{Duration, Instant};

/// One piece of work's failures in a row and when it may run again.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    failures: u32,
    not_before: Option<Instant>,
}

impl Backoff {
    /// No failures yet.
    pub const fn new(base: Duration, cap: Duration) -> Self {
        Self {
            base,
            cap,
            failures: 0,
            not_before: None,
        }
    }

    /// Records a failure at `now`; returns how long until the next attempt.
    pub fn failed(&mut self, now: Instant) -> Duration {
        self.failures = self.failures.saturating_add(1);
        let doublings = (self.failures - 1).min(30);
        let delay = self
            .base
            .checked_mul(1u32 << doublings)
            .unwrap_or(self.cap)
            .min(self.cap);
        self.not_before = Some(now + delay);
        delay
    }

    /// Records a success: the next failure waits `base` again.
    pub fn succeeded(&mut self) {
        self.failures = 0;
        self.not_before = None;
    }

    /// Whether the work may run at `now`.
    pub fn ready(&self, now: Instant) -> bool {
        self.not_before.is_none_or(|t| now >= t)
    }

    /// How long from `now` until the work may run again (zero when it may now).
    pub fn not_before(&self, now: Instant) -> Duration {
        self.not_before
            .map_or(Duration::ZERO, |t| t.saturating_duration_since(now))
    }

    /// Failures in a row.
    pub fn failures(&self) -> u32 {
        self.failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_cap_and_a_success_starts_over() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(10));
        let now = Instant::now();
        assert!(b.ready(now));
        let delays: Vec<u64> = (0..6).map(|_| b.failed(now).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 10, 10]);
        assert_eq!(b.failures(), 6);
        assert!(!b.ready(now + Duration::from_secs(9)));
        assert!(b.ready(now + Duration::from_secs(10)));
        b.succeeded();
        assert!(b.ready(now));
        assert_eq!(b.failed(now), Duration::from_secs(1));
    }

    #[test]
    fn many_failures_never_overflow() {
        let mut b = Backoff::new(Duration::from_secs(3600), Duration::from_secs(7200));
        let now = Instant::now();
        for _ in 0..100 {
            assert!(b.failed(now) <= Duration::from_secs(7200));
        }
    }
}
