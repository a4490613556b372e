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
