//! Sessions: what outlives a network connection (subscriptions, queued and
//! in-flight messages, pending will, expiry).
//!
//! A session's state sits behind its own mutex, taken briefly by publishers
//! that enqueue to it and by the one connection that serves it; there is no
//! lock shared by all sessions on the publish path.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use cirrus_codec::{ByteString, LastWill, PacketId, Protocol, QoS, SubscriptionOptions};
use futures_util::task::AtomicWaker;
use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::message::Delivery;
use crate::stats::{DropReason, Stats};

/// A subscription as the session remembers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubscriptionEntry {
    pub options: SubscriptionOptions,
    pub sub_id: Option<u32>,
}

/// Where an outgoing QoS 1/2 message stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutState {
    /// QoS 1 sent, waiting for PUBACK.
    AwaitAck,
    /// QoS 2 sent, waiting for PUBREC.
    AwaitRec,
    /// PUBREL sent, waiting for PUBCOMP (the message itself is delivered).
    AwaitComp,
}

#[derive(Debug, Clone)]
pub struct Inflight {
    pub packet_id: PacketId,
    pub state: OutState,
    pub delivery: Delivery,
}

/// The connection currently attached to a session.
#[derive(Debug)]
pub struct Attachment {
    /// Increases with every connection; a connection whose epoch is no
    /// longer current has been taken over and must not touch the session.
    pub epoch: u64,
    /// How the connection is woken (messages queued) or sent away.
    pub signal: Arc<Signal>,
    /// When it attached (a rebalance moves only clients settled here).
    pub since: std::time::Instant,
}

/// What a connection's task is told from outside. One small allocation per
/// connection, polled by the task without a stored future (an idle
/// connection's memory is mostly what its task keeps while it waits).
#[derive(Debug, Default)]
pub struct Signal {
    flags: AtomicU8,
    waker: AtomicWaker,
}

/// What [`Signal::poll`] reports, most urgent first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rung {
    /// Another connection took the session over, or the session ended.
    Kicked,
    /// The broker is shutting down.
    Shutdown,
    /// The pod is draining: the client is sent to another pod.
    Moved,
    /// A new auth policy was installed.
    AuthChanged,
    /// Messages were queued for the session.
    Wake,
}

impl Signal {
    const KICK: u8 = 1;
    const SHUTDOWN: u8 = 2;
    const AUTH: u8 = 4;
    const WAKE: u8 = 8;
    const MOVE: u8 = 32;
    /// The connection is parked on the waker. Only then does a ring wake
    /// it: a running connection looks at the flags before it parks, so
    /// publishers do not make busy connections poll again for nothing.
    const PARKED: u8 = 16;

    fn ring(&self, flag: u8) {
        // One atomic orders ring and park: either the parking connection
        // sees this flag, or this sees it parked and wakes it.
        if self.flags.fetch_or(flag, Ordering::AcqRel) & Self::PARKED != 0 {
            self.waker.wake();
        }
    }

    pub fn wake(&self) {
        self.ring(Self::WAKE);
    }

    /// Make the connection leave; it stays kicked.
    pub fn kick(&self) {
        self.ring(Self::KICK);
    }

    pub fn shutdown(&self) {
        self.ring(Self::SHUTDOWN);
    }

    /// Send the client to another pod (a paced drain).
    pub fn move_away(&self) {
        self.ring(Self::MOVE);
    }

    pub fn auth_changed(&self) {
        self.ring(Self::AUTH);
    }

    fn leaving(f: u8) -> Option<Rung> {
        if f & Self::KICK != 0 {
            Some(Rung::Kicked)
        } else if f & Self::MOVE != 0 {
            // Sent away by the drain, even if the shutdown that follows
            // rang before this connection looked.
            Some(Rung::Moved)
        } else if f & Self::SHUTDOWN != 0 {
            Some(Rung::Shutdown)
        } else {
            None
        }
    }

    /// The connection is running: rings need not wake it. Says whether it
    /// must leave.
    pub fn resume(&self) -> Option<Rung> {
        Self::leaving(self.flags.fetch_and(!Self::PARKED, Ordering::AcqRel))
    }

    /// Take a wake or an auth change if it was rung.
    pub fn take(&self, rung: Rung) -> bool {
        let flag = match rung {
            Rung::Wake => Self::WAKE,
            Rung::AuthChanged => Self::AUTH,
            Rung::Kicked | Rung::Shutdown | Rung::Moved => return false,
        };
        self.flags.load(Ordering::Acquire) & flag != 0
            && self.flags.fetch_and(!flag, Ordering::AcqRel) & flag != 0
    }

    /// Park the task on the waker: true if it may sleep, false if something
    /// was rung meanwhile (look again).
    pub fn park(&self, cx: &mut Context<'_>) -> bool {
        self.waker.register(cx.waker());
        self.flags.fetch_or(Self::PARKED, Ordering::AcqRel) & !Self::PARKED == 0
    }

    /// Resolves once the connection must leave (kick or shutdown); for a
    /// connection waiting on something else meanwhile.
    pub async fn leave(&self) -> Rung {
        std::future::poll_fn(|cx| {
            self.waker.register(cx.waker());
            let f = self.flags.fetch_or(Self::PARKED, Ordering::AcqRel);
            match Self::leaving(f) {
                Some(r) => Poll::Ready(r),
                None => Poll::Pending,
            }
        })
        .await
    }
}

/// A will waiting for its delay, or for the session to end.
#[derive(Debug, Clone)]
pub struct PendingWill {
    pub will: LastWill,
    pub due: Instant,
}

#[derive(Debug)]
pub struct SessionState {
    pub protocol: Protocol,
    pub subscriptions: HashMap<ByteString, SubscriptionEntry>,
    pub queue: VecDeque<Delivery>,
    pub inflight: VecDeque<Inflight>,
    /// Incoming QoS 2 packet ids received but not yet released.
    pub incoming_qos2: HashSet<u16>,
    next_packet_id: u16,
    /// Seconds the session outlives its connection.
    pub expiry_interval: u32,
    pub attached: Option<Attachment>,
    pub epoch: u64,
    pub disconnected_at: Option<Instant>,
    /// Boxed: most sessions have none, and the session stays small.
    pub pending_will: Option<Box<PendingWill>>,
    /// Set once the session is discarded; enqueues after that are refused.
    pub ended: bool,
}

#[derive(Debug)]
pub struct Session {
    pub id: u64,
    pub client_id: ByteString,
    pub state: Mutex<SessionState>,
    /// Mirrors `state.attached.is_some()` for the router's shared-subscription
    /// choice, which must not take the session lock of every member.
    online: AtomicBool,
    /// Set when the queue passed its high-water mark; publishers that fed
    /// it may wait on `space` until the connection drains it.
    backlogged: AtomicBool,
    space: Notify,
    /// A whole backpressure wait passed without the client taking
    /// anything: nobody waits for it again until its queue drains, so one
    /// stalled client costs its publishers one bounded wait, not one per
    /// message, and never slows the other sessions of its pod for long.
    stalled: AtomicBool,
    /// Redis store: a persistent session whose QoS 1/2 messages arrive
    /// through its Redis stream rather than from the router.
    stream_fed: AtomicBool,
}

/// What happened to a delivery offered to a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enqueued {
    Queued,
    /// Queued, but the queue is past half full: the publisher should slow down.
    Backlogged,
    Dropped,
}

/// The limits a session enforces when messages are queued.
#[derive(Debug, Clone, Copy)]
pub struct QueueLimits {
    pub max_queued: usize,
}

impl Session {
    pub fn new(id: u64, client_id: ByteString, protocol: Protocol) -> Arc<Session> {
        Arc::new(Session {
            id,
            client_id,
            state: Mutex::new(SessionState {
                protocol,
                subscriptions: HashMap::new(),
                queue: VecDeque::new(),
                inflight: VecDeque::new(),
                incoming_qos2: HashSet::new(),
                next_packet_id: 0,
                expiry_interval: 0,
                attached: None,
                epoch: 0,
                disconnected_at: None,
                pending_will: None,
                ended: false,
            }),
            online: AtomicBool::new(false),
            backlogged: AtomicBool::new(false),
            space: Notify::new(),
            stalled: AtomicBool::new(false),
            stream_fed: AtomicBool::new(false),
        })
    }

    pub fn is_online(&self) -> bool {
        self.online.load(Ordering::Relaxed)
    }

    pub fn is_stream_fed(&self) -> bool {
        self.stream_fed.load(Ordering::Relaxed)
    }

    pub(crate) fn set_stream_fed(&self, v: bool) {
        self.stream_fed.store(v, Ordering::Relaxed);
    }

    pub(crate) fn set_online(&self, v: bool) {
        self.online.store(v, Ordering::Relaxed);
    }

    /// Queue a delivery. Bounded: a full queue drops the new message, and a
    /// QoS 0 message for an offline session is dropped; both are counted.
    pub fn enqueue(&self, d: Delivery, limits: QueueLimits, stats: &Stats) -> Enqueued {
        let span = if crate::trace::enabled() {
            crate::trace::deliver(&self.client_id)
        } else {
            None
        };
        let _in_span = span.as_ref().map(tracing::Span::enter);
        let mut st = self.state.lock();
        if st.ended {
            return Enqueued::Dropped;
        }
        if st.attached.is_none() && d.qos == QoS::AtMostOnce {
            drop(st);
            stats.dropped(DropReason::Offline);
            return Enqueued::Dropped;
        }
        if st.queue.len() >= limits.max_queued {
            drop(st);
            stats.dropped(DropReason::QueueFull);
            return Enqueued::Dropped;
        }
        st.queue.push_back(d);
        let Some(a) = &st.attached else {
            return Enqueued::Queued;
        };
        a.signal.wake();
        if st.queue.len() > limits.max_queued / 2 {
            self.backlogged.store(true, Ordering::Relaxed);
            if self.stalled.load(Ordering::Relaxed) {
                return Enqueued::Queued;
            }
            return Enqueued::Backlogged;
        }
        Enqueued::Queued
    }

    /// Called by the serving connection after it drained the queue: wake
    /// publishers waiting for space once it is back under half full.
    pub fn drained(&self, queue_len: usize, limits: QueueLimits) {
        if self.backlogged.load(Ordering::Relaxed) && queue_len <= limits.max_queued / 2 {
            self.backlogged.store(false, Ordering::Relaxed);
            self.stalled.store(false, Ordering::Relaxed);
            self.space.notify_waiters();
        }
    }

    /// Wait until the queue is under half full, or `max` has passed.
    /// Bounded, so a client that stopped reading costs its publishers at
    /// most this much before its queue fills and further messages drop; a
    /// wait that ends without room marks the session stalled (see
    /// `stalled`).
    pub async fn wait_for_space(&self, max: std::time::Duration) {
        let notified = self.space.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if !self.backlogged.load(Ordering::Relaxed) {
            return;
        }
        if tokio::time::timeout(max, notified).await.is_err() {
            self.stalled.store(true, Ordering::Relaxed);
        }
    }
}

/// The packet id of a message of a persistent session's Redis stream,
/// from its entry id: the same on every pod and in every release (FNV-1a,
/// not the standard library's hasher, whose output may change).
pub fn stable_packet_id(entry_id: &str) -> PacketId {
    let mut h: u32 = 0x811c_9dc5;
    for b in entry_id.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    let v = (h % 65_535) as u16 + 1;
    PacketId::new(v).unwrap_or(PacketId::MIN)
}

impl SessionState {
    /// The next packet id not used by an in-flight message.
    pub fn next_packet_id(&mut self) -> PacketId {
        loop {
            self.next_packet_id = self.next_packet_id.wrapping_add(1);
            if let Some(pid) = PacketId::new(self.next_packet_id) {
                if !self.inflight.iter().any(|i| i.packet_id == pid) {
                    return pid;
                }
            }
        }
    }

    pub fn find_inflight(&self, pid: PacketId) -> Option<usize> {
        self.inflight.iter().position(|i| i.packet_id == pid)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::Context;

    use futures_util::task::{waker, ArcWake};

    use super::{Rung, Signal};

    #[derive(Default)]
    struct Count(AtomicUsize);
    impl ArcWake for Count {
        fn wake_by_ref(me: &Arc<Self>) {
            me.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_ring_wakes_a_parked_connection_once_and_a_running_one_never() {
        let s = Signal::default();
        let count = Arc::new(Count::default());
        let w = waker(count.clone());
        let mut cx = Context::from_waker(&w);
        let woken = || count.0.load(Ordering::SeqCst);

        // Running: rung, not woken; it sees the wake before parking.
        assert_eq!(s.resume(), None);
        s.wake();
        assert_eq!(woken(), 0);
        assert!(!s.park(&mut cx), "a wake rung before parking is seen");
        assert!(s.take(Rung::Wake));
        assert!(!s.take(Rung::Wake), "a wake is taken once");

        // Parked: the first ring wakes it; until it resumes, nothing more.
        assert!(s.park(&mut cx));
        s.wake();
        s.auth_changed();
        assert_eq!(woken(), 1);
        assert_eq!(s.resume(), None);
        assert!(s.take(Rung::Wake));
        assert!(s.take(Rung::AuthChanged));
        s.wake();
        assert_eq!(woken(), 1, "a running connection is not woken");
        assert!(s.take(Rung::Wake));

        // A kick stays: every resume after it says leave.
        assert!(s.park(&mut cx));
        s.kick();
        assert_eq!(woken(), 2);
        assert_eq!(s.resume(), Some(Rung::Kicked));
        assert!(!s.park(&mut cx));
        assert_eq!(s.resume(), Some(Rung::Kicked));
    }

    #[tokio::test]
    async fn leave_resolves_on_shutdown_only() {
        let s = Arc::new(Signal::default());
        let waiting = tokio::spawn({
            let s = s.clone();
            async move { s.leave().await }
        });
        s.wake();
        s.auth_changed();
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!waiting.is_finished());
        s.shutdown();
        let r = tokio::time::timeout(std::time::Duration::from_secs(5), waiting).await;
        assert_eq!(r.unwrap().unwrap(), Rung::Shutdown);
        assert!(s.take(Rung::Wake), "wakes are left for the connection");
    }
}
