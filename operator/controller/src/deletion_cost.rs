//! Keeps each broker pod's `controller.kubernetes.io/pod-deletion-cost`
//! in step with its connections, so that a scale-down (HPA or `replicas`)
//! removes the pods with the fewest clients and moves the fewest. Kubernetes
//! reads the annotation from 1.22 (beta, on by default; alpha behind the
//! `PodDeletionCost` feature gate in 1.21); older clusters ignore it.
//!
//! Every [`EVERY`], the leader lists the broker pods in its scope, reads
//! `cirrus_connections` from each one's admin port (as the custom metrics
//! API does) and patches the annotation where it moved by more than
//! [`worth_writing`] allows: a pod's count changes all the time, its order
//! among the pods rarely.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{ListParams, Patch, PatchParams};
use kube::Api;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::custom_metrics::{scrape, serving_ip, BROKER_LABEL};
use crate::Context;

pub const ANNOTATION: &str = "controller.kubernetes.io/pod-deletion-cost";

/// How often the counts are read.
pub const EVERY: Duration = Duration::from_secs(10);

/// Patch the pods in `ctx`'s scope every [`EVERY`] until `stop`.
pub async fn run(ctx: std::sync::Arc<Context>, stop: CancellationToken) {
    loop {
        if let Err(e) = once(&ctx).await {
            warn!(error = %e, "pod deletion cost: could not list the broker pods");
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(EVERY) => {}
        }
    }
}

async fn once(ctx: &Context) -> Result<(), kube::Error> {
    let pods = ctx
        .scoped::<Pod>()
        .list(&ListParams::default().labels(BROKER_LABEL))
        .await?;
    let reads = pods.items.into_iter().filter_map(|p| {
        let ip = serving_ip(&p)?;
        let ns = p.metadata.namespace.clone()?;
        let name = p.metadata.name.clone()?;
        let now = p
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(ANNOTATION))
            .and_then(|v| v.parse::<i64>().ok());
        Some(async move { (ns, name, now, scrape(&ip).await) })
    });
    for (ns, name, now, connections) in futures_util::future::join_all(reads).await {
        let Some(connections) = connections else {
            debug!(pod = %name, "pod deletion cost: no count");
            continue;
        };
        let cost = i64::try_from(connections).unwrap_or(i64::MAX);
        if !worth_writing(now, cost) {
            continue;
        }
        let patch = json!({"metadata": {"annotations": {ANNOTATION: cost.to_string()}}});
        if let Err(e) = Api::<Pod>::namespaced(ctx.client.clone(), &ns)
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            // The pod may be going away; the next round tries again.
            debug!(pod = %name, error = %e, "pod deletion cost not written");
        }
    }
    Ok(())
}

/// Whether the annotation (`now`) is far enough from the count to write:
/// missing, or off by more than 10 % and at least 5 (small counts exactly).
fn worth_writing(now: Option<i64>, cost: i64) -> bool {
    match now {
        None => true,
        Some(now) => {
            let diff = (now - cost).abs();
            diff > 0 && (cost.max(now) < 50 || (diff >= 5 && diff * 10 > cost.max(now)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::worth_writing;

    #[test]
    fn the_annotation_follows_large_moves_and_small_counts() {
        assert!(worth_writing(None, 0));
        assert!(!worth_writing(Some(30), 30));
        // Small counts exactly: they decide between nearly empty pods.
        assert!(worth_writing(Some(30), 31));
        assert!(worth_writing(Some(0), 1));
        // Large ones when they move by more than 10 %.
        assert!(!worth_writing(Some(1000), 1080));
        assert!(worth_writing(Some(1000), 1150));
        assert!(worth_writing(Some(1000), 0));
    }
}
