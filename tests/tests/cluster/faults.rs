//! Fault injection on the Redis store: numbered QoS 1/2 publishes, a fault
//! that would break the zero-loss promise (invariant 2), and a count of
//! what publishers had acknowledged against what subscribers received.
//!
//! Each scenario runs once in the normal suite. The stress mode repeats it
//! back to back, bounded in count and time:
//!
//! ```sh
//! CIRRUS_FAULT_REPEAT=20 CIRRUS_FAULT_SECS=900 \
//!   cargo nextest run -p cirrus-e2e --test cluster faults::
//! ```

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cirrus_codec::{Packet, PubResp, QoS};
use cirrus_e2e::client::{publish_packet, Next};
use cirrus_e2e::{BrokerProcess, Client, Opts, RedisServer};

/// Queues big enough that no queue limit drops anything in these runs:
/// a loss here is a loss, not a counted drop.
const POD_ARGS: &[&str] = &["--max-queued-messages", "100000"];

fn pods(url: &str, n: usize) -> Vec<BrokerProcess> {
    (0..n)
        .map(|_| BrokerProcess::start_on_redis(url, POD_ARGS))
        .collect()
}

/// How many times each scenario runs (stress mode), and for how long at
/// most in all.
fn repeat() -> (u32, Duration) {
    let n = std::env::var("CIRRUS_FAULT_REPEAT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1u32)
        .max(1);
    let secs = std::env::var("CIRRUS_FAULT_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(600u64);
    (n, Duration::from_secs(secs))
}

/// Run `scenario` as often as the stress mode asks; each run must pass.
async fn repeated<F, Fut>(name: &str, mut scenario: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let (n, budget) = repeat();
    let t0 = Instant::now();
    for i in 0..n {
        if i > 0 && t0.elapsed() > budget {
            eprintln!("{name}: time budget spent after {i} runs");
            return;
        }
        scenario().await;
        eprintln!("{name}: run {} of {n} passed ({:?})", i + 1, t0.elapsed());
    }
}

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
    fn lost(&self) -> Vec<u32> {
        self.acked
            .iter()
            .copied()
            .filter(|s| !self.received.contains_key(s))
            .collect()
    }

    fn duplicates(&self) -> u32 {
        self.received.values().map(|n| n - 1).sum()
    }

    /// No acknowledged message lost; for QoS 2 none delivered twice.
    fn check(&self, what: &str, qos: QoS) {
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

fn seq_of(payload: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(payload.get(..4)?.try_into().ok()?))
}

/// Connect to the first of `addrs` (from `start`) that accepts, for up to
/// 20 s: the publisher's or subscriber's pod may be dead or still busy.
async fn connect_any(addrs: &[SocketAddr], start: usize, o: &Opts) -> (Client, usize, bool) {
    let end = Instant::now() + Duration::from_secs(20);
    let mut i = start;
    loop {
        let addr = addrs[i % addrs.len()];
        let attempt = tokio::time::timeout(Duration::from_secs(3), async {
            let s = tokio::net::TcpStream::connect(addr).await.ok()?;
            drop(s);
            Some(Client::connect(addr, o.clone()).await)
        })
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

/// Publish `n` numbered messages on `topic` with a window of unacknowledged
/// ones, at most `rate` a second; when the pod dies, go on through another.
pub async fn publish_numbered(
    addrs: Vec<SocketAddr>,
    topic: &str,
    qos: QoS,
    n: u32,
    rate: u32,
    size: usize,
    tally: Arc<Mutex<Tally>>,
) {
    const WINDOW: usize = 32;
    let o = Opts::v5(&format!("pub-{topic}"));
    let (mut c, mut at, _) = connect_any(&addrs, 0, &o).await;
    let mut inflight: HashMap<u16, u32> = HashMap::new();
    let mut next_pid: u16 = 0;
    let mut seq = 0u32;
    let t0 = Instant::now();
    let end = t0 + Duration::from_secs(120);
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
            let p = publish_packet(topic, &payload, qos, false, Some(next_pid));
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
/// passed without anything new).
#[allow(clippy::too_many_arguments)]
pub async fn persistent_subscriber(
    addrs: Vec<SocketAddr>,
    client_id: String,
    filter: String,
    qos: QoS,
    leave: Leave,
    hold: Duration,
    stop: Arc<AtomicBool>,
    ready: Arc<AtomicBool>,
    moves: Arc<AtomicUsize>,
    tally: Arc<Mutex<Tally>>,
    resume_first: bool,
) {
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

/// Wait until a subscriber on `filter` is routed from every pod: one QoS 0
/// probe through each pod reaches a fresh non-persistent subscriber.
async fn routes_settle() {
    // Routes and persistent subscriptions reach the other pods through the
    // events stream within milliseconds; give slow CI machines a margin.
    tokio::time::sleep(Duration::from_millis(500)).await;
}

/// One run: `n` numbered messages published through pod 0 while a
/// persistent subscriber moves between the pods as `leave` says; `fault`
/// runs once the publisher is a third of the way.
async fn moving_subscriber_run(
    url: &str,
    pods_n: usize,
    qos: QoS,
    leave: Leave,
    n: u32,
    fault: impl FnOnce(&[BrokerProcess]),
) -> Tally {
    let p = pods(url, pods_n);
    let addrs: Vec<SocketAddr> = p.iter().map(|b| b.addr).collect();
    let tally = Arc::new(Mutex::new(Tally::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let ready = Arc::new(AtomicBool::new(false));
    let moves = Arc::new(AtomicUsize::new(0));
    // The subscriber starts on the last pod, the publisher on the first.
    let mut sub_addrs = addrs.clone();
    sub_addrs.rotate_right(1);
    let sub = tokio::spawn(persistent_subscriber(
        sub_addrs,
        "mover".into(),
        "load/#".into(),
        qos,
        leave,
        Duration::from_millis(300),
        stop.clone(),
        ready.clone(),
        moves.clone(),
        tally.clone(),
        false,
    ));
    let t0 = Instant::now();
    while !ready.load(Ordering::SeqCst) {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "subscriber never ready"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    routes_settle().await;
    let publisher = tokio::spawn(publish_numbered(
        addrs.clone(),
        "load/m",
        qos,
        n,
        2000,
        4,
        tally.clone(),
    ));
    let t1 = Instant::now();
    while tally.lock().unwrap().acked.len() < (n / 3) as usize && !publisher.is_finished() {
        assert!(t1.elapsed() < Duration::from_secs(60), "publisher stalled");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    fault(&p);
    publisher.await.expect("publisher");
    stop.store(true, Ordering::SeqCst);
    sub.await.expect("subscriber");
    eprintln!("subscriber moved {} times", moves.load(Ordering::Relaxed));
    {
        let t = tally.lock().unwrap();
        if !t.lost().is_empty() || (qos == QoS::ExactlyOnce && t.duplicates() > 0) {
            for (k, b) in p.iter().enumerate() {
                let log = b.log();
                let tail: Vec<&str> = log.lines().rev().take(60).collect();
                eprintln!("--- pod {k} log (last lines) ---");
                for l in tail.iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
    }
    Arc::try_unwrap(tally)
        .ok()
        .expect("tally still shared")
        .into_inner()
        .unwrap()
}

/// What a scenario runs on: one `redis-server`, or a Redis Cluster of
/// three masters (each key on its slot's master; pipelines split by slot).
enum Backend {
    Single(RedisServer),
    Cluster(cirrus_e2e::RedisCluster),
}

impl Backend {
    fn start(cluster: bool) -> Backend {
        if cluster {
            Backend::Cluster(cirrus_e2e::RedisCluster::start(3))
        } else {
            Backend::Single(RedisServer::start())
        }
    }

    fn url(&self) -> String {
        match self {
            Backend::Single(r) => r.url(),
            Backend::Cluster(c) => c.url(),
        }
    }
}

macro_rules! moving {
    ($name:ident, $qos:expr, $leave:expr, $n:expr) => {
        moving!($name, $qos, $leave, $n, false);
    };
    ($name:ident, $qos:expr, $leave:expr, $n:expr, $cluster:expr) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            repeated(stringify!($name), || async {
                let r = Backend::start($cluster);
                let t = moving_subscriber_run(&r.url(), 2, $qos, $leave, $n, |_| {}).await;
                t.check(stringify!($name), $qos);
                assert_eq!(t.refused, 0, "no publish was refused");
            })
            .await;
        }
    };
}

moving!(
    abrupt_drops_between_pods_qos1,
    QoS::AtLeastOnce,
    Leave::Drop,
    6000
);
moving!(
    abrupt_drops_between_pods_qos2,
    QoS::ExactlyOnce,
    Leave::Drop,
    4000
);
moving!(
    clean_disconnects_between_pods_qos1,
    QoS::AtLeastOnce,
    Leave::Disconnect,
    6000
);
moving!(
    takeovers_between_pods_qos1,
    QoS::AtLeastOnce,
    Leave::TakeOver,
    6000
);
moving!(
    takeovers_between_pods_qos2,
    QoS::ExactlyOnce,
    Leave::TakeOver,
    4000
);

/// Invariant 2 under SIGKILL: the subscriber's pod, then the publisher's.
macro_rules! killed {
    ($name:ident, $qos:expr, $victim:expr) => {
        killed!($name, $qos, $victim, false);
    };
    ($name:ident, $qos:expr, $victim:expr, $cluster:expr) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            repeated(stringify!($name), || async {
                let r = Backend::start($cluster);
                // Pod 0 serves the publisher, pod 1 the subscriber.
                let t = moving_subscriber_run(&r.url(), 2, $qos, Leave::Stay, 4000, |p| {
                    p[$victim].signal("KILL")
                })
                .await;
                t.check(stringify!($name), $qos);
            })
            .await;
        }
    };
}

killed!(sigkill_of_the_subscribers_pod_qos1, QoS::AtLeastOnce, 1);
killed!(sigkill_of_the_subscribers_pod_qos2, QoS::ExactlyOnce, 1);
killed!(sigkill_of_the_publishers_pod_qos1, QoS::AtLeastOnce, 0);
killed!(sigkill_of_the_publishers_pod_qos2, QoS::ExactlyOnce, 0);

// The same faults on a Redis Cluster.
moving!(
    abrupt_drops_between_pods_qos1_redis_cluster,
    QoS::AtLeastOnce,
    Leave::Drop,
    6000,
    true
);
moving!(
    takeovers_between_pods_qos2_redis_cluster,
    QoS::ExactlyOnce,
    Leave::TakeOver,
    4000,
    true
);
killed!(
    sigkill_of_the_subscribers_pod_qos1_redis_cluster,
    QoS::AtLeastOnce,
    1,
    true
);

/// Shared group of two persistent members on pods 1 and 2; pod 1 is
/// SIGKILLed: what its pod had read and not delivered is claimed by pod 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_a_shared_members_pod() {
    repeated("sigkill_of_a_shared_members_pod", || async {
        let r = RedisServer::start();
        let p = pods(&r.url(), 3);
        let addrs: Vec<SocketAddr> = p.iter().map(|b| b.addr).collect();
        let tally = Arc::new(Mutex::new(Tally::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let moves = Arc::new(AtomicUsize::new(0));
        let mut members = Vec::new();
        for k in 1..3 {
            let ready = Arc::new(AtomicBool::new(false));
            let mut at = addrs.clone();
            at.rotate_left(k);
            members.push(tokio::spawn(persistent_subscriber(
                at,
                format!("member{k}"),
                "$share/g/load/#".into(),
                QoS::AtLeastOnce,
                Leave::Stay,
                Duration::from_millis(300),
                stop.clone(),
                ready.clone(),
                moves.clone(),
                tally.clone(),
                false,
            )));
            let t0 = Instant::now();
            while !ready.load(Ordering::SeqCst) {
                assert!(t0.elapsed() < Duration::from_secs(20), "member never ready");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        routes_settle().await;
        let publisher = tokio::spawn(publish_numbered(
            vec![addrs[0]],
            "load/m",
            QoS::AtLeastOnce,
            4000,
            2000,
            4,
            tally.clone(),
        ));
        let t0 = Instant::now();
        while tally.lock().unwrap().acked.len() < 1300 {
            assert!(t0.elapsed() < Duration::from_secs(60), "publisher stalled");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        p[1].signal("KILL");
        publisher.await.expect("publisher");
        stop.store(true, Ordering::SeqCst);
        for m in members {
            m.await.expect("member");
        }
        tally
            .lock()
            .unwrap()
            .check("sigkill_of_a_shared_members_pod", QoS::AtLeastOnce);
    })
    .await;
}

/// Redis stopped (SIGSTOP) for three node timeouts, its data kept: no
/// healthy pod is declared dead afterwards, and nothing acknowledged is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_paused_past_the_node_timeout() {
    repeated("redis_paused_past_the_node_timeout", || async {
        let r = RedisServer::start();
        let mut logs = Vec::new();
        let t = moving_subscriber_run(&r.url(), 2, QoS::AtLeastOnce, Leave::Stay, 4000, |p| {
            r.signal("STOP");
            std::thread::sleep(Duration::from_millis(3000));
            r.signal("CONT");
            // A few sweeps after the pause.
            std::thread::sleep(Duration::from_millis(2500));
            logs.extend(p.iter().map(|b| b.log()));
        })
        .await;
        t.check("redis_paused_past_the_node_timeout", QoS::AtLeastOnce);
        for log in logs {
            assert!(!log.contains("stopped sending heartbeats"), "{log}");
            assert!(!log.contains("taken for dead"), "{log}");
        }
    })
    .await;
}

/// Redis out of memory (`maxmemory` + `noeviction`): publishes for an
/// offline persistent session get 0x97 once Redis is full — never a
/// success that is then lost — and every acknowledged one is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_out_of_memory_refuses_and_loses_nothing_acknowledged() {
    repeated("redis_out_of_memory", || async {
        let r =
            RedisServer::start_with(&["--maxmemory", "4mb", "--maxmemory-policy", "noeviction"]);
        let p = pods(&r.url(), 2);
        let addrs: Vec<SocketAddr> = p.iter().map(|b| b.addr).collect();
        let opts = Opts::v5("offline").persistent(3600);
        let mut c = Client::connect_ok(addrs[1], opts.clone()).await;
        c.subscribe("load/#", QoS::AtLeastOnce).await;
        c.disconnect().await;
        routes_settle().await;
        let tally = Arc::new(Mutex::new(Tally::default()));
        publish_numbered(
            vec![addrs[0]],
            "load/m",
            QoS::AtLeastOnce,
            3000,
            100_000,
            2048,
            tally.clone(),
        )
        .await;
        {
            let t = tally.lock().unwrap();
            eprintln!("{} acknowledged, {} refused", t.acked.len(), t.refused);
            assert!(t.refused > 0, "a full Redis refused nothing");
            assert!(
                !t.acked.is_empty(),
                "nothing was stored before Redis was full"
            );
        }
        assert!(p[0].metric("cirrus_publish_store_failures_total") >= 1.0);
        // While Redis is full nobody can connect either (a claim is a
        // write): the operator gives it room, and the session is drained.
        let set = cirrus_e2e::redis::command(r.port, "CONFIG SET maxmemory 256mb");
        assert!(set.is_some_and(|r| r.starts_with("+OK")));
        persistent_subscriber(
            vec![addrs[1]],
            "offline".into(),
            "load/#".into(),
            QoS::AtLeastOnce,
            Leave::Stay,
            Duration::from_millis(300),
            Arc::new(AtomicBool::new(true)),
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicUsize::new(0)),
            tally.clone(),
            true,
        )
        .await;
        tally
            .lock()
            .unwrap()
            .check("redis_out_of_memory", QoS::AtLeastOnce);
    })
    .await;
}

/// A Redis Cluster with one replica per master. The master holding an
/// offline persistent session's queue stream goes on taking writes while
/// its replica is paused, then is SIGKILLed: the replica takes over
/// without those writes. Publishes go on through it all.
async fn primary_killed_run(durability: &str) -> Tally {
    let mut cluster = cirrus_e2e::RedisCluster::start_replicated(3);
    let url = cluster.url();
    // A node timeout longer than the failover: the pods ride it out.
    let p: Vec<BrokerProcess> = (0..2)
        .map(|_| {
            BrokerProcess::start(&[
                "--redis",
                &url,
                "--node-timeout-ms",
                "15000",
                "--max-queued-messages",
                "100000",
                "--redis-durability",
                durability,
            ])
        })
        .collect();
    let addrs: Vec<SocketAddr> = p.iter().map(|b| b.addr).collect();
    let opts = Opts::v5("offline").persistent(3600);
    let mut c = Client::connect_ok(addrs[1], opts).await;
    c.subscribe("load/#", QoS::AtLeastOnce).await;
    c.disconnect().await;
    routes_settle().await;
    let (master, replica) = cluster.master_and_replica_of("offline");
    let tally = Arc::new(Mutex::new(Tally::default()));
    let publisher = tokio::spawn(publish_numbered(
        vec![addrs[0]],
        "load/m",
        QoS::AtLeastOnce,
        6000,
        2000,
        4,
        tally.clone(),
    ));
    let t0 = Instant::now();
    while tally.lock().unwrap().acked.len() < 1000 {
        assert!(t0.elapsed() < Duration::from_secs(60), "publisher stalled");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Cut the replication link (a paused replica would not do: the kernel
    // still takes the stream into its socket buffer): the replica's next
    // handshake fails on a password the master does not have, while the
    // cluster bus stays up for the failover.
    let rport = cluster.nodes[replica].port;
    let cmd = |c: &str| cirrus_e2e::redis::command(rport, c).unwrap_or_default();
    assert!(cmd("CONFIG SET masterauth not-the-password").starts_with("+OK"));
    cmd("CLIENT KILL TYPE master");
    let end = Instant::now() + Duration::from_secs(10);
    while !cmd("INFO replication").contains("master_link_status:down") {
        assert!(Instant::now() < end, "the replication link stayed up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    cluster.nodes[master].signal("KILL");
    let end = Instant::now() + Duration::from_secs(30);
    while !cmd("INFO replication").contains("role:master") {
        assert!(Instant::now() < end, "the replica never took over");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The dead master comes back (as Kubernetes restarts a Redis pod),
    // empty, and joins as the new master's replica: until then a
    // `replicated` write to that shard cannot be confirmed.
    cluster.nodes[master].restart();
    publisher.await.expect("publisher");
    persistent_subscriber(
        vec![addrs[1]],
        "offline".into(),
        "load/#".into(),
        QoS::AtLeastOnce,
        Leave::Stay,
        Duration::from_millis(300),
        Arc::new(AtomicBool::new(true)),
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicUsize::new(0)),
        tally.clone(),
        true,
    )
    .await;
    if durability == "replicated" {
        assert!(
            p[0].metric("cirrus_redis_unreplicated_writes_total") >= 1.0,
            "the paused replica confirmed writes"
        );
    }
    Arc::try_unwrap(tally)
        .ok()
        .expect("tally still shared")
        .into_inner()
        .unwrap()
}

/// Invariant 2 across a Redis failover: with `redis.durability:
/// replicated`, nothing PUBACKed is lost when the master dies. The same
/// fault with the default (`async`) loses what only the master had — the
/// control that shows the fault bites.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_primary_killed_with_replicated_durability() {
    repeated("redis_cluster_primary_killed", || async {
        let t = primary_killed_run("replicated").await;
        t.check("primary killed, replicated", QoS::AtLeastOnce);
        assert!(t.refused > 0, "the failover refused nothing");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_primary_killed_loses_writes_without_replication() {
    let t = primary_killed_run("async").await;
    eprintln!(
        "async: {} acknowledged, {} lost",
        t.acked.len(),
        t.lost().len()
    );
    assert!(
        !t.lost().is_empty(),
        "the master took writes its replica never had: async durability cannot keep them"
    );
}

/// Redis forgets its cached scripts (as after a restart or a failover to a
/// replica that never ran them) in the middle of the load: the pods send
/// them again whole, and nothing is refused or lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_script_cache_flushed_under_load() {
    repeated("redis_script_cache_flushed_under_load", || async {
        let r = RedisServer::start();
        let t = moving_subscriber_run(&r.url(), 2, QoS::AtLeastOnce, Leave::Drop, 6000, |_| {
            for _ in 0..5 {
                let ok = cirrus_e2e::redis::command(r.port, "SCRIPT FLUSH");
                assert!(ok.is_some_and(|o| o.starts_with("+OK")));
                std::thread::sleep(Duration::from_millis(200));
            }
        })
        .await;
        t.check("redis_script_cache_flushed_under_load", QoS::AtLeastOnce);
        assert_eq!(t.refused, 0, "no publish was refused");
    })
    .await;
}
