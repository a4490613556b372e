//! The admin port: `/metrics` (Prometheus text format), `/healthz` (the
//! process is alive) and `/readyz` (listeners bound, the store reachable,
//! not draining). Kubernetes probes and Prometheus scrape it; it carries no
//! client data and no secrets.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use cirrus_admin::{Exposition, StatusCode};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::broker::Broker;
use crate::stats::{Refused, Stats};
use crate::store::Store;

/// Serve the admin port until `stop`. `draining` is cancelled when the
/// broker starts its shutdown: `/readyz` then says not ready, so that
/// Kubernetes sends no new clients while connections drain.
pub async fn serve_admin(
    broker: Arc<Broker>,
    listener: TcpListener,
    draining: CancellationToken,
    stop: CancellationToken,
) {
    cirrus_admin::serve(listener, stop, move |path: String| {
        let broker = broker.clone();
        let draining = draining.clone();
        async move { route(&broker, &draining, &path).await }
    })
    .await;
}

async fn route(broker: &Broker, draining: &CancellationToken, path: &str) -> (StatusCode, String) {
    match path {
        "/healthz" => (StatusCode::OK, "ok\n".into()),
        "/readyz" => {
            if draining.is_cancelled() {
                (StatusCode::SERVICE_UNAVAILABLE, "draining\n".into())
            } else if !broker.store_ready() {
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store unavailable\n".into(),
                )
            } else {
                (StatusCode::OK, "ready\n".into())
            }
        }
        "/metrics" => (StatusCode::OK, render(broker).await),
        _ => (StatusCode::NOT_FOUND, "not found\n".into()),
    }
}

fn g(c: &std::sync::atomic::AtomicU64) -> u64 {
    Stats::get(c)
}

fn by_qos(a: &[std::sync::atomic::AtomicU64; 3]) -> [(&'static str, u64); 3] {
    [("0", g(&a[0])), ("1", g(&a[1])), ("2", g(&a[2]))]
}

/// The Prometheus text exposition of the broker's metrics.
pub async fn render(broker: &Broker) -> String {
    let s = &broker.stats;
    let mut o = Exposition::new();
    let connections = s.connections_current.load(Ordering::Relaxed) as u64;
    o.one(
        "cirrus_connections",
        "gauge",
        "Client connections open on this pod (the autoscaler's per-pod metric).",
        connections,
    );
    o.one(
        "cirrus_connections_total",
        "counter",
        "Client connections accepted.",
        g(&s.connections_total),
    );
    let refused: Vec<(&str, u64)> = Refused::ALL
        .iter()
        .zip(&s.refused)
        .map(|(r, c)| (r.label(), g(c)))
        .collect();
    o.labelled(
        "cirrus_connections_refused_total",
        "counter",
        "Connections refused, by reason.",
        &refused,
        "reason",
    );
    let (sessions, queued, inflight) = broker.session_depths();
    o.one(
        "cirrus_sessions_online",
        "gauge",
        "Sessions with a connection on this pod.",
        connections,
    );
    let offline = match &broker.store {
        Store::Redis(c) => c.offline_sessions().await,
        Store::Memory => sessions.saturating_sub(connections),
    };
    o.one(
        "cirrus_sessions_offline",
        "gauge",
        "Persistent sessions without a connection (with the Redis store: cluster-wide, those with an expiry).",
        offline,
    );
    o.one(
        "cirrus_subscriptions",
        "gauge",
        "Subscriptions of the sessions on this pod.",
        s.subscriptions.load(Ordering::Relaxed) as u64,
    );
    o.one(
        "cirrus_retained_messages",
        "gauge",
        "Retained messages.",
        broker.retained_count() as u64,
    );
    o.one(
        "cirrus_queued_messages",
        "gauge",
        "Messages waiting in session queues on this pod.",
        queued,
    );
    o.one(
        "cirrus_inflight_messages",
        "gauge",
        "QoS 1/2 messages sent and not yet acknowledged, on this pod.",
        inflight,
    );
    o.labelled(
        "cirrus_publish_received_total",
        "counter",
        "PUBLISH packets received from clients, by QoS.",
        &by_qos(&s.publish_received_qos),
        "qos",
    );
    o.labelled(
        "cirrus_publish_sent_total",
        "counter",
        "PUBLISH packets sent to clients, by QoS.",
        &by_qos(&s.publish_sent_qos),
        "qos",
    );
    o.labelled(
        "cirrus_publish_received_bytes_total",
        "counter",
        "Payload bytes received in PUBLISH packets, by QoS.",
        &by_qos(&s.payload_bytes_received_qos),
        "qos",
    );
    o.labelled(
        "cirrus_publish_sent_bytes_total",
        "counter",
        "Payload bytes sent in PUBLISH packets, by QoS.",
        &by_qos(&s.payload_bytes_sent_qos),
        "qos",
    );
    o.one(
        "cirrus_packets_received_total",
        "counter",
        "MQTT packets received.",
        g(&s.messages_received),
    );
    o.one(
        "cirrus_packets_sent_total",
        "counter",
        "MQTT packets sent.",
        g(&s.messages_sent),
    );
    o.one(
        "cirrus_received_bytes_total",
        "counter",
        "Bytes read from clients.",
        g(&s.bytes_received),
    );
    o.one(
        "cirrus_sent_bytes_total",
        "counter",
        "Bytes written to clients.",
        g(&s.bytes_sent),
    );
    o.labelled(
        "cirrus_dropped_messages_total",
        "counter",
        "Messages not delivered, by reason.",
        &[
            ("queue_full", g(&s.dropped_queue_full)),
            ("expired", g(&s.dropped_expired)),
            ("too_large", g(&s.dropped_too_large)),
            ("offline", g(&s.dropped_offline)),
            ("acl", g(&s.acl_denied_publish)),
        ],
        "reason",
    );
    o.one(
        "cirrus_publish_store_failures_total",
        "counter",
        "QoS 1/2 publishes answered with an error code because the store did not take them.",
        g(&s.publish_store_failed),
    );
    o.one(
        "cirrus_drained_connections_total",
        "counter",
        "Clients sent to another pod by the paced drain after SIGTERM.",
        g(&s.drained),
    );
    o.one(
        "cirrus_rebalanced_connections_total",
        "counter",
        "Clients sent to another pod because this one held clearly more than the pods' mean.",
        g(&s.rebalanced),
    );
    o.one(
        "cirrus_decode_errors_total",
        "counter",
        "Malformed or oversized packets (the connection was closed).",
        g(&s.decode_errors),
    );
    o.one(
        "cirrus_auth_failures_total",
        "counter",
        "Logins refused for bad credentials.",
        g(&s.auth_failures),
    );
    o.one(
        "cirrus_acl_denied_total",
        "counter",
        "Publishes and subscriptions refused by the ACL.",
        g(&s.acl_denied),
    );
    o.one(
        "cirrus_auth_reload_failures_total",
        "counter",
        "Auth file reloads that failed (the last good file stays in force).",
        broker.auth.reload_failures.load(Ordering::Relaxed),
    );
    o.histogram(
        "cirrus_delivery_latency_seconds",
        "From this pod receiving a message to writing it to a subscriber.",
        &s.delivery_latency,
    );
    if let Store::Redis(c) = &broker.store {
        o.one(
            "cirrus_redis_up",
            "gauge",
            "1 when Redis is reachable and this pod's view of the cluster is loaded.",
            u64::from(c.is_ready()),
        );
        o.one(
            "cirrus_redis_commands_total",
            "counter",
            "Redis commands sent (pipelined).",
            c.redis_commands.load(Ordering::Relaxed),
        );
        o.one(
            "cirrus_redis_errors_total",
            "counter",
            "Redis commands or connections that failed.",
            c.redis_errors.load(Ordering::Relaxed),
        );
        o.one(
            "cirrus_redis_unreplicated_writes_total",
            "counter",
            "redis.durability replicated: commands whose writes the replicas did not confirm in time (their publishers got an error code).",
            c.unreplicated.load(Ordering::Relaxed),
        );
        o.histogram(
            "cirrus_redis_roundtrip_seconds",
            "Round trip of one Redis pipeline.",
            &c.roundtrip,
        );
        o.one(
            "cirrus_redis_inbox_lag",
            "gauge",
            "Entries in this pod's inbox stream not yet read and trimmed.",
            c.stream_lag.load(Ordering::Relaxed),
        );
        o.one(
            "cirrus_redis_inbox_cut_entries_total",
            "counter",
            "Inbox entries (batches of messages from other pods) that the inbox cap removed before this pod read them.",
            c.inbox_cut.load(Ordering::Relaxed),
        );
    }
    o.finish()
}
