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
    /// When a write to Redis counts as stored: `async` (the primary
    /// answered) or `replicated` (its replicas hold it too, Redis WAIT).
    #[arg(long, env = "CIRRUS_REDIS_DURABILITY", value_parser = parse_durability)]
    redis_durability: Option<cirrus_config::broker::Durability>,
    /// The pod template's revision (Kubernetes: the `pod-template-hash`
    /// label): rollouts move each client once.
    #[arg(long, env = "CIRRUS_REVISION")]
    revision: Option<String>,
    /// Log format.
    #[arg(long, env = "CIRRUS_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

fn parse_durability(s: &str) -> Result<cirrus_config::broker::Durability, String> {
    use cirrus_config::broker::Durability;
    match s {
        "async" => Ok(Durability::Async),
        "replicated" => Ok(Durability::Replicated),
        _ => Err("expected async or replicated".into()),
    }
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Add a user to an auth file, or change a user's password: the file is
    /// made if missing, and the rest of it (other users, rules, comments) is
    /// kept. A running broker picks the change up within a second.
    Passwd(PasswdArgs),
}

#[derive(Debug, clap::Args)]
struct PasswdArgs {
    /// The auth file (the broker's `--auth-file`).
    file: PathBuf,
    /// The user name.
    user: String,
    /// Read the password from the first line of standard input instead of
    /// asking for it twice without echo.
    #[arg(long)]
    stdin: bool,
}

/// `cirrus-broker passwd FILE USER`: the argon2id hash of a password read
/// without echo (or from stdin), written into the auth file atomically.
fn passwd(a: &PasswdArgs) -> anyhow::Result<()> {
    use std::io::BufRead;
    if a.user.is_empty() || a.user.chars().any(char::is_control) {
        anyhow::bail!("the user name must be non-empty, without control characters");
    }
    let password = if a.stdin {
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line)?;
        line.trim_end_matches(['\n', '\r']).to_string()
    } else {
        let first = rpassword::prompt_password("Password: ")?;
        let again = rpassword::prompt_password("Reenter password: ")?;
        if first != again {
            anyhow::bail!("the passwords do not match");
        }
        first
    };
    if password.is_empty() {
        anyhow::bail!("the password is empty");
    }
    let hash = cirrus_broker::auth::hash_password(&password)?;
    let (text, existed) = match std::fs::read_to_string(&a.file) {
        Ok(t) => (t, true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => (String::new(), false),
        Err(e) => return Err(e).with_context(|| format!("reading {}", a.file.display())),
    };
    let (new, how) = cirrus_config::auth::set_password(&text, &a.user, &hash)
        .with_context(|| format!("{} is not a valid auth file", a.file.display()))?;
    // Written beside the file and renamed over it: a broker reading it
    // meanwhile sees the old file or the new one, never half of one.
    let dir = a
        .file
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or_else(|| std::path::Path::new("."));
    let tmp = dir.join(format!(".cirrus-passwd-{}.tmp", std::process::id()));
    {
        use std::io::Write;
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let mode = if existed {
            std::fs::metadata(&a.file)?.permissions().mode()
        } else {
            0o600
        };
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .with_context(|| format!("writing {}", tmp.display()))?;
        f.write_all(new.as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, &a.file).with_context(|| format!("replacing {}", a.file.display()))?;
    let what = match how {
        cirrus_config::auth::Edit::Created => "created the file with",
        cirrus_config::auth::Edit::InPlace => "set the password of",
        cirrus_config::auth::Edit::Rewritten => {
            "set the password (the file was written anew: its comments are gone) of"
        }
    };
    eprintln!("{}: {what} user {:?}", a.file.display(), a.user);
    Ok(())
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
        if let Some(v) = self.redis_durability {
            c.redis.durability = v;
        }
        if let Some(v) = self.revision.as_ref().filter(|v| !v.is_empty()) {
            c.revision = Some(v.clone());
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
    if let Some(Command::Passwd(p)) = &args.command {
        return passwd(p);
    }
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
