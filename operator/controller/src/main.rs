//! `cirrus-operator`: flags, logging, signals; the controllers are in the
//! library.

use std::time::Duration;

use clap::Parser;
use tokio_util::sync::CancellationToken;

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
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if args.log_json {
        b.json().init();
    } else {
        b.init();
    }
    let client = kube::Client::try_default().await?;
    let shutdown = CancellationToken::new();
    let trigger = shutdown.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        trigger.cancel();
    });
    #[cfg(unix)]
    {
        let trigger = shutdown.clone();
        tokio::spawn(async move {
            if let Ok(mut term) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            {
                term.recv().await;
                trigger.cancel();
            }
        });
    }
    cirrus_operator::run(
        client,
        Duration::from_secs(args.resync_secs),
        args.namespace,
        shutdown,
    )
    .await;
    Ok(())
}
