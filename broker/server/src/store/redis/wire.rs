//! How messages, wills and subscriptions are written into Redis values.
//!
//! A message is a small header (publisher, absolute expiry, will delay)
//! followed by the message as an MQTT 5 PUBLISH packet, so the codec that
//! guards the network also guards what comes back from Redis: a value that
//! does not decode is an error, never a panic.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use cirrus_codec::encode::{encode_publish_parts, PublishExtras, PublishHeader};
use cirrus_codec::{ByteString, LastWill, Packet, Protocol, QoS, SubscriptionOptions};

use crate::message::Message;

const VERSION: u8 = 1;
const HAS_EXPIRY: u8 = 1;
const HAS_PUBLISHER: u8 = 2;
const HAS_DELAY: u8 = 4;

/// Record tags inside one inbox stream entry, which carries a batch.
pub const REC_MESSAGE: u8 = 0;
pub const REC_WAKE: u8 = 1;
/// A takeover: the body is the kicked connection's epoch on the receiving
/// pod (8 bytes, big endian), then the client id. A kick that names an
/// older epoch than the connection there now leaves it alone.
pub const REC_KICK: u8 = 3;

/// A stored value that could not be read back.
#[derive(Debug, thiserror::Error)]
#[error("malformed value in Redis: {0}")]
pub struct Malformed(pub &'static str);

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn to_unix_ms(at: Instant, now: Instant, now_ms: u64) -> u64 {
    let left = at.saturating_duration_since(now);
    now_ms + left.as_millis() as u64
}

/// Encode a message (and, for wills, the will delay in seconds).
pub fn encode_message(m: &Message, will_delay: Option<u32>, buf: &mut BytesMut) {
    let now = Instant::now();
    let mut flags = 0;
    if m.expires_at.is_some() {
        flags |= HAS_EXPIRY;
    }
    if m.publisher.is_some() {
        flags |= HAS_PUBLISHER;
    }
    if will_delay.is_some() {
        flags |= HAS_DELAY;
    }
    buf.put_u8(VERSION);
    buf.put_u8(flags);
    if let Some(at) = m.expires_at {
        buf.put_u64(to_unix_ms(at, now, unix_ms()));
    }
    if let Some(p) = &m.publisher {
        let b = p.as_bytes();
        let n = b.len().min(usize::from(u16::MAX));
        buf.put_u16(n as u16);
        buf.put_slice(&b[..n]);
    }
    if let Some(d) = will_delay {
        buf.put_u32(d);
    }
    encode_publish_parts(
        buf,
        Protocol::V5,
        PublishHeader {
            dup: false,
            qos: m.qos,
            retain: m.retain,
            topic: &m.topic,
            packet_id: (m.qos != QoS::AtMostOnce).then_some(cirrus_codec::PacketId::MIN),
        },
        &m.properties,
        PublishExtras {
            topic_alias: None,
            subscription_identifiers: &[],
            message_expiry_interval: None,
        },
        &m.payload,
    );
}

pub fn message_bytes(m: &Message) -> Bytes {
    let mut buf = BytesMut::with_capacity(32 + m.topic.len() + m.payload.len());
    encode_message(m, None, &mut buf);
    buf.freeze()
}

/// Decode a message; also returns the will delay when one was stored.
pub fn decode_message(mut b: Bytes) -> Result<(Message, Option<u32>), Malformed> {
    if b.remaining() < 2 {
        return Err(Malformed("short message header"));
    }
    if b.get_u8() != VERSION {
        return Err(Malformed("unknown message version"));
    }
    let flags = b.get_u8();
    let mut expires_at = None;
    if flags & HAS_EXPIRY != 0 {
        if b.remaining() < 8 {
            return Err(Malformed("short expiry"));
        }
        let at_ms = b.get_u64();
        let now_ms = unix_ms();
        let left = Duration::from_millis(at_ms.saturating_sub(now_ms));
        expires_at = Some(Instant::now() + left);
    }
    let mut publisher = None;
    if flags & HAS_PUBLISHER != 0 {
        if b.remaining() < 2 {
            return Err(Malformed("short publisher"));
        }
        let n = usize::from(b.get_u16());
        if b.remaining() < n {
            return Err(Malformed("short publisher"));
        }
        let p = b.split_to(n);
        publisher = Some(ByteString::try_from(p).map_err(|_| Malformed("publisher is not UTF-8"))?);
    }
    let mut delay = None;
    if flags & HAS_DELAY != 0 {
        if b.remaining() < 4 {
            return Err(Malformed("short will delay"));
        }
        delay = Some(b.get_u32());
    }
    let mut frame = BytesMut::from(&b[..]);
    let packet = cirrus_codec::decode(&mut frame, Protocol::V5, usize::MAX)
        .map_err(|_| Malformed("stored PUBLISH does not decode"))?;
    let Some(Packet::Publish(p)) = packet else {
        return Err(Malformed("stored value is not a PUBLISH"));
    };
    let mut properties = p.properties;
    properties.message_expiry_interval = None;
    Ok((
        Message {
            topic: p.topic,
            payload: p.payload,
            qos: p.qos,
            retain: p.retain,
            properties,
            expires_at,
            publisher,
            received: Instant::now(),
        },
        delay,
    ))
}

/// A will as stored in the session hash, so that a surviving pod can
/// publish it when the client's pod dies.
pub fn encode_will(w: &LastWill, client_id: &ByteString) -> Bytes {
    let mut props = w.properties.clone();
    let delay = props.will_delay_interval.take();
    let m = Message::from_wire(
        w.topic.clone(),
        w.payload.clone(),
        w.qos,
        w.retain,
        props,
        Some(client_id.clone()),
    );
    let mut buf = BytesMut::new();
    encode_message(&m, Some(delay.unwrap_or(0)), &mut buf);
    buf.freeze()
}

/// Append one record to an inbox batch.
pub fn put_record(buf: &mut BytesMut, tag: u8, body: &[u8]) {
    buf.put_u8(tag);
    buf.put_u32(body.len() as u32);
    buf.put_slice(body);
}

/// The body of a [`REC_KICK`] record.
pub fn kick_body(client_id: &str, epoch: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(8 + client_id.len());
    b.extend_from_slice(&epoch.to_be_bytes());
    b.extend_from_slice(client_id.as_bytes());
    b
}

/// Read a [`REC_KICK`] body: (client id, epoch).
pub fn parse_kick(mut b: Bytes) -> Result<(ByteString, u64), Malformed> {
    if b.remaining() < 8 {
        return Err(Malformed("short kick"));
    }
    let epoch = b.get_u64();
    let cid = ByteString::try_from(b).map_err(|_| Malformed("kick client id"))?;
    Ok((cid, epoch))
}

/// Split an inbox batch into its records.
pub fn records(mut b: Bytes) -> impl Iterator<Item = Result<(u8, Bytes), Malformed>> {
    std::iter::from_fn(move || {
        if !b.has_remaining() {
            return None;
        }
        if b.remaining() < 5 {
            b.clear();
            return Some(Err(Malformed("short record header")));
        }
        let tag = b.get_u8();
        let n = b.get_u32() as usize;
        if b.remaining() < n {
            b.clear();
            return Some(Err(Malformed("short record")));
        }
        Some(Ok((tag, b.split_to(n))))
    })
}

/// Subscription options and identifier, as stored per session.
pub fn encode_sub(o: SubscriptionOptions, sub_id: Option<u32>) -> String {
    format!(
        "{},{},{},{},{}",
        o.qos.as_u8(),
        u8::from(o.no_local),
        u8::from(o.retain_as_published),
        o.retain_handling as u8,
        sub_id.unwrap_or(0)
    )
}

pub fn decode_sub(s: &str) -> Result<(SubscriptionOptions, Option<u32>), Malformed> {
    let mut it = s.split(',').map(|v| v.parse::<u32>());
    let mut next = || {
        it.next()
            .and_then(Result::ok)
            .ok_or(Malformed("subscription options"))
    };
    let qos = QoS::from_u8(next()? as u8).ok_or(Malformed("subscription QoS"))?;
    let mut o = SubscriptionOptions::new(qos);
    o.no_local = next()? != 0;
    o.retain_as_published = next()? != 0;
    o.retain_handling = match next()? {
        0 => cirrus_codec::RetainHandling::SendAlways,
        1 => cirrus_codec::RetainHandling::SendIfNew,
        2 => cirrus_codec::RetainHandling::DoNotSend,
        _ => return Err(Malformed("retain handling")),
    };
    let id = next()?;
    Ok((o, (id != 0).then_some(id)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use cirrus_codec::Properties;

    #[test]
    fn message_roundtrip() {
        let mut props = Properties::default();
        props
            .user_properties
            .push((ByteString::from("k"), ByteString::from("v")));
        let m = Message {
            topic: ByteString::from("a/b"),
            payload: Bytes::from_static(b"hello"),
            qos: QoS::AtLeastOnce,
            retain: true,
            properties: props,
            expires_at: Some(Instant::now() + Duration::from_secs(30)),
            publisher: Some(ByteString::from("pub-1")),
            received: Instant::now(),
        };
        let (back, delay) = decode_message(message_bytes(&m)).unwrap();
        assert_eq!(back.topic, m.topic);
        assert_eq!(back.payload, m.payload);
        assert_eq!(back.qos, m.qos);
        assert!(back.retain);
        assert_eq!(
            back.properties.user_properties,
            m.properties.user_properties
        );
        assert_eq!(back.publisher, m.publisher);
        let left = back.remaining_expiry(Instant::now()).unwrap();
        assert!((29..=30).contains(&left), "{left}");
        assert_eq!(delay, None);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let good = message_bytes(&Message::from_wire(
            ByteString::from("t"),
            Bytes::from_static(b"x"),
            QoS::AtMostOnce,
            false,
            Properties::default(),
            None,
        ));
        for n in 0..good.len() {
            assert!(decode_message(good.slice(..n)).is_err(), "prefix {n}");
        }
        let mut seed = 7u64;
        for _ in 0..2000 {
            let len = (seed % 40) as usize;
            let v: Vec<u8> = (0..len)
                .map(|_| {
                    seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
                    (seed >> 33) as u8
                })
                .collect();
            let _ = decode_message(Bytes::from(v.clone()));
            for r in records(Bytes::from(v)) {
                let _ = r;
            }
        }
    }

    #[test]
    fn subscription_options_roundtrip() {
        let mut o = SubscriptionOptions::new(QoS::ExactlyOnce);
        o.no_local = true;
        o.retain_handling = cirrus_codec::RetainHandling::DoNotSend;
        let s = encode_sub(o, Some(42));
        assert_eq!(decode_sub(&s).unwrap(), (o, Some(42)));
        assert!(decode_sub("9,0").is_err());
    }
}
