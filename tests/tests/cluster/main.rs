//! Several `cirrus-broker` pods on a real `redis-server` (and on a real 3-master
//! Redis Cluster): the invariants of the Redis store (docs/architecture.md),
//! each shown with real processes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cirrus_codec::{reason, ByteString, LastWill, Packet, Properties, PubResp, QoS};
use cirrus_e2e::client::Next;
use cirrus_e2e::{BrokerProcess, Client, Opts, RedisServer, TIMEOUT};

fn pods(url: &str, n: usize) -> Vec<BrokerProcess> {
    (0..n)
        .map(|_| BrokerProcess::start_on_redis(url, &[]))
        .collect()
}

/// Run a scenario on one `redis-server` and on a 3-master Redis Cluster.
macro_rules! on_both {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test]
            async fn single_redis() {
                let r = cirrus_e2e::RedisServer::start();
                super::$name(&r.url()).await;
            }

            #[tokio::test]
            async fn redis_cluster() {
                let r = cirrus_e2e::RedisCluster::start(3);
                super::$name(&r.url()).await;
            }
        }
    )*};
}

on_both!(
    publish_on_one_pod_is_received_on_another_in_order,
    retained_message_set_on_one_pod_is_seen_on_another,
    takeover_across_pods_closes_the_old_connection_within_a_second,
    persistent_session_moves_between_pods_with_its_messages,
    sigkill_of_a_pod_loses_no_acknowledged_qos1_message,
    shared_subscription_delivers_each_message_once_across_pods,
    a_dead_pods_client_wills_are_published_by_a_survivor,
);

/// Publish `topic` from `publisher` until `subscriber` receives it: routes
/// travel between pods through Redis, asynchronously.
async fn until_routed(publisher: &mut Client, subscriber: &mut Client, topic: &str) {
    let end = Instant::now() + TIMEOUT;
    loop {
        assert!(Instant::now() < end, "route for {topic} never arrived");
        publisher
            .publish(topic, b"probe", QoS::AtMostOnce, false)
            .await;
        if let Next::Packet(Packet::Publish(p)) = subscriber.next(Duration::from_millis(50)).await {
            assert_eq!(p.topic, topic);
            // Drain any other probes.
            while let Next::Packet(_) = subscriber.next(Duration::from_millis(100)).await {}
            return;
        }
    }
}

async fn publish_on_one_pod_is_received_on_another_in_order(url: &str) {
    let p = pods(url, 2);
    let mut sub = Client::connect_ok(p[1].addr, Opts::v5("sub")).await;
    assert_eq!(sub.subscribe("x/#", QoS::AtLeastOnce).await, 1);
    let mut publisher = Client::connect_ok(p[0].addr, Opts::v5("pub")).await;
    until_routed(&mut publisher, &mut sub, "x/probe").await;
    for i in 0..200u32 {
        let code = publisher
            .publish("x/data", &i.to_be_bytes(), QoS::AtLeastOnce, false)
            .await;
        assert_eq!(code, 0);
    }
    for i in 0..200u32 {
        let m = sub.recv_ack().await;
        assert_eq!(&m.payload[..], &i.to_be_bytes(), "message {i} out of order");
    }
}

async fn retained_message_set_on_one_pod_is_seen_on_another(url: &str) {
    let p = pods(url, 2);
    let mut publisher = Client::connect_ok(p[0].addr, Opts::v311("pub")).await;
    publisher
        .publish("status/a", b"up", QoS::AtLeastOnce, true)
        .await;
    let end = Instant::now() + TIMEOUT;
    let mut n = 0;
    loop {
        assert!(Instant::now() < end, "retained message not seen on pod B");
        n += 1;
        let mut sub = Client::connect_ok(p[1].addr, Opts::v311(&format!("s{n}"))).await;
        sub.subscribe("status/+", QoS::AtLeastOnce).await;
        if let Next::Packet(Packet::Publish(m)) = sub.next(Duration::from_millis(200)).await {
            assert_eq!(&m.payload[..], b"up");
            assert!(m.retain);
            break;
        }
    }
    // A third pod started later loads it from the snapshot.
    let c = BrokerProcess::start_on_redis(url, &[]);
    let mut sub = Client::connect_ok(c.addr, Opts::v311("late")).await;
    sub.subscribe("status/#", QoS::AtMostOnce).await;
    assert_eq!(&sub.recv_publish().await.payload[..], b"up");
}

async fn takeover_across_pods_closes_the_old_connection_within_a_second(url: &str) {
    let p = pods(url, 2);
    let mut old = Client::connect_ok(p[0].addr, Opts::v5("same-id")).await;
    let t0 = Instant::now();
    let (_new, ack) = Client::connect(p[1].addr, Opts::v5("same-id")).await;
    assert_eq!(ack.reason_code, 0);
    let d = tokio::time::timeout(Duration::from_secs(1), old.expect_closed())
        .await
        .expect("old connection still open after a second");
    assert_eq!(d.map(|d| d.reason_code), Some(reason::SESSION_TAKEN_OVER));
    assert!(t0.elapsed() < Duration::from_secs(1));
}

async fn persistent_session_moves_between_pods_with_its_messages(url: &str) {
    let p = pods(url, 2);
    let opts = Opts::v5("mover").persistent(300);
    let mut c = Client::connect_ok(p[0].addr, opts.clone()).await;
    c.subscribe("q/#", QoS::AtLeastOnce).await;
    c.disconnect().await;
    let mut publisher = Client::connect_ok(p[1].addr, Opts::v5("pub")).await;
    for i in 0..50u32 {
        assert_eq!(
            publisher
                .publish("q/x", &i.to_be_bytes(), QoS::AtLeastOnce, false)
                .await,
            0
        );
    }
    let (mut c, ack) = Client::connect(p[1].addr, opts.clone().resume()).await;
    assert!(ack.session_present);
    for i in 0..50u32 {
        let m = c.recv_ack().await;
        assert_eq!(&m.payload[..], &i.to_be_bytes());
    }
    // Its subscription came along: new messages reach it on pod B.
    publisher
        .publish("q/y", b"live", QoS::AtLeastOnce, false)
        .await;
    assert_eq!(&c.recv_ack().await.payload[..], b"live");
}

/// Invariant 2: SIGKILL of the subscriber's pod loses no QoS 1 message
/// whose PUBACK the publisher received.
async fn sigkill_of_a_pod_loses_no_acknowledged_qos1_message(url: &str) {
    const N: u32 = 3000;
    let p = pods(url, 2);
    let a = p[0].addr;
    let b = p[1].addr;
    let opts = Opts::v5("sink").persistent(600);
    let mut sink = Client::connect_ok(a, opts.clone()).await;
    sink.subscribe("load/#", QoS::AtLeastOnce).await;
    let mut publisher = Client::connect_ok(b, Opts::v5("source")).await;
    until_routed(&mut publisher, &mut sink, "load/probe").await;

    let (got_tx, mut got_rx) = tokio::sync::mpsc::unbounded_channel::<u32>();
    let reconnects = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let reconnected = reconnects.clone();
    let reader = tokio::spawn(async move {
        let mut c = sink;
        loop {
            match c.next(Duration::from_secs(15)).await {
                Next::Packet(Packet::Publish(m)) => {
                    // QoS 1 only here; a failed PUBACK is a dead pod, seen
                    // as Closed on the next read.
                    if let Some(id) = m.packet_id {
                        let _ = c.try_send(Packet::PubAck(PubResp::new(id, 0))).await;
                    }
                    if m.payload.len() == 4 {
                        let seq = u32::from_be_bytes([
                            m.payload[0],
                            m.payload[1],
                            m.payload[2],
                            m.payload[3],
                        ]);
                        if got_tx.send(seq).is_err() {
                            return;
                        }
                    }
                }
                Next::Packet(_) => {}
                Next::Closed => {
                    // Pod A died: the client reconnects to pod B.
                    reconnected.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let (nc, ack) = Client::connect(b, opts.clone().resume()).await;
                    assert_eq!(ack.reason_code, 0);
                    assert!(ack.session_present, "the session survived its pod");
                    c = nc;
                }
                Next::Timeout => return,
            }
        }
    });

    let mut acked = Vec::new();
    let mut received = HashSet::new();
    let mut killed = false;
    for seq in 0..N {
        if publisher
            .publish("load/m", &seq.to_be_bytes(), QoS::AtLeastOnce, false)
            .await
            == 0
        {
            acked.push(seq);
        }
        while let Ok(s) = got_rx.try_recv() {
            received.insert(s);
        }
        if !killed && received.len() >= (N / 3) as usize {
            p[0].signal("KILL");
            killed = true;
        }
    }
    assert!(killed, "the sink never got a third of the messages");
    let end = Instant::now() + Duration::from_secs(30);
    while received.len() < acked.len() && Instant::now() < end {
        match tokio::time::timeout(Duration::from_secs(1), got_rx.recv()).await {
            Ok(Some(s)) => {
                received.insert(s);
            }
            Ok(None) => break,
            Err(_) => {}
        }
    }
    let lost: Vec<u32> = acked
        .iter()
        .copied()
        .filter(|s| !received.contains(s))
        .collect();
    assert_eq!(acked.len(), N as usize, "every publish was acknowledged");
    assert_eq!(
        reconnects.load(std::sync::atomic::Ordering::Relaxed),
        1,
        "the sink moved to pod B once"
    );
    eprintln!(
        "{} acknowledged, {} distinct received after the kill and resume",
        acked.len(),
        received.len()
    );
    assert!(
        lost.is_empty(),
        "{} acknowledged messages lost, first {:?}",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
    drop(got_rx);
    reader.abort();
}

async fn shared_subscription_delivers_each_message_once_across_pods(url: &str) {
    const N: u32 = 300;
    let p = pods(url, 3);
    let mut m1 = Client::connect_ok(p[0].addr, Opts::v5("m1")).await;
    let mut m2 = Client::connect_ok(p[1].addr, Opts::v5("m2")).await;
    m1.subscribe("$share/g/work/#", QoS::AtLeastOnce).await;
    m2.subscribe("$share/g/work/#", QoS::AtLeastOnce).await;
    let mut publisher = Client::connect_ok(p[2].addr, Opts::v5("pub")).await;
    // Wait until both pods' group routes reached the publishing pod.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for i in 0..N {
        publisher
            .publish("work/item", &i.to_be_bytes(), QoS::AtLeastOnce, false)
            .await;
    }
    let mut seen = Vec::new();
    let mut per_member = [0usize; 2];
    let end = Instant::now() + TIMEOUT;
    while seen.len() < N as usize && Instant::now() < end {
        for (k, m) in [&mut m1, &mut m2].into_iter().enumerate() {
            while let Next::Packet(Packet::Publish(msg)) = m.next(Duration::from_millis(20)).await {
                m.ack(&msg).await;
                seen.push(u32::from_be_bytes(msg.payload[..4].try_into().unwrap()));
                per_member[k] += 1;
            }
        }
    }
    let unique: HashSet<u32> = seen.iter().copied().collect();
    assert_eq!(unique.len(), N as usize, "every message delivered");
    assert_eq!(seen.len(), N as usize, "no message delivered twice");
    m1.expect_nothing(Duration::from_millis(200)).await;
    m2.expect_nothing(Duration::from_millis(200)).await;
    eprintln!("shared group split: {per_member:?}");
}

async fn a_dead_pods_client_wills_are_published_by_a_survivor(url: &str) {
    let p = pods(url, 2);
    let mut watcher = Client::connect_ok(p[1].addr, Opts::v5("watcher")).await;
    watcher.subscribe("wills/#", QoS::AtLeastOnce).await;
    let mut o = Opts::v5("doomed");
    o.will = Some(LastWill {
        topic: ByteString::from("wills/doomed"),
        payload: Bytes::from_static(b"gone"),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: Properties::default(),
    });
    let mut probe = Client::connect_ok(p[0].addr, Opts::v5("probe")).await;
    until_routed(&mut probe, &mut watcher, "wills/probe").await;
    let _doomed = Client::connect_ok(p[0].addr, o).await;
    p[0].signal("KILL");
    let t0 = Instant::now();
    let m = watcher.recv_publish().await;
    assert_eq!(m.topic, "wills/doomed");
    assert_eq!(&m.payload[..], b"gone");
    eprintln!("will published {:?} after the kill", t0.elapsed());
}

async fn connack_code(addr: SocketAddr, id: &str) -> u8 {
    Client::connect(addr, Opts::v5(id)).await.1.reason_code
}

/// Invariant 6: Redis down — pods stay up, refuse new clients with 0x88,
/// and recover by themselves when it returns (here: empty, as after a
/// restart without persistence).
#[tokio::test]
async fn redis_outage_refuses_new_clients_and_recovers() {
    let mut redis = RedisServer::start();
    let mut p = pods(&redis.url(), 2);
    let mut sub = Client::connect_ok(p[1].addr, Opts::v5("sub")).await;
    sub.subscribe("o/#", QoS::AtMostOnce).await;
    let mut publisher = Client::connect_ok(p[0].addr, Opts::v5("pub")).await;
    until_routed(&mut publisher, &mut sub, "o/probe").await;

    redis.stop();
    // Publishing goes on against the dead store; nothing crashes.
    let end = Instant::now() + TIMEOUT;
    let mut refused = false;
    let mut n = 0;
    while Instant::now() < end {
        publisher
            .publish("o/x", b"during", QoS::AtMostOnce, false)
            .await;
        n += 1;
        if n % 20 == 0 && connack_code(p[0].addr, "newcomer").await == reason::SERVER_UNAVAILABLE {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(refused, "new clients were not refused while Redis was down");
    assert!(p[0].is_running() && p[1].is_running());
    assert_eq!(p[0].http_get("/readyz").0, 503);
    assert_eq!(p[0].http_get("/healthz").0, 200);
    assert_eq!(p[0].metric("cirrus_redis_up"), 0.0);
    assert!(p[0].metric("cirrus_connections_refused_total{reason=\"server_unavailable\"}") >= 1.0);

    redis.restart();
    let end = Instant::now() + TIMEOUT;
    while connack_code(p[0].addr, "newcomer2").await != 0 {
        assert!(
            Instant::now() < end,
            "pod did not recover after Redis returned"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(p[0].http_get("/readyz").0, 200);
    // The existing subscriber on pod B is routed again (its pod wrote its
    // routes back into the empty Redis).
    let mut publisher = Client::connect_ok(p[0].addr, Opts::v5("pub2")).await;
    while let Next::Packet(_) = sub.next(Duration::from_millis(50)).await {}
    until_routed(&mut publisher, &mut sub, "o/after").await;
    assert!(p[0].is_running() && p[1].is_running());
}

/// `rediss://`: the store over TLS, the server's certificate checked
/// against the CA given with `--redis-ca`; without it the pod refuses to
/// start rather than trust an unknown server.
#[tokio::test]
async fn redis_over_tls_with_a_private_ca() {
    use cirrus_e2e::certs::{ca, leaf, Dir};
    let dir = Dir::new();
    let authority = ca("redis test CA");
    let (cert, key) = leaf(&authority, "localhost", &["localhost"], false, false);
    let cert = dir.write("redis.crt", &cert);
    let key = dir.write("redis.key", &key);
    let ca_file = dir.write("ca.crt", &authority.cert.pem());
    let redis = RedisServer::start_tls(&cert, &key);
    let url = redis.url();
    assert!(url.starts_with("rediss://"));
    let p: Vec<BrokerProcess> = (0..2)
        .map(|_| BrokerProcess::start_on_redis(&url, &["--redis-ca", &ca_file]))
        .collect();
    let mut sub = Client::connect_ok(p[1].addr, Opts::v5("tls-sub")).await;
    sub.subscribe("t/#", QoS::AtLeastOnce).await;
    let mut publisher = Client::connect_ok(p[0].addr, Opts::v5("tls-pub")).await;
    until_routed(&mut publisher, &mut sub, "t/probe").await;
    publisher
        .publish("t/x", b"secure", QoS::AtLeastOnce, false)
        .await;
    assert_eq!(&sub.recv_ack().await.payload[..], b"secure");

    let out = std::process::Command::new(cirrus_e2e::broker_bin())
        .args([
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--redis",
            &url,
        ])
        .output()
        .expect("run the broker");
    assert!(
        !out.status.success(),
        "a pod trusted an unknown Redis certificate"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot connect to Redis"), "{err}");
}

/// A pod that starts before its Redis (a managed Redis starts beside the
/// brokers) waits for it instead of exiting, and then serves.
#[tokio::test]
async fn a_pod_started_before_its_redis_waits_for_it() {
    let mut redis = RedisServer::start();
    redis.stop();
    let url = redis.url();
    let starting = std::thread::spawn(move || BrokerProcess::start_on_redis(&url, &[]));
    std::thread::sleep(Duration::from_secs(2));
    redis.restart();
    let b = starting.join().expect("the pod started once Redis was up");
    assert!(b.log().contains("not reachable yet"), "{}", b.log());
    let mut sub = Client::connect_ok(b.addr, Opts::v5("late-sub")).await;
    sub.subscribe("late/#", QoS::AtLeastOnce).await;
    let mut publisher = Client::connect_ok(b.addr, Opts::v5("late-pub")).await;
    publisher
        .publish("late/x", b"served", QoS::AtLeastOnce, false)
        .await;
    assert_eq!(&sub.recv_ack().await.payload[..], b"served");
}

/// Shared-group entries that a pod read and never acknowledged (it died)
/// are claimed by a live member's pod. The dead reader is played by
/// redis-cli: it takes the entries while the member's pod is stopped.
#[tokio::test]
async fn a_dead_readers_shared_entries_are_claimed_by_a_live_pod() {
    let redis = RedisServer::start();
    let p = pods(&redis.url(), 2);
    let mut member = Client::connect_ok(p[0].addr, Opts::v5("member")).await;
    member.subscribe("$share/g/jobs/#", QoS::AtLeastOnce).await;
    let mut publisher = Client::connect_ok(p[1].addr, Opts::v5("pub")).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    p[0].signal("STOP");
    // A read the pod sent before it stopped (XREADGROUP BLOCK 100) may still
    // be waiting in Redis and would take the first entries: let it expire.
    tokio::time::sleep(Duration::from_millis(400)).await;
    for i in 0..5u8 {
        publisher
            .publish("jobs/x", &[i], QoS::AtLeastOnce, false)
            .await;
    }
    let stolen = std::process::Command::new(cirrus_e2e::tool("redis-cli"))
        .args(["-p", &redis.port.to_string()])
        .args([
            "XREADGROUP",
            "GROUP",
            "cirrus",
            "ghost",
            "COUNT",
            "10",
            "STREAMS",
        ])
        .args(["cirrus:{g}:share:$share/g/jobs/#", ">"])
        .output()
        .unwrap();
    p[0].signal("CONT");
    assert!(stolen.status.success());
    // The ghost holds them unacknowledged (XPENDING's first line: count).
    let pending = std::process::Command::new(cirrus_e2e::tool("redis-cli"))
        .args(["-p", &redis.port.to_string()])
        .args([
            "XPENDING",
            "cirrus:{g}:share:$share/g/jobs/#",
            "cirrus",
            "-",
            "+",
            "10",
            "ghost",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&pending.stdout);
    let held = text.lines().filter(|l| *l == "ghost").count();
    assert!(held >= 1, "the ghost holds entries:\n{text}");
    let mut got = Vec::new();
    while got.len() < 5 {
        let m = member.recv_ack().await;
        got.push(m.payload[0]);
    }
    got.sort();
    assert_eq!(got, vec![0, 1, 2, 3, 4]);
}

/// A pod paused past the node timeout is taken for dead by the others;
/// when it runs again it announces its routes again and its subscribers
/// are reached once more.
#[tokio::test]
async fn a_pod_taken_for_dead_announces_itself_again() {
    let redis = RedisServer::start();
    let p = pods(&redis.url(), 2);
    let mut sub = Client::connect_ok(p[0].addr, Opts::v5("paused-sub")).await;
    sub.subscribe("p/#", QoS::AtMostOnce).await;
    let mut publisher = Client::connect_ok(p[1].addr, Opts::v5("pub")).await;
    until_routed(&mut publisher, &mut sub, "p/before").await;
    p[0].signal("STOP");
    // Node timeout 1 s; the survivor sweeps every second.
    tokio::time::sleep(Duration::from_millis(3000)).await;
    p[0].signal("CONT");
    until_routed(&mut publisher, &mut sub, "p/after").await;
    assert!(p[0].log().contains("taken for dead"), "{}", p[0].log());
}

mod bounds;
mod faults;
mod tracing;

/// A pod that joins gets its share: the pod holding every client sends the
/// excess over the mean away (0x9C, paced), the clients come back on the
/// new pod, and nobody is moved twice.
/// No pod rebalances while another drains: the drained clients are
/// arriving at the drain's rate, and moving others too would add to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_rebalance_while_a_pod_drains() {
    let r = RedisServer::start();
    let url = r.url();
    let cfg = "shutdown_timeout_secs: 30\ndrain: {connections_per_sec: 4}\nrebalance: {min_connection_age_secs: 0, interval_secs: 1, connections_per_sec: 100}\n";
    let args = ["--redis", url.as_str(), "--node-timeout-ms", "3000"];
    let mut draining = BrokerProcess::start_with_config(cfg, &args);
    let mut drained = Vec::new();
    for i in 0..40 {
        drained.push(Client::connect_ok(draining.addr, Opts::v5(&format!("g{i}"))).await);
    }
    // The drain takes 10 s (40 clients at 4/s).
    draining.signal("TERM");
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Meanwhile a pod with 40 clients and one with none: far out of
    // balance, and nothing moves until the drain is over.
    let a = BrokerProcess::start_with_config(cfg, &args);
    let _b = BrokerProcess::start_with_config(cfg, &args);
    let mut held = Vec::new();
    for i in 0..40 {
        held.push(Client::connect_ok(a.addr, Opts::v5(&format!("h{i}"))).await);
    }
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        a.metric("cirrus_rebalanced_connections_total"),
        0.0,
        "rebalanced during a drain"
    );
    let status = draining.wait_exit(Duration::from_secs(30)).expect("exited");
    assert!(status.success(), "{status:?}");
    // Then the rebalance goes on.
    let end = Instant::now() + Duration::from_secs(15);
    while a.metric("cirrus_rebalanced_connections_total") == 0.0 {
        assert!(Instant::now() < end, "no rebalance after the drain");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop((drained, held));
}

/// Two pods told to stop together (a scale-down) share the drain rate:
/// the pod that stays sees at most `connections_per_sec` clients a second
/// come over, not one rate per draining pod.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_draining_together_share_the_drain_rate() {
    let r = RedisServer::start();
    let url = r.url();
    let cfg = "shutdown_timeout_secs: 30\nshutdown_delay_secs: 1\ndrain: {connections_per_sec: 20}\nrebalance: {enabled: false}\n";
    let args = ["--redis", url.as_str(), "--node-timeout-ms", "3000"];
    let mut a = BrokerProcess::start_with_config(cfg, &args);
    let mut b = BrokerProcess::start_with_config(cfg, &args);
    let _stays = BrokerProcess::start_with_config(cfg, &args);
    const EACH: usize = 60;
    let mut clients = Vec::new();
    for (n, addr) in [(0, a.addr), (1, b.addr)] {
        for i in 0..EACH {
            let c = Client::connect_ok(addr, Opts::v5(&format!("d{n}-{i}")).persistent(600)).await;
            clients.push(c);
        }
    }
    a.signal("TERM");
    b.signal("TERM");
    let t0 = Instant::now();
    let mut times: Vec<Duration> =
        futures_util::future::join_all(clients.into_iter().map(|mut c| async move {
            loop {
                match c.next(Duration::from_secs(40)).await {
                    Next::Closed | Next::Timeout => return t0.elapsed(),
                    Next::Packet(_) => {}
                }
            }
        }))
        .await;
    times.sort();
    let spread = times[times.len() - 1] - times[0];
    let peak = cirrus_e2e::load::peak_per_second(&times);
    eprintln!(
        "{} clients of two draining pods sent away over {spread:?}, at most {peak} in one second",
        times.len()
    );
    // 120 at 20/s for the two together: about 6 s (40/s, 3 s, if each pod
    // used the whole rate); a step of timer slack.
    assert!(peak <= 24, "{peak} clients in one second");
    assert!(spread >= Duration::from_secs(5), "{spread:?}");
    for p in [&mut a, &mut b] {
        let status = p.wait_exit(Duration::from_secs(30)).expect("exited");
        assert!(status.success(), "{status:?}");
    }
}

/// A rollout (pods of two revisions): nobody rebalances although the new
/// pods hold nothing, and an old pod told to stop first sends no client
/// away before its old sibling is draining too (a client it sent away could
/// land there and have to move again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_rollout_an_old_pod_drains_with_its_old_siblings_and_nobody_rebalances() {
    let r = RedisServer::start();
    let url = r.url();
    let cfg = "shutdown_timeout_secs: 40\nshutdown_delay_secs: 1\ndrain: {connections_per_sec: 50}\nrebalance: {min_connection_age_secs: 1, interval_secs: 1, connections_per_sec: 50}\n";
    let on = |rev: &'static str| {
        BrokerProcess::start_with_config(
            cfg,
            &[
                "--redis",
                url.as_str(),
                "--node-timeout-ms",
                "3000",
                "--revision",
                rev,
            ],
        )
    };
    let mut old1 = on("a");
    let mut old2 = on("a");
    const EACH: usize = 20;
    let mut clients = Vec::new();
    for (n, addr) in [(1, old1.addr), (2, old2.addr)] {
        for i in 0..EACH {
            let c = Client::connect_ok(addr, Opts::v5(&format!("r{n}-{i}")).persistent(600)).await;
            clients.push((n, c));
        }
    }
    let _new = [on("b"), on("b")];
    let t0 = Instant::now();
    let closes = tokio::spawn(futures_util::future::join_all(clients.into_iter().map(
        |(n, mut c)| async move {
            loop {
                match c.next(Duration::from_secs(60)).await {
                    Next::Closed | Next::Timeout => return (n, t0.elapsed()),
                    Next::Packet(_) => {}
                }
            }
        },
    )));
    // The new pods hold nothing, the old ones 20 each: out of any band,
    // but a rollout is no time to rebalance.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(old1.metric("cirrus_rebalanced_connections_total"), 0.0);
    assert_eq!(old2.metric("cirrus_rebalanced_connections_total"), 0.0);
    old1.signal("TERM");
    tokio::time::sleep(Duration::from_secs(5)).await;
    let second = t0.elapsed();
    old2.signal("TERM");
    let closes = closes.await.unwrap();
    let first_of = |pod| {
        closes
            .iter()
            .filter(|(n, _)| *n == pod)
            .map(|(_, t)| *t)
            .min()
            .unwrap()
    };
    let (first1, first2) = (first_of(1), first_of(2));
    eprintln!(
        "old pods told to stop at 5 s and {second:?}; their first clients sent away at {first1:?} and {first2:?}"
    );
    // ... and was out of the Service (draining for the delay, 1 s here).
    assert!(
        first1 >= second + Duration::from_secs(1),
        "the first old pod drained at {first1:?}, before its sibling stopped serving at {second:?}"
    );
    for p in [&mut old1, &mut old2] {
        let status = p.wait_exit(Duration::from_secs(45)).expect("exited");
        assert!(status.success(), "{status:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_pod_gets_its_share_of_the_clients_and_nobody_moves_twice() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    let r = RedisServer::start();
    let url = r.url();
    let cfg = "rebalance: {min_connection_age_secs: 1, interval_secs: 1, connections_per_sec: 20}\ndrain: {reason: use_another_server}\n";
    let args = ["--redis", url.as_str(), "--node-timeout-ms", "1000"];
    let a = BrokerProcess::start_with_config(cfg, &args);
    const N: usize = 60;
    let mut clients = Vec::new();
    for i in 0..N {
        clients.push(Client::connect_ok(a.addr, Opts::v5(&format!("c{i}"))).await);
    }
    let b = BrokerProcess::start_with_config(cfg, &args);
    let t0 = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let moved = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, mut c)| {
            // Sent away, a client reconnects to the other pod (as a
            // Service would spread it).
            let (stop, moved, addrs) = (stop.clone(), moved.clone(), [a.addr, b.addr]);
            tokio::spawn(async move {
                let mut moves = 0;
                let mut on = 0;
                while !stop.load(Ordering::SeqCst) {
                    match c.next(Duration::from_millis(100)).await {
                        Next::Packet(Packet::Disconnect(d)) => {
                            assert_eq!(d.reason_code, reason::USE_ANOTHER_SERVER);
                        }
                        Next::Closed => {
                            moves += 1;
                            moved.fetch_add(1, Ordering::SeqCst);
                            on = 1 - on;
                            c = Client::connect_ok(addrs[on], Opts::v5(&format!("c{i}"))).await;
                        }
                        _ => {}
                    }
                }
                moves
            })
        })
        .collect();
    // Balanced: each pod within 20 % of the mean (30).
    let end = t0 + Duration::from_secs(30);
    let counts = loop {
        let counts = (
            a.metric("cirrus_connections"),
            b.metric("cirrus_connections"),
        );
        if (24.0..=36.0).contains(&counts.0) && (24.0..=36.0).contains(&counts.1) {
            break counts;
        }
        assert!(Instant::now() < end, "not balanced in 30 s: {counts:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let took = t0.elapsed();
    // A few more rounds: nothing else moves.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let settled = (
        a.metric("cirrus_connections"),
        b.metric("cirrus_connections"),
    );
    stop.store(true, Ordering::SeqCst);
    let mut most = 0;
    for t in tasks {
        most = most.max(t.await.unwrap());
    }
    let moved = moved.load(Ordering::SeqCst);
    eprintln!("balanced at {counts:?} in {took:?}; {moved} clients moved");
    assert!(most <= 1, "a client was moved {most} times");
    assert_eq!(
        a.metric("cirrus_rebalanced_connections_total"),
        moved as f64
    );
    assert_eq!(b.metric("cirrus_rebalanced_connections_total"), 0.0);
    assert!(moved <= N / 2, "{moved} moved for a share of {}", N / 2);
    assert_eq!(settled, ((N - moved) as f64, moved as f64));
}
