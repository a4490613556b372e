//! # cirrus-operator
//!
//! Controllers for `MqttBroker` and `MqttUser` (types in
//! `cirrus-operator-api`).
//!
//! ## Layout
//! - [`broker`]: MqttBroker → ConfigMap, auth Secret, Deployment, Service,
//!   PodDisruptionBudget, HorizontalPodAutoscaler; status.
//! - [`user`]: MqttUser → password Secret; status. The broker controller
//!   writes the user's entry into its broker's auth Secret (one writer per
//!   Secret), woken by every change of a user.
//! - [`resources`]: pure builders of the child objects.
//! - [`auth`]: passwords, argon2id hashes, the aggregated auth file.
//! - [`tls`]: the namespace CA and the brokers' server certificates.
//! - [`lease`]: leader election, so that replicas can stand by.
//! - [`metrics`]: the operator's `/metrics`, `/healthz`, `/readyz`.
//! - [`custom_metrics`]: `custom.metrics.k8s.io` for the HPA (the broker
//!   pods' connections), behind the API server's aggregation layer.
//!
//! Every write is a server-side apply with the field manager
//! [`FIELD_MANAGER`]; children carry owner references, so deleting a
//! resource deletes what it made. A reconcile that changes nothing writes
//! nothing.

pub mod auth;
pub mod broker;
pub mod custom_metrics;
pub mod deletion_cost;
pub mod health;
pub mod lease;
pub mod metrics;
pub mod resources;
pub mod tls;
pub mod user;

use std::sync::Arc;
use std::time::Duration;

use kube::runtime::events::{Recorder, Reporter};
use kube::Client;
use tokio_util::sync::CancellationToken;

pub const FIELD_MANAGER: &str = "cirrus-operator";

/// Errors of one reconcile, labelled for logs and metrics.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("serialising {0}")]
    Serialize(String),
    #[error("hashing a password failed")]
    Hash,
    #[error("{0}")]
    Tls(#[from] tls::TlsError),
}

impl Error {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Serialize(_) => "serialize",
            Error::Hash => "hash",
            Error::Tls(_) => "tls",
        }
    }
}

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    /// How often a healthy resource is looked at again (picks up changed
    /// password Secrets and Deployment status).
    pub resync: Duration,
    /// Watch only this namespace (`None`: the whole cluster).
    pub namespace: Option<String>,
    pub metrics: Arc<metrics::Metrics>,
}

impl Context {
    /// An `Api` over the watched scope.
    pub fn scoped<K>(&self) -> kube::Api<K>
    where
        K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    {
        match &self.namespace {
            Some(ns) => kube::Api::namespaced(self.client.clone(), ns),
            None => kube::Api::all(self.client.clone()),
        }
    }
}

impl Context {
    pub fn new(
        client: Client,
        resync: Duration,
        namespace: Option<String>,
        metrics: Arc<metrics::Metrics>,
    ) -> Arc<Context> {
        let reporter = Reporter {
            controller: FIELD_MANAGER.into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Arc::new(Context {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            resync,
            namespace,
            metrics,
        })
    }
}

impl Context {
    /// How soon a failed reconcile is tried again.
    pub fn retry_delay(&self) -> Duration {
        self.resync.min(Duration::from_secs(30))
    }
}

/// Write `status` to `obj`'s status subresource by server-side apply, unless
/// it is what the object already has (a reconcile that changes nothing
/// writes nothing).
pub(crate) async fn write_status<K, S>(
    api: &kube::Api<K>,
    obj: &K,
    current: Option<&S>,
    status: S,
) -> Result<(), Error>
where
    K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    S: serde::Serialize + PartialEq,
{
    if current == Some(&status) {
        return Ok(());
    }
    let patch = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    let name = obj.meta().name.clone().unwrap_or_default();
    let pp = kube::api::PatchParams::apply(FIELD_MANAGER).force();
    api.patch_status(&name, &pp, &kube::api::Patch::Apply(&patch))
        .await?;
    Ok(())
}

/// Run one reconcile and count it (and its error class, if it failed) in
/// the operator's metrics.
pub(crate) async fn timed<F>(
    ctx: &Context,
    kind: metrics::Kind,
    reconcile: F,
) -> Result<kube::runtime::controller::Action, Error>
where
    F: std::future::Future<Output = Result<kube::runtime::controller::Action, Error>>,
{
    let t = std::time::Instant::now();
    let r = reconcile.await;
    let err = r.as_ref().err().map(Error::metric_label);
    ctx.metrics.reconciled(kind, t.elapsed(), err);
    r
}

/// Run both controllers, and keep the broker pods' deletion cost, until
/// `shutdown` is cancelled.
pub async fn run(ctx: Arc<Context>, shutdown: CancellationToken) {
    let b = broker::run(ctx.clone(), shutdown.clone());
    let u = user::run(ctx.clone(), shutdown.clone());
    let d = deletion_cost::run(ctx, shutdown);
    tokio::join!(b, u, d);
}

/// Run the controllers only while this replica holds the leader Lease;
/// stand by (and try for it) the rest of the time, until `shutdown`. The
/// controllers stop before the Lease is handed back, so two replicas never
/// reconcile at once.
pub async fn run_elected(
    ctx: Arc<Context>,
    lease: lease::LeaseConfig,
    shutdown: CancellationToken,
) {
    let lock = Arc::new(lease::LeaseLock::new(ctx.client.clone(), lease));
    let (tx, mut leader) = tokio::sync::watch::channel(false);
    let lease_stop = CancellationToken::new();
    let holder = tokio::spawn(lease::hold(
        lock,
        tx,
        ctx.metrics.clone(),
        lease_stop.clone(),
    ));
    while !shutdown.is_cancelled() {
        tokio::select! {
            // Shutdown first: both may be ready at once.
            biased;
            _ = shutdown.cancelled() => break,
            ok = async { leader.wait_for(|l| *l).await.is_ok() } => if !ok { break },
        }
        let controllers = shutdown.child_token();
        let running = run(ctx.clone(), controllers.clone());
        tokio::pin!(running);
        tokio::select! {
            _ = &mut running => {}
            _ = async { leader.wait_for(|l| !*l).await.map(|_| ()) } => {
                tracing::warn!("not the leader any more: stopping the controllers");
                controllers.cancel();
                running.await;
            }
        }
    }
    lease_stop.cancel();
    let _ = holder.await;
}

/// Ask the API server for its version every `every` until `stop`: each
/// answer keeps `/readyz` ready.
pub async fn watch_api(
    client: Client,
    metrics: Arc<metrics::Metrics>,
    every: Duration,
    stop: CancellationToken,
) {
    loop {
        match client.apiserver_version().await {
            Ok(_) => metrics.api_ok(),
            Err(e) => tracing::debug!(error = %e, "API server check failed"),
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}
