//! Numbered QoS 1/2 load for the fault tests: a publisher and persistent
//! subscribers that go on through another address when theirs fails, and a
//! [`Tally`] of what publishers had acknowledged against what subscribers
//! received (the zero-loss check).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cirrus_codec::{Packet, PubResp, QoS};

use crate::client::{publish_packet, Next};
use crate::{Client, Opts};

/// What publishers had acknowledged, and what subscribers received.
#[derive(Default)]
pub struct Tally {
    /// Sequence numbers whose PUBACK (or PUBREC) said success.
    pub acked: BTreeSet<u32>,
    /// Publishes answered with an error reason code.
    pub refused: usize,
    /// Sequence number → times delivered as a new message.
    pub received: HashMap<u32, u32>,
}

impl Tally {
    pub fn lost(&self) -> Vec<u32> {
        self.acked
            .iter()
            .copied()
            .filter(|s| !self.received.contains_key(s))
            .collect()
    }

    pub fn duplicates(&self) -> u32 {
        self.received.values().map(|n| n - 1).sum()
    }

    /// No acknowledged message lost; for QoS 2 none delivered twice.
    pub fn check(&self, what: &str, qos: QoS) {
        let lost = self.lost();
        eprintln!(
            "{what}: {} acknowledged, {} refused, {} received, {} lost, {} duplicates",
            self.acked.len(),
            self.refused,
            self.received.len(),
            lost.len(),
            self.duplicates()
        );
        assert!(
            lost.is_empty(),
            "{what}: {} acknowledged messages lost, first {:?}",
            lost.len(),
            &lost[..lost.len().min(10)]
        );
        if qos == QoS::ExactlyOnce {
            assert_eq!(self.duplicates(), 0, "{what}: QoS 2 delivered twice");
        }
    }
}

/// The most of `sorted` (instants as offsets) that fall within any one
/// second.
pub fn peak_per_second(sorted: &[Duration]) -> usize {
    (0..sorted.len())
        .map(|i| {
            sorted[i..]
                .iter()
                .take_while(|t| **t - sorted[i] < Duration::from_secs(1))
                .count()
        })
        .max()
        .unwrap_or(0)
}

pub fn seq_of(payload: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(payload.get(..4)?.try_into().ok()?))
}

/// Connect to the first of `addrs` (from `start`) that accepts, for up to
/// 20 s: the publisher's or subscriber's pod may be dead or still busy.
pub async fn connect_any(addrs: &[SocketAddr], start: usize, o: &Opts) -> (Client, usize, bool) {
    let end = Instant::now() + Duration::from_secs(20);
    let mut i = start;
    loop {
        let addr = addrs[i % addrs.len()];
        let attempt =
            tokio::time::timeout(Duration::from_secs(3), Client::try_connect(addr, o.clone()))
                .await;
        if let Ok(Some((c, ack))) = attempt {
            if ack.reason_code == 0 {
                return (c, i % addrs.len(), ack.session_present);
            }
        }
        assert!(Instant::now() < end, "no pod accepted {}", o.client_id);
        i += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Where numbered messages go: one topic, or message `seq` to
/// `prefix/{seq % n}` (one topic for each client of a fleet).
#[derive(Debug, Clone)]
pub enum Topics {
    One(String),
    Spread { prefix: String, n: u32 },
}

impl Topics {
    fn of(&self, seq: u32) -> std::borrow::Cow<'_, str> {
        match self {
            Topics::One(t) => t.into(),
            Topics::Spread { prefix, n } => format!("{prefix}/{}", seq % n.max(&1)).into(),
        }
    }

    fn name(&self) -> &str {
        match self {
            Topics::One(t) | Topics::Spread { prefix: t, .. } => t,
        }
    }
}

impl From<&str> for Topics {
    fn from(t: &str) -> Topics {
        Topics::One(t.into())
    }
}

impl From<&String> for Topics {
    fn from(t: &String) -> Topics {
        Topics::One(t.clone())
    }
}

/// Publish `n` numbered messages to `topics` with a window of
/// unacknowledged ones, at most `rate` a second; when the pod dies, go on
/// through another.
pub async fn publish_numbered(
    addrs: Vec<SocketAddr>,
    topics: impl Into<Topics>,
    qos: QoS,
    n: u32,
    rate: u32,
    size: usize,
    tally: Arc<Mutex<Tally>>,
) {
    const WINDOW: usize = 32;
    let topics = topics.into();
    let o = Opts::v5(&format!("pub-{}", topics.name()));
    let (mut c, mut at, _) = connect_any(&addrs, 0, &o).await;
    let mut inflight: HashMap<u16, u32> = HashMap::new();
    let mut next_pid: u16 = 0;
    let mut seq = 0u32;
    let t0 = Instant::now();
    let end = t0 + Duration::from_secs(120 + u64::from(n / rate.max(1)));
    while seq < n || !inflight.is_empty() {
        assert!(Instant::now() < end, "publisher did not finish in time");
        let due = (t0.elapsed().as_secs_f64() * f64::from(rate)) as u32 + 1;
        let mut sent_any = false;
        while inflight.len() < WINDOW && seq < n && seq < due {
            loop {
                next_pid = next_pid.wrapping_add(1).max(1);
                if !inflight.contains_key(&next_pid) {
                    break;
                }
            }
            let mut payload = seq.to_be_bytes().to_vec();
            payload.resize(size.max(4), b'.');
            let p = publish_packet(&topics.of(seq), &payload, qos, false, Some(next_pid));
            if !c.try_send(Packet::Publish(p)).await {
                break;
            }
            inflight.insert(next_pid, seq);
            seq += 1;
            sent_any = true;
        }
        let wait = if inflight.is_empty() || (!sent_any && seq < n && seq >= due) {
            Duration::from_millis(2)
        } else {
            Duration::from_secs(10)
        };
        match c.next(wait).await {
            Next::Packet(Packet::PubAck(a)) => {
                if let Some(s) = inflight.remove(&a.packet_id.get()) {
                    let mut t = tally.lock().unwrap();
                    if a.reason_code < 0x80 {
                        t.acked.insert(s);
                    } else {
                        t.refused += 1;
                    }
                }
            }
            Next::Packet(Packet::PubRec(a)) => {
                let id = a.packet_id.get();
                if a.reason_code < 0x80 {
                    if let Some(&s) = inflight.get(&id) {
                        tally.lock().unwrap().acked.insert(s);
                    }
                    let _ = c
                        .try_send(Packet::PubRel(PubResp::new(a.packet_id, 0)))
                        .await;
                } else {
                    inflight.remove(&id);
                    tally.lock().unwrap().refused += 1;
                }
            }
            Next::Packet(Packet::PubComp(a)) => {
                inflight.remove(&a.packet_id.get());
            }
            Next::Packet(_) => {}
            Next::Timeout if wait < Duration::from_secs(1) => {}
            Next::Timeout | Next::Closed => {
                // The pod is gone (or stuck): what was not acknowledged is
                // not counted; a real client would send it again.
                inflight.clear();
                let (nc, nat, _) = connect_any(&addrs, at + 1, &o).await;
                c = nc;
                at = nat;
            }
        }
    }
    let _ = c.try_send(Packet::Disconnect(Default::default())).await;
}

/// How the subscriber leaves a pod before it goes to the next one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leave {
    /// TCP closed without DISCONNECT.
    Drop,
    /// DISCONNECT, then close.
    Disconnect,
    /// A second connection with the same client id on the next pod takes
    /// the session over while the first is still open.
    TakeOver,
    /// Stay on one pod until it closes (its pod is killed).
    Stay,
}

/// A persistent subscriber's client-side session: what it received and
/// the QoS 2 packet ids it holds until PUBREL ([MQTT-4.3.3]), which is
/// what keeps a resent QoS 2 PUBLISH from counting twice.
#[derive(Default)]
struct SubState {
    held: HashSet<u16>,
}

/// Handle every packet: acknowledge as the QoS says, count new messages.
async fn on_packet(c: &mut Client, p: Packet, st: &mut SubState, tally: &Mutex<Tally>) {
    match p {
        Packet::Publish(m) => {
            let new = match (m.qos, m.packet_id) {
                (QoS::ExactlyOnce, Some(id)) => {
                    let new = st.held.insert(id.get());
                    let _ = c.try_send(Packet::PubRec(PubResp::new(id, 0))).await;
                    new
                }
                (QoS::AtLeastOnce, Some(id)) => {
                    let _ = c.try_send(Packet::PubAck(PubResp::new(id, 0))).await;
                    true
                }
                _ => true,
            };
            if let (true, Some(s)) = (new, seq_of(&m.payload)) {
                *tally.lock().unwrap().received.entry(s).or_insert(0) += 1;
            }
        }
        Packet::PubRel(r) => {
            st.held.remove(&r.packet_id.get());
            let _ = c
                .try_send(Packet::PubComp(PubResp::new(r.packet_id, 0)))
                .await;
        }
        _ => {}
    }
}

/// A persistent subscriber of `filter` that moves between `addrs`, leaving
/// each pod as `leave` says after `hold`, until `stop`; then it settles on
/// one pod and reads until everything acknowledged arrived (or 30 s
/// passed without anything new). `moves` counts its reconnects.
pub struct Subscriber {
    pub addrs: Vec<SocketAddr>,
    pub client_id: String,
    pub filter: String,
    pub qos: QoS,
    pub leave: Leave,
    pub hold: Duration,
    /// Resume a session made earlier instead of subscribing afresh.
    pub resume_first: bool,
    pub stop: Arc<AtomicBool>,
    pub moves: Arc<AtomicUsize>,
    pub tally: Arc<Mutex<Tally>>,
}

impl Subscriber {
    /// QoS 1, staying on its pod until the pod goes, with flags of its own.
    pub fn new(
        addrs: Vec<SocketAddr>,
        client_id: &str,
        filter: &str,
        tally: &Arc<Mutex<Tally>>,
    ) -> Self {
        Subscriber {
            addrs,
            client_id: client_id.into(),
            filter: filter.into(),
            qos: QoS::AtLeastOnce,
            leave: Leave::Stay,
            hold: Duration::from_millis(300),
            resume_first: false,
            stop: Arc::new(AtomicBool::new(false)),
            moves: Arc::new(AtomicUsize::new(0)),
            tally: tally.clone(),
        }
    }

    /// Run it as a task, once it has subscribed (at most 20 s).
    pub async fn start(self) -> tokio::task::JoinHandle<()> {
        let ready = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(self.run(ready.clone()));
        let t0 = Instant::now();
        while !ready.load(Ordering::SeqCst) {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "subscriber never ready"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        task
    }

    /// Read what the session kept while it was offline, until everything
    /// acknowledged arrived.
    pub async fn read_offline_session(mut self) {
        self.resume_first = true;
        self.stop.store(true, Ordering::SeqCst);
        self.run(Arc::new(AtomicBool::new(false))).await
    }

    async fn run(self, ready: Arc<AtomicBool>) {
        let Subscriber {
            addrs,
            client_id,
            filter,
            qos,
            leave,
            hold,
            resume_first,
            stop,
            moves,
            tally,
        } = self;
        let fresh = Opts::v5(&client_id).persistent(3600);
        let (mut c, mut at, _) = connect_any(
            &addrs,
            0,
            &Opts {
                clean_start: !resume_first,
                ..fresh.clone()
            },
        )
        .await;
        if !resume_first {
            assert_eq!(c.subscribe(&filter, qos).await, qos.as_u8());
        }
        ready.store(true, Ordering::SeqCst);
        let resume = fresh.resume();
        let mut st = SubState::default();
        let mut quiet_since = Instant::now();
        let mut seen = 0usize;
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            assert!(Instant::now() < deadline, "subscriber did not finish");
            let stopping = stop.load(Ordering::SeqCst);
            let until = Instant::now()
                + if stopping {
                    Duration::from_secs(1)
                } else {
                    hold
                };
            let mut closed = false;
            while Instant::now() < until {
                match c.next(Duration::from_millis(50)).await {
                    Next::Packet(p) => on_packet(&mut c, p, &mut st, &tally).await,
                    Next::Timeout => {}
                    Next::Closed => {
                        closed = true;
                        break;
                    }
                }
            }
            if stopping {
                let t = tally.lock().unwrap();
                let all = t.acked.iter().all(|s| t.received.contains_key(s));
                if t.received.len() != seen {
                    seen = t.received.len();
                    quiet_since = Instant::now();
                }
                if (all && !closed) || quiet_since.elapsed() > Duration::from_secs(30) {
                    break;
                }
            }
            if !closed && (stopping || leave == Leave::Stay) {
                continue;
            }
            // Move on: to the next pod (or, after a close, to any live one).
            let next = at + 1;
            match leave {
                Leave::Drop | Leave::Stay => drop(c),
                Leave::Disconnect => {
                    let _ = c.try_send(Packet::Disconnect(Default::default())).await;
                    drop(c);
                }
                Leave::TakeOver => {
                    let (nc, nat, present) = connect_any(&addrs, next, &resume).await;
                    assert!(present, "the session was there for the takeover");
                    // The old connection is closed by the broker within a
                    // second; whatever it still brings is handled (and may come
                    // again on the new one).
                    let mut old = c;
                    let end = Instant::now() + Duration::from_secs(2);
                    while Instant::now() < end {
                        match old.next(Duration::from_millis(100)).await {
                            Next::Packet(p) => on_packet(&mut old, p, &mut st, &tally).await,
                            Next::Closed => break,
                            Next::Timeout => {}
                        }
                    }
                    c = nc;
                    at = nat;
                    moves.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
            }
            let (nc, nat, present) = connect_any(&addrs, next, &resume).await;
            assert!(present, "the persistent session survived the move");
            c = nc;
            at = nat;
            moves.fetch_add(1, Ordering::Relaxed);
        }
        let _ = c.try_send(Packet::Disconnect(Default::default())).await;
    }
}
