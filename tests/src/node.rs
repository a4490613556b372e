//! A one-node Kubernetes cluster (`scripts/k8s-cluster.sh`) for the tests
//! that run brokers as real pods, driven with `kubectl` and `helm` only.
//!
//! `.ci/run` starts one for the whole run and exports
//! `CIRRUS_TEST_CLUSTER_KUBECONFIG`. Without it, the first test to need one
//! starts it in `target/k8s-cluster` (under a file lock, so parallel test
//! processes share it) and leaves it running for the next tests; stop it
//! with `scripts/k8s-cluster.sh stop target/k8s-cluster`. Needs root.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::k8s::{helm, run, started_once, workspace_root};

/// Path of the kubeconfig of a running one-node cluster (started if needed).
pub fn kubeconfig() -> PathBuf {
    if let Ok(p) = std::env::var("CIRRUS_TEST_CLUSTER_KUBECONFIG") {
        return PathBuf::from(p);
    }
    let run_dir = workspace_root().join("target/k8s-cluster");
    started_once(
        "scripts/k8s-cluster.sh",
        &run_dir,
        &["apiserver", "kubelet"],
        &[],
        || {},
    )
}

/// `kubectl args` on the cluster, at most `timeout`: (success, stdout, stderr).
pub fn kubectl_for(args: &[&str], timeout: Duration) -> (bool, String, String) {
    let kc = kubeconfig();
    run(
        std::path::Path::new("kubectl"),
        args,
        &[("KUBECONFIG", kc.to_str().expect("utf-8 path"))],
        timeout,
    )
}

/// `kubectl args`, which must succeed within 60 s; its stdout.
pub fn kubectl(args: &[&str]) -> String {
    let (ok, out, err) = kubectl_for(args, Duration::from_secs(60));
    assert!(ok, "kubectl {args:?}: {err}");
    out
}

/// `kubectl apply` of a YAML document.
pub fn apply(ns: &str, yaml: &str) {
    let dir = crate::certs::Dir::new();
    let f = dir.write("apply.yaml", yaml);
    kubectl(&["apply", "-n", ns, "-f", &f]);
}

/// Poll `f` every 500 ms until it returns `Some`, at most `timeout`.
pub fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// A namespace of its own for one test, deleted (with all in it) when
/// dropped; the operator, installed with Helm, watches only it.
pub struct Namespace {
    pub name: String,
}

impl Namespace {
    /// A fresh namespace with the operator chart installed in it (one
    /// replica, this tree's image).
    pub fn with_operator(prefix: &str) -> Namespace {
        Namespace::with_operator_set(prefix, &[])
    }

    /// The same, with more chart values (`--set` each of `sets`).
    pub fn with_operator_set(prefix: &str, sets: &[&str]) -> Namespace {
        let name = format!("{prefix}-{}", std::process::id());
        kubectl(&["create", "namespace", &name]);
        let ns = Namespace { name };
        let chart = workspace_root().join("charts/cirrus-operator");
        let kc = kubeconfig();
        let (ok, _, err) = run(
            &helm(),
            &[
                "install",
                "cirrus",
                chart.to_str().expect("utf-8 path"),
                "--namespace",
                &ns.name,
                "--kubeconfig",
                kc.to_str().expect("utf-8 path"),
                "--set",
                &format!("watchNamespace={}", ns.name),
                "--set",
                "image.repository=cirrus.local/cirrus-operator",
                "--set",
                "image.tag=dev",
                "--set",
                "replicaCount=1",
                "--set",
                "resyncSeconds=5",
                "--wait",
                "--timeout",
                "120s",
            ]
            .into_iter()
            .chain(sets.iter().flat_map(|v| ["--set", *v]))
            .collect::<Vec<&str>>(),
            &[],
            Duration::from_secs(150),
        );
        assert!(ok, "helm install: {err}\n{}", ns.describe());
        ns
    }

    /// What a failing test should show: the namespace's pods and events.
    pub fn describe(&self) -> String {
        let (_, pods, _) = kubectl_for(
            &["get", "pods,deploy,svc", "-n", &self.name, "-o", "wide"],
            Duration::from_secs(20),
        );
        let (_, events, _) = kubectl_for(
            &[
                "get",
                "events",
                "-n",
                &self.name,
                "--sort-by=.lastTimestamp",
            ],
            Duration::from_secs(20),
        );
        format!("{pods}\n{events}")
    }

    /// The running pods with `label=value`: (name, IP, container ID).
    pub fn pods(&self, selector: &str) -> Vec<(String, String, String)> {
        let out = kubectl(&[
            "get",
            "pods",
            "-n",
            &self.name,
            "-l",
            selector,
            "--field-selector=status.phase=Running",
            "-o",
            "jsonpath={range .items[*]}{.metadata.name}|{.status.podIP}|{.status.containerStatuses[0].containerID}|{.metadata.deletionTimestamp}{\"\\n\"}{end}",
        ]);
        out.lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split('|').collect();
                // Pods already being deleted, or whose container is not
                // running, are not counted.
                (f.len() == 4 && f.iter().take(3).all(|v| !v.is_empty()) && f[3].is_empty())
                    .then(|| (f[0].into(), f[1].into(), f[2].into()))
            })
            .collect()
    }

    /// A key of a Secret in this namespace, decoded.
    pub fn secret(&self, name: &str, key: &str) -> String {
        kubectl(&[
            "get",
            "secret",
            name,
            "-n",
            &self.name,
            "-o",
            &format!("go-template={{{{index .data \"{key}\" | base64decode}}}}"),
        ])
    }

    /// The node port of a Service's port `port_name`, reached on 127.0.0.1.
    pub fn node_port(&self, service: &str, port_name: &str) -> std::net::SocketAddr {
        let p = kubectl(&[
            "get",
            "service",
            service,
            "-n",
            &self.name,
            "-o",
            &format!("jsonpath={{.spec.ports[?(@.name==\"{port_name}\")].nodePort}}"),
        ]);
        let port: u16 = p
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("node port {p:?}"));
        std::net::SocketAddr::from(([127, 0, 0, 1], port))
    }

    /// A Prometheus gauge or counter of a broker pod, from the admin port
    /// the operator gives it, through the API server's proxy.
    pub fn pod_metric(&self, pod: &str, metric: &str) -> Option<f64> {
        let (ok, out, _) = kubectl_for(
            &[
                "--request-timeout=5s",
                "get",
                "--raw",
                &format!(
                    "/api/v1/namespaces/{}/pods/{pod}:{}/proxy/metrics",
                    self.name,
                    cirrus_operator::resources::ADMIN_PORT
                ),
            ],
            Duration::from_secs(20),
        );
        if !ok {
            return None;
        }
        out.lines().find_map(|l| {
            l.strip_prefix(metric)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.describe());
        }
        let kc = kubeconfig();
        let kc = kc.to_str().expect("utf-8 path");
        let _ = run(
            &helm(),
            &["uninstall", "cirrus", "-n", &self.name, "--kubeconfig", kc],
            &[],
            Duration::from_secs(60),
        );
        let _ = kubectl_for(
            &["delete", "namespace", &self.name, "--wait=false"],
            Duration::from_secs(30),
        );
    }
}
