//! Builders of the objects an `MqttBroker` owns. Pure functions of the
//! resource (and of what the controller read), so they are unit-tested
//! without a cluster and a re-reconcile produces byte-identical objects.

use std::collections::hash_map::DefaultHasher;
use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};

use cirrus_config::Config;
use cirrus_operator_api::{MqttBroker, MqttUser, RedisDurability, ServiceType};
use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::autoscaling::v2::{
    CrossVersionObjectReference, HPAScalingPolicy, HPAScalingRules, HorizontalPodAutoscaler,
    HorizontalPodAutoscalerBehavior, HorizontalPodAutoscalerSpec, MetricIdentifier, MetricSpec,
    MetricTarget, PodsMetricSource, ResourceMetricSource,
};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EnvVar, EnvVarSource,
    HTTPGetAction, KeyToPath, ObjectFieldSelector, PodSecurityContext, PodSpec, PodTemplateSpec,
    Probe, ProjectedVolumeSource, ResourceRequirements, SeccompProfile, Secret, SecretKeySelector,
    SecretProjection, SecretVolumeSource, SecurityContext, Service, ServicePort, ServiceSpec,
    TCPSocketAction, Volume, VolumeMount, VolumeProjection,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::ByteString;
use kube::{Resource, ResourceExt};

/// The broker's admin port: /metrics, /healthz, /readyz.
pub const ADMIN_PORT: u16 = 9090;
/// Seconds a pod keeps serving (not ready) after SIGTERM, so that Services
/// stop sending it new clients before it drains.
pub const SHUTDOWN_DELAY_SECS: u64 = 5;
pub const CONFIG_KEY: &str = "config.yaml";
pub const AUTH_KEY: &str = "auth.yaml";
pub const PASSWORD_KEY: &str = "password";
pub const CONFIG_HASH_ANNOTATION: &str = "mqtt.cirrus.dev/config-hash";
/// The version of the Redis URL Secret (`redis.urlSecretRef`) the pods
/// were started with: a new URL or password there rolls the pods (they read
/// it at start). Its `uid/resourceVersion`, not a hash of its content:
/// nothing derived from the password is in the pod template.
pub const REDIS_SECRET_ANNOTATION: &str = "mqtt.cirrus.dev/redis-secret-version";
/// Every child the operator writes carries this label; its watches select
/// by it.
pub const OWNED_SELECTOR: &str = "app.kubernetes.io/managed-by=cirrus-operator";

pub fn labels(broker: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "app.kubernetes.io/name".to_string(),
            "cirrus-broker".to_string(),
        ),
        ("app.kubernetes.io/instance".to_string(), broker.to_string()),
        (
            "app.kubernetes.io/managed-by".to_string(),
            "cirrus-operator".to_string(),
        ),
    ])
}

fn selector(broker: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "app.kubernetes.io/name".to_string(),
            "cirrus-broker".to_string(),
        ),
        ("app.kubernetes.io/instance".to_string(), broker.to_string()),
    ])
}

pub fn config_map_name(b: &MqttBroker) -> String {
    format!("{}-config", b.name_any())
}
pub fn auth_secret_name(b: &MqttBroker) -> String {
    format!("{}-auth", b.name_any())
}
/// The Secret of the broker's user file `n` (1 and up).
pub fn user_file_secret_name(b: &MqttBroker, n: usize) -> String {
    format!("{}-auth-{n}", b.name_any())
}

/// The key of a user file Secret.
pub const USERS_KEY: &str = "users.yaml";
pub fn user_secret_name(u: &MqttUser) -> String {
    format!("{}-mqtt-credentials", u.name_any())
}

/// Owner reference making `owner` the controller of a child.
pub fn owner_ref<K: Resource<DynamicType = ()>>(owner: &K) -> Option<OwnerReference> {
    owner.controller_owner_ref(&())
}

pub fn meta<K: Resource<DynamicType = ()>>(
    owner: &K,
    name: String,
    labels: BTreeMap<String, String>,
) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: owner.namespace(),
        labels: Some(labels),
        owner_references: owner_ref(owner).map(|o| vec![o]),
        ..Default::default()
    }
}

/// The broker pods' volumes of the operator's own.
pub const OWN_VOLUMES: [&str; 4] = ["config", "auth", "tls", "client-ca"];

/// Where the client CA Secret (`tls.clientCaSecretRef`) is mounted.
const CLIENT_CA_DIR: &str = "/etc/cirrus/client-ca";

/// The broker configuration the pods read: the one format shared with the
/// broker (`cirrus_config::Config`).
pub fn broker_config(b: &MqttBroker) -> Config {
    let mut c = Config::default();
    let s = &b.spec;
    c.listeners.tcp = (s.listeners.mqtt > 0)
        .then(|| std::net::SocketAddr::from(([0, 0, 0, 0], s.listeners.mqtt as u16)));
    c.listeners.admin = Some(std::net::SocketAddr::from(([0, 0, 0, 0], ADMIN_PORT)));
    if let (Some(p), true) = (s.listeners.mqtts, s.tls.enabled) {
        c.listeners.tls = Some(std::net::SocketAddr::from(([0, 0, 0, 0], p as u16)));
    }
    if let Some(p) = s.listeners.websocket {
        c.listeners.ws = Some(std::net::SocketAddr::from(([0, 0, 0, 0], p as u16)));
    }
    if let (Some(p), true) = (s.listeners.wss, s.tls.enabled) {
        c.listeners.wss = Some(std::net::SocketAddr::from(([0, 0, 0, 0], p as u16)));
    }
    if s.tls.enabled {
        // The TLS Secret's mount (see `deployment`); kubernetes.io/tls keys.
        c.tls.cert_file = Some("/etc/cirrus/tls/tls.crt".into());
        c.tls.key_file = Some("/etc/cirrus/tls/tls.key".into());
        if let Some(r) = &s.tls.client_ca_secret_ref {
            c.tls.client_ca_file = Some(format!("{CLIENT_CA_DIR}/{}", r.key).into());
            c.tls.cert_as_username = s.tls.cert_as_username;
        }
    }
    // The URL itself comes from CIRRUS_REDIS_URL (it may hold a password).
    c.redis.cluster = s.redis.cluster;
    c.redis.durability = match s.redis.durability {
        RedisDurability::Async => cirrus_config::broker::Durability::Async,
        RedisDurability::Replicated => cirrus_config::broker::Durability::Replicated,
    };
    if let Some(n) = s.redis.wait_replicas {
        c.redis.replicas = n;
    }
    if let Some(ms) = s.redis.wait_timeout_ms {
        c.redis.wait_timeout_ms = ms;
    }
    c.shutdown_timeout_secs = u64::from(s.drain.timeout_seconds);
    c.shutdown_delay_secs = SHUTDOWN_DELAY_SECS;
    c.drain = cirrus_config::Drain {
        connections_per_sec: s.drain.connections_per_second,
        // Pods behind a Service: the service goes on elsewhere.
        reason: cirrus_config::DrainReason::UseAnotherServer,
        server_reference: s.drain.server_reference.clone(),
    };
    c.rebalance = cirrus_config::Rebalance {
        enabled: s.rebalance.enabled,
        threshold_percent: s.rebalance.threshold_percent,
        connections_per_sec: s.rebalance.connections_per_second,
        min_connection_age_secs: u64::from(s.rebalance.min_connection_age_seconds),
        ..cirrus_config::Rebalance::default()
    };
    // The auth Secret's mount (see `deployment`).
    c.auth_file = Some(format!("/etc/cirrus/auth/{AUTH_KEY}").into());
    let l = &s.limits;
    if let Some(v) = l.max_connections {
        c.limits.max_connections = v as usize;
    }
    if let Some(v) = l.max_packet_size {
        c.limits.max_packet_size = v;
    }
    if let Some(v) = l.max_inflight {
        c.limits.max_inflight = v;
    }
    if let Some(v) = l.receive_maximum {
        c.limits.receive_maximum = v;
    }
    if let Some(v) = l.max_queued_messages {
        c.limits.max_queued_messages = v as usize;
    }
    if let Some(v) = l.max_keep_alive {
        c.limits.max_keep_alive = v;
    }
    c
}

pub fn config_map(b: &MqttBroker, config_yaml: &str) -> ConfigMap {
    ConfigMap {
        metadata: meta(b, config_map_name(b), labels(&b.name_any())),
        data: Some(BTreeMap::from([(
            CONFIG_KEY.to_string(),
            config_yaml.to_string(),
        )])),
        ..Default::default()
    }
}

pub fn auth_secret(b: &MqttBroker, auth_yaml: &str) -> Secret {
    Secret {
        metadata: meta(b, auth_secret_name(b), labels(&b.name_any())),
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([(
            AUTH_KEY.to_string(),
            ByteString(auth_yaml.as_bytes().to_vec()),
        )])),
        ..Default::default()
    }
}

/// The Secret of user file `n` (1 and up), a `cirrus_config::auth::UsersFile`.
pub fn user_file_secret(b: &MqttBroker, n: usize, users_yaml: &str) -> Secret {
    Secret {
        metadata: meta(b, user_file_secret_name(b, n), labels(&b.name_any())),
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([(
            USERS_KEY.to_string(),
            ByteString(users_yaml.as_bytes().to_vec()),
        )])),
        ..Default::default()
    }
}

pub fn user_secret(u: &MqttUser, username: &str, password: &str) -> Secret {
    let mut l = BTreeMap::from([(
        "app.kubernetes.io/managed-by".to_string(),
        "cirrus-operator".to_string(),
    )]);
    l.insert("mqtt.cirrus.dev/user".to_string(), u.name_any());
    Secret {
        metadata: meta(u, user_secret_name(u), l),
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([
            (
                "username".to_string(),
                ByteString(username.as_bytes().to_vec()),
            ),
            (
                PASSWORD_KEY.to_string(),
                ByteString(password.as_bytes().to_vec()),
            ),
        ])),
        ..Default::default()
    }
}

/// A stable hash of the configuration: in the pod template, so a config
/// change rolls the pods while an auth or certificate change (reloaded by
/// the broker) does not.
/// Record the Redis URL Secret's version in the pod template.
pub fn set_redis_secret_version(d: &mut Deployment, version: &str) {
    let meta = d
        .spec
        .template
        .metadata
        .get_or_insert_with(Default::default);
    meta.annotations
        .get_or_insert_with(Default::default)
        .insert(REDIS_SECRET_ANNOTATION.into(), version.into());
}

pub fn config_hash(config_yaml: &str) -> String {
    let mut h = DefaultHasher::new();
    config_yaml.hash(&mut h);
    format!("{:016x}", h.finish())
}

/// A container that runs as non-root, on a read-only root filesystem,
/// with every capability dropped and no way to gain privileges.
fn restricted() -> SecurityContext {
    SecurityContext {
        run_as_non_root: Some(true),
        read_only_root_filesystem: Some(true),
        allow_privilege_escalation: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            add: None,
        }),
        ..Default::default()
    }
}

/// The container runtime's default seccomp filter, which the "restricted"
/// Pod Security Standard requires.
fn runtime_default_seccomp() -> SeccompProfile {
    SeccompProfile {
        type_: "RuntimeDefault".into(),
        localhost_profile: None,
    }
}

fn port(name: &str, p: i32) -> ContainerPort {
    ContainerPort {
        name: Some(name.into()),
        container_port: p,
        protocol: Some("TCP".into()),
        ..Default::default()
    }
}

pub fn deployment(b: &MqttBroker, config_yaml: &str) -> Deployment {
    let name = b.name_any();
    let s = &b.spec;
    let mut ports: Vec<ContainerPort> = s
        .listeners
        .enabled()
        .into_iter()
        .map(|(n, p)| port(n, p))
        .collect();
    ports.push(port("admin", i32::from(ADMIN_PORT)));
    // The ReplicaSet's template hash: pods of two revisions in Redis mean
    // a rollout (no rebalance; old pods drain together, so that each client
    // moves once, to a new pod).
    let mut env = vec![EnvVar {
        name: "CIRRUS_REVISION".into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: "metadata.labels['pod-template-hash']".into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }];
    if let Some(e) = &s.telemetry.otlp_endpoint {
        env.push(EnvVar {
            name: "OTEL_EXPORTER_OTLP_ENDPOINT".into(),
            value: Some(e.clone()),
            ..Default::default()
        });
    }
    if let Some(r) = s.telemetry.sampling_ratio {
        env.push(EnvVar {
            name: "OTEL_TRACES_SAMPLER".into(),
            value: Some("parentbased_traceidratio".into()),
            ..Default::default()
        });
        env.push(EnvVar {
            name: "OTEL_TRACES_SAMPLER_ARG".into(),
            value: Some(r.to_string()),
            ..Default::default()
        });
    }
    if s.redis.managed {
        env.push(EnvVar {
            name: "CIRRUS_REDIS_URL".into(),
            value: Some(managed_redis_url(b)),
            ..Default::default()
        });
    } else if let Some(url) = &s.redis.url {
        env.push(EnvVar {
            name: "CIRRUS_REDIS_URL".into(),
            value: Some(url.clone()),
            ..Default::default()
        });
    } else if let Some(r) = &s.redis.url_secret_ref {
        env.push(EnvVar {
            name: "CIRRUS_REDIS_URL".into(),
            value_from: Some(EnvVarSource {
                secret_key_ref: Some(SecretKeySelector {
                    name: r.name.clone(),
                    key: r.key.clone(),
                    optional: Some(false),
                }),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    let http_probe = |path: &str, period: i32, failures: i32| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("admin".into()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        ..Default::default()
    };
    let mut mounts = vec![
        VolumeMount {
            name: "config".into(),
            mount_path: "/etc/cirrus".into(),
            read_only: Some(true),
            ..Default::default()
        },
        VolumeMount {
            name: "auth".into(),
            mount_path: "/etc/cirrus/auth".into(),
            read_only: Some(true),
            ..Default::default()
        },
    ];
    let mut volumes = vec![
        Volume {
            name: "config".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: config_map_name(b),
                ..Default::default()
            }),
            ..Default::default()
        },
        // The auth file and its user files, in one directory that the
        // kubelet updates at once. User files that do not exist (yet) are
        // left out: the auth file names those in use.
        Volume {
            name: "auth".into(),
            projected: Some(ProjectedVolumeSource {
                sources: Some(
                    std::iter::once(VolumeProjection {
                        secret: Some(SecretProjection {
                            name: auth_secret_name(b),
                            ..Default::default()
                        }),
                        ..Default::default()
                    })
                    .chain((1..=crate::auth::MAX_USER_FILES).map(|n| VolumeProjection {
                        secret: Some(SecretProjection {
                            name: user_file_secret_name(b, n),
                            items: Some(vec![KeyToPath {
                                key: USERS_KEY.into(),
                                path: crate::auth::user_file_name(n),
                                ..Default::default()
                            }]),
                            optional: Some(true),
                        }),
                        ..Default::default()
                    }))
                    .collect(),
                ),
                ..Default::default()
            }),
            ..Default::default()
        },
    ];
    if s.tls.enabled {
        mounts.push(VolumeMount {
            name: "tls".into(),
            mount_path: "/etc/cirrus/tls".into(),
            read_only: Some(true),
            ..Default::default()
        });
        volumes.push(Volume {
            name: "tls".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(
                    s.tls
                        .secret_name
                        .clone()
                        .unwrap_or_else(|| format!("{name}-tls")),
                ),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    if let (true, Some(r)) = (s.tls.enabled, &s.tls.client_ca_secret_ref) {
        mounts.push(VolumeMount {
            name: "client-ca".into(),
            mount_path: CLIENT_CA_DIR.into(),
            read_only: Some(true),
            ..Default::default()
        });
        volumes.push(Volume {
            name: "client-ca".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(r.name.clone()),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    let extra = &s.pod_template;
    env.extend(extra.env.iter().cloned());
    mounts.extend(extra.volume_mounts.iter().cloned());
    volumes.extend(extra.volumes.iter().cloned());
    let container = Container {
        name: "broker".into(),
        image: Some(s.image_or_default().to_string()),
        image_pull_policy: Some(format!("{:?}", s.image_pull_policy)),
        args: Some(vec![
            "--config".into(),
            format!("/etc/cirrus/{CONFIG_KEY}"),
            "--log-format".into(),
            "json".into(),
        ]),
        ports: Some(ports),
        env: (!env.is_empty()).then_some(env),
        resources: Some(broker_resources(s.resources.as_ref())),
        // Ready: listeners bound, Redis reachable, not draining.
        readiness_probe: Some(http_probe("/readyz", 5, 2)),
        liveness_probe: Some(http_probe("/healthz", 10, 3)),
        security_context: Some(restricted()),
        volume_mounts: Some(mounts),
        ..Default::default()
    };
    let mut annotations = BTreeMap::new();
    annotations.insert(CONFIG_HASH_ANNOTATION.to_string(), config_hash(config_yaml));
    Deployment {
        metadata: meta(b, name.clone(), labels(&name)),
        spec: DeploymentSpec {
            // With autoscaling the HPA owns the replica count.
            replicas: if s.autoscaling.is_some() {
                None
            } else {
                Some(s.replicas)
            },
            selector: LabelSelector {
                match_labels: Some(selector(&name)),
                ..Default::default()
            },
            // No old pod goes before its replacement is available.
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_unavailable: Some(IntOrString::Int(s.rollout.max_unavailable)),
                    max_surge: Some(match s.rollout.max_surge {
                        Some(n) => IntOrString::Int(n),
                        None => IntOrString::String("100%".into()),
                    }),
                }),
            }),
            // 0 is left out: the API server does not store it (omitempty),
            // and applying it would rewrite the Deployment on every pass.
            min_ready_seconds: (s.rollout.min_ready_seconds > 0)
                .then_some(s.rollout.min_ready_seconds),
            progress_deadline_seconds: Some(s.rollout.progress_deadline_seconds),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some({
                        let mut l = extra.labels.clone();
                        l.extend(labels(&name));
                        l
                    }),
                    annotations: Some({
                        let mut a = extra.annotations.clone();
                        a.extend(annotations);
                        a
                    }),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![container],
                    volumes: Some(volumes),
                    // Not-ready delay and drain deadline, plus the time to
                    // stop (the store's last writes).
                    termination_grace_period_seconds: Some(grace_period(s)),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(65532),
                        run_as_group: Some(65532),
                        fs_group: Some(65532),
                        seccomp_profile: Some(runtime_default_seccomp()),
                        ..Default::default()
                    }),
                    automount_service_account_token: Some(false),
                    node_selector: (!s.node_selector.is_empty()).then(|| s.node_selector.clone()),
                    tolerations: (!s.tolerations.is_empty()).then(|| s.tolerations.clone()),
                    affinity: s.affinity.clone(),
                    topology_spread_constraints: (!extra.topology_spread_constraints.is_empty())
                        .then(|| extra.topology_spread_constraints.clone()),
                    image_pull_secrets: (!extra.image_pull_secrets.is_empty())
                        .then(|| extra.image_pull_secrets.clone()),
                    priority_class_name: extra.priority_class_name.clone(),
                    service_account_name: extra.service_account_name.clone(),
                    ..Default::default()
                }),
            },
            ..Default::default()
        },
        ..Default::default()
    }
}

/// The managed Redis (`redis.managed`): its Deployment and Service name.
pub fn managed_redis_name(b: &MqttBroker) -> String {
    format!("{}-redis", b.name_any())
}

pub fn managed_redis_url(b: &MqttBroker) -> String {
    format!(
        "redis://{}.{}.svc:{REDIS_PORT}",
        managed_redis_name(b),
        b.namespace().unwrap_or_default()
    )
}

pub const REDIS_PORT: i32 = 6379;
pub const DEFAULT_REDIS_IMAGE: &str = "redis:7.2-alpine";

fn redis_labels(b: &MqttBroker) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), "redis".to_string()),
        ("app.kubernetes.io/instance".to_string(), b.name_any()),
        (
            "app.kubernetes.io/managed-by".to_string(),
            "cirrus-operator".to_string(),
        ),
    ])
}

fn redis_selector(b: &MqttBroker) -> BTreeMap<String, String> {
    let mut l = redis_labels(b);
    l.remove("app.kubernetes.io/managed-by");
    l
}

/// One Redis pod for development: no persistence (an emptyDir for its
/// working directory), non-root, read-only root filesystem. Recreated, not
/// rolled: two would split the brokers' state.
pub fn managed_redis_deployment(b: &MqttBroker) -> Deployment {
    let name = managed_redis_name(b);
    let tcp_probe = |period: i32| Probe {
        tcp_socket: Some(TCPSocketAction {
            port: IntOrString::String("redis".into()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        ..Default::default()
    };
    let container = Container {
        name: "redis".into(),
        image: Some(
            b.spec
                .redis
                .managed_image
                .clone()
                .unwrap_or_else(|| DEFAULT_REDIS_IMAGE.into()),
        ),
        args: Some(
            ["--save", "", "--appendonly", "no", "--protected-mode", "no"]
                .map(String::from)
                .to_vec(),
        ),
        ports: Some(vec![port("redis", REDIS_PORT)]),
        readiness_probe: Some(tcp_probe(5)),
        liveness_probe: Some(tcp_probe(10)),
        security_context: Some(restricted()),
        volume_mounts: Some(vec![VolumeMount {
            name: "data".into(),
            mount_path: "/data".into(),
            ..Default::default()
        }]),
        ..Default::default()
    };
    Deployment {
        metadata: meta(b, name, redis_labels(b)),
        spec: DeploymentSpec {
            replicas: Some(1),
            selector: LabelSelector {
                match_labels: Some(redis_selector(b)),
                ..Default::default()
            },
            strategy: Some(DeploymentStrategy {
                type_: Some("Recreate".into()),
                rolling_update: None,
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(redis_labels(b)),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![container],
                    volumes: Some(vec![Volume {
                        name: "data".into(),
                        empty_dir: Some(Default::default()),
                        ..Default::default()
                    }]),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        // The redis image's own user.
                        run_as_user: Some(999),
                        run_as_group: Some(999),
                        fs_group: Some(999),
                        seccomp_profile: Some(runtime_default_seccomp()),
                        ..Default::default()
                    }),
                    automount_service_account_token: Some(false),
                    ..Default::default()
                }),
            },
            ..Default::default()
        },
        ..Default::default()
    }
}

pub fn managed_redis_service(b: &MqttBroker) -> Service {
    Service {
        metadata: meta(b, managed_redis_name(b), redis_labels(b)),
        spec: Some(ServiceSpec {
            selector: Some(redis_selector(b)),
            ports: Some(vec![service_port("redis", REDIS_PORT)]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn service_port(name: &str, p: i32) -> ServicePort {
    ServicePort {
        name: Some(name.into()),
        port: p,
        target_port: Some(IntOrString::String(name.into())),
        protocol: Some("TCP".into()),
        ..Default::default()
    }
}

pub fn service(b: &MqttBroker) -> Service {
    let name = b.name_any();
    let s = &b.spec;
    let ports: Vec<ServicePort> = s
        .listeners
        .enabled()
        .into_iter()
        .map(|(n, p)| service_port(n, p))
        .collect();
    let mut m = meta(b, name.clone(), labels(&name));
    if !s.service.annotations.is_empty() {
        m.annotations = Some(s.service.annotations.clone());
    }
    Service {
        metadata: m,
        spec: Some(ServiceSpec {
            type_: Some(
                match s.service.type_ {
                    ServiceType::ClusterIP => "ClusterIP",
                    ServiceType::NodePort => "NodePort",
                    ServiceType::LoadBalancer => "LoadBalancer",
                }
                .into(),
            ),
            selector: Some(selector(&name)),
            ports: Some(ports),
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub fn pdb(b: &MqttBroker) -> PodDisruptionBudget {
    let name = b.name_any();
    PodDisruptionBudget {
        metadata: meta(b, name.clone(), labels(&name)),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(b.spec.max_unavailable)),
            selector: Some(LabelSelector {
                match_labels: Some(selector(&name)),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// An integer quantity in the API server's canonical form (5000 → "5k"):
/// server-side apply compares quantities as strings, so a non-canonical one
/// would be rewritten on every apply.
/// What a broker pod requests when the spec does not say: the HPA's CPU
/// utilization is a share of the CPU request (no request, no CPU scaling),
/// and the scheduler places pods by their requests.
pub const DEFAULT_CPU_REQUEST: &str = "100m";
pub const DEFAULT_MEMORY_REQUEST: &str = "128Mi";

/// The spec's `resources`, with the default request for CPU and for memory
/// where it names neither a request nor a limit (a limit alone makes
/// Kubernetes request the same).
fn broker_resources(spec: Option<&ResourceRequirements>) -> ResourceRequirements {
    let mut r = spec.cloned().unwrap_or_default();
    let limits = r.limits.clone().unwrap_or_default();
    let requests = r.requests.get_or_insert_with(BTreeMap::new);
    for (name, default) in [
        ("cpu", DEFAULT_CPU_REQUEST),
        ("memory", DEFAULT_MEMORY_REQUEST),
    ] {
        if !requests.contains_key(name) && !limits.contains_key(name) {
            requests.insert(name.into(), Quantity(default.into()));
        }
    }
    r
}

pub fn canonical_quantity(mut n: i64) -> Quantity {
    let mut suffix = 0;
    while n != 0 && n % 1000 == 0 && suffix < 6 {
        n /= 1000;
        suffix += 1;
    }
    Quantity(format!("{n}{}", ["", "k", "M", "G", "T", "P", "E"][suffix]))
}

/// Seconds Kubernetes waits after SIGTERM: the not-ready delay, the drain,
/// and 10 s to stop.
pub fn grace_period(s: &cirrus_operator_api::MqttBrokerSpec) -> i64 {
    (SHUTDOWN_DELAY_SECS + u64::from(s.drain.timeout_seconds)) as i64 + 10
}

/// None when autoscaling is off.
pub fn hpa(b: &MqttBroker) -> Option<HorizontalPodAutoscaler> {
    let a = b.spec.autoscaling.as_ref()?;
    let name = b.name_any();
    // Pods metrics before the CPU one: servers that store HPAs as
    // autoscaling/v1 hand them back in that order, and a list that comes
    // back reordered would be rewritten on every apply.
    let mut metrics = Vec::new();
    if let Some(c) = a.target_connections_per_pod {
        metrics.push(MetricSpec {
            type_: "Pods".into(),
            pods: Some(PodsMetricSource {
                metric: MetricIdentifier {
                    name: "cirrus_connections".into(),
                    selector: None,
                },
                target: MetricTarget {
                    type_: "AverageValue".into(),
                    average_value: Some(canonical_quantity(c)),
                    ..Default::default()
                },
            }),
            ..Default::default()
        });
    }
    let cpu = match (a.target_cpu_utilization, a.target_connections_per_pod) {
        (Some(c), _) => Some(c),
        (None, None) => Some(cirrus_operator_api::DEFAULT_CPU_UTILIZATION),
        (None, Some(_)) => None,
    };
    if let Some(cpu) = cpu {
        metrics.push(MetricSpec {
            type_: "Resource".into(),
            resource: Some(ResourceMetricSource {
                name: "cpu".into(),
                target: MetricTarget {
                    type_: "Utilization".into(),
                    average_utilization: Some(cpu),
                    ..Default::default()
                },
            }),
            ..Default::default()
        });
    }
    // Scale-down never outruns the drain: one pod per drain.
    let behavior = a
        .behavior
        .clone()
        .unwrap_or_else(|| HorizontalPodAutoscalerBehavior {
            scale_down: Some(HPAScalingRules {
                policies: Some(vec![HPAScalingPolicy {
                    type_: "Pods".into(),
                    value: 1,
                    period_seconds: grace_period(&b.spec) as i32 - 10,
                }]),
                select_policy: Some("Min".into()),
                stabilization_window_seconds: Some(300),
                ..Default::default()
            }),
            scale_up: None,
        });
    Some(HorizontalPodAutoscaler {
        metadata: meta(b, name.clone(), labels(&name)),
        spec: HorizontalPodAutoscalerSpec {
            scale_target_ref: CrossVersionObjectReference {
                api_version: Some("apps/v1".into()),
                kind: "Deployment".into(),
                name,
            },
            min_replicas: Some(a.min_replicas),
            max_replicas: a.max_replicas,
            metrics: Some(metrics),
            behavior: Some(behavior),
        },
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn broker(yaml: &str) -> MqttBroker {
        let mut b: MqttBroker = serde_yaml::from_str(yaml).unwrap();
        b.metadata.namespace = Some("ns".into());
        b.metadata.uid = Some("uid-1".into());
        b
    }

    /// What the "restricted" Pod Security Standard asks of a pod (the
    /// test cluster's Kubernetes 1.20 has no Pod Security admission to ask).
    fn restricted_violations(pod: &PodSpec) -> Vec<String> {
        let mut v = Vec::new();
        let psc = pod.security_context.clone().unwrap_or_default();
        for c in &pod.containers {
            let sc = c.security_context.clone().unwrap_or_default();
            if sc.allow_privilege_escalation != Some(false) {
                v.push(format!("{}: allowPrivilegeEscalation", c.name));
            }
            if sc.run_as_non_root.or(psc.run_as_non_root) != Some(true) {
                v.push(format!("{}: runAsNonRoot", c.name));
            }
            let drops = sc.capabilities.as_ref().and_then(|c| c.drop.clone());
            if !drops.unwrap_or_default().iter().any(|d| d == "ALL") {
                v.push(format!("{}: capabilities.drop ALL", c.name));
            }
            let adds = sc.capabilities.as_ref().and_then(|c| c.add.clone());
            if adds
                .unwrap_or_default()
                .iter()
                .any(|a| a != "NET_BIND_SERVICE")
            {
                v.push(format!("{}: capabilities.add", c.name));
            }
            let seccomp = sc.seccomp_profile.or(psc.seccomp_profile.clone());
            if !seccomp.is_some_and(|p| p.type_ == "RuntimeDefault" || p.type_ == "Localhost") {
                v.push(format!("{}: seccompProfile", c.name));
            }
            if sc.privileged == Some(true) {
                v.push(format!("{}: privileged", c.name));
            }
        }
        for vol in pod.volumes.clone().unwrap_or_default() {
            if vol.host_path.is_some() {
                v.push(format!("volume {}: hostPath", vol.name));
            }
        }
        if pod.host_network == Some(true)
            || pod.host_pid == Some(true)
            || pod.host_ipc == Some(true)
        {
            v.push("host namespaces".into());
        }
        v
    }

    #[test]
    fn broker_and_managed_redis_pods_meet_the_restricted_pod_security_standard() {
        let b = broker("apiVersion: mqtt.cirrus.dev/v1alpha1\nkind: MqttBroker\nmetadata: {name: r}\nspec: {redis: {managed: true}, listeners: {mqtt: 1883, mqtts: 8883}, tls: {enabled: true}}\n");
        for d in [deployment(&b, ""), managed_redis_deployment(&b)] {
            let pod = d.spec.template.spec.unwrap();
            assert_eq!(restricted_violations(&pod), Vec::<String>::new());
        }
        // The check itself finds what is missing.
        let mut pod = deployment(&b, "").spec.template.spec.unwrap();
        pod.security_context = None;
        assert!(!restricted_violations(&pod).is_empty());
    }

    #[test]
    fn no_image_means_the_operators_own_version() {
        let b = broker("apiVersion: mqtt.cirrus.dev/v1alpha1\nkind: MqttBroker\nmetadata: {name: v}\nspec: {}\n");
        let image = |b: &MqttBroker| {
            deployment(b, "").spec.template.spec.unwrap().containers[0]
                .image
                .clone()
        };
        assert_eq!(
            image(&b).as_deref(),
            Some(concat!(
                "ghcr.io/cirrus-mqtt/cirrus-broker:",
                env!("CARGO_PKG_VERSION")
            ))
        );
        // Nothing is written back into the spec (so nothing pins it).
        assert!(serde_json::to_value(&b.spec)
            .unwrap()
            .get("image")
            .is_none());
        let pinned = broker("apiVersion: mqtt.cirrus.dev/v1alpha1\nkind: MqttBroker\nmetadata: {name: v}\nspec: {image: 'example.com/b:1'}\n");
        assert_eq!(image(&pinned).as_deref(), Some("example.com/b:1"));
    }

    #[test]
    fn a_tls_only_broker_has_no_plain_port_anywhere() {
        let b = broker("apiVersion: mqtt.cirrus.dev/v1alpha1\nkind: MqttBroker\nmetadata: {name: t}\nspec: {listeners: {mqtt: 0, mqtts: 8883}, tls: {enabled: true}, service: {type: LoadBalancer}}\n");
        let c = broker_config(&b);
        assert!(c.listeners.tcp.is_none());
        assert_eq!(c.listeners.tls.unwrap().port(), 8883);
        let svc = service(&b).spec.unwrap().ports.unwrap();
        let names: Vec<_> = svc.iter().filter_map(|p| p.name.clone()).collect();
        assert_eq!(names, ["mqtts"]);
        let d = deployment(&b, "");
        let ports = d.spec.template.spec.unwrap().containers[0]
            .ports
            .clone()
            .unwrap();
        assert!(ports.iter().all(|p| p.container_port != 1883), "{ports:?}");
    }

    #[test]
    fn wss_a_client_ca_and_the_revision_reach_the_config_the_pods_and_the_service() {
        let b = broker("apiVersion: mqtt.cirrus.dev/v1alpha1\nkind: MqttBroker\nmetadata: {name: w}\nspec: {listeners: {mqtts: 8883, wss: 8884}, tls: {enabled: true, clientCaSecretRef: {name: cas, key: bundle.pem}, certAsUsername: true}}\n");
        let c = broker_config(&b);
        assert_eq!(c.listeners.wss.unwrap().port(), 8884);
        assert_eq!(
            c.tls.client_ca_file.as_deref(),
            Some(std::path::Path::new("/etc/cirrus/client-ca/bundle.pem"))
        );
        assert!(c.tls.cert_as_username);
        let svc = service(&b).spec.unwrap().ports.unwrap();
        let names: Vec<_> = svc.iter().filter_map(|p| p.name.clone()).collect();
        assert_eq!(names, ["mqtt", "mqtts", "wss"]);
        let pod = deployment(&b, "").spec.template.spec.unwrap();
        let vol = pod
            .volumes
            .unwrap()
            .into_iter()
            .find(|v| v.name == "client-ca")
            .unwrap();
        assert_eq!(vol.secret.unwrap().secret_name.as_deref(), Some("cas"));
        let container = &pod.containers[0];
        let mount = container
            .volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .find(|m| m.name == "client-ca")
            .unwrap();
        assert_eq!(mount.mount_path, "/etc/cirrus/client-ca");
        // The pod's revision, for rollouts that move each client once.
        let rev = container
            .env
            .as_ref()
            .unwrap()
            .iter()
            .find(|e| e.name == "CIRRUS_REVISION")
            .unwrap();
        assert_eq!(
            rev.value_from
                .as_ref()
                .unwrap()
                .field_ref
                .as_ref()
                .unwrap()
                .field_path,
            "metadata.labels['pod-template-hash']"
        );
        // Without TLS there is no wss and no client CA.
        let plain = broker("apiVersion: mqtt.cirrus.dev/v1alpha1\nkind: MqttBroker\nmetadata: {name: p}\nspec: {listeners: {wss: 8884}}\n");
        let c = broker_config(&plain);
        assert!(c.listeners.wss.is_none() && c.tls.client_ca_file.is_none());
    }

    #[test]
    fn the_pod_template_additions_reach_the_pods_and_the_operators_own_win() {
        let b = broker(
            r#"
apiVersion: mqtt.cirrus.dev/v1alpha1
kind: MqttBroker
metadata: {name: t}
spec:
  podTemplate:
    labels: {team: iot, app.kubernetes.io/instance: hijack}
    annotations: {example.com/scrape: "yes"}
    topologySpreadConstraints:
      - {maxSkew: 1, topologyKey: topology.kubernetes.io/zone, whenUnsatisfiable: ScheduleAnyway,
         labelSelector: {matchLabels: {app.kubernetes.io/instance: t}}}
    imagePullSecrets: [{name: registry}]
    priorityClassName: mqtt-critical
    serviceAccountName: broker-sa
    env: [{name: TZ, value: UTC}]
    volumes: [{name: extra-ca, configMap: {name: cas}}]
    volumeMounts: [{name: extra-ca, mountPath: /etc/extra-ca, readOnly: true}]
"#,
        );
        let t = deployment(&b, "").spec.template;
        let meta = t.metadata.unwrap();
        let labels = meta.labels.unwrap();
        assert_eq!(labels["team"], "iot");
        // The selector's labels stay the operator's.
        assert_eq!(labels["app.kubernetes.io/instance"], "t");
        let annotations = meta.annotations.unwrap();
        assert_eq!(annotations["example.com/scrape"], "yes");
        assert!(annotations.contains_key(CONFIG_HASH_ANNOTATION));
        let pod = t.spec.unwrap();
        assert_eq!(pod.topology_spread_constraints.unwrap()[0].max_skew, 1);
        assert_eq!(pod.image_pull_secrets.unwrap()[0].name, "registry");
        assert_eq!(pod.priority_class_name.as_deref(), Some("mqtt-critical"));
        assert_eq!(pod.service_account_name.as_deref(), Some("broker-sa"));
        assert_eq!(pod.automount_service_account_token, Some(false));
        assert!(pod.volumes.unwrap().iter().any(|v| v.name == "extra-ca"));
        let c = &pod.containers[0];
        assert!(c.env.as_ref().unwrap().iter().any(|e| e.name == "TZ"));
        assert!(c
            .volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .any(|m| m.mount_path == "/etc/extra-ca"));
        // Without additions, nothing of them appears.
        let plain = deployment(&broker("apiVersion: mqtt.cirrus.dev/v1alpha1\nkind: MqttBroker\nmetadata: {name: p}\nspec: {}\n"), "")
            .spec
            .template
            .spec
            .unwrap();
        assert!(plain.topology_spread_constraints.is_none() && plain.priority_class_name.is_none());
    }

    #[test]
    fn the_rollout_spec_reaches_the_deployment_strategy() {
        let strategy = |spec: &str| {
            let b = broker(&format!("apiVersion: mqtt.cirrus.dev/v1alpha1\nkind: MqttBroker\nmetadata: {{name: r}}\nspec: {spec}\n"));
            let d = deployment(&b, "").spec;
            let ru = d.strategy.unwrap().rolling_update.unwrap();
            (ru.max_surge, ru.max_unavailable, d.min_ready_seconds)
        };
        // By default every new pod at once, never fewer than desired.
        assert_eq!(
            strategy("{}"),
            (
                Some(IntOrString::String("100%".into())),
                Some(IntOrString::Int(0)),
                None
            )
        );
        assert_eq!(
            strategy("{rollout: {maxSurge: 2, maxUnavailable: 1, minReadySeconds: 5}}"),
            (
                Some(IntOrString::Int(2)),
                Some(IntOrString::Int(1)),
                Some(5)
            )
        );
    }

    #[test]
    fn resources_keep_what_the_spec_says_and_request_the_rest() {
        let q = |v: &str| Quantity(v.into());
        let spec = ResourceRequirements {
            requests: Some([("cpu".to_string(), q("2"))].into()),
            limits: Some([("memory".to_string(), q("1Gi"))].into()),
            ..Default::default()
        };
        let r = broker_resources(Some(&spec));
        // The CPU request as given; memory requested by its limit.
        assert_eq!(r.requests, Some([("cpu".to_string(), q("2"))].into()));
        assert_eq!(r.limits, spec.limits);
        let r = broker_resources(None);
        assert_eq!(
            r.requests,
            Some(
                [
                    ("cpu".to_string(), q(DEFAULT_CPU_REQUEST)),
                    ("memory".to_string(), q(DEFAULT_MEMORY_REQUEST))
                ]
                .into()
            )
        );
    }

    #[test]
    fn defaults_give_a_working_single_pod() {
        let b = broker("apiVersion: mqtt.cirrus.dev/v1alpha1\nkind: MqttBroker\nmetadata: {name: dev}\nspec: {}\n");
        let yaml = serde_yaml::to_string(&broker_config(&b)).unwrap();
        let c = Config::from_yaml(&yaml).unwrap();
        c.validate().unwrap();
        assert_eq!(c.listeners.tcp.unwrap().port(), 1883);
        let d = deployment(&b, &yaml);
        let spec = d.spec;
        assert_eq!(spec.replicas, Some(1));
        let pod = spec.template.spec.unwrap();
        let c0 = &pod.containers[0];
        let sc = c0.security_context.as_ref().unwrap();
        assert_eq!(
            (sc.run_as_non_root, sc.read_only_root_filesystem),
            (Some(true), Some(true))
        );
        assert!(pod.termination_grace_period_seconds.unwrap() > (SHUTDOWN_DELAY_SECS + 30) as i64);
        // The drain is paced and tells MQTT 5 clients to go elsewhere.
        assert_eq!(c.drain.connections_per_sec, 200);
        assert_eq!(c.drain.reason, cirrus_config::DrainReason::UseAnotherServer);
        assert_eq!(c.shutdown_timeout_secs, 30);
        let c = &pod.containers[0];
        // CPU utilization needs a request: the default sets one.
        let requests = c.resources.as_ref().unwrap().requests.clone().unwrap();
        assert_eq!(requests["cpu"].0, DEFAULT_CPU_REQUEST);
        assert_eq!(requests["memory"].0, DEFAULT_MEMORY_REQUEST);
        let ready = c
            .readiness_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap();
        assert_eq!(ready.path.as_deref(), Some("/readyz"));
        assert_eq!(ready.port, IntOrString::String("admin".into()));
        assert!(c
            .ports
            .as_ref()
            .unwrap()
            .iter()
            .any(|p| p.name.as_deref() == Some("admin") && p.container_port == 9090));
        let cfg = broker_config(&b);
        assert_eq!(cfg.listeners.admin.map(|a| a.port()), Some(ADMIN_PORT));
        assert!(hpa(&b).is_none());
        let owner = d.metadata.owner_references.unwrap();
        assert_eq!(owner[0].controller, Some(true));
        assert_eq!(owner[0].kind, "MqttBroker");
    }

    #[test]
    fn replicated_durability_reaches_the_broker_config() {
        let b = broker("apiVersion: mqtt.cirrus.dev/v1alpha1\nkind: MqttBroker\nmetadata: {name: x}\nspec: {redis: {url: 'redis://r:6379', durability: Replicated, waitReplicas: 2}}\n");
        let yaml = serde_yaml::to_string(&broker_config(&b)).unwrap();
        let c = Config::from_yaml(&yaml).unwrap();
        c.validate().unwrap();
        assert_eq!(
            c.redis.durability,
            cirrus_config::broker::Durability::Replicated
        );
        assert_eq!((c.redis.replicas, c.redis.wait_timeout_ms), (2, 1000));
    }

    #[test]
    fn config_change_changes_the_pod_template_hash() {
        let b = broker("apiVersion: mqtt.cirrus.dev/v1alpha1\nkind: MqttBroker\nmetadata: {name: x}\nspec: {limits: {maxInflight: 7}}\n");
        let y1 = serde_yaml::to_string(&broker_config(&b)).unwrap();
        assert!(y1.contains("max_inflight: 7"));
        let mut b2 = b.clone();
        b2.spec.limits.max_inflight = Some(8);
        let y2 = serde_yaml::to_string(&broker_config(&b2)).unwrap();
        let a = |d: Deployment| {
            d.spec.template.metadata.unwrap().annotations.unwrap()[CONFIG_HASH_ANNOTATION].clone()
        };
        assert_ne!(a(deployment(&b, &y1)), a(deployment(&b2, &y2)));
        assert_eq!(a(deployment(&b, &y1)), a(deployment(&b, &y1)));
    }

    #[test]
    fn quantities_are_canonical() {
        let q = |n| canonical_quantity(n).0;
        assert_eq!(
            (q(5000), q(1500), q(0), q(2_000_000), q(7)),
            (
                "5k".into(),
                "1500".into(),
                "0".into(),
                "2M".into(),
                "7".into()
            )
        );
    }

    #[test]
    fn autoscaling_hands_replicas_to_the_hpa() {
        let b = broker(
            "apiVersion: mqtt.cirrus.dev/v1alpha1\nkind: MqttBroker\nmetadata: {name: p}\nspec:\n  autoscaling: {minReplicas: 2, maxReplicas: 5, targetConnectionsPerPod: 1000}\n  listeners: {mqtt: 1883, mqtts: 8883}\n",
        );
        assert_eq!(deployment(&b, "").spec.replicas, None);
        let h = hpa(&b).unwrap().spec;
        assert_eq!((h.min_replicas, h.max_replicas), (Some(2), 5));
        // Connections only: a CPU target would need metrics-server, and a
        // missing metric stops the HPA from scaling down.
        assert_eq!(h.metrics.unwrap().len(), 1);
        let down = h.behavior.unwrap().scale_down.unwrap();
        let p = &down.policies.unwrap()[0];
        assert_eq!(
            (p.type_.as_str(), p.value, p.period_seconds),
            ("Pods", 1, 35)
        );
        let ports = service(&b).spec.unwrap().ports.unwrap();
        assert_eq!(
            ports.iter().map(|p| p.port).collect::<Vec<_>>(),
            vec![1883, 8883]
        );
        assert!(ports.iter().all(|p| p.protocol.as_deref() == Some("TCP")));
    }
}
