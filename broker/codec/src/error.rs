//! Decode errors: small, `Copy`, and each maps to the reason code the broker
//! answers with.

use crate::types::reason;

/// Why a frame could not be decoded. The `&'static str` names the rule that
/// was broken (with the spec clause where there is one), for logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The bytes do not form a packet (0x81).
    #[error("malformed packet: {0}")]
    Malformed(&'static str),
    /// The bytes form a packet the protocol does not allow here (0x82).
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    /// The fixed header announces more than the maximum packet size (0x95).
    /// Raised before the body is buffered.
    #[error("packet of {size} bytes exceeds the maximum of {max}")]
    PacketTooLarge { size: usize, max: usize },
    /// CONNECT with a protocol name or level we do not speak (0x84 / 0x01).
    #[error("unsupported protocol name or level")]
    UnsupportedProtocol,
    /// A topic name that is not allowed in PUBLISH (0x90).
    #[error("invalid topic name: {0}")]
    TopicName(&'static str),
}

impl DecodeError {
    /// The MQTT 5 reason code for a CONNACK or DISCONNECT answering this error.
    pub fn reason_code(&self) -> u8 {
        match self {
            DecodeError::Malformed(_) => reason::MALFORMED_PACKET,
            DecodeError::Protocol(_) => reason::PROTOCOL_ERROR,
            DecodeError::PacketTooLarge { .. } => reason::PACKET_TOO_LARGE,
            DecodeError::UnsupportedProtocol => reason::UNSUPPORTED_PROTOCOL_VERSION,
            DecodeError::TopicName(_) => reason::TOPIC_NAME_INVALID,
        }
    }
}

/// Errors of the `tokio_util` codec: a decode error or an I/O error.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}
