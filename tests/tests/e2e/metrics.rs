//! The admin port: probes and `/metrics` after real traffic.

use cirrus_codec::{Protocol, QoS};
use cirrus_e2e::{BrokerProcess, Client, Opts};

#[tokio::test]
async fn probes_answer() {
    let b = BrokerProcess::start(&[]);
    assert_eq!(b.http_get("/healthz").0, 200);
    assert_eq!(b.http_get("/readyz").0, 200);
    assert_eq!(b.http_get("/nothing").0, 404);
}

#[tokio::test]
async fn counters_move_by_what_clients_did() {
    let b = BrokerProcess::start(&[]);
    let mut sub = Client::connect_ok(b.addr, Opts::v5("sub")).await;
    sub.subscribe("m/#", QoS::AtLeastOnce).await;
    let mut publisher = Client::connect_ok(b.addr, Opts::v311("pub")).await;
    for _ in 0..5 {
        publisher
            .publish("m/a", b"0123456789", QoS::AtLeastOnce, false)
            .await;
    }
    for _ in 0..3 {
        publisher
            .publish("m/b", b"xyz", QoS::AtMostOnce, false)
            .await;
    }
    for _ in 0..8 {
        sub.recv_ack().await;
    }
    // A refused connection (3.1.1, no client id, persistent session) and a
    // malformed packet.
    let (_c, ack) = Client::connect(b.addr, {
        let mut o = Opts::new(Protocol::V3_1_1, "");
        o.clean_start = false;
        o
    })
    .await;
    assert_ne!(ack.reason_code, 0);
    let mut bad = Client::connect_ok(b.addr, Opts::v311("bad")).await;
    bad.send_raw(&[0xF0, 0x00]).await;
    bad.expect_closed().await;

    assert_eq!(b.metric("cirrus_connections"), 2.0);
    assert_eq!(b.metric("cirrus_connections_total"), 3.0);
    assert_eq!(
        b.metric("cirrus_connections_refused_total{reason=\"protocol\"}"),
        1.0
    );
    assert_eq!(b.metric("cirrus_publish_received_total{qos=\"1\"}"), 5.0);
    assert_eq!(b.metric("cirrus_publish_received_total{qos=\"0\"}"), 3.0);
    assert_eq!(
        b.metric("cirrus_publish_received_bytes_total{qos=\"1\"}"),
        50.0
    );
    assert_eq!(b.metric("cirrus_publish_sent_total{qos=\"1\"}"), 5.0);
    assert_eq!(b.metric("cirrus_publish_sent_total{qos=\"0\"}"), 3.0);
    assert_eq!(b.metric("cirrus_publish_sent_bytes_total{qos=\"0\"}"), 9.0);
    assert_eq!(b.metric("cirrus_delivery_latency_seconds_count"), 8.0);
    assert_eq!(
        b.metric("cirrus_delivery_latency_seconds_bucket{le=\"+Inf\"}"),
        8.0
    );
    assert_eq!(b.metric("cirrus_decode_errors_total"), 1.0);
    assert_eq!(b.metric("cirrus_subscriptions"), 1.0);
    assert_eq!(b.metric("cirrus_sessions_online"), 2.0);
    assert_eq!(b.metric("cirrus_inflight_messages"), 0.0);
}
