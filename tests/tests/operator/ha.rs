//! Managed Redis, leader election between replicas, and the operator
//! binary's own admin port.

use super::*;
use cirrus_operator::lease::{LeaseConfig, LeaseLock};
use cirrus_operator::metrics::Metrics;
use std::sync::Arc;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn managed_redis_is_deployed_wired_and_removed() {
    let c = client().await;
    let ns = namespace(&c, "op-redis").await;
    let _op = Operator::start(&c, &ns);
    create::<MqttBroker>(&c, &ns, "apiVersion: mqtt.cirrus.dev/v1alpha1\nkind: MqttBroker\nmetadata: {name: dev}\nspec: {replicas: 2, redis: {managed: true}}\n").await;
    let redis: Deployment = eventually(WAIT, "the managed Redis Deployment", || async {
        get::<Deployment>(&c, &ns, "dev-redis").await
    })
    .await;
    let pod = redis.spec.template.spec.unwrap();
    let rc = &pod.containers[0];
    assert_eq!(rc.image.as_deref(), Some("redis:7.2-alpine"));
    let sc = rc.security_context.as_ref().unwrap();
    assert_eq!(
        (sc.run_as_non_root, sc.read_only_root_filesystem),
        (Some(true), Some(true))
    );
    let svc: Service = get(&c, &ns, "dev-redis").await.expect("Redis Service");
    assert_eq!(svc.spec.unwrap().ports.unwrap()[0].port, 6379);
    // The brokers are pointed at it.
    let d: Deployment = eventually(WAIT, "broker Deployment", || async {
        get::<Deployment>(&c, &ns, "dev").await
    })
    .await;
    let env = d.spec.template.spec.unwrap().containers[0]
        .env
        .clone()
        .unwrap();
    let url = env
        .iter()
        .find(|e| e.name == "CIRRUS_REDIS_URL")
        .and_then(|e| e.value.clone());
    assert_eq!(url, Some(format!("redis://dev-redis.{ns}.svc:6379")));
    // Broker pods up but Redis not: not Ready, and it says why.
    deployment_available(&c, &ns, "dev", 2).await;
    broker_ready(&c, &ns, "dev", ("False", "RedisUnavailable")).await;
    deployment_available(&c, &ns, "dev-redis", 1).await;
    broker_ready(&c, &ns, "dev", ("True", "Available")).await;

    // A URL and `managed` together is refused with a reason.
    let brokers = Api::<MqttBroker>::namespaced(c.clone(), &ns);
    brokers
        .patch(
            "dev",
            &PatchParams::default(),
            &Patch::Merge(
                serde_json::json!({"spec": {"redis": {"url": "redis://elsewhere:6379"}}}),
            ),
        )
        .await
        .unwrap();
    broker_ready(&c, &ns, "dev", ("False", "InvalidSpec")).await;
    // Turning `managed` off moves the broker to another Redis: refused
    // while its pods run; done once none does, and the managed Redis goes.
    let patch = |spec| patch_broker_spec(&c, &ns, "dev", spec);
    patch(serde_json::json!({"redis": {"managed": false}})).await;
    broker_ready(&c, &ns, "dev", ("False", "RedisChangeRefused")).await;
    scale_broker_to_zero(
        &c,
        &ns,
        "dev",
        serde_json::json!({"managed": true, "url": null}),
    )
    .await;
    patch(serde_json::json!({"replicas": 2, "redis": {"managed": false, "url": "redis://elsewhere:6379"}})).await;
    eventually(WAIT, "the managed Redis to go", || async {
        let d = get::<Deployment>(&c, &ns, "dev-redis").await;
        let s = get::<Service>(&c, &ns, "dev-redis").await;
        (d.is_none() && s.is_none()).then_some(())
    })
    .await;
    let d: Deployment = get(&c, &ns, "dev").await.unwrap();
    let env = d.spec.template.spec.unwrap().containers[0]
        .env
        .clone()
        .unwrap();
    assert!(env
        .iter()
        .any(|e| e.name == "CIRRUS_REDIS_URL"
            && e.value.as_deref() == Some("redis://elsewhere:6379")));
}

fn lease(ns: &str, id: &str, secs: u64) -> LeaseConfig {
    LeaseConfig {
        namespace: ns.into(),
        name: "cirrus-operator".into(),
        identity: id.into(),
        duration: Duration::from_secs(secs),
        renew: Duration::from_millis(secs * 1000 / 3),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_holder_that_stops_renewing_is_replaced_after_the_lease_duration() {
    let c = client().await;
    let ns = namespace(&c, "op-lease").await;
    let a = LeaseLock::new(c.clone(), lease(&ns, "a", 3));
    let b = LeaseLock::new(c.clone(), lease(&ns, "b", 3));
    assert!(a.try_acquire().await.unwrap());
    assert!(!b.try_acquire().await.unwrap());
    // While `a` renews, `b` never gets it.
    let t0 = std::time::Instant::now();
    while t0.elapsed() < Duration::from_secs(5) {
        assert!(a.try_acquire().await.unwrap());
        assert!(!b.try_acquire().await.unwrap(), "taken from a live holder");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // `a` renews one last time, then goes silent (a crashed pod): `b`
    // waits out one lease duration from then.
    assert!(a.try_acquire().await.unwrap());
    let t1 = std::time::Instant::now();
    let took = eventually(WAIT, "b to take the lease", || async {
        b.try_acquire().await.unwrap().then(|| t1.elapsed())
    })
    .await;
    assert!(took >= Duration::from_secs(3), "taken after {took:?}");
    assert!(!a.try_acquire().await.unwrap(), "the old holder lost it");
    let l: k8s_openapi::api::coordination::v1::Lease =
        get(&c, &ns, "cirrus-operator").await.unwrap();
    let spec = l.spec.unwrap();
    assert_eq!(spec.holder_identity.as_deref(), Some("b"));
    assert_eq!(spec.lease_transitions, Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_replica_reconciles_and_a_standby_takes_over() {
    let c = client().await;
    let ns = namespace(&c, "op-elect").await;
    let start = |id: &'static str| {
        let metrics = Arc::new(Metrics::default());
        let ctx =
            cirrus_operator::Context::new(c.clone(), RESYNC, Some(ns.clone()), metrics.clone());
        let stop = CancellationToken::new();
        let h = tokio::spawn(cirrus_operator::run_elected(
            ctx,
            lease(&ns, id, 3),
            stop.clone(),
        ));
        (metrics, stop, h)
    };
    let (ma, stop_a, ha) = start("a");
    eventually(WAIT, "a to lead", || async { ma.is_leader().then_some(()) }).await;
    let (mb, stop_b, hb) = start("b");
    create::<MqttBroker>(
        &c,
        &ns,
        "apiVersion: mqtt.cirrus.dev/v1alpha1\nkind: MqttBroker\nmetadata: {name: one}\nspec: {}\n",
    )
    .await;
    eventually(WAIT, "ConfigMap one-config", || async {
        get::<ConfigMap>(&c, &ns, "one-config").await
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!mb.is_leader(), "two leaders");
    assert!(
        mb.render()
            .contains("cirrus_operator_reconciles_total{controller=\"mqttbroker\"} 0\n"),
        "the standby reconciled"
    );
    assert!(!ma
        .render()
        .contains("cirrus_operator_reconciles_total{controller=\"mqttbroker\"} 0\n"));
    // The leader shuts down and hands the lease back: the standby takes
    // over well before a lease duration would have run out.
    let t = std::time::Instant::now();
    stop_a.cancel();
    tokio::time::timeout(Duration::from_secs(10), ha)
        .await
        .unwrap()
        .unwrap();
    assert!(!ma.is_leader());
    eventually(WAIT, "b to lead", || async { mb.is_leader().then_some(()) }).await;
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "took {:?}",
        t.elapsed()
    );
    create::<MqttBroker>(
        &c,
        &ns,
        "apiVersion: mqtt.cirrus.dev/v1alpha1\nkind: MqttBroker\nmetadata: {name: two}\nspec: {}\n",
    )
    .await;
    eventually(WAIT, "ConfigMap two-config from the new leader", || async {
        get::<ConfigMap>(&c, &ns, "two-config").await
    })
    .await;
    stop_b.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), hb).await;
}

/// The operator binary: admin port, leader election from flags, and a
/// reconcile, as the Helm chart runs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_binary_serves_probes_and_metrics() {
    let c = client().await;
    let ns = namespace(&c, "op-bin").await;
    let port = cirrus_e2e::process::free_port();
    let admin_addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let admin = admin_addr.to_string();
    let otlp = cirrus_e2e::otlp::OtlpReceiver::start().await;
    let child = std::process::Command::new(cirrus_e2e::process::operator_bin())
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.endpoint())
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .args(["--namespace", &ns, "--admin", &admin, "--leader-elect"])
        .args(["--lease-secs", "3", "--resync-secs", "2"])
        .env("KUBECONFIG", cirrus_e2e::k8s::kubeconfig())
        .env("POD_NAME", "operator-0")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut child = cirrus_e2e::process::KillOnDrop(child);
    let get_path = |path: &'static str| async move {
        tokio::task::spawn_blocking(move || cirrus_e2e::process::try_http_get(admin_addr, path))
            .await
            .ok()
            .flatten()
    };
    eventually(WAIT, "/readyz 200", || async {
        let (code, _) = get_path("/readyz").await?;
        (code == 200).then_some(())
    })
    .await;
    assert_eq!(get_path("/healthz").await.map(|r| r.0), Some(200));
    create::<MqttBroker>(
        &c,
        &ns,
        "apiVersion: mqtt.cirrus.dev/v1alpha1\nkind: MqttBroker\nmetadata: {name: bin}\nspec: {}\n",
    )
    .await;
    eventually(WAIT, "ConfigMap bin-config", || async {
        get::<ConfigMap>(&c, &ns, "bin-config").await
    })
    .await;
    let text = eventually(WAIT, "a counted reconcile", || async {
        let (_, body) = get_path("/metrics").await?;
        (!body.contains("cirrus_operator_reconciles_total{controller=\"mqttbroker\"} 0\n"))
            .then_some(body)
    })
    .await;
    assert!(text.contains("cirrus_operator_leader 1\n"), "{text}");
    // Each reconcile is a trace, exported with OTLP.
    let spans = otlp
        .wait_for(WAIT, "a reconcile span", |s| {
            s.iter()
                .any(|x| x.service == "cirrus-operator" && x.name == "reconcile")
        })
        .await;
    assert!(spans.iter().any(|x| x.name == "reconcile"
        && x.attributes
            .iter()
            .any(|(k, v)| k == "broker" && v == "bin")));
    assert!(text.contains("cirrus_operator_broker_reconcile_seconds_count"));
    let l: k8s_openapi::api::coordination::v1::Lease =
        get(&c, &ns, "cirrus-operator").await.expect("the Lease");
    assert_eq!(
        l.spec.unwrap().holder_identity.as_deref(),
        Some("operator-0")
    );
    // SIGTERM: it stops and hands the Lease back.
    let pid = child.0.id();
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let t = std::time::Instant::now();
    loop {
        if child.0.try_wait().unwrap().is_some() {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "did not exit on SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let l: k8s_openapi::api::coordination::v1::Lease =
        get(&c, &ns, "cirrus-operator").await.unwrap();
    assert_eq!(l.spec.unwrap().holder_identity, None);
}
