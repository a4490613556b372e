//! MQTT 5 features: properties, aliases, identifiers, no-local, shared
//! subscriptions, `$` topics, reason codes.

use std::collections::HashMap;
use std::time::Duration;

use cirrus_codec::{reason, Bytes, Packet, Properties, QoS, SubscriptionOptions};
use cirrus_e2e::client::publish_packet;
use cirrus_e2e::{BrokerProcess, Client, Opts};

#[tokio::test]
async fn properties_pass_through() {
    let b = BrokerProcess::start(&[]);
    let mut s = Client::connect_ok(b.addr, Opts::v5("s")).await;
    s.subscribe("props", QoS::AtLeastOnce).await;
    let mut p = Client::connect_ok(b.addr, Opts::v5("p")).await;
    let mut m = publish_packet("props", "héllo".as_bytes(), QoS::AtLeastOnce, false, None);
    m.properties.payload_format_indicator = Some(1);
    m.properties.content_type = Some("text/plain".into());
    m.properties.response_topic = Some("reply/here".into());
    m.properties.correlation_data = Some(Bytes::from_static(b"\x00\x01corr"));
    m.properties.user_properties = vec![
        ("a".into(), "1".into()),
        ("a".into(), "2".into()),
        ("b".into(), "x".into()),
    ];
    m.properties.message_expiry_interval = Some(100);
    p.publish_full(m.clone()).await;
    let got = s.recv_ack().await;
    assert_eq!(got.properties.payload_format_indicator, Some(1));
    assert_eq!(got.properties.content_type, m.properties.content_type);
    assert_eq!(got.properties.response_topic, m.properties.response_topic);
    assert_eq!(
        got.properties.correlation_data,
        m.properties.correlation_data
    );
    // Order and duplicates of user properties are kept ([MQTT-3.3.2-18]).
    assert_eq!(got.properties.user_properties, m.properties.user_properties);
    let left = got
        .properties
        .message_expiry_interval
        .expect("expiry sent on");
    assert!((98..=100).contains(&left), "{left}");
}

#[tokio::test]
async fn invalid_utf8_with_payload_format_1_is_refused() {
    let b = BrokerProcess::start(&[]);
    let mut p = Client::connect_ok(b.addr, Opts::v5("p")).await;
    let mut m = publish_packet("pf", &[0xff, 0xfe], QoS::AtLeastOnce, false, None);
    m.properties.payload_format_indicator = Some(1);
    assert_eq!(p.publish_full(m).await, reason::PAYLOAD_FORMAT_INVALID);
}

#[tokio::test]
async fn message_expiry_drops_stale_queued_messages() {
    let b = BrokerProcess::start(&[]);
    let s = Client::connect_ok(b.addr, Opts::v5("exp").persistent(300)).await;
    let mut s = s;
    s.subscribe("exp/#", QoS::AtLeastOnce).await;
    s.disconnect().await;
    let mut p = Client::connect_ok(b.addr, Opts::v5("p")).await;
    let mut short = publish_packet("exp/short", b"s", QoS::AtLeastOnce, false, None);
    short.properties.message_expiry_interval = Some(1);
    p.publish_full(short).await;
    let mut long = publish_packet("exp/long", b"l", QoS::AtLeastOnce, false, None);
    long.properties.message_expiry_interval = Some(60);
    p.publish_full(long).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let mut s = Client::connect_ok(b.addr, Opts::v5("exp").persistent(300)).await;
    let m = s.recv_ack().await;
    assert_eq!(&m.topic[..], "exp/long");
    let left = m.properties.message_expiry_interval.unwrap();
    assert!((57..=59).contains(&left), "{left}");
    s.expect_nothing(Duration::from_millis(200)).await;
}

#[tokio::test]
async fn no_local() {
    let b = BrokerProcess::start(&[]);
    let mut c = Client::connect_ok(b.addr, Opts::v5("self")).await;
    let mut o = SubscriptionOptions::new(QoS::AtMostOnce);
    o.no_local = true;
    c.subscribe_with(&[("nl", o)], Properties::default()).await;
    c.subscribe("nl2", QoS::AtMostOnce).await;
    c.publish("nl", b"mine", QoS::AtMostOnce, false).await;
    c.expect_nothing(Duration::from_millis(300)).await;
    c.publish("nl2", b"mine", QoS::AtMostOnce, false).await;
    assert_eq!(&c.recv_publish().await.topic[..], "nl2");
    let mut other = Client::connect_ok(b.addr, Opts::v5("other")).await;
    other.publish("nl", b"theirs", QoS::AtMostOnce, false).await;
    assert_eq!(&c.recv_publish().await.payload[..], b"theirs");
}

#[tokio::test]
async fn no_local_on_shared_subscription_is_a_protocol_error() {
    let b = BrokerProcess::start(&[]);
    let mut c = Client::connect_ok(b.addr, Opts::v5("x")).await;
    let mut o = SubscriptionOptions::new(QoS::AtMostOnce);
    o.no_local = true;
    c.send(Packet::Subscribe(cirrus_codec::Subscribe {
        packet_id: cirrus_e2e::client::pid(1),
        properties: Properties::default(),
        filters: vec![("$share/g/t".into(), o)],
    }))
    .await;
    assert_eq!(
        c.expect_closed().await.unwrap().reason_code,
        reason::PROTOCOL_ERROR
    );
}

#[tokio::test]
async fn subscription_identifiers_and_overlaps() {
    let b = BrokerProcess::start(&[]);
    let mut s = Client::connect_ok(b.addr, Opts::v5("ids")).await;
    let mut props = Properties::default();
    props.subscription_identifiers = vec![7];
    s.subscribe_with(
        &[("si/+", SubscriptionOptions::new(QoS::AtMostOnce))],
        props,
    )
    .await;
    let mut props = Properties::default();
    props.subscription_identifiers = vec![42];
    s.subscribe_with(
        &[("si/#", SubscriptionOptions::new(QoS::AtLeastOnce))],
        props,
    )
    .await;
    let mut p = Client::connect_ok(b.addr, Opts::v5("p")).await;
    p.publish("si/x", b"1", QoS::AtLeastOnce, false).await;
    // One delivery, the higher QoS, both identifiers ([MQTT-3.3.4-3]).
    let m = s.recv_ack().await;
    assert_eq!(m.qos, QoS::AtLeastOnce);
    let mut ids = m.properties.subscription_identifiers.clone();
    ids.sort();
    assert_eq!(ids, vec![7, 42]);
    s.expect_nothing(Duration::from_millis(200)).await;
    p.publish("si/x/y", b"2", QoS::AtMostOnce, false).await;
    assert_eq!(
        s.recv_publish().await.properties.subscription_identifiers,
        vec![42]
    );
}

#[tokio::test]
async fn topic_alias_from_the_client() {
    let b = BrokerProcess::start(&[]);
    let mut s = Client::connect_ok(b.addr, Opts::v5("s")).await;
    s.subscribe("alias/long/topic", QoS::AtMostOnce).await;
    let mut p = Client::connect_ok(b.addr, Opts::v5("p")).await;
    let mut m = publish_packet("alias/long/topic", b"1", QoS::AtMostOnce, false, None);
    m.properties.topic_alias = Some(3);
    p.publish_full(m).await;
    let mut m = publish_packet("", b"2", QoS::AtMostOnce, false, None);
    m.properties.topic_alias = Some(3);
    p.publish_full(m.clone()).await;
    assert_eq!(&s.recv_publish().await.topic[..], "alias/long/topic");
    let second = s.recv_publish().await;
    assert_eq!(
        (&second.topic[..], &second.payload[..]),
        ("alias/long/topic", &b"2"[..])
    );
    // An alias above the maximum (10) is 0x94.
    m.properties.topic_alias = Some(11);
    p.send(Packet::Publish(m)).await;
    assert_eq!(
        p.expect_closed().await.unwrap().reason_code,
        reason::TOPIC_ALIAS_INVALID
    );
}

#[tokio::test]
async fn unknown_topic_alias_is_a_protocol_error() {
    let b = BrokerProcess::start(&[]);
    let mut p = Client::connect_ok(b.addr, Opts::v5("p")).await;
    let mut m = publish_packet("", b"2", QoS::AtMostOnce, false, None);
    m.properties.topic_alias = Some(2);
    p.send(Packet::Publish(m)).await;
    assert_eq!(
        p.expect_closed().await.unwrap().reason_code,
        reason::PROTOCOL_ERROR
    );
}

#[tokio::test]
async fn topic_alias_to_the_client() {
    let b = BrokerProcess::start(&[]);
    let mut o = Opts::v5("s");
    o.properties.topic_alias_maximum = Some(2);
    let mut s = Client::connect_ok(b.addr, o).await;
    s.subscribe("ta/#", QoS::AtMostOnce).await;
    let mut p = Client::connect_ok(b.addr, Opts::v5("p")).await;
    let mut aliases: HashMap<u16, String> = HashMap::new();
    for t in ["ta/a", "ta/a", "ta/b", "ta/c", "ta/a", "ta/c"] {
        p.publish(t, t.as_bytes(), QoS::AtMostOnce, false).await;
        let m = s.recv_publish().await;
        let topic = match (m.properties.topic_alias, m.topic.is_empty()) {
            (Some(a), false) => {
                assert!((1..=2).contains(&a));
                aliases.insert(a, m.topic.to_string());
                m.topic.to_string()
            }
            (Some(a), true) => aliases.get(&a).cloned().expect("alias known"),
            (None, _) => m.topic.to_string(),
        };
        assert_eq!(topic.as_bytes(), &m.payload[..]);
    }
    assert_eq!(aliases.len(), 2);
}

#[tokio::test]
async fn client_maximum_packet_size_is_respected() {
    let b = BrokerProcess::start(&[]);
    let mut o = Opts::v5("small");
    o.properties.maximum_packet_size = Some(64);
    let mut s = Client::connect_ok(b.addr, o).await;
    s.subscribe("mps", QoS::AtLeastOnce).await;
    let mut p = Client::connect_ok(b.addr, Opts::v5("p")).await;
    p.publish("mps", &[7u8; 200], QoS::AtLeastOnce, false).await;
    p.publish("mps", b"fits", QoS::AtLeastOnce, false).await;
    assert_eq!(&s.recv_ack().await.payload[..], b"fits");
}

#[tokio::test]
async fn shared_subscription_delivers_each_message_once() {
    let b = BrokerProcess::start(&[]);
    let mut m1 = Client::connect_ok(b.addr, Opts::v5("m1")).await;
    let mut m2 = Client::connect_ok(b.addr, Opts::v5("m2")).await;
    assert_eq!(m1.subscribe("$share/grp/jobs/+", QoS::AtLeastOnce).await, 1);
    assert_eq!(m2.subscribe("$share/grp/jobs/+", QoS::AtLeastOnce).await, 1);
    let mut normal = Client::connect_ok(b.addr, Opts::v311("n")).await;
    normal.subscribe("jobs/+", QoS::AtLeastOnce).await;
    let mut p = Client::connect_ok(b.addr, Opts::v5("p")).await;
    for i in 0..20u8 {
        p.publish("jobs/x", &[i], QoS::AtLeastOnce, false).await;
    }
    let mut seen = Vec::new();
    let (mut c1, mut c2) = (0, 0);
    loop {
        tokio::select! {
            Some(m) = async { match m1.next(Duration::from_millis(500)).await { cirrus_e2e::Next::Packet(Packet::Publish(m)) => Some(m), _ => None } } => { m1.ack(&m).await; c1 += 1; seen.push(m.payload[0]); }
            Some(m) = async { match m2.next(Duration::from_millis(500)).await { cirrus_e2e::Next::Packet(Packet::Publish(m)) => Some(m), _ => None } } => { m2.ack(&m).await; c2 += 1; seen.push(m.payload[0]); }
            else => break,
        }
        if seen.len() == 20 {
            break;
        }
    }
    seen.sort();
    assert_eq!(
        seen,
        (0..20).collect::<Vec<u8>>(),
        "each message exactly once across the group"
    );
    assert!(c1 > 0 && c2 > 0, "both members got work: {c1} / {c2}");
    for _ in 0..20 {
        normal.recv_ack().await;
    }
}

#[tokio::test]
async fn dollar_topics_and_sys_tree() {
    let b = BrokerProcess::start(&["--sys-interval", "1"]);
    let mut all = Client::connect_ok(b.addr, Opts::v5("all")).await;
    all.subscribe("#", QoS::AtMostOnce).await;
    all.subscribe("+/broker/#", QoS::AtMostOnce).await;
    let mut sys = Client::connect_ok(b.addr, Opts::v5("sys")).await;
    sys.subscribe("$SYS/broker/#", QoS::AtMostOnce).await;
    // Retained on subscribe, then refreshed every second: all of the tree
    // arrives, in no particular order (recv fails the test if it stops).
    let want = [
        "version",
        "uptime",
        "clients/connected",
        "messages/received",
        "bytes/sent",
        "subscriptions/count",
        "retained messages/count",
    ];
    let mut topics = std::collections::HashSet::new();
    while !want
        .iter()
        .all(|w| topics.contains(&format!("$SYS/broker/{w}")))
    {
        topics.insert(sys.recv_publish().await.topic.to_string());
    }
    // `#` and `+` at the first level never match `$` topics ([MQTT-4.7.2-1]).
    all.expect_nothing(Duration::from_millis(1500)).await;
    // Clients may not publish into $SYS.
    assert_eq!(
        all.publish("$SYS/broker/version", b"fake", QoS::AtLeastOnce, false)
            .await,
        reason::NOT_AUTHORIZED
    );
}

#[tokio::test]
async fn bad_filters_fail_alone() {
    let b = BrokerProcess::start(&[]);
    let mut c = Client::connect_ok(b.addr, Opts::v5("f")).await;
    let o = SubscriptionOptions::new(QoS::AtLeastOnce);
    let a = c
        .subscribe_with(
            &[
                ("ok/+", o),
                ("bad/#/x", o),
                ("$share/g", o),
                ("also+bad", o),
                ("fine", o),
            ],
            Properties::default(),
        )
        .await;
    assert_eq!(
        a.reason_codes,
        vec![
            1,
            reason::TOPIC_FILTER_INVALID,
            reason::TOPIC_FILTER_INVALID,
            reason::TOPIC_FILTER_INVALID,
            1
        ]
    );
    let u = c.unsubscribe(&["ok/+", "never"]).await;
    assert_eq!(
        u.reason_codes,
        vec![reason::SUCCESS, reason::NO_SUBSCRIPTION_EXISTED]
    );
    let mut v3 = Client::connect_ok(b.addr, Opts::v311("f3")).await;
    assert_eq!(v3.subscribe("bad/#/x", QoS::AtMostOnce).await, 0x80);
}

#[tokio::test]
async fn puback_reports_no_matching_subscribers() {
    let b = BrokerProcess::start(&[]);
    let mut p = Client::connect_ok(b.addr, Opts::v5("p")).await;
    assert_eq!(
        p.publish("nobody/here", b"x", QoS::AtLeastOnce, false)
            .await,
        reason::NO_MATCHING_SUBSCRIBERS
    );
    assert_eq!(
        p.publish("nobody/here", b"x", QoS::ExactlyOnce, false)
            .await,
        reason::NO_MATCHING_SUBSCRIBERS
    );
}

#[tokio::test]
async fn subscription_identifier_from_client_publish_is_an_error() {
    let b = BrokerProcess::start(&[]);
    let mut p = Client::connect_ok(b.addr, Opts::v5("p")).await;
    let mut m = publish_packet("t", b"x", QoS::AtMostOnce, false, None);
    m.properties.subscription_identifiers = vec![3];
    p.send(Packet::Publish(m)).await;
    assert_eq!(
        p.expect_closed().await.unwrap().reason_code,
        reason::PROTOCOL_ERROR
    );
}
