//! Rollouts on the Redis store: each pod writes its template revision
//! (`revision`, the `pod-template-hash` on Kubernetes) into Redis. Two
//! revisions among the live pods mean a rollout is under way; the older one
//! is the revision whose first live pod came up earlier.
//!
//! During a rollout no pod rebalances (the clients it would move may sit on
//! an old pod and have to move again), and an old pod that drains first
//! waits a bounded time for its old siblings to drain as well: a draining
//! pod is out of the Service, so once every old pod drains, the clients it
//! sends away reach new pods only and move once.

use std::collections::BTreeMap;

use crate::store::redis::PodRevision;

/// More than one revision among the live pods.
pub fn in_progress(pods: &[PodRevision]) -> bool {
    let mut revs = pods.iter().map(|p| p.revision.as_str());
    let first = revs.next();
    revs.any(|r| Some(r) != first)
}

/// How many other pods of this pod's revision may still take clients
/// while a newer revision is live: those not draining, and those draining
/// for less than `settle_ms` (the time the Service takes to stop sending
/// clients to a pod that stopped being ready). The clients this pod sends
/// away could land on them. 0 when this pod's revision is the newest (a
/// rollback removes the newer pods, which wait for nobody).
pub fn old_siblings_serving(pods: &[PodRevision], settle_ms: u64) -> usize {
    let Some(me) = pods.iter().find(|p| p.mine) else {
        return 0;
    };
    // A revision's age: when its earliest live pod came.
    let mut since: BTreeMap<&str, u64> = BTreeMap::new();
    for p in pods {
        let e = since.entry(&p.revision).or_insert(p.since_ms);
        *e = (*e).min(p.since_ms);
    }
    let mine = since.get(me.revision.as_str()).copied().unwrap_or(0);
    if !since.values().any(|&s| s > mine) {
        return 0;
    }
    pods.iter()
        .filter(|p| !p.mine && p.revision == me.revision)
        .filter(|p| p.draining_for_ms.is_none_or(|d| d < settle_ms))
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(mine: bool, revision: &str, since_ms: u64, draining: Option<u64>) -> PodRevision {
        PodRevision {
            mine,
            revision: revision.into(),
            since_ms,
            draining_for_ms: draining,
        }
    }

    #[test]
    fn one_revision_is_no_rollout() {
        let pods = [pod(true, "a", 10, Some(0)), pod(false, "a", 5, None)];
        assert!(!in_progress(&pods));
        assert_eq!(old_siblings_serving(&pods, 5000), 0);
        assert!(!in_progress(&[]));
    }

    #[test]
    fn an_old_pod_waits_for_its_siblings_to_be_out_of_the_service() {
        let mut pods = [
            pod(true, "a", 10, Some(6000)),
            pod(false, "a", 12, None),
            pod(false, "a", 11, Some(7000)),
            pod(false, "b", 100, None),
            pod(false, "b", 101, None),
        ];
        assert!(in_progress(&pods));
        assert_eq!(old_siblings_serving(&pods, 5000), 1);
        // Draining, but only just: the Service may still send it clients.
        pods[1].draining_for_ms = Some(1000);
        assert_eq!(old_siblings_serving(&pods, 5000), 1);
        pods[1].draining_for_ms = Some(5000);
        assert_eq!(old_siblings_serving(&pods, 5000), 0);
    }

    #[test]
    fn a_new_pod_waits_for_nobody() {
        // A rollback: the newer revision's pods go, the older stay.
        let pods = [
            pod(true, "b", 100, Some(0)),
            pod(false, "b", 101, None),
            pod(false, "a", 10, None),
        ];
        assert_eq!(old_siblings_serving(&pods, 5000), 0);
    }

    #[test]
    fn a_restarted_old_pod_keeps_its_revisions_age() {
        // An old pod that restarted during the rollout came after the new
        // ones, but its revision's earliest pod did not.
        let pods = [
            pod(true, "a", 200, Some(0)),
            pod(false, "a", 10, None),
            pod(false, "b", 100, None),
        ];
        assert_eq!(old_siblings_serving(&pods, 5000), 1);
    }
}
