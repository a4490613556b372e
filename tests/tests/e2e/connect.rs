//! CONNECT, CONNACK, keep-alive and takeover.

use std::time::{Duration, Instant};

use cirrus_codec::{reason, Packet, Protocol};
use cirrus_e2e::{redis_store_wanted, BrokerProcess, Client, Opts};

/// The suite runs on the store it was asked for (`CIRRUS_TEST_STORE`).
#[tokio::test]
async fn broker_runs_on_the_requested_store() {
    let b = BrokerProcess::start(&[]);
    let mut c = Client::connect_ok(b.addr, Opts::v311("store-check")).await;
    c.ping().await;
    assert_eq!(b.log().contains("state in Redis"), redis_store_wanted());
    assert_eq!(b.redis.is_some(), redis_store_wanted());
}

#[tokio::test]
async fn v311_connect_ping_disconnect() {
    let b = BrokerProcess::start(&[]);
    let (mut c, ack) = Client::connect(b.addr, Opts::v311("c1")).await;
    assert_eq!(ack.reason_code, 0);
    assert!(!ack.session_present);
    c.ping().await;
    c.disconnect().await;
}

#[tokio::test]
async fn v31_mqisdp_connects() {
    let b = BrokerProcess::start(&[]);
    let mut c = Client::connect_ok(b.addr, Opts::new(Protocol::V3_1, "old-client")).await;
    c.ping().await;
}

#[tokio::test]
async fn v5_connack_announces_limits_and_assigns_id() {
    let b = BrokerProcess::start(&["--receive-maximum", "7", "--max-packet-size", "5000"]);
    let (_c, ack) = Client::connect(b.addr, Opts::v5("")).await;
    assert_eq!(ack.reason_code, 0);
    let id = ack
        .properties
        .assigned_client_identifier
        .expect("assigned client id");
    assert!(!id.is_empty());
    assert_eq!(ack.properties.receive_maximum, Some(7));
    assert_eq!(ack.properties.maximum_packet_size, Some(5000));
    assert_eq!(ack.properties.topic_alias_maximum, Some(10));
    // Two clients without ids get different ones.
    let (_c2, ack2) = Client::connect(b.addr, Opts::v5("")).await;
    assert_ne!(ack2.properties.assigned_client_identifier, Some(id));
}

#[tokio::test]
async fn v311_empty_id_needs_clean_session() {
    let b = BrokerProcess::start(&[]);
    let (_c, ack) = Client::connect(b.addr, Opts::v311("")).await;
    assert_eq!(ack.reason_code, 0);
    let (mut c, ack) = Client::connect(b.addr, Opts::v311("").resume()).await;
    assert_eq!(ack.reason_code, reason::v3::IDENTIFIER_REJECTED);
    c.expect_closed().await;
}

#[tokio::test]
async fn an_old_protocol_level_gets_connack_0x01() {
    // Levels above 5: `edges::unsupported_protocol_levels_*` (0x84).
    let b = BrokerProcess::start(&[]);
    let mut c = Client::raw(b.addr, Protocol::V3_1_1).await;
    c.send_raw(&[
        0x10, 0x0C, 0, 4, b'M', b'Q', b'T', b'T', 2, 0x02, 0, 60, 0, 0,
    ])
    .await;
    match c.recv().await {
        Packet::ConnAck(a) => assert_eq!(a.reason_code, reason::v3::UNACCEPTABLE_PROTOCOL_VERSION),
        other => panic!("{other:?}"),
    }
    c.expect_closed().await;
}

#[tokio::test]
async fn first_packet_must_be_connect() {
    let b = BrokerProcess::start(&[]);
    let mut c = Client::raw(b.addr, Protocol::V3_1_1).await;
    c.send(Packet::PingReq).await;
    assert!(c.expect_closed().await.is_none());
}

#[tokio::test]
async fn second_connect_is_a_protocol_error() {
    let b = BrokerProcess::start(&[]);
    let mut c = Client::connect_ok(b.addr, Opts::v5("twice")).await;
    c.send_raw(&[
        0x10, 0x0D, 0, 4, b'M', b'Q', b'T', b'T', 5, 0x02, 0, 60, 0, 0, 0,
    ])
    .await;
    let d = c.expect_closed().await.expect("DISCONNECT");
    assert_eq!(d.reason_code, reason::PROTOCOL_ERROR);
}

#[tokio::test]
async fn enhanced_auth_is_refused_with_0x8c() {
    let b = BrokerProcess::start(&[]);
    let mut o = Opts::v5("auth");
    o.properties.authentication_method = Some("SCRAM-SHA-1".into());
    let (_c, ack) = Client::connect(b.addr, o).await;
    assert_eq!(ack.reason_code, reason::BAD_AUTHENTICATION_METHOD);
}

#[tokio::test]
async fn keep_alive_timeout_closes_with_0x8d() {
    let b = BrokerProcess::start(&[]);
    let mut o = Opts::v5("sleepy");
    o.keep_alive = 1;
    let mut c = Client::connect_ok(b.addr, o).await;
    let t = Instant::now();
    let d = c.expect_closed().await.expect("DISCONNECT");
    assert_eq!(d.reason_code, reason::KEEP_ALIVE_TIMEOUT);
    let waited = t.elapsed();
    // 1.5 × keep-alive ([MQTT-3.1.2-24]), with slack for a loaded machine.
    assert!(
        waited >= Duration::from_millis(1400) && waited < Duration::from_secs(4),
        "{waited:?}"
    );
}

#[tokio::test]
async fn keep_alive_is_kept_by_pings() {
    let b = BrokerProcess::start(&[]);
    let mut o = Opts::v311("pinger");
    o.keep_alive = 1;
    let mut c = Client::connect_ok(b.addr, o).await;
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        c.ping().await;
    }
}

#[tokio::test]
async fn server_keep_alive_caps_the_client() {
    let b = BrokerProcess::start(&["--max-keep-alive", "5"]);
    let (_c, ack) = Client::connect(b.addr, Opts::v5("ka")).await;
    assert_eq!(ack.properties.server_keep_alive, Some(5));
    let mut o = Opts::v5("ka0");
    o.keep_alive = 0;
    let (_c, ack) = Client::connect(b.addr, o).await;
    assert_eq!(ack.properties.server_keep_alive, Some(5));
}

#[tokio::test]
async fn session_takeover_closes_the_old_connection_with_0x8e() {
    let b = BrokerProcess::start(&[]);
    let mut old = Client::connect_ok(b.addr, Opts::v5("same-id")).await;
    let t = Instant::now();
    let mut new = Client::connect_ok(b.addr, Opts::v5("same-id")).await;
    let d = old.expect_closed().await.expect("DISCONNECT");
    assert_eq!(d.reason_code, reason::SESSION_TAKEN_OVER);
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    new.ping().await;
}

#[tokio::test]
async fn takeover_on_v311_closes_the_old_socket() {
    let b = BrokerProcess::start(&[]);
    let mut old = Client::connect_ok(b.addr, Opts::v311("same-311")).await;
    let mut new = Client::connect_ok(b.addr, Opts::v311("same-311")).await;
    assert!(old.expect_closed().await.is_none());
    new.ping().await;
}

#[tokio::test]
async fn connect_timeout_closes_silent_sockets() {
    let b = BrokerProcess::start_with_config("limits:\n  connect_timeout_secs: 1\n", &[]);
    let mut c = Client::raw(b.addr, Protocol::V3_1_1).await;
    let t = Instant::now();
    c.expect_closed().await;
    assert!(t.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn configuration_from_file_env_and_flags_in_that_order() {
    // File says 3000, environment 4000, flag 5000: the flag wins.
    let yaml = "limits:\n  max_packet_size: 3000\n  receive_maximum: 3\n";
    let b = BrokerProcess::start_with_config(yaml, &[]);
    let (_c, ack) = Client::connect(b.addr, Opts::v5("f")).await;
    assert_eq!(ack.properties.maximum_packet_size, Some(3000));
    assert_eq!(ack.properties.receive_maximum, Some(3));
    let b = BrokerProcess::start_with_env(&[], &[("CIRRUS_MAX_PACKET_SIZE", "4000")]);
    let (_c, ack) = Client::connect(b.addr, Opts::v5("e")).await;
    assert_eq!(ack.properties.maximum_packet_size, Some(4000));
    let b = BrokerProcess::start_with_env(
        &["--max-packet-size", "5000"],
        &[("CIRRUS_MAX_PACKET_SIZE", "4000")],
    );
    let (_c, ack) = Client::connect(b.addr, Opts::v5("a")).await;
    assert_eq!(ack.properties.maximum_packet_size, Some(5000));
}

#[test]
fn invalid_configuration_is_refused_at_start() {
    let out = std::process::Command::new(cirrus_e2e::broker_bin())
        .args(["--listen", "127.0.0.1:0", "--max-inflight", "0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("max_inflight"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
