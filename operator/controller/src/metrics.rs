//! The operator's own metrics and health, served on its admin port
//! (`/metrics`, `/healthz`, `/readyz`) by `cirrus-admin`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cirrus_admin::{Exposition, Histogram, StatusCode};
use parking_lot::Mutex;

/// Which controller a reconcile belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Broker = 0,
    User = 1,
}

impl Kind {
    const ALL: [Kind; 2] = [Kind::Broker, Kind::User];
    fn label(self) -> &'static str {
        match self {
            Kind::Broker => "mqttbroker",
            Kind::User => "mqttuser",
        }
    }
}

/// Error classes, as [`crate::Error::metric_label`] names them.
const ERROR_LABELS: [&str; 4] = ["kube", "serialize", "hash", "tls"];

#[derive(Debug, Default)]
pub struct Metrics {
    reconciles: [AtomicU64; 2],
    errors: [[AtomicU64; ERROR_LABELS.len()]; 2],
    duration: [Histogram; 2],
    /// This replica holds the leader lease (or runs without election).
    leader: AtomicBool,
    /// Last time the API server answered this process (lease or startup).
    api_ok: Mutex<Option<Instant>>,
    lease_transitions: AtomicU64,
}

impl Metrics {
    pub fn reconciled(&self, kind: Kind, took: Duration, error: Option<&'static str>) {
        let k = kind as usize;
        self.reconciles[k].fetch_add(1, Ordering::Relaxed);
        self.duration[k].observe(took);
        if let Some(i) = error.and_then(|l| ERROR_LABELS.iter().position(|&x| x == l)) {
            self.errors[k][i].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn set_leader(&self, leader: bool) {
        if self.leader.swap(leader, Ordering::Relaxed) != leader && leader {
            self.lease_transitions.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn is_leader(&self) -> bool {
        self.leader.load(Ordering::Relaxed)
    }

    /// The API server answered.
    pub fn api_ok(&self) {
        *self.api_ok.lock() = Some(Instant::now());
    }

    /// Ready: the API server answered within `within` (a standby replica is
    /// ready too: it is healthy and takes over when the leader goes).
    pub fn ready(&self, within: Duration) -> bool {
        self.api_ok.lock().is_some_and(|t| t.elapsed() <= within)
    }

    pub fn render(&self) -> String {
        let mut o = Exposition::new();
        let rows: Vec<(&str, u64)> = Kind::ALL
            .iter()
            .map(|k| {
                (
                    k.label(),
                    self.reconciles[*k as usize].load(Ordering::Relaxed),
                )
            })
            .collect();
        o.labelled(
            "cirrus_operator_reconciles_total",
            "counter",
            "Reconciles run, by controller.",
            &rows,
            "controller",
        );
        o.head(
            "cirrus_operator_reconcile_errors_total",
            "counter",
            "Reconciles that failed (and are retried), by controller and error class.",
        );
        for k in Kind::ALL {
            for (i, l) in ERROR_LABELS.iter().enumerate() {
                o.sample(
                    "cirrus_operator_reconcile_errors_total",
                    &[("controller", k.label()), ("error", l)],
                    self.errors[k as usize][i].load(Ordering::Relaxed),
                );
            }
        }
        o.histogram(
            "cirrus_operator_broker_reconcile_seconds",
            "Duration of one MqttBroker reconcile.",
            &self.duration[Kind::Broker as usize],
        );
        o.histogram(
            "cirrus_operator_user_reconcile_seconds",
            "Duration of one MqttUser reconcile.",
            &self.duration[Kind::User as usize],
        );
        o.one(
            "cirrus_operator_leader",
            "gauge",
            "1 when this replica runs the controllers (holds the leader lease).",
            u64::from(self.is_leader()),
        );
        o.one(
            "cirrus_operator_leader_acquisitions_total",
            "counter",
            "Times this replica became the leader.",
            self.lease_transitions.load(Ordering::Relaxed),
        );
        o.finish()
    }

    /// The admin port's answer for `path`.
    pub fn route(&self, path: &str, ready_within: Duration) -> (StatusCode, String) {
        match path {
            "/healthz" => (StatusCode::OK, "ok\n".into()),
            "/readyz" if self.ready(ready_within) => (StatusCode::OK, "ready\n".into()),
            "/readyz" => (
                StatusCode::SERVICE_UNAVAILABLE,
                "the API server has not answered\n".into(),
            ),
            "/metrics" => (StatusCode::OK, self.render()),
            _ => (StatusCode::NOT_FOUND, "not found\n".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_reconciles_and_errors() {
        let m = Metrics::default();
        m.reconciled(Kind::Broker, Duration::from_millis(3), None);
        m.reconciled(Kind::Broker, Duration::from_millis(3), Some("kube"));
        m.reconciled(Kind::User, Duration::from_millis(1), Some("hash"));
        m.set_leader(true);
        let t = m.render();
        assert!(t.contains("cirrus_operator_reconciles_total{controller=\"mqttbroker\"} 2\n"));
        assert!(t.contains(
            "cirrus_operator_reconcile_errors_total{controller=\"mqttbroker\",error=\"kube\"} 1\n"
        ));
        assert!(t.contains(
            "cirrus_operator_reconcile_errors_total{controller=\"mqttuser\",error=\"hash\"} 1\n"
        ));
        assert!(t.contains("cirrus_operator_broker_reconcile_seconds_count 2\n"));
        assert!(t.contains("cirrus_operator_leader 1\n"));
        assert!(!m.ready(Duration::from_secs(10)));
        m.api_ok();
        assert_eq!(
            m.route("/readyz", Duration::from_secs(10)).0,
            StatusCode::OK
        );
    }
}
