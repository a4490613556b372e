//! Encoding. Each packet's remaining length is computed first, so the frame
//! is written once, straight into the caller's buffer.

use bytes::{BufMut, BytesMut};

use crate::packet::*;
use crate::properties::Properties;
use crate::types::{Protocol, QoS};

pub fn varint_len(v: usize) -> usize {
    match v {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

pub fn write_varint(buf: &mut BytesMut, mut v: usize) {
    loop {
        let mut b = (v % 128) as u8;
        v /= 128;
        if v > 0 {
            b |= 0x80;
        }
        buf.put_u8(b);
        if v == 0 {
            break;
        }
    }
}

pub fn string_len(s: &str) -> usize {
    2 + s.len()
}

pub fn write_string(buf: &mut BytesMut, s: &str) {
    write_binary(buf, s.as_bytes())
}

pub fn write_binary(buf: &mut BytesMut, b: &[u8]) {
    buf.put_u16(b.len() as u16);
    buf.put_slice(b);
}

fn props_block_len(p: &Properties) -> usize {
    let n = p.encoded_len();
    varint_len(n) + n
}

fn write_props(buf: &mut BytesMut, p: &Properties) {
    write_varint(buf, p.encoded_len());
    p.write(buf);
}

fn header(buf: &mut BytesMut, byte0: u8, remaining: usize) {
    buf.reserve(1 + varint_len(remaining) + remaining);
    buf.put_u8(byte0);
    write_varint(buf, remaining);
}

/// Per-delivery parts of an outgoing PUBLISH that are not in the stored
/// message: they differ per subscriber, so they are passed beside it rather
/// than cloned into it.
#[derive(Debug, Clone, Copy, Default)]
pub struct PublishExtras<'a> {
    pub topic_alias: Option<u16>,
    pub subscription_identifiers: &'a [u32],
    /// Remaining message expiry, replacing the stored one.
    pub message_expiry_interval: Option<u32>,
}

/// Everything of a PUBLISH but its properties' per-delivery parts.
#[derive(Debug, Clone, Copy)]
pub struct PublishHeader<'a> {
    pub dup: bool,
    pub qos: QoS,
    pub retain: bool,
    /// Empty when `extras.topic_alias` stands for a topic the peer knows.
    pub topic: &'a str,
    pub packet_id: Option<PacketId>,
}

/// Write a PUBLISH whose stored properties (`base`) carry no topic alias, no
/// subscription identifier and no message expiry: those come from `extras`.
/// Returns the frame length.
pub fn encode_publish_parts(
    buf: &mut BytesMut,
    protocol: Protocol,
    h: PublishHeader<'_>,
    base: &Properties,
    extras: PublishExtras<'_>,
    payload: &[u8],
) -> usize {
    let start = buf.len();
    let mut remaining = string_len(h.topic) + payload.len();
    if h.qos != QoS::AtMostOnce {
        remaining += 2;
    }
    let mut props_len = 0;
    if protocol.is_v5() {
        props_len = base.encoded_len()
            + extras.topic_alias.map_or(0, |_| 3)
            + extras.message_expiry_interval.map_or(0, |_| 5)
            + extras
                .subscription_identifiers
                .iter()
                .map(|v| 1 + varint_len(*v as usize))
                .sum::<usize>();
        remaining += varint_len(props_len) + props_len;
    }
    let byte0 = 0x30 | (u8::from(h.dup) << 3) | (h.qos.as_u8() << 1) | u8::from(h.retain);
    header(buf, byte0, remaining);
    write_string(buf, h.topic);
    if h.qos != QoS::AtMostOnce {
        buf.put_u16(h.packet_id.map_or(0, |p| p.get()));
    }
    if protocol.is_v5() {
        write_varint(buf, props_len);
        if let Some(v) = extras.message_expiry_interval {
            buf.put_u8(crate::properties::id::MESSAGE_EXPIRY_INTERVAL);
            buf.put_u32(v);
        }
        if let Some(v) = extras.topic_alias {
            buf.put_u8(crate::properties::id::TOPIC_ALIAS);
            buf.put_u16(v);
        }
        for v in extras.subscription_identifiers {
            buf.put_u8(crate::properties::id::SUBSCRIPTION_IDENTIFIER);
            write_varint(buf, *v as usize);
        }
        base.write(buf);
    }
    buf.put_slice(payload);
    buf.len() - start
}

fn pub_resp(buf: &mut BytesMut, byte0: u8, r: &PubResp, protocol: Protocol) {
    if protocol.is_v5() && (r.reason_code != 0 || !r.properties.is_empty()) {
        let has_props = !r.properties.is_empty();
        let remaining = 3 + if has_props {
            props_block_len(&r.properties)
        } else {
            0
        };
        header(buf, byte0, remaining);
        buf.put_u16(r.packet_id.get());
        buf.put_u8(r.reason_code);
        if has_props {
            write_props(buf, &r.properties);
        }
    } else {
        header(buf, byte0, 2);
        buf.put_u16(r.packet_id.get());
    }
}

/// Write `packet` as `protocol` frames it. CONNECT uses its own protocol.
pub fn encode(packet: &Packet, protocol: Protocol, buf: &mut BytesMut) {
    let v5 = protocol.is_v5();
    match packet {
        Packet::Connect(c) => encode_connect(c, buf),
        Packet::ConnAck(a) => {
            let remaining = 2 + if v5 {
                props_block_len(&a.properties)
            } else {
                0
            };
            header(buf, 0x20, remaining);
            buf.put_u8(u8::from(a.session_present));
            buf.put_u8(a.reason_code);
            if v5 {
                write_props(buf, &a.properties);
            }
        }
        Packet::Publish(p) => {
            let mut base = p.properties.clone();
            let extras = PublishExtras {
                topic_alias: base.topic_alias.take(),
                subscription_identifiers: &[],
                message_expiry_interval: base.message_expiry_interval.take(),
            };
            let ids = std::mem::take(&mut base.subscription_identifiers);
            let extras = PublishExtras {
                subscription_identifiers: &ids,
                ..extras
            };
            let h = PublishHeader {
                dup: p.dup,
                qos: p.qos,
                retain: p.retain,
                topic: &p.topic,
                packet_id: p.packet_id,
            };
            encode_publish_parts(buf, protocol, h, &base, extras, &p.payload);
        }
        Packet::PubAck(r) => pub_resp(buf, 0x40, r, protocol),
        Packet::PubRec(r) => pub_resp(buf, 0x50, r, protocol),
        Packet::PubRel(r) => pub_resp(buf, 0x62, r, protocol),
        Packet::PubComp(r) => pub_resp(buf, 0x70, r, protocol),
        Packet::Subscribe(s) => {
            let mut remaining = 2 + s
                .filters
                .iter()
                .map(|(f, _)| string_len(f) + 1)
                .sum::<usize>();
            if v5 {
                remaining += props_block_len(&s.properties);
            }
            header(buf, 0x82, remaining);
            buf.put_u16(s.packet_id.get());
            if v5 {
                write_props(buf, &s.properties);
            }
            for (f, o) in &s.filters {
                write_string(buf, f);
                buf.put_u8(o.to_byte(protocol));
            }
        }
        Packet::SubAck(s) => {
            let remaining = 2
                + s.reason_codes.len()
                + if v5 {
                    props_block_len(&s.properties)
                } else {
                    0
                };
            header(buf, 0x90, remaining);
            buf.put_u16(s.packet_id.get());
            if v5 {
                write_props(buf, &s.properties);
            }
            buf.put_slice(&s.reason_codes);
        }
        Packet::Unsubscribe(u) => {
            let mut remaining = 2 + u.filters.iter().map(|f| string_len(f)).sum::<usize>();
            if v5 {
                remaining += props_block_len(&u.properties);
            }
            header(buf, 0xA2, remaining);
            buf.put_u16(u.packet_id.get());
            if v5 {
                write_props(buf, &u.properties);
            }
            for f in &u.filters {
                write_string(buf, f);
            }
        }
        Packet::UnsubAck(u) => {
            if v5 {
                let remaining = 2 + props_block_len(&u.properties) + u.reason_codes.len();
                header(buf, 0xB0, remaining);
                buf.put_u16(u.packet_id.get());
                write_props(buf, &u.properties);
                buf.put_slice(&u.reason_codes);
            } else {
                header(buf, 0xB0, 2);
                buf.put_u16(u.packet_id.get());
            }
        }
        Packet::PingReq => header(buf, 0xC0, 0),
        Packet::PingResp => header(buf, 0xD0, 0),
        Packet::Disconnect(d) => {
            if v5 && (d.reason_code != 0 || !d.properties.is_empty()) {
                let remaining = 1 + props_block_len(&d.properties);
                header(buf, 0xE0, remaining);
                buf.put_u8(d.reason_code);
                write_props(buf, &d.properties);
            } else {
                header(buf, 0xE0, 0);
            }
        }
        Packet::Auth(a) => {
            let remaining = 1 + props_block_len(&a.properties);
            header(buf, 0xF0, remaining);
            buf.put_u8(a.reason_code);
            write_props(buf, &a.properties);
        }
    }
}

fn encode_connect(c: &Connect, buf: &mut BytesMut) {
    let v5 = c.protocol.is_v5();
    let name = c.protocol.name();
    let mut remaining = 2 + name.len() + 1 + 1 + 2 + string_len(&c.client_id);
    if v5 {
        remaining += props_block_len(&c.properties);
    }
    if let Some(w) = &c.will {
        remaining += string_len(&w.topic) + 2 + w.payload.len();
        if v5 {
            remaining += props_block_len(&w.properties);
        }
    }
    if let Some(u) = &c.username {
        remaining += string_len(u);
    }
    if let Some(p) = &c.password {
        remaining += 2 + p.len();
    }
    header(buf, 0x10, remaining);
    write_binary(buf, name);
    buf.put_u8(c.protocol.level());
    let mut flags = 0u8;
    if c.clean_start {
        flags |= 0x02;
    }
    if let Some(w) = &c.will {
        flags |= 0x04 | (w.qos.as_u8() << 3);
        if w.retain {
            flags |= 0x20;
        }
    }
    if c.password.is_some() {
        flags |= 0x40;
    }
    if c.username.is_some() {
        flags |= 0x80;
    }
    buf.put_u8(flags);
    buf.put_u16(c.keep_alive);
    if v5 {
        write_props(buf, &c.properties);
    }
    write_string(buf, &c.client_id);
    if let Some(w) = &c.will {
        if v5 {
            write_props(buf, &w.properties);
        }
        write_string(buf, &w.topic);
        write_binary(buf, &w.payload);
    }
    if let Some(u) = &c.username {
        write_string(buf, u);
    }
    if let Some(p) = &c.password {
        write_binary(buf, p);
    }
}
