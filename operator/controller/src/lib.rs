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
//!
//! Every write is a server-side apply with the field manager
//! [`FIELD_MANAGER`]; children carry owner references, so deleting a
//! resource deletes what it made. A reconcile that changes nothing writes
//! nothing.

pub mod auth;
pub mod broker;
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
    pub fn new(client: Client, resync: Duration, namespace: Option<String>) -> Arc<Context> {
        let reporter = Reporter {
            controller: FIELD_MANAGER.into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Arc::new(Context {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            resync,
            namespace,
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

/// Run both controllers until `shutdown` is cancelled.
pub async fn run(
    client: Client,
    resync: Duration,
    namespace: Option<String>,
    shutdown: CancellationToken,
) {
    let ctx = Context::new(client, resync, namespace);
    let b = broker::run(ctx.clone(), shutdown.clone());
    let u = user::run(ctx, shutdown);
    tokio::join!(b, u);
}
