//! The operator against a real kube-apiserver (with etcd and the garbage
//! collector): each test runs the controllers in-process, scoped to a fresh
//! namespace, and checks the objects they write.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use argon2::{Argon2, PasswordHash, PasswordVerifier};
use cirrus_config::auth::{Access, AuthFile, Permission};
use cirrus_e2e::k8s::{client, eventually, namespace};
use cirrus_operator_api::{MqttBroker, MqttUser};
use k8s_openapi::api::apps::v1::{Deployment, DeploymentStatus};
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::ByteString;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::Client;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(30);
const RESYNC: Duration = Duration::from_secs(1);

/// The controllers, running until dropped.
struct Operator(CancellationToken, Option<tokio::task::JoinHandle<()>>);

impl Operator {
    fn start(client: &Client, ns: &str) -> Operator {
        Operator::start_with_resync(client, ns, RESYNC)
    }

    fn start_with_resync(client: &Client, ns: &str, resync: Duration) -> Operator {
        let token = CancellationToken::new();
        let ctx = cirrus_operator::Context::new(
            client.clone(),
            resync,
            Some(ns.to_string()),
            Default::default(),
        );
        let h = tokio::spawn(cirrus_operator::run(ctx, token.clone()));
        Operator(token, Some(h))
    }

    async fn stop(mut self) {
        self.0.cancel();
        if let Some(h) = self.1.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), h).await;
        }
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

async fn create<K>(client: &Client, ns: &str, yaml: &str) -> K
where
    K: kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug,
{
    let obj: K = serde_yaml::from_str(yaml).unwrap();
    Api::<K>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &obj)
        .await
        .unwrap()
}

async fn get<K>(client: &Client, ns: &str, name: &str) -> Option<K>
where
    K: kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    Api::<K>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await
        .unwrap()
}

fn ready(
    conditions: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
) -> Option<(String, String)> {
    conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| (c.status.clone(), c.reason.clone()))
}

/// Play the Deployment controller (none runs here): `n` pods on the
/// Deployment's current template, all available.
async fn deployment_available(c: &Client, ns: &str, name: &str, n: i32) {
    let api = Api::<Deployment>::namespaced(c.clone(), ns);
    let d = api.get(name).await.unwrap();
    let status = DeploymentStatus {
        observed_generation: d.metadata.generation,
        replicas: Some(n),
        updated_replicas: Some(n),
        ready_replicas: Some(n),
        available_replicas: Some(n),
        ..Default::default()
    };
    api.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({ "status": status })),
    )
    .await
    .unwrap();
}

async fn broker_ready(client: &Client, ns: &str, name: &str, want: (&str, &str)) -> MqttBroker {
    eventually(WAIT, &format!("broker {name} Ready={want:?}"), || async {
        let b: MqttBroker = get(client, ns, name).await?;
        let r = ready(&b.status.as_ref()?.conditions)?;
        (r.0 == want.0 && r.1 == want.1).then_some(b)
    })
    .await
}

async fn user_ready(client: &Client, ns: &str, name: &str, want: (&str, &str)) -> MqttUser {
    eventually(WAIT, &format!("user {name} Ready={want:?}"), || async {
        let u: MqttUser = get(client, ns, name).await?;
        let r = ready(&u.status.as_ref()?.conditions)?;
        (r.0 == want.0 && r.1 == want.1).then_some(u)
    })
    .await
}

/// The broker's auth file, once its controller has written the Secret
/// (the user controller may be ready first).
async fn auth_file(client: &Client, ns: &str, broker: &str) -> AuthFile {
    let name = format!("{broker}-auth");
    let s: Secret = eventually(WAIT, &format!("Secret {name}"), || async {
        get::<Secret>(client, ns, &name).await
    })
    .await;
    let text = String::from_utf8(s.data.unwrap()["auth.yaml"].0.clone()).unwrap();
    AuthFile::from_yaml(&text).unwrap()
}

/// The broker's auth file once it holds exactly these usernames: the user
/// turns Ready when its password is made, the auth file follows at the
/// broker's next reconcile.
async fn auth_file_with(client: &Client, ns: &str, broker: &str, usernames: &[&str]) -> AuthFile {
    eventually(
        WAIT,
        &format!("{broker}'s auth file holds {usernames:?}"),
        || async {
            let f = auth_file(client, ns, broker).await;
            let mut names: Vec<&str> = f.users.iter().map(|u| u.username.as_str()).collect();
            names.sort_unstable();
            (names == usernames).then_some(())?;
            Some(f)
        },
    )
    .await
}

async fn secret_value(client: &Client, ns: &str, name: &str, key: &str) -> String {
    let s: Secret = get(client, ns, name).await.expect("secret");
    String::from_utf8(s.data.unwrap()[key].0.clone()).unwrap()
}

/// The files of `broker`'s auth volume as the pods see them: the auth
/// file, then each user file it names (name and content). `None` while
/// one of them is missing.
async fn auth_volume(c: &Client, ns: &str, broker: &str) -> Option<Vec<(String, Vec<u8>)>> {
    let data = |s: Secret, key: &str| s.data.and_then(|mut d| d.remove(key)).map(|v| v.0);
    let main = data(
        get::<Secret>(c, ns, &format!("{broker}-auth")).await?,
        "auth.yaml",
    )?;
    let f = AuthFile::from_yaml(&String::from_utf8_lossy(&main)).ok()?;
    let mut out = vec![("auth.yaml".to_string(), main)];
    for name in f.user_files {
        let n = name.strip_prefix("users-")?.strip_suffix(".yaml")?;
        let s = get::<Secret>(c, ns, &format!("{broker}-auth-{n}")).await?;
        out.push((name, data(s, "users.yaml")?));
    }
    Some(out)
}

/// A real broker on loopback with the auth files the operator wrote for
/// `broker` (in a temporary directory instead of the pods' mount), and the
/// config from its ConfigMap when given.
async fn broker_with_auth_of(
    c: &Client,
    ns: &str,
    broker: &str,
    config_yaml: Option<&str>,
) -> (cirrus_e2e::BrokerProcess, std::path::PathBuf) {
    let files = auth_volume(c, ns, broker).await.expect("the auth files");
    let dir =
        std::env::temp_dir().join(format!("cirrus-auth-{ns}-{broker}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (name, bytes) in &files {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
    let path = dir.join("auth.yaml");
    let args = ["--auth-file", path.to_str().unwrap()];
    let b = match config_yaml {
        Some(yaml) => cirrus_e2e::BrokerProcess::start_with_config(yaml, &args),
        None => cirrus_e2e::BrokerProcess::start(&args),
    };
    (b, dir)
}

/// MQTT 5 login options with a user name and password.
fn login(client_id: &str, username: &str, password: &str) -> cirrus_e2e::Opts {
    let mut o = cirrus_e2e::Opts::v5(client_id);
    o.username = Some(username.into());
    o.password = Some(password.as_bytes().to_vec());
    o
}

fn verifies(hash: &str, password: &str) -> bool {
    Argon2::default()
        .verify_password(password.as_bytes(), &PasswordHash::new(hash).unwrap())
        .is_ok()
}

const BROKER: &str = r#"
apiVersion: mqtt.cirrus.dev/v1alpha1
kind: MqttBroker
metadata: {name: main}
spec:
  autoscaling: {minReplicas: 2, maxReplicas: 6, targetCpuUtilization: 60, targetConnectionsPerPod: 5000}
  listeners: {mqtt: 1883, mqtts: 8883}
  tls: {enabled: true}
  service: {type: LoadBalancer, annotations: {example.com/lb: internal}}
  limits: {maxPacketSize: 65536, maxInflight: 50}
  maxUnavailable: 1
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_children_status_and_updates() {
    let c = client().await;
    let ns = namespace(&c, "op-children").await;
    let _op = Operator::start(&c, &ns);
    create::<MqttBroker>(&c, &ns, BROKER).await;

    // Every child, with its content.
    let cm: ConfigMap = eventually(WAIT, "ConfigMap", || get(&c, &ns, "main-config")).await;
    let cfg = cirrus_config::Config::from_yaml(&cm.data.unwrap()["config.yaml"]).unwrap();
    cfg.validate().unwrap();
    assert_eq!(
        (cfg.limits.max_packet_size, cfg.limits.max_inflight),
        (65536, 50)
    );
    let _: Deployment = eventually(WAIT, "Deployment", || get(&c, &ns, "main")).await;
    // The HPA owns the replica count: one it set survives the operator's resyncs.
    let deployments: Api<Deployment> = Api::namespaced(c.clone(), &ns);
    deployments
        .patch(
            "main",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"replicas": 4}})),
        )
        .await
        .unwrap();
    tokio::time::sleep(RESYNC * 3).await;
    let d: Deployment = get(&c, &ns, "main").await.unwrap();
    assert_eq!(
        d.spec.replicas,
        Some(4),
        "the operator must not fight the HPA"
    );
    let pod = d.spec.template.spec.clone().unwrap();
    let sc = pod.containers[0].security_context.clone().unwrap();
    assert_eq!(
        (sc.run_as_non_root, sc.read_only_root_filesystem),
        (Some(true), Some(true))
    );
    assert!(
        pod.containers[0].readiness_probe.is_some() && pod.containers[0].liveness_probe.is_some()
    );
    assert!(pod.termination_grace_period_seconds.unwrap() >= 20);
    let owner = &d.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.controller),
        ("MqttBroker", Some(true))
    );
    let svc: Service = eventually(WAIT, "Service", || get(&c, &ns, "main")).await;
    let spec = svc.spec.unwrap();
    assert_eq!(spec.type_.as_deref(), Some("LoadBalancer"));
    assert_eq!(
        spec.ports
            .unwrap()
            .iter()
            .map(|p| p.port)
            .collect::<Vec<_>>(),
        vec![1883, 8883]
    );
    assert_eq!(
        svc.metadata.annotations.unwrap()["example.com/lb"],
        "internal"
    );
    let hpa: HorizontalPodAutoscaler = eventually(WAIT, "HPA", || get(&c, &ns, "main")).await;
    assert_eq!((hpa.spec.min_replicas, hpa.spec.max_replicas), (Some(2), 6));
    assert_eq!(hpa.spec.metrics.unwrap().len(), 2);
    let pdb: PodDisruptionBudget = eventually(WAIT, "PDB", || get(&c, &ns, "main")).await;
    assert_eq!(
        pdb.spec.unwrap().max_unavailable,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(1))
    );
    assert!(auth_file(&c, &ns, "main").await.users.is_empty());

    // No pod is running: honestly not Ready.
    let b = broker_ready(&c, &ns, "main", ("False", "Unavailable")).await;
    let st = b.status.unwrap();
    assert_eq!(st.observed_generation, b.metadata.generation);
    assert_eq!(
        st.endpoint.as_deref(),
        Some(format!("main.{ns}.svc:1883").as_str())
    );
    assert_eq!(st.endpoints["mqtts"], format!("main.{ns}.svc:8883"));

    // Pods become available (no kubelet here: the test plays the Deployment controller).
    deployment_available(&c, &ns, "main", 4).await;
    let b = broker_ready(&c, &ns, "main", ("True", "Available")).await;
    assert_eq!(b.status.unwrap().ready_replicas, 4);

    // A config change rolls the pods (new template hash); a new user does not.
    let hash = |d: &Deployment| {
        d.spec
            .template
            .metadata
            .clone()
            .unwrap()
            .annotations
            .unwrap()["mqtt.cirrus.dev/config-hash"]
            .clone()
    };
    let before = hash(&d);
    create::<MqttUser>(&c, &ns, "apiVersion: mqtt.cirrus.dev/v1alpha1\nkind: MqttUser\nmetadata: {name: u1}\nspec: {brokerRef: main}\n").await;
    eventually(WAIT, "user in auth file", || async {
        (auth_file(&c, &ns, "main").await.users.len() == 1).then_some(())
    })
    .await;
    let d: Deployment = get(&c, &ns, "main").await.unwrap();
    assert_eq!(hash(&d), before, "an auth change does not roll the pods");
    let brokers: Api<MqttBroker> = Api::namespaced(c.clone(), &ns);
    brokers
        .patch(
            "main",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"limits": {"maxInflight": 10}}})),
        )
        .await
        .unwrap();
    eventually(WAIT, "ConfigMap update", || async {
        let cm: ConfigMap = get(&c, &ns, "main-config").await?;
        cm.data?["config.yaml"]
            .contains("max_inflight: 10")
            .then_some(())
    })
    .await;
    let d: Deployment = eventually(WAIT, "rolled template", || async {
        let d: Deployment = get(&c, &ns, "main").await?;
        (hash(&d) != before).then_some(d)
    })
    .await;
    assert_ne!(hash(&d), before);

    // Autoscaling off: fixed replicas, and the HPA goes.
    brokers
        .patch(
            "main",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"autoscaling": null, "replicas": 3}})),
        )
        .await
        .unwrap();
    eventually(WAIT, "HPA deleted and replicas set", || async {
        let d: Deployment = get(&c, &ns, "main").await?;
        let hpa: Option<HorizontalPodAutoscaler> = get(&c, &ns, "main").await;
        (hpa.is_none() && d.spec.replicas == Some(3)).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_passwords_and_auth_entries() {
    let c = client().await;
    let ns = namespace(&c, "op-users").await;
    let op = Operator::start(&c, &ns);
    create::<MqttBroker>(
        &c,
        &ns,
        "apiVersion: mqtt.cirrus.dev/v1alpha1\nkind: MqttBroker\nmetadata: {name: b}\nspec: {}\n",
    )
    .await;
    create::<MqttUser>(
        &c,
        &ns,
        r##"
apiVersion: mqtt.cirrus.dev/v1alpha1
kind: MqttUser
metadata: {name: sensor}
spec:
  brokerRef: b
  username: sensor-1
  acl:
    - {topic: "sensors/%u/#", access: publish}
    - {topic: "#", access: all, permission: deny}
"##,
    )
    .await;
    let u = user_ready(&c, &ns, "sensor", ("True", "Configured")).await;
    let secret_name = u.status.unwrap().secret_name.unwrap();
    assert_eq!(secret_name, "sensor-mqtt-credentials");
    let password = secret_value(&c, &ns, &secret_name, "password").await;
    assert_eq!(
        secret_value(&c, &ns, &secret_name, "username").await,
        "sensor-1"
    );
    assert!(password.len() >= 24);
    let entry = eventually(WAIT, "auth entry", || async {
        auth_file(&c, &ns, "b")
            .await
            .users
            .into_iter()
            .find(|u| u.username == "sensor-1")
    })
    .await;
    assert!(entry.password_hash.starts_with("$argon2id$"));
    assert!(verifies(&entry.password_hash, &password));
    assert_eq!(entry.acl.len(), 2);
    assert_eq!(
        (entry.acl[0].access, entry.acl[0].permission),
        (Access::Publish, Permission::Allow)
    );
    assert_eq!(
        (entry.acl[1].access, entry.acl[1].permission),
        (Access::All, Permission::Deny)
    );
    // The password and hash never appear in the ConfigMap.
    let cm: ConfigMap = get(&c, &ns, "b-config").await.unwrap();
    let cm_text = serde_json::to_string(&cm).unwrap();
    assert!(!cm_text.contains(&password) && !cm_text.contains(&entry.password_hash));

    // A restarted operator keeps the password and the hash.
    op.stop().await;
    let op = Operator::start(&c, &ns);
    tokio::time::sleep(RESYNC * 3).await;
    assert_eq!(
        secret_value(&c, &ns, &secret_name, "password").await,
        password
    );
    let again = auth_file(&c, &ns, "b").await;
    assert_eq!(again.users[0].password_hash, entry.password_hash);

    // A user with its own Secret; changing it changes the hash.
    let own = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some("own-pw".into()),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(
            "pw".to_string(),
            ByteString(b"first-password".to_vec()),
        )])),
        ..Default::default()
    };
    let secrets: Api<Secret> = Api::namespaced(c.clone(), &ns);
    secrets.create(&PostParams::default(), &own).await.unwrap();
    create::<MqttUser>(
        &c,
        &ns,
        "apiVersion: mqtt.cirrus.dev/v1alpha1\nkind: MqttUser\nmetadata: {name: own}\nspec: {brokerRef: b, passwordSecretRef: {name: own-pw, key: pw}}\n",
    )
    .await;
    let u = user_ready(&c, &ns, "own", ("True", "Configured")).await;
    assert_eq!(u.status.unwrap().secret_name.as_deref(), Some("own-pw"));
    eventually(WAIT, "own user's hash", || async {
        let f = auth_file(&c, &ns, "b").await;
        f.users
            .iter()
            .find(|u| u.username == "own")
            .filter(|u| verifies(&u.password_hash, "first-password"))
            .map(|_| ())
    })
    .await;
    secrets
        .patch(
            "own-pw",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"stringData": {"pw": "second-password"}})),
        )
        .await
        .unwrap();
    eventually(WAIT, "hash of the changed password", || async {
        let f = auth_file(&c, &ns, "b").await;
        f.users
            .iter()
            .find(|u| u.username == "own")
            .filter(|u| verifies(&u.password_hash, "second-password"))
            .map(|_| ())
    })
    .await;

    // Deleting a user removes its entry.
    Api::<MqttUser>::namespaced(c.clone(), &ns)
        .delete("sensor", &DeleteParams::default())
        .await
        .unwrap();
    eventually(WAIT, "entry removed", || async {
        let f = auth_file(&c, &ns, "b").await;
        (f.users.iter().all(|u| u.username != "sensor-1")).then_some(())
    })
    .await;
    op.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_reconcile_writes_nothing() {
    let c = client().await;
    let ns = namespace(&c, "op-idem").await;
    let _op = Operator::start(&c, &ns);
    create::<MqttBroker>(&c, &ns, BROKER).await;
    create::<MqttUser>(&c, &ns, "apiVersion: mqtt.cirrus.dev/v1alpha1\nkind: MqttUser\nmetadata: {name: u}\nspec: {brokerRef: main, acl: [{topic: 'a/#', access: subscribe}]}\n").await;
    user_ready(&c, &ns, "u", ("True", "Configured")).await;
    broker_ready(&c, &ns, "main", ("False", "Unavailable")).await;
    eventually(WAIT, "auth entry", || async {
        (!auth_file(&c, &ns, "main").await.users.is_empty()).then_some(())
    })
    .await;
    async fn versions(c: &Client, ns: &str) -> Vec<String> {
        let rv = |m: &kube::api::ObjectMeta| m.resource_version.clone().unwrap_or_default();
        vec![
            rv(&get::<MqttBroker>(c, ns, "main").await.unwrap().metadata),
            rv(&get::<MqttUser>(c, ns, "u").await.unwrap().metadata),
            rv(&get::<ConfigMap>(c, ns, "main-config")
                .await
                .unwrap()
                .metadata),
            rv(&get::<Secret>(c, ns, "main-auth").await.unwrap().metadata),
            rv(&get::<Secret>(c, ns, "u-mqtt-credentials")
                .await
                .unwrap()
                .metadata),
            rv(&get::<Deployment>(c, ns, "main").await.unwrap().metadata),
            rv(&get::<Service>(c, ns, "main").await.unwrap().metadata),
            rv(&get::<PodDisruptionBudget>(c, ns, "main")
                .await
                .unwrap()
                .metadata),
            rv(&get::<HorizontalPodAutoscaler>(c, ns, "main")
                .await
                .unwrap()
                .metadata),
        ]
    }
    // Let the first reconciles settle, then several resyncs must change nothing.
    tokio::time::sleep(RESYNC * 3).await;
    let first = versions(&c, &ns).await;
    tokio::time::sleep(RESYNC * 5).await;
    assert_eq!(
        versions(&c, &ns).await,
        first,
        "resourceVersions moved without a change"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_specs_get_conditions_not_crashes() {
    let c = client().await;
    let ns = namespace(&c, "op-bad").await;
    let _op = Operator::start(&c, &ns);
    create::<MqttBroker>(&c, &ns, "apiVersion: mqtt.cirrus.dev/v1alpha1\nkind: MqttBroker\nmetadata: {name: inverted}\nspec: {autoscaling: {minReplicas: 5, maxReplicas: 2}}\n").await;
    broker_ready(&c, &ns, "inverted", ("False", "InvalidSpec")).await;
    assert!(
        get::<Deployment>(&c, &ns, "inverted").await.is_none(),
        "nothing is deployed from an invalid spec"
    );
    // A TLS port without TLS is not advertised as if something listened;
    // a broker with every listener off is refused too.
    for (name, spec) in [
        ("notls", "{listeners: {mqtt: 1883, mqtts: 8883}}"),
        ("nowss", "{listeners: {wss: 8884}}"),
        ("noca", "{tls: {enabled: true, certAsUsername: true}}"),
        (
            "badsan",
            "{tls: {enabled: true, extraSans: ['not a name']}}",
        ),
        (
            "ownvolume",
            "{podTemplate: {volumes: [{name: auth, emptyDir: {}}]}}",
        ),
        ("silent", "{listeners: {mqtt: 0}}"),
        (
            "twocerts",
            "{tls: {enabled: true, secretName: mine, issuerRef: {name: acme}}}",
        ),
        ("noissuertls", "{tls: {issuerRef: {name: acme}}}"),
    ] {
        create::<MqttBroker>(&c, &ns, &format!("apiVersion: mqtt.cirrus.dev/v1alpha1\nkind: MqttBroker\nmetadata: {{name: {name}}}\nspec: {spec}\n")).await;
        let b = broker_ready(&c, &ns, name, ("False", "InvalidSpec")).await;
        assert!(b.status.unwrap().endpoints.is_empty(), "{name}");
        assert!(get::<Deployment>(&c, &ns, name).await.is_none(), "{name}");
    }

    create::<MqttBroker>(
        &c,
        &ns,
        "apiVersion: mqtt.cirrus.dev/v1alpha1\nkind: MqttBroker\nmetadata: {name: ok}\nspec: {}\n",
    )
    .await;
    create::<MqttUser>(&c, &ns, "apiVersion: mqtt.cirrus.dev/v1alpha1\nkind: MqttUser\nmetadata: {name: badacl}\nspec: {brokerRef: ok, acl: [{topic: 'a/#/b', access: publish}]}\n").await;
    user_ready(&c, &ns, "badacl", ("False", "InvalidAcl")).await;
    create::<MqttUser>(&c, &ns, "apiVersion: mqtt.cirrus.dev/v1alpha1\nkind: MqttUser\nmetadata: {name: orphan}\nspec: {brokerRef: nowhere}\n").await;
    user_ready(&c, &ns, "orphan", ("False", "BrokerNotFound")).await;
    create::<MqttUser>(&c, &ns, "apiVersion: mqtt.cirrus.dev/v1alpha1\nkind: MqttUser\nmetadata: {name: nosecret}\nspec: {brokerRef: ok, passwordSecretRef: {name: missing, key: pw}}\n").await;
    user_ready(&c, &ns, "nosecret", ("False", "SecretNotFound")).await;
    create::<MqttUser>(&c, &ns, "apiVersion: mqtt.cirrus.dev/v1alpha1\nkind: MqttUser\nmetadata: {name: first}\nspec: {brokerRef: ok, username: same}\n").await;
    user_ready(&c, &ns, "first", ("True", "Configured")).await;
    create::<MqttUser>(&c, &ns, "apiVersion: mqtt.cirrus.dev/v1alpha1\nkind: MqttUser\nmetadata: {name: second}\nspec: {brokerRef: ok, username: same}\n").await;
    user_ready(&c, &ns, "second", ("False", "DuplicateUsername")).await;
    // Only valid, unique users reach the auth file.
    auth_file_with(&c, &ns, "ok", &["same"]).await;
    // The schema refuses out-of-range values before the operator sees them.
    let bad: MqttBroker = serde_yaml::from_str("apiVersion: mqtt.cirrus.dev/v1alpha1\nkind: MqttBroker\nmetadata: {name: negative}\nspec: {replicas: -1}\n").unwrap();
    let err = Api::<MqttBroker>::namespaced(c.clone(), &ns)
        .create(&PostParams::default(), &bad)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("replicas"), "{err}");
    // Fixing the spec recovers.
    Api::<MqttBroker>::namespaced(c.clone(), &ns)
        .patch(
            "inverted",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"autoscaling": {"minReplicas": 1}}})),
        )
        .await
        .unwrap();
    broker_ready(&c, &ns, "inverted", ("False", "Unavailable")).await;
    assert!(get::<Deployment>(&c, &ns, "inverted").await.is_some());
}

/// Autoscaling turned on for a running broker keeps its pods: the
/// Deployment's replicas stay where they were (for the HPA to move), not
/// reset to 1 when the operator stops setting them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn turning_autoscaling_on_keeps_the_running_replicas() {
    let c = client().await;
    let ns = namespace(&c, "op-hpa").await;
    let _op = Operator::start(&c, &ns);
    create::<MqttBroker>(&c, &ns, "apiVersion: mqtt.cirrus.dev/v1alpha1\nkind: MqttBroker\nmetadata: {name: grow}\nspec: {replicas: 3}\n").await;
    eventually(WAIT, "3 replicas", || async {
        let d: Deployment = get(&c, &ns, "grow").await?;
        (d.spec.replicas == Some(3)).then_some(())
    })
    .await;
    Api::<MqttBroker>::namespaced(c.clone(), &ns)
        .patch(
            "grow",
            &PatchParams::default(),
            &Patch::Merge(
                serde_json::json!({"spec": {"autoscaling": {"minReplicas": 2, "maxReplicas": 6}}}),
            ),
        )
        .await
        .unwrap();
    eventually(WAIT, "HPA", || async {
        get::<HorizontalPodAutoscaler>(&c, &ns, "grow").await
    })
    .await;
    // Several resyncs (1 s each) later, still 3.
    for _ in 0..4 {
        tokio::time::sleep(RESYNC).await;
        let d: Deployment = get(&c, &ns, "grow").await.unwrap();
        assert_eq!(
            d.spec.replicas,
            Some(3),
            "autoscaling on reset the replicas"
        );
    }
    // The HPA's own change (through the scale subresource) is not undone.
    Api::<Deployment>::namespaced(c.clone(), &ns)
        .patch_scale(
            "grow",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"replicas": 5}})),
        )
        .await
        .unwrap();
    for _ in 0..4 {
        tokio::time::sleep(RESYNC).await;
        let d: Deployment = get(&c, &ns, "grow").await.unwrap();
        assert_eq!(d.spec.replicas, Some(5), "the operator undid a scale");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_broker_collects_its_children() {
    let c = client().await;
    let ns = namespace(&c, "op-gc").await;
    let _op = Operator::start(&c, &ns);
    create::<MqttBroker>(&c, &ns, BROKER).await;
    eventually(WAIT, "children", || async {
        let d: Option<Deployment> = get(&c, &ns, "main").await;
        let s: Option<Secret> = get(&c, &ns, "main-auth").await;
        (d.is_some() && s.is_some()).then_some(())
    })
    .await;
    Api::<MqttBroker>::namespaced(c.clone(), &ns)
        .delete("main", &DeleteParams::default())
        .await
        .unwrap();
    eventually(Duration::from_secs(60), "garbage collection", || async {
        let d: Option<Deployment> = get(&c, &ns, "main").await;
        let s: Option<Service> = get(&c, &ns, "main").await;
        let cm: Option<ConfigMap> = get(&c, &ns, "main-config").await;
        let a: Option<Secret> = get(&c, &ns, "main-auth").await;
        (d.is_none() && s.is_none() && cm.is_none() && a.is_none()).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contract_the_configmap_and_auth_secret_run_a_real_broker() {
    use cirrus_codec::{reason, QoS};
    use cirrus_e2e::Client as Mqtt;
    let c = client().await;
    let ns = namespace(&c, "op-contract").await;
    let _op = Operator::start(&c, &ns);
    create::<MqttBroker>(&c, &ns, "apiVersion: mqtt.cirrus.dev/v1alpha1\nkind: MqttBroker\nmetadata: {name: real}\nspec: {limits: {maxPacketSize: 4096, receiveMaximum: 9}}\n").await;
    create::<MqttUser>(
        &c,
        &ns,
        "apiVersion: mqtt.cirrus.dev/v1alpha1\nkind: MqttUser\nmetadata: {name: dev}\nspec: {brokerRef: real, acl: [{topic: 'devices/%u/#', access: all}, {topic: '#', access: all, permission: deny}]}\n",
    )
    .await;
    user_ready(&c, &ns, "dev", ("True", "Configured")).await;
    eventually(WAIT, "user in auth file", || async {
        (!auth_file(&c, &ns, "real").await.users.is_empty()).then_some(())
    })
    .await;
    let cm: ConfigMap = get(&c, &ns, "real-config").await.unwrap();
    let yaml = cm.data.unwrap()["config.yaml"].clone();
    let password = secret_value(&c, &ns, "dev-mqtt-credentials", "password").await;
    // The files the pods would mount, fed to the real binary on loopback.
    let (b, auth_dir) = broker_with_auth_of(&c, &ns, "real", Some(&yaml)).await;
    let creds = |id: &str, pw: &str| login(id, "dev", pw);
    let (mut m, ack) = Mqtt::connect(b.addr, creds("contract", &password)).await;
    assert_eq!(ack.reason_code, 0);
    assert_eq!(ack.properties.maximum_packet_size, Some(4096));
    assert_eq!(ack.properties.receive_maximum, Some(9));
    // Its ACL holds; a wrong password and anonymous clients are refused.
    assert_eq!(m.subscribe("devices/dev/#", QoS::AtLeastOnce).await, 1);
    assert_eq!(
        m.publish("devices/dev/t", b"1", QoS::AtLeastOnce, false)
            .await,
        0
    );
    assert_eq!(m.recv_ack().await.payload[..], b"1"[..]);
    assert_eq!(
        m.publish("devices/other/t", b"2", QoS::AtLeastOnce, false)
            .await,
        reason::NOT_AUTHORIZED
    );
    let (_x, ack) = Mqtt::connect(b.addr, creds("contract-2", "not-the-password")).await;
    assert_eq!(ack.reason_code, reason::BAD_USER_NAME_OR_PASSWORD);
    let (_x, ack) = Mqtt::connect(b.addr, cirrus_e2e::Opts::v5("anonymous")).await;
    assert_eq!(ack.reason_code, reason::NOT_AUTHORIZED);
    let _ = std::fs::remove_dir_all(&auth_dir);
}

/// TLS from the operator's CA: a Secret for the Service's names, status with
/// its expiry, renewal of a certificate close to expiry, and a real broker
/// serving it to a client that verifies the chain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_certificates_come_from_the_operators_ca_and_are_renewed() {
    let c = client().await;
    let ns = namespace(&c, "op-tls").await;
    let _op = Operator::start(&c, &ns);
    create::<MqttBroker>(&c, &ns, "apiVersion: mqtt.cirrus.dev/v1alpha1\nkind: MqttBroker\nmetadata: {name: secure}\nspec: {listeners: {mqtt: 1883, mqtts: 8883}, tls: {enabled: true}}\n").await;
    let secret: Secret = eventually(WAIT, "TLS secret", || async {
        get::<Secret>(&c, &ns, "secure-tls").await
    })
    .await;
    assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/tls"));
    let cert = secret_value(&c, &ns, "secure-tls", "tls.crt").await;
    let ca = secret_value(&c, &ns, "secure-tls", "ca.crt").await;
    assert_eq!(ca, secret_value(&c, &ns, "cirrus-ca", "tls.crt").await);
    let (not_after, names) = cirrus_operator::tls::inspect(&cert).unwrap();
    assert!(names.contains(&format!("secure.{ns}.svc")), "{names:?}");
    let now = k8s_openapi::jiff::Timestamp::now().as_second();
    assert!(not_after - now > 80 * 86_400);
    let b = eventually(WAIT, "TLSReady and expiry in status", || async {
        let b: MqttBroker = get(&c, &ns, "secure").await?;
        let s = b.status.clone()?;
        let tls_ready = s
            .conditions
            .iter()
            .any(|c| c.type_ == "TLSReady" && c.status == "True");
        (tls_ready && s.certificate_expiry.is_some()).then_some(b)
    })
    .await;
    let expiry = b.status.unwrap().certificate_expiry.unwrap();
    assert!(expiry.starts_with(
        &k8s_openapi::jiff::Timestamp::from_second(not_after)
            .unwrap()
            .to_string()[..10]
    ));

    // A real broker with the operator's config and this Secret, and a
    // client that checks the chain against ca.crt.
    let cm: ConfigMap = get(&c, &ns, "secure-config").await.unwrap();
    let yaml = cm.data.unwrap()["config.yaml"].clone();
    assert!(yaml.contains("8883"), "TLS listener in the config:\n{yaml}");
    let key = secret_value(&c, &ns, "secure-tls", "tls.key").await;
    publishes_over_tls(&yaml, &cert, &key, &ca);

    // A certificate about to expire is issued again.
    let soon = {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p =
            rcgen::CertificateParams::new(cirrus_operator::tls::dns_names("secure", &ns)).unwrap();
        let d = k8s_openapi::jiff::Zoned::now().date().tomorrow().unwrap();
        p.not_after = rcgen::date_time_ymd(i32::from(d.year()), d.month() as u8, d.day() as u8);
        p.not_before = rcgen::date_time_ymd(2020, 1, 1);
        (p.self_signed(&key).unwrap().pem(), key.serialize_pem())
    };
    let mut s: Secret = get(&c, &ns, "secure-tls").await.unwrap();
    let data = s.data.as_mut().unwrap();
    data.insert("tls.crt".into(), ByteString(soon.0.into_bytes()));
    data.insert("tls.key".into(), ByteString(soon.1.into_bytes()));
    s.metadata.managed_fields = None;
    Api::<Secret>::namespaced(c.clone(), &ns)
        .replace("secure-tls", &PostParams::default(), &s)
        .await
        .unwrap();
    eventually(WAIT, "certificate renewed", || async {
        let cert = secret_value(&c, &ns, "secure-tls", "tls.crt").await;
        let (na, _) = cirrus_operator::tls::inspect(&cert)?;
        (na - now > 80 * 86_400).then_some(())
    })
    .await;
}

/// A LoadBalancer broker with TLS only (mqtts and wss), extra names and
/// mutual TLS: the certificate covers the extra names and, once the
/// LoadBalancer has them, its addresses, which `status.endpoints` shows;
/// the client CA Secret is mounted, and a real broker run with the
/// operator's config refuses a client without a certificate from that CA.
#[tokio::test]
async fn a_load_balancer_broker_covers_its_addresses_and_extra_names_with_mutual_tls() {
    let c = client().await;
    let ns = namespace(&c, "op-lb").await;
    let _op = Operator::start(&c, &ns);
    let client_ca = cirrus_e2e::certs::ca("clients");
    let mut ca_secret: Secret = serde_yaml::from_str("metadata: {name: client-ca}\n").unwrap();
    ca_secret.data = Some(BTreeMap::from([(
        "ca.crt".to_string(),
        ByteString(client_ca.cert.pem().into_bytes()),
    )]));
    Api::<Secret>::namespaced(c.clone(), &ns)
        .create(&PostParams::default(), &ca_secret)
        .await
        .unwrap();
    create::<MqttBroker>(&c, &ns, "apiVersion: mqtt.cirrus.dev/v1alpha1\nkind: MqttBroker\nmetadata: {name: edge}\nspec:\n  service: {type: LoadBalancer}\n  listeners: {mqtt: 0, mqtts: 8883, wss: 8884}\n  tls: {enabled: true, extraSans: [mqtt.example.com, 192.0.2.10], clientCaSecretRef: {name: client-ca, key: ca.crt}, certAsUsername: true}\n").await;
    let names = eventually(WAIT, "TLS secret", || async {
        let s = get::<Secret>(&c, &ns, "edge-tls").await?;
        let cert = String::from_utf8(s.data?.get("tls.crt")?.0.clone()).ok()?;
        Some(cirrus_operator::tls::inspect(&cert)?.1)
    })
    .await;
    for n in ["mqtt.example.com", "192.0.2.10", &format!("edge.{ns}.svc")] {
        assert!(names.iter().any(|have| have == n), "{n} not in {names:?}");
    }
    let svc: Service = eventually(WAIT, "the Service", || async {
        get::<Service>(&c, &ns, "edge").await
    })
    .await;
    let ports: Vec<i32> = svc
        .spec
        .unwrap()
        .ports
        .unwrap()
        .iter()
        .map(|p| p.port)
        .collect();
    assert_eq!(ports, [8883, 8884], "TLS only, wss beside mqtts");

    // The cloud's load balancer answers (here: written by hand, as its
    // controller would).
    Api::<Service>::namespaced(c.clone(), &ns)
        .patch_status(
            "edge",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"status": {"loadBalancer": {"ingress": [
                {"hostname": "edge-1234.lb.example.net"},
                {"ip": "198.51.100.7"}
            ]}}})),
        )
        .await
        .unwrap();
    let endpoints = eventually(WAIT, "external endpoints in status", || async {
        let b: MqttBroker = get(&c, &ns, "edge").await?;
        let e = b.status?.endpoints;
        e.contains_key("wss-external").then_some(e)
    })
    .await;
    assert_eq!(endpoints["mqtts-external"], "edge-1234.lb.example.net:8883");
    assert_eq!(
        endpoints["wss-external"],
        "wss://edge-1234.lb.example.net:8884/mqtt"
    );
    assert_eq!(endpoints["wss"], format!("wss://edge.{ns}.svc:8884/mqtt"));
    assert!(!endpoints.contains_key("mqtt"), "{endpoints:?}");
    let cert = eventually(
        WAIT,
        "the certificate reissued for the LoadBalancer",
        || async {
            let cert = secret_value(&c, &ns, "edge-tls", "tls.crt").await;
            let (_, names) = cirrus_operator::tls::inspect(&cert)?;
            (names.iter().any(|n| n == "edge-1234.lb.example.net")
                && names.iter().any(|n| n == "198.51.100.7")
                && names.iter().any(|n| n == "mqtt.example.com"))
            .then_some(cert)
        },
    )
    .await;

    // The pods mount the client CA; the config names it.
    let d: Deployment = get(&c, &ns, "edge").await.unwrap();
    let pod = d.spec.template.spec.unwrap();
    let vol = pod
        .volumes
        .unwrap()
        .into_iter()
        .find(|v| v.name == "client-ca")
        .expect("client CA volume");
    assert_eq!(
        vol.secret.unwrap().secret_name.as_deref(),
        Some("client-ca")
    );
    let cm: ConfigMap = get(&c, &ns, "edge-config").await.unwrap();
    let yaml = cm.data.unwrap()["config.yaml"].clone();
    let cfg: cirrus_config::Config = serde_yaml::from_str(&yaml).unwrap();
    assert_eq!(
        cfg.tls.client_ca_file.as_deref(),
        Some(std::path::Path::new("/etc/cirrus/client-ca/ca.crt"))
    );
    assert!(cfg.tls.cert_as_username);
    assert_eq!(cfg.listeners.wss.map(|a| a.port()), Some(8884));
    assert_eq!(cfg.listeners.tcp, None);

    // A real broker with that config (its addresses and files moved to
    // this machine): a client with a certificate from the client CA gets
    // in, one without is refused in the handshake.
    let dir = cirrus_e2e::certs::Dir::new();
    let cert_f = dir.write("tls.crt", &cert);
    let key_f = dir.write(
        "tls.key",
        &secret_value(&c, &ns, "edge-tls", "tls.key").await,
    );
    let ca_f = dir.write("ca.crt", &secret_value(&c, &ns, "edge-tls", "ca.crt").await);
    let client_ca_f = dir.write("client-ca.crt", &client_ca.cert.pem());
    let (ccert, ckey) = cirrus_e2e::certs::leaf(&client_ca, "device-7", &[], true, false);
    let (ccert_f, ckey_f) = (dir.write("c.crt", &ccert), dir.write("c.key", &ckey));
    let auth_f = dir.write("auth.yaml", "version: 1\nallow_anonymous: true\n");
    let broker = cirrus_e2e::BrokerProcess::start_with_config(
        &yaml,
        &[
            "--tls-listen",
            "127.0.0.1:0",
            "--wss-listen",
            "127.0.0.1:0",
            "--tls-cert",
            &cert_f,
            "--tls-key",
            &key_f,
            "--tls-client-ca",
            &client_ca_f,
            "--auth-file",
            &auth_f,
        ],
    );
    let port = broker.addrs["mqtts"].port().to_string();
    let publish = |with_cert: bool| {
        let client = with_cert.then_some((ccert_f.as_str(), ckey_f.as_str()));
        mosquitto_pub_tls(&port, &ca_f, client, "mtls/check")
    };
    let ok = publish(true);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(
        !publish(false).status.success(),
        "no client certificate, yet in"
    );
}

/// With a resync of 10 minutes, only the watches bring changes in: a new
/// value in the Redis URL Secret rolls the pods (the pod template records
/// the Secret's version, not its content), a changed password Secret
/// reaches the auth file, and a deleted PodDisruptionBudget or HPA comes
/// back, each within seconds.
#[tokio::test]
async fn referenced_secrets_and_every_child_are_watched_and_a_redis_secret_change_rolls_the_pods() {
    let c = client().await;
    let ns = namespace(&c, "op-watch").await;
    let _op = Operator::start_with_resync(&c, &ns, Duration::from_secs(600));
    let secrets = Api::<Secret>::namespaced(c.clone(), &ns);
    let put = |name: &'static str, key: &'static str, value: &'static str| {
        let secrets = secrets.clone();
        async move {
            let s = serde_json::json!({"apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": name}, "stringData": {key: value}});
            secrets
                .patch(name, &PatchParams::apply("test").force(), &Patch::Apply(s))
                .await
                .unwrap()
        }
    };
    put("redis-url", "url", "redis://first.example:6379").await;
    put("pw", "password", "first-password").await;
    create::<MqttBroker>(&c, &ns, "apiVersion: mqtt.cirrus.dev/v1alpha1\nkind: MqttBroker\nmetadata: {name: w}\nspec: {redis: {urlSecretRef: {name: redis-url, key: url}}, autoscaling: {minReplicas: 2, maxReplicas: 4}}\n").await;
    create::<MqttUser>(&c, &ns, "apiVersion: mqtt.cirrus.dev/v1alpha1\nkind: MqttUser\nmetadata: {name: dev}\nspec: {brokerRef: w, passwordSecretRef: {name: pw, key: password}}\n").await;
    let version = || async {
        let d: Deployment = get(&c, &ns, "w").await?;
        let a = d.spec.template.metadata?.annotations?;
        let v = a.get("mqtt.cirrus.dev/redis-secret-version")?.clone();
        Some(v)
    };
    let first = eventually(
        WAIT,
        "the Redis Secret's version in the pod template",
        version,
    )
    .await;
    let s: Secret = get(&c, &ns, "redis-url").await.unwrap();
    assert!(
        first.ends_with(s.metadata.resource_version.as_deref().unwrap()),
        "{first}"
    );
    assert!(!first.contains("first.example"), "{first}");
    let entry = eventually(WAIT, "the user in the auth file", || async {
        auth_file(&c, &ns, "w").await.users.into_iter().next()
    })
    .await;
    assert!(verifies(&entry.password_hash, "first-password"));

    let quick = Duration::from_secs(15);
    put(
        "redis-url",
        "url",
        "redis://:new-password@first.example:6379",
    )
    .await;
    let second = eventually(quick, "a new version after the Secret changed", || async {
        version().await.filter(|v| *v != first)
    })
    .await;
    assert!(!second.contains("new-password"), "{second}");
    put("pw", "password", "second-password").await;
    eventually(quick, "the new password in the auth file", || async {
        let e = auth_file(&c, &ns, "w").await.users.into_iter().next()?;
        verifies(&e.password_hash, "second-password").then_some(())
    })
    .await;
    // Children deleted by hand come back without waiting for a resync.
    let uids = (
        get::<PodDisruptionBudget>(&c, &ns, "w")
            .await
            .unwrap()
            .metadata
            .uid,
        get::<HorizontalPodAutoscaler>(&c, &ns, "w")
            .await
            .unwrap()
            .metadata
            .uid,
    );
    Api::<PodDisruptionBudget>::namespaced(c.clone(), &ns)
        .delete("w", &DeleteParams::default())
        .await
        .unwrap();
    Api::<HorizontalPodAutoscaler>::namespaced(c.clone(), &ns)
        .delete("w", &DeleteParams::default())
        .await
        .unwrap();
    eventually(quick, "the PDB and the HPA back", || async {
        let pdb = get::<PodDisruptionBudget>(&c, &ns, "w").await?;
        let hpa = get::<HorizontalPodAutoscaler>(&c, &ns, "w").await?;
        (pdb.metadata.uid != uids.0 && hpa.metadata.uid != uids.1).then_some(())
    })
    .await;
}

/// A ResourceQuota that refuses the broker's ConfigMap: the broker says so
/// (`Ready=False`, reason `QuotaExceeded`, the API server's message) and a
/// Warning event tells it once, not at every retry; once the quota is gone
/// the broker is reconciled without any change to it.
#[tokio::test]
async fn a_quota_that_refuses_a_child_is_a_condition_and_an_event() {
    use k8s_openapi::api::core::v1::ResourceQuota;
    let c = client().await;
    let ns = namespace(&c, "op-quota").await;
    let quotas = Api::<ResourceQuota>::namespaced(c.clone(), &ns);
    quotas
        .create(
            &PostParams::default(),
            &serde_yaml::from_str(
                "metadata: {name: no-configmaps}\nspec: {hard: {count/configmaps: '0'}}\n",
            )
            .unwrap(),
        )
        .await
        .unwrap();
    // The quota controller fills in what is used before admission enforces it.
    eventually(WAIT, "the quota counted", || async {
        let q = quotas.get("no-configmaps").await.ok()?;
        q.status?
            .used
            .filter(|u| u.contains_key("count/configmaps"))
    })
    .await;
    let _op = Operator::start(&c, &ns);
    create::<MqttBroker>(
        &c,
        &ns,
        "apiVersion: mqtt.cirrus.dev/v1alpha1\nkind: MqttBroker\nmetadata: {name: q}\nspec: {}\n",
    )
    .await;
    let b = broker_ready(&c, &ns, "q", ("False", "QuotaExceeded")).await;
    let ready = b
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Ready")
        .unwrap();
    assert!(
        ready.message.contains("exceeded quota"),
        "{}",
        ready.message
    );
    let warnings = || async {
        let list = Api::<k8s_openapi::api::events::v1::Event>::namespaced(c.clone(), &ns)
            .list(&Default::default())
            .await
            .ok()?;
        let n: i32 = list
            .items
            .iter()
            .filter(|e| e.reason.as_deref() == Some("QuotaExceeded"))
            .filter(|e| e.type_.as_deref() == Some("Warning"))
            .map(|e| e.series.as_ref().map_or(1, |s| s.count))
            .sum();
        (n > 0).then_some(n)
    };
    eventually(WAIT, "a QuotaExceeded event", warnings).await;
    // Retries back off (5 s, then 10 s, ...) and say it once.
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert_eq!(warnings().await, Some(1), "one event for one failure");

    quotas
        .delete("no-configmaps", &DeleteParams::default())
        .await
        .unwrap();
    eventually(
        Duration::from_secs(60),
        "the ConfigMap once the quota is gone",
        || async { get::<ConfigMap>(&c, &ns, "q-config").await },
    )
    .await;
}

/// Rotating a generated password with an overlap: the annotation puts a
/// new password into the user's Secret, the auth file carries the old hash
/// beside the new one until `passwordOverlapSeconds` ends, a real broker
/// fed that file lets both passwords in, and afterwards the old hash is
/// gone from the file without any change to the user.
#[tokio::test]
async fn a_rotated_password_works_beside_the_old_one_until_the_overlap_ends() {
    use cirrus_e2e::Client as Mqtt;
    let c = client().await;
    let ns = namespace(&c, "op-rotate").await;
    let _op = Operator::start(&c, &ns);
    create::<MqttBroker>(
        &c,
        &ns,
        "apiVersion: mqtt.cirrus.dev/v1alpha1\nkind: MqttBroker\nmetadata: {name: r}\nspec: {}\n",
    )
    .await;
    create::<MqttUser>(&c, &ns, "apiVersion: mqtt.cirrus.dev/v1alpha1\nkind: MqttUser\nmetadata: {name: dev}\nspec: {brokerRef: r, passwordOverlapSeconds: 25}\n").await;
    user_ready(&c, &ns, "dev", ("True", "Configured")).await;
    let old = secret_value(&c, &ns, "dev-mqtt-credentials", "password").await;
    eventually(WAIT, "the first password in the auth file", || async {
        let e = auth_file(&c, &ns, "r").await.users.into_iter().next()?;
        verifies(&e.password_hash, &old).then_some(())
    })
    .await;

    Api::<MqttUser>::namespaced(c.clone(), &ns)
        .patch(
            "dev",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"metadata": {"annotations": {"mqtt.cirrus.dev/rotate-password": "1"}}})),
        )
        .await
        .unwrap();
    let new = eventually(WAIT, "a new password in the Secret", || async {
        let p = secret_value(&c, &ns, "dev-mqtt-credentials", "password").await;
        (p != old).then_some(p)
    })
    .await;
    let entry = eventually(WAIT, "both hashes in the auth file", || async {
        let e = auth_file(&c, &ns, "r").await.users.into_iter().next()?;
        (verifies(&e.password_hash, &new)
            && e.previous_password_hash
                .as_deref()
                .is_some_and(|h| verifies(h, &old)))
        .then_some(e)
    })
    .await;
    let now = k8s_openapi::jiff::Timestamp::now().as_second() as u64;
    let until = entry.previous_valid_until.unwrap();
    assert!(until > now && until <= now + 25, "{until} vs {now}");
    // The same annotation value again is not a new request.
    tokio::time::sleep(RESYNC * 2).await;
    assert_eq!(
        secret_value(&c, &ns, "dev-mqtt-credentials", "password").await,
        new
    );

    // A real broker with this auth file: both passwords log in.
    let (b, auth_dir) = broker_with_auth_of(&c, &ns, "r", None).await;
    for (id, pw) in [("with-old", &old), ("with-new", &new)] {
        let (_m, ack) = Mqtt::connect(b.addr, login(id, "dev", pw)).await;
        assert_eq!(ack.reason_code, 0, "{id}");
    }
    drop(b);
    let _ = std::fs::remove_dir_all(&auth_dir);

    // The overlap ends: the old hash leaves the file by itself.
    eventually(Duration::from_secs(50), "the old hash gone", || async {
        let e = auth_file(&c, &ns, "r").await.users.into_iter().next()?;
        (e.previous_password_hash.is_none() && verifies(&e.password_hash, &new)).then_some(())
    })
    .await;
}

/// A real broker on `config` (a ConfigMap the operator wrote) serving
/// `cert` and `key`: a mosquitto client that trusts only `ca` publishes to
/// it over TLS (the chain is checked, not the name: it dials 127.0.0.1).
fn publishes_over_tls(config: &str, cert: &str, key: &str, ca: &str) {
    let dir = cirrus_e2e::certs::Dir::new();
    let cert_f = dir.write("tls.crt", cert);
    let key_f = dir.write("tls.key", key);
    let ca_f = dir.write("ca.crt", ca);
    let auth_f = dir.write("auth.yaml", "version: 1\nallow_anonymous: true\n");
    let broker = cirrus_e2e::BrokerProcess::start_with_config(
        config,
        &[
            "--tls-listen",
            "127.0.0.1:0",
            "--tls-cert",
            &cert_f,
            "--tls-key",
            &key_f,
            "--auth-file",
            &auth_f,
        ],
    );
    let port = broker.addrs["mqtts"].port().to_string();
    let out = mosquitto_pub_tls(&port, &ca_f, None, "tls/check");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One QoS 1 publish by `mosquitto_pub` over TLS to 127.0.0.1:`port`,
/// trusting only `ca_file` (the chain is checked, not the name), with a
/// client certificate and key when given.
fn mosquitto_pub_tls(
    port: &str,
    ca_file: &str,
    client: Option<(&str, &str)>,
    topic: &str,
) -> std::process::Output {
    let mut cmd = std::process::Command::new(cirrus_e2e::tool("mosquitto_pub"));
    cmd.args([
        "-h",
        "127.0.0.1",
        "-p",
        port,
        "--cafile",
        ca_file,
        "--insecure",
    ]);
    if let Some((cert, key)) = client {
        cmd.args(["--cert", cert, "--key", key]);
    }
    cmd.args(["-t", topic, "-m", "x", "-q", "1"])
        .output()
        .unwrap()
}

/// Merge `spec` into the broker's spec.
async fn patch_broker_spec(c: &Client, ns: &str, name: &str, spec: serde_json::Value) {
    Api::<MqttBroker>::namespaced(c.clone(), ns)
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({ "spec": spec })),
        )
        .await
        .unwrap();
}

/// The first step of moving a broker to another Redis: 0 replicas with
/// `redis` as the pods have it (the Deployment's status written as its
/// controller would), until the broker counts no pod.
async fn scale_broker_to_zero(c: &Client, ns: &str, name: &str, redis: serde_json::Value) {
    patch_broker_spec(
        c,
        ns,
        name,
        serde_json::json!({"replicas": 0, "redis": redis}),
    )
    .await;
    eventually(WAIT, "0 replicas asked", || async {
        let d: Deployment = get(c, ns, name).await?;
        (d.spec.replicas == Some(0)).then_some(())
    })
    .await;
    deployment_available(c, ns, name, 0).await;
    eventually(WAIT, "no pod running", || async {
        let b: MqttBroker = get(c, ns, name).await?;
        (b.status?.replicas == 0).then_some(())
    })
    .await;
}

/// The Redis URL the broker's pods are given.
async fn redis_url_of(c: &Client, ns: &str, name: &str) -> Option<String> {
    let d: Deployment = get(c, ns, name).await?;
    d.spec.template.spec?.containers[0]
        .env
        .as_ref()?
        .iter()
        .find(|e| e.name == "CIRRUS_REDIS_URL")?
        .value
        .clone()
}

/// A running broker is not moved to another Redis (its old and new pods
/// would be two brokers while the rollout lasts): refused with a reason
/// until no pod runs, or the annotation says it is the same Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_broker_is_not_moved_to_another_redis() {
    let c = client().await;
    let ns = namespace(&c, "op-redis-move").await;
    let _op = Operator::start(&c, &ns);
    let a = "redis://:hunter2@redis-a:6379";
    create::<MqttBroker>(
        &c,
        &ns,
        &format!("apiVersion: mqtt.cirrus.dev/v1alpha1\nkind: MqttBroker\nmetadata: {{name: m}}\nspec: {{replicas: 2, redis: {{url: '{a}'}}}}\n"),
    )
    .await;
    eventually(WAIT, "Deployment m", || async {
        get::<Deployment>(&c, &ns, "m").await
    })
    .await;
    deployment_available(&c, &ns, "m", 2).await;
    let b: MqttBroker = eventually(WAIT, "two pods on redis-a", || async {
        let b: MqttBroker = get(&c, &ns, "m").await?;
        let s = b.status.as_ref()?;
        (s.replicas == 2 && s.redis.as_deref() == Some("url:redis://redis-a:6379")).then_some(b)
    })
    .await;
    assert!(!serde_json::to_string(&b.status)
        .unwrap()
        .contains("hunter2"));

    let brokers = Api::<MqttBroker>::namespaced(c.clone(), &ns);
    let set = |spec: serde_json::Value| {
        let brokers = brokers.clone();
        async move {
            brokers
                .patch(
                    "m",
                    &PatchParams::default(),
                    &Patch::Merge(serde_json::json!({ "spec": spec })),
                )
                .await
                .unwrap();
        }
    };
    // Another Redis while two pods run: refused, the pods keep theirs.
    set(serde_json::json!({"redis": {"url": "redis://redis-b:6379"}})).await;
    let b = broker_ready(&c, &ns, "m", ("False", "RedisChangeRefused")).await;
    let msg = b
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Ready")
        .unwrap()
        .message;
    assert!(
        msg.contains("scale it to 0") && !msg.contains("hunter2"),
        "{msg}"
    );
    tokio::time::sleep(RESYNC * 2).await;
    assert_eq!(redis_url_of(&c, &ns, "m").await.as_deref(), Some(a));

    // The documented move: back to the old one and to 0 pods, then the new.
    scale_broker_to_zero(&c, &ns, "m", serde_json::json!({"url": a})).await;
    set(serde_json::json!({"replicas": 2, "redis": {"url": "redis://redis-b:6379"}})).await;
    eventually(WAIT, "the pods on redis-b", || async {
        let url = redis_url_of(&c, &ns, "m").await?;
        let b: MqttBroker = get(&c, &ns, "m").await?;
        (url == "redis://redis-b:6379"
            && b.status?.redis.as_deref() == Some("url:redis://redis-b:6379"))
        .then_some(())
    })
    .await;

    // The same Redis under another name, said so by the annotation: the
    // running pods roll onto it.
    deployment_available(&c, &ns, "m", 2).await;
    eventually(WAIT, "two pods on redis-b", || async {
        let b: MqttBroker = get(&c, &ns, "m").await?;
        (b.status?.replicas == 2).then_some(())
    })
    .await;
    brokers
        .patch(
            "m",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({
                "metadata": {"annotations": {"mqtt.cirrus.dev/same-redis": "true"}},
                "spec": {"redis": {"url": "redis://redis-b.cache.svc:6379"}}
            })),
        )
        .await
        .unwrap();
    eventually(WAIT, "the pods on the new name", || async {
        (redis_url_of(&c, &ns, "m").await? == "redis://redis-b.cache.svc:6379").then_some(())
    })
    .await;
}

/// PEM certificates of a bundle.
fn certs_of(bundle: &str) -> Vec<String> {
    bundle
        .split_inclusive("-----END CERTIFICATE-----")
        .map(|c| c.trim().to_string())
        .filter(|c| c.starts_with("-----BEGIN CERTIFICATE-----"))
        .collect()
}

#[tokio::test]
async fn the_ca_rotates_with_an_overlap_in_which_both_cas_are_trusted() {
    use cirrus_operator::tls::{issued_by, OVERLAP_ANNOTATION, ROTATE_ANNOTATION};
    let c = client().await;
    let ns = namespace(&c, "op-ca").await;
    let _op = Operator::start(&c, &ns);
    create::<MqttBroker>(&c, &ns, "apiVersion: mqtt.cirrus.dev/v1alpha1\nkind: MqttBroker\nmetadata: {name: secure}\nspec: {listeners: {mqtt: 1883, mqtts: 8883}, tls: {enabled: true}}\n").await;
    eventually(WAIT, "TLS secret", || async {
        get::<Secret>(&c, &ns, "secure-tls").await
    })
    .await;
    let old_ca = secret_value(&c, &ns, "cirrus-ca", "tls.crt").await;
    let first = secret_value(&c, &ns, "secure-tls", "tls.crt").await;
    assert!(issued_by(&first, &old_ca));
    let secrets = Api::<Secret>::namespaced(c.clone(), &ns);
    let annotate = serde_json::json!({"metadata": {"annotations": {
        OVERLAP_ANNOTATION: "4", ROTATE_ANNOTATION: "2026-12-06"
    }}});
    secrets
        .patch(
            "cirrus-ca",
            &PatchParams::default(),
            &Patch::Merge(&annotate),
        )
        .await
        .unwrap();
    // Watch the broker's TLS Secret (what its pods and clients get) go
    // through the phases, each seen in order, and at every look the
    // certificate served is from a CA the bundle trusts.
    let mut seen = Vec::new();
    let t0 = std::time::Instant::now();
    let new_ca = loop {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "phases seen: {seen:?}"
        );
        let cert = secret_value(&c, &ns, "secure-tls", "tls.crt").await;
        let bundle = certs_of(&secret_value(&c, &ns, "secure-tls", "ca.crt").await);
        assert!(
            bundle.iter().any(|ca| issued_by(&cert, ca)),
            "the certificate's CA is not in the bundle (after {seen:?})"
        );
        let phase = match (bundle.len(), issued_by(&cert, &old_ca)) {
            (1, true) => "old",
            (2, true) => "both trusted, old signs",
            (2, false) => "both trusted, new signs",
            (1, false) => "new",
            other => panic!("{other:?}"),
        };
        if seen.last() != Some(&phase) {
            eprintln!("{:>5.1}s {phase}", t0.elapsed().as_secs_f64());
            seen.push(phase);
        }
        if phase == "new" {
            break bundle[0].clone();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // Each phase lasts the overlap (4 s): every one is seen.
    assert_eq!(
        seen,
        [
            "old",
            "both trusted, old signs",
            "both trusted, new signs",
            "new"
        ]
    );
    assert_eq!(
        new_ca.trim(),
        secret_value(&c, &ns, "cirrus-ca", "tls.crt").await.trim()
    );
    // Events tell each step.
    let events = eventually(WAIT, "rotation events", || async {
        let list = Api::<k8s_openapi::api::events::v1::Event>::namespaced(c.clone(), &ns)
            .list(&Default::default())
            .await
            .ok()?;
        // Repeats of a reason are one event with a series count.
        let n: i32 = list
            .items
            .iter()
            .filter(|e| e.reason.as_deref() == Some("CARotation"))
            .map(|e| e.series.as_ref().map_or(1, |s| s.count))
            .sum();
        (n >= 3).then_some(n)
    })
    .await;
    eprintln!("{events} CARotation events");
}

mod cert_manager;
mod chart;
mod ha;
mod scale;
