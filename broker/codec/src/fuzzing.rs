//! Bodies of the two fuzz targets in `broker/codec/fuzz`. They live here so
//! that a bounded unit test runs them on stable Rust in every CI run, and the
//! coverage-guided fuzzer (`cargo fuzz`, nightly) runs them without bound.

use bytes::{Bytes, BytesMut};
use bytestring::ByteString;

use crate::packet::*;
use crate::properties::Properties;
use crate::types::{Protocol, QoS, RetainHandling, SubscriptionOptions};

const PROTOCOLS: [Protocol; 3] = [Protocol::V3_1, Protocol::V3_1_1, Protocol::V5];

/// Raw bytes into the decoder, as each protocol. Whatever decodes must
/// survive an encode → decode round trip unchanged.
pub fn decode_raw(data: &[u8]) {
    for protocol in PROTOCOLS {
        let mut buf = BytesMut::from(data);
        // Each round either consumes a frame or stops, so this ends.
        while let Ok(Some(packet)) = crate::decode::decode(&mut buf, protocol, 1 << 16) {
            let proto = match &packet {
                Packet::Connect(c) => c.protocol,
                _ => protocol,
            };
            let mut out = BytesMut::new();
            crate::encode::encode(&packet, proto, &mut out);
            let again = crate::decode::decode(&mut out, proto, usize::MAX);
            assert_eq!(again, Ok(Some(packet)), "round trip of a decoded packet");
            assert!(out.is_empty());
        }
    }
}

/// A tiny byte-driven generator: the fuzzer's bytes choose the packet.
struct Gen<'a> {
    data: &'a [u8],
}

impl Gen<'_> {
    fn u8(&mut self) -> u8 {
        match self.data.split_first() {
            Some((b, rest)) => {
                self.data = rest;
                *b
            }
            None => 0,
        }
    }
    fn u16(&mut self) -> u16 {
        u16::from(self.u8()) << 8 | u16::from(self.u8())
    }
    fn u32(&mut self) -> u32 {
        u32::from(self.u16()) << 16 | u32::from(self.u16())
    }
    fn bool(&mut self) -> bool {
        self.u8() & 1 == 1
    }
    fn pid(&mut self) -> PacketId {
        PacketId::new(self.u16()).unwrap_or(PacketId::MIN)
    }
    fn qos(&mut self) -> QoS {
        QoS::from_u8(self.u8() % 3).unwrap_or_default()
    }
    fn string(&mut self, alphabet: &[u8]) -> ByteString {
        let n = usize::from(self.u8() % 12);
        let s: String = (0..n)
            .map(|_| char::from(alphabet[usize::from(self.u8()) % alphabet.len()]))
            .collect();
        ByteString::from(s)
    }
    fn topic(&mut self) -> ByteString {
        let t = self.string(b"ab/$x");
        if t.is_empty() {
            ByteString::from_static("t")
        } else {
            t
        }
    }
    fn bytes(&mut self) -> Bytes {
        let n = usize::from(self.u8() % 16);
        Bytes::from((0..n).map(|_| self.u8()).collect::<Vec<u8>>())
    }
    fn props(&mut self, which: &[u8]) -> Properties {
        let mut p = Properties::default();
        for &id in which {
            if !self.bool() {
                continue;
            }
            match id {
                0x01 => p.payload_format_indicator = Some(self.u8() & 1),
                0x02 => p.message_expiry_interval = Some(self.u32()),
                0x03 => p.content_type = Some(self.string(b"abc/")),
                0x08 => p.response_topic = Some(self.topic()),
                0x09 => p.correlation_data = Some(self.bytes()),
                0x0B => p.subscription_identifiers.push(u32::from(self.u16()) + 1),
                0x11 => p.session_expiry_interval = Some(self.u32()),
                0x12 => p.assigned_client_identifier = Some(self.string(b"abc")),
                0x13 => p.server_keep_alive = Some(self.u16()),
                0x15 => p.authentication_method = Some(self.string(b"abc")),
                0x17 => p.request_problem_information = Some(self.u8() & 1),
                0x18 => p.will_delay_interval = Some(self.u32()),
                0x1F => p.reason_string = Some(self.string(b"abc ")),
                0x21 => p.receive_maximum = Some(self.u16().max(1)),
                0x22 => p.topic_alias_maximum = Some(self.u16()),
                0x23 => p.topic_alias = Some(self.u16()),
                0x24 => p.maximum_qos = Some(self.u8() & 1),
                0x26 => {
                    let k = self.string(b"kv");
                    let v = self.string(b"kv\xC3");
                    p.user_properties.push((k, v))
                }
                0x27 => p.maximum_packet_size = Some(self.u32().max(1)),
                _ => {}
            }
        }
        p
    }
}

/// A generated packet through encode → decode: it must come back unchanged.
pub fn roundtrip(data: &[u8]) {
    let mut g = Gen { data };
    let protocol = PROTOCOLS[usize::from(g.u8() % 3)];
    let v5 = protocol.is_v5();
    let props = |g: &mut Gen, which: &[u8]| {
        if v5 {
            g.props(which)
        } else {
            Properties::default()
        }
    };
    let packet = match g.u8() % 12 {
        0 => {
            let will = if g.bool() {
                Some(LastWill {
                    topic: g.topic(),
                    payload: g.bytes(),
                    qos: g.qos(),
                    retain: g.bool(),
                    properties: props(&mut g, &[0x01, 0x02, 0x03, 0x08, 0x09, 0x18, 0x26]),
                })
            } else {
                None
            };
            let username = if g.bool() {
                Some(g.string(b"user"))
            } else {
                None
            };
            let password = if username.is_some() || v5 {
                g.bool().then(|| g.bytes())
            } else {
                None
            };
            Packet::Connect(Box::new(Connect {
                protocol,
                clean_start: g.bool(),
                keep_alive: g.u16(),
                properties: props(&mut g, &[0x11, 0x15, 0x17, 0x21, 0x22, 0x26, 0x27]),
                client_id: g.string(b"cid"),
                will,
                username,
                password,
            }))
        }
        1 => Packet::ConnAck(ConnAck {
            session_present: g.bool(),
            reason_code: g.u8(),
            properties: props(
                &mut g,
                &[0x11, 0x12, 0x13, 0x1F, 0x21, 0x22, 0x24, 0x26, 0x27],
            ),
        }),
        2 => {
            let qos = g.qos();
            Packet::Publish(Publish {
                dup: qos != QoS::AtMostOnce && g.bool(),
                qos,
                retain: g.bool(),
                topic: g.topic(),
                packet_id: (qos != QoS::AtMostOnce).then(|| g.pid()),
                properties: props(&mut g, &[0x01, 0x02, 0x03, 0x08, 0x09, 0x0B, 0x23, 0x26]),
                payload: g.bytes(),
            })
        }
        3..=6 => {
            let kind = g.u8() % 4;
            let mut r = PubResp::new(g.pid(), 0);
            if v5 {
                r.reason_code = g.u8();
                r.properties = g.props(&[0x1F, 0x26]);
            }
            match kind {
                0 => Packet::PubAck(r),
                1 => Packet::PubRec(r),
                2 => Packet::PubRel(r),
                _ => Packet::PubComp(r),
            }
        }
        7 => {
            let n = 1 + usize::from(g.u8() % 4);
            let filters = (0..n)
                .map(|_| {
                    let mut o = SubscriptionOptions::new(g.qos());
                    if v5 {
                        o.no_local = g.bool();
                        o.retain_as_published = g.bool();
                        o.retain_handling = match g.u8() % 3 {
                            0 => RetainHandling::SendAlways,
                            1 => RetainHandling::SendIfNew,
                            _ => RetainHandling::DoNotSend,
                        };
                    }
                    (g.string(b"a/+#"), o)
                })
                .collect();
            let mut properties = props(&mut g, &[0x0B, 0x26]);
            properties.subscription_identifiers.truncate(1);
            Packet::Subscribe(Subscribe {
                packet_id: g.pid(),
                properties,
                filters,
            })
        }
        8 => {
            let n = 1 + usize::from(g.u8() % 4);
            Packet::SubAck(SubAck {
                packet_id: g.pid(),
                properties: props(&mut g, &[0x1F, 0x26]),
                reason_codes: (0..n).map(|_| g.u8()).collect(),
            })
        }
        9 => {
            let n = 1 + usize::from(g.u8() % 4);
            Packet::Unsubscribe(Unsubscribe {
                packet_id: g.pid(),
                properties: props(&mut g, &[0x26]),
                filters: (0..n).map(|_| g.string(b"a/+#")).collect(),
            })
        }
        10 => Packet::UnsubAck(UnsubAck {
            packet_id: g.pid(),
            properties: props(&mut g, &[0x1F, 0x26]),
            reason_codes: if v5 { vec![g.u8()] } else { Vec::new() },
        }),
        _ => match g.u8() % 4 {
            0 => Packet::PingReq,
            1 => Packet::PingResp,
            2 => Packet::Disconnect(Disconnect {
                reason_code: if v5 { g.u8() } else { 0 },
                properties: props(&mut g, &[0x11, 0x1F, 0x26]),
            }),
            _ if v5 => Packet::Auth(Auth {
                reason_code: g.u8(),
                properties: g.props(&[0x15, 0x1F, 0x26]),
            }),
            _ => Packet::PingReq,
        },
    };
    let mut buf = BytesMut::new();
    crate::encode::encode(&packet, protocol, &mut buf);
    let decoded = crate::decode::decode(&mut buf, protocol, usize::MAX);
    assert_eq!(decoded, Ok(Some(packet)));
    assert!(buf.is_empty());
}

#[cfg(test)]
mod tests {
    /// xorshift64*: deterministic bytes for a bounded run of both targets.
    fn bytes(seed: &mut u64, out: &mut Vec<u8>) {
        out.clear();
        let n = (*seed % 96) as usize;
        for _ in 0..n {
            *seed ^= *seed >> 12;
            *seed ^= *seed << 25;
            *seed ^= *seed >> 27;
            out.push((seed.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 56) as u8);
        }
    }

    #[test]
    fn fuzz_targets_bounded() {
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut data = Vec::new();
        for i in 0..30_000 {
            bytes(&mut seed, &mut data);
            super::roundtrip(&data);
            // Make random bytes look like frames more often: a valid first
            // byte and a remaining length that fits.
            if data.len() > 2 {
                data[1] = (data.len() - 2).min(127) as u8;
                if i % 2 == 0 {
                    data[0] = (data[0] & 0xF0)
                        | if matches!(data[0] >> 4, 6 | 8 | 10) {
                            2
                        } else {
                            0
                        };
                }
            }
            super::decode_raw(&data);
        }
    }
}
