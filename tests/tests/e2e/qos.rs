//! QoS 0/1/2 in both directions, in-flight windows, Receive Maximum.

use std::time::Duration;

use cirrus_codec::{reason, Packet, PubResp, QoS};
use cirrus_e2e::client::{pid, publish_packet};
use cirrus_e2e::{BrokerProcess, Client, Opts};

#[tokio::test]
async fn each_qos_both_directions_and_downgrade() {
    let b = BrokerProcess::start(&[]);
    for (proto, name) in [(Opts::v311 as fn(&str) -> Opts, "v311"), (Opts::v5, "v5")] {
        let mut sub = Client::connect_ok(b.addr, proto(&format!("sub-{name}"))).await;
        let mut publ = Client::connect_ok(b.addr, proto(&format!("pub-{name}"))).await;
        assert_eq!(
            sub.subscribe(&format!("{name}/q2/#"), QoS::ExactlyOnce)
                .await,
            2
        );
        assert_eq!(
            sub.subscribe(&format!("{name}/q1/#"), QoS::AtLeastOnce)
                .await,
            1
        );
        for pub_qos in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
            for (filter_qos, prefix) in [(QoS::ExactlyOnce, "q2"), (QoS::AtLeastOnce, "q1")] {
                let topic = format!("{name}/{prefix}/{}", pub_qos.as_u8());
                publ.publish(&topic, b"payload", pub_qos, false).await;
                let p = sub.recv_ack().await;
                assert_eq!(&p.topic[..], topic);
                assert_eq!(&p.payload[..], b"payload");
                assert_eq!(p.qos, pub_qos.min(filter_qos), "{topic}");
                assert!(!p.retain && !p.dup);
            }
        }
        sub.expect_nothing(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn qos2_resend_before_pubrel_is_delivered_once() {
    let b = BrokerProcess::start(&[]);
    let mut sub = Client::connect_ok(b.addr, Opts::v5("s")).await;
    sub.subscribe("once", QoS::ExactlyOnce).await;
    let mut p = Client::connect_ok(b.addr, Opts::v5("p")).await;
    let mut msg = publish_packet("once", b"x", QoS::ExactlyOnce, false, Some(9));
    p.send(Packet::Publish(msg.clone())).await;
    assert!(matches!(p.recv().await, Packet::PubRec(r) if r.packet_id == pid(9)));
    msg.dup = true;
    p.send(Packet::Publish(msg)).await;
    assert!(matches!(p.recv().await, Packet::PubRec(r) if r.packet_id == pid(9)));
    p.send(Packet::PubRel(PubResp::new(pid(9), 0))).await;
    assert!(matches!(p.recv().await, Packet::PubComp(r) if r.packet_id == pid(9)));
    sub.recv_ack().await;
    sub.expect_nothing(Duration::from_millis(300)).await;
    // PUBREL for an unknown id is answered 0x92.
    p.send(Packet::PubRel(PubResp::new(pid(77), 0))).await;
    assert!(
        matches!(p.recv().await, Packet::PubComp(r) if r.reason_code == reason::PACKET_IDENTIFIER_NOT_FOUND)
    );
}

#[tokio::test]
async fn receive_maximum_exceeded_disconnects_with_0x93() {
    let b = BrokerProcess::start(&["--receive-maximum", "2"]);
    let mut p = Client::connect_ok(b.addr, Opts::v5("greedy")).await;
    for id in 1..=2 {
        p.send(Packet::Publish(publish_packet(
            "t",
            b"x",
            QoS::ExactlyOnce,
            false,
            Some(id),
        )))
        .await;
        assert!(matches!(p.recv().await, Packet::PubRec(_)));
    }
    p.send(Packet::Publish(publish_packet(
        "t",
        b"x",
        QoS::ExactlyOnce,
        false,
        Some(3),
    )))
    .await;
    let d = p.expect_closed().await.expect("DISCONNECT");
    assert_eq!(d.reason_code, reason::RECEIVE_MAXIMUM_EXCEEDED);
}

#[tokio::test]
async fn outgoing_window_honours_client_receive_maximum() {
    let b = BrokerProcess::start(&[]);
    let mut o = Opts::v5("slow");
    o.properties.receive_maximum = Some(2);
    let mut sub = Client::connect_ok(b.addr, o).await;
    sub.subscribe("w", QoS::AtLeastOnce).await;
    let mut p = Client::connect_ok(b.addr, Opts::v5("fast")).await;
    for i in 0..5u8 {
        p.publish("w", &[i], QoS::AtLeastOnce, false).await;
    }
    let first = sub.recv_publish().await;
    let second = sub.recv_publish().await;
    // Window full: nothing more until an acknowledgement.
    sub.expect_nothing(Duration::from_millis(300)).await;
    sub.ack(&first).await;
    let third = sub.recv_publish().await;
    assert_eq!(&third.payload[..], &[2]);
    sub.expect_nothing(Duration::from_millis(200)).await;
    sub.ack(&second).await;
    sub.ack(&third).await;
    let rest = [sub.recv_ack().await, sub.recv_ack().await];
    assert_eq!(
        rest.iter().map(|p| p.payload[0]).collect::<Vec<_>>(),
        vec![3, 4]
    );
}

#[tokio::test]
async fn order_is_kept_per_topic() {
    let b = BrokerProcess::start(&[]);
    let mut sub = Client::connect_ok(b.addr, Opts::v311("order-sub")).await;
    sub.subscribe("ord", QoS::AtLeastOnce).await;
    let mut p = Client::connect_ok(b.addr, Opts::v311("order-pub")).await;
    for i in 0..200u16 {
        p.publish("ord", &i.to_be_bytes(), QoS::AtLeastOnce, false)
            .await;
    }
    for i in 0..200u16 {
        let m = sub.recv_ack().await;
        assert_eq!(&m.payload[..], &i.to_be_bytes());
    }
}

#[tokio::test]
async fn fan_in_to_a_reading_subscriber_loses_nothing_at_qos0() {
    // Publishers outpace the one subscriber's connection; backpressure
    // (not drops) must keep them in step while it keeps reading.
    let b = BrokerProcess::start(&["--max-queued-messages", "200"]);
    let mut sub = Client::connect_ok(b.addr, Opts::v311("sink")).await;
    sub.subscribe("fan/+", QoS::AtMostOnce).await;
    let per = 5000u32;
    let mut tasks = Vec::new();
    for i in 0..4 {
        let addr = b.addr;
        tasks.push(tokio::spawn(async move {
            let mut p = Client::connect_ok(addr, Opts::v311(&format!("src{i}"))).await;
            for n in 0..per {
                p.send(Packet::Publish(publish_packet(
                    &format!("fan/{i}"),
                    &n.to_be_bytes(),
                    QoS::AtMostOnce,
                    false,
                    None,
                )))
                .await;
            }
            p.ping().await;
            p
        }));
    }
    let mut next = [0u32; 4];
    for _ in 0..4 * per {
        let m = sub.recv_publish().await;
        let i = usize::from(m.topic.as_bytes()[4] - b'0');
        let n = u32::from_be_bytes(m.payload[..4].try_into().unwrap());
        assert_eq!(n, next[i], "in order and without gaps from publisher {i}");
        next[i] += 1;
    }
    for t in tasks {
        t.await.unwrap();
    }
}
