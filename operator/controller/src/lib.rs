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
//! - [`cert_manager`]: server certificates from a cert-manager issuer.
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
pub mod caches;
pub mod cert_manager;
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
    #[error("the reconcile took longer than {RECONCILE_TIMEOUT:?}")]
    Timeout,
}

/// What kind of failure a reconcile met: how soon it is tried again, and
/// whether the user is told (a condition and a Warning event) because only
/// they can fix it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// A ResourceQuota refused an object.
    Quota,
    /// The API server refused an object as invalid (a name, a value).
    Invalid,
    /// The operator may not do it (its RBAC).
    Forbidden,
    /// Anything else: a conflict, a timeout, the API server away.
    Transient,
}

impl ErrorClass {
    /// The condition reason the user sees, for the classes they can fix.
    pub fn reason(self) -> Option<&'static str> {
        match self {
            ErrorClass::Quota => Some("QuotaExceeded"),
            ErrorClass::Invalid => Some("Rejected"),
            ErrorClass::Forbidden => Some("Forbidden"),
            ErrorClass::Transient => None,
        }
    }

    /// The wait before try `n` (1 for the first retry): doubling from a
    /// start by class, up to a ceiling (`transient_max` for transient
    /// errors, 5 minutes for the rest, which only a change fixes).
    pub fn backoff(self, n: u32, transient_max: Duration) -> Duration {
        let (start, max) = match self {
            ErrorClass::Transient => (Duration::from_millis(500), transient_max),
            ErrorClass::Quota | ErrorClass::Forbidden => {
                (Duration::from_secs(5), Duration::from_secs(300))
            }
            ErrorClass::Invalid => (Duration::from_secs(10), Duration::from_secs(300)),
        };
        start
            .saturating_mul(1u32 << n.saturating_sub(1).min(16))
            .min(max.max(start))
    }
}

impl Error {
    pub fn metric_label(&self) -> &'static str {
        match (self, self.class()) {
            (Error::Kube(_), ErrorClass::Quota) => "quota",
            (Error::Kube(_), ErrorClass::Invalid) => "invalid",
            (Error::Kube(_), ErrorClass::Forbidden) => "forbidden",
            (Error::Kube(_), _) => "kube",
            (Error::Serialize(_), _) => "serialize",
            (Error::Hash, _) => "hash",
            (Error::Tls(_), _) => "tls",
            (Error::Timeout, _) => "timeout",
        }
    }

    pub fn class(&self) -> ErrorClass {
        match self {
            Error::Kube(kube::Error::Api(s)) => match s.code {
                403 if s.message.contains("exceeded quota") => ErrorClass::Quota,
                403 => ErrorClass::Forbidden,
                400 | 422 => ErrorClass::Invalid,
                _ => ErrorClass::Transient,
            },
            _ => ErrorClass::Transient,
        }
    }

    /// The API server's own words, for a condition or an event (never a
    /// secret: it names objects and fields, not their data).
    pub fn user_message(&self) -> String {
        match self {
            Error::Kube(kube::Error::Api(s)) => s.message.clone(),
            e => e.to_string(),
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
    /// Failed reconciles in a row, by object (for the backoff).
    failures: std::sync::Mutex<std::collections::HashMap<String, u32>>,
    /// Users and Secrets in memory (filled while the controllers run).
    caches: parking_lot::RwLock<Arc<caches::Caches>>,
    /// What this process last wrote into each broker's auth files.
    pub(crate) auth_written: std::sync::Mutex<std::collections::HashMap<String, auth::Written>>,
    /// Estimated bytes of users per auth file before the next file is used
    /// (a Secret holds at most 1 MiB).
    pub user_file_budget: std::sync::atomic::AtomicUsize,
}

impl Context {
    /// One more failure of `key` in a row: how many now.
    pub fn failed(&self, key: &str) -> u32 {
        let mut f = self
            .failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = f.entry(key.to_string()).or_insert(0);
        *n = n.saturating_add(1);
        *n
    }

    /// `key` reconciled: its backoff starts over.
    pub fn succeeded(&self, key: &str) {
        self.failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(key);
    }

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
        let client = counting(client, metrics.clone());
        Arc::new(Context {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            resync,
            namespace,
            metrics,
            failures: Default::default(),
            caches: parking_lot::RwLock::new(Arc::new(caches::Caches::empty())),
            auth_written: Default::default(),
            user_file_budget: std::sync::atomic::AtomicUsize::new(auth::FILE_BUDGET),
        })
    }
}

/// `client`, with each request counted in `metrics` by verb and resource.
fn counting(client: Client, metrics: Arc<metrics::Metrics>) -> Client {
    let ns = client.default_namespace().to_string();
    let svc = tower::service_fn(move |req: http::Request<kube::client::Body>| {
        metrics.api_request(req.method(), req.uri());
        let inner = client.clone();
        async move { inner.send(req).await }
    });
    Client::new(svc, ns)
}

impl Context {
    /// The user and Secret caches of the running controllers.
    pub fn caches(&self) -> Arc<caches::Caches> {
        self.caches.read().clone()
    }

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

/// The longest one reconcile may take.
pub const RECONCILE_TIMEOUT: Duration = Duration::from_secs(60);

/// Run one reconcile (at most [`RECONCILE_TIMEOUT`]) and count it (and its error class, if it failed) in
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
    // A reconcile that waits on something that never comes (a request the
    // API server never answers) must not hold its object forever.
    let r = match tokio::time::timeout(RECONCILE_TIMEOUT, reconcile).await {
        Ok(r) => r,
        Err(_) => {
            tracing::warn!(kind = ?kind, after = ?RECONCILE_TIMEOUT, "reconcile timed out; retrying");
            Err(Error::Timeout)
        }
    };
    let err = r.as_ref().err().map(Error::metric_label);
    ctx.metrics.reconciled(kind, t.elapsed(), err);
    r
}

/// Run both controllers, and keep the broker pods' deletion cost, until
/// `shutdown` is cancelled.
pub async fn run(ctx: Arc<Context>, shutdown: CancellationToken) {
    // Fresh caches, and nothing assumed about what is written: another
    // replica may have led in between.
    let (caches, wake) = caches::Caches::start(&ctx, &shutdown);
    *ctx.caches.write() = caches.clone();
    ctx.auth_written
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clear();
    tracing::info!("filling the user and Secret caches");
    if !caches.ready(&shutdown).await {
        return;
    }
    tracing::info!(
        users = caches.users.len(),
        secrets = caches.secrets.len(),
        "caches filled; starting the controllers"
    );
    let b = broker::run(ctx.clone(), shutdown.clone(), wake);
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

#[cfg(test)]
mod error_tests {
    use super::*;

    fn api(code: u16, message: &str) -> Error {
        Error::Kube(kube::Error::Api(Box::new(kube::core::Status {
            code,
            message: message.into(),
            ..Default::default()
        })))
    }

    #[test]
    fn errors_are_classed_and_back_off_by_class() {
        let quota = api(403, "configmaps \"x\" is forbidden: exceeded quota: q");
        assert_eq!(quota.class(), ErrorClass::Quota);
        assert_eq!(quota.metric_label(), "quota");
        assert_eq!(api(403, "cannot patch").class(), ErrorClass::Forbidden);
        assert_eq!(
            api(422, "metadata.labels: Invalid value").class(),
            ErrorClass::Invalid
        );
        assert_eq!(api(409, "conflict").class(), ErrorClass::Transient);
        assert_eq!(api(500, "etcd").class(), ErrorClass::Transient);
        assert_eq!(api(500, "etcd").class().reason(), None);
        assert_eq!(quota.class().reason(), Some("QuotaExceeded"));

        let max = Duration::from_secs(30);
        let t: Vec<u64> = (1..=8)
            .map(|n| ErrorClass::Transient.backoff(n, max).as_millis() as u64)
            .collect();
        assert_eq!(t, [500, 1000, 2000, 4000, 8000, 16000, 30000, 30000]);
        let q: Vec<u64> = (1..=8)
            .map(|n| ErrorClass::Quota.backoff(n, max).as_secs())
            .collect();
        assert_eq!(q, [5, 10, 20, 40, 80, 160, 300, 300]);
        assert_eq!(ErrorClass::Invalid.backoff(1, max), Duration::from_secs(10));
        assert_eq!(
            ErrorClass::Quota.backoff(1000, max),
            Duration::from_secs(300)
        );
    }
}
