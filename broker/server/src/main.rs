//! `cirrus-broker`: flags and environment over the config file, logging,
//! signals. Everything else is in the library.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use cirrus_broker::Config;
use clap::{Parser, ValueEnum};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Cirrus MQTT broker. Flags override the config file; each flag can also
/// be given as the environment variable shown.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// YAML configuration file.
    #[arg(long, env = "CIRRUS_CONFIG")]
    config: Option<PathBuf>,
    /// MQTT over TCP listen address [default: 0.0.0.0:1883].
    #[arg(long, env = "CIRRUS_LISTEN")]
    listen: Option<SocketAddr>,
    /// Maximum concurrent connections.
    #[arg(long, env = "CIRRUS_MAX_CONNECTIONS")]
    max_connections: Option<usize>,
    /// Maximum packet size in bytes, both directions.
    #[arg(long, env = "CIRRUS_MAX_PACKET_SIZE")]
    max_packet_size: Option<u32>,
    /// Messages queued per session beyond the in-flight window.
    #[arg(long, env = "CIRRUS_MAX_QUEUED_MESSAGES")]
    max_queued_messages: Option<usize>,
    /// Outgoing QoS 1/2 messages in flight per client.
    #[arg(long, env = "CIRRUS_MAX_INFLIGHT")]
    max_inflight: Option<u16>,
    /// Incoming QoS 2 messages awaiting PUBREL per client (Receive Maximum).
    #[arg(long, env = "CIRRUS_RECEIVE_MAXIMUM")]
    receive_maximum: Option<u16>,
    /// Longest keep-alive a client may use, in seconds (0 = no limit).
    #[arg(long, env = "CIRRUS_MAX_KEEP_ALIVE")]
    max_keep_alive: Option<u16>,
    /// Seconds between $SYS updates (0 = off).
    #[arg(long, env = "CIRRUS_SYS_INTERVAL")]
    sys_interval: Option<u64>,
    /// MQTT over TLS listen address (e.g. 0.0.0.0:8883); needs --tls-cert and --tls-key.
    #[arg(long, env = "CIRRUS_TLS_LISTEN")]
    tls_listen: Option<SocketAddr>,
    /// Server certificate chain (PEM); reloaded when it changes.
    #[arg(long, env = "CIRRUS_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// Server private key (PEM); reloaded when it changes.
    #[arg(long, env = "CIRRUS_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA bundle (PEM).
    #[arg(long, env = "CIRRUS_TLS_CLIENT_CA")]
    tls_client_ca: Option<PathBuf>,
    /// MQTT over WebSocket listen address (path /mqtt).
    #[arg(long, env = "CIRRUS_WS_LISTEN")]
    ws_listen: Option<SocketAddr>,
    /// MQTT over secure WebSocket listen address (the TLS certificates).
    #[arg(long, env = "CIRRUS_WSS_LISTEN")]
    wss_listen: Option<SocketAddr>,
    /// Auth file (users, password hashes, ACLs); reloaded when it changes.
    #[arg(long, env = "CIRRUS_AUTH_FILE")]
    auth_file: Option<PathBuf>,
    /// Admin HTTP listen address (/metrics, /healthz, /readyz).
    #[arg(long, env = "CIRRUS_ADMIN_LISTEN")]
    admin: Option<SocketAddr>,
    /// Redis store URL (`redis://` or `rediss://`): state shared by every
    /// pod. Without it the broker keeps state in memory.
    #[arg(long, env = "CIRRUS_REDIS_URL", hide_env_values = true)]
    redis: Option<String>,
    /// The Redis URL(s) name a Redis Cluster.
    #[arg(long, env = "CIRRUS_REDIS_CLUSTER")]
    redis_cluster: bool,
    /// CA certificate (PEM) for rediss:// with a private CA.
    #[arg(long, env = "CIRRUS_REDIS_CA")]
    redis_ca: Option<PathBuf>,
    /// Milliseconds without a heartbeat after which a pod is dead.
    #[arg(long, env = "CIRRUS_NODE_TIMEOUT_MS")]
    node_timeout_ms: Option<u64>,
    /// Log format.
    #[arg(long, env = "CIRRUS_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,
}

impl Args {
    fn config(&self) -> anyhow::Result<Config> {
        let mut c = match &self.config {
            Some(p) => Config::from_file(p)?,
            None => Config::default(),
        };
        if let Some(v) = self.listen {
            c.listeners.tcp = Some(v);
        }
        let l = &mut c.limits;
        if let Some(v) = self.max_connections {
            l.max_connections = v;
        }
        if let Some(v) = self.max_packet_size {
            l.max_packet_size = v;
        }
        if let Some(v) = self.max_queued_messages {
            l.max_queued_messages = v;
        }
        if let Some(v) = self.max_inflight {
            l.max_inflight = v;
        }
        if let Some(v) = self.receive_maximum {
            l.receive_maximum = v;
        }
        if let Some(v) = self.max_keep_alive {
            l.max_keep_alive = v;
        }
        if let Some(v) = self.sys_interval {
            c.sys_interval_secs = v;
        }
        if let Some(p) = &self.auth_file {
            c.auth_file = Some(p.clone());
        }
        if let Some(v) = self.admin {
            c.listeners.admin = Some(v);
        }
        if let Some(u) = &self.redis {
            c.redis.url = Some(u.clone());
        }
        if self.redis_cluster {
            c.redis.cluster = true;
        }
        if let Some(p) = &self.redis_ca {
            c.redis.ca_file = Some(p.clone());
        }
        if let Some(v) = self.node_timeout_ms {
            c.redis.node_timeout_ms = v;
        }
        if let Some(v) = self.tls_listen {
            c.listeners.tls = Some(v);
        }
        if let Some(v) = self.ws_listen {
            c.listeners.ws = Some(v);
        }
        if let Some(v) = self.wss_listen {
            c.listeners.wss = Some(v);
        }
        if let Some(p) = &self.tls_cert {
            c.tls.cert_file = Some(p.clone());
        }
        if let Some(p) = &self.tls_key {
            c.tls.key_file = Some(p.clone());
        }
        if let Some(p) = &self.tls_client_ca {
            c.tls.client_ca_file = Some(p.clone());
        }
        c.validate()?;
        Ok(c)
    }
}

async fn signalled() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Logs, and OTLP traces when OTEL_EXPORTER_OTLP_ENDPOINT is set.
    let telemetry = cirrus_telemetry::init(
        "cirrus-broker",
        matches!(args.log_format, LogFormat::Json),
        &[cirrus_telemetry::TRACE_TARGET],
    )?;
    // One descriptor per client: use what the hard limit allows.
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => tracing::debug!(limit = n, "open files limit"),
        Err(e) => tracing::warn!(error = %e, "could not raise the open files limit"),
    }
    let config = args.config().context("configuration")?;
    let bound = cirrus_broker::bind(config).await?;
    let shutdown = CancellationToken::new();
    let trigger = shutdown.clone();
    tokio::spawn(async move {
        signalled().await;
        trigger.cancel();
    });
    bound.serve(shutdown).await;
    // Export the spans still buffered.
    telemetry.shutdown();
    Ok(())
}
