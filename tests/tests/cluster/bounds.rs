//! Bounds of the Redis store: what a dead pod leaves in Redis, and what
//! idle sessions cost it.

use std::time::{Duration, Instant};

use cirrus_codec::QoS;
use cirrus_e2e::{BrokerProcess, Client, Opts};
use futures_util::StreamExt;

/// The node id a pod announced (`joined the cluster through Redis node=…`).
fn node_id(pod: &BrokerProcess) -> String {
    let log = pod.log();
    log.lines()
        .find_map(|l| {
            let rest = l.split("joined the cluster through Redis node=").nth(1)?;
            Some(
                rest.split_whitespace()
                    .next()?
                    .trim_matches('"')
                    .to_string(),
            )
        })
        .expect("the pod logged its node id")
}

/// Every key of a Redis server (a test's server holds a few hundred).
fn keys(port: u16) -> Vec<String> {
    let out = std::process::Command::new(cirrus_e2e::tool("redis-cli"))
        .args(["-p", &port.to_string(), "--scan"])
        .output()
        .expect("redis-cli --scan");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// `XINFO CONSUMERS` of the test's shared group, from whichever server
/// holds its stream.
fn consumers(ports: &[u16]) -> String {
    ports
        .iter()
        .map(|p| {
            let out = std::process::Command::new(cirrus_e2e::tool("redis-cli"))
                .args(["-p", &p.to_string()])
                .args([
                    "XINFO",
                    "CONSUMERS",
                    "cirrus:{g}:share:$share/g/jobs/#",
                    "cirrus",
                ])
                .output()
                .expect("redis-cli XINFO");
            String::from_utf8_lossy(&out.stdout).to_string()
        })
        .collect()
}

/// A SIGKILLed pod with subscribers, a shared group member and sessions:
/// once a survivor cleaned up, no key of that pod is left (its clean-up
/// lock expires by itself), on one Redis and on a Redis Cluster, where a
/// multi-key DEL across slots would fail.
async fn a_dead_pods_keys_are_removed(ports: &[u16], url: &str) {
    let a = BrokerProcess::start_on_redis(url, &[]);
    let b = BrokerProcess::start_on_redis(url, &[]);
    let dead = node_id(&a);
    let mut clients = Vec::new();
    for i in 0..10 {
        let mut c = Client::connect_ok(a.addr, Opts::v5(&format!("c{i}"))).await;
        c.subscribe(&format!("t/{i}/#"), QoS::AtLeastOnce).await;
        clients.push(c);
    }
    let mut m = Client::connect_ok(a.addr, Opts::v5("member")).await;
    m.subscribe("$share/g/jobs/#", QoS::AtLeastOnce).await;
    // The pod reads the group as a consumer of its own once an entry came
    // through it (a read that finds nothing names no consumer).
    let mut publisher = Client::connect_ok(b.addr, Opts::v5("pub")).await;
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        publisher
            .publish("jobs/x", b"job", QoS::AtLeastOnce, false)
            .await;
        if let cirrus_e2e::client::Next::Packet(cirrus_codec::Packet::Publish(p)) =
            m.next(Duration::from_millis(200)).await
        {
            m.ack(&p).await;
            break;
        }
        assert!(Instant::now() < end, "the group never delivered");
    }
    while !consumers(ports).contains(&dead) {
        assert!(Instant::now() < end, "the pod never joined the group");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before: Vec<String> = ports.iter().flat_map(|&p| keys(p)).collect();
    assert!(
        before.iter().any(|k| k.contains(&dead)),
        "the pod had keys: {before:?}"
    );
    a.signal("KILL");
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let left: Vec<String> = ports
            .iter()
            .flat_map(|&p| keys(p))
            .filter(|k| k.contains(&dead) && !k.contains(":lock:"))
            .collect();
        if left.is_empty() && b.log().contains("stopped sending heartbeats") {
            break;
        }
        assert!(Instant::now() < end, "keys of the dead pod left: {left:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Nor does it stay a consumer of the shared group.
    let text = consumers(ports);
    assert!(
        !text.contains(&dead),
        "the dead pod is still a consumer:\n{text}"
    );
    drop(clients);
}

#[tokio::test]
async fn a_dead_pods_keys_are_removed_single_redis() {
    let r = cirrus_e2e::RedisServer::start();
    a_dead_pods_keys_are_removed(&[r.port], &r.url()).await;
}

#[tokio::test]
async fn a_dead_pods_keys_are_removed_redis_cluster() {
    let r = cirrus_e2e::RedisCluster::start(3);
    let ports: Vec<u16> = r.nodes.iter().map(|n| n.port).collect();
    a_dead_pods_keys_are_removed(&ports, &r.url()).await;
}

/// 10,000 persistent sessions connected and idle: the pod's Redis commands
/// in three seconds are its own heartbeats and sweeps, whatever the number
/// of sessions (a poll per session would be 30,000 commands).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_persistent_sessions_cost_redis_nothing() {
    const SESSIONS: usize = 10_000;
    // One socket per session here, and one in the broker.
    rlimit::increase_nofile_limit(2 * SESSIONS as u64 + 1024).expect("raise the open-file limit");
    let r = cirrus_e2e::RedisServer::start();
    let pod = BrokerProcess::start_on_redis(&r.url(), &[]);
    let addr = pod.addr;
    let t0 = Instant::now();
    // 64 at a time: each one connects, subscribes and stays.
    let mut clients: Vec<(usize, Client)> = futures_util::stream::iter(0..SESSIONS)
        .map(|i| async move {
            let mut c =
                Client::connect_ok(addr, Opts::v5(&format!("idle{i}")).persistent(3600)).await;
            c.subscribe(&format!("idle/{i}"), QoS::AtLeastOnce).await;
            (i, c)
        })
        .buffer_unordered(64)
        .collect()
        .await;
    clients.sort_by_key(|(i, _)| *i);
    eprintln!("{SESSIONS} sessions connected in {:?}", t0.elapsed());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = pod.metric("cirrus_redis_commands_total");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let used = pod.metric("cirrus_redis_commands_total") - before;
    eprintln!("{SESSIONS} idle persistent sessions: {used} Redis commands in 3 s");
    assert!(
        used < 150.0,
        "{used} Redis commands in 3 s for idle sessions"
    );
    // They are not forgotten: a message still reaches one of them.
    let mut publisher = Client::connect_ok(pod.addr, Opts::v5("pub")).await;
    assert_eq!(
        publisher
            .publish("idle/7", b"hi", QoS::AtLeastOnce, false)
            .await,
        0
    );
    let m = clients[7].1.recv_ack().await;
    assert_eq!(&m.payload[..], b"hi");
}

/// 3,000 persistent sessions with a one-second expiry go offline at once:
/// they are all gone from Redis a few seconds after they expired (the
/// sweep takes them in pipelined batches, not a hundred a second).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_sessions_expire_at_thousands_a_second() {
    const N: usize = 3000;
    let r = cirrus_e2e::RedisServer::start();
    let pod = BrokerProcess::start_on_redis(&r.url(), &[]);
    let addr = pod.addr;
    let workers: Vec<_> = (0..30)
        .map(|w| {
            tokio::spawn(async move {
                for i in 0..N / 30 {
                    let mut c =
                        Client::connect_ok(addr, Opts::v5(&format!("exp-{w}-{i}")).persistent(1))
                            .await;
                    c.subscribe("exp/#", QoS::AtLeastOnce).await;
                    c.disconnect().await;
                }
            })
        })
        .collect();
    for w in workers {
        w.await.unwrap();
    }
    let all_offline = Instant::now();
    let count = |pattern: &str| {
        let out = std::process::Command::new(cirrus_e2e::tool("redis-cli"))
            .args(["-p", &r.port.to_string(), "--scan", "--pattern", pattern])
            .output()
            .expect("redis-cli --scan");
        String::from_utf8_lossy(&out.stdout).lines().count()
    };
    let end = all_offline + Duration::from_secs(8);
    loop {
        let left = count("cirrus:s:*");
        let card =
            cirrus_e2e::redis::command(r.port, "ZCARD cirrus:{g}:expiry").unwrap_or_default();
        if left == 0 && card.trim() == ":0" {
            break;
        }
        assert!(
            Instant::now() < end,
            "{left} sessions still in Redis {:?} after the last went offline",
            all_offline.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "{N} sessions expired and removed {:?} after the last went offline",
        all_offline.elapsed()
    );
}

/// One subscriber on pod B stops reading; another on the same pod reads.
/// 20,000 QoS 0 messages of 1 KB published on pod A all reach the reader,
/// quickly — the stalled one costs the pod's inbox reader one bounded wait,
/// not one per message — and pod B's memory stays bounded (the stalled
/// client's queue drops what does not fit, counted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_subscriber_slows_nobody_and_stays_bounded() {
    const N: u32 = 20_000;
    let r = cirrus_e2e::RedisServer::start();
    let a = BrokerProcess::start_on_redis(&r.url(), &[]);
    let b = BrokerProcess::start_on_redis(&r.url(), &[]);
    let mut stalled = Client::connect_ok(b.addr, Opts::v5("stalled")).await;
    stalled.subscribe("load/#", QoS::AtMostOnce).await;
    let mut reader = Client::connect_ok(b.addr, Opts::v5("reader")).await;
    reader.subscribe("load/#", QoS::AtMostOnce).await;
    let mut publisher = Client::connect_ok(a.addr, Opts::v5("pub")).await;
    // Routes reach pod A through the events stream.
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        publisher
            .publish("load/probe", b"p", QoS::AtMostOnce, false)
            .await;
        if let cirrus_e2e::client::Next::Packet(_) = reader.next(Duration::from_millis(50)).await {
            break;
        }
        assert!(Instant::now() < end, "never routed");
    }
    let rss0 = b.rss_kib();
    let t0 = Instant::now();
    let counter = tokio::spawn(async move {
        let mut got = std::collections::HashSet::new();
        let end = Instant::now() + Duration::from_secs(60);
        while got.len() < N as usize && Instant::now() < end {
            if let cirrus_e2e::client::Next::Packet(cirrus_codec::Packet::Publish(p)) =
                reader.next(Duration::from_secs(5)).await
            {
                if p.topic == "load/m" {
                    got.insert(u32::from_be_bytes(p.payload[..4].try_into().unwrap()));
                }
            }
        }
        (got.len(), Instant::now())
    });
    let mut payload = vec![b'.'; 1024];
    for seq in 0..N {
        payload[..4].copy_from_slice(&seq.to_be_bytes());
        publisher
            .publish("load/m", &payload, QoS::AtMostOnce, false)
            .await;
    }
    let (got, done) = counter.await.unwrap();
    let took = done.duration_since(t0);
    let grown_mib = b.rss_kib().saturating_sub(rss0) / 1024;
    eprintln!("reader got {got} of {N} in {took:?}; pod B grew {grown_mib} MiB");
    assert_eq!(got, N as usize, "the reading subscriber lost messages");
    assert!(
        took < Duration::from_secs(10),
        "the stalled subscriber slowed the other ({took:?})"
    );
    assert!(grown_mib < 64, "pod B grew {grown_mib} MiB");
    assert!(b.metric("cirrus_dropped_messages_total{reason=\"queue_full\"}") > 0.0);
    drop(stalled);
}

/// An offline persistent session's stream holds at most
/// `max_queued_messages` entries: publishes past it are dropped for that
/// session, and counted (`queue_full`), on one Redis and on a Redis Cluster.
async fn an_offline_sessions_stream_is_capped(ports: &[u16], url: &str) {
    const CAP: usize = 100;
    let pods: Vec<BrokerProcess> = (0..2)
        .map(|_| BrokerProcess::start_on_redis(url, &["--max-queued-messages", "100"]))
        .collect();
    let mut sub = Client::connect_ok(pods[1].addr, Opts::v5("capped").persistent(3600)).await;
    sub.subscribe("cap/#", QoS::AtLeastOnce).await;
    sub.disconnect().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut publisher = Client::connect_ok(pods[0].addr, Opts::v5("cap-pub")).await;
    for i in 0..5 * CAP {
        let code = publisher
            .publish("cap/x", format!("{i}").as_bytes(), QoS::AtLeastOnce, false)
            .await;
        assert_eq!(code, 0);
    }
    let len: usize = ports
        .iter()
        .find_map(|&p| {
            let r = cirrus_e2e::redis::command(p, "XLEN cirrus:q:{capped}")?;
            let n: usize = r.trim().trim_start_matches(':').parse().ok()?;
            (n > 0).then_some(n)
        })
        .expect("the session's stream");
    let dropped = pods[0].metric("cirrus_dropped_messages_total{reason=\"queue_full\"}");
    eprintln!("stream length {len}, {dropped} counted as dropped");
    assert_eq!(len, CAP);
    assert_eq!(dropped as usize, 4 * CAP);
    // What the stream holds is delivered: the first CAP messages.
    let mut sub =
        Client::connect_ok(pods[1].addr, Opts::v5("capped").persistent(3600).resume()).await;
    for i in 0..CAP {
        let m = sub.recv_ack().await;
        assert_eq!(m.payload, format!("{i}").as_bytes());
    }
}

#[tokio::test]
async fn an_offline_sessions_stream_is_capped_single_redis() {
    let r = cirrus_e2e::RedisServer::start();
    an_offline_sessions_stream_is_capped(&[r.port], &r.url()).await;
}

#[tokio::test]
async fn an_offline_sessions_stream_is_capped_redis_cluster() {
    let r = cirrus_e2e::RedisCluster::start(3);
    let ports: Vec<u16> = r.nodes.iter().map(|n| n.port).collect();
    an_offline_sessions_stream_is_capped(&ports, &r.url()).await;
}

/// A pod that stops reading (SIGSTOP, shorter than the node timeout) while
/// another sends it 2,000 inbox entries: its inbox stays at the cap
/// (`redis.inbox_max_entries` 200), and once it reads again it counts what
/// the cap took (`cirrus_redis_inbox_cut_entries_total`) and delivers the
/// rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_pods_inbox_is_capped_and_the_cut_counted() {
    const SENT: usize = 2000;
    let r = cirrus_e2e::RedisServer::start();
    let url = r.url();
    // The cap is applied by the writing pod: every pod has the same.
    let pod = || {
        BrokerProcess::start_with_config(
            "redis: {inbox_max_entries: 200}",
            &["--redis", &url, "--node-timeout-ms", "20000"],
        )
    };
    let a = pod();
    let b = pod();
    let mut sub = Client::connect_ok(b.addr, Opts::v5("cut-sub")).await;
    sub.subscribe("cut/#", QoS::AtMostOnce).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    b.signal("STOP");
    // One at a time: each publish is a pipeline of its own, so one inbox
    // entry each.
    let mut publisher = Client::connect_ok(a.addr, Opts::v5("cut-pub")).await;
    for i in 0..SENT {
        let code = publisher
            .publish("cut/x", format!("{i}").as_bytes(), QoS::AtLeastOnce, false)
            .await;
        assert_eq!(code, 0);
    }
    let len: usize =
        cirrus_e2e::redis::command(r.port, &format!("XLEN cirrus:inbox:{{{}}}", node_id(&b)))
            .and_then(|v| v.trim().trim_start_matches(':').parse().ok())
            .expect("XLEN of the inbox");
    eprintln!("inbox length while stopped: {len}");
    assert!(len < 400, "the inbox grew to {len} entries");
    b.signal("CONT");
    let mut received = 0usize;
    let end = Instant::now() + Duration::from_secs(20);
    while Instant::now() < end {
        match sub.next(Duration::from_millis(500)).await {
            cirrus_e2e::Next::Packet(cirrus_codec::Packet::Publish(_)) => received += 1,
            cirrus_e2e::Next::Packet(_) => {}
            _ => {
                if received > 0 {
                    break;
                }
            }
        }
    }
    let cut = b.metric("cirrus_redis_inbox_cut_entries_total") as usize;
    eprintln!("{received} received, {cut} counted as cut by the cap, of {SENT}");
    assert!(received > 0, "the entries under the cap were delivered");
    // Each publish waited for its PUBACK, so each entry holds one message:
    // what was delivered and what was counted as cut add up to what was
    // sent (give or take an entry read between the two observations).
    assert!(received + cut >= SENT - 10, "{cut} counted as cut");
    assert!(received + cut <= SENT, "counted more than was cut");
}

/// A shared group's stream is trimmed to what the group has not yet
/// finished with: never past an entry a member's client holds
/// unacknowledged, and down to (about) nothing once all are acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_groups_stream_is_trimmed_to_what_is_unacknowledged() {
    const SENT: usize = 500;
    const KEY: &str = "cirrus:{g}:share:$share/g/trim/#";
    let r = cirrus_e2e::RedisServer::start();
    let a = BrokerProcess::start_on_redis(&r.url(), &[]);
    let b = BrokerProcess::start_on_redis(&r.url(), &[]);
    let mut member = Client::connect_ok(b.addr, Opts::v5("trim-member")).await;
    member.subscribe("$share/g/trim/#", QoS::AtLeastOnce).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut publisher = Client::connect_ok(a.addr, Opts::v5("trim-pub")).await;
    for i in 0..SENT {
        let code = publisher
            .publish("trim/x", format!("{i}").as_bytes(), QoS::AtLeastOnce, false)
            .await;
        assert_eq!(code, 0);
    }
    let xlen = || -> usize {
        cirrus_e2e::redis::command(r.port, &format!("XLEN {KEY}"))
            .and_then(|v| v.trim().trim_start_matches(':').parse().ok())
            .expect("XLEN of the share stream")
    };
    // Half acknowledged, the rest held: whatever reaches the client of the
    // second half stays unacknowledged.
    let mut acked = 0usize;
    let mut held = Vec::new();
    loop {
        match member.next(Duration::from_secs(2)).await {
            cirrus_e2e::Next::Packet(cirrus_codec::Packet::Publish(p)) => {
                if acked < SENT / 2 {
                    member.ack(&p).await;
                    acked += 1;
                } else {
                    held.push(p);
                }
            }
            cirrus_e2e::Next::Packet(_) => {}
            _ => break,
        }
    }
    assert_eq!(acked, SENT / 2, "the member got the first half");
    assert!(!held.is_empty(), "the member holds some of the second half");
    // The pod trims every 2 s while it reads the group.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let while_held = xlen();
    eprintln!(
        "{} held unacknowledged; stream length {while_held}",
        held.len()
    );
    assert!(
        while_held >= SENT - acked,
        "trimmed past unacknowledged entries: {while_held} left"
    );
    assert!(
        while_held <= SENT - acked + 1,
        "not trimmed: {while_held} left"
    );
    for p in &held {
        member.ack(p).await;
        acked += 1;
    }
    let end = Instant::now() + Duration::from_secs(20);
    while acked < SENT && Instant::now() < end {
        if let cirrus_e2e::Next::Packet(cirrus_codec::Packet::Publish(p)) =
            member.next(Duration::from_millis(500)).await
        {
            member.ack(&p).await;
            acked += 1;
        }
    }
    assert_eq!(acked, SENT, "every entry delivered");
    let end = Instant::now() + Duration::from_secs(10);
    let mut left = xlen();
    while left > 1 && Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(250)).await;
        left = xlen();
    }
    eprintln!("all acknowledged; stream length {left}");
    assert!(left <= 1, "{left} entries left after all were acknowledged");
}
