//! The operator's view of users, Secrets and brokers: reflector stores kept
//! by one watch each, so that a reconcile reads what it needs from memory
//! instead of listing users and getting Secrets from the API server (which,
//! with tens of thousands of users, would be a list of all of them per
//! event).
//!
//! The same watches wake the broker controller: a user or Secret event is
//! mapped to the brokers it matters to as it arrives, after the store took
//! it in (so a reconcile never reads an older object than the one that woke
//! it), and those brokers are queued once each however many events named
//! them ([`Wake`]). Nothing here waits for the controller, so a burst of
//! thousands of events never slows a watch into being dropped and listed
//! again.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cirrus_operator_api::{MqttBroker, MqttUser};
use futures_util::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Secret;
use kube::runtime::reflector::{self, reflector, ObjectRef, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// The stores.
pub struct Caches {
    pub users: Store<MqttUser>,
    pub secrets: Store<Secret>,
    pub brokers: Store<MqttBroker>,
    /// Who claims each user name, kept by the users' watch.
    pub usernames: Usernames,
}

/// A user name on one broker: namespace, broker, user name.
type NameKey = (String, String, String);

/// A user claiming a name: creation time (seconds), object name, uid.
type Claim = (i64, String, String);

/// The users that claim each user name on each broker, kept by the users'
/// watch, so that a user's reconcile asks whether an older user has its
/// name without reading every user (at 50,000 users that scan was most of
/// the operator's CPU).
#[derive(Default)]
pub struct Usernames {
    inner: parking_lot::Mutex<UsernamesInner>,
}

#[derive(Default)]
struct UsernamesInner {
    by_name: HashMap<NameKey, Vec<Claim>>,
    by_uid: HashMap<String, NameKey>,
}

fn claim_of(u: &MqttUser) -> Option<(NameKey, Claim)> {
    let ns = u.metadata.namespace.clone()?;
    let uid = u.metadata.uid.clone()?;
    let created = u
        .metadata
        .creation_timestamp
        .as_ref()
        .map_or(0, |t| t.0.as_second());
    Some((
        (
            ns,
            u.spec.broker_ref.clone(),
            crate::auth::username_ref(u).to_string(),
        ),
        (created, u.name_any(), uid),
    ))
}

impl Usernames {
    fn remove_uid(inner: &mut UsernamesInner, uid: &str) {
        if let Some(key) = inner.by_uid.remove(uid) {
            if let Some(claims) = inner.by_name.get_mut(&key) {
                claims.retain(|c| c.2 != uid);
                if claims.is_empty() {
                    inner.by_name.remove(&key);
                }
            }
        }
    }

    /// `u` as it is now.
    pub fn apply(&self, u: &MqttUser) {
        let Some((key, claim)) = claim_of(u) else {
            return;
        };
        let mut inner = self.inner.lock();
        Self::remove_uid(&mut inner, &claim.2);
        inner.by_uid.insert(claim.2.clone(), key.clone());
        inner.by_name.entry(key).or_default().push(claim);
    }

    /// `u` is gone.
    pub fn delete(&self, u: &MqttUser) {
        if let Some(uid) = u.metadata.uid.as_deref() {
            Self::remove_uid(&mut self.inner.lock(), uid);
        }
    }

    /// Whether a user created before `u` (or at the same second, with a
    /// name before its name) claims `u`'s user name on its broker.
    pub fn older_claim(&self, u: &MqttUser) -> bool {
        let Some((key, me)) = claim_of(u) else {
            return false;
        };
        self.inner.lock().by_name.get(&key).is_some_and(|claims| {
            claims
                .iter()
                .any(|c| c.2 != me.2 && (c.0, &c.1) < (me.0, &me.1))
        })
    }
}

/// The least time between two reconciles of one broker that its users' and
/// Secrets' events start: a burst of thousands of user changes is a
/// reconcile a second (each reads every user of the broker), not one per
/// change.
pub const WAKE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

#[derive(Default)]
struct Pending {
    /// In the order they were woken, each once.
    queue: VecDeque<ObjectRef<MqttBroker>>,
    queued: HashSet<ObjectRef<MqttBroker>>,
    /// When each was last handed to the controller (entries go with their
    /// broker's next hand-out after the interval: bounded by the brokers).
    last: HashMap<ObjectRef<MqttBroker>, Instant>,
}

/// Brokers waiting for a reconcile, each once, and each at most once per
/// [`WAKE_INTERVAL`].
#[derive(Default)]
pub struct Wake {
    pending: parking_lot::Mutex<Pending>,
    notify: Notify,
}

impl Wake {
    pub fn push(&self, r: ObjectRef<MqttBroker>) {
        let mut p = self.pending.lock();
        if p.queued.insert(r.clone()) {
            p.queue.push_back(r);
        }
        drop(p);
        self.notify.notify_one();
    }

    /// The first broker due, or how long until one is.
    fn pop(&self, now: Instant) -> Result<ObjectRef<MqttBroker>, Option<Duration>> {
        let mut p = self.pending.lock();
        let due = |p: &Pending, r: &ObjectRef<MqttBroker>| {
            p.last.get(r).map_or(Duration::ZERO, |t| {
                (*t + WAKE_INTERVAL).saturating_duration_since(now)
            })
        };
        let mut wait: Option<Duration> = None;
        let mut found = None;
        for (i, r) in p.queue.iter().enumerate() {
            let d = due(&p, r);
            if d.is_zero() {
                found = Some(i);
                break;
            }
            wait = Some(wait.map_or(d, |w| w.min(d)));
        }
        let Some(i) = found else {
            return Err(wait);
        };
        let r = p.queue.remove(i).ok_or(None)?;
        p.queued.remove(&r);
        p.last
            .retain(|_, t| now.saturating_duration_since(*t) < WAKE_INTERVAL);
        p.last.insert(r.clone(), now);
        Ok(r)
    }

    /// The brokers to reconcile, as they come due, until `stop`.
    pub fn stream(
        self: Arc<Self>,
        stop: CancellationToken,
    ) -> impl Stream<Item = ObjectRef<MqttBroker>> + Send + 'static {
        futures_util::stream::unfold((self, stop), |(w, stop)| async move {
            loop {
                let wait = match w.pop(Instant::now()) {
                    Ok(r) => return Some((r, (w, stop))),
                    Err(wait) => wait,
                };
                tokio::select! {
                    _ = w.notify.notified() => {}
                    _ = tokio::time::sleep(wait.unwrap_or(Duration::from_secs(3600))) => {}
                    _ = stop.cancelled() => return None,
                }
            }
        })
    }
}

impl Caches {
    /// Stores with nothing in them, never filled (before the controllers
    /// start).
    pub fn empty() -> Caches {
        Caches {
            users: reflector::store().0,
            secrets: reflector::store().0,
            brokers: reflector::store().0,
            usernames: Usernames::default(),
        }
    }

    /// Start watching users, Secrets and brokers in the context's scope
    /// until `stop`: the stores, and the brokers their events wake.
    pub fn start(ctx: &Arc<crate::Context>, stop: &CancellationToken) -> (Arc<Caches>, Arc<Wake>) {
        let (users, users_w) = reflector::store::<MqttUser>();
        let (secrets, secrets_w) = reflector::store::<Secret>();
        let (brokers, brokers_w) = reflector::store::<MqttBroker>();
        let caches = Arc::new(Caches {
            users,
            secrets,
            brokers,
            usernames: Usernames::default(),
        });
        let wake = Arc::new(Wake::default());
        let (w, c) = (wake.clone(), caches.clone());
        drive(
            users_w,
            ctx.scoped::<MqttUser>(),
            stop.clone(),
            move |u: &MqttUser, deleted: bool| {
                if deleted {
                    c.usernames.delete(u);
                } else {
                    c.usernames.apply(u);
                }
                if let Some(ns) = u.namespace() {
                    w.push(ObjectRef::new(&u.spec.broker_ref).within(&ns));
                }
            },
        );
        let (w, c, cx) = (wake.clone(), caches.clone(), ctx.clone());
        drive(
            secrets_w,
            ctx.scoped::<Secret>(),
            stop.clone(),
            move |s: &Secret, _| {
                if !crate::broker::own_auth_write(&cx, s) {
                    for r in crate::broker::secret_readers(s, &c.brokers, &c.users) {
                        w.push(r);
                    }
                }
            },
        );
        drive(
            brokers_w,
            ctx.scoped::<MqttBroker>(),
            stop.clone(),
            |_: &MqttBroker, _| {},
        );
        (caches, wake)
    }

    /// Until both stores hold their first full list (or `stop`): a
    /// reconcile before that would see no users and write an empty auth
    /// file. False when stopped first.
    pub async fn ready(&self, stop: &CancellationToken) -> bool {
        tokio::select! {
            _ = stop.cancelled() => false,
            r = async {
                self.users.wait_until_ready().await.is_ok()
                    && self.secrets.wait_until_ready().await.is_ok()
                    && self.brokers.wait_until_ready().await.is_ok()
            } => r,
        }
    }

    /// The Secret `name` in `ns`, from the store.
    pub fn secret(&self, ns: &str, name: &str) -> Option<Arc<Secret>> {
        self.secrets.get(&ObjectRef::new(name).within(ns))
    }
}

/// One watch of `api` into a store until `stop`, with `changed` called for
/// each object that changed once the store has it: its generation moved
/// (for kinds that have one: a status write or a label is no change here)
/// or, without one, its resourceVersion; and for each deletion (`true`). Managed
/// fields are not kept (they are most of a small object's size and nothing
/// here reads them).
fn drive<K>(
    writer: reflector::store::Writer<K>,
    api: kube::Api<K>,
    stop: CancellationToken,
    mut changed: impl FnMut(&K, bool) + Send + 'static,
) where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync,
    K: 'static,
{
    let events = reflector(
        writer,
        watcher(api, watcher::Config::default()).modify(|o: &mut K| o.managed_fields_mut().clear()),
    )
    .default_backoff();
    tokio::spawn(async move {
        let mut seen: HashMap<String, String> = HashMap::new();
        let run = events.for_each(|e| {
            match e {
                Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) => {
                    let m = o.meta();
                    let version = match m.generation {
                        Some(g) => g.to_string(),
                        None => m.resource_version.clone().unwrap_or_default(),
                    };
                    let uid = m.uid.clone().unwrap_or_default();
                    if seen.insert(uid, version.clone()).as_ref() != Some(&version) {
                        changed(&o, false);
                    }
                }
                Ok(watcher::Event::Delete(o)) => {
                    seen.remove(o.meta().uid.as_deref().unwrap_or_default());
                    changed(&o, true);
                }
                Ok(watcher::Event::Init | watcher::Event::InitDone) => {}
                Err(e) => {
                    tracing::warn!(error = %e, kind = %K::kind(&()), "watch failed; retrying")
                }
            }
            futures_util::future::ready(())
        });
        tokio::select! {
            _ = run => {}
            _ = stop.cancelled() => {}
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str, uid: &str, created: i64, username: &str) -> MqttUser {
        let mut u: MqttUser = serde_yaml::from_str(&format!(
            "apiVersion: mqtt.cirrus.dev/v1alpha1\nkind: MqttUser\n\
             metadata: {{name: {name}, namespace: ns, uid: {uid}}}\n\
             spec: {{brokerRef: b, username: {username}}}\n"
        ))
        .unwrap();
        u.metadata.creation_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::from_second(created).unwrap(),
        ));
        u
    }

    #[test]
    fn the_oldest_user_claiming_a_name_keeps_it_until_it_goes() {
        let names = Usernames::default();
        let first = user("first", "1", 100, "same");
        let second = user("second", "2", 200, "same");
        // Same second: the object name decides.
        let third = user("a-third", "3", 200, "same");
        for u in [&second, &first, &third] {
            names.apply(u);
        }
        assert!(!names.older_claim(&first));
        assert!(names.older_claim(&second));
        assert!(names.older_claim(&third));
        names.delete(&first);
        assert!(!names.older_claim(&third), "a-third < second");
        assert!(names.older_claim(&second));
        // A user that takes another name leaves the first one.
        names.apply(&user("a-third", "3", 200, "other"));
        assert!(!names.older_claim(&second));
        // Another broker's user of that name is no claim.
        let mut elsewhere = user("zero", "0", 1, "same");
        elsewhere.spec.broker_ref = "c".into();
        names.apply(&elsewhere);
        assert!(!names.older_claim(&second));
    }

    #[test]
    fn each_broker_is_queued_once_and_woken_at_most_once_a_second() {
        let w = Wake::default();
        let a = ObjectRef::<MqttBroker>::new("a").within("ns");
        let b = ObjectRef::<MqttBroker>::new("b").within("ns");
        for _ in 0..1000 {
            w.push(a.clone());
        }
        w.push(b.clone());
        let t0 = Instant::now();
        assert_eq!(w.pop(t0), Ok(a.clone()));
        assert_eq!(w.pop(t0), Ok(b.clone()));
        assert_eq!(w.pop(t0), Err(None), "each once");
        // Woken again at once: due a second after its last hand-out.
        w.push(a.clone());
        assert_eq!(
            w.pop(t0 + Duration::from_millis(300)),
            Err(Some(Duration::from_millis(700)))
        );
        assert_eq!(w.pop(t0 + WAKE_INTERVAL), Ok(a));
    }
}
