//! Persistent sessions: queued and in-flight messages across reconnects,
//! session expiry, wills.

use std::time::Duration;

use cirrus_codec::{reason, Bytes, Disconnect, LastWill, Packet, Properties, QoS};
use cirrus_e2e::{BrokerProcess, Client, Opts};

#[tokio::test]
async fn v311_persistent_session_queues_qos1_and_drops_qos0() {
    let b = BrokerProcess::start(&[]);
    let mut sub = Client::connect_ok(b.addr, Opts::v311("keeper").resume()).await;
    sub.subscribe("q/#", QoS::AtLeastOnce).await;
    sub.disconnect().await;
    let mut p = Client::connect_ok(b.addr, Opts::v311("pub")).await;
    p.publish("q/0", b"zero", QoS::AtMostOnce, false).await;
    for i in 0..3u8 {
        p.publish("q/1", &[i], QoS::AtLeastOnce, false).await;
    }
    let (mut sub, ack) = Client::connect(b.addr, Opts::v311("keeper").resume()).await;
    assert!(ack.session_present);
    for i in 0..3u8 {
        let m = sub.recv_ack().await;
        assert_eq!((&m.topic[..], &m.payload[..]), ("q/1", &[i][..]));
    }
    sub.expect_nothing(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn unacknowledged_messages_are_resent_with_dup_after_reconnect() {
    let b = BrokerProcess::start(&[]);
    let mut sub = Client::connect_ok(b.addr, Opts::v5("redeliver").persistent(300)).await;
    sub.subscribe("r1", QoS::AtLeastOnce).await;
    sub.subscribe("r2", QoS::ExactlyOnce).await;
    let mut p = Client::connect_ok(b.addr, Opts::v5("p")).await;
    p.publish("r1", b"one", QoS::AtLeastOnce, false).await;
    p.publish("r2", b"two", QoS::ExactlyOnce, false).await;
    let m1 = sub.recv_publish().await;
    let m2 = sub.recv_publish().await;
    assert!(!m1.dup && !m2.dup);
    sub.drop_connection();
    let (mut sub, ack) = Client::connect(b.addr, Opts::v5("redeliver").persistent(300)).await;
    assert!(ack.session_present);
    let r1 = sub.recv_publish().await;
    let r2 = sub.recv_publish().await;
    assert!(r1.dup && r2.dup);
    assert_eq!((r1.packet_id, &r1.payload[..]), (m1.packet_id, &b"one"[..]));
    assert_eq!((r2.packet_id, &r2.payload[..]), (m2.packet_id, &b"two"[..]));
    sub.ack(&r1).await;
    // QoS 2: PUBREC, then a reconnect must resend PUBREL, not the message.
    sub.send(Packet::PubRec(cirrus_codec::PubResp::new(
        r2.packet_id.unwrap(),
        0,
    )))
    .await;
    assert!(matches!(sub.recv().await, Packet::PubRel(_)));
    sub.drop_connection();
    let (mut sub, _) = Client::connect(b.addr, Opts::v5("redeliver").persistent(300)).await;
    match sub.recv().await {
        Packet::PubRel(r) => {
            assert_eq!(Some(r.packet_id), r2.packet_id);
            sub.send(Packet::PubComp(cirrus_codec::PubResp::new(r.packet_id, 0)))
                .await;
        }
        other => panic!("expected PUBREL, got {other:?}"),
    }
    sub.expect_nothing(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn clean_start_discards_the_old_session() {
    let b = BrokerProcess::start(&[]);
    let mut sub = Client::connect_ok(b.addr, Opts::v5("cs").persistent(300)).await;
    sub.subscribe("cs", QoS::AtLeastOnce).await;
    sub.disconnect().await;
    let (mut sub, ack) = Client::connect(b.addr, Opts::v5("cs")).await;
    assert!(!ack.session_present);
    let mut p = Client::connect_ok(b.addr, Opts::v5("p")).await;
    assert_eq!(
        p.publish("cs", b"x", QoS::AtLeastOnce, false).await,
        reason::NO_MATCHING_SUBSCRIBERS
    );
    sub.expect_nothing(Duration::from_millis(200)).await;
}

#[tokio::test]
async fn session_expires_after_its_interval() {
    let b = BrokerProcess::start(&[]);
    let sub = Client::connect_ok(b.addr, Opts::v5("short").persistent(1)).await;
    sub.disconnect().await;
    let (_c, ack) = Client::connect(b.addr, Opts::v5("short").persistent(1)).await;
    assert!(
        ack.session_present,
        "within the interval the session is there"
    );
    _c.disconnect().await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (_c, ack) = Client::connect(b.addr, Opts::v5("short").persistent(1)).await;
    assert!(!ack.session_present, "after the interval it is gone");
}

#[tokio::test]
async fn disconnect_may_not_raise_expiry_from_zero() {
    let b = BrokerProcess::start(&[]);
    let mut c = Client::connect_ok(b.addr, Opts::v5("zero")).await;
    let mut properties = Properties::default();
    properties.session_expiry_interval = Some(60);
    c.send(Packet::Disconnect(Disconnect {
        reason_code: 0,
        properties,
    }))
    .await;
    let d = c.expect_closed().await.expect("DISCONNECT");
    assert_eq!(d.reason_code, reason::PROTOCOL_ERROR);
}

fn will(topic: &str, delay: Option<u32>) -> LastWill {
    let mut properties = Properties::default();
    properties.will_delay_interval = delay;
    LastWill {
        topic: topic.into(),
        payload: Bytes::from_static(b"gone"),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties,
    }
}

#[tokio::test]
async fn will_is_published_on_abnormal_close_only() {
    let b = BrokerProcess::start(&[]);
    let mut watcher = Client::connect_ok(b.addr, Opts::v5("watcher")).await;
    watcher.subscribe("wills/#", QoS::AtLeastOnce).await;

    // Normal DISCONNECT: no will.
    let mut o = Opts::v5("polite");
    o.will = Some(will("wills/polite", None));
    Client::connect_ok(b.addr, o).await.disconnect().await;
    watcher.expect_nothing(Duration::from_millis(300)).await;

    // Socket dropped: will.
    let mut o = Opts::v311("rude");
    o.will = Some(will("wills/rude", None));
    Client::connect_ok(b.addr, o).await.drop_connection();
    let m = watcher.recv_ack().await;
    assert_eq!((&m.topic[..], &m.payload[..]), ("wills/rude", &b"gone"[..]));

    // DISCONNECT 0x04: will.
    let mut o = Opts::v5("asks");
    o.will = Some(will("wills/asks", None));
    let mut c = Client::connect_ok(b.addr, o).await;
    c.send(Packet::Disconnect(Disconnect {
        reason_code: reason::DISCONNECT_WITH_WILL,
        properties: Properties::default(),
    }))
    .await;
    let m = watcher.recv_ack().await;
    assert_eq!(&m.topic[..], "wills/asks");
}

#[tokio::test]
async fn will_delay_is_cancelled_by_a_timely_reconnect() {
    let b = BrokerProcess::start(&[]);
    let mut watcher = Client::connect_ok(b.addr, Opts::v5("watcher")).await;
    watcher.subscribe("wd/#", QoS::AtLeastOnce).await;

    let mut o = Opts::v5("delayed").persistent(60);
    o.will = Some(will("wd/delayed", Some(1)));
    Client::connect_ok(b.addr, o.clone())
        .await
        .drop_connection();
    // Back within the delay: no will.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let c = Client::connect_ok(b.addr, Opts::v5("delayed").persistent(60)).await;
    watcher.expect_nothing(Duration::from_millis(1500)).await;
    c.disconnect().await;

    // Not back: the will comes after the delay.
    Client::connect_ok(b.addr, o).await.drop_connection();
    watcher.expect_nothing(Duration::from_millis(500)).await;
    let m = watcher.recv_ack().await;
    assert_eq!(&m.topic[..], "wd/delayed");
}

#[tokio::test]
async fn queue_bound_drops_and_counts() {
    let b = BrokerProcess::start(&["--max-queued-messages", "5"]);
    let mut sub = Client::connect_ok(b.addr, Opts::v5("bounded").persistent(300)).await;
    sub.subscribe("b", QoS::AtLeastOnce).await;
    sub.disconnect().await;
    let mut p = Client::connect_ok(b.addr, Opts::v5("p")).await;
    for i in 0..10u8 {
        p.publish("b", &[i], QoS::AtLeastOnce, false).await;
    }
    let mut sub = Client::connect_ok(b.addr, Opts::v5("bounded").persistent(300)).await;
    for i in 0..5u8 {
        assert_eq!(sub.recv_ack().await.payload[0], i);
    }
    sub.expect_nothing(Duration::from_millis(300)).await;
    // The drops are counted in $SYS.
    let b2 = BrokerProcess::start(&["--max-queued-messages", "1", "--sys-interval", "1"]);
    let mut s = Client::connect_ok(b2.addr, Opts::v5("b").persistent(60)).await;
    s.subscribe("x", QoS::AtLeastOnce).await;
    s.disconnect().await;
    let mut p = Client::connect_ok(b2.addr, Opts::v5("p")).await;
    for _ in 0..4 {
        p.publish("x", b"1", QoS::AtLeastOnce, false).await;
    }
    let mut w = Client::connect_ok(b2.addr, Opts::v5("w")).await;
    w.subscribe("$SYS/broker/publish/messages/dropped", QoS::AtMostOnce)
        .await;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let m = w.recv_publish().await;
        if &m.payload[..] == b"3" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "dropped counter never reached 3"
        );
    }
}
