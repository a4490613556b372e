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
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::{self, reflector, ObjectRef};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tracing::{info, instrument, warn};

use crate::metrics::Kind;
use crate::resources::{self, AUTH_KEY};
use crate::tls;
use crate::{auth, health, Context, Error, FIELD_MANAGER};

pub async fn run(ctx: Arc<Context>, shutdown: CancellationToken) {
    let cfg = watcher::Config::default();
    // The children carry the operator's label: only they are watched.
    let owned = watcher::Config::default().labels(resources::OWNED_SELECTOR);
    // The users, for the password Secrets they name.
    let (users, writer) = reflector::store::<MqttUser>();
    let users_watch = reflector(writer, watcher(ctx.scoped::<MqttUser>(), cfg.clone()))
        .default_backoff()
        .touched_objects()
        .for_each(|_| futures_util::future::ready(()));
    let stop = shutdown.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = users_watch => {}
            _ = stop.cancelled() => {}
        }
    });
    let controller = Controller::new(ctx.scoped::<MqttBroker>(), cfg.clone());
    let brokers = controller.store();
    controller
        .owns(ctx.scoped::<Deployment>(), owned.clone())
        .owns(ctx.scoped::<ConfigMap>(), owned.clone())
        .owns(ctx.scoped::<Service>(), owned.clone())
        .owns(ctx.scoped::<HorizontalPodAutoscaler>(), owned.clone())
        .owns(ctx.scoped::<PodDisruptionBudget>(), owned)
        // Secrets: the broker's own (auth, TLS) and those its spec or its
        // users name (Redis URL, client CA, passwords), so that a change
        // there is seen at once, not at the next resync.
        .watches(ctx.scoped::<Secret>(), cfg.clone(), move |s| {
            secret_readers(&s, &brokers.state(), &users.state())
        })
        .watches(ctx.scoped::<MqttUser>(), cfg, |u| {
            u.namespace()
                .map(|ns| ObjectRef::<MqttBroker>::new(&u.spec.broker_ref).within(&ns))
        })
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

/// The brokers a Secret matters to: its owner, brokers whose spec names it,
/// and the brokers of users whose password it holds (named by the user, or
/// generated for it).
fn secret_readers(
    s: &Secret,
    brokers: &[Arc<MqttBroker>],
    users: &[Arc<MqttUser>],
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
            .iter()
            .filter(|b| b.namespace().as_deref() == Some(&ns) && named(b))
            .map(|b| ObjectRef::from_obj(&**b)),
    );
    // Users whose password it holds: named by them, or generated for them
    // (owned by the user).
    let owner_users: Vec<&str> = s
        .owner_references()
        .iter()
        .filter(|o| o.kind == "MqttUser")
        .map(|o| o.name.as_str())
        .collect();
    out.extend(
        users
            .iter()
            .filter(|u| {
                u.namespace().as_deref() == Some(&ns)
                    && (u
                        .spec
                        .password_secret_ref
                        .as_ref()
                        .is_some_and(|r| r.name == name)
                        || owner_users.contains(&u.name_any().as_str()))
            })
            .map(|u| ObjectRef::new(&u.spec.broker_ref).within(&ns)),
    );
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

    let config_yaml = serde_yaml::to_string(&resources::broker_config(&b))
        .map_err(|_| Error::Serialize("broker config".into()))?;
    apply(client, &ns, &resources::config_map(&b, &config_yaml)).await?;

    let tls_wait = if b.spec.tls.enabled {
        ensure_tls(&ctx, &b, &ns, &mut status, generation).await?
    } else {
        status.certificate_expiry = None;
        status.conditions.retain(|c| c.type_ != "TLSReady");
        ctx.resync
    };

    let (auth_yaml, overlap_end) = build_auth(&ctx, &b, &ns).await?;
    apply(client, &ns, &resources::auth_secret(&b, &auth_yaml)).await?;

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
    Ok(Action::requeue(ctx.resync.min(tls_wait).min(overlap_wait)))
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
    let (ca, ca_wait) = namespace_ca(ctx, b, &secrets, ns, now).await?;
    // The Service's own names, the spec's extra ones, and the addresses a
    // LoadBalancer got (so that a client verifies the name it dials).
    let mut names = tls::dns_names(&name, ns);
    names.extend(b.spec.tls.extra_sans.iter().cloned());
    names.extend(load_balancer_addresses(ctx, ns, &name).await?);
    names.dedup();
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

/// The auth file for `b`: every valid user that references it, first by
/// creation time when two claim one user name. Hashes already in the
/// current Secret are kept while the password still verifies; a user whose
/// password changed keeps the hash before for its
/// `passwordOverlapSeconds`. Also the unix time the next such overlap ends
/// (the auth file must be written again then).
async fn build_auth(
    ctx: &Context,
    b: &MqttBroker,
    ns: &str,
) -> Result<(String, Option<u64>), Error> {
    let client = &ctx.client;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let previous: HashMap<String, User> = secrets
        .get_opt(&resources::auth_secret_name(b))
        .await?
        .and_then(|s| s.data)
        .and_then(|d| d.get(AUTH_KEY).cloned())
        .and_then(|v| String::from_utf8(v.0).ok())
        .and_then(|t| AuthFile::from_yaml(&t).ok())
        .map(|f| {
            f.users
                .into_iter()
                .map(|u| (u.username.clone(), u))
                .collect()
        })
        .unwrap_or_default();
    let mut users: Vec<MqttUser> = Api::<MqttUser>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|u| u.spec.broker_ref == b.name_any() && u.metadata.deletion_timestamp.is_none())
        .collect();
    users.sort_by(|a, b| {
        (a.creation_timestamp(), a.name_any()).cmp(&(b.creation_timestamp(), b.name_any()))
    });
    let mut entries = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for u in &users {
        let username = auth::username(u);
        if auth::invalid_acl_filter(&u.spec.acl).is_some() || !seen.insert(username.clone()) {
            continue;
        }
        let Some(password) = crate::user::password(&secrets, u).await? else {
            continue;
        };
        let before = previous.get(&username);
        let hash = auth::hash_password(&password, before.map(|p| p.password_hash.as_str()))
            .map_err(|_| Error::Hash)?;
        let overlap = u64::from(u.spec.password_overlap_seconds);
        let (previous_password_hash, previous_valid_until) = match before {
            // Just changed: the hash before logs in for the overlap.
            Some(p) if p.password_hash != hash && overlap > 0 => {
                (Some(p.password_hash.clone()), Some(now + overlap))
            }
            // An overlap under way goes on until it ends.
            Some(p) if p.password_hash == hash => {
                match (&p.previous_password_hash, p.previous_valid_until) {
                    (Some(h), Some(until)) if until > now => (Some(h.clone()), Some(until)),
                    _ => (None, None),
                }
            }
            _ => (None, None),
        };
        entries.push(User {
            username,
            password_hash: hash,
            previous_password_hash,
            previous_valid_until,
            acl: auth::acl(&u.spec.acl),
        });
    }
    let next_end = entries.iter().filter_map(|u| u.previous_valid_until).min();
    let yaml = auth::auth_file(b.spec.allow_anonymous, &b.spec.anonymous_acl, entries)
        .to_yaml()
        .map_err(|_| Error::Serialize("auth file".into()))?;
    Ok((yaml, next_end))
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
