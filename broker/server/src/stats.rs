//! Counters of what the broker did. Plain relaxed atomics: they are written
//! on the publish path by every connection, so they must not be a lock.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Why a message was not delivered to a subscriber.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// The session's queue was full.
    QueueFull,
    /// The message expired before it could be sent.
    Expired,
    /// Larger than the subscriber's Maximum Packet Size.
    TooLarge,
    /// QoS 0 to an offline session.
    Offline,
}

#[derive(Debug, Default)]
pub struct Stats {
    pub connections_current: AtomicUsize,
    pub connections_total: AtomicU64,
    pub connections_refused: AtomicU64,
    pub messages_received: AtomicU64,
    pub messages_sent: AtomicU64,
    pub bytes_received: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub publish_received: AtomicU64,
    pub publish_sent: AtomicU64,
    pub dropped_queue_full: AtomicU64,
    pub dropped_expired: AtomicU64,
    pub dropped_too_large: AtomicU64,
    pub dropped_offline: AtomicU64,
    pub decode_errors: AtomicU64,
    /// Publishes and subscriptions refused by the ACL.
    pub acl_denied: AtomicU64,
    pub subscriptions: AtomicUsize,
}

impl Stats {
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    pub fn dropped(&self, why: DropReason) {
        Stats::inc(match why {
            DropReason::QueueFull => &self.dropped_queue_full,
            DropReason::Expired => &self.dropped_expired,
            DropReason::TooLarge => &self.dropped_too_large,
            DropReason::Offline => &self.dropped_offline,
        });
    }

    pub fn dropped_total(&self) -> u64 {
        Stats::get(&self.dropped_queue_full)
            + Stats::get(&self.dropped_expired)
            + Stats::get(&self.dropped_too_large)
            + Stats::get(&self.dropped_offline)
    }
}

/// A token bucket: `rate` tokens a second, bursts up to one second's worth.
#[derive(Debug)]
pub struct RateLimit {
    rate: f64,
    tokens: f64,
    last: std::time::Instant,
}

impl RateLimit {
    /// `None` for a rate of 0 (no limit).
    pub fn new(per_second: u32) -> Option<RateLimit> {
        (per_second > 0).then(|| RateLimit {
            rate: f64::from(per_second),
            tokens: f64::from(per_second),
            last: std::time::Instant::now(),
        })
    }

    fn refill(&mut self, now: std::time::Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + dt * self.rate).min(self.rate);
        self.last = now;
    }

    /// Take a token if there is one.
    pub fn try_take(&mut self, now: std::time::Instant) -> bool {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Take a token now, going into debt; returns how long until the debt is paid.
    pub fn take_or_wait(&mut self, now: std::time::Instant) -> std::time::Duration {
        self.refill(now);
        self.tokens -= 1.0;
        if self.tokens >= 0.0 {
            std::time::Duration::ZERO
        } else {
            std::time::Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn bucket() {
        let t = Instant::now();
        let mut r = RateLimit::new(10).unwrap();
        for _ in 0..10 {
            assert!(r.try_take(t));
        }
        assert!(!r.try_take(t));
        assert!(r.try_take(t + Duration::from_millis(150)));
        let wait = r.take_or_wait(t + Duration::from_millis(150));
        assert!(
            wait >= Duration::from_millis(45) && wait <= Duration::from_millis(55),
            "{wait:?}"
        );
        assert!(RateLimit::new(0).is_none());
    }
}
