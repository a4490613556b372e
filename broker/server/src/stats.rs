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

/// Why a connection was refused (the `reason` label of
/// `cirrus_connections_refused_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    BadCredentials,
    NotAuthorized,
    /// The store is unavailable (Redis down).
    Unavailable,
    /// Too many failed logins from the address.
    Banned,
    /// The connection limit or the connection rate limit.
    ConnectionLimit,
    /// TLS handshake failed or timed out.
    Tls,
    /// Anything else the CONNACK refused (client id, protocol, will).
    Protocol,
}

impl Refused {
    pub const ALL: [Refused; 7] = [
        Refused::BadCredentials,
        Refused::NotAuthorized,
        Refused::Unavailable,
        Refused::Banned,
        Refused::ConnectionLimit,
        Refused::Tls,
        Refused::Protocol,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Refused::BadCredentials => "bad_credentials",
            Refused::NotAuthorized => "not_authorized",
            Refused::Unavailable => "server_unavailable",
            Refused::Banned => "banned",
            Refused::ConnectionLimit => "connection_limit",
            Refused::Tls => "tls",
            Refused::Protocol => "protocol",
        }
    }

    /// The class of a refused CONNACK's reason code (5.0 or 3.1.1).
    pub fn from_connack(code: u8, v5: bool) -> Refused {
        use cirrus_codec::reason;
        match (v5, code) {
            (true, reason::BAD_USER_NAME_OR_PASSWORD) | (false, 0x04) => Refused::BadCredentials,
            (true, reason::NOT_AUTHORIZED) | (false, 0x05) => Refused::NotAuthorized,
            (true, reason::SERVER_UNAVAILABLE) | (false, 0x03) => Refused::Unavailable,
            (true, reason::CONNECTION_RATE_EXCEEDED) => Refused::Banned,
            _ => Refused::Protocol,
        }
    }
}

pub use cirrus_admin::Histogram;

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
    /// Publishes refused by the ACL (dropped messages, reason `acl`).
    pub acl_denied_publish: AtomicU64,
    /// QoS 1/2 publishes answered with an error because the store did not
    /// take them (Redis unreachable, out of memory, read-only).
    pub publish_store_failed: AtomicU64,
    pub subscriptions: AtomicUsize,
    /// Refused connections by [`Refused`] (index = position in `ALL`).
    pub refused: [AtomicU64; 7],
    /// PUBLISH packets and payload bytes by QoS (index = QoS).
    pub publish_received_qos: [AtomicU64; 3],
    pub publish_sent_qos: [AtomicU64; 3],
    pub payload_bytes_received_qos: [AtomicU64; 3],
    pub payload_bytes_sent_qos: [AtomicU64; 3],
    /// Logins refused for bad credentials.
    pub auth_failures: AtomicU64,
    /// Clients sent to another pod by a paced drain.
    pub drained: AtomicU64,
    /// Clients sent to another pod because this one held more than its share.
    pub rebalanced: AtomicU64,
    /// From the broker receiving a message to writing it to a subscriber.
    pub delivery_latency: Histogram,
    /// Second (since start) each drop reason was last logged.
    drop_logged: [AtomicU64; 4],
}

fn uptime_secs() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_secs()
}

/// Seconds between two log lines about the same class of dropped messages,
/// so that a flood cannot flood the log.
const DROP_LOG_EVERY: u64 = 10;

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

    pub fn refused(&self, why: Refused) {
        Stats::inc(&self.connections_refused);
        if let Some(i) = Refused::ALL.iter().position(|r| *r == why) {
            Stats::inc(&self.refused[i]);
        }
    }

    pub fn dropped(&self, why: DropReason) {
        let (counter, slot, label) = match why {
            DropReason::QueueFull => (&self.dropped_queue_full, 0, "queue_full"),
            DropReason::Expired => (&self.dropped_expired, 1, "expired"),
            DropReason::TooLarge => (&self.dropped_too_large, 2, "too_large"),
            DropReason::Offline => (&self.dropped_offline, 3, "offline"),
        };
        Stats::inc(counter);
        let now = uptime_secs() + DROP_LOG_EVERY;
        let last = self.drop_logged[slot].load(Ordering::Relaxed);
        if now >= last + DROP_LOG_EVERY
            && self.drop_logged[slot]
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                reason = label,
                total = Stats::get(counter),
                "messages dropped (logged at most every {DROP_LOG_EVERY} s)"
            );
        }
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
