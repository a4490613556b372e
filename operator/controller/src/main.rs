//! `cirrus-operator`: flags, logging, signals, the admin port and leader
//! election; the controllers are in the library.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use cirrus_operator::lease::LeaseConfig;
use cirrus_operator::metrics::Metrics;
use clap::Parser;
use tokio_util::sync::CancellationToken;
use tracing::info;

#[derive(Debug, Parser)]
#[command(
    version,
    about = "Cirrus operator: reconciles MqttBroker and MqttUser resources"
)]
struct Args {
    /// Seconds between re-reconciles of a healthy resource.
    #[arg(long, env = "CIRRUS_OPERATOR_RESYNC_SECS", default_value_t = 60)]
    resync_secs: u64,
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "CIRRUS_OPERATOR_NAMESPACE")]
    namespace: Option<String>,
    /// Log as JSON.
    #[arg(long, env = "CIRRUS_LOG_JSON")]
    log_json: bool,
    /// Admin port: /metrics, /healthz, /readyz.
    #[arg(long, env = "CIRRUS_OPERATOR_ADMIN", default_value = "0.0.0.0:8080")]
    admin: SocketAddr,
    /// Reconcile only while holding a Lease, so that several replicas can
    /// run (one active, the others standing by).
    #[arg(long, env = "CIRRUS_OPERATOR_LEADER_ELECT")]
    leader_elect: bool,
    /// Namespace of the Lease (default: the pod's namespace, POD_NAMESPACE).
    #[arg(long, env = "POD_NAMESPACE")]
    lease_namespace: Option<String>,
    /// Name of the Lease.
    #[arg(
        long,
        env = "CIRRUS_OPERATOR_LEASE_NAME",
        default_value = "cirrus-operator"
    )]
    lease_name: String,
    /// Serve the custom metrics API (`custom.metrics.k8s.io/v1beta1`,
    /// `cirrus_connections` of the broker pods) here, for the HPA; needs
    /// --custom-metrics-service and POD_NAMESPACE.
    #[arg(long, env = "CIRRUS_OPERATOR_CUSTOM_METRICS")]
    custom_metrics: Option<SocketAddr>,
    /// The Service in front of the custom metrics API (its certificate's
    /// name; the APIService points at it).
    #[arg(long, env = "CIRRUS_OPERATOR_CUSTOM_METRICS_SERVICE")]
    custom_metrics_service: Option<String>,
    /// Seconds a leader may go without renewing before another takes over.
    #[arg(long, env = "CIRRUS_OPERATOR_LEASE_SECS", default_value_t = 15)]
    lease_secs: u64,
    /// Bytes of users in one auth Secret before the next one is used (a
    /// broker has at most 32). Lower it where the API server takes smaller
    /// objects than the usual 1.5 MiB.
    #[arg(long, env = "CIRRUS_OPERATOR_USER_FILE_BUDGET", default_value_t = cirrus_operator::auth::FILE_BUDGET)]
    user_file_budget: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Logs, and OTLP traces of every reconcile when
    // OTEL_EXPORTER_OTLP_ENDPOINT is set (the same variables as the broker).
    let telemetry = cirrus_telemetry::init("cirrus-operator", args.log_json, &["cirrus_operator"])?;
    let client = kube::Client::try_default().await?;
    let shutdown = CancellationToken::new();
    // Registered before anything else runs, so that no SIGTERM is missed.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let trigger = shutdown.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => info!("SIGTERM: shutting down"),
            _ = int.recv() => info!("SIGINT: shutting down"),
        }
        trigger.cancel();
    });

    let metrics = Arc::new(Metrics::default());
    let admin = tokio::net::TcpListener::bind(args.admin).await?;
    info!(addr = %admin.local_addr()?, "admin port (/metrics, /healthz, /readyz)");
    let lease_secs = args.lease_secs.max(3);
    // Ready while the API server answered within two of its checks.
    let ready_within = Duration::from_secs(lease_secs.max(10) * 2);
    let m = metrics.clone();
    tokio::spawn(cirrus_admin::serve(
        admin,
        shutdown.clone(),
        move |path: String| {
            let m = m.clone();
            async move { m.route(&path, ready_within) }
        },
    ));
    tokio::spawn(cirrus_operator::watch_api(
        client.clone(),
        metrics.clone(),
        Duration::from_secs(10),
        shutdown.clone(),
    ));

    if let Some(addr) = args.custom_metrics {
        let (Some(service), Some(namespace)) = (
            args.custom_metrics_service.clone(),
            args.lease_namespace.clone(),
        ) else {
            anyhow::bail!("--custom-metrics needs --custom-metrics-service and POD_NAMESPACE");
        };
        let cfg = cirrus_operator::custom_metrics::Config {
            addr,
            service,
            namespace,
            watch: args.namespace.clone(),
        };
        let (client, stop) = (client.clone(), shutdown.clone());
        tokio::spawn(async move {
            // Without it the controllers still run; the HPA then reports
            // the metric missing, and this says why.
            if let Err(e) = cirrus_operator::custom_metrics::run(client, cfg, stop).await {
                tracing::error!(error = %e, "custom metrics API not served");
            }
        });
    }

    let ctx = cirrus_operator::Context::new(
        client,
        Duration::from_secs(args.resync_secs),
        args.namespace.clone(),
        metrics.clone(),
    );
    ctx.user_file_budget.store(
        args.user_file_budget
            .clamp(4096, cirrus_operator::auth::FILE_BUDGET),
        std::sync::atomic::Ordering::Relaxed,
    );
    if args.leader_elect {
        let namespace = args.lease_namespace.or(args.namespace).ok_or_else(|| {
            anyhow::anyhow!("--leader-elect needs --lease-namespace (or POD_NAMESPACE)")
        })?;
        let identity = std::env::var("POD_NAME")
            .ok()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| format!("cirrus-operator-{}", std::process::id()));
        let lease = LeaseConfig {
            namespace,
            name: args.lease_name,
            identity,
            duration: Duration::from_secs(lease_secs),
            renew: Duration::from_secs(lease_secs / 3),
        };
        cirrus_operator::run_elected(ctx, lease, shutdown).await;
    } else {
        metrics.set_leader(true);
        cirrus_operator::run(ctx, shutdown).await;
    }
    telemetry.shutdown();
    Ok(())
}
