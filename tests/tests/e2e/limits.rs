//! Bad input and overload: a clear reason code or a closed socket for the
//! offender, nothing for everyone else, and bounded memory.

use std::time::Duration;

use cirrus_codec::{reason, Packet, Protocol, QoS};
use cirrus_e2e::client::publish_packet;
use cirrus_e2e::{BrokerProcess, Client, Opts};

#[tokio::test]
async fn oversized_packet_is_refused_from_its_header() {
    let b = BrokerProcess::start(&["--max-packet-size", "1024"]);
    let mut bystander = Client::connect_ok(b.addr, Opts::v311("bystander")).await;
    let mut c = Client::connect_ok(b.addr, Opts::v5("big")).await;
    // Only the fixed header of a 200 MB PUBLISH: refused before any body.
    c.send_raw(&[0x30, 0x80, 0x80, 0x80, 0x64]).await;
    assert_eq!(
        c.expect_closed().await.unwrap().reason_code,
        reason::PACKET_TOO_LARGE
    );
    let mut c = Client::connect_ok(b.addr, Opts::v5("big2")).await;
    c.send(Packet::Publish(publish_packet(
        "t",
        &[0u8; 2000],
        QoS::AtMostOnce,
        false,
        None,
    )))
    .await;
    assert_eq!(
        c.expect_closed().await.unwrap().reason_code,
        reason::PACKET_TOO_LARGE
    );
    bystander.ping().await;
}

#[tokio::test]
async fn malformed_packets_close_only_their_connection() {
    let b = BrokerProcess::start(&[]);
    let mut bystander = Client::connect_ok(b.addr, Opts::v5("bystander")).await;
    // (bytes, malformed only under MQTT 5)
    let cases: &[(&[u8], bool)] = &[
        (&[0x36, 0x05, 0, 1, b'a', 0, 1], false),       // QoS 3
        (&[0x30, 0x04, 0, 2, 0xC3, 0x28], false),       // invalid UTF-8 topic
        (&[0x80, 0x06, 0, 1, 0, 1, b'a', 0], false),    // SUBSCRIBE with wrong flags
        (&[0x30, 0x05, 0, 1, b'a', 9, 0x01], true),     // properties longer than packet
        (&[0x00, 0x00], false),                         // reserved packet type
        (&[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F], false), // five-byte remaining length
    ];
    for (i, &(bytes, v5_only)) in cases.iter().enumerate() {
        let mut c = Client::connect_ok(b.addr, Opts::v5(&format!("bad{i}"))).await;
        c.send_raw(bytes).await;
        let d = c.expect_closed().await.expect("DISCONNECT");
        assert!(
            d.reason_code == reason::MALFORMED_PACKET
                || d.reason_code == reason::PROTOCOL_ERROR
                || d.reason_code == reason::PACKET_TOO_LARGE,
            "case {i}: {d:?}"
        );
        if v5_only {
            continue;
        }
        let mut c = Client::connect_ok(b.addr, Opts::v311(&format!("bad3-{i}"))).await;
        c.send_raw(bytes).await;
        assert!(
            c.expect_closed().await.is_none(),
            "3.1.1 gets no DISCONNECT"
        );
    }
    bystander.ping().await;
}

#[tokio::test]
async fn garbage_from_many_sockets_does_not_hurt() {
    let b = BrokerProcess::start(&[]);
    let mut seed = 0x1234_5678_9abc_def0u64;
    let mut tasks = Vec::new();
    for i in 0..40 {
        let mut bytes = vec![0u8; 16 * 1024];
        for x in bytes.iter_mut() {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            *x = seed as u8;
        }
        // Half of them after a valid CONNECT, half raw.
        let addr = b.addr;
        tasks.push(tokio::spawn(async move {
            let mut c = if i % 2 == 0 {
                Client::connect_ok(addr, Opts::v5(&format!("g{i}"))).await
            } else {
                Client::raw(addr, Protocol::V3_1_1).await
            };
            c.send_raw(&bytes).await;
            let _ = c.next(Duration::from_secs(5)).await;
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mut c = Client::connect_ok(b.addr, Opts::v5("after")).await;
    c.subscribe("still/works", QoS::AtLeastOnce).await;
    c.publish("still/works", b"yes", QoS::AtLeastOnce, false)
        .await;
    assert_eq!(&c.recv_ack().await.payload[..], b"yes");
}

#[tokio::test]
async fn slow_subscriber_cannot_grow_memory() {
    let b = BrokerProcess::start(&["--max-queued-messages", "100", "--sys-interval", "1"]);
    // Subscribes, then never reads its socket.
    let mut stuck = Client::connect_ok(b.addr, Opts::v311("stuck")).await;
    stuck.subscribe("flood", QoS::AtMostOnce).await;
    let base = b.rss_kib();
    let mut p = Client::connect_ok(b.addr, Opts::v311("flooder")).await;
    let payload = vec![0x55u8; 4096];
    // 200 MB offered to a client that reads nothing, bounded in count.
    for i in 0..50_000u32 {
        p.send(Packet::Publish(publish_packet(
            "flood",
            &payload,
            QoS::AtMostOnce,
            false,
            None,
        )))
        .await;
        if i % 5000 == 0 {
            p.ping().await;
        }
    }
    p.ping().await;
    let grown = b.rss_kib().saturating_sub(base);
    // Queue (100 × 4 KiB) plus buffers; 200 MB unbounded would show.
    assert!(grown < 64 * 1024, "broker grew by {grown} KiB");
    let mut w = Client::connect_ok(b.addr, Opts::v311("w")).await;
    w.subscribe("$SYS/broker/publish/messages/dropped", QoS::AtMostOnce)
        .await;
    let dropped: u64 = loop {
        let m = w.recv_publish().await;
        let v: u64 = std::str::from_utf8(&m.payload).unwrap().parse().unwrap();
        if v > 0 {
            break v;
        }
    };
    assert!(dropped > 10_000, "drops are counted: {dropped}");
    assert!(
        b.metric("cirrus_dropped_messages_total{reason=\"queue_full\"}") > 10_000.0,
        "and exported"
    );
    // Logged, but rate limited: thousands of drops, a line or two.
    let lines = b
        .log()
        .lines()
        .filter(|l| l.contains("messages dropped") && l.contains("queue_full"))
        .count();
    assert!((1..=3).contains(&lines), "{lines} log lines for the drops");
    drop(stuck);
}

#[tokio::test]
async fn connection_limit_answers_server_busy() {
    let b = BrokerProcess::start(&["--max-connections", "2"]);
    let _a = Client::connect_ok(b.addr, Opts::v5("a")).await;
    let _b = Client::connect_ok(b.addr, Opts::v311("b")).await;
    let (_c, ack) = Client::connect(b.addr, Opts::v5("c")).await;
    assert_eq!(ack.reason_code, reason::SERVER_BUSY);
    let (_c, ack) = Client::connect(b.addr, Opts::v311("d")).await;
    assert_eq!(ack.reason_code, reason::v3::SERVER_UNAVAILABLE);
    drop(_a);
    tokio::time::sleep(Duration::from_millis(300)).await;
    Client::connect_ok(b.addr, Opts::v5("e")).await.ping().await;
}

#[tokio::test]
async fn publish_rate_limit_slows_a_client_without_losing_messages() {
    let b = BrokerProcess::start_with_config("limits:\n  max_publish_rate: 100\n", &[]);
    let mut sub = Client::connect_ok(b.addr, Opts::v5("rate-sub")).await;
    sub.subscribe("rate", QoS::AtMostOnce).await;
    let mut p = Client::connect_ok(b.addr, Opts::v5("rate-pub")).await;
    let t = std::time::Instant::now();
    // 100 burst + 150 more at 100/s: at least ~1.5 s.
    for i in 0..250u32 {
        p.send(Packet::Publish(publish_packet(
            "rate",
            &i.to_be_bytes(),
            QoS::AtMostOnce,
            false,
            None,
        )))
        .await;
    }
    for i in 0..250u32 {
        let m = sub.recv_publish().await;
        assert_eq!(m.payload[..], i.to_be_bytes()[..]);
    }
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(1300),
        "not throttled: {took:?}"
    );
    assert!(took < Duration::from_secs(6), "{took:?}");
    p.ping().await;
}

#[tokio::test]
async fn connection_rate_limit_answers_0x9f() {
    let b = BrokerProcess::start_with_config("limits:\n  max_connection_rate: 5\n", &[]);
    let mut codes = Vec::new();
    for i in 0..15 {
        let (_c, ack) = Client::connect(b.addr, Opts::v5(&format!("burst{i}"))).await;
        codes.push(ack.reason_code);
    }
    let accepted = codes.iter().filter(|&&c| c == 0).count();
    let limited = codes
        .iter()
        .filter(|&&c| c == reason::CONNECTION_RATE_EXCEEDED)
        .count();
    assert!((5..=8).contains(&accepted), "{codes:?}");
    assert_eq!(accepted + limited, 15, "{codes:?}");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    Client::connect_ok(b.addr, Opts::v5("later"))
        .await
        .ping()
        .await;
}
