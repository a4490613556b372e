//! MQTT 5 properties (2.2.2): one struct holds every property, and each packet
//! kind has a mask of the properties it may carry.

use bytes::{BufMut, Bytes, BytesMut};
use bytestring::ByteString;

use crate::decode::Reader;
use crate::encode::{string_len, varint_len, write_binary, write_string, write_varint};
use crate::error::DecodeError;

/// The packet (or will) a property set belongs to; decides which ids are legal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PropertyContext {
    Connect,
    Will,
    ConnAck,
    Publish,
    PubResp,
    Subscribe,
    SubAck,
    Unsubscribe,
    UnsubAck,
    Disconnect,
    Auth,
}

pub mod id {
    pub const PAYLOAD_FORMAT_INDICATOR: u8 = 0x01;
    pub const MESSAGE_EXPIRY_INTERVAL: u8 = 0x02;
    pub const CONTENT_TYPE: u8 = 0x03;
    pub const RESPONSE_TOPIC: u8 = 0x08;
    pub const CORRELATION_DATA: u8 = 0x09;
    pub const SUBSCRIPTION_IDENTIFIER: u8 = 0x0B;
    pub const SESSION_EXPIRY_INTERVAL: u8 = 0x11;
    pub const ASSIGNED_CLIENT_IDENTIFIER: u8 = 0x12;
    pub const SERVER_KEEP_ALIVE: u8 = 0x13;
    pub const AUTHENTICATION_METHOD: u8 = 0x15;
    pub const AUTHENTICATION_DATA: u8 = 0x16;
    pub const REQUEST_PROBLEM_INFORMATION: u8 = 0x17;
    pub const WILL_DELAY_INTERVAL: u8 = 0x18;
    pub const REQUEST_RESPONSE_INFORMATION: u8 = 0x19;
    pub const RESPONSE_INFORMATION: u8 = 0x1A;
    pub const SERVER_REFERENCE: u8 = 0x1C;
    pub const REASON_STRING: u8 = 0x1F;
    pub const RECEIVE_MAXIMUM: u8 = 0x21;
    pub const TOPIC_ALIAS_MAXIMUM: u8 = 0x22;
    pub const TOPIC_ALIAS: u8 = 0x23;
    pub const MAXIMUM_QOS: u8 = 0x24;
    pub const RETAIN_AVAILABLE: u8 = 0x25;
    pub const USER_PROPERTY: u8 = 0x26;
    pub const MAXIMUM_PACKET_SIZE: u8 = 0x27;
    pub const WILDCARD_SUBSCRIPTION_AVAILABLE: u8 = 0x28;
    pub const SUBSCRIPTION_IDENTIFIER_AVAILABLE: u8 = 0x29;
    pub const SHARED_SUBSCRIPTION_AVAILABLE: u8 = 0x2A;
}

fn allowed(ctx: PropertyContext, pid: u8) -> bool {
    use PropertyContext as C;
    match pid {
        id::PAYLOAD_FORMAT_INDICATOR
        | id::MESSAGE_EXPIRY_INTERVAL
        | id::CONTENT_TYPE
        | id::RESPONSE_TOPIC
        | id::CORRELATION_DATA => matches!(ctx, C::Publish | C::Will),
        id::SUBSCRIPTION_IDENTIFIER => matches!(ctx, C::Publish | C::Subscribe),
        id::SESSION_EXPIRY_INTERVAL => matches!(ctx, C::Connect | C::ConnAck | C::Disconnect),
        id::ASSIGNED_CLIENT_IDENTIFIER
        | id::SERVER_KEEP_ALIVE
        | id::RESPONSE_INFORMATION
        | id::MAXIMUM_QOS
        | id::RETAIN_AVAILABLE
        | id::WILDCARD_SUBSCRIPTION_AVAILABLE
        | id::SUBSCRIPTION_IDENTIFIER_AVAILABLE
        | id::SHARED_SUBSCRIPTION_AVAILABLE => ctx == C::ConnAck,
        id::AUTHENTICATION_METHOD | id::AUTHENTICATION_DATA => {
            matches!(ctx, C::Connect | C::ConnAck | C::Auth)
        }
        id::REQUEST_PROBLEM_INFORMATION | id::REQUEST_RESPONSE_INFORMATION => ctx == C::Connect,
        id::WILL_DELAY_INTERVAL => ctx == C::Will,
        id::SERVER_REFERENCE => matches!(ctx, C::ConnAck | C::Disconnect),
        id::REASON_STRING => !matches!(
            ctx,
            C::Connect | C::Will | C::Publish | C::Subscribe | C::Unsubscribe
        ),
        id::RECEIVE_MAXIMUM | id::TOPIC_ALIAS_MAXIMUM | id::MAXIMUM_PACKET_SIZE => {
            matches!(ctx, C::Connect | C::ConnAck)
        }
        id::TOPIC_ALIAS => ctx == C::Publish,
        id::USER_PROPERTY => true,
        _ => false,
    }
}

/// Every MQTT 5 property. Absent properties are `None` (or empty); nothing
/// here allocates unless the peer sent user properties or subscription ids.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Properties {
    pub payload_format_indicator: Option<u8>,
    pub message_expiry_interval: Option<u32>,
    pub content_type: Option<ByteString>,
    pub response_topic: Option<ByteString>,
    pub correlation_data: Option<Bytes>,
    pub subscription_identifiers: Vec<u32>,
    pub session_expiry_interval: Option<u32>,
    pub assigned_client_identifier: Option<ByteString>,
    pub server_keep_alive: Option<u16>,
    pub authentication_method: Option<ByteString>,
    pub authentication_data: Option<Bytes>,
    pub request_problem_information: Option<u8>,
    pub will_delay_interval: Option<u32>,
    pub request_response_information: Option<u8>,
    pub response_information: Option<ByteString>,
    pub server_reference: Option<ByteString>,
    pub reason_string: Option<ByteString>,
    pub receive_maximum: Option<u16>,
    pub topic_alias_maximum: Option<u16>,
    pub topic_alias: Option<u16>,
    pub maximum_qos: Option<u8>,
    pub retain_available: Option<u8>,
    pub user_properties: Vec<(ByteString, ByteString)>,
    pub maximum_packet_size: Option<u32>,
    pub wildcard_subscription_available: Option<u8>,
    pub subscription_identifier_available: Option<u8>,
    pub shared_subscription_available: Option<u8>,
}

const DUP: DecodeError = DecodeError::Protocol("property included more than once [MQTT-2.2.2-2]");

fn set_once<T>(slot: &mut Option<T>, v: T) -> Result<(), DecodeError> {
    if slot.is_some() {
        return Err(DUP);
    }
    *slot = Some(v);
    Ok(())
}

fn flag(r: &mut Reader, what: &'static str) -> Result<u8, DecodeError> {
    let v = r.u8()?;
    if v > 1 {
        return Err(DecodeError::Protocol(what));
    }
    Ok(v)
}

impl Properties {
    /// Decode a property block (length prefix included) from `r`.
    pub(crate) fn decode(r: &mut Reader, ctx: PropertyContext) -> Result<Properties, DecodeError> {
        let len = r.varint()? as usize;
        let mut r = r.sub(len)?;
        let mut p = Properties::default();
        while r.has_remaining() {
            let pid = r.varint()?;
            let pid = u8::try_from(pid)
                .map_err(|_| DecodeError::Malformed("unknown property identifier"))?;
            if !allowed(ctx, pid) {
                return Err(if pid > id::SHARED_SUBSCRIPTION_AVAILABLE {
                    DecodeError::Malformed("unknown property identifier")
                } else {
                    DecodeError::Protocol("property not allowed in this packet")
                });
            }
            match pid {
                id::PAYLOAD_FORMAT_INDICATOR => {
                    let v = flag(&mut r, "payload format indicator must be 0 or 1")?;
                    set_once(&mut p.payload_format_indicator, v)?
                }
                id::MESSAGE_EXPIRY_INTERVAL => set_once(&mut p.message_expiry_interval, r.u32()?)?,
                id::CONTENT_TYPE => set_once(&mut p.content_type, r.string()?)?,
                id::RESPONSE_TOPIC => {
                    let t = r.string()?;
                    if !crate::topic::valid_topic_name(&t) {
                        return Err(DecodeError::Protocol(
                            "response topic must be a valid topic name",
                        ));
                    }
                    set_once(&mut p.response_topic, t)?
                }
                id::CORRELATION_DATA => set_once(&mut p.correlation_data, r.binary()?)?,
                id::SUBSCRIPTION_IDENTIFIER => {
                    let v = r.varint()?;
                    if v == 0 {
                        return Err(DecodeError::Protocol(
                            "subscription identifier 0 [MQTT-3.8.2.1.2]",
                        ));
                    }
                    if ctx == PropertyContext::Subscribe && !p.subscription_identifiers.is_empty() {
                        return Err(DUP);
                    }
                    p.subscription_identifiers.push(v)
                }
                id::SESSION_EXPIRY_INTERVAL => set_once(&mut p.session_expiry_interval, r.u32()?)?,
                id::ASSIGNED_CLIENT_IDENTIFIER => {
                    set_once(&mut p.assigned_client_identifier, r.string()?)?
                }
                id::SERVER_KEEP_ALIVE => set_once(&mut p.server_keep_alive, r.u16()?)?,
                id::AUTHENTICATION_METHOD => set_once(&mut p.authentication_method, r.string()?)?,
                id::AUTHENTICATION_DATA => set_once(&mut p.authentication_data, r.binary()?)?,
                id::REQUEST_PROBLEM_INFORMATION => {
                    let v = flag(&mut r, "request problem information must be 0 or 1")?;
                    set_once(&mut p.request_problem_information, v)?
                }
                id::WILL_DELAY_INTERVAL => set_once(&mut p.will_delay_interval, r.u32()?)?,
                id::REQUEST_RESPONSE_INFORMATION => {
                    let v = flag(&mut r, "request response information must be 0 or 1")?;
                    set_once(&mut p.request_response_information, v)?
                }
                id::RESPONSE_INFORMATION => set_once(&mut p.response_information, r.string()?)?,
                id::SERVER_REFERENCE => set_once(&mut p.server_reference, r.string()?)?,
                id::REASON_STRING => set_once(&mut p.reason_string, r.string()?)?,
                id::RECEIVE_MAXIMUM => {
                    let v = r.u16()?;
                    if v == 0 {
                        return Err(DecodeError::Protocol("receive maximum 0 [MQTT-3.1.2-?]"));
                    }
                    set_once(&mut p.receive_maximum, v)?
                }
                id::TOPIC_ALIAS_MAXIMUM => set_once(&mut p.topic_alias_maximum, r.u16()?)?,
                id::TOPIC_ALIAS => set_once(&mut p.topic_alias, r.u16()?)?,
                id::MAXIMUM_QOS => {
                    let v = flag(&mut r, "maximum QoS must be 0 or 1")?;
                    set_once(&mut p.maximum_qos, v)?
                }
                id::RETAIN_AVAILABLE => {
                    let v = flag(&mut r, "retain available must be 0 or 1")?;
                    set_once(&mut p.retain_available, v)?
                }
                id::USER_PROPERTY => {
                    let k = r.string()?;
                    let v = r.string()?;
                    p.user_properties.push((k, v))
                }
                id::MAXIMUM_PACKET_SIZE => {
                    let v = r.u32()?;
                    if v == 0 {
                        return Err(DecodeError::Protocol("maximum packet size 0"));
                    }
                    set_once(&mut p.maximum_packet_size, v)?
                }
                id::WILDCARD_SUBSCRIPTION_AVAILABLE => {
                    let v = flag(&mut r, "wildcard subscription available must be 0 or 1")?;
                    set_once(&mut p.wildcard_subscription_available, v)?
                }
                id::SUBSCRIPTION_IDENTIFIER_AVAILABLE => {
                    let v = flag(&mut r, "subscription identifier available must be 0 or 1")?;
                    set_once(&mut p.subscription_identifier_available, v)?
                }
                id::SHARED_SUBSCRIPTION_AVAILABLE => {
                    let v = flag(&mut r, "shared subscription available must be 0 or 1")?;
                    set_once(&mut p.shared_subscription_available, v)?
                }
                _ => return Err(DecodeError::Malformed("unknown property identifier")),
            }
        }
        Ok(p)
    }

    /// Length of the encoded properties, without the length prefix.
    pub fn encoded_len(&self) -> usize {
        let mut n = 0;
        let b = |o: &Option<u8>| if o.is_some() { 2 } else { 0 };
        let w = |o: &Option<u16>| if o.is_some() { 3 } else { 0 };
        let d = |o: &Option<u32>| if o.is_some() { 5 } else { 0 };
        let s = |o: &Option<ByteString>| o.as_ref().map_or(0, |v| 1 + string_len(v));
        let bin = |o: &Option<Bytes>| o.as_ref().map_or(0, |v| 3 + v.len());
        n += b(&self.payload_format_indicator) + d(&self.message_expiry_interval);
        n += s(&self.content_type) + s(&self.response_topic) + bin(&self.correlation_data);
        n += self
            .subscription_identifiers
            .iter()
            .map(|v| 1 + varint_len(*v as usize))
            .sum::<usize>();
        n += d(&self.session_expiry_interval) + s(&self.assigned_client_identifier);
        n += w(&self.server_keep_alive)
            + s(&self.authentication_method)
            + bin(&self.authentication_data);
        n += b(&self.request_problem_information) + d(&self.will_delay_interval);
        n += b(&self.request_response_information) + s(&self.response_information);
        n += s(&self.server_reference) + s(&self.reason_string) + w(&self.receive_maximum);
        n += w(&self.topic_alias_maximum) + w(&self.topic_alias) + b(&self.maximum_qos);
        n += b(&self.retain_available);
        n += self
            .user_properties
            .iter()
            .map(|(k, v)| 1 + string_len(k) + string_len(v))
            .sum::<usize>();
        n += d(&self.maximum_packet_size) + b(&self.wildcard_subscription_available);
        n += b(&self.subscription_identifier_available) + b(&self.shared_subscription_available);
        n
    }

    /// Write the properties without the length prefix.
    pub fn write(&self, buf: &mut BytesMut) {
        fn b(buf: &mut BytesMut, pid: u8, o: Option<u8>) {
            if let Some(v) = o {
                buf.put_u8(pid);
                buf.put_u8(v);
            }
        }
        fn w(buf: &mut BytesMut, pid: u8, o: Option<u16>) {
            if let Some(v) = o {
                buf.put_u8(pid);
                buf.put_u16(v);
            }
        }
        fn d(buf: &mut BytesMut, pid: u8, o: Option<u32>) {
            if let Some(v) = o {
                buf.put_u8(pid);
                buf.put_u32(v);
            }
        }
        fn s(buf: &mut BytesMut, pid: u8, o: &Option<ByteString>) {
            if let Some(v) = o {
                buf.put_u8(pid);
                write_string(buf, v);
            }
        }
        fn bin(buf: &mut BytesMut, pid: u8, o: &Option<Bytes>) {
            if let Some(v) = o {
                buf.put_u8(pid);
                write_binary(buf, v);
            }
        }
        b(
            buf,
            id::PAYLOAD_FORMAT_INDICATOR,
            self.payload_format_indicator,
        );
        d(
            buf,
            id::MESSAGE_EXPIRY_INTERVAL,
            self.message_expiry_interval,
        );
        s(buf, id::CONTENT_TYPE, &self.content_type);
        s(buf, id::RESPONSE_TOPIC, &self.response_topic);
        bin(buf, id::CORRELATION_DATA, &self.correlation_data);
        for v in &self.subscription_identifiers {
            buf.put_u8(id::SUBSCRIPTION_IDENTIFIER);
            write_varint(buf, *v as usize);
        }
        d(
            buf,
            id::SESSION_EXPIRY_INTERVAL,
            self.session_expiry_interval,
        );
        s(
            buf,
            id::ASSIGNED_CLIENT_IDENTIFIER,
            &self.assigned_client_identifier,
        );
        w(buf, id::SERVER_KEEP_ALIVE, self.server_keep_alive);
        s(buf, id::AUTHENTICATION_METHOD, &self.authentication_method);
        bin(buf, id::AUTHENTICATION_DATA, &self.authentication_data);
        b(
            buf,
            id::REQUEST_PROBLEM_INFORMATION,
            self.request_problem_information,
        );
        d(buf, id::WILL_DELAY_INTERVAL, self.will_delay_interval);
        b(
            buf,
            id::REQUEST_RESPONSE_INFORMATION,
            self.request_response_information,
        );
        s(buf, id::RESPONSE_INFORMATION, &self.response_information);
        s(buf, id::SERVER_REFERENCE, &self.server_reference);
        s(buf, id::REASON_STRING, &self.reason_string);
        w(buf, id::RECEIVE_MAXIMUM, self.receive_maximum);
        w(buf, id::TOPIC_ALIAS_MAXIMUM, self.topic_alias_maximum);
        w(buf, id::TOPIC_ALIAS, self.topic_alias);
        b(buf, id::MAXIMUM_QOS, self.maximum_qos);
        b(buf, id::RETAIN_AVAILABLE, self.retain_available);
        for (k, v) in &self.user_properties {
            buf.put_u8(id::USER_PROPERTY);
            write_string(buf, k);
            write_string(buf, v);
        }
        d(buf, id::MAXIMUM_PACKET_SIZE, self.maximum_packet_size);
        b(
            buf,
            id::WILDCARD_SUBSCRIPTION_AVAILABLE,
            self.wildcard_subscription_available,
        );
        b(
            buf,
            id::SUBSCRIPTION_IDENTIFIER_AVAILABLE,
            self.subscription_identifier_available,
        );
        b(
            buf,
            id::SHARED_SUBSCRIPTION_AVAILABLE,
            self.shared_subscription_available,
        );
    }

    pub fn is_empty(&self) -> bool {
        self.encoded_len() == 0
    }
}
