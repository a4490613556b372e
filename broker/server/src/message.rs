//! A message as the broker holds it: decoded once, shared by `Arc` with every
//! subscriber; per-subscriber parts travel beside it in [`Delivery`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use cirrus_codec::{ByteString, Bytes, Properties, QoS};

#[derive(Debug)]
pub struct Message {
    pub topic: ByteString,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    /// Properties passed through to subscribers, without the per-hop ones
    /// (topic alias, subscription identifiers, message expiry).
    pub properties: Properties,
    /// When the message expires (MQTT 5 Message Expiry Interval).
    pub expires_at: Option<Instant>,
    /// Client id of the publisher, for No Local; `None` for wills of ended
    /// sessions and for `$SYS`.
    pub publisher: Option<ByteString>,
    /// When this pod received it (for the delivery latency histogram).
    pub received: Instant,
}

impl Message {
    /// A message from what a client sent (a PUBLISH or a will): its Message
    /// Expiry Interval becomes a deadline, the rest passes through.
    pub fn from_wire(
        topic: ByteString,
        payload: Bytes,
        qos: QoS,
        retain: bool,
        mut properties: Properties,
        publisher: Option<ByteString>,
    ) -> Message {
        let now = Instant::now();
        let expires_at =
            Message::expiry_from_interval(properties.message_expiry_interval.take(), now);
        Message {
            topic,
            payload,
            qos,
            retain,
            properties,
            expires_at,
            publisher,
            received: now,
        }
    }

    pub fn is_expired(&self, now: Instant) -> bool {
        self.expires_at.is_some_and(|t| t <= now)
    }

    /// Seconds left, rounded up, for the Message Expiry Interval sent on.
    pub fn remaining_expiry(&self, now: Instant) -> Option<u32> {
        self.expires_at.map(|t| {
            let left = t.saturating_duration_since(now);
            let secs = left.as_secs() + u64::from(left.subsec_nanos() > 0);
            u32::try_from(secs).unwrap_or(u32::MAX).max(1)
        })
    }

    pub fn expiry_from_interval(interval: Option<u32>, now: Instant) -> Option<Instant> {
        interval.map(|s| now + Duration::from_secs(u64::from(s)))
    }
}

/// Redis store: where a delivered message is let go of in Redis once its
/// client has it (PUBACK, PUBREC) or a counted rule dropped it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreAck {
    /// An entry of the session's own stream: deleted.
    Session(ByteString),
    /// An entry of a shared group's stream: acknowledged in the group.
    Share { filter: ByteString, id: ByteString },
}

impl StoreAck {
    /// The session-stream entry id, if it is one.
    pub fn session_id(&self) -> Option<&str> {
        match self {
            StoreAck::Session(id) => Some(id),
            StoreAck::Share { .. } => None,
        }
    }
}

/// One message on its way to one session.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub msg: Arc<Message>,
    /// min(message QoS, subscription QoS).
    pub qos: QoS,
    /// The RETAIN flag to send: set for retained messages sent on subscribe,
    /// or kept with Retain As Published.
    pub retain: bool,
    /// Subscription identifiers of the matching subscriptions (MQTT 5).
    pub sub_ids: Vec<u32>,
    /// Redis store: the stream entry this delivery came from, acknowledged
    /// there only once the client acknowledged the message (boxed: most
    /// deliveries have none).
    pub ack: Option<Box<StoreAck>>,
    /// Sent before (to a previous connection): send with DUP set.
    pub dup: bool,
}
