//! The MqttBroker controller.

use std::collections::HashMap;
use std::sync::Arc;

use cirrus_config::auth::{AuthFile, User};
use cirrus_operator_api::{set_condition, MqttBroker, MqttUser};
use futures_util::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::NamespaceResourceScope;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tracing::{info, instrument, warn};

use crate::cert_manager;
use crate::metrics::Kind;
use crate::resources::{self, AUTH_KEY};
use crate::tls;
use crate::{auth, health, Context, Error, FIELD_MANAGER};

pub async fn run(ctx: Arc<Context>, shutdown: CancellationToken, wake: Arc<crate::caches::Wake>) {
    let cfg = watcher::Config::default();
    // The children carry the operator's label: only they are watched.
    let owned = watcher::Config::default().labels(resources::OWNED_SELECTOR);
    Controller::new(ctx.scoped::<MqttBroker>(), cfg)
        .owns(ctx.scoped::<Deployment>(), owned.clone())
        .owns(ctx.scoped::<ConfigMap>(), owned.clone())
        .owns(ctx.scoped::<Service>(), owned.clone())
        .owns(ctx.scoped::<HorizontalPodAutoscaler>(), owned.clone())
        .owns(ctx.scoped::<PodDisruptionBudget>(), owned)
        // Secrets: the broker's own (auth, TLS) and those its spec or its
        // users name (Redis URL, client CA, passwords), so that a change
        // there is seen at once, not at the next resync.
        // Users and Secrets: the brokers their watches (the caches') say
        // they matter to.
        .reconcile_on(wake.stream(shutdown.clone()))
        .graceful_shutdown_on(async move { shutdown.cancelled().await })
        .run(
            |b, ctx| async move { crate::timed(&ctx.clone(), Kind::Broker, reconcile(b, ctx)).await },
            error_policy,
            ctx,
        )
        .for_each(|r| async move {
            if let Err(e) = r {
                warn!(error = %e, "broker reconcile failed");
            }
        })
        .await;
}

/// Whether `s` is one of a broker's auth files as this process last wrote
/// it: the watch bringing back its own write wakes nobody.
pub(crate) fn own_auth_write(ctx: &Context, s: &Secret) -> bool {
    let (Some(ns), Some(rv)) = (s.namespace(), s.metadata.resource_version.as_deref()) else {
        return false;
    };
    let name = s.name_any();
    let Some(owner) = s
        .owner_references()
        .iter()
        .find(|o| o.kind == "MqttBroker")
        .map(|o| o.name.as_str())
    else {
        return false;
    };
    let n = if name == format!("{owner}-auth") {
        Some(0)
    } else {
        name.strip_prefix(&format!("{owner}-auth-"))
            .and_then(|x| x.parse::<usize>().ok())
    };
    let Some(n) = n else { return false };
    ctx.auth_written
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .get(&format!("{ns}/{owner}"))
        .and_then(|w| w.files.get(&n))
        .is_some_and(|(v, _)| v == rv)
}

/// The brokers a Secret matters to: its owner, brokers whose spec names it,
/// and the brokers of users whose password it holds (generated for the
/// user that owns it, looked up by name; or named by users, looked for
/// only when no user owns the Secret).
pub(crate) fn secret_readers(
    s: &Secret,
    brokers: &reflector::Store<MqttBroker>,
    users: &reflector::Store<MqttUser>,
) -> Vec<ObjectRef<MqttBroker>> {
    let Some(ns) = s.namespace() else {
        return Vec::new();
    };
    let name = s.name_any();
    let mut out: Vec<ObjectRef<MqttBroker>> = s
        .owner_references()
        .iter()
        .filter(|o| o.kind == "MqttBroker")
        .map(|o| ObjectRef::new(&o.name).within(&ns))
        .collect();
    let named = |b: &MqttBroker| {
        let t = &b.spec.tls;
        [
            b.spec.redis.url_secret_ref.as_ref().map(|r| &r.name),
            t.client_ca_secret_ref.as_ref().map(|r| &r.name),
            t.secret_name.as_ref(),
        ]
        .into_iter()
        .flatten()
        .any(|n| *n == name)
    };
    out.extend(
        brokers
            .state_filter(|b| b.namespace().as_deref() == Some(&ns) && named(b))
            .iter()
            .map(|b| ObjectRef::from_obj(&**b)),
    );
    let owner_users: Vec<&str> = s
        .owner_references()
        .iter()
        .filter(|o| o.kind == "MqttUser")
        .map(|o| o.name.as_str())
        .collect();
    if owner_users.is_empty() {
        out.extend(
            users
                .state_filter(|u| {
                    u.namespace().as_deref() == Some(&ns)
                        && u.spec
                            .password_secret_ref
                            .as_ref()
                            .is_some_and(|r| r.name == name)
                })
                .iter()
                .map(|u| ObjectRef::new(&u.spec.broker_ref).within(&ns)),
        );
    } else {
        out.extend(owner_users.iter().filter_map(|n| {
            users
                .get(&ObjectRef::new(n).within(&ns))
                .map(|u| ObjectRef::new(&u.spec.broker_ref).within(&ns))
        }));
    }
    out
}

/// Retry a failed reconcile after a backoff that doubles with each failure
/// in a row, from a start and up to a ceiling by the error's class.
fn error_policy(b: Arc<MqttBroker>, e: &Error, ctx: Arc<Context>) -> Action {
    let n = ctx.failed(&backoff_key(&b));
    let delay = e.class().backoff(n, ctx.retry_delay());
    warn!(broker = %b.name_any(), error = %e, label = e.metric_label(), failures = n, retry_in = ?delay, "reconcile error; retrying");
    Action::requeue(delay)
}

pub(crate) async fn apply<K>(client: &kube::Client, ns: &str, obj: &K) -> Result<K, Error>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + Serialize
        + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    let name = obj.meta().name.clone().unwrap_or_default();
    Ok(api
        .patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(obj),
        )
        .await?)
}

/// The field manager that keeps a Deployment's replicas while autoscaling
/// takes them over from the operator's own apply.
const HANDOVER_MANAGER: &str = "cirrus-operator-handover";

/// With autoscaling on, the operator's apply has no `replicas` (the HPA
/// owns them). A field the last apply set and this one leaves out is
/// removed by server-side apply, and the Deployment would fall back to 1
/// pod: so while the operator's manager still owns `spec.replicas`, the
/// current count (within the autoscaling bounds) is first applied by a
/// second manager, which keeps it until the HPA changes it.
async fn hand_replicas_over(
    client: &kube::Client,
    ns: &str,
    name: &str,
    a: &cirrus_operator_api::Autoscaling,
) -> Result<(), Error> {
    let api: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let Some(d) = api.get_opt(name).await? else {
        return Ok(());
    };
    let ours = d.metadata.managed_fields.iter().flatten().any(|m| {
        m.manager.as_deref() == Some(FIELD_MANAGER)
            && m.operation.as_deref() == Some("Apply")
            && m.fields_v1
                .as_ref()
                .is_some_and(|f| f.0.pointer("/f:spec/f:replicas").is_some())
    });
    if !ours {
        return Ok(());
    }
    let current = d.spec.replicas.unwrap_or(1);
    let keep = current.clamp(a.min_replicas, a.max_replicas.max(a.min_replicas));
    let patch = serde_json::json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {"replicas": keep},
    });
    api.patch(
        name,
        &PatchParams::apply(HANDOVER_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}

pub(crate) fn condition(
    type_: &str,
    ok: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
) -> Condition {
    Condition {
        type_: type_.into(),
        status: if ok { "True" } else { "False" }.into(),
        reason: reason.into(),
        message,
        observed_generation: generation,
        last_transition_time: Time(k8s_openapi::jiff::Timestamp::now()),
    }
}

fn backoff_key(b: &MqttBroker) -> String {
    format!(
        "MqttBroker/{}/{}",
        b.namespace().unwrap_or_default(),
        b.name_any()
    )
}

/// One reconcile; a failure only the user can fix (a quota, an object the
/// API server refuses, missing permissions) becomes `Ready=False` with the
/// API server's message and a Warning event, and is retried with a backoff
/// by its class (`error_policy`).
#[instrument(skip_all, fields(broker = %b.name_any(), namespace = b.namespace().unwrap_or_default()))]
pub async fn reconcile(b: Arc<MqttBroker>, ctx: Arc<Context>) -> Result<Action, Error> {
    let result = reconcile_children(b.clone(), ctx.clone()).await;
    match &result {
        Ok(_) => ctx.succeeded(&backoff_key(&b)),
        Err(e) => {
            if let Some(reason) = e.class().reason() {
                let msg = e.user_message();
                let api: Api<MqttBroker> =
                    Api::namespaced(ctx.client.clone(), &b.namespace().unwrap_or_default());
                let mut status = b.status.clone().unwrap_or_default();
                let generation = b.metadata.generation;
                if set_condition(
                    &mut status.conditions,
                    condition("Ready", false, reason, msg.clone(), generation),
                ) {
                    publish(&ctx, &*b, EventType::Warning, reason, msg).await;
                }
                if let Err(w) = crate::write_status(&api, &*b, b.status.as_ref(), status).await {
                    warn!(error = %w, "could not write the failure into the status");
                }
            }
        }
    }
    result
}

async fn reconcile_children(b: Arc<MqttBroker>, ctx: Arc<Context>) -> Result<Action, Error> {
    let client = &ctx.client;
    let ns = b.namespace().unwrap_or_default();
    let name = b.name_any();
    let api: Api<MqttBroker> = Api::namespaced(client.clone(), &ns);
    let generation = b.metadata.generation;
    let mut status = b.status.clone().unwrap_or_default();

    if let Some(msg) = invalid_spec(&b) {
        if set_condition(
            &mut status.conditions,
            condition("Ready", false, "InvalidSpec", msg.clone(), generation),
        ) {
            publish(&ctx, &*b, EventType::Warning, "InvalidSpec", msg).await;
        }
        status.observed_generation = generation;
        crate::write_status(&api, &*b, b.status.as_ref(), status).await?;
        // Nothing to retry until the spec changes.
        return Ok(Action::await_change());
    }

    // Another Redis for running pods would split the broker: refused until
    // no pod runs (or the annotation says the new URL is the same Redis).
    let redis = redis_identity(&b);
    if let Some(msg) = refused_redis_change(&b, &redis) {
        if set_condition(
            &mut status.conditions,
            condition(
                "Ready",
                false,
                "RedisChangeRefused",
                msg.clone(),
                generation,
            ),
        ) {
            publish(&ctx, &*b, EventType::Warning, "RedisChangeRefused", msg).await;
        }
        status.observed_generation = generation;
        crate::write_status(&api, &*b, b.status.as_ref(), status).await?;
        return Ok(Action::requeue(ctx.resync));
    }
    status.redis = Some(redis);

    let config_yaml = serde_yaml::to_string(&resources::broker_config(&b))
        .map_err(|_| Error::Serialize("broker config".into()))?;
    apply(client, &ns, &resources::config_map(&b, &config_yaml)).await?;

    // A Certificate of cert-manager's that the spec no longer asks for is
    // deleted, or cert-manager would go on writing the Secret.
    if b.spec.tls.issuer_ref.is_none() && had_cert_manager(&b) {
        cert_manager::remove(client, &b, &ns).await?;
    }
    let tls_wait = if b.spec.tls.enabled {
        ensure_tls(&ctx, &b, &ns, &mut status, generation).await?
    } else {
        status.certificate_expiry = None;
        status.conditions.retain(|c| c.type_ != "TLSReady");
        ctx.resync
    };

    let plan = plan_auth(&ctx, &b, &ns).await?;
    let auth_wait = write_auth(&ctx, &b, &ns, &plan).await?;
    let overlap_end = plan.next_end;
    let auth_ok = plan.left_out.is_empty();
    let auth_msg = if auth_ok {
        format!("{} users in {} files", plan.users, plan.user_files + 1)
    } else {
        format!(
            "{} users do not fit in the {} auth files (the first: {:?}); {} users are in",
            plan.left_out.len(),
            auth::MAX_USER_FILES + 1,
            plan.left_out[0],
            plan.users
        )
    };
    let was_auth_ok = !status
        .conditions
        .iter()
        .any(|c| c.type_ == "AuthReady" && c.status == "False");
    set_condition(
        &mut status.conditions,
        condition(
            "AuthReady",
            auth_ok,
            if auth_ok {
                "Configured"
            } else {
                "TooManyUsers"
            },
            auth_msg.clone(),
            generation,
        ),
    );
    if !auth_ok && was_auth_ok {
        publish(&ctx, &*b, EventType::Warning, "TooManyUsers", auth_msg).await;
    }

    if let Some(a) = &b.spec.autoscaling {
        hand_replicas_over(client, &ns, &name, a).await?;
    }
    let mut wanted = resources::deployment(&b, &config_yaml);
    if let Some(r) = &b.spec.redis.url_secret_ref {
        let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
        let version = secrets
            .get_opt(&r.name)
            .await?
            .map_or_else(String::new, |s| {
                format!(
                    "{}/{}",
                    s.metadata.uid.unwrap_or_default(),
                    s.metadata.resource_version.unwrap_or_default()
                )
            });
        resources::set_redis_secret_version(&mut wanted, &version);
    }
    let deployment = apply(client, &ns, &wanted).await?;
    let service = apply(client, &ns, &resources::service(&b)).await?;
    apply(client, &ns, &resources::pdb(&b)).await?;
    match resources::hpa(&b) {
        Some(h) => {
            apply(client, &ns, &h).await?;
        }
        // Autoscaling turned off: the HPA goes.
        None => remove_child::<HorizontalPodAutoscaler>(client, &ns, &name, &b).await?,
    }
    let redis_available = if b.spec.redis.managed {
        let d = apply(client, &ns, &resources::managed_redis_deployment(&b)).await?;
        apply(client, &ns, &resources::managed_redis_service(&b)).await?;
        Some(d.status.and_then(|s| s.available_replicas).unwrap_or(0) > 0)
    } else {
        let redis = resources::managed_redis_name(&b);
        remove_child::<Deployment>(client, &ns, &redis, &b).await?;
        remove_child::<Service>(client, &ns, &redis, &b).await?;
        None
    };

    // Honest readiness: the rollout as the Deployment controller reports it.
    let desired = match (&b.spec.autoscaling, deployment.spec.replicas) {
        (_, Some(r)) => r,
        (Some(a), None) => a.min_replicas,
        (None, None) => b.spec.replicas,
    };
    let health = health::of(&deployment, desired, redis_available);
    let ds = deployment.status.unwrap_or_default();
    status.replicas = ds.replicas.unwrap_or(0);
    status.ready_replicas = ds.ready_replicas.unwrap_or(0);
    status.observed_generation = generation;
    status.auth_secret = Some(resources::auth_secret_name(&b));
    let host = format!("{name}.{ns}.svc");
    status.endpoints.clear();
    for (listener, p) in b.spec.listeners.enabled() {
        let url = |h: &str| match listener {
            "websocket" => format!("ws://{h}:{p}/mqtt"),
            "wss" => format!("wss://{h}:{p}/mqtt"),
            _ => format!("{h}:{p}"),
        };
        let address = url(&host);
        status.endpoints.insert(listener.into(), address);
        // What clients outside the cluster dial: the LoadBalancer's
        // address, once it has one.
        if let Some(a) = lb_addresses(&service).first() {
            status
                .endpoints
                .insert(format!("{listener}-external"), url(a));
        }
    }
    // The first listener that is on: plain MQTT, else MQTT over TLS.
    status.endpoint = b
        .spec
        .listeners
        .enabled()
        .first()
        .map(|(_, p)| format!("{host}:{p}"));
    status.updated_replicas = health.updated;
    let was = |t: &str| {
        status
            .conditions
            .iter()
            .any(|c| c.type_ == t && c.status == "True")
    };
    let (was_ready, was_degraded) = (was("Ready"), was("Degraded"));
    for (t, c) in [
        ("Ready", &health.ready),
        ("Progressing", &health.progressing),
        ("Degraded", &health.degraded),
    ] {
        set_condition(
            &mut status.conditions,
            condition(t, c.ok, c.reason, c.message.clone(), generation),
        );
    }
    if health.ready.ok && !was_ready {
        publish(
            &ctx,
            &*b,
            EventType::Normal,
            "Ready",
            health.ready.message.clone(),
        )
        .await;
    }
    if health.degraded.ok && !was_degraded {
        publish(
            &ctx,
            &*b,
            EventType::Warning,
            health.degraded.reason,
            health.degraded.message.clone(),
        )
        .await;
    }
    crate::write_status(&api, &*b, b.status.as_ref(), status).await?;
    info!("reconciled");
    // A password overlap that ends: the old hash leaves the auth file then.
    let overlap_wait = overlap_end.map_or(ctx.resync, |end| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        std::time::Duration::from_secs(end.saturating_sub(now) + 1)
    });
    let auth_wait = auth_wait.unwrap_or(ctx.resync);
    Ok(Action::requeue(
        ctx.resync.min(tls_wait).min(overlap_wait).min(auth_wait),
    ))
}

/// Set to `true` on a broker whose new `redis` is the same Redis under
/// another name (a renamed Service, a new password): the pods roll onto it
/// while running.
pub const SAME_REDIS_ANNOTATION: &str = "mqtt.cirrus.dev/same-redis";

/// Which Redis the spec names, without credentials.
pub fn redis_identity(b: &MqttBroker) -> String {
    let r = &b.spec.redis;
    if r.managed {
        return "managed".into();
    }
    if let Some(s) = &r.url_secret_ref {
        return format!("secret:{}/{}", s.name, s.key);
    }
    match &r.url {
        Some(url) => {
            let hosts: Vec<String> = url
                .split(',')
                .map(|u| {
                    let u = u.trim();
                    let (scheme, rest) = u.split_once("://").unwrap_or(("", u));
                    // Only the host part: no user, password, or path.
                    let authority = rest.split('/').next().unwrap_or(rest);
                    let host = authority.rsplit_once('@').map_or(authority, |x| x.1);
                    format!("{scheme}://{host}")
                })
                .collect();
            format!("url:{}", hosts.join(","))
        }
        None => "memory".into(),
    }
}

/// Why the spec's Redis is refused: the pods run on another one.
fn refused_redis_change(b: &MqttBroker, wanted: &str) -> Option<String> {
    let st = b.status.as_ref()?;
    let running = st.redis.as_deref()?;
    if running == wanted
        || st.replicas == 0
        || b.annotations()
            .get(SAME_REDIS_ANNOTATION)
            .map(String::as_str)
            == Some("true")
    {
        return None;
    }
    Some(format!(
        "spec.redis names another Redis ({wanted}) than the {} running pods use ({running}): \
         moving them would split the broker in two; scale it to 0 first (replicas: 0, \
         autoscaling off) and change it then, or annotate the broker \
         {SAME_REDIS_ANNOTATION}=true if it is the same Redis under another name",
        st.replicas
    ))
}

/// Why a spec cannot be reconciled, when the schema could not say it.
fn invalid_spec(b: &MqttBroker) -> Option<String> {
    let s = &b.spec;
    if let Some(f) = auth::invalid_acl_filter(&s.anonymous_acl) {
        return Some(format!("anonymousAcl: {f:?} is not a valid topic filter"));
    }
    if let Some(a) = &s.autoscaling {
        if a.min_replicas > a.max_replicas {
            return Some(format!(
                "autoscaling.minReplicas ({}) is above maxReplicas ({})",
                a.min_replicas, a.max_replicas
            ));
        }
    }
    if s.listeners.mqtts.is_some() && !s.tls.enabled {
        return Some("listeners.mqtts needs tls.enabled".into());
    }
    if s.listeners.wss.is_some() && !s.tls.enabled {
        return Some("listeners.wss needs tls.enabled".into());
    }
    if s.tls.client_ca_secret_ref.is_some() && !s.tls.enabled {
        return Some("tls.clientCaSecretRef needs tls.enabled".into());
    }
    if s.tls.issuer_ref.is_some() && !s.tls.enabled {
        return Some("tls.issuerRef needs tls.enabled".into());
    }
    if s.tls.issuer_ref.is_some() && s.tls.secret_name.is_some() {
        return Some("give tls.secretName or tls.issuerRef, not both".into());
    }
    if s.tls.cert_as_username && s.tls.client_ca_secret_ref.is_none() {
        return Some("tls.certAsUsername needs tls.clientCaSecretRef".into());
    }
    if s.listeners.enabled().is_empty() {
        return Some(
            "no listener is on (listeners.mqtt is 0 and neither mqtts nor websocket is set)".into(),
        );
    }
    if let Some(n) = s.tls.extra_sans.iter().find(|n| !tls::valid_san(n)) {
        return Some(format!(
            "tls.extraSans: {n:?} is neither a DNS name nor an IP address"
        ));
    }
    if let Some(v) = s
        .pod_template
        .volumes
        .iter()
        .find(|v| resources::OWN_VOLUMES.contains(&v.name.as_str()))
    {
        return Some(format!(
            "podTemplate.volumes: {:?} is a volume of the operator's own",
            v.name
        ));
    }
    let r = &s.redis;
    if r.managed && (r.url.is_some() || r.url_secret_ref.is_some()) {
        return Some("redis.managed and a Redis URL exclude each other".into());
    }
    if r.managed && r.cluster {
        return Some("the managed Redis is one server, not a Redis Cluster".into());
    }
    if r.url.is_some() && r.url_secret_ref.is_some() {
        return Some("give redis.url or redis.urlSecretRef, not both".into());
    }
    None
}

/// The addresses (host names and IPs) a LoadBalancer Service was given.
fn lb_addresses(svc: &Service) -> Vec<String> {
    let ingress = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|l| l.ingress.as_ref());
    ingress
        .into_iter()
        .flatten()
        .flat_map(|i| [i.hostname.clone(), i.ip.clone()])
        .flatten()
        .collect()
}

async fn load_balancer_addresses(
    ctx: &Context,
    ns: &str,
    name: &str,
) -> Result<Vec<String>, Error> {
    let api: Api<Service> = Api::namespaced(ctx.client.clone(), ns);
    Ok(api
        .get_opt(name)
        .await?
        .map(|s| lb_addresses(&s))
        .unwrap_or_default())
}

/// Delete a child that a changed spec no longer wants: only if it is there
/// and `owner` controls it (a same-named object of the user's is left
/// alone).
async fn remove_child<K>(
    client: &kube::Client,
    ns: &str,
    name: &str,
    owner: &MqttBroker,
) -> Result<(), Error>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    let Some(obj) = api.get_opt(name).await? else {
        return Ok(());
    };
    let uid = owner.metadata.uid.as_deref();
    let owned = obj
        .meta()
        .owner_references
        .iter()
        .flatten()
        .any(|o| o.controller == Some(true) && Some(o.uid.as_str()) == uid);
    if owned {
        match api.delete(name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

fn rfc3339(unix: i64) -> Option<String> {
    k8s_openapi::jiff::Timestamp::from_second(unix)
        .ok()
        .map(|t| t.to_string())
}

/// The broker's server certificate: the user's Secret, or one issued by the
/// operator's CA and renewed in time. Returns how long until it must be
/// looked at again.
async fn ensure_tls(
    ctx: &Context,
    b: &MqttBroker,
    ns: &str,
    status: &mut cirrus_operator_api::MqttBrokerStatus,
    generation: Option<i64>,
) -> Result<std::time::Duration, Error> {
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let now = k8s_openapi::jiff::Timestamp::now().as_second();
    let name = b.name_any();
    if let Some(user) = &b.spec.tls.secret_name {
        let info = secrets
            .get_opt(user)
            .await?
            .as_ref()
            .and_then(tls::cert_of)
            .and_then(|c| tls::inspect(&c));
        let (ok, reason, msg) = match info {
            Some((not_after, _)) => {
                status.certificate_expiry = rfc3339(not_after);
                (
                    true,
                    "UserSecret",
                    format!("certificate from Secret {user}"),
                )
            }
            None => {
                status.certificate_expiry = None;
                (
                    false,
                    "SecretMissing",
                    format!("Secret {user} has no readable tls.crt"),
                )
            }
        };
        set_condition(
            &mut status.conditions,
            condition("TLSReady", ok, reason, msg, generation),
        );
        return Ok(ctx.resync);
    }
    // The Service's own names, the spec's extra ones, and the addresses a
    // LoadBalancer got (so that a client verifies the name it dials).
    let mut names = tls::dns_names(&name, ns);
    names.extend(b.spec.tls.extra_sans.iter().cloned());
    names.extend(load_balancer_addresses(ctx, ns, &name).await?);
    names.dedup();
    if let Some(issuer) = &b.spec.tls.issuer_ref {
        return certificate_from_cert_manager(ctx, b, ns, issuer, &names, status, generation).await;
    }
    let (ca, ca_wait) = namespace_ca(ctx, b, &secrets, ns, now).await?;
    let secret_name = format!("{name}-tls");
    let meta = resources::meta(b, secret_name.clone(), resources::labels(&name));
    let current = secrets.get_opt(&secret_name).await?;
    let current_pair = current.as_ref().and_then(tls::ca_from_secret);
    let cert = match current_pair {
        // Still good, and from the CA that signs now (a rotation reissues
        // every certificate): only the trust bundle may have to follow.
        Some(pair)
            if !tls::needs_renewal(Some(&pair.cert), &names, now)
                && tls::issued_by(&pair.cert, &ca.signer.cert) =>
        {
            if current.as_ref().and_then(tls::bundle_of).as_deref() != Some(ca.bundle.as_str()) {
                apply(&ctx.client, ns, &tls::tls_secret(meta, &pair, &ca.bundle)).await?;
            }
            pair.cert
        }
        old => {
            let pair = tls::issue(&ca.signer, &names)?;
            apply(&ctx.client, ns, &tls::tls_secret(meta, &pair, &ca.bundle)).await?;
            let what = if old.is_some() { "renewed" } else { "issued" };
            publish(
                ctx,
                b,
                EventType::Normal,
                "CertificateIssued",
                format!("{what} the server certificate in Secret {secret_name}"),
            )
            .await;
            pair.cert
        }
    };
    let not_after = tls::inspect(&cert).map_or(now, |(t, _)| t);
    status.certificate_expiry = rfc3339(not_after);
    set_condition(
        &mut status.conditions,
        condition(
            "TLSReady",
            true,
            if ca.phase.is_some() {
                "CARotating"
            } else {
                "Issued"
            },
            match ca.phase {
                Some(_) => format!(
                    "certificate for {} from the operator's CA; {}",
                    names.join(", "),
                    ca.describe()
                ),
                None => format!(
                    "certificate for {} from the operator's CA",
                    names.join(", ")
                ),
            },
            generation,
        ),
    );
    let renew_at = not_after - tls::RENEW_BEFORE_DAYS * 86_400;
    // Back for the renewal, or for the rotation's next step.
    let wait = ca_wait.map_or(renew_at - now, |w| w.min(renew_at - now));
    Ok(std::time::Duration::from_secs(wait.max(1) as u64))
}

/// Whether the broker's certificate came from cert-manager at the last
/// reconcile (its TLSReady condition says so).
fn had_cert_manager(b: &MqttBroker) -> bool {
    b.status.as_ref().is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == "TLSReady" && cert_manager::REASONS.contains(&c.reason.as_str()))
    })
}

/// `tls.issuerRef`: the broker's cert-manager Certificate, applied, and
/// TLSReady from what cert-manager says of it. While it is not issued the
/// broker is looked at again every few seconds (the operator does not
/// watch cert-manager's kind, which a cluster may not have).
async fn certificate_from_cert_manager(
    ctx: &Context,
    b: &MqttBroker,
    ns: &str,
    issuer: &cirrus_operator_api::IssuerRef,
    names: &[String],
    status: &mut cirrus_operator_api::MqttBrokerStatus,
    generation: Option<i64>,
) -> Result<std::time::Duration, Error> {
    const PENDING_WAIT: std::time::Duration = std::time::Duration::from_secs(5);
    let state = cert_manager::ensure(&ctx.client, b, ns, issuer, names).await?;
    let cert = cert_manager::certificate_name(b);
    let (ok, reason, msg, wait) = match state {
        cert_manager::State::Issued { not_after } => {
            status.certificate_expiry = not_after;
            (
                true,
                "CertManagerIssued",
                format!(
                    "certificate for {} from cert-manager (Certificate {cert}, issuer {})",
                    names.join(", "),
                    issuer.name
                ),
                ctx.resync,
            )
        }
        cert_manager::State::Pending { reason, message } => {
            status.certificate_expiry = None;
            (
                false,
                "CertificatePending",
                format!("cert-manager has not issued Certificate {cert}: {reason}: {message}"),
                PENDING_WAIT.min(ctx.resync),
            )
        }
        cert_manager::State::Missing => {
            status.certificate_expiry = None;
            (
                false,
                "CertManagerMissing",
                "tls.issuerRef needs cert-manager, whose Certificate kind \
                 (cert-manager.io/v1) this cluster does not serve"
                    .to_string(),
                ctx.resync,
            )
        }
    };
    let was = b.status.as_ref().and_then(|s| {
        s.conditions
            .iter()
            .find(|c| c.type_ == "TLSReady")
            .map(|c| c.reason.clone())
    });
    if was.as_deref() != Some(reason) {
        let kind = if ok {
            EventType::Normal
        } else {
            EventType::Warning
        };
        publish(ctx, b, kind, reason, msg.clone()).await;
    }
    set_condition(
        &mut status.conditions,
        condition("TLSReady", ok, reason, msg, generation),
    );
    Ok(wait)
}

/// The namespace's CA (made on first use), with a rotation asked for on
/// its Secret taken one step further when due; and the seconds until the
/// rotation's next step.
async fn namespace_ca(
    ctx: &Context,
    b: &MqttBroker,
    secrets: &Api<Secret>,
    ns: &str,
    now: i64,
) -> Result<(tls::CaState, Option<i64>), Error> {
    let unreadable = || Error::Tls(tls::TlsError::BadCa("unreadable"));
    // Another reconcile (of a broker sharing the CA) may take the same step
    // at the same time: one wins, the other reads again.
    for _ in 0..3 {
        let Some(secret) = secrets.get_opt(tls::CA_SECRET).await? else {
            let ca = tls::new_ca(ns)?;
            let meta = kube::api::ObjectMeta {
                name: Some(tls::CA_SECRET.into()),
                labels: Some(std::collections::BTreeMap::from([(
                    "app.kubernetes.io/managed-by".to_string(),
                    "cirrus-operator".to_string(),
                )])),
                ..Default::default()
            };
            // Shared by the namespace's brokers: created once, never owned.
            match secrets
                .create(&Default::default(), &tls::tls_secret(meta, &ca, &ca.cert))
                .await
            {
                Ok(s) => {
                    publish(
                        ctx,
                        b,
                        EventType::Normal,
                        "CAIssued",
                        format!("created the CA Secret {}", tls::CA_SECRET),
                    )
                    .await;
                    return Ok((tls::CaState::from_secret(&s).ok_or_else(unreadable)?, None));
                }
                Err(kube::Error::Api(e)) if e.code == 409 => continue,
                Err(e) => return Err(e.into()),
            }
        };
        let state = tls::CaState::from_secret(&secret).ok_or_else(unreadable)?;
        let (next, wait) = state.step(now, || tls::new_ca(ns))?;
        let Some(next) = next else {
            return Ok((state, wait));
        };
        let patch = next
            .patch(secret.metadata.resource_version.clone())
            .map_err(|_| unreadable())?;
        match secrets
            .patch(
                tls::CA_SECRET,
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
        {
            Ok(_) => {
                tracing::info!(namespace = ns, "{}", next.describe());
                publish(
                    ctx,
                    b,
                    EventType::Normal,
                    "CARotation",
                    format!("{} (Secret {})", next.describe(), tls::CA_SECRET),
                )
                .await;
                return Ok((next, wait));
            }
            Err(kube::Error::Api(e)) if e.code == 409 => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(Error::Tls(tls::TlsError::BadCa(
        "changed by others while read",
    )))
}

/// The least time between two writes of a broker's auth files: a burst
/// of user changes becomes one write a second, not one per user (each
/// write is up to 900 KiB into etcd and a reload in every pod).
const AUTH_WRITE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// A broker's auth files as they should be.
struct AuthPlan {
    /// By file number (0 the auth file): the text and the users in it, for
    /// every file whose users changed (or that is not there yet).
    files: Vec<(usize, String, Arc<Vec<User>>)>,
    /// User files in use (1 to this).
    user_files: usize,
    /// The unix time the next password overlap ends.
    next_end: Option<u64>,
    /// Users that fit in no file.
    left_out: Vec<String>,
    /// Users in the files.
    users: usize,
    /// What the auth file holds besides its users (anonymous access, the
    /// user files it names).
    header: String,
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn written_key(b: &MqttBroker) -> String {
    format!("{}/{}", b.namespace().unwrap_or_default(), b.name_any())
}

/// The users in a broker's auth files now, by file number: what this
/// process wrote, while the Secret still has the resourceVersion it got
/// (the cache, or the API server when the cache says otherwise); else
/// what the Secret holds.
async fn current_auth_files(
    ctx: &Context,
    b: &MqttBroker,
    ns: &str,
) -> Result<(HashMap<usize, Arc<Vec<User>>>, Option<String>), Error> {
    let caches = ctx.caches();
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let written = ctx
        .auth_written
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .get(&written_key(b))
        .cloned()
        .unwrap_or_default();
    let parse = |n: usize, s: &Secret| -> Arc<Vec<User>> {
        let key = if n == 0 {
            AUTH_KEY
        } else {
            resources::USERS_KEY
        };
        let text = s
            .data
            .as_ref()
            .and_then(|d| d.get(key))
            .map(|v| String::from_utf8_lossy(&v.0).into_owned())
            .unwrap_or_default();
        let users = if n == 0 {
            AuthFile::from_yaml(&text).map(|f| f.users)
        } else {
            cirrus_config::auth::UsersFile::from_yaml(&text).map(|f| f.users)
        };
        // Unreadable: written anew from the users.
        Arc::new(users.unwrap_or_default())
    };
    let rv = |s: &Secret| s.metadata.resource_version.clone().unwrap_or_default();
    let mut out = HashMap::new();
    let mut header = None;
    for n in 0..=auth::MAX_USER_FILES {
        let name = if n == 0 {
            resources::auth_secret_name(b)
        } else {
            resources::user_file_secret_name(b, n)
        };
        let cached = caches.secret(ns, &name);
        let ours = |users: &Arc<Vec<User>>, header: &mut Option<String>| {
            if n == 0 {
                header.clone_from(&written.main_header);
            }
            Some(users.clone())
        };
        let users = match (written.files.get(&n), cached) {
            (Some((v, users)), Some(s)) if rv(&s) == *v => ours(users, &mut header),
            // Ours, but the cache says otherwise (behind, or changed by
            // someone else): the API server decides.
            (Some((v, users)), _) => match secrets.get_opt(&name).await? {
                Some(s) if rv(&s) == *v => ours(users, &mut header),
                Some(s) => Some(parse(n, &s)),
                None => None,
            },
            (None, Some(s)) => Some(parse(n, &s)),
            (None, None) => None,
        };
        if let Some(u) = users {
            out.insert(n, u);
        }
    }
    Ok((out, header))
}

/// The auth files for `b`: every valid user that references it, first by
/// creation time when two claim one user name, spread over the files with
/// each user staying in its file. A hash is kept while its password Secret
/// is the version it was made from (or, from another writer, while the
/// password still verifies); new ones are made on the blocking pool. A
/// user whose password changed keeps the hash before for its
/// `passwordOverlapSeconds`.
async fn plan_auth(ctx: &Context, b: &MqttBroker, ns: &str) -> Result<AuthPlan, Error> {
    let caches = ctx.caches();
    let now = unix_now();
    let (current, main_header) = current_auth_files(ctx, b, ns).await?;
    let mut was_in: HashMap<String, usize> = HashMap::new();
    let mut previous: HashMap<String, &User> = HashMap::new();
    for (n, users) in &current {
        for u in users.iter() {
            was_in.insert(u.username.clone(), *n);
            previous.insert(u.username.clone(), u);
        }
    }
    let broker = b.name_any();
    let mut users = caches.users.state_filter(|u| {
        u.spec.broker_ref == broker
            && u.metadata.deletion_timestamp.is_none()
            && u.namespace().as_deref() == Some(ns)
    });
    // Oldest first (by reference: no copy per comparison of 50,000; names
    // are unique in a namespace, so no order is left to keep).
    users.sort_unstable_by(|a, b| {
        (&a.metadata.creation_timestamp, &a.metadata.name)
            .cmp(&(&b.metadata.creation_timestamp, &b.metadata.name))
    });
    // Each user's password source and, when it has no hash for it yet,
    // the job that makes one.
    let mut entries: Vec<(User, Option<usize>, u64)> = Vec::new();
    let mut jobs = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for u in &users {
        let username = auth::username_ref(u);
        if auth::invalid_acl_filter(&u.spec.acl).is_some() || !seen.insert(username) {
            continue;
        }
        let (secret_name, key, strength) = match &u.spec.password_secret_ref {
            Some(r) => (r.name.clone(), r.key.clone(), auth::Strength::Chosen),
            None => (
                resources::user_secret_name(u),
                resources::PASSWORD_KEY.to_string(),
                auth::Strength::Generated,
            ),
        };
        let Some(secret) = caches.secret(ns, &secret_name) else {
            continue;
        };
        // Copied only when it is to be hashed.
        let Some(password) = secret
            .data
            .as_ref()
            .and_then(|d| d.get(&key))
            .and_then(|v| std::str::from_utf8(&v.0).ok())
            .filter(|p| !p.is_empty())
        else {
            continue;
        };
        let source = format!(
            "{}/{}/{key}",
            secret.metadata.uid.as_deref().unwrap_or_default(),
            secret
                .metadata
                .resource_version
                .as_deref()
                .unwrap_or_default()
        );
        let before = previous.get(username);
        let job = match before {
            Some(p) if p.password_source.as_deref() == Some(source.as_str()) => None,
            _ => {
                jobs.push(auth::HashJob {
                    password: password.to_string(),
                    previous: before.map(|p| p.password_hash.clone()),
                    strength,
                });
                Some(jobs.len() - 1)
            }
        };
        entries.push((
            User {
                username: username.to_string(),
                password_hash: before.map(|p| p.password_hash.clone()).unwrap_or_default(),
                previous_password_hash: None,
                previous_valid_until: None,
                password_source: Some(source),
                acl: auth::acl(&u.spec.acl),
            },
            job,
            u64::from(u.spec.password_overlap_seconds),
        ));
    }
    let hashes = auth::hash_all(jobs).await.map_err(|_| Error::Hash)?;
    let mut out = Vec::with_capacity(entries.len());
    for (mut e, job, overlap) in entries {
        if let Some(h) = job.and_then(|j| hashes.get(j)) {
            e.password_hash = h.clone();
        }
        let before = previous.get(&e.username);
        (e.previous_password_hash, e.previous_valid_until) = match before {
            // Just changed: the hash before logs in for the overlap.
            Some(p) if p.password_hash != e.password_hash && overlap > 0 => {
                (Some(p.password_hash.clone()), Some(now + overlap))
            }
            // An overlap under way goes on until it ends.
            Some(p) if p.password_hash == e.password_hash => {
                match (&p.previous_password_hash, p.previous_valid_until) {
                    (Some(h), Some(until)) if until > now => (Some(h.clone()), Some(until)),
                    _ => (None, None),
                }
            }
            _ => (None, None),
        };
        out.push(e);
    }
    let next_end = out.iter().filter_map(|u| u.previous_valid_until).min();
    let count = out.len();
    let budget = ctx
        .user_file_budget
        .load(std::sync::atomic::Ordering::Relaxed);
    let (spread, left_out) = auth::spread(out, &was_in, budget);
    let user_files = spread.len() - 1;
    let mut files = Vec::new();
    let header = format!(
        "{:?}/{:?}/{user_files}",
        b.spec.allow_anonymous, b.spec.anonymous_acl
    );
    for (n, users) in spread.into_iter().enumerate() {
        let same_users = current.get(&n).is_some_and(|c| **c == users);
        // The auth file also holds the header: written again when that
        // changed (or is not known: written by another process).
        if same_users && (n > 0 || main_header.as_deref() == Some(header.as_str())) {
            continue;
        }
        let text = if n == 0 {
            auth::auth_file_text(&auth::auth_file(
                b.spec.allow_anonymous,
                &b.spec.anonymous_acl,
                users.clone(),
                user_files,
            ))
        } else {
            auth::users_file_text(&users).map_err(|e| e.to_string())
        }
        .map_err(|_| Error::Serialize("auth file".into()))?;
        files.push((n, text, Arc::new(users)));
    }
    // User files no longer named are emptied, not deleted (the operator
    // may not delete Secrets); the broker's deletion collects them.
    for (n, users) in &current {
        if *n > user_files && !users.is_empty() {
            let text =
                auth::users_file_text(&[]).map_err(|_| Error::Serialize("auth file".into()))?;
            files.push((*n, text, Arc::new(Vec::new())));
        }
    }
    Ok(AuthPlan {
        header,
        files,
        user_files,
        next_end,
        users: count - left_out.len(),
        left_out,
    })
}

/// Write what changed in the broker's auth files (user files first, the
/// auth file that names them last),
/// at most once per [`AUTH_WRITE_INTERVAL`]: the time to wait when it was
/// too soon.
async fn write_auth(
    ctx: &Context,
    b: &MqttBroker,
    ns: &str,
    plan: &AuthPlan,
) -> Result<Option<std::time::Duration>, Error> {
    let caches = ctx.caches();
    let key = written_key(b);
    let mut written = ctx
        .auth_written
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .get(&key)
        .cloned()
        .unwrap_or_default();
    let rv = |s: &Secret| s.metadata.resource_version.clone().unwrap_or_default();
    // The auth file is applied every time (its text says what must be
    // there; an unchanged apply changes nothing): skip it when its text is
    // what the Secret holds.
    let main_text = |s: &Secret| {
        s.data
            .as_ref()
            .and_then(|d| d.get(AUTH_KEY))
            .map(|v| v.0.clone())
    };
    let changed: Vec<&(usize, String, Arc<Vec<User>>)> = plan
        .files
        .iter()
        .filter(|(n, text, _)| {
            *n != 0
                || caches
                    .secret(ns, &resources::auth_secret_name(b))
                    .and_then(|s| main_text(&s))
                    .as_deref()
                    != Some(text.as_bytes())
        })
        .collect();
    if changed.is_empty() {
        return Ok(None);
    }
    if let Some(last) = written.last_write {
        let since = last.elapsed();
        if since < AUTH_WRITE_INTERVAL {
            return Ok(Some(AUTH_WRITE_INTERVAL - since));
        }
    }
    let mut order = changed;
    order.sort_by_key(|(n, _, _)| if *n == 0 { usize::MAX } else { *n });
    for (n, text, users) in order {
        let s = if *n == 0 {
            resources::auth_secret(b, text)
        } else {
            resources::user_file_secret(b, *n, text)
        };
        let put = apply(&ctx.client, ns, &s).await?;
        written.files.insert(*n, (rv(&put), users.clone()));
        if *n == 0 {
            written.main_header = Some(plan.header.clone());
        }
        written.last_write = Some(std::time::Instant::now());
        // At once, so that the watch event of this write is known as ours.
        ctx.auth_written
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(key.clone(), written.clone());
    }
    Ok(None)
}

pub(crate) async fn publish<K: Resource<DynamicType = ()>>(
    ctx: &Context,
    obj: &K,
    type_: EventType,
    reason: &str,
    note: String,
) {
    let reference = obj.object_ref(&());
    let ev = Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&ev, &reference).await {
        warn!(error = %e, "could not publish an event");
    }
}
