//! Protocol edges, with raw bytes: empty topic filters and names, protocol
//! levels the broker does not speak, and reason codes that must reach a
//! client that is still writing (a lingering close). See docs/protocol.md.

use std::time::{Duration, Instant};

use bytes::BytesMut;
use cirrus_codec::{reason, Packet, Protocol};
use cirrus_e2e::{BrokerProcess, Client, Opts};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A length-prefixed MQTT string.
fn s(v: &[u8]) -> Vec<u8> {
    let mut b = (v.len() as u16).to_be_bytes().to_vec();
    b.extend_from_slice(v);
    b
}

/// A packet: first byte, remaining length (< 128 here), body.
fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    assert!(body.len() < 128);
    let mut p = vec![first, body.len() as u8];
    p.extend_from_slice(body);
    p
}

fn subscribe(filter: &[u8], v5: bool) -> Vec<u8> {
    let mut body = vec![0, 1];
    if v5 {
        body.push(0);
    }
    body.extend(s(filter));
    body.push(1);
    packet(0x82, &body)
}

fn unsubscribe(filter: &[u8], v5: bool) -> Vec<u8> {
    let mut body = vec![0, 2];
    if v5 {
        body.push(0);
    }
    body.extend(s(filter));
    packet(0xA2, &body)
}

fn publish_qos0(topic: &[u8], v5: bool) -> Vec<u8> {
    let mut body = s(topic);
    if v5 {
        body.push(0);
    }
    body.extend_from_slice(b"x");
    packet(0x30, &body)
}

/// The broker's answer to `bytes` on a connected client: the DISCONNECT it
/// sent (if any) before closing; fails if the connection stays open.
async fn answer_then_closed(c: &mut Client, bytes: &[u8]) -> Option<u8> {
    c.send_raw(bytes).await;
    c.expect_closed().await.map(|d| d.reason_code)
}

#[tokio::test]
async fn an_empty_topic_filter_is_a_malformed_packet() {
    let b = BrokerProcess::start(&[]);
    for filter in [&b""[..], b"$share/g/"] {
        for make in [subscribe, unsubscribe] {
            let mut c = Client::connect_ok(b.addr, Opts::v5("e5")).await;
            let code = answer_then_closed(&mut c, &make(filter, true)).await;
            assert_eq!(code, Some(reason::MALFORMED_PACKET), "{filter:?}");
            let mut c = Client::connect_ok(b.addr, Opts::v311("e3")).await;
            let code = answer_then_closed(&mut c, &make(filter, false)).await;
            assert_eq!(code, None, "3.1.1: closed without a word");
        }
    }
    // `$share/g` without a filter part is a refused filter, not malformed.
    let mut c = Client::connect_ok(b.addr, Opts::v5("e")).await;
    assert_eq!(
        c.subscribe("$share/g", cirrus_codec::QoS::AtMostOnce).await,
        reason::TOPIC_FILTER_INVALID
    );
}

#[tokio::test]
async fn an_empty_topic_name_is_refused_on_every_path() {
    let b = BrokerProcess::start(&[]);
    // PUBLISH without a topic alias.
    let mut c = Client::connect_ok(b.addr, Opts::v5("p5")).await;
    assert_eq!(
        answer_then_closed(&mut c, &publish_qos0(b"", true)).await,
        Some(reason::PROTOCOL_ERROR)
    );
    let mut c = Client::connect_ok(b.addr, Opts::v311("p3")).await;
    assert_eq!(
        answer_then_closed(&mut c, &publish_qos0(b"", false)).await,
        None
    );
    // A will with an empty topic: CONNACK 0x90 (5.0), closed (3.1.1).
    for (level, expect) in [
        (5u8, Some(vec![0x20, 3, 0, reason::TOPIC_NAME_INVALID, 0])),
        (4, None),
    ] {
        let mut body = s(b"MQTT");
        body.push(level);
        body.push(0x06); // clean start + will flag, will QoS 0
        body.extend_from_slice(&[0, 60]);
        if level == 5 {
            body.push(0); // properties
        }
        body.extend(s(b"w"));
        if level == 5 {
            body.push(0); // will properties
        }
        body.extend(s(b""));
        body.extend(s(b"bye"));
        let got = raw_answer(b.addr, &packet(0x10, &body)).await;
        match expect {
            Some(e) => assert_eq!(got, e, "level {level}"),
            None => assert!(got.is_empty(), "level {level}: {got:?}"),
        }
    }
}

/// Send `bytes` on a fresh connection; everything the broker wrote before
/// it closed (at most 10 s).
async fn raw_answer(addr: std::net::SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    out
}

fn connect_with(name: &[u8], level: u8) -> Vec<u8> {
    let mut body = s(name);
    body.push(level);
    body.push(0x02);
    body.extend_from_slice(&[0, 60]);
    if level == 5 {
        body.push(0);
    }
    body.extend(s(b"lvl"));
    packet(0x10, &body)
}

/// The rule (docs/protocol.md): a level above 5 gets the MQTT 5 CONNACK
/// with 0x84 [MQTT-3.1.2-2]; an older or odd level the 3.1.1 CONNACK with
/// 0x01; a protocol name that is not MQTT nothing [MQTT-3.1.2-1].
#[tokio::test]
async fn unsupported_protocol_levels_get_a_connack_they_can_read() {
    let b = BrokerProcess::start(&[]);
    let cases: [(&[u8], u8, &[u8]); 6] = [
        (b"MQTT", 6, &[0x20, 3, 0, 0x84, 0]),
        (b"MQTT", 255, &[0x20, 3, 0, 0x84, 0]),
        (b"MQTT", 3, &[0x20, 2, 0, 0x01]),
        (b"MQTT", 0, &[0x20, 2, 0, 0x01]),
        (b"MQIsdp", 4, &[0x20, 2, 0, 0x01]),
        (b"MQTX", 4, &[]),
    ];
    for (name, level, expect) in cases {
        let got = raw_answer(b.addr, &connect_with(name, level)).await;
        assert_eq!(
            got,
            expect,
            "{} level {level}",
            String::from_utf8_lossy(name)
        );
    }
}

/// A client that sends more QoS 2 publishes than Receive Maximum and keeps
/// writing still reads DISCONNECT 0x93: the broker shuts down its side and
/// drains the input for a bounded time instead of closing (which would send
/// a reset that can destroy the DISCONNECT). The flood after it is bounded:
/// the broker closes within its lingering time although the client never
/// stops writing.
#[tokio::test]
async fn a_client_still_writing_reads_the_reason_code_and_the_linger_is_bounded() {
    let b = BrokerProcess::start(&[]);
    for round in 0..5 {
        let sock = TcpStream::connect(b.addr).await.unwrap();
        sock.set_nodelay(true).unwrap();
        let (mut rd, mut wr) = sock.into_split();
        wr.write_all(&connect_with(b"MQTT", 5)).await.unwrap();
        let mut connack = [0u8; 32];
        let n = tokio::time::timeout(Duration::from_secs(10), rd.read(&mut connack))
            .await
            .unwrap()
            .unwrap();
        assert!(
            n >= 4 && connack[0] == 0x20 && connack[3] == 0,
            "{:?}",
            &connack[..n]
        );
        // 200 QoS 2 publishes (Receive Maximum is 100), then a flood of QoS 0
        // ones for as long as the socket takes them (at most 20 s).
        let writer = tokio::spawn(async move {
            let mut burst = Vec::new();
            for id in 1..=200u16 {
                let mut body = s(b"t");
                body.extend_from_slice(&id.to_be_bytes());
                body.push(0);
                body.extend_from_slice(&[0u8; 64]);
                burst.extend(packet(0x34, &body));
            }
            let flood: Vec<u8> = std::iter::repeat_n(publish_qos0(b"t", true), 512)
                .flatten()
                .collect();
            let t0 = Instant::now();
            if wr.write_all(&burst).await.is_err() {
                return t0.elapsed();
            }
            while t0.elapsed() < Duration::from_secs(20) {
                if wr.write_all(&flood).await.is_err() {
                    break;
                }
            }
            t0.elapsed()
        });
        // Read until the DISCONNECT (PUBRECs come first).
        let mut buf = BytesMut::new();
        let mut code = None;
        let end = Instant::now() + Duration::from_secs(10);
        'read: while Instant::now() < end {
            loop {
                match cirrus_codec::decode(&mut buf, Protocol::V5, 1 << 20) {
                    Ok(Some(Packet::Disconnect(d))) => {
                        code = Some(d.reason_code);
                        break 'read;
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(e) => panic!("undecodable answer: {e:?}"),
                }
            }
            buf.reserve(4096);
            match tokio::time::timeout(Duration::from_secs(10), rd.read_buf(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
                Ok(Ok(_)) => {}
            }
        }
        assert_eq!(
            code,
            Some(reason::RECEIVE_MAXIMUM_EXCEEDED),
            "round {round}: the DISCONNECT did not reach the client"
        );
        let wrote_for = writer.await.unwrap();
        assert!(
            wrote_for < Duration::from_secs(8),
            "the broker let the flood go on for {wrote_for:?}"
        );
    }
}

/// A refused CONNECT with more input behind it: the CONNACK still arrives.
#[tokio::test]
async fn a_refused_connect_is_read_even_with_more_input_behind_it() {
    let b = BrokerProcess::start(&[]);
    let mut bytes = connect_with(b"MQTT", 6);
    for _ in 0..2000 {
        bytes.extend(publish_qos0(b"t", true));
    }
    let got = raw_answer(b.addr, &bytes).await;
    assert_eq!(got, vec![0x20, 3, 0, 0x84, 0]);
}

/// The DISCONNECT queued behind data the client has not read yet: a client
/// with a small receive buffer gets its own publishes echoed, breaks the
/// Receive Maximum, writes on for a while and only then reads. Closing at
/// once with its input unread would reset the connection and throw away
/// what was still queued, DISCONNECT included; the lingering close lets it
/// all arrive.
#[tokio::test]
async fn a_disconnect_behind_unread_data_still_arrives() {
    let b = BrokerProcess::start(&[]);
    for round in 0..3 {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.set_recv_buffer_size(4096).unwrap();
        let mut c = sock.connect(b.addr).await.unwrap();
        c.write_all(&connect_with(b"MQTT", 5)).await.unwrap();
        c.write_all(&subscribe(b"echo", true)).await.unwrap();
        let mut buf = BytesMut::new();
        let mut seen = 0;
        while seen < 2 {
            buf.reserve(1024);
            assert!(c.read_buf(&mut buf).await.unwrap() > 0);
            while let Ok(Some(_)) = cirrus_codec::decode(&mut buf, Protocol::V5, 1 << 20) {
                seen += 1; // CONNACK, SUBACK
            }
        }
        let mut burst = Vec::new();
        for _ in 0..400 {
            let mut body = s(b"echo");
            body.push(0);
            body.extend_from_slice(&[b'e'; 100]);
            burst.extend(packet(0x30, &body));
        }
        // The echoes reach the broker's send queue first (the client reads
        // nothing), then the QoS 2 burst breaks the Receive Maximum.
        let _ = c.write_all(&burst).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut burst = Vec::new();
        for id in 1..=200u16 {
            let mut body = s(b"t");
            body.extend_from_slice(&id.to_be_bytes());
            body.push(0);
            burst.extend(packet(0x34, &body));
        }
        let t0 = Instant::now();
        let _ = c.write_all(&burst).await;
        // Keep writing for half a second, reading nothing.
        while t0.elapsed() < Duration::from_millis(500) {
            if c.write_all(&publish_qos0(b"late", true)).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut code = None;
        'read: loop {
            loop {
                match cirrus_codec::decode(&mut buf, Protocol::V5, 1 << 20) {
                    Ok(Some(Packet::Disconnect(d))) => {
                        code = Some(d.reason_code);
                        break 'read;
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(e) => panic!("undecodable answer: {e:?}"),
                }
            }
            buf.reserve(4096);
            match tokio::time::timeout(Duration::from_secs(10), c.read_buf(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
                Ok(Ok(_)) => {}
            }
        }
        assert_eq!(
            code,
            Some(reason::RECEIVE_MAXIMUM_EXCEEDED),
            "round {round}: the DISCONNECT was lost"
        );
    }
}
