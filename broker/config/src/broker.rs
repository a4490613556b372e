//! Broker configuration: a YAML file (`--config`), overridden by environment
//! variables and flags. Every field has a default, so no file is needed.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The whole configuration. The operator writes this same structure into the
/// broker's ConfigMap, so it is the one definition of the file format.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub listeners: Listeners,
    pub limits: Limits,
    pub mqtt: MqttOptions,
    /// Seconds between `$SYS/` updates; 0 turns the tree off.
    pub sys_interval_secs: u64,
    /// Seconds that a SIGTERM drain may take before connections are dropped.
    pub shutdown_timeout_secs: u64,
    /// Seconds between SIGTERM and the drain, with `/readyz` already not
    /// ready and the listeners still serving (Kubernetes: time for the
    /// Service to stop sending clients here).
    pub shutdown_delay_secs: u64,
    /// How the clients are sent away once the drain begins.
    pub drain: Drain,
    /// Redis store: evening out the clients between pods (new pods after a
    /// scale-up or a rollout get their share).
    pub rebalance: Rebalance,
    /// The auth file (users, password hashes, ACLs; see `cirrus_config::auth`).
    /// Without one every client is allowed everything.
    pub auth_file: Option<PathBuf>,
    pub tls: Tls,
    /// The Redis store; without a URL the broker keeps state in memory.
    pub redis: Redis,
    /// The version of the pod's template (on Kubernetes its
    /// `pod-template-hash` label, set by the operator). With the Redis
    /// store, pods of different revisions mean a rollout: no pod rebalances
    /// then, and a pod of the older revision that drains waits (a bounded
    /// time) for its siblings to drain too, so that its clients go to the
    /// new pods only and move once.
    pub revision: Option<String>,
}

/// Where the cluster's shared state lives. The URL may carry a password:
/// the operator passes it in an environment variable from a Secret, never
/// in the ConfigMap.
#[derive(Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Redis {
    /// `redis://[user:password@]host:port[/db]` or `rediss://...` (TLS);
    /// for a Redis Cluster, seed nodes' URLs separated by commas.
    pub url: Option<String>,
    /// The URL names a Redis Cluster (implied by several URLs).
    pub cluster: bool,
    /// CA certificate (PEM) for `rediss://` with a private CA; otherwise
    /// the system's trusted roots.
    pub ca_file: Option<PathBuf>,
    /// A pod silent for this long is dead: its routes are dropped and its
    /// clients' wills published by a survivor.
    pub node_timeout_ms: u64,
    /// What a PUBACK, PUBREC or SUBACK waits for (see [`Durability`]).
    pub durability: Durability,
    /// `replicated`: how many replicas must hold each write.
    pub replicas: u32,
    /// `replicated`: how long to wait for them; a write they did not
    /// confirm in time is answered with an error code (the client sends it
    /// again), never with success.
    pub wait_timeout_ms: u64,
    /// Cap of a pod's inbox stream (entries, each a batch of messages from
    /// another pod): a pod that falls this far behind loses the oldest,
    /// counted in `cirrus_redis_inbox_cut_entries_total`.
    pub inbox_max_entries: u64,
}

/// When a write to Redis counts as stored.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// Once the Redis primary answered. Fastest; a primary lost before its
    /// replica copied the write (asynchronous replication) loses it.
    #[default]
    Async,
    /// Once `replicas` replicas also hold it (Redis `WAIT` after each
    /// pipeline): a PUBACKed message survives the loss of the primary.
    Replicated,
}

impl Default for Redis {
    fn default() -> Self {
        Redis {
            url: None,
            cluster: false,
            ca_file: None,
            node_timeout_ms: 5000,
            durability: Durability::Async,
            replicas: 1,
            wait_timeout_ms: 1000,
            inbox_max_entries: 100_000,
        }
    }
}

impl std::fmt::Debug for Redis {
    // The URL may hold a password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redis")
            .field("url", &self.url.as_ref().map(|_| "<set>"))
            .field("cluster", &self.cluster)
            .field("ca_file", &self.ca_file)
            .field("node_timeout_ms", &self.node_timeout_ms)
            .field("durability", &self.durability)
            .field("replicas", &self.replicas)
            .field("wait_timeout_ms", &self.wait_timeout_ms)
            .field("inbox_max_entries", &self.inbox_max_entries)
            .finish()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Listeners {
    /// MQTT over TCP.
    pub tcp: Option<SocketAddr>,
    /// MQTT over TLS (needs `tls`).
    pub tls: Option<SocketAddr>,
    /// MQTT over WebSocket (path `/mqtt`, subprotocol `mqtt`).
    pub ws: Option<SocketAddr>,
    /// MQTT over secure WebSocket, with the TLS listener's certificates.
    pub wss: Option<SocketAddr>,
    /// The admin HTTP port: `/metrics` (Prometheus), `/healthz`, `/readyz`.
    pub admin: Option<SocketAddr>,
}

/// Certificates for the TLS listener, PEM files re-read when they change.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Tls {
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// Verify client certificates against this CA bundle; clients without
    /// a valid certificate are refused during the handshake.
    pub client_ca_file: Option<PathBuf>,
    /// Use the client certificate's Common Name as the MQTT user name (the
    /// certificate then stands for the password).
    pub cert_as_username: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Concurrent client connections per broker process.
    pub max_connections: usize,
    /// Largest packet accepted or sent, fixed header included (bytes).
    pub max_packet_size: u32,
    /// Outgoing QoS 1/2 messages awaiting acknowledgement per client; the
    /// client's Receive Maximum lowers it further.
    pub max_inflight: u16,
    /// Incoming QoS 2 messages awaiting PUBREL per client (our Receive
    /// Maximum, announced in CONNACK); more is answered with 0x93.
    pub receive_maximum: u16,
    /// Messages queued per session, online or offline, beyond the in-flight
    /// window. A full queue drops the newest message and counts it.
    pub max_queued_messages: usize,
    /// Longest keep-alive a client may ask for, in seconds (0 = no limit).
    pub max_keep_alive: u16,
    /// Topic aliases a client may use towards us (MQTT 5).
    pub topic_alias_maximum: u16,
    /// Longest session expiry a client may ask for, in seconds.
    pub max_session_expiry_secs: u32,
    /// Time a new connection has to send CONNECT, in seconds.
    pub connect_timeout_secs: u64,
    /// Subscriptions (topic filters) per SUBSCRIBE and per session.
    pub max_subscriptions_per_session: usize,
    /// Seconds a write to a client may block before the client is dropped.
    pub write_timeout_secs: u64,
    /// Failed logins allowed per client address per minute; beyond it the
    /// address is refused (0x9F) until the minute is over.
    pub max_failed_logins_per_minute: u32,
    /// PUBLISH packets per second one client may send (0 = no limit). A
    /// faster client is slowed down (its socket is read later), not cut off.
    pub max_publish_rate: u32,
    /// New connections per second per listener (0 = no limit); beyond it
    /// a client gets CONNACK 0x9F Connection rate exceeded.
    pub max_connection_rate: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MqttOptions {
    /// Highest QoS the broker accepts and grants (0, 1 or 2).
    pub maximum_qos: u8,
    pub retain_available: bool,
    /// Retained messages kept at most; setting more is answered with 0x97.
    pub max_retained_messages: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listeners: Listeners::default(),
            limits: Limits::default(),
            mqtt: MqttOptions::default(),
            sys_interval_secs: 10,
            shutdown_timeout_secs: 10,
            shutdown_delay_secs: 0,
            drain: Drain::default(),
            rebalance: Rebalance::default(),
            auth_file: None,
            tls: Tls::default(),
            redis: Redis::default(),
            revision: None,
        }
    }
}

/// The drain after SIGTERM (and `shutdown_delay_secs`): the listeners stop
/// and the connected clients are told to go, `connections_per_sec` at a
/// time, so that they reconnect to the other pods at a pace those can take;
/// whatever is still connected shortly before `shutdown_timeout_secs` goes
/// at once.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Drain {
    /// Clients sent away per second (on the Redis store, shared by the
    /// pods draining at the same time); 0: all at once.
    pub connections_per_sec: u32,
    /// What MQTT 5 clients are told (3.1.1 clients: the socket closes).
    pub reason: DrainReason,
    /// Sent as the DISCONNECT's Server Reference with `use_another_server`
    /// (for example the Service's host name and port).
    pub server_reference: Option<String>,
}

impl Default for Drain {
    fn default() -> Self {
        Drain {
            connections_per_sec: 0,
            reason: DrainReason::ServerShuttingDown,
            server_reference: None,
        }
    }
}

/// Every `interval_secs` a pod compares its connections with the mean of
/// the live pods (from Redis); holding more than `threshold_percent` above
/// it, it sends the excess away (as a drain does: `drain.reason`,
/// `drain.server_reference`), at most `connections_per_sec`, choosing
/// clients connected for at least `min_connection_age_secs` — a client
/// just moved is young on its new pod, so it is not moved again soon.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Rebalance {
    pub enabled: bool,
    pub threshold_percent: u32,
    pub connections_per_sec: u32,
    pub min_connection_age_secs: u64,
    pub interval_secs: u64,
}

impl Default for Rebalance {
    fn default() -> Self {
        Rebalance {
            enabled: true,
            threshold_percent: 20,
            connections_per_sec: 50,
            min_connection_age_secs: 60,
            interval_secs: 5,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DrainReason {
    /// 0x8B: the server is going away (one broker on its own).
    ServerShuttingDown,
    /// 0x9C: the service goes on elsewhere (pods behind a Service).
    UseAnotherServer,
}

impl Default for Listeners {
    fn default() -> Self {
        Listeners {
            tcp: Some(SocketAddr::from(([0, 0, 0, 0], 1883))),
            tls: None,
            ws: None,
            wss: None,
            admin: Some(SocketAddr::from(([0, 0, 0, 0], 9090))),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 100_000,
            max_packet_size: 1024 * 1024,
            max_inflight: 100,
            receive_maximum: 100,
            max_queued_messages: 1000,
            max_keep_alive: 0,
            topic_alias_maximum: 10,
            max_session_expiry_secs: u32::MAX,
            connect_timeout_secs: 10,
            max_subscriptions_per_session: 1000,
            write_timeout_secs: 30,
            max_failed_logins_per_minute: 30,
            max_publish_rate: 0,
            max_connection_rate: 0,
        }
    }
}

impl Default for MqttOptions {
    fn default() -> Self {
        MqttOptions {
            maximum_qos: 2,
            retain_available: true,
            max_retained_messages: 1_000_000,
        }
    }
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid configuration in {path}: {source}")]
    Parse {
        path: PathBuf,
        source: serde_yaml::Error,
    },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl Config {
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::from_yaml(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })
    }

    pub fn from_yaml(text: &str) -> Result<Config, serde_yaml::Error> {
        if text.trim().is_empty() {
            return Ok(Config::default());
        }
        serde_yaml::from_str(text)
    }

    /// Reject values the broker cannot honour.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let l = &self.limits;
        let bad = |m: &str| Err(ConfigError::Invalid(m.to_owned()));
        if self.mqtt.maximum_qos > 2 {
            return bad("mqtt.maximum_qos must be 0, 1 or 2");
        }
        if l.max_packet_size < 64 || l.max_packet_size > 268_435_460 {
            return bad("limits.max_packet_size must be between 64 and 268435460");
        }
        if l.max_inflight == 0 || l.receive_maximum == 0 {
            return bad("limits.max_inflight and limits.receive_maximum must be at least 1");
        }
        if l.max_connections == 0
            || l.max_queued_messages == 0
            || l.max_subscriptions_per_session == 0
        {
            return bad("limits.max_connections, max_queued_messages and max_subscriptions_per_session must be at least 1");
        }
        if self
            .drain
            .server_reference
            .as_ref()
            .is_some_and(|r| r.is_empty() || r.len() > 1024)
        {
            return bad("drain.server_reference must be 1 to 1024 bytes");
        }
        let r = &self.rebalance;
        if r.enabled && (r.connections_per_sec == 0 || r.interval_secs == 0) {
            return bad("rebalance.connections_per_sec and interval_secs must be at least 1");
        }
        if l.connect_timeout_secs == 0 || l.write_timeout_secs == 0 {
            return bad("limits.connect_timeout_secs and write_timeout_secs must be at least 1");
        }
        if let Some(u) = &self.redis.url {
            let ok = u
                .split(',')
                .map(str::trim)
                .all(|u| u.starts_with("redis://") || u.starts_with("rediss://"));
            if !ok {
                return bad(
                    "redis.url must start with redis:// or rediss:// (each, for a cluster)",
                );
            }
        }
        if self.redis.node_timeout_ms < 1000 {
            return bad("redis.node_timeout_ms must be at least 1000");
        }
        if self.redis.inbox_max_entries < 100 {
            return bad("redis.inbox_max_entries must be at least 100");
        }
        if self.redis.durability == Durability::Replicated
            && (self.redis.replicas == 0 || self.redis.wait_timeout_ms == 0)
        {
            return bad("redis.durability replicated needs redis.replicas and redis.wait_timeout_ms of at least 1");
        }
        let ls = &self.listeners;
        if ls.tcp.is_none() && ls.tls.is_none() && ls.ws.is_none() && ls.wss.is_none() {
            return bad("no listener is configured");
        }
        let tls_files = self.tls.cert_file.is_some() && self.tls.key_file.is_some();
        if (ls.tls.is_some() || ls.wss.is_some()) && !tls_files {
            return bad(
                "the TLS and secure WebSocket listeners need tls.cert_file and tls.key_file",
            );
        }
        if self.tls.cert_as_username && self.tls.client_ca_file.is_none() {
            return bad("tls.cert_as_username needs tls.client_ca_file");
        }
        Ok(())
    }

    pub fn connect_timeout(&self) -> Duration {
        Duration::from_secs(self.limits.connect_timeout_secs)
    }

    pub fn write_timeout(&self) -> Duration {
        Duration::from_secs(self.limits.write_timeout_secs)
    }

    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_secs(self.shutdown_timeout_secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_partial_yaml() {
        assert_eq!(Config::from_yaml("").unwrap(), Config::default());
        let c =
            Config::from_yaml("limits:\n  max_inflight: 5\nlisteners:\n  tcp: 127.0.0.1:1999\n")
                .unwrap();
        assert_eq!(c.limits.max_inflight, 5);
        assert_eq!(c.limits.max_queued_messages, 1000);
        assert_eq!(c.listeners.tcp, Some("127.0.0.1:1999".parse().unwrap()));
        assert!(Config::from_yaml("limits:\n  bogus: 1\n").is_err());
        let mut c = Config::default();
        c.mqtt.maximum_qos = 3;
        assert!(c.validate().is_err());
    }
}
