//! Graceful shutdown on SIGTERM and SIGINT.

use std::time::{Duration, Instant};

use cirrus_codec::{reason, Disconnect, Packet};
use cirrus_e2e::{BrokerProcess, Client, Next, Opts};

#[tokio::test]
async fn sigterm_disconnects_clients_and_exits() {
    let mut b = BrokerProcess::start(&[]);
    let mut v5 = Client::connect_ok(b.addr, Opts::v5("five")).await;
    let mut v3 = Client::connect_ok(b.addr, Opts::v311("three")).await;
    b.signal("TERM");
    assert_eq!(
        v5.expect_closed().await.unwrap().reason_code,
        reason::SERVER_SHUTTING_DOWN
    );
    assert!(v3.expect_closed().await.is_none());
    let status = b.wait_exit(Duration::from_secs(10)).expect("exited");
    assert!(status.success(), "{status:?}");
    assert!(b.log().contains("shut down cleanly"), "{}", b.log());
}

#[tokio::test]
async fn sigint_also_drains() {
    let mut b = BrokerProcess::start(&[]);
    let mut c = Client::connect_ok(b.addr, Opts::v5("c")).await;
    b.signal("INT");
    assert_eq!(
        c.expect_closed().await.unwrap().reason_code,
        reason::SERVER_SHUTTING_DOWN
    );
    assert!(b
        .wait_exit(Duration::from_secs(10))
        .expect("exited")
        .success());
}

/// With a shutdown delay, SIGTERM first makes `/readyz` say not ready while
/// clients are still served; the drain comes after the delay.
#[tokio::test]
async fn shutdown_delay_turns_not_ready_before_draining() {
    let mut b = BrokerProcess::start_with_config("shutdown_delay_secs: 2\n", &[]);
    let mut c = Client::connect_ok(b.addr, Opts::v5("early")).await;
    assert_eq!(b.http_get("/readyz").0, 200);
    b.signal("TERM");
    let t0 = std::time::Instant::now();
    let end = t0 + Duration::from_secs(1);
    while b.http_get("/readyz").0 != 503 {
        assert!(std::time::Instant::now() < end, "still ready after SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Still serving: a new client connects and the old one works.
    Client::connect_ok(b.addr, Opts::v5("late")).await;
    c.ping().await;
    assert_eq!(
        c.expect_closed().await.unwrap().reason_code,
        reason::SERVER_SHUTTING_DOWN
    );
    assert!(
        t0.elapsed() >= Duration::from_millis(1500),
        "drained before the delay"
    );
    assert!(b
        .wait_exit(Duration::from_secs(10))
        .expect("exited")
        .success());
}

/// When a pod's client sees its DISCONNECT (MQTT 5) or its socket close
/// (3.1.1), counted from `t0`.
async fn sent_away(mut c: Client, t0: Instant) -> (Duration, Option<Disconnect>) {
    loop {
        match c.next(Duration::from_secs(15)).await {
            Next::Packet(Packet::Disconnect(d)) => return (t0.elapsed(), Some(d)),
            Next::Closed => return (t0.elapsed(), None),
            Next::Packet(_) => {}
            Next::Timeout => panic!("not sent away within 15 s"),
        }
    }
}

/// A paced drain: the clients are sent away `connections_per_sec` at a
/// time, MQTT 5 clients with 0x9C "Use another server" and the Server
/// Reference, 3.1.1 clients by closing their socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paced_drain_sends_clients_away_at_the_configured_rate() {
    let mut b = BrokerProcess::start_with_config(
        "shutdown_timeout_secs: 20\ndrain: {connections_per_sec: 40, reason: use_another_server, server_reference: 'mqtt.example.net:1883'}\n",
        &[],
    );
    let addr = b.addr;
    let clients = futures_util::future::join_all((0..100).map(|i| async move {
        let o = if i % 5 == 0 {
            Opts::v311(&format!("three-{i}"))
        } else {
            Opts::v5(&format!("five-{i}"))
        };
        (i % 5 != 0, Client::connect_ok(addr, o).await)
    }))
    .await;
    b.signal("TERM");
    let t0 = Instant::now();
    let waits = clients.into_iter().map(|(v5, c)| async move {
        let (at, d) = sent_away(c, t0).await;
        (v5, at, d)
    });
    let results = futures_util::future::join_all(waits).await;
    let mut times = Vec::new();
    for (v5, at, d) in results {
        if v5 {
            let d = d.expect("an MQTT 5 client is told why");
            assert_eq!(d.reason_code, reason::USE_ANOTHER_SERVER);
            assert_eq!(
                d.properties.server_reference.as_deref(),
                Some("mqtt.example.net:1883")
            );
        } else {
            assert!(d.is_none(), "MQTT 3.1.1 has no DISCONNECT from the server");
        }
        times.push(at);
    }
    times.sort();
    let spread = times[times.len() - 1] - times[0];
    // The most clients sent away within any one second.
    let peak = cirrus_e2e::load::peak_per_second(&times);
    eprintln!("100 clients sent away over {spread:?}, at most {peak} in one second");
    // 100 at 40/s: about 2.5 s; ten steps of 4 a second (plus one step of
    // timer slack).
    assert!(spread >= Duration::from_millis(2000), "{spread:?}");
    assert!(peak <= 48, "{peak} clients in one second");
    let status = b.wait_exit(Duration::from_secs(20)).expect("exited");
    assert!(status.success(), "{status:?}");
    assert!(b.log().contains("draining"), "{}", b.log());
}
