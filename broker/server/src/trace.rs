//! Traces of the publish path (OpenTelemetry through `tracing`).
//!
//! A publish is one trace: `mqtt.publish` (its parent is the publisher's
//! `traceparent` user property, when it sent one) with children
//! `authorize`, `route`, one `deliver` per subscriber session on this pod,
//! and `redis.append` for the batch write to Redis. The message carries the
//! `route` span's context on in its `traceparent` (and `tracestate`) user
//! properties, to subscribers and across the Redis hop; a pod that reads it
//! back opens `remote.read` under it, re-stamps the message with that span
//! and delivers under it.
//!
//! Everything here does nothing unless traces are exported
//! ([`cirrus_telemetry::enabled`]): one relaxed atomic load per publish.

use cirrus_codec::{ByteString, Properties};
use cirrus_telemetry::{TRACEPARENT, TRACESTATE, TRACE_TARGET};
use tracing::Span;

use crate::message::Message;

pub use cirrus_telemetry::enabled;

/// The span of one PUBLISH received from a client; `Span::none()` when the
/// sampler drops it, so that an unsampled publish does no more tracing work
/// (its publisher's `traceparent`, if any, passes through untouched).
pub fn receive(props: &Properties, client_id: &str, topic: &str, qos: u8) -> Span {
    let span = tracing::info_span!(
        target: TRACE_TARGET,
        "mqtt.publish",
        otel.kind = "consumer",
        messaging.system = "mqtt",
        messaging.destination.name = topic,
        messaging.client_id = client_id,
        mqtt.qos = qos,
    );
    cirrus_telemetry::set_parent(&span, cirrus_telemetry::extract(&props.user_properties));
    if cirrus_telemetry::is_sampled(&span) {
        span
    } else {
        Span::none()
    }
}

pub fn authorize() -> Span {
    tracing::info_span!(target: TRACE_TARGET, "authorize")
}

pub fn route() -> Span {
    tracing::info_span!(target: TRACE_TARGET, "route")
}

/// One delivery into a subscriber session's queue, under the current span;
/// `None` outside a traced publish.
pub fn deliver(client_id: &str) -> Option<Span> {
    if Span::current().is_none() {
        return None;
    }
    Some(tracing::info_span!(
        target: TRACE_TARGET,
        "deliver",
        otel.kind = "producer",
        messaging.client_id = client_id,
    ))
}

/// The span of a Redis pipeline that appends `msg`, as a child of the
/// context the message carries; `None` for an untraced message.
pub fn redis_append(msg: &Message, targets: usize) -> Option<Span> {
    if !cirrus_telemetry::carries_context(&msg.properties.user_properties) {
        return None;
    }
    let span = tracing::info_span!(
        target: TRACE_TARGET,
        "redis.append",
        db.system = "redis",
        cirrus.targets = targets,
    );
    cirrus_telemetry::set_parent(
        &span,
        cirrus_telemetry::extract(&msg.properties.user_properties),
    );
    Some(span)
}

/// Replace the message's trace context with `span`'s.
pub fn stamp(props: &mut Properties, span: &Span) {
    let pairs = cirrus_telemetry::inject(span);
    if pairs.is_empty() {
        return;
    }
    props.user_properties.retain(|(k, _)| {
        !k.eq_ignore_ascii_case(TRACEPARENT) && !k.eq_ignore_ascii_case(TRACESTATE)
    });
    for (k, v) in pairs {
        props
            .user_properties
            .push((ByteString::from_static(k), ByteString::from(v)));
    }
}

/// A message read back from Redis (`source`: inbox, share, session): the
/// `remote.read` span under the context it carries, and the message
/// re-stamped with that span for the subscribers on this pod.
pub fn remote(mut msg: Message, source: &'static str) -> (Message, Span) {
    if !enabled() || !cirrus_telemetry::carries_context(&msg.properties.user_properties) {
        return (msg, Span::none());
    }
    let span = tracing::info_span!(
        target: TRACE_TARGET,
        "remote.read",
        otel.kind = "consumer",
        messaging.destination.name = &*msg.topic,
        cirrus.source = source,
    );
    cirrus_telemetry::set_parent(
        &span,
        cirrus_telemetry::extract(&msg.properties.user_properties),
    );
    if !cirrus_telemetry::is_sampled(&span) {
        return (msg, Span::none());
    }
    stamp(&mut msg.properties, &span);
    (msg, span)
}
