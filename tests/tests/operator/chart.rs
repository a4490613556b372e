//! The Helm chart: lint and render it (default values and every option
//! on), apply it to the real API server, check its RBAC with `kubectl auth
//! can-i`, and run the operator binary as the chart's service account
//! (impersonated), so that a missing permission fails a reconcile here.

use super::*;
use cirrus_e2e::k8s::{helm, kubeconfig, run, workspace_root};
use cirrus_e2e::process::{operator_bin, tool};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

const CHART: &str = "charts/cirrus-operator";
const ALL_ON: &str = "charts/cirrus-operator/ci/all-on-values.yaml";
const CMD: Duration = Duration::from_secs(120);

/// Helm with its caches in a private directory (hermetic, no network).
fn helm_cmd(args: &[&str]) -> (bool, String, String) {
    let home = std::env::temp_dir().join(format!("cirrus-helm-home-{}", std::process::id()));
    let h = |d: &str| home.join(d).to_string_lossy().into_owned();
    let (c, cfg, data) = (h("cache"), h("config"), h("data"));
    run(
        &helm(),
        args,
        &[
            ("HELM_CACHE_HOME", &c),
            ("HELM_CONFIG_HOME", &cfg),
            ("HELM_DATA_HOME", &data),
        ],
        CMD,
    )
}

fn docs(yaml: &str) -> Vec<serde_yaml::Value> {
    use serde::Deserialize;
    serde_yaml::Deserializer::from_str(yaml)
        .map(|d| serde_yaml::Value::deserialize(d).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

fn of_kind<'a>(docs: &'a [serde_yaml::Value], kind: &str) -> Vec<&'a serde_yaml::Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

fn template(release: &str, ns: &str, extra: &[&str]) -> String {
    let mut args = vec!["template", release, CHART, "--namespace", ns];
    args.extend_from_slice(extra);
    let (ok, out, err) = helm_cmd(&args);
    assert!(ok, "helm template {extra:?} failed: {err}");
    out
}

/// `helm lint --strict` passes with the defaults and with `all_on`, and
/// fails on each of `bad` because of the values schema.
fn lint(chart: &str, all_on: &str, bad: &[&str]) {
    for extra in [&[][..], &["--values", all_on][..]] {
        let mut args = vec!["lint", "--strict", chart];
        args.extend_from_slice(extra);
        let (ok, out, err) = helm_cmd(&args);
        assert!(ok, "helm lint --strict {chart} {extra:?}:\n{out}{err}");
    }
    for b in bad {
        let (ok, out, err) = helm_cmd(&["lint", "--strict", chart, "--set", b]);
        assert!(!ok, "{b} passed the schema of {chart}");
        let text = format!("{out}{err}");
        assert!(text.contains("schema"), "{b}: {text}");
    }
}

#[test]
fn chart_lints_and_renders_with_defaults_and_with_every_option_on() {
    // values.schema.json refuses what makes no sense.
    lint(
        CHART,
        ALL_ON,
        &[
            "replicaCount=0",
            "image.pullPolicy=Sometimes",
            "telemetry.protocol=carrier-pigeon",
        ],
    );

    let d = docs(&template("rel", "cirrus-system", &[]));
    let kinds: std::collections::BTreeSet<&str> =
        d.iter().filter_map(|x| x["kind"].as_str()).collect();
    assert_eq!(
        kinds.into_iter().collect::<Vec<_>>(),
        vec![
            "ClusterRole",
            "ClusterRoleBinding",
            "Deployment",
            "PodDisruptionBudget",
            "Role",
            "RoleBinding",
            "Service",
            "ServiceAccount"
        ]
    );
    let dep = of_kind(&d, "Deployment")[0];
    assert_eq!(dep["spec"]["replicas"], 2);
    let pod = &dep["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    let args: Vec<&str> = c["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|a| a.as_str())
        .collect();
    assert!(args.contains(&"--leader-elect"), "{args:?}");
    assert!(args.contains(&"--admin=0.0.0.0:8080"), "{args:?}");
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(c["securityContext"]["runAsNonRoot"], true);
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert!(c["resources"]["requests"]["cpu"].is_string());
    // No wildcard anywhere in the rules.
    for role in of_kind(&d, "ClusterRole")
        .iter()
        .chain(&of_kind(&d, "Role"))
    {
        for rule in role["rules"].as_sequence().unwrap() {
            for key in ["apiGroups", "resources", "verbs"] {
                for v in rule[key].as_sequence().unwrap() {
                    assert_ne!(v.as_str(), Some("*"), "wildcard in {rule:?}");
                }
            }
        }
    }

    // Every option on.
    let d = docs(&template("rel", "cirrus-system", &["--values", ALL_ON]));
    assert_eq!(of_kind(&d, "ServiceMonitor").len(), 1);
    // The broker pods' admin port, in the watched namespace.
    let pm = of_kind(&d, "PodMonitor");
    assert_eq!(pm.len(), 1);
    assert_eq!(pm[0]["spec"]["namespaceSelector"]["matchNames"][0], "mqtt");
    assert_eq!(
        pm[0]["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"],
        "cirrus-broker"
    );
    assert_eq!(pm[0]["spec"]["podMetricsEndpoints"][0]["port"], "admin");
    // One namespace: a Role; the only ClusterRole is the custom metrics
    // API's, for its own APIService.
    let cluster_roles = of_kind(&d, "ClusterRole");
    assert_eq!(cluster_roles.len(), 1, "one namespace: a Role");
    assert_eq!(
        cluster_roles[0]["rules"][0]["resourceNames"][0],
        "v1beta1.custom.metrics.k8s.io"
    );
    assert_eq!(of_kind(&d, "APIService").len(), 1);
    let roles = of_kind(&d, "Role");
    assert!(roles.iter().any(|r| r["metadata"]["namespace"] == "mqtt"));
    let dep = of_kind(&d, "Deployment")[0];
    assert_eq!(dep["spec"]["replicas"], 3);
    let c = &dep["spec"]["template"]["spec"]["containers"][0];
    let text = serde_yaml::to_string(c).unwrap();
    for want in [
        "--namespace=mqtt",
        "--lease-secs=20",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "grpc",
        "registry.example.com/cirrus/cirrus-operator:0.1.0-test",
        "--custom-metrics=0.0.0.0:6443",
        "--custom-metrics-service=rel-cirrus-operator-custom-metrics",
    ] {
        assert!(text.contains(want), "{want} missing from {text}");
    }
    assert_eq!(
        dep["spec"]["template"]["spec"]["serviceAccountName"],
        "cirrus-operator-sa"
    );

    // The chart installs exactly the generated CRDs.
    let with_crds = docs(&template("rel", "cirrus-system", &["--include-crds"]));
    let crds = of_kind(&with_crds, "CustomResourceDefinition");
    assert_eq!(crds.len(), 2);
    for crd in crds {
        let name = crd["metadata"]["name"].as_str().unwrap();
        let file = workspace_root().join(format!("crds/{name}.yaml"));
        let want: serde_yaml::Value =
            serde_yaml::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
        assert_eq!(crd, &want, "{name} differs from crds/");
    }
}

/// The prometheus-adapter rules the chart ships serve the metric the
/// operator's HPA asks for, from the series the PodMonitor scrapes off the
/// port the broker pods name `admin`.
#[test]
fn the_prometheus_adapter_rules_serve_the_hpas_metric() {
    let text = std::fs::read_to_string(
        workspace_root().join("charts/cirrus-operator/prometheus-adapter-values.yaml"),
    )
    .unwrap();
    let v: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    let rule = &v["rules"]["custom"][0];
    let metric = cirrus_operator::custom_metrics::METRIC;
    assert!(rule["seriesQuery"].as_str().unwrap().starts_with(metric));
    assert_eq!(rule["name"]["as"], metric);
    assert_eq!(rule["resources"]["overrides"]["pod"]["resource"], "pod");
    let b: MqttBroker = serde_yaml::from_str("apiVersion: mqtt.cirrus.dev/v1alpha1\nkind: MqttBroker\nmetadata: {name: a, namespace: n, uid: u}\nspec: {autoscaling: {minReplicas: 1, maxReplicas: 3, targetConnectionsPerPod: 100}}\n").unwrap();
    let hpa = serde_json::to_value(cirrus_operator::resources::hpa(&b).unwrap()).unwrap();
    assert_eq!(hpa["spec"]["metrics"][0]["pods"]["metric"]["name"], metric);
    let d = serde_json::to_value(cirrus_operator::resources::deployment(&b, "")).unwrap();
    let ports = &d["spec"]["template"]["spec"]["containers"][0]["ports"];
    assert!(
        ports
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "admin"),
        "{ports}"
    );
}

static SEQ: AtomicU32 = AtomicU32::new(0);

fn kubectl(args: &[&str]) -> (bool, String, String) {
    let kc = kubeconfig();
    let mut all = vec!["--kubeconfig", kc.to_str().unwrap()];
    all.extend_from_slice(args);
    run(&tool("kubectl"), &all, &[], CMD)
}

fn can_i(sa: &str, ns: &str, verb: &str, what: &str, sub: Option<&str>) -> bool {
    let mut args = vec!["auth", "can-i", verb, what, "--as", sa, "-n", ns];
    let s;
    if let Some(x) = sub {
        s = format!("--subresource={x}");
        args.push(&s);
    }
    let (_, out, _) = kubectl(&args);
    out.trim() == "yes"
}

/// `can_i` for a kind the API server may not serve (kubectl maps only
/// served kinds): a SubjectAccessReview.
fn may(sa: &str, ns: &str, verb: &str, group: &str, resource: &str) -> bool {
    let review = format!(
        "apiVersion: authorization.k8s.io/v1\nkind: SubjectAccessReview\nspec:\n  user: {sa}\n  resourceAttributes: {{namespace: {ns}, verb: {verb}, group: {group}, resource: {resource}}}\n"
    );
    let f = std::env::temp_dir().join(format!(
        "cirrus-sar-{}-{verb}-{resource}.yaml",
        std::process::id()
    ));
    std::fs::write(&f, review).unwrap();
    let (ok, out, err) = kubectl(&[
        "create",
        "-f",
        f.to_str().unwrap(),
        "-o",
        "jsonpath={.status.allowed}",
    ]);
    let _ = std::fs::remove_file(&f);
    assert!(ok, "SubjectAccessReview: {err}");
    out.trim() == "true"
}

/// A kubeconfig for the test API server that acts as `user`.
fn impersonating(user: &str, dir: &Path) -> PathBuf {
    let mut v: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(kubeconfig()).unwrap()).unwrap();
    v["users"][0]["user"]["as"] = serde_yaml::Value::from(user);
    let p = dir.join("kubeconfig-as-operator");
    std::fs::write(&p, serde_yaml::to_string(&v).unwrap()).unwrap();
    p
}

/// Removes the cluster-wide objects a test applied.
struct Applied(PathBuf);
impl Drop for Applied {
    fn drop(&mut self) {
        let _ = kubectl(&[
            "delete",
            "--ignore-not-found",
            "-f",
            self.0.to_str().unwrap(),
        ]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_charts_service_account_can_do_what_the_operator_does_and_no_more() {
    let c = client().await;
    let release_ns = namespace(&c, "chart").await;
    let watched = namespace(&c, "chart-mq").await;
    let other = namespace(&c, "chart-other").await;
    let release = format!(
        "cirrus{}x{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    );
    let dir = std::env::temp_dir().join(format!("cirrus-chart-{release}"));
    std::fs::create_dir_all(&dir).unwrap();

    // The chart as a user installs it (every namespace), with one replica.
    let rendered = dir.join("cluster.yaml");
    std::fs::write(
        &rendered,
        template(&release, &release_ns, &["--set", "replicaCount=1"]),
    )
    .unwrap();
    let (ok, _, err) = kubectl(&["apply", "-f", rendered.to_str().unwrap()]);
    assert!(ok, "kubectl apply: {err}");
    let _applied = Applied(rendered);
    let sa = format!("system:serviceaccount:{release_ns}:{release}-cirrus-operator");

    // Everything the operator does...
    let yes: &[(&str, &str, Option<&str>)] = &[
        ("list", "mqttbrokers.mqtt.cirrus.dev", None),
        ("watch", "mqttusers.mqtt.cirrus.dev", None),
        ("patch", "mqttbrokers.mqtt.cirrus.dev", Some("status")),
        ("patch", "mqttusers.mqtt.cirrus.dev", Some("status")),
        ("patch", "configmaps", None),
        ("watch", "secrets", None),
        ("create", "secrets", None),
        ("patch", "deployments.apps", None),
        ("delete", "deployments.apps", None),
        ("delete", "services", None),
        ("patch", "horizontalpodautoscalers.autoscaling", None),
        ("watch", "horizontalpodautoscalers.autoscaling", None),
        ("patch", "poddisruptionbudgets.policy", None),
        ("watch", "poddisruptionbudgets.policy", None),
        ("create", "events.events.k8s.io", None),
        ("list", "pods", None),
        ("patch", "pods", None),
    ];
    for (verb, what, sub) in yes {
        assert!(
            can_i(&sa, &watched, verb, what, *sub),
            "cannot {verb} {what} {sub:?}"
        );
    }
    // cert-manager's Certificates (tls.issuerRef), whether or not the
    // cluster has cert-manager.
    for verb in ["get", "create", "patch", "delete"] {
        assert!(
            may(&sa, &watched, verb, "cert-manager.io", "certificates"),
            "cannot {verb} cert-manager certificates"
        );
    }
    assert!(!may(
        &sa,
        &watched,
        "list",
        "cert-manager.io",
        "certificates"
    ));
    assert!(!may(&sa, &watched, "delete", "cert-manager.io", "issuers"));
    for verb in ["get", "create", "update"] {
        assert!(can_i(
            &sa,
            &release_ns,
            verb,
            "leases.coordination.k8s.io",
            None
        ));
    }
    // ...and nothing more.
    let no: &[(&str, &str, Option<&str>)] = &[
        ("*", "*", None),
        ("create", "pods", None),
        ("delete", "pods", None),
        ("delete", "secrets", None),
        ("update", "mqttbrokers.mqtt.cirrus.dev", None),
        ("delete", "mqttbrokers.mqtt.cirrus.dev", None),
        ("patch", "mqttbrokers.mqtt.cirrus.dev", None),
        ("delete", "configmaps", None),
        ("create", "clusterroles.rbac.authorization.k8s.io", None),
        ("create", "rolebindings.rbac.authorization.k8s.io", None),
        ("delete", "namespaces", None),
        ("create", "serviceaccounts/token", None),
    ];
    for (verb, what, sub) in no {
        assert!(
            !can_i(&sa, &watched, verb, what, *sub),
            "can {verb} {what} {sub:?}"
        );
    }
    assert!(!can_i(
        &sa,
        &watched,
        "get",
        "leases.coordination.k8s.io",
        None
    ));

    // Scoped to one namespace, it reaches no Secret elsewhere.
    let scoped = dir.join("scoped.yaml");
    let scoped_release = format!("{release}s");
    std::fs::write(
        &scoped,
        template(
            &scoped_release,
            &release_ns,
            &["--set", &format!("watchNamespace={watched}")],
        ),
    )
    .unwrap();
    let (ok, _, err) = kubectl(&["apply", "-f", scoped.to_str().unwrap()]);
    assert!(ok, "kubectl apply: {err}");
    let _scoped = Applied(scoped);
    let scoped_sa = format!("system:serviceaccount:{release_ns}:{scoped_release}-cirrus-operator");
    assert!(can_i(&scoped_sa, &watched, "get", "secrets", None));
    assert!(!can_i(&scoped_sa, &other, "get", "secrets", None));
    assert!(!can_i(&scoped_sa, "kube-system", "list", "secrets", None));

    // With the custom metrics API: its own APIService's CA bundle,
    // delegated authentication and authorization, the broker pods and its
    // serving certificate's Secret; nothing more. (The APIService itself is
    // not applied: with no pod behind it, discovery would report the group
    // unavailable to every other test on this API server.)
    let metrics_release = format!("{release}m");
    let rendered = template(
        &metrics_release,
        &release_ns,
        &[
            "--set",
            &format!("watchNamespace={watched}"),
            "--set",
            "customMetricsApi.enabled=true",
        ],
    );
    let without_apiservice: Vec<&str> = rendered
        .split("\n---")
        .filter(|d| !d.contains("kind: APIService"))
        .collect();
    assert!(rendered.contains("kind: APIService"));
    let metrics = dir.join("metrics.yaml");
    std::fs::write(&metrics, without_apiservice.join("\n---")).unwrap();
    let (ok, _, err) = kubectl(&["apply", "-f", metrics.to_str().unwrap()]);
    assert!(ok, "kubectl apply: {err}");
    let _metrics = Applied(metrics);
    let msa = format!("system:serviceaccount:{release_ns}:{metrics_release}-cirrus-operator");
    let ours = "apiservices.apiregistration.k8s.io/v1beta1.custom.metrics.k8s.io";
    assert!(can_i(&msa, &watched, "patch", ours, None));
    assert!(can_i(&msa, &watched, "get", ours, None));
    assert!(!can_i(&msa, &watched, "delete", ours, None));
    assert!(!can_i(
        &msa,
        &watched,
        "patch",
        "apiservices.apiregistration.k8s.io/v1beta1.metrics.k8s.io",
        None
    ));
    assert!(!can_i(
        &msa,
        &watched,
        "create",
        "apiservices.apiregistration.k8s.io",
        None
    ));
    assert!(can_i(
        &msa,
        &watched,
        "create",
        "subjectaccessreviews.authorization.k8s.io",
        None
    ));
    assert!(can_i(
        &msa,
        "kube-system",
        "get",
        "configmaps/extension-apiserver-authentication",
        None
    ));
    assert!(!can_i(&msa, "kube-system", "get", "secrets", None));
    assert!(can_i(&msa, &watched, "list", "pods", None));
    assert!(!can_i(&msa, &other, "list", "pods", None));
    assert!(!can_i(&msa, &watched, "create", "pods", None));
    assert!(can_i(&msa, &release_ns, "create", "secrets", None));
    assert!(!can_i(&msa, &release_ns, "delete", "secrets", None));

    // The operator itself, as that service account: every kind of child,
    // status, events, the Lease, and a deletion.
    let kc = impersonating(&sa, &dir);
    let log = dir.join("operator.log");
    let port = cirrus_e2e::process::free_port();
    let child = std::process::Command::new(operator_bin())
        .args(["--leader-elect", "--lease-namespace", &release_ns])
        .args(["--lease-name", &release, "--resync-secs", "2"])
        .args(["--admin", &format!("127.0.0.1:{port}")])
        .env("KUBECONFIG", &kc)
        .env("POD_NAME", "operator-0")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let _op = cirrus_e2e::process::KillOnDrop(child);
    create::<MqttBroker>(&c, &watched, "apiVersion: mqtt.cirrus.dev/v1alpha1\nkind: MqttBroker\nmetadata: {name: rbac}\nspec:\n  autoscaling: {minReplicas: 1, maxReplicas: 3}\n  listeners: {mqtt: 1883, mqtts: 8883}\n  tls: {enabled: true}\n  redis: {managed: true}\n").await;
    create::<MqttUser>(&c, &watched, "apiVersion: mqtt.cirrus.dev/v1alpha1\nkind: MqttUser\nmetadata: {name: alice}\nspec: {brokerRef: rbac, acl: [{topic: 'a/#', access: all}]}\n").await;
    user_ready(&c, &watched, "alice", ("True", "Configured")).await;
    auth_file_with(&c, &watched, "rbac", &["alice"]).await;
    for name in ["rbac-tls", "cirrus-ca", "alice-mqtt-credentials"] {
        eventually(WAIT, name, || async {
            get::<Secret>(&c, &watched, name).await
        })
        .await;
    }
    eventually(WAIT, "HPA", || async {
        get::<HorizontalPodAutoscaler>(&c, &watched, "rbac").await
    })
    .await;
    eventually(WAIT, "PDB", || async {
        get::<PodDisruptionBudget>(&c, &watched, "rbac").await
    })
    .await;
    eventually(WAIT, "managed Redis", || async {
        get::<Deployment>(&c, &watched, "rbac-redis").await
    })
    .await;
    broker_ready(&c, &watched, "rbac", ("False", "Unavailable")).await;
    // Deletions: autoscaling and the managed Redis turned off.
    Api::<MqttBroker>::namespaced(c.clone(), &watched)
        .patch(
            "rbac",
            &PatchParams::default(),
            &Patch::Merge(
                serde_json::json!({"spec": {"autoscaling": null, "redis": {"managed": false}}}),
            ),
        )
        .await
        .unwrap();
    eventually(WAIT, "HPA and Redis gone", || async {
        let h = get::<HorizontalPodAutoscaler>(&c, &watched, "rbac").await;
        let d = get::<Deployment>(&c, &watched, "rbac-redis").await;
        let s = get::<Service>(&c, &watched, "rbac-redis").await;
        (h.is_none() && d.is_none() && s.is_none()).then_some(())
    })
    .await;
    // Events were recorded (the chart allows events.k8s.io).
    let (ok, out, err) = kubectl(&["get", "events.events.k8s.io", "-n", &watched, "-o", "name"]);
    assert!(ok && !out.trim().is_empty(), "no events: {out}{err}");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        !text.to_lowercase().contains("forbidden"),
        "the operator was refused something:\n{text}"
    );
}

/// The optional `cirrus-broker` chart: its values are an `MqttBroker` spec
/// and users; what it renders must be what the operator's types and the
/// API server's CRD schema accept, and what the operator reconciles.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_chart_declares_resources_the_operator_reconciles() {
    const BROKER_CHART: &str = "charts/cirrus-broker";
    const BROKER_ALL_ON: &str = "charts/cirrus-broker/ci/all-on-values.yaml";
    // The values schema is the CRDs' own (generated by crdgen).
    lint(
        BROKER_CHART,
        BROKER_ALL_ON,
        &[
            "broker.replicas=-1",
            "broker.bogus=1",
            "users[0].acl[0].access=everything",
        ],
    );
    let c = client().await;
    let ns = namespace(&c, "chart-broker").await;
    let render = |extra: &[&str]| {
        let mut args = vec!["template", "fleet", BROKER_CHART, "--namespace", &ns];
        args.extend_from_slice(extra);
        let (ok, out, err) = helm_cmd(&args);
        assert!(ok, "helm template: {err}");
        out
    };
    // Every option on: the operator's types read it, the API server's
    // schema takes it (server-side dry run).
    let all_on = render(&["--values", BROKER_ALL_ON]);
    let d = docs(&all_on);
    let b: MqttBroker = serde_yaml::from_value(of_kind(&d, "MqttBroker")[0].clone()).unwrap();
    assert_eq!(b.metadata.name.as_deref(), Some("fleet"));
    assert_eq!(b.spec.autoscaling.as_ref().unwrap().max_replicas, 30);
    assert_eq!(b.spec.limits.max_queued_messages, Some(5000));
    let users: Vec<MqttUser> = of_kind(&d, "MqttUser")
        .into_iter()
        .map(|u| serde_yaml::from_value(u.clone()).unwrap())
        .collect();
    assert_eq!(users.len(), 3);
    assert!(users.iter().all(|u| u.spec.broker_ref == "fleet"));
    assert_eq!(users[1].spec.username.as_deref(), Some("dash"));
    let dir = std::env::temp_dir().join(format!("cirrus-broker-chart-{ns}"));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("all-on.yaml");
    std::fs::write(&f, &all_on).unwrap();
    let (ok, out, err) = kubectl(&["apply", "--dry-run=server", "-f", f.to_str().unwrap()]);
    assert!(ok, "the API server refused the rendered chart: {out}{err}");

    // A Redis of one's own given on the command line replaces the default
    // managed one (the two would be InvalidSpec together).
    for set in [
        &["--set", "broker.redis.url=redis://redis.example:6379"][..],
        &[
            "--set",
            "broker.redis.urlSecretRef.name=redis",
            "--set",
            "broker.redis.urlSecretRef.key=url",
        ][..],
    ] {
        let own = docs(&render(set));
        let b: MqttBroker = serde_yaml::from_value(of_kind(&own, "MqttBroker")[0].clone()).unwrap();
        assert!(!b.spec.redis.managed, "{set:?}: still managed");
    }
    let b: MqttBroker =
        serde_yaml::from_value(of_kind(&docs(&render(&[])), "MqttBroker")[0].clone()).unwrap();
    assert!(
        b.spec.redis.managed,
        "the chart's default is the managed Redis"
    );

    // Defaults plus a user, applied for real and reconciled.
    let f = dir.join("default.yaml");
    std::fs::write(
        &f,
        render(&[
            "--set",
            "users[0].name=alice",
            "--set",
            "users[0].acl[0].topic=a/#",
            "--set",
            "users[0].acl[0].access=all",
        ]),
    )
    .unwrap();
    let (ok, out, err) = kubectl(&["apply", "-f", f.to_str().unwrap()]);
    assert!(ok, "kubectl apply: {out}{err}");
    let _op = Operator::start(&c, &ns);
    user_ready(&c, &ns, "alice", ("True", "Configured")).await;
    auth_file_with(&c, &ns, "fleet", &["alice"]).await;
    eventually(WAIT, "the managed Redis and the TLS Secret", || async {
        let r = get::<Deployment>(&c, &ns, "fleet-redis").await;
        let t = get::<Secret>(&c, &ns, "fleet-tls").await;
        (r.is_some() && t.is_some()).then_some(())
    })
    .await;
}

/// The CRD upgrade path docs/operator.md gives, with `helm upgrade` on the
/// real API server: Helm installs `crds/` once and never upgrades it, so a
/// chart whose CRD changed (here: one printer column more on MqttUser)
/// leaves the old CRD in place through `helm upgrade` alone; applying the
/// chart's CRDs first (`helm show crds | kubectl apply --server-side`)
/// brings the change, and existing resources stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_crd_reaches_the_api_server_by_the_documented_upgrade_path() {
    let c = client().await;
    let ns = namespace(&c, "op-crd-upgrade").await;
    let dir = std::env::temp_dir().join(format!("cirrus-crd-upgrade-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    // The next chart version: the same chart with a changed MqttUser CRD.
    let new_chart = dir.join("cirrus-operator");
    let (ok, _, err) = run(
        Path::new("cp"),
        &[
            "-r",
            workspace_root().join(CHART).to_str().unwrap(),
            new_chart.to_str().unwrap(),
        ],
        &[],
        CMD,
    );
    assert!(ok, "{err}");
    let crd_file = new_chart.join("crds/mqttusers.mqtt.cirrus.dev.yaml");
    let mut crd: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(&crd_file).unwrap()).unwrap();
    let columns = crd["spec"]["versions"][0]["additionalPrinterColumns"]
        .as_sequence_mut()
        .unwrap();
    columns.push(
        serde_yaml::from_str("{name: Upgraded, type: string, jsonPath: .metadata.uid}").unwrap(),
    );
    std::fs::write(&crd_file, serde_yaml::to_string(&crd).unwrap()).unwrap();
    let kc = kubeconfig();
    let kc = kc.to_str().unwrap();
    let release = format!("crd-up-{}", std::process::id());
    let helm_in = |verb: &str, chart: &Path| {
        helm_cmd(&[
            verb,
            &release,
            chart.to_str().unwrap(),
            "--namespace",
            &ns,
            "--kubeconfig",
            kc,
            "--set",
            &format!("watchNamespace={ns}"),
        ])
    };
    let columns_now = || {
        let (ok, out, err) = kubectl(&[
            "get",
            "crd",
            "mqttusers.mqtt.cirrus.dev",
            "-o",
            "jsonpath={.spec.versions[0].additionalPrinterColumns[*].name}",
        ]);
        assert!(ok, "{err}");
        out
    };
    let (ok, _, err) = helm_in("install", &workspace_root().join(CHART));
    assert!(ok, "helm install: {err}");
    create::<MqttUser>(
        &c,
        &ns,
        "apiVersion: mqtt.cirrus.dev/v1alpha1\nkind: MqttUser\nmetadata: {name: kept}\nspec: {brokerRef: b}\n",
    )
    .await;

    // `helm upgrade` alone: the CRD is as it was.
    let (ok, _, err) = helm_in("upgrade", &new_chart);
    assert!(ok, "helm upgrade: {err}");
    assert!(
        !columns_now().contains("Upgraded"),
        "Helm upgraded crds/ by itself"
    );

    // The documented path: the chart's CRDs first, then `helm upgrade`.
    let (ok, crds, err) = helm_cmd(&["show", "crds", new_chart.to_str().unwrap()]);
    assert!(ok, "helm show crds: {err}");
    let crds_file = dir.join("crds.yaml");
    std::fs::write(&crds_file, crds).unwrap();
    let apply = |file: &str| {
        let (ok, _, err) = kubectl(&["apply", "--server-side", "--force-conflicts", "-f", file]);
        assert!(ok, "kubectl apply: {err}");
    };
    apply(crds_file.to_str().unwrap());
    let (ok, _, err) = helm_in("upgrade", &new_chart);
    assert!(ok, "helm upgrade: {err}");
    assert!(columns_now().contains("Upgraded"), "{}", columns_now());
    assert!(get::<MqttUser>(&c, &ns, "kept").await.is_some());

    // Back to this tree's CRDs (the API server is shared by the tests).
    apply(workspace_root().join("crds").to_str().unwrap());
    assert!(!columns_now().contains("Upgraded"));
    let _ = helm_cmd(&[
        "uninstall",
        &release,
        "--namespace",
        &ns,
        "--kubeconfig",
        kc,
    ]);
    let _ = std::fs::remove_dir_all(&dir);
}
