//! Decoding. `decode` looks at the fixed header first: an incomplete frame is
//! `Ok(None)`, an oversized one is refused before its body is buffered, and a
//! complete one is cut off the buffer with `split_to().freeze()` so every
//! string and payload of the packet is a slice of it.

use std::num::NonZeroU16;

use bytes::{Buf, Bytes, BytesMut};
use bytestring::ByteString;

use crate::error::DecodeError;
use crate::packet::*;
use crate::properties::{Properties, PropertyContext};
use crate::types::{Protocol, QoS, RetainHandling, SubscriptionOptions};

const SHORT: DecodeError = DecodeError::Malformed("packet shorter than its fields");

/// A cursor over a frame's body.
pub(crate) struct Reader {
    buf: Bytes,
}

impl Reader {
    pub(crate) fn new(buf: Bytes) -> Self {
        Reader { buf }
    }

    pub(crate) fn has_remaining(&self) -> bool {
        !self.buf.is_empty()
    }

    pub(crate) fn u8(&mut self) -> Result<u8, DecodeError> {
        if self.buf.is_empty() {
            return Err(SHORT);
        }
        Ok(self.buf.get_u8())
    }

    pub(crate) fn u16(&mut self) -> Result<u16, DecodeError> {
        if self.buf.len() < 2 {
            return Err(SHORT);
        }
        Ok(self.buf.get_u16())
    }

    pub(crate) fn u32(&mut self) -> Result<u32, DecodeError> {
        if self.buf.len() < 4 {
            return Err(SHORT);
        }
        Ok(self.buf.get_u32())
    }

    /// Variable byte integer (1.5.5): at most four bytes.
    pub(crate) fn varint(&mut self) -> Result<u32, DecodeError> {
        let mut value: u32 = 0;
        for i in 0..4 {
            let b = self.u8()?;
            value |= u32::from(b & 0x7F) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(DecodeError::Malformed(
            "variable byte integer longer than four bytes",
        ))
    }

    pub(crate) fn take(&mut self, n: usize) -> Result<Bytes, DecodeError> {
        if self.buf.len() < n {
            return Err(SHORT);
        }
        Ok(self.buf.split_to(n))
    }

    pub(crate) fn sub(&mut self, n: usize) -> Result<Reader, DecodeError> {
        Ok(Reader::new(self.take(n)?))
    }

    pub(crate) fn binary(&mut self) -> Result<Bytes, DecodeError> {
        let n = self.u16()? as usize;
        self.take(n)
    }

    /// UTF-8 encoded string (1.5.4): well-formed and without U+0000.
    pub(crate) fn string(&mut self) -> Result<ByteString, DecodeError> {
        let raw = self.binary()?;
        if raw.contains(&0) {
            return Err(DecodeError::Malformed(
                "string contains U+0000 [MQTT-1.5.4-2]",
            ));
        }
        ByteString::try_from(raw)
            .map_err(|_| DecodeError::Malformed("string is not valid UTF-8 [MQTT-1.5.4-1]"))
    }

    fn packet_id(&mut self) -> Result<PacketId, DecodeError> {
        NonZeroU16::new(self.u16()?)
            .ok_or(DecodeError::Malformed("packet identifier 0 [MQTT-2.2.1-3]"))
    }

    fn rest(&mut self) -> Bytes {
        std::mem::take(&mut self.buf)
    }

    fn end(&self) -> Result<(), DecodeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::Malformed("bytes after the end of the packet"))
        }
    }
}

/// The first byte and the remaining length of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FixedHeader {
    pub byte0: u8,
    pub remaining: usize,
    /// Bytes taken by the fixed header itself (2 to 5).
    pub header_len: usize,
}

impl FixedHeader {
    pub fn frame_len(&self) -> usize {
        self.header_len + self.remaining
    }
}

/// Parse the fixed header at the start of `buf`; `Ok(None)` until enough
/// bytes are there to know the frame's length.
pub fn parse_fixed_header(buf: &[u8]) -> Result<Option<FixedHeader>, DecodeError> {
    let Some(&byte0) = buf.first() else {
        return Ok(None);
    };
    let mut remaining = 0usize;
    for i in 0..4 {
        let Some(&b) = buf.get(1 + i) else {
            return Ok(None);
        };
        remaining |= usize::from(b & 0x7F) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(Some(FixedHeader {
                byte0,
                remaining,
                header_len: 2 + i,
            }));
        }
    }
    Err(DecodeError::Malformed(
        "remaining length longer than four bytes",
    ))
}

/// Decode one packet from the front of `buf`, or `Ok(None)` if more bytes are
/// needed. `max_packet_size` bounds the whole frame, fixed header included.
pub fn decode(
    buf: &mut BytesMut,
    protocol: Protocol,
    max_packet_size: usize,
) -> Result<Option<Packet>, DecodeError> {
    let Some(header) = parse_fixed_header(buf)? else {
        return Ok(None);
    };
    let total = header.frame_len();
    if total > max_packet_size {
        return Err(DecodeError::PacketTooLarge {
            size: total,
            max: max_packet_size,
        });
    }
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    let mut frame = buf.split_to(total).freeze();
    frame.advance(header.header_len);
    decode_body(header.byte0, frame, protocol).map(Some)
}

/// Decode a packet body given its first byte. `protocol` is the connection's
/// (CONNECT carries its own).
pub fn decode_body(byte0: u8, body: Bytes, protocol: Protocol) -> Result<Packet, DecodeError> {
    let flags = byte0 & 0x0F;
    let kind = byte0 >> 4;
    let expect_flags = |want: u8| {
        if flags == want {
            Ok(())
        } else {
            Err(DecodeError::Malformed(
                "reserved flags of the fixed header are wrong [MQTT-2.2.2-2]",
            ))
        }
    };
    let v5 = protocol.is_v5();
    let mut r = Reader::new(body);
    let packet = match kind {
        1 => {
            expect_flags(0)?;
            Packet::Connect(Box::new(decode_connect(&mut r)?))
        }
        2 => {
            expect_flags(0)?;
            let ack_flags = r.u8()?;
            if ack_flags & 0xFE != 0 {
                return Err(DecodeError::Malformed("reserved CONNACK flags set"));
            }
            let reason_code = r.u8()?;
            let properties = if v5 && r.has_remaining() {
                Properties::decode(&mut r, PropertyContext::ConnAck)?
            } else {
                Properties::default()
            };
            Packet::ConnAck(ConnAck {
                session_present: ack_flags & 1 == 1,
                reason_code,
                properties,
            })
        }
        3 => Packet::Publish(decode_publish(flags, &mut r, protocol)?),
        4..=7 => {
            expect_flags(if kind == 6 { 0b0010 } else { 0 })?;
            let resp = decode_pub_resp(&mut r, v5)?;
            match kind {
                4 => Packet::PubAck(resp),
                5 => Packet::PubRec(resp),
                6 => Packet::PubRel(resp),
                _ => Packet::PubComp(resp),
            }
        }
        8 => {
            expect_flags(0b0010)?;
            Packet::Subscribe(decode_subscribe(&mut r, v5)?)
        }
        9 => {
            expect_flags(0)?;
            let packet_id = r.packet_id()?;
            let properties = if v5 {
                Properties::decode(&mut r, PropertyContext::SubAck)?
            } else {
                Properties::default()
            };
            let reason_codes = r.rest().to_vec();
            Packet::SubAck(SubAck {
                packet_id,
                properties,
                reason_codes,
            })
        }
        10 => {
            expect_flags(0b0010)?;
            let packet_id = r.packet_id()?;
            let properties = if v5 {
                Properties::decode(&mut r, PropertyContext::Unsubscribe)?
            } else {
                Properties::default()
            };
            let mut filters = Vec::new();
            while r.has_remaining() {
                filters.push(non_empty_filter(r.string()?)?);
            }
            if filters.is_empty() {
                return Err(DecodeError::Protocol(
                    "UNSUBSCRIBE without a topic filter [MQTT-3.10.3-2]",
                ));
            }
            Packet::Unsubscribe(Unsubscribe {
                packet_id,
                properties,
                filters,
            })
        }
        11 => {
            expect_flags(0)?;
            let packet_id = r.packet_id()?;
            let (properties, reason_codes) = if v5 {
                (
                    Properties::decode(&mut r, PropertyContext::UnsubAck)?,
                    r.rest().to_vec(),
                )
            } else {
                (Properties::default(), Vec::new())
            };
            Packet::UnsubAck(UnsubAck {
                packet_id,
                properties,
                reason_codes,
            })
        }
        12 => {
            expect_flags(0)?;
            Packet::PingReq
        }
        13 => {
            expect_flags(0)?;
            Packet::PingResp
        }
        14 => {
            expect_flags(0)?;
            let mut d = Disconnect::default();
            if v5 && r.has_remaining() {
                d.reason_code = r.u8()?;
                if r.has_remaining() {
                    d.properties = Properties::decode(&mut r, PropertyContext::Disconnect)?;
                }
            }
            Packet::Disconnect(d)
        }
        15 if v5 => {
            expect_flags(0)?;
            let mut a = Auth::default();
            if r.has_remaining() {
                a.reason_code = r.u8()?;
                a.properties = Properties::decode(&mut r, PropertyContext::Auth)?;
            }
            Packet::Auth(a)
        }
        _ => return Err(DecodeError::Malformed("reserved control packet type")),
    };
    r.end()?;
    Ok(packet)
}

fn decode_connect(r: &mut Reader) -> Result<Connect, DecodeError> {
    let name = r.binary()?;
    let level = r.u8()?;
    let protocol = match (&name[..], level) {
        (b"MQTT", 4) => Protocol::V3_1_1,
        (b"MQTT", 5) => Protocol::V5,
        (b"MQIsdp", 3) => Protocol::V3_1,
        (b"MQTT", _) | (b"MQIsdp", _) => return Err(DecodeError::UnsupportedProtocol),
        _ => {
            return Err(DecodeError::Malformed(
                "protocol name is not MQTT [MQTT-3.1.2-1]",
            ))
        }
    };
    let flags = r.u8()?;
    if flags & 0x01 != 0 {
        return Err(DecodeError::Malformed(
            "reserved CONNECT flag set [MQTT-3.1.2-3]",
        ));
    }
    let clean_start = flags & 0x02 != 0;
    let will_flag = flags & 0x04 != 0;
    let will_qos = (flags >> 3) & 0x03;
    let will_retain = flags & 0x20 != 0;
    let password_flag = flags & 0x40 != 0;
    let username_flag = flags & 0x80 != 0;
    let will_qos =
        QoS::from_u8(will_qos).ok_or(DecodeError::Malformed("will QoS 3 [MQTT-3.1.2-14]"))?;
    if !will_flag && (will_qos != QoS::AtMostOnce || will_retain) {
        return Err(DecodeError::Malformed(
            "will QoS or retain set without a will [MQTT-3.1.2-11]",
        ));
    }
    if protocol != Protocol::V5 && password_flag && !username_flag {
        return Err(DecodeError::Malformed(
            "password without user name [MQTT-3.1.2-22]",
        ));
    }
    let keep_alive = r.u16()?;
    let properties = if protocol.is_v5() {
        Properties::decode(r, PropertyContext::Connect)?
    } else {
        Properties::default()
    };
    let client_id = r.string()?;
    let will = if will_flag {
        let properties = if protocol.is_v5() {
            Properties::decode(r, PropertyContext::Will)?
        } else {
            Properties::default()
        };
        let topic = r.string()?;
        if !crate::topic::valid_topic_name(&topic) {
            return Err(DecodeError::TopicName(
                "will topic must be a topic name without wildcards",
            ));
        }
        let payload = r.binary()?;
        Some(LastWill {
            topic,
            payload,
            qos: will_qos,
            retain: will_retain,
            properties,
        })
    } else {
        None
    };
    let username = if username_flag {
        Some(r.string()?)
    } else {
        None
    };
    let password = if password_flag {
        Some(r.binary()?)
    } else {
        None
    };
    Ok(Connect {
        protocol,
        clean_start,
        keep_alive,
        properties,
        client_id,
        will,
        username,
        password,
    })
}

fn decode_publish(flags: u8, r: &mut Reader, protocol: Protocol) -> Result<Publish, DecodeError> {
    let dup = flags & 0x08 != 0;
    let qos = QoS::from_u8((flags >> 1) & 0x03)
        .ok_or(DecodeError::Malformed("PUBLISH with QoS 3 [MQTT-3.3.1-4]"))?;
    let retain = flags & 0x01 != 0;
    if dup && qos == QoS::AtMostOnce {
        return Err(DecodeError::Malformed(
            "DUP set on a QoS 0 PUBLISH [MQTT-3.3.1-2]",
        ));
    }
    let topic = r.string()?;
    if topic.is_empty() && !protocol.is_v5() {
        return Err(DecodeError::TopicName("empty topic name [MQTT-4.7.3-1]"));
    }
    if topic.contains(['+', '#']) {
        return Err(DecodeError::TopicName(
            "wildcard in a topic name [MQTT-3.3.2-2]",
        ));
    }
    let packet_id = if qos == QoS::AtMostOnce {
        None
    } else {
        Some(r.packet_id()?)
    };
    let properties = if protocol.is_v5() {
        Properties::decode(r, PropertyContext::Publish)?
    } else {
        Properties::default()
    };
    let payload = r.rest();
    Ok(Publish {
        dup,
        qos,
        retain,
        topic,
        packet_id,
        properties,
        payload,
    })
}

fn decode_pub_resp(r: &mut Reader, v5: bool) -> Result<PubResp, DecodeError> {
    let packet_id = r.packet_id()?;
    let mut resp = PubResp::new(packet_id, 0);
    if v5 && r.has_remaining() {
        resp.reason_code = r.u8()?;
        if r.has_remaining() {
            resp.properties = Properties::decode(r, PropertyContext::PubResp)?;
        }
    }
    Ok(resp)
}

/// A topic filter is at least one character long, and so is the filter of
/// a shared subscription after `$share/{group}/` ([MQTT-4.7.3-1],
/// [MQTT-4.8.2-2]): an empty one makes the packet malformed (DISCONNECT
/// 0x81 in MQTT 5, a closed connection in 3.1.1), not a refused filter.
fn non_empty_filter(f: ByteString) -> Result<ByteString, DecodeError> {
    let shared_empty = f
        .strip_prefix("$share/")
        .and_then(|rest| rest.split_once('/'))
        .is_some_and(|(_, filter)| filter.is_empty());
    if f.is_empty() || shared_empty {
        return Err(DecodeError::Malformed("empty topic filter [MQTT-4.7.3-1]"));
    }
    Ok(f)
}

fn decode_subscribe(r: &mut Reader, v5: bool) -> Result<Subscribe, DecodeError> {
    let packet_id = r.packet_id()?;
    let properties = if v5 {
        Properties::decode(r, PropertyContext::Subscribe)?
    } else {
        Properties::default()
    };
    let mut filters = Vec::new();
    while r.has_remaining() {
        let filter = non_empty_filter(r.string()?)?;
        let o = r.u8()?;
        let reserved = if v5 { 0xC0 } else { 0xFC };
        if o & reserved != 0 {
            return Err(DecodeError::Malformed(
                "reserved subscription option bits set [MQTT-3.8.3-5]",
            ));
        }
        let qos = QoS::from_u8(o & 0x03)
            .ok_or(DecodeError::Malformed("subscription QoS 3 [MQTT-3-8.3-4]"))?;
        let retain_handling = match (o >> 4) & 0x03 {
            0 => RetainHandling::SendAlways,
            1 => RetainHandling::SendIfNew,
            2 => RetainHandling::DoNotSend,
            _ => return Err(DecodeError::Protocol("retain handling 3 [MQTT-3.8.3-6]")),
        };
        filters.push((
            filter,
            SubscriptionOptions {
                qos,
                no_local: o & 0x04 != 0,
                retain_as_published: o & 0x08 != 0,
                retain_handling,
            },
        ));
    }
    if filters.is_empty() {
        return Err(DecodeError::Protocol(
            "SUBSCRIBE without a topic filter [MQTT-3.8.3-2]",
        ));
    }
    Ok(Subscribe {
        packet_id,
        properties,
        filters,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::reason;

    #[test]
    fn an_empty_topic_filter_makes_subscribe_and_unsubscribe_malformed() {
        for p in [Protocol::V3_1_1, Protocol::V5] {
            let props: &[u8] = if p.is_v5() { &[0] } else { &[] };
            // SUBSCRIBE id 1, filter "" (QoS 0); then "$share/g/".
            for filter in [&b""[..], b"$share/g/"] {
                let mut body = vec![0, 1];
                body.extend_from_slice(props);
                body.extend_from_slice(&(filter.len() as u16).to_be_bytes());
                body.extend_from_slice(filter);
                body.push(0);
                let mut pkt = vec![0x82, body.len() as u8];
                pkt.extend_from_slice(&body);
                let e = dec(&pkt, p).unwrap_err();
                assert_eq!(
                    e.reason_code(),
                    reason::MALFORMED_PACKET,
                    "{p:?} {filter:?}"
                );
                let mut body = vec![0, 1];
                body.extend_from_slice(props);
                body.extend_from_slice(&(filter.len() as u16).to_be_bytes());
                body.extend_from_slice(filter);
                let mut pkt = vec![0xA2, body.len() as u8];
                pkt.extend_from_slice(&body);
                let e = dec(&pkt, p).unwrap_err();
                assert_eq!(
                    e.reason_code(),
                    reason::MALFORMED_PACKET,
                    "{p:?} {filter:?}"
                );
            }
        }
        // `$share/g` (no filter part at all) is a well-formed packet whose
        // filter the broker refuses (0x8F), like any other invalid filter.
        let mut pkt = vec![0x82, 13, 0, 1, 0, 8];
        pkt.extend_from_slice(b"$share/g");
        pkt.push(0);
        assert!(matches!(one(&pkt, Protocol::V3_1_1), Packet::Subscribe(_)));
    }

    fn dec(bytes: &[u8], p: Protocol) -> Result<Option<Packet>, DecodeError> {
        let mut b = BytesMut::from(bytes);
        decode(&mut b, p, 1 << 20)
    }

    fn one(bytes: &[u8], p: Protocol) -> Packet {
        match dec(bytes, p) {
            Ok(Some(p)) => p,
            other => panic!("expected a packet, got {other:?}"),
        }
    }

    #[test]
    fn connect_v311_minimal() {
        let b = [
            0x10, 0x0E, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60, 0, 2, b'i', b'd',
        ];
        let Packet::Connect(c) = one(&b, Protocol::V3_1_1) else {
            panic!()
        };
        assert_eq!(c.protocol, Protocol::V3_1_1);
        assert!(c.clean_start);
        assert_eq!(c.keep_alive, 60);
        assert_eq!(&c.client_id[..], "id");
        assert!(c.will.is_none() && c.username.is_none());
    }

    #[test]
    fn connect_v31_and_v5() {
        let b = [
            0x10,
            0x0E + 2,
            0,
            6,
            b'M',
            b'Q',
            b'I',
            b's',
            b'd',
            b'p',
            3,
            0x00,
            0,
            10,
            0,
            2,
            b'i',
            b'd',
        ];
        let Packet::Connect(c) = one(&b, Protocol::V3_1_1) else {
            panic!()
        };
        assert_eq!(c.protocol, Protocol::V3_1);
        // v5 with session expiry 0x11 = 30 and receive maximum 0x21 = 5
        let b = [
            0x10, 23, 0, 4, b'M', b'Q', b'T', b'T', 5, 0x00, 0, 10, 8, 0x11, 0, 0, 0, 30, 0x21, 0,
            5, 0, 2, b'i', b'd',
        ];
        let Packet::Connect(c) = one(&b, Protocol::V3_1_1) else {
            panic!()
        };
        assert_eq!(c.protocol, Protocol::V5);
        assert_eq!(c.properties.session_expiry_interval, Some(30));
        assert_eq!(c.properties.receive_maximum, Some(5));
    }

    #[test]
    fn connect_errors() {
        // level 6
        let b = [
            0x10, 0x0C, 0, 4, b'M', b'Q', b'T', b'T', 6, 0x02, 0, 60, 0, 0,
        ];
        assert_eq!(
            dec(&b, Protocol::V3_1_1),
            Err(DecodeError::UnsupportedProtocol)
        );
        // reserved flag
        let b = [
            0x10, 0x0C, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x03, 0, 60, 0, 0,
        ];
        assert!(matches!(
            dec(&b, Protocol::V3_1_1),
            Err(DecodeError::Malformed(_))
        ));
        // will qos without will flag
        let b = [
            0x10, 0x0C, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x08, 0, 60, 0, 0,
        ];
        assert!(matches!(
            dec(&b, Protocol::V3_1_1),
            Err(DecodeError::Malformed(_))
        ));
        // wrong protocol name
        let b = [
            0x10, 0x0C, 0, 4, b'M', b'Q', b'T', b'X', 4, 0x02, 0, 60, 0, 0,
        ];
        assert!(matches!(
            dec(&b, Protocol::V3_1_1),
            Err(DecodeError::Malformed(_))
        ));
        // password without username on 3.1.1
        let b = [
            0x10, 0x0E, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x42, 0, 60, 0, 0, 0, 0,
        ];
        assert!(matches!(
            dec(&b, Protocol::V3_1_1),
            Err(DecodeError::Malformed(_))
        ));
        // fixed-header flags
        let b = [
            0x11, 0x0C, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60, 0, 0,
        ];
        assert!(matches!(
            dec(&b, Protocol::V3_1_1),
            Err(DecodeError::Malformed(_))
        ));
    }

    #[test]
    fn publish_qos1_zero_copy() {
        let b = [0x32, 0x09, 0, 3, b'a', b'/', b'b', 0x00, 0x07, b'h', b'i'];
        let mut buf = BytesMut::from(&b[..]);
        let Ok(Some(Packet::Publish(p))) = decode(&mut buf, Protocol::V3_1_1, 100) else {
            panic!()
        };
        assert_eq!(p.qos, QoS::AtLeastOnce);
        assert_eq!(p.packet_id.map(|v| v.get()), Some(7));
        assert_eq!(&p.topic[..], "a/b");
        assert_eq!(&p.payload[..], b"hi");
        assert!(buf.is_empty());
    }

    #[test]
    fn publish_errors() {
        // QoS 3
        assert!(matches!(
            dec(&[0x36, 0x05, 0, 1, b'a', 0, 1], Protocol::V3_1_1),
            Err(DecodeError::Malformed(_))
        ));
        // DUP on QoS 0
        assert!(matches!(
            dec(&[0x38, 0x03, 0, 1, b'a'], Protocol::V3_1_1),
            Err(DecodeError::Malformed(_))
        ));
        // wildcard in topic
        assert!(matches!(
            dec(&[0x30, 0x03, 0, 1, b'#'], Protocol::V3_1_1),
            Err(DecodeError::TopicName(_))
        ));
        // packet id 0
        assert!(matches!(
            dec(&[0x32, 0x05, 0, 1, b'a', 0, 0], Protocol::V3_1_1),
            Err(DecodeError::Malformed(_))
        ));
        // invalid UTF-8 topic
        assert!(matches!(
            dec(&[0x30, 0x04, 0, 2, 0xC3, 0x28], Protocol::V3_1_1),
            Err(DecodeError::Malformed(_))
        ));
        // U+0000 in topic
        assert!(matches!(
            dec(&[0x30, 0x04, 0, 2, b'a', 0], Protocol::V3_1_1),
            Err(DecodeError::Malformed(_))
        ));
        // v5: topic alias property 0x23 twice
        let b = [0x30, 0x0A, 0, 1, b'a', 6, 0x23, 0, 1, 0x23, 0, 1];
        assert_eq!(
            dec(&b, Protocol::V5).unwrap_err().reason_code(),
            reason::PROTOCOL_ERROR
        );
        // v5: a CONNECT-only property in PUBLISH
        let b = [0x30, 0x06, 0, 1, b'a', 2, 0x17, 1];
        assert_eq!(
            dec(&b, Protocol::V5).unwrap_err().reason_code(),
            reason::PROTOCOL_ERROR
        );
        // v5: unknown property
        let b = [0x30, 0x06, 0, 1, b'a', 2, 0x7F, 1];
        assert_eq!(
            dec(&b, Protocol::V5).unwrap_err().reason_code(),
            reason::MALFORMED_PACKET
        );
        // v5: properties longer than the packet
        let b = [0x30, 0x05, 0, 1, b'a', 9, 0x01];
        assert_eq!(
            dec(&b, Protocol::V5).unwrap_err().reason_code(),
            reason::MALFORMED_PACKET
        );
    }

    #[test]
    fn publish_v5_properties() {
        // payload format 1, message expiry 10, user property ("k","v"), payload "x"
        let b = [
            0x30, 19, 0, 1, b't', 14, 0x01, 1, 0x02, 0, 0, 0, 10, 0x26, 0, 1, b'k', 0, 1, b'v',
            b'x',
        ];
        let Packet::Publish(p) = one(&b, Protocol::V5) else {
            panic!()
        };
        assert_eq!(p.properties.payload_format_indicator, Some(1));
        assert_eq!(p.properties.message_expiry_interval, Some(10));
        assert_eq!(p.properties.user_properties.len(), 1);
        assert_eq!(&p.payload[..], b"x");
    }

    #[test]
    fn incomplete_and_too_large() {
        assert_eq!(dec(&[], Protocol::V3_1_1), Ok(None));
        assert_eq!(dec(&[0x30], Protocol::V3_1_1), Ok(None));
        assert_eq!(dec(&[0x30, 0x80], Protocol::V3_1_1), Ok(None));
        assert_eq!(dec(&[0x30, 0x05, 0, 1], Protocol::V3_1_1), Ok(None));
        // remaining length of 268,435,455 is refused from the header alone
        let mut b = BytesMut::from(&[0x30, 0xFF, 0xFF, 0xFF, 0x7F][..]);
        assert!(matches!(
            decode(&mut b, Protocol::V3_1_1, 1000),
            Err(DecodeError::PacketTooLarge { .. })
        ));
        // five-byte remaining length
        assert!(matches!(
            dec(&[0x30, 0x80, 0x80, 0x80, 0x80, 0x01], Protocol::V3_1_1),
            Err(DecodeError::Malformed(_))
        ));
    }

    #[test]
    fn subscribe() {
        let b = [0x82, 0x08, 0, 1, 0, 3, b'a', b'/', b'#', 0x01];
        let Packet::Subscribe(s) = one(&b, Protocol::V3_1_1) else {
            panic!()
        };
        assert_eq!(s.filters.len(), 1);
        assert_eq!(s.filters[0].1.qos, QoS::AtLeastOnce);
        // no filters
        assert!(dec(&[0x82, 0x02, 0, 1], Protocol::V3_1_1).is_err());
        // wrong flags
        assert!(dec(
            &[0x80, 0x08, 0, 1, 0, 3, b'a', b'/', b'#', 0x01],
            Protocol::V3_1_1
        )
        .is_err());
        // v5 options: no local, retain as published, retain handling 2
        let b = [0x82, 0x07, 0, 1, 0, 0, 1, b'a', 0x2E];
        let Packet::Subscribe(s) = one(&b, Protocol::V5) else {
            panic!()
        };
        let o = s.filters[0].1;
        assert!(o.no_local && o.retain_as_published);
        assert_eq!(o.retain_handling, RetainHandling::DoNotSend);
        assert_eq!(o.qos, QoS::ExactlyOnce);
        // reserved bits on 3.1.1
        assert!(dec(&[0x82, 0x06, 0, 1, 0, 1, b'a', 0x04], Protocol::V3_1_1).is_err());
        // subscription identifier 0
        let b = [0x82, 0x08, 0, 1, 2, 0x0B, 0, 0, 1, b'a', 0];
        assert_eq!(
            dec(&b, Protocol::V5).unwrap_err().reason_code(),
            reason::PROTOCOL_ERROR
        );
    }

    #[test]
    fn small_packets() {
        assert_eq!(one(&[0xC0, 0], Protocol::V3_1_1), Packet::PingReq);
        assert!(dec(&[0xC0, 1, 0], Protocol::V3_1_1).is_err());
        assert_eq!(
            one(&[0xE0, 0], Protocol::V3_1_1),
            Packet::Disconnect(Disconnect::default())
        );
        let Packet::Disconnect(d) = one(&[0xE0, 1, 0x04], Protocol::V5) else {
            panic!()
        };
        assert_eq!(d.reason_code, reason::DISCONNECT_WITH_WILL);
        let Packet::PubRel(r) = one(&[0x62, 2, 0, 9], Protocol::V3_1_1) else {
            panic!()
        };
        assert_eq!(r.packet_id.get(), 9);
        assert!(dec(&[0x60, 2, 0, 9], Protocol::V3_1_1).is_err());
        let Packet::PubAck(a) = one(&[0x40, 3, 0, 9, 0x10], Protocol::V5) else {
            panic!()
        };
        assert_eq!(a.reason_code, reason::NO_MATCHING_SUBSCRIBERS);
        assert!(dec(&[0xF0, 0], Protocol::V3_1_1).is_err());
        assert!(dec(&[0x00, 0], Protocol::V3_1_1).is_err());
    }
}
