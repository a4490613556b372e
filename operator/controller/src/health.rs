//! The broker's `Ready`, `Progressing` and `Degraded` conditions, read from
//! its Deployment as the Deployment controller reports it: a rollout counts
//! as done only when the controller has seen the current template
//! (`observedGeneration`), every pod runs it and enough of them are
//! available; a rollout the controller gave up on (its progress deadline)
//! is stuck, not ready.

use k8s_openapi::api::apps::v1::{Deployment, DeploymentCondition};

/// One condition: (status, reason, message).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cond {
    pub ok: bool,
    pub reason: &'static str,
    pub message: String,
}

impl Cond {
    fn new(ok: bool, reason: &'static str, message: String) -> Cond {
        Cond {
            ok,
            reason,
            message,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    pub ready: Cond,
    pub progressing: Cond,
    pub degraded: Cond,
    pub updated: i32,
}

fn condition<'a>(d: &'a Deployment, type_: &str) -> Option<&'a DeploymentCondition> {
    d.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_.as_deref() == Some(type_))
}

/// `desired`: the pods the broker should have now; `redis_available`:
/// whether the managed Redis has a pod (None: not managed).
pub fn of(d: &Deployment, desired: i32, redis_available: Option<bool>) -> Health {
    let st = d.status.clone().unwrap_or_default();
    let seen = st.observed_generation.unwrap_or(0) >= d.metadata.generation.unwrap_or(0);
    let updated = if seen {
        st.updated_replicas.unwrap_or(0)
    } else {
        0
    };
    let replicas = st.replicas.unwrap_or(0);
    let available = st.available_replicas.unwrap_or(0);
    let desired = desired.max(1);
    let pods = format!("{updated} of {desired} pods updated, {available} available");

    let stuck = condition(d, "Progressing").filter(|c| {
        c.status.as_deref() == Some("False")
            && c.reason.as_deref() == Some("ProgressDeadlineExceeded")
    });
    let failure = condition(d, "ReplicaFailure").filter(|c| c.status.as_deref() == Some("True"));
    // Pods on an older template are still running (all of them, while the
    // controller has not seen the current one).
    let rolling = replicas > updated;
    let rolled_out = seen && !rolling && updated >= desired && available >= desired;

    let with = |c: &DeploymentCondition| match c.message.as_deref() {
        Some(m) if !m.is_empty() => format!("{pods}: {m}"),
        _ => pods.clone(),
    };
    let degraded = match (stuck, failure) {
        (Some(c), _) => Cond::new(true, "ProgressDeadlineExceeded", with(c)),
        (None, Some(c)) => Cond::new(true, "ReplicaFailure", with(c)),
        (None, None) => Cond::new(false, "AsExpected", pods.clone()),
    };
    let progressing = if let Some(c) = stuck {
        Cond::new(false, "ProgressDeadlineExceeded", with(c))
    } else if rolling {
        Cond::new(true, "RollingUpdate", pods.clone())
    } else if !rolled_out {
        Cond::new(true, "PodsStarting", pods.clone())
    } else {
        Cond::new(false, "RolloutComplete", pods.clone())
    };
    let ready = if rolled_out && redis_available == Some(false) {
        Cond::new(
            false,
            "RedisUnavailable",
            format!("{pods}; the managed Redis has no available pod"),
        )
    } else if rolled_out {
        Cond::new(true, "Available", pods.clone())
    } else if degraded.ok {
        Cond::new(false, degraded.reason, degraded.message.clone())
    } else if rolling {
        Cond::new(false, "RollingUpdate", pods.clone())
    } else {
        Cond::new(false, "Unavailable", pods.clone())
    };
    Health {
        ready,
        progressing,
        degraded,
        updated,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::apps::v1::DeploymentStatus;

    fn deployment(
        generation: i64,
        observed: i64,
        (replicas, updated, available): (i32, i32, i32),
        conditions: &[(&str, &str, &str)],
    ) -> Deployment {
        let mut d = Deployment::default();
        d.metadata.generation = Some(generation);
        d.status = Some(DeploymentStatus {
            observed_generation: Some(observed),
            replicas: Some(replicas),
            updated_replicas: Some(updated),
            ready_replicas: Some(available),
            available_replicas: Some(available),
            conditions: Some(
                conditions
                    .iter()
                    .map(|(t, s, r)| DeploymentCondition {
                        type_: Some(t.to_string()),
                        status: Some(s.to_string()),
                        reason: Some(r.to_string()),
                        message: Some(format!("{t} says {r}")),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..Default::default()
        });
        d
    }

    /// The three conditions, as `kubectl get` would show them.
    fn summary(h: &Health) -> String {
        let c =
            |t: &str, c: &Cond| format!("{t}={}/{}", if c.ok { "True" } else { "False" }, c.reason);
        format!(
            "{} {} {}",
            c("Ready", &h.ready),
            c("Progressing", &h.progressing),
            c("Degraded", &h.degraded)
        )
    }

    #[test]
    fn a_finished_rollout_is_ready() {
        let d = deployment(
            2,
            2,
            (3, 3, 3),
            &[("Progressing", "True", "NewReplicaSetAvailable")],
        );
        let h = of(&d, 3, None);
        assert_eq!(
            summary(&h),
            "Ready=True/Available Progressing=False/RolloutComplete Degraded=False/AsExpected"
        );
        assert_eq!(h.ready.message, "3 of 3 pods updated, 3 available");
        // ... unless its managed Redis has no pod.
        assert_eq!(of(&d, 3, Some(false)).ready.reason, "RedisUnavailable");
    }

    #[test]
    fn a_template_the_controller_has_not_seen_is_a_rollout_not_ready() {
        // The old pods are all there and available, but generation 3 is new.
        let d = deployment(
            3,
            2,
            (3, 3, 3),
            &[("Progressing", "True", "NewReplicaSetAvailable")],
        );
        let h = of(&d, 3, None);
        assert_eq!(
            summary(&h),
            "Ready=False/RollingUpdate Progressing=True/RollingUpdate Degraded=False/AsExpected"
        );
        assert_eq!(h.updated, 0);
    }

    #[test]
    fn a_rollout_half_way_is_progressing_with_its_count() {
        let d = deployment(
            3,
            3,
            (4, 2, 3),
            &[("Progressing", "True", "ReplicaSetUpdated")],
        );
        let h = of(&d, 3, None);
        assert_eq!(
            summary(&h),
            "Ready=False/RollingUpdate Progressing=True/RollingUpdate Degraded=False/AsExpected"
        );
        assert_eq!(h.progressing.message, "2 of 3 pods updated, 3 available");
    }

    #[test]
    fn a_rollout_past_its_deadline_is_stuck_and_degraded() {
        // A bad image: one new pod never gets ready, the old ones serve.
        let d = deployment(
            3,
            3,
            (4, 1, 3),
            &[("Progressing", "False", "ProgressDeadlineExceeded")],
        );
        let h = of(&d, 3, None);
        assert_eq!(
            summary(&h),
            "Ready=False/ProgressDeadlineExceeded Progressing=False/ProgressDeadlineExceeded Degraded=True/ProgressDeadlineExceeded"
        );
        assert_eq!(
            h.ready.message,
            "1 of 3 pods updated, 3 available: Progressing says ProgressDeadlineExceeded"
        );
    }

    #[test]
    fn pods_refused_by_the_api_server_are_a_replica_failure() {
        let d = deployment(
            1,
            1,
            (0, 0, 0),
            &[
                ("Progressing", "True", "ReplicaSetUpdated"),
                ("ReplicaFailure", "True", "FailedCreate"),
            ],
        );
        let h = of(&d, 2, None);
        assert_eq!(
            summary(&h),
            "Ready=False/ReplicaFailure Progressing=True/PodsStarting Degraded=True/ReplicaFailure"
        );
    }

    #[test]
    fn a_new_broker_without_pods_is_unavailable_not_rolling() {
        let d = deployment(1, 0, (0, 0, 0), &[]);
        let h = of(&d, 3, None);
        assert_eq!(
            summary(&h),
            "Ready=False/Unavailable Progressing=True/PodsStarting Degraded=False/AsExpected"
        );
    }

    #[test]
    fn pods_lost_after_a_rollout_are_unavailable_and_starting() {
        let d = deployment(
            2,
            2,
            (3, 3, 1),
            &[("Progressing", "True", "NewReplicaSetAvailable")],
        );
        let h = of(&d, 3, None);
        assert_eq!(
            summary(&h),
            "Ready=False/Unavailable Progressing=True/PodsStarting Degraded=False/AsExpected"
        );
    }
}
