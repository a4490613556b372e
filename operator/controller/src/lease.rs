//! Leader election over a `coordination.k8s.io/v1` Lease, so that several
//! operator replicas can run and exactly one reconciles.
//!
//! The holder renews the Lease every `renew` interval; another replica takes
//! it over once it has seen the same record unchanged for the whole lease
//! duration (judged by its own clock, so clock skew between nodes does not
//! matter). Writes carry the `resourceVersion` they read, so two candidates
//! cannot both win. A leader that cannot renew within the lease duration
//! stops reconciling; one that shuts down hands the Lease back at once.
//!
//! Written here rather than taken from a crate: the published lease crates
//! trail `kube`'s releases, and this is ~150 lines against the typed API.

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, ObjectMeta, PostParams};
use parking_lot::Mutex;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::metrics::Metrics;

#[derive(Debug, Clone)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    /// This replica's identity (its pod name).
    pub identity: String,
    pub duration: Duration,
    pub renew: Duration,
}

pub struct LeaseLock {
    api: Api<Lease>,
    cfg: LeaseConfig,
    /// The record last seen (holder, renew time) and when it was first seen.
    observed: Mutex<Option<(String, Instant)>>,
}

fn now() -> MicroTime {
    MicroTime(k8s_openapi::jiff::Timestamp::now())
}

impl LeaseLock {
    pub fn new(client: kube::Client, cfg: LeaseConfig) -> LeaseLock {
        LeaseLock {
            api: Api::namespaced(client, &cfg.namespace),
            cfg,
            observed: Mutex::new(None),
        }
    }

    fn spec(&self, acquire: Option<MicroTime>, transitions: Option<i32>) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.cfg.identity.clone()),
            lease_duration_seconds: Some(self.cfg.duration.as_secs().max(1) as i32),
            acquire_time: acquire,
            renew_time: Some(now()),
            lease_transitions: transitions,
            ..Default::default()
        }
    }

    /// Take or renew the Lease now; `true` when this replica holds it.
    pub async fn try_acquire(&self) -> Result<bool, kube::Error> {
        let Some(current) = self.api.get_opt(&self.cfg.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.cfg.name.clone()),
                    ..Default::default()
                },
                spec: Some(self.spec(Some(now()), Some(0))),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = current.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let mine = holder == self.cfg.identity;
        if !mine && !holder.is_empty() {
            // Someone else's: free only once its record has stood still for
            // a whole lease duration by our clock.
            let record = format!(
                "{holder}/{:?}",
                spec.renew_time.as_ref().map(|t| t.0.as_millisecond())
            );
            let duration = spec
                .lease_duration_seconds
                .map_or(self.cfg.duration, |s| Duration::from_secs(s.max(1) as u64));
            let mut seen = self.observed.lock();
            match &*seen {
                Some((r, at)) if *r == record => {
                    if at.elapsed() < duration {
                        return Ok(false);
                    }
                }
                _ => {
                    *seen = Some((record, Instant::now()));
                    return Ok(false);
                }
            }
        }
        let mut lease = current;
        let (acquire, transitions) = if mine {
            (spec.acquire_time, spec.lease_transitions)
        } else {
            (Some(now()), Some(spec.lease_transitions.unwrap_or(0) + 1))
        };
        lease.spec = Some(self.spec(acquire, transitions));
        // The resourceVersion read above makes this a compare-and-set.
        match self
            .api
            .replace(&self.cfg.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => {
                *self.observed.lock() = None;
                Ok(true)
            }
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Give the Lease up (on shutdown), so a standby takes over at once.
    pub async fn release(&self) -> Result<(), kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.cfg.name).await? else {
            return Ok(());
        };
        let Some(spec) = lease.spec.as_mut() else {
            return Ok(());
        };
        if spec.holder_identity.as_deref() != Some(&self.cfg.identity) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.renew_time = Some(now());
        self.api
            .replace(&self.cfg.name, &PostParams::default(), &lease)
            .await?;
        Ok(())
    }
}

/// Keep trying for the Lease and renewing it until `stop`; `leader` says
/// whether this replica holds it. Leadership is lost when a renewal has not
/// succeeded for a whole lease duration.
pub async fn hold(
    lock: Arc<LeaseLock>,
    leader: watch::Sender<bool>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let cfg = lock.cfg.clone();
    let mut last_renewed: Option<Instant> = None;
    loop {
        match lock.try_acquire().await {
            Ok(held) => {
                metrics.api_ok();
                if held {
                    if !*leader.borrow() {
                        info!(lease = %cfg.name, identity = %cfg.identity, "became the leader");
                    }
                    last_renewed = Some(Instant::now());
                    leader.send_replace(true);
                } else {
                    if *leader.borrow() {
                        warn!(lease = %cfg.name, "lost the lease to another replica");
                    }
                    last_renewed = None;
                    leader.send_replace(false);
                }
            }
            Err(e) => {
                debug!(error = %e, "lease request failed");
                if last_renewed.is_some_and(|t| t.elapsed() >= cfg.duration) {
                    warn!(lease = %cfg.name, "could not renew the lease in time; stepping down");
                    last_renewed = None;
                    leader.send_replace(false);
                }
            }
        }
        metrics.set_leader(*leader.borrow());
        // A candidate polls as often as a leader renews.
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(cfg.renew) => {}
        }
    }
    if *leader.borrow() {
        leader.send_replace(false);
        metrics.set_leader(false);
        match tokio::time::timeout(Duration::from_secs(5), lock.release()).await {
            Ok(Ok(())) => info!(lease = %cfg.name, "released the lease"),
            Ok(Err(e)) => warn!(error = %e, "could not release the lease"),
            Err(_) => warn!("releasing the lease timed out"),
        }
    }
}
