//! The MqttUser controller: the user's password Secret and status. The
//! user's entry in the broker's auth file is written by the broker
//! controller, which this resource's changes wake.

use std::sync::Arc;

use cirrus_operator_api::{set_condition, MqttBroker, MqttUser};
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::ResourceExt;
use tokio_util::sync::CancellationToken;
use tracing::{instrument, warn};

use crate::broker::{condition, publish};
use crate::metrics::Kind;
use crate::resources::{self, PASSWORD_KEY};
use crate::{auth, Context, Error};

/// Set (to any new value) on an `MqttUser` with a generated password: the
/// operator writes a new password into its Secret, and records the value
/// handled on the Secret.
pub const ROTATE_ANNOTATION: &str = "mqtt.cirrus.dev/rotate-password";

/// How often a ready user with a generated password is looked at again
/// when nothing woke it (drift only: its changes and its Secret's wake it).
const USER_RECHECK: std::time::Duration = std::time::Duration::from_secs(3600);

/// User reconciles run at once, at most.
const USER_CONCURRENCY: u16 = 16;

pub async fn run(ctx: Arc<Context>, shutdown: CancellationToken) {
    let cfg = watcher::Config::default();
    Controller::new(ctx.scoped::<MqttUser>(), cfg)
        // Bounded: thousands of new users are worked through 16 at a time,
        // not all at once (each holds requests and buffers while it runs).
        .with_config(kube::runtime::controller::Config::default().concurrency(USER_CONCURRENCY))
        .owns(
            ctx.scoped::<Secret>(),
            watcher::Config::default().labels(resources::OWNED_SELECTOR),
        )
        .graceful_shutdown_on(async move { shutdown.cancelled().await })
        .run(
            |u, ctx| async move {
                let key = format!(
                    "MqttUser/{}/{}",
                    u.namespace().unwrap_or_default(),
                    u.name_any()
                );
                let r = crate::timed(&ctx.clone(), Kind::User, reconcile(u, ctx.clone())).await;
                if r.is_ok() {
                    ctx.succeeded(&key);
                }
                r
            },
            error_policy,
            ctx,
        )
        .for_each(|r| async move {
            if let Err(e) = r {
                warn!(error = %e, "user reconcile failed");
            }
        })
        .await;
}

/// The backoff of the broker controller, by error class.
fn error_policy(u: Arc<MqttUser>, e: &Error, ctx: Arc<Context>) -> Action {
    let key = format!(
        "MqttUser/{}/{}",
        u.namespace().unwrap_or_default(),
        u.name_any()
    );
    let n = ctx.failed(&key);
    let delay = e.class().backoff(n, ctx.retry_delay());
    warn!(user = %u.name_any(), error = %e, label = e.metric_label(), failures = n, retry_in = ?delay, "reconcile error; retrying");
    Action::requeue(delay)
}

/// The Secret and key that hold the user's password: the one it names,
/// or the one the operator generated.
fn password_ref(u: &MqttUser) -> (String, String) {
    match &u.spec.password_secret_ref {
        Some(r) => (r.name.clone(), r.key.clone()),
        None => (resources::user_secret_name(u), PASSWORD_KEY.to_string()),
    }
}

fn password_in(s: &Secret, key: &str) -> Option<String> {
    s.data
        .as_ref()
        .and_then(|d| d.get(key))
        .and_then(|v| String::from_utf8(v.0.clone()).ok())
        .filter(|p| !p.is_empty())
}

/// The user's current password (from the Secret it names, or the one the
/// operator generated) as the API server has it. `None` while it does not
/// exist.
pub async fn password(secrets: &Api<Secret>, u: &MqttUser) -> Result<Option<String>, Error> {
    let (name, key) = password_ref(u);
    Ok(secrets
        .get_opt(&name)
        .await?
        .and_then(|s| password_in(&s, &key)))
}

#[instrument(skip_all, fields(user = %u.name_any(), namespace = u.namespace().unwrap_or_default()))]
pub async fn reconcile(u: Arc<MqttUser>, ctx: Arc<Context>) -> Result<Action, Error> {
    let client = &ctx.client;
    let ns = u.namespace().unwrap_or_default();
    let api: Api<MqttUser> = Api::namespaced(client.clone(), &ns);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let generation = u.metadata.generation;
    let mut status = u.status.clone().unwrap_or_default();
    status.observed_generation = generation;

    // Problems a person must fix: a condition and an event, no hot loop.
    // Read from the caches; the API server is asked only before telling
    // the user something is missing (the cache may be behind).
    let caches = ctx.caches();
    let problem = |reason: &'static str, msg: String| (reason, msg);
    let mut issue = None;
    let broker_known = caches
        .brokers
        .get(&ObjectRef::new(&u.spec.broker_ref).within(&ns))
        .is_some()
        || Api::<MqttBroker>::namespaced(client.clone(), &ns)
            .get_opt(&u.spec.broker_ref)
            .await?
            .is_some();
    if let Some(f) = auth::invalid_acl_filter(&u.spec.acl) {
        issue = Some(problem(
            "InvalidAcl",
            format!("ACL topic {f:?} is not a valid MQTT topic filter"),
        ));
    } else if !broker_known {
        issue = Some(problem(
            "BrokerNotFound",
            format!("MqttBroker {:?} does not exist in {ns}", u.spec.broker_ref),
        ));
    } else {
        let username = auth::username_ref(&u);
        let older = caches.usernames.older_claim(&u);
        if older {
            issue = Some(problem(
                "DuplicateUsername",
                format!(
                    "user name {username:?} is already used on broker {:?}",
                    u.spec.broker_ref
                ),
            ));
        }
    }
    if issue.is_none() {
        let (name, key) = password_ref(&u);
        let cached = caches.secret(&ns, &name);
        match &u.spec.password_secret_ref {
            Some(r) => {
                let present = cached
                    .as_deref()
                    .and_then(|s| password_in(s, &key))
                    .is_some()
                    || password(&secrets, &u).await?.is_some();
                if present {
                    status.secret_name = Some(r.name.clone());
                } else {
                    issue = Some(problem(
                        "SecretNotFound",
                        format!("Secret {:?} with key {:?} not found", r.name, r.key),
                    ));
                }
            }
            None => {
                let asked = u.annotations().get(ROTATE_ANNOTATION);
                let handled = |s: &Secret| s.annotations().get(ROTATE_ANNOTATION).cloned();
                // A rotation the cache says is not handled yet: asked of
                // the API server before a new password is made.
                let existing = match (&cached, asked) {
                    (Some(s), Some(a)) if handled(s).as_ref() != Some(a) => {
                        secrets.get_opt(&name).await?
                    }
                    _ => cached.as_deref().cloned(),
                };
                let done = existing.as_ref().and_then(handled);
                if let (Some(_), Some(want)) =
                    (&existing, asked.filter(|a| Some(*a) != done.as_ref()))
                {
                    // Asked for a new password (a value not handled yet):
                    // the Secret gets it, the broker's auth file follows.
                    let mut s =
                        resources::user_secret(&u, &auth::username(&u), &auth::generate_password());
                    s.metadata
                        .annotations
                        .get_or_insert_with(Default::default)
                        .insert(ROTATE_ANNOTATION.into(), want.clone());
                    secrets
                        .patch(
                            &name,
                            &kube::api::PatchParams::apply(crate::FIELD_MANAGER).force(),
                            &kube::api::Patch::Apply(&s),
                        )
                        .await?;
                    publish(
                        &ctx,
                        &*u,
                        EventType::Normal,
                        "PasswordRotated",
                        format!(
                            "new password in Secret {name}; the old one works for {} s more",
                            u.spec.password_overlap_seconds
                        ),
                    )
                    .await;
                } else if existing.is_none() {
                    // Generated once; replaced only when the annotation
                    // asks, so the password is stable across operator
                    // restarts. A request already on the user counts as
                    // handled by this first password.
                    let mut s =
                        resources::user_secret(&u, &auth::username(&u), &auth::generate_password());
                    if let Some(a) = asked {
                        s.metadata
                            .annotations
                            .get_or_insert_with(Default::default)
                            .insert(ROTATE_ANNOTATION.into(), a.clone());
                    }
                    match secrets.create(&PostParams::default(), &s).await {
                        Ok(_) => {
                            publish(
                                &ctx,
                                &*u,
                                EventType::Normal,
                                "PasswordGenerated",
                                format!("password stored in Secret {name}"),
                            )
                            .await
                        }
                        Err(kube::Error::Api(e)) if e.code == 409 => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                status.secret_name = Some(name);
            }
        }
    }
    let requeue = match issue {
        Some((reason, msg)) => {
            if set_condition(
                &mut status.conditions,
                condition("Ready", false, reason, msg.clone(), generation),
            ) {
                publish(&ctx, &*u, EventType::Warning, reason, msg).await;
            }
            // A missing broker or Secret may appear: look again, slowly.
            if reason == "InvalidAcl" {
                Action::await_change()
            } else {
                Action::requeue(ctx.resync)
            }
        }
        None => {
            set_condition(
                &mut status.conditions,
                condition(
                    "Ready",
                    true,
                    "Configured",
                    format!(
                        "user {:?} on broker {:?}",
                        auth::username(&u),
                        u.spec.broker_ref
                    ),
                    generation,
                ),
            );
            // A user with a generated password is woken by every change
            // that matters to it (its own, its Secret's); a Secret of the
            // user's own, which this controller does not watch, is looked
            // at each resync. (At 50,000 users a resync of each would be
            // 800 reconciles a second, ahead of new users in the queue.)
            if u.spec.password_secret_ref.is_some() {
                Action::requeue(ctx.resync)
            } else {
                Action::requeue(USER_RECHECK.max(ctx.resync))
            }
        }
    };
    crate::write_status(&api, &*u, u.status.as_ref(), status).await?;
    Ok(requeue)
}
