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

/// The verb and resource of a request to the API server, from its method
/// and path (`/api/v1/namespaces/ns/secrets/name`,
/// `/apis/group/version/mqttusers?watch=true`, ...).
pub fn classify(method: &http::Method, uri: &http::Uri) -> (&'static str, String) {
    let path = uri.path();
    let rest = if let Some(r) = path.strip_prefix("/api/") {
        r.split_once('/').map_or("", |x| x.1)
    } else if let Some(r) = path.strip_prefix("/apis/") {
        r.splitn(3, '/').nth(2).unwrap_or("")
    } else {
        return ("other", "none".into());
    };
    let mut parts: Vec<&str> = rest.split('/').filter(|p| !p.is_empty()).collect();
    if parts.len() >= 3 && parts[0] == "namespaces" {
        parts.drain(..2);
    }
    let resource = parts.first().copied().unwrap_or("none").to_string();
    let named = parts.len() >= 2;
    let watch = uri
        .query()
        .is_some_and(|q| q.split('&').any(|kv| kv == "watch=true" || kv == "watch=1"));
    let verb = match *method {
        http::Method::GET if watch => "watch",
        http::Method::GET if named => "get",
        http::Method::GET => "list",
        http::Method::POST => "create",
        http::Method::PATCH => "patch",
        http::Method::PUT => "update",
        http::Method::DELETE => "delete",
        _ => "other",
    };
    (verb, resource)
}

/// Error classes, as [`crate::Error::metric_label`] names them.
const ERROR_LABELS: [&str; 5] = ["kube", "serialize", "hash", "tls", "timeout"];

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
    /// Requests this process made of the API server, by verb and resource.
    api_requests: Mutex<std::collections::BTreeMap<(&'static str, String), u64>>,
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

    /// A request to the API server: counted by its verb (`get`, `list`,
    /// `watch`, `create`, `patch`, `update`, `delete`) and resource.
    pub fn api_request(&self, method: &http::Method, uri: &http::Uri) {
        let (verb, resource) = classify(method, uri);
        let mut m = self.api_requests.lock();
        // Bounded: resources are the few kinds the operator touches.
        if m.len() < 256 || m.contains_key(&(verb, resource.clone())) {
            *m.entry((verb, resource)).or_insert(0) += 1;
        }
    }

    /// Requests made so far with `verb` (on `resource`, or any).
    pub fn api_requests(&self, verb: &str, resource: Option<&str>) -> u64 {
        self.api_requests
            .lock()
            .iter()
            .filter(|((v, r), _)| *v == verb && resource.is_none_or(|x| x == r))
            .map(|(_, n)| n)
            .sum()
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
        o.head(
            "cirrus_operator_api_requests_total",
            "counter",
            "Requests made of the Kubernetes API server, by verb and resource.",
        );
        for ((verb, resource), n) in self.api_requests.lock().iter() {
            o.sample(
                "cirrus_operator_api_requests_total",
                &[("verb", verb), ("resource", resource)],
                *n,
            );
        }
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
    fn requests_are_classed_by_verb_and_resource() {
        let c = |m: &str, u: &str| {
            let (v, r) = classify(&m.parse().unwrap(), &u.parse().unwrap());
            format!("{v} {r}")
        };
        assert_eq!(c("GET", "/api/v1/namespaces/a/secrets/x"), "get secrets");
        assert_eq!(
            c("GET", "/api/v1/namespaces/a/secrets?labelSelector=x"),
            "list secrets"
        );
        assert_eq!(
            c("GET", "/api/v1/secrets?watch=true&resourceVersion=1"),
            "watch secrets"
        );
        assert_eq!(
            c(
                "GET",
                "/apis/mqtt.cirrus.dev/v1alpha1/namespaces/a/mqttusers"
            ),
            "list mqttusers"
        );
        assert_eq!(
            c(
                "PATCH",
                "/apis/mqtt.cirrus.dev/v1alpha1/namespaces/a/mqttusers/u/status"
            ),
            "patch mqttusers"
        );
        assert_eq!(c("GET", "/api/v1/namespaces/a"), "get namespaces");
        assert_eq!(c("POST", "/api/v1/namespaces/a/events"), "create events");
        assert_eq!(c("GET", "/version"), "other none");
    }

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
