//! Brokers as real pods: the operator installed with its Helm chart on a
//! one-node cluster (`scripts/k8s-cluster.sh`: scheduler, kubelet on
//! containerd, kube-proxy, every controller), brokers made with `kubectl
//! apply`, and clients that reach them through the broker's Service (a
//! NodePort on 127.0.0.1), never through a pod's own address.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cirrus_codec::QoS;
use cirrus_e2e::k8s::run;
use cirrus_e2e::load::{persistent_subscriber, publish_numbered, Leave, Tally};
use cirrus_e2e::node::{self, apply, kubectl, kubectl_for, wait_for, Namespace};
use cirrus_e2e::{Client, Opts};

/// Pods start, pass their probes and the operator sees them within this.
const READY: Duration = Duration::from_secs(240);

fn broker(name: &str, replicas: u32, spec: &str) -> String {
    format!(
        "apiVersion: mqtt.cirrus.dev/v1alpha1\nkind: MqttBroker\nmetadata: {{name: {name}}}\nspec:\n  image: cirrus.local/cirrus-broker:dev\n  replicas: {replicas}\n  redis: {{managed: true, managedImage: 'cirrus.local/redis:dev'}}\n  service: {{type: NodePort}}\n{spec}"
    )
}

/// `kubectl wait --for=condition=Ready` on the broker.
fn wait_ready(ns: &Namespace, name: &str) {
    let (ok, _, err) = kubectl_for(
        &[
            "wait",
            "-n",
            &ns.name,
            "--for=condition=Ready",
            &format!("mqttbroker/{name}"),
            &format!("--timeout={}s", READY.as_secs()),
        ],
        READY + Duration::from_secs(10),
    );
    assert!(ok, "broker {name} not Ready: {err}\n{}", ns.describe());
}

/// The pod a connection just made landed on: the one whose
/// `cirrus_connections` went up from `before`.
fn pod_with_more(ns: &Namespace, before: &[(String, f64)]) -> String {
    wait_for(
        Duration::from_secs(20),
        "a pod counting the connection",
        || {
            before
                .iter()
                .find(|(pod, n)| {
                    ns.pod_metric(pod, "cirrus_connections")
                        .is_some_and(|m| m > *n)
                })
                .map(|(pod, _)| pod.clone())
        },
    )
}

fn connection_counts(ns: &Namespace, name: &str) -> Vec<(String, f64)> {
    ns.pods(&broker_selector(name))
        .into_iter()
        .map(|(pod, _, _)| {
            let n = ns.pod_metric(&pod, "cirrus_connections").unwrap_or(0.0);
            (pod, n)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_pods_with_managed_redis_and_tls_carry_traffic_between_pods_through_the_service() {
    let ns = tokio::task::spawn_blocking(|| Namespace::with_operator("tls"))
        .await
        .unwrap();
    let spec = "  listeners: {mqtt: 1883, mqtts: 8883}\n  tls: {enabled: true}\n";
    apply(&ns.name, &broker("b", 3, spec));
    apply(
        &ns.name,
        "apiVersion: mqtt.cirrus.dev/v1alpha1\nkind: MqttUser\nmetadata: {name: alice}\nspec: {brokerRef: b, acl: [{topic: 't/#', access: all}]}\n",
    );
    let ns = tokio::task::spawn_blocking(move || {
        wait_ready(&ns, "b");
        ns
    })
    .await
    .unwrap();
    let ready = kubectl(&[
        "get",
        "deploy",
        "b",
        "-n",
        &ns.name,
        "-o",
        "jsonpath={.status.readyReplicas}",
    ]);
    assert_eq!(ready.trim(), "3", "{}", ns.describe());
    // Started beside their Redis, the brokers waited for it: none exited.
    let restarts = kubectl(&[
        "get",
        "pods",
        "-n",
        &ns.name,
        "-l",
        &broker_selector("b"),
        "-o",
        "jsonpath={.items[*].status.containerStatuses[0].restartCount}",
    ]);
    assert_eq!(
        restarts.trim(),
        "0 0 0",
        "broker restarts\n{}",
        ns.describe()
    );

    let password = ns.secret("alice-mqtt-credentials", "password");
    let ca = ns.secret("b-tls", "ca.crt");
    let addr = ns.node_port("b", "mqtts");
    let server_name = format!("b.{}.svc", ns.name);
    let login = |id: &str| {
        let mut o = Opts::v5(id);
        o.username = Some("alice".into());
        o.password = Some(password.clone().into_bytes());
        o
    };

    // A wrong password is refused, over the same path.
    let mut bad = login("bad");
    bad.password = Some(b"not-the-password".to_vec());
    let (_, ack) = Client::connect_tls(addr, &server_name, ca.as_bytes(), bad).await;
    assert_ne!(ack.reason_code, 0, "a wrong password was accepted");

    let before = connection_counts(&ns, "b");
    assert_eq!(before.len(), 3, "{}", ns.describe());
    let (mut sub, ack) = Client::connect_tls(addr, &server_name, ca.as_bytes(), login("sub")).await;
    assert_eq!(ack.reason_code, 0, "{ack:?}");
    sub.subscribe("t/x", QoS::AtLeastOnce).await;
    let sub_pod = pod_with_more(&ns, &before);

    // The publisher connects through the Service until it lands on another pod.
    let mut tries = 0;
    let (mut publisher, pub_pod) = loop {
        tries += 1;
        assert!(
            tries <= 30,
            "30 connections through the Service all reached {sub_pod}"
        );
        let before = connection_counts(&ns, "b");
        let (c, ack) = Client::connect_tls(addr, &server_name, ca.as_bytes(), login("pub")).await;
        assert_eq!(ack.reason_code, 0, "{ack:?}");
        let pod = pod_with_more(&ns, &before);
        if pod != sub_pod {
            break (c, pod);
        }
        c.disconnect().await;
    };
    assert_eq!(
        publisher
            .publish("t/x", b"across pods", QoS::AtLeastOnce, false)
            .await,
        0
    );
    let m = sub.recv_ack().await;
    assert_eq!((&m.topic[..], &m.payload[..]), ("t/x", &b"across pods"[..]));
    eprintln!("subscriber on {sub_pod}, publisher on {pub_pod} (after {tries} tries)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_deleted_and_killed_under_qos1_load_lose_no_acknowledged_message() {
    let ns = tokio::task::spawn_blocking(|| Namespace::with_operator("kill"))
        .await
        .unwrap();
    apply(
        &ns.name,
        &broker(
            "k",
            3,
            "  allowAnonymous: true\n  anonymousAcl: [{topic: 'load/#', access: all}]\n",
        ),
    );
    let ns = Arc::new(
        tokio::task::spawn_blocking(move || {
            wait_ready(&ns, "k");
            ns
        })
        .await
        .unwrap(),
    );
    let addr = ns.node_port("k", "mqtt");
    let n = 3000;
    let tally = Arc::new(Mutex::new(Tally::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let ready = Arc::new(AtomicBool::new(false));
    let moves = Arc::new(AtomicUsize::new(0));
    let sub = tokio::spawn(persistent_subscriber(
        vec![addr],
        "pods-sub".into(),
        "load/#".into(),
        QoS::AtLeastOnce,
        Leave::Stay,
        Duration::from_millis(300),
        stop.clone(),
        ready.clone(),
        moves.clone(),
        tally.clone(),
        false,
    ));
    wait_until(Duration::from_secs(30), "subscriber", || {
        ready.load(Ordering::SeqCst)
    })
    .await;
    // Its subscription reaches every pod through the events stream.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let publisher = tokio::spawn(publish_numbered(
        vec![addr],
        "load/k",
        QoS::AtLeastOnce,
        n,
        100,
        16,
        tally.clone(),
    ));

    // A third of the way in: `kubectl delete pod` of every pod holding a
    // client (the subscriber's among them); two thirds in: SIGKILL to the
    // container of every broker holding a client.
    for (at, how) in [(n / 3, "delete"), (2 * n / 3, "kill")] {
        wait_until(Duration::from_secs(120), "publisher progress", || {
            tally.lock().unwrap().acked.len() as u32 >= at || publisher.is_finished()
        })
        .await;
        let ns2 = ns.clone();
        let victims = tokio::task::spawn_blocking(move || {
            let pods = ns2.pods(&broker_selector("k"));
            let mut hit = Vec::new();
            for (pod, _, container) in pods {
                if ns2.pod_metric(&pod, "cirrus_connections").unwrap_or(0.0) < 1.0 {
                    continue;
                }
                if how == "delete" {
                    kubectl(&["delete", "pod", &pod, "-n", &ns2.name, "--wait=false"]);
                } else {
                    let id = container.trim_start_matches("containerd://");
                    let sock = node::kubeconfig().with_file_name("containerd.sock");
                    let sock = sock.to_str().unwrap();
                    let (ok, _, err) = run(
                        Path::new("ctr"),
                        &[
                            "--address",
                            sock,
                            "-n",
                            "k8s.io",
                            "tasks",
                            "kill",
                            "-s",
                            "SIGKILL",
                            id,
                        ],
                        &[],
                        Duration::from_secs(20),
                    );
                    assert!(ok, "ctr tasks kill {id}: {err}");
                }
                hit.push(pod);
            }
            hit
        })
        .await
        .unwrap();
        assert!(!victims.is_empty(), "no pod held a client");
        eprintln!("{how}: {victims:?} at {at} acknowledged");
    }
    tokio::time::timeout(Duration::from_secs(150), publisher)
        .await
        .expect("publisher in time")
        .unwrap();
    stop.store(true, Ordering::SeqCst);
    tokio::time::timeout(Duration::from_secs(150), sub)
        .await
        .expect("subscriber in time")
        .unwrap();
    let moves = moves.load(Ordering::Relaxed);
    eprintln!("subscriber reconnected {moves} times");
    tally
        .lock()
        .unwrap()
        .check("pods deleted and killed", QoS::AtLeastOnce);
    assert!(
        moves >= 2,
        "both faults reached the subscriber ({moves} reconnects)"
    );
    // The publisher got to the end (what was in flight when its pod went
    // was not acknowledged, so not counted, and not sent again).
    assert!(
        tally.lock().unwrap().acked.contains(&(n - 1)),
        "the last message was never acknowledged"
    );
}

async fn wait_until(timeout: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The Dockerfile's runtime stage (after its last `FROM`): the `COPY
/// --from=build` source and destination, the `USER`, the `ENTRYPOINT`.
fn dockerfile_runtime(path: &str) -> (String, String, String, Vec<String>) {
    let text = std::fs::read_to_string(cirrus_e2e::k8s::workspace_root().join(path)).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let from = lines.iter().rposition(|l| l.starts_with("FROM ")).unwrap();
    let rest = &lines[from..];
    let value = |key: &str| {
        rest.iter()
            .find_map(|l| l.strip_prefix(key))
            .unwrap_or_else(|| panic!("{path}: no {key}"))
            .trim()
            .to_string()
    };
    let copy = value("COPY --from=build ");
    let (src, dest) = copy.split_once(' ').unwrap();
    let entry: Vec<String> = serde_json::from_str(&value("ENTRYPOINT ")).unwrap();
    (src.into(), dest.trim().into(), value("USER "), entry)
}

/// The images the cluster runs hold what the Dockerfiles would put in theirs:
/// the same release binary at the same path, the same user and entrypoint.
#[test]
fn the_clusters_images_match_the_dockerfiles() {
    let images = node::kubeconfig().with_file_name("images");
    for (dockerfile, image) in [
        ("broker/Dockerfile", "cirrus-broker"),
        ("operator/Dockerfile", "cirrus-operator"),
    ] {
        let (src, dest, user, entry) = dockerfile_runtime(dockerfile);
        let dir = cirrus_e2e::certs::Dir::new();
        let tar = images.join(format!("{image}.tar"));
        let untar = |archive: &Path, into: &Path| {
            let (ok, _, err) = run(
                Path::new("tar"),
                &[
                    "-xf",
                    archive.to_str().unwrap(),
                    "-C",
                    into.to_str().unwrap(),
                ],
                &[],
                Duration::from_secs(60),
            );
            assert!(ok, "tar -xf {}: {err}", archive.display());
        };
        untar(&tar, &dir.0);
        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.0.join("manifest.json")).unwrap()).unwrap();
        let m = &manifest[0];
        assert_eq!(m["RepoTags"][0], format!("cirrus.local/{image}:dev"));
        let config: serde_json::Value = serde_json::from_slice(
            &std::fs::read(dir.0.join(m["Config"].as_str().unwrap())).unwrap(),
        )
        .unwrap();
        assert_eq!(config["config"]["User"], user, "{image}: user");
        assert_eq!(
            config["config"]["Entrypoint"],
            serde_json::json!(entry),
            "{image}: entrypoint"
        );
        let rootfs = dir.0.join("rootfs");
        std::fs::create_dir(&rootfs).unwrap();
        for layer in m["Layers"].as_array().unwrap() {
            untar(&dir.0.join(layer.as_str().unwrap()), &rootfs);
        }
        let in_image = std::fs::read(rootfs.join(dest.trim_start_matches('/'))).unwrap();
        let built = cirrus_e2e::k8s::workspace_root().join(src.trim_start_matches("/src/"));
        assert!(
            in_image == std::fs::read(&built).unwrap(),
            "{image}: {dest} is not {}",
            built.display()
        );
        // It runs in that root: every library it links is there.
        let (ok, out, err) = run(
            Path::new("chroot"),
            &[rootfs.to_str().unwrap(), &dest, "--version"],
            &[],
            Duration::from_secs(20),
        );
        assert!(
            ok && out.starts_with(image),
            "{image} --version in its image: {out}{err}"
        );
    }
}

/// The broker's pods (not its managed Redis).
fn broker_selector(name: &str) -> String {
    format!("app.kubernetes.io/instance={name},app.kubernetes.io/name=cirrus-broker")
}
