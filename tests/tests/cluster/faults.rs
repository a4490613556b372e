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

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cirrus_codec::QoS;
use cirrus_e2e::load::{publish_numbered, Leave, Subscriber, Tally};
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
    // The subscriber starts on the last pod, the publisher on the first.
    let mut sub_addrs = addrs.clone();
    sub_addrs.rotate_right(1);
    let sub = Subscriber {
        qos,
        leave,
        ..Subscriber::new(sub_addrs, "mover", "load/#", &tally)
    };
    let (stop, moves) = (sub.stop.clone(), sub.moves.clone());
    let sub = sub.start().await;
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
            let mut at = addrs.clone();
            at.rotate_left(k);
            let member = Subscriber {
                stop: stop.clone(),
                moves: moves.clone(),
                ..Subscriber::new(at, &format!("member{k}"), "$share/g/load/#", &tally)
            };
            members.push(member.start().await);
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
        Subscriber::new(vec![addrs[1]], "offline", "load/#", &tally)
            .read_offline_session()
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
    Subscriber::new(vec![addrs[1]], "offline", "load/#", &tally)
        .read_offline_session()
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
