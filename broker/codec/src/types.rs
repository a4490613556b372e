//! Small value types shared by every packet.

use std::fmt;

/// The protocol level a client asked for in CONNECT; it decides the wire
/// format of every later packet on that connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    /// MQTT 3.1: protocol name `MQIsdp`, level 3.
    V3_1,
    /// MQTT 3.1.1: protocol name `MQTT`, level 4.
    V3_1_1,
    /// MQTT 5.0: protocol name `MQTT`, level 5.
    V5,
}

impl Protocol {
    pub fn level(self) -> u8 {
        match self {
            Protocol::V3_1 => 3,
            Protocol::V3_1_1 => 4,
            Protocol::V5 => 5,
        }
    }

    pub fn name(self) -> &'static [u8] {
        match self {
            Protocol::V3_1 => b"MQIsdp",
            _ => b"MQTT",
        }
    }

    pub fn is_v5(self) -> bool {
        self == Protocol::V5
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::V3_1 => "3.1",
            Protocol::V3_1_1 => "3.1.1",
            Protocol::V5 => "5.0",
        })
    }
}

/// Quality of service. QoS 3 is unrepresentable: the decoder rejects it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum QoS {
    #[default]
    AtMostOnce = 0,
    AtLeastOnce = 1,
    ExactlyOnce = 2,
}

impl QoS {
    pub fn from_u8(v: u8) -> Option<QoS> {
        match v {
            0 => Some(QoS::AtMostOnce),
            1 => Some(QoS::AtLeastOnce),
            2 => Some(QoS::ExactlyOnce),
            _ => None,
        }
    }

    pub fn as_u8(self) -> u8 {
        self as u8
    }
}

/// Retain handling option of a subscription (MQTT 5, 3.8.3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum RetainHandling {
    /// Send retained messages at the time of the subscribe.
    #[default]
    SendAlways = 0,
    /// Send retained messages only if the subscription did not exist.
    SendIfNew = 1,
    /// Never send retained messages on subscribe.
    DoNotSend = 2,
}

/// Options of one topic filter in SUBSCRIBE.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct SubscriptionOptions {
    pub qos: QoS,
    pub no_local: bool,
    pub retain_as_published: bool,
    pub retain_handling: RetainHandling,
}

impl SubscriptionOptions {
    pub fn new(qos: QoS) -> Self {
        SubscriptionOptions {
            qos,
            ..Default::default()
        }
    }

    pub(crate) fn to_byte(self, protocol: Protocol) -> u8 {
        let mut b = self.qos.as_u8();
        if protocol.is_v5() {
            if self.no_local {
                b |= 0x04;
            }
            if self.retain_as_published {
                b |= 0x08;
            }
            b |= (self.retain_handling as u8) << 4;
        }
        b
    }
}

/// Reason codes (MQTT 5, 2.4) and the MQTT 3.x CONNACK return codes.
///
/// Plain `u8` constants rather than an enum: the same number means different
/// things in different packets (0x00 is Success, Normal disconnection and
/// Granted QoS 0), and a peer may send a code we do not know.
pub mod reason {
    pub const SUCCESS: u8 = 0x00;
    pub const NORMAL_DISCONNECTION: u8 = 0x00;
    pub const GRANTED_QOS_0: u8 = 0x00;
    pub const GRANTED_QOS_1: u8 = 0x01;
    pub const GRANTED_QOS_2: u8 = 0x02;
    pub const DISCONNECT_WITH_WILL: u8 = 0x04;
    pub const NO_MATCHING_SUBSCRIBERS: u8 = 0x10;
    pub const NO_SUBSCRIPTION_EXISTED: u8 = 0x11;
    pub const CONTINUE_AUTHENTICATION: u8 = 0x18;
    pub const REAUTHENTICATE: u8 = 0x19;
    pub const UNSPECIFIED_ERROR: u8 = 0x80;
    pub const MALFORMED_PACKET: u8 = 0x81;
    pub const PROTOCOL_ERROR: u8 = 0x82;
    pub const IMPLEMENTATION_SPECIFIC_ERROR: u8 = 0x83;
    pub const UNSUPPORTED_PROTOCOL_VERSION: u8 = 0x84;
    pub const CLIENT_IDENTIFIER_NOT_VALID: u8 = 0x85;
    pub const BAD_USER_NAME_OR_PASSWORD: u8 = 0x86;
    pub const NOT_AUTHORIZED: u8 = 0x87;
    pub const SERVER_UNAVAILABLE: u8 = 0x88;
    pub const SERVER_BUSY: u8 = 0x89;
    pub const BANNED: u8 = 0x8A;
    pub const SERVER_SHUTTING_DOWN: u8 = 0x8B;
    pub const BAD_AUTHENTICATION_METHOD: u8 = 0x8C;
    pub const KEEP_ALIVE_TIMEOUT: u8 = 0x8D;
    pub const SESSION_TAKEN_OVER: u8 = 0x8E;
    pub const TOPIC_FILTER_INVALID: u8 = 0x8F;
    pub const TOPIC_NAME_INVALID: u8 = 0x90;
    pub const PACKET_IDENTIFIER_IN_USE: u8 = 0x91;
    pub const PACKET_IDENTIFIER_NOT_FOUND: u8 = 0x92;
    pub const RECEIVE_MAXIMUM_EXCEEDED: u8 = 0x93;
    pub const TOPIC_ALIAS_INVALID: u8 = 0x94;
    pub const PACKET_TOO_LARGE: u8 = 0x95;
    pub const MESSAGE_RATE_TOO_HIGH: u8 = 0x96;
    pub const QUOTA_EXCEEDED: u8 = 0x97;
    pub const ADMINISTRATIVE_ACTION: u8 = 0x98;
    pub const PAYLOAD_FORMAT_INVALID: u8 = 0x99;
    pub const RETAIN_NOT_SUPPORTED: u8 = 0x9A;
    pub const QOS_NOT_SUPPORTED: u8 = 0x9B;
    pub const USE_ANOTHER_SERVER: u8 = 0x9C;
    pub const SERVER_MOVED: u8 = 0x9D;
    pub const SHARED_SUBSCRIPTIONS_NOT_SUPPORTED: u8 = 0x9E;
    pub const CONNECTION_RATE_EXCEEDED: u8 = 0x9F;
    pub const MAXIMUM_CONNECT_TIME: u8 = 0xA0;
    pub const SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED: u8 = 0xA1;
    pub const WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED: u8 = 0xA2;

    /// MQTT 3.1/3.1.1 CONNACK return codes.
    pub mod v3 {
        pub const ACCEPTED: u8 = 0x00;
        pub const UNACCEPTABLE_PROTOCOL_VERSION: u8 = 0x01;
        pub const IDENTIFIER_REJECTED: u8 = 0x02;
        pub const SERVER_UNAVAILABLE: u8 = 0x03;
        pub const BAD_USER_NAME_OR_PASSWORD: u8 = 0x04;
        pub const NOT_AUTHORIZED: u8 = 0x05;
        /// SUBACK failure in 3.1.1.
        pub const SUBACK_FAILURE: u8 = 0x80;
    }

    /// The closest MQTT 3.x CONNACK return code for an MQTT 5 reason code.
    pub fn connack_v3(code: u8) -> u8 {
        match code {
            SUCCESS => v3::ACCEPTED,
            UNSUPPORTED_PROTOCOL_VERSION => v3::UNACCEPTABLE_PROTOCOL_VERSION,
            CLIENT_IDENTIFIER_NOT_VALID => v3::IDENTIFIER_REJECTED,
            BAD_USER_NAME_OR_PASSWORD | BAD_AUTHENTICATION_METHOD => v3::BAD_USER_NAME_OR_PASSWORD,
            NOT_AUTHORIZED | BANNED => v3::NOT_AUTHORIZED,
            _ => v3::SERVER_UNAVAILABLE,
        }
    }
}
