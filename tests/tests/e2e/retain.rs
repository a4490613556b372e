//! Retained messages and the retain options of a subscription.

use std::time::Duration;

use cirrus_codec::{Properties, QoS, RetainHandling, SubscriptionOptions};
use cirrus_e2e::{BrokerProcess, Client, Opts};

#[tokio::test]
async fn retained_message_reaches_later_subscribers() {
    let b = BrokerProcess::start(&[]);
    let mut p = Client::connect_ok(b.addr, Opts::v311("p")).await;
    p.publish("ret/a", b"A", QoS::AtLeastOnce, true).await;
    p.publish("ret/b/c", b"BC", QoS::AtMostOnce, true).await;
    p.publish("ret/x", b"not retained", QoS::AtMostOnce, false)
        .await;
    // A PINGRESP comes after every earlier packet of this connection was handled.
    p.ping().await;
    let mut s = Client::connect_ok(b.addr, Opts::v311("s")).await;
    s.subscribe("ret/#", QoS::AtLeastOnce).await;
    let mut got = [s.recv_ack().await, s.recv_ack().await];
    got.sort_by(|a, b| a.topic.cmp(&b.topic));
    assert_eq!(&got[0].topic[..], "ret/a");
    assert_eq!(got[0].qos, QoS::AtLeastOnce);
    assert_eq!(&got[1].topic[..], "ret/b/c");
    assert_eq!(got[1].qos, QoS::AtMostOnce);
    assert!(got.iter().all(|m| m.retain));
    s.expect_nothing(Duration::from_millis(200)).await;
    // Live messages to an existing subscription carry RETAIN 0 ([MQTT-3.3.1-9]).
    p.publish("ret/a", b"A2", QoS::AtMostOnce, true).await;
    let live = s.recv_publish().await;
    assert!(!live.retain);
    assert_eq!(&live.payload[..], b"A2");
}

#[tokio::test]
async fn empty_payload_clears_the_retained_message() {
    let b = BrokerProcess::start(&[]);
    let mut p = Client::connect_ok(b.addr, Opts::v5("p")).await;
    p.publish("clear/me", b"x", QoS::AtMostOnce, true).await;
    p.publish("clear/me", b"", QoS::AtMostOnce, true).await;
    p.ping().await;
    let mut s = Client::connect_ok(b.addr, Opts::v5("s")).await;
    s.subscribe("clear/#", QoS::AtMostOnce).await;
    s.expect_nothing(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn retain_handling_options() {
    let b = BrokerProcess::start(&[]);
    let mut p = Client::connect_ok(b.addr, Opts::v5("p")).await;
    p.publish("rh", b"r", QoS::AtMostOnce, true).await;
    p.ping().await;
    let mut s = Client::connect_ok(b.addr, Opts::v5("s")).await;
    let opts = |h| SubscriptionOptions {
        retain_handling: h,
        ..SubscriptionOptions::new(QoS::AtMostOnce)
    };
    // 2: never.
    s.subscribe_with(
        &[("rh", opts(RetainHandling::DoNotSend))],
        Properties::default(),
    )
    .await;
    s.expect_nothing(Duration::from_millis(200)).await;
    s.unsubscribe(&["rh"]).await;
    // 1: only when the subscription is new.
    s.subscribe_with(
        &[("rh", opts(RetainHandling::SendIfNew))],
        Properties::default(),
    )
    .await;
    assert!(s.recv_publish().await.retain);
    s.subscribe_with(
        &[("rh", opts(RetainHandling::SendIfNew))],
        Properties::default(),
    )
    .await;
    s.expect_nothing(Duration::from_millis(200)).await;
    // 0: every time.
    s.subscribe_with(
        &[("rh", opts(RetainHandling::SendAlways))],
        Properties::default(),
    )
    .await;
    assert!(s.recv_publish().await.retain);
}

#[tokio::test]
async fn retain_as_published() {
    let b = BrokerProcess::start(&[]);
    let mut s = Client::connect_ok(b.addr, Opts::v5("s")).await;
    let mut rap = SubscriptionOptions::new(QoS::AtMostOnce);
    rap.retain_as_published = true;
    s.subscribe_with(
        &[
            ("rap/keep", rap),
            ("rap/plain", SubscriptionOptions::new(QoS::AtMostOnce)),
        ],
        Properties::default(),
    )
    .await;
    let mut p = Client::connect_ok(b.addr, Opts::v5("p")).await;
    p.publish("rap/keep", b"1", QoS::AtMostOnce, true).await;
    assert!(s.recv_publish().await.retain);
    p.publish("rap/plain", b"1", QoS::AtMostOnce, true).await;
    assert!(!s.recv_publish().await.retain);
}

#[tokio::test]
async fn retained_not_sent_to_shared_subscriptions() {
    let b = BrokerProcess::start(&[]);
    let mut p = Client::connect_ok(b.addr, Opts::v5("p")).await;
    p.publish("sr/t", b"r", QoS::AtMostOnce, true).await;
    p.ping().await;
    let mut s = Client::connect_ok(b.addr, Opts::v5("s")).await;
    assert_eq!(s.subscribe("$share/g/sr/#", QoS::AtMostOnce).await, 0);
    s.expect_nothing(Duration::from_millis(300)).await;
}
