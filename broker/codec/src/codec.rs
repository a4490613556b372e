//! `tokio_util::codec` glue, for clients and tests that want a `Framed`.

use bytes::BytesMut;
use tokio_util::codec::{Decoder, Encoder};

use crate::error::CodecError;
use crate::packet::Packet;
use crate::types::Protocol;

/// Decodes and encodes packets for one connection. The protocol starts at
/// 3.1.1 (CONNECT carries its own) and is set once CONNECT is seen.
#[derive(Debug, Clone)]
pub struct MqttCodec {
    pub protocol: Protocol,
    pub max_packet_size: usize,
}

impl MqttCodec {
    pub fn new(protocol: Protocol, max_packet_size: usize) -> Self {
        MqttCodec {
            protocol,
            max_packet_size,
        }
    }
}

impl Decoder for MqttCodec {
    type Item = Packet;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Packet>, CodecError> {
        let packet = crate::decode::decode(src, self.protocol, self.max_packet_size)?;
        if let Some(Packet::Connect(c)) = &packet {
            self.protocol = c.protocol;
        }
        Ok(packet)
    }
}

impl Encoder<Packet> for MqttCodec {
    type Error = CodecError;

    fn encode(&mut self, item: Packet, dst: &mut BytesMut) -> Result<(), CodecError> {
        if let Packet::Connect(c) = &item {
            self.protocol = c.protocol;
        }
        crate::encode::encode(&item, self.protocol, dst);
        Ok(())
    }
}
