//! Brokers as real pods: the operator installed with its Helm chart on a
//! one-node cluster (`scripts/k8s-cluster.sh`: scheduler, kubelet on
//! containerd, kube-proxy, every controller), brokers made with `kubectl
//! apply`, and clients that reach them through the broker's Service (a
//! NodePort on 127.0.0.1), never through a pod's own address.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cirrus_codec::Packet;
use cirrus_codec::QoS;
use cirrus_e2e::k8s::run;
use cirrus_e2e::load::{publish_numbered, Subscriber, Tally};
use cirrus_e2e::node::{self, apply, kubectl, kubectl_for, wait_for, Namespace};
use cirrus_e2e::{Client, Next, Opts};

mod fleet;

/// Pods start, pass their probes and the operator sees them within this.
const READY: Duration = Duration::from_secs(240);

fn broker(name: &str, replicas: u32, spec: &str) -> String {
    format!(
        "apiVersion: mqtt.cirrus.dev/v1alpha1\nkind: MqttBroker\nmetadata: {{name: {name}}}\nspec:\n  image: cirrus.local/cirrus-broker:dev\n  replicas: {replicas}\n  redis: {{managed: true, managedImage: 'cirrus.local/redis:dev'}}\n  service: {{type: NodePort}}\n{spec}"
    )
}

/// A namespace with the operator (and chart values `sets`), and in it a
/// Ready broker `name` open to anonymous clients on `load/#`, with `spec`.
async fn with_broker(
    prefix: &'static str,
    sets: &'static [&'static str],
    name: &'static str,
    replicas: u32,
    spec: &'static str,
) -> Arc<Namespace> {
    tokio::task::spawn_blocking(move || {
        let ns = Namespace::with_operator_set(prefix, sets);
        let anonymous =
            "  allowAnonymous: true\n  anonymousAcl: [{topic: 'load/#', access: all}]\n";
        apply(
            &ns.name,
            &broker(name, replicas, &format!("{anonymous}{spec}")),
        );
        wait_ready(&ns, name);
        Arc::new(ns)
    })
    .await
    .unwrap()
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
async fn three_tls_pods_carry_traffic_between_pods_and_keep_every_client_through_a_ca_rotation() {
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
    publisher.disconnect().await;

    // The CA rotates under TLS load (30 s a phase): clients that read the
    // bundle again from the Secret each second (as one mounted from it
    // would be) keep making new connections, each a fresh handshake; the
    // subscriber's connection, made with the old CA alone, goes on; no pod
    // restarts or is replaced.
    let ns = Arc::new(ns);
    let pods_before = pod_names(&ns);
    let stop = Arc::new(AtomicBool::new(false));
    let bundle = Arc::new(Mutex::new(ca.clone()));
    let refresher = {
        let (ns, stop, bundle) = (ns.clone(), stop.clone(), bundle.clone());
        tokio::task::spawn_blocking(move || {
            while !stop.load(Ordering::SeqCst) {
                let b = ns.secret("b-tls", "ca.crt");
                if b.contains("BEGIN CERTIFICATE") {
                    *bundle.lock().unwrap() = b;
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        })
    };
    let tally = Arc::new(Mutex::new(Tally::default()));
    let reader = {
        let (stop, tally) = (stop.clone(), tally.clone());
        tokio::spawn(async move {
            let quiet_end = || Instant::now() + Duration::from_secs(5);
            let mut until = None;
            loop {
                if until.is_none() && stop.load(Ordering::SeqCst) {
                    until = Some(quiet_end());
                }
                if until.is_some_and(|u| Instant::now() > u) {
                    return true;
                }
                match sub.next(Duration::from_millis(200)).await {
                    Next::Packet(Packet::Publish(m)) => {
                        sub.ack(&m).await;
                        if let Some(s) = cirrus_e2e::load::seq_of(&m.payload) {
                            *tally.lock().unwrap().received.entry(s).or_insert(0) += 1;
                        }
                    }
                    Next::Closed => return false,
                    _ => {}
                }
            }
        })
    };
    let seq = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let handshakes = Arc::new(AtomicUsize::new(0));
    let loaders: Vec<_> = (0..3)
        .map(|k| {
            let (stop, bundle, tally, seq, failures, handshakes) = (
                stop.clone(),
                bundle.clone(),
                tally.clone(),
                seq.clone(),
                failures.clone(),
                handshakes.clone(),
            );
            let (server_name, o) = (server_name.clone(), login(&format!("rot-{k}")));
            tokio::spawn(async move {
                while !stop.load(Ordering::SeqCst) {
                    let pem = bundle.lock().unwrap().clone();
                    match Client::try_connect_tls(addr, &server_name, pem.as_bytes(), o.clone())
                        .await
                    {
                        Ok((mut c, ack)) if ack.reason_code == 0 => {
                            handshakes.fetch_add(1, Ordering::Relaxed);
                            let n = seq.fetch_add(1, Ordering::SeqCst) as u32;
                            let rc = c
                                .publish("t/x", &n.to_be_bytes(), QoS::AtLeastOnce, false)
                                .await;
                            if rc == 0 {
                                tally.lock().unwrap().acked.insert(n);
                            }
                            c.disconnect().await;
                        }
                        Ok((_, ack)) => failures
                            .lock()
                            .unwrap()
                            .push(format!("CONNACK {:#x}", ack.reason_code)),
                        Err(e) => failures.lock().unwrap().push(e),
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let t0 = Instant::now();
    kubectl(&[
        "annotate",
        "secret",
        "cirrus-ca",
        "-n",
        &ns.name,
        "--overwrite",
        "mqtt.cirrus.dev/ca-overlap-seconds=30",
        "mqtt.cirrus.dev/rotate-ca=test",
    ]);
    let ns2 = ns.clone();
    tokio::task::spawn_blocking(move || {
        wait_for(Duration::from_secs(180), "the CA rotation to end", || {
            let a = get_json(&ns2, "secret", "cirrus-ca")["metadata"]["annotations"].clone();
            (a["mqtt.cirrus.dev/rotated-ca"] == "test"
                && a.get("mqtt.cirrus.dev/ca-rotation").is_none())
            .then_some(())
        })
    })
    .await
    .unwrap();
    let took = t0.elapsed();
    // A little longer on the new CA alone, then stop.
    tokio::time::sleep(Duration::from_secs(5)).await;
    stop.store(true, Ordering::SeqCst);
    for l in loaders {
        l.await.unwrap();
    }
    refresher.await.unwrap();
    let stayed = reader.await.unwrap();
    let new_ca = bundle.lock().unwrap().clone();
    let failures = failures.lock().unwrap().clone();
    eprintln!(
        "CA rotated in {took:?}: {} TLS handshakes, {} failed {:?}",
        handshakes.load(Ordering::Relaxed),
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(failures.is_empty(), "handshakes failed during the rotation");
    assert!(stayed, "the subscriber's connection was closed");
    tally
        .lock()
        .unwrap()
        .check("TLS load through the CA rotation", QoS::AtLeastOnce);
    // The pods serve certificates from the new CA (the old CA alone no
    // longer verifies them), and none restarted.
    assert_ne!(new_ca, ca);
    let (c, ack) = Client::connect_tls(addr, &server_name, new_ca.as_bytes(), login("after")).await;
    assert_eq!(ack.reason_code, 0);
    c.disconnect().await;
    let old_alone = Client::try_connect_tls(addr, &server_name, ca.as_bytes(), login("old")).await;
    assert!(
        matches!(&old_alone, Err(e) if e.contains("handshake")),
        "the old CA still verifies a pod: {:?}",
        old_alone.map(|(_, a)| a)
    );
    let ns2 = ns.clone();
    let (after, restarts) = tokio::task::spawn_blocking(move || {
        let restarts = kubectl(&[
            "get",
            "pods",
            "-n",
            &ns2.name,
            "-l",
            &broker_selector("b"),
            "-o",
            "jsonpath={.items[*].status.containerStatuses[0].restartCount}",
        ]);
        (pod_names(&ns2), restarts)
    })
    .await
    .unwrap();
    assert_eq!(after, pods_before, "pods were replaced");
    assert_eq!(restarts.trim(), "0 0 0", "broker restarts");
}

fn pod_names(ns: &Namespace) -> Vec<String> {
    let mut names: Vec<String> = ns
        .pods(&broker_selector("b"))
        .into_iter()
        .map(|(name, _, _)| name)
        .collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_deleted_and_killed_under_qos1_load_lose_no_acknowledged_message() {
    let ns = with_broker("kill", &[], "k", 3, "").await;
    let load = Load::start(ns.node_port("k", "mqtt"), "k", 3000, 100).await;
    let n = load.n;

    // A third of the way in: `kubectl delete pod` of every pod holding a
    // client (the subscriber's among them); two thirds in: SIGKILL to the
    // container of every broker holding a client.
    for (at, how) in [(n / 3, "delete"), (2 * n / 3, "kill")] {
        load.wait_acked(at).await;
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
    let moves = load.finish("pods deleted and killed").await;
    assert!(
        moves >= 2,
        "both faults reached the subscriber ({moves} reconnects)"
    );
}

/// QoS 1 load through a Service's node port: a persistent subscriber and a
/// publisher of `n` numbered messages at `rate` a second, both going on
/// through the Service when their pod goes.
struct Load {
    n: u32,
    tally: Arc<Mutex<Tally>>,
    stop: Arc<AtomicBool>,
    moves: Arc<AtomicUsize>,
    sub: tokio::task::JoinHandle<()>,
    publisher: tokio::task::JoinHandle<()>,
}

impl Load {
    async fn start(addr: SocketAddr, name: &str, n: u32, rate: u32) -> Load {
        let tally = Arc::new(Mutex::new(Tally::default()));
        let sub = Subscriber::new(vec![addr], &format!("{name}-sub"), "load/#", &tally);
        let (stop, moves) = (sub.stop.clone(), sub.moves.clone());
        let sub = sub.start().await;
        // Its subscription reaches every pod through the events stream.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let topic = format!("load/{name}");
        let t = tally.clone();
        let publisher = tokio::spawn(async move {
            publish_numbered(vec![addr], &topic, QoS::AtLeastOnce, n, rate, 16, t).await
        });
        Load {
            n,
            tally,
            stop,
            moves,
            sub,
            publisher,
        }
    }

    fn acked(&self) -> u32 {
        self.tally.lock().unwrap().acked.len() as u32
    }

    async fn wait_acked(&self, at: u32) {
        wait_until(Duration::from_secs(120), "publisher progress", || {
            self.acked() >= at || self.publisher.is_finished()
        })
        .await;
    }

    /// Let the publisher end and the subscriber read everything; check that
    /// no acknowledged message was lost. The subscriber's reconnects.
    async fn finish(self, what: &str) -> usize {
        tokio::time::timeout(Duration::from_secs(150), self.publisher)
            .await
            .expect("publisher in time")
            .unwrap();
        self.stop.store(true, Ordering::SeqCst);
        tokio::time::timeout(Duration::from_secs(150), self.sub)
            .await
            .expect("subscriber in time")
            .unwrap();
        let moves = self.moves.load(Ordering::Relaxed);
        eprintln!("{what}: subscriber reconnected {moves} times");
        let t = self.tally.lock().unwrap();
        t.check(what, QoS::AtLeastOnce);
        // The publisher got to the end (what was in flight when its pod
        // went was not acknowledged, so not counted, and not sent again).
        assert!(
            t.acked.contains(&(self.n - 1)),
            "{what}: the last message was never acknowledged"
        );
        moves
    }
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

/// `ctr` on the cluster's own containerd, in the namespace the kubelet uses.
fn ctr(args: &[&str]) {
    let sock = node::kubeconfig().with_file_name("containerd.sock");
    let mut all = vec!["--address", sock.to_str().unwrap(), "-n", "k8s.io"];
    all.extend(args);
    let (ok, _, err) = run(Path::new("ctr"), &all, &[], Duration::from_secs(30));
    assert!(ok, "ctr {args:?}: {err}");
}

/// `kubectl patch --type merge` of a broker's spec.
fn patch_broker(ns: &Namespace, name: &str, spec: &str) {
    kubectl(&[
        "patch",
        "mqttbroker",
        name,
        "-n",
        &ns.name,
        "--type",
        "merge",
        "-p",
        &format!("{{\"spec\": {spec}}}"),
    ]);
}

/// What `kubectl get` shows of a broker and its Deployment, as one JSON
/// document each.
fn get_json(ns: &Namespace, kind: &str, name: &str) -> serde_json::Value {
    serde_json::from_str(&kubectl(&["get", kind, name, "-n", &ns.name, "-o", "json"])).unwrap()
}

/// A broker condition: (status, reason, message).
fn broker_condition(b: &serde_json::Value, type_: &str) -> (String, String, String) {
    let c = b["status"]["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == type_))
        .cloned()
        .unwrap_or_default();
    let s = |k: &str| c[k].as_str().unwrap_or_default().to_string();
    (s("status"), s("reason"), s("message"))
}

/// The operator has seen the broker's current spec.
fn observed(b: &serde_json::Value) -> bool {
    b["status"]["observedGeneration"] == b["metadata"]["generation"]
}

/// One look at a rollout: the broker's updatedReplicas, its Ready and
/// Progressing (status, reason), and the Deployment's available pods.
#[derive(Debug, Clone, PartialEq)]
struct RolloutStep {
    updated: i64,
    ready: (String, String),
    progressing: (String, String),
    available: i64,
}

fn rollout_step(ns: &Namespace, name: &str) -> Option<RolloutStep> {
    let b = get_json(ns, "mqttbroker", name);
    if !observed(&b) {
        return None;
    }
    let d = get_json(ns, "deployment", name);
    let (rs, rr, _) = broker_condition(&b, "Ready");
    let (ps, pr, _) = broker_condition(&b, "Progressing");
    Some(RolloutStep {
        updated: b["status"]["updatedReplicas"].as_i64().unwrap_or(0),
        ready: (rs, rr),
        progressing: (ps, pr),
        available: d["status"]["availableReplicas"].as_i64().unwrap_or(0),
    })
}

/// The images of a broker's running pods that are not being deleted.
fn pod_images(ns: &Namespace, name: &str) -> Vec<String> {
    // Old pods still draining their clients are not counted.
    per_pod(
        ns,
        name,
        "{.spec.containers[0].image}|{.metadata.deletionTimestamp}",
    )
    .into_iter()
    .filter_map(|l| l.strip_suffix('|').map(str::to_string))
    .collect()
}

/// A line per running pod of broker `name`, as the JSONPath `each` prints
/// it for one pod.
fn per_pod(ns: &Namespace, name: &str, each: &str) -> Vec<String> {
    let selector = broker_selector(name);
    let out = format!("jsonpath={{range .items[*]}}{each}{{\"\\n\"}}{{end}}");
    kubectl(&[
        "get",
        "pods",
        "-n",
        &ns.name,
        "-l",
        &selector,
        "--field-selector=status.phase=Running",
        "-o",
        &out,
    ])
    .lines()
    .map(str::to_string)
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_image_rolls_the_pods_one_by_one_under_qos1_load_and_a_bad_tag_is_not_ready() {
    let ns = with_broker(
        "roll",
        &[],
        "r",
        3,
        "  rollout: {maxSurge: 1, progressDeadlineSeconds: 20}\n",
    )
    .await;
    // The same image under a second tag, as a new release would be.
    ctr(&[
        "images",
        "tag",
        "--force",
        "cirrus.local/cirrus-broker:dev",
        "cirrus.local/cirrus-broker:next",
    ]);
    let load = Load::start(ns.node_port("r", "mqtt"), "r", 3000, 60).await;
    load.wait_acked(300).await;
    let t0 = Instant::now();
    patch_broker(&ns, "r", r#"{"image": "cirrus.local/cirrus-broker:next"}"#);

    // The rollout as the broker's status tells it, until Ready again.
    let ns2 = ns.clone();
    let steps = tokio::task::spawn_blocking(move || {
        let mut steps: Vec<RolloutStep> = Vec::new();
        wait_for(Duration::from_secs(200), "the rollout to finish", || {
            let s = rollout_step(&ns2, "r")?;
            if steps.last() != Some(&s) {
                eprintln!("{:>5.1}s {s:?}", t0.elapsed().as_secs_f64());
                steps.push(s.clone());
            }
            (s.ready.0 == "True" && s.updated == 3).then_some(())
        });
        steps
    })
    .await
    .unwrap();
    let took = t0.elapsed();
    let acked = load.acked();
    eprintln!(
        "rollout took {took:?}; {acked} of {} acknowledged by then",
        load.n
    );
    assert!(
        acked < load.n,
        "the load ended before the rollout did: make it longer"
    );
    // Not Ready while old pods ran; Progressing with the count of pods on
    // the new image, one by one; never fewer than 3 pods available.
    assert_eq!(
        steps[0].ready,
        ("False".into(), "RollingUpdate".into()),
        "{steps:#?}"
    );
    let updated: Vec<i64> = steps.iter().map(|s| s.updated).collect();
    assert!(updated.windows(2).all(|w| w[0] <= w[1]), "{steps:#?}");
    for n in 1..=2 {
        assert!(
            steps.iter().any(|s| s.updated == n
                && s.progressing == ("True".into(), "RollingUpdate".into())),
            "no step with {n} of 3 pods updated: {steps:#?}"
        );
    }
    assert!(steps.iter().all(|s| s.available >= 3), "{steps:#?}");
    let last = steps.last().unwrap();
    assert_eq!(last.progressing, ("False".into(), "RolloutComplete".into()));
    let ns2 = ns.clone();
    let images = tokio::task::spawn_blocking(move || pod_images(&ns2, "r"))
        .await
        .unwrap();
    assert!(
        images
            .iter()
            .all(|i| i == "cirrus.local/cirrus-broker:next"),
        "{images:?}"
    );
    let moves = load.finish("rolling update").await;
    assert!(moves >= 1, "the subscriber's pod was replaced: it moved");

    // A tag that does not exist: the new pod never starts, the old ones go
    // on serving, and the broker says so.
    patch_broker(
        &ns,
        "r",
        r#"{"image": "cirrus.local/cirrus-broker:no-such-tag"}"#,
    );
    let ns2 = ns.clone();
    let (b, first) = tokio::task::spawn_blocking(move || {
        let first = wait_for(
            Duration::from_secs(30),
            "the operator to see the change",
            || rollout_step(&ns2, "r"),
        );
        let b = wait_for(
            Duration::from_secs(120),
            "the rollout to be called stuck",
            || {
                let b = get_json(&ns2, "mqttbroker", "r");
                (broker_condition(&b, "Degraded").0 == "True").then_some(b)
            },
        );
        (b, first)
    })
    .await
    .unwrap();
    assert_eq!(first.ready.0, "False", "Ready at once: {first:?}");
    let (rs, rr, rm) = broker_condition(&b, "Ready");
    let (ps, pr, _) = broker_condition(&b, "Progressing");
    assert_eq!(
        (rs.as_str(), rr.as_str()),
        ("False", "ProgressDeadlineExceeded"),
        "{rm}"
    );
    assert_eq!(
        (ps.as_str(), pr.as_str()),
        ("False", "ProgressDeadlineExceeded")
    );
    // The one new pod (it never starts), and the 3 old ones available.
    assert!(rm.starts_with("1 of 3 pods updated, 3 available"), "{rm}");
    // The old pods still serve through the Service.
    let addr = ns.node_port("r", "mqtt");
    let (mut sub, _) = Client::connect(addr, Opts::v5("after-bad-tag")).await;
    assert_eq!(sub.subscribe("load/after", QoS::AtLeastOnce).await, 1);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (mut publ, _) = Client::connect(addr, Opts::v5("after-bad-tag-pub")).await;
    assert_eq!(
        publ.publish("load/after", b"still here", QoS::AtLeastOnce, false)
            .await,
        0
    );
    let got = sub.recv_ack().await;
    assert_eq!(&got.payload[..], b"still here");
    let ns2 = ns.clone();
    let events = tokio::task::spawn_blocking(move || {
        kubectl(&[
            "get",
            "events",
            "-n",
            &ns2.name,
            "--field-selector",
            "involvedObject.kind=MqttBroker,type=Warning",
            "-o",
            "jsonpath={.items[*].reason}",
        ])
    })
    .await
    .unwrap();
    assert!(events.contains("ProgressDeadlineExceeded"), "{events}");
}

/// Ask the eviction API to evict `pod` (what `kubectl drain` does for each
/// pod): Ok, or the API server's refusal.
fn evict(ns: &Namespace, pod: &str) -> Result<(), String> {
    let dir = cirrus_e2e::certs::Dir::new();
    let body = dir.write(
        "eviction.json",
        &format!(
            r#"{{"apiVersion": "policy/v1beta1", "kind": "Eviction", "metadata": {{"name": "{pod}", "namespace": "{}"}}}}"#,
            ns.name
        ),
    );
    let (ok, _, err) = kubectl_for(
        &[
            "create",
            "--raw",
            &format!("/api/v1/namespaces/{}/pods/{pod}/eviction", ns.name),
            "-f",
            &body,
        ],
        Duration::from_secs(30),
    );
    if ok {
        Ok(())
    } else {
        Err(err)
    }
}

fn disruptions_allowed(ns: &Namespace, name: &str) -> i64 {
    get_json(ns, "pdb", name)["status"]["disruptionsAllowed"]
        .as_i64()
        .unwrap_or(-1)
}

#[test]
fn a_disruption_budget_refuses_evictions_beyond_it_and_autoscaling_keeps_the_pods_running() {
    let ns = Namespace::with_operator("pdb");
    apply(&ns.name, &broker("p", 3, ""));
    wait_ready(&ns, "p");
    // maxUnavailable 1 (the default): one eviction, and the next refused
    // until a replacement is ready.
    wait_for(Duration::from_secs(60), "the budget's status", || {
        (disruptions_allowed(&ns, "p") == 1).then_some(())
    });
    let pods: Vec<String> = ns
        .pods(&broker_selector("p"))
        .into_iter()
        .map(|p| p.0)
        .collect();
    assert_eq!(pods.len(), 3);
    evict(&ns, &pods[0]).expect("the first eviction");
    let refused = evict(&ns, &pods[1]).expect_err("a second eviction at once");
    assert!(refused.contains("disruption budget"), "{refused}");
    assert!(ns
        .pods(&broker_selector("p"))
        .iter()
        .any(|p| p.0 == pods[1]));
    // Once the replacement is available, the budget allows one again.
    wait_for(Duration::from_secs(120), "a replacement pod", || {
        (disruptions_allowed(&ns, "p") == 1).then_some(())
    });
    evict(&ns, &pods[1]).expect("an eviction once the budget allows it");
    wait_for(READY, "3 available pods again", || {
        let d = get_json(&ns, "deployment", "p");
        (d["status"]["availableReplicas"] == 3 && disruptions_allowed(&ns, "p") == 1).then_some(())
    });

    // Autoscaling turned on for the running 3 pods: the HPA takes over
    // from 3, not from the Deployment's default of 1. (No metrics source
    // runs here: the HPA keeps the count it finds.)
    patch_broker(
        &ns,
        "p",
        r#"{"autoscaling": {"minReplicas": 1, "maxReplicas": 5}}"#,
    );
    wait_for(
        Duration::from_secs(60),
        "the HPA controller at work",
        || {
            let (ok, out, _) = kubectl_for(
                &[
                    "get",
                    "hpa",
                    "p",
                    "-n",
                    &ns.name,
                    "-o",
                    "jsonpath={.status.currentReplicas}",
                ],
                Duration::from_secs(20),
            );
            (ok && out.trim() == "3").then_some(())
        },
    );
    let end = Instant::now() + Duration::from_secs(20);
    while Instant::now() < end {
        let d = get_json(&ns, "deployment", "p");
        assert_eq!(d["spec"]["replicas"], 3, "{}", ns.describe());
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Each running broker pod's `controller.kubernetes.io/pod-deletion-cost`.
fn deletion_costs(ns: &Namespace, name: &str) -> Vec<String> {
    per_pod(
        ns,
        name,
        "{.metadata.annotations.controller\\.kubernetes\\.io/pod-deletion-cost}",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hpa_scales_on_connections_through_the_operators_metrics_api() {
    let ns = with_broker(
        "hpa",
        &["customMetricsApi.enabled=true"],
        "h",
        1,
        "  autoscaling:\n    minReplicas: 1\n    maxReplicas: 3\n    targetConnectionsPerPod: 10\n    behavior: {scaleDown: {stabilizationWindowSeconds: 0, policies: [{type: Pods, value: 1, periodSeconds: 15}]}}\n",
    )
    .await;
    // The API server reaches the operator's metrics API (the APIService is
    // Available) and it reports the one pod.
    let ns2 = ns.clone();
    tokio::task::spawn_blocking(move || {
        let path = format!(
            "/apis/custom.metrics.k8s.io/v1beta1/namespaces/{}/pods/*/cirrus_connections",
            ns2.name
        );
        let first = wait_for(Duration::from_secs(90), "the custom metrics API", || {
            let (ok, out, _) = kubectl_for(&["get", "--raw", &path], Duration::from_secs(20));
            let v: serde_json::Value = serde_json::from_str(&out).ok()?;
            (ok && v["items"].as_array()?.len() == 1).then_some(v)
        });
        eprintln!("{first}");
    })
    .await
    .unwrap();

    // 30 clients through the Service: 30 per pod against a target of 10.
    let addr = ns.node_port("h", "mqtt");
    let mut clients = Vec::new();
    for i in 0..30 {
        let mut o = Opts::v5(&format!("hpa-{i}"));
        o.keep_alive = 0;
        let (c, ack) = Client::connect(addr, o).await;
        assert_eq!(ack.reason_code, 0);
        clients.push(c);
    }
    let t0 = Instant::now();
    let ns2 = ns.clone();
    let hpa = tokio::task::spawn_blocking(move || {
        wait_for(Duration::from_secs(120), "the HPA to scale to 3", || {
            let d = get_json(&ns2, "deployment", "h");
            (d["spec"]["replicas"] == 3).then_some(())
        });
        get_json(&ns2, "hpa.v2.autoscaling", "h")
    })
    .await
    .unwrap();
    eprintln!(
        "scaled to 3 in {:?}; HPA status: {}",
        t0.elapsed(),
        hpa["status"]
    );
    // The HPA read the connections (the CPU metric has no source here).
    let current = hpa["status"]["currentMetrics"].to_string();
    assert!(current.contains("cirrus_connections"), "{current}");
    let ns2 = ns.clone();
    tokio::task::spawn_blocking(move || {
        wait_for(READY, "3 available pods", || {
            let d = get_json(&ns2, "deployment", "h");
            (d["status"]["availableReplicas"] == 3).then_some(())
        })
    })
    .await
    .unwrap();

    // The operator keeps each pod's deletion cost at its connections: the
    // first pod holds the 30 clients, the new ones none (the rebalance
    // waits for clients connected a minute).
    let ns2 = ns.clone();
    let costs = tokio::task::spawn_blocking(move || {
        wait_for(Duration::from_secs(60), "the pods' deletion cost", || {
            let mut c = deletion_costs(&ns2, "h");
            c.sort_unstable();
            (c == ["0", "0", "30"]).then_some(c)
        })
    })
    .await
    .unwrap();
    eprintln!("pod-deletion-cost: {costs:?}");

    // QoS 1 load through the Service, and the 30 clients gone: 2
    // connections on 3 pods against a target of 10. The HPA scales down one
    // pod per 15 s (the spec's behavior); each pod that goes drains its
    // clients to the others, and nothing acknowledged is lost.
    let load = Load::start(addr, "h", 3000, 60).await;
    load.wait_acked(300).await;
    drop(clients);
    let t0 = Instant::now();
    let ns2 = ns.clone();
    tokio::task::spawn_blocking(move || {
        wait_for(
            Duration::from_secs(150),
            "the HPA to scale down to 1",
            || {
                let d = get_json(&ns2, "deployment", "h");
                (d["spec"]["replicas"] == 1 && pod_images(&ns2, "h").len() == 1).then_some(())
            },
        )
    })
    .await
    .unwrap();
    eprintln!(
        "scaled down to 1 pod in {:?}; {} of {} acknowledged by then",
        t0.elapsed(),
        load.acked(),
        load.n
    );
    assert!(
        load.acked() < load.n,
        "the load ended before the scale-down"
    );
    load.finish("HPA scale-down").await;
}
